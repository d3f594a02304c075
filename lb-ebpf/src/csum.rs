//! Internet checksum (RFC 1071) of an IPv4 header.

/// Checksum of a 20-byte IPv4 header (options are never written by us) whose
/// `check` field is zero. The header sits in packet memory at an even
/// address, so it is summed as native 16-bit words; the ones' complement sum
/// is byte-order independent and the result is stored back the same way.
///
/// # Safety
/// `hdr` is even and 20 readable bytes follow it.
#[inline(always)]
pub unsafe fn ipv4_header_csum(hdr: *const u16) -> u16 {
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
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}
