//! `cargo xtask fuzz --frames N`: drives both XDP programs through
//! `BPF_PROG_TEST_RUN` with N generated hostile frames each (see
//! `lb_tests::fuzz`), prints what it found and merges `fuzz.frames`,
//! `fuzz.aborted`, `fuzz.bad_forwards`, `fuzz.counter_mismatch` (and the
//! decapsulator's as `fuzz.decap.*`) into RESULTS_JSON. Exits 1 if anything
//! went wrong.
//!
//! Usage: lb-fuzz RESULTS_JSON FRAMES [SEED]

use std::{collections::BTreeMap, path::PathBuf, process::ExitCode};

use anyhow::{Context, Result, bail};
use lb_tests::fuzz;

fn main() -> Result<ExitCode> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [out, frames, rest @ ..] = args.as_slice() else {
        bail!("usage: lb-fuzz RESULTS_JSON FRAMES [SEED]");
    };
    let frames: u64 = frames
        .parse()
        .with_context(|| format!("FRAMES: {frames:?} is not a number"))?;
    let seed: u64 = match rest.first() {
        Some(s) => s
            .parse()
            .with_context(|| format!("SEED: {s:?} is not a number"))?,
        None => 0x5eed,
    };
    lb_tests::pin_to_cpu(0);
    let mut results = BTreeMap::new();
    let mut clean = true;
    for (prefix, report) in [
        ("fuzz", fuzz::balancer(frames, seed)?),
        ("fuzz.decap", fuzz::decapsulator(frames, seed ^ 0xdeca)?),
    ] {
        println!(
            "{prefix}: {} frames ({} transmitted, {} passed, {} dropped): {} aborted, {} bad forwards, {} changed passes, {} counter mismatches",
            report.frames,
            report.transmitted,
            report.passed,
            report.dropped,
            report.aborted,
            report.bad_forwards,
            report.bad_passes,
            report.counter_mismatch
        );
        for e in &report.examples {
            println!("  {e}");
        }
        clean &= report.clean();
        for (key, value) in [
            ("frames", report.frames),
            ("aborted", report.aborted),
            ("bad_forwards", report.bad_forwards + report.bad_passes),
            ("counter_mismatch", report.counter_mismatch),
        ] {
            results.insert(format!("{prefix}.{key}"), value as f64);
        }
    }
    lb_tests::merge_results(&PathBuf::from(out), &results)?;
    Ok(if clean {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
