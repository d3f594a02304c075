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

/// Reads the four bytes at `p` as one native word (the bytes in wire order).
///
/// Packet headers behind a 14-byte Ethernet header sit at even, not
/// 4-aligned, offsets; `read_unaligned` would be lowered to four byte loads.
/// Two 16-bit loads are enough: frames start at an even address in every
/// XDP driver (headroom is 256 bytes, plus NET_IP_ALIGN where used).
/// (Letting LLVM emit misaligned 32-bit loads is not an option: it also
/// misaligns stack accesses, which the verifier rejects.)
///
/// # Safety
/// `p` is even and four readable bytes follow it.
#[inline(always)]
pub unsafe fn read_u32_even(p: *const u8) -> u32 {
    let w = p as *const u16;
    let (a, b) = unsafe { (*w, *w.add(1)) };
    let (a, b) = (a.to_ne_bytes(), b.to_ne_bytes());
    u32::from_ne_bytes([a[0], a[1], b[0], b[1]])
}

/// Writes `v` (a native word holding bytes in wire order) at `p`; the
/// counterpart of [`read_u32_even`].
///
/// # Safety
/// `p` is even and four writable bytes follow it.
#[inline(always)]
pub unsafe fn write_u32_even(p: *mut u8, v: u32) {
    let b = v.to_ne_bytes();
    let w = p as *mut u16;
    unsafe {
        *w = u16::from_ne_bytes([b[0], b[1]]);
        *w.add(1) = u16::from_ne_bytes([b[2], b[3]]);
    }
}
