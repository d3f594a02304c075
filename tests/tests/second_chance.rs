//! Flows survive table changes (the second chance, see
//! `lb_common::second_chance`), through the real lbd and `lbd decap` in the
//! lab: load steering moves the Maglev tables under a harsh load pattern
//! while flows lose their entries (a connection table far smaller than the
//! flows) or move to another balancer (one leaves the ECMP group and comes
//! back). Each scenario runs twice, with the second chance and without it
//! (today's baseline, `second_chance = false`), and prints both.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use lb_common::{DEFAULT_TABLE_SIZE, FlowKey, PROTO_TCP, addr_words, flow_hash64, maglev_position};
use lb_tests::{
    lab::{
        Lab, LabBackend, LabSpec,
        ecmp::EcmpLab,
        servers::{self, Control},
        traffic::{self, TrafficReport, TrafficSpec},
    },
    raise_fd_limit,
};

/// Load-aware weights from the backends' vLLM pages, scraped every second.
const LOAD: &str =
    "[vip.load]\nmetrics_port = 80\nscrape_interval = 1\nrecovery = 1\nstale_after = 3\n";
/// HTTP health checks, as in the scale-out tests.
const HEALTH: &str = "[vip.health]\ncheck = \"http\"\nport = 80\npath = \"/health\"\ninterval = 0.3\ntimeout = 0.3\nrise = 2\nfall = 2\n";

/// The two scenarios each run two labs with hundreds of connections: one
/// at a time, so neither measures the other's load.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The seed of the load pattern: `LB_SECOND_CHANCE_SEED` if set (to repeat
/// a scenario with other draws), else `default`.
fn seed(default: u64) -> u64 {
    std::env::var("LB_SECOND_CHANCE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// The `[[vip]]` keys of a run: the baseline turns the second chance off
/// (the key goes before the VIP's tables).
fn vip_keys(second_chance: bool, tables: &str) -> String {
    let key = if second_chance {
        ""
    } else {
        "second_chance = false\n"
    };
    format!("{key}{tables}")
}

/// The harsh load pattern: every 1.5 s, every backend's queue is redrawn
/// (0 to 8 waiting against the default `queue_limit` of 5, KV-cache use 5 %
/// to 75 %) from a seeded generator, until `stop`: at any time some
/// backends are over their limit and some under (all four over, when the
/// pool is saturated and base weights apply, is rare). Returns the number
/// of redraws.
fn harsh_load(controls: &[Arc<Control>], seed: u64, stop: &AtomicBool) -> u32 {
    let mut rng = seed | 1;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        (rng >> 11) as f64 / (1u64 << 53) as f64
    };
    let mut redraws = 0;
    while !stop.load(Ordering::Relaxed) {
        for c in controls {
            c.set_vllm(8.0 * next(), 0.05 + 0.7 * next());
        }
        redraws += 1;
        let until = Instant::now() + Duration::from_millis(1500);
        while Instant::now() < until && !stop.load(Ordering::Relaxed) {
            thread::sleep(Duration::from_millis(50));
        }
    }
    redraws
}

/// Every backend's queue even again.
fn even_load(controls: &[Arc<Control>]) {
    for c in controls {
        c.set_vllm(1.0, 0.2);
    }
}

/// What the backends' decapsulators counted, summed: (forwarded,
/// no_candidate, forward_failed).
fn decap_counts(backends: &[LabBackend]) -> (u64, u64, u64) {
    let sum = |reason: &str| -> u64 {
        backends
            .iter()
            .map(|b| b.decap_packets(reason).unwrap_or(0))
            .sum()
    };
    (sum("forwarded"), sum("no_candidate"), sum("forward_failed"))
}

/// The position of the TCP flow `local` → `target` in a Maglev table of
/// the default size (what the balancer computes from the packet).
fn position(local: SocketAddr, target: SocketAddr) -> usize {
    let (family, src) = addr_words(local.ip());
    let (_, dst) = addr_words(target.ip());
    let key = FlowKey {
        src,
        dst,
        ports: FlowKey::ports(local.port(), target.port()),
        proto: PROTO_TCP,
        family,
        _pad: [0; 2],
    };
    maglev_position((flow_hash64(&key) >> 32) as u32, DEFAULT_TABLE_SIZE) as usize
}

/// One run with entries lost: a 1024-slot connection table for 1,000
/// long-lived connections, load steering moving the table for 20 s.
struct LostRun {
    report: TrafficReport,
    evicted: u64,
    second_chance: u64,
    rebuilds: usize,
    decap: (u64, u64, u64),
}

fn lost_entries_run(second_chance: bool, seed: u64) -> LostRun {
    let lab = Lab::start(&LabSpec {
        vip_extra: vip_keys(second_chance, LOAD),
        conntrack: "size = 1024\n".into(),
        ..LabSpec::weights(&[1, 1, 1, 1])
    })
    .expect("lab");
    let controls = lab.controls();
    even_load(&controls);
    // The first reports in, and the tables they give.
    thread::sleep(Duration::from_secs(4));
    let spec = TrafficSpec {
        targets: vec![lab.vip_http(false), lab.vip_http(true)],
        long_lived: 1000,
        interval: Duration::from_millis(500),
        new_per_second: 20,
    };
    let rebuilds_before = lab.lbd_log().matches("Maglev table rebuilt").count();
    let stop = AtomicBool::new(false);
    let (redraws, report) = traffic::run(lab.client.name(), &spec, Duration::from_secs(1), || {
        thread::scope(|s| {
            let load = s.spawn(|| harsh_load(&controls, seed, &stop));
            thread::sleep(Duration::from_secs(20));
            stop.store(true, Ordering::Relaxed);
            load.join().expect("the load thread")
        })
    });
    let metric = |event: &str| {
        lab.metric("lb_conntrack_events_total", &[("event", event)])
            .unwrap_or(0)
    };
    let run = LostRun {
        evicted: metric("evicted"),
        second_chance: metric("second_chance"),
        rebuilds: lab.lbd_log().matches("Maglev table rebuilt").count() - rebuilds_before,
        decap: decap_counts(&lab.backends),
        report,
    };
    println!(
        "{}: {redraws} load redraws, {} table rebuilds, {} entries evicted, {} packets sent with a candidate; backends forwarded {}, no candidate {}, forward failed {}; {} of {} connections reset, {} broken\n{}",
        if second_chance {
            "second chance"
        } else {
            "baseline (second_chance = false)"
        },
        run.rebuilds,
        run.evicted,
        run.second_chance,
        run.decap.0,
        run.decap.1,
        run.decap.2,
        run.report.resets(),
        run.report.conns.len(),
        run.report.broken(),
        run.report.summary()
    );
    run
}

#[test]
fn flows_survive_lost_entries_while_load_moves_the_table() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    raise_fd_limit(16 * 1000);
    let seed = seed(0x5eed_0001);
    println!("load pattern seed {seed}");
    let ours = lost_entries_run(true, seed);
    let baseline = lost_entries_run(false, seed);
    println!(
        "reset connections of 1000: {} with the second chance, {} without (baseline)",
        ours.report.resets(),
        baseline.report.resets()
    );
    // The scenario is what it claims: entries were lost, the table moved.
    assert!(ours.evicted > 1000, "only {} evictions", ours.evicted);
    assert!(ours.rebuilds >= 5, "only {} rebuilds", ours.rebuilds);
    assert!(
        baseline.report.resets() > 0,
        "the baseline lost no connection: the scenario moved too little to prove anything"
    );
    // And with the second chance, nothing broke.
    assert!(ours.second_chance > 0 && ours.decap.0 > 0);
    assert_eq!(
        ours.report.failures(),
        Vec::<String>::new(),
        "{}",
        ours.report.summary()
    );
    assert_eq!(ours.report.resets(), 0);
}

/// The router's paths for `vip` (next hops).
fn wait_paths(lab: &EcmpLab, vip: IpAddr, want: usize) {
    let start = Instant::now();
    while lab.paths(vip).unwrap().len() != want {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the router did not get {want} paths for {vip}; logs:\n{}",
            lab.logs()
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// One scale-out run: two balancers, 300 long-lived connections, load
/// redrawn every 1.5 s; lb1 is killed 20 s later (its path withdrawn: its
/// flows reach lb2 without entries), and 10 s later starts again (adopting
/// its pinned state).
struct EcmpRun {
    report: TrafficReport,
    /// Connections whose position in lb2's table moved between their
    /// opening and lb1's leaving.
    moved: usize,
    /// Resets of connections whose backend lb2's own table gave when they
    /// opened (lb2's table moved over their life).
    own: usize,
    /// Resets of connections whose backend lb2's table did not give when
    /// they opened (the two balancers' tables disagreed).
    disagreed: usize,
    /// Entries of lb2's tables that differed from lb1's when the
    /// connections opened.
    differing: usize,
    second_chance: u64,
    decap: (u64, u64, u64),
}

fn ecmp_run(second_chance: bool, seed: u64) -> EcmpRun {
    let mut lab = EcmpLab::start(
        2,
        &[1, 1, 1, 1],
        &vip_keys(second_chance, &format!("{HEALTH}{LOAD}")),
    )
    .expect("lab");
    let controls = lab.controls();
    even_load(&controls);
    thread::sleep(Duration::from_secs(4));
    let spec = TrafficSpec {
        targets: vec![
            (IpAddr::from(lb_tests::lab::VIP_V4), servers::HTTP_PORT).into(),
            (IpAddr::from(lb_tests::lab::VIP_V6), servers::HTTP_PORT).into(),
        ],
        long_lived: 300,
        interval: Duration::from_millis(100),
        new_per_second: 20,
    };
    let client = lab.client.name().to_string();
    // lb2's tables around the moment the connections open: the load is
    // even and unchanged then, so they should hold still.
    let before = lab.tables(1).expect("lb2's tables");
    let stop = AtomicBool::new(false);
    let lab_ref = &mut lab;
    let ((after, lb1_tables, at_kill), report) =
        traffic::run(&client, &spec, Duration::from_secs(1), || {
            let after = lab_ref.tables(1).expect("lb2's tables");
            let lb1 = lab_ref.tables(0).expect("lb1's tables");
            let at_kill = thread::scope(|s| {
                let load = s.spawn(|| harsh_load(&controls, seed, &stop));
                thread::sleep(Duration::from_secs(20));
                let at_kill = lab_ref.tables(1).expect("lb2's tables");
                lab_ref.kill_balancer(0).expect("killing lb1");
                for vip in [lb_tests::lab::VIP_V4.into(), lb_tests::lab::VIP_V6.into()] {
                    wait_paths(lab_ref, vip, 1);
                }
                thread::sleep(Duration::from_secs(10));
                lab_ref.start_balancer(0).expect("starting lb1 again");
                for vip in [lb_tests::lab::VIP_V4.into(), lb_tests::lab::VIP_V6.into()] {
                    wait_paths(lab_ref, vip, 2);
                }
                thread::sleep(Duration::from_secs(3));
                stop.store(true, Ordering::Relaxed);
                load.join().expect("the load thread");
                at_kill
            });
            (after, lb1, at_kill)
        });
    // Each reset connection, by cause: did lb2's table give its backend
    // when it opened?
    let name_of = |addr: IpAddr| -> Option<String> {
        lab.backends
            .iter()
            .find(|b| IpAddr::from(b.v4) == addr || IpAddr::from(b.v6) == addr)
            .map(|b| b.name.clone())
    };
    let table_key = |target: SocketAddr| {
        let proto = PROTO_TCP;
        format!("{}:{}/{proto}", target.ip(), target.port())
    };
    let (mut own, mut disagreed) = (0, 0);
    for c in report.conns.iter().filter(|c| c.reset) {
        let (Some(local), Some(target)) = (c.local, c.target) else {
            continue;
        };
        let pos = position(local, target);
        let key = table_key(target);
        let gave = [&before, &after].iter().any(|t| {
            t.get(&key)
                .and_then(|(_, addrs)| addrs.get(pos))
                .and_then(|a| name_of(*a))
                .is_some_and(|n| n == c.backend)
        });
        if gave {
            own += 1;
        } else {
            disagreed += 1;
        }
    }
    // Connections whose position in lb2's table moved between their
    // opening and lb1's leaving: those lb2 sends elsewhere without the
    // second chance, if they were lb1's.
    let moved = report
        .conns
        .iter()
        .filter(|c| {
            let (Some(local), Some(target)) = (c.local, c.target) else {
                return false;
            };
            let (pos, key) = (position(local, target), table_key(target));
            let at = |t: &BTreeMap<String, lb_tests::lab::ecmp::Table>| {
                t.get(&key).and_then(|(_, a)| a.get(pos).copied())
            };
            at(&after) != at(&at_kill)
        })
        .count();
    let differing: usize = after
        .iter()
        .map(|(vip, (_, addrs))| {
            lb1_tables.get(vip).map_or(addrs.len(), |(_, other)| {
                addrs.iter().zip(other).filter(|(a, b)| a != b).count()
            })
        })
        .sum();
    // What lb2's table rebuilds moved and held.
    let log = lab.balancers[1].lbd_log();
    let field = |line: &str, name: &str| -> usize {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(name))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let rebuilds: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("Maglev table rebuilt") && l.contains("80/tcp"))
        .collect();
    println!(
        "lb2: {} rebuilds of the TCP VIPs' tables, {} positions moved, {} held",
        rebuilds.len(),
        rebuilds.iter().map(|l| field(l, "moved=")).sum::<usize>(),
        rebuilds.iter().map(|l| field(l, "held=")).sum::<usize>()
    );
    let metrics = lab.metrics(1).unwrap_or_default();
    let second = lb_tests::prom::value(
        &metrics,
        "lb_conntrack_events_total",
        &[("event", "second_chance")],
    )
    .unwrap_or(0.0) as u64;
    let run = EcmpRun {
        moved,
        own,
        disagreed,
        differing,
        second_chance: second,
        decap: decap_counts(&lab.backends),
        report,
    };
    println!(
        "{}: {} of the connections' positions in lb2's table moved before lb1 left; lb2 sent {} packets with a candidate; backends forwarded {}, no candidate {}, forward failed {}; the balancers' tables differed in {} entries when the connections opened; {} of {} connections reset: {} whose backend lb2's own table gave (its table moved), {} it did not (the tables disagreed)\n{}",
        if second_chance {
            "second chance"
        } else {
            "baseline (second_chance = false)"
        },
        run.moved,
        run.second_chance,
        run.decap.0,
        run.decap.1,
        run.decap.2,
        run.differing,
        run.report.resets(),
        run.report.conns.len(),
        run.own,
        run.disagreed,
        run.report.summary()
    );
    run
}

#[test]
fn flows_survive_a_balancer_leaving_and_coming_back_while_load_moves_the_tables() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    raise_fd_limit(16 * 300);
    let seed = seed(0x5eed_0002);
    println!("load pattern seed {seed}");
    let ours = ecmp_run(true, seed);
    let baseline = ecmp_run(false, seed);
    let mut by_cause = BTreeMap::new();
    by_cause.insert("second chance", (ours.own, ours.disagreed));
    by_cause.insert("baseline", (baseline.own, baseline.disagreed));
    println!("reset connections of 300 (table moved, tables disagreed): {by_cause:?}");
    assert!(
        baseline.own > 0,
        "no baseline connection lost its backend to a table move: the scenario moved too little to prove anything"
    );
    assert!(ours.second_chance > 0 && ours.decap.0 > 0);
    assert_eq!(
        ours.own,
        0,
        "connections whose backend lb2's own table gave were reset: {}",
        ours.report.summary()
    );
}
