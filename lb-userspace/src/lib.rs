//! `lb`: the controller side of the XDP Maglev load balancer. The `lbd`
//! binary is a thin shell around this library.
//!
//! - [`api`]: the control API (HTTP/JSON under /v1) that `lbctl` talks to.
//! - [`config`]: the TOML config file and its validation.
//! - [`change`]: run-time changes to the desired state (the API's verbs).
//! - [`diff`]: what changed between two desired states, for the log.
//! - [`audit`]: the audit log of change requests.
//! - [`bgp`]: announcing the VIPs over BGP through BIRD 2.
//! - [`client`]: a client of the API (for `lbctl` and tests).
//! - [`vip`]: the domain (VIPs, backends, protocols).
//! - [`maglev`]: the weighted Maglev table builder (pure).
//! - [`dataplane`]: the only module that talks to the kernel's BPF objects.
//! - [`host`]: facts about the host (its addresses).
//! - [`controller`]: the single owner of the data plane; other tasks send it requests.
//! - [`metrics`]: `/metrics` in the Prometheus text format.
//! - [`neighbours`]: keeps the kernel's neighbour entries towards backends resolved.
//! - [`policy`]: per-VIP health-check, load, slow-start and all-down policies.
//! - [`promtext`]: a parser of the Prometheus text exposition format.
//! - [`probe`]: health checks and load scrapes of backends (async I/O).
//! - [`steering`]: health-check results and load reports to table weights (pure).
//! - [`engines`]: an inference server's load (queue, running, KV cache) from its scrape.

pub mod api;
pub mod audit;
pub mod bgp;
pub mod change;
pub mod client;
pub mod config;
pub mod controller;
pub mod dataplane;
pub mod diff;
pub mod engines;
pub mod host;
pub mod maglev;
pub mod metrics;
pub mod neighbours;
pub mod policy;
pub mod probe;
pub mod promtext;
pub mod steering;
pub mod vip;
