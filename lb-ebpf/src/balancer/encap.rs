//! Encapsulation towards the backend: IPIP / IPv6-in-IPv6 (and the mixed
//! forms), Katran-compatible, with next-hop MACs from the kernel FIB.
//!
//! Output frame: `[Ethernet][802.1Q tag, if the input had one][outer IP]
//! [the input's IP packet, untouched]`. The outer family is the backend's;
//! the outer protocol says what is inside (4 = IPv4, 41 = IPv6). A packet
//! with a second-chance candidate has the candidate option in its outer
//! header (see `lb_common::second_chance`).

use core::mem::size_of;

use aya_ebpf::{helpers::bpf_xdp_adjust_head, programs::XdpContext};
use lb_common::{
    BackendInfo, CONFIG_NO_NEXTHOP_CACHE, DataplaneConfig, FAMILY_V4, FAMILY_V6, PROTO_DSTOPTS,
    PROTO_IPIP, PROTO_IPV6, Reason, SC_OPTION_TYPE, SC_V4_LEN, SC_V6_EXT_LEN, SC_V6_LEN, SC_V6_PAD,
    ScDestOptsV6, ScOptionV4, eth_macs,
};

use crate::maps::LB_NEXTHOPS;
use lb_ebpf::{
    csum::outer_ipv4_csum,
    packet::{ptr_at_mut, write_addr6, write_u32, write_u64},
    parse::Packet,
};
use network_types::{
    eth::{EthHdr, EtherType},
    ip::{Ipv4Hdr, Ipv6Hdr},
    vlan::VlanHdr,
};

const OUTER_TTL: u8 = 64;
/// IPv4 "don't fragment", network order. Oversized packets are dropped
/// before encapsulation, so nothing we send needs fragmenting.
const IPV4_DF: [u8; 2] = [0x40, 0x00];

/// Length of the outer IP header for a backend of `family`, with the
/// second-chance option if `candidate`.
#[inline(always)]
pub fn outer_len(backend: &BackendInfo, candidate: bool) -> usize {
    match (backend.family == FAMILY_V4, candidate) {
        (true, false) => Ipv4Hdr::LEN,
        (true, true) => Ipv4Hdr::LEN + size_of::<ScOptionV4>(),
        (false, false) => Ipv6Hdr::LEN,
        (false, true) => Ipv6Hdr::LEN + size_of::<ScDestOptsV6>(),
    }
}

/// The Ethernet addresses towards backend `id` (destination: the next hop,
/// source: ours) as the words of `lb_common::eth_macs`, from this CPU's
/// cache of FIB results when it is of the current generation.
///
/// `bpf_fib_lookup` costs more than the rest of the forwarding path
/// together; the cache makes it once per backend, CPU and generation.
/// Userspace starts a new generation at least every second and whenever a
/// backend id changes address, so a neighbour change reaches the data plane
/// within a second (the kernel's own neighbour cache is staler than that).
/// A failed lookup is not cached: the packet is dropped and the next one
/// tries again.
#[inline(always)]
pub fn cached_next_hop(
    ctx: &XdpContext,
    id: u32,
    backend: &BackendInfo,
    cfg: &DataplaneConfig,
) -> Result<(u64, u32), Reason> {
    let cached = LB_NEXTHOPS.get_ptr_mut(id);
    if let Some(nh) = cached {
        let nh = unsafe { &mut *nh };
        if nh.generation == cfg.nexthop_gen && cfg.flags & CONFIG_NO_NEXTHOP_CACHE == 0 {
            return Ok((nh.eth_head, nh.eth_tail));
        }
        let macs = next_hop(ctx, backend, cfg)?;
        // Per-CPU entry: nobody else writes it.
        (nh.eth_head, nh.eth_tail) = macs;
        nh.generation = cfg.nexthop_gen;
        return Ok(macs);
    }
    next_hop(ctx, backend, cfg)
}

/// The Ethernet addresses towards `backend` (see [`cached_next_hop`]), from
/// the kernel FIB and neighbour tables ([`lb_ebpf::fib::next_hop`]: the
/// route of the outer packet, ours, bound to the ingress interface: we
/// transmit with `XDP_TX`, so a backend must be reachable through the
/// interface the balancer is attached to).
#[inline(always)]
fn next_hop(
    ctx: &XdpContext,
    backend: &BackendInfo,
    cfg: &DataplaneConfig,
) -> Result<(u64, u32), Reason> {
    let (proto, src) = if backend.family == FAMILY_V4 {
        (PROTO_IPIP, [cfg.src_v4, 0, 0, 0])
    } else {
        (PROTO_IPV6, cfg.src_v6)
    };
    let (dmac, smac) = lb_ebpf::fib::next_hop(ctx, backend.family, proto, src, backend.addr)
        .map_err(|_| Reason::FibFailed)?;
    Ok(eth_macs(dmac, smac))
}

/// Prepends the outer header, with `candidate` in the second-chance option
/// if there is one (of the backend's family). On error the frame is
/// unchanged or about to be dropped.
#[inline(always)]
pub fn encapsulate(
    ctx: &XdpContext,
    pkt: &Packet,
    backend: &BackendInfo,
    cfg: &DataplaneConfig,
    macs: (u64, u32),
    label: u32,
    candidate: Option<&BackendInfo>,
) -> Result<(), Reason> {
    let outer = outer_len(backend, candidate.is_some());
    // Keep the VLAN tag (if any) before the headroom moves.
    let tci = if pkt.l2_len == EthHdr::LEN + VlanHdr::LEN {
        let vlan: *mut VlanHdr = ptr_at_mut(ctx, EthHdr::LEN).ok_or(Reason::Malformed)?;
        Some(unsafe { (*vlan).tci })
    } else {
        None
    };
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(outer as i32)) } != 0 {
        return Err(Reason::EncapFailed);
    }
    let outer_type = if backend.family == FAMILY_V4 {
        EtherType::Ipv4 as u16
    } else {
        EtherType::Ipv6 as u16
    };
    // The verifier forgets every packet bound after adjust_head: re-check.
    let eth: *mut EthHdr = ptr_at_mut(ctx, 0).ok_or(Reason::EncapFailed)?;
    unsafe {
        write_u64(eth as *mut u8, macs.0);
        write_u32((eth as *mut u8).add(8), macs.1);
    }
    let l3 = match tci {
        Some(tci) => {
            let vlan: *mut VlanHdr = ptr_at_mut(ctx, EthHdr::LEN).ok_or(Reason::EncapFailed)?;
            unsafe {
                (*eth).ether_type = EtherType::Ieee8021q as u16;
                (*vlan).tci = tci;
                (*vlan).ether_type = outer_type;
            }
            EthHdr::LEN + VlanHdr::LEN
        }
        None => {
            unsafe { (*eth).ether_type = outer_type };
            EthHdr::LEN
        }
    };
    let inner_proto = if pkt.flow.family == FAMILY_V6 {
        PROTO_IPV6
    } else {
        PROTO_IPIP
    };
    if backend.family == FAMILY_V4 {
        let ip: *mut Ipv4Hdr = ptr_at_mut(ctx, l3).ok_or(Reason::EncapFailed)?;
        let (vihl, options) = match candidate {
            Some(c) => {
                let opt: *mut ScOptionV4 =
                    ptr_at_mut(ctx, l3 + Ipv4Hdr::LEN).ok_or(Reason::EncapFailed)?;
                let word = c.addr[0];
                unsafe {
                    *opt = ScOptionV4 {
                        kind: SC_OPTION_TYPE,
                        len: SC_V4_LEN,
                        flags: 0,
                        reserved: 0,
                        candidate: 0,
                    };
                    write_u32(&raw mut (*opt).candidate as *mut u8, word);
                }
                let sum = u16::from_ne_bytes([SC_OPTION_TYPE, SC_V4_LEN]) as u32
                    + (word & 0xffff)
                    + (word >> 16);
                (0x47, sum)
            }
            None => (0x45, 0),
        };
        let tot_len = ((outer + pkt.ip_len) as u16).to_be_bytes();
        let check = outer_ipv4_csum(
            vihl,
            pkt.tos,
            tot_len,
            IPV4_DF,
            OUTER_TTL,
            inner_proto,
            cfg.src_v4,
            backend.addr[0],
            options,
        );
        unsafe {
            (*ip).vihl = vihl;
            (*ip).tos = pkt.tos;
            (*ip).tot_len = tot_len;
            (*ip).id = [0, 0];
            (*ip).frags = IPV4_DF;
            (*ip).ttl = OUTER_TTL;
            (*ip).proto = inner_proto;
            (*ip).check = check.to_ne_bytes();
            write_u32((*ip).src_addr.as_mut_ptr(), cfg.src_v4);
            write_u32((*ip).dst_addr.as_mut_ptr(), backend.addr[0]);
        }
    } else {
        let ip: *mut Ipv6Hdr = ptr_at_mut(ctx, l3).ok_or(Reason::EncapFailed)?;
        // Version 6, the inner traffic class, and a flow label from the flow
        // hash so ECMP and RSS on the way spread flows, not balancers.
        let vcf = (6u32 << 28) | ((pkt.tos as u32) << 20) | (label & 0x000f_ffff);
        let next = match candidate {
            Some(c) => {
                let opts: *mut ScDestOptsV6 =
                    ptr_at_mut(ctx, l3 + Ipv6Hdr::LEN).ok_or(Reason::EncapFailed)?;
                unsafe {
                    (*opts).next_hdr = inner_proto;
                    (*opts).hdr_ext_len = SC_V6_EXT_LEN;
                    (*opts).pad = SC_V6_PAD;
                    (*opts).kind = SC_OPTION_TYPE;
                    (*opts).len = SC_V6_LEN;
                    (*opts).flags = 0;
                    (*opts).reserved = 0;
                    write_addr6(&raw mut (*opts).candidate as *mut u8, c.addr);
                }
                PROTO_DSTOPTS
            }
            None => inner_proto,
        };
        unsafe {
            (*ip).vcf = vcf.to_be_bytes();
            (*ip).payload_len = ((outer - Ipv6Hdr::LEN + pkt.ip_len) as u16).to_be_bytes();
            (*ip).next_hdr = next;
            (*ip).hop_limit = OUTER_TTL;
            write_addr6((*ip).src_addr.as_mut_ptr(), cfg.src_v6);
            write_addr6((*ip).dst_addr.as_mut_ptr(), backend.addr);
        }
    }
    Ok(())
}
