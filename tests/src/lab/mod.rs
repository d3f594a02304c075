//! A lab of network namespaces with real traffic: a client, the balancer
//! (running the real `lbd`), N backends (running `lbd decap` and HTTP/UDP
//! services), all on one bridge. Used by the end-to-end tests, the demo
//! (`cargo xtask run`) and the end-to-end benchmark.
//!
//! ```text
//!   client ─┐                      10.201.0.0/24, fd00:201::/64
//!   lb ─────┼── bridge (own netns)  client .2, lb .1, backend i .(10+i)
//!   b1..bN ─┘                      VIPs 203.0.113.10, 2001:db8:10::1
//! ```
//!
//! The client routes the VIPs via the balancer. Each backend has the VIPs on
//! `lo` (with `arp_ignore=1`, `arp_announce=2`) and answers the client
//! directly. The balancer runs in native XDP mode; its bridge-side veth peer
//! runs an `XDP_PASS` program, without which veth drops native `XDP_TX`
//! frames. Everything is torn down on drop (also on panic); namespaces are
//! named `lbt-lab-*` so `cargo xtask lab clean` finds leftovers of a crash.

pub mod client;
pub mod ecmp;
pub mod scale;
pub mod servers;
pub mod traffic;

use std::{
    fs,
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Mutex,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use lb::dataplane::{PassProgram, pinning};

use crate::{netns::Netns, require_root};

/// The lab's IPv4 VIP.
pub const VIP_V4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
/// The lab's IPv6 VIP.
pub const VIP_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x10, 0, 0, 0, 0, 1);
/// Where lbd serves `/metrics` inside the balancer namespace.
pub const METRICS: &str = "127.0.0.1:9180";
/// Where lbd serves the TCP API inside the balancer namespace.
pub const API_TCP: &str = "127.0.0.1:9181";
/// The bearer token of the lab's TCP API (name `lab`).
pub const API_TOKEN: &str = "lab-token-0123456789abcdef";
/// Numbers the logs of extra lbds ([`Lab::run_lbd`]).
/// How long a restarted lbd may take to adopt the pinned state and serve
/// metrics. A restart with tens of VIPs rebuilds every table in a debug
/// build; on this 2-core VM under a neighbour's load that took more than
/// 15 s once. The tests judge what the restart keeps, not its speed (that
/// is `cargo xtask bench`'s job), so the bound is generous.
const ADOPT_WITHIN: Duration = Duration::from_secs(60);

static NEXT_EXTRA: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// MTU of the balancer's and backends' links (the client's is 1500): room for
/// the outer header, as the README recommends.
const BACKEND_MTU: u32 = 1600;

/// What to build.
#[derive(Clone, Debug)]
pub struct LabSpec {
    /// One backend per weight.
    pub weights: Vec<u32>,
    /// `lbd --xdp-mode` for the balancer: "native" (default) or "skb".
    pub xdp_mode: &'static str,
    /// lbd's `RUST_LOG` ("info" by default).
    pub log: &'static str,
    /// TOML appended to every `[[vip]]` of lbd's config (e.g. a
    /// `[vip.health]` table).
    pub vip_extra: String,
    /// Put the client behind a router whose link to it has this MTU (the
    /// client's own stays 1500), for path MTU discovery: `None` (default)
    /// puts the client on the bridge.
    pub router_mtu: Option<u32>,
    /// Start the balancer as an older build left it: the data plane of the
    /// layout-N fixture (`crate::fixture`) restored and running with its
    /// own program, no lbd until [`Lab::start_lbd`] (an upgrade). Its
    /// config takes the fixture's capacities.
    pub legacy: Option<u32>,
    /// TOML written right after `[metrics] listen = ...` in lbd's config:
    /// keys of `[metrics]` first, then any other tables (`[log]`, ...).
    pub config_extra: String,
    /// `balancer.max_backends` (64 by default).
    pub max_backends: u32,
    /// `balancer.max_vips` (8 by default).
    pub max_vips: u32,
    /// Keys appended to lbd's `[conntrack]` table (e.g. timeouts, the
    /// sweep interval).
    pub conntrack: String,
}

impl LabSpec {
    /// Backends with these weights, native XDP.
    pub fn weights(weights: &[u32]) -> LabSpec {
        LabSpec {
            weights: weights.to_vec(),
            xdp_mode: "native",
            log: "info",
            vip_extra: String::new(),
            router_mtu: None,
            legacy: None,
            config_extra: String::new(),
            max_backends: 64,
            max_vips: 8,
            conntrack: String::new(),
        }
    }
}

/// A backend host.
pub struct LabBackend {
    /// `b1`, `b2`, ...: what its services answer with.
    pub name: String,
    pub v4: Ipv4Addr,
    pub v6: Ipv6Addr,
    pub weight: u32,
    pub ns: Netns,
    /// `XDP_PASS` on the switch's end of its link: its decapsulator sends
    /// second-chance packets on with native `XDP_TX`, which a veth drops
    /// unless the peer runs XDP.
    _pass: PassProgram,
}

impl LabBackend {
    /// The counter of `lbd decap`'s packets with reason `reason` (a
    /// `DecapReason` name), from its `/metrics` in the backend's namespace.
    pub fn decap_packets(&self, reason: &str) -> Result<u64> {
        let text = in_ns(&self.ns, fetch_metrics)??;
        Ok(
            crate::prom::value(&text, "lb_decap_packets_total", &[("reason", reason)])
                .unwrap_or(0.0) as u64,
        )
    }
}

/// The lab's processes.
struct Procs {
    /// `None` while a legacy lab's old data plane runs alone.
    lbd: Option<Child>,
    decaps: Vec<(String, Child)>,
}

/// A running lab. Drop tears it down.
pub struct Lab {
    /// lbd and the decapsulators, behind a lock so lbd can be restarted
    /// while clients run.
    procs: Mutex<Procs>,
    lbd_bin: PathBuf,
    lbd_args: Vec<String>,
    /// lbd's `RUST_LOG`.
    lbd_log: &'static str,
    /// What lbd's config is made of besides the backends.
    extra: ConfigExtra,
    /// See [`LabSpec::legacy`].
    legacy: Option<u32>,
    /// lbd's pinned state: /sys/fs/bpf/<instance>.
    instance: String,
    config_path: PathBuf,
    services: Vec<servers::Services>,
    _pass: PassProgram,
    pub backends: Vec<LabBackend>,
    pub client: Netns,
    /// The router in front of the client, with [`LabSpec::router_mtu`].
    pub router: Option<Netns>,
    pub balancer: Netns,
    switch: Netns,
    dir: PathBuf,
}

/// The `lbd` binary next to the running executable (tests, demo and bench
/// live in the same target directory as lbd).
pub fn lbd_path() -> Result<PathBuf> {
    binary_path("lbd")
}

/// A binary of lb-userspace (`lbd`, `lbctl`) next to the running executable.
pub fn binary_path(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let mut dir = exe
        .parent()
        .context("executable without a directory")?
        .to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let bin = dir.join(name);
    if !bin.exists() {
        bail!(
            "{} not found: build it first (`cargo build -p lb-userspace --bins`, which `cargo xtask test` does)",
            bin.display()
        );
    }
    Ok(bin)
}

fn host_link(switch: &Netns, host: &Netns, port: &str, mtu: u32) -> Result<()> {
    switch.ip(&[
        "link",
        "add",
        port,
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        host.name(),
    ])?;
    switch.ip(&[
        "link",
        "set",
        port,
        "mtu",
        &mtu.to_string(),
        "master",
        "br0",
        "up",
    ])?;
    host.ip(&["link", "set", "eth0", "mtu", &mtu.to_string(), "up"])?;
    Ok(())
}

/// IPv6 addresses usable at once (no duplicate address detection wait).
fn no_dad(ns: &Netns) -> Result<()> {
    ns.exec(
        "sysctl",
        &[
            "-qw",
            "net.ipv6.conf.all.accept_dad=0",
            "net.ipv6.conf.default.accept_dad=0",
        ],
    )?;
    Ok(())
}

/// The balancer's addresses in [`Lab`].
const BALANCER: (Ipv4Addr, Ipv6Addr) = (
    Ipv4Addr::new(10, 201, 0, 1),
    Ipv6Addr::new(0xfd00, 0x201, 0, 0, 0, 0, 0, 1),
);

/// The router's address on the bridge, with [`LabSpec::router_mtu`].
const ROUTER_V4: &str = "10.201.0.3";
const ROUTER_V6: &str = "fd00:201::3";
/// The client's network behind the router.
const ROUTED_CLIENT_V4_NET: &str = "10.202.0.0/24";
const ROUTED_CLIENT_V6_NET: &str = "fd00:202::/64";

/// Routes the lab's VIPs (v4 and v6) via the balancer's address on the
/// bridge.
fn route_vips_to_balancer(ns: &Netns) -> Result<()> {
    ns.ip(&["route", "add", &format!("{VIP_V4}/32"), "via", "10.201.0.1"])?;
    ns.ip(&[
        "-6",
        "route",
        "add",
        &format!("{VIP_V6}/128"),
        "via",
        "fd00:201::1",
    ])?;
    Ok(())
}

/// Puts `client` behind a new router namespace: router on the bridge
/// (10.201.0.3, fd00:201::3), client on a link of its own (10.202.0.2,
/// fd00:202::2) whose router side has MTU `mtu`, so the router sends
/// "fragmentation needed" / "packet too big" for larger packets towards the
/// client. The client reaches everything through the router; the router
/// sends VIP traffic to the balancer.
fn routed_client(switch: &Netns, client: &Netns, mtu: u32, vip_routes: bool) -> Result<Netns> {
    let router = Netns::new("lab-router")?;
    no_dad(&router)?;
    host_link(switch, &router, "v-router", BACKEND_MTU)?;
    router.ip(&["addr", "add", &format!("{ROUTER_V4}/24"), "dev", "eth0"])?;
    router.ip(&["addr", "add", &format!("{ROUTER_V6}/64"), "dev", "eth0"])?;
    router.ip(&[
        "link",
        "add",
        "eth1",
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        client.name(),
    ])?;
    router.ip(&["link", "set", "eth1", "mtu", &mtu.to_string(), "up"])?;
    router.ip(&["addr", "add", "10.202.0.1/24", "dev", "eth1"])?;
    router.ip(&["addr", "add", "fd00:202::1/64", "dev", "eth1", "nodad"])?;
    router.exec(
        "sysctl",
        &[
            "-qw",
            "net.ipv4.ip_forward=1",
            "net.ipv6.conf.all.forwarding=1",
        ],
    )?;
    if vip_routes {
        route_vips_to_balancer(&router)?;
    }
    for dev in ["eth0", "eth1"] {
        router.exec("ethtool", &["-K", dev, "tx", "off"])?;
    }
    client.ip(&["link", "set", "eth0", "mtu", "1500", "up"])?;
    client.exec("ethtool", &["-K", "eth0", "tx", "off"])?;
    client.ip(&["addr", "add", "10.202.0.2/24", "dev", "eth0"])?;
    client.ip(&["addr", "add", "fd00:202::2/64", "dev", "eth0", "nodad"])?;
    client.ip(&["route", "add", "default", "via", "10.202.0.1"])?;
    client.ip(&["-6", "route", "add", "default", "via", "fd00:202::1"])?;
    Ok(router)
}

/// Backend hosts on the bridge, one per weight: b1 at 10.201.0.11 /
/// fd00:201::11, b2 at .12, ... Each has the VIPs on `lo`; `routed`: the
/// client's network is behind the router.
fn make_backends(switch: &Netns, weights: &[u32], routed: bool) -> Result<Vec<LabBackend>> {
    let mut backends = Vec::new();
    for (i, &weight) in weights.iter().enumerate() {
        let name = format!("b{}", i + 1);
        let ns = Netns::new(&format!("lab-{name}"))?;
        no_dad(&ns)?;
        host_link(switch, &ns, &format!("v-{name}"), BACKEND_MTU)?;
        let v4 = Ipv4Addr::new(10, 201, 0, 11 + i as u8);
        let v6 = Ipv6Addr::new(0xfd00, 0x201, 0, 0, 0, 0, 0, 11 + i as u16);
        ns.ip(&["addr", "add", &format!("{v4}/24"), "dev", "eth0"])?;
        ns.ip(&["addr", "add", &format!("{v6}/64"), "dev", "eth0"])?;
        ns.ip(&["addr", "add", &format!("{VIP_V4}/32"), "dev", "lo"])?;
        ns.ip(&["addr", "add", &format!("{VIP_V6}/128"), "dev", "lo"])?;
        if routed {
            // Replies go to the client through the router.
            ns.ip(&["route", "add", ROUTED_CLIENT_V4_NET, "via", ROUTER_V4])?;
            ns.ip(&["-6", "route", "add", ROUTED_CLIENT_V6_NET, "via", ROUTER_V6])?;
        }
        ns.exec(
            "sysctl",
            &[
                "-qw",
                "net.ipv4.conf.all.arp_ignore=1",
                "net.ipv4.conf.all.arp_announce=2",
                "net.ipv4.conf.eth0.arp_ignore=1",
                "net.ipv4.conf.eth0.arp_announce=2",
            ],
        )?;
        let port = format!("v-{name}");
        let pass = {
            let _inside = switch.enter()?;
            PassProgram::attach(&port).with_context(|| format!("attaching XDP_PASS to {port}"))?
        };
        backends.push(LabBackend {
            name,
            v4,
            v6,
            weight,
            ns,
            _pass: pass,
        });
    }
    Ok(backends)
}

/// Child processes with what they are, for error messages.
type Processes = Vec<(String, Child)>;

/// Kills and reaps `processes`.
fn kill_all(processes: &mut [(String, Child)]) {
    for (_, c) in processes.iter_mut() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// Starts every backend's services (HTTP and UDP echo on the VIPs) and its
/// decapsulator (`lbd decap`, logging to `dir`).
fn start_backends(
    backends: &[LabBackend],
    lbd: &Path,
    dir: &Path,
) -> Result<(Vec<servers::Services>, Processes)> {
    let mut services = Vec::new();
    for b in backends {
        services.push(servers::start(
            &b.ns,
            &b.name,
            &[VIP_V4.into(), VIP_V6.into()],
        )?);
    }
    // Children started so far are killed if a later start fails.
    let mut processes: Vec<(String, Child)> = Vec::new();
    for b in backends {
        let log = dir.join(format!("{}-decap.log", b.name));
        // As recommended for backends: packets of connections a backend
        // does not have go on to their second-chance candidate.
        let args = [
            "decap",
            "--iface",
            "eth0",
            "--xdp-mode",
            "native",
            "--second-chance",
        ];
        match spawn_in(&b.ns, lbd, &args, &log, "info") {
            Ok(c) => processes.push((format!("{} lbd decap", b.name), c)),
            Err(e) => {
                kill_all(&mut processes);
                return Err(e);
            }
        }
    }
    Ok((services, processes))
}

/// lbd's config for the lab: both VIPs, HTTP and echo, over the backends
/// that have a weight (`None`: not in the config).
/// The parts of lbd's config a [`LabSpec`] sets.
#[derive(Clone)]
struct ConfigExtra {
    vip: String,
    top: String,
    conntrack: String,
    max_backends: u32,
    max_vips: u32,
}

fn config(
    dir: &Path,
    (source_v4, source_v6): (Ipv4Addr, Ipv6Addr),
    backends: &[LabBackend],
    weights: &[Option<u32>],
    extra: &ConfigExtra,
) -> String {
    let vip_extra = &extra.vip;
    let mut c = format!(
        "[balancer]\nsource_v4 = \"{source_v4}\"\nsource_v6 = \"{source_v6}\"\nmtu = 1600\nmax_vips = {}\nmax_backends = {}\n\n",
        extra.max_vips, extra.max_backends
    );
    // 64 Ki slots unless the spec sizes the table itself.
    let size = if extra
        .conntrack
        .lines()
        .any(|l| l.trim_start().starts_with("size"))
    {
        ""
    } else {
        "size = 65536\n"
    };
    c += &format!("[conntrack]\n{size}{}\n\n", extra.conntrack);
    c += &format!("[metrics]\nlisten = \"{METRICS}\"\n{}\n\n", extra.top);
    c += &format!(
        "[api]\nsocket = \"{}\"\naudit_log = \"{}\"\ntcp_listen = \"{API_TCP}\"\ntoken_file = \"{}\"\n\n",
        dir.join("api.sock").display(),
        dir.join("audit.log").display(),
        dir.join("tokens").display()
    );
    for (vip, v6) in [(IpAddr::from(VIP_V4), false), (IpAddr::from(VIP_V6), true)] {
        for (port, proto) in [(servers::HTTP_PORT, "tcp"), (servers::ECHO_PORT, "udp")] {
            c += &format!(
                "[[vip]]\naddress = \"{vip}\"\nport = {port}\nprotocol = \"{proto}\"\nbackends = [\n"
            );
            for (b, w) in backends.iter().zip(weights) {
                let Some(w) = w else { continue };
                let addr: IpAddr = if v6 { b.v6.into() } else { b.v4.into() };
                c += &format!("  {{ address = \"{addr}\", weight = {w} }},\n");
            }
            c += "]\n";
            if !vip_extra.is_empty() {
                c += vip_extra;
                c += "\n";
            }
            c += "\n";
        }
    }
    c
}

impl Lab {
    /// Builds the lab, starts lbd and the backends, and waits until traffic
    /// flows.
    pub fn start(spec: &LabSpec) -> Result<Lab> {
        require_root();
        let lbd = lbd_path()?;
        let switch = Netns::new("lab-sw")?;
        let client = Netns::new("lab-client")?;
        let balancer = Netns::new("lab-lb")?;
        let dir = std::env::temp_dir().join(balancer.name());
        fs::create_dir_all(&dir)?;
        for ns in [&switch, &client, &balancer] {
            no_dad(ns)?;
        }
        switch.ip(&["link", "add", "br0", "type", "bridge"])?;
        switch.ip(&["link", "set", "br0", "up"])?;
        // A switch does not run the host's firewall on the frames it passes.
        // Where `br_netfilter` is loaded, bridges in new namespaces call the
        // IP hooks for every frame by default: a cost every lab path would
        // pay per crossing (not a real network's). Off, if it is there.
        for family in ["iptables", "ip6tables", "arptables"] {
            let knob = format!("/proc/sys/net/bridge/bridge-nf-call-{family}");
            switch.exec(
                "sh",
                &["-c", &format!("[ ! -e {knob} ] || echo 0 > {knob}")],
            )?;
        }

        let router = match spec.router_mtu {
            None => {
                host_link(&switch, &client, "v-client", 1500)?;
                // veth offloads checksums: the client's packets would carry
                // only a partial TCP/UDP checksum, which a real NIC completes
                // on the wire but XDP_TX on veth sends as is. Have the client
                // compute them.
                client.exec("ethtool", &["-K", "eth0", "tx", "off"])?;
                client.ip(&["addr", "add", "10.201.0.2/24", "dev", "eth0"])?;
                client.ip(&["addr", "add", "fd00:201::2/64", "dev", "eth0"])?;
                route_vips_to_balancer(&client)?;
                None
            }
            Some(mtu) => Some(routed_client(&switch, &client, mtu, true)?),
        };

        host_link(&switch, &balancer, "v-lb", BACKEND_MTU)?;
        balancer.ip(&["addr", "add", "10.201.0.1/24", "dev", "eth0"])?;
        balancer.ip(&["addr", "add", "fd00:201::1/64", "dev", "eth0"])?;

        let backends = make_backends(&switch, &spec.weights, router.is_some())?;

        // veth delivers native XDP_TX only if the peer runs XDP.
        let pass = {
            let _inside = switch.enter()?;
            PassProgram::attach("v-lb")
                .context("attaching XDP_PASS to the balancer's bridge port")?
        };

        let config_path = dir.join("lbd.toml");
        let extra = ConfigExtra {
            vip: spec.vip_extra.clone(),
            top: spec.config_extra.clone(),
            conntrack: spec.conntrack.clone(),
            max_backends: spec.max_backends,
            max_vips: spec.max_vips,
        };
        let weights: Vec<Option<u32>> = backends.iter().map(|b| Some(b.weight)).collect();
        fs::write(dir.join("tokens"), format!("lab {API_TOKEN}\n"))?;
        fs::write(
            &config_path,
            with_capacities(
                config(&dir, BALANCER, &backends, &weights, &extra),
                spec.legacy,
            ),
        )?;
        let instance = balancer.name().to_string();
        let lbd_args: Vec<String> = [
            "--config",
            config_path.to_str().context("temp path is UTF-8")?,
            "--iface",
            "eth0",
            "--xdp-mode",
            spec.xdp_mode,
            "--instance",
            &instance,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();

        let (services, mut processes) = start_backends(&backends, &lbd, &dir)?;
        let args: Vec<&str> = lbd_args.iter().map(String::as_str).collect();
        let lbd_child = match spec.legacy {
            None => match spawn_in(&balancer, &lbd, &args, &dir.join("lbd.log"), spec.log) {
                Ok(c) => Some(c),
                Err(e) => {
                    kill_all(&mut processes);
                    return Err(e);
                }
            },
            Some(layout) => {
                if let Err(e) = legacy_dataplane(&balancer, &instance, layout, &backends) {
                    kill_all(&mut processes);
                    return Err(e);
                }
                None
            }
        };
        let lab = Lab {
            procs: Mutex::new(Procs {
                lbd: lbd_child,
                decaps: processes,
            }),
            lbd_bin: lbd,
            lbd_args,
            lbd_log: spec.log,
            extra,
            legacy: spec.legacy,
            instance,
            config_path,
            services,
            _pass: pass,
            backends,
            client,
            balancer,
            router,
            switch,
            dir,
        };
        lab.wait_ready()?;
        Ok(lab)
    }

    /// lbd's config with these backends (`None`: not in the config).
    pub fn config_text(&self, weights: &[Option<u32>]) -> String {
        with_capacities(
            config(&self.dir, BALANCER, &self.backends, weights, &self.extra),
            self.legacy,
        )
    }

    /// Starts lbd on a legacy lab's balancer (an upgrade of the old data
    /// plane); returns once it has replaced the old program and serves
    /// metrics.
    pub fn start_lbd(&self) -> Result<()> {
        {
            let mut procs = self.procs.lock().expect("lab lock");
            if procs.lbd.is_some() {
                bail!("lbd runs already");
            }
            let args: Vec<&str> = self.lbd_args.iter().map(String::as_str).collect();
            procs.lbd = Some(spawn_in(
                &self.balancer,
                &self.lbd_bin,
                &args,
                &self.dir.join("lbd.log"),
                self.lbd_log,
            )?);
        }
        self.wait_within(
            ADOPT_WITHIN,
            |lab| {
                lab.log_count("balancer program replaced on the existing attachment") > 0
                    && lab.metrics().is_ok()
            },
            "lbd to take over the old data plane",
        )
    }

    /// Rewrites lbd's config with these backends (`None`: not in the
    /// config) and reloads it (SIGHUP); returns once lbd applied it.
    pub fn set_backends(&self, weights: &[Option<u32>]) -> Result<()> {
        fs::write(&self.config_path, self.config_text(weights))?;
        self.reload()
    }

    /// Makes lbd reload its config file (SIGHUP); returns once lbd applied it.
    pub fn reload(&self) -> Result<()> {
        self.reload_until("config reloaded and applied")
    }

    /// SIGHUP; returns once lbd's log has one more line containing
    /// `needle` than before.
    pub fn reload_until(&self, needle: &str) -> Result<()> {
        let before = self.log_count(needle);
        self.sighup();
        self.wait_for(
            |lab| lab.log_count(needle) > before,
            &format!("lbd to log {needle:?} after SIGHUP"),
        )
    }

    /// Runs `lbctl` against this lab's API socket with `args`; its output.
    pub fn lbctl(&self, args: &[&str]) -> std::process::Output {
        std::process::Command::new(binary_path("lbctl").expect("lbctl is built"))
            .arg("--socket")
            .arg(self.api_socket())
            .args(args)
            .output()
            .expect("lbctl runs")
    }

    /// The running lbd's pid.
    pub fn lbd_pid(&self) -> u32 {
        self.procs
            .lock()
            .expect("lab lock")
            .lbd
            .as_ref()
            .expect("lbd runs")
            .id()
    }

    /// Stops lbd (SIGTERM: the balancer keeps running from its pinned
    /// state) and starts it again; returns once the new lbd adopted the
    /// state and serves metrics.
    pub fn restart_lbd(&self) -> Result<()> {
        self.restart_lbd_with(libc::SIGTERM)
    }

    /// As [`Lab::restart_lbd`], ending lbd with `signal` (SIGTERM, or
    /// SIGKILL as a crash would).
    pub fn restart_lbd_with(&self, signal: i32) -> Result<()> {
        let before = self.log_count("balancer program replaced on the existing attachment");
        {
            let mut procs = self.procs.lock().expect("lab lock");
            let lbd = procs.lbd.as_mut().context("lbd does not run")?;
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(lbd.id() as i32, signal) };
            let status = lbd.wait()?;
            if signal == libc::SIGTERM && !status.success() {
                drop(procs);
                bail!(
                    "lbd exited with {status} on SIGTERM; logs:\n{}",
                    self.logs()
                );
            }
            let args: Vec<&str> = self.lbd_args.iter().map(String::as_str).collect();
            procs.lbd = Some(spawn_in(
                &self.balancer,
                &self.lbd_bin,
                &args,
                &self.dir.join("lbd.log"),
                self.lbd_log,
            )?);
        }
        self.wait_within(
            ADOPT_WITHIN,
            |lab| {
                lab.log_count("balancer program replaced on the existing attachment") > before
                    && lab.metrics().is_ok()
            },
            "the restarted lbd to adopt the balancer",
        )
    }

    /// Runs another lbd in the balancer's namespace with `args` (e.g. the
    /// lab's own, to see a second owner refused) and waits up to 15 s for
    /// it to exit: its exit status and what it printed.
    pub fn run_lbd(&self, args: &[&str]) -> Result<(std::process::ExitStatus, String)> {
        let log = self.dir.join(format!(
            "lbd-extra-{}.log",
            NEXT_EXTRA.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let mut child = spawn_in(&self.balancer, &self.lbd_bin, args, &log, self.lbd_log)?;
        let deadline = Instant::now() + Duration::from_secs(15);
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "the extra lbd did not exit; its log:\n{}",
                    fs::read_to_string(&log).unwrap_or_default()
                );
            }
            thread::sleep(Duration::from_millis(20));
        };
        Ok((status, fs::read_to_string(&log).unwrap_or_default()))
    }

    /// The arguments the lab runs lbd with.
    pub fn lbd_args(&self) -> Vec<String> {
        self.lbd_args.clone()
    }

    /// lbd's pinned state directory.
    pub fn pin_dir(&self) -> PathBuf {
        pinning::instance_dir(&self.instance)
    }

    /// Sends lbd SIGHUP (a reload) and returns at once.
    pub fn sighup(&self) {
        let pid = self.lbd_pid() as i32;
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(pid, libc::SIGHUP) };
    }

    fn log_count(&self, needle: &str) -> usize {
        self.lbd_log().matches(needle).count()
    }

    fn wait_for(&self, done: impl Fn(&Lab) -> bool, what: &str) -> Result<()> {
        self.wait_within(Duration::from_secs(15), done, what)
    }

    /// As [`Lab::wait_for`], waiting up to `within`.
    fn wait_within(&self, within: Duration, done: impl Fn(&Lab) -> bool, what: &str) -> Result<()> {
        let deadline = Instant::now() + within;
        while !done(self) {
            self.check_alive()?;
            if Instant::now() > deadline {
                bail!("timed out waiting for {what}; logs:\n{}", self.logs());
            }
            thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Waits for lbd's metrics, the decapsulators and the balancer's
    /// neighbours; fails early with the logs if a process died.
    fn wait_ready(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            self.check_alive()?;
            let decaps_up = self.backends.iter().all(|b| {
                b.ns.ip(&["link", "show", "eth0"])
                    .is_ok_and(|s| s.contains("prog/xdp"))
            });
            let neighbours = self
                .balancer
                .ip(&["neigh", "show", "dev", "eth0"])
                .unwrap_or_default();
            let resolved = self.backends.iter().all(|b| {
                [b.v4.to_string(), b.v6.to_string()].iter().all(|a| {
                    neighbours
                        .lines()
                        .any(|l| l.split_whitespace().next() == Some(a) && l.contains("lladdr"))
                })
            });
            let lbd_up = self.legacy.is_some() || self.metrics().is_ok();
            if decaps_up && resolved && lbd_up {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "the lab did not come up in 20 s (decapsulators {decaps_up}, neighbours {resolved}); \
                     balancer neighbours:\n{neighbours}logs:\n{}",
                    self.logs()
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    fn check_alive(&self) -> Result<()> {
        let mut procs = self.procs.lock().expect("lab lock");
        if let Some(status) = procs
            .lbd
            .as_mut()
            .map(Child::try_wait)
            .transpose()?
            .flatten()
        {
            drop(procs);
            bail!("lbd exited ({status}); logs:\n{}", self.logs());
        }
        for (what, child) in procs.decaps.iter_mut() {
            if let Some(status) = child.try_wait()? {
                let what = what.clone();
                drop(procs);
                bail!("{what} exited ({status}); logs:\n{}", self.logs());
            }
        }
        Ok(())
    }

    /// The API's Unix socket.
    pub fn api_socket(&self) -> PathBuf {
        self.dir.join("api.sock")
    }

    /// lbd's config file (lbd persists API changes into it).
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// The audit log.
    pub fn audit_log(&self) -> PathBuf {
        self.dir.join("audit.log")
    }

    /// What backend `i`'s HTTP service does (health, metrics, port).
    pub fn control(&self, i: usize) -> &servers::Control {
        &self.services[i].control
    }

    /// Every backend's controls, to hand to a thread that outlives a borrow
    /// of the lab.
    pub fn controls(&self) -> Vec<std::sync::Arc<servers::Control>> {
        self.services.iter().map(|s| s.control.clone()).collect()
    }

    /// lbd's log so far.
    pub fn lbd_log(&self) -> String {
        fs::read_to_string(self.dir.join("lbd.log")).unwrap_or_default()
    }

    /// Every log the lab's processes wrote.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        if let Ok(entries) = fs::read_dir(&self.dir) {
            for e in entries.flatten() {
                if e.path().extension().is_some_and(|x| x == "log") {
                    out += &format!(
                        "--- {}\n{}",
                        e.path().display(),
                        fs::read_to_string(e.path()).unwrap_or_default()
                    );
                }
            }
        }
        out
    }

    /// The VIP's HTTP service.
    pub fn vip_http(&self, v6: bool) -> SocketAddr {
        let ip: IpAddr = if v6 { VIP_V6.into() } else { VIP_V4.into() };
        (ip, servers::HTTP_PORT).into()
    }

    /// The VIP's UDP echo service.
    pub fn vip_echo(&self, v6: bool) -> SocketAddr {
        let ip: IpAddr = if v6 { VIP_V6.into() } else { VIP_V4.into() };
        (ip, servers::ECHO_PORT).into()
    }

    /// Runs `f` on a thread inside the client's namespace.
    pub fn in_client<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        in_ns(&self.client, f)
    }

    /// lbd's `/metrics`, fetched inside the balancer's namespace.
    pub fn metrics(&self) -> Result<String> {
        in_ns(&self.balancer, fetch_metrics)?
    }

    /// The value of the sample `name` with exactly `labels` in lbd's
    /// metrics, 0 if absent.
    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> Result<u64> {
        Ok(crate::prom::value(&self.metrics()?, name, labels).unwrap_or(0.0) as u64)
    }
}

/// `config` with the capacities of the layout-`legacy` fixture, if any:
/// the state an upgrade converts must fit the config.
fn with_capacities(config: String, legacy: Option<u32>) -> String {
    if legacy.is_none() {
        return config;
    }
    config
        .replace(
            "max_backends = 64\n",
            "max_backends = 64\nmaglev_table_size = 1031\n",
        )
        .replace(
            "[conntrack]\nsize = 65536\n",
            "[conntrack]\nsize = 262144\n",
        )
}

/// The balancer of a legacy lab: the layout-`layout` fixture's data plane
/// restored on `eth0` of `ns` (instance `instance`), with the neighbour
/// entries its lbd had marked managed.
fn legacy_dataplane(
    ns: &Netns,
    instance: &str,
    layout: u32,
    backends: &[LabBackend],
) -> Result<()> {
    let (ifindex, mac) = (ns.ifindex("eth0")?, ns.mac("eth0")?);
    let dir = pinning::instance_dir(instance);
    in_ns(ns, || {
        crate::fixture::restore(&crate::fixture::dir(layout), &dir, "eth0", ifindex, mac)
    })??;
    for b in backends {
        for a in [b.v4.to_string(), b.v6.to_string()] {
            ns.ip(&["neigh", "replace", &a, "dev", "eth0", "managed"])?;
        }
    }
    Ok(())
}

/// lbd's `/metrics` at [`METRICS`]; the calling thread must be in lbd's
/// namespace.
fn fetch_metrics() -> Result<String> {
    let mut s = TcpStream::connect_timeout(&METRICS.parse()?, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let (head, body) = text.split_once("\r\n\r\n").context("no HTTP header end")?;
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        bail!("metrics answered {}", head.lines().next().unwrap_or(""));
    }
    Ok(body.to_string())
}

/// Runs `f` on a thread inside `ns`.
/// The `/metrics` of the lbd in the namespace named `ns` (for threads that
/// cannot borrow the lab while it changes).
pub fn metrics_in(ns: &str) -> Result<String> {
    thread::scope(|s| {
        s.spawn(|| -> Result<String> {
            let _inside = crate::netns::enter(ns)?;
            fetch_metrics()
        })
        .join()
        .map_err(|_| anyhow::anyhow!("thread in {ns} panicked"))?
    })
}

pub fn in_ns<T: Send>(ns: &Netns, f: impl FnOnce() -> T + Send) -> Result<T> {
    thread::scope(|s| {
        s.spawn(|| -> Result<T> {
            let _inside = ns.enter()?;
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("thread in {} panicked", ns.name()))?
    })
}

/// Starts `program` inside `ns`. Only the network namespace is entered
/// (`setns` before exec), not a new mount namespace as `ip netns exec` does:
/// lbd must see the host's BPF filesystem to pin and adopt its state.
pub fn spawn_in(
    ns: &Netns,
    program: &Path,
    args: &[&str],
    log: &Path,
    rust_log: &str,
) -> Result<Child> {
    use std::os::{fd::AsRawFd, unix::process::CommandExt};
    let out = fs::OpenOptions::new().create(true).append(true).open(log)?;
    let netns = fs::File::open(format!("/run/netns/{}", ns.name()))?;
    let fd = netns.as_raw_fd();
    let mut cmd = Command::new(program);
    cmd.args(args)
        .env("RUST_LOG", rust_log)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out);
    // SAFETY: setns is async-signal-safe; `fd` stays open until spawn returns.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .with_context(|| format!("starting {} in {}", program.display(), ns.name()))?;
    drop(netns);
    Ok(child)
}

/// Ends `children`: SIGTERM to all (so each ends cleanly), then SIGKILL to
/// any still running after 5 s.
fn terminate(children: Vec<&mut Child>) {
    for child in &children {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    for child in children {
        while child.try_wait().ok().flatten().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                break;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // SIGTERM first so every process ends cleanly; SIGKILL if one hangs.
        let procs = self.procs.get_mut().unwrap_or_else(|e| e.into_inner());
        terminate(
            procs
                .lbd
                .iter_mut()
                .chain(procs.decaps.iter_mut().map(|(_, c)| c))
                .collect(),
        );
        // lbd leaves its state pinned on exit (for a restart): remove it.
        let _ = pinning::cleanup(&pinning::instance_dir(&self.instance));
        self.services.clear();
        let _ = fs::remove_dir_all(&self.dir);
        // The namespaces go when their fields drop.
        let _ = &self.switch;
    }
}
