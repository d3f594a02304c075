//! Reading the data plane's per-CPU counters, summed over CPUs.

use std::{collections::BTreeMap, net::IpAddr};

use lb_common::{
    FLOW_EVENT_COUNT, FlowEvent, FlowSet, REASON_COUNT, Reason, TrafficCounters, map_name,
};

use super::{Dataplane, DataplaneError, map_err};
use crate::desired::vip::VipAddr;

/// A snapshot of every counter.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Packets per [`Reason`], by reason index.
    pub reasons: [u64; REASON_COUNT as usize],
    /// Forwarded packets and bytes per VIP.
    pub vips: BTreeMap<VipAddr, TrafficCounters>,
    /// Forwarded packets and bytes per VIP and backend.
    pub backends: BTreeMap<(VipAddr, IpAddr), TrafficCounters>,
    /// Connection-table events, by [`FlowEvent`] index.
    pub flows: [u64; FLOW_EVENT_COUNT as usize],
}

impl Counters {
    /// Packets counted under `reason`.
    pub fn reason(&self, reason: Reason) -> u64 {
        self.reasons[reason as usize]
    }

    /// Connection-table events of one kind.
    pub fn flow(&self, event: FlowEvent) -> u64 {
        self.flows[event as usize]
    }

    /// Packets seen: the sum over all reasons.
    pub fn packets_seen(&self) -> u64 {
        self.reasons.iter().sum()
    }
}

fn sum(values: &aya::maps::PerCpuValues<TrafficCounters>) -> TrafficCounters {
    values
        .iter()
        .fold(TrafficCounters::default(), |acc, c| TrafficCounters {
            packets: acc.packets + c.packets,
            bytes: acc.bytes + c.bytes,
            flows: acc.flows + c.flows,
        })
}

impl Dataplane {
    /// Reads every counter (one map lookup per VIP and backend, and one for
    /// the packet and connection-table counters).
    pub fn counters(&self) -> Result<Counters, DataplaneError> {
        let mut c = Counters::default();
        let per_cpu = self
            .maps
            .stats
            .get(&0, 0)
            .map_err(map_err(map_name::STATS))?;
        for s in per_cpu.iter() {
            for (sum, v) in c.reasons.iter_mut().zip(s.reasons) {
                *sum += v;
            }
            for (sum, v) in c.flows.iter_mut().zip(s.flows) {
                *sum += v;
            }
        }
        for (addr, p) in &self.vips {
            let v = self
                .maps
                .vip_stats
                .get(&p.id, 0)
                .map_err(map_err(map_name::VIP_STATS))?;
            c.vips.insert(*addr, sum(&v));
            for (baddr, b) in &p.backends {
                let v = self
                    .maps
                    .backend_stats
                    .get(&b.id, 0)
                    .map_err(map_err(map_name::BACKEND_STATS))?;
                c.backends.insert((*addr, *baddr), sum(&v));
            }
        }
        Ok(c)
    }

    /// New flows scheduled to each backend of `vip` since it was programmed
    /// (summed over CPUs).
    pub fn backend_flows(&self, vip: &VipAddr) -> Result<BTreeMap<IpAddr, u64>, DataplaneError> {
        let Some(p) = self.vips.get(vip) else {
            return Ok(BTreeMap::new());
        };
        let mut out = BTreeMap::new();
        for (addr, b) in &p.backends {
            let v = self
                .maps
                .backend_stats
                .get(&b.id, 0)
                .map_err(map_err(map_name::BACKEND_STATS))?;
            out.insert(*addr, v.iter().map(|c| c.flows).sum());
        }
        Ok(out)
    }

    /// Every set of the connection table (`handshake`: of the handshake
    /// table), read from the kernel now. For diagnosis and tests: the
    /// connection table is large (64 MiB at the default size).
    pub fn flow_table(&self, handshake: bool) -> Result<Vec<FlowSet>, DataplaneError> {
        self.flow_sets_batched(handshake)
    }
}

/// A VIP's entries in the connection and handshake tables, per backend.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct FlowCounts {
    /// Established flows (connection table, not closing).
    pub established: u64,
    /// Flows whose client sent a FIN (connection table, closing timeout).
    pub closing: u64,
    /// Handshakes in progress (handshake table).
    pub handshakes: u64,
}

/// One flow's entry.
#[derive(Clone, Debug, PartialEq, serde::Serialize, utoipa::ToSchema)]
pub struct FlowEntry {
    /// `connection` or `handshake`.
    pub table: &'static str,
    #[schema(value_type = String)]
    pub backend: IpAddr,
    pub closing: bool,
    /// Seconds until the entry expires unless a packet renews it.
    pub expires_in_seconds: Option<f64>,
}

/// The kernel's jiffies counter now (from /proc/timer_list), if readable.
pub(super) fn jiffies_now() -> Option<u32> {
    let text = std::fs::read_to_string("/proc/timer_list").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("jiffies: "))
        .and_then(|n| n.trim().parse::<u64>().ok())
        .map(|j| j as u32)
}

impl Dataplane {
    /// Calls `f` with every set of a flow table (`handshake`: the
    /// handshake table), read in batches.
    fn for_each_flow_set(
        &self,
        handshake: bool,
        f: impl FnMut(&FlowSet),
    ) -> Result<(), DataplaneError> {
        use std::os::fd::AsFd;

        use aya::maps::IterableMap;
        let name = if handshake {
            map_name::SYN_FLOWS
        } else {
            map_name::FLOWS
        };
        let map = self
            .ebpf
            .map(name)
            .ok_or(DataplaneError::Missing { kind: "map", name })?;
        let table: aya::maps::Array<&aya::maps::MapData, FlowSet> =
            aya::maps::Array::try_from(map).map_err(map_err(name))?;
        super::active::for_each_set(table.map().fd().as_fd(), table.len(), f).map_err(|e| {
            DataplaneError::Map {
                name,
                source: aya::maps::MapError::SyscallError(aya::sys::SyscallError {
                    call: "bpf_map_lookup_batch",
                    io_error: e,
                }),
            }
        })
    }

    /// Every set of a flow table, read now (for diagnosis and tests).
    fn flow_sets_batched(&self, handshake: bool) -> Result<Vec<FlowSet>, DataplaneError> {
        let mut sets = Vec::new();
        self.for_each_flow_set(handshake, |s| sets.push(*s))?;
        Ok(sets)
    }

    /// Live entries of VIP `addr`'s backends in the connection and
    /// handshake tables (expired ones and those of removed backends left
    /// out). Reads both tables whole: for diagnosis, not for every second.
    pub fn vip_flows(
        &self,
        addr: &VipAddr,
    ) -> Result<BTreeMap<IpAddr, FlowCounts>, DataplaneError> {
        let p = self
            .vips
            .get(addr)
            .ok_or(DataplaneError::UnknownVip(*addr))?;
        let by_id = self.flow_owners(addr);
        let mut out: BTreeMap<IpAddr, FlowCounts> = p
            .backends
            .keys()
            .map(|a| (*a, FlowCounts::default()))
            .collect();
        let now = jiffies_now();
        for handshake in [false, true] {
            self.for_each_flow_set(handshake, |set| {
                for slot in &set.slots {
                    let Some(backend) = self.live_backend(slot, &by_id, now) else {
                        continue;
                    };
                    let c = out.entry(backend).or_default();
                    if handshake {
                        c.handshakes += 1;
                    } else if lb_common::FlowSlot::closing(slot.key) {
                        c.closing += 1;
                    } else {
                        c.established += 1;
                    }
                }
            })?;
        }
        Ok(out)
    }

    /// The backend ids whose flows are VIP `addr`'s: its backends' and its
    /// leaving backends' (id → address).
    fn flow_owners(&self, addr: &VipAddr) -> std::collections::HashMap<u32, IpAddr> {
        let mut out: std::collections::HashMap<u32, IpAddr> = self
            .leaving
            .iter()
            .filter(|l| l.vip == *addr)
            .map(|l| (l.id, l.addr))
            .collect();
        if let Some(p) = self.vips.get(addr) {
            out.extend(p.backends.iter().map(|(a, b)| (b.id, *a)));
        }
        out
    }

    /// The backend of a live slot among `by_id` (id → address).
    fn live_backend(
        &self,
        slot: &lb_common::FlowSlot,
        by_id: &std::collections::HashMap<u32, IpAddr>,
        now: Option<u32>,
    ) -> Option<IpAddr> {
        use lb_common::FlowSlot;
        if !super::active::live(slot, now) {
            return None;
        }
        let id = FlowSlot::backend_id(slot.key);
        let backend = by_id.get(&id)?;
        FlowSlot::same_incarnation(slot.key, self.incarnations[id as usize]).then_some(*backend)
    }

    /// The entry of the flow from `client` to VIP `addr`, if it has one:
    /// looked up by the flow's hash, as the data plane does (a slot keeps
    /// the hash's tag and the ports, not the client's address).
    pub fn client_flow(
        &self,
        addr: &VipAddr,
        client: std::net::SocketAddr,
    ) -> Result<Option<FlowEntry>, DataplaneError> {
        use lb_common::{FlowKey, FlowSlot, flow_hash64, flow_set, flow_sets, syn_slots};
        if !self.vips.contains_key(addr) {
            return Err(DataplaneError::UnknownVip(*addr));
        }
        let (family, src) = lb_common::addr_words(client.ip());
        let (_, dst) = lb_common::addr_words(addr.addr);
        let key = FlowKey {
            src,
            dst,
            ports: FlowKey::ports(client.port(), addr.port),
            proto: addr.protocol.number(),
            family,
            _pad: [0; 2],
        };
        let hash = flow_hash64(&key);
        let by_id = self.flow_owners(addr);
        let now = jiffies_now();
        for (table, name, sets) in [
            (
                "connection",
                map_name::FLOWS,
                flow_sets(self.settings.flows),
            ),
            (
                "handshake",
                map_name::SYN_FLOWS,
                flow_sets(syn_slots(self.settings.flows)),
            ),
        ] {
            let map = self
                .ebpf
                .map(name)
                .ok_or(DataplaneError::Missing { kind: "map", name })?;
            let t: aya::maps::Array<&aya::maps::MapData, FlowSet> =
                aya::maps::Array::try_from(map).map_err(map_err(name))?;
            let set = t.get(&flow_set(hash, sets - 1), 0).map_err(map_err(name))?;
            for slot in set.slots {
                if !FlowSlot::tagged(slot.key, hash) || slot.ports != key.ports {
                    continue;
                }
                let Some(backend) = self.live_backend(&slot, &by_id, now) else {
                    continue;
                };
                return Ok(Some(FlowEntry {
                    table,
                    backend,
                    closing: FlowSlot::closing(slot.key),
                    expires_in_seconds: now
                        .map(|n| f64::from(slot.expires.wrapping_sub(n)) / f64::from(self.hz)),
                }));
            }
        }
        Ok(None)
    }
}
