//! Weighted Maglev consistent hashing (Eisenbud et al., NSDI 2016).
//!
//! Each backend walks its own permutation of the table positions, given by
//! an offset and a skip derived from its address, and claims the next free
//! position on each of its turns. Weights decide how often a backend has a
//! turn: every round each backend earns `weight` credit and takes a turn for
//! every `max_weight` it has saved. Equal weights give the classic
//! algorithm (every backend owns ⌊M/N⌋ or ⌈M/N⌉ entries); unequal weights
//! give shares proportional to the weights, off by at most one turn per
//! backend.
//!
//! Backends are sorted by address before the build, so the table depends
//! only on the set of (address, weight) pairs: every balancer given the same
//! config builds the same table. Integer arithmetic only, so no platform
//! rounding can make two hosts disagree. Memory is O(M + N): the permutations
//! are generated on the fly, never stored as an M x N matrix.
//!
//! The builder is part of the compatibility promise with the flow hash
//! (`lb_common::FLOW_HASH_VERSION`): balancers of two builds must build the
//! same table from the same backends, or a rolling upgrade behind ECMP
//! moves flows. Golden tables pin it (`tables_are_pinned_by_golden_values`).

use std::net::IpAddr;

use lb_common::{NO_BACKEND, mix64};

/// A backend as the builder sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaglevBackend {
    /// The stable key: the backend's address.
    pub addr: IpAddr,
    /// Relative share; 0 = no entries.
    pub weight: u32,
    /// What the table stores for this backend (its data plane id).
    pub id: u32,
}

/// A Maglev lookup table: position → backend id ([`NO_BACKEND`] when no
/// backend has weight).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MaglevTable {
    entries: Vec<u32>,
}

struct Walker {
    id: u32,
    weight: u64,
    credit: u64,
    pos: u64,
    skip: u64,
}

const OFFSET_SEED: u64 = 0x6d61_676c_6576_6f66;
const SKIP_SEED: u64 = 0x6d61_676c_6576_736b;

fn key_hash(addr: &IpAddr, seed: u64) -> u64 {
    let octets = match addr {
        IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
        IpAddr::V6(a) => a.octets(),
    };
    let hi = u64::from_be_bytes(octets[..8].try_into().expect("8 bytes"));
    let lo = u64::from_be_bytes(octets[8..].try_into().expect("8 bytes"));
    mix64(mix64(seed ^ hi) ^ lo)
}

impl MaglevTable {
    /// Builds the table of `size` entries. `size` must be prime (so every
    /// skip generates a full permutation) and larger than the number of
    /// backends with weight; addresses must be unique.
    pub fn build(backends: &[MaglevBackend], size: u32) -> MaglevTable {
        let m = u64::from(size);
        assert!(m >= 2, "Maglev table size {size} is too small");
        let mut sorted: Vec<&MaglevBackend> = backends.iter().filter(|b| b.weight > 0).collect();
        sorted.sort_by_key(|b| b.addr);
        debug_assert!(
            sorted.windows(2).all(|w| w[0].addr != w[1].addr),
            "duplicate backend address"
        );

        let mut entries = vec![NO_BACKEND; size as usize];
        if sorted.is_empty() {
            return MaglevTable { entries };
        }
        let max_weight = sorted
            .iter()
            .map(|b| u64::from(b.weight))
            .max()
            .expect("non-empty");
        let mut walkers: Vec<Walker> = sorted
            .iter()
            .map(|b| Walker {
                id: b.id,
                weight: u64::from(b.weight),
                credit: 0,
                pos: key_hash(&b.addr, OFFSET_SEED) % m,
                skip: key_hash(&b.addr, SKIP_SEED) % (m - 1) + 1,
            })
            .collect();

        let mut filled = 0u64;
        loop {
            for w in walkers.iter_mut() {
                w.credit += w.weight;
                if w.credit < max_weight {
                    continue;
                }
                w.credit -= max_weight;
                // Claim the next free position of this backend's permutation
                // (pos + skip < 2m: a subtraction, not a division, per step;
                // the probing is most of the build).
                let step = |pos: u64| {
                    let next = pos + w.skip;
                    if next >= m { next - m } else { next }
                };
                while entries[w.pos as usize] != NO_BACKEND {
                    w.pos = step(w.pos);
                }
                entries[w.pos as usize] = w.id;
                w.pos = step(w.pos);
                filled += 1;
                if filled == m {
                    return MaglevTable { entries };
                }
            }
        }
    }

    /// A smooth weighted round-robin sequence of `size` entries, for the
    /// `wrr` scheduler (the data plane walks it, one entry per new flow).
    /// Each backend gets entries in proportion to its weight (largest
    /// remainder, ties to the lower address), spread evenly: its `k`-th of
    /// `n` entries sits at virtual time `(k + 1/2) / n`, and the sequence is
    /// the entries in virtual-time order. Any window of the sequence holds
    /// each backend's share to within an entry or two; no backend gets a
    /// burst.
    pub fn smooth_wrr(backends: &[MaglevBackend], size: u32) -> MaglevTable {
        let mut sorted: Vec<&MaglevBackend> = backends.iter().filter(|b| b.weight > 0).collect();
        sorted.sort_by_key(|b| b.addr);
        if sorted.is_empty() {
            return MaglevTable {
                entries: vec![NO_BACKEND; size as usize],
            };
        }
        let total: u64 = sorted.iter().map(|b| u64::from(b.weight)).sum();
        let m = u64::from(size);
        let mut counts: Vec<u64> = sorted
            .iter()
            .map(|b| m * u64::from(b.weight) / total)
            .collect();
        let mut by_remainder: Vec<usize> = (0..sorted.len()).collect();
        by_remainder.sort_by_key(|&i| std::cmp::Reverse(m * u64::from(sorted[i].weight) % total));
        let short = m - counts.iter().sum::<u64>();
        for &i in by_remainder.iter().take(short as usize) {
            counts[i] += 1;
        }
        let mut slots: Vec<(f64, usize)> = Vec::with_capacity(size as usize);
        for (i, &n) in counts.iter().enumerate() {
            for k in 0..n {
                slots.push(((k as f64 + 0.5) / n as f64, i));
            }
        }
        slots.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        MaglevTable {
            entries: slots.into_iter().map(|(_, i)| sorted[i].id).collect(),
        }
    }

    /// A table with these entries (one read back from the data plane).
    pub fn from_entries(entries: Vec<u32>) -> MaglevTable {
        MaglevTable { entries }
    }

    /// The backend id at each position.
    pub fn entries(&self) -> &[u32] {
        &self.entries
    }

    /// Number of positions owned by backend `id`.
    pub fn share(&self, id: u32) -> usize {
        self.entries.iter().filter(|&&e| e == id).count()
    }

    /// Number of positions each backend id owns (one pass over the table).
    pub fn counts(&self) -> std::collections::HashMap<u32, usize> {
        // Counted in a vector indexed by id (ids are below 2^20), then
        // collected: hashing every entry was most of a table's rebuild.
        let max = self
            .entries
            .iter()
            .filter(|&&e| e != NO_BACKEND)
            .max()
            .copied();
        let mut by_id = vec![0usize; max.map_or(0, |m| m as usize + 1)];
        let mut none = 0;
        for &e in &self.entries {
            match by_id.get_mut(e as usize) {
                Some(n) if e != NO_BACKEND => *n += 1,
                _ => none += 1,
            }
        }
        let mut out: std::collections::HashMap<u32, usize> = by_id
            .into_iter()
            .enumerate()
            .filter(|(_, n)| *n > 0)
            .map(|(id, n)| (id as u32, n))
            .collect();
        if none > 0 {
            out.insert(NO_BACKEND, none);
        }
        out
    }
}

/// Whether `n` is prime (trial division; table sizes are at most ~2^24).
pub fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    if n.is_multiple_of(2) {
        return n == 2;
    }
    let mut d = 3u32;
    while u64::from(d) * u64::from(d) <= u64::from(n) {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 2;
    }
    true
}

#[cfg(test)]
mod tests {

    /// Golden values: if this fails, the builder changed and balancers of
    /// this build and earlier ones build different tables from one config.
    /// That is allowed only as a new `lb_common::FLOW_HASH_VERSION`.
    #[test]
    fn tables_are_pinned_by_golden_values() {
        let backends: Vec<MaglevBackend> = [
            ("10.0.0.1", 100),
            ("10.0.0.2", 200),
            ("10.0.0.3", 100),
            ("2001:db8::5", 50),
            ("10.0.0.9", 0),
        ]
        .iter()
        .enumerate()
        .map(|(i, (a, w))| MaglevBackend {
            addr: a.parse().unwrap(),
            weight: *w,
            id: i as u32,
        })
        .collect();
        let t = MaglevTable::build(&backends, 65537);
        let mut fnv: u64 = 0xcbf2_9ce4_8422_2325;
        for b in t.entries().iter().flat_map(|e| e.to_le_bytes()) {
            fnv = (fnv ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
        assert_eq!(
            &t.entries()[..16],
            &[0, 0, 0, 0, 1, 3, 2, 2, 2, 1, 1, 2, 1, 3, 1, 1]
        );
        let mut counts: Vec<(u32, usize)> = t.counts().into_iter().collect();
        counts.sort();
        assert_eq!(counts, [(0, 14564), (1, 29128), (2, 14564), (3, 7281)]);
        assert_eq!(fnv, 0x5f1c_b326_d6de_0ca6, "FNV-1a of the table's entries");
        let equal: Vec<MaglevBackend> = backends[..3]
            .iter()
            .map(|b| MaglevBackend { weight: 1, ..*b })
            .collect();
        assert_eq!(
            MaglevTable::build(&equal, 13).entries(),
            &[0, 1, 1, 2, 2, 1, 0, 2, 2, 0, 0, 1, 0]
        );
    }

    #[test]
    fn smooth_wrr_keeps_the_weights_in_every_window() {
        let backends: Vec<MaglevBackend> = [1u32, 2, 3]
            .iter()
            .enumerate()
            .map(|(i, &w)| MaglevBackend {
                addr: IpAddr::from([10, 0, 0, i as u8 + 1]),
                weight: w,
                id: i as u32,
            })
            .collect();
        let t = MaglevTable::smooth_wrr(&backends, 65537);
        assert_eq!(t.entries().len(), 65537);
        let total: Vec<usize> = (0..3).map(|id| t.share(id)).collect();
        assert_eq!(total.iter().sum::<usize>(), 65537);
        for (id, w) in [(0, 1.0), (1, 2.0), (2, 3.0)] {
            let want = 65537.0 * w / 6.0;
            assert!((total[id] as f64 - want).abs() <= 1.0, "{id}: {total:?}");
        }
        // Any 60 consecutive new flows: 10, 20 and 30 of them, give or take 2.
        for start in (0..65000).step_by(997) {
            let window = &t.entries()[start..start + 60];
            for (id, want) in [(0u32, 10i64), (1, 20), (2, 30)] {
                let got = window.iter().filter(|&&e| e == id).count() as i64;
                assert!(
                    (got - want).abs() <= 2,
                    "window at {start}: backend {id} got {got}"
                );
            }
        }
        // Without weight: no backend.
        let none = MaglevTable::smooth_wrr(&[], 7);
        assert!(none.entries().iter().all(|&e| e == NO_BACKEND));
    }

    use std::collections::HashMap;

    use super::*;

    const M: u32 = 65537;

    fn backends(weights: &[u32]) -> Vec<MaglevBackend> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &weight)| MaglevBackend {
                addr: IpAddr::V4([10, (i >> 16) as u8, (i >> 8) as u8, i as u8].into()),
                weight,
                id: i as u32,
            })
            .collect()
    }

    fn counts(t: &MaglevTable) -> HashMap<u32, usize> {
        let mut c = HashMap::new();
        for &e in t.entries() {
            *c.entry(e).or_default() += 1;
        }
        c
    }

    #[test]
    fn equal_weights_give_every_backend_floor_or_ceil_of_m_over_n() {
        for n in [10usize, 100, 1000] {
            let t = MaglevTable::build(&backends(&vec![1; n]), M);
            let c = counts(&t);
            assert_eq!(c.len(), n, "every backend owns entries (n={n})");
            let (lo, hi) = (M as usize / n, (M as usize).div_ceil(n));
            for (id, &k) in &c {
                assert!(
                    k == lo || k == hi,
                    "n={n}: backend {id} owns {k}, expected {lo} or {hi}"
                );
            }
        }
    }

    #[test]
    fn weights_one_two_three_give_proportional_shares() {
        let t = MaglevTable::build(&backends(&[1, 2, 3]), M);
        let c = counts(&t);
        for (id, want) in [(0u32, 1.0 / 6.0), (1, 2.0 / 6.0), (2, 3.0 / 6.0)] {
            let got = c[&id] as f64 / f64::from(M);
            assert!(
                (got - want).abs() < 0.005,
                "backend {id}: share {got:.4}, want {want:.4}"
            );
        }
    }

    #[test]
    fn large_and_uneven_weights_stay_proportional() {
        let t = MaglevTable::build(&backends(&[100, 250, 1000, 65535]), M);
        let c = counts(&t);
        let total = 100.0 + 250.0 + 1000.0 + 65535.0;
        for (id, w) in [(0u32, 100.0), (1, 250.0), (2, 1000.0), (3, 65535.0)] {
            let got = c.get(&id).copied().unwrap_or(0) as f64 / f64::from(M);
            assert!(
                (got - w / total).abs() < 0.005,
                "backend {id}: share {got:.4}"
            );
        }
    }

    #[test]
    fn zero_weight_gets_no_share() {
        let t = MaglevTable::build(&backends(&[1, 0, 1]), M);
        assert_eq!(t.share(1), 0);
        assert_eq!(t.share(0) + t.share(2), M as usize);
    }

    #[test]
    fn no_weight_at_all_gives_an_empty_table() {
        for w in [vec![], vec![0, 0]] {
            let t = MaglevTable::build(&backends(&w), M);
            assert!(t.entries().iter().all(|&e| e == NO_BACKEND));
        }
    }

    #[test]
    fn removing_one_of_a_hundred_moves_few_other_entries() {
        let all = backends(&vec![1; 100]);
        let before = MaglevTable::build(&all, M);
        let after = MaglevTable::build(&all[1..], M);
        // Entries that belonged to a surviving backend but now belong to another.
        let moved = before
            .entries()
            .iter()
            .zip(after.entries())
            .filter(|(b, a)| **b != 0 && b != a)
            .count();
        let limit = (f64::from(M) * 0.015) as usize;
        assert!(
            moved <= limit,
            "{moved} entries moved among survivors, limit {limit}"
        );
        // And the removed backend's entries all went somewhere.
        assert_eq!(after.share(0), 0);
    }

    #[test]
    fn input_order_does_not_change_the_table() {
        let mut bs = backends(&[3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5]);
        let t1 = MaglevTable::build(&bs, M);
        bs.reverse();
        bs.swap(2, 7);
        let t2 = MaglevTable::build(&bs, M);
        assert_eq!(t1, t2);
    }

    #[test]
    fn primes_are_recognised() {
        assert!(is_prime(65537) && is_prime(2) && is_prime(7) && is_prime(16_777_213));
        assert!(
            !is_prime(65536) && !is_prime(1) && !is_prime(0) && !is_prime(65535) && !is_prime(9)
        );
    }
}
