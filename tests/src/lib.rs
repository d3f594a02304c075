//! Test support for lb's integration tests and benchmarks: network
//! namespaces, frame builders, and a packet lab that runs the balancer
//! through `BPF_PROG_TEST_RUN` in a namespace of its own.
//!
//! Everything here needs root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN). A test
//! that lacks it fails with a message saying so; it never passes silently.

pub mod capture;
pub mod etcd;
pub mod fixture;
pub mod frames;
pub mod fuzz;
pub mod lab;
pub mod netns;
pub mod packet_lab;
pub mod prom;
pub mod solo;
pub mod tls;
pub mod wrk;
pub mod xdp;

/// Fails the calling test unless it runs as root.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "this test needs root (BPF programs, network namespaces); run `cargo xtask test` as root"
    );
}

/// Pins the calling thread to `cpu`, so `BPF_PROG_TEST_RUN` runs on that
/// CPU every time (for tests of per-CPU state).
pub fn pin_to_cpu(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; pid 0 = this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        let rc = libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
        assert_eq!(
            rc,
            0,
            "sched_setaffinity: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Raises this process's open-file limit to at least `n` (tests that hold
/// many connections open; tests of one process share the limit, so it is
/// never lowered).
pub fn raise_fd_limit(n: u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit fills a valid rlimit.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    if lim.rlim_cur >= n {
        return;
    }
    lim.rlim_cur = n;
    lim.rlim_max = lim.rlim_max.max(n);
    // SAFETY: a valid rlimit; as root the hard limit may be raised.
    let rc = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
    assert_eq!(rc, 0, "setrlimit: {}", std::io::Error::last_os_error());
}

/// A small deterministic generator (splitmix64), so every run of a test
/// sends the same "random" flows.
pub struct SplitMix(pub u64);

impl SplitMix {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub fn next_u32(&mut self) -> u32 {
        (self.next_u64() >> 32) as u32
    }

    pub fn next_u16(&mut self) -> u16 {
        (self.next_u64() >> 48) as u16
    }
}

/// Merges `results` into the flat JSON object of dotted keys at `path`
/// (`target/bench/results.json`), keeping what other runs wrote; values are
/// rounded to two decimals.
pub fn merge_results(
    path: &std::path::Path,
    results: &std::collections::BTreeMap<String, f64>,
) -> anyhow::Result<()> {
    use anyhow::Context;
    let mut all: serde_json::Map<String, serde_json::Value> = match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text)
            .with_context(|| format!("{} is not a JSON object", path.display()))?,
        Err(_) => serde_json::Map::new(),
    };
    for (k, v) in results {
        all.insert(k.clone(), serde_json::json!((v * 100.0).round() / 100.0));
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, serde_json::to_string_pretty(&all)? + "\n")?;
    println!("wrote {} figures to {}", results.len(), path.display());
    Ok(())
}
