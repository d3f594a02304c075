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
//!   `lb_backend_health_transitions_total{vip,backend}`.
//! - `lb_backend_load_queue`, `lb_backend_load_running`,
//!   `lb_backend_load_kv_cache_ratio`, `lb_backend_load_report_age_seconds{backend}`:
//!   each node's last load report.
//! - `lb_vip_saturated`, `lb_vip_all_backends_down{vip}`.
//! - `lb_health_checks_total{result}`, `lb_load_reports_total{source,outcome}`.
//! - `lb_api_requests_total{outcome}`: `ok`, `refused`, `failed`.
//! - `lb_map_capacity{map}`, `lb_map_entries{map}` (`vips`, `backends`;
//!   `flows` capacity only, in slots: counting the entries in use would
//!   mean reading the whole table).
//! - `lb_exporter_read_seconds`: how long reading the maps took.

use std::{net::SocketAddr, time::Duration};

use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use lb_common::{FlowEvent, Reason};
use prometheus::{
    TextEncoder,
    proto::{Counter, Gauge, LabelPair, Metric, MetricFamily, MetricType},
};

use crate::control::controller::{ControllerHandle, Scrape};

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
    "lb_backend_load_queue",
    "lb_backend_load_running",
    "lb_backend_load_kv_cache_ratio",
    "lb_backend_load_report_age_seconds",
    "lb_vip_saturated",
    "lb_vip_all_backends_down",
    "lb_health_checks_total",
    "lb_load_reports_total",
    "lb_api_requests_total",
    "lb_map_capacity",
    "lb_map_entries",
    "lb_exporter_read_seconds",
];

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

/// A scrape in the Prometheus text format; `api` are the API request
/// counts by outcome.
pub fn render(s: &Scrape, api: &[(&str, u64)]) -> String {
    let mut f = Families::default();
    let c = &s.counters;
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
        .map(|((v, b), t)| ([b.to_string(), v.to_string()], t))
        .collect();
    let m = f.counters(
        "lb_backend_packets_total",
        "Packets forwarded per VIP and backend.",
    );
    for ([backend, vip], t) in &backends {
        m.push(counter(&[("backend", backend), ("vip", vip)], t.packets));
    }
    let m = f.counters(
        "lb_backend_bytes_total",
        "Bytes forwarded per VIP and backend, as received.",
    );
    for ([backend, vip], t) in &backends {
        m.push(counter(&[("backend", backend), ("vip", vip)], t.bytes));
    }
    let m = f.counters(
        "lb_backend_flows_total",
        "New flows scheduled per VIP and backend.",
    );
    for ([backend, vip], t) in &backends {
        m.push(counter(&[("backend", backend), ("vip", vip)], t.flows));
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
        for b in &v.backends {
            let state = states.and_then(|st| st.iter().find(|x| x.addr == b.addr));
            let view = steer.and_then(|x| x.backends.get(&b.addr));
            rows.push(Row {
                backend: b.addr.to_string(),
                vip: vip.clone(),
                config: b,
                state,
                steer: view,
            });
        }
    }
    struct Row<'a> {
        backend: String,
        vip: String,
        config: &'a crate::desired::vip::Backend,
        state: Option<&'a crate::dataplane::BackendState>,
        steer: Option<&'a crate::steering::BackendView>,
    }
    let mut per_backend = |name: &str, help: &str, value: &dyn Fn(&Row) -> Option<f64>| {
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
    let m = f.counters(
        "lb_backend_health_transitions_total",
        "Times health checks took the backend down or brought it up, since lbd started.",
    );
    for r in &rows {
        if let Some(h) = health(r) {
            m.push(counter(
                &[("backend", &r.backend), ("vip", &r.vip)],
                h.transitions,
            ));
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
        "Load reports by source (scrape, push) and outcome: accepted; invalid, unknown_format, failed (no answer), unknown_backend, no_policy (ignored, weights unchanged); stale (accepted, then too old before a newer one came).",
    );
    for ((source, outcome), n) in &p.reports {
        m.push(counter(&[("outcome", outcome), ("source", source)], *n));
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
    f.encode()
}

async fn metrics(State(handle): State<ControllerHandle>) -> impl IntoResponse {
    let result = tokio::time::timeout(SCRAPE_TIMEOUT, handle.scrape()).await;
    match result {
        Ok(Ok(s)) => (
            StatusCode::OK,
            [("content-type", "text/plain; version=0.0.4")],
            render(&s, &crate::control::api::request_counts()),
        ),
        Ok(Err(e)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            [("content-type", "text/plain")],
            format!("reading the counters failed: {e}\n"),
        ),
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            [("content-type", "text/plain")],
            format!("reading the counters took longer than {SCRAPE_TIMEOUT:?}\n"),
        ),
    }
}

/// Binds `listen` (so a bad address fails at start-up) and returns the
/// server future.
pub async fn serve(
    listen: SocketAddr,
    handle: ControllerHandle,
) -> std::io::Result<impl std::future::Future<Output = std::io::Result<()>>> {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .with_state(handle);
    let listener = tokio::net::TcpListener::bind(listen).await?;
    Ok(async move { axum::serve(listener, app).await })
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
                ..Default::default()
            },
        };
        let scrape = Scrape {
            counters,
            snapshot,
            rebuilds: BTreeMap::from([(v.addr, 1)]),
            usage: MapUsage::default(),
            read_time: Duration::ZERO,
        };
        let text = render(&scrape, &[("ok", 0)]);
        let exported: BTreeSet<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split_whitespace().next())
            .collect();
        assert_eq!(exported, FAMILIES.iter().copied().collect::<BTreeSet<_>>());
        assert_eq!(FAMILIES.len(), exported.len(), "no name twice");
    }
}
