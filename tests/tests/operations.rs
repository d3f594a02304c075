//! Operating lb: the alerting rules pass their promtool unit tests; health
//! checks pass against servers that answer in odd but valid ways and over
//! HTTPS with a test CA (a wrong CA fails with its reason in `lbctl vip
//! show`); neighbours are managed over netlink; a change that adds 1,000
//! backends while `/metrics` is scraped in a loop leaves every scrape and
//! every health check answered; `lbd decap` serves its counters; reloads
//! are counted; the JSON log is JSON.

use std::{
    io::{Read, Write},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use lb::{
    desired::policy::{
        CheckKind, DEFAULT_EXPECT_STATUS, HealthCheck, HttpOptions, ScrapeTarget, StatusRange,
    },
    steering::probe,
};
use lb_tests::{
    lab::{Lab, LabSpec, VIP_V4, binary_path, in_ns, servers::ECHO_PORT},
    netns::Netns,
    prom,
    tls::{HttpsServer, TestCa},
};

fn repo_file(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(path)
}

#[test]
fn the_alerting_rules_pass_promtool_and_their_unit_tests() {
    let rules = repo_file("examples/alerts.yml");
    let out = prom::promtool(&["check", "rules", &rules.display().to_string()], "").unwrap();
    println!("{out}");
    let tests = repo_file("examples/alerts_test.yml");
    let out = prom::promtool(&["test", "rules", &tests.display().to_string()], "").unwrap();
    println!("{out}");
    assert!(out.contains("SUCCESS"), "{out}");
}

/// A server on loopback that answers every connection with `answer` and
/// records the requests it got.
fn canned_server(answer: &'static [u8]) -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut c) = conn else { return };
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match c.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            log.lock()
                .unwrap()
                .push(String::from_utf8_lossy(&head).into_owned());
            let _ = c.write_all(answer);
        }
    });
    (addr, seen)
}

fn http_check(port: u16, expect: StatusRange, host: Option<&str>) -> HealthCheck {
    HealthCheck {
        kind: CheckKind::Http,
        port,
        path: "/health".into(),
        expect,
        http: HttpOptions {
            tls: false,
            host: host.map(str::to_string),
            ca_file: None,
        },
        interval: Duration::from_secs(1),
        timeout: Duration::from_secs(1),
        rise: 1,
        fall: 1,
    }
}

/// A 200 answer with `body` gzip-coded, then chunked
/// (`Transfer-Encoding: gzip, chunked`).
fn gzip_chunked(body: &[u8]) -> &'static [u8] {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(body).unwrap();
    let body = e.finish().unwrap();
    let mut answer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n".to_vec();
    answer.extend_from_slice(format!("{:x}\r\n", body.len()).as_bytes());
    answer.extend_from_slice(&body);
    answer.extend_from_slice(b"\r\n0\r\n\r\n");
    Box::leak(answer.into_boxed_slice())
}

/// Answers the hand-written HTTP/1.0 client got wrong, and some more that
/// HTTP allows: each passes a health check (or fails it for its status);
/// the Host header is the one configured; a load scrape through a gzip
/// transfer coding before chunked reads the page.
#[tokio::test]
async fn odd_but_valid_http_answers_pass_health_checks() {
    let local: IpAddr = [127, 0, 0, 1].into();
    let answers: [(&str, &'static [u8]); 6] = [
        (
            "duplicate Content-Length",
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nok\n",
        ),
        ("gzip, chunked", gzip_chunked(b"ok\n")),
        (
            "folded header",
            b"HTTP/1.1 200 OK\r\nX-Long: first part\r\n  second part\r\nContent-Length: 3\r\n\r\nok\n",
        ),
        (
            "HTTP/1.0, read to the end",
            b"HTTP/1.0 200 OK\r\nServer: old\r\n\r\nok, and more",
        ),
        (
            "chunked with an extension and a trailer",
            b"HTTP/1.1 204 No Content\r\nTransfer-Encoding: chunked\r\n\r\n2;x=y\r\nok\r\n0\r\nX-Trailer: t\r\n\r\n",
        ),
        (
            "a redirect, with 200-399 expected",
            b"HTTP/1.1 302 Found\r\nLocation: /elsewhere\r\nContent-Length: 0\r\n\r\n",
        ),
    ];
    for (what, answer) in answers {
        let (addr, seen) = canned_server(answer);
        let expect = "200-399".parse().unwrap();
        let result = probe::check(
            local,
            &http_check(addr.port(), expect, Some("models.example.net")),
        )
        .await;
        println!("{what}: {result:?}");
        assert_eq!(result, Ok(()), "{what}");
        let request = seen.lock().unwrap()[0].clone();
        assert!(
            request.contains("host: models.example.net\r\n")
                || request.contains("Host: models.example.net\r\n"),
            "{what}: {request}"
        );
    }
    // The default expects 2xx: a redirect fails, naming its status.
    let (addr, seen) = canned_server(b"HTTP/1.1 302 Found\r\nContent-Length: 0\r\n\r\n");
    let e = probe::check(local, &http_check(addr.port(), DEFAULT_EXPECT_STATUS, None))
        .await
        .unwrap_err();
    println!("302 with the default: {e}");
    assert!(e.contains("status 302 (expected 200-299)"), "{e}");
    let request = seen.lock().unwrap()[0].clone();
    assert!(
        request
            .to_ascii_lowercase()
            .contains(&format!("host: {addr}\r\n")),
        "{request}"
    );

    // A vLLM page gzip-coded, then chunked.
    let page = lb_tests::lab::servers::vllm_metrics(6.0, 0.25);
    let (addr, _) = canned_server(gzip_chunked(page.as_bytes()));
    let target = ScrapeTarget {
        port: addr.port(),
        path: "/metrics".into(),
        http: HttpOptions::default(),
        interval: Duration::from_secs(1),
        timeout: Duration::from_secs(1),
        engine: None,
    };
    let report = probe::scrape(local, &target).await.unwrap();
    println!(
        "gzip, chunked scrape: queue {} kv {:?}",
        report.queue, report.kv
    );
    assert_eq!((report.queue, report.kv), (6.0, Some(0.25)));
}

/// A load scrape keeps its connection: three scrapes, one connection.
#[tokio::test]
async fn load_scrapes_keep_their_connection() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let connections = Arc::new(Mutex::new(0));
    let count = connections.clone();
    std::thread::spawn(move || {
        let page = lb_tests::lab::servers::vllm_metrics(1.0, 0.5);
        for conn in listener.incoming() {
            let Ok(c) = conn else { return };
            *count.lock().unwrap() += 1;
            let page = page.clone();
            std::thread::spawn(move || {
                let mut reader = std::io::BufReader::new(c.try_clone().unwrap());
                let mut c = c;
                loop {
                    let mut line = String::new();
                    loop {
                        line.clear();
                        if std::io::BufRead::read_line(&mut reader, &mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        if line == "\r\n" {
                            break;
                        }
                    }
                    let _ = write!(
                        c,
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{page}",
                        page.len()
                    );
                }
            });
        }
    });
    let target = ScrapeTarget {
        port,
        path: "/metrics".into(),
        http: HttpOptions::default(),
        interval: Duration::from_secs(1),
        timeout: Duration::from_secs(1),
        engine: None,
    };
    let mut scraper = probe::Scraper::new([127, 0, 0, 1].into(), &target);
    for _ in 0..3 {
        assert_eq!(scraper.scrape().await.unwrap().queue, 1.0);
    }
    let n = *connections.lock().unwrap();
    println!("3 scrapes over {n} connection(s)");
    assert_eq!(n, 1);
}

/// HTTPS checks: the test CA's certificate for the address (or for the
/// Host name) passes; a certificate of another CA fails, saying why.
#[tokio::test]
async fn https_checks_verify_the_backends_certificate() {
    let dir = std::env::temp_dir().join(format!("lbt-ops-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca = TestCa::new("lb test CA").unwrap();
    let other = TestCa::new("another CA").unwrap();
    let ca_file = ca.write_pem(&dir, "ca").unwrap();
    let server = HttpsServer::start(
        None,
        [127, 0, 0, 1].into(),
        0,
        ca.server_config(&["127.0.0.1", "backend.test"]).unwrap(),
    )
    .unwrap();
    let stranger = HttpsServer::start(
        None,
        [127, 0, 0, 1].into(),
        0,
        other.server_config(&["127.0.0.1"]).unwrap(),
    )
    .unwrap();
    let check = |port, host: Option<&str>| HealthCheck {
        kind: CheckKind::Https,
        http: HttpOptions {
            tls: true,
            host: host.map(str::to_string),
            ca_file: Some(ca_file.clone()),
        },
        ..http_check(port, DEFAULT_EXPECT_STATUS, None)
    };
    let local: IpAddr = [127, 0, 0, 1].into();
    assert_eq!(
        probe::check(local, &check(server.addr.port(), None)).await,
        Ok(())
    );
    assert_eq!(
        probe::check(local, &check(server.addr.port(), Some("backend.test:8443"))).await,
        Ok(())
    );
    let e = probe::check(local, &check(server.addr.port(), Some("other.test")))
        .await
        .unwrap_err();
    println!("wrong name: {e}");
    assert!(
        e.contains("invalid peer certificate: certificate not valid for name \"other.test\""),
        "{e}"
    );
    let e = probe::check(local, &check(stranger.addr.port(), None))
        .await
        .unwrap_err();
    println!("wrong CA: {e}");
    assert!(e.contains("invalid peer certificate: UnknownIssuer"), "{e}");
    let mut missing = check(server.addr.port(), None);
    missing.http.ca_file = Some(dir.join("missing.pem"));
    let e = probe::check(local, &missing).await.unwrap_err();
    println!("missing CA file: {e}");
    assert!(e.contains("missing.pem"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

fn lbctl(lab: &Lab, args: &[&str]) -> String {
    let out = std::process::Command::new(binary_path("lbctl").unwrap())
        .arg("--socket")
        .arg(lab.api_socket())
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// In the lab, HTTPS health checks against the backends' own servers: b1's
/// certificate is signed by the CA lbd trusts (up), b2's by another one
/// (down: `lbctl vip show` says the certificate's issuer is unknown).
#[test]
fn https_checks_in_the_lab_report_a_wrong_ca_in_lbctl() {
    let dir = std::env::temp_dir().join(format!("lbt-ops-labtls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca = TestCa::new("lb lab CA").unwrap();
    let other = TestCa::new("someone else's CA").unwrap();
    let ca_file = ca.write_pem(&dir, "ca").unwrap();
    let lab = Lab::start(&LabSpec {
        vip_extra: format!(
            "[vip.health]\ncheck = \"https\"\nport = 8443\npath = \"/health\"\ninterval = 0.2\ntimeout = 0.2\nrise = 1\nfall = 1\nca_file = \"{}\"",
            ca_file.display()
        ),
        ..LabSpec::weights(&[1, 1])
    })
    .unwrap();
    let mut servers = Vec::new();
    for (b, signer) in lab.backends.iter().zip([&ca, &other]) {
        let names = [b.v4.to_string(), b.v6.to_string()];
        let config = signer
            .server_config(&[names[0].as_str(), names[1].as_str()])
            .unwrap();
        servers.push(HttpsServer::start(Some(&b.ns), "::".parse().unwrap(), 8443, config).unwrap());
    }
    let vip = format!("{VIP_V4}:{ECHO_PORT}/udp");
    let b2 = lab.backends[1].v4.to_string();
    // Until the servers started, both were down (connection refused).
    let want = format!(
        "{b2} down: https {b2}:8443/health: TLS handshake: invalid peer certificate: UnknownIssuer"
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    let shown = loop {
        let shown = lbctl(&lab, &["vip", "show", &vip]);
        if shown.contains(&want) && !shown.contains(&format!("{} down", lab.backends[0].v4)) {
            break shown;
        }
        assert!(
            Instant::now() < deadline,
            "not reported: {want}\n{shown}\n{}",
            lab.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    println!("{shown}");
    let text = lab.metrics().unwrap();
    let count = prom::value(
        &text,
        "lb_health_check_duration_seconds_count",
        &[("vip", &vip)],
    )
    .unwrap();
    println!("health checks of {vip} timed: {count}");
    assert!(count >= 2.0);
    drop(servers);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Next hops of backends are marked managed over netlink (the one on the
/// link, and the gateway of one behind it); a permanent entry is left
/// alone.
#[test]
fn neighbours_towards_backends_are_managed_over_netlink() {
    lb_tests::require_root();
    let ns = Netns::new("ops-neigh").unwrap();
    let peer = Netns::new("ops-peer").unwrap();
    ns.ip(&[
        "link",
        "add",
        "eth0",
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        peer.name(),
    ])
    .unwrap();
    ns.ip(&["addr", "add", "10.77.0.1/24", "dev", "eth0"])
        .unwrap();
    ns.ip(&["link", "set", "eth0", "up"]).unwrap();
    peer.ip(&["addr", "add", "10.77.0.2/24", "dev", "eth0"])
        .unwrap();
    peer.ip(&["link", "set", "eth0", "up"]).unwrap();
    ns.ip(&["route", "add", "10.78.0.0/24", "via", "10.77.0.2"])
        .unwrap();
    ns.ip(&[
        "neigh",
        "add",
        "10.77.0.9",
        "lladdr",
        "02:00:00:00:00:09",
        "dev",
        "eth0",
        "nud",
        "permanent",
    ])
    .unwrap();
    let ifindex = ns.ifindex("eth0").unwrap();
    let neighbours = in_ns(&ns, || {
        lb::host::neighbours::Neighbours::start("eth0", ifindex)
    })
    .unwrap()
    .unwrap();
    let backends: Vec<IpAddr> = ["10.77.0.5", "10.78.0.5", "10.78.0.6", "10.77.0.9"]
        .iter()
        .map(|a| a.parse().unwrap())
        .collect();
    neighbours.manage(&backends);
    let deadline = Instant::now() + Duration::from_secs(5);
    let table = loop {
        let table = ns.ip(&["-d", "neigh", "show", "dev", "eth0"]).unwrap();
        let managed = |a: &str| {
            table
                .lines()
                .any(|l| l.starts_with(&format!("{a} ")) && l.contains("managed"))
        };
        if managed("10.77.0.5") && managed("10.77.0.2") {
            break table;
        }
        assert!(Instant::now() < deadline, "not managed:\n{table}");
        std::thread::sleep(Duration::from_millis(50));
    };
    println!("{table}");
    let line = |a: &str| {
        table
            .lines()
            .find(|l| l.starts_with(&format!("{a} ")))
            .unwrap_or("")
            .to_string()
    };
    assert!(
        line("10.77.0.9").contains("PERMANENT") && !line("10.77.0.9").contains("managed"),
        "{table}"
    );
    assert!(
        line("10.78.0.5").is_empty(),
        "a backend behind the gateway has no entry of its own: {table}"
    );
}

/// Adding 1,000 backends (one new VIP, HTTP health checks) in one API
/// change while `/metrics` is scraped in a loop: every scrape is answered
/// with 200, no health check fails or times out, and every backend is up.
#[test]
fn a_thousand_backends_added_at_once_leave_scrapes_and_health_checks_answered() {
    let lab = Lab::start(&LabSpec {
        max_backends: 1100,
        ..LabSpec::weights(&[1])
    })
    .unwrap();
    let figures = lb_tests::lab::scale::add_backends_while_scraping(&lab, 1000).unwrap();
    println!("{figures}");
    assert_eq!(figures.scrape_failures, 0, "{figures}");
    assert!(figures.scrapes_during_change >= 1, "{figures}");
    assert_eq!(figures.checks_failed, 0, "{figures}");
    assert!(figures.checks_ok >= 1000, "{figures}");
    assert_eq!(figures.backends_up, 1000, "{figures}");
}

/// `lbd decap` serves its counters: datagrams through the VIP are counted
/// as decapsulated on the backend that got them; the text passes promtool.
#[test]
fn lbd_decap_exports_its_counters_on_metrics() {
    let lab = Lab::start(&LabSpec::weights(&[1])).unwrap();
    let fetch = || {
        in_ns(&lab.backends[0].ns, || {
            let mut s = TcpStream::connect("127.0.0.1:9180").unwrap();
            s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
            let mut t = String::new();
            s.read_to_string(&mut t).unwrap();
            t.split_once("\r\n\r\n").unwrap().1.to_string()
        })
        .unwrap()
    };
    let before = fetch();
    let decapsulated =
        |t: &str| prom::value(t, "lb_decap_packets_total", &[("reason", "decapsulated")]).unwrap();
    let addr = lab.vip_echo(false);
    lab.in_client(move || {
        let flow = lb_tests::lab::client::UdpFlow::open(addr).unwrap();
        for i in 0..10 {
            flow.echo(&format!("ping {i}")).unwrap();
        }
    })
    .unwrap();
    let after = fetch();
    println!(
        "decapsulated: {} -> {}",
        decapsulated(&before),
        decapsulated(&after)
    );
    assert!(decapsulated(&after) - decapsulated(&before) >= 10.0);
    for reason in ["not_tunnel", "not_local", "malformed"] {
        assert!(
            prom::value(&after, "lb_decap_packets_total", &[("reason", reason)]).is_some(),
            "{reason}"
        );
    }
    assert!(
        after.contains("lb_build_info{") && after.contains("process_resident_memory_bytes"),
        "{after}"
    );
    prom::check_metrics(&after).unwrap();
}

fn get_metrics(lab: &Lab, gzip: bool) -> (String, Vec<u8>) {
    in_ns(&lab.balancer, move || {
        let mut s = TcpStream::connect(lb_tests::lab::METRICS).unwrap();
        let extra = if gzip {
            "Accept-Encoding: gzip\r\n"
        } else {
            ""
        };
        write!(s, "GET /metrics HTTP/1.0\r\n{extra}\r\n").unwrap();
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).unwrap();
        let end = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
        (
            String::from_utf8_lossy(&raw[..end]).into_owned(),
            raw[end + 4..].to_vec(),
        )
    })
    .unwrap()
}

/// The balancer's endpoint with everything this issue added: gzip when
/// asked, the same text decompressed; build info, process metrics and
/// reload counts (a bad config rejected, then a good one applied); only
/// the chosen per-backend families; the JSON log is one object a line.
#[test]
fn the_balancer_exports_reloads_build_info_and_gzip_and_logs_json() {
    let lab = Lab::start(&LabSpec {
        config_extra: "backend_families = [\"lb_backend_up\", \"lb_backend_packets_total\"]\n\n[log]\nformat = \"json\"".into(),
        ..LabSpec::weights(&[1, 1])
    })
    .unwrap();
    let (head, plain) = get_metrics(&lab, false);
    assert!(
        !head.to_ascii_lowercase().contains("content-encoding"),
        "{head}"
    );
    let (head, packed) = get_metrics(&lab, true);
    assert!(
        head.to_ascii_lowercase().contains("content-encoding: gzip"),
        "{head}"
    );
    let mut text = String::new();
    flate2::read::GzDecoder::new(&packed[..])
        .read_to_string(&mut text)
        .unwrap();
    println!(
        "scrape: {} bytes, {} gzip-compressed",
        plain.len(),
        packed.len()
    );
    assert_eq!(
        prom::families(&text),
        prom::families(&String::from_utf8_lossy(&plain))
    );
    prom::check_metrics(&text).unwrap();
    assert!(text.contains("lb_build_info{commit=\""), "{text}");
    assert!(text.contains("process_cpu_seconds_total"), "{text}");
    let families = prom::families(&text);
    assert!(families.contains("lb_backend_up") && families.contains("lb_backend_packets_total"));
    for absent in [
        "lb_backend_weight",
        "lb_backend_bytes_total",
        "lb_backend_table_share_ratio",
    ] {
        assert!(!families.contains(absent), "{absent} is not chosen");
    }
    let reloads = |outcome: &str| {
        lab.metric("lb_config_reloads_total", &[("outcome", outcome)])
            .unwrap()
    };
    assert_eq!(
        lab.metric("lb_config_last_reload_successful", &[]).unwrap(),
        1
    );
    let good = std::fs::read_to_string(lab.config_path()).unwrap();
    std::fs::write(lab.config_path(), good.replace("mtu = 1600", "mtu = 99999")).unwrap();
    lab.sighup();
    let deadline = Instant::now() + Duration::from_secs(10);
    while reloads("rejected") < 1 {
        assert!(Instant::now() < deadline, "the bad reload was not counted");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        lab.metric("lb_config_last_reload_successful", &[]).unwrap(),
        0
    );
    std::fs::write(lab.config_path(), &good).unwrap();
    lab.reload().unwrap();
    assert_eq!((reloads("applied"), reloads("rejected")), (1, 1));
    assert_eq!(
        lab.metric("lb_config_last_reload_successful", &[]).unwrap(),
        1
    );
    let log = lab.lbd_log();
    let mut lines = 0;
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(
            v["timestamp"].is_string()
                && v["level"].is_string()
                && v["fields"]["message"].is_string(),
            "{line}"
        );
        lines += 1;
    }
    println!("{lines} JSON log lines");
    assert!(
        log.contains("\"span\":{\"cause\":\"startup\""),
        "the cause of a change is in its span: {log}"
    );
}

/// `metrics.backend_min_share`: a backend that carried less than that share
/// of its VIP's packets has no per-backend series; the VIP's own series and
/// the heavy backend's stay complete.
#[test]
fn backends_below_the_traffic_share_are_left_out_of_the_scrape() {
    use lb::control::controller::{Scrape, Snapshot};
    use lb_tests::{
        SplitMix,
        frames::{Flow, FrameSpec},
        packet_lab::PacketLab,
    };
    const CONFIG: &str = r#"
[balancer]
source_v4 = "10.200.0.1"
max_vips = 4
max_backends = 8
[metrics]
backend_min_share = 0.5
[[vip]]
address = "203.0.113.10"
port = 80
protocol = "tcp"
backends = [
  { address = "10.200.0.11", weight = 1 },
  { address = "10.200.0.12", weight = 1 },
  { address = "10.200.0.13", weight = 8 },
]
"#;
    lb_tests::pin_to_cpu(0);
    let mut lab = PacketLab::new(CONFIG).unwrap();
    let mut rng = SplitMix(5);
    for _ in 0..300 {
        let f = Flow {
            src: IpAddr::from((0xc612_0000u32 | (rng.next_u32() & 0xffff)).to_be_bytes()),
            dst: VIP_V4.into(),
            sport: 1024 + rng.next_u16() % 60000,
            dport: 80,
            protocol: lb::desired::vip::Protocol::Tcp,
        };
        let frame = lab.frame(&f, FrameSpec::default());
        lab.run(&frame).unwrap();
    }
    let config = lb::desired::config::parse(CONFIG, "t").unwrap();
    let snapshot = Snapshot::read(&lab.dp, &config, Duration::ZERO);
    let text = lb::control::metrics::render(
        &Scrape::read(&lab.dp, snapshot).unwrap(),
        &lb::control::api::request_counts(),
    );
    let vip = "203.0.113.10:80/tcp";
    assert_eq!(
        prom::value(&text, "lb_vip_packets_total", &[("vip", vip)]),
        Some(300.0)
    );
    let with_backend: std::collections::BTreeSet<String> = prom::samples(&text)
        .into_iter()
        .filter_map(|s| s.labels.get("backend").cloned())
        .collect();
    let heavy = prom::value(
        &text,
        "lb_backend_packets_total",
        &[("vip", vip), ("backend", "10.200.0.13")],
    )
    .unwrap();
    println!("backends with series: {with_backend:?}; the heavy one forwarded {heavy} of 300");
    assert_eq!(with_backend, ["10.200.0.13".to_string()].into());
    assert!(heavy > 150.0);
    assert_eq!(
        prom::value(
            &text,
            "lb_backend_up",
            &[("vip", vip), ("backend", "10.200.0.13")]
        ),
        Some(1.0)
    );
}
