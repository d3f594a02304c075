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
//! | PUT | /v1/vips | replace the whole set of VIPs (a [`VipsDocument`](crate::desired::config::VipsDocument), JSON or TOML) |
//! | PUT | /v1/vips/VIP | replace (or add) one VIP with its backends and settings |
//! | GET | /v1/vips?spec=true | the desired state as a document (`&format=toml` for TOML) |
//! | GET | /v1/vips/VIP/flows | the connection table's entries per backend (`?client=ADDR:PORT`: that flow's entry) |
//! | POST | /v1/backends/ADDR/load | a node's load report (ORCA-shaped JSON, see [`LoadBody`]) |
//! | GET | /v1/ready, /v1/live | readiness (data plane attached, config applied), liveness |
//! | GET | /v1/openapi.json | the OpenAPI 3.1 document of all this |
//!
//! Every read of the desired state answers with its revision as `ETag`
//! (`"N"`); every change accepts `If-Match: "N"` and is refused with 412,
//! changing nothing, unless N is still the current revision. The PUTs
//! take `?dry_run=true`: they answer what would change (VIPs and backends
//! added, removed, changed; each backend's table share before and after)
//! and change nothing. A PUT is one step: the whole result is validated
//! first, then persisted once, then each VIP whose table changes gets its
//! new table switched in once (VIP after VIP); a PUT that changes nothing
//! switches no table and keeps the revision.
//!
//! Errors are RFC 9457 problem details (`application/problem+json`):
//! `type`, `title`, `status`, `detail`, and lbd's own `error` (the same
//! text as `detail`) and `problems` (`[{"field", "message"}]`, the field
//! path of each problem): 400 for bad input (the field is named), 401
//! without a valid token or certificate, 403 for a change by a `read`
//! caller, 404 for an unknown VIP, backend or endpoint, 409
//! for a duplicate (or a load report for a backend whose VIPs do not
//! follow load, or a config file edited and not reloaded), 412 when
//! `If-Match` no longer matches, 413 for a body over [`BODY_LIMIT`], 422
//! for a change the config cannot take (capacity, missing source address,
//! an address that cannot work here), 500 if persisting or programming
//! failed (then nothing changed), 503 if the audit log cannot record the
//! request.
//!
//! Every change request is recorded in the audit log before it is handled
//! and its outcome after (see [`crate::control::audit`]): `applied`, `dry
//! run`, or the error.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
};

use axum::{
    Json, Router,
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
    control::controller::{
        ChangeOutcome, ChangeRequest, ControllerError, ControllerHandle, Flows, ShareMove, Snapshot,
    },
    control::tls::{self, TcpPeer},
    dataplane::BackendState,
    desired::change::{Change, ChangeError},
    desired::config::{self, Problem, Transport, VipsDocument},
    desired::vip::{Backend, Vip, VipAddr},
};

/// Largest request body: 8 MiB, room for a document of 50 VIPs with
/// 20,000 backends each (a backend takes about 40 bytes of JSON).
pub const BODY_LIMIT: usize = 8 * 1024 * 1024;

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
    let uri = parts.uri.clone();
    let bytes = match axum::body::to_bytes(body, BODY_LIMIT).await {
        Ok(b) => b,
        Err(e) => {
            let message = format!("request body: {e} (the limit is {BODY_LIMIT} bytes)");
            let record = AuditedRequest::new(&method, &path, &[]);
            let status = StatusCode::PAYLOAD_TOO_LARGE;
            audit.refused(
                &caller,
                role,
                &record,
                &format!("{} {message}", status.as_u16()),
            );
            return ApiError::new(status, message).into_response();
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
        let dry_run = uri.query().is_some_and(|q| {
            q.split('&')
                .any(|kv| kv == "dry_run=true" || kv == "dry_run=1")
        });
        audit.outcome(pending, if dry_run { "dry run" } else { "applied" });
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

/// An error as the API answers it: RFC 9457 problem details, plus lbd's
/// `error` (the same as `detail`) and `problems`.
#[derive(Serialize, utoipa::ToSchema)]
#[schema(as = Problem)]
struct ErrorBody<'a> {
    /// Always `about:blank`: the status says what kind of error it is.
    #[serde(rename = "type")]
    kind: &'a str,
    /// The status's reason phrase.
    title: &'a str,
    status: u16,
    /// What was wrong.
    detail: &'a str,
    /// The same as `detail`.
    error: &'a str,
    /// Each problem with its field path, e.g. `vip[0].backends[2].address`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    #[schema(value_type = Vec<ProblemItem>)]
    problems: Vec<ProblemView<'a>>,
}

/// One problem of a request, with the path of its field.
#[derive(Serialize, utoipa::ToSchema)]
#[allow(dead_code)]
struct ProblemItem {
    field: String,
    message: String,
}

/// The content type of errors.
pub const PROBLEM_JSON: &str = "application/problem+json";

fn problem_response(status: StatusCode, message: &str, problems: &[Problem]) -> Response {
    let body = ErrorBody {
        kind: "about:blank",
        title: status.canonical_reason().unwrap_or("Error"),
        status: status.as_u16(),
        detail: message,
        error: message,
        problems: problems
            .iter()
            .map(|p| ProblemView {
                field: &p.field,
                message: &p.message,
            })
            .collect(),
    };
    let mut r = (status, Json(body)).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(PROBLEM_JSON),
    );
    r
}

/// Errors that did not come from a handler (an unknown method, a body
/// the framework refused) as problem details too.
async fn problem_errors(req: Request, next: Next) -> Response {
    let r = next.run(req).await;
    let status = r.status();
    let is_problem = r
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes() == PROBLEM_JSON.as_bytes());
    if !(status.is_client_error() || status.is_server_error()) || is_problem {
        return r;
    }
    let (parts, body) = r.into_parts();
    let text = axum::body::to_bytes(body, 64 * 1024)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_default();
    let message = if text.is_empty() {
        status.canonical_reason().unwrap_or("error").to_string()
    } else {
        text
    };
    let mut out = problem_response(status, &message, &[]);
    for (k, v) in &parts.headers {
        if k != header::CONTENT_TYPE && k != header::CONTENT_LENGTH {
            out.headers_mut().insert(k.clone(), v.clone());
        }
    }
    out
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
        problem_response(self.status, &self.message, &self.problems)
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
            ControllerError::PreconditionFailed { .. } => StatusCode::PRECONDITION_FAILED,
            ControllerError::Refused(_) | ControllerError::ConfigChanged(_) => StatusCode::CONFLICT,
            ControllerError::Stopped | ControllerError::Unavailable(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
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
#[derive(Serialize, Debug, Clone, PartialEq, utoipa::ToSchema)]
pub struct BackendView {
    #[schema(value_type = String)]
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
    /// Work and no progress for its `stall_after`: out of the table as if
    /// down (its established flows untouched), until its counters move.
    pub stalled: bool,
    /// Seconds its reports have shown work and no progress (stalled or
    /// not yet), when they do.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub still_seconds: Option<f64>,
    /// Times it became stalled or stopped being stalled.
    pub stall_transitions: u64,
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
    /// Flows in the connection table on it (open and closing), as of the
    /// last sweep (`conntrack.sweep_interval`).
    pub active_flows: u64,
    /// Of those, flows whose client sent a FIN (within their closing
    /// timeout).
    pub closing_flows: u64,
    /// While drained: where its drain stands.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drain: Option<DrainView>,
}

/// A drained backend's drain as the API shows it.
#[derive(Serialize, Debug, Clone, PartialEq, utoipa::ToSchema)]
pub struct DrainView {
    /// `draining` (flows or requests left) or `drained` (none: a sweep that
    /// began after the drain counted no active flow, and its load reports,
    /// if any, show no request waiting or running).
    pub state: &'static str,
    /// When the drain began (Unix time, seconds).
    pub started_unix_seconds: u64,
    pub seconds: f64,
    /// Active flows left, as of the last sweep.
    pub active_flows: u64,
    /// Requests waiting and running, if it reports its load.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requests: Option<f64>,
}

/// A node's load as the API shows it.
#[derive(Serialize, Debug, Clone, PartialEq, utoipa::ToSchema)]
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
#[derive(Serialize, Debug, Clone, PartialEq, utoipa::ToSchema)]
pub struct VipView {
    /// `ADDRESS:PORT/PROTOCOL`.
    pub vip: String,
    /// The VIP in URL paths.
    pub id: String,
    #[schema(value_type = String)]
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
    /// `[vip.load] on_saturated`: `spread` or `shed`.
    pub on_saturated: String,
    /// Share of new connections the data plane drops at their SYN (0
    /// unless `on_saturated = "shed"` and the pool is saturated).
    pub shed: f64,
    /// `maglev-src` only: the load cap (see the config reference).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub load_cap: Option<f64>,
    /// Whether a TCP packet without an entry names its table position's
    /// previous backend (`second_chance`; `maglev` and `maglev-src` only).
    pub second_chance: bool,
    /// How long a table position that moved stays before load steering may
    /// move it again (`[vip.load] churn_hold`; 0 without load steering or
    /// without the second chance).
    pub churn_hold_seconds: u32,
    pub backends: Vec<BackendView>,
}

fn backend_view(
    b: &Backend,
    state: Option<&BackendState>,
    steer: Option<&crate::steering::BackendView>,
    active: crate::dataplane::ActiveCount,
    drain: Option<crate::control::controller::DrainState>,
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
        stalled: steer.is_some_and(|s| s.stalled.is_some()),
        still_seconds: steer.and_then(|s| s.still_for).map(|d| d.as_secs_f64()),
        stall_transitions: steer.map_or(0, |s| s.stall_transitions),
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
        active_flows: active.total(),
        closing_flows: active.closing,
        drain: drain.map(|d| DrainView {
            state: if d.done { "drained" } else { "draining" },
            started_unix_seconds: d.started_unix_seconds,
            seconds: d.seconds,
            active_flows: d.active_flows,
            requests: d.requests,
        }),
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
        on_saturated: v.on_saturated().to_string(),
        shed: steer.map_or(0.0, |s| s.vip.shed),
        load_cap: v.load_cap.map(|c| f64::from(c) / 100.0),
        second_chance: v.second_chance(),
        churn_hold_seconds: if v.second_chance() {
            v.churn_hold_secs()
        } else {
            0
        },
        backends: v
            .backends
            .iter()
            .map(|b| {
                backend_view(
                    b,
                    states.and_then(|s| s.iter().find(|s| s.addr == b.addr)),
                    steer.and_then(|s| s.backends.get(&b.addr)),
                    snap.active
                        .get(&v.addr)
                        .and_then(|a| a.get(&b.addr))
                        .copied()
                        .unwrap_or_default(),
                    snap.drain_state(&v.addr, b.addr),
                )
            })
            .collect(),
    }
}

/// `GET /v1/status`.
#[derive(Serialize, Debug, Clone, PartialEq, utoipa::ToSchema)]
pub struct StatusView {
    pub version: &'static str,
    /// The desired state's revision (also the `ETag`).
    pub revision: u64,
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
    #[schema(value_type = Vec<String>)]
    pub serving_addresses: Vec<IpAddr>,
    /// Whether lbd announces them over BGP (`[bgp]`).
    pub bgp: bool,
    pub packets_forwarded: u64,
    pub packets_passed: u64,
    pub packets_dropped: u64,
    /// How old the backends' `active_flows` are: since the last sweep of
    /// the connection table began (none before the first).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub active_flows_age_seconds: Option<f64>,
}

/// `GET /v1/stats`.
#[derive(Serialize, Debug, Clone, PartialEq, utoipa::ToSchema)]
pub struct StatsView {
    /// Packets per reason.
    #[schema(value_type = BTreeMap<String, u64>)]
    pub reasons: BTreeMap<&'static str, u64>,
    /// Connection-table events.
    #[schema(value_type = BTreeMap<String, u64>)]
    pub conntrack: BTreeMap<&'static str, u64>,
    pub vips: Vec<TrafficView>,
    pub backends: Vec<TrafficView>,
}

/// Forwarded packets and bytes of a VIP, or of a VIP's backend.
#[derive(Serialize, Debug, Clone, PartialEq, utoipa::ToSchema)]
pub struct TrafficView {
    pub vip: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub backend: Option<IpAddr>,
    pub packets: u64,
    pub bytes: u64,
}

/// The revision as an `ETag`.
fn etag(revision: u64) -> [(header::HeaderName, String); 1] {
    [(header::ETAG, format!("\"{revision}\""))]
}

/// What every change request carries besides its body: who asks, the
/// revision it is based on (`If-Match`) and whether it is a dry run
/// (`?dry_run=true`).
pub struct Write {
    caller: String,
    if_match: Option<u64>,
    dry_run: bool,
}

impl Write {
    fn request(&self, change: Change) -> ChangeRequest {
        ChangeRequest {
            change,
            caller: self.caller.clone(),
            if_match: self.if_match,
            dry_run: self.dry_run,
        }
    }
}

/// An `If-Match` value: `"N"` (or `W/"N"`, or bare `N`) for revision N;
/// `*` is no precondition.
fn parse_if_match(v: &header::HeaderValue) -> ApiResult<Option<u64>> {
    let bad = || {
        ApiError::input(vec![Problem {
            field: "If-Match".into(),
            message: format!(
                "{:?} is not a revision: give the ETag a read answered with, e.g. \"42\"",
                String::from_utf8_lossy(v.as_bytes())
            ),
        }])
    };
    let text = v.to_str().map_err(|_| bad())?.trim();
    if text == "*" {
        return Ok(None);
    }
    let text = text.strip_prefix("W/").unwrap_or(text);
    let text = text
        .strip_prefix('"')
        .and_then(|t| t.strip_suffix('"'))
        .unwrap_or(text);
    text.parse().map(Some).map_err(|_| bad())
}

/// Percent-decodes a query component (`+` is a space).
fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// The query parameters of `uri`, each one of `allowed`.
fn query(uri: &axum::http::Uri, allowed: &[&str]) -> ApiResult<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for kv in uri
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|kv| !kv.is_empty())
    {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        let (Some(k), Some(v)) = (percent_decode(k), percent_decode(v)) else {
            return Err(ApiError::input(vec![Problem {
                field: "query".into(),
                message: format!("{kv:?} is not percent-encoded UTF-8"),
            }]));
        };
        if !allowed.contains(&k.as_str()) {
            return Err(ApiError::input(vec![Problem {
                field: format!("query.{k}"),
                message: if allowed.is_empty() {
                    "unknown parameter: this endpoint takes none".to_string()
                } else {
                    format!(
                        "unknown parameter; this endpoint takes {}",
                        allowed.join(", ")
                    )
                },
            }]));
        }
        out.insert(k, v);
    }
    Ok(out)
}

/// A boolean query parameter.
fn flag(q: &BTreeMap<String, String>, name: &str) -> ApiResult<bool> {
    match q.get(name).map(String::as_str) {
        None | Some("false" | "0") => Ok(false),
        Some("true" | "1" | "") => Ok(true),
        Some(other) => Err(ApiError::input(vec![Problem {
            field: format!("query.{name}"),
            message: format!("{other:?} is not true or false"),
        }])),
    }
}

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Write {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _: &S,
    ) -> Result<Write, ApiError> {
        let caller = parts
            .extensions
            .get::<Caller>()
            .map_or_else(|| "unknown".to_string(), |c| c.0.clone());
        let if_match = match parts.headers.get(header::IF_MATCH) {
            Some(v) => parse_if_match(v)?,
            None => None,
        };
        // Only the PUTs take a dry run; other changes take no parameter.
        let allowed: &[&str] = if parts.method == axum::http::Method::PUT {
            &["dry_run"]
        } else {
            &[]
        };
        let q = query(&parts.uri, allowed)?;
        Ok(Write {
            caller,
            if_match,
            dry_run: flag(&q, "dry_run")?,
        })
    }
}

/// What a change did, as the PUTs answer it.
#[derive(Serialize, utoipa::ToSchema)]
pub struct ChangeView {
    /// The revision now (also the `ETag`); unchanged for a dry run and
    /// for a change that changed nothing.
    pub revision: u64,
    pub dry_run: bool,
    /// Whether anything changes.
    pub changed: bool,
    /// Each change, VIPs in address order: `change` names its kind
    /// (`vip_added`, `vip_removed`, `vip_setting`, `backend_added`,
    /// `backend_removed`, `weight_changed`, `drained`, `undrained`,
    /// `backend_setting`), `text` says it in words.
    #[schema(value_type = Vec<Object>)]
    pub changes: Vec<serde_json::Value>,
    /// Each backend whose share of its VIP's Maglev table moves.
    #[schema(value_type = Vec<ShareMoveView>)]
    pub table_shares: Vec<ShareMove>,
    /// Maglev tables switched in (each changed VIP once; 0 for a dry run).
    pub tables_switched: u64,
}

/// A backend's share of its VIP's table, before and after.
#[derive(Serialize, utoipa::ToSchema)]
#[allow(dead_code)]
pub struct ShareMoveView {
    vip: String,
    backend: String,
    from: f64,
    to: f64,
}

fn change_view(o: ChangeOutcome) -> ChangeView {
    ChangeView {
        revision: o.revision,
        dry_run: o.dry_run,
        changed: !o.changes.is_empty(),
        changes: o.changes.iter().map(|c| c.to_json()).collect(),
        table_shares: o.shares,
        tables_switched: o.tables_flipped,
    }
}

#[utoipa::path(get, path = "/v1/status", tag = "status",
    responses((status = 200, description = "Summary", body = StatusView)))]
async fn status(State(h): State<ControllerHandle>) -> ApiResult<impl IntoResponse> {
    let snap = h.snapshot().await?;
    let c = h.counters().await?;
    let sum = |action: u32| {
        Reason::ALL
            .iter()
            .filter(|r| r.action() == action)
            .map(|r| c.reason(*r))
            .sum()
    };
    Ok((
        etag(snap.revision),
        Json(StatusView {
            version: env!("CARGO_PKG_VERSION"),
            revision: snap.revision,
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
            active_flows_age_seconds: snap.sweep.age_seconds,
        }),
    ))
}

#[utoipa::path(get, path = "/v1/fleet", tag = "status",
    responses((status = 200, description = "The fleet: this member's link to etcd and every live member's status", body = crate::fleet::FleetView),
              (status = 409, description = "A standalone lbd: no [fleet] in its config", body = ErrorBody, content_type = "application/problem+json")))]
async fn fleet_status(
    State(h): State<ControllerHandle>,
) -> ApiResult<Json<crate::fleet::FleetView>> {
    let Some(info) = h.fleet_info().await? else {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "this lbd is standalone: it has no [fleet] in its config",
        ));
    };
    // The members are read from etcd now; without etcd, the list is
    // empty and `connected` says why.
    let mut link = info.link;
    let members = match crate::fleet::agent::members(&info.settings).await {
        Ok(m) => m,
        Err(e) => {
            link.connected = false;
            link.error = Some(format!("{e:#}"));
            Vec::new()
        }
    };
    Ok(Json(crate::fleet::view(
        &info.settings,
        &link,
        info.revision,
        &info.tables,
        members,
    )))
}

#[utoipa::path(get, path = "/v1/stats", tag = "status",
    responses((status = 200, description = "Every counter", body = StatsView)))]
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

/// `GET /v1/vips` parameters.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
struct ListParams {
    /// `true`: the desired state as a document (what `PUT /v1/vips` takes)
    /// instead of the VIPs' views.
    spec: Option<bool>,
    /// With `spec`: `json` (default) or `toml`.
    format: Option<String>,
}

#[utoipa::path(get, path = "/v1/vips", tag = "vips", params(ListParams),
    responses(
        (status = 200, description = "The VIPs (or, with spec=true, the desired state as a document); ETag: the revision",
         body = Vec<VipView>,
         headers(("ETag" = String, description = "The revision, \"N\""))),
        (status = 400, description = "A bad parameter", body = ErrorBody, content_type = "application/problem+json")))]
async fn list_vips(State(h): State<ControllerHandle>, uri: axum::http::Uri) -> ApiResult<Response> {
    let q = query(&uri, &["spec", "format"])?;
    let snap = h.snapshot().await?;
    if flag(&q, "spec")? {
        let doc = VipsDocument {
            revision: Some(snap.revision),
            vips: snap.config.vips.clone(),
        };
        return match q.get("format").map(String::as_str) {
            None | Some("json") => Ok((etag(snap.revision), Json(doc.to_json())).into_response()),
            Some("toml") => Ok((
                etag(snap.revision),
                [(header::CONTENT_TYPE, "application/toml")],
                doc.to_toml(),
            )
                .into_response()),
            Some(other) => Err(ApiError::input(vec![Problem {
                field: "query.format".into(),
                message: format!("{other:?} is not json or toml"),
            }])),
        };
    }
    if q.contains_key("format") {
        return Err(ApiError::input(vec![Problem {
            field: "query.format".into(),
            message: "only with spec=true".into(),
        }]));
    }
    let views: Vec<VipView> = snap
        .config
        .vips
        .iter()
        .map(|v| vip_view(v, &snap))
        .collect();
    Ok((etag(snap.revision), Json(views)).into_response())
}

/// Whether a body is TOML (`Content-Type: application/toml`) rather than
/// JSON (anything else).
fn is_toml(headers: &header::HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.trim().starts_with("application/toml"))
}

/// `If-Match` and a document's own `revision` together: the document's
/// applies when there is no header; both must agree when both are given.
fn precondition(header: Option<u64>, doc: Option<u64>) -> ApiResult<Option<u64>> {
    match (header, doc) {
        (Some(h), Some(d)) if h != d => Err(ApiError::input(vec![Problem {
            field: "revision".into(),
            message: format!(
                "the document's revision {d} and If-Match's {h} differ: give one, or the same"
            ),
        }])),
        (h, d) => Ok(h.or(d)),
    }
}

#[utoipa::path(put, path = "/v1/vips", tag = "vips",
    params(("dry_run" = Option<bool>, Query, description = "Answer what would change, change nothing"),
           ("If-Match" = Option<String>, Header, description = "Apply only at this revision (\"N\")")),
    request_body(description = "The whole desired state of the VIPs (JSON, or TOML with Content-Type: application/toml)",
        content((config::RawDocument = "application/json"), (config::RawDocument = "application/toml"))),
    responses(
        (status = 200, description = "Applied (or, dry run, what would be); ETag: the revision", body = ChangeView),
        (status = 400, description = "A bad document: every problem with its field", body = ErrorBody, content_type = "application/problem+json"),
        (status = 412, description = "If-Match no longer matches; nothing changed", body = ErrorBody, content_type = "application/problem+json"),
        (status = 413, description = "Body over the limit", body = ErrorBody, content_type = "application/problem+json"),
        (status = 422, description = "The state the config cannot take", body = ErrorBody, content_type = "application/problem+json")))]
async fn replace_vips(
    State(h): State<ControllerHandle>,
    w: Write,
    headers: header::HeaderMap,
    b: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let b = body(b)?;
    let snap = h.snapshot().await?;
    let balancer = &snap.config.balancer;
    let doc = if is_toml(&headers) {
        VipsDocument::from_toml(&b, balancer)
    } else {
        VipsDocument::from_json(&b, balancer)
    }
    .map_err(ApiError::input)?;
    let mut req = w.request(Change::ReplaceAll { vips: doc.vips });
    req.if_match = precondition(w.if_match, doc.revision)?;
    let outcome = h.submit(req).await?;
    Ok((etag(outcome.revision), Json(change_view(outcome))).into_response())
}

#[utoipa::path(put, path = "/v1/vips/{vip}", tag = "vips",
    params(("vip" = String, Path, description = "ADDRESS-PORT-PROTOCOL"),
           ("dry_run" = Option<bool>, Query, description = "Answer what would change, change nothing"),
           ("If-Match" = Option<String>, Header, description = "Apply only at this revision (\"N\")")),
    request_body(description = "The VIP as a [[vip]] table (JSON, or TOML with Content-Type: application/toml)",
        content((config::RawVip = "application/json"), (config::RawVip = "application/toml"))),
    responses(
        (status = 200, description = "Replaced (or, dry run, what would be)", body = ChangeView),
        (status = 201, description = "Added", body = ChangeView),
        (status = 400, description = "A bad VIP: every problem with its field", body = ErrorBody, content_type = "application/problem+json"),
        (status = 412, description = "If-Match no longer matches; nothing changed", body = ErrorBody, content_type = "application/problem+json"),
        (status = 422, description = "The state the config cannot take", body = ErrorBody, content_type = "application/problem+json")))]
async fn replace_vip(
    State(h): State<ControllerHandle>,
    w: Write,
    UrlPath(vip): UrlPath<String>,
    headers: header::HeaderMap,
    b: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let addr = vip_param(&vip)?;
    let b = body(b)?;
    let snap = h.snapshot().await?;
    let spec = if is_toml(&headers) {
        config::vip_from_toml(&b, &snap.config.balancer)
    } else {
        config::vip_from_json(&b, &snap.config.balancer)
    }
    .map_err(ApiError::input)?;
    if spec.addr != addr {
        return Err(ApiError::input(vec![Problem {
            field: "address".into(),
            message: format!("the body is VIP {}, the path VIP {addr}", spec.addr),
        }]));
    }
    let added = !snap.config.vips.iter().any(|v| v.addr == addr);
    let outcome = h
        .submit(w.request(Change::ReplaceVip {
            vip: addr,
            spec: Box::new(spec),
        }))
        .await?;
    let status = if added && !outcome.dry_run {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, etag(outcome.revision), Json(change_view(outcome))).into_response())
}

#[utoipa::path(post, path = "/v1/vips", tag = "vips",
    request_body(content = config::RawVip, description = "A VIP as a [[vip]] table"),
    responses(
        (status = 201, description = "Added", body = VipView),
        (status = 400, description = "A bad VIP", body = ErrorBody, content_type = "application/problem+json"),
        (status = 409, description = "The VIP exists", body = ErrorBody, content_type = "application/problem+json"),
        (status = 412, description = "If-Match no longer matches", body = ErrorBody, content_type = "application/problem+json")))]
async fn create_vip(
    State(h): State<ControllerHandle>,
    w: Write,
    b: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let b = body(b)?;
    let snap = h.snapshot().await?;
    let vip = config::vip_from_json(&b, &snap.config.balancer).map_err(ApiError::input)?;
    let addr = vip.addr;
    h.submit(w.request(Change::add_vip(vip))).await?;
    let (revision, view) = show(&h, &addr).await?;
    Ok((StatusCode::CREATED, etag(revision), Json(view)).into_response())
}

/// The VIP's view and the revision it was read at.
async fn show(h: &ControllerHandle, addr: &VipAddr) -> ApiResult<(u64, VipView)> {
    let snap = h.snapshot().await?;
    let v = snap
        .config
        .vips
        .iter()
        .find(|v| v.addr == *addr)
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("no VIP {addr}")))?;
    Ok((snap.revision, vip_view(v, &snap)))
}

#[utoipa::path(get, path = "/v1/vips/{vip}", tag = "vips",
    params(("vip" = String, Path, description = "ADDRESS-PORT-PROTOCOL")),
    responses((status = 200, description = "The VIP; ETag: the revision", body = VipView),
              (status = 404, description = "No such VIP", body = ErrorBody, content_type = "application/problem+json")))]
async fn get_vip(
    State(h): State<ControllerHandle>,
    UrlPath(vip): UrlPath<String>,
) -> ApiResult<Response> {
    let (revision, view) = show(&h, &vip_param(&vip)?).await?;
    Ok((etag(revision), Json(view)).into_response())
}

#[utoipa::path(patch, path = "/v1/vips/{vip}", tag = "vips",
    params(("vip" = String, Path, description = "ADDRESS-PORT-PROTOCOL")),
    request_body(content = Object, description = "scheduler, hash_fields, on_backend_down, on_all_down, slow_start"),
    responses((status = 200, description = "Changed", body = VipView),
              (status = 400, description = "Bad input", body = ErrorBody, content_type = "application/problem+json"),
              (status = 404, description = "No such VIP", body = ErrorBody, content_type = "application/problem+json"),
              (status = 412, description = "If-Match no longer matches", body = ErrorBody, content_type = "application/problem+json")))]
async fn update_vip(
    State(h): State<ControllerHandle>,
    w: Write,
    UrlPath(vip): UrlPath<String>,
    b: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let vip = vip_param(&vip)?;
    let patch = config::vip_patch_from_json(&body(b)?).map_err(ApiError::input)?;
    h.submit(w.request(Change::UpdateVip {
        vip,
        patch: crate::desired::change::Patch(patch),
    }))
    .await?;
    let (revision, view) = show(&h, &vip).await?;
    Ok((etag(revision), Json(view)).into_response())
}

#[utoipa::path(delete, path = "/v1/vips/{vip}", tag = "vips",
    params(("vip" = String, Path, description = "ADDRESS-PORT-PROTOCOL")),
    responses((status = 204, description = "Removed"),
              (status = 404, description = "No such VIP", body = ErrorBody, content_type = "application/problem+json"),
              (status = 412, description = "If-Match no longer matches", body = ErrorBody, content_type = "application/problem+json")))]
async fn delete_vip(
    State(h): State<ControllerHandle>,
    w: Write,
    UrlPath(vip): UrlPath<String>,
) -> ApiResult<Response> {
    let o = h
        .submit(w.request(Change::RemoveVip {
            vip: vip_param(&vip)?,
        }))
        .await?;
    Ok((StatusCode::NO_CONTENT, etag(o.revision)).into_response())
}

#[utoipa::path(get, path = "/v1/vips/{vip}/backends", tag = "backends",
    params(("vip" = String, Path, description = "ADDRESS-PORT-PROTOCOL")),
    responses((status = 200, description = "The VIP's backends", body = Vec<BackendView>),
              (status = 404, description = "No such VIP", body = ErrorBody, content_type = "application/problem+json")))]
async fn list_backends(
    State(h): State<ControllerHandle>,
    UrlPath(vip): UrlPath<String>,
) -> ApiResult<Response> {
    let (revision, view) = show(&h, &vip_param(&vip)?).await?;
    Ok((etag(revision), Json(view.backends)).into_response())
}

#[utoipa::path(post, path = "/v1/vips/{vip}/backends", tag = "backends",
    params(("vip" = String, Path, description = "ADDRESS-PORT-PROTOCOL")),
    request_body(content = config::RawBackend, description = "address, weight, drained, health, load"),
    responses((status = 201, description = "Added", body = BackendView),
              (status = 400, description = "Bad input", body = ErrorBody, content_type = "application/problem+json"),
              (status = 404, description = "No such VIP", body = ErrorBody, content_type = "application/problem+json"),
              (status = 409, description = "The backend exists", body = ErrorBody, content_type = "application/problem+json"),
              (status = 412, description = "If-Match no longer matches", body = ErrorBody, content_type = "application/problem+json")))]
async fn add_backend(
    State(h): State<ControllerHandle>,
    w: Write,
    UrlPath(vip): UrlPath<String>,
    b: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let vip = vip_param(&vip)?;
    let backend = config::backend_from_json(&body(b)?).map_err(ApiError::input)?;
    let addr = backend.addr;
    h.submit(w.request(Change::add_backend(vip, backend)))
        .await?;
    let (revision, view) = find_backend(&h, &vip, addr).await?;
    Ok((StatusCode::CREATED, etag(revision), Json(view)).into_response())
}

async fn find_backend(
    h: &ControllerHandle,
    vip: &VipAddr,
    addr: IpAddr,
) -> ApiResult<(u64, BackendView)> {
    let (revision, view) = show(h, vip).await?;
    let b = view
        .backends
        .into_iter()
        .find(|b| b.address == addr)
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                format!("VIP {vip} has no backend {addr}"),
            )
        })?;
    Ok((revision, b))
}

#[utoipa::path(get, path = "/v1/vips/{vip}/backends/{addr}", tag = "backends",
    params(("vip" = String, Path, description = "ADDRESS-PORT-PROTOCOL"), ("addr" = String, Path, description = "The backend's address")),
    responses((status = 200, description = "The backend", body = BackendView),
              (status = 404, description = "No such VIP or backend", body = ErrorBody, content_type = "application/problem+json")))]
async fn get_backend(
    State(h): State<ControllerHandle>,
    UrlPath((vip, addr)): UrlPath<(String, String)>,
) -> ApiResult<Response> {
    let (revision, view) = find_backend(&h, &vip_param(&vip)?, backend_param(&addr)?).await?;
    Ok((etag(revision), Json(view)).into_response())
}

#[utoipa::path(patch, path = "/v1/vips/{vip}/backends/{addr}", tag = "backends",
    params(("vip" = String, Path, description = "ADDRESS-PORT-PROTOCOL"), ("addr" = String, Path, description = "The backend's address")),
    request_body(content = Object, description = "weight and/or drained"),
    responses((status = 200, description = "Changed", body = BackendView),
              (status = 400, description = "Bad input", body = ErrorBody, content_type = "application/problem+json"),
              (status = 404, description = "No such VIP or backend", body = ErrorBody, content_type = "application/problem+json"),
              (status = 412, description = "If-Match no longer matches", body = ErrorBody, content_type = "application/problem+json")))]
async fn update_backend(
    State(h): State<ControllerHandle>,
    w: Write,
    UrlPath((vip, addr)): UrlPath<(String, String)>,
    b: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let (vip, addr) = (vip_param(&vip)?, backend_param(&addr)?);
    let patch = config::backend_patch_from_json(&body(b)?).map_err(ApiError::input)?;
    let change = Change::UpdateBackend {
        vip,
        backend: addr,
        weight: patch.weight,
        drained: patch.drained,
    };
    h.submit(w.request(change)).await?;
    let (revision, view) = find_backend(&h, &vip, addr).await?;
    Ok((etag(revision), Json(view)).into_response())
}

#[utoipa::path(delete, path = "/v1/vips/{vip}/backends/{addr}", tag = "backends",
    params(("vip" = String, Path, description = "ADDRESS-PORT-PROTOCOL"), ("addr" = String, Path, description = "The backend's address")),
    responses((status = 204, description = "Removed"),
              (status = 404, description = "No such VIP or backend", body = ErrorBody, content_type = "application/problem+json"),
              (status = 412, description = "If-Match no longer matches", body = ErrorBody, content_type = "application/problem+json")))]
async fn delete_backend(
    State(h): State<ControllerHandle>,
    w: Write,
    UrlPath((vip, addr)): UrlPath<(String, String)>,
) -> ApiResult<Response> {
    let change = Change::RemoveBackend {
        vip: vip_param(&vip)?,
        backend: backend_param(&addr)?,
    };
    let o = h.submit(w.request(change)).await?;
    Ok((StatusCode::NO_CONTENT, etag(o.revision)).into_response())
}

#[utoipa::path(get, path = "/v1/vips/{vip}/flows", tag = "vips",
    params(("vip" = String, Path, description = "ADDRESS-PORT-PROTOCOL"),
           ("client" = Option<String>, Query, description = "ADDRESS:PORT ([ADDRESS]:PORT for IPv6): that client's flow's entry")),
    responses((status = 200, description = "The VIP's live entries per backend", body = Flows),
              (status = 404, description = "No such VIP", body = ErrorBody, content_type = "application/problem+json")))]
async fn vip_flows(
    State(h): State<ControllerHandle>,
    UrlPath(vip): UrlPath<String>,
    uri: axum::http::Uri,
) -> ApiResult<Json<Flows>> {
    let vip = vip_param(&vip)?;
    let q = query(&uri, &["client"])?;
    let client = match q.get("client") {
        None => None,
        Some(c) => Some(c.parse::<SocketAddr>().map_err(|_| {
            ApiError::input(vec![Problem {
                field: "query.client".into(),
                message: format!("{c:?} is not ADDRESS:PORT (IPv6: [ADDRESS]:PORT)"),
            }])
        })?),
    };
    Ok(Json(h.flows(vip, client).await?))
}

/// `GET /v1/ready`, `GET /v1/live`.
#[derive(Serialize, utoipa::ToSchema)]
pub struct Health {
    pub ok: bool,
    pub detail: &'static str,
}

#[utoipa::path(get, path = "/v1/ready", tag = "status",
    responses((status = 200, description = "Ready: the data plane is attached and the config applied", body = Health),
              (status = 503, description = "Not ready (starting, or stopping)", body = Health)))]
async fn ready(State(h): State<ControllerHandle>) -> (StatusCode, Json<Health>) {
    if h.ready() {
        (
            StatusCode::OK,
            Json(Health {
                ok: true,
                detail: "the data plane is attached and the config applied",
            }),
        )
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(Health {
                ok: false,
                detail: "not ready: starting (data plane not attached or config not applied yet) or stopping",
            }),
        )
    }
}

#[utoipa::path(get, path = "/v1/live", tag = "status",
    responses((status = 200, description = "Alive: the controller answers", body = Health),
              (status = 503, description = "The controller does not answer within 2 s", body = Health)))]
async fn live(State(h): State<ControllerHandle>) -> (StatusCode, Json<Health>) {
    match tokio::time::timeout(std::time::Duration::from_secs(2), h.snapshot()).await {
        Ok(Ok(_)) => (
            StatusCode::OK,
            Json(Health {
                ok: true,
                detail: "the controller answers",
            }),
        ),
        _ => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(Health {
                ok: false,
                detail: "the controller does not answer",
            }),
        ),
    }
}

/// `POST /v1/backends/ADDR/load`: a node's load, shaped like an ORCA load
/// report (`xds.data.orca.v3.OrcaLoadReport` as JSON). What steers:
/// `named_metrics.queue` (or `num_requests_waiting`): requests waiting;
/// `named_metrics.kv_cache` (or `kv_cache_usage`): KV-cache use, 0..=1;
/// `application_utilization`: 1 = saturated. `named_metrics.running` (or
/// `num_requests_running`), `rps_fractional`, `eps` and the other ORCA
/// fields are accepted and shown, not steered by. `named_metrics.progress`:
/// a count that grows while the node makes progress (tokens, say), for
/// stall detection (`stall_after`). `ttl` (seconds): how long
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
        progress: named.get("progress").copied(),
        source: crate::steering::LoadSource::Push,
        reporter: "orca",
        at: now,
        ttl: b.ttl.map(std::time::Duration::from_secs_f64),
    })
}

#[utoipa::path(post, path = "/v1/backends/{addr}/load", tag = "load",
    params(("addr" = String, Path, description = "The node's address (a backend of a VIP that follows load)")),
    request_body(content = Object, description = "An ORCA-shaped load report (see LoadBody in the docs)"),
    responses((status = 204, description = "Taken"),
              (status = 400, description = "A bad report", body = ErrorBody, content_type = "application/problem+json"),
              (status = 404, description = "No backend of any VIP", body = ErrorBody, content_type = "application/problem+json"),
              (status = 409, description = "No VIP of the backend follows load", body = ErrorBody, content_type = "application/problem+json")))]
async fn push_load(
    State(h): State<ControllerHandle>,
    UrlPath(addr): UrlPath<String>,
    b: Result<Bytes, BytesRejection>,
) -> ApiResult<StatusCode> {
    let node = backend_param(&addr)?;
    let raw = body(b)?;
    let report = load_report_from_json(&raw, std::time::Instant::now());
    match report {
        Ok(r) => {
            h.push_load_from(node, Some(r), Some(raw.to_vec())).await?;
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

/// The OpenAPI document's frame; the paths come from the handlers.
#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "lbd control API",
        description = "The control API of lbd, the XDP layer-4 load balancer: VIPs, backends, load reports, status. Served on lbd's Unix socket (every caller an admin) and, over TLS with bearer tokens or client certificates, on TCP, where a caller of role read may only GET (anything else: 403); this document is at /v1/openapi.json (and `lbd openapi` prints it)."
    ),
    components(schemas(ErrorBody, ProblemItem, ShareMoveView))
)]
struct ApiDoc;

/// The routes and their OpenAPI document, from the same handlers: a
/// route without a document entry cannot be added here.
fn documented_routes() -> (Router<ControllerHandle>, utoipa::openapi::OpenApi) {
    use utoipa::OpenApi;
    use utoipa_axum::{router::OpenApiRouter, routes};
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(status))
        .routes(routes!(stats))
        .routes(routes!(ready))
        .routes(routes!(live))
        .routes(routes!(list_vips, create_vip, replace_vips))
        .routes(routes!(get_vip, update_vip, delete_vip, replace_vip))
        .routes(routes!(list_backends, add_backend))
        .routes(routes!(get_backend, update_backend, delete_backend))
        .routes(routes!(vip_flows))
        .routes(routes!(push_load))
        .routes(routes!(fleet_status))
        .split_for_parts()
}

/// The OpenAPI 3.1 document of `/v1` (what `/v1/openapi.json` serves and
/// docs/openapi.json holds).
pub fn openapi() -> utoipa::openapi::OpenApi {
    let mut doc = documented_routes().1;
    doc.info.version = env!("CARGO_PKG_VERSION").to_string();
    doc
}

/// The routes, without authentication (each listener adds its own).
fn routes(handle: ControllerHandle) -> Router {
    let (router, _) = documented_routes();
    let document = serde_json::to_value(openapi()).expect("the document serializes");
    router
        .route(
            "/v1/openapi.json",
            get(move || {
                let document = document.clone();
                async move { Json(document) }
            }),
        )
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
        .layer(middleware::from_fn(problem_errors))
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
        .layer(middleware::from_fn(problem_errors))
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
