//! Failures an operator meets in the first weeks of production, each
//! reproduced against a real `lbd` in the lab: a second lbd on a running
//! instance, a reload that would change the maps' sizes, a start-up that
//! fails after it touched the running balancer, an API change over an
//! operator's unreloaded edit, audit records missing or failing open, and
//! addresses that take over the host.

use std::{
    collections::BTreeMap,
    net::{SocketAddr, TcpListener, TcpStream},
    path::Path,
    time::Duration,
};

use lb::{control::client::Endpoint, dataplane::raw::RawMap};
use lb_common::map_name;
use lb_tests::lab::{Lab, LabSpec, in_ns};
use serde_json::Value;

const VIP: &str = "203.0.113.10-80-tcp";

fn api(lab: &Lab) -> Endpoint {
    Endpoint::Unix(lab.api_socket())
}

/// A call to the API: (status, JSON body).
fn call(lab: &Lab, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
    let r = api(lab)
        .request(method, path, body.map(str::as_bytes))
        .expect("the API answers");
    let v = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
    (r.status, v)
}

/// A map's entries as bytes.
type Entries = Vec<(Vec<u8>, Vec<u8>)>;

/// The contents of the pinned maps that hold the desired state (VIPs,
/// backends, tables, settings), by map.
fn state_maps(dir: &Path) -> BTreeMap<&'static str, Entries> {
    [
        map_name::VIPS,
        map_name::BACKENDS,
        map_name::MAGLEV,
        map_name::CONFIG,
    ]
    .into_iter()
    .map(|m| {
        let mut entries = RawMap::open(&dir.join(m)).unwrap().entries().unwrap();
        // The running lbd bumps the next-hop generation every second (its
        // cache refresh): not a change of state.
        if m == map_name::CONFIG {
            let at = std::mem::offset_of!(lb_common::DataplaneConfig, nexthop_gen);
            for (_, v) in &mut entries {
                v[at..at + 4].fill(0);
            }
        }
        (m, entries)
    })
    .collect()
}

fn backends_of(lab: &Lab) -> Vec<String> {
    let (status, v) = call(lab, "GET", &format!("/v1/vips/{VIP}/backends"), None);
    assert_eq!(status, 200, "{v}");
    v.as_array()
        .unwrap()
        .iter()
        .map(|b| b["address"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn a_second_lbd_on_a_running_instance_is_refused_naming_the_first_and_changes_nothing() {
    let lab = Lab::start(&LabSpec::weights(&[1, 1, 1])).unwrap();
    let first = lab.lbd_pid();
    let before = state_maps(&lab.pin_dir());
    // The second one's config has a fourth backend: had it adopted the
    // state, new flows would go to a backend the first one does not know.
    let config = lab.config_path().with_file_name("second.toml");
    let text = lab
        .config_text(&[Some(1), Some(1), Some(1)])
        .replace(
            "  { address = \"10.201.0.11\", weight = 1 },\n",
            "  { address = \"10.201.0.11\", weight = 1 },\n  { address = \"10.201.0.99\", weight = 1 },\n",
        )
        .replace("api.sock", "api2.sock")
        .replace("127.0.0.1:9180", "127.0.0.1:9190")
        .replace("127.0.0.1:9181", "127.0.0.1:9191");
    std::fs::write(&config, text).unwrap();
    let mut args = lab.lbd_args();
    args[1] = config.display().to_string();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (status, out) = lab.run_lbd(&args).unwrap();
    println!("second lbd: {status}; said: {}", out.trim());
    assert!(!status.success(), "{out}");
    assert!(
        out.contains(&format!("another lbd (pid {first}) runs instance")),
        "{out}"
    );
    assert_eq!(
        state_maps(&lab.pin_dir()),
        before,
        "the refused lbd changed the maps"
    );
    assert_eq!(backends_of(&lab).len(), 3);
    // `lbd --cleanup` of a running instance is refused too.
    let (status, out) = lab.run_lbd(&["--cleanup", "--instance", args[7]]).unwrap();
    assert!(
        !status.success() && out.contains(&format!("pid {first}")),
        "{out}"
    );
    assert!(lab.pin_dir().join(map_name::FLOWS).exists());
    // SIGKILL releases the lock: a new lbd starts (and adopts the state).
    lab.restart_lbd_with(libc::SIGKILL).unwrap();
    assert_eq!(backends_of(&lab).len(), 3);
}

#[test]
fn a_reload_that_changes_a_capacity_or_a_listener_is_refused_whole() {
    let lab = Lab::start(&LabSpec::weights(&[1, 1, 1])).unwrap();
    let weights = [Some(1), Some(1), None];
    for (what, text) in [
        (
            "conntrack.size",
            lab.config_text(&weights)
                .replace("size = 65536", "size = 131072"),
        ),
        (
            "balancer.max_backends",
            lab.config_text(&weights)
                .replace("max_backends = 64", "max_backends = 65"),
        ),
        (
            "metrics.listen",
            lab.config_text(&weights)
                .replace("127.0.0.1:9180", "127.0.0.1:9280"),
        ),
    ] {
        std::fs::write(lab.config_path(), text).unwrap();
        lab.reload_until("applying the reloaded config failed")
            .unwrap();
        let log = lab.lbd_log();
        let line = log
            .lines()
            .rfind(|l| l.contains("applying the reloaded config failed"))
            .unwrap();
        println!("{what}: {line}");
        assert!(line.contains(what), "{line}");
        // Nothing of it applied: b3 is still a backend.
        assert_eq!(backends_of(&lab).len(), 3, "{what}");
    }
    // New flows still get entries (no mismatched table mask): 128
    // connections, every one answered, none `insert_failed`.
    let addr = lab.vip_http(false);
    let ok = lab
        .in_client(|| {
            (0..128)
                .filter(|_| lb_tests::lab::client::http_get(addr).is_ok())
                .count()
        })
        .unwrap();
    assert_eq!(ok, 128);
    assert_eq!(
        lab.metric("lb_conntrack_events_total", &[("event", "insert_failed")])
            .unwrap(),
        0
    );
    // The original config restarts fine (the pinned state still fits it).
    std::fs::write(
        lab.config_path(),
        lab.config_text(&[Some(1), Some(1), Some(1)]),
    )
    .unwrap();
    lab.restart_lbd().unwrap();
}

#[test]
fn a_start_that_fails_late_leaves_the_running_balancer_as_it_was() {
    let lab = Lab::start(&LabSpec::weights(&[1, 1, 1])).unwrap();
    let before = state_maps(&lab.pin_dir());
    // Something else holds the metrics port.
    let squatter = in_ns(&lab.balancer, || {
        TcpListener::bind("127.0.0.1:9280").unwrap()
    })
    .unwrap();
    let config = lab.config_path().with_file_name("late.toml");
    let text = lab
        .config_text(&[Some(1), None, Some(5)])
        .replace("127.0.0.1:9180", "127.0.0.1:9280")
        .replace("api.sock", "api-late.sock")
        .replace("127.0.0.1:9181", "127.0.0.1:9291");
    std::fs::write(&config, text).unwrap();
    // The running lbd stops (the data plane keeps forwarding), then one
    // with the new config tries to start.
    let mut args = lab.lbd_args();
    args[1] = config.display().to_string();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (status, out, after) = lab_with_lbd_stopped(&lab, || {
        let (status, out) = lab.run_lbd(&args).unwrap();
        (status, out, state_maps(&lab.pin_dir()))
    });
    println!(
        "late failure: {status}: {}",
        out.lines().last().unwrap_or("")
    );
    assert!(!status.success(), "{out}");
    assert!(out.contains("serving /metrics on 127.0.0.1:9280"), "{out}");
    assert!(!out.contains("Maglev table rebuilt"), "{out}");
    assert_eq!(
        after, before,
        "the failed start changed the running balancer's maps"
    );
    drop(squatter);
}

/// Stops the lab's lbd with SIGTERM (its data plane goes on), runs `f`,
/// and starts the lab's lbd again.
fn lab_with_lbd_stopped<T>(lab: &Lab, f: impl FnOnce() -> T) -> T {
    let pid = lab.lbd_pid() as i32;
    // SAFETY: kill(2) on the lab's own child.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    // Wait until it released the instance lock.
    while lb::host::lock::holder(&lb::host::lock::lock_path(
        lab.pin_dir().file_name().unwrap().to_str().unwrap(),
    ))
    .unwrap()
    .is_some()
    {
        assert!(std::time::Instant::now() < deadline, "lbd did not stop");
        std::thread::sleep(Duration::from_millis(20));
    }
    let value = f();
    lab.restart_lbd_with(libc::SIGTERM).unwrap();
    value
}

#[test]
fn an_api_change_over_an_unreloaded_edit_of_the_file_is_refused_and_keeps_the_edit() {
    let lab = Lab::start(&LabSpec::weights(&[1, 1, 1])).unwrap();
    // The operator adds a VIP to the file and has not reloaded yet.
    let edited = std::fs::read_to_string(lab.config_path()).unwrap()
        + "\n[[vip]]\naddress = \"203.0.113.77\"\nport = 80\nprotocol = \"tcp\"\nbackends = [{ address = \"10.201.0.11\" }]\n";
    std::fs::write(lab.config_path(), &edited).unwrap();
    let patch = format!("/v1/vips/{VIP}/backends/10.201.0.12");
    let (status, v) = call(&lab, "PATCH", &patch, Some(r#"{"weight": 7}"#));
    println!("PATCH over an unreloaded edit: {status} {v}");
    assert_eq!(status, 409, "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("reload it first"),
        "{v}"
    );
    assert_eq!(std::fs::read_to_string(lab.config_path()).unwrap(), edited);
    // After the reload, the same change goes through and both are kept.
    lab.reload().unwrap();
    let (status, v) = call(&lab, "PATCH", &patch, Some(r#"{"weight": 7}"#));
    assert_eq!(status, 200, "{v}");
    let saved = std::fs::read_to_string(lab.config_path()).unwrap();
    assert!(
        saved.contains("203.0.113.77") && saved.contains("weight = 7"),
        "{saved}"
    );
}

/// The audit log's entries.
fn audit(lab: &Lab) -> Vec<Value> {
    std::fs::read_to_string(lab.audit_log())
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn every_change_request_is_recorded_before_it_is_applied_and_refusals_too() {
    let lab = Lab::start(&LabSpec::weights(&[1, 1, 1])).unwrap();
    let start = audit(&lab).len();
    let add = r#"{"address": "203.0.113.20", "port": 443, "protocol": "tcp",
        "backends": [{"address": "10.201.0.11", "weight": 3}, {"address": "10.201.0.12"}]}"#;
    assert_eq!(call(&lab, "POST", "/v1/vips", Some(add)).0, 201);
    assert_eq!(call(&lab, "POST", "/v1/vips", Some("{not json")).0, 400);
    assert_eq!(
        call(
            &lab,
            "PATCH",
            &format!("/v1/vips/{VIP}/backends/10.201.0.99"),
            Some(r#"{"weight": 1}"#)
        )
        .0,
        404
    );
    assert_eq!(
        call(
            &lab,
            "POST",
            &format!("/v1/vips/{VIP}/backends"),
            Some(r#"{"address": "255.255.255.255"}"#)
        )
        .0,
        422
    );
    // A body over the 8 MiB limit.
    let big = format!("{{\"vip\": [], \"pad\": \"{}\"}}", "x".repeat(9 << 20));
    assert_eq!(call(&lab, "PUT", "/v1/vips", Some(&big)).0, 413);
    let entries = audit(&lab)[start..].to_vec();
    for e in &entries {
        let line = e.to_string();
        println!("audit: {}", &line[..line.len().min(300)]);
    }
    assert_eq!(entries.len(), 10, "a request and an outcome each");
    for pair in entries.chunks(2) {
        assert_eq!(pair[0]["phase"], "request");
        assert_eq!(pair[1]["phase"], "outcome");
        assert_eq!(pair[0]["id"], pair[1]["id"]);
        assert!(
            pair[0]["caller"]
                .as_str()
                .unwrap()
                .starts_with("uid=0 pid=")
        );
    }
    // The VIP's backends are in its record.
    assert_eq!(entries[0]["request"]["body"]["backends"][0]["weight"], 3);
    assert_eq!(entries[1]["outcome"], "applied");
    assert_eq!(entries[2]["request"]["body_text"], "{not json");
    assert!(
        entries[3]["outcome"]
            .as_str()
            .unwrap()
            .starts_with("refused: 400"),
        "{}",
        entries[3]
    );
    for (i, refused) in [
        (5, "refused: 404"),
        (7, "refused: 422"),
        (9, "refused: 413"),
    ] {
        let outcome = entries[i]["outcome"].as_str().unwrap();
        assert!(outcome.starts_with(refused), "{}", entries[i]);
    }
    assert_eq!(entries[8]["request"]["path"], "/v1/vips");
    // Over TCP, a request without a valid token is recorded too.
    in_ns(&lab.balancer, || {
        let tcp = Endpoint::Tcp {
            addr: lb_tests::lab::API_TCP.into(),
            token: "wrong-token-wrong-token".into(),
        };
        let r = tcp
            .request("DELETE", &format!("/v1/vips/{VIP}"), None)
            .unwrap();
        assert_eq!(r.status, 401);
    })
    .unwrap();
    let last = audit(&lab);
    let refused = &last[last.len() - 1];
    assert!(
        refused["caller"]
            .as_str()
            .unwrap()
            .starts_with("unauthenticated tcp:"),
        "{refused}"
    );
    assert!(
        refused["outcome"].as_str().unwrap().contains("401"),
        "{refused}"
    );
}

#[test]
fn an_unwritable_audit_log_refuses_changes_unless_told_to_log() {
    let lab = Lab::start(&LabSpec::weights(&[1, 1, 1])).unwrap();
    let weights = [Some(1), Some(1), Some(1)];
    let full = |policy: &str| {
        lab.config_text(&weights).replace(
            &format!("audit_log = \"{}\"", lab.audit_log().display()),
            &format!("audit_log = \"/dev/full\"\naudit_failure = \"{policy}\""),
        )
    };
    let patch = format!("/v1/vips/{VIP}/backends/10.201.0.12");
    // Default policy (refuse): no change without its record.
    std::fs::write(lab.config_path(), full("refuse")).unwrap();
    lab.restart_lbd().unwrap();
    let (status, v) = call(&lab, "PATCH", &patch, Some(r#"{"weight": 9}"#));
    println!("audit log on /dev/full, refuse: {status} {v}");
    assert_eq!(status, 503, "{v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("audit log cannot be written"),
        "{v}"
    );
    let (_, b) = call(&lab, "GET", &patch, None);
    assert_eq!(b["weight"], 1, "the refused change was applied");
    // `log`: the change goes ahead, the failure is logged.
    std::fs::write(lab.config_path(), full("log")).unwrap();
    lab.restart_lbd().unwrap();
    let (status, v) = call(&lab, "PATCH", &patch, Some(r#"{"weight": 9}"#));
    assert_eq!(status, 200, "{v}");
    assert!(
        lab.lbd_log()
            .contains("change goes ahead without its record")
    );
}

#[test]
fn addresses_of_the_host_are_refused_as_vips_and_backends_and_the_host_keeps_its_tcp() {
    let lab = Lab::start(&LabSpec::weights(&[1, 1, 1])).unwrap();
    // A second address of the balancer host, with a service of the host
    // itself on it (think SSH, or the BGP session).
    lab.balancer
        .ip(&["addr", "add", "10.201.0.5/24", "dev", "eth0"])
        .unwrap();
    let host: SocketAddr = "10.201.0.5:2222".parse().unwrap();
    let listener = in_ns(&lab.balancer, || TcpListener::bind(host).unwrap()).unwrap();
    listener.set_nonblocking(true).unwrap();
    let reach = || {
        lab.in_client(|| TcpStream::connect_timeout(&host, Duration::from_secs(2)).is_ok())
            .unwrap()
    };
    assert!(reach());
    for (body, field) in [
        (
            r#"{"address": "10.201.0.5", "port": 0, "protocol": "tcp", "backends": [{"address": "10.201.0.11"}]}"#,
            "vip[4].address",
        ),
        (
            r#"{"address": "10.201.0.1", "port": 0, "protocol": "tcp", "backends": [{"address": "10.201.0.11"}]}"#,
            "vip[4].address",
        ),
        (
            r#"{"address": "203.0.113.33", "port": 80, "protocol": "tcp", "backends": [{"address": "10.201.0.5"}]}"#,
            "vip[4].backends[0].address",
        ),
        (
            r#"{"address": "203.0.113.30", "port": 80, "protocol": "tcp", "backends": [{"address": "10.201.0.1"}]}"#,
            "vip[4].backends[0].address",
        ),
        (
            r#"{"address": "203.0.113.31", "port": 80, "protocol": "tcp", "backends": [{"address": "255.255.255.255"}]}"#,
            "vip[4].backends[0].address",
        ),
        (
            r#"{"address": "127.0.0.1", "port": 80, "protocol": "tcp", "backends": [{"address": "10.201.0.11"}]}"#,
            "vip[4].address",
        ),
        (
            r#"{"address": "203.0.113.32", "port": 80, "protocol": "tcp", "backends": [{"address": "203.0.113.10"}]}"#,
            "vip[4].backends[0].address",
        ),
    ] {
        let (status, v) = call(&lab, "POST", "/v1/vips", Some(body));
        println!("{status} {field}: {}", v["problems"][0]["message"]);
        assert_eq!(status, 422, "{v}");
        assert_eq!(v["problems"][0]["field"], field, "{v}");
    }
    assert!(reach(), "the host's own TCP service stopped answering");
    // Nothing was added.
    let (_, vips) = call(&lab, "GET", "/v1/vips", None);
    assert_eq!(vips.as_array().unwrap().len(), 4);
    drop(listener);
}
