//! The host `lbd` runs on: its addresses and tick rate; [`interface`] is
//! what `lbd` reads and sets on the attached interface; [`neighbours`]
//! keeps the kernel's neighbour entries towards backends resolved; [`bgp`]
//! announces the VIPs over BGP through BIRD 2, [`bgp_status`] reads BIRD's
//! sessions and announcements back for `/metrics`, and [`bird_guard`]
//! withdraws them when `lbd` dies; [`lock`] keeps one `lbd` per instance;
//! [`checks`] refuses VIPs and backends that are this host's own addresses;
//! [`service_manager`] tells systemd (`Type=notify`) when lbd is ready,
//! reloading and stopping.

pub mod bgp;
pub mod bgp_status;
pub mod bird_guard;
pub mod checks;
pub mod interface;
pub mod lock;
pub mod neighbours;
pub mod service_manager;

use std::{net::IpAddr, process::Command};

/// A command `lbd` runs on the host (`ip`, `ethtool`) that failed.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("running `{command}` (is it installed?)")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` failed: {stderr}")]
    Failed { command: String, stderr: String },
    #[error("`{command}` printed JSON lbd cannot read")]
    Json {
        command: String,
        #[source]
        source: serde_json::Error,
    },
}

/// Runs `program args` and returns its standard output. `ok_stderr`: a
/// failure whose message contains it counts as success (a change that was
/// already made).
fn run(program: &str, args: &[&str], ok_stderr: Option<&str>) -> Result<String, CommandError> {
    let command = format!("{program} {}", args.join(" "));
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|source| CommandError::Spawn {
            command: command.clone(),
            source,
        })?;
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    if !out.status.success() && !ok_stderr.is_some_and(|ok| stderr.contains(ok)) {
        return Err(CommandError::Failed { command, stderr });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `ip ARGS` (with `-j` among them), its JSON output read as a `T`.
fn ip_json<T: for<'de> serde::Deserialize<'de>>(args: &[&str]) -> Result<T, CommandError> {
    let text = run("ip", args, None)?;
    serde_json::from_str(&text).map_err(|source| CommandError::Json {
        command: format!("ip {}", args.join(" ")),
        source,
    })
}

/// Every unicast address configured on this host's interfaces (loopback
/// addresses excluded), as `getifaddrs(3)` reports them.
pub fn addresses() -> std::io::Result<Vec<IpAddr>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() {
            continue;
        }
        // SAFETY: the family says which sockaddr this is.
        let addr = unsafe {
            match i32::from((*ifa.ifa_addr).sa_family) {
                libc::AF_INET => {
                    let sin = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                    IpAddr::from(sin.sin_addr.s_addr.to_ne_bytes())
                }
                libc::AF_INET6 => {
                    let sin6 = &*(ifa.ifa_addr as *const libc::sockaddr_in6);
                    IpAddr::from(sin6.sin6_addr.s6_addr)
                }
                _ => continue,
            }
        };
        if !addr.is_loopback() && !addr.is_unspecified() && !out.contains(&addr) {
            out.push(addr);
        }
    }
    // SAFETY: the list from getifaddrs, freed once.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

/// The kernel's tick rate (CONFIG_HZ): the unit of the data plane's clock
/// (jiffies, see `lb_common::idle_jiffies`).
///
/// The coarse clocks advance once per tick, and the kernel reports their
/// resolution as the tick length (`TICK_NSEC`), so HZ is 1 s divided by
/// the resolution of `CLOCK_MONOTONIC_COARSE`, rounded.
pub fn kernel_hz() -> Result<u32, String> {
    let mut res = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_getres writes one timespec.
    if unsafe { libc::clock_getres(libc::CLOCK_MONOTONIC_COARSE, &mut res) } != 0 {
        return Err(format!(
            "clock_getres(CLOCK_MONOTONIC_COARSE): {}",
            std::io::Error::last_os_error()
        ));
    }
    let ns = res.tv_sec as u64 * 1_000_000_000 + res.tv_nsec as u64;
    hz_from_tick_ns(ns)
        .ok_or_else(|| format!("CLOCK_MONOTONIC_COARSE has a resolution of {ns} ns: not a kernel tick (expected 1 to 100 ms)"))
}

/// HZ for a tick of `ns` nanoseconds (10 to 1000 Hz; kernels offer 100 to
/// 1000).
fn hz_from_tick_ns(ns: u64) -> Option<u32> {
    if !(1_000_000..=100_000_000).contains(&ns) {
        return None;
    }
    Some(((1_000_000_000 + ns / 2) / ns) as u32)
}

/// The id of the group `name` (for `api.socket_group`).
pub fn group_id(name: &str) -> std::io::Result<u32> {
    let c_name = std::ffi::CString::new(name)
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "a NUL in the name"))?;
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: zeroed `group` and a buffer for getgrnam_r to fill; `found`
    // points into them only while they live.
    unsafe {
        let mut group: libc::group = std::mem::zeroed();
        let mut found: *mut libc::group = std::ptr::null_mut();
        let rc = libc::getgrnam_r(
            c_name.as_ptr(),
            &mut group,
            buf.as_mut_ptr(),
            buf.len(),
            &mut found,
        );
        if rc != 0 {
            return Err(std::io::Error::from_raw_os_error(rc));
        }
        if found.is_null() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("no group {name:?} on this host (api.socket_group)"),
            ));
        }
        Ok(group.gr_gid)
    }
}

#[cfg(test)]
mod clock_tests {
    use super::*;

    #[test]
    fn hz_from_the_tick_length() {
        // TICK_NSEC for the HZ choices of x86 and arm64 kernels.
        assert_eq!(hz_from_tick_ns(10_000_000), Some(100));
        assert_eq!(hz_from_tick_ns(4_000_000), Some(250));
        assert_eq!(hz_from_tick_ns(3_333_333), Some(300));
        assert_eq!(hz_from_tick_ns(1_000_000), Some(1000));
        assert_eq!(hz_from_tick_ns(1), None, "a high-resolution clock");
        let hz = kernel_hz().expect("this kernel's HZ");
        assert!((100..=1000).contains(&hz), "{hz}");
    }
}

#[cfg(test)]
mod group_tests {
    use super::*;

    #[test]
    fn group_ids_come_from_the_group_database() {
        assert_eq!(group_id("root").unwrap(), 0);
        let e = group_id("lbt-no-such-group").unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::NotFound);
        assert!(
            e.to_string().contains("no group \"lbt-no-such-group\""),
            "{e}"
        );
        assert_eq!(
            group_id("a\0b").unwrap_err().kind(),
            std::io::ErrorKind::InvalidInput
        );
    }
}
