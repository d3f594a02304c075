//! Running an XDP program once through `BPF_PROG_TEST_RUN`.

use anyhow::{Context, Result};
use aya::programs::{TestRun, TestRunOptions, Xdp};

/// Verdict and output frame of one run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunResult {
    pub action: u32,
    pub frame: Vec<u8>,
    /// Average ns per iteration as the kernel measured it.
    pub ns: u32,
}

/// `struct xdp_md` as `BPF_PROG_TEST_RUN` takes it for `ctx_in`: the frame
/// starts at offset 0 and arrives on `ifindex`, queue 0.
fn xdp_md(frame_len: usize, ifindex: u32) -> [u8; 24] {
    let fields: [u32; 6] = [0, frame_len as u32, 0, ifindex, 0, 0];
    let mut out = [0u8; 24];
    for (i, f) in fields.iter().enumerate() {
        out[i * 4..i * 4 + 4].copy_from_slice(&f.to_ne_bytes());
    }
    out
}

/// Runs `prog` `repeat` times on `frame` as if received on `ifindex` (an
/// interface in the calling thread's network namespace).
pub fn run_xdp(prog: &Xdp, frame: &[u8], ifindex: u32, repeat: u32) -> Result<RunResult> {
    let ctx = xdp_md(frame.len(), ifindex);
    let mut out = vec![0u8; frame.len() + 256];
    let r = prog
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ctx_in: Some(&ctx),
            repeat,
            ..Default::default()
        })
        .context("BPF_PROG_TEST_RUN")?;
    out.truncate(r.data_size_out as usize);
    Ok(RunResult {
        action: r.return_value,
        frame: out,
        ns: r.duration.as_nanos() as u32,
    })
}
