//! The backend side: the decapsulator object, loaded by `lbd decap` on a
//! backend so it accepts the balancer's IPIP / IPv6-in-IP packets without
//! the kernel's `ipip` module.

use std::net::IpAddr;

use aya::{
    Ebpf,
    maps::{HashMap, MapData, PerCpuArray},
    programs::{Xdp, XdpMode, xdp::XdpLinkId},
};
use lb_common::{
    DECAP_MAX_ADDRS, DECAP_REASON_COUNT, DecapReason, HostAddr, addr_words, decap_map_name,
    decap_program_name,
};

use super::{AttachMode, DataplaneError, attach_xdp, map_err, take_map, xdp_program};

/// The decapsulator object, built by `build.rs` from `lb-ebpf`.
pub static DECAP_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-decap"));

/// A loaded decapsulator.
pub struct Decapsulator {
    ebpf: Ebpf,
    addrs: HashMap<MapData, HostAddr, u8>,
    stats: PerCpuArray<MapData, u64>,
    link: Option<XdpLinkId>,
}

fn host_addr(addr: IpAddr) -> HostAddr {
    let (family, addr) = addr_words(addr);
    HostAddr {
        addr,
        family,
        _pad: [0; 3],
    }
}

impl Decapsulator {
    /// Loads the object and the decapsulator program (the verifier runs here).
    pub fn load() -> Result<Decapsulator, DataplaneError> {
        let mut ebpf = Ebpf::load(DECAP_OBJECT)?;
        let name = decap_program_name::DECAP;
        xdp_program(&mut ebpf, name)?
            .load()
            .map_err(|source| DataplaneError::Program { name, source })?;
        let addrs = take_map(&mut ebpf, decap_map_name::ADDRS)?
            .try_into()
            .map_err(map_err(decap_map_name::ADDRS))?;
        let stats = take_map(&mut ebpf, decap_map_name::STATS)?
            .try_into()
            .map_err(map_err(decap_map_name::STATS))?;
        Ok(Decapsulator {
            ebpf,
            addrs,
            stats,
            link: None,
        })
    }

    /// Sets the outer destinations to decapsulate: this host's addresses.
    /// Adds the new ones before removing the old ones, so an address in both
    /// sets never stops being decapsulated.
    pub fn set_addresses(&mut self, addrs: &[IpAddr]) -> Result<(), DataplaneError> {
        if addrs.len() > DECAP_MAX_ADDRS as usize {
            return Err(DataplaneError::TooManyAddresses {
                count: addrs.len(),
                max: DECAP_MAX_ADDRS,
            });
        }
        let wanted: Vec<HostAddr> = addrs.iter().map(|a| host_addr(*a)).collect();
        for key in &wanted {
            self.addrs
                .insert(key, 1, 0)
                .map_err(map_err(decap_map_name::ADDRS))?;
        }
        let stale: Vec<HostAddr> = self
            .addrs
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !wanted.contains(k))
            .collect();
        for key in stale {
            self.addrs
                .remove(&key)
                .map_err(map_err(decap_map_name::ADDRS))?;
        }
        Ok(())
    }

    /// Attaches the decapsulator to `iface`; returns the mode in effect.
    pub fn attach(&mut self, iface: &str, mode: AttachMode) -> Result<AttachMode, DataplaneError> {
        let prog = xdp_program(&mut self.ebpf, decap_program_name::DECAP)?;
        let (link, used) = attach_xdp(prog, iface, mode)?;
        self.link = Some(link);
        Ok(used)
    }

    /// The loaded decapsulator program (for `BPF_PROG_TEST_RUN`).
    pub fn program(&mut self) -> Result<&mut Xdp, DataplaneError> {
        xdp_program(&mut self.ebpf, decap_program_name::DECAP)
    }

    /// Packets per [`DecapReason`], summed over CPUs.
    pub fn counters(&self) -> Result<[u64; DECAP_REASON_COUNT as usize], DataplaneError> {
        let mut out = [0; DECAP_REASON_COUNT as usize];
        for r in DecapReason::ALL {
            out[r as usize] = self
                .stats
                .get(&(r as u32), 0)
                .map_err(map_err(decap_map_name::STATS))?
                .iter()
                .sum();
        }
        Ok(out)
    }
}

/// An `XDP_PASS` program attached to an interface until dropped.
///
/// A veth that transmits with `XDP_TX` in native mode only delivers when its
/// peer runs an XDP program; this is the least such program.
pub struct PassProgram {
    _ebpf: Ebpf,
}

impl PassProgram {
    /// Attaches `lb_pass` to `iface` in native mode.
    pub fn attach(iface: &str) -> Result<PassProgram, DataplaneError> {
        let mut ebpf = Ebpf::load(DECAP_OBJECT)?;
        let name = decap_program_name::PASS;
        let prog = xdp_program(&mut ebpf, name)?;
        prog.load()
            .map_err(|source| DataplaneError::Program { name, source })?;
        prog.attach(iface, XdpMode::Driver)
            .map_err(|source| DataplaneError::Attach {
                iface: iface.to_string(),
                mode: "native",
                source,
            })?;
        Ok(PassProgram { _ebpf: ebpf })
    }
}
