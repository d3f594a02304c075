//! Internet checksum (RFC 1071): IPv4 headers, the fold every ones'
//! complement sum ends with, and incremental updates (RFC 1624).
//!
//! Zero has two forms in ones' complement: +0 (0x0000) and -0 (0xffff). A
//! sum of words that are not all zero is never +0, so a checksum computed
//! from scratch is 0xffff only over data that is all zero, and a checksum of
//! 0x0000 over such data does not verify. Checksums computed from scratch
//! here ([`ipv4_header_csum`], [`outer_ipv4_csum`], the ICMP errors) cannot
//! get this wrong; incremental updates can (see [`replace`]).

/// Folds a ones' complement sum (of 16-bit words, any number of them that
/// fits in 64 bits) to 16 bits. The checksum is its complement.
#[inline(always)]
pub fn fold(mut sum: u64) -> u16 {
    sum = (sum & 0xffff_ffff) + (sum >> 32);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// Checksum of a 20-byte IPv4 header (options are never written by us) whose
/// `check` field is zero. The header sits in packet memory at an even
/// address, so it is summed as native 16-bit words; the ones' complement sum
/// is byte-order independent and the result is stored back the same way.
///
/// # Safety
/// `hdr` is even and 20 readable bytes follow it.
#[inline(always)]
pub unsafe fn ipv4_header_csum(hdr: *const u16) -> u16 {
    !unsafe { ipv4_header_sum(hdr) }
}

/// The folded ones' complement sum of a 20-byte IPv4 header as it is, its
/// `check` field included: 0xffff if the header's checksum verifies.
///
/// # Safety
/// As for [`ipv4_header_csum`].
#[inline(always)]
pub unsafe fn ipv4_header_sum(hdr: *const u16) -> u16 {
    let mut sum: u32 = 0;
    // Unrolled: a fixed ten words, no loop for the verifier to bound.
    unsafe {
        sum += *hdr as u32;
        sum += *hdr.add(1) as u32;
        sum += *hdr.add(2) as u32;
        sum += *hdr.add(3) as u32;
        sum += *hdr.add(4) as u32;
        sum += *hdr.add(5) as u32;
        sum += *hdr.add(6) as u32;
        sum += *hdr.add(7) as u32;
        sum += *hdr.add(8) as u32;
        sum += *hdr.add(9) as u32;
    }
    fold(sum as u64)
}

/// Checksum of the outer IPv4 header the balancer writes (version and IHL
/// `vihl`, `tos`, total length `tot_len` as on the wire, id 0, flags `frags` as on
/// the wire, `ttl`, `proto`, addresses as network-order words), computed
/// from the values instead of reading back the header just written (the
/// mixed-width read-back stalls store forwarding); `options`: the sum of
/// the options' 16-bit words (at most a few, so no overflow). Store the result with
/// `to_ne_bytes`, like [`ipv4_header_csum`]'s.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub fn outer_ipv4_csum(
    vihl: u8,
    tos: u8,
    tot_len: [u8; 2],
    frags: [u8; 2],
    ttl: u8,
    proto: u8,
    src: u32,
    dst: u32,
    options: u32,
) -> u16 {
    // The ones' complement sum of the header as native 16-bit words; a
    // u32 summed as its two halves is the same in either byte order.
    let sum = options
        + u16::from_ne_bytes([vihl, tos]) as u32
        + u16::from_ne_bytes(tot_len) as u32
        + u16::from_ne_bytes(frags) as u32
        + u16::from_ne_bytes([ttl, proto]) as u32
        + (src & 0xffff)
        + (src >> 16)
        + (dst & 0xffff)
        + (dst >> 16);
    !fold(sum as u64)
}

/// RFC 1624 incremental update (eqn. 3) of checksum `check` when a 16-bit
/// word of what it covers changes from `old` to `new` (all as stored: the
/// bytes in wire order read natively): `~(~check + ~old + new)`.
///
/// Exactly what a checksum from scratch gives whenever the data it covers
/// cannot be all zero (IP headers, anything with a pseudo-header): the sum
/// is then never +0, and a sum of -0 gives 0x0000 either way. Where the data
/// may be all zero, use [`replace_no_zero`].
#[inline(always)]
pub fn replace(check: u16, old: u16, new: u16) -> u16 {
    !fold((!check) as u64 + (!old) as u64 + new as u64)
}

/// [`replace`] for a checksum over data that may be all zero (ICMPv4: type,
/// code, identifier, sequence and payload can all be 0): a result of 0x0000
/// is written as 0xffff.
///
/// The update cannot tell data that is all zero (from scratch: 0xffff;
/// 0x0000 would not verify) from data that merely sums to -0 (from scratch:
/// 0x0000). 0xffff verifies in both cases, so it is always written; it
/// differs from a checksum from scratch only in the second, where both
/// forms of zero are correct.
#[inline(always)]
pub fn replace_no_zero(check: u16, old: u16, new: u16) -> u16 {
    match replace(check, old, new) {
        0 => 0xffff,
        c => c,
    }
}
