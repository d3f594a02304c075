//! What `Dataplane::attach` (the code `lbd` runs) does to the host, with
//! real traffic on veths: the host does not route what arrives on the
//! balancer's interface for another host (no ICMP redirects), and VLAN
//! tags reach the program whatever the sending port's offloads.
//!
//! Topology: a client namespace (`c0`: 10.200.0.2 and .3, fd00:200::2 and
//! ::3; also the backend), a switch (bridge `br0`, ports `p-c` and `p-lb`,
//! `lb_pass` on `p-lb` so native `XDP_TX` is delivered) and the balancer
//! (`lb0`: 10.200.0.1, fd00:200::1), attached in native mode.

use std::{net::UdpSocket, thread, time::Duration};

use lb::{
    dataplane::{AttachMode, Dataplane, PassProgram},
    desired::{config, vip::Protocol},
};
use lb_common::Reason;
use lb_tests::{
    capture::PacketSocket,
    frames::{self, Flow, FrameSpec},
    netns::{Netns, format_mac},
    require_root,
};

const CONFIG: &str = r#"
[balancer]
source_v4 = "10.200.0.1"
source_v6 = "fd00:200::1"

[[vip]]
address = "203.0.113.10"
port = 80
protocol = "tcp"
backends = [ { address = "10.200.0.2" } ]
"#;

struct Topology {
    client: Netns,
    switch: Netns,
    balancer: Netns,
    client_mac: [u8; 6],
    lb_mac: [u8; 6],
    _pass: PassProgram,
}

/// A veth `a` in `ns_a` to `b` in `ns_b`, both up.
fn veth(ns_a: &Netns, a: &str, ns_b: &Netns, b: &str) {
    ns_a.ip(&[
        "link",
        "add",
        a,
        "type",
        "veth",
        "peer",
        "name",
        b,
        "netns",
        ns_b.name(),
    ])
    .unwrap();
    ns_a.ip(&["link", "set", a, "up"]).unwrap();
    ns_b.ip(&["link", "set", b, "up"]).unwrap();
}

fn ethtool(ns: &Netns, args: &[&str]) -> String {
    ns.exec("ethtool", args).unwrap()
}

/// Whether `feature` of `dev` in `ns` is on.
fn offload_on(ns: &Netns, dev: &str, feature: &str) -> bool {
    ethtool(ns, &["-k", dev])
        .lines()
        .any(|l| l.trim().starts_with(&format!("{feature}: on")))
}

impl Topology {
    fn new() -> Topology {
        require_root();
        let client = Netns::new("host-c").unwrap();
        let switch = Netns::new("host-sw").unwrap();
        let balancer = Netns::new("host-lb").unwrap();
        switch
            .ip(&["link", "add", "br0", "type", "bridge"])
            .unwrap();
        switch.ip(&["link", "set", "br0", "up"]).unwrap();
        veth(&client, "c0", &switch, "p-c");
        veth(&balancer, "lb0", &switch, "p-lb");
        for port in ["p-c", "p-lb"] {
            switch.ip(&["link", "set", port, "master", "br0"]).unwrap();
        }
        for (ns, dev, addrs) in [
            (
                &client,
                "c0",
                [
                    "10.200.0.2/24",
                    "10.200.0.3/24",
                    "fd00:200::2/64",
                    "fd00:200::3/64",
                ]
                .as_slice(),
            ),
            (
                &balancer,
                "lb0",
                ["10.200.0.1/24", "fd00:200::1/64"].as_slice(),
            ),
        ] {
            for a in addrs {
                ns.ip(&["addr", "add", a, "dev", dev, "nodad"]).unwrap();
            }
        }
        // veth would leave partial checksums that XDP_TX sends as they are.
        ethtool(&client, &["-K", "c0", "tx", "off"]);
        let client_mac = client.mac("c0").unwrap();
        let lb_mac = balancer.mac("lb0").unwrap();
        // The backend and the hairpin next hops are the client: known
        // neighbours, so nothing waits for ARP.
        for addr in ["10.200.0.2", "10.200.0.3", "fd00:200::3"] {
            balancer
                .ip(&[
                    "neigh",
                    "replace",
                    addr,
                    "lladdr",
                    &format_mac(client_mac),
                    "dev",
                    "lb0",
                    "nud",
                    "permanent",
                ])
                .unwrap();
        }
        let pass = {
            let _inside = switch.enter().unwrap();
            PassProgram::attach("p-lb").unwrap()
        };
        Topology {
            client,
            switch,
            balancer,
            client_mac,
            lb_mac,
            _pass: pass,
        }
    }

    /// The balancer loaded with `CONFIG` and attached to `lb0` (native).
    fn attach(&self) -> Dataplane {
        let _inside = self.balancer.enter().unwrap();
        let c = config::parse(CONFIG, "test config").unwrap();
        let mut dp = Dataplane::load(&c.balancer).unwrap();
        dp.sync(&c.vips).unwrap();
        assert_eq!(
            dp.attach("lb0", AttachMode::Native).unwrap(),
            AttachMode::Native
        );
        dp
    }
}

/// A counter of `/proc/net/snmp` (`table`, `name`) or, with table "",
/// `/proc/net/snmp6`, in `ns`.
fn snmp(ns: &Netns, table: &str, name: &str) -> u64 {
    if table.is_empty() {
        let text = ns.exec("cat", &["/proc/net/snmp6"]).unwrap();
        return text
            .lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or(0);
    }
    let text = ns.exec("cat", &["/proc/net/snmp"]).unwrap();
    let prefix = format!("{table}:");
    let lines: Vec<&str> = text.lines().filter(|l| l.starts_with(&prefix)).collect();
    let (Some(names), Some(values)) = (lines.first(), lines.get(1)) else {
        return 0;
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == name)
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

/// Traffic that is not for a VIP and reaches the balancer's stack (another
/// address, routed back out the same interface) is neither routed nor
/// answered with an ICMP redirect, for IPv4 and for IPv6 (where the host
/// forwards, `conf/all/forwarding` on); detaching removes the rules.
#[test]
fn the_host_does_not_route_back_out_what_is_not_for_a_vip() {
    let t = Topology::new();
    t.balancer
        .ip(&[
            "route",
            "add",
            "198.51.100.0/24",
            "via",
            "10.200.0.3",
            "dev",
            "lb0",
        ])
        .unwrap();
    t.balancer
        .ip(&[
            "-6",
            "route",
            "add",
            "2001:db8:77::/64",
            "via",
            "fd00:200::3",
            "dev",
            "lb0",
        ])
        .unwrap();
    t.balancer
        .exec(
            "sh",
            &["-c", "echo 1 > /proc/sys/net/ipv6/conf/all/forwarding"],
        )
        .unwrap();
    t.client
        .ip(&["route", "add", "198.51.100.0/24", "via", "10.200.0.1"])
        .unwrap();
    t.client
        .ip(&[
            "-6",
            "route",
            "add",
            "2001:db8:77::/64",
            "via",
            "fd00:200::1",
        ])
        .unwrap();
    let mut dp = t.attach();
    {
        let _inside = t.client.enter().unwrap();
        let v4 = UdpSocket::bind("0.0.0.0:0").unwrap();
        let v6 = UdpSocket::bind("[::]:0").unwrap();
        for i in 0..5u8 {
            v4.send_to(&[i; 20], "198.51.100.77:9").unwrap();
            v6.send_to(&[i; 20], "[2001:db8:77::77]:9").unwrap();
            thread::sleep(Duration::from_millis(20));
        }
    }
    thread::sleep(Duration::from_millis(300));
    let figures = [
        ("IPv4 forwarded", snmp(&t.balancer, "Ip", "ForwDatagrams")),
        (
            "IPv4 redirects sent",
            snmp(&t.balancer, "IcmpMsg", "OutType5"),
        ),
        (
            "IPv6 forwarded",
            snmp(&t.balancer, "", "Ip6OutForwDatagrams"),
        ),
        (
            "IPv6 redirects sent",
            snmp(&t.balancer, "", "Icmp6OutRedirects"),
        ),
    ];
    let passed = dp.counters().unwrap().reason(Reason::NotVip);
    println!("10 datagrams for other hosts, {passed} passed to the host by XDP: {figures:?}");
    assert!(passed >= 10, "the datagrams reached the balancer's stack");
    for (what, n) in figures {
        assert_eq!(n, 0, "{what}");
    }
    {
        let _inside = t.balancer.enter().unwrap();
        dp.detach().unwrap();
    }
    for family in ["-4", "-6"] {
        let rules = t.balancer.ip(&[family, "rule", "show"]).unwrap();
        assert!(!rules.contains("blackhole"), "{family}: {rules}");
    }
}

/// A tagged frame for the VIP is forwarded tagged, whether the port that
/// sends it to the balancer (the switch's `p-lb`, the veth peer) has its
/// VLAN transmit offload on or off: `attach` turns off what would keep the
/// tag from reaching XDP (the interface's receive offload; the peer's
/// transmit offload).
#[test]
fn tagged_frames_are_forwarded_tagged_whatever_the_sending_ports_offloads() {
    for offload in ["on", "off"] {
        let t = Topology::new();
        for (ns, dev) in [(&t.switch, "p-lb"), (&t.client, "c0")] {
            ethtool(ns, &["-K", dev, "tx-vlan-offload", offload]);
        }
        assert!(
            offload_on(&t.balancer, "lb0", "rx-vlan-offload"),
            "veth's default"
        );
        let dp = t.attach();
        for (ns, dev, feature) in [
            (&t.balancer, "lb0", "rx-vlan-offload"),
            (&t.switch, "p-lb", "tx-vlan-offload"),
        ] {
            assert!(
                !offload_on(ns, dev, feature),
                "{dev} {feature} after attach"
            );
        }
        let watch = {
            let _inside = t.switch.enter().unwrap();
            PacketSocket::open("p-lb").unwrap()
        };
        let f = Flow {
            src: "198.18.0.9".parse().unwrap(),
            dst: "203.0.113.10".parse().unwrap(),
            sport: 40000,
            dport: 80,
            protocol: Protocol::Tcp,
        };
        let tagged = frames::build(
            &f,
            &FrameSpec {
                dst_mac: t.lb_mac,
                vlan: Some(5),
                payload: vec![1; 30],
                ..Default::default()
            },
        );
        {
            let _inside = t.client.enter().unwrap();
            let send = PacketSocket::open("c0").unwrap();
            for _ in 0..3 {
                send.send(&tagged).unwrap();
            }
        }
        // What the balancer sent back out of lb0: IPIP to the backend.
        let out: Vec<_> = watch
            .drain(Duration::from_millis(500), 64)
            .unwrap()
            .into_iter()
            .filter(|s| {
                !s.outgoing && s.frame.len() > 34 && s.frame[12..14] == [8, 0] && s.frame[23] == 4
            })
            .collect();
        let c = dp.counters().unwrap();
        println!(
            "sending port tx-vlan-offload {offload}: {} forwarded, {} encapsulated frames seen, tags {:?}",
            c.reason(Reason::Forwarded),
            out.len(),
            out.iter()
                .map(|s| s.vlan_tci.map(|t| t & 0x0fff))
                .collect::<Vec<_>>()
        );
        assert_eq!(c.reason(Reason::Forwarded), 3, "{:?}", c.reasons);
        assert_eq!(out.len(), 3);
        for s in &out {
            assert_eq!(
                s.vlan_tci.map(|t| t & 0x0fff),
                Some(5),
                "sent out on VLAN 5"
            );
            assert_eq!(s.frame[..6], t.client_mac, "to the backend");
        }
    }
}

/// `lbd --cleanup` (pinning::cleanup) of a pinned balancer removes the
/// no-transit rules of the interface it was attached to.
#[test]
fn cleanup_removes_the_no_transit_rules() {
    let t = Topology::new();
    let _inside = t.balancer.enter().unwrap();
    lb::dataplane::pinning::ensure_bpffs().unwrap();
    let dir = lb::dataplane::pinning::instance_dir(&format!("lbt-host-{}", std::process::id()));
    // Whatever happens, the pinned state goes.
    struct Unpin(std::path::PathBuf);
    impl Drop for Unpin {
        fn drop(&mut self) {
            let _ = lb::dataplane::pinning::cleanup(&self.0);
        }
    }
    let _unpin = Unpin(dir.clone());
    let c = config::parse(CONFIG, "test config").unwrap();
    let mut dp = Dataplane::load_pinned(&c.balancer, &dir).unwrap();
    dp.sync(&c.vips).unwrap();
    dp.attach("lb0", AttachMode::Native).unwrap();
    let rules = |family| t.balancer.ip(&[family, "rule", "show"]).unwrap();
    for family in ["-4", "-6"] {
        assert!(
            rules(family).contains("iif lb0 blackhole"),
            "{family}: {}",
            rules(family)
        );
    }
    drop(dp);
    let removed = lb::dataplane::pinning::cleanup(&dir).unwrap();
    println!("cleanup removed {} pinned objects", removed.len());
    for family in ["-4", "-6"] {
        assert!(
            !rules(family).contains("blackhole"),
            "{family}: {}",
            rules(family)
        );
    }
}
