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
//! - `lb_vip_packets_total`, `lb_vip_bytes_total{vip}`; `lb_backend_packets_total`,
//!   `lb_backend_bytes_total{vip,backend}`: forwarded traffic.
//! - `lb_conntrack_events_total{event}`: `miss` (a new flow, scheduled),
//!   `hit`, `stale`, `insert_failed`, `reset`.
//! - `lb_maglev_rebuilds_total{vip}`: tables built and switched in.
//! - `lb_backend_up`, `lb_backend_drained`, `lb_backend_weight`,
//!   `lb_backend_weight_in_effect`, `lb_backend_table_share_ratio{vip,backend}`.
//! - `lb_api_requests_total{outcome}`: `ok`, `refused`, `failed`.
//! - `lb_map_capacity{map}`, `lb_map_entries{map}` (`vips`, `backends`;
//!   `flows` capacity only: the kernel does not count LRU entries cheaply).
//! - `lb_exporter_read_seconds`: how long reading the maps took.

use std::{net::SocketAddr, time::Duration};

use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use lb_common::{FlowEvent, Reason};
use prometheus::{Encoder, Gauge, GaugeVec, IntCounterVec, Opts, Registry, TextEncoder};

use crate::controller::{ControllerHandle, Scrape};

/// Longest a scrape may take before it is answered with a 503.
pub const SCRAPE_TIMEOUT: Duration = Duration::from_secs(5);

struct Families {
    registry: Registry,
}

impl Families {
    fn counters(&self, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
        let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric definition");
        self.registry
            .register(Box::new(c.clone()))
            .expect("unique metric name");
        c
    }

    fn gauges(&self, name: &str, help: &str, labels: &[&str]) -> GaugeVec {
        let g = GaugeVec::new(Opts::new(name, help), labels).expect("valid metric definition");
        self.registry
            .register(Box::new(g.clone()))
            .expect("unique metric name");
        g
    }
}

/// A scrape in the Prometheus text format; `api` are the API request
/// counts by outcome.
pub fn render(s: &Scrape, api: &[(&str, u64)]) -> String {
    let f = Families {
        registry: Registry::new(),
    };
    let c = &s.counters;
    let reasons = f.counters(
        "lb_packets_total",
        "Packets seen by the XDP balancer, by the reason for their verdict (forwarded, or why passed or dropped).",
        &["reason"],
    );
    for r in Reason::ALL {
        reasons.with_label_values(&[r.name()]).inc_by(c.reason(r));
    }
    let flows = f.counters(
        "lb_conntrack_events_total",
        "Connection-table events: miss (a new flow, scheduled), hit, stale (scheduled again), insert_failed, reset (RST removed the entry).",
        &["event"],
    );
    for e in FlowEvent::ALL {
        flows.with_label_values(&[e.name()]).inc_by(c.flow(e));
    }
    let vip_packets = f.counters(
        "lb_vip_packets_total",
        "Packets forwarded per VIP.",
        &["vip"],
    );
    let vip_bytes = f.counters(
        "lb_vip_bytes_total",
        "Bytes forwarded per VIP, as received (Ethernet header included).",
        &["vip"],
    );
    for (vip, t) in &c.vips {
        let vip = vip.to_string();
        vip_packets.with_label_values(&[&vip]).inc_by(t.packets);
        vip_bytes.with_label_values(&[&vip]).inc_by(t.bytes);
    }
    let be_packets = f.counters(
        "lb_backend_packets_total",
        "Packets forwarded per VIP and backend.",
        &["vip", "backend"],
    );
    let be_bytes = f.counters(
        "lb_backend_bytes_total",
        "Bytes forwarded per VIP and backend, as received.",
        &["vip", "backend"],
    );
    for ((vip, backend), t) in &c.backends {
        let labels = [vip.to_string(), backend.to_string()];
        be_packets.with_label_values(&labels).inc_by(t.packets);
        be_bytes.with_label_values(&labels).inc_by(t.bytes);
    }
    let rebuilds = f.counters(
        "lb_maglev_rebuilds_total",
        "Maglev tables built and switched in, per VIP, since lbd started.",
        &["vip"],
    );
    for (vip, n) in &s.rebuilds {
        rebuilds.with_label_values(&[&vip.to_string()]).inc_by(*n);
    }
    let up = f.gauges(
        "lb_backend_up",
        "1 if the backend is up (health checks), 0 if down.",
        &["vip", "backend"],
    );
    let drained = f.gauges(
        "lb_backend_drained",
        "1 if the backend is drained (no new flows).",
        &["vip", "backend"],
    );
    let weight = f.gauges(
        "lb_backend_weight",
        "Configured weight of the backend.",
        &["vip", "backend"],
    );
    let in_effect = f.gauges(
        "lb_backend_weight_in_effect",
        "Weight the backend's table share is built with (0 while drained or down).",
        &["vip", "backend"],
    );
    let share = f.gauges(
        "lb_backend_table_share_ratio",
        "Share of the VIP's Maglev table the backend owns (0..1).",
        &["vip", "backend"],
    );
    for v in &s.snapshot.config.vips {
        let states = s.snapshot.backends.get(&v.addr);
        for b in &v.backends {
            let labels = [v.addr.to_string(), b.addr.to_string()];
            let state = states.and_then(|st| st.iter().find(|x| x.addr == b.addr));
            up.with_label_values(&labels)
                .set(if state.is_some_and(|x| x.down) {
                    0.0
                } else {
                    1.0
                });
            drained
                .with_label_values(&labels)
                .set(if b.drained { 1.0 } else { 0.0 });
            weight.with_label_values(&labels).set(f64::from(b.weight));
            in_effect
                .with_label_values(&labels)
                .set(state.map_or(0.0, |x| f64::from(x.weight_in_table)));
            share
                .with_label_values(&labels)
                .set(state.map_or(0.0, |x| x.table_share));
        }
    }
    let requests = f.counters(
        "lb_api_requests_total",
        "Control API requests, by outcome: ok, refused (4xx), failed (5xx).",
        &["outcome"],
    );
    for (outcome, n) in api {
        requests.with_label_values(&[outcome]).inc_by(*n);
    }
    let capacity = f.gauges(
        "lb_map_capacity",
        "Capacity of the balancer's maps: vips, backends, flows.",
        &["map"],
    );
    let entries = f.gauges(
        "lb_map_entries",
        "Entries in use: vips, backends.",
        &["map"],
    );
    let u = &s.usage;
    capacity
        .with_label_values(&["vips"])
        .set(f64::from(u.vips_capacity));
    capacity
        .with_label_values(&["backends"])
        .set(f64::from(u.backends_capacity));
    capacity
        .with_label_values(&["flows"])
        .set(f64::from(u.flows_capacity));
    entries.with_label_values(&["vips"]).set(f64::from(u.vips));
    entries
        .with_label_values(&["backends"])
        .set(f64::from(u.backends));
    let read = Gauge::with_opts(Opts::new(
        "lb_exporter_read_seconds",
        "Time this scrape took to read the data plane's maps.",
    ))
    .expect("valid metric definition");
    read.set(s.read_time.as_secs_f64());
    f.registry
        .register(Box::new(read))
        .expect("unique metric name");

    let mut out = Vec::new();
    TextEncoder::new()
        .encode(&f.registry.gather(), &mut out)
        .expect("encoding to a Vec cannot fail");
    String::from_utf8(out).expect("the text format is UTF-8")
}

async fn metrics(State(handle): State<ControllerHandle>) -> impl IntoResponse {
    let result = tokio::time::timeout(SCRAPE_TIMEOUT, handle.scrape()).await;
    match result {
        Ok(Ok(s)) => (
            StatusCode::OK,
            [("content-type", "text/plain; version=0.0.4")],
            render(&s, &crate::api::request_counts()),
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
