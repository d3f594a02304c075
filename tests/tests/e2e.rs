//! End to end: real TCP and UDP clients and servers in network namespaces,
//! through the real `lbd` (native XDP) and `lbd decap` on the backends.

use std::{
    collections::{BTreeMap, BTreeSet},
    thread,
    time::Duration,
};

use lb_tests::lab::{
    Lab, LabSpec,
    client::{HttpConn, UdpFlow, http_get},
};

fn lab(weights: &[u32]) -> Lab {
    Lab::start(&LabSpec::weights(weights)).expect("lab")
}

fn forwarded(lab: &Lab) -> u64 {
    lab.metric("lb_packets_total", &[("reason", "forwarded")])
        .unwrap()
}

/// Requests through the VIP are answered, and the answers never pass the
/// balancer: it forwarded packets, yet saw no packet that was not for a VIP
/// (a reply crossing it would count as `not_vip`).
#[test]
fn http_through_the_vip_is_answered_directly_by_the_backends() {
    let lab = lab(&[1, 1, 2]);
    for v6 in [false, true] {
        let addr = lab.vip_http(v6);
        let answers: Vec<String> = lab
            .in_client(|| (0..100).map(|_| http_get(addr).unwrap()).collect())
            .unwrap();
        let names: BTreeSet<&str> = answers.iter().map(String::as_str).collect();
        assert!(
            names.len() >= 2,
            "IPv6 {v6}: 100 connections all answered by {names:?}"
        );
        assert!(
            names.iter().all(|n| ["b1", "b2", "b3"].contains(n)),
            "{names:?}"
        );
    }
    assert!(
        forwarded(&lab) >= 2 * 100 * 3,
        "SYN, request and ACKs of every connection were forwarded"
    );
    assert_eq!(
        lab.metric("lb_packets_total", &[("reason", "not_vip")])
            .unwrap(),
        0,
        "no reply crossed the balancer"
    );
    for reason in [
        "malformed",
        "fib_failed",
        "too_big",
        "no_backend",
        "encap_failed",
    ] {
        assert_eq!(
            lab.metric("lb_packets_total", &[("reason", reason)])
                .unwrap(),
            0,
            "{reason}"
        );
    }
}

/// 3,000 new connections over weights 1:1:2 land within 5 percentage points
/// of 25 % / 25 % / 50 % (client ports are random, so the split is too; one
/// standard deviation is under 1 point at this count).
#[test]
fn new_connections_follow_the_weights() {
    let lab = lab(&[1, 1, 2]);
    for (v6, n) in [(false, 3000usize), (true, 1000)] {
        let addr = lab.vip_http(v6);
        let answers: Vec<String> = lab
            .in_client(|| (0..n).map(|_| http_get(addr).unwrap()).collect())
            .unwrap();
        let mut per: BTreeMap<String, usize> = BTreeMap::new();
        for a in answers {
            *per.entry(a).or_default() += 1;
        }
        for (name, want) in [("b1", 0.25), ("b2", 0.25), ("b3", 0.5)] {
            let got = per.get(name).copied().unwrap_or(0) as f64 / n as f64;
            assert!(
                (got - want).abs() <= 0.05,
                "IPv6 {v6}: {name} took {:.1} %, want {:.0} %: {per:?}",
                got * 100.0,
                want * 100.0
            );
        }
    }
}

/// A kept-alive connection is answered by one backend for its whole life,
/// while other connections come and go around it.
#[test]
fn a_long_lived_connection_keeps_its_backend() {
    let lab = lab(&[1, 1, 2]);
    for v6 in [false, true] {
        let addr = lab.vip_http(v6);
        let backends: BTreeSet<String> = lab
            .in_client(|| {
                let mut conn = HttpConn::connect(addr).unwrap();
                let churn = thread::spawn(move || {
                    for _ in 0..200 {
                        http_get(addr).unwrap();
                    }
                });
                let mut seen = BTreeSet::new();
                for _ in 0..100 {
                    seen.insert(conn.get("/").unwrap().0);
                    thread::sleep(Duration::from_millis(20));
                }
                churn.join().unwrap();
                seen
            })
            .unwrap();
        assert_eq!(
            backends.len(),
            1,
            "IPv6 {v6}: one connection answered by {backends:?}"
        );
    }
}

/// Every datagram of a UDP flow reaches the same backend; flows spread.
#[test]
fn udp_flows_each_reach_one_backend() {
    let lab = lab(&[1, 1, 2]);
    for v6 in [false, true] {
        let addr = lab.vip_echo(v6);
        let per_flow: Vec<BTreeSet<String>> = lab
            .in_client(|| {
                (0..60)
                    .map(|i| {
                        let flow = UdpFlow::open(addr).unwrap();
                        (0..10)
                            .map(|j| flow.echo(&format!("flow {i} datagram {j}")).unwrap())
                            .collect()
                    })
                    .collect()
            })
            .unwrap();
        for (i, backends) in per_flow.iter().enumerate() {
            assert_eq!(
                backends.len(),
                1,
                "IPv6 {v6}: flow {i} reached {backends:?}"
            );
        }
        let all: BTreeSet<&String> = per_flow.iter().flatten().collect();
        assert!(all.len() >= 2, "IPv6 {v6}: 60 flows all reached {all:?}");
    }
}

/// Generic (skb) mode, the fallback for drivers without native XDP, works
/// end to end too.
#[test]
fn generic_xdp_mode_forwards_as_well() {
    let lab = Lab::start(&LabSpec {
        xdp_mode: "skb",
        ..LabSpec::weights(&[1, 1])
    })
    .expect("lab");
    let addr = lab.vip_http(false);
    let answers: Vec<String> = lab
        .in_client(|| (0..30).map(|_| http_get(addr).unwrap()).collect())
        .unwrap();
    assert_eq!(answers.len(), 30);
    assert!(
        lab.balancer
            .ip(&["link", "show", "eth0"])
            .unwrap()
            .contains("xdpgeneric")
    );
}

/// Path MTU discovery through direct server return: the client sits behind
/// a router whose link to it has MTU 1400 while the client's own is 1500, so
/// the backends' full-size replies make the router send "fragmentation
/// needed" / "packet too big" to the VIP. The balancer forwards those to the
/// backend that owns the flow, the backend lowers its path MTU, and a large
/// download completes (without that, it would stall).
#[test]
fn path_mtu_discovery_works_through_direct_server_return() {
    let lab = Lab::start(&LabSpec {
        router_mtu: Some(1400),
        ..LabSpec::weights(&[1, 1])
    })
    .expect("lab");
    for v6 in [false, true] {
        let addr = lab.vip_http(v6);
        let body = lab
            .in_client(move || -> anyhow::Result<usize> {
                let mut c = HttpConn::connect(addr)?;
                Ok(c.get("/bytes/2000000")?.1.len())
            })
            .unwrap()
            .unwrap_or_else(|e| panic!("IPv6 {v6}: the download stalled: {e}; {}", lab.logs()));
        assert_eq!(body, 2_000_000, "IPv6 {v6}");
    }
    let forwarded = lab
        .metric("lb_packets_total", &[("reason", "icmp_forwarded")])
        .unwrap();
    assert!(
        forwarded >= 2,
        "the router's ICMP errors went to the backends: {forwarded}"
    );
}
