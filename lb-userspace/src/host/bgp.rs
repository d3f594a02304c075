//! Announcing VIPs over BGP, through BIRD 2.
//!
//! We do not speak BGP ourselves: `lbd` drives a BIRD 2 daemon (Debian
//! `bird2`), which holds the sessions with the routers. lbd owns BIRD's whole
//! config file: it renders it from `[bgp]` (router id, AS, neighbours,
//! timers) and the set of VIP addresses to announce, writes it atomically
//! and tells BIRD to reload it over BIRD's control socket (`configure`, the
//! same command `birdc configure` sends). A VIP address is a static
//! `blackhole` route in BIRD (never installed in the kernel: there is no
//! kernel protocol) exported to every neighbour of its family with
//! `next hop self`, so the routers send the VIP's traffic to this host,
//! where XDP takes it.
//!
//! What is announced: every VIP address with at least one healthy backend
//! (up by its health check, or not checked; drained backends count, they
//! still serve their flows), and only while the data plane is attached. A
//! VIP whose backends are all down is withdrawn, so routers send its flows
//! to balancers that still have backends.
//!
//! On shutdown lbd leaves the announcements to BIRD (`on_shutdown =
//! "keep"`, the default) or withdraws every VIP (`"withdraw"`). Keeping is
//! the default because the usual reason to stop `lbd` is to restart it
//! (an upgrade, a config change that needs a restart): the pinned data
//! plane keeps forwarding while lbd is away, and withdrawing would make
//! the routers move every flow of this balancer to the others for a
//! restart that takes a second. A balancer that must leave for good is
//! withdrawn by `lbd --cleanup` (or `on_shutdown = "withdraw"`). Without
//! pinning (`lbd --no-pin`) the data plane detaches on exit, so lbd always
//! withdraws.
//!
//! An `lbd` that dies (SIGKILL, a crash) cannot withdraw anything, and its
//! data plane, though still forwarding, no longer follows health checks.
//! So lbd starts a small guard next to BIRD (`lbd bird-guard`, see
//! [`crate::host::bird_guard`]): once no lbd has held the instance's lock
//! for `dead_after` seconds (default 10: longer than a restart takes), it
//! disables the VIPs' static protocols in BIRD, which withdraws them. The
//! next lbd re-enables them once it runs.
//!
//! BIRD runs as its own process. With `start_bird = true` (the default) lbd
//! starts it when its control socket does not answer; BIRD then outlives lbd
//! (a restarted lbd finds it and reconfigures it; the sessions stay up).
//! With `start_bird = false` the operator runs BIRD, e.g. from systemd, as
//! `bird -c DIR/bird.conf -s DIR/bird.ctl`.

use std::{
    collections::BTreeSet,
    fmt,
    fmt::Write as _,
    io::Write as _,
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
    str::FromStr,
    time::Duration,
};

use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::UnixStream,
    sync::{oneshot, watch},
    task::JoinHandle,
};

/// `[bgp]`: how lbd announces its VIPs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BgpSettings {
    /// BGP router id (an IPv4 address; default `balancer.source_v4`).
    pub router_id: Ipv4Addr,
    /// Our AS number.
    pub local_as: u32,
    /// The routers we peer with.
    pub neighbors: Vec<BgpNeighbor>,
    /// BGP hold time, seconds (keepalives every third of it): how long a
    /// router keeps our routes after this host dies without a word.
    pub hold_time: u16,
    /// Also run BFD on the sessions (sub-second failure detection; the
    /// routers must run BFD too).
    pub bfd: bool,
    /// Where BIRD's config, control socket, pid file and log live; `None`:
    /// [`default_bird_dir`] of the instance.
    pub bird_dir: Option<PathBuf>,
    /// The BIRD program lbd starts.
    pub bird_binary: PathBuf,
    /// Start BIRD when its control socket does not answer.
    pub start_bird: bool,
    pub on_shutdown: ShutdownPolicy,
    /// How long BIRD keeps announcing after lbd died (see the module docs).
    pub dead_after: Duration,
}

/// A router we peer with (`bgp.neighbors[i]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BgpNeighbor {
    pub address: IpAddr,
    /// Its AS number (`as`); equal to ours for iBGP.
    pub remote_as: u32,
    pub port: u16,
}

/// What lbd does with its announcements when it stops (`bgp.on_shutdown`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ShutdownPolicy {
    /// Withdraw every VIP: the routers move the flows to other balancers.
    Withdraw,
    /// Leave them announced (BIRD keeps running; the pinned data plane keeps
    /// forwarding): a restart loses nothing. The BIRD guard withdraws them
    /// if no lbd comes back within `dead_after`.
    #[default]
    Keep,
}

impl FromStr for ShutdownPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "withdraw" => Ok(ShutdownPolicy::Withdraw),
            "keep" => Ok(ShutdownPolicy::Keep),
            _ => Err(format!("{s:?} is not \"withdraw\" or \"keep\"")),
        }
    }
}

impl fmt::Display for ShutdownPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ShutdownPolicy::Withdraw => "withdraw",
            ShutdownPolicy::Keep => "keep",
        })
    }
}

/// BIRD's static protocols that hold the VIP routes (IPv4, IPv6): what the
/// BIRD guard disables to withdraw them.
pub const STATIC_PROTOCOLS: [&str; 2] = ["lb_vips_v4", "lb_vips_v6"];

/// BIRD's directory of an instance when `bgp.bird_dir` is not set.
pub fn default_bird_dir(instance: &str) -> PathBuf {
    PathBuf::from(format!("/run/lb/{instance}-bird"))
}

/// The files of a BIRD that lbd drives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BirdPaths {
    pub dir: PathBuf,
}

impl BirdPaths {
    /// BIRD's files for `instance` with `settings` (`bird_dir`, or the
    /// instance's default).
    pub fn new(instance: &str, settings: &BgpSettings) -> BirdPaths {
        BirdPaths {
            dir: settings
                .bird_dir
                .clone()
                .unwrap_or_else(|| default_bird_dir(instance)),
        }
    }
    pub fn config(&self) -> PathBuf {
        self.dir.join("bird.conf")
    }
    pub fn socket(&self) -> PathBuf {
        self.dir.join("bird.ctl")
    }
    pub fn pid(&self) -> PathBuf {
        self.dir.join("bird.pid")
    }
    pub fn log(&self) -> PathBuf {
        self.dir.join("bird.log")
    }
    /// The BIRD guard's lock (its PID inside) and log.
    pub fn guard_lock(&self) -> PathBuf {
        self.dir.join("guard.lock")
    }
    pub fn guard_log(&self) -> PathBuf {
        self.dir.join("guard.log")
    }
}

/// BIRD's config for `settings`, announcing `prefixes` (host routes: /32,
/// /128). The same inputs give the same text, byte for byte.
pub fn render(
    settings: &BgpSettings,
    paths: &BirdPaths,
    instance: &str,
    prefixes: &BTreeSet<IpAddr>,
) -> String {
    let mut c = String::new();
    let _ = writeln!(
        c,
        "# Written by lbd (instance {instance}). Do not edit: lbd rewrites this file on every"
    );
    let _ = writeln!(
        c,
        "# change and reloads BIRD through its control socket. To run BIRD yourself:"
    );
    let _ = writeln!(
        c,
        "#   bird -c {} -s {} -P {}",
        paths.config().display(),
        paths.socket().display(),
        paths.pid().display()
    );
    let _ = writeln!(
        c,
        "log \"{}\" {{ info, remote, warning, error, auth, fatal, bug }};",
        paths.log().display()
    );
    let _ = writeln!(c, "router id {};", settings.router_id);
    c += "\nprotocol device {\n}\n";
    c += "\n# VIP addresses with a healthy backend, while the data plane is attached.\n";
    c += "# Never installed in this host's routing table (there is no kernel protocol).\n";
    for (name, v6) in [(STATIC_PROTOCOLS[0], false), (STATIC_PROTOCOLS[1], true)] {
        let _ = writeln!(
            c,
            "protocol static {name} {{\n  {};",
            if v6 { "ipv6" } else { "ipv4" }
        );
        for p in prefixes.iter().filter(|p| p.is_ipv6() == v6) {
            let len = if v6 { 128 } else { 32 };
            let _ = writeln!(c, "  route {p}/{len} blackhole;");
        }
        c += "}\n";
    }
    if settings.bfd {
        c += "\nprotocol bfd {\n}\n";
    }
    for (i, n) in settings.neighbors.iter().enumerate() {
        let (family, statics) = if n.address.is_ipv6() {
            ("ipv6", "lb_vips_v6")
        } else {
            ("ipv4", "lb_vips_v4")
        };
        let _ = writeln!(c, "\nprotocol bgp router_{} {{", i + 1);
        let _ = writeln!(c, "  description \"{}\";", n.address);
        let _ = writeln!(c, "  local as {};", settings.local_as);
        let _ = writeln!(
            c,
            "  neighbor {} port {} as {};",
            n.address, n.port, n.remote_as
        );
        // The routers are on this host's links (also for iBGP, which BIRD
        // would otherwise treat as multihop).
        c += "  direct;\n";
        let _ = writeln!(c, "  hold time {};", settings.hold_time);
        let _ = writeln!(c, "  keepalive time {};", (settings.hold_time / 3).max(1));
        c += "  connect retry time 5;\n";
        if settings.bfd {
            c += "  bfd on;\n";
        }
        let _ = writeln!(
            c,
            "  {family} {{\n    import none;\n    export where proto = \"{statics}\";\n    next hop self;\n  }};"
        );
        c += "}\n";
    }
    c
}

/// Why talking to BIRD failed.
#[derive(Debug, thiserror::Error)]
pub enum BirdError {
    #[error("BIRD's control socket {socket} does not answer: {source}")]
    Unreachable {
        socket: String,
        source: std::io::Error,
    },
    #[error("talking to BIRD over {socket}: {message}")]
    Protocol { socket: String, message: String },
    #[error("BIRD refused {command:?}: {reply}")]
    Refused { command: String, reply: String },
    #[error("writing BIRD's config {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error("starting BIRD ({program}): {message}")]
    Start { program: String, message: String },
}

/// How long one exchange with BIRD may take.
const BIRD_TIMEOUT: Duration = Duration::from_secs(5);

/// Sends `command` to the BIRD behind `socket` and returns its reply lines
/// (code, text). BIRD's replies are lines `CODE-text` (more follow),
/// ` text` (continuation) and `CODE text` (the last); codes from 8000 on
/// are errors.
pub async fn bird_command(socket: &Path, command: &str) -> Result<Vec<(u16, String)>, BirdError> {
    let name = socket.display().to_string();
    let exchange = async {
        let stream =
            UnixStream::connect(socket)
                .await
                .map_err(|source| BirdError::Unreachable {
                    socket: name.clone(),
                    source,
                })?;
        let (read, mut write) = stream.into_split();
        let mut lines = BufReader::new(read).lines();
        let protocol = |message: String| BirdError::Protocol {
            socket: name.clone(),
            message,
        };
        let io = |e: std::io::Error| protocol(e.to_string());
        // The greeting: "0001 BIRD 2.0.12 ready."
        let hello = lines
            .next_line()
            .await
            .map_err(io)?
            .ok_or_else(|| protocol("closed before its greeting".into()))?;
        if !hello.starts_with("0001 ") {
            return Err(protocol(format!("unexpected greeting {hello:?}")));
        }
        write
            .write_all(format!("{command}\n").as_bytes())
            .await
            .map_err(io)?;
        let mut reply = Vec::new();
        let mut code = 0u16;
        loop {
            let line = lines
                .next_line()
                .await
                .map_err(io)?
                .ok_or_else(|| protocol("closed in the middle of a reply".into()))?;
            if let Some(rest) = line.strip_prefix(' ') {
                reply.push((code, rest.to_string()));
                continue;
            }
            let parsed = line.get(..4).and_then(|c| c.parse::<u16>().ok());
            let (Some(c), Some(sep)) = (parsed, line.as_bytes().get(4)) else {
                return Err(protocol(format!("unexpected reply line {line:?}")));
            };
            code = c;
            reply.push((code, line[5..].to_string()));
            if *sep == b' ' {
                return Ok(reply);
            }
        }
    };
    tokio::time::timeout(BIRD_TIMEOUT, exchange)
        .await
        .map_err(|_| BirdError::Protocol {
            socket: name.clone(),
            message: format!("no complete reply to {command:?} within {BIRD_TIMEOUT:?}"),
        })?
}

/// `command`, failing if BIRD's last reply line has an error code.
async fn bird_ok(socket: &Path, command: &str) -> Result<Vec<(u16, String)>, BirdError> {
    let reply = bird_command(socket, command).await?;
    match reply.last() {
        Some((code, _)) if *code >= 8000 => Err(BirdError::Refused {
            command: command.into(),
            reply: reply
                .iter()
                .map(|(_, t)| t.as_str())
                .collect::<Vec<_>>()
                .join(" / "),
        }),
        _ => Ok(reply),
    }
}

/// What the controller wants announced.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Announcement {
    /// `None`: `[bgp]` was removed from the config: withdraw everything.
    pub settings: Option<BgpSettings>,
    pub prefixes: BTreeSet<IpAddr>,
}

/// Keeps one BIRD's config equal to the desired announcement.
pub struct Announcer {
    instance: String,
    /// BIRD's files; fixed at start (changing `bird_dir` needs a restart).
    paths: BirdPaths,
    /// Settings last rendered (the last good ones once `[bgp]` is removed).
    settings: BgpSettings,
    /// What BIRD has confirmed, if anything yet.
    announced: Option<BTreeSet<IpAddr>>,
    /// The config text BIRD last accepted.
    accepted: Option<String>,
    /// Whether this process has made sure the VIPs' static protocols are
    /// enabled (the BIRD guard disables them when lbd dies).
    enabled: bool,
}

impl Announcer {
    pub fn new(instance: &str, settings: BgpSettings) -> Announcer {
        Announcer {
            instance: instance.to_string(),
            paths: BirdPaths::new(instance, &settings),
            settings,
            announced: None,
            accepted: None,
            enabled: false,
        }
    }

    pub fn paths(&self) -> &BirdPaths {
        &self.paths
    }

    /// Makes BIRD announce exactly `want` (with `settings`, if given):
    /// writes the config and has BIRD reload it, starting BIRD first if it
    /// does not answer and `start_bird` is on. Nothing is sent when BIRD
    /// already has this config.
    pub async fn apply(
        &mut self,
        settings: Option<&BgpSettings>,
        want: &BTreeSet<IpAddr>,
    ) -> Result<(), BirdError> {
        if let Some(s) = settings {
            if s.bird_dir.clone().unwrap_or_else(|| self.paths.dir.clone()) != self.paths.dir {
                tracing::warn!(
                    now = %self.paths.dir.display(),
                    "bgp.bird_dir changed: restart lbd to move BIRD; keeping the old directory"
                );
            }
            self.settings = s.clone();
        }
        let empty = BTreeSet::new();
        let want = if settings.is_some() { want } else { &empty };
        let text = render(&self.settings, &self.paths, &self.instance, want);
        if self.accepted.as_ref() == Some(&text) {
            return Ok(());
        }
        self.write(&text)?;
        match bird_ok(&self.paths.socket(), "configure").await {
            Ok(_) => {}
            // Withdrawing everything from a BIRD that is not running: done
            // (it announces nothing); it reads the file when it starts.
            Err(BirdError::Unreachable { .. }) if settings.is_none() => {
                self.announced = Some(BTreeSet::new());
                return Ok(());
            }
            Err(BirdError::Unreachable { .. }) if self.settings.start_bird => {
                self.start_bird().await?;
            }
            Err(e) => return Err(e),
        }
        self.accepted = Some(text);
        if !self.enabled && settings.is_some() {
            // A guard may have withdrawn the VIPs of the lbd before this
            // one (see the module docs); "already enabled" is no error.
            for p in STATIC_PROTOCOLS {
                bird_ok(&self.paths.socket(), &format!("enable {p}")).await?;
            }
            self.enabled = true;
        }
        let before = self.announced.replace(want.clone()).unwrap_or_default();
        let peers: Vec<String> = self
            .settings
            .neighbors
            .iter()
            .map(|n| n.address.to_string())
            .collect();
        for p in want.difference(&before) {
            tracing::info!(vip = %p, peers = %peers.join(","), "VIP announced over BGP");
        }
        for p in before.difference(want) {
            tracing::info!(vip = %p, peers = %peers.join(","), "VIP withdrawn from BGP");
        }
        Ok(())
    }

    /// The config file, atomically (temp file, fsync, rename).
    fn write(&self, text: &str) -> Result<(), BirdError> {
        let path = self.paths.config();
        let err = |source| BirdError::Write {
            path: path.display().to_string(),
            source,
        };
        std::fs::create_dir_all(&self.paths.dir).map_err(err)?;
        let tmp = self
            .paths
            .dir
            .join(format!(".bird.conf.tmp-{}", std::process::id()));
        let mut f = std::fs::File::create(&tmp).map_err(err)?;
        f.write_all(text.as_bytes()).map_err(err)?;
        f.sync_all().map_err(err)?;
        drop(f);
        std::fs::rename(&tmp, &path).map_err(err)
    }

    /// Starts BIRD on our config and waits until its control socket
    /// answers. BIRD forks into the background once its config parsed;
    /// a config it rejects makes the start fail with BIRD's message.
    async fn start_bird(&self) -> Result<(), BirdError> {
        let program = self.settings.bird_binary.display().to_string();
        let start_err = |message: String| BirdError::Start {
            program: program.clone(),
            message,
        };
        // A stale socket from a BIRD that died would make bind fail.
        let _ = std::fs::remove_file(self.paths.socket());
        let errors = self.paths.dir.join("bird-start.log");
        let log = std::fs::File::create(&errors).map_err(|e| start_err(e.to_string()))?;
        let mut cmd = std::process::Command::new(&self.settings.bird_binary);
        cmd.arg("-c")
            .arg(self.paths.config())
            .arg("-s")
            .arg(self.paths.socket())
            .arg("-P")
            .arg(self.paths.pid())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log);
        let status = tokio::task::spawn_blocking(move || cmd.status())
            .await
            .map_err(|e| start_err(e.to_string()))?
            .map_err(|e| start_err(e.to_string()))?;
        if !status.success() {
            let said = std::fs::read_to_string(&errors).unwrap_or_default();
            return Err(start_err(format!("exited with {status}: {}", said.trim())));
        }
        let deadline = tokio::time::Instant::now() + BIRD_TIMEOUT;
        loop {
            match bird_command(&self.paths.socket(), "show status").await {
                Ok(_) => break,
                Err(e) if tokio::time::Instant::now() > deadline => {
                    return Err(start_err(format!("started, but {e}")));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
        tracing::info!(
            config = %self.paths.config().display(),
            socket = %self.paths.socket().display(),
            "BIRD started"
        );
        Ok(())
    }
}

/// How long to wait before trying BIRD again after a failure.
const RETRY: Duration = Duration::from_secs(2);

/// The running announcer task.
pub struct AnnouncerTask {
    stop: oneshot::Sender<bool>,
    task: JoinHandle<()>,
}

/// Runs `announcer` until stopped: follows the announcements on `rx`,
/// retrying every 2 s while BIRD fails (logged once per failure streak).
pub fn spawn(mut announcer: Announcer, mut rx: watch::Receiver<Announcement>) -> AnnouncerTask {
    let (stop_tx, mut stop_rx) = oneshot::channel::<bool>();
    // The stop says whether the data plane goes too (then lbd withdraws
    // whatever `on_shutdown` says).
    let task = tokio::spawn(async move {
        let mut failing = false;
        let mut closed = false;
        loop {
            let want = rx.borrow_and_update().clone();
            match announcer
                .apply(want.settings.as_ref(), &want.prefixes)
                .await
            {
                Ok(()) => {
                    if failing {
                        tracing::info!("BIRD follows the announcements again");
                    }
                    failing = false;
                }
                Err(e) => {
                    if !failing {
                        tracing::error!(error = %e, "announcing the VIPs failed; retrying every {RETRY:?}");
                    }
                    failing = true;
                }
            }
            let detaching = tokio::select! {
                d = &mut stop_rx => d.unwrap_or(true),
                changed = rx.changed(), if !closed => {
                    // Closed: the controller is gone; wait for the stop.
                    closed = changed.is_err();
                    continue;
                }
                _ = tokio::time::sleep(RETRY), if failing => continue,
            };
            if detaching || announcer.settings.on_shutdown == ShutdownPolicy::Withdraw {
                match announcer.apply(None, &BTreeSet::new()).await {
                    Ok(()) => tracing::info!("every VIP withdrawn from BGP (shutting down)"),
                    Err(e) => tracing::error!(error = %e, "withdrawing the VIPs failed"),
                }
            } else {
                tracing::info!(
                    "shutting down; BIRD keeps announcing the VIPs (bgp.on_shutdown = \"keep\")"
                );
            }
            return;
        }
    });
    AnnouncerTask {
        stop: stop_tx,
        task,
    }
}

impl AnnouncerTask {
    /// Stops the task. Every VIP is withdrawn first if `bgp.on_shutdown` is
    /// "withdraw" or the data plane is `detaching` (nothing would forward
    /// the VIPs' traffic).
    pub async fn stop(self, detaching: bool) {
        let _ = self.stop.send(detaching);
        if tokio::time::timeout(BIRD_TIMEOUT * 2, self.task)
            .await
            .is_err()
        {
            tracing::error!("BIRD did not confirm the withdrawal in time");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> BgpSettings {
        BgpSettings {
            router_id: Ipv4Addr::new(10, 0, 0, 1),
            local_as: 65010,
            neighbors: vec![
                BgpNeighbor {
                    address: "10.0.0.254".parse().unwrap(),
                    remote_as: 65000,
                    port: 179,
                },
                BgpNeighbor {
                    address: "fd00::fe".parse().unwrap(),
                    remote_as: 65000,
                    port: 1179,
                },
            ],
            hold_time: 9,
            bfd: true,
            bird_dir: None,
            bird_binary: "bird".into(),
            start_bird: true,
            on_shutdown: ShutdownPolicy::Keep,
            dead_after: Duration::from_secs(10),
        }
    }

    #[test]
    fn render_puts_each_prefix_in_its_family_and_is_deterministic() {
        let paths = BirdPaths {
            dir: "/run/lb/t-bird".into(),
        };
        let prefixes: BTreeSet<IpAddr> = ["203.0.113.10", "2001:db8::1", "203.0.113.9"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        let text = render(&settings(), &paths, "t", &prefixes);
        assert_eq!(text, render(&settings(), &paths, "t", &prefixes.clone()));
        let v4 = text.find("protocol static lb_vips_v4").unwrap();
        let v6 = text.find("protocol static lb_vips_v6").unwrap();
        let r9 = text.find("route 203.0.113.9/32 blackhole;").unwrap();
        let r10 = text.find("route 203.0.113.10/32 blackhole;").unwrap();
        let r6 = text.find("route 2001:db8::1/128 blackhole;").unwrap();
        assert!(v4 < r9 && r9 < r10 && r10 < v6 && v6 < r6, "{text}");
        assert!(text.contains("neighbor 10.0.0.254 port 179 as 65000;"));
        assert!(text.contains("neighbor fd00::fe port 1179 as 65000;"));
        assert!(text.contains("export where proto = \"lb_vips_v6\";"));
        assert!(text.contains("hold time 9;\n  keepalive time 3;"));
        assert!(text.contains("bfd on;") && text.contains("protocol bfd"));
        assert!(text.contains("router id 10.0.0.1;"));
    }

    #[test]
    fn shutdown_policy_parses() {
        assert_eq!("keep".parse(), Ok(ShutdownPolicy::Keep));
        assert_eq!("withdraw".parse(), Ok(ShutdownPolicy::Withdraw));
        assert!("drop".parse::<ShutdownPolicy>().is_err());
    }
}
