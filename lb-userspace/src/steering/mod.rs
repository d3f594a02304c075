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
    desired::policy::AllDownPolicy,
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
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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
    pub source: LoadSource,
    /// What reported it (`vllm`, `sglang`, `triton`, `tgi`, `orca`).
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
    /// Smoothed pressure and when it was last updated.
    smoothed: f64,
    updated: Option<Instant>,
    /// Applied level (see [`FULL`]).
    level: u32,
    /// Slow start began here.
    ramp_from: Option<Instant>,
    /// A desired level one step from the applied one, and since when it has
    /// been desired: applied once it has settled (see [`SETTLE`]).
    pending: Option<(u32, Instant)>,
}

impl BackendSteer {
    /// Up by its health check, or not checked.
    fn up(&self) -> bool {
        self.health.as_ref().is_none_or(|h| h.up)
    }
}

#[derive(Clone, Debug, Default)]
struct VipSteer {
    backends: BTreeMap<IpAddr, BackendSteer>,
    saturated: bool,
    all_down: bool,
    last_change: Option<Instant>,
    applied: Option<BTreeMap<IpAddr, Target>>,
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
}

/// A VIP as steering sees it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VipView {
    /// Every healthy backend is saturated: base weights are in use.
    pub saturated: bool,
    /// Every backend is down.
    pub all_down: bool,
}

/// What changed a VIP's targets, for the log.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub targets: BTreeMap<IpAddr, Target>,
    /// Per backend whose level changed: (old factor, new factor).
    pub factors: Vec<(IpAddr, f64, f64)>,
}

/// Health checks and load reports of every VIP's backends.
#[derive(Clone, Default)]
pub struct Steering {
    vips: BTreeMap<VipAddr, VipSteer>,
    nodes: HashMap<IpAddr, LoadReport>,
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
    /// starts no ramp.
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
                        smoothed: 0.0,
                        updated: None,
                        level: FULL,
                        ramp_from: (known && !vip.slow_start.is_zero()).then_some(now),
                        pending: None,
                    });
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

    /// Records a node's load (for every VIP it is a backend of).
    pub fn load_report(&mut self, node: IpAddr, report: LoadReport) {
        self.nodes.insert(node, report);
        self.stale_nodes.remove(&node);
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

    /// The targets `vip` should have now, if they differ from what was
    /// applied and may be applied now: health and config changes at once,
    /// load and slow-start changes at most once per
    /// [`MIN_REBUILD_INTERVAL`]. `force` (a config change) always returns
    /// the plan. Call [`Steering::applied`] once the data plane holds it.
    pub fn plan(&mut self, vip: &Vip, now: Instant, force: bool) -> Option<Plan> {
        // Reports that just went stale: counted once, then ignored.
        for b in &vip.backends {
            let (Some(policy), Some(r)) = (vip.load_policy(b), self.nodes.get(&b.addr)) else {
                continue;
            };
            if now.saturating_duration_since(r.at) > r.ttl.unwrap_or(policy.stale_after)
                && self.stale_nodes.insert(b.addr)
            {
                *self.stale_reports.entry(r.source).or_default() += 1;
            }
        }
        let nodes = &self.nodes;
        let state = self.vips.get_mut(&vip.addr)?;
        // Pressure, per backend with a load policy.
        let mut pressure: BTreeMap<IpAddr, f64> = BTreeMap::new();
        for b in &vip.backends {
            let Some(policy) = vip.load_policy(b) else {
                continue;
            };
            let s = state.backends.get_mut(&b.addr)?;
            let raw = nodes
                .get(&b.addr)
                .filter(|r| {
                    now.saturating_duration_since(r.at) <= r.ttl.unwrap_or(policy.stale_after)
                })
                .map_or(0.0, |r| {
                    let mut p = r.queue / policy.queue_limit;
                    if let Some(kv) = r.kv {
                        p = p.max(kv / policy.kv_limit);
                    }
                    if let Some(u) = r.utilization {
                        p = p.max(u);
                    }
                    p
                });
            let dt = s
                .updated
                .map_or(Duration::ZERO, |t| now.saturating_duration_since(t));
            s.smoothed = if raw >= s.smoothed || policy.recovery.is_zero() {
                raw
            } else {
                let k = 1.0 - (-dt.as_secs_f64() / policy.recovery.as_secs_f64()).exp();
                s.smoothed + (raw - s.smoothed) * k
            };
            s.updated = Some(now);
            pressure.insert(b.addr, s.smoothed);
        }
        let up = |addr: &IpAddr| state.backends[addr].up();
        let eligible: Vec<&IpAddr> = vip
            .backends
            .iter()
            .filter(|b| b.effective_weight() > 0 && up(&b.addr))
            .map(|b| &b.addr)
            .collect();
        let loaded: Vec<f64> = eligible
            .iter()
            .filter_map(|a| pressure.get(*a).copied())
            .collect();
        let saturated = !loaded.is_empty()
            && loaded.len() == eligible.len()
            && loaded.iter().all(|p| *p >= 1.0);
        state.saturated = saturated;
        let any_weight = vip.backends.iter().any(|b| b.effective_weight() > 0);
        state.all_down = any_weight && eligible.is_empty();

        let mut targets = BTreeMap::new();
        let mut levels = BTreeMap::new();
        for b in &vip.backends {
            let s = state.backends.get_mut(&b.addr)?;
            let down = !s.up();
            let policy = vip.load_policy(b);
            let mut factor = 1.0;
            if let (Some(p), Some(policy)) = (pressure.get(&b.addr), &policy)
                && !saturated
            {
                factor = (1.0 - p).clamp(policy.min_factor, 1.0);
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
            let floor = policy.map_or(1, |p| {
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
            levels.insert(b.addr, level);
            targets.insert(
                b.addr,
                Target {
                    weight: b.effective_weight() * level,
                    down,
                },
            );
        }
        // Health changes are applied at once; config changes come forced.
        let urgent = force
            || state.applied.as_ref().is_none_or(|applied| {
                applied.len() != targets.len()
                    || targets
                        .iter()
                        .any(|(a, t)| applied.get(a).is_none_or(|p| p.down != t.down))
            });
        if state.all_down
            && vip.on_all_down == AllDownPolicy::KeepLast
            && state.applied.is_some()
            && !force
        {
            // Keep the table of the backends last known good.
            return None;
        }
        if state.all_down && vip.on_all_down == AllDownPolicy::KeepLast && force {
            // A config change while every backend is down: keep them in.
            for t in targets.values_mut() {
                t.down = false;
            }
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
        let factors = vip
            .backends
            .iter()
            .filter_map(|b| {
                let old = state.backends[&b.addr].level;
                let new = levels[&b.addr];
                (old != new).then(|| {
                    (
                        b.addr,
                        f64::from(old) / f64::from(FULL),
                        f64::from(new) / f64::from(FULL),
                    )
                })
            })
            .collect();
        // The levels are committed with the plan (the caller applies it).
        for (addr, level) in levels {
            if let Some(s) = state.backends.get_mut(&addr) {
                s.level = level;
            }
        }
        Some(Plan { targets, factors })
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
        for b in &vip.backends {
            let weight = b.effective_weight();
            if weight == 0 {
                continue;
            }
            let recent = newest
                .get(&b.addr)
                .zip(oldest.get(&b.addr))
                .map_or(0, |(n, o)| n.saturating_sub(*o)) as f64;
            let reported = match (vip.load_policy(b), self.nodes.get(&b.addr)) {
                (Some(policy), Some(r))
                    if now.saturating_duration_since(r.at)
                        <= r.ttl.unwrap_or(policy.stale_after) =>
                {
                    r.queue + r.running.unwrap_or(0.0)
                }
                _ => 0.0,
            };
            let score =
                (1000.0 * (reported + recent) / f64::from(weight)).min(f64::from(u32::MAX)) as u32;
            if state.scores.get(&b.addr) != Some(&score) {
                state.scores.insert(b.addr, score);
                changed.insert(b.addr, score);
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
        let b = vip.backends.iter().find(|b| b.addr == backend)?;
        Some(BackendView {
            health: s.health.clone(),
            load: self.nodes.get(&backend).cloned(),
            pressure: vip.load_policy(b).map(|_| s.smoothed),
            factor: f64::from(s.level) / f64::from(FULL),
            ramping: s.ramp_from.is_some(),
            score: state.scores.get(&backend).copied(),
        })
    }

    /// How many of `vip`'s backends are healthy: up by their health check,
    /// or not checked. Drained backends count (they still serve their
    /// flows).
    pub fn healthy_backends(&self, vip: &Vip) -> usize {
        let state = self.vips.get(&vip.addr);
        vip.backends
            .iter()
            .filter(|b| {
                state
                    .and_then(|s| s.backends.get(&b.addr))
                    .is_none_or(BackendSteer::up)
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
}
