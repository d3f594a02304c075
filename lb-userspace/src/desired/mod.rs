//! The desired state: what the operator asked for.
//!
//! - [`config`]: the TOML config file and its validation.
//! - [`vip`]: the domain (VIPs, backends, protocols, schedulers).
//! - [`policy`]: per-VIP health-check, load, slow-start and all-down policies.
//! - [`change`]: run-time changes to the desired state (the API's verbs).
//! - [`diff`]: what changed between two desired states, for the log and
//!   the API's diffs.
//! - [`state_file`]: the VIPs and their revision in a file of their own.

pub mod change;
pub mod config;
pub mod diff;
pub mod policy;
pub mod state_file;
pub mod vip;
