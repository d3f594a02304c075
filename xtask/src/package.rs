//! `cargo xtask package`: the Debian package `target/package/lb_VERSION_amd64.deb`,
//! built with `dpkg-deb` from a tree staged here (no cargo subcommand).
//!
//! What goes in: `lbd` (`/usr/sbin`) and `lbctl` (`/usr/bin`), release
//! builds, stripped, the XDP objects embedded in them; their man pages
//! (`lbd man --dir`, `lbctl man --dir`: one per command and subcommand); shell completions for bash, zsh and fish
//! (`lbctl completions`); the `lbd@.service` unit; `examples/lbd.toml` as
//! the example config `/etc/lb/lbd.toml` (a conffile); the maintainer
//! scripts (the `lb` group, restarts on upgrade, clean-up on removal); the
//! copyright, a changelog, the README and docs/operations.md. The files it
//! takes from the tree are in `packaging/`. Dependencies: the shared
//! libraries the binaries link (from `dpkg-shlibdeps`), `iproute2` and
//! `ethtool` (lbd runs `ip` and `ethtool`); `bird2` is recommended (BGP).

use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use crate::{cargo, root, run};

/// Where the package and its staging tree go.
pub fn out_dir() -> PathBuf {
    root().join("target/package")
}

/// The package's version: the workspace's.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Builds the package; returns its path.
pub fn package() -> Result<PathBuf> {
    run(cargo().args(["build", "--release", "-p", "lb-userspace", "--bins"]))?;
    let release = root().join("target/release");
    let stage = out_dir().join("stage");
    if stage.exists() {
        fs::remove_dir_all(&stage).with_context(|| format!("removing {}", stage.display()))?;
    }
    let packaging = root().join("packaging");
    for (bin, dir) in [("lbd", "usr/sbin"), ("lbctl", "usr/bin")] {
        let to = install(&release.join(bin), &stage, &format!("{dir}/{bin}"), 0o755)?;
        run(Command::new("strip").arg("--strip-unneeded").arg(&to))?;
    }
    // Man pages: lbd(8), a daemon; lbctl(1), for anyone in group lb; and
    // a page for every subcommand (lbd-decap(8), lbctl-vip-add(1), ...),
    // as the commands' own pages list them.
    let pages = out_dir().join("man");
    for (bin, section) in [("lbd", "8"), ("lbctl", "1")] {
        let dir = pages.join(section);
        if dir.exists() {
            fs::remove_dir_all(&dir)?;
        }
        run(Command::new(release.join(bin))
            .args(["man", "--dir"])
            .arg(&dir))?;
        for entry in fs::read_dir(&dir)? {
            let page = entry?.path();
            let name = page
                .file_name()
                .expect("a file")
                .to_string_lossy()
                .into_owned();
            write_gz(
                &stage,
                &format!("usr/share/man/man{section}/{name}.gz"),
                &fs::read(&page)?,
            )?;
        }
    }
    fs::remove_dir_all(&pages)?;
    for (shell, path) in [
        ("bash", "usr/share/bash-completion/completions/lbctl"),
        ("zsh", "usr/share/zsh/vendor-completions/_lbctl"),
        ("fish", "usr/share/fish/vendor_completions.d/lbctl.fish"),
    ] {
        let text = output(Command::new(release.join("lbctl")).args(["completions", shell]))?;
        write(&stage, path, &text, 0o644)?;
    }
    install(
        &packaging.join("lbd@.service"),
        &stage,
        "lib/systemd/system/lbd@.service",
        0o644,
    )?;
    install(
        &root().join("examples/lbd.toml"),
        &stage,
        "etc/lb/lbd.toml",
        0o644,
    )?;
    let doc = "usr/share/doc/lb";
    install(
        &packaging.join("copyright"),
        &stage,
        &format!("{doc}/copyright"),
        0o644,
    )?;
    install(
        &root().join("README.md"),
        &stage,
        &format!("{doc}/README.md"),
        0o644,
    )?;
    install(
        &root().join("docs/operations.md"),
        &stage,
        &format!("{doc}/operations.md"),
        0o644,
    )?;
    write_gz(
        &stage,
        &format!("{doc}/changelog.gz"),
        changelog()?.as_bytes(),
    )?;

    for script in ["postinst", "prerm", "postrm"] {
        install(
            &packaging.join(script),
            &stage,
            &format!("DEBIAN/{script}"),
            0o755,
        )?;
    }
    write(&stage, "DEBIAN/conffiles", b"/etc/lb/lbd.toml\n", 0o644)?;
    write(&stage, "DEBIAN/md5sums", md5sums(&stage)?.as_bytes(), 0o644)?;
    let control = fs::read_to_string(packaging.join("control"))?
        .replace("@VERSION@", VERSION)
        .replace("@INSTALLED_SIZE@", &installed_size_kib(&stage)?.to_string())
        .replace(
            "@SHLIBS@",
            &shlib_depends(&[stage.join("usr/sbin/lbd"), stage.join("usr/bin/lbctl")])?,
        );
    write(&stage, "DEBIAN/control", control.as_bytes(), 0o644)?;
    set_dir_modes(&stage)?;

    let deb = out_dir().join(format!("lb_{VERSION}_amd64.deb"));
    run(Command::new("dpkg-deb")
        .args(["--root-owner-group", "-Zxz", "--build"])
        .arg(&stage)
        .arg(&deb))?;
    let size = fs::metadata(&deb)?.len();
    println!(
        "package: {} ({:.1} MiB)",
        deb.display(),
        size as f64 / (1024.0 * 1024.0)
    );
    Ok(deb)
}

/// Copies `from` to `stage/to` with `mode`; returns the new path.
fn install(from: &Path, stage: &Path, to: &str, mode: u32) -> Result<PathBuf> {
    let data = fs::read(from).with_context(|| format!("reading {}", from.display()))?;
    write(stage, to, &data, mode)
}

fn write(stage: &Path, to: &str, data: &[u8], mode: u32) -> Result<PathBuf> {
    let path = stage.join(to);
    fs::create_dir_all(path.parent().expect("a file in a directory"))?;
    fs::write(&path, data).with_context(|| format!("writing {}", path.display()))?;
    fs::set_permissions(&path, fs::Permissions::from_mode(mode))?;
    Ok(path)
}

/// `data` compressed as Debian wants it: `gzip -9n` (no name, no time).
fn write_gz(stage: &Path, to: &str, data: &[u8]) -> Result<PathBuf> {
    use std::io::Write;
    let mut gzip = Command::new("gzip")
        .args(["-9n", "-c"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("running gzip")?;
    gzip.stdin.take().expect("piped").write_all(data)?;
    let out = gzip.wait_with_output()?;
    if !out.status.success() {
        bail!("gzip failed: {}", out.status);
    }
    write(stage, to, &out.stdout, 0o644)
}

/// A command's standard output; fails if it fails.
fn output(cmd: &mut Command) -> Result<Vec<u8>> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out.stdout)
}

/// Every directory 0755 (the tree's umask must not leak into the package).
fn set_dir_modes(dir: &Path) -> Result<()> {
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755))?;
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            set_dir_modes(&entry.path())?;
        }
    }
    Ok(())
}

/// Every regular file below `dir`, relative to it, sorted.
fn files(dir: &Path, prefix: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let rel = prefix.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            files(&entry.path(), &rel, out)?;
        } else {
            out.push(rel);
        }
    }
    out.sort();
    Ok(())
}

/// `DEBIAN/md5sums`: every file but the control area's and the conffiles
/// (dpkg tracks those itself).
fn md5sums(stage: &Path) -> Result<String> {
    let mut all = Vec::new();
    files(stage, Path::new(""), &mut all)?;
    let mut text = String::new();
    for rel in all
        .iter()
        .filter(|r| !r.starts_with("DEBIAN") && !r.starts_with("etc"))
    {
        let out = output(Command::new("md5sum").arg(stage.join(rel)))?;
        let sum = String::from_utf8_lossy(&out);
        let sum = sum
            .split_whitespace()
            .next()
            .context("md5sum printed nothing")?;
        text += &format!("{sum}  {}\n", rel.display());
    }
    Ok(text)
}

fn installed_size_kib(stage: &Path) -> Result<u64> {
    let mut all = Vec::new();
    files(stage, Path::new(""), &mut all)?;
    let mut bytes = 0;
    for rel in all.iter().filter(|r| !r.starts_with("DEBIAN")) {
        bytes += fs::metadata(stage.join(rel))?.len().div_ceil(1024) * 1024;
    }
    Ok(bytes / 1024)
}

/// The `Depends` of the shared libraries `binaries` link, as
/// `dpkg-shlibdeps` works them out (it wants a `debian/control` beside it).
fn shlib_depends(binaries: &[PathBuf]) -> Result<String> {
    let dir = out_dir().join("shlibdeps");
    fs::create_dir_all(dir.join("debian"))?;
    fs::write(
        dir.join("debian/control"),
        "Source: lb\n\nPackage: lb\nArchitecture: any\n",
    )?;
    let out = output(
        Command::new("dpkg-shlibdeps")
            .arg("-O")
            .args(binaries)
            .current_dir(&dir),
    )?;
    let text = String::from_utf8_lossy(&out);
    let depends = text
        .lines()
        .find_map(|l| l.strip_prefix("shlibs:Depends="))
        .with_context(|| format!("dpkg-shlibdeps printed no shlibs:Depends: {text}"))?
        .trim()
        .to_string();
    fs::remove_dir_all(&dir)?;
    Ok(depends)
}

/// A Debian changelog of this one version, dated by the last commit.
fn changelog() -> Result<String> {
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .current_dir(root())
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let commit = git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".into());
    let date = match git(&["log", "-1", "--format=%aD"]) {
        Some(d) => d,
        None => String::from_utf8_lossy(&output(Command::new("date").arg("-R"))?)
            .trim()
            .to_string(),
    };
    Ok(format!(
        "lb ({VERSION}) unstable; urgency=medium\n\n  * Built from commit {commit}.\n\n -- lb developers <lb@lb.invalid>  {date}\n"
    ))
}
