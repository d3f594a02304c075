//! Layout 10 (declarative control: commit 87fd866), and its conversion to
//! layout 11.
//!
//! What changed in 11: two new maps, `LB_ACTIVE` and `LB_VIP_ACTIVE` (active
//! flows, see `lb_common::ActiveFlows`), and the `BACKEND_COUNTED` flag,
//! which no layout-10 backend has (no layout-10 VIP schedules on active
//! flows); every map of layout 10 is the same. The new maps start at 0:
//! the first sweep counts the flows, and a VIP that then turns to
//! `least-conn` starts from those counts.

use super::{Converter, MapNote};
use crate::{
    dataplane::{image::StateImage, pinning},
    desired::config::BalancerSettings,
};

pub(super) const CONVERTER: Converter = Converter {
    from: 10,
    check,
    convert,
};

/// The old maps have layout 10's shapes (this build's but for the maps it
/// added) and the config's capacities.
fn check(image: &StateImage, settings: &BalancerSettings) -> Result<(), String> {
    pinning::check_image(
        image,
        settings,
        10,
        |_| None,
        &[lb_common::map_name::ACTIVE, lb_common::map_name::VIP_ACTIVE],
    )
}

fn convert(mut image: StateImage, notes: &mut Vec<MapNote>) -> Result<StateImage, String> {
    for (name, m) in image.maps.iter_mut() {
        if name == lb_common::map_name::CONFIG {
            for (_, v) in m.entries.iter_mut() {
                v[lb_common::LAYOUT_VERSION_OFFSET..lb_common::LAYOUT_VERSION_OFFSET + 4]
                    .copy_from_slice(&11u32.to_ne_bytes());
            }
            notes.push(MapNote {
                map: name.clone(),
                what: "settings carried".into(),
            });
        } else {
            let what =
                if name == lb_common::map_name::FLOWS || name == lb_common::map_name::SYN_FLOWS {
                    // One slot: key (8), ports (4), expires (4).
                    let flows = m
                        .entries
                        .iter()
                        .flat_map(|(_, set)| set.chunks_exact(16))
                        .filter(|slot| slot[..8] != [0; 8])
                        .count();
                    format!("{flows} entries carried as they are")
                } else {
                    format!("{} entries carried as they are", m.entries.len())
                };
            notes.push(MapNote {
                map: name.clone(),
                what,
            });
        }
    }
    for map in [lb_common::map_name::ACTIVE, lb_common::map_name::VIP_ACTIVE] {
        notes.push(MapNote {
            map: map.into(),
            what: "new in layout 11: starts at 0 (the first sweep counts the flows)".into(),
        });
    }
    Ok(image)
}
