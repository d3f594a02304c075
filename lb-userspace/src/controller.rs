//! The single owner of the balancer's state. It holds the desired config
//! and the [`Dataplane`]; every other task (the API, the metrics endpoint,
//! the SIGHUP reload; later health checks and load feedback) talks to it
//! through a [`ControllerHandle`], so changes are applied one at a time and
//! never interleave, and no lock is held across an await.
//!
//! A change is made to a copy of the desired config and validated as a
//! whole, persisted to the config file (atomically), and only then
//! programmed into the data plane; if programming fails the file is put
//! back. Every change request is recorded in the audit log.

use std::{
    collections::BTreeMap,
    future::Future,
    path::PathBuf,
    time::{Duration, Instant},
};

use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use crate::{
    audit::AuditLog,
    change::{Change, ChangeError},
    config::{self, Config},
    dataplane::{BackendState, Counters, Dataplane, DataplaneError, MapUsage},
    diff,
    vip::VipAddr,
};

/// How often the data plane's cached next hops are looked up again, and so
/// the longest a neighbour change takes to reach the data plane.
pub const NEXTHOP_REFRESH: Duration = Duration::from_secs(1);

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
        }
    }
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
    #[error("{0}")]
    Dataplane(String),
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
        })
    }
}

enum Request {
    Counters(oneshot::Sender<Result<Counters, String>>),
    Scrape(oneshot::Sender<Result<Scrape, String>>),
    Snapshot(oneshot::Sender<Snapshot>),
    Change(Change, String, oneshot::Sender<Result<(), ControllerError>>),
    Apply(
        Box<Config>,
        String,
        oneshot::Sender<Result<(), ControllerError>>,
    ),
}

/// A cheap, cloneable way to ask the controller for things.
#[derive(Clone)]
pub struct ControllerHandle {
    tx: mpsc::Sender<Request>,
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
        self.ask(|tx| Request::Change(change, caller.to_string(), tx))
            .await?
    }

    /// Applies a whole new config as a diff (SIGHUP): settings that can
    /// change, then the VIPs. It becomes the desired state.
    pub async fn apply(&self, config: Config, caller: &str) -> Result<(), ControllerError> {
        self.ask(|tx| Request::Apply(Box::new(config), caller.to_string(), tx))
            .await?
    }
}

/// The owner of the desired state and the data plane.
pub struct Controller {
    dp: Dataplane,
    rx: mpsc::Receiver<Request>,
    config: Config,
    /// Where changes are persisted (the config file), if anywhere.
    config_path: Option<PathBuf>,
    audit: Option<AuditLog>,
    started: Instant,
}

#[derive(Serialize)]
struct Reload<'a> {
    change: &'a str,
}

impl Controller {
    /// A controller for `dp`, which is programmed with `config`; changes are
    /// persisted to `config_path` and recorded in `audit`.
    pub fn new(
        dp: Dataplane,
        config: Config,
        config_path: Option<PathBuf>,
        audit: Option<AuditLog>,
    ) -> (Controller, ControllerHandle) {
        let (tx, rx) = mpsc::channel(64);
        let controller = Controller {
            dp,
            rx,
            config,
            config_path,
            audit,
            started: Instant::now(),
        };
        (controller, ControllerHandle { tx })
    }

    /// The data plane, for start-up steps (attaching) before [`Controller::run`].
    pub fn dataplane_mut(&mut self) -> &mut Dataplane {
        &mut self.dp
    }

    /// Serves requests and refreshes the next-hop cache until `shutdown`
    /// completes; returns the data plane.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) -> Dataplane {
        let mut refresh = tokio::time::interval(NEXTHOP_REFRESH);
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                _ = refresh.tick() => {
                    if let Err(e) = self.dp.refresh_next_hops() {
                        tracing::warn!(error = %e, "refreshing the next-hop cache failed");
                    }
                }
                Some(req) = self.rx.recv() => self.handle(req),
            }
        }
        self.dp
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
                let result = Scrape::read(&self.dp, self.snapshot());
                let _ = reply.send(result.map_err(|e| format!("{e:#}")));
            }
            Request::Change(change, caller, reply) => {
                let _cause = tracing::info_span!("change", cause = ?caller).entered();
                let result = change
                    .apply_to(&self.config)
                    .map_err(ControllerError::from)
                    .and_then(|next| self.commit(next, true));
                self.audit(&caller, &change, &result);
                if let Err(e) = &result {
                    tracing::info!(error = %e, "change refused");
                } else {
                    tracing::info!(change = ?change_summary(&change), "change applied");
                }
                let _ = reply.send(result);
            }
            Request::Apply(config, caller, reply) => {
                let _cause = tracing::info_span!("change", cause = ?caller).entered();
                let result = self
                    .dp
                    .set_settings(&config.balancer)
                    .map_err(|e| ControllerError::Dataplane(format!("{e:#}")))
                    .and_then(|()| self.commit(*config, false));
                self.audit(
                    &caller,
                    &Reload {
                        change: "reload_config",
                    },
                    &result,
                );
                let _ = reply.send(result);
            }
        }
    }

    fn snapshot(&self) -> Snapshot {
        Snapshot::read(&self.dp, &self.config, self.started.elapsed())
    }

    /// Makes `next` the desired state: persisted first (if `persist`), then
    /// programmed; a failure to program puts the file back.
    fn commit(&mut self, next: Config, persist: bool) -> Result<(), ControllerError> {
        let path = self.config_path.clone().filter(|_| persist);
        if let Some(path) = &path {
            config::save_vips(path, &next.vips).map_err(|e| ControllerError::Persist {
                path: path.display().to_string(),
                message: e.to_string(),
            })?;
        }
        if let Err(e) = self.dp.sync(&next.vips) {
            if let Some(path) = &path
                && let Err(undo) = config::save_vips(path, &self.config.vips)
            {
                tracing::error!(path = %path.display(), error = %undo, "putting the config file back failed");
            }
            // Bring the data plane back to the previous desired state.
            if let Err(again) = self.dp.sync(&self.config.vips) {
                tracing::error!(error = %format!("{again:#}"), "restoring the data plane failed");
            }
            return Err(ControllerError::Dataplane(format!("{e:#}")));
        }
        for change in diff::diff(&self.config.vips, &next.vips) {
            change.log();
        }
        self.config = next;
        Ok(())
    }

    fn audit<T: Serialize>(
        &mut self,
        caller: &str,
        request: &T,
        result: &Result<(), ControllerError>,
    ) {
        let outcome = match result {
            Ok(()) => "applied".to_string(),
            Err(e) => format!("refused: {e}"),
        };
        if let Some(log) = &mut self.audit
            && let Err(e) = log.record(caller, request, &outcome)
        {
            tracing::error!(error = %e, "writing the audit log failed");
        }
    }
}

fn change_summary(change: &Change) -> String {
    serde_json::to_string(change).unwrap_or_default()
}
