//! `lb`: the controller side of the XDP Maglev load balancer. The `lbd` and
//! `lbctl` binaries are thin shells around this library.
//!
//! - [`desired`]: the desired state: the config file, the domain (VIPs,
//!   backends, their policies), run-time changes to it and diffs between
//!   two states.
//! - [`control`]: how the desired state is changed and watched: the single
//!   owner (the controller), the control API and its client, the audit log,
//!   `/metrics`.
//! - [`steering`]: health checks and load reports of the backends turned
//!   into table weights: the probes, the inference engines' metric pages.
//! - [`host`]: the host around the balancer: its addresses, the neighbour
//!   entries towards backends, BGP announcements through BIRD.
//! - [`dataplane`]: the only module that talks to the kernel's BPF objects.
//! - [`fleet`]: balancers sharing one desired state through etcd (`[fleet]`).
//! - [`maglev`]: the weighted Maglev table builder (pure).
//! - [`man_pages`]: the binaries' man pages, from their clap definitions.

pub mod control;
pub mod dataplane;
pub mod desired;
pub mod fleet;
pub mod host;
pub mod maglev;
pub mod man_pages;
pub mod steering;
