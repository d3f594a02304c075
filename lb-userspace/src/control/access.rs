//! Who may do what on the control API.
//!
//! Every caller has a role: `read` (GET: status, stats, VIPs, backends) or
//! `admin` (everything, changes included). Callers on the Unix socket are
//! admins (the socket's mode and group decide who may connect). On TCP a
//! caller is a bearer token, whose role is the token file's third column,
//! or a client certificate, whose role is its subject's organization (`O`,
//! as Kubernetes reads groups): `O=admin` or `O=read`; its name is its
//! common name (`CN`). A request with a token is the token's, whatever
//! certificate the connection has.

use std::{collections::BTreeMap, fmt, path::Path, str::FromStr, sync::Arc};

use serde::Serialize;

/// What a caller may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Reads only: GET and HEAD.
    Read,
    /// Reads and changes.
    Admin,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Read => "read",
            Role::Admin => "admin",
        }
    }

    /// Whether the role may send a request with `method`.
    pub fn allows(self, method: &axum::http::Method) -> bool {
        self == Role::Admin
            || method == axum::http::Method::GET
            || method == axum::http::Method::HEAD
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Role, String> {
        match s {
            "read" => Ok(Role::Read),
            "admin" => Ok(Role::Admin),
            _ => Err(format!("{s:?} is not a role (\"read\" or \"admin\")")),
        }
    }
}

/// Bearer tokens of the TCP API: token → (name, role).
#[derive(Clone, Default)]
pub struct Tokens(Arc<BTreeMap<String, (String, Role)>>);

impl Tokens {
    /// Reads a token file: one `NAME TOKEN [ROLE]` per line (tokens of at
    /// least 16 characters; ROLE `read` or `admin`, and `admin` when left
    /// out, as in files written before roles existed); blank lines and
    /// lines starting with `#` are skipped.
    pub fn load(path: &Path) -> Result<Tokens, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("reading {}: {e}", path.display()))?;
        let mut map = BTreeMap::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = |why: String| format!("{} line {}: {why}", path.display(), n + 1);
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (name, token, role) = match fields[..] {
                [name, token] => (name, token, Role::Admin),
                [name, token, role] => (name, token, role.parse().map_err(bad)?),
                _ => return Err(bad("expected NAME TOKEN [ROLE]".into())),
            };
            if token.len() < 16 {
                return Err(bad(format!(
                    "the token of {name} has {} characters; at least 16",
                    token.len()
                )));
            }
            map.insert(token.to_string(), (name.to_string(), role));
        }
        if map.is_empty() {
            return Err(format!("{} holds no token", path.display()));
        }
        Ok(Tokens(Arc::new(map)))
    }

    /// The name and role of the token `given`, compared against every
    /// token in time independent of where they differ.
    pub fn find(&self, given: &str) -> Option<(&str, Role)> {
        self.0.iter().fold(None, |found, (token, (name, role))| {
            if constant_eq(token.as_bytes(), given.as_bytes()) {
                Some((name.as_str(), *role))
            } else {
                found
            }
        })
    }
}

fn constant_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A verified client certificate: its subject's common name and the role
/// its organization names (`None`: no `O=admin` or `O=read`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertificateCaller {
    pub name: String,
    pub role: Option<Role>,
}

impl CertificateCaller {
    /// Reads name and role from a certificate (DER). With several `O`s the
    /// highest role wins.
    pub fn from_der(der: &[u8]) -> Result<CertificateCaller, String> {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| format!("unreadable client certificate: {e}"))?;
        let subject = cert.subject();
        let name = subject
            .iter_common_name()
            .find_map(|cn| cn.as_str().ok())
            .map_or_else(|| subject.to_string(), str::to_string);
        let role = subject
            .iter_organization()
            .filter_map(|o| o.as_str().ok()?.parse::<Role>().ok())
            .max();
        Ok(CertificateCaller { name, role })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_files_have_an_optional_role_column() {
        let dir = std::env::temp_dir().join(format!("lb-tokens-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tokens");
        std::fs::write(
            &path,
            "# old style: admin\nops 0123456789abcdef\nviewer fedcba9876543210 read\nroot aaaaaaaaaaaaaaaa admin\n",
        )
        .unwrap();
        let t = Tokens::load(&path).unwrap();
        assert_eq!(t.find("0123456789abcdef"), Some(("ops", Role::Admin)));
        assert_eq!(t.find("fedcba9876543210"), Some(("viewer", Role::Read)));
        assert_eq!(t.find("aaaaaaaaaaaaaaaa"), Some(("root", Role::Admin)));
        assert_eq!(t.find("0123456789abcdeX"), None);
        for (text, says) in [
            (
                "a 0123456789abcdef writer\n",
                "line 1: \"writer\" is not a role",
            ),
            ("a short\n", "line 1: the token of a has 5 characters"),
            ("a b c d\n", "line 1: expected NAME TOKEN [ROLE]"),
            ("# nothing\n", "holds no token"),
        ] {
            std::fs::write(&path, text).unwrap();
            let e = Tokens::load(&path).err().unwrap();
            assert!(e.contains(says), "{text:?}: {e}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn read_may_only_get() {
        use axum::http::Method;
        assert!(Role::Read.allows(&Method::GET));
        assert!(Role::Read.allows(&Method::HEAD));
        for m in [Method::POST, Method::PATCH, Method::PUT, Method::DELETE] {
            assert!(!Role::Read.allows(&m), "{m}");
            assert!(Role::Admin.allows(&m), "{m}");
        }
    }
}
