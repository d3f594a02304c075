//! The kernel FIB's next hop for a packet this host sends out of the
//! interface a frame came in on (the balancer towards a backend, the
//! decapsulator towards a second-chance candidate).

use core::mem::size_of;

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_FIB_LOOKUP_OUTPUT, bpf_fib_lookup},
    helpers::bpf_fib_lookup as fib_lookup,
    programs::XdpContext,
};
use lb_common::FAMILY_V4;

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// `bpf_fib_lookup`'s answer when the next hop has no neighbour entry
/// (`BPF_FIB_LKUP_RET_NO_NEIGH`).
pub const NO_NEIGH: i64 = 7;

/// Looks up the route of an outer packet of protocol `proto` from `src` to
/// `dst` (address words of `family`) as the host itself would send it
/// (`BPF_FIB_LOOKUP_OUTPUT`: the source is ours), on the ingress interface.
/// The kernel answers only on an interface with forwarding on
/// (`net.ipv4.conf.IF.forwarding`, and the IPv6 one), even for this output
/// lookup. Returns the next hop's MAC and ours; `Err` with the helper's
/// code ([`NO_NEIGH`]: the next hop has no resolved neighbour entry), or -1
/// if the route leaves through another interface (`XDP_TX` cannot send it
/// there).
#[inline(always)]
pub fn next_hop(
    ctx: &XdpContext,
    family: u8,
    proto: u8,
    src: [u32; 4],
    dst: [u32; 4],
) -> Result<([u8; 6], [u8; 6]), i64> {
    let mut p: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    p.l4_protocol = proto;
    if family == FAMILY_V4 {
        p.family = AF_INET;
        p.__bindgen_anon_3.ipv4_src = src[0];
        p.__bindgen_anon_4.ipv4_dst = dst[0];
    } else {
        p.family = AF_INET6;
        p.__bindgen_anon_3.ipv6_src = src;
        p.__bindgen_anon_4.ipv6_dst = dst;
    }
    let ifindex = ctx.ingress_ifindex() as u32;
    p.ifindex = ifindex;
    let rc = unsafe {
        fib_lookup(
            ctx.as_ptr(),
            &mut p,
            size_of::<bpf_fib_lookup>() as i32,
            BPF_FIB_LOOKUP_OUTPUT,
        )
    };
    if rc != 0 {
        return Err(rc);
    }
    if p.ifindex != ifindex {
        return Err(-1);
    }
    Ok((p.dmac, p.smac))
}
