//! Types shared by the XDP programs (`lb-ebpf`) and the controller
//! (`lb-userspace`): map keys and values, capacities, map names, the
//! pass/drop reasons and the flow hash.
//!
//! Every map type is `#[repr(C)]` with explicit padding and a compile-time
//! size assert, so kernel and user space agree byte for byte.
//!
//! Addresses are stored as four `u32` words holding the address bytes in
//! network order exactly as they sit in the packet (`u32::from_ne_bytes` of
//! each group of four octets); an IPv4 address uses the first word and leaves
//! the others zero. Ports are likewise kept in network byte order. The data
//! plane never swaps bytes; user space converts once with [`addr_words`].
#![no_std]

mod active;
mod balancer;
mod conntrack;
mod decap;
mod flow;
mod names;
mod reason;
mod second_chance;

#[cfg(not(target_arch = "bpf"))]
pub use active::cap_limit;
pub use active::{
    ACTIVE_MAP_FLAGS, ACTIVE_PROBES, ActiveFlows, BACKEND_COUNTED, FLOW_UNIT, VipActive,
    fewer_per_weight, over_cap,
};
pub use balancer::*;
pub use conntrack::{
    FLOW_BUSY, FLOW_CLOSING, FLOW_EVENT_COUNT, FLOW_ID_BITS, FLOW_INCARNATION_BITS, FLOW_WAYS,
    FlowEvent, FlowSet, FlowSlot, MAX_BACKEND_IDS, SYN_SEEN_WORDS, flow_set, flow_sets,
    idle_jiffies, renew_after, syn_seen_slot, syn_slots,
};
pub use decap::{DECAP_MAX_ADDRS, DECAP_MAX_WANTED, DECAP_SECOND_CHANCE, HostAddr};
pub use flow::{
    FLOW_HASH_VERSION, FlowKey, flow_hash, flow_hash64, maglev_position, mix64, second_choice,
    source_hash,
};
pub use names::{decap_map_name, decap_program_name, map_name, program_name};
pub use reason::{DECAP_REASON_COUNT, DecapReason, REASON_COUNT, Reason, xdp_action};
pub use second_chance::{
    DEFAULT_CHURN_HOLD_SECS, PROTO_DSTOPTS, SC_FORWARDED, SC_OPTION_TYPE, SC_V4_LEN, SC_V6_EXT_LEN,
    SC_V6_LEN, SC_V6_PAD, ScDestOptsV6, ScOptionV4,
};

use core::net::IpAddr;

/// Address family tag for IPv4 in keys and values.
pub const FAMILY_V4: u8 = 4;
/// Address family tag for IPv6 in keys and values.
pub const FAMILY_V6: u8 = 6;

/// IP protocol number of TCP.
pub const PROTO_TCP: u8 = 6;
/// IP protocol number of UDP.
pub const PROTO_UDP: u8 = 17;
/// IP protocol number of IPv4-in-IP encapsulation.
pub const PROTO_IPIP: u8 = 4;
/// IP protocol number of IPv6-in-IP encapsulation.
pub const PROTO_IPV6: u8 = 41;

/// The address family tag and the four network-order words of `addr`.
#[inline]
pub fn addr_words(addr: IpAddr) -> (u8, [u32; 4]) {
    match addr {
        IpAddr::V4(a) => (FAMILY_V4, [u32::from_ne_bytes(a.octets()), 0, 0, 0]),
        IpAddr::V6(a) => {
            let o = a.octets();
            let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            (FAMILY_V6, [w(0), w(4), w(8), w(12)])
        }
    }
}

/// The address held in `words` for family `family` (inverse of [`addr_words`]).
#[inline]
pub fn words_addr(family: u8, words: [u32; 4]) -> IpAddr {
    if family == FAMILY_V4 {
        IpAddr::V4(words[0].to_ne_bytes().into())
    } else {
        let mut o = [0u8; 16];
        for (i, w) in words.iter().enumerate() {
            o[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
        }
        IpAddr::V6(o.into())
    }
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are `repr(C)`, made of integers only, and have no
    // implicit padding (size asserts next to each pin their layout).
    unsafe impl aya::Pod for VipKey {}
    unsafe impl aya::Pod for VipAddrKey {}
    unsafe impl aya::Pod for VipInfo {}
    unsafe impl aya::Pod for BackendInfo {}
    unsafe impl aya::Pod for MaglevChunk {}
    unsafe impl aya::Pod for DataplaneConfig {}
    unsafe impl aya::Pod for Globals {}
    unsafe impl aya::Pod for NextHop {}
    unsafe impl aya::Pod for TrafficCounters {}
    unsafe impl aya::Pod for Stats {}
    unsafe impl aya::Pod for BenchControl {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for FlowSet {}
    unsafe impl aya::Pod for HostAddr {}
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;

    #[test]
    fn addr_words_round_trip() {
        for a in ["192.0.2.7", "2001:db8::1:2", "::", "255.255.255.255"] {
            let addr: IpAddr = a.parse().unwrap();
            let (f, w) = addr_words(addr);
            assert_eq!(words_addr(f, w), addr);
        }
    }

    #[test]
    fn ipv4_word_holds_packet_bytes() {
        let (_, w) = addr_words("10.1.2.3".parse().unwrap());
        assert_eq!(w[0].to_ne_bytes(), [10, 1, 2, 3]);
        assert_eq!(&w[1..], &[0, 0, 0]);
    }
}
