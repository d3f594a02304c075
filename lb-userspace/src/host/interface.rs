//! The interface the balancer is attached to, as the host has it, and what
//! `lbd` sets on it besides forwarding (see `dataplane::enable_forwarding`):
//!
//! - its MAC address: the data plane sends only frames addressed to it (or
//!   to `balancer.extra_macs`) to backends;
//! - no transit: a policy-routing rule per family (`ip rule add pref 1000
//!   iif IF blackhole`) drops what arrives on the interface for another
//!   host instead of routing it back out the same interface. Forwarding is
//!   on for the interface only because the XDP FIB lookup needs it, and
//!   with it the kernel would route such packets (a wrong port, another
//!   address) back out and, for IPv4, send the sender an ICMP redirect
//!   (`send_redirects` is ORed with `conf/all`, and IPv6 has no such
//!   switch). The rule leaves the host's own traffic alone: its addresses
//!   are matched by the local table first, and what the host sends (and the
//!   balancer's FIB lookup) has `iif lo`. `lbd --cleanup` and an unpinned
//!   `lbd` that exits remove it;
//! - receive VLAN offload off: a NIC that strips the 802.1Q tag into the
//!   packet's metadata hides it from XDP, and the balancer would send
//!   tagged traffic out untagged. `lbd` turns `rx-vlan-offload` (and
//!   `rx-vlan-stag-hw-parse`) off, or refuses to attach where the driver
//!   cannot. On a veth the receiving end never strips; the *sending* end,
//!   its peer, keeps the tag in metadata when its `tx-vlan-offload` is on,
//!   so `lbd` turns that off on the peer (and `tx-vlan-stag-hw-insert`),
//!   if the peer's namespace is this one or a named one; a peer in an
//!   unnamed namespace (a container's) it cannot reach, and says so in its
//!   log. These stay off when `lbd` stops.
//!
//! Like `host::neighbours`, this uses the `ip` and `ethtool` commands.

use std::fmt::Write;

use super::{CommandError, ip_json as json, run};

/// Why something about the interface could not be read or changed.
#[derive(Debug, thiserror::Error)]
pub enum InterfaceError {
    #[error("reading the MAC address of {iface}")]
    ReadMac {
        iface: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{iface} is not an Ethernet interface (hardware type {kind})")]
    NoMac { iface: String, kind: u16 },
    #[error(transparent)]
    Command(#[from] CommandError),
    #[error(
        "{iface} strips VLAN tags before XDP sees them ({feature} is on and its driver cannot turn it off): \
         the balancer would send tagged traffic out untagged; use another NIC"
    )]
    VlanOffloadFixed {
        iface: String,
        feature: &'static str,
    },
    #[error("{iface} still has {feature} on after `ethtool -K {iface} {feature} off`")]
    VlanOffloadStuck {
        iface: String,
        feature: &'static str,
    },
}

/// Priority of the no-transit rule (after the local table's 0, before the
/// main table's 32766).
const TRANSIT_RULE_PRIORITY: &str = "1000";

/// The `ip rule` arguments of the no-transit rule of `iface`.
fn transit_rule<'a>(family: &'a str, verb: &'a str, iface: &'a str) -> [&'a str; 8] {
    [
        family,
        "rule",
        verb,
        "pref",
        TRANSIT_RULE_PRIORITY,
        "iif",
        iface,
        "blackhole",
    ]
}

/// Keeps the host from routing what arrives on `iface` for another host
/// (IPv4 and IPv6; see the module docs). Idempotent.
pub fn refuse_transit(iface: &str) -> Result<(), InterfaceError> {
    for family in ["-4", "-6"] {
        run(
            "ip",
            &transit_rule(family, "add", iface),
            Some("File exists"),
        )?;
    }
    Ok(())
}

/// Removes what [`refuse_transit`] added. Idempotent.
pub fn allow_transit(iface: &str) -> Result<(), InterfaceError> {
    for family in ["-4", "-6"] {
        run(
            "ip",
            &transit_rule(family, "del", iface),
            Some("No such file"),
        )?;
    }
    Ok(())
}

/// The offloads that keep a VLAN tag out of the frame: on the receiving
/// interface, and on the sending end of a veth.
const VLAN_RX_OFFLOADS: [&str; 2] = ["rx-vlan-offload", "rx-vlan-stag-hw-parse"];
const VLAN_TX_OFFLOADS: [&str; 2] = ["tx-vlan-offload", "tx-vlan-stag-hw-insert"];

/// `(on, fixed)` of `feature` in the output of `ethtool -k` (`None`: the
/// driver does not list it).
fn feature(listing: &str, feature: &str) -> Option<(bool, bool)> {
    listing.lines().find_map(|line| {
        let value = line.trim().strip_prefix(feature)?.strip_prefix(':')?.trim();
        Some((value.starts_with("on"), value.contains("[fixed]")))
    })
}

/// An interface, in this network namespace or in a named one.
struct Port {
    netns: Option<String>,
    name: String,
}

impl Port {
    /// Runs `ethtool args` on the port's namespace.
    fn ethtool(&self, args: &[&str]) -> Result<String, CommandError> {
        match &self.netns {
            None => run("ethtool", args, None),
            Some(ns) => run(
                "ip",
                &[&["netns", "exec", ns, "ethtool"], args].concat(),
                None,
            ),
        }
    }

    /// How the port is named in errors and logs.
    fn label(&self) -> String {
        match &self.netns {
            None => self.name.clone(),
            Some(ns) => format!("{} (network namespace {ns})", self.name),
        }
    }

    /// Turns off those of `features` that are on; returns them. Refuses if
    /// one is on and cannot change.
    fn turn_off(&self, features: &[&'static str]) -> Result<Vec<&'static str>, InterfaceError> {
        let listing = self.ethtool(&["-k", &self.name])?;
        let mut on = Vec::new();
        for f in features {
            match feature(&listing, f) {
                Some((true, true)) => {
                    return Err(InterfaceError::VlanOffloadFixed {
                        iface: self.label(),
                        feature: f,
                    });
                }
                Some((true, false)) => on.push(*f),
                _ => {}
            }
        }
        if on.is_empty() {
            return Ok(on);
        }
        let mut args = vec!["-K", self.name.as_str()];
        for f in &on {
            args.extend([*f, "off"]);
        }
        self.ethtool(&args)?;
        let listing = self.ethtool(&["-k", &self.name])?;
        if let Some(f) = on
            .iter()
            .find(|f| feature(&listing, f).is_some_and(|(on, _)| on))
        {
            return Err(InterfaceError::VlanOffloadStuck {
                iface: self.label(),
                feature: f,
            });
        }
        Ok(on)
    }
}

#[derive(serde::Deserialize)]
struct LinkInfo {
    #[serde(default)]
    linkinfo: Option<LinkKind>,
    link_index: Option<u32>,
    link_netnsid: Option<i32>,
}

#[derive(serde::Deserialize)]
struct LinkKind {
    info_kind: Option<String>,
}

#[derive(serde::Deserialize)]
struct Link {
    ifindex: u32,
    ifname: String,
}

#[derive(serde::Deserialize)]
struct NetnsId {
    nsid: i32,
    name: Option<String>,
}

/// What is at the far end of `iface`: `None` if it is no veth; `Some(None)`
/// for a veth whose peer lives in a namespace without a name (a
/// container's), which `lbd` cannot reach.
fn veth_peer(iface: &str) -> Result<Option<Option<Port>>, InterfaceError> {
    let info: Vec<LinkInfo> = json(&["-j", "-d", "link", "show", "dev", iface])?;
    let Some(info) = info.into_iter().next() else {
        return Ok(None);
    };
    if info.linkinfo.and_then(|k| k.info_kind).as_deref() != Some("veth") {
        return Ok(None);
    }
    let Some(index) = info.link_index else {
        return Ok(Some(None));
    };
    let netns = match info.link_netnsid {
        None => None,
        Some(id) => {
            let ids: Vec<NetnsId> = json(&["-j", "netns", "list-id"])?;
            match ids.into_iter().find(|n| n.nsid == id).and_then(|n| n.name) {
                Some(name) => Some(name),
                None => return Ok(Some(None)),
            }
        }
    };
    let links: Vec<Link> = match &netns {
        None => json(&["-j", "link", "show"])?,
        Some(ns) => json(&["-n", ns, "-j", "link", "show"])?,
    };
    Ok(Some(links.into_iter().find(|l| l.ifindex == index).map(
        |l| Port {
            netns,
            name: l.ifname,
        },
    )))
}

/// Keeps VLAN tags in the frames XDP sees on `iface` (see the module
/// docs): turns off its receive VLAN offloads and, for a veth, the transmit
/// VLAN offloads of its peer (when `lbd` can reach the peer's namespace:
/// this one or a named one; otherwise it logs a warning). Returns what it
/// turned off, as `interface: feature`. Refuses if an offload that is on
/// cannot be turned off.
pub fn keep_vlan_tags(iface: &str) -> Result<Vec<String>, InterfaceError> {
    let own = Port {
        netns: None,
        name: iface.to_string(),
    };
    let mut done: Vec<String> = own
        .turn_off(&VLAN_RX_OFFLOADS)?
        .into_iter()
        .map(|f| format!("{iface}: {f}"))
        .collect();
    match veth_peer(iface)? {
        None => {}
        Some(Some(peer)) => {
            for f in peer.turn_off(&VLAN_TX_OFFLOADS)? {
                done.push(format!("{}: {f}", peer.label()));
            }
        }
        Some(None) => tracing::warn!(
            iface,
            "a veth whose peer is in a network namespace lbd cannot reach: VLAN tags reach XDP \
             only if the peer sends them in the frame (ethtool -K PEER tx-vlan-offload off)"
        ),
    }
    Ok(done)
}

/// The MAC address of `iface` in the calling thread's network namespace
/// (`SIOCGIFHWADDR`: sysfs shows the namespace it was mounted in).
pub fn mac(iface: &str) -> Result<[u8; 6], InterfaceError> {
    let err = |source| InterfaceError::ReadMac {
        iface: iface.to_string(),
        source,
    };
    if iface.len() >= libc::IFNAMSIZ {
        return Err(err(std::io::Error::from(std::io::ErrorKind::InvalidInput)));
    }
    // SAFETY: a plain socket; closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(err(std::io::Error::last_os_error()));
    }
    // SAFETY: a zeroed ifreq is valid; the name fits (checked above) and
    // stays NUL-terminated.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(iface.bytes()) {
        *d = s as libc::c_char;
    }
    // SAFETY: SIOCGIFHWADDR fills `req`.
    let rc = unsafe { libc::ioctl(fd, libc::SIOCGIFHWADDR, &mut req) };
    let result = if rc < 0 {
        Err(err(std::io::Error::last_os_error()))
    } else {
        // SAFETY: the ioctl set the hwaddr member of the union.
        let addr = unsafe { req.ifr_ifru.ifru_hwaddr };
        if addr.sa_family != libc::ARPHRD_ETHER {
            Err(InterfaceError::NoMac {
                iface: iface.to_string(),
                kind: addr.sa_family,
            })
        } else {
            let mut mac = [0u8; 6];
            for (m, b) in mac.iter_mut().zip(addr.sa_data) {
                *m = b as u8;
            }
            Ok(mac)
        }
    };
    // SAFETY: the fd opened above.
    unsafe { libc::close(fd) };
    result
}

/// Parses `aa:bb:cc:dd:ee:ff` (hex digits in either case).
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for byte in &mut mac {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// Formats a MAC as `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: [u8; 6]) -> String {
    let mut s = String::with_capacity(17);
    for (i, b) in mac.iter().enumerate() {
        if i > 0 {
            s.push(':');
        }
        let _ = write!(s, "{b:02x}");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ethtool_features_are_read_with_their_fixed_flag() {
        let listing = "Features for eth0:\nrx-checksumming: on\nrx-vlan-offload: on [fixed]\n\
                       tx-vlan-offload: on\nrx-vlan-stag-hw-parse: off\nrx-vlan-filter: off [fixed]\n";
        assert_eq!(feature(listing, "rx-vlan-offload"), Some((true, true)));
        assert_eq!(feature(listing, "tx-vlan-offload"), Some((true, false)));
        assert_eq!(
            feature(listing, "rx-vlan-stag-hw-parse"),
            Some((false, false))
        );
        assert_eq!(feature(listing, "rx-vlan-stag-filter"), None);
        assert_eq!(
            feature(listing, "rx-vlan"),
            None,
            "a prefix is not a feature"
        );
    }

    #[test]
    fn macs_parse_and_format() {
        let m = parse_mac("02:AB:cd:00:01:ff").unwrap();
        assert_eq!(m, [0x02, 0xab, 0xcd, 0x00, 0x01, 0xff]);
        assert_eq!(format_mac(m), "02:ab:cd:00:01:ff");
        for bad in [
            "",
            "02:ab:cd:00:01",
            "02:ab:cd:00:01:ff:00",
            "2:ab:cd:00:01:ff",
            "zz:ab:cd:00:01:ff",
            "02-ab-cd-00-01-ff",
        ] {
            assert_eq!(parse_mac(bad), None, "{bad:?}");
        }
        assert!(
            matches!(mac("lo"), Err(InterfaceError::NoMac { .. })),
            "loopback is not Ethernet"
        );
    }
}
