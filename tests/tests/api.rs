//! The control API and `lbctl` against a running lbd in the lab: every
//! resource and subcommand, every kind of bad input (refused with the field
//! named, nothing changed), changes that reach the data plane and survive a
//! restart, and access control.

use std::{
    collections::BTreeSet,
    os::unix::{fs::PermissionsExt, process::CommandExt},
    process::Command,
};

use lb::control::client::{Endpoint, Response};
use lb_tests::lab::{API_TCP, API_TOKEN, Lab, LabSpec, binary_path, client::http_get, in_ns};
use serde_json::{Value, json};

const VIP: &str = "203.0.113.10-80-tcp";

fn api(lab: &Lab) -> Endpoint {
    Endpoint::Unix(lab.api_socket())
}

fn call(e: &Endpoint, method: &str, path: &str, body: Option<&str>) -> Response {
    e.request(method, path, body.map(str::as_bytes))
        .expect("lbd answers")
}

fn get(e: &Endpoint, path: &str) -> Value {
    let r = call(e, "GET", path, None);
    assert_eq!(r.status, 200, "GET {path}: {}", r.error_message());
    serde_json::from_slice(&r.body).unwrap()
}

/// What must not change when a request is refused: the API's view, the
/// tables (shares), and the config file.
fn state(lab: &Lab) -> (Value, String) {
    (
        get(&api(lab), "/v1/vips"),
        std::fs::read_to_string(lab.config_path()).unwrap(),
    )
}

#[test]
fn every_resource_answers_and_changes_apply() {
    let lab = Lab::start(&LabSpec::weights(&[1, 1, 1])).unwrap();
    lab.set_backends(&[Some(1), Some(1), None]).unwrap();
    let e = api(&lab);
    let status = get(&e, "/v1/status");
    assert_eq!(
        (status["vips"].as_u64(), status["backends"].as_u64()),
        (Some(4), Some(8))
    );
    assert!(get(&e, "/v1/stats")["reasons"]["forwarded"].is_u64());
    let vips = get(&e, "/v1/vips");
    assert_eq!(vips.as_array().unwrap().len(), 4);
    let vip = get(&e, &format!("/v1/vips/{VIP}"));
    assert_eq!(vip["vip"], "203.0.113.10:80/tcp");
    assert_eq!(
        vip["backends"][0]["table_share"].as_f64().unwrap()
            + vip["backends"][1]["table_share"].as_f64().unwrap(),
        1.0
    );

    // Backends: add, show, weight, drain, undrain, remove.
    let r = call(
        &e,
        "POST",
        &format!("/v1/vips/{VIP}/backends"),
        Some(r#"{"address": "10.201.0.13", "weight": 2}"#),
    );
    assert_eq!(r.status, 201, "{}", r.error_message());
    let b = get(&e, &format!("/v1/vips/{VIP}/backends/10.201.0.13"));
    assert_eq!(
        (b["weight"].as_u64(), b["health"].as_str()),
        (Some(2), Some("up"))
    );
    assert!(
        (b["table_share"].as_f64().unwrap() - 0.5).abs() < 0.01,
        "{b}"
    );
    let r = call(
        &e,
        "PATCH",
        &format!("/v1/vips/{VIP}/backends/10.201.0.13"),
        Some(r#"{"drained": true}"#),
    );
    assert_eq!(r.status, 200, "{}", r.error_message());
    let b = get(&e, &format!("/v1/vips/{VIP}/backends/10.201.0.13"));
    assert_eq!(
        (b["weight_in_effect"].as_f64(), b["table_share"].as_f64()),
        (Some(0.0), Some(0.0))
    );
    let r = call(
        &e,
        "PATCH",
        &format!("/v1/vips/{VIP}/backends/10.201.0.13"),
        Some(r#"{"drained": false, "weight": 1}"#),
    );
    assert_eq!(r.status, 200);
    assert_eq!(
        get(&e, &format!("/v1/vips/{VIP}/backends"))
            .as_array()
            .unwrap()
            .len(),
        3
    );
    assert_eq!(
        call(
            &e,
            "DELETE",
            &format!("/v1/vips/{VIP}/backends/10.201.0.13"),
            None
        )
        .status,
        204
    );

    // VIPs: create, show, delete.
    let body = r#"{"address": "203.0.113.50", "port": 8080, "protocol": "tcp", "scheduler": "maglev",
                   "on_backend_down": "stick", "backends": [{"address": "10.201.0.11"}]}"#;
    let r = call(&e, "POST", "/v1/vips", Some(body));
    assert_eq!(r.status, 201, "{}", r.error_message());
    let v = get(&e, "/v1/vips/203.0.113.50-8080-tcp");
    assert_eq!(
        (
            v["on_backend_down"].as_str(),
            v["backends"][0]["weight"].as_u64()
        ),
        (Some("stick"), Some(100))
    );
    assert_eq!(
        call(&e, "DELETE", "/v1/vips/203.0.113.50-8080-tcp", None).status,
        204
    );
    assert_eq!(
        call(&e, "GET", "/v1/vips/203.0.113.50-8080-tcp", None).status,
        404
    );

    // Every accepted change is in the audit log, with the caller.
    let audit = std::fs::read_to_string(lab.audit_log()).unwrap();
    let entries: Vec<Value> = audit
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    // (The first entry is the lab's own reload by SIGHUP.)
    let api_changes: Vec<&Value> = entries
        .iter()
        .filter(|e| e["caller"] != "signal:SIGHUP")
        .collect();
    assert_eq!(
        api_changes
            .iter()
            .filter(|e| e["outcome"] == "applied")
            .count(),
        6,
        "{audit}"
    );
    for e in api_changes {
        assert!(
            e["caller"].as_str().unwrap().starts_with("uid=0 pid=") && e["time"].is_string(),
            "{e}"
        );
    }
}

#[test]
fn bad_input_is_refused_with_the_field_named_and_changes_nothing() {
    let lab = Lab::start(&LabSpec::weights(&[1, 1])).unwrap();
    let e = api(&lab);
    let before = state(&lab);
    let vips = "/v1/vips";
    let backends = format!("/v1/vips/{VIP}/backends");
    let one = format!("/v1/vips/{VIP}/backends/10.201.0.11");
    // Over the 8 MiB limit.
    let big = format!(r#"{{"address": "{}"}}"#, "x".repeat(10_000_000));
    let cases: Vec<(&str, String, Option<String>, u16, &str)> = vec![
        ("POST", vips.into(), Some("{not json".into()), 400, "body"),
        ("POST", vips.into(), Some(r#"{"address": "203.0.113.60", "port": 80, "protocol": "tcp", "colour": "red"}"#.into()), 400, "colour"),
        ("POST", vips.into(), Some(r#"{"address": "203.0.113.300", "port": 80, "protocol": "tcp"}"#.into()), 400, "address"),
        ("POST", vips.into(), Some(r#"{"address": "203.0.113.60", "port": 70000, "protocol": "tcp"}"#.into()), 400, "port"),
        ("POST", vips.into(), Some(r#"{"address": "203.0.113.60", "port": "80", "protocol": "tcp"}"#.into()), 400, "port"),
        ("POST", vips.into(), Some(r#"{"address": "203.0.113.60", "port": 80, "protocol": "sctp"}"#.into()), 400, "protocol"),
        ("POST", vips.into(), Some(r#"{"address": "203.0.113.60", "port": 80, "protocol": "tcp", "scheduler": "random"}"#.into()), 400, "scheduler"),
        ("POST", vips.into(), Some(r#"{"address": "203.0.113.10", "port": 80, "protocol": "tcp"}"#.into()), 409, "exists"),
        ("POST", backends.clone(), Some(r#"{"address": "10.201.0.11"}"#.into()), 409, "already"),
        ("POST", backends.clone(), Some(r#"{"address": "10.201.0.50", "weight": 65536}"#.into()), 400, "weight"),
        ("POST", backends.clone(), Some(r#"{"address": "not-an-ip"}"#.into()), 400, "address"),
        ("POST", backends.clone(), Some(r#"{"address": "2001:db8::50"}"#.into()), 201, ""),
        ("PATCH", one.clone(), Some(r#"{"weight": -1}"#.into()), 400, "weight"),
        ("PATCH", one.clone(), Some(r#"{}"#.into()), 400, "body"),
        ("PATCH", "/v1/vips/203.0.113.10-80-tcp/backends/10.201.0.99".into(), Some(r#"{"weight": 1}"#.into()), 404, "no backend"),
        ("DELETE", "/v1/vips/203.0.113.99-80-tcp".into(), None, 404, "no VIP"),
        ("GET", "/v1/vips/203.0.113.10-99999-tcp".into(), None, 400, "vip"),
        ("GET", "/v1/nothing".into(), None, 404, "endpoint"),
        ("POST", vips.into(), Some(big), 413, "limit"),
    ];
    for (method, path, body, status, needle) in &cases {
        let r = call(&e, method, path, body.as_deref());
        if *status == 201 {
            // An IPv6 backend is accepted (the lab has an IPv6 source address):
            // take it out again so the state compares equal.
            assert_eq!(r.status, 201, "{}", r.error_message());
            assert_eq!(
                call(&e, "DELETE", &format!("{backends}/2001:db8::50"), None).status,
                204
            );
            continue;
        }
        assert_eq!(r.status, *status, "{method} {path}: {}", r.error_message());
        let msg = r.error_message();
        assert!(
            msg.contains(needle),
            "{method} {path}: {msg:?} does not name {needle:?}"
        );
    }
    assert_eq!(state(&lab), before, "refused requests changed nothing");
}

#[test]
fn lbctl_drives_every_subcommand_and_changes_reach_packets_and_survive_a_restart() {
    let lab = Lab::start(&LabSpec::weights(&[1, 1, 1])).unwrap();
    lab.set_backends(&[Some(1), Some(1), None]).unwrap();
    let ok = |args: &[&str]| {
        let o = lab.lbctl(args);
        assert!(
            o.status.success(),
            "lbctl {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stdout).unwrap()
    };
    let vip = "203.0.113.10:80/tcp";
    assert!(ok(&["status"]).contains("FORWARDED"));
    assert!(ok(&["vip", "list"]).contains(vip));
    assert!(ok(&["vip", "show", vip]).contains("10.201.0.11"));
    let listed: Value = serde_json::from_str(&ok(&["--json", "backend", "list", vip])).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 2);
    ok(&["backend", "add", vip, "10.201.0.13", "--weight", "100"]);
    ok(&["backend", "weight", vip, "10.201.0.13", "200"]);
    ok(&["backend", "drain", vip, "10.201.0.11"]);
    assert!(ok(&["stats"]).contains("forwarded"));
    ok(&[
        "vip",
        "add",
        "203.0.113.70:0/udp",
        "--backend",
        "10.201.0.12=5",
        "--on-backend-down",
        "stick",
    ]);
    ok(&["vip", "remove", "203.0.113.70:0/udp"]);
    assert!(ok(&["completions", "bash"]).contains("lbctl"));
    assert!(ok(&["man"]).contains(".TH"));

    // Exit codes: usage 2, refused 3, unreachable 4.
    assert_eq!(
        lab.lbctl(&["backend", "weight", vip]).status.code(),
        Some(2)
    );
    let refused = lab.lbctl(&["backend", "remove", vip, "10.201.0.99"]);
    assert_eq!(refused.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("no backend 10.201.0.99"));
    let o = Command::new(binary_path("lbctl").unwrap())
        .args(["--socket", "/nonexistent.sock", "status"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(4));

    // The data plane follows: new connections avoid the drained b1 and reach b3.
    let new_conns = |lab: &Lab| -> BTreeSet<String> {
        let addr = lab.vip_http(false);
        lab.in_client(|| (0..150).map(|_| http_get(addr).unwrap()).collect())
            .unwrap()
    };
    let seen = new_conns(&lab);
    assert!(!seen.contains("b1") && seen.contains("b3"), "{seen:?}");

    // And so does a restarted lbd: the changes were persisted.
    lab.restart_lbd().unwrap();
    let seen = new_conns(&lab);
    assert!(
        !seen.contains("b1") && seen.contains("b3"),
        "after restart: {seen:?}"
    );
    let b3: Value = serde_json::from_str(&ok(&["--json", "backend", "list", vip])).unwrap();
    let b3 = b3
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["address"] == "10.201.0.13")
        .cloned()
        .unwrap();
    assert_eq!(b3["weight"], json!(200));
}

#[test]
fn the_tcp_api_needs_a_token_and_the_socket_is_for_root_only() {
    let lab = Lab::start(&LabSpec::weights(&[1])).unwrap();
    let tcp = |token: &str| Endpoint::Tcp {
        addr: API_TCP.into(),
        token: token.into(),
    };
    in_ns(&lab.balancer, || {
        assert_eq!(call(&tcp(API_TOKEN), "GET", "/v1/status", None).status, 200);
        assert_eq!(
            call(&tcp("wrong-token-0000000000"), "GET", "/v1/status", None).status,
            401
        );
        // No Authorization header at all.
        let s = std::net::TcpStream::connect(API_TCP).unwrap();
        let mut s = s;
        use std::io::{Read, Write};
        s.write_all(b"GET /v1/status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).unwrap();
        assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
        // Changes over TCP are audited under the token's name.
        let r = call(
            &tcp(API_TOKEN),
            "PATCH",
            &format!("/v1/vips/{VIP}/backends/10.201.0.11"),
            Some(r#"{"weight": 7}"#),
        );
        assert_eq!(r.status, 200, "{}", r.error_message());
    })
    .unwrap();
    assert!(
        std::fs::read_to_string(lab.audit_log())
            .unwrap()
            .contains("\"caller\":\"token:lab\"")
    );

    let mode = std::fs::metadata(lab.api_socket())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "socket mode {mode:o}");
    // Another user cannot use it. (That user runs a copy of lbctl: the
    // build directory may be private to root, e.g. under /root.)
    let dir = std::path::PathBuf::from(format!("/tmp/lbt-nobody-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let lbctl = dir.join("lbctl");
    std::fs::copy(binary_path("lbctl").unwrap(), &lbctl).unwrap();
    // Another test thread may fork while the copy is open for writing: the
    // child holds it until it execs ("text file busy"); try again then.
    let o = (0..50)
        .find_map(|_| {
            match Command::new(&lbctl)
                .arg("--socket")
                .arg(lab.api_socket())
                .arg("status")
                .uid(65534)
                .gid(65534)
                .output()
            {
                Err(e) if e.kind() == std::io::ErrorKind::ExecutableFileBusy => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                    None
                }
                r => Some(r.unwrap()),
            }
        })
        .expect("lbctl stays busy");
    assert_eq!(
        o.status.code(),
        Some(4),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(String::from_utf8_lossy(&o.stderr).contains("Permission denied"));
}

/// A VIP's scheduler and policies change through the API and `lbctl vip
/// set`; a kept-alive connection keeps its backend through every change.
#[test]
fn vip_settings_change_and_established_connections_stay() {
    let lab = Lab::start(&LabSpec::weights(&[1, 1, 1])).unwrap();
    let e = api(&lab);
    let path = format!("/v1/vips/{VIP}");
    let addr = lab.vip_http(false);
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let (first_tx, first_rx) = std::sync::mpsc::channel::<String>();
    let client = lab.client.name().to_string();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = done.clone();
    let keeper = std::thread::spawn(move || -> Result<usize, String> {
        let ns = std::fs::File::open(format!("/run/netns/{client}")).unwrap();
        // SAFETY: this thread enters the client's namespace for good.
        assert_eq!(
            unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&ns), libc::CLONE_NEWNET) },
            0
        );
        let mut conn = lb_tests::lab::client::HttpConn::connect(addr).map_err(|e| e.to_string())?;
        let (name, _) = conn.get("/").map_err(|e| e.to_string())?;
        first_tx.send(name.clone()).unwrap();
        let mut n = 0;
        while rx.try_recv().is_err() {
            let (again, _) = conn.get("/").map_err(|e| format!("request {n}: {e}"))?;
            if again != name {
                return Err(format!("moved from {name} to {again}"));
            }
            n += 1;
            counter.store(n, std::sync::atomic::Ordering::SeqCst);
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        Ok(n)
    });
    first_rx.recv().unwrap();

    let r = call(&e, "PATCH", &path, Some(r#"{"scheduler": "wrr"}"#));
    assert_eq!(r.status, 200, "{}", r.error_message());
    assert_eq!(get(&e, &path)["scheduler"], "wrr");
    let r = call(
        &e,
        "PATCH",
        &path,
        Some(r#"{"hash_fields": "address-port"}"#),
    );
    assert_eq!(r.status, 422, "hash_fields without maglev-src");
    assert!(
        r.error_message().contains("hash_fields"),
        "{}",
        r.error_message()
    );
    let r = call(
        &e,
        "PATCH",
        &path,
        Some(r#"{"scheduler": "maglev-src", "hash_fields": "address-port", "slow_start": 10}"#),
    );
    assert_eq!(r.status, 200, "{}", r.error_message());
    let v = get(&e, &path);
    assert_eq!(
        (
            v["scheduler"].as_str(),
            v["hash_fields"].as_str(),
            v["slow_start_seconds"].as_f64()
        ),
        (Some("maglev-src"), Some("address-port"), Some(10.0))
    );
    for (body, status, field) in [
        ("{}", 400, "body"),
        (r#"{"scheduler": "rr"}"#, 400, "scheduler"),
        (r#"{"hash_fields": "port"}"#, 400, "hash_fields"),
        (r#"{"slow_start": -1}"#, 400, "slow_start"),
        (r#"{"weight": 3}"#, 400, "weight"),
    ] {
        let r = call(&e, "PATCH", &path, Some(body));
        assert_eq!(r.status, status, "{body}: {}", r.error_message());
        assert!(
            r.error_message().contains(field),
            "{body}: {}",
            r.error_message()
        );
    }
    let o = lab.lbctl(&[
        "vip",
        "set",
        "203.0.113.10:80/tcp",
        "--scheduler",
        "least-load",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(get(&e, &path)["scheduler"], "least-load");
    let saved = std::fs::read_to_string(lab.config_path()).unwrap();
    assert!(
        saved.contains("scheduler = \"least-load\""),
        "persisted: {saved}"
    );
    assert!(
        std::fs::read_to_string(lab.audit_log())
            .unwrap()
            .contains(&format!("\"method\":\"PATCH\",\"path\":\"/v1/vips/{VIP}\"")),
        "audited"
    );
    // New connections are still answered under the new scheduler.
    let answers: Vec<String> = lab
        .in_client(move || (0..30).map(|_| http_get(addr).unwrap()).collect())
        .unwrap();
    assert_eq!(answers.len(), 30);
    // The kept connection must go on answering after the last change: wait
    // for three more requests on it (the changes above can finish in less
    // time than a few of its 20 ms pauses).
    let before = done.load(std::sync::atomic::Ordering::SeqCst);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while done.load(std::sync::atomic::Ordering::SeqCst) < before + 3
        && std::time::Instant::now() < deadline
        && !keeper.is_finished()
    {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    tx.send(()).unwrap();
    let n = keeper
        .join()
        .unwrap()
        .expect("the kept connection never moved");
    assert!(
        n >= before + 3,
        "{n} requests on the kept connection, {before} of them before the last change"
    );
}

/// The repository's copy of the OpenAPI document.
const OPENAPI_FILE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/openapi.json");

#[test]
fn the_openapi_document_matches_the_routes_and_the_copy_in_the_repository() {
    let lab = Lab::start(&LabSpec::weights(&[1, 1])).unwrap();
    let e = api(&lab);
    let served = get(&e, "/v1/openapi.json");
    let file: Value =
        serde_json::from_str(&std::fs::read_to_string(OPENAPI_FILE).unwrap()).unwrap();
    assert!(
        served == file,
        "docs/openapi.json is not what lbd serves: regenerate it with `target/debug/lbd openapi > docs/openapi.json`"
    );
    // Every documented route answers (never 404 or 405); changes carry an
    // If-Match no revision has, so they are refused before they change
    // anything.
    let before = state(&lab);
    let mut checked = 0;
    for (path, methods) in served["paths"].as_object().unwrap() {
        let path = path.replace("{vip}", VIP).replace("{addr}", "10.201.0.11");
        for method in methods.as_object().unwrap().keys() {
            let method = method.to_uppercase();
            let r = e
                .request_with(&method, &path, Some(b"{}"), &[("If-Match", "\"0\"")])
                .unwrap();
            println!("{method} {path}: {}", r.status);
            assert!(
                r.status != 404 && r.status != 405,
                "{method} {path} is documented but not routed: {} {}",
                r.status,
                r.error_message()
            );
            if method != "GET" {
                assert!(
                    (400..500).contains(&r.status),
                    "{method} {path}: {}",
                    r.status
                );
            }
            checked += 1;
        }
    }
    println!("{checked} documented routes answered");
    assert!(checked >= 18);
    // And what is not documented is not routed.
    for (method, path) in [
        ("DELETE", "/v1/status"),
        ("PUT", "/v1/stats"),
        ("GET", "/v1/vips/x/y/z"),
    ] {
        let r = e.request(method, path, None).unwrap();
        assert!(
            r.status == 404 || r.status == 405,
            "{method} {path}: {}",
            r.status
        );
        assert_eq!(
            r.header("content-type"),
            Some("application/problem+json"),
            "{method} {path}"
        );
    }
    assert_eq!(state(&lab), before, "the probes changed nothing");
}
