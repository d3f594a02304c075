//! `/metrics` in the Prometheus text format. Counters are read from the
//! data plane's per-CPU maps on each scrape (through the controller), so the
//! data plane does no extra work for them.

use std::net::SocketAddr;

use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use lb_common::{FlowEvent, Reason};
use prometheus::{Encoder, IntCounterVec, Opts, Registry, TextEncoder};

use crate::{controller::ControllerHandle, dataplane::Counters};

fn counter_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric definition");
    registry
        .register(Box::new(c.clone()))
        .expect("unique metric name");
    c
}

/// The counters in the Prometheus text format.
pub fn render(c: &Counters) -> String {
    let registry = Registry::new();
    let reasons = counter_vec(
        &registry,
        "lb_packets_total",
        "Packets seen by the XDP balancer, by the reason for their verdict (forwarded, or why passed or dropped).",
        &["reason"],
    );
    for r in Reason::ALL {
        reasons.with_label_values(&[r.name()]).inc_by(c.reason(r));
    }
    let flows = counter_vec(
        &registry,
        "lb_conntrack_events_total",
        "Connection-table events: hit, miss (scheduled), stale (scheduled again), insert_failed, reset (RST removed the entry).",
        &["event"],
    );
    for e in FlowEvent::ALL {
        flows.with_label_values(&[e.name()]).inc_by(c.flow(e));
    }
    let vip_packets = counter_vec(
        &registry,
        "lb_vip_packets_total",
        "Packets forwarded per VIP.",
        &["vip"],
    );
    let vip_bytes = counter_vec(
        &registry,
        "lb_vip_bytes_total",
        "Bytes forwarded per VIP, as received (Ethernet header included).",
        &["vip"],
    );
    for (vip, t) in &c.vips {
        let vip = vip.to_string();
        vip_packets.with_label_values(&[&vip]).inc_by(t.packets);
        vip_bytes.with_label_values(&[&vip]).inc_by(t.bytes);
    }
    let be_packets = counter_vec(
        &registry,
        "lb_backend_packets_total",
        "Packets forwarded per VIP and backend.",
        &["vip", "backend"],
    );
    let be_bytes = counter_vec(
        &registry,
        "lb_backend_bytes_total",
        "Bytes forwarded per VIP and backend, as received.",
        &["vip", "backend"],
    );
    for ((vip, backend), t) in &c.backends {
        let labels = [vip.to_string(), backend.to_string()];
        be_packets.with_label_values(&labels).inc_by(t.packets);
        be_bytes.with_label_values(&labels).inc_by(t.bytes);
    }
    let mut out = Vec::new();
    TextEncoder::new()
        .encode(&registry.gather(), &mut out)
        .expect("encoding to a Vec cannot fail");
    String::from_utf8(out).expect("the text format is UTF-8")
}

async fn metrics(State(handle): State<ControllerHandle>) -> impl IntoResponse {
    match handle.counters().await {
        Ok(c) => (
            StatusCode::OK,
            [("content-type", "text/plain; version=0.0.4")],
            render(&c),
        ),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            [("content-type", "text/plain")],
            format!("reading the counters failed: {e}\n"),
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
