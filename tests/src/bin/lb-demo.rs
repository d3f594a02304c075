//! `cargo xtask run` (no arguments): the balancer in a lab of network
//! namespaces with three backends (one with twice the weight), real HTTP
//! clients sending through the VIP, and a live view of who answers and
//! what the data plane counts. Ctrl-C stops it and tears the lab down.

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::Result;
use lb_common::Reason;
use lb_tests::lab::{Lab, LabSpec, VIP_V4, VIP_V6, client::http_get, servers};

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

/// Requests per (backend) answered, and failures.
#[derive(Default)]
struct Tally {
    answers: BTreeMap<String, u64>,
    failures: u64,
}

const WEIGHTS: [u32; 3] = [1, 1, 2];
/// Pause between requests of one client thread (two threads: IPv4, IPv6).
const PACE: Duration = Duration::from_millis(10);

fn main() -> Result<()> {
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    println!(
        "building the lab: client, balancer (lbd, native XDP), 3 backends (lbd decap, HTTP)..."
    );
    let lab = Lab::start(&LabSpec::weights(&WEIGHTS))?;
    let tally = Arc::new(Mutex::new(Tally::default()));

    thread::scope(|s| -> Result<()> {
        for v6 in [false, true] {
            let (lab, tally) = (&lab, tally.clone());
            s.spawn(move || {
                let addr = lab.vip_http(v6);
                let _ = lab.in_client(|| {
                    while !STOP.load(Ordering::Relaxed) {
                        let r = http_get(addr);
                        let mut t = tally.lock().expect("tally");
                        match r {
                            Ok(name) => *t.answers.entry(name).or_default() += 1,
                            Err(_) => t.failures += 1,
                        }
                        drop(t);
                        thread::sleep(PACE);
                    }
                });
            });
        }
        live_view(&lab, &tally);
        Ok(())
    })?;
    println!("\nstopping: tearing the lab down...");
    drop(lab);
    println!("done");
    Ok(())
}

fn live_view(lab: &Lab, tally: &Mutex<Tally>) {
    let started = Instant::now();
    let mut last_answers: BTreeMap<String, u64> = BTreeMap::new();
    let mut last_forwarded = 0u64;
    let mut tick = Instant::now();
    while !STOP.load(Ordering::Relaxed) {
        thread::sleep(Duration::from_millis(100));
        if tick.elapsed() < Duration::from_secs(1) {
            continue;
        }
        let secs = tick.elapsed().as_secs_f64();
        tick = Instant::now();
        let (answers, failures) = {
            let t = tally.lock().expect("tally");
            (t.answers.clone(), t.failures)
        };
        let metrics = lab
            .metrics()
            .unwrap_or_else(|e| format!("# metrics unavailable: {e}\n"));
        let total: u64 = answers.values().sum();
        let mut out = String::from("\x1b[2J\x1b[H");
        out += &format!(
            "lb demo: HTTP through VIPs {VIP_V4}:{0} and [{VIP_V6}]:{0}, up {1:.0} s. Ctrl-C stops and tears the lab down.\n\n",
            servers::HTTP_PORT,
            started.elapsed().as_secs_f64()
        );
        out += "backend  weight   req/s     total   share   packets from lbd\n";
        for b in &lab.backends {
            let n = answers.get(&b.name).copied().unwrap_or(0);
            let rate = (n - last_answers.get(&b.name).copied().unwrap_or(0)) as f64 / secs;
            let share = if total == 0 {
                0.0
            } else {
                100.0 * n as f64 / total as f64
            };
            let packets: u64 = [
                (b.v4.to_string(), VIP_V4.to_string()),
                (b.v6.to_string(), format!("[{VIP_V6}]")),
            ]
            .iter()
            .map(|(addr, vip)| {
                metric(
                    &metrics,
                    "lb_backend_packets_total",
                    &[("backend", addr), ("vip", &format!("{vip}:80/tcp"))],
                )
            })
            .sum();
            out += &format!(
                "{:<8} {:>6} {:>7.0} {:>9} {:>6.1}%   {packets}\n",
                b.name, b.weight, rate, n, share
            );
        }
        out += &format!(
            "failed requests: {failures}\n\ndata plane (lbd /metrics, packets by reason):\n"
        );
        let forwarded = metric(&metrics, "lb_packets_total", &[("reason", "forwarded")]);
        for r in Reason::ALL {
            let v = metric(&metrics, "lb_packets_total", &[("reason", r.name())]);
            let extra = if r == Reason::Forwarded {
                format!(
                    "   ({:.0}/s)",
                    (forwarded - last_forwarded.min(forwarded)) as f64 / secs
                )
            } else {
                String::new()
            };
            out += &format!("  {:<16} {v:>10}{extra}\n", r.name());
        }
        out += "\nReplies go from the backends straight to the client: lbd only sees client packets.\n";
        print!("{out}");
        last_answers = answers;
        last_forwarded = forwarded;
    }
}

/// The value of `name` with exactly `labels` in the scrape `text`, 0 if absent.
fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> u64 {
    lb_tests::prom::value(text, name, labels).unwrap_or(0.0) as u64
}
