//! The balancer's domain: VIPs, their backends and weights.

use std::{fmt, net::IpAddr, str::FromStr, time::Duration};

use lb_common::{PROTO_TCP, PROTO_UDP, VipKey, addr_words};

use crate::desired::policy::{AllDownPolicy, HealthCheck, HealthConfig, LoadConfig, LoadPolicy};

/// Transport protocol of a VIP.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => PROTO_TCP,
            Protocol::Udp => PROTO_UDP,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

impl FromStr for Protocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "tcp" => Ok(Protocol::Tcp),
            "udp" => Ok(Protocol::Udp),
            _ => Err(format!(
                "unknown protocol {s:?} (expected \"tcp\" or \"udp\")"
            )),
        }
    }
}

/// What identifies a VIP: destination address, port (0 = any) and protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VipAddr {
    pub addr: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
}

impl VipAddr {
    /// The data plane's key for this VIP.
    pub fn key(&self) -> VipKey {
        let (family, addr) = addr_words(self.addr);
        VipKey {
            addr,
            port: u16::from_ne_bytes(self.port.to_be_bytes()),
            proto: self.protocol.number(),
            family,
        }
    }
}

/// `203.0.113.10:443/tcp`, `[2001:db8::10]:443/tcp`.
impl fmt::Display for VipAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.addr {
            IpAddr::V4(a) => write!(f, "{a}:{}/{}", self.port, self.protocol),
            IpAddr::V6(a) => write!(f, "[{a}]:{}/{}", self.port, self.protocol),
        }
    }
}

impl VipAddr {
    /// The VIP as one URL path segment: `ADDRESS-PORT-PROTOCOL`, e.g.
    /// `203.0.113.10-443-tcp`, `2001:db8::10-443-tcp`.
    pub fn path_segment(&self) -> String {
        format!("{}-{}-{}", self.addr, self.port, self.protocol)
    }

    /// Parses [`VipAddr::path_segment`].
    pub fn from_path_segment(s: &str) -> Result<VipAddr, String> {
        let bad = || format!("{s:?}: expected ADDRESS-PORT-PROTOCOL, e.g. 203.0.113.10-443-tcp");
        let (rest, proto) = s.rsplit_once('-').ok_or_else(bad)?;
        let (addr, port) = rest.rsplit_once('-').ok_or_else(bad)?;
        Ok(VipAddr {
            addr: addr
                .parse()
                .map_err(|_| format!("{addr:?} is not an IPv4 or IPv6 address"))?,
            port: port
                .parse()
                .map_err(|_| format!("{port:?} is not a port (0..=65535)"))?,
            protocol: proto.parse()?,
        })
    }
}

impl FromStr for VipAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (sock, proto) = s.rsplit_once('/').ok_or_else(|| {
            format!("{s:?}: expected ADDRESS:PORT/PROTOCOL, e.g. 203.0.113.10:443/tcp")
        })?;
        let protocol = proto.parse()?;
        let sock: std::net::SocketAddr = sock
            .parse()
            .map_err(|_| format!("{sock:?}: expected ADDRESS:PORT (IPv6 as [ADDRESS]:PORT)"))?;
        Ok(VipAddr {
            addr: sock.ip(),
            port: sock.port(),
            protocol,
        })
    }
}

/// A backend of a VIP: where its share of flows is encapsulated to.
#[derive(Clone, Debug, PartialEq)]
pub struct Backend {
    pub addr: IpAddr,
    /// Relative share of new flows; 0 = none.
    pub weight: u32,
    /// Drained: no new flows (its established flows continue); `weight` is
    /// kept for when it is undrained.
    pub drained: bool,
    /// Fields of the VIP's health check this backend overrides.
    pub health: HealthConfig,
    /// Fields of the VIP's load policy this backend overrides.
    pub load: LoadConfig,
}

impl Backend {
    /// A backend in service with `weight`.
    pub fn new(addr: IpAddr, weight: u32) -> Backend {
        Backend {
            addr,
            weight,
            drained: false,
            health: HealthConfig::default(),
            load: LoadConfig::default(),
        }
    }

    /// The weight the Maglev table is built with: 0 while drained.
    pub fn effective_weight(&self) -> u32 {
        if self.drained { 0 } else { self.weight }
    }
}

/// What happens to a flow whose backend health checks mark down.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum DownPolicy {
    /// Schedule it again: it goes to a healthy backend (its connection
    /// there will be reset by the new backend, but it fails fast).
    #[default]
    Reschedule,
    /// Keep sending it to the down backend (for backends that are
    /// "down" for new work but still finish what they have).
    Stick,
}

impl fmt::Display for DownPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DownPolicy::Reschedule => "reschedule",
            DownPolicy::Stick => "stick",
        })
    }
}

impl FromStr for DownPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "reschedule" => Ok(DownPolicy::Reschedule),
            "stick" => Ok(DownPolicy::Stick),
            _ => Err(format!(
                "unknown policy {s:?} (expected \"reschedule\" or \"stick\")"
            )),
        }
    }
}

/// How a VIP spreads new flows over its backends (see docs/schedulers.md).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Scheduler {
    /// Weighted Maglev consistent hashing of the 5-tuple.
    #[default]
    Maglev,
    /// Maglev on a hash of the client's address (and, with `with_port`, its
    /// source port): every flow of one client reaches one backend.
    MaglevSrc { with_port: bool },
    /// Smooth weighted round robin over new flows.
    Wrr,
    /// Power of two choices: of two Maglev positions of the flow, the
    /// backend with the lower load score.
    LeastLoad,
    /// The fewest active flows per weight (IPVS `wlc`) among the backends
    /// at 8 Maglev positions of the flow (see `lb_common::ActiveFlows`).
    LeastConn,
}

impl Scheduler {
    /// Every scheduler name, for messages.
    pub const NAMES: &str = "\"maglev\", \"maglev-src\", \"wrr\", \"least-load\", \"least-conn\"";

    /// What `hash_fields` says for this scheduler (`None`: not hashed by
    /// source).
    pub fn hash_fields(self) -> Option<&'static str> {
        match self {
            Scheduler::MaglevSrc { with_port: false } => Some("address"),
            Scheduler::MaglevSrc { with_port: true } => Some("address-port"),
            _ => None,
        }
    }
}

impl fmt::Display for Scheduler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Scheduler::Maglev => "maglev",
            Scheduler::MaglevSrc { .. } => "maglev-src",
            Scheduler::Wrr => "wrr",
            Scheduler::LeastLoad => "least-load",
            Scheduler::LeastConn => "least-conn",
        })
    }
}

impl FromStr for Scheduler {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "maglev" => Ok(Scheduler::Maglev),
            "maglev-src" => Ok(Scheduler::MaglevSrc { with_port: false }),
            "wrr" => Ok(Scheduler::Wrr),
            "least-load" => Ok(Scheduler::LeastLoad),
            "least-conn" => Ok(Scheduler::LeastConn),
            _ => Err(format!(
                "unknown scheduler {s:?} (available: {})",
                Scheduler::NAMES
            )),
        }
    }
}

/// A VIP and its backends.
#[derive(Clone, Debug, PartialEq)]
pub struct Vip {
    pub addr: VipAddr,
    /// How new flows are spread.
    pub scheduler: Scheduler,
    pub backends: Vec<Backend>,
    /// What happens to established flows of a backend marked down.
    pub on_backend_down: DownPolicy,
    /// What happens when every backend is down.
    pub on_all_down: AllDownPolicy,
    /// Time a new or recovered backend takes to ramp up to its full
    /// weight; zero: no ramp.
    pub slow_start: Duration,
    /// `[vip.health]`: health checks for the backends (defaults for their
    /// own `health` fields); `None`: no checks unless a backend has some.
    pub health: Option<HealthConfig>,
    /// `[vip.load]`: load-aware weights (defaults for the backends' own
    /// `load` fields); `None`: static weights unless a backend has some.
    pub load: Option<LoadConfig>,
    /// `load_cap` (`maglev-src` only): consistent hashing with bounded
    /// loads, in hundredths (125: no backend above 1.25 × its weighted
    /// share of the mean active flows, plus one flow).
    pub load_cap: Option<u32>,
    /// `second_chance` as written; `None`: on for `maglev` and
    /// `maglev-src` (see [`Vip::second_chance`]).
    pub second_chance: Option<bool>,
}

impl Vip {
    /// A VIP with these backends and default policies.
    pub fn new(addr: VipAddr, backends: Vec<Backend>) -> Vip {
        Vip {
            addr,
            scheduler: Scheduler::default(),
            backends,
            on_backend_down: DownPolicy::default(),
            on_all_down: AllDownPolicy::default(),
            slow_start: Duration::ZERO,
            health: None,
            load: None,
            load_cap: None,
            second_chance: None,
        }
    }

    /// Whether a TCP packet of this VIP without SYN and without an entry
    /// names its table position's previous backend as a candidate (see
    /// `lb_common::second_chance`): `second_chance`, on by default for the
    /// schedulers whose choice follows from the packet.
    pub fn second_chance(&self) -> bool {
        matches!(
            self.scheduler,
            Scheduler::Maglev | Scheduler::MaglevSrc { .. }
        ) && self.second_chance != Some(false)
    }

    /// `[vip.load] churn_hold` in whole seconds if any backend's weight
    /// follows its load (default `lb_common::DEFAULT_CHURN_HOLD_SECS`), else
    /// 0: a table position that moved may move again for load only after
    /// this long; one whose backend leaves the table (removed, down,
    /// drained, stalled) moves at once.
    pub fn churn_hold_secs(&self) -> u32 {
        let steered = self.load.is_some() || self.backends.iter().any(|b| !b.load.is_empty());
        if !steered {
            return 0;
        }
        self.load
            .as_ref()
            .and_then(|l| l.churn_hold)
            .map_or(lb_common::DEFAULT_CHURN_HOLD_SECS, |d| {
                d.as_secs_f64().ceil() as u32
            })
    }

    /// Whether the data plane counts this VIP's active flows as they
    /// change (its scheduler uses them; see `lb_common::ActiveFlows`).
    pub fn counts_flows(&self) -> bool {
        self.scheduler == Scheduler::LeastConn || self.load_cap.is_some()
    }

    /// The health check of backend `b`, if it is checked.
    pub fn health_check(&self, b: &Backend) -> Option<HealthCheck> {
        if self.health.is_none() && b.health.is_empty() {
            return None;
        }
        let base = self.health.clone().unwrap_or_default();
        b.health.over(&base).resolve(self.addr.port).ok()
    }

    /// What the VIP does while every backend is past its load limit
    /// (`[vip.load] on_saturated`).
    pub fn on_saturated(&self) -> crate::desired::policy::SaturatedPolicy {
        self.load
            .as_ref()
            .and_then(|l| l.on_saturated)
            .unwrap_or_default()
    }

    /// The load policy of backend `b`, if its weight follows its load.
    pub fn load_policy(&self, b: &Backend) -> Option<LoadPolicy> {
        if self.load.is_none() && b.load.is_empty() {
            return None;
        }
        let base = self.load.clone().unwrap_or_default();
        b.load.over(&base).resolve().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vip_addr_round_trips_through_text() {
        for s in [
            "203.0.113.10:443/tcp",
            "[2001:db8::10]:53/udp",
            "10.0.0.1:0/tcp",
        ] {
            let v: VipAddr = s.parse().unwrap();
            assert_eq!(v.to_string(), s);
        }
    }

    #[test]
    fn vip_addr_rejects_what_is_not_one() {
        for s in [
            "203.0.113.10:443",
            "203.0.113.10/tcp",
            "x:1/tcp",
            "1.2.3.4:1/sctp",
            "1.2.3.4:70000/tcp",
        ] {
            assert!(s.parse::<VipAddr>().is_err(), "{s}");
        }
    }

    #[test]
    fn path_segments_round_trip() {
        for s in ["203.0.113.10:443/tcp", "[2001:db8::10]:53/udp"] {
            let v: VipAddr = s.parse().unwrap();
            assert_eq!(VipAddr::from_path_segment(&v.path_segment()).unwrap(), v);
        }
        assert!(VipAddr::from_path_segment("203.0.113.10-99999-tcp").is_err());
    }

    #[test]
    fn key_port_is_network_order() {
        let v: VipAddr = "10.0.0.1:443/tcp".parse().unwrap();
        assert_eq!(v.key().port.to_ne_bytes(), 443u16.to_be_bytes());
        assert_eq!(v.key().proto, 6);
    }
}
