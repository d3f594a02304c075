//! Per-VIP policies beyond the backends themselves: health checks, load
//! feedback, slow start and what happens when every backend is down.
//!
//! A VIP's `[vip.health]` and `[vip.load]` tables are defaults for its
//! backends; a backend's own `health = {...}` / `load = {...}` override
//! single fields (a different port or path, say). The tables are kept as
//! written (partial: unset fields are `None`) so that saving the config back
//! writes what the operator wrote; [`HealthConfig::resolve`] and
//! [`LoadConfig::resolve`] merge and fill in the defaults below.

use std::{fmt, path::PathBuf, str::FromStr, time::Duration};

use crate::steering::engines::Engine;

/// Default interval between health checks of one backend.
pub const DEFAULT_HEALTH_INTERVAL: Duration = Duration::from_secs(2);
/// Default time a health check may take.
pub const DEFAULT_HEALTH_TIMEOUT: Duration = Duration::from_secs(1);
/// Default successes in a row that bring a down backend up.
pub const DEFAULT_RISE: u32 = 2;
/// Default failures in a row that take an up backend down.
pub const DEFAULT_FALL: u32 = 3;
/// Default path of HTTP health checks.
pub const DEFAULT_HEALTH_PATH: &str = "/";
/// Default path of a backend's Prometheus endpoint.
pub const DEFAULT_METRICS_PATH: &str = "/metrics";
/// Default interval between load scrapes of one backend.
pub const DEFAULT_SCRAPE_INTERVAL: Duration = Duration::from_secs(1);
/// Default time a load scrape may take.
pub const DEFAULT_SCRAPE_TIMEOUT: Duration = Duration::from_millis(800);
/// Default queue depth (requests waiting) at which a node counts as saturated.
pub const DEFAULT_QUEUE_LIMIT: f64 = 5.0;
/// Default KV-cache use (0..1) at which a node counts as saturated.
pub const DEFAULT_KV_LIMIT: f64 = 0.8;
/// Default smallest share of its weight a loaded node keeps.
pub const DEFAULT_MIN_FACTOR: f64 = 0.05;
/// Default time constant of recovery: pressure that drops is followed
/// with this time constant (a rise is followed at once).
pub const DEFAULT_RECOVERY: Duration = Duration::from_secs(5);
/// Default age after which a load report no longer counts.
pub const DEFAULT_STALE_AFTER: Duration = Duration::from_secs(10);
/// Default time a node may have work and make no progress before it is
/// `stalled`.
pub const DEFAULT_STALL_AFTER: Duration = Duration::from_secs(30);

/// What a VIP does while every backend is past its load limit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum SaturatedPolicy {
    /// Spread new flows by the base weights (nowhere is better).
    #[default]
    Spread,
    /// Also drop a share of new connections' SYNs, growing with the
    /// overload: TCP retransmits them, so they wait at the client instead
    /// of in the nodes' queues (see `steering::shed_share`).
    Shed,
}

impl fmt::Display for SaturatedPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SaturatedPolicy::Spread => "spread",
            SaturatedPolicy::Shed => "shed",
        })
    }
}

impl FromStr for SaturatedPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "spread" => Ok(SaturatedPolicy::Spread),
            "shed" => Ok(SaturatedPolicy::Shed),
            _ => Err(format!(
                "unknown policy {s:?} (expected \"spread\" or \"shed\")"
            )),
        }
    }
}

/// How a backend is checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CheckKind {
    /// A TCP connection to the port is accepted.
    Tcp,
    /// `GET path` answers with an expected status (2xx by default).
    Http,
    /// The same over TLS, the backend's certificate verified.
    Https,
}

impl fmt::Display for CheckKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CheckKind::Tcp => "tcp",
            CheckKind::Http => "http",
            CheckKind::Https => "https",
        })
    }
}

impl FromStr for CheckKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "tcp" => Ok(CheckKind::Tcp),
            "http" => Ok(CheckKind::Http),
            "https" => Ok(CheckKind::Https),
            _ => Err(format!(
                "unknown check {s:?} (expected \"tcp\", \"http\" or \"https\")"
            )),
        }
    }
}

/// HTTP status codes a health check accepts: `lo..=hi` (written `200`, or
/// `"200-399"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StatusRange {
    pub lo: u16,
    pub hi: u16,
}

/// What HTTP checks accept unless told otherwise: 2xx.
pub const DEFAULT_EXPECT_STATUS: StatusRange = StatusRange { lo: 200, hi: 299 };

impl StatusRange {
    pub fn contains(&self, status: u16) -> bool {
        (self.lo..=self.hi).contains(&status)
    }
}

impl fmt::Display for StatusRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.lo == self.hi {
            write!(f, "{}", self.lo)
        } else {
            write!(f, "{}-{}", self.lo, self.hi)
        }
    }
}

impl FromStr for StatusRange {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let code = |t: &str| {
            t.trim()
                .parse::<u16>()
                .ok()
                .filter(|c| (100..=599).contains(c))
        };
        let (lo, hi) = match s.split_once('-') {
            Some((a, b)) => (code(a), code(b)),
            None => (code(s), code(s)),
        };
        match (lo, hi) {
            (Some(lo), Some(hi)) if lo <= hi => Ok(StatusRange { lo, hi }),
            _ => Err(format!(
                "{s:?} is not a status code or range of them (100..=599, e.g. 200 or \"200-399\")"
            )),
        }
    }
}

/// How an HTTP probe (health check or load scrape) talks to a backend.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HttpOptions {
    /// HTTPS: TLS, the backend's certificate verified against
    /// `ca_file` (or the system's trust store) for `host`, or for the
    /// backend's address without a `host`.
    pub tls: bool,
    /// The `Host` header (`NAME` or `NAME:PORT`); default the backend's
    /// `ADDRESS:PORT`.
    pub host: Option<String>,
    /// A PEM file of the CA certificates the backends' certificates are
    /// signed by; default the system's trust store.
    pub ca_file: Option<PathBuf>,
}

/// A `health` table as written: every field optional.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HealthConfig {
    pub check: Option<CheckKind>,
    pub port: Option<u16>,
    pub path: Option<String>,
    pub expect_status: Option<StatusRange>,
    pub host: Option<String>,
    pub ca_file: Option<PathBuf>,
    pub interval: Option<Duration>,
    pub timeout: Option<Duration>,
    pub rise: Option<u32>,
    pub fall: Option<u32>,
}

/// A backend's health check, defaults filled in.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct HealthCheck {
    pub kind: CheckKind,
    pub port: u16,
    /// HTTP(S) only.
    pub path: String,
    /// HTTP(S) only: the statuses that pass.
    pub expect: StatusRange,
    /// HTTP(S) only (`tls` follows the kind).
    pub http: HttpOptions,
    pub interval: Duration,
    pub timeout: Duration,
    pub rise: u32,
    pub fall: u32,
}

impl HealthConfig {
    /// Whether no field is set.
    pub fn is_empty(&self) -> bool {
        *self == HealthConfig::default()
    }

    /// `self` over `base`: fields set here win.
    pub fn over(&self, base: &HealthConfig) -> HealthConfig {
        HealthConfig {
            check: self.check.or(base.check),
            port: self.port.or(base.port),
            path: self.path.clone().or_else(|| base.path.clone()),
            expect_status: self.expect_status.or(base.expect_status),
            host: self.host.clone().or_else(|| base.host.clone()),
            ca_file: self.ca_file.clone().or_else(|| base.ca_file.clone()),
            interval: self.interval.or(base.interval),
            timeout: self.timeout.or(base.timeout),
            rise: self.rise.or(base.rise),
            fall: self.fall.or(base.fall),
        }
    }

    /// The check, defaults filled in; `vip_port` is the default port. Fails
    /// (naming the field) when the port is unknown (a port-0 VIP) or the
    /// timeout is longer than the interval.
    pub fn resolve(&self, vip_port: u16) -> Result<HealthCheck, (&'static str, String)> {
        let port = match self.port.or((vip_port != 0).then_some(vip_port)) {
            Some(p) if p != 0 => p,
            _ => {
                return Err((
                    "port",
                    "missing: the VIP takes every port (port 0), so health checks need a port"
                        .into(),
                ));
            }
        };
        let interval = self.interval.unwrap_or(DEFAULT_HEALTH_INTERVAL);
        let timeout = self.timeout.unwrap_or(DEFAULT_HEALTH_TIMEOUT.min(interval));
        if timeout > interval {
            return Err((
                "timeout",
                format!(
                    "{} s is longer than the interval ({} s)",
                    timeout.as_secs_f64(),
                    interval.as_secs_f64()
                ),
            ));
        }
        let kind = self.check.unwrap_or(CheckKind::Tcp);
        Ok(HealthCheck {
            kind,
            port,
            path: self
                .path
                .clone()
                .unwrap_or_else(|| DEFAULT_HEALTH_PATH.into()),
            expect: self.expect_status.unwrap_or(DEFAULT_EXPECT_STATUS),
            http: HttpOptions {
                tls: kind == CheckKind::Https,
                host: self.host.clone(),
                ca_file: self.ca_file.clone(),
            },
            interval,
            timeout,
            rise: self.rise.unwrap_or(DEFAULT_RISE),
            fall: self.fall.unwrap_or(DEFAULT_FALL),
        })
    }
}

/// A `load` table as written: every field optional.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LoadConfig {
    /// Scrape the backend's Prometheus endpoint on this port; `None`: no
    /// scraping (reports are pushed to the API).
    pub metrics_port: Option<u16>,
    pub metrics_path: Option<String>,
    /// `metrics_scheme = "https"`.
    pub metrics_tls: Option<bool>,
    pub metrics_host: Option<String>,
    pub metrics_ca_file: Option<PathBuf>,
    pub scrape_interval: Option<Duration>,
    pub scrape_timeout: Option<Duration>,
    pub queue_limit: Option<f64>,
    pub kv_limit: Option<f64>,
    pub min_factor: Option<f64>,
    pub recovery: Option<Duration>,
    pub stale_after: Option<Duration>,
    /// `Some(0)` turns stall detection off.
    pub stall_after: Option<Duration>,
    /// The engine the scraped page is read as: `Some(None)` is `"auto"`
    /// as written (detected, as when unset).
    pub engine: Option<Option<Engine>>,
    /// VIP-wide (the validator refuses it in a backend's `load`).
    pub on_saturated: Option<SaturatedPolicy>,
    /// VIP-wide: how long a table position that moved stays before load
    /// steering may move it again (see `lb_common::second_chance`).
    pub churn_hold: Option<Duration>,
}

/// Where and how often a backend's load is scraped.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ScrapeTarget {
    pub port: u16,
    pub path: String,
    pub http: HttpOptions,
    pub interval: Duration,
    pub timeout: Duration,
    /// How the page is read; `None`: the engine is detected.
    pub engine: Option<Engine>,
}

/// How a backend's load turns into its weight, defaults filled in.
#[derive(Clone, Debug, PartialEq)]
pub struct LoadPolicy {
    pub scrape: Option<ScrapeTarget>,
    pub queue_limit: f64,
    pub kv_limit: f64,
    pub min_factor: f64,
    pub recovery: Duration,
    pub stale_after: Duration,
    /// Work and no progress for this long: `stalled`; zero: never.
    pub stall_after: Duration,
}

impl LoadConfig {
    /// Whether no field is set.
    pub fn is_empty(&self) -> bool {
        *self == LoadConfig::default()
    }

    /// `self` over `base`: fields set here win.
    pub fn over(&self, base: &LoadConfig) -> LoadConfig {
        LoadConfig {
            metrics_port: self.metrics_port.or(base.metrics_port),
            metrics_path: self
                .metrics_path
                .clone()
                .or_else(|| base.metrics_path.clone()),
            metrics_tls: self.metrics_tls.or(base.metrics_tls),
            metrics_host: self
                .metrics_host
                .clone()
                .or_else(|| base.metrics_host.clone()),
            metrics_ca_file: self
                .metrics_ca_file
                .clone()
                .or_else(|| base.metrics_ca_file.clone()),
            scrape_interval: self.scrape_interval.or(base.scrape_interval),
            scrape_timeout: self.scrape_timeout.or(base.scrape_timeout),
            queue_limit: self.queue_limit.or(base.queue_limit),
            kv_limit: self.kv_limit.or(base.kv_limit),
            min_factor: self.min_factor.or(base.min_factor),
            recovery: self.recovery.or(base.recovery),
            stale_after: self.stale_after.or(base.stale_after),
            stall_after: self.stall_after.or(base.stall_after),
            engine: self.engine.or(base.engine),
            on_saturated: self.on_saturated.or(base.on_saturated),
            churn_hold: self.churn_hold.or(base.churn_hold),
        }
    }

    /// The policy, defaults filled in. Fails (naming the field) when the
    /// scrape timeout is longer than its interval.
    pub fn resolve(&self) -> Result<LoadPolicy, (&'static str, String)> {
        let scrape = match self.metrics_port {
            None => None,
            Some(port) => {
                let interval = self.scrape_interval.unwrap_or(DEFAULT_SCRAPE_INTERVAL);
                let timeout = self
                    .scrape_timeout
                    .unwrap_or(DEFAULT_SCRAPE_TIMEOUT.min(interval));
                if timeout > interval {
                    return Err((
                        "scrape_timeout",
                        format!(
                            "{} s is longer than scrape_interval ({} s)",
                            timeout.as_secs_f64(),
                            interval.as_secs_f64()
                        ),
                    ));
                }
                Some(ScrapeTarget {
                    port,
                    path: self
                        .metrics_path
                        .clone()
                        .unwrap_or_else(|| DEFAULT_METRICS_PATH.into()),
                    http: HttpOptions {
                        tls: self.metrics_tls.unwrap_or(false),
                        host: self.metrics_host.clone(),
                        ca_file: self.metrics_ca_file.clone(),
                    },
                    interval,
                    timeout,
                    engine: self.engine.flatten(),
                })
            }
        };
        Ok(LoadPolicy {
            scrape,
            queue_limit: self.queue_limit.unwrap_or(DEFAULT_QUEUE_LIMIT),
            kv_limit: self.kv_limit.unwrap_or(DEFAULT_KV_LIMIT),
            min_factor: self.min_factor.unwrap_or(DEFAULT_MIN_FACTOR),
            recovery: self.recovery.unwrap_or(DEFAULT_RECOVERY),
            stale_after: self.stale_after.unwrap_or(DEFAULT_STALE_AFTER),
            stall_after: self.stall_after.unwrap_or(DEFAULT_STALL_AFTER),
        })
    }
}

/// What a VIP does when health checks mark every backend down.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum AllDownPolicy {
    /// Keep the last table that had backends in it: traffic keeps going to
    /// the backends last known good (health checks can be wrong, e.g. when
    /// only the path from the balancer to the backends is broken).
    #[default]
    KeepLast,
    /// Take them out: the VIP's packets are dropped and counted as
    /// `no_backend`.
    Drop,
}

impl fmt::Display for AllDownPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AllDownPolicy::KeepLast => "keep_last",
            AllDownPolicy::Drop => "drop",
        })
    }
}

impl FromStr for AllDownPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "keep_last" => Ok(AllDownPolicy::KeepLast),
            "drop" => Ok(AllDownPolicy::Drop),
            _ => Err(format!(
                "unknown policy {s:?} (expected \"keep_last\" or \"drop\")"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_fields_override_the_vips_and_defaults_fill_the_rest() {
        let vip = HealthConfig {
            check: Some(CheckKind::Http),
            path: Some("/health".into()),
            ..Default::default()
        };
        let backend = HealthConfig {
            port: Some(8001),
            ..Default::default()
        };
        let c = backend.over(&vip).resolve(80).unwrap();
        assert_eq!(
            c,
            HealthCheck {
                kind: CheckKind::Http,
                port: 8001,
                path: "/health".into(),
                expect: DEFAULT_EXPECT_STATUS,
                http: HttpOptions::default(),
                interval: DEFAULT_HEALTH_INTERVAL,
                timeout: DEFAULT_HEALTH_TIMEOUT,
                rise: DEFAULT_RISE,
                fall: DEFAULT_FALL,
            }
        );
        assert_eq!(vip.resolve(80).unwrap().port, 80, "the VIP's port");
        assert_eq!(vip.resolve(0).unwrap_err().0, "port");
        let short = HealthConfig {
            interval: Some(Duration::from_millis(500)),
            ..Default::default()
        };
        assert_eq!(
            short.resolve(80).unwrap().timeout,
            Duration::from_millis(500),
            "the default timeout is capped at the interval"
        );
        let bad = HealthConfig {
            interval: Some(Duration::from_secs(1)),
            timeout: Some(Duration::from_secs(2)),
            ..Default::default()
        };
        assert_eq!(bad.resolve(80).unwrap_err().0, "timeout");
    }

    #[test]
    fn status_ranges_parse_and_bad_ones_are_named() {
        assert_eq!("200".parse(), Ok(StatusRange { lo: 200, hi: 200 }));
        assert_eq!("200-399".parse(), Ok(StatusRange { lo: 200, hi: 399 }));
        assert!("200-399".parse::<StatusRange>().unwrap().contains(302));
        for bad in ["", "abc", "99", "600", "300-200", "200-", "2xx"] {
            assert!(bad.parse::<StatusRange>().is_err(), "{bad:?}");
        }
        assert_eq!(DEFAULT_EXPECT_STATUS.to_string(), "200-299");
    }

    #[test]
    fn load_defaults() {
        let p = LoadConfig::default().resolve().unwrap();
        assert_eq!(p.scrape, None, "no port, no scraping");
        assert_eq!((p.queue_limit, p.kv_limit), (5.0, 0.8));
        assert_eq!(p.stall_after, DEFAULT_STALL_AFTER);
        let p = LoadConfig {
            metrics_port: Some(8000),
            ..Default::default()
        }
        .resolve()
        .unwrap();
        assert_eq!(p.scrape.unwrap().path, "/metrics");
    }
}
