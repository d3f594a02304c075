//! The single owner of the balancer's state. It holds the [`Dataplane`];
//! every other task (the metrics endpoint today; the API, health checks and
//! load feedback later) talks to it through a [`ControllerHandle`], so
//! changes never interleave and no lock is held across an await.

use std::{future::Future, time::Duration};

use tokio::sync::{mpsc, oneshot};

use crate::{
    config::Config,
    dataplane::{Counters, Dataplane},
};

/// How often the data plane's cached next hops are looked up again, and so
/// the longest a neighbour change takes to reach the data plane.
pub const NEXTHOP_REFRESH: Duration = Duration::from_secs(1);

enum Request {
    Counters(oneshot::Sender<Result<Counters, String>>),
    Apply(Box<Config>, oneshot::Sender<Result<(), String>>),
}

/// A cheap, cloneable way to ask the controller for things.
#[derive(Clone)]
pub struct ControllerHandle {
    tx: mpsc::Sender<Request>,
}

/// Why a request to the controller failed.
#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error("the controller has stopped")]
    Stopped,
    #[error("{0}")]
    Dataplane(String),
}

impl ControllerHandle {
    /// A snapshot of the data plane's counters.
    pub async fn counters(&self) -> Result<Counters, ControllerError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Request::Counters(tx))
            .await
            .map_err(|_| ControllerError::Stopped)?;
        rx.await
            .map_err(|_| ControllerError::Stopped)?
            .map_err(ControllerError::Dataplane)
    }
}

impl ControllerHandle {
    /// Applies a new config as a diff: settings that can change, then the
    /// VIPs (removed, added, changed). Capacity is checked before anything
    /// changes.
    pub async fn apply(&self, config: Config) -> Result<(), ControllerError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Request::Apply(Box::new(config), tx))
            .await
            .map_err(|_| ControllerError::Stopped)?;
        rx.await
            .map_err(|_| ControllerError::Stopped)?
            .map_err(ControllerError::Dataplane)
    }
}

/// The owner of the data plane.
pub struct Controller {
    dp: Dataplane,
    rx: mpsc::Receiver<Request>,
}

impl Controller {
    /// A controller for `dp` and the handle to reach it.
    pub fn new(dp: Dataplane) -> (Controller, ControllerHandle) {
        let (tx, rx) = mpsc::channel(64);
        (Controller { dp, rx }, ControllerHandle { tx })
    }

    /// The data plane, for start-up steps (attaching) before [`Controller::run`].
    pub fn dataplane_mut(&mut self) -> &mut Dataplane {
        &mut self.dp
    }

    /// Serves requests and refreshes the next-hop cache until `shutdown`
    /// completes; returns the data plane (to detach it).
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
            Request::Apply(config, reply) => {
                let result = self
                    .dp
                    .set_settings(&config.balancer)
                    .and_then(|()| self.dp.sync(&config.vips))
                    .map_err(|e| format!("{e:#}"));
                let _ = reply.send(result);
            }
        }
    }
}
