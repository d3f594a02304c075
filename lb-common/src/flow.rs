//! The flow key and the one hash the data plane computes per packet.
//!
//! User space uses the same function to predict where a flow goes (tests,
//! `lbctl`), and every balancer computes the same value for the same flow,
//! which is what lets several balancers behind ECMP agree on a backend.
//!
//! The hash is part of the compatibility promise, with the Maglev table
//! builder: two builds that hash a flow differently send it to different
//! backends, so balancers of mixed builds behind ECMP (a rolling upgrade)
//! would break the connections ECMP moves between them. Golden values pin
//! [`flow_hash64`], [`source_hash`] and [`maglev_position`]
//! (`the_hash_is_pinned_by_golden_values`); a change to any of them is a
//! new [`FLOW_HASH_VERSION`], and the build that makes it must keep the
//! previous hash selectable until every balancer of a fleet runs it (see
//! docs/operations.md).

use core::mem::size_of;

use crate::FAMILY_V4;

/// A flow: the 5-tuple of a packet as it sits on the wire.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// Source address words (network order, see the crate docs).
    pub src: [u32; 4],
    /// Destination address words.
    pub dst: [u32; 4],
    /// Source and destination port as the four bytes on the wire, read as one
    /// native-endian word; see [`FlowKey::ports`].
    pub ports: u32,
    /// IP protocol.
    pub proto: u8,
    /// `FAMILY_V4` or `FAMILY_V6`.
    pub family: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(size_of::<FlowKey>() == 40);

impl FlowKey {
    /// The `ports` word for host-order `sport` and `dport`.
    #[inline]
    pub const fn ports(sport: u16, dport: u16) -> u32 {
        let s = sport.to_be_bytes();
        let d = dport.to_be_bytes();
        u32::from_ne_bytes([s[0], s[1], d[0], d[1]])
    }

    /// The destination port as it sits on the wire (network byte order).
    #[inline(always)]
    pub const fn dport_raw(&self) -> u16 {
        let b = self.ports.to_ne_bytes();
        u16::from_ne_bytes([b[2], b[3]])
    }
}

/// Version of the flow hash and the Maglev builder (see the module docs).
pub const FLOW_HASH_VERSION: u32 = 1;

const K: u64 = 0x9E37_79B9_7F4A_7C15;
const SEED: u64 = 0x6C62_2D66_6C6F_7721;
const SEED_B: u64 = 0x9A3C_5E71_D2B4_0F87;

/// The murmur3 64-bit finaliser: a bijection with full avalanche.
#[inline(always)]
pub const fn mix64(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xFF51_AFD7_ED55_8CCD);
    h ^= h >> 33;
    h = h.wrapping_mul(0xC4CE_B9FE_1A85_EC53);
    h ^= h >> 33;
    h
}

#[inline(always)]
const fn absorb(h: u64, w: u64) -> u64 {
    let h = (h ^ w).wrapping_mul(K);
    h ^ (h >> 32)
}

#[inline(always)]
const fn pair(a: u32, b: u32) -> u64 {
    ((a as u64) << 32) | b as u64
}

/// Hash of a flow: fixed cost, no loops, no tables. The Maglev entry of a
/// flow is [`maglev_position`] of it; it is the high half of
/// [`flow_hash64`].
#[inline(always)]
pub const fn flow_hash(k: &FlowKey) -> u32 {
    (flow_hash64(k) >> 32) as u32
}

/// The 64-bit hash of a flow, the one hash the data plane computes per
/// packet: its high 32 bits are [`flow_hash`] (Maglev, the IPv6 flow
/// label, the connection-table tag), its low bits pick the flow's
/// connection-table set.
#[inline(always)]
pub const fn flow_hash64(k: &FlowKey) -> u64 {
    let mut a = SEED ^ ((k.proto as u64) << 8 | k.family as u64);
    if k.family == FAMILY_V4 {
        // The addresses fill one word: two steps, then the finaliser. (The
        // data plane's IPv4 path knows the family, so this is all it runs.)
        a = absorb(a, pair(k.src[0], k.dst[0]));
        return mix64(absorb(a, k.ports as u64));
    }
    // Two independent lanes, so the CPU runs their multiplies side by side
    // (three in a row instead of five before the finaliser); the
    // finaliser mixes them into every bit.
    a = absorb(a, pair(k.src[0], k.src[1]));
    a = absorb(a, pair(k.dst[0], k.dst[1]));
    a = absorb(a, k.ports as u64);
    let mut b = SEED_B;
    b = absorb(b, pair(k.src[2], k.src[3]));
    b = absorb(b, pair(k.dst[2], k.dst[3]));
    mix64(a ^ b.rotate_left(32))
}

/// Hash of a flow's source: its address, and with `with_port` its source
/// port. Every flow of one client (to any port of any VIP with this
/// scheduler) hashes the same, so it reaches the same backend.
#[inline(always)]
pub const fn source_hash(k: &FlowKey, with_port: bool) -> u32 {
    let mut h = SEED ^ 0x5352_4300 ^ k.family as u64;
    h = absorb(h, pair(k.src[0], k.src[1]));
    h = absorb(h, pair(k.src[2], k.src[3]));
    if with_port {
        let p = k.ports.to_ne_bytes();
        h = absorb(h, u16::from_ne_bytes([p[0], p[1]]) as u64);
    }
    (mix64(h) >> 32) as u32
}

/// The hash of a flow's second choice (least-load): the halves of `hash`
/// swapped, so its position (taken from the high bits) comes from the bits
/// the first one did not use.
#[inline(always)]
pub const fn second_choice(hash: u32) -> u32 {
    hash.rotate_left(16)
}

/// The Maglev table position of a flow hash in a table of `size` entries:
/// `hash * size / 2^32`, a uniform map onto `0..size` with a multiply and a
/// shift instead of a division (which costs ~10 ns per packet).
#[inline(always)]
pub const fn maglev_position(hash: u32, size: u32) -> u32 {
    ((hash as u64 * size as u64) >> 32) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maglev_position_stays_in_the_table() {
        for size in [7u32, 65537, 16_777_213] {
            assert_eq!(maglev_position(0, size), 0);
            assert_eq!(maglev_position(u32::MAX, size), size - 1);
        }
    }

    #[test]
    fn source_hash_ignores_all_but_the_source() {
        let a = FlowKey {
            src: [7, 0, 0, 0],
            dst: [2, 0, 0, 0],
            ports: FlowKey::ports(1000, 80),
            proto: 6,
            family: 4,
            _pad: [0; 2],
        };
        let other_dst = FlowKey {
            dst: [3, 0, 0, 0],
            ports: FlowKey::ports(1000, 443),
            proto: 17,
            ..a
        };
        let other_sport = FlowKey {
            ports: FlowKey::ports(1001, 80),
            ..a
        };
        assert_eq!(source_hash(&a, false), source_hash(&other_dst, false));
        assert_eq!(source_hash(&a, false), source_hash(&other_sport, false));
        assert_eq!(source_hash(&a, true), source_hash(&other_dst, true));
        assert_ne!(source_hash(&a, true), source_hash(&other_sport, true));
        assert_ne!(
            source_hash(&a, false),
            source_hash(
                &FlowKey {
                    src: [8, 0, 0, 0],
                    ..a
                },
                false
            )
        );
    }

    #[test]
    fn ports_word_is_wire_order() {
        assert_eq!(
            FlowKey::ports(0x1234, 0xabcd).to_ne_bytes(),
            [0x12, 0x34, 0xab, 0xcd]
        );
    }

    #[test]
    fn every_field_changes_the_hash() {
        let base = FlowKey {
            src: [1, 0, 0, 0],
            dst: [2, 0, 0, 0],
            ports: FlowKey::ports(1000, 80),
            proto: 6,
            family: 4,
            _pad: [0; 2],
        };
        let h = flow_hash(&base);
        let variants = [
            FlowKey {
                src: [3, 0, 0, 0],
                ..base
            },
            FlowKey {
                dst: [5, 0, 0, 0],
                ..base
            },
            FlowKey {
                ports: FlowKey::ports(1001, 80),
                ..base
            },
            FlowKey {
                ports: FlowKey::ports(1000, 81),
                ..base
            },
            FlowKey { proto: 17, ..base },
            FlowKey { family: 6, ..base },
        ];
        for v in variants {
            assert_ne!(flow_hash(&v), h, "{v:?}");
        }
        // IPv6: every address word counts. (An IPv4 key's upper words are
        // zero by definition and not hashed.)
        let base6 = FlowKey { family: 6, ..base };
        let h6 = flow_hash(&base6);
        for i in 0..4 {
            let mut src = base6;
            src.src[i] ^= 0x100;
            let mut dst = base6;
            dst.dst[i] ^= 0x100;
            assert_ne!(flow_hash(&src), h6, "{src:?}");
            assert_ne!(flow_hash(&dst), h6, "{dst:?}");
        }
    }

    #[test]
    fn hash_spreads_sequential_ports_evenly() {
        // 64 buckets, 64k flows differing only in the source port.
        let mut buckets = [0u32; 64];
        for p in 0..65536u32 {
            let k = FlowKey {
                src: [0x0a00_0001, 0, 0, 0],
                dst: [0x0a00_0002, 0, 0, 0],
                ports: FlowKey::ports(p as u16, 443),
                proto: 6,
                family: 4,
                _pad: [0; 2],
            };
            buckets[(flow_hash(&k) % 64) as usize] += 1;
        }
        for b in buckets {
            assert!((900..1150).contains(&b), "bucket {b} of expected 1024");
        }
    }

    /// Golden values: if this fails, the hash changed, and flows of the
    /// same 5-tuple go elsewhere than with earlier builds. That is allowed
    /// only as a new `FLOW_HASH_VERSION` (see the module docs).
    #[test]
    fn the_hash_is_pinned_by_golden_values() {
        let w = |a: [u8; 4]| [u32::from_ne_bytes(a), 0, 0, 0];
        let w6 = |a: [u16; 8]| {
            let mut o = [0u8; 16];
            for (i, x) in a.iter().enumerate() {
                o[i * 2..i * 2 + 2].copy_from_slice(&x.to_be_bytes());
            }
            let g = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            [g(0), g(4), g(8), g(12)]
        };
        let v4 = FlowKey {
            src: w([198, 51, 100, 7]),
            dst: w([203, 0, 113, 10]),
            ports: FlowKey::ports(40000, 443),
            proto: 6,
            family: 4,
            _pad: [0; 2],
        };
        let v6 = FlowKey {
            src: w6([0x2001, 0xdb8, 1, 0, 0, 0, 0, 7]),
            dst: w6([0x2001, 0xdb8, 0x10, 0, 0, 0, 0, 1]),
            family: 6,
            ..v4
        };
        let cases = [
            (
                "v4",
                v4,
                0xd683_8c2e_c5aa_1c41u64,
                0x8794_2635u32,
                0xd20b_32cfu32,
            ),
            (
                "v4 src",
                FlowKey {
                    src: w([198, 51, 100, 8]),
                    ..v4
                },
                0x9a80_6944_8925_1189,
                0x0431_5790,
                0x58e2_3097,
            ),
            (
                "v4 dst",
                FlowKey {
                    dst: w([203, 0, 113, 11]),
                    ..v4
                },
                0x52de_2fdb_0e0c_b313,
                0x8794_2635,
                0xd20b_32cf,
            ),
            (
                "v4 sport",
                FlowKey {
                    ports: FlowKey::ports(40001, 443),
                    ..v4
                },
                0x228f_6a55_c8ce_19f1,
                0x8794_2635,
                0x3fbf_0e2f,
            ),
            (
                "v4 dport",
                FlowKey {
                    ports: FlowKey::ports(40000, 80),
                    ..v4
                },
                0xd193_c7c4_08fc_f676,
                0x8794_2635,
                0xd20b_32cf,
            ),
            (
                "v4 udp",
                FlowKey { proto: 17, ..v4 },
                0x62ee_e8cd_3423_1849,
                0x8794_2635,
                0xd20b_32cf,
            ),
            ("v6", v6, 0x8ea4_ba69_129f_a685, 0xec8a_9b95, 0x0676_850d),
            (
                "v6 src",
                FlowKey {
                    src: w6([0x2001, 0xdb8, 1, 0, 0, 0, 0, 8]),
                    ..v6
                },
                0xf243_70e2_9af9_4c25,
                0xa8a2_f472,
                0x18cd_9d7a,
            ),
            (
                "v6 dst",
                FlowKey {
                    dst: w6([0x2001, 0xdb8, 0x10, 0, 0, 0, 0, 2]),
                    ..v6
                },
                0x24c7_3bcf_6771_7bf7,
                0xec8a_9b95,
                0x0676_850d,
            ),
            (
                "v6 sport",
                FlowKey {
                    ports: FlowKey::ports(40001, 443),
                    ..v6
                },
                0xe366_0904_5ba3_3b09,
                0xec8a_9b95,
                0x07d4_0b8a,
            ),
            (
                "v6 dport",
                FlowKey {
                    ports: FlowKey::ports(40000, 80),
                    ..v6
                },
                0xa74b_2da1_0fe5_c7fd,
                0xec8a_9b95,
                0x0676_850d,
            ),
            (
                "v6 udp",
                FlowKey { proto: 17, ..v6 },
                0x3cc3_89a7_0d2f_b13f,
                0xec8a_9b95,
                0x0676_850d,
            ),
        ];
        for (name, k, hash, src, src_port) in cases {
            assert_eq!(flow_hash64(&k), hash, "flow_hash64, {name}");
            assert_eq!(source_hash(&k, false), src, "source_hash, {name}");
            assert_eq!(
                source_hash(&k, true),
                src_port,
                "source_hash with port, {name}"
            );
        }
        assert_eq!(FLOW_HASH_VERSION, 1);
        assert_eq!(maglev_position(0xd683_8c2e, 65537), 54_916);
        assert_eq!(second_choice(0xd683_8c2e), 0x8c2e_d683);
    }
}
