//! Changes to the desired state that operators ask for at run time (API,
//! `lbctl`). A change is applied to a copy of the config and the result is
//! validated as a whole before anything else happens; the controller then
//! persists it and programs the data plane.

use std::net::IpAddr;

use serde::Serialize;

use crate::{
    desired::config::{self, Config, Problem, VipPatch},
    desired::vip::{Backend, Scheduler, Vip, VipAddr},
};

/// A change to the desired state.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "change", rename_all = "snake_case")]
pub enum Change {
    AddVip {
        #[serde(serialize_with = "display")]
        vip: VipAddr,
        #[serde(skip)]
        spec: Vip,
    },
    RemoveVip {
        #[serde(serialize_with = "display")]
        vip: VipAddr,
    },
    /// New settings of a VIP (its scheduler, policies); established flows
    /// keep their backends.
    UpdateVip {
        #[serde(serialize_with = "display")]
        vip: VipAddr,
        #[serde(flatten)]
        patch: Patch,
    },
    AddBackend {
        #[serde(serialize_with = "display")]
        vip: VipAddr,
        backend: IpAddr,
        weight: u32,
        drained: bool,
        #[serde(skip)]
        spec: Backend,
    },
    RemoveBackend {
        #[serde(serialize_with = "display")]
        vip: VipAddr,
        backend: IpAddr,
    },
    UpdateBackend {
        #[serde(serialize_with = "display")]
        vip: VipAddr,
        backend: IpAddr,
        weight: Option<u32>,
        drained: Option<bool>,
    },
    /// The whole set of VIPs (`PUT /v1/vips`): VIPs not in it are removed.
    ReplaceAll {
        #[serde(serialize_with = "count")]
        vips: Vec<Vip>,
    },
    /// One VIP with its backends and settings (`PUT /v1/vips/VIP`); added
    /// if it is not there.
    ReplaceVip {
        #[serde(serialize_with = "display")]
        vip: VipAddr,
        #[serde(skip)]
        spec: Box<Vip>,
    },
}

fn count<S: serde::Serializer>(v: &[Vip], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(v.len() as u64)
}

/// Indexes of VIP `vip` and its backend `backend` in `c`.
fn backend_index(
    c: &Config,
    vip: &VipAddr,
    backend: &IpAddr,
) -> Result<(usize, usize), ChangeError> {
    let i = c
        .vips
        .iter()
        .position(|v| v.addr == *vip)
        .ok_or(ChangeError::UnknownVip(*vip))?;
    let j = c.vips[i]
        .backends
        .iter()
        .position(|b| b.addr == *backend)
        .ok_or(ChangeError::UnknownBackend {
            vip: *vip,
            backend: *backend,
        })?;
    Ok((i, j))
}

fn display<S: serde::Serializer>(v: &VipAddr, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

/// A [`VipPatch`] as the audit log records it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Patch(#[serde(serialize_with = "patch_fields")] pub VipPatch);

fn patch_fields<S: serde::Serializer>(p: &VipPatch, s: S) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeMap;
    let mut m = s.serialize_map(None)?;
    if let Some(x) = p.scheduler {
        m.serialize_entry("scheduler", &x.to_string())?;
    }
    if let Some(x) = p.hash_port {
        m.serialize_entry("hash_fields", if x { "address-port" } else { "address" })?;
    }
    if let Some(x) = p.on_backend_down {
        m.serialize_entry("on_backend_down", &x.to_string())?;
    }
    if let Some(x) = p.on_all_down {
        m.serialize_entry("on_all_down", &x.to_string())?;
    }
    if let Some(x) = p.slow_start {
        m.serialize_entry("slow_start", &x.as_secs_f64())?;
    }
    m.end()
}

/// Why a change was refused. Nothing changed.
#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    #[error("no VIP {0}")]
    UnknownVip(VipAddr),
    #[error("VIP {vip} has no backend {backend}")]
    UnknownBackend { vip: VipAddr, backend: IpAddr },
    #[error("VIP {0} exists already")]
    DuplicateVip(VipAddr),
    #[error("VIP {vip} has backend {backend} already")]
    DuplicateBackend { vip: VipAddr, backend: IpAddr },
    #[error("the change would make the config invalid: {}", problems.iter().map(|p| format!("{}: {}", p.field, p.message)).collect::<Vec<_>>().join("; "))]
    Invalid { problems: Vec<Problem> },
}

impl Change {
    /// Adds `spec`.
    pub fn add_vip(spec: Vip) -> Change {
        Change::AddVip {
            vip: spec.addr,
            spec,
        }
    }

    /// Adds `backend` to `vip`.
    pub fn add_backend(vip: VipAddr, backend: Backend) -> Change {
        Change::AddBackend {
            vip,
            backend: backend.addr,
            weight: backend.weight,
            drained: backend.drained,
            spec: backend,
        }
    }

    /// The config with this change made, validated as a whole.
    pub fn apply_to(&self, current: &Config) -> Result<Config, ChangeError> {
        let mut next = current.clone();
        let find = |c: &mut Config, vip: &VipAddr| -> Result<usize, ChangeError> {
            c.vips
                .iter()
                .position(|v| v.addr == *vip)
                .ok_or(ChangeError::UnknownVip(*vip))
        };
        match self {
            Change::ReplaceAll { vips } => next.vips = vips.clone(),
            Change::ReplaceVip { vip, spec } => {
                match next.vips.iter().position(|v| v.addr == *vip) {
                    Some(i) => next.vips[i] = (**spec).clone(),
                    None => next.vips.push((**spec).clone()),
                }
            }
            Change::AddVip { vip, spec } => {
                if next.vips.iter().any(|v| v.addr == *vip) {
                    return Err(ChangeError::DuplicateVip(*vip));
                }
                next.vips.push(spec.clone());
            }
            Change::RemoveVip { vip } => {
                let i = find(&mut next, vip)?;
                next.vips.remove(i);
            }
            Change::UpdateVip {
                vip,
                patch: Patch(p),
            } => {
                let i = find(&mut next, vip)?;
                let v = &mut next.vips[i];
                if let Some(x) = p.scheduler {
                    v.scheduler = x;
                }
                if let Some(port) = p.hash_port {
                    match &mut v.scheduler {
                        Scheduler::MaglevSrc { with_port } => *with_port = port,
                        other => {
                            return Err(ChangeError::Invalid {
                                problems: vec![Problem {
                                    field: "hash_fields".into(),
                                    message: format!(
                                        "only the \"maglev-src\" scheduler hashes by source, not \"{other}\""
                                    ),
                                }],
                            });
                        }
                    }
                }
                if let Some(x) = p.on_backend_down {
                    v.on_backend_down = x;
                }
                if let Some(x) = p.on_all_down {
                    v.on_all_down = x;
                }
                if let Some(x) = p.slow_start {
                    v.slow_start = x;
                }
            }
            Change::AddBackend {
                vip, backend, spec, ..
            } => {
                let i = find(&mut next, vip)?;
                let v = &mut next.vips[i];
                if v.backends.iter().any(|b| b.addr == *backend) {
                    return Err(ChangeError::DuplicateBackend {
                        vip: *vip,
                        backend: *backend,
                    });
                }
                v.backends.push(spec.clone());
            }
            Change::RemoveBackend { vip, backend } => {
                let (i, j) = backend_index(&next, vip, backend)?;
                next.vips[i].backends.remove(j);
            }
            Change::UpdateBackend {
                vip,
                backend,
                weight,
                drained,
            } => {
                let (i, j) = backend_index(&next, vip, backend)?;
                let b = &mut next.vips[i].backends[j];
                if let Some(w) = weight {
                    b.weight = *w;
                }
                if let Some(d) = drained {
                    b.drained = *d;
                }
            }
        }
        config::validate(&next).map_err(|problems| ChangeError::Invalid { problems })?;
        Ok(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = r#"
        [balancer]
        source_v4 = "192.0.2.1"
        max_vips = 2
        [[vip]]
        address = "203.0.113.10"
        port = 80
        protocol = "tcp"
        backends = [ { address = "10.0.0.11", weight = 1 } ]
    "#;

    fn config() -> Config {
        config::parse(CONFIG, "t").unwrap()
    }

    fn vip() -> VipAddr {
        "203.0.113.10:80/tcp".parse().unwrap()
    }

    #[test]
    fn backend_changes_apply_and_unknowns_are_named() {
        let c = config();
        let b: IpAddr = "10.0.0.12".parse().unwrap();
        let c = Change::add_backend(vip(), Backend::new(b, 5))
            .apply_to(&c)
            .unwrap();
        assert_eq!(c.vips[0].backends[1], Backend::new(b, 5));
        let c = Change::UpdateBackend {
            vip: vip(),
            backend: b,
            weight: None,
            drained: Some(true),
        }
        .apply_to(&c)
        .unwrap();
        assert_eq!(c.vips[0].backends[1].effective_weight(), 0);
        assert_eq!(c.vips[0].backends[1].weight, 5, "drain keeps the weight");
        assert!(matches!(
            Change::add_backend(vip(), Backend::new(b, 1)).apply_to(&c),
            Err(ChangeError::DuplicateBackend { .. })
        ));
        let other: VipAddr = "203.0.113.99:80/tcp".parse().unwrap();
        assert!(matches!(
            Change::RemoveVip { vip: other }.apply_to(&c),
            Err(ChangeError::UnknownVip(_))
        ));
    }

    #[test]
    fn a_change_that_breaks_the_config_is_refused() {
        let c = config();
        // An IPv6 backend without an IPv6 source address.
        let err = Change::add_backend(vip(), Backend::new("2001:db8::5".parse().unwrap(), 1))
            .apply_to(&c)
            .unwrap_err();
        assert!(err.to_string().contains("balancer.source_v6"), "{err}");
        // Capacity.
        let mut spec = c.vips[0].clone();
        spec.addr.port = 81;
        let c = Change::add_vip(spec.clone()).apply_to(&c).unwrap();
        spec.addr.port = 82;
        let err = Change::add_vip(spec).apply_to(&c).unwrap_err();
        assert!(err.to_string().contains("max_vips"), "{err}");
    }
}
