//! Active flows per backend, for the schedulers that need them
//! (`least-conn`, and `maglev-src` with a `load_cap`).
//!
//! Counting: `lbd` sweeps the connection and handshake tables every
//! `conntrack.sweep_interval` and counts, per backend id, the entries that
//! are live (not expired, the backend's current incarnation): *open* flows
//! (established or in their handshake) and *closing* ones (client FIN
//! seen, within their closing timeout). That count is what `lbd` reports
//! for every VIP (`lb_backend_active_flows`, the API, `lbctl vip show`):
//! exact as of the sweep, at most one sweep interval old. The data plane
//! pays nothing for it.
//!
//! Scheduling on counts needs them fresher than a sweep: a burst of new
//! flows must see the flows placed a microsecond earlier. So for the
//! backends of VIPs whose scheduler uses counts ([`BACKEND_COUNTED`]), the
//! data plane keeps [`ActiveFlows::units`] current itself between sweeps,
//! with atomic adds on a shared array (`LB_ACTIVE`, not per CPU):
//! [`FLOW_UNIT`] for a new flow it records, minus `FLOW_UNIT - 1` when the
//! client's FIN puts the flow in the closing state, and minus what is left
//! on a RST. Flows that end silently (idle past their timeout, or evicted
//! from a full set) are not seen on the data path: each sweep corrects the
//! units to its count, plus what the data plane added and took since the
//! sweep began (so nothing it did during the sweep is lost; a flow opened
//! or closed while the sweep ran may be counted twice until the next one).
//! Sweeps count the connection table only: a flow still in its handshake
//! (one packet seen) when a sweep begins drops out of the units until the
//! next sweep, and one whose handshake never completes (a SYN the backend
//! refused, a scanner) is not held against its backend for longer.
//! `lbd` maps the array into its memory (`BPF_F_MMAPABLE`) and makes that
//! correction with an atomic add too: the two writers never overwrite each
//! other.
//!
//! Units weigh a closing flow 1/256 of an open one (IPVS weighs inactive
//! connections the same way): a node that answered 200 short requests in
//! the last seconds is not "busier" than one holding 20 streams.
//!
//! Cost: on the data path, nothing for other VIPs; for counted VIPs, two
//! atomic adds (the backend's units and its VIP's) on each new flow and on
//! a flow's FIN or RST, and `least-conn`'s walk over 7 more table entries
//! on each new flow; established packets pay nothing (see `cargo xtask
//! bench`, `xdp_x_maglev.*`). In `lbd`, one read of both tables per sweep
//! (the connection table is 64 MiB at the default size).

use core::mem::size_of;

/// `BackendInfo::flags`: the backend's VIP schedules on active flows, so the
/// data plane keeps the backend's [`ActiveFlows::units`] current.
pub const BACKEND_COUNTED: u8 = 4;

/// Creation flags of `LB_ACTIVE` and `LB_VIP_ACTIVE`: `BPF_F_MMAPABLE`.
pub const ACTIVE_MAP_FLAGS: u32 = 1 << 10;

/// [`ActiveFlows::units`] of one open flow; a closing flow counts 1.
pub const FLOW_UNIT: i64 = 256;

/// Value of `LB_ACTIVE`, indexed by backend id.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ActiveFlows {
    /// [`FLOW_UNIT`] per open flow plus 1 per closing flow (see the module
    /// docs); changed only by atomic adds, from both sides.
    pub units: i64,
    /// The backend's weight in its VIP's table (`least-conn` compares
    /// `units / weight`); written by `lbd` before a table that holds the
    /// backend is switched in.
    pub weight: u32,
    /// With a load cap: the most units the backend may hold, as a share of
    /// its VIP's total ([`VipActive::units`]) in 1/65536ths: cap × weight /
    /// the VIP's total weight (see [`over_cap`]).
    pub limit: u32,
}
const _: () = assert!(size_of::<ActiveFlows>() == 16);

/// Value of `LB_VIP_ACTIVE`, indexed by VIP id.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VipActive {
    /// The sum of the VIP's backends' [`ActiveFlows::units`] (kept the same
    /// way).
    pub units: i64,
    /// The backend a capped VIP's new flow goes to when every probe is over
    /// its cap: the one with the fewest units per weight at the last sweep
    /// (`NO_BACKEND`: none).
    pub spare: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<VipActive>() == 16);

/// Table positions a new flow of a `least-conn` VIP (or of a capped VIP
/// whose own backend is full) looks at: the flow's Maglev position and the
/// ones after it. A backend's chance to be among them grows with its table
/// share (its weight); with 8, a VIP of two equal halves sends a new flow to
/// the busier half only when all 8 fall there, 1 in 256.
pub const ACTIVE_PROBES: u32 = 8;
// The data plane masks probe indices with it, inside one table chunk.
const _: () = assert!(ACTIVE_PROBES.is_power_of_two() && ACTIVE_PROBES <= crate::MAGLEV_CHUNK);

/// `limit` for a backend of weight `weight` out of `total_weight`, with a
/// load cap of `cap` (e.g. 1.25): cap × weight / total in 1/65536ths, at
/// most `u32::MAX`. (User space only: the data plane has no floats.)
#[cfg(not(target_arch = "bpf"))]
pub fn cap_limit(cap: f64, weight: u64, total_weight: u64) -> u32 {
    if total_weight == 0 {
        return 0;
    }
    let l = cap * weight as f64 / total_weight as f64 * 65536.0;
    if l >= u32::MAX as f64 {
        u32::MAX
    } else {
        l as u32
    }
}

/// Whether one more flow on a backend holding `units` (limit `limit`)
/// would take it over its cap, its VIP holding `vip_units`: the bound of
/// consistent hashing with bounded loads. A backend may hold ⌈cap × its
/// weighted share × the VIP's flows⌉ flows, counting the new one (so the
/// first flow fits anywhere, and no backend gets above cap × its share of
/// the mean plus one flow). In [`FLOW_UNIT`]s, so closing flows weigh
/// little here too.
#[inline(always)]
pub const fn over_cap(units: i64, limit: u32, vip_units: i64) -> bool {
    // Signed throughout, without branches (the data plane runs this in a
    // loop the verifier walks): a count below zero (a correction not in
    // yet) admits the flow.
    let after = units + FLOW_UNIT;
    let total = vip_units + FLOW_UNIT;
    // limit is in 1/65536ths, a flow is 2^8 units: ⌈limit × total / 2^24⌉
    // flows.
    let cap_flows = (limit as i64 * total + (1 << 24) - 1) >> 24;
    after > cap_flows << 8
}

/// Whether `a` (units, weight) holds fewer units per weight than `b`.
/// Weights are never 0 for backends in a table (`lbd` writes them before
/// the table that holds them).
#[inline(always)]
pub const fn fewer_per_weight(a: (i64, u32), b: (i64, u32)) -> bool {
    a.0 * (b.1 as i64) < b.0 * (a.1 as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_admits_up_to_its_share_of_the_mean() {
        // Four equal backends, cap 1.25: a backend may hold 1.25 × a
        // quarter of the total after the flow.
        let limit = cap_limit(1.25, 1, 4);
        let u = FLOW_UNIT;
        // Total 100 flows after this one: up to ⌈31.25⌉ = 32 on one.
        assert!(!over_cap(31 * u, limit, 99 * u));
        assert!(over_cap(32 * u, limit, 99 * u));
        // An empty VIP admits its first flow anywhere; with 4 flows in
        // all, 2 may share a backend (⌈1.25⌉).
        assert!(!over_cap(u, limit, 3 * u));
        assert!(over_cap(2 * u, limit, 3 * u));
        assert!(!over_cap(0, limit, 0));
        // Below zero (a sweep's correction not yet in) admits.
        assert!(!over_cap(-5, limit, -5));
        assert!(!over_cap(-2 * u, limit, 10 * u));
        assert_eq!(cap_limit(2.0, 1, 0), 0);
    }

    #[test]
    fn fewer_per_weight_weighs() {
        assert!(fewer_per_weight((10, 3), (4, 1)));
        assert!(!fewer_per_weight((12, 3), (4, 1)));
        assert!(fewer_per_weight((-1, 1), (0, 1)));
    }
}
