//! The scale-out lab: several balancers with the same config behind a
//! router that learns the VIPs from them over BGP and spreads flows over
//! them with ECMP.
//!
//! ```text
//!   client ── router ─┐  router: BIRD 2, AS 65000, kernel ECMP (L4 hash)
//!   10.202.0.2        ├── bridge ── lb1 .1, lb2 .4, ... (lbd + its BIRD, AS 65010)
//!                     └──          b1..bN .11.. (lbd decap, HTTP, UDP echo)
//! ```
//!
//! Every balancer runs the real `lbd` with a `[bgp]` section; lbd starts
//! its own BIRD, which peers with the router over IPv4 and IPv6. The router
//! has no static route to the VIPs: it only reaches them through what the
//! balancers announce. Backends answer the client directly, through the
//! router.

use std::{
    collections::BTreeMap,
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    process::Child,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use aya::maps::{Array, HashMap as BpfHashMap, Map, MapData};
use lb::dataplane::{PassProgram, pinning};
use lb_common::{
    BackendInfo, MaglevChunk, VipInfo, VipKey, chunks_per_table, map_name, words_addr,
};

use super::{
    BACKEND_MTU, LabBackend, ROUTER_V4, ROUTER_V6, VIP_V4, VIP_V6, config, host_link, lbd_path,
    make_backends, no_dad, routed_client, servers, spawn_in, start_backends, terminate,
};
use crate::{netns::Netns, require_root};

/// The router's AS.
pub const ROUTER_AS: u32 = 65000;
/// The balancers' AS (all the same: their routes are equal for ECMP).
pub const BALANCER_AS: u32 = 65010;
/// The balancers' `bgp.dead_after`: how long BIRD keeps announcing a
/// balancer whose lbd died.
pub const DEAD_AFTER_SECS: u64 = 2;

/// A VIP's active Maglev table as read from the maps: its raw chunks
/// (backend ids) and each entry's backend address.
pub type Table = (Vec<u8>, Vec<IpAddr>);

/// One balancer host.
pub struct EcmpBalancer {
    /// `lb1`, `lb2`, ...
    pub name: String,
    pub ns: Netns,
    pub v4: Ipv4Addr,
    pub v6: Ipv6Addr,
    /// lbd's pinned state: /sys/fs/bpf/<instance>.
    pub instance: String,
    /// Its own directory: config, API socket, logs, BIRD's files.
    pub dir: PathBuf,
    lbd: Option<Child>,
    _pass: PassProgram,
}

impl EcmpBalancer {
    fn config_path(&self) -> PathBuf {
        self.dir.join("lbd.toml")
    }

    /// BIRD's directory (`bgp.bird_dir`).
    pub fn bird_dir(&self) -> PathBuf {
        self.dir.join("bird")
    }

    /// lbd's log so far.
    pub fn lbd_log(&self) -> String {
        fs::read_to_string(self.dir.join("lbd.log")).unwrap_or_default()
    }

    /// Whether lbd runs.
    pub fn running(&self) -> bool {
        self.lbd.is_some()
    }
}

/// A running scale-out lab. Drop tears it down (lbd, BIRDs, pinned state,
/// namespaces).
pub struct EcmpLab {
    lbd_bin: PathBuf,
    /// See [`EcmpLab::start`].
    vip_extra: String,
    services: Vec<servers::Services>,
    decaps: Vec<(String, Child)>,
    pub balancers: Vec<EcmpBalancer>,
    pub backends: Vec<LabBackend>,
    pub client: Netns,
    pub router: Netns,
    /// With a fleet ([`EcmpLab::start_fleet`]): its etcd cluster, one
    /// member per address of [`ETCD_HOSTS`] in a namespace of its own on
    /// the balancers' switch.
    pub etcd: Option<crate::etcd::EtcdCluster>,
    _etcd_ns: Option<Netns>,
    switch: Netns,
    dir: PathBuf,
}

/// The addresses of the fleet lab's etcd members (in 10.201.0.20/30, which
/// [`EcmpLab::cut_etcd`] drops).
pub const ETCD_HOSTS: [Ipv4Addr; 3] = [
    Ipv4Addr::new(10, 201, 0, 21),
    Ipv4Addr::new(10, 201, 0, 22),
    Ipv4Addr::new(10, 201, 0, 23),
];

/// The fleet lab's `fleet.lease_ttl`, seconds.
pub const FLEET_LEASE_TTL: u64 = 3;

/// Ends (SIGTERM) the process whose pid file is `pid` (a BIRD, or the BIRD
/// guard), if it runs.
fn stop_bird(pid: &Path) {
    if let Some(pid) = fs::read_to_string(pid)
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
    {
        // SAFETY: kill(2); the pid comes from a process this lab started.
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
}

impl EcmpLab {
    /// Builds the lab with `balancers` balancer hosts and one backend per
    /// weight; `vip_extra` is appended to every `[[vip]]` (e.g. health
    /// checks). Returns once the router has a path through every balancer.
    pub fn start(balancers: usize, weights: &[u32], vip_extra: &str) -> Result<EcmpLab> {
        Self::start_with(balancers, weights, vip_extra, 0)
    }

    /// [`EcmpLab::start`] with the balancers in one fleet: an etcd cluster
    /// of `etcd_members` members (from Debian's package) on the switch,
    /// and a `[fleet]` section in every balancer's config (prefix
    /// `/lb/LAB`, member names `lb1`, `lb2`, ..., lease
    /// [`FLEET_LEASE_TTL`]).
    pub fn start_fleet(
        balancers: usize,
        weights: &[u32],
        vip_extra: &str,
        etcd_members: usize,
    ) -> Result<EcmpLab> {
        Self::start_with(balancers, weights, vip_extra, etcd_members)
    }

    fn start_with(
        balancers: usize,
        weights: &[u32],
        vip_extra: &str,
        etcd_members: usize,
    ) -> Result<EcmpLab> {
        require_root();
        let lbd = lbd_path()?;
        let switch = Netns::new("lab-sw")?;
        let client = Netns::new("lab-client")?;
        let dir = std::env::temp_dir().join(format!("{}-ecmp", switch.name()));
        fs::create_dir_all(&dir)?;
        for ns in [&switch, &client] {
            no_dad(ns)?;
        }
        switch.ip(&["link", "add", "br0", "type", "bridge"])?;
        switch.ip(&["link", "set", "br0", "up"])?;
        let router = routed_client(&switch, &client, 1500, false)?;
        // ECMP on the 5-tuple, as routers in front of balancers do (the
        // default hashes addresses only: one client would use one path).
        router.exec(
            "sysctl",
            &[
                "-qw",
                "net.ipv4.fib_multipath_hash_policy=1",
                "net.ipv6.fib_multipath_hash_policy=1",
            ],
        )?;
        let backends = make_backends(&switch, weights, true)?;

        let mut hosts = Vec::new();
        for i in 0..balancers {
            let name = format!("lb{}", i + 1);
            let ns = Netns::new(&format!("lab-{name}"))?;
            no_dad(&ns)?;
            let port = format!("v-{name}");
            host_link(&switch, &ns, &port, BACKEND_MTU)?;
            // .1, .4, .5, ...: .2 and .3 are the client's and the router's.
            let last = if i == 0 { 1 } else { 3 + i as u8 };
            let v4 = Ipv4Addr::new(10, 201, 0, last);
            let v6 = Ipv6Addr::new(0xfd00, 0x201, 0, 0, 0, 0, 0, last.into());
            ns.ip(&["addr", "add", &format!("{v4}/24"), "dev", "eth0"])?;
            ns.ip(&["addr", "add", &format!("{v6}/64"), "dev", "eth0"])?;
            // veth delivers native XDP_TX only if the peer runs XDP.
            let pass = {
                let _inside = switch.enter()?;
                PassProgram::attach(&port)
                    .with_context(|| format!("attaching XDP_PASS to {port}"))?
            };
            let bdir = dir.join(&name);
            fs::create_dir_all(&bdir)?;
            hosts.push(EcmpBalancer {
                instance: ns.name().to_string(),
                name,
                ns,
                v4,
                v6,
                dir: bdir,
                lbd: None,
                _pass: pass,
            });
        }

        let router_conf = dir.join("router-bird.conf");
        fs::write(&router_conf, router_bird_config(&dir, &hosts))?;
        let ctl = dir.join("router-bird.ctl");
        router.exec(
            "bird",
            &[
                "-c",
                path_str(&router_conf)?,
                "-s",
                path_str(&ctl)?,
                "-P",
                path_str(&dir.join("router-bird.pid"))?,
            ],
        )?;

        let (services, decaps) = start_backends(&backends, &lbd, &dir)?;
        let (etcd, etcd_ns) = if etcd_members > 0 {
            let ns = Netns::new("lab-etcd")?;
            host_link(&switch, &ns, "v-etcd", BACKEND_MTU)?;
            ns.ip(&["link", "set", "lo", "up"])?;
            let hosts = &ETCD_HOSTS[..etcd_members.min(ETCD_HOSTS.len())];
            for h in hosts {
                ns.ip(&["addr", "add", &format!("{h}/24"), "dev", "eth0"])?;
            }
            (
                Some(crate::etcd::EtcdCluster::start_in(&ns, hosts)?),
                Some(ns),
            )
        } else {
            (None, None)
        };
        let mut lab = EcmpLab {
            lbd_bin: lbd,
            vip_extra: vip_extra.to_string(),
            services,
            decaps,
            balancers: hosts,
            backends,
            client,
            router,
            etcd,
            _etcd_ns: etcd_ns,
            switch,
            dir,
        };
        let weights: Vec<Option<u32>> = lab.backends.iter().map(|b| Some(b.weight)).collect();
        for i in 0..balancers {
            let b = &lab.balancers[i];
            let extra = super::ConfigExtra {
                vip: vip_extra.to_string(),
                top: String::new(),
                conntrack: String::new(),
                max_backends: 64,
                max_vips: 8,
            };
            let mut text = config(&b.dir, (b.v4, b.v6), &lab.backends, &weights, &extra);
            text += &format!(
                "[bgp]\nlocal_as = {BALANCER_AS}\nhold_time = 3\ndead_after = {DEAD_AFTER_SECS}\nbird_dir = \"{}\"\nneighbors = [\n  {{ address = \"{ROUTER_V4}\", as = {ROUTER_AS} }},\n  {{ address = \"{ROUTER_V6}\", as = {ROUTER_AS} }},\n]\n",
                b.bird_dir().display()
            );
            if let Some(etcd) = &lab.etcd {
                text += &format!(
                    "[fleet]\nendpoints = {:?}\nprefix = \"/lb/{}\"\nname = \"{}\"\nlease_ttl = {FLEET_LEASE_TTL}\ncache_file = \"{}\"\n",
                    etcd.endpoints(),
                    lab.switch.name(),
                    b.name,
                    b.dir.join("fleet-cache.toml").display()
                );
            }
            fs::write(b.config_path(), text)?;
            fs::write(b.dir.join("tokens"), format!("lab {}\n", super::API_TOKEN))?;
            lab.start_balancer(i)?;
        }
        lab.wait_paths(balancers)?;
        Ok(lab)
    }

    /// Starts balancer `i`'s lbd (adopting its pinned state if any); returns
    /// once it serves metrics.
    pub fn start_balancer(&mut self, i: usize) -> Result<()> {
        let b = &mut self.balancers[i];
        let config = b.config_path();
        let args = [
            "--config",
            path_str(&config)?,
            "--iface",
            "eth0",
            "--xdp-mode",
            "native",
            "--instance",
            &b.instance,
        ];
        b.lbd = Some(spawn_in(
            &b.ns,
            &self.lbd_bin,
            &args,
            &b.dir.join("lbd.log"),
            "info",
        )?);
        let deadline = Instant::now() + Duration::from_secs(20);
        while let Err(e) = self.metrics(i) {
            let last_error = format!("{e:#}");
            if let Some(status) = self.balancers[i]
                .lbd
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!(
                    "lbd on {} exited ({status}); log:\n{}",
                    self.balancers[i].name,
                    self.balancers[i].lbd_log()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "lbd on {} did not come up (its metrics: {last_error}); log:\n{}",
                    self.balancers[i].name,
                    self.balancers[i].lbd_log()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Stops balancer `i` for good: SIGTERM to lbd (which leaves BIRD
    /// announcing, `bgp.on_shutdown = "keep"`), then `lbd --cleanup` (which
    /// withdraws every VIP, detaches its data plane and removes its pinned
    /// state, connection table included). Its BIRD keeps running,
    /// announcing nothing.
    pub fn stop_balancer(&mut self, i: usize) -> Result<()> {
        let b = &mut self.balancers[i];
        let mut child = b.lbd.take().context("lbd is not running")?;
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let status = child.wait()?;
        if !status.success() {
            bail!(
                "lbd on {} exited with {status}; log:\n{}",
                b.name,
                b.lbd_log()
            );
        }
        let out = std::process::Command::new(&self.lbd_bin)
            .args(["--cleanup", "--instance", &b.instance, "--config"])
            .arg(b.config_path())
            .output()?;
        if !out.status.success() {
            bail!(
                "lbd --cleanup on {}: {}",
                b.name,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// Kills balancer `i`'s lbd with SIGKILL, as a crash would: its data
    /// plane keeps forwarding from the pinned state, BIRD keeps announcing
    /// until its guard sees no lbd for `dead_after`.
    pub fn kill_balancer(&mut self, i: usize) -> Result<()> {
        let b = &mut self.balancers[i];
        let mut child = b.lbd.take().context("lbd is not running")?;
        child.kill()?;
        child.wait()?;
        Ok(())
    }

    /// Restarts balancer `i`'s lbd: SIGTERM (its data plane and BIRD's
    /// announcements stay), then a new lbd that adopts the state.
    pub fn restart_balancer(&mut self, i: usize) -> Result<()> {
        self.terminate_balancer(i)?;
        self.start_balancer(i)
    }

    /// Balancer `i`'s lbd's pid, while it runs.
    pub fn lbd_pid(&self, i: usize) -> Option<u32> {
        self.balancers[i].lbd.as_ref().map(|c| c.id())
    }

    /// Stops balancer `i`'s lbd with SIGTERM: its data plane keeps
    /// forwarding from the pinned state (and BIRD keeps announcing) until
    /// [`EcmpLab::start_balancer`] adopts it.
    pub fn terminate_balancer(&mut self, i: usize) -> Result<()> {
        let b = &mut self.balancers[i];
        let mut child = b.lbd.take().context("lbd is not running")?;
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let status = child.wait()?;
        if !status.success() {
            bail!(
                "lbd on {} exited with {status}; log:\n{}",
                b.name,
                b.lbd_log()
            );
        }
        Ok(())
    }

    /// Rewrites balancer `i`'s config with these backend weights (`None`:
    /// not in the config) and reloads it (SIGHUP); returns once applied.
    pub fn set_backends(&self, i: usize, weights: &[Option<u32>]) -> Result<()> {
        let b = &self.balancers[i];
        let text = fs::read_to_string(b.config_path())?;
        let bgp = text.find("[bgp]").context("the lab config has [bgp]")?;
        let extra = super::ConfigExtra {
            vip: self.vip_extra.clone(),
            top: String::new(),
            conntrack: String::new(),
            max_backends: 64,
            max_vips: 8,
        };
        let new = config(&b.dir, (b.v4, b.v6), &self.backends, weights, &extra) + &text[bgp..];
        fs::write(b.config_path(), new)?;
        let needle = "config reloaded and applied";
        let before = b.lbd_log().matches(needle).count();
        let pid = b.lbd.as_ref().context("lbd is not running")?.id();
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(pid as i32, libc::SIGHUP) };
        let deadline = Instant::now() + Duration::from_secs(15);
        while b.lbd_log().matches(needle).count() <= before {
            if Instant::now() > deadline {
                bail!(
                    "lbd on {} did not apply the new config; log:\n{}",
                    b.name,
                    b.lbd_log()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Drops (`cut`) or lets through again balancer `i`'s traffic to the
    /// fleet's etcd members, with nftables in its namespace.
    pub fn cut_etcd(&self, i: usize, cut: bool) -> Result<()> {
        let ns = &self.balancers[i].ns;
        if cut {
            ns.exec(
                "nft",
                &[
                    "add table inet lbt_cut; add chain inet lbt_cut out { type filter hook output priority 0; }; add rule inet lbt_cut out ip daddr 10.201.0.20/30 drop",
                ],
            )?;
        } else {
            ns.exec("nft", &["delete table inet lbt_cut"])?;
        }
        Ok(())
    }

    /// The fleet's key prefix in etcd.
    pub fn fleet_prefix(&self) -> String {
        format!("/lb/{}", self.switch.name())
    }

    /// Balancer `i`'s API socket.
    pub fn api_socket(&self, i: usize) -> PathBuf {
        self.balancers[i].dir.join("api.sock")
    }

    /// The router's next hops for `vip` (empty: no route).
    pub fn paths(&self, vip: IpAddr) -> Result<Vec<IpAddr>> {
        let family = if vip.is_ipv6() { "-6" } else { "-4" };
        let out = self
            .router
            .ip(&[family, "route", "show", "exact", &vip.to_string()])?;
        let words: Vec<&str> = out.split_whitespace().collect();
        let mut hops: Vec<IpAddr> = words
            .windows(2)
            .filter(|w| w[0] == "via")
            .filter_map(|w| w[1].parse().ok())
            .collect();
        hops.sort();
        Ok(hops)
    }

    /// Waits until the router reaches both VIPs through exactly `n`
    /// balancers.
    pub fn wait_paths(&self, n: usize) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let v4 = self.paths(VIP_V4.into())?;
            let v6 = self.paths(VIP_V6.into())?;
            if v4.len() == n && v6.len() == n {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "the router did not get {n} paths to the VIPs in 30 s (IPv4 via {v4:?}, IPv6 via {v6:?});\n{}",
                    self.logs()
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// What backend `i`'s HTTP service does (health, ...).
    pub fn control(&self, i: usize) -> &servers::Control {
        &self.services[i].control
    }

    /// Every backend's controls, to hand to a thread that outlives a borrow
    /// of the lab.
    pub fn controls(&self) -> Vec<std::sync::Arc<servers::Control>> {
        self.services.iter().map(|s| s.control.clone()).collect()
    }

    /// Balancer `i`'s `/metrics`.
    pub fn metrics(&self, i: usize) -> Result<String> {
        let b = &self.balancers[i];
        super::in_ns(&b.ns, super::fetch_metrics)?
    }

    /// Packets balancer `i` forwarded (all VIPs).
    pub fn forwarded(&self, i: usize) -> Result<u64> {
        Ok(crate::prom::value(
            &self.metrics(i)?,
            "lb_packets_total",
            &[("reason", "forwarded")],
        )
        .unwrap_or(0.0) as u64)
    }

    /// Every VIP's active Maglev table in balancer `i`'s pinned maps, by
    /// VIP: the raw chunks (backend ids) and the backend address of each
    /// entry.
    pub fn tables(&self, i: usize) -> Result<BTreeMap<String, Table>> {
        self.tables_where(i, |_| true)
    }

    /// The active Maglev table of one VIP (`ADDRESS:PORT/PROTO-NUMBER`, as
    /// [`EcmpLab::tables`] names them) in balancer `i`'s pinned maps.
    pub fn vip_table(&self, i: usize, vip: &str) -> Result<Option<Table>> {
        Ok(self.tables_where(i, |v| v == vip)?.remove(vip))
    }

    fn tables_where(
        &self,
        i: usize,
        want: impl Fn(&str) -> bool,
    ) -> Result<BTreeMap<String, Table>> {
        let dir = pinning::instance_dir(&self.balancers[i].instance);
        let open = |name: &str| -> Result<Map> {
            let kind = if name == map_name::VIPS {
                Map::HashMap
            } else {
                Map::Array
            };
            Ok(kind(MapData::from_pin(dir.join(name)).with_context(
                || format!("opening {}", dir.join(name).display()),
            )?))
        };
        let vips: BpfHashMap<MapData, VipKey, VipInfo> = open(map_name::VIPS)?.try_into()?;
        let backends: Array<MapData, BackendInfo> = open(map_name::BACKENDS)?.try_into()?;
        let maglev: Array<MapData, MaglevChunk> = open(map_name::MAGLEV)?.try_into()?;
        // The lab's configs keep the default table size.
        let size = lb_common::DEFAULT_TABLE_SIZE;
        let by_id: Vec<IpAddr> = (0..backends.len())
            .map(|id| {
                let b = backends.get(&id, 0)?;
                Ok(words_addr(b.family, b.addr))
            })
            .collect::<Result<_, aya::maps::MapError>>()?;
        let mut out = BTreeMap::new();
        for item in vips.iter() {
            let (key, info) = item?;
            let name = format!(
                "{}:{}/{}",
                words_addr(key.family, key.addr),
                u16::from_be(key.port),
                key.proto
            );
            if !want(&name) {
                continue;
            }
            let mut raw = Vec::new();
            let mut addrs = Vec::new();
            for c in 0..chunks_per_table(size) {
                let chunk = maglev.get(&(info.table_chunk + c), 0)?;
                for id in chunk.backends {
                    raw.extend_from_slice(&id.to_ne_bytes());
                    if let Some(a) = by_id.get(id as usize) {
                        addrs.push(*a);
                    }
                }
            }
            out.insert(name, (raw, addrs));
        }
        Ok(out)
    }

    /// Every log of the lab (lbd, decapsulators, BIRDs).
    pub fn logs(&self) -> String {
        let mut out = String::new();
        let mut files = vec![self.dir.join("router-bird.log")];
        for b in &self.balancers {
            files.push(b.dir.join("lbd.log"));
            files.push(b.bird_dir().join("bird.log"));
        }
        for f in files {
            out += &format!(
                "--- {}\n{}",
                f.display(),
                fs::read_to_string(&f).unwrap_or_default()
            );
        }
        out
    }
}

/// The router's BIRD: a BGP session with every balancer over IPv4 and
/// IPv6, their routes merged into ECMP routes in the kernel.
fn router_bird_config(dir: &Path, balancers: &[EcmpBalancer]) -> String {
    let mut c = format!(
        "log \"{}\" all;\nrouter id {ROUTER_V4};\nprotocol device {{\n}}\n",
        dir.join("router-bird.log").display()
    );
    for family in ["ipv4", "ipv6"] {
        c += &format!(
            "protocol kernel kernel_{family} {{\n  {family} {{ import none; export all; }};\n  merge paths on;\n}}\n"
        );
    }
    for b in balancers {
        for (family, addr) in [("ipv4", IpAddr::from(b.v4)), ("ipv6", IpAddr::from(b.v6))] {
            c += &format!(
                "protocol bgp {}_{family} {{\n  local as {ROUTER_AS};\n  neighbor {addr} as {BALANCER_AS};\n  hold time 3;\n  keepalive time 1;\n  connect retry time 1;\n  start delay time 0;\n  {family} {{ import all; export none; }};\n}}\n",
                b.name
            );
        }
    }
    c
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str().context("temp path is UTF-8")
}

impl Drop for EcmpLab {
    fn drop(&mut self) {
        terminate(
            self.balancers
                .iter_mut()
                .filter_map(|b| b.lbd.as_mut())
                .chain(self.decaps.iter_mut().map(|(_, c)| c))
                .collect(),
        );
        for b in &self.balancers {
            stop_bird(&b.bird_dir().join("bird.pid"));
            // The BIRD guard lbd started (its pid is in its lock file).
            stop_bird(&b.bird_dir().join("guard.lock"));
            let _ = pinning::cleanup(&pinning::instance_dir(&b.instance));
        }
        stop_bird(&self.dir.join("router-bird.pid"));
        self.services.clear();
        let _ = fs::remove_dir_all(&self.dir);
        let _ = &self.switch;
    }
}
