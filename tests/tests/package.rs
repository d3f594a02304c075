//! The Debian package (`cargo xtask package`) on a clean Debian 12 root
//! that has neither Rust nor LLVM: lintian finds no error, `apt-get install
//! ./lb_*.deb` installs it with its declared dependencies, the unit passes
//! `systemd-analyze verify` there, and what it installed runs: `lbd --check` of
//! the example config, `lbctl --version`, and `lbd` itself in generic XDP
//! mode on a veth of the test's own namespace, with exactly the
//! capabilities `lbd@.service` leaves it, its API socket 0660 for the `lb`
//! group the package made (a member may change things and is audited by
//! uid; anyone else is refused), adopted by a second start, left alone by
//! an upgrade of the package (and adopted by the new lbd), and taken out
//! by `apt-get remove` (the prerm's `lbd --cleanup`).
//!
//! The root comes from `debootstrap --variant=minbase bookworm`, made once
//! and kept in [`CACHE`] (with the .debs apt fetched), copied afresh for
//! every run. The first run needs the Debian mirror (a few minutes); later
//! ones copy the cache. These tests need the package: `cargo xtask test`
//! builds it first and names it in `LB_PACKAGE` (`cargo xtask test
//! --package-test` runs only these); a plain `cargo test` without a
//! package fails them, saying to run `cargo xtask package`.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use lb_tests::{netns::Netns, require_root};

/// The cached clean root and the .debs apt fetched into it.
const CACHE: &str = "/var/cache/lb-package-test";
/// Where debootstrap fetches Debian 12 (`LB_DEBIAN_MIRROR` overrides it).
const MIRROR: &str = "http://deb.debian.org/debian";

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is in the workspace")
        .to_path_buf()
}

/// The package to test: `LB_PACKAGE`, else this version's in
/// target/package.
fn package() -> PathBuf {
    let deb = match std::env::var_os("LB_PACKAGE") {
        // A relative path is the workspace's (tests run in tests/).
        Some(p) => workspace().join(p),
        None => workspace().join(format!(
            "target/package/lb_{}_amd64.deb",
            env!("CARGO_PKG_VERSION")
        )),
    };
    let meta = std::fs::metadata(&deb).unwrap_or_else(|e| {
        panic!(
            "the package {}: {e}: run `cargo xtask package` first (`cargo xtask test` does)",
            deb.display()
        )
    });
    let age = meta.modified().unwrap().elapsed().unwrap_or_default();
    println!(
        "package: {} ({:.1} MiB, built {:.0} s ago)",
        deb.display(),
        meta.len() as f64 / (1024.0 * 1024.0),
        age.as_secs_f64()
    );
    deb
}

/// Runs `cmd`, printing its output; returns (success, stdout + stderr).
fn run(cmd: &mut Command) -> (bool, String) {
    let started = Instant::now();
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!(
        "$ {cmd:?}  ({:.1} s, {})\n{text}",
        started.elapsed().as_secs_f64(),
        out.status
    );
    (out.status.success(), text)
}

#[test]
fn lintian_reports_no_errors() {
    let deb = package();
    let (_, text) = run(Command::new("lintian")
        .args(["--display-info", "--no-tag-display-limit"])
        .arg(&deb));
    let errors: Vec<&str> = text.lines().filter(|l| l.starts_with("E: ")).collect();
    let warnings = text.lines().filter(|l| l.starts_with("W: ")).count();
    println!(
        "lintian: {} errors, {warnings} warnings ({:.1} MiB package)",
        errors.len(),
        std::fs::metadata(&deb).unwrap().len() as f64 / (1024.0 * 1024.0)
    );
    assert!(errors.is_empty(), "lintian errors:\n{}", errors.join("\n"));
}

/// A directory removed on drop.
struct Tree(PathBuf);

impl Tree {
    fn new(name: &str) -> Tree {
        let dir = workspace()
            .join("target/package")
            .join(format!("{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.parent().unwrap()).unwrap();
        Tree(dir)
    }
}

impl Drop for Tree {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// An exclusive hold on [`CACHE`] (its clean root, apt's archives there)
/// for as long as the returned file is open: the package test of another
/// worktree on this host waits for it.
fn lock_cache() -> std::fs::File {
    use std::os::fd::AsRawFd;
    std::fs::create_dir_all(CACHE).unwrap();
    let file = std::fs::File::create(Path::new(CACHE).join("lock")).unwrap();
    let started = Instant::now();
    // SAFETY: flock on a file we own; released when the file closes.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
    assert_eq!(
        rc,
        0,
        "locking {CACHE}: {}",
        std::io::Error::last_os_error()
    );
    println!(
        "{CACHE}: locked after {:.1} s",
        started.elapsed().as_secs_f64()
    );
    file
}

/// The cached clean Debian 12 root, made with debootstrap if missing.
fn clean_root() -> PathBuf {
    let base = Path::new(CACHE).join("bookworm-minbase");
    if base.join("etc/debian_version").exists() {
        println!("clean root: cached in {}", base.display());
        return base;
    }
    let mirror = std::env::var("LB_DEBIAN_MIRROR").unwrap_or_else(|_| MIRROR.into());
    let partial = Path::new(CACHE).join("bookworm-minbase.partial");
    let _ = std::fs::remove_dir_all(&partial);
    std::fs::create_dir_all(CACHE).unwrap();
    let started = Instant::now();
    let (ok, text) = run(Command::new("debootstrap")
        .args(["--variant=minbase", "bookworm"])
        .arg(&partial)
        .arg(&mirror));
    assert!(
        ok,
        "debootstrap from {mirror} failed (is the mirror reachable?): {}",
        text.lines().rev().take(5).collect::<Vec<_>>().join("\n")
    );
    let (ok, _) = run(Command::new("chroot")
        .arg(&partial)
        .args(["apt-get", "update"]));
    assert!(ok, "apt-get update in the new root");
    std::fs::rename(&partial, &base).unwrap();
    println!(
        "clean root: made with debootstrap in {:.0} s, cached in {}",
        started.elapsed().as_secs_f64(),
        base.display()
    );
    base
}

/// A fresh copy of the clean root, removed on drop.
fn fresh_root() -> Tree {
    let base = clean_root();
    let root = Tree::new("debian12-root");
    let started = Instant::now();
    let (ok, _) = run(Command::new("cp").arg("-a").arg(&base).arg(&root.0));
    assert!(ok, "copying the clean root");
    println!(
        "fresh root copied in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    std::fs::copy("/etc/resolv.conf", root.0.join("etc/resolv.conf")).unwrap();
    root
}

/// Runs `script` (sh, `-eu`) chrooted into `root`, in a mount namespace of
/// its own (the mounts go with it), in `netns` if given, with `/dev` and
/// apt's download cache bound in.
fn in_root(root: &Path, netns: Option<&Netns>, script: &str) -> (bool, String) {
    let archives = Path::new(CACHE).join("apt-archives");
    std::fs::create_dir_all(archives.join("partial")).unwrap();
    std::fs::write(root.join("lbtest.sh"), script).unwrap();
    let outer = format!(
        "mount --bind /dev {r}/dev && mount --bind {a} {r}/var/cache/apt/archives && exec chroot {r} /bin/sh -eu /lbtest.sh",
        r = root.display(),
        a = archives.display()
    );
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns.name(), "unshare"]);
            c
        }
        None => Command::new("unshare"),
    };
    cmd.args(["--mount", "--propagation", "private", "sh", "-c", &outer])
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .env_remove("RUST_LOG");
    run(&mut cmd)
}

/// `setpriv` arguments that leave a process only the capabilities of the
/// unit's `CapabilityBoundingSet=` (and no new privileges).
fn unit_capabilities(unit: &str) -> String {
    let line = unit
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .expect("the unit sets CapabilityBoundingSet=");
    let caps: Vec<String> = line
        .split_whitespace()
        .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase()))
        .collect();
    format!(
        "setpriv --no-new-privs --inh-caps=-all --bounding-set=-all,{} --",
        caps.join(",")
    )
}

const TEST_CONFIG: &str = r#"# lbd on the package test's veth.
[balancer]
source_v4 = "10.203.0.1"

[api]
socket_group = "lb"

[[vip]]
address = "203.0.113.10"
port = 80
protocol = "tcp"
backends = [ { address = "10.203.0.2" } ]
"#;

#[test]
fn the_package_installs_and_runs_on_a_clean_debian_12() {
    require_root();
    let started = Instant::now();
    let deb = package();
    let _cache = lock_cache();
    let root = fresh_root();
    let name = deb.file_name().unwrap().to_string_lossy().into_owned();
    std::fs::copy(&deb, root.0.join("root").join(&name)).unwrap();

    // Install, with the host's network (the dependencies come from the
    // mirror, or apt's cache from an earlier run).
    let (ok, text) = in_root(
        &root.0,
        None,
        r#"
mount -t proc proc /proc
echo "before: rustc $(command -v rustc || echo none), LLVM $(ls -d /usr/lib/llvm-* 2>/dev/null || echo none)"
printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d
export DEBIAN_FRONTEND=noninteractive
cd /root
apt-get install -y ./lb_*.deb || { apt-get update && apt-get install -y ./lb_*.deb; }
echo "installed: $(dpkg-query -W -f='${Package} ${Version} ${Status}' lb)"
echo "depends: $(dpkg-query -W -f='${Depends}' lb); recommends: $(dpkg-query -W -f='${Recommends}' lb)"
echo "bird2: $(dpkg-query -W -f='${Status}' bird2)"
lbctl --version
lbd --version
echo "group: $(getent group lb)"
echo "after: rustc $(command -v rustc || echo none), LLVM $(ls -d /usr/lib/llvm-* 2>/dev/null || echo none)"
ls -l /usr/sbin/lbd /usr/bin/lbctl /lib/systemd/system/lbd@.service /etc/lb/lbd.toml /usr/share/man/man8/lbd.8.gz /usr/share/man/man1/lbctl.1.gz /usr/share/man/man8/lbd-decap.8.gz /usr/share/man/man1/lbctl-vip-add.1.gz /usr/share/bash-completion/completions/lbctl /usr/share/zsh/vendor-completions/_lbctl /usr/share/fish/vendor_completions.d/lbctl.fish
echo "man pages: $(ls /usr/share/man/man1/lbctl*.1.gz | wc -l) of lbctl, $(ls /usr/share/man/man8/lbd*.8.gz | wc -l) of lbd"
# Every subcommand lbctl(1) lists has its page.
for page in $(zcat /usr/share/man/man1/lbctl.1.gz | sed -n 's/^lbctl\\-\([a-z]*\)(1)$/\1/p'); do
    test -e "/usr/share/man/man1/lbctl-$page.1.gz" || echo "missing man page lbctl-$page(1)"
done
bash -c '. /usr/share/bash-completion/completions/lbctl && complete -p lbctl'
# The unit, checked by systemd's own verifier on the installed system
# (offline: systemd is installed for it, not started; man pages are
# checked above).
apt-get install -y --no-install-recommends systemd > /dev/null || { apt-get update > /dev/null && apt-get install -y --no-install-recommends systemd > /dev/null; }
if systemd-analyze verify --man=no lbd@pkgtest.service > /tmp/verify.txt 2>&1; then echo "systemd-analyze verify: ok"; else echo "systemd-analyze verify: FAILED"; fi
echo "systemd-analyze verify said $(wc -l < /tmp/verify.txt) lines:"
cat /tmp/verify.txt
# The verifier does refuse a broken copy (a bad value, a missing binary).
sed -e 's/^Type=notify/Type=notifyy/' -e 's|^ExecStart=/usr/sbin/lbd |ExecStart=/usr/sbin/lbt-missing |' /lib/systemd/system/lbd@.service > /etc/systemd/system/lbt-broken@.service
if systemd-analyze verify --man=no lbt-broken@pkgtest.service > /tmp/broken.txt 2>&1; then echo "broken unit: passed"; else echo "broken unit: refused"; fi
cat /tmp/broken.txt
rm /etc/systemd/system/lbt-broken@.service
"#,
    );
    assert!(ok, "installing the package failed");
    assert!(
        !text.contains("missing man page"),
        "a subcommand without its man page"
    );
    for needle in [
        "install ok installed",
        "lbctl 0.",
        "lbd 0.",
        "group: lb:x:",
        "bird2: install ok installed",
        "after: rustc none, LLVM none",
        "systemd-analyze verify: ok",
        "-F _lbctl lbctl",
        "systemd-analyze verify said 0 lines:",
        "broken unit: refused",
        "notifyy",
        "lbt-missing",
    ] {
        assert!(text.contains(needle), "{needle:?} missing");
    }

    // Run it, in a namespace of the test's own with a veth pair.
    let ns = Netns::new("pkg").unwrap();
    ns.ip(&["link", "add", "lb0", "type", "veth", "peer", "name", "lb1"])
        .unwrap();
    ns.ip(&["addr", "add", "10.203.0.1/24", "dev", "lb0"])
        .unwrap();
    ns.ip(&["link", "set", "lb0", "up"]).unwrap();
    ns.ip(&["link", "set", "lb1", "up"]).unwrap();
    std::fs::write(root.0.join("etc/lb/pkgtest.toml"), TEST_CONFIG).unwrap();
    let unit = std::fs::read_to_string(root.0.join("lib/systemd/system/lbd@.service")).unwrap();
    let caps = unit_capabilities(&unit);
    // The same package as a newer version, to upgrade to.
    let tree = Tree::new("upgrade-tree");
    let (ok, _) = run(Command::new("dpkg-deb").arg("-R").arg(&deb).arg(&tree.0));
    assert!(ok, "unpacking the package");
    let control = tree.0.join("DEBIAN/control");
    let text = std::fs::read_to_string(&control).unwrap();
    let version = text
        .lines()
        .find_map(|l| l.strip_prefix("Version: "))
        .expect("a Version")
        .to_string();
    let newer = format!("{version}+upgradetest1");
    std::fs::write(
        &control,
        text.replace(
            &format!("Version: {version}\n"),
            &format!("Version: {newer}\n"),
        ),
    )
    .unwrap();
    let (ok, _) = run(Command::new("dpkg-deb")
        .args(["--root-owner-group", "-b"])
        .arg(&tree.0)
        .arg(root.0.join("root/lb_upgrade.deb")));
    assert!(ok, "building the newer package");
    let script = format!(
        r#"
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t bpf bpf /sys/fs/bpf
mount -t tmpfs tmpfs /run
# Whatever fails below, no lbd outlives the script.
pid=""
trap '[ -z "$pid" ] || kill -9 $pid 2>/dev/null || true' EXIT
lbd --check --config /etc/lb/lbd.toml
start_lbd() {{
    {caps} lbd --config /etc/lb/pkgtest.toml --instance pkgtest --iface lb0 --xdp-mode skb >> /var/log/lbd-test.log 2>&1 &
    pid=$!
    for i in $(seq 150); do
        lbctl --instance pkgtest status > /dev/null 2>&1 && return 0
        kill -0 $pid 2>/dev/null || {{ cat /var/log/lbd-test.log; return 1; }}
        sleep 0.1
    done
    cat /var/log/lbd-test.log; return 1
}}
stop_lbd() {{ kill -TERM $pid; wait $pid && echo "lbd exited 0 on SIGTERM"; }}
start_lbd
grep Cap /proc/$pid/status
lbctl --instance pkgtest vip list
stat -c 'socket %a %U:%G' /run/lb/pkgtest.sock
echo "attached: $(ip -d link show lb0 | grep -o 'xdpgeneric' | head -1)"
# A member of group lb may use the socket (and is audited by uid); anyone
# else may not.
useradd --uid 4242 --groups lb lbt-operator
useradd --uid 4343 lbt-stranger
setpriv --reuid 4242 --regid 4242 --init-groups lbctl --instance pkgtest backend add 203.0.113.10:80/tcp 10.203.0.3
if setpriv --reuid 4343 --regid 4343 --init-groups lbctl --instance pkgtest status; then echo "stranger let in"; else echo "stranger refused: exit $?"; fi
grep -o '"caller":"uid=4242[^"]*","role":"admin"' /var/log/lb/pkgtest-audit.log | head -1
stop_lbd
echo "after stop: $(ip -d link show lb0 | grep -o 'xdpgeneric' | head -1) pinned $(ls /sys/fs/bpf/pkgtest | wc -l)"
start_lbd
echo "adopted: $(grep -c 'balancer program replaced on the existing attachment' /var/log/lbd-test.log)"
lbctl --instance pkgtest backend list 203.0.113.10:80/tcp
# An upgrade while lbd runs: the package's scripts leave the running
# instance and its data plane alone (prerm cleans up on removal only), and
# the new lbd adopts the state.
export DEBIAN_FRONTEND=noninteractive
apt-get install -y /root/lb_upgrade.deb
echo "upgraded to $(dpkg-query -W -f='${{Version}}' lb); lbd runs: $(kill -0 $pid && echo yes); $(ip -d link show lb0 | grep -o 'xdpgeneric' | head -1) pinned $(ls /sys/fs/bpf/pkgtest | wc -l)"
stop_lbd
start_lbd
echo "adopted: $(grep -c 'balancer program replaced on the existing attachment' /var/log/lbd-test.log)"
lbctl --instance pkgtest backend list 203.0.113.10:80/tcp | grep -c '^10.203.0' | sed 's/^/backends after the upgrade: /'
# A rollback to the first package, of the same layout: the older lbd
# adopts the state too.
stop_lbd
apt-get install -y --allow-downgrades /root/{name}
echo "rolled back to $(dpkg-query -W -f='${{Version}}' lb)"
start_lbd
echo "adopted: $(grep -c 'balancer program replaced on the existing attachment' /var/log/lbd-test.log)"
stop_lbd
apt-get remove -y lb
echo "after remove: pinned $(ls /sys/fs/bpf | grep -c pkgtest || true), xdp $(ip -d link show lb0 | grep -c xdpgeneric || true)"
apt-get purge -y lb
echo "after purge: $(ls -d /var/log/lb 2>/dev/null || echo 'no /var/log/lb'), $(ls /etc/lb)"
"#
    );
    let (ok, text) = in_root(&root.0, Some(&ns), &script);
    assert!(ok, "running the installed package failed");
    let upgraded = format!("upgraded to {newer}; lbd runs: yes; xdpgeneric pinned");
    let rolled_back = format!("rolled back to {version}\n");
    for needle in [
        "/etc/lb/lbd.toml: ok (2 VIPs, 5 backends)",
        "socket 660 root:lb",
        "attached: xdpgeneric",
        "added backend 10.203.0.3",
        "stranger refused: exit 4",
        "\"caller\":\"uid=4242",
        "lbd exited 0 on SIGTERM",
        "after stop: xdpgeneric pinned",
        "adopted: 1",
        "10.203.0.3",
        upgraded.as_str(),
        "adopted: 2",
        "backends after the upgrade: 2",
        rolled_back.as_str(),
        "adopted: 3",
        "taking balancer instance pkgtest out: lbd --cleanup",
        "after remove: pinned 0, xdp 0",
        "after purge: no /var/log/lb",
    ] {
        assert!(text.contains(needle), "{needle:?} missing");
    }
    println!(
        "package test: {:.0} s in all",
        started.elapsed().as_secs_f64()
    );
}
