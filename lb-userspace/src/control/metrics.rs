//! `/metrics` in the Prometheus text format (`prometheus` crate).
//!
//! Everything is read on scrape, through the controller: the per-CPU
//! counter maps (summed over CPUs), the desired state and what is
//! programmed. The data plane does no extra work for it. A scrape that
//! cannot be answered within [`SCRAPE_TIMEOUT`] gets a 503.
//!
//! Families (labels `vip` = `ADDRESS:PORT/PROTOCOL`, `backend` = address):
//! - `lb_packets_total{reason}`: every packet the balancer saw, by the
//!   reason for its verdict (`forwarded`, and why passed or dropped).
//! - `lb_vip_packets_total`, `lb_vip_bytes_total`, `lb_vip_flows_total{vip}`;
//!   `lb_backend_packets_total`, `lb_backend_bytes_total`,
//!   `lb_backend_flows_total{vip,backend}`: forwarded traffic and new flows.
//! - `lb_conntrack_events_total{event}`: `miss` (a new flow, scheduled),
//!   `hit`, `stale`, `insert_failed`, `reset`.
//! - `lb_maglev_rebuilds_total{vip}`: tables built and switched in.
//! - `lb_backend_up`, `lb_backend_drained`, `lb_backend_weight`,
//!   `lb_backend_weight_in_effect`, `lb_backend_table_share_ratio`,
//!   `lb_backend_load_factor`, `lb_backend_load_pressure`,
//!   `lb_backend_health_transitions_total{vip,backend,cause}` (`check`:
//!   health checks; `stalled`: became stalled or stopped being stalled),
//!   `lb_backend_stalled{vip,backend}`.
//! - `lb_backend_load_queue`, `lb_backend_load_running`,
//!   `lb_backend_load_kv_cache_ratio`, `lb_backend_load_report_age_seconds{backend}`:
//!   each node's last load report.
//! - `lb_vip_saturated`, `lb_vip_shed_ratio`, `lb_vip_all_backends_down{vip}`.
//! - `lb_health_checks_total{result}`, `lb_load_reports_total{source,outcome}`,
//!   `lb_load_scrapes_late_total`, `lb_steering_reaction_seconds{source}`.
//! - `lb_api_requests_total{outcome}`: `ok`, `refused`, `failed`.
//! - `lb_map_capacity{map}`, `lb_map_entries{map}` (`vips`, `backends`;
//!   `flows` capacity only, in slots: counting the entries in use would
//!   mean reading the whole table).
//! - `lb_exporter_read_seconds`: how long reading the maps took.
//! - `lb_health_check_duration_seconds{vip}`: a histogram of how long health
//!   checks took (per VIP, not per backend: see cardinality below).
//! - `lb_config_reloads_total{outcome}`, `lb_config_last_reload_successful`,
//!   `lb_config_last_reload_success_timestamp_seconds` ([`super::reloads`]).
//! - With `[bgp]`, read from BIRD at each scrape ([`crate::host::bgp_status`]):
//!   `lb_bgp_bird_up`, `lb_bgp_session_up{neighbor}`,
//!   `lb_bgp_routes_exported{neighbor}`, `lb_bgp_announced{address}`.
//! - With `[fleet]` ([`crate::fleet`]): `lb_fleet_connected`,
//!   `lb_fleet_last_contact_seconds`, `lb_fleet_revision{fleet}`,
//!   `lb_fleet_revision_refused`, `lb_fleet_revisions_total{outcome}`,
//!   `lb_fleet_etcd_writes_total{kind}`, `lb_fleet_conflicts_total`,
//!   `lb_fleet_table_info{fleet,vip,fingerprint}` (`fleet`: the prefix),
//!   `lb_fleet_steering_revision{fleet}`, `lb_fleet_leader{fleet}`,
//!   `lb_fleet_leader_elections_total`, `lb_fleet_divergences_total`.
//! - `lb_build_info{version,commit,layout}` and the process's own
//!   `process_*` (CPU, memory, file descriptors, threads, start time).
//!
//! Cardinality: the per-backend families ([`BACKEND_FAMILIES`]) are most of
//! a scrape (about 15 series per VIP and backend). `metrics.backend_families`
//! picks which of them are exported, and `metrics.backend_min_share` leaves
//! out the series of backends that carried less than that share of their
//! VIP's forwarded packets (since lbd started); the per-VIP families are
//! always complete. `/metrics` is gzip-compressed when the scraper accepts
//! it (Prometheus does).

use std::{net::SocketAddr, time::Duration};

use axum::{
    Router,
    extract::State,
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use lb_common::{DecapReason, FlowEvent, Reason};
use prometheus::{
    TextEncoder,
    core::Collector,
    proto::{Bucket, Counter, Gauge, Histogram, LabelPair, Metric, MetricFamily, MetricType},
};

use crate::{
    control::controller::{ControllerError, ControllerHandle, Scrape},
    control::reloads,
    desired::config::{MetricsSettings, Transport},
    desired::vip::VipAddr,
    host::bgp::BirdPaths,
    host::bgp_status::{self, BgpStatus},
};
use tokio::sync::{mpsc, oneshot};

/// Every family `/metrics` can export (a family without samples, such as
/// the load gauges of a balancer without `[vip.load]`, is left out of a
/// scrape). The dashboard test checks its queries against this list; a
/// unit test keeps it equal to what a fully populated scrape exports.
pub const FAMILIES: &[&str] = &[
    "lb_packets_total",
    "lb_conntrack_events_total",
    "lb_vip_packets_total",
    "lb_vip_bytes_total",
    "lb_vip_flows_total",
    "lb_backend_packets_total",
    "lb_backend_bytes_total",
    "lb_backend_flows_total",
    "lb_maglev_rebuilds_total",
    "lb_backend_up",
    "lb_backend_drained",
    "lb_backend_weight",
    "lb_backend_weight_in_effect",
    "lb_backend_table_share_ratio",
    "lb_backend_load_factor",
    "lb_backend_least_load_score",
    "lb_backend_load_pressure",
    "lb_backend_health_transitions_total",
    "lb_backend_stalled",
    "lb_backend_load_queue",
    "lb_backend_load_running",
    "lb_backend_load_kv_cache_ratio",
    "lb_backend_load_report_age_seconds",
    "lb_backend_active_flows",
    "lb_backend_draining",
    "lb_vip_saturated",
    "lb_vip_shed_ratio",
    "lb_vip_all_backends_down",
    "lb_health_checks_total",
    "lb_load_reports_total",
    "lb_load_scrapes_late_total",
    "lb_steering_reaction_seconds",
    "lb_api_requests_total",
    "lb_map_capacity",
    "lb_map_entries",
    "lb_exporter_read_seconds",
    "lb_flow_sweeps_total",
    "lb_flow_sweep_seconds",
    "lb_flow_sweep_age_seconds",
    "lb_health_check_duration_seconds",
    "lb_config_reloads_total",
    "lb_config_last_reload_successful",
    "lb_config_last_reload_success_timestamp_seconds",
    "lb_bgp_bird_up",
    "lb_bgp_session_up",
    "lb_bgp_routes_exported",
    "lb_bgp_announced",
    "lb_fleet_connected",
    "lb_fleet_last_contact_seconds",
    "lb_fleet_revision",
    "lb_fleet_revision_refused",
    "lb_fleet_revisions_total",
    "lb_fleet_etcd_writes_total",
    "lb_fleet_conflicts_total",
    "lb_fleet_table_info",
    "lb_fleet_steering_revision",
    "lb_fleet_leader",
    "lb_fleet_leader_elections_total",
    "lb_fleet_divergences_total",
    "lb_build_info",
];

/// The families with a `backend` label: what `metrics.backend_families`
/// chooses from (all of them by default).
pub const BACKEND_FAMILIES: &[&str] = &[
    "lb_backend_packets_total",
    "lb_backend_bytes_total",
    "lb_backend_flows_total",
    "lb_backend_up",
    "lb_backend_drained",
    "lb_backend_weight",
    "lb_backend_weight_in_effect",
    "lb_backend_table_share_ratio",
    "lb_backend_load_factor",
    "lb_backend_least_load_score",
    "lb_backend_load_pressure",
    "lb_backend_health_transitions_total",
    "lb_backend_stalled",
    "lb_backend_load_queue",
    "lb_backend_load_running",
    "lb_backend_load_kv_cache_ratio",
    "lb_backend_load_report_age_seconds",
    "lb_backend_active_flows",
    "lb_backend_draining",
];

/// Upper bounds (seconds) of `lb_health_check_duration_seconds`' buckets:
/// from a local TCP connect to the longest timeout.
pub const CHECK_DURATION_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 60.0,
];

/// How long health checks took: a histogram with
/// [`CHECK_DURATION_BUCKETS`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DurationHistogram {
    /// Observations per bucket (not cumulative); the last one is +Inf.
    buckets: [u64; CHECK_DURATION_BUCKETS.len() + 1],
    sum: f64,
}

impl DurationHistogram {
    pub fn observe(&mut self, d: Duration) {
        let s = d.as_secs_f64();
        let i = CHECK_DURATION_BUCKETS
            .iter()
            .position(|le| s <= *le)
            .unwrap_or(CHECK_DURATION_BUCKETS.len());
        self.buckets[i] += 1;
        self.sum += s;
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }

    /// The sum of the observations so far, in seconds.
    pub fn sum(&self) -> f64 {
        self.sum
    }

    fn metric(&self, pairs: &[(&str, &str)]) -> Metric {
        let mut h = Histogram::default();
        let mut cumulative = 0;
        let buckets = CHECK_DURATION_BUCKETS
            .iter()
            .zip(&self.buckets)
            .map(|(le, n)| {
                cumulative += n;
                let mut b = Bucket::default();
                b.set_upper_bound(*le);
                b.set_cumulative_count(cumulative);
                b
            })
            .collect();
        h.set_bucket(buckets);
        h.set_sample_count(self.count());
        h.set_sample_sum(self.sum);
        let mut m = Metric::from_label(labels(pairs));
        m.set_histogram(h);
        m
    }
}

/// Longest a scrape may take before it is answered with a 503.
pub const SCRAPE_TIMEOUT: Duration = Duration::from_secs(5);

/// The families of one scrape, built directly in the `prometheus` crate's
/// data model and encoded with its text encoder. (Registering a metric
/// vector per scrape and setting every series through it costs several
/// microseconds a series, too much for 10,000 backends.)
#[derive(Default)]
struct Families(Vec<MetricFamily>);

impl Families {
    fn family(&mut self, name: &str, help: &str, kind: MetricType) -> &mut Vec<Metric> {
        let mut f = MetricFamily::default();
        f.set_name(name.to_string());
        f.set_help(help.to_string());
        f.set_field_type(kind);
        self.0.push(f);
        self.0.last_mut().expect("just pushed").mut_metric()
    }

    fn counters(&mut self, name: &str, help: &str) -> &mut Vec<Metric> {
        self.family(name, help, MetricType::COUNTER)
    }

    fn gauges(&mut self, name: &str, help: &str) -> &mut Vec<Metric> {
        self.family(name, help, MetricType::GAUGE)
    }

    fn histograms(&mut self, name: &str, help: &str) -> &mut Vec<Metric> {
        self.family(name, help, MetricType::HISTOGRAM)
    }

    /// What every lb process exports: `lb_build_info` and `process_*`.
    fn build_and_process(&mut self) {
        self.gauges(
            "lb_build_info",
            "1, labelled with this build's version, git commit and the data plane's layout version.",
        )
        .push(gauge(
            &[
                ("commit", BUILD_COMMIT),
                ("layout", &lb_common::LAYOUT_VERSION.to_string()),
                ("version", env!("CARGO_PKG_VERSION")),
            ],
            1.0,
        ));
        let collector = prometheus::process_collector::ProcessCollector::for_self();
        self.0.extend(collector.collect());
    }

    fn encode(mut self) -> String {
        // The encoder refuses a family without samples (no VIPs yet).
        self.0.retain(|f| !f.get_metric().is_empty());
        let mut out = String::new();
        TextEncoder::new()
            .encode_utf8(&self.0, &mut out)
            .expect("families with names and samples encode");
        out
    }
}

fn labels(pairs: &[(&str, &str)]) -> Vec<LabelPair> {
    pairs
        .iter()
        .map(|(k, v)| {
            let mut l = LabelPair::default();
            l.set_name(k.to_string());
            l.set_value(v.to_string());
            l
        })
        .collect()
}

fn counter(pairs: &[(&str, &str)], value: u64) -> Metric {
    let mut m = Metric::from_label(labels(pairs));
    let mut c = Counter::default();
    c.set_value(value as f64);
    m.set_counter(c);
    m
}

fn gauge(pairs: &[(&str, &str)], value: f64) -> Metric {
    let mut m = Metric::from_label(labels(pairs));
    let mut g = Gauge::default();
    g.set_value(value);
    m.set_gauge(g);
    m
}

/// The git commit lbd was built from (`build.rs`; `unknown` outside git).
pub const BUILD_COMMIT: &str = env!("LB_BUILD_COMMIT");

/// Which per-backend series a scrape exports (`[metrics]`).
struct BackendFilter<'a> {
    settings: &'a MetricsSettings,
    counters: &'a crate::dataplane::Counters,
}

impl BackendFilter<'_> {
    /// Whether the per-backend family `name` is exported.
    fn family(&self, name: &str) -> bool {
        self.settings
            .backend_families
            .as_ref()
            .is_none_or(|f| f.iter().any(|x| x == name))
    }

    /// Whether `backend` of `vip` carried enough of its VIP's packets.
    fn backend(&self, vip: &VipAddr, backend: &std::net::IpAddr) -> bool {
        let min = self.settings.backend_min_share;
        if min <= 0.0 {
            return true;
        }
        let total = self.counters.vips.get(vip).map_or(0, |t| t.packets);
        let own = self
            .counters
            .backends
            .get(&(*vip, *backend))
            .map_or(0, |t| t.packets);
        total > 0 && own as f64 >= min * total as f64
    }
}

/// A scrape in the Prometheus text format; `api` are the API request
/// counts by outcome.
pub fn render(s: &Scrape, api: &[(&str, u64)]) -> String {
    let mut f = Families::default();
    let c = &s.counters;
    let keep = BackendFilter {
        settings: &s.snapshot.config.metrics,
        counters: c,
    };
    let m = f.counters(
        "lb_packets_total",
        "Packets seen by the XDP balancer, by the reason for their verdict (forwarded, or why passed or dropped).",
    );
    for r in Reason::ALL {
        m.push(counter(&[("reason", r.name())], c.reason(r)));
    }
    let m = f.counters(
        "lb_conntrack_events_total",
        "Connection-table events: miss (a new flow, scheduled), hit, stale (scheduled again), insert_failed, reset (RST removed the entry).",
    );
    for e in FlowEvent::ALL {
        m.push(counter(&[("event", e.name())], c.flow(e)));
    }
    let vips: Vec<(String, _)> = c.vips.iter().map(|(v, t)| (v.to_string(), t)).collect();
    let m = f.counters("lb_vip_packets_total", "Packets forwarded per VIP.");
    for (vip, t) in &vips {
        m.push(counter(&[("vip", vip)], t.packets));
    }
    let m = f.counters(
        "lb_vip_bytes_total",
        "Bytes forwarded per VIP, as received (Ethernet header included).",
    );
    for (vip, t) in &vips {
        m.push(counter(&[("vip", vip)], t.bytes));
    }
    let m = f.counters(
        "lb_vip_flows_total",
        "New flows scheduled per VIP (connection-table misses that were forwarded).",
    );
    for (vip, t) in &vips {
        m.push(counter(&[("vip", vip)], t.flows));
    }
    let backends: Vec<([String; 2], _)> = c
        .backends
        .iter()
        .filter(|((v, b), _)| keep.backend(v, b))
        .map(|((v, b), t)| ([b.to_string(), v.to_string()], t))
        .collect();
    type TrafficValue = fn(&lb_common::TrafficCounters) -> u64;
    let traffic: [(&str, &str, TrafficValue); 3] = [
        (
            "lb_backend_packets_total",
            "Packets forwarded per VIP and backend.",
            |t| t.packets,
        ),
        (
            "lb_backend_bytes_total",
            "Bytes forwarded per VIP and backend, as received.",
            |t| t.bytes,
        ),
        (
            "lb_backend_flows_total",
            "New flows scheduled per VIP and backend.",
            |t| t.flows,
        ),
    ];
    for (name, help, value) in traffic {
        if !keep.family(name) {
            continue;
        }
        let m = f.counters(name, help);
        for ([backend, vip], t) in &backends {
            m.push(counter(&[("backend", backend), ("vip", vip)], value(t)));
        }
    }
    let m = f.counters(
        "lb_maglev_rebuilds_total",
        "Maglev tables built and switched in, per VIP, since lbd started.",
    );
    for (vip, n) in &s.rebuilds {
        m.push(counter(&[("vip", &vip.to_string())], *n));
    }

    // Per backend as configured, with its state as programmed.
    let mut rows = Vec::new();
    for v in &s.snapshot.config.vips {
        let states = s.snapshot.backends.get(&v.addr);
        let steer = s.snapshot.steering.get(&v.addr);
        let vip = v.addr.to_string();
        for b in v.backends.iter().filter(|b| keep.backend(&v.addr, &b.addr)) {
            let state = states.and_then(|st| st.iter().find(|x| x.addr == b.addr));
            let view = steer.and_then(|x| x.backends.get(&b.addr));
            rows.push(Row {
                backend: b.addr.to_string(),
                vip: vip.clone(),
                config: b,
                state,
                steer: view,
                active: s
                    .snapshot
                    .active
                    .get(&v.addr)
                    .and_then(|a| a.get(&b.addr))
                    .copied()
                    .unwrap_or_default(),
                drain: s.snapshot.drain_state(&v.addr, b.addr),
            });
        }
    }
    struct Row<'a> {
        backend: String,
        vip: String,
        config: &'a crate::desired::vip::Backend,
        state: Option<&'a crate::dataplane::BackendState>,
        steer: Option<&'a crate::steering::BackendView>,
        active: crate::dataplane::ActiveCount,
        drain: Option<crate::control::controller::DrainState>,
    }
    let mut per_backend = |name: &str, help: &str, value: &dyn Fn(&Row) -> Option<f64>| {
        if !keep.family(name) {
            return;
        }
        let m = f.gauges(name, help);
        for row in &rows {
            if let Some(x) = value(row) {
                m.push(gauge(&[("backend", &row.backend), ("vip", &row.vip)], x));
            }
        }
    };
    fn health<'a>(r: &Row<'a>) -> Option<&'a crate::steering::Health> {
        r.steer.and_then(|x| x.health.as_ref())
    }
    per_backend(
        "lb_backend_up",
        "1 if the backend is up (health checks; 1 when not checked), 0 if down.",
        &|r| {
            let down = health(r).map_or(r.state.is_some_and(|x| x.down), |h| !h.up);
            Some(if down { 0.0 } else { 1.0 })
        },
    );
    per_backend(
        "lb_backend_drained",
        "1 if the backend is drained (no new flows).",
        &|r| Some(if r.config.drained { 1.0 } else { 0.0 }),
    );
    per_backend(
        "lb_backend_active_flows",
        "Flows in the connection table on the backend (open and closing), as of the last sweep.",
        &|r| Some(r.active.total() as f64),
    );
    per_backend(
        "lb_backend_draining",
        "For drained backends: 1 while flows or requests are left, 0 once the drain is done.",
        &|r| r.drain.map(|d| if d.done { 0.0 } else { 1.0 }),
    );
    per_backend(
        "lb_backend_weight",
        "Configured weight of the backend.",
        &|r| Some(f64::from(r.config.weight)),
    );
    per_backend(
        "lb_backend_weight_in_effect",
        "Weight the backend's table share is built with, in units of the configured weight (0 while drained or down; less while loaded or ramping up).",
        &|r| Some(r.state.map_or(0.0, |x| x.weight_in_effect)),
    );
    per_backend(
        "lb_backend_table_share_ratio",
        "Share of the VIP's Maglev table the backend owns (0..1).",
        &|r| Some(r.state.map_or(0.0, |x| x.table_share)),
    );
    per_backend(
        "lb_backend_load_factor",
        "Share of its weight that load and slow start leave the backend (0.05..1).",
        &|r| Some(r.steer.map_or(1.0, |x| x.factor)),
    );
    per_backend(
        "lb_backend_least_load_score",
        "Least-load score of the backend (1000 x (requests reported + new flows in the last second) / weight), for least-load VIPs.",
        &|r| r.steer.and_then(|x| x.score).map(f64::from),
    );
    per_backend(
        "lb_backend_load_pressure",
        "Smoothed load pressure of the backend (1 = at its queue or KV-cache limit), for VIPs that follow load.",
        &|r| r.steer.and_then(|x| x.pressure),
    );
    per_backend(
        "lb_backend_stalled",
        "1 while the backend is stalled: work queued or running and no progress for its stall_after (out of the table, established flows untouched); VIPs that follow load.",
        &|r| {
            r.steer
                .filter(|x| x.pressure.is_some())
                .map(|x| if x.stalled.is_some() { 1.0 } else { 0.0 })
        },
    );
    if keep.family("lb_backend_health_transitions_total") {
        let m = f.counters(
            "lb_backend_health_transitions_total",
            "Times health checks took the backend down or brought it up, since lbd started.",
        );
        for r in &rows {
            if let Some(h) = health(r) {
                m.push(counter(
                    &[("backend", &r.backend), ("cause", "check"), ("vip", &r.vip)],
                    h.transitions,
                ));
            }
            if let Some(x) = r.steer.filter(|x| x.pressure.is_some()) {
                m.push(counter(
                    &[
                        ("backend", &r.backend),
                        ("cause", "stalled"),
                        ("vip", &r.vip),
                    ],
                    x.stall_transitions,
                ));
            }
        }
    }
    // Per node: its latest load report (a node in several VIPs once).
    let mut nodes = std::collections::BTreeMap::new();
    for r in &rows {
        if let Some(l) = r.steer.and_then(|x| x.load.as_ref()) {
            nodes.insert(r.backend.clone(), l);
        }
    }
    let now = std::time::Instant::now();
    type NodeValue<'a> = &'a dyn Fn(&crate::steering::LoadReport) -> Option<f64>;
    let node_gauges: [(&str, &str, NodeValue); 4] = [
        (
            "lb_backend_load_queue",
            "Requests waiting on the node, as it last reported.",
            &|l| Some(l.queue),
        ),
        (
            "lb_backend_load_running",
            "Requests running on the node, as it last reported.",
            &|l| l.running,
        ),
        (
            "lb_backend_load_kv_cache_ratio",
            "KV-cache use of the node (0..1), as it last reported.",
            &|l| l.kv,
        ),
        (
            "lb_backend_load_report_age_seconds",
            "Age of the node's last load report.",
            &|l| Some(now.saturating_duration_since(l.at).as_secs_f64()),
        ),
    ];
    for (name, help, value) in node_gauges {
        if !keep.family(name) {
            continue;
        }
        let m = f.gauges(name, help);
        for (backend, l) in &nodes {
            if let Some(x) = value(l) {
                m.push(gauge(&[("backend", backend)], x));
            }
        }
    }
    let steering: Vec<(String, &crate::steering::VipView)> = s
        .snapshot
        .steering
        .iter()
        .map(|(a, v)| (a.to_string(), &v.vip))
        .collect();
    let m = f.gauges(
        "lb_vip_saturated",
        "1 while every healthy backend of the VIP is at its load limit (base weights in use).",
    );
    for (vip, v) in &steering {
        m.push(gauge(&[("vip", vip)], if v.saturated { 1.0 } else { 0.0 }));
    }
    let m = f.gauges(
        "lb_vip_shed_ratio",
        "Share of new connections the data plane drops at their SYN while every backend is past its load limit (on_saturated = shed); 0 otherwise.",
    );
    for (vip, v) in &steering {
        m.push(gauge(&[("vip", vip)], v.shed));
    }
    let m = f.gauges(
        "lb_vip_all_backends_down",
        "1 while every backend of the VIP is down (see on_all_down).",
    );
    for (vip, v) in &steering {
        m.push(gauge(&[("vip", vip)], if v.all_down { 1.0 } else { 0.0 }));
    }
    let p = &s.snapshot.probes;
    let m = f.counters(
        "lb_health_checks_total",
        "Health checks run, by result: ok, failed.",
    );
    m.push(counter(&[("result", "ok")], p.checks_ok));
    m.push(counter(&[("result", "failed")], p.checks_failed));
    let m = f.counters(
        "lb_load_reports_total",
        "Load reports by source (scrape, push) and outcome: accepted; invalid, unknown_format, no_samples (families declared, no samples yet), failed (no answer), unknown_backend, no_policy (ignored, weights unchanged); stale (accepted, then too old before a newer one came).",
    );
    for ((source, outcome), n) in &p.reports {
        m.push(counter(&[("outcome", outcome), ("source", source)], *n));
    }
    f.counters(
        "lb_load_scrapes_late_total",
        "Load scrapes that started more than half a scrape_interval late: the node's scrapes fall behind their interval.",
    )
    .push(counter(&[], p.scrapes_late));
    let m = f.histograms(
        "lb_steering_reaction_seconds",
        "From a load report's arrival (scrape finished, push received) to the steering decision it caused being in the maps, by source; reports that moved a backend while no rate limit held the rebuild back.",
    );
    for (source, h) in &p.reaction {
        m.push(h.metric(&[("source", source)]));
    }
    let m = f.histograms(
        "lb_health_check_duration_seconds",
        "How long health checks of the VIP's backends took (failed ones included).",
    );
    for v in &s.snapshot.config.vips {
        if let Some(h) = p.check_durations.get(&v.addr) {
            m.push(h.metric(&[("vip", &v.addr.to_string())]));
        }
    }

    let m = f.counters(
        "lb_api_requests_total",
        "Control API requests, by outcome: ok, refused (4xx), failed (5xx).",
    );
    for (outcome, n) in api {
        m.push(counter(&[("outcome", outcome)], *n));
    }
    let u = &s.usage;
    let m = f.gauges(
        "lb_map_capacity",
        "Capacity of the balancer's maps: vips, backends, flows.",
    );
    for (map, n) in [
        ("vips", u.vips_capacity),
        ("backends", u.backends_capacity),
        ("flows", u.flows_capacity),
    ] {
        m.push(gauge(&[("map", map)], f64::from(n)));
    }
    let m = f.gauges("lb_map_entries", "Entries in use: vips, backends.");
    for (map, n) in [("vips", u.vips), ("backends", u.backends)] {
        m.push(gauge(&[("map", map)], f64::from(n)));
    }
    f.gauges(
        "lb_exporter_read_seconds",
        "Time this scrape took to read the data plane's maps.",
    )
    .push(gauge(&[], s.read_time.as_secs_f64()));
    let sweep = &s.snapshot.sweep;
    f.counters(
        "lb_flow_sweeps_total",
        "Sweeps of the connection table that counted the active flows, since lbd started.",
    )
    .push(counter(&[], sweep.sweeps));
    f.gauges(
        "lb_flow_sweep_seconds",
        "How long the last sweep of the connection table took.",
    )
    .push(gauge(&[], sweep.last_seconds));
    if let Some(age) = sweep.age_seconds {
        f.gauges(
            "lb_flow_sweep_age_seconds",
            "Age of the active-flow counts: since the last finished sweep began (stays near conntrack.sweep_interval unless sweeps fall behind).",
        )
        .push(gauge(&[], age));
    }
    reload_families(&mut f, &reloads::stats());
    if let (Some(status), Some(settings)) = (&s.bgp, &s.snapshot.config.bgp) {
        bgp_families(&mut f, status, settings);
    }
    if let Some(fleet) = &s.fleet {
        fleet_families(&mut f, fleet);
    }
    f.build_and_process();
    f.encode()
}

fn reload_families(f: &mut Families, r: &reloads::ReloadStats) {
    let m = f.counters(
        "lb_config_reloads_total",
        "Config reloads (SIGHUP) by outcome: applied; rejected (the file has problems), failed (applying it failed); nothing changed unless applied.",
    );
    for (outcome, n) in r.counts {
        m.push(counter(&[("outcome", outcome.name())], n));
    }
    f.gauges(
        "lb_config_last_reload_successful",
        "1 if the last config reload (or the start-up load) worked, 0 if it was rejected or failed.",
    )
    .push(gauge(&[], if r.last_ok { 1.0 } else { 0.0 }));
    let m = f.gauges(
        "lb_config_last_reload_success_timestamp_seconds",
        "When the config was last loaded successfully (start-up or reload), seconds since the epoch.",
    );
    if let Some(t) = r.last_good {
        m.push(gauge(&[], t));
    }
}

fn fleet_families(f: &mut Families, info: &crate::control::controller::FleetInfo) {
    let l = &info.link;
    f.gauges(
        "lb_fleet_connected",
        "1 while the last request to the fleet's etcd worked; 0: cut off (forwarding goes on with lb_fleet_revision, changes are refused).",
    )
    .push(gauge(&[], if l.connected { 1.0 } else { 0.0 }));
    if let Some(t) = l.last_contact {
        f.gauges(
            "lb_fleet_last_contact_seconds",
            "Seconds since etcd last answered this member.",
        )
        .push(gauge(&[], t.elapsed().as_secs_f64()));
    }
    let fleet = info.settings.prefix.as_str();
    f.gauges(
        "lb_fleet_revision",
        "The fleet revision (etcd mod_revision of the desired state) whose VIPs this member's tables hold; fleet: the fleet's key prefix.",
    )
    .push(gauge(&[("fleet", fleet)], info.revision as f64));
    f.gauges(
        "lb_fleet_revision_refused",
        "1 while the fleet's newest revision is one this member refused (it keeps lb_fleet_revision).",
    )
    .push(gauge(&[], if l.refused.is_some() { 1.0 } else { 0.0 }));
    let m = f.counters(
        "lb_fleet_revisions_total",
        "Fleet revisions this member applied or refused (it could not take them) since lbd started.",
    );
    m.push(counter(&[("outcome", "applied")], l.applied_total));
    m.push(counter(&[("outcome", "refused")], l.refused_total));
    let m = f.counters(
        "lb_fleet_etcd_writes_total",
        "Writes to etcd by kind: desired (a change of the desired state), status (this member's status), steering (the leader's view), health (this member's health verdicts), leader (won elections), load (pushed load reports forwarded to the leader).",
    );
    for kind in ["desired", "status", "steering", "health", "leader", "load"] {
        m.push(counter(
            &[("kind", kind)],
            l.writes.get(kind).copied().unwrap_or(0),
        ));
    }
    f.counters(
        "lb_fleet_conflicts_total",
        "Changes through this member that lost a compare-and-swap race in etcd (worked out again, or 412 with If-Match).",
    )
    .push(counter(&[], l.conflicts));
    f.gauges(
        "lb_fleet_steering_revision",
        "The etcd revision of the fleet's steering view (the leader's weights) this member's tables were built from; 0: none yet.",
    )
    .push(gauge(&[("fleet", fleet)], info.steering_revision as f64));
    f.gauges(
        "lb_fleet_leader",
        "1 while this member is the fleet's steering leader (it scrapes the backends' load and publishes the weights).",
    )
    .push(gauge(&[("fleet", fleet)], if l.is_leader { 1.0 } else { 0.0 }));
    f.counters(
        "lb_fleet_leader_elections_total",
        "Times this member became the fleet's steering leader.",
    )
    .push(counter(&[], l.elected));
    f.counters(
        "lb_fleet_divergences_total",
        "Backends this member took out of its own table while cut off from etcd, because its own health check saw them down (the safety net).",
    )
    .push(counter(&[], info.divergences));
    let m = f.gauges(
        "lb_fleet_table_info",
        "1 per VIP with its table's fingerprint (FNV-1a over each entry's backend address): members whose fingerprints agree hold the same table.",
    );
    for (vip, print) in &info.tables {
        m.push(gauge(
            &[("fleet", fleet), ("vip", vip), ("fingerprint", print)],
            1.0,
        ));
    }
}

fn bgp_families(f: &mut Families, status: &BgpStatus, settings: &crate::host::bgp::BgpSettings) {
    let (sessions, announced) = match status {
        BgpStatus::Read {
            sessions,
            announced,
        } => (&sessions[..], Some(announced)),
        BgpStatus::Unreachable(_) => (&[][..], None),
    };
    f.gauges(
        "lb_bgp_bird_up",
        "1 if BIRD answered on its control socket during this scrape.",
    )
    .push(gauge(
        &[],
        if matches!(status, BgpStatus::Read { .. }) {
            1.0
        } else {
            0.0
        },
    ));
    // Every configured neighbour has a session sample (down while BIRD is
    // unreachable), so an alert on 0 sees it.
    let m = f.gauges(
        "lb_bgp_session_up",
        "1 while the BGP session with the neighbor is established (as BIRD reports it).",
    );
    for n in &settings.neighbors {
        let up = sessions.iter().any(|x| x.neighbor == n.address && x.up());
        m.push(gauge(
            &[("neighbor", &n.address.to_string())],
            if up { 1.0 } else { 0.0 },
        ));
    }
    let m = f.gauges(
        "lb_bgp_routes_exported",
        "Routes (VIP addresses) BIRD exports to the neighbor.",
    );
    for x in sessions {
        m.push(gauge(
            &[("neighbor", &x.neighbor.to_string())],
            x.exported as f64,
        ));
    }
    let m = f.gauges(
        "lb_bgp_announced",
        "1 for each VIP address BIRD announces (to every established session of its family).",
    );
    for a in announced.into_iter().flatten() {
        m.push(gauge(&[("address", &a.to_string())], 1.0));
    }
}

/// What the balancer's endpoint reads from.
#[derive(Clone)]
struct Balancer {
    handle: ControllerHandle,
    /// BIRD's files, with `[bgp]`.
    bird: Option<BirdPaths>,
}

async fn balancer_metrics(State(b): State<Balancer>, headers: HeaderMap) -> Response {
    let read = async {
        let mut s = b.handle.scrape().await?;
        if let (Some(paths), Some(settings)) = (&b.bird, &s.snapshot.config.bgp) {
            s.bgp = Some(bgp_status::read(paths, settings).await);
        }
        Ok::<_, ControllerError>(s)
    };
    match tokio::time::timeout(SCRAPE_TIMEOUT, read).await {
        Ok(Ok(s)) => {
            respond(&headers, move || {
                render(&s, &crate::control::api::request_counts())
            })
            .await
        }
        Ok(Err(e)) => unavailable(format!("reading the counters failed: {e}\n")),
        Err(_) => unavailable(format!(
            "reading the counters took longer than {SCRAPE_TIMEOUT:?}\n"
        )),
    }
}

fn unavailable(message: String) -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        [(header::CONTENT_TYPE, "text/plain")],
        message,
    )
        .into_response()
}

/// Renders (and compresses, if the scraper accepts gzip) on a blocking
/// thread: a large scrape takes tens of milliseconds of CPU, which would
/// hold up the API, the health checks and the controller on lbd's runtime.
async fn respond(
    headers: &HeaderMap,
    render: impl FnOnce() -> String + Send + 'static,
) -> Response {
    let gzip = accepts_gzip(headers);
    let body = tokio::task::spawn_blocking(move || {
        let text = render();
        if gzip {
            gzip_bytes(text.as_bytes())
        } else {
            text.into_bytes()
        }
    })
    .await;
    let Ok(body) = body else {
        return unavailable("rendering the scrape failed\n".into());
    };
    let mut r = (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "text/plain; version=0.0.4"),
            (header::VARY, "accept-encoding"),
        ],
        body,
    )
        .into_response();
    if gzip {
        r.headers_mut()
            .insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    }
    r
}

/// Whether `Accept-Encoding` allows gzip (`gzip` or `x-gzip` without
/// `q=0`).
fn accepts_gzip(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|coding| {
            let mut parts = coding.split(';').map(str::trim);
            let name = parts.next().unwrap_or("");
            let q_zero = parts.any(|p| {
                p.strip_prefix("q=")
                    .and_then(|q| q.parse::<f64>().ok())
                    .is_some_and(|q| q == 0.0)
            });
            (name.eq_ignore_ascii_case("gzip") || name.eq_ignore_ascii_case("x-gzip")) && !q_zero
        })
}

/// `data` gzip-compressed at the fastest level: the text is repetitive
/// enough that the fast level already shrinks it more than tenfold, for a
/// fraction of the CPU of the default level (`cargo xtask bench metrics`).
pub fn gzip_bytes(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(
        Vec::with_capacity(data.len() / 8),
        flate2::Compression::fast(),
    );
    e.write_all(data).expect("writing to a Vec");
    e.finish().expect("writing to a Vec")
}

async fn bind(
    listen: SocketAddr,
    transport: &Transport,
    app: Router,
) -> std::io::Result<impl std::future::Future<Output = std::io::Result<()>> + use<>> {
    let listener = crate::control::tls::Listener::bind(listen, transport, "/metrics").await?;
    Ok(async move { axum::serve(listener, app).await })
}

/// Binds `listen` (so a bad address or TLS file fails at start-up) and
/// returns the server future of the balancer's `/metrics`, over TLS when
/// `transport` says so (with client certificates, any the client CA signed
/// may read: every role may read); `bird`: BIRD's files, when `[bgp]`
/// announces through it.
pub async fn serve(
    listen: SocketAddr,
    transport: &Transport,
    handle: ControllerHandle,
    bird: Option<BirdPaths>,
) -> std::io::Result<impl std::future::Future<Output = std::io::Result<()>> + use<>> {
    let app = Router::new()
        .route("/metrics", get(balancer_metrics))
        .with_state(Balancer { handle, bird });
    bind(listen, transport, app).await
}

/// What `lbd decap` exports: its packet counters and the addresses it
/// decapsulates for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DecapScrape {
    /// Packets per [`DecapReason`], by reason index.
    pub packets: [u64; lb_common::DECAP_REASON_COUNT as usize],
    pub addresses: usize,
}

/// A scrape request to `lbd decap`'s main loop (which owns the
/// decapsulator).
pub type DecapRequest = oneshot::Sender<Result<DecapScrape, String>>;

/// Families `lbd decap` exports (besides `lb_build_info` and `process_*`).
pub const DECAP_FAMILIES: &[&str] = &["lb_decap_packets_total", "lb_decap_addresses"];

/// `lbd decap`'s scrape in the Prometheus text format.
pub fn render_decap(d: &DecapScrape) -> String {
    let mut f = Families::default();
    let m = f.counters(
        "lb_decap_packets_total",
        "Packets the decapsulator saw, by reason: decapsulated (passed on without the outer header); passed untouched: not_tunnel, not_local; dropped: malformed; second chance (--second-chance): forwarded (sent on to the candidate), no_candidate and forward_failed (decapsulated and passed: the stack resets them), neighbour_pending (dropped until the candidate's neighbour is resolved).",
    );
    for r in DecapReason::ALL {
        m.push(counter(&[("reason", r.name())], d.packets[r as usize]));
    }
    f.gauges(
        "lb_decap_addresses",
        "Outer destination addresses decapsulated for (this host's addresses, or --address).",
    )
    .push(gauge(&[], d.addresses as f64));
    f.build_and_process();
    f.encode()
}

async fn decap_metrics(
    State(tx): State<mpsc::Sender<DecapRequest>>,
    headers: HeaderMap,
) -> Response {
    let read = async {
        let (reply, rx) = oneshot::channel();
        tx.send(reply)
            .await
            .map_err(|_| "lbd decap is stopping".to_string())?;
        rx.await.map_err(|_| "lbd decap is stopping".to_string())?
    };
    match tokio::time::timeout(SCRAPE_TIMEOUT, read).await {
        Ok(Ok(d)) => respond(&headers, move || render_decap(&d)).await,
        Ok(Err(e)) => unavailable(format!("reading the counters failed: {e}\n")),
        Err(_) => unavailable(format!(
            "reading the counters took longer than {SCRAPE_TIMEOUT:?}\n"
        )),
    }
}

/// Binds `listen` and returns the server future of `lbd decap`'s
/// `/metrics`; each scrape is a request on `tx`.
pub async fn serve_decap(
    listen: SocketAddr,
    tx: mpsc::Sender<DecapRequest>,
) -> std::io::Result<impl std::future::Future<Output = std::io::Result<()>>> {
    let app = Router::new()
        .route("/metrics", get(decap_metrics))
        .with_state(tx);
    bind(listen, &Transport::default(), app).await
}

#[cfg(test)]
mod tests {
    use std::{
        collections::{BTreeMap, BTreeSet},
        net::IpAddr,
        time::{Duration, Instant},
    };

    use lb_common::TrafficCounters;

    use super::*;
    use crate::{
        control::controller::{ProbeStats, Snapshot, SteeringView},
        dataplane::{BackendState, Counters, MapUsage},
        desired::config,
        host::bgp_status::SessionStatus,
        steering::{LoadReport, LoadSource, Steering},
    };

    #[test]
    fn families_lists_what_a_full_scrape_exports() {
        let config = config::parse(
            r#"
            [balancer]
            source_v4 = "10.0.0.254"
            [[vip]]
            address = "203.0.113.1"
            port = 80
            protocol = "tcp"
            scheduler = "least-load"
            backends = [ { address = "10.0.0.1" } ]
            [vip.health]
            check = "tcp"
            [vip.load]
            metrics_port = 8000
            [bgp]
            local_as = 65001
            neighbors = [ { address = "10.0.0.253", as = 65000 } ]
            "#,
            "t",
        )
        .unwrap();
        let v = config.vips[0].clone();
        let b: IpAddr = "10.0.0.1".parse().unwrap();
        let now = Instant::now();
        let mut st = Steering::new();
        st.reconcile(&config.vips, now, |_, _| false);
        st.load_report(
            b,
            LoadReport {
                queue: 1.0,
                running: Some(2.0),
                kv: Some(0.5),
                utilization: None,
                progress: None,
                source: LoadSource::Scrape,
                reporter: "vllm",
                at: now,
                ttl: None,
            },
        );
        st.plan(&v, now, true).unwrap();
        st.scores(&v, now, BTreeMap::from([(b, 3)]));
        let mut counters = Counters::default();
        counters.vips.insert(v.addr, TrafficCounters::default());
        counters
            .backends
            .insert((v.addr, b), TrafficCounters::default());
        let snapshot = Snapshot {
            revision: 0,
            active: BTreeMap::from([(
                v.addr,
                BTreeMap::from([(
                    b,
                    crate::dataplane::ActiveCount {
                        open: 3,
                        closing: 1,
                    },
                )]),
            )]),
            sweep: crate::dataplane::SweepStats {
                sweeps: 1,
                last_seconds: 0.01,
                age_seconds: Some(0.5),
            },
            drains: BTreeMap::from([(
                (v.addr, b),
                crate::control::controller::Drain {
                    since: std::time::SystemTime::now(),
                    at: std::time::Instant::now(),
                },
            )]),
            config: config.clone(),
            backends: BTreeMap::from([(
                v.addr,
                vec![BackendState {
                    addr: b,
                    down: false,
                    weight_in_table: 2000,
                    weight_in_effect: 100.0,
                    table_entries: 65537,
                    table_share: 1.0,
                }],
            )]),
            uptime: Duration::ZERO,
            adopted: false,
            serving: Default::default(),
            steering: BTreeMap::from([(
                v.addr,
                SteeringView {
                    vip: st.vip_view(&v.addr),
                    backends: BTreeMap::from([(b, st.backend_view(&v, b).unwrap())]),
                },
            )]),
            probes: ProbeStats {
                reports: BTreeMap::from([(("scrape", "accepted"), 1)]),
                check_durations: BTreeMap::from([(v.addr, DurationHistogram::default())]),
                reaction: BTreeMap::from([("push", DurationHistogram::default())]),
                ..Default::default()
            },
        };
        let scrape = Scrape {
            counters,
            snapshot,
            rebuilds: BTreeMap::from([(v.addr, 1)]),
            usage: MapUsage::default(),
            read_time: Duration::ZERO,
            bgp: Some(BgpStatus::Read {
                sessions: vec![SessionStatus {
                    neighbor: "10.0.0.253".parse().unwrap(),
                    state: "Established".into(),
                    exported: 1,
                }],
                announced: [v.addr.addr].into(),
            }),
            fleet: Some(crate::control::controller::FleetInfo {
                settings: crate::fleet::FleetSettings {
                    endpoints: vec!["http://127.0.0.1:2379".into()],
                    prefix: "/lb/t".into(),
                    name: "t".into(),
                    lease_ttl: Duration::from_secs(5),
                    cache_file: None,
                    ca_file: None,
                    client_cert: None,
                    user: None,
                    down_quorum: 0.5,
                },
                link: crate::fleet::LinkState {
                    last_contact: Some(Instant::now()),
                    ..Default::default()
                },
                revision: 1,
                tables: BTreeMap::from([(v.addr.to_string(), "0".into())]),
                steering_revision: 2,
                divergences: 0,
            }),
        };
        crate::control::reloads::loaded();
        let text = render(&scrape, &[("ok", 0)]);
        let exported: BTreeSet<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split_whitespace().next())
            .filter(|name| name.starts_with("lb_"))
            .collect();
        assert!(
            text.contains("# TYPE process_cpu_seconds_total counter"),
            "{text}"
        );
        assert!(text.contains("lb_build_info{commit=\""), "{text}");
        assert_eq!(exported, FAMILIES.iter().copied().collect::<BTreeSet<_>>());
        assert_eq!(FAMILIES.len(), exported.len(), "no name twice");
        let backend_families: BTreeSet<&str> = exported
            .iter()
            .copied()
            .filter(|f| {
                text.lines()
                    .any(|l| l.starts_with(f) && l.contains("backend="))
            })
            .collect();
        assert_eq!(
            backend_families,
            BACKEND_FAMILIES.iter().copied().collect::<BTreeSet<_>>(),
            "BACKEND_FAMILIES are the families with a backend label"
        );
    }

    #[test]
    fn histogram_buckets_are_cumulative() {
        let mut h = DurationHistogram::default();
        for ms in [0, 3, 3, 40, 2000, 90_000] {
            h.observe(Duration::from_millis(ms));
        }
        let m = h.metric(&[("vip", "v")]);
        let buckets: Vec<(f64, u64)> = m
            .get_histogram()
            .get_bucket()
            .iter()
            .map(|b| (b.upper_bound(), b.cumulative_count()))
            .collect();
        assert_eq!(buckets[0], (0.0005, 1));
        assert_eq!(buckets[3], (0.005, 3));
        assert_eq!(buckets[6], (0.05, 4));
        assert_eq!(buckets[11], (2.5, 5));
        assert_eq!(buckets[13], (60.0, 5), "90 s is only in +Inf");
        assert_eq!(m.get_histogram().get_sample_count(), 6);
    }

    #[test]
    fn gzip_is_used_only_when_accepted() {
        let accepts = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::ACCEPT_ENCODING, v.parse().unwrap());
            accepts_gzip(&h)
        };
        assert!(accepts("gzip"));
        assert!(accepts("identity, GZIP;q=0.5"));
        assert!(accepts("deflate, x-gzip"));
        assert!(!accepts("gzip;q=0"));
        assert!(!accepts("deflate, br"));
        assert!(!accepts_gzip(&HeaderMap::new()));
        let text = "lb_packets_total{reason=\"forwarded\"} 1\n".repeat(1000);
        let packed = gzip_bytes(text.as_bytes());
        assert!(packed.len() * 10 < text.len(), "{} bytes", packed.len());
        let mut out = String::new();
        std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(&packed[..]), &mut out)
            .unwrap();
        assert_eq!(out, text);
    }
}
