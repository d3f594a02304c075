//! The backend-side decapsulator through `BPF_PROG_TEST_RUN`: it undoes
//! exactly what the balancer does, passes everything else untouched and
//! drops broken tunnels.

use std::net::IpAddr;

use lb::{dataplane::Decapsulator, desired::vip::Protocol};
use lb_common::{DecapReason, xdp_action};
use lb_tests::{
    SplitMix,
    frames::{Flow, FrameSpec, ip_packet, l2_len, parse_encapsulated},
    packet_lab::PacketLab,
    require_root,
    xdp::run_xdp,
};

const CONFIG: &str = r#"
[balancer]
source_v4 = "10.200.0.1"
source_v6 = "fd00:200::1"
max_vips = 4
max_backends = 8

[[vip]]
address = "203.0.113.10"
port = 80
protocol = "tcp"
backends = [ { address = "10.200.0.11" } ]

[[vip]]
address = "2001:db8:10::1"
port = 53
protocol = "udp"
backends = [ { address = "fd00:200::31" } ]

[[vip]]
address = "203.0.113.30"
port = 80
protocol = "tcp"
backends = [ { address = "fd00:200::31" } ]
"#;

struct Rig {
    lab: PacketLab,
    decap: Decapsulator,
    rng: SplitMix,
}

impl Rig {
    fn new() -> Rig {
        require_root();
        let lab = PacketLab::new(CONFIG).unwrap();
        let mut decap = Decapsulator::load().unwrap();
        let local: Vec<IpAddr> = ["10.200.0.11", "fd00:200::31"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        decap.set_addresses(&local).unwrap();
        Rig {
            lab,
            decap,
            rng: SplitMix(11),
        }
    }

    fn decap(&mut self, frame: &[u8]) -> lb_tests::xdp::RunResult {
        run_xdp(self.decap.program().unwrap(), frame, 0, 1).unwrap()
    }

    /// A frame to `dst:port` and what the balancer made of it.
    fn encapsulated(
        &mut self,
        dst: &str,
        port: u16,
        protocol: Protocol,
        spec: FrameSpec,
    ) -> (Vec<u8>, Vec<u8>) {
        let src: IpAddr = if dst.contains(':') {
            format!("2001:db8:99::{:x}", self.rng.next_u16())
                .parse()
                .unwrap()
        } else {
            IpAddr::from([198, 18, 0, (self.rng.next_u16() % 250) as u8 + 1])
        };
        let f = Flow {
            src,
            dst: dst.parse().unwrap(),
            sport: 1024 + self.rng.next_u16() % 60000,
            dport: port,
            protocol,
        };
        let frame = self.lab.frame(&f, spec);
        let r = self.lab.run(&frame).unwrap();
        assert_eq!(r.action, xdp_action::XDP_TX);
        (frame, r.frame)
    }

    fn counters(&self) -> [u64; 4] {
        self.decap.counters().unwrap()
    }
}

#[test]
fn decapsulation_undoes_the_balancer_exactly() {
    let mut rig = Rig::new();
    let cases = [
        ("203.0.113.10", 80, Protocol::Tcp, None),
        ("2001:db8:10::1", 53, Protocol::Udp, None),
        ("203.0.113.30", 80, Protocol::Tcp, None),
        ("203.0.113.10", 80, Protocol::Tcp, Some(99)),
        ("2001:db8:10::1", 53, Protocol::Udp, Some(100)),
    ];
    for (dst, port, proto, vlan) in cases {
        for payload in [0usize, 1, 100, 1000] {
            let spec = FrameSpec {
                vlan,
                payload: vec![0x77; payload],
                ..Default::default()
            };
            let (original, encapsulated) = rig.encapsulated(dst, port, proto, spec);
            let outer = parse_encapsulated(&encapsulated).unwrap();
            let r = rig.decap(&encapsulated);
            assert_eq!(r.action, xdp_action::XDP_PASS, "{dst} vlan {vlan:?}");
            // Same L2 header as the encapsulated frame, the inner ether type,
            // then the client's packet exactly.
            assert_eq!(l2_len(&r.frame), l2_len(&original));
            assert_eq!(r.frame[..12], encapsulated[..12], "MACs kept");
            assert_eq!(
                r.frame[l2_len(&r.frame) - 2..l2_len(&r.frame)],
                original[l2_len(&original) - 2..l2_len(&original)]
            );
            assert_eq!(
                ip_packet(&r.frame),
                ip_packet(&original),
                "{dst} vlan {vlan:?} payload {payload}"
            );
            assert_eq!(outer.vlan_tci.is_some(), vlan.is_some());
        }
    }
    assert_eq!(rig.counters()[DecapReason::Decapsulated as usize], 20);
}

#[test]
fn other_traffic_passes_untouched() {
    let mut rig = Rig::new();
    let mut frames = Vec::new();
    // Plain TCP to the backend, ARP, and a tunnel to somebody else.
    let f = Flow {
        src: "198.18.0.1".parse().unwrap(),
        dst: "10.200.0.11".parse().unwrap(),
        sport: 1000,
        dport: 22,
        protocol: Protocol::Tcp,
    };
    let plain = lb_tests::frames::build(&f, &FrameSpec::default());
    frames.push((plain.clone(), DecapReason::NotTunnel));
    let mut arp = plain.clone();
    arp[12..14].copy_from_slice(&[0x08, 0x06]);
    frames.push((arp, DecapReason::NotTunnel));
    let (_, mut elsewhere) =
        rig.encapsulated("203.0.113.10", 80, Protocol::Tcp, FrameSpec::default());
    elsewhere[14 + 19] = 99; // outer destination 10.200.0.99 (checksum is not ours to check)
    frames.push((elsewhere, DecapReason::NotLocal));
    let (_, mut elsewhere6) =
        rig.encapsulated("2001:db8:10::1", 53, Protocol::Udp, FrameSpec::default());
    elsewhere6[14 + 39] = 0x99;
    frames.push((elsewhere6, DecapReason::NotLocal));
    for (frame, reason) in &frames {
        let r = rig.decap(frame);
        assert_eq!(r.action, xdp_action::XDP_PASS, "{reason:?}");
        assert_eq!(&r.frame, frame, "{reason:?}: untouched");
    }
    let c = rig.counters();
    assert_eq!(c[DecapReason::NotTunnel as usize], 2);
    assert_eq!(c[DecapReason::NotLocal as usize], 2);
}

#[test]
fn broken_tunnels_to_this_host_are_dropped() {
    let mut rig = Rig::new();
    let (_, v4) = rig.encapsulated(
        "203.0.113.10",
        80,
        Protocol::Tcp,
        FrameSpec {
            payload: vec![1; 20],
            ..Default::default()
        },
    );
    let (_, v6) = rig.encapsulated(
        "2001:db8:10::1",
        53,
        Protocol::Udp,
        FrameSpec {
            payload: vec![1; 20],
            ..Default::default()
        },
    );
    let mut cases: Vec<(&str, Vec<u8>)> = Vec::new();
    let mut f = v4.clone();
    f[14 + 20] = 0x65; // inner version 6 under protocol 4
    cases.push(("inner version does not match the outer protocol", f));
    let mut f = v4.clone();
    f[14 + 6] = 0x20; // outer "more fragments"
    cases.push(("outer fragment", f));
    let mut f = v4.clone();
    let tot = u16::from_be_bytes([f[16], f[17]]) + 100;
    f[16..18].copy_from_slice(&tot.to_be_bytes());
    cases.push(("outer length beyond the frame", f));
    let mut f = v4.clone();
    let inner_tot = u16::from_be_bytes([f[36], f[37]]) - 4;
    f[36..38].copy_from_slice(&inner_tot.to_be_bytes());
    cases.push(("inner length short of the outer payload", f));
    let mut f = v6.clone();
    f[14 + 40] = 0x45; // inner version 4 under next header 41
    cases.push(("IPv6 outer, wrong inner version", f));
    let mut f = v6.clone();
    let pl = u16::from_be_bytes([f[18], f[19]]) + 8;
    f[18..20].copy_from_slice(&pl.to_be_bytes());
    cases.push(("IPv6 outer length beyond the frame", f));
    for (what, frame) in &cases {
        assert_eq!(rig.decap(frame).action, xdp_action::XDP_DROP, "{what}");
    }
    assert_eq!(
        rig.counters()[DecapReason::Malformed as usize],
        cases.len() as u64
    );

    // Every truncation: a drop once the outer destination (ours) is readable,
    // a pass before that; never aborted.
    for frame in [&v4, &v6] {
        let dst_end = if frame[12..14] == [0x08, 0x00] {
            14 + 20
        } else {
            14 + 40
        };
        for len in 14..frame.len() {
            let r = rig.decap(&frame[..len]);
            let want = if len < dst_end {
                DecapReason::NotTunnel
            } else {
                DecapReason::Malformed
            };
            assert_eq!(r.action, want.action(), "cut to {len} of {}", frame.len());
        }
    }
}
