//! Upgrades that keep flows: pinned state of an older layout converted into
//! this build's.
//!
//! Every layout this build can convert from has a module here (`v7`, ...)
//! that knows that layout's maps and turns an image of them
//! ([`StateImage`]) into the next layout's; a chain of them takes older
//! state to [`LAYOUT_VERSION`]. A layout with no converter is refused as
//! before (`lbd --cleanup` starts over).
//!
//! An upgrade, as `lbd` runs it (see `Dataplane::open` and
//! `Dataplane::attach`):
//!
//! 1. The layout is read from `LB_CONFIG` (the version sits at the same
//!    offset in every layout), the old maps are checked against the
//!    converter's idea of them and the config's capacities (which cannot
//!    change in an upgrade), and what each map carries over is logged
//!    ([`MapNote`]) before anything happens.
//! 2. The old maps are read and converted in memory; the new program is
//!    loaded with new maps (not pinned yet), which get the converted
//!    entries. The old program keeps running on the old maps, unchanged.
//! 3. Once every start-up check has passed, the config is programmed into
//!    the new maps and the new program replaces the old one on the pinned
//!    link in one atomic step: a packet sees the old program with the old
//!    maps or the new one with the converted maps, never a mix.
//! 4. Flows the old program recorded between the first read and the swap
//!    are read again and merged in (those the new program has not recorded
//!    itself meanwhile), and the counters' increments of that time added.
//! 5. The new maps are pinned in `<instance>__upgrade/`, the link pin moved
//!    there, and the directory swapped in for the old one, which is
//!    removed: the old maps go once no program uses them.
//!
//! A crash in step 5 is finished by the next `lbd`
//! ([`recover_interrupted`]): a staging directory that holds the link is
//! the live state and is moved into place; one without it is discarded,
//! and the conversion runs again from the old state.

mod v10;
mod v11;
mod v7;
mod v8;
mod v9;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use lb_common::{FLOW_WAYS, FlowSlot, LAYOUT_VERSION, LAYOUT_VERSION_OFFSET, map_name};

use super::{
    image::{MapImage, StateImage},
    pinning::LINK_PIN,
    raw::RawMap,
};
use crate::desired::config::BalancerSettings;

/// What an upgrade does with one map.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapNote {
    pub map: String,
    pub what: String,
}

impl std::fmt::Display for MapNote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.map, self.what)
    }
}

/// A converter from one layout to the next.
struct Converter {
    from: u32,
    /// Checks the old maps' shapes against the layout and the capacities
    /// the config asks for.
    check: fn(&StateImage, &BalancerSettings) -> Result<(), String>,
    /// The image in the next layout, and what became of each map. Works
    /// on any subset of the maps (the catch-up converts a few again).
    convert: fn(StateImage, &mut Vec<MapNote>) -> Result<StateImage, String>,
}

/// The non-empty slots of a flow table's image (one slot: key (8), ports
/// (4), expires (4); layouts 7 on keep that shape).
fn flow_entries(m: &super::image::MapImage) -> usize {
    m.entries
        .iter()
        .flat_map(|(_, set)| set.chunks_exact(16))
        .filter(|slot| slot[..8] != [0; 8])
        .count()
}

/// A conversion that adds maps and changes none: every map of `image` is
/// carried as it is but for the layout version in `LB_CONFIG`, which
/// becomes `to`; each map added in `to` gets a note saying `new`.
fn carry_unchanged(
    mut image: StateImage,
    to: u32,
    added: &[&str],
    new: &str,
    notes: &mut Vec<MapNote>,
) -> StateImage {
    for (name, m) in image.maps.iter_mut() {
        if name == map_name::CONFIG {
            for (_, v) in m.entries.iter_mut() {
                v[LAYOUT_VERSION_OFFSET..LAYOUT_VERSION_OFFSET + 4]
                    .copy_from_slice(&to.to_ne_bytes());
            }
            notes.push(MapNote {
                map: name.clone(),
                what: "settings carried".into(),
            });
        } else {
            let what = if name == map_name::FLOWS || name == map_name::SYN_FLOWS {
                format!("{} entries carried as they are", flow_entries(m))
            } else {
                format!("{} entries carried as they are", m.entries.len())
            };
            notes.push(MapNote {
                map: name.clone(),
                what,
            });
        }
    }
    for map in added {
        notes.push(MapNote {
            map: map.to_string(),
            what: format!("new in layout {to}: {new}"),
        });
    }
    image
}

/// Every layout this build converts from, oldest first.
const CONVERTERS: &[Converter] = &[
    v7::CONVERTER,
    v8::CONVERTER,
    v9::CONVERTER,
    v10::CONVERTER,
    v11::CONVERTER,
];

/// The layouts this build converts from.
pub fn known_layouts() -> Vec<u32> {
    CONVERTERS.iter().map(|c| c.from).collect()
}

/// The converters from layout `from` to this build's.
fn chain(from: u32) -> Option<Vec<&'static Converter>> {
    let mut out = Vec::new();
    let mut at = from;
    while at != LAYOUT_VERSION {
        let c = CONVERTERS.iter().find(|c| c.from == at)?;
        out.push(c);
        at += 1;
    }
    Some(out)
}

/// The layout of the state pinned in `dir`, from its `LB_CONFIG`.
pub fn pinned_layout(dir: &Path) -> Result<u32, String> {
    let path = dir.join(map_name::CONFIG);
    let m =
        RawMap::open(&path).map_err(|e| format!("map {} cannot be read: {e}", map_name::CONFIG))?;
    if m.value_size < LAYOUT_VERSION_OFFSET + 4 {
        return Err(format!(
            "map {} has {}-byte values: no layout of lbd",
            map_name::CONFIG,
            m.value_size
        ));
    }
    let v = m
        .get(&0u32.to_ne_bytes())
        .map_err(|e| format!("map {}: {e}", map_name::CONFIG))?
        .unwrap_or_default();
    let b = v
        .get(LAYOUT_VERSION_OFFSET..LAYOUT_VERSION_OFFSET + 4)
        .unwrap_or(&[0; 4]);
    Ok(u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
}

/// An upgrade of the state in `dir` from layout `from`, read and
/// converted (steps 1 and 2).
pub struct Upgrade {
    pub dir: PathBuf,
    pub from: u32,
    /// The state in this build's layout.
    pub image: StateImage,
    pub notes: Vec<MapNote>,
    /// The old counters when read, for adding what the old program counted
    /// until the swap.
    old_counters: StateImage,
}

/// Maps whose values are per-CPU counters: the catch-up adds their
/// increments.
const COUNTERS: [&str; 3] = [
    map_name::STATS,
    map_name::VIP_STATS,
    map_name::BACKEND_STATS,
];

impl Upgrade {
    /// Reads and converts the state in `dir`, of layout `from` (older than
    /// this build's). Changes nothing.
    pub fn prepare(dir: &Path, from: u32, settings: &BalancerSettings) -> Result<Upgrade, String> {
        let chain = chain(from).ok_or_else(|| {
            format!(
                "it was written with map layout version {from}; this lbd uses {LAYOUT_VERSION} and \
                 converts from {}",
                list(&known_layouts())
            )
        })?;
        let mut image = StateImage::read(dir, &map_name::STATE)
            .map_err(|e| format!("reading the maps: {e}"))?;
        let old_counters = StateImage {
            maps: image
                .maps
                .iter()
                .filter(|(k, _)| COUNTERS.contains(&k.as_str()))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        };
        (chain[0].check)(&image, settings)?;
        // Per map, what each step did; a map no step changed is "carried".
        let mut steps: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for c in &chain {
            let mut step = Vec::new();
            image = (c.convert)(image, &mut step)?;
            for n in step {
                let what = steps.entry(n.map).or_default();
                if what.is_empty() || !n.what.contains("carried as they are") {
                    what.retain(|w| !w.contains("carried as they are"));
                    what.push(n.what);
                }
            }
        }
        let notes = steps
            .into_iter()
            .map(|(map, what)| MapNote {
                map,
                what: what.join("; then "),
            })
            .collect();
        Ok(Upgrade {
            dir: dir.to_path_buf(),
            from,
            image,
            notes,
            old_counters,
        })
    }

    /// Step 4, after the swap: merges into `new` (the new maps, by name)
    /// the flows the old program recorded since [`Upgrade::prepare`] that
    /// the new maps lack, and adds the old counters' increments. Returns
    /// how many flows were merged.
    pub fn catch_up(&self, new: &BTreeMap<String, RawMap>) -> Result<usize, String> {
        let names = [map_name::FLOWS, map_name::SYN_FLOWS];
        let now = StateImage::read(&self.dir, &names)
            .map_err(|e| format!("reading the old maps again: {e}"))?;
        let flows = convert(now, self.from)?;
        let mut merged = 0;
        for name in names {
            let (Some(old), Some(map)) = (flows.maps.get(name), new.get(name)) else {
                continue;
            };
            for (key, value) in &old.entries {
                let Some(mut set) = map.get(key).map_err(|e| format!("{name}: {e}"))? else {
                    continue;
                };
                if merge_set(&mut set, value) {
                    map.set(key, &set).map_err(|e| format!("{name}: {e}"))?;
                    merged += 1;
                }
            }
        }
        // What the old program counted since the first read.
        let later = StateImage::read(&self.dir, &COUNTERS)
            .map_err(|e| format!("reading the old counters: {e}"))?;
        for name in COUNTERS {
            let (Some(first), Some(last), Some(map)) = (
                self.old_counters.maps.get(name),
                later.maps.get(name),
                new.get(name),
            ) else {
                continue;
            };
            let converted_first = convert_one(name, first, self.from)?;
            let converted_last = convert_one(name, last, self.from)?;
            for (key, last_v) in &converted_last.entries {
                let first_v = converted_first
                    .entries
                    .iter()
                    .find(|(k, _)| k == key)
                    .map(|(_, v)| v.as_slice());
                let Some(mut cur) = map.get(key).map_err(|e| format!("{name}: {e}"))? else {
                    continue;
                };
                if cur.len() != last_v.len() {
                    continue;
                }
                for lane in 0..cur.len() / 8 {
                    let word = |b: &[u8]| {
                        u64::from_ne_bytes(b[lane * 8..lane * 8 + 8].try_into().expect("8 bytes"))
                    };
                    let delta = word(last_v).wrapping_sub(first_v.map_or(0, word));
                    let sum = word(&cur).wrapping_add(delta);
                    cur[lane * 8..lane * 8 + 8].copy_from_slice(&sum.to_ne_bytes());
                }
                map.set(key, &cur).map_err(|e| format!("{name}: {e}"))?;
            }
        }
        Ok(merged)
    }
}

/// (Some of) the maps of layout `from` in this build's layout.
fn convert(mut image: StateImage, from: u32) -> Result<StateImage, String> {
    for c in chain(from).ok_or("no converter")? {
        image = (c.convert)(image, &mut Vec::new())?;
    }
    Ok(image)
}

/// One map of layout `from` in this build's layout.
fn convert_one(name: &str, m: &MapImage, from: u32) -> Result<MapImage, String> {
    let image = StateImage {
        maps: [(name.to_string(), m.clone())].into_iter().collect(),
    };
    convert(image, from)?
        .maps
        .remove(name)
        .ok_or_else(|| format!("{name} lost in conversion"))
}

/// Merges the flow entries of the old set `old` (bytes of a `FlowSet`) into
/// `set`: each one `set` does not hold yet goes into an empty slot, if one
/// is left. Whether `set` changed.
fn merge_set(set: &mut [u8], old: &[u8]) -> bool {
    const SLOT: usize = std::mem::size_of::<FlowSlot>();
    let slot = |b: &[u8], w: usize| -> (u64, u32) {
        let s = &b[w * SLOT..(w + 1) * SLOT];
        (
            u64::from_ne_bytes(s[..8].try_into().expect("8 bytes")),
            u32::from_ne_bytes(s[8..12].try_into().expect("4 bytes")),
        )
    };
    let mut changed = false;
    for w in 0..FLOW_WAYS {
        let (key, ports) = slot(old, w);
        if key == 0 {
            continue;
        }
        let tag = key >> 32;
        let held = (0..FLOW_WAYS).any(|v| {
            let (k, p) = slot(set, v);
            k != 0 && k >> 32 == tag && p == ports
        });
        if held {
            continue;
        }
        if let Some(free) = (0..FLOW_WAYS).find(|v| slot(set, *v).0 == 0) {
            set[free * SLOT..(free + 1) * SLOT].copy_from_slice(&old[w * SLOT..(w + 1) * SLOT]);
            changed = true;
        }
    }
    changed
}

fn list(v: &[u32]) -> String {
    if v.is_empty() {
        return "no older layout".into();
    }
    v.iter().map(u32::to_string).collect::<Vec<_>>().join(", ")
}

/// What a start of this build with `settings` would do with the state
/// pinned in `dir`, for `lbd --check`: one line, then a line per map when
/// it would convert. Reads only.
pub fn describe(dir: &Path, settings: &BalancerSettings) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    if staging_dir(dir).exists() {
        out.push(format!(
            "{}: an interrupted upgrade; the next start finishes or discards it first",
            staging_dir(dir).display()
        ));
    }
    if !super::pinning::has_state(dir) {
        out.push(format!(
            "{}: no pinned state: a new balancer would start",
            dir.display()
        ));
        return Ok(out);
    }
    let layout = pinned_layout(dir)?;
    if layout == LAYOUT_VERSION {
        super::pinning::check_compatible(dir, settings).map_err(|e| e.to_string())?;
        out.push(format!(
            "{}: layout {layout}, this build's: it would be adopted (flows, counters, attachment kept)",
            dir.display()
        ));
        return Ok(out);
    }
    let up = Upgrade::prepare(dir, layout, settings)?;
    out.push(format!(
        "{}: layout {layout}: it would be converted to layout {LAYOUT_VERSION}, keeping its flows:",
        dir.display()
    ));
    out.extend(up.notes.iter().map(|n| format!("  {n}")));
    Ok(out)
}

/// The staging directory of an upgrade of `dir` (bpffs allows no dot in a
/// name; instance names have no `__`).
pub fn staging_dir(dir: &Path) -> PathBuf {
    let mut s = dir.as_os_str().to_os_string();
    s.push("__upgrade");
    PathBuf::from(s)
}

/// Finishes or discards an upgrade of `dir` that a crash cut short in its
/// last step (see the module docs). Returns what it did, if anything.
pub fn recover_interrupted(dir: &Path) -> std::io::Result<Option<&'static str>> {
    let staging = staging_dir(dir);
    if !staging.exists() {
        return Ok(None);
    }
    if staging.join(LINK_PIN).exists() {
        // The new program runs on the staged maps: they are the state.
        if dir.exists() {
            super::pinning::cleanup(dir)?;
        }
        std::fs::rename(&staging, dir)?;
        return Ok(Some(
            "an interrupted upgrade was finished: its new maps are the state",
        ));
    }
    super::pinning::cleanup(&staging)?;
    Ok(Some(
        "an interrupted upgrade was discarded: it starts again from the old maps",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot_bytes(key: u64, ports: u32, expires: u32) -> Vec<u8> {
        let mut v = key.to_ne_bytes().to_vec();
        v.extend(ports.to_ne_bytes());
        v.extend(expires.to_ne_bytes());
        v
    }

    #[test]
    fn merging_keeps_what_the_new_set_holds_and_fills_free_slots() {
        let a = slot_bytes(0xaaaa_0000_0000_0001, 1, 100);
        let b = slot_bytes(0xbbbb_0000_0000_0002, 2, 100);
        let a_newer = slot_bytes(0xaaaa_0000_0000_0003, 1, 200);
        let zero = slot_bytes(0, 0, 0);
        let mut set = [a_newer.clone(), zero.clone(), zero.clone(), zero.clone()].concat();
        let old = [a, b.clone(), zero.clone(), zero.clone()].concat();
        assert!(merge_set(&mut set, &old));
        assert_eq!(set, [a_newer, b, zero.clone(), zero].concat());
        let copy = set.clone();
        assert!(!merge_set(&mut set, &old), "nothing more to merge");
        assert_eq!(set, copy);
    }

    #[test]
    fn every_older_layout_chains_to_this_one() {
        for from in known_layouts() {
            assert!(chain(from).is_some(), "layout {from}");
        }
        assert!(chain(LAYOUT_VERSION).unwrap().is_empty());
        assert!(chain(1).is_none());
    }
}
