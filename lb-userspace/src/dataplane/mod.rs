//! The data plane: loads the XDP object, attaches it, and keeps its maps in
//! step with the desired VIPs. This is the only module that touches BPF maps
//! and programs.
//!
//! Submodules: `vips` programs VIPs, backends and Maglev tables; `counters`
//! reads the per-CPU counters; `bench` drives the benchmark programs;
//! `pinning` adopts a previous lbd's pinned state; `raw` reads and writes
//! maps of any layout as bytes, `image` a whole instance's.

mod active;
mod bench;
mod counters;
mod decap;
pub mod image;
pub mod pinning;
pub mod raw;
pub mod tables;
pub mod upgrade;
mod vips;

use std::{
    collections::{BTreeMap, VecDeque},
    net::IpAddr,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, MapError, PerCpuArray, PerCpuValues},
    programs::{
        ProgramError, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        xdp::{XdpLink, XdpLinkId},
    },
};
use lb_common::{
    BackendInfo, CONFIG_ATTACHED_SKB, CONFIG_FRAGMENTS_PASS, CONFIG_ICMP_ECHO,
    CONFIG_NO_NEXTHOP_CACHE, CONFIG_TOO_BIG_ICMP, DataplaneConfig, FLOW_WAYS, GLOBALS_SECTION,
    Globals, LAYOUT_VERSION, LOCAL_MACS, MaglevChunk, NO_MAC, Stats, TrafficCounters, VipAddrKey,
    VipInfo, VipKey, addr_words, chunks_per_table, flow_sets, idle_jiffies, mac_word, map_name,
    program_name, renew_after, syn_slots,
};

pub use active::{ActiveCount, SweepStats};
pub use bench::{BenchMaps, BenchTarget};
pub use counters::{Counters, FlowCounts, FlowEntry};
pub use decap::{DECAP_OBJECT, Decapsulator, PassProgram};

use crate::{desired::config::BalancerSettings, desired::vip::VipAddr, maglev::MaglevTable};

/// The balancer object, built by `build.rs` from `lb-ebpf`.
pub static BALANCER_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-xdp"));

/// Why a data plane operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("loading the XDP object failed (are you root? is the kernel 5.16 or newer?)")]
    Load(#[from] aya::EbpfError),
    #[error("the XDP object has no {kind} named {name}: object and lbd do not match")]
    Missing {
        kind: &'static str,
        name: &'static str,
    },
    #[error("map {name}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("program {name}")]
    Program {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("cannot attach to interface {iface} in {mode} mode")]
    Attach {
        iface: String,
        mode: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("no room for VIP {vip}: all {max} VIP slots are in use (balancer.max_vips)")]
    VipCapacity { vip: VipAddr, max: u32 },
    #[error(
        "no room for {needed} more backends: {free} of {max} backend slots are free (balancer.max_backends)"
    )]
    BackendCapacity {
        needed: usize,
        free: usize,
        max: u32,
    },
    #[error("{setting}: {message}")]
    FixedSetting { setting: String, message: String },
    #[error("reading the number of CPUs: {0}")]
    Cpus(String),
    #[error("finding the kernel's tick rate (the connection table's clock): {0}")]
    Clock(String),
    #[error("interface {0} does not exist")]
    NoInterface(String),
    #[error("cannot create the pin directory {dir} (is bpffs mounted on /sys/fs/bpf?)")]
    PinDir {
        dir: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Incompatible(#[from] pinning::Incompatible),
    #[error(
        "the pinned balancer is attached to interface index {pinned}, not to {iface} (index {asked}); \
         run lbd --cleanup first to move it"
    )]
    AttachedElsewhere {
        pinned: u32,
        iface: String,
        asked: u32,
    },
    #[error("pinning the XDP link to {path}")]
    PinLink {
        path: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error(
        "taking over the pinned XDP link {path} failed (was its interface deleted? run lbd --cleanup)"
    )]
    AdoptLink {
        path: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("setting up the XDP program's log: {0}")]
    Log(String),
    #[error("no VIP {0}")]
    UnknownVip(VipAddr),
    #[error("VIP {vip} has no backend {backend}")]
    UnknownBackend { vip: VipAddr, backend: IpAddr },
    #[error("{count} addresses to decapsulate; the limit is {max}")]
    TooManyAddresses { count: usize, max: u32 },
    #[error("upgrading the pinned state in {dir}: {what}")]
    Upgrade { dir: String, what: String },
    #[error(transparent)]
    Interface(#[from] crate::host::interface::InterfaceError),
    #[error("enabling forwarding on {iface} ({path})")]
    Forwarding {
        iface: String,
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// How to attach the balancer to an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachMode {
    /// Native (driver) mode if the driver supports it, generic otherwise.
    Auto,
    /// Native (driver) mode only.
    Native,
    /// Generic (skb) mode: works everywhere, slower.
    Skb,
}

/// A VIP as it is programmed in the maps.
struct ProgrammedVip {
    id: u32,
    /// `VIP_*` flags as written.
    flags: u32,
    /// The load cap the limits were written for (hundredths; see
    /// `Vip::load_cap`). Not in the maps: an adopted VIP has `None` until
    /// its config is applied.
    load_cap: Option<u32>,
    /// Which half of the VIP's two table slots is active (0 or 1).
    active_half: u32,
    backends: BTreeMap<IpAddr, ProgrammedBackend>,
    table: MaglevTable,
    /// Positions of `table` per backend id, counted once per table (views
    /// and every scrape read them).
    table_counts: std::collections::HashMap<u32, usize>,
    /// Tables built for this VIP by this process (metrics).
    rebuilds: u64,
    /// `VipInfo::shed` as written.
    shed: u32,
    /// The churn hold the table was written with (seconds; 0: none; see
    /// [`tables`]).
    hold: u32,
    /// The table's previous backends and moves.
    history: tables::History,
    /// What the last rebuild moved, held and when the hold releases.
    moves: tables::Moves,
}

/// How to load the balancer.
#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    /// Pin the state here (see [`pinning`]); `None`: nothing is pinned.
    pub pin_dir: Option<PathBuf>,
    /// Compile in the XDP program's debug log (one record per packet, for
    /// diagnosis; read with [`Dataplane::take_xdp_logger`]).
    pub xdp_debug_log: bool,
}

/// How full the maps are (metrics).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapUsage {
    pub vips: u32,
    pub vips_capacity: u32,
    pub backends: u32,
    pub backends_capacity: u32,
    /// The connection table's capacity (the kernel does not count its
    /// entries cheaply).
    pub flows_capacity: u32,
}

/// A backend as the data plane has it, for views.
#[derive(Clone, Debug, PartialEq)]
pub struct BackendState {
    pub addr: IpAddr,
    /// Health checks say it is down.
    pub down: bool,
    /// The weight its table share was built with (0: drained or down):
    /// configured weight × level (see [`crate::steering::FULL`]).
    pub weight_in_table: u32,
    /// The same in units of the configured weight: `weight_in_table / FULL`.
    pub weight_in_effect: f64,
    /// Maglev table entries it owns.
    pub table_entries: usize,
    /// Its share of the table, 0..=1.
    pub table_share: f64,
}

/// A backend removed from its VIP while it may still have established
/// flows: its id stays allocated (out of every table, so no new flow goes
/// to it) until its flows have ended.
#[derive(Clone, Debug)]
pub(crate) struct Leaving {
    pub id: u32,
    pub vip: VipAddr,
    pub addr: IpAddr,
    pub since: std::time::Instant,
}

/// A backend of a VIP as programmed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ProgrammedBackend {
    id: u32,
    weight: u32,
    /// Health checks say it is down: out of the table, flagged in the map.
    down: bool,
}

struct Maps {
    vips: HashMap<MapData, VipKey, VipInfo>,
    backends: Array<MapData, BackendInfo>,
    maglev: Array<MapData, MaglevChunk>,
    /// The previous tables, indexed like `maglev`.
    prev: Array<MapData, MaglevChunk>,
    config: Array<MapData, DataplaneConfig>,
    /// The data path's settings and VIP filter (not pinned; see
    /// `lb_common::Globals`).
    globals: Array<MapData, Globals>,
    stats: PerCpuArray<MapData, Stats>,
    vip_stats: PerCpuArray<MapData, TrafficCounters>,
    backend_stats: PerCpuArray<MapData, TrafficCounters>,
    wrr_pos: PerCpuArray<MapData, u32>,
    scores: Array<MapData, u32>,
    table_gen: Array<MapData, u64>,
    vip_addrs: HashMap<MapData, VipAddrKey, u32>,
}

/// The loaded balancer and the state programmed into its maps.
pub struct Dataplane {
    ebpf: Ebpf,
    maps: Maps,
    settings: BalancerSettings,
    vips: BTreeMap<VipAddr, ProgrammedVip>,
    /// Free ids, reused oldest-freed first; backend ids with the time they
    /// were freed (see `vips::TABLE_GRACE`).
    free_vip_ids: VecDeque<u32>,
    free_backend_ids: VecDeque<(u32, std::time::Instant)>,
    /// `BackendInfo::incarnation` last given out, per backend id.
    incarnations: Vec<u32>,
    nr_cpus: usize,
    link: Option<XdpLinkId>,
    /// The interface attached to, once attached.
    iface: Option<String>,
    /// Its index (0 before attaching).
    ifindex: u32,
    /// Where the state is pinned (None: not pinned).
    pin_dir: Option<PathBuf>,
    /// The attachment, when pinned.
    pinned_link: Option<PinnedLink>,
    /// The maps were adopted from a previous lbd.
    adopted: bool,
    /// Attached in generic (skb) mode.
    attached_skb: bool,
    /// The XDP program's log records, when debug logging is on.
    xdp_logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    /// Current next-hop cache generation (`DataplaneConfig::nexthop_gen`).
    nexthop_gen: u32,
    nexthop_cache: bool,
    /// The kernel's HZ: the unit of the connection table's clock.
    hz: u32,
    /// What `maps.globals` holds.
    globals: Box<Globals>,
    /// Adopted: whether this process has started changing the running
    /// balancer's maps yet (see [`Dataplane::take_over`]).
    taken_over: bool,
    /// Adopted backend ids whose VIP is gone, cleared on take-over.
    orphans: Vec<u32>,
    /// A conversion of older state, finished once this program replaced
    /// the old one on the pinned link (see [`upgrade`]).
    upgrade: Option<upgrade::Upgrade>,
    /// The table-write generation as last written (see
    /// `Dataplane::table_window`).
    table_gen: u64,
    /// Maglev tables switched in since this process started (every VIP).
    tables_switched: u64,
    /// The clock of the tables' histories.
    clock: tables::Clock,
    /// Backends removed from their VIP whose established flows go on until
    /// a sweep finds none left (see [`active`]), oldest first.
    leaving: VecDeque<Leaving>,
    /// The mapped active-flow arrays (see `lb_common::ActiveFlows`).
    active: active::ActiveMaps,
    /// The active-flow sweep (see [`active`]).
    sweep: active::SweepState,
    /// Marks the backends' next hops managed, once attached.
    neighbours: Option<crate::host::neighbours::Neighbours>,
    /// The MAC of the interface the frames arrive on (see
    /// [`Dataplane::set_local_mac`]).
    local_mac: Option<[u8; 6]>,
}

/// Turns on forwarding on `iface` for each family the balancer sends outer
/// headers in (the families with a source address).
///
/// The kernel's FIB lookup from XDP answers "forwarding disabled" unless
/// forwarding is on for the ingress interface, even for the output lookup
/// the balancer does; without it every VIP packet would be dropped as
/// `fib_failed`. Only this interface changes. Note that IPv6 forwarding makes
/// the interface ignore router advertisements unless `accept_ra` is 2.
/// Returns the sysctls it changed.
pub fn enable_forwarding(
    iface: &str,
    settings: &BalancerSettings,
) -> Result<Vec<String>, DataplaneError> {
    enable_forwarding_for(
        iface,
        settings.source_v4.is_some(),
        settings.source_v6.is_some(),
    )
}

/// [`enable_forwarding`] for IPv4 if `v4` and IPv6 if `v6`. When it turns
/// IPv6 forwarding on, an interface that took router advertisements
/// (`accept_ra` 1) is set to take them still (2), so the host keeps a
/// default route it learned from them.
pub fn enable_forwarding_for(
    iface: &str,
    v4: bool,
    v6: bool,
) -> Result<Vec<String>, DataplaneError> {
    let mut changed = Vec::new();
    let families = [(v4, "ipv4"), (v6, "ipv6")];
    for (_, family) in families.iter().filter(|(used, _)| *used) {
        let path = format!("/proc/sys/net/{family}/conf/{iface}/forwarding");
        let err = |source| DataplaneError::Forwarding {
            iface: iface.to_string(),
            path: path.clone(),
            source,
        };
        let now = std::fs::read_to_string(&path).map_err(err)?;
        if now.trim() != "1" {
            std::fs::write(&path, "1").map_err(err)?;
            tracing::info!(iface, sysctl = %path, "enabled forwarding (the XDP FIB lookup needs it)");
            changed.push(path);
            let ra = format!("/proc/sys/net/ipv6/conf/{iface}/accept_ra");
            if *family == "ipv6" && std::fs::read_to_string(&ra).is_ok_and(|v| v.trim() == "1") {
                std::fs::write(&ra, "2").map_err(|source| DataplaneError::Forwarding {
                    iface: iface.to_string(),
                    path: ra.clone(),
                    source,
                })?;
                tracing::info!(iface, sysctl = %ra, "router advertisements still accepted with forwarding on");
                changed.push(ra);
            }
        }
    }
    Ok(changed)
}

/// The index of interface `iface`.
pub fn interface_index(iface: &str) -> Result<u32, DataplaneError> {
    let missing = || DataplaneError::NoInterface(iface.to_string());
    let name = std::ffi::CString::new(iface).map_err(|_| missing())?;
    // SAFETY: a valid NUL-terminated string.
    match unsafe { libc::if_nametoindex(name.as_ptr()) } {
        0 => Err(missing()),
        index => Ok(index),
    }
}

/// Attaches `prog` to `iface` in `mode` (`Auto`: native, else generic with a
/// warning); returns the link and the mode in effect.
fn attach_xdp(
    prog: &mut Xdp,
    iface: &str,
    mode: AttachMode,
) -> Result<(XdpLinkId, AttachMode), DataplaneError> {
    interface_index(iface)?;
    let attach = |prog: &mut Xdp, mode: AttachMode| {
        let (flags, label) = match mode {
            AttachMode::Native | AttachMode::Auto => (XdpMode::Driver, "native"),
            AttachMode::Skb => (XdpMode::Skb, "skb"),
        };
        prog.attach(iface, flags)
            .map_err(|source| DataplaneError::Attach {
                iface: iface.to_string(),
                mode: label,
                source,
            })
    };
    match mode {
        AttachMode::Auto => match attach(prog, AttachMode::Native) {
            Ok(link) => Ok((link, AttachMode::Native)),
            Err(e) => {
                tracing::warn!(iface, error = %e, "native XDP not available, falling back to generic (skb) mode");
                Ok((attach(prog, AttachMode::Skb)?, AttachMode::Skb))
            }
        },
        m => Ok((attach(prog, m)?, m)),
    }
}

fn map_err(name: &'static str) -> impl FnOnce(MapError) -> DataplaneError {
    move |source| DataplaneError::Map { name, source }
}

fn take_map(ebpf: &mut Ebpf, name: &'static str) -> Result<aya::maps::Map, DataplaneError> {
    ebpf.take_map(name)
        .ok_or(DataplaneError::Missing { kind: "map", name })
}

fn xdp_program<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut Xdp, DataplaneError> {
    ebpf.program_mut(name)
        .ok_or(DataplaneError::Missing {
            kind: "program",
            name,
        })?
        .try_into()
        .map_err(|source| DataplaneError::Program { name, source })
}

impl Dataplane {
    /// Loads the balancer object with map capacities from `settings`, loads
    /// the balancer program (the kernel verifies it here) and writes the
    /// global settings. Nothing is attached yet, and nothing is pinned: the
    /// state goes when the `Dataplane` is dropped.
    pub fn load(settings: &BalancerSettings) -> Result<Dataplane, DataplaneError> {
        Self::open(settings, &LoadOptions::default())
    }

    /// As [`Dataplane::load`], with the state pinned in `dir` (see
    /// [`pinning`]): state already pinned there is checked and adopted
    /// ([`Dataplane::adopted`]), otherwise new maps are created and pinned.
    pub fn load_pinned(
        settings: &BalancerSettings,
        dir: &Path,
    ) -> Result<Dataplane, DataplaneError> {
        let options = LoadOptions {
            pin_dir: Some(dir.to_path_buf()),
            ..LoadOptions::default()
        };
        Self::open(settings, &options)
    }

    /// Loads the balancer as `options` say (see [`Dataplane::load`]).
    pub fn open(
        settings: &BalancerSettings,
        options: &LoadOptions,
    ) -> Result<Dataplane, DataplaneError> {
        let pin_dir = options.pin_dir.as_deref();
        if pin_dir.is_some() {
            let mounted = pinning::ensure_bpffs().map_err(|source| DataplaneError::PinDir {
                dir: pinning::BPFFS_ROOT.to_string(),
                source,
            })?;
            if mounted {
                tracing::info!(
                    path = pinning::BPFFS_ROOT,
                    "mounted a BPF filesystem (none was mounted)"
                );
            }
        }
        let pin_err = |dir: &Path| {
            let dir = dir.display().to_string();
            move |source| DataplaneError::PinDir { dir, source }
        };
        let mut converting = None;
        let adopt = match pin_dir {
            Some(dir) => {
                if let Some(what) = upgrade::recover_interrupted(dir).map_err(pin_err(dir))? {
                    tracing::warn!(dir = %dir.display(), "{what}");
                }
                if pinning::has_state(dir) {
                    let incompatible = |what: String| {
                        DataplaneError::Incompatible(pinning::Incompatible {
                            dir: dir.display().to_string(),
                            what,
                        })
                    };
                    let layout = upgrade::pinned_layout(dir).map_err(incompatible)?;
                    if layout == LAYOUT_VERSION {
                        pinning::check_compatible(dir, settings)?;
                    } else {
                        let up = upgrade::Upgrade::prepare(dir, layout, settings)
                            .map_err(incompatible)?;
                        tracing::info!(
                            dir = %dir.display(),
                            from = layout,
                            to = LAYOUT_VERSION,
                            "converting the pinned state of an older lbd; per map:"
                        );
                        for note in &up.notes {
                            tracing::info!("  {note}");
                        }
                        converting = Some(up);
                    }
                    true
                } else {
                    std::fs::create_dir_all(dir).map_err(pin_err(dir))?;
                    false
                }
            }
            None => false,
        };
        // A conversion's new maps are pinned beside the old ones until the
        // new program has replaced the old (see `upgrade`).
        let pins: Vec<(&str, PathBuf)> = match (pin_dir, &converting) {
            (Some(dir), Some(_)) => {
                let staging = upgrade::staging_dir(dir);
                std::fs::create_dir_all(&staging).map_err(pin_err(&staging))?;
                map_name::STATE
                    .iter()
                    .map(|m| (*m, staging.join(m)))
                    .collect()
            }
            (Some(dir), None) => map_name::STATE.iter().map(|m| (*m, dir.join(m))).collect(),
            (None, _) => Vec::new(),
        };
        let maglev_chunks = settings.max_vips * 2 * chunks_per_table(settings.table_size);
        let mut loader = EbpfLoader::new();
        loader
            .map_max_entries(map_name::VIPS, settings.max_vips)
            .map_max_entries(map_name::VIP_STATS, settings.max_vips)
            .map_max_entries(map_name::MAGLEV, maglev_chunks)
            .map_max_entries(map_name::PREV, maglev_chunks)
            .map_max_entries(map_name::BACKENDS, settings.max_backends)
            .map_max_entries(map_name::BACKEND_STATS, settings.max_backends)
            .map_max_entries(map_name::NEXTHOPS, settings.max_backends)
            .map_max_entries(map_name::SCORES, settings.max_backends)
            .map_max_entries(map_name::ACTIVE, settings.max_backends)
            .map_max_entries(map_name::VIP_ACTIVE, settings.max_vips)
            .map_max_entries(map_name::WRR_POS, settings.max_vips)
            .map_max_entries(map_name::VIP_ADDRS, settings.max_vips)
            .map_max_entries(map_name::FLOWS, flow_sets(settings.flows))
            .map_max_entries(map_name::SYN_FLOWS, flow_sets(syn_slots(settings.flows)));
        for (name, path) in &pins {
            loader.map_pin_path(name, path.as_path());
        }
        // The program's log statements are dead code unless asked for: the
        // level is a read-only global the verifier sees as a constant.
        let log_level = if options.xdp_debug_log {
            aya_log::Level::Debug as u8
        } else {
            0
        };
        loader.override_global(aya_log::LEVEL, &log_level, true);
        let mut ebpf = loader.load(BALANCER_OBJECT)?;
        if let Some(up) = &converting {
            // The converted state into the new maps, while the old program
            // runs on on the old ones.
            for (name, path) in &pins {
                let Some(m) = up.image.maps.get(*name) else {
                    continue;
                };
                let map = raw::RawMap::open(path).map_err(pin_err(path))?;
                for (k, v) in &m.entries {
                    map.set(k, v).map_err(pin_err(path))?;
                }
            }
        }
        let xdp_logger = if options.xdp_debug_log {
            Some(
                aya_log::EbpfLogger::init(&mut ebpf)
                    .map_err(|e| DataplaneError::Log(e.to_string()))?,
            )
        } else {
            None
        };
        let name = program_name::BALANCER;
        xdp_program(&mut ebpf, name)?
            .load()
            .map_err(|source| DataplaneError::Program { name, source })?;

        macro_rules! typed {
            ($name:expr) => {
                take_map(&mut ebpf, $name)?
                    .try_into()
                    .map_err(map_err($name))?
            };
        }
        let maps = Maps {
            vips: typed!(map_name::VIPS),
            backends: typed!(map_name::BACKENDS),
            maglev: typed!(map_name::MAGLEV),
            prev: typed!(map_name::PREV),
            config: typed!(map_name::CONFIG),
            globals: typed!(GLOBALS_SECTION),
            stats: typed!(map_name::STATS),
            vip_stats: typed!(map_name::VIP_STATS),
            backend_stats: typed!(map_name::BACKEND_STATS),
            wrr_pos: typed!(map_name::WRR_POS),
            scores: typed!(map_name::SCORES),
            table_gen: typed!(map_name::TABLE_GEN),
            vip_addrs: typed!(map_name::VIP_ADDRS),
        };
        let active = active::ActiveMaps::map(&ebpf, settings.max_backends, settings.max_vips)?;
        let nr_cpus = aya::util::nr_cpus()
            .map_err(|(what, e)| DataplaneError::Cpus(format!("{what}: {e}")))?;
        let hz = crate::host::kernel_hz().map_err(DataplaneError::Clock)?;
        let mut dp = Dataplane {
            ebpf,
            maps,
            settings: settings.clone(),
            vips: BTreeMap::new(),
            free_vip_ids: (0..settings.max_vips).collect(),
            free_backend_ids: (0..settings.max_backends)
                .map(|id| (id, std::time::Instant::now() - vips::TABLE_GRACE))
                .collect(),
            incarnations: vec![0; settings.max_backends as usize],
            nr_cpus,
            link: None,
            iface: None,
            neighbours: None,
            ifindex: 0,
            nexthop_gen: 1,
            nexthop_cache: true,
            hz,
            globals: Box::new(Globals::EMPTY),
            local_mac: None,
            pin_dir: pin_dir.map(Path::to_path_buf),
            pinned_link: None,
            adopted: adopt,
            attached_skb: false,
            xdp_logger,
            taken_over: !adopt,
            orphans: Vec::new(),
            upgrade: converting,
            table_gen: 0,
            tables_switched: 0,
            clock: tables::Clock::new(),
            leaving: VecDeque::new(),
            active,
            sweep: active::SweepState::default(),
        };
        if adopt {
            dp.recover()?;
            dp.nexthop_gen = dp.nexthop_gen.wrapping_add(1).max(1);
            // This program's filter is empty: rebuild it from the adopted
            // VIPs before the program runs.
            let addrs: Vec<IpAddr> = dp.vips.keys().map(|v| v.addr).collect();
            for a in addrs {
                let (word, bit) = lb_common::vip_filter_slot(&addr_words(a).1);
                dp.globals.vip_filter[word as usize] |= bit;
            }
        } else {
            // New maps: no program uses them yet.
            dp.write_config()?;
        }
        Ok(dp)
    }

    /// Adopted state is only read until this is called: the previous
    /// `lbd`'s program keeps running on its maps exactly as it left them.
    /// From here on this process changes them (clears backends whose VIP is
    /// gone, writes its settings). `lbd` calls it once every check that can
    /// fail at start-up has passed; programming VIPs and attaching call it
    /// too. Does nothing for new maps or when done already.
    pub fn take_over(&mut self) -> Result<(), DataplaneError> {
        if self.taken_over {
            return Ok(());
        }
        for id in std::mem::take(&mut self.orphans) {
            let cleared = BackendInfo {
                incarnation: self.incarnations[id as usize],
                ..BackendInfo::default()
            };
            self.maps
                .backends
                .set(id, cleared, 0)
                .map_err(map_err(lb_common::map_name::BACKENDS))?;
        }
        self.taken_over = true;
        self.write_config()
    }

    /// Checks, without changing anything, that [`Dataplane::attach`] to
    /// `iface` can work: the interface exists and, for adopted state, is the
    /// one the running balancer is attached to.
    pub fn check_attach(&self, iface: &str) -> Result<(), DataplaneError> {
        let ifindex = interface_index(iface)?;
        if self.adopted && self.ifindex != 0 && self.ifindex != ifindex {
            return Err(DataplaneError::AttachedElsewhere {
                pinned: self.ifindex,
                iface: iface.to_string(),
                asked: ifindex,
            });
        }
        Ok(())
    }

    /// Whether this data plane adopted state a previous `lbd` pinned.
    pub fn adopted(&self) -> bool {
        self.adopted
    }

    /// The XDP program's log reader, when loaded with `xdp_debug_log`. The
    /// owner polls it (it is readable when records wait) and calls `flush`,
    /// which hands the records to the `log` crate.
    pub fn take_xdp_logger(&mut self) -> Option<aya_log::EbpfLogger<&'static dyn log::Log>> {
        self.xdp_logger.take()
    }

    /// How full the maps are.
    pub fn usage(&self) -> MapUsage {
        MapUsage {
            vips: self.vips.len() as u32,
            vips_capacity: self.settings.max_vips,
            backends: self.vips.values().map(|p| p.backends.len() as u32).sum(),
            backends_capacity: self.settings.max_backends,
            flows_capacity: flow_sets(self.settings.flows) * FLOW_WAYS as u32,
        }
    }

    /// Tables built per VIP since this process started.
    /// Maglev tables switched in since this process started, every VIP's
    /// (a VIP's removal included).
    pub fn tables_switched(&self) -> u64 {
        self.tables_switched
    }

    pub fn rebuilds(&self) -> BTreeMap<VipAddr, u64> {
        self.vips.iter().map(|(a, p)| (*a, p.rebuilds)).collect()
    }

    /// Where the state is pinned, if it is.
    pub fn pin_dir(&self) -> Option<&Path> {
        self.pin_dir.as_deref()
    }

    /// The settings in effect.
    pub fn settings(&self) -> &BalancerSettings {
        &self.settings
    }

    /// Changes the settings that can change at run time (source addresses,
    /// MTU). Capacities and the table size are fixed when the object loads.
    pub fn set_settings(&mut self, settings: &BalancerSettings) -> Result<(), DataplaneError> {
        let problems = crate::desired::config::capacity_problems(&self.settings, settings);
        if let Some(p) = problems.into_iter().next() {
            return Err(DataplaneError::FixedSetting {
                setting: p.field,
                message: p.message,
            });
        }
        if self.settings != *settings {
            tracing::info!(from = ?self.settings, to = ?settings, "balancer settings changed");
        }
        self.settings = settings.clone();
        self.write_config()
    }

    fn write_config(&mut self) -> Result<(), DataplaneError> {
        let s = &self.settings;
        let tcp_idle = idle_jiffies(s.tcp_idle.as_nanos() as u64, self.hz);
        let udp_idle = idle_jiffies(s.udp_idle.as_nanos() as u64, self.hz);
        let tcp_closing = idle_jiffies(s.tcp_closing.as_nanos() as u64, self.hz);
        let cfg = DataplaneConfig {
            src_v4: s.source_v4.map_or(0, |a| addr_words(a.into()).1[0]),
            src_v6: s.source_v6.map_or([0; 4], |a| addr_words(a.into()).1),
            mtu: s.mtu,
            table_size: s.table_size,
            nexthop_gen: self.nexthop_gen,
            flags: if self.nexthop_cache {
                0
            } else {
                CONFIG_NO_NEXTHOP_CACHE
            } | if self.attached_skb {
                CONFIG_ATTACHED_SKB
            } else {
                0
            } | if s.icmp_echo { CONFIG_ICMP_ECHO } else { 0 }
                | if s.too_big_icmp {
                    CONFIG_TOO_BIG_ICMP
                } else {
                    0
                }
                | if s.fragments_pass {
                    CONFIG_FRAGMENTS_PASS
                } else {
                    0
                },
            layout_version: LAYOUT_VERSION,
            ifindex: self.ifindex,
            flow_set_mask: flow_sets(s.flows) - 1,
            tcp_idle,
            udp_idle,
            tcp_renew: renew_after(tcp_idle, self.hz),
            udp_renew: renew_after(udp_idle, self.hz),
            syn_set_mask: flow_sets(syn_slots(s.flows)) - 1,
            tcp_closing,
            tcp_closing_renew: renew_after(tcp_closing, self.hz),
            _pad: 0,
        };
        self.maps
            .config
            .set(0, cfg, 0)
            .map_err(map_err(map_name::CONFIG))?;
        self.globals.config = cfg;
        let macs = self.local_mac.iter().chain(&s.extra_macs);
        self.globals.local_macs = [NO_MAC; LOCAL_MACS];
        for (slot, mac) in self.globals.local_macs.iter_mut().zip(macs) {
            *slot = mac_word(*mac);
        }
        self.write_globals()
    }

    /// Takes `mac` as the MAC of the interface the frames arrive on: the
    /// data plane acts only on frames addressed to it (or to
    /// `balancer.extra_macs`) and passes the others (`not_our_mac`).
    /// [`Dataplane::attach`] sets it from the interface; before that no
    /// frame is the balancer's.
    pub fn set_local_mac(&mut self, mac: [u8; 6]) -> Result<(), DataplaneError> {
        self.local_mac = Some(mac);
        self.write_config()
    }

    /// Writes the data path's copy of the settings and the VIP filter.
    fn write_globals(&mut self) -> Result<(), DataplaneError> {
        self.maps
            .globals
            .set(0, *self.globals, 0)
            .map_err(map_err(GLOBALS_SECTION))
    }

    /// Starts a new next-hop cache generation: every CPU looks its next hops
    /// up in the FIB again on its next packet to each backend. `lbd` calls
    /// this every second, so neighbour changes take effect within a second.
    pub fn refresh_next_hops(&mut self) -> Result<(), DataplaneError> {
        self.nexthop_gen = self.nexthop_gen.checked_add(1).unwrap_or(1);
        self.write_config()
    }

    /// Turns the next-hop cache off (a FIB lookup for every packet) or on.
    /// For measurements and diagnosis.
    pub fn set_nexthop_cache(&mut self, enabled: bool) -> Result<(), DataplaneError> {
        self.nexthop_cache = enabled;
        self.write_config()
    }

    /// Attaches the balancer to `iface`; returns the mode in effect.
    /// Prepares the host first: forwarding on `iface` (see
    /// [`enable_forwarding`]), no transit routing on it, VLAN tags kept in
    /// the frames XDP sees, and the interface's MAC for the program (see
    /// [`crate::host::interface`]).
    ///
    /// Pinned: a pinned link (from a previous `lbd`) gets this process's
    /// program in one atomic replace, keeping its mode; there is no moment
    /// without a program. Otherwise the new link is pinned.
    pub fn attach(&mut self, iface: &str, mode: AttachMode) -> Result<AttachMode, DataplaneError> {
        use crate::host::interface;
        let ifindex = interface_index(iface)?;
        self.check_attach(iface)?;
        self.take_over()?;
        enable_forwarding(iface, &self.settings)?;
        interface::refuse_transit(iface)?;
        for offload in interface::keep_vlan_tags(iface)? {
            tracing::info!(
                iface,
                offload,
                "turned off (it would hide VLAN tags from XDP)"
            );
        }
        // Before the program runs (or replaces the running one): until it
        // knows the interface's MAC it treats every frame as another's.
        self.set_local_mac(interface::mac(iface)?)?;
        let link_pin = self.pin_dir.as_ref().map(|d| d.join(pinning::LINK_PIN));
        let prog = xdp_program(&mut self.ebpf, program_name::BALANCER)?;
        let used = match &link_pin {
            Some(path) if path.exists() => {
                let adopt_err =
                    |e: Box<dyn std::error::Error + Send + Sync>| DataplaneError::AdoptLink {
                        path: path.display().to_string(),
                        source: e,
                    };
                let pinned = PinnedLink::from_pin(path).map_err(|e| adopt_err(e.into()))?;
                let link =
                    XdpLink::try_from(FdLink::from(pinned)).map_err(|e| adopt_err(e.into()))?;
                self.link = Some(prog.attach_to_link(link).map_err(|e| adopt_err(e.into()))?);
                // The mode of the existing attachment, which stays.
                if self.attached_skb {
                    AttachMode::Skb
                } else {
                    AttachMode::Native
                }
            }
            _ => {
                let (link, used) = attach_xdp(prog, iface, mode)?;
                match &link_pin {
                    Some(path) => {
                        let pin_err =
                            |e: Box<dyn std::error::Error + Send + Sync>| DataplaneError::PinLink {
                                path: path.display().to_string(),
                                source: e,
                            };
                        let link = prog.take_link(link).map_err(|e| pin_err(e.into()))?;
                        let fd = FdLink::try_from(link).map_err(|e| pin_err(e.into()))?;
                        self.pinned_link = Some(fd.pin(path).map_err(|e| pin_err(e.into()))?);
                    }
                    None => self.link = Some(link),
                }
                self.attached_skb = used == AttachMode::Skb;
                used
            }
        };
        if let Some(up) = self.upgrade.take() {
            self.finish_upgrade(up)?;
        }
        self.iface = Some(iface.to_string());
        self.ifindex = ifindex;
        match crate::host::neighbours::Neighbours::start(iface, ifindex) {
            Ok(n) => self.neighbours = Some(n),
            Err(e) => tracing::error!(
                iface, error = %format!("{e:#}"),
                "cannot manage the neighbours towards backends: their packets count as fib_failed until the kernel resolves them otherwise"
            ),
        }
        self.write_config()?;
        let backends: Vec<IpAddr> = self
            .vips
            .values()
            .flat_map(|p| p.backends.keys().copied())
            .collect();
        self.manage_neighbours(&backends);
        Ok(used)
    }

    /// Steps 4 and 5 of an upgrade (see [`upgrade`]), once the new program
    /// runs: merges what the old program recorded meanwhile, then moves the
    /// new maps and the link into the instance directory in place of the
    /// old maps.
    fn finish_upgrade(&mut self, up: upgrade::Upgrade) -> Result<(), DataplaneError> {
        let dir = up.dir.clone();
        let staging = upgrade::staging_dir(&dir);
        let io = |what: &'static str| {
            let dir = dir.display().to_string();
            move |e: std::io::Error| DataplaneError::Upgrade {
                dir: dir.clone(),
                what: format!("{what}: {e}"),
            }
        };
        let new: BTreeMap<String, raw::RawMap> = [
            map_name::FLOWS,
            map_name::SYN_FLOWS,
            map_name::STATS,
            map_name::VIP_STATS,
            map_name::BACKEND_STATS,
        ]
        .iter()
        .map(|m| Ok((m.to_string(), raw::RawMap::open(&staging.join(m))?)))
        .collect::<std::io::Result<_>>()
        .map_err(io("opening the new maps"))?;
        let merged = up.catch_up(&new).map_err(|what| DataplaneError::Upgrade {
            dir: dir.display().to_string(),
            what,
        })?;
        drop(new);
        std::fs::rename(dir.join(pinning::LINK_PIN), staging.join(pinning::LINK_PIN))
            .map_err(io("moving the link pin"))?;
        let mut old = dir.as_os_str().to_os_string();
        old.push(format!("__old{}", std::process::id()));
        let old = PathBuf::from(old);
        std::fs::rename(&dir, &old).map_err(io("moving the old maps aside"))?;
        std::fs::rename(&staging, &dir).map_err(io("moving the new maps in"))?;
        pinning::cleanup(&old).map_err(io("removing the old maps"))?;
        tracing::info!(
            dir = %dir.display(),
            from = up.from,
            to = LAYOUT_VERSION,
            merged,
            "upgrade done: the new program runs on the converted maps; the old maps are gone"
        );
        Ok(())
    }

    /// Detaches the balancer (also happens when an unpinned `Dataplane` is
    /// dropped) and lets the host route what arrives on the interface again
    /// (see [`crate::host::interface`]). A pinned balancer is removed with
    /// [`pinning::cleanup`].
    pub fn detach(&mut self) -> Result<(), DataplaneError> {
        let name = program_name::BALANCER;
        if let Some(link) = self.link.take() {
            xdp_program(&mut self.ebpf, name)?
                .detach(link)
                .map_err(|source| DataplaneError::Program { name, source })?;
            if let Some(iface) = &self.iface {
                crate::host::interface::allow_transit(iface)?;
            }
        }
        Ok(())
    }

    /// Keeps the neighbours towards `backends` resolved (see
    /// [`crate::host::neighbours`]: on a thread of its own, so this returns
    /// at once); failures are logged, not fatal: the affected packets count
    /// as `fib_failed` until the entries resolve otherwise.
    fn manage_neighbours(&self, backends: &[IpAddr]) {
        if let Some(n) = &self.neighbours {
            n.manage(backends);
        }
    }

    /// The loaded balancer program (for `BPF_PROG_TEST_RUN`).
    pub fn balancer(&mut self) -> Result<&mut Xdp, DataplaneError> {
        xdp_program(&mut self.ebpf, program_name::BALANCER)
    }

    fn zero_per_cpu<T: aya::Pod + Default>(
        map: &mut PerCpuArray<MapData, T>,
        name: &'static str,
        index: u32,
        nr_cpus: usize,
    ) -> Result<(), DataplaneError> {
        let zeros = PerCpuValues::try_from(vec![T::default(); nr_cpus])
            .expect("nr_cpus values, the count aya expects");
        map.set(index, zeros, 0).map_err(map_err(name))
    }
}
