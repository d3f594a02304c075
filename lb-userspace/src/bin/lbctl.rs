//! `lbctl`: the command line for a running `lbd`, over its control API.
//!
//! Tables for people by default (`-o wide` for more columns,
//! `--no-headers` without the header line), `-o json` (or `--json`) and
//! `-o yaml` for scripts. Exit codes: 0 done, 2 usage error, 3 request
//! refused by lbd (bad input, unknown VIP or backend, a stale revision,
//! ...), 4 lbd not reachable, 5 lbd failed to apply the change, 6 `lbctl
//! diff` found changes to make, 7 a drain timed out, 8 `lbctl fleet
//! status` found members that disagree or no etcd, 1 anything else. Failures print one line
//! on stderr.

use std::{
    io::IsTerminal,
    net::IpAddr,
    path::PathBuf,
    process::ExitCode,
    time::{Duration, Instant},
};

use clap::{Args, CommandFactory, Parser, Subcommand};
use lb::{
    control::client::{ClientError, Endpoint, Response},
    desired::vip::{DownPolicy, Scheduler, VipAddr},
};
use serde_json::{Value, json};

#[derive(Parser)]
#[command(
    name = "lbctl",
    version,
    about = "Control a running lbd: VIPs, backends, status, counters",
    after_long_help = "\
Exit status: 0 done, 2 usage error, 3 refused by lbd (bad input, unknown \
or duplicate VIP or backend, a change the config cannot take, no valid \
token or certificate, not allowed \
for the caller's role), 4 lbd not reachable (no socket, permission \
denied, a refused TLS handshake), 5 lbd failed to apply it, 6 `lbctl diff` \
found changes, 7 `lbctl backend drain --wait` timed out with flows left, 8 \
`lbctl fleet status` found members that disagree or etcd out of reach, 1 \
anything else.

Members of the group of lbd's api.socket_group (the package's `lb`) may \
use the Unix socket without root."
)]
struct Cli {
    #[command(flatten)]
    target: Target,
    /// Print JSON (the API's answer) instead of tables: `-o json`.
    #[arg(long, global = true)]
    json: bool,
    /// Output: `table` (default), `wide` (more columns), `json` or `yaml`
    /// (the API's answer).
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
    /// Tables without their header line.
    #[arg(long, global = true)]
    no_headers: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Output {
    Table,
    Wide,
    Json,
    Yaml,
}

#[derive(Args)]
struct Target {
    /// lbd instance whose Unix socket (/run/lb/NAME.sock) to use.
    #[arg(long, global = true, default_value = "lb")]
    instance: String,
    /// The API's Unix socket (overrides --instance).
    #[arg(long, global = true, env = "LBCTL_SOCKET")]
    socket: Option<PathBuf>,
    /// Use the TCP API instead: https://HOST:PORT (TLS; HOST:PORT alone
    /// means the same) or http://HOST:PORT (plain TCP, for an lbd whose
    /// config says plaintext = true). Needs --token-file or --cert.
    #[arg(long, global = true, env = "LBCTL_URL")]
    url: Option<String>,
    /// File holding the bearer token for --url.
    #[arg(long, global = true, env = "LBCTL_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// CA certificates (PEM) that sign lbd's TLS certificate (default: the
    /// system's trust store).
    #[arg(long, global = true, env = "LBCTL_CA")]
    ca: Option<PathBuf>,
    /// Client certificate (PEM) to present to lbd's TLS API (with --key).
    #[arg(long, global = true, env = "LBCTL_CERT", requires = "key")]
    cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, global = true, env = "LBCTL_KEY", requires = "cert")]
    key: Option<PathBuf>,
}

impl Target {
    /// The API to talk to: the Unix socket, or the TCP API at `--url`.
    fn endpoint(&self) -> Result<Endpoint, Failure> {
        let Some(url) = &self.url else {
            return Ok(Endpoint::Unix(self.socket.clone().unwrap_or_else(|| {
                PathBuf::from(format!("/run/lb/{}.sock", self.instance))
            })));
        };
        let token = match &self.token_file {
            Some(file) => Some(
                std::fs::read_to_string(file)
                    .map_err(|e| Failure::Other(format!("reading {}: {e}", file.display())))?
                    .trim()
                    .to_string(),
            ),
            None if self.cert.is_none() => {
                return Err(Failure::Usage(
                    "--url needs --token-file or --cert/--key (or LBCTL_TOKEN_FILE, LBCTL_CERT)"
                        .into(),
                ));
            }
            None => None,
        };
        let (plain, addr) = match url.split_once("://") {
            Some(("http", rest)) => (true, rest),
            Some(("https", rest)) => (false, rest),
            Some((scheme, _)) => {
                return Err(Failure::Usage(format!(
                    "--url {url}: {scheme}:// is not https:// or http://"
                )));
            }
            None => (false, url.as_str()),
        };
        let addr = addr.trim_end_matches('/').to_string();
        if plain {
            let token = token.ok_or_else(|| {
                Failure::Usage(
                    "plain TCP (http://) needs --token-file: no client certificates without TLS"
                        .into(),
                )
            })?;
            return Ok(Endpoint::Tcp { addr, token });
        }
        let cert_and_key = self.cert.as_deref().zip(self.key.as_deref());
        let config = lb::control::tls::client_config(self.ca.as_deref(), cert_and_key)
            .map_err(|e| Failure::Usage(e.to_string()))?;
        Ok(Endpoint::Tls {
            addr,
            token,
            config,
        })
    }
}

#[derive(Subcommand)]
enum Command {
    /// Summary: VIPs, backends, packets.
    Status,
    /// Counters: packets by reason, connection table, per VIP and backend.
    Stats {
        /// Refresh until interrupted, showing rates.
        #[arg(long)]
        watch: bool,
        /// Seconds between refreshes with --watch.
        #[arg(long, default_value_t = 1.0, value_parser = parse_interval)]
        interval: f64,
    },
    /// VIPs: list, show, add, remove.
    #[command(subcommand)]
    Vip(VipCommand),
    /// Backends of a VIP: list, add, remove, weight, drain, undrain.
    #[command(subcommand)]
    Backend(BackendCommand),
    /// Make the VIPs what a file says (a document: `[[vip]]` tables as in
    /// the config file, TOML, or JSON `{"vip": [...]}`): shows the changes,
    /// then applies them in one step. VIPs not in the file are removed.
    Apply {
        /// The document (`.json`: JSON; anything else: TOML).
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        /// Only show what would change.
        #[arg(long)]
        dry_run: bool,
    },
    /// Show what `apply -f FILE` would change (exit 6 when there is
    /// something to change, 0 when not).
    Diff {
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
    },
    /// Print the VIPs as a document (what `apply -f` takes), with the
    /// revision it was read at.
    Export {
        /// `toml` (default) or `json`.
        #[arg(long, default_value = "toml")]
        format: String,
    },
    /// The fleet (`[fleet]`): its members, the steering leader, each
    /// member's revision and whether their tables agree.
    #[command(subcommand)]
    Fleet(FleetCommand),
    /// A VIP's entries in the connection table, per backend; with
    /// `--client`, that client's flow's entry and backend.
    Flows {
        vip: VipAddr,
        /// ADDRESS:PORT of a client ([ADDRESS]:PORT for IPv6).
        #[arg(long)]
        client: Option<std::net::SocketAddr>,
    },
    /// Print shell completions (bash, zsh, fish, elvish, powershell).
    Completions { shell: clap_complete::Shell },
    /// Print the man page (roff), or write it and every subcommand's page
    /// (lbctl-vip-add.1, ...) to a directory.
    Man {
        /// Write the pages here instead.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum FleetCommand {
    /// Members, each one's applied revision and whether its tables agree
    /// with this member's, and this member's link to etcd (exit 8 when
    /// the members disagree or etcd is out of reach).
    Status,
    /// Make the fleet's desired state what a file says (`apply -f` through
    /// this member: one etcd transaction that every member applies).
    Import {
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        /// Only show what would change.
        #[arg(long)]
        dry_run: bool,
    },
    /// Print the fleet's desired state as a document (`export`).
    Export {
        /// `toml` (default) or `json`.
        #[arg(long, default_value = "toml")]
        format: String,
    },
}

#[derive(Subcommand)]
enum VipCommand {
    /// List the VIPs.
    List,
    /// Show a VIP and its backends.
    Show { vip: VipAddr },
    /// Add a VIP, e.g. `lbctl vip add 203.0.113.10:443/tcp --backend 10.0.0.11=100`.
    Add {
        /// ADDRESS:PORT/PROTOCOL (IPv6 as [ADDRESS]:PORT/PROTOCOL; port 0 = any).
        vip: VipAddr,
        /// maglev, maglev-src, wrr or least-load.
        #[arg(long, default_value = "maglev")]
        scheduler: Scheduler,
        /// maglev-src: hash `address` (default) or `address-port`.
        #[arg(long)]
        hash_fields: Option<String>,
        /// Established flows of a backend marked down: reschedule or stick.
        #[arg(long, default_value = "reschedule")]
        on_backend_down: DownPolicy,
        /// A backend, ADDRESS or ADDRESS=WEIGHT (repeat for several).
        #[arg(long = "backend", value_parser = parse_backend)]
        backends: Vec<(IpAddr, u32)>,
    },
    /// Change a VIP's settings; established flows keep their backends,
    /// e.g. `lbctl vip set 203.0.113.10:443/tcp --scheduler wrr`.
    Set {
        vip: VipAddr,
        /// maglev, maglev-src, wrr or least-load.
        #[arg(long)]
        scheduler: Option<Scheduler>,
        /// maglev-src: hash `address` or `address-port`.
        #[arg(long)]
        hash_fields: Option<String>,
        /// Established flows of a backend marked down: reschedule or stick.
        #[arg(long)]
        on_backend_down: Option<DownPolicy>,
        /// Every backend down: keep_last or drop.
        #[arg(long)]
        on_all_down: Option<String>,
        /// Seconds a new or recovered backend ramps up over (0: off).
        #[arg(long)]
        slow_start: Option<f64>,
    },
    /// Remove a VIP (its traffic then passes to the host).
    Remove { vip: VipAddr },
}

#[derive(Subcommand)]
enum BackendCommand {
    /// List a VIP's backends: health, weight in effect, table share.
    List { vip: VipAddr },
    /// Add a backend to a VIP.
    Add {
        vip: VipAddr,
        address: IpAddr,
        #[arg(long, default_value_t = 100)]
        weight: u32,
        /// Add it drained (no new flows until undrained).
        #[arg(long)]
        drained: bool,
    },
    /// Remove a backend: no new flows; its established flows go on until
    /// they end (then its id is freed).
    Remove { vip: VipAddr, address: IpAddr },
    /// Set a backend's weight (0..=65535).
    Weight {
        vip: VipAddr,
        address: IpAddr,
        weight: u32,
    },
    /// Drain: no new flows; established flows continue. With `--wait`,
    /// returns once the backend has no active flow left for the VIP (and,
    /// if it reports its load, no request waiting or running): exit 0, or
    /// 7 when `--timeout` passes first.
    Drain {
        vip: VipAddr,
        address: IpAddr,
        /// Wait for the drain to finish.
        #[arg(long)]
        wait: bool,
        /// With --wait: give up after this many seconds (default 3600).
        #[arg(long, value_parser = parse_timeout, requires = "wait")]
        timeout: Option<f64>,
    },
    /// Undrain: back to its weight.
    Undrain { vip: VipAddr, address: IpAddr },
}

fn parse_timeout(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.0..=7.0 * 86400.0).contains(&v) => Ok(v),
        _ => Err(format!("{s:?}: seconds between 0 and 604800 (a week)")),
    }
}

fn parse_interval(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.1..=3600.0).contains(&v) => Ok(v),
        _ => Err(format!("{s:?}: seconds between 0.1 and 3600")),
    }
}

fn parse_backend(s: &str) -> Result<(IpAddr, u32), String> {
    let (addr, weight) = match s.split_once('=') {
        Some((a, w)) => (
            a,
            w.parse()
                .map_err(|_| format!("{w:?} is not a weight (0..=65535)"))?,
        ),
        None => (s, 100),
    };
    Ok((
        addr.parse()
            .map_err(|_| format!("{addr:?} is not an IP address"))?,
        weight,
    ))
}

/// How a command ended.
enum Failure {
    Refused(String),
    Unreachable(String),
    DaemonFailed(String),
    Usage(String),
    /// `lbctl diff` found changes (printed already).
    Changes,
    /// `lbctl backend drain --wait` timed out (printed already).
    DrainTimedOut,
    /// `lbctl fleet status`: the members disagree, or etcd is out of
    /// reach (printed already).
    Disagree,
    Other(String),
}

impl Failure {
    fn code(&self) -> u8 {
        match self {
            Failure::Refused(_) => 3,
            Failure::Unreachable(_) => 4,
            Failure::DaemonFailed(_) => 5,
            Failure::Usage(_) => 2,
            Failure::Changes => 6,
            Failure::DrainTimedOut => 7,
            Failure::Disagree => 8,
            Failure::Other(_) => 1,
        }
    }
}

struct Ctl {
    endpoint: Endpoint,
    output: Output,
}

/// `--no-headers` (read by [`table`]).
static NO_HEADERS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

impl Ctl {
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, Failure> {
        let body = body.map(|b| serde_json::to_vec(&b).expect("JSON"));
        self.call_raw(method, path, body.as_deref(), &[])
            .map(|(v, _)| v)
    }

    /// A request with a raw body and extra headers; the answer's JSON and
    /// its revision (`ETag`).
    fn call_raw(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
        headers: &[(&str, &str)],
    ) -> Result<(Value, Option<u64>), Failure> {
        let r: Response = self
            .endpoint
            .request_with(method, path, body, headers)
            .map_err(|e| match e {
                ClientError::Unreachable { .. } | ClientError::Tls { .. } => {
                    Failure::Unreachable(e.to_string())
                }
                ClientError::Protocol(_) => Failure::Other(e.to_string()),
            })?;
        match r.status {
            200..=299 => Ok((
                if r.body.is_empty() {
                    Value::Null
                } else if r.header("content-type") == Some("application/toml") {
                    Value::String(String::from_utf8_lossy(&r.body).into_owned())
                } else {
                    serde_json::from_slice(&r.body)
                        .map_err(|e| Failure::Other(format!("lbd answered with bad JSON: {e}")))?
                },
                r.revision(),
            )),
            400..=499 => Err(Failure::Refused(r.error_message())),
            _ => Err(Failure::DaemonFailed(r.error_message())),
        }
    }

    fn wide(&self) -> bool {
        self.output == Output::Wide
    }

    fn print(&self, v: &Value, human: impl FnOnce(&Value) -> String) {
        match self.output {
            Output::Json => println!("{}", serde_json::to_string_pretty(v).expect("JSON")),
            Output::Yaml => print!("{}", serde_yaml::to_string(v).expect("YAML")),
            Output::Table | Output::Wide => print!("{}", human(v)),
        }
    }
}

/// A document file for `apply` / `diff`: its bytes and content type.
fn document_file(path: &std::path::Path) -> Result<(Vec<u8>, &'static str), Failure> {
    let body = std::fs::read(path)
        .map_err(|e| Failure::Other(format!("reading {}: {e}", path.display())))?;
    let json = path.extension().is_some_and(|e| e == "json");
    Ok((
        body,
        if json {
            "application/json"
        } else {
            "application/toml"
        },
    ))
}

/// A PUT's answer (the changes) for people.
fn changes_text(v: &Value) -> String {
    let mut out = String::new();
    for c in v["changes"].as_array().into_iter().flatten() {
        let kind = c["change"].as_str().unwrap_or("");
        let mark = if kind.ends_with("_added") {
            "+"
        } else if kind.ends_with("_removed") {
            "-"
        } else {
            "~"
        };
        out += &format!("{mark} {}\n", s(c, "text"));
    }
    let shares: Vec<Vec<String>> = v["table_shares"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| {
            let pct = |k: &str| format!("{:.1}%", m[k].as_f64().unwrap_or(0.0) * 100.0);
            vec![s(m, "vip"), s(m, "backend"), pct("from"), pct("to")]
        })
        .collect();
    if !shares.is_empty() {
        out += "\n";
        out += &table(&["VIP", "BACKEND", "TABLE SHARE", "AFTER"], shares);
    }
    let n = v["changes"].as_array().map_or(0, Vec::len);
    out += &if n == 0 {
        format!("nothing to change (revision {})\n", s(v, "revision"))
    } else if v["dry_run"] == Value::Bool(true) {
        format!(
            "dry run: {n} changes, nothing applied (revision {})\n",
            s(v, "revision")
        )
    } else {
        format!(
            "applied {n} changes: revision {}, {} tables switched\n",
            s(v, "revision"),
            s(v, "tables_switched")
        )
    };
    out
}

fn vip_path(v: &VipAddr) -> String {
    format!("/v1/vips/{}", v.path_segment())
}

fn backend_path(v: &VipAddr, a: &IpAddr) -> String {
    format!("{}/backends/{a}", vip_path(v))
}

/// Left-aligned columns.
fn table(header: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let line = |cells: Vec<String>| {
        let mut l = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ");
        l.truncate(l.trim_end().len());
        l + "\n"
    };
    let mut out = if NO_HEADERS.load(std::sync::atomic::Ordering::Relaxed) {
        String::new()
    } else {
        line(header.iter().map(|h| h.to_string()).collect())
    };
    for r in rows {
        out += &line(r);
    }
    out
}

fn s(v: &Value, k: &str) -> String {
    match &v[k] {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

fn backend_rows(backends: &Value) -> Vec<Vec<String>> {
    backends
        .as_array()
        .into_iter()
        .flatten()
        .map(|b| {
            vec![
                s(b, "address"),
                s(b, "weight"),
                if b["drained"] == Value::Bool(true) {
                    "yes".into()
                } else {
                    "no".into()
                },
                health_text(b),
                format!("{:.2}", b["weight_in_effect"].as_f64().unwrap_or(0.0)),
                load_text(b),
                format!("{:.1}%", b["table_share"].as_f64().unwrap_or(0.0) * 100.0),
                active_text(b),
            ]
        })
        .collect()
}

/// Why each backend that health checks hold down failed its last check,
/// one line each (none when every backend is up).
fn down_reasons(backends: &Value) -> String {
    backends
        .as_array()
        .into_iter()
        .flatten()
        .filter(|b| b["health"] == "down")
        .filter_map(|b| {
            Some(format!(
                "{} down: {}\n",
                s(b, "address"),
                b["last_error"].as_str()?
            ))
        })
        .collect()
}

/// `up`, `down`, or `-` when not checked; with the transition count.
/// `stalled` (work and no progress: out of the table) comes first.
fn health_text(b: &Value) -> String {
    if b["stalled"] == Value::Bool(true) {
        return format!(
            "stalled ({:.0}s no progress)",
            b["still_seconds"].as_f64().unwrap_or(0.0)
        );
    }
    if b["checked"] != Value::Bool(true) {
        return format!("{} (unchecked)", s(b, "health"));
    }
    match b["health_transitions"].as_u64().unwrap_or(0) {
        0 => s(b, "health"),
        n => format!("{} ({n} changes)", s(b, "health")),
    }
}

/// Queue, KV-cache use and the share of its weight load leaves it.
fn load_text(b: &Value) -> String {
    let mut parts = Vec::new();
    if let Some(l) = b.get("load").filter(|l| l.is_object()) {
        parts.push(format!("queue {}", l["queue"].as_f64().unwrap_or(0.0)));
        if let Some(kv) = l["kv_cache"].as_f64() {
            parts.push(format!("kv {:.0}%", kv * 100.0));
        }
        parts.push(format!(
            "{:.0}s old",
            l["age_seconds"].as_f64().unwrap_or(0.0)
        ));
    }
    if b["ramping"] == Value::Bool(true) {
        parts.push("ramping up".into());
    }
    let factor = b["load_factor"].as_f64().unwrap_or(1.0);
    if factor < 1.0 {
        parts.push(format!("x{factor:.2}"));
    }
    if parts.is_empty() {
        "-".into()
    } else {
        parts.join(", ")
    }
}

const BACKEND_HEADER: [&str; 8] = [
    "BACKEND",
    "WEIGHT",
    "DRAINED",
    "HEALTH",
    "IN EFFECT",
    "LOAD",
    "TABLE SHARE",
    "ACTIVE FLOWS",
];

/// Active flows (with the closing ones, and a drain's state).
fn active_text(b: &Value) -> String {
    let mut t = b["active_flows"].as_u64().unwrap_or(0).to_string();
    let closing = b["closing_flows"].as_u64().unwrap_or(0);
    if closing > 0 {
        t += &format!(" ({closing} closing)");
    }
    if let Some(state) = b["drain"]["state"].as_str() {
        t += &format!(", {state}");
    }
    t
}

fn yes_no(v: &Value) -> String {
    if *v == Value::Bool(true) { "yes" } else { "no" }.to_string()
}

/// The backends as a table; `wide` adds table entries, score and the last
/// health-check error.
fn backends_table(backends: &Value, wide: bool) -> String {
    let mut rows = backend_rows(backends);
    let mut header = BACKEND_HEADER.to_vec();
    if wide {
        header.extend(["TABLE ENTRIES", "SCORE", "HEALTH SINCE", "LAST ERROR"]);
        for (row, b) in rows
            .iter_mut()
            .zip(backends.as_array().into_iter().flatten())
        {
            row.extend([
                s(b, "table_entries"),
                s(b, "score"),
                b["health_since_seconds"]
                    .as_u64()
                    .map_or("-".into(), |x| format!("{x}s")),
                s(b, "last_error"),
            ]);
        }
    }
    table(&header, rows)
}

fn stats_text(v: &Value, previous: Option<(&Value, f64)>) -> String {
    let rate = |path: &dyn Fn(&Value) -> u64| match previous {
        Some((p, secs)) => format!("{:.0}/s", path(v).saturating_sub(path(p)) as f64 / secs),
        None => String::new(),
    };
    let mut out = String::new();
    let reasons: Vec<Vec<String>> = v["reasons"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, n)| {
            let key = k.clone();
            vec![
                k.clone(),
                n.to_string(),
                rate(&|x: &Value| x["reasons"][&key].as_u64().unwrap_or(0)),
            ]
        })
        .collect();
    out += &table(&["REASON", "PACKETS", "RATE"], reasons);
    out += "\n";
    let ct: Vec<Vec<String>> = v["conntrack"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, n)| vec![k.clone(), n.to_string()])
        .collect();
    out += &table(&["CONNTRACK", "EVENTS"], ct);
    out += "\n";
    let rows: Vec<Vec<String>> = v["backends"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
        .map(|(i, b)| {
            vec![
                s(b, "vip"),
                s(b, "backend"),
                s(b, "packets"),
                s(b, "bytes"),
                rate(&|x: &Value| x["backends"][i]["packets"].as_u64().unwrap_or(0)),
            ]
        })
        .collect();
    out += &table(&["VIP", "BACKEND", "PACKETS", "BYTES", "RATE"], rows);
    out
}

/// `lbctl apply -f FILE`: shows what would change at the revision read
/// now, then applies exactly that (`If-Match`), or nothing if the state
/// moved meanwhile. `always` (`lbctl fleet import`) writes even when the
/// member has nothing to change: the fleet's newest document may be one
/// the members refused, which the write replaces.
fn apply(ctl: &Ctl, file: &std::path::Path, dry_run: bool, always: bool) -> Result<(), Failure> {
    let (body, content_type) = document_file(file)?;
    let ct = [("Content-Type", content_type)];
    let (plan, revision) = ctl.call_raw("PUT", "/v1/vips?dry_run=true", Some(&body), &ct)?;
    let nothing = plan["changed"] != Value::Bool(true);
    if dry_run || (nothing && !always) {
        ctl.print(&plan, changes_text);
        return Ok(());
    }
    let tag = revision.map(|r| format!("\"{r}\""));
    let mut headers = ct.to_vec();
    if let Some(t) = &tag {
        headers.push(("If-Match", t.as_str()));
    }
    let (v, _) = ctl.call_raw("PUT", "/v1/vips", Some(&body), &headers)?;
    ctl.print(&v, changes_text);
    Ok(())
}

/// `lbctl fleet status` for people.
fn fleet_text(v: &Value) -> String {
    let s = |x: &Value| match x {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        x => x.to_string(),
    };
    let mut out = format!(
        "fleet {} (etcd {}): member {}, steering leader {}, revision {}, etcd {}{}\n",
        s(&v["prefix"]),
        v["endpoints"]
            .as_array()
            .map(|a| a.iter().map(s).collect::<Vec<_>>().join(","))
            .unwrap_or_default(),
        s(&v["name"]),
        s(&v["leader"]),
        s(&v["applied_revision"]),
        if v["connected"] == Value::Bool(true) {
            "connected".to_string()
        } else {
            format!("UNREACHABLE: {}", s(&v["error"]))
        },
        v["last_contact_seconds"]
            .as_f64()
            .map(|t| format!(" (last answer {t:.1} s ago)"))
            .unwrap_or_default(),
    );
    if let Some(r) = v["refused"].as_object() {
        out += &format!(
            "REFUSED revision {}: {}\n",
            s(&r["revision"]),
            s(&r["error"])
        );
    }
    let rows = v["members"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|m| {
                    let lead = m["name"] == v["leader"];
                    vec![
                        if lead {
                            format!("{} (leader)", s(&m["name"]))
                        } else {
                            s(&m["name"])
                        },
                        s(&m["applied_revision"]),
                        if m["agrees"] == Value::Bool(true) {
                            "yes".into()
                        } else {
                            "NO".into()
                        },
                        m["tables"].as_object().map_or(0, |t| t.len()).to_string(),
                        m["refused"]["revision"]
                            .as_u64()
                            .map_or("-".into(), |r| r.to_string()),
                        format!("{:.1}s", m["age_seconds"].as_f64().unwrap_or(0.0)),
                        s(&m["version"]),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    out += &table(
        &[
            "MEMBER", "REVISION", "AGREES", "TABLES", "REFUSED", "AGE", "VERSION",
        ],
        rows,
    );
    out
}

fn run(cli: Cli) -> Result<(), Failure> {
    let endpoint = cli.target.endpoint()?;
    let ctl = Ctl {
        endpoint,
        output: if cli.json { Output::Json } else { cli.output },
    };
    NO_HEADERS.store(cli.no_headers, std::sync::atomic::Ordering::Relaxed);
    // A fleet member's API writes to the fleet: export is export.
    let command = match cli.command {
        Command::Fleet(FleetCommand::Export { format }) => Command::Export { format },
        c => c,
    };
    match command {
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "lbctl", &mut std::io::stdout());
        }
        Command::Man { dir } => match dir {
            Some(dir) => {
                let files = lb::man_pages::write_all(Cli::command(), "1", &dir).map_err(|e| {
                    Failure::Other(format!("writing the man pages to {}: {e}", dir.display()))
                })?;
                for f in files {
                    println!("{}", f.display());
                }
            }
            None => clap_mangen::Man::new(Cli::command())
                .render(&mut std::io::stdout())
                .map_err(|e| Failure::Other(e.to_string()))?,
        },
        Command::Status => {
            let v = ctl.call("GET", "/v1/status", None)?;
            ctl.print(&v, |v| {
                table(
                    &[
                        "VIPS",
                        "BACKENDS",
                        "DOWN",
                        "SATURATED",
                        "FORWARDED",
                        "PASSED",
                        "DROPPED",
                        "UPTIME",
                    ],
                    vec![vec![
                        s(v, "vips"),
                        s(v, "backends"),
                        s(v, "backends_down"),
                        s(v, "vips_saturated"),
                        s(v, "packets_forwarded"),
                        s(v, "packets_passed"),
                        s(v, "packets_dropped"),
                        format!("{}s", s(v, "uptime_seconds")),
                    ]],
                )
            });
        }
        Command::Stats { watch: false, .. } => {
            let v = ctl.call("GET", "/v1/stats", None)?;
            ctl.print(&v, |v| stats_text(v, None));
        }
        Command::Stats {
            watch: true,
            interval,
        } => {
            let mut previous: Option<(Value, Instant)> = None;
            loop {
                let v = ctl.call("GET", "/v1/stats", None)?;
                if ctl.output == Output::Json {
                    println!("{}", serde_json::to_string(&v).expect("JSON"));
                } else if ctl.output == Output::Yaml {
                    print!("---\n{}", serde_yaml::to_string(&v).expect("YAML"));
                } else {
                    let prev = previous
                        .as_ref()
                        .map(|(p, t)| (p, t.elapsed().as_secs_f64()));
                    let clear = if std::io::stdout().is_terminal() {
                        "\x1b[2J\x1b[H"
                    } else {
                        ""
                    };
                    print!("{clear}{}", stats_text(&v, prev));
                    println!();
                }
                previous = Some((v, Instant::now()));
                std::thread::sleep(Duration::from_secs_f64(interval));
            }
        }
        Command::Vip(VipCommand::List) => {
            let v = ctl.call("GET", "/v1/vips", None)?;
            let wide = ctl.wide();
            ctl.print(&v, |v| {
                let rows = v
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|x| {
                        let mut row = vec![
                            s(x, "vip"),
                            s(x, "scheduler"),
                            x["backends"].as_array().map_or(0, Vec::len).to_string(),
                            s(x, "on_backend_down"),
                        ];
                        if wide {
                            row.extend([
                                s(x, "hash_fields"),
                                s(x, "on_all_down"),
                                format!("{}s", s(x, "slow_start_seconds")),
                                yes_no(&x["health_checks"]),
                                yes_no(&x["load_aware"]),
                                yes_no(&x["saturated"]),
                            ]);
                        }
                        row
                    })
                    .collect();
                let mut header = vec!["VIP", "SCHEDULER", "BACKENDS", "ON BACKEND DOWN"];
                if wide {
                    header.extend([
                        "HASH FIELDS",
                        "ON ALL DOWN",
                        "SLOW START",
                        "HEALTH CHECKS",
                        "LOAD-AWARE",
                        "SATURATED",
                    ]);
                }
                table(&header, rows)
            });
        }
        Command::Vip(VipCommand::Show { vip }) => {
            let (mut v, revision) = ctl.call_raw("GET", &vip_path(&vip), None, &[])?;
            if let Some(r) = revision {
                v["revision"] = json!(r);
            }
            let wide = ctl.wide();
            ctl.print(&v, |v| {
                let mut flags = Vec::new();
                if v["saturated"] == Value::Bool(true) {
                    flags.push("SATURATED: every healthy backend is at its load limit, base weights in use".to_string());
                }
                if v["all_down"] == Value::Bool(true) {
                    flags.push("ALL BACKENDS DOWN".into());
                }
                let shed = v["shed"].as_f64().unwrap_or(0.0);
                if shed > 0.0 {
                    flags.push(format!(
                        "SHEDDING: {:.0}% of new connections dropped at their SYN (on_saturated = shed)",
                        shed * 100.0
                    ));
                }
                format!(
                    "VIP {}  revision {}  scheduler {}  on backend down: {}  on all down: {}  slow start: {}s  health checks: {}  load-aware: {}  on saturated: {}
{}{}",
                    s(v, "vip"),
                    s(v, "revision"),
                    s(v, "scheduler"),
                    s(v, "on_backend_down"),
                    s(v, "on_all_down"),
                    s(v, "slow_start_seconds"),
                    if v["health_checks"] == Value::Bool(true) { "yes" } else { "no" },
                    if v["load_aware"] == Value::Bool(true) { "yes" } else { "no" },
                    s(v, "on_saturated"),
                    flags.iter().map(|f| format!("{f}\n")).collect::<String>(),
                    backends_table(&v["backends"], wide)
                ) + &down_reasons(&v["backends"])
            });
        }
        Command::Vip(VipCommand::Add {
            vip,
            scheduler,
            hash_fields,
            on_backend_down,
            backends,
        }) => {
            let mut body = json!({
                "address": vip.addr.to_string(),
                "port": vip.port,
                "protocol": vip.protocol.to_string(),
                "scheduler": scheduler.to_string(),
                "on_backend_down": on_backend_down.to_string(),
                "backends": backends.iter().map(|(a, w)| json!({"address": a.to_string(), "weight": w})).collect::<Vec<_>>(),
            });
            if let Some(f) = hash_fields {
                body["hash_fields"] = json!(f);
            }
            let v = ctl.call("POST", "/v1/vips", Some(body))?;
            ctl.print(&v, |v| format!("added VIP {}\n", s(v, "vip")));
        }
        Command::Vip(VipCommand::Set {
            vip,
            scheduler,
            hash_fields,
            on_backend_down,
            on_all_down,
            slow_start,
        }) => {
            let mut body = serde_json::Map::new();
            if let Some(x) = scheduler {
                body.insert("scheduler".into(), json!(x.to_string()));
            }
            if let Some(x) = hash_fields {
                body.insert("hash_fields".into(), json!(x));
            }
            if let Some(x) = on_backend_down {
                body.insert("on_backend_down".into(), json!(x.to_string()));
            }
            if let Some(x) = on_all_down {
                body.insert("on_all_down".into(), json!(x));
            }
            if let Some(x) = slow_start {
                body.insert("slow_start".into(), json!(x));
            }
            let v = ctl.call("PATCH", &vip_path(&vip), Some(Value::Object(body)))?;
            ctl.print(&v, |v| {
                format!("VIP {}: scheduler {}\n", s(v, "vip"), s(v, "scheduler"))
            });
        }
        Command::Vip(VipCommand::Remove { vip }) => {
            ctl.call("DELETE", &vip_path(&vip), None)?;
            ctl.print(&json!({"removed": vip.to_string()}), |_| {
                format!("removed VIP {vip}\n")
            });
        }
        Command::Apply { file, dry_run } => apply(&ctl, &file, dry_run, false)?,
        Command::Fleet(FleetCommand::Import { file, dry_run }) => {
            apply(&ctl, &file, dry_run, true)?
        }
        Command::Diff { file } => {
            let (body, content_type) = document_file(&file)?;
            let (plan, _) = ctl.call_raw(
                "PUT",
                "/v1/vips?dry_run=true",
                Some(&body),
                &[("Content-Type", content_type)],
            )?;
            ctl.print(&plan, changes_text);
            if plan["changed"] == Value::Bool(true) {
                return Err(Failure::Changes);
            }
        }
        Command::Fleet(FleetCommand::Export { .. }) => {
            unreachable!("rewritten above")
        }
        Command::Fleet(FleetCommand::Status) => {
            let v = ctl.call("GET", "/v1/fleet", None)?;
            ctl.print(&v, fleet_text);
            let ok = v["connected"] == Value::Bool(true) && v["agree"] == Value::Bool(true);
            if !ok {
                return Err(Failure::Disagree);
            }
        }
        Command::Export { format } => {
            let path = match format.as_str() {
                "toml" => "/v1/vips?spec=true&format=toml",
                "json" => "/v1/vips?spec=true",
                other => {
                    return Err(Failure::Usage(format!("--format {other:?}: toml or json")));
                }
            };
            let (v, _) = ctl.call_raw("GET", path, None, &[])?;
            match v {
                Value::String(text) => print!("{text}"),
                v => println!("{}", serde_json::to_string_pretty(&v).expect("JSON")),
            }
        }
        Command::Flows { vip, client } => {
            let mut path = format!("{}/flows", vip_path(&vip));
            if let Some(c) = client {
                let c = c.to_string().replace('[', "%5B").replace(']', "%5D");
                path += &format!("?client={c}");
            }
            let v = ctl.call("GET", &path, None)?;
            ctl.print(&v, |v| {
                let rows = v["backends"]
                    .as_object()
                    .into_iter()
                    .flatten()
                    .map(|(b, c)| {
                        vec![
                            b.clone(),
                            s(c, "established"),
                            s(c, "closing"),
                            s(c, "handshakes"),
                        ]
                    })
                    .collect();
                let mut out = table(&["BACKEND", "ESTABLISHED", "CLOSING", "HANDSHAKES"], rows);
                if let Some(c) = client {
                    out += &match &v["client"] {
                        Value::Null => format!(
                            "client {c}: no entry (a new flow from it would be scheduled anew)\n"
                        ),
                        e => format!(
                            "client {c}: {} table, backend {}{}, expires in {}s\n",
                            s(e, "table"),
                            s(e, "backend"),
                            if e["closing"] == Value::Bool(true) {
                                " (closing)"
                            } else {
                                ""
                            },
                            e["expires_in_seconds"]
                                .as_f64()
                                .map_or("-".into(), |x| format!("{x:.0}"))
                        ),
                    };
                }
                out
            });
        }
        Command::Backend(BackendCommand::List { vip }) => {
            let v = ctl.call("GET", &format!("{}/backends", vip_path(&vip)), None)?;
            let wide = ctl.wide();
            ctl.print(&v, |v| backends_table(v, wide));
        }
        Command::Backend(BackendCommand::Add {
            vip,
            address,
            weight,
            drained,
        }) => {
            let body =
                json!({"address": address.to_string(), "weight": weight, "drained": drained});
            let v = ctl.call("POST", &format!("{}/backends", vip_path(&vip)), Some(body))?;
            ctl.print(&v, |_| format!("added backend {address} to {vip}\n"));
        }
        Command::Backend(BackendCommand::Remove { vip, address }) => {
            ctl.call("DELETE", &backend_path(&vip, &address), None)?;
            ctl.print(&json!({"removed": address.to_string()}), |_| {
                format!("removed backend {address} from {vip}\n")
            });
        }
        Command::Backend(BackendCommand::Weight {
            vip,
            address,
            weight,
        }) => {
            let v = ctl.call(
                "PATCH",
                &backend_path(&vip, &address),
                Some(json!({"weight": weight})),
            )?;
            ctl.print(&v, |_| {
                format!("backend {address} of {vip}: weight {weight}\n")
            });
        }
        Command::Backend(BackendCommand::Drain {
            vip,
            address,
            wait,
            timeout,
        }) => {
            let path = backend_path(&vip, &address);
            let v = ctl.call("PATCH", &path, Some(json!({"drained": true})))?;
            if !wait {
                ctl.print(&v, |_| format!("backend {address} of {vip}: drained\n"));
                return Ok(());
            }
            let limit = std::time::Duration::from_secs_f64(timeout.unwrap_or(3600.0));
            let started = std::time::Instant::now();
            loop {
                let b = ctl.call("GET", &path, None)?;
                let drain = &b["drain"];
                if drain["state"] == "drained" {
                    ctl.print(&b, |_| {
                        format!(
                            "backend {address} of {vip}: drained, no flows left (after {:.1}s)\n",
                            started.elapsed().as_secs_f64()
                        )
                    });
                    return Ok(());
                }
                if started.elapsed() >= limit {
                    ctl.print(&b, |_| {
                        let requests = drain["requests"]
                            .as_f64()
                            .map_or(String::new(), |r| format!(", {r} requests"));
                        format!(
                            "backend {address} of {vip}: still draining after {:.1}s: {} active flows{requests} left\n",
                            started.elapsed().as_secs_f64(),
                            drain["active_flows"].as_u64().unwrap_or(0),
                        )
                    });
                    return Err(Failure::DrainTimedOut);
                }
                std::thread::sleep(std::time::Duration::from_millis(250));
            }
        }
        Command::Backend(BackendCommand::Undrain { vip, address }) => {
            let v = ctl.call(
                "PATCH",
                &backend_path(&vip, &address),
                Some(json!({"drained": false})),
            )?;
            ctl.print(&v, |_| format!("backend {address} of {vip}: undrained\n"));
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            if let Failure::Refused(m)
            | Failure::Unreachable(m)
            | Failure::DaemonFailed(m)
            | Failure::Usage(m)
            | Failure::Other(m) = &f
            {
                eprintln!("lbctl: {m}");
            }
            ExitCode::from(f.code())
        }
    }
}
