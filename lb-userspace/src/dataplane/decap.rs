//! The backend side: the decapsulator object, loaded by `lbd decap` on a
//! backend so it accepts the balancer's IPIP / IPv6-in-IP packets without
//! the kernel's `ipip` module.

use std::net::IpAddr;

use aya::{
    Ebpf,
    maps::{Array, HashMap, MapData, PerCpuArray},
    programs::{Xdp, XdpMode, xdp::XdpLinkId},
};
use lb_common::{
    DECAP_MAX_ADDRS, DECAP_REASON_COUNT, DECAP_SECOND_CHANCE, DecapReason, HostAddr, addr_words,
    decap_map_name, decap_program_name, words_addr,
};

use super::{AttachMode, DataplaneError, attach_xdp, map_err, take_map, xdp_program};

/// The decapsulator object, built by `build.rs` from `lb-ebpf`.
pub static DECAP_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-decap"));

/// A loaded decapsulator.
pub struct Decapsulator {
    ebpf: Ebpf,
    addrs: HashMap<MapData, HostAddr, u8>,
    stats: PerCpuArray<MapData, u64>,
    config: Array<MapData, u32>,
    wanted: HashMap<MapData, HostAddr, u32>,
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
        let config = take_map(&mut ebpf, decap_map_name::CONFIG)?
            .try_into()
            .map_err(map_err(decap_map_name::CONFIG))?;
        let wanted = take_map(&mut ebpf, decap_map_name::WANTED)?
            .try_into()
            .map_err(map_err(decap_map_name::WANTED))?;
        Ok(Decapsulator {
            ebpf,
            addrs,
            stats,
            config,
            wanted,
            link: None,
        })
    }

    /// Sends packets of connections this host does not have on to their
    /// second-chance candidate (see the object's docs; the interface must
    /// forward for the FIB lookup to answer).
    pub fn enable_second_chance(&mut self) -> Result<(), DataplaneError> {
        self.config
            .set(0, DECAP_SECOND_CHANCE, 0)
            .map_err(map_err(decap_map_name::CONFIG))
    }

    /// The candidates whose next hop had no resolved neighbour entry since
    /// the last call (removed from the map as they are read).
    pub fn take_wanted(&mut self) -> Vec<IpAddr> {
        let keys: Vec<HostAddr> = self.wanted.keys().filter_map(Result::ok).collect();
        for k in &keys {
            let _ = self.wanted.remove(k);
        }
        keys.iter().map(|k| words_addr(k.family, k.addr)).collect()
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
