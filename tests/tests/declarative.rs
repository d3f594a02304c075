//! Declarative control: whole documents of VIPs applied in one step
//! (`PUT /v1/vips`), their dry runs, optimistic concurrency (`ETag`,
//! `If-Match`), bad documents refused as problem details, and a crash in
//! the middle of an apply.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::Path,
    thread,
    time::{Duration, Instant},
};

use lb::{
    control::client::{Endpoint, Response},
    dataplane::raw::RawMap,
};
use lb_common::{DEFAULT_TABLE_SIZE, MAGLEV_CHUNK, map_name};
use lb_tests::lab::{Lab, LabSpec};
use serde_json::{Value, json};

fn api(lab: &Lab) -> Endpoint {
    Endpoint::Unix(lab.api_socket())
}

fn put(e: &Endpoint, path: &str, body: &Value, if_match: Option<u64>) -> Response {
    let tag = if_match.map(|r| format!("\"{r}\""));
    let headers: Vec<(&str, &str)> = tag.iter().map(|t| ("If-Match", t.as_str())).collect();
    e.request_with(
        "PUT",
        path,
        Some(&serde_json::to_vec(body).unwrap()),
        &headers,
    )
    .expect("lbd answers")
}

fn json_of(r: &Response) -> Value {
    serde_json::from_slice(&r.body).unwrap_or(Value::Null)
}

/// The desired state as a document (without its revision), and the
/// revision.
fn spec(e: &Endpoint) -> (Value, u64) {
    let r = e.request("GET", "/v1/vips?spec=true", None).unwrap();
    assert_eq!(r.status, 200, "{}", r.error_message());
    let mut doc = json_of(&r);
    let revision = r.revision().expect("an ETag");
    assert_eq!(doc["revision"].as_u64(), Some(revision), "{doc}");
    // As a body, a document's revision is a precondition: the callers
    // give theirs as If-Match.
    doc.as_object_mut().unwrap().remove("revision");
    (doc, revision)
}

/// Per VIP key (as the map has it), each backend address's entries in the
/// VIP's active Maglev table, read from the pinned maps.
fn kernel_tables(dir: &Path) -> BTreeMap<Vec<u8>, BTreeMap<IpAddr, usize>> {
    let read = |name: &str| RawMap::open(&dir.join(name)).unwrap().entries().unwrap();
    let index = |k: &[u8]| u32::from_ne_bytes(k[..4].try_into().unwrap()) as usize;
    let mut backends: BTreeMap<u32, IpAddr> = BTreeMap::new();
    for (k, v) in read(map_name::BACKENDS) {
        let family = v[16];
        let words: [u32; 4] =
            std::array::from_fn(|i| u32::from_ne_bytes(v[i * 4..i * 4 + 4].try_into().unwrap()));
        if v[17] & lb_common::BACKEND_ALLOCATED != 0 {
            backends.insert(index(&k) as u32, lb_common::words_addr(family, words));
        }
    }
    let chunks: BTreeMap<usize, Vec<u8>> = read(map_name::MAGLEV)
        .into_iter()
        .map(|(k, v)| (index(&k), v))
        .collect();
    let per_table = DEFAULT_TABLE_SIZE.div_ceil(MAGLEV_CHUNK) as usize;
    read(map_name::VIPS)
        .into_iter()
        .map(|(key, info)| {
            let first = u32::from_ne_bytes(info[4..8].try_into().unwrap()) as usize;
            let mut counts = BTreeMap::new();
            let entries = (first..first + per_table)
                .flat_map(|c| {
                    chunks[&c]
                        .chunks_exact(4)
                        .map(|w| u32::from_ne_bytes(w.try_into().unwrap()))
                        .collect::<Vec<_>>()
                })
                .take(DEFAULT_TABLE_SIZE as usize);
            for id in entries {
                if let Some(a) = backends.get(&id) {
                    *counts.entry(*a).or_default() += 1;
                }
            }
            (key, counts)
        })
        .collect()
}

/// `n` extra VIPs with `per` backends each, outside the lab's subnets.
fn extra_vips(n: usize, per: usize, weight_base: u64) -> Vec<Value> {
    (0..n)
        .map(|v| {
            json!({
                "address": format!("198.18.{}.{}", v / 200, v % 200 + 1),
                "port": 443,
                "protocol": "tcp",
                "backends": (0..per).map(|b| json!({
                    "address": format!("10.250.{}.{}", v, b + 1),
                    "weight": weight_base + (b % 3) as u64,
                })).collect::<Vec<_>>(),
            })
        })
        .collect()
}

#[test]
fn a_document_of_50_vips_and_1000_backends_applies_in_one_request_and_again_changes_nothing() {
    let lab = Lab::start(&LabSpec {
        max_vips: 64,
        max_backends: 2048,
        log: "info,lb::control=debug",
        ..LabSpec::weights(&[1, 1])
    })
    .unwrap();
    let e = api(&lab);
    let (mut doc, revision) = spec(&e);
    // The lab's 4 VIPs (2 backends each) and 46 more: 50 VIPs, 1,000 backends.
    let lab_backends: usize = doc["vip"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["backends"].as_array().unwrap().len())
        .sum();
    let mut extra = extra_vips(46, 0, 1);
    let mut left = 1000 - lab_backends;
    for (i, v) in extra.iter_mut().enumerate() {
        let n = left / (46 - i);
        left -= n;
        *v = extra_vips(46, n, 1)[i].clone();
    }
    doc["vip"].as_array_mut().unwrap().extend(extra);
    let total: usize = doc["vip"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["backends"].as_array().unwrap().len())
        .sum();
    assert_eq!((doc["vip"].as_array().unwrap().len(), total), (50, 1000));
    let body = serde_json::to_vec(&doc).unwrap();

    let started = Instant::now();
    let r = put(&e, "/v1/vips", &doc, Some(revision));
    let took = started.elapsed();
    for l in lab
        .lbd_log()
        .lines()
        .filter(|l| l.contains("commit phases") || l.contains("change committed"))
    {
        println!("{l}");
    }
    let out = json_of(&r);
    assert_eq!(r.status, 200, "{}", r.error_message());
    println!(
        "PUT of 50 VIPs, 1,000 backends ({} bytes): {:.1} ms, {} tables switched, revision {} -> {}",
        body.len(),
        took.as_secs_f64() * 1000.0,
        out["tables_switched"],
        revision,
        out["revision"]
    );
    assert_eq!(out["changed"], true);
    assert_eq!(out["tables_switched"], 46, "each new VIP's table once");
    assert_eq!(out["revision"].as_u64(), Some(revision + 1));
    assert_eq!(r.revision(), Some(revision + 1));

    // Every table right: the kernel's tables hold exactly each VIP's
    // backends, in proportion to their weights.
    let tables = kernel_tables(&lab.pin_dir());
    assert_eq!(tables.len(), 50);
    let views: Value = json_of(&e.request("GET", "/v1/vips", None).unwrap());
    for (v, want) in views
        .as_array()
        .unwrap()
        .iter()
        .zip(doc["vip"].as_array().unwrap())
    {
        assert_eq!(v["address"], want["address"]);
        let counts: BTreeMap<IpAddr, usize> = v["backends"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| {
                (
                    b["address"].as_str().unwrap().parse().unwrap(),
                    b["table_entries"].as_u64().unwrap() as usize,
                )
            })
            .collect();
        let addrs: Vec<IpAddr> = want["backends"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["address"].as_str().unwrap().parse().unwrap())
            .collect();
        assert_eq!(
            counts
                .keys()
                .copied()
                .collect::<std::collections::BTreeSet<_>>(),
            addrs.iter().copied().collect(),
            "{}",
            v["vip"]
        );
        assert!(
            tables.values().any(|t| *t == counts),
            "VIP {}: the kernel's table is not the one lbd built",
            v["vip"]
        );
        let weights: u64 = want["backends"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["weight"].as_u64().unwrap())
            .sum();
        for b in want["backends"].as_array().unwrap() {
            let a: IpAddr = b["address"].as_str().unwrap().parse().unwrap();
            let share = counts[&a] as f64 / f64::from(DEFAULT_TABLE_SIZE);
            let expected = b["weight"].as_u64().unwrap() as f64 / weights as f64;
            assert!(
                (share - expected).abs() < 0.01,
                "VIP {} backend {a}: share {share:.4}, weight share {expected:.4}",
                v["vip"]
            );
        }
    }

    // Again: nothing changes, no table switches, the revision stays.
    let vips_before = RawMap::open(&lab.pin_dir().join(map_name::VIPS))
        .unwrap()
        .entries()
        .unwrap();
    let file_before = std::fs::read_to_string(lab.config_path()).unwrap();
    let r = put(&e, "/v1/vips", &doc, None);
    let again = json_of(&r);
    assert_eq!(r.status, 200, "{}", r.error_message());
    println!(
        "the same document again: changed {}, {} tables switched",
        again["changed"], again["tables_switched"]
    );
    assert_eq!(
        (again["changed"].clone(), again["tables_switched"].clone()),
        (json!(false), json!(0))
    );
    assert_eq!(again["revision"].as_u64(), Some(revision + 1));
    assert_eq!(
        RawMap::open(&lab.pin_dir().join(map_name::VIPS))
            .unwrap()
            .entries()
            .unwrap(),
        vips_before,
        "no VIP flipped"
    );
    assert_eq!(
        std::fs::read_to_string(lab.config_path()).unwrap(),
        file_before
    );
}

#[test]
fn two_writers_with_the_same_etag_exactly_one_wins_and_nothing_of_the_other_is_applied() {
    let lab = Lab::start(&LabSpec::weights(&[1, 1])).unwrap();
    let e = api(&lab);
    for round in 0..5 {
        let (doc, revision) = spec(&e);
        let with = |v: Value| {
            let mut d = doc.clone();
            d["vip"].as_array_mut().unwrap().push(v);
            d
        };
        let a = with(extra_vips(1, 2, 1).remove(0));
        let mut vb = extra_vips(2, 2, 1).remove(1);
        vb["port"] = json!(8443);
        let b = with(vb);
        let (ra, rb) = thread::scope(|s| {
            let ta = s.spawn(|| put(&api(&lab), "/v1/vips", &a, Some(revision)));
            let tb = s.spawn(|| put(&api(&lab), "/v1/vips", &b, Some(revision)));
            (ta.join().unwrap(), tb.join().unwrap())
        });
        let mut statuses = [ra.status, rb.status];
        statuses.sort();
        println!("round {round}: statuses {:?}", [ra.status, rb.status]);
        assert_eq!(
            statuses,
            [200, 412],
            "{} / {}",
            ra.error_message(),
            rb.error_message()
        );
        let (winner, loser) = if ra.status == 200 {
            (&a, &rb)
        } else {
            (&b, &ra)
        };
        assert_eq!(
            loser.header("content-type"),
            Some("application/problem+json")
        );
        assert!(
            loser.error_message().contains("If-Match"),
            "{}",
            loser.error_message()
        );
        let (now, now_rev) = spec(&e);
        assert_eq!(now_rev, revision + 1);
        assert_eq!(
            now["vip"], winner["vip"],
            "exactly the winner's state, nothing of the loser's"
        );
        // Back to the start for the next round.
        assert_eq!(put(&e, "/v1/vips", &doc, Some(now_rev)).status, 200);
    }
}

/// What a refused or dry-run request must leave as it was: the API's
/// view, the config file, the kernel's tables.
fn everything(lab: &Lab) -> (Value, String, BTreeMap<Vec<u8>, BTreeMap<IpAddr, usize>>) {
    (
        json_of(&api(lab).request("GET", "/v1/vips", None).unwrap()),
        std::fs::read_to_string(lab.config_path()).unwrap(),
        kernel_tables(&lab.pin_dir()),
    )
}

#[test]
fn a_dry_run_changes_nothing_and_the_audit_log_says_dry_run() {
    let lab = Lab::start(&LabSpec::weights(&[1, 1, 1])).unwrap();
    lab.set_backends(&[Some(1), Some(1), None]).unwrap();
    let e = api(&lab);
    let before = everything(&lab);
    let (mut doc, revision) = spec(&e);
    // The first VIP: b1 out, b3 in, b2's weight up.
    doc["vip"][0]["backends"] = json!([
        {"address": "10.201.0.12", "weight": 3},
        {"address": "10.201.0.13", "weight": 1},
    ]);
    let r = put(&e, "/v1/vips?dry_run=true", &doc, Some(revision));
    assert_eq!(r.status, 200, "{}", r.error_message());
    let out = json_of(&r);
    println!("{}", serde_json::to_string_pretty(&out).unwrap());
    assert_eq!(
        (
            out["dry_run"].clone(),
            out["changed"].clone(),
            out["tables_switched"].clone()
        ),
        (json!(true), json!(true), json!(0))
    );
    let texts: Vec<&str> = out["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["text"].as_str().unwrap())
        .collect();
    assert_eq!(
        texts,
        [
            "VIP 203.0.113.10:80/tcp: backend 10.201.0.11 removed",
            "VIP 203.0.113.10:80/tcp: backend 10.201.0.12 weight 1 -> 3",
            "VIP 203.0.113.10:80/tcp: backend 10.201.0.13 added (weight 1)",
        ]
    );
    let shares: BTreeMap<&str, (f64, f64)> = out["table_shares"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["backend"].as_str().unwrap(),
                (s["from"].as_f64().unwrap(), s["to"].as_f64().unwrap()),
            )
        })
        .collect();
    assert_eq!(shares.len(), 3, "{shares:?}");
    assert!((shares["10.201.0.11"].0 - 0.5).abs() < 0.01 && shares["10.201.0.11"].1 == 0.0);
    assert!((shares["10.201.0.12"].1 - 0.75).abs() < 0.01, "{shares:?}");
    assert!((shares["10.201.0.13"].0 == 0.0) && (shares["10.201.0.13"].1 - 0.25).abs() < 0.01);
    assert_eq!(r.revision(), Some(revision), "a dry run keeps the revision");
    assert!(everything(&lab) == before, "a dry run changed something");
    let audit = std::fs::read_to_string(lab.audit_log()).unwrap();
    let last: Value = serde_json::from_str(audit.lines().last().unwrap()).unwrap();
    assert_eq!(last["outcome"], "dry run", "{last}");
}

#[test]
fn every_bad_document_gets_a_problem_naming_its_field_and_changes_nothing() {
    let lab = Lab::start(&LabSpec::weights(&[1, 1])).unwrap();
    let e = api(&lab);
    let before = everything(&lab);
    let (doc, revision) = spec(&e);
    let with_vip = |v: Value| {
        let mut d = doc.clone();
        d["vip"].as_array_mut().unwrap().push(v);
        serde_json::to_vec(&d).unwrap()
    };
    let good = extra_vips(1, 1, 1).remove(0);
    let set = |k: &str, val: Value| {
        let mut v = good.clone();
        v[k] = val;
        with_vip(v)
    };
    let mut dup = doc.clone();
    let first = dup["vip"][0].clone();
    dup["vip"].as_array_mut().unwrap().push(first);
    let mut too_many = doc.clone();
    too_many["vip"]
        .as_array_mut()
        .unwrap()
        .extend(extra_vips(5, 1, 1));
    let mut bad_backend = good.clone();
    bad_backend["backends"][0]["weight"] = json!(65536);
    let json_ct = ("Content-Type", "application/json");
    let toml_ct = ("Content-Type", "application/toml");
    let tag = format!("\"{revision}\"");
    type Case = (
        &'static str,
        String,
        Vec<u8>,
        Vec<(&'static str, String)>,
        u16,
        &'static str,
    );
    let h = |pairs: &[(&'static str, &str)]| {
        pairs
            .iter()
            .map(|(k, v)| (*k, v.to_string()))
            .collect::<Vec<_>>()
    };
    let cases: Vec<Case> = vec![
        ("bad address", "/v1/vips".into(), set("address", json!("198.18.0.300")), h(&[json_ct]), 400, "vip[4].address"),
        ("port out of range", "/v1/vips".into(), set("port", json!(70000)), h(&[json_ct]), 400, "vip[4].port"),
        ("wrong type", "/v1/vips".into(), set("port", json!("443")), h(&[json_ct]), 400, "vip[4].port"),
        ("bad protocol", "/v1/vips".into(), set("protocol", json!("sctp")), h(&[json_ct]), 400, "vip[4].protocol"),
        ("bad scheduler", "/v1/vips".into(), set("scheduler", json!("random")), h(&[json_ct]), 400, "vip[4].scheduler"),
        ("unknown field", "/v1/vips".into(), set("colour", json!("red")), h(&[json_ct]), 400, "colour"),
        ("unknown top-level field", "/v1/vips".into(), br#"{"vips": []}"#.to_vec(), h(&[json_ct]), 400, "vips"),
        ("weight out of range", "/v1/vips".into(), with_vip(bad_backend), h(&[json_ct]), 400, "vip[4].backends[0].weight"),
        ("duplicate VIP", "/v1/vips".into(), serde_json::to_vec(&dup).unwrap(), h(&[json_ct]), 422, "duplicate"),
        ("over max_vips", "/v1/vips".into(), serde_json::to_vec(&too_many).unwrap(), h(&[json_ct]), 422, "max_vips"),
        ("not JSON", "/v1/vips".into(), b"{not json".to_vec(), h(&[json_ct]), 400, "body"),
        ("invalid UTF-8 JSON", "/v1/vips".into(), b"{\"vip\": [\"\xff\xfe\"]}".to_vec(), h(&[json_ct]), 400, "unicode"),
        ("invalid UTF-8 TOML", "/v1/vips".into(), b"[[vip]]\naddress = \"\xff\"\n".to_vec(), h(&[toml_ct]), 400, "UTF-8"),
        ("TOML syntax", "/v1/vips".into(), b"[[vip]\n".to_vec(), h(&[toml_ct]), 400, "body"),
        ("10 MB body", "/v1/vips".into(), vec![b' '; 10_000_000], h(&[json_ct]), 413, "limit"),
        ("bad If-Match", "/v1/vips".into(), serde_json::to_vec(&doc).unwrap(), vec![("If-Match", "yesterday".into())], 400, "If-Match"),
        ("stale If-Match", "/v1/vips".into(), serde_json::to_vec(&doc).unwrap(), vec![("If-Match", "\"1\"".into())], 412, "If-Match"),
        ("revision and If-Match differ", "/v1/vips".into(), serde_json::to_vec(&json!({"revision": 1, "vip": doc["vip"]})).unwrap(), vec![("If-Match", tag.clone())], 400, "revision"),
        ("bad dry_run", "/v1/vips?dry_run=maybe".into(), serde_json::to_vec(&doc).unwrap(), h(&[json_ct]), 400, "query.dry_run"),
        ("unknown parameter", "/v1/vips?force=true".into(), serde_json::to_vec(&doc).unwrap(), h(&[json_ct]), 400, "query.force"),
        ("path and body disagree", "/v1/vips/203.0.113.10-80-tcp".into(), serde_json::to_vec(&good).unwrap(), h(&[json_ct]), 400, "address"),
        ("one VIP, bad backend", "/v1/vips/198.18.0.1-443-tcp".into(), serde_json::to_vec(&json!({"address": "198.18.0.1", "port": 443, "protocol": "tcp", "backends": [{"address": "nope"}]})).unwrap(), h(&[json_ct]), 400, "backends[0].address"),
    ];
    for (what, path, body, headers, status, needle) in &cases {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let r = e
            .request_with("PUT", path, Some(body), &headers)
            .expect("lbd answers");
        let p = json_of(&r);
        let fields: Vec<&str> = p["problems"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|x| x["field"].as_str())
            .collect();
        println!("{what}: {} {} {fields:?}", r.status, r.error_message());
        assert_eq!(r.status, *status, "{what}: {}", r.error_message());
        assert_eq!(
            r.header("content-type"),
            Some("application/problem+json"),
            "{what}"
        );
        assert_eq!(
            p["status"].as_u64(),
            Some(u64::from(*status)),
            "{what}: {p}"
        );
        assert!(
            p["title"].is_string() && p["type"] == "about:blank" && p["detail"] == p["error"],
            "{what}: {p}"
        );
        assert!(
            r.error_message().contains(needle) || fields.iter().any(|f| f.contains(needle)),
            "{what}: {p} does not name {needle:?}"
        );
    }
    assert!(
        everything(&lab) == before,
        "a refused document changed something"
    );
    assert_eq!(spec(&e).1, revision);
}

#[test]
fn a_crash_in_the_middle_of_an_apply_leaves_the_old_or_the_new_state_never_a_mix() {
    let lab = Lab::start(&LabSpec {
        max_vips: 64,
        max_backends: 2048,
        ..LabSpec::weights(&[1, 1])
    })
    .unwrap();
    let e = api(&lab);
    let (base, _) = spec(&e);
    // Two states that differ in every VIP: A's extra VIPs with weights 1..3,
    // B's with 4..6.
    let state = |w| {
        let mut d = base.clone();
        d["vip"]
            .as_array_mut()
            .unwrap()
            .extend(extra_vips(40, 20, w));
        d.as_object_mut().unwrap().remove("revision");
        d
    };
    let (a, b) = (state(1), state(4));
    assert_eq!(put(&e, "/v1/vips", &a, None).status, 200);
    let mut outcomes = BTreeMap::new();
    for round in 0..6u64 {
        let next = if round % 2 == 0 { &b } else { &a };
        let delay = Duration::from_millis(2 + round * 7);
        let killed = thread::scope(|s| {
            let writer = s.spawn(|| {
                api(&lab).request("PUT", "/v1/vips", Some(&serde_json::to_vec(next).unwrap()))
            });
            thread::sleep(delay);
            lab.restart_lbd_with(libc::SIGKILL).unwrap();
            writer.join().unwrap()
        });
        let answered = matches!(&killed, Ok(r) if r.status == 200);
        let (now, _) = spec(&e);
        let on_disk = lb::desired::config::load(lab.config_path()).unwrap();
        let which = if now["vip"] == a["vip"] {
            "old/A"
        } else if now["vip"] == b["vip"] {
            "new/B"
        } else {
            panic!("round {round}: the state after the crash is neither document");
        };
        let which = if (which == "new/B") == (round % 2 == 0) {
            "new"
        } else {
            "old"
        };
        println!(
            "round {round}: killed after {delay:?}; the PUT was answered: {answered}; after restart: the {which} state"
        );
        if answered {
            assert_eq!(which, "new", "an answered apply was lost");
        }
        *outcomes.entry(which).or_insert(0) += 1;
        // The file and the maps agree with the state the API shows.
        assert_eq!(on_disk.vips.len(), now["vip"].as_array().unwrap().len());
        let tables = kernel_tables(&lab.pin_dir());
        assert_eq!(
            tables.len(),
            on_disk.vips.len(),
            "round {round}: maps and file differ"
        );
        let views = json_of(&e.request("GET", "/v1/vips", None).unwrap());
        for v in views.as_array().unwrap() {
            let counts: BTreeMap<IpAddr, usize> = v["backends"]
                .as_array()
                .unwrap()
                .iter()
                .map(|b| {
                    (
                        b["address"].as_str().unwrap().parse().unwrap(),
                        b["table_entries"].as_u64().unwrap() as usize,
                    )
                })
                .collect();
            assert!(
                tables.values().any(|t| *t == counts),
                "round {round}: VIP {}'s table in the kernel is not the state's",
                v["vip"]
            );
        }
        // Make sure the next round starts from a known state.
        let want = if which == "new" {
            next
        } else if round % 2 == 0 {
            &a
        } else {
            &b
        };
        assert_eq!(spec(&e).0["vip"], want["vip"]);
    }
    println!("outcomes: {outcomes:?}");
}

#[test]
fn lbctl_exports_diffs_and_applies_documents_and_shows_a_vips_flows() {
    let lab = Lab::start(&LabSpec::weights(&[1, 1, 1])).unwrap();
    lab.set_backends(&[Some(1), Some(1), None]).unwrap();
    let run = |args: &[&str], code: i32| {
        let o = lab.lbctl(args);
        assert_eq!(
            o.status.code(),
            Some(code),
            "lbctl {args:?}: {} {}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stdout).unwrap()
    };
    // Export, edit, diff, apply.
    let exported = run(&["export"], 0);
    let revision: u64 = exported
        .lines()
        .next()
        .unwrap()
        .strip_prefix("revision = ")
        .unwrap()
        .parse()
        .unwrap();
    let file = lab.config_path().with_file_name("vips.toml");
    std::fs::write(&file, &exported).unwrap();
    let f = file.to_str().unwrap();
    assert!(run(&["diff", "-f", f], 0).contains("nothing to change"));
    let edited = exported.replacen(
        "{ address = \"10.201.0.11\", weight = 1 }",
        "{ address = \"10.201.0.13\", weight = 2 }",
        1,
    );
    assert_ne!(edited, exported);
    std::fs::write(&file, &edited).unwrap();
    let diff = run(&["diff", "-f", f], 6);
    println!("lbctl diff:\n{diff}");
    assert!(
        diff.contains("- VIP 203.0.113.10:80/tcp: backend 10.201.0.11 removed"),
        "{diff}"
    );
    assert!(
        diff.contains("+ VIP 203.0.113.10:80/tcp: backend 10.201.0.13 added (weight 2)"),
        "{diff}"
    );
    assert!(run(&["apply", "-f", f, "--dry-run"], 0).contains("dry run: 2 changes"));
    let applied = run(&["apply", "-f", f], 0);
    println!("lbctl apply:\n{applied}");
    assert!(
        applied.contains(&format!("applied 2 changes: revision {}", revision + 1)),
        "{applied}"
    );
    // The file still says revision N: applying it again is refused.
    let o = lab.lbctl(&["apply", "-f", f]);
    assert_eq!(
        o.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(String::from_utf8_lossy(&o.stderr).contains("If-Match"));
    // Without the revision line it applies, and there is nothing to do.
    std::fs::write(&file, edited.lines().skip(1).collect::<Vec<_>>().join("\n")).unwrap();
    assert!(run(&["apply", "-f", f], 0).contains("nothing to change"));
    // The revision in vip show, YAML, --no-headers, -o wide.
    let show = run(&["vip", "show", "203.0.113.10:80/tcp"], 0);
    assert!(
        show.contains(&format!("revision {}", revision + 1)),
        "{show}"
    );
    let yaml = run(&["-o", "yaml", "vip", "list"], 0);
    assert!(yaml.contains("\n  vip: 203.0.113.10:80/tcp\n"), "{yaml}");
    let bare = run(
        &["--no-headers", "backend", "list", "203.0.113.10:80/tcp"],
        0,
    );
    assert!(
        !bare.contains("BACKEND") && bare.lines().count() == 2,
        "{bare}"
    );
    assert!(
        run(&["-o", "wide", "backend", "list", "203.0.113.10:80/tcp"], 0).contains("TABLE ENTRIES")
    );

    // Flows: hold connections open through the VIP, count them per backend,
    // find one by its client address.
    let vip = lab.vip_http(false);
    let (conns, locals) = lab
        .in_client(|| {
            let mut conns = Vec::new();
            let mut locals = Vec::new();
            for _ in 0..20 {
                let mut c = lb_tests::lab::client::HttpConn::connect(vip).unwrap();
                let (who, _) = c.get("/").unwrap();
                locals.push((c.local_addr().unwrap(), who));
                conns.push(c);
            }
            (conns, locals)
        })
        .unwrap();
    let flows: Value =
        serde_json::from_str(&run(&["-o", "json", "flows", "203.0.113.10:80/tcp"], 0)).unwrap();
    println!("lbctl flows: {flows}");
    let established: u64 = flows["backends"]
        .as_object()
        .unwrap()
        .values()
        .map(|c| c["established"].as_u64().unwrap())
        .sum();
    assert!(established >= 20, "{flows}");
    let (client, who) = &locals[7];
    let one = run(
        &[
            "flows",
            "203.0.113.10:80/tcp",
            "--client",
            &client.to_string(),
        ],
        0,
    );
    println!("{one}");
    let backend = lab
        .backends
        .iter()
        .find(|b| b.name == *who.trim())
        .map(|b| b.v4.to_string());
    assert!(
        one.contains(&format!(
            "connection table, backend {}",
            backend.clone().unwrap_or_default()
        )),
        "{one} (answered by {who})"
    );
    drop(conns);
}

#[test]
fn a_vips_whole_backend_set_is_replaced_under_load_and_no_request_fails() {
    lb_tests::raise_fd_limit(8192);
    let lab = Lab::start(&LabSpec::weights(&[1, 1, 1, 1])).unwrap();
    // b1 and b2 serve; b3 and b4 are the new version, outside the config.
    lab.set_backends(&[Some(1), Some(1), None, None]).unwrap();
    let e = api(&lab);
    let path = "/v1/vips/203.0.113.10-80-tcp";
    let (doc, _) = spec(&e);
    let mut next = doc["vip"][0].clone();
    assert_eq!(next["address"], "203.0.113.10");
    next["backends"] = json!([
        {"address": "10.201.0.13", "weight": 1},
        {"address": "10.201.0.14", "weight": 1},
    ]);
    let spec_ = lb_tests::lab::traffic::TrafficSpec {
        long_lived: 200,
        ..lb_tests::lab::traffic::TrafficSpec::standard(lab.vip_http(false))
    };
    let (answer, report) = lb_tests::lab::traffic::run(
        lab.client.name(),
        &spec_,
        Duration::from_millis(700),
        || {
            let r = put(&api(&lab), path, &next, None);
            (r.status, json_of(&r))
        },
    );
    println!(
        "replace b1, b2 with b3, b4 under load: {}",
        report.summary()
    );
    assert_eq!(answer.0, 200, "{}", answer.1);
    assert_eq!(
        answer.1["tables_switched"], 1,
        "one table switch for the whole set"
    );
    assert_eq!(report.broken(), 0, "{:?}", report.failures());
    assert_eq!(
        report.moved(),
        0,
        "established connections keep their backends: {}",
        report.summary()
    );
    let per = report.per_backend();
    assert!(per.keys().all(|b| b == "b1" || b == "b2"), "{per:?}");
    // New connections go to the new set only.
    let mut new: BTreeMap<String, u32> = BTreeMap::new();
    lab.in_client(|| {
        for _ in 0..40 {
            let who = lb_tests::lab::client::http_get(lab.vip_http(false)).unwrap();
            *new.entry(who.trim().to_string()).or_default() += 1;
        }
    })
    .unwrap();
    println!("new connections after the change: {new:?}");
    assert!(
        new.keys().all(|b| b == "b3" || b == "b4") && new.len() == 2,
        "{new:?}"
    );
}

#[test]
fn health_load_slow_start_and_backend_overrides_change_through_a_put_of_one_vip() {
    let lab = Lab::start(&LabSpec::weights(&[1, 1])).unwrap();
    let e = api(&lab);
    let path = "/v1/vips/203.0.113.10-80-tcp";
    let (doc, revision) = spec(&e);
    let mut v = doc["vip"][0].clone();
    v["slow_start"] = json!(5);
    v["on_all_down"] = json!("drop");
    v["health"] = json!({"check": "tcp", "interval": 1, "fall": 2, "rise": 1});
    v["load"] = json!({"metrics_port": 9400});
    v["backends"][1]["health"] = json!({"check": "http", "port": 8080, "path": "/healthz"});
    v["backends"][1]["weight"] = json!(3);
    let r = put(&e, path, &v, Some(revision));
    assert_eq!(r.status, 200, "{}", r.error_message());
    let out = json_of(&r);
    let texts: Vec<&str> = out["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["text"].as_str().unwrap())
        .collect();
    println!("{texts:#?}");
    for needle in [
        "on_all_down",
        "slow_start",
        "health",
        "load",
        "weight 1 -> 3",
    ] {
        assert!(
            texts.iter().any(|t| t.contains(needle)),
            "{needle}: {texts:?}"
        );
    }
    assert!(
        texts
            .iter()
            .any(|t| t.contains("backend 10.201.0.12 health")),
        "{texts:?}"
    );
    let view = json_of(&e.request("GET", path, None).unwrap());
    assert_eq!(
        (
            view["slow_start_seconds"].clone(),
            view["on_all_down"].clone()
        ),
        (json!(5.0), json!("drop"))
    );
    assert_eq!(
        (view["health_checks"].clone(), view["load_aware"].clone()),
        (json!(true), json!(true))
    );
    // What lbd keeps is what was put: the document reads back the same.
    let (after, _) = spec(&e);
    let kept = &after["vip"][0];
    assert_eq!(kept["health"]["check"], "tcp");
    assert_eq!(kept["backends"][1]["health"]["path"], "/healthz");
    assert_eq!(kept["backends"][1]["weight"], 3);
    let file = lb::desired::config::load(lab.config_path()).unwrap();
    assert_eq!(file.vips[0].slow_start, Duration::from_secs(5));
    // The same again: nothing to do.
    let again = json_of(&put(&e, path, &v, None));
    assert_eq!(again["changed"], false, "{again}");
}

#[test]
fn with_a_state_file_the_api_never_writes_the_config_file_and_a_restart_reads_the_state() {
    let lab = Lab::start(&LabSpec::weights(&[1, 1, 1])).unwrap();
    let state = lab.config_path().with_file_name("state.toml");
    let text = std::fs::read_to_string(lab.config_path()).unwrap().replace(
        "[api]\n",
        &format!("[api]\nstate_file = \"{}\"\n", state.display()),
    );
    std::fs::write(lab.config_path(), &text).unwrap();
    lab.restart_lbd().unwrap();
    let e = api(&lab);
    // Seeded from the config file's VIPs.
    let (doc, revision) = spec(&e);
    let seeded = std::fs::read_to_string(&state).unwrap();
    assert!(
        seeded.contains(&format!("revision = {revision}")),
        "{seeded}"
    );
    assert_eq!(revision, 1);
    // A change goes to the state file only.
    let mut v = doc["vip"][0].clone();
    v["backends"] = json!([{"address": "10.201.0.13", "weight": 1}]);
    let r = put(&e, "/v1/vips/203.0.113.10-80-tcp", &v, Some(revision));
    assert_eq!(r.status, 200, "{}", r.error_message());
    assert_eq!(
        std::fs::read_to_string(lab.config_path()).unwrap(),
        text,
        "lbd wrote the config file"
    );
    let saved = std::fs::read_to_string(&state).unwrap();
    println!("{saved}");
    assert!(
        saved.contains("revision = 2") && saved.contains("10.201.0.13"),
        "{saved}"
    );
    // A restart reads the state file: the change and its revision stay.
    lab.restart_lbd().unwrap();
    let (after, rev) = spec(&e);
    assert_eq!(
        (rev, after["vip"][0]["backends"].clone()),
        (2, json!([{"address": "10.201.0.13", "weight": 1}]))
    );
    // A reload takes the config file's other settings and keeps the
    // state file's VIPs (and says so).
    lab.sighup();
    std::thread::sleep(Duration::from_secs(1));
    let (reloaded, rev) = spec(&e);
    assert_eq!((rev, &reloaded["vip"]), (2, &after["vip"]));
    assert!(
        lab.lbd_log().contains("the state file's VIPs stay"),
        "{}",
        lab.lbd_log()
    );
}
