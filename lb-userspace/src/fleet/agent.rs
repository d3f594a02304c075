//! The fleet agent: the one task that talks to etcd.
//!
//! It holds a session with etcd (a lease, a watch on the desired state),
//! hands every new revision to the controller, writes the changes the
//! controller proposes as compare-and-swap transactions, and publishes
//! this member's status. When etcd cannot be reached it says so (in
//! [`LinkState`], the log and the metrics), refuses changes with an error
//! that says why, and tries again every [`RETRY`]; the controller goes on
//! with what it applied last.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, EventType, Identity, PutOptions,
    TlsOptions, Txn, TxnOp, TxnOpResponse, WatchOptions,
};
use tokio::sync::mpsc;

use super::{FleetSettings, LinkState, MemberStatus, SharedLink, unix_ms};
use crate::control::controller::{ControllerError, ControllerHandle, PendingChange};

/// How long one request to etcd may take before the member counts etcd as
/// unreachable.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// How long to wait before a new session after one failed (with the next
/// etcd member): short, so that a change waiting through an etcd election
/// goes through soon after it.
pub const RETRY: Duration = Duration::from_millis(300);
/// How often the member looks at its own status (applied revision, table
/// fingerprints) and writes it when it changed.
const STATUS_POLL: Duration = Duration::from_millis(200);
/// How often a change that lost a compare-and-swap race is worked out
/// again on the newer revision before it is refused.
pub const MAX_RETRIES: u32 = 5;
/// How long a change that arrives while etcd is out of reach waits for a
/// new session (etcd electing a leader, the next member) before it is
/// refused.
pub const CHANGE_PATIENCE: Duration = Duration::from_secs(5);

/// What the controller hands the agent.
pub enum ToAgent {
    /// A change to write.
    Propose(Box<Proposal>),
    /// The steering view to publish (JSON [`super::SteeringDoc`]), written
    /// only while this member leads.
    Steering(String),
    /// This member's health verdicts (JSON [`super::HealthDoc`]).
    Health(String),
    /// A load report pushed to this member (as it came), for the leader.
    Load(std::net::IpAddr, Vec<u8>),
}

/// A change the controller worked out and validated, to be written.
pub struct Proposal {
    /// The revision it was worked out on: written only if the document's
    /// `mod_revision` still is this.
    pub base: u64,
    /// The new document ([`super::encode`]).
    pub document: String,
    /// Whether the caller gave `If-Match` (a lost race is then its 412,
    /// not a retry).
    pub if_match: bool,
    /// How often it was worked out again already.
    pub retries: u32,
    /// The caller's change, handed back to the controller.
    pub pending: PendingChange,
}

/// Connects to one of the fleet's etcd members, `endpoint` (TLS and
/// authentication as configured). The connection itself is lazy; the
/// first request tells whether the member answers, except with a user,
/// whose token is fetched here.
///
/// One member at a time, not a client balanced over all of them: such a
/// client keeps sending some requests to a member that died, and every
/// one of those fails. A session that fails moves on to the next member
/// instead ([`Agent::run`]), and a read at start-up or for a status tries
/// them in turn.
pub async fn connect(settings: &FleetSettings, endpoint: &str) -> Result<Client> {
    let mut options = ConnectOptions::new()
        .with_connect_timeout(REQUEST_TIMEOUT)
        .with_keep_alive(Duration::from_secs(1), REQUEST_TIMEOUT)
        .with_keep_alive_while_idle(true)
        // A member that lost its quorum answers with an error (and the
        // session moves on) instead of leaving watches silent.
        .with_require_leader(true);
    if settings.ca_file.is_some() || settings.client_cert.is_some() {
        let mut tls = TlsOptions::new();
        if let Some(ca) = &settings.ca_file {
            let pem = std::fs::read(ca)
                .with_context(|| format!("reading fleet.ca_file {}", ca.display()))?;
            tls = tls.ca_certificate(Certificate::from_pem(pem));
        }
        if let Some((cert, key)) = &settings.client_cert {
            let c = std::fs::read(cert)
                .with_context(|| format!("reading fleet.cert_file {}", cert.display()))?;
            let k = std::fs::read(key)
                .with_context(|| format!("reading fleet.key_file {}", key.display()))?;
            tls = tls.identity(Identity::from_pem(c, k));
        }
        options = options.with_tls(tls);
    }
    if let Some((user, file)) = &settings.user {
        let password = std::fs::read_to_string(file)
            .with_context(|| format!("reading fleet.password_file {}", file.display()))?;
        options = options.with_user(user.clone(), password.trim_end_matches(['\n', '\r']));
    }
    tokio::time::timeout(REQUEST_TIMEOUT, Client::connect([endpoint], Some(options)))
        .await
        .map_err(|_| anyhow!("etcd at {endpoint} did not answer within {REQUEST_TIMEOUT:?}"))?
        .with_context(|| format!("connecting to etcd at {endpoint}"))
}

/// `f` within [`REQUEST_TIMEOUT`].
async fn timed<T>(
    what: &str,
    f: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T> {
    match tokio::time::timeout(REQUEST_TIMEOUT, f).await {
        Ok(r) => r.with_context(|| what.to_string()),
        Err(_) => bail!("{what}: etcd did not answer within {REQUEST_TIMEOUT:?}"),
    }
}

/// The fleet's document and its revision at start-up, and whether this
/// member wrote it: read from etcd, or (no document yet) written from
/// `seed` with a create-only transaction. An error when etcd does not
/// answer (the caller falls back to its cache file).
pub async fn initial(settings: &FleetSettings, seed: &str) -> Result<(u64, Vec<u8>, bool)> {
    let mut last = anyhow!("no etcd endpoint");
    for e in &settings.endpoints {
        match connect(settings, e).await {
            Ok(mut client) => match initial_from(&mut client, settings, seed).await {
                Ok(v) => return Ok(v),
                Err(err) => last = err.context(format!("etcd at {e}")),
            },
            Err(err) => last = err,
        }
    }
    Err(last)
}

async fn initial_from(
    client: &mut Client,
    settings: &FleetSettings,
    seed: &str,
) -> Result<(u64, Vec<u8>, bool)> {
    let key = settings.desired_key();
    let txn = Txn::new()
        .when(vec![Compare::create_revision(
            key.as_str(),
            CompareOp::Equal,
            0,
        )])
        .and_then(vec![TxnOp::put(key.as_str(), seed, None)])
        .or_else(vec![TxnOp::get(key.as_str(), None)]);
    let resp = timed("reading the fleet's desired state", client.txn(txn)).await?;
    if resp.succeeded() {
        let revision = resp.header().map_or(0, |h| h.revision()) as u64;
        return Ok((revision, seed.as_bytes().to_vec(), true));
    }
    for op in resp.op_responses() {
        if let TxnOpResponse::Get(get) = op
            && let Some(kv) = get.kvs().first()
        {
            return Ok((kv.mod_revision() as u64, kv.value().to_vec(), false));
        }
    }
    bail!("etcd answered the read of {key} with nothing")
}

/// The agent; see the module docs.
pub struct Agent {
    settings: FleetSettings,
    link: SharedLink,
    handle: ControllerHandle,
    proposals: mpsc::Receiver<ToAgent>,
    /// The newest revision handed to the controller.
    delivered: u64,
    /// The status last written.
    published: Option<MemberStatus>,
    /// The member of `settings.endpoints` the next session talks to.
    endpoint: usize,
    /// The members' health verdicts, as read.
    health: std::collections::BTreeMap<String, super::HealthDoc>,
    /// This member's health verdicts as last written (this session).
    health_written: Option<String>,
    /// ...and as the controller last gave them (written when a session
    /// starts).
    health_latest: Option<String>,
    /// Changes that arrived while etcd was out of reach, and until when
    /// they may wait.
    waiting: Vec<(tokio::time::Instant, Proposal)>,
}

impl Agent {
    /// An agent for the controller behind `handle`, which applied
    /// `revision` at start-up.
    pub fn new(
        settings: FleetSettings,
        link: SharedLink,
        handle: ControllerHandle,
        proposals: mpsc::Receiver<ToAgent>,
        revision: u64,
    ) -> Agent {
        Agent {
            settings,
            link,
            handle,
            proposals,
            delivered: revision,
            published: None,
            endpoint: 0,
            health: Default::default(),
            health_written: None,
            health_latest: None,
            waiting: Vec::new(),
        }
    }

    /// Runs sessions with etcd until the controller stops.
    pub async fn run(mut self) {
        loop {
            let endpoint =
                self.settings.endpoints[self.endpoint % self.settings.endpoints.len()].clone();
            let error = match self.session(&endpoint).await {
                Ok(()) => return,
                Err(e) => format!("{e:#}"),
            };
            // The next session tries the next member.
            self.endpoint += 1;
            let (was, led) = {
                let mut l = self.link.lock().unwrap();
                let was = l.connected;
                l.connected = false;
                l.error = Some(error.clone());
                l.leader = None;
                (was, std::mem::take(&mut l.is_leader))
            };
            if led {
                let _ = self.handle.fleet_leader(false).await;
            }
            if was {
                tracing::error!(
                    error = %error,
                    "lost etcd: forwarding goes on with revision {}; changes are refused until etcd answers again",
                    self.delivered
                );
            } else {
                tracing::debug!(error = %error, "etcd still unreachable");
            }
            // Changes wait for the next session a while, then are refused.
            let until = tokio::time::Instant::now() + RETRY;
            loop {
                let now = tokio::time::Instant::now();
                let (late, keep) = std::mem::take(&mut self.waiting)
                    .into_iter()
                    .partition(|(d, _)| *d <= now);
                self.waiting = keep;
                for (_, p) in late {
                    p.pending.fail(unreachable(&error));
                }
                let next = self
                    .waiting
                    .iter()
                    .map(|(d, _)| *d)
                    .min()
                    .map_or(until, |d| d.min(until));
                tokio::select! {
                    _ = tokio::time::sleep_until(next) => if next == until { break },
                    p = self.proposals.recv() => match p {
                        Some(ToAgent::Propose(p)) => self.waiting.push((now + CHANGE_PATIENCE, *p)),
                        Some(ToAgent::Health(doc)) => self.health_latest = Some(doc),
                        Some(ToAgent::Steering(_) | ToAgent::Load(..)) => {}
                        None => return,
                    },
                }
            }
        }
    }

    fn contact(&self) {
        let mut l = self.link.lock().unwrap();
        if !l.connected {
            l.connected = true;
            l.error = None;
            tracing::info!("talking to etcd again");
        }
        l.last_contact = Some(Instant::now());
    }

    fn count_write(&self, kind: &'static str) {
        *self.link.lock().unwrap().writes.entry(kind).or_default() += 1;
    }

    /// One session: a lease, the document, a watch; ends with an error
    /// when etcd does not answer (or `Ok` when the controller stopped).
    async fn session(&mut self, endpoint: &str) -> Result<()> {
        let mut client = connect(&self.settings, endpoint).await?;
        let ttl = self.settings.lease_ttl.as_secs().max(1) as i64;
        let lease = timed("granting the member's lease", client.lease_grant(ttl, None))
            .await?
            .id();
        let (keeper, keep_stream) = timed(
            "renewing the member's lease",
            client.lease_keep_alive(lease),
        )
        .await?;
        // The renewals run on their own, so that a busy controller (a large
        // table rebuild that the session waits on) never lets the lease
        // lapse.
        let (lost_tx, mut lost) = tokio::sync::oneshot::channel::<String>();
        let _renewer = AbortOnDrop(tokio::spawn(renew(
            keeper,
            keep_stream,
            self.settings.lease_ttl / 3,
            self.link.clone(),
            lost_tx,
        )));
        self.contact();
        // Everything under the prefix: the desired state, the steering
        // leader and its view, the members' health verdicts.
        let prefix = format!("{}/", self.settings.prefix);
        let got = timed(
            "reading the fleet's state",
            client.get(
                prefix.as_str(),
                Some(etcd_client::GetOptions::new().with_prefix()),
            ),
        )
        .await?;
        let now = got.header().map_or(0, |h| h.revision());
        self.health.clear();
        self.health_written = None;
        let mut leader_seen = false;
        for kv in got.kvs() {
            leader_seen |= kv.key() == self.settings.leader_key().as_bytes();
            self.dispatch(kv, EventType::Put, lease, false).await?;
        }
        if !leader_seen {
            self.set_leader(None, false).await?;
        }
        self.health_changed().await?;
        let mut watch = timed(
            "watching the fleet's state",
            client.watch(
                prefix.as_str(),
                Some(
                    WatchOptions::new()
                        .with_prefix()
                        .with_start_revision(now + 1),
                ),
            ),
        )
        .await?;
        self.published = None;
        if let Some(doc) = self.health_latest.clone() {
            self.publish_health(&mut client, lease, doc).await?;
        }
        let mut waiting = std::mem::take(&mut self.waiting).into_iter();
        while let Some((_, p)) = waiting.next() {
            if let Err(e) = self.propose(&mut client, p).await {
                self.waiting.extend(waiting);
                return Err(e);
            }
        }
        self.campaign(&mut client, lease).await?;
        let mut renew = tokio::time::interval(self.settings.lease_ttl / 3);
        renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut status = tokio::time::interval(STATUS_POLL);
        status.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                msg = watch.message() => {
                    let msg = msg.context("watching the fleet's state")?
                        .ok_or_else(|| anyhow!("etcd ended the watch of {prefix}"))?;
                    if msg.canceled() {
                        bail!("etcd cancelled the watch of {prefix} ({}; compacted at {})", msg.cancel_reason(), msg.compact_revision());
                    }
                    self.contact();
                    let mut health = false;
                    for ev in msg.events() {
                        let Some(kv) = ev.kv() else { continue };
                        health |= kv.key().starts_with(self.settings.health_prefix().as_bytes());
                        self.dispatch(kv, ev.event_type(), lease, true).await?;
                    }
                    if health {
                        self.health_changed().await?;
                    }
                    if self.link.lock().unwrap().leader.is_none() {
                        self.campaign(&mut client, lease).await?;
                    }
                }
                e = &mut lost => bail!("{}", e.unwrap_or_else(|_| "the lease renewals stopped".into())),
                _ = renew.tick() => {
                    if self.link.lock().unwrap().leader.is_none() {
                        self.campaign(&mut client, lease).await?;
                    }
                }
                _ = status.tick() => self.publish(&mut client, lease).await?,
                p = self.proposals.recv() => match p {
                    Some(ToAgent::Propose(p)) => self.propose(&mut client, *p).await?,
                    Some(ToAgent::Steering(doc)) => self.publish_steering(&mut client, lease, doc).await?,
                    Some(ToAgent::Health(doc)) => self.publish_health(&mut client, lease, doc).await?,
                    Some(ToAgent::Load(node, body)) => {
                        // The leader reads it from its watch; the key
                        // goes with this member's lease.
                        timed(
                            "forwarding a load report",
                            client.put(
                                format!("{}{node}", self.settings.load_prefix()),
                                body,
                                Some(PutOptions::new().with_lease(lease)),
                            ),
                        )
                        .await?;
                        self.count_write("load");
                    }
                    None => return Ok(()),
                },
            }
        }
    }

    /// One key of the fleet's state, read (`live`: watched as it changed).
    async fn dispatch(
        &mut self,
        kv: &etcd_client::KeyValue,
        kind: EventType,
        lease: i64,
        live: bool,
    ) -> Result<()> {
        let key = kv.key();
        let s = &self.settings;
        if key == s.desired_key().as_bytes() {
            match kind {
                EventType::Put => {
                    self.deliver(kv.mod_revision() as u64, kv.value().to_vec(), None)
                        .await?
                }
                EventType::Delete => tracing::error!(
                    key = %s.desired_key(),
                    "the fleet's desired state was deleted from etcd; keeping revision {} (write a document, e.g. lbctl fleet import -f FILE)",
                    self.delivered
                ),
            }
        } else if key == s.steering_key().as_bytes() {
            if kind == EventType::Put {
                self.handle
                    .fleet_steering(kv.mod_revision() as u64, kv.value().to_vec())
                    .await
                    .map_err(|_| anyhow!("the controller stopped"))?;
            }
        } else if key == s.leader_key().as_bytes() {
            match kind {
                EventType::Put => {
                    let name = String::from_utf8_lossy(kv.value()).into_owned();
                    let mine = name == s.name && kv.lease() == lease;
                    self.set_leader(Some(name), mine).await?;
                }
                EventType::Delete => self.set_leader(None, false).await?,
            }
        } else if let Some(node) = key.strip_prefix(s.load_prefix().as_bytes()) {
            // A load report another member forwarded: the leader takes it
            // as pushed now (one read at start-up would be old news).
            let node = String::from_utf8_lossy(node).parse::<std::net::IpAddr>();
            if live
                && kind == EventType::Put
                && self.link.lock().unwrap().is_leader
                && let Ok(node) = node
            {
                let report =
                    crate::control::api::load_report_from_json(kv.value(), Instant::now()).ok();
                let _ = self.handle.push_load(node, report).await;
            }
        } else if let Some(member) = key.strip_prefix(s.health_prefix().as_bytes()) {
            let member = String::from_utf8_lossy(member).into_owned();
            match kind {
                EventType::Put => match serde_json::from_slice::<super::HealthDoc>(kv.value()) {
                    Ok(doc) => {
                        self.health.insert(member, doc);
                    }
                    Err(e) => {
                        tracing::warn!(member = %member, error = %e, "a member's health verdicts in etcd do not parse; left out");
                        self.health.remove(&member);
                    }
                },
                EventType::Delete => {
                    self.health.remove(&member);
                }
            }
        }
        Ok(())
    }

    /// Hands the controller the members' health verdicts.
    async fn health_changed(&mut self) -> Result<()> {
        self.handle
            .fleet_health(self.health.clone())
            .await
            .map_err(|_| anyhow!("the controller stopped"))
    }

    /// Records who leads; tells the controller when this member starts or
    /// stops leading.
    async fn set_leader(&mut self, leader: Option<String>, mine: bool) -> Result<()> {
        let was = {
            let mut l = self.link.lock().unwrap();
            if l.leader != leader {
                match &leader {
                    Some(n) => tracing::info!(leader = %n, "steering leader"),
                    None => tracing::info!(
                        "the fleet has no steering leader (the last one's lease ended)"
                    ),
                }
            }
            l.leader = leader;
            let was = l.is_leader;
            l.is_leader = mine;
            if mine && !was {
                l.elected += 1;
            }
            was
        };
        if was != mine {
            self.handle
                .fleet_leader(mine)
                .await
                .map_err(|_| anyhow!("the controller stopped"))?;
        }
        Ok(())
    }

    /// Tries to become the steering leader: a create-only write of the
    /// leader key under this member's lease (it is gone when the lease
    /// ends, and the next member takes over).
    async fn campaign(&mut self, client: &mut Client, lease: i64) -> Result<()> {
        let key = self.settings.leader_key();
        let txn = Txn::new()
            .when(vec![Compare::create_revision(
                key.as_str(),
                CompareOp::Equal,
                0,
            )])
            .and_then(vec![TxnOp::put(
                key.as_str(),
                self.settings.name.as_str(),
                Some(PutOptions::new().with_lease(lease)),
            )]);
        let resp = timed("campaigning for steering leader", client.txn(txn)).await?;
        if resp.succeeded() {
            self.count_write("leader");
            // The watch sees the key too; do not wait for it.
            self.set_leader(Some(self.settings.name.clone()), true)
                .await?;
        }
        Ok(())
    }

    /// Writes the steering view while this member leads (fenced: only if
    /// the leader key is still this member's, under its lease).
    async fn publish_steering(
        &mut self,
        client: &mut Client,
        lease: i64,
        doc: String,
    ) -> Result<()> {
        if !self.link.lock().unwrap().is_leader {
            return Ok(());
        }
        let key = self.settings.leader_key();
        let txn = Txn::new()
            .when(vec![
                Compare::value(key.as_str(), CompareOp::Equal, self.settings.name.as_str()),
                Compare::lease(key.as_str(), CompareOp::Equal, lease),
            ])
            .and_then(vec![TxnOp::put(self.settings.steering_key(), doc, None)]);
        let resp = timed("publishing the fleet's steering view", client.txn(txn)).await?;
        self.count_write("steering");
        if !resp.succeeded() {
            tracing::warn!("not the steering leader any more: the steering view was not published");
            self.set_leader(None, false).await?;
        }
        Ok(())
    }

    /// Writes this member's health verdicts when they changed.
    async fn publish_health(&mut self, client: &mut Client, lease: i64, doc: String) -> Result<()> {
        self.health_latest = Some(doc.clone());
        if self.health_written.as_ref() == Some(&doc) {
            return Ok(());
        }
        let key = format!("{}{}", self.settings.health_prefix(), self.settings.name);
        timed(
            "publishing the member's health verdicts",
            client.put(key, doc.as_str(), Some(PutOptions::new().with_lease(lease))),
        )
        .await?;
        self.count_write("health");
        self.health_written = Some(doc);
        Ok(())
    }

    /// Hands revision `revision` to the controller unless it has a newer
    /// one already (a change this member wrote arrives here again through
    /// the watch).
    async fn deliver(
        &mut self,
        revision: u64,
        document: Vec<u8>,
        pending: Option<PendingChange>,
    ) -> Result<()> {
        if revision <= self.delivered && pending.is_none() {
            return Ok(());
        }
        self.delivered = self.delivered.max(revision);
        self.handle
            .fleet_revision(revision, document, pending)
            .await
            .map_err(|_| anyhow!("the controller stopped"))
    }

    /// Writes a proposal if the document is still at its base revision;
    /// else hands the newer revision to the controller and has the change
    /// worked out again on it (or, with `If-Match`, refused).
    async fn propose(&mut self, client: &mut Client, p: Proposal) -> Result<()> {
        let key = self.settings.desired_key();
        let txn = Txn::new()
            .when(vec![Compare::mod_revision(
                key.as_str(),
                CompareOp::Equal,
                p.base as i64,
            )])
            .and_then(vec![TxnOp::put(key.as_str(), p.document.as_str(), None)])
            .or_else(vec![TxnOp::get(key.as_str(), None)]);
        let resp = match timed("writing the fleet's desired state", client.txn(txn)).await {
            Ok(r) => r,
            Err(e) => {
                // Whether it was written is unknown: the watch will tell.
                p.pending.fail(ControllerError::Unavailable(format!(
                    "{e:#}; the change may or may not have been written: read the state again"
                )));
                return Err(e);
            }
        };
        self.contact();
        self.count_write("desired");
        if resp.succeeded() {
            let revision = resp.header().map_or(0, |h| h.revision()) as u64;
            return self
                .deliver(revision, p.document.into_bytes(), Some(p.pending))
                .await;
        }
        // Lost the race: someone wrote another revision since.
        self.link.lock().unwrap().conflicts += 1;
        let mut current = None;
        for op in resp.op_responses() {
            if let TxnOpResponse::Get(get) = op
                && let Some(kv) = get.kvs().first()
            {
                current = Some((kv.mod_revision() as u64, kv.value().to_vec()));
            }
        }
        let now = current.as_ref().map_or(0, |(r, _)| *r);
        if let Some((revision, document)) = current {
            self.deliver(revision, document, None).await?;
        }
        if p.if_match {
            p.pending.fail(ControllerError::PreconditionFailed {
                given: p.base,
                current: now,
            });
        } else if p.retries >= MAX_RETRIES {
            p.pending.fail(ControllerError::Unavailable(format!(
                "the fleet's desired state changed {} times while this change was written; try again",
                p.retries + 1
            )));
        } else {
            // Worked out again once the controller has the newer revision
            // (it is queued before this).
            let handle = self.handle.clone();
            let retries = p.retries + 1;
            tokio::spawn(async move { handle.resubmit(p.pending, retries).await });
        }
        Ok(())
    }

    /// Writes this member's status when it changed.
    async fn publish(&mut self, client: &mut Client, lease: i64) -> Result<()> {
        // A busy controller answers later; the next poll asks again.
        let asked = tokio::time::timeout(Duration::from_millis(100), self.handle.fleet_info());
        let Ok(Ok(Some(info))) = asked.await else {
            return Ok(());
        };
        let status = MemberStatus {
            name: self.settings.name.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            applied_revision: info.revision,
            refused: info.link.refused,
            tables: info.tables,
            updated_unix_ms: 0,
        };
        if self.published.as_ref() == Some(&status) {
            return Ok(());
        }
        let mut stamped = status.clone();
        stamped.updated_unix_ms = unix_ms();
        let value = serde_json::to_string(&stamped).expect("plain data");
        timed(
            "publishing the member's status",
            client.put(
                self.settings.member_key(),
                value,
                Some(PutOptions::new().with_lease(lease)),
            ),
        )
        .await?;
        self.count_write("status");
        self.contact();
        self.published = Some(status);
        Ok(())
    }
}

/// Aborts a task when dropped (a session's lease renewals).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Renews the member's lease every `every` until a renewal fails, then
/// says why on `lost`.
async fn renew(
    mut keeper: etcd_client::LeaseKeeper,
    mut stream: etcd_client::LeaseKeepAliveStream,
    every: Duration,
    link: SharedLink,
    lost: tokio::sync::oneshot::Sender<String>,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let renewed = async {
            timed("renewing the member's lease", keeper.keep_alive()).await?;
            let resp = timed("renewing the member's lease", stream.message())
                .await?
                .ok_or_else(|| anyhow!("etcd ended the lease renewals"))?;
            if resp.ttl() <= 0 {
                bail!(
                    "the member's lease expired (etcd was out of reach longer than fleet.lease_ttl)"
                );
            }
            Ok(())
        };
        match renewed.await {
            Ok(()) => link.lock().unwrap().last_contact = Some(Instant::now()),
            Err(e) => {
                let _ = lost.send(format!("{e:#}"));
                return;
            }
        }
    }
}

/// The error of a change while etcd is out of reach.
fn unreachable(error: &str) -> ControllerError {
    ControllerError::Unavailable(format!(
        "etcd is unreachable ({error}): changes need etcd; the balancer keeps forwarding with the state it has"
    ))
}

/// Every live member's status, read from etcd.
pub async fn members(settings: &FleetSettings) -> Result<Vec<MemberStatus>> {
    let mut last = anyhow!("no etcd endpoint");
    for e in &settings.endpoints {
        match connect(settings, e).await {
            Ok(mut client) => match members_from(&mut client, settings).await {
                Ok(v) => return Ok(v),
                Err(err) => last = err.context(format!("etcd at {e}")),
            },
            Err(err) => last = err,
        }
    }
    Err(last)
}

async fn members_from(client: &mut Client, settings: &FleetSettings) -> Result<Vec<MemberStatus>> {
    let resp = timed(
        "reading the fleet's members",
        client.get(
            settings.members_prefix(),
            Some(etcd_client::GetOptions::new().with_prefix()),
        ),
    )
    .await?;
    let mut out = Vec::new();
    for kv in resp.kvs() {
        match serde_json::from_slice::<MemberStatus>(kv.value()) {
            Ok(s) => out.push(s),
            Err(e) => tracing::warn!(
                key = %String::from_utf8_lossy(kv.key()),
                error = %e,
                "a member's status in etcd does not parse; left out"
            ),
        }
    }
    Ok(out)
}

/// Marks the link as connected after a start-up read.
pub fn note_contact(link: &SharedLink) {
    let mut l = link.lock().unwrap();
    l.connected = true;
    l.last_contact = Some(Instant::now());
}

/// A fresh link state.
pub fn new_link() -> SharedLink {
    std::sync::Arc::new(std::sync::Mutex::new(LinkState::default()))
}
