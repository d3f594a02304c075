//! The balancer's packets through `BPF_PROG_TEST_RUN`: what comes out for
//! what goes in, byte by byte, and which reason each packet counts.

use std::net::IpAddr;

use lb::vip::Protocol;
use lb_common::{Reason, xdp_action};
use lb_tests::{
    SplitMix,
    frames::{Flow, FrameSpec, Outer, ip_packet, l2_len, parse_encapsulated},
    packet_lab::{LAB_V4, LAB_V6, PacketLab, backend_mac},
};

const CONFIG: &str = r#"
[balancer]
source_v4 = "10.200.0.1"
source_v6 = "fd00:200::1"
mtu = 1500
max_vips = 8
max_backends = 64

[[vip]]
address = "203.0.113.10"
port = 80
protocol = "tcp"
backends = [
  { address = "10.200.0.11", weight = 1 },
  { address = "10.200.0.12", weight = 1 },
  { address = "10.200.0.13", weight = 1 },
]

[[vip]]
address = "203.0.113.10"
port = 53
protocol = "udp"
backends = [
  { address = "10.200.0.21", weight = 1 },
  { address = "10.200.0.22", weight = 1 },
]

[[vip]]
address = "2001:db8:10::1"
port = 443
protocol = "tcp"
backends = [
  { address = "fd00:200::31", weight = 1 },
  { address = "fd00:200::32", weight = 1 },
]

[[vip]]
address = "2001:db8:10::1"
port = 53
protocol = "udp"
backends = [
  { address = "fd00:200::41", weight = 1 },
  { address = "fd00:200::42", weight = 1 },
]

[[vip]]
address = "203.0.113.20"
port = 0
protocol = "tcp"
backends = [ { address = "10.200.0.51", weight = 1 } ]

[[vip]]
address = "203.0.113.30"
port = 80
protocol = "tcp"
backends = [ { address = "fd00:200::61", weight = 1 } ]

[[vip]]
address = "203.0.113.40"
port = 80
protocol = "tcp"
backends = [ { address = "10.200.0.71", weight = 0 } ]
"#;

fn lab() -> PacketLab {
    PacketLab::new(CONFIG).expect("packet lab")
}

fn flow(rng: &mut SplitMix, src_v6: bool, dst: &str, dport: u16, protocol: Protocol) -> Flow {
    let src: IpAddr = if src_v6 {
        let mut o = [0u8; 16];
        o[..4].copy_from_slice(&[0x20, 0x01, 0x0d, 0xb8]);
        o[4..12].copy_from_slice(&rng.next_u64().to_be_bytes());
        o[15] = 1;
        IpAddr::from(o)
    } else {
        IpAddr::from((0xc612_0000u32 | (rng.next_u32() & 0x1_ffff)).to_be_bytes())
    };
    Flow {
        src,
        dst: dst.parse().unwrap(),
        sport: 1024 + rng.next_u16() % 60000,
        dport,
        protocol,
    }
}

/// Runs `frame` and checks it came out as a correct encapsulation to the
/// backend user space computes; returns the backend.
fn assert_forwarded(lab: &mut PacketLab, f: &Flow, frame: &[u8]) -> IpAddr {
    let r = lab.run(frame).unwrap();
    if r.action != xdp_action::XDP_TX {
        panic!(
            "{f:?}: verdict {}, counters {:?}",
            r.action,
            lab.dp.counters().unwrap().reasons
        );
    }
    let want = lab
        .dp
        .backend_for(&f.key())
        .expect("user space finds a backend");
    let e = parse_encapsulated(&r.frame).unwrap();
    assert_eq!(
        e.outer.dst(),
        want,
        "outer destination is the Maglev backend for {f:?}"
    );
    assert_eq!(
        e.dst_mac,
        backend_mac(want),
        "destination MAC from the FIB (neighbour)"
    );
    assert_eq!(
        e.src_mac, lab.if_mac,
        "source MAC from the FIB (our interface)"
    );
    assert_eq!(e.inner, ip_packet(frame), "inner packet byte-identical");
    let inner_proto = if f.src.is_ipv4() { 4 } else { 41 };
    match e.outer {
        Outer::V4 {
            src,
            proto,
            ttl,
            tot_len,
            checksum_ok,
            ihl,
            ..
        } => {
            assert_eq!(src.to_string(), LAB_V4);
            assert_eq!(proto, inner_proto);
            assert_eq!(ttl, 64);
            assert_eq!(ihl, 5);
            assert_eq!(tot_len as usize, 20 + ip_packet(frame).len());
            assert!(checksum_ok, "outer IPv4 checksum");
        }
        Outer::V6 {
            src,
            next_header,
            hop_limit,
            payload_len,
            ..
        } => {
            assert_eq!(src.to_string(), LAB_V6);
            assert_eq!(next_header, inner_proto);
            assert_eq!(hop_limit, 64);
            assert_eq!(payload_len as usize, ip_packet(frame).len());
        }
    }
    assert_eq!(
        e.vlan_tci.is_some(),
        l2_len(frame) == 18,
        "VLAN tag kept as it came"
    );
    want
}

#[test]
fn vip_traffic_is_encapsulated_to_the_backend_user_space_computes() {
    let mut lab = lab();
    let mut rng = SplitMix(1);
    let cases = [
        (false, "203.0.113.10", 80, Protocol::Tcp),
        (false, "203.0.113.10", 53, Protocol::Udp),
        (true, "2001:db8:10::1", 443, Protocol::Tcp),
        (true, "2001:db8:10::1", 53, Protocol::Udp),
    ];
    for (v6, dst, port, proto) in cases {
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..64 {
            let f = flow(&mut rng, v6, dst, port, proto);
            let frame = lab.frame(
                &f,
                FrameSpec {
                    payload: vec![0xab; 100],
                    ..Default::default()
                },
            );
            seen.insert(assert_forwarded(&mut lab, &f, &frame));
        }
        assert!(
            seen.len() >= 2,
            "64 flows to {dst}:{port} all went to one backend: {seen:?}"
        );
    }
    let c = lab.dp.counters().unwrap();
    assert_eq!(c.reason(Reason::Forwarded), 4 * 64);
    assert_eq!(c.packets_seen(), 4 * 64);
}

#[test]
fn vlan_tagged_and_ipv4_options_frames_are_forwarded() {
    let mut lab = lab();
    let mut rng = SplitMix(2);
    for _ in 0..16 {
        let f = flow(&mut rng, false, "203.0.113.10", 80, Protocol::Tcp);
        let tagged = lab.frame(
            &f,
            FrameSpec {
                vlan: Some(42),
                payload: vec![1; 33],
                ..Default::default()
            },
        );
        assert_forwarded(&mut lab, &f, &tagged);
        let r = lab.run(&tagged).unwrap();
        assert_eq!(
            parse_encapsulated(&r.frame)
                .unwrap()
                .vlan_tci
                .map(|t| t & 0x0fff),
            Some(42)
        );

        let options = FrameSpec {
            ipv4_options: vec![1, 1, 1, 0, 0x94, 4, 0, 0],
            payload: vec![2; 7],
            ..Default::default()
        };
        let with_options = lab.frame(&f, options.clone());
        assert_eq!(with_options[14] & 0x0f, 7, "IHL 7");
        assert_forwarded(&mut lab, &f, &with_options);

        let v6 = flow(&mut rng, true, "2001:db8:10::1", 443, Protocol::Tcp);
        let tagged6 = lab.frame(
            &v6,
            FrameSpec {
                vlan: Some(4000),
                ..Default::default()
            },
        );
        assert_forwarded(&mut lab, &v6, &tagged6);
    }
}

#[test]
fn ipv4_vip_with_ipv6_backend_is_sent_in_ipv6() {
    let mut lab = lab();
    let mut rng = SplitMix(3);
    let f = flow(&mut rng, false, "203.0.113.30", 80, Protocol::Tcp);
    let frame = lab.frame(&f, FrameSpec::default());
    let backend = assert_forwarded(&mut lab, &f, &frame);
    assert_eq!(backend.to_string(), "fd00:200::61");
}

#[test]
fn port_zero_vip_takes_every_port_of_its_address() {
    let mut lab = lab();
    let mut rng = SplitMix(4);
    for port in [1, 22, 80, 443, 8080, 65535] {
        let f = flow(&mut rng, false, "203.0.113.20", port, Protocol::Tcp);
        let frame = lab.frame(&f, FrameSpec::default());
        assert_eq!(
            assert_forwarded(&mut lab, &f, &frame).to_string(),
            "10.200.0.51"
        );
    }
    // Not UDP: the port-0 VIP is TCP only.
    let f = flow(&mut rng, false, "203.0.113.20", 53, Protocol::Udp);
    let frame = lab.frame(&f, FrameSpec::default());
    assert_eq!(lab.run(&frame).unwrap().action, xdp_action::XDP_PASS);
}

/// Passes and drops: frame, expected reason. The verdict is the reason's.
#[test]
fn traffic_that_is_not_for_a_vip_passes_untouched() {
    let mut lab = lab();
    let mut rng = SplitMix(5);
    let mut frames: Vec<(&str, Vec<u8>, Reason)> = Vec::new();
    let other_addr = flow(&mut rng, false, "203.0.113.99", 80, Protocol::Tcp);
    frames.push((
        "other address",
        lab.frame(&other_addr, FrameSpec::default()),
        Reason::NotVip,
    ));
    let other_port = flow(&mut rng, false, "203.0.113.10", 81, Protocol::Tcp);
    frames.push((
        "other port",
        lab.frame(&other_port, FrameSpec::default()),
        Reason::NotVip,
    ));
    let other_proto = flow(&mut rng, false, "203.0.113.10", 80, Protocol::Udp);
    frames.push((
        "other protocol",
        lab.frame(&other_proto, FrameSpec::default()),
        Reason::NotVip,
    ));
    let v6 = flow(&mut rng, true, "2001:db8:10::99", 443, Protocol::Tcp);
    frames.push((
        "other IPv6 address",
        lab.frame(&v6, FrameSpec::default()),
        Reason::NotVip,
    ));

    let vip_frame = lab.frame(
        &flow(&mut rng, false, "203.0.113.10", 80, Protocol::Tcp),
        FrameSpec::default(),
    );
    let mut icmp = vip_frame.clone();
    icmp[14 + 9] = 1; // ICMP
    frames.push(("ICMP to a VIP", icmp, Reason::NotTcpUdp));
    let mut arp = vip_frame.clone();
    arp[12..14].copy_from_slice(&[0x08, 0x06]);
    frames.push(("ARP", arp, Reason::NotIp));
    let mut qinq = lab.frame(
        &flow(&mut rng, false, "203.0.113.10", 80, Protocol::Tcp),
        FrameSpec {
            vlan: Some(5),
            ..Default::default()
        },
    );
    qinq[16..18].copy_from_slice(&[0x81, 0x00]);
    frames.push(("second VLAN tag", qinq, Reason::NotIp));
    let mut fragment = vip_frame.clone();
    fragment[14 + 6] = 0x20; // more fragments
    frames.push(("IPv4 fragment", fragment, Reason::Fragment));
    let mut later_fragment = vip_frame.clone();
    later_fragment[14 + 7] = 0x10; // offset 16 * 8
    frames.push(("IPv4 later fragment", later_fragment, Reason::Fragment));
    let mut ext = lab.frame(
        &flow(&mut rng, true, "2001:db8:10::1", 443, Protocol::Tcp),
        FrameSpec::default(),
    );
    ext[14 + 6] = 0; // hop-by-hop options first
    frames.push(("IPv6 extension header", ext, Reason::Ipv6ExtHeader));

    for (what, frame, reason) in &frames {
        let r = lab.run(frame).unwrap();
        assert_eq!(r.action, xdp_action::XDP_PASS, "{what}");
        assert_eq!(&r.frame, frame, "{what}: passes byte-identical");
    }
    let c = lab.dp.counters().unwrap();
    for reason in Reason::ALL {
        let want = frames.iter().filter(|(_, _, r)| *r == reason).count() as u64;
        assert_eq!(c.reason(reason), want, "{reason:?}");
    }
}

#[test]
fn drops_have_their_reasons() {
    let mut lab = lab();
    let mut rng = SplitMix(6);
    // All weights 0: no backend.
    let f = flow(&mut rng, false, "203.0.113.40", 80, Protocol::Tcp);
    let frame = lab.frame(&f, FrameSpec::default());
    assert_eq!(lab.run(&frame).unwrap().action, xdp_action::XDP_DROP);
    assert_eq!(lab.dp.counters().unwrap().reason(Reason::NoBackend), 1);

    // Too big once encapsulated: 1480 + 20 fits 1500, 1481 + 20 does not.
    let f = flow(&mut rng, false, "203.0.113.10", 80, Protocol::Tcp);
    let fits = lab.frame(
        &f,
        FrameSpec {
            payload: vec![0; 1480 - 40],
            ..Default::default()
        },
    );
    assert_eq!(ip_packet(&fits).len(), 1480);
    assert_forwarded(&mut lab, &f, &fits);
    let too_big = lab.frame(
        &f,
        FrameSpec {
            payload: vec![0; 1481 - 40],
            ..Default::default()
        },
    );
    assert_eq!(lab.run(&too_big).unwrap().action, xdp_action::XDP_DROP);
    assert_eq!(lab.dp.counters().unwrap().reason(Reason::TooBig), 1);

    // No neighbour towards the backend: the FIB lookup fails.
    let backend = lab.dp.backend_for(&f.key()).unwrap();
    lab.forget_neighbour(backend).unwrap();
    let frame = lab.frame(&f, FrameSpec::default());
    assert_eq!(lab.run(&frame).unwrap().action, xdp_action::XDP_DROP);
    assert_eq!(lab.dp.counters().unwrap().reason(Reason::FibFailed), 1);
}
