//! `cargo xtask`: what cargo alone cannot do. Installs prerequisites, runs
//! the tests and benchmarks as root, and runs the balancer.

mod lab;
mod package;
mod setup;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "lb's build, test and demo tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what the build and the tests need (idempotent).
    Setup,
    /// Set up, build the binaries and the Debian package, then run every
    /// test (needs root), the package test among them (a clean Debian 12
    /// root made with debootstrap, cached in /var/cache/lb-package-test).
    /// With arguments, `cargo test ARGS`.
    Test {
        /// Only build the package and run the package test.
        #[arg(long)]
        package_test: bool,
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Build the Debian package target/package/lb_VERSION_amd64.deb.
    Package,
    /// Set up and build; with no arguments run the demo lab, with arguments
    /// run `lbd` with them (needs root).
    Run {
        /// Arguments for `lbd`, e.g. `-- --config lb.toml --iface eth0`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Set up, then run the benchmarks; figures go to target/bench/results.json.
    Bench {
        /// Groups to run (xdp, maglev, e2e, api, metrics, load, peers); all
        /// but peers by default.
        groups: Vec<String>,
        /// Compare our VIP with nftables DNAT, HAProxy and a direct
        /// connection in the lab (several minutes; the `peers` group). Alone
        /// it runs only that comparison.
        #[arg(long)]
        peers: bool,
    },
    /// Set up, then fuzz both XDP programs with N frames each; figures go
    /// to target/bench/results.json (fuzz.*).
    Fuzz {
        /// Frames per program.
        #[arg(long, default_value_t = 100_000)]
        frames: u64,
        /// Seed of the frame generator.
        #[arg(long, default_value_t = 0x5eed)]
        seed: u64,
    },
    /// Lab housekeeping.
    Lab {
        #[command(subcommand)]
        action: LabAction,
    },
}

#[derive(Subcommand)]
enum LabAction {
    /// Remove what crashed tests, demos or benchmarks left behind: network
    /// namespaces named lbt-* (and the processes in them) and their temp dirs.
    Clean,
}

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn require_root(what: &str) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "{what} needs root (BPF programs, network namespaces, package installs); run it as root"
        );
    }
    Ok(())
}

/// Runs a command in the workspace root, failing if it fails.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .current_dir(root())
        .status()
        .with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

/// `cargo run --release` of one of lb-tests' programs; add its arguments.
fn lb_tests_bin(name: &str) -> Command {
    let mut c = cargo();
    c.args(["run", "--release", "-p", "lb-tests", "--bin", name, "--"]);
    c
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::Setup => {
            require_root("cargo xtask setup")?;
            setup::setup()
        }
        Task::Test { package_test, args } => {
            require_root("cargo xtask test")?;
            setup::setup()?;
            // The end-to-end tests run the real lbd binary.
            run(cargo().args(["build", "-p", "lb-userspace", "--bins"]))?;
            // The package tests (tests/package.rs) install the package on a
            // clean Debian 12; with a test filter, the package is built only
            // if none is there yet.
            let deb = package::out_dir().join(format!("lb_{}_amd64.deb", package::VERSION));
            let deb = if args.is_empty() || !deb.exists() {
                let started = std::time::Instant::now();
                let deb = package::package()?;
                println!("package built in {:.0} s", started.elapsed().as_secs_f64());
                deb
            } else {
                println!(
                    "package: {} (as built before; `cargo xtask package` rebuilds it)",
                    deb.display()
                );
                deb
            };
            let mut test = cargo();
            test.args(["test", "--no-fail-fast"])
                .env("LB_PACKAGE", &deb);
            if package_test {
                test.args(["-p", "lb-tests", "--test", "package", "--", "--nocapture"]);
            }
            run(test.args(&args))
        }
        Task::Package => {
            package::package()?;
            Ok(())
        }
        Task::Run { args } => {
            require_root("cargo xtask run")?;
            setup::setup()?;
            run(cargo().args(["build", "--release", "-p", "lb-userspace", "--bins"]))?;
            // Ctrl-C goes to the whole foreground group: let the child (demo
            // or lbd) clean up and exit, and wait for it.
            // SAFETY: setting a signal disposition to "ignore".
            unsafe { libc::signal(libc::SIGINT, libc::SIG_IGN) };
            if args.is_empty() {
                run(&mut lb_tests_bin("lb-demo"))
            } else {
                run(Command::new(root().join("target/release/lbd")).args(&args))
            }
        }
        Task::Lab {
            action: LabAction::Clean,
        } => {
            require_root("cargo xtask lab clean")?;
            lab::clean()
        }
        Task::Fuzz { frames, seed } => {
            require_root("cargo xtask fuzz")?;
            setup::setup()?;
            run(lb_tests_bin("lb-fuzz")
                .arg(root().join("target/bench/results.json"))
                .arg(frames.to_string())
                .arg(seed.to_string()))
        }
        Task::Bench { mut groups, peers } => {
            if peers && !groups.iter().any(|g| g == "peers") {
                groups.push("peers".into());
            }
            require_root("cargo xtask bench")?;
            setup::setup()?;
            // The end-to-end benchmark runs the real lbd.
            run(cargo().args(["build", "--release", "-p", "lb-userspace", "--bins"]))?;
            run(lb_tests_bin("lb-bench")
                .arg(root().join("target/bench/results.json"))
                .args(groups))
        }
    }
}
