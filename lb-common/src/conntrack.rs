//! The connection table: which backend each flow goes to.
//!
//! A set-associative table in one BPF array, consulted before the
//! scheduler. A flow's 64-bit hash ([`crate::flow_hash64`], the packet's
//! one hash) picks its set with its low bits; its high 32 bits (the hash
//! Maglev uses) are the flow's tag in the set. A set is one cache line of
//! [`FLOW_WAYS`] slots, so a lookup, an insert and an eviction each touch
//! one line — no locks, no allocation, no list to maintain — which is what
//! makes a new flow cheap (a kernel LRU hash map takes bucket and LRU-list
//! locks and walks cold nodes on every insert).
//!
//! A hit sends the packet to the recorded backend; a miss runs the
//! scheduler and records the choice in the slot of its set that expires
//! first: an empty or expired slot if there is one, otherwise the live one
//! closest to its idle timeout (counted as an eviction). Expiry works like
//! an LRU within the set: every packet of a flow pushes its expiry out.
//!
//! An entry is stale, and the flow is scheduled again, when its idle time
//! is over (TCP and UDP have their own), when its backend id was freed or
//! given to another backend (see `BackendInfo::incarnation`), or when its
//! backend is down and the VIP re-schedules such flows. A TCP RST empties
//! the slot. A FIN from the client puts the entry in the closing state
//! (a bit of its key): from then on it lives `tcp_closing_timeout` past the
//! flow's last packet instead of `tcp_idle_timeout`, so closed connections
//! make room within seconds instead of an hour (the backend's own FIN never
//! crosses the balancer: replies go straight to the client).
//!
//! Sizing: `conntrack.size` slots (rounded up to a power of two), 16 bytes
//! each. Flows hash evenly over the sets; with `n` concurrent flows in `s`
//! slots, a set overflows (and evicts a live flow) roughly when it draws
//! more than four flows: at n = s/4 (the default: 1M flows in 4M slots)
//! about 0.4 % of flows, at n = s/2 about 4 %. An evicted flow is not
//! lost: its next packet is scheduled again, and for `maglev` and
//! `maglev-src` VIPs that gives it the same backend unless the VIP's
//! backends changed since it started. (`wrr` and `least-load` choices do
//! not follow from the packet: an evicted flow of such a VIP goes to
//! whichever backend is next.)
//!
//! Admission: a new flow does not enter this table with its first packet.
//! Its choice goes to a small table of the same layout, the handshake
//! table (`conntrack.size` / 64 slots, at least 1024: 1 MiB at the default,
//! so it stays in the CPU's cache); the flow's next packet moves the entry
//! into the connection table. That holds for a TCP SYN and for the first
//! packet of any flow the table does not know (a TCP packet without SYN, a
//! UDP datagram). So a new flow costs no cold cache line, and a flood of
//! one-packet flows (SYNs, ACKs, UDP with random ports or sources) churns
//! the handshake table only: it cannot evict established flows. Entries
//! pushed out of the handshake table by others count `syn_evicted`; their
//! next packet is scheduled again (Maglev: the same backend unless the VIP
//! changed meanwhile). A SYN also sets a bit in a 64 Kibit filter: a
//! packet whose bit is set looks in the handshake table first, so a SYN
//! that reuses the 5-tuple of an old connection with a live entry is not
//! sent to the old one's backend.
//!
//! Matching: a slot holds a flow when its tag (the high 32 bits of the
//! flow hash; the set index comes from the low bits) and its ports (source
//! and destination, compared as they are, no hash) equal the packet's. A
//! flow with no entry matches another flow's slot only if both hashes agree
//! in 32 bits and in the set bits and the two flows use the same ports:
//! about 4 / 2^48 per lookup for clients with random source ports, 4 / 2^32
//! for flows that differ in the source address alone. Such a flow goes to
//! the other flow's backend; as the tag is also the hash Maglev uses, that
//! is the backend Maglev would have given it, unless the VIP's backends
//! changed since. Flows to different VIP ports never match each other.
//!
//! Concurrency: both tables are shared by all CPUs. A slot's identity
//! (tag, backend id, incarnation, closing bit) is one 64-bit word, and
//! every change of it is a compare-and-swap against the word the CPU read
//! (BPF `cmpxchg`, Linux 5.12 and later): a new entry first claims its
//! slot by swapping the victim's word for [`FLOW_BUSY`] (its own tag, a
//! reserved backend id: it matches no flow and is no one's victim), writes
//! the ports and expiry, and then stores its final word. Two CPUs that
//! pick the same slot at once cannot both win: the loser counts `raced`
//! (or `syn_raced` in the handshake table) and its flow's next packet is
//! scheduled again. A RST, a FIN and a move out of the handshake table
//! change a slot only if it still holds the word they read, so none of
//! them can clear or mark another flow's entry written meanwhile. A reader
//! sees the old flow or the new one with its own backend, never one flow
//! with another's backend. (Renewing an entry's expiry is a plain store:
//! at worst it lengthens the life of an entry that replaced it.)

use core::mem::size_of;

/// Slots per set: one 64-byte cache line.
pub const FLOW_WAYS: usize = 4;

/// One slot of the connection table.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowSlot {
    /// [`FlowSlot::key`]: the flow's tag (bits 32..64), the closing bit
    /// ([`FLOW_CLOSING`], bit 31), the low 11 bits of its backend's
    /// `BackendInfo::incarnation` (bits 20..31) and the backend id (bits
    /// 0..20); 0 for an empty slot.
    pub key: u64,
    /// The flow's ports word (`FlowKey::ports`).
    pub ports: u32,
    /// When the entry expires: last packet plus the idle timeout of its
    /// protocol, in jiffies (the kernel's tick counter, `bpf_jiffies64`,
    /// low 32 bits; see [`idle_jiffies`]).
    pub expires: u32,
}
const _: () = assert!(size_of::<FlowSlot>() == 16);

/// Bits of a backend id in [`FlowSlot::key`] (`balancer.max_backends` is
/// below 2^20: the id of all ones is [`FLOW_BUSY`]'s).
pub const FLOW_ID_BITS: u32 = 20;
/// Most backend ids ([`MAX_BACKEND_IDS`] − 1 is the highest).
pub const MAX_BACKEND_IDS: u32 = (1 << FLOW_ID_BITS) - 1;
/// Bits of a backend's incarnation in [`FlowSlot::key`]. An entry whose
/// backend id was given out again a multiple of 2048 times while the flow
/// was silent would pass for current; its old backend is gone by then, so
/// the flow could not have been saved anyway.
pub const FLOW_INCARNATION_BITS: u32 = 11;
/// [`FlowSlot::key`] bit: a FIN from the client was seen (closing state).
pub const FLOW_CLOSING: u64 = 1 << 31;
/// The low word of a slot being written (see the module docs): backend id
/// all ones, which no backend has.
pub const FLOW_BUSY: u64 = 0xFFFF_FFFF;

impl FlowSlot {
    /// The key word of a flow with hash `hash` going to backend
    /// `backend_id` of incarnation `incarnation`.
    #[inline(always)]
    pub const fn key(hash: u64, backend_id: u32, incarnation: u32) -> u64 {
        (hash & 0xFFFF_FFFF_0000_0000)
            | ((incarnation & ((1 << FLOW_INCARNATION_BITS) - 1)) << FLOW_ID_BITS) as u64
            | (backend_id & ((1 << FLOW_ID_BITS) - 1)) as u64
    }

    /// Whether key word `key` holds the entry of a flow with hash `hash`
    /// (it is not empty and not being written).
    #[inline(always)]
    pub const fn tagged(key: u64, hash: u64) -> bool {
        key != 0 && key >> 32 == hash >> 32 && key as u32 != FLOW_BUSY as u32
    }

    /// The word a slot holds while a flow with hash `hash` claims it.
    #[inline(always)]
    pub const fn busy(hash: u64) -> u64 {
        (hash & 0xFFFF_FFFF_0000_0000) | FLOW_BUSY
    }

    /// Whether key word `key` is being written by another CPU.
    #[inline(always)]
    pub const fn is_busy(key: u64) -> bool {
        key as u32 == FLOW_BUSY as u32
    }

    /// Whether the entry of key word `key` is closing (client FIN seen).
    #[inline(always)]
    pub const fn closing(key: u64) -> bool {
        key & FLOW_CLOSING != 0
    }

    /// The backend id of a key word.
    #[inline(always)]
    pub const fn backend_id(key: u64) -> u32 {
        key as u32 & ((1 << FLOW_ID_BITS) - 1)
    }

    /// Whether a key word was made for incarnation `incarnation` of its
    /// backend.
    #[inline(always)]
    pub const fn same_incarnation(key: u64, incarnation: u32) -> bool {
        ((key as u32) >> FLOW_ID_BITS) & ((1 << FLOW_INCARNATION_BITS) - 1)
            == incarnation & ((1 << FLOW_INCARNATION_BITS) - 1)
    }
}

/// One set of the connection table: a cache line.
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowSet {
    pub slots: [FlowSlot; FLOW_WAYS],
}
const _: () = assert!(size_of::<FlowSet>() == 64);

/// The set of a flow with hash `hash` in a table of `mask + 1` sets.
#[inline(always)]
pub const fn flow_set(hash: u64, mask: u32) -> u32 {
    hash as u32 & mask
}

/// Number of sets (a power of two) for a table of at least `slots` slots.
pub const fn flow_sets(slots: u32) -> u32 {
    let sets = slots.div_ceil(FLOW_WAYS as u32);
    if sets <= 1 {
        1
    } else {
        sets.next_power_of_two()
    }
}

/// Slots of the handshake table for a connection table of `slots` slots.
pub const fn syn_slots(slots: u32) -> u32 {
    let s = slots / 64;
    if s < 1024 { 1024 } else { s }
}

/// Words (`u64`) of the handshake filter: 65536 bits.
pub const SYN_SEEN_WORDS: u32 = 1024;

/// Word index and bit of the handshake filter for a flow hash (bits 20..36:
/// apart from the low bits that pick sets).
#[inline(always)]
pub const fn syn_seen_slot(hash: u64) -> (u32, u64) {
    let i = (hash >> 20) as u32 & 0xFFFF;
    (i >> 6, 1 << (i & 63))
}

/// An idle timeout of `idle_ns` in jiffies of a kernel ticking at `hz`:
/// rounded up and plus one tick, so an entry lives at least the whole
/// timeout whatever the phase of the clock.
///
/// The data plane's clock is the jiffies counter: reading it is one load
/// (the verifier inlines `bpf_jiffies64`), where `bpf_ktime_get_coarse_ns`
/// is a helper call on every packet. Its unit is 1/HZ (1 to 10 ms); user
/// space finds HZ from the resolution of `CLOCK_MONOTONIC_COARSE` and
/// converts the timeouts. Expiry compares with wrapping arithmetic on 32
/// bits, good for timeouts below 2^31 ticks (24 days at 1000 Hz; the
/// config allows at most a week).
#[inline(always)]
pub const fn idle_jiffies(idle_ns: u64, hz: u32) -> u32 {
    (idle_ns.saturating_mul(hz as u64).div_ceil(1_000_000_000)) as u32 + 1
}

/// How much of its idle timeout (`idle` jiffies at `hz`) an entry may use
/// up before a packet renews it: one write per flow per eighth of the
/// timeout at most (and at least once a second), not one per packet.
#[inline(always)]
pub const fn renew_after(idle: u32, hz: u32) -> u32 {
    let eighth = idle >> 3;
    if eighth < hz { eighth } else { hz }
}

/// Connection-table events. Index of `Stats::flows` (`LB_STATS`).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FlowEvent {
    /// A packet found its flow's entry and went to the recorded backend.
    Hit = 0,
    /// No entry: the scheduler chose a backend (and an entry was written).
    Miss = 1,
    /// An entry was found but was stale (idle too long, backend gone, or
    /// backend down): the flow was scheduled again.
    Stale = 2,
    /// Writing a new entry failed; the packet was forwarded anyway. (With
    /// the array table only a set index outside the map could cause it: a
    /// tripwire.)
    InsertFailed = 3,
    /// A TCP RST removed its flow's entry.
    Reset = 4,
    /// A new entry replaced a live one (its set was full).
    Evicted = 5,
    /// A new flow's entry replaced a live one in the handshake table (many
    /// new flows at once, or a flood of one-packet flows).
    SynEvicted = 6,
    /// A new entry lost its connection-table slot to another CPU's at the
    /// same moment (see the module docs); its flow's next packet is
    /// scheduled again.
    Raced = 7,
    /// The same in the handshake table.
    SynRaced = 8,
    /// A client FIN put its flow's entry in the closing state.
    Closing = 9,
    /// A new flow's table lookup overlapped `lbd`'s table writes twice in a
    /// row (see `crate::TABLE_GEN_DOC`).
    TableRaced = 10,
    /// A TCP packet without SYN and without an entry went to its current
    /// backend with a second-chance candidate (and no entry was written;
    /// see `crate::second_chance`).
    SecondChance = 11,
}

/// Number of [`FlowEvent`]s.
pub const FLOW_EVENT_COUNT: u32 = 12;

impl FlowEvent {
    /// Every event, in index order.
    pub const ALL: [FlowEvent; FLOW_EVENT_COUNT as usize] = [
        FlowEvent::Hit,
        FlowEvent::Miss,
        FlowEvent::Stale,
        FlowEvent::InsertFailed,
        FlowEvent::Reset,
        FlowEvent::Evicted,
        FlowEvent::SynEvicted,
        FlowEvent::Raced,
        FlowEvent::SynRaced,
        FlowEvent::Closing,
        FlowEvent::TableRaced,
        FlowEvent::SecondChance,
    ];

    /// Label value used in metrics.
    pub const fn name(self) -> &'static str {
        match self {
            FlowEvent::Hit => "hit",
            FlowEvent::Miss => "miss",
            FlowEvent::Stale => "stale",
            FlowEvent::InsertFailed => "insert_failed",
            FlowEvent::Reset => "reset",
            FlowEvent::Evicted => "evicted",
            FlowEvent::SynEvicted => "syn_evicted",
            FlowEvent::Raced => "raced",
            FlowEvent::SynRaced => "syn_raced",
            FlowEvent::Closing => "closing",
            FlowEvent::TableRaced => "table_raced",
            FlowEvent::SecondChance => "second_chance",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sets_are_powers_of_two_with_room_for_the_slots() {
        assert_eq!(flow_sets(1024), 256);
        assert_eq!(flow_sets(1025), 512);
        assert_eq!(flow_sets(4_194_304), 1 << 20);
        assert_eq!(flow_sets(1_000_000), 1 << 18);
        assert_eq!(flow_sets(1), 1);
    }

    #[test]
    fn the_handshake_table_is_a_64th_and_at_least_1024_slots() {
        assert_eq!(syn_slots(4_194_304), 65536);
        assert_eq!(syn_slots(1024), 1024);
        let (w, b) = syn_seen_slot(u64::MAX);
        assert_eq!((w, b), (SYN_SEEN_WORDS - 1, 1 << 63));
    }

    #[test]
    fn idle_jiffies_cover_the_timeout() {
        for hz in [100u32, 250, 300, 1000] {
            for ns in [
                1_000_000_000u64,
                1_000_000_001,
                30_000_000_000,
                7 * 24 * 3600 * 1_000_000_000,
            ] {
                let t = idle_jiffies(ns, hz);
                assert!(
                    u64::from(t - 1) * 1_000_000_000 >= ns * u64::from(hz),
                    "{ns} ns at {hz} Hz"
                );
                assert!(
                    u64::from(t - 2) * 1_000_000_000 < ns * u64::from(hz),
                    "{ns} ns at {hz} Hz"
                );
                assert!(t < 1 << 31, "{ns} ns at {hz} Hz");
                let r = renew_after(t, hz);
                assert!(r >= 1 && r <= t / 8 && r <= hz, "{ns} ns at {hz} Hz");
            }
        }
    }

    #[test]
    fn a_key_carries_its_flow_backend_and_incarnation() {
        let h = 0xDEAD_BEEF_0012_3456u64;
        let k = FlowSlot::key(h, MAX_BACKEND_IDS - 1, 2049);
        assert!(FlowSlot::tagged(k, h));
        assert!(!FlowSlot::tagged(k, h ^ (1 << 40)));
        assert!(
            FlowSlot::tagged(k, h ^ 1),
            "the set bits are not in the tag"
        );
        assert_eq!(FlowSlot::backend_id(k), MAX_BACKEND_IDS - 1);
        assert!(FlowSlot::same_incarnation(k, 2049));
        assert!(FlowSlot::same_incarnation(k, 1), "11 bits");
        assert!(!FlowSlot::same_incarnation(k, 2050));
        assert!(!FlowSlot::tagged(0, 0));
        assert!(!FlowSlot::closing(k));
        let c = k | FLOW_CLOSING;
        assert!(FlowSlot::closing(c) && FlowSlot::tagged(c, h));
        assert_eq!(FlowSlot::backend_id(c), MAX_BACKEND_IDS - 1);
        assert!(
            FlowSlot::same_incarnation(c, 2049),
            "the closing bit is no incarnation bit"
        );
        let b = FlowSlot::busy(h);
        assert!(FlowSlot::is_busy(b) && !FlowSlot::tagged(b, h));
        assert!(!FlowSlot::is_busy(k) && !FlowSlot::is_busy(c));
    }
}
