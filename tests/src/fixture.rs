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
        "[balancer]\nsource_v4 = \"10.201.0.1\"\nsource_v6 = \"fd00:201::1\"\nmtu = 1600\nmax_vips = 8\nmax_backends = 64\nmaglev_table_size = 1031\n\n[conntrack]\nsize = 262144\n\n",
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
        Ipv6Addr::new(0xfd00, 0x201, 0, 0, 0, 0, 0, 10 + i as u16).into()
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

/// The VIP filter slot of layouts 7 and 8: an xor-fold of the address
/// words.
fn xor_filter_slot(addr: &[u32; 4]) -> (usize, u64) {
    let w = addr[0] ^ addr[1] ^ addr[2] ^ addr[3];
    let slot = (w ^ (w >> 16)) & 0xffff;
    ((slot >> 6) as usize, 1u64 << (slot & 63))
}

/// The VIP filter slot of layout 9: a multiply-shift of the address.
fn mul_filter_slot(addr: &[u32; 4]) -> (usize, u64) {
    const K1: u64 = 0x9E37_79B9_7F4A_7C15;
    const K2: u64 = 0xC2B2_AE3D_27D4_EB4F;
    let hi = (addr[0] as u64) | ((addr[1] as u64) << 32);
    let lo = (addr[2] as u64) | ((addr[3] as u64) << 32);
    let slot = ((lo.wrapping_mul(K1) ^ hi).wrapping_mul(K2) >> 48) as u32;
    ((slot >> 6) as usize, 1u64 << (slot & 63))
}

/// The old program's global data (`Globals`, not pinned: its lbd filled
/// it at start), as layout `layout` has it: the `DataplaneConfig`, the VIP
/// address filter and, from layout 9, the interface's MAC (and four unused
/// extra MACs).
fn old_globals(layout: u32, config: &[u8], vips: &[[u32; 4]], mac: [u8; 6]) -> Vec<u8> {
    let slot = if layout >= 9 {
        mul_filter_slot
    } else {
        xor_filter_slot
    };
    let mut filter = [0u64; 1024];
    for a in vips {
        let (w, bit) = slot(a);
        filter[w] |= bit;
    }
    let mut out = config.to_vec();
    out.extend(filter.iter().flat_map(|w| w.to_ne_bytes()));
    if layout >= 9 {
        let word = u32::from_ne_bytes([mac[0], mac[1], mac[2], mac[3]]) as u64
            | (u16::from_ne_bytes([mac[4], mac[5]]) as u64) << 32;
        for w in [word, u64::MAX, u64::MAX, u64::MAX, u64::MAX] {
            out.extend(w.to_ne_bytes());
        }
    }
    out
}

/// A restored old data plane: its maps pinned in an instance
/// directory and its own program attached to an interface through a
/// pinned link, as its lbd left it when it stopped. The program stays
/// attached after this is dropped (the link is pinned).
pub struct OldDataplane {
    /// Kernel ids of the restored maps, to see them gone after an upgrade.
    pub map_ids: Vec<u32>,
}

/// Restores the fixture in `fixture_dir` (layout 7 to 11) into instance
/// directory `dir` and attaches its program to `iface` (index `ifindex`,
/// MAC `mac`) in native mode, in the calling thread's network namespace.
/// Connection table entries keep the time they had left; the config
/// points at `iface`, with a new next-hop generation.
pub fn restore(
    fixture_dir: &Path,
    dir: &Path,
    iface: &str,
    ifindex: u32,
    mac: [u8; 6],
) -> Result<OldDataplane> {
    let fx = Fixture::load(fixture_dir)?;
    match fx.layout {
        7 => restore_with::<72>(fx, fixture_dir, dir, iface, ifindex, mac),
        8..=11 => restore_with::<80>(fx, fixture_dir, dir, iface, ifindex, mac),
        n => bail!(
            "no restore for the layout-{n} fixture in {}",
            fixture_dir.display()
        ),
    }
}

/// [`restore`] of a layout whose `DataplaneConfig` has `N` bytes (the
/// fields used here sit at the same offsets in layouts 7 to 11).
fn restore_with<const N: usize>(
    fx: Fixture,
    fixture_dir: &Path,
    dir: &Path,
    iface: &str,
    ifindex: u32,
    mac: [u8; 6],
) -> Result<OldDataplane> {
    use aya::{
        EbpfLoader,
        programs::{Xdp, XdpMode, links::FdLink},
    };
    use lb::dataplane::raw::RawMap;
    use lb_common::map_name;
    let object = std::fs::read(fixture_dir.join("lb-xdp.o"))?;
    std::fs::create_dir_all(dir)?;
    let mut loader = EbpfLoader::new();
    for (name, m) in &fx.image.maps {
        loader.map_max_entries(name, m.max_entries);
        loader.map_pin_path(name, dir.join(name));
    }
    let mut ebpf = loader.load(&object).context("loading the old object")?;
    let now = jiffies()? as u32;
    let then = fx.jiffies as u32;
    let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
    let mut map_ids = Vec::new();
    let mut config = [0u8; N];
    let mut vips = Vec::new();
    for (name, m) in &fx.image.maps {
        let path = dir.join(name);
        map_ids.push(aya::maps::MapInfo::from_pin(&path)?.id());
        let map = RawMap::open(&path)?;
        for (k, v) in &m.entries {
            let mut v = v.clone();
            if name == map_name::FLOWS || name == map_name::SYN_FLOWS {
                // Layout 7's slot: key (8), ports (4), expires (4).
                for slot in v.chunks_exact_mut(16) {
                    if slot[..8] != [0; 8] {
                        let e = u32::from_ne_bytes(slot[12..16].try_into().unwrap());
                        slot[12..16]
                            .copy_from_slice(&e.wrapping_sub(then).wrapping_add(now).to_ne_bytes());
                    }
                }
            }
            if name == map_name::CONFIG {
                // Layout 7's DataplaneConfig: nexthop_gen at 28, flags at
                // 32 (bit 2: attached in generic mode), ifindex at 40.
                let gen_ = u32::from_ne_bytes(v[28..32].try_into().unwrap())
                    .wrapping_add(1)
                    .max(1);
                v[28..32].copy_from_slice(&gen_.to_ne_bytes());
                let flags = u32::from_ne_bytes(v[32..36].try_into().unwrap()) & !2;
                v[32..36].copy_from_slice(&flags.to_ne_bytes());
                v[40..44].copy_from_slice(&ifindex.to_ne_bytes());
                config.copy_from_slice(&v);
            }
            if name == map_name::VIPS {
                let words: [u32; 4] = std::array::from_fn(|i| {
                    u32::from_ne_bytes(k[i * 4..i * 4 + 4].try_into().unwrap())
                });
                vips.push(words);
            }
            if m.per_cpu > 1 && m.per_cpu != cpus {
                // Another CPU count than when it was made: the first CPU's
                // values, the others zero.
                let stride = v.len() / m.per_cpu;
                let mut adapted = vec![0u8; stride * cpus];
                adapted[..stride].copy_from_slice(&v[..stride]);
                v = adapted;
            }
            map.set(k, &v)?;
        }
    }
    // The globals map is not pinned: pinned for a moment to write it as
    // bytes.
    let globals = ebpf
        .map(lb_common::GLOBALS_SECTION)
        .context("the old object has no globals")?;
    let tmp = lb::dataplane::pinning::instance_dir(&format!("lbt-globals-{}", std::process::id()));
    globals.pin(&tmp)?;
    let written = RawMap::open(&tmp).and_then(|m| {
        m.set(
            &0u32.to_ne_bytes(),
            &old_globals(fx.layout, &config, &vips, mac),
        )
    });
    std::fs::remove_file(&tmp)?;
    written.context("writing the old program's globals")?;
    let prog: &mut Xdp = ebpf
        .program_mut(lb_common::program_name::BALANCER)
        .context("the old object has no balancer program")?
        .try_into()?;
    prog.load()?;
    // As its lbd did: the XDP FIB lookup needs forwarding on the interface.
    for family in ["ipv4", "ipv6"] {
        std::fs::write(
            format!("/proc/sys/net/{family}/conf/{iface}/forwarding"),
            "1",
        )?;
    }
    let link = prog.attach(iface, XdpMode::Driver)?;
    let link = prog.take_link(link)?;
    FdLink::try_from(link)?.pin(dir.join("link"))?;
    Ok(OldDataplane { map_ids })
}
