//! Layout 8 (the connection table of the reliability work: commit
//! 3d563ce), and its conversion to layout 9.
//!
//! What changed in 9: `Stats` has 32 reason slots (was 16: 256 → 384
//! bytes), for `not_our_mac` and reasons to come. Every other map is the
//! same.
//!
//! Everything this module knows of layout 8 is written out here, frozen.

use super::{Converter, MapNote};
use crate::{
    dataplane::{image::StateImage, pinning},
    desired::config::BalancerSettings,
};

pub(super) const CONVERTER: Converter = Converter {
    from: 8,
    check,
    convert,
};

/// Layout 8's `Stats`: 16 reasons, then 16 event slots, all `u64`.
const STATS_REASONS: usize = 16;
const STATS_EVENTS: usize = 16;
const STATS_SIZE: usize = (STATS_REASONS + STATS_EVENTS) * 8;
/// Layout 9's: 32 reason slots, then the same 16 event slots.
const V9_STATS_REASONS: usize = 32;
const V9_STATS_SIZE: usize = (V9_STATS_REASONS + STATS_EVENTS) * 8;

/// The old maps have layout 8's shapes and the config's capacities.
fn check(image: &StateImage, settings: &BalancerSettings) -> Result<(), String> {
    pinning::check_image(
        image,
        settings,
        8,
        |name| (name == lb_common::map_name::STATS).then_some(STATS_SIZE),
        &[
            lb_common::map_name::TABLE_GEN,
            lb_common::map_name::ACTIVE,
            lb_common::map_name::VIP_ACTIVE,
            lb_common::map_name::PREV,
        ],
    )
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
            lb_common::map_name::STATS => {
                for (_, v) in m.entries.iter_mut() {
                    let mut new = Vec::with_capacity(V9_STATS_SIZE * m.per_cpu);
                    for cpu in v.chunks_exact(STATS_SIZE) {
                        let mut s = [0u8; V9_STATS_SIZE];
                        s[..STATS_REASONS * 8].copy_from_slice(&cpu[..STATS_REASONS * 8]);
                        s[V9_STATS_REASONS * 8..].copy_from_slice(&cpu[STATS_REASONS * 8..]);
                        new.extend(s);
                    }
                    *v = new;
                }
                m.value_size = V9_STATS_SIZE;
                note(name, "counters carried (the new reasons start at 0)".into());
            }
            lb_common::map_name::CONFIG => {
                for (_, v) in m.entries.iter_mut() {
                    v[lb_common::LAYOUT_VERSION_OFFSET..lb_common::LAYOUT_VERSION_OFFSET + 4]
                        .copy_from_slice(&9u32.to_ne_bytes());
                }
                note(name, "settings carried".into());
            }
            lb_common::map_name::FLOWS | lb_common::map_name::SYN_FLOWS => {
                note(
                    name,
                    format!("{} entries carried as they are", super::flow_entries(m)),
                );
            }
            _ => note(
                name,
                format!("{} entries carried as they are", m.entries.len()),
            ),
        }
    }
    Ok(image)
}
