//! A fleet of balancers sharing one desired state in etcd (`[fleet]`).
//!
//! Without `[fleet]`, lbd is standalone: the config file (or the state
//! file) holds the desired state. With it, the desired state of the VIPs
//! lives in etcd under the fleet's prefix, and every member applies each
//! revision of it as one step:
//!
//! - `PREFIX/desired`: the document (JSON: `format`, `maglev_table_size`
//!   and the `vip` list of the declarative API, see [`encode`]). Its etcd
//!   `mod_revision` is the fleet's revision, and so the API's `ETag` at
//!   every member: a change through any member is one etcd transaction
//!   that writes the document only if its `mod_revision` is still the one
//!   the change was based on (compare-and-swap). A change without
//!   `If-Match` that loses such a race is worked out again on the newer
//!   revision (a few times); one with `If-Match` gets 412.
//! - `PREFIX/members/NAME`: each member's status (see [`MemberStatus`]),
//!   attached to the member's lease: it disappears `lease_ttl` after the
//!   member stops renewing it (stopped, dead, cut off from etcd).
//! - `PREFIX/leader`: the steering leader's name, under its lease (a
//!   create-only write: one leader at a time).
//! - `PREFIX/steering`: the leader's steering view ([`SteeringDoc`]),
//!   written only while its leader key is still its own; every member
//!   builds its tables from it.
//! - `PREFIX/health/NAME`: each member's health verdicts ([`HealthDoc`]),
//!   under its lease; the leader combines them ([`fleet_down`]).
//! - `PREFIX/load/NODE`: a load report pushed to a member that does not
//!   lead, for the leader to take.
//!
//! The config file's `[[vip]]` tables only seed an empty fleet (the first
//! member to start with no document writes its own; a create-only
//! transaction, so two first members cannot both seed). After that they
//! are ignored, with a warning on reload when they differ.
//!
//! A member refuses a revision that its own settings cannot take (another
//! `maglev_table_size`, more VIPs or backends than its maps hold, an
//! address its host cannot use, a document that does not parse): it logs
//! it, counts it (`lb_fleet_revisions_total{outcome="refused"}`), reports
//! it in its status and keeps the last revision it applied. Every applied
//! revision is written to the member's cache file, so a member that starts
//! while etcd is unreachable comes up with what it last had and catches up
//! once etcd answers.
//!
//! A member cut off from etcd keeps forwarding with the last revision it
//! applied and keeps its own health checks and load scrapes, reconnects
//! in the background and applies whatever it missed when etcd answers
//! again (the watch resumes from the next revision, or the member reads
//! the document anew when that revision was compacted away).

pub mod agent;

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use crate::desired::{
    config::{BalancerSettings, Problem, VipsDocument},
    vip::Vip,
};

/// Default `fleet.lease_ttl`: a dead member's status (and, as steering
/// leader, its leadership) is gone this long after its last renewal.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(5);

/// The version of the document format in `PREFIX/desired`.
pub const DOCUMENT_FORMAT: u64 = 1;

/// `[fleet]`: where the fleet's state is and who this member is.
#[derive(Clone, Debug, PartialEq)]
pub struct FleetSettings {
    /// etcd's client URLs (`http://` or `https://`, host and port).
    pub endpoints: Vec<String>,
    /// The fleet's key prefix (its name in etcd), e.g. `/lb/edge-1`.
    pub prefix: String,
    /// This balancer's name in the fleet (default: the host name).
    pub name: String,
    /// The member's lease (see [`DEFAULT_LEASE_TTL`]).
    pub lease_ttl: Duration,
    /// Where the last applied revision is kept (default
    /// `/var/lib/lb/INSTANCE-fleet.toml`).
    pub cache_file: Option<PathBuf>,
    /// The CA that signs etcd's server certificates (TLS).
    pub ca_file: Option<PathBuf>,
    /// A client certificate and its key for etcd (TLS client auth).
    pub client_cert: Option<(PathBuf, PathBuf)>,
    /// An etcd user and the file with its password.
    pub user: Option<(String, PathBuf)>,
    /// A backend is down for the fleet when more than this share of the
    /// members that check it see it down (`fleet.down_quorum`, default a
    /// half: a majority).
    pub down_quorum: f64,
}

/// Default `fleet.down_quorum`.
pub const DEFAULT_DOWN_QUORUM: f64 = 0.5;

impl FleetSettings {
    /// The cache file of instance `instance`.
    pub fn cache_path(&self, instance: &str) -> PathBuf {
        self.cache_file
            .clone()
            .unwrap_or_else(|| PathBuf::from(format!("/var/lib/lb/{instance}-fleet.toml")))
    }

    /// The key of the desired state.
    pub fn desired_key(&self) -> String {
        format!("{}/desired", self.prefix)
    }

    /// The prefix of the members' status keys.
    pub fn members_prefix(&self) -> String {
        format!("{}/members/", self.prefix)
    }

    /// This member's status key.
    pub fn member_key(&self) -> String {
        format!("{}{}", self.members_prefix(), self.name)
    }

    /// The steering leader's key (its name, under its lease).
    pub fn leader_key(&self) -> String {
        format!("{}/leader", self.prefix)
    }

    /// The steering view the leader publishes ([`SteeringDoc`]).
    pub fn steering_key(&self) -> String {
        format!("{}/steering", self.prefix)
    }

    /// The prefix of load reports pushed to followers, forwarded to the
    /// leader (`PREFIX/load/NODE`).
    pub fn load_prefix(&self) -> String {
        format!("{}/load/", self.prefix)
    }

    /// The prefix of the members' health verdicts ([`HealthDoc`]).
    pub fn health_prefix(&self) -> String {
        format!("{}/health/", self.prefix)
    }
}

/// The fleet's steering view, as the steering leader publishes it
/// (`PREFIX/steering`): every VIP's table targets (the quantised weight of
/// each backend, whether it is down for the fleet) and shed share, and the
/// clock every member builds its tables with, so that the churn hold
/// decides alike everywhere.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SteeringDoc {
    /// The leader that wrote it.
    pub leader: String,
    /// The desired-state revision it was worked out for.
    pub desired_revision: u64,
    /// The table clock (Unix seconds at the leader) to build with.
    pub at: u32,
    /// Per VIP (`ADDRESS:PORT/PROTOCOL`).
    pub vips: BTreeMap<String, VipSteering>,
}

/// One VIP's part of a [`SteeringDoc`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VipSteering {
    /// Per backend address.
    pub targets: BTreeMap<IpAddr, crate::steering::Target>,
    /// The share of new connections shed (`on_saturated = "shed"`).
    #[serde(default)]
    pub shed: f64,
}

/// A member's health verdicts (`PREFIX/health/NAME`, under its lease): per
/// VIP, each checked backend and whether this member sees it up.
pub type HealthDoc = BTreeMap<String, BTreeMap<IpAddr, bool>>;

/// Whether `backend` of `vip` is down for the fleet, by the verdicts of
/// the members that check it (`docs`), or `None` if none does.
pub fn fleet_down(
    docs: &BTreeMap<String, HealthDoc>,
    vip: &str,
    backend: IpAddr,
    quorum: f64,
) -> Option<bool> {
    let verdicts: Vec<bool> = docs
        .values()
        .filter_map(|d| d.get(vip)?.get(&backend).copied())
        .collect();
    if verdicts.is_empty() {
        return None;
    }
    let down = verdicts.iter().filter(|up| !**up).count();
    Some(down as f64 > quorum * verdicts.len() as f64)
}

/// An endpoint as a URL: `host:port` gets `http://` (`https://` with TLS);
/// a URL must be `http://` or `https://` with a host and a port.
pub fn endpoint_url(e: &str, tls: bool) -> Result<String, String> {
    let (scheme, rest) = match e.split_once("://") {
        Some((s, r)) => (s, r),
        None => (if tls { "https" } else { "http" }, e),
    };
    if scheme != "http" && scheme != "https" {
        return Err(format!(
            "{e:?}: the scheme must be http or https (e.g. \"https://10.0.0.21:2379\")"
        ));
    }
    let port_ok = rest
        .rsplit_once(':')
        .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0));
    if !port_ok || rest.contains(['/', ' ', '@']) {
        return Err(format!(
            "{e:?} is not HOST:PORT of an etcd member (e.g. \"10.0.0.21:2379\")"
        ));
    }
    if tls && scheme == "http" {
        return Err(format!(
            "{e:?} is plain http but fleet.ca_file or cert_file asks for TLS: use https://"
        ));
    }
    Ok(format!("{scheme}://{rest}"))
}

/// A key prefix: `/` and then letters, digits, `-`, `_`, `.` and `/`,
/// no empty path element, no trailing `/`, at most 128 bytes.
pub fn check_prefix(p: &str) -> Result<(), String> {
    let ok = p.len() >= 2
        && p.len() <= 128
        && p.starts_with('/')
        && !p.ends_with('/')
        && !p.contains("//")
        && p.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{p:?} is not a key prefix: '/' then letters, digits, '-', '_', '.' and '/', no trailing '/' (e.g. \"/lb/edge-1\")"
        ))
    }
}

/// A member name: 1-64 letters, digits, `-`, `_` or `.`.
pub fn check_name(n: &str) -> Result<(), String> {
    let ok = !n.is_empty()
        && n.len() <= 64
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{n:?} is not a member name: 1-64 letters, digits, '-', '_' or '.'"
        ))
    }
}

/// The host's name, the default member name.
pub fn host_name() -> Option<String> {
    let n = std::fs::read_to_string("/proc/sys/kernel/hostname").ok()?;
    let n = n.trim();
    (!n.is_empty()).then(|| n.to_string())
}

/// The desired state as the fleet stores it: the declarative document
/// (without a revision: the revision is etcd's) with the format and the
/// table size, which every member must share for tables to agree.
pub fn encode(table_size: u32, vips: &[Vip]) -> String {
    let mut doc = VipsDocument {
        revision: None,
        vips: vips.to_vec(),
    }
    .to_json();
    let obj = doc.as_object_mut().expect("a document is an object");
    obj.insert("format".into(), DOCUMENT_FORMAT.into());
    obj.insert("maglev_table_size".into(), table_size.into());
    serde_json::to_string(&doc).expect("plain data")
}

/// The VIPs of a stored document, checked against this member's
/// settings; every problem with its field path.
pub fn decode(bytes: &[u8], balancer: &BalancerSettings) -> Result<Vec<Vip>, Vec<Problem>> {
    let problem = |field: &str, message: String| {
        vec![Problem {
            field: field.to_string(),
            message,
        }]
    };
    let mut value: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| problem("", format!("not JSON: {e}")))?;
    let Some(obj) = value.as_object_mut() else {
        return Err(problem("", "not a JSON object".into()));
    };
    match obj.remove("format").and_then(|f| f.as_u64()) {
        Some(DOCUMENT_FORMAT) => {}
        Some(f) => {
            return Err(problem(
                "format",
                format!(
                    "format {f} is unknown to this lbd (it reads format {DOCUMENT_FORMAT}): upgrade it"
                ),
            ));
        }
        None => return Err(problem("format", "missing or not a number".into())),
    }
    match obj.remove("maglev_table_size").and_then(|t| t.as_u64()) {
        Some(t) if t == u64::from(balancer.table_size) => {}
        Some(t) => {
            return Err(problem(
                "maglev_table_size",
                format!(
                    "the fleet's tables have {t} entries, this member's balancer.maglev_table_size is {}: every member must have the same",
                    balancer.table_size
                ),
            ));
        }
        None => {
            return Err(problem(
                "maglev_table_size",
                "missing or not a number".into(),
            ));
        }
    }
    if obj.contains_key("revision") {
        return Err(problem(
            "revision",
            "a stored document has no revision (etcd's revision is the fleet's)".into(),
        ));
    }
    let body = serde_json::to_vec(&value).expect("plain data");
    VipsDocument::from_json(&body, balancer).map(|d| d.vips)
}

/// Problems as one line each, for logs and status.
pub fn problem_text(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|p| {
            if p.field.is_empty() {
                p.message.clone()
            } else {
                format!("{}: {}", p.field, p.message)
            }
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// A table's fingerprint: FNV-1a (64 bits) over each entry's backend
/// address (16 bytes, IPv4 mapped), in hex. Backend ids are each balancer's own; addresses are what members
/// with the same inputs must agree on.
pub fn fingerprint(entries: &[IpAddr]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for e in entries {
        let bytes = match e {
            IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
            IpAddr::V6(a) => a.octets(),
        };
        for b in bytes {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    format!("{h:016x}")
}

/// A revision a member would not take, and why.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Refusal {
    pub revision: u64,
    pub error: String,
}

/// What a member publishes about itself (`PREFIX/members/NAME`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct MemberStatus {
    pub name: String,
    /// lbd's version.
    pub version: String,
    /// The fleet revision whose VIPs its tables hold.
    pub applied_revision: u64,
    /// The newest revision it refused, if it refused one after the one it
    /// applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<Refusal>,
    /// Per VIP, its table's [`fingerprint`].
    pub tables: BTreeMap<String, String>,
    /// When it wrote this (Unix milliseconds).
    pub updated_unix_ms: u64,
}

/// The link between the controller and the agent: what the agent knows
/// of etcd, for views and metrics.
#[derive(Clone, Debug, Default)]
pub struct LinkState {
    /// Whether the last request to etcd worked.
    pub connected: bool,
    /// When a request to etcd last worked.
    pub last_contact: Option<Instant>,
    /// The last error talking to etcd, while not connected.
    pub error: Option<String>,
    /// The newest revision refused (cleared by the next one applied).
    pub refused: Option<Refusal>,
    /// Revisions applied and refused since lbd started.
    pub applied_total: u64,
    pub refused_total: u64,
    /// Writes to etcd by kind (`desired`, `status`).
    pub writes: BTreeMap<&'static str, u64>,
    /// Changes that lost a compare-and-swap race (worked out again, or
    /// refused with `If-Match`).
    pub conflicts: u64,
    /// The steering leader, as this member last heard.
    pub leader: Option<String>,
    /// Whether this member is the steering leader.
    pub is_leader: bool,
    /// Times this member became the steering leader.
    pub elected: u64,
}

/// Shared between the agent (writer) and the controller and the API
/// (readers).
pub type SharedLink = Arc<Mutex<LinkState>>;

/// The fleet as views show it.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct FleetView {
    pub prefix: String,
    pub name: String,
    pub endpoints: Vec<String>,
    /// Whether the last request to etcd worked.
    pub connected: bool,
    /// Seconds since a request to etcd last worked (`null`: never).
    pub last_contact_seconds: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The revision this member applied.
    pub applied_revision: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refused: Option<Refusal>,
    /// The steering leader (the member that scrapes the backends' load
    /// and publishes the fleet's weights), if there is one.
    pub leader: Option<String>,
    /// Every live member (this one included), read from etcd now.
    pub members: Vec<MemberView>,
    /// Whether every live member holds the same revision and the same
    /// table for every VIP.
    pub agree: bool,
}

/// A member as `lbctl fleet status` shows it.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct MemberView {
    #[serde(flatten)]
    pub status: MemberStatus,
    /// Seconds since it last wrote its status.
    pub age_seconds: f64,
    /// Whether its tables equal this member's (same revision and the same
    /// fingerprint for every VIP).
    pub agrees: bool,
}

/// The fleet as this member sees it: its link, and `members` (read from
/// etcd) compared with its own revision and tables.
pub fn view(
    settings: &FleetSettings,
    link: &LinkState,
    revision: u64,
    tables: &BTreeMap<String, String>,
    members: Vec<MemberStatus>,
) -> FleetView {
    let now = unix_ms();
    let members: Vec<MemberView> = members
        .into_iter()
        .map(|status| MemberView {
            age_seconds: now.saturating_sub(status.updated_unix_ms) as f64 / 1000.0,
            agrees: status.applied_revision == revision && &status.tables == tables,
            status,
        })
        .collect();
    FleetView {
        prefix: settings.prefix.clone(),
        name: settings.name.clone(),
        endpoints: settings.endpoints.clone(),
        connected: link.connected,
        last_contact_seconds: link.last_contact.map(|t| t.elapsed().as_secs_f64()),
        error: link.error.clone(),
        applied_revision: revision,
        refused: link.refused.clone(),
        leader: link.leader.clone(),
        agree: !members.is_empty() && members.iter().all(|m| m.agrees),
        members,
    }
}

/// Milliseconds since the epoch, now.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_get_a_scheme_and_need_a_port() {
        assert_eq!(
            endpoint_url("10.0.0.1:2379", false).unwrap(),
            "http://10.0.0.1:2379"
        );
        assert_eq!(
            endpoint_url("10.0.0.1:2379", true).unwrap(),
            "https://10.0.0.1:2379"
        );
        assert_eq!(
            endpoint_url("https://[fd00::1]:2379", true).unwrap(),
            "https://[fd00::1]:2379"
        );
        assert!(
            endpoint_url("10.0.0.1", false)
                .unwrap_err()
                .contains("HOST:PORT")
        );
        assert!(
            endpoint_url("ftp://x:1", false)
                .unwrap_err()
                .contains("scheme")
        );
        assert!(
            endpoint_url("http://x:1", true)
                .unwrap_err()
                .contains("TLS")
        );
        assert!(endpoint_url("http://x:1/v3", false).is_err());
    }

    #[test]
    fn prefixes_and_names_are_checked() {
        assert!(check_prefix("/lb/edge-1").is_ok());
        for bad in ["", "/", "lb", "/lb/", "/a//b", "/a b"] {
            assert!(check_prefix(bad).is_err(), "{bad:?}");
        }
        assert!(check_name("lb-1.dc2").is_ok());
        assert!(check_name("").is_err());
        assert!(check_name("a/b").is_err());
    }

    #[test]
    fn a_document_round_trips_and_a_foreign_table_size_is_refused() {
        let balancer = BalancerSettings::default();
        let config = crate::desired::config::parse(
            "[balancer]\nsource_v4 = \"10.0.0.1\"\n[[vip]]\naddress = \"10.1.0.1\"\nport = 80\nprotocol = \"tcp\"\nbackends = [{ address = \"10.2.0.1\" }]\n",
            "test.toml",
        )
        .unwrap();
        let text = encode(balancer.table_size, &config.vips);
        assert_eq!(decode(text.as_bytes(), &balancer).unwrap(), config.vips);
        let other = encode(7, &config.vips);
        let p = decode(other.as_bytes(), &balancer).unwrap_err();
        assert_eq!(p[0].field, "maglev_table_size");
        let p = decode(b"{\"format\": 2}", &balancer).unwrap_err();
        assert!(p[0].message.contains("format 2"), "{p:?}");
        let p = decode(b"not json", &balancer).unwrap_err();
        assert!(p[0].message.contains("not JSON"), "{p:?}");
        let bad = text.replace("10.2.0.1", "10.2.0.300");
        let p = decode(bad.as_bytes(), &balancer).unwrap_err();
        assert!(p[0].field.starts_with("vip[0]"), "{p:?}");
    }

    #[test]
    fn a_backend_is_down_for_the_fleet_by_quorum() {
        let b: IpAddr = "10.0.0.1".parse().unwrap();
        let doc = |up: bool| HealthDoc::from([("v".to_string(), BTreeMap::from([(b, up)]))]);
        let docs = |ups: &[bool]| -> BTreeMap<String, HealthDoc> {
            ups.iter()
                .enumerate()
                .map(|(i, u)| (format!("m{i}"), doc(*u)))
                .collect()
        };
        assert_eq!(fleet_down(&docs(&[]), "v", b, 0.5), None);
        assert_eq!(
            fleet_down(&docs(&[false, true, true]), "v", b, 0.5),
            Some(false)
        );
        assert_eq!(
            fleet_down(&docs(&[false, false, true]), "v", b, 0.5),
            Some(true)
        );
        // A half is no majority.
        assert_eq!(fleet_down(&docs(&[false, true]), "v", b, 0.5), Some(false));
        // 0: any member that sees it down takes it out.
        assert_eq!(
            fleet_down(&docs(&[false, true, true]), "v", b, 0.0),
            Some(true)
        );
        assert_eq!(fleet_down(&docs(&[true]), "w", b, 0.5), None);
    }

    #[test]
    fn fingerprints_hash_addresses_in_order() {
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        assert_eq!(fingerprint(&[a, b]), fingerprint(&[a, b]));
        assert_ne!(fingerprint(&[a, b]), fingerprint(&[b, a]));
        assert_ne!(fingerprint(&[a, a]), fingerprint(&[a, b]));
        // Pinned: a change is a change of the fleet's compatibility.
        assert_eq!(fingerprint(&[]), "cbf29ce484222325");
    }
}
