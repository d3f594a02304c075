//! lbd under a service manager: given a `NOTIFY_SOCKET` (as systemd's
//! `Type=notify` gives it), what it says and when — READY only once the
//! data plane is attached, the config applied and the API serving;
//! RELOADING then READY around a SIGHUP, for an applied and for a rejected
//! reload; STOPPING on SIGTERM, before it exits. And a plain-TCP listener
//! the config asked for is warned about at start.

use std::{
    os::unix::net::UnixDatagram,
    time::{Duration, Instant},
};

use lb::control::client::Endpoint;
use lb_tests::{require_root, solo::Solo};

/// The next notification, or `None` within `timeout`.
fn next(socket: &UnixDatagram, timeout: Duration) -> Option<String> {
    socket.set_read_timeout(Some(timeout)).unwrap();
    let mut buf = [0u8; 4096];
    let n = socket.recv(&mut buf).ok()?;
    Some(String::from_utf8_lossy(&buf[..n]).into_owned())
}

#[test]
fn lbd_tells_the_service_manager_ready_reloading_and_stopping_when_they_hold() {
    require_root();
    let dir = Solo::dir("notify").unwrap();
    let path = dir.join("notify.sock");
    let socket = UnixDatagram::bind(&path).unwrap();
    let started = Instant::now();
    let mut lbd = Solo::start(
        dir,
        // /metrics on a non-loopback address in plain TCP, because the
        // config says so: allowed, with a warning.
        "[metrics]\nlisten = \"10.204.0.1:9180\"\nplaintext = true\n",
        &[("NOTIFY_SOCKET", path.to_str().unwrap())],
    )
    .unwrap();

    // The first thing lbd says is READY, and when it does, it forwards
    // with its config and serves the API.
    let ready = next(&socket, Duration::from_secs(30)).expect("READY within 30 s");
    let at = started.elapsed();
    let attached = lbd.attached();
    let vips = Endpoint::Unix(lbd.socket())
        .request("GET", "/v1/vips", None)
        .expect("the API answers once READY");
    println!(
        "after {:.0} ms: {ready:?}; attached: {attached}; GET /v1/vips: {}",
        at.as_secs_f64() * 1000.0,
        vips.status
    );
    assert!(ready.starts_with("READY=1\n"), "{ready:?}");
    assert!(
        ready.contains("STATUS=forwarding 1 VIPs on lb0"),
        "{ready:?}"
    );
    assert!(
        ready.contains(&format!("MAINPID={}", lbd.child.id())),
        "{ready:?}"
    );
    assert!(attached, "READY before the program was attached");
    assert_eq!(vips.status, 200);
    assert!(String::from_utf8_lossy(&vips.body).contains("203.0.113.10:80/tcp"));
    let log = lbd.log();
    assert!(
        log.contains("PLAIN TCP (plaintext = true)"),
        "no warning for the plain-TCP /metrics:\n{log}"
    );

    // A reload: RELOADING (stamped), then READY saying how it went.
    let before = Instant::now();
    lbd.signal(libc::SIGHUP);
    let reloading = next(&socket, Duration::from_secs(10)).expect("RELOADING");
    let done = next(&socket, Duration::from_secs(10)).expect("READY after the reload");
    println!(
        "SIGHUP: {reloading:?} then {done:?} in {:.0} ms",
        before.elapsed().as_secs_f64() * 1000.0
    );
    assert!(reloading.starts_with("RELOADING=1\n"), "{reloading:?}");
    let usec: u64 = reloading
        .lines()
        .find_map(|l| l.strip_prefix("MONOTONIC_USEC="))
        .expect("MONOTONIC_USEC")
        .parse()
        .unwrap();
    assert!(usec > 0);
    assert!(
        done.starts_with("READY=1\n") && done.contains("config reloaded and applied"),
        "{done:?}"
    );

    // A reload of a broken config is rejected, and lbd is ready again
    // with the config it had.
    let config = lbd.config_path();
    let good = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, good.replace("port = 80", "port = 99999")).unwrap();
    lbd.signal(libc::SIGHUP);
    let reloading = next(&socket, Duration::from_secs(10)).expect("RELOADING");
    let done = next(&socket, Duration::from_secs(10)).expect("READY after the rejected reload");
    println!("SIGHUP with a broken config: {reloading:?} then {done:?}");
    assert!(reloading.starts_with("RELOADING=1\n"));
    assert!(
        done.starts_with("READY=1\n") && done.contains("config reload rejected"),
        "{done:?}"
    );

    // SIGTERM: STOPPING, then lbd exits cleanly; nothing after STOPPING.
    lbd.signal(libc::SIGTERM);
    let stopping = next(&socket, Duration::from_secs(10)).expect("STOPPING");
    let status = lbd.stop().unwrap();
    println!("SIGTERM: {stopping:?}, then lbd exited: {status}");
    assert!(stopping.starts_with("STOPPING=1"), "{stopping:?}");
    assert!(status.success(), "{status}:\n{}", lbd.log());
    assert_eq!(next(&socket, Duration::from_millis(200)), None);
}

#[test]
fn without_notify_socket_lbd_says_nothing_and_runs() {
    require_root();
    let mut lbd = Solo::start(Solo::dir("nonotify").unwrap(), "", &[]).unwrap();
    lbd.wait_log("serving the API", Duration::from_secs(30))
        .unwrap();
    assert!(lbd.attached());
    assert!(!lbd.log().contains("NOTIFY_SOCKET"), "{}", lbd.log());
    assert!(lbd.stop().unwrap().success());
}

#[test]
fn a_start_that_fails_never_says_ready() {
    require_root();
    let dir = Solo::dir("notifyfail").unwrap();
    let path = dir.join("notify.sock");
    let socket = UnixDatagram::bind(&path).unwrap();
    // Everything but the API socket's group is fine: lbd gets as far as
    // binding its listeners, then stops.
    let config = "[api]\nsocket = \"@DIR@/api.sock\"\naudit_log = \"@DIR@/audit.log\"\nsocket_group = \"lbt-no-such-group\"\n";
    let mut lbd = Solo::start(dir, config, &[("NOTIFY_SOCKET", path.to_str().unwrap())]).unwrap();
    let status = lbd.child.wait().unwrap();
    let said = next(&socket, Duration::from_millis(500));
    println!("lbd {status}, said {said:?}: {}", lbd.log().trim());
    assert!(!status.success());
    assert_eq!(
        said, None,
        "a failed start told the service manager something"
    );
    assert!(!lbd.attached(), "a failed start left the program attached");
}
