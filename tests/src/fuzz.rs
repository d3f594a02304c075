//! A fuzz harness for the XDP programs through `BPF_PROG_TEST_RUN`: random
//! frames and mutated valid ones (truncations, bad lengths, bad IHL, bad
//! checksums, odd flags, nested tunnels, VLAN stacks, IPv6 extension
//! headers, ICMP), with every output judged independently of the code
//! under test:
//!
//! - no run returns `XDP_ABORTED` (or anything but drop, pass, transmit);
//! - a passed frame is untouched;
//! - a transmitted frame answers a frame addressed to the balancer's MAC,
//!   and is a well-formed encapsulation of its input to a configured backend
//!   (the input's IP packet inside, byte for byte, its TCP data offset and
//!   UDP length agreeing with it), or the ICMP answer the input calls for
//!   (echo reply, too big) to an input whose IPv4 header checksum verifies:
//!   byte for byte, but for the echo reply's ICMP checksum, which must carry
//!   the request's sum over (a request that verifies gets a reply that
//!   verifies);
//! - the reason counters add up to the frames sent, and per verdict to the
//!   verdicts seen.
//!
//! Frames the kernel refuses (shorter than an Ethernet header) are drawn
//! again: a run of N frames runs N frames through the program.
//!
//! Used by the `fuzz` integration test and by `cargo xtask fuzz`.

use std::{collections::BTreeSet, net::IpAddr};

use anyhow::Result;
use lb::{dataplane::Decapsulator, desired::config};
use lb_common::{DecapReason, Reason, xdp_action};

use crate::{
    SplitMix,
    frames::{
        self, CLIENT_MAC, Flow, FrameSpec, icmpv6_pseudo_header, ip_packet, l2_len, ones_sum,
        parse_encapsulated,
    },
    packet_lab::{PacketLab, backend_mac},
    xdp::run_xdp,
};

/// The balancer's config under fuzz: VIPs of every kind the generator aims
/// at.
pub const CONFIG: &str = r#"
[balancer]
source_v4 = "10.200.0.1"
source_v6 = "fd00:200::1"
mtu = 1500
max_vips = 8
max_backends = 32

[[vip]]
address = "203.0.113.10"
port = 80
protocol = "tcp"
backends = [ { address = "10.200.0.11" }, { address = "10.200.0.12" }, { address = "fd00:200::33" } ]

[[vip]]
address = "203.0.113.10"
port = 53
protocol = "udp"
scheduler = "wrr"
backends = [ { address = "10.200.0.11" }, { address = "10.200.0.13" } ]

[[vip]]
address = "2001:db8:10::1"
port = 443
protocol = "tcp"
scheduler = "least-load"
backends = [ { address = "fd00:200::31" }, { address = "fd00:200::32" } ]

[[vip]]
address = "2001:db8:10::1"
port = 0
protocol = "udp"
scheduler = "maglev-src"
backends = [ { address = "fd00:200::31" }, { address = "10.200.0.14" } ]

[[vip]]
address = "2001:db8:10::1"
port = 80
protocol = "tcp"
backends = [ { address = "fd00:200::31" }, { address = "fd00:200::32" }, { address = "fd00:200::33", weight = 0 } ]
"#;

/// The two `maglev` TCP VIPs after a change that moved every table
/// position (the old backends drained: still candidates), so TCP packets
/// without an entry go out with a second-chance candidate.
const MOVED: &str = r#"
[balancer]
source_v4 = "10.200.0.1"
source_v6 = "fd00:200::1"

[[vip]]
address = "203.0.113.10"
port = 80
protocol = "tcp"
backends = [ { address = "10.200.0.11", weight = 0 }, { address = "10.200.0.12", weight = 0 }, { address = "fd00:200::33", weight = 0 }, { address = "10.200.0.13" } ]

[[vip]]
address = "2001:db8:10::1"
port = 80
protocol = "tcp"
backends = [ { address = "fd00:200::31", weight = 0 }, { address = "fd00:200::32", weight = 0 }, { address = "fd00:200::33" } ]
"#;

/// What a fuzz run found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    pub frames: u64,
    /// Runs that returned `XDP_ABORTED` or a verdict the program never gives.
    pub aborted: u64,
    /// Transmitted frames that are neither a well-formed encapsulation of
    /// their input nor the right ICMP answer.
    pub bad_forwards: u64,
    /// Passed frames that were changed.
    pub bad_passes: u64,
    /// Reason counters that do not add up to the frames and verdicts.
    pub counter_mismatch: u64,
    /// Verdicts seen (so a run is known to have reached every path).
    pub transmitted: u64,
    pub passed: u64,
    pub dropped: u64,
    /// A few examples of what went wrong, for the log.
    pub examples: Vec<String>,
}

impl Report {
    /// Whether nothing went wrong.
    pub fn clean(&self) -> bool {
        self.aborted == 0
            && self.bad_forwards == 0
            && self.bad_passes == 0
            && self.counter_mismatch == 0
    }

    fn note(&mut self, what: String) {
        if self.examples.len() < 10 {
            self.examples.push(what);
        }
    }
}

fn hex(frame: &[u8]) -> String {
    frame
        .iter()
        .take(96)
        .map(|b| format!("{b:02x}"))
        .collect::<String>()
}

/// The valid frames mutations start from.
fn templates(lab: &PacketLab, rng: &mut SplitMix) -> Vec<Vec<u8>> {
    let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
    let mut out = Vec::new();
    let flows = [
        (
            "198.18.0.9",
            "203.0.113.10",
            80,
            lb::desired::vip::Protocol::Tcp,
        ),
        (
            "198.18.0.9",
            "203.0.113.10",
            53,
            lb::desired::vip::Protocol::Udp,
        ),
        (
            "2001:db8:99::9",
            "2001:db8:10::1",
            443,
            lb::desired::vip::Protocol::Tcp,
        ),
        (
            "2001:db8:99::9",
            "2001:db8:10::1",
            5353,
            lb::desired::vip::Protocol::Udp,
        ),
        (
            "198.18.0.9",
            "198.51.100.1",
            80,
            lb::desired::vip::Protocol::Tcp,
        ),
        (
            "2001:db8:99::9",
            "2001:db8:10::1",
            80,
            lb::desired::vip::Protocol::Tcp,
        ),
    ];
    for (src, dst, dport, protocol) in flows {
        let f = Flow {
            src: ip(src),
            dst: ip(dst),
            sport: 1024 + rng.next_u16() % 60000,
            dport,
            protocol,
        };
        for payload in [0usize, 33, 1400, 1461] {
            out.push(lab.frame(
                &f,
                FrameSpec {
                    payload: vec![0x42; payload],
                    ..Default::default()
                },
            ));
        }
        out.push(lab.frame(
            &f,
            FrameSpec {
                vlan: Some(5),
                payload: vec![1; 20],
                ..Default::default()
            },
        ));
        if f.src.is_ipv4() {
            out.push(lab.frame(
                &f,
                FrameSpec {
                    ipv4_options: vec![1, 1, 1, 1, 0, 0, 0, 0],
                    ..Default::default()
                },
            ));
        }
    }
    for (client, vip) in [
        ("198.18.0.9", "203.0.113.10"),
        ("2001:db8:99::9", "2001:db8:10::1"),
    ] {
        out.push(frames::icmp_echo(
            ip(client),
            ip(vip),
            CLIENT_MAC,
            lab.if_mac,
            64,
            7,
            1,
            b"fuzz",
            false,
        ));
        let reply = Flow {
            src: ip(vip),
            dst: ip(client),
            sport: if vip.contains(':') { 443 } else { 80 },
            dport: 40000,
            protocol: lb::desired::vip::Protocol::Tcp,
        };
        let quoted = ip_packet(&frames::build(&reply, &FrameSpec::default())).to_vec();
        let router = if vip.contains(':') {
            "2001:db8:ffff::1"
        } else {
            "192.0.2.1"
        };
        out.push(frames::icmp_too_big(
            ip(router),
            ip(vip),
            CLIENT_MAC,
            lab.if_mac,
            64,
            1280,
            &quoted,
        ));
    }
    // To a VIP, but for another host's MAC, and broadcast.
    for mac in [[0x02, 0x11, 0x22, 0x33, 0x44, 0x55], [0xff; 6]] {
        let mut f = out[0].clone();
        f[..6].copy_from_slice(&mac);
        out.push(f);
    }
    // A tunnel inside: what the balancer sends, arriving at the balancer.
    let nested = out[0].clone();
    let mut tunnel = lab.frame(
        &Flow {
            src: ip("198.18.0.9"),
            dst: ip("203.0.113.10"),
            sport: 1,
            dport: 80,
            protocol: lb::desired::vip::Protocol::Tcp,
        },
        FrameSpec {
            payload: nested[14..].to_vec(),
            ..Default::default()
        },
    );
    tunnel[14 + 9] = 4; // IPIP
    out.push(tunnel);
    // Two VLAN tags.
    let mut qinq = out[0].clone();
    qinq.splice(12..12, [0x81, 0x00, 0x00, 0x07]);
    out.push(qinq);
    out
}

/// One frame: a template with mutations, or random bytes.
fn frame(templates: &[Vec<u8>], rng: &mut SplitMix) -> Vec<u8> {
    if rng.next_u32().is_multiple_of(16) {
        let len = (rng.next_u32() % 1600) as usize;
        return (0..len).map(|_| rng.next_u16() as u8).collect();
    }
    let mut f = templates[rng.next_u32() as usize % templates.len()].clone();
    let l3 = l2_len(&f).min(f.len());
    for _ in 0..rng.next_u32() % 4 {
        if f.is_empty() {
            break;
        }
        let at = |f: &Vec<u8>, off: usize| (l3 + off).min(f.len() - 1);
        match rng.next_u32() % 11 {
            0 => {
                let n = rng.next_u32() as usize % f.len();
                f.truncate(n);
            }
            1 | 2 => {
                let i = rng.next_u32() as usize % f.len();
                f[i] = rng.next_u16() as u8;
            }
            3 => {
                // IPv4 total length or IPv6 payload length.
                let i = at(&f, 2);
                let v = rng.next_u16().to_be_bytes();
                f[i] = v[0];
                if i + 1 < f.len() {
                    f[i + 1] = v[1];
                }
                let j = at(&f, 4);
                f[j] = v[1];
            }
            4 => {
                // Version and IHL.
                let i = at(&f, 0);
                f[i] = (f[i] & 0xf0) | (rng.next_u16() as u8 & 0x0f);
            }
            5 => {
                // Flags and fragment offset; IPv6 next header.
                let i = at(&f, 6);
                f[i] = rng.next_u16() as u8;
            }
            6 => {
                // Checksums: IPv4 header, and the L4 one somewhere after.
                let i = at(&f, 10);
                f[i] ^= 0xff;
                let j = at(&f, 20 + rng.next_u32() as usize % 20);
                f[j] ^= rng.next_u16() as u8;
            }
            7 => {
                // TCP flags.
                let i = at(&f, 20 + 13);
                f[i] = rng.next_u16() as u8;
            }
            8 => {
                let n = rng.next_u32() % 64;
                f.extend((0..n).map(|_| rng.next_u16() as u8));
            }
            9 => {
                // TCP data offset or UDP length (behind IPv4 without
                // options, or IPv6).
                let l4 = if f[l3.min(f.len() - 1)] >> 4 == 6 {
                    40
                } else {
                    20
                };
                let i = at(&f, l4 + [12, 4, 5][rng.next_u32() as usize % 3]);
                f[i] = rng.next_u16() as u8;
            }
            _ => {
                // The IPv6 next header, and an extension header behind it.
                let i = at(&f, 6);
                f[i] = [0u8, 43, 44, 60, 51, 58][rng.next_u32() as usize % 6];
            }
        }
    }
    f
}

/// A frame from [`frame`] that `BPF_PROG_TEST_RUN` takes (at least an
/// Ethernet header's 14 bytes): shorter ones are drawn again.
fn runnable_frame(templates: &[Vec<u8>], rng: &mut SplitMix) -> Vec<u8> {
    loop {
        let f = frame(templates, rng);
        if f.len() >= 14 {
            return f;
        }
    }
}

/// Whether the IPv4 header at `l3` of `frame` has a checksum that verifies.
fn ipv4_header_ok(frame: &[u8], l3: usize) -> bool {
    let ihl = usize::from(frame[l3] & 0x0f) * 4;
    frame.len() >= l3 + ihl && ones_sum(&frame[l3..l3 + ihl]) == 0xffff
}

/// The sum an ICMP / ICMPv6 checksum verifies against, of the message at
/// `at` in `frame` (IPv6 packet at `l3`: with its pseudo-header).
fn icmp_sum(frame: &[u8], l3: usize, at: usize) -> u16 {
    let end = l3 + ip_packet(frame).len();
    if frame[l3] >> 4 == 6 {
        ones_sum(&[&icmpv6_pseudo_header(&frame[l3..end])[..], &frame[at..end]].concat())
    } else {
        ones_sum(&frame[at..end])
    }
}

/// Judges `output` as the echo reply to `input`: the request turned around
/// (MACs and addresses swapped, TTL / hop limit 64, IPv4's reserved flag
/// clear and its header checksum recomputed; only a request whose IPv4
/// header verifies is answered), the ICMP type 0 / 129, and an ICMP
/// checksum that carries the request's sum over: the same sum, one that
/// verifies if the request's did (so a request with a bad checksum gets a
/// reply with a bad checksum). `None`: `output` is no echo reply.
fn judge_echo_reply(input: &[u8], output: &[u8]) -> Option<Result<(), String>> {
    let l3 = l2_len(input);
    if input.len() < l3 + 20 {
        return None;
    }
    let v6 = input[l3] >> 4 == 6;
    let icmp = if v6 { l3 + 40 } else { l3 + 20 };
    if output.len() != input.len() || output.len() < icmp + 8 {
        return None;
    }
    let mut want = input.to_vec();
    want[..6].copy_from_slice(&input[6..12]);
    want[6..12].copy_from_slice(&input[..6]);
    let addrs = if v6 {
        l3 + 8..l3 + 40
    } else {
        l3 + 12..l3 + 20
    };
    let half = addrs.len() / 2;
    let (s, d) = input[addrs.clone()].split_at(half);
    want[addrs.clone()].copy_from_slice(&[d, s].concat());
    if v6 {
        want[l3 + 7] = 64;
    } else {
        want[l3 + 8] = 64;
        want[l3 + 6] &= 0x7f;
        want[l3 + 10..l3 + 12].copy_from_slice(&[0, 0]);
        let c = !ones_sum(&want[l3..l3 + 20]);
        want[l3 + 10..l3 + 12].copy_from_slice(&c.to_be_bytes());
    }
    want[icmp] = if v6 { 129 } else { 0 };
    // Everything but the ICMP checksum, byte for byte.
    want[icmp + 2..icmp + 4].copy_from_slice(&output[icmp + 2..icmp + 4]);
    if output != want {
        return None;
    }
    Some(if !v6 && !ipv4_header_ok(input, l3) {
        Err("answered a request whose IPv4 header checksum fails".into())
    } else {
        let (before, after) = (icmp_sum(input, l3, icmp), icmp_sum(output, l3, icmp));
        if before % 0xffff != after % 0xffff {
            Err(format!(
                "reply sums to {after:#06x}, the request to {before:#06x}"
            ))
        } else if before == 0xffff && after != 0xffff {
            Err("the request's checksum verifies, the reply's does not".into())
        } else {
            Ok(())
        }
    })
}

/// Whether the TCP/UDP packet (or ICMP error) inside `input` has headers
/// that agree with each other, as etherparse sees them: for UDP, the
/// length is the datagram's.
/// The TCP flags of `input`, if it is a TCP segment.
fn tcp_flags(input: &[u8]) -> Option<u8> {
    use etherparse::{SlicedPacket, TransportSlice};
    match SlicedPacket::from_ethernet(input).ok()?.transport {
        Some(TransportSlice::Tcp(t)) => Some(t.slice()[13]),
        _ => None,
    }
}

fn l4_ok(input: &[u8]) -> Result<(), String> {
    use etherparse::{SlicedPacket, TransportSlice};
    let p =
        SlicedPacket::from_ethernet(input).map_err(|e| format!("forwarded a bad frame: {e}"))?;
    let payload = p
        .net
        .as_ref()
        .and_then(|n| n.ip_payload_ref())
        .map_or(0, |p| p.payload.len());
    match p.transport {
        Some(TransportSlice::Tcp(_) | TransportSlice::Icmpv4(_) | TransportSlice::Icmpv6(_)) => {
            Ok(())
        }
        Some(TransportSlice::Udp(u)) if usize::from(u.length()) == payload => Ok(()),
        Some(TransportSlice::Udp(u)) => Err(format!(
            "forwarded UDP of length {} in {payload} bytes",
            u.length()
        )),
        _ => Err("forwarded something that is not TCP, UDP or ICMP".into()),
    }
}

/// The "too big" answer `input` calls for, from its destination back to its
/// source, telling `mtu`.
fn expected_too_big(input: &[u8], mtu: u32) -> Option<Vec<u8>> {
    let l3 = l2_len(input);
    let packet = ip_packet(input);
    let (src, dst): (IpAddr, IpAddr) = if input[l3] >> 4 == 6 {
        let s: [u8; 16] = input[l3 + 8..l3 + 24].try_into().ok()?;
        let d: [u8; 16] = input[l3 + 24..l3 + 40].try_into().ok()?;
        (s.into(), d.into())
    } else {
        let s: [u8; 4] = input[l3 + 12..l3 + 16].try_into().ok()?;
        let d: [u8; 4] = input[l3 + 16..l3 + 20].try_into().ok()?;
        (s.into(), d.into())
    };
    if input[l3] >> 4 == 4 && !ipv4_header_ok(input, l3) {
        return None;
    }
    let src_mac: [u8; 6] = input[6..12].try_into().ok()?;
    let dst_mac: [u8; 6] = input[..6].try_into().ok()?;
    let mut out = frames::icmp_too_big(dst, src, dst_mac, src_mac, 64, mtu, packet.get(..512)?);
    if l3 == 18 {
        out.splice(12..12, input[12..16].iter().copied());
    }
    Some(out)
}

/// Judges one transmitted frame (`our_mac`: the balancer's interface);
/// `Err` says what is wrong with it.
fn judge_tx(
    input: &[u8],
    output: &[u8],
    our_mac: [u8; 6],
    backends: &BTreeSet<IpAddr>,
    sources: &[IpAddr],
) -> Result<(), String> {
    if input[..6] != our_mac {
        return Err("transmitted a frame for another MAC".into());
    }
    // A second-chance candidate: only for a TCP packet without SYN, another
    // backend of the same family, not yet forwarded; the rest is judged as
    // the plain tunnel it stands for.
    let plain;
    let output = match frames::second_chance_of(output) {
        Some((sc, _)) => {
            let tcp_past_syn = tcp_flags(input).is_some_and(|f| f & 0x02 == 0);
            if !tcp_past_syn {
                return Err("a candidate on a packet that is not TCP past its SYN".into());
            }
            if !backends.contains(&sc.candidate) || sc.flags != 0 {
                return Err(format!("candidate {} flags {}", sc.candidate, sc.flags));
            }
            plain = frames::without_second_chance(output).expect("it has the option");
            if let Ok(e) = parse_encapsulated(&plain)
                && (e.outer.dst() == sc.candidate
                    || e.outer.dst().is_ipv4() != sc.candidate.is_ipv4())
            {
                return Err("the candidate is the backend, or of another family".into());
            }
            &plain[..]
        }
        None => output,
    };
    if let Ok(e) = parse_encapsulated(output)
        && matches!(
            &e.outer,
            frames::Outer::V4 { proto: 4 | 41, .. }
                | frames::Outer::V6 {
                    next_header: 4 | 41,
                    ..
                }
        )
    {
        if !backends.contains(&e.outer.dst()) {
            return Err(format!("encapsulated to {}, no backend", e.outer.dst()));
        }
        if !sources.contains(&e.outer.src()) {
            return Err(format!("outer source {}", e.outer.src()));
        }
        if e.dst_mac != backend_mac(e.outer.dst()) {
            return Err("destination MAC is not the backend's neighbour".into());
        }
        if let frames::Outer::V4 {
            checksum_ok, ttl, ..
        } = e.outer
            && (!checksum_ok || ttl != 64)
        {
            return Err("bad outer IPv4 header".into());
        }
        if l2_len(output) != l2_len(input) {
            return Err("the VLAN tag changed".into());
        }
        if e.inner != ip_packet(input) {
            return Err("the inner packet is not the input's".into());
        }
        return l4_ok(input);
    }
    if let Some(verdict) = judge_echo_reply(input, output) {
        return verdict;
    }
    for mtu in [1480, 1460] {
        if Some(output.to_vec()) == expected_too_big(input, mtu) {
            return Ok(());
        }
    }
    Err("neither an encapsulation of the input nor its ICMP answer".into())
}

/// Sends `frames` generated frames (seeded by `seed`) through the balancer.
pub fn balancer(frames: u64, seed: u64) -> Result<Report> {
    let mut lab = PacketLab::new(CONFIG)?;
    for vip in &config::parse(MOVED, "fuzz config, moved")?.vips {
        lab.dp.set_vip(vip)?;
    }
    let cfg = config::parse(CONFIG, "fuzz config")?;
    let backends: BTreeSet<IpAddr> = cfg
        .vips
        .iter()
        .flat_map(|v| v.backends.iter().map(|b| b.addr))
        .collect();
    let sources: Vec<IpAddr> = vec!["10.200.0.1".parse()?, "fd00:200::1".parse()?];
    let mut rng = SplitMix(seed);
    let templates = templates(&lab, &mut rng);
    let before = lab.dp.counters()?;
    let mut report = Report::default();
    let (mut tx, mut pass, mut drop) = (0u64, 0u64, 0u64);
    for n in 0..frames {
        let input = runnable_frame(&templates, &mut rng);
        report.frames += 1;
        let r = lab.run(&input)?;
        match r.action {
            xdp_action::XDP_TX => {
                tx += 1;
                if let Err(why) = judge_tx(&input, &r.frame, lab.if_mac, &backends, &sources) {
                    report.bad_forwards += 1;
                    report.note(format!(
                        "frame {n}: {why}: in {} out {}",
                        hex(&input),
                        hex(&r.frame)
                    ));
                }
            }
            xdp_action::XDP_PASS => {
                pass += 1;
                if r.frame != input {
                    report.bad_passes += 1;
                    report.note(format!("frame {n}: passed but changed: {}", hex(&input)));
                }
            }
            xdp_action::XDP_DROP => drop += 1,
            other => {
                report.aborted += 1;
                report.note(format!("frame {n}: verdict {other}: {}", hex(&input)));
            }
        }
    }
    (report.transmitted, report.passed, report.dropped) = (tx, pass, drop);
    let after = lab.dp.counters()?;
    let by = |action: u32| -> u64 {
        Reason::ALL
            .iter()
            .filter(|r| r.action() == action)
            .map(|r| after.reason(*r) - before.reason(*r))
            .sum()
    };
    let total: u64 = Reason::ALL
        .iter()
        .map(|r| after.reason(*r) - before.reason(*r))
        .sum();
    for (what, counted, seen) in [
        ("all", total, report.frames),
        ("transmit", by(xdp_action::XDP_TX), tx),
        ("pass", by(xdp_action::XDP_PASS), pass),
        ("drop", by(xdp_action::XDP_DROP), drop),
    ] {
        if counted != seen {
            report.counter_mismatch += counted.abs_diff(seen);
            report.note(format!("{what}: reasons count {counted}, verdicts {seen}"));
        }
    }
    Ok(report)
}

/// Sends `frames` generated frames through the backend-side decapsulator:
/// the balancer's real output, mutated, and the balancer's input frames.
pub fn decapsulator(frames: u64, seed: u64) -> Result<Report> {
    let mut lab = PacketLab::new(CONFIG)?;
    let mut decap = Decapsulator::load()?;
    let local: Vec<IpAddr> = vec![
        "10.200.0.11".parse()?,
        "fd00:200::31".parse()?,
        "10.200.0.14".parse()?,
    ];
    decap.set_addresses(&local)?;
    let mut rng = SplitMix(seed);
    let mut templates = templates(&lab, &mut rng);
    // What the balancer sends: the tunnels the decapsulator is for.
    let mut tunnels = Vec::new();
    for t in &templates {
        let r = lab.run(t)?;
        if r.action == xdp_action::XDP_TX && parse_encapsulated(&r.frame).is_ok() {
            tunnels.push(r.frame);
        }
    }
    templates.extend(tunnels.iter().cloned());
    templates.extend(tunnels);
    let before = decap.counters()?;
    let mut report = Report::default();
    let (mut pass, mut drop) = (0u64, 0u64);
    for n in 0..frames {
        let input = runnable_frame(&templates, &mut rng);
        report.frames += 1;
        let r = run_xdp(decap.program()?, &input, 0, 1)?;
        match r.action {
            xdp_action::XDP_PASS => {
                pass += 1;
                if r.frame != input {
                    // Changed: it must be the decapsulation of the input.
                    // Ethernet padding after the outer packet stays after
                    // the inner one.
                    let ok = parse_encapsulated(&input).is_ok_and(|e| {
                        let l2 = l2_len(&input);
                        let padding = &input[l2 + ip_packet(&input).len()..];
                        let want: Vec<u8> = [&e.inner[..], padding].concat();
                        r.frame.len() >= l2
                            && r.frame[..12] == input[..12]
                            && l2_len(&r.frame) == l2
                            && r.frame[l2..] == want[..]
                            && local.contains(&e.outer.dst())
                    });
                    if !ok {
                        report.bad_forwards += 1;
                        report.note(format!(
                            "frame {n}: changed, not a decapsulation: in {} out {}",
                            hex(&input),
                            hex(&r.frame)
                        ));
                    }
                }
            }
            xdp_action::XDP_DROP => drop += 1,
            other => {
                report.aborted += 1;
                report.note(format!("frame {n}: verdict {other}: {}", hex(&input)));
            }
        }
    }
    (report.passed, report.dropped) = (pass, drop);
    let after = decap.counters()?;
    let delta = |r: DecapReason| after[r as usize] - before[r as usize];
    let counted_drop: u64 = DecapReason::ALL
        .iter()
        .filter(|r| r.action() == xdp_action::XDP_DROP)
        .map(|r| delta(*r))
        .sum();
    let total: u64 = DecapReason::ALL.iter().map(|r| delta(*r)).sum();
    for (what, counted, seen) in [
        ("all", total, report.frames),
        ("drop", counted_drop, drop),
        ("pass", total - counted_drop, pass),
    ] {
        if counted != seen {
            report.counter_mismatch += counted.abs_diff(seen);
            report.note(format!("{what}: reasons count {counted}, verdicts {seen}"));
        }
    }
    Ok(report)
}
