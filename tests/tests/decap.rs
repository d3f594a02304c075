//! The backend-side decapsulator through `BPF_PROG_TEST_RUN`: it undoes
//! exactly what the balancer does, passes everything else untouched and
//! drops broken tunnels. With the second-chance option
//! (`lb_common::second_chance`) it keeps the packets of its own
//! connections and sends the others on to the candidate, once; the last
//! test shows that between two backends on a real network.

use std::{
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream},
    time::{Duration, Instant},
};

use lb::{
    dataplane::{AttachMode, Decapsulator, PassProgram},
    desired::vip::Protocol,
};
use lb_common::{DECAP_REASON_COUNT, DecapReason, SC_FORWARDED, xdp_action};
use lb_tests::{
    SplitMix,
    capture::PacketSocket,
    frames::{
        Flow, FrameSpec, OuterSpec, SecondChance, TCP_ACK, TCP_RST, TCP_SYN, encapsulate,
        ip_packet, l2_len, ones_sum, parse_encapsulated, second_chance_of,
    },
    lab::in_ns,
    netns::{Netns, format_mac},
    packet_lab::{LAB_V4, LAB_V6, PacketLab, backend_mac},
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

/// Packets per [`DecapReason`].
type Counts = [u64; DECAP_REASON_COUNT as usize];

/// The decapsulator's addresses in [`Rig`].
const LOCAL_V4: &str = "10.200.0.11";
const LOCAL_V6: &str = "fd00:200::31";
/// Other backends of the lab's subnets (neighbours with [`backend_mac`]):
/// second-chance candidates.
const PEER_V4: &str = "10.200.0.12";
const PEER_V6: &str = "fd00:200::32";
/// Candidates without a route.
const NOWHERE_V4: &str = "192.0.2.1";
const NOWHERE_V6: &str = "2001:db8:ffff::1";
/// Source MAC of the balancer's encapsulated frames in these tests.
const BALANCER_MAC: [u8; 6] = [0x02, 0xba, 0x1a, 0x00, 0x00, 0x01];

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
        decap.enable_second_chance().unwrap();
        let local: Vec<IpAddr> = [LOCAL_V4, LOCAL_V6]
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

    fn counters(&self) -> Counts {
        self.decap.counters().unwrap()
    }

    /// Runs the decapsulator on `frame` as received on the lab's interface
    /// (FIB lookups towards the lab's neighbours work; socket lookups see
    /// the lab namespace, where this thread is).
    fn decap_on_lab(&mut self, frame: &[u8]) -> lb_tests::xdp::RunResult {
        let ifindex = self.lab.ifindex;
        run_xdp(self.decap.program().unwrap(), frame, ifindex, 1).unwrap()
    }

    /// `inner` encapsulated by the lab's balancer address towards `local`
    /// (an address of this decapsulator), with option `sc`.
    fn optioned(
        &self,
        inner: &[u8],
        local: IpAddr,
        sc: Option<SecondChance>,
        vlan: Option<u16>,
    ) -> Vec<u8> {
        let src: IpAddr = if local.is_ipv4() {
            LAB_V4.parse().unwrap()
        } else {
            LAB_V6.parse().unwrap()
        };
        encapsulate(
            inner,
            &OuterSpec {
                src,
                dst: local,
                src_mac: BALANCER_MAC,
                dst_mac: self.lab.if_mac,
                vlan,
                sc,
            },
        )
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

fn addr(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// `after - before`, per reason.
fn delta(before: &Counts, after: &Counts) -> Counts {
    let mut d = [0; DECAP_REASON_COUNT as usize];
    for r in DecapReason::ALL {
        d[r as usize] = after[r as usize] - before[r as usize];
    }
    d
}

/// The non-zero counters, `name=value`.
fn show(c: &Counts) -> String {
    let parts: Vec<String> = DecapReason::ALL
        .iter()
        .filter(|r| c[**r as usize] != 0)
        .map(|r| format!("{}={}", r.name(), c[*r as usize]))
        .collect();
    if parts.is_empty() {
        "none".to_string()
    } else {
        parts.join(" ")
    }
}

/// Counts with `n` of each reason listed.
fn counts(of: &[(DecapReason, u64)]) -> Counts {
    let mut c = [0; DECAP_REASON_COUNT as usize];
    for (r, n) in of {
        c[*r as usize] += n;
    }
    c
}

/// A frame of a TCP segment from `src` to `dst` with `flags`.
fn tcp(src: SocketAddr, dst: SocketAddr, flags: u8, payload: usize) -> Vec<u8> {
    lb_tests::frames::tcp_frame(src, dst, flags, payload)
}

/// A frame of a UDP datagram from `src` to `dst`.
fn udp(src: SocketAddr, dst: SocketAddr, payload: usize) -> Vec<u8> {
    let flow = Flow {
        src: src.ip(),
        dst: dst.ip(),
        sport: src.port(),
        dport: dst.port(),
        protocol: Protocol::Udp,
    };
    lb_tests::frames::build(
        &flow,
        &FrameSpec {
            payload: vec![0x5a; payload],
            ..Default::default()
        },
    )
}

fn sc(candidate: &str, flags: u8) -> Option<SecondChance> {
    Some(SecondChance {
        candidate: addr(candidate),
        flags,
    })
}

/// The outer families of the second-chance tests: (this host, a reachable
/// candidate, a candidate without a route, no candidate).
const FAMILIES: [(&str, &str, &str, &str); 2] = [
    (LOCAL_V4, PEER_V4, NOWHERE_V4, "0.0.0.0"),
    (LOCAL_V6, PEER_V6, NOWHERE_V6, "::"),
];

/// Candidates on the lab's subnet without a neighbour entry.
const UNRESOLVED: [&str; 2] = ["10.200.0.99", "fd00:200::99"];

#[test]
fn optioned_tunnels_are_stripped_and_counted() {
    let mut rig = Rig::new();
    let mut n = 0;
    for (local, peer, _, _) in FAMILIES {
        for (client, vip) in [
            ("198.18.0.7:40000", "203.0.113.10:80"),
            ("[2001:db8:99::7]:40000", "[2001:db8:10::1]:80"),
        ] {
            let (client, vip): (SocketAddr, SocketAddr) =
                (client.parse().unwrap(), vip.parse().unwrap());
            for payload in [0, 1, 1000] {
                // A SYN and a UDP datagram: decapsulated without a lookup.
                for inner in [
                    tcp(client, vip, TCP_SYN, payload),
                    udp(client, vip, payload),
                ] {
                    for vlan in [None, Some(42)] {
                        for flags in [0, SC_FORWARDED] {
                            let frame = rig.optioned(&inner, addr(local), sc(peer, flags), vlan);
                            let outer = if local.contains(':') { 64 } else { 28 };
                            assert_eq!(second_chance_of(&frame).unwrap().1, l2_len(&frame) + outer);
                            let r = rig.decap(&frame);
                            let what = format!("{local} {vip} vlan {vlan:?} payload {payload}");
                            assert_eq!(r.action, xdp_action::XDP_PASS, "{what}");
                            assert_eq!(r.frame.len(), frame.len() - outer, "{what}");
                            let l2 = l2_len(&frame);
                            assert_eq!(l2_len(&r.frame), l2, "{what}: tag kept");
                            assert_eq!(r.frame[..l2 - 2], frame[..l2 - 2], "{what}: MACs, tag");
                            assert_eq!(
                                r.frame[l2 - 2..l2],
                                inner[12..14],
                                "{what}: inner ether type"
                            );
                            assert_eq!(ip_packet(&r.frame), ip_packet(&inner), "{what}");
                            n += 1;
                        }
                    }
                }
            }
        }
    }
    let c = rig.counters();
    println!("{n} optioned frames stripped; counters: {}", show(&c));
    assert_eq!(c, counts(&[(DecapReason::Decapsulated, n)]));
}

#[test]
fn malformed_optioned_tunnels_are_dropped_or_passed() {
    let mut rig = Rig::new();
    let client: SocketAddr = "198.18.0.7:40000".parse().unwrap();
    let vip: SocketAddr = "203.0.113.10:80".parse().unwrap();
    let inner = tcp(client, vip, TCP_SYN, 20);
    let v4 = rig.optioned(&inner, addr(LOCAL_V4), sc(PEER_V4, 0), None);
    let v6 = rig.optioned(&inner, addr(LOCAL_V6), sc(PEER_V6, 0), None);
    let mut cases: Vec<(&str, Vec<u8>, DecapReason)> = Vec::new();
    let edit = |base: &Vec<u8>, at: usize, bytes: &[u8]| {
        let mut f = base.clone();
        f[at..at + bytes.len()].copy_from_slice(bytes);
        f
    };
    let len4 = u16::from_be_bytes([v4[16], v4[17]]);
    let len6 = u16::from_be_bytes([v6[18], v6[19]]);
    use DecapReason::{Decapsulated, Malformed, NotTunnel};
    cases.push(("IPv4: option length 6", edit(&v4, 14 + 21, &[6]), Malformed));
    cases.push((
        "IPv4: option beyond IHL 6",
        edit(&v4, 14, &[0x46]),
        Malformed,
    ));
    cases.push((
        "IPv4: our option in IHL 8",
        edit(&v4, 14, &[0x48]),
        Malformed,
    ));
    cases.push((
        "IPv4: total length inside the option",
        edit(&v4, 16, &24u16.to_be_bytes()),
        Malformed,
    ));
    cases.push((
        "IPv4: total length beyond the frame",
        edit(&v4, 16, &(len4 + 8).to_be_bytes()),
        Malformed,
    ));
    cases.push((
        "IPv4: inner version does not match",
        edit(&v4, 14 + 28, &[0x65]),
        Malformed,
    ));
    cases.push((
        "IPv6: option length 16",
        edit(&v6, 14 + 45, &[16]),
        Malformed,
    ));
    cases.push(("IPv6: PadN broken", edit(&v6, 14 + 42, &[0]), Malformed));
    cases.push((
        "IPv6: payload shorter than the options header",
        edit(&v6, 18, &16u16.to_be_bytes()),
        Malformed,
    ));
    cases.push((
        "IPv6: payload beyond the frame",
        edit(&v6, 18, &(len6 + 8).to_be_bytes()),
        Malformed,
    ));
    cases.push((
        "IPv6: inner version does not match",
        edit(&v6, 14 + 40, &[41]),
        Malformed,
    ));
    cases.push((
        "IPv6: another destination options header (length 0)",
        edit(&v6, 14 + 41, &[0]),
        NotTunnel,
    ));
    cases.push((
        "IPv6: another option type",
        edit(&v6, 14 + 44, &[0x1f]),
        NotTunnel,
    ));
    cases.push((
        "IPv6: our header before TCP, not a tunnel",
        edit(&v6, 14 + 40, &[6]),
        NotTunnel,
    ));
    // Another option (NOPs) in IHL 6: a plain tunnel, stripped by its IHL.
    let plain = encapsulate(
        &inner,
        &OuterSpec {
            src: addr(LAB_V4),
            dst: addr(LOCAL_V4),
            src_mac: BALANCER_MAC,
            dst_mac: rig.lab.if_mac,
            vlan: None,
            sc: None,
        },
    );
    let mut nops = plain[..34].to_vec();
    nops[14] = 0x46;
    let tot = u16::from_be_bytes([nops[16], nops[17]]) + 4;
    nops[16..18].copy_from_slice(&tot.to_be_bytes());
    nops.extend_from_slice(&[1, 1, 1, 1]);
    nops.extend_from_slice(&plain[34..]);
    cases.push(("IPv4: another option (NOPs)", nops, Decapsulated));

    let mut want = counts(&[]);
    for (what, frame, reason) in &cases {
        let r = rig.decap(frame);
        assert_eq!(r.action, reason.action(), "{what}");
        match reason {
            NotTunnel => assert_eq!(&r.frame, frame, "{what}: untouched"),
            Decapsulated => assert_eq!(ip_packet(&r.frame), ip_packet(&inner), "{what}"),
            _ => {}
        }
        want[*reason as usize] += 1;
        println!("{what}: {}", reason.name());
    }
    assert_eq!(rig.counters(), want);

    // Every truncation: a drop once the frame shows a tunnel to us (IPv4:
    // the outer destination; IPv6: also the first 8 bytes of our options
    // header), a pass before that; never aborted.
    for (frame, shown) in [(&v4, 14 + 20), (&v6, 14 + 48)] {
        for len in 14..frame.len() {
            let r = rig.decap(&frame[..len]);
            let want = if len < shown { NotTunnel } else { Malformed };
            assert_eq!(r.action, want.action(), "cut to {len} of {}", frame.len());
        }
    }
    println!("truncations: counters {}", show(&rig.counters()));
}

/// Sockets in the packet lab's namespace: a listener with one established
/// connection, and a port nobody listens on.
struct Sockets {
    listener: TcpListener,
    client: TcpStream,
    _server: TcpStream,
    closed: SocketAddr,
}

impl Sockets {
    /// On `loopback` (127.0.0.1 or ::1), in the calling thread's namespace.
    fn new(loopback: &str) -> Sockets {
        let listener = TcpListener::bind((addr(loopback), 0)).unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        let closed = TcpListener::bind((addr(loopback), 0))
            .unwrap()
            .local_addr()
            .unwrap();
        Sockets {
            listener,
            client,
            _server: server,
            closed,
        }
    }

    fn service(&self) -> SocketAddr {
        self.listener.local_addr().unwrap()
    }

    fn established(&self) -> SocketAddr {
        self.client.local_addr().unwrap()
    }

    /// A client address with no connection.
    fn stranger(&self) -> SocketAddr {
        SocketAddr::new(self.established().ip(), 1)
    }
}

#[test]
fn second_chance_keeps_its_connections_and_forwards_the_others_once() {
    let mut rig = Rig::new();
    rig.lab.add_neighbour(addr(PEER_V4)).unwrap();
    rig.lab.add_neighbour(addr(PEER_V6)).unwrap();
    // The test thread is in the lab's namespace: so are these sockets.
    let sockets = [Sockets::new("127.0.0.1"), Sockets::new("::1")];
    let mut want = counts(&[]);
    let mut shown = false;
    for (local, peer, nowhere, zero) in FAMILIES {
        for s in &sockets {
            use DecapReason::*;
            let est = tcp(s.established(), s.service(), TCP_ACK, 10);
            let cases: Vec<(&str, Vec<u8>, &str, u8, DecapReason)> = vec![
                (
                    "ACK, established connection",
                    est.clone(),
                    peer,
                    0,
                    Decapsulated,
                ),
                (
                    "ACK, established, already forwarded",
                    est.clone(),
                    peer,
                    SC_FORWARDED,
                    Decapsulated,
                ),
                (
                    "ACK, listener only (no SYN cookie)",
                    tcp(s.stranger(), s.service(), TCP_ACK, 10),
                    peer,
                    0,
                    Forwarded,
                ),
                (
                    "ACK, no socket",
                    tcp(s.stranger(), s.closed, TCP_ACK, 0),
                    peer,
                    0,
                    Forwarded,
                ),
                (
                    "RST, no socket",
                    tcp(s.stranger(), s.closed, TCP_RST | TCP_ACK, 0),
                    peer,
                    0,
                    Forwarded,
                ),
                (
                    "ACK, no socket, already forwarded",
                    tcp(s.stranger(), s.closed, TCP_ACK, 0),
                    peer,
                    SC_FORWARDED,
                    NoCandidate,
                ),
                (
                    "ACK, no socket, candidate is this host",
                    tcp(s.stranger(), s.closed, TCP_ACK, 0),
                    local,
                    0,
                    NoCandidate,
                ),
                (
                    "ACK, no socket, candidate zero",
                    tcp(s.stranger(), s.closed, TCP_ACK, 0),
                    zero,
                    0,
                    NoCandidate,
                ),
                (
                    "ACK, no socket, no route to the candidate",
                    tcp(s.stranger(), s.closed, TCP_ACK, 0),
                    nowhere,
                    0,
                    ForwardFailed,
                ),
                (
                    "ACK, no socket, the candidate's neighbour unresolved",
                    tcp(s.stranger(), s.closed, TCP_ACK, 0),
                    UNRESOLVED[usize::from(local == LOCAL_V6)],
                    0,
                    NeighbourPending,
                ),
                (
                    "SYN, no socket",
                    tcp(s.stranger(), s.closed, TCP_SYN, 0),
                    peer,
                    0,
                    Decapsulated,
                ),
                (
                    "UDP",
                    udp(s.stranger(), s.closed, 10),
                    peer,
                    0,
                    Decapsulated,
                ),
            ];
            for (what, inner, candidate, flags, reason) in cases {
                for vlan in [None, Some(7)] {
                    let what = format!(
                        "outer {local}, inner {}, {what}, vlan {vlan:?}",
                        s.service().ip()
                    );
                    let frame = rig.optioned(&inner, addr(local), sc(candidate, flags), vlan);
                    let r = rig.decap_on_lab(&frame);
                    assert_eq!(r.action, reason.action(), "{what}: want {reason:?}");
                    want[reason as usize] += 1;
                    if reason == Forwarded {
                        // The same tunnel from this host to the candidate,
                        // marked, towards the candidate's MAC; checksum from
                        // scratch equal to the incremental one.
                        let expected = encapsulate(
                            &inner,
                            &OuterSpec {
                                src: addr(local),
                                dst: addr(peer),
                                src_mac: rig.lab.if_mac,
                                dst_mac: backend_mac(addr(peer)),
                                vlan,
                                sc: sc(peer, SC_FORWARDED),
                            },
                        );
                        assert_eq!(r.frame, expected, "{what}");
                        if local == LOCAL_V4 {
                            let l3 = l2_len(&r.frame);
                            assert_eq!(ones_sum(&r.frame[l3..l3 + 28]), 0xffff);
                        }
                        if !shown {
                            shown = true;
                            println!(
                                "forwarded: outer {:?}",
                                parse_encapsulated(&r.frame).unwrap().outer
                            );
                        }
                    } else if reason != NeighbourPending {
                        assert_eq!(ip_packet(&r.frame), ip_packet(&inner), "{what}");
                        assert_eq!(l2_len(&r.frame), l2_len(&frame), "{what}");
                    }
                }
            }
        }
    }
    let c = rig.counters();
    println!("counters: {}", show(&c));
    assert_eq!(c, want);
    // The unresolved candidates are noted for lbd decap to resolve.
    let mut wanted = rig.decap.take_wanted();
    wanted.sort();
    let mut expected: Vec<IpAddr> = UNRESOLVED.iter().map(|a| addr(a)).collect();
    expected.sort();
    println!("candidates to resolve: {wanted:?}");
    assert_eq!(wanted, expected);
    assert!(rig.decap.take_wanted().is_empty());
    // Without --second-chance the option is only stripped: no lookup, no
    // forward.
    let mut plain = Decapsulator::load().unwrap();
    plain
        .set_addresses(&[addr(LOCAL_V4), addr(LOCAL_V6)])
        .unwrap();
    let inner = tcp(
        "198.18.0.7:40000".parse().unwrap(),
        "127.0.0.1:9".parse().unwrap(),
        TCP_ACK,
        0,
    );
    let frame = rig.optioned(&inner, addr(LOCAL_V4), sc(PEER_V4, 0), None);
    let r = run_xdp(plain.program().unwrap(), &frame, rig.lab.ifindex, 1).unwrap();
    assert_eq!(r.action, DecapReason::Decapsulated.action());
    assert_eq!(ip_packet(&r.frame), ip_packet(&inner));
    let c = plain.counters().unwrap();
    assert_eq!(c, counts(&[(DecapReason::Decapsulated, 1)]));
}

/// A host of [`Net`]: a namespace on the bridge with `eth0` at `v4`/`v6`.
struct Host {
    ns: Netns,
    v4: IpAddr,
    v6: IpAddr,
    mac: [u8; 6],
}

/// Two backends and a sender on one bridge:
///
/// ```text
///   sender .2 ─┐
///   X .11 ─────┼── br0 (own netns)   10.204.0.0/24, fd00:204::/64
///   Y .12 ─────┘
/// ```
///
/// X and Y have the VIPs on `lo`, as the lab's backends do; the sender
/// routes the VIPs via X. X's bridge port runs `XDP_PASS` (veth delivers
/// native `XDP_TX` only to a peer that runs XDP). Fields drop in order:
/// the namespaces after the programs.
struct Net {
    sender: Host,
    x: Host,
    y: Host,
    _switch: Netns,
}

const VIP4: &str = "203.0.113.10";
const VIP6: &str = "2001:db8:10::1";

impl Net {
    fn new() -> anyhow::Result<(Net, PassProgram)> {
        let switch = Netns::new("dsc-sw")?;
        switch.ip(&["link", "add", "br0", "type", "bridge"])?;
        switch.ip(&["link", "set", "br0", "up"])?;
        let host = |name: &str, last: u8| -> anyhow::Result<Host> {
            let ns = Netns::new(&format!("dsc-{name}"))?;
            let port = format!("v-{name}");
            switch.ip(&[
                "link",
                "add",
                &port,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                ns.name(),
            ])?;
            switch.ip(&["link", "set", &port, "master", "br0", "up"])?;
            ns.ip(&["link", "set", "eth0", "up"])?;
            // Checksums computed by the sender's stack, not left to veth.
            ns.exec("ethtool", &["-K", "eth0", "tx", "off"])?;
            let v4: IpAddr = Ipv4Addr::new(10, 204, 0, last).into();
            let v6: IpAddr = Ipv6Addr::new(0xfd00, 0x204, 0, 0, 0, 0, 0, last.into()).into();
            ns.ip(&["addr", "add", &format!("{v4}/24"), "dev", "eth0"])?;
            ns.ip(&["addr", "add", &format!("{v6}/64"), "dev", "eth0", "nodad"])?;
            let mac = ns.mac("eth0")?;
            Ok(Host { ns, v4, v6, mac })
        };
        let sender = host("snd", 2)?;
        let x = host("x", 11)?;
        let y = host("y", 12)?;
        for b in [&x, &y] {
            b.ns.ip(&["addr", "add", &format!("{VIP4}/32"), "dev", "lo"])?;
            b.ns.ip(&["addr", "add", &format!("{VIP6}/128"), "dev", "lo"])?;
        }
        sender.ns.ip(&[
            "route",
            "add",
            &format!("{VIP4}/32"),
            "via",
            &x.v4.to_string(),
        ])?;
        sender.ns.ip(&[
            "-6",
            "route",
            "add",
            &format!("{VIP6}/128"),
            "via",
            &x.v6.to_string(),
        ])?;
        // The decapsulator's FIB lookup (as the balancer's) answers only
        // on an interface that forwards.
        x.ns.exec(
            "sysctl",
            &[
                "-qw",
                "net.ipv4.conf.eth0.forwarding=1",
                "net.ipv6.conf.eth0.forwarding=1",
            ],
        )?;
        let pass = {
            let _inside = switch.enter()?;
            PassProgram::attach("v-x")?
        };
        Ok((
            Net {
                sender,
                x,
                y,
                _switch: switch,
            },
            pass,
        ))
    }
}

/// A decapsulator for `host`'s addresses on its `eth0`, native mode.
fn decapsulator_on(host: &Host) -> Decapsulator {
    let mut d = Decapsulator::load().unwrap();
    d.enable_second_chance().unwrap();
    d.set_addresses(&[host.v4, host.v6]).unwrap();
    let _inside = host.ns.enter().unwrap();
    assert_eq!(
        d.attach("eth0", AttachMode::Native).unwrap(),
        AttachMode::Native
    );
    d
}

/// Waits up to 3 s for `decap`'s counters to reach `before + want`, not
/// counting `not_tunnel` (the hosts' own traffic: ARP, neighbour discovery,
/// the test's TCP connections); returns the difference then.
fn wait_for(decap: &Decapsulator, before: &Counts, want: &Counts) -> Counts {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let mut d = delta(before, &decap.counters().unwrap());
        d[DecapReason::NotTunnel as usize] = 0;
        if d == *want || Instant::now() > deadline {
            return d;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `decap`'s counters since `before` as [`wait_for`] counts them, after
/// 300 ms: for what must not happen.
fn after_a_while(decap: &Decapsulator, before: &Counts) -> Counts {
    std::thread::sleep(Duration::from_millis(300));
    let mut d = delta(before, &decap.counters().unwrap());
    d[DecapReason::NotTunnel as usize] = 0;
    d
}

#[test]
fn second_chance_across_two_backends() {
    require_root();
    let (net, _pass) = Net::new().unwrap();
    let mut x_decap = decapsulator_on(&net.x);
    let y_decap = decapsulator_on(&net.y);
    let inject = in_ns(&net.sender.ns, || PacketSocket::open("eth0"))
        .unwrap()
        .unwrap();
    let seen_at_y = in_ns(&net.y.ns, || PacketSocket::open("eth0"))
        .unwrap()
        .unwrap();
    // The service on X's VIPs.
    let listeners: Vec<TcpListener> = in_ns(&net.x.ns, || {
        [VIP4, VIP6]
            .iter()
            .map(|v| TcpListener::bind((addr(v), 80)).unwrap())
            .collect()
    })
    .unwrap();
    let outer = |inner: &[u8], v6: bool, flags: u8| -> Vec<u8> {
        let (src, dst, cand) = if v6 {
            (net.sender.v6, net.x.v6, net.y.v6)
        } else {
            (net.sender.v4, net.x.v4, net.y.v4)
        };
        encapsulate(
            inner,
            &OuterSpec {
                src,
                dst,
                src_mac: net.sender.mac,
                dst_mac: net.x.mac,
                vlan: None,
                sc: Some(SecondChance {
                    candidate: cand,
                    flags,
                }),
            },
        )
    };
    use DecapReason::*;
    for v6 in [false, true] {
        let family = if v6 { "IPv6" } else { "IPv4" };
        let vip = addr(if v6 { VIP6 } else { VIP4 });
        let y_addr = if v6 { net.y.v6 } else { net.y.v4 };
        let client: IpAddr = if v6 {
            addr("2001:db8:99::7")
        } else {
            addr("198.51.100.7")
        };
        let stranger = SocketAddr::new(client, 40000);

        // (0) X does not know Y's MAC yet: no next hop; dropped (TCP would
        // send it again), and Y noted for lbd decap to resolve.
        let ack = tcp(stranger, SocketAddr::new(vip, 80), TCP_ACK, 0);
        let (bx, by) = (x_decap.counters().unwrap(), y_decap.counters().unwrap());
        inject.send(&outer(&ack, v6, 0)).unwrap();
        let dx = wait_for(&x_decap, &bx, &counts(&[(NeighbourPending, 1)]));
        println!(
            "{family} (0) ACK, X without a neighbour entry for Y: X {}",
            show(&dx)
        );
        assert_eq!(dx, counts(&[(NeighbourPending, 1)]));
        assert_eq!(x_decap.take_wanted(), vec![y_addr]);
        assert_eq!(after_a_while(&y_decap, &by), counts(&[]));
        net.x
            .ns
            .ip(&[
                "neigh",
                "replace",
                &y_addr.to_string(),
                "lladdr",
                &format_mac(net.y.mac),
                "dev",
                "eth0",
                "nud",
                "permanent",
            ])
            .unwrap();

        // (a) ACKs of connections X does not have (its listener's port
        // and a port nobody listens on): X sends them on to Y, which takes
        // them (marked forwarded, so never further) and passes them to its
        // stack.
        seen_at_y.drain(Duration::from_millis(50), 1000).unwrap();
        let acks = [
            tcp(stranger, SocketAddr::new(vip, 80), TCP_ACK, 0),
            tcp(stranger, SocketAddr::new(vip, 81), TCP_ACK, 0),
        ];
        let (bx, by) = (x_decap.counters().unwrap(), y_decap.counters().unwrap());
        for a in &acks {
            inject.send(&outer(a, v6, 0)).unwrap();
        }
        let dx = wait_for(&x_decap, &bx, &counts(&[(Forwarded, 2)]));
        let dy = wait_for(&y_decap, &by, &counts(&[(NoCandidate, 2)]));
        let arrived = seen_at_y
            .drain(Duration::from_millis(300), 1000)
            .unwrap()
            .into_iter()
            .filter(|s| !s.outgoing && acks.iter().any(|a| s.frame.get(14..) == Some(ip_packet(a))))
            .count();
        println!(
            "{family} (a) 2 ACKs without a connection on X: X {} | Y {} | seen decapsulated in Y's stack: {arrived}",
            show(&dx),
            show(&dy)
        );
        assert_eq!(dx, counts(&[(Forwarded, 2)]), "X forwards");
        assert_eq!(dy, counts(&[(NoCandidate, 2)]), "Y keeps, never forwards");
        assert_eq!(arrived, 2, "both reach Y's stack, decapsulated");

        // (b) An ACK of a connection X has: the sender's own connection to
        // the VIP, whose 5-tuple the injected packet carries.
        let mut conn = in_ns(&net.sender.ns, || TcpStream::connect((vip, 80)))
            .unwrap()
            .unwrap();
        let (mut served, _) = listeners[usize::from(v6)].accept().unwrap();
        let mine = conn.local_addr().unwrap();
        let (bx, by) = (x_decap.counters().unwrap(), y_decap.counters().unwrap());
        inject
            .send(&outer(
                &tcp(mine, SocketAddr::new(vip, 80), TCP_ACK, 0),
                v6,
                0,
            ))
            .unwrap();
        let dx = wait_for(&x_decap, &bx, &counts(&[(Decapsulated, 1)]));
        println!(
            "{family} (b) ACK of X's connection {mine} -> {vip}:80: X {}",
            show(&dx)
        );
        assert_eq!(dx, counts(&[(Decapsulated, 1)]), "kept on X");
        // The connection still works.
        served.write_all(b"still here").unwrap();
        let mut buf = [0u8; 10];
        conn.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        conn.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"still here");

        // (c) A SYN with the option: a new connection, X's own.
        let bx = x_decap.counters().unwrap();
        inject
            .send(&outer(
                &tcp(
                    SocketAddr::new(client, 40001),
                    SocketAddr::new(vip, 80),
                    TCP_SYN,
                    0,
                ),
                v6,
                0,
            ))
            .unwrap();
        let dx = wait_for(&x_decap, &bx, &counts(&[(Decapsulated, 1)]));
        println!("{family} (c) SYN with the option: X {}", show(&dx));
        assert_eq!(dx, counts(&[(Decapsulated, 1)]), "kept on X");
        // Nothing of (b) or (c) went on to Y.
        let dy = after_a_while(&y_decap, &by);
        println!("{family} (b, c): Y {}", show(&dy));
        assert_eq!(dy, counts(&[]), "nothing reached Y");
    }
    println!(
        "totals: X {} | Y {}",
        show(&x_decap.counters().unwrap()),
        show(&y_decap.counters().unwrap())
    );
}
