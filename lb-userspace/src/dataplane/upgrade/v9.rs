//! Layout 9 (the data-path findings: commit 47f24ea), and its conversion to
//! layout 10.
//!
//! What changed in 10: a new map, `LB_TABLE_GEN` (the table-write
//! generation, see `lb_common::TABLE_GEN_DOC`); every map of layout 9 is
//! the same. The new map starts at 0 (no write open).

use super::{Converter, MapNote};
use crate::{
    dataplane::{image::StateImage, pinning},
    desired::config::BalancerSettings,
};

pub(super) const CONVERTER: Converter = Converter {
    from: 9,
    check,
    convert,
};

/// The old maps have layout 9's shapes (this build's but for the map it
/// added) and the config's capacities.
fn check(image: &StateImage, settings: &BalancerSettings) -> Result<(), String> {
    pinning::check_image(
        image,
        settings,
        9,
        |_| None,
        &[
            lb_common::map_name::TABLE_GEN,
            lb_common::map_name::ACTIVE,
            lb_common::map_name::VIP_ACTIVE,
        ],
    )
}

fn convert(mut image: StateImage, notes: &mut Vec<MapNote>) -> Result<StateImage, String> {
    for (name, m) in image.maps.iter_mut() {
        if name == lb_common::map_name::CONFIG {
            for (_, v) in m.entries.iter_mut() {
                v[lb_common::LAYOUT_VERSION_OFFSET..lb_common::LAYOUT_VERSION_OFFSET + 4]
                    .copy_from_slice(&10u32.to_ne_bytes());
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
    notes.push(MapNote {
        map: lb_common::map_name::TABLE_GEN.into(),
        what: "new in layout 10: starts at 0".into(),
    });
    Ok(image)
}
