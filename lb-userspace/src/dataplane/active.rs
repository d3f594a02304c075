//! Active flows per backend (see `lb_common::ActiveFlows` for what is
//! counted, how exact and how fresh): the shared arrays `lbd` maps into its
//! memory, and the sweep that counts the connection table.
//!
//! The sweep runs on its own thread, so the controller (API requests,
//! steering) never waits for it: it reads the connection table (and the
//! handshake table, for removed backends' flows) in batches and counts the
//! live entries per backend id and incarnation. The controller collects
//! the result on its next tick ([`Dataplane::poll_sweep`]): it resolves ids
//! to backends, corrects the data plane's units of counted backends, picks
//! each capped VIP's spare, and retires removed backends whose last flow
//! ended.

use std::{
    collections::HashMap,
    net::IpAddr,
    os::fd::{AsFd, BorrowedFd, OwnedFd},
    ptr::NonNull,
    sync::{
        Arc,
        atomic::{AtomicI64, AtomicU32, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use lb_common::{
    ActiveFlows, FLOW_UNIT, FlowSet, FlowSlot, NO_BACKEND, VipActive, fewer_per_weight, map_name,
};

use super::{Dataplane, DataplaneError, map_err};
use crate::desired::vip::VipAddr;

/// A BPF array created with `BPF_F_MMAPABLE`, mapped into this process.
pub(super) struct Mapped<T> {
    ptr: NonNull<T>,
    entries: u32,
    bytes: usize,
}

// SAFETY: the mapping is plain shared memory; every access below is an
// atomic load, store or add on an aligned field.
unsafe impl<T> Send for Mapped<T> {}
unsafe impl<T> Sync for Mapped<T> {}

impl<T> Mapped<T> {
    /// Maps the `entries` values of the array behind `fd`.
    fn new(fd: BorrowedFd<'_>, entries: u32) -> std::io::Result<Mapped<T>> {
        use std::os::fd::AsRawFd;
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        let bytes = (entries as usize * size_of::<T>()).next_multiple_of(page);
        // SAFETY: a new shared mapping of the map's pages; the kernel
        // checks the size against the map.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Mapped {
            ptr: NonNull::new(ptr.cast()).expect("mmap returned a mapping"),
            entries,
            bytes,
        })
    }

    fn at(&self, i: u32) -> Option<*mut T> {
        // SAFETY: in bounds of the mapping.
        (i < self.entries).then(|| unsafe { self.ptr.as_ptr().add(i as usize) })
    }
}

impl<T> Drop for Mapped<T> {
    fn drop(&mut self) {
        // SAFETY: our own mapping, unmapped once.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.bytes) };
    }
}

/// The values of the mapped arrays: each has its `units` first.
pub(super) trait Units {
    /// The `units` field of the value at `p`.
    fn units_at(p: *mut Self) -> *mut i64;
}

impl Units for ActiveFlows {
    fn units_at(p: *mut Self) -> *mut i64 {
        // SAFETY: a field of the value `p` points at (no read).
        unsafe { &raw mut (*p).units }
    }
}

impl Units for VipActive {
    fn units_at(p: *mut Self) -> *mut i64 {
        // SAFETY: as above.
        unsafe { &raw mut (*p).units }
    }
}

impl<T: Units> Mapped<T> {
    /// Entry `i`'s units, atomically (0 out of range).
    fn atomic_units(&self, i: u32) -> Option<&AtomicI64> {
        // SAFETY: an aligned i64 of a live mapping, which `self` keeps.
        self.at(i)
            .map(|p| unsafe { AtomicI64::from_ptr(T::units_at(p)) })
    }

    /// Entry `i`'s units now.
    pub(super) fn units(&self, i: u32) -> i64 {
        self.atomic_units(i)
            .map_or(0, |u| u.load(Ordering::Relaxed))
    }

    /// Adds `d` to entry `i`'s units (the data plane adds too).
    fn add(&self, i: u32, d: i64) {
        if let Some(u) = self.atomic_units(i) {
            u.fetch_add(d, Ordering::Relaxed);
        }
    }

    /// Starts entry `i` from no flows (a new owner of the id).
    fn zero(&self, i: u32) {
        if let Some(u) = self.atomic_units(i) {
            u.store(0, Ordering::Relaxed);
        }
    }
}

impl Mapped<ActiveFlows> {
    /// Starts backend `i` from no flows (a new owner of the id).
    pub(super) fn reset(&self, i: u32) {
        self.zero(i);
    }

    /// Sets backend `i`'s weight and cap limit.
    pub(super) fn set_weight(&self, i: u32, weight: u32, limit: u32) {
        if let Some(p) = self.at(i) {
            // SAFETY: aligned u32 fields of a live mapping.
            unsafe {
                AtomicU32::from_ptr(&raw mut (*p).weight).store(weight, Ordering::Relaxed);
                AtomicU32::from_ptr(&raw mut (*p).limit).store(limit, Ordering::Relaxed);
            }
        }
    }

    /// Backend `i`'s weight as written.
    fn weight(&self, i: u32) -> u32 {
        self.at(i).map_or(0, |p| {
            // SAFETY: as in `set_weight`.
            unsafe { AtomicU32::from_ptr(&raw mut (*p).weight) }.load(Ordering::Relaxed)
        })
    }
}

impl Mapped<VipActive> {
    /// Starts VIP `i` from no flows and no spare (a new VIP on the id).
    pub(super) fn reset(&self, i: u32) {
        self.zero(i);
        self.set_spare(i, NO_BACKEND);
    }

    /// Sets VIP `i`'s spare backend.
    pub(super) fn set_spare(&self, i: u32, spare: u32) {
        if let Some(p) = self.at(i) {
            // SAFETY: an aligned u32 field of a live mapping.
            unsafe { AtomicU32::from_ptr(&raw mut (*p).spare) }.store(spare, Ordering::Relaxed);
        }
    }
}

/// The two mapped arrays.
pub(super) struct ActiveMaps {
    pub backends: Arc<Mapped<ActiveFlows>>,
    pub vips: Arc<Mapped<VipActive>>,
}

impl ActiveMaps {
    /// Maps `LB_ACTIVE` and `LB_VIP_ACTIVE` of a loaded object.
    pub(super) fn map(ebpf: &aya::Ebpf, backends: u32, vips: u32) -> Result<Self, DataplaneError> {
        fn mapped<T>(
            ebpf: &aya::Ebpf,
            name: &'static str,
            entries: u32,
        ) -> Result<Arc<Mapped<T>>, DataplaneError> {
            Mapped::new(array_fd(ebpf, name)?, entries)
                .map(Arc::new)
                .map_err(|e| DataplaneError::Map {
                    name,
                    source: aya::maps::MapError::SyscallError(aya::sys::SyscallError {
                        call: "mmap",
                        io_error: e,
                    }),
                })
        }
        Ok(ActiveMaps {
            backends: mapped(ebpf, map_name::ACTIVE, backends)?,
            vips: mapped(ebpf, map_name::VIP_ACTIVE, vips)?,
        })
    }
}

/// The fd of array map `name` of a loaded object.
fn array_fd<'a>(ebpf: &'a aya::Ebpf, name: &'static str) -> Result<BorrowedFd<'a>, DataplaneError> {
    match ebpf.map(name) {
        Some(aya::maps::Map::Array(d)) => Ok(d.fd().as_fd()),
        Some(_) => Err(map_err(name)(aya::maps::MapError::InvalidName {
            name: name.into(),
        })),
        None => Err(DataplaneError::Missing { kind: "map", name }),
    }
}

/// A backend's active flows as of the last sweep.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct ActiveCount {
    /// Flows in the connection table that are open (not closing).
    pub open: u64,
    /// Flows whose client sent a FIN, within their closing timeout.
    pub closing: u64,
}

impl ActiveCount {
    /// Every active flow: open and closing.
    pub fn total(&self) -> u64 {
        self.open + self.closing
    }
}

/// What one sweep counted.
struct Sweep {
    /// Per backend id: its live connection-table entries of the
    /// incarnation in `incarnations`.
    main: Vec<ActiveCount>,
    /// Per backend id: whether it has a live handshake-table entry.
    handshakes: Vec<bool>,
    /// The incarnations the sweep counted (`Dataplane::incarnations` as it
    /// began).
    incarnations: Vec<u32>,
    /// `LB_ACTIVE` / `LB_VIP_ACTIVE` units as the sweep began.
    units_before: Vec<i64>,
    vip_units_before: Vec<i64>,
    took: Duration,
}

/// The sweep's state in the data plane.
#[derive(Default)]
pub(super) struct SweepState {
    running: Option<(Instant, JoinHandle<std::io::Result<Sweep>>)>,
    /// When the last sweep began.
    last_start: Option<Instant>,
    /// Per backend id: its active flows at the last sweep.
    pub counts: HashMap<u32, ActiveCount>,
    /// Sweeps finished, and how long the last one took.
    pub done: u64,
    pub last_took: Duration,
    /// When the last finished sweep began.
    pub last_at: Option<Instant>,
}

/// What the metrics show of the sweeps.
#[derive(Clone, Copy, Debug, Default)]
pub struct SweepStats {
    pub sweeps: u64,
    pub last_seconds: f64,
    /// Age of the counts (since the last finished sweep began).
    pub age_seconds: Option<f64>,
}

/// A sweep's failure as a map error of the connection table.
fn sweep_error(call: &'static str, e: std::io::Error) -> DataplaneError {
    DataplaneError::Map {
        name: map_name::FLOWS,
        source: aya::maps::MapError::SyscallError(aya::sys::SyscallError { call, io_error: e }),
    }
}

/// Sets read per `BPF_MAP_LOOKUP_BATCH`.
const FLOW_BATCH: u32 = 4096;

/// Calls `f` with every set of the flow table behind `fd` (`len` sets),
/// read in batches of [`FLOW_BATCH`].
pub(super) fn for_each_set(
    fd: BorrowedFd<'_>,
    len: u32,
    mut f: impl FnMut(&FlowSet),
) -> std::io::Result<()> {
    let size = size_of::<FlowSet>();
    let mut buf = Vec::new();
    let mut first = 0;
    while first < len {
        let count = FLOW_BATCH.min(len - first);
        super::raw::lookup_array_batch(fd, first, count, size, &mut buf)?;
        for chunk in buf.chunks_exact(size) {
            // SAFETY: FlowSet is plain data (`repr(C)`, integers only) and
            // `chunk` is exactly its size.
            f(&unsafe { std::ptr::read_unaligned(chunk.as_ptr().cast::<FlowSet>()) });
        }
        first += count;
    }
    Ok(())
}

/// Whether `slot` is live at jiffies `now` (not empty, not being written,
/// not expired).
pub(super) fn live(slot: &FlowSlot, now: Option<u32>) -> bool {
    slot.key != 0
        && !FlowSlot::is_busy(slot.key)
        && now.is_none_or(|n| (slot.expires.wrapping_sub(n) as i32) > 0)
}

/// The backend id of a live slot's key word, if it belongs to the
/// incarnation of that id in `incarnations` (one array read per slot: a
/// sweep of the default table reads four million).
fn owner(key: u64, incarnations: &[u32]) -> Option<usize> {
    let id = FlowSlot::backend_id(key) as usize;
    let inc = incarnations.get(id)?;
    FlowSlot::same_incarnation(key, *inc).then_some(id)
}

/// What a sweep reads: its own handles on both flow tables (with their
/// lengths in sets) and on the mapped arrays, and the backend ids'
/// incarnations as it begins.
struct SweepInputs {
    flows: (OwnedFd, u32),
    handshakes: (OwnedFd, u32),
    active: ActiveMaps,
    incarnations: Vec<u32>,
}

/// One sweep: both tables counted, the units read first.
fn sweep(inputs: SweepInputs) -> std::io::Result<Sweep> {
    let SweepInputs {
        flows,
        handshakes,
        active,
        incarnations,
    } = inputs;
    let started = Instant::now();
    let units_before = (0..active.backends.entries)
        .map(|i| active.backends.units(i))
        .collect();
    let vip_units_before = (0..active.vips.entries)
        .map(|i| active.vips.units(i))
        .collect();
    let now = super::counters::jiffies_now();
    let mut main = vec![ActiveCount::default(); incarnations.len()];
    for_each_set(flows.0.as_fd(), flows.1, |set| {
        for slot in &set.slots {
            if live(slot, now)
                && let Some(id) = owner(slot.key, &incarnations)
            {
                let c = &mut main[id];
                if FlowSlot::closing(slot.key) {
                    c.closing += 1;
                } else {
                    c.open += 1;
                }
            }
        }
    })?;
    let mut hs = vec![false; incarnations.len()];
    for_each_set(handshakes.0.as_fd(), handshakes.1, |set| {
        for slot in &set.slots {
            if live(slot, now)
                && let Some(id) = owner(slot.key, &incarnations)
            {
                hs[id] = true;
            }
        }
    })?;
    Ok(Sweep {
        main,
        handshakes: hs,
        incarnations,
        units_before,
        vip_units_before,
        took: started.elapsed(),
    })
}

impl Dataplane {
    /// Collects a finished sweep and starts the next one once `every` has
    /// passed since the last began. Cheap when there is nothing to do: the
    /// controller calls it several times a second.
    pub fn poll_sweep(&mut self, every: Duration) -> Result<(), DataplaneError> {
        if let Some((_, h)) = &self.sweep.running
            && h.is_finished()
        {
            self.collect_sweep()?;
        }
        if self.sweep.running.is_some()
            || self.sweep.last_start.is_some_and(|t| t.elapsed() < every)
        {
            return Ok(());
        }
        let inputs = self.sweep_inputs()?;
        let now = Instant::now();
        let handle = std::thread::Builder::new()
            .name("lb-sweep".into())
            .spawn(move || sweep(inputs))
            .map_err(|e| sweep_error("spawning the sweep thread", e))?;
        self.sweep.last_start = Some(now);
        self.sweep.running = Some((now, handle));
        Ok(())
    }

    /// A sweep now, on this thread (after the one running, if any); returns
    /// how many removed backends it retired. For tests and diagnosis.
    pub fn sweep_now(&mut self) -> Result<usize, DataplaneError> {
        if self.sweep.running.is_some() {
            self.collect_sweep()?;
        }
        let inputs = self.sweep_inputs()?;
        let now = Instant::now();
        self.sweep.last_start = Some(now);
        let s = sweep(inputs).map_err(|e| sweep_error("bpf_map_lookup_batch", e))?;
        Ok(self.finish_sweep(s, now))
    }

    /// Waits for the running sweep and takes its counts in.
    fn collect_sweep(&mut self) -> Result<usize, DataplaneError> {
        let Some((started, h)) = self.sweep.running.take() else {
            return Ok(0);
        };
        let s = h
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("the sweep thread panicked")))
            .map_err(|e| sweep_error("bpf_map_lookup_batch", e))?;
        Ok(self.finish_sweep(s, started))
    }

    /// What a sweep reads (see [`SweepInputs`]).
    fn sweep_inputs(&self) -> Result<SweepInputs, DataplaneError> {
        let dup = |name: &'static str| -> Result<OwnedFd, DataplaneError> {
            array_fd(&self.ebpf, name)?
                .try_clone_to_owned()
                .map_err(|e| sweep_error("dup", e))
        };
        Ok(SweepInputs {
            flows: (
                dup(map_name::FLOWS)?,
                lb_common::flow_sets(self.settings.flows),
            ),
            handshakes: (
                dup(map_name::SYN_FLOWS)?,
                lb_common::flow_sets(lb_common::syn_slots(self.settings.flows)),
            ),
            active: ActiveMaps {
                backends: self.active.backends.clone(),
                vips: self.active.vips.clone(),
            },
            incarnations: self.incarnations.clone(),
        })
    }

    /// Takes in a sweep's counts (see the module docs); returns how many
    /// removed backends it retired.
    fn finish_sweep(&mut self, s: Sweep, started: Instant) -> usize {
        // Id → (its VIP's id, counted) for every id that is a backend's or
        // a leaving backend's now.
        let mut owners: HashMap<u32, (u32, bool)> = HashMap::new();
        for p in self.vips.values() {
            let counted = super::vips::counts_flows(p.flags);
            for b in p.backends.values() {
                owners.insert(b.id, (p.id, counted));
            }
        }
        for l in &self.leaving {
            if let Some(p) = self.vips.get(&l.vip) {
                owners.insert(l.id, (p.id, super::vips::counts_flows(p.flags)));
            }
        }
        // An id given to another backend while the sweep ran was counted
        // for its old one: it waits for the next sweep.
        let same = |id: u32| s.incarnations.get(id as usize) == self.incarnations.get(id as usize);
        let mut counts = HashMap::new();
        let mut vip_units: HashMap<u32, i64> = HashMap::new();
        for (&id, &(vip_id, counted)) in owners.iter().filter(|(id, _)| same(**id)) {
            let c = s.main[id as usize];
            counts.insert(id, c);
            if counted {
                let units = c.open as i64 * FLOW_UNIT + c.closing as i64;
                let before = s.units_before.get(id as usize).copied().unwrap_or(0);
                self.active.backends.add(id, units - before);
                *vip_units.entry(vip_id).or_default() += units;
            }
        }
        for (&vip_id, &units) in &vip_units {
            let before = s
                .vip_units_before
                .get(vip_id as usize)
                .copied()
                .unwrap_or(0);
            self.active.vips.add(vip_id, units - before);
        }
        // Each capped VIP's spare: its in-table backend with the fewest
        // units per weight now.
        for p in self.vips.values() {
            if p.flags & lb_common::VIP_LOAD_CAP != 0 {
                self.active
                    .vips
                    .set_spare(p.id, self.least_loaded(&p.backends));
            }
        }
        // Removed backends whose last flow ended.
        let mut retired = 0;
        let done: Vec<u32> = self
            .leaving
            .iter()
            .filter(|l| {
                counts.get(&l.id).is_some_and(|c| c.total() == 0) && !s.handshakes[l.id as usize]
            })
            .map(|l| l.id)
            .collect();
        if !done.is_empty() {
            let (gone, stay): (Vec<_>, Vec<_>) = std::mem::take(&mut self.leaving)
                .into_iter()
                .partition(|l| done.contains(&l.id));
            self.leaving = stay.into();
            for l in gone {
                tracing::info!(
                    vip = %l.vip, backend = %l.addr,
                    after_s = l.since.elapsed().as_secs(),
                    "a removed backend's last flow ended: its id is free"
                );
                self.retire_backend(l.id);
                retired += 1;
            }
        }
        self.sweep.counts = counts;
        self.sweep.done += 1;
        self.sweep.last_took = s.took;
        self.sweep.last_at = Some(started);
        retired
    }

    /// The in-table backend of `backends` with the fewest units per weight
    /// (`NO_BACKEND` if none is in the table).
    pub(super) fn least_loaded(
        &self,
        backends: &std::collections::BTreeMap<IpAddr, super::ProgrammedBackend>,
    ) -> u32 {
        let mut best: Option<(u32, i64, u32)> = None;
        for b in backends.values() {
            if b.down || b.weight == 0 {
                continue;
            }
            let load = (
                self.active.backends.units(b.id),
                self.active.backends.weight(b.id),
            );
            if best.is_none_or(|(_, u, w)| fewer_per_weight(load, (u, w))) {
                best = Some((b.id, load.0, load.1));
            }
        }
        best.map_or(NO_BACKEND, |b| b.0)
    }

    /// VIP `addr`'s backends' active flows as of the last sweep (zero
    /// before the first one).
    pub fn active_flows(&self, addr: &VipAddr) -> std::collections::BTreeMap<IpAddr, ActiveCount> {
        let Some(p) = self.vips.get(addr) else {
            return Default::default();
        };
        p.backends
            .iter()
            .map(|(a, b)| {
                (
                    *a,
                    self.sweep.counts.get(&b.id).copied().unwrap_or_default(),
                )
            })
            .collect()
    }

    /// Active flows of VIP `addr`'s removed backends that still have some
    /// (as of the last sweep).
    pub fn leaving_flows(&self, addr: &VipAddr) -> Vec<(IpAddr, ActiveCount)> {
        self.leaving
            .iter()
            .filter(|l| l.vip == *addr)
            .map(|l| {
                (
                    l.addr,
                    self.sweep.counts.get(&l.id).copied().unwrap_or_default(),
                )
            })
            .collect()
    }

    /// The sweeps so far.
    pub fn sweep_stats(&self) -> SweepStats {
        SweepStats {
            sweeps: self.sweep.done,
            last_seconds: self.sweep.last_took.as_secs_f64(),
            age_seconds: self.sweep.last_at.map(|t| t.elapsed().as_secs_f64()),
        }
    }

    /// The data plane's active-flow units of VIP `addr`'s backends now
    /// (counted VIPs only; for diagnosis and tests).
    pub fn active_units(&self, addr: &VipAddr) -> std::collections::BTreeMap<IpAddr, i64> {
        let Some(p) = self.vips.get(addr) else {
            return Default::default();
        };
        p.backends
            .iter()
            .map(|(a, b)| (*a, self.active.backends.units(b.id)))
            .collect()
    }
}
