//! Keeping the kernel's neighbour entries towards the backends resolved.
//!
//! The data plane takes next-hop MACs from `bpf_fib_lookup`, which only
//! reads the neighbour table: nothing in the XDP path makes the kernel
//! resolve a missing entry (the packet is dropped as `fib_failed`). So for
//! every backend `lbd` finds the next hop on the attached interface (the
//! backend itself, or its gateway) and marks that neighbour *managed*
//! (what `ip neigh replace ADDR dev IF managed` does, Linux 5.16+): the
//! kernel then resolves it and keeps it reachable on its own. Entries an
//! operator made permanent (or `noarp`) are left alone. Entries are not
//! removed when a backend goes.
//!
//! This talks netlink (`rtnetlink`) on a thread of its own: the controller
//! hands it the backends a change added ([`Neighbours::manage`] returns at
//! once) and goes on, so a change that adds thousands of backends does not
//! hold up the API, `/metrics` or the health checks while the kernel is
//! asked about each of them. Batches that queue up while one is worked on
//! are merged.

use std::{collections::BTreeSet, net::IpAddr};

use futures_util::TryStreamExt;
use rtnetlink::{
    Handle, RouteMessageBuilder,
    packet_route::{
        AddressFamily,
        neighbour::{
            NeighbourAddress, NeighbourAttribute, NeighbourExtFlags, NeighbourMessage,
            NeighbourState,
        },
        route::{RouteAddress, RouteAttribute},
    },
};
use tokio::sync::mpsc;

/// Why a neighbour could not be managed.
#[derive(Debug, thiserror::Error)]
pub enum NeighbourError {
    #[error("opening a netlink socket")]
    Socket(#[source] std::io::Error),
    #[error("starting the neighbour thread")]
    Thread(#[source] std::io::Error),
    #[error("looking up the route to {addr} via interface {ifindex}: {message}")]
    Route {
        addr: IpAddr,
        ifindex: u32,
        message: String,
    },
    #[error("listing the neighbours of interface {ifindex}: {message}")]
    List { ifindex: u32, message: String },
    #[error("marking neighbour {addr} managed: {message}")]
    Replace { addr: IpAddr, message: String },
}

/// The thread that manages the neighbours of one interface.
pub struct Neighbours {
    tx: mpsc::UnboundedSender<Vec<IpAddr>>,
}

impl Neighbours {
    /// Starts the thread for interface `ifindex` (named `iface` in logs).
    pub fn start(iface: &str, ifindex: u32) -> Result<Neighbours, NeighbourError> {
        let (tx, mut rx) = mpsc::unbounded_channel::<Vec<IpAddr>>();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .map_err(NeighbourError::Socket)?;
        let (connection, handle, _) = {
            let _enter = runtime.enter();
            rtnetlink::new_connection().map_err(NeighbourError::Socket)?
        };
        let iface = iface.to_string();
        std::thread::Builder::new()
            .name("lb-neighbours".into())
            .spawn(move || {
                runtime.block_on(async move {
                    tokio::spawn(connection);
                    while let Some(mut batch) = rx.recv().await {
                        while let Ok(more) = rx.try_recv() {
                            batch.extend(more);
                        }
                        for (addr, e) in manage(&handle, ifindex, &batch).await {
                            tracing::warn!(
                                iface, %addr, error = %format!("{e:#}"),
                                "cannot mark the neighbour towards a backend managed"
                            );
                        }
                    }
                })
            })
            .map_err(NeighbourError::Thread)?;
        Ok(Neighbours { tx })
    }

    /// Has the next hops towards `backends` marked managed (soon; failures
    /// are logged).
    pub fn manage(&self, backends: &[IpAddr]) {
        if !backends.is_empty() {
            // Fails only once the thread is gone, i.e. never while lbd runs.
            let _ = self.tx.send(backends.to_vec());
        }
    }
}

/// Marks the next hops of `backends` on interface `ifindex` managed (see
/// the module docs). Every backend is tried; the failures are returned.
pub async fn manage(
    handle: &Handle,
    ifindex: u32,
    backends: &[IpAddr],
) -> Vec<(IpAddr, NeighbourError)> {
    let mut failures = Vec::new();
    let mut hops = BTreeSet::new();
    for b in backends.iter().collect::<BTreeSet<_>>() {
        match next_hop(handle, ifindex, *b).await {
            Ok(hop) => {
                hops.insert(hop);
            }
            Err(e) => failures.push((*b, e)),
        }
    }
    if hops.is_empty() {
        return failures;
    }
    let fixed = match fixed_neighbours(handle, ifindex).await {
        Ok(f) => f,
        Err(e) => {
            failures.push((*hops.first().expect("not empty"), e));
            return failures;
        }
    };
    for hop in hops.into_iter().filter(|h| !fixed.contains(h)) {
        if let Err(e) = replace_managed(handle, ifindex, hop).await {
            failures.push((hop, e));
        }
    }
    failures
}

/// The neighbour through which `addr` is reached on interface `ifindex`:
/// its gateway, or `addr` itself when it is on the link.
pub async fn next_hop(
    handle: &Handle,
    ifindex: u32,
    addr: IpAddr,
) -> Result<IpAddr, NeighbourError> {
    let route_err = |message: String| NeighbourError::Route {
        addr,
        ifindex,
        message,
    };
    let len = if addr.is_ipv4() { 32 } else { 128 };
    let query = RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(addr, len)
        .map_err(|e| route_err(e.to_string()))?
        .output_interface(ifindex)
        .build();
    let mut routes = handle.route().get(query).execute();
    let route = routes
        .try_next()
        .await
        .map_err(|e| route_err(e.to_string()))?
        .ok_or_else(|| route_err("no route".into()))?;
    let gateway = route.attributes.iter().find_map(|a| match a {
        RouteAttribute::Gateway(RouteAddress::Inet(g)) => Some(IpAddr::from(*g)),
        RouteAttribute::Gateway(RouteAddress::Inet6(g)) => Some(IpAddr::from(*g)),
        _ => None,
    });
    Ok(gateway.unwrap_or(addr))
}

/// Addresses of the neighbours on `ifindex` that an operator fixed
/// (`permanent` or `noarp`): those lbd leaves alone.
async fn fixed_neighbours(
    handle: &Handle,
    ifindex: u32,
) -> Result<BTreeSet<IpAddr>, NeighbourError> {
    let list_err = |e: rtnetlink::Error| NeighbourError::List {
        ifindex,
        message: e.to_string(),
    };
    let mut dump = handle.neighbours().get().execute();
    let mut fixed = BTreeSet::new();
    while let Some(n) = dump.try_next().await.map_err(list_err)? {
        if n.header.ifindex != ifindex
            || !matches!(
                n.header.state,
                NeighbourState::Permanent | NeighbourState::Noarp
            )
        {
            continue;
        }
        fixed.extend(destination(&n));
    }
    Ok(fixed)
}

fn destination(n: &NeighbourMessage) -> Option<IpAddr> {
    n.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::Destination(NeighbourAddress::Inet(a)) => Some(IpAddr::from(*a)),
        NeighbourAttribute::Destination(NeighbourAddress::Inet6(a)) => Some(IpAddr::from(*a)),
        _ => None,
    })
}

/// `ip neigh replace HOP dev IF managed`: state none, the extended flag
/// `managed`, created or replaced.
async fn replace_managed(handle: &Handle, ifindex: u32, hop: IpAddr) -> Result<(), NeighbourError> {
    let mut request = handle
        .neighbours()
        .add(ifindex, hop)
        .state(NeighbourState::None)
        .replace();
    let message = request.message_mut();
    message.header.family = if hop.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    message
        .attributes
        .push(NeighbourAttribute::ExtFlags(NeighbourExtFlags::Managed));
    request
        .execute()
        .await
        .map_err(|e| NeighbourError::Replace {
            addr: hop,
            message: e.to_string(),
        })
}
