//! Why the balancer gave a packet its verdict. Every packet the balancer sees
//! counts exactly one reason, so the reason counters add up to the packets
//! seen, and the verdict is a function of the reason (one table, below).

/// XDP verdicts (`enum xdp_action` of the kernel UAPI).
pub mod xdp_action {
    pub const XDP_ABORTED: u32 = 0;
    pub const XDP_DROP: u32 = 1;
    pub const XDP_PASS: u32 = 2;
    pub const XDP_TX: u32 = 3;
    pub const XDP_REDIRECT: u32 = 4;
}

/// The outcome of one packet. Index of `Stats::reasons` (`LB_STATS`).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    /// Encapsulated towards its backend: `XDP_TX`.
    Forwarded = 0,
    /// Not IPv4 or IPv6 (ARP, LLDP, a second VLAN tag, ...): `XDP_PASS`.
    NotIp = 1,
    /// IP, but neither TCP nor UDP (ICMP, ...): `XDP_PASS`.
    NotTcpUdp = 2,
    /// TCP/UDP to an address, port and protocol that is no VIP: `XDP_PASS`.
    NotVip = 3,
    /// An IPv4 fragment or IPv6 fragment header: `XDP_PASS` (not to a VIP
    /// address, or `balancer.fragments = "pass"`; ports are unknown, never
    /// guess a backend).
    Fragment = 4,
    /// IPv6 with more extension headers before L4 than the balancer walks
    /// (see `MAX_IPV6_EXT_HEADERS`), a routing header with segments left,
    /// or AH/ESP/mobility/HIP/shim6: `XDP_PASS`.
    Ipv6ExtHeader = 5,
    /// Truncated or invalid L2/L3/L4 header: `XDP_DROP`.
    Malformed = 6,
    /// A VIP whose table has no backend (none configured, all weight 0): `XDP_DROP`.
    NoBackend = 7,
    /// The encapsulated packet would exceed the configured MTU: `XDP_DROP`.
    TooBig = 8,
    /// No route or neighbour towards the backend via the ingress interface: `XDP_DROP`.
    FibFailed = 9,
    /// No headroom for the outer header: `XDP_DROP`.
    EncapFailed = 10,
    /// An ICMP echo request to a VIP address, answered by the balancer
    /// (`balancer.icmp_echo`): `XDP_TX`.
    IcmpEchoReply = 11,
    /// An ICMP "fragmentation needed" / ICMPv6 "packet too big" about a VIP
    /// flow, encapsulated to the backend that owns the flow: `XDP_TX`.
    IcmpForwarded = 12,
    /// Too big once encapsulated, and answered with "fragmentation needed" /
    /// "packet too big" to the client (`balancer.too_big = "icmp"`): `XDP_TX`.
    TooBigIcmpSent = 13,
    /// An IPv4 fragment or IPv6 fragment header to a VIP address, dropped
    /// (`balancer.fragments = "drop"`, the default): `XDP_DROP`.
    FragmentDropped = 14,
    /// An ICMP "too big" error about a VIP flow no backend can be found for
    /// (no connection-table entry, and a scheduler that cannot recompute
    /// it): `XDP_DROP`.
    IcmpUnmatched = 15,
    /// To a VIP address, but in a frame not addressed to the balancer: its
    /// destination MAC is neither the interface's nor one of
    /// `balancer.extra_macs` (unicast for another host that a switch
    /// flooded, broadcast, multicast): `XDP_PASS` (the stack drops what is
    /// not its own). Never sent to a backend, which would get a duplicate.
    NotOurMac = 16,
    /// A TCP SYN of a new connection to a VIP whose backends are all past
    /// their load limits, dropped by `on_saturated = "shed"` (its share of
    /// SYNs, see `VipInfo::shed`): `XDP_DROP`. The client's TCP sends it
    /// again, so the connection waits at the client instead of in a
    /// backend's queue.
    Shed = 17,
}

/// Number of [`Reason`]s (see `REASON_SLOTS` for their counters).
pub const REASON_COUNT: u32 = 18;

impl Reason {
    /// Every reason, in index order.
    pub const ALL: [Reason; REASON_COUNT as usize] = [
        Reason::Forwarded,
        Reason::NotIp,
        Reason::NotTcpUdp,
        Reason::NotVip,
        Reason::Fragment,
        Reason::Ipv6ExtHeader,
        Reason::Malformed,
        Reason::NoBackend,
        Reason::TooBig,
        Reason::FibFailed,
        Reason::EncapFailed,
        Reason::IcmpEchoReply,
        Reason::IcmpForwarded,
        Reason::TooBigIcmpSent,
        Reason::FragmentDropped,
        Reason::IcmpUnmatched,
        Reason::NotOurMac,
        Reason::Shed,
    ];

    /// The verdict the balancer returns for a packet with this reason.
    #[inline(always)]
    pub const fn action(self) -> u32 {
        match self {
            Reason::Forwarded
            | Reason::IcmpEchoReply
            | Reason::IcmpForwarded
            | Reason::TooBigIcmpSent => xdp_action::XDP_TX,
            Reason::NotIp
            | Reason::NotTcpUdp
            | Reason::NotVip
            | Reason::Fragment
            | Reason::Ipv6ExtHeader
            | Reason::NotOurMac => xdp_action::XDP_PASS,
            Reason::Malformed
            | Reason::NoBackend
            | Reason::TooBig
            | Reason::FibFailed
            | Reason::EncapFailed
            | Reason::FragmentDropped
            | Reason::IcmpUnmatched
            | Reason::Shed => xdp_action::XDP_DROP,
        }
    }

    /// Label value used in metrics and CLI output.
    pub const fn name(self) -> &'static str {
        match self {
            Reason::Forwarded => "forwarded",
            Reason::NotIp => "not_ip",
            Reason::NotTcpUdp => "not_tcp_udp",
            Reason::NotVip => "not_vip",
            Reason::Fragment => "fragment",
            Reason::Ipv6ExtHeader => "ipv6_ext_header",
            Reason::Malformed => "malformed",
            Reason::NoBackend => "no_backend",
            Reason::TooBig => "too_big",
            Reason::FibFailed => "fib_failed",
            Reason::EncapFailed => "encap_failed",
            Reason::IcmpEchoReply => "icmp_echo_reply",
            Reason::IcmpForwarded => "icmp_forwarded",
            Reason::TooBigIcmpSent => "too_big_icmp_sent",
            Reason::FragmentDropped => "fragment_dropped",
            Reason::IcmpUnmatched => "icmp_unmatched",
            Reason::NotOurMac => "not_our_mac",
            Reason::Shed => "shed",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_is_in_index_order() {
        for (i, r) in Reason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
        }
    }

    #[test]
    fn no_reason_aborts() {
        for r in Reason::ALL {
            assert_ne!(r.action(), xdp_action::XDP_ABORTED, "{r:?}");
        }
    }
}

/// What the decapsulator did with a packet. Index of `LB_DECAP_STATS`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DecapReason {
    /// IPIP / IPv6-in-IP to this host: outer header removed, `XDP_PASS`.
    Decapsulated = 0,
    /// Not an IPIP / IPv6-in-IP packet: `XDP_PASS`, untouched.
    NotTunnel = 1,
    /// A tunnel packet to an address that is not this host's: `XDP_PASS`, untouched.
    NotLocal = 2,
    /// A tunnel packet to this host with a bad outer or inner header
    /// (lengths, versions, an outer fragment): `XDP_DROP`.
    Malformed = 3,
    /// A TCP packet with a second-chance candidate (see
    /// `crate::second_chance`) of a connection this host does not have:
    /// sent on to the candidate, re-encapsulated, `XDP_TX`.
    Forwarded = 4,
    /// A TCP packet with the second-chance option, of a connection this
    /// host does not have, and no candidate left (the packet was forwarded
    /// once already, or names this host): decapsulated and passed to the
    /// stack, which resets it.
    NoCandidate = 5,
    /// As [`DecapReason::Forwarded`], but no route to the candidate out of
    /// the interface the packet came in on: decapsulated and passed.
    ForwardFailed = 6,
    /// As [`DecapReason::Forwarded`], but the next hop towards the
    /// candidate has no resolved neighbour entry yet: `XDP_DROP` (TCP sends
    /// the packet again), and `lbd decap` asks the kernel to resolve it.
    NeighbourPending = 7,
}

/// Number of [`DecapReason`]s.
pub const DECAP_REASON_COUNT: u32 = 8;

impl DecapReason {
    /// Every reason, in index order.
    pub const ALL: [DecapReason; DECAP_REASON_COUNT as usize] = [
        DecapReason::Decapsulated,
        DecapReason::NotTunnel,
        DecapReason::NotLocal,
        DecapReason::Malformed,
        DecapReason::Forwarded,
        DecapReason::NoCandidate,
        DecapReason::ForwardFailed,
        DecapReason::NeighbourPending,
    ];

    /// The verdict for a packet with this reason.
    #[inline(always)]
    pub const fn action(self) -> u32 {
        match self {
            DecapReason::Malformed | DecapReason::NeighbourPending => xdp_action::XDP_DROP,
            DecapReason::Forwarded => xdp_action::XDP_TX,
            _ => xdp_action::XDP_PASS,
        }
    }

    /// Label value used in metrics and logs.
    pub const fn name(self) -> &'static str {
        match self {
            DecapReason::Decapsulated => "decapsulated",
            DecapReason::NotTunnel => "not_tunnel",
            DecapReason::NotLocal => "not_local",
            DecapReason::Malformed => "malformed",
            DecapReason::Forwarded => "forwarded",
            DecapReason::NoCandidate => "no_candidate",
            DecapReason::ForwardFailed => "forward_failed",
            DecapReason::NeighbourPending => "neighbour_pending",
        }
    }
}
