//! `wrk`, the HTTP load generator the lab benchmarks drive from the client's
//! namespace, and what it reports.

use anyhow::{Context, Result, bail};

use crate::netns::Netns;

/// One wrk run.
#[derive(Clone, Debug)]
pub struct WrkRun<'a> {
    pub url: &'a str,
    pub connections: u32,
    pub secs: u32,
    /// `Connection: close` on every request: the server closes after each
    /// answer and wrk opens a new connection for the next request.
    pub close: bool,
}

/// What wrk printed.
#[derive(Clone, Debug, PartialEq)]
pub struct WrkReport {
    /// Requests completed.
    pub requests: u64,
    pub rps: f64,
    /// Response bytes (headers and bodies) as Gbit/s.
    pub gbps: f64,
    /// Latency percentiles from `--latency`: time from writing a request to
    /// its complete answer (wrk does not count its own connect).
    pub p50_ms: f64,
    pub p99_ms: f64,
}

impl WrkRun<'_> {
    /// Runs wrk (two threads, `--latency`) inside `ns`; fails on socket
    /// errors, timeouts or non-2xx answers.
    pub fn run(&self, ns: &Netns) -> Result<WrkReport> {
        let (c, d) = (
            format!("-c{}", self.connections),
            format!("-d{}s", self.secs),
        );
        let mut args = vec!["-t2", &c, &d, "--latency"];
        if self.close {
            args.extend(["-H", "Connection: close"]);
        }
        args.push(self.url);
        let out = ns.exec("wrk", &args)?;
        if out.contains("Socket errors") || out.contains("Non-2xx") {
            bail!("wrk saw errors against {}:\n{out}", self.url);
        }
        parse(&out).with_context(|| format!("wrk's report against {}:\n{out}", self.url))
    }
}

/// Parses wrk's report (with `--latency`).
pub fn parse(out: &str) -> Result<WrkReport> {
    let field = |name: &str| -> Result<&str> {
        out.lines()
            .find_map(|l| l.trim().strip_prefix(name))
            .map(str::trim)
            .with_context(|| format!("no {name:?}"))
    };
    let rps: f64 = field("Requests/sec:")?.parse()?;
    let transfer = field("Transfer/sec:")?;
    let bytes = scaled(
        transfer,
        &[
            ("B", 1.0),
            ("KB", 1024.0),
            ("MB", 1024.0 * 1024.0),
            ("GB", 1024.0 * 1024.0 * 1024.0),
        ],
    )?;
    // "  123456 requests in 4.00s, 17.66MB read"
    let requests: u64 = out
        .lines()
        .find(|l| l.contains(" requests in "))
        .and_then(|l| l.split_whitespace().next())
        .context("no request count")?
        .parse()?;
    let ms = |s: &str| scaled(s, &[("us", 1e-3), ("ms", 1.0), ("s", 1e3), ("m", 60e3)]);
    Ok(WrkReport {
        requests,
        rps,
        gbps: bytes * 8.0 / 1e9,
        p50_ms: ms(field("50%")?)?,
        p99_ms: ms(field("99%")?)?,
    })
}

/// `12.5MB` with `units` [("MB", factor), ...] → 12.5 × factor.
fn scaled(s: &str, units: &[(&str, f64)]) -> Result<f64> {
    let split = s.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let factor = units
        .iter()
        .find(|(u, _)| *u == unit)
        .map(|(_, f)| *f)
        .with_context(|| format!("unknown unit in {s:?}"))?;
    Ok(num
        .parse::<f64>()
        .with_context(|| format!("not a number: {s:?}"))?
        * factor)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_report_with_latency_distribution() {
        let out = "Running 4s test @ http://203.0.113.10/\n  2 threads and 32 connections\n  \
             Thread Stats   Avg      Stdev     Max   +/- Stdev\n    Latency     1.21ms  452.10us  12.00ms   88.00%\n    \
             Req/Sec    13.2k     1.1k   15.0k    70.00%\n  Latency Distribution\n     50%  635.00us\n     \
             75%    1.10ms\n     90%    1.90ms\n     99%    2.50ms\n  105600 requests in 4.00s, 10.58MB read\n\
             Requests/sec:  26400.00\nTransfer/sec:      2.65MB\n";
        let r = parse(out).unwrap();
        assert_eq!(r.requests, 105_600);
        assert_eq!(r.rps, 26400.0);
        assert!((r.p50_ms - 0.635).abs() < 1e-9);
        assert!((r.p99_ms - 2.5).abs() < 1e-9);
        assert!((r.gbps - 2.65 * 1024.0 * 1024.0 * 8.0 / 1e9).abs() < 1e-9);
    }
}
