//! The fuzz harness (`lb_tests::fuzz`) over both XDP programs: no
//! `XDP_ABORTED`, every transmitted frame a well-formed encapsulation of its
//! input or its ICMP answer, passed frames untouched, and the reason
//! counters adding up. `cargo xtask fuzz --frames N` runs the same harness
//! as long as asked.

use lb_tests::{fuzz, pin_to_cpu, require_root};

#[test]
fn the_balancer_survives_twelve_thousand_hostile_frames() {
    require_root();
    pin_to_cpu(0);
    let r = fuzz::balancer(12_000, 0x5eed).unwrap();
    println!("{r:?}");
    // Every frame counts: the ones the kernel refuses are drawn again.
    assert_eq!(r.frames, 12_000, "{r:?}");
    assert!(r.clean(), "{r:#?}");
    // Every verdict was reached, each many times.
    assert!(
        r.transmitted > 2_000 && r.passed > 1_000 && r.dropped > 1_000,
        "{r:?}"
    );
}

#[test]
fn the_decapsulator_survives_ten_thousand_hostile_frames() {
    require_root();
    pin_to_cpu(0);
    let r = fuzz::decapsulator(10_000, 0xdeca).unwrap();
    println!("{r:?}");
    assert_eq!(r.frames, 10_000, "{r:?}");
    assert!(r.clean(), "{r:#?}");
    assert!(r.passed > 2_000 && r.dropped > 500, "{r:?}");
}
