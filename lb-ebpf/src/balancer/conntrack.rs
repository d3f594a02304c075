//! The connection table and the handshake table on the data path (see
//! `lb_common::conntrack` for the layout and the rules): find a flow's slot,
//! judge the entry, remember new choices. A packet of an established flow
//! reads one set of one table (one cache line); a flow's second packet one
//! of each; nothing locks. Every change of a slot's key word is a
//! compare-and-swap against the word this CPU read.

use core::{
    intrinsics::{AtomicOrdering, atomic_cxchg},
    ptr::{read_volatile, write_volatile},
};

use aya_ebpf::helpers::bpf_jiffies64;
use lb_common::{
    BACKEND_ALLOCATED, BACKEND_COUNTED, BACKEND_DOWN, BackendInfo, DataplaneConfig, FLOW_CLOSING,
    FLOW_UNIT, FLOW_WAYS, FlowEvent, FlowKey, FlowSet, FlowSlot, PROTO_TCP, Stats,
    VIP_STICK_WHEN_DOWN, flow_set, syn_seen_slot,
};
use lb_ebpf::parse::{Packet, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN};

use crate::maps::{LB_BACKENDS, LB_FLOWS, LB_SYN_FLOWS, LB_SYN_SEEN, count_active, count_event};

/// Where a new flow's entry goes.
pub struct Victim {
    slot: *mut FlowSlot,
    /// The key word read there: the slot is claimed only if it still holds
    /// it.
    observed: u64,
    /// The busy word the claim swaps in (`FlowSlot::busy` of the flow).
    claim: u64,
    /// The slot holds another flow that has not expired yet.
    live: bool,
    /// The slot is in the handshake table.
    syn: bool,
    /// The packet opens a connection neither table knows: a SYN whose
    /// handshake is not in progress (no entry of its 5-tuple in the
    /// handshake table). Only such a SYN may be shed.
    pub opens: bool,
    /// The entry is a new flow for the active-flow counts: anything but a
    /// SYN sent again while its handshake runs (its flow is counted).
    pub counts: bool,
}

/// What the tables say about a packet's flow.
pub enum Lookup {
    /// Send it to this backend.
    Hit(u32, &'static BackendInfo),
    /// Schedule it (no entry, or a stale one) and record the choice here.
    Schedule(Victim),
    /// Schedule it and record nothing: the set is outside the map, which a
    /// correct mask rules out (counted `insert_failed`, a tripwire).
    Untracked,
}

/// The connection table's clock: jiffies, low 32 bits (see
/// `lb_common::idle_jiffies`). One load: the verifier inlines the helper.
#[inline(always)]
pub fn now() -> u32 {
    unsafe { bpf_jiffies64() as u32 }
}

/// Swaps the key word at `word` from `old` to `new` if it still holds
/// `old` (BPF `cmpxchg`).
#[inline(always)]
fn swap_key(word: *mut u64, old: u64, new: u64) -> bool {
    // SAFETY: an aligned u64 in a map value, live for the program run;
    // other CPUs only ever change it atomically too. (The BPF target has
    // no `AtomicU64::compare_exchange`; the intrinsic is its cmpxchg.)
    unsafe {
        atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(word, old, new)
            .1
    }
}

/// The idle timeout of an entry with key word `key` of the packet's flow
/// and how much of it may pass before a packet renews it, in jiffies.
#[inline(always)]
fn idle(pkt: &Packet, key: u64, cfg: &DataplaneConfig) -> (u32, u32) {
    if pkt.flow.proto != PROTO_TCP {
        (cfg.udp_idle, cfg.udp_renew)
    } else if FlowSlot::closing(key) {
        (cfg.tcp_closing, cfg.tcp_closing_renew)
    } else {
        (cfg.tcp_idle, cfg.tcp_renew)
    }
}

/// Ticks left before `expires` (negative: expired).
#[inline(always)]
fn left(expires: u32, now: u32) -> i32 {
    expires.wrapping_sub(now) as i32
}

/// A set, read once: the flow's own slot if it has one, else the slot that
/// expires first (empty slots first of all; a slot being written by another
/// CPU last: claiming it fails unless the other CPU is done, and then the
/// claim fails too, as the word changed).
struct Scan {
    set: *mut FlowSet,
    /// Way of the flow's slot, or `FLOW_WAYS`.
    own: usize,
    /// The key word of the flow's slot.
    own_key: u64,
    /// Way of the victim.
    victim: usize,
    victim_key: u64,
    victim_left: i32,
    /// `FlowSlot::busy` of the flow, computed once as the scan starts.
    claim: u64,
}

impl Scan {
    #[inline(always)]
    fn of(set: *mut FlowSet, hash: u64, ports: u32, now: u32) -> Scan {
        let mut s = Scan {
            set,
            own: FLOW_WAYS,
            own_key: 0,
            victim: 0,
            victim_key: 0,
            victim_left: i32::MAX,
            claim: FlowSlot::busy(hash),
        };
        // SAFETY: a valid map value for the life of the program run.
        let slots = unsafe { &(*set).slots };
        for (w, slot) in slots.iter().enumerate() {
            // Volatile: another CPU may rewrite the slot; the key is read
            // once, and the ports after it (see `FlowSlot`).
            let key = unsafe { read_volatile(&slot.key) };
            if FlowSlot::tagged(key, hash) && unsafe { read_volatile(&slot.ports) } == ports {
                s.own = w;
                s.own_key = key;
                break;
            }
            let l = if key == 0 {
                i32::MIN
            } else if FlowSlot::is_busy(key) {
                i32::MAX
            } else {
                left(unsafe { read_volatile(&slot.expires) }, now)
            };
            if w == 0 || l < s.victim_left {
                s.victim = w;
                s.victim_key = key;
                s.victim_left = l;
            }
        }
        s
    }

    #[inline(always)]
    fn found(&self) -> bool {
        self.own < FLOW_WAYS
    }

    #[inline(always)]
    fn slot(&self, way: usize) -> *mut FlowSlot {
        unsafe { &mut (*self.set).slots[way & (FLOW_WAYS - 1)] as *mut FlowSlot }
    }

    /// Where a new entry for the flow goes: its own slot, else the victim.
    #[inline(always)]
    fn place(&self, syn: bool) -> Victim {
        let (way, observed, live) = if self.found() {
            (self.own, self.own_key, false)
        } else {
            (self.victim, self.victim_key, self.victim_left > 0)
        };
        Victim {
            slot: self.slot(way),
            observed,
            claim: self.claim,
            live,
            syn,
            opens: false,
            counts: true,
        }
    }

    /// The flow's backend if its slot holds a usable entry.
    #[inline(always)]
    fn backend(
        &self,
        now: u32,
        vip_flags: impl FnOnce() -> u32,
    ) -> Option<(u32, &'static BackendInfo)> {
        if !self.found() {
            return None;
        }
        let id = FlowSlot::backend_id(self.own_key);
        let b = LB_BACKENDS.get(id)?;
        let expires = unsafe { read_volatile(&(*self.slot(self.own)).expires) };
        if b.flags & BACKEND_ALLOCATED == 0
            || !FlowSlot::same_incarnation(self.own_key, b.incarnation)
            || left(expires, now) <= 0
        {
            return None;
        }
        // Down backends are rare: only then is the VIP's policy looked up.
        if b.flags & BACKEND_DOWN != 0 && vip_flags() & VIP_STICK_WHEN_DOWN == 0 {
            return None;
        }
        Some((id, b))
    }

    /// Empties the flow's slot, if it still holds the flow's entry; returns
    /// the key word it held (0 if nothing was emptied).
    #[inline(always)]
    fn clear_own(&mut self) -> u64 {
        let key = self.own_key;
        if self.found() && swap_key(unsafe { &mut (*self.slot(self.own)).key }, key, 0) {
            self.own_key = 0;
            return key;
        }
        0
    }
}

/// Looks the packet's flow (64-bit flow hash `hash`) up.
///
/// A TCP SYN (without ACK) opens a new connection: it is scheduled on the
/// current table whatever the tables hold, and its choice goes to the
/// handshake table. Any other packet of a flow neither table knows is
/// scheduled and admitted the same way. The flow's next packet moves the
/// entry to the connection table. A TCP RST ends its flow (the slot is
/// emptied; the RST itself still reaches the backend); a FIN from the
/// client starts its closing time.
#[inline(always)]
pub fn lookup(
    pkt: &Packet,
    hash: u64,
    cfg: &DataplaneConfig,
    now: u32,
    stats: &mut Stats,
    vip_flags: impl Fn() -> u32,
) -> Lookup {
    let tcp = pkt.flow.proto == PROTO_TCP;
    if tcp && pkt.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
        count_event(stats, FlowEvent::Miss);
        let Some(set) = handshake_set(hash, cfg) else {
            return untracked(stats);
        };
        let scan = Scan::of(set, hash, pkt.flow.ports, now);
        // A SYN sent again while its handshake runs keeps its chance.
        let opens = !scan.found();
        return Lookup::Schedule(Victim {
            opens,
            counts: opens,
            ..scan.place(true)
        });
    }
    let Some(set) = LB_FLOWS.get_ptr_mut(flow_set(hash, cfg.flow_set_mask)) else {
        count_event(stats, FlowEvent::Miss);
        return untracked(stats);
    };
    let mut main = Scan::of(set, hash, pkt.flow.ports, now);
    // A flow in admission (a SYN's choice, or a new flow's first packet):
    // its choice counts, even over an old entry of the same 5-tuple.
    if !main.found() || (tcp && syn_seen(hash)) {
        if let Some(set) = handshake_set(hash, cfg) {
            let mut hs = Scan::of(set, hash, pkt.flow.ports, now);
            if hs.found() {
                let usable = hs.backend(now, &vip_flags);
                // Used or stale, the admission entry is done with.
                hs.clear_own();
                let (word, bit) = syn_seen_slot(hash);
                if let Some(w) = LB_SYN_SEEN.get_ptr_mut(word) {
                    // Other flows may share the bit: they are found through
                    // their connection-table miss instead.
                    unsafe { *w &= !bit };
                }
                if let Some((id, b)) = usable {
                    count_event(stats, FlowEvent::Hit);
                    if pkt.tcp_flags & TCP_RST != 0 {
                        count_event(stats, FlowEvent::Reset);
                        // The flow was counted when it was scheduled.
                        counted(id, b, -FLOW_UNIT);
                        // An old connection's entry of the same 5-tuple
                        // ends too.
                        main.clear_own();
                    } else {
                        write(pkt, main.place(false), hash, id, b, now, cfg, stats);
                    }
                    return Lookup::Hit(id, b);
                }
            }
            if !main.found() {
                count_event(stats, FlowEvent::Miss);
                return Lookup::Schedule(hs.place(true));
            }
        } else if !main.found() {
            count_event(stats, FlowEvent::Miss);
            return untracked(stats);
        }
    }
    let Some((id, b)) = main.backend(now, &vip_flags) else {
        // Its own (stale) slot takes the new choice: no other flow's entry
        // is at stake, so it goes straight into this table.
        count_event(stats, FlowEvent::Stale);
        return Lookup::Schedule(main.place(false));
    };
    count_event(stats, FlowEvent::Hit);
    let slot = main.slot(main.own);
    if pkt.tcp_flags & TCP_RST != 0 {
        let key = main.clear_own();
        if key != 0 {
            counted(
                id,
                b,
                if FlowSlot::closing(key) {
                    -1
                } else {
                    -FLOW_UNIT
                },
            );
        }
        count_event(stats, FlowEvent::Reset);
    } else if tcp && pkt.tcp_flags & TCP_FIN != 0 && !FlowSlot::closing(main.own_key) {
        if swap_key(
            unsafe { &mut (*slot).key },
            main.own_key,
            main.own_key | FLOW_CLOSING,
        ) {
            unsafe { write_volatile(&mut (*slot).expires, now.wrapping_add(cfg.tcp_closing)) };
            count_event(stats, FlowEvent::Closing);
            // Open to closing: a flow unit down to 1.
            counted(id, b, 1 - FLOW_UNIT);
        }
    } else {
        let (idle, renew) = idle(pkt, main.own_key, cfg);
        let expires = unsafe { read_volatile(&(*slot).expires) };
        if idle as i32 - left(expires, now) > renew as i32 {
            unsafe { write_volatile(&mut (*slot).expires, now.wrapping_add(idle)) };
        }
    }
    Lookup::Hit(id, b)
}

/// Adds `units` to backend `id`'s active flows if it is counted (see
/// `lb_common::ActiveFlows`): a flow unit for a new flow, less for one
/// that closed or ended.
#[inline(always)]
fn counted(id: u32, b: &BackendInfo, units: i64) {
    if b.flags & BACKEND_COUNTED != 0 {
        count_active(id, b.vip_id, units);
    }
}

#[inline(always)]
fn untracked(stats: &mut Stats) -> Lookup {
    count_event(stats, FlowEvent::InsertFailed);
    Lookup::Untracked
}

/// The handshake table's set for `hash`.
#[inline(always)]
fn handshake_set(hash: u64, cfg: &DataplaneConfig) -> Option<*mut FlowSet> {
    LB_SYN_FLOWS.get_ptr_mut(flow_set(hash, cfg.syn_set_mask))
}

/// Whether the handshake filter has the bit of `hash`.
#[inline(always)]
fn syn_seen(hash: u64) -> bool {
    let (word, bit) = syn_seen_slot(hash);
    LB_SYN_SEEN.get(word).is_some_and(|w| w & bit != 0)
}

/// Remembers that the packet's flow goes to backend `id`, in the slot
/// [`lookup`] chose. A RST starts no entry. A new entry of a counted backend
/// adds a flow to its active flows (see `lb_common::ActiveFlows`).
#[inline(always)]
pub fn record(
    pkt: &Packet,
    v: Victim,
    hash: u64,
    id: u32,
    backend: &BackendInfo,
    now: u32,
    cfg: &DataplaneConfig,
    stats: &mut Stats,
) {
    if pkt.tcp_flags & TCP_RST != 0 {
        return;
    }
    if v.syn && pkt.tcp_flags & TCP_SYN != 0 {
        let (word, bit) = syn_seen_slot(hash);
        if let Some(w) = LB_SYN_SEEN.get_ptr_mut(word) {
            // Read first: a set bit (the common case under load) costs no
            // write to a line other CPUs read.
            unsafe {
                if *w & bit == 0 {
                    *w |= bit;
                }
            }
        }
    }
    let counts = v.counts;
    if write(pkt, v, hash, id, backend, now, cfg, stats) && counts {
        counted(id, backend, FLOW_UNIT);
    }
}

/// Claims the victim's slot and writes the flow's entry into it: the
/// slot's word is swapped for the busy word first (so another CPU that
/// picked the same slot loses, counted, and nobody reads the half-written
/// entry), then the ports and expiry, then the final word. `false` if the
/// slot was lost to another CPU.
#[inline(always)]
fn write(
    pkt: &Packet,
    v: Victim,
    hash: u64,
    id: u32,
    backend: &BackendInfo,
    now: u32,
    cfg: &DataplaneConfig,
    stats: &mut Stats,
) -> bool {
    let key = unsafe { &mut (*v.slot).key };
    if !swap_key(key, v.observed, v.claim) {
        count_event(
            stats,
            if v.syn {
                FlowEvent::SynRaced
            } else {
                FlowEvent::Raced
            },
        );
        return false;
    }
    if v.live {
        count_event(
            stats,
            if v.syn {
                FlowEvent::SynEvicted
            } else {
                FlowEvent::Evicted
            },
        );
    }
    let word = FlowSlot::key(hash, id, backend.incarnation);
    unsafe {
        write_volatile(&mut (*v.slot).ports, pkt.flow.ports);
        write_volatile(
            &mut (*v.slot).expires,
            now.wrapping_add(idle(pkt, word, cfg).0),
        );
        // This CPU owns the slot now (busy): a plain store publishes it.
        write_volatile(key, word);
    }
    true
}

/// The backend recorded for `flow` (its hash: `hash`), if its entry is in
/// the connection table or, for a flow in admission, the handshake table,
/// and its backend id still names the same backend (the idle time is not
/// checked: an ICMP error about a flow follows its packets closely).
#[inline(always)]
pub fn peek(
    flow: &FlowKey,
    hash: u64,
    cfg: &DataplaneConfig,
) -> Option<(u32, &'static BackendInfo)> {
    let main = LB_FLOWS.get(flow_set(hash, cfg.flow_set_mask))?;
    if let Some(found) = peek_set(main, flow, hash) {
        return found;
    }
    let hs = LB_SYN_FLOWS.get(flow_set(hash, cfg.syn_set_mask))?;
    peek_set(hs, flow, hash).flatten()
}

/// `Some` if `set` holds `flow`'s entry: with its backend if that is
/// current.
#[inline(always)]
fn peek_set(
    set: &FlowSet,
    flow: &FlowKey,
    hash: u64,
) -> Option<Option<(u32, &'static BackendInfo)>> {
    for slot in set.slots.iter() {
        let key = unsafe { read_volatile(&slot.key) };
        if FlowSlot::tagged(key, hash) && unsafe { read_volatile(&slot.ports) } == flow.ports {
            let id = FlowSlot::backend_id(key);
            let current = LB_BACKENDS.get(id).filter(|b| {
                b.flags & BACKEND_ALLOCATED != 0 && FlowSlot::same_incarnation(key, b.incarnation)
            });
            return Some(current.map(|b| (id, b)));
        }
    }
    None
}
