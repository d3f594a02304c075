//! `cargo xtask bench fleet`: a fleet of three balancers sharing their
//! desired state and steering view through a three-member etcd (the
//! scale-out lab with `[fleet]`, release builds), next to the same three
//! balancers standalone, in the same run.
//!
//! The VIPs follow load without a churn hold (`churn_hold = 0`): the
//! benchmark changes the same weight back and forth, which the hold would
//! hold back for a minute.
//!
//! - `fleet.change_to_all_ms_p50/_p99`: a weight change through one
//!   member's API until all three kernel tables hold it (the share of the
//!   changed backend moved as the weight asks); standalone: the same
//!   change made on each balancer in turn (what an operator without a
//!   fleet does), until all three hold it.
//! - `fleet.load_to_all_ms_p99`: a backend's load page changed until every
//!   member's table reflects it (includes waiting for the leader's next
//!   scrape, `scrape_interval` = 1 s).
//! - `fleet.takeover_ms`: the steering leader killed until another member
//!   published the steering view.
//! - `fleet.etcd_writes_per_change`, `fleet.etcd_writes_per_steer_update`:
//!   every member's writes to etcd, per change of the desired state and
//!   per steering view published.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use lb::control::client::Endpoint;
use lb_tests::lab::{self, ecmp::EcmpLab, servers};

const CHANGES: usize = 20;
const LOAD_STEPS: usize = 10;
const LOAD: &str = "[vip.load]\nmetrics_port = 80\nscrape_interval = 1\nrecovery = 0\nstale_after = 3\nchurn_hold = 0\n";

/// The IPv4 TCP VIP's key in [`EcmpLab::tables`].
fn tcp_key() -> String {
    format!(
        "{}:{}/{}",
        lab::VIP_V4,
        servers::HTTP_PORT,
        lb_common::PROTO_TCP
    )
}

/// Backend `b`'s entries in balancer `i`'s kernel table of the TCP VIP.
fn entries(lab: &EcmpLab, i: usize, b: usize) -> Result<usize> {
    let (_, addrs) = lab
        .vip_table(i, &tcp_key())?
        .context("the TCP VIP's table")?;
    let want: IpAddr = lab.backends[b].v4.into();
    Ok(addrs.iter().filter(|a| **a == want).count())
}

/// Waits until `f` holds (polling); the time it took.
fn until(what: &str, timeout: Duration, mut f: impl FnMut() -> Result<bool>) -> Result<Duration> {
    let t = Instant::now();
    while !f()? {
        if t.elapsed() > timeout {
            bail!("{what}: not within {timeout:?}");
        }
        thread::sleep(Duration::from_millis(2));
    }
    Ok(t.elapsed())
}

fn set_weight(api: &Endpoint, backend: IpAddr, weight: u32) -> Result<()> {
    let path = format!("/v1/vips/203.0.113.10-80-tcp/backends/{backend}");
    let body = format!("{{\"weight\": {weight}}}");
    let r = api.request("PATCH", &path, Some(body.as_bytes()))?;
    ensure!(
        r.status < 300,
        "PATCH {path}: {} {}",
        r.status,
        r.error_message()
    );
    Ok(())
}

/// Each member's etcd writes, all kinds.
fn writes(lab: &EcmpLab) -> f64 {
    (0..lab.balancers.len())
        .filter_map(|i| lab.metrics(i).ok())
        .map(|m| {
            lb_tests::prom::samples(&m)
                .into_iter()
                .filter(|s| s.name == "lb_fleet_etcd_writes_total")
                .map(|s| s.value)
                .sum::<f64>()
        })
        .sum()
}

fn steering_writes(lab: &EcmpLab) -> f64 {
    (0..lab.balancers.len())
        .filter_map(|i| lab.metrics(i).ok())
        .filter_map(|m| {
            lb_tests::prom::value(&m, "lb_fleet_etcd_writes_total", &[("kind", "steering")])
        })
        .sum()
}

fn pct(mut v: Vec<f64>, q: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 - 1.0) * q).round() as usize]
}

/// Weight changes of backend 0 (100 and 300 in turn) through `apply`,
/// each until every balancer of `members` holds it; the times in ms.
fn changes(
    lab: &EcmpLab,
    members: &[usize],
    mut apply: impl FnMut(u32) -> Result<()>,
) -> Result<Vec<f64>> {
    let mut out = Vec::with_capacity(CHANGES);
    for n in 0..CHANGES {
        let w = if n % 2 == 0 { 300 } else { 100 };
        let t = Instant::now();
        apply(w)?;
        until("the change in every table", Duration::from_secs(10), || {
            for &i in members {
                let ratio = entries(lab, i, 0)? as f64 / entries(lab, i, 1)?.max(1) as f64;
                // Maglev's shares follow the weights to a few percent.
                if (ratio / (f64::from(w) / 100.0) - 1.0).abs() > 0.1 {
                    return Ok(false);
                }
            }
            Ok(true)
        })?;
        out.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    Ok(out)
}

pub fn fleet_benchmarks(results: &mut BTreeMap<String, f64>) -> Result<()> {
    let all = [0, 1, 2];
    // Standalone: the operator changes each balancer in turn.
    let standalone = {
        let lab = EcmpLab::start(3, &[100, 100, 100, 100], "")?;
        let apis: Vec<Endpoint> = (0..3).map(|i| Endpoint::Unix(lab.api_socket(i))).collect();
        let b0: IpAddr = lab.backends[0].v4.into();
        changes(&lab, &all, |w| {
            for api in &apis {
                set_weight(api, b0, w)?;
            }
            Ok(())
        })?
    };

    let mut lab = EcmpLab::start_fleet(3, &[100, 100, 100, 100], LOAD, 3)?;
    let controls = lab.controls();
    for c in &controls {
        c.set_vllm(0.0, 0.1);
    }
    let leader = |lab: &EcmpLab, i: usize| -> Option<String> {
        let api = Endpoint::Unix(lab.api_socket(i));
        let r = api.request("GET", "/v1/fleet", None).ok()?;
        let v: serde_json::Value = serde_json::from_slice(&r.body).ok()?;
        v["leader"].as_str().map(str::to_string)
    };
    until("a steering leader", Duration::from_secs(20), || {
        Ok(leader(&lab, 0).is_some())
    })?;
    thread::sleep(Duration::from_secs(5));
    let api = Endpoint::Unix(lab.api_socket(1));
    let b0: IpAddr = lab.backends[0].v4.into();
    let w0 = writes(&lab);
    let fleet = changes(&lab, &all, |w| set_weight(&api, b0, w))?;
    // The members' status writes trail a change by up to 200 ms.
    thread::sleep(Duration::from_secs(1));
    let per_change = (writes(&lab) - w0) / CHANGES as f64;

    // Load: backend 3's queue jumps (its share shrinks) and falls back.
    let mut load_ms = Vec::with_capacity(LOAD_STEPS);
    let (w1, s1) = (writes(&lab), steering_writes(&lab));
    for n in 0..LOAD_STEPS {
        let busy = n % 2 == 0;
        let base = entries(&lab, 0, 3)?;
        let t = Instant::now();
        controls[3].set_vllm(if busy { 4.0 } else { 0.0 }, 0.1);
        until("the load in every table", Duration::from_secs(15), || {
            for &i in &all {
                let e = entries(&lab, i, 3)?;
                if (busy && e * 10 > base * 9) || (!busy && e * 10 < base * 11) {
                    return Ok(false);
                }
            }
            Ok(true)
        })?;
        load_ms.push(t.elapsed().as_secs_f64() * 1000.0);
        // Let the weights settle before the next step.
        thread::sleep(Duration::from_secs(6));
    }
    let views = steering_writes(&lab) - s1;
    let per_view = (writes(&lab) - w1) / views.max(1.0);

    // The leader dies.
    let old = leader(&lab, 0).context("the leader")?;
    let li = old.trim_start_matches("lb").parse::<usize>()? - 1;
    let key = format!("{}/steering", lab.fleet_prefix());
    lab.kill_balancer(li)?;
    let etcd = lab.etcd.as_ref().context("the lab's etcd")?;
    let takeover = until("a new leader's view", Duration::from_secs(20), || {
        Ok(etcd
            .get(&key)?
            .and_then(|v| serde_json::from_str::<serde_json::Value>(&v).ok())
            .is_some_and(|v| v["leader"].as_str().is_some_and(|l| l != old)))
    })?;

    let p = |v: &[f64], q: f64| pct(v.to_vec(), q);
    println!(
        "Fleet of 3 balancers, 3 etcd members (lab, release builds); standalone: the same 3 balancers, each changed in turn"
    );
    println!(
        "  change until all three kernel tables hold it: fleet p50 {:.0} ms, p99 {:.0} ms; standalone p50 {:.0} ms, p99 {:.0} ms ({CHANGES} changes)",
        p(&fleet, 0.5),
        p(&fleet, 0.99),
        p(&standalone, 0.5),
        p(&standalone, 0.99)
    );
    println!(
        "  load report until every table reflects it: p50 {:.0} ms, p99 {:.0} ms (scrape_interval 1 s, {LOAD_STEPS} steps)",
        p(&load_ms, 0.5),
        p(&load_ms, 0.99)
    );
    println!(
        "  leader killed until another member published: {:.0} ms (lease {} s)",
        takeover.as_secs_f64() * 1000.0,
        lab::ecmp::FLEET_LEASE_TTL
    );
    println!(
        "  etcd writes (all members): {per_change:.1} per change, {per_view:.1} per steering view ({views:.0} views)"
    );
    results.insert("fleet.change_to_all_ms_p50".into(), p(&fleet, 0.5));
    results.insert("fleet.change_to_all_ms_p99".into(), p(&fleet, 0.99));
    results.insert(
        "fleet.standalone_change_to_all_ms_p50".into(),
        p(&standalone, 0.5),
    );
    results.insert(
        "fleet.standalone_change_to_all_ms_p99".into(),
        p(&standalone, 0.99),
    );
    results.insert("fleet.load_to_all_ms_p50".into(), p(&load_ms, 0.5));
    results.insert("fleet.load_to_all_ms_p99".into(), p(&load_ms, 0.99));
    results.insert("fleet.takeover_ms".into(), takeover.as_secs_f64() * 1000.0);
    results.insert("fleet.etcd_writes_per_change".into(), per_change);
    results.insert("fleet.etcd_writes_per_steer_update".into(), per_view);
    Ok(())
}
