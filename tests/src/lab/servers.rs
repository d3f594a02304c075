//! The services a lab backend runs: HTTP/1.1 that answers with the backend's
//! name (or N bytes for `/bytes/N`), and a UDP echo that prefixes its name.
//! Threads inside the backend's namespace (HTTP connections are served by
//! a pool of reused worker threads); they stop when the lab drops.
//!
//! What health checks and load scrapes see is up to the test ([`Control`]):
//! `/health` answers 200, 503, or each in turn; `/metrics` answers a text
//! the test sets, a vLLM page whose token counters advance with every
//! scrape (or stay frozen in "stuck" mode: an engine that hangs with work
//! queued), or an error status; and the HTTP service can be stopped (its
//! port closed) and started again.

use std::{
    io::{BufRead, BufReader, Write},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::{self, JoinHandle},
    time::Duration,
};

use anyhow::{Context, Result};

use crate::netns::Netns;

/// TCP port of the lab's HTTP service.
pub const HTTP_PORT: u16 = 80;
/// UDP port of the lab's echo service.
pub const ECHO_PORT: u16 = 9000;

/// Largest body `/bytes/N` serves.
const MAX_BODY: usize = 1 << 30;

/// What `/health` answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HealthMode {
    /// 200.
    Up,
    /// 503.
    Down,
    /// 200 and 503 in turn, request by request (per client address).
    Flapping,
}

/// What a backend's HTTP service does, set by the test.
pub struct Control {
    /// The HTTP port is open (connections are accepted).
    http_up: AtomicBool,
    /// The mode, and for `Flapping` what each client saw last.
    health: Mutex<(HealthMode, std::collections::HashMap<IpAddr, bool>)>,
    /// `/metrics`: `Ok(text)` answers 200 with it, `Err(status)` that status.
    metrics: Mutex<Result<String, u16>>,
    /// `/metrics` as a vLLM server: (waiting, running, KV-cache use); its
    /// token counters are `tokens`. Overrides `metrics` while set.
    vllm: Mutex<Option<(f64, f64, f64)>>,
    /// The vLLM page's prompt and generation tokens so far: advanced by
    /// every `/metrics` request, unless `stuck`.
    tokens: AtomicU64,
    stuck: AtomicBool,
}

/// Tokens a vLLM page's counters advance by per scrape.
const TOKENS_PER_SCRAPE: u64 = 128;

impl Control {
    fn new() -> Control {
        Control {
            http_up: AtomicBool::new(true),
            health: Mutex::new((HealthMode::Up, Default::default())),
            metrics: Mutex::new(Err(404)),
            vllm: Mutex::new(None),
            tokens: AtomicU64::new(1000),
            stuck: AtomicBool::new(false),
        }
    }

    /// Opens or closes the HTTP port (closed: connections are refused).
    pub fn set_http_up(&self, up: bool) {
        self.http_up.store(up, Ordering::SeqCst);
    }

    pub fn set_health(&self, mode: HealthMode) {
        *self.health.lock().unwrap() = (mode, Default::default());
    }

    /// `/metrics` answers `text`.
    pub fn set_metrics(&self, text: &str) {
        *self.vllm.lock().unwrap() = None;
        *self.metrics.lock().unwrap() = Ok(text.to_string());
    }

    /// `/metrics` answers `status` without a body.
    pub fn set_metrics_status(&self, status: u16) {
        *self.vllm.lock().unwrap() = None;
        *self.metrics.lock().unwrap() = Err(status);
    }

    /// `/metrics` answers as a vLLM server with `waiting` requests queued
    /// (split over two engines), 8 running and KV-cache use `kv`; its token
    /// counters advance with every scrape unless [`Control::set_stuck`].
    pub fn set_vllm(&self, waiting: f64, kv: f64) {
        self.set_vllm_running(waiting, 8.0, kv);
    }

    /// [`Control::set_vllm`] with `running` requests running.
    pub fn set_vllm_running(&self, waiting: f64, running: f64, kv: f64) {
        *self.vllm.lock().unwrap() = Some((waiting, running, kv));
    }

    /// "Stuck" mode: the vLLM page's token counters stop (an engine that
    /// hangs with `/health` still fine); `false`: they advance again.
    pub fn set_stuck(&self, stuck: bool) {
        self.stuck.store(stuck, Ordering::SeqCst);
    }

    /// What `/metrics` answers now.
    fn metrics_answer(&self) -> (u16, Vec<u8>) {
        if let Some((waiting, running, kv)) = *self.vllm.lock().unwrap() {
            let tokens = if self.stuck.load(Ordering::SeqCst) {
                self.tokens.load(Ordering::SeqCst)
            } else {
                self.tokens.fetch_add(TOKENS_PER_SCRAPE, Ordering::SeqCst) + TOKENS_PER_SCRAPE
            };
            return (
                200,
                vllm_page(waiting, running, kv, tokens as f64).into_bytes(),
            );
        }
        match &*self.metrics.lock().unwrap() {
            Ok(text) => (200, text.clone().into_bytes()),
            Err(status) => (*status, Vec::new()),
        }
    }

    /// The status of `/health` for a request from `client`.
    fn health_status(&self, client: IpAddr) -> u16 {
        let mut h = self.health.lock().unwrap();
        match h.0 {
            HealthMode::Up => 200,
            HealthMode::Down => 503,
            HealthMode::Flapping => {
                let failed = h.1.entry(client).or_insert(false);
                *failed = !*failed;
                if *failed { 503 } else { 200 }
            }
        }
    }
}

/// A vLLM `/metrics` page (v0.10-style names, two engines), its token
/// counters at a fixed count.
pub fn vllm_metrics(waiting: f64, kv: f64) -> String {
    vllm_page(waiting, 8.0, kv, 123456.0)
}

/// A vLLM `/metrics` page: `waiting` and `running` requests (each split
/// over two engines), KV-cache use `kv`, `tokens` prompt and generation
/// tokens so far.
pub fn vllm_page(waiting: f64, running: f64, kv: f64, tokens: f64) -> String {
    let (half, run) = (waiting / 2.0, running / 2.0);
    let model = "model_name=\"meta-llama/Llama-3.1-8B-Instruct\"";
    let (prompt, generated) = ((tokens / 4.0).floor(), tokens - (tokens / 4.0).floor());
    format!(
        "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.\n\
         # TYPE vllm:num_requests_waiting gauge\n\
         vllm:num_requests_waiting{{engine=\"0\",{model}}} {half}\n\
         vllm:num_requests_waiting{{engine=\"1\",{model}}} {half}\n\
         # HELP vllm:num_requests_running Number of requests in model execution batches.\n\
         # TYPE vllm:num_requests_running gauge\n\
         vllm:num_requests_running{{engine=\"0\",{model}}} {run}\n\
         vllm:num_requests_running{{engine=\"1\",{model}}} {run}\n\
         # HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.\n\
         # TYPE vllm:kv_cache_usage_perc gauge\n\
         vllm:kv_cache_usage_perc{{engine=\"0\",{model}}} {kv}\n\
         vllm:kv_cache_usage_perc{{engine=\"1\",{model}}} {kv}\n\
         # HELP vllm:prompt_tokens_total Number of prefill tokens processed.\n\
         # TYPE vllm:prompt_tokens_total counter\n\
         vllm:prompt_tokens_total{{engine=\"0\",{model}}} {prompt}\n\
         # HELP vllm:generation_tokens_total Number of generation tokens processed.\n\
         # TYPE vllm:generation_tokens_total counter\n\
         vllm:generation_tokens_total{{engine=\"0\",{model}}} {generated}\n"
    )
}

/// Running services of one backend.
pub struct Services {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    pub control: Arc<Control>,
}

impl Drop for Services {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Starts HTTP (dual-stack, any address) and UDP echo (on each of `vips`)
/// in `ns`, answering as `name`.
///
/// The echo binds the VIPs themselves: a UDP reply takes the socket's
/// address as its source, and the client expects it from the VIP (direct
/// server return: the backend answers in the VIP's name).
pub fn start(ns: &Netns, name: &str, vips: &[IpAddr]) -> Result<Services> {
    let stop = Arc::new(AtomicBool::new(false));
    let control = Arc::new(Control::new());
    let (tcp, udps) = {
        let _inside = ns.enter()?;
        let tcp = http_listener()?;
        let mut udps = Vec::new();
        for vip in vips {
            let udp = UdpSocket::bind(SocketAddr::from((*vip, ECHO_PORT)))
                .with_context(|| format!("binding the echo port on {vip}"))?;
            udp.set_read_timeout(Some(Duration::from_millis(50)))?;
            udps.push(udp);
        }
        (tcp, udps)
    };
    // The HTTP thread binds again after a stop: it lives in the namespace.
    let netns = std::fs::File::open(format!("/run/netns/{}", ns.name()))?;
    let mut threads = Vec::new();
    let (n, s, c) = (name.to_string(), stop.clone(), control.clone());
    threads.push(thread::spawn(move || {
        // SAFETY: setns on this thread with a namespace fd we own.
        if unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&netns), libc::CLONE_NEWNET) } != 0
        {
            return;
        }
        http_accept(tcp, &n, &s, &c)
    }));
    for udp in udps {
        let (n, s) = (name.to_string(), stop.clone());
        threads.push(thread::spawn(move || echo(udp, &n, &s)));
    }
    Ok(Services {
        stop,
        threads,
        control,
    })
}

fn http_listener() -> Result<TcpListener> {
    let any: SocketAddr = (std::net::Ipv6Addr::UNSPECIFIED, HTTP_PORT).into();
    let tcp = TcpListener::bind(any).context("binding the HTTP port")?;
    tcp.set_nonblocking(true)?;
    Ok(tcp)
}

/// Accepted connections waiting for a worker thread, and the number of
/// workers waiting for a connection. Workers are kept and reused: a new
/// connection costs no thread start and exit (a clone, a stack mapped and
/// unmapped, TLB shootdowns on every core), which in the benchmarks cost
/// more than some of the balancers being compared.
#[derive(Default)]
struct Pool {
    queue: Mutex<(std::collections::VecDeque<TcpStream>, usize)>,
    ready: std::sync::Condvar,
}

impl Pool {
    /// Hands `conn` to an idle worker, or to a new one if none is idle.
    fn dispatch(
        self: &Arc<Pool>,
        conn: TcpStream,
        name: &str,
        stop: &Arc<AtomicBool>,
        control: &Arc<Control>,
    ) {
        let mut q = self.queue.lock().unwrap();
        q.0.push_back(conn);
        if q.1 >= q.0.len() {
            self.ready.notify_one();
            return;
        }
        drop(q);
        let (pool, n, s, c) = (
            self.clone(),
            name.to_string(),
            stop.clone(),
            control.clone(),
        );
        thread::spawn(move || pool.work(&n, &s, &c));
    }

    /// A worker: serves connections one after the other until the lab stops.
    fn work(&self, name: &str, stop: &AtomicBool, control: &Control) {
        loop {
            let conn = {
                let mut q = self.queue.lock().unwrap();
                loop {
                    if let Some(conn) = q.0.pop_front() {
                        break conn;
                    }
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    q.1 += 1;
                    q = self
                        .ready
                        .wait_timeout(q, Duration::from_millis(200))
                        .unwrap()
                        .0;
                    q.1 -= 1;
                }
            };
            let _ = http_serve(conn, name, stop, control);
        }
    }
}

fn http_accept(listener: TcpListener, name: &str, stop: &Arc<AtomicBool>, control: &Arc<Control>) {
    let pool = Arc::new(Pool::default());
    let mut listener = Some(listener);
    while !stop.load(Ordering::Relaxed) {
        let up = control.http_up.load(Ordering::SeqCst);
        if !up {
            // Closed: connections are refused.
            listener = None;
            thread::sleep(Duration::from_millis(5));
            continue;
        }
        if listener.is_none() {
            listener = http_listener().ok();
        }
        let Some(l) = &listener else {
            thread::sleep(Duration::from_millis(5));
            continue;
        };
        match l.accept() {
            Ok((conn, _)) => pool.dispatch(conn, name, stop, control),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => wait_readable(l, 5),
            Err(_) => thread::sleep(Duration::from_millis(5)),
        }
    }
}

/// Waits up to `ms` for a connection to accept. Sleeping instead would add
/// up to that much latency to every new connection (and cap the rate at
/// which they are accepted), which the benchmarks would measure.
fn wait_readable(listener: &TcpListener, ms: i32) {
    use std::os::fd::AsRawFd;
    let mut fd = libc::pollfd {
        fd: listener.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    unsafe { libc::poll(&mut fd, 1, ms) };
}

/// Serves requests on one connection until the client closes it, asks to
/// close, or the lab stops.
fn http_serve(
    conn: TcpStream,
    name: &str,
    stop: &AtomicBool,
    control: &Control,
) -> std::io::Result<()> {
    let peer = conn.peer_addr()?.ip().to_canonical();
    conn.set_nonblocking(false)?;
    conn.set_read_timeout(Some(Duration::from_millis(200)))?;
    conn.set_nodelay(true)?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut writer = conn;
    let mut line = String::new();
    loop {
        // Request line (or the end of the connection).
        line.clear();
        loop {
            match reader.read_line(&mut line) {
                Ok(0) => return Ok(()),
                Ok(_) => break,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    if stop.load(Ordering::Relaxed) {
                        return Ok(());
                    }
                }
                Err(e) => return Err(e),
            }
        }
        let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
        let mut close = false;
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header)? == 0 {
                return Ok(());
            }
            let h = header.trim_end();
            if h.is_empty() {
                break;
            }
            if h.to_ascii_lowercase().starts_with("connection:")
                && h.to_ascii_lowercase().contains("close")
            {
                close = true;
            }
        }
        let (status, body) = match path.as_str() {
            "/health" => (
                control.health_status(peer),
                format!("{name}\n").into_bytes(),
            ),
            "/metrics" => control.metrics_answer(),
            _ => match path
                .strip_prefix("/bytes/")
                .and_then(|n| n.parse::<usize>().ok())
            {
                Some(n) => (200, vec![b'x'; n.min(MAX_BODY)]),
                None => (200, format!("{name}\n").into_bytes()),
            },
        };
        write!(
            writer,
            "HTTP/1.1 {status} {}\r\nContent-Length: {}\r\nX-Backend: {name}\r\nContent-Type: text/plain\r\n{}\r\n",
            if status == 200 { "OK" } else { "Not OK" },
            body.len(),
            if close { "Connection: close\r\n" } else { "" }
        )?;
        writer.write_all(&body)?;
        if close {
            return Ok(());
        }
    }
}

fn echo(sock: UdpSocket, name: &str, stop: &AtomicBool) {
    let mut buf = [0u8; 2048];
    while !stop.load(Ordering::Relaxed) {
        if let Ok((n, from)) = sock.recv_from(&mut buf) {
            let mut reply = format!("{name} ").into_bytes();
            reply.extend_from_slice(&buf[..n]);
            let _ = sock.send_to(&reply, from);
        }
    }
}
