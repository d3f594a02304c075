//! Bounds-checked access to the packet. Every packet read and write goes
//! through these two functions; the comparison against `data_end` is what
//! the verifier needs to see before any access.

use core::mem::size_of;

use aya_ebpf::programs::XdpContext;

/// A pointer to a `T` at `offset` bytes into the packet, if the packet holds
/// all of it.
///
/// `data_end` is read with a volatile load: otherwise LLVM may prove the
/// comparison redundant from an earlier length check (e.g. the IP total
/// length against the frame length) and drop it, and the verifier, which
/// only trusts direct comparisons with `data_end`, rejects the access.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*const T> {
    let start = ctx.data();
    // SAFETY: `ctx.ctx` is the program's context, valid for the whole run.
    let end = unsafe { core::ptr::read_volatile(&(*ctx.ctx).data_end) } as usize;
    if start + offset + size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *const T)
}

/// Mutable variant of [`ptr_at`].
#[inline(always)]
pub fn ptr_at_mut<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
    ptr_at::<T>(ctx, offset).map(|p| p as *mut T)
}

/// Length of the frame in bytes.
#[inline(always)]
pub fn frame_len(ctx: &XdpContext) -> usize {
    ctx.data_end() - ctx.data()
}

/// Reads the four bytes at `p` as one native word (the bytes in wire order),
/// in one load at any alignment.
///
/// Headers behind a 14-byte Ethernet header sit at offsets that are not
/// multiples of four, and LLVM's BPF backend splits a load it cannot prove
/// aligned into byte loads (and its misaligned-access mode also misaligns
/// stack slots, which the verifier rejects). So the load is written in BPF
/// assembly. The verifier allows misaligned packet access on architectures
/// with efficient unaligned access (x86-64, arm64), which is where the
/// balancer runs; elsewhere it refuses the program at load time, with the
/// offending instruction named.
///
/// # Safety
/// Four readable bytes follow `p` (for the verifier: a checked packet
/// pointer).
#[inline(always)]
pub unsafe fn read_u32(p: *const u8) -> u32 {
    #[cfg(target_arch = "bpf")]
    {
        let v: u64;
        unsafe {
            core::arch::asm!(
                "{v} = *(u32 *)({p} + 0)",
                p = in(reg) p,
                v = lateout(reg) v,
                options(pure, readonly, nostack, preserves_flags)
            );
        }
        v as u32
    }
    #[cfg(not(target_arch = "bpf"))]
    unsafe {
        core::ptr::read_unaligned(p as *const u32)
    }
}

/// Writes `v` (a native word holding bytes in wire order) at `p` in one
/// store at any alignment; the counterpart of [`read_u32`].
///
/// # Safety
/// Four writable bytes follow `p`.
#[inline(always)]
pub unsafe fn write_u32(p: *mut u8, v: u32) {
    #[cfg(target_arch = "bpf")]
    unsafe {
        core::arch::asm!(
            "*(u32 *)({p} + 0) = {v}",
            p = in(reg) p,
            v = in(reg) v as u64,
            options(nostack, preserves_flags)
        );
    }
    #[cfg(not(target_arch = "bpf"))]
    unsafe {
        core::ptr::write_unaligned(p as *mut u32, v)
    }
}

/// Writes the eight bytes of `v` (in native order) at `p` in one store at
/// any alignment.
///
/// # Safety
/// Eight writable bytes follow `p`.
#[inline(always)]
pub unsafe fn write_u64(p: *mut u8, v: u64) {
    #[cfg(target_arch = "bpf")]
    unsafe {
        core::arch::asm!(
            "*(u64 *)({p} + 0) = {v}",
            p = in(reg) p,
            v = in(reg) v,
            options(nostack, preserves_flags)
        );
    }
    #[cfg(not(target_arch = "bpf"))]
    unsafe {
        core::ptr::write_unaligned(p as *mut u64, v)
    }
}

/// Reads the 16 bytes of an IPv6 address at `p` as four native words (the
/// bytes in wire order), one load each.
///
/// # Safety
/// Sixteen readable bytes follow `p`.
#[inline(always)]
pub unsafe fn read_addr6(p: *const u8) -> [u32; 4] {
    unsafe {
        [
            read_u32(p),
            read_u32(p.add(4)),
            read_u32(p.add(8)),
            read_u32(p.add(12)),
        ]
    }
}

/// Writes an IPv6 address (four native words holding bytes in wire order)
/// at `p`; the counterpart of [`read_addr6`].
///
/// # Safety
/// Sixteen writable bytes follow `p`.
#[inline(always)]
pub unsafe fn write_addr6(p: *mut u8, a: [u32; 4]) {
    unsafe {
        write_u32(p, a[0]);
        write_u32(p.add(4), a[1]);
        write_u32(p.add(8), a[2]);
        write_u32(p.add(12), a[3]);
    }
}
