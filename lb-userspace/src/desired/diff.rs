//! What changed between two desired states, one event per change, so that
//! every state change is logged once (at info), whatever caused it: an API
//! request, a config reload, start-up. The cause is the enclosing
//! `tracing` span's `cause` field (see the controller).

use std::{collections::BTreeMap, fmt, net::IpAddr};

use serde::Serialize;

use crate::desired::vip::{Backend, Vip, VipAddr};

/// One change of the desired state. As JSON (the API's diffs): `change`
/// names the kind (`vip_added`, `backend_removed`, ...), the other fields
/// as below, plus `text`, the change in words.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "change", rename_all = "snake_case")]
pub enum StateChange {
    VipAdded {
        #[serde(serialize_with = "display")]
        vip: VipAddr,
        backends: usize,
    },
    VipRemoved {
        #[serde(serialize_with = "display")]
        vip: VipAddr,
    },
    /// A VIP setting other than its backends (`scheduler`, `on_backend_down`).
    VipSetting {
        #[serde(serialize_with = "display")]
        vip: VipAddr,
        setting: &'static str,
        from: String,
        to: String,
    },
    BackendAdded {
        #[serde(serialize_with = "display")]
        vip: VipAddr,
        backend: IpAddr,
        weight: u32,
        drained: bool,
    },
    BackendRemoved {
        #[serde(serialize_with = "display")]
        vip: VipAddr,
        backend: IpAddr,
    },
    WeightChanged {
        #[serde(serialize_with = "display")]
        vip: VipAddr,
        backend: IpAddr,
        from: u32,
        to: u32,
    },
    Drained {
        #[serde(serialize_with = "display")]
        vip: VipAddr,
        backend: IpAddr,
    },
    Undrained {
        #[serde(serialize_with = "display")]
        vip: VipAddr,
        backend: IpAddr,
    },
    /// A backend's own `health` or `load` overrides.
    BackendSetting {
        #[serde(serialize_with = "display")]
        vip: VipAddr,
        backend: IpAddr,
        setting: &'static str,
        from: String,
        to: String,
    },
}

fn display<S: serde::Serializer>(v: &VipAddr, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

impl StateChange {
    /// The VIP it changes.
    pub fn vip(&self) -> VipAddr {
        match self {
            StateChange::VipAdded { vip, .. }
            | StateChange::VipRemoved { vip }
            | StateChange::VipSetting { vip, .. }
            | StateChange::BackendAdded { vip, .. }
            | StateChange::BackendRemoved { vip, .. }
            | StateChange::WeightChanged { vip, .. }
            | StateChange::Drained { vip, .. }
            | StateChange::Undrained { vip, .. }
            | StateChange::BackendSetting { vip, .. } => *vip,
        }
    }

    /// The change as the API shows it: its fields and `text`.
    pub fn to_json(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).expect("plain data");
        v["text"] = serde_json::Value::String(self.to_string());
        v
    }
}

/// Every change from `old` to `new`, VIPs in address order.
pub fn diff(old: &[Vip], new: &[Vip]) -> Vec<StateChange> {
    let before: BTreeMap<VipAddr, &Vip> = old.iter().map(|v| (v.addr, v)).collect();
    let after: BTreeMap<VipAddr, &Vip> = new.iter().map(|v| (v.addr, v)).collect();
    let mut out = Vec::new();
    for addr in before.keys() {
        if !after.contains_key(addr) {
            out.push(StateChange::VipRemoved { vip: *addr });
        }
    }
    for (addr, v) in &after {
        let Some(was) = before.get(addr) else {
            out.push(StateChange::VipAdded {
                vip: *addr,
                backends: v.backends.len(),
            });
            continue;
        };
        if was.scheduler != v.scheduler {
            out.push(StateChange::VipSetting {
                vip: *addr,
                setting: "scheduler",
                from: was.scheduler.to_string(),
                to: v.scheduler.to_string(),
            });
        }
        let settings = [
            (
                "hash_fields",
                was.scheduler.hash_fields().unwrap_or("-").to_string(),
                v.scheduler.hash_fields().unwrap_or("-").to_string(),
            ),
            (
                "on_backend_down",
                was.on_backend_down.to_string(),
                v.on_backend_down.to_string(),
            ),
            (
                "on_all_down",
                was.on_all_down.to_string(),
                v.on_all_down.to_string(),
            ),
            (
                "slow_start",
                format!("{}s", was.slow_start.as_secs_f64()),
                format!("{}s", v.slow_start.as_secs_f64()),
            ),
        ];
        for (setting, from, to) in settings {
            if from != to {
                out.push(StateChange::VipSetting {
                    vip: *addr,
                    setting,
                    from,
                    to,
                });
            }
        }
        if was.health != v.health {
            out.push(StateChange::VipSetting {
                vip: *addr,
                setting: "health",
                from: format!("{:?}", was.health),
                to: format!("{:?}", v.health),
            });
        }
        if was.load != v.load {
            out.push(StateChange::VipSetting {
                vip: *addr,
                setting: "load",
                from: format!("{:?}", was.load),
                to: format!("{:?}", v.load),
            });
        }
        backends(*addr, &was.backends, &v.backends, &mut out);
    }
    out
}

fn backends(vip: VipAddr, old: &[Backend], new: &[Backend], out: &mut Vec<StateChange>) {
    let before: BTreeMap<IpAddr, &Backend> = old.iter().map(|b| (b.addr, b)).collect();
    let after: BTreeMap<IpAddr, &Backend> = new.iter().map(|b| (b.addr, b)).collect();
    for addr in before.keys() {
        if !after.contains_key(addr) {
            out.push(StateChange::BackendRemoved {
                vip,
                backend: *addr,
            });
        }
    }
    for (addr, b) in &after {
        let Some(was) = before.get(addr) else {
            out.push(StateChange::BackendAdded {
                vip,
                backend: *addr,
                weight: b.weight,
                drained: b.drained,
            });
            continue;
        };
        if was.weight != b.weight {
            out.push(StateChange::WeightChanged {
                vip,
                backend: *addr,
                from: was.weight,
                to: b.weight,
            });
        }
        match (was.drained, b.drained) {
            (false, true) => out.push(StateChange::Drained {
                vip,
                backend: *addr,
            }),
            (true, false) => out.push(StateChange::Undrained {
                vip,
                backend: *addr,
            }),
            _ => {}
        }
        // Formatted only when they differ: a diff of thousands of
        // backends compares, it does not print.
        if was.health != b.health {
            out.push(StateChange::BackendSetting {
                vip,
                backend: *addr,
                setting: "health",
                from: format!("{:?}", was.health),
                to: format!("{:?}", b.health),
            });
        }
        if was.load != b.load {
            out.push(StateChange::BackendSetting {
                vip,
                backend: *addr,
                setting: "load",
                from: format!("{:?}", was.load),
                to: format!("{:?}", b.load),
            });
        }
    }
}

impl StateChange {
    /// Logs the change at info, with its VIP and backend as fields.
    pub fn log(&self) {
        match self {
            StateChange::VipAdded { vip, backends } => {
                tracing::info!(%vip, backends, "VIP added")
            }
            StateChange::VipRemoved { vip } => tracing::info!(%vip, "VIP removed"),
            StateChange::VipSetting {
                vip,
                setting,
                from,
                to,
            } => tracing::info!(%vip, setting, %from, %to, "VIP setting changed"),
            StateChange::BackendAdded {
                vip,
                backend,
                weight,
                drained,
            } => tracing::info!(%vip, %backend, weight, drained, "backend added"),
            StateChange::BackendRemoved { vip, backend } => {
                tracing::info!(%vip, %backend, "backend removed")
            }
            StateChange::WeightChanged {
                vip,
                backend,
                from,
                to,
            } => tracing::info!(%vip, %backend, from, to, "backend weight changed"),
            StateChange::Drained { vip, backend } => {
                tracing::info!(%vip, %backend, "backend drained (no new flows)")
            }
            StateChange::Undrained { vip, backend } => {
                tracing::info!(%vip, %backend, "backend undrained (takes new flows)")
            }
            StateChange::BackendSetting {
                vip,
                backend,
                setting,
                from,
                to,
            } => tracing::info!(%vip, %backend, setting, %from, %to, "backend setting changed"),
        }
    }
}

impl fmt::Display for StateChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StateChange::VipAdded { vip, backends } => {
                write!(f, "VIP {vip} added with {backends} backends")
            }
            StateChange::VipRemoved { vip } => write!(f, "VIP {vip} removed"),
            StateChange::VipSetting {
                vip,
                setting,
                from,
                to,
            } => write!(f, "VIP {vip}: {setting} {from} -> {to}"),
            StateChange::BackendAdded {
                vip,
                backend,
                weight,
                drained,
            } => write!(
                f,
                "VIP {vip}: backend {backend} added (weight {weight}{})",
                if *drained { ", drained" } else { "" }
            ),
            StateChange::BackendRemoved { vip, backend } => {
                write!(f, "VIP {vip}: backend {backend} removed")
            }
            StateChange::WeightChanged {
                vip,
                backend,
                from,
                to,
            } => write!(f, "VIP {vip}: backend {backend} weight {from} -> {to}"),
            StateChange::Drained { vip, backend } => {
                write!(f, "VIP {vip}: backend {backend} drained")
            }
            StateChange::Undrained { vip, backend } => {
                write!(f, "VIP {vip}: backend {backend} undrained")
            }
            StateChange::BackendSetting {
                vip,
                backend,
                setting,
                from,
                to,
            } => write!(f, "VIP {vip}: backend {backend} {setting} {from} -> {to}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desired::config;

    fn vips(toml: &str) -> Vec<Vip> {
        let toml = format!("[balancer]\nsource_v4 = \"10.0.0.254\"\n{toml}");
        config::parse(&toml, "test").unwrap().vips
    }

    #[test]
    fn every_kind_of_change_is_reported_once() {
        let old = vips(
            r#"
[[vip]]
address = "203.0.113.10"
port = 80
protocol = "tcp"
backends = [
  { address = "10.0.0.1", weight = 1 },
  { address = "10.0.0.2", weight = 1 },
  { address = "10.0.0.3", weight = 1, drained = true },
]
[[vip]]
address = "203.0.113.11"
port = 80
protocol = "tcp"
backends = [ { address = "10.0.0.1", weight = 1 } ]
"#,
        );
        let new = vips(
            r#"
[[vip]]
address = "203.0.113.10"
port = 80
protocol = "tcp"
on_backend_down = "stick"
backends = [
  { address = "10.0.0.1", weight = 5 },
  { address = "10.0.0.3", weight = 1 },
  { address = "10.0.0.4", weight = 2, drained = true },
]
[[vip]]
address = "203.0.113.12"
port = 80
protocol = "tcp"
backends = [ { address = "10.0.0.1", weight = 1 } ]
"#,
        );
        let changes: Vec<String> = diff(&old, &new).iter().map(|c| c.to_string()).collect();
        assert_eq!(
            changes,
            [
                "VIP 203.0.113.11:80/tcp removed",
                "VIP 203.0.113.10:80/tcp: on_backend_down reschedule -> stick",
                "VIP 203.0.113.10:80/tcp: backend 10.0.0.2 removed",
                "VIP 203.0.113.10:80/tcp: backend 10.0.0.1 weight 1 -> 5",
                "VIP 203.0.113.10:80/tcp: backend 10.0.0.3 undrained",
                "VIP 203.0.113.10:80/tcp: backend 10.0.0.4 added (weight 2, drained)",
                "VIP 203.0.113.12:80/tcp added with 1 backends",
            ]
        );
        assert!(diff(&new, &new).is_empty(), "no change, nothing reported");
    }
}
