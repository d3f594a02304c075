//! Keys, values, names and default capacities of the balancer's BPF maps.

use core::mem::size_of;

/// Names of the balancer object's maps, as userspace looks them up.
pub mod map_name {
    /// `HashMap<VipKey, VipInfo>`: the VIPs (no prealloc, see [`super::VipInfo`]).
    pub const VIPS: &str = "LB_VIPS";
    /// `Array<BackendInfo>` indexed by backend id.
    pub const BACKENDS: &str = "LB_BACKENDS";
    /// `Array<MaglevChunk>`: every VIP's two Maglev tables, in chunks.
    pub const MAGLEV: &str = "LB_MAGLEV";
    /// `Array<DataplaneConfig>` with one entry.
    pub const CONFIG: &str = "LB_CONFIG";
    /// `PerCpuArray<TrafficCounters>` indexed by VIP id.
    pub const VIP_STATS: &str = "LB_VIP_STATS";
    /// `PerCpuArray<TrafficCounters>` indexed by backend id.
    pub const BACKEND_STATS: &str = "LB_BACKEND_STATS";
    /// `PerCpuArray<u64>` indexed by [`crate::Reason`].
    pub const REASON_STATS: &str = "LB_REASON_STATS";
    /// `Array<u64>`: bitmap of VIP addresses, see [`super::vip_filter_slot`].
    pub const VIP_FILTER: &str = "LB_VIP_FILTER";
    /// `PerCpuArray<NextHop>` indexed by backend id: cached FIB results.
    pub const NEXTHOPS: &str = "LB_NEXTHOPS";
    /// Benchmark only: `ProgramArray` the benchmark wrapper tail-calls into.
    pub const BENCH_PROGS: &str = "LB_BENCH_PROGS";
    /// Benchmark only: `Array<BenchControl>` with one entry.
    pub const BENCH_CONTROL: &str = "LB_BENCH_CONTROL";
    /// Benchmark only: `PerCpuArray<u64>`, frames the wrapper restored.
    pub const BENCH_STATS: &str = "LB_BENCH_STATS";
}

/// Names of the decapsulator object's maps.
pub mod decap_map_name {
    /// `HashMap<HostAddr, u8>`: outer destinations to decapsulate.
    pub const ADDRS: &str = "LB_DECAP_ADDRS";
    /// `PerCpuArray<u64>` indexed by [`crate::DecapReason`].
    pub const STATS: &str = "LB_DECAP_STATS";
}

/// Names of the programs in the decapsulator object.
pub mod decap_program_name {
    /// Strips IPIP / IPv6-in-IP addressed to this host.
    pub const DECAP: &str = "lb_decap";
    /// `XDP_PASS` and nothing else: for the far end of a veth whose near end
    /// transmits with `XDP_TX` in native mode (veth drops those frames unless
    /// the peer runs an XDP program).
    pub const PASS: &str = "lb_pass";
}

/// Capacity of the decapsulator's address map.
pub const DECAP_MAX_ADDRS: u32 = 256;

/// An address of this host (key of the decapsulator's address map).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct HostAddr {
    pub addr: [u32; 4],
    pub family: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(size_of::<HostAddr>() == 20);

/// Names of the programs in the balancer object.
pub mod program_name {
    /// The balancer.
    pub const BALANCER: &str = "lb_balancer";
    /// The floor for benchmarks: swap MACs, `XDP_TX`.
    pub const FLOOR: &str = "lb_floor";
    /// Benchmark only: restores the input frame, then tail-calls.
    pub const BENCH_WRAP: &str = "lb_bench_wrap";
}

/// Default number of VIPs the maps have room for (`balancer.max_vips`).
pub const DEFAULT_MAX_VIPS: u32 = 64;
/// Default number of backend slots, over all VIPs (`balancer.max_backends`).
pub const DEFAULT_MAX_BACKENDS: u32 = 4096;
/// Default Maglev table size M; prime.
pub const DEFAULT_TABLE_SIZE: u32 = 65537;

/// Maglev entries per map value. Array map values are padded to 8 bytes, so
/// one `u32` per value would waste half the memory; 16 fill a cache line.
pub const MAGLEV_CHUNK: u32 = 16;
/// The Maglev entry of a table with no backend (every weight 0, or empty).
pub const NO_BACKEND: u32 = u32::MAX;

/// Words (`u64`) in the VIP address filter: 65536 bits.
pub const VIP_FILTER_WORDS: u32 = 1024;

/// Word index and bit of the VIP address filter for an address.
///
/// The filter is a bitmap with a bit set for every VIP address (any port,
/// any protocol). The data plane tests it before the VIP hash lookup, so
/// traffic to other addresses passes after one inlined array read instead
/// of two hash lookups. The slot is an xor-fold of the address words (no
/// hash: a collision only costs the real lookup).
#[inline(always)]
pub const fn vip_filter_slot(addr: &[u32; 4]) -> (u32, u64) {
    let w = addr[0] ^ addr[1] ^ addr[2] ^ addr[3];
    let slot = (w ^ (w >> 16)) & 0xffff;
    (slot >> 6, 1u64 << (slot & 63))
}

/// Number of `MaglevChunk`s one table of `table_size` entries occupies.
#[inline]
pub const fn chunks_per_table(table_size: u32) -> u32 {
    table_size.div_ceil(MAGLEV_CHUNK)
}

/// Key of the VIP map: destination (address, port, protocol). A VIP with port
/// 0 matches every port of its address and protocol; the data plane looks up
/// the exact port first and port 0 second.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct VipKey {
    /// Address words, see the crate docs.
    pub addr: [u32; 4],
    /// Destination port, network byte order; 0 = any port.
    pub port: u16,
    /// `PROTO_TCP` or `PROTO_UDP`.
    pub proto: u8,
    /// `FAMILY_V4` or `FAMILY_V6`.
    pub family: u8,
}
const _: () = assert!(size_of::<VipKey>() == 20);

/// Value of the VIP map.
///
/// The map is created without preallocation, so replacing a value is an RCU
/// swap: the data plane sees the old or the new value, never a mix. Userspace
/// rebuilds a VIP's table into its inactive half and then replaces this value
/// with one whose `table_chunk` points at it: that single update is the flip.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VipInfo {
    /// Index into the per-VIP counters.
    pub id: u32,
    /// First `MaglevChunk` of the active table.
    pub table_chunk: u32,
    /// Reserved for per-VIP options; 0 today.
    pub flags: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<VipInfo>() == 16);

/// Value of the backend map, indexed by backend id (one id per VIP and
/// backend address pair, so counters are per VIP and backend).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendInfo {
    /// Address words of the backend (the outer destination).
    pub addr: [u32; 4],
    /// `FAMILY_V4` (IPIP outer header) or `FAMILY_V6` (IPv6 outer header).
    pub family: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(size_of::<BackendInfo>() == 20);

/// A run of [`MAGLEV_CHUNK`] Maglev table entries (backend ids).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaglevChunk {
    pub backends: [u32; MAGLEV_CHUNK as usize],
}
const _: () = assert!(size_of::<MaglevChunk>() == 64);

impl Default for MaglevChunk {
    fn default() -> Self {
        Self {
            backends: [NO_BACKEND; MAGLEV_CHUNK as usize],
        }
    }
}

/// The data plane's global settings (single entry of the config map).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DataplaneConfig {
    /// Outer source address for IPv4 outer headers (network order word).
    pub src_v4: u32,
    /// Outer source address for IPv6 outer headers.
    pub src_v6: [u32; 4],
    /// Largest encapsulated IP packet (outer L3 length) that may be sent.
    pub mtu: u32,
    /// Maglev table size M of every VIP.
    pub table_size: u32,
    /// Generation of the next-hop cache: a [`NextHop`] of another
    /// generation is stale. Userspace bumps it at least every second and
    /// whenever a backend id gets a new address. Never 0, so zeroed cache
    /// entries are stale.
    pub nexthop_gen: u32,
    /// `CONFIG_*` flags.
    pub flags: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<DataplaneConfig>() == 40);

/// `DataplaneConfig::flags`: look the next hop up for every packet (no
/// cache). For measurements and diagnosis.
pub const CONFIG_NO_NEXTHOP_CACHE: u32 = 1;

/// A cached FIB result towards one backend, per CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NextHop {
    /// Our interface's MAC.
    pub smac: [u8; 6],
    /// The next hop's MAC.
    pub dmac: [u8; 6],
    /// `DataplaneConfig::nexthop_gen` when this was looked up.
    pub generation: u32,
}
const _: () = assert!(size_of::<NextHop>() == 16);

/// Packets and bytes (frame length as received, Ethernet header included).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrafficCounters {
    pub packets: u64,
    pub bytes: u64,
}
const _: () = assert!(size_of::<TrafficCounters>() == 16);

/// Benchmark only: what the benchmark wrapper restores and where it jumps.
///
/// `BPF_PROG_TEST_RUN` with `repeat` runs each iteration on the frame the
/// previous one left behind. The wrapper strips an outer header it finds,
/// writes back the original L2 header, then tail-calls `target` in
/// `LB_BENCH_PROGS`, so every iteration sees the original frame.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BenchControl {
    /// Index into `LB_BENCH_PROGS`.
    pub target: u32,
    /// Length of `l2` in use: 14, or 18 with a VLAN tag.
    pub l2_len: u32,
    /// The input frame's L2 header.
    pub l2: [u8; 20],
}
const _: () = assert!(size_of::<BenchControl>() == 28);

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are `repr(C)`, made of integers only, and have no
    // implicit padding (the size asserts above pin their layout).
    unsafe impl aya::Pod for VipKey {}
    unsafe impl aya::Pod for VipInfo {}
    unsafe impl aya::Pod for BackendInfo {}
    unsafe impl aya::Pod for MaglevChunk {}
    unsafe impl aya::Pod for DataplaneConfig {}
    unsafe impl aya::Pod for TrafficCounters {}
    unsafe impl aya::Pod for BenchControl {}
    unsafe impl aya::Pod for NextHop {}
    unsafe impl aya::Pod for HostAddr {}
    unsafe impl aya::Pod for crate::FlowKey {}
}
