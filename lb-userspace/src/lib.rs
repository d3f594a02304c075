//! `lb`: the controller side of the XDP Maglev load balancer. The `lbd`
//! binary is a thin shell around this library.
//!
//! - [`config`]: the TOML config file and its validation.
//! - [`vip`]: the domain (VIPs, backends, protocols).
//! - [`maglev`]: the weighted Maglev table builder (pure).
//! - [`dataplane`]: the only module that talks to the kernel's BPF objects.
//! - [`host`]: facts about the host (its addresses).
//! - [`controller`]: the single owner of the data plane; other tasks send it requests.
//! - [`metrics`]: `/metrics` in the Prometheus text format.
//! - [`neighbours`]: keeps the kernel's neighbour entries towards backends resolved.

pub mod config;
pub mod controller;
pub mod dataplane;
pub mod host;
pub mod maglev;
pub mod metrics;
pub mod neighbours;
pub mod vip;
