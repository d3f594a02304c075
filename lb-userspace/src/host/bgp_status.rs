//! What BIRD says about the announcements, for `/metrics`: whether it
//! answers, the state of each BGP session (one per `bgp.neighbors` entry,
//! BIRD protocol `router_N`), the routes each session exports, and the VIP
//! addresses in BIRD's static protocols (what it announces to every session
//! of that family that is up).
//!
//! Read-only: `show protocols all "router_*"` and `show route protocol
//! lb_vips_v4` / `lb_vips_v6` over the control socket, through
//! [`bgp::bird_command`](super::bgp::bird_command), once per scrape and
//! off the controller (the announcer is not involved).

use std::{collections::BTreeSet, net::IpAddr, path::Path, time::Duration};

use super::bgp::{BgpSettings, BirdError, BirdPaths, bird_command};

/// Longest a scrape waits for BIRD (it answers in milliseconds; a stuck
/// BIRD must not hold up the scrape).
pub const STATUS_TIMEOUT: Duration = Duration::from_secs(1);

/// One BGP session as BIRD has it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionStatus {
    /// The neighbour's address (`bgp.neighbors[i].address`).
    pub neighbor: IpAddr,
    /// BIRD's BGP state: `Established` when up; `Idle`, `Connect`,
    /// `Active`, `OpenSent`, `OpenConfirm`, `Down`; `unknown` when BIRD has
    /// no such protocol (its config lags lbd's).
    pub state: String,
    /// Routes BIRD exports on the session.
    pub exported: u64,
}

impl SessionStatus {
    /// Whether the session is established.
    pub fn up(&self) -> bool {
        self.state == "Established"
    }
}

/// BIRD's view, read for one scrape.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BgpStatus {
    /// BIRD did not answer (or not within [`STATUS_TIMEOUT`]).
    Unreachable(String),
    Read {
        sessions: Vec<SessionStatus>,
        /// VIP addresses in BIRD's static protocols.
        announced: BTreeSet<IpAddr>,
    },
}

/// Reads BIRD's view of `settings`' sessions from the BIRD at `paths`.
pub async fn read(paths: &BirdPaths, settings: &BgpSettings) -> BgpStatus {
    match tokio::time::timeout(STATUS_TIMEOUT, query(&paths.socket(), settings)).await {
        Ok(Ok(status)) => status,
        Ok(Err(e)) => BgpStatus::Unreachable(e.to_string()),
        Err(_) => BgpStatus::Unreachable(format!("no answer within {STATUS_TIMEOUT:?}")),
    }
}

async fn query(socket: &Path, settings: &BgpSettings) -> Result<BgpStatus, BirdError> {
    let protocols = bird_command(socket, "show protocols all \"router_*\"").await?;
    let mut announced = BTreeSet::new();
    for table in ["lb_vips_v4", "lb_vips_v6"] {
        let routes = bird_command(socket, &format!("show route protocol {table}")).await?;
        announced.extend(route_addresses(&routes));
    }
    let parsed = sessions(&protocols);
    let sessions = settings
        .neighbors
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let name = format!("router_{}", i + 1);
            let (state, exported) = parsed
                .iter()
                .find(|(p, _, _)| *p == name)
                .map_or(("unknown".to_string(), 0), |(_, s, e)| (s.clone(), *e));
            SessionStatus {
                neighbor: n.address,
                state,
                exported,
            }
        })
        .collect();
    Ok(BgpStatus::Read {
        sessions,
        announced,
    })
}

/// (protocol, BGP state, routes exported) from `show protocols all`: a
/// protocol starts at a line of code 1002 (`router_1  BGP  ---  up ...`),
/// its details follow as code 1006 lines (`BGP state:  Established`,
/// `Routes:  0 imported, 2 exported, 0 preferred`).
fn sessions(reply: &[(u16, String)]) -> Vec<(String, String, u64)> {
    let mut out: Vec<(String, String, u64)> = Vec::new();
    for (code, line) in reply {
        match code {
            1002 => {
                if let Some(name) = line.split_whitespace().next() {
                    out.push((name.to_string(), "unknown".into(), 0));
                }
            }
            1006 => {
                let Some(last) = out.last_mut() else { continue };
                let line = line.trim();
                if let Some(state) = line.strip_prefix("BGP state:") {
                    last.1 = state.trim().to_string();
                } else if let Some(routes) = line.strip_prefix("Routes:") {
                    last.2 = routes
                        .split(',')
                        .find_map(|part| part.trim().strip_suffix(" exported"))
                        .and_then(|n| n.trim().parse().ok())
                        .unwrap_or(0);
                }
            }
            _ => {}
        }
    }
    out
}

/// The addresses of `show route` lines (`203.0.113.10/32  blackhole [...]`).
fn route_addresses(reply: &[(u16, String)]) -> impl Iterator<Item = IpAddr> + '_ {
    reply
        .iter()
        .filter(|(code, _)| *code == 1007)
        .filter_map(|(_, line)| line.split_whitespace().next())
        .filter_map(|prefix| prefix.split_once('/'))
        .filter_map(|(addr, _)| addr.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(text: &str) -> Vec<(u16, String)> {
        // As bird_command returns them: continuation lines carry the code
        // of the line they continue.
        let mut code = 0;
        text.lines()
            .map(|l| {
                if let Some(rest) = l.strip_prefix(' ') {
                    (code, rest.to_string())
                } else {
                    code = l[..4].parse().unwrap();
                    (code, l[5..].to_string())
                }
            })
            .collect()
    }

    #[test]
    fn sessions_and_routes_from_birds_replies() {
        // BIRD 2.0.12's replies (the second session established).
        let protocols = lines(
            "1002-router_1   BGP        ---        start  20:36:38.593  Active        Socket: Connection refused\n\
             1006-  Description:    10.0.0.254\n\
             \x20      BGP state:          Active\n\
             \x20        Neighbor address: 10.0.0.254\n\
             \x20      Channel ipv4\n\
             \x20        State:          DOWN\n\
             1002-router_2   BGP        ---        up     20:36:40.001  Established\n\
             1006-  Description:    fd00::254\n\
             \x20      BGP state:          Established\n\
             \x20      Channel ipv6\n\
             \x20        State:          UP\n\
             \x20        Routes:         0 imported, 2 exported, 0 preferred\n\
             0000 \n",
        );
        assert_eq!(
            sessions(&protocols),
            vec![
                ("router_1".into(), "Active".into(), 0),
                ("router_2".into(), "Established".into(), 2),
            ]
        );
        let routes = lines(
            "1007-Table master4:\n\
             \x20    203.0.113.11/32      blackhole [lb_vips_v4 20:36:38.570] * (200)\n\
             \x20    203.0.113.10/32      blackhole [lb_vips_v4 20:36:38.570] * (200)\n\
             0000 \n",
        );
        let got: Vec<IpAddr> = route_addresses(&routes).collect();
        assert_eq!(
            got,
            [
                "203.0.113.11".parse::<IpAddr>().unwrap(),
                "203.0.113.10".parse().unwrap()
            ]
        );
    }
}
