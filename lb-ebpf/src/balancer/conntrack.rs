//! The connection table on the data path (see `lb_common::FlowEntry` for
//! the rules): look a flow up, judge the entry, remember new choices.

use aya_ebpf::helpers::bpf_ktime_get_coarse_ns;
use lb_common::{
    BACKEND_ALLOCATED, BACKEND_DOWN, BackendInfo, DataplaneConfig, FLOW_TOUCH_NS, FlowEntry,
    FlowEvent, PROTO_TCP, VIP_STICK_WHEN_DOWN,
};
use lb_ebpf::parse::{Packet, TCP_ACK, TCP_RST, TCP_SYN};

use crate::maps::{LB_BACKENDS, LB_FLOW_STATS, LB_FLOWS, count};

/// What the table says about a packet's flow.
pub enum Lookup {
    /// Send it to this backend.
    Hit(u32, &'static BackendInfo),
    /// Schedule it (no entry, or a stale one).
    Schedule,
}

/// Coarse monotonic time (jiffies resolution is plenty for idle timeouts).
#[inline(always)]
pub fn now() -> u64 {
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// Looks the packet's flow up. A TCP RST ends its flow: the entry goes
/// (the RST itself still reaches the backend).
///
/// A TCP SYN (without ACK) opens a new connection: it skips the lookup and
/// is scheduled, and its entry replaces any old one of the same 5-tuple (a
/// reused port). That saves a hash lookup on the costliest path.
#[inline(always)]
pub fn lookup(
    pkt: &Packet,
    cfg: &DataplaneConfig,
    now: u64,
    vip_flags: impl FnOnce() -> u32,
) -> Lookup {
    if pkt.flow.proto == PROTO_TCP && pkt.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
        count(&LB_FLOW_STATS, FlowEvent::Miss as u32);
        return Lookup::Schedule;
    }
    let Some(e) = LB_FLOWS.get_ptr_mut(&pkt.flow) else {
        count(&LB_FLOW_STATS, FlowEvent::Miss as u32);
        return Lookup::Schedule;
    };
    // SAFETY: a valid map value; LRU entries are never freed under a reader.
    let e = unsafe { &mut *e };
    let fresh = match LB_BACKENDS.get(e.backend_id) {
        Some(b) if usable(b, e, pkt, cfg, now, vip_flags) => Some(b),
        _ => None,
    };
    let Some(backend) = fresh else {
        count(&LB_FLOW_STATS, FlowEvent::Stale as u32);
        return Lookup::Schedule;
    };
    count(&LB_FLOW_STATS, FlowEvent::Hit as u32);
    if pkt.tcp_flags & TCP_RST != 0 {
        let _ = LB_FLOWS.remove(&pkt.flow);
        count(&LB_FLOW_STATS, FlowEvent::Reset as u32);
    } else if now.wrapping_sub(e.last_seen_ns) > FLOW_TOUCH_NS {
        e.last_seen_ns = now;
    }
    Lookup::Hit(e.backend_id, backend)
}

#[inline(always)]
fn usable(
    b: &BackendInfo,
    e: &FlowEntry,
    pkt: &Packet,
    cfg: &DataplaneConfig,
    now: u64,
    vip_flags: impl FnOnce() -> u32,
) -> bool {
    let idle = if pkt.flow.proto == PROTO_TCP {
        cfg.tcp_idle_ns
    } else {
        cfg.udp_idle_ns
    };
    if b.flags & BACKEND_ALLOCATED == 0
        || b.incarnation != e.incarnation
        || now.wrapping_sub(e.last_seen_ns) > idle
    {
        return false;
    }
    // Down backends are rare: only then is the VIP's policy looked up.
    b.flags & BACKEND_DOWN == 0 || vip_flags() & VIP_STICK_WHEN_DOWN != 0
}

/// Remembers that the packet's flow goes to backend `id`. A RST starts no
/// entry. A failed write is counted and otherwise ignored: the packet still
/// goes out, and the next one is scheduled to the same backend by Maglev.
#[inline(always)]
pub fn record(pkt: &Packet, id: u32, backend: &BackendInfo, now: u64) {
    if pkt.tcp_flags & TCP_RST != 0 {
        return;
    }
    let entry = FlowEntry {
        backend_id: id,
        incarnation: backend.incarnation,
        last_seen_ns: now,
    };
    if LB_FLOWS.insert(&pkt.flow, &entry, 0).is_err() {
        count(&LB_FLOW_STATS, FlowEvent::InsertFailed as u32);
    }
}
