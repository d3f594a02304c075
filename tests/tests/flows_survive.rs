//! Flows survive change, with real TCP in the lab: established connections
//! keep working while backends are removed, added and drained (config
//! reloads), and while lbd restarts.

use std::{
    collections::BTreeMap,
    sync::{
        Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::Duration,
};

use lb_tests::{
    lab::{
        Lab, LabSpec,
        client::{HttpConn, http_get},
    },
    raise_fd_limit,
};

const CONNECTIONS: usize = 1000;

/// Sends one request on every connection; each must be answered by the same
/// backend as before.
fn all_continue(lab: &Lab, conns: &mut BTreeMap<usize, (HttpConn, String)>, step: &str) {
    lab.in_client(|| {
        for (i, (conn, backend)) in conns.iter_mut() {
            let (now, _) = conn
                .get("/")
                .unwrap_or_else(|e| panic!("{step}: connection {i} on {backend} broke: {e:#}"));
            assert_eq!(&now, backend, "{step}: connection {i} moved");
        }
    })
    .unwrap();
}

fn new_connections(lab: &Lab, n: usize) -> BTreeMap<String, usize> {
    let addr = lab.vip_http(false);
    lab.in_client(|| {
        let mut per = BTreeMap::new();
        for _ in 0..n {
            *per.entry(http_get(addr).unwrap()).or_default() += 1;
        }
        per
    })
    .unwrap()
}

#[test]
fn established_connections_survive_remove_add_and_drain() {
    raise_fd_limit(8192);
    let lab = Lab::start(&LabSpec::weights(&[1, 1, 1, 1, 1])).unwrap();
    // Four backends in service; b5 stands by outside the config.
    lab.set_backends(&[Some(1), Some(1), Some(1), Some(1), None])
        .unwrap();
    let addr = lab.vip_http(false);
    let mut conns: BTreeMap<usize, (HttpConn, String)> = lab
        .in_client(|| {
            (0..CONNECTIONS)
                .map(|i| {
                    let mut c = HttpConn::connect(addr).unwrap();
                    let (backend, _) = c.get("/").unwrap();
                    (i, (c, backend))
                })
                .collect()
        })
        .unwrap();
    let on = |conns: &BTreeMap<usize, (HttpConn, String)>, b: &str| {
        conns.values().filter(|(_, x)| x == b).count()
    };
    for b in ["b1", "b2", "b3", "b4"] {
        assert!(
            on(&conns, b) > 150,
            "{b} has {} of {CONNECTIONS}",
            on(&conns, b)
        );
    }

    // Remove b4: every connection on the other three keeps working.
    lab.set_backends(&[Some(1), Some(1), Some(1), None, None])
        .unwrap();
    conns.retain(|_, (_, b)| b != "b4");
    all_continue(&lab, &mut conns, "after removing b4");

    // Add b5: no established connection moves; new ones reach b5.
    lab.set_backends(&[Some(1), Some(1), Some(1), None, Some(1)])
        .unwrap();
    all_continue(&lab, &mut conns, "after adding b5");
    assert!(
        new_connections(&lab, 200).contains_key("b5"),
        "new connections reach the added backend"
    );

    // Drain b1 (weight 0): its connections continue, it gets no new ones.
    let on_b1 = on(&conns, "b1");
    lab.set_backends(&[Some(0), Some(1), Some(1), None, Some(1)])
        .unwrap();
    all_continue(&lab, &mut conns, "after draining b1");
    assert!(on_b1 > 0);
    let fresh = new_connections(&lab, 300);
    assert!(
        !fresh.contains_key("b1"),
        "a drained backend took new connections: {fresh:?}"
    );
}

#[test]
fn restarting_lbd_breaks_no_connection() {
    let lab = Lab::start(&LabSpec::weights(&[1, 1, 2])).unwrap();
    let addr = lab.vip_http(false);
    let forwarded_before = lab
        .metric("lb_packets_total", &[("reason", "forwarded")])
        .unwrap();
    let stop = AtomicBool::new(false);
    let (new_ok, new_failed) = (AtomicU64::new(0), AtomicU64::new(0));
    let long_lived: Mutex<Vec<String>> = Mutex::new(Vec::new());
    thread::scope(|s| {
        let client = &lab.client;
        s.spawn(|| {
            lb_tests::lab::in_ns(client, || {
                let mut conn = HttpConn::connect(addr).unwrap();
                while !stop.load(Ordering::Relaxed) {
                    let (b, _) = conn.get("/").expect("the long-lived connection broke");
                    long_lived.lock().unwrap().push(b);
                    thread::sleep(Duration::from_millis(5));
                }
            })
            .unwrap();
        });
        s.spawn(|| {
            lb_tests::lab::in_ns(client, || {
                while !stop.load(Ordering::Relaxed) {
                    match http_get(addr) {
                        Ok(_) => new_ok.fetch_add(1, Ordering::Relaxed),
                        Err(_) => new_failed.fetch_add(1, Ordering::Relaxed),
                    };
                }
            })
            .unwrap();
        });
        thread::sleep(Duration::from_millis(300));
        for _ in 0..2 {
            lab.restart_lbd().unwrap();
            thread::sleep(Duration::from_millis(300));
        }
        stop.store(true, Ordering::Relaxed);
    });
    let long = long_lived.into_inner().unwrap();
    assert!(
        long.len() > 50,
        "{} requests on the long-lived connection",
        long.len()
    );
    assert!(
        long.iter().all(|b| *b == long[0]),
        "the long-lived connection changed backend"
    );
    assert_eq!(
        new_failed.load(Ordering::Relaxed),
        0,
        "new connections failed across restarts"
    );
    assert!(new_ok.load(Ordering::Relaxed) > 100);
    let forwarded_after = lab
        .metric("lb_packets_total", &[("reason", "forwarded")])
        .unwrap();
    assert!(
        forwarded_after > forwarded_before,
        "counters survived the restarts ({forwarded_before} -> {forwarded_after})"
    );
}
