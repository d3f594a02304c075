//! New flows spread over backends by weight, and a flow keeps its backend.

use std::{collections::BTreeMap, net::IpAddr};

use lb::desired::vip::Protocol;
use lb_common::xdp_action;
use lb_tests::{
    SplitMix,
    frames::{Flow, FrameSpec, parse_encapsulated},
    packet_lab::PacketLab,
};

const CONFIG: &str = r#"
[balancer]
source_v4 = "10.200.0.1"
max_vips = 2
max_backends = 8

[[vip]]
address = "203.0.113.10"
port = 443
protocol = "tcp"
backends = [
  { address = "10.200.0.11", weight = 1 },
  { address = "10.200.0.12", weight = 2 },
  { address = "10.200.0.13", weight = 3 },
]
"#;

const FLOWS: usize = 100_000;

#[test]
fn random_flows_follow_weights_one_two_three_and_stay_put() {
    let mut lab = PacketLab::new(CONFIG).unwrap();
    let mut rng = SplitMix(42);
    let mut flows = Vec::with_capacity(FLOWS);
    let mut landed: BTreeMap<IpAddr, usize> = BTreeMap::new();
    let mut first_choice = Vec::new();
    for i in 0..FLOWS {
        let f = Flow {
            src: IpAddr::from(rng.next_u32().to_be_bytes()),
            dst: "203.0.113.10".parse().unwrap(),
            sport: rng.next_u16().max(1),
            dport: 443,
            protocol: Protocol::Tcp,
        };
        let frame = lab.frame(&f, FrameSpec::default());
        let r = lab.run(&frame).unwrap();
        assert_eq!(r.action, xdp_action::XDP_TX);
        let backend = parse_encapsulated(&r.frame).unwrap().outer.dst();
        *landed.entry(backend).or_default() += 1;
        if i < 2000 {
            flows.push(frame);
            first_choice.push(backend);
        }
    }
    let shares: Vec<(String, f64)> = landed
        .iter()
        .map(|(b, n)| (b.to_string(), *n as f64 / FLOWS as f64))
        .collect();
    let want = [
        ("10.200.0.11", 1.0 / 6.0),
        ("10.200.0.12", 2.0 / 6.0),
        ("10.200.0.13", 3.0 / 6.0),
    ];
    assert_eq!(shares.len(), 3, "{shares:?}");
    for ((addr, got), (want_addr, want)) in shares.iter().zip(want) {
        assert_eq!(addr, want_addr);
        let off = (got - want).abs() / want;
        assert!(
            off <= 0.02,
            "{addr}: share {got:.4}, want {want:.4} (off by {:.2}%)",
            off * 100.0
        );
    }
    // Same flow, same backend, every time.
    for (frame, first) in flows.iter().zip(first_choice) {
        let r = lab.run(frame).unwrap();
        assert_eq!(parse_encapsulated(&r.frame).unwrap().outer.dst(), first);
    }
}
