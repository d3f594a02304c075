//! The connection table: which backend each flow goes to.
//!
//! An LRU hash map from [`crate::FlowKey`] to [`FlowEntry`], consulted
//! before the scheduler. A hit sends the packet to the recorded backend; a
//! miss runs Maglev and records the choice. An entry is stale, and the flow
//! is scheduled again, when its idle time is over (TCP and UDP have their
//! own), when its backend id was freed or given to another backend (see
//! `BackendInfo::incarnation`), or when its backend is down and the VIP
//! re-schedules such flows. A TCP RST removes the entry. A full table
//! evicts the least recently used entries (the kernel does not count
//! evictions).

use core::mem::size_of;

/// Value of the connection table.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowEntry {
    /// The backend.
    pub backend_id: u32,
    /// `BackendInfo::incarnation` of that backend when the entry was made.
    pub incarnation: u32,
    /// Last time (`bpf_ktime_get_coarse_ns`) a packet of the flow was seen,
    /// updated at most every [`FLOW_TOUCH_NS`].
    pub last_seen_ns: u64,
}
const _: () = assert!(size_of::<FlowEntry>() == 16);

/// How stale `FlowEntry::last_seen_ns` may get before a packet refreshes
/// it: one write per flow and second at most, not one per packet.
pub const FLOW_TOUCH_NS: u64 = 1_000_000_000;

/// Connection-table events. Index of `LB_FLOW_STATS`.
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
    /// Writing a new entry failed; the packet was forwarded anyway.
    InsertFailed = 3,
    /// A TCP RST removed its flow's entry.
    Reset = 4,
}

/// Number of [`FlowEvent`]s.
pub const FLOW_EVENT_COUNT: u32 = 5;

impl FlowEvent {
    /// Every event, in index order.
    pub const ALL: [FlowEvent; FLOW_EVENT_COUNT as usize] = [
        FlowEvent::Hit,
        FlowEvent::Miss,
        FlowEvent::Stale,
        FlowEvent::InsertFailed,
        FlowEvent::Reset,
    ];

    /// Label value used in metrics.
    pub const fn name(self) -> &'static str {
        match self {
            FlowEvent::Hit => "hit",
            FlowEvent::Miss => "miss",
            FlowEvent::Stale => "stale",
            FlowEvent::InsertFailed => "insert_failed",
            FlowEvent::Reset => "reset",
        }
    }
}
