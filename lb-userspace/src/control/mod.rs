//! Changing and watching the running balancer.
//!
//! - [`controller`]: the single owner of the desired state and the data
//!   plane; every other task sends it requests.
//! - [`api`]: the control API (HTTP/JSON under `/v1`) that `lbctl` talks to.
//! - [`access`]: roles, tokens and client certificates: who may do what.
//! - [`tls`]: TLS (rustls) for the TCP API, `/metrics` and `lbctl`.
//! - [`client`]: a client of the API (for `lbctl` and tests).
//! - [`audit`]: the audit log of change requests.
//! - [`metrics`]: `/metrics` in the Prometheus text format.
//! - [`reloads`]: config reloads and their outcomes, for `/metrics`.

pub mod access;
pub mod api;
pub mod audit;
pub mod client;
pub mod controller;
pub mod metrics;
pub mod reloads;
pub mod tls;
