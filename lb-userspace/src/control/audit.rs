//! The audit log: one JSON line per change request *before* it is acted
//! on, and one with its outcome after, both with the time, who asked
//! (socket peer credentials, token name or client certificate), the
//! caller's role (see [`crate::control::access`]; absent for a caller that
//! did not authenticate) and an id that pairs them. A
//! request with no outcome line was cut short (lbd died while applying it):
//! look at the state to see whether it took effect.
//!
//! Requests come from the API (the raw method, path and body, so malformed
//! and refused requests are recorded as sent) and from SIGHUP reloads.
//! Reads and pushed load reports are not recorded.
//!
//! When the request line cannot be written, `[api] audit_failure` decides:
//! `refuse` (the default) refuses the change, so that nothing changes
//! without its record; `log` goes ahead and logs the failure. Failed writes
//! are counted either way ([`write_failures`]).

use std::{
    fs::{File, OpenOptions},
    io::Write,
    path::Path,
    str::FromStr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{SystemTime, UNIX_EPOCH},
};

use serde::Serialize;

use crate::control::access::Role;

/// What happens to a change whose request cannot be recorded
/// (`api.audit_failure`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AuditFailure {
    /// Refuse the change: nothing changes without its record.
    #[default]
    Refuse,
    /// Make the change and log that its record is missing.
    Log,
}

impl FromStr for AuditFailure {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "refuse" => Ok(AuditFailure::Refuse),
            "log" => Ok(AuditFailure::Log),
            _ => Err(format!("{s:?} is not \"refuse\" or \"log\"")),
        }
    }
}

/// Audit records that could not be written since lbd started (metrics).
static WRITE_FAILURES: AtomicU64 = AtomicU64::new(0);

/// Audit records that could not be written since lbd started.
pub fn write_failures() -> u64 {
    WRITE_FAILURES.load(Ordering::Relaxed)
}

/// The request could not be recorded and `audit_failure = "refuse"`.
#[derive(Debug, thiserror::Error)]
#[error(
    "the audit log cannot be written ({0}); the change was refused so that nothing changes \
     without its record (api.audit_failure = \"refuse\")"
)]
pub struct Unrecorded(pub String);

/// An append-only audit log file, shared by the API and the controller.
#[derive(Clone)]
pub struct AuditLog {
    inner: Arc<Mutex<Inner>>,
    policy: AuditFailure,
}

struct Inner {
    file: File,
    /// Requests recorded by this process.
    next: u64,
    /// Identifies this process's requests among those of earlier lbds in
    /// the same file: its start time in milliseconds, hex.
    epoch: String,
}

/// A recorded request, waiting for its outcome.
#[must_use = "record the outcome with AuditLog::outcome"]
pub struct Pending {
    id: String,
    caller: String,
    role: Option<Role>,
}

#[derive(Serialize)]
struct Entry<'a, T: Serialize> {
    time: String,
    id: &'a str,
    phase: &'static str,
    caller: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<Role>,
    #[serde(skip_serializing_if = "Option::is_none")]
    request: Option<&'a T>,
    #[serde(skip_serializing_if = "Option::is_none")]
    outcome: Option<&'a str>,
}

impl AuditLog {
    /// Opens (creating, mode 0600) the log at `path` for appending.
    pub fn open(path: &Path, policy: AuditFailure) -> std::io::Result<AuditLog> {
        use std::os::unix::fs::OpenOptionsExt;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)?;
        let epoch = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis();
        Ok(AuditLog {
            inner: Arc::new(Mutex::new(Inner {
                file,
                next: 0,
                epoch: format!("{epoch:x}"),
            })),
            policy,
        })
    }

    /// Records `request` of `caller` (with `role`) before it is acted on.
    /// `Err` means the record could not be written and the policy is
    /// `refuse`: the caller must refuse the request. Under `log` a failure
    /// is logged and the request goes ahead.
    pub fn request<T: Serialize>(
        &self,
        caller: &str,
        role: Option<Role>,
        request: &T,
    ) -> Result<Pending, Unrecorded> {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.next += 1;
        let id = format!("{}-{}", inner.epoch, inner.next);
        let entry = Entry {
            time: rfc3339(SystemTime::now()),
            id: &id,
            phase: "request",
            caller,
            role,
            request: Some(request),
            outcome: None,
        };
        let result = append(&mut inner.file, &entry, true);
        drop(inner);
        let pending = Pending {
            id,
            caller: caller.to_string(),
            role,
        };
        match result {
            Ok(()) => Ok(pending),
            Err(e) => {
                WRITE_FAILURES.fetch_add(1, Ordering::Relaxed);
                match self.policy {
                    AuditFailure::Refuse => {
                        tracing::error!(error = %e, caller, "the audit log cannot be written: change refused");
                        Err(Unrecorded(e.to_string()))
                    }
                    AuditFailure::Log => {
                        tracing::error!(error = %e, caller, "the audit log cannot be written: change goes ahead without its record (api.audit_failure = \"log\")");
                        Ok(pending)
                    }
                }
            }
        }
    }

    /// Records the outcome of a request recorded with [`AuditLog::request`]
    /// (`applied`, `refused: ...`, `failed: ...`). A failure to write it is
    /// logged and counted: the change has happened by then.
    pub fn outcome(&self, pending: Pending, outcome: &str) {
        let entry: Entry<'_, ()> = Entry {
            time: rfc3339(SystemTime::now()),
            id: &pending.id,
            phase: "outcome",
            caller: &pending.caller,
            role: pending.role,
            request: None,
            outcome: Some(outcome),
        };
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = append(&mut inner.file, &entry, false) {
            WRITE_FAILURES.fetch_add(1, Ordering::Relaxed);
            tracing::error!(error = %e, id = pending.id, outcome, "the audit log cannot be written: an outcome is missing from it");
        }
    }

    /// Records a request that was refused before it could be acted on
    /// (malformed, unauthenticated, not allowed, too large): its request
    /// and outcome.
    pub fn refused<T: Serialize>(
        &self,
        caller: &str,
        role: Option<Role>,
        request: &T,
        reason: &str,
    ) {
        if let Ok(p) = self.request(caller, role, request) {
            self.outcome(p, &format!("refused: {reason}"));
        }
    }
}

/// Appends one entry; with `sync`, flushes it (and every entry before it)
/// to disk before returning. Requests are synced: none is acted on before
/// its record is on disk. Outcomes are written (a crash of lbd keeps them:
/// they are in the kernel's page cache) and reach the disk with the next
/// request's sync; a power loss may take the last outcomes, never a
/// request. A request without its outcome reads as "cut short" (see the
/// module docs), and the state says whether it took effect.
fn append<T: Serialize>(file: &mut File, entry: &Entry<'_, T>, sync: bool) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(entry).map_err(std::io::Error::other)?;
    line.push(b'\n');
    file.write_all(&line)?;
    if sync {
        file.sync_data()?;
    }
    Ok(())
}

/// `t` as an RFC 3339 UTC timestamp with milliseconds.
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86400, secs % 86400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = UNIX_EPOCH + Duration::from_millis(1_795_775_025_123);
        assert_eq!(rfc3339(t), "2026-11-27T10:23:45.123Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00.000Z");
    }
}
