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
        (0..table.len())
            .map(|i| table.get(&i, 0).map_err(map_err(name)))
            .collect()
    }
}
