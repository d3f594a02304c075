//! The desired state of the VIPs in a file of its own (`[api] state_file`).
//!
//! Two ways to keep what the API changes:
//!
//! - Without `state_file` (the default), lbd writes API changes into the
//!   config file's `[[vip]]` tables (see [`ConfigFile`](super::config::ConfigFile)).
//!   A restart reads the config file. The revision (the API's `ETag`) is
//!   not stored: it starts at lbd's start time in microseconds since the
//!   epoch, so it only grows across restarts and an `If-Match` from before
//!   a restart never matches after it.
//! - With `state_file`, lbd never writes the config file: configuration
//!   management owns it. API changes, and the revision, go to the state
//!   file (a [`VipsDocument`] as TOML: `revision = N` and `[[vip]]` tables),
//!   written atomically (temp file, fsync, rename, fsync of the directory).
//!   At start lbd reads the state file when it exists; the config file's
//!   `[[vip]]` tables only seed it the first time (when it does not exist
//!   yet). A reload (SIGHUP) takes every other setting from the config
//!   file and keeps the VIPs of the state file.

use std::path::{Path, PathBuf};

use crate::desired::{
    config::{BalancerSettings, Problem, VipsDocument, write_atomically},
    vip::Vip,
};

/// The state file.
#[derive(Clone, Debug)]
pub struct StateFile {
    path: PathBuf,
}

/// Why the state file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum StateFileError {
    #[error("reading the state file {file}: {source}")]
    Read {
        file: String,
        source: std::io::Error,
    },
    #[error("the state file {file} has {} problem(s):{}", problems.len(), problems.iter().map(|p| format!("\n  {}: {}", p.field, p.message)).collect::<String>())]
    Invalid {
        file: String,
        problems: Vec<Problem>,
    },
}

impl StateFile {
    pub fn new(path: &Path) -> StateFile {
        StateFile {
            path: path.to_path_buf(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The revision and VIPs the file holds; `None` if it does not exist.
    pub fn load(
        &self,
        balancer: &BalancerSettings,
    ) -> Result<Option<(u64, Vec<Vip>)>, StateFileError> {
        let file = self.path.display().to_string();
        let text = match std::fs::read(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(StateFileError::Read { file, source }),
        };
        let doc = VipsDocument::from_toml(&text, balancer).map_err(|problems| {
            StateFileError::Invalid {
                file: file.clone(),
                problems,
            }
        })?;
        Ok(Some((doc.revision.unwrap_or(0), doc.vips)))
    }

    /// Writes `vips` at `revision`, atomically.
    pub fn save(&self, revision: u64, vips: &[Vip]) -> std::io::Result<()> {
        let doc = VipsDocument {
            revision: Some(revision),
            vips: vips.to_vec(),
        };
        let text = format!(
            "# The desired state of lbd's VIPs, written by lbd (api.state_file).\n\
             # Change it through the API or `lbctl apply -f`, not by hand.\n{}",
            doc.to_toml()
        );
        write_atomically(&self.path, &text)
    }
}
