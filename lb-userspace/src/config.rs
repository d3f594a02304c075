//! The TOML config file: the balancer's settings and its initial VIPs.
//!
//! The file is read into plain "raw" structs first (numbers as `i64`,
//! addresses as strings) so that validation can name the exact field and
//! value that is wrong, e.g. `vip[1].backends[0].weight = 70000: out of
//! range 0..=65535`. All problems are reported together; a config with any
//! problem is rejected as a whole.

use std::{
    collections::HashSet,
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
    time::Duration,
};

use lb_common::{
    DEFAULT_FLOWS, DEFAULT_MAX_BACKENDS, DEFAULT_MAX_VIPS, DEFAULT_TABLE_SIZE, MaglevChunk,
    chunks_per_table,
};
use serde::Deserialize;

use crate::{
    maglev::is_prime,
    vip::{Backend, DownPolicy, Protocol, Vip, VipAddr},
};

/// Default MTU: the largest outer IP packet we send (`balancer.mtu`).
pub const DEFAULT_MTU: u32 = 1500;
/// Default weight of a backend that does not name one.
pub const DEFAULT_WEIGHT: u32 = 100;
/// Largest backend weight.
pub const MAX_WEIGHT: u32 = 65535;
/// Largest Maglev table size (the largest prime below 2^24).
pub const MAX_TABLE_SIZE: u32 = 16_777_213;
/// Upper bound for the Maglev map's memory (all VIPs, both halves).
pub const MAX_TABLE_MEMORY: u64 = 2 << 30;

/// The balancer's settings (`[balancer]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BalancerSettings {
    /// Outer source address of IPv4 outer headers.
    pub source_v4: Option<Ipv4Addr>,
    /// Outer source address of IPv6 outer headers.
    pub source_v6: Option<Ipv6Addr>,
    /// Largest encapsulated IP packet we send; larger ones are dropped.
    pub mtu: u32,
    /// Maglev table size M (prime).
    pub table_size: u32,
    /// VIPs the maps have room for.
    pub max_vips: u32,
    /// Backend slots (over all VIPs) the maps have room for.
    pub max_backends: u32,
    /// Capacity of the connection table (`conntrack.size`).
    pub flows: u32,
    /// Idle time after which a TCP flow is scheduled anew.
    pub tcp_idle: Duration,
    /// Idle time after which a UDP flow is scheduled anew.
    pub udp_idle: Duration,
}

/// Default TCP idle timeout of the connection table, seconds.
pub const DEFAULT_TCP_IDLE_SECS: u32 = 3600;
/// Default UDP idle timeout of the connection table, seconds.
pub const DEFAULT_UDP_IDLE_SECS: u32 = 60;

impl Default for BalancerSettings {
    fn default() -> Self {
        BalancerSettings {
            source_v4: None,
            source_v6: None,
            mtu: DEFAULT_MTU,
            table_size: DEFAULT_TABLE_SIZE,
            max_vips: DEFAULT_MAX_VIPS,
            max_backends: DEFAULT_MAX_BACKENDS,
            flows: DEFAULT_FLOWS,
            tcp_idle: Duration::from_secs(DEFAULT_TCP_IDLE_SECS.into()),
            udp_idle: Duration::from_secs(DEFAULT_UDP_IDLE_SECS.into()),
        }
    }
}

/// Default address of the Prometheus endpoint (`metrics.listen`).
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9180";

/// The Prometheus endpoint (`[metrics]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetricsSettings {
    /// Where `/metrics` is served; `None` when disabled.
    pub listen: Option<std::net::SocketAddr>,
}

impl Default for MetricsSettings {
    fn default() -> Self {
        MetricsSettings {
            listen: Some(DEFAULT_METRICS_LISTEN.parse().expect("valid default")),
        }
    }
}

/// A validated config.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub balancer: BalancerSettings,
    pub metrics: MetricsSettings,
    pub vips: Vec<Vip>,
}

/// One thing wrong with a config.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// Path of the field, e.g. `vip[0].backends[2].address`.
    pub field: String,
    /// What is wrong, including the offending value.
    pub message: String,
}

/// Why a config was rejected.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {file}")]
    Read {
        file: String,
        source: std::io::Error,
    },
    #[error("config file {file} is not valid TOML for lbd: {message}")]
    Syntax { file: String, message: String },
    #[error("config file {file} has {} problem(s):{}", problems.len(), ProblemList(problems))]
    Invalid {
        file: String,
        problems: Vec<Problem>,
    },
}

struct ProblemList<'a>(&'a [Problem]);

impl fmt::Display for ProblemList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for p in self.0 {
            write!(f, "\n  {}: {}", p.field, p.message)?;
        }
        Ok(())
    }
}

impl ConfigError {
    /// The problems found by validation (empty for read and syntax errors).
    pub fn problems(&self) -> &[Problem] {
        match self {
            ConfigError::Invalid { problems, .. } => problems,
            _ => &[],
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    balancer: RawBalancer,
    #[serde(default)]
    conntrack: RawConntrack,
    #[serde(default)]
    metrics: RawMetrics,
    #[serde(default)]
    vip: Vec<RawVip>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawConntrack {
    size: Option<i64>,
    tcp_idle_timeout: Option<i64>,
    udp_idle_timeout: Option<i64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    enabled: Option<bool>,
    listen: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawBalancer {
    source_v4: Option<String>,
    source_v6: Option<String>,
    mtu: Option<i64>,
    maglev_table_size: Option<i64>,
    max_vips: Option<i64>,
    max_backends: Option<i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVip {
    address: String,
    port: i64,
    protocol: String,
    on_backend_down: Option<String>,
    #[serde(default)]
    backends: Vec<RawBackend>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackend {
    address: String,
    weight: Option<i64>,
}

/// Reads and validates the config file at `path`.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        file: file.clone(),
        source,
    })?;
    parse(&text, &file)
}

/// Parses and validates config text; `file` names it in errors.
pub fn parse(text: &str, file: &str) -> Result<Config, ConfigError> {
    let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Syntax {
        file: file.to_string(),
        message: e.to_string(),
    })?;
    let mut v = Validator::default();
    let config = v.config(&raw);
    if v.problems.is_empty() {
        Ok(config)
    } else {
        Err(ConfigError::Invalid {
            file: file.to_string(),
            problems: v.problems,
        })
    }
}

#[derive(Default)]
struct Validator {
    problems: Vec<Problem>,
}

impl Validator {
    fn problem(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.problems.push(Problem {
            field: field.into(),
            message: message.into(),
        });
    }

    fn int(&mut self, field: &str, value: Option<i64>, default: u32, range: (u32, u32)) -> u32 {
        let Some(v) = value else { return default };
        if v < i64::from(range.0) || v > i64::from(range.1) {
            self.problem(
                field,
                format!("{v} is out of range {}..={}", range.0, range.1),
            );
            return default;
        }
        v as u32
    }

    fn addr(&mut self, field: &str, value: &str) -> Option<IpAddr> {
        match value.parse::<IpAddr>() {
            Ok(a) if a.is_unspecified() || a.is_multicast() => {
                self.problem(field, format!("{value:?} is not a unicast address"));
                None
            }
            Ok(a) => Some(a),
            Err(_) => {
                self.problem(field, format!("{value:?} is not an IPv4 or IPv6 address"));
                None
            }
        }
    }

    fn metrics(&mut self, raw: &RawMetrics) -> MetricsSettings {
        let listen = match raw.listen.as_deref() {
            None => MetricsSettings::default().listen,
            Some(s) => {
                match s.parse() {
                    Ok(a) => Some(a),
                    Err(_) => {
                        self.problem(
                        "metrics.listen",
                        format!("{s:?} is not ADDRESS:PORT (e.g. \"127.0.0.1:9180\", \"[::1]:9180\")"),
                    );
                        None
                    }
                }
            }
        };
        MetricsSettings {
            listen: if raw.enabled == Some(false) {
                None
            } else {
                listen
            },
        }
    }

    fn conntrack(&mut self, raw: &RawConntrack, b: &mut BalancerSettings) {
        b.flows = self.int("conntrack.size", raw.size, DEFAULT_FLOWS, (1024, 1 << 28));
        let secs = |v: &mut Self, field, value, default| {
            Duration::from_secs(v.int(field, value, default, (1, 7 * 24 * 3600)).into())
        };
        b.tcp_idle = secs(
            self,
            "conntrack.tcp_idle_timeout",
            raw.tcp_idle_timeout,
            DEFAULT_TCP_IDLE_SECS,
        );
        b.udp_idle = secs(
            self,
            "conntrack.udp_idle_timeout",
            raw.udp_idle_timeout,
            DEFAULT_UDP_IDLE_SECS,
        );
    }

    fn config(&mut self, raw: &RawConfig) -> Config {
        let mut balancer = self.balancer(&raw.balancer);
        self.conntrack(&raw.conntrack, &mut balancer);
        let metrics = self.metrics(&raw.metrics);
        let mut vips = Vec::new();
        let mut seen = HashSet::new();
        let mut total_backends = 0usize;
        let (mut need_v4, mut need_v6) = (None, None);
        for (i, rv) in raw.vip.iter().enumerate() {
            let path = format!("vip[{i}]");
            let Some(vip) = self.vip(&path, rv, &balancer) else {
                continue;
            };
            if !seen.insert(vip.addr) {
                self.problem(&path, format!("duplicate VIP {}", vip.addr));
            }
            for (j, b) in vip.backends.iter().enumerate() {
                let slot = if b.addr.is_ipv4() {
                    &mut need_v4
                } else {
                    &mut need_v6
                };
                slot.get_or_insert(format!("{path}.backends[{j}]"));
            }
            total_backends += vip.backends.len();
            vips.push(vip);
        }
        if raw.vip.len() > balancer.max_vips as usize {
            self.problem(
                "vip",
                format!(
                    "{} VIPs but balancer.max_vips is {}",
                    raw.vip.len(),
                    balancer.max_vips
                ),
            );
        }
        if total_backends > balancer.max_backends as usize {
            self.problem(
                "vip",
                format!(
                    "{total_backends} backends in all but balancer.max_backends is {}",
                    balancer.max_backends
                ),
            );
        }
        if let (Some(user), None) = (need_v4, balancer.source_v4) {
            self.problem(
                "balancer.source_v4",
                format!(
                    "missing: {user} is an IPv4 backend and needs an IPv4 outer source address"
                ),
            );
        }
        if let (Some(user), None) = (need_v6, balancer.source_v6) {
            self.problem(
                "balancer.source_v6",
                format!(
                    "missing: {user} is an IPv6 backend and needs an IPv6 outer source address"
                ),
            );
        }
        Config {
            balancer,
            metrics,
            vips,
        }
    }

    fn balancer(&mut self, raw: &RawBalancer) -> BalancerSettings {
        let d = BalancerSettings::default();
        let source_v4 =
            raw.source_v4
                .as_deref()
                .and_then(|s| match self.addr("balancer.source_v4", s) {
                    Some(IpAddr::V4(a)) => Some(a),
                    Some(IpAddr::V6(_)) => {
                        self.problem(
                            "balancer.source_v4",
                            format!("{s:?} is not an IPv4 address"),
                        );
                        None
                    }
                    None => None,
                });
        let source_v6 =
            raw.source_v6
                .as_deref()
                .and_then(|s| match self.addr("balancer.source_v6", s) {
                    Some(IpAddr::V6(a)) => Some(a),
                    Some(IpAddr::V4(_)) => {
                        self.problem(
                            "balancer.source_v6",
                            format!("{s:?} is not an IPv6 address"),
                        );
                        None
                    }
                    None => None,
                });
        let mtu = self.int("balancer.mtu", raw.mtu, d.mtu, (576, 9216));
        let table_size = self.int(
            "balancer.maglev_table_size",
            raw.maglev_table_size,
            d.table_size,
            (7, MAX_TABLE_SIZE),
        );
        if raw.maglev_table_size.is_some() && !is_prime(table_size) {
            self.problem(
                "balancer.maglev_table_size",
                format!(
                    "{table_size} is not prime (Maglev needs a prime size; the default is 65537)"
                ),
            );
        }
        let max_vips = self.int("balancer.max_vips", raw.max_vips, d.max_vips, (1, 65536));
        let max_backends = self.int(
            "balancer.max_backends",
            raw.max_backends,
            d.max_backends,
            (1, 1 << 20),
        );
        let memory = u64::from(max_vips)
            * 2
            * u64::from(chunks_per_table(table_size))
            * size_of::<MaglevChunk>() as u64;
        if memory > MAX_TABLE_MEMORY {
            self.problem(
                "balancer.max_vips",
                format!(
                    "{max_vips} VIPs with maglev_table_size {table_size} need {} MiB of table memory; the limit is {} MiB",
                    memory >> 20,
                    MAX_TABLE_MEMORY >> 20
                ),
            );
        }
        BalancerSettings {
            source_v4,
            source_v6,
            mtu,
            table_size,
            max_vips,
            max_backends,
            ..BalancerSettings::default()
        }
    }

    fn vip(&mut self, path: &str, raw: &RawVip, balancer: &BalancerSettings) -> Option<Vip> {
        let addr = self.addr(&format!("{path}.address"), &raw.address);
        let port = self.int(&format!("{path}.port"), Some(raw.port), 0, (0, 65535)) as u16;
        let protocol = match raw.protocol.parse::<Protocol>() {
            Ok(p) => Some(p),
            Err(e) => {
                self.problem(format!("{path}.protocol"), e);
                None
            }
        };
        let on_backend_down = match raw.on_backend_down.as_deref().map(str::parse::<DownPolicy>) {
            None => DownPolicy::default(),
            Some(Ok(p)) => p,
            Some(Err(e)) => {
                self.problem(format!("{path}.on_backend_down"), e);
                DownPolicy::default()
            }
        };
        let mut backends = Vec::new();
        let mut seen = HashSet::new();
        for (j, rb) in raw.backends.iter().enumerate() {
            let bpath = format!("{path}.backends[{j}]");
            let baddr = self.addr(&format!("{bpath}.address"), &rb.address);
            if let Some(a) = baddr
                && a.is_loopback()
            {
                self.problem(
                    format!("{bpath}.address"),
                    format!("{a} is a loopback address"),
                );
            }
            let weight = self.int(
                &format!("{bpath}.weight"),
                rb.weight,
                DEFAULT_WEIGHT,
                (0, MAX_WEIGHT),
            );
            if let Some(a) = baddr {
                if !seen.insert(a) {
                    self.problem(
                        format!("{bpath}.address"),
                        format!("duplicate backend {a} in this VIP"),
                    );
                }
                backends.push(Backend { addr: a, weight });
            }
        }
        if backends.len() >= balancer.table_size as usize {
            self.problem(
                format!("{path}.backends"),
                format!(
                    "{} backends do not fit a Maglev table of {} entries (use at least 100 entries per backend)",
                    backends.len(),
                    balancer.table_size
                ),
            );
        }
        Some(Vip {
            addr: VipAddr {
                addr: addr?,
                port,
                protocol: protocol?,
            },
            backends,
            on_backend_down,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
        [balancer]
        source_v4 = "192.0.2.1"
        source_v6 = "2001:db8::1"
        mtu = 1500

        [[vip]]
        address = "203.0.113.10"
        port = 80
        protocol = "tcp"
        backends = [
            { address = "10.0.0.11", weight = 1 },
            { address = "10.0.0.12", weight = 2 },
        ]

        [[vip]]
        address = "2001:db8:10::1"
        port = 0
        protocol = "udp"
        [[vip.backends]]
        address = "2001:db8:20::1"
    "#;

    fn problems(text: &str) -> Vec<Problem> {
        match parse(text, "test.toml") {
            Ok(_) => vec![],
            Err(e) => e.problems().to_vec(),
        }
    }

    /// The config with one line replaced; fails the test if `from` is absent.
    fn with(from: &str, to: &str) -> String {
        assert!(GOOD.contains(from), "{from}");
        GOOD.replacen(from, to, 1)
    }

    fn assert_problem(text: &str, field: &str, needle: &str) {
        let p = problems(text);
        assert!(
            p.iter()
                .any(|p| p.field == field && p.message.contains(needle)),
            "expected a problem at {field} containing {needle:?}, got {p:?}"
        );
    }

    #[test]
    fn good_config_parses() {
        let c = parse(GOOD, "test.toml").unwrap();
        assert_eq!(c.balancer.source_v4, Some("192.0.2.1".parse().unwrap()));
        assert_eq!(c.balancer.table_size, 65537);
        assert_eq!(c.vips.len(), 2);
        assert_eq!(c.vips[0].addr.to_string(), "203.0.113.10:80/tcp");
        assert_eq!(c.vips[0].backends[1].weight, 2);
        assert_eq!(c.vips[1].backends[0].weight, DEFAULT_WEIGHT);
        assert_eq!(c.vips[1].addr.port, 0);
    }

    #[test]
    fn bad_address_is_named() {
        assert_problem(
            &with("\"10.0.0.12\"", "\"10.0.0.300\""),
            "vip[0].backends[1].address",
            "10.0.0.300",
        );
        assert_problem(
            &with("\"203.0.113.10\"", "\"example.com\""),
            "vip[0].address",
            "example.com",
        );
        assert_problem(
            &with("\"203.0.113.10\"", "\"0.0.0.0\""),
            "vip[0].address",
            "unicast",
        );
        assert_problem(
            &with("\"192.0.2.1\"", "\"2001:db8::5\""),
            "balancer.source_v4",
            "not an IPv4",
        );
    }

    #[test]
    fn port_out_of_range_is_named() {
        assert_problem(
            &with("port = 80", "port = 65536"),
            "vip[0].port",
            "65536 is out of range 0..=65535",
        );
        assert_problem(
            &with("port = 80", "port = -1"),
            "vip[0].port",
            "out of range",
        );
    }

    #[test]
    fn unknown_protocol_is_named() {
        assert_problem(&with("\"tcp\"", "\"sctp\""), "vip[0].protocol", "sctp");
    }

    #[test]
    fn weight_out_of_range_is_named() {
        assert_problem(
            &with("weight = 2", "weight = 70000"),
            "vip[0].backends[1].weight",
            "70000",
        );
        assert_problem(
            &with("weight = 2", "weight = -5"),
            "vip[0].backends[1].weight",
            "-5",
        );
    }

    #[test]
    fn table_size_must_be_prime() {
        let t = with("mtu = 1500", "mtu = 1500\nmaglev_table_size = 65536");
        assert_problem(&t, "balancer.maglev_table_size", "65536 is not prime");
    }

    #[test]
    fn duplicate_vip_and_backend_are_named() {
        let dup_vip =
            format!("{GOOD}\n[[vip]]\naddress = \"203.0.113.10\"\nport = 80\nprotocol = \"tcp\"\n");
        assert_problem(&dup_vip, "vip[2]", "duplicate VIP 203.0.113.10:80/tcp");
        assert_problem(
            &with("\"10.0.0.12\"", "\"10.0.0.11\""),
            "vip[0].backends[1].address",
            "duplicate backend",
        );
    }

    #[test]
    fn missing_source_address_for_a_family_is_named() {
        assert_problem(
            &with("source_v6 = \"2001:db8::1\"", ""),
            "balancer.source_v6",
            "vip[1].backends[0]",
        );
    }

    #[test]
    fn ipv6_backend_on_ipv4_vip_is_accepted() {
        let t = with("\"10.0.0.12\"", "\"2001:db8:30::2\"");
        assert_eq!(problems(&t), vec![]);
    }

    #[test]
    fn unknown_field_and_wrong_type_are_syntax_errors_with_location() {
        for t in [
            with("mtu = 1500", "mtu = 1500\nmtus = 3"),
            with("port = 80", "port = \"80\""),
        ] {
            let e = parse(&t, "test.toml").unwrap_err();
            let msg = e.to_string();
            assert!(msg.contains("test.toml") && msg.contains("line"), "{msg}");
        }
    }

    #[test]
    fn all_problems_are_reported_together() {
        let t = with("port = 80", "port = 99999").replace("\"tcp\"", "\"icmp\"");
        let p = problems(&t);
        assert!(p.len() >= 2, "{p:?}");
        let msg = parse(&t, "f.toml").unwrap_err().to_string();
        assert!(
            msg.contains("vip[0].port") && msg.contains("vip[0].protocol"),
            "{msg}"
        );
    }

    #[test]
    fn metrics_endpoint_defaults_can_be_changed_or_disabled() {
        let c = parse(GOOD, "t").unwrap();
        assert_eq!(c.metrics.listen, Some("127.0.0.1:9180".parse().unwrap()));
        let c = parse(&format!("[metrics]\nlisten = \"[::1]:9999\"\n{GOOD}"), "t").unwrap();
        assert_eq!(c.metrics.listen, Some("[::1]:9999".parse().unwrap()));
        let c = parse(&format!("[metrics]\nenabled = false\n{GOOD}"), "t").unwrap();
        assert_eq!(c.metrics.listen, None);
        assert_problem(
            &format!("[metrics]\nlisten = \"localhost\"\n{GOOD}"),
            "metrics.listen",
            "localhost",
        );
    }

    #[test]
    fn conntrack_settings_and_down_policy() {
        let c = parse(GOOD, "t").unwrap();
        assert_eq!(c.balancer.flows, DEFAULT_FLOWS);
        assert_eq!(c.vips[0].on_backend_down, DownPolicy::Reschedule);
        let t = format!(
            "[conntrack]\nsize = 2048\nudp_idle_timeout = 5\n{}",
            with("port = 80", "port = 80\non_backend_down = \"stick\"")
        );
        let c = parse(&t, "t").unwrap();
        assert_eq!(c.balancer.flows, 2048);
        assert_eq!(c.balancer.udp_idle, Duration::from_secs(5));
        assert_eq!(
            c.balancer.tcp_idle,
            Duration::from_secs(DEFAULT_TCP_IDLE_SECS.into())
        );
        assert_eq!(c.vips[0].on_backend_down, DownPolicy::Stick);
        assert_problem(
            &format!("[conntrack]\nsize = 10\n{GOOD}"),
            "conntrack.size",
            "10 is out of range",
        );
        assert_problem(
            &format!("[conntrack]\ntcp_idle_timeout = 0\n{GOOD}"),
            "conntrack.tcp_idle_timeout",
            "out of range",
        );
        assert_problem(
            &with("port = 80", "port = 80\non_backend_down = \"drop\""),
            "vip[0].on_backend_down",
            "drop",
        );
    }

    #[test]
    fn too_many_vips_for_capacity() {
        let t = with("mtu = 1500", "mtu = 1500\nmax_vips = 1");
        assert_problem(&t, "vip", "2 VIPs but balancer.max_vips is 1");
    }
}
