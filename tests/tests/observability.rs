//! What operators watch: `/metrics` counts exactly what was sent (through
//! `BPF_PROG_TEST_RUN` and through the lab's real network), every reason has
//! its label, `promtool` accepts a real scrape and the example scrape config,
//! the example dashboard only asks for families lbd exports, and state
//! changes are logged once, at info, with their cause.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr, UdpSocket},
    path::PathBuf,
    time::Duration,
};

use lb::{
    control::controller::{Scrape, Snapshot},
    control::metrics,
    desired::config,
    desired::vip::{Protocol, VipAddr},
};
use lb_common::{FlowEvent, Reason};
use lb_tests::{
    SplitMix,
    frames::{self, Flow, FrameSpec},
    lab::{Lab, LabSpec, VIP_V4, VIP_V6, binary_path, servers::ECHO_PORT},
    packet_lab::PacketLab,
    pin_to_cpu, prom,
};

const CONFIG: &str = r#"
[balancer]
source_v4 = "10.200.0.1"
source_v6 = "fd00:200::1"
mtu = 1500
max_vips = 8
max_backends = 64

[[vip]]
address = "203.0.113.10"
port = 80
protocol = "tcp"
backends = [
  { address = "10.200.0.11", weight = 1 },
  { address = "10.200.0.12", weight = 2 },
  { address = "10.200.0.13", weight = 1 },
]

[[vip]]
address = "2001:db8:10::1"
port = 53
protocol = "udp"
backends = [
  { address = "fd00:200::41", weight = 1 },
  { address = "fd00:200::42", weight = 1 },
]

[[vip]]
address = "203.0.113.40"
port = 80
protocol = "tcp"
backends = [ { address = "10.200.0.71", weight = 0 } ]

[[vip]]
address = "203.0.113.50"
port = 80
protocol = "tcp"
backends = [ { address = "10.200.0.81", weight = 1 } ]
"#;

fn repo_file(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(path)
}

/// A fresh flow from a client address of `rng`'s to `dst:dport`.
fn flow(rng: &mut SplitMix, dst: &str, dport: u16, protocol: Protocol) -> Flow {
    let dst: IpAddr = dst.parse().unwrap();
    let src: IpAddr = match dst {
        IpAddr::V4(_) => IpAddr::from((0xc612_0000u32 | (rng.next_u32() & 0x1_ffff)).to_be_bytes()),
        IpAddr::V6(_) => {
            let mut o = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
            o[4..12].copy_from_slice(&rng.next_u64().to_be_bytes());
            IpAddr::from(o)
        }
    };
    Flow {
        src,
        dst,
        sport: 1024 + rng.next_u16() % 60000,
        dport,
        protocol,
    }
}

fn payload(n: usize) -> FrameSpec {
    FrameSpec {
        payload: vec![0x5a; n],
        ..Default::default()
    }
}

/// The scrape of the packet lab's data plane, as lbd would serve it.
fn scrape(lab: &PacketLab) -> String {
    let config = config::parse(CONFIG, "test config").unwrap();
    let snapshot = Snapshot::read(&lab.dp, &config, Duration::ZERO);
    metrics::render(
        &Scrape::read(&lab.dp, snapshot).unwrap(),
        &lb::control::api::request_counts(),
    )
}

fn counter(text: &str, name: &str, labels: &[(&str, &str)]) -> u64 {
    prom::value(text, name, labels)
        .unwrap_or_else(|| panic!("no sample {name}{labels:?} in the scrape:\n{text}")) as u64
}

/// Known packets of every kind through the real program; the scrape's
/// counters equal them exactly. Each reason gets a different count, so a
/// label swapped with another would show (the ICMP answers and the
/// fragment policy included). `encap_failed` (no headroom for the outer
/// header) cannot happen under `BPF_PROG_TEST_RUN`, which always gives the
/// frame 256 bytes of headroom: it is checked to be exported, at 0.
#[test]
fn scraped_counters_equal_the_packets_and_bytes_sent_under_their_labels() {
    pin_to_cpu(0);
    let mut lab = PacketLab::new(CONFIG).unwrap();
    let mut rng = SplitMix(71);
    let mut want: BTreeMap<Reason, u64> = BTreeMap::new();
    let mut vips: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    let mut backends: BTreeMap<(String, String), (u64, u64)> = BTreeMap::new();
    let mut run = |lab: &mut PacketLab, frame: &[u8], reason: Reason| {
        let r = lab.run(frame).unwrap();
        assert_eq!(r.action, reason.action(), "{reason:?}");
        *want.entry(reason).or_default() += 1;
    };

    // Forwarded: 2 VIPs x 30 flows x 2 packets of different sizes.
    let mut new_flows = 0;
    let mut hits = 0;
    for (dst, port, proto) in [
        ("203.0.113.10", 80, Protocol::Tcp),
        ("2001:db8:10::1", 53, Protocol::Udp),
    ] {
        for i in 0..30 {
            let f = flow(&mut rng, dst, port, proto);
            let vip = VipAddr {
                addr: f.dst,
                port,
                protocol: proto,
            }
            .to_string();
            let backend = lab.dp.backend_for(&f.key()).unwrap().to_string();
            for size in [i * 7, 1000 - i * 13] {
                let frame = lab.frame(&f, payload(size));
                run(&mut lab, &frame, Reason::Forwarded);
                let v = vips.entry(vip.clone()).or_default();
                v.0 += 1;
                v.1 += frame.len() as u64;
                let b = backends.entry((vip.clone(), backend.clone())).or_default();
                b.0 += 1;
                b.1 += frame.len() as u64;
            }
            new_flows += 1;
            hits += 1;
        }
    }

    let base = lab.frame(
        &flow(&mut rng, "203.0.113.10", 80, Protocol::Tcp),
        payload(0),
    );
    let v6 = lab.frame(
        &flow(&mut rng, "2001:db8:10::1", 53, Protocol::Udp),
        payload(0),
    );
    let mut arp = base.clone();
    arp[12..14].copy_from_slice(&[0x08, 0x06]);
    let mut icmp = base.clone();
    icmp[14 + 9] = 1;
    // Fragments: to a VIP address dropped (the default policy), to other
    // addresses passed.
    let mut fragment = lab.frame(
        &flow(&mut rng, "198.51.100.9", 80, Protocol::Tcp),
        payload(0),
    );
    fragment[14 + 6] = 0x20;
    let mut vip_fragment = base.clone();
    vip_fragment[14 + 6] = 0x20;
    let mut ext = v6.clone();
    ext[14 + 6] = 51; // an authentication header first
    let mut malformed = base.clone();
    malformed[14] = 0x44; // IHL 4
    let mut not_ours = base.clone();
    not_ours[..6].copy_from_slice(&[0xff; 6]); // broadcast
    // ICMP: an echo request to a VIP; "fragmentation needed" about a VIP
    // flow (the quoted packet went from the VIP to a client), and one whose
    // quoted source is not the VIP it was sent to.
    let client: IpAddr = "198.18.7.7".parse().unwrap();
    let vip4: IpAddr = "203.0.113.10".parse().unwrap();
    let router: IpAddr = "192.0.2.1".parse().unwrap();
    let echo = frames::icmp_echo(
        client,
        vip4,
        frames::CLIENT_MAC,
        lab.if_mac,
        64,
        7,
        1,
        b"ping",
        false,
    );
    let reply_flow = Flow {
        src: vip4,
        dst: client,
        sport: 80,
        dport: 40000,
        protocol: Protocol::Tcp,
    };
    let quoted = frames::ip_packet(&frames::build(&reply_flow, &payload(1400))).to_vec();
    let too_big_icmp = frames::icmp_too_big(
        router,
        vip4,
        frames::CLIENT_MAC,
        lab.if_mac,
        64,
        1400,
        &quoted[..28],
    );
    let forwarded_to = lab
        .dp
        .backend_for(
            &Flow {
                src: client,
                dst: vip4,
                sport: 40000,
                dport: 80,
                protocol: Protocol::Tcp,
            }
            .key(),
        )
        .unwrap()
        .to_string();
    let mut spoofed_quote = quoted[..28].to_vec();
    spoofed_quote[12..16].copy_from_slice(&[192, 0, 2, 99]);
    let unmatched = frames::icmp_too_big(
        router,
        vip4,
        frames::CLIENT_MAC,
        lab.if_mac,
        64,
        1400,
        &spoofed_quote,
    );
    let passes = [
        (Reason::NotIp, arp, 2),
        (Reason::NotTcpUdp, icmp, 3),
        (Reason::Fragment, fragment, 5),
        (Reason::Ipv6ExtHeader, ext, 6),
        (Reason::Malformed, malformed, 7),
        (Reason::FragmentDropped, vip_fragment, 11),
        (Reason::IcmpUnmatched, unmatched, 15),
        (Reason::NotOurMac, not_ours, 16),
    ];
    for (reason, frame, n) in &passes {
        for _ in 0..*n {
            run(&mut lab, frame, *reason);
        }
    }
    for _ in 0..4 {
        let f = flow(&mut rng, "198.51.100.7", 80, Protocol::Tcp);
        let frame = lab.frame(&f, payload(0));
        run(&mut lab, &frame, Reason::NotVip);
    }
    // Drops of VIP traffic, each a new flow (a connection-table miss).
    for _ in 0..8 {
        let f = flow(&mut rng, "203.0.113.40", 80, Protocol::Tcp);
        let frame = lab.frame(&f, payload(0));
        run(&mut lab, &frame, Reason::NoBackend);
        new_flows += 1;
    }
    for _ in 0..13 {
        run(&mut lab, &echo, Reason::IcmpEchoReply);
    }
    let vip_label = "203.0.113.10:80/tcp".to_string();
    for _ in 0..14 {
        run(&mut lab, &too_big_icmp, Reason::IcmpForwarded);
        let v = vips.entry(vip_label.clone()).or_default();
        v.0 += 1;
        v.1 += too_big_icmp.len() as u64;
        let b = backends
            .entry((vip_label.clone(), forwarded_to.clone()))
            .or_default();
        b.0 += 1;
        b.1 += too_big_icmp.len() as u64;
    }
    // Too big once encapsulated: answered with ICMP (the default), then,
    // with `too_big = "drop"`, dropped.
    for _ in 0..9 {
        let f = flow(&mut rng, "203.0.113.10", 80, Protocol::Tcp);
        let frame = lab.frame(&f, payload(1481 - 40));
        run(&mut lab, &frame, Reason::TooBigIcmpSent);
        new_flows += 1;
    }
    let mut settings = config::parse(CONFIG, "t").unwrap().balancer;
    settings.too_big_icmp = false;
    lab.dp.set_settings(&settings).unwrap();
    for _ in 0..12 {
        let f = flow(&mut rng, "203.0.113.10", 80, Protocol::Tcp);
        let frame = lab.frame(&f, payload(1481 - 40));
        run(&mut lab, &frame, Reason::TooBig);
        new_flows += 1;
    }
    lab.forget_neighbour("10.200.0.81".parse().unwrap())
        .unwrap();
    lab.dp.refresh_next_hops().unwrap();
    for _ in 0..10 {
        let f = flow(&mut rng, "203.0.113.50", 80, Protocol::Tcp);
        let frame = lab.frame(&f, payload(0));
        run(&mut lab, &frame, Reason::FibFailed);
        new_flows += 1;
    }

    // Shed: SYNs of new connections to a VIP shedding 90 % of them; the
    // others reach its (empty) table. Until 18 were shed.
    let no_backends = VipAddr {
        addr: "203.0.113.40".parse().unwrap(),
        port: 80,
        protocol: Protocol::Tcp,
    };
    lab.dp.set_vip_shed(&no_backends, 0.9).unwrap();
    let mut shed = 0;
    while shed < 18 {
        let f = flow(&mut rng, "203.0.113.40", 80, Protocol::Tcp);
        let mut frame = lab.frame(&f, payload(0));
        frame[14 + 20 + 13] = 0x02; // SYN
        let r = lab.run(&frame).unwrap();
        assert_eq!(r.action, lb_common::xdp_action::XDP_DROP);
        let reason = if lab.dp.counters().unwrap().reason(Reason::Shed) > shed {
            shed += 1;
            Reason::Shed
        } else {
            Reason::NoBackend
        };
        *want.entry(reason).or_default() += 1;
        new_flows += 1;
    }
    lab.dp.set_vip_shed(&no_backends, 0.0).unwrap();
    let text = scrape(&lab);
    for reason in Reason::ALL {
        assert_eq!(
            counter(&text, "lb_packets_total", &[("reason", reason.name())]),
            want.get(&reason).copied().unwrap_or(0),
            "lb_packets_total{{reason=\"{}\"}}",
            reason.name()
        );
    }
    assert!(
        want.keys().count() == Reason::ALL.len() - 1 && !want.contains_key(&Reason::EncapFailed),
        "every reason but encap_failed was exercised: {want:?}"
    );
    for (vip, (packets, bytes)) in &vips {
        assert_eq!(
            counter(&text, "lb_vip_flows_total", &[("vip", vip)]),
            30,
            "{vip}: 30 new flows"
        );
        assert_eq!(
            counter(&text, "lb_vip_packets_total", &[("vip", vip)]),
            *packets,
            "{vip}"
        );
        assert_eq!(
            counter(&text, "lb_vip_bytes_total", &[("vip", vip)]),
            *bytes,
            "{vip}"
        );
    }
    for ((vip, backend), (packets, bytes)) in &backends {
        let labels = [("vip", vip.as_str()), ("backend", backend.as_str())];
        assert_eq!(
            counter(&text, "lb_backend_packets_total", &labels),
            *packets,
            "{labels:?}"
        );
        assert_eq!(
            counter(&text, "lb_backend_bytes_total", &labels),
            *bytes,
            "{labels:?}"
        );
    }
    let forwarded_to_others: u64 = prom::samples(&text)
        .iter()
        .filter(|s| s.name == "lb_backend_packets_total")
        .filter(|s| !backends.contains_key(&(s.labels["vip"].clone(), s.labels["backend"].clone())))
        .map(|s| s.value as u64)
        .sum();
    assert_eq!(forwarded_to_others, 0, "no other backend counted anything");
    assert_eq!(
        counter(
            &text,
            "lb_conntrack_events_total",
            &[("event", FlowEvent::Miss.name())]
        ),
        new_flows
    );
    assert_eq!(
        counter(
            &text,
            "lb_conntrack_events_total",
            &[("event", FlowEvent::Hit.name())]
        ),
        hits
    );
    // Configuration and state, as programmed.
    let b = [("vip", "203.0.113.10:80/tcp"), ("backend", "10.200.0.12")];
    assert_eq!(counter(&text, "lb_backend_weight", &b), 2);
    assert_eq!(counter(&text, "lb_backend_weight_in_effect", &b), 2);
    assert_eq!(counter(&text, "lb_backend_up", &b), 1);
    let share = prom::value(&text, "lb_backend_table_share_ratio", &b).unwrap();
    assert!((share - 0.5).abs() < 0.01, "weight 2 of 4: share {share}");
    assert_eq!(counter(&text, "lb_map_entries", &[("map", "vips")]), 4);
    assert_eq!(counter(&text, "lb_map_capacity", &[("map", "vips")]), 8);
    assert_eq!(counter(&text, "lb_map_entries", &[("map", "backends")]), 7);
    assert_eq!(
        counter(&text, "lb_map_capacity", &[("map", "backends")]),
        64
    );
    assert_eq!(
        counter(
            &text,
            "lb_maglev_rebuilds_total",
            &[("vip", "203.0.113.10:80/tcp")]
        ),
        1
    );
}

/// `promtool check metrics` on a scrape of the packet lab with every family
/// populated.
#[test]
fn promtool_accepts_the_exporters_format() {
    let lab = PacketLab::new(CONFIG).unwrap();
    let text = scrape(&lab);
    prom::check_metrics(&text).unwrap();
}

#[test]
fn the_example_scrape_config_passes_promtool() {
    prom::check_config(&repo_file("examples/prometheus.yml")).unwrap();
}

/// Every family the example dashboard queries is one lbd exports (the
/// list of families is kept true by a unit test of the exporter; a real
/// scrape exports only listed families).
#[test]
fn the_example_dashboard_only_queries_exported_families() {
    let lab = PacketLab::new(CONFIG).unwrap();
    let mut scraped = prom::families(&scrape(&lab));
    // process_* are the prometheus crate's, not ours to list.
    scraped.retain(|f| f.starts_with("lb_"));
    let exported: std::collections::BTreeSet<String> =
        metrics::FAMILIES.iter().map(|f| f.to_string()).collect();
    assert!(scraped.is_subset(&exported), "{scraped:?}");
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo_file("examples/grafana-dashboard.json")).unwrap(),
    )
    .expect("the dashboard is JSON");
    let mut exprs = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            exprs.push(target["expr"].as_str().expect("an expr").to_string());
        }
    }
    assert!(exprs.len() >= 10, "the dashboard has its queries");
    for expr in &exprs {
        let names = metric_names(expr);
        let process = expr.contains("process_")
            && scrape(&lab).contains(
                expr.split("process_")
                    .nth(1)
                    .map(|r| r.split('{').next().unwrap_or(r))
                    .map(|n| format!("# TYPE process_{n} "))
                    .unwrap_or_default()
                    .as_str(),
            );
        assert!(
            !names.is_empty() || process,
            "{expr}: queries no family lbd exports"
        );
        for name in names {
            // A histogram's series are its family's name with a suffix.
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s).filter(|f| exported.contains(*f)))
                .unwrap_or(&name);
            assert!(exported.contains(family), "{expr}: {name} is not exported");
        }
        // Every series is picked by the balancer variable.
        assert_eq!(
            expr.matches("lb_").count() + expr.matches("process_").count(),
            expr.matches("instance=~\"$instance\"").count(),
            "{expr}: every selector filters by instance"
        );
    }
    let variables: Vec<&str> = dashboard["templating"]["list"]
        .as_array()
        .expect("variables")
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    assert!(variables.contains(&"instance"), "{variables:?}");
    // Every reason a packet can be counted under has a panel.
    for reason in Reason::ALL {
        let shown = exprs.iter().any(|e| {
            e.contains("lb_packets_total{reason=~\"")
                && e.split("reason=~\"")
                    .nth(1)
                    .and_then(|r| r.split('"').next())
                    .is_some_and(|r| r.split('|').any(|x| x == reason.name()))
        });
        assert!(
            shown,
            "no panel shows lb_packets_total{{reason=\"{}\"}}",
            reason.name()
        );
    }
}

/// `lb_...` identifiers in a PromQL expression.
fn metric_names(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("lb_") {
        let starts_word = rest[..i]
            .chars()
            .last()
            .is_none_or(|c| !(c.is_ascii_alphanumeric() || c == '_'));
        let len = rest[i..]
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(rest.len() - i);
        if starts_word {
            out.push(rest[i..i + len].to_string());
        }
        rest = &rest[i + len..];
    }
    out
}

/// Sends `size`-byte datagrams on one flow to `vip`, each after the echo of
/// the previous one came back; returns the backend that answered.
fn echo_flow(vip: SocketAddr, sizes: &[usize]) -> String {
    let local: SocketAddr = if vip.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }
        .parse()
        .unwrap();
    let sock = UdpSocket::bind(local).unwrap();
    sock.connect(vip).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut name = None;
    for &size in sizes {
        sock.send(&vec![b'x'; size]).unwrap();
        let mut buf = [0u8; 2048];
        let n = sock
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("no echo of a {size}-byte datagram to {vip}: {e}"));
        let reply = String::from_utf8_lossy(&buf[..n]).to_string();
        let (who, _) = reply.split_once(' ').expect("reply with a name");
        assert!(
            name.as_deref().is_none_or(|n| n == who),
            "a flow stays on its backend"
        );
        name = Some(who.to_string());
    }
    name.unwrap()
}

/// Real datagrams through the lab's network: lbd's `/metrics` counts every
/// one, with its bytes as received (Ethernet + IP + UDP + payload), per VIP
/// and per backend; `promtool` accepts the scrape.
#[test]
fn lab_scrape_counts_every_datagram_and_byte_and_passes_promtool() {
    let lab = Lab::start(&LabSpec::weights(&[1, 1])).unwrap();
    let before = lab.metrics().unwrap();
    let mut want: BTreeMap<(String, String), (u64, u64)> = BTreeMap::new();
    for (vip, ip_header) in [(IpAddr::from(VIP_V4), 20), (IpAddr::from(VIP_V6), 40)] {
        let addr = SocketAddr::new(vip, ECHO_PORT);
        let label = VipAddr {
            addr: vip,
            port: ECHO_PORT,
            protocol: Protocol::Udp,
        }
        .to_string();
        for i in 0..20usize {
            let sizes = [1 + i * 37, 1400 - i * 11, 64];
            let name = lab.in_client(move || echo_flow(addr, &sizes)).unwrap();
            let b = lab.backends.iter().find(|b| b.name == name).unwrap();
            let backend = if vip.is_ipv4() {
                b.v4.to_string()
            } else {
                b.v6.to_string()
            };
            let e = want.entry((label.clone(), backend)).or_default();
            e.0 += sizes.len() as u64;
            e.1 += sizes
                .iter()
                .map(|s| (14 + ip_header + 8 + s) as u64)
                .sum::<u64>();
        }
    }
    let after = lab.metrics().unwrap();
    let delta = |name: &str, labels: &[(&str, &str)]| {
        prom::value(&after, name, labels).unwrap_or(0.0) as u64
            - prom::value(&before, name, labels).unwrap_or(0.0) as u64
    };
    let mut per_vip: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
    for ((vip, backend), (packets, bytes)) in &want {
        let labels = [("vip", vip.as_str()), ("backend", backend.as_str())];
        assert_eq!(
            delta("lb_backend_packets_total", &labels),
            *packets,
            "{labels:?}"
        );
        assert_eq!(
            delta("lb_backend_bytes_total", &labels),
            *bytes,
            "{labels:?}"
        );
        let v = per_vip.entry(vip).or_default();
        v.0 += packets;
        v.1 += bytes;
    }
    assert_eq!(per_vip.len(), 2);
    for (vip, (packets, bytes)) in &per_vip {
        assert_eq!(
            delta("lb_vip_packets_total", &[("vip", vip)]),
            *packets,
            "{vip}"
        );
        assert_eq!(
            delta("lb_vip_bytes_total", &[("vip", vip)]),
            *bytes,
            "{vip}"
        );
    }
    let total: u64 = per_vip.values().map(|v| v.0).sum();
    assert_eq!(delta("lb_packets_total", &[("reason", "forwarded")]), total);
    assert_eq!(
        delta("lb_conntrack_events_total", &[("event", "miss")]),
        40,
        "one miss per flow"
    );
    assert_eq!(delta("lb_conntrack_events_total", &[("event", "hit")]), 80);
    assert!(prom::value(&after, "lb_exporter_read_seconds", &[]).unwrap() < 5.0);
    prom::check_metrics(&after).unwrap();
    assert!(
        !lab.lbd_log().contains(XDP_RECORD),
        "at the default level the XDP program logs nothing"
    );
}

/// What the XDP program logs for every packet at debug level.
const XDP_RECORD: &str = "(lb_common::Reason), verdict";

/// With `lb_xdp` at debug, the XDP program logs every packet (its reason
/// and verdict) through aya-log into lbd's log.
#[test]
fn xdp_debug_log_reports_every_packet_when_asked_for() {
    let lab = Lab::start(&LabSpec {
        log: "lb_xdp=debug,info",
        ..LabSpec::weights(&[1])
    })
    .unwrap();
    assert!(
        lab.lbd_log().contains("XDP debug log on"),
        "{}",
        lab.lbd_log()
    );
    let addr = lab.vip_echo(false);
    lab.in_client(move || echo_flow(addr, &[10, 20, 30]))
        .unwrap();
    // A forwarded packet: reason 0, verdict XDP_TX (3).
    let forwarded = format!("reason 0 {XDP_RECORD} 3");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while lab.lbd_log().matches(&forwarded).count() < 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "no XDP record of the 3 datagrams; log:\n{}",
            lab.lbd_log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Every state change is logged once at info with its cause: start-up,
/// a config reload (SIGHUP), an API request.
#[test]
fn state_changes_are_logged_once_with_their_cause() {
    let lab = Lab::start(&LabSpec::weights(&[1, 1])).unwrap();
    let b2 = lab.backends[1].v4.to_string();
    let lines = |needle: &str| -> Vec<String> {
        lab.lbd_log()
            .lines()
            .filter(|l| l.contains(needle))
            .map(str::to_string)
            .collect()
    };
    let started = lines("VIP added");
    assert_eq!(started.len(), 4, "{started:#?}");
    assert!(
        started
            .iter()
            .all(|l| l.contains("INFO") && l.contains("cause=\"startup\""))
    );
    let rebuilt_at_start = lines("Maglev table rebuilt").len();

    lab.set_backends(&[Some(1), Some(3)]).unwrap();
    let changed = lines("backend weight changed");
    assert_eq!(changed.len(), 4, "one per VIP: {changed:#?}");
    for l in &changed {
        assert!(
            l.contains("INFO")
                && l.contains("cause=\"signal:SIGHUP\"")
                && l.contains("from=1 to=3"),
            "{l}"
        );
    }
    assert_eq!(
        changed
            .iter()
            .filter(|l| l.contains(&format!("backend={b2}")))
            .count(),
        2,
        "the IPv4 backend's change, on both IPv4 VIPs"
    );
    let rebuilt = lines("Maglev table rebuilt");
    assert_eq!(rebuilt.len(), rebuilt_at_start + 4, "{rebuilt:#?}");
    assert!(
        rebuilt[rebuilt_at_start..]
            .iter()
            .all(|l| l.contains("cause=\"signal:SIGHUP\""))
    );

    let vip = format!("{VIP_V4}:{ECHO_PORT}/udp");
    let out = std::process::Command::new(binary_path("lbctl").unwrap())
        .arg("--socket")
        .arg(lab.api_socket())
        .args(["backend", "drain", &vip, &b2])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let drained = lines("backend drained");
    assert_eq!(drained.len(), 1, "{drained:#?}");
    assert!(
        drained[0].contains("cause=\"uid=0 pid=") && drained[0].contains(&format!("backend={b2}")),
        "{}",
        drained[0]
    );
    // A reload that changes nothing logs no state change.
    let before = lab.lbd_log().lines().count();
    let config = std::fs::read_to_string(lab.config_path()).unwrap();
    lab.reload().unwrap();
    assert_eq!(std::fs::read_to_string(lab.config_path()).unwrap(), config);
    let new: Vec<String> = lab
        .lbd_log()
        .lines()
        .skip(before)
        .map(str::to_string)
        .collect();
    assert!(
        new.iter()
            .all(|l| !l.contains("changed") && !l.contains("rebuilt") && !l.contains("drained")),
        "{new:#?}"
    );
}
