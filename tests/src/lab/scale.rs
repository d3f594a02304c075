//! A large change in a running lab: N backends added in one API request
//! (a new VIP with HTTP health checks) while `/metrics` is scraped in a
//! loop. The test asserts that nothing failed; the benchmark reports the
//! slowest scrape during the change.
//!
//! The N backend addresses (10.210.0.0/22, up to 1,022) are all local on
//! backend b1 (`ip route add local ... dev lo`), which the balancer routes
//! them through: b1's HTTP service answers every health check, and the
//! balancer has one neighbour (b1) for all of them.

use std::{
    fmt,
    net::Ipv4Addr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Result, bail, ensure};
use lb::control::client::Endpoint;

use super::{Lab, fetch_metrics};

/// What happened during the change.
#[derive(Clone, Debug, Default)]
pub struct ChangeFigures {
    pub backends: usize,
    /// How long the API took to answer the change (it answers once the
    /// maps hold it).
    pub change_ms: f64,
    /// Scrapes that overlapped the change, and the slowest of them.
    pub scrapes_during_change: usize,
    pub slowest_scrape_during_change_ms: f64,
    /// The slowest scrape in the second before the change (the baseline).
    pub slowest_scrape_before_ms: f64,
    /// Scrapes that failed or timed out (5 s), over the whole run.
    pub scrape_failures: usize,
    /// Health checks run from the change until every new backend was
    /// checked once, by result.
    pub checks_ok: u64,
    pub checks_failed: u64,
    /// New backends up at the end.
    pub backends_up: usize,
}

impl fmt::Display for ChangeFigures {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} backends in one change: answered in {:.0} ms; {} scrapes during it, slowest {:.1} ms \
             (before it: {:.1} ms); {} scrapes failed; health checks {} ok, {} failed; {} backends up",
            self.backends,
            self.change_ms,
            self.scrapes_during_change,
            self.slowest_scrape_during_change_ms,
            self.slowest_scrape_before_ms,
            self.scrape_failures,
            self.checks_ok,
            self.checks_failed,
            self.backends_up
        )
    }
}

/// The new VIP the backends go to.
const VIP: &str = "203.0.113.20";

/// Adds `n` backends (a new VIP with HTTP health checks every 2 s) in one
/// API request while a thread scrapes `/metrics` back to back; waits until
/// every new backend has been checked once.
pub fn add_backends_while_scraping(lab: &Lab, n: usize) -> Result<ChangeFigures> {
    ensure!(n <= 1022, "10.210.0.0/22 holds 1,022 backends");
    let b1 = &lab.backends[0];
    b1.ns
        .ip(&["route", "add", "local", "10.210.0.0/22", "dev", "lo"])?;
    lab.balancer
        .ip(&["route", "add", "10.210.0.0/22", "via", &b1.v4.to_string()])?;
    let checks = |result: &str| lab.metric("lb_health_checks_total", &[("result", result)]);
    let (ok0, failed0) = (checks("ok")?, checks("failed")?);

    let stop = Arc::new(AtomicBool::new(false));
    let scraping = {
        let stop = stop.clone();
        let ns = lab.balancer.name().to_string();
        std::thread::spawn(move || -> Result<Vec<(Instant, Instant, bool)>> {
            let file = std::fs::File::open(format!("/run/netns/{ns}"))?;
            // SAFETY: setns on this thread with a namespace fd we own.
            if unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) }
                != 0
            {
                bail!("setns: {}", std::io::Error::last_os_error());
            }
            let mut scrapes = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                let ok = fetch_metrics().is_ok();
                scrapes.push((t, Instant::now(), ok));
            }
            Ok(scrapes)
        })
    };
    std::thread::sleep(Duration::from_secs(1));

    let backends: Vec<String> = (0..n)
        .map(|i| {
            let a = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 210, 0, 1)) + i as u32);
            format!("{{\"address\": \"{a}\", \"weight\": 1}}")
        })
        .collect();
    let body = format!(
        "{{\"address\": \"{VIP}\", \"port\": 80, \"protocol\": \"tcp\", \"backends\": [{}], \
         \"health\": {{\"check\": \"http\", \"path\": \"/health\", \"interval\": 2, \"timeout\": 1, \"rise\": 1, \"fall\": 1}}}}",
        backends.join(", ")
    );
    let api = Endpoint::Unix(lab.api_socket());
    let started = Instant::now();
    let answer = api.request("POST", "/v1/vips", Some(body.as_bytes()))?;
    let answered = Instant::now();
    ensure!(
        answer.status < 300,
        "adding the VIP: {} {}",
        answer.status,
        answer.error_message()
    );

    // Every new backend checked once (the checks start spread over 2 s).
    let deadline = Instant::now() + Duration::from_secs(30);
    while checks("ok")? + checks("failed")? < ok0 + failed0 + n as u64 {
        if Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let checks_done = Instant::now();
    stop.store(true, Ordering::Relaxed);
    let scrapes = scraping
        .join()
        .map_err(|_| anyhow::anyhow!("the scraping thread panicked"))??;

    let text = lab.metrics()?;
    let vip = format!("{VIP}:80/tcp");
    let backends_up = crate::prom::samples(&text)
        .iter()
        .filter(|s| {
            s.name == "lb_backend_up" && s.labels.get("vip") == Some(&vip) && s.value == 1.0
        })
        .count();
    let ms = |(a, b): (Instant, Instant)| b.duration_since(a).as_secs_f64() * 1000.0;
    let during: Vec<f64> = scrapes
        .iter()
        .filter(|(s, e, _)| *e >= started && *s <= checks_done)
        .map(|(s, e, _)| ms((*s, *e)))
        .collect();
    let before = scrapes
        .iter()
        .filter(|(_, e, _)| *e < started)
        .map(|(s, e, _)| ms((*s, *e)))
        .fold(0.0, f64::max);
    Ok(ChangeFigures {
        backends: n,
        change_ms: ms((started, answered)),
        scrapes_during_change: during.len(),
        slowest_scrape_during_change_ms: during.iter().copied().fold(0.0, f64::max),
        slowest_scrape_before_ms: before,
        scrape_failures: scrapes.iter().filter(|(_, _, ok)| !ok).count(),
        checks_ok: checks("ok")? - ok0,
        checks_failed: checks("failed")? - failed0,
        backends_up,
    })
}
