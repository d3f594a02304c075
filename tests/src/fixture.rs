//! Fixtures of pinned state of older layouts (tests/fixtures/layout-N,
//! made by the `lb-fixture` program of the build of that layout): the
//! shared pieces of making one and of restoring one as a running "old"
//! data plane (its maps pinned, its own program attached, no lbd), which
//! is what a balancer looks like while its lbd is being upgraded.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};
use lb::{dataplane::image::StateImage, desired::vip::Protocol};
use serde::{Deserialize, Serialize};

use crate::{frames::Flow, netns::Netns, packet_lab::backend_mac};

/// Flows in a fixture.
pub const FLOWS: usize = 10_000;

/// The lab's VIPs (IPv4 and IPv6, TCP port 80 and UDP port 9000), with the
/// lab's backends b1..b`n` (weights 1, 1, 2, 1), as the lab's config has
/// them (`crate::lab`), and small tables (1031 entries) to keep fixtures
/// small.
pub fn config(n: usize) -> String {
    let mut c = String::from(
        "[balancer]\nsource_v4 = \"10.201.0.1\"\nsource_v6 = \"fd00:201::1\"\nmtu = 1600\nmax_vips = 8\nmax_backends = 64\nmaglev_table_size = 1031\n\n[conntrack]\nsize = 65536\n\n",
    );
    for vip in ["203.0.113.10", "2001:db8:10::1"] {
        for (port, proto) in [(80, "tcp"), (9000, "udp")] {
            c += &format!(
                "[[vip]]\naddress = \"{vip}\"\nport = {port}\nprotocol = \"{proto}\"\nbackends = [\n"
            );
            for (i, w) in [1, 1, 2, 1].iter().enumerate().take(n) {
                c += &format!(
                    "  {{ address = \"{}\", weight = {w} }},\n",
                    backend(i + 1, vip.contains(':'))
                );
            }
            c += "]\n\n";
        }
    }
    c
}

/// The lab's backend `i` (1-based).
pub fn backend(i: usize, v6: bool) -> IpAddr {
    if v6 {
        Ipv6Addr::new(0xfd00, 0x201, 0, 0, 0, 0, 0, 0x10 + i as u16).into()
    } else {
        Ipv4Addr::new(10, 201, 0, 10 + i as u8).into()
    }
}

/// Flow `i` of a fixture: a quarter to each VIP service, from clients in
/// 10.202.0.0/16 and fd00:202::/64. Fixtures record only each flow's
/// backend (`flows.json`), so this must never change.
pub fn flow(i: usize) -> Flow {
    let v6 = i % 2 == 1;
    let tcp = i % 4 < 2;
    let n = i as u32 / 4;
    let (src, dst): (IpAddr, IpAddr) = if v6 {
        (
            Ipv6Addr::new(0xfd00, 0x202, 0, 0, 0, 0, (n >> 16) as u16, n as u16 + 1).into(),
            "2001:db8:10::1".parse().expect("address"),
        )
    } else {
        (
            Ipv4Addr::new(10, 202, (n / 250) as u8, (n % 250) as u8 + 1).into(),
            "203.0.113.10".parse().expect("address"),
        )
    };
    Flow {
        src,
        dst,
        sport: 1024 + (i as u32 * 7919 % 60000) as u16,
        dport: if tcp { 80 } else { 9000 },
        protocol: if tcp { Protocol::Tcp } else { Protocol::Udp },
    }
}

/// `maps.json`: the maps, and what the state's clock and CPUs were.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Fixture {
    /// The `LAYOUT_VERSION` of the build that made it.
    pub layout: u32,
    /// The kernel's jiffies when the maps were read (the connection
    /// table's expiry times are in jiffies).
    pub jiffies: u64,
    /// Possible CPUs (values per key of per-CPU maps).
    pub nr_cpus: usize,
    pub image: StateImage,
}

/// The fixture directory of layout `n` in the repository.
pub fn dir(n: u32) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(format!("layout-{n}"))
}

impl Fixture {
    /// Reads `dir/maps.json`.
    pub fn load(dir: &Path) -> Result<Fixture> {
        let path = dir.join("maps.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        Ok(serde_json::from_str(&text)?)
    }

    /// Reads `dir/flows.json`: flow `i` ([`flow`]) and the backend it went
    /// to, for each `i`.
    pub fn flows(dir: &Path) -> Result<Vec<(Flow, IpAddr)>> {
        let backends: Vec<IpAddr> =
            serde_json::from_str(&std::fs::read_to_string(dir.join("flows.json"))?)?;
        Ok(backends
            .into_iter()
            .enumerate()
            .map(|(i, b)| (flow(i), b))
            .collect())
    }
}

/// The kernel's jiffies now (from `/proc/timer_list`).
pub fn jiffies() -> Result<u64> {
    let text = std::fs::read_to_string("/proc/timer_list").context("reading /proc/timer_list")?;
    text.lines()
        .find_map(|l| l.trim().strip_prefix("jiffies:"))
        .context("no jiffies in /proc/timer_list")?
        .trim()
        .parse()
        .context("jiffies is not a number")
}

/// Makes `ns` the lab's balancer host for a fixture: `lb0` (peer `peer0`)
/// with 10.201.0.1/24 and fd00:201::1/64, and permanent neighbour entries
/// for the lab's backends b1..b4.
pub fn balancer_host(ns: &Netns) -> Result<()> {
    ns.ip(&[
        "link", "add", "lb0", "type", "veth", "peer", "name", "peer0",
    ])?;
    ns.ip(&["link", "set", "lb0", "up"])?;
    ns.ip(&["link", "set", "peer0", "up"])?;
    ns.ip(&["addr", "add", "10.201.0.1/24", "dev", "lb0"])?;
    ns.ip(&["-6", "addr", "add", "fd00:201::1/64", "dev", "lb0", "nodad"])?;
    for i in 1..=4 {
        for v6 in [false, true] {
            let a = backend(i, v6);
            let mac = crate::netns::format_mac(backend_mac(a));
            ns.ip(&[
                "neigh",
                "replace",
                &a.to_string(),
                "lladdr",
                &mac,
                "dev",
                "lb0",
                "nud",
                "permanent",
            ])?;
        }
    }
    if !ns.ip(&["link", "show", "lb0"])?.contains("UP") {
        bail!("lb0 is not up");
    }
    Ok(())
}
