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
            lb_common::map_name::PREV,
        ],
    )
}

fn convert(image: StateImage, notes: &mut Vec<MapNote>) -> Result<StateImage, String> {
    Ok(super::carry_unchanged(
        image,
        10,
        &[lb_common::map_name::TABLE_GEN],
        "starts at 0",
        notes,
    ))
}
