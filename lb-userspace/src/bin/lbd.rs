//! `lbd`: loads the XDP balancer, attaches it to an interface, programs the
//! VIPs of the config file and runs until SIGINT or SIGTERM, then detaches.

use std::{path::PathBuf, process::ExitCode};

use anyhow::{Context, Result, bail};
use clap::{Parser, ValueEnum};
use lb::{
    config,
    dataplane::{AttachMode, Dataplane},
};
use tokio::signal::unix::{SignalKind, signal};
use tracing::info;

#[derive(Parser)]
#[command(
    name = "lbd",
    version,
    about = "XDP Maglev layer-4 load balancer daemon"
)]
struct Args {
    /// Config file (TOML); see the README's config reference.
    #[arg(long, short)]
    config: PathBuf,
    /// Interface to attach the balancer to (required unless --check).
    #[arg(long, short)]
    iface: Option<String>,
    /// XDP attach mode: native (driver), skb (generic), or auto (native if
    /// the driver supports it).
    #[arg(long, value_enum, default_value_t = XdpModeArg::Auto)]
    xdp_mode: XdpModeArg,
    /// Validate the config, print a summary and exit.
    #[arg(long)]
    check: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum XdpModeArg {
    Auto,
    Native,
    Skb,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // The whole cause chain on one line, no backtrace: this is for operators.
            eprintln!("lbd: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<()> {
    let config = config::load(&args.config)?;
    if args.check {
        println!(
            "{}: ok ({} VIPs, {} backends)",
            args.config.display(),
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
    let mode = match args.xdp_mode {
        XdpModeArg::Auto => AttachMode::Auto,
        XdpModeArg::Native => AttachMode::Native,
        XdpModeArg::Skb => AttachMode::Skb,
    };

    let mut dp = Dataplane::load(&config.balancer).context("loading the XDP balancer")?;
    dp.sync(&config.vips)
        .context("programming the VIPs from the config")?;
    let used = dp.attach(&iface, mode)?;
    info!(
        iface = %iface,
        mode = ?used,
        vips = config.vips.len(),
        config = %args.config.display(),
        "balancer attached"
    );

    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?
        .block_on(async {
            let mut term =
                signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
            tokio::select! {
                r = tokio::signal::ctrl_c() => r.context("waiting for SIGINT")?,
                _ = term.recv() => {}
            }
            anyhow::Ok(())
        })?;

    info!(iface = %iface, "shutting down: detaching the balancer");
    dp.detach().context("detaching the balancer")?;
    Ok(())
}
