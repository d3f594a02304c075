//! The decapsulator object (`lb-decap`), for backends: strips the outer
//! IPIP / IPv6-in-IP header from packets addressed to this host and passes
//! the inner packet to the stack, so a backend needs no `ipip` module. Also
//! `lb_pass`, an `XDP_PASS` program for veth peers (see `lb_common`).
//!
//! Non-tunnel traffic and tunnels to other addresses pass untouched; a
//! tunnel to this host with a bad outer or inner header is dropped. Every
//! packet counts one [`DecapReason`]. Nothing is logged.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action,
    helpers::bpf_xdp_adjust_head,
    macros::{map, xdp},
    maps::{HashMap, PerCpuArray},
    programs::XdpContext,
};
use lb_common::{
    DECAP_MAX_ADDRS, DECAP_REASON_COUNT, DecapReason, FAMILY_V4, FAMILY_V6, HostAddr, PROTO_IPIP,
    PROTO_IPV6,
};
use lb_ebpf::{
    packet::{frame_len, ptr_at, ptr_at_mut, read_addr6, read_u32},
    parse::{ETH_P_IPV4, ETH_P_IPV6, l2_header},
};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
    vlan::VlanHdr,
};

#[map(name = "LB_DECAP_ADDRS")]
static LB_DECAP_ADDRS: HashMap<HostAddr, u8> = HashMap::with_max_entries(DECAP_MAX_ADDRS, 0);

#[map(name = "LB_DECAP_STATS")]
static LB_DECAP_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(DECAP_REASON_COUNT, 0);

/// IPv4 "more fragments" flag and fragment offset, host order.
const IPV4_MF_OFFSET_MASK: u16 = 0x3fff;

/// The decapsulator.
#[xdp]
pub fn lb_decap(ctx: XdpContext) -> u32 {
    let reason = match try_decap(&ctx) {
        Ok(()) => DecapReason::Decapsulated,
        Err(r) => r,
    };
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
}

#[inline(always)]
fn try_decap(ctx: &XdpContext) -> Result<(), DecapReason> {
    let (ether_type, l2) = l2_header(ctx).ok_or(DecapReason::NotTunnel)?;
    let tunnel = match ether_type {
        ETH_P_IPV4 => outer_ipv4(ctx, l2)?,
        ETH_P_IPV6 => outer_ipv6(ctx, l2)?,
        _ => return Err(DecapReason::NotTunnel),
    };
    strip(ctx, l2, &tunnel)
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
    Ok(Tunnel {
        outer_len: ihl,
        inner_type,
    })
}

#[inline(always)]
fn outer_ipv6(ctx: &XdpContext, l3: usize) -> Result<Tunnel, DecapReason> {
    let ip: *const Ipv6Hdr = ptr_at(ctx, l3).ok_or(DecapReason::NotTunnel)?;
    let (vcf0, payload_len, next) = unsafe {
        (
            (*ip).vcf[0],
            u16::from_be_bytes((*ip).payload_len) as usize,
            (*ip).next_hdr,
        )
    };
    if next != PROTO_IPIP && next != PROTO_IPV6 {
        return Err(DecapReason::NotTunnel);
    }
    let dst = unsafe { read_addr6((*ip).dst_addr.as_ptr()) };
    if !is_local(FAMILY_V6, dst) {
        return Err(DecapReason::NotLocal);
    }
    if vcf0 >> 4 != 6 || l3 + Ipv6Hdr::LEN + payload_len > frame_len(ctx) {
        return Err(DecapReason::Malformed);
    }
    let inner_type = inner(ctx, l3 + Ipv6Hdr::LEN, payload_len, next)?;
    Ok(Tunnel {
        outer_len: Ipv6Hdr::LEN,
        inner_type,
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
