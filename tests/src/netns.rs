//! Network namespaces that a test creates for itself and always removes.

use std::{
    fs::File,
    os::fd::AsRawFd,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context, Result, bail};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A named network namespace, deleted on drop (also when the test panics).
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates `lbt-<prefix>-<pid>-<n>`, unique per process and call.
    pub fn new(prefix: &str) -> Result<Netns> {
        // A name a killed process of the same (reused) pid left behind is
        // skipped, not taken over: it is not ours to delete.
        let name = (0..1000)
            .map(|_| {
                format!(
                    "lbt-{prefix}-{}-{}",
                    std::process::id(),
                    NEXT.fetch_add(1, Ordering::Relaxed)
                )
            })
            .find(|name| !std::path::Path::new("/run/netns").join(name).exists())
            .context("1000 namespace names of this pid are taken")?;
        run(Command::new("ip").args(["netns", "add", &name]))?;
        let ns = Netns { name };
        // Loopback up, as on any host.
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `ip -n <ns> ARGS`.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        run(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }

    /// Runs a command inside the namespace (`ip netns exec`).
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<String> {
        run(Command::new("ip")
            .args(["netns", "exec", &self.name, program])
            .args(args))
    }

    /// Moves the calling thread into the namespace until the guard drops.
    pub fn enter(&self) -> Result<NetnsGuard> {
        enter(&self.name)
    }

    /// The ifindex of `dev` inside the namespace.
    pub fn ifindex(&self, dev: &str) -> Result<u32> {
        let out = self.exec("cat", &[&format!("/sys/class/net/{dev}/ifindex")])?;
        out.trim()
            .parse()
            .with_context(|| format!("ifindex of {dev}: {out:?}"))
    }

    /// The MAC address of `dev` inside the namespace.
    pub fn mac(&self, dev: &str) -> Result<[u8; 6]> {
        let out = self.exec("cat", &[&format!("/sys/class/net/{dev}/address")])?;
        parse_mac(out.trim())
    }
}

/// Moves the calling thread into the namespace `name` until the guard
/// drops.
pub fn enter(name: &str) -> Result<NetnsGuard> {
    let previous = File::open("/proc/thread-self/ns/net").context("opening this thread's netns")?;
    let target = File::open(format!("/run/netns/{name}"))
        .with_context(|| format!("opening netns {name}"))?;
    setns(&target).with_context(|| format!("entering netns {name}"))?;
    Ok(NetnsGuard { previous })
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Returns the thread to its previous namespace on drop.
pub struct NetnsGuard {
    previous: File,
}

impl Drop for NetnsGuard {
    fn drop(&mut self) {
        let _ = setns(&self.previous);
    }
}

fn setns(ns: &File) -> Result<()> {
    // SAFETY: a valid namespace fd; affects only the calling thread.
    let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        bail!("setns: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Result<[u8; 6]> {
    let mut mac = [0u8; 6];
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 {
        bail!("not a MAC address: {s:?}");
    }
    for (m, p) in mac.iter_mut().zip(parts) {
        *m = u8::from_str_radix(p, 16).with_context(|| format!("not a MAC address: {s:?}"))?;
    }
    Ok(mac)
}

/// Formats a MAC as `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Runs a command, failing with its stderr if it fails.
pub fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
