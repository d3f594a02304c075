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
        &[
            lb_common::map_name::ACTIVE,
            lb_common::map_name::VIP_ACTIVE,
            lb_common::map_name::PREV,
        ],
    )
}

fn convert(image: StateImage, notes: &mut Vec<MapNote>) -> Result<StateImage, String> {
    Ok(super::carry_unchanged(
        image,
        11,
        &[lb_common::map_name::ACTIVE, lb_common::map_name::VIP_ACTIVE],
        "starts at 0 (the first sweep counts the flows)",
        notes,
    ))
}
