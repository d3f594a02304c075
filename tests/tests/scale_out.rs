//! Scale-out: several balancers behind a router with ECMP, the VIPs
//! announced over BGP through BIRD.
//!
//! - BIRD accepts the config lbd renders (both families, BFD).
//! - Balancers with the same config build the same Maglev tables, also
//!   after different histories of changes.
//! - Lab: two balancers peer with a BIRD router; long-lived TCP connections
//!   spread over both; one balancer stops (its VIPs withdrawn, its data
//!   plane and connection table removed) and comes back: no connection
//!   breaks or changes backend. When every backend fails its health check
//!   the VIPs are withdrawn, and announced again when they recover.

use std::{
    collections::BTreeSet,
    net::IpAddr,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use lb::{
    desired::config,
    host::bgp::{self, BgpNeighbor, BgpSettings, BirdPaths, ShutdownPolicy},
};
use lb_tests::{
    lab::{
        VIP_V4, VIP_V6,
        ecmp::EcmpLab,
        servers::{self, HealthMode},
        traffic::{self, TrafficSpec},
    },
    packet_lab::PacketLab,
    raise_fd_limit,
};

#[test]
fn bird_accepts_the_config_lbd_writes() {
    let dir = tempfile_dir("bird-config");
    let settings = BgpSettings {
        router_id: "10.0.0.1".parse().unwrap(),
        local_as: 65010,
        neighbors: vec![
            BgpNeighbor {
                address: "10.0.0.254".parse().unwrap(),
                remote_as: 65000,
                port: 179,
            },
            BgpNeighbor {
                address: "fd00::fe".parse().unwrap(),
                remote_as: 65010,
                port: 1179,
            },
        ],
        hold_time: 9,
        bfd: true,
        bird_dir: Some(dir.clone()),
        bird_binary: "bird".into(),
        start_bird: true,
        on_shutdown: ShutdownPolicy::Withdraw,
        dead_after: std::time::Duration::from_secs(10),
    };
    let paths = BirdPaths { dir: dir.clone() };
    for prefixes in [
        BTreeSet::new(),
        ["203.0.113.10", "203.0.113.11", "2001:db8::1"]
            .iter()
            .map(|s| s.parse::<IpAddr>().unwrap())
            .collect(),
    ] {
        let text = bgp::render(&settings, &paths, "t", &prefixes);
        let file = dir.join("bird.conf");
        std::fs::write(&file, &text).unwrap();
        let out = Command::new("bird")
            .arg("-p")
            .arg("-c")
            .arg(&file)
            .output()
            .expect("running bird (cargo xtask setup installs bird2)");
        assert!(
            out.status.success(),
            "bird rejected:\n{text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fn tempfile_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("lbt-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

const CONFIG: &str = r#"
[balancer]
source_v4 = "10.200.0.1"
source_v6 = "fd00:200::1"
max_vips = 8
max_backends = 64

[[vip]]
address = "203.0.113.10"
port = 80
protocol = "tcp"
backends = [
  { address = "10.200.0.11", weight = 100 },
  { address = "10.200.0.12", weight = 200 },
  { address = "10.200.0.13", weight = 100 },
  { address = "10.200.0.14", weight = 50 },
]

[[vip]]
address = "2001:db8:10::1"
port = 0
protocol = "udp"
backends = [
  { address = "fd00:200::21", weight = 1 },
  { address = "fd00:200::22", weight = 3 },
]
"#;

#[test]
fn balancers_with_the_same_config_build_the_same_tables() {
    let want = config::parse(CONFIG, "t").unwrap();
    // Balancer A: straight from the config.
    let a = PacketLab::new(CONFIG).unwrap();
    // Balancer B: a different history first (backends in another order,
    // one that came and went, other weights), then the same config.
    let mut b = PacketLab::new(CONFIG).unwrap();
    let mut other = want.clone();
    other.vips[0].backends.reverse();
    other.vips[0].backends.push(lb::desired::vip::Backend::new(
        "10.200.0.15".parse().unwrap(),
        70,
    ));
    other.vips[0].backends[1].weight = 10;
    other.vips[1].backends.reverse();
    b.dp.sync(&other.vips).unwrap();
    let mut reordered = want.vips.clone();
    for v in &mut reordered {
        v.backends.reverse();
    }
    b.dp.sync(&reordered).unwrap();
    for v in &want.vips {
        let ta = a.dp.table_addresses(&v.addr).unwrap();
        let tb = b.dp.table_addresses(&v.addr).unwrap();
        assert_eq!(ta.len(), lb_common::DEFAULT_TABLE_SIZE as usize);
        let differing = ta.iter().zip(&tb).filter(|(x, y)| x != y).count();
        assert_eq!(differing, 0, "{}: {differing} entries differ", v.addr);
    }
}

fn wait_until(what: &str, lab: &EcmpLab, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what};\n{}",
            lab.logs()
        );
        thread::sleep(Duration::from_millis(100));
    }
}

const HEALTH: &str = "[vip.health]\ncheck = \"http\"\nport = 80\npath = \"/health\"\ninterval = 0.3\ntimeout = 0.3\nrise = 2\nfall = 2\n";

/// The router's next hops for `vip`, read in the router's namespace
/// `router` (for a thread that samples while the lab is busy).
fn paths_of(router: &str, vip: IpAddr) -> Vec<IpAddr> {
    let family = if vip.is_ipv6() { "-6" } else { "-4" };
    let out = Command::new("ip")
        .args([
            "-n",
            router,
            family,
            "route",
            "show",
            "exact",
            &vip.to_string(),
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let words: Vec<&str> = text.split_whitespace().collect();
    words
        .windows(2)
        .filter(|w| w[0] == "via")
        .filter_map(|w| w[1].parse().ok())
        .collect()
}

/// Long-lived connections over both VIPs and new ones, through the router.
fn ecmp_traffic() -> TrafficSpec {
    TrafficSpec {
        targets: vec![
            (IpAddr::from(VIP_V4), servers::HTTP_PORT).into(),
            (IpAddr::from(VIP_V6), servers::HTTP_PORT).into(),
        ],
        long_lived: 300,
        interval: Duration::from_millis(100),
        new_per_second: 50,
    }
}

#[test]
fn flows_survive_a_balancer_leaving_and_coming_back() {
    raise_fd_limit(16 * 300);
    let mut lab = EcmpLab::start(2, &[1, 1, 1, 1], HEALTH).unwrap();
    let (lb1, lb2) = (
        IpAddr::from(lab.balancers[0].v4),
        IpAddr::from(lab.balancers[1].v4),
    );
    assert_eq!(lab.paths(VIP_V4.into()).unwrap(), vec![lb1, lb2]);

    // The same config gives byte-identical tables in both balancers' maps.
    let (t1, t2) = (lab.tables(0).unwrap(), lab.tables(1).unwrap());
    assert_eq!(t1.len(), 4, "{:?}", t1.keys());
    for (vip, (raw, addrs)) in &t1 {
        let (raw2, addrs2) = &t2[vip];
        assert!(raw == raw2, "{vip}: the tables' bytes differ");
        assert_eq!(addrs, addrs2, "{vip}");
        assert_eq!(addrs.len(), lb_common::DEFAULT_TABLE_SIZE as usize);
    }

    // What BIRD says, on /metrics: the IPv4 session with the router is
    // established (the router has the path) and exports the VIP address.
    let text = lab.metrics(0).unwrap();
    let samples = lb_tests::prom::samples(&text);
    let v4 = |name: &str| {
        samples
            .iter()
            .find(|s| s.name == name && s.labels.get("neighbor").is_some_and(|n| n.contains('.')))
            .unwrap_or_else(|| panic!("no {name} for the IPv4 router:\n{text}"))
            .value
    };
    println!(
        "BIRD: up {:?}, IPv4 session up {}, routes exported {}",
        lb_tests::prom::value(&text, "lb_bgp_bird_up", &[]),
        v4("lb_bgp_session_up"),
        v4("lb_bgp_routes_exported")
    );
    assert_eq!(
        lb_tests::prom::value(&text, "lb_bgp_bird_up", &[]),
        Some(1.0)
    );
    assert_eq!(v4("lb_bgp_session_up"), 1.0);
    assert!(v4("lb_bgp_routes_exported") >= 1.0);
    for vip in [IpAddr::from(VIP_V4), IpAddr::from(VIP_V6)] {
        assert_eq!(
            lb_tests::prom::value(&text, "lb_bgp_announced", &[("address", &vip.to_string())]),
            Some(1.0),
            "{vip}"
        );
    }

    // Traffic flows while lb1 leaves for good (SIGTERM, then `lbd
    // --cleanup`: its VIPs withdrawn, its data plane and connection table
    // gone) and comes back with an empty connection table: the flows ECMP
    // moves are scheduled by the same Maglev tables on the other balancer.
    let client = lab.client.name().to_string();
    let (figures, report) = traffic::run(&client, &ecmp_traffic(), Duration::from_secs(1), || {
        let (f1, f2) = (lab.forwarded(0).unwrap(), lab.forwarded(1).unwrap());
        let started = Instant::now();
        lab.stop_balancer(0).unwrap();
        wait_until("the router to drop lb1's path", &lab, || {
            lab.paths(VIP_V4.into()).unwrap() == vec![lb2]
                && lab.paths(VIP_V6.into()).unwrap().len() == 1
        });
        let converged = started.elapsed();
        thread::sleep(Duration::from_secs(1));
        let before = lab.forwarded(1).unwrap();
        thread::sleep(Duration::from_secs(1));
        let alone = lab.forwarded(1).unwrap() - before;
        lab.start_balancer(0).unwrap();
        wait_until("the router to use lb1 again", &lab, || {
            lab.paths(VIP_V4.into()).unwrap() == vec![lb1, lb2]
                && lab.paths(VIP_V6.into()).unwrap().len() == 2
        });
        let before = lab.forwarded(0).unwrap();
        thread::sleep(Duration::from_secs(1));
        let back = lab.forwarded(0).unwrap() - before;
        (f1, f2, converged, alone, back)
    });
    let (f1, f2, converged, alone, back) = figures;
    println!(
        "before: lb1 forwarded {f1}, lb2 {f2}; lb1 left: path withdrawn in {:.0} ms, lb2 alone forwarded {alone} packets in 1 s; lb1 back: {back} packets in 1 s",
        converged.as_secs_f64() * 1000.0
    );
    println!("{}", report.summary());
    let total = (f1 + f2) as f64;
    assert!(
        f1 as f64 > total * 0.2 && f2 as f64 > total * 0.2,
        "ECMP should spread the flows: lb1 forwarded {f1}, lb2 {f2}"
    );
    assert_eq!(report.per_backend().len(), 4, "{}", report.summary());
    assert_eq!(
        report.failures(),
        Vec::<String>::new(),
        "{}",
        report.summary()
    );
    assert_eq!(report.moved(), 0, "{}", report.summary());
    assert!(alone >= 2000, "lb2 forwarded only {alone} packets alone");
    assert!(back > 0, "no flow went back to lb1");

    // Every backend fails its health check: both balancers withdraw, the
    // router has no path; they recover: announced again.
    for i in 0..lab.backends.len() {
        lab.control(i).set_health(HealthMode::Down);
    }
    wait_until("both balancers to withdraw the VIPs", &lab, || {
        lab.paths(VIP_V4.into()).unwrap().is_empty() && lab.paths(VIP_V6.into()).unwrap().is_empty()
    });
    for i in 0..lab.backends.len() {
        lab.control(i).set_health(HealthMode::Up);
    }
    lab.wait_paths(2).unwrap();
}

#[test]
fn a_restart_stays_announced_a_killed_lbd_is_withdrawn_and_flows_survive_both() {
    raise_fd_limit(16 * 300);
    let mut lab = EcmpLab::start(2, &[1, 1, 1, 1], "").unwrap();
    // Three backends in service; b4 joins at the end.
    for i in 0..2 {
        lab.set_backends(i, &[Some(1), Some(1), Some(1), None])
            .unwrap();
    }
    let router = lab.router.name().to_string();
    let client = lab.client.name().to_string();
    let dead_after = Duration::from_secs(lb_tests::lab::ecmp::DEAD_AFTER_SECS);
    let (figures, report) = traffic::run(&client, &ecmp_traffic(), Duration::from_secs(1), || {
        // A planned restart of lb1: the router keeps both paths throughout
        // (sampled every 20 ms).
        let stop = std::sync::atomic::AtomicBool::new(false);
        let fewest = thread::scope(|s| {
            let sampler = s.spawn(|| {
                let mut fewest = usize::MAX;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    fewest = fewest.min(paths_of(&router, VIP_V4.into()).len());
                    thread::sleep(Duration::from_millis(20));
                }
                fewest
            });
            lab.restart_balancer(0).unwrap();
            // As long again as the restart took a guard's dead_after.
            thread::sleep(dead_after + Duration::from_secs(1));
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            sampler.join().unwrap()
        });
        // SIGKILL: lb1's data plane keeps forwarding; its BIRD guard
        // withdraws it once no lbd ran for dead_after.
        let killed = Instant::now();
        lab.kill_balancer(0).unwrap();
        wait_until("the router to drop the killed lb1", &lab, || {
            paths_of(&router, VIP_V4.into()).len() == 1
                && paths_of(&router, VIP_V6.into()).len() == 1
        });
        let withdrawn = killed.elapsed();
        thread::sleep(Duration::from_secs(1));
        lab.start_balancer(0).unwrap();
        lab.wait_paths(2).unwrap();
        thread::sleep(Duration::from_secs(1));
        // b4 joins on both: Maglev moves some flows' entries, the
        // connection tables keep them where they are.
        lab.set_backends(0, &[Some(1), Some(1), Some(1), Some(1)])
            .unwrap();
        lab.set_backends(1, &[Some(1), Some(1), Some(1), Some(1)])
            .unwrap();
        (fewest, withdrawn)
    });
    let (fewest, withdrawn) = figures;
    println!(
        "planned restart: fewest paths seen {fewest}; SIGKILL: withdrawn after {:.0} ms (dead_after {} s); {}",
        withdrawn.as_secs_f64() * 1000.0,
        dead_after.as_secs(),
        report.summary()
    );
    assert_eq!(fewest, 2, "the planned restart withdrew the balancer");
    assert!(
        withdrawn >= dead_after,
        "withdrawn before dead_after: {withdrawn:?}"
    );
    assert!(
        withdrawn < dead_after + Duration::from_secs(2),
        "a dead lbd stayed announced {withdrawn:?}"
    );
    assert_eq!(
        report.failures(),
        Vec::<String>::new(),
        "{}",
        report.summary()
    );
    assert_eq!(report.moved(), 0, "{}", report.summary());
    assert!(
        report.longest_gap() < Duration::from_secs(1),
        "{}",
        report.summary()
    );
    assert!(
        report.new_per_backend.contains_key("b4"),
        "{:?}",
        report.new_per_backend
    );
    let guard = std::fs::read_to_string(lab.balancers[0].bird_dir().join("guard.log")).unwrap();
    assert!(
        guard.contains("BIRD no longer announces its VIPs"),
        "{guard}"
    );
}
