//! Traffic that keeps flowing while a test changes something: long-lived
//! HTTP connections that each send a request at a fixed interval, and a
//! steady rate of new connections, from the client's namespace. Every
//! request is accounted for: answered, failed (with resets apart), or
//! answered by another backend than the connection's first answer; and the
//! longest gap between two answers on any long-lived connection.

use std::{
    collections::BTreeMap,
    io::ErrorKind,
    net::SocketAddr,
    sync::{
        Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use super::client::{HttpConn, http_get};
use crate::netns;

/// What to send.
#[derive(Clone, Debug)]
pub struct TrafficSpec {
    /// The VIP service(s); long-lived connection `i` goes to
    /// `targets[i % len]`, new connections alternate.
    pub targets: Vec<SocketAddr>,
    /// Long-lived connections, opened before the change.
    pub long_lived: usize,
    /// Each sends one request per interval.
    pub interval: Duration,
    /// New connections per second (one request each), 0 for none.
    pub new_per_second: u32,
}

impl TrafficSpec {
    /// The standard load: 200 long-lived connections sending every
    /// 100 ms and 50 new connections per second.
    pub fn standard(target: SocketAddr) -> TrafficSpec {
        TrafficSpec {
            targets: vec![target],
            long_lived: 200,
            interval: Duration::from_millis(100),
            new_per_second: 50,
        }
    }
}

/// One long-lived connection's story.
#[derive(Clone, Debug, Default)]
pub struct ConnReport {
    /// The backend of its first answer.
    pub backend: String,
    pub answered: u64,
    /// It broke: the error, and whether it was a reset.
    pub broken: Option<String>,
    pub reset: bool,
    /// Answers by another backend than the first.
    pub moved: u64,
    /// Longest time between two answers (or from the last answer to the
    /// end, if it broke).
    pub longest_gap: Duration,
    /// The client's address and the service's: the connection's 5-tuple
    /// (TCP), if it opened.
    pub local: Option<SocketAddr>,
    pub target: Option<SocketAddr>,
}

/// What the traffic saw.
#[derive(Clone, Debug, Default)]
pub struct TrafficReport {
    pub conns: Vec<ConnReport>,
    pub new_ok: u64,
    pub new_failed: u64,
    pub new_reset: u64,
    /// New connections by the backend that answered.
    pub new_per_backend: BTreeMap<String, u64>,
    pub duration: Duration,
}

impl TrafficReport {
    /// Requests answered on long-lived connections.
    pub fn answered(&self) -> u64 {
        self.conns.iter().map(|c| c.answered).sum()
    }
    /// Long-lived connections that broke (resets included).
    pub fn broken(&self) -> usize {
        self.conns.iter().filter(|c| c.broken.is_some()).count()
    }
    /// Long-lived connections reset.
    pub fn resets(&self) -> usize {
        self.conns.iter().filter(|c| c.reset).count()
    }
    /// Answers from another backend than the connection's first.
    pub fn moved(&self) -> u64 {
        self.conns.iter().map(|c| c.moved).sum()
    }
    /// Longest gap on any long-lived connection.
    pub fn longest_gap(&self) -> Duration {
        self.conns
            .iter()
            .map(|c| c.longest_gap)
            .max()
            .unwrap_or_default()
    }
    /// Long-lived connections per backend (of their first answer).
    pub fn per_backend(&self) -> BTreeMap<String, usize> {
        let mut m = BTreeMap::new();
        for c in &self.conns {
            *m.entry(c.backend.clone()).or_default() += 1;
        }
        m
    }
    /// Everything that went wrong, as a line per problem (empty: none).
    pub fn failures(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .conns
            .iter()
            .enumerate()
            .filter_map(|(i, c)| {
                c.broken
                    .as_ref()
                    .map(|e| format!("connection {i} on {} broke: {e}", c.backend))
            })
            .collect();
        if self.new_failed > 0 {
            out.push(format!(
                "{} new connections failed ({} reset)",
                self.new_failed, self.new_reset
            ));
        }
        out
    }
    /// The figures on one line, for the test's output.
    pub fn summary(&self) -> String {
        format!(
            "{} long-lived connections ({:?}): {} requests answered, {} broken ({} reset), {} answers moved, longest gap {:.0} ms; new connections: {} ok, {} failed ({} reset); over {:.1} s",
            self.conns.len(),
            self.per_backend(),
            self.answered(),
            self.broken(),
            self.resets(),
            self.moved(),
            self.longest_gap().as_secs_f64() * 1000.0,
            self.new_ok,
            self.new_failed,
            self.new_reset,
            self.duration.as_secs_f64()
        )
    }
}

fn is_reset(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>().is_some_and(|io| {
            matches!(
                io.kind(),
                ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted
            )
        })
    })
}

/// Long-lived connections per thread.
const PER_THREAD: usize = 50;

/// Opens the long-lived connections from the network namespace `client`,
/// starts the traffic, runs `during` (the change under test) after
/// `settle`, keeps the traffic going for `settle` after it, and returns
/// what `during` returned and the report.
pub fn run<T: Send>(
    client: &str,
    spec: &TrafficSpec,
    settle: Duration,
    during: impl FnOnce() -> T + Send,
) -> (T, TrafficReport) {
    let stop = AtomicBool::new(false);
    let started = Instant::now();
    let (new_ok, new_failed, new_reset) = (AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0));
    let new_per_backend: Mutex<BTreeMap<String, u64>> = Mutex::new(BTreeMap::new());
    let opened = AtomicU64::new(0);
    let (value, conns) = thread::scope(|s| {
        let mut workers = Vec::new();
        for first in (0..spec.long_lived).step_by(PER_THREAD) {
            let n = PER_THREAD.min(spec.long_lived - first);
            let (stop, opened) = (&stop, &opened);
            workers.push(s.spawn(move || {
                let _inside = netns::enter(client).expect("entering the client namespace");
                long_lived(spec, first, n, opened, stop)
            }));
        }
        if spec.new_per_second > 0 {
            let (stop, ok, failed, reset, per) =
                (&stop, &new_ok, &new_failed, &new_reset, &new_per_backend);
            s.spawn(move || {
                let _inside = netns::enter(client).expect("entering the client namespace");
                let period = Duration::from_secs(1) / spec.new_per_second;
                let mut next = Instant::now();
                let mut i = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    let target = spec.targets[i % spec.targets.len()];
                    i += 1;
                    match http_get(target) {
                        Ok(b) => {
                            ok.fetch_add(1, Ordering::Relaxed);
                            *per.lock().unwrap().entry(b).or_default() += 1;
                        }
                        Err(e) => {
                            failed.fetch_add(1, Ordering::Relaxed);
                            if is_reset(&e) {
                                reset.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                    next += period;
                    if let Some(wait) = next.checked_duration_since(Instant::now()) {
                        thread::sleep(wait);
                    }
                }
            });
        }
        // Every long-lived connection open and answered once first.
        let deadline = Instant::now() + Duration::from_secs(30);
        while opened.load(Ordering::Relaxed) < spec.long_lived as u64 && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
        thread::sleep(settle);
        // The traffic stops however `during` ends: a panic in it would
        // otherwise leave the scope waiting for the clients forever.
        struct StopOnDrop<'a>(&'a AtomicBool);
        impl Drop for StopOnDrop<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Relaxed);
            }
        }
        let guard = StopOnDrop(&stop);
        let value = during();
        thread::sleep(settle);
        drop(guard);
        let conns: Vec<ConnReport> = workers
            .into_iter()
            .flat_map(|w| w.join().expect("a traffic thread panicked"))
            .collect();
        (value, conns)
    });
    let report = TrafficReport {
        conns,
        new_ok: new_ok.into_inner(),
        new_failed: new_failed.into_inner(),
        new_reset: new_reset.into_inner(),
        new_per_backend: new_per_backend.into_inner().unwrap(),
        duration: started.elapsed(),
    };
    (value, report)
}

/// Connections `first..first + n`: opens them, then sends on each once per
/// interval until `stop`.
fn long_lived(
    spec: &TrafficSpec,
    first: usize,
    n: usize,
    opened: &AtomicU64,
    stop: &AtomicBool,
) -> Vec<ConnReport> {
    let mut conns: Vec<(Option<HttpConn>, ConnReport, Instant)> = Vec::with_capacity(n);
    for i in first..first + n {
        let target = spec.targets[i % spec.targets.len()];
        let mut report = ConnReport {
            target: Some(target),
            ..ConnReport::default()
        };
        let conn = HttpConn::connect(target).and_then(|mut c| {
            report.local = c.local_addr().ok();
            let (b, _) = c.get("/")?;
            report.backend = b;
            report.answered = 1;
            Ok(c)
        });
        let conn = match conn {
            Ok(c) => Some(c),
            Err(e) => {
                report.reset = is_reset(&e);
                report.broken = Some(format!("opening: {e:#}"));
                None
            }
        };
        conns.push((conn, report, Instant::now()));
        opened.fetch_add(1, Ordering::Relaxed);
    }
    let mut next = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        for (conn, report, last) in conns.iter_mut() {
            let Some(c) = conn else { continue };
            match c.get("/") {
                Ok((b, _)) => {
                    let now = Instant::now();
                    report.longest_gap = report.longest_gap.max(now - *last);
                    *last = now;
                    report.answered += 1;
                    if b != report.backend {
                        report.moved += 1;
                    }
                }
                Err(e) => {
                    report.reset = is_reset(&e);
                    report.broken = Some(format!("{e:#}"));
                    *conn = None;
                }
            }
        }
        next += spec.interval;
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            thread::sleep(wait);
        }
    }
    let end = Instant::now();
    for (conn, report, last) in conns.iter_mut() {
        if conn.is_none() {
            report.longest_gap = report.longest_gap.max(end - *last);
        }
    }
    conns.into_iter().map(|(_, r, _)| r).collect()
}
