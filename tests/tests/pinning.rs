//! Pinned state: adopted when it fits, refused with a clear message when it
//! does not, removed by cleanup.

use std::{
    path::PathBuf,
    sync::atomic::{AtomicU32, Ordering},
};

use aya::maps::{Array, Map, MapData};
use lb::{
    dataplane::{Dataplane, DataplaneError, pinning, upgrade},
    desired::config,
};
use lb_common::{DataplaneConfig, map_name};
use lb_tests::require_root;

const CONFIG: &str = r#"
[balancer]
source_v4 = "10.200.0.1"
max_vips = 4
max_backends = 16

[conntrack]
size = 4096

[[vip]]
address = "203.0.113.10"
port = 80
protocol = "tcp"
backends = [ { address = "10.200.0.11", weight = 1 }, { address = "10.200.0.12", weight = 2 } ]
"#;

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A unique instance directory, removed on drop.
struct Instance(PathBuf);

impl Instance {
    fn new() -> Instance {
        require_root();
        pinning::ensure_bpffs().unwrap();
        let name = format!(
            "lbt-pin-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        Instance(pinning::instance_dir(&name))
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        let _ = pinning::cleanup(&self.0);
    }
}

#[test]
fn a_second_load_adopts_the_vips_and_backends() {
    let dir = Instance::new();
    let c = config::parse(CONFIG, "test").unwrap();
    let mut dp = Dataplane::load_pinned(&c.balancer, &dir.0).unwrap();
    assert!(!dp.adopted());
    dp.sync(&c.vips).unwrap();
    let table = dp.table(&c.vips[0].addr).unwrap().clone();
    drop(dp);

    let mut dp = Dataplane::load_pinned(&c.balancer, &dir.0).unwrap();
    assert!(dp.adopted());
    assert_eq!(dp.vips().collect::<Vec<_>>(), vec![&c.vips[0].addr]);
    assert_eq!(
        dp.table(&c.vips[0].addr),
        Some(&table),
        "the active table is read back"
    );
    // Applying the same config rebuilds to the same table.
    dp.sync(&c.vips).unwrap();
    assert_eq!(dp.table(&c.vips[0].addr), Some(&table));
}

#[test]
fn a_different_layout_is_refused_and_left_alone() {
    let dir = Instance::new();
    let c = config::parse(CONFIG, "test").unwrap();
    let mut dp = Dataplane::load_pinned(&c.balancer, &dir.0).unwrap();
    dp.sync(&c.vips).unwrap();
    drop(dp);
    // What `lbd --check` says of it (it reads only).
    let said = upgrade::describe(&dir.0, &c.balancer).unwrap().join("\n");
    println!("lbd --check of this build's state: {said}");
    assert!(said.contains("it would be adopted"), "{said}");

    // Other capacities.
    let bigger = config::parse(&CONFIG.replace("max_vips = 4", "max_vips = 8"), "test").unwrap();
    let said = upgrade::describe(&dir.0, &bigger.balancer).unwrap_err();
    println!("lbd --check with other capacities: {said}");
    assert!(said.contains("LB_VIPS"), "{said}");
    let err = Dataplane::load_pinned(&bigger.balancer, &dir.0)
        .err()
        .expect("refused");
    let msg = format!("{err:#}");
    assert!(matches!(err, DataplaneError::Incompatible(_)), "{msg}");
    assert!(
        msg.contains("LB_VIPS") && msg.contains("holds 4 entries") && msg.contains("lbd --cleanup"),
        "{msg}"
    );

    // Another layout version.
    let data = MapData::from_pin(dir.0.join(map_name::CONFIG)).unwrap();
    let mut cfg_map: Array<MapData, DataplaneConfig> = Map::Array(data).try_into().unwrap();
    let mut cfg = cfg_map.get(&0, 0).unwrap();
    cfg.layout_version += 1;
    cfg_map.set(0, cfg, 0).unwrap();
    let err = Dataplane::load_pinned(&c.balancer, &dir.0)
        .err()
        .expect("refused");
    let msg = format!("{err:#}");
    assert!(msg.contains("layout version"), "{msg}");
    let said = upgrade::describe(&dir.0, &c.balancer).unwrap_err();
    println!("lbd --check of an unknown layout: {said}");
    assert!(said.contains("converts from"), "{said}");

    // Nothing was touched: the maps are still there.
    for m in map_name::STATE {
        assert!(dir.0.join(m).exists(), "{m}");
    }
}

#[test]
fn cleanup_removes_every_pinned_object() {
    let dir = Instance::new();
    let c = config::parse(CONFIG, "test").unwrap();
    drop(Dataplane::load_pinned(&c.balancer, &dir.0).unwrap());
    assert!(pinning::has_state(&dir.0));
    let removed = pinning::cleanup(&dir.0).unwrap();
    assert_eq!(removed.len(), map_name::STATE.len());
    assert!(!dir.0.exists());
}
