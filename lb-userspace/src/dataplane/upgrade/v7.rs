//! Layout 7 (main until the reliability work: commit 8e5d16d), and its
//! conversion to layout 8.
//!
//! What changed in 8: a connection-table key keeps 11 bits of its
//! backend's incarnation (was 12) and gains the closing bit (bit 31);
//! `DataplaneConfig` gains the closing timeout (72 → 80 bytes); `Stats`
//! has 16 connection-table event slots (was 8: 192 → 256 bytes). Every
//! other map is the same.
//!
//! Everything this module knows of layout 7 is written out here, frozen,
//! so later changes of the shared types cannot change what it reads.

use super::{Converter, MapNote};
use crate::{
    dataplane::{image::StateImage, pinning},
    desired::config::BalancerSettings,
};

pub(super) const CONVERTER: Converter = Converter {
    from: 7,
    check,
    convert,
};

/// Layout 7's `DataplaneConfig` size.
const CONFIG_SIZE: usize = 72;
/// Bytes of it that layout 8 keeps as they are (every field up to and
/// including `syn_set_mask`).
const CONFIG_KEPT: usize = 68;
/// Layout 7's `Stats`: 16 reasons, then 8 event slots, all `u64`.
const STATS_REASONS: usize = 16;
const STATS_EVENTS: usize = 8;
const STATS_SIZE: usize = (STATS_REASONS + STATS_EVENTS) * 8;
/// Layout 7's connection-table key: tag (32 bits), incarnation (12), id (20).
const ID_BITS: u32 = 20;
const INCARNATION_BITS: u32 = 12;
/// One slot: key (8), ports (4), expires (4); four per set.
const SLOT: usize = 16;
/// Layout 8's `DataplaneConfig` size and `Stats`: 16 reasons, then 16 event
/// slots.
const V8_CONFIG_SIZE: usize = 80;
const V8_STATS_REASONS: usize = 16;
const V8_STATS_EVENTS: usize = 16;
const V8_STATS_SIZE: usize = (V8_STATS_REASONS + V8_STATS_EVENTS) * 8;

/// The old maps have layout 7's shapes and the config's capacities (the
/// shapes of this build's, but for the two maps that changed).
fn check(image: &StateImage, settings: &BalancerSettings) -> Result<(), String> {
    pinning::check_image(
        image,
        settings,
        7,
        |name| match name {
            lb_common::map_name::CONFIG => Some(CONFIG_SIZE),
            lb_common::map_name::STATS => Some(STATS_SIZE),
            _ => None,
        },
        &[
            lb_common::map_name::TABLE_GEN,
            lb_common::map_name::ACTIVE,
            lb_common::map_name::VIP_ACTIVE,
            lb_common::map_name::PREV,
        ],
    )
}

/// A layout-7 connection-table key in layout 8: the incarnation's low 11
/// bits, the closing bit clear (layout 7 did not track FINs).
fn key(old: u64) -> u64 {
    if old == 0 {
        return 0;
    }
    let low = old as u32;
    let id = low & ((1 << ID_BITS) - 1);
    let incarnation = (low >> ID_BITS) & ((1 << INCARNATION_BITS) - 1);
    (old & 0xFFFF_FFFF_0000_0000) | u64::from(lb_common::FlowSlot::key(0, id, incarnation) as u32)
}

fn convert(mut image: StateImage, notes: &mut Vec<MapNote>) -> Result<StateImage, String> {
    let mut note = |map: &str, what: String| {
        notes.push(MapNote {
            map: map.to_string(),
            what,
        })
    };
    for (name, m) in image.maps.iter_mut() {
        match name.as_str() {
            lb_common::map_name::FLOWS | lb_common::map_name::SYN_FLOWS => {
                let mut flows = 0usize;
                for (_, set) in m.entries.iter_mut() {
                    for slot in set.chunks_exact_mut(SLOT) {
                        let old = u64::from_ne_bytes(slot[..8].try_into().expect("8 bytes"));
                        if old != 0 {
                            flows += 1;
                        }
                        slot[..8].copy_from_slice(&key(old).to_ne_bytes());
                    }
                }
                note(
                    name,
                    format!(
                        "{flows} entries converted (11 incarnation bits, not closing: layout 7 did not see FINs)"
                    ),
                );
            }
            lb_common::map_name::CONFIG => {
                for (_, v) in m.entries.iter_mut() {
                    let mut new = vec![0u8; V8_CONFIG_SIZE];
                    new[..CONFIG_KEPT].copy_from_slice(&v[..CONFIG_KEPT]);
                    new[lb_common::LAYOUT_VERSION_OFFSET..lb_common::LAYOUT_VERSION_OFFSET + 4]
                        .copy_from_slice(&8u32.to_ne_bytes());
                    *v = new;
                }
                m.value_size = V8_CONFIG_SIZE;
                note(
                    name,
                    "settings carried (the closing timeout is written at start)".into(),
                );
            }
            lb_common::map_name::STATS => {
                for (_, v) in m.entries.iter_mut() {
                    let mut new = Vec::with_capacity(V8_STATS_SIZE * m.per_cpu);
                    for cpu in v.chunks_exact(STATS_SIZE) {
                        let mut s = [0u8; V8_STATS_SIZE];
                        s[..STATS_REASONS * 8].copy_from_slice(&cpu[..STATS_REASONS * 8]);
                        let events = V8_STATS_REASONS * 8;
                        s[events..events + STATS_EVENTS * 8]
                            .copy_from_slice(&cpu[STATS_REASONS * 8..]);
                        new.extend(s);
                    }
                    *v = new;
                }
                m.value_size = V8_STATS_SIZE;
                note(name, "counters carried (the new events start at 0)".into());
            }
            _ => note(
                name,
                format!("{} entries carried as they are", m.entries.len()),
            ),
        }
    }
    Ok(image)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_keep_tag_id_and_the_incarnations_low_bits() {
        let old = 0xdead_beef_0000_0000u64 | (0xabc << 20) | 0x1_2345;
        let new = key(old);
        assert_eq!(new >> 32, 0xdead_beef);
        assert_eq!(lb_common::FlowSlot::backend_id(new), 0x1_2345);
        assert!(lb_common::FlowSlot::same_incarnation(new, 0xabc));
        assert!(!lb_common::FlowSlot::closing(new));
        assert_eq!(key(0), 0);
    }
}
