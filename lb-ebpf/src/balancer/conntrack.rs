//! The connection table on the data path (see `lb_common::FlowSet` for the
//! layout and the rules): find a flow's slot, judge the entry, remember new
//! choices. Every packet reads one set (one cache line); nothing locks.

use core::ptr::{read_volatile, write_volatile};

use aya_ebpf::helpers::bpf_ktime_get_coarse_ns;
use lb_common::{
    BACKEND_ALLOCATED, BACKEND_DOWN, BackendInfo, DataplaneConfig, FLOW_TICK_SHIFT, FLOW_WAYS,
    FlowEvent, FlowKey, FlowSlot, PROTO_TCP, VIP_STICK_WHEN_DOWN, flow_set, idle_ticks,
    renew_after,
};
use lb_ebpf::parse::{Packet, TCP_ACK, TCP_RST, TCP_SYN};

use crate::maps::{LB_BACKENDS, LB_FLOW_STATS, LB_FLOWS, count};

/// Where a new flow's entry goes.
pub struct Victim {
    slot: *mut FlowSlot,
    /// The slot holds another flow that has not expired yet.
    live: bool,
}

/// What the table says about a packet's flow.
pub enum Lookup {
    /// Send it to this backend.
    Hit(u32, &'static BackendInfo),
    /// Schedule it (no entry, or a stale one) and record the choice here
    /// (`None`: the set is outside the map, which a correct `flow_set_mask`
    /// rules out).
    Schedule(Option<Victim>),
}

/// Coarse monotonic time in connection-table ticks (see
/// `lb_common::FLOW_TICK_NS`).
#[inline(always)]
pub fn now() -> u32 {
    (unsafe { bpf_ktime_get_coarse_ns() } >> FLOW_TICK_SHIFT) as u32
}

/// The idle timeout of the packet's protocol, in ticks.
#[inline(always)]
fn idle(pkt: &Packet, cfg: &DataplaneConfig) -> u32 {
    idle_ticks(if pkt.flow.proto == PROTO_TCP {
        cfg.tcp_idle_ns
    } else {
        cfg.udp_idle_ns
    })
}

/// Ticks left before `expires` (negative: expired).
#[inline(always)]
fn left(expires: u32, now: u32) -> i32 {
    expires.wrapping_sub(now) as i32
}

/// Looks the packet's flow (64-bit flow hash `hash`) up. A TCP RST ends its
/// flow: the slot is emptied (the RST itself still reaches the backend).
///
/// A TCP SYN (without ACK) opens a new connection: it is scheduled whatever
/// the table holds, and its entry replaces any old one of the same flow (a
/// reused port).
#[inline(always)]
pub fn lookup(
    pkt: &Packet,
    hash: u64,
    cfg: &DataplaneConfig,
    now: u32,
    vip_flags: impl FnOnce() -> u32,
) -> Lookup {
    let Some(set) = LB_FLOWS.get_ptr_mut(flow_set(hash, cfg.flow_set_mask)) else {
        count(&LB_FLOW_STATS, FlowEvent::Miss as u32);
        return Lookup::Schedule(None);
    };
    // SAFETY: a valid map value for the life of the program run.
    let slots = unsafe { &mut (*set).slots };
    // One pass over the set: the flow's own slot, else the one that
    // expires first (empty slots first of all).
    let mut own = FLOW_WAYS;
    let mut own_key = 0;
    let mut victim = 0;
    let mut victim_left = i32::MAX;
    for (w, slot) in slots.iter().enumerate() {
        // Volatile: another CPU may rewrite the slot; the key is read once.
        let key = unsafe { read_volatile(&slot.key) };
        if FlowSlot::tagged(key, hash) && unsafe { read_volatile(&slot.ports) } == pkt.flow.ports {
            own = w;
            own_key = key;
            break;
        }
        let l = if key == 0 {
            i32::MIN
        } else {
            left(slot.expires, now)
        };
        if l < victim_left {
            victim = w;
            victim_left = l;
        }
    }
    if own < FLOW_WAYS {
        let slot = &mut slots[own & (FLOW_WAYS - 1)];
        let syn = pkt.flow.proto == PROTO_TCP && pkt.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
        if !syn {
            let id = FlowSlot::backend_id(own_key);
            let idle = idle(pkt, cfg);
            match LB_BACKENDS.get(id) {
                Some(b) if usable(b, own_key, slot, now, vip_flags) => {
                    count(&LB_FLOW_STATS, FlowEvent::Hit as u32);
                    if pkt.tcp_flags & TCP_RST != 0 {
                        unsafe { write_volatile(&mut slot.key, 0) };
                        count(&LB_FLOW_STATS, FlowEvent::Reset as u32);
                    } else if idle as i32 - left(slot.expires, now) > renew_after(idle) as i32 {
                        slot.expires = now.wrapping_add(idle);
                    }
                    return Lookup::Hit(id, b);
                }
                _ => count(&LB_FLOW_STATS, FlowEvent::Stale as u32),
            }
        } else {
            count(&LB_FLOW_STATS, FlowEvent::Miss as u32);
        }
        return Lookup::Schedule(Some(Victim {
            slot: slot as *mut FlowSlot,
            live: false,
        }));
    }
    count(&LB_FLOW_STATS, FlowEvent::Miss as u32);
    Lookup::Schedule(Some(Victim {
        slot: &mut slots[victim & (FLOW_WAYS - 1)] as *mut FlowSlot,
        live: victim_left > 0,
    }))
}

#[inline(always)]
fn usable(
    b: &BackendInfo,
    key: u64,
    slot: &FlowSlot,
    now: u32,
    vip_flags: impl FnOnce() -> u32,
) -> bool {
    if b.flags & BACKEND_ALLOCATED == 0
        || !FlowSlot::same_incarnation(key, b.incarnation)
        || left(slot.expires, now) <= 0
    {
        return false;
    }
    // Down backends are rare: only then is the VIP's policy looked up.
    b.flags & BACKEND_DOWN == 0 || vip_flags() & VIP_STICK_WHEN_DOWN != 0
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
) {
    if pkt.tcp_flags & TCP_RST != 0 {
        return;
    }
    let Some(v) = victim else {
        count(&LB_FLOW_STATS, FlowEvent::InsertFailed as u32);
        return;
    };
    if v.live {
        count(&LB_FLOW_STATS, FlowEvent::Evicted as u32);
    }
    // The key last, in one store: a reader on another CPU sees the old
    // flow or the new one, each with its own backend (see `FlowSlot`).
    unsafe {
        write_volatile(&mut (*v.slot).ports, pkt.flow.ports);
        write_volatile(&mut (*v.slot).expires, now.wrapping_add(idle(pkt, cfg)));
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
