//! Health checks and load-aware weights in the lab, through the real lbd:
//! backends serve vLLM-format `/metrics` and a `/health` whose answers the
//! test controls, and can stop their HTTP service.

use std::{
    collections::BTreeMap,
    thread,
    time::{Duration, Instant},
};

use lb::control::client::Endpoint;
use lb_tests::{
    lab::{
        Lab, LabSpec, binary_path,
        client::{HttpConn, http_get},
        servers::HealthMode,
    },
    prom,
};
use serde_json::Value;

const VIP: &str = "203.0.113.10-80-tcp";
const VIP_LABEL: &str = "203.0.113.10:80/tcp";

/// Load-aware weights from the backends' vLLM metrics, scraped every second.
const LOAD: &str =
    "[vip.load]\nmetrics_port = 80\nscrape_interval = 1\nrecovery = 1\nstale_after = 3\n";
/// HTTP health checks every 0.5 s, rise 2, fall 3.
const HEALTH: &str = "[vip.health]\ncheck = \"http\"\nport = 80\npath = \"/health\"\ninterval = 0.5\ntimeout = 0.4\nrise = 2\nfall = 3\n";

fn lab(weights: &[u32], extra: &str) -> Lab {
    Lab::start(&LabSpec {
        vip_extra: extra.to_string(),
        ..LabSpec::weights(weights)
    })
    .expect("lab")
}

fn api(lab: &Lab, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
    let r = Endpoint::Unix(lab.api_socket())
        .request(method, path, body.map(str::as_bytes))
        .expect("lbd answers");
    let v = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
    (r.status, v)
}

/// The HTTP VIP's backend `addr` as the API shows it.
fn backend(lab: &Lab, i: usize) -> Value {
    let addr = lab.backends[i].v4;
    let (status, v) = api(lab, "GET", &format!("/v1/vips/{VIP}/backends/{addr}"), None);
    assert_eq!(status, 200, "{v}");
    v
}

/// Waits up to `secs` for `done`; fails with `what` and the lbd log.
fn wait_for(lab: &Lab, secs: u64, what: &str, done: impl Fn(&Lab) -> bool) -> Duration {
    let start = Instant::now();
    while !done(lab) {
        assert!(
            start.elapsed() < Duration::from_secs(secs),
            "timed out after {secs} s waiting for {what}; lbd log:\n{}",
            lab.lbd_log()
        );
        thread::sleep(Duration::from_millis(50));
    }
    start.elapsed()
}

/// `n` new connections to the HTTP VIP; answers per backend name.
fn spread(lab: &Lab, n: usize) -> BTreeMap<String, usize> {
    let addr = lab.vip_http(false);
    let names: Vec<String> = lab
        .in_client(move || (0..n).map(|_| http_get(addr).unwrap()).collect())
        .unwrap();
    let mut out = BTreeMap::new();
    for name in names {
        *out.entry(name).or_default() += 1;
    }
    out
}

fn factor(lab: &Lab, i: usize) -> f64 {
    backend(lab, i)["load_factor"].as_f64().unwrap()
}

#[test]
fn a_node_with_ten_times_the_queue_gets_at_most_a_tenth_and_recovers() {
    let lab = lab(&[1, 1, 1, 1], LOAD);
    for i in 0..4 {
        lab.control(i).set_vllm(1.0, 0.2);
    }
    wait_for(&lab, 10, "every node's first report", |lab| {
        (0..4).all(|i| backend(lab, i)["load"].is_object())
    });
    let before = spread(&lab, 200);
    assert!(
        before.get("b4").copied().unwrap_or(0) >= 20,
        "even load: b4 has its share {before:?}"
    );

    // b4's queue is 10x the others'.
    lab.control(3).set_vllm(10.0, 0.2);
    thread::sleep(Duration::from_secs(3)); // three scrape intervals
    let loaded = spread(&lab, 400);
    let b4 = loaded.get("b4").copied().unwrap_or(0);
    eprintln!("queued b4: {b4} of 400 new connections ({loaded:?})");
    assert!(
        b4 * 10 <= 400,
        "b4 got {b4} of 400 new connections: {loaded:?}"
    );
    let v = backend(&lab, 3);
    assert_eq!(v["load"]["queue"].as_f64(), Some(10.0), "{v}");
    assert!(v["load_factor"].as_f64().unwrap() <= 0.1, "{v}");
    let m = lab.metrics().unwrap();
    assert_eq!(
        prom::value(
            &m,
            "lb_backend_load_queue",
            &[("backend", &lab.backends[3].v4.to_string())]
        ),
        Some(10.0)
    );
    prom::check_metrics(&m).unwrap();

    // Its queue drains: it regains its share.
    lab.control(3).set_vllm(1.0, 0.2);
    wait_for(&lab, 15, "b4's weight to recover", |lab| {
        factor(lab, 3) >= 0.75
    });
    let after = spread(&lab, 400);
    let b4 = after.get("b4").copied().unwrap_or(0);
    eprintln!("recovered b4: {b4} of 400 new connections ({after:?})");
    assert!(b4 >= 60, "b4 got {b4} of 400 after recovering: {after:?}");
    assert!(
        lab.lbd_log().contains("weights follow load"),
        "load-driven changes are logged"
    );
}

#[test]
fn stale_metrics_fall_back_to_base_weights() {
    let lab = lab(&[1, 1], LOAD);
    lab.control(0).set_vllm(0.0, 0.1);
    lab.control(1).set_vllm(20.0, 0.1);
    wait_for(&lab, 10, "b2 to be weighed down", |lab| {
        factor(lab, 1) <= 0.1
    });
    // b2's metrics stop answering: its last report ages out (3 s) and its
    // weight recovers (1 s time constant).
    lab.control(1).set_metrics_status(503);
    let took = wait_for(&lab, 15, "b2 back at its base weight", |lab| {
        factor(lab, 1) == 1.0
    });
    assert!(
        took >= Duration::from_secs(2),
        "not before the report is stale ({took:?})"
    );
    let m = lab.metrics().unwrap();
    let failed = prom::value(
        &m,
        "lb_load_reports_total",
        &[("source", "scrape"), ("outcome", "failed")],
    )
    .unwrap_or(0.0);
    assert!(failed >= 1.0, "failed scrapes are counted");
    let stale = prom::value(
        &m,
        "lb_load_reports_total",
        &[("source", "scrape"), ("outcome", "stale")],
    );
    // b2's IPv4 and IPv6 addresses are two nodes to lbd: one stale report each.
    assert_eq!(stale, Some(2.0), "the reports that went stale are counted");
}

#[test]
fn when_every_node_is_saturated_base_weights_apply_and_saturated_is_reported() {
    let lab = lab(&[1, 2, 1], LOAD);
    for i in 0..3 {
        lab.control(i).set_vllm(50.0, 0.95);
    }
    wait_for(&lab, 10, "the VIP to be saturated", |lab| {
        api(lab, "GET", &format!("/v1/vips/{VIP}"), None).1["saturated"] == Value::Bool(true)
    });
    for i in 0..3 {
        assert_eq!(factor(&lab, i), 1.0, "base weights while saturated");
    }
    let (_, status) = api(&lab, "GET", "/v1/status", None);
    assert!(status["vips_saturated"].as_u64().unwrap() >= 1, "{status}");
    let m = lab.metrics().unwrap();
    assert_eq!(
        prom::value(&m, "lb_vip_saturated", &[("vip", VIP_LABEL)]),
        Some(1.0)
    );
    let share = backend(&lab, 1)["table_share"].as_f64().unwrap();
    assert!(
        (share - 0.5).abs() < 0.01,
        "weights 1:2:1 as configured: {share}"
    );
    assert!(lab.lbd_log().contains("saturated"), "logged");
    // One node recovers: it takes the flows, the VIP is no longer saturated.
    lab.control(0).set_vllm(0.0, 0.1);
    wait_for(&lab, 10, "saturation to end", |lab| {
        api(lab, "GET", &format!("/v1/vips/{VIP}"), None).1["saturated"] == Value::Bool(false)
    });
    wait_for(&lab, 10, "the others to be weighed down", |lab| {
        factor(lab, 1) <= 0.1
    });
}

#[test]
fn a_stopped_backend_leaves_the_table_in_time_and_others_are_unaffected() {
    let lab = lab(&[1, 1, 1], HEALTH);
    wait_for(&lab, 10, "health checks to run", |lab| {
        backend(lab, 0)["checked"] == Value::Bool(true)
    });
    // A kept-alive connection, and a backend other than its own to stop.
    let addr = lab.vip_http(false);
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let (first_tx, first_rx) = std::sync::mpsc::channel::<String>();
    let client = lab.client.name().to_string();
    let keeper = thread::spawn(move || -> Result<usize, String> {
        let ns = std::fs::File::open(format!("/run/netns/{client}")).unwrap();
        // SAFETY: this thread enters the client's namespace for good.
        assert_eq!(
            unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&ns), libc::CLONE_NEWNET) },
            0
        );
        let mut conn = HttpConn::connect(addr).map_err(|e| e.to_string())?;
        let (name, _) = conn.get("/").map_err(|e| e.to_string())?;
        first_tx.send(name.clone()).unwrap();
        let mut n = 0;
        while rx.try_recv().is_err() {
            let (again, _) = conn.get("/").map_err(|e| format!("request {n}: {e}"))?;
            if again != name {
                return Err(format!("moved from {name} to {again}"));
            }
            n += 1;
            thread::sleep(Duration::from_millis(50));
        }
        Ok(n)
    });
    let kept = first_rx.recv().unwrap();
    let victim = lab.backends.iter().position(|b| b.name != kept).unwrap();
    let victim_addr = lab.backends[victim].v4;

    let stopped = Instant::now();
    lab.control(victim).set_http_up(false);
    let took = wait_for(&lab, 10, "the stopped backend to be down", |lab| {
        backend(lab, victim)["health"] == "down"
    });
    eprintln!("the stopped backend was down after {took:?}");
    // fall x interval + 1 s.
    assert!(
        took <= Duration::from_millis(3 * 500 + 1000),
        "down after {took:?}"
    );
    let v = backend(&lab, victim);
    assert_eq!(
        v["table_share"].as_f64(),
        Some(0.0),
        "out of the table: {v}"
    );
    assert!(v["last_error"].as_str().unwrap().contains("refused"), "{v}");
    let answers = spread(&lab, 150);
    assert!(
        !answers.contains_key(&lab.backends[victim].name),
        "no new connection to the stopped backend: {answers:?}"
    );
    assert_eq!(answers.values().sum::<usize>(), 150, "all answered");
    tx.send(()).unwrap();
    let n = keeper
        .join()
        .unwrap()
        .expect("the kept-alive connection never broke");
    assert!(n > 10, "{n} requests on the kept connection");
    let log = lab.lbd_log();
    assert!(
        log.lines()
            .any(|l| l.contains("backend down: 3 checks failed in a row")
                && l.contains(&victim_addr.to_string())
                && l.contains("cause=\"health check\"")),
        "{log}"
    );

    // It comes back after `rise` good checks.
    lab.control(victim).set_http_up(true);
    wait_for(&lab, 10, "the backend to be up again", |lab| {
        backend(lab, victim)["health"] == "up"
    });
    let v = backend(&lab, victim);
    assert_eq!(v["health_transitions"].as_u64(), Some(2), "{v}");
    assert!(v["table_share"].as_f64().unwrap() > 0.2, "{v}");
    // Its IPv6 address (checked on its own) comes back too.
    wait_for(&lab, 10, "no backend down", |lab| {
        api(lab, "GET", "/v1/status", None).1["backends_down"].as_u64() == Some(0)
    });
    let m = lab.metrics().unwrap();
    let label = [
        ("backend", victim_addr.to_string()),
        ("cause", "check".to_string()),
        ("vip", VIP_LABEL.to_string()),
    ];
    let label: Vec<(&str, &str)> = label.iter().map(|(k, v)| (*k, v.as_str())).collect();
    assert_eq!(
        prom::value(&m, "lb_backend_health_transitions_total", &label),
        Some(2.0)
    );
    assert!(
        stopped.elapsed() < Duration::from_secs(30),
        "the whole cycle took {:?}",
        stopped.elapsed()
    );
}

#[test]
fn a_flapping_backend_causes_no_table_churn() {
    let lab = lab(&[1, 1], HEALTH);
    wait_for(&lab, 10, "health checks to run", |lab| {
        backend(lab, 0)["checked"] == Value::Bool(true)
    });
    let rebuilds = |lab: &Lab| {
        prom::value(
            &lab.metrics().unwrap(),
            "lb_maglev_rebuilds_total",
            &[("vip", VIP_LABEL)],
        )
        .unwrap()
    };
    let before = rebuilds(&lab);
    // Up and down on every other check: never `rise` (2) good or `fall`
    // (3) bad checks in a row.
    lab.control(1).set_health(HealthMode::Flapping);
    thread::sleep(Duration::from_secs(5));
    lab.control(1).set_health(HealthMode::Up);
    assert_eq!(rebuilds(&lab), before, "no table change");
    let v = backend(&lab, 1);
    assert_eq!(
        (v["health"].as_str(), v["health_transitions"].as_u64()),
        (Some("up"), Some(0)),
        "{v}"
    );
    let m = lab.metrics().unwrap();
    let failed = prom::value(&m, "lb_health_checks_total", &[("result", "failed")]).unwrap();
    assert!(failed >= 4.0, "the failed checks happened ({failed})");
}

#[test]
fn every_backend_down_keeps_the_last_table_by_default() {
    let lab = lab(&[1, 1], HEALTH);
    wait_for(&lab, 10, "health checks to run", |lab| {
        backend(lab, 0)["checked"] == Value::Bool(true)
    });
    lab.control(0).set_health(HealthMode::Down);
    wait_for(&lab, 10, "b1 down", |lab| {
        backend(lab, 0)["health"] == "down"
    });
    lab.control(1).set_health(HealthMode::Down);
    wait_for(&lab, 10, "every backend down", |lab| {
        api(lab, "GET", &format!("/v1/vips/{VIP}"), None).1["all_down"] == Value::Bool(true)
    });
    // keep_last: b2 (the last one up) keeps the table; traffic still flows.
    assert_eq!(backend(&lab, 1)["table_share"].as_f64(), Some(1.0));
    let answers = spread(&lab, 20);
    assert_eq!(answers.get("b2"), Some(&20), "{answers:?}");
    let m = lab.metrics().unwrap();
    assert_eq!(
        prom::value(&m, "lb_vip_all_backends_down", &[("vip", VIP_LABEL)]),
        Some(1.0)
    );
    assert!(lab.lbd_log().contains("every backend is down"));
}

/// Load-aware weights from pushed reports only.
const PUSHED: &str = "[vip.load]\nrecovery = 1\nstale_after = 3\n";

fn rebuilds(lab: &Lab) -> f64 {
    prom::value(
        &lab.metrics().unwrap(),
        "lb_maglev_rebuilds_total",
        &[("vip", VIP_LABEL)],
    )
    .unwrap()
}

fn reports(lab: &Lab, source: &str, outcome: &str) -> f64 {
    prom::value(
        &lab.metrics().unwrap(),
        "lb_load_reports_total",
        &[("source", source), ("outcome", outcome)],
    )
    .unwrap_or(0.0)
}

#[test]
fn bad_pushed_reports_are_refused_and_change_nothing_and_stale_ones_decay() {
    let lab = lab(&[1, 1], PUSHED);
    let b2 = lab.backends[1].v4.to_string();
    let path = format!("/v1/backends/{b2}/load");
    thread::sleep(Duration::from_millis(1500));
    let before = rebuilds(&lab);
    // Over the API's body limit.
    let big = format!(
        "{{\"named_metrics\": {{\"queue\": 1}}, \"pad\": \"{}\"}}",
        "x".repeat(lb::control::api::BODY_LIMIT)
    );
    let cases: Vec<(&str, String, u16, &str)> = vec![
        (
            "malformed JSON",
            "{\"named_metrics\": {".into(),
            400,
            "body",
        ),
        ("huge", big, 413, "limit"),
        (
            "NaN",
            "{\"named_metrics\": {\"queue\": \"NaN\"}}".into(),
            400,
            "named_metrics",
        ),
        (
            "negative",
            "{\"named_metrics\": {\"queue\": -3}}".into(),
            400,
            "named_metrics.queue",
        ),
        (
            "KV over 1",
            "{\"named_metrics\": {\"kv_cache\": 1.5}}".into(),
            400,
            "named_metrics.kv_cache",
        ),
        ("unknown field", "{\"queue\": 3}".into(), 400, "queue"),
        (
            "nothing to steer by",
            "{\"rps_fractional\": 3}".into(),
            400,
            "nothing to steer by",
        ),
        (
            "zero ttl",
            "{\"named_metrics\": {\"queue\": 3}, \"ttl\": 0}".into(),
            400,
            "ttl",
        ),
    ];
    for (what, body, status, needle) in &cases {
        let (got, v) = api(&lab, "POST", &path, Some(body));
        assert_eq!(got, *status, "{what}: {v}");
        assert!(v.to_string().contains(needle), "{what}: {v}");
    }
    let (got, v) = api(
        &lab,
        "POST",
        "/v1/backends/10.201.0.99/load",
        Some("{\"named_metrics\": {\"queue\": 50}}"),
    );
    assert_eq!(got, 404, "unknown backend: {v}");
    thread::sleep(Duration::from_millis(1500));
    assert_eq!(rebuilds(&lab), before, "no weight changed");
    assert_eq!(factor(&lab, 1), 1.0);
    assert!(backend(&lab, 1)["load"].is_null(), "no report was taken");
    assert!(
        reports(&lab, "push", "invalid") >= 5.0,
        "invalid pushes counted"
    );
    assert_eq!(reports(&lab, "push", "unknown_backend"), 1.0);

    // A valid report with a short ttl weighs b2 down, then goes stale and
    // the weight decays back to the base.
    let (got, v) = api(
        &lab,
        "POST",
        &path,
        Some(
            "{\"named_metrics\": {\"queue\": 50, \"kv_cache\": 0.5}, \"rps_fractional\": 12.5, \"ttl\": 2}",
        ),
    );
    assert_eq!(got, 204, "{v}");
    let v = backend(&lab, 1);
    assert_eq!(
        (v["load"]["source"].as_str(), v["load"]["reporter"].as_str()),
        (Some("push"), Some("orca")),
        "{v}"
    );
    wait_for(&lab, 5, "b2 weighed down", |lab| factor(lab, 1) <= 0.1);
    wait_for(&lab, 10, "the stale report to stop counting", |lab| {
        factor(lab, 1) == 1.0
    });
    assert_eq!(reports(&lab, "push", "accepted"), 1.0);
    assert_eq!(
        reports(&lab, "push", "stale"),
        1.0,
        "the stale report is counted"
    );
}

#[test]
fn bad_scrapes_are_ignored_with_a_counter() {
    // Reports stay fresh through the bad scrapes (a long stale_after), and
    // a queue of 2 (pressure 0.4) shows in the weights, so any bad value
    // taken would change them.
    let lab = lab(
        &[1, 1],
        &LOAD.replace("stale_after = 3", "stale_after = 60"),
    );
    lab.control(0).set_vllm(2.0, 0.1);
    lab.control(1).set_vllm(2.0, 0.1);
    wait_for(&lab, 10, "first reports", |lab| {
        (0..2).all(|i| backend(lab, i)["load"].is_object())
    });
    thread::sleep(Duration::from_secs(2));
    let before = rebuilds(&lab);
    for text in [
        "vllm:num_requests_waiting{engine=\"0\" 3\n",
        "vllm:num_requests_waiting NaN\n",
        "vllm:num_requests_waiting -4\n",
        "vllm:num_requests_waiting 1\nvllm:kv_cache_usage_perc 7\n",
    ] {
        lab.control(1).set_metrics(text);
        thread::sleep(Duration::from_millis(1200));
    }
    lab.control(1).set_metrics("node_cpu_seconds_total 5\n");
    thread::sleep(Duration::from_millis(1200));
    lab.control(1).set_vllm(2.0, 0.1);
    assert_eq!(rebuilds(&lab), before, "no weight changed");
    assert!(factor(&lab, 1) < 0.7, "the load shows: {}", factor(&lab, 1));
    assert_eq!(factor(&lab, 1), factor(&lab, 0), "b2 weighs as before");
    assert!(
        reports(&lab, "scrape", "invalid") >= 3.0,
        "invalid scrapes counted"
    );
    assert!(reports(&lab, "scrape", "unknown_format") >= 1.0);
}

/// Least-load: a node that reports a long queue gets few new connections
/// (only those whose two choices are both it).
#[test]
fn least_load_sends_new_connections_away_from_a_busy_node() {
    let lab = lab(
        &[1, 1, 1],
        "scheduler = \"least-load\"\n[vip.load]\nstale_after = 60\n",
    );
    let b2 = lab.backends[1].v4.to_string();
    let (got, v) = api(
        &lab,
        "POST",
        &format!("/v1/backends/{b2}/load"),
        Some("{\"named_metrics\": {\"queue\": 200, \"running\": 8}}"),
    );
    assert_eq!(got, 204, "{v}");
    wait_for(&lab, 5, "b2's score", |lab| {
        backend(lab, 1)["score"]
            .as_u64()
            .is_some_and(|s| s >= 200_000)
    });
    let addr = lab.vip_http(false);
    let names: Vec<String> = lab
        .in_client(move || {
            (0..150)
                .map(|_| {
                    thread::sleep(Duration::from_millis(10));
                    http_get(addr).unwrap()
                })
                .collect()
        })
        .unwrap();
    let to_b2 = names.iter().filter(|n| *n == "b2").count();
    eprintln!("least-load: the busy node got {to_b2} of 150 new connections");
    assert!(to_b2 * 5 < 150, "b2 got {to_b2} of 150");
    let m = lab.metrics().unwrap();
    let label = [("backend", b2.as_str()), ("vip", VIP_LABEL)];
    assert!(prom::value(&m, "lb_backend_least_load_score", &label).unwrap() >= 200_000.0);
}

/// A stream's thread: its requests and the longest wait for an answer.
type Keeper = thread::JoinHandle<Result<(usize, Duration), String>>;

/// A kept-alive connection to the HTTP VIP in the client's namespace,
/// requesting every 50 ms until told to stop; returns the backend it
/// landed on at once, and then (joined) the requests made and the longest
/// wait for an answer.
fn keep_streaming(lab: &Lab) -> (String, std::sync::mpsc::Sender<()>, Keeper) {
    let addr = lab.vip_http(false);
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let (first_tx, first_rx) = std::sync::mpsc::channel::<String>();
    let client = lab.client.name().to_string();
    let keeper = thread::spawn(move || -> Result<(usize, Duration), String> {
        let ns = std::fs::File::open(format!("/run/netns/{client}")).unwrap();
        // SAFETY: this thread enters the client's namespace for good.
        assert_eq!(
            unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&ns), libc::CLONE_NEWNET) },
            0
        );
        let mut conn = HttpConn::connect(addr).map_err(|e| e.to_string())?;
        let (name, _) = conn.get("/").map_err(|e| e.to_string())?;
        first_tx.send(name.clone()).unwrap();
        let (mut n, mut longest) = (0, Duration::ZERO);
        while rx.try_recv().is_err() {
            let t = Instant::now();
            let (again, _) = conn.get("/").map_err(|e| format!("request {n}: {e}"))?;
            longest = longest.max(t.elapsed());
            if again != name {
                return Err(format!("moved from {name} to {again}"));
            }
            n += 1;
            thread::sleep(Duration::from_millis(50));
        }
        Ok((n, longest))
    });
    (first_rx.recv().unwrap(), tx, keeper)
}

fn stall_transitions(lab: &Lab, i: usize) -> Option<f64> {
    prom::value(
        &lab.metrics().unwrap(),
        "lb_backend_health_transitions_total",
        &[
            ("backend", &lab.backends[i].v4.to_string()),
            ("cause", "stalled"),
            ("vip", VIP_LABEL),
        ],
    )
}

#[test]
fn a_stuck_engine_leaves_the_table_in_time_keeps_its_streams_and_returns() {
    const STALL_AFTER: u64 = 2;
    let lab = lab(&[1, 1, 1], &format!("{LOAD}stall_after = {STALL_AFTER}\n"));
    for i in 0..3 {
        lab.control(i).set_vllm(1.0, 0.2);
    }
    wait_for(&lab, 10, "every node's first report", |lab| {
        (0..3).all(|i| backend(lab, i)["load"].is_object())
    });
    let (kept, stop, keeper) = keep_streaming(&lab);
    let victim = lab.backends.iter().position(|b| b.name == kept).unwrap();
    let idle = (victim + 1) % 3;
    // An idle node (nothing waiting or running) whose counters do not
    // move either: never stalled.
    lab.control(idle).set_vllm_running(0.0, 0.0, 0.1);
    lab.control(idle).set_stuck(true);

    // The victim hangs: requests wait and run, its token counters stop.
    lab.control(victim).set_stuck(true);
    let took = wait_for(&lab, 15, "the stuck backend to be stalled", |lab| {
        let v = backend(lab, victim);
        v["stalled"] == Value::Bool(true) && v["table_share"].as_f64() == Some(0.0)
    });
    eprintln!(
        "the stuck backend was out of the table after {took:?} (stall_after {STALL_AFTER} s, scrapes every 1 s)"
    );
    assert!(
        took <= Duration::from_millis(STALL_AFTER * 1000 + 1000 + 500),
        "out after {took:?}: more than stall_after + one scrape"
    );
    let v = backend(&lab, victim);
    assert_eq!(v["health"], "up", "its /health answers: {v}");
    let answers = spread(&lab, 150);
    eprintln!("new connections while stalled: {answers:?}");
    assert!(
        !answers.contains_key(&lab.backends[victim].name),
        "no new connection to the stalled backend: {answers:?}"
    );
    assert_eq!(answers.values().sum::<usize>(), 150, "all answered");
    let m = lab.metrics().unwrap();
    let victim_label = lab.backends[victim].v4.to_string();
    assert_eq!(
        prom::value(
            &m,
            "lb_backend_stalled",
            &[("backend", &victim_label), ("vip", VIP_LABEL)]
        ),
        Some(1.0)
    );
    assert_eq!(stall_transitions(&lab, victim), Some(1.0));
    let out = lbctl(&lab, &["vip", "show", "203.0.113.10:80/tcp"]);
    println!("{out}");
    assert!(
        out.lines()
            .any(|l| l.contains(&victim_label) && l.contains("stalled")),
        "lbctl vip show says it is stalled:\n{out}"
    );
    let log = lab.lbd_log();
    assert!(
        log.lines().any(|l| l.contains("backend stalled")
            && l.contains(&victim_label)
            && l.contains("cause=\"stalled\"")),
        "{log}"
    );
    let i = backend(&lab, idle);
    assert_eq!(i["stalled"], Value::Bool(false), "idle is not stalled: {i}");
    assert_eq!(stall_transitions(&lab, idle), Some(0.0));

    // Its counters move again: it returns within a scrape.
    lab.control(victim).set_stuck(false);
    let back = wait_for(&lab, 10, "the backend to return", |lab| {
        let v = backend(lab, victim);
        v["stalled"] == Value::Bool(false) && v["table_share"].as_f64().unwrap() > 0.2
    });
    eprintln!("back in the table after {back:?}");
    assert!(back <= Duration::from_millis(1500), "back after {back:?}");
    assert_eq!(stall_transitions(&lab, victim), Some(2.0));
    stop.send(()).unwrap();
    let (n, longest) = keeper
        .join()
        .unwrap()
        .expect("the stream on the stalled backend never broke");
    eprintln!("the kept stream: {n} requests, longest answer {longest:?}");
    assert!(n > 20, "{n} requests on the kept connection");
}

/// Opens `n` connections to `addr` from the client, one every `every`;
/// each waits `wait` (below TCP's 1 s initial retransmission timeout, so
/// only its first SYN counts) for the handshake. Returns how many got no
/// answer.
fn unanswered_syns(lab: &Lab, addr: std::net::SocketAddr, n: usize, every: Duration) -> usize {
    let wait = Duration::from_millis(700);
    lab.in_client(move || {
        let start = Instant::now();
        let tries: Vec<thread::JoinHandle<bool>> = (0..n)
            .map(|i| {
                let due = start + every * i as u32;
                thread::sleep(due.saturating_duration_since(Instant::now()));
                thread::spawn(move || std::net::TcpStream::connect_timeout(&addr, wait).is_err())
            })
            .collect();
        tries
            .into_iter()
            .map(|t| t.join().unwrap())
            .filter(|failed| *failed)
            .count()
    })
    .unwrap()
}

fn shed_share(lab: &Lab) -> f64 {
    api(lab, "GET", &format!("/v1/vips/{VIP}"), None).1["shed"]
        .as_f64()
        .unwrap()
}

#[test]
fn a_saturated_pool_sheds_new_syns_only_and_stops_within_a_scrape() {
    let lab = lab(&[1, 1], &format!("{LOAD}on_saturated = \"shed\"\n"));
    for i in 0..2 {
        lab.control(i).set_vllm(1.0, 0.2);
    }
    wait_for(&lab, 10, "every node's first report", |lab| {
        (0..2).all(|i| backend(lab, i)["load"].is_object())
    });
    let (_, stop, keeper) = keep_streaming(&lab);
    let addr = lab.vip_http(false);
    assert_eq!(
        unanswered_syns(&lab, addr, 40, Duration::from_millis(10)),
        0,
        "not saturated"
    );

    // Queues of 20, four times their limit of 5: the pool sheds 1 - 1/4.
    for i in 0..2 {
        lab.control(i).set_vllm(20.0, 0.5);
    }
    wait_for(&lab, 10, "shedding", |lab| shed_share(lab) > 0.0);
    assert_eq!(shed_share(&lab), 0.75);
    let shed_before = lab
        .metric("lb_packets_total", &[("reason", "shed")])
        .unwrap();
    const N: usize = 200;
    let lost = unanswered_syns(&lab, addr, N, Duration::from_millis(20));
    let shed = lab
        .metric("lb_packets_total", &[("reason", "shed")])
        .unwrap()
        - shed_before;
    let share = lost as f64 / N as f64;
    eprintln!(
        "while shedding 0.75: {lost} of {N} SYNs unanswered at the client ({share:.2}); {shed} counted as shed"
    );
    assert!((0.62..=0.88).contains(&share), "{share}");
    assert_eq!(shed, lost as u64, "each unanswered SYN was shed");
    let m = lab.metrics().unwrap();
    assert_eq!(
        prom::value(&m, "lb_vip_shed_ratio", &[("vip", VIP_LABEL)]),
        Some(0.75)
    );
    let out = lbctl(&lab, &["vip", "show", "203.0.113.10:80/tcp"]);
    assert!(out.contains("SHEDDING: 75%"), "{out}");

    // The load falls: shedding stops within one scrape (1 s).
    let fell = Instant::now();
    for i in 0..2 {
        lab.control(i).set_vllm(0.0, 0.1);
    }
    wait_for(&lab, 5, "shedding to stop", |lab| shed_share(lab) == 0.0);
    let took = fell.elapsed();
    eprintln!("shedding stopped {took:?} after the load fell");
    assert!(took <= Duration::from_millis(1500), "{took:?}");
    assert_eq!(
        unanswered_syns(&lab, addr, 60, Duration::from_millis(10)),
        0,
        "every SYN answered again"
    );
    assert!(lab.lbd_log().contains("shedding"), "logged");
    stop.send(()).unwrap();
    let (n, longest) = keeper
        .join()
        .unwrap()
        .expect("the established stream was not shed");
    eprintln!("the established stream: {n} requests, longest answer {longest:?}");
    assert!(n > 40, "{n} requests");
    assert!(
        longest < Duration::from_millis(500),
        "{longest:?}: never held back"
    );
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
