//! The control API: HTTP/JSON under `/v1`, on a Unix socket (mode 0600,
//! or 0660 for `api.socket_group`; the caller is identified by its peer
//! credentials and is an admin) and, optionally, on a TCP address (TLS, see
//! [`crate::control::tls`]) where every request needs `Authorization:
//! Bearer TOKEN` or a client certificate (the caller is the token's or the
//! certificate's name, with its role: see [`crate::control::access`]).
//! Every change goes to the controller, which applies one at a time.
//!
//! Resources (`VIP` in a path is `ADDRESS-PORT-PROTOCOL`, e.g.
//! `203.0.113.10-443-tcp`; `ADDR` a backend address):
//!
//! | method | path | what |
//! | --- | --- | --- |
//! | GET | /v1/status | summary |
//! | GET | /v1/stats | every counter |
//! | GET, POST | /v1/vips | list; create (body: a `[[vip]]` table as JSON) |
//! | GET, PATCH, DELETE | /v1/vips/VIP | show; change `scheduler`, `hash_fields`, `on_backend_down`, `on_all_down`, `slow_start`; delete |
//! | GET, POST | /v1/vips/VIP/backends | list; add (`address`, `weight`, `drained`) |
//! | GET, PATCH, DELETE | /v1/vips/VIP/backends/ADDR | show; change `weight` / `drained`; remove |
//! | POST | /v1/backends/ADDR/load | a node's load report (ORCA-shaped JSON, see [`LoadBody`]) |
//!
//! Errors are JSON `{"error": "...", "problems": [{"field", "message"}]}`:
//! 400 for bad input (the field is named), 401 without a valid token or
//! certificate, 403 for a change by a `read` caller, 404
//! for an unknown VIP, backend or endpoint, 409 for a duplicate (or a load
//! report for a backend whose VIPs do not follow load, or a config file
//! edited and not reloaded), 413 for a body over 64 KiB, 422 for a change
//! the config cannot take (capacity, missing source address, an address
//! that cannot work here), 500 if persisting or programming failed (then
//! nothing changed), 503 if the audit log cannot record the request.
//!
//! Every change request is recorded in the audit log before it is handled
//! and its outcome after (see [`crate::control::audit`]).

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
};

use axum::{
    Extension, Json, Router,
    body::Bytes,
    extract::{
        ConnectInfo, DefaultBodyLimit, Path as UrlPath, Request, State, rejection::BytesRejection,
    },
    http::{StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::get,
    serve::IncomingStream,
};
use lb_common::{FlowEvent, Reason};
use serde::Serialize;
use tokio::net::UnixListener;

use crate::{
    control::access::{Role, Tokens},
    control::audit::AuditLog,
    control::controller::{ControllerError, ControllerHandle, Snapshot},
    control::tls::{self, TcpPeer},
    dataplane::BackendState,
    desired::change::{Change, ChangeError},
    desired::config::{self, Problem, Transport},
    desired::vip::{Backend, Vip, VipAddr},
};

/// Largest request body.
pub const BODY_LIMIT: usize = 64 * 1024;

/// API requests answered, by outcome: 2xx, 4xx, 5xx (for metrics).
static REQUESTS: [std::sync::atomic::AtomicU64; 3] =
    [const { std::sync::atomic::AtomicU64::new(0) }; 3];

/// API requests answered so far: (outcome, count) for `ok`, `refused`
/// (4xx, including refused authentication) and `failed` (5xx).
pub fn request_counts() -> [(&'static str, u64); 3] {
    use std::sync::atomic::Ordering::Relaxed;
    [
        ("ok", REQUESTS[0].load(Relaxed)),
        ("refused", REQUESTS[1].load(Relaxed)),
        ("failed", REQUESTS[2].load(Relaxed)),
    ]
}

async fn count_requests(req: Request, next: Next) -> Response {
    let r = next.run(req).await;
    let i = match r.status().as_u16() {
        500.. => 2,
        400.. => 1,
        _ => 0,
    };
    REQUESTS[i].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    r
}

/// A request as the audit log records it: method, path and body as sent
/// (the body as JSON when it is JSON, else its first KiB as text).
#[derive(Serialize)]
struct AuditedRequest<'a> {
    method: &'a str,
    path: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    body: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    body_text: Option<String>,
    body_bytes: usize,
}

impl<'a> AuditedRequest<'a> {
    fn new(method: &'a str, path: &'a str, body: &[u8]) -> AuditedRequest<'a> {
        let json = serde_json::from_slice(body).ok();
        let text = (json.is_none() && !body.is_empty())
            .then(|| String::from_utf8_lossy(&body[..body.len().min(1024)]).into_owned());
        AuditedRequest {
            method,
            path,
            body: json,
            body_text: text,
            body_bytes: body.len(),
        }
    }
}

/// Whether a request is a change request, which the audit log records:
/// every method but GET and HEAD, except pushed load reports.
fn audited(req: &Request) -> bool {
    let m = req.method();
    m != axum::http::Method::GET
        && m != axum::http::Method::HEAD
        && !(req.uri().path().starts_with("/v1/backends/") && req.uri().path().ends_with("/load"))
}

/// Records every change request in the audit log before it is handled
/// (refusing it if that fails and the policy says so), and its outcome
/// after: `applied`, or `refused: ERROR` / `failed: ERROR` with the error
/// the caller got.
async fn audit_requests(State(audit): State<AuditLog>, req: Request, next: Next) -> Response {
    if !audited(&req) {
        return next.run(req).await;
    }
    let caller = req
        .extensions()
        .get::<Caller>()
        .map_or_else(|| "unknown".to_string(), |c| c.0.clone());
    let role = req.extensions().get::<Role>().copied();
    let (parts, body) = req.into_parts();
    let (method, path) = (parts.method.to_string(), parts.uri.to_string());
    let bytes = match axum::body::to_bytes(body, BODY_LIMIT).await {
        Ok(b) => b,
        Err(e) => {
            let message = format!("request body: {e} (the limit is {BODY_LIMIT} bytes)");
            let record = AuditedRequest::new(&method, &path, &[]);
            audit.refused(&caller, role, &record, &message);
            return ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, message).into_response();
        }
    };
    let pending = match audit.request(&caller, role, &AuditedRequest::new(&method, &path, &bytes)) {
        Ok(p) => p,
        Err(e) => {
            return ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string()).into_response();
        }
    };
    let response = next
        .run(Request::from_parts(parts, axum::body::Body::from(bytes)))
        .await;
    let status = response.status();
    if status.is_success() {
        audit.outcome(pending, "applied");
        return response;
    }
    // The error the caller gets, for the record (error bodies are small).
    let (parts, body) = response.into_parts();
    let bytes = axum::body::to_bytes(body, BODY_LIMIT)
        .await
        .unwrap_or_default();
    let message = serde_json::from_slice::<serde_json::Value>(&bytes)
        .ok()
        .and_then(|v| v["error"].as_str().map(str::to_string))
        .unwrap_or_else(|| status.to_string());
    let kind = if status.is_server_error() {
        "failed"
    } else {
        "refused"
    };
    audit.outcome(pending, &format!("{kind}: {} {message}", status.as_u16()));
    Response::from_parts(parts, axum::body::Body::from(bytes))
}

/// Who made a request. Its [`Role`] is a request extension of its own.
#[derive(Clone, Debug)]
pub struct Caller(pub String);

/// An API error response.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    problems: Vec<Problem>,
}

#[derive(Serialize)]
struct ProblemView<'a> {
    field: &'a str,
    message: &'a str,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    problems: Vec<ProblemView<'a>>,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            problems: Vec::new(),
        }
    }

    fn input(problems: Vec<Problem>) -> ApiError {
        let message = problems
            .iter()
            .map(|p| format!("{}: {}", p.field, p.message))
            .collect::<Vec<_>>()
            .join("; ");
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message,
            problems,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: &self.message,
            problems: self
                .problems
                .iter()
                .map(|p| ProblemView {
                    field: &p.field,
                    message: &p.message,
                })
                .collect(),
        };
        (self.status, Json(body)).into_response()
    }
}

impl From<ControllerError> for ApiError {
    fn from(e: ControllerError) -> ApiError {
        let status = match &e {
            ControllerError::Rejected(
                ChangeError::UnknownVip(_) | ChangeError::UnknownBackend { .. },
            ) => StatusCode::NOT_FOUND,
            ControllerError::Rejected(
                ChangeError::DuplicateVip(_) | ChangeError::DuplicateBackend { .. },
            ) => StatusCode::CONFLICT,
            ControllerError::Rejected(ChangeError::Invalid { problems }) => {
                return ApiError {
                    status: StatusCode::UNPROCESSABLE_ENTITY,
                    message: e.to_string(),
                    problems: problems.clone(),
                };
            }
            ControllerError::NotFound(_) => StatusCode::NOT_FOUND,
            ControllerError::Refused(_) | ControllerError::ConfigChanged(_) => StatusCode::CONFLICT,
            ControllerError::Stopped => StatusCode::SERVICE_UNAVAILABLE,
            ControllerError::Persist { .. } | ControllerError::Dataplane(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        ApiError::new(status, e.to_string())
    }
}

type ApiResult<T> = Result<T, ApiError>;

fn body(b: Result<Bytes, BytesRejection>) -> ApiResult<Bytes> {
    b.map_err(|e| {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body: {e} (the limit is {BODY_LIMIT} bytes)"),
        )
    })
}

fn vip_param(s: &str) -> ApiResult<VipAddr> {
    VipAddr::from_path_segment(s).map_err(|e| {
        ApiError::input(vec![Problem {
            field: "vip".into(),
            message: e,
        }])
    })
}

fn backend_param(s: &str) -> ApiResult<IpAddr> {
    s.parse().map_err(|_| {
        ApiError::input(vec![Problem {
            field: "backend".into(),
            message: format!("{s:?} is not an IPv4 or IPv6 address"),
        }])
    })
}

/// A backend as the API shows it.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct BackendView {
    pub address: IpAddr,
    /// Configured weight.
    pub weight: u32,
    pub drained: bool,
    /// "up" or "down" (health checks; "up" when not checked).
    pub health: &'static str,
    /// Whether health checks run for it.
    pub checked: bool,
    /// Seconds since its health last changed (or checks started).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health_since_seconds: Option<u64>,
    /// Up/down changes since lbd started.
    pub health_transitions: u64,
    /// Why the last failed check failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// The weight its table share is built with, in units of `weight`
    /// (0 while drained or down; less than `weight` while loaded or
    /// ramping up).
    pub weight_in_effect: f64,
    /// Share of its weight load and slow start leave it, 0.05..=1.
    pub load_factor: f64,
    /// Ramping up (slow start).
    pub ramping: bool,
    /// Least-load score (lower: less loaded), for VIPs with that scheduler.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub score: Option<u32>,
    /// Its load, if its VIP follows load and it reported.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub load: Option<LoadView>,
    /// Maglev table entries it owns, and their share of the table.
    pub table_entries: usize,
    pub table_share: f64,
}

/// A node's load as the API shows it.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct LoadView {
    /// Requests waiting.
    pub queue: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub running: Option<f64>,
    /// KV-cache use, 0..=1.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kv_cache: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub utilization: Option<f64>,
    /// Smoothed pressure (1 = at its limits).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pressure: Option<f64>,
    /// `scrape` or `push`.
    pub source: &'static str,
    /// `vllm`, `sglang`, `triton`, `tgi` or `orca`.
    pub reporter: &'static str,
    pub age_seconds: f64,
}

/// A VIP as the API shows it.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct VipView {
    /// `ADDRESS:PORT/PROTOCOL`.
    pub vip: String,
    /// The VIP in URL paths.
    pub id: String,
    pub address: IpAddr,
    pub port: u16,
    pub protocol: String,
    pub scheduler: String,
    /// `maglev-src` only: `address` or `address-port`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hash_fields: Option<&'static str>,
    pub on_backend_down: String,
    pub on_all_down: String,
    pub slow_start_seconds: f64,
    /// Whether any backend is health-checked.
    pub health_checks: bool,
    /// Whether any backend's weight follows its load.
    pub load_aware: bool,
    /// Every healthy backend is at its load limit: base weights in use.
    pub saturated: bool,
    /// Every backend is down.
    pub all_down: bool,
    pub backends: Vec<BackendView>,
}

fn backend_view(
    b: &Backend,
    state: Option<&BackendState>,
    steer: Option<&crate::steering::BackendView>,
) -> BackendView {
    let health = steer.and_then(|s| s.health.as_ref());
    let now = std::time::Instant::now();
    BackendView {
        address: b.addr,
        weight: b.weight,
        drained: b.drained,
        health: if health.map_or(state.is_some_and(|s| s.down), |h| !h.up) {
            "down"
        } else {
            "up"
        },
        checked: health.is_some(),
        health_since_seconds: health.map(|h| now.saturating_duration_since(h.since).as_secs()),
        health_transitions: health.map_or(0, |h| h.transitions),
        last_error: health.and_then(|h| h.last_error.clone()),
        weight_in_effect: state.map_or(0.0, |s| s.weight_in_effect),
        load_factor: steer.map_or(1.0, |s| s.factor),
        ramping: steer.is_some_and(|s| s.ramping),
        score: steer.and_then(|s| s.score),
        load: steer.and_then(|s| {
            let r = s.load.as_ref()?;
            Some(LoadView {
                queue: r.queue,
                running: r.running,
                kv_cache: r.kv,
                utilization: r.utilization,
                pressure: s.pressure,
                source: r.source.name(),
                reporter: r.reporter,
                age_seconds: now.saturating_duration_since(r.at).as_secs_f64(),
            })
        }),
        table_entries: state.map_or(0, |s| s.table_entries),
        table_share: state.map_or(0.0, |s| s.table_share),
    }
}

fn vip_view(v: &Vip, snap: &Snapshot) -> VipView {
    let states = snap.backends.get(&v.addr);
    let steer = snap.steering.get(&v.addr);
    VipView {
        vip: v.addr.to_string(),
        id: v.addr.path_segment(),
        address: v.addr.addr,
        port: v.addr.port,
        protocol: v.addr.protocol.to_string(),
        scheduler: v.scheduler.to_string(),
        hash_fields: v.scheduler.hash_fields(),
        on_backend_down: v.on_backend_down.to_string(),
        on_all_down: v.on_all_down.to_string(),
        slow_start_seconds: v.slow_start.as_secs_f64(),
        health_checks: v.backends.iter().any(|b| v.health_check(b).is_some()),
        load_aware: v.backends.iter().any(|b| v.load_policy(b).is_some()),
        saturated: steer.is_some_and(|s| s.vip.saturated),
        all_down: steer.is_some_and(|s| s.vip.all_down),
        backends: v
            .backends
            .iter()
            .map(|b| {
                backend_view(
                    b,
                    states.and_then(|s| s.iter().find(|s| s.addr == b.addr)),
                    steer.and_then(|s| s.backends.get(&b.addr)),
                )
            })
            .collect(),
    }
}

/// `GET /v1/status`.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct StatusView {
    pub version: &'static str,
    pub uptime_seconds: u64,
    pub adopted: bool,
    pub vips: usize,
    pub backends: usize,
    pub backends_down: usize,
    /// VIPs whose healthy backends are all at their load limit.
    pub vips_saturated: usize,
    /// VIPs whose backends are all down.
    pub vips_all_down: usize,
    /// VIP addresses with a healthy backend (up or not checked): what lbd
    /// announces over BGP when `[bgp]` is set.
    pub serving_addresses: Vec<IpAddr>,
    /// Whether lbd announces them over BGP (`[bgp]`).
    pub bgp: bool,
    pub packets_forwarded: u64,
    pub packets_passed: u64,
    pub packets_dropped: u64,
}

/// `GET /v1/stats`.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct StatsView {
    /// Packets per reason.
    pub reasons: BTreeMap<&'static str, u64>,
    /// Connection-table events.
    pub conntrack: BTreeMap<&'static str, u64>,
    pub vips: Vec<TrafficView>,
    pub backends: Vec<TrafficView>,
}

/// Forwarded packets and bytes of a VIP, or of a VIP's backend.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct TrafficView {
    pub vip: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend: Option<IpAddr>,
    pub packets: u64,
    pub bytes: u64,
}

async fn status(State(h): State<ControllerHandle>) -> ApiResult<Json<StatusView>> {
    let snap = h.snapshot().await?;
    let c = h.counters().await?;
    let sum = |action: u32| {
        Reason::ALL
            .iter()
            .filter(|r| r.action() == action)
            .map(|r| c.reason(*r))
            .sum()
    };
    Ok(Json(StatusView {
        version: env!("CARGO_PKG_VERSION"),
        uptime_seconds: snap.uptime.as_secs(),
        adopted: snap.adopted,
        vips: snap.config.vips.len(),
        backends: snap.config.vips.iter().map(|v| v.backends.len()).sum(),
        backends_down: snap
            .steering
            .values()
            .flat_map(|v| v.backends.values())
            .filter(|b| b.health.as_ref().is_some_and(|h| !h.up))
            .count(),
        vips_saturated: snap.steering.values().filter(|v| v.vip.saturated).count(),
        vips_all_down: snap.steering.values().filter(|v| v.vip.all_down).count(),
        serving_addresses: snap.serving.iter().copied().collect(),
        bgp: snap.config.bgp.is_some(),
        packets_forwarded: sum(lb_common::xdp_action::XDP_TX),
        packets_passed: sum(lb_common::xdp_action::XDP_PASS),
        packets_dropped: sum(lb_common::xdp_action::XDP_DROP),
    }))
}

async fn stats(State(h): State<ControllerHandle>) -> ApiResult<Json<StatsView>> {
    let c = h.counters().await?;
    Ok(Json(StatsView {
        reasons: Reason::ALL
            .iter()
            .map(|r| (r.name(), c.reason(*r)))
            .collect(),
        conntrack: FlowEvent::ALL
            .iter()
            .map(|e| (e.name(), c.flow(*e)))
            .collect(),
        vips: c
            .vips
            .iter()
            .map(|(v, t)| TrafficView {
                vip: v.to_string(),
                backend: None,
                packets: t.packets,
                bytes: t.bytes,
            })
            .collect(),
        backends: c
            .backends
            .iter()
            .map(|((v, b), t)| TrafficView {
                vip: v.to_string(),
                backend: Some(*b),
                packets: t.packets,
                bytes: t.bytes,
            })
            .collect(),
    }))
}

async fn list_vips(State(h): State<ControllerHandle>) -> ApiResult<Json<Vec<VipView>>> {
    let snap = h.snapshot().await?;
    Ok(Json(
        snap.config
            .vips
            .iter()
            .map(|v| vip_view(v, &snap))
            .collect(),
    ))
}

async fn create_vip(
    State(h): State<ControllerHandle>,
    Extension(caller): Extension<Caller>,
    b: Result<Bytes, BytesRejection>,
) -> ApiResult<(StatusCode, Json<VipView>)> {
    let b = body(b)?;
    let snap = h.snapshot().await?;
    let vip = config::vip_from_json(&b, &snap.config.balancer).map_err(ApiError::input)?;
    let addr = vip.addr;
    h.change(Change::add_vip(vip), &caller.0).await?;
    Ok((StatusCode::CREATED, Json(show(&h, &addr).await?)))
}

async fn show(h: &ControllerHandle, addr: &VipAddr) -> ApiResult<VipView> {
    let snap = h.snapshot().await?;
    let v = snap
        .config
        .vips
        .iter()
        .find(|v| v.addr == *addr)
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("no VIP {addr}")))?;
    Ok(vip_view(v, &snap))
}

async fn get_vip(
    State(h): State<ControllerHandle>,
    UrlPath(vip): UrlPath<String>,
) -> ApiResult<Json<VipView>> {
    Ok(Json(show(&h, &vip_param(&vip)?).await?))
}

async fn update_vip(
    State(h): State<ControllerHandle>,
    Extension(caller): Extension<Caller>,
    UrlPath(vip): UrlPath<String>,
    b: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<VipView>> {
    let vip = vip_param(&vip)?;
    let patch = config::vip_patch_from_json(&body(b)?).map_err(ApiError::input)?;
    h.change(
        Change::UpdateVip {
            vip,
            patch: crate::desired::change::Patch(patch),
        },
        &caller.0,
    )
    .await?;
    Ok(Json(show(&h, &vip).await?))
}

async fn delete_vip(
    State(h): State<ControllerHandle>,
    Extension(caller): Extension<Caller>,
    UrlPath(vip): UrlPath<String>,
) -> ApiResult<StatusCode> {
    h.change(
        Change::RemoveVip {
            vip: vip_param(&vip)?,
        },
        &caller.0,
    )
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn list_backends(
    State(h): State<ControllerHandle>,
    UrlPath(vip): UrlPath<String>,
) -> ApiResult<Json<Vec<BackendView>>> {
    Ok(Json(show(&h, &vip_param(&vip)?).await?.backends))
}

async fn add_backend(
    State(h): State<ControllerHandle>,
    Extension(caller): Extension<Caller>,
    UrlPath(vip): UrlPath<String>,
    b: Result<Bytes, BytesRejection>,
) -> ApiResult<(StatusCode, Json<BackendView>)> {
    let vip = vip_param(&vip)?;
    let backend = config::backend_from_json(&body(b)?).map_err(ApiError::input)?;
    let addr = backend.addr;
    h.change(Change::add_backend(vip, backend), &caller.0)
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(find_backend(&h, &vip, addr).await?),
    ))
}

async fn find_backend(h: &ControllerHandle, vip: &VipAddr, addr: IpAddr) -> ApiResult<BackendView> {
    show(h, vip)
        .await?
        .backends
        .into_iter()
        .find(|b| b.address == addr)
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                format!("VIP {vip} has no backend {addr}"),
            )
        })
}

async fn get_backend(
    State(h): State<ControllerHandle>,
    UrlPath((vip, addr)): UrlPath<(String, String)>,
) -> ApiResult<Json<BackendView>> {
    Ok(Json(
        find_backend(&h, &vip_param(&vip)?, backend_param(&addr)?).await?,
    ))
}

async fn update_backend(
    State(h): State<ControllerHandle>,
    Extension(caller): Extension<Caller>,
    UrlPath((vip, addr)): UrlPath<(String, String)>,
    b: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<BackendView>> {
    let (vip, addr) = (vip_param(&vip)?, backend_param(&addr)?);
    let patch = config::backend_patch_from_json(&body(b)?).map_err(ApiError::input)?;
    let change = Change::UpdateBackend {
        vip,
        backend: addr,
        weight: patch.weight,
        drained: patch.drained,
    };
    h.change(change, &caller.0).await?;
    Ok(Json(find_backend(&h, &vip, addr).await?))
}

async fn delete_backend(
    State(h): State<ControllerHandle>,
    Extension(caller): Extension<Caller>,
    UrlPath((vip, addr)): UrlPath<(String, String)>,
) -> ApiResult<StatusCode> {
    let change = Change::RemoveBackend {
        vip: vip_param(&vip)?,
        backend: backend_param(&addr)?,
    };
    h.change(change, &caller.0).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /v1/backends/ADDR/load`: a node's load, shaped like an ORCA load
/// report (`xds.data.orca.v3.OrcaLoadReport` as JSON). What steers:
/// `named_metrics.queue` (or `num_requests_waiting`): requests waiting;
/// `named_metrics.kv_cache` (or `kv_cache_usage`): KV-cache use, 0..=1;
/// `application_utilization`: 1 = saturated. `named_metrics.running` (or
/// `num_requests_running`), `rps_fractional`, `eps` and the other ORCA
/// fields are accepted and shown, not steered by. `ttl` (seconds): how long
/// the report counts (default: the VIP's `load.stale_after`).
#[derive(serde::Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct LoadBody {
    pub cpu_utilization: Option<f64>,
    pub mem_utilization: Option<f64>,
    pub application_utilization: Option<f64>,
    pub rps_fractional: Option<f64>,
    pub qps: Option<f64>,
    pub eps: Option<f64>,
    pub utilization: Option<BTreeMap<String, f64>>,
    pub request_cost: Option<BTreeMap<String, f64>>,
    pub named_metrics: Option<BTreeMap<String, f64>>,
    pub ttl: Option<f64>,
}

/// Most entries of one of a load report's maps.
const MAX_LOAD_ENTRIES: usize = 64;

/// A validated load report from an ORCA-shaped body, or the problems with
/// it (each naming its field).
pub fn load_report_from_json(
    body: &[u8],
    now: std::time::Instant,
) -> Result<crate::steering::LoadReport, Vec<Problem>> {
    let b: LoadBody = config::from_json(body)?;
    let mut problems = Vec::new();
    let check = |problems: &mut Vec<Problem>, field: String, v: f64, max: f64| {
        if !v.is_finite() || v < 0.0 || v > max {
            problems.push(Problem {
                field,
                message: format!("{v} is out of range 0..={max}"),
            });
        }
    };
    for (name, v, max) in [
        ("cpu_utilization", b.cpu_utilization, 1e6),
        ("mem_utilization", b.mem_utilization, 1e6),
        ("application_utilization", b.application_utilization, 1e6),
        ("rps_fractional", b.rps_fractional, 1e12),
        ("qps", b.qps, 1e12),
        ("eps", b.eps, 1e12),
        ("ttl", b.ttl, 3600.0),
    ] {
        if let Some(v) = v {
            check(&mut problems, name.to_string(), v, max);
        }
    }
    for (name, map) in [
        ("utilization", &b.utilization),
        ("request_cost", &b.request_cost),
        ("named_metrics", &b.named_metrics),
    ] {
        let Some(map) = map else { continue };
        if map.len() > MAX_LOAD_ENTRIES {
            problems.push(Problem {
                field: name.into(),
                message: format!("{} entries; at most {MAX_LOAD_ENTRIES}", map.len()),
            });
        }
        for (k, v) in map {
            let max = if name == "named_metrics" && (k == "kv_cache" || k == "kv_cache_usage") {
                1.0
            } else {
                1e12
            };
            check(&mut problems, format!("{name}.{k}"), *v, max);
        }
    }
    if b.ttl == Some(0.0) {
        problems.push(Problem {
            field: "ttl".into(),
            message: "0 s: the report would never count".into(),
        });
    }
    let named = b.named_metrics.unwrap_or_default();
    let pick = |keys: [&str; 2]| keys.iter().find_map(|k| named.get(*k).copied());
    let queue = pick(["queue", "num_requests_waiting"]);
    let kv = pick(["kv_cache", "kv_cache_usage"]);
    if queue.is_none() && kv.is_none() && b.application_utilization.is_none() {
        problems.push(Problem {
            field: "body".into(),
            message: "nothing to steer by: give named_metrics.queue, named_metrics.kv_cache or application_utilization".into(),
        });
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    Ok(crate::steering::LoadReport {
        queue: queue.unwrap_or(0.0),
        running: pick(["running", "num_requests_running"]),
        kv,
        utilization: b.application_utilization,
        source: crate::steering::LoadSource::Push,
        reporter: "orca",
        at: now,
        ttl: b.ttl.map(std::time::Duration::from_secs_f64),
    })
}

async fn push_load(
    State(h): State<ControllerHandle>,
    UrlPath(addr): UrlPath<String>,
    b: Result<Bytes, BytesRejection>,
) -> ApiResult<StatusCode> {
    let node = backend_param(&addr)?;
    let report = load_report_from_json(&body(b)?, std::time::Instant::now());
    match report {
        Ok(r) => {
            h.push_load(node, Some(r)).await?;
            Ok(StatusCode::NO_CONTENT)
        }
        Err(problems) => {
            // Counted; changes nothing.
            let _ = h.push_load(node, None).await;
            Err(ApiError::input(problems))
        }
    }
}

async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "no such endpoint (see /v1/vips, /v1/status, /v1/stats)",
    )
}

/// The routes, without authentication (each listener adds its own).
fn routes(handle: ControllerHandle) -> Router {
    Router::new()
        .route("/v1/status", get(status))
        .route("/v1/stats", get(stats))
        .route("/v1/vips", get(list_vips).post(create_vip))
        .route(
            "/v1/vips/{vip}",
            get(get_vip).patch(update_vip).delete(delete_vip),
        )
        .route(
            "/v1/vips/{vip}/backends",
            get(list_backends).post(add_backend),
        )
        .route(
            "/v1/vips/{vip}/backends/{addr}",
            get(get_backend)
                .patch(update_backend)
                .delete(delete_backend),
        )
        .route("/v1/backends/{addr}/load", axum::routing::post(push_load))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(handle)
}

/// The peer of a Unix socket connection.
#[derive(Clone, Debug)]
struct UnixPeer(String);

impl axum::extract::connect_info::Connected<IncomingStream<'_, UnixListener>> for UnixPeer {
    fn connect_info(stream: IncomingStream<'_, UnixListener>) -> Self {
        UnixPeer(match stream.io().peer_cred() {
            Ok(c) => format!("uid={} pid={}", c.uid(), c.pid().unwrap_or(0)),
            Err(_) => "unix:unknown".into(),
        })
    }
}

async fn unix_caller(
    ConnectInfo(peer): ConnectInfo<UnixPeer>,
    mut req: Request,
    next: Next,
) -> Response {
    req.extensions_mut().insert(Caller(peer.0));
    req.extensions_mut().insert(Role::Admin);
    next.run(req).await
}

/// The TCP API's authentication: who a token is (`None`: no token file,
/// client certificates only), and where refused requests are recorded.
#[derive(Clone)]
struct TcpAuth {
    tokens: Option<Tokens>,
    audit: AuditLog,
}

/// Who a TCP request is, checked in this one place: the bearer token's
/// name and role when it carries a token, else the connection's client
/// certificate's; and whether that role allows the request (a `read`
/// caller's change gets 403). A refused change request is recorded in the
/// audit log with the caller as far as it is known.
async fn bearer_caller(
    State(auth): State<TcpAuth>,
    ConnectInfo(peer): ConnectInfo<TcpPeer>,
    mut req: Request,
    next: Next,
) -> Response {
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let found = match (given, &peer.certificate) {
        (Some(g), _) => auth
            .tokens
            .as_ref()
            .and_then(|t| t.find(g))
            .map(|(name, role)| (format!("token:{name}"), Some(role))),
        (None, Some(cert)) => Some((format!("cert:{}", cert.name), cert.role)),
        (None, None) => None,
    };
    let refusal = match &found {
        None => Some((
            StatusCode::UNAUTHORIZED,
            format!("unauthenticated tcp:{}", peer.addr),
            None,
            "a valid bearer token or client certificate is required".to_string(),
        )),
        Some((caller, None)) => Some((
            StatusCode::FORBIDDEN,
            caller.clone(),
            None,
            format!(
                "the client certificate of {caller} names no role: its subject needs O=admin or \
                 O=read"
            ),
        )),
        Some((caller, Some(role))) if !role.allows(req.method()) => Some((
            StatusCode::FORBIDDEN,
            caller.clone(),
            Some(*role),
            format!(
                "{caller} has role {role}, which may only read: {} needs role admin",
                req.method()
            ),
        )),
        Some(_) => None,
    };
    let Some((status, caller, role, message)) = refusal else {
        let (caller, role) = found.expect("an allowed caller");
        req.extensions_mut().insert(Caller(caller));
        req.extensions_mut()
            .insert(role.expect("an allowed caller has a role"));
        return next.run(req).await;
    };
    // Every refused change is recorded; a forbidden request of any method
    // too (a read caller pushing a load report, a certificate without role).
    if audited(&req) || status == StatusCode::FORBIDDEN {
        let (parts, body) = req.into_parts();
        let bytes = axum::body::to_bytes(body, BODY_LIMIT)
            .await
            .unwrap_or_default();
        let (method, path) = (parts.method.to_string(), parts.uri.to_string());
        let record = AuditedRequest::new(&method, &path, &bytes);
        auth.audit.refused(
            &caller,
            role,
            &record,
            &format!("{} {message}", status.as_u16()),
        );
    }
    let mut r = ApiError::new(status, message).into_response();
    if status == StatusCode::UNAUTHORIZED {
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            "Bearer".parse().expect("valid header"),
        );
    }
    r
}

/// Binds the Unix socket at `path` (mode 0600, or 0660 owned by `group`
/// when given; a stale socket file is replaced, a live one is an error)
/// and returns the server future.
pub async fn serve_unix(
    path: &Path,
    group: Option<&str>,
    handle: ControllerHandle,
    audit: AuditLog,
) -> std::io::Result<impl Future<Output = std::io::Result<()>> + use<>> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!(
                    "{} is in use by another process (another lbd?)",
                    path.display()
                ),
            ));
        }
        std::fs::remove_file(path)?;
    }
    // Resolved before binding: an unknown group leaves no socket behind.
    let gid = group.map(crate::host::group_id).transpose()?;
    let listener = UnixListener::bind(path)?;
    let mode = match gid {
        Some(gid) => {
            std::os::unix::fs::chown(path, None, Some(gid))?;
            0o660
        }
        None => 0o600,
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    let app = routes(handle)
        .layer(middleware::from_fn_with_state(audit, audit_requests))
        .layer(middleware::from_fn(unix_caller))
        .layer(middleware::from_fn(count_requests));
    Ok(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<UnixPeer>(),
        )
        .await
    })
}

/// Binds `listen` for the TCP API (TLS or plain, as `transport` says;
/// requests need a token or a client certificate) and returns the server.
pub async fn serve_tcp(
    listen: SocketAddr,
    transport: &Transport,
    tokens: Option<Tokens>,
    handle: ControllerHandle,
    audit: AuditLog,
) -> std::io::Result<impl Future<Output = std::io::Result<()>> + use<>> {
    let listener = tls::Listener::bind(listen, transport, "the API").await?;
    let auth = TcpAuth {
        tokens,
        audit: audit.clone(),
    };
    let app = routes(handle)
        .layer(middleware::from_fn_with_state(audit, audit_requests))
        .layer(middleware::from_fn_with_state(auth, bearer_caller))
        .layer(middleware::from_fn(count_requests));
    Ok(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<TcpPeer>(),
        )
        .await
    })
}

/// Default socket path of an instance.
pub fn default_socket(instance: &str) -> PathBuf {
    PathBuf::from(format!("/run/lb/{instance}.sock"))
}

/// Default audit log of an instance.
pub fn default_audit_log(instance: &str) -> PathBuf {
    PathBuf::from(format!("/var/log/lb/{instance}-audit.log"))
}
