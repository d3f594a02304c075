//! The decapsulator object (`lb-decap`), for backends: strips the outer
//! IPIP / IPv6-in-IP header from packets addressed to this host and passes
//! the inner packet to the stack, so a backend needs no `ipip` module. Also
//! `lb_pass`, an `XDP_PASS` program for veth peers (see `lb_common`).
//!
//! Non-tunnel traffic and tunnels to other addresses pass untouched; a
//! tunnel to this host with a bad outer or inner header is dropped. Every
//! packet counts one [`DecapReason`]. Nothing is logged.
//!
//! # Second chance
//! An outer header may carry the balancer's second-chance option
//! (`lb_common::second_chance`): an IPv4 header of IHL 7 whose option is
//! [`ScOptionV4`], or an IPv6 header followed by the destination options
//! header [`ScDestOptsV6`]. Both are stripped with the outer header. For a
//! TCP packet that is not a SYN, the option makes the decapsulator look the
//! connection up among this host's sockets first (`bpf_skc_lookup_tcp`, in
//! the namespace of the interface). The connection is *here* if a socket
//! other than a listener has the 5-tuple (established, closing, time-wait,
//! or a request socket of a handshake in progress), or if only a listener
//! has it and the packet is an ACK that completes a SYN-cookie handshake
//! (`bpf_tcp_check_syncookie`). Otherwise the packet is sent on, still
//! encapsulated, to the candidate the option names, once: the option is
//! marked `SC_FORWARDED`, the outer source becomes this host and the outer
//! destination the candidate, and the frame leaves with `XDP_TX` towards the
//! next hop the FIB gives (the ingress interface only). A packet already
//! forwarded, or whose candidate is this host or none, is decapsulated and
//! passed: the stack resets it. Packets without the option never pay for a
//! lookup.
//!
//! All this only with `lbd decap --second-chance` ([`DECAP_SECOND_CHANCE`]
//! in `LB_DECAP_CONFIG`); without it the option is stripped like the rest of
//! the outer header and nothing is looked up. The FIB lookup, as the
//! balancer's, answers only on an interface that forwards
//! (`net.ipv4.conf.<iface>.forwarding`, and the IPv6 one for IPv6 outer
//! headers), which `--second-chance` turns on; elsewhere every forward fails
//! (`ForwardFailed`) and the packet is decapsulated and passed, as without
//! the option. A next hop without a resolved neighbour entry (the backends
//! of a pool rarely talk to each other) drops the packet
//! (`NeighbourPending`: TCP sends it again) and notes the candidate in
//! `LB_DECAP_WANTED`, from which `lbd decap` has the kernel resolve it.
#![no_std]
#![no_main]

use core::{ffi::c_void, mem::size_of};

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_F_CURRENT_NETNS, BPF_TCP_LISTEN, bpf_sock_tuple,
        bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1 as SockTupleV4,
        bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2 as SockTupleV6, tcphdr, xdp_action,
    },
    helpers::{bpf_sk_release, bpf_skc_lookup_tcp, bpf_tcp_check_syncookie, bpf_xdp_adjust_head},
    macros::{map, xdp},
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
    programs::XdpContext,
};
use lb_common::{
    DECAP_MAX_ADDRS, DECAP_MAX_WANTED, DECAP_REASON_COUNT, DECAP_SECOND_CHANCE, DecapReason,
    FAMILY_V4, FAMILY_V6, HostAddr, PROTO_DSTOPTS, PROTO_IPIP, PROTO_IPV6, PROTO_TCP, SC_FORWARDED,
    SC_OPTION_TYPE, SC_V4_LEN, SC_V6_EXT_LEN, SC_V6_LEN, SC_V6_PAD, ScDestOptsV6, ScOptionV4,
};
use lb_ebpf::{
    csum::replace,
    packet::{frame_len, ptr_at, ptr_at_mut, read_addr6, read_u32, write_addr6, write_u32},
    parse::{ETH_P_IPV4, ETH_P_IPV6, l2_header},
};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
    tcp::TcpHdr,
    vlan::VlanHdr,
};

#[map(name = "LB_DECAP_ADDRS")]
static LB_DECAP_ADDRS: HashMap<HostAddr, u8> = HashMap::with_max_entries(DECAP_MAX_ADDRS, 0);

#[map(name = "LB_DECAP_STATS")]
static LB_DECAP_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(DECAP_REASON_COUNT, 0);

/// The `DECAP_*` flags (`lbd decap` writes them before attaching).
#[map(name = "LB_DECAP_CONFIG")]
static LB_DECAP_CONFIG: Array<u32> = Array::with_max_entries(1, 0);

/// Candidates whose next hop had no resolved neighbour entry: `lbd decap`
/// asks the kernel to resolve and keep them, and removes them here.
#[map(name = "LB_DECAP_WANTED")]
static LB_DECAP_WANTED: LruHashMap<HostAddr, u32> =
    LruHashMap::with_max_entries(DECAP_MAX_WANTED, 0);

/// IPv4 "more fragments" flag and fragment offset, host order.
const IPV4_MF_OFFSET_MASK: u16 = 0x3fff;

/// TCP flags (byte 13 of the header).
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

/// Outer IPv4 header with the second-chance option: IHL 7.
const SC_V4_HDR_LEN: usize = Ipv4Hdr::LEN + size_of::<ScOptionV4>();
/// Outer IPv6 header with the second-chance destination options header.
const SC_V6_HDR_LEN: usize = Ipv6Hdr::LEN + size_of::<ScDestOptsV6>();

/// The decapsulator.
#[xdp]
pub fn lb_decap(ctx: XdpContext) -> u32 {
    let reason = try_decap(&ctx);
    if let Some(c) = LB_DECAP_STATS.get_ptr_mut(reason as u32) {
        // Per-CPU value: no other CPU writes it.
        unsafe { *c += 1 };
    }
    reason.action()
}

/// Passes everything.
#[xdp]
pub fn lb_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// An outer header to strip.
struct Tunnel {
    outer_len: usize,
    /// Ether type of the inner packet.
    inner_type: u16,
    /// The second-chance option, if the outer header carries ours.
    sc: Option<SecondChance>,
}

/// What the second-chance option says, and where the packet is.
struct SecondChance {
    /// Family of the outer header (and of the candidate).
    family: u8,
    flags: u8,
    candidate: [u32; 4],
    /// The outer destination: this host.
    local: [u32; 4],
    /// Offset and length (from the outer header) of the inner packet, and
    /// the outer protocol saying which version it is.
    inner_off: usize,
    inner_len: usize,
    inner_proto: u8,
}

#[inline(always)]
fn try_decap(ctx: &XdpContext) -> DecapReason {
    let Some((ether_type, l2)) = l2_header(ctx) else {
        return DecapReason::NotTunnel;
    };
    let tunnel = match ether_type {
        ETH_P_IPV4 => outer_ipv4(ctx, l2),
        ETH_P_IPV6 => outer_ipv6(ctx, l2),
        _ => Err(DecapReason::NotTunnel),
    };
    let tunnel = match tunnel {
        Ok(t) => t,
        Err(r) => return r,
    };
    let reason = match &tunnel.sc {
        Some(sc) if second_chance_on() => second_chance(ctx, l2, sc),
        _ => DecapReason::Decapsulated,
    };
    if reason == DecapReason::Forwarded {
        // Sent on as it is (rewritten in place): nothing to strip.
        return reason;
    }
    match strip(ctx, l2, &tunnel) {
        Ok(()) => reason,
        Err(r) => r,
    }
}

#[inline(always)]
fn is_local(family: u8, addr: [u32; 4]) -> bool {
    let key = HostAddr {
        addr,
        family,
        _pad: [0; 3],
    };
    LB_DECAP_ADDRS.get_ptr(&key).is_some()
}

#[inline(always)]
fn outer_ipv4(ctx: &XdpContext, l3: usize) -> Result<Tunnel, DecapReason> {
    let ip: *const Ipv4Hdr = ptr_at(ctx, l3).ok_or(DecapReason::NotTunnel)?;
    let (vihl, tot_len, frags, proto, dst) = unsafe {
        (
            (*ip).vihl,
            u16::from_be_bytes((*ip).tot_len) as usize,
            u16::from_be_bytes((*ip).frags),
            (*ip).proto,
            read_u32((*ip).dst_addr.as_ptr()),
        )
    };
    if proto != PROTO_IPIP && proto != PROTO_IPV6 {
        return Err(DecapReason::NotTunnel);
    }
    if !is_local(FAMILY_V4, [dst, 0, 0, 0]) {
        return Err(DecapReason::NotLocal);
    }
    let ihl = ((vihl & 0x0f) as usize) * 4;
    if vihl >> 4 != 4
        || ihl < Ipv4Hdr::LEN
        || tot_len < ihl
        || l3 + tot_len > frame_len(ctx)
        || frags & IPV4_MF_OFFSET_MASK != 0
    {
        return Err(DecapReason::Malformed);
    }
    let inner_type = inner(ctx, l3 + ihl, tot_len - ihl, proto)?;
    let mut sc = None;
    if ihl > Ipv4Hdr::LEN {
        // Options: ours is the only one, in a header of IHL 7. Any other
        // first option is not ours to read (stripped with the header).
        let opt: *const [u8; 2] = ptr_at(ctx, l3 + Ipv4Hdr::LEN).ok_or(DecapReason::Malformed)?;
        let (kind, len) = unsafe { ((*opt)[0], (*opt)[1]) };
        if kind == SC_OPTION_TYPE {
            if ihl != SC_V4_HDR_LEN || len != SC_V4_LEN {
                return Err(DecapReason::Malformed);
            }
            let opt: *const [u8; 8] =
                ptr_at(ctx, l3 + Ipv4Hdr::LEN).ok_or(DecapReason::Malformed)?;
            let (flags, candidate) = unsafe { ((*opt)[2], read_u32((opt as *const u8).add(4))) };
            sc = Some(SecondChance {
                family: FAMILY_V4,
                flags,
                candidate: [candidate, 0, 0, 0],
                local: [dst, 0, 0, 0],
                inner_off: l3 + ihl,
                inner_len: tot_len - ihl,
                inner_proto: proto,
            });
        }
    }
    Ok(Tunnel {
        outer_len: ihl,
        inner_type,
        sc,
    })
}

#[inline(always)]
fn outer_ipv6(ctx: &XdpContext, l3: usize) -> Result<Tunnel, DecapReason> {
    let ip: *const Ipv6Hdr = ptr_at(ctx, l3).ok_or(DecapReason::NotTunnel)?;
    let (vcf0, payload_len, mut next) = unsafe {
        (
            (*ip).vcf[0],
            u16::from_be_bytes((*ip).payload_len) as usize,
            (*ip).next_hdr,
        )
    };
    let mut ext_len = 0;
    if next == PROTO_DSTOPTS {
        // Ours only with exactly our layout; anything else is not a tunnel
        // (a truncated one cannot be told, so it is not one either).
        let opts: *const [u8; 8] = ptr_at(ctx, l3 + Ipv6Hdr::LEN).ok_or(DecapReason::NotTunnel)?;
        let (inner_next, hdr_ext_len, kind) = unsafe { ((*opts)[0], (*opts)[1], (*opts)[4]) };
        if hdr_ext_len != SC_V6_EXT_LEN
            || kind != SC_OPTION_TYPE
            || (inner_next != PROTO_IPIP && inner_next != PROTO_IPV6)
        {
            return Err(DecapReason::NotTunnel);
        }
        next = inner_next;
        ext_len = size_of::<ScDestOptsV6>();
    } else if next != PROTO_IPIP && next != PROTO_IPV6 {
        return Err(DecapReason::NotTunnel);
    }
    let dst = unsafe { read_addr6((*ip).dst_addr.as_ptr()) };
    if !is_local(FAMILY_V6, dst) {
        return Err(DecapReason::NotLocal);
    }
    if vcf0 >> 4 != 6 || l3 + Ipv6Hdr::LEN + payload_len > frame_len(ctx) || payload_len < ext_len {
        return Err(DecapReason::Malformed);
    }
    let inner_off = l3 + Ipv6Hdr::LEN + ext_len;
    let inner_len = payload_len - ext_len;
    let inner_type = inner(ctx, inner_off, inner_len, next)?;
    let mut sc = None;
    if ext_len != 0 {
        let opts: *const [u8; SC_V6_HDR_LEN - Ipv6Hdr::LEN] =
            ptr_at(ctx, l3 + Ipv6Hdr::LEN).ok_or(DecapReason::Malformed)?;
        let p = opts as *const u8;
        let (pad, len, flags, candidate) = unsafe {
            (
                [*p.add(2), *p.add(3)],
                *p.add(5),
                *p.add(6),
                read_addr6(p.add(8)),
            )
        };
        if pad != SC_V6_PAD || len != SC_V6_LEN {
            return Err(DecapReason::Malformed);
        }
        sc = Some(SecondChance {
            family: FAMILY_V6,
            flags,
            candidate,
            local: dst,
            inner_off,
            inner_len,
            inner_proto: next,
        });
    }
    Ok(Tunnel {
        outer_len: Ipv6Hdr::LEN + ext_len,
        inner_type,
        sc,
    })
}

/// Checks the inner header at `off`: the version `proto` announces, and a
/// length that fills the outer payload (`len`) exactly. Returns its ether type.
#[inline(always)]
fn inner(ctx: &XdpContext, off: usize, len: usize, proto: u8) -> Result<u16, DecapReason> {
    if proto == PROTO_IPIP {
        let ip: *const Ipv4Hdr = ptr_at(ctx, off).ok_or(DecapReason::Malformed)?;
        let (vihl, tot_len) = unsafe { ((*ip).vihl, u16::from_be_bytes((*ip).tot_len) as usize) };
        if vihl >> 4 != 4 || (vihl & 0x0f) < 5 || tot_len != len {
            return Err(DecapReason::Malformed);
        }
        Ok(ETH_P_IPV4)
    } else {
        let ip: *const Ipv6Hdr = ptr_at(ctx, off).ok_or(DecapReason::Malformed)?;
        let (vcf0, payload_len) =
            unsafe { ((*ip).vcf[0], u16::from_be_bytes((*ip).payload_len) as usize) };
        if vcf0 >> 4 != 6 || Ipv6Hdr::LEN + payload_len != len {
            return Err(DecapReason::Malformed);
        }
        Ok(ETH_P_IPV6)
    }
}

/// Whether `lbd decap` runs with `--second-chance` ([`DECAP_SECOND_CHANCE`]).
#[inline(always)]
fn second_chance_on() -> bool {
    LB_DECAP_CONFIG
        .get(0)
        .is_some_and(|f| f & DECAP_SECOND_CHANCE != 0)
}

/// The verdict on a packet with the second-chance option: `Decapsulated`
/// (not a TCP packet that can be looked up, a SYN, or a connection of this
/// host), `Forwarded` (rewritten in place towards the candidate),
/// `NeighbourPending` (to drop), or `NoCandidate` / `ForwardFailed` (to
/// decapsulate and pass).
#[inline(always)]
fn second_chance(ctx: &XdpContext, l2: usize, sc: &SecondChance) -> DecapReason {
    let here = if sc.inner_proto == PROTO_IPIP {
        here_v4(ctx, sc)
    } else {
        here_v6(ctx, sc)
    };
    if here {
        return DecapReason::Decapsulated;
    }
    if sc.flags & SC_FORWARDED != 0 || sc.candidate == [0; 4] || is_local(sc.family, sc.candidate) {
        return DecapReason::NoCandidate;
    }
    forward(ctx, l2, sc)
}

/// Whether the inner IPv4 packet is not ours to send on: not a TCP segment
/// with its header in the packet, a SYN, or of a connection this host has.
#[inline(always)]
fn here_v4(ctx: &XdpContext, sc: &SecondChance) -> bool {
    let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, sc.inner_off) else {
        return true;
    };
    let (vihl, frags, proto, saddr, daddr) = unsafe {
        (
            (*ip).vihl,
            u16::from_be_bytes((*ip).frags),
            (*ip).proto,
            read_u32((*ip).src_addr.as_ptr()),
            read_u32((*ip).dst_addr.as_ptr()),
        )
    };
    let ihl = ((vihl & 0x0f) as usize) * 4;
    if proto != PROTO_TCP || frags & IPV4_MF_OFFSET_MASK != 0 || sc.inner_len < ihl + TcpHdr::LEN {
        return true;
    }
    let Some(th) = ptr_at::<TcpHdr>(ctx, sc.inner_off + ihl) else {
        return true;
    };
    let (sport, dport, flags) = unsafe { tcp_ports_flags(th) };
    if flags & TCP_SYN != 0 {
        return true;
    }
    let mut tuple = bpf_sock_tuple {
        __bindgen_anon_1: unsafe { core::mem::zeroed() },
    };
    tuple.__bindgen_anon_1.ipv4 = SockTupleV4 {
        saddr,
        daddr,
        sport,
        dport,
    };
    // The cookie check reads the addresses only: the fixed 20 bytes do.
    unsafe {
        has_connection(
            ctx,
            &mut tuple,
            size_of::<SockTupleV4>() as u32,
            flags,
            ip as *mut c_void,
            Ipv4Hdr::LEN as u32,
            th as *mut tcphdr,
        )
    }
}

/// [`here_v4`] for an inner IPv6 packet (TCP directly after the header).
#[inline(always)]
fn here_v6(ctx: &XdpContext, sc: &SecondChance) -> bool {
    let Some(ip) = ptr_at::<Ipv6Hdr>(ctx, sc.inner_off) else {
        return true;
    };
    let next = unsafe { (*ip).next_hdr };
    if next != PROTO_TCP || sc.inner_len < Ipv6Hdr::LEN + TcpHdr::LEN {
        return true;
    }
    let Some(th) = ptr_at::<TcpHdr>(ctx, sc.inner_off + Ipv6Hdr::LEN) else {
        return true;
    };
    let (sport, dport, flags) = unsafe { tcp_ports_flags(th) };
    if flags & TCP_SYN != 0 {
        return true;
    }
    let (saddr, daddr) = unsafe {
        (
            read_addr6((*ip).src_addr.as_ptr()),
            read_addr6((*ip).dst_addr.as_ptr()),
        )
    };
    let mut tuple = bpf_sock_tuple {
        __bindgen_anon_1: unsafe { core::mem::zeroed() },
    };
    tuple.__bindgen_anon_1.ipv6 = SockTupleV6 {
        saddr,
        daddr,
        sport,
        dport,
    };
    unsafe {
        has_connection(
            ctx,
            &mut tuple,
            size_of::<SockTupleV6>() as u32,
            flags,
            ip as *mut c_void,
            Ipv6Hdr::LEN as u32,
            th as *mut tcphdr,
        )
    }
}

/// Source and destination port (as on the wire, read natively) and the
/// flags of the TCP header at `th`.
///
/// # Safety
/// `th` is a checked packet pointer to a whole TCP header.
#[inline(always)]
unsafe fn tcp_ports_flags(th: *const TcpHdr) -> (u16, u16, u8) {
    let p = th as *const u8;
    unsafe {
        (
            u16::from_ne_bytes([*p, *p.add(1)]),
            u16::from_ne_bytes([*p.add(2), *p.add(3)]),
            *p.add(13),
        )
    }
}

/// Whether a socket of this host's namespace has the connection of
/// `tuple`: one that is not a listener, or a listener whose SYN cookie the
/// packet (an ACK, TCP flags `flags`, IP header `iph`, TCP header `th`)
/// answers. Every socket looked up is released.
///
/// # Safety
/// `iph` and `th` are checked packet pointers to `iph_len` and
/// `TcpHdr::LEN` bytes.
#[inline(always)]
unsafe fn has_connection(
    ctx: &XdpContext,
    tuple: &mut bpf_sock_tuple,
    tuple_len: u32,
    flags: u8,
    iph: *mut c_void,
    iph_len: u32,
    th: *mut tcphdr,
) -> bool {
    let sk = unsafe {
        bpf_skc_lookup_tcp(
            ctx.as_ptr(),
            tuple,
            tuple_len,
            BPF_F_CURRENT_NETNS as u64,
            0,
        )
    };
    if sk.is_null() {
        return false;
    }
    let state = unsafe { (*sk).state };
    let here = if state != BPF_TCP_LISTEN as u32 {
        true
    } else if flags & (TCP_ACK | TCP_RST) == TCP_ACK {
        unsafe {
            bpf_tcp_check_syncookie(sk as *mut c_void, iph, iph_len, th, TcpHdr::LEN as u32) == 0
        }
    } else {
        false
    };
    unsafe { bpf_sk_release(sk as *mut c_void) };
    here
}

/// Sends the packet on to the candidate: the option marked forwarded, the
/// outer source this host (the old destination), the outer destination the
/// candidate, the MACs of the next hop. `NeighbourPending` (frame
/// untouched, the candidate noted in `LB_DECAP_WANTED`) if the next hop has
/// no resolved neighbour entry; `ForwardFailed` (frame untouched) if the FIB
/// has no next hop out of the ingress interface.
#[inline(always)]
fn forward(ctx: &XdpContext, l2: usize, sc: &SecondChance) -> DecapReason {
    // (`inner_proto`: the outer header's protocol, 4 or 41.)
    let (dmac, smac) =
        match lb_ebpf::fib::next_hop(ctx, sc.family, sc.inner_proto, sc.local, sc.candidate) {
            Ok(macs) => macs,
            Err(lb_ebpf::fib::NO_NEIGH) => {
                // Dropped: the client's TCP sends it again once lbd decap
                // has had the neighbour resolved (passed, the stack would
                // reset it).
                let key = HostAddr {
                    addr: sc.candidate,
                    family: sc.family,
                    _pad: [0; 3],
                };
                let _ = LB_DECAP_WANTED.insert(&key, &1, 0);
                return DecapReason::NeighbourPending;
            }
            Err(_) => return DecapReason::ForwardFailed,
        };
    let new_flags = sc.flags | SC_FORWARDED;
    if sc.family == FAMILY_V4 {
        let Some(ip) = ptr_at_mut::<[u8; SC_V4_HDR_LEN]>(ctx, l2) else {
            return DecapReason::ForwardFailed;
        };
        let h = ip as *mut u8;
        unsafe {
            let old_src = read_u32(h.add(12));
            let reserved = *h.add(23);
            // Source and destination move from (S, D) to (D, C): the sum
            // changes as if S became C. And the option's flags word.
            let mut check = u16::from_ne_bytes([*h.add(10), *h.add(11)]);
            let cand = sc.candidate[0];
            check = replace(check, old_src as u16, cand as u16);
            check = replace(check, (old_src >> 16) as u16, (cand >> 16) as u16);
            check = replace(
                check,
                u16::from_ne_bytes([sc.flags, reserved]),
                u16::from_ne_bytes([new_flags, reserved]),
            );
            let c = check.to_ne_bytes();
            *h.add(10) = c[0];
            *h.add(11) = c[1];
            write_u32(h.add(12), sc.local[0]);
            write_u32(h.add(16), cand);
            *h.add(22) = new_flags;
        }
    } else {
        let Some(ip) = ptr_at_mut::<[u8; SC_V6_HDR_LEN]>(ctx, l2) else {
            return DecapReason::ForwardFailed;
        };
        let h = ip as *mut u8;
        unsafe {
            write_addr6(h.add(8), sc.local);
            write_addr6(h.add(24), sc.candidate);
            *h.add(Ipv6Hdr::LEN + 6) = new_flags;
        }
    }
    let Some(eth) = ptr_at_mut::<EthHdr>(ctx, 0) else {
        return DecapReason::ForwardFailed;
    };
    unsafe {
        (*eth).dst_addr = dmac;
        (*eth).src_addr = smac;
    }
    DecapReason::Forwarded
}

/// Moves the L2 header forward over the outer header (with the inner ether
/// type) and drops the bytes in front.
#[inline(always)]
fn strip(ctx: &XdpContext, l2: usize, t: &Tunnel) -> Result<(), DecapReason> {
    let eth: *const EthHdr = ptr_at(ctx, 0).ok_or(DecapReason::Malformed)?;
    let mut new_eth = unsafe { *eth };
    if l2 == EthHdr::LEN {
        new_eth.ether_type = t.inner_type;
        let dst: *mut EthHdr = ptr_at_mut(ctx, t.outer_len).ok_or(DecapReason::Malformed)?;
        unsafe { *dst = new_eth };
    } else {
        let vlan: *const VlanHdr = ptr_at(ctx, EthHdr::LEN).ok_or(DecapReason::Malformed)?;
        let mut new_vlan = unsafe { *vlan };
        new_vlan.ether_type = t.inner_type;
        let dst_eth: *mut EthHdr = ptr_at_mut(ctx, t.outer_len).ok_or(DecapReason::Malformed)?;
        let dst_vlan: *mut VlanHdr =
            ptr_at_mut(ctx, t.outer_len + EthHdr::LEN).ok_or(DecapReason::Malformed)?;
        unsafe {
            *dst_eth = new_eth;
            *dst_vlan = new_vlan;
        }
    }
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, t.outer_len as i32) } != 0 {
        return Err(DecapReason::Malformed);
    }
    Ok(())
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
