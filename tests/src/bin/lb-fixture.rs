//! Makes a fixture of the pinned state of this build's layout, for the
//! upgrade tests of later builds (see tests/fixtures/README.md):
//!
//! ```sh
//! cargo run -p lb-tests --bin lb-fixture -- tests/fixtures/layout-N
//! ```
//!
//! It loads the balancer pinned (in a network namespace shaped like the
//! lab's balancer), programs the lab's config with backends b1..b3, sends
//! 10,000 flows through it with `BPF_PROG_TEST_RUN` (TCP: a SYN and a
//! packet after it; UDP: two datagrams), so they sit in the connection
//! table, then programs the config with b4 added (the tables move: Maglev
//! alone would send about a fifth of the flows elsewhere) and writes:
//!
//! - `maps.json`: every pinned map ([`lb::dataplane::image::StateImage`]),
//!   with the kernel's jiffies and CPU count when it was read;
//! - `flows.json`: the backend each flow (`lb_tests::fixture::flow`) went to;
//! - `config.toml`: the config the state holds (with b4);
//! - `lb-xdp.o`: this build's balancer object (debug info stripped), so a
//!   test can run the old program on the restored maps.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};
use lb::{
    dataplane::{BALANCER_OBJECT, Dataplane, image::StateImage, pinning},
    desired::{config, vip::Protocol},
};
use lb_common::{LAYOUT_VERSION, map_name};
use lb_tests::{
    fixture::{self, Fixture},
    frames::{self, FrameSpec, parse_encapsulated},
    netns::Netns,
    xdp::run_xdp,
};

fn main() -> Result<()> {
    let dir = PathBuf::from(
        std::env::args()
            .nth(1)
            .context("usage: lb-fixture OUTPUT_DIR")?,
    );
    std::fs::create_dir_all(&dir)?;
    let ns = Netns::new("fixture")?;
    fixture::balancer_host(&ns)?;
    let ifindex = ns.ifindex("lb0")?;
    let if_mac = ns.mac("lb0")?;
    let _inside = ns.enter()?;
    let pin = pinning::instance_dir(&format!("lbt-fixture-{}", std::process::id()));
    let result = make(&dir, &pin, ifindex, if_mac);
    let _ = pinning::cleanup(&pin);
    result
}

fn make(dir: &Path, pin: &Path, ifindex: u32, if_mac: [u8; 6]) -> Result<()> {
    let initial = config::parse(&fixture::config(3), "initial config")?;
    let last_text = fixture::config(4);
    let last = config::parse(&last_text, "final config")?;
    lb::dataplane::enable_forwarding("lb0", &initial.balancer)?;
    let mut dp = Dataplane::load_pinned(&initial.balancer, pin)?;
    // As attaching would (layouts 9 and later check the destination MAC).
    dp.set_local_mac(if_mac)?;
    dp.sync(&initial.vips)?;
    let mut flows = Vec::new();
    for i in 0..fixture::FLOWS {
        let flow = fixture::flow(i);
        let spec = FrameSpec {
            dst_mac: if_mac,
            ..FrameSpec::default()
        };
        let mut first = frames::build(&flow, &spec);
        if flow.protocol == Protocol::Tcp {
            // Only SYN: the handshake table, then the connection table.
            let l4 = frames::l2_len(&first) + if flow.src.is_ipv4() { 20 } else { 40 };
            first[l4 + 13] = 0x02;
        }
        for frame in [first, frames::build(&flow, &spec)] {
            let r = run_xdp(dp.balancer()?, &frame, ifindex, 1)?;
            if r.action != 3 {
                bail!(
                    "flow {i} ({flow:?}): verdict {} instead of XDP_TX",
                    r.action
                );
            }
            let backend = parse_encapsulated(&r.frame)?.outer.dst();
            if flows.len() == i {
                flows.push(backend);
            } else if flows[i] != backend {
                bail!("flow {i} changed backend within its handshake");
            }
        }
    }
    let per: BTreeMap<IpAddr, usize> = flows.iter().fold(BTreeMap::new(), |mut m, b| {
        *m.entry(*b).or_default() += 1;
        m
    });
    println!("{} flows: {per:?}", flows.len());
    dp.sync(&last.vips)?;
    let image = StateImage::read(pin, &map_name::STATE)?;
    let fixture = Fixture {
        layout: LAYOUT_VERSION,
        jiffies: fixture::jiffies()?,
        nr_cpus: aya::util::nr_cpus().map_err(|(_, e)| e)?,
        image,
    };
    std::fs::write(
        dir.join("maps.json"),
        serde_json::to_string(&fixture)? + "\n",
    )?;
    std::fs::write(
        dir.join("flows.json"),
        serde_json::to_string(&flows)? + "\n",
    )?;
    std::fs::write(dir.join("config.toml"), last_text)?;
    let object = dir.join("lb-xdp.o");
    std::fs::write(&object, BALANCER_OBJECT)?;
    let strip = std::process::Command::new("/usr/lib/llvm-22/bin/llvm-strip")
        .arg("--strip-debug")
        .arg(&object)
        .status()
        .context("running llvm-strip (Debian llvm-22)")?;
    if !strip.success() {
        bail!("llvm-strip failed: {strip}");
    }
    println!(
        "wrote the layout-{LAYOUT_VERSION} fixture to {} ({} maps)",
        dir.display(),
        fixture.image.maps.len()
    );
    Ok(())
}
