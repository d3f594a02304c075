//! `lbd`: the balancer daemon. Loads the XDP balancer, attaches it to an
//! interface, programs the VIPs of the config file and runs until SIGINT or
//! SIGTERM, then detaches. `lbd decap` runs the decapsulator on a backend.

use std::{net::IpAddr, path::PathBuf, process::ExitCode, time::Duration};

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use lb::{
    config,
    controller::Controller,
    dataplane::{AttachMode, Dataplane, Decapsulator},
    host, metrics,
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
    args_conflicts_with_subcommands = true
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
    #[arg(long, short)]
    iface: Option<String>,
    /// XDP attach mode.
    #[arg(long, value_enum, default_value_t = XdpModeArg::Auto)]
    xdp_mode: XdpModeArg,
    /// Validate the config, print a summary and exit.
    #[arg(long)]
    check: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Run the decapsulator on a backend: strip the balancer's IPIP /
    /// IPv6-in-IP headers so the backend needs no ipip module.
    Decap(DecapArgs),
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

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::Decap(args)) => run_decap(args),
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

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
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

fn run_balancer(args: BalancerArgs) -> Result<()> {
    let Some(path) = args.config else {
        bail!("--config FILE is required (see lbd --help)");
    };
    let config = config::load(&path)?;
    if args.check {
        println!(
            "{}: ok ({} VIPs, {} backends)",
            path.display(),
            config.vips.len(),
            config.vips.iter().map(|v| v.backends.len()).sum::<usize>()
        );
        return Ok(());
    }
    let Some(iface) = args.iface else {
        bail!(
            "--iface is required to run the balancer (or pass --check to only validate the config)"
        );
    };
    runtime()?.block_on(async {
        let mut signals = Signals::install()?;
        let mut dp = Dataplane::load(&config.balancer).context("loading the XDP balancer")?;
        dp.sync(&config.vips)
            .context("programming the VIPs from the config")?;
        let (mut controller, handle) = Controller::new(dp);
        // Bind before attaching, so a bad address changes nothing.
        let metrics_server = match config.metrics.listen {
            Some(listen) => Some((
                listen,
                metrics::serve(listen, handle.clone())
                    .await
                    .with_context(|| format!("serving /metrics on {listen} (metrics.listen)"))?,
            )),
            None => None,
        };
        let used = controller
            .dataplane_mut()
            .attach(&iface, args.xdp_mode.into())?;
        info!(
            iface = %iface,
            mode = ?used,
            vips = config.vips.len(),
            config = %path.display(),
            "balancer attached"
        );
        if let Some((listen, server)) = metrics_server {
            info!(%listen, "serving /metrics");
            tokio::spawn(async move {
                if let Err(e) = server.await {
                    tracing::error!(error = %e, "the metrics endpoint failed");
                }
            });
        }
        let mut dp = controller.run(signals.recv()).await;
        info!(iface = %iface, "shutting down: detaching the balancer");
        dp.detach().context("detaching the balancer")
    })
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
    let used = decap.attach(&args.iface, args.xdp_mode.into())?;
    info!(iface = %args.iface, mode = ?used, addresses = ?addresses, "decapsulator attached");
    let mut current = addresses;
    runtime()?.block_on(async {
        let mut signals = Signals::install()?;
        let mut timer = tokio::time::interval(ADDRESS_REFRESH);
        loop {
            tokio::select! {
                _ = signals.recv() => break,
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
