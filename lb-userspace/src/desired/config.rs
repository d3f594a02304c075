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
    path::{Path, PathBuf},
    time::Duration,
};

use lb_common::{
    DEFAULT_FLOWS, DEFAULT_MAX_BACKENDS, DEFAULT_MAX_VIPS, DEFAULT_TABLE_SIZE, FLOW_WAYS,
    MaglevChunk, chunks_per_table,
};
use serde::{Deserialize, Serialize};

use crate::{
    control::audit::AuditFailure,
    desired::policy::{AllDownPolicy, HealthConfig, LoadConfig},
    desired::vip::{Backend, DownPolicy, Protocol, Scheduler, Vip, VipAddr},
    host::bgp::{BgpNeighbor, BgpSettings, ShutdownPolicy},
    maglev::is_prime,
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
    /// The same for a TCP flow whose client sent a FIN.
    pub tcp_closing: Duration,
    /// Idle time after which a UDP flow is scheduled anew.
    pub udp_idle: Duration,
    /// How often `lbd` counts the active flows in the connection table
    /// (`conntrack.sweep_interval`; see `lb_common::ActiveFlows`).
    pub sweep_interval: Duration,
    /// Answer ICMP echo requests to VIP addresses (`icmp_echo`).
    pub icmp_echo: bool,
    /// Answer packets too big to encapsulate with ICMP "fragmentation
    /// needed" / "packet too big" (`too_big = "icmp"`), else drop them.
    pub too_big_icmp: bool,
    /// Pass fragments to VIP addresses to the host (`fragments = "pass"`),
    /// else drop them.
    pub fragments_pass: bool,
    /// MACs besides the interface's whose frames are the balancer's
    /// (`extra_macs`).
    pub extra_macs: Vec<[u8; 6]>,
}

/// Default TCP idle timeout of the connection table, seconds.
pub const DEFAULT_TCP_IDLE_SECS: u32 = 3600;
/// Default idle timeout of a closing TCP entry (client FIN seen), seconds:
/// long enough for the last data and ACKs of a closing connection and a
/// retransmitted FIN, short enough that closed connections make room fast.
pub const DEFAULT_TCP_CLOSING_SECS: u32 = 10;
/// Default UDP idle timeout of the connection table, seconds.
pub const DEFAULT_UDP_IDLE_SECS: u32 = 60;
/// Default interval of the active-flow sweep, seconds: counts are at most
/// this old (`least-conn` and load caps see new flows, FINs and RSTs at
/// once; only flows that end silently wait for a sweep). A sweep of the
/// default 64 MiB table took 0.34–0.38 s of one core here (the batched
/// reads from the kernel dominate; a full or an empty table cost about
/// the same): about 7 % of a core at 5 s.
pub const DEFAULT_SWEEP_SECS: u64 = 5;

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
            tcp_closing: Duration::from_secs(DEFAULT_TCP_CLOSING_SECS.into()),
            udp_idle: Duration::from_secs(DEFAULT_UDP_IDLE_SECS.into()),
            sweep_interval: Duration::from_secs(DEFAULT_SWEEP_SECS),
            icmp_echo: true,
            too_big_icmp: true,
            fragments_pass: false,
            extra_macs: Vec::new(),
        }
    }
}

impl BalancerSettings {
    /// The settings that size the BPF maps, with their values: fixed for
    /// as long as the maps live (from the first start of an instance until
    /// `lbd --cleanup`), so neither a reload nor a restart may change them.
    /// `conntrack.size` is compared as the table it makes (rounded up to a
    /// power of two).
    pub fn capacities(&self) -> [(&'static str, u32); 4] {
        [
            ("balancer.maglev_table_size", self.table_size),
            ("balancer.max_vips", self.max_vips),
            ("balancer.max_backends", self.max_backends),
            (
                "conntrack.size",
                lb_common::flow_sets(self.flows) * FLOW_WAYS as u32,
            ),
        ]
    }
}

/// Why a capacity of `now` cannot become that of `asked`: the problem for
/// each capacity that differs (see [`BalancerSettings::capacities`]).
pub fn capacity_problems(now: &BalancerSettings, asked: &BalancerSettings) -> Vec<Problem> {
    now.capacities()
        .into_iter()
        .zip(asked.capacities())
        .filter(|((_, a), (_, b))| a != b)
        .map(|((field, a), (_, b))| Problem {
            field: field.to_string(),
            message: format!(
                "{b} asked, but the running balancer's maps were made for {a}: it sizes the BPF \
                 maps, which keep their size until `lbd --cleanup` (which drops every tracked flow)"
            ),
        })
        .collect()
}

/// What a reload (SIGHUP) of `next` over the running `now` cannot do: change
/// a capacity (see [`capacity_problems`]), or a setting `lbd` uses only at
/// start (the API's socket, TCP listener, tokens and audit log, the metrics
/// listener, the log level and format, `[fleet]`, `[bgp]` itself and its
/// BIRD directory and guard). A reload with any of them is refused whole.
pub fn reload_problems(now: &Config, next: &Config) -> Vec<Problem> {
    let mut problems = capacity_problems(&now.balancer, &next.balancer);
    let start_only = [
        ("api.socket", now.api.socket != next.api.socket),
        (
            "api.socket_group",
            now.api.socket_group != next.api.socket_group,
        ),
        ("api.tcp_listen", now.api.tcp_listen != next.api.tcp_listen),
        ("api.tls", now.api.tcp_transport != next.api.tcp_transport),
        ("api.token_file", now.api.token_file != next.api.token_file),
        ("api.audit_log", now.api.audit_log != next.api.audit_log),
        ("api.state_file", now.api.state_file != next.api.state_file),
        (
            "api.audit_failure",
            now.api.audit_failure != next.api.audit_failure,
        ),
        ("metrics.listen", now.metrics.listen != next.metrics.listen),
        (
            "metrics.tls",
            now.metrics.transport != next.metrics.transport,
        ),
        ("log.level", now.log_level != next.log_level),
        ("log.format", now.log_format != next.log_format),
        ("fleet", now.fleet != next.fleet),
        // BIRD's announcer and its guard start with lbd: [bgp] itself, its
        // directory and the guard's time are fixed then (the neighbours,
        // communities and the rest are reloaded).
        ("bgp", now.bgp.is_some() != next.bgp.is_some()),
        (
            "bgp.bird_dir",
            matches!((&now.bgp, &next.bgp), (Some(a), Some(b)) if a.bird_dir != b.bird_dir),
        ),
        (
            "bgp.dead_after",
            matches!((&now.bgp, &next.bgp), (Some(a), Some(b)) if a.dead_after != b.dead_after),
        ),
    ];
    for (field, changed) in start_only {
        if changed {
            problems.push(Problem {
                field: field.to_string(),
                message: "lbd reads it only when it starts: restart lbd to change it (the data \
                          plane keeps forwarding through a restart)"
                    .to_string(),
            });
        }
    }
    problems
}

/// Default address of the Prometheus endpoint (`metrics.listen`).
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9180";

/// The Prometheus endpoint (`[metrics]`).
#[derive(Clone, Debug, PartialEq)]
pub struct MetricsSettings {
    /// Where `/metrics` is served; `None` when disabled.
    pub listen: Option<std::net::SocketAddr>,
    /// How it speaks: TLS, or plain TCP.
    pub transport: Transport,
    /// The per-backend families exported (`None`: all of
    /// [`crate::control::metrics::BACKEND_FAMILIES`]).
    pub backend_families: Option<Vec<String>>,
    /// Per-backend series only for backends that carried at least this
    /// share (0..=1) of their VIP's forwarded packets; 0: every backend.
    pub backend_min_share: f64,
}

impl Default for MetricsSettings {
    fn default() -> Self {
        MetricsSettings {
            listen: Some(DEFAULT_METRICS_LISTEN.parse().expect("valid default")),
            transport: Transport::default(),
            backend_families: None,
            backend_min_share: 0.0,
        }
    }
}

/// How `lbd` writes its log (`[log] format`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines (the default).
    #[default]
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// How a TCP listener (the API's `tcp_listen`, `metrics.listen`) speaks:
/// TLS (`[api.tls]`, `[metrics.tls]`), or plain TCP, which a listener on a
/// loopback address may use by default (nothing crosses a network) and any
/// other only with `plaintext = true`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Transport {
    /// TLS with this certificate (and client certificates, if asked).
    Tls(TlsSettings),
    /// Plain TCP; `explicit` when the config said `plaintext = true` (lbd
    /// warns at start).
    Plain { explicit: bool },
}

impl Default for Transport {
    fn default() -> Self {
        Transport::Plain { explicit: false }
    }
}

/// A listener's TLS (`[api.tls]`, `[metrics.tls]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsSettings {
    /// The server's certificate chain (PEM, leaf first).
    pub cert: PathBuf,
    /// Its private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// CAs whose client certificates are accepted (PEM); `None`: clients
    /// send none.
    pub client_ca: Option<PathBuf>,
    /// Whether a client must present a certificate (`client_auth =
    /// "required"`, the default with `client_ca`) or may come without one
    /// and use a bearer token (`"optional"`).
    pub client_cert_required: bool,
}

/// The control API (`[api]`). Paths left out get per-instance defaults
/// from `lbd`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ApiSettings {
    /// Unix socket of the API (mode 0600, or 0660 with `socket_group`).
    pub socket: Option<PathBuf>,
    /// A group whose members may use the socket (they are admins).
    pub socket_group: Option<String>,
    /// Also serve the API on this TCP address (a token or a client
    /// certificate required).
    pub tcp_listen: Option<std::net::SocketAddr>,
    /// How `tcp_listen` speaks: TLS, or plain TCP.
    pub tcp_transport: Transport,
    /// Tokens for the TCP API: lines `NAME TOKEN [ROLE]`.
    pub token_file: Option<PathBuf>,
    /// Where every change request and its outcome is recorded (JSON lines).
    pub audit_log: Option<PathBuf>,
    /// What happens to a change whose audit record cannot be written.
    pub audit_failure: AuditFailure,
    /// Where API changes to the VIPs are persisted, with the revision,
    /// instead of the config file (which lbd then never writes); see
    /// [`crate::desired::state_file`].
    pub state_file: Option<PathBuf>,
}

/// A validated config.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub balancer: BalancerSettings,
    pub metrics: MetricsSettings,
    pub api: ApiSettings,
    /// `[log] level`: a `tracing` filter (`info`, `debug`,
    /// `lb=debug,info`, ...); `RUST_LOG` wins over it.
    pub log_level: Option<String>,
    /// `[log] format`.
    pub log_format: LogFormat,
    /// `[bgp]`: announce the VIPs through BIRD (off without the section).
    pub bgp: Option<BgpSettings>,
    /// `[fleet]`: share the desired state with other balancers through
    /// etcd (standalone without the section).
    pub fleet: Option<crate::fleet::FleetSettings>,
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
    api: RawApi,
    #[serde(default)]
    log: RawLog,
    bgp: Option<RawBgp>,
    fleet: Option<RawFleet>,
    #[serde(default)]
    vip: Vec<RawVip>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFleet {
    #[serde(default)]
    endpoints: Vec<String>,
    prefix: Option<String>,
    name: Option<String>,
    lease_ttl: Option<RawNumber>,
    down_quorum: Option<RawNumber>,
    cache_file: Option<String>,
    ca_file: Option<String>,
    cert_file: Option<String>,
    key_file: Option<String>,
    user: Option<String>,
    password_file: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBgp {
    router_id: Option<String>,
    local_as: Option<i64>,
    #[serde(default)]
    neighbors: Vec<RawNeighbor>,
    hold_time: Option<i64>,
    bfd: Option<bool>,
    bird_dir: Option<String>,
    bird_binary: Option<String>,
    start_bird: Option<bool>,
    on_shutdown: Option<String>,
    dead_after: Option<i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNeighbor {
    address: String,
    #[serde(rename = "as")]
    remote_as: i64,
    port: Option<i64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLog {
    level: Option<String>,
    format: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawApi {
    socket: Option<String>,
    socket_group: Option<String>,
    tcp_listen: Option<String>,
    plaintext: Option<bool>,
    tls: Option<RawTls>,
    token_file: Option<String>,
    audit_log: Option<String>,
    audit_failure: Option<String>,
    state_file: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert: Option<String>,
    key: Option<String>,
    client_ca: Option<String>,
    client_auth: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawConntrack {
    size: Option<i64>,
    tcp_idle_timeout: Option<i64>,
    tcp_closing_timeout: Option<i64>,
    udp_idle_timeout: Option<i64>,
    sweep_interval: Option<RawNumber>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    enabled: Option<bool>,
    listen: Option<String>,
    plaintext: Option<bool>,
    tls: Option<RawTls>,
    backend_families: Option<Vec<String>>,
    backend_min_share: Option<RawNumber>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawBalancer {
    source_v4: Option<String>,
    source_v6: Option<String>,
    mtu: Option<i64>,
    icmp_echo: Option<bool>,
    too_big: Option<String>,
    fragments: Option<String>,
    maglev_table_size: Option<i64>,
    max_vips: Option<i64>,
    max_backends: Option<i64>,
    extra_macs: Option<Vec<String>>,
}

/// A `[[vip]]` table as written (TOML or JSON); also what lbd writes back
/// (config file, documents), with `None`s and defaults left out.
#[derive(Deserialize, Serialize, utoipa::ToSchema)]
#[schema(as = VipSpec)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawVip {
    address: String,
    port: i64,
    protocol: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    scheduler: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    hash_fields: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    load_cap: Option<RawNumber>,
    #[serde(skip_serializing_if = "Option::is_none")]
    second_chance: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    on_backend_down: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    on_all_down: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    slow_start: Option<RawNumber>,
    #[serde(skip_serializing_if = "Option::is_none")]
    health: Option<RawHealth>,
    #[serde(skip_serializing_if = "Option::is_none")]
    load: Option<RawLoad>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    backends: Vec<RawBackend>,
}

#[derive(Deserialize, Serialize, utoipa::ToSchema)]
#[schema(as = BackendSpec)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawBackend {
    address: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    weight: Option<i64>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    drained: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    health: Option<RawHealth>,
    #[serde(skip_serializing_if = "Option::is_none")]
    load: Option<RawLoad>,
}

impl RawVip {
    /// `v` as a `[[vip]]` table: what was set, defaults left out (the
    /// inverse of parsing).
    pub(crate) fn of(v: &Vip) -> RawVip {
        let with_port = v.scheduler == (Scheduler::MaglevSrc { with_port: true });
        RawVip {
            address: v.addr.addr.to_string(),
            port: i64::from(v.addr.port),
            protocol: v.addr.protocol.to_string(),
            scheduler: (v.scheduler != Scheduler::default()).then(|| v.scheduler.to_string()),
            hash_fields: with_port.then(|| "address-port".to_string()),
            load_cap: v.load_cap.map(|c| {
                if c % 100 == 0 {
                    RawNumber::Int(i64::from(c / 100))
                } else {
                    RawNumber::Float(f64::from(c) / 100.0)
                }
            }),
            second_chance: v.second_chance,
            on_backend_down: (v.on_backend_down != DownPolicy::default())
                .then(|| v.on_backend_down.to_string()),
            on_all_down: (v.on_all_down != AllDownPolicy::default())
                .then(|| v.on_all_down.to_string()),
            slow_start: (!v.slow_start.is_zero()).then(|| RawNumber::seconds(v.slow_start)),
            health: v.health.as_ref().map(RawHealth::of),
            load: v.load.as_ref().map(RawLoad::of),
            backends: v
                .backends
                .iter()
                .map(|b| RawBackend {
                    address: b.addr.to_string(),
                    weight: Some(i64::from(b.weight)),
                    drained: b.drained,
                    health: (!b.health.is_empty()).then(|| RawHealth::of(&b.health)),
                    load: (!b.load.is_empty()).then(|| RawLoad::of(&b.load)),
                })
                .collect(),
        }
    }
}

impl RawHealth {
    fn of(h: &HealthConfig) -> RawHealth {
        RawHealth {
            check: h.check.map(|c| c.to_string()),
            port: h.port.map(i64::from),
            path: h.path.clone(),
            expect_status: h.expect_status.map(|r| {
                if r.lo == r.hi {
                    RawStatus::Code(i64::from(r.lo))
                } else {
                    RawStatus::Range(r.to_string())
                }
            }),
            host: h.host.clone(),
            ca_file: h.ca_file.as_ref().map(|p| p.display().to_string()),
            interval: h.interval.map(RawNumber::seconds),
            timeout: h.timeout.map(RawNumber::seconds),
            rise: h.rise.map(i64::from),
            fall: h.fall.map(i64::from),
        }
    }
}

impl RawLoad {
    fn of(l: &LoadConfig) -> RawLoad {
        RawLoad {
            metrics_port: l.metrics_port.map(i64::from),
            metrics_path: l.metrics_path.clone(),
            metrics_scheme: l
                .metrics_tls
                .map(|tls| if tls { "https" } else { "http" }.to_string()),
            metrics_host: l.metrics_host.clone(),
            metrics_ca_file: l.metrics_ca_file.as_ref().map(|p| p.display().to_string()),
            scrape_interval: l.scrape_interval.map(RawNumber::seconds),
            scrape_timeout: l.scrape_timeout.map(RawNumber::seconds),
            queue_limit: l.queue_limit.map(RawNumber::Float),
            kv_limit: l.kv_limit.map(RawNumber::Float),
            min_factor: l.min_factor.map(RawNumber::Float),
            recovery: l.recovery.map(RawNumber::seconds),
            stale_after: l.stale_after.map(RawNumber::seconds),
            stall_after: l.stall_after.map(RawNumber::seconds),
            engine: l.engine.map(|e| e.map_or("auto", |e| e.name()).to_string()),
            on_saturated: l.on_saturated.map(|p| p.to_string()),
            churn_hold: l.churn_hold.map(RawNumber::seconds),
        }
    }
}

/// A number as TOML or JSON has it: `5` or `0.5`.
#[derive(Deserialize, Serialize, Clone, Copy, utoipa::ToSchema)]
#[schema(as = Number)]
#[serde(untagged)]
enum RawNumber {
    Int(i64),
    Float(f64),
}

impl RawNumber {
    /// Seconds as written: `2`, or `0.5` when fractional.
    fn seconds(d: Duration) -> RawNumber {
        if d.subsec_nanos() == 0 {
            RawNumber::Int(d.as_secs() as i64)
        } else {
            RawNumber::Float(d.as_secs_f64())
        }
    }

    fn get(self) -> f64 {
        match self {
            RawNumber::Int(i) => i as f64,
            RawNumber::Float(f) => f,
        }
    }
}

/// An HTTP status (`200`) or range (`"200-399"`).
#[derive(Deserialize, Serialize, Clone, utoipa::ToSchema)]
#[schema(as = StatusCodes)]
#[serde(untagged)]
enum RawStatus {
    Code(i64),
    Range(String),
}

#[derive(Deserialize, Serialize, Default, utoipa::ToSchema)]
#[schema(as = HealthSpec)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    #[serde(skip_serializing_if = "Option::is_none")]
    check: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    port: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    path: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    expect_status: Option<RawStatus>,
    #[serde(skip_serializing_if = "Option::is_none")]
    host: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ca_file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    interval: Option<RawNumber>,
    #[serde(skip_serializing_if = "Option::is_none")]
    timeout: Option<RawNumber>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rise: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    fall: Option<i64>,
}

#[derive(Deserialize, Serialize, Default, utoipa::ToSchema)]
#[schema(as = LoadSpec)]
#[serde(deny_unknown_fields)]
struct RawLoad {
    #[serde(skip_serializing_if = "Option::is_none")]
    metrics_port: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    metrics_path: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    metrics_scheme: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    metrics_host: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    metrics_ca_file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    scrape_interval: Option<RawNumber>,
    #[serde(skip_serializing_if = "Option::is_none")]
    scrape_timeout: Option<RawNumber>,
    #[serde(skip_serializing_if = "Option::is_none")]
    queue_limit: Option<RawNumber>,
    #[serde(skip_serializing_if = "Option::is_none")]
    kv_limit: Option<RawNumber>,
    #[serde(skip_serializing_if = "Option::is_none")]
    min_factor: Option<RawNumber>,
    #[serde(skip_serializing_if = "Option::is_none")]
    recovery: Option<RawNumber>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stale_after: Option<RawNumber>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stall_after: Option<RawNumber>,
    #[serde(skip_serializing_if = "Option::is_none")]
    engine: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    on_saturated: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    churn_hold: Option<RawNumber>,
}

/// Validates a config as a whole (the checks that span VIPs: duplicates,
/// capacities, source addresses per family, addresses that cannot work),
/// e.g. after an API change. Problems are reported with the same field
/// paths as in a file.
pub fn validate(config: &Config) -> Result<(), Vec<Problem>> {
    let mut v = Validator::default();
    let index: Vec<usize> = (0..config.vips.len()).collect();
    v.whole(config, &index);
    if v.problems.is_empty() {
        Ok(())
    } else {
        Err(v.problems)
    }
}

/// Why the unicast address `addr` can never be a VIP (`vip`) or a backend,
/// if it cannot: the broadcast address, addresses no router forwards
/// (loopback, IPv4 link-local for a VIP), addresses that need an interface
/// scope the encapsulation cannot carry (IPv6 link-local), IPv4-mapped
/// IPv6. (Unspecified and multicast addresses are refused as they are
/// parsed.)
pub fn unusable_address(addr: IpAddr, vip: bool) -> Option<&'static str> {
    match addr {
        IpAddr::V4(a) if a.is_broadcast() => Some("the broadcast address"),
        IpAddr::V4(a) if a.is_loopback() => Some("a loopback address"),
        IpAddr::V4(a) if vip && a.is_link_local() => {
            Some("an IPv4 link-local address (routers do not forward it to a VIP)")
        }
        IpAddr::V6(a) if a.is_loopback() => Some("the loopback address"),
        IpAddr::V6(a) if a.is_unicast_link_local() => Some(
            "an IPv6 link-local address (it needs an interface scope the balancer cannot give it)",
        ),
        IpAddr::V6(a) => a
            .to_ipv4_mapped()
            .is_some()
            .then_some("an IPv4-mapped IPv6 address (use the IPv4 address)"),
        IpAddr::V4(_) => None,
    }
}

/// The config file as `lbd` last read or wrote it. Changes made through
/// the API are written back into it (see [`save_vips`]) only while the file
/// on disk still holds exactly that text: an operator's edit that was not
/// reloaded yet is never overwritten; the change is refused until the file
/// is reloaded (SIGHUP).
#[derive(Clone, Debug)]
pub struct ConfigFile {
    path: PathBuf,
    text: String,
}

/// Why a change could not be written into the config file.
#[derive(Debug, thiserror::Error)]
pub enum SaveError {
    #[error(
        "the config file {0} was changed on disk since lbd last read it; reload it first \
         (SIGHUP: `systemctl reload`, `kill -HUP`), then make the change again"
    )]
    ChangedOnDisk(String),
    #[error("writing the config file {file}: {source}")]
    Io {
        file: String,
        source: std::io::Error,
    },
}

impl ConfigFile {
    /// Reads and validates the config file at `path`.
    pub fn load(path: &Path) -> Result<(ConfigFile, Config), ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: file.clone(),
            source,
        })?;
        let config = parse(&text, &file)?;
        Ok((
            ConfigFile {
                path: path.to_path_buf(),
                text,
            },
            config,
        ))
    }

    /// Where the file is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `vips` in place of the file's `[[vip]]` tables, if the file
    /// is as lbd last read or wrote it.
    pub fn save_vips(&mut self, vips: &[Vip]) -> Result<(), SaveError> {
        let file = self.path.display().to_string();
        let io = |source| SaveError::Io {
            file: file.clone(),
            source,
        };
        let on_disk = std::fs::read_to_string(&self.path).map_err(io)?;
        if on_disk != self.text {
            return Err(SaveError::ChangedOnDisk(file));
        }
        let text = with_vips(&on_disk, vips).map_err(io)?;
        write_atomically(&self.path, &text).map_err(io)?;
        self.text = text;
        Ok(())
    }
}

/// Writes `vips` into the config file at `path` in place of its `[[vip]]`
/// tables, keeping everything else (other sections, comments outside the
/// VIPs) as it was. The write is atomic: a temp file in the same directory,
/// fsync, rename, fsync of the directory. The file's permissions are kept.
pub fn save_vips(path: &Path, vips: &[Vip]) -> std::io::Result<()> {
    let text = std::fs::read_to_string(path)?;
    write_atomically(path, &with_vips(&text, vips)?)
}

/// Config text `text` with `vips` in place of its `[[vip]]` tables: the
/// rest of the file as it was (its `[[vip]]` tables taken out), then the
/// VIPs, each as [`RawVip::of`] writes it, its backends an inline table a
/// line, its `[vip.health]` and `[vip.load]` tables after its keys.
fn with_vips(text: &str, vips: &[Vip]) -> std::io::Result<String> {
    use toml_edit::DocumentMut;
    let invalid = |e: String| std::io::Error::new(std::io::ErrorKind::InvalidData, e);
    let mut doc: DocumentMut = text
        .parse()
        .map_err(|e: toml_edit::TomlError| invalid(e.to_string()))?;
    doc.remove("vip");
    let mut out = doc.to_string();
    let tables = vip_tables(vips).map_err(invalid)?;
    if !tables.is_empty() {
        if !out.is_empty() {
            while !out.ends_with("\n\n") {
                out.push('\n');
            }
        }
        out += &tables;
    }
    Ok(out)
}

/// `vips` as `[[vip]]` tables: each VIP's keys (serialized as a one-VIP
/// document, so its `[vip.health]` and `[vip.load]` tables come out under
/// it), its backends an inline table a line between its keys and its
/// tables. Written as text: thousands of backends are a line each, not a
/// document to parse again.
fn vip_tables(vips: &[Vip]) -> Result<String, String> {
    #[derive(Serialize)]
    struct One {
        vip: [RawVip; 1],
    }
    let mut out = String::new();
    for v in vips {
        let mut raw = RawVip::of(v);
        let backends = std::mem::take(&mut raw.backends);
        let text = toml::to_string(&One { vip: [raw] }).map_err(|e| e.to_string())?;
        // `[[vip]]` and its keys, then its sub-tables (if any).
        let split = text.find("\n[vip.").map_or(text.len(), |i| i + 1);
        let (keys, tables) = text.split_at(split);
        out += keys.trim_end();
        out += "\nbackends = [";
        for b in &backends {
            let line = toml::Value::try_from(b).map_err(|e| e.to_string())?;
            out += &format!("\n  {line},");
        }
        out += if backends.is_empty() { "]\n" } else { "\n]\n" };
        if !tables.is_empty() {
            out += tables;
        }
        out += "\n";
    }
    Ok(out)
}

/// Replaces the file at `path` with `text` atomically: a temp file in the
/// same directory, fsync, rename, fsync of the directory. The file's
/// permissions are kept (a new file is 0600).
pub(crate) fn write_atomically(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let invalid = |e: String| std::io::Error::new(std::io::ErrorKind::InvalidData, e);
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| invalid(format!("{} is not a file", path.display())))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let perms = match std::fs::metadata(path) {
        Ok(m) => m.permissions(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::os::unix::fs::PermissionsExt::from_mode(0o600)
        }
        Err(e) => return Err(e),
    };
    let mut f = std::fs::File::create(&tmp)?;
    f.set_permissions(perms)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

/// A JSON request body into `T`; a syntax or type error names the field
/// it happened at (`body` when it is the document itself).
pub(crate) fn from_json<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, Vec<Problem>> {
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        vec![Problem {
            // Syntax errors have no path ("?"), errors of the document "."
            field: if path == "." || path.contains('?') {
                "body".into()
            } else {
                path
            },
            message: e.into_inner().to_string(),
        }]
    })
}

/// A TOML request body into `T`, as [`from_json`] does JSON.
fn from_toml<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, Vec<Problem>> {
    let text = std::str::from_utf8(body).map_err(|e| {
        vec![Problem {
            field: "body".into(),
            message: format!("not UTF-8 text: {e}"),
        }]
    })?;
    serde_path_to_error::deserialize(toml::Deserializer::new(text)).map_err(|e| {
        let path = e.path().to_string();
        vec![Problem {
            field: if path == "." || path.contains('?') {
                "body".into()
            } else {
                path
            },
            message: e.into_inner().to_string().trim().to_string(),
        }]
    })
}

/// A VIP from an API request body (the fields of a `[[vip]]` table, as
/// JSON), checked like a config file's; field names have no `vip[i].`.
pub fn vip_from_json(body: &[u8], balancer: &BalancerSettings) -> Result<Vip, Vec<Problem>> {
    let raw: RawVip = from_json(body)?;
    let mut v = Validator::default();
    let vip = v.vip("", &raw, balancer);
    match vip {
        Some(vip) if v.problems.is_empty() => Ok(vip),
        _ => Err(v.problems),
    }
}

/// The desired state of the VIPs as one document: the config file's
/// `[[vip]]` tables under the key `vip` (TOML: `[[vip]]` tables; JSON:
/// `{"vip": [...]}`), and the revision it was read at.
///
/// As input (`PUT /v1/vips`, `lbctl apply -f`), `revision` is optional; when
/// given, it is a precondition like `If-Match`: the document only applies
/// to that revision of the state. A document read from lbd (`GET
/// /v1/vips?spec=true`, `lbctl export`) carries the revision it shows, so
/// an edited export cannot overwrite a change made in between.
#[derive(Clone, Debug, PartialEq)]
pub struct VipsDocument {
    pub revision: Option<u64>,
    pub vips: Vec<Vip>,
}

#[derive(Deserialize, Serialize, utoipa::ToSchema)]
#[schema(as = VipsDocument)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawDocument {
    #[serde(skip_serializing_if = "Option::is_none")]
    revision: Option<u64>,
    #[serde(default)]
    vip: Vec<RawVip>,
}

/// Most VIPs a document may hold (the data plane's own limit is
/// `balancer.max_vips`, checked when it is applied).
pub const MAX_DOCUMENT_VIPS: usize = 65_536;

impl VipsDocument {
    /// A document from JSON (`{"revision": N, "vip": [...]}`).
    pub fn from_json(
        body: &[u8],
        balancer: &BalancerSettings,
    ) -> Result<VipsDocument, Vec<Problem>> {
        let raw: RawDocument = from_json(body)?;
        Self::from_raw(raw, balancer)
    }

    /// A document from TOML (`revision = N` and `[[vip]]` tables).
    pub fn from_toml(
        body: &[u8],
        balancer: &BalancerSettings,
    ) -> Result<VipsDocument, Vec<Problem>> {
        Self::from_raw(from_toml(body)?, balancer)
    }

    fn from_raw(
        raw: RawDocument,
        balancer: &BalancerSettings,
    ) -> Result<VipsDocument, Vec<Problem>> {
        let mut v = Validator::default();
        if raw.vip.len() > MAX_DOCUMENT_VIPS {
            v.problem(
                "vip",
                format!(
                    "{} VIPs; a document holds at most {MAX_DOCUMENT_VIPS}",
                    raw.vip.len()
                ),
            );
            return Err(v.problems);
        }
        let vips: Vec<Vip> = raw
            .vip
            .iter()
            .enumerate()
            .filter_map(|(i, rv)| v.vip(&format!("vip[{i}]"), rv, balancer))
            .collect();
        if v.problems.is_empty() {
            Ok(VipsDocument {
                revision: raw.revision,
                vips,
            })
        } else {
            Err(v.problems)
        }
    }

    fn raw(&self) -> RawDocument {
        RawDocument {
            revision: self.revision,
            vip: self.vips.iter().map(RawVip::of).collect(),
        }
    }

    /// The document as JSON.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self.raw()).expect("plain data")
    }

    /// The document as TOML: `revision`, then one `[[vip]]` table per VIP
    /// with its backends an inline table a line (as lbd writes the config
    /// file).
    pub fn to_toml(&self) -> String {
        let mut out = match self.revision {
            Some(r) => format!("revision = {r}\n\n"),
            None => String::new(),
        };
        out += &with_vips("", &self.vips).expect("a document lbd holds writes as TOML");
        out
    }
}

/// A VIP from a TOML request body (the keys of one `[[vip]]` table, at
/// the top level).
pub fn vip_from_toml(body: &[u8], balancer: &BalancerSettings) -> Result<Vip, Vec<Problem>> {
    let raw: RawVip = from_toml(body)?;
    let mut v = Validator::default();
    let vip = v.vip("", &raw, balancer);
    match vip {
        Some(vip) if v.problems.is_empty() => Ok(vip),
        _ => Err(v.problems),
    }
}

/// A backend from an API request body (`address`, `weight`, `drained`).
pub fn backend_from_json(body: &[u8]) -> Result<Backend, Vec<Problem>> {
    let raw: RawBackend = from_json(body)?;
    let mut v = Validator::default();
    let b = v.backend("", &raw);
    match b {
        Some(b) if v.problems.is_empty() => Ok(b),
        _ => Err(v.problems),
    }
}

/// A change to a VIP's settings (not its backends), from an API request body.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct VipPatch {
    pub scheduler: Option<Scheduler>,
    /// `hash_fields`: `Some(true)` for "address-port".
    pub hash_port: Option<bool>,
    pub on_backend_down: Option<DownPolicy>,
    pub on_all_down: Option<AllDownPolicy>,
    pub slow_start: Option<Duration>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVipPatch {
    scheduler: Option<String>,
    hash_fields: Option<String>,
    on_backend_down: Option<String>,
    on_all_down: Option<String>,
    slow_start: Option<RawNumber>,
}

/// A [`VipPatch`] from an API request body; the VIP's own checks (e.g.
/// `hash_fields` only with `maglev-src`) happen when it is applied.
pub fn vip_patch_from_json(body: &[u8]) -> Result<VipPatch, Vec<Problem>> {
    let raw: RawVipPatch = from_json(body)?;
    let mut v = Validator::default();
    fn parse<T: std::str::FromStr<Err = String>>(
        v: &mut Validator,
        field: &str,
        value: &Option<String>,
    ) -> Option<T> {
        value.as_deref().and_then(|s| match s.parse() {
            Ok(x) => Some(x),
            Err(e) => {
                v.problem(field, e);
                None
            }
        })
    }
    let patch = VipPatch {
        scheduler: parse(&mut v, "scheduler", &raw.scheduler),
        hash_port: match raw.hash_fields.as_deref() {
            None => None,
            Some("address") => Some(false),
            Some("address-port") => Some(true),
            Some(f) => {
                v.problem(
                    "hash_fields",
                    format!("{f:?} is not \"address\" or \"address-port\""),
                );
                None
            }
        },
        on_backend_down: parse(&mut v, "on_backend_down", &raw.on_backend_down),
        on_all_down: parse(&mut v, "on_all_down", &raw.on_all_down),
        slow_start: v.seconds("slow_start", raw.slow_start, (0.0, 3600.0)),
    };
    if patch == VipPatch::default() && v.problems.is_empty() {
        v.problem(
            "body",
            "nothing to change: give scheduler, hash_fields, on_backend_down, on_all_down and/or slow_start",
        );
    }
    if v.problems.is_empty() {
        Ok(patch)
    } else {
        Err(v.problems)
    }
}

/// A change to one backend (`weight`, `drained`), from an API request body.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendPatch {
    pub weight: Option<u32>,
    pub drained: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackendPatch {
    weight: Option<i64>,
    drained: Option<bool>,
}

/// A [`BackendPatch`] from an API request body.
pub fn backend_patch_from_json(body: &[u8]) -> Result<BackendPatch, Vec<Problem>> {
    let raw: RawBackendPatch = from_json(body)?;
    let mut v = Validator::default();
    let weight = raw
        .weight
        .map(|w| v.int("weight", Some(w), 0, (0, MAX_WEIGHT)));
    if raw.weight.is_none() && raw.drained.is_none() {
        v.problem(
            "body",
            "nothing to change: give \"weight\" and/or \"drained\"",
        );
    }
    if v.problems.is_empty() {
        Ok(BackendPatch {
            weight,
            drained: raw.drained,
        })
    } else {
        Err(v.problems)
    }
}

/// Reads and validates the config file at `path`.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    ConfigFile::load(path).map(|(_, config)| config)
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

/// `path.name`, or `name` at the top level.
fn join(path: &str, name: &str) -> String {
    if path.is_empty() {
        name.to_string()
    } else {
        format!("{path}.{name}")
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

    /// A number in `range`, inclusive.
    fn number(&mut self, field: &str, value: Option<RawNumber>, range: (f64, f64)) -> Option<f64> {
        let v = value?.get();
        if !v.is_finite() || v < range.0 || v > range.1 {
            self.problem(
                field,
                format!("{v} is out of range {}..={}", range.0, range.1),
            );
            return None;
        }
        Some(v)
    }

    /// Seconds (`2`, `0.5`) in `range`.
    fn seconds(
        &mut self,
        field: &str,
        value: Option<RawNumber>,
        range: (f64, f64),
    ) -> Option<Duration> {
        self.number(field, value, range)
            .map(Duration::from_secs_f64)
    }

    /// An HTTP request path: starts with `/`, printable ASCII without
    /// spaces, at most 1024 bytes.
    fn url_path(&mut self, field: &str, value: &Option<String>) -> Option<String> {
        let p = value.as_ref()?;
        if !p.starts_with('/') || p.len() > 1024 || !p.bytes().all(|b| b.is_ascii_graphic()) {
            self.problem(
                field,
                format!("{p:?} is not a URL path (starts with '/', printable ASCII, no spaces, at most 1024 bytes)"),
            );
            return None;
        }
        Some(p.clone())
    }

    /// A `Host` header: a DNS name or IP address (IPv6 in brackets), with
    /// an optional `:PORT`.
    fn host_header(&mut self, field: &str, value: &Option<String>) -> Option<String> {
        let h = value.as_ref()?;
        let (name, port) = match h.rsplit_once(':') {
            Some((n, p)) if !n.ends_with(':') && (n.starts_with('[') || !n.contains(':')) => {
                (n, Some(p))
            }
            _ => (h.as_str(), None),
        };
        let name_ok = match name.strip_prefix('[').and_then(|n| n.strip_suffix(']')) {
            Some(v6) => v6.parse::<std::net::Ipv6Addr>().is_ok(),
            None => {
                !name.is_empty()
                    && name.len() <= 253
                    && name.split('.').all(|label| {
                        !label.is_empty()
                            && label.len() <= 63
                            && label
                                .bytes()
                                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                    })
            }
        };
        let port_ok = port.is_none_or(|p| p.parse::<u16>().is_ok_and(|p| p > 0));
        if !name_ok || !port_ok {
            self.problem(
                field,
                format!("{h:?} is not a host name or address with an optional :PORT (e.g. \"models.example.net\", \"10.0.0.11:8443\")"),
            );
            return None;
        }
        Some(h.clone())
    }

    /// An absolute file path (read when it is used).
    fn file(&mut self, field: &str, value: &Option<String>) -> Option<PathBuf> {
        let p = value.as_ref()?;
        if !p.starts_with('/') {
            self.problem(field, format!("{p:?} is not an absolute path"));
            return None;
        }
        Some(PathBuf::from(p))
    }

    fn port(&mut self, field: &str, value: Option<i64>) -> Option<u16> {
        value.map(|_| self.int(field, value, 0, (1, 65535)) as u16)
    }

    fn health(&mut self, path: &str, raw: &RawHealth) -> HealthConfig {
        let check = raw.check.as_deref().and_then(|c| match c.parse() {
            Ok(k) => Some(k),
            Err(e) => {
                self.problem(join(path, "check"), e);
                None
            }
        });
        let count = |v: &mut Self, name: &str, value: Option<i64>| {
            value.map(|_| v.int(&join(path, name), value, 1, (1, 100)))
        };
        let expect_status = raw.expect_status.as_ref().and_then(|r| {
            let text = match r {
                RawStatus::Code(c) => c.to_string(),
                RawStatus::Range(t) => t.clone(),
            };
            text.parse()
                .map_err(|e| self.problem(join(path, "expect_status"), e))
                .ok()
        });
        HealthConfig {
            check,
            port: self.port(&join(path, "port"), raw.port),
            path: self.url_path(&join(path, "path"), &raw.path),
            expect_status,
            host: self.host_header(&join(path, "host"), &raw.host),
            ca_file: self.file(&join(path, "ca_file"), &raw.ca_file),
            interval: self.seconds(&join(path, "interval"), raw.interval, (0.1, 3600.0)),
            timeout: self.seconds(&join(path, "timeout"), raw.timeout, (0.05, 60.0)),
            rise: count(self, "rise", raw.rise),
            fall: count(self, "fall", raw.fall),
        }
    }

    fn load(&mut self, path: &str, raw: &RawLoad) -> LoadConfig {
        let metrics_tls = raw.metrics_scheme.as_deref().and_then(|s| match s {
            "http" => Some(false),
            "https" => Some(true),
            other => {
                self.problem(
                    join(path, "metrics_scheme"),
                    format!("{other:?} is not \"http\" or \"https\""),
                );
                None
            }
        });
        LoadConfig {
            metrics_port: self.port(&join(path, "metrics_port"), raw.metrics_port),
            metrics_path: self.url_path(&join(path, "metrics_path"), &raw.metrics_path),
            metrics_tls,
            metrics_host: self.host_header(&join(path, "metrics_host"), &raw.metrics_host),
            metrics_ca_file: self.file(&join(path, "metrics_ca_file"), &raw.metrics_ca_file),
            scrape_interval: self.seconds(
                &join(path, "scrape_interval"),
                raw.scrape_interval,
                (0.1, 3600.0),
            ),
            scrape_timeout: self.seconds(
                &join(path, "scrape_timeout"),
                raw.scrape_timeout,
                (0.05, 60.0),
            ),
            queue_limit: self.number(&join(path, "queue_limit"), raw.queue_limit, (0.1, 1e6)),
            kv_limit: self.number(&join(path, "kv_limit"), raw.kv_limit, (0.01, 1.0)),
            min_factor: self.number(&join(path, "min_factor"), raw.min_factor, (0.05, 1.0)),
            recovery: self.seconds(&join(path, "recovery"), raw.recovery, (0.0, 3600.0)),
            stale_after: self.seconds(&join(path, "stale_after"), raw.stale_after, (0.1, 86400.0)),
            stall_after: self.seconds(&join(path, "stall_after"), raw.stall_after, (0.0, 3600.0)),
            engine: raw.engine.as_deref().and_then(|e| match e {
                "auto" => Some(None),
                name => name
                    .parse()
                    .map(Some)
                    .map_err(|m| self.problem(join(path, "engine"), m))
                    .ok(),
            }),
            on_saturated: raw.on_saturated.as_deref().and_then(|p| {
                p.parse()
                    .map_err(|m| self.problem(join(path, "on_saturated"), m))
                    .ok()
            }),
            churn_hold: self.seconds(&join(path, "churn_hold"), raw.churn_hold, (0.0, 3600.0)),
        }
    }

    /// Checks the merged health and load settings of every backend of `vip`
    /// (what only shows once VIP defaults and backend fields combine).
    fn vip_policies(&mut self, path: &str, vip: &Vip) {
        let vip_health = vip.health.clone().unwrap_or_default();
        let vip_load = vip.load.clone().unwrap_or_default();
        let mut checked = (false, false);
        for (j, b) in vip.backends.iter().enumerate() {
            let where_ = |own: bool, table: &str| {
                if own {
                    join(path, &format!("backends[{j}].{table}"))
                } else {
                    join(path, table)
                }
            };
            if vip.health.is_some() || !b.health.is_empty() {
                let own = !b.health.is_empty();
                if let Err((field, message)) = b.health.over(&vip_health).resolve(vip.addr.port)
                    && (own || !checked.0)
                {
                    self.problem(join(&where_(own, "health"), field), message);
                    checked.0 |= !own;
                }
            }
            if vip.load.is_some() || !b.load.is_empty() {
                let own = !b.load.is_empty();
                if let Err((field, message)) = b.load.over(&vip_load).resolve()
                    && (own || !checked.1)
                {
                    self.problem(join(&where_(own, "load"), field), message);
                    checked.1 |= !own;
                }
            }
        }
        // A VIP without backends: its defaults alone.
        if vip.backends.is_empty() {
            if let Some(h) = &vip.health
                && let Err((field, message)) = h.resolve(vip.addr.port)
            {
                self.problem(join(&join(path, "health"), field), message);
            }
            if let Some(l) = &vip.load
                && let Err((field, message)) = l.resolve()
            {
                self.problem(join(&join(path, "load"), field), message);
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
        let families = crate::control::metrics::BACKEND_FAMILIES;
        let backend_families = raw.backend_families.as_ref().map(|names| {
            for (i, name) in names.iter().enumerate() {
                if !families.contains(&name.as_str()) {
                    self.problem(
                        format!("metrics.backend_families[{i}]"),
                        format!(
                            "{name:?} is not a per-backend family (one of {})",
                            families.join(", ")
                        ),
                    );
                }
            }
            names.clone()
        });
        let backend_min_share = self
            .number(
                "metrics.backend_min_share",
                raw.backend_min_share,
                (0.0, 1.0),
            )
            .unwrap_or(0.0);
        let listen = if raw.enabled == Some(false) {
            None
        } else {
            listen
        };
        MetricsSettings {
            listen,
            transport: self.transport("metrics", listen, raw.plaintext, raw.tls.as_ref()),
            backend_families,
            backend_min_share,
        }
    }

    fn log_format(&mut self, raw: &RawLog) -> LogFormat {
        match raw.format.as_deref() {
            None | Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(other) => {
                self.problem(
                    "log.format",
                    format!("{other:?} is not \"text\" or \"json\""),
                );
                LogFormat::Text
            }
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
        b.tcp_closing = Duration::from_secs(
            self.int(
                "conntrack.tcp_closing_timeout",
                raw.tcp_closing_timeout,
                DEFAULT_TCP_CLOSING_SECS,
                (1, 3600),
            )
            .into(),
        );
        b.udp_idle = secs(
            self,
            "conntrack.udp_idle_timeout",
            raw.udp_idle_timeout,
            DEFAULT_UDP_IDLE_SECS,
        );
        b.sweep_interval = self
            .seconds("conntrack.sweep_interval", raw.sweep_interval, (0.1, 60.0))
            .unwrap_or(Duration::from_secs(DEFAULT_SWEEP_SECS));
    }

    fn absolute_path(&mut self, field: &str, s: &Option<String>) -> Option<PathBuf> {
        s.as_deref().and_then(|p| {
            if p.is_empty() || !p.starts_with('/') {
                self.problem(field, format!("{p:?} is not an absolute path"));
                None
            } else {
                Some(PathBuf::from(p))
            }
        })
    }

    /// How the listener of `section` (`api`, `metrics`) on `listen`
    /// speaks: TLS when `[SECTION.tls]` is given; plain TCP on a loopback
    /// address, or anywhere with `plaintext = true`; any other address
    /// without TLS is a problem (bearer tokens and counters would cross the
    /// network in the clear).
    fn transport(
        &mut self,
        section: &str,
        listen: Option<std::net::SocketAddr>,
        plaintext: Option<bool>,
        tls: Option<&RawTls>,
    ) -> Transport {
        let listener = if section == "api" {
            "api.tcp_listen"
        } else {
            "metrics.listen"
        };
        let Some(tls) = tls else {
            if let Some(addr) = listen
                && !addr.ip().is_loopback()
                && plaintext != Some(true)
            {
                self.problem(
                    format!("{section}.tls"),
                    format!(
                        "missing: {listener} {addr} is not a loopback address, so it needs TLS: \
                         give [{section}.tls] cert and key (or {section}.plaintext = true for \
                         plain TCP, not recommended)"
                    ),
                );
            }
            return Transport::Plain {
                explicit: plaintext == Some(true),
            };
        };
        if plaintext == Some(true) {
            self.problem(
                format!("{section}.plaintext"),
                format!("true, but [{section}.tls] is given: choose one"),
            );
        }
        if listen.is_none() {
            self.problem(
                format!("{section}.tls"),
                format!("given, but {listener} is not set (or the endpoint is disabled)"),
            );
        }
        let required = |v: &mut Self, key: &str, s: &Option<String>| {
            let field = format!("{section}.tls.{key}");
            if s.is_none() {
                v.problem(
                    &field,
                    format!("missing: [{section}.tls] needs cert and key (PEM files)"),
                );
            }
            v.absolute_path(&field, s).unwrap_or_default()
        };
        let cert = required(self, "cert", &tls.cert);
        let key = required(self, "key", &tls.key);
        let client_ca = self.absolute_path(&format!("{section}.tls.client_ca"), &tls.client_ca);
        let client_cert_required = match tls.client_auth.as_deref() {
            None | Some("required") => client_ca.is_some(),
            Some("optional") => false,
            Some(other) => {
                self.problem(
                    format!("{section}.tls.client_auth"),
                    format!("{other:?} is not \"required\" or \"optional\""),
                );
                false
            }
        };
        if tls.client_auth.is_some() && client_ca.is_none() {
            self.problem(
                format!("{section}.tls.client_auth"),
                "given, but client_ca is not: client certificates need the CA that signs them",
            );
        }
        Transport::Tls(TlsSettings {
            cert,
            key,
            client_ca,
            client_cert_required,
        })
    }

    fn api(&mut self, raw: &RawApi) -> ApiSettings {
        let tcp_listen = raw.tcp_listen.as_deref().and_then(|s| match s.parse() {
            Ok(a) => Some(a),
            Err(_) => {
                self.problem("api.tcp_listen", format!("{s:?} is not ADDRESS:PORT"));
                None
            }
        });
        let tcp_transport = self.transport("api", tcp_listen, raw.plaintext, raw.tls.as_ref());
        let client_certs = matches!(&tcp_transport, Transport::Tls(t) if t.client_ca.is_some());
        if raw.tcp_listen.is_some() && raw.token_file.is_none() && !client_certs {
            self.problem(
                "api.token_file",
                "missing: api.tcp_listen is set and the TCP API only serves requests with a bearer \
                 token or a client certificate (api.tls.client_ca)",
            );
        }
        if let Some(group) = &raw.socket_group
            && (group.is_empty()
                || group.len() > 32
                || !group
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)))
        {
            self.problem(
                "api.socket_group",
                format!("{group:?} is not a group name (1-32 letters, digits, '-', '_', '.')"),
            );
        }
        ApiSettings {
            socket: self.absolute_path("api.socket", &raw.socket),
            socket_group: raw.socket_group.clone(),
            tcp_listen,
            tcp_transport,
            token_file: self.absolute_path("api.token_file", &raw.token_file),
            audit_log: self.absolute_path("api.audit_log", &raw.audit_log),
            state_file: self.absolute_path("api.state_file", &raw.state_file),
            audit_failure: raw
                .audit_failure
                .as_deref()
                .map_or(AuditFailure::default(), |s| {
                    s.parse().unwrap_or_else(|e: String| {
                        self.problem("api.audit_failure", e);
                        AuditFailure::default()
                    })
                }),
        }
    }

    fn config(&mut self, raw: &RawConfig) -> Config {
        let mut balancer = self.balancer(&raw.balancer);
        self.conntrack(&raw.conntrack, &mut balancer);
        let metrics = self.metrics(&raw.metrics);
        let api = self.api(&raw.api);
        let log_level = raw.log.level.clone();
        let log_format = self.log_format(&raw.log);
        if let Some(level) = &log_level
            && let Err(e) = tracing_subscriber::EnvFilter::try_new(level)
        {
            self.problem(
                "log.level",
                format!("{level:?} is not a log filter (e.g. \"info\", \"lb=debug,info\"): {e}"),
            );
        }
        let mut vips = Vec::new();
        // File index of each VIP that parsed, for the whole-config checks.
        let mut index = Vec::new();
        for (i, rv) in raw.vip.iter().enumerate() {
            if let Some(vip) = self.vip(&format!("vip[{i}]"), rv, &balancer) {
                vips.push(vip);
                index.push(i);
            }
        }
        if raw.vip.len() > balancer.max_vips as usize && vips.len() <= balancer.max_vips as usize {
            self.problem(
                "vip",
                format!(
                    "{} VIPs but balancer.max_vips is {}",
                    raw.vip.len(),
                    balancer.max_vips
                ),
            );
        }
        let bgp = raw.bgp.as_ref().and_then(|b| self.bgp(b, &balancer));
        let fleet = raw.fleet.as_ref().and_then(|f| self.fleet(f));
        if fleet.is_some() && api.state_file.is_some() {
            self.problem(
                "api.state_file",
                "with [fleet] the fleet holds the VIPs (fleet.cache_file keeps the revision applied last): remove api.state_file",
            );
        }
        let config = Config {
            balancer,
            metrics,
            api,
            log_level,
            log_format,
            bgp,
            fleet,
            vips,
        };
        self.whole(&config, &index);
        config
    }

    /// The checks that span the config (see [`validate`]); `index[i]` is
    /// the position of `config.vips[i]` among the file's `[[vip]]` tables.
    fn whole(&mut self, config: &Config, index: &[usize]) {
        let b = &config.balancer;
        let vip_addrs: HashSet<IpAddr> = config.vips.iter().map(|v| v.addr.addr).collect();
        let sources: Vec<IpAddr> = [b.source_v4.map(IpAddr::from), b.source_v6.map(IpAddr::from)]
            .into_iter()
            .flatten()
            .collect();
        let mut seen = HashSet::new();
        let (mut need_v4, mut need_v6) = (None, None);
        let mut total = 0usize;
        for (vip, &i) in config.vips.iter().zip(index) {
            let path = format!("vip[{i}]");
            if !seen.insert(vip.addr) {
                self.problem(&path, format!("duplicate VIP {}", vip.addr));
            }
            let a = vip.addr.addr;
            if let Some(why) = unusable_address(a, true) {
                self.problem(
                    format!("{path}.address"),
                    format!("{a} is {why}: it cannot be a VIP"),
                );
            } else if sources.contains(&a) {
                self.problem(
                    format!("{path}.address"),
                    format!("{a} is the balancer's own source address (balancer.source_v4/v6): it cannot be a VIP"),
                );
            }
            let mut addrs = HashSet::new();
            for (j, backend) in vip.backends.iter().enumerate() {
                let bpath = format!("{path}.backends[{j}]");
                let ba = backend.addr;
                if !addrs.insert(ba) {
                    self.problem(
                        format!("{bpath}.address"),
                        format!("duplicate backend {ba} in this VIP"),
                    );
                }
                if let Some(why) = unusable_address(ba, false) {
                    self.problem(
                        format!("{bpath}.address"),
                        format!("{ba} is {why}: it cannot be a backend"),
                    );
                } else if vip_addrs.contains(&ba) {
                    self.problem(
                        format!("{bpath}.address"),
                        format!(
                            "{ba} is a VIP: its packets would come back to the balancer (a loop)"
                        ),
                    );
                } else if sources.contains(&ba) {
                    self.problem(
                        format!("{bpath}.address"),
                        format!("{ba} is the balancer itself (balancer.source_v4/v6): it cannot be a backend"),
                    );
                }
                if backend.weight > MAX_WEIGHT {
                    self.problem(
                        format!("{bpath}.weight"),
                        format!("{} is out of range 0..={MAX_WEIGHT}", backend.weight),
                    );
                }
                let slot = if ba.is_ipv4() {
                    &mut need_v4
                } else {
                    &mut need_v6
                };
                slot.get_or_insert(bpath);
            }
            if vip.backends.len() >= b.table_size as usize {
                self.problem(
                    format!("{path}.backends"),
                    format!(
                        "{} backends do not fit a Maglev table of {} entries",
                        vip.backends.len(),
                        b.table_size
                    ),
                );
            }
            total += vip.backends.len();
            if let Some(bgp) = &config.bgp {
                let v6 = a.is_ipv6();
                if !bgp.neighbors.iter().any(|n| n.address.is_ipv6() == v6) {
                    self.problem(
                        format!("{path}.address"),
                        format!(
                            "{a} could never be announced: bgp.neighbors has no {} neighbor (a BGP session announces its own address family)",
                            if v6 { "IPv6" } else { "IPv4" }
                        ),
                    );
                }
            }
        }
        if config.vips.len() > b.max_vips as usize {
            self.problem(
                "vip",
                format!(
                    "{} VIPs but balancer.max_vips is {}",
                    config.vips.len(),
                    b.max_vips
                ),
            );
        }
        if total > b.max_backends as usize {
            self.problem(
                "vip",
                format!(
                    "{total} backends in all but balancer.max_backends is {}",
                    b.max_backends
                ),
            );
        }
        if let (Some(user), None) = (need_v4, b.source_v4) {
            self.problem(
                "balancer.source_v4",
                format!(
                    "missing: {user} is an IPv4 backend and needs an IPv4 outer source address"
                ),
            );
        }
        if let (Some(user), None) = (need_v6, b.source_v6) {
            self.problem(
                "balancer.source_v6",
                format!(
                    "missing: {user} is an IPv6 backend and needs an IPv6 outer source address"
                ),
            );
        }
    }

    fn fleet(&mut self, raw: &RawFleet) -> Option<crate::fleet::FleetSettings> {
        use crate::fleet::{self, FleetSettings};
        let before = self.problems.len();
        if raw.endpoints.is_empty() {
            self.problem(
                "fleet.endpoints",
                "missing: list the etcd members' client URLs, e.g. [\"https://10.0.0.21:2379\"]",
            );
        }
        let tls = raw.ca_file.is_some() || raw.cert_file.is_some();
        let mut endpoints = Vec::new();
        for (i, e) in raw.endpoints.iter().enumerate() {
            match fleet::endpoint_url(e, tls) {
                Ok(url) => endpoints.push(url),
                Err(message) => self.problem(format!("fleet.endpoints[{i}]"), message),
            }
        }
        let prefix = match raw.prefix.as_deref() {
            None => {
                self.problem(
                    "fleet.prefix",
                    "missing: give the fleet's key prefix in etcd, e.g. \"/lb/edge-1\"",
                );
                String::new()
            }
            Some(p) => match fleet::check_prefix(p) {
                Ok(()) => p.to_string(),
                Err(message) => {
                    self.problem("fleet.prefix", message);
                    String::new()
                }
            },
        };
        let name = match raw.name.clone().or_else(fleet::host_name) {
            None => {
                self.problem(
                    "fleet.name",
                    "missing: this host has no host name to default to; give the balancer's name",
                );
                String::new()
            }
            Some(n) => match fleet::check_name(&n) {
                Ok(()) => n,
                Err(message) => {
                    self.problem("fleet.name", message);
                    String::new()
                }
            },
        };
        let lease_ttl = self
            .seconds("fleet.lease_ttl", raw.lease_ttl, (2.0, 60.0))
            .unwrap_or(fleet::DEFAULT_LEASE_TTL);
        let cache_file = self.file("fleet.cache_file", &raw.cache_file);
        let down_quorum = self
            .number("fleet.down_quorum", raw.down_quorum, (0.0, 0.99))
            .unwrap_or(fleet::DEFAULT_DOWN_QUORUM);
        let ca_file = self.file("fleet.ca_file", &raw.ca_file);
        let cert_file = self.file("fleet.cert_file", &raw.cert_file);
        let key_file = self.file("fleet.key_file", &raw.key_file);
        if cert_file.is_some() != key_file.is_some() {
            self.problem(
                if cert_file.is_some() {
                    "fleet.key_file"
                } else {
                    "fleet.cert_file"
                },
                "missing: a client certificate needs both cert_file and key_file",
            );
        }
        let password_file = self.file("fleet.password_file", &raw.password_file);
        if raw.user.is_some() != password_file.is_some() {
            self.problem(
                if raw.user.is_some() {
                    "fleet.password_file"
                } else {
                    "fleet.user"
                },
                "missing: etcd authentication needs both user and password_file",
            );
        }
        if let Some(u) = &raw.user
            && (u.is_empty() || u.chars().any(char::is_control))
        {
            self.problem("fleet.user", format!("{u:?} is not an etcd user name"));
        }
        if self.problems.len() > before {
            return None;
        }
        Some(FleetSettings {
            endpoints,
            prefix,
            name,
            lease_ttl,
            cache_file,
            ca_file,
            client_cert: cert_file.zip(key_file),
            user: raw.user.clone().zip(password_file),
            down_quorum,
        })
    }

    fn bgp(&mut self, raw: &RawBgp, balancer: &BalancerSettings) -> Option<BgpSettings> {
        let before = self.problems.len();
        let router_id = match raw.router_id.as_deref() {
            Some(s) => {
                match s.parse::<Ipv4Addr>() {
                    Ok(a) if !a.is_unspecified() => Some(a),
                    _ => {
                        self.problem(
                        "bgp.router_id",
                        format!("{s:?} is not a BGP router id (an IPv4 address such as \"10.0.0.1\")"),
                    );
                        None
                    }
                }
            }
            None => {
                if balancer.source_v4.is_none() {
                    self.problem(
                        "bgp.router_id",
                        "missing: give an IPv4 address (it defaults to balancer.source_v4, which is not set)",
                    );
                }
                balancer.source_v4
            }
        };
        let asn = |v: &mut Self, field: &str, value: Option<i64>| -> u32 {
            match value {
                None => {
                    v.problem(field, "missing: give the AS number (1..=4294967294)");
                    0
                }
                Some(n) if !(1..=4_294_967_294).contains(&n) || n == 23456 => {
                    v.problem(
                        field,
                        format!("{n} is not a usable AS number (1..=4294967294, not 23456)"),
                    );
                    0
                }
                Some(n) => n as u32,
            }
        };
        let local_as = asn(self, "bgp.local_as", raw.local_as);
        if raw.neighbors.is_empty() {
            self.problem(
                "bgp.neighbors",
                "missing: list at least one router, e.g. neighbors = [{ address = \"10.0.0.1\", as = 65000 }]",
            );
        }
        let mut neighbors = Vec::new();
        let mut seen = HashSet::new();
        for (i, n) in raw.neighbors.iter().enumerate() {
            let path = format!("bgp.neighbors[{i}]");
            let address = self.addr(&join(&path, "address"), &n.address);
            if let Some(a) = address
                && !seen.insert(a)
            {
                self.problem(join(&path, "address"), format!("duplicate neighbor {a}"));
            }
            let remote_as = asn(self, &join(&path, "as"), Some(n.remote_as));
            let port = self.port(&join(&path, "port"), n.port).unwrap_or(179);
            if let Some(address) = address {
                neighbors.push(BgpNeighbor {
                    address,
                    remote_as,
                    port,
                });
            }
        }
        let hold_time = self.int("bgp.hold_time", raw.hold_time, 9, (3, 65535)) as u16;
        let bird_dir = raw.bird_dir.as_deref().and_then(|p| {
            if !p.starts_with('/') || p.contains(['"', '\n', '\\']) {
                self.problem(
                    "bgp.bird_dir",
                    format!(
                        "{p:?} is not an absolute path without quotes, backslashes or newlines"
                    ),
                );
                None
            } else {
                Some(PathBuf::from(p))
            }
        });
        let bird_binary = match raw.bird_binary.as_deref() {
            None => PathBuf::from("bird"),
            Some("") => {
                self.problem("bgp.bird_binary", "empty: give a program name or path");
                PathBuf::from("bird")
            }
            Some(p) => PathBuf::from(p),
        };
        let on_shutdown = match raw.on_shutdown.as_deref() {
            None => ShutdownPolicy::default(),
            Some(s) => match s.parse() {
                Ok(p) => p,
                Err(e) => {
                    self.problem("bgp.on_shutdown", e);
                    ShutdownPolicy::default()
                }
            },
        };
        let dead_after = Duration::from_secs(
            self.int("bgp.dead_after", raw.dead_after, 10, (1, 3600))
                .into(),
        );
        if self.problems.len() > before {
            return None;
        }
        Some(BgpSettings {
            router_id: router_id?,
            local_as,
            neighbors,
            hold_time,
            bfd: raw.bfd.unwrap_or(false),
            bird_dir,
            bird_binary,
            start_bird: raw.start_bird.unwrap_or(true),
            on_shutdown,
            dead_after,
        })
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
            (1, lb_common::MAX_BACKEND_IDS),
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
        let too_big_icmp = match raw.too_big.as_deref() {
            None | Some("icmp") => true,
            Some("drop") => false,
            Some(other) => {
                self.problem(
                    "balancer.too_big",
                    format!("{other:?} is not \"icmp\" or \"drop\""),
                );
                true
            }
        };
        let fragments_pass = match raw.fragments.as_deref() {
            None | Some("drop") => false,
            Some("pass") => true,
            Some(other) => {
                self.problem(
                    "balancer.fragments",
                    format!("{other:?} is not \"drop\" or \"pass\""),
                );
                false
            }
        };
        BalancerSettings {
            source_v4,
            source_v6,
            mtu,
            table_size,
            max_vips,
            max_backends,
            icmp_echo: raw.icmp_echo.unwrap_or(true),
            too_big_icmp,
            fragments_pass,
            extra_macs: self.extra_macs(raw.extra_macs.as_deref().unwrap_or_default()),
            ..BalancerSettings::default()
        }
    }

    /// `balancer.extra_macs`: unicast, not zero, no repeats, at most
    /// `MAX_EXTRA_MACS`.
    fn extra_macs(&mut self, raw: &[String]) -> Vec<[u8; 6]> {
        if raw.len() > lb_common::MAX_EXTRA_MACS {
            self.problem(
                "balancer.extra_macs",
                format!("{} MACs; at most {}", raw.len(), lb_common::MAX_EXTRA_MACS),
            );
        }
        let mut macs = Vec::new();
        for (i, s) in raw.iter().enumerate() {
            let field = format!("balancer.extra_macs[{i}]");
            match crate::host::interface::parse_mac(s) {
                None => self.problem(field, format!("{s:?} is not a MAC address (aa:bb:cc:dd:ee:ff)")),
                Some(m) if m[0] & 1 != 0 => self.problem(
                    field,
                    format!("{s:?} is a multicast or broadcast address; only unicast frames are the balancer's"),
                ),
                Some([0, 0, 0, 0, 0, 0]) => self.problem(field, format!("{s:?} is not an address")),
                Some(m) if macs.contains(&m) => self.problem(field, format!("{s:?} is listed twice")),
                Some(m) => macs.push(m),
            }
        }
        macs
    }

    fn vip(&mut self, path: &str, raw: &RawVip, balancer: &BalancerSettings) -> Option<Vip> {
        let addr = self.addr(&join(path, "address"), &raw.address);
        let port = self.int(&join(path, "port"), Some(raw.port), 0, (0, 65535)) as u16;
        let protocol = match raw.protocol.parse::<Protocol>() {
            Ok(p) => Some(p),
            Err(e) => {
                self.problem(join(path, "protocol"), e);
                None
            }
        };
        let mut scheduler = match raw.scheduler.as_deref().map(str::parse::<Scheduler>) {
            None => Scheduler::default(),
            Some(Ok(s)) => s,
            Some(Err(e)) => {
                self.problem(join(path, "scheduler"), e);
                Scheduler::default()
            }
        };
        match (raw.hash_fields.as_deref(), &mut scheduler) {
            (None, _) => {}
            (Some(f @ ("address" | "address-port")), Scheduler::MaglevSrc { with_port }) => {
                *with_port = f == "address-port";
            }
            (Some("address" | "address-port"), other) => self.problem(
                join(path, "hash_fields"),
                format!("only the \"maglev-src\" scheduler hashes by source, not \"{other}\""),
            ),
            (Some(f), _) => self.problem(
                join(path, "hash_fields"),
                format!("{f:?} is not \"address\" or \"address-port\""),
            ),
        }
        let load_cap = self
            .number(&join(path, "load_cap"), raw.load_cap, (1.0, 100.0))
            .map(|c| (c * 100.0).round() as u32);
        if load_cap.is_some() && !matches!(scheduler, Scheduler::MaglevSrc { .. }) {
            self.problem(
                join(path, "load_cap"),
                format!(
                    "only the \"maglev-src\" scheduler takes a load cap, not \"{scheduler}\" (\"least-conn\" balances active flows by itself)"
                ),
            );
        }
        if raw.second_chance == Some(true)
            && !matches!(scheduler, Scheduler::Maglev | Scheduler::MaglevSrc { .. })
        {
            self.problem(
                join(path, "second_chance"),
                format!(
                    "only the \"maglev\" and \"maglev-src\" schedulers can name a flow's previous backend, not \"{scheduler}\" (its choices do not follow from the packet)"
                ),
            );
        }
        let on_backend_down = match raw.on_backend_down.as_deref().map(str::parse::<DownPolicy>) {
            None => DownPolicy::default(),
            Some(Ok(p)) => p,
            Some(Err(e)) => {
                self.problem(join(path, "on_backend_down"), e);
                DownPolicy::default()
            }
        };
        let on_all_down = match raw.on_all_down.as_deref().map(str::parse::<AllDownPolicy>) {
            None => AllDownPolicy::default(),
            Some(Ok(p)) => p,
            Some(Err(e)) => {
                self.problem(join(path, "on_all_down"), e);
                AllDownPolicy::default()
            }
        };
        let slow_start = self
            .seconds(&join(path, "slow_start"), raw.slow_start, (0.0, 3600.0))
            .unwrap_or(Duration::ZERO);
        let health = raw
            .health
            .as_ref()
            .map(|h| self.health(&join(path, "health"), h));
        let load = raw.load.as_ref().map(|l| self.load(&join(path, "load"), l));
        let mut backends = Vec::new();
        let mut seen = HashSet::new();
        for (j, rb) in raw.backends.iter().enumerate() {
            let bpath = join(path, &format!("backends[{j}]"));
            if let Some(b) = self.backend(&bpath, rb) {
                if !seen.insert(b.addr) {
                    self.problem(
                        join(&bpath, "address"),
                        format!("duplicate backend {} in this VIP", b.addr),
                    );
                }
                backends.push(b);
            }
        }
        if backends.len() >= balancer.table_size as usize {
            self.problem(
                join(path, "backends"),
                format!(
                    "{} backends do not fit a Maglev table of {} entries (use at least 100 entries per backend)",
                    backends.len(),
                    balancer.table_size
                ),
            );
        }
        let vip = Vip {
            addr: VipAddr {
                addr: addr?,
                port,
                protocol: protocol?,
            },
            scheduler,
            backends,
            on_backend_down,
            on_all_down,
            slow_start,
            health,
            load,
            load_cap,
            second_chance: raw.second_chance,
        };
        self.vip_policies(path, &vip);
        Some(vip)
    }

    fn backend(&mut self, path: &str, raw: &RawBackend) -> Option<Backend> {
        let addr = self.addr(&join(path, "address"), &raw.address);
        if let Some(a) = addr
            && a.is_loopback()
        {
            self.problem(join(path, "address"), format!("{a} is a loopback address"));
        }
        let weight = self.int(
            &join(path, "weight"),
            raw.weight,
            DEFAULT_WEIGHT,
            (0, MAX_WEIGHT),
        );
        let health = raw
            .health
            .as_ref()
            .map(|h| self.health(&join(path, "health"), h))
            .unwrap_or_default();
        let load = raw
            .load
            .as_ref()
            .map(|l| self.load(&join(path, "load"), l))
            .unwrap_or_default();
        for (set, field) in [
            (load.on_saturated.is_some(), "on_saturated"),
            (load.churn_hold.is_some(), "churn_hold"),
        ] {
            if set {
                self.problem(
                    join(path, &format!("load.{field}")),
                    "a setting of the whole VIP: set it in the VIP's [vip.load] table",
                );
            }
        }
        Some(Backend {
            addr: addr?,
            weight,
            drained: raw.drained,
            health,
            load,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desired::policy::SaturatedPolicy;
    use crate::steering::engines::Engine;

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

    const BGP: &str = "[bgp]\nlocal_as = 65010\nneighbors = [{ address = \"192.0.2.254\", as = 65000 }, { address = \"2001:db8::fe\", as = 65000 }]\n";

    #[test]
    fn bgp_section_parses_with_defaults() {
        let c = parse(&format!("{BGP}{GOOD}"), "test.toml").unwrap();
        let b = c.bgp.unwrap();
        // The router id defaults to the IPv4 source address.
        assert_eq!(b.router_id, "192.0.2.1".parse::<Ipv4Addr>().unwrap());
        assert_eq!(
            (b.local_as, b.hold_time, b.bfd, b.start_bird),
            (65010, 9, false, true)
        );
        assert_eq!(b.neighbors[1].port, 179);
        assert_eq!(b.on_shutdown, ShutdownPolicy::Keep);
        assert_eq!(b.dead_after, Duration::from_secs(10));
        assert!(parse(GOOD, "test.toml").unwrap().bgp.is_none());
    }

    #[test]
    fn bad_bgp_settings_are_named() {
        let cases = [
            (
                "local_as = 65010",
                "local_as = 0",
                "bgp.local_as",
                "not a usable AS number",
            ),
            (
                "local_as = 65010",
                "local_as = 23456",
                "bgp.local_as",
                "23456",
            ),
            (
                "local_as = 65010",
                "router_id = \"10.0.0.300\"\nlocal_as = 65010",
                "bgp.router_id",
                "10.0.0.300",
            ),
            (
                "as = 65000 },",
                "as = 4294967295 },",
                "bgp.neighbors[0].as",
                "4294967295",
            ),
            (
                "\"192.0.2.254\"",
                "\"2001:db8::fe\"",
                "bgp.neighbors[1].address",
                "duplicate neighbor",
            ),
            (
                "local_as = 65010",
                "local_as = 65010\nhold_time = 2",
                "bgp.hold_time",
                "out of range 3..=65535",
            ),
            (
                "local_as = 65010",
                "local_as = 65010\non_shutdown = \"later\"",
                "bgp.on_shutdown",
                "\"later\"",
            ),
            (
                "local_as = 65010",
                "local_as = 65010\nbird_dir = \"run/bird\"",
                "bgp.bird_dir",
                "absolute path",
            ),
        ];
        for (from, to, field, message) in cases {
            assert!(BGP.contains(from), "{from}");
            assert_problem(
                &format!("{}{GOOD}", BGP.replacen(from, to, 1)),
                field,
                message,
            );
        }
        // No neighbours; no IPv6 neighbour for the IPv6 VIP.
        let none = "[bgp]\nlocal_as = 65010\n";
        assert_problem(
            &format!("{none}{GOOD}"),
            "bgp.neighbors",
            "at least one router",
        );
        let v4_only =
            "[bgp]\nlocal_as = 65010\nneighbors = [{ address = \"192.0.2.254\", as = 65000 }]\n";
        assert_problem(
            &format!("{v4_only}{GOOD}"),
            "vip[1].address",
            "no IPv6 neighbor",
        );
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
    fn saved_vips_read_back_the_same_and_the_rest_stays() {
        let dir = std::env::temp_dir().join(format!("lb-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("lbd.toml");
        let text = format!("# operator's comment\n{GOOD}");
        std::fs::write(&path, &text).unwrap();
        let mut c = parse(&text, "t").unwrap();
        c.vips[0].backends[0].drained = true;
        c.vips[0].on_backend_down = DownPolicy::Stick;
        c.vips.remove(1);
        save_vips(&path, &c.vips).unwrap();
        let saved = std::fs::read_to_string(&path).unwrap();
        assert!(saved.starts_with("# operator's comment"), "{saved}");
        assert_eq!(parse(&saved, "t").unwrap(), c, "{saved}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn vips_with_health_and_load_tables_save_as_valid_toml() {
        let dir = std::env::temp_dir().join(format!("lb-config-test-p-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("lbd.toml");
        // Two VIPs with tables, after other sections.
        let text = format!("{POLICIES}\n[metrics]\nlisten = \"127.0.0.1:9180\"\n");
        std::fs::write(&path, &text).unwrap();
        let mut c = parse(&text, "t").unwrap();
        let mut second = c.vips[0].clone();
        second.addr.port = 8001;
        c.vips.push(second);
        save_vips(&path, &c.vips).unwrap();
        let saved = std::fs::read_to_string(&path).unwrap();
        assert_eq!(parse(&saved, "t").unwrap(), c, "{saved}");
        let doc = VipsDocument {
            revision: Some(3),
            vips: c.vips.clone(),
        };
        let back = VipsDocument::from_toml(doc.to_toml().as_bytes(), &c.balancer).unwrap();
        assert_eq!(back, doc, "{}", doc.to_toml());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    const POLICIES: &str = r#"
        [balancer]
        source_v4 = "192.0.2.1"

        [[vip]]
        address = "203.0.113.10"
        port = 8000
        protocol = "tcp"
        on_all_down = "drop"
        slow_start = 30
        backends = [
            { address = "10.0.0.11", weight = 1 },
            { address = "10.0.0.12", weight = 1, health = { port = 8001 }, load = { metrics_port = 9001 } },
        ]
        [vip.health]
        check = "http"
        path = "/health"
        interval = 0.5
        timeout = 0.25
        rise = 2
        fall = 3
        [vip.load]
        metrics_port = 9000
        queue_limit = 8
        kv_limit = 0.9
        recovery = 2.5
    "#;

    #[test]
    fn the_example_config_is_valid() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/lbd.toml");
        let c = load(Path::new(path)).unwrap();
        assert!(c.vips[0].health.is_some() && c.vips[0].load.is_some());
    }

    #[test]
    fn health_and_load_tables_merge_per_backend() {
        use crate::desired::policy::{CheckKind, ScrapeTarget};
        let c = parse(POLICIES, "t").unwrap();
        let v = &c.vips[0];
        assert_eq!(v.on_all_down, AllDownPolicy::Drop);
        assert_eq!(v.slow_start, Duration::from_secs(30));
        let h0 = v.health_check(&v.backends[0]).unwrap();
        let h1 = v.health_check(&v.backends[1]).unwrap();
        assert_eq!(
            (h0.kind, h0.port, h0.path.as_str()),
            (CheckKind::Http, 8000, "/health")
        );
        assert_eq!(h0.interval, Duration::from_millis(500));
        assert_eq!(h1.port, 8001, "the backend's own port");
        let l0 = v.load_policy(&v.backends[0]).unwrap();
        let l1 = v.load_policy(&v.backends[1]).unwrap();
        assert_eq!((l0.queue_limit, l0.kv_limit), (8.0, 0.9));
        assert_eq!(l0.recovery, Duration::from_millis(2500));
        assert_eq!(
            l1.scrape,
            Some(ScrapeTarget {
                port: 9001,
                path: "/metrics".into(),
                http: Default::default(),
                interval: Duration::from_secs(1),
                timeout: Duration::from_millis(800),
                engine: None,
            })
        );
        // Without the tables: no checks, static weights.
        let g = parse(GOOD, "t").unwrap();
        assert!(g.vips[0].health_check(&g.vips[0].backends[0]).is_none());
        assert!(g.vips[0].load_policy(&g.vips[0].backends[0]).is_none());
    }

    #[test]
    fn engine_stall_and_shed_settings_are_read_and_saved_back() {
        let text = POLICIES.replace(
            "recovery = 2.5",
            "recovery = 2.5\nengine = \"sglang\"\nstall_after = 0.5\non_saturated = \"shed\"",
        );
        let c = parse(&text, "t").unwrap();
        let v = &c.vips[0];
        assert_eq!(v.on_saturated(), SaturatedPolicy::Shed);
        let p = v.load_policy(&v.backends[0]).unwrap();
        assert_eq!(p.stall_after, Duration::from_millis(500));
        assert_eq!(p.scrape.unwrap().engine, Some(Engine::Sglang));
        let dir = std::env::temp_dir().join(format!("lb-config-engine-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("lbd.toml");
        std::fs::write(&path, &text).unwrap();
        save_vips(&path, &c.vips).unwrap();
        let saved = std::fs::read_to_string(&path).unwrap();
        assert_eq!(parse(&saved, "t").unwrap(), c, "{saved}");
        std::fs::remove_dir_all(&dir).unwrap();
        // "auto" is detection, as when unset.
        let auto = parse(
            &POLICIES.replace("recovery = 2.5", "engine = \"auto\""),
            "t",
        )
        .unwrap();
        let v = &auto.vips[0];
        assert_eq!(
            v.load_policy(&v.backends[0])
                .unwrap()
                .scrape
                .unwrap()
                .engine,
            None
        );
    }

    #[test]
    fn bad_health_and_load_settings_are_named() {
        let bad = |from: &str, to: &str, field: &str, needle: &str| {
            assert!(POLICIES.contains(from), "{from}");
            assert_problem(&POLICIES.replacen(from, to, 1), field, needle);
        };
        bad(
            "check = \"http\"",
            "check = \"icmp\"",
            "vip[0].health.check",
            "icmp",
        );
        bad(
            "interval = 0.5",
            "interval = 0",
            "vip[0].health.interval",
            "out of range",
        );
        bad(
            "timeout = 0.25",
            "timeout = 1",
            "vip[0].health.timeout",
            "longer than the interval",
        );
        bad("rise = 2", "rise = 0", "vip[0].health.rise", "out of range");
        bad(
            "path = \"/health\"",
            "path = \"health\"",
            "vip[0].health.path",
            "not a URL path",
        );
        bad(
            "{ port = 8001 }",
            "{ port = 70000 }",
            "vip[0].backends[1].health.port",
            "out of range",
        );
        bad(
            "kv_limit = 0.9",
            "kv_limit = 1.5",
            "vip[0].load.kv_limit",
            "out of range",
        );
        bad(
            "queue_limit = 8",
            "queue_limit = -1",
            "vip[0].load.queue_limit",
            "out of range",
        );
        bad(
            "recovery = 2.5",
            "recovery = 2.5\nengine = \"vllm2\"",
            "vip[0].load.engine",
            "unknown engine \"vllm2\"",
        );
        bad(
            "recovery = 2.5",
            "recovery = 2.5\non_saturated = \"drop\"",
            "vip[0].load.on_saturated",
            "\"spread\" or \"shed\"",
        );
        bad(
            "recovery = 2.5",
            "recovery = 2.5\nstall_after = -1",
            "vip[0].load.stall_after",
            "out of range",
        );
        bad(
            "load = { metrics_port = 9001 }",
            "load = { on_saturated = \"shed\" }",
            "vip[0].backends[1].load.on_saturated",
            "a setting of the whole VIP",
        );
        bad(
            "on_all_down = \"drop\"",
            "on_all_down = \"panic\"",
            "vip[0].on_all_down",
            "panic",
        );
        bad(
            "on_all_down = \"drop\"",
            "scheduler = \"rr\"",
            "vip[0].scheduler",
            "least-load",
        );
        bad(
            "on_all_down = \"drop\"",
            "hash_fields = \"address\"",
            "vip[0].hash_fields",
            "only the \"maglev-src\" scheduler",
        );
        bad(
            "on_all_down = \"drop\"",
            "scheduler = \"maglev-src\"\nhash_fields = \"port\"",
            "vip[0].hash_fields",
            "\"port\" is not",
        );
        bad(
            "slow_start = 30",
            "slow_start = 7200",
            "vip[0].slow_start",
            "out of range",
        );
        bad("port = 8000", "port = 0", "vip[0].health.port", "port 0");
    }

    #[test]
    fn schedulers_parse_and_survive_saving() {
        let dir = std::env::temp_dir().join(format!("lb-config-sched-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("lbd.toml");
        for (text, want) in [
            ("scheduler = \"maglev\"", Scheduler::Maglev),
            (
                "scheduler = \"maglev-src\"",
                Scheduler::MaglevSrc { with_port: false },
            ),
            (
                "scheduler = \"maglev-src\"\nhash_fields = \"address-port\"",
                Scheduler::MaglevSrc { with_port: true },
            ),
            ("scheduler = \"wrr\"", Scheduler::Wrr),
            ("scheduler = \"least-load\"", Scheduler::LeastLoad),
            ("scheduler = \"least-conn\"", Scheduler::LeastConn),
        ] {
            let config = GOOD.replacen("port = 80", &format!("port = 80\n{text}"), 1);
            let c = parse(&config, "t").unwrap();
            assert_eq!(c.vips[0].scheduler, want, "{text}");
            std::fs::write(&path, &config).unwrap();
            save_vips(&path, &c.vips).unwrap();
            let saved = parse(&std::fs::read_to_string(&path).unwrap(), "t").unwrap();
            assert_eq!(saved.vips[0].scheduler, want, "{text}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn load_caps_take_maglev_src_only_and_survive_saving() {
        let with = |text: &str| GOOD.replacen("port = 80", &format!("port = 80\n{text}"), 1);
        for (text, want) in [
            ("scheduler = \"maglev-src\"\nload_cap = 1.25", Some(125)),
            ("scheduler = \"maglev-src\"\nload_cap = 2", Some(200)),
            ("scheduler = \"maglev-src\"", None),
        ] {
            let c = parse(&with(text), "t").unwrap();
            assert_eq!(c.vips[0].load_cap, want, "{text}");
            let saved = toml::to_string(&RawVip::of(&c.vips[0])).unwrap();
            assert_eq!(saved.contains("load_cap"), want.is_some(), "{saved}");
        }
        assert_problem(
            &with("scheduler = \"least-conn\"\nload_cap = 1.5"),
            "vip[0].load_cap",
            "only the \"maglev-src\" scheduler takes a load cap",
        );
        assert_problem(
            &with("scheduler = \"maglev-src\"\nload_cap = 0.5"),
            "vip[0].load_cap",
            "out of range",
        );
        assert_problem(
            &format!("{GOOD}\n[conntrack]\nsweep_interval = 0\n"),
            "conntrack.sweep_interval",
            "out of range",
        );
    }

    #[test]
    fn the_fleet_section_is_validated() {
        let fleet = |body: &str| {
            with(
                "mtu = 1500",
                &format!("mtu = 1500\n[fleet]\n{body}\n[api]\n"),
            )
        };
        let ok = parse(
            &fleet("endpoints = [\"10.0.0.21:2379\", \"https://10.0.0.22:2379\"]\nprefix = \"/lb/edge\"\nname = \"lb-1\"\nca_file = \"/etc/lb/etcd-ca.pem\"\nlease_ttl = 3"),
            "t",
        )
        .unwrap();
        let f = ok.fleet.unwrap();
        assert_eq!(
            f.endpoints,
            ["https://10.0.0.21:2379", "https://10.0.0.22:2379"]
        );
        assert_eq!(f.lease_ttl, Duration::from_secs(3));
        assert_eq!(f.member_key(), "/lb/edge/members/lb-1");
        assert!(parse(GOOD, "t").unwrap().fleet.is_none());
        assert_problem(&fleet("prefix = \"/lb\""), "fleet.endpoints", "missing");
        assert_problem(
            &fleet("endpoints = [\"x\"]\nprefix = \"/lb\""),
            "fleet.endpoints[0]",
            "HOST:PORT",
        );
        assert_problem(&fleet("endpoints = [\"x:1\"]"), "fleet.prefix", "missing");
        assert_problem(
            &fleet("endpoints = [\"x:1\"]\nprefix = \"lb/\""),
            "fleet.prefix",
            "not a key prefix",
        );
        assert_problem(
            &fleet("endpoints = [\"x:1\"]\nprefix = \"/lb\"\nname = \"a b\""),
            "fleet.name",
            "not a member name",
        );
        assert_problem(
            &fleet("endpoints = [\"x:1\"]\nprefix = \"/lb\"\nlease_ttl = 1"),
            "fleet.lease_ttl",
            "",
        );
        assert_problem(
            &fleet("endpoints = [\"x:1\"]\nprefix = \"/lb\"\ncert_file = \"/c\""),
            "fleet.key_file",
            "both",
        );
        assert_problem(
            &fleet("endpoints = [\"x:1\"]\nprefix = \"/lb\"\nuser = \"lb\""),
            "fleet.password_file",
            "both",
        );
        let unknown = parse(
            &fleet("endpoints = [\"x:1\"]\nprefix = \"/lb\"\nsecret = 1"),
            "t",
        )
        .unwrap_err();
        assert!(
            unknown.to_string().contains("unknown field `secret`"),
            "{unknown}"
        );
        let both = fleet("endpoints = [\"x:1\"]\nprefix = \"/lb\"")
            .replace("[api]\n", "[api]\nstate_file = \"/var/lib/lb/s.toml\"\n");
        assert_problem(&both, "api.state_file", "remove api.state_file");
        // A reload cannot join or leave a fleet.
        let a = parse(GOOD, "t").unwrap();
        let b = parse(&fleet("endpoints = [\"x:1\"]\nprefix = \"/lb\""), "t").unwrap();
        assert!(reload_problems(&a, &b).iter().any(|p| p.field == "fleet"));
    }

    #[test]
    fn second_chance_and_the_churn_hold_are_validated_and_survive_saving() {
        let with = |keys: &str, load: &str| {
            GOOD.replacen("port = 80", &format!("port = 80\n{keys}"), 1)
                .replacen(
                    "        ]\n\n        [[vip]]",
                    &format!("        ]\n{load}\n        [[vip]]"),
                    1,
                )
        };
        // On by default for maglev; no hold without load steering.
        let c = parse(GOOD, "t").unwrap();
        assert!(c.vips[0].second_chance());
        assert_eq!(c.vips[0].churn_hold_secs(), 0);
        let c = parse(&with("", "[vip.load]\nmetrics_port = 80\n"), "t").unwrap();
        assert_eq!(c.vips[0].churn_hold_secs(), 60);
        let text = with(
            "second_chance = false",
            "[vip.load]\nmetrics_port = 80\nchurn_hold = 12.5\n",
        );
        let c = parse(&text, "t").unwrap();
        assert!(!c.vips[0].second_chance());
        assert_eq!(c.vips[0].churn_hold_secs(), 13);
        let saved = toml::to_string(&RawVip::of(&c.vips[0])).unwrap();
        assert!(
            saved.contains("second_chance = false") && saved.contains("churn_hold = 12.5"),
            "{saved}"
        );
        // Other schedulers: off, and refused when asked for.
        let c = parse(&with("scheduler = \"wrr\"", ""), "t").unwrap();
        assert!(!c.vips[0].second_chance());
        assert_problem(
            &with("scheduler = \"least-conn\"\nsecond_chance = true", ""),
            "vip[0].second_chance",
            "only the \"maglev\" and \"maglev-src\" schedulers",
        );
        assert_problem(
            &with("", "[vip.load]\nchurn_hold = 4000\n"),
            "vip[0].load.churn_hold",
            "out of range",
        );
        assert_problem(
            &GOOD.replacen(
                "{ address = \"10.0.0.11\", weight = 1 }",
                "{ address = \"10.0.0.11\", weight = 1, load = { churn_hold = 5 } }",
                1,
            ),
            "vip[0].backends[0].load.churn_hold",
            "a setting of the whole VIP",
        );
    }

    #[test]
    fn policies_survive_saving() {
        let dir = std::env::temp_dir().join(format!("lb-config-policies-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("lbd.toml");
        std::fs::write(&path, POLICIES).unwrap();
        let c = parse(POLICIES, "t").unwrap();
        save_vips(&path, &c.vips).unwrap();
        let saved = std::fs::read_to_string(&path).unwrap();
        assert_eq!(parse(&saved, "t").unwrap(), c, "{saved}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn listeners_off_loopback_need_tls_or_an_explicit_plaintext() {
        let api = |extra: &str| format!("[api]\ntoken_file = \"/t\"\n{extra}\n{GOOD}");
        assert_problem(
            &api("tcp_listen = \"192.0.2.1:9443\""),
            "api.tls",
            "192.0.2.1:9443 is not a loopback address, so it needs TLS",
        );
        let c = parse(
            &api("tcp_listen = \"192.0.2.1:9443\"\nplaintext = true"),
            "t",
        )
        .unwrap();
        assert_eq!(c.api.tcp_transport, Transport::Plain { explicit: true });
        let c = parse(&api("tcp_listen = \"127.0.0.1:9443\""), "t").unwrap();
        assert_eq!(c.api.tcp_transport, Transport::Plain { explicit: false });
        let tls = "tcp_listen = \"192.0.2.1:9443\"\n[api.tls]\ncert = \"/c.pem\"\nkey = \"/k.pem\"";
        let c = parse(&api(tls), "t").unwrap();
        assert_eq!(
            c.api.tcp_transport,
            Transport::Tls(TlsSettings {
                cert: "/c.pem".into(),
                key: "/k.pem".into(),
                client_ca: None,
                client_cert_required: false,
            })
        );
        // Client certificates: required unless said otherwise; they may
        // replace the token file.
        let certs = "[api]\ntcp_listen = \"192.0.2.1:9443\"\n[api.tls]\ncert = \"/c\"\nkey = \"/k\"\nclient_ca = \"/ca\"\n";
        let c = parse(&format!("{certs}{GOOD}"), "t").unwrap();
        assert!(matches!(c.api.tcp_transport, Transport::Tls(t) if t.client_cert_required));
        let c = parse(&format!("{certs}client_auth = \"optional\"\n{GOOD}"), "t").unwrap();
        assert!(matches!(c.api.tcp_transport, Transport::Tls(t) if !t.client_cert_required));
        for (extra, field, says) in [
            (
                "tcp_listen = \"192.0.2.1:1\"\n[api.tls]\ncert = \"/c\"",
                "api.tls.key",
                "missing",
            ),
            (
                "tcp_listen = \"192.0.2.1:1\"\nplaintext = true\n[api.tls]\ncert = \"/c\"\nkey = \"/k\"",
                "api.plaintext",
                "choose one",
            ),
            (
                "tcp_listen = \"192.0.2.1:1\"\n[api.tls]\ncert = \"c\"\nkey = \"/k\"",
                "api.tls.cert",
                "not an absolute path",
            ),
            (
                "tcp_listen = \"192.0.2.1:1\"\n[api.tls]\ncert = \"/c\"\nkey = \"/k\"\nclient_auth = \"optional\"",
                "api.tls.client_auth",
                "client_ca is not",
            ),
            (
                "tcp_listen = \"192.0.2.1:1\"\n[api.tls]\ncert = \"/c\"\nkey = \"/k\"\nclient_ca = \"/ca\"\nclient_auth = \"sometimes\"",
                "api.tls.client_auth",
                "\"sometimes\" is not",
            ),
            (
                "[api.tls]\ncert = \"/c\"\nkey = \"/k\"",
                "api.tls",
                "api.tcp_listen is not set",
            ),
            (
                "socket_group = \"no group!\"",
                "api.socket_group",
                "is not a group name",
            ),
        ] {
            assert_problem(&api(extra), field, says);
        }
        assert_problem(
            &format!("[metrics]\nlisten = \"0.0.0.0:9180\"\n{GOOD}"),
            "metrics.tls",
            "metrics.listen 0.0.0.0:9180 is not a loopback address",
        );
        let c = parse(
            &format!("[metrics]\nlisten = \"0.0.0.0:9180\"\nplaintext = true\n{GOOD}"),
            "t",
        )
        .unwrap();
        assert_eq!(c.metrics.transport, Transport::Plain { explicit: true });
        // A reload cannot change them.
        let now = parse(&api("tcp_listen = \"127.0.0.1:9443\""), "t").unwrap();
        let next = parse(&api(tls), "t").unwrap();
        assert!(
            reload_problems(&now, &next)
                .iter()
                .any(|p| p.field == "api.tls")
        );
    }

    #[test]
    fn api_settings_need_a_token_file_for_tcp() {
        let c = parse(&format!("[api]\nsocket = \"/run/x.sock\"\n{GOOD}"), "t").unwrap();
        assert_eq!(c.api.socket, Some(PathBuf::from("/run/x.sock")));
        assert_problem(
            &format!("[api]\ntcp_listen = \"127.0.0.1:9181\"\n{GOOD}"),
            "api.token_file",
            "bearer token",
        );
        assert_problem(
            &format!("[api]\nsocket = \"relative.sock\"\n{GOOD}"),
            "api.socket",
            "absolute",
        );
    }

    #[test]
    fn log_level_is_a_checked_filter() {
        let c = parse(&format!("[log]\nlevel = \"lb=debug,info\"\n{GOOD}"), "t").unwrap();
        assert_eq!(c.log_level.as_deref(), Some("lb=debug,info"));
        assert_problem(
            &format!("[log]\nlevel = \"lb=loud\"\n{GOOD}"),
            "log.level",
            "lb=loud",
        );
    }

    #[test]
    fn too_many_vips_for_capacity() {
        let t = with("mtu = 1500", "mtu = 1500\nmax_vips = 1");
        assert_problem(&t, "vip", "2 VIPs but balancer.max_vips is 1");
    }

    #[test]
    fn addresses_that_cannot_work_are_refused_with_the_field_named() {
        let vip = |a: &str| with("address = \"203.0.113.10\"", &format!("address = \"{a}\""));
        for (a, why) in [
            ("255.255.255.255", "broadcast"),
            ("127.0.0.1", "loopback"),
            ("0.0.0.0", "not a unicast address"),
            ("224.0.0.5", "not a unicast address"),
            ("169.254.1.1", "link-local"),
            ("192.0.2.1", "source address"),
        ] {
            assert_problem(&vip(a), "vip[0].address", why);
        }
        let backend = |a: &str| with("address = \"10.0.0.11\"", &format!("address = \"{a}\""));
        for (a, why) in [
            ("255.255.255.255", "broadcast"),
            ("127.0.0.1", "loopback"),
            ("203.0.113.10", "is a VIP"),
            ("192.0.2.1", "the balancer itself"),
        ] {
            assert_problem(&backend(a), "vip[0].backends[0].address", why);
        }
        let v6 = |a: &str| {
            with(
                "address = \"2001:db8:20::1\"",
                &format!("address = \"{a}\""),
            )
        };
        assert_problem(&v6("fe80::1"), "vip[1].backends[0].address", "link-local");
        assert_problem(&v6("::1"), "vip[1].backends[0].address", "loopback");
        assert_problem(
            &v6("2001:db8:10::1"),
            "vip[1].backends[0].address",
            "is a VIP",
        );
        // IPv4 link-local backends are on the balancer's own link: they work.
        assert!(problems(&backend("169.254.0.7")).is_empty());
    }

    #[test]
    fn problems_name_the_file_index_even_after_a_vip_that_failed_to_parse() {
        let t = with("address = \"2001:db8:20::1\"", "address = \"::1\"")
            .replace("port = 80", "port = 99999");
        let p = problems(&t);
        assert!(p.iter().any(|p| p.field == "vip[0].port"), "{p:?}");
        assert!(
            p.iter().any(|p| p.field == "vip[1].backends[0].address"),
            "{p:?}"
        );
    }

    #[test]
    fn a_reload_may_not_change_a_capacity_or_a_start_only_setting() {
        let now = parse(GOOD, "t").unwrap();
        assert!(reload_problems(&now, &now).is_empty());
        let t =
            format!("[conntrack]\nsize = 2097152\n[metrics]\nlisten = \"127.0.0.1:9999\"\n{GOOD}");
        let next = parse(&t, "t").unwrap();
        let fields: Vec<String> = reload_problems(&now, &next)
            .into_iter()
            .map(|p| p.field)
            .collect();
        assert_eq!(fields, ["conntrack.size", "metrics.listen"]);
        // The same table: a size that rounds to the default is no change.
        let t = format!("[conntrack]\nsize = 4000000\n{GOOD}");
        assert!(reload_problems(&now, &parse(&t, "t").unwrap()).is_empty());
        let t = with("mtu = 1500", "mtu = 1500\nmax_backends = 8");
        let p = reload_problems(&now, &parse(&t, "t").unwrap());
        assert_eq!(p[0].field, "balancer.max_backends");
        assert!(p[0].message.contains("lbd --cleanup"), "{p:?}");
        // The log format, [bgp] itself, its BIRD directory and guard time
        // are start-only; its neighbours and the rest are reloaded.
        let fields = |now: &str, next: &str| -> Vec<String> {
            let (now, next) = (parse(now, "t").unwrap(), parse(next, "t").unwrap());
            reload_problems(&now, &next)
                .into_iter()
                .map(|p| p.field)
                .collect()
        };
        let bgp = format!("{BGP}{GOOD}");
        assert_eq!(
            fields(GOOD, &format!("[log]\nformat = \"json\"\n{GOOD}")),
            ["log.format"]
        );
        assert_eq!(fields(GOOD, &bgp), ["bgp"]);
        assert_eq!(fields(&bgp, GOOD), ["bgp"]);
        assert_eq!(
            fields(
                &bgp,
                &bgp.replace("[bgp]\n", "[bgp]\ndead_after = 20\nbird_dir = \"/run/b\"\n")
            ),
            ["bgp.bird_dir", "bgp.dead_after"]
        );
        assert!(fields(&bgp, &bgp.replace("local_as = 65010", "local_as = 65011")).is_empty());
    }

    #[test]
    fn extra_macs_are_unicast_addresses_listed_once() {
        let c = parse(
            &with(
                "mtu = 1500",
                "mtu = 1500\nextra_macs = [\"02:00:5E:00:01:0a\"]",
            ),
            "t",
        )
        .unwrap();
        assert_eq!(c.balancer.extra_macs, vec![[2, 0, 0x5e, 0, 1, 10]]);
        assert!(parse(GOOD, "t").unwrap().balancer.extra_macs.is_empty());
        let bad = |list: &str| with("mtu = 1500", &format!("mtu = 1500\nextra_macs = {list}"));
        assert_problem(
            &bad("[\"02:00:5e:00:01\"]"),
            "balancer.extra_macs[0]",
            "not a MAC address",
        );
        assert_problem(
            &bad("[\"02:00:00:00:00:01\", \"ff:ff:ff:ff:ff:ff\"]"),
            "balancer.extra_macs[1]",
            "broadcast",
        );
        assert_problem(
            &bad("[\"00:00:00:00:00:00\"]"),
            "balancer.extra_macs[0]",
            "not an address",
        );
        assert_problem(
            &bad("[\"02:00:00:00:00:01\", \"02:00:00:00:00:01\"]"),
            "balancer.extra_macs[1]",
            "twice",
        );
        let five: Vec<String> = (1..=5)
            .map(|i| format!("\"02:00:00:00:00:0{i}\""))
            .collect();
        assert_problem(
            &bad(&format!("[{}]", five.join(", "))),
            "balancer.extra_macs",
            "at most 4",
        );
    }
}
