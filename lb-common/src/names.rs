//! Names of the maps and programs in the two objects, as userspace looks
//! them up (the eBPF side declares them with the same strings).

/// Maps of the balancer object (`lb-xdp`).
pub mod map_name {
    /// `HashMap<VipKey, VipInfo>`: the VIPs (no prealloc, see `VipInfo`).
    pub const VIPS: &str = "LB_VIPS";
    /// `Array<BackendInfo>` indexed by backend id.
    pub const BACKENDS: &str = "LB_BACKENDS";
    /// `Array<MaglevChunk>`: every VIP's two Maglev tables, in chunks.
    pub const MAGLEV: &str = "LB_MAGLEV";
    /// `Array<DataplaneConfig>` with one entry: the settings as last written
    /// (the data path reads its copy in `Globals`).
    pub const CONFIG: &str = "LB_CONFIG";
    /// `Array<FlowSet>`: the connection table.
    pub const FLOWS: &str = "LB_FLOWS";
    /// `Array<FlowSet>`: the handshake table (SYNs until their next packet).
    pub const SYN_FLOWS: &str = "LB_SYN_FLOWS";
    /// `Array<u64>`: bitmap of flow hashes with an entry in the handshake
    /// table, see `syn_seen_slot`.
    pub const SYN_SEEN: &str = "LB_SYN_SEEN";
    /// `PerCpuArray<NextHop>` indexed by backend id: cached FIB results.
    pub const NEXTHOPS: &str = "LB_NEXTHOPS";
    /// `PerCpuArray<TrafficCounters>` indexed by VIP id.
    pub const VIP_STATS: &str = "LB_VIP_STATS";
    /// `PerCpuArray<TrafficCounters>` indexed by backend id.
    pub const BACKEND_STATS: &str = "LB_BACKEND_STATS";
    /// `PerCpuArray<Stats>` with one entry: packets per `Reason` and
    /// connection-table events per `FlowEvent`.
    pub const STATS: &str = "LB_STATS";
    /// `HashMap<VipAddrKey, u32>`: the VIP addresses (value: VIPs on it).
    pub const VIP_ADDRS: &str = "LB_VIP_ADDRS";
    /// `PerCpuArray<u32>` indexed by VIP id: each CPU's position in the
    /// VIP's weighted round-robin sequence.
    pub const WRR_POS: &str = "LB_WRR_POS";
    /// `Array<u32>` indexed by backend id: load scores for least-load (lower
    /// is less loaded).
    pub const SCORES: &str = "LB_SCORES";
    /// `Array<MaglevChunk>`, indexed like `MAGLEV`: at each table
    /// position, the backend it held before its last move (see
    /// `crate::second_chance`).
    pub const PREV: &str = "LB_PREV";
    /// `Array<u64>` with one entry: the table-write generation, odd while
    /// `lbd` writes tables (see `crate::TABLE_GEN_DOC`).
    pub const TABLE_GEN: &str = "LB_TABLE_GEN";
    /// `Array<ActiveFlows>` indexed by backend id, shared and mappable
    /// (`BPF_F_MMAPABLE`): active-flow units of counted backends (see
    /// `crate::ActiveFlows`).
    pub const ACTIVE: &str = "LB_ACTIVE";
    /// `Array<VipActive>` indexed by VIP id, the same per VIP.
    pub const VIP_ACTIVE: &str = "LB_VIP_ACTIVE";
    /// Benchmark only: the `BenchControl` in the object's global data (its
    /// section, a one-value array map).
    pub const BENCH_CONTROL: &str = ".data.lb_bench";
    /// Benchmark only: `PerCpuArray<u64>`, the new-flow sequence.
    pub const BENCH_SEQ: &str = "LB_BENCH_SEQ";

    /// The maps that hold the balancer's state: pinned, so a restarted `lbd`
    /// adopts them (the benchmark's maps are not state).
    pub const STATE: [&str; 18] = [
        VIPS,
        BACKENDS,
        MAGLEV,
        CONFIG,
        FLOWS,
        SYN_FLOWS,
        SYN_SEEN,
        NEXTHOPS,
        VIP_STATS,
        BACKEND_STATS,
        STATS,
        WRR_POS,
        SCORES,
        VIP_ADDRS,
        TABLE_GEN,
        ACTIVE,
        VIP_ACTIVE,
        PREV,
    ];
}

/// Programs of the balancer object.
pub mod program_name {
    /// The balancer.
    pub const BALANCER: &str = "lb_balancer";
    /// The floor for benchmarks: swap MACs, `XDP_TX`.
    pub const FLOOR: &str = "lb_floor";
    /// Benchmark only: restores the input frame, then runs the balancer.
    pub const BENCH_BALANCER: &str = "lb_bench_balancer";
    /// Benchmark only: restores the input frame, then runs the floor.
    pub const BENCH_FLOOR: &str = "lb_bench_floor";
}

/// Maps of the decapsulator object (`lb-decap`).
pub mod decap_map_name {
    /// `HashMap<HostAddr, u8>`: outer destinations to decapsulate.
    pub const ADDRS: &str = "LB_DECAP_ADDRS";
    /// `PerCpuArray<u64>` indexed by `DecapReason`.
    pub const STATS: &str = "LB_DECAP_STATS";
    /// `Array<u32>` with one entry: the `DECAP_*` flags.
    pub const CONFIG: &str = "LB_DECAP_CONFIG";
    /// `LruHashMap<HostAddr, u32>`: candidates whose next hop had no
    /// resolved neighbour entry (`lbd decap` asks the kernel to resolve
    /// them, then removes them).
    pub const WANTED: &str = "LB_DECAP_WANTED";
}

/// Programs of the decapsulator object.
pub mod decap_program_name {
    /// Strips IPIP / IPv6-in-IP addressed to this host.
    pub const DECAP: &str = "lb_decap";
    /// `XDP_PASS` and nothing else: for the far end of a veth whose near end
    /// transmits with `XDP_TX` in native mode (veth drops those frames unless
    /// the peer runs an XDP program).
    pub const PASS: &str = "lb_pass";
}
