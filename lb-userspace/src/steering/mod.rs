//! Steering: from health-check results and load reports to the weight each
//! backend has in its VIP's Maglev table. Pure: the caller passes the time
//! in, so every rule here is tested without sleeping.
//!
//! A backend's table weight is `weight × level`, where `level` is in
//! `1..=FULL` (`FULL` when nothing holds it back). Scaling every backend by
//! the same `FULL` keeps the configured ratios exact, and gives load and slow
//! start 20 steps even for weights like 1.
//!
//! Load (see docs/load-aware-weights.md for the reasoning):
//! - pressure = max(queue / queue_limit, kv / kv_limit, utilization), from the
//!   node's latest report; a report older than `stale_after` (or its own
//!   `ttl`) counts as pressure 0, so the weight decays back to the base.
//! - smoothed: a rise is taken at once (falls fast), a drop is followed
//!   with time constant `recovery` (recovers slowly).
//! - factor = clamp(1 − smoothed, min_factor, 1): a node at its limits gets
//!   the floor, never zero on load alone.
//! - when every healthy backend with a load policy is saturated (smoothed
//!   pressure ≥ 1) the VIP falls back to base weights and is `saturated`.
//! - quantised to levels of 1/20 with hysteresis: the applied level moves
//!   only by two steps or more (or to the full level or the floor), and a
//!   VIP's table changes for load at most once per second.
//!
//! Health: `rise` successes in a row bring a backend up, `fall` failures
//! take it down; anything in between changes nothing, so a flapping backend
//! does not churn the table. A backend that comes back, or is added to a
//! running VIP, ramps up over the VIP's `slow_start`. When every backend of
//! a VIP is down the VIP's `on_all_down` policy decides: keep the last table
//! or drop.
//!
//! Submodules: [`probe`] runs health checks and load scrapes (async I/O,
//! HTTP through [`http`]),
//! [`engines`] reads an inference server's load from its metrics page,
//! [`promtext`] parses the Prometheus text format.

pub mod engines;
pub mod http;
pub mod probe;
pub mod promtext;

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    time::{Duration, Instant},
};

use crate::{
    desired::policy::{AllDownPolicy, LoadPolicy, SaturatedPolicy},
    desired::vip::{Vip, VipAddr},
};

/// Levels of a backend's weight: its table weight is `weight × level`.
pub const FULL: u32 = 20;
/// Least time between two load-driven table changes of one VIP.
pub const MIN_REBUILD_INTERVAL: Duration = Duration::from_secs(1);
/// Least-load counts the new flows sent to a backend over this window.
pub const SCORE_WINDOW: Duration = Duration::from_secs(1);
/// Smallest level change that load or slow start applies at once
/// (hysteresis).
pub const HYSTERESIS: u32 = 2;
/// How long a one-step level change must stay desired before it is
/// applied, so that the weights settle exactly without following wiggles.
pub const SETTLE: Duration = Duration::from_secs(5);

/// What the data plane should hold for one backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Target {
    /// Weight in the Maglev table (configured weight × level).
    pub weight: u32,
    /// Marked down: out of the table, established flows follow the VIP's
    /// `on_backend_down`.
    pub down: bool,
}

/// Where a load report came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LoadSource {
    /// Scraped from the node's Prometheus endpoint.
    Scrape,
    /// Pushed to the API.
    Push,
}

impl LoadSource {
    pub fn name(self) -> &'static str {
        match self {
            LoadSource::Scrape => "scrape",
            LoadSource::Push => "push",
        }
    }
}

/// A node's load at one moment. Values are validated before they get here:
/// finite, non-negative, `kv` at most 1.
#[derive(Clone, Debug, PartialEq)]
pub struct LoadReport {
    /// Requests waiting.
    pub queue: f64,
    /// Requests running, if reported.
    pub running: Option<f64>,
    /// KV-cache use, 0..=1, if reported.
    pub kv: Option<f64>,
    /// Utilization (ORCA `application_utilization`), 1 = saturated.
    pub utilization: Option<f64>,
    /// A count that grows while the node makes progress (the engine's
    /// token or forward-pass counters summed, ORCA
    /// `named_metrics.progress`), if reported: see `stall_after`.
    pub progress: Option<f64>,
    pub source: LoadSource,
    /// What reported it (an [`engines::Engine`] name, or `orca`).
    pub reporter: &'static str,
    pub at: Instant,
    /// How long the report counts, if the node said so.
    pub ttl: Option<Duration>,
}

/// A backend's health as the checks see it.
#[derive(Clone, Debug, PartialEq)]
pub struct Health {
    pub up: bool,
    ok_streak: u32,
    fail_streak: u32,
    /// Up/down changes since lbd started.
    pub transitions: u64,
    /// When the state last changed (or checks started).
    pub since: Instant,
    /// Why the last failed check failed.
    pub last_error: Option<String>,
}

impl Health {
    fn new(up: bool, now: Instant) -> Health {
        Health {
            up,
            ok_streak: 0,
            fail_streak: 0,
            transitions: 0,
            since: now,
            last_error: None,
        }
    }

    /// Records one check; returns the new state if it changed.
    fn record(&mut self, ok: bool, rise: u32, fall: u32, now: Instant) -> Option<bool> {
        if ok {
            self.ok_streak += 1;
            self.fail_streak = 0;
        } else {
            self.fail_streak += 1;
            self.ok_streak = 0;
        }
        let flip = if self.up {
            self.fail_streak >= fall
        } else {
            self.ok_streak >= rise
        };
        if !flip {
            return None;
        }
        self.up = !self.up;
        self.transitions += 1;
        self.since = now;
        self.ok_streak = 0;
        self.fail_streak = 0;
        Some(self.up)
    }
}

#[derive(Clone, Debug)]
struct BackendSteer {
    /// `None`: not checked, always up.
    health: Option<Health>,
    /// Its weight (0 while drained) and load policy, as of the last
    /// [`Steering::reconcile`]: read on every plan, resolved once.
    weight: u32,
    load: Option<LoadPolicy>,
    /// Pressure by the latest fresh report, the smoothed pressure and when
    /// it was last updated.
    raw: f64,
    smoothed: f64,
    updated: Option<Instant>,
    /// Applied level (see [`FULL`]).
    level: u32,
    /// Slow start began here.
    ramp_from: Option<Instant>,
    /// A desired level one step from the applied one, and since when it has
    /// been desired: applied once it has settled (see [`SETTLE`]).
    pending: Option<(u32, Instant)>,
    /// Work and no progress for its `stall_after`: out of the table (as a
    /// health failure), since then.
    stalled: Option<Instant>,
    /// Times it became stalled or stopped being stalled.
    stall_transitions: u64,
}

impl BackendSteer {
    /// Up by its health check, or not checked.
    fn up(&self) -> bool {
        self.health.as_ref().is_none_or(|h| h.up)
    }

    /// May take new flows: up, not stalled, with weight.
    fn eligible(&self) -> bool {
        self.weight > 0 && self.up() && self.stalled.is_none()
    }
}

/// A node's latest load report, and how long it has had work without
/// progress.
#[derive(Clone, Debug)]
struct Node {
    report: LoadReport,
    /// The first of the latest run of reports that all showed work and the
    /// same progress count (`None`: no work, the count moved, or the node
    /// reports no progress count).
    still_since: Option<Instant>,
}

impl Node {
    /// Whether the report still counts.
    fn fresh(&self, now: Instant, policy: &LoadPolicy) -> bool {
        now.saturating_duration_since(self.report.at)
            <= self.report.ttl.unwrap_or(policy.stale_after)
    }

    /// How long its reports have shown work and the same progress count.
    fn still_for(&self) -> Option<Duration> {
        self.still_since
            .map(|t| self.report.at.saturating_duration_since(t))
    }

    fn pressure(&self, policy: &LoadPolicy) -> f64 {
        let r = &self.report;
        let mut p = r.queue / policy.queue_limit;
        if let Some(kv) = r.kv {
            p = p.max(kv / policy.kv_limit);
        }
        if let Some(u) = r.utilization {
            p = p.max(u);
        }
        p
    }
}

/// A backend that became stalled or stopped being stalled, for the log and
/// the counters.
#[derive(Clone, Debug, PartialEq)]
pub struct StallChange {
    pub backend: IpAddr,
    pub stalled: bool,
    /// The report that decided it.
    pub queue: f64,
    pub running: Option<f64>,
    /// How long it had work without progress (when it became stalled).
    pub still_for: Duration,
}

#[derive(Clone, Debug, Default)]
struct VipSteer {
    backends: BTreeMap<IpAddr, BackendSteer>,
    saturated: bool,
    all_down: bool,
    /// Share of new connections the data plane sheds (`on_saturated = "shed"`).
    shed: f64,
    /// The pool's pressure while it sheds.
    pool_pressure: f64,
    last_change: Option<Instant>,
    applied: Option<BTreeMap<IpAddr, Target>>,
    /// Stall changes not yet taken by [`Steering::take_stall_changes`].
    stall_changes: Vec<StallChange>,
    /// Least-load: samples of each backend's new-flow counter, oldest first.
    flow_samples: std::collections::VecDeque<(Instant, BTreeMap<IpAddr, u64>)>,
    /// Least-load: the scores last handed out.
    scores: BTreeMap<IpAddr, u32>,
}

/// A backend as steering sees it, for views (API, metrics, `lbctl`).
#[derive(Clone, Debug, PartialEq)]
pub struct BackendView {
    /// `None`: not health-checked.
    pub health: Option<Health>,
    /// The node's latest load report (also when stale).
    pub load: Option<LoadReport>,
    /// Smoothed pressure; `None` without a load policy.
    pub pressure: Option<f64>,
    /// Share of its weight the backend gets: level / FULL (load and slow
    /// start together).
    pub factor: f64,
    /// Whether it is ramping up (slow start).
    pub ramping: bool,
    /// Its least-load score, for VIPs with that scheduler.
    pub score: Option<u32>,
    /// Stalled (out of the table) since then.
    pub stalled: Option<Instant>,
    /// Times it became stalled or stopped being stalled.
    pub stall_transitions: u64,
    /// How long its reports have shown work and no progress.
    pub still_for: Option<Duration>,
}

/// A VIP as steering sees it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct VipView {
    /// Every healthy backend is saturated: base weights are in use.
    pub saturated: bool,
    /// Every backend is down.
    pub all_down: bool,
    /// Share of new connections shed (0 unless `on_saturated = "shed"`
    /// and the pool is past its limits), see [`shed_share`].
    pub shed: f64,
    /// The pool's pressure that share follows (0 while not shedding).
    pub pool_pressure: f64,
}

/// What changed a VIP's targets, for the log.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub targets: BTreeMap<IpAddr, Target>,
    /// Per backend whose level changed: (old factor, new factor).
    pub factors: Vec<(IpAddr, f64, f64)>,
    /// The backends whose target differs from what was applied before.
    pub moved: Vec<IpAddr>,
}

/// The most of a VIP's new connections shedding drops: a tenth always
/// reaches the pool, so its load reports keep telling how it copes, and a
/// client's retransmitted SYNs get through (each is drawn anew).
pub const MAX_SHED: f64 = 0.9;

/// The share of new connections a saturated VIP with
/// `on_saturated = "shed"` drops, for a pool pressure `p` (the
/// weight-weighted mean of its backends' pressures, every one at least 1):
/// `min(1 − 1/p, MAX_SHED)`, rounded down to a percent. Admitting `1/p` of
/// the new connections is what brings arrivals that fill queues `p` times
/// their limits back to the limits; 0 at `p = 1` (at the limits, nothing
/// to hold back yet), a half at `p = 2`, three quarters at `p = 4`.
pub fn shed_share(p: f64) -> f64 {
    if p.is_nan() || p <= 1.0 {
        return 0.0;
    }
    ((1.0 - 1.0 / p) * 100.0).floor().min(MAX_SHED * 100.0) / 100.0
}

/// Health checks and load reports of every VIP's backends.
#[derive(Clone, Default)]
pub struct Steering {
    vips: BTreeMap<VipAddr, VipSteer>,
    nodes: HashMap<IpAddr, Node>,
    /// Nodes whose last report went stale (counted once per report).
    stale_nodes: std::collections::HashSet<IpAddr>,
    /// Reports that went stale before a newer one came, by source.
    stale_reports: BTreeMap<LoadSource, u64>,
    started: bool,
}

impl Steering {
    pub fn new() -> Steering {
        Steering::default()
    }

    /// Brings the state in line with `vips`: VIPs and backends that are gone
    /// are forgotten, new ones start up (health checks assume up, or
    /// `pinned_down` says what the previous lbd had), and backends added to
    /// a running VIP start their slow start. The first call (start-up)
    /// starts no ramp. Each backend's weight and load policy are resolved
    /// here, once per config.
    pub fn reconcile(
        &mut self,
        vips: &[Vip],
        now: Instant,
        pinned_down: impl Fn(&VipAddr, IpAddr) -> bool,
    ) {
        self.vips.retain(|a, _| vips.iter().any(|v| v.addr == *a));
        for vip in vips {
            let known = self.vips.contains_key(&vip.addr) && self.started;
            let state = self.vips.entry(vip.addr).or_default();
            state
                .backends
                .retain(|a, _| vip.backends.iter().any(|b| b.addr == *a));
            for b in &vip.backends {
                let checked = vip.health_check(b).is_some();
                let s = state
                    .backends
                    .entry(b.addr)
                    .or_insert_with(|| BackendSteer {
                        health: None,
                        weight: 0,
                        load: None,
                        raw: 0.0,
                        smoothed: 0.0,
                        updated: None,
                        level: FULL,
                        ramp_from: (known && !vip.slow_start.is_zero()).then_some(now),
                        pending: None,
                        stalled: None,
                        stall_transitions: 0,
                    });
                s.weight = b.effective_weight();
                s.load = vip.load_policy(b);
                if s.load.is_none() {
                    s.stalled = None;
                }
                match (checked, &s.health) {
                    (true, None) => {
                        s.health = Some(Health::new(!pinned_down(&vip.addr, b.addr), now))
                    }
                    (false, Some(_)) => s.health = None,
                    _ => {}
                }
            }
        }
        let addrs: std::collections::HashSet<IpAddr> = vips
            .iter()
            .flat_map(|v| v.backends.iter().map(|b| b.addr))
            .collect();
        self.nodes.retain(|a, _| addrs.contains(a));
        self.started = true;
    }

    /// Records one health check of `backend` in `vip`; returns the new state
    /// if the backend went up or down. A backend coming back starts its slow
    /// start.
    pub fn health_result(
        &mut self,
        vip: &Vip,
        backend: IpAddr,
        result: Result<(), String>,
        now: Instant,
    ) -> Option<bool> {
        let b = vip.backends.iter().find(|b| b.addr == backend)?;
        let check = vip.health_check(b)?;
        let s = self.vips.get_mut(&vip.addr)?.backends.get_mut(&backend)?;
        let h = s.health.as_mut()?;
        let ok = result.is_ok();
        if let Err(e) = result {
            h.last_error = Some(e);
        }
        let changed = h.record(ok, check.rise, check.fall, now);
        if changed == Some(true) && !vip.slow_start.is_zero() {
            s.ramp_from = Some(now);
        }
        changed
    }

    /// Records a node's load (for every VIP it is a backend of), and
    /// whether it made progress since its previous report: a report with
    /// work (requests waiting or running) and the same progress count as
    /// the one before continues a run of still reports; any other ends it.
    ///
    /// Returns whether the report may change a steering decision: its
    /// node's first, one after a stale one, one whose queue, KV-cache use
    /// or utilization differ from the previous report's, or one in (or
    /// ending) a run of still reports. A report like the one before changes
    /// nothing a plan would not also find at the next tick.
    pub fn load_report(&mut self, node: IpAddr, report: LoadReport) -> bool {
        let work = report.queue + report.running.unwrap_or(0.0) > 0.0;
        let prev = self.nodes.get(&node);
        let still_since = match (prev, report.progress) {
            (Some(prev), Some(p)) if work && prev.report.progress == Some(p) => {
                Some(prev.still_since.unwrap_or(prev.report.at))
            }
            _ => None,
        };
        let matters = self.stale_nodes.remove(&node)
            || still_since.is_some()
            || prev.is_none_or(|p| {
                p.still_since.is_some()
                    || (p.report.queue, p.report.kv, p.report.utilization)
                        != (report.queue, report.kv, report.utilization)
            });
        self.nodes.insert(
            node,
            Node {
                report,
                still_since,
            },
        );
        matters
    }

    /// Load reports that went stale (their node sent no newer one in
    /// time), by source.
    pub fn stale_reports(&self) -> &BTreeMap<LoadSource, u64> {
        &self.stale_reports
    }

    /// Whether `node` is a backend of any VIP.
    pub fn knows(&self, node: IpAddr) -> bool {
        self.vips.values().any(|v| v.backends.contains_key(&node))
    }

    /// Whether a report of `node` just recorded should be steered at once
    /// in `vip`: unless the rate limit holds a load change back anyway (the
    /// tick applies it once the limit allows), or the report may start or
    /// end a stall, or the VIP is saturated (its shed share follows every
    /// report).
    pub fn react_due(&self, vip: &VipAddr, node: IpAddr, now: Instant) -> bool {
        let Some(state) = self.vips.get(vip) else {
            return false;
        };
        !self.rate_limited(vip, now)
            || state.saturated
            || state.shed > 0.0
            || state.backends.get(&node).is_some_and(|b| {
                // A stall that would start or end with this report.
                let still = self.nodes.get(&node).and_then(Node::still_for);
                let stalls = b.load.as_ref().is_some_and(|p| {
                    !p.stall_after.is_zero() && still.is_some_and(|d| d >= p.stall_after)
                });
                stalls != b.stalled.is_some()
            })
    }

    /// Whether `vip`'s table changed for load less than
    /// [`MIN_REBUILD_INTERVAL`] ago: a load change would wait.
    pub fn rate_limited(&self, vip: &VipAddr, now: Instant) -> bool {
        self.vips
            .get(vip)
            .and_then(|s| s.last_change)
            .is_some_and(|t| now.saturating_duration_since(t) < MIN_REBUILD_INTERVAL)
    }

    /// The targets `vip` should have now, if they differ from what was
    /// applied and may be applied now: health, stall and config changes at
    /// once, load and slow-start changes at most once per
    /// [`MIN_REBUILD_INTERVAL`]. `force` (a config change) always returns
    /// the plan. Call [`Steering::applied`] once the data plane holds it.
    /// The VIP's shed share ([`VipView::shed`]) and stall changes
    /// ([`Steering::take_stall_changes`]) are updated whether or not there
    /// is a plan.
    pub fn plan(&mut self, vip: &Vip, now: Instant, force: bool) -> Option<Plan> {
        let state = self.vips.get_mut(&vip.addr)?;
        let nodes = &self.nodes;
        // Pressure and stalls, per backend with a load policy.
        for (addr, s) in state.backends.iter_mut() {
            let Some(policy) = &s.load else {
                continue;
            };
            let node = nodes.get(addr);
            let fresh = node.filter(|n| n.fresh(now, policy));
            if let Some(n) = node
                && fresh.is_none()
                && self.stale_nodes.insert(*addr)
            {
                // Just went stale: counted once, then ignored.
                *self.stale_reports.entry(n.report.source).or_default() += 1;
            }
            let raw = fresh.map_or(0.0, |n| n.pressure(policy));
            let dt = s
                .updated
                .map_or(Duration::ZERO, |t| now.saturating_duration_since(t));
            s.smoothed = if raw >= s.smoothed || policy.recovery.is_zero() {
                raw
            } else {
                let k = 1.0 - (-dt.as_secs_f64() / policy.recovery.as_secs_f64()).exp();
                s.smoothed + (raw - s.smoothed) * k
            };
            s.raw = raw;
            s.updated = Some(now);
            // A stale report says nothing about progress either.
            let still = fresh.and_then(Node::still_for);
            let stalled =
                !policy.stall_after.is_zero() && still.is_some_and(|d| d >= policy.stall_after);
            if stalled != s.stalled.is_some() {
                s.stalled = stalled.then_some(now);
                s.stall_transitions += 1;
                let r = node.map(|n| &n.report);
                state.stall_changes.push(StallChange {
                    backend: *addr,
                    stalled,
                    queue: r.map_or(0.0, |r| r.queue),
                    running: r.and_then(|r| r.running),
                    still_for: still.unwrap_or_default(),
                });
            }
        }
        // The pool: saturated by smoothed pressure (base weights), shedding
        // by the latest reports (it starts and stops with the report that
        // shows it).
        let (mut eligible, mut loaded, mut saturated, mut over) = (0, 0, true, true);
        let (mut weighted, mut weights) = (0.0, 0.0);
        for s in state.backends.values().filter(|s| s.eligible()) {
            eligible += 1;
            if s.load.is_some() {
                loaded += 1;
                saturated &= s.smoothed >= 1.0;
                over &= s.raw >= 1.0;
                weighted += s.raw * f64::from(s.weight);
                weights += f64::from(s.weight);
            }
        }
        let saturated = loaded > 0 && loaded == eligible && saturated;
        state.saturated = saturated;
        (state.shed, state.pool_pressure) =
            if saturated && over && vip.on_saturated() == SaturatedPolicy::Shed {
                let p = weighted / weights;
                (shed_share(p), p)
            } else {
                (0.0, 0.0)
            };
        let any_weight = state.backends.values().any(|s| s.weight > 0);
        state.all_down = any_weight && eligible == 0;
        let keep_all = state.all_down && vip.on_all_down == AllDownPolicy::KeepLast;

        let mut targets = BTreeMap::new();
        let mut levels = Vec::with_capacity(state.backends.len());
        for (addr, s) in state.backends.iter_mut() {
            let down = !s.up();
            let mut factor = 1.0;
            if let Some(policy) = &s.load
                && !saturated
            {
                factor = (1.0 - s.smoothed).clamp(policy.min_factor, 1.0);
            }
            if let Some(from) = s.ramp_from {
                let done = now.saturating_duration_since(from).as_secs_f64()
                    / vip.slow_start.as_secs_f64().max(f64::MIN_POSITIVE);
                if done >= 1.0 || down {
                    s.ramp_from = None;
                } else {
                    factor *= done.max(1.0 / f64::from(FULL));
                }
            }
            let desired = ((factor * f64::from(FULL)).round() as u32).clamp(1, FULL);
            let floor = s.load.as_ref().map_or(1, |p| {
                ((p.min_factor * f64::from(FULL)).round() as u32).max(1)
            });
            if desired.abs_diff(s.level) != 1 {
                s.pending = None;
            } else if s.pending.is_none_or(|(l, _)| l != desired) {
                s.pending = Some((desired, now));
            }
            let settled = s
                .pending
                .is_some_and(|(_, since)| now.saturating_duration_since(since) >= SETTLE);
            let level = if desired.abs_diff(s.level) >= HYSTERESIS
                || (desired != s.level && (desired == FULL || desired <= floor || settled))
            {
                desired
            } else {
                s.level
            };
            levels.push((*addr, level));
            // A stalled backend leaves the table but is not down: its
            // established flows stay where they are.
            let in_table = s.stalled.is_none() || (keep_all && force);
            targets.insert(
                *addr,
                Target {
                    weight: if in_table { s.weight * level } else { 0 },
                    down: down && !(keep_all && force),
                },
            );
        }
        // Health and stall changes are applied at once; config changes
        // come forced.
        let urgent = force
            || state.applied.as_ref().is_none_or(|applied| {
                applied.len() != targets.len()
                    || targets.iter().any(|(a, t)| {
                        applied
                            .get(a)
                            .is_none_or(|p| (p.down, p.weight == 0) != (t.down, t.weight == 0))
                    })
            });
        if keep_all && state.applied.is_some() && !force {
            // Keep the table of the backends last known good.
            return None;
        }
        if state.applied.as_ref() == Some(&targets) && !force {
            return None;
        }
        let rate_ok = state
            .last_change
            .is_none_or(|t| now.saturating_duration_since(t) >= MIN_REBUILD_INTERVAL);
        if !urgent && !rate_ok {
            return None;
        }
        let moved = targets
            .iter()
            .filter(|(a, t)| {
                state
                    .applied
                    .as_ref()
                    .is_none_or(|applied| applied.get(*a) != Some(*t))
            })
            .map(|(a, _)| *a)
            .collect();
        let mut factors = Vec::new();
        // The levels are committed with the plan (the caller applies it).
        for (addr, level) in levels {
            if let Some(s) = state.backends.get_mut(&addr)
                && s.level != level
            {
                factors.push((
                    addr,
                    f64::from(s.level) / f64::from(FULL),
                    f64::from(level) / f64::from(FULL),
                ));
                s.level = level;
            }
        }
        Some(Plan {
            targets,
            factors,
            moved,
        })
    }

    /// The stall changes of `vip`'s backends since the last call.
    pub fn take_stall_changes(&mut self, vip: &VipAddr) -> Vec<StallChange> {
        self.vips
            .get_mut(vip)
            .map(|s| std::mem::take(&mut s.stall_changes))
            .unwrap_or_default()
    }

    /// Least-load scores of `vip`'s backends that changed since the last
    /// call, from `flows` (each backend's new-flow counter now) and the
    /// nodes' load reports:
    ///
    /// `score = 1000 × (reported + recent) / weight`, where `reported` is
    /// the node's requests waiting plus running from a fresh report (0
    /// without one) and `recent` the new flows sent to it in the last
    /// [`SCORE_WINDOW`]: what it has, plus what is on its way and not yet in
    /// a report. Lower is less loaded; backends out of the table get none.
    pub fn scores(
        &mut self,
        vip: &Vip,
        now: Instant,
        flows: BTreeMap<IpAddr, u64>,
    ) -> BTreeMap<IpAddr, u32> {
        let Some(state) = self.vips.get_mut(&vip.addr) else {
            return BTreeMap::new();
        };
        state.flow_samples.push_back((now, flows));
        while state
            .flow_samples
            .get(1)
            .is_some_and(|(t, _)| now.saturating_duration_since(*t) >= SCORE_WINDOW)
        {
            state.flow_samples.pop_front();
        }
        let (oldest, newest) = (
            &state.flow_samples[0].1,
            &state.flow_samples[state.flow_samples.len() - 1].1,
        );
        let mut changed = BTreeMap::new();
        for (addr, s) in &state.backends {
            if s.weight == 0 {
                continue;
            }
            let recent = newest
                .get(addr)
                .zip(oldest.get(addr))
                .map_or(0, |(n, o)| n.saturating_sub(*o)) as f64;
            let reported = match (&s.load, self.nodes.get(addr)) {
                (Some(policy), Some(n)) if n.fresh(now, policy) => {
                    n.report.queue + n.report.running.unwrap_or(0.0)
                }
                _ => 0.0,
            };
            let score = (1000.0 * (reported + recent) / f64::from(s.weight))
                .min(f64::from(u32::MAX)) as u32;
            if state.scores.get(addr) != Some(&score) {
                state.scores.insert(*addr, score);
                changed.insert(*addr, score);
            }
        }
        changed
    }

    /// Forgets the scores handed out, so the next [`Steering::scores`]
    /// returns every one (after the data plane reset some).
    pub fn forget_scores(&mut self) {
        for v in self.vips.values_mut() {
            v.scores.clear();
        }
    }

    /// Takes `targets` (what another balancer decided: the fleet's last
    /// steering view) as applied for `vip`: each backend's level from its
    /// target weight, so that a new steering leader goes on from the old
    /// one's weights (hysteresis and settling from there) instead of from
    /// full weights.
    pub fn adopt(&mut self, vip: &VipAddr, targets: &BTreeMap<IpAddr, Target>, now: Instant) {
        let Some(state) = self.vips.get_mut(vip) else {
            return;
        };
        for (addr, s) in state.backends.iter_mut() {
            if let Some(t) = targets.get(addr)
                && s.weight > 0
                && t.weight > 0
            {
                s.level = (t.weight / s.weight).clamp(1, FULL);
                s.pending = None;
            }
        }
        state.applied = Some(targets.clone());
        state.last_change = Some(now);
    }

    /// Records that the data plane holds `plan` for `vip` since `now`.
    pub fn applied(&mut self, vip: &VipAddr, plan: &Plan, now: Instant) {
        if let Some(state) = self.vips.get_mut(vip) {
            state.applied = Some(plan.targets.clone());
            state.last_change = Some(now);
        }
    }

    /// The view of `backend` in `vip`.
    pub fn backend_view(&self, vip: &Vip, backend: IpAddr) -> Option<BackendView> {
        let state = self.vips.get(&vip.addr)?;
        let s = state.backends.get(&backend)?;
        let node = self.nodes.get(&backend);
        Some(BackendView {
            health: s.health.clone(),
            load: node.map(|n| n.report.clone()),
            pressure: s.load.as_ref().map(|_| s.smoothed),
            factor: f64::from(s.level) / f64::from(FULL),
            ramping: s.ramp_from.is_some(),
            score: state.scores.get(&backend).copied(),
            stalled: s.stalled,
            stall_transitions: s.stall_transitions,
            still_for: node.and_then(Node::still_for),
        })
    }

    /// How many of `vip`'s backends are healthy: up by their health check
    /// (or not checked) and not stalled. Drained backends count (they
    /// still serve their flows).
    pub fn healthy_backends(&self, vip: &Vip) -> usize {
        let state = self.vips.get(&vip.addr);
        vip.backends
            .iter()
            .filter(|b| {
                state
                    .and_then(|s| s.backends.get(&b.addr))
                    .is_none_or(|s| s.up() && s.stalled.is_none())
            })
            .count()
    }

    /// The view of `vip`.
    pub fn vip_view(&self, vip: &VipAddr) -> VipView {
        self.vips
            .get(vip)
            .map(|s| VipView {
                saturated: s.saturated,
                all_down: s.all_down,
                shed: s.shed,
                pool_pressure: s.pool_pressure,
            })
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desired::config;

    fn vip(extra: &str, backends: usize) -> Vip {
        let list: Vec<String> = (1..=backends)
            .map(|i| format!("{{ address = \"10.0.0.{i}\", weight = 1 }}"))
            .collect();
        let text = format!(
            "[balancer]\nsource_v4 = \"10.0.0.254\"\n[[vip]]\naddress = \"203.0.113.1\"\nport = 80\nprotocol = \"tcp\"\nbackends = [{}]\n{extra}",
            list.join(", ")
        );
        config::parse(&text, "t").unwrap().vips.remove(0)
    }

    fn addr(i: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, i])
    }

    fn report(queue: f64, at: Instant) -> LoadReport {
        LoadReport {
            queue,
            running: None,
            kv: None,
            utilization: None,
            progress: None,
            source: LoadSource::Push,
            reporter: "test",
            at,
            ttl: None,
        }
    }

    /// Plans and applies; returns the plan's targets if there was one.
    fn step(s: &mut Steering, v: &Vip, now: Instant) -> Option<BTreeMap<IpAddr, Target>> {
        let plan = s.plan(v, now, false)?;
        s.applied(&v.addr, &plan, now);
        Some(plan.targets)
    }

    fn start(v: &Vip, now: Instant) -> Steering {
        let mut s = Steering::new();
        s.reconcile(std::slice::from_ref(v), now, |_, _| false);
        let plan = s.plan(v, now, true).unwrap();
        s.applied(&v.addr, &plan, now);
        s
    }

    fn weights(t: &BTreeMap<IpAddr, Target>) -> Vec<u32> {
        t.values()
            .map(|t| if t.down { 0 } else { t.weight })
            .collect()
    }

    const HEALTH: &str = "[vip.health]\ncheck = \"tcp\"\ninterval = 1\nrise = 2\nfall = 3\n";

    #[test]
    fn a_backend_goes_down_after_fall_failures_and_up_after_rise_successes() {
        let v = vip(HEALTH, 3);
        let t0 = Instant::now();
        let mut s = start(&v, t0);
        let fail = || Err("connection refused".to_string());
        let mut now = t0;
        for i in 0..3 {
            now += Duration::from_secs(1);
            let changed = s.health_result(&v, addr(2), fail(), now);
            assert_eq!(changed, (i == 2).then_some(false), "check {i}");
        }
        // Applied at once, even right after a change (health is urgent).
        let t = step(&mut s, &v, now).expect("the down backend leaves the table");
        assert!(t[&addr(2)].down);
        assert_eq!(
            s.backend_view(&v, addr(2))
                .unwrap()
                .health
                .unwrap()
                .last_error
                .as_deref(),
            Some("connection refused")
        );
        now += Duration::from_secs(1);
        assert_eq!(s.health_result(&v, addr(2), Ok(()), now), None);
        now += Duration::from_secs(1);
        assert_eq!(s.health_result(&v, addr(2), Ok(()), now), Some(true));
        let t = step(&mut s, &v, now).unwrap();
        assert!(!t[&addr(2)].down);
        assert_eq!(
            s.backend_view(&v, addr(2))
                .unwrap()
                .health
                .unwrap()
                .transitions,
            2
        );
    }

    #[test]
    fn a_flapping_backend_changes_nothing() {
        let v = vip(HEALTH, 3);
        let t0 = Instant::now();
        let mut s = start(&v, t0);
        for i in 0..100 {
            let now = t0 + Duration::from_secs(i);
            let result = if i % 2 == 0 {
                Err("refused".into())
            } else {
                Ok(())
            };
            assert_eq!(s.health_result(&v, addr(1), result, now), None);
            assert_eq!(step(&mut s, &v, now), None, "no table change at {i}");
        }
    }

    const LOAD: &str =
        "[vip.load]\nqueue_limit = 5\nkv_limit = 0.8\nrecovery = 2\nstale_after = 10\n";

    #[test]
    fn a_loaded_node_drops_to_the_floor_and_recovers_slowly() {
        let v = vip(LOAD, 4);
        let t0 = Instant::now();
        let mut s = start(&v, t0);
        let now = t0 + Duration::from_secs(1);
        for i in 1..=4 {
            s.load_report(addr(i), report(if i == 4 { 10.0 } else { 1.0 }, now));
        }
        let t = step(&mut s, &v, now).expect("load changes the weights");
        // Pressure 0.2 → factor 0.8 (level 16); 2.0 → the floor 0.05 (level 1).
        assert_eq!(weights(&t), [16, 16, 16, 1]);
        let share = 1.0 / (3.0 * 16.0 + 1.0);
        assert!(share < 0.1, "the loaded node's share {share}");
        // Its queue drains: the weight comes back with the recovery time
        // constant, at most one table change a second.
        s.load_report(addr(4), report(1.0, now));
        let mut last = 1;
        let mut changes = 0;
        for ms in (100..=30_000).step_by(100) {
            let at = now + Duration::from_millis(ms);
            for i in 1..=4 {
                s.load_report(addr(i), report(1.0, at));
            }
            if let Some(t) = step(&mut s, &v, at) {
                let w = t[&addr(4)].weight;
                assert!(
                    w >= last,
                    "recovers monotonically: {last} -> {w} at {ms} ms"
                );
                assert!(
                    w - last >= HYSTERESIS || w == 16,
                    "hysteresis: {last} -> {w}"
                );
                last = w;
                changes += 1;
            }
        }
        assert_eq!(last, 16, "back to the others' weight");
        assert!(changes <= 12, "{changes} changes");
    }

    #[test]
    fn small_wiggles_do_not_rebuild() {
        let v = vip(LOAD, 2);
        let t0 = Instant::now();
        let mut s = start(&v, t0);
        s.load_report(addr(1), report(1.5, t0));
        s.load_report(addr(2), report(1.5, t0));
        let first = step(&mut s, &v, t0 + Duration::from_secs(1));
        assert!(first.is_some(), "0.3 pressure: level 14");
        for i in 2..60 {
            let now = t0 + Duration::from_secs(i);
            // Pressure 0.26 / 0.34: levels 15 / 13 around the applied 14.
            let q = if i % 2 == 0 { 1.7 } else { 1.3 };
            s.load_report(addr(1), report(q, now));
            s.load_report(addr(2), report(q, now));
            assert_eq!(step(&mut s, &v, now), None, "wiggle at {i} s");
        }
    }

    #[test]
    fn stale_reports_decay_to_base_weights() {
        let v = vip(LOAD, 2);
        let t0 = Instant::now();
        let mut s = start(&v, t0);
        s.load_report(addr(1), report(10.0, t0));
        let t = step(&mut s, &v, t0 + Duration::from_secs(1)).unwrap();
        assert_eq!(weights(&t), [1, 20]);
        // No new report: after stale_after (10 s) it counts as no load and
        // recovers with the 2 s time constant.
        let t = step(&mut s, &v, t0 + Duration::from_secs(5));
        assert_eq!(t, None, "still fresh");
        let mut last = None;
        for i in 11..40 {
            if let Some(t) = step(&mut s, &v, t0 + Duration::from_secs(i)) {
                last = Some(weights(&t));
            }
        }
        assert_eq!(last, Some(vec![20, 20]));
        assert_eq!(
            s.stale_reports().get(&LoadSource::Push),
            Some(&1),
            "counted once"
        );
    }

    #[test]
    fn all_saturated_falls_back_to_base_weights_and_says_so() {
        let v = vip(LOAD, 3);
        let t0 = Instant::now();
        let mut s = start(&v, t0);
        for i in 1..=3 {
            s.load_report(addr(i), report(8.0 + f64::from(i), t0));
        }
        assert_eq!(step(&mut s, &v, t0), None, "base weights, as before");
        assert!(s.vip_view(&v.addr).saturated);
        // One node recovers: it is not saturated any more, the others are.
        let now = t0 + Duration::from_secs(1);
        s.load_report(addr(1), report(0.0, now));
        s.load_report(addr(2), report(9.0, now));
        s.load_report(addr(3), report(9.0, now));
        let recovery = Duration::from_secs(2);
        let later = now + recovery * 10;
        for i in 1..=3 {
            s.load_report(addr(i), report(if i == 1 { 0.0 } else { 9.0 }, later));
        }
        step(&mut s, &v, now);
        let t = step(&mut s, &v, later).unwrap();
        assert!(!s.vip_view(&v.addr).saturated);
        assert_eq!(weights(&t), [20, 1, 1]);
    }

    #[test]
    fn a_new_or_recovered_backend_ramps_up_but_not_at_start_up() {
        let v = vip(&format!("slow_start = 10\n{HEALTH}"), 2);
        let t0 = Instant::now();
        let mut s = start(&v, t0);
        assert_eq!(step(&mut s, &v, t0), None, "start-up: full weights at once");
        let mut v2 = v.clone();
        v2.backends
            .push(crate::desired::vip::Backend::new(addr(3), 1));
        s.reconcile(std::slice::from_ref(&v2), t0, |_, _| false);
        let t = s.plan(&v2, t0, true).unwrap();
        s.applied(&v2.addr, &t, t0);
        assert_eq!(weights(&t.targets), [20, 20, 1], "the new one starts low");
        let mut seen = vec![1];
        for ms in (500..=12_000).step_by(500) {
            let now = t0 + Duration::from_millis(ms);
            if let Some(t) = step(&mut s, &v2, now) {
                seen.push(t[&addr(3)].weight);
            }
        }
        assert_eq!(seen.last(), Some(&20));
        assert!(seen.windows(2).all(|w| w[0] < w[1]), "{seen:?}");
        assert!(seen.len() >= 5, "ramps in steps: {seen:?}");
    }

    #[test]
    fn least_load_scores_count_reports_and_recent_flows_per_weight() {
        let mut v = vip(
            "scheduler = \"least-load\"\n[vip.load]\nstale_after = 10\n",
            3,
        );
        v.backends[2].weight = 2;
        let t0 = Instant::now();
        let mut s = start(&v, t0);
        let flows =
            |a: u64, b: u64, c: u64| BTreeMap::from([(addr(1), a), (addr(2), b), (addr(3), c)]);
        assert_eq!(
            s.scores(&v, t0, flows(0, 0, 0)),
            BTreeMap::from([(addr(1), 0), (addr(2), 0), (addr(3), 0)])
        );
        s.load_report(
            addr(1),
            LoadReport {
                running: Some(3.0),
                ..report(2.0, t0)
            },
        );
        let t1 = t0 + Duration::from_millis(500);
        // b1: 2 waiting + 3 running; b2: 10 new flows in the window; b3: 10
        // new flows at weight 2.
        let got = s.scores(&v, t1, flows(0, 10, 10));
        assert_eq!(
            got,
            BTreeMap::from([(addr(1), 5000), (addr(2), 10000), (addr(3), 5000)])
        );
        assert_eq!(
            s.scores(&v, t1, flows(0, 10, 10)),
            BTreeMap::new(),
            "only changes"
        );
        // A second later the flows are out of the window; the report is
        // still fresh.
        let t2 = t1 + Duration::from_millis(1500);
        let got = s.scores(&v, t2, flows(0, 10, 10));
        assert_eq!(got, BTreeMap::from([(addr(2), 0), (addr(3), 0)]));
        // Stale: the report no longer counts.
        let got = s.scores(&v, t0 + Duration::from_secs(11), flows(0, 10, 10));
        assert_eq!(got, BTreeMap::from([(addr(1), 0)]));
    }

    #[test]
    fn all_down_keeps_the_last_table_or_drops() {
        for (policy, keeps) in [("keep_last", true), ("drop", false)] {
            let v = vip(&format!("on_all_down = \"{policy}\"\n{HEALTH}"), 2);
            let t0 = Instant::now();
            let mut s = start(&v, t0);
            let mut now = t0;
            for b in [1, 2] {
                for _ in 0..3 {
                    now += Duration::from_secs(1);
                    s.health_result(&v, addr(b), Err("refused".into()), now);
                }
                let t = step(&mut s, &v, now);
                if b == 1 {
                    assert_eq!(weights(&t.unwrap()), [0, 20], "{policy}");
                } else if keeps {
                    assert_eq!(t, None, "keep_last: backend 2 stays in the table");
                } else {
                    assert_eq!(weights(&t.unwrap()), [0, 0], "drop: empty table");
                }
            }
            assert!(s.vip_view(&v.addr).all_down, "{policy}");
        }
    }

    fn working(progress: f64, at: Instant) -> LoadReport {
        LoadReport {
            running: Some(4.0),
            progress: Some(progress),
            ..report(1.0, at)
        }
    }

    #[test]
    fn a_node_with_work_and_no_progress_is_stalled_and_returns_when_it_moves() {
        let v = vip(&format!("{LOAD}stall_after = 5\n"), 3);
        let t0 = Instant::now();
        let mut s = start(&v, t0);
        let mut now = t0;
        // Node 1 makes progress; node 2 has work and a frozen counter;
        // node 3 is idle with a frozen counter.
        for i in 0..=6 {
            now = t0 + Duration::from_secs(i);
            s.load_report(addr(1), working(100.0 * i as f64, now));
            s.load_report(addr(2), working(7.0, now));
            s.load_report(
                addr(3),
                LoadReport {
                    running: Some(0.0),
                    progress: Some(7.0),
                    ..report(0.0, now)
                },
            );
            let t = step(&mut s, &v, now);
            if i < 5 {
                assert!(
                    s.backend_view(&v, addr(2)).unwrap().stalled.is_none(),
                    "not yet at {i} s"
                );
            } else if i == 5 {
                let t = t.expect("a stall is applied at once");
                assert_eq!(t[&addr(2)].weight, 0, "out of the table");
                assert!(!t[&addr(2)].down, "not down: its flows stay");
            }
        }
        let b2 = s.backend_view(&v, addr(2)).unwrap();
        assert!(b2.stalled.is_some());
        assert_eq!(b2.still_for, Some(Duration::from_secs(6)));
        assert!(
            s.backend_view(&v, addr(3)).unwrap().stalled.is_none(),
            "idle is never stalled"
        );
        assert!(s.backend_view(&v, addr(1)).unwrap().stalled.is_none());
        assert_eq!(s.healthy_backends(&v), 2);
        let changes = s.take_stall_changes(&v.addr);
        assert_eq!(changes.len(), 1, "{changes:?}");
        assert!(changes[0].stalled && changes[0].backend == addr(2));
        // Its counter moves: it is back at once.
        now += Duration::from_millis(250);
        s.load_report(addr(2), working(8.0, now));
        let t = step(&mut s, &v, now).expect("back at once");
        assert!(t[&addr(2)].weight > 0);
        let b2 = s.backend_view(&v, addr(2)).unwrap();
        assert!(b2.stalled.is_none());
        assert_eq!(b2.stall_transitions, 2);
        assert!(!s.take_stall_changes(&v.addr)[0].stalled);
    }

    #[test]
    fn stall_detection_is_off_with_zero_and_without_a_progress_count() {
        let v = vip(&format!("{LOAD}stall_after = 0\n"), 2);
        let t0 = Instant::now();
        let mut s = start(&v, t0);
        for i in 0..100 {
            let now = t0 + Duration::from_secs(i);
            s.load_report(addr(1), working(7.0, now));
            // No progress count at all (a push without one, TGI before it
            // had one): never stalled either.
            s.load_report(addr(2), report(3.0, now));
            step(&mut s, &v, now);
        }
        assert!(s.backend_view(&v, addr(1)).unwrap().stalled.is_none());
        let v = vip(LOAD, 2);
        let mut s = start(&v, t0);
        for i in 0..100 {
            let now = t0 + Duration::from_secs(i);
            s.load_report(addr(2), report(3.0, now));
            step(&mut s, &v, now);
        }
        assert!(s.backend_view(&v, addr(2)).unwrap().stalled.is_none());
    }

    #[test]
    fn shed_share_follows_the_documented_formula() {
        assert_eq!(shed_share(0.5), 0.0);
        assert_eq!(shed_share(1.0), 0.0);
        assert_eq!(shed_share(f64::NAN), 0.0);
        assert_eq!(shed_share(2.0), 0.5);
        assert_eq!(shed_share(4.0), 0.75);
        assert_eq!(shed_share(3.0), 0.66, "rounded down to a percent");
        assert_eq!(shed_share(1000.0), MAX_SHED);
    }

    #[test]
    fn a_saturated_pool_sheds_only_with_shed_and_stops_with_the_report_that_ends_it() {
        let t0 = Instant::now();
        for (policy, want) in [("spread", 0.0), ("shed", 0.5)] {
            let v = vip(&format!("{LOAD}on_saturated = \"{policy}\"\n"), 2);
            let mut s = start(&v, t0);
            // Queues twice their limit (5): p = 2.
            for i in 1..=2 {
                s.load_report(addr(i), report(10.0, t0));
            }
            step(&mut s, &v, t0);
            let view = s.vip_view(&v.addr);
            assert!(view.saturated, "{policy}");
            assert_eq!(view.shed, want, "{policy}");
            // One node's queue empties: no shedding with the next plan,
            // although smoothing keeps the pool saturated a while.
            let now = t0 + Duration::from_millis(250);
            s.load_report(addr(1), report(0.0, now));
            step(&mut s, &v, now);
            let view = s.vip_view(&v.addr);
            assert_eq!(view.shed, 0.0, "{policy}: {view:?}");
        }
    }
}
