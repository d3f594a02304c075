//! ICMP, fragments and IPv6 extension headers through the real program
//! (`BPF_PROG_TEST_RUN`), with the packets that come out checked byte by
//! byte against ones built independently (etherparse).

use std::net::IpAddr;

use etherparse::Ipv4HeaderSlice;
use lb::{desired::config, desired::vip::Protocol};
use lb_common::Reason;
use lb_tests::{
    frames::{
        self, CLIENT_MAC, Flow, FrameSpec, Outer, icmp_echo, icmp_too_big, ip_packet,
        parse_encapsulated,
    },
    packet_lab::{PacketLab, backend_mac},
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
address = "2001:db8:10::1"
port = 443
protocol = "tcp"
backends = [
  { address = "fd00:200::31", weight = 1 },
  { address = "fd00:200::32", weight = 1 },
]

[[vip]]
address = "203.0.113.12"
port = 80
protocol = "tcp"
scheduler = "wrr"
backends = [
  { address = "10.200.0.11", weight = 1 },
  { address = "10.200.0.12", weight = 1 },
]
"#;

const VIP4: &str = "203.0.113.10";
const VIP6: &str = "2001:db8:10::1";
const CLIENT4: &str = "198.18.7.7";
const CLIENT6: &str = "2001:db8:99::7";

fn lab() -> PacketLab {
    PacketLab::new(CONFIG).unwrap()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// Runs `frame`; checks the verdict and that exactly `reason` was counted.
fn run(lab: &mut PacketLab, frame: &[u8], reason: Reason) -> Vec<u8> {
    let before = lab.dp.counters().unwrap();
    let r = lab.run(frame).unwrap();
    let after = lab.dp.counters().unwrap();
    for x in Reason::ALL {
        let n = after.reason(x) - before.reason(x);
        assert_eq!(
            n,
            u64::from(x == reason),
            "{x:?} counted {n} times, want {reason:?}"
        );
    }
    assert_eq!(r.action, reason.action(), "{reason:?}");
    r.frame
}

/// The reply we expect to `request` (from `src` to `dst`): built from
/// scratch; an IPv4 reply keeps the request's identification and flags.
fn echo_reply_frame(
    lab: &PacketLab,
    request: &[u8],
    src: &str,
    dst: &str,
    id: u16,
    seq: u16,
    data: &[u8],
) -> Vec<u8> {
    let mut want = icmp_echo(
        ip(dst),
        ip(src),
        lab.if_mac,
        CLIENT_MAC,
        64,
        id,
        seq,
        data,
        true,
    );
    if ip(dst).is_ipv4() {
        want[14 + 4..14 + 8].copy_from_slice(&request[14 + 4..14 + 8]);
        let h = Ipv4HeaderSlice::from_slice(&want[14..])
            .unwrap()
            .to_header();
        want[14 + 10..14 + 12].copy_from_slice(&h.calc_header_checksum().to_be_bytes());
    }
    want
}

/// An echo request from `client` to `vip`.
fn echo_request(
    lab: &PacketLab,
    client: &str,
    vip: &str,
    id: u16,
    seq: u16,
    data: &[u8],
) -> Vec<u8> {
    icmp_echo(
        ip(client),
        ip(vip),
        CLIENT_MAC,
        lab.if_mac,
        57,
        id,
        seq,
        data,
        false,
    )
}

/// The ICMP checksum of an echo frame (no IPv4 options).
fn icmp_checksum(frame: &[u8]) -> u16 {
    let at = if frame[14] >> 4 == 4 {
        14 + 20
    } else {
        14 + 40
    };
    u16::from_be_bytes([frame[at + 2], frame[at + 3]])
}

/// Echo replies where the ones' complement sum of what the checksum covers
/// is zero, the edge RFC 1624 is about: zero has two forms, +0 (0x0000)
/// and -0 (0xffff), and a checksum of 0x0000 over data that is all zero
/// does not verify (the client counts it in InCsumErrors and drops it).
#[test]
fn echo_replies_verify_at_the_zero_edge_of_the_checksum() {
    let mut lab = lab();
    // IPv4, identifier, sequence and payload all zero: the request's
    // checksum is 0xf7ff, the reply's must be 0xffff.
    let request = echo_request(&lab, CLIENT4, VIP4, 0, 0, &[]);
    assert_eq!(icmp_checksum(&request), 0xf7ff);
    let out = run(&mut lab, &request, Reason::IcmpEchoReply);
    println!(
        "IPv4 echo, all zero: request checksum {:#06x}, reply {:#06x}",
        icmp_checksum(&request),
        icmp_checksum(&out)
    );
    assert!(frames::icmp_checksum_ok(&out), "the reply verifies");
    assert_eq!(
        out,
        echo_reply_frame(&lab, &request, CLIENT4, VIP4, 0, 0, &[]),
        "the reply built from scratch"
    );
    // IPv4, data that is not zero but sums to -0 (identifier 0xffff): built
    // from scratch the checksum is 0x0000, which the balancer cannot tell
    // apart from the case above; it writes 0xffff, which verifies as well.
    let request = echo_request(&lab, CLIENT4, VIP4, 0xffff, 0, &[]);
    let out = run(&mut lab, &request, Reason::IcmpEchoReply);
    println!(
        "IPv4 echo, data summing to -0: request checksum {:#06x}, reply {:#06x}",
        icmp_checksum(&request),
        icmp_checksum(&out)
    );
    assert!(frames::icmp_checksum_ok(&out), "the reply verifies");
    assert_eq!(icmp_checksum(&out), 0xffff);
    // IPv6: the pseudo-header is never zero, so the incremental update is
    // exact: byte for byte the reply built from scratch, also where its
    // checksum is 0x0000.
    let id = (0..=u16::MAX)
        .find(|id| {
            let reply = echo_reply_frame(&lab, &[], CLIENT6, VIP6, *id, 0, &[]);
            icmp_checksum(&reply) == 0
        })
        .expect("an identifier whose reply checksum is 0x0000");
    let request = echo_request(&lab, CLIENT6, VIP6, id, 0, &[]);
    let out = run(&mut lab, &request, Reason::IcmpEchoReply);
    println!(
        "IPv6 echo, identifier {id:#06x}: request checksum {:#06x}, reply {:#06x}",
        icmp_checksum(&request),
        icmp_checksum(&out)
    );
    assert!(frames::icmp_checksum_ok(&out), "the reply verifies");
    assert_eq!(
        out,
        echo_reply_frame(&lab, &request, CLIENT6, VIP6, id, 0, &[])
    );
}

#[test]
fn echo_requests_to_a_vip_are_answered_byte_by_byte() {
    let mut lab = lab();
    for (client, vip) in [(CLIENT4, VIP4), (CLIENT6, VIP6)] {
        let data: Vec<u8> = (0..56).collect();
        let request = icmp_echo(
            ip(client),
            ip(vip),
            CLIENT_MAC,
            lab.if_mac,
            57,
            0x1234,
            9,
            &data,
            false,
        );
        let out = run(&mut lab, &request, Reason::IcmpEchoReply);
        let want = echo_reply_frame(&lab, &request, client, vip, 0x1234, 9, &data);
        assert_eq!(out, want, "echo reply from {vip}");
    }
    // Not a VIP address (but one the address filter may let through): passed.
    let other = icmp_echo(
        ip(CLIENT4),
        ip("203.0.113.11"),
        CLIENT_MAC,
        lab.if_mac,
        64,
        1,
        1,
        b"x",
        false,
    );
    assert_eq!(run(&mut lab, &other, Reason::NotTcpUdp), other);
    // With `icmp_echo = false`: passed to the host untouched.
    let mut settings = config::parse(CONFIG, "t").unwrap().balancer;
    settings.icmp_echo = false;
    lab.dp.set_settings(&settings).unwrap();
    let request = icmp_echo(
        ip(CLIENT4),
        ip(VIP4),
        CLIENT_MAC,
        lab.if_mac,
        64,
        1,
        1,
        b"x",
        false,
    );
    assert_eq!(run(&mut lab, &request, Reason::NotTcpUdp), request);
}

/// The first `n` bytes of the reply a backend sent for `client_flow`
/// (from the VIP to the client), as a router quotes it.
fn quoted_reply(client_flow: &Flow, n: usize) -> Vec<u8> {
    let reply = Flow {
        src: client_flow.dst,
        dst: client_flow.src,
        sport: client_flow.dport,
        dport: client_flow.sport,
        protocol: client_flow.protocol,
    };
    let frame = frames::build(
        &reply,
        &FrameSpec {
            payload: vec![0xab; 1400],
            ..Default::default()
        },
    );
    ip_packet(&frame)[..n].to_vec()
}

#[test]
fn too_big_errors_about_a_vip_flow_reach_its_backend_unchanged() {
    let mut lab = lab();
    for (client, vip, port, router) in [
        (CLIENT4, VIP4, 80, "192.0.2.1"),
        (CLIENT6, VIP6, 443, "2001:db8:ffff::1"),
    ] {
        for established in [true, false] {
            let f = Flow {
                src: ip(client),
                dst: ip(vip),
                sport: if established { 40001 } else { 40002 },
                dport: port,
                protocol: Protocol::Tcp,
            };
            let owner = lab.dp.backend_for(&f.key()).unwrap();
            if established {
                let out = {
                    let frame = lab.frame(&f, FrameSpec::default());
                    run(&mut lab, &frame, Reason::Forwarded)
                };
                assert_eq!(parse_encapsulated(&out).unwrap().outer.dst(), owner);
            }
            let error = icmp_too_big(
                ip(router),
                ip(vip),
                CLIENT_MAC,
                lab.if_mac,
                60,
                1280,
                &quoted_reply(&f, 68),
            );
            let out = run(&mut lab, &error, Reason::IcmpForwarded);
            let e = parse_encapsulated(&out).unwrap();
            assert_eq!(
                e.outer.dst(),
                owner,
                "{vip}, established {established}: the flow's backend"
            );
            assert_eq!(e.dst_mac, backend_mac(owner));
            assert_eq!(
                e.inner,
                ip_packet(&error),
                "the error arrives byte for byte"
            );
        }
    }
    // A quote whose source is not the VIP the error was sent to: dropped.
    let f = Flow {
        src: ip(CLIENT4),
        dst: ip("192.0.2.50"),
        sport: 40003,
        dport: 80,
        protocol: Protocol::Tcp,
    };
    let error = icmp_too_big(
        ip("192.0.2.1"),
        ip(VIP4),
        CLIENT_MAC,
        lab.if_mac,
        60,
        1280,
        &quoted_reply(&f, 28),
    );
    run(&mut lab, &error, Reason::IcmpUnmatched);
    // A wrr VIP cannot recompute a flow it has no entry for: dropped, never
    // sent to a guessed backend.
    let f = Flow {
        src: ip(CLIENT4),
        dst: ip("203.0.113.12"),
        sport: 40004,
        dport: 80,
        protocol: Protocol::Tcp,
    };
    let error = icmp_too_big(
        ip("192.0.2.1"),
        ip("203.0.113.12"),
        CLIENT_MAC,
        lab.if_mac,
        60,
        1280,
        &quoted_reply(&f, 28),
    );
    run(&mut lab, &error, Reason::IcmpUnmatched);
    // Once the flow is in the tables (its first packet: the handshake
    // table), it goes to its backend.
    let out = {
        let frame = lab.frame(&f, FrameSpec::default());
        run(&mut lab, &frame, Reason::Forwarded)
    };
    let owner = parse_encapsulated(&out).unwrap().outer.dst();
    let out = run(&mut lab, &error, Reason::IcmpForwarded);
    assert_eq!(parse_encapsulated(&out).unwrap().outer.dst(), owner);
}

#[test]
fn packets_too_big_to_encapsulate_get_an_icmp_answer_byte_by_byte() {
    let mut lab = lab();
    for (client, vip, port, overhead) in [(CLIENT4, VIP4, 80, 20), (CLIENT6, VIP6, 443, 40)] {
        let f = Flow {
            src: ip(client),
            dst: ip(vip),
            sport: 40010,
            dport: port,
            protocol: Protocol::Tcp,
        };
        let header = if vip == VIP4 { 40 } else { 60 };
        // One byte more than fits once encapsulated.
        let too_big = lab.frame(
            &f,
            FrameSpec {
                payload: vec![0x5a; 1500 - overhead + 1 - header],
                ..Default::default()
            },
        );
        let out = run(&mut lab, &too_big, Reason::TooBigIcmpSent);
        let mtu = (1500 - overhead) as u32;
        let want = icmp_too_big(
            ip(vip),
            ip(client),
            lab.if_mac,
            CLIENT_MAC,
            64,
            mtu,
            &ip_packet(&too_big)[..512],
        );
        assert_eq!(out, want, "{vip}: the answer, byte for byte");
        // The largest that fits is forwarded.
        let fits = lab.frame(
            &f,
            FrameSpec {
                payload: vec![0x5a; 1500 - overhead - header],
                ..Default::default()
            },
        );
        run(&mut lab, &fits, Reason::Forwarded);
    }
    // `too_big = "drop"`: dropped.
    let mut settings = config::parse(CONFIG, "t").unwrap().balancer;
    settings.too_big_icmp = false;
    lab.dp.set_settings(&settings).unwrap();
    let f = Flow {
        src: ip(CLIENT4),
        dst: ip(VIP4),
        sport: 40011,
        dport: 80,
        protocol: Protocol::Tcp,
    };
    let too_big = lab.frame(
        &f,
        FrameSpec {
            payload: vec![0; 1441],
            ..Default::default()
        },
    );
    run(&mut lab, &too_big, Reason::TooBig);
    // A VLAN-tagged client gets its answer on the same VLAN.
    settings.too_big_icmp = true;
    lab.dp.set_settings(&settings).unwrap();
    let tagged = lab.frame(
        &f,
        FrameSpec {
            vlan: Some(7),
            payload: vec![0; 1441],
            ..Default::default()
        },
    );
    let out = run(&mut lab, &tagged, Reason::TooBigIcmpSent);
    assert_eq!(&out[12..16], &[0x81, 0x00, 0x00, 0x07], "the tag stays");
    let untagged: Vec<u8> = [&out[..12], &out[16..]].concat();
    let want = icmp_too_big(
        ip(VIP4),
        ip(CLIENT4),
        lab.if_mac,
        CLIENT_MAC,
        64,
        1480,
        &ip_packet(&tagged)[..512],
    );
    assert_eq!(untagged, want);
}

#[test]
fn fragments_to_a_vip_are_dropped_by_default_and_never_guessed() {
    let mut lab = lab();
    let f = Flow {
        src: ip(CLIENT4),
        dst: ip(VIP4),
        sport: 40020,
        dport: 80,
        protocol: Protocol::Tcp,
    };
    let whole = lab.frame(&f, FrameSpec::default());
    let mut first = whole.clone();
    first[14 + 6] = 0x20; // more fragments
    let mut later = whole.clone();
    later[14 + 6] = 0x00;
    later[14 + 7] = 0x10; // offset 128
    run(&mut lab, &first, Reason::FragmentDropped);
    run(&mut lab, &later, Reason::FragmentDropped);
    // To an address that is no VIP: the host's business.
    let mut other = lab.frame(
        &Flow {
            dst: ip("198.51.100.1"),
            ..f
        },
        FrameSpec::default(),
    );
    other[14 + 6] = 0x20;
    assert_eq!(run(&mut lab, &other, Reason::Fragment), other);
    // IPv6: a fragment header to a VIP.
    let f6 = Flow {
        src: ip(CLIENT6),
        dst: ip(VIP6),
        sport: 40021,
        dport: 443,
        protocol: Protocol::Tcp,
    };
    let frag6 = with_ipv6_ext(&lab.frame(&f6, FrameSpec::default()), &[(44, 8)]);
    run(&mut lab, &frag6, Reason::FragmentDropped);
    // `fragments = "pass"`: passed, untouched.
    let mut settings = config::parse(CONFIG, "t").unwrap().balancer;
    settings.fragments_pass = true;
    lab.dp.set_settings(&settings).unwrap();
    assert_eq!(run(&mut lab, &first, Reason::Fragment), first);
    assert_eq!(run(&mut lab, &frag6, Reason::Fragment), frag6);
}

/// `frame` (IPv6, no extension headers) with extension headers of
/// (type, length in bytes) inserted before its L4 header.
fn with_ipv6_ext(frame: &[u8], headers: &[(u8, usize)]) -> Vec<u8> {
    let (head, l4) = frame.split_at(14 + 40);
    let mut ip = head[14..].to_vec();
    let l4_proto = ip[6];
    let mut ext = Vec::new();
    for (i, (kind, len)) in headers.iter().enumerate() {
        let next = headers.get(i + 1).map_or(l4_proto, |h| h.0);
        let mut h = vec![0u8; *len];
        h[0] = next;
        if *kind == 44 {
            h[1] = 0; // fragment header: reserved; offset 0, M set below
            h[3] = 1;
        } else {
            h[1] = (*len / 8 - 1) as u8;
        }
        ext.extend(h);
    }
    ip[6] = headers[0].0;
    let payload_len = u16::from_be_bytes([ip[4], ip[5]]) as usize + ext.len();
    ip[4..6].copy_from_slice(&(payload_len as u16).to_be_bytes());
    [&head[..14], &ip[..], &ext[..], l4].concat()
}

#[test]
fn ipv6_extension_headers_are_walked_within_a_bound() {
    let mut lab = lab();
    let f = Flow {
        src: ip(CLIENT6),
        dst: ip(VIP6),
        sport: 40030,
        dport: 443,
        protocol: Protocol::Tcp,
    };
    let plain = lab.frame(&f, FrameSpec::default());
    let owner = lab.dp.backend_for(&f.key()).unwrap();
    // Hop-by-hop, destination options, routing (no segments left), and a
    // second destination options header: forwarded by the 5-tuple.
    let walked = with_ipv6_ext(&plain, &[(0, 8), (60, 16), (43, 8), (60, 8)]);
    let out = run(&mut lab, &walked, Reason::Forwarded);
    let e = parse_encapsulated(&out).unwrap();
    assert_eq!(e.outer.dst(), owner, "the flow's backend");
    assert_eq!(
        e.inner,
        ip_packet(&walked),
        "the packet, extension headers and all"
    );
    // Five: beyond the bound.
    let deep = with_ipv6_ext(&plain, &[(0, 8), (60, 8), (60, 8), (60, 8), (60, 8)]);
    assert_eq!(run(&mut lab, &deep, Reason::Ipv6ExtHeader), deep);
    // A routing header with segments left: not the final destination.
    let mut routed = with_ipv6_ext(&plain, &[(43, 8)]);
    routed[14 + 40 + 3] = 2;
    assert_eq!(run(&mut lab, &routed, Reason::Ipv6ExtHeader), routed);
    // An extension header longer than the packet: malformed.
    let mut cut = with_ipv6_ext(&plain, &[(60, 8)]);
    cut[14 + 40 + 1] = 200;
    run(&mut lab, &cut, Reason::Malformed);
}

/// For [`checksums_from_scratch_are_right_where_they_come_out_0x0000`]: the
/// IPv4 source is chosen so that an outer header that fits the MTU can sum
/// to -0 (for 10.200.0.1 it would take a packet of 9567 bytes).
const EDGE_CONFIG: &str = r#"
[balancer]
source_v4 = "10.200.32.1"
source_v6 = "fd00:200::1"
mtu = 1500

[[vip]]
address = "203.0.113.10"
port = 80
protocol = "tcp"
backends = [ { address = "10.200.0.11" } ]

[[vip]]
address = "2001:db8:10::1"
port = 443
protocol = "tcp"
backends = [ { address = "fd00:200::31" } ]
"#;

/// The checksums the balancer computes from scratch (the outer IPv4
/// header, the "too big" answers) at the edge where they come out 0x0000
/// (what they cover sums to -0): equal to the ones built independently, and
/// they verify.
#[test]
fn checksums_from_scratch_are_right_where_they_come_out_0x0000() {
    let mut lab = PacketLab::new(EDGE_CONFIG).unwrap();
    // The outer IPv4 header: its checksum depends on the inner length only.
    let f = Flow {
        src: ip(CLIENT4),
        dst: ip(VIP4),
        sport: 40040,
        dport: 80,
        protocol: Protocol::Tcp,
    };
    let frame = (0..=1440)
        .map(|n| {
            lab.frame(
                &f,
                FrameSpec {
                    payload: vec![0x11; n],
                    ..Default::default()
                },
            )
        })
        .find(|frame| {
            let tot_len = (20 + ip_packet(frame).len() as u16).to_be_bytes();
            let header = [
                0x45, 0, tot_len[0], tot_len[1], 0, 0, 0x40, 0, 64, 4, 0, 0, 10, 200, 32, 1, 10,
                200, 0, 11,
            ];
            frames::ones_sum(&header) == 0xffff
        })
        .expect("an inner length whose outer header sums to -0");
    let out = run(&mut lab, &frame, Reason::Forwarded);
    let e = parse_encapsulated(&out).unwrap();
    let checksum = u16::from_be_bytes([out[14 + 10], out[14 + 11]]);
    println!(
        "outer IPv4 header of a {}-byte packet: checksum {checksum:#06x}",
        ip_packet(&frame).len()
    );
    assert_eq!(checksum, 0);
    assert!(matches!(
        e.outer,
        Outer::V4 {
            checksum_ok: true,
            ..
        }
    ));
    assert_eq!(
        frames::ones_sum(&out[14..34]),
        0xffff,
        "the header verifies"
    );

    // The "too big" answers: the quote's sum moves with the TCP checksum,
    // which moves with the payload beyond the quote.
    for (client, vip, port, overhead, header) in
        [(CLIENT4, VIP4, 80, 20, 40), (CLIENT6, VIP6, 443, 40, 60)]
    {
        let f = Flow {
            src: ip(client),
            dst: ip(vip),
            sport: 40041,
            dport: port,
            protocol: Protocol::Tcp,
        };
        let mtu = (1500 - overhead) as u32;
        let if_mac = lab.if_mac;
        let too_big = |k: u16| {
            let mut payload = vec![0x5a; 1500 - overhead + 1 - header];
            let n = payload.len();
            payload[n - 2..].copy_from_slice(&k.to_be_bytes());
            lab.frame(
                &f,
                FrameSpec {
                    payload,
                    ..Default::default()
                },
            )
        };
        let answer = |frame: &[u8]| {
            icmp_too_big(
                ip(vip),
                ip(client),
                if_mac,
                CLIENT_MAC,
                64,
                mtu,
                &ip_packet(frame)[..512],
            )
        };
        let at = 14 + header - 20 + 2;
        let frame = (0..=u16::MAX)
            .map(too_big)
            .find(|frame| answer(frame)[at..at + 2] == [0, 0])
            .expect("a payload whose answer's checksum is 0x0000");
        let out = run(&mut lab, &frame, Reason::TooBigIcmpSent);
        println!(
            "too big to {client}: ICMP checksum {:#06x}",
            u16::from_be_bytes([out[at], out[at + 1]])
        );
        assert_eq!(out, answer(&frame), "{vip}: the answer, byte for byte");
        assert!(frames::icmp_checksum_ok(&out), "{vip}: the answer verifies");
    }
}

/// `frame` (IPv4) with its header checksum broken.
fn with_bad_ipv4_checksum(frame: &[u8]) -> Vec<u8> {
    let mut f = frame.to_vec();
    f[14 + 10] ^= 0x5a;
    f
}

/// The balancer answers (echo replies, "too big") only packets a host
/// would accept: an IPv4 header whose checksum fails gets no answer (it is
/// dropped as malformed), and a reply never sets the reserved flag bit a
/// request had.
#[test]
fn the_balancer_answers_only_ipv4_headers_that_verify() {
    let mut lab = lab();
    let request = echo_request(&lab, CLIENT4, VIP4, 7, 1, b"ping");
    run(
        &mut lab,
        &with_bad_ipv4_checksum(&request),
        Reason::Malformed,
    );
    // The reserved ("evil") bit, with the checksum corrected.
    let mut evil = request.clone();
    evil[14 + 6] |= 0x80;
    evil[14 + 10..14 + 12].copy_from_slice(&[0, 0]);
    let c = !frames::ones_sum(&evil[14..34]);
    evil[14 + 10..14 + 12].copy_from_slice(&c.to_be_bytes());
    let out = run(&mut lab, &evil, Reason::IcmpEchoReply);
    assert_eq!(
        out,
        echo_reply_frame(&lab, &request, CLIENT4, VIP4, 7, 1, b"ping"),
        "the reply of the same request without the reserved bit"
    );
    assert_eq!(out[14 + 6] & 0x80, 0, "reserved bit clear");
    // Too big to encapsulate: answered only if the header verifies, options
    // or not.
    let f = Flow {
        src: ip(CLIENT4),
        dst: ip(VIP4),
        sport: 40050,
        dport: 80,
        protocol: Protocol::Tcp,
    };
    for options in [vec![], vec![1, 1, 1, 0, 0x94, 4, 0, 0]] {
        let too_big = lab.frame(
            &f,
            FrameSpec {
                ipv4_options: options.clone(),
                payload: vec![0x5a; 1461 - options.len()],
                ..Default::default()
            },
        );
        run(
            &mut lab,
            &with_bad_ipv4_checksum(&too_big),
            Reason::Malformed,
        );
        let out = run(&mut lab, &too_big, Reason::TooBigIcmpSent);
        assert!(frames::icmp_checksum_ok(&out));
        println!(
            "too big with {} bytes of options: answered only with a good header checksum",
            options.len()
        );
    }
}
