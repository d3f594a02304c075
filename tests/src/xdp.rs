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

const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_MAP_GET_FD_BY_ID: libc::c_long = 14;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_OBJ_GET: libc::c_long = 7;

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<i64> {
    // SAFETY: `attr` is a valid `bpf_attr` prefix for `cmd`; its pointers
    // point at live buffers.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T,
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// An fd of the BPF object (a link) pinned at `path`.
pub fn pinned_fd(path: &std::path::Path) -> Result<OwnedFd> {
    #[repr(C)]
    #[derive(Default)]
    struct Attr {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
        path_fd: i32,
        _pad: u32,
    }
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())?;
    let mut attr = Attr {
        pathname: c.as_ptr() as u64,
        ..Default::default()
    };
    let fd = bpf(BPF_OBJ_GET, &mut attr)?;
    // SAFETY: a new fd we own.
    Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) })
}

/// The program a link runs now (an fd of it), from the link's fd: a link
/// keeps its fd when its program is replaced, so this follows the swaps.
pub fn link_program(link: BorrowedFd<'_>) -> Result<OwnedFd> {
    let id = link_program_id(link)?;
    #[repr(C)]
    #[derive(Default)]
    struct IdAttr {
        id: u32,
        next_id: u32,
        open_flags: u32,
        _pad: u32,
    }
    let mut attr = IdAttr {
        id,
        ..Default::default()
    };
    let fd = bpf(BPF_PROG_GET_FD_BY_ID, &mut attr)?;
    // SAFETY: a new fd we own.
    Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) })
}

/// The kernel id of the program a link runs now.
pub fn link_program_id(link: BorrowedFd<'_>) -> Result<u32> {
    #[repr(C)]
    #[derive(Default)]
    struct LinkInfo {
        kind: u32,
        id: u32,
        prog_id: u32,
        _rest: [u32; 29],
    }
    #[repr(C)]
    #[derive(Default)]
    struct InfoAttr {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    let mut info = LinkInfo::default();
    let mut attr = InfoAttr {
        bpf_fd: link.as_raw_fd() as u32,
        info_len: std::mem::size_of::<LinkInfo>() as u32,
        info: &mut info as *mut LinkInfo as u64,
    };
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    Ok(info.prog_id)
}

/// Whether a map with kernel id `id` still exists.
pub fn map_exists(id: u32) -> bool {
    #[repr(C)]
    #[derive(Default)]
    struct IdAttr {
        id: u32,
        next_id: u32,
        open_flags: u32,
        _pad: u32,
    }
    let mut attr = IdAttr {
        id,
        ..Default::default()
    };
    match bpf(BPF_MAP_GET_FD_BY_ID, &mut attr) {
        Ok(fd) => {
            // SAFETY: a new fd we own; closed at once.
            drop(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) });
            true
        }
        Err(_) => false,
    }
}
