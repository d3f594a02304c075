//! A namespace with one interface for the balancer, so `BPF_PROG_TEST_RUN`
//! runs the real program, FIB lookups included, against a known topology.
//!
//! Topology: veth `lb0` (10.200.0.1/24, fd00:200::1/64) ↔ `peer0`. Every
//! backend of the config inside those subnets gets a permanent neighbour
//! entry with the MAC [`backend_mac`] gives it.

use std::net::IpAddr;

use anyhow::{Context, Result};
use lb::{
    dataplane::{self, Dataplane},
    desired::config,
};

use crate::{
    frames::{self, Flow, FrameSpec},
    netns::{Netns, NetnsGuard, format_mac},
    require_root,
    xdp::{RunResult, run_xdp},
};

/// The balancer interface's addresses; use them as the config's source.
pub const LAB_V4: &str = "10.200.0.1";
pub const LAB_V6: &str = "fd00:200::1";

/// The neighbour MAC of a backend in the lab.
pub fn backend_mac(addr: IpAddr) -> [u8; 6] {
    let o = match addr {
        IpAddr::V4(a) => a.octets(),
        IpAddr::V6(a) => {
            let o = a.octets();
            [o[12], o[13], o[14], o[15]]
        }
    };
    [0x02, 0xbe, o[0], o[1], o[2], o[3]]
}

fn in_lab_subnet(addr: IpAddr) -> bool {
    match addr {
        IpAddr::V4(a) => a.octets()[..3] == [10, 200, 0],
        IpAddr::V6(a) => a.segments()[..4] == [0xfd00, 0x200, 0, 0],
    }
}

/// A loaded balancer in a namespace of its own. Drop order: data plane,
/// then the thread leaves the namespace, then the namespace goes.
pub struct PacketLab {
    pub dp: Dataplane,
    pub ifindex: u32,
    pub if_mac: [u8; 6],
    _inside: NetnsGuard,
    pub ns: Netns,
}

impl PacketLab {
    /// Builds the lab and loads the balancer with config `toml`.
    pub fn new(toml: &str) -> Result<PacketLab> {
        require_root();
        let config = config::parse(toml, "test config")?;
        let ns = Netns::new("pkt")?;
        ns.ip(&[
            "link", "add", "lb0", "type", "veth", "peer", "name", "peer0",
        ])?;
        ns.ip(&["link", "set", "lb0", "up"])?;
        ns.ip(&["link", "set", "peer0", "up"])?;
        ns.ip(&["addr", "add", &format!("{LAB_V4}/24"), "dev", "lb0"])?;
        ns.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{LAB_V6}/64"),
            "dev",
            "lb0",
            "nodad",
        ])?;
        let in_lab: Vec<IpAddr> = config
            .vips
            .iter()
            .flat_map(|v| &v.backends)
            .map(|b| b.addr)
            .filter(|a| in_lab_subnet(*a))
            .collect();
        let ifindex = ns.ifindex("lb0")?;
        let if_mac = ns.mac("lb0")?;
        let inside = ns.enter()?;
        // As `Dataplane::attach` does; test runs do not attach.
        dataplane::enable_forwarding("lb0", &config.balancer)?;
        let mut dp = Dataplane::load(&config.balancer).context("loading the balancer")?;
        // As `Dataplane::attach` does: frames for lb0's MAC are ours.
        dp.set_local_mac(if_mac)?;
        dp.sync(&config.vips).context("programming the VIPs")?;
        let lab = PacketLab {
            dp,
            ifindex,
            if_mac,
            _inside: inside,
            ns,
        };
        for addr in in_lab {
            lab.add_neighbour(addr)?;
        }
        Ok(lab)
    }

    /// Adds a permanent neighbour entry for `addr` (with [`backend_mac`]),
    /// for backends added after the lab started.
    pub fn add_neighbour(&self, addr: IpAddr) -> Result<()> {
        let mac = format_mac(backend_mac(addr));
        self.ns.ip(&[
            "neigh",
            "replace",
            &addr.to_string(),
            "lladdr",
            &mac,
            "dev",
            "lb0",
            "nud",
            "permanent",
        ])?;
        Ok(())
    }

    /// Removes the neighbour entry of `addr`, so the FIB lookup towards it fails.
    pub fn forget_neighbour(&self, addr: IpAddr) -> Result<()> {
        self.ns
            .ip(&["neigh", "del", &addr.to_string(), "dev", "lb0"])?;
        Ok(())
    }

    /// A frame of `flow` addressed to the balancer's interface.
    pub fn frame(&self, flow: &Flow, spec: FrameSpec) -> Vec<u8> {
        frames::build(
            flow,
            &FrameSpec {
                dst_mac: self.if_mac,
                ..spec
            },
        )
    }

    /// Runs the balancer once on `frame`, received on `lb0`.
    pub fn run(&mut self, frame: &[u8]) -> Result<RunResult> {
        let ifindex = self.ifindex;
        run_xdp(self.dp.balancer()?, frame, ifindex, 1)
    }
}
