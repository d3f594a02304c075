//! Keys and capacities of the decapsulator's maps.

use core::mem::size_of;

/// Capacity of the decapsulator's address map.
pub const DECAP_MAX_ADDRS: u32 = 256;

/// An address of this host (key of the decapsulator's address map).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct HostAddr {
    pub addr: [u32; 4],
    pub family: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(size_of::<HostAddr>() == 20);

/// Capacity of the decapsulator's map of candidates waiting for their
/// neighbour entry (`LB_DECAP_WANTED`).
pub const DECAP_MAX_WANTED: u32 = 256;

/// Flag of the decapsulator's settings (`LB_DECAP_CONFIG`, one `u32`): send
/// packets of connections this host does not have on to their second-chance
/// candidate (`lbd decap --second-chance`). Without it, packets with the
/// option are decapsulated like any other, with no socket lookup.
pub const DECAP_SECOND_CHANCE: u32 = 1;
