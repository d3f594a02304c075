//! The per-VIP schedulers through the real program (`BPF_PROG_TEST_RUN`):
//! how new flows spread under each, and established flows staying put when a
//! VIP's scheduler or weights change.

use std::{collections::BTreeMap, net::IpAddr};

use lb::{
    desired::config,
    desired::vip::{Protocol, Scheduler, Vip},
};
use lb_common::xdp_action;
use lb_tests::{
    SplitMix,
    frames::{Flow, FrameSpec, parse_encapsulated},
    packet_lab::PacketLab,
    pin_to_cpu,
};

/// One VIP per scheduler, each over three backends weighted 1:2:3.
const CONFIG: &str = r#"
[balancer]
source_v4 = "10.200.0.1"
max_vips = 8
max_backends = 32

[[vip]]
address = "203.0.113.10"
port = 443
protocol = "tcp"
scheduler = "maglev-src"
backends = [
  { address = "10.200.0.11", weight = 1 },
  { address = "10.200.0.12", weight = 2 },
  { address = "10.200.0.13", weight = 3 },
]

[[vip]]
address = "203.0.113.11"
port = 443
protocol = "tcp"
scheduler = "maglev-src"
hash_fields = "address-port"
backends = [
  { address = "10.200.0.11", weight = 1 },
  { address = "10.200.0.12", weight = 2 },
  { address = "10.200.0.13", weight = 3 },
]

[[vip]]
address = "203.0.113.12"
port = 443
protocol = "tcp"
scheduler = "wrr"
backends = [
  { address = "10.200.0.11", weight = 1 },
  { address = "10.200.0.12", weight = 2 },
  { address = "10.200.0.13", weight = 3 },
]

[[vip]]
address = "203.0.113.13"
port = 443
protocol = "tcp"
scheduler = "least-load"
backends = [
  { address = "10.200.0.11", weight = 1 },
  { address = "10.200.0.12", weight = 1 },
  { address = "10.200.0.13", weight = 1 },
]

[[vip]]
address = "203.0.113.14"
port = 443
protocol = "tcp"
backends = [
  { address = "10.200.0.11", weight = 1 },
  { address = "10.200.0.12", weight = 2 },
  { address = "10.200.0.13", weight = 3 },
]
"#;

const B1: &str = "10.200.0.11";
const B2: &str = "10.200.0.12";
const B3: &str = "10.200.0.13";

fn lab() -> PacketLab {
    pin_to_cpu(0);
    PacketLab::new(CONFIG).unwrap()
}

fn flow(src: u32, sport: u16, vip: &str) -> Flow {
    Flow {
        src: IpAddr::from(src.to_be_bytes()),
        dst: vip.parse().unwrap(),
        sport,
        dport: 443,
        protocol: Protocol::Tcp,
    }
}

/// Sends one packet of `f`; returns the backend it was encapsulated to.
fn send(lab: &mut PacketLab, f: &Flow) -> IpAddr {
    let r = lab.run(&lab.frame(f, FrameSpec::default())).unwrap();
    assert_eq!(r.action, xdp_action::XDP_TX, "{f:?}");
    parse_encapsulated(&r.frame).unwrap().outer.dst()
}

fn shares(landed: &BTreeMap<IpAddr, usize>) -> BTreeMap<String, f64> {
    let total: usize = landed.values().sum();
    landed
        .iter()
        .map(|(b, n)| (b.to_string(), *n as f64 / total as f64))
        .collect()
}

/// Each share within `tolerance` (relative) of weights 1:2:3.
fn assert_one_two_three(landed: &BTreeMap<IpAddr, usize>, tolerance: f64, what: &str) {
    let got = shares(landed);
    for (addr, want) in [(B1, 1.0 / 6.0), (B2, 2.0 / 6.0), (B3, 3.0 / 6.0)] {
        let share = got.get(addr).copied().unwrap_or(0.0);
        let off = (share - want).abs() / want;
        assert!(
            off <= tolerance,
            "{what}: {addr} got {share:.4}, want {want:.4} (off by {:.2}%): {got:?}",
            off * 100.0
        );
    }
}

#[test]
fn maglev_src_sends_every_flow_of_a_client_to_one_backend() {
    let mut lab = lab();
    let mut rng = SplitMix(81);
    let mut landed = BTreeMap::new();
    for client in 0..30_000 {
        let src = rng.next_u32();
        let first = send(
            &mut lab,
            &flow(src, 1024 + rng.next_u16() % 60000, "203.0.113.10"),
        );
        *landed.entry(first).or_default() += 1;
        if client < 200 {
            // More connections of the same client, other ports: same backend.
            for _ in 0..10 {
                let f = flow(src, 1024 + rng.next_u16() % 60000, "203.0.113.10");
                assert_eq!(send(&mut lab, &f), first, "client {src:#x}");
            }
        }
    }
    // Clients spread by weight (sampling noise of 30k clients: ~1%).
    assert_one_two_three(&landed, 0.05, "maglev-src, clients");

    // With the source port hashed too, one client's flows spread.
    let src = rng.next_u32();
    let mut one_client = BTreeMap::new();
    for port in 0..3000u16 {
        *one_client
            .entry(send(&mut lab, &flow(src, 1024 + port, "203.0.113.11")))
            .or_default() += 1;
    }
    assert_one_two_three(&one_client, 0.1, "maglev-src address-port, one client");
    // And the same (address, port) always lands on the same backend.
    let f = flow(src, 5000, "203.0.113.11");
    let b = send(&mut lab, &f);
    let g = Flow { dport: 443, ..f };
    assert_eq!(send(&mut lab, &g), b);
}

#[test]
fn wrr_spreads_new_flows_exactly_by_weight_without_bursts() {
    let mut lab = lab();
    let mut rng = SplitMix(82);
    let mut landed = BTreeMap::new();
    let mut sequence = Vec::new();
    for _ in 0..12_000 {
        let f = flow(
            rng.next_u32(),
            1024 + rng.next_u16() % 60000,
            "203.0.113.12",
        );
        let b = send(&mut lab, &f);
        *landed.entry(b).or_default() += 1;
        sequence.push(b);
    }
    assert_one_two_three(&landed, 0.02, "wrr");
    // Smooth: in any 60 consecutive new flows, each backend gets its share
    // give or take a few (no run of one backend).
    for window in sequence.windows(60).step_by(37) {
        for (addr, want) in [(B1, 10i64), (B2, 20), (B3, 30)] {
            let got = window.iter().filter(|b| b.to_string() == addr).count() as i64;
            assert!((got - want).abs() <= 3, "{addr}: {got} of 60 in a window");
        }
    }
}

#[test]
fn least_load_sends_most_new_flows_away_from_a_high_score() {
    let mut lab = lab();
    let mut rng = SplitMix(83);
    let vip = "203.0.113.13:443/tcp".parse().unwrap();
    let mut count = |lab: &mut PacketLab, n: usize| {
        let mut landed = BTreeMap::new();
        for _ in 0..n {
            let f = flow(
                rng.next_u32(),
                1024 + rng.next_u16() % 60000,
                "203.0.113.13",
            );
            *landed.entry(send(lab, &f)).or_default() += 1;
        }
        shares(&landed)
    };
    // Equal scores: as Maglev, a third each.
    let even = count(&mut lab, 9000);
    for b in [B1, B2, B3] {
        assert!((even[b] - 1.0 / 3.0).abs() < 0.03, "{even:?}");
    }
    // B1 busy: it only gets flows whose two choices are both B1 (1/9).
    lab.dp
        .set_scores(&vip, &BTreeMap::from([(B1.parse().unwrap(), 1_000_000)]))
        .unwrap();
    let busy = count(&mut lab, 9000);
    assert!(busy[B1] < 0.15, "B1 busy: {busy:?}");
    assert!(busy[B2] > 0.4 && busy[B3] > 0.4, "{busy:?}");
}

/// Established flows keep their backends when the VIP's scheduler or its
/// weights change; new flows follow the new scheduler.
#[test]
fn established_flows_stay_put_when_the_scheduler_or_weights_change() {
    let mut lab = lab();
    let mut rng = SplitMix(84);
    let mut vips: Vec<Vip> = config::parse(CONFIG, "t").unwrap().vips;
    let plain = vips
        .iter()
        .position(|v| v.addr.addr.to_string() == "203.0.113.14")
        .unwrap();
    let flows: Vec<Flow> = (0..600)
        .map(|_| {
            flow(
                rng.next_u32(),
                1024 + rng.next_u16() % 60000,
                "203.0.113.14",
            )
        })
        .collect();
    let first: Vec<IpAddr> = flows.iter().map(|f| send(&mut lab, f)).collect();
    type Edit = Box<dyn Fn(&mut Vip)>;
    let changes: [(&str, Edit); 4] = [
        (
            "to wrr",
            Box::new(|v: &mut Vip| v.scheduler = Scheduler::Wrr),
        ),
        (
            "to least-load",
            Box::new(|v: &mut Vip| v.scheduler = Scheduler::LeastLoad),
        ),
        (
            "to maglev-src",
            Box::new(|v: &mut Vip| v.scheduler = Scheduler::MaglevSrc { with_port: false }),
        ),
        (
            "weights 6:2:1",
            Box::new(|v: &mut Vip| {
                for (b, w) in v.backends.iter_mut().zip([6, 2, 1]) {
                    b.weight = w;
                }
            }),
        ),
    ];
    for (what, change) in changes {
        change(&mut vips[plain]);
        lab.dp.sync(&vips).unwrap();
        for (f, b) in flows.iter().zip(&first) {
            assert_eq!(send(&mut lab, f), *b, "{what}: an established flow moved");
        }
    }
    // New flows follow the last scheduler (maglev-src) and weights 6:2:1.
    let mut landed: BTreeMap<IpAddr, usize> = BTreeMap::new();
    for _ in 0..9000 {
        let f = flow(rng.next_u32(), 1024, "203.0.113.14");
        *landed.entry(send(&mut lab, &f)).or_default() += 1;
    }
    let got = shares(&landed);
    assert!((got[B1] - 6.0 / 9.0).abs() < 0.03, "{got:?}");
}
