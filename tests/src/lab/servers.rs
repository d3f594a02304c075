//! The services a lab backend runs: HTTP/1.1 that answers with the backend's
//! name (or N bytes for `/bytes/N`), and a UDP echo that prefixes its name.
//! Threads inside the backend's namespace (HTTP connections are served by
//! a pool of reused worker threads); they stop when the lab drops.
//!
//! What health checks and load scrapes see is up to the test ([`Control`]):
//! `/health` answers 200, 503, or each in turn; `/metrics` answers a text
//! the test sets (vLLM's format, say) or an error status; and the HTTP
//! service can be stopped (its port closed) and started again.

use std::{
    io::{BufRead, BufReader, Write},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
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
}

impl Control {
    fn new() -> Control {
        Control {
            http_up: AtomicBool::new(true),
            health: Mutex::new((HealthMode::Up, Default::default())),
            metrics: Mutex::new(Err(404)),
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
        *self.metrics.lock().unwrap() = Ok(text.to_string());
    }

    /// `/metrics` answers `status` without a body.
    pub fn set_metrics_status(&self, status: u16) {
        *self.metrics.lock().unwrap() = Err(status);
    }

    /// `/metrics` answers as a vLLM server with `waiting` requests queued
    /// (split over two engines) and KV-cache use `kv`.
    pub fn set_vllm(&self, waiting: f64, kv: f64) {
        self.set_metrics(&vllm_metrics(waiting, kv));
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

/// A vLLM `/metrics` page (v0.10-style names, two engines).
pub fn vllm_metrics(waiting: f64, kv: f64) -> String {
    let half = waiting / 2.0;
    format!(
        "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.\n\
         # TYPE vllm:num_requests_waiting gauge\n\
         vllm:num_requests_waiting{{engine=\"0\",model_name=\"meta-llama/Llama-3.1-8B-Instruct\"}} {half}\n\
         vllm:num_requests_waiting{{engine=\"1\",model_name=\"meta-llama/Llama-3.1-8B-Instruct\"}} {half}\n\
         # HELP vllm:num_requests_running Number of requests in model execution batches.\n\
         # TYPE vllm:num_requests_running gauge\n\
         vllm:num_requests_running{{engine=\"0\",model_name=\"meta-llama/Llama-3.1-8B-Instruct\"}} 4\n\
         vllm:num_requests_running{{engine=\"1\",model_name=\"meta-llama/Llama-3.1-8B-Instruct\"}} 4\n\
         # HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.\n\
         # TYPE vllm:kv_cache_usage_perc gauge\n\
         vllm:kv_cache_usage_perc{{engine=\"0\",model_name=\"meta-llama/Llama-3.1-8B-Instruct\"}} {kv}\n\
         vllm:kv_cache_usage_perc{{engine=\"1\",model_name=\"meta-llama/Llama-3.1-8B-Instruct\"}} {kv}\n\
         # HELP vllm:prompt_tokens_total Number of prefill tokens processed.\n\
         # TYPE vllm:prompt_tokens_total counter\n\
         vllm:prompt_tokens_total{{engine=\"0\",model_name=\"meta-llama/Llama-3.1-8B-Instruct\"}} 123456\n"
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
            "/metrics" => match &*control.metrics.lock().unwrap() {
                Ok(text) => (200, text.clone().into_bytes()),
                Err(status) => (*status, Vec::new()),
            },
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
