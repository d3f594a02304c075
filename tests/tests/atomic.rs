//! Tables change atomically: while a VIP's backend set is rebuilt over and
//! over, packets run on another thread at the same time always land on the
//! backend that the old or the new table gives for their flow, never on
//! anything else and never on no backend; and changing one VIP leaves the
//! others' tables alone.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    os::fd::AsFd,
    sync::atomic::{AtomicBool, Ordering},
    thread,
};

use lb::{
    desired::vip::{Backend, Protocol, Vip, VipAddr},
    maglev::{MaglevBackend, MaglevTable},
};
use lb_common::{DEFAULT_TABLE_SIZE, flow_hash, maglev_position, xdp_action};
use lb_tests::{
    SplitMix,
    frames::{Flow, FrameSpec, parse_encapsulated},
    packet_lab::PacketLab,
    xdp::{program_fd, run_xdp_fd},
};

const CONFIG: &str = r#"
[balancer]
source_v4 = "10.200.0.1"
max_vips = 8
max_backends = 64

[[vip]]
address = "203.0.113.10"
port = 80
protocol = "tcp"
backends = [ { address = "10.200.0.11" }, { address = "10.200.0.12" }, { address = "10.200.0.13" } ]

[[vip]]
address = "203.0.113.20"
port = 80
protocol = "tcp"
backends = [ { address = "10.200.0.21" }, { address = "10.200.0.22" } ]
"#;

const SET_A: [&str; 3] = ["10.200.0.11", "10.200.0.12", "10.200.0.13"];
const SET_B: [&str; 4] = ["10.200.0.14", "10.200.0.15", "10.200.0.16", "10.200.0.12"];

fn vip(addr: &str, backends: &[&str]) -> Vip {
    Vip::new(
        VipAddr {
            addr: addr.parse().unwrap(),
            port: 80,
            protocol: Protocol::Tcp,
        },
        backends
            .iter()
            .map(|a| Backend::new(a.parse().unwrap(), 100))
            .collect(),
    )
}

/// The address a complete table of `set` gives each flow.
fn table_of(set: &[&str]) -> impl Fn(&Flow) -> IpAddr {
    let addrs: Vec<IpAddr> = set.iter().map(|a| a.parse().unwrap()).collect();
    let inputs: Vec<MaglevBackend> = addrs
        .iter()
        .enumerate()
        .map(|(i, &addr)| MaglevBackend {
            addr,
            weight: 100,
            id: i as u32,
        })
        .collect();
    let table = MaglevTable::build(&inputs, DEFAULT_TABLE_SIZE);
    move |f: &Flow| {
        let pos = maglev_position(flow_hash(&f.key()), DEFAULT_TABLE_SIZE);
        addrs[table.entries()[pos as usize] as usize]
    }
}

fn random_flow(rng: &mut SplitMix, dst: &str) -> Flow {
    Flow {
        src: IpAddr::from((0xc612_0000u32 | (rng.next_u32() & 0x1_ffff)).to_be_bytes()),
        dst: dst.parse().unwrap(),
        sport: 1024 + rng.next_u16() % 60000,
        dport: 80,
        protocol: Protocol::Tcp,
    }
}

#[test]
fn packets_never_see_a_half_written_table() {
    let mut lab = PacketLab::new(CONFIG).unwrap();
    for a in SET_B {
        lab.add_neighbour(a.parse().unwrap()).unwrap();
    }
    let (old, new) = (table_of(&SET_A), table_of(&SET_B));
    let fd = program_fd(lab.dp.balancer().unwrap()).unwrap();
    let (ifindex, mac) = (lab.ifindex, lab.if_mac);
    let stop = AtomicBool::new(false);
    let ns = &lab.ns;

    let tally = thread::scope(|s| {
        let reader = s.spawn(|| {
            let _inside = ns.enter().unwrap();
            let mut rng = SplitMix(21);
            let mut tally: BTreeMap<&str, u64> = BTreeMap::new();
            while !stop.load(Ordering::Relaxed) {
                // A new flow each time: every packet consults the table.
                let f = random_flow(&mut rng, "203.0.113.10");
                let frame = lb_tests::frames::build(
                    &f,
                    &FrameSpec {
                        dst_mac: mac,
                        ..Default::default()
                    },
                );
                let r = run_xdp_fd(fd.as_fd(), &frame, ifindex, 1).unwrap();
                assert_eq!(r.action, xdp_action::XDP_TX, "every packet is forwarded");
                let got = parse_encapsulated(&r.frame).unwrap().outer.dst();
                let (a, b) = (old(&f), new(&f));
                assert!(
                    got == a || got == b,
                    "{f:?} went to {got}, old table says {a}, new {b}"
                );
                *tally
                    .entry(match (got == a, got == b) {
                        (true, true) => "both",
                        (true, false) => "old",
                        _ => "new",
                    })
                    .or_default() += 1;
            }
            tally
        });
        for i in 0..100 {
            let set: &[&str] = if i % 2 == 0 { &SET_B } else { &SET_A };
            lab.dp.set_vip(&vip("203.0.113.10", set)).unwrap();
        }
        stop.store(true, Ordering::Relaxed);
        reader.join().unwrap()
    });
    assert!(
        tally.get("old").copied().unwrap_or(0) > 0 && tally.get("new").copied().unwrap_or(0) > 0,
        "both tables were seen: {tally:?}"
    );
}

#[test]
fn adding_and_removing_a_vip_leaves_the_others_alone() {
    let mut lab = PacketLab::new(CONFIG).unwrap();
    lab.add_neighbour("10.200.0.31".parse().unwrap()).unwrap();
    let expected = table_of(&["10.200.0.21", "10.200.0.22"]);
    let fd = program_fd(lab.dp.balancer().unwrap()).unwrap();
    let (ifindex, mac) = (lab.ifindex, lab.if_mac);
    let stop = AtomicBool::new(false);
    let ns = &lab.ns;
    thread::scope(|s| {
        let reader = s.spawn(|| {
            let _inside = ns.enter().unwrap();
            let mut rng = SplitMix(22);
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                // New flows: each packet reads the other VIP's table.
                let f = random_flow(&mut rng, "203.0.113.20");
                let frame = lb_tests::frames::build(
                    &f,
                    &FrameSpec {
                        dst_mac: mac,
                        ..Default::default()
                    },
                );
                let r = run_xdp_fd(fd.as_fd(), &frame, ifindex, 1).unwrap();
                assert_eq!(r.action, xdp_action::XDP_TX);
                assert_eq!(
                    parse_encapsulated(&r.frame).unwrap().outer.dst(),
                    expected(&f)
                );
                n += 1;
            }
            n
        });
        for _ in 0..50 {
            lab.dp
                .set_vip(&vip("203.0.113.30", &["10.200.0.31"]))
                .unwrap();
            lab.dp.remove_vip(&vip("203.0.113.30", &[]).addr).unwrap();
        }
        stop.store(true, Ordering::Relaxed);
        assert!(reader.join().unwrap() >= 100);
    });
}
