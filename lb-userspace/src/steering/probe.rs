//! Talking to backends: health checks (TCP connect; HTTP or HTTPS GET
//! expecting a status in a range, 2xx by default) and load scrapes (GET of
//! the node's Prometheus endpoint, parsed with [`crate::steering::promtext`],
//! read with [`crate::steering::engines`]).
//!
//! HTTP goes through [`super::http`] (hyper): a health check opens a new
//! connection each time (what it tests is that the backend accepts one);
//! a scrape keeps its connection to the node between scrapes. Every
//! exchange is bounded by the check's or scrape's timeout and the answer
//! by a size limit.

use std::{
    net::{IpAddr, SocketAddr},
    time::Instant,
};

use tokio::net::TcpStream;

use crate::{
    desired::policy::{CheckKind, HealthCheck, ScrapeTarget},
    steering::engines::{self, Engine},
    steering::http::HttpClient,
    steering::{LoadReport, LoadSource},
};

/// Largest health-check answer read (the status line is what counts).
const MAX_HEALTH_ANSWER: usize = 64 << 10;
/// Largest load scrape accepted.
pub const MAX_SCRAPE: usize = 8 << 20;

/// One backend's health check, run again and again (the TLS settings are
/// read once).
pub struct Checker {
    target: SocketAddr,
    check: HealthCheck,
    /// For HTTP(S) checks; `Err`: why none can be made (a bad CA file).
    http: Option<Result<HttpClient, String>>,
}

impl Checker {
    pub fn new(addr: IpAddr, check: &HealthCheck) -> Checker {
        let target = SocketAddr::new(addr, check.port);
        let http =
            (check.kind != CheckKind::Tcp).then(|| HttpClient::new(target, &check.http, false));
        Checker {
            target,
            check: check.clone(),
            http,
        }
    }

    /// Runs the check once.
    pub async fn run(&mut self) -> Result<(), String> {
        let (target, c) = (self.target, &self.check);
        match &mut self.http {
            None => tokio::time::timeout(c.timeout, TcpStream::connect(target))
                .await
                .map_err(|_| format!("tcp {target}: no connection within {:?}", c.timeout))?
                .map(drop)
                .map_err(|e| format!("tcp {target}: {e}")),
            Some(Err(e)) => Err(format!("{} {target}{}: {e}", c.kind, c.path)),
            Some(Ok(client)) => {
                let a = client.get(&c.path, c.timeout, MAX_HEALTH_ANSWER).await?;
                if c.expect.contains(a.status) {
                    Ok(())
                } else {
                    Err(format!(
                        "{} {target}{}: status {} (expected {})",
                        c.kind, c.path, a.status, c.expect
                    ))
                }
            }
        }
    }
}

/// Runs one health check of `addr`.
pub async fn check(addr: IpAddr, c: &HealthCheck) -> Result<(), String> {
    Checker::new(addr, c).run().await
}

/// Scrapes one node again and again over a kept-alive connection.
pub struct Scraper {
    target: ScrapeTarget,
    client: Result<HttpClient, String>,
}

impl Scraper {
    pub fn new(addr: IpAddr, target: &ScrapeTarget) -> Scraper {
        Scraper {
            client: HttpClient::new(SocketAddr::new(addr, target.port), &target.http, true),
            target: target.clone(),
        }
    }

    /// Scrapes the node's load once.
    pub async fn scrape(&mut self) -> Result<LoadReport, ScrapeError> {
        let t = &self.target;
        let client = self
            .client
            .as_mut()
            .map_err(|e| ScrapeError::Fetch(format!("{}: {e}", t.path)))?;
        let a = client
            .get(&t.path, t.timeout, MAX_SCRAPE)
            .await
            .map_err(ScrapeError::Fetch)?;
        if a.status != 200 {
            return Err(ScrapeError::Fetch(format!(
                "{}: status {}",
                t.path, a.status
            )));
        }
        let body = a
            .into_decoded(MAX_SCRAPE)
            .map_err(|e| ScrapeError::Fetch(format!("{}: {e}", t.path)))?;
        load_from_text(&body, t.engine, Instant::now()).map_err(|e| match e {
            ScrapeError::Invalid(m) => ScrapeError::Invalid(format!("{}: {m}", t.path)),
            ScrapeError::UnknownFormat(m) => ScrapeError::UnknownFormat(format!("{}: {m}", t.path)),
            ScrapeError::NoSamples(m) => ScrapeError::NoSamples(format!("{}: {m}", t.path)),
            other => other,
        })
    }
}

/// Why a scrape gave no report.
#[derive(Clone, Debug, PartialEq)]
pub enum ScrapeError {
    /// No answer, or not a 200 with a body within the limits.
    Fetch(String),
    /// The text is not the Prometheus format, or values are invalid.
    Invalid(String),
    /// No family lbd knows (or not the VIP's engine's).
    UnknownFormat(String),
    /// The engine's families are declared but have no samples yet.
    NoSamples(String),
}

impl ScrapeError {
    /// Label value of the reports counter.
    pub fn outcome(&self) -> &'static str {
        match self {
            ScrapeError::Fetch(_) => "failed",
            ScrapeError::Invalid(_) => "invalid",
            ScrapeError::UnknownFormat(_) => "unknown_format",
            ScrapeError::NoSamples(_) => "no_samples",
        }
    }

    pub fn message(&self) -> &str {
        match self {
            ScrapeError::Fetch(m)
            | ScrapeError::Invalid(m)
            | ScrapeError::UnknownFormat(m)
            | ScrapeError::NoSamples(m) => m,
        }
    }
}

/// Scrapes `addr`'s load from `t` once (a connection of its own).
pub async fn scrape(addr: IpAddr, t: &ScrapeTarget) -> Result<LoadReport, ScrapeError> {
    Scraper::new(addr, t).scrape().await
}

/// A load report from the text of a scrape; `engine`: the VIP's setting
/// (`None`: detect it).
pub fn load_from_text(
    body: &[u8],
    engine: Option<Engine>,
    at: Instant,
) -> Result<LoadReport, ScrapeError> {
    let text =
        std::str::from_utf8(body).map_err(|e| ScrapeError::Invalid(format!("not UTF-8: {e}")))?;
    let load = engines::read(text, engine).map_err(|e| match e {
        engines::ExtractError::Unknown
        | engines::ExtractError::Missing {
            declared: false, ..
        } => ScrapeError::UnknownFormat(e.to_string()),
        engines::ExtractError::Missing { declared: true, .. } => {
            ScrapeError::NoSamples(e.to_string())
        }
        engines::ExtractError::Malformed(_) | engines::ExtractError::Invalid { .. } => {
            ScrapeError::Invalid(e.to_string())
        }
    })?;
    Ok(LoadReport {
        queue: load.queue,
        running: load.running,
        kv: load.kv,
        utilization: None,
        progress: load.progress,
        source: LoadSource::Scrape,
        reporter: load.engine.name(),
        at,
        ttl: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vllm_scrape_is_a_report() {
        let text = "# TYPE vllm:num_requests_waiting gauge\n\
                    vllm:num_requests_waiting{engine=\"0\",model_name=\"m\"} 7\n\
                    vllm:num_requests_running{engine=\"0\",model_name=\"m\"} 3\n\
                    vllm:kv_cache_usage_perc{engine=\"0\",model_name=\"m\"} 0.5\n";
        let r = load_from_text(text.as_bytes(), None, Instant::now()).unwrap();
        assert_eq!((r.queue, r.running, r.kv), (7.0, Some(3.0), Some(0.5)));
        assert_eq!(r.reporter, "vllm");
        let bad = "vllm:num_requests_waiting NaN\n";
        assert_eq!(
            load_from_text(bad.as_bytes(), None, Instant::now())
                .unwrap_err()
                .outcome(),
            "invalid"
        );
        assert_eq!(
            load_from_text(b"node_load1 3\n", None, Instant::now())
                .unwrap_err()
                .outcome(),
            "unknown_format"
        );
        assert_eq!(
            load_from_text(b"<html>not prometheus</html>\n", None, Instant::now())
                .unwrap_err()
                .outcome(),
            "invalid"
        );
    }
}
