//! The services a lab backend runs: HTTP/1.1 that answers with the backend's
//! name (or N bytes for `/bytes/N`), and a UDP echo that prefixes its name.
//! Threads inside the backend's namespace; they stop when the lab drops.

use std::{
    io::{BufRead, BufReader, Write},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc,
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

/// Running services of one backend.
pub struct Services {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
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
    let (tcp, udps) = {
        let _inside = ns.enter()?;
        let any: SocketAddr = (std::net::Ipv6Addr::UNSPECIFIED, HTTP_PORT).into();
        let tcp = TcpListener::bind(any).context("binding the HTTP port")?;
        tcp.set_nonblocking(true)?;
        let mut udps = Vec::new();
        for vip in vips {
            let udp = UdpSocket::bind(SocketAddr::from((*vip, ECHO_PORT)))
                .with_context(|| format!("binding the echo port on {vip}"))?;
            udp.set_read_timeout(Some(Duration::from_millis(50)))?;
            udps.push(udp);
        }
        (tcp, udps)
    };
    let mut threads = Vec::new();
    let (n, s) = (name.to_string(), stop.clone());
    threads.push(thread::spawn(move || http_accept(tcp, &n, &s)));
    for udp in udps {
        let (n, s) = (name.to_string(), stop.clone());
        threads.push(thread::spawn(move || echo(udp, &n, &s)));
    }
    Ok(Services { stop, threads })
}

fn http_accept(listener: TcpListener, name: &str, stop: &Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((conn, _)) => {
                let (n, s) = (name.to_string(), stop.clone());
                thread::spawn(move || {
                    let _ = http_serve(conn, &n, &s);
                });
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                thread::sleep(Duration::from_millis(5))
            }
            Err(_) => thread::sleep(Duration::from_millis(5)),
        }
    }
}

/// Serves requests on one connection until the client closes it, asks to
/// close, or the lab stops.
fn http_serve(conn: TcpStream, name: &str, stop: &AtomicBool) -> std::io::Result<()> {
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
        let body = match path
            .strip_prefix("/bytes/")
            .and_then(|n| n.parse::<usize>().ok())
        {
            Some(n) => vec![b'x'; n.min(MAX_BODY)],
            None => format!("{name}\n").into_bytes(),
        };
        write!(
            writer,
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nX-Backend: {name}\r\nContent-Type: text/plain\r\n{}\r\n",
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
