//! The balancer's maps. Sizes here are defaults; `lbd` sets the real
//! capacities from its config before loading (`EbpfLoader::map_max_entries`).

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, PerCpuArray},
};
use lb_common::{
    ACTIVE_MAP_FLAGS, ActiveFlows, BackendInfo, BenchControl, DEFAULT_FLOWS, DEFAULT_MAX_BACKENDS,
    DEFAULT_MAX_VIPS, DEFAULT_TABLE_SIZE, DataplaneConfig, FLOW_EVENT_SLOTS, FlowEvent, FlowSet,
    Globals, MaglevChunk, NextHop, SYN_SEEN_WORDS, Stats, TrafficCounters, VIP_FILTER_WORDS,
    VIPS_MAP_FLAGS, VipActive, VipAddrKey, VipInfo, VipKey, chunks_per_table, flow_sets, syn_slots,
};

/// No preallocation: replacing a value is an RCU swap (see `VipInfo`).
#[map(name = "LB_VIPS")]
pub static LB_VIPS: HashMap<VipKey, VipInfo> =
    HashMap::with_max_entries(DEFAULT_MAX_VIPS, VIPS_MAP_FLAGS);

/// The settings and the VIP address filter (see `lb_common::Globals`):
/// global data, read without a map lookup. The section name must equal
/// `lb_common::GLOBALS_SECTION`.
#[unsafe(no_mangle)]
#[unsafe(link_section = ".data.lb_globals")]
static mut LB_GLOBALS: Globals = Globals::EMPTY;

/// The settings (`lbd` writes them; see `lb_common::Globals`).
#[inline(always)]
pub fn config() -> &'static DataplaneConfig {
    // SAFETY: only lbd writes the value (through the map); the program
    // reads it.
    unsafe { &(*(&raw const LB_GLOBALS)).config }
}

/// Whether the VIP filter has bit `bit` of word `word`
/// (`lb_common::vip_filter_slot`).
#[inline(always)]
pub fn vip_filter_has(word: u32, bit: u64) -> bool {
    // SAFETY: as in `config`; the mask keeps the index in the array.
    let filter = unsafe { &(*(&raw const LB_GLOBALS)).vip_filter };
    filter[word as usize & (VIP_FILTER_WORDS as usize - 1)] & bit != 0
}

/// Whether `mac` (a destination MAC as `lb_common::mac_word`) is one of
/// the balancer's (`lb_common::Globals::local_macs`; the interface's is the
/// first compared).
#[inline(always)]
pub fn is_local_mac(mac: u64) -> bool {
    // SAFETY: as in `config`.
    let macs = unsafe { &(*(&raw const LB_GLOBALS)).local_macs };
    macs.iter().any(|m| *m == mac)
}

/// The connection table: one cache-line set per entry (see
/// `lb_common::FlowSet`), shared by all CPUs. Preallocated: memory is fixed
/// at load time.
#[map(name = "LB_FLOWS")]
pub static LB_FLOWS: Array<FlowSet> = Array::with_max_entries(flow_sets(DEFAULT_FLOWS), 0);

/// The handshake table: SYNs until their flow's next packet (see
/// `lb_common::conntrack`).
#[map(name = "LB_SYN_FLOWS")]
pub static LB_SYN_FLOWS: Array<FlowSet> =
    Array::with_max_entries(flow_sets(syn_slots(DEFAULT_FLOWS)), 0);

/// Which flow hashes may have an entry in the handshake table.
#[map(name = "LB_SYN_SEEN")]
pub static LB_SYN_SEEN: Array<u64> = Array::with_max_entries(SYN_SEEN_WORDS, 0);

#[map(name = "LB_NEXTHOPS")]
pub static LB_NEXTHOPS: PerCpuArray<NextHop> =
    PerCpuArray::with_max_entries(DEFAULT_MAX_BACKENDS, 0);

#[map(name = "LB_BACKENDS")]
pub static LB_BACKENDS: Array<BackendInfo> = Array::with_max_entries(DEFAULT_MAX_BACKENDS, 0);

/// Two tables (active and inactive) per VIP slot.
#[map(name = "LB_MAGLEV")]
pub static LB_MAGLEV: Array<MaglevChunk> = Array::with_max_entries(
    DEFAULT_MAX_VIPS * 2 * chunks_per_table(DEFAULT_TABLE_SIZE),
    0,
);

/// The previous tables (see `lb_common::second_chance`): at each chunk
/// index of [`LB_MAGLEV`], the entries those positions held before their
/// last move.
#[map(name = "LB_PREV")]
pub static LB_PREV: Array<MaglevChunk> = Array::with_max_entries(
    DEFAULT_MAX_VIPS * 2 * chunks_per_table(DEFAULT_TABLE_SIZE),
    0,
);

/// The settings as `lbd` last wrote them, pinned: the record a restarted
/// `lbd` checks and adopts. The data path reads its own copy in
/// [`config`].
#[map(name = "LB_CONFIG")]
pub static LB_CONFIG: Array<DataplaneConfig> = Array::with_max_entries(1, 0);

#[map(name = "LB_VIP_STATS")]
pub static LB_VIP_STATS: PerCpuArray<TrafficCounters> =
    PerCpuArray::with_max_entries(DEFAULT_MAX_VIPS, 0);

#[map(name = "LB_BACKEND_STATS")]
pub static LB_BACKEND_STATS: PerCpuArray<TrafficCounters> =
    PerCpuArray::with_max_entries(DEFAULT_MAX_BACKENDS, 0);

/// Packet and connection-table counters (one entry; see `lb_common::Stats`).
#[map(name = "LB_STATS")]
pub static LB_STATS: PerCpuArray<Stats> = PerCpuArray::with_max_entries(1, 0);

/// The VIP addresses (any port and protocol): for answers given on their
/// behalf (ICMP echo) and the fragment policy.
#[map(name = "LB_VIP_ADDRS")]
pub static LB_VIP_ADDRS: HashMap<VipAddrKey, u32> = HashMap::with_max_entries(DEFAULT_MAX_VIPS, 0);

/// Each CPU's position in a weighted-round-robin VIP's sequence, per VIP id.
#[map(name = "LB_WRR_POS")]
pub static LB_WRR_POS: PerCpuArray<u32> = PerCpuArray::with_max_entries(DEFAULT_MAX_VIPS, 0);

/// Load scores for least-load, per backend id (lower: less loaded).
#[map(name = "LB_SCORES")]
pub static LB_SCORES: Array<u32> = Array::with_max_entries(DEFAULT_MAX_BACKENDS, 0);

/// The table-write generation (see `lb_common::TABLE_GEN_DOC`).
#[map(name = "LB_TABLE_GEN")]
pub static LB_TABLE_GEN: Array<u64> = Array::with_max_entries(1, 0);

/// Active-flow units per backend id (see `lb_common::ActiveFlows`): shared
/// by all CPUs, changed by atomic adds only; `lbd` maps it
/// (`BPF_F_MMAPABLE`) to correct it after each sweep.
#[map(name = "LB_ACTIVE")]
pub static LB_ACTIVE: Array<ActiveFlows> =
    Array::with_max_entries(DEFAULT_MAX_BACKENDS, ACTIVE_MAP_FLAGS);

/// The same per VIP id.
#[map(name = "LB_VIP_ACTIVE")]
pub static LB_VIP_ACTIVE: Array<VipActive> =
    Array::with_max_entries(DEFAULT_MAX_VIPS, ACTIVE_MAP_FLAGS);

/// Adds `units` to the active flows of backend `backend_id` (a counted one,
/// `lb_common::BACKEND_COUNTED`) and of its VIP `vip_id`.
#[inline(always)]
pub fn count_active(backend_id: u32, vip_id: u32, units: i64) {
    if let Some(a) = LB_ACTIVE.get_ptr_mut(backend_id) {
        // SAFETY: an aligned i64 in a map value; every writer (other CPUs,
        // lbd through its mapping) adds atomically.
        unsafe { atomic_xadd::<i64, i64, { AtomicOrdering::SeqCst }>(&raw mut (*a).units, units) };
    }
    if let Some(v) = LB_VIP_ACTIVE.get_ptr_mut(vip_id) {
        // SAFETY: as above.
        unsafe { atomic_xadd::<i64, i64, { AtomicOrdering::SeqCst }>(&raw mut (*v).units, units) };
    }
}

/// A backend's active-flow units, weight and cap limit (zeros if the id is
/// out of range).
#[inline(always)]
pub fn active(backend_id: u32) -> (i64, u32, u32) {
    match LB_ACTIVE.get_ptr(backend_id) {
        // Volatile: other CPUs change the units under us.
        Some(a) => unsafe {
            (
                core::ptr::read_volatile(&(*a).units),
                (*a).weight,
                (*a).limit,
            )
        },
        None => (0, 0, 0),
    }
}

/// A VIP's active-flow units and its spare backend (`VipActive`).
#[inline(always)]
pub fn vip_active(vip_id: u32) -> (i64, u32) {
    match LB_VIP_ACTIVE.get_ptr(vip_id) {
        Some(v) => unsafe { (core::ptr::read_volatile(&(*v).units), (*v).spare) },
        None => (0, lb_common::NO_BACKEND),
    }
}

/// Benchmark only: what the restore step writes back (global data, like
/// `LB_GLOBALS`, so the harness adds no map lookup to what it measures).
/// The section name must equal `lb_common::map_name::BENCH_CONTROL`.
#[unsafe(no_mangle)]
#[unsafe(link_section = ".data.lb_bench")]
static mut LB_BENCH_CONTROL: BenchControl = BenchControl::ZERO;

/// The benchmark's control block.
#[inline(always)]
pub fn bench_control() -> &'static BenchControl {
    // SAFETY: only the benchmark writes it (through the map).
    unsafe { &*(&raw const LB_BENCH_CONTROL) }
}

/// The benchmark's new-flow sequence (see `lb_common::BenchControl`).
#[map(name = "LB_BENCH_SEQ")]
pub static LB_BENCH_SEQ: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Adds one packet of `bytes` (and `new_flow`: 1 if it started a flow) to
/// entry `index` of a traffic counter map.
#[inline(always)]
pub fn count_traffic(map: &PerCpuArray<TrafficCounters>, index: u32, bytes: u64, new_flow: u64) {
    if let Some(c) = map.get_ptr_mut(index) {
        // Per-CPU value: no other CPU writes it, no atomics needed.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
            (*c).flows += new_flow;
        }
    }
}

/// Counts a connection-table event in this CPU's [`Stats`].
#[inline(always)]
pub fn count_event(stats: &mut Stats, event: FlowEvent) {
    stats.flows[event as usize & (FLOW_EVENT_SLOTS - 1)] += 1;
}
