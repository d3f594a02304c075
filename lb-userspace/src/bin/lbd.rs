//! `lbd`: the balancer daemon. Loads the XDP balancer, attaches it to an
//! interface, programs the VIPs of the config file and runs until SIGINT or
//! SIGTERM, then leaves the balancer running from its pinned state (or
//! detaches, with `--no-pin`). `lbd decap` runs the decapsulator on a
//! backend. Under systemd (`lbd@.service`, `Type=notify`) it says READY
//! once it forwards, RELOADING on SIGHUP and STOPPING on shutdown
//! ([`lb::host::service_manager`]).

use std::{io::IsTerminal, net::IpAddr, path::PathBuf, process::ExitCode, time::Duration};

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use lb::{
    control::{
        access, api,
        audit::AuditLog,
        controller::{Controller, ControllerError, ControllerHandle},
        metrics,
        reloads::{self, ReloadOutcome},
    },
    dataplane::{AttachMode, Dataplane, Decapsulator, LoadOptions, pinning},
    desired::config::{self, ConfigFile, LogFormat},
    desired::state_file::StateFile,
    host::{self, bgp, bird_guard, lock::InstanceLock, service_manager},
};
use lb_common::DecapReason;
use tokio::signal::unix::{SignalKind, signal};
use tracing::info;

/// How often `lbd decap` re-reads the host's addresses (when not given).
const ADDRESS_REFRESH: Duration = Duration::from_secs(5);

#[derive(Parser)]
#[command(
    name = "lbd",
    version,
    about = "XDP Maglev layer-4 load balancer daemon",
    args_conflicts_with_subcommands = true,
    after_long_help = "\
Signals: SIGHUP re-reads the config file and applies it (or rejects it \
whole); SIGTERM and SIGINT stop lbd, and the balancer keeps forwarding \
from its pinned state until an lbd of the same instance adopts it.

Files of instance NAME: /run/lb/NAME.sock (the API), /run/lb/NAME.lock, \
/sys/fs/bpf/NAME/ (pinned maps and the XDP link), \
/var/log/lb/NAME-audit.log; under systemd (lbd@NAME.service) the config \
/etc/lb/NAME.toml and the interface in /etc/lb/NAME.env (LBD_IFACE). \
The config reference is the README in /usr/share/doc/lb/."
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    balancer: BalancerArgs,
}

#[derive(Args)]
struct BalancerArgs {
    /// Config file (TOML); see the README's config reference.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Interface to attach the balancer to (required unless --check).
    #[arg(long, short, env = "LBD_IFACE")]
    iface: Option<String>,
    /// XDP attach mode.
    #[arg(long, value_enum, default_value_t = XdpModeArg::Auto, env = "LBD_XDP_MODE")]
    xdp_mode: XdpModeArg,
    /// Validate the config, print a summary and exit.
    #[arg(long)]
    check: bool,
    /// Name of this balancer's state under /sys/fs/bpf/ (maps and the XDP
    /// link are pinned there; a restarted lbd adopts them).
    #[arg(long, default_value = "lb", value_parser = parse_instance)]
    instance: String,
    /// Remove the instance's pinned state (detaching the balancer) and exit.
    #[arg(long)]
    cleanup: bool,
    /// Pin nothing: the balancer detaches and its state goes when lbd exits.
    #[arg(long)]
    no_pin: bool,
}

/// Instance names become directory names in bpffs, which allows no dot;
/// `__` is kept for an upgrade's staging directory.
fn parse_instance(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= 64
        && !s.contains("__")
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_".contains(c));
    if ok {
        Ok(s.to_string())
    } else {
        Err(format!(
            "{s:?}: use 1-64 letters, digits, '-' or '_' (no '__')"
        ))
    }
}

#[derive(Subcommand)]
enum Command {
    /// Run the decapsulator on a backend: strip the balancer's IPIP /
    /// IPv6-in-IP headers so the backend needs no ipip module.
    Decap(DecapArgs),
    /// Started by lbd next to BIRD: withdraws the VIPs from BGP once no lbd
    /// has run for --dead-after seconds (SIGKILL, a crash). Not for
    /// operators to run.
    #[command(hide = true)]
    BirdGuard(BirdGuardArgs),
    /// Print the man page (roff), or write every page to a directory; for
    /// packaging.
    #[command(hide = true)]
    Man {
        /// Write lbd.8 and a page per subcommand (lbd-decap.8) here.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Print the control API's OpenAPI 3.1 document (what /v1/openapi.json
    /// serves; docs/openapi.json in the repository).
    Openapi,
}

#[derive(Args)]
struct BirdGuardArgs {
    /// The instance lock of the lbd to watch.
    #[arg(long)]
    lock: PathBuf,
    /// BIRD's directory (config, control socket).
    #[arg(long)]
    bird_dir: PathBuf,
    /// Seconds without a running lbd before the VIPs are withdrawn.
    #[arg(long)]
    dead_after: u64,
}

#[derive(Args)]
struct DecapArgs {
    /// Interface the balancer's packets arrive on.
    #[arg(long, short)]
    iface: String,
    /// Outer destination address to decapsulate (repeat for several).
    /// Default: every address of this host, re-read every 5 seconds.
    #[arg(long = "address")]
    addresses: Vec<IpAddr>,
    /// XDP attach mode.
    #[arg(long, value_enum, default_value_t = XdpModeArg::Auto)]
    xdp_mode: XdpModeArg,
    /// Send packets of TCP connections this host does not have on to the
    /// backend the balancer names as their second-chance candidate (once;
    /// see the README's "Backends"). Turns forwarding on for IFACE (IPv4
    /// and IPv6: the XDP FIB lookup needs it; router advertisements stay
    /// accepted) and has the kernel resolve the neighbours of candidates.
    #[arg(long)]
    second_chance: bool,
    /// Serve Prometheus metrics (GET /metrics) on this ADDRESS:PORT.
    #[arg(long, default_value = DEFAULT_DECAP_METRICS)]
    metrics_listen: std::net::SocketAddr,
    /// Serve no metrics.
    #[arg(long, conflicts_with = "metrics_listen")]
    no_metrics: bool,
    /// Log as text lines or one JSON object a line.
    #[arg(long, value_enum, default_value_t = LogFormatArg::Text)]
    log_format: LogFormatArg,
}

/// How often `lbd decap --second-chance` collects the candidates whose
/// neighbour entry is missing (their packets are dropped until it exists).
const WANTED_POLL: std::time::Duration = std::time::Duration::from_millis(100);

/// Where `lbd decap` serves `/metrics` by default: the balancer's default
/// port (a backend host runs no balancer).
const DEFAULT_DECAP_METRICS: &str = "127.0.0.1:9180";

#[derive(Clone, Copy, ValueEnum)]
enum LogFormatArg {
    Text,
    Json,
}

impl From<LogFormatArg> for LogFormat {
    fn from(f: LogFormatArg) -> LogFormat {
        match f {
            LogFormatArg::Text => LogFormat::Text,
            LogFormatArg::Json => LogFormat::Json,
        }
    }
}

/// native: driver mode (fast); skb: generic mode (any interface, slower);
/// auto: native, else skb with a warning.
#[derive(Clone, Copy, ValueEnum)]
enum XdpModeArg {
    Auto,
    Native,
    Skb,
}

impl From<XdpModeArg> for AttachMode {
    fn from(m: XdpModeArg) -> AttachMode {
        match m {
            XdpModeArg::Auto => AttachMode::Auto,
            XdpModeArg::Native => AttachMode::Native,
            XdpModeArg::Skb => AttachMode::Skb,
        }
    }
}

/// Logs to stderr: `RUST_LOG` if set, else `level` (the config's), else
/// info; as text lines or, with `[log] format = "json"`, one JSON object a
/// line (`timestamp`, `level`, `target`, `fields` with the message, and
/// `span`/`spans` with the cause of a change).
fn init_logging(level: Option<&str>, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(level.unwrap_or("info")))
        .unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => builder.json().with_current_span(true).init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::Decap(args)) => {
            init_logging(None, args.log_format.into());
            run_decap(args)
        }
        Some(Command::Openapi) => {
            println!(
                "{}",
                serde_json::to_string_pretty(&api::openapi()).expect("the document serializes")
            );
            Ok(())
        }
        Some(Command::BirdGuard(args)) => {
            init_logging(None, LogFormat::Text);
            runtime().and_then(|rt| {
                rt.block_on(bird_guard::run(bird_guard::Guard {
                    lbd_lock: args.lock,
                    paths: bgp::BirdPaths { dir: args.bird_dir },
                    dead_after: Duration::from_secs(args.dead_after),
                }))
            })
        }
        Some(Command::Man { dir }) => {
            use clap::CommandFactory;
            match dir {
                Some(dir) => lb::man_pages::write_all(Cli::command(), "8", &dir)
                    .map(|files| {
                        for f in files {
                            println!("{}", f.display());
                        }
                    })
                    .with_context(|| format!("writing the man pages to {}", dir.display())),
                None => clap_mangen::Man::new(Cli::command())
                    .section("8")
                    .render(&mut std::io::stdout())
                    .context("writing the man page"),
            }
        }
        None => run_balancer(cli.balancer),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // The whole cause chain on one line, no backtrace: this is for operators.
            eprintln!("lbd: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Two worker threads: the controller runs on the main thread (`block_on`),
/// so the API, `/metrics` and the health checks go on while it applies a
/// large change.
fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the runtime")
}

/// SIGINT and SIGTERM, installed before anything is attached so a signal
/// during start-up is not lost.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> Result<Signals> {
        Ok(Signals {
            term: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
        })
    }

    async fn recv(&mut self) {
        tokio::select! {
            _ = self.int.recv() => {}
            _ = self.term.recv() => {}
        }
    }
}

/// Where a fleet member starts: the revision and VIPs, its cache file and
/// its link to etcd.
struct FleetStart {
    revision: u64,
    vips: Vec<lb::desired::vip::Vip>,
    cache: StateFile,
    link: lb::fleet::SharedLink,
}

/// The fleet's desired state at start-up (see [`lb::fleet`]): read from
/// etcd (written from the config file's VIPs when the fleet has none);
/// when etcd does not answer or this member cannot take the fleet's
/// document, the revision it applied last (its cache file), else the
/// config file's VIPs at revision 0 (any revision of the fleet is newer).
async fn fleet_start(
    settings: &lb::fleet::FleetSettings,
    instance: &str,
    config: &config::Config,
) -> Result<FleetStart> {
    use lb::fleet::{self, agent};
    let cache_path = settings.cache_path(instance);
    if let Some(dir) = cache_path.parent() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating {} (fleet.cache_file)", dir.display()))?;
    }
    let cache = StateFile::new(&cache_path);
    let link = agent::new_link();
    let fits = |vips: Vec<lb::desired::vip::Vip>| {
        let mut c = config.clone();
        c.vips = vips;
        config::validate(&c).map(|()| c.vips)
    };
    let seed = fleet::encode(config.balancer.table_size, &config.vips);
    let refused = match agent::initial(settings, &seed).await {
        Ok((revision, document, seeded)) => {
            agent::note_contact(&link);
            match fleet::decode(&document, &config.balancer).and_then(fits) {
                Ok(vips) => {
                    if seeded {
                        info!(prefix = %settings.prefix, revision, vips = vips.len(), "the fleet had no desired state: seeded it with the config file's [[vip]] tables");
                    } else {
                        info!(prefix = %settings.prefix, revision, vips = vips.len(), "starting from the fleet's desired state (the config file's [[vip]] tables are ignored)");
                    }
                    return Ok(FleetStart {
                        revision,
                        vips,
                        cache,
                        link,
                    });
                }
                Err(problems) => {
                    let error = fleet::problem_text(&problems);
                    tracing::error!(revision, error = %error, "this member cannot take the fleet's desired state");
                    link.lock().unwrap().refused = Some(fleet::Refusal { revision, error });
                    "it cannot take the fleet's desired state"
                }
            }
        }
        Err(e) => {
            let error = format!("{e:#}");
            tracing::warn!(error = %error, "etcd did not answer at start-up; trying again in the background");
            link.lock().unwrap().error = Some(error);
            "etcd did not answer"
        }
    };
    match cache.load(&config.balancer) {
        Ok(Some((revision, vips))) => match fits(vips) {
            Ok(vips) => {
                tracing::warn!(cache = %cache_path.display(), revision, "starting from the fleet revision applied last ({refused})");
                Ok(FleetStart {
                    revision,
                    vips,
                    cache,
                    link,
                })
            }
            Err(problems) => bail!(
                "{refused}, and the cache file {} does not fit the config: {}",
                cache_path.display(),
                fleet::problem_text(&problems)
            ),
        },
        Ok(None) => {
            tracing::warn!(cache = %cache_path.display(), "starting from the config file's [[vip]] tables ({refused}, and there is no cache file yet)");
            Ok(FleetStart {
                revision: 0,
                vips: config.vips.clone(),
                cache,
                link,
            })
        }
        Err(e) => bail!("{refused}, and {e}"),
    }
}

fn run_balancer(args: BalancerArgs) -> Result<()> {
    let dir = pinning::instance_dir(&args.instance);
    if args.cleanup {
        init_logging(None, LogFormat::Text);
        // Removing the state of a running lbd would pull the data plane from
        // under it: hold the instance's lock for the clean-up.
        let _lock = InstanceLock::acquire(&args.instance)?;
        // Nothing will forward the VIPs' traffic: stop announcing them first.
        // The clean-up goes ahead even if that fails (it says so).
        if let Some(path) = &args.config {
            match config::load(path) {
                Ok(config) => {
                    if let Some(settings) = config.bgp {
                        let mut announcer = bgp::Announcer::new(&args.instance, settings);
                        match runtime()?.block_on(announcer.apply(None, &Default::default())) {
                            Ok(()) => println!(
                                "{}: every VIP withdrawn",
                                announcer.paths().config().display()
                            ),
                            Err(e) => {
                                eprintln!("lbd: warning: withdrawing the VIPs from BGP failed: {e}")
                            }
                        }
                    }
                }
                Err(e) => eprintln!("lbd: warning: not withdrawing any BGP announcement: {e}"),
            }
        }
        let removed = pinning::cleanup_instance(&dir)
            .with_context(|| format!("removing {}", dir.display()))?;
        println!(
            "{}: removed {} pinned objects",
            dir.display(),
            removed.len()
        );
        return Ok(());
    }
    let Some(path) = args.config else {
        bail!("--config FILE is required (see lbd --help)");
    };
    let (file, mut config) = ConfigFile::load(&path)?;
    init_logging(config.log_level.as_deref(), config.log_format);
    reloads::loaded();
    // The VIPs: the state file's when there is one (api.state_file), else
    // the config file's; and the revision the API counts from.
    let state_file = config.api.state_file.as_deref().map(StateFile::new);
    let (revision, seed_state) = match &state_file {
        Some(state) => match state.load(&config.balancer)? {
            Some((revision, vips)) => {
                config.vips = vips;
                if let Err(problems) = config::validate(&config) {
                    let list: Vec<String> = problems
                        .iter()
                        .map(|p| format!("\n  {}: {}", p.field, p.message))
                        .collect();
                    bail!(
                        "the state file {} does not fit the config file {}:{}",
                        state.path().display(),
                        path.display(),
                        list.concat()
                    );
                }
                (revision, false)
            }
            None => (1, true),
        },
        // Not stored: start above any revision an earlier lbd handed out.
        None => (
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_micros() as u64),
            false,
        ),
    };
    if args.check {
        println!(
            "{}: ok ({} VIPs, {} backends)",
            path.display(),
            config.vips.len(),
            config.vips.iter().map(|v| v.backends.len()).sum::<usize>()
        );
        return check_host_and_state(&args.instance, &dir, &config);
    }
    let Some(iface) = args.iface else {
        bail!(
            "--iface is required to run the balancer (or pass --check to only validate the config)"
        );
    };
    // One lbd per instance, for the whole life of this process.
    let lock = InstanceLock::acquire(&args.instance)?;
    runtime()?.block_on(async {
        let mut signals = Signals::install()?;
        // A fleet member starts from the fleet's desired state (or seeds an
        // empty fleet with the config file's VIPs); without etcd, from the
        // revision it applied last (its cache file).
        let mut revision = revision;
        let fleet = match config.fleet.clone() {
            Some(settings) => {
                let start = fleet_start(&settings, &args.instance, &config).await?;
                config.vips = start.vips;
                revision = start.revision;
                Some((settings, start.cache, start.link))
            }
            None => None,
        };
        // Start-up runs every check that can fail before it changes the
        // running balancer: an adopted data plane keeps forwarding exactly
        // as the previous lbd left it until the config is programmed (last
        // but one step) and the program replaced (last step).
        // At debug level for the XDP target, the program logs every packet.
        let xdp_debug_log = tracing::enabled!(target: "lb_xdp", tracing::Level::DEBUG);
        let options = LoadOptions {
            pin_dir: (!args.no_pin).then(|| dir.clone()),
            xdp_debug_log,
        };
        let mut dp = Dataplane::open(&config.balancer, &options).context("loading the XDP balancer")?;
        if let Some(logger) = dp.take_xdp_logger() {
            info!("XDP debug log on: one record per packet (target lb_xdp)");
            tokio::spawn(forward_xdp_log(logger));
        }
        if dp.adopted() {
            info!(dir = %dir.display(), "adopting the running balancer's state (flows, counters, attachment)");
        }
        dp.check_attach(&iface)?;
        let host = host::checks::check(&config).context("reading the host's addresses and routes")?;
        if !host.problems.is_empty() {
            let list: Vec<String> = host.problems.iter().map(|p| format!("\n  {}: {}", p.field, p.message)).collect();
            bail!("config file {} cannot run on this host:{}", path.display(), list.concat());
        }
        for w in &host.warnings {
            tracing::warn!("{w}");
        }
        let audit_path = config.api.audit_log.clone().unwrap_or_else(|| api::default_audit_log(&args.instance));
        let audit = AuditLog::open(&audit_path, config.api.audit_failure)
            .with_context(|| format!("opening the audit log {}", audit_path.display()))?;
        let tokens = match &config.api.token_file {
            Some(tokens) if config.api.tcp_listen.is_some() => Some(
                access::Tokens::load(tokens).map_err(anyhow::Error::msg).context("loading api.token_file")?,
            ),
            _ => None,
        };
        if seed_state && let Some(state) = &state_file {
            state
                .save(revision, &config.vips)
                .with_context(|| format!("writing the state file {} (api.state_file)", state.path().display()))?;
            info!(state_file = %state.path().display(), vips = config.vips.len(), "state file seeded from the config file's [[vip]] tables");
        }
        let (controller, handle) = Controller::new(dp, config.clone(), Some(file), Some(audit.clone()));
        let mut agent = None;
        let mut controller = match fleet {
            Some((settings, cache, link)) => {
                let (tx, rx) = tokio::sync::mpsc::channel(64);
                agent = Some(lb::fleet::agent::Agent::new(settings.clone(), link.clone(), handle.clone(), rx, revision));
                controller
                    .with_revision(revision, Some(cache))
                    .with_fleet(lb::control::controller::FleetLink { settings, proposals: tx, link })
            }
            None => controller.with_revision(revision, state_file.clone()),
        };
        // Bind every listener before the maps are touched, so a bad address
        // changes nothing.
        let metrics_server = match config.metrics.listen {
            Some(listen) => Some((
                listen,
                metrics::serve(listen, &config.metrics.transport, handle.clone(), config.bgp.as_ref().map(|s| bgp::BirdPaths::new(&args.instance, s)))
                    .await
                    .with_context(|| format!("serving /metrics on {listen} (metrics.listen, metrics.tls)"))?,
            )),
            None => None,
        };
        let socket = config.api.socket.clone().unwrap_or_else(|| api::default_socket(&args.instance));
        let unix_api = api::serve_unix(&socket, config.api.socket_group.as_deref(), handle.clone(), audit.clone())
            .await
            .with_context(|| format!("serving the API on {} (api.socket)", socket.display()))?;
        let tcp_api = match config.api.tcp_listen {
            Some(listen) => Some((
                listen,
                api::serve_tcp(listen, &config.api.tcp_transport, tokens, handle.clone(), audit.clone())
                    .await
                    .with_context(|| format!("serving the API on {listen} (api.tcp_listen, api.tls)"))?,
            )),
            None => None,
        };
        // Now change the running balancer: program the config, then swap
        // the program in.
        {
            let _cause = tracing::info_span!("change", cause = "startup").entered();
            let dp = controller.dataplane_mut();
            dp.take_over().context("taking over the running balancer's maps")?;
            dp.sync(&config.vips).context("programming the VIPs from the config")?;
            for change in lb::desired::diff::diff(&[], &config.vips) {
                change.log();
            }
        }
        let adopted = controller.dataplane_mut().adopted();
        let used = controller.dataplane_mut().attach(&iface, args.xdp_mode.into())?;
        info!(
            iface = %iface,
            mode = ?used,
            vips = config.vips.len(),
            config = %path.display(),
            lock = %lock.path().display(),
            "{}",
            if adopted { "balancer program replaced on the existing attachment" } else { "balancer attached" }
        );
        if let Some((listen, server)) = metrics_server {
            lb::control::tls::log_transport("serving /metrics", listen, &config.metrics.transport);
            tokio::spawn(async move {
                if let Err(e) = server.await {
                    tracing::error!(error = %e, "the metrics endpoint failed");
                }
            });
        }
        info!(
            socket = %socket.display(),
            mode = if config.api.socket_group.is_some() { "0660" } else { "0600" },
            group = config.api.socket_group.as_deref().unwrap_or("-"),
            audit_log = %audit_path.display(),
            "serving the API"
        );
        tokio::spawn(async move {
            if let Err(e) = unix_api.await {
                tracing::error!(error = %e, "the API socket failed");
            }
        });
        if let Some((listen, server)) = tcp_api {
            lb::control::tls::log_transport("serving the API on TCP", listen, &config.api.tcp_transport);
            tokio::spawn(async move {
                if let Err(e) = server.await {
                    tracing::error!(error = %e, "the TCP API failed");
                }
            });
        }
        tokio::spawn(reload_on_sighup(path.clone(), handle.clone()));
        // Announce only now that the data plane is attached.
        let announcer = config.bgp.clone().map(|settings| {
            let announcer = bgp::Announcer::new(&args.instance, settings.clone());
            info!(bird = %announcer.paths().dir.display(), "announcing healthy VIPs over BGP through BIRD");
            if let Err(e) = bird_guard::spawn(&args.instance, announcer.paths(), settings.dead_after) {
                tracing::error!(error = %e, "starting the BIRD guard failed: if this lbd dies, BIRD keeps announcing its VIPs");
            }
            bgp::spawn(announcer, controller.announcements())
        });
        if let Some(agent) = agent {
            tokio::spawn(agent.run());
        }
        // Attached, the config applied, every listener serving: ready.
        handle.set_ready(true);
        service_manager::ready(&format!(
            "forwarding {} VIPs on {iface}{}",
            config.vips.len(),
            if adopted { " (adopted the running balancer)" } else { "" }
        ));
        let stopping = handle.clone();
        let mut dp = controller
            .run(async move {
                signals.recv().await;
                service_manager::stopping();
                stopping.set_ready(false);
            })
            .await;
        if let Some(announcer) = announcer {
            announcer.stop(dp.pin_dir().is_none()).await;
        }
        let _ = std::fs::remove_file(&socket);
        match dp.pin_dir() {
            Some(dir) => info!(
                dir = %dir.display(),
                "shutting down; the balancer keeps running from its pinned state \
                 (a restarted lbd adopts it; lbd --cleanup --instance {} removes it)",
                args.instance
            ),
            None => {
                info!(iface = %iface, "shutting down: detaching the balancer");
                dp.detach().context("detaching the balancer")?;
            }
        }
        drop(lock);
        Ok(())
    })
}

/// The rest of `lbd --check`, on the host it runs on: the config against
/// the host's addresses, who runs the instance, and what a start would do
/// with the pinned state (adopt, convert, refuse). Changes nothing.
fn check_host_and_state(
    instance: &str,
    dir: &std::path::Path,
    config: &config::Config,
) -> Result<()> {
    let mut host =
        host::checks::check(config).context("reading the host's addresses and routes")?;
    host.problems.extend(listener_problems(config));
    for w in &host.warnings {
        println!("warning: {w}");
    }
    if let Some(pid) = host::lock::holder(&host::lock::lock_path(instance)).unwrap_or(None) {
        println!("instance {instance}: lbd pid {pid} runs it now");
    }
    let state = lb::dataplane::upgrade::describe(dir, &config.balancer);
    if host.problems.is_empty()
        && let Ok(lines) = &state
    {
        for l in lines {
            println!("{l}");
        }
        return Ok(());
    }
    let mut problems: Vec<String> = host
        .problems
        .iter()
        .map(|p| format!("\n  {}: {}", p.field, p.message))
        .collect();
    if let Err(e) = state {
        problems.push(format!("\n  pinned state in {}: {e}", dir.display()));
    }
    bail!("the config cannot run on this host:{}", problems.concat())
}

/// What a start would refuse in the listeners' files on this host, read
/// as a start reads them: the socket's group, the TLS certificates and keys
/// (`api.tls`, `metrics.tls`) and the token file.
fn listener_problems(config: &config::Config) -> Vec<config::Problem> {
    let mut problems = Vec::new();
    let mut problem = |field: &str, message: String| {
        problems.push(config::Problem {
            field: field.into(),
            message,
        })
    };
    if let Some(group) = &config.api.socket_group
        && let Err(e) = host::group_id(group)
    {
        problem("api.socket_group", e.to_string());
    }
    if config.api.tcp_listen.is_some() {
        if let config::Transport::Tls(tls) = &config.api.tcp_transport
            && let Err(e) = lb::control::tls::server_config(tls)
        {
            problem("api.tls", e.to_string());
        }
        if let Some(tokens) = &config.api.token_file
            && let Err(e) = access::Tokens::load(tokens)
        {
            problem("api.token_file", e);
        }
    }
    if config.metrics.listen.is_some()
        && let config::Transport::Tls(tls) = &config.metrics.transport
        && let Err(e) = lb::control::tls::server_config(tls)
    {
        problem("metrics.tls", e.to_string());
    }
    problems
}

/// Hands the XDP program's log records to the log (as they arrive).
async fn forward_xdp_log(logger: aya_log::EbpfLogger<&'static dyn log::Log>) {
    // SAFETY: the logger owns its ring buffer's fd, which stays open and
    // the same for as long as the AsyncFd (which owns the logger) lives.
    let registered = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
    };
    let Ok(mut fd) = registered else {
        tracing::error!("cannot poll the XDP log");
        return;
    };
    loop {
        let Ok(mut guard) = fd.readable_mut().await else {
            return;
        };
        guard.get_inner_mut().flush();
        guard.clear_ready();
    }
}

/// Reloads the config file on SIGHUP and applies it as a diff. A config
/// with any problem is rejected whole and nothing changes.
async fn reload_on_sighup(path: PathBuf, handle: ControllerHandle) {
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        tracing::error!("cannot install the SIGHUP handler: config reloads are off");
        return;
    };
    while hup.recv().await.is_some() {
        service_manager::reloading();
        let outcome = match ConfigFile::load(&path) {
            Ok((file, config)) => match handle.reload(file, config, "signal:SIGHUP").await {
                Ok(()) => {
                    info!(config = %path.display(), "config reloaded and applied");
                    ReloadOutcome::Applied
                }
                Err(e) => {
                    tracing::error!(config = %path.display(), error = %e, "applying the reloaded config failed");
                    match e {
                        ControllerError::Rejected(_) | ControllerError::Refused(_) => {
                            ReloadOutcome::Rejected
                        }
                        _ => ReloadOutcome::Failed,
                    }
                }
            },
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "config not reloaded; nothing changed");
                ReloadOutcome::Rejected
            }
        };
        reloads::record(outcome);
        service_manager::ready(match outcome {
            ReloadOutcome::Applied => "config reloaded and applied",
            ReloadOutcome::Rejected => "config reload rejected: the previous config stays",
            ReloadOutcome::Failed => "config reload failed: the previous config stays",
        });
    }
}

fn run_decap(args: DecapArgs) -> Result<()> {
    let mut decap = Decapsulator::load().context("loading the XDP decapsulator")?;
    let fixed = !args.addresses.is_empty();
    let addresses = if fixed {
        args.addresses.clone()
    } else {
        host::addresses().context("listing this host's addresses")?
    };
    decap.set_addresses(&addresses)?;
    let neighbours = if args.second_chance {
        lb::dataplane::enable_forwarding_for(&args.iface, true, true)
            .context("turning forwarding on for --second-chance")?;
        let ifindex = lb::dataplane::interface_index(&args.iface)?;
        let n = lb::host::neighbours::Neighbours::start(&args.iface, ifindex)
            .context("starting the neighbour manager for --second-chance")?;
        decap.enable_second_chance()?;
        Some(n)
    } else {
        None
    };
    let used = decap.attach(&args.iface, args.xdp_mode.into())?;
    info!(iface = %args.iface, mode = ?used, addresses = ?addresses, second_chance = args.second_chance, "decapsulator attached");
    let mut current = addresses;
    runtime()?.block_on(async {
        let mut signals = Signals::install()?;
        let mut timer = tokio::time::interval(ADDRESS_REFRESH);
        let mut wanted_timer = tokio::time::interval(WANTED_POLL);
        let (scrape_tx, mut scrapes) = tokio::sync::mpsc::channel::<metrics::DecapRequest>(16);
        if !args.no_metrics {
            let listen = args.metrics_listen;
            let server = metrics::serve_decap(listen, scrape_tx)
                .await
                .with_context(|| format!("serving /metrics on {listen} (--metrics-listen)"))?;
            info!(%listen, "serving /metrics");
            tokio::spawn(async move {
                if let Err(e) = server.await {
                    tracing::error!(error = %e, "the metrics endpoint failed");
                }
            });
        }
        loop {
            tokio::select! {
                _ = signals.recv() => break,
                Some(reply) = scrapes.recv() => {
                    let scrape = decap.counters().map(|packets| metrics::DecapScrape {
                        packets,
                        addresses: current.len(),
                    });
                    let _ = reply.send(scrape.map_err(|e| format!("{e:#}")));
                }
                _ = wanted_timer.tick(), if neighbours.is_some() => {
                    let wanted = decap.take_wanted();
                    if let (Some(n), false) = (&neighbours, wanted.is_empty()) {
                        info!(candidates = ?wanted, "resolving the neighbours towards second-chance candidates");
                        n.manage(&wanted);
                    }
                }
                _ = timer.tick(), if !fixed => match host::addresses() {
                    Ok(now) if now != current => match decap.set_addresses(&now) {
                        Ok(()) => {
                            info!(addresses = ?now, "host addresses changed");
                            current = now;
                        }
                        Err(e) => tracing::warn!(error = %e, "updating the decapsulated addresses failed"),
                    },
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "listing this host's addresses failed"),
                },
            }
        }
        anyhow::Ok(())
    })?;
    let counters = decap.counters()?;
    let summary: Vec<String> = DecapReason::ALL
        .iter()
        .map(|r| format!("{}={}", r.name(), counters[*r as usize]))
        .collect();
    info!(iface = %args.iface, counters = %summary.join(" "), "shutting down: detaching the decapsulator");
    Ok(())
}
