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
