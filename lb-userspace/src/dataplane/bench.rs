//! Benchmark support: the floor program and the wrapper that restores the
//! input frame before every `BPF_PROG_TEST_RUN` iteration (see
//! `lb_common::BenchControl`). Not used by `lbd`.

use aya::{
    maps::{Array, MapData, PerCpuArray, ProgramArray},
    programs::Xdp,
};
use lb_common::{BenchControl, map_name, program_name};

use super::{Dataplane, DataplaneError, map_err, take_map, xdp_program};

/// Which program the benchmark wrapper tail-calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BenchTarget {
    Balancer = 0,
    Floor = 1,
}

impl Dataplane {
    /// Loads the floor and wrapper programs and wires the wrapper's tail
    /// calls. Returns the wrapper's control and statistics maps.
    pub fn enable_bench(&mut self) -> Result<BenchMaps, DataplaneError> {
        for name in [program_name::FLOOR, program_name::BENCH_WRAP] {
            xdp_program(&mut self.ebpf, name)?
                .load()
                .map_err(|source| DataplaneError::Program { name, source })?;
        }
        let mut progs: ProgramArray<MapData> = take_map(&mut self.ebpf, map_name::BENCH_PROGS)?
            .try_into()
            .map_err(map_err(map_name::BENCH_PROGS))?;
        for (target, name) in [
            (BenchTarget::Balancer, program_name::BALANCER),
            (BenchTarget::Floor, program_name::FLOOR),
        ] {
            let fd = xdp_program(&mut self.ebpf, name)?
                .fd()
                .map_err(|source| DataplaneError::Program { name, source })?
                .try_clone()
                .map_err(|e| DataplaneError::Program {
                    name,
                    source: aya::programs::ProgramError::IOError(e),
                })?;
            progs
                .set(target as u32, &fd, 0)
                .map_err(map_err(map_name::BENCH_PROGS))?;
        }
        Ok(BenchMaps {
            control: take_map(&mut self.ebpf, map_name::BENCH_CONTROL)?
                .try_into()
                .map_err(map_err(map_name::BENCH_CONTROL))?,
            restored: take_map(&mut self.ebpf, map_name::BENCH_STATS)?
                .try_into()
                .map_err(map_err(map_name::BENCH_STATS))?,
            _progs: progs,
        })
    }

    /// A loaded program of the balancer object by name (floor, wrapper).
    pub fn program(&mut self, name: &'static str) -> Result<&mut Xdp, DataplaneError> {
        xdp_program(&mut self.ebpf, name)
    }
}

/// The benchmark wrapper's maps.
pub struct BenchMaps {
    control: Array<MapData, BenchControl>,
    restored: PerCpuArray<MapData, u64>,
    /// Held so the tail-call table lives as long as the benchmark.
    _progs: ProgramArray<MapData>,
}

impl BenchMaps {
    /// Sets the wrapper's target and the L2 header (14 or 18 bytes) it writes
    /// back before every iteration.
    ///
    /// With `seq_offset` (the offset of the last four bytes of the source
    /// address), every iteration gets a new source: every packet is a new
    /// flow.
    pub fn set(
        &mut self,
        target: BenchTarget,
        l2: &[u8],
        seq_offset: Option<usize>,
    ) -> Result<(), DataplaneError> {
        let mut ctl = BenchControl {
            target: target as u32,
            l2_len: l2.len() as u32,
            l2: [0; 20],
            seq_offset: seq_offset.unwrap_or(0) as u32,
        };
        ctl.l2[..l2.len()].copy_from_slice(l2);
        self.control
            .set(0, ctl, 0)
            .map_err(map_err(map_name::BENCH_CONTROL))
    }

    /// Frames the wrapper has restored so far (summed over CPUs).
    pub fn restored(&self) -> Result<u64, DataplaneError> {
        Ok(self
            .restored
            .get(&0, 0)
            .map_err(map_err(map_name::BENCH_STATS))?
            .iter()
            .sum())
    }
}
