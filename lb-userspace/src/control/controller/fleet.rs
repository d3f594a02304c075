//! The controller's side of the fleet (`[fleet]`, see [`crate::fleet`]):
//! revisions of the desired state from etcd, table fingerprints, and the
//! steering view: followed, published as leader, or replaced by the
//! safety net while cut off from etcd.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    time::{Duration, Instant},
};

use super::*;

/// How a VIP's weights are decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum SteerMode {
    /// Standalone: by this member's own health checks and load reports.
    Own,
    /// The fleet's steering leader: by its own load scrapes and the
    /// members' combined health verdicts, published for every member.
    Lead,
    /// A fleet member: by the leader's published view (and nothing, while
    /// there is no leader: the tables stay as they are).
    Follow,
    /// A fleet member cut off from etcd: the last view, with the backends
    /// its own health checks see down taken out (the safety net).
    SafetyNet,
}

/// The fleet's steering, on one member (see [`crate::fleet`]).
#[derive(Default)]
pub(super) struct FleetSteer {
    /// The steering view as last received (and applied), and its etcd
    /// revision.
    pub(super) view: Option<crate::fleet::SteeringDoc>,
    pub(super) view_revision: u64,
    /// The members' health verdicts (the leader combines them).
    pub(super) health: BTreeMap<String, crate::fleet::HealthDoc>,
    /// While this member leads: since when.
    pub(super) leading: Option<Instant>,
    /// The leader's own plans, per VIP (what it publishes).
    pub(super) plans: BTreeMap<VipAddr, BTreeMap<IpAddr, crate::steering::Target>>,
    /// Something to publish (a plan changed, a new revision).
    pub(super) due: bool,
    /// The view this member published last, as leader.
    pub(super) published: Option<crate::fleet::SteeringDoc>,
    /// This member's health verdicts as last handed to the agent.
    pub(super) health_sent: Option<String>,
    /// Backends the safety net took out, while cut off from etcd.
    pub(super) diverged: std::collections::BTreeSet<(VipAddr, IpAddr)>,
    /// Backends the safety net took out since lbd started.
    pub(super) divergences: u64,
}

/// How long a new steering leader goes on with the last leader's weights
/// before it plans from load: its load scrapes start when it takes over,
/// and until they report it would plan full weights.
const TAKEOVER_GRACE: Duration = Duration::from_secs(3);

impl Controller {
    /// How this member's weights are decided now.
    pub(super) fn steer_mode(&self) -> SteerMode {
        let Some(f) = &self.fleet else {
            return SteerMode::Own;
        };
        let l = f.link.lock().unwrap();
        // A hiccup (one renewal late on a loaded host) is no cut: the
        // safety net, which makes this member's tables its own until the
        // churn hold has passed, waits for as long as etcd would wait to
        // drop this member (its lease).
        let cut = !l.connected
            && l.last_contact
                .is_none_or(|t| t.elapsed() >= f.settings.lease_ttl);
        if cut {
            SteerMode::SafetyNet
        } else if l.is_leader && self.fsteer.leading.is_some() {
            SteerMode::Lead
        } else {
            SteerMode::Follow
        }
    }

    /// The targets of `vip` by the fleet's steering view (backends of the
    /// VIP only; those the view lacks get the data plane's defaults), with
    /// the safety net's backends taken out while cut off from etcd.
    pub(super) fn view_targets(&self, vip: &Vip) -> BTreeMap<IpAddr, crate::steering::Target> {
        let key = vip.addr.to_string();
        let mut targets: BTreeMap<IpAddr, crate::steering::Target> = self
            .fsteer
            .view
            .as_ref()
            .and_then(|d| d.vips.get(&key))
            .map(|s| {
                s.targets
                    .iter()
                    .filter(|(b, _)| vip.backends.iter().any(|x| x.addr == **b))
                    .map(|(b, t)| (*b, *t))
                    .collect()
            })
            .unwrap_or_default();
        for (v, b) in &self.fsteer.diverged {
            if *v == vip.addr
                && let Some(t) = targets.get_mut(b)
            {
                t.down = true;
            }
        }
        targets
    }

    /// The VIP's shed share by the fleet's steering view.
    pub(super) fn view_shed(&self, vip: &VipAddr) -> f64 {
        self.fsteer
            .view
            .as_ref()
            .and_then(|d| d.vips.get(&vip.to_string()))
            .map_or(0.0, |s| s.shed)
    }

    /// Applies the fleet's steering view, as published by the leader:
    /// every member builds every table from the same targets with the same
    /// clock, so that their tables agree entry for entry.
    pub(super) fn apply_view(&mut self, doc: crate::fleet::SteeringDoc) {
        if self.fsteer.view.as_ref() == Some(&doc) {
            return;
        }
        let _cause = tracing::info_span!("change", cause = "fleet steering").entered();
        self.dp.pin_table_clock(doc.at);
        self.fsteer.view = Some(doc);
        let vips = std::mem::take(&mut self.config.vips);
        for v in &vips {
            let targets = self.view_targets(v);
            let result = self
                .dp
                .set_vip_targets(v, &targets)
                .and_then(|()| self.dp.release_held(&v.addr).map(drop))
                .and_then(|()| {
                    self.dp
                        .set_vip_shed(&v.addr, self.view_shed(&v.addr))
                        .map(drop)
                });
            if let Err(e) = result {
                tracing::error!(vip = %v.addr, error = %format!("{e:#}"), "applying the fleet's steering view failed");
            }
        }
        self.config.vips = vips;
    }

    /// Cut off from etcd: takes the backends this member's own health
    /// checks see down out of its table (counted and logged as a
    /// divergence from the fleet); back with etcd, the leader's view rules
    /// again.
    pub(super) fn safety_net(&mut self) {
        let cut_off = self.steer_mode() == SteerMode::SafetyNet;
        let mut now_diverged = std::collections::BTreeSet::new();
        if cut_off {
            for v in &self.config.vips {
                for b in &v.backends {
                    let down = self
                        .steering
                        .backend_view(v, b.addr)
                        .and_then(|x| x.health)
                        .is_some_and(|h| !h.up);
                    if down {
                        now_diverged.insert((v.addr, b.addr));
                    }
                }
            }
        }
        if now_diverged == self.fsteer.diverged {
            return;
        }
        for (v, b) in now_diverged.difference(&self.fsteer.diverged) {
            self.fsteer.divergences += 1;
            tracing::warn!(vip = %v, backend = %b, "cut off from etcd, this member's own health check sees the backend down: out of this member's table (a divergence from the fleet until etcd answers again)");
        }
        let changed: std::collections::BTreeSet<VipAddr> = now_diverged
            .symmetric_difference(&self.fsteer.diverged)
            .map(|(v, _)| *v)
            .collect();
        self.fsteer.diverged = now_diverged;
        let vips = std::mem::take(&mut self.config.vips);
        for v in vips.iter().filter(|v| changed.contains(&v.addr)) {
            let targets = self.view_targets(v);
            let _cause = tracing::info_span!("change", cause = "fleet safety net").entered();
            if let Err(e) = self.dp.set_vip_targets(v, &targets) {
                tracing::error!(vip = %v.addr, error = %format!("{e:#}"), "applying the safety net failed");
            }
        }
        self.config.vips = vips;
    }

    /// Hands the agent this member's health verdicts when they changed.
    pub(super) fn send_health(&mut self) {
        let mut doc = crate::fleet::HealthDoc::new();
        for v in &self.config.vips {
            for b in &v.backends {
                if v.health_check(b).is_none() {
                    continue;
                }
                if let Some(h) = self.steering.backend_view(v, b.addr).and_then(|x| x.health) {
                    doc.entry(v.addr.to_string())
                        .or_default()
                        .insert(b.addr, h.up);
                }
            }
        }
        let text = serde_json::to_string(&doc).expect("plain data");
        if self.fsteer.health_sent.as_ref() == Some(&text) {
            return;
        }
        if let Some(f) = &self.fleet
            && f.proposals
                .try_send(crate::fleet::agent::ToAgent::Health(text.clone()))
                .is_ok()
        {
            self.fsteer.health_sent = Some(text);
        }
    }

    /// As steering leader: publishes the fleet's steering view when a plan
    /// changed, the desired revision is new, or held table positions may
    /// move (a new clock for everyone).
    pub(super) fn publish_steering(&mut self) {
        if self.steer_mode() != SteerMode::Lead {
            return;
        }
        let (Some(since), Some(fleet)) = (self.fsteer.leading, &self.fleet) else {
            return;
        };
        let now = crate::dataplane::tables::unix_now();
        let new_revision = self
            .fsteer
            .published
            .as_ref()
            .or(self.fsteer.view.as_ref())
            .is_none_or(|d| d.desired_revision != self.revision);
        let release = self
            .config
            .vips
            .iter()
            .any(|v| self.dp.held_until(&v.addr).is_some_and(|t| t <= now));
        // Taking over, the new leader publishes the last view at once (it
        // names the new leader; no target changes), then nothing new until
        // its grace is over.
        let first = self.fsteer.published.is_none();
        if since.elapsed() < TAKEOVER_GRACE && !new_revision && !first {
            return;
        }
        if !self.fsteer.due && !release && !new_revision && !first {
            return;
        }
        let quorum = fleet.settings.down_quorum;
        let vips = self
            .config
            .vips
            .iter()
            .map(|v| {
                let key = v.addr.to_string();
                let mut targets = self.fsteer.plans.get(&v.addr).cloned().unwrap_or_default();
                targets.retain(|b, _| v.backends.iter().any(|x| x.addr == *b));
                for (b, t) in targets.iter_mut() {
                    if let Some(down) =
                        crate::fleet::fleet_down(&self.fsteer.health, &key, *b, quorum)
                    {
                        t.down = down;
                    }
                }
                let shed = self.steering.vip_view(&v.addr).shed;
                (key, crate::fleet::VipSteering { targets, shed })
            })
            .collect();
        let doc = crate::fleet::SteeringDoc {
            leader: fleet.settings.name.clone(),
            desired_revision: self.revision,
            at: now,
            vips,
        };
        self.fsteer.due = false;
        if !release
            && self
                .fsteer
                .published
                .as_ref()
                .is_some_and(|p| p.vips == doc.vips && p.desired_revision == doc.desired_revision)
        {
            return;
        }
        let text = serde_json::to_string(&doc).expect("plain data");
        if fleet
            .proposals
            .try_send(crate::fleet::agent::ToAgent::Steering(text))
            .is_ok()
        {
            self.fsteer.published = Some(doc);
        } else {
            self.fsteer.due = true;
        }
    }

    /// Whether this member took over the steering less than
    /// [`TAKEOVER_GRACE`] ago: it plans nothing from load until its own
    /// scrapes have reported, so that leadership moving changes no table.
    pub(super) fn in_takeover_grace(&self) -> bool {
        self.fsteer
            .leading
            .is_some_and(|t| t.elapsed() < TAKEOVER_GRACE)
            && self.fsteer.view.is_some()
    }

    /// This member became (or stopped being) the fleet's steering leader.
    pub(super) fn fleet_leader(&mut self, leads: bool) {
        if leads == self.fsteer.leading.is_some() {
            return;
        }
        if leads {
            tracing::info!(
                "this member leads the fleet's steering: it scrapes the backends' load and publishes the fleet's weights"
            );
            let now = Instant::now();
            self.fsteer.leading = Some(now);
            self.fsteer.published = None;
            // Go on from the last leader's weights.
            self.fsteer.plans.clear();
            let vips = std::mem::take(&mut self.config.vips);
            for v in &vips {
                let targets = self.view_targets(v);
                self.steering.adopt(&v.addr, &targets, now);
                self.fsteer.plans.insert(v.addr, targets);
            }
            self.config.vips = vips;
            self.fsteer.due = self.fsteer.view.is_none();
        } else {
            tracing::info!("this member no longer leads the fleet's steering");
            self.fsteer.leading = None;
        }
        self.start_probes();
    }

    /// Applies revision `revision` of the fleet's desired state (from
    /// the fleet agent), or refuses it and keeps the one applied; answers
    /// the change of this member that made it, if one did.
    pub(super) fn fleet_revision(
        &mut self,
        revision: u64,
        document: &[u8],
        pending: Option<PendingChange>,
    ) {
        let cause = pending
            .as_ref()
            .map_or("fleet".to_string(), |p| p.req.caller.clone());
        let _cause = tracing::info_span!("change", cause = %cause).entered();
        self.fleet_seen = self.fleet_seen.max(revision);
        if revision <= self.revision {
            // Superseded already (a newer revision came first).
            if let Some(p) = pending {
                let _ = p.reply.send(Ok(ChangeOutcome {
                    revision,
                    changes: p.changes,
                    ..ChangeOutcome::default()
                }));
            }
            return;
        }
        let flips_before = self.dp.tables_switched();
        let result = (|| {
            let vips = crate::fleet::decode(document, &self.config.balancer)
                .map_err(|problems| ChangeError::Invalid { problems })?;
            let mut next = self.config.clone();
            next.vips = vips;
            config::validate(&next).map_err(|problems| ChangeError::Invalid { problems })?;
            let changes = diff::diff(&self.config.vips, &next.vips);
            self.commit_changes(next, true, changes.clone(), revision)?;
            Ok::<_, ControllerError>(changes)
        })();
        let Some(fleet) = &self.fleet else {
            return;
        };
        match result {
            Ok(changes) => {
                {
                    let mut l = fleet.link.lock().unwrap();
                    l.applied_total += 1;
                    l.refused = None;
                }
                tracing::info!(
                    revision,
                    changes = changes.len(),
                    tables = self.dp.tables_switched() - flips_before,
                    "fleet revision applied"
                );
                self.publish_steering();
                if let Some(p) = pending {
                    let shares = share_moves(&p.before, &self.table_shares(&p.touched));
                    let _ = p.reply.send(Ok(ChangeOutcome {
                        revision,
                        dry_run: false,
                        changes,
                        shares,
                        tables_flipped: self.dp.tables_switched() - flips_before,
                    }));
                }
            }
            Err(e) => {
                let error = match &e {
                    ControllerError::Rejected(ChangeError::Invalid { problems }) => {
                        crate::fleet::problem_text(problems)
                    }
                    e => e.to_string(),
                };
                {
                    let mut l = fleet.link.lock().unwrap();
                    l.refused_total += 1;
                    l.refused = Some(crate::fleet::Refusal {
                        revision,
                        error: error.clone(),
                    });
                }
                tracing::error!(
                    revision, error = %error,
                    "fleet revision refused: this member cannot take it and keeps revision {} (fix the document in etcd, e.g. lbctl fleet import -f FILE)",
                    self.revision
                );
                if let Some(p) = pending {
                    p.fail(e);
                }
            }
        }
    }

    /// This member's side of the fleet, if it is in one.
    pub(super) fn fleet_info(&mut self) -> Option<FleetInfo> {
        self.fleet.as_ref()?;
        let tables = self.fingerprints();
        let f = self.fleet.as_ref()?;
        Some(FleetInfo {
            settings: f.settings.clone(),
            link: f.link.lock().unwrap().clone(),
            revision: self.revision,
            tables,
            steering_revision: self.fsteer.view_revision,
            divergences: self.fsteer.divergences,
        })
    }

    /// Each VIP's table fingerprint ([`crate::fleet::fingerprint`]),
    /// worked out again only when a table was switched.
    pub(super) fn fingerprints(&mut self) -> BTreeMap<String, String> {
        let switched = self.dp.tables_switched();
        if let Some((at, prints)) = &self.fingerprints
            && *at == switched
        {
            return prints.clone();
        }
        let prints: BTreeMap<String, String> = self
            .config
            .vips
            .iter()
            .filter_map(|v| {
                let t = self.dp.table_addresses(&v.addr)?;
                Some((v.addr.to_string(), crate::fleet::fingerprint(&t)))
            })
            .collect();
        self.fingerprints = Some((switched, prints.clone()));
        prints
    }
}
