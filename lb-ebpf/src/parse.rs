//! Parsing of the headers the balancer looks at: Ethernet with at most one
//! 802.1Q tag, IPv4 (any IHL) or IPv6 (hop-by-hop, routing and destination
//! options headers walked, at most `MAX_IPV6_EXT_HEADERS`), and the TCP/UDP
//! ports or the ICMP type. Lengths are checked against each other (IP
//! against the frame, TCP data offset and UDP length against the IP
//! payload); checksums are not: the backend's stack verifies them.
//!
//! The result is a [`Parsed`] packet or the [`Reason`] the packet is not one
//! we look at further. Reading stops as soon as the verdict is known, so
//! non-IP traffic costs one header read.

use aya_ebpf::programs::XdpContext;
use lb_common::{
    FAMILY_V4, FAMILY_V6, FlowKey, MAX_IPV6_EXT_HEADERS, PROTO_TCP, PROTO_UDP, Reason,
};
use network_types::{
    eth::{EthHdr, EtherType},
    ip::{Ipv4Hdr, Ipv6Hdr},
    tcp::TcpHdr,
    udp::UdpHdr,
    vlan::VlanHdr,
};

use crate::packet::{frame_len, ptr_at, read_addr6, read_u32};

/// Ether types as they sit in the header (network order read natively).
pub const ETH_P_IPV4: u16 = EtherType::Ipv4 as u16;
pub const ETH_P_IPV6: u16 = EtherType::Ipv6 as u16;
pub const ETH_P_8021Q: u16 = EtherType::Ieee8021q as u16;

/// IPv4 "more fragments" flag and fragment offset, host order.
const IPV4_MF_OFFSET_MASK: u16 = 0x3fff;

/// What the balancer needs to know about a TCP/UDP packet.
pub struct Packet {
    /// Bytes before the IP header: 14, or 18 with a VLAN tag.
    pub l2_len: usize,
    /// The IP packet's length from its header (Ethernet padding excluded).
    pub ip_len: usize,
    /// IPv4 TOS / IPv6 traffic class, copied to the outer header.
    pub tos: u8,
    /// TCP flags (`TCP_RST`, ...); 0 for UDP.
    pub tcp_flags: u8,
    /// The 5-tuple.
    pub flow: FlowKey,
}

/// IP protocol numbers of ICMP and ICMPv6.
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_ICMPV6: u8 = 58;

/// What the frame is, as far as the balancer cares.
pub enum Parsed {
    /// TCP or UDP.
    Flow(Packet),
    /// ICMP or ICMPv6, with its first 8 bytes in the frame.
    Icmp(Icmp),
    /// An IPv4 fragment or an IPv6 packet with a fragment header.
    Fragment { family: u8, dst: [u32; 4] },
}

/// An ICMP or ICMPv6 packet.
pub struct Icmp {
    /// Bytes before the IP header: 14, or 18 with a VLAN tag.
    pub l2_len: usize,
    /// The IP packet's length from its header.
    pub ip_len: usize,
    /// Offset of the ICMP header in the frame.
    pub icmp: usize,
    pub family: u8,
    pub tos: u8,
    pub src: [u32; 4],
    pub dst: [u32; 4],
    pub kind: u8,
    pub code: u8,
}

/// Ether type of the L3 header and the L2 header's length (14, or 18 with
/// one 802.1Q tag); `None` if the frame is too short for either.
#[inline(always)]
pub fn l2_header(ctx: &XdpContext) -> Option<(u16, usize)> {
    let eth: *const EthHdr = ptr_at(ctx, 0)?;
    let ether_type = unsafe { (*eth).ether_type };
    if ether_type != ETH_P_8021Q {
        return Some((ether_type, EthHdr::LEN));
    }
    let vlan: *const VlanHdr = ptr_at(ctx, EthHdr::LEN)?;
    Some((unsafe { (*vlan).ether_type }, EthHdr::LEN + VlanHdr::LEN))
}

/// Bytes of the fast path's header block: Ethernet, IPv4 without options,
/// TCP.
const FAST_BLOCK: usize = EthHdr::LEN + Ipv4Hdr::LEN + TcpHdr::LEN;

/// Parses the frame in `ctx`.
#[inline(always)]
pub fn parse(ctx: &XdpContext) -> Result<Parsed, Reason> {
    if let Some(pkt) = parse_fast(ctx) {
        return Ok(Parsed::Flow(pkt));
    }
    let (ether_type, l2_len) = l2_header(ctx).ok_or(Reason::Malformed)?;
    match ether_type {
        ETH_P_IPV4 => parse_ipv4(ctx, l2_len),
        ETH_P_IPV6 => parse_ipv6(ctx, l2_len),
        // Includes a second VLAN tag: we handle at most one.
        _ => Err(Reason::NotIp),
    }
}

/// The common case with one bounds check: an untagged IPv4 packet without
/// options or fragmentation carrying TCP or UDP, in a frame that holds at
/// least [`FAST_BLOCK`] bytes. `None` for anything else (including every
/// malformed packet), which the general path then judges.
#[inline(always)]
fn parse_fast(ctx: &XdpContext) -> Option<Packet> {
    let p = ptr_at::<[u8; FAST_BLOCK]>(ctx, 0)? as *const u8;
    // SAFETY: every read below lies inside the checked block.
    unsafe {
        let ether_type = u16::from_ne_bytes([*p.add(12), *p.add(13)]);
        if ether_type != ETH_P_IPV4 || *p.add(14) != 0x45 {
            return None;
        }
        let proto = *p.add(23);
        let l4_len = match proto {
            PROTO_TCP => TcpHdr::LEN,
            PROTO_UDP => UdpHdr::LEN,
            _ => return None,
        };
        let frags = u16::from_be_bytes([*p.add(20), *p.add(21)]);
        let tot_len = u16::from_be_bytes([*p.add(16), *p.add(17)]) as usize;
        let l4 = EthHdr::LEN + Ipv4Hdr::LEN;
        if frags & IPV4_MF_OFFSET_MASK != 0
            || tot_len < Ipv4Hdr::LEN + l4_len
            || EthHdr::LEN + tot_len > frame_len(ctx)
            || !l4_header_valid(p.add(l4), proto, tot_len - Ipv4Hdr::LEN)
        {
            return None;
        }
        Some(Packet {
            l2_len: EthHdr::LEN,
            ip_len: tot_len,
            tos: *p.add(15),
            tcp_flags: if proto == PROTO_TCP {
                *p.add(l4 + 13)
            } else {
                0
            },
            flow: FlowKey {
                src: [read_u32(p.add(26)), 0, 0, 0],
                dst: [read_u32(p.add(30)), 0, 0, 0],
                ports: read_u32(p.add(l4)),
                proto,
                family: FAMILY_V4,
                _pad: [0; 2],
            },
        })
    }
}

#[inline(always)]
fn parse_ipv4(ctx: &XdpContext, l3: usize) -> Result<Parsed, Reason> {
    let ip: *const Ipv4Hdr = ptr_at(ctx, l3).ok_or(Reason::Malformed)?;
    let (vihl, tos, tot_len, frags, proto) = unsafe {
        (
            (*ip).vihl,
            (*ip).tos,
            u16::from_be_bytes((*ip).tot_len) as usize,
            u16::from_be_bytes((*ip).frags),
            (*ip).proto,
        )
    };
    let ihl = ((vihl & 0x0f) as usize) * 4;
    if vihl >> 4 != 4 || ihl < Ipv4Hdr::LEN || tot_len < ihl || l3 + tot_len > frame_len(ctx) {
        return Err(Reason::Malformed);
    }
    let (src, dst) = unsafe {
        (
            read_u32((*ip).src_addr.as_ptr()),
            read_u32((*ip).dst_addr.as_ptr()),
        )
    };
    if frags & IPV4_MF_OFFSET_MASK != 0 {
        return Ok(Parsed::Fragment {
            family: FAMILY_V4,
            dst: [dst, 0, 0, 0],
        });
    }
    if proto == PROTO_ICMP {
        return icmp(
            ctx,
            l3,
            tot_len,
            l3 + ihl,
            FAMILY_V4,
            tos,
            [src, 0, 0, 0],
            [dst, 0, 0, 0],
        );
    }
    let l4_len = l4_header_len(proto)?;
    if ihl + l4_len > tot_len {
        return Err(Reason::Malformed);
    }
    let (ports, tcp_flags) = read_l4(ctx, l3 + ihl, proto, tot_len - ihl)?;
    Ok(Parsed::Flow(Packet {
        l2_len: l3,
        ip_len: tot_len,
        tos,
        tcp_flags,
        flow: FlowKey {
            src: [src, 0, 0, 0],
            dst: [dst, 0, 0, 0],
            ports,
            proto,
            family: FAMILY_V4,
            _pad: [0; 2],
        },
    }))
}

/// An ICMP packet whose header starts at `at`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn icmp(
    ctx: &XdpContext,
    l3: usize,
    ip_len: usize,
    at: usize,
    family: u8,
    tos: u8,
    src: [u32; 4],
    dst: [u32; 4],
) -> Result<Parsed, Reason> {
    // The bounds check first: after the length check LLVM would consider it
    // implied (the IP length was checked against the frame) and drop it,
    // and the verifier needs it.
    let h: *const [u8; 8] = ptr_at(ctx, at).ok_or(Reason::Malformed)?;
    if at + 8 > l3 + ip_len {
        return Err(Reason::Malformed);
    }
    let (kind, code) = unsafe { ((*h)[0], (*h)[1]) };
    Ok(Parsed::Icmp(Icmp {
        l2_len: l3,
        ip_len,
        icmp: at,
        family,
        tos,
        src,
        dst,
        kind,
        code,
    }))
}

#[inline(always)]
fn parse_ipv6(ctx: &XdpContext, l3: usize) -> Result<Parsed, Reason> {
    let ip: *const Ipv6Hdr = ptr_at(ctx, l3).ok_or(Reason::Malformed)?;
    let (vcf0, vcf1, payload_len, next) = unsafe {
        (
            (*ip).vcf[0],
            (*ip).vcf[1],
            u16::from_be_bytes((*ip).payload_len) as usize,
            (*ip).next_hdr,
        )
    };
    let ip_len = Ipv6Hdr::LEN + payload_len;
    if vcf0 >> 4 != 6 || l3 + ip_len > frame_len(ctx) {
        return Err(Reason::Malformed);
    }
    let (src, dst) = unsafe {
        (
            read_addr6((*ip).src_addr.as_ptr()),
            read_addr6((*ip).dst_addr.as_ptr()),
        )
    };
    // Walk hop-by-hop, routing and destination options headers.
    let mut next = next;
    let mut at = l3 + Ipv6Hdr::LEN;
    for _ in 0..MAX_IPV6_EXT_HEADERS {
        match next {
            IPV6_HOP_BY_HOP | IPV6_DEST_OPTS | IPV6_ROUTING => {
                // Next header, length in 8-byte units beyond the first 8,
                // and for routing headers: type, segments left.
                let h: *const [u8; 4] = ptr_at(ctx, at).ok_or(Reason::Malformed)?;
                let (nh, len, left) = unsafe { ((*h)[0], (*h)[1], (*h)[3]) };
                if next == IPV6_ROUTING && left != 0 {
                    // Not the final destination yet.
                    return Err(Reason::Ipv6ExtHeader);
                }
                next = nh;
                at += (len as usize + 1) * 8;
            }
            IPV6_FRAGMENT => {
                return Ok(Parsed::Fragment {
                    family: FAMILY_V6,
                    dst,
                });
            }
            _ => break,
        }
    }
    if at > l3 + ip_len {
        return Err(Reason::Malformed);
    }
    if next == IPV6_FRAGMENT {
        return Ok(Parsed::Fragment {
            family: FAMILY_V6,
            dst,
        });
    }
    if is_ipv6_extension(next) {
        return Err(Reason::Ipv6ExtHeader);
    }
    if next == PROTO_ICMPV6 {
        return icmp(
            ctx,
            l3,
            ip_len,
            at,
            FAMILY_V6,
            (vcf0 << 4) | (vcf1 >> 4),
            src,
            dst,
        );
    }
    let l4_len = l4_header_len(next)?;
    if at + l4_len > l3 + ip_len {
        return Err(Reason::Malformed);
    }
    let (ports, tcp_flags) = read_l4(ctx, at, next, l3 + ip_len - at)?;
    Ok(Parsed::Flow(Packet {
        l2_len: l3,
        ip_len,
        tos: (vcf0 << 4) | (vcf1 >> 4),
        tcp_flags,
        flow: FlowKey {
            src,
            dst,
            ports,
            proto: next,
            family: FAMILY_V6,
            _pad: [0; 2],
        },
    }))
}

const IPV6_HOP_BY_HOP: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_DEST_OPTS: u8 = 60;

/// Length of the L4 header we require, or why we do not handle the protocol.
#[inline(always)]
fn l4_header_len(proto: u8) -> Result<usize, Reason> {
    match proto {
        PROTO_TCP => Ok(TcpHdr::LEN),
        PROTO_UDP => Ok(UdpHdr::LEN),
        _ => Err(Reason::NotTcpUdp),
    }
}

/// IPv6 extension headers (RFC 8200 and the IANA list): hop-by-hop, routing,
/// fragment, ESP, AH, destination options, mobility, HIP, shim6.
#[inline(always)]
fn is_ipv6_extension(next: u8) -> bool {
    matches!(next, 0 | 43 | 44 | 50 | 51 | 60 | 135 | 139 | 140)
}

/// TCP flag FIN in [`Packet::tcp_flags`].
pub const TCP_FIN: u8 = 0x01;
/// TCP flag RST in [`Packet::tcp_flags`].
pub const TCP_RST: u8 = 0x04;
/// TCP flag SYN in [`Packet::tcp_flags`].
pub const TCP_SYN: u8 = 0x02;
/// TCP flag ACK in [`Packet::tcp_flags`].
pub const TCP_ACK: u8 = 0x10;

/// Source and destination port as one word, as they sit on the wire, and
/// the TCP flags (0 for UDP), of the TCP/UDP header at `l4` that starts an
/// IP payload of `len` bytes. The whole L4 header must be in the frame and
/// valid ([`l4_header_valid`]).
#[inline(always)]
fn read_l4(ctx: &XdpContext, l4: usize, proto: u8, len: usize) -> Result<(u32, u8), Reason> {
    let h = if proto == PROTO_TCP {
        ptr_at::<TcpHdr>(ctx, l4).ok_or(Reason::Malformed)? as *const u8
    } else {
        ptr_at::<UdpHdr>(ctx, l4).ok_or(Reason::Malformed)? as *const u8
    };
    // SAFETY: the header's fixed part is in the frame (checked above).
    unsafe {
        if !l4_header_valid(h, proto, len) {
            return Err(Reason::Malformed);
        }
        // Byte 13 of the TCP header holds CWR..FIN.
        let flags = if proto == PROTO_TCP { *h.add(13) } else { 0 };
        Ok((read_u32(h), flags))
    }
}

/// Whether the TCP or UDP header at `h`, which starts an IP payload of
/// `len` bytes, agrees with it: a TCP data offset of at least 5 words that
/// ends within the payload, a UDP length equal to the payload's.
///
/// The balancer forwards the packet unchanged, but a header that disagrees
/// with its packet is one no stack accepts (Linux drops it too), so it is
/// dropped here as malformed before it reaches the connection table, where
/// a bogus RST would end its flow's entry.
///
/// # Safety
/// `h` is readable for the header's fixed part (20 bytes TCP, 8 UDP).
#[inline(always)]
unsafe fn l4_header_valid(h: *const u8, proto: u8, len: usize) -> bool {
    unsafe {
        if proto == PROTO_TCP {
            let words = (*h.add(12) >> 4) as usize;
            words >= 5 && words * 4 <= len
        } else {
            u16::from_be_bytes([*h.add(4), *h.add(5)]) as usize == len
        }
    }
}
