//! Hitless restart: the balancer's maps and its XDP link are pinned under
//! `/sys/fs/bpf/<instance>/`. A restarted `lbd` adopts them — the program on
//! the existing link is replaced atomically, nothing is detached, the
//! connection table keeps every flow — after checking that the pinned maps
//! have exactly the layout this `lbd` expects. `lbd --cleanup` removes the
//! directory, which detaches the program.

use std::{
    collections::BTreeMap,
    fs,
    net::IpAddr,
    path::{Path, PathBuf},
};

use aya::maps::{Array, Map, MapData, MapInfo, MapType};
use lb_common::{
    BACKEND_ALLOCATED, BACKEND_DOWN, BackendInfo, DataplaneConfig, FlowSet, LAYOUT_VERSION,
    MaglevChunk, NextHop, PROTO_TCP, PROTO_UDP, SYN_SEEN_WORDS, Stats, TrafficCounters,
    VIP_SECOND_CHANCE, VIPS_MAP_FLAGS, VipAddrKey, VipInfo, VipKey, chunks_per_table, flow_sets,
    map_name, syn_slots, words_addr,
};

use super::{
    Dataplane, DataplaneError, ProgrammedBackend, ProgrammedVip, map_err, tables::History,
};
use crate::{
    desired::config::BalancerSettings,
    desired::vip::{Protocol, VipAddr},
    maglev::MaglevTable,
};

/// Root of the pinned state of all instances.
pub const BPFFS_ROOT: &str = "/sys/fs/bpf";
/// File name of the pinned XDP link inside an instance's directory.
pub const LINK_PIN: &str = "link";

/// The directory of instance `name`.
pub fn instance_dir(name: &str) -> PathBuf {
    Path::new(BPFFS_ROOT).join(name)
}

/// Why pinned state cannot be adopted.
#[derive(Debug, thiserror::Error)]
#[error(
    "the state pinned in {dir} does not fit this lbd: {what}. Adopting it would corrupt it; \
     run `lbd --cleanup` for this instance (drops every tracked flow) or start the lbd that made it"
)]
pub struct Incompatible {
    pub dir: String,
    pub what: String,
}

/// The kernel shape a pinned map must have.
pub(crate) struct Shape {
    pub name: &'static str,
    pub kind: MapType,
    pub key: usize,
    pub value: usize,
    pub max: u32,
    pub flags: u32,
}

/// The maps a state directory must hold, shaped for these settings.
pub(crate) fn expected(settings: &BalancerSettings) -> [Shape; 18] {
    use std::mem::size_of;
    let shape = |name, kind, key, value, max, flags| Shape {
        name,
        kind,
        key,
        value,
        max,
        flags,
    };
    let (vips, backends) = (settings.max_vips, settings.max_backends);
    let chunks = vips * 2 * chunks_per_table(settings.table_size);
    let counters = size_of::<TrafficCounters>();
    [
        shape(
            map_name::VIPS,
            MapType::Hash,
            size_of::<VipKey>(),
            size_of::<VipInfo>(),
            vips,
            VIPS_MAP_FLAGS,
        ),
        shape(
            map_name::BACKENDS,
            MapType::Array,
            4,
            size_of::<BackendInfo>(),
            backends,
            0,
        ),
        shape(
            map_name::MAGLEV,
            MapType::Array,
            4,
            size_of::<MaglevChunk>(),
            chunks,
            0,
        ),
        shape(
            map_name::PREV,
            MapType::Array,
            4,
            size_of::<MaglevChunk>(),
            chunks,
            0,
        ),
        shape(
            map_name::CONFIG,
            MapType::Array,
            4,
            size_of::<DataplaneConfig>(),
            1,
            0,
        ),
        shape(
            map_name::FLOWS,
            MapType::Array,
            4,
            size_of::<FlowSet>(),
            flow_sets(settings.flows),
            0,
        ),
        shape(
            map_name::SYN_FLOWS,
            MapType::Array,
            4,
            size_of::<FlowSet>(),
            flow_sets(syn_slots(settings.flows)),
            0,
        ),
        shape(map_name::SYN_SEEN, MapType::Array, 4, 8, SYN_SEEN_WORDS, 0),
        shape(
            map_name::NEXTHOPS,
            MapType::PerCpuArray,
            4,
            size_of::<NextHop>(),
            backends,
            0,
        ),
        shape(
            map_name::VIP_STATS,
            MapType::PerCpuArray,
            4,
            counters,
            vips,
            0,
        ),
        shape(
            map_name::BACKEND_STATS,
            MapType::PerCpuArray,
            4,
            counters,
            backends,
            0,
        ),
        shape(
            map_name::STATS,
            MapType::PerCpuArray,
            4,
            size_of::<Stats>(),
            1,
            0,
        ),
        shape(map_name::WRR_POS, MapType::PerCpuArray, 4, 4, vips, 0),
        shape(map_name::SCORES, MapType::Array, 4, 4, backends, 0),
        shape(
            map_name::VIP_ADDRS,
            MapType::Hash,
            size_of::<VipAddrKey>(),
            4,
            vips,
            0,
        ),
        shape(map_name::TABLE_GEN, MapType::Array, 4, 8, 1, 0),
        shape(
            map_name::ACTIVE,
            MapType::Array,
            4,
            size_of::<lb_common::ActiveFlows>(),
            backends,
            lb_common::ACTIVE_MAP_FLAGS,
        ),
        shape(
            map_name::VIP_ACTIVE,
            MapType::Array,
            4,
            size_of::<lb_common::VipActive>(),
            vips,
            lb_common::ACTIVE_MAP_FLAGS,
        ),
    ]
}

/// Checks an image of an older layout (`layout`) against the shapes this
/// build expects for `settings`, but for the value sizes `older` gives for
/// the maps that changed since and the maps `absent` it did not have.
pub(crate) fn check_image(
    image: &super::image::StateImage,
    settings: &BalancerSettings,
    layout: u32,
    older: impl Fn(&str) -> Option<usize>,
    absent: &[&str],
) -> Result<(), String> {
    for shape in expected(settings) {
        if absent.contains(&shape.name) {
            continue;
        }
        let value = older(shape.name).unwrap_or(shape.value);
        let m = image
            .maps
            .get(shape.name)
            .ok_or_else(|| format!("map {} is missing", shape.name))?;
        if m.kind != shape.kind as u32
            || m.key_size != shape.key
            || m.value_size != value
            || m.flags != shape.flags
        {
            return Err(format!(
                "map {} (kind {}, {}-byte keys, {}-byte values, flags {:#x}) is not layout {layout}'s",
                shape.name, m.kind, m.key_size, m.value_size, m.flags
            ));
        }
        if m.max_entries != shape.max {
            return Err(format!(
                "map {} holds {} entries, the config asks for {} (capacities and \
                 maglev_table_size cannot change in an upgrade either)",
                shape.name, m.max_entries, shape.max
            ));
        }
    }
    Ok(())
}

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Makes sure a BPF filesystem is mounted on [`BPFFS_ROOT`], mounting one if
/// not (as systemd does at boot; some minimal hosts and containers do not).
/// Returns whether it mounted one.
pub fn ensure_bpffs() -> std::io::Result<bool> {
    let root = std::ffi::CString::new(BPFFS_ROOT).expect("no NUL");
    // SAFETY: statfs fills the zeroed struct; the path is NUL-terminated.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(root.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if st.f_type as i64 == BPF_FS_MAGIC {
        return Ok(false);
    }
    let fstype = std::ffi::CString::new("bpf").expect("no NUL");
    // SAFETY: valid NUL-terminated strings, no data.
    let rc = unsafe {
        libc::mount(
            fstype.as_ptr(),
            root.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(true)
}

/// Whether `dir` holds pinned state at all.
pub fn has_state(dir: &Path) -> bool {
    map_name::STATE.iter().any(|m| dir.join(m).exists())
}

/// Checks that the state pinned in `dir` is complete and has exactly the
/// layout these settings and this build expect (map kinds, key and value
/// sizes, capacities, and `LAYOUT_VERSION`).
pub fn check_compatible(dir: &Path, settings: &BalancerSettings) -> Result<(), DataplaneError> {
    let fail = |what: String| {
        DataplaneError::Incompatible(Incompatible {
            dir: dir.display().to_string(),
            what,
        })
    };
    for Shape {
        name,
        kind,
        key,
        value,
        max,
        flags,
    } in expected(settings)
    {
        let path = dir.join(name);
        if !path.exists() {
            return Err(fail(format!("map {name} is missing")));
        }
        let info = MapInfo::from_pin(&path)
            .map_err(|e| fail(format!("map {name} cannot be read: {e}")))?;
        let got_kind = info
            .map_type()
            .map_err(|e| fail(format!("map {name}: {e}")))?;
        if got_kind != kind {
            return Err(fail(format!(
                "map {name} is a {got_kind:?} map, expected {kind:?}"
            )));
        }
        if (info.key_size() as usize, info.value_size() as usize) != (key, value) {
            return Err(fail(format!(
                "map {name} has {}-byte keys and {}-byte values, expected {key} and {value}",
                info.key_size(),
                info.value_size()
            )));
        }
        if info.map_flags() != flags {
            return Err(fail(format!(
                "map {name} has flags {:#x}, expected {flags:#x}",
                info.map_flags()
            )));
        }
        if info.max_entries() != max {
            return Err(fail(format!(
                "map {name} holds {} entries, the config asks for {max} (capacities and \
                 maglev_table_size cannot change across a restart)",
                info.max_entries()
            )));
        }
    }
    let config =
        read_config(dir).map_err(|e| fail(format!("the config map cannot be read: {e}")))?;
    if config.layout_version != LAYOUT_VERSION {
        return Err(fail(format!(
            "it was written with map layout version {}, this lbd uses {LAYOUT_VERSION}",
            config.layout_version
        )));
    }
    Ok(())
}

fn read_config(dir: &Path) -> Result<DataplaneConfig, aya::maps::MapError> {
    let data = MapData::from_pin(dir.join(map_name::CONFIG))?;
    let array: Array<MapData, DataplaneConfig> = Map::Array(data).try_into()?;
    array.get(&0, 0)
}

/// Removes instance directory `dir`, and an upgrade's staging directory of
/// it, with everything pinned in them (see [`cleanup`]).
pub fn cleanup_instance(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut removed = cleanup(&super::upgrade::staging_dir(dir))?;
    removed.extend(cleanup(dir)?);
    Ok(removed)
}

/// Removes instance directory `dir` and everything pinned in it; the XDP
/// program detaches once no process holds its link. Then lets the host
/// route what arrives on the interface it was attached to again (see
/// [`crate::host::interface`]; a failure there is logged). Returns what it
/// removed.
pub fn cleanup(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    if !dir.exists() {
        return Ok(removed);
    }
    let iface = read_config(dir)
        .ok()
        .and_then(|c| interface_name(c.ifindex));
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        fs::remove_file(&path)?;
        removed.push(path);
    }
    fs::remove_dir(dir)?;
    if let Some(iface) = iface
        && let Err(e) = crate::host::interface::allow_transit(&iface)
    {
        tracing::warn!(iface, error = %format!("{e:#}"), "cannot remove the no-transit rule");
    }
    Ok(removed)
}

/// The name of interface `index` (`None` for 0 or an interface that is gone).
fn interface_name(index: u32) -> Option<String> {
    if index == 0 {
        return None;
    }
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: a buffer of IF_NAMESIZE bytes, as if_indextoname needs.
    let name = unsafe { libc::if_indextoname(index, buf.as_mut_ptr()) };
    if name.is_null() {
        return None;
    }
    // SAFETY: if_indextoname wrote a NUL-terminated name into `buf`.
    let name = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) };
    Some(name.to_string_lossy().into_owned())
}

impl Dataplane {
    /// Rebuilds what this process knows from the adopted maps: VIPs with
    /// their ids, flags and active table halves; backends (from the backend
    /// map, which records each id's VIP, address and health); id
    /// incarnations; the next-hop generation. Weights are not recorded in
    /// the maps: they read as unknown until the config is applied (which
    /// rebuilds every table, to the same content if nothing changed). Reads
    /// only: the running balancer is not changed until
    /// `Dataplane::take_over`.
    pub(super) fn recover(&mut self) -> Result<(), DataplaneError> {
        let cfg = self
            .maps
            .config
            .get(&0, 0)
            .map_err(map_err(map_name::CONFIG))?;
        self.nexthop_gen = cfg.nexthop_gen.max(1);
        // Carry on counting from the pinned generation (an odd one, left by
        // an lbd that died in a window, is closed by the next window).
        self.table_gen = self
            .maps
            .table_gen
            .get(&0, 0)
            .map_err(map_err(map_name::TABLE_GEN))?;
        self.nexthop_cache = cfg.flags & lb_common::CONFIG_NO_NEXTHOP_CACHE == 0;
        self.attached_skb = cfg.flags & lb_common::CONFIG_ATTACHED_SKB != 0;
        self.ifindex = cfg.ifindex;

        let mut by_vip: BTreeMap<u32, BTreeMap<IpAddr, ProgrammedBackend>> = BTreeMap::new();
        for id in 0..self.settings.max_backends {
            let b = self
                .maps
                .backends
                .get(&id, 0)
                .map_err(map_err(map_name::BACKENDS))?;
            self.incarnations[id as usize] = b.incarnation;
            if b.flags & BACKEND_ALLOCATED == 0 {
                continue;
            }
            by_vip.entry(b.vip_id).or_default().insert(
                words_addr(b.family, b.addr),
                ProgrammedBackend {
                    id,
                    weight: UNKNOWN_WEIGHT,
                    down: b.flags & BACKEND_DOWN != 0,
                },
            );
        }

        let per_table = chunks_per_table(self.settings.table_size);
        let entries: Vec<(VipKey, VipInfo)> =
            self.maps.vips.iter().filter_map(Result::ok).collect();
        let mut used_vips = Vec::new();
        for (key, info) in entries {
            let protocol = match key.proto {
                PROTO_TCP => Protocol::Tcp,
                PROTO_UDP => Protocol::Udp,
                p => {
                    tracing::warn!(proto = p, "ignoring a pinned VIP with an unknown protocol");
                    continue;
                }
            };
            let addr = VipAddr {
                addr: words_addr(key.family, key.addr),
                port: u16::from_be_bytes(key.port.to_ne_bytes()),
                protocol,
            };
            let active_half = info.table_chunk / per_table - 2 * info.id;
            let mut entries = Vec::with_capacity(self.settings.table_size as usize);
            for c in 0..per_table {
                let chunk = self
                    .maps
                    .maglev
                    .get(&(info.table_chunk + c), 0)
                    .map_err(map_err(map_name::MAGLEV))?;
                entries.extend_from_slice(&chunk.backends);
            }
            entries.truncate(self.settings.table_size as usize);
            // The previous backends, if this VIP names candidates (older
            // layouts and other VIPs have none in `LB_PREV`).
            let history = if info.flags & VIP_SECOND_CHANCE != 0 {
                let mut previous = Vec::with_capacity(entries.len());
                for c in 0..per_table {
                    let chunk = self
                        .maps
                        .prev
                        .get(&(info.table_chunk + c), 0)
                        .map_err(map_err(map_name::PREV))?;
                    previous.extend_from_slice(&chunk.backends);
                }
                previous.truncate(entries.len());
                History::adopted(&entries, previous, self.clock.now())
            } else {
                History::fresh(&entries)
            };
            used_vips.push(info.id);
            let table = MaglevTable::from_entries(entries);
            self.vips.insert(
                addr,
                ProgrammedVip {
                    id: info.id,
                    flags: info.flags,
                    load_cap: None,
                    active_half,
                    backends: by_vip.remove(&info.id).unwrap_or_default(),
                    table_counts: table.counts(),
                    table,
                    rebuilds: 0,
                    shed: info.shed,
                    // Not in the maps: set when the config is applied.
                    hold: 0,
                    history,
                    moves: Default::default(),
                },
            );
        }
        // Backends whose VIP is gone: their entries are cleared when this
        // process takes over (`Dataplane::take_over`); their ids stay free.
        self.orphans = by_vip
            .values()
            .flat_map(|m| m.values().map(|b| b.id))
            .collect();
        let used_backends: Vec<u32> = self
            .vips
            .values()
            .flat_map(|p| p.backends.values().map(|b| b.id))
            .collect();
        self.free_vip_ids.retain(|id| !used_vips.contains(id));
        self.free_backend_ids
            .retain(|(id, _)| !used_backends.contains(id));
        Ok(())
    }
}

/// Weight of a recovered backend until the config says (the maps do not
/// record weights).
pub(super) const UNKNOWN_WEIGHT: u32 = u32::MAX;
