//! The single owner of the balancer's state. It holds the desired config
//! and the [`Dataplane`]; every other task (the API, the metrics endpoint,
//! the SIGHUP reload, the health checks and load scrapes) talks to it
//! through a [`ControllerHandle`], so changes are applied one at a time and
//! never interleave, and no lock is held across an await.
//!
//! A change is made to a copy of the desired config and validated as a
//! whole, persisted to the config file (atomically, and only if the file is
//! as lbd last read it: see [`ConfigFile`]), and only then programmed into
//! the data plane; if programming fails the file is put back. The API
//! records every change request in the audit log; the controller records
//! reloads.
//!
//! Health checks and load scrapes run as tasks of their own, one per
//! checked backend of a VIP and one per scraped node, and send their
//! results here; [`Steering`] turns them into table weights, applied at
//! once for health changes and at most once a second per VIP for load.
//!
//! A fleet member (`[fleet]`) proposes changes to the fleet agent instead
//! of committing them, commits the revisions etcd hands back, and takes
//! its weights from the fleet's steering view (see the `fleet` submodule
//! and [`crate::fleet`]).

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    future::Future,
    net::IpAddr,
    time::{Duration, Instant},
};

use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch};

use crate::{
    control::access::Role,
    control::audit::AuditLog,
    control::metrics::DurationHistogram,
    dataplane::{BackendState, Counters, Dataplane, DataplaneError, MapUsage},
    desired::change::{Change, ChangeError},
    desired::config::{self, Config, ConfigFile, SaveError},
    desired::diff::{self, StateChange},
    desired::policy::{HealthCheck, ScrapeTarget},
    desired::state_file::StateFile,
    desired::vip::{Scheduler, Vip, VipAddr},
    host::bgp::Announcement,
    host::bgp_status::BgpStatus,
    steering::probe::{self, ScrapeError},
    steering::{BackendView, LoadReport, Plan, Steering, VipView},
};

mod fleet;
use fleet::{FleetSteer, SteerMode};

/// How often the data plane's cached next hops are looked up again, and so
/// the longest a neighbour change takes to reach the data plane.
pub const NEXTHOP_REFRESH: Duration = Duration::from_secs(1);
/// How often the controller collects a finished active-flow sweep and
/// starts the next one when `conntrack.sweep_interval` has passed (the
/// sweep itself runs on its own thread; see `crate::dataplane`'s `active`).
const SWEEP_POLL: Duration = Duration::from_millis(100);

/// What the controller knows, for views (API, `lbctl`).
#[derive(Clone, Debug)]
pub struct Snapshot {
    /// The desired state.
    pub config: Config,
    /// Per VIP, its backends as programmed (health, table share).
    pub backends: BTreeMap<VipAddr, Vec<BackendState>>,
    /// How long the controller has run.
    pub uptime: Duration,
    /// Whether the data plane was adopted from a previous lbd.
    pub adopted: bool,
    /// Health and load of every VIP's backends (empty without a controller).
    pub steering: BTreeMap<VipAddr, SteeringView>,
    /// Health checks and load reports so far.
    pub probes: ProbeStats,
    /// VIP addresses with a healthy backend: what `[bgp]` announces.
    pub serving: std::collections::BTreeSet<IpAddr>,
    /// The desired state's revision (see [`Controller::with_revision`]).
    pub revision: u64,
    /// Per VIP, its backends' active flows as of the last sweep.
    pub active: BTreeMap<VipAddr, BTreeMap<IpAddr, crate::dataplane::ActiveCount>>,
    /// The sweeps of the connection table so far.
    pub sweep: crate::dataplane::SweepStats,
    /// Drained backends: when their drain began.
    pub drains: BTreeMap<(VipAddr, IpAddr), Drain>,
}

/// When a backend's drain began (it became drained, or lbd started with it
/// drained).
#[derive(Clone, Copy, Debug)]
pub struct Drain {
    pub since: std::time::SystemTime,
    pub at: Instant,
}

impl Snapshot {
    /// Where the drain of `backend` of `vip` stands, if it is drained: it
    /// is done once a sweep that began after the drain counted no active
    /// flow on it, and its load reports (if it sends any) show no request
    /// waiting or running.
    pub fn drain_state(&self, vip: &VipAddr, backend: IpAddr) -> Option<DrainState> {
        let d = self.drains.get(&(*vip, backend))?;
        let active = self
            .active
            .get(vip)
            .and_then(|a| a.get(&backend))
            .map_or(0, |c| c.total());
        let age = d.at.elapsed().as_secs_f64();
        let counted_since = self.sweep.age_seconds.is_some_and(|s| s < age);
        let running = self
            .steering
            .get(vip)
            .and_then(|s| s.backends.get(&backend))
            .and_then(|b| b.load.as_ref())
            .map(|l| l.queue + l.running.unwrap_or(0.0));
        let done = counted_since && active == 0 && running.is_none_or(|r| r <= 0.0);
        Some(DrainState {
            started_unix_seconds: d
                .since
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |t| t.as_secs()),
            seconds: age,
            active_flows: active,
            requests: running,
            done,
        })
    }
}

/// A drain as views show it (see [`Snapshot::drain_state`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DrainState {
    pub started_unix_seconds: u64,
    pub seconds: f64,
    /// Active flows left as of the last sweep.
    pub active_flows: u64,
    /// Requests waiting and running, if it reports its load.
    pub requests: Option<f64>,
    pub done: bool,
}

/// A VIP's health and load, for views.
#[derive(Clone, Debug, Default)]
pub struct SteeringView {
    pub vip: VipView,
    pub backends: BTreeMap<IpAddr, BackendView>,
}

/// Counts of health checks and load reports since lbd started.
#[derive(Clone, Debug, Default)]
pub struct ProbeStats {
    pub checks_ok: u64,
    pub checks_failed: u64,
    /// Load reports by (source, outcome): `accepted`, `invalid`,
    /// `unknown_format`, `no_samples`, `failed` (no answer), `unknown_backend`,
    /// `no_policy`, and `stale` (accepted, then too old before a newer one).
    pub reports: BTreeMap<(&'static str, &'static str), u64>,
    /// How long the health checks of each VIP's backends took.
    pub check_durations: BTreeMap<VipAddr, DurationHistogram>,
    /// By source (`scrape`, `push`): from a load report's arrival to the
    /// steering decision it caused being in the maps (reports that changed
    /// a backend's level while no rate limit held the rebuild back).
    pub reaction: BTreeMap<&'static str, DurationHistogram>,
    /// Scrapes that started more than half an interval late (the node's
    /// scrapes fall behind their interval).
    pub scrapes_late: u64,
}

impl Snapshot {
    /// `config` with its backends as `dp` has them programmed.
    pub fn read(dp: &Dataplane, config: &Config, uptime: Duration) -> Snapshot {
        let backends = config
            .vips
            .iter()
            .filter_map(|v| Some((v.addr, dp.backend_states(&v.addr)?)))
            .collect();
        Snapshot {
            config: config.clone(),
            backends,
            uptime,
            adopted: dp.adopted(),
            steering: BTreeMap::new(),
            probes: ProbeStats::default(),
            serving: Default::default(),
            revision: 0,
            active: config
                .vips
                .iter()
                .map(|v| (v.addr, dp.active_flows(&v.addr)))
                .collect(),
            sweep: dp.sweep_stats(),
            drains: BTreeMap::new(),
        }
    }
}

/// A change as the API asks for it.
#[derive(Clone, Debug)]
pub struct ChangeRequest {
    pub change: Change,
    /// Who asks (for the log).
    pub caller: String,
    /// The revision the change is based on (`If-Match`): refused with
    /// [`ControllerError::PreconditionFailed`] unless it is the current one.
    pub if_match: Option<u64>,
    /// Only work out what would change; change nothing.
    pub dry_run: bool,
}

/// What a change did or, in a dry run, would do.
#[derive(Clone, Debug, Default)]
pub struct ChangeOutcome {
    /// The revision after the change: the same as before for a dry run
    /// and for a change that changed nothing.
    pub revision: u64,
    pub dry_run: bool,
    /// Every change of the desired state, VIPs in address order.
    pub changes: Vec<StateChange>,
    /// Every backend whose share of its VIP's table moves.
    pub shares: Vec<ShareMove>,
    /// Maglev tables switched in (0 for a dry run, or when nothing changed).
    pub tables_flipped: u64,
}

/// A backend's share of its VIP's table before and after a change.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ShareMove {
    pub vip: String,
    pub backend: IpAddr,
    pub from: f64,
    pub to: f64,
}

/// Why a change failed.
#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error("the controller has stopped")]
    Stopped,
    #[error(transparent)]
    Rejected(#[from] ChangeError),
    #[error("persisting the change to {path} failed, nothing changed: {message}")]
    Persist { path: String, message: String },
    /// The config file changed on disk since lbd read it (see [`ConfigFile`]).
    #[error("{0}; nothing changed")]
    ConfigChanged(String),
    #[error("{0}")]
    Dataplane(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Refused(String),
    #[error(
        "If-Match: revision {given} is not the current revision {current} (the state changed \
         since it was read); read it again and retry; nothing changed"
    )]
    PreconditionFailed { given: u64, current: u64 },
    /// What the change needs cannot be reached now (the fleet's etcd).
    #[error("{0}")]
    Unavailable(String),
}

/// A change of a fleet member on its way through etcd (see
/// [`crate::fleet`]): worked out and validated here, written by the fleet
/// agent, and answered once this member applied the revision it became.
pub struct PendingChange {
    req: ChangeRequest,
    reply: oneshot::Sender<Result<ChangeOutcome, ControllerError>>,
    changes: Vec<StateChange>,
    touched: Vec<VipAddr>,
    before: BTreeMap<(VipAddr, IpAddr), f64>,
}

impl PendingChange {
    /// Answers the caller with `error`; nothing changed.
    pub fn fail(self, error: ControllerError) {
        tracing::info!(error = %error, "change refused");
        let _ = self.reply.send(Err(error));
    }
}

/// The controller's side of the fleet: where proposals go and what the
/// agent knows of etcd.
pub struct FleetLink {
    pub settings: crate::fleet::FleetSettings,
    pub proposals: mpsc::Sender<crate::fleet::agent::ToAgent>,
    pub link: crate::fleet::SharedLink,
}

/// What `GET /v1/fleet` starts from: this member's side (the members are
/// read from etcd by the API).
#[derive(Clone, Debug)]
pub struct FleetInfo {
    pub settings: crate::fleet::FleetSettings,
    pub link: crate::fleet::LinkState,
    pub revision: u64,
    pub tables: BTreeMap<String, String>,
    /// The etcd revision of the steering view the tables were built from
    /// (0: none yet).
    pub steering_revision: u64,
    /// Backends the safety net took out since lbd started.
    pub divergences: u64,
}

/// Everything the metrics endpoint exports, read in one request.
#[derive(Clone, Debug)]
pub struct Scrape {
    pub counters: Counters,
    pub snapshot: Snapshot,
    /// Tables built per VIP since this process started.
    pub rebuilds: BTreeMap<VipAddr, u64>,
    pub usage: MapUsage,
    /// How long reading the maps took.
    pub read_time: Duration,
    /// BIRD's view of the announcements (with `[bgp]`; filled in by the
    /// metrics endpoint, which asks BIRD itself).
    pub bgp: Option<BgpStatus>,
    /// This member's side of the fleet (with `[fleet]`).
    pub fleet: Option<FleetInfo>,
}

impl Scrape {
    /// Reads the data plane's counters and state for one scrape.
    pub fn read(dp: &Dataplane, snapshot: Snapshot) -> Result<Scrape, DataplaneError> {
        let started = Instant::now();
        Ok(Scrape {
            counters: dp.counters()?,
            snapshot,
            rebuilds: dp.rebuilds(),
            usage: dp.usage(),
            read_time: started.elapsed(),
            bgp: None,
            fleet: None,
        })
    }
}

enum Request {
    Counters(oneshot::Sender<Result<Counters, String>>),
    Scrape(oneshot::Sender<Result<Scrape, String>>),
    Snapshot(oneshot::Sender<Snapshot>),
    Change(
        Box<ChangeRequest>,
        oneshot::Sender<Result<ChangeOutcome, ControllerError>>,
    ),
    /// A reloaded config file (SIGHUP), and who asked.
    Reload(
        Box<(ConfigFile, Config)>,
        String,
        oneshot::Sender<Result<(), ControllerError>>,
    ),
    /// A health check's result (for every VIP that checks `backend` so),
    /// and how long it took.
    Health {
        backend: IpAddr,
        check: Box<HealthCheck>,
        result: Result<(), String>,
        took: Duration,
    },
    /// A load scrape's result, and whether it started late (the scrapes
    /// of its node fall behind their interval).
    Scraped {
        node: IpAddr,
        result: Box<Result<LoadReport, ScrapeError>>,
        late: bool,
    },
    /// The connection table's entries of a VIP (and one client's flow).
    Flows(
        VipAddr,
        Option<std::net::SocketAddr>,
        oneshot::Sender<Result<Flows, ControllerError>>,
    ),
    /// A load report pushed to the API (and its body, to forward it).
    Push(
        IpAddr,
        Option<Box<LoadReport>>,
        Option<Vec<u8>>,
        oneshot::Sender<Result<(), ControllerError>>,
    ),
    /// A revision of the fleet's desired state, and the change of this
    /// member that made it, if one did.
    FleetRevision {
        revision: u64,
        document: Vec<u8>,
        pending: Option<Box<PendingChange>>,
    },
    /// A change that lost a race in etcd, to be worked out again.
    Resubmit(Box<PendingChange>, u32),
    /// The fleet's steering view (JSON), as the leader published it, and
    /// its etcd revision.
    FleetSteering(u64, Vec<u8>),
    /// The members' health verdicts.
    FleetHealth(BTreeMap<String, crate::fleet::HealthDoc>),
    /// This member became (or stopped being) the steering leader.
    FleetLeader(bool),
    FleetInfo(oneshot::Sender<Option<FleetInfo>>),
}

/// A VIP's entries in the connection table.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct Flows {
    pub vip: String,
    /// Per backend address: its live entries.
    #[schema(value_type = BTreeMap<String, crate::dataplane::FlowCounts>)]
    pub backends: BTreeMap<IpAddr, crate::dataplane::FlowCounts>,
    /// With `client`: that flow's entry, `null` when it has none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client: Option<Option<crate::dataplane::FlowEntry>>,
    /// How long reading the tables took.
    pub read_ms: f64,
}

/// A cheap, cloneable way to ask the controller for things.
#[derive(Clone)]
pub struct ControllerHandle {
    tx: mpsc::Sender<Request>,
    /// Set once the data plane is attached and the config applied.
    ready: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl ControllerHandle {
    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Request,
    ) -> Result<T, ControllerError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(make(tx))
            .await
            .map_err(|_| ControllerError::Stopped)?;
        rx.await.map_err(|_| ControllerError::Stopped)
    }

    /// Whether lbd is ready: the data plane attached, the config applied.
    pub fn ready(&self) -> bool {
        self.ready.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Says lbd is ready (or, shutting down, no longer).
    pub fn set_ready(&self, ready: bool) {
        self.ready
            .store(ready, std::sync::atomic::Ordering::Release);
    }

    /// VIP `vip`'s entries in the connection table, per backend; with
    /// `client`, that client's flow's entry.
    pub async fn flows(
        &self,
        vip: VipAddr,
        client: Option<std::net::SocketAddr>,
    ) -> Result<Flows, ControllerError> {
        self.ask(|tx| Request::Flows(vip, client, tx)).await?
    }

    /// A snapshot of the data plane's counters.
    pub async fn counters(&self) -> Result<Counters, ControllerError> {
        self.ask(Request::Counters)
            .await?
            .map_err(ControllerError::Dataplane)
    }

    /// The desired state and what is programmed.
    pub async fn snapshot(&self) -> Result<Snapshot, ControllerError> {
        self.ask(Request::Snapshot).await
    }

    /// What the metrics endpoint exports.
    pub async fn scrape(&self) -> Result<Scrape, ControllerError> {
        self.ask(Request::Scrape)
            .await?
            .map_err(ControllerError::Dataplane)
    }

    /// Makes `change` on behalf of `caller` (recorded in the audit log).
    pub async fn change(&self, change: Change, caller: &str) -> Result<(), ControllerError> {
        self.submit(ChangeRequest {
            change,
            caller: caller.to_string(),
            if_match: None,
            dry_run: false,
        })
        .await
        .map(|_| ())
    }

    /// Makes (or, with `dry_run`, works out) a change; one step, however
    /// many VIPs and backends it touches.
    pub async fn submit(&self, req: ChangeRequest) -> Result<ChangeOutcome, ControllerError> {
        self.ask(|tx| Request::Change(Box::new(req), tx)).await?
    }

    /// Applies a reloaded config file as a diff (SIGHUP): settings that
    /// can change, then the VIPs. It becomes the desired state, and the
    /// file's text the one API changes are written into. Refused whole if
    /// it changes a setting that cannot change while lbd runs
    /// ([`config::reload_problems`]).
    pub async fn reload(
        &self,
        file: ConfigFile,
        config: Config,
        caller: &str,
    ) -> Result<(), ControllerError> {
        self.ask(|tx| Request::Reload(Box::new((file, config)), caller.to_string(), tx))
            .await?
    }

    /// Hands the controller a revision of the fleet's desired state (the
    /// fleet agent does).
    pub async fn fleet_revision(
        &self,
        revision: u64,
        document: Vec<u8>,
        pending: Option<PendingChange>,
    ) -> Result<(), ControllerError> {
        self.tx
            .send(Request::FleetRevision {
                revision,
                document,
                pending: pending.map(Box::new),
            })
            .await
            .map_err(|_| ControllerError::Stopped)
    }

    /// Has a change that lost a race in etcd worked out again.
    pub async fn resubmit(&self, pending: PendingChange, retries: u32) {
        if let Err(e) = self
            .tx
            .send(Request::Resubmit(Box::new(pending), retries))
            .await
        {
            let Request::Resubmit(p, _) = e.0 else {
                unreachable!()
            };
            p.fail(ControllerError::Stopped);
        }
    }

    /// Hands the controller the fleet's steering view (the agent does).
    pub async fn fleet_steering(&self, revision: u64, doc: Vec<u8>) -> Result<(), ControllerError> {
        self.send(Request::FleetSteering(revision, doc)).await
    }

    /// Hands the controller the members' health verdicts.
    pub async fn fleet_health(
        &self,
        docs: BTreeMap<String, crate::fleet::HealthDoc>,
    ) -> Result<(), ControllerError> {
        self.send(Request::FleetHealth(docs)).await
    }

    /// Tells the controller that this member leads the fleet's steering
    /// now, or no longer.
    pub async fn fleet_leader(&self, leads: bool) -> Result<(), ControllerError> {
        self.send(Request::FleetLeader(leads)).await
    }

    async fn send(&self, req: Request) -> Result<(), ControllerError> {
        self.tx
            .send(req)
            .await
            .map_err(|_| ControllerError::Stopped)
    }

    /// This member's side of the fleet (`None`: no `[fleet]`).
    pub async fn fleet_info(&self) -> Result<Option<FleetInfo>, ControllerError> {
        self.ask(Request::FleetInfo).await
    }

    /// Records a load report `node` pushed (validated already; `None`: it
    /// was invalid, only counted). Refused when `node` is no backend, or
    /// none of its VIPs follows load.
    pub async fn push_load(
        &self,
        node: IpAddr,
        report: Option<LoadReport>,
    ) -> Result<(), ControllerError> {
        self.push_load_from(node, report, None).await
    }

    /// [`ControllerHandle::push_load`] with the report as it came (`body`):
    /// a fleet member that does not lead the steering forwards it to the
    /// leader through etcd.
    pub async fn push_load_from(
        &self,
        node: IpAddr,
        report: Option<LoadReport>,
        body: Option<Vec<u8>>,
    ) -> Result<(), ControllerError> {
        self.ask(|tx| Request::Push(node, report.map(Box::new), body, tx))
            .await?
    }
}

/// How often steering looks at load and slow start.
const STEERING_TICK: Duration = Duration::from_millis(250);

/// The health-check and scrape tasks; aborted when dropped.
#[derive(Default)]
struct Probes {
    /// One per backend address and check: VIPs that check a backend the
    /// same way share the checks (and see the same results).
    checks: HashMap<(IpAddr, HealthCheck), tokio::task::AbortHandle>,
    scrapes: HashMap<IpAddr, (ScrapeTarget, tokio::task::AbortHandle)>,
}

impl Drop for Probes {
    fn drop(&mut self) {
        for h in self.checks.values() {
            h.abort();
        }
        for (_, h) in self.scrapes.values() {
            h.abort();
        }
    }
}

/// The owner of the desired state and the data plane.
pub struct Controller {
    dp: Dataplane,
    rx: mpsc::Receiver<Request>,
    config: Config,
    /// Where changes are persisted (the config file), if anywhere.
    file: Option<ConfigFile>,
    /// Where reloads are recorded (the API records its own requests).
    audit: Option<AuditLog>,
    started: Instant,
    /// For the probe tasks to send their results.
    tx: mpsc::Sender<Request>,
    steering: Steering,
    probes: Probes,
    stats: ProbeStats,
    /// Whether each scraped node's last scrape worked (to log changes once).
    scrape_ok: HashMap<IpAddr, bool>,
    /// Scraped nodes whose scrapes fall behind their interval (logged once,
    /// until one is on time again).
    scrapes_behind: HashSet<IpAddr>,
    /// A stall change may change what BGP announces.
    announce_due: bool,
    /// What BGP should announce, once the data plane is attached.
    announce: Option<watch::Sender<Announcement>>,
    /// The host checks' warnings about the desired state (each is logged
    /// once, when it first appears).
    host_warnings: Vec<String>,
    /// The desired state's revision: one more with every change of it.
    revision: u64,
    /// Where API changes are persisted instead of the config file.
    state_file: Option<StateFile>,
    /// Drained backends: when their drain began (see [`Controller::note_drains`]).
    drains: BTreeMap<(VipAddr, IpAddr), Drain>,
    /// With `[fleet]`: changes go through etcd (see [`crate::fleet`]).
    fleet: Option<FleetLink>,
    /// The newest fleet revision seen, applied or refused: what a change
    /// must be written over (a refused document is replaced by the next
    /// change, not raced against forever).
    fleet_seen: u64,
    /// The tables' fingerprints, and the count of switched tables they
    /// were worked out at.
    fingerprints: Option<(u64, BTreeMap<String, String>)>,
    /// The fleet's steering (see [`FleetSteer`]).
    fsteer: FleetSteer,
}

/// A change worked out and validated, not yet committed.
struct WorkedOut {
    next: Config,
    changes: Vec<StateChange>,
    touched: Vec<VipAddr>,
    before: BTreeMap<(VipAddr, IpAddr), f64>,
}

/// A reload as the audit log records it.
#[derive(Serialize)]
struct ReloadRecord<'a> {
    change: &'static str,
    file: &'a str,
}

impl Controller {
    /// A controller for `dp`, which is programmed with `config`; changes are
    /// persisted to `file` and reloads recorded in `audit`.
    pub fn new(
        dp: Dataplane,
        config: Config,
        file: Option<ConfigFile>,
        audit: Option<AuditLog>,
    ) -> (Controller, ControllerHandle) {
        let (tx, rx) = mpsc::channel(256);
        let mut steering = Steering::new();
        // Health as the data plane has it (a previous lbd's, when adopted).
        let down: HashSet<(VipAddr, IpAddr)> = config
            .vips
            .iter()
            .flat_map(|v| {
                dp.backend_states(&v.addr)
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|b| b.down)
                    .map(move |b| (v.addr, b.addr))
            })
            .collect();
        steering.reconcile(&config.vips, Instant::now(), |v, b| down.contains(&(*v, b)));
        let controller = Controller {
            host_warnings: crate::host::checks::check(&config)
                .map(|r| r.warnings)
                .unwrap_or_default(),
            dp,
            rx,
            config,
            file,
            audit,
            started: Instant::now(),
            tx: tx.clone(),
            steering,
            probes: Probes::default(),
            stats: ProbeStats::default(),
            scrape_ok: HashMap::new(),
            scrapes_behind: HashSet::new(),
            announce_due: false,
            announce: None,
            revision: 0,
            state_file: None,
            drains: BTreeMap::new(),
            fleet: None,
            fleet_seen: 0,
            fingerprints: None,
            fsteer: FleetSteer::default(),
        };
        let mut controller = controller;
        controller.note_drains();
        (
            controller,
            ControllerHandle {
                tx,
                ready: Default::default(),
            },
        )
    }

    /// Starts counting revisions at `revision`; with `state_file`, changes
    /// (and the revision) are persisted there and never to the config file
    /// (see [`crate::desired::state_file`]).
    pub fn with_revision(mut self, revision: u64, state_file: Option<StateFile>) -> Controller {
        self.revision = revision;
        self.state_file = state_file;
        self
    }

    /// Makes this controller a fleet member: changes are proposed to the
    /// fleet agent, and revisions come from it; the cache file (the
    /// `state_file` of [`Controller::with_revision`]) keeps the last one
    /// applied.
    pub fn with_fleet(mut self, fleet: FleetLink) -> Controller {
        self.fleet = Some(fleet);
        self
    }

    /// Starts following the VIPs' health with BGP announcements (call it
    /// once the data plane is attached): the receiver sees what to announce
    /// now and every change after.
    pub fn announcements(&mut self) -> watch::Receiver<Announcement> {
        let (tx, rx) = watch::channel(self.announcement());
        self.announce = Some(tx);
        rx
    }

    /// The VIP addresses to announce: those with a VIP that has a healthy
    /// backend (several VIPs may share an address: one is enough).
    fn announcement(&self) -> Announcement {
        Announcement {
            settings: self.config.bgp.clone(),
            prefixes: self
                .config
                .vips
                .iter()
                .filter(|v| self.steering.healthy_backends(v) > 0)
                .map(|v| v.addr.addr)
                .collect(),
        }
    }

    /// Hands the announcer what to announce now, if it changed.
    fn update_announcement(&mut self) {
        let now = self.announcement();
        if let Some(tx) = &self.announce {
            tx.send_if_modified(|a| {
                let changed = *a != now;
                *a = now;
                changed
            });
        }
    }

    /// The data plane, for start-up steps (attaching) before [`Controller::run`].
    pub fn dataplane_mut(&mut self) -> &mut Dataplane {
        &mut self.dp
    }

    /// Serves requests and refreshes the next-hop cache until `shutdown`
    /// completes; returns the data plane.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) -> Dataplane {
        let mut refresh = tokio::time::interval(NEXTHOP_REFRESH);
        let mut steer = tokio::time::interval(STEERING_TICK);
        steer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut sweep = tokio::time::interval(SWEEP_POLL);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        self.start_probes();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                _ = refresh.tick() => {
                    if let Err(e) = self.dp.refresh_next_hops() {
                        tracing::warn!(error = %e, "refreshing the next-hop cache failed");
                    }
                }
                _ = sweep.tick() => {
                    if let Err(e) = self.dp.poll_sweep(self.config.balancer.sweep_interval) {
                        tracing::warn!(error = %e, "counting the active flows failed");
                    }
                }
                _ = steer.tick() => self.steer_all(),
                Some(req) = self.rx.recv() => self.handle(req),
            }
        }
        self.probes = Probes::default();
        self.dp
    }

    /// Starts the checks and scrapes the config asks for, stops those it no
    /// longer does; unchanged ones keep running.
    fn start_probes(&mut self) {
        let mut checks = HashSet::new();
        let mut scrapes: HashMap<IpAddr, ScrapeTarget> = HashMap::new();
        for v in &self.config.vips {
            for b in &v.backends {
                if let Some(c) = v.health_check(b) {
                    checks.insert((b.addr, c));
                }
                // In a fleet only the steering leader scrapes.
                if let Some(t) = v.load_policy(b).and_then(|p| p.scrape)
                    && (self.fleet.is_none() || self.fsteer.leading.is_some())
                {
                    // One scrape per node: its first VIP's target.
                    scrapes.entry(b.addr).or_insert(t);
                }
            }
        }
        let vips: HashSet<VipAddr> = self.config.vips.iter().map(|v| v.addr).collect();
        self.stats.check_durations.retain(|v, _| vips.contains(v));
        let probes = &mut self.probes;
        probes.checks.retain(|k, h| {
            let keep = checks.contains(k);
            if !keep {
                h.abort();
            }
            keep
        });
        probes.scrapes.retain(|k, (t, h)| {
            let keep = scrapes.get(k) == Some(t);
            if !keep {
                h.abort();
            }
            keep
        });
        for (backend, check) in checks {
            if probes.checks.contains_key(&(backend, check.clone())) {
                continue;
            }
            let task = tokio::spawn(health_task(self.tx.clone(), backend, check.clone()));
            probes.checks.insert((backend, check), task.abort_handle());
        }
        for (node, target) in scrapes {
            if probes.scrapes.contains_key(&node) {
                continue;
            }
            let task = tokio::spawn(scrape_task(self.tx.clone(), node, target.clone()));
            probes.scrapes.insert(node, (target, task.abort_handle()));
        }
    }

    /// Keeps the drains in step with the desired state: a backend that is
    /// drained now and was not gets its drain's start; one that is no
    /// longer drained (or gone) loses it. (Backends drained when lbd
    /// starts count from then.)
    fn note_drains(&mut self) {
        let drained: HashSet<(VipAddr, IpAddr)> = self
            .config
            .vips
            .iter()
            .flat_map(|v| {
                v.backends
                    .iter()
                    .filter(|b| b.drained)
                    .map(move |b| (v.addr, b.addr))
            })
            .collect();
        self.drains.retain(|k, _| drained.contains(k));
        for k in drained {
            self.drains.entry(k).or_insert_with(|| Drain {
                since: std::time::SystemTime::now(),
                at: Instant::now(),
            });
        }
    }

    /// Applies what steering wants for every VIP (load and slow start are
    /// rate-limited inside).
    fn steer_all(&mut self) {
        // `steer` does not read the config: lend the VIPs out, no copy.
        let vips = std::mem::take(&mut self.config.vips);
        for v in &vips {
            let _ = self.steer(v, "load", false);
            if v.scheduler == Scheduler::LeastLoad {
                self.update_scores(v);
            }
            // Table positions the churn hold kept move once it allows (in
            // a fleet, when the leader's clock says so).
            if self.fleet.is_none() {
                let _cause = tracing::info_span!("change", cause = "churn hold over").entered();
                if let Err(e) = self.dp.release_held(&v.addr) {
                    tracing::error!(vip = %v.addr, error = %format!("{e:#}"), "moving held table positions failed");
                }
            }
        }
        self.config.vips = vips;
        self.announce_if_due();
        if self.fleet.is_some() {
            self.safety_net();
            self.send_health();
            self.publish_steering();
        }
    }

    /// Updates what BGP announces if a stall change asked for it.
    fn announce_if_due(&mut self) {
        if std::mem::take(&mut self.announce_due) {
            self.update_announcement();
        }
    }

    /// Writes the least-load scores of `vip` that changed.
    fn update_scores(&mut self, vip: &Vip) {
        let result = self.dp.backend_flows(&vip.addr).and_then(|flows| {
            let scores = self.steering.scores(vip, Instant::now(), flows);
            self.dp.set_scores(&vip.addr, &scores)
        });
        if let Err(e) = result {
            tracing::warn!(vip = %vip.addr, error = %format!("{e:#}"), "updating least-load scores failed");
        }
    }

    /// Applies steering's plan for `vip`, if it has one now, and its shed
    /// share; returns the plan applied.
    fn steer(&mut self, vip: &Vip, cause: &str, force: bool) -> Option<Plan> {
        // A new steering leader keeps the last leader's levels until its
        // own scrapes have come in (see the fleet module's takeover grace).
        if !force && self.in_takeover_grace() {
            return None;
        }
        let now = Instant::now();
        let before = self.steering.vip_view(&vip.addr);
        let plan = self.steering.plan(vip, now, force);
        let after = self.steering.vip_view(&vip.addr);
        self.stall_changes(vip);
        let mode = self.steer_mode();
        if after.shed != before.shed && mode == SteerMode::Own {
            match self.dp.set_vip_shed(&vip.addr, after.shed) {
                Ok(_) if after.shed > 0.0 && before.shed == 0.0 => tracing::warn!(
                    vip = %vip.addr, share = after.shed, pool_pressure = format!("{:.2}", after.pool_pressure),
                    "shedding: every backend is past its load limit; a share of new connections is dropped at their SYN (on_saturated = shed)"
                ),
                Ok(_) if after.shed == 0.0 => {
                    tracing::info!(vip = %vip.addr, "no longer shedding new connections")
                }
                Ok(_) => tracing::debug!(vip = %vip.addr, share = after.shed, "shed share changed"),
                Err(e) => {
                    tracing::error!(vip = %vip.addr, error = %format!("{e:#}"), "setting the shed share failed")
                }
            }
        }
        if after.saturated != before.saturated {
            if after.saturated {
                tracing::warn!(vip = %vip.addr, "saturated: every healthy backend is at its load limit; base weights in use");
            } else {
                tracing::info!(vip = %vip.addr, "no longer saturated");
            }
        }
        if after.all_down != before.all_down {
            if after.all_down {
                tracing::warn!(vip = %vip.addr, policy = %vip.on_all_down, "every backend is down");
            } else {
                tracing::info!(vip = %vip.addr, "a backend is up again");
            }
        }
        let plan = plan?;
        match mode {
            SteerMode::Own => {}
            SteerMode::Lead => {
                // Published for every member (this one applies it when it
                // comes back through the watch).
                self.steering.applied(&vip.addr, &plan, now);
                self.fsteer.plans.insert(vip.addr, plan.targets.clone());
                self.fsteer.due = true;
                return Some(plan);
            }
            SteerMode::Follow | SteerMode::SafetyNet => return None,
        }
        let _cause = tracing::info_span!("change", cause = %cause).entered();
        match self.dp.set_vip_targets(vip, &plan.targets) {
            Ok(()) => {
                self.steering.applied(&vip.addr, &plan, now);
                if !plan.factors.is_empty() {
                    let changes: Vec<String> = plan
                        .factors
                        .iter()
                        .map(|(b, from, to)| format!("{b} {from:.2}->{to:.2}"))
                        .collect();
                    tracing::info!(vip = %vip.addr, changes = %changes.join(", "), "weights follow load and slow start");
                }
                Some(plan)
            }
            Err(e) => {
                tracing::error!(vip = %vip.addr, error = %format!("{e:#}"), "applying new weights failed");
                None
            }
        }
    }

    /// Logs the backends of `vip` that became stalled or stopped being
    /// stalled (a health transition with cause `stalled`), and updates what
    /// BGP announces.
    fn stall_changes(&mut self, vip: &Vip) {
        let changes = self.steering.take_stall_changes(&vip.addr);
        if changes.is_empty() {
            return;
        }
        let _cause = tracing::info_span!("change", cause = "stalled").entered();
        for c in &changes {
            if c.stalled {
                tracing::warn!(
                    vip = %vip.addr, backend = %c.backend, queue = c.queue, running = c.running.unwrap_or(0.0),
                    "backend stalled: work queued or running and no progress for {:.1} s; out of the table until its counters move",
                    c.still_for.as_secs_f64()
                );
            } else {
                tracing::info!(vip = %vip.addr, backend = %c.backend, "backend no longer stalled: it makes progress again");
            }
        }
        // Announced once the VIPs are back in the config (the callers lend
        // them out while steering).
        self.announce_due = true;
    }

    /// Steers every VIP `node` is a backend of right away, after a load
    /// report from `source` that arrived at `at`: a decision due now is in
    /// the maps within milliseconds, not at the next steering tick. The
    /// time from `at` is observed when the report moved `node` in a table
    /// that no rate limit held back.
    fn react(&mut self, node: IpAddr, at: Instant, source: &'static str) {
        let vips = std::mem::take(&mut self.config.vips);
        for v in vips
            .iter()
            .filter(|v| v.backends.iter().any(|b| b.addr == node))
        {
            let now = Instant::now();
            if !self.steering.react_due(&v.addr, node, now) {
                continue;
            }
            let held = self.steering.rate_limited(&v.addr, now);
            if let Some(plan) = self.steer(v, "load", false)
                && !held
                && plan.moved.contains(&node)
            {
                self.stats
                    .reaction
                    .entry(source)
                    .or_default()
                    .observe(at.elapsed());
            }
        }
        self.config.vips = vips;
        self.announce_if_due();
        self.publish_steering();
    }

    fn handle(&mut self, req: Request) {
        match req {
            Request::Counters(reply) => {
                let _ = reply.send(self.dp.counters().map_err(|e| format!("{e:#}")));
            }
            Request::Snapshot(reply) => {
                let _ = reply.send(self.snapshot());
            }
            Request::Scrape(reply) => {
                let fleet = self.fleet_info();
                let result = Scrape::read(&self.dp, self.snapshot()).map(|s| Scrape { fleet, ..s });
                let _ = reply.send(result.map_err(|e| format!("{e:#}")));
            }
            Request::Change(req, reply) => self.change_request(*req, reply, 0),
            Request::Resubmit(pending, retries) => {
                let p = *pending;
                self.change_request(p.req, p.reply, retries)
            }
            Request::FleetRevision {
                revision,
                document,
                pending,
            } => self.fleet_revision(revision, &document, pending.map(|p| *p)),
            Request::FleetSteering(revision, doc) => {
                match serde_json::from_slice::<crate::fleet::SteeringDoc>(&doc) {
                    Ok(doc) => {
                        self.apply_view(doc);
                        self.fsteer.view_revision = revision;
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "the fleet's steering view in etcd does not parse; the tables stay as they are")
                    }
                }
            }
            Request::FleetHealth(docs) => {
                self.fsteer.health = docs;
                self.fsteer.due = true;
                self.publish_steering();
            }
            Request::FleetLeader(leads) => self.fleet_leader(leads),
            Request::FleetInfo(reply) => {
                let _ = reply.send(self.fleet_info());
            }
            Request::Health {
                backend,
                check,
                result,
                took,
            } => self.health_result(backend, &check, result, took),
            Request::Scraped { node, result, late } => self.scraped(node, *result, late),
            Request::Flows(vip, client, reply) => {
                let started = Instant::now();
                let result = (|| {
                    if !self.config.vips.iter().any(|v| v.addr == vip) {
                        return Err(ControllerError::NotFound(format!("no VIP {vip}")));
                    }
                    let dp_err = |e: DataplaneError| {
                        let mut text = e.to_string();
                        let mut source = std::error::Error::source(&e);
                        while let Some(s) = source {
                            text += &format!(": {s}");
                            source = s.source();
                        }
                        ControllerError::Dataplane(text)
                    };
                    let client = match client {
                        Some(c) if vip.port == 0 => {
                            return Err(ControllerError::Refused(format!(
                                "VIP {vip} takes every port: a client's flow cannot be looked up without its \
                                 destination port (client {c})"
                            )));
                        }
                        Some(c) => Some(self.dp.client_flow(&vip, c).map_err(dp_err)?),
                        None => None,
                    };
                    Ok(Flows {
                        vip: vip.to_string(),
                        backends: self.dp.vip_flows(&vip).map_err(dp_err)?,
                        client,
                        read_ms: started.elapsed().as_secs_f64() * 1000.0,
                    })
                })();
                let _ = reply.send(result);
            }
            Request::Push(_, None, _, reply) => {
                *self.stats.reports.entry(("push", "invalid")).or_default() += 1;
                let _ = reply.send(Ok(()));
            }
            Request::Push(node, Some(report), body, reply) => {
                let result = if !self.steering.knows(node) {
                    Err((
                        "unknown_backend",
                        ControllerError::NotFound(format!("{node} is no backend of any VIP")),
                    ))
                } else if !self.config.vips.iter().any(|v| {
                    v.backends
                        .iter()
                        .any(|b| b.addr == node && v.load_policy(b).is_some())
                }) {
                    Err((
                        "no_policy",
                        ControllerError::Refused(format!(
                            "no VIP of backend {node} follows load: give the VIP a [vip.load] table"
                        )),
                    ))
                } else {
                    Ok(())
                };
                // A fleet member that follows forwards it to the leader.
                let forward = match (&self.fleet, body) {
                    (Some(f), Some(body))
                        if result.is_ok() && self.steer_mode() == SteerMode::Follow =>
                    {
                        f.proposals
                            .try_send(crate::fleet::agent::ToAgent::Load(node, body))
                            .is_ok()
                    }
                    _ => false,
                };
                let outcome = result.as_ref().map_or_else(
                    |(o, _)| *o,
                    |()| if forward { "forwarded" } else { "accepted" },
                );
                *self.stats.reports.entry(("push", outcome)).or_default() += 1;
                if result.is_ok() && !forward {
                    let at = report.at;
                    if self.steering.load_report(node, *report) {
                        self.react(node, at, "push");
                    }
                }
                let _ = reply.send(result.map_err(|(_, e)| e));
            }
            Request::Reload(reload, caller, reply) => {
                let (file, config) = *reload;
                let _cause = tracing::info_span!("change", cause = ?caller).entered();
                let record = ReloadRecord {
                    change: "reload_config",
                    file: &file.path().display().to_string(),
                };
                let pending = match self
                    .audit
                    .as_ref()
                    .map(|a| a.request(&caller, Some(Role::Admin), &record))
                {
                    Some(Err(e)) => {
                        let _ = reply.send(Err(ControllerError::Refused(e.to_string())));
                        return;
                    }
                    Some(Ok(p)) => Some(p),
                    None => None,
                };
                let mut config = config;
                if self.fleet.is_some() {
                    // The fleet holds the VIPs; the config file's only
                    // seeded an empty fleet.
                    if !diff::diff(&self.config.vips, &config.vips).is_empty() {
                        tracing::warn!(
                            "the reloaded config file's [[vip]] tables differ from the fleet's desired state; \
                             the fleet's VIPs stay ([fleet]: change VIPs through the API of any member, or lbctl fleet import)"
                        );
                    }
                    config.vips = self.config.vips.clone();
                } else if let Some(state) = &self.state_file {
                    // The state file holds the VIPs; the config file's are
                    // only its seed.
                    if !diff::diff(&self.config.vips, &config.vips).is_empty() {
                        tracing::warn!(
                            state_file = %state.path().display(),
                            "the reloaded config file's [[vip]] tables differ from the state file's; \
                             the state file's VIPs stay (api.state_file: change VIPs through the API)"
                        );
                    }
                    config.vips = self.config.vips.clone();
                }
                let problems = config::reload_problems(&self.config, &config);
                let result = if problems.is_empty() {
                    self.dp
                        .set_settings(&config.balancer)
                        .map_err(|e| ControllerError::Dataplane(format!("{e:#}")))
                        .and_then(|()| self.commit(config, false))
                } else {
                    Err(ControllerError::Rejected(ChangeError::Invalid { problems }))
                };
                if result.is_ok() {
                    self.file = Some(file);
                }
                if let (Some(audit), Some(p)) = (&self.audit, pending) {
                    audit.outcome(p, &outcome(&result));
                }
                let _ = reply.send(result);
            }
        }
    }

    fn snapshot(&self) -> Snapshot {
        let mut snap = Snapshot::read(&self.dp, &self.config, self.started.elapsed());
        for v in &self.config.vips {
            snap.steering.insert(
                v.addr,
                SteeringView {
                    vip: self.steering.vip_view(&v.addr),
                    backends: v
                        .backends
                        .iter()
                        .filter_map(|b| Some((b.addr, self.steering.backend_view(v, b.addr)?)))
                        .collect(),
                },
            );
        }
        snap.probes = self.stats.clone();
        snap.serving = self.announcement().prefixes;
        snap.revision = self.revision;
        snap.drains = self.drains.clone();
        for (source, n) in self.steering.stale_reports() {
            snap.probes.reports.insert((source.name(), "stale"), *n);
        }
        snap
    }

    fn scraped(&mut self, node: IpAddr, result: Result<LoadReport, ScrapeError>, late: bool) {
        if late {
            self.stats.scrapes_late += 1;
            if self.scrapes_behind.insert(node) {
                tracing::warn!(
                    %node,
                    "load scrapes fall behind their interval: a scrape started more than half an interval late (scrapes, or lbd, take longer than scrape_interval: raise it); counted in lb_load_scrapes_late_total"
                );
            }
        } else if self.scrapes_behind.remove(&node) {
            tracing::info!(%node, "load scrapes keep their interval again");
        }
        let ok = result.is_ok();
        let outcome = match &result {
            Ok(_) => "accepted",
            Err(e) => e.outcome(),
        };
        *self.stats.reports.entry(("scrape", outcome)).or_default() += 1;
        let was_ok = self.scrape_ok.insert(node, ok);
        match result {
            Ok(report) => {
                if was_ok == Some(false) {
                    tracing::info!(%node, "load scrapes work again");
                }
                let at = report.at;
                if self.steering.load_report(node, report) {
                    self.react(node, at, "scrape");
                }
            }
            Err(e) if was_ok != Some(false) => tracing::warn!(
                %node, outcome, error = e.message(),
                "load scrape failed; the node's last report ages out (logged again when scrapes work)"
            ),
            Err(e) => tracing::debug!(%node, outcome, error = e.message(), "load scrape failed"),
        }
    }

    fn health_result(
        &mut self,
        backend: IpAddr,
        check: &HealthCheck,
        result: Result<(), String>,
        took: Duration,
    ) {
        if result.is_ok() {
            self.stats.checks_ok += 1;
        } else {
            self.stats.checks_failed += 1;
        }
        let error = result.as_ref().err().cloned();
        let vips: Vec<Vip> = self
            .config
            .vips
            .iter()
            .filter(|v| {
                v.backends
                    .iter()
                    .any(|b| b.addr == backend && v.health_check(b).as_ref() == Some(check))
            })
            .cloned()
            .collect();
        let now = Instant::now();
        let mut changed = false;
        for v in &vips {
            self.stats
                .check_durations
                .entry(v.addr)
                .or_default()
                .observe(took);
            let Some(up) = self.steering.health_result(v, backend, result.clone(), now) else {
                continue;
            };
            changed = true;
            {
                let _cause = tracing::info_span!("change", cause = "health check").entered();
                if up {
                    tracing::info!(vip = %v.addr, %backend, "backend up: {} checks passed in a row", check.rise);
                } else {
                    tracing::info!(
                        vip = %v.addr, %backend, error = error.as_deref().unwrap_or(""),
                        "backend down: {} checks failed in a row", check.fall
                    );
                }
            }
            let _ = self.steer(v, "health check", false);
        }
        // Only a backend going up or down can change what is announced.
        if changed || self.announce_due {
            self.announce_due = false;
            self.update_announcement();
        }
        if changed && self.fleet.is_some() {
            self.send_health();
            self.publish_steering();
        }
    }

    /// Answers a change request: made here, or (a fleet member's change)
    /// proposed to the fleet agent, which answers once it is written and
    /// applied.
    fn change_request(
        &mut self,
        req: ChangeRequest,
        reply: oneshot::Sender<Result<ChangeOutcome, ControllerError>>,
        retries: u32,
    ) {
        let _cause = tracing::info_span!("change", cause = ?req.caller).entered();
        if let Some(fleet) = &self.fleet
            && !req.dry_run
        {
            let worked = self
                .work_out(&req)
                .and_then(|w| w.map(|w| self.host_check(&w.next).map(|_| w)).transpose())
                .map(|w| {
                    // The fleet's newest revision is one this member
                    // refused: a change that changes nothing here still
                    // replaces it (how `lbctl fleet import` repairs it).
                    w.or_else(|| {
                        (self.fleet_seen > self.revision).then(|| WorkedOut {
                            next: self.config.clone(),
                            changes: Vec::new(),
                            touched: Vec::new(),
                            before: BTreeMap::new(),
                        })
                    })
                });
            match worked {
                Err(e) => {
                    tracing::info!(error = %e, "change refused");
                    let _ = reply.send(Err(e));
                }
                Ok(None) => {
                    tracing::debug!(change = ?change_summary(&req.change), "nothing to change");
                    let _ = reply.send(Ok(ChangeOutcome {
                        revision: self.revision,
                        ..ChangeOutcome::default()
                    }));
                }
                Ok(Some(w)) => {
                    let proposal = crate::fleet::agent::Proposal {
                        base: self.revision.max(self.fleet_seen),
                        document: crate::fleet::encode(
                            self.config.balancer.table_size,
                            &w.next.vips,
                        ),
                        if_match: req.if_match.is_some(),
                        retries,
                        pending: PendingChange {
                            req,
                            reply,
                            changes: w.changes,
                            touched: w.touched,
                            before: w.before,
                        },
                    };
                    if let Err(e) = fleet
                        .proposals
                        .try_send(crate::fleet::agent::ToAgent::Propose(Box::new(proposal)))
                        && let crate::fleet::agent::ToAgent::Propose(p) = e.into_inner()
                    {
                        p.pending.fail(ControllerError::Unavailable(
                            "the fleet agent has too many changes queued (or stopped); try again"
                                .into(),
                        ));
                    }
                }
            }
            return;
        }
        let result = self.change(&req);
        match &result {
            Err(e) => tracing::info!(error = %e, "change refused"),
            Ok(o) if o.dry_run => {
                tracing::debug!(change = ?change_summary(&req.change), "dry run")
            }
            Ok(o) if o.changes.is_empty() => {
                tracing::debug!(change = ?change_summary(&req.change), "nothing to change")
            }
            Ok(o) => tracing::info!(
                change = ?change_summary(&req.change), revision = o.revision,
                tables = o.tables_flipped, "change applied"
            ),
        }
        let _ = reply.send(result);
    }

    /// The precondition, then the change made to a copy of the desired
    /// state and validated whole; `None` when it changes nothing.
    fn work_out(&self, req: &ChangeRequest) -> Result<Option<WorkedOut>, ControllerError> {
        if let Some(given) = req.if_match
            && given != self.revision
        {
            return Err(ControllerError::PreconditionFailed {
                given,
                current: self.revision,
            });
        }
        let next = req.change.apply_to(&self.config)?;
        let changes = diff::diff(&self.config.vips, &next.vips);
        if changes.is_empty() {
            return Ok(None);
        }
        let touched: Vec<VipAddr> = {
            let mut t: Vec<VipAddr> = changes.iter().map(StateChange::vip).collect();
            t.dedup();
            t
        };
        let before = self.table_shares(&touched);
        Ok(Some(WorkedOut {
            next,
            changes,
            touched,
            before,
        }))
    }

    /// Handles a change request: [`Controller::work_out`], then (unless a
    /// dry run, or nothing changes) committed in one step.
    fn change(&mut self, req: &ChangeRequest) -> Result<ChangeOutcome, ControllerError> {
        let started = Instant::now();
        let worked = self.work_out(req)?;
        let validated = started.elapsed();
        let mut outcome = ChangeOutcome {
            revision: self.revision,
            dry_run: req.dry_run,
            ..ChangeOutcome::default()
        };
        let Some(WorkedOut {
            next,
            changes,
            touched,
            before,
        }) = worked
        else {
            return Ok(outcome);
        };
        if req.dry_run {
            self.host_check(&next)?;
            let after = self.preview_shares(&next, &touched);
            outcome.shares = share_moves(&before, &after);
            outcome.changes = changes;
            return Ok(outcome);
        }
        let flips_before = self.dp.tables_switched();
        let revision = self.revision + 1;
        self.commit_changes(next, true, changes.clone(), revision)?;
        outcome.tables_flipped = self.dp.tables_switched() - flips_before;
        tracing::debug!(
            validate_ms = validated.as_secs_f64() * 1000.0,
            total_ms = started.elapsed().as_secs_f64() * 1000.0,
            "change committed"
        );
        outcome.shares = share_moves(&before, &self.table_shares(&touched));
        outcome.revision = self.revision;
        outcome.changes = changes;
        Ok(outcome)
    }

    /// Each backend's share of its VIP's table, for the VIPs `vips`, as
    /// programmed.
    fn table_shares(&self, vips: &[VipAddr]) -> BTreeMap<(VipAddr, IpAddr), f64> {
        vips.iter()
            .flat_map(|v| {
                self.dp
                    .backend_states(v)
                    .unwrap_or_default()
                    .into_iter()
                    .map(move |b| ((*v, b.addr), b.table_share))
            })
            .collect()
    }

    /// What [`Controller::table_shares`] would be with `next`, for a dry
    /// run: the weights steering would give (health and load as they are
    /// now), tables built and written nowhere.
    fn preview_shares(&self, next: &Config, vips: &[VipAddr]) -> BTreeMap<(VipAddr, IpAddr), f64> {
        let now = Instant::now();
        let mut steering = self.steering.clone();
        steering.reconcile(&next.vips, now, |_, _| false);
        let mut out = BTreeMap::new();
        for v in next.vips.iter().filter(|v| vips.contains(&v.addr)) {
            let targets = steering
                .plan(v, now, true)
                .map(|p| p.targets)
                .unwrap_or_default();
            for (b, share) in self.dp.preview_shares(v, &targets) {
                out.insert((v.addr, b), share);
            }
        }
        out
    }

    /// The host checks of a desired state: its problems refuse it, its
    /// warnings are returned.
    fn host_check(&self, next: &Config) -> Result<Vec<String>, ControllerError> {
        match crate::host::checks::check(next) {
            Ok(report) if !report.problems.is_empty() => {
                Err(ControllerError::Rejected(ChangeError::Invalid {
                    problems: report.problems,
                }))
            }
            Ok(report) => Ok(report.warnings),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the host's addresses and routes: VIPs and backends not checked against them");
                Ok(Vec::new())
            }
        }
    }

    /// Persists `vips` at `revision` where changes go: the state file, or
    /// the config file.
    fn persist(&mut self, revision: u64, vips: &[Vip]) -> Result<(), ControllerError> {
        if let Some(state) = &self.state_file {
            return state
                .save(revision, vips)
                .map_err(|e| ControllerError::Persist {
                    path: state.path().display().to_string(),
                    message: e.to_string(),
                });
        }
        let Some(file) = &mut self.file else {
            return Ok(());
        };
        file.save_vips(vips).map_err(|e| match e {
            SaveError::ChangedOnDisk(_) => ControllerError::ConfigChanged(e.to_string()),
            SaveError::Io { file, source } => ControllerError::Persist {
                path: file,
                message: source.to_string(),
            },
        })
    }

    /// Makes `next` the desired state: persisted first (if `persist`), then
    /// programmed; a failure to program puts the file back. The revision
    /// grows by one when the VIPs change.
    fn commit(&mut self, next: Config, persist: bool) -> Result<(), ControllerError> {
        let changes = diff::diff(&self.config.vips, &next.vips);
        let revision = self.revision + u64::from(!changes.is_empty());
        self.commit_changes(next, persist, changes, revision)
    }

    /// [`Controller::commit`] with the changes from the current state to
    /// `next` worked out already, and the revision it becomes.
    fn commit_changes(
        &mut self,
        next: Config,
        persist: bool,
        changes: Vec<StateChange>,
        revision: u64,
    ) -> Result<(), ControllerError> {
        let t0 = Instant::now();
        let warnings = self.host_check(&next)?;
        let persist = persist && revision != self.revision;
        let t1 = Instant::now();
        if persist {
            self.persist(revision, &next.vips)?;
        }
        let t2 = Instant::now();
        let programmed = self.program(&next.vips);
        tracing::debug!(
            check_ms = (t1 - t0).as_secs_f64() * 1000.0,
            persist_ms = (t2 - t1).as_secs_f64() * 1000.0,
            program_ms = t2.elapsed().as_secs_f64() * 1000.0,
            "commit phases"
        );
        if let Err(e) = programmed {
            if persist {
                let old = self.config.vips.clone();
                if let Err(undo) = self.persist(self.revision, &old) {
                    tracing::error!(error = %undo, "putting the persisted state back failed");
                }
            }
            // Bring the data plane back to the previous desired state.
            let old = self.config.vips.clone();
            if let Err(again) = self.program(&old) {
                tracing::error!(error = %format!("{again:#}"), "restoring the data plane failed");
            }
            return Err(ControllerError::Dataplane(format!("{e:#}")));
        }
        for change in changes {
            change.log();
        }
        self.revision = revision;
        for w in warnings.iter().filter(|w| !self.host_warnings.contains(w)) {
            tracing::warn!("{w}");
        }
        self.host_warnings = warnings;
        self.config = next;
        self.note_drains();
        self.start_probes();
        self.update_announcement();
        Ok(())
    }

    /// Programs `vips` with the weights steering wants for them (in a
    /// fleet: the fleet's steering view; the leader works out and
    /// publishes the view for the new VIPs).
    fn program(&mut self, vips: &[Vip]) -> Result<(), DataplaneError> {
        let now = Instant::now();
        self.steering.reconcile(vips, now, |_, _| false);
        if self.fleet.is_some() {
            if self.steer_mode() == SteerMode::Lead {
                for v in vips {
                    if let Some(p) = self.steering.plan(v, now, true) {
                        self.steering.applied(&v.addr, &p, now);
                        self.fsteer.plans.insert(v.addr, p.targets);
                    }
                }
                self.fsteer.due = true;
            }
            let targets = vips
                .iter()
                .map(|v| (v.addr, self.view_targets(v)))
                .collect();
            self.dp.sync_targets(vips, &targets)?;
            for v in vips {
                self.dp.set_vip_shed(&v.addr, self.view_shed(&v.addr))?;
            }
            self.steering.forget_scores();
            return Ok(());
        }
        let plans: BTreeMap<VipAddr, Plan> = vips
            .iter()
            .filter_map(|v| Some((v.addr, self.steering.plan(v, now, true)?)))
            .collect();
        let targets = plans.iter().map(|(a, p)| (*a, p.targets.clone())).collect();
        self.dp.sync_targets(vips, &targets)?;
        for (a, p) in &plans {
            self.steering.applied(a, p, now);
        }
        for v in vips {
            self.dp
                .set_vip_shed(&v.addr, self.steering.vip_view(&v.addr).shed)?;
        }
        // New backends start with score 0 in the data plane: write all anew.
        self.steering.forget_scores();
        Ok(())
    }
}

/// Checks `backend` every `check.interval` and sends the results, until
/// aborted or the controller stops. Checks of different backends start
/// spread over the interval.
async fn health_task(tx: mpsc::Sender<Request>, backend: IpAddr, check: HealthCheck) {
    tokio::time::sleep(spread(&(backend, &check), check.interval)).await;
    let mut tick = tokio::time::interval(check.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut checker = probe::Checker::new(backend, &check);
    loop {
        tick.tick().await;
        let started = Instant::now();
        let result = checker.run().await;
        let sent = tx
            .send(Request::Health {
                backend,
                check: Box::new(check.clone()),
                result,
                took: started.elapsed(),
            })
            .await;
        if sent.is_err() {
            return;
        }
    }
}

/// Scrapes `node`'s load every `target.interval` and sends the results.
async fn scrape_task(tx: mpsc::Sender<Request>, node: IpAddr, target: ScrapeTarget) {
    tokio::time::sleep(spread(&node, target.interval)).await;
    let mut tick = tokio::time::interval(target.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut scraper = probe::Scraper::new(node, &target);
    let mut last: Option<Instant> = None;
    loop {
        tick.tick().await;
        let started = Instant::now();
        // Behind: this scrape starts half an interval or more after it was
        // due (the one before, its hand-over to the controller, or the
        // runtime took longer than the interval).
        let late = last.is_some_and(|l| started - l > target.interval.mul_f64(1.5));
        last = Some(started);
        let result = Box::new(scraper.scrape().await);
        if tx
            .send(Request::Scraped { node, result, late })
            .await
            .is_err()
        {
            return;
        }
    }
}

/// A fixed offset within `interval` for `key`, so that many probes do not
/// all fire at once.
fn spread(key: &impl std::hash::Hash, interval: Duration) -> Duration {
    use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
    let h = BuildHasherDefault::<DefaultHasher>::default().hash_one(key);
    interval.mul_f64((h % 1000) as f64 / 1000.0)
}

/// An outcome as the audit log records it.
fn outcome(result: &Result<(), ControllerError>) -> String {
    match result {
        Ok(()) => "applied".to_string(),
        Err(e) => format!("refused: {e}"),
    }
}

/// The backends whose share moves from `before` to `after` (a backend
/// missing on one side has 0 there).
fn share_moves(
    before: &BTreeMap<(VipAddr, IpAddr), f64>,
    after: &BTreeMap<(VipAddr, IpAddr), f64>,
) -> Vec<ShareMove> {
    let keys: std::collections::BTreeSet<&(VipAddr, IpAddr)> =
        before.keys().chain(after.keys()).collect();
    keys.into_iter()
        .filter_map(|k| {
            let from = before.get(k).copied().unwrap_or(0.0);
            let to = after.get(k).copied().unwrap_or(0.0);
            (from != to).then(|| ShareMove {
                vip: k.0.to_string(),
                backend: k.1,
                from,
                to,
            })
        })
        .collect()
}

fn change_summary(change: &Change) -> String {
    serde_json::to_string(change).unwrap_or_default()
}
