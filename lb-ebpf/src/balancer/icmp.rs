//! ICMP on the balancer: echo requests to VIP addresses are answered,
//! "fragmentation needed" / "packet too big" errors about VIP flows go to the
//! backend that owns the flow (so path MTU discovery works with direct
//! server return), and packets too big to encapsulate are answered with such
//! an error to the client.

use aya_ebpf::{
    helpers::{bpf_csum_diff, bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::XdpContext,
};
use lb_common::{
    BackendInfo, CONFIG_ICMP_ECHO, DataplaneConfig, FAMILY_V4, FAMILY_V6, FlowKey, PROTO_TCP,
    PROTO_UDP, Reason, TOO_BIG_QUOTE, VIP_SCHED_MAGLEV, VIP_SCHED_MAGLEV_SRC, VIP_SCHED_MASK,
    VipAddrKey, flow_hash64, maglev_position, source_hash, vip_filter_slot,
};
use lb_ebpf::{
    csum::{self, fold, ipv4_header_csum},
    packet::{frame_len, ptr_at, ptr_at_mut, read_addr6, read_u32, write_addr6, write_u32},
    parse::{Icmp, PROTO_ICMP, PROTO_ICMPV6, Packet},
};
use network_types::{eth::EthHdr, ip::Ipv4Hdr, ip::Ipv6Hdr};

use crate::{
    encap,
    maps::{
        LB_BACKEND_STATS, LB_BACKENDS, LB_VIP_ADDRS, LB_VIP_STATS, count_traffic, vip_filter_has,
    },
};

const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_UNREACHABLE: u8 = 3;
const ICMP_FRAG_NEEDED: u8 = 4;
const ICMP_ECHO_REQUEST: u8 = 8;
const ICMPV6_TOO_BIG: u8 = 2;
const ICMPV6_ECHO_REQUEST: u8 = 128;
const ICMPV6_ECHO_REPLY: u8 = 129;

/// Whether `addr` is the address of a VIP (exact, unlike the filter).
#[inline(always)]
pub fn is_vip_addr(family: u8, addr: &[u32; 4]) -> bool {
    let key = VipAddrKey {
        addr: *addr,
        family,
        _pad: [0; 3],
    };
    unsafe { LB_VIP_ADDRS.get(&key) }.is_some()
}

/// An ICMP packet: `Ok` with the reason it was sent back out, `Err` with
/// why not (passes for ICMP the balancer does not handle).
#[inline(always)]
pub fn handle(ctx: &XdpContext, i: &Icmp, cfg: &DataplaneConfig) -> Result<Reason, Reason> {
    let (word, bit) = vip_filter_slot(&i.dst);
    if !vip_filter_has(word, bit) {
        return Err(Reason::NotTcpUdp);
    }
    crate::addressed_to_us(ctx)?;
    let v6 = i.family == FAMILY_V6;
    let echo = if v6 {
        i.kind == ICMPV6_ECHO_REQUEST
    } else {
        i.kind == ICMP_ECHO_REQUEST
    };
    if echo && i.code == 0 {
        if cfg.flags & CONFIG_ICMP_ECHO == 0 || !is_vip_addr(i.family, &i.dst) {
            return Err(Reason::NotTcpUdp);
        }
        echo_reply(ctx, i)?;
        return Ok(Reason::IcmpEchoReply);
    }
    let too_big = if v6 {
        i.kind == ICMPV6_TOO_BIG && i.code == 0
    } else {
        i.kind == ICMP_UNREACHABLE && i.code == ICMP_FRAG_NEEDED
    };
    if too_big {
        forward_error(ctx, i, cfg)?;
        return Ok(Reason::IcmpForwarded);
    }
    Err(Reason::NotTcpUdp)
}

/// Sets the type of the ICMP header at `h` (type, code, checksum) and
/// updates its checksum to match (`v4`: ICMPv4, whose checksum covers no
/// pseudo-header, so the data may be all zero; see `csum::replace_no_zero`).
///
/// The update carries a bad checksum over: a request that arrived corrupted
/// gets a reply its sender drops.
///
/// # Safety
/// `h` points to 4 writable bytes of the packet.
#[inline(always)]
unsafe fn set_type(h: *mut [u8; 4], icmp_type: u8, v4: bool) {
    unsafe {
        let old = u16::from_ne_bytes([(*h)[0], (*h)[1]]);
        (*h)[0] = icmp_type;
        let new = u16::from_ne_bytes([(*h)[0], (*h)[1]]);
        let check = u16::from_ne_bytes([(*h)[2], (*h)[3]]);
        let c = if v4 {
            csum::replace_no_zero(check, old, new)
        } else {
            csum::replace(check, old, new)
        }
        .to_ne_bytes();
        (*h)[2] = c[0];
        (*h)[3] = c[1];
    }
}

/// Swaps the Ethernet addresses (the reply goes back where it came from).
#[inline(always)]
fn swap_macs(ctx: &XdpContext) -> Result<(), Reason> {
    let eth: *mut EthHdr = ptr_at_mut(ctx, 0).ok_or(Reason::Malformed)?;
    unsafe {
        let dst = (*eth).dst_addr;
        (*eth).dst_addr = (*eth).src_addr;
        (*eth).src_addr = dst;
    }
    Ok(())
}

/// IPv4's reserved flag bit (RFC 791: zero when sent), as it sits in the
/// first byte of the flags field.
const IPV4_RESERVED_FLAG: u8 = 0x80;

/// Turns an echo request into its reply, in place.
///
/// The balancer answers as a host would: an IPv4 request whose header
/// checksum does not verify is dropped as malformed (a host or router
/// drops it too; the reply's header is written anew and would hide the
/// corruption). The reply keeps the request's identification, DF and TOS,
/// and sends the reserved flag bit as zero.
#[inline(always)]
fn echo_reply(ctx: &XdpContext, i: &Icmp) -> Result<(), Reason> {
    let l3 = i.l2_len;
    let h: *mut [u8; 4] = ptr_at_mut(ctx, i.icmp).ok_or(Reason::Malformed)?;
    if i.family == FAMILY_V4 {
        let ip: *mut Ipv4Hdr = ptr_at_mut(ctx, l3).ok_or(Reason::Malformed)?;
        unsafe {
            // Options would need their own handling (record route, ...).
            if (*ip).vihl != 0x45 {
                return Err(Reason::NotTcpUdp);
            }
            if csum::ipv4_header_sum(ip as *const u16) != 0xffff {
                return Err(Reason::Malformed);
            }
            let (src, dst) = ((*ip).src_addr, (*ip).dst_addr);
            (*ip).src_addr = dst;
            (*ip).dst_addr = src;
            (*ip).ttl = 64;
            (*ip).frags[0] &= !IPV4_RESERVED_FLAG;
            (*ip).check = [0, 0];
            (*ip).check = ipv4_header_csum(ip as *const u16).to_ne_bytes();
            set_type(h, ICMP_ECHO_REPLY, true);
        }
    } else {
        let ip: *mut Ipv6Hdr = ptr_at_mut(ctx, l3).ok_or(Reason::Malformed)?;
        unsafe {
            // Swapping source and destination leaves the pseudo-header sum.
            let (src, dst) = ((*ip).src_addr, (*ip).dst_addr);
            (*ip).src_addr = dst;
            (*ip).dst_addr = src;
            (*ip).hop_limit = 64;
            set_type(h, ICMPV6_ECHO_REPLY, false);
        }
    }
    swap_macs(ctx)
}

/// The flow an ICMP error is about, as the client sent it: the quoted
/// packet (which went from the VIP to the client) with its addresses and
/// ports swapped.
#[inline(always)]
fn quoted_flow(ctx: &XdpContext, i: &Icmp) -> Result<FlowKey, Reason> {
    let inner = i.icmp + 8;
    let (src, dst, proto, l4) = if i.family == FAMILY_V4 {
        let ip: *const Ipv4Hdr = ptr_at(ctx, inner).ok_or(Reason::Malformed)?;
        let (vihl, proto) = unsafe { ((*ip).vihl, (*ip).proto) };
        let ihl = ((vihl & 0x0f) as usize) * 4;
        if vihl >> 4 != 4 || ihl < Ipv4Hdr::LEN {
            return Err(Reason::Malformed);
        }
        let (s, d) = unsafe {
            (
                read_u32((*ip).src_addr.as_ptr()),
                read_u32((*ip).dst_addr.as_ptr()),
            )
        };
        ([s, 0, 0, 0], [d, 0, 0, 0], proto, inner + ihl)
    } else {
        let ip: *const Ipv6Hdr = ptr_at(ctx, inner).ok_or(Reason::Malformed)?;
        let (s, d, next) = unsafe {
            (
                read_addr6((*ip).src_addr.as_ptr()),
                read_addr6((*ip).dst_addr.as_ptr()),
                (*ip).next_hdr,
            )
        };
        (s, d, next, inner + Ipv6Hdr::LEN)
    };
    if proto != PROTO_TCP && proto != PROTO_UDP {
        // About something other than a TCP/UDP flow: for the host.
        return Err(Reason::NotTcpUdp);
    }
    // The quoted packet's source must be the VIP the error was sent to.
    if src != i.dst {
        return Err(Reason::IcmpUnmatched);
    }
    let ports: *const [u8; 4] = ptr_at(ctx, l4).ok_or(Reason::Malformed)?;
    let ports = unsafe { read_u32(ports as *const u8) };
    Ok(FlowKey {
        src: dst,
        dst: src,
        // The quoted packet's (VIP port, client port) as the client's.
        ports: ports.rotate_left(16),
        proto,
        family: i.family,
        _pad: [0; 2],
    })
}

/// The backend of `key`'s flow (`flow`: its `flow_hash64`): its
/// connection-table entry, else the VIP's hash schedulers' choice (`wrr`
/// and `least-load` cannot be recomputed).
#[inline(always)]
fn owner(
    key: &FlowKey,
    flow: u64,
    cfg: &DataplaneConfig,
) -> Result<(u32, &'static BackendInfo), Reason> {
    if let Some(owner) = crate::conntrack::peek(key, flow, cfg) {
        return Ok(owner);
    }
    let vip = crate::lookup_vip_key(key).ok_or(Reason::IcmpUnmatched)?;
    let sched = vip.flags & VIP_SCHED_MASK;
    let hash = if sched == VIP_SCHED_MAGLEV {
        (flow >> 32) as u32
    } else if sched == VIP_SCHED_MAGLEV_SRC {
        source_hash(key, vip.flags & lb_common::VIP_HASH_SRC_PORT != 0)
    } else {
        return Err(Reason::IcmpUnmatched);
    };
    let id = crate::table_entry(&vip, maglev_position(hash, cfg.table_size))
        .map_err(|_| Reason::IcmpUnmatched)?;
    let b = LB_BACKENDS.get(id).ok_or(Reason::IcmpUnmatched)?;
    Ok((id, b))
}

/// Encapsulates an ICMP "too big" error to the backend of the flow it
/// quotes.
#[inline(always)]
fn forward_error(ctx: &XdpContext, i: &Icmp, cfg: &DataplaneConfig) -> Result<(), Reason> {
    let bytes = frame_len(ctx) as u64;
    let key = quoted_flow(ctx, i)?;
    // The one hash of the quoted flow: its table slot, Maglev, the label.
    let flow = flow_hash64(&key);
    let (id, backend) = owner(&key, flow, cfg)?;
    let pkt = Packet {
        l2_len: i.l2_len,
        ip_len: i.ip_len,
        tos: i.tos,
        tcp_flags: 0,
        flow: FlowKey {
            src: i.src,
            dst: i.dst,
            ports: 0,
            proto: if i.family == FAMILY_V6 {
                PROTO_ICMPV6
            } else {
                PROTO_ICMP
            },
            family: i.family,
            _pad: [0; 2],
        },
    };
    if encap::outer_len(backend, false) + pkt.ip_len > cfg.mtu as usize {
        return Err(Reason::TooBig);
    }
    let macs = encap::cached_next_hop(ctx, id, backend, cfg)?;
    let label = if backend.family == FAMILY_V6 {
        (flow >> 32) as u32
    } else {
        0
    };
    encap::encapsulate(ctx, &pkt, backend, cfg, macs, label, None)?;
    count_traffic(&LB_VIP_STATS, backend.vip_id, bytes, 0);
    count_traffic(&LB_BACKEND_STATS, id, bytes, 0);
    Ok(())
}

/// Sum of four native words' 16-bit halves.
#[inline(always)]
fn sum_words(w: &[u32; 4]) -> u64 {
    let mut s = 0u64;
    for x in w {
        s += (x & 0xffff) as u64 + (x >> 16) as u64;
    }
    s
}

/// Replaces the packet (too big to encapsulate) with an ICMP
/// "fragmentation needed" / ICMPv6 "packet too big" to its sender, from the
/// VIP, telling `mtu` and quoting the first [`TOO_BIG_QUOTE`] bytes of it.
#[inline(always)]
///
/// `frame` is the frame's length as received (measured before any pointer
/// arithmetic: the verifier refuses arithmetic on the end pointer, which
/// LLVM would otherwise fold into the size computation here).
pub fn send_too_big(ctx: &XdpContext, pkt: &Packet, mtu: u32, frame: usize) -> Result<(), Reason> {
    let v6 = pkt.flow.family == FAMILY_V6;
    let l2 = pkt.l2_len;
    let head = if v6 {
        Ipv6Hdr::LEN + 8
    } else {
        Ipv4Hdr::LEN + 8
    };
    if pkt.ip_len < TOO_BIG_QUOTE {
        return Err(Reason::TooBig);
    }
    // As for echo requests: no answer to a packet whose header is corrupt.
    if !v6 && !ipv4_header_verifies(ctx, l2)? {
        return Err(Reason::Malformed);
    }
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(head as i32)) } != 0 {
        return Err(Reason::TooBig);
    }
    // The L2 header moves to the new front; source and destination swap.
    {
        let from: *const [u8; EthHdr::LEN + 4] = ptr_at(ctx, head).ok_or(Reason::TooBig)?;
        let to: *mut [u8; EthHdr::LEN + 4] = ptr_at_mut(ctx, 0).ok_or(Reason::TooBig)?;
        unsafe {
            for b in 0..EthHdr::LEN + 4 {
                if b < l2 {
                    (*to)[b] = (*from)[b];
                }
            }
        }
        swap_macs(ctx)?;
    }
    let want = l2 + head + TOO_BIG_QUOTE;
    let delta = want as i32 - (frame + head) as i32;
    if unsafe { bpf_xdp_adjust_tail(ctx.ctx, delta) } != 0 {
        return Err(Reason::TooBig);
    }
    // The verifier needs the offsets bounded: l2 is 14 or 18.
    let l2 = if l2 == EthHdr::LEN {
        EthHdr::LEN
    } else {
        EthHdr::LEN + 4
    };
    let quote: *const [u8; TOO_BIG_QUOTE] = ptr_at(ctx, l2 + head).ok_or(Reason::TooBig)?;
    // SAFETY: TOO_BIG_QUOTE readable bytes, checked above; a multiple of 4.
    let quote_sum = unsafe {
        bpf_csum_diff(
            core::ptr::null_mut(),
            0,
            quote as *mut u32,
            TOO_BIG_QUOTE as u32,
            0,
        )
    } as u32 as u64;
    if v6 {
        let ip: *mut Ipv6Hdr = ptr_at_mut(ctx, l2).ok_or(Reason::TooBig)?;
        let h: *mut [u8; 8] = ptr_at_mut(ctx, l2 + Ipv6Hdr::LEN).ok_or(Reason::TooBig)?;
        let len = (8 + TOO_BIG_QUOTE) as u32;
        unsafe {
            (*ip).vcf = [0x60, 0, 0, 0];
            (*ip).payload_len = (len as u16).to_be_bytes();
            (*ip).next_hdr = PROTO_ICMPV6;
            (*ip).hop_limit = 64;
            let (src, dst) = (pkt.flow.dst, pkt.flow.src);
            write_addr6((*ip).src_addr.as_mut_ptr(), src);
            write_addr6((*ip).dst_addr.as_mut_ptr(), dst);
            let m = mtu.to_be_bytes();
            *h = [ICMPV6_TOO_BIG, 0, 0, 0, m[0], m[1], m[2], m[3]];
            let mut sum = quote_sum + sum_words(&src) + sum_words(&dst);
            // Pseudo-header: upper-layer length and next header, 32 bits each.
            sum += u16::from_ne_bytes([0, 0]) as u64
                + u16::from_ne_bytes(((len >> 16) as u16).to_be_bytes()) as u64
                + u16::from_ne_bytes((len as u16).to_be_bytes()) as u64
                + u16::from_ne_bytes([0, PROTO_ICMPV6]) as u64;
            sum += u16::from_ne_bytes([ICMPV6_TOO_BIG, 0]) as u64
                + u16::from_ne_bytes([m[0], m[1]]) as u64
                + u16::from_ne_bytes([m[2], m[3]]) as u64;
            let c = (!fold(sum)).to_ne_bytes();
            (*h)[2] = c[0];
            (*h)[3] = c[1];
        }
    } else {
        let ip: *mut Ipv4Hdr = ptr_at_mut(ctx, l2).ok_or(Reason::TooBig)?;
        let h: *mut [u8; 8] = ptr_at_mut(ctx, l2 + Ipv4Hdr::LEN).ok_or(Reason::TooBig)?;
        let m = (mtu.min(0xffff) as u16).to_be_bytes();
        unsafe {
            (*ip).vihl = 0x45;
            (*ip).tos = 0;
            (*ip).tot_len = ((Ipv4Hdr::LEN + 8 + TOO_BIG_QUOTE) as u16).to_be_bytes();
            (*ip).id = [0, 0];
            // Don't fragment, as the kernel sends its own ICMP errors.
            (*ip).frags = [0x40, 0];
            (*ip).ttl = 64;
            (*ip).proto = PROTO_ICMP;
            (*ip).check = [0, 0];
            write_u32((*ip).src_addr.as_mut_ptr(), pkt.flow.dst[0]);
            write_u32((*ip).dst_addr.as_mut_ptr(), pkt.flow.src[0]);
            (*ip).check = ipv4_header_csum(ip as *const u16).to_ne_bytes();
            *h = [ICMP_UNREACHABLE, ICMP_FRAG_NEEDED, 0, 0, 0, 0, m[0], m[1]];
            let sum = quote_sum
                + u16::from_ne_bytes([ICMP_UNREACHABLE, ICMP_FRAG_NEEDED]) as u64
                + u16::from_ne_bytes([m[0], m[1]]) as u64;
            let c = (!fold(sum)).to_ne_bytes();
            (*h)[2] = c[0];
            (*h)[3] = c[1];
        }
    }
    Ok(())
}

/// Whether the IPv4 header (any length) at `l3`, 14 or 18, of a packet of
/// at least 60 bytes has a checksum that verifies.
#[inline(always)]
fn ipv4_header_verifies(ctx: &XdpContext, l3: usize) -> Result<bool, Reason> {
    // The verifier needs the offset bounded.
    let l3 = if l3 == EthHdr::LEN {
        EthHdr::LEN
    } else {
        EthHdr::LEN + 4
    };
    let h: *const [u8; 60] = ptr_at(ctx, l3).ok_or(Reason::Malformed)?;
    // IHL in bytes: a multiple of 4, at most 60 (the mask says so).
    let len = (unsafe { (*h)[0] } as u32 & 0x0f) << 2;
    // SAFETY: `len` readable bytes at `h` (checked above).
    let sum = unsafe { bpf_csum_diff(core::ptr::null_mut(), 0, h as *mut u32, len, 0) };
    Ok(fold(sum as u32 as u64) == 0xffff)
}

/// Whether a fragment to `dst` goes to a VIP address.
#[inline(always)]
pub fn fragment_to_vip(family: u8, dst: &[u32; 4]) -> bool {
    let (word, bit) = vip_filter_slot(dst);
    vip_filter_has(word, bit) && is_vip_addr(family, dst)
}

const _: () = assert!(TOO_BIG_QUOTE % 4 == 0);
