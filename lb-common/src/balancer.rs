//! Keys, values and capacities of the balancer's maps.

use core::mem::size_of;

use crate::REASON_COUNT;

/// Version of the layout of the balancer's maps and the meaning of their
/// fields. A restarted `lbd` adopts pinned maps of the same version and
/// converts those of an older version it has a converter for (see
/// `lb-userspace/src/dataplane/upgrade/`); bump it with any change to a
/// type in this module or to a map's kind, and add the converter from the
/// version before (and its fixture, tests/fixtures/).
///
/// Version 8: the connection table's closing bit (11 incarnation bits),
/// admission of every new flow through the handshake table, the `raced`,
/// `syn_raced` and `closing` events (16 event slots), the closing timeout in
/// [`DataplaneConfig`]. Version 9: 32 reason slots in [`Stats`] (for
/// `not_our_mac` and later reasons). Version 10: the table-write generation
/// (`LB_TABLE_GEN`, see [`TABLE_GEN_DOC`]). Version 11: active flows
/// (`LB_ACTIVE`, `LB_VIP_ACTIVE`, [`crate::BACKEND_COUNTED`], the
/// `least-conn` scheduler; see `crate::ActiveFlows`). Version 12: the
/// previous tables (`LB_PREV`) and [`VIP_SECOND_CHANCE`] (see
/// `crate::second_chance`).
pub const LAYOUT_VERSION: u32 = 12;

/// How a packet never uses a half-written Maglev table without `lbd`
/// waiting (`LB_TABLE_GEN`, one `u64`).
///
/// `lbd` writes a VIP's new table into the half the VIP does not use, then
/// flips the VIP to it, and it may rewrite the other half right after: the
/// next change starts at once, it does not wait for packets that read the
/// old `VipInfo` to finish. Instead every write of tables, backend entries
/// or `VipInfo`s happens inside a *window*: `lbd` makes the generation odd
/// before it writes and even again after the flip. A new flow reads the
/// generation, looks its VIP and table entry (and backend) up, and reads the
/// generation again: if both reads agree, no window began or ended while it
/// looked, and what it read is one table's (if a window was open all along,
/// the VIP was not flipped meanwhile, so the half it read was not the one
/// being written). If they differ it looks again, once; a second overlap
/// (two windows opening or closing within the ~100 ns of a lookup) is
/// counted (`table_raced`) and the second answer used: its entry is that
/// of the table before or after the change, a backend the VIP has or just
/// had. Established flows never look at tables.
pub const TABLE_GEN_DOC: () = ();

/// Creation flags of the VIP map: `BPF_F_NO_PREALLOC` (see [`VipInfo`]).
pub const VIPS_MAP_FLAGS: u32 = 1;

/// Default number of VIPs the maps have room for (`balancer.max_vips`).
pub const DEFAULT_MAX_VIPS: u32 = 64;
/// Default number of backend slots, over all VIPs (`balancer.max_backends`).
pub const DEFAULT_MAX_BACKENDS: u32 = 4096;
/// Default Maglev table size M; prime.
pub const DEFAULT_TABLE_SIZE: u32 = 65537;
/// Default capacity of the connection table in slots (`conntrack.size`):
/// 64 MiB, for a million concurrent flows with few set overflows (see
/// `crate::FlowSet`).
pub const DEFAULT_FLOWS: u32 = 4_194_304;

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
/// any protocol). The data plane tests it before any hash lookup, so traffic
/// to other addresses passes after one inlined array read.
///
/// The slot is the top 16 bits of a multiply-shift of the address (two
/// multiplications for IPv6, one for IPv4, where the upper words are zero).
/// A collision costs a connection-table and a VIP lookup before the packet
/// passes, so addresses that differ from a VIP in a pattern must not
/// collide more often than random ones: an xor-fold of the words (what this
/// was) sends `fc00:9::9` to the bit of `fc00:1::1`, and every address with
/// the same bits flipped in two words to the bit of the VIP. This is not
/// the flow hash (the one hash of the 5-tuple a packet pays for): it covers
/// the destination only and is computed before anything else is known.
#[inline(always)]
pub const fn vip_filter_slot(addr: &[u32; 4]) -> (u32, u64) {
    const K1: u64 = 0x9E37_79B9_7F4A_7C15;
    const K2: u64 = 0xC2B2_AE3D_27D4_EB4F;
    let hi = (addr[0] as u64) | ((addr[1] as u64) << 32);
    let lo = (addr[2] as u64) | ((addr[3] as u64) << 32);
    let slot = ((lo.wrapping_mul(K1) ^ hi).wrapping_mul(K2) >> 48) as u32;
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

/// `VipInfo::flags`: keep sending a flow to its backend while health checks
/// say the backend is down (default: re-schedule it).
pub const VIP_STICK_WHEN_DOWN: u32 = 1;
/// `VipInfo::flags`: the bits that say how new flows are scheduled.
pub const VIP_SCHED_MASK: u32 = 0xf0;
/// Scheduler: the 5-tuple hash into the Maglev table.
pub const VIP_SCHED_MAGLEV: u32 = 0x00;
/// Scheduler: the source's hash (address, optionally port) into the Maglev
/// table: every flow of a client to one backend.
pub const VIP_SCHED_MAGLEV_SRC: u32 = 0x10;
/// Scheduler: the VIP's table holds a smooth weighted round-robin sequence,
/// walked by a per-CPU position ([`WRR`](crate::map_name::WRR_POS)).
pub const VIP_SCHED_WRR: u32 = 0x20;
/// Scheduler: two Maglev positions from the flow hash; the backend with the
/// lower load score wins.
pub const VIP_SCHED_LEAST_LOAD: u32 = 0x30;
/// Scheduler: the fewest active flows per weight among [`crate::ACTIVE_PROBES`]
/// table positions from the flow hash (see `crate::ActiveFlows`).
pub const VIP_SCHED_LEAST_CONN: u32 = 0x40;
/// `VipInfo::flags`, with [`VIP_SCHED_MAGLEV_SRC`]: a load cap. The source's
/// backend unless it is over its cap ([`crate::over_cap`]), else the next
/// table position's backend that is not (up to [`crate::ACTIVE_PROBES`]
/// positions), else `VipActive::spare`.
pub const VIP_LOAD_CAP: u32 = 0x200;
/// `VipInfo::flags`, with [`VIP_SCHED_MAGLEV`] or [`VIP_SCHED_MAGLEV_SRC`]:
/// a TCP packet that is not a SYN and has no entry names its position's
/// previous backend (`LB_PREV`) as its candidate when that differs from
/// the current one (see `crate::second_chance`).
pub const VIP_SECOND_CHANCE: u32 = 0x400;
/// `VipInfo::flags`, with [`VIP_SCHED_MAGLEV_SRC`]: hash the source port too.
pub const VIP_HASH_SRC_PORT: u32 = 0x100;

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
    /// `VIP_*` flags.
    pub flags: u32,
    /// Share of new connections to drop while the VIP's pool is saturated
    /// (`on_saturated = "shed"`), in [`SHED_ONE`]ths: a TCP SYN of a flow
    /// neither flow table knows is dropped (`Reason::Shed`) when a random
    /// draw below [`SHED_ONE`] is less than it. 0: never (every lbd before
    /// this field wrote 0 into its place, so no layout change).
    pub shed: u32,
}
const _: () = assert!(size_of::<VipInfo>() == 16);

/// [`VipInfo::shed`] of a VIP that drops every new connection (never
/// written: userspace caps the share below it).
pub const SHED_ONE: u32 = 1 << 16;

/// `BackendInfo::flags`: the id belongs to a backend (freed ids have 0).
pub const BACKEND_ALLOCATED: u8 = 1;
/// `BackendInfo::flags`: health checks say the backend is down.
pub const BACKEND_DOWN: u8 = 2;

/// Value of the backend map, indexed by backend id. One id per VIP and
/// backend address pair, so counters are per VIP and backend.
///
/// `incarnation` grows each time the id is given to a (VIP, address) pair;
/// a connection-table entry remembers it, so an entry made for an earlier
/// owner of the id is recognised as stale instead of misdirecting a flow.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendInfo {
    /// Address words of the backend (the outer destination).
    pub addr: [u32; 4],
    /// `FAMILY_V4` (IPv4 outer header) or `FAMILY_V6` (IPv6 outer header).
    pub family: u8,
    /// `BACKEND_*` flags.
    pub flags: u8,
    pub _pad: [u8; 2],
    /// Id of the VIP this backend belongs to.
    pub vip_id: u32,
    /// See above.
    pub incarnation: u32,
    pub _pad2: u32,
}
const _: () = assert!(size_of::<BackendInfo>() == 32);

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

/// `DataplaneConfig::flags`: look the next hop up for every packet (no
/// cache). For measurements and diagnosis.
pub const CONFIG_NO_NEXTHOP_CACHE: u32 = 1;
/// `DataplaneConfig::flags`: the program is attached in generic (skb) mode.
/// Informational, for a restarted `lbd` adopting the attachment.
pub const CONFIG_ATTACHED_SKB: u32 = 2;
/// `DataplaneConfig::flags`: answer ICMP echo requests to VIP addresses.
pub const CONFIG_ICMP_ECHO: u32 = 4;
/// `DataplaneConfig::flags`: answer packets too big to encapsulate with
/// ICMP "fragmentation needed" / "packet too big" (else drop them).
pub const CONFIG_TOO_BIG_ICMP: u32 = 8;
/// `DataplaneConfig::flags`: pass fragments to VIP addresses to the host
/// (else drop them).
pub const CONFIG_FRAGMENTS_PASS: u32 = 16;

/// Most IPv6 extension headers (hop-by-hop, routing, destination options)
/// the balancer walks before TCP/UDP/ICMPv6.
pub const MAX_IPV6_EXT_HEADERS: usize = 4;

/// Bytes of the offending packet an ICMP "too big" reply quotes.
pub const TOO_BIG_QUOTE: usize = 512;

/// Key of the VIP address set (`LB_VIP_ADDRS`): a VIP's address, any port
/// and protocol, for answers the balancer gives on the address's behalf
/// (ICMP echo).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct VipAddrKey {
    pub addr: [u32; 4],
    pub family: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(size_of::<VipAddrKey>() == 20);

/// The data plane's global settings: the data path reads them in
/// [`Globals`]; `LB_CONFIG` (one entry, pinned) keeps the same value as the
/// record a restarted `lbd` checks.
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
    /// [`LAYOUT_VERSION`] of the `lbd` that wrote the maps.
    pub layout_version: u32,
    /// Interface the balancer is attached to (0 before the first attach).
    pub ifindex: u32,
    /// Sets in the connection table minus one (a power of two minus one).
    pub flow_set_mask: u32,
    /// Idle time after which a TCP connection-table entry is stale, in
    /// jiffies (see `lb_common::idle_jiffies`).
    pub tcp_idle: u32,
    /// The same for UDP.
    pub udp_idle: u32,
    /// How much of `tcp_idle` an entry may use up before a packet renews it
    /// (see `lb_common::renew_after`).
    pub tcp_renew: u32,
    /// The same for UDP.
    pub udp_renew: u32,
    /// Sets in the handshake table minus one.
    pub syn_set_mask: u32,
    /// Idle time after which a closing TCP entry (client FIN seen) is
    /// stale, in jiffies.
    pub tcp_closing: u32,
    /// How much of `tcp_closing` an entry may use up before a packet
    /// renews it.
    pub tcp_closing_renew: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<DataplaneConfig>() == 80);
/// Where `layout_version` sits in every layout's `LB_CONFIG` value, so a
/// build can tell any layout's state apart: it must never move.
pub const LAYOUT_VERSION_OFFSET: usize = 36;
const _: () =
    assert!(core::mem::offset_of!(DataplaneConfig, layout_version) == LAYOUT_VERSION_OFFSET);

impl DataplaneConfig {
    /// All zero (a `const` [`Default`]).
    pub const ZERO: DataplaneConfig = DataplaneConfig {
        src_v4: 0,
        src_v6: [0; 4],
        mtu: 0,
        table_size: 0,
        nexthop_gen: 0,
        flags: 0,
        layout_version: 0,
        ifindex: 0,
        flow_set_mask: 0,
        tcp_idle: 0,
        udp_idle: 0,
        tcp_renew: 0,
        udp_renew: 0,
        syn_set_mask: 0,
        tcp_closing: 0,
        tcp_closing_renew: 0,
        _pad: 0,
    };
}

/// What the data path reads on every packet and only `lbd` writes: the
/// settings and the VIP address filter. They live in the balancer object's
/// global data (section [`GLOBALS_SECTION`], a one-value array map the
/// program addresses directly), so reading them takes no map lookup. Not
/// pinned: every loaded program has its own copy, which `lbd` fills before
/// the program is attached or replaces a running one. (`LB_CONFIG`, pinned,
/// keeps the settings as a record for a restarted `lbd`.)
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Globals {
    pub config: DataplaneConfig,
    /// Bitmap over `vip_filter_slot` of the VIP addresses: a clear bit
    /// means no VIP has an address that falls on it.
    pub vip_filter: [u64; VIP_FILTER_WORDS as usize],
    /// The destination MACs of frames that are the balancer's, as
    /// [`mac_word`]s: the interface's first, then `balancer.extra_macs`;
    /// [`NO_MAC`] in unused entries (and in all of them before `lbd` knows
    /// the interface). Frames for other MACs are not sent to a backend.
    pub local_macs: [u64; LOCAL_MACS],
}

/// Most `balancer.extra_macs`.
pub const MAX_EXTRA_MACS: usize = 4;
/// Entries of [`Globals::local_macs`]: the interface's MAC and the extra ones.
pub const LOCAL_MACS: usize = 1 + MAX_EXTRA_MACS;
/// An unused [`Globals::local_macs`] entry: equal to no [`mac_word`].
pub const NO_MAC: u64 = u64::MAX;

/// A MAC address as the data plane compares it: bytes 0..4 and 4..6 of it
/// read as native words (as they sit at the start of the frame), in one
/// `u64` whose upper 16 bits are zero.
#[inline(always)]
pub const fn mac_word(mac: [u8; 6]) -> u64 {
    u32::from_ne_bytes([mac[0], mac[1], mac[2], mac[3]]) as u64
        | (u16::from_ne_bytes([mac[4], mac[5]]) as u64) << 32
}

impl Globals {
    /// No VIPs, no settings, no MACs.
    pub const EMPTY: Globals = Globals {
        config: DataplaneConfig::ZERO,
        vip_filter: [0; VIP_FILTER_WORDS as usize],
        local_macs: [NO_MAC; LOCAL_MACS],
    };
}

/// Section (and map name) of [`Globals`] in the balancer object.
pub const GLOBALS_SECTION: &str = ".data.lb_globals";

/// A cached FIB result towards one backend, per CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NextHop {
    /// The first 12 bytes of the Ethernet header towards the backend (the
    /// next hop's MAC, then our interface's) as the two words they are
    /// written with: bytes 0..8 here, bytes 8..12 in `eth_tail` (see
    /// [`eth_macs`]).
    pub eth_head: u64,
    pub eth_tail: u32,
    /// `DataplaneConfig::nexthop_gen` when this was looked up.
    pub generation: u32,
}
const _: () = assert!(size_of::<NextHop>() == 16);

/// Destination and source MAC as the two native words that hold the first
/// 12 bytes of an Ethernet header (bytes 0..8, 8..12).
#[inline(always)]
pub const fn eth_macs(dst: [u8; 6], src: [u8; 6]) -> (u64, u32) {
    (
        u64::from_ne_bytes([
            dst[0], dst[1], dst[2], dst[3], dst[4], dst[5], src[0], src[1],
        ]),
        u32::from_ne_bytes([src[2], src[3], src[4], src[5]]),
    )
}

/// Packets and bytes (frame length as received, Ethernet header included)
/// forwarded, and new flows scheduled.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrafficCounters {
    pub packets: u64,
    pub bytes: u64,
    pub flows: u64,
}
const _: () = assert!(size_of::<TrafficCounters>() == 24);

/// Slots for [`crate::FlowEvent`]s in [`Stats`]: a power of two, so an
/// event index is bounded with a mask.
pub const FLOW_EVENT_SLOTS: usize = 16;
const _: () = assert!(crate::FLOW_EVENT_COUNT as usize <= FLOW_EVENT_SLOTS);
/// Slots for [`crate::Reason`]s in [`Stats`]: a power of two, so a reason
/// index is bounded with a mask; room to spare, so a new reason does not
/// change the layout.
pub const REASON_SLOTS: usize = 32;
const _: () = assert!(REASON_COUNT as usize <= REASON_SLOTS);
const _: () = assert!(REASON_SLOTS.is_power_of_two());

/// The data plane's packet and connection-table counters, one value per
/// CPU (`LB_STATS`): a packet finds all of them with one map lookup.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Packets per [`crate::Reason`], by index.
    pub reasons: [u64; REASON_SLOTS],
    /// Connection-table events per [`crate::FlowEvent`], by index.
    pub flows: [u64; FLOW_EVENT_SLOTS],
}
const _: () = assert!(size_of::<Stats>() == 384);

/// Benchmark only: what the benchmark programs restore.
///
/// `BPF_PROG_TEST_RUN` with `repeat` runs each iteration on the frame the
/// previous one left behind. The benchmark programs (`lb_bench_balancer`,
/// `lb_bench_floor`) strip an outer header they find and write back the
/// original L2 header before the program under test runs (inline), so
/// every iteration sees the original frame.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BenchControl {
    /// The input frame's L2 header (`l2_len` bytes, then zeros), as the
    /// words it is written back with: bytes 0..8, 8..16, 16..24, each read
    /// natively.
    pub l2: [u64; 3],
    /// Length of the L2 header: 14, or 18 with a VLAN tag.
    pub l2_len: u32,
    /// If not 0: offset of four bytes of the source address, which the
    /// restore step overwrites with a counter every iteration, so every packet is
    /// a new flow.
    pub seq_offset: u32,
}
const _: () = assert!(size_of::<BenchControl>() == 32);

impl BenchControl {
    /// All zero.
    pub const ZERO: BenchControl = BenchControl {
        l2: [0; 3],
        l2_len: 0,
        seq_offset: 0,
    };

    /// `l2` (at most 24 bytes) as [`BenchControl::l2`] words.
    pub fn l2_words(l2: &[u8]) -> [u64; 3] {
        let mut bytes = [0u8; 24];
        bytes[..l2.len()].copy_from_slice(l2);
        let word = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&bytes[i * 8..i * 8 + 8]);
            u64::from_ne_bytes(w)
        };
        [word(0), word(1), word(2)]
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::{net::IpAddr, vec::Vec};

    use super::*;
    use crate::addr_words;

    fn slot(a: &str) -> (u32, u64) {
        let addr: IpAddr = a.parse().unwrap();
        vip_filter_slot(&addr_words(addr).1)
    }

    /// Addresses that differ from a VIP in a pattern (the same bits flipped
    /// in two words, halves swapped, a counter in two places) land on its
    /// bit no more often than random addresses would (1 in 65536 each).
    #[test]
    fn the_vip_filter_has_no_structured_collisions() {
        let mut families: Vec<(&str, Vec<std::string::String>)> = Vec::new();
        // fc00:N::N against fc00:1::1: an xor-fold of the words cancels N.
        families.push((
            "fc00:1::1",
            (2..5000)
                .map(|n| std::format!("fc00:{n:x}::{n:x}"))
                .collect(),
        ));
        // The same 16 bits set in the second and fourth word.
        families.push((
            "2001:db8:10::1",
            (1..5000u32)
                .map(|n| std::format!("2001:db8:{:x}::{:x}:1", 0x10 ^ n, n))
                .collect(),
        ));
        // IPv4: the 16-bit halves swapped, and the same bits flipped in
        // both halves.
        families.push((
            "203.0.113.10",
            (0..5000u32)
                .map(|n| {
                    let (a, b) = ((n >> 8) as u8, n as u8);
                    std::format!("{}.{}.{}.{}", 113 ^ a, 10 ^ b, 203 ^ a, b)
                })
                .collect(),
        ));
        for (vip, others) in &families {
            let target = slot(vip);
            let hits: Vec<&std::string::String> =
                others.iter().filter(|o| slot(o) == target).collect();
            std::println!(
                "{vip}: {} of {} structured neighbours share its filter bit",
                hits.len(),
                others.len()
            );
            // Expected 5000 / 65536 = 0.08; 3 would happen about once in
            // ten thousand such families.
            assert!(hits.len() <= 3, "{vip}: {hits:?}");
        }
    }
}
