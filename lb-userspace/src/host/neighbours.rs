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

use std::{net::IpAddr, process::Command};

use serde::Deserialize;

/// Why a neighbour could not be managed.
#[derive(Debug, thiserror::Error)]
pub enum NeighbourError {
    #[error("running `ip {args}`")]
    Spawn {
        args: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`ip {args}` failed: {stderr}")]
    Failed { args: String, stderr: String },
    #[error("`ip {args}` printed JSON lbd cannot read")]
    Json {
        args: String,
        #[source]
        source: serde_json::Error,
    },
}

fn ip(args: &[&str]) -> Result<String, NeighbourError> {
    let joined = args.join(" ");
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|source| NeighbourError::Spawn {
            args: joined.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(NeighbourError::Failed {
            args: joined,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn json<T: for<'de> Deserialize<'de>>(args: &[&str]) -> Result<T, NeighbourError> {
    let text = ip(args)?;
    serde_json::from_str(&text).map_err(|source| NeighbourError::Json {
        args: args.join(" "),
        source,
    })
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
