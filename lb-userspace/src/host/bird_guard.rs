//! The BIRD guard: withdraws the VIPs of an `lbd` that died.
//!
//! BIRD outlives `lbd` on purpose (a restart keeps the BGP sessions and the
//! announcements, see [`crate::host::bgp`]). But an `lbd` killed by SIGKILL
//! or a crash cannot withdraw anything, and its data plane, still
//! forwarding from the pinned maps, no longer follows health checks. The
//! guard is a small process (`lbd bird-guard`) that `lbd` starts next to
//! BIRD, in its own session so that it survives `lbd`. It tests the
//! instance's lock ([`crate::host::lock`]) a few times a second without
//! taking it; once no `lbd` has held it for `dead_after`, it disables the
//! VIPs' static protocols in BIRD (which withdraws their routes) and exits.
//! The next `lbd` re-enables them and starts a new guard.
//!
//! One guard per BIRD directory: it holds `guard.lock` there (its PID
//! inside); a second one exits at once.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use crate::host::{
    bgp::{self, BirdError, BirdPaths, STATIC_PROTOCOLS},
    lock::{self, InstanceLock, LockError},
};

/// How often the guard looks at the lock.
const POLL: Duration = Duration::from_millis(250);

/// What the guard watches and acts on.
#[derive(Clone, Debug)]
pub struct Guard {
    /// The instance lock of the `lbd` it guards.
    pub lbd_lock: PathBuf,
    pub paths: BirdPaths,
    pub dead_after: Duration,
}

/// Runs the guard until it has withdrawn the VIPs of a dead `lbd` (or
/// another guard already runs). Logs what it does.
pub async fn run(guard: Guard) -> anyhow::Result<()> {
    let _own = match InstanceLock::acquire_at("bird-guard", &guard.paths.guard_lock()) {
        Ok(l) => l,
        Err(LockError::Held { pid, .. }) => {
            tracing::info!(pid, "another BIRD guard runs for this BIRD; exiting");
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    };
    tracing::info!(
        lock = %guard.lbd_lock.display(),
        bird = %guard.paths.socket().display(),
        dead_after = ?guard.dead_after,
        "guarding BIRD: its VIPs are withdrawn once no lbd has run for dead_after"
    );
    let mut dead_since: Option<Instant> = None;
    loop {
        let alive = match lock::holder(&guard.lbd_lock) {
            Ok(h) => h.is_some(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot test the lbd lock; taking lbd as alive");
                true
            }
        };
        if alive {
            dead_since = None;
        } else {
            let since = *dead_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= guard.dead_after {
                match withdraw(&guard.paths.socket()).await {
                    Ok(()) => {
                        tracing::warn!(
                            after = ?since.elapsed(),
                            "no lbd runs: BIRD no longer announces its VIPs (the next lbd announces them again)"
                        );
                        return Ok(());
                    }
                    Err(BirdError::Unreachable { .. }) => {
                        tracing::info!("no lbd and no BIRD run: nothing to withdraw");
                        return Ok(());
                    }
                    Err(e) => tracing::error!(error = %e, "withdrawing the VIPs failed; retrying"),
                }
            }
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Disables the VIPs' static protocols: BIRD withdraws their routes.
async fn withdraw(socket: &Path) -> Result<(), BirdError> {
    for p in STATIC_PROTOCOLS {
        let reply = bgp::bird_command(socket, &format!("disable {p}")).await?;
        // "protocol not found" (a BIRD of another config) is no failure.
        if let Some((code, text)) = reply.last()
            && *code >= 8000
            && !text.contains("not found")
        {
            return Err(BirdError::Refused {
                command: format!("disable {p}"),
                reply: text.clone(),
            });
        }
    }
    Ok(())
}

/// Starts a guard for `paths` unless one runs: `lbd bird-guard` from this
/// very binary, in a session of its own (a signal to `lbd`'s process group
/// does not reach it), logging to `guard.log` in BIRD's directory.
pub fn spawn(instance: &str, paths: &BirdPaths, dead_after: Duration) -> std::io::Result<()> {
    use std::os::unix::process::CommandExt;
    if lock::holder(&paths.guard_lock())?.is_some() {
        return Ok(());
    }
    std::fs::create_dir_all(&paths.dir)?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(paths.guard_log())?;
    let mut cmd = std::process::Command::new(std::env::current_exe()?);
    cmd.arg("bird-guard")
        .arg("--lock")
        .arg(lock::lock_path(instance))
        .arg("--bird-dir")
        .arg(&paths.dir)
        .arg("--dead-after")
        .arg(dead_after.as_secs().to_string())
        .env("NO_COLOR", "1")
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    // SAFETY: setsid is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    // It runs on after lbd; while lbd runs, a thread reaps it if it ends.
    let mut child = cmd.spawn()?;
    std::thread::spawn(move || child.wait());
    Ok(())
}
