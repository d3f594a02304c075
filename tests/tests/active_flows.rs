//! Active flows per backend: counted from the connection table (exact as of
//! each sweep), `least-conn` on them, `maglev-src` with a load cap, and
//! drains that say when they are done. Every connection here is real TCP
//! from the lab's client through the balancer.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    thread,
    time::{Duration, Instant},
};

use lb::control::client::Endpoint;
use lb_tests::lab::{
    Lab, LabSpec, VIP_V4,
    client::{HttpConn, http_get},
};
use serde_json::Value;

/// The sweep interval these labs run with.
const SWEEP: Duration = Duration::from_millis(500);
/// How long a count may take to show a change: the first sweep that
/// begins after it (at most one interval away), plus its own run and the
/// controller's poll, with room for a loaded machine.
const COUNT_BOUND: Duration = Duration::from_secs(3);
/// The closing timeout of these labs (seconds).
const CLOSING_S: u64 = 2;
/// The TCP idle timeout of these labs (seconds).
const IDLE_S: u64 = 8;

fn spec(weights: &[u32], vip_extra: &str) -> LabSpec {
    LabSpec {
        vip_extra: vip_extra.to_string(),
        conntrack: format!(
            "sweep_interval = {}\ntcp_closing_timeout = {CLOSING_S}\ntcp_idle_timeout = {IDLE_S}\n",
            SWEEP.as_secs_f64()
        ),
        ..LabSpec::weights(weights)
    }
}

fn http_vip() -> SocketAddr {
    SocketAddr::new(IpAddr::V4(VIP_V4), lb_tests::lab::servers::HTTP_PORT)
}

fn vip_path() -> String {
    format!(
        "/v1/vips/{VIP_V4}-{}-tcp",
        lb_tests::lab::servers::HTTP_PORT
    )
}

fn vip_view(lab: &Lab) -> Value {
    let r = Endpoint::Unix(lab.api_socket())
        .request("GET", &vip_path(), None)
        .expect("lbd answers");
    assert_eq!(r.status, 200, "{}", r.error_message());
    serde_json::from_slice(&r.body).unwrap()
}

/// Each backend's (active, closing) flows in lab order, and the counts' age
/// (read first: the counts are at least as new).
fn counts(lab: &Lab) -> (Vec<(u64, u64)>, Option<f64>) {
    let r = Endpoint::Unix(lab.api_socket())
        .request("GET", "/v1/status", None)
        .expect("lbd answers");
    let status: Value = serde_json::from_slice(&r.body).unwrap();
    let v = vip_view(lab);
    let by_addr: BTreeMap<String, (u64, u64)> = v["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["address"].as_str().unwrap().to_string(),
                (
                    b["active_flows"].as_u64().unwrap(),
                    b["closing_flows"].as_u64().unwrap(),
                ),
            )
        })
        .collect();
    let per = lab
        .backends
        .iter()
        .map(|b| by_addr.get(&b.v4.to_string()).copied().unwrap_or((0, 0)))
        .collect();
    (per, status["active_flows_age_seconds"].as_f64())
}

/// Waits for the first sweep that began after `since` and asserts it
/// counted exactly `want` (active, closing) per backend; returns how long
/// after `since` it was there.
fn expect_counts(lab: &Lab, since: Instant, want: &[(u64, u64)], what: &str) -> Duration {
    loop {
        let (per, age) = counts(lab);
        if age.is_some_and(|a| a < since.elapsed().as_secs_f64()) {
            assert_eq!(per, want, "{what}: the first sweep after it");
            return since.elapsed();
        }
        assert!(
            since.elapsed() < COUNT_BOUND,
            "{what}: no sweep within {COUNT_BOUND:?} (counts {per:?}, age {age:?})"
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// Opens `n` kept-alive connections with one request each; the backend
/// that answered each.
fn hold(lab: &Lab, n: usize) -> Vec<(HttpConn, String)> {
    lab.in_client(move || {
        (0..n)
            .map(|_| {
                let mut c = HttpConn::connect(http_vip()).unwrap();
                let (backend, _) = c.get("/").unwrap();
                (c, backend)
            })
            .collect::<Vec<_>>()
    })
    .unwrap()
}

fn tally<'a>(names: impl Iterator<Item = &'a String>) -> BTreeMap<String, usize> {
    let mut t = BTreeMap::new();
    for n in names {
        *t.entry(n.clone()).or_insert(0) += 1;
    }
    t
}

#[test]
fn active_flow_counts_follow_held_connections_and_every_way_they_end() {
    let lab = Lab::start(&spec(&[1, 0, 0], "")).unwrap();
    let t = Instant::now();
    let took = expect_counts(&lab, t, &[(0, 0); 3], "no connection");
    println!("0 connections: counted 0 everywhere ({took:.2?})");

    // 1 on b1, 100 on b2, 1000 on b3: each in turn the only backend in
    // the table.
    let one = hold(&lab, 1);
    let t = Instant::now();
    let took = expect_counts(&lab, t, &[(1, 0), (0, 0), (0, 0)], "1 held");
    println!("1 connection on b1: counted ({took:.2?})");
    lab.set_backends(&[Some(0), Some(1), Some(0)]).unwrap();
    let hundred = hold(&lab, 100);
    let t = Instant::now();
    let took = expect_counts(&lab, t, &[(1, 0), (100, 0), (0, 0)], "100 held");
    println!("100 connections on b2: counted ({took:.2?})");
    lab.set_backends(&[Some(0), Some(0), Some(1)]).unwrap();
    let opened = Instant::now();
    let thousand = hold(&lab, 1000);
    let t = Instant::now();
    println!("opened 1000 connections in {:.2?}", opened.elapsed());
    assert!(thousand.iter().all(|(_, b)| b == "b3"));
    let took = expect_counts(&lab, t, &[(1, 0), (100, 0), (1000, 0)], "1000 held");
    println!("1000 connections on b3: counted ({took:.2?})");
    let b3 = lab.backends[2].v4.to_string();
    let vip = format!("{VIP_V4}:80/tcp");
    assert_eq!(
        lab.metric(
            "lb_backend_active_flows",
            &[("backend", &b3), ("vip", &vip)]
        )
        .unwrap(),
        1000
    );
    let show = lab.lbctl(&["vip", "show", &vip]);
    let text = String::from_utf8_lossy(&show.stdout);
    assert!(
        text.lines()
            .any(|l| l.starts_with(&b3) && l.trim_end().ends_with("1000")),
        "lbctl vip show:\n{text}"
    );

    // FIN: closing (counted as such) until the closing timeout, then gone.
    drop(one);
    let fin = Instant::now();
    expect_counts(
        &lab,
        fin,
        &[(1, 1), (100, 0), (1000, 0)],
        "b1's connection closed",
    );
    thread::sleep(Duration::from_secs(CLOSING_S));
    let t = Instant::now();
    let took = expect_counts(
        &lab,
        t,
        &[(0, 0), (100, 0), (1000, 0)],
        "b1's closing timeout over",
    );
    println!(
        "FIN: counted closing at once; gone {:.2?} after the FIN, {took:.2?} after its closing timeout ({CLOSING_S} s)",
        fin.elapsed()
    );

    // RST: gone at the next sweep.
    let rst = Instant::now();
    for (c, _) in hundred {
        c.reset().unwrap();
    }
    let took = expect_counts(&lab, rst, &[(0, 0), (0, 0), (1000, 0)], "b2's 100 reset");
    println!("RST: 100 connections gone from the count {took:.2?} after");

    // Idle: b3's 1000 said nothing since they were opened; they are gone
    // once the idle timeout has passed.
    let idle_from = t; // after the last request of the 1000
    let left = Duration::from_secs(IDLE_S).saturating_sub(idle_from.elapsed());
    thread::sleep(left + Duration::from_millis(100));
    let t = Instant::now();
    let took = expect_counts(&lab, t, &[(0, 0); 3], "b3's idle timeout over");
    println!(
        "idle: 1000 connections gone {:.2?} after their idle timeout ({IDLE_S} s)",
        took
    );
    // Their resets start no entry.
    for (c, _) in thousand {
        c.reset().unwrap();
    }
    let t = Instant::now();
    expect_counts(&lab, t, &[(0, 0); 3], "after the idle ones' resets");
}

#[test]
fn least_conn_sends_new_flows_where_the_fewest_streams_are_and_follows_weights() {
    let lab = Lab::start(&spec(&[1, 1, 0, 0], "scheduler = \"least-conn\"")).unwrap();
    // 40 streams on b1 and b2 (the only ones in the table).
    let streams = hold(&lab, 40);
    let t = tally(streams.iter().map(|(_, b)| b));
    println!("40 streams: {t:?}");
    assert_eq!(
        t.get("b1").copied().unwrap_or(0) + t.get("b2").copied().unwrap_or(0),
        40
    );
    assert!(
        t.values().all(|n| *n == 20),
        "least-conn splits 40 streams 20/20: {t:?}"
    );
    lab.set_backends(&[Some(1), Some(1), Some(1), Some(1)])
        .unwrap();
    // 200 short connections, one request each.
    let short: Vec<String> = lab
        .in_client(|| (0..200).map(|_| http_get(http_vip()).unwrap()).collect())
        .unwrap();
    let t = tally(short.iter());
    let to_new = t.get("b3").copied().unwrap_or(0) + t.get("b4").copied().unwrap_or(0);
    println!("200 short connections: {t:?}: {to_new} to the two without streams");
    assert!(to_new >= 180, "at least 90% to b3 and b4: {t:?}");

    // Weights 1:3 under steady load: 200 streams.
    for (c, _) in streams {
        c.reset().unwrap();
    }
    lab.set_backends(&[Some(1), Some(3), Some(0), Some(0)])
        .unwrap();
    let streams = hold(&lab, 200);
    let t = tally(streams.iter().map(|(_, b)| b));
    let (b1, b2) = (
        t.get("b1").copied().unwrap_or(0) as f64,
        t.get("b2").copied().unwrap_or(0) as f64,
    );
    println!("200 streams at weights 1:3: {t:?} (ratio {:.2})", b2 / b1);
    assert!(
        (b2 / b1 - 3.0).abs() <= 0.3,
        "active flows follow the weights 1:3 within 10%: {t:?}"
    );
    let since = Instant::now();
    let (per, _) = loop {
        let c = counts(&lab);
        if c.1.is_some_and(|a| a < since.elapsed().as_secs_f64()) {
            break c;
        }
        thread::sleep(Duration::from_millis(50));
    };
    // Open flows (the short connections that reached b1 or b2 may still
    // be closing).
    assert_eq!(
        (per[0].0 - per[0].1, per[1].0 - per[1].1),
        (b1 as u64, b2 as u64),
        "the API's counts"
    );
}

#[test]
fn a_load_cap_keeps_each_client_on_its_backend_until_that_backend_is_full() {
    let lab = Lab::start(&spec(
        &[1, 1, 1, 1],
        "scheduler = \"maglev-src\"\nload_cap = 100",
    ))
    .unwrap();
    // Forty client addresses; each one's own backend, learnt with the cap
    // out of the way.
    let clients: Vec<IpAddr> = (100..140u8)
        .map(|i| IpAddr::V4(Ipv4Addr::new(10, 201, 0, i)))
        .collect();
    for c in &clients {
        lab.client
            .ip(&["addr", "add", &format!("{c}/24"), "dev", "eth0"])
            .unwrap();
    }
    let list = clients.clone();
    let homes: Vec<(IpAddr, String)> = lab
        .in_client(move || {
            list.iter()
                .map(|src| {
                    let mut c = HttpConn::connect_from(*src, http_vip()).unwrap();
                    let (b, _) = c.get("/").unwrap();
                    c.reset().unwrap();
                    (*src, b)
                })
                .collect()
        })
        .unwrap();
    // Three clients per backend.
    let mut picked: BTreeMap<String, Vec<IpAddr>> = BTreeMap::new();
    for (src, b) in &homes {
        let v = picked.entry(b.clone()).or_default();
        if v.len() < 3 {
            v.push(*src);
        }
    }
    assert!(
        picked.len() == 4 && picked.values().all(|v| v.len() == 3),
        "three clients for every backend among 40: {picked:?}"
    );
    let home: BTreeMap<IpAddr, String> = homes.iter().cloned().collect();
    // Interleaved: b1's first client, b2's first, ..., b1's second, ...
    let order: Vec<IpAddr> = (0..3)
        .flat_map(|i| picked.values().map(move |v| v[i]).collect::<Vec<_>>())
        .collect();
    let text = std::fs::read_to_string(lab.config_path()).unwrap();
    std::fs::write(
        lab.config_path(),
        text.replace("load_cap = 100", "load_cap = 1.25"),
    )
    .unwrap();
    lab.reload().unwrap();

    // No overload: 5 connections per client, round after round. Every
    // client stays on its own backend.
    let (o, h) = (order.clone(), home.clone());
    let held: Vec<(HttpConn, IpAddr, String)> = lab
        .in_client(move || {
            let mut held = Vec::new();
            for _ in 0..5 {
                for src in &o {
                    let mut c = HttpConn::connect_from(*src, http_vip()).unwrap();
                    let (b, _) = c.get("/").unwrap();
                    held.push((c, *src, b));
                }
            }
            let _ = h;
            held
        })
        .unwrap();
    let away = held.iter().filter(|(_, s, b)| home[s] != *b).count();
    println!(
        "no overload: {} connections of 12 clients, {away} away from their client's backend",
        held.len()
    );
    assert_eq!(
        away, 0,
        "without overload every client stays on its backend"
    );
    for (c, _, _) in held {
        c.reset().unwrap();
    }

    // Zipf: client of rank r opens ceil(48 / r) connections, interleaved.
    let want: Vec<usize> = (1..=12).map(|r: usize| 48usize.div_ceil(r)).collect();
    let total: usize = want.iter().sum();
    let (o, w) = (order.clone(), want.clone());
    let held: Vec<(HttpConn, IpAddr, String)> = lab
        .in_client(move || {
            let mut held = Vec::new();
            let mut left = w.clone();
            while left.iter().any(|n| *n > 0) {
                for (i, src) in o.iter().enumerate() {
                    if left[i] > 0 {
                        left[i] -= 1;
                        let mut c = HttpConn::connect_from(*src, http_vip()).unwrap();
                        let (b, _) = c.get("/").unwrap();
                        held.push((c, *src, b));
                    }
                }
            }
            held
        })
        .unwrap();
    let per = tally(held.iter().map(|(_, _, b)| b));
    let mean = total as f64 / 4.0;
    let bound = 1.25 * mean + 1.0;
    let moved = held.iter().filter(|(_, s, b)| home[s] != *b).count();
    let split = order
        .iter()
        .filter(|s| {
            let mut bs: Vec<&String> = held.iter().filter(|h| h.1 == **s).map(|h| &h.2).collect();
            bs.dedup();
            bs.len() > 1
        })
        .count();
    println!(
        "Zipf ({want:?}, {total} connections): per backend {per:?}, mean {mean:.2}, bound {bound:.2}; \
         {moved} connections away from their client's backend, {split} clients split"
    );
    assert!(
        per.values().all(|n| (*n as f64) <= bound),
        "no backend above 1.25 x mean + 1: {per:?}"
    );
}

#[test]
fn a_drain_waits_for_its_last_stream_and_takes_no_new_flow_meanwhile() {
    let lab = Lab::start(&spec(&[1, 0], "")).unwrap();
    let vip = format!("{VIP_V4}:80/tcp");
    let b1 = lab.backends[0].v4.to_string();
    // A stream on b1, then b2 in the table too.
    let mut stream = hold(&lab, 1).pop().unwrap().0;
    lab.set_backends(&[Some(1), Some(1)]).unwrap();

    // A drain that times out: the stream is still there.
    let started = Instant::now();
    let o = lab.lbctl(&["backend", "drain", &vip, &b1, "--wait", "--timeout", "1"]);
    println!(
        "drain --timeout 1 with a stream held: exit {:?} after {:.2?}: {}",
        o.status.code(),
        started.elapsed(),
        String::from_utf8_lossy(&o.stdout).trim()
    );
    assert_eq!(o.status.code(), Some(7), "{o:?}");
    let b = &vip_view(&lab)["backends"][0];
    assert_eq!(b["drain"]["state"], "draining", "{b}");
    assert_eq!(
        lab.metric("lb_backend_draining", &[("backend", &b1), ("vip", &vip)])
            .unwrap(),
        1
    );

    // The drain with --wait in the background; the stream goes on for 30 s
    // while new connections come.
    let bin = lb_tests::lab::binary_path("lbctl").unwrap();
    let socket = lab.api_socket();
    let (v, a) = (vip.clone(), b1.clone());
    let waiter = thread::spawn(move || {
        let o = std::process::Command::new(bin)
            .arg("--socket")
            .arg(socket)
            .args(["backend", "drain", &v, &a, "--wait", "--timeout", "120"])
            .output()
            .unwrap();
        (o, Instant::now())
    });
    let (answered, new_on_b1, new) = lab
        .in_client(|| {
            let (mut answered, mut new_on_b1, mut new) = (0, 0, 0);
            let until = Instant::now() + Duration::from_secs(30);
            while Instant::now() < until {
                let (b, _) = stream
                    .get("/")
                    .expect("the drained backend's stream goes on");
                assert_eq!(b, "b1");
                answered += 1;
                if answered % 3 == 0 {
                    new += 1;
                    if http_get(http_vip()).unwrap() == "b1" {
                        new_on_b1 += 1;
                    }
                }
                thread::sleep(Duration::from_millis(100));
            }
            (answered, new_on_b1, new)
        })
        .unwrap();
    assert!(
        !waiter.is_finished(),
        "the drain returned while its stream ran"
    );
    println!(
        "30 s stream through the drained backend: {answered} requests answered; \
         {new} new connections, {new_on_b1} of them to the drained backend"
    );
    assert_eq!(new_on_b1, 0);
    drop(stream);
    let ended = Instant::now();
    let (o, at) = waiter.join().unwrap();
    let after = at - ended;
    println!(
        "the drain returned {after:.2?} after the stream ended (closing timeout {CLOSING_S} s, \
         sweep every {SWEEP:?}): {}",
        String::from_utf8_lossy(&o.stdout).trim()
    );
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    assert!(
        after <= Duration::from_secs(CLOSING_S) + COUNT_BOUND,
        "the drain finished within the closing timeout plus a sweep"
    );
    let b = &vip_view(&lab)["backends"][0];
    assert_eq!(b["drain"]["state"], "drained", "{b}");
    assert_eq!(b["active_flows"], 0, "{b}");
    assert_eq!(
        lab.metric("lb_backend_draining", &[("backend", &b1), ("vip", &vip)])
            .unwrap(),
        0
    );
}
