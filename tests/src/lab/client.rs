//! Client side of the lab: HTTP requests and UDP datagrams, made from
//! sockets created inside the client's namespace.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream, UdpSocket},
    time::Duration,
};

use anyhow::{Context, Result, bail};

const TIMEOUT: Duration = Duration::from_secs(5);

/// A kept-alive HTTP/1.1 connection.
pub struct HttpConn {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl HttpConn {
    /// Connects to `addr`. The calling thread must be in the client's namespace.
    pub fn connect(addr: SocketAddr) -> Result<HttpConn> {
        let s = TcpStream::connect_timeout(&addr, TIMEOUT)
            .with_context(|| format!("connecting to {addr}"))?;
        s.set_read_timeout(Some(TIMEOUT))?;
        s.set_nodelay(true)?;
        Ok(HttpConn {
            reader: BufReader::new(s.try_clone()?),
            writer: s,
        })
    }

    /// Connects to `addr` from source address `src` (one of the client's).
    pub fn connect_from(src: std::net::IpAddr, addr: SocketAddr) -> Result<HttpConn> {
        use socket2::{Domain, Socket, Type};
        let sock = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
        sock.bind(&SocketAddr::new(src, 0).into())?;
        sock.connect_timeout(&addr.into(), TIMEOUT)
            .with_context(|| format!("connecting to {addr} from {src}"))?;
        let s: TcpStream = sock.into();
        s.set_read_timeout(Some(TIMEOUT))?;
        s.set_nodelay(true)?;
        Ok(HttpConn {
            reader: BufReader::new(s.try_clone()?),
            writer: s,
        })
    }

    /// Ends the connection with a RST (`SO_LINGER` 0, then close) instead
    /// of a FIN.
    pub fn reset(self) -> Result<()> {
        socket2::SockRef::from(&self.writer).set_linger(Some(Duration::ZERO))?;
        Ok(())
    }

    /// The local (client) address of the connection.
    pub fn local_addr(&self) -> Result<SocketAddr> {
        Ok(self.writer.local_addr()?)
    }

    /// `GET path`; returns the `X-Backend` header and the body.
    pub fn get(&mut self, path: &str) -> Result<(String, Vec<u8>)> {
        write!(self.writer, "GET {path} HTTP/1.1\r\nHost: lab\r\n\r\n")?;
        let mut status = String::new();
        self.reader.read_line(&mut status)?;
        if !status.starts_with("HTTP/1.1 200") {
            bail!("unexpected status line {status:?}");
        }
        let (mut len, mut backend) = (0usize, String::new());
        loop {
            let mut h = String::new();
            if self.reader.read_line(&mut h)? == 0 {
                bail!("connection closed in the headers");
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            let (k, v) = h.split_once(':').unwrap_or((h, ""));
            match k.to_ascii_lowercase().as_str() {
                "content-length" => len = v.trim().parse()?,
                "x-backend" => backend = v.trim().to_string(),
                _ => {}
            }
        }
        let mut body = vec![0; len];
        self.reader.read_exact(&mut body)?;
        Ok((backend, body))
    }
}

/// One request on a new connection; returns the backend that answered.
pub fn http_get(addr: SocketAddr) -> Result<String> {
    Ok(HttpConn::connect(addr)?.get("/")?.0)
}

/// A UDP flow: one socket (one source port) talking to `addr`.
pub struct UdpFlow {
    sock: UdpSocket,
}

impl UdpFlow {
    /// Opens a flow to `addr` from a fresh port. Calling thread in the client namespace.
    pub fn open(addr: SocketAddr) -> Result<UdpFlow> {
        let local: SocketAddr = if addr.is_ipv4() {
            "0.0.0.0:0"
        } else {
            "[::]:0"
        }
        .parse()?;
        let sock = UdpSocket::bind(local)?;
        sock.connect(addr)?;
        sock.set_read_timeout(Some(Duration::from_secs(2)))?;
        Ok(UdpFlow { sock })
    }

    /// Sends `msg` and returns the name of the backend that echoed it.
    pub fn echo(&self, msg: &str) -> Result<String> {
        // UDP may lose a datagram on a busy machine: retry a few times.
        for _ in 0..5 {
            self.sock.send(msg.as_bytes())?;
            let mut buf = [0u8; 2048];
            if let Ok(n) = self.sock.recv(&mut buf) {
                let reply = String::from_utf8_lossy(&buf[..n]).to_string();
                let (name, echoed) = reply.split_once(' ').context("reply without a name")?;
                if echoed == msg {
                    return Ok(name.to_string());
                }
            }
        }
        bail!("no echo for {msg:?}")
    }
}
