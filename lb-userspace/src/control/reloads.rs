//! Config reloads (SIGHUP) and their outcomes, for `/metrics`:
//! `lb_config_reloads_total{outcome}`, `lb_config_last_reload_successful`
//! and `lb_config_last_reload_success_timestamp_seconds` (the config read
//! at start-up counts as the first good load, as in Prometheus's own
//! `prometheus_config_*` metrics).
//!
//! Process-wide counters (like the API's request counts): `lbd` records
//! each reload where it happens, the exporter reads them.

use std::{
    sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
    time::{SystemTime, UNIX_EPOCH},
};

/// How a reload ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReloadOutcome {
    /// Read, validated and applied.
    Applied,
    /// The file has problems (syntax, validation, a change the running
    /// balancer cannot take): nothing changed.
    Rejected,
    /// Valid, but applying it failed (persisting or programming); the
    /// previous state was restored.
    Failed,
}

impl ReloadOutcome {
    /// Every outcome, in label order.
    pub const ALL: [ReloadOutcome; 3] = [
        ReloadOutcome::Applied,
        ReloadOutcome::Rejected,
        ReloadOutcome::Failed,
    ];

    /// The `outcome` label.
    pub fn name(self) -> &'static str {
        match self {
            ReloadOutcome::Applied => "applied",
            ReloadOutcome::Rejected => "rejected",
            ReloadOutcome::Failed => "failed",
        }
    }
}

static COUNTS: [AtomicU64; 3] = [const { AtomicU64::new(0) }; 3];
static LAST_OK: AtomicBool = AtomicBool::new(true);
/// Seconds since the epoch, as `f64` bits; 0: never.
static LAST_GOOD: AtomicU64 = AtomicU64::new(0);

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The config was read at start-up (the first good load).
pub fn loaded() {
    LAST_GOOD.store(now().to_bits(), Relaxed);
    LAST_OK.store(true, Relaxed);
}

/// Records a reload's outcome.
pub fn record(outcome: ReloadOutcome) {
    COUNTS[outcome as usize].fetch_add(1, Relaxed);
    let ok = outcome == ReloadOutcome::Applied;
    LAST_OK.store(ok, Relaxed);
    if ok {
        LAST_GOOD.store(now().to_bits(), Relaxed);
    }
}

/// What the exporter shows.
#[derive(Clone, Debug, PartialEq)]
pub struct ReloadStats {
    /// Reloads per outcome, in [`ReloadOutcome::ALL`] order.
    pub counts: [(ReloadOutcome, u64); 3],
    /// Whether the last reload (or the start-up load) worked.
    pub last_ok: bool,
    /// When the config was last loaded successfully (seconds since the
    /// epoch); `None` before [`loaded`].
    pub last_good: Option<f64>,
}

/// The counts so far.
pub fn stats() -> ReloadStats {
    let last_good = f64::from_bits(LAST_GOOD.load(Relaxed));
    ReloadStats {
        counts: ReloadOutcome::ALL.map(|o| (o, COUNTS[o as usize].load(Relaxed))),
        last_ok: LAST_OK.load(Relaxed),
        last_good: (last_good > 0.0).then_some(last_good),
    }
}
