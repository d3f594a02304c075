//! The balancer object (`lb-xdp`): the XDP balancer, and for benchmarks the
//! MAC-swap floor and the programs that restore the frame before running
//! either.
//!
//! Data path, top to bottom: parse → VIP address filter → connection table
//! (hit: the recorded backend) → on a miss, VIP lookup and the VIP's
//! scheduler (Maglev by default), and the choice is recorded → encapsulate (outer header, FIB next hop) → count. Each step returns the
//! [`Reason`] that ends it; the entry point counts the reason and returns the
//! verdict that belongs to it, so every packet counts exactly one reason and
//! no path returns `XDP_ABORTED`. Nothing is logged on the data path.
#![no_std]
#![no_main]
// The connection table's compare-and-swap (`conntrack::swap_key`).
#![allow(internal_features)]
#![feature(core_intrinsics)]

mod conntrack;
mod encap;
mod icmp;
mod maps;

use aya_ebpf::{
    bindings::xdp_action,
    helpers::{bpf_get_prandom_u32, bpf_loop, bpf_xdp_adjust_head},
    macros::xdp,
    programs::XdpContext,
};
use aya_log_ebpf::debug;
use lb_common::{
    ACTIVE_PROBES, BACKEND_ALLOCATED, BACKEND_DOWN, BackendInfo, CONFIG_FRAGMENTS_PASS,
    CONFIG_TOO_BIG_ICMP, DataplaneConfig, FAMILY_V4, FAMILY_V6, MAGLEV_CHUNK, NO_BACKEND,
    PROTO_IPIP, PROTO_IPV6, PROTO_TCP, REASON_SLOTS, Reason, SHED_ONE, Stats, VIP_HASH_SRC_PORT,
    VIP_LOAD_CAP, VIP_SCHED_LEAST_CONN, VIP_SCHED_LEAST_LOAD, VIP_SCHED_MAGLEV_SRC, VIP_SCHED_MASK,
    VIP_SCHED_WRR, VIP_SECOND_CHANCE, VipInfo, VipKey, fewer_per_weight, flow_hash64,
    maglev_position, over_cap, second_choice, source_hash, vip_filter_slot,
};
use lb_ebpf::{
    packet::{frame_len, ptr_at, ptr_at_mut, read_u32, write_u32, write_u64},
    parse::{Packet, Parsed, TCP_SYN, parse},
};
use network_types::{eth::EthHdr, ip::Ipv4Hdr, ip::Ipv6Hdr};

use maps::*;

/// The balancer.
///
/// (`#[xdp]` wraps each program function in an entry point that calls it;
/// `inline(always)` keeps the two one function, without a BPF-to-BPF call
/// and its stack frame on every packet.)
#[xdp]
#[inline(always)]
pub fn lb_balancer(ctx: XdpContext) -> u32 {
    balancer(&ctx)
}

#[inline(always)]
fn balancer(ctx: &XdpContext) -> u32 {
    // This CPU's counters, found once for the whole packet.
    let Some(stats) = LB_STATS.get_ptr_mut(0) else {
        // Entry 0 of a per-CPU array always exists.
        return xdp_action::XDP_PASS;
    };
    // SAFETY: a per-CPU value: only this program run on this CPU uses it.
    let stats = unsafe { &mut *stats };
    let reason = balance(ctx, stats);
    stats.reasons[reason as usize & (REASON_SLOTS - 1)] += 1;
    // Diagnosis only: compiled in, but `AYA_LOG_LEVEL` is 0 (off) unless
    // lbd runs at debug level, and then every packet pays for a record.
    debug!(
        ctx,
        "reason {} (lb_common::Reason), verdict {}",
        reason as u32,
        reason.action()
    );
    reason.action()
}

#[inline(always)]
fn balance(ctx: &XdpContext, stats: &mut Stats) -> Reason {
    match try_balance(ctx, stats) {
        Ok(reason) | Err(reason) => reason,
    }
}

/// `Ok` with the reason a packet was sent out (forwarded, or answered),
/// `Err` with the reason it was passed or dropped.
#[inline(always)]
fn try_balance(ctx: &XdpContext, stats: &mut Stats) -> Result<Reason, Reason> {
    let bytes = frame_len(ctx) as u64;
    let pkt = match parse(ctx)? {
        Parsed::Flow(pkt) => pkt,
        Parsed::Icmp(i) => {
            let cfg = config();
            return icmp::handle(ctx, &i, cfg);
        }
        Parsed::Fragment { family, dst } => {
            // Ports are unknown: never guess a backend.
            if !icmp::fragment_to_vip(family, &dst) {
                return Err(Reason::Fragment);
            }
            addressed_to_us(ctx)?;
            let cfg = config();
            return Err(if cfg.flags & CONFIG_FRAGMENTS_PASS != 0 {
                Reason::Fragment
            } else {
                Reason::FragmentDropped
            });
        }
    };
    // One copy of the forwarding path per family: in the IPv4 one the
    // compiler knows the upper address words are zero, which folds away
    // most of the hash and the address handling (and the register spills
    // a shared path needs for IPv6's four-word addresses).
    if pkt.flow.family == FAMILY_V6 {
        forward::<true>(ctx, pkt, bytes, stats)
    } else {
        forward::<false>(ctx, pkt, bytes, stats)
    }
}

/// The forwarding path of a TCP/UDP packet of `bytes` bytes (the frame);
/// `V6`: the packet is IPv6 (else IPv4).
#[inline(always)]
fn forward<const V6: bool>(
    ctx: &XdpContext,
    mut pkt: Packet,
    bytes: u64,
    stats: &mut Stats,
) -> Result<Reason, Reason> {
    if !V6 {
        let f = &mut pkt.flow;
        f.src = [f.src[0], 0, 0, 0];
        f.dst = [f.dst[0], 0, 0, 0];
        f.family = FAMILY_V4;
    }
    // Addresses without any VIP stop here, after one array read.
    let (word, bit) = vip_filter_slot(&pkt.flow.dst);
    if !vip_filter_has(word, bit) {
        return Err(Reason::NotVip);
    }
    addressed_to_us(ctx)?;
    let cfg = config();
    let now = conntrack::now();
    // The packet's one hash: connection-table set and tag, Maglev, and the
    // IPv6 outer header's flow label.
    let hash = flow_hash64(&pkt.flow);
    let maglev_hash = (hash >> 32) as u32;

    // An established flow needs no VIP lookup.
    let (backend_id, backend, scheduled, cand) =
        match conntrack::lookup(&pkt, hash, cfg, now, stats, || vip_flags(&pkt)) {
            conntrack::Lookup::Hit(id, backend) => (id, backend, 0, NO_BACKEND),
            other => {
                let opens = matches!(&other, conntrack::Lookup::Schedule(v) if v.opens);
                let (id, backend, candidate) =
                    schedule_consistent(&pkt, cfg, maglev_hash, opens, stats)?;
                if let conntrack::Lookup::Schedule(victim) = other {
                    // A flow with a candidate records no entry: its every
                    // packet carries the candidate.
                    if candidate == NO_BACKEND {
                        conntrack::record(&pkt, victim, hash, id, backend, now, cfg, stats);
                    }
                }
                (id, backend, 1, candidate)
            }
        };

    let outer = encap::outer_len(backend, false);
    if outer + pkt.ip_len > cfg.mtu as usize {
        if cfg.flags & CONFIG_TOO_BIG_ICMP == 0 {
            return Err(Reason::TooBig);
        }
        icmp::send_too_big(ctx, &pkt, cfg.mtu - outer as u32, bytes as usize)?;
        return Ok(Reason::TooBigIcmpSent);
    }
    let macs = encap::cached_next_hop(ctx, backend_id, backend, cfg)?;
    let label = if backend.family == FAMILY_V6 {
        maglev_hash
    } else {
        0
    };
    let candidate = if scheduled != 0 {
        take_candidate(cand, backend, pkt.ip_len, cfg, stats)
    } else {
        None
    };
    let new_flow = scheduled & candidate.is_none() as u64;
    encap::encapsulate(ctx, &pkt, backend, cfg, macs, label, candidate)?;

    count_traffic(&LB_VIP_STATS, backend.vip_id, bytes, new_flow);
    count_traffic(&LB_BACKEND_STATS, backend_id, bytes, new_flow);
    Ok(Reason::Forwarded)
}

/// `Err(NotOurMac)` unless the frame's destination MAC is one of the
/// balancer's (see `maps::is_local_mac`). Checked once a packet is known to
/// be for a VIP address, before anything acts on it: a frame a switch
/// flooded, or a broadcast, also reaches the host it is for, and a backend
/// would get a duplicate.
#[inline(always)]
fn addressed_to_us(ctx: &XdpContext) -> Result<(), Reason> {
    let dst = ptr_at::<[u8; 6]>(ctx, 0).ok_or(Reason::Malformed)? as *const u8;
    // SAFETY: six readable bytes (packet memory: one load each, at any
    // alignment, see `read_u32`).
    let mac = unsafe { read_u32(dst) as u64 | (*(dst.add(4) as *const u16) as u64) << 32 };
    if is_local_mac(mac) {
        Ok(())
    } else {
        Err(Reason::NotOurMac)
    }
}

/// The table-write generation (see `lb_common::TABLE_GEN_DOC`).
#[inline(always)]
fn table_gen() -> u64 {
    match LB_TABLE_GEN.get_ptr(0) {
        // Volatile: each read must happen where it is written.
        Some(p) => unsafe { core::ptr::read_volatile(p) },
        None => 0,
    }
}

/// [`schedule`] from a consistent view of the tables: looked up again if
/// `lbd` began or ended a table write meanwhile (see
/// `lb_common::TABLE_GEN_DOC`).
#[inline(always)]
fn schedule_consistent(
    pkt: &Packet,
    cfg: &DataplaneConfig,
    hash: u32,
    opens: bool,
    stats: &mut Stats,
) -> Result<Scheduled, Reason> {
    let before = table_gen();
    let first = schedule(pkt, cfg, hash, opens);
    // A shed SYN is not looked at again: the draw is made once.
    if table_gen() == before || matches!(first, Err(Reason::Shed)) {
        return first;
    }
    let before = table_gen();
    let second = schedule(pkt, cfg, hash, false);
    if table_gen() != before {
        maps::count_event(stats, lb_common::FlowEvent::TableRaced);
    }
    second
}

/// A scheduled packet's backend id, backend, and second-chance candidate
/// (a backend id, `NO_BACKEND` for none).
type Scheduled = (u32, &'static BackendInfo, u32);

/// The backend of a scheduled packet's candidate `id` (`NO_BACKEND`: none),
/// if it still fits: with its option the packet must stay within the MTU
/// (else it goes without one; see `lb_common::second_chance`). Counts the
/// packets that carry one. (The candidate travels as an id, not a
/// reference, so the verifier checks the path between the scheduler and
/// here once rather than once with and once without one.)
#[inline(always)]
fn take_candidate(
    id: u32,
    backend: &BackendInfo,
    ip_len: usize,
    cfg: &DataplaneConfig,
    stats: &mut Stats,
) -> Option<&'static BackendInfo> {
    if id == NO_BACKEND || encap::outer_len(backend, true) + ip_len > cfg.mtu as usize {
        return None;
    }
    let b = LB_BACKENDS.get(id)?;
    maps::count_event(stats, lb_common::FlowEvent::SecondChance);
    Some(b)
}

/// A new flow's backend, by the VIP's scheduler (see `lb_common::VIP_SCHED_*`);
/// `hash` is the flow's [`lb_common::flow_hash`]. Returns the backend id and
/// the backend, and for a TCP packet without SYN on a VIP with
/// [`VIP_SECOND_CHANCE`] its candidate, if it has one. `opens`: the
/// packet opens a new connection, which the VIP sheds its share of
/// (`Err(Reason::Shed)`, see `VipInfo::shed`).
#[inline(always)]
fn schedule(
    pkt: &Packet,
    cfg: &DataplaneConfig,
    hash: u32,
    opens: bool,
) -> Result<Scheduled, Reason> {
    let vip = lookup_vip_key(&pkt.flow).ok_or(Reason::NotVip)?;
    // A random draw, not the flow hash: a SYN the client sends again is
    // drawn anew, so every client gets through after a few retransmissions.
    if opens && vip.shed != 0 && unsafe { bpf_get_prandom_u32() } % SHED_ONE < vip.shed {
        return Err(Reason::Shed);
    }
    let sched = vip.flags & VIP_SCHED_MASK;
    let pos = if sched == VIP_SCHED_WRR {
        wrr_position(vip.id, cfg.table_size)
    } else if sched == VIP_SCHED_MAGLEV_SRC {
        // A second hash, on new flows of source-hashing VIPs only.
        let h = source_hash(&pkt.flow, vip.flags & VIP_HASH_SRC_PORT != 0);
        maglev_position(h, cfg.table_size)
    } else {
        maglev_position(hash, cfg.table_size)
    };
    let mut backend_id = table_entry(&vip, pos)?;
    if sched == VIP_SCHED_LEAST_LOAD {
        // Power of two choices: the second position from the same hash.
        let other = table_entry(&vip, maglev_position(second_choice(hash), cfg.table_size))?;
        if score(other) < score(backend_id) {
            backend_id = other;
        }
    } else if sched == VIP_SCHED_LEAST_CONN {
        backend_id = least_conn(&vip, pos, backend_id);
    } else if vip.flags & VIP_LOAD_CAP != 0 {
        backend_id = under_cap(&vip, pos, backend_id);
    }
    let backend = LB_BACKENDS.get(backend_id).ok_or(Reason::NoBackend)?;
    // A TCP packet past its SYN without an entry: a connection that began
    // elsewhere or earlier (see `lb_common::second_chance`).
    let mid_flow = pkt.flow.proto == PROTO_TCP && pkt.tcp_flags & TCP_SYN == 0;
    let candidate = if mid_flow && vip.flags & VIP_SECOND_CHANCE != 0 {
        candidate(&vip, pos, backend_id, backend)
    } else {
        NO_BACKEND
    };
    Ok((backend_id, backend, candidate))
}

/// The second-chance candidate of a packet sent to `id` (`backend`) from
/// position `pos` of the VIP's table: the backend the position held before
/// (`LB_PREV`), if that is another backend of the VIP, in service, of the
/// same family (see `lb_common::second_chance`); else `NO_BACKEND`.
#[inline(always)]
fn candidate(vip: &VipInfo, pos: u32, id: u32, backend: &BackendInfo) -> u32 {
    let Some(chunk) = LB_PREV.get(vip.table_chunk + pos / MAGLEV_CHUNK) else {
        return NO_BACKEND;
    };
    let prev = chunk.backends[(pos % MAGLEV_CHUNK) as usize & (MAGLEV_CHUNK as usize - 1)];
    if prev == id || prev == NO_BACKEND {
        return NO_BACKEND;
    }
    match LB_BACKENDS.get(prev) {
        Some(b)
            if b.vip_id == vip.id
                && b.flags & (BACKEND_ALLOCATED | BACKEND_DOWN) == BACKEND_ALLOCATED
                && b.family == backend.family =>
        {
            prev
        }
        _ => NO_BACKEND,
    }
}

/// A walk over the [`ACTIVE_PROBES`] − 1 table entries after a flow's
/// position in its table chunk (wrapping inside the chunk, so they share
/// its cache line), as `bpf_loop` runs it: the verifier checks the step
/// once, not once per iteration and path (unrolled in the program, the
/// walk took it 4.5 s and more stack than BPF allows).
#[repr(C)]
struct Walk {
    /// The [`ACTIVE_PROBES`] − 1 table entries after the flow's position
    /// in its chunk, copied with one map lookup for the walk, not one per
    /// step (`NO_BACKEND` past them).
    entries: [u32; ACTIVE_PROBES as usize],
    /// `least-conn`: the last id looked at (a run of one backend in the
    /// chunk is looked at once).
    last: u32,
    /// The choice so far, its units, weight and (capped walks) whether it
    /// is under its cap.
    best: u32,
    best_units: i64,
    best_weight: u32,
    found: u32,
    /// Capped walks: the VIP's units.
    vip_units: i64,
}

impl Walk {
    /// A walk from position `pos` of the VIP's table (its entry: `first`);
    /// `None` if the chunk is out of the map.
    #[inline(always)]
    fn new(vip: &VipInfo, pos: u32, first: u32) -> Option<Walk> {
        let c = LB_MAGLEV.get(vip.table_chunk + pos / MAGLEV_CHUNK)?;
        let mut entries = [NO_BACKEND; ACTIVE_PROBES as usize];
        for (k, e) in entries
            .iter_mut()
            .take(ACTIVE_PROBES as usize - 1)
            .enumerate()
        {
            *e = c.backends
                [((pos + 1 + k as u32) % MAGLEV_CHUNK) as usize & (MAGLEV_CHUNK as usize - 1)];
        }
        Some(Walk {
            entries,
            last: first,
            best: first,
            best_units: 0,
            best_weight: 0,
            found: 0,
            vip_units: 0,
        })
    }

    /// `least-conn`: entry `k` becomes the choice if it holds fewer units
    /// per weight than the choice so far.
    #[inline(always)]
    fn least_conn_probe(&mut self, k: u64) {
        let id = self.entry(k);
        if id != NO_BACKEND && id != self.best && id != self.last {
            self.last = id;
            let (units, weight, _) = active(id);
            if fewer_per_weight((units, weight), (self.best_units, self.best_weight)) {
                self.best = id;
                self.best_units = units;
                self.best_weight = weight;
            }
        }
    }

    /// Entry `k` (0-based) after the flow's position.
    #[inline(always)]
    fn entry(&self, k: u64) -> u32 {
        self.entries[k as usize & (ACTIVE_PROBES as usize - 1)]
    }
}

/// One `least-conn` step: of entries [`LEAST_CONN_PER_STEP`] × k and the
/// ones after it, the one with fewer units per weight than the choice so
/// far wins (all of them in one step: a call per entry cost more than the
/// entry; the last entry is the `NO_BACKEND` padding).
extern "C" fn least_conn_step(k: u64, ctx: *mut core::ffi::c_void) -> i64 {
    // SAFETY: `ctx` is the caller's `Walk` (see `least_conn`).
    let w = unsafe { &mut *(ctx as *mut Walk) };
    for j in 0..LEAST_CONN_PER_STEP {
        w.least_conn_probe(LEAST_CONN_PER_STEP * k + j);
    }
    0
}

/// Entries a `least-conn` step looks at (all: the walk is one call; the
/// verifier still checks the step once).
const LEAST_CONN_PER_STEP: u64 = 8;
const _: () = assert!(ACTIVE_PROBES as u64 % LEAST_CONN_PER_STEP == 0);

/// One capped step: the first entry under its cap ends the walk.
extern "C" fn under_cap_step(k: u64, ctx: *mut core::ffi::c_void) -> i64 {
    // SAFETY: `ctx` is the caller's `Walk` (see `under_cap`).
    let w = unsafe { &mut *(ctx as *mut Walk) };
    let id = w.entry(k);
    if id == NO_BACKEND || id == w.best {
        return 0;
    }
    let (units, _, limit) = active(id);
    if over_cap(units, limit, w.vip_units) {
        return 0;
    }
    w.best = id;
    w.found = 1;
    1
}

/// `least-conn`: of the backends at position `pos` (its entry: `first`)
/// and the [`ACTIVE_PROBES`] − 1 entries after it in its chunk, the one
/// with the fewest active-flow units per weight. Ties go to the earliest,
/// so flows that find equal counts spread as their hashes do.
#[inline(always)]
fn least_conn(vip: &VipInfo, pos: u32, first: u32) -> u32 {
    let Some(mut w) = Walk::new(vip, pos, first) else {
        return first;
    };
    (w.best_units, w.best_weight, _) = active(first);
    // SAFETY: the helper calls the step with `w`, on this stack, which
    // outlives the call.
    unsafe {
        bpf_loop(
            ACTIVE_PROBES / LEAST_CONN_PER_STEP as u32,
            least_conn_step as *const () as *mut core::ffi::c_void,
            &mut w as *mut Walk as *mut core::ffi::c_void,
            0,
        )
    };
    w.best
}

/// `maglev-src` with a load cap: the source's backend `first` (at `pos`)
/// unless one more flow takes it over its cap; else the first backend
/// among the [`ACTIVE_PROBES`] − 1 entries after it in its chunk that is
/// not; else the VIP's spare (the least loaded at the last sweep, if it
/// still is one of the VIP's backends in service); else `first`.
#[inline(always)]
fn under_cap(vip: &VipInfo, pos: u32, first: u32) -> u32 {
    let (vip_units, spare) = vip_active(vip.id);
    let (units, _, limit) = active(first);
    if !over_cap(units, limit, vip_units) {
        return first;
    }
    let Some(mut w) = Walk::new(vip, pos, first) else {
        return first;
    };
    w.vip_units = vip_units;
    // SAFETY: as in `least_conn`.
    unsafe {
        bpf_loop(
            ACTIVE_PROBES - 1,
            under_cap_step as *const () as *mut core::ffi::c_void,
            &mut w as *mut Walk as *mut core::ffi::c_void,
            0,
        )
    };
    if w.found != 0 {
        return w.best;
    }
    match LB_BACKENDS.get(spare) {
        Some(b)
            if b.vip_id == vip.id
                && b.flags & (BACKEND_ALLOCATED | BACKEND_DOWN) == BACKEND_ALLOCATED =>
        {
            spare
        }
        _ => first,
    }
}

/// The backend id at position `pos` of the VIP's active table.
#[inline(always)]
fn table_entry(vip: &VipInfo, pos: u32) -> Result<u32, Reason> {
    let chunk = LB_MAGLEV
        .get(vip.table_chunk + pos / MAGLEV_CHUNK)
        .ok_or(Reason::NoBackend)?;
    // The mask keeps the index provably inside the chunk for the verifier.
    let id = chunk.backends[(pos % MAGLEV_CHUNK) as usize & (MAGLEV_CHUNK as usize - 1)];
    if id == NO_BACKEND {
        return Err(Reason::NoBackend);
    }
    Ok(id)
}

/// This CPU's next position in a weighted-round-robin VIP's table (the
/// table holds the sequence; each CPU walks it from its own offset).
#[inline(always)]
fn wrr_position(vip_id: u32, size: u32) -> u32 {
    let Some(p) = LB_WRR_POS.get_ptr_mut(vip_id) else {
        return 0;
    };
    // SAFETY: a per-CPU value: no other CPU touches it.
    unsafe {
        let pos = if *p >= size { 0 } else { *p };
        *p = pos + 1;
        pos
    }
}

/// A backend's load score (least-load); 0 when none was written.
#[inline(always)]
fn score(backend_id: u32) -> u32 {
    LB_SCORES.get(backend_id).copied().unwrap_or(0)
}

/// The VIP for a flow's destination: exact port first, then port 0.
#[inline(always)]
fn lookup_vip_key(flow: &lb_common::FlowKey) -> Option<VipInfo> {
    let mut key = VipKey {
        addr: flow.dst,
        port: flow.dport_raw(),
        proto: flow.proto,
        family: flow.family,
    };
    if let Some(v) = LB_VIPS.get_ptr(&key) {
        return Some(unsafe { *v });
    }
    key.port = 0;
    LB_VIPS.get_ptr(&key).map(|v| unsafe { *v })
}

/// The flags of the packet's VIP (0 if it has none any more).
#[inline(always)]
fn vip_flags(pkt: &Packet) -> u32 {
    lookup_vip_key(&pkt.flow).map_or(0, |v| v.flags)
}

/// The floor for benchmarks: the least an XDP forwarder does (swap MACs,
/// transmit).
#[xdp]
#[inline(always)]
pub fn lb_floor(ctx: XdpContext) -> u32 {
    floor(&ctx)
}

#[inline(always)]
fn floor(ctx: &XdpContext) -> u32 {
    let Some(eth) = ptr_at_mut::<EthHdr>(ctx, 0) else {
        return xdp_action::XDP_DROP;
    };
    unsafe {
        let dst = (*eth).dst_addr;
        (*eth).dst_addr = (*eth).src_addr;
        (*eth).src_addr = dst;
    }
    xdp_action::XDP_TX
}

/// Benchmark only: the balancer on a restored frame (see [`restore`]).
#[xdp]
#[inline(always)]
pub fn lb_bench_balancer(ctx: XdpContext) -> u32 {
    if !restore(&ctx) {
        return xdp_action::XDP_DROP;
    }
    balancer(&ctx)
}

/// Benchmark only: the floor on a restored frame (see [`restore`]).
#[xdp]
#[inline(always)]
pub fn lb_bench_floor(ctx: XdpContext) -> u32 {
    if !restore(&ctx) {
        return xdp_action::XDP_DROP;
    }
    floor(&ctx)
}

/// Benchmark only (see `lb_common::BenchControl`): undoes what the previous
/// iteration did to the frame (the program under test follows inline, so
/// the measurement carries no tail call). `false` if it could not.
#[inline(always)]
fn restore(ctx: &XdpContext) -> bool {
    let ctl = bench_control();
    let vlan = ctl.l2_len as usize != EthHdr::LEN;
    let l2_len = if vlan { EthHdr::LEN + 4 } else { EthHdr::LEN };
    if let Some(outer) = outer_header_len(ctx, l2_len) {
        if unsafe { bpf_xdp_adjust_head(ctx.ctx, outer as i32) } != 0 {
            return false;
        }
    }
    // Write back the input's L2 header (the balancer rewrote the MACs), in
    // three stores.
    let Some(l2) = ptr_at_mut::<[u8; EthHdr::LEN + 4]>(ctx, 0) else {
        return false;
    };
    let p = l2 as *mut u8;
    let w = &ctl.l2;
    unsafe {
        write_u64(p, w[0]);
        if vlan {
            write_u64(p.add(8), w[1]);
            *(p.add(16) as *mut u16) = w[2] as u16;
        } else {
            write_u32(p.add(8), w[1] as u32);
            *(p.add(12) as *mut u16) = (w[1] >> 32) as u16;
        }
    }
    // A new flow every iteration: a counter in the source address.
    if ctl.seq_offset != 0 {
        // The mask bounds the offset for the verifier (headers end before 128).
        let Some(src) = ptr_at_mut::<[u8; 4]>(ctx, ctl.seq_offset as usize & 0x7f) else {
            return false;
        };
        if let Some(seq) = LB_BENCH_SEQ.get_ptr_mut(0) {
            unsafe {
                *seq += 1;
                *src = (*seq as u32).to_be_bytes();
            }
        }
    }
    true
}

/// Length of the outer header of a frame the balancer encapsulated, if it is
/// one: the L3 header after `l2_len` carries IPv4 or IPv6 inside (after the
/// second-chance option, if it has one).
#[inline(always)]
fn outer_header_len(ctx: &XdpContext, l2_len: usize) -> Option<usize> {
    let first = ptr_at::<u8>(ctx, l2_len)?;
    if unsafe { *first } >> 4 == 6 {
        let ip = ptr_at::<Ipv6Hdr>(ctx, l2_len)?;
        let next = unsafe { (*ip).next_hdr };
        if next == lb_common::PROTO_DSTOPTS {
            return Some(Ipv6Hdr::LEN + core::mem::size_of::<lb_common::ScDestOptsV6>());
        }
        (next == PROTO_IPV6 || next == PROTO_IPIP).then_some(Ipv6Hdr::LEN)
    } else {
        let ip = ptr_at::<Ipv4Hdr>(ctx, l2_len)?;
        let (proto, vihl) = unsafe { ((*ip).proto, (*ip).vihl) };
        let ihl = if vihl & 0x0f == 7 {
            Ipv4Hdr::LEN + core::mem::size_of::<lb_common::ScOptionV4>()
        } else {
            Ipv4Hdr::LEN
        };
        (proto == PROTO_IPIP || proto == PROTO_IPV6).then_some(ihl)
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
