//! A real etcd cluster of the test's own (Debian's etcd-server 3.4 and
//! etcdctl, which `cargo xtask setup` installs), on 127.0.0.1 of the
//! calling process's network namespace: for tests of lbd's fleet mode
//! against the store it runs on in production, including members that die
//! and come back. Data directories and the members' logs live in a temp
//! directory; the members and the directory go on drop (also when the test
//! panics).
//!
//! The test talks to etcd through `etcdctl`, not a client library: a test
//! writes what lbd must cope with (corrupt documents, deletions) and reads
//! what lbd wrote, through a second implementation of the protocol rather
//! than the one lbd itself uses.

use std::{
    fs::{self, File, OpenOptions},
    io::{self, Read, Seek, SeekFrom, Write},
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        Mutex, MutexGuard,
        atomic::{AtomicU32, Ordering},
    },
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result, anyhow, bail};
use socket2::{Domain, Socket, Type};

/// Debian's etcd-server.
pub const ETCD: &str = "/usr/bin/etcd";
/// Debian's etcd-client.
pub const ETCDCTL: &str = "/usr/bin/etcdctl";

/// Raft heartbeat interval (ms). etcd's default (100 ms) is kept: it is the
/// election timeout that has to grow on a loaded machine, not the
/// heartbeat.
pub const HEARTBEAT_MS: u32 = 100;

/// Raft election timeout (ms), 15 heartbeats. etcd's default (1000 ms) is
/// too short for a busy 2-core VM: tests, lbd and three members compete for
/// two CPUs and one disk, a follower that misses heartbeats for a second
/// (a slow fsync, a starved Go scheduler) starts an election, and a test of
/// "nothing failed" would see a leader change it did not cause. With
/// 1500 ms there is no election without a fault; a killed leader is still
/// replaced within about 2 s.
pub const ELECTION_MS: u32 = 1500;

/// How long `start` and `restart` wait for the members to be healthy.
pub const HEALTHY_TIMEOUT: Duration = Duration::from_secs(20);

/// How long `put`, `get` and `del` keep retrying: a request sent while the
/// cluster elects a new leader (just after a `kill`) fails, and tests want
/// the write, not the transient error.
pub const OP_TIMEOUT: Duration = Duration::from_secs(15);

/// How long one etcdctl attempt of `put`, `get` or `del` may take. A
/// request that reached a follower just as the leader died is never
/// answered (its proposal went to the dead leader), only timed out: this
/// bounds what that costs, and is still ten times what a write takes on a
/// loaded VM.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);

/// How long `stop` waits after SIGTERM before it SIGKILLs.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// The backend quota: far more than any test writes, far less than the
/// 2 GiB default, so a runaway writer hits "database space exceeded" in
/// seconds rather than filling the disk.
const QUOTA_BACKEND_BYTES: u64 = 256 << 20;

/// Lines of each member's log that `logs` returns.
const LOG_TAIL_LINES: usize = 40;

static NEXT: AtomicU32 = AtomicU32::new(0);

/// One member: its ports (held for the cluster's life), and its process
/// while it runs.
struct Member {
    name: String,
    /// The address it listens on (127.0.0.1, or one of a lab namespace's).
    host: std::net::Ipv4Addr,
    client_port: u16,
    peer_port: u16,
    /// The sockets that reserve both ports (see [`reserve_port`]); none in
    /// a namespace of the test's own, where nothing else binds.
    _reserved: Vec<Socket>,
    /// `None` before the first start and after `kill`/`stop`; a child that
    /// exited by itself stays here, so the cluster can tell a crash from a
    /// kill.
    child: Mutex<Option<Child>>,
}

/// A running etcd cluster on 127.0.0.1 (or in a lab's namespace: see
/// [`EtcdCluster::start_in`]), killed and removed on drop.
pub struct EtcdCluster {
    /// The temp directory: `m<i>/` (data) and `m<i>.log` per member.
    pub dir: PathBuf,
    token: String,
    members: Vec<Member>,
    /// The network namespace the members run in (and etcdctl with them),
    /// if not the test's own.
    netns: Option<String>,
}

impl EtcdCluster {
    /// Starts a new cluster of `members` members (1 for most tests, 3 to
    /// kill one) and waits until every member is healthy.
    pub fn start(members: usize) -> Result<EtcdCluster> {
        Self::start_on(members, None)
    }

    /// Starts a cluster with one member per address of `hosts`, in the
    /// network namespace `netns` (where the addresses are), on ports 2379
    /// (clients) and 2380 (peers): for labs whose balancers reach etcd
    /// over their own links. etcdctl runs in `netns` too.
    pub fn start_in(
        netns: &crate::netns::Netns,
        hosts: &[std::net::Ipv4Addr],
    ) -> Result<EtcdCluster> {
        Self::start_on(
            hosts.len(),
            Some((netns.name().to_string(), hosts.to_vec())),
        )
    }

    fn start_on(
        members: usize,
        place: Option<(String, Vec<std::net::Ipv4Addr>)>,
    ) -> Result<EtcdCluster> {
        if members == 0 {
            bail!("an etcd cluster needs at least one member");
        }
        for bin in [ETCD, ETCDCTL] {
            if !std::path::Path::new(bin).exists() {
                bail!(
                    "{bin} is missing: install etcd-server and etcd-client (`cargo xtask setup`)"
                );
            }
        }
        let dir = temp_dir()?;
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        // Unique per cluster, so a member never joins another test's
        // cluster even if it reached that cluster's peer port.
        let token = format!(
            "{}-{nanos}",
            dir.file_name().unwrap_or_default().to_string_lossy()
        );
        let mut cluster = EtcdCluster {
            dir,
            token,
            members: Vec::with_capacity(members),
            netns: place.as_ref().map(|(n, _)| n.clone()),
        };
        for i in 0..members {
            let member = match &place {
                Some((_, hosts)) => Member {
                    name: format!("m{i}"),
                    host: hosts[i],
                    client_port: 2379,
                    peer_port: 2380,
                    _reserved: Vec::new(),
                    child: Mutex::new(None),
                },
                None => {
                    let (client, client_port) = reserve_port()?;
                    let (peer, peer_port) = reserve_port()?;
                    Member {
                        name: format!("m{i}"),
                        host: std::net::Ipv4Addr::LOCALHOST,
                        client_port,
                        peer_port,
                        _reserved: vec![client, peer],
                        child: Mutex::new(None),
                    }
                }
            };
            cluster.members.push(member);
        }
        // On an error from here on, drop kills what started.
        for i in 0..members {
            let child = cluster.spawn(i, "new")?;
            *cluster.slot(i) = Some(child);
        }
        cluster
            .wait_healthy(HEALTHY_TIMEOUT)
            .context("starting an etcd cluster")?;
        Ok(cluster)
    }

    /// The number of members (running or not).
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Whether the cluster has no members (never: `start` refuses 0).
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Member `i`'s client URL, `http://HOST:PORT`.
    pub fn endpoint(&self, i: usize) -> String {
        let m = &self.members[i];
        format!("http://{}:{}", m.host, m.client_port)
    }

    /// Enters the cluster's namespace on this thread (etcd and etcdctl
    /// started from it run there), if it has one.
    fn enter(&self) -> Result<Option<crate::netns::NetnsGuard>> {
        self.netns.as_deref().map(crate::netns::enter).transpose()
    }

    /// Every member's client URL, running or not (what lbd is configured
    /// with: a client must cope with the members that are down).
    pub fn endpoints(&self) -> Vec<String> {
        (0..self.len()).map(|i| self.endpoint(i)).collect()
    }

    /// Whether member `i`'s process runs.
    pub fn is_running(&self, i: usize) -> bool {
        matches!(self.slot(i).as_mut().map(Child::try_wait), Some(Ok(None)))
    }

    /// SIGKILLs member `i` and reaps it: a crash, no leadership transfer,
    /// no clean shutdown of its files.
    pub fn kill(&self, i: usize) -> Result<()> {
        let mut child = self.take_running(i)?;
        child
            .kill()
            .with_context(|| format!("killing etcd member {i}"))?;
        child.wait()?;
        Ok(())
    }

    /// SIGTERMs member `i` and waits for it to exit (a leader hands over
    /// leadership first); SIGKILL and an error after 10 s.
    pub fn stop(&self, i: usize) -> Result<ExitStatus> {
        let mut child = self.take_running(i)?;
        // SAFETY: kill(2) on our own, not yet reaped child's pid.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "etcd member {i} did not exit within {STOP_TIMEOUT:?} of SIGTERM:\n{}",
                    self.logs()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts member `i` again on its data directory and ports
    /// (`--initial-cluster-state existing`). If the running members then
    /// form a quorum, waits until every one of them (`i` too: it has caught
    /// up far enough to serve a linearizable read) is healthy; without a
    /// quorum no member can be, so it returns at once and the test calls
    /// [`EtcdCluster::wait_healthy`] once enough members are back.
    pub fn restart(&self, i: usize) -> Result<()> {
        {
            let mut slot = self.slot(i);
            if matches!(slot.as_mut().map(Child::try_wait), Some(Ok(None))) {
                drop(slot);
                bail!("etcd member {i} is already running");
            }
            *slot = Some(self.spawn(i, "existing")?);
        }
        let running = (0..self.len()).filter(|&j| self.is_running(j)).count();
        if running > self.len() / 2 {
            self.wait_healthy(HEALTHY_TIMEOUT)
                .with_context(|| format!("restarting etcd member {i}"))?;
        }
        Ok(())
    }

    /// Waits until every running member answers `etcdctl endpoint health`
    /// (a linearizable read through it: it needs a leader and a quorum).
    /// Fails at once, with the logs, if a member exited by itself.
    pub fn wait_healthy(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let last = loop {
            for i in 0..self.len() {
                // The slot's lock goes before `logs` takes it again.
                let state = self.slot(i).as_mut().map(Child::try_wait);
                if let Some(Ok(Some(status))) = state {
                    bail!("etcd member {i} exited ({status}):\n{}", self.logs());
                }
            }
            let endpoints = self.running_endpoints();
            if endpoints.is_empty() {
                bail!("no etcd member is running");
            }
            let _in = self.enter()?;
            let err = match etcdctl(
                &endpoints,
                &["endpoint", "health"],
                None,
                Duration::from_secs(2),
            ) {
                Ok(_) => return Ok(()),
                Err(e) => e,
            };
            if Instant::now() > deadline {
                break err;
            }
            thread::sleep(Duration::from_millis(100));
        };
        bail!(
            "etcd members {:?} not healthy within {timeout:?}: {last:#}\n{}",
            self.running_endpoints(),
            self.logs()
        )
    }

    /// Which member leads, as the running members see it.
    pub fn leader(&self) -> Result<usize> {
        let out = self.etcdctl(&["endpoint", "status", "-w", "json"])?;
        let statuses: serde_json::Value =
            serde_json::from_str(&out).with_context(|| format!("endpoint status: {out}"))?;
        let statuses = statuses.as_array().context("endpoint status: not a list")?;
        for s in statuses {
            let member = &s["Status"]["header"]["member_id"];
            if member.is_u64() && *member == s["Status"]["leader"] {
                let url = s["Endpoint"].as_str().unwrap_or_default();
                return (0..self.len())
                    .find(|&i| self.endpoint(i) == url)
                    .with_context(|| format!("the leader {url} is not a member"));
            }
        }
        bail!("no running member leads: {out}")
    }

    /// Puts `value` (any text: it goes through etcdctl's stdin, byte for
    /// byte) at `key`, through the running members; retried for
    /// [`OP_TIMEOUT`].
    pub fn put(&self, key: &str, value: &str) -> Result<()> {
        // etcdctl takes empty stdin for no value at all ("put command
        // needs 1 argument and input from stdin"), so an empty value goes
        // as an argument; after `--`, so a key or value with a leading `-`
        // is not a flag.
        let (args, stdin) = if value.is_empty() {
            (vec!["put", "--", key, ""], None)
        } else {
            (vec!["put", "--", key], Some(value.as_bytes()))
        };
        self.retry(&format!("put {key:?}"), None, |endpoints| {
            etcdctl(endpoints, &args, stdin, ATTEMPT_TIMEOUT).map(drop)
        })
    }

    /// The value at `key` (a linearizable read), through the running
    /// members; retried for [`OP_TIMEOUT`].
    pub fn get(&self, key: &str) -> Result<Option<String>> {
        self.retry(&format!("get {key:?}"), None, |endpoints| {
            get_value(endpoints, key)
        })
    }

    /// The value at `key` read through member `i` alone: a linearizable
    /// read, so it answers only once `i` has applied everything committed
    /// before the read.
    pub fn get_at(&self, i: usize, key: &str) -> Result<Option<String>> {
        self.retry(&format!("get {key:?} from member {i}"), Some(i), |e| {
            get_value(e, key)
        })
    }

    /// Deletes `key` (absent is fine), through the running members; retried
    /// for [`OP_TIMEOUT`].
    pub fn del(&self, key: &str) -> Result<()> {
        self.retry(&format!("del {key:?}"), None, |endpoints| {
            etcdctl(endpoints, &["del", "--", key], None, ATTEMPT_TIMEOUT).map(drop)
        })
    }

    /// Runs `etcdctl ARGS` once against the running members and returns its
    /// stdout (for what the helpers do not cover: `member list`, leases,
    /// an expected failure), with etcdctl's default command timeout (5 s).
    pub fn etcdctl(&self, args: &[&str]) -> Result<String> {
        let endpoints = self.running_endpoints();
        let _in = self.enter()?;
        let out = etcdctl(&endpoints, args, None, Duration::from_secs(5))?;
        Ok(String::from_utf8_lossy(&out).into_owned())
    }

    /// The last lines of each member's log, each under a header with its
    /// endpoint and state: for a failing test's message.
    pub fn logs(&self) -> String {
        let mut all = String::new();
        for (i, m) in self.members.iter().enumerate() {
            let state = match self.slot(i).as_mut().map(Child::try_wait) {
                Some(Ok(None)) => "running".to_string(),
                Some(Ok(Some(status))) => format!("exited ({status})"),
                Some(Err(e)) => format!("unknown ({e})"),
                None => "not running".to_string(),
            };
            let path = self.log_path(i);
            all += &format!(
                "--- etcd {} ({}, peer port {}; {state}), end of {} ---\n",
                m.name,
                self.endpoint(i),
                m.peer_port,
                path.display()
            );
            all += &tail(&path, LOG_TAIL_LINES);
        }
        all
    }

    fn log_path(&self, i: usize) -> PathBuf {
        self.dir.join(format!("{}.log", self.members[i].name))
    }

    /// Member `i`'s process slot (a panic elsewhere does not stop drop from
    /// killing it).
    fn slot(&self, i: usize) -> MutexGuard<'_, Option<Child>> {
        self.members[i]
            .child
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Takes member `i`'s process out of its slot, if it runs.
    fn take_running(&self, i: usize) -> Result<Child> {
        let why = {
            let mut slot = self.slot(i);
            match slot.as_mut().map(Child::try_wait) {
                Some(Ok(None)) => return Ok(slot.take().expect("a child")),
                Some(Ok(Some(status))) => format!("exited by itself ({status})"),
                Some(Err(e)) => format!("in an unknown state ({e})"),
                None => "not running".to_string(),
            }
        };
        bail!("etcd member {i} is {why}:\n{}", self.logs())
    }

    fn running_endpoints(&self) -> Vec<String> {
        (0..self.len())
            .filter(|&i| self.is_running(i))
            .map(|i| self.endpoint(i))
            .collect()
    }

    /// Runs `op` against the running members (or member `only`) until it
    /// succeeds or [`OP_TIMEOUT`] passes.
    fn retry<T>(
        &self,
        what: &str,
        only: Option<usize>,
        mut op: impl FnMut(&[String]) -> Result<T>,
    ) -> Result<T> {
        let deadline = Instant::now() + OP_TIMEOUT;
        let last = loop {
            let endpoints = match only {
                Some(i) if self.is_running(i) => vec![self.endpoint(i)],
                Some(i) => bail!("{what}: etcd member {i} is not running"),
                None => self.running_endpoints(),
            };
            if endpoints.is_empty() {
                bail!("{what}: no etcd member is running");
            }
            let _in = self.enter()?;
            let err = match op(&endpoints) {
                Ok(v) => return Ok(v),
                Err(e) => e,
            };
            // A usage error does not go away by waiting.
            if err
                .downcast_ref::<EtcdctlFailed>()
                .is_some_and(|e| e.misused)
            {
                return Err(err.context(what.to_string()));
            }
            if Instant::now() > deadline {
                break err;
            }
            thread::sleep(Duration::from_millis(200));
        };
        bail!(
            "{what} kept failing for {OP_TIMEOUT:?}: {last:#}\n{}",
            self.logs()
        )
    }

    /// Starts member `i`'s process, its output appended to its log.
    fn spawn(&self, i: usize, state: &str) -> Result<Child> {
        let m = &self.members[i];
        let path = self.log_path(i);
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        writeln!(
            log,
            "=== lbt: starting {} (cluster state {state}) ===",
            m.name
        )?;
        let client = self.endpoint(i);
        let peer = format!("http://{}:{}", m.host, m.peer_port);
        let initial_cluster = self
            .members
            .iter()
            .map(|m| format!("{}=http://{}:{}", m.name, m.host, m.peer_port))
            .collect::<Vec<_>>()
            .join(",");
        let mut cmd = Command::new(ETCD);
        cmd.arg("--name")
            .arg(&m.name)
            .arg("--data-dir")
            .arg(self.dir.join(&m.name))
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &initial_cluster])
            .args(["--initial-cluster-token", &self.token])
            .args(["--initial-cluster-state", state])
            .args(["--heartbeat-interval", &HEARTBEAT_MS.to_string()])
            .args(["--election-timeout", &ELECTION_MS.to_string()])
            // A member that comes back (restart) asks before it campaigns,
            // so it does not depose a healthy leader with a higher term
            // (3.4 defaults this off; 3.5 on).
            .arg("--pre-vote=true")
            // v3 only: lbd speaks v3, and the v2 API would be a second,
            // separate key space a test could write to by mistake.
            .arg("--enable-v2=false")
            .args(["--quota-backend-bytes", &QUOTA_BACKEND_BYTES.to_string()])
            // capnslog (3.4's default) prints one readable line per event;
            // zap's JSON lines are three times as long in a test's message.
            .args(["--logger", "capnslog"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        // etcd reads every ETCD_* variable as a flag (ETCD_FORCE_NEW_CLUSTER
        // would rewrite the membership): only the flags above count.
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("ETCD_") {
                cmd.env_remove(k);
            }
        }
        let _in = self.enter()?;
        cmd.spawn()
            .with_context(|| format!("starting etcd member {}", m.name))
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.len() {
            if let Some(mut child) = self.slot(i).take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Makes `lbt-etcd-<pid>-<n>` in the temp directory; a name a killed
/// process of the same (reused) pid left behind is skipped, not taken over.
fn temp_dir() -> Result<PathBuf> {
    for _ in 0..1000 {
        let dir = std::env::temp_dir().join(format!(
            "lbt-etcd-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        match fs::create_dir(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e).with_context(|| format!("creating {}", dir.display())),
        }
    }
    bail!("1000 etcd temp dir names of this pid are taken")
}

/// A free port on 127.0.0.1, reserved for as long as the returned socket
/// lives.
///
/// The kernel picks the port (bind to port 0), so parallel test processes
/// never pick the same one; the socket then stays bound, never listening,
/// with SO_REUSEADDR set after the bind. That is what lets etcd (Go sets
/// SO_REUSEADDR on its listeners) bind and listen on the port, while no
/// one else can take it while a member is down between `kill` and
/// `restart`: a plain bind conflicts with the reservation, a bind to port 0
/// skips it, and an outgoing connection never gets it as its source port
/// (the kernel's connect() skips ports that bind() holds).
fn reserve_port() -> Result<(Socket, u16)> {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    socket
        .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .context("reserving a port on 127.0.0.1")?;
    socket.set_reuse_address(true)?;
    let port = socket
        .local_addr()?
        .as_socket()
        .context("a bound IPv4 socket has a port")?
        .port();
    Ok((socket, port))
}

/// Runs `etcdctl --endpoints ENDPOINTS ARGS` (API v3) once, `stdin` on its
/// standard input, and returns its stdout; an error with its stderr if it
/// fails.
fn etcdctl(
    endpoints: &[String],
    args: &[&str],
    stdin: Option<&[u8]>,
    command_timeout: Duration,
) -> Result<Vec<u8>> {
    let mut cmd = Command::new(ETCDCTL);
    // Like etcd, etcdctl reads ETCDCTL_* variables as flags (a stray
    // ETCDCTL_CACERT would switch it to TLS).
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("ETCDCTL_") {
            cmd.env_remove(k);
        }
    }
    cmd.env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={}", endpoints.join(",")))
        .arg("--dial-timeout=2s")
        .arg(format!(
            "--command-timeout={}ms",
            command_timeout.as_millis()
        ))
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().with_context(|| format!("running {cmd:?}"))?;
    if let Some(input) = stdin {
        // etcdctl reads all of stdin before it connects, so this cannot
        // block on a full stdout pipe; dropping the pipe sends EOF.
        let mut pipe = child.stdin.take().context("etcdctl's stdin")?;
        pipe.write_all(input)?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        return Err(EtcdctlFailed {
            message: format!(
                "etcdctl {} failed ({}): {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            // etcdctl's ExitInvalidInput and ExitBadArgs.
            misused: matches!(out.status.code(), Some(3 | 128)),
        }
        .into());
    }
    Ok(out.stdout)
}

/// A failed etcdctl run; `misused` if etcdctl refused its arguments or
/// input (not worth retrying) rather than failed to reach a cluster that
/// could answer.
#[derive(Debug)]
struct EtcdctlFailed {
    message: String,
    misused: bool,
}

impl std::fmt::Display for EtcdctlFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for EtcdctlFailed {}

/// `etcdctl get -w json KEY`: JSON, not the plain output, because the plain
/// output cannot tell a value's newlines from its own; the JSON has the
/// value in base64.
fn get_value(endpoints: &[String], key: &str) -> Result<Option<String>> {
    let out = etcdctl(
        endpoints,
        &["get", "-w", "json", "--", key],
        None,
        ATTEMPT_TIMEOUT,
    )?;
    let resp: serde_json::Value = serde_json::from_slice(&out)
        .with_context(|| format!("etcdctl get: {}", String::from_utf8_lossy(&out)))?;
    let Some(kv) = resp["kvs"].as_array().and_then(|kvs| kvs.first()) else {
        return Ok(None);
    };
    // An empty value has no "value" field at all.
    let value = base64_decode(kv["value"].as_str().unwrap_or_default())?;
    String::from_utf8(value)
        .map(Some)
        .map_err(|e| anyhow!("the value at {key:?} is not UTF-8: {e}"))
}

/// Standard base64 with padding (what etcdctl's JSON uses for bytes).
fn base64_decode(text: &str) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len() / 4 * 3);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in text.bytes().filter(|&c| c != b'=') {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => bail!("not base64: {text:?}"),
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Ok(out)
}

/// The last `lines` lines of the file at `path` (from its last 64 KiB).
fn tail(path: &std::path::Path, lines: usize) -> String {
    let Ok(mut file) = File::open(path) else {
        return format!("(no log at {})\n", path.display());
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = file.seek(SeekFrom::Start(len.saturating_sub(64 << 10)));
    let mut bytes = Vec::new();
    let _ = file.read_to_end(&mut bytes);
    let text = String::from_utf8_lossy(&bytes);
    let all: Vec<&str> = text.lines().collect();
    let mut out = all[all.len().saturating_sub(lines)..].join("\n");
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_decodes_what_etcdctl_writes() {
        assert_eq!(base64_decode("YQoiYiIKCg==").unwrap(), b"a\n\"b\"\n\n");
        assert_eq!(base64_decode("LWs=").unwrap(), b"-k");
        assert_eq!(base64_decode("").unwrap(), b"");
    }

    #[test]
    fn a_three_member_cluster_survives_one_member_killed() {
        let t = Instant::now();
        let etcd = EtcdCluster::start(3).unwrap();
        let started = t.elapsed();

        // Newlines, quotes and a leading dash survive the round trip.
        let doc = "{\"vip\": \"203.0.113.10\",\n \"note\": \"-x\"}\n";
        etcd.put("/lb/test/doc", doc).unwrap();
        assert_eq!(etcd.get("/lb/test/doc").unwrap().as_deref(), Some(doc));
        assert_eq!(etcd.get("/lb/test/absent").unwrap(), None);
        etcd.put("-dash", "").unwrap();
        assert_eq!(etcd.get("-dash").unwrap().as_deref(), Some(""));
        etcd.del("-dash").unwrap();
        assert_eq!(etcd.get("-dash").unwrap(), None);

        let leader = etcd.leader().unwrap();
        let t = Instant::now();
        etcd.kill(0).unwrap();
        assert!(!etcd.is_running(0));
        // The first write after the kill waits out an election if member 0
        // led.
        etcd.put("/lb/test/doc", "after the kill").unwrap();
        let write_after_kill = t.elapsed();
        assert_eq!(
            etcd.get("/lb/test/doc").unwrap().as_deref(),
            Some("after the kill")
        );

        let t = Instant::now();
        etcd.restart(0).unwrap();
        let restarted = t.elapsed();
        assert!(etcd.is_running(0));
        assert_eq!(
            etcd.get_at(0, "/lb/test/doc").unwrap().as_deref(),
            Some("after the kill"),
            "{}",
            etcd.logs()
        );
        let caught_up = t.elapsed();

        println!(
            "etcd: 3 members healthy in {:.2} s; member 0 {} the leader; \
             first write after killing it {:.2} s; restarted and healthy in {:.2} s, \
             caught up (linearizable read through it alone) in {:.2} s",
            started.as_secs_f64(),
            if leader == 0 { "was" } else { "was not" },
            write_after_kill.as_secs_f64(),
            restarted.as_secs_f64(),
            caught_up.as_secs_f64(),
        );
        let dir = etcd.dir.clone();
        drop(etcd);
        assert!(!dir.exists(), "{} outlived the cluster", dir.display());
    }
}
