//! Telling the service manager (systemd's `Type=notify`) where `lbd` is in
//! its life: the `sd_notify(3)` protocol, one datagram per state change to
//! the socket in `NOTIFY_SOCKET` (a path, or `@name` for the abstract
//! namespace). Without `NOTIFY_SOCKET` (not started by systemd) nothing is
//! sent.
//!
//! What `lbd` says and when:
//! - `READY=1` once the data plane is attached with the config applied and
//!   the API and `/metrics` serve (not before: a unit that is "active" must
//!   forward), with `STATUS=` and `MAINPID=`;
//! - `RELOADING=1` (with `MONOTONIC_USEC=`) when a SIGHUP reload starts and
//!   `READY=1` again when it ended, applied or rejected (`STATUS=` says
//!   which);
//! - `STOPPING=1` when SIGINT or SIGTERM starts the shutdown.

use std::{
    io,
    os::unix::net::{SocketAddr, UnixDatagram},
};

/// The socket the service manager listens on, if it gave one.
fn notify_socket() -> Option<String> {
    std::env::var("NOTIFY_SOCKET")
        .ok()
        .filter(|s| !s.is_empty())
}

/// Sends `state` (newline-separated `KEY=VALUE` lines) to the service
/// manager. `Ok(false)`: no service manager asked for notifications.
pub fn notify(state: &str) -> io::Result<bool> {
    let Some(path) = notify_socket() else {
        return Ok(false);
    };
    let addr = match path.strip_prefix('@') {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            SocketAddr::from_abstract_name(name.as_bytes())?
        }
        None => SocketAddr::from_pathname(&path)?,
    };
    let socket = UnixDatagram::unbound()?;
    socket.send_to_addr(state.as_bytes(), &addr)?;
    Ok(true)
}

/// [`notify`], logging a failure (lbd goes on: a missed notification makes
/// systemd time the unit out, which is what it should see).
pub fn tell(state: &str) {
    if let Err(e) = notify(state) {
        tracing::warn!(error = %e, state, "telling the service manager (NOTIFY_SOCKET) failed");
    }
}

/// `READY=1` with a status line.
pub fn ready(status: &str) {
    tell(&format!(
        "READY=1\nSTATUS={status}\nMAINPID={}",
        std::process::id()
    ));
}

/// `RELOADING=1`, stamped with `CLOCK_MONOTONIC` as systemd wants it.
pub fn reloading() {
    tell(&format!(
        "RELOADING=1\nSTATUS=reloading the config\nMONOTONIC_USEC={}",
        monotonic_usec()
    ));
}

/// `STOPPING=1`.
pub fn stopping() {
    tell("STOPPING=1\nSTATUS=shutting down");
}

fn monotonic_usec() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec for clock_gettime to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1_000
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn monotonic_microseconds_advance() {
        let a = monotonic_usec();
        std::thread::sleep(std::time::Duration::from_millis(2));
        assert!(monotonic_usec() >= a + 2_000);
    }
}
