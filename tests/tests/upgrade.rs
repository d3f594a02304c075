//! Upgrades keep flows: the pinned state of earlier layouts (fixtures of
//! them, tests/fixtures/layout-N, with 10,000 flows in their tables and
//! their own program attached) is converted by this build's lbd, through
//! the chain of converters, and lbd swaps its program in: every flow keeps
//! its backend, no packet sees a half-converted table, the old maps are
//! gone afterwards.

use std::{
    os::fd::AsFd,
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    thread,
    time::{Duration, Instant},
};

use lb::dataplane::{pinning, upgrade};
use lb_common::LAYOUT_VERSION;
use lb_tests::{
    fixture::{self, Fixture},
    frames::{self, Flow, FrameSpec, parse_encapsulated},
    lab::{lbd_path, spawn_in},
    netns::Netns,
    require_root,
    xdp::{link_program, link_program_id, map_exists, pinned_fd, run_xdp_fd},
};

/// Removes the instance's pinned state and temp files when the test ends.
struct Cleanup(std::path::PathBuf, std::path::PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = pinning::cleanup_instance(&self.0);
        let _ = std::fs::remove_dir_all(&self.1);
    }
}

/// Runs every flow through the program the link runs now: how many went
/// elsewhere than their recorded backend (or were not forwarded).
fn misrouted(
    link: std::os::fd::BorrowedFd<'_>,
    flows: &[(Flow, std::net::IpAddr)],
    mac: [u8; 6],
    ifindex: u32,
) -> usize {
    let prog = link_program(link).unwrap();
    let spec = FrameSpec {
        dst_mac: mac,
        ..Default::default()
    };
    flows
        .iter()
        .filter(|(f, b)| {
            let r = run_xdp_fd(prog.as_fd(), &frames::build(f, &spec), ifindex, 1).unwrap();
            r.action != 3 || parse_encapsulated(&r.frame).map(|e| e.outer.dst()).ok() != Some(*b)
        })
        .count()
}

#[test]
fn the_previous_layouts_state_converts_keeping_every_flow_and_the_old_maps_go() {
    // Every layout with a converter (each has a fixture), converted through
    // the chain.
    for layout in upgrade::known_layouts() {
        converts_keeping_every_flow(layout);
    }
}

fn converts_keeping_every_flow(layout: u32) {
    require_root();
    let fdir = fixture::dir(layout);
    let flows = Fixture::flows(&fdir).unwrap();
    assert_eq!(flows.len(), fixture::FLOWS);
    let ns = Netns::new("upgrade").unwrap();
    fixture::balancer_host(&ns).unwrap();
    let (ifindex, mac) = (ns.ifindex("lb0").unwrap(), ns.mac("lb0").unwrap());
    let instance = format!("lbt-upgrade-{}-{layout}", std::process::id());
    let dir = pinning::instance_dir(&instance);
    let tmp = std::env::temp_dir().join(&instance);
    std::fs::create_dir_all(&tmp).unwrap();
    let _cleanup = Cleanup(dir.clone(), tmp.clone());

    // The old data plane, as its lbd left it when it stopped.
    let old = {
        let _inside = ns.enter().unwrap();
        fixture::restore(&fdir, &dir, "lb0", ifindex, mac).unwrap()
    };
    assert_eq!(upgrade::pinned_layout(&dir), Ok(layout));
    let link = pinned_fd(&dir.join("link")).unwrap();
    let before = {
        let _inside = ns.enter().unwrap();
        misrouted(link.as_fd(), &flows, mac, ifindex)
    };
    assert_eq!(before, 0, "the old program sends every flow to its backend");

    // `lbd --check` says what a start would do, and changes nothing.
    let config = tmp.join("lbd.toml");
    let text = std::fs::read_to_string(fdir.join("config.toml")).unwrap()
        + &format!(
            "[metrics]\nlisten = \"127.0.0.1:9480\"\n\n[api]\nsocket = \"{}\"\naudit_log = \"{}\"\n",
            tmp.join("api.sock").display(),
            tmp.join("audit.log").display()
        );
    // `[metrics]` and `[api]` must come before the `[[vip]]` tables.
    let (head, vips) = text.split_at(text.find("[[vip]]").unwrap());
    let tail = &vips[vips.find("[metrics]").unwrap()..];
    let vips = &vips[..vips.find("[metrics]").unwrap()];
    std::fs::write(&config, format!("{head}{tail}\n{vips}")).unwrap();
    let check = std::process::Command::new(lbd_path().unwrap())
        .args(["--check", "--instance", &instance, "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&check.stdout);
    println!("lbd --check:\n{said}");
    assert!(
        check.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&check.stderr)
    );
    assert!(said.contains("it would be converted to layout"), "{said}");
    assert_eq!(upgrade::pinned_layout(&dir), Ok(layout));

    // The new lbd converts while packets of established flows run.
    let log = tmp.join("lbd.log");
    let stop = AtomicBool::new(false);
    let (runs, wrong, programs) = (AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0));
    let started = Instant::now();
    let mut lbd = thread::scope(|s| {
        s.spawn(|| {
            let _inside = ns.enter().unwrap();
            let spec = FrameSpec {
                dst_mac: mac,
                ..Default::default()
            };
            let frames: Vec<(Vec<u8>, std::net::IpAddr)> = flows
                .iter()
                .map(|(f, b)| (frames::build(f, &spec), *b))
                .collect();
            let mut last_prog = None;
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                // The program the link runs at this moment.
                let id = Some(link_program_id(link.as_fd()).unwrap());
                let prog = link_program(link.as_fd()).unwrap();
                if id != last_prog {
                    programs.fetch_add(1, Ordering::Relaxed);
                    last_prog = id;
                }
                for _ in 0..50 {
                    let (frame, b) = &frames[i % frames.len()];
                    i += 1;
                    let r = run_xdp_fd(prog.as_fd(), frame, ifindex, 1).unwrap();
                    let ok = r.action == 3
                        && parse_encapsulated(&r.frame).map(|e| e.outer.dst()).ok() == Some(*b);
                    runs.fetch_add(1, Ordering::Relaxed);
                    if !ok {
                        wrong.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        });
        let config = config.to_str().unwrap();
        let lbd = spawn_in(
            &ns,
            &lbd_path().unwrap(),
            &[
                "--config",
                config,
                "--iface",
                "lb0",
                "--xdp-mode",
                "native",
                "--instance",
                &instance,
            ],
            &log,
            "info",
        )
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        while !std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("upgrade done")
        {
            assert!(
                Instant::now() < deadline,
                "lbd did not finish the upgrade; log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            thread::sleep(Duration::from_millis(20));
        }
        // Packets through the new program for a while.
        thread::sleep(Duration::from_millis(500));
        stop.store(true, Ordering::Relaxed);
        lbd
    });
    let took = started.elapsed();
    let lbd_log = std::fs::read_to_string(&log).unwrap();
    println!(
        "upgrade from layout {layout} to {LAYOUT_VERSION} in {:.1} s: {} packets of established flows during it, {} misrouted, {} programs seen",
        took.as_secs_f64(),
        runs.load(Ordering::Relaxed),
        wrong.load(Ordering::Relaxed),
        programs.load(Ordering::Relaxed)
    );
    for l in lbd_log
        .lines()
        .filter(|l| l.contains("LB_") || l.contains("upgrade") || l.contains("converting"))
    {
        println!("  {l}");
    }
    assert_eq!(
        wrong.load(Ordering::Relaxed),
        0,
        "a packet saw a half-converted table"
    );
    assert!(runs.load(Ordering::Relaxed) > 1000);
    assert_eq!(
        programs.load(Ordering::Relaxed),
        2,
        "the old program, then the new one"
    );

    // Every flow keeps its backend through the new program, though the
    // table (b4 added after the flows began) would move a fifth of them.
    let after = {
        let _inside = ns.enter().unwrap();
        misrouted(link.as_fd(), &flows, mac, ifindex)
    };
    assert_eq!(after, 0, "flows lost their backend in the upgrade");
    assert_eq!(upgrade::pinned_layout(&dir), Ok(LAYOUT_VERSION));
    assert!(!upgrade::staging_dir(&dir).exists());
    // The old maps are gone once nothing uses them.
    let deadline = Instant::now() + Duration::from_secs(10);
    while old.map_ids.iter().any(|id| map_exists(*id)) {
        assert!(
            Instant::now() < deadline,
            "the old maps outlived the upgrade"
        );
        thread::sleep(Duration::from_millis(50));
    }
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(lbd.id() as i32, libc::SIGTERM) };
    assert!(lbd.wait().unwrap().success(), "{lbd_log}");
}

/// In the lab, under HTTP load with long-lived connections: the balancer
/// runs the previous layout's data plane (its lbd stopped for the
/// upgrade); the new lbd converts it with a changed config (b1's weight
/// tripled: Maglev alone would move some flows). Nothing breaks.
#[test]
fn upgrading_from_the_previous_layout_under_load_breaks_no_connection() {
    lb_tests::raise_fd_limit(4096);
    let spec = lb_tests::lab::LabSpec {
        legacy: Some(LAYOUT_VERSION - 1),
        ..lb_tests::lab::LabSpec::weights(&[1, 1, 2, 1])
    };
    let lab = lb_tests::lab::Lab::start(&spec).unwrap();
    std::fs::write(
        lab.config_path(),
        lab.config_text(&[Some(3), Some(1), Some(2), Some(1)]),
    )
    .unwrap();
    let traffic = lb_tests::lab::traffic::TrafficSpec {
        targets: vec![lab.vip_http(false), lab.vip_http(true)],
        ..lb_tests::lab::traffic::TrafficSpec::standard(lab.vip_http(false))
    };
    let (took, report) =
        lb_tests::lab::traffic::run(lab.client.name(), &traffic, Duration::from_secs(1), || {
            let started = Instant::now();
            lab.start_lbd().unwrap();
            started.elapsed()
        });
    println!(
        "upgrade from layout {} under load (lbd up in {:.1} s): {}",
        LAYOUT_VERSION - 1,
        took.as_secs_f64(),
        report.summary()
    );
    assert!(lab.lbd_log().contains("upgrade done"), "{}", lab.lbd_log());
    assert!(report.answered() > 2000, "{}", report.summary());
    assert_eq!(
        report.failures(),
        Vec::<String>::new(),
        "{}",
        report.summary()
    );
    assert_eq!(report.resets(), 0);
    assert_eq!(report.moved(), 0, "{}", report.summary());
    assert!(
        report.longest_gap() < Duration::from_secs(1),
        "{}",
        report.summary()
    );
}
