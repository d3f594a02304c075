//! `lb-bench peers` (`cargo xtask bench --peers`): our VIP against what
//! operators run today, in one lab with the same backends and the same load
//! generator. The load goes in turn through:
//!
//! - `vip`: our XDP VIP (203.0.113.10:80, direct server return);
//! - `nftables`: netfilter NAT on the balancer host (203.0.113.20:80,
//!   round-robin DNAT plus SNAT, `bench/peers/nftables.nft`);
//! - `haproxy`: HAProxy in TCP mode on the balancer host (203.0.113.30:80,
//!   `bench/peers/haproxy.cfg`);
//! - `direct`: straight to backend b1, no balancer at all.
//!
//! Each measure runs for every peer in turn (the order rotates every round),
//! several rounds, so drift of the machine hits every peer alike; figures are
//! medians with the spread (min..max) of the rounds. docs/benchmarks.md
//! explains the method, in particular how balancer CPU is attributed.

use std::{
    collections::BTreeMap,
    fs,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use lb_tests::{
    lab::{Lab, LabSpec, VIP_V4, client::http_get, in_ns, servers::HTTP_PORT},
    netns::Netns,
    wrk::{WrkReport, WrkRun},
};

use super::median;

/// The nftables peer's service address (DNAT'd by the balancer host).
const NFT_SERVICE: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 20);
/// The HAProxy peer's service address (local to the balancer host).
const HAPROXY_SERVICE: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 30);
/// The balancer host's address on the shared network (the lab's).
const BALANCER: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 1);
/// A second address of the balancer host, the nftables peer's source NAT
/// address. Not the balancer's own: HAProxy connects to the backends from
/// that one, and its connections' TIME_WAIT on the backends would collide
/// with NAT'd connections using the same source port (whose SYNs the
/// backend then rejects as old duplicates: a one-second retransmit each).
/// Two balancer hosts would not share an address either.
const NFT_SNAT: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 5);
/// Backends in the lab, all of weight 1 (HAProxy's roundrobin and the
/// nftables map weigh them equally too).
const BACKENDS: usize = 3;
/// Concurrent connections of the request-rate runs and of the bulk runs.
const CONNECTIONS: u32 = 32;
const BULK_CONNECTIONS: u32 = 4;
const BULK_PATH: &str = "/bytes/1000000";

/// The peers, in the order of the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Peer {
    Vip,
    Nftables,
    Haproxy,
    Direct,
}

const PEERS: [Peer; 4] = [Peer::Vip, Peer::Nftables, Peer::Haproxy, Peer::Direct];

impl Peer {
    /// Its name in the table and in results.json.
    fn key(self) -> &'static str {
        match self {
            Peer::Vip => "vip",
            Peer::Nftables => "nftables",
            Peer::Haproxy => "haproxy",
            Peer::Direct => "direct",
        }
    }

    fn service(self, lab: &Lab) -> SocketAddr {
        let ip = match self {
            Peer::Vip => VIP_V4,
            Peer::Nftables => NFT_SERVICE,
            Peer::Haproxy => HAPROXY_SERVICE,
            Peer::Direct => lab.backends[0].v4,
        };
        (ip, HTTP_PORT).into()
    }
}

/// What one peer is measured for, in the order of the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Measure {
    NewConnRps,
    KeepaliveRps,
    BulkGbps,
    LbCpuUsPerReq,
    P50Ms,
    P99Ms,
}

const MEASURES: [Measure; 6] = [
    Measure::NewConnRps,
    Measure::KeepaliveRps,
    Measure::BulkGbps,
    Measure::LbCpuUsPerReq,
    Measure::P50Ms,
    Measure::P99Ms,
];

impl Measure {
    fn key(self) -> &'static str {
        match self {
            Measure::NewConnRps => "new_conn_rps",
            Measure::KeepaliveRps => "keepalive_rps",
            Measure::BulkGbps => "bulk_gbps",
            Measure::LbCpuUsPerReq => "lb_cpu_us_per_req",
            Measure::P50Ms => "p50_ms",
            Measure::P99Ms => "p99_ms",
        }
    }

    fn heading(self) -> &'static str {
        match self {
            Measure::NewConnRps => "new conn req/s",
            Measure::KeepaliveRps => "keep-alive req/s",
            Measure::BulkGbps => "bulk Gbit/s",
            Measure::LbCpuUsPerReq => "LB CPU us/req",
            Measure::P50Ms => "p50 ms",
            Measure::P99Ms => "p99 ms",
        }
    }
}

/// Sampling period of the profiles, in ns of CPU time: each sample stands
/// for 250 µs of one CPU.
const PERF_PERIOD_NS: &str = "250000";
const PERF_SAMPLE_US: f64 = 250.0;

/// Whether a sample of a host-wide profile (its command and its stack, leaf
/// first) is the balancer host's work for `peer`. Deliberately narrow, so
/// that each figure is a floor for its peer, not a guess:
///
/// - `vip`: the XDP program and the helpers it calls (`lb_balancer` in the
///   stack). Not veth's receive path, which a NIC driver replaces.
/// - `nftables`: netfilter hooks of the IP layer (`nf_hook_slow` called
///   from anything but the bridge: conntrack, DNAT, SNAT; only the balancer
///   host has rules) and forwarding (`ip_forward`: the route's output, the
///   transmit). Not the receive and routing before them. The lab's bridge
///   runs netfilter hooks too (`br_netfilter` is loaded on this machine):
///   those, called from `br_*` functions, are the bridge's and count for
///   no peer.
/// - `haproxy`: the haproxy process, user and kernel (its sockets' sends).
///   Not the softirq receive work for its sockets, which runs in whatever
///   context the packets arrive.
fn balancer_work(peer: Peer, comm: &str, stack: &[&str]) -> bool {
    match peer {
        Peer::Vip => stack.iter().any(|s| s.ends_with("_lb_balancer")),
        Peer::Nftables => stack.iter().enumerate().any(|(i, s)| {
            let bridge =
                |f: Option<&&str>| f.is_some_and(|f| f.trim_start_matches('_').starts_with("br_"));
            *s == "ip_forward" || (*s == "nf_hook_slow" && !bridge(stack.get(i + 1)))
        }),
        Peer::Haproxy => comm == "haproxy",
        Peer::Direct => false,
    }
}

/// A host-wide profile of one run, summed up.
#[derive(Default)]
struct Profile {
    /// Samples of the peer's balancer work (see [`balancer_work`]).
    balancer: u64,
    /// Samples by command, idle (`swapper`) left out.
    busy_by_comm: BTreeMap<String, u64>,
}

/// Reads the profile `data` of a run through `peer`.
fn read_profile(peer: Peer, data: &Path) -> Result<Profile> {
    let out = Command::new("perf")
        .args(["script", "-F", "comm,ip,sym", "-i"])
        .arg(data)
        .stderr(Stdio::null())
        .output()
        .context("perf script")?;
    ensure!(
        out.status.success(),
        "perf script failed on {}",
        data.display()
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let mut p = Profile::default();
    // Blocks separated by blank lines: the command, then a frame per line
    // ("address symbol").
    for block in text.split("\n\n") {
        let mut lines = block.lines().filter(|l| !l.trim().is_empty());
        let Some(comm) = lines.next() else { continue };
        let comm = comm.trim();
        let stack: Vec<&str> = lines.filter_map(|l| l.split_whitespace().nth(1)).collect();
        p.balancer += u64::from(balancer_work(peer, comm, &stack));
        if !comm.starts_with("swapper") {
            *p.busy_by_comm.entry(comm.to_string()).or_default() += 1;
        }
    }
    Ok(p)
}

/// The three kinds of wrk run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Load {
    /// Small requests, `Connection: close`: one connection per request.
    NewConn,
    /// Small requests on kept-alive connections.
    Keepalive,
    /// 1 MB answers on kept-alive connections.
    Bulk,
}

/// Host CPU time from the first line of /proc/stat, in clock ticks.
#[derive(Clone, Copy, Debug, Default)]
struct HostCpu {
    user: u64,
    system: u64,
    softirq: u64,
    /// user + nice + system + irq + softirq: everything but idle, iowait
    /// and steal (time the hypervisor gave to someone else).
    busy: u64,
}

impl HostCpu {
    fn read() -> Result<HostCpu> {
        let stat = fs::read_to_string("/proc/stat")?;
        let line = stat.lines().next().context("empty /proc/stat")?;
        let v: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .map(str::parse)
            .collect::<Result<_, _>>()
            .context("parsing /proc/stat")?;
        ensure!(v.len() >= 8, "short cpu line in /proc/stat: {line}");
        let (user, nice, system, irq, softirq) = (v[0], v[1], v[2], v[5], v[6]);
        Ok(HostCpu {
            user: user + nice,
            system,
            softirq: softirq + irq,
            busy: user + nice + system + irq + softirq,
        })
    }

    fn since(self, before: HostCpu) -> HostCpu {
        HostCpu {
            user: self.user - before.user,
            system: self.system - before.system,
            softirq: self.softirq - before.softirq,
            busy: self.busy - before.busy,
        }
    }
}

/// Microseconds per clock tick of /proc/stat and /proc/PID/stat.
fn us_per_tick() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    1e6 / hz as f64
}

/// A process's user + system time in clock ticks (all its threads).
fn process_cpu(pid: u32) -> Result<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces): state is 3rd
    // overall, utime the 14th, stime the 15th.
    let rest = stat.rsplit_once(')').context("odd /proc/PID/stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    Ok(f[11].parse::<u64>()? + f[12].parse::<u64>()?)
}

/// TCP connections the client's namespace opened so far (`ActiveOpens`).
fn active_opens(ns: &Netns) -> Result<u64> {
    let snmp = in_ns(ns, || fs::read_to_string("/proc/thread-self/net/snmp"))??;
    let mut tcp = snmp.lines().filter(|l| l.starts_with("Tcp:"));
    let (names, values) = (
        tcp.next().context("no Tcp: header")?,
        tcp.next().context("no Tcp: values")?,
    );
    let i = names
        .split_whitespace()
        .position(|n| n == "ActiveOpens")
        .context("no ActiveOpens")?;
    Ok(values
        .split_whitespace()
        .nth(i)
        .context("short Tcp: line")?
        .parse()?)
}

/// One wrk run through one peer, with the CPU the host spent meanwhile.
struct Sample {
    wrk: WrkReport,
    host: HostCpu,
    /// HAProxy's own CPU ticks during the run (HAProxy runs only).
    proxy_ticks: Option<u64>,
}

/// The peers' configs, from bench/peers/ in the repository, placeholders
/// filled in.
fn template(name: &str, fill: &[(&str, String)]) -> Result<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../bench/peers")
        .join(name);
    let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = String::new();
    for line in text.lines() {
        // Comments name the placeholders: leave them be.
        let mut line = line.to_string();
        if !line.trim_start().starts_with('#') {
            for (placeholder, value) in fill {
                line = line.replace(placeholder, value);
            }
            ensure!(
                !line.contains('@'),
                "{name}: a placeholder was left unfilled: {line}"
            );
        }
        out += &line;
        out.push('\n');
    }
    Ok(out)
}

/// The nftables peer's ruleset, loaded only while the nftables peer is
/// measured (so conntrack does not run for the other peers' traffic).
struct NftRuleset<'a> {
    ns: &'a Netns,
    file: PathBuf,
}

impl NftRuleset<'_> {
    fn load(&self) -> Result<()> {
        let file = self.file.to_str().context("temp path is UTF-8")?;
        self.ns.exec("nft", &["-f", file]).map(drop)
    }

    fn unload(&self) -> Result<()> {
        self.ns
            .exec("nft", &["delete", "table", "ip", "lb_peer"])
            .map(drop)
    }
}

impl Drop for NftRuleset<'_> {
    fn drop(&mut self) {
        let _ = self.unload();
    }
}

/// HAProxy running in the balancer's namespace; stopped on drop (also on
/// error or panic).
struct Haproxy {
    child: Child,
}

impl Haproxy {
    fn start(ns: &Netns, config: &Path, log: &Path) -> Result<Haproxy> {
        let out = fs::File::create(log)?;
        // `ip netns exec` execs HAProxy in place: the child's pid is
        // HAProxy's. -db: stay in the foreground, no daemon, no master.
        let child = Command::new("ip")
            .args(["netns", "exec", ns.name(), "haproxy", "-db", "-f"])
            .arg(config)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .context(
                "starting haproxy (Debian package haproxy; `cargo xtask setup` installs it)",
            )?;
        Ok(Haproxy { child })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn check_alive(&mut self, log: &Path) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "haproxy exited ({status}):\n{}",
                fs::read_to_string(log).unwrap_or_default()
            );
        }
        Ok(())
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.child.try_wait().ok().flatten().is_none() {
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Removes the peers' temp directory on drop.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Makes the lab ready for the peers: routes on the client, the HAProxy
/// service address on the balancer, one-armed router settings.
fn prepare_lab(lab: &Lab) -> Result<()> {
    for service in [NFT_SERVICE, HAPROXY_SERVICE] {
        lab.client.ip(&[
            "route",
            "add",
            &format!("{service}/32"),
            "via",
            &BALANCER.to_string(),
        ])?;
    }
    lab.balancer
        .ip(&["addr", "add", &format!("{HAPROXY_SERVICE}/32"), "dev", "lo"])?;
    lab.balancer
        .ip(&["addr", "add", &format!("{NFT_SNAT}/32"), "dev", "eth0"])?;
    lab.balancer.exec(
        "sysctl",
        &[
            "-qw",
            "net.ipv4.conf.eth0.forwarding=1",
            "net.ipv4.conf.all.send_redirects=0",
            "net.ipv4.conf.eth0.send_redirects=0",
        ],
    )?;
    Ok(())
}

/// Asks `peer` for `/` on 30 new connections and fails unless every
/// backend answered (direct: only b1), so a misconfigured peer cannot
/// produce fast wrong figures.
fn check_spread(lab: &Lab, peer: Peer) -> Result<()> {
    let addr = peer.service(lab);
    let names =
        lab.in_client(|| -> Result<Vec<String>> { (0..30).map(|_| http_get(addr)).collect() })??;
    let mut seen: Vec<&str> = names.iter().map(|n| n.trim()).collect();
    seen.sort();
    seen.dedup();
    let want: Vec<&str> = match peer {
        Peer::Direct => vec![lab.backends[0].name.as_str()],
        _ => lab.backends.iter().map(|b| b.name.as_str()).collect(),
    };
    ensure!(
        seen == want,
        "{}: 30 new connections reached {seen:?}, expected {want:?}",
        peer.key()
    );
    Ok(())
}

/// Waits until HAProxy answers from the client (it takes a moment to bind).
fn wait_answering(lab: &Lab, haproxy: &mut Haproxy, log: &Path) -> Result<()> {
    let addr = Peer::Haproxy.service(lab);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        haproxy.check_alive(log)?;
        match lab.in_client(|| http_get(addr))? {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() > deadline => {
                return Err(e.context("haproxy does not answer"));
            }
            Err(_) => thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// Runs the peers comparison and merges `peers.<peer>.<measure>` into
/// `results`.
pub fn peers_benchmarks(results: &mut BTreeMap<String, f64>) -> Result<()> {
    let env = |name: &str, default: u32| -> Result<u32> {
        std::env::var(name)
            .ok()
            .map_or(Ok(default), |v| v.parse())
            .with_context(|| format!("{name} is not a number"))
    };
    // LB_PEERS_ROUNDS / LB_PEERS_SECS shorten the run while working on it.
    let rounds = env("LB_PEERS_ROUNDS", 5)? as usize;
    let secs = env("LB_PEERS_SECS", 4)?;
    ensure!(rounds >= 1 && secs >= 1, "at least one round of one second");
    // LB_PEERS_ONLY=haproxy,... measures only those (and always vip and
    // direct, which the ratios and the CPU attribution need), e.g. to
    // profile one of them.
    let only = std::env::var("LB_PEERS_ONLY").ok();
    let peers: Vec<Peer> = PEERS
        .into_iter()
        .filter(|p| {
            only.as_ref().is_none_or(|o| {
                matches!(p, Peer::Vip | Peer::Direct) || o.split(',').any(|k| k == p.key())
            })
        })
        .collect();

    let lab = Lab::start(&LabSpec::weights(&[1; BACKENDS]))?;
    prepare_lab(&lab)?;
    let dir = TempDir(std::env::temp_dir().join(format!("lbt-peers-{}", std::process::id())));
    fs::create_dir_all(&dir.0)?;

    let backends: Vec<Ipv4Addr> = lab.backends.iter().map(|b| b.v4).collect();
    let nft_file = dir.0.join("nftables.nft");
    fs::write(
        &nft_file,
        template(
            "nftables.nft",
            &[
                ("@SERVICE@", NFT_SERVICE.to_string()),
                ("@PORT@", HTTP_PORT.to_string()),
                ("@N@", backends.len().to_string()),
                (
                    "@BACKEND_MAP@",
                    backends
                        .iter()
                        .enumerate()
                        .map(|(i, b)| format!("{i} : {b}"))
                        .collect::<Vec<_>>()
                        .join(", "),
                ),
                (
                    "@BACKENDS@",
                    backends
                        .iter()
                        .map(Ipv4Addr::to_string)
                        .collect::<Vec<_>>()
                        .join(", "),
                ),
                ("@SNAT@", NFT_SNAT.to_string()),
            ],
        )?,
    )?;
    let nft = NftRuleset {
        ns: &lab.balancer,
        file: nft_file,
    };

    let haproxy_cfg = dir.0.join("haproxy.cfg");
    let haproxy_log = dir.0.join("haproxy.log");
    fs::write(
        &haproxy_cfg,
        template(
            "haproxy.cfg",
            &[
                ("@SERVICE@", format!("{HAPROXY_SERVICE}:{HTTP_PORT}")),
                ("@PIDFILE@", dir.0.join("haproxy.pid").display().to_string()),
                (
                    "@SERVERS@",
                    lab.backends
                        .iter()
                        .map(|b| format!("\tserver {} {}:{HTTP_PORT}", b.name, b.v4))
                        .collect::<Vec<_>>()
                        .join("\n"),
                ),
            ],
        )?,
    )?;
    let mut haproxy = Haproxy::start(&lab.balancer, &haproxy_cfg, &haproxy_log)?;
    wait_answering(&lab, &mut haproxy, &haproxy_log)?;

    // Every peer spreads (or, direct, does not) before anything is measured.
    for &peer in &peers {
        if peer == Peer::Nftables {
            nft.load()?;
        }
        let checked = check_spread(&lab, peer);
        if peer == Peer::Nftables {
            nft.unload()?;
        }
        checked?;
    }

    println!(
        "Peers: the same lab (client, balancer host, {BACKENDS} backends), the same wrk; {rounds} rounds of {secs} s runs, \
         peers interleaved"
    );
    let mut samples: BTreeMap<(&str, Load), Vec<Sample>> = BTreeMap::new();
    let tick = us_per_tick();
    let mut run = |peer: Peer, load: Load, profile: Option<&Path>| -> Result<Sample> {
        if peer == Peer::Nftables {
            nft.load()?;
        }
        let sample = measure(&lab, peer, load, secs, &haproxy, profile);
        if peer == Peer::Nftables {
            nft.unload()?;
        }
        haproxy.check_alive(&haproxy_log)?;
        sample.with_context(|| format!("{} {load:?}", peer.key()))
    };
    for round in 0..rounds {
        for load in [Load::NewConn, Load::Keepalive, Load::Bulk] {
            let mut order = peers.clone();
            order.rotate_left(round % peers.len());
            for peer in order {
                // LB_PEERS_PERF=DIR: `perf record -a -g` of every first-round
                // run into DIR/<peer>-<load>.data, for `perf report`.
                let profile = std::env::var_os("LB_PEERS_PERF")
                    .filter(|_| round == 0)
                    .map(|d| PathBuf::from(d).join(format!("{}-{load:?}.data", peer.key())));
                let sample = run(peer, load, profile.as_deref())?;
                samples.entry((peer.key(), load)).or_default().push(sample);
            }
        }
        println!("  round {} of {rounds} done", round + 1);
    }

    // The balancer's own CPU per request: one more new-connection run per
    // peer and round under a host-wide profile, whose samples of balancer
    // work (see `balancer_work`) are counted. Separate runs, so perf's own
    // cost stays out of the figures above.
    let mut lb_cpu: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    let mut vip_profile = None;
    let profile = dir.0.join("profile.data");
    for round in 0..rounds {
        let mut order = peers.clone();
        order.rotate_left(round % peers.len());
        for peer in order {
            let us = if peer == Peer::Direct {
                0.0
            } else {
                let s = run(peer, Load::NewConn, Some(&profile))?;
                let p = read_profile(peer, &profile)?;
                let _ = fs::remove_file(&profile);
                let us = p.balancer as f64 * PERF_SAMPLE_US / s.wrk.requests as f64;
                if peer == Peer::Vip && vip_profile.is_none() {
                    vip_profile = Some(p);
                }
                us
            };
            lb_cpu.entry(peer.key()).or_default().push(us);
        }
        println!("  profiled round {} of {rounds} done", round + 1);
    }

    report(
        &peers,
        &samples,
        &lb_cpu,
        vip_profile.as_ref(),
        rounds,
        tick,
        results,
    )
}

/// One run of `load` through `peer`; checks that wrk opened a connection per
/// request (new-connection runs) or kept its connections (the others).
fn measure(
    lab: &Lab,
    peer: Peer,
    load: Load,
    secs: u32,
    haproxy: &Haproxy,
    profile: Option<&Path>,
) -> Result<Sample> {
    let base = format!("http://{}", peer.service(lab));
    let (url, connections, close) = match load {
        Load::NewConn => (format!("{base}/"), CONNECTIONS, true),
        Load::Keepalive => (format!("{base}/"), CONNECTIONS, false),
        Load::Bulk => (format!("{base}{BULK_PATH}"), BULK_CONNECTIONS, false),
    };
    let run = WrkRun {
        url: &url,
        connections,
        secs,
        close,
    };
    let opens_before = active_opens(&lab.client)?;
    let proxy_before = (peer == Peer::Haproxy)
        .then(|| process_cpu(haproxy.pid()))
        .transpose()?;
    let perf = profile
        .map(|out| {
            if let Some(dir) = out.parent() {
                fs::create_dir_all(dir)?;
            }
            Command::new("perf")
                .args([
                    "record",
                    "-e",
                    "cpu-clock",
                    "-c",
                    PERF_PERIOD_NS,
                    "-a",
                    "-g",
                    "-q",
                    "-o",
                ])
                .arg(out)
                .args(["--", "sleep", &secs.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("starting perf record (Debian package linux-perf)")
        })
        .transpose()?;
    let host_before = HostCpu::read()?;
    let wrk = run.run(&lab.client);
    let host = HostCpu::read()?.since(host_before);
    if let Some(mut perf) = perf {
        perf.wait()?;
    }
    let wrk = wrk?;
    let proxy_ticks = match proxy_before {
        Some(before) => Some(process_cpu(haproxy.pid())? - before),
        None => None,
    };
    let opens = active_opens(&lab.client)? - opens_before;
    let slack = u64::from(connections);
    if close {
        ensure!(
            opens + slack >= wrk.requests,
            "{} requests on only {opens} new connections: wrk did not reconnect",
            wrk.requests
        );
    } else {
        ensure!(
            opens <= 2 * slack,
            "{opens} connections for a kept-alive run of {connections}"
        );
    }
    ensure!(wrk.requests > 0, "no request completed");
    Ok(Sample {
        wrk,
        host,
        proxy_ticks,
    })
}

/// Median and spread (min, max) of `v`.
fn stats(v: &[f64]) -> (f64, f64, f64) {
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (median(v.to_vec()), lo, hi)
}

/// Prints the table and the targets, fills `results`.
fn report(
    peers: &[Peer],
    samples: &BTreeMap<(&str, Load), Vec<Sample>>,
    lb_cpu: &BTreeMap<&str, Vec<f64>>,
    vip_profile: Option<&Profile>,
    rounds: usize,
    tick: f64,
    results: &mut BTreeMap<String, f64>,
) -> Result<()> {
    let of = |peer: Peer, load: Load| -> &Vec<Sample> { &samples[&(peer.key(), load)] };
    // Host CPU per request of each new-connection run, and the balancer's
    // share: the same round's figure minus direct's (see docs/benchmarks.md).
    let host_us = |s: &Sample| s.host.busy as f64 * tick / s.wrk.requests as f64;
    let direct_host: Vec<f64> = of(Peer::Direct, Load::NewConn)
        .iter()
        .map(host_us)
        .collect();
    let mut table: BTreeMap<(&str, &str), (f64, f64, f64)> = BTreeMap::new();
    for &peer in peers {
        for m in MEASURES {
            let v: Vec<f64> = match m {
                Measure::NewConnRps => of(peer, Load::NewConn).iter().map(|s| s.wrk.rps).collect(),
                Measure::KeepaliveRps => of(peer, Load::Keepalive)
                    .iter()
                    .map(|s| s.wrk.rps)
                    .collect(),
                Measure::BulkGbps => of(peer, Load::Bulk).iter().map(|s| s.wrk.gbps).collect(),
                Measure::LbCpuUsPerReq => lb_cpu[peer.key()].clone(),
                Measure::P50Ms => of(peer, Load::NewConn)
                    .iter()
                    .map(|s| s.wrk.p50_ms)
                    .collect(),
                Measure::P99Ms => of(peer, Load::NewConn)
                    .iter()
                    .map(|s| s.wrk.p99_ms)
                    .collect(),
            };
            table.insert((peer.key(), m.key()), stats(&v));
        }
    }

    println!(
        "  new conn: {CONNECTIONS} connections, Connection: close (one TCP connection per request); keep-alive: \
         {CONNECTIONS} connections;\n  bulk: {BULK_CONNECTIONS} connections of {BULK_PATH}; p50/p99: the new-connection \
         runs (wrk's request-to-answer time); LB CPU: the balancer's own work per new-connection\n  request in a \
         host-wide profile (docs/benchmarks.md). Median of {rounds}, min..max below, (x) = ratio to vip"
    );
    print!("  {:<9}", "peer");
    for m in MEASURES {
        print!("{:>20}", m.heading());
    }
    println!();
    let vip = |m: Measure| table[&(Peer::Vip.key(), m.key())].0;
    for &peer in peers {
        print!("  {:<9}", peer.key());
        for m in MEASURES {
            let (med, _, _) = table[&(peer.key(), m.key())];
            let ratio = if vip(m) > 0.0 {
                format!("({:.2}x)", med / vip(m))
            } else {
                "(-)".into()
            };
            print!("{:>20}", format!("{} {ratio}", fmt(m, med)));
        }
        println!();
        print!("  {:<9}", "");
        for m in MEASURES {
            let (_, lo, hi) = table[&(peer.key(), m.key())];
            print!("{:>20}", format!("{}..{}", fmt(m, lo), fmt(m, hi)));
        }
        println!();
    }

    // Where the host's CPU went, per new-connection request, and what the
    // balancer hop adds to the whole host's: the run's figure minus
    // direct's in the same round (everything the hop causes wherever it
    // runs, but a difference of large figures: noisy).
    println!(
        "  host CPU per new-connection request (median; user / system / softirq+irq = all busy; hop = minus direct's):"
    );
    for &peer in peers {
        let runs = of(peer, Load::NewConn);
        let per = |f: fn(&HostCpu) -> u64| -> f64 {
            median(
                runs.iter()
                    .map(|s| f(&s.host) as f64 * tick / s.wrk.requests as f64)
                    .collect(),
            )
        };
        let (user, system, softirq, busy) = (
            per(|c| c.user),
            per(|c| c.system),
            per(|c| c.softirq),
            per(|c| c.busy),
        );
        let (hop, hop_lo, hop_hi) = stats(
            &runs
                .iter()
                .zip(&direct_host)
                .map(|(s, d)| host_us(s) - d)
                .collect::<Vec<_>>(),
        );
        print!(
            "    {:<9} {user:6.1} / {system:6.1} / {softirq:6.1} = {busy:6.1} us, hop {hop:6.1} ({hop_lo:.1}..{hop_hi:.1})",
            peer.key()
        );
        results.insert(format!("peers.{}.hop_cpu_us_per_req", peer.key()), hop);
        if peer == Peer::Haproxy {
            let own = median(
                runs.iter()
                    .map(|s| s.proxy_ticks.unwrap_or(0) as f64 * tick / s.wrk.requests as f64)
                    .collect(),
            );
            print!("   (the haproxy process itself: {own:.1} us)");
            results.insert("peers.haproxy.proc_cpu_us_per_req".into(), own);
        }
        println!();
        results.insert(format!("peers.{}.host_cpu_us_per_req", peer.key()), busy);
    }

    // Why the request rates stay close: where the host's busy CPU went in
    // the first profiled vip run.
    if let Some(p) = vip_profile {
        let busy: u64 = p.busy_by_comm.values().sum();
        let mut top: Vec<(&String, &u64)> = p.busy_by_comm.iter().collect();
        top.sort_by(|a, b| b.1.cmp(a.1));
        let share = |n: u64| 100.0 * n as f64 / busy.max(1) as f64;
        println!(
            "  the host's busy CPU in a profiled vip new-connection run, by command: {}; the balancer's own work {:.1}%",
            top.iter()
                .take(5)
                .map(|(c, n)| format!("{c} {:.1}%", share(**n)))
                .collect::<Vec<_>>()
                .join(", "),
            share(p.balancer)
        );
        results.insert("peers.vip.lb_cpu_share_pct".into(), share(p.balancer));
    }

    // What one core of a balancer host could carry, from its own work per
    // request: where the balancer has cores of its own, this, not the lab's
    // shared rate, bounds its new-connection rate.
    let capacity: Vec<String> = peers
        .iter()
        .filter(|p| **p != Peer::Direct)
        .map(|p| {
            let us = table[&(p.key(), Measure::LbCpuUsPerReq.key())].0;
            let rps = 1e6 / us.max(0.001);
            results.insert(format!("peers.{}.core_capacity_rps", p.key()), rps);
            format!("{} {:.0}", p.key(), rps)
        })
        .collect();
    println!(
        "  new connections per second one balancer core could carry (1 s / LB CPU per request): {}",
        capacity.join(", ")
    );

    if peers.len() < PEERS.len() {
        println!("  targets: not judged (LB_PEERS_ONLY left peers out)");
        store(table, results);
        return Ok(());
    }
    let new = |p: Peer| table[&(p.key(), Measure::NewConnRps.key())].0;
    let cpu = |p: Peer| table[&(p.key(), Measure::LbCpuUsPerReq.key())].0;
    let verdict = |ok: bool| if ok { "holds" } else { "MISSED" };
    let vs_haproxy = new(Peer::Vip) / new(Peer::Haproxy);
    let vs_nft = new(Peer::Vip) / new(Peer::Nftables);
    println!("  targets:");
    println!(
        "    VIP new-connection req/s >= 1.5x HAProxy's:  {vs_haproxy:.2}x  {}",
        verdict(vs_haproxy >= 1.5)
    );
    println!(
        "    VIP new-connection req/s >= 1.2x nftables':  {vs_nft:.2}x  {}",
        verdict(vs_nft >= 1.2)
    );
    println!(
        "    VIP LB CPU per request < HAProxy's and nftables': {:.1} vs {:.1} and {:.1} us  {}",
        cpu(Peer::Vip),
        cpu(Peer::Haproxy),
        cpu(Peer::Nftables),
        verdict(cpu(Peer::Vip) < cpu(Peer::Haproxy) && cpu(Peer::Vip) < cpu(Peer::Nftables))
    );

    store(table, results);
    Ok(())
}

/// `peers.<peer>.<measure>` (the median) and its `_min` and `_max`.
fn store(table: BTreeMap<(&str, &str), (f64, f64, f64)>, results: &mut BTreeMap<String, f64>) {
    for ((peer, measure), (med, lo, hi)) in table {
        results.insert(format!("peers.{peer}.{measure}"), med);
        results.insert(format!("peers.{peer}.{measure}_min"), lo);
        results.insert(format!("peers.{peer}.{measure}_max"), hi);
    }
}

/// A figure as the table shows it.
fn fmt(m: Measure, v: f64) -> String {
    match m {
        Measure::NewConnRps | Measure::KeepaliveRps => format!("{v:.0}"),
        Measure::BulkGbps | Measure::LbCpuUsPerReq => format!("{v:.1}"),
        Measure::P50Ms | Measure::P99Ms => format!("{v:.2}"),
    }
}
