//! What the host itself says about a config: addresses that are valid in
//! general (see [`crate::desired::config::unusable_address`]) but wrong on
//! this host.
//!
//! - A VIP that is one of the host's own addresses is refused: the XDP
//!   program takes every packet to it on the VIP's port (with port 0, every
//!   port), so the host's own services on that address (SSH, the BGP
//!   session) stop answering.
//! - A backend that is one of the host's addresses is refused: the
//!   balancer would send its encapsulated packets to itself.
//! - A port-0 VIP inside a prefix the host routes (other than the default
//!   route) is allowed with a warning: the balancer forwards traffic to
//!   that prefix, and the VIP now takes all of that address's traffic.
//!
//! `lbd` runs these checks at start-up, on every reload and on every API
//! change, against the addresses and routes (the main table, from
//! `/proc/net/route` and `/proc/net/ipv6_route`) the host has at that
//! moment.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::desired::config::{Config, Problem};

/// A route of the host: a prefix and the interface it goes out of.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub dest: IpAddr,
    pub prefix_len: u8,
    pub iface: String,
}

impl Route {
    fn contains(&self, a: IpAddr) -> bool {
        let (net, addr, bits) = match (self.dest, a) {
            (IpAddr::V4(n), IpAddr::V4(a)) => (u32::from(n) as u128, u32::from(a) as u128, 32),
            (IpAddr::V6(n), IpAddr::V6(a)) => (u128::from(n), u128::from(a), 128),
            _ => return false,
        };
        let len = u32::from(self.prefix_len).min(bits);
        if len == 0 {
            return true;
        }
        let shift = bits - len;
        net >> shift == addr >> shift
    }
}

/// What the host's addresses and routes say about a config.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostReport {
    /// Refused: the config cannot run on this host.
    pub problems: Vec<Problem>,
    /// Allowed, but worth a warning in the log.
    pub warnings: Vec<String>,
}

/// Checks `config` against this host's addresses and routes now.
pub fn check(config: &Config) -> std::io::Result<HostReport> {
    Ok(check_with(config, &super::addresses()?, &routes()?))
}

/// Checks `config` against the host addresses `own` and the routes
/// `routes` (pure).
pub fn check_with(config: &Config, own: &[IpAddr], routes: &[Route]) -> HostReport {
    let mut r = HostReport::default();
    for (i, vip) in config.vips.iter().enumerate() {
        let a = vip.addr.addr;
        if own.contains(&a) {
            r.problems.push(Problem {
                field: format!("vip[{i}].address"),
                message: format!(
                    "{a} is an address of this host: the balancer would take its traffic to port {} \
                     ({}) from the host's own services; use an address no interface of this host has",
                    vip.addr.port,
                    if vip.addr.port == 0 { "every port" } else { "that port" }
                ),
            });
        } else if vip.addr.port == 0
            && let Some(route) = routes.iter().find(|r| r.prefix_len > 0 && r.contains(a))
        {
            r.warnings.push(format!(
                "vip[{i}] {}: a port-0 VIP inside {}/{} (routed by this host via {}): every packet to {a} \
                 arriving here goes to the VIP's backends, none is forwarded to {a}",
                vip.addr, route.dest, route.prefix_len, route.iface
            ));
        }
        for (j, b) in vip.backends.iter().enumerate() {
            if own.contains(&b.addr) {
                r.problems.push(Problem {
                    field: format!("vip[{i}].backends[{j}].address"),
                    message: format!(
                        "{} is an address of this host: the balancer would send the VIP's packets to itself",
                        b.addr
                    ),
                });
            }
        }
    }
    r
}

/// The host's routes (main table), IPv4 and IPv6.
pub fn routes() -> std::io::Result<Vec<Route>> {
    let mut out = parse_ipv4_routes(&std::fs::read_to_string("/proc/net/route")?);
    // No IPv6 at all (disabled) leaves no file: no IPv6 routes.
    if let Ok(text) = std::fs::read_to_string("/proc/net/ipv6_route") {
        out.extend(parse_ipv6_routes(&text));
    }
    Ok(out)
}

/// `/proc/net/route`: a header, then `Iface Destination Gateway Flags
/// RefCnt Use Metric Mask ...`, addresses as little-endian hex words.
fn parse_ipv4_routes(text: &str) -> Vec<Route> {
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let dest = u32::from_str_radix(f.get(1)?, 16).ok()?;
            let mask = u32::from_str_radix(f.get(7)?, 16).ok()?;
            Some(Route {
                dest: IpAddr::V4(Ipv4Addr::from(dest.to_le_bytes())),
                prefix_len: mask.count_ones() as u8,
                iface: f[0].to_string(),
            })
        })
        .collect()
}

/// `/proc/net/ipv6_route`: `dest dest_len src src_len next_hop metric
/// refcnt use flags iface`, addresses as 32 hex digits, lengths as hex.
fn parse_ipv6_routes(text: &str) -> Vec<Route> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let dest = u128::from_str_radix(f.first()?, 16).ok()?;
            let len = u8::from_str_radix(f.get(1)?, 16).ok()?;
            Some(Route {
                dest: IpAddr::V6(Ipv6Addr::from(dest)),
                prefix_len: len,
                iface: f.get(9)?.to_string(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desired::config::parse;

    const CONFIG: &str = r#"
[balancer]
source_v4 = "10.0.0.1"

[[vip]]
address = "10.0.0.5"
port = 0
protocol = "tcp"
backends = [{ address = "10.0.1.11" }]

[[vip]]
address = "192.0.2.7"
port = 443
protocol = "tcp"
backends = [{ address = "10.0.1.12" }, { address = "10.0.1.2" }]
"#;

    #[test]
    fn proc_routes_parse() {
        let v4 = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                  eth0\t00000000\t0100000A\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
                  eth0\t0000000A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n";
        let r = parse_ipv4_routes(v4);
        assert_eq!(r.len(), 2);
        assert_eq!(r[1].dest, "10.0.0.0".parse::<IpAddr>().unwrap());
        assert_eq!(r[1].prefix_len, 24);
        assert_eq!(r[0].prefix_len, 0);
        let v6 = "fd000201000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001     eth0\n";
        let r = parse_ipv6_routes(v6);
        assert_eq!(r[0].dest, "fd00:201::".parse::<IpAddr>().unwrap());
        assert_eq!(r[0].prefix_len, 64);
        assert_eq!(r[0].iface, "eth0");
    }

    #[test]
    fn host_addresses_are_refused_and_routed_port_0_vips_warned() {
        let c = parse(CONFIG, "t").unwrap();
        let routes = vec![
            Route {
                dest: "0.0.0.0".parse().unwrap(),
                prefix_len: 0,
                iface: "eth0".into(),
            },
            Route {
                dest: "10.0.0.0".parse().unwrap(),
                prefix_len: 24,
                iface: "eth0".into(),
            },
        ];
        let own: Vec<IpAddr> = vec!["10.0.1.2".parse().unwrap()];
        let r = check_with(&c, &own, &routes);
        assert_eq!(r.problems.len(), 1, "{r:?}");
        assert_eq!(r.problems[0].field, "vip[1].backends[1].address");
        assert_eq!(r.warnings.len(), 1, "{r:?}");
        assert!(r.warnings[0].contains("10.0.0.0/24"), "{r:?}");
        // The host's own address as a VIP: refused, whatever the port.
        let own: Vec<IpAddr> = vec!["10.0.0.5".parse().unwrap(), "192.0.2.7".parse().unwrap()];
        let r = check_with(&c, &own, &[]);
        let fields: Vec<&str> = r.problems.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(fields, ["vip[0].address", "vip[1].address"], "{r:?}");
        assert!(r.problems[0].message.contains("every port"), "{r:?}");
        // Only the default route: nothing to warn about.
        assert!(check_with(&c, &[], &routes[..1]).warnings.is_empty());
    }
}
