//! The TCP API and `/metrics` over TLS, and roles: a handshake with the
//! test CA; a wrong CA, an expired client certificate, no client
//! certificate where one is required, plain HTTP to a TLS port — each
//! refused with a clear error on the client's side (lbctl's message, the
//! client library's error) and on lbd's (its log); every route with every
//! kind of caller (admin and read tokens, admin and read certificates, a
//! certificate without a role, no credentials, the Unix socket): reads for
//! all who authenticated, changes for admins only (403 otherwise, changing
//! nothing), and the audit log naming the caller and role of every change
//! request.

use std::{
    process::{Command, Output},
    time::Duration,
};

use lb::control::{
    client::{ClientError, Endpoint, Response},
    tls::client_config,
};
use lb_tests::{lab::binary_path, lab::in_ns, require_root, solo::Solo, tls::TestCa};
use serde_json::Value;

const API: &str = "127.0.0.1:9443";
const METRICS: &str = "127.0.0.1:9180";
const ADMIN_TOKEN: &str = "admin-token-0123456789";
const READ_TOKEN: &str = "read-token-0123456789";

const CONFIG: &str = r#"[api]
socket = "@DIR@/api.sock"
audit_log = "@DIR@/audit.log"
tcp_listen = "127.0.0.1:9443"
token_file = "@DIR@/tokens"

[api.tls]
cert = "@DIR@/server.pem"
key = "@DIR@/server.key"
client_ca = "@DIR@/clients-ca.pem"
client_auth = "optional"

[metrics]
listen = "127.0.0.1:9180"

[metrics.tls]
cert = "@DIR@/server.pem"
key = "@DIR@/server.key"
client_ca = "@DIR@/clients-ca.pem"
"#;

struct Setup {
    lbd: Solo,
}

impl Setup {
    fn start() -> Setup {
        require_root();
        let dir = Solo::dir("tls").unwrap();
        let ca = TestCa::new("lbt server CA").unwrap();
        ca.write_pem(&dir, "ca").unwrap();
        ca.write_server_cert(&dir, "server", &["127.0.0.1"])
            .unwrap();
        TestCa::new("lbt other CA")
            .unwrap()
            .write_pem(&dir, "other-ca")
            .unwrap();
        let clients = TestCa::new("lbt client CA").unwrap();
        clients.write_pem(&dir, "clients-ca").unwrap();
        for (name, cn, org, expired) in [
            ("alice", "alice", Some("admin"), false),
            ("bob", "bob", Some("read"), false),
            ("carol", "carol", None, false),
            ("dave", "dave", Some("admin"), true),
        ] {
            clients
                .write_client_cert(&dir, name, cn, org, expired)
                .unwrap();
        }
        // `ops` without a role column, as token files were before roles:
        // an admin.
        std::fs::write(
            dir.join("tokens"),
            format!("ops {ADMIN_TOKEN}\nviewer {READ_TOKEN} read\n"),
        )
        .unwrap();
        std::fs::write(dir.join("admin.token"), ADMIN_TOKEN).unwrap();
        std::fs::write(dir.join("read.token"), READ_TOKEN).unwrap();
        let mut lbd = Solo::start(dir, CONFIG, &[]).unwrap();
        lbd.wait_log("serving the API on TCP over TLS", Duration::from_secs(30))
            .unwrap();
        Setup { lbd }
    }

    fn path(&self, name: &str) -> std::path::PathBuf {
        self.lbd.dir.join(name)
    }

    /// A TLS endpoint trusting the test CA, with a token and/or the client
    /// certificate `cert`.
    fn tls(&self, addr: &str, token: Option<&str>, cert: Option<&str>) -> Endpoint {
        let (c, k) = (
            cert.map(|c| self.path(&format!("{c}.pem"))),
            cert.map(|c| self.path(&format!("{c}.key"))),
        );
        let config =
            client_config(Some(&self.path("ca.pem")), c.as_deref().zip(k.as_deref())).unwrap();
        Endpoint::Tls {
            addr: addr.into(),
            token: token.map(str::to_string),
            config,
        }
    }

    /// `lbctl ARGS` inside lbd's namespace, with `env`.
    fn lbctl(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let out = Command::new("ip")
            .args(["netns", "exec", self.lbd.ns.name()])
            .arg(binary_path("lbctl").unwrap())
            .args(args)
            .envs(env.iter().copied())
            .current_dir(&self.lbd.dir)
            .output()
            .unwrap();
        println!(
            "lbctl {args:?} {env:?}: {}\n  stdout: {}\n  stderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        out
    }

    /// A request from inside lbd's namespace.
    fn call(
        &self,
        e: &Endpoint,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> Result<Response, ClientError> {
        in_ns(&self.lbd.ns, || {
            e.request(method, path, body.map(str::as_bytes))
        })
        .unwrap()
    }

    /// Waits for lbd's log to have `needle` (the server's side of a refusal).
    fn logged(&mut self, needle: &str) {
        self.lbd.wait_log(needle, Duration::from_secs(5)).unwrap();
        let line = self
            .lbd
            .log()
            .lines()
            .rfind(|l| l.contains(needle))
            .unwrap()
            .to_string();
        println!("  lbd: {line}");
    }
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn tls_handshakes_and_refusals_are_clear_on_both_sides() {
    let mut s = Setup::start();
    // The test CA, an admin token: served.
    let o = s.lbctl(
        &[
            "--url",
            "https://127.0.0.1:9443",
            "--ca",
            "ca.pem",
            "--token-file",
            "admin.token",
            "status",
        ],
        &[],
    );
    assert!(o.status.success());
    // The same from the environment, with a client certificate instead.
    let o = s.lbctl(
        &["vip", "list"],
        &[
            ("LBCTL_URL", API),
            ("LBCTL_CA", "ca.pem"),
            ("LBCTL_CERT", "alice.pem"),
            ("LBCTL_KEY", "alice.key"),
        ],
    );
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stdout).contains("203.0.113.10:80/tcp"));

    // A CA that did not sign lbd's certificate.
    let o = s.lbctl(
        &[
            "--url",
            API,
            "--ca",
            "other-ca.pem",
            "--token-file",
            "admin.token",
            "status",
        ],
        &[],
    );
    assert_eq!(o.status.code(), Some(4));
    assert!(stderr(&o).contains("UnknownIssuer"), "{}", stderr(&o));
    assert!(stderr(&o).contains("not signed by a CA lbctl trusts"));
    s.logged(
        "the API: TLS connection refused: TLS handshake failed: received fatal alert: UnknownCA",
    );

    // An expired client certificate.
    let o = s.lbctl(
        &[
            "--url", API, "--ca", "ca.pem", "--cert", "dave.pem", "--key", "dave.key", "status",
        ],
        &[],
    );
    assert_eq!(o.status.code(), Some(4));
    assert!(
        stderr(&o).contains("lbd refused lbctl's client certificate"),
        "{}",
        stderr(&o)
    );
    s.logged("invalid peer certificate: certificate expired");

    // No client certificate where one is required (/metrics).
    let e = s.call(&s.tls(METRICS, None, None), "GET", "/metrics", None);
    let message = match e {
        Err(ClientError::Tls { message, .. }) => message,
        other => panic!("a /metrics request without a certificate: {other:?}"),
    };
    println!("GET /metrics without a client certificate: {message}");
    assert!(message.contains("CertificateRequired"), "{message}");
    assert!(message.contains("lbd requires a client certificate"));
    s.logged("/metrics: TLS connection refused: TLS handshake failed: peer sent no certificates");
    let r = s
        .call(&s.tls(METRICS, None, Some("bob")), "GET", "/metrics", None)
        .unwrap();
    assert_eq!(r.status, 200);
    assert!(String::from_utf8_lossy(&r.body).contains("lb_packets_total"));

    // Plain HTTP to the TLS port.
    let plain = Endpoint::Tcp {
        addr: API.into(),
        token: ADMIN_TOKEN.into(),
    };
    let r = s.call(&plain, "GET", "/v1/status", None).unwrap();
    println!(
        "plain HTTP to the TLS port: {} {}",
        r.status,
        r.error_message()
    );
    assert_eq!(r.status, 400);
    assert!(r.error_message().contains("this port speaks TLS"));
    s.logged("the API: TLS connection refused: the client spoke plain TCP");
    let o = s.lbctl(
        &[
            "--url",
            "http://127.0.0.1:9443",
            "--token-file",
            "admin.token",
            "status",
        ],
        &[],
    );
    assert_eq!(o.status.code(), Some(3));
    assert!(stderr(&o).contains("this port speaks TLS"));
    assert!(s.lbd.stop().unwrap().success());
}

/// Every route, in an order in which an admin's changes succeed.
const ROUTES: &[(&str, &str, Option<&str>)] = &[
    ("GET", "/v1/status", None),
    ("GET", "/v1/stats", None),
    ("GET", "/v1/ready", None),
    ("GET", "/v1/live", None),
    ("GET", "/v1/openapi.json", None),
    // A standalone lbd answers 409 (no [fleet]).
    ("GET", "/v1/fleet", None),
    ("GET", "/v1/vips", None),
    ("POST", "/v1/vips", Some(VIP_20)),
    ("GET", "/v1/vips/203.0.113.20-80-tcp", None),
    (
        "PATCH",
        "/v1/vips/203.0.113.20-80-tcp",
        Some(r#"{"scheduler": "wrr"}"#),
    ),
    ("GET", "/v1/vips/203.0.113.20-80-tcp/backends", None),
    (
        "POST",
        "/v1/vips/203.0.113.20-80-tcp/backends",
        Some(r#"{"address": "10.204.0.3"}"#),
    ),
    (
        "GET",
        "/v1/vips/203.0.113.20-80-tcp/backends/10.204.0.3",
        None,
    ),
    (
        "PATCH",
        "/v1/vips/203.0.113.20-80-tcp/backends/10.204.0.3",
        Some(r#"{"weight": 5}"#),
    ),
    ("GET", "/v1/vips/203.0.113.20-80-tcp/flows", None),
    (
        "DELETE",
        "/v1/vips/203.0.113.20-80-tcp/backends/10.204.0.3",
        None,
    ),
    ("PUT", "/v1/vips/203.0.113.20-80-tcp", Some(VIP_20)),
    ("DELETE", "/v1/vips/203.0.113.20-80-tcp", None),
    ("PUT", "/v1/vips?dry_run=true", Some(DOCUMENT)),
    ("PUT", "/v1/vips", Some(DOCUMENT)),
    (
        "POST",
        "/v1/backends/10.204.0.2/load",
        Some(r#"{"named_metrics": {"queue": 1}}"#),
    ),
    ("GET", "/v1/no-such-route", None),
];

const VIP_20: &str = r#"{"address": "203.0.113.20", "port": 80, "protocol": "tcp", "backends": [{"address": "10.204.0.2"}]}"#;
/// The whole state as it is (a PUT of it changes nothing).
const DOCUMENT: &str = r#"{"vip": [{"address": "203.0.113.10", "port": 80, "protocol": "tcp", "backends": [{"address": "10.204.0.2"}]}]}"#;

#[test]
fn roles_are_enforced_on_every_route_and_every_change_is_audited_with_its_role() {
    let s = Setup::start();
    let vips = |s: &Setup| {
        let r = s
            .call(&Endpoint::Unix(s.lbd.socket()), "GET", "/v1/vips", None)
            .unwrap();
        String::from_utf8_lossy(&r.body).into_owned()
    };
    let before = vips(&s);
    // ROUTES covers every route of the API's document.
    let doc: Value = serde_json::from_str(include_str!("../../docs/openapi.json")).unwrap();
    let matches = |template: &str, path: &str| {
        let (t, p): (Vec<_>, Vec<_>) = (
            template.split('/').collect(),
            path.split('?').next().unwrap().split('/').collect(),
        );
        t.len() == p.len()
            && t.iter()
                .zip(p.iter())
                .all(|(t, p)| t.starts_with('{') || t == p)
    };
    for (template, methods) in doc["paths"].as_object().unwrap() {
        for method in methods.as_object().unwrap().keys() {
            let method = method.to_uppercase();
            assert!(
                ROUTES
                    .iter()
                    .any(|(m, p, _)| *m == method && matches(template, p)),
                "{method} {template} is not in ROUTES"
            );
        }
    }
    let changes = ROUTES.iter().filter(|(m, ..)| *m != "GET").count();

    // Callers that may read but not change, or not even that.
    type Expect = fn(&str, u16) -> bool;
    let read_only: Expect = |method, status| {
        if method == "GET" {
            status != 401 && status != 403
        } else {
            status == 403
        }
    };
    let no_role: Expect = |_, status| status == 403;
    let nobody: Expect = |_, status| status == 401;
    let cases: [(&str, Endpoint, Expect); 4] = [
        ("read token", s.tls(API, Some(READ_TOKEN), None), read_only),
        ("read certificate", s.tls(API, None, Some("bob")), read_only),
        (
            "certificate without a role",
            s.tls(API, None, Some("carol")),
            no_role,
        ),
        ("no credentials", s.tls(API, None, None), nobody),
    ];
    for (who, e, expect) in &cases {
        let mut seen = Vec::new();
        for (method, path, body) in ROUTES {
            let r = s.call(e, method, path, *body).unwrap();
            seen.push(format!("{method} {path} {}", r.status));
            assert!(
                expect(method, r.status),
                "{who}: {method} {path}: {} {}",
                r.status,
                r.error_message()
            );
            if r.status == 403 {
                let m = r.error_message();
                assert!(
                    m.contains("needs role admin") || m.contains("names no role"),
                    "{m}"
                );
            }
        }
        println!("{who}: {}", seen.join(", "));
    }
    assert_eq!(vips(&s), before, "a refused change changed something");

    // Admins: every route answers as it would without roles.
    let admins = [
        ("admin token", s.tls(API, Some(ADMIN_TOKEN), None)),
        ("admin certificate", s.tls(API, None, Some("alice"))),
        (
            "a token wins over the certificate",
            s.tls(API, Some(ADMIN_TOKEN), Some("bob")),
        ),
        ("Unix socket", Endpoint::Unix(s.lbd.socket())),
    ];
    for (who, e) in &admins {
        let mut seen = Vec::new();
        for (method, path, body) in ROUTES {
            let r = s.call(e, method, path, *body).unwrap();
            seen.push(format!("{method} {path} {}", r.status));
            let expected = match *method {
                _ if path.contains("no-such-route") => 404,
                _ if path.ends_with("/load") || *path == "/v1/fleet" => 409,
                "POST" => 201,
                "DELETE" => 204,
                _ => 200,
            };
            assert_eq!(
                r.status,
                expected,
                "{who}: {method} {path}: {}",
                r.error_message()
            );
        }
        println!("{who}: {}", seen.join(", "));
    }

    // The audit log: every change request with its caller and role; the
    // read callers' changes refused with 403.
    let audit = s.lbd.audit();
    let entries: Vec<Value> = audit
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let requests: Vec<&Value> = entries.iter().filter(|e| e["phase"] == "request").collect();
    // Outcomes of `caller` with `role` that start with `outcome` (an
    // admin's dry run counts as applied: it was allowed).
    let count = |caller: &str, role: Option<&str>, outcome: &str| {
        entries
            .iter()
            .filter(|e| {
                e["phase"] == "outcome"
                    && e["caller"].as_str().is_some_and(|c| c.starts_with(caller))
                    && e["role"].as_str() == role
                    && e["outcome"].as_str().is_some_and(|o| {
                        o.starts_with(outcome) || (outcome == "applied" && o.starts_with("dry run"))
                    })
            })
            .count()
    };
    let audited_changes = changes - 1; // load reports are not audited when allowed
    for (caller, role, outcome, n) in [
        ("token:viewer", Some("read"), "refused: 403", changes),
        ("cert:bob", Some("read"), "refused: 403", changes),
        ("cert:carol", None, "refused: 403", ROUTES.len()),
        (
            "unauthenticated tcp:127.0.0.1",
            None,
            "refused: 401",
            audited_changes,
        ),
        // The admin token, alone and beside bob's certificate.
        ("token:ops", Some("admin"), "applied", 2 * audited_changes),
        ("cert:alice", Some("admin"), "applied", audited_changes),
        ("uid=0 pid=", Some("admin"), "applied", audited_changes),
    ] {
        let found = count(caller, role, outcome);
        println!("audit: {caller} role {role:?} {outcome}: {found}");
        assert_eq!(found, n, "{caller} {role:?} {outcome}:\n{audit}");
    }
    for r in &requests {
        let authenticated = !r["caller"].as_str().unwrap().starts_with("unauthenticated")
            && r["caller"] != "cert:carol";
        assert_eq!(r["role"].is_string(), authenticated, "{r}");
    }
    // A read caller's refused change is recorded with what it asked.
    assert!(requests.iter().any(|r| r["caller"] == "token:viewer"
        && r["request"]["method"] == "POST"
        && r["request"]["body"]["address"] == "203.0.113.20"));
}

/// `lbctl --socket SOCKET ARGS` as the user `uid` with the supplementary
/// groups `groups` (a copy of lbctl in lbd's temp dir: the build directory
/// may be private to root).
fn lbctl_as(lbd: &Solo, uid: u32, groups: &[u32], args: &[&str]) -> Output {
    let lbctl = lbd.dir.join("lbctl");
    if !lbctl.exists() {
        std::fs::copy(binary_path("lbctl").unwrap(), &lbctl).unwrap();
    }
    let groups = match groups {
        [] => "--clear-groups".to_string(),
        g => format!(
            "--groups={}",
            g.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
        ),
    };
    let (uid, gid) = (format!("--reuid={uid}"), format!("--regid={uid}"));
    // Another test thread may fork while the copy is open for writing: the
    // child holds it until it execs ("text file busy"); try again then.
    let out = (0..50)
        .find_map(|_| {
            let o = Command::new("setpriv")
                .args([uid.as_str(), gid.as_str(), groups.as_str()])
                .arg(&lbctl)
                .arg("--socket")
                .arg(lbd.socket())
                .args(args)
                .output()
                .unwrap();
            if String::from_utf8_lossy(&o.stderr).contains("Text file busy") {
                std::thread::sleep(Duration::from_millis(20));
                return None;
            }
            Some(o)
        })
        .expect("lbctl stays busy");
    println!(
        "uid {uid} {groups}: lbctl {args:?}: {}\n  stdout: {}\n  stderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    out
}

/// The socket's mode and owner, as `ls -l` would say (mode, gid).
fn socket_mode(lbd: &Solo) -> (u32, u32) {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(lbd.socket()).unwrap();
    (m.mode() & 0o777, m.gid())
}

/// The group every Debian system has (base-passwd), for `socket_group`.
const GROUP: (&str, u32) = ("users", 100);

#[test]
fn unix_socket_is_0600_or_0660_for_its_group_and_audits_the_peer_uid() {
    require_root();
    // Without socket_group: 0600, root's only; a member of any group is
    // refused by the kernel.
    let mut lbd = Solo::start(Solo::dir("sock0600").unwrap(), "", &[]).unwrap();
    lbd.wait_log("serving the API", Duration::from_secs(30))
        .unwrap();
    let (mode, gid) = socket_mode(&lbd);
    println!("without socket_group: mode {mode:o}, gid {gid}");
    assert_eq!((mode, gid), (0o600, 0));
    let o = lbctl_as(&lbd, 4242, &[GROUP.1], &["status"]);
    assert_eq!(o.status.code(), Some(4));
    assert!(stderr(&o).contains("Permission denied"), "{}", stderr(&o));
    assert!(lbd.stop().unwrap().success());

    // With socket_group: 0660 for that group; its members are admins,
    // audited by their uid; anyone else is refused.
    let config = format!(
        "[api]\nsocket = \"@DIR@/api.sock\"\naudit_log = \"@DIR@/audit.log\"\nsocket_group = \"{}\"\n",
        GROUP.0
    );
    let mut lbd = Solo::start(Solo::dir("sock0660").unwrap(), &config, &[]).unwrap();
    lbd.wait_log("serving the API", Duration::from_secs(30))
        .unwrap();
    let (mode, gid) = socket_mode(&lbd);
    println!("socket_group = {:?}: mode {mode:o}, gid {gid}", GROUP.0);
    assert_eq!((mode, gid), (0o660, GROUP.1));
    let o = lbctl_as(
        &lbd,
        4242,
        &[GROUP.1],
        &["backend", "add", "203.0.113.10:80/tcp", "10.204.0.3"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let o = lbctl_as(&lbd, 4343, &[], &["status"]);
    assert_eq!(o.status.code(), Some(4));
    assert!(stderr(&o).contains("Permission denied"), "{}", stderr(&o));
    let audit = lbd.audit();
    let outcome: Vec<Value> = audit
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|e| e["phase"] == "outcome")
        .collect();
    println!("audit outcomes: {outcome:?}");
    assert_eq!(outcome.len(), 1, "{audit}");
    assert!(
        outcome[0]["caller"]
            .as_str()
            .unwrap()
            .starts_with("uid=4242 pid="),
        "{audit}"
    );
    assert_eq!(outcome[0]["role"], "admin");
    assert_eq!(outcome[0]["outcome"], "applied");
    assert!(lbd.stop().unwrap().success());

    // A group the host does not have: lbd --check says so, and lbd does
    // not start.
    let config = "[api]\nsocket = \"@DIR@/api.sock\"\naudit_log = \"@DIR@/audit.log\"\nsocket_group = \"lbt-no-such-group\"\n";
    let dir = Solo::dir("sockgroup").unwrap();
    let mut lbd = Solo::start(dir, config, &[]).unwrap();
    let status = lbd.child.wait().unwrap();
    let log = lbd.log();
    println!(
        "socket_group = \"lbt-no-such-group\": lbd {status}: {}",
        log.trim()
    );
    assert!(!status.success());
    assert!(
        log.contains("no group \"lbt-no-such-group\" on this host (api.socket_group)"),
        "{log}"
    );
    assert!(!lbd.socket().exists());
    // `lbd --check` reads what a start reads: the group, and the TLS
    // and token files, every problem named by its field.
    let d = lbd.dir.display();
    std::fs::write(
        lbd.config_path(),
        format!(
            "{}\n{config}tcp_listen = \"127.0.0.1:9443\"\ntoken_file = \"{d}/no-tokens\"\n[api.tls]\ncert = \"{d}/no-cert.pem\"\nkey = \"{d}/no-key.pem\"\n",
            lb_tests::solo::BASE_CONFIG
        )
        .replace("@DIR@", &d.to_string()),
    )
    .unwrap();
    let o = Command::new(lb_tests::lab::lbd_path().unwrap())
        .args(["--check", "--instance", "lbt-check-listeners", "--config"])
        .arg(lbd.config_path())
        .output()
        .unwrap();
    println!(
        "lbd --check: {}: {}{}",
        o.status,
        String::from_utf8_lossy(&o.stdout).trim(),
        stderr(&o).trim()
    );
    assert!(!o.status.success());
    for says in [
        "api.socket_group: no group \"lbt-no-such-group\"",
        "api.tls: ",
        "no-cert.pem",
        "api.token_file: ",
        "no-tokens",
    ] {
        assert!(
            stderr(&o).contains(says),
            "{says:?} missing: {}",
            stderr(&o)
        );
    }
}
