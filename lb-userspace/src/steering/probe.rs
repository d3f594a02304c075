//! Talking to backends: health checks (TCP connect, HTTP GET expecting 2xx)
//! and load scrapes (GET of the node's Prometheus endpoint, parsed with
//! [`crate::steering::promtext`], read with [`crate::steering::engines`]).
//!
//! HTTP is the smallest client that serves: HTTP/1.0 requests (so servers
//! answer without chunking and close the connection; chunked answers are
//! decoded anyway), one request per connection, the whole exchange bounded
//! by the check's timeout and the answer by a size limit.

use std::{
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use crate::{
    desired::policy::{CheckKind, HealthCheck, ScrapeTarget},
    steering::engines,
    steering::promtext,
    steering::{LoadReport, LoadSource},
};

/// Largest health-check answer read (the status line is what counts).
const MAX_HEALTH_ANSWER: usize = 64 << 10;
/// Largest load scrape accepted.
pub const MAX_SCRAPE: usize = 8 << 20;

/// Runs one health check of `addr`.
pub async fn check(addr: IpAddr, c: &HealthCheck) -> Result<(), String> {
    let target = SocketAddr::new(addr, c.port);
    match c.kind {
        CheckKind::Tcp => tokio::time::timeout(c.timeout, TcpStream::connect(target))
            .await
            .map_err(|_| format!("tcp {target}: no connection within {:?}", c.timeout))?
            .map(drop)
            .map_err(|e| format!("tcp {target}: {e}")),
        CheckKind::Http => {
            let (status, _) = http_get(target, &c.path, c.timeout, MAX_HEALTH_ANSWER).await?;
            if (200..300).contains(&status) {
                Ok(())
            } else {
                Err(format!("http {target}{}: status {status}", c.path))
            }
        }
    }
}

/// Why a scrape gave no report.
#[derive(Clone, Debug, PartialEq)]
pub enum ScrapeError {
    /// No answer, or not a 200 with a body within the limits.
    Fetch(String),
    /// The text is not the Prometheus format, or values are invalid.
    Invalid(String),
    /// No family lbd knows.
    UnknownFormat(String),
}

impl ScrapeError {
    /// Label value of the reports counter.
    pub fn outcome(&self) -> &'static str {
        match self {
            ScrapeError::Fetch(_) => "failed",
            ScrapeError::Invalid(_) => "invalid",
            ScrapeError::UnknownFormat(_) => "unknown_format",
        }
    }

    pub fn message(&self) -> &str {
        match self {
            ScrapeError::Fetch(m) | ScrapeError::Invalid(m) | ScrapeError::UnknownFormat(m) => m,
        }
    }
}

/// Scrapes `addr`'s load from `t`.
pub async fn scrape(addr: IpAddr, t: &ScrapeTarget) -> Result<LoadReport, ScrapeError> {
    let target = SocketAddr::new(addr, t.port);
    let (status, body) = http_get(target, &t.path, t.timeout, MAX_SCRAPE)
        .await
        .map_err(ScrapeError::Fetch)?;
    if status != 200 {
        return Err(ScrapeError::Fetch(format!(
            "http {target}{}: status {status}",
            t.path
        )));
    }
    load_from_text(&body, Instant::now()).map_err(|e| match e {
        ScrapeError::Invalid(m) => ScrapeError::Invalid(format!("{target}{}: {m}", t.path)),
        ScrapeError::UnknownFormat(m) => {
            ScrapeError::UnknownFormat(format!("{target}{}: {m}", t.path))
        }
        other => other,
    })
}

/// A load report from the text of a scrape.
pub fn load_from_text(body: &[u8], at: Instant) -> Result<LoadReport, ScrapeError> {
    let text =
        std::str::from_utf8(body).map_err(|e| ScrapeError::Invalid(format!("not UTF-8: {e}")))?;
    let samples = promtext::parse_filtered(text, engines::wanted)
        .map_err(|e| ScrapeError::Invalid(e.to_string()))?;
    let load = engines::extract(&samples).map_err(|e| match e {
        engines::ExtractError::Unknown => ScrapeError::UnknownFormat(e.to_string()),
        other => ScrapeError::Invalid(other.to_string()),
    })?;
    Ok(LoadReport {
        queue: load.queue,
        running: load.running,
        kv: load.kv,
        utilization: None,
        source: LoadSource::Scrape,
        reporter: match load.engine {
            engines::Engine::Vllm => "vllm",
            engines::Engine::Sglang => "sglang",
            engines::Engine::Triton => "triton",
            engines::Engine::Tgi => "tgi",
        },
        at,
        ttl: None,
    })
}

/// `GET path` from `target` with HTTP/1.0; returns the status and the
/// body (at most `max` bytes), all within `timeout`.
pub async fn http_get(
    target: SocketAddr,
    path: &str,
    timeout: Duration,
    max: usize,
) -> Result<(u16, Vec<u8>), String> {
    let exchange = async {
        let mut conn = TcpStream::connect(target)
            .await
            .map_err(|e| format!("http {target}: {e}"))?;
        let host = match target.ip() {
            IpAddr::V4(a) => format!("{a}:{}", target.port()),
            IpAddr::V6(a) => format!("[{a}]:{}", target.port()),
        };
        let request = format!(
            "GET {path} HTTP/1.0\r\nHost: {host}\r\nUser-Agent: lbd/{}\r\nAccept: text/plain\r\nConnection: close\r\n\r\n",
            env!("CARGO_PKG_VERSION")
        );
        conn.write_all(request.as_bytes())
            .await
            .map_err(|e| format!("http {target}: {e}"))?;
        let mut answer = Vec::new();
        let head_room = 16 << 10;
        (&mut conn)
            .take((max + head_room) as u64 + 1)
            .read_to_end(&mut answer)
            .await
            .map_err(|e| format!("http {target}: {e}"))?;
        parse_answer(&answer, max).map_err(|e| format!("http {target}{path}: {e}"))
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| format!("http {target}{path}: no answer within {timeout:?}"))?
}

/// Status and body of an HTTP/1.x answer read to its end.
fn parse_answer(answer: &[u8], max: usize) -> Result<(u16, Vec<u8>), String> {
    let end = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("the answer has no complete header")?;
    let head = std::str::from_utf8(&answer[..end]).map_err(|_| "the header is not text")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let mut parts = status_line.splitn(3, ' ');
    let (version, code) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    if !version.starts_with("HTTP/1.") {
        return Err(format!("not an HTTP/1 answer: {status_line:?}"));
    }
    let status: u16 = code
        .parse()
        .ok()
        .filter(|c| (100..600).contains(c))
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let mut chunked = false;
    let mut length = None;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            return Err(format!("bad header line {line:?}"));
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.eq_ignore_ascii_case("chunked");
        } else if name.eq_ignore_ascii_case("content-length") {
            length = Some(
                value
                    .parse::<usize>()
                    .map_err(|_| format!("bad Content-Length {value:?}"))?,
            );
        }
    }
    let raw = &answer[end + 4..];
    let body = if chunked {
        dechunk(raw, max)?
    } else {
        let body = match length {
            Some(n) if n > raw.len() => {
                return Err(format!("the body ends after {} of {n} bytes", raw.len()));
            }
            Some(n) => &raw[..n],
            None => raw,
        };
        body.to_vec()
    };
    if body.len() > max {
        return Err(format!("the body is larger than {max} bytes"));
    }
    Ok((status, body))
}

/// Decodes a chunked body.
fn dechunk(mut raw: &[u8], max: usize) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let line_end = raw
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("a chunk size line is cut off")?;
        let line = std::str::from_utf8(&raw[..line_end]).map_err(|_| "bad chunk size")?;
        let size_text = line.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|_| format!("bad chunk size {size_text:?}"))?;
        raw = &raw[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        if size > max || out.len() + size > max {
            return Err(format!("the body is larger than {max} bytes"));
        }
        if raw.len() < size + 2 {
            return Err("a chunk is cut off".into());
        }
        out.extend_from_slice(&raw[..size]);
        raw = &raw[size + 2..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_parse_with_length_without_and_chunked() {
        let a = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello";
        assert_eq!(parse_answer(a, 100).unwrap(), (200, b"hello".to_vec()));
        let a = b"HTTP/1.0 503 Service Unavailable\r\nServer: x\r\n\r\ndown";
        assert_eq!(parse_answer(a, 100).unwrap(), (503, b"down".to_vec()));
        let a = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n";
        assert_eq!(parse_answer(a, 100).unwrap(), (200, b"abcde".to_vec()));
    }

    #[test]
    fn bad_answers_are_errors() {
        for (a, needle) in [
            (
                &b"HTTP/1.1 200 OK\r\nContent-Length: 5"[..],
                "no complete header",
            ),
            (b"SSH-2.0-OpenSSH\r\n\r\n", "not an HTTP/1 answer"),
            (b"HTTP/1.1 abc OK\r\n\r\n", "bad status line"),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nshort",
                "ends after 5 of 9",
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
                "bad chunk size",
            ),
            (
                b"HTTP/1.1 200 OK\r\n\r\n0123456789abcdef",
                "larger than 8 bytes",
            ),
        ] {
            let e = parse_answer(a, 8).unwrap_err();
            assert!(e.contains(needle), "{e}");
        }
    }

    #[test]
    fn a_vllm_scrape_is_a_report() {
        let text = "# TYPE vllm:num_requests_waiting gauge\n\
                    vllm:num_requests_waiting{engine=\"0\",model_name=\"m\"} 7\n\
                    vllm:num_requests_running{engine=\"0\",model_name=\"m\"} 3\n\
                    vllm:kv_cache_usage_perc{engine=\"0\",model_name=\"m\"} 0.5\n";
        let r = load_from_text(text.as_bytes(), Instant::now()).unwrap();
        assert_eq!((r.queue, r.running, r.kv), (7.0, Some(3.0), Some(0.5)));
        assert_eq!(r.reporter, "vllm");
        let bad = "vllm:num_requests_waiting NaN\n";
        assert_eq!(
            load_from_text(bad.as_bytes(), Instant::now())
                .unwrap_err()
                .outcome(),
            "invalid"
        );
        assert_eq!(
            load_from_text(b"node_load1 3\n", Instant::now())
                .unwrap_err()
                .outcome(),
            "unknown_format"
        );
        assert_eq!(
            load_from_text(b"<html>not prometheus</html>\n", Instant::now())
                .unwrap_err()
                .outcome(),
            "invalid"
        );
    }
}
