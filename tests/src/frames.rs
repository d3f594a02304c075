//! Building test frames (with etherparse, independent of the code under
//! test) and taking encapsulated output frames apart.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::{Result, bail, ensure};
use etherparse::{
    IpHeaders, IpNumber, Ipv4Header, Ipv4HeaderSlice, Ipv6Header, PacketBuilder, PacketBuilderStep,
    VlanId,
};
use lb::desired::vip::Protocol;
use lb_common::{FlowKey, addr_words};

/// Source MAC of every test client.
pub const CLIENT_MAC: [u8; 6] = [0x02, 0xc1, 0x1e, 0x00, 0x00, 0x01];

/// A 5-tuple.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Flow {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: u16,
    pub dport: u16,
    pub protocol: Protocol,
}

impl Flow {
    /// The data plane's key of this flow.
    pub fn key(&self) -> FlowKey {
        let (family, src) = addr_words(self.src);
        let (_, dst) = addr_words(self.dst);
        FlowKey {
            src,
            dst,
            ports: FlowKey::ports(self.sport, self.dport),
            proto: self.protocol.number(),
            family,
            _pad: [0; 2],
        }
    }
}

/// How to dress a flow's packet.
#[derive(Clone, Debug, Default)]
pub struct FrameSpec {
    /// Destination MAC (the balancer's interface).
    pub dst_mac: [u8; 6],
    /// One 802.1Q tag with this VLAN id.
    pub vlan: Option<u16>,
    /// IPv4 options (a multiple of 4 bytes, at most 40).
    pub ipv4_options: Vec<u8>,
    /// L4 payload.
    pub payload: Vec<u8>,
}

/// A frame of `flow` dressed as `spec`.
pub fn build(flow: &Flow, spec: &FrameSpec) -> Vec<u8> {
    let proto = match flow.protocol {
        Protocol::Tcp => IpNumber::TCP,
        Protocol::Udp => IpNumber::UDP,
    };
    let ip = match (flow.src, flow.dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let mut h = Ipv4Header::new(0, 64, proto, s.octets(), d.octets()).expect("header");
            h.options = spec
                .ipv4_options
                .as_slice()
                .try_into()
                .expect("options: a multiple of 4, at most 40 bytes");
            IpHeaders::Ipv4(h, Default::default())
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => IpHeaders::Ipv6(
            Ipv6Header {
                traffic_class: 0,
                flow_label: Default::default(),
                payload_length: 0,
                next_header: proto,
                hop_limit: 64,
                source: s.octets(),
                destination: d.octets(),
            },
            Default::default(),
        ),
        _ => panic!("source and destination of a flow must be of one family"),
    };
    let eth = PacketBuilder::ethernet2(CLIENT_MAC, spec.dst_mac);
    let step: PacketBuilderStep<IpHeaders> = match spec.vlan {
        Some(v) => eth.single_vlan(VlanId::try_new(v).expect("vlan id")).ip(ip),
        None => eth.ip(ip),
    };
    let mut out = Vec::new();
    match flow.protocol {
        Protocol::Tcp => step
            .tcp(flow.sport, flow.dport, 1, 64240)
            .write(&mut out, &spec.payload),
        Protocol::Udp => step
            .udp(flow.sport, flow.dport)
            .write(&mut out, &spec.payload),
    }
    .expect("frame");
    out
}

/// Length of the L2 header: 14, or 18 with an 802.1Q tag.
pub fn l2_len(frame: &[u8]) -> usize {
    if frame[12..14] == [0x81, 0x00] {
        18
    } else {
        14
    }
}

/// The IP packet inside a frame, by its own length field (padding excluded).
pub fn ip_packet(frame: &[u8]) -> &[u8] {
    let l3 = l2_len(frame);
    let len = match frame[l3] >> 4 {
        4 => u16::from_be_bytes([frame[l3 + 2], frame[l3 + 3]]) as usize,
        6 => 40 + u16::from_be_bytes([frame[l3 + 4], frame[l3 + 5]]) as usize,
        v => panic!("IP version {v}"),
    };
    &frame[l3..l3 + len]
}

/// The outer IP header of an encapsulated frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outer {
    V4 {
        src: Ipv4Addr,
        dst: Ipv4Addr,
        proto: u8,
        ttl: u8,
        tot_len: u16,
        checksum_ok: bool,
        ihl: u8,
    },
    V6 {
        src: Ipv6Addr,
        dst: Ipv6Addr,
        next_header: u8,
        hop_limit: u8,
        payload_len: u16,
    },
}

impl Outer {
    /// Destination of the outer header: the backend.
    pub fn dst(&self) -> IpAddr {
        match self {
            Outer::V4 { dst, .. } => (*dst).into(),
            Outer::V6 { dst, .. } => (*dst).into(),
        }
    }

    /// Source of the outer header: the balancer.
    pub fn src(&self) -> IpAddr {
        match self {
            Outer::V4 { src, .. } => (*src).into(),
            Outer::V6 { src, .. } => (*src).into(),
        }
    }
}

/// An encapsulated frame, taken apart.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Encapsulated {
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    /// The 802.1Q TCI, if tagged.
    pub vlan_tci: Option<u16>,
    pub outer: Outer,
    /// The packet inside, by the outer header's length.
    pub inner: Vec<u8>,
}

/// Takes an IPIP / IPv6-in-IP frame apart, checking its lengths.
pub fn parse_encapsulated(frame: &[u8]) -> Result<Encapsulated> {
    ensure!(frame.len() >= 14, "frame of {} bytes", frame.len());
    let mut l3 = 14;
    let mut ether_type = u16::from_be_bytes([frame[12], frame[13]]);
    let mut vlan_tci = None;
    if ether_type == 0x8100 {
        ensure!(frame.len() >= 18, "truncated VLAN tag");
        vlan_tci = Some(u16::from_be_bytes([frame[14], frame[15]]));
        ether_type = u16::from_be_bytes([frame[16], frame[17]]);
        l3 = 18;
    }
    let ip = &frame[l3..];
    let (outer, inner) = match ether_type {
        0x0800 => {
            let h = Ipv4HeaderSlice::from_slice(ip)?;
            let header = h.to_header();
            let tot_len = h.total_len();
            ensure!(
                ip.len() >= tot_len as usize,
                "outer IPv4 length {tot_len} beyond frame"
            );
            let hl = h.slice().len();
            (
                Outer::V4 {
                    src: h.source_addr(),
                    dst: h.destination_addr(),
                    proto: h.protocol().0,
                    ttl: h.ttl(),
                    tot_len,
                    checksum_ok: header.calc_header_checksum() == h.header_checksum(),
                    ihl: h.ihl(),
                },
                ip[hl..tot_len as usize].to_vec(),
            )
        }
        0x86dd => {
            ensure!(ip.len() >= 40, "truncated outer IPv6 header");
            let payload_len = u16::from_be_bytes([ip[4], ip[5]]);
            ensure!(
                ip.len() >= 40 + payload_len as usize,
                "outer IPv6 length beyond frame"
            );
            let mut src = [0u8; 16];
            let mut dst = [0u8; 16];
            src.copy_from_slice(&ip[8..24]);
            dst.copy_from_slice(&ip[24..40]);
            ensure!(ip[0] >> 4 == 6, "outer IPv6 version {}", ip[0] >> 4);
            (
                Outer::V6 {
                    src: src.into(),
                    dst: dst.into(),
                    next_header: ip[6],
                    hop_limit: ip[7],
                    payload_len,
                },
                ip[40..40 + payload_len as usize].to_vec(),
            )
        }
        t => bail!("outer ether type {t:#06x} is not IPv4 or IPv6"),
    };
    let mut dst_mac = [0u8; 6];
    let mut src_mac = [0u8; 6];
    dst_mac.copy_from_slice(&frame[..6]);
    src_mac.copy_from_slice(&frame[6..12]);
    Ok(Encapsulated {
        dst_mac,
        src_mac,
        vlan_tci,
        outer,
        inner,
    })
}

fn ip_step(
    src: IpAddr,
    dst: IpAddr,
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    ttl: u8,
) -> PacketBuilderStep<IpHeaders> {
    let eth = PacketBuilder::ethernet2(src_mac, dst_mac);
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => eth.ip(IpHeaders::Ipv4(
            Ipv4Header::new(0, ttl, IpNumber::ICMP, s.octets(), d.octets()).expect("header"),
            Default::default(),
        )),
        (IpAddr::V6(s), IpAddr::V6(d)) => eth.ip(IpHeaders::Ipv6(
            Ipv6Header {
                traffic_class: 0,
                flow_label: Default::default(),
                payload_length: 0,
                next_header: IpNumber::IPV6_ICMP,
                hop_limit: ttl,
                source: s.octets(),
                destination: d.octets(),
            },
            Default::default(),
        )),
        _ => panic!("one family"),
    }
}

/// An ICMP / ICMPv6 echo request (`reply`: an echo reply) from `src` to
/// `dst`, sent from the test client's MAC to `dst_mac`.
#[allow(clippy::too_many_arguments)]
pub fn icmp_echo(
    src: IpAddr,
    dst: IpAddr,
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    ttl: u8,
    id: u16,
    seq: u16,
    payload: &[u8],
    reply: bool,
) -> Vec<u8> {
    let step = ip_step(src, dst, src_mac, dst_mac, ttl);
    let mut out = Vec::new();
    match (src.is_ipv4(), reply) {
        (true, false) => step.icmpv4_echo_request(id, seq).write(&mut out, payload),
        (true, true) => step.icmpv4_echo_reply(id, seq).write(&mut out, payload),
        (false, false) => step.icmpv6_echo_request(id, seq).write(&mut out, payload),
        (false, true) => step.icmpv6_echo_reply(id, seq).write(&mut out, payload),
    }
    .expect("frame");
    out
}

/// An ICMP "fragmentation needed" (IPv4) / "packet too big" (IPv6) from
/// `src` to `dst` telling `mtu`, quoting `quoted` (an IP packet, cut as the
/// sender likes).
pub fn icmp_too_big(
    src: IpAddr,
    dst: IpAddr,
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    ttl: u8,
    mtu: u32,
    quoted: &[u8],
) -> Vec<u8> {
    use etherparse::{Icmpv4Type, Icmpv6Type, icmpv4::DestUnreachableHeader};
    let step = ip_step(src, dst, src_mac, dst_mac, ttl);
    let mut out = Vec::new();
    if src.is_ipv4() {
        step.icmpv4(Icmpv4Type::DestinationUnreachable(
            DestUnreachableHeader::FragmentationNeeded {
                next_hop_mtu: mtu as u16,
            },
        ))
        .write(&mut out, quoted)
    } else {
        step.icmpv6(Icmpv6Type::PacketTooBig { mtu })
            .write(&mut out, quoted)
    }
    .expect("frame");
    out
}

/// The ones' complement sum (RFC 1071) of `bytes` as big-endian 16-bit
/// words (an odd last byte padded with zero), folded to 16 bits: 0 only if
/// every byte is 0. Data with a correct checksum sums to 0xffff.
pub fn ones_sum(bytes: &[u8]) -> u16 {
    let mut sum: u64 = bytes
        .chunks(2)
        .map(|w| u64::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// The ICMPv6 pseudo-header (RFC 8200 8.1) of an IPv6 packet, for
/// [`ones_sum`] of an ICMPv6 message: addresses, upper-layer length, next
/// header 58.
pub fn icmpv6_pseudo_header(ip: &[u8]) -> Vec<u8> {
    let len = (ip.len() - 40) as u32;
    [&ip[8..40], &len.to_be_bytes()[..], &[0, 0, 0, 58]].concat()
}

/// Whether the ICMP / ICMPv6 message of `frame` (an IP packet without
/// extension headers or options) has a checksum that verifies.
pub fn icmp_checksum_ok(frame: &[u8]) -> bool {
    let ip = ip_packet(frame);
    if ip[0] >> 4 == 4 {
        let ihl = usize::from(ip[0] & 0x0f) * 4;
        ones_sum(&ip[ihl..]) == 0xffff
    } else {
        ones_sum(&[&icmpv6_pseudo_header(ip)[..], &ip[40..]].concat()) == 0xffff
    }
}

/// TCP flags of [`tcp_segment`] (the header's byte 13).
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// A TCP segment of `flow` (which must be TCP) with `flags` (`TCP_*`),
/// sequence number `seq` and acknowledgment number `ack`, dressed as
/// `spec`; checksums correct.
pub fn tcp_segment(flow: &Flow, spec: &FrameSpec, flags: u8, seq: u32, ack: u32) -> Vec<u8> {
    assert_eq!(flow.protocol, Protocol::Tcp, "a TCP flow");
    let mut frame = build(flow, spec);
    let l3 = l2_len(&frame);
    let (l4, pseudo) = match frame[l3] >> 4 {
        4 => {
            let ihl = usize::from(frame[l3] & 0x0f) * 4;
            let len = frame.len() - l3 - ihl;
            let pseudo = [
                &frame[l3 + 12..l3 + 20],
                &[0, 6][..],
                &(len as u16).to_be_bytes()[..],
            ]
            .concat();
            (l3 + ihl, pseudo)
        }
        _ => {
            let len = frame.len() - l3 - 40;
            let pseudo = [
                &frame[l3 + 8..l3 + 40],
                &(len as u32).to_be_bytes()[..],
                &[0, 0, 0, 6][..],
            ]
            .concat();
            (l3 + 40, pseudo)
        }
    };
    frame[l4 + 4..l4 + 8].copy_from_slice(&seq.to_be_bytes());
    frame[l4 + 8..l4 + 12].copy_from_slice(&ack.to_be_bytes());
    frame[l4 + 13] = flags;
    frame[l4 + 16..l4 + 18].copy_from_slice(&[0, 0]);
    let sum = ones_sum(&[&pseudo[..], &frame[l4..]].concat());
    frame[l4 + 16..l4 + 18].copy_from_slice(&(!sum).to_be_bytes());
    frame
}

/// The balancer's second-chance option (`lb_common::second_chance`): the
/// candidate (of the outer header's family) and the `SC_*` flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SecondChance {
    pub candidate: IpAddr,
    pub flags: u8,
}

/// An outer header for [`encapsulate`].
#[derive(Clone, Copy, Debug)]
pub struct OuterSpec {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    /// One 802.1Q tag with this VLAN id.
    pub vlan: Option<u16>,
    /// The second-chance option, if any (else a plain tunnel, as the
    /// balancer sends without a candidate).
    pub sc: Option<SecondChance>,
}

/// The IP packet of `inner` (a frame) encapsulated as the balancer does:
/// IPIP / IPv6-in-IP from `outer.src` to `outer.dst`, with the
/// second-chance option (IPv4: IHL 7; IPv6: the 24-byte destination
/// options header) if `outer.sc` says so. Written byte by byte from the
/// wire format, independent of the code under test.
pub fn encapsulate(inner: &[u8], outer: &OuterSpec) -> Vec<u8> {
    let ip = ip_packet(inner);
    let proto: u8 = if ip[0] >> 4 == 4 { 4 } else { 41 };
    let mut f = Vec::new();
    f.extend_from_slice(&outer.dst_mac);
    f.extend_from_slice(&outer.src_mac);
    if let Some(v) = outer.vlan {
        f.extend_from_slice(&[0x81, 0x00]);
        f.extend_from_slice(&v.to_be_bytes());
    }
    match (outer.src, outer.dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            f.extend_from_slice(&[0x08, 0x00]);
            let opt: Vec<u8> = match outer.sc {
                Some(sc) => {
                    let IpAddr::V4(c) = sc.candidate else {
                        panic!("an IPv4 outer header names an IPv4 candidate")
                    };
                    [&[0x1e, 8, sc.flags, 0][..], &c.octets()[..]].concat()
                }
                None => Vec::new(),
            };
            let hl = 20 + opt.len();
            let tot = (hl + ip.len()) as u16;
            let mut h = vec![0x40 | (hl / 4) as u8, 0];
            h.extend_from_slice(&tot.to_be_bytes());
            h.extend_from_slice(&[0, 0, 0x40, 0, 64, proto, 0, 0]);
            h.extend_from_slice(&s.octets());
            h.extend_from_slice(&d.octets());
            h.extend_from_slice(&opt);
            let check = !ones_sum(&h);
            h[10..12].copy_from_slice(&check.to_be_bytes());
            f.extend_from_slice(&h);
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            f.extend_from_slice(&[0x86, 0xdd]);
            let ext: Vec<u8> = match outer.sc {
                Some(sc) => {
                    let IpAddr::V6(c) = sc.candidate else {
                        panic!("an IPv6 outer header names an IPv6 candidate")
                    };
                    [
                        &[proto, 2, 1, 0, 0x1e, 18, sc.flags, 0][..],
                        &c.octets()[..],
                    ]
                    .concat()
                }
                None => Vec::new(),
            };
            let next = if ext.is_empty() { proto } else { 60 };
            f.extend_from_slice(&[0x60, 0, 0, 0]);
            f.extend_from_slice(&((ext.len() + ip.len()) as u16).to_be_bytes());
            f.extend_from_slice(&[next, 64]);
            f.extend_from_slice(&s.octets());
            f.extend_from_slice(&d.octets());
            f.extend_from_slice(&ext);
        }
        _ => panic!("outer source and destination of one family"),
    }
    f.extend_from_slice(ip);
    f
}

/// The second-chance option of an encapsulated frame, if it has one in the
/// balancer's layout, and the offset of the inner packet.
pub fn second_chance_of(frame: &[u8]) -> Option<(SecondChance, usize)> {
    let l3 = l2_len(frame);
    let ip = frame.get(l3..)?;
    match *ip.first()? >> 4 {
        4 if ip.len() >= 28 && ip[0] & 0x0f == 7 && ip[20] == 0x1e && ip[21] == 8 => {
            let c: [u8; 4] = ip[24..28].try_into().ok()?;
            Some((
                SecondChance {
                    candidate: Ipv4Addr::from(c).into(),
                    flags: ip[22],
                },
                l3 + 28,
            ))
        }
        6 if ip.len() >= 64 && ip[6] == 60 && ip[41] == 2 && ip[44] == 0x1e && ip[45] == 18 => {
            let c: [u8; 16] = ip[48..64].try_into().ok()?;
            Some((
                SecondChance {
                    candidate: Ipv6Addr::from(c).into(),
                    flags: ip[46],
                },
                l3 + 64,
            ))
        }
        _ => None,
    }
}

/// `frame` (an encapsulated frame with the second-chance option, see
/// [`second_chance_of`]) as the balancer sends it without a candidate: the
/// option removed, the outer header's lengths (and IPv4 checksum) as for a
/// plain tunnel. `None` if it has no option.
pub fn without_second_chance(frame: &[u8]) -> Option<Vec<u8>> {
    let (_, inner) = second_chance_of(frame)?;
    let l3 = l2_len(frame);
    let mut out = frame[..l3].to_vec();
    if frame[l3] >> 4 == 4 {
        let mut h = frame[l3..l3 + 20].to_vec();
        h[0] = 0x45;
        let tot = u16::from_be_bytes([h[2], h[3]]) - 8;
        h[2..4].copy_from_slice(&tot.to_be_bytes());
        h[10..12].copy_from_slice(&[0, 0]);
        let sum = !ones_sum(&h);
        h[10..12].copy_from_slice(&sum.to_be_bytes());
        out.extend_from_slice(&h);
    } else {
        let mut h = frame[l3..l3 + 40].to_vec();
        h[6] = frame[l3 + 40];
        let len = u16::from_be_bytes([h[4], h[5]]) - 24;
        h[4..6].copy_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&h);
    }
    out.extend_from_slice(&frame[inner..]);
    Some(out)
}

/// A frame of a TCP segment from `src` to `dst` with `flags` and `payload`
/// bytes (checksums right; sequence 1000, acknowledgement 2000).
pub fn tcp_frame(
    src: std::net::SocketAddr,
    dst: std::net::SocketAddr,
    flags: u8,
    payload: usize,
) -> Vec<u8> {
    let flow = Flow {
        src: src.ip(),
        dst: dst.ip(),
        sport: src.port(),
        dport: dst.port(),
        protocol: Protocol::Tcp,
    };
    let spec = FrameSpec {
        payload: vec![0x5a; payload],
        ..Default::default()
    };
    tcp_segment(&flow, &spec, flags, 1000, 2000)
}
