//! Keeping the kernel's neighbour entries towards the backends resolved.
//!
//! The data plane takes next-hop MACs from `bpf_fib_lookup`, which only
//! reads the neighbour table: nothing in the XDP path makes the kernel
//! resolve a missing entry (the packet is dropped as `fib_failed`). So for
//! every backend `lbd` finds the next hop on the attached interface (the
//! backend itself, or its gateway) and marks that neighbour *managed*
//! (`ip neigh replace ADDR dev IF managed`, Linux 5.16+): the kernel then
//! resolves it and keeps it reachable on its own. Entries an operator made
//! permanent are left alone. Entries are not removed when a backend goes.
//!
//! This uses the `ip` command (iproute2) rather than a netlink library.

use std::net::IpAddr;

use serde::Deserialize;

use super::{CommandError, ip_json as json, run};

/// Why a neighbour could not be managed: the `ip` command failed.
pub type NeighbourError = CommandError;

fn ip(args: &[&str]) -> Result<String, NeighbourError> {
    run("ip", args, None)
}

#[derive(Deserialize)]
struct Route {
    dst: String,
    gateway: Option<String>,
}

#[derive(Deserialize)]
struct Neighbour {
    #[serde(default)]
    state: Vec<String>,
}

/// The neighbour through which `addr` is reached on `iface`: its gateway,
/// or `addr` itself when it is on the link.
pub fn next_hop(iface: &str, addr: IpAddr) -> Result<IpAddr, NeighbourError> {
    let a = addr.to_string();
    let routes: Vec<Route> = json(&["-j", "route", "get", &a, "oif", iface])?;
    let hop = routes
        .first()
        .map(|r| r.gateway.as_deref().unwrap_or(&r.dst))
        .unwrap_or(&a);
    Ok(hop.parse().unwrap_or(addr))
}

/// Marks the next hops of `backends` on `iface` managed (see the module
/// docs). Every backend is tried; the failures are returned.
pub fn manage(iface: &str, backends: &[IpAddr]) -> Vec<(IpAddr, NeighbourError)> {
    let mut failures = Vec::new();
    let mut hops: Vec<IpAddr> = Vec::new();
    for b in backends {
        match next_hop(iface, *b) {
            Ok(hop) if !hops.contains(&hop) => hops.push(hop),
            Ok(_) => {}
            Err(e) => failures.push((*b, e)),
        }
    }
    for hop in hops {
        if let Err(e) = manage_one(iface, hop) {
            failures.push((hop, e));
        }
    }
    failures
}

fn manage_one(iface: &str, hop: IpAddr) -> Result<(), NeighbourError> {
    let h = hop.to_string();
    let existing: Vec<Neighbour> = json(&["-j", "neigh", "show", &h, "dev", iface])?;
    let fixed = existing
        .iter()
        .any(|n| n.state.iter().any(|s| s == "PERMANENT" || s == "NOARP"));
    if !fixed {
        ip(&["neigh", "replace", &h, "dev", iface, "managed"])?;
    }
    Ok(())
}
