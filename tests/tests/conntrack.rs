//! The connection table through `BPF_PROG_TEST_RUN`: established flows keep
//! their backend while the backend set changes; entries end on RST, on idle
//! time, when their backend goes, and (by policy) when it is down.

use std::{collections::BTreeMap, net::IpAddr, thread, time::Duration};

use lb::desired::vip::{Backend, DownPolicy, Protocol, Vip, VipAddr};
use lb_common::{FlowEvent, xdp_action};
use std::os::fd::AsFd;

use lb_tests::{
    SplitMix,
    frames::{Flow, FrameSpec, parse_encapsulated, second_chance_of},
    packet_lab::PacketLab,
    xdp::{program_fd, run_xdp_fd},
};

const CONFIG: &str = r#"
[balancer]
source_v4 = "10.200.0.1"
max_vips = 4
max_backends = 12

[conntrack]
size = 65536
udp_idle_timeout = 1
tcp_closing_timeout = 1

[[vip]]
address = "203.0.113.10"
port = 80
protocol = "tcp"
backends = [
  { address = "10.200.0.11" }, { address = "10.200.0.12" }, { address = "10.200.0.13" },
]

[[vip]]
address = "203.0.113.10"
port = 53
protocol = "udp"
backends = [ { address = "10.200.0.11" }, { address = "10.200.0.12" } ]

[[vip]]
address = "203.0.113.20"
port = 80
protocol = "tcp"
on_backend_down = "stick"
backends = [ { address = "10.200.0.21" }, { address = "10.200.0.22" } ]
"#;

/// All lab backends get neighbour entries, also those added later.
const NEIGHBOURS: &[&str] = &["10.200.0.14", "10.200.0.15"];

fn lab() -> PacketLab {
    lab_with(CONFIG)
}

fn lab_with(config: &str) -> PacketLab {
    let lab = PacketLab::new(config).unwrap();
    for n in NEIGHBOURS {
        let mac =
            lb_tests::netns::format_mac(lb_tests::packet_lab::backend_mac(n.parse().unwrap()));
        lab.ns
            .ip(&[
                "neigh",
                "replace",
                n,
                "lladdr",
                &mac,
                "dev",
                "lb0",
                "nud",
                "permanent",
            ])
            .unwrap();
    }
    lab
}

fn vip(
    addr: &str,
    port: u16,
    protocol: Protocol,
    backends: &[(&str, u32)],
    policy: DownPolicy,
) -> Vip {
    Vip {
        on_backend_down: policy,
        ..Vip::new(
            VipAddr {
                addr: addr.parse().unwrap(),
                port,
                protocol,
            },
            backends
                .iter()
                .map(|(a, w)| Backend::new(a.parse().unwrap(), *w))
                .collect(),
        )
    }
}

fn flows(seed: u64, n: usize, dst: &str, dport: u16, protocol: Protocol) -> Vec<Flow> {
    let mut rng = SplitMix(seed);
    (0..n)
        .map(|_| Flow {
            src: IpAddr::from((0xc612_0000u32 | (rng.next_u32() & 0x1_ffff)).to_be_bytes()),
            dst: dst.parse().unwrap(),
            sport: 1024 + rng.next_u16() % 60000,
            dport,
            protocol,
        })
        .collect()
}

/// The backend the balancer sends this flow's next packet to.
fn send(lab: &mut PacketLab, f: &Flow, spec: FrameSpec) -> IpAddr {
    let frame = lab.frame(f, spec);
    let r = lab.run(&frame).unwrap();
    assert_eq!(r.action, xdp_action::XDP_TX, "{f:?}");
    parse_encapsulated(&r.frame).unwrap().outer.dst()
}

fn route(lab: &mut PacketLab, flows: &[Flow]) -> Vec<IpAddr> {
    flows
        .iter()
        .map(|f| send(lab, f, FrameSpec::default()))
        .collect()
}

/// Establishes each flow as traffic does: its first packet is scheduled
/// and admitted (handshake table), its second moves the entry into the
/// connection table. Returns each flow's backend.
fn establish(lab: &mut PacketLab, flows: &[Flow]) -> Vec<IpAddr> {
    flows
        .iter()
        .map(|f| {
            let b = send(lab, f, FrameSpec::default());
            assert_eq!(send(lab, f, FrameSpec::default()), b, "{f:?}");
            b
        })
        .collect()
}

/// Adds a heavy fourth backend: Maglev now sends many flows elsewhere.
fn reweigh(lab: &mut PacketLab) {
    let backends = [
        ("10.200.0.11", 100),
        ("10.200.0.12", 100),
        ("10.200.0.13", 100),
        ("10.200.0.14", 300),
    ];
    lab.dp.set_vip(&tcp_vip(&backends)).unwrap();
}

fn tcp_vip(backends: &[(&str, u32)]) -> Vip {
    vip(
        "203.0.113.10",
        80,
        Protocol::Tcp,
        backends,
        DownPolicy::Reschedule,
    )
}

#[test]
fn established_flows_keep_their_backend_through_add_weight_change_and_drain() {
    let mut lab = lab();
    let fs = flows(1, 300, "203.0.113.10", 80, Protocol::Tcp);
    let first = establish(&mut lab, &fs);
    let on_11: Vec<usize> = (0..fs.len())
        .filter(|&i| first[i].to_string() == "10.200.0.11")
        .collect();
    assert!(!on_11.is_empty());

    // Add a backend, change weights: nobody moves (though Maglev would move some).
    lab.dp
        .set_vip(&tcp_vip(&[
            ("10.200.0.11", 100),
            ("10.200.0.12", 300),
            ("10.200.0.13", 50),
            ("10.200.0.14", 100),
        ]))
        .unwrap();
    let would_move = fs
        .iter()
        .zip(&first)
        .filter(|(f, b)| lab.dp.backend_for(&f.key()) != Some(**b))
        .count();
    assert!(
        would_move > 30,
        "the change moves {would_move} of 300 Maglev entries"
    );
    assert_eq!(route(&mut lab, &fs), first, "after add and weight change");

    // Drain .11 (weight 0): its flows stay, new flows avoid it.
    lab.dp
        .set_vip(&tcp_vip(&[
            ("10.200.0.11", 0),
            ("10.200.0.12", 300),
            ("10.200.0.13", 50),
            ("10.200.0.14", 100),
        ]))
        .unwrap();
    assert_eq!(route(&mut lab, &fs), first, "after drain");
    let new = route(&mut lab, &flows(2, 300, "203.0.113.10", 80, Protocol::Tcp));
    assert!(
        new.iter().all(|b| b.to_string() != "10.200.0.11"),
        "a drained backend takes no new flows"
    );

    // Misses: the 300 established flows' first packets and the 300 new
    // flows'; hits: the established flows' second packets (out of the
    // handshake table) and their two rounds after.
    let c = lab.dp.counters().unwrap();
    assert_eq!(c.flow(FlowEvent::Miss), 600);
    assert_eq!(c.flow(FlowEvent::Hit), 900);
}

#[test]
fn a_removed_backend_keeps_its_established_flows_until_they_end_then_its_id_is_freed() {
    let mut lab = lab();
    let fs = flows(3, 300, "203.0.113.10", 80, Protocol::Tcp);
    let first = establish(&mut lab, &fs);
    let on_12 = first
        .iter()
        .filter(|b| b.to_string() == "10.200.0.12")
        .count();
    assert!(on_12 > 0);
    lab.dp
        .set_vip(&tcp_vip(&[("10.200.0.11", 100), ("10.200.0.13", 100)]))
        .unwrap();
    // Removed: its established flows stay with it (a rollout: the old
    // backend still serves them), every other flow stays too...
    assert_eq!(route(&mut lab, &fs), first, "no established flow moved");
    // ...and no new flow goes to it.
    let fresh = flows(4, 300, "203.0.113.10", 80, Protocol::Tcp);
    let new = route(&mut lab, &fresh);
    assert!(
        new.iter().all(|b| b.to_string() != "10.200.0.12"),
        "a new flow went to the removed backend"
    );
    assert_eq!(
        lab.dp.sweep_now().unwrap(),
        0,
        "its flows are alive: its id stays"
    );
    println!("{on_12} established flows stayed with the removed backend; 300 new flows avoided it");

    // UDP flows end by their idle timeout (1 s here): then the removed
    // backend's id is freed, and a flow that comes back is scheduled anew.
    let udp = flows(5, 100, "203.0.113.10", 53, Protocol::Udp);
    let before = route(&mut lab, &udp);
    assert!(before.iter().any(|b| b.to_string() == "10.200.0.12"));
    let udp_vip = vip(
        "203.0.113.10",
        53,
        Protocol::Udp,
        &[("10.200.0.11", 100)],
        DownPolicy::Reschedule,
    );
    lab.dp.set_vip(&udp_vip).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let (started, freed) = (std::time::Instant::now(), lab.dp.sweep_now().unwrap());
    println!(
        "after the idle timeout: {freed} backend id(s) freed (scan {:?})",
        started.elapsed()
    );
    assert_eq!(freed, 1, "the UDP VIP's removed backend, not the TCP VIP's");
    assert!(
        route(&mut lab, &udp)
            .iter()
            .all(|b| b.to_string() == "10.200.0.11")
    );
}

#[test]
fn a_reset_ends_the_flow_entry() {
    let mut lab = lab();
    let fs = flows(4, 100, "203.0.113.10", 80, Protocol::Tcp);
    let first = route(&mut lab, &fs);
    reweigh(&mut lab);
    // The RST itself still goes to the recorded backend...
    for (f, b) in fs.iter().zip(&first) {
        let mut frame = lab.frame(f, FrameSpec::default());
        frame[14 + 20 + 13] = 0x04; // RST
        let r = lab.run(&frame).unwrap();
        assert_eq!(parse_encapsulated(&r.frame).unwrap().outer.dst(), *b);
    }
    assert_eq!(lab.dp.counters().unwrap().flow(FlowEvent::Reset), 100);
    // ...and the next packet of the 5-tuple is a new flow.
    for f in &fs {
        assert_eq!(
            Some(send(&mut lab, f, FrameSpec::default())),
            lab.dp.backend_for(&f.key())
        );
    }
}

#[test]
fn udp_entries_expire_after_their_idle_time() {
    let mut lab = lab();
    let fs = flows(5, 100, "203.0.113.10", 53, Protocol::Udp);
    let first = route(&mut lab, &fs);
    let udp = |backends| {
        vip(
            "203.0.113.10",
            53,
            Protocol::Udp,
            backends,
            DownPolicy::Reschedule,
        )
    };
    lab.dp
        .set_vip(&udp(&[
            ("10.200.0.11", 100),
            ("10.200.0.12", 100),
            ("10.200.0.14", 200),
        ]))
        .unwrap();
    assert_eq!(
        route(&mut lab, &fs),
        first,
        "within the idle time flows stay"
    );
    // The config's UDP idle time is 1 s; the clock is coarse.
    thread::sleep(Duration::from_millis(2200));
    let later = route(&mut lab, &fs);
    for (f, b) in fs.iter().zip(later) {
        assert_eq!(
            Some(b),
            lab.dp.backend_for(&f.key()),
            "after the idle time the flow is scheduled anew"
        );
    }
    assert!(lab.dp.counters().unwrap().flow(FlowEvent::Stale) >= 100);
}

#[test]
fn flows_of_a_down_backend_follow_the_vips_policy() {
    let mut lab = lab();
    let resched = flows(6, 200, "203.0.113.10", 80, Protocol::Tcp);
    let stick = flows(7, 200, "203.0.113.20", 80, Protocol::Tcp);
    let r0 = establish(&mut lab, &resched);
    let s0 = establish(&mut lab, &stick);
    let down = |lab: &mut PacketLab, vip: &str, port, b: &str| {
        let addr = VipAddr {
            addr: vip.parse().unwrap(),
            port,
            protocol: Protocol::Tcp,
        };
        lab.dp
            .set_backend_down(&addr, b.parse().unwrap(), true)
            .unwrap();
    };
    down(&mut lab, "203.0.113.10", 80, "10.200.0.11");
    down(&mut lab, "203.0.113.20", 80, "10.200.0.21");
    let r1 = route(&mut lab, &resched);
    let s1 = route(&mut lab, &stick);
    let mut moved: BTreeMap<bool, usize> = BTreeMap::new();
    for i in 0..resched.len() {
        if r0[i].to_string() == "10.200.0.11" {
            assert_ne!(r1[i], r0[i], "reschedule: a flow of the down backend moves");
            *moved.entry(true).or_default() += 1;
        } else {
            assert_eq!(r1[i], r0[i], "the other flows stay");
        }
    }
    assert!(moved[&true] > 0);
    assert_eq!(s1, s0, "stick: every flow stays, also on the down backend");
    // New flows avoid down backends under both policies.
    for b in route(&mut lab, &flows(8, 200, "203.0.113.20", 80, Protocol::Tcp)) {
        assert_ne!(b.to_string(), "10.200.0.21");
    }
}

/// A SYN opens a new connection: it is scheduled afresh (no lookup), and
/// the rest of that connection follows it.
#[test]
fn a_syn_starts_a_new_connection_on_the_current_table() {
    let mut lab = lab();
    let fs = flows(9, 200, "203.0.113.10", 80, Protocol::Tcp);
    let first = route(&mut lab, &fs);
    reweigh(&mut lab);
    let mut moved = 0;
    for (f, old) in fs.iter().zip(&first) {
        let mut syn = lab.frame(f, FrameSpec::default());
        syn[14 + 20 + 13] = 0x02;
        let r = lab.run(&syn).unwrap();
        let now = parse_encapsulated(&r.frame).unwrap().outer.dst();
        assert_eq!(
            Some(now),
            lab.dp.backend_for(&f.key()),
            "the SYN follows the current table"
        );
        assert_eq!(
            send(&mut lab, f, FrameSpec::default()),
            now,
            "the connection stays where its SYN went"
        );
        moved += usize::from(now != *old);
    }
    assert!(moved > 20, "the table change moved {moved} of 200 flows");
}

/// `n` flows to `dst:dport` that share one connection-table set (the lab's
/// table has 65536 slots: 16384 sets).
fn same_set(seed: u64, n: usize, dst: &str, dport: u16, protocol: Protocol) -> Vec<Flow> {
    let mask = lb_common::flow_sets(65536) - 1;
    let mut by_set: BTreeMap<u32, Vec<Flow>> = BTreeMap::new();
    for f in flows(seed, 200_000, dst, dport, protocol) {
        let set = lb_common::flow_set(lb_common::flow_hash64(&f.key()), mask);
        let group = by_set.entry(set).or_default();
        group.push(f);
        if group.len() == n {
            return group.clone();
        }
    }
    panic!("no set drew {n} flows");
}

#[test]
fn a_full_set_evicts_its_oldest_entry_and_counts_it() {
    let mut lab = lab();
    let fs = same_set(10, 6, "203.0.113.10", 80, Protocol::Tcp);
    let first: Vec<IpAddr> = establish(&mut lab, &fs[..4]);
    assert_eq!(lab.dp.counters().unwrap().flow(FlowEvent::Evicted), 0);
    // A fifth flow takes the slot of the first (the one expiring first).
    let fifth = establish(&mut lab, &fs[4..5])[0];
    let c = lab.dp.counters().unwrap();
    assert_eq!(c.flow(FlowEvent::Evicted), 1);
    assert_eq!(c.flow(FlowEvent::Miss), 5);
    // After a table change the three survivors and the fifth keep their
    // backends; the evicted first flow is scheduled on the current table
    // (without the second chance: see the test after this one).
    lab.dp
        .set_vip(&Vip {
            second_chance: Some(false),
            ..tcp_vip(&[
                ("10.200.0.11", 100),
                ("10.200.0.12", 100),
                ("10.200.0.13", 100),
                ("10.200.0.14", 300),
            ])
        })
        .unwrap();
    for (f, b) in fs[1..4].iter().zip(&first[1..]) {
        assert_eq!(send(&mut lab, f, FrameSpec::default()), *b, "kept");
    }
    assert_eq!(send(&mut lab, &fs[4], FrameSpec::default()), fifth, "kept");
    assert_eq!(
        Some(send(&mut lab, &fs[0], FrameSpec::default())),
        lab.dp.backend_for(&fs[0].key()),
        "the evicted flow is scheduled again"
    );
    let c = lab.dp.counters().unwrap();
    assert_eq!((c.flow(FlowEvent::Hit), c.flow(FlowEvent::Miss)), (9, 6));
    // Its first packet again only admitted it; its next one moves it into
    // the set, where it in turn takes the oldest slot and counts it.
    assert_eq!(c.flow(FlowEvent::Evicted), 1);
    send(&mut lab, &fs[0], FrameSpec::default());
    assert_eq!(lab.dp.counters().unwrap().flow(FlowEvent::Evicted), 2);
}

/// An evicted flow whose table position moved since it began goes to the
/// position's current backend and names the one it had as its
/// second-chance candidate, with every packet: it gets no entry.
#[test]
fn an_evicted_flow_whose_position_moved_names_its_old_backend() {
    let mut lab = lab();
    let fs = same_set(10, 6, "203.0.113.10", 80, Protocol::Tcp);
    let first: Vec<IpAddr> = establish(&mut lab, &fs[..5]);
    assert_eq!(lab.dp.counters().unwrap().flow(FlowEvent::Evicted), 1);
    // Every position moves: the three backends drain (their flows stay,
    // they stay candidates), a fourth takes the whole table.
    lab.dp
        .set_vip(&tcp_vip(&[
            ("10.200.0.11", 0),
            ("10.200.0.12", 0),
            ("10.200.0.13", 0),
            ("10.200.0.14", 1),
        ]))
        .unwrap();
    let fourth: IpAddr = "10.200.0.14".parse().unwrap();
    // The survivors keep their backends (plain tunnels).
    for (f, b) in fs[1..5].iter().zip(&first[1..]) {
        let frame = lab.frame(f, FrameSpec::default());
        let r = lab.run(&frame).unwrap();
        assert_eq!(parse_encapsulated(&r.frame).unwrap().outer.dst(), *b);
        assert!(second_chance_of(&r.frame).is_none(), "{f:?}");
    }
    let before = lab.dp.counters().unwrap();
    for _ in 0..3 {
        let frame = lab.frame(&fs[0], FrameSpec::default());
        let r = lab.run(&frame).unwrap();
        assert_eq!(r.action, xdp_action::XDP_TX);
        let e = parse_encapsulated(&r.frame).unwrap();
        assert_eq!(e.outer.dst(), fourth, "the current table's backend");
        let (sc, _) = second_chance_of(&r.frame).expect("a candidate");
        assert_eq!(sc.candidate, first[0], "the backend the flow had");
        assert_eq!(sc.flags, 0);
    }
    // A SYN of the same 5-tuple is a new connection: no candidate.
    let mut syn = lab.frame(&fs[0], FrameSpec::default());
    syn[14 + 20 + 13] = 0x02;
    let r = lab.run(&syn).unwrap();
    assert!(second_chance_of(&r.frame).is_none());
    let c = lab.dp.counters().unwrap();
    let d = |e: FlowEvent| c.flow(e) - before.flow(e);
    println!(
        "evicted flow after the move: second_chance {}, misses {}, evictions {}",
        d(FlowEvent::SecondChance),
        d(FlowEvent::Miss),
        d(FlowEvent::Evicted)
    );
    assert_eq!(d(FlowEvent::SecondChance), 3);
    // No entry was written for it: nothing else was evicted.
    assert_eq!(d(FlowEvent::Evicted), 0);
}

#[test]
fn expired_entries_make_room_without_evictions() {
    let mut lab = lab();
    let fs = same_set(11, 8, "203.0.113.10", 53, Protocol::Udp);
    route(&mut lab, &fs[..4]);
    // The config's UDP idle time is 1 s.
    thread::sleep(Duration::from_millis(2200));
    route(&mut lab, &fs[4..]);
    let c = lab.dp.counters().unwrap();
    assert_eq!(c.flow(FlowEvent::Evicted), 0);
    assert_eq!(c.flow(FlowEvent::Miss), 8);
    // The new four are all in the table.
    route(&mut lab, &fs[4..]);
    assert_eq!(lab.dp.counters().unwrap().flow(FlowEvent::Hit), 4);
}

/// `f`'s frame with only SYN set.
fn syn(lab: &mut PacketLab, f: &Flow) -> IpAddr {
    let mut frame = lab.frame(f, FrameSpec::default());
    frame[14 + 20 + 13] = 0x02;
    let r = lab.run(&frame).unwrap();
    assert_eq!(r.action, xdp_action::XDP_TX, "{f:?}");
    parse_encapsulated(&r.frame).unwrap().outer.dst()
}

#[test]
fn a_handshake_keeps_the_backend_its_syn_got() {
    let mut lab = lab();
    let fs = flows(12, 200, "203.0.113.10", 80, Protocol::Tcp);
    let syns: Vec<IpAddr> = fs.iter().map(|f| syn(&mut lab, f)).collect();
    // The table changes between the SYNs and the handshakes' last packets.
    reweigh(&mut lab);
    let moved = fs
        .iter()
        .zip(&syns)
        .filter(|(f, b)| lab.dp.backend_for(&f.key()) != Some(**b))
        .count();
    assert!(moved > 20, "the change moved {moved} of 200 flows");
    // The lab's handshake table has 1024 slots in 256 sets: a set may draw
    // more than four of the 200 SYNs, and a handshake pushed out is
    // scheduled again on the current table.
    let pushed_out = lab.dp.counters().unwrap().flow(FlowEvent::SynEvicted);
    let done = route(&mut lab, &fs);
    let mut rescheduled = 0;
    for ((f, got), want) in fs.iter().zip(&done).zip(&syns) {
        if got != want {
            assert_eq!(Some(*got), lab.dp.backend_for(&f.key()), "{f:?}");
            rescheduled += 1;
        }
    }
    assert!(
        rescheduled <= pushed_out as usize,
        "{rescheduled} handshakes left their SYN's backend, {pushed_out} were pushed out"
    );
    // And from then on from the connection table.
    assert_eq!(route(&mut lab, &fs), done);
    let c = lab.dp.counters().unwrap();
    assert_eq!(
        (c.flow(FlowEvent::Miss), c.flow(FlowEvent::Hit)),
        (200 + rescheduled as u64, 400 - rescheduled as u64)
    );
}

#[test]
fn a_syn_flood_does_not_push_established_flows_out() {
    let mut lab = lab();
    let fs = flows(13, 200, "203.0.113.10", 80, Protocol::Tcp);
    let first = establish(&mut lab, &fs);
    // The lab's handshake table has 1024 slots (65536 / 64).
    for f in flows(14, 20_000, "203.0.113.10", 80, Protocol::Tcp) {
        syn(&mut lab, &f);
    }
    let c = lab.dp.counters().unwrap();
    assert!(
        c.flow(FlowEvent::SynEvicted) > 15_000,
        "{} handshakes pushed out",
        c.flow(FlowEvent::SynEvicted)
    );
    assert_eq!(c.flow(FlowEvent::Evicted), 0, "no established flow");
    reweigh(&mut lab);
    assert_eq!(route(&mut lab, &fs), first, "established flows stay");
}

/// `flows` that hash into sets `0..sets` of a table with `mask` (a
/// handshake or connection table's set mask).
fn in_sets(seed: u64, n: usize, mask: u32, sets: u32, dport: u16, protocol: Protocol) -> Vec<Flow> {
    let mut out = Vec::with_capacity(n);
    let mut rng = SplitMix(seed);
    while out.len() < n {
        let f = Flow {
            src: IpAddr::from((0x0a00_0000u32 | (rng.next_u32() & 0xff_ffff)).to_be_bytes()),
            dst: "203.0.113.10".parse().unwrap(),
            sport: 1024 + rng.next_u16() % 60000,
            dport,
            protocol,
        };
        if lb_common::flow_set(lb_common::flow_hash64(&f.key()), mask) < sets {
            out.push(f);
        }
    }
    out
}

/// Slots in use in sets `0..sets` of `table`.
fn used(table: &[lb_common::FlowSet], sets: u32) -> u64 {
    table[..sets as usize]
        .iter()
        .flat_map(|s| s.slots.iter())
        .filter(|slot| slot.key != 0)
        .count() as u64
}

/// Runs `flows` (each `per_flow` packets in a row) through the lab's
/// program on CPU 0 and CPU 1 at once, half the flows each.
fn on_two_cpus(lab: &mut PacketLab, halves: [&[Flow]; 2], per_flow: usize) {
    let spec = FrameSpec {
        dst_mac: lab.if_mac,
        ..Default::default()
    };
    let frames = halves.map(|half| {
        half.iter()
            .flat_map(|f| std::iter::repeat_n(lb_tests::frames::build(f, &spec), per_flow))
            .collect::<Vec<_>>()
    });
    frames_on_two_cpus(lab, [&frames[0], &frames[1]]);
}

/// Runs `frames[0]` on CPU 0 and `frames[1]` on CPU 1 at once, each in
/// its order; every frame must be sent on (XDP_TX).
fn frames_on_two_cpus(lab: &mut PacketLab, frames: [&[Vec<u8>]; 2]) {
    let fd = program_fd(lab.dp.balancer().unwrap()).unwrap();
    let ifindex = lab.ifindex;
    let ns = &lab.ns;
    let fd = &fd;
    thread::scope(|s| {
        for (cpu, frames) in frames.into_iter().enumerate() {
            s.spawn(move || {
                lb_tests::pin_to_cpu(cpu);
                let _inside = ns.enter().unwrap();
                for frame in frames {
                    let r = run_xdp_fd(fd.as_fd(), frame, ifindex, 1).unwrap();
                    assert_eq!(r.action, xdp_action::XDP_TX);
                }
            });
        }
    });
}

/// FINs and RSTs change a slot only if it still holds their own flow:
/// CPU 0 opens flows, sends each a client FIN, then a RST, while CPU 1
/// opens other flows into the same four sets (16 slots), pushing entries
/// out. Afterwards every entry in those sets is one flow's own (its tag
/// with its ports), none of CPU 1's is marked closing, and none of CPU 0's
/// is left (each was reset or pushed out).
#[test]
fn fins_and_resets_on_one_cpu_never_touch_entries_another_cpu_wrote() {
    let mut lab = lab();
    let mask = lb_common::flow_sets(65536) - 1;
    let flows = in_sets(33, 12_000, mask, 4, 80, Protocol::Tcp);
    let (closed, opened) = flows.split_at(6_000);
    let spec = FrameSpec {
        dst_mac: lab.if_mac,
        ..Default::default()
    };
    let with_flags = |f: &Flow, flags: u8| {
        let mut frame = lb_tests::frames::build(f, &spec);
        frame[14 + 20 + 13] = flags;
        frame
    };
    let cpu0: Vec<Vec<u8>> = closed
        .iter()
        .flat_map(|f| {
            let data = lb_tests::frames::build(f, &spec);
            [data.clone(), data, with_flags(f, 0x11), with_flags(f, 0x14)]
        })
        .collect();
    let cpu1: Vec<Vec<u8>> = opened
        .iter()
        .flat_map(|f| {
            let data = lb_tests::frames::build(f, &spec);
            [data.clone(), data]
        })
        .collect();
    frames_on_two_cpus(&mut lab, [&cpu0, &cpu1]);

    let own = |fs: &[Flow]| -> std::collections::HashSet<(u64, u32)> {
        fs.iter()
            .map(|f| {
                let key = f.key();
                (lb_common::flow_hash64(&key) >> 32, key.ports)
            })
            .collect()
    };
    let (closed_own, opened_own) = (own(closed), own(opened));
    let table = lab.dp.flow_table(false).unwrap();
    let (mut of_closed, mut of_opened, mut opened_closing) = (0, 0, 0);
    for slot in table[..4].iter().flat_map(|s| s.slots.iter()) {
        if slot.key == 0 {
            continue;
        }
        let id = (slot.key >> 32, slot.ports);
        if closed_own.contains(&id) {
            of_closed += 1;
        } else if opened_own.contains(&id) {
            of_opened += 1;
            opened_closing += lb_common::FlowSlot::closing(slot.key) as u32;
        } else {
            panic!("slot {slot:?} is no flow's own entry (a tag with another flow's ports)");
        }
    }
    let c = lab.dp.counters().unwrap();
    println!(
        "CPU 0: 6,000 flows opened, closed (FIN) and reset; CPU 1: 6,000 flows opened, same 16 slots: \
         closing {}, reset {}, evicted {}, raced {}; left: {of_opened} of CPU 1's entries ({opened_closing} marked closing), {of_closed} of CPU 0's",
        c.flow(FlowEvent::Closing),
        c.flow(FlowEvent::Reset),
        c.flow(FlowEvent::Evicted),
        c.flow(FlowEvent::Raced),
    );
    assert_eq!(opened_closing, 0, "a FIN marked another flow's entry");
    assert_eq!(of_closed, 0, "a reset flow kept its entry");
    assert!(c.flow(FlowEvent::Reset) > 0 && c.flow(FlowEvent::Evicted) > 0);
}

/// Two CPUs that pick the same slot at once cannot both write it: every
/// new entry either is in its table at the end, or was pushed out by a
/// later one (counted), or lost its slot to the other CPU (counted). Run
/// on both tables: one-packet flows only ever enter the handshake table;
/// flows of two packets move into the connection table.
#[test]
fn two_cpus_writing_the_same_slots_lose_no_entry_uncounted() {
    let mut hs_lab = lab();
    // The lab's handshake table: 1024 slots, 256 sets; connection table
    // 65536 slots, 16384 sets. Every flow lands in the first sets of the
    // table under test: 8 slots for 20,000 flows, 16 for 8,000.
    let hs = in_sets(31, 20_000, 255, 2, 53, Protocol::Udp);
    on_two_cpus(&mut hs_lab, [&hs[..10_000], &hs[10_000..]], 1);
    let c = hs_lab.dp.counters().unwrap();
    let present = used(&hs_lab.dp.flow_table(true).unwrap(), 2);
    let (miss, evicted, raced) = (
        c.flow(FlowEvent::Miss),
        c.flow(FlowEvent::SynEvicted),
        c.flow(FlowEvent::SynRaced),
    );
    println!(
        "handshake table: {miss} new entries = {present} present + {evicted} pushed out + {raced} lost to the other CPU"
    );
    assert_eq!(miss, 20_000);
    assert_eq!(miss, present + evicted + raced);
    assert_eq!(
        c.flow(FlowEvent::Evicted),
        0,
        "one-packet flows never reach the connection table"
    );

    let mut lab = lab();
    let main = in_sets(32, 8_000, 16383, 4, 80, Protocol::Tcp);
    on_two_cpus(&mut lab, [&main[..4_000], &main[4_000..]], 2);
    let c = lab.dp.counters().unwrap();
    let present = used(&lab.dp.flow_table(false).unwrap(), 4);
    // A flow's second packet that found its handshake entry moves it
    // (a hit): that is one new connection-table entry.
    let (moved, evicted, raced) = (
        c.flow(FlowEvent::Hit),
        c.flow(FlowEvent::Evicted),
        c.flow(FlowEvent::Raced),
    );
    println!(
        "connection table: {moved} entries moved in = {present} present + {evicted} pushed out + {raced} lost to the other CPU"
    );
    assert!(moved > 4_000, "{moved}");
    assert_eq!(moved, present + evicted + raced);
}

/// A FIN from the client starts the closing time: the entry keeps serving
/// the connection's last packets, then makes room, so closed connections
/// do not crowd out live ones.
#[test]
fn a_client_fin_ends_the_entry_after_the_closing_timeout() {
    let mut lab = lab();
    let fs = same_set(40, 5, "203.0.113.10", 80, Protocol::Tcp);
    let first = establish(&mut lab, &fs[..4]);
    // FIN+ACK from each client: closing.
    let fin = FrameSpec::default();
    for (f, b) in fs[..4].iter().zip(&first) {
        let mut frame = lab.frame(f, fin.clone());
        frame[14 + 20 + 13] = 0x11;
        let r = lab.run(&frame).unwrap();
        assert_eq!(parse_encapsulated(&r.frame).unwrap().outer.dst(), *b);
    }
    assert_eq!(lab.dp.counters().unwrap().flow(FlowEvent::Closing), 4);
    // The last ACKs within the closing time still reach their backends.
    assert_eq!(route(&mut lab, &fs[..4]), first);
    // After it (1 s in the lab), a new flow of the same full set takes a
    // slot without evicting anyone.
    thread::sleep(Duration::from_millis(1500));
    establish(&mut lab, &fs[4..5]);
    let c = lab.dp.counters().unwrap();
    println!(
        "4 closed flows, then a fifth in their set: evicted {}, closing {}",
        c.flow(FlowEvent::Evicted),
        c.flow(FlowEvent::Closing)
    );
    assert_eq!(
        c.flow(FlowEvent::Evicted),
        0,
        "a closed connection held a slot"
    );
}

/// Floods of one-packet flows (ACKs of unknown TCP flows, UDP datagrams
/// from random sources) on both CPUs at once churn the handshake table
/// only: 100,000 established flows keep their entries and backends.
#[test]
fn ack_and_udp_floods_leave_100000_established_flows_in_place() {
    // The default size (4M slots: 64 MiB; its handshake table 65,536 slots),
    // so that establishing 100,000 flows overflows no set.
    // (A minute of UDP idle time: every flood entry stays live, so each one
    // pushing another out counts, however slowly this machine runs.)
    let mut lab = lab_with(
        &CONFIG
            .replace("size = 65536", "size = 4194304")
            .replace("udp_idle_timeout = 1", "udp_idle_timeout = 60"),
    );
    let established = flows(50, 100_000, "203.0.113.10", 80, Protocol::Tcp);
    let first = establish(&mut lab, &established);
    let before = lab.dp.counters().unwrap();
    assert_eq!(before.flow(FlowEvent::Evicted), 0);
    let tcp_flood = flows(51, 150_000, "203.0.113.10", 80, Protocol::Tcp);
    let udp_flood = flows(52, 150_000, "203.0.113.10", 53, Protocol::Udp);
    let started = std::time::Instant::now();
    on_two_cpus(&mut lab, [&tcp_flood, &udp_flood], 1);
    let took = started.elapsed();
    let after = lab.dp.counters().unwrap();
    let delta = |e| after.flow(e) - before.flow(e);
    println!(
        "100,000 established flows; floods of 150,000 ACKs (CPU 0) and 150,000 UDP datagrams (CPU 1) in {:.1} s: handshake table pushed out {}, connection table evicted {}, raced {}",
        took.as_secs_f64(),
        delta(FlowEvent::SynEvicted),
        delta(FlowEvent::Evicted),
        delta(FlowEvent::Raced) + delta(FlowEvent::SynRaced),
    );
    assert!(delta(FlowEvent::SynEvicted) > 200_000);
    assert_eq!(
        delta(FlowEvent::Evicted),
        0,
        "the floods pushed established flows out"
    );
    // Every established flow still finds its entry (a hit), and keeps its
    // backend after a table change that would move many.
    reweigh(&mut lab);
    let hits = lab.dp.counters().unwrap().flow(FlowEvent::Hit);
    assert_eq!(route(&mut lab, &established), first);
    assert_eq!(
        lab.dp.counters().unwrap().flow(FlowEvent::Hit) - hits,
        100_000,
        "established flows lost their entries"
    );
}

/// `on_saturated = "shed"` in the data plane: while a VIP sheds a share,
/// that share of SYNs of new connections is dropped (`shed`), drawn anew
/// for each SYN; established flows, a SYN sent again during its handshake,
/// a TCP VIP's other packets and UDP are never shed; the share survives a
/// table rebuild and 0 stops it.
#[test]
fn a_shedding_vip_drops_its_share_of_new_syns_and_nothing_else() {
    let mut lab = lab();
    let tcp = VipAddr {
        addr: "203.0.113.10".parse().unwrap(),
        port: 80,
        protocol: Protocol::Tcp,
    };
    let udp = VipAddr {
        protocol: Protocol::Udp,
        port: 53,
        ..tcp
    };
    let established = flows(20, 100, "203.0.113.10", 80, Protocol::Tcp);
    let first = establish(&mut lab, &established);
    // Handshakes in progress: their SYN admitted before shedding starts.
    let handshakes = flows(21, 100, "203.0.113.10", 80, Protocol::Tcp);
    let admitted: Vec<IpAddr> = handshakes.iter().map(|f| syn(&mut lab, f)).collect();

    assert!(lab.dp.set_vip_shed(&tcp, 0.5).unwrap());
    assert!(lab.dp.set_vip_shed(&udp, 0.5).unwrap());
    assert_eq!(lab.dp.vip_shed(&tcp), Some(0.5));
    let syn_frame = |lab: &PacketLab, f: &Flow| {
        let mut frame = lab.frame(f, FrameSpec::default());
        frame[14 + 20 + 13] = 0x02;
        frame
    };
    let shed_count = |lab: &PacketLab| lab.dp.counters().unwrap().reason(lb_common::Reason::Shed);
    // (Before the flood of new SYNs below, which overflows the lab's small
    // handshake table.)
    for (f, b) in handshakes.iter().zip(&admitted) {
        assert_eq!(syn(&mut lab, f), *b, "a SYN sent again keeps its handshake");
    }
    let new = flows(22, 2000, "203.0.113.10", 80, Protocol::Tcp);
    let mut dropped = 0;
    for f in &new {
        let r = lab.run(&syn_frame(&lab, f)).unwrap();
        if r.action == xdp_action::XDP_DROP {
            dropped += 1;
        } else {
            assert_eq!(r.action, xdp_action::XDP_TX);
        }
    }
    let share = dropped as f64 / new.len() as f64;
    println!(
        "shed share 0.5: {dropped} of {} new SYNs dropped ({share:.3})",
        new.len()
    );
    assert!((0.45..=0.55).contains(&share), "{share}");
    assert_eq!(shed_count(&lab), dropped, "each counted as shed");
    assert_eq!(
        route(&mut lab, &established),
        first,
        "established flows untouched"
    );
    // Other packets of unknown TCP flows, and UDP: scheduled, never shed.
    route(&mut lab, &flows(23, 200, "203.0.113.10", 80, Protocol::Tcp));
    route(&mut lab, &flows(24, 200, "203.0.113.10", 53, Protocol::Udp));
    assert_eq!(shed_count(&lab), dropped);
    // A SYN that was shed and is sent again is drawn anew: retransmissions
    // get through.
    let retried = flows(25, 200, "203.0.113.10", 80, Protocol::Tcp);
    let mut tries = 0;
    for f in &retried {
        loop {
            tries += 1;
            if lab.run(&syn_frame(&lab, f)).unwrap().action == xdp_action::XDP_TX {
                break;
            }
            assert!(tries < 2000, "retransmitted SYNs get through");
        }
    }
    println!("200 connections took {tries} SYNs at share 0.5");
    // A table rebuild keeps the share; 0 ends it.
    reweigh(&mut lab);
    assert_eq!(lab.dp.vip_shed(&tcp), Some(0.5));
    assert!(!lab.dp.set_vip_shed(&tcp, 0.5).unwrap(), "unchanged");
    lab.dp.set_vip_shed(&tcp, 0.0).unwrap();
    let before = shed_count(&lab);
    for f in &flows(26, 300, "203.0.113.10", 80, Protocol::Tcp) {
        syn(&mut lab, f);
    }
    assert_eq!(shed_count(&lab), before, "nothing shed at 0");
}
