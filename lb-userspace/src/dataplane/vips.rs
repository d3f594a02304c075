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
    BACKEND_ALLOCATED, BACKEND_COUNTED, BACKEND_DOWN, BackendInfo, MAGLEV_CHUNK, MaglevChunk,
    SHED_ONE, VIP_HASH_SRC_PORT, VIP_LOAD_CAP, VIP_SCHED_LEAST_CONN, VIP_SCHED_LEAST_LOAD,
    VIP_SCHED_MAGLEV, VIP_SCHED_MAGLEV_SRC, VIP_SCHED_MASK, VIP_SCHED_WRR, VIP_SECOND_CHANCE,
    VIP_STICK_WHEN_DOWN, VipAddrKey, VipInfo, addr_words, chunks_per_table, map_name,
    vip_filter_slot,
};

use super::{
    BackendState, Dataplane, DataplaneError, ProgrammedBackend, ProgrammedVip, map_err,
    tables::{History, Moves},
};
use crate::{
    desired::vip::{DownPolicy, Scheduler, Vip, VipAddr},
    maglev::{MaglevBackend, MaglevTable},
    steering::{FULL, MAX_SHED, Target},
};

/// How a VIP is programmed besides its backends.
#[derive(Clone, Copy, Debug)]
struct Params {
    /// `VipInfo::flags`.
    flags: u32,
    /// See `Vip::load_cap`.
    load_cap: Option<u32>,
    /// See `Vip::churn_hold_secs`.
    hold: u32,
}

/// Id placeholder of a backend that has none yet.
const UNASSIGNED: u32 = u32::MAX;

/// The `VipInfo::flags` of `vip`: its down policy and scheduler.
fn vip_flags(vip: &Vip) -> u32 {
    let down = match vip.on_backend_down {
        DownPolicy::Reschedule => 0,
        DownPolicy::Stick => VIP_STICK_WHEN_DOWN,
    };
    let sched = match vip.scheduler {
        Scheduler::Maglev => VIP_SCHED_MAGLEV,
        Scheduler::MaglevSrc { with_port: false } => VIP_SCHED_MAGLEV_SRC,
        Scheduler::MaglevSrc { with_port: true } => VIP_SCHED_MAGLEV_SRC | VIP_HASH_SRC_PORT,
        Scheduler::Wrr => VIP_SCHED_WRR,
        Scheduler::LeastLoad => VIP_SCHED_LEAST_LOAD,
        Scheduler::LeastConn => VIP_SCHED_LEAST_CONN,
    };
    let cap = if vip.load_cap.is_some() {
        VIP_LOAD_CAP
    } else {
        0
    };
    let second = if vip.second_chance() {
        VIP_SECOND_CHANCE
    } else {
        0
    };
    down | sched | cap | second
}

/// Whether a VIP with `VipInfo::flags` `flags` schedules on active flows
/// (its backends are `BACKEND_COUNTED`; see `lb_common::ActiveFlows`).
pub(super) fn counts_flows(flags: u32) -> bool {
    flags & VIP_SCHED_MASK == VIP_SCHED_LEAST_CONN || flags & VIP_LOAD_CAP != 0
}

/// How long a freed backend id stays unused. A packet that picked the id
/// just before it was freed goes on to read its `BackendInfo` (the outer
/// header's address) after its table lookup, outside what the table-write
/// window protects; it finishes within microseconds (XDP runs to
/// completion under RCU), so 10 ms is a wide margin. Ids are reused oldest
/// freed first, so this waits only when nearly every id was freed within
/// the last 10 ms. (Table halves need no such wait: see `table_window`.)
pub(super) const TABLE_GRACE: Duration = Duration::from_millis(10);

impl Dataplane {
    /// Makes the maps hold exactly `vips`: removes VIPs not in the list and
    /// adds or updates the rest, every backend at its full weight
    /// (`weight × FULL`) and with the health it has. Capacity is checked
    /// first, so a set that does not fit changes nothing.
    pub fn sync(&mut self, vips: &[Vip]) -> Result<(), DataplaneError> {
        self.sync_targets(vips, &BTreeMap::new())
    }

    /// [`Dataplane::sync`] with the backends of the VIPs in `targets` as
    /// steering wants them (weight and health); other VIPs as `sync` does.
    pub fn sync_targets(
        &mut self,
        vips: &[Vip],
        targets: &BTreeMap<VipAddr, BTreeMap<IpAddr, Target>>,
    ) -> Result<(), DataplaneError> {
        self.take_over()?;
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
            match targets.get(&vip.addr) {
                Some(t) => self.set_vip_targets(vip, t)?,
                None => self.set_vip(vip)?,
            }
        }
        Ok(())
    }

    /// Adds `vip` or brings it up to date (backends, weights, policy), every
    /// backend at its full weight. Unchanged VIPs are left alone; backends
    /// keep their health state.
    pub fn set_vip(&mut self, vip: &Vip) -> Result<(), DataplaneError> {
        self.set_vip_targets(vip, &BTreeMap::new())
    }

    /// Adds `vip` or brings it up to date, its backends as in `targets`
    /// (backends missing there: full weight, health as they have it).
    pub fn set_vip_targets(
        &mut self,
        vip: &Vip,
        targets: &BTreeMap<IpAddr, Target>,
    ) -> Result<(), DataplaneError> {
        let existing = self.vips.get(&vip.addr);
        let wanted: BTreeMap<IpAddr, ProgrammedBackend> = vip
            .backends
            .iter()
            .map(|b| {
                let current = existing.and_then(|p| p.backends.get(&b.addr));
                let target = targets.get(&b.addr).copied().unwrap_or(Target {
                    weight: b.effective_weight() * FULL,
                    down: current.is_some_and(|c| c.down),
                });
                let backend = ProgrammedBackend {
                    id: current.map_or(UNASSIGNED, |c| c.id),
                    weight: target.weight,
                    down: target.down,
                };
                (b.addr, backend)
            })
            .collect();
        let flags = vip_flags(vip);
        let hold = vip.churn_hold_secs();
        if existing.is_some_and(|p| {
            p.backends == wanted && p.flags == flags && p.load_cap == vip.load_cap && p.hold == hold
        }) {
            return Ok(());
        }
        self.apply(
            vip.addr,
            Params {
                flags,
                load_cap: vip.load_cap,
                hold,
            },
            wanted,
        )
    }

    /// Rebuilds `vip`'s table if positions the churn hold kept (see
    /// [`super::tables`]) may move now; returns whether it did.
    pub fn release_held(&mut self, vip: &VipAddr) -> Result<bool, DataplaneError> {
        let Some(p) = self.vips.get(vip) else {
            return Ok(false);
        };
        if p.moves.release_at == 0 || p.moves.release_at > self.clock.now() {
            return Ok(false);
        }
        let params = Params {
            flags: p.flags,
            load_cap: p.load_cap,
            hold: p.hold,
        };
        let wanted = p.backends.clone();
        self.apply(*vip, params, wanted)?;
        Ok(true)
    }

    /// Pins the table clock to `at` (Unix seconds): a fleet member builds
    /// its tables with the steering leader's clock (see
    /// [`super::tables::Clock::pin`]). Positions moved before the first pin
    /// count as moved long ago.
    pub fn pin_table_clock(&mut self, at: u32) {
        self.clock.pin(at);
    }

    /// When positions of `vip` the churn hold kept may move (table clock
    /// seconds; `None`: none is held).
    pub fn held_until(&self, vip: &VipAddr) -> Option<u32> {
        let at = self.vips.get(vip)?.moves.release_at;
        (at != 0).then_some(at)
    }

    /// The share of the table each backend of `vip` would have with
    /// `targets` (backends missing there: full weight, health as they have
    /// it), built as a change would build it and written nowhere: what a
    /// dry run shows.
    pub fn preview_shares(
        &self,
        vip: &Vip,
        targets: &BTreeMap<IpAddr, Target>,
    ) -> BTreeMap<IpAddr, f64> {
        let existing = self.vips.get(&vip.addr);
        let inputs: Vec<MaglevBackend> = vip
            .backends
            .iter()
            .enumerate()
            .filter_map(|(i, b)| {
                let down = existing
                    .and_then(|p| p.backends.get(&b.addr))
                    .is_some_and(|c| c.down);
                let t = targets.get(&b.addr).copied().unwrap_or(Target {
                    weight: b.effective_weight() * FULL,
                    down,
                });
                (!t.down).then_some(MaglevBackend {
                    addr: b.addr,
                    weight: t.weight,
                    id: i as u32,
                })
            })
            .collect();
        let table = if vip_flags(vip) & VIP_SCHED_MASK == VIP_SCHED_WRR {
            MaglevTable::smooth_wrr(&inputs, self.settings.table_size)
        } else {
            MaglevTable::build(&inputs, self.settings.table_size)
        };
        let size = f64::from(self.settings.table_size);
        let counts = table.counts();
        vip.backends
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let n = counts.get(&(i as u32)).copied().unwrap_or(0);
                (b.addr, n as f64 / size)
            })
            .collect()
    }

    /// Marks a backend of a VIP down (health checks failed) or up again. A
    /// down backend leaves the Maglev table, so new flows avoid it; its
    /// established flows follow the VIP's `on_backend_down` policy.
    pub fn set_backend_down(
        &mut self,
        vip: &VipAddr,
        backend: IpAddr,
        down: bool,
    ) -> Result<(), DataplaneError> {
        let p = self.vips.get(vip).ok_or(DataplaneError::UnknownVip(*vip))?;
        let mut wanted = p.backends.clone();
        let b = wanted
            .get_mut(&backend)
            .ok_or(DataplaneError::UnknownBackend { vip: *vip, backend })?;
        if b.down == down {
            return Ok(());
        }
        b.down = down;
        let params = Params {
            flags: p.flags,
            load_cap: p.load_cap,
            hold: p.hold,
        };
        self.apply(*vip, params, wanted)
    }

    /// Programs one VIP to hold exactly `wanted` (ids of existing backends
    /// filled in, new ones `UNASSIGNED`). Order: backend entries, then the
    /// new table into the inactive half, then the address filter, then the
    /// flip; only then are removed backends retired. A failure before the
    /// flip leaves the data plane as it was.
    fn apply(
        &mut self,
        addr: VipAddr,
        params: Params,
        mut wanted: BTreeMap<IpAddr, ProgrammedBackend>,
    ) -> Result<(), DataplaneError> {
        let Params {
            flags,
            load_cap,
            hold,
        } = params;
        let existing = self.vips.get(&addr);
        let shed = existing.map_or(0, |p| p.shed);
        let fresh_count = wanted.values().filter(|b| b.id == UNASSIGNED).count();
        // Ids of leaving backends can be taken back (their remaining flows
        // are then scheduled anew).
        let available = self.free_backend_ids.len() + self.leaving.len();
        if fresh_count > available {
            return Err(DataplaneError::BackendCapacity {
                needed: fresh_count,
                free: available,
                max: self.settings.max_backends,
            });
        }
        if existing.is_none() && self.free_vip_ids.is_empty() {
            return Err(DataplaneError::VipCapacity {
                vip: addr,
                max: self.settings.max_vips,
            });
        }
        let (vip_id, half) = match existing {
            // The inactive half is rewritten at once: new flows' lookups see
            // the write window and look again (see `table_window`).
            Some(p) => (p.id, 1 - p.active_half),
            None => {
                let id = *self.free_vip_ids.front().expect("checked above");
                self.active.vips.reset(id);
                Self::zero_per_cpu(
                    &mut self.maps.vip_stats,
                    map_name::VIP_STATS,
                    id,
                    self.nr_cpus,
                )?;
                // Each CPU walks a round-robin sequence from its own offset.
                let size = u64::from(self.settings.table_size);
                let n = self.nr_cpus as u64;
                let offsets: Vec<u32> = (0..n).map(|cpu| (cpu * size / n) as u32).collect();
                let offsets = aya::maps::PerCpuValues::try_from(offsets)
                    .expect("nr_cpus values, the count aya expects");
                self.maps
                    .wrr_pos
                    .set(id, offsets, 0)
                    .map_err(map_err(map_name::WRR_POS))?;
                (id, 0)
            }
        };

        // New ids, and the backend entries that change.
        let mut fresh = Vec::new();
        for b in wanted.values_mut().filter(|b| b.id == UNASSIGNED) {
            b.id = self.take_backend_id();
            self.incarnations[b.id as usize] = self.incarnations[b.id as usize].wrapping_add(1);
            fresh.push(b.id);
        }
        self.table_window(true)?;
        let result = self.write_vip(addr, vip_id, half, params, shed, &wanted, &fresh);
        let (table, history, moves) = match result {
            Ok(written) => written,
            Err(e) => {
                for id in fresh.into_iter().rev() {
                    self.free_backend_ids
                        .push_front((id, Instant::now() - TABLE_GRACE));
                }
                let _ = self.table_window(false);
                return Err(e);
            }
        };

        // Flipped: retire what is gone.
        self.tables_switched += 1;
        let (previous, rebuilds, shed) = match self.vips.remove(&addr) {
            Some(p) => (p.backends, p.rebuilds, p.shed),
            None => {
                self.free_vip_ids.pop_front();
                (BTreeMap::new(), 0, 0)
            }
        };
        // A removed backend leaves: out of the table now, its established
        // flows go on until they end (see `retire_finished`).
        for (baddr, b) in &previous {
            if !wanted.contains_key(baddr) {
                self.leaving.push_back(super::Leaving {
                    id: b.id,
                    vip: addr,
                    addr: *baddr,
                    since: Instant::now(),
                });
            }
        }
        self.table_window(false)?;
        let added: Vec<IpAddr> = wanted
            .iter()
            .filter(|(_, b)| fresh.contains(&b.id))
            .map(|(a, _)| *a)
            .collect();
        let in_table = wanted.values().filter(|b| b.weight > 0 && !b.down).count();
        let p = ProgrammedVip {
            id: vip_id,
            flags,
            load_cap,
            active_half: half,
            backends: wanted,
            table_counts: table.counts(),
            table,
            rebuilds: rebuilds + 1,
            shed,
            hold,
            history,
            moves,
        };
        self.vips.insert(addr, p);
        tracing::info!(
            vip = %addr,
            backends = in_table,
            rebuilds = rebuilds + 1,
            moved = moves.moved,
            forced = moves.forced,
            held = moves.held,
            "Maglev table rebuilt and switched in"
        );
        self.write_vip_addr(&addr.addr)?;
        self.manage_neighbours(&added);
        Ok(())
    }

    /// Everything up to and including the flip; returns the new table and
    /// its history.
    #[allow(clippy::too_many_arguments)]
    fn write_vip(
        &mut self,
        addr: VipAddr,
        vip_id: u32,
        half: u32,
        Params {
            flags,
            load_cap,
            hold,
        }: Params,
        shed: u32,
        wanted: &BTreeMap<IpAddr, ProgrammedBackend>,
        fresh: &[u32],
    ) -> Result<(MaglevTable, History, Moves), DataplaneError> {
        let (old, old_flags) = self
            .vips
            .get(&addr)
            .map(|p| (p.backends.clone(), p.flags))
            .unwrap_or_default();
        let counted = counts_flows(flags);
        for (&baddr, b) in wanted {
            let changed = old.get(&baddr).is_none_or(|o| o.down != b.down)
                || counts_flows(old_flags) != counted;
            if !changed && !fresh.contains(&b.id) {
                continue;
            }
            if fresh.contains(&b.id) {
                // No flows from the id's previous owner.
                self.active.backends.reset(b.id);
            }
            self.write_backend(b.id, baddr, vip_id, b.down, counted)?;
            if fresh.contains(&b.id) {
                Self::zero_per_cpu(
                    &mut self.maps.backend_stats,
                    map_name::BACKEND_STATS,
                    b.id,
                    self.nr_cpus,
                )?;
                // No score from the id's previous owner.
                self.maps
                    .scores
                    .set(b.id, 0, 0)
                    .map_err(map_err(map_name::SCORES))?;
            }
        }
        // A reused id must not keep the next hop of its previous address.
        if !fresh.is_empty() {
            self.refresh_next_hops()?;
        }
        let inputs: Vec<MaglevBackend> = wanted
            .iter()
            .filter(|(_, b)| !b.down)
            .map(|(&addr, b)| MaglevBackend {
                addr,
                weight: b.weight,
                id: b.id,
            })
            .collect();
        let built = if flags & VIP_SCHED_MASK == VIP_SCHED_WRR {
            MaglevTable::smooth_wrr(&inputs, self.settings.table_size)
        } else {
            MaglevTable::build(&inputs, self.settings.table_size)
        };
        // The previous backends and the churn hold (see `super::tables`),
        // for VIPs that name candidates; the others' tables are the
        // builder's.
        let (table, history, moves) = if flags & VIP_SECOND_CHANCE != 0 {
            let serving: super::tables::IdSet =
                wanted.values().filter(|b| !b.down).map(|b| b.id).collect();
            let (current, mut history) = match self.vips.get(&addr) {
                Some(p) => (p.table.entries(), p.history.clone()),
                None => (&[][..], History::fresh(built.entries())),
            };
            let (entries, moves) =
                history.next(current, built.entries(), self.clock.now(), hold, |id| {
                    serving.contains(id)
                });
            (MaglevTable::from_entries(entries), history, moves)
        } else {
            let history = History::fresh(built.entries());
            (built, history, Moves::default())
        };
        let first_chunk = self.table_chunk(vip_id, half);
        self.write_table(map_name::MAGLEV, first_chunk, table.entries())?;
        if flags & VIP_SECOND_CHANCE != 0 {
            self.write_table(map_name::PREV, first_chunk, &history.previous)?;
        }
        // The address filter first, so the VIP is never hidden behind it.
        self.write_vip_filter(&addr.addr, Some(addr.addr))?;
        // Weights before the table that holds the backends is switched in
        // (the data plane divides by them).
        self.write_active_weights(vip_id, load_cap, wanted);
        let info = VipInfo {
            id: vip_id,
            table_chunk: first_chunk,
            flags,
            shed,
        };
        // The flip.
        self.maps
            .vips
            .insert(addr.key(), info, 0)
            .map_err(map_err(map_name::VIPS))?;
        Ok((table, history, moves))
    }

    fn write_backend(
        &mut self,
        id: u32,
        addr: IpAddr,
        vip_id: u32,
        down: bool,
        counted: bool,
    ) -> Result<(), DataplaneError> {
        let (family, words) = addr_words(addr);
        let info = BackendInfo {
            addr: words,
            family,
            flags: BACKEND_ALLOCATED
                | if down { BACKEND_DOWN } else { 0 }
                | if counted { BACKEND_COUNTED } else { 0 },
            _pad: [0; 2],
            vip_id,
            incarnation: self.incarnations[id as usize],
            _pad2: 0,
        };
        self.maps
            .backends
            .set(id, info, 0)
            .map_err(map_err(map_name::BACKENDS))
    }

    /// Writes the weights (and with a load cap, the limits) of a VIP's
    /// backends into the active-flow array, and a capped VIP's spare (see
    /// `lb_common::ActiveFlows`). Backends out of the table get 0.
    fn write_active_weights(
        &self,
        vip_id: u32,
        load_cap: Option<u32>,
        backends: &BTreeMap<IpAddr, ProgrammedBackend>,
    ) {
        let in_table = |b: &ProgrammedBackend| if b.down { 0 } else { b.weight };
        let total: u64 = backends.values().map(|b| u64::from(in_table(b))).sum();
        for b in backends.values() {
            let w = in_table(b);
            let limit = load_cap.map_or(0, |c| {
                lb_common::cap_limit(f64::from(c) / 100.0, u64::from(w), total)
            });
            self.active.backends.set_weight(b.id, w, limit);
        }
        if load_cap.is_some() {
            self.active
                .vips
                .set_spare(vip_id, self.least_loaded(backends));
        }
    }

    /// The oldest free backend id, once it has been free for `TABLE_GRACE`
    /// (a packet still holding it has finished by then).
    fn take_backend_id(&mut self) -> u32 {
        if self.free_backend_ids.is_empty()
            && let Some(l) = self.leaving.pop_front()
        {
            tracing::info!(
                vip = %l.vip, backend = %l.addr,
                "backend ids are all in use: a removed backend's remaining flows are scheduled anew to free its id"
            );
            self.retire_backend(l.id);
        }
        let (id, freed_at) = self.free_backend_ids.pop_front().expect("capacity checked");
        let since = freed_at.elapsed();
        if since < TABLE_GRACE {
            thread::sleep(TABLE_GRACE - since);
        }
        id
    }

    /// Marks a backend id free in the map (its connection-table entries turn
    /// stale) and queues it for reuse.
    pub(super) fn retire_backend(&mut self, id: u32) {
        let info = BackendInfo {
            incarnation: self.incarnations[id as usize],
            ..BackendInfo::default()
        };
        if let Err(e) = self.maps.backends.set(id, info, 0) {
            tracing::warn!(id, error = %e, "clearing a removed backend's entry failed");
        }
        self.free_backend_ids.push_back((id, Instant::now()));
    }

    /// Removes a VIP; its packets pass to the host stack from now on.
    /// Removing an unknown VIP does nothing.
    pub fn remove_vip(&mut self, addr: &VipAddr) -> Result<(), DataplaneError> {
        if !self.vips.contains_key(addr) {
            return Ok(());
        }
        self.table_window(true)?;
        match self.maps.vips.remove(&addr.key()) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
            Err(e) => {
                let _ = self.table_window(false);
                return Err(map_err(map_name::VIPS)(e));
            }
        }
        let p = self.vips.remove(addr).expect("present");
        self.tables_switched += 1;
        self.free_vip_ids.push_back(p.id);
        for b in p.backends.values() {
            self.retire_backend(b.id);
        }
        // The VIP's packets pass to the host now: its leaving backends'
        // flows are over too.
        let (gone, stay): (Vec<_>, Vec<_>) = std::mem::take(&mut self.leaving)
            .into_iter()
            .partition(|l| l.vip == *addr);
        self.leaving = stay.into();
        for l in gone {
            self.retire_backend(l.id);
        }
        self.table_window(false)?;
        self.write_vip_filter(&addr.addr, None)?;
        self.write_vip_addr(&addr.addr)?;
        Ok(())
    }

    /// Sets the share of new connections `vip` sheds (0..=[`MAX_SHED`]; see
    /// `VipInfo::shed`): one replacement of the VIP's map value, its table
    /// untouched. Returns whether the value changed.
    pub fn set_vip_shed(&mut self, vip: &VipAddr, share: f64) -> Result<bool, DataplaneError> {
        let shed = shed_word(share);
        let p = self.vips.get(vip).ok_or(DataplaneError::UnknownVip(*vip))?;
        if p.shed == shed {
            return Ok(false);
        }
        let info = VipInfo {
            id: p.id,
            table_chunk: self.table_chunk(p.id, p.active_half),
            flags: p.flags,
            shed,
        };
        self.maps
            .vips
            .insert(vip.key(), info, 0)
            .map_err(map_err(map_name::VIPS))?;
        self.vips.get_mut(vip).expect("present").shed = shed;
        Ok(true)
    }

    /// The share of new connections `vip` sheds, as the data plane has it.
    pub fn vip_shed(&self, vip: &VipAddr) -> Option<f64> {
        self.vips
            .get(vip)
            .map(|p| f64::from(p.shed) / f64::from(SHED_ONE))
    }

    /// The VIPs as programmed.
    pub fn vips(&self) -> impl Iterator<Item = &VipAddr> {
        self.vips.keys()
    }

    /// Writes the least-load scores of `vip`'s backends (lower: less
    /// loaded); backends not named keep theirs. Unknown backends are skipped.
    pub fn set_scores(
        &mut self,
        vip: &VipAddr,
        scores: &BTreeMap<IpAddr, u32>,
    ) -> Result<(), DataplaneError> {
        let p = self.vips.get(vip).ok_or(DataplaneError::UnknownVip(*vip))?;
        for (addr, score) in scores {
            if let Some(b) = p.backends.get(addr) {
                self.maps
                    .scores
                    .set(b.id, *score, 0)
                    .map_err(map_err(map_name::SCORES))?;
            }
        }
        Ok(())
    }

    /// The backends of a VIP as programmed: health, weight in the table and
    /// share of the table.
    pub fn backend_states(&self, addr: &VipAddr) -> Option<Vec<BackendState>> {
        let p = self.vips.get(addr)?;
        let size = p.table.entries().len().max(1);
        Some(
            p.backends
                .iter()
                .map(|(a, b)| {
                    let entries = p.table_counts.get(&b.id).copied().unwrap_or(0);
                    BackendState {
                        addr: *a,
                        down: b.down,
                        weight_in_table: if b.down { 0 } else { b.weight },
                        weight_in_effect: if b.down {
                            0.0
                        } else {
                            f64::from(b.weight) / f64::from(FULL)
                        },
                        table_entries: entries,
                        table_share: entries as f64 / size as f64,
                    }
                })
                .collect(),
        )
    }

    /// The active Maglev table of a VIP.
    pub fn table(&self, addr: &VipAddr) -> Option<&MaglevTable> {
        self.vips.get(addr).map(|p| &p.table)
    }

    /// The active Maglev table of a VIP with each entry's backend address
    /// (backend ids are this balancer's own; addresses are what another
    /// balancer with the same config must agree on).
    pub fn table_addresses(&self, addr: &VipAddr) -> Option<Vec<IpAddr>> {
        let p = self.vips.get(addr)?;
        // Indexed by id: one lookup per table entry.
        let mut by_id = Vec::new();
        for (a, b) in p
            .backends
            .iter()
            .filter(|(_, b)| b.id < lb_common::MAX_BACKEND_IDS)
        {
            let i = b.id as usize;
            if i >= by_id.len() {
                by_id.resize(i + 1, None);
            }
            by_id[i] = Some(*a);
        }
        p.table
            .entries()
            .iter()
            .map(|&id| by_id.get(id as usize).copied().flatten())
            .collect()
    }

    /// The backend the data plane picks for a new flow, computed in user
    /// space with the same hash and table: the VIP with the exact port, else
    /// port 0.
    pub fn backend_for(&self, flow: &lb_common::FlowKey) -> Option<IpAddr> {
        let (p, _) = self.vip_for_flow(flow)?;
        let pos = lb_common::maglev_position(lb_common::flow_hash(flow), self.settings.table_size);
        let id = p.table.entries()[pos as usize];
        p.backends.iter().find(|(_, b)| b.id == id).map(|(a, _)| *a)
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
        self.globals.vip_filter[word as usize] = value;
        self.write_globals()
    }

    /// Brings `addr`'s entry in the VIP address set in line with the VIPs
    /// programmed (the number of VIPs on it; none: no entry).
    fn write_vip_addr(&mut self, addr: &IpAddr) -> Result<(), DataplaneError> {
        let (family, words) = addr_words(*addr);
        let key = VipAddrKey {
            addr: words,
            family,
            _pad: [0; 3],
        };
        let n = self.vips.keys().filter(|v| v.addr == *addr).count() as u32;
        let result = if n == 0 {
            match self.maps.vip_addrs.remove(&key) {
                Err(aya::maps::MapError::KeyNotFound) => Ok(()),
                other => other,
            }
        } else {
            self.maps.vip_addrs.insert(key, n, 0)
        };
        result.map_err(map_err(map_name::VIP_ADDRS))
    }

    fn table_chunk(&self, vip_id: u32, half: u32) -> u32 {
        (vip_id * 2 + half) * chunks_per_table(self.settings.table_size)
    }

    /// Writes a table's `entries` into map `map` (`LB_MAGLEV` or
    /// `LB_PREV`) at chunk `first_chunk` on, in one syscall.
    fn write_table(
        &mut self,
        map: &'static str,
        first_chunk: u32,
        entries: &[u32],
    ) -> Result<(), DataplaneError> {
        let mut bytes = Vec::with_capacity(
            entries.len().div_ceil(MAGLEV_CHUNK as usize) * std::mem::size_of::<MaglevChunk>(),
        );
        for entries in entries.chunks(MAGLEV_CHUNK as usize) {
            let mut chunk = MaglevChunk::default();
            chunk.backends[..entries.len()].copy_from_slice(entries);
            for id in chunk.backends {
                bytes.extend(id.to_ne_bytes());
            }
        }
        use std::os::fd::AsFd;

        use aya::maps::IterableMap;
        let target = if map == map_name::PREV {
            &self.maps.prev
        } else {
            &self.maps.maglev
        };
        let fd = target.map().fd().as_fd();
        super::raw::update_array_batch(fd, first_chunk, &bytes, std::mem::size_of::<MaglevChunk>())
            .map_err(|e| DataplaneError::Map {
                name: map,
                source: aya::maps::MapError::SyscallError(aya::sys::SyscallError {
                    call: "bpf_map_update_batch",
                    io_error: e,
                }),
            })
    }

    /// Opens (`open`) or closes a table-write window: the generation odd
    /// while tables, backend entries and `VipInfo`s are written (see
    /// `lb_common::TABLE_GEN_DOC`).
    pub(super) fn table_window(&mut self, open: bool) -> Result<(), DataplaneError> {
        if (self.table_gen & 1 == 1) == open {
            return Ok(());
        }
        self.table_gen = self.table_gen.wrapping_add(1);
        self.maps
            .table_gen
            .set(0, self.table_gen, 0)
            .map_err(map_err(map_name::TABLE_GEN))
    }
}

/// `VipInfo::shed` for a share of new connections (clamped to
/// 0..=[`MAX_SHED`]).
pub fn shed_word(share: f64) -> u32 {
    let share = if share.is_nan() {
        0.0
    } else {
        share.clamp(0.0, MAX_SHED)
    };
    (share * f64::from(SHED_ONE)).round() as u32
}
