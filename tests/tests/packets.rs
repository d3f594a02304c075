//! The balancer's packets through `BPF_PROG_TEST_RUN`: what comes out for
//! what goes in, byte by byte, and which reason each packet counts.

use std::net::IpAddr;

use lb::desired::vip::Protocol;
use lb_common::{Reason, xdp_action};
use lb_tests::{
    SplitMix,
    frames::{self, CLIENT_MAC, Flow, FrameSpec, Outer, ip_packet, l2_len, parse_encapsulated},
    packet_lab::{LAB_V4, LAB_V6, PacketLab, backend_mac},
};

const CONFIG: &str = r#"
[balancer]
source_v4 = "10.200.0.1"
source_v6 = "fd00:200::1"
mtu = 1500
max_vips = 8
max_backends = 64
# These tests check the plain verdicts; tests/robustness.rs the ICMP answers
# and the fragment policy.
too_big = "drop"
fragments = "pass"

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
    ext[14 + 6] = 51; // an authentication header first
    frames.push(("IPv6 extension header", ext, Reason::Ipv6ExtHeader));

    for (what, frame, reason) in &frames {
        let r = lab.run(frame).unwrap();
        assert_eq!(
            reason.action(),
            xdp_action::XDP_PASS,
            "{what}: {reason:?} is a pass reason"
        );
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

    // No neighbour towards the backend: once the next-hop cache starts a
    // new generation (lbd does every second), the FIB lookup fails.
    let backend = lab.dp.backend_for(&f.key()).unwrap();
    lab.forget_neighbour(backend).unwrap();
    lab.dp.refresh_next_hops().unwrap();
    let frame = lab.frame(&f, FrameSpec::default());
    assert_eq!(lab.run(&frame).unwrap().action, xdp_action::XDP_DROP);
    assert_eq!(lab.dp.counters().unwrap().reason(Reason::FibFailed), 1);
}

/// The next hop comes from the FIB, is cached per CPU, and a new cache
/// generation picks up a changed neighbour.
#[test]
fn next_hop_follows_the_neighbour_table_after_a_refresh() {
    // The cache is per CPU: stay on one.
    lb_tests::pin_to_cpu(0);
    let mut lab = lab();
    let mut rng = SplitMix(10);
    let f = flow(&mut rng, false, "203.0.113.10", 80, Protocol::Tcp);
    let frame = lab.frame(&f, FrameSpec::default());
    let backend = assert_forwarded(&mut lab, &f, &frame);
    let moved = "02:be:aa:bb:cc:dd";
    lab.ns
        .ip(&[
            "neigh",
            "replace",
            &backend.to_string(),
            "lladdr",
            moved,
            "dev",
            "lb0",
            "nud",
            "permanent",
        ])
        .unwrap();
    // Same generation: the cached MAC.
    let r = lab.run(&frame).unwrap();
    assert_eq!(
        parse_encapsulated(&r.frame).unwrap().dst_mac,
        backend_mac(backend)
    );
    // New generation: the FIB's new answer.
    lab.dp.refresh_next_hops().unwrap();
    let r = lab.run(&frame).unwrap();
    assert_eq!(
        parse_encapsulated(&r.frame).unwrap().dst_mac,
        [0x02, 0xbe, 0xaa, 0xbb, 0xcc, 0xdd]
    );
    // With the cache off, every packet asks the FIB.
    lab.dp.set_nexthop_cache(false).unwrap();
    lab.forget_neighbour(backend).unwrap();
    assert_eq!(lab.run(&frame).unwrap().action, xdp_action::XDP_DROP);
}

/// Every prefix of a frame, from 14 bytes up to one byte short of the whole
/// frame, is truncated somewhere in its headers or payload: it must get the
/// reason the docs give (malformed → drop, or not_ip → pass for non-IP),
/// never `XDP_ABORTED`, and count exactly once.
#[test]
fn every_truncation_gives_its_documented_verdict() {
    let mut lab = lab();
    let mut rng = SplitMix(7);
    let payload = FrameSpec {
        payload: vec![0x5a; 8],
        ..Default::default()
    };
    let tagged = |vlan| FrameSpec {
        vlan: Some(vlan),
        ..payload.clone()
    };
    let with_options = FrameSpec {
        ipv4_options: vec![1, 1, 1, 1, 1, 1, 1, 0],
        ..payload.clone()
    };
    let v4_tcp = flow(&mut rng, false, "203.0.113.10", 80, Protocol::Tcp);
    let v4_udp = flow(&mut rng, false, "203.0.113.10", 53, Protocol::Udp);
    let v6_tcp = flow(&mut rng, true, "2001:db8:10::1", 443, Protocol::Tcp);
    let v6_udp = flow(&mut rng, true, "2001:db8:10::1", 53, Protocol::Udp);
    let mut arp = lab.frame(&v4_tcp, payload.clone());
    arp[12..14].copy_from_slice(&[0x08, 0x06]);
    let bases: Vec<(&str, Vec<u8>, Reason)> = vec![
        (
            "IPv4 TCP",
            lab.frame(&v4_tcp, payload.clone()),
            Reason::Malformed,
        ),
        (
            "IPv4 UDP",
            lab.frame(&v4_udp, payload.clone()),
            Reason::Malformed,
        ),
        (
            "IPv6 TCP",
            lab.frame(&v6_tcp, payload.clone()),
            Reason::Malformed,
        ),
        (
            "IPv6 UDP",
            lab.frame(&v6_udp, payload.clone()),
            Reason::Malformed,
        ),
        (
            "VLAN IPv4 TCP",
            lab.frame(&v4_tcp, tagged(7)),
            Reason::Malformed,
        ),
        (
            "VLAN IPv6 UDP",
            lab.frame(&v6_udp, tagged(8)),
            Reason::Malformed,
        ),
        (
            "IPv4 options TCP",
            lab.frame(&v4_tcp, with_options),
            Reason::Malformed,
        ),
        ("ARP", arp, Reason::NotIp),
    ];
    let mut expected = [0u64; lb_common::REASON_COUNT as usize];
    for (what, frame, reason) in &bases {
        for len in 14..frame.len() {
            let r = lab.run(&frame[..len]).unwrap();
            assert_ne!(
                r.action,
                xdp_action::XDP_ABORTED,
                "{what} cut to {len} bytes"
            );
            assert_eq!(r.action, reason.action(), "{what} cut to {len} bytes");
            expected[*reason as usize] += 1;
            let got = lab.dp.counters().unwrap().reasons;
            assert_eq!(
                got, expected,
                "{what} cut to {len} bytes counts one {reason:?}"
            );
        }
        // The whole frame is fine.
        let r = lab.run(frame).unwrap();
        let whole = if *reason == Reason::NotIp {
            Reason::NotIp
        } else {
            Reason::Forwarded
        };
        assert_eq!(r.action, whole.action(), "{what} whole");
        expected[whole as usize] += 1;
    }
}

/// A bad header that is complete is malformed too.
#[test]
fn invalid_headers_are_dropped_as_malformed() {
    let mut lab = lab();
    let mut rng = SplitMix(8);
    let v4 = lab.frame(
        &flow(&mut rng, false, "203.0.113.10", 80, Protocol::Tcp),
        FrameSpec::default(),
    );
    let v6 = lab.frame(
        &flow(&mut rng, true, "2001:db8:10::1", 443, Protocol::Tcp),
        FrameSpec::default(),
    );
    let mut cases: Vec<(&str, Vec<u8>)> = Vec::new();
    let mut f = v4.clone();
    f[14] = 0x44; // IHL 4 (< 5)
    cases.push(("IHL below 5", f));
    let mut f = v4.clone();
    f[14] = 0x4f; // IHL 15: 60 bytes of header, longer than the packet
    cases.push(("IHL beyond the packet", f));
    let mut f = v4.clone();
    f[14] = 0x65; // version 6 behind an IPv4 ether type
    cases.push(("wrong IP version", f));
    let mut f = v4.clone();
    f[16..18].copy_from_slice(&2000u16.to_be_bytes());
    cases.push(("IPv4 total length beyond the frame", f));
    let mut f = v4.clone();
    f[16..18].copy_from_slice(&30u16.to_be_bytes());
    cases.push(("IPv4 total length shorter than the TCP header", f));
    let mut f = v6.clone();
    f[18..20].copy_from_slice(&4u16.to_be_bytes());
    cases.push(("IPv6 payload shorter than the TCP header", f));
    let mut f = v6.clone();
    f[18..20].copy_from_slice(&3000u16.to_be_bytes());
    cases.push(("IPv6 payload length beyond the frame", f));
    for (what, frame) in &cases {
        let r = lab.run(frame).unwrap();
        assert_eq!(r.action, xdp_action::XDP_DROP, "{what}");
    }
    assert_eq!(
        lab.dp.counters().unwrap().reason(Reason::Malformed),
        cases.len() as u64
    );
}

/// Per-VIP and per-backend packets and bytes equal exactly what was sent;
/// the reasons add up to every frame.
#[test]
fn counters_equal_the_packets_and_bytes_sent() {
    let mut lab = lab();
    let mut rng = SplitMix(9);
    let targets = [
        ("203.0.113.10", 80, Protocol::Tcp, false),
        ("2001:db8:10::1", 53, Protocol::Udp, true),
    ];
    let mut want_vip = std::collections::BTreeMap::new();
    let mut want_backend = std::collections::BTreeMap::new();
    let mut sent = 0u64;
    for (dst, port, proto, v6) in targets {
        for i in 0..200 {
            let f = flow(&mut rng, v6, dst, port, proto);
            let frame = lab.frame(
                &f,
                FrameSpec {
                    payload: vec![0; i * 5],
                    ..Default::default()
                },
            );
            let backend = assert_forwarded(&mut lab, &f, &frame);
            let vip = lb::desired::vip::VipAddr {
                addr: f.dst,
                port,
                protocol: proto,
            };
            let v = want_vip.entry(vip).or_insert((0u64, 0u64));
            v.0 += 1;
            v.1 += frame.len() as u64;
            let b = want_backend.entry((vip, backend)).or_insert((0u64, 0u64));
            b.0 += 1;
            b.1 += frame.len() as u64;
            sent += 1;
        }
    }
    for i in 0..50 {
        let f = flow(&mut rng, false, "198.51.100.1", 80 + i, Protocol::Tcp);
        lab.run(&lab.frame(&f, FrameSpec::default())).unwrap();
    }
    let c = lab.dp.counters().unwrap();
    for (vip, (packets, bytes)) in &want_vip {
        assert_eq!(
            (c.vips[vip].packets, c.vips[vip].bytes),
            (*packets, *bytes),
            "{vip}"
        );
    }
    for (key, (packets, bytes)) in &want_backend {
        assert_eq!(
            (c.backends[key].packets, c.backends[key].bytes),
            (*packets, *bytes),
            "{key:?}"
        );
    }
    let unused: u64 = c
        .backends
        .iter()
        .filter(|(k, _)| !want_backend.contains_key(k))
        .map(|(_, v)| v.packets)
        .sum();
    assert_eq!(unused, 0, "no other backend counted anything");
    assert_eq!(c.reason(Reason::Forwarded), sent);
    assert_eq!(c.reason(Reason::NotVip), 50);
    assert_eq!(c.packets_seen(), sent + 50);
}

/// `frame` with its TCP data offset (in 32-bit words) set to `words`.
fn with_tcp_data_offset(frame: &[u8], words: u8) -> Vec<u8> {
    let mut f = frame.to_vec();
    let l4 = l2_len(frame)
        + if frame[l2_len(frame)] >> 4 == 4 {
            20
        } else {
            40
        };
    f[l4 + 12] = (words << 4) | (f[l4 + 12] & 0x0f);
    f
}

/// `frame` with its UDP length field set to `len`.
fn with_udp_length(frame: &[u8], len: u16) -> Vec<u8> {
    let mut f = frame.to_vec();
    let l4 = l2_len(frame)
        + if frame[l2_len(frame)] >> 4 == 4 {
            20
        } else {
            40
        };
    f[l4 + 4..l4 + 6].copy_from_slice(&len.to_be_bytes());
    f
}

/// A TCP data offset below 5 or beyond the packet, a UDP length that is not
/// the datagram's (0, shorter, longer): malformed, dropped, on the fast
/// path (untagged IPv4) and the general one (VLAN, IPv6) alike. A TCP header
/// with options and a UDP length that is exact are forwarded.
#[test]
fn invalid_tcp_and_udp_headers_are_dropped_as_malformed() {
    let mut lab = lab();
    let mut rng = SplitMix(11);
    let payload = |vlan| FrameSpec {
        vlan,
        payload: vec![7; 12],
        ..Default::default()
    };
    let mut cases: Vec<(String, Vec<u8>)> = Vec::new();
    let mut fine: Vec<(String, Flow, Vec<u8>)> = Vec::new();
    for (v6, dst, tcp, udp) in [
        (false, "203.0.113.10", 80, 53),
        (true, "2001:db8:10::1", 443, 53),
    ] {
        for vlan in [None, Some(9)] {
            let what = format!("{dst} vlan {vlan:?}");
            let t = flow(&mut rng, v6, dst, tcp, Protocol::Tcp);
            let tcp_frame = lab.frame(&t, payload(vlan));
            for words in [0, 4] {
                cases.push((
                    format!("{what}: TCP data offset {words}"),
                    with_tcp_data_offset(&tcp_frame, words),
                ));
            }
            // 20 header bytes and 12 of payload: 9 words is one too many.
            cases.push((
                format!("{what}: TCP data offset beyond the packet"),
                with_tcp_data_offset(&tcp_frame, 9),
            ));
            fine.push((
                format!("{what}: TCP with 12 bytes of options"),
                t,
                with_tcp_data_offset(&tcp_frame, 8),
            ));
            let u = flow(&mut rng, v6, dst, udp, Protocol::Udp);
            let udp_frame = lab.frame(&u, payload(vlan));
            for len in [0, 7, 8, 10, 19, 21, 2000] {
                cases.push((
                    format!("{what}: UDP length {len} of 20"),
                    with_udp_length(&udp_frame, len),
                ));
            }
            fine.push((format!("{what}: UDP length 20"), u, udp_frame));
        }
    }
    for (what, frame) in &cases {
        let r = lab.run(frame).unwrap();
        assert_eq!(r.action, xdp_action::XDP_DROP, "{what}");
    }
    let c = lab.dp.counters().unwrap();
    println!(
        "{} invalid TCP/UDP headers: {} malformed, {} forwarded",
        cases.len(),
        c.reason(Reason::Malformed),
        c.reason(Reason::Forwarded)
    );
    assert_eq!(c.reason(Reason::Malformed), cases.len() as u64);
    assert_eq!(c.packets_seen(), cases.len() as u64);
    for (what, f, frame) in &fine {
        println!("forwarded: {what}");
        assert_forwarded(&mut lab, f, frame);
    }
}

/// A packet the balancer calls malformed never reaches the connection
/// table: a reset with a bad TCP header does not end its flow's entry, so
/// after the VIP's table changed the flow still goes to its backend.
#[test]
fn a_malformed_reset_does_not_move_its_flow() {
    let mut lab = lab();
    let mut rng = SplitMix(12);
    let flows: Vec<Flow> = (0..100)
        .map(|_| flow(&mut rng, false, "203.0.113.10", 80, Protocol::Tcp))
        .collect();
    let first: Vec<IpAddr> = flows
        .iter()
        .map(|f| {
            let frame = lab.frame(f, FrameSpec::default());
            assert_forwarded(&mut lab, f, &frame)
        })
        .collect();
    for f in &flows {
        let mut rst = with_tcp_data_offset(&lab.frame(f, FrameSpec::default()), 4);
        rst[14 + 20 + 13] = 0x04;
        assert_eq!(lab.run(&rst).unwrap().action, xdp_action::XDP_DROP);
    }
    // A heavy fourth backend: Maglev now sends many of these flows elsewhere.
    let heavy: IpAddr = "10.200.0.14".parse().unwrap();
    lab.add_neighbour(heavy).unwrap();
    let mut vip = lb::desired::config::parse(CONFIG, "t").unwrap().vips[0].clone();
    vip.backends
        .push(lb::desired::vip::Backend::new(heavy, 300));
    lab.dp.set_vip(&vip).unwrap();
    let moved_by_table = flows
        .iter()
        .zip(&first)
        .filter(|(f, b)| lab.dp.backend_for(&f.key()) != Some(**b))
        .count();
    assert!(
        moved_by_table > 20,
        "the new table moves {moved_by_table} of 100"
    );
    let stayed = flows
        .iter()
        .zip(&first)
        .filter(|(f, b)| {
            let frame = lab.frame(f, FrameSpec::default());
            lab.run(&frame)
                .is_ok_and(|r| parse_encapsulated(&r.frame).is_ok_and(|e| e.outer.dst() == **b))
        })
        .count();
    println!(
        "{moved_by_table} of 100 flows would move with the new table; {stayed} kept their backend"
    );
    assert_eq!(stayed, 100);
}

/// Frames to a VIP address that are not addressed to the balancer's MAC (a
/// switch flooded them, or they are broadcast or multicast) also reach the
/// host they are for: they pass untouched (`not_our_mac`), never to a
/// backend, whatever they carry. A MAC in `balancer.extra_macs` is ours.
#[test]
fn frames_not_addressed_to_the_balancer_pass_untouched() {
    let mut lab = lab();
    let mut rng = SplitMix(13);
    let other: [u8; 6] = [0x02, 0x11, 0x22, 0x33, 0x44, 0x55];
    let broadcast = [0xff; 6];
    let multicast = [0x01, 0x00, 0x5e, 0x00, 0x00, 0x01];
    let to = |mac, f: &Flow, vlan| {
        frames::build(
            f,
            &FrameSpec {
                dst_mac: mac,
                vlan,
                payload: vec![3; 10],
                ..Default::default()
            },
        )
    };
    let tcp = flow(&mut rng, false, "203.0.113.10", 80, Protocol::Tcp);
    let udp6 = flow(&mut rng, true, "2001:db8:10::1", 53, Protocol::Udp);
    let client: IpAddr = "198.18.0.1".parse().unwrap();
    let vip: IpAddr = "203.0.113.10".parse().unwrap();
    let mut fragment = to(other, &tcp, None);
    fragment[14 + 6] = 0x20;
    let quoted = ip_packet(&frames::build(
        &Flow {
            src: vip,
            dst: client,
            sport: 80,
            dport: tcp.sport,
            protocol: Protocol::Tcp,
        },
        &FrameSpec::default(),
    ))
    .to_vec();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("TCP, another host's MAC", to(other, &tcp, None)),
        ("TCP, tagged, multicast", to(multicast, &tcp, Some(5))),
        ("IPv6 UDP, broadcast", to(broadcast, &udp6, None)),
        ("a fragment, another host's MAC", fragment),
        (
            "ICMP echo request, broadcast",
            frames::icmp_echo(client, vip, CLIENT_MAC, broadcast, 64, 1, 1, b"x", false),
        ),
        (
            "ICMP too big, another host's MAC",
            frames::icmp_too_big(client, vip, CLIENT_MAC, other, 64, 1400, &quoted),
        ),
    ];
    for (what, frame) in &cases {
        let r = lab.run(frame).unwrap();
        assert_eq!(r.action, xdp_action::XDP_PASS, "{what}");
        assert_eq!(&r.frame, frame, "{what}: untouched");
    }
    let c = lab.dp.counters().unwrap();
    println!(
        "{} frames for other MACs: {} not_our_mac, {} transmitted",
        cases.len(),
        c.reason(Reason::NotOurMac),
        c.reason(Reason::Forwarded)
            + c.reason(Reason::IcmpEchoReply)
            + c.reason(Reason::IcmpForwarded)
    );
    assert_eq!(c.reason(Reason::NotOurMac), cases.len() as u64);
    assert_eq!(c.packets_seen(), cases.len() as u64);
    // Not to a VIP address: that verdict comes first.
    let other_addr = flow(&mut rng, false, "198.51.100.1", 80, Protocol::Tcp);
    assert_eq!(
        lab.run(&to(other, &other_addr, None)).unwrap().action,
        xdp_action::XDP_PASS
    );
    assert_eq!(lab.dp.counters().unwrap().reason(Reason::NotVip), 1);
    // A MAC listed in balancer.extra_macs is the balancer's.
    let mut settings = lb::desired::config::parse(CONFIG, "t").unwrap().balancer;
    settings.extra_macs = vec![other];
    lab.dp.set_settings(&settings).unwrap();
    assert_forwarded(&mut lab, &tcp, &to(other, &tcp, None));
}
