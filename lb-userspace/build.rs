//! Builds the XDP objects (`lb-ebpf`, for `bpfel-unknown-none`, with nightly
//! and bpf-linker) into OUT_DIR, where `dataplane` embeds them, and records
//! the git commit being built (`LB_BUILD_COMMIT`, for `lb_build_info`).
//! `cargo xtask setup` installs what this needs.

use std::process::Command;

fn main() -> aya_build::Result<()> {
    build_commit();
    let root_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../lb-ebpf");
    let package = aya_build::Package {
        name: "lb-ebpf",
        root_dir,
        ..Default::default()
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::default())
}

/// `LB_BUILD_COMMIT`: the environment's (for builds from a source tarball,
/// e.g. a package), else `git rev-parse --short=12 HEAD`, else `unknown`.
/// Rebuilt when HEAD moves (a commit, a checkout).
fn build_commit() {
    println!("cargo:rerun-if-env-changed=LB_BUILD_COMMIT");
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .current_dir(dir)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let commit = std::env::var("LB_BUILD_COMMIT").ok().or_else(|| {
        let head = git(&["rev-parse", "--short=12", "HEAD"])?;
        // HEAD, and the branch it names (absent when packed: then HEAD's
        // own changes still show a checkout).
        let mut watched = vec!["HEAD".to_string()];
        watched.extend(git(&["symbolic-ref", "-q", "HEAD"]));
        for name in watched {
            if let Some(p) = git(&["rev-parse", "--git-path", &name]) {
                let p = dir.join(p);
                if p.exists() {
                    println!("cargo:rerun-if-changed={}", p.display());
                }
            }
        }
        Some(head)
    });
    println!(
        "cargo:rustc-env=LB_BUILD_COMMIT={}",
        commit.unwrap_or_else(|| "unknown".into())
    );
}
