//! One `lbd` of the test's own, on a veth in a network namespace of its
//! own (`lb0`, 10.204.0.1/24; no backends, no traffic), unpinned: for tests
//! of lbd as a process — what it tells the service manager, its listeners,
//! TLS and roles. Files (config, API socket, audit log, lbd's log) live in
//! a temp directory; all of it goes on drop.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::{lab::lbd_path, netns::Netns};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// The balancer and VIP part of every solo lbd's config; the test adds
/// `[api]`, `[metrics]` and the rest.
pub const BASE_CONFIG: &str = r#"[balancer]
source_v4 = "10.204.0.1"

[[vip]]
address = "203.0.113.10"
port = 80
protocol = "tcp"
backends = [ { address = "10.204.0.2" } ]
"#;

/// A running solo lbd.
pub struct Solo {
    pub ns: Netns,
    /// The temp directory of its files.
    pub dir: PathBuf,
    pub child: Child,
    instance: String,
}

impl Solo {
    /// The temp directory a solo lbd named `name` will use, made now, so a
    /// test can write certificates and tokens there before [`Solo::start`].
    pub fn dir(name: &str) -> Result<PathBuf> {
        let dir = std::env::temp_dir().join(format!(
            "lbt-{name}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&dir)?;
        Ok(dir)
    }

    /// Starts lbd in `dir` with `BASE_CONFIG` followed by `config` (where
    /// `@DIR@` stands for `dir`), its socket and audit log in `dir` unless
    /// `config` sets `[api]` itself, and `env` added to its environment.
    pub fn start(dir: PathBuf, config: &str, env: &[(&str, &str)]) -> Result<Solo> {
        let ns = Netns::new("solo")?;
        ns.ip(&["link", "add", "lb0", "type", "veth", "peer", "name", "lb1"])?;
        ns.ip(&["addr", "add", "10.204.0.1/24", "dev", "lb0"])?;
        ns.ip(&["link", "set", "lb0", "up"])?;
        ns.ip(&["link", "set", "lb1", "up"])?;
        let d = dir.display().to_string();
        let mut text = format!("{BASE_CONFIG}\n{}", config.replace("@DIR@", &d));
        if !text.contains("[api]") {
            text += &format!("\n[api]\nsocket = \"{d}/api.sock\"\naudit_log = \"{d}/audit.log\"\n");
        }
        fs::write(dir.join("lbd.toml"), text)?;
        let instance = dir
            .file_name()
            .context("a temp dir with a name")?
            .to_string_lossy()
            .into_owned();
        let log = fs::File::create(dir.join("lbd.log"))?;
        // `ip netns exec` gives lbd a mount namespace of its own too;
        // nothing is pinned, so it needs no shared BPF filesystem.
        let child = Command::new("ip")
            .args(["netns", "exec", ns.name()])
            .arg(lbd_path()?)
            .arg("--config")
            .arg(dir.join("lbd.toml"))
            .args([
                "--instance",
                &instance,
                "--iface",
                "lb0",
                "--xdp-mode",
                "skb",
                "--no-pin",
            ])
            .env("NO_COLOR", "1")
            .env_remove("NOTIFY_SOCKET")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting lbd")?;
        Ok(Solo {
            ns,
            dir,
            child,
            instance,
        })
    }

    /// lbd's log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("lbd.log")).unwrap_or_default()
    }

    /// The audit log so far.
    pub fn audit(&self) -> String {
        fs::read_to_string(self.dir.join("audit.log")).unwrap_or_default()
    }

    /// The API socket, unless the config moved it.
    pub fn socket(&self) -> PathBuf {
        self.dir.join("api.sock")
    }

    /// Waits until lbd's log contains `needle` (failing if lbd exits or
    /// `timeout` passes).
    pub fn wait_log(&mut self, needle: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while !self.log().contains(needle) {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "lbd exited ({status}) before logging {needle:?}:\n{}",
                    self.log()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "lbd did not log {needle:?} within {timeout:?}:\n{}",
                    self.log()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Sends lbd `signal`.
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, signal) };
    }

    /// SIGTERM, and lbd's exit status (SIGKILL after 10 s).
    pub fn stop(&mut self) -> Result<ExitStatus> {
        self.signal(libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                bail!("lbd did not exit within 10 s of SIGTERM:\n{}", self.log());
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether an XDP program is attached to `lb0` (generic mode).
    pub fn attached(&self) -> bool {
        self.ns
            .ip(&["-d", "link", "show", "lb0"])
            .is_ok_and(|s| s.contains("xdpgeneric"))
    }

    /// This lbd's config file.
    pub fn config_path(&self) -> PathBuf {
        self.dir.join("lbd.toml")
    }
}

impl Drop for Solo {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = fs::remove_file(Path::new("/run/lb").join(format!("{}.lock", self.instance)));
        let _ = fs::remove_dir_all(&self.dir);
    }
}
