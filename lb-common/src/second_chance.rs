//! The second chance: a flow that reaches the balancer without an entry
//! still reaches the backend that has it.
//!
//! A TCP packet that is not a SYN and that neither flow table knows
//! belongs to a connection that started elsewhere or earlier: on another
//! balancer (ECMP moved it), or on this one before its entry was evicted or
//! the table was emptied. The scheduler sends it to the backend the VIP's
//! table gives *now*; if the table moved since the connection began, that
//! backend does not have it and would answer with a reset.
//!
//! So every VIP table has a *previous* table beside it (`LB_PREV`, indexed
//! like `LB_MAGLEV`): at each position, the backend the position held
//! before its last move. `lbd` keeps it (see
//! `lb-userspace/src/dataplane/tables.rs`) and holds every position that
//! moved for `churn_hold` before it may move again for load, so over any
//! window of `churn_hold` a position has held at most two backends: the
//! current one and the previous one. A packet of a connection that started
//! within `churn_hold` is therefore on one of the two. The balancer sends
//! such a packet to the current one and names the previous one, the
//! *candidate*, in the outer header; it records no entry for it (every
//! packet of the flow carries the candidate). The backend's decapsulator
//! (`lbd decap`) looks the connection up among its sockets; if it has none
//! and the packet is not a SYN, it sends the packet on to the candidate,
//! once: the option is then marked [`SC_FORWARDED`], and a forwarded packet
//! is never sent on again.
//!
//! Only `maglev` and `maglev-src` VIPs have candidates: their choice is a
//! function of the packet and the table. (`wrr`, `least-load` and
//! `least-conn` choices are not, so a flow without an entry has nothing to
//! go back to.) UDP packets carry no candidate: an unconnected UDP service
//! has no socket per flow for the backend to look up.
//!
//! # On the wire
//! The outer header is the same IPIP / IPv6-in-IP as always, with an
//! option (RFC 4727's experimental type `0x1e`: in IPv4 not copied, class
//! 0; in IPv6 "skip if unknown", not changed en route), so a backend whose
//! kernel decapsulates (`ipip`, `ip6_tunnel`) ignores it and takes the
//! packet as before:
//!
//! - IPv4 outer: an 8-byte option after the 20-byte header (IHL 7):
//!   `[0x1e, 8, flags, 0, candidate (4 bytes)]`.
//! - IPv6 outer: a 24-byte destination options header between the outer
//!   header and the inner packet (next header 60):
//!   `[next header, 2, 0x01, 0x00 (PadN), 0x1e, 18, flags, 0, candidate
//!   (16 bytes)]`.
//!
//! The candidate has the family of the outer header (a candidate of the
//! other family is not named). A packet that would exceed the balancer's
//! `mtu` with the option goes without it (the MTU check, and an ICMP "too
//! big" answer, are those of the plain tunnel). Routers on the way may take packets with
//! IPv4 options or IPv6 extension headers off their fast path; only packets
//! of flows being saved carry one.

use core::mem::size_of;

/// Option type of the second-chance option, IPv4 and IPv6 (RFC 4727).
pub const SC_OPTION_TYPE: u8 = 0x1e;
/// Option flag: a backend already sent this packet on to its candidate.
pub const SC_FORWARDED: u8 = 1;
/// IP protocol number of the IPv6 destination options header.
pub const PROTO_DSTOPTS: u8 = 60;

/// The IPv4 option (8 bytes, after the outer IPv4 header).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ScOptionV4 {
    /// [`SC_OPTION_TYPE`].
    pub kind: u8,
    /// 8.
    pub len: u8,
    /// `SC_*` flags.
    pub flags: u8,
    pub reserved: u8,
    /// The candidate's address (network-order word).
    pub candidate: u32,
}
const _: () = assert!(size_of::<ScOptionV4>() == 8);
/// [`ScOptionV4::len`].
pub const SC_V4_LEN: u8 = 8;

/// The IPv6 destination options header (24 bytes, after the outer IPv6
/// header).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ScDestOptsV6 {
    /// What follows: `PROTO_IPIP` or `PROTO_IPV6`.
    pub next_hdr: u8,
    /// Length in 8-byte units after the first 8: 2.
    pub hdr_ext_len: u8,
    /// A PadN option of no data: `[1, 0]`.
    pub pad: [u8; 2],
    /// [`SC_OPTION_TYPE`].
    pub kind: u8,
    /// Option data length: 18.
    pub len: u8,
    /// `SC_*` flags.
    pub flags: u8,
    pub reserved: u8,
    /// The candidate's address words.
    pub candidate: [u32; 4],
}
const _: () = assert!(size_of::<ScDestOptsV6>() == 24);
/// [`ScDestOptsV6::hdr_ext_len`].
pub const SC_V6_EXT_LEN: u8 = 2;
/// [`ScDestOptsV6::len`].
pub const SC_V6_LEN: u8 = 18;
/// [`ScDestOptsV6::pad`].
pub const SC_V6_PAD: [u8; 2] = [1, 0];

/// Default `[vip.load] churn_hold`, seconds: how long a table position that
/// moved stays where it is before load steering may move it again (a
/// position whose backend left the table moves at once).
pub const DEFAULT_CHURN_HOLD_SECS: u32 = 60;
