//! `cargo xtask setup`: installs what is missing, step by step, and says
//! what it found. Runs in seconds when everything is present.

use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

use crate::run;

/// Debian packages the build and the tests use.
/// - llvm-22-dev, libpolly-22-dev, libzstd-dev, zlib1g-dev: building
///   bpf-linker against LLVM 22.
/// - iproute2: `ip` for network namespaces, veths, addresses, neighbours.
/// - procps: `sysctl`.
/// - ethtool: the lab turns checksum offload off on its client veth.
/// - wrk: the end-to-end benchmark's load generator.
/// - prometheus: its `promtool` checks the exporter's format and the
///   example scrape config in the tests.
/// - bird2: the BGP speaker lbd drives (`[bgp]`), and the router of the
///   scale-out lab.
/// - haproxy: the userspace TCP proxy `cargo xtask bench --peers` compares with.
/// - nftables: `nft`, for the netfilter NAT balancer that benchmark compares with.
/// - linux-perf: `perf`, whose profile of the whole host attributes balancer
///   CPU to each peer in that benchmark.
/// - dpkg-dev: `dpkg-shlibdeps` (the package's library dependencies);
///   binutils: `strip` for the packaged binaries.
/// - debootstrap: the clean Debian 12 root the package test installs into.
/// - lintian: the package test's check of the package. (The unit's
///   `systemd-analyze verify` runs in the test's Debian root.)
/// - etcd-server, etcd-client: the fleet tests' etcd cluster (`etcd`,
///   started by the tests on loopback, never as a service) and `etcdctl`;
///   protobuf-compiler: `protoc`, which the etcd-client crate's build runs.
const DEBIAN_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "iproute2",
    "procps",
    "ethtool",
    "wrk",
    "prometheus",
    "bird2",
    "haproxy",
    "nftables",
    "linux-perf",
    "dpkg-dev",
    "binutils",
    "debootstrap",
    "lintian",
    "etcd-server",
    "etcd-client",
    "protobuf-compiler",
];

fn step(name: &str) {
    println!("setup: {name}");
}

fn quiet(cmd: &mut Command) -> Option<String> {
    let out = cmd.stderr(Stdio::null()).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn missing_packages() -> Vec<&'static str> {
    DEBIAN_PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            quiet(Command::new("dpkg-query").args(["-W", "-f=${Status}", p]))
                .is_none_or(|s| s.trim() != "install ok installed")
        })
        .collect()
}

fn debian_packages() -> Result<()> {
    step("Debian packages");
    let missing = missing_packages();
    if missing.is_empty() {
        println!("  all present: {}", DEBIAN_PACKAGES.join(" "));
        return Ok(());
    }
    println!("  installing: {}", missing.join(" "));
    let install = |pkgs: &[&str]| {
        run(Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(pkgs)
            .env("DEBIAN_FRONTEND", "noninteractive"))
    };
    if install(&missing).is_err() {
        println!("  apt-get install failed; refreshing the package index and retrying");
        run(Command::new("apt-get").args(["update"]))?;
        install(&missing)?;
    }
    Ok(())
}

fn nightly_rust_src() -> Result<()> {
    step("nightly toolchain with rust-src (builds the XDP programs)");
    let toolchains =
        quiet(Command::new("rustup").args(["toolchain", "list"])).context("rustup is required")?;
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        println!("  installing the nightly toolchain");
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))?;
    }
    let installed = quiet(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))
    .unwrap_or_default();
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        println!("  present");
    } else {
        println!("  adding rust-src");
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    Ok(())
}

fn stable_components() -> Result<()> {
    step("stable rustfmt and clippy (CI checks)");
    let installed = quiet(Command::new("rustup").args(["component", "list", "--installed"]))
        .unwrap_or_default();
    let missing: Vec<&str> = ["rustfmt", "clippy"]
        .into_iter()
        .filter(|c| !installed.lines().any(|l| l.starts_with(c)))
        .collect();
    if missing.is_empty() {
        println!("  present");
        return Ok(());
    }
    println!("  adding {}", missing.join(" "));
    run(Command::new("rustup")
        .args(["component", "add"])
        .args(&missing))
}

/// bpf-linker must be linked against LLVM 22 (what nightly Rust emits).
fn bpf_linker_ok() -> bool {
    let Some(path) = quiet(Command::new("sh").args(["-c", "command -v bpf-linker"])) else {
        return false;
    };
    if quiet(Command::new(path.trim()).arg("--version")).is_none() {
        return false;
    }
    // Dynamically linked builds name their LLVM; a static build passes.
    match quiet(Command::new("ldd").arg(path.trim())) {
        Some(libs) if libs.contains("libLLVM") => {
            libs.contains("libLLVM.so.22") || libs.contains("libLLVM-22")
        }
        _ => true,
    }
}

fn bpf_linker() -> Result<()> {
    step("bpf-linker built against LLVM 22");
    if bpf_linker_ok() {
        println!("  present");
        return Ok(());
    }
    println!("  building it (takes a minute or two)");
    run(Command::new("cargo")
        .args([
            "install",
            "bpf-linker",
            "--locked",
            "--no-default-features",
            "--features",
            "llvm-22",
            "--force",
        ])
        .env("LLVM_PREFIX", "/usr/lib/llvm-22"))?;
    if !bpf_linker_ok() {
        bail!("bpf-linker was installed but does not run; is ~/.cargo/bin on PATH?");
    }
    Ok(())
}

/// Installs everything the build and tests need.
pub fn setup() -> Result<()> {
    debian_packages()?;
    nightly_rust_src()?;
    stable_components()?;
    bpf_linker()?;
    println!("setup: done");
    Ok(())
}
