//! `cargo xtask lab clean`: removes leftovers of lab runs that could not
//! clean up (killed with SIGKILL, machine crash). Every namespace the tests,
//! the demo and the benchmarks create is named `lbt-*`, and so is every
//! pinned lbd instance under /sys/fs/bpf.

use std::process::Command;

use anyhow::{Context, Result};

const PREFIX: &str = "lbt-";

/// Deletes every `lbt-*` namespace (killing its processes first) and the
/// matching temp directories.
pub fn clean() -> Result<()> {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .context("running ip netns list")?;
    let names: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(PREFIX))
        .map(str::to_string)
        .collect();
    for name in &names {
        let pids = Command::new("ip").args(["netns", "pids", name]).output()?;
        for pid in String::from_utf8_lossy(&pids.stdout).split_whitespace() {
            let _ = Command::new("kill").args(["-9", pid]).status();
        }
        let _ = Command::new("ip").args(["netns", "del", name]).status();
        println!("removed network namespace {name}");
    }
    // lbd leaves its state pinned on exit; labs name their instance lbt-*.
    let mut pinned = 0;
    if let Ok(entries) = std::fs::read_dir("/sys/fs/bpf") {
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().starts_with(PREFIX) {
                for f in std::fs::read_dir(entry.path())?.flatten() {
                    let _ = std::fs::remove_file(f.path());
                }
                let _ = std::fs::remove_dir(entry.path());
                println!("removed pinned balancer state {}", entry.path().display());
                pinned += 1;
            }
        }
    }
    let mut dirs = 0;
    for entry in std::fs::read_dir(std::env::temp_dir())?.flatten() {
        if entry.file_name().to_string_lossy().starts_with(PREFIX) {
            let _ = std::fs::remove_dir_all(entry.path());
            dirs += 1;
        }
    }
    println!(
        "lab clean: {} namespaces, {pinned} pinned balancer states, {dirs} temp directories removed",
        names.len()
    );
    Ok(())
}
