//! Running an XDP program through `BPF_PROG_TEST_RUN`.
//!
//! The syscall is made here directly, on a program fd, so a test can run a
//! program from several threads (a cloned fd each) while another thread
//! changes the maps through the `Dataplane`.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use anyhow::{Result, bail};
use aya::programs::Xdp;

/// Verdict and output frame of one run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunResult {
    pub action: u32,
    pub frame: Vec<u8>,
    /// Average ns per iteration as the kernel measured it.
    pub ns: u32,
}

/// The `test` member of `union bpf_attr` (kernel UAPI).
#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    _pad: u32,
}

const BPF_PROG_TEST_RUN: libc::c_long = 10;

/// `struct xdp_md` as `BPF_PROG_TEST_RUN` takes it for `ctx_in`: the frame
/// starts at offset 0 and arrives on `ifindex`, queue 0.
fn xdp_md(frame_len: usize, ifindex: u32) -> [u32; 6] {
    [0, frame_len as u32, 0, ifindex, 0, 0]
}

/// A clone of `prog`'s fd, for running it on another thread.
pub fn program_fd(prog: &Xdp) -> Result<OwnedFd> {
    Ok(prog.fd()?.as_fd().try_clone_to_owned()?)
}

/// Runs `prog` `repeat` times on `frame` as if received on `ifindex` (an
/// interface in the calling thread's network namespace).
pub fn run_xdp(prog: &Xdp, frame: &[u8], ifindex: u32, repeat: u32) -> Result<RunResult> {
    run_xdp_fd(prog.fd()?.as_fd(), frame, ifindex, repeat)
}

/// [`run_xdp`] on a program fd.
pub fn run_xdp_fd(
    prog: BorrowedFd<'_>,
    frame: &[u8],
    ifindex: u32,
    repeat: u32,
) -> Result<RunResult> {
    let ctx = xdp_md(frame.len(), ifindex);
    let mut out = vec![0u8; frame.len() + 256];
    let mut attr = TestRunAttr {
        prog_fd: prog.as_raw_fd() as u32,
        data_size_in: frame.len() as u32,
        data_size_out: out.len() as u32,
        data_in: frame.as_ptr() as u64,
        data_out: out.as_mut_ptr() as u64,
        repeat,
        ctx_size_in: std::mem::size_of_val(&ctx) as u32,
        ctx_in: ctx.as_ptr() as u64,
        ..Default::default()
    };
    // SAFETY: the attr points at live buffers of the sizes given.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_TEST_RUN,
            &mut attr as *mut TestRunAttr,
            std::mem::size_of::<TestRunAttr>(),
        )
    };
    if rc != 0 {
        bail!("BPF_PROG_TEST_RUN: {}", std::io::Error::last_os_error());
    }
    out.truncate(attr.data_size_out as usize);
    Ok(RunResult {
        action: attr.retval,
        frame: out,
        ns: attr.duration,
    })
}
