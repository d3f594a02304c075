//! The connection table through `BPF_PROG_TEST_RUN`: established flows keep
//! their backend while the backend set changes; entries end on RST, on idle
//! time, when their backend goes, and (by policy) when it is down.

use std::{collections::BTreeMap, net::IpAddr, thread, time::Duration};

use lb::desired::vip::{Backend, DownPolicy, Protocol, Vip, VipAddr};
use lb_common::{FlowEvent, xdp_action};
use lb_tests::{
    SplitMix,
    frames::{Flow, FrameSpec, parse_encapsulated},
    packet_lab::PacketLab,
};

const CONFIG: &str = r#"
[balancer]
source_v4 = "10.200.0.1"
max_vips = 4
max_backends = 12

[conntrack]
size = 65536
udp_idle_timeout = 1

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
    let lab = PacketLab::new(CONFIG).unwrap();
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
    let first = route(&mut lab, &fs);
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

    let c = lab.dp.counters().unwrap();
    assert_eq!(c.flow(FlowEvent::Miss), 600);
    assert_eq!(c.flow(FlowEvent::Hit), 600);
}

#[test]
fn removing_a_backend_moves_only_its_own_flows() {
    let mut lab = lab();
    let fs = flows(3, 300, "203.0.113.10", 80, Protocol::Tcp);
    let first = route(&mut lab, &fs);
    lab.dp
        .set_vip(&tcp_vip(&[("10.200.0.11", 100), ("10.200.0.13", 100)]))
        .unwrap();
    let after = route(&mut lab, &fs);
    for i in 0..fs.len() {
        if first[i].to_string() == "10.200.0.12" {
            assert_eq!(
                Some(after[i]),
                lab.dp.backend_for(&fs[i].key()),
                "a flow of the removed backend is scheduled anew"
            );
        } else {
            assert_eq!(after[i], first[i], "a flow of a remaining backend stays");
        }
    }
    // The freed id goes to a new backend: the removed backend's flows must
    // not follow their old entries to it.
    lab.dp
        .set_vip(&tcp_vip(&[
            ("10.200.0.11", 100),
            ("10.200.0.13", 100),
            ("10.200.0.15", 100),
        ]))
        .unwrap();
    let again = route(&mut lab, &fs);
    for i in 0..fs.len() {
        if first[i].to_string() == "10.200.0.12" {
            assert_eq!(
                again[i], after[i],
                "rescheduled flows keep their new backend"
            );
        }
    }
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
    let r0 = route(&mut lab, &resched);
    let s0 = route(&mut lab, &stick);
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
    let first: Vec<IpAddr> = route(&mut lab, &fs[..4]);
    assert_eq!(lab.dp.counters().unwrap().flow(FlowEvent::Evicted), 0);
    // A fifth flow takes the slot of the first (the one expiring first).
    let fifth = send(&mut lab, &fs[4], FrameSpec::default());
    let c = lab.dp.counters().unwrap();
    assert_eq!(c.flow(FlowEvent::Evicted), 1);
    assert_eq!(c.flow(FlowEvent::Miss), 5);
    // After a table change the three survivors and the fifth keep their
    // backends; the evicted first flow is scheduled on the current table.
    reweigh(&mut lab);
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
    assert_eq!((c.flow(FlowEvent::Hit), c.flow(FlowEvent::Miss)), (4, 6));
    // It in turn took the oldest slot (the second flow's) and counted it.
    assert_eq!(c.flow(FlowEvent::Evicted), 2);
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
    let first = route(&mut lab, &fs);
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
