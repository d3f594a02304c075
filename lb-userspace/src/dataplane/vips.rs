//! Programming VIPs, backends and Maglev tables into the maps.
//!
//! Every VIP owns two table slots in `LB_MAGLEV`. A change builds the new
//! table into the inactive slot and then replaces the VIP's map value with
//! one that points at it: the data plane sees the old table or the new one,
//! never a half-written one, and other VIPs' tables are not touched.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    thread,
    time::{Duration, Instant},
};

use lb_common::{
    BackendInfo, MAGLEV_CHUNK, MaglevChunk, VipInfo, addr_words, chunks_per_table, map_name,
    vip_filter_slot,
};

use super::{Dataplane, DataplaneError, ProgrammedVip, map_err};
use crate::{
    maglev::{MaglevBackend, MaglevTable},
    vip::{Vip, VipAddr},
};

/// How long a table slot stays untouched after it stopped being active. A
/// packet that read the old `VipInfo` just before the flip finishes with the
/// old table within microseconds (XDP runs to completion under RCU); 10 ms
/// is a wide margin.
const TABLE_GRACE: Duration = Duration::from_millis(10);

impl Dataplane {
    /// Makes the maps hold exactly `vips`: removes VIPs not in the list and
    /// adds or updates the rest. Capacity is checked first, so a set that
    /// does not fit changes nothing.
    pub fn sync(&mut self, vips: &[Vip]) -> Result<(), DataplaneError> {
        if vips.len() > self.settings.max_vips as usize {
            let vip = vips[self.settings.max_vips as usize].addr;
            return Err(DataplaneError::VipCapacity {
                vip,
                max: self.settings.max_vips,
            });
        }
        let backends: usize = vips.iter().map(|v| v.backends.len()).sum();
        if backends > self.settings.max_backends as usize {
            return Err(DataplaneError::BackendCapacity {
                needed: backends,
                free: self.settings.max_backends as usize,
                max: self.settings.max_backends,
            });
        }
        let stale: Vec<VipAddr> = self
            .vips
            .keys()
            .filter(|a| !vips.iter().any(|v| v.addr == **a))
            .copied()
            .collect();
        for addr in stale {
            self.remove_vip(&addr)?;
        }
        for vip in vips {
            self.set_vip(vip)?;
        }
        Ok(())
    }

    /// Adds `vip` or brings it up to date (backends, weights). Unchanged
    /// VIPs are left alone.
    pub fn set_vip(&mut self, vip: &Vip) -> Result<(), DataplaneError> {
        let wanted: BTreeMap<IpAddr, u32> =
            vip.backends.iter().map(|b| (b.addr, b.weight)).collect();
        if let Some(p) = self.vips.get(&vip.addr)
            && p.backends
                .iter()
                .map(|(a, (_, w))| (*a, *w))
                .eq(wanted.iter().map(|(a, w)| (*a, *w)))
        {
            return Ok(());
        }

        // Capacity first, so a failure leaves everything as it was.
        let existing = self.vips.get(&vip.addr);
        let new_backends = wanted
            .keys()
            .filter(|a| existing.is_none_or(|p| !p.backends.contains_key(a)))
            .count();
        if new_backends > self.free_backend_ids.len() {
            return Err(DataplaneError::BackendCapacity {
                needed: new_backends,
                free: self.free_backend_ids.len(),
                max: self.settings.max_backends,
            });
        }
        if existing.is_none() && self.free_vip_ids.is_empty() {
            return Err(DataplaneError::VipCapacity {
                vip: vip.addr,
                max: self.settings.max_vips,
            });
        }

        let is_new = existing.is_none();
        let mut programmed = match self.vips.remove(&vip.addr) {
            Some(p) => p,
            None => {
                let id = self.free_vip_ids.pop_front().expect("checked above");
                if let Err(e) = Self::zero_per_cpu(
                    &mut self.maps.vip_stats,
                    map_name::VIP_STATS,
                    id,
                    self.nr_cpus,
                ) {
                    self.free_vip_ids.push_front(id);
                    return Err(e);
                }
                ProgrammedVip {
                    id,
                    // The first table goes into half 0; "active" half 1 is unused.
                    active_half: 1,
                    flipped_at: Instant::now() - TABLE_GRACE,
                    backends: BTreeMap::new(),
                    table: MaglevTable::build(&[], 2),
                }
            }
        };
        // `program_vip` changes `programmed` only once the flip succeeded.
        let result = self.program_vip(vip, &wanted, &mut programmed);
        if result.is_err() && is_new {
            self.free_vip_ids.push_front(programmed.id);
        } else {
            self.vips.insert(vip.addr, programmed);
        }
        result
    }

    fn program_vip(
        &mut self,
        vip: &Vip,
        wanted: &BTreeMap<IpAddr, u32>,
        p: &mut ProgrammedVip,
    ) -> Result<(), DataplaneError> {
        // Ids for new backends; existing ones keep theirs (and their counters).
        let mut next: BTreeMap<IpAddr, (u32, u32)> = BTreeMap::new();
        let mut fresh = Vec::new();
        for (&addr, &weight) in wanted {
            let id = match p.backends.get(&addr) {
                Some(&(id, _)) => id,
                None => {
                    let id = self.free_backend_ids.pop_front().expect("capacity checked");
                    fresh.push(id);
                    id
                }
            };
            next.insert(addr, (id, weight));
        }
        let give_back = |dp: &mut Dataplane, fresh: &[u32]| {
            for &id in fresh.iter().rev() {
                dp.free_backend_ids.push_front(id);
            }
        };
        for (&addr, &(id, _)) in &next {
            if !fresh.contains(&id) {
                continue;
            }
            let (family, words) = addr_words(addr);
            let info = BackendInfo {
                addr: words,
                family,
                _pad: [0; 3],
            };
            let written = self
                .maps
                .backends
                .set(id, info, 0)
                .map_err(map_err(map_name::BACKENDS))
                .and_then(|()| {
                    Self::zero_per_cpu(
                        &mut self.maps.backend_stats,
                        map_name::BACKEND_STATS,
                        id,
                        self.nr_cpus,
                    )
                });
            if let Err(e) = written {
                give_back(self, &fresh);
                return Err(e);
            }
        }
        // A reused id must not keep the next hop of its previous address.
        if !fresh.is_empty()
            && let Err(e) = self.refresh_next_hops()
        {
            give_back(self, &fresh);
            return Err(e);
        }

        let inputs: Vec<MaglevBackend> = next
            .iter()
            .map(|(&addr, &(id, weight))| MaglevBackend { addr, weight, id })
            .collect();
        let table = MaglevTable::build(&inputs, self.settings.table_size);

        let half = 1 - p.active_half;
        let since = p.flipped_at.elapsed();
        if since < TABLE_GRACE {
            thread::sleep(TABLE_GRACE - since);
        }
        let first_chunk = self.table_chunk(p.id, half);
        if let Err(e) = self.write_table(first_chunk, &table) {
            give_back(self, &fresh);
            return Err(e);
        }
        let info = VipInfo {
            id: p.id,
            table_chunk: first_chunk,
            flags: 0,
            _pad: 0,
        };
        // The address filter first, so the VIP is never hidden behind it.
        if let Err(e) = self.write_vip_filter(&vip.addr.addr, Some(vip.addr.addr)) {
            give_back(self, &fresh);
            return Err(e);
        }
        // The flip.
        if let Err(e) = self
            .maps
            .vips
            .insert(vip.addr.key(), info, 0)
            .map_err(map_err(map_name::VIPS))
        {
            give_back(self, &fresh);
            return Err(e);
        }
        p.active_half = half;
        p.flipped_at = Instant::now();
        for (addr, (id, _)) in &p.backends {
            if !next.contains_key(addr) {
                self.free_backend_ids.push_back(*id);
            }
        }
        let added: Vec<IpAddr> = next
            .iter()
            .filter(|(_, (id, _))| fresh.contains(id))
            .map(|(a, _)| *a)
            .collect();
        p.backends = next;
        p.table = table;
        self.manage_neighbours(&added);
        Ok(())
    }

    /// Removes a VIP; its packets pass to the host stack from now on.
    /// Removing an unknown VIP does nothing.
    pub fn remove_vip(&mut self, addr: &VipAddr) -> Result<(), DataplaneError> {
        if !self.vips.contains_key(addr) {
            return Ok(());
        }
        match self.maps.vips.remove(&addr.key()) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
            Err(e) => return Err(map_err(map_name::VIPS)(e)),
        }
        let p = self.vips.remove(addr).expect("present");
        self.write_vip_filter(&addr.addr, None)?;
        self.free_vip_ids.push_back(p.id);
        self.free_backend_ids
            .extend(p.backends.values().map(|(id, _)| *id));
        Ok(())
    }

    /// The VIPs as programmed.
    pub fn vips(&self) -> impl Iterator<Item = &VipAddr> {
        self.vips.keys()
    }

    /// The active Maglev table of a VIP.
    pub fn table(&self, addr: &VipAddr) -> Option<&MaglevTable> {
        self.vips.get(addr).map(|p| &p.table)
    }

    /// The backend the data plane picks for a new flow, computed in user
    /// space with the same hash and table: the VIP with the exact port, else
    /// port 0.
    pub fn backend_for(&self, flow: &lb_common::FlowKey) -> Option<IpAddr> {
        let (p, _) = self.vip_for_flow(flow)?;
        let pos = lb_common::maglev_position(lb_common::flow_hash(flow), self.settings.table_size);
        let id = p.table.entries()[pos as usize];
        p.backends
            .iter()
            .find(|(_, (bid, _))| *bid == id)
            .map(|(a, _)| *a)
    }

    fn vip_for_flow(&self, flow: &lb_common::FlowKey) -> Option<(&ProgrammedVip, &VipAddr)> {
        let dst = lb_common::words_addr(flow.family, flow.dst);
        let port = u16::from_be_bytes(flow.dport_raw().to_ne_bytes());
        let find = |port: u16| {
            self.vips
                .iter()
                .find(|(a, _)| a.addr == dst && a.port == port && a.protocol.number() == flow.proto)
                .map(|(a, p)| (p, a))
        };
        find(port).or_else(|| find(0))
    }

    /// Rewrites the filter word that `addr` falls in from the programmed
    /// VIPs' addresses, plus `extra`.
    fn write_vip_filter(
        &mut self,
        addr: &IpAddr,
        extra: Option<IpAddr>,
    ) -> Result<(), DataplaneError> {
        let (word, _) = vip_filter_slot(&addr_words(*addr).1);
        let value = self
            .vips
            .keys()
            .map(|v| v.addr)
            .chain(extra)
            .map(|a| vip_filter_slot(&addr_words(a).1))
            .filter(|(w, _)| *w == word)
            .fold(0u64, |acc, (_, bit)| acc | bit);
        self.maps
            .vip_filter
            .set(word, value, 0)
            .map_err(map_err(map_name::VIP_FILTER))
    }

    fn table_chunk(&self, vip_id: u32, half: u32) -> u32 {
        (vip_id * 2 + half) * chunks_per_table(self.settings.table_size)
    }

    fn write_table(&mut self, first_chunk: u32, table: &MaglevTable) -> Result<(), DataplaneError> {
        for (i, entries) in table.entries().chunks(MAGLEV_CHUNK as usize).enumerate() {
            let mut chunk = MaglevChunk::default();
            chunk.backends[..entries.len()].copy_from_slice(entries);
            self.maps
                .maglev
                .set(first_chunk + i as u32, chunk, 0)
                .map_err(map_err(map_name::MAGLEV))?;
        }
        Ok(())
    }
}
