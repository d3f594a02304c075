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
/// How long to wait before a new session after one failed.
pub const RETRY: Duration = Duration::from_secs(1);
/// How often the member looks at its own status (applied revision, table
/// fingerprints) and writes it when it changed.
const STATUS_POLL: Duration = Duration::from_millis(200);
/// How often a change that lost a compare-and-swap race is worked out
/// again on the newer revision before it is refused.
pub const MAX_RETRIES: u32 = 5;

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
    proposals: mpsc::Receiver<Proposal>,
    /// The newest revision handed to the controller.
    delivered: u64,
    /// The status last written.
    published: Option<MemberStatus>,
    /// The member of `settings.endpoints` the next session talks to.
    endpoint: usize,
}

impl Agent {
    /// An agent for the controller behind `handle`, which applied
    /// `revision` at start-up.
    pub fn new(
        settings: FleetSettings,
        link: SharedLink,
        handle: ControllerHandle,
        proposals: mpsc::Receiver<Proposal>,
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
            let was = {
                let mut l = self.link.lock().unwrap();
                let was = l.connected;
                l.connected = false;
                l.error = Some(error.clone());
                was
            };
            if was {
                tracing::error!(
                    error = %error,
                    "lost etcd: forwarding goes on with revision {}; changes are refused until etcd answers again",
                    self.delivered
                );
            } else {
                tracing::debug!(error = %error, "etcd still unreachable");
            }
            // Changes cannot be written meanwhile: refuse them at once.
            let until = tokio::time::Instant::now() + RETRY;
            loop {
                tokio::select! {
                    _ = tokio::time::sleep_until(until) => break,
                    p = self.proposals.recv() => match p {
                        Some(p) => p.pending.fail(unreachable(&error)),
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
        let (mut keeper, mut keep_stream) = timed(
            "renewing the member's lease",
            client.lease_keep_alive(lease),
        )
        .await?;
        self.contact();
        let key = self.settings.desired_key();
        let got = timed(
            "reading the fleet's desired state",
            client.get(key.as_str(), None),
        )
        .await?;
        let now = got.header().map_or(0, |h| h.revision());
        if let Some(kv) = got.kvs().first() {
            self.deliver(kv.mod_revision() as u64, kv.value().to_vec(), None)
                .await?;
        }
        let mut watch = timed(
            "watching the fleet's desired state",
            client.watch(
                key.as_str(),
                Some(WatchOptions::new().with_start_revision(now + 1)),
            ),
        )
        .await?;
        self.published = None;
        let mut renew = tokio::time::interval(self.settings.lease_ttl / 3);
        renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut status = tokio::time::interval(STATUS_POLL);
        status.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                msg = watch.message() => {
                    let msg = msg.context("watching the fleet's desired state")?
                        .ok_or_else(|| anyhow!("etcd ended the watch of {key}"))?;
                    if msg.canceled() {
                        bail!("etcd cancelled the watch of {key} ({}; compacted at {})", msg.cancel_reason(), msg.compact_revision());
                    }
                    self.contact();
                    for ev in msg.events() {
                        let Some(kv) = ev.kv() else { continue };
                        match ev.event_type() {
                            EventType::Put => {
                                self.deliver(kv.mod_revision() as u64, kv.value().to_vec(), None).await?;
                            }
                            EventType::Delete => tracing::error!(
                                key = %key,
                                "the fleet's desired state was deleted from etcd; keeping revision {} (write a document, e.g. lbctl fleet import -f FILE)",
                                self.delivered
                            ),
                        }
                    }
                }
                _ = renew.tick() => {
                    timed("renewing the member's lease", keeper.keep_alive()).await?;
                    let resp = timed("renewing the member's lease", keep_stream.message()).await?
                        .ok_or_else(|| anyhow!("etcd ended the lease renewals"))?;
                    if resp.ttl() <= 0 {
                        bail!("the member's lease expired (etcd was out of reach longer than fleet.lease_ttl)");
                    }
                    self.contact();
                }
                _ = status.tick() => self.publish(&mut client, lease).await?,
                p = self.proposals.recv() => match p {
                    Some(p) => self.propose(&mut client, p).await?,
                    None => return Ok(()),
                },
            }
        }
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
        let Ok((revision, tables)) = self.handle.fleet_tables().await else {
            return Ok(());
        };
        let refused = self.link.lock().unwrap().refused.clone();
        let status = MemberStatus {
            name: self.settings.name.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            applied_revision: revision,
            refused,
            tables,
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
