//! The connection table and the handshake table on the data path (see
//! `lb_common::conntrack` for the layout and the rules): find a flow's slot,
//! judge the entry, remember new choices. A packet reads one set of one
//! table (one cache line), a first packet after a SYN one of each; nothing
//! locks.

use core::ptr::{read_volatile, write_volatile};

use aya_ebpf::helpers::bpf_jiffies64;
use lb_common::{
    BACKEND_ALLOCATED, BACKEND_DOWN, BackendInfo, DataplaneConfig, FLOW_WAYS, FlowEvent, FlowKey,
    FlowSet, FlowSlot, PROTO_TCP, Stats, VIP_STICK_WHEN_DOWN, flow_set, syn_seen_slot,
};
use lb_ebpf::parse::{Packet, TCP_ACK, TCP_RST, TCP_SYN};

use crate::maps::{LB_BACKENDS, LB_FLOWS, LB_SYN_FLOWS, LB_SYN_SEEN, count_event};

/// Where a new flow's entry goes.
pub struct Victim {
    slot: *mut FlowSlot,
    /// The slot holds another flow that has not expired yet.
    live: bool,
    /// The slot is in the handshake table.
    syn: bool,
}

/// What the tables say about a packet's flow.
pub enum Lookup {
    /// Send it to this backend.
    Hit(u32, &'static BackendInfo),
    /// Schedule it (no entry, or a stale one) and record the choice here
    /// (`None`: the set is outside the map, which a correct mask rules out).
    Schedule(Option<Victim>),
}

/// The connection table's clock: jiffies, low 32 bits (see
/// `lb_common::idle_jiffies`). One load: the verifier inlines the helper.
#[inline(always)]
pub fn now() -> u32 {
    unsafe { bpf_jiffies64() as u32 }
}

/// The idle timeout of the packet's protocol and how much of it may pass
/// before a packet renews the entry, in jiffies.
#[inline(always)]
fn idle(pkt: &Packet, cfg: &DataplaneConfig) -> (u32, u32) {
    if pkt.flow.proto == PROTO_TCP {
        (cfg.tcp_idle, cfg.tcp_renew)
    } else {
        (cfg.udp_idle, cfg.udp_renew)
    }
}

/// Ticks left before `expires` (negative: expired).
#[inline(always)]
fn left(expires: u32, now: u32) -> i32 {
    expires.wrapping_sub(now) as i32
}

/// A set, read once: the flow's own slot if it has one, else the slot that
/// expires first (empty slots first of all).
struct Scan {
    set: *mut FlowSet,
    /// Way of the flow's slot, or `FLOW_WAYS`.
    own: usize,
    /// The key word of the flow's slot.
    own_key: u64,
    victim: usize,
    victim_left: i32,
}

impl Scan {
    #[inline(always)]
    fn of(set: *mut FlowSet, hash: u64, ports: u32, now: u32) -> Scan {
        let mut s = Scan {
            set,
            own: FLOW_WAYS,
            own_key: 0,
            victim: 0,
            victim_left: i32::MAX,
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
            } else {
                left(slot.expires, now)
            };
            if l < s.victim_left {
                s.victim = w;
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
        if self.found() {
            Victim {
                slot: self.slot(self.own),
                live: false,
                syn,
            }
        } else {
            Victim {
                slot: self.slot(self.victim),
                live: self.victim_left > 0,
                syn,
            }
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
        let expires = unsafe { (*self.slot(self.own)).expires };
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
}

/// Looks the packet's flow (64-bit flow hash `hash`) up.
///
/// A TCP SYN (without ACK) opens a new connection: it is scheduled on the
/// current table whatever the tables hold, and its choice goes to the
/// handshake table. The flow's next packet moves it to the connection
/// table. A TCP RST ends its flow: the slot is emptied (the RST itself
/// still reaches the backend).
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
        let Some(set) = LB_SYN_FLOWS.get_ptr_mut(flow_set(hash, cfg.syn_set_mask)) else {
            return Lookup::Schedule(None);
        };
        return Lookup::Schedule(Some(Scan::of(set, hash, pkt.flow.ports, now).place(true)));
    }
    let Some(set) = LB_FLOWS.get_ptr_mut(flow_set(hash, cfg.flow_set_mask)) else {
        count_event(stats, FlowEvent::Miss);
        return Lookup::Schedule(None);
    };
    let main = Scan::of(set, hash, pkt.flow.ports, now);
    // A handshake in progress: its SYN's choice counts, even over an old
    // entry of the same 5-tuple.
    if tcp && (!main.found() || syn_seen(hash)) {
        if let Some(hit) = finish_handshake(pkt, hash, cfg, now, &main, stats, &vip_flags) {
            return hit;
        }
    }
    let Some((id, b)) = main.backend(now, &vip_flags) else {
        count_event(
            stats,
            if main.found() {
                FlowEvent::Stale
            } else {
                FlowEvent::Miss
            },
        );
        return Lookup::Schedule(Some(main.place(false)));
    };
    count_event(stats, FlowEvent::Hit);
    let slot = main.slot(main.own);
    if pkt.tcp_flags & TCP_RST != 0 {
        unsafe { write_volatile(&mut (*slot).key, 0) };
        count_event(stats, FlowEvent::Reset);
    } else {
        let (idle, renew) = idle(pkt, cfg);
        let expires = unsafe { (*slot).expires };
        if idle as i32 - left(expires, now) > renew as i32 {
            unsafe { (*slot).expires = now.wrapping_add(idle) };
        }
    }
    Lookup::Hit(id, b)
}

/// Whether the handshake filter has the bit of `hash`.
#[inline(always)]
fn syn_seen(hash: u64) -> bool {
    let (word, bit) = syn_seen_slot(hash);
    LB_SYN_SEEN.get(word).is_some_and(|w| w & bit != 0)
}

/// The first packet after a SYN: if the handshake table has a usable entry
/// for the flow, it moves to the connection table (into `main`'s place for
/// the flow; a RST only empties it) and the packet goes to its backend.
#[inline(always)]
fn finish_handshake(
    pkt: &Packet,
    hash: u64,
    cfg: &DataplaneConfig,
    now: u32,
    main: &Scan,
    stats: &mut Stats,
    vip_flags: &impl Fn() -> u32,
) -> Option<Lookup> {
    let set = LB_SYN_FLOWS.get_ptr_mut(flow_set(hash, cfg.syn_set_mask))?;
    let syn = Scan::of(set, hash, pkt.flow.ports, now);
    if !syn.found() {
        return None;
    }
    let usable = syn.backend(now, vip_flags);
    // Used or stale, the handshake entry is done with.
    unsafe { write_volatile(&mut (*syn.slot(syn.own)).key, 0) };
    let (word, bit) = syn_seen_slot(hash);
    if let Some(w) = LB_SYN_SEEN.get_ptr_mut(word) {
        // Other flows may share the bit: they are found through their
        // connection-table miss instead (see `lookup`).
        unsafe { *w &= !bit };
    }
    let (id, b) = usable?;
    count_event(stats, FlowEvent::Hit);
    if pkt.tcp_flags & TCP_RST != 0 {
        count_event(stats, FlowEvent::Reset);
        if main.found() {
            // An old connection's entry of the same 5-tuple ends too.
            unsafe { write_volatile(&mut (*main.slot(main.own)).key, 0) };
        }
    } else {
        write(pkt, main.place(false), hash, id, b, now, cfg, stats);
    }
    Some(Lookup::Hit(id, b))
}

/// Remembers that the packet's flow goes to backend `id`, in the slot
/// [`lookup`] chose. A RST starts no entry.
#[inline(always)]
pub fn record(
    pkt: &Packet,
    victim: Option<Victim>,
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
    let Some(v) = victim else {
        count_event(stats, FlowEvent::InsertFailed);
        return;
    };
    if v.syn {
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
    write(pkt, v, hash, id, backend, now, cfg, stats);
}

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
) {
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
    // The key last, in one store: a reader on another CPU sees the old
    // flow or the new one, each with its own backend (see `FlowSlot`).
    unsafe {
        write_volatile(&mut (*v.slot).ports, pkt.flow.ports);
        write_volatile(&mut (*v.slot).expires, now.wrapping_add(idle(pkt, cfg).0));
        write_volatile(
            &mut (*v.slot).key,
            FlowSlot::key(hash, id, backend.incarnation),
        );
    }
}

/// The backend recorded for `flow` (its hash: `hash`), if its entry is
/// there and its backend id still names the same backend (the idle time is
/// not checked: an ICMP error about a flow follows its packets closely).
#[inline(always)]
pub fn peek(
    flow: &FlowKey,
    hash: u64,
    cfg: &DataplaneConfig,
) -> Option<(u32, &'static BackendInfo)> {
    let set = LB_FLOWS.get(flow_set(hash, cfg.flow_set_mask))?;
    for slot in set.slots.iter() {
        let key = unsafe { read_volatile(&slot.key) };
        if FlowSlot::tagged(key, hash) && unsafe { read_volatile(&slot.ports) } == flow.ports {
            let id = FlowSlot::backend_id(key);
            let b = LB_BACKENDS.get(id)?;
            if b.flags & BACKEND_ALLOCATED != 0 && FlowSlot::same_incarnation(key, b.incarnation) {
                return Some((id, b));
            }
            return None;
        }
    }
    None
}
