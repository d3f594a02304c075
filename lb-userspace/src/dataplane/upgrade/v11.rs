//! Layout 11 (active flows: commit 0dd33d9), and its conversion to layout
//! 12.
//!
//! What changed in 12: one new map, `LB_PREV` (the previous tables, see
//! `lb_common::second_chance`), and the `VIP_SECOND_CHANCE` flag, which no
//! layout-11 VIP has; every map of layout 11 is the same. The new map
//! starts at 0 and is not read until lbd writes a VIP with the flag, and
//! with it that VIP's previous table (a VIP adopted without the flag has
//! no previous backends: it names candidates for moves from then on).

use super::{Converter, MapNote};
use crate::{
    dataplane::{image::StateImage, pinning},
    desired::config::BalancerSettings,
};

pub(super) const CONVERTER: Converter = Converter {
    from: 11,
    check,
    convert,
};

/// The old maps have layout 11's shapes (this build's but for the map it
/// added) and the config's capacities.
fn check(image: &StateImage, settings: &BalancerSettings) -> Result<(), String> {
    pinning::check_image(image, settings, 11, |_| None, &[lb_common::map_name::PREV])
}

fn convert(image: StateImage, notes: &mut Vec<MapNote>) -> Result<StateImage, String> {
    Ok(super::carry_unchanged(
        image,
        12,
        &[lb_common::map_name::PREV],
        "starts empty (the VIPs' previous backends begin with their next table change)",
        notes,
    ))
}
