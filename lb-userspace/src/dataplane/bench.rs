//! Benchmark support: the floor program and the benchmark programs that
//! restore the input frame before every `BPF_PROG_TEST_RUN` iteration (see
//! `lb_common::BenchControl`). Not used by `lbd`.

use aya::{
    maps::{Array, MapData},
    programs::Xdp,
};
use lb_common::{BenchControl, map_name, program_name};

use super::{Dataplane, DataplaneError, map_err, take_map, xdp_program};

/// What a benchmark run measures, each iteration on the restored frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BenchTarget {
    Balancer,
    Floor,
}

impl BenchTarget {
    /// The program that restores the frame, then runs this target.
    pub fn program(self) -> &'static str {
        match self {
            BenchTarget::Balancer => program_name::BENCH_BALANCER,
            BenchTarget::Floor => program_name::BENCH_FLOOR,
        }
    }
}

impl Dataplane {
    /// Loads the floor and the benchmark programs. Returns their control
    /// map.
    pub fn enable_bench(&mut self) -> Result<BenchMaps, DataplaneError> {
        for name in [
            program_name::FLOOR,
            program_name::BENCH_BALANCER,
            program_name::BENCH_FLOOR,
        ] {
            xdp_program(&mut self.ebpf, name)?
                .load()
                .map_err(|source| DataplaneError::Program { name, source })?;
        }
        Ok(BenchMaps {
            control: take_map(&mut self.ebpf, map_name::BENCH_CONTROL)?
                .try_into()
                .map_err(map_err(map_name::BENCH_CONTROL))?,
        })
    }

    /// A loaded program of the balancer object by name (floor, benchmark
    /// programs).
    pub fn program(&mut self, name: &'static str) -> Result<&mut Xdp, DataplaneError> {
        xdp_program(&mut self.ebpf, name)
    }
}

/// The benchmark programs' control map.
pub struct BenchMaps {
    control: Array<MapData, BenchControl>,
}

impl BenchMaps {
    /// Sets the L2 header (14 or 18 bytes) the benchmark programs write back
    /// before every iteration.
    ///
    /// With `seq_offset` (the offset of the last four bytes of the source
    /// address), every iteration gets a new source: every packet is a new
    /// flow.
    pub fn set(&mut self, l2: &[u8], seq_offset: Option<usize>) -> Result<(), DataplaneError> {
        let ctl = BenchControl {
            l2: BenchControl::l2_words(l2),
            l2_len: l2.len() as u32,
            seq_offset: seq_offset.unwrap_or(0) as u32,
        };
        self.control
            .set(0, ctl, 0)
            .map_err(map_err(map_name::BENCH_CONTROL))
    }
}
