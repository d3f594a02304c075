//! The interface the balancer is attached to, as the host has it: its MAC
//! address (the data plane sends only frames addressed to it, or to
//! `balancer.extra_macs`, to backends).

use std::fmt::Write;

/// Why something about the interface could not be read or changed.
#[derive(Debug, thiserror::Error)]
pub enum InterfaceError {
    #[error("reading the MAC address of {iface} ({path})")]
    ReadMac {
        iface: String,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{iface} has no Ethernet MAC address ({path} says {text:?})")]
    NoMac {
        iface: String,
        path: String,
        text: String,
    },
}

/// The MAC address of `iface`, from sysfs.
pub fn mac(iface: &str) -> Result<[u8; 6], InterfaceError> {
    let path = format!("/sys/class/net/{iface}/address");
    let text = std::fs::read_to_string(&path).map_err(|source| InterfaceError::ReadMac {
        iface: iface.to_string(),
        path: path.clone(),
        source,
    })?;
    parse_mac(text.trim()).ok_or_else(|| InterfaceError::NoMac {
        iface: iface.to_string(),
        path,
        text: text.trim().to_string(),
    })
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
    fn macs_parse_and_format() {
        let mac = parse_mac("02:AB:cd:00:01:ff").unwrap();
        assert_eq!(mac, [0x02, 0xab, 0xcd, 0x00, 0x01, 0xff]);
        assert_eq!(format_mac(mac), "02:ab:cd:00:01:ff");
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
        assert_eq!(mac_of_loopback(), [0; 6]);
    }

    fn mac_of_loopback() -> [u8; 6] {
        mac("lo").expect("lo has an address in sysfs")
    }
}
