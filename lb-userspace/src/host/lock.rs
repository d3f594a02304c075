//! One owner per instance: `lbd` holds a lock on `/run/lb/INSTANCE.lock`
//! for as long as it runs, so a second `lbd` with the same `--instance`
//! cannot adopt the pinned state (and steer the running data plane) while
//! the first one still thinks it owns it.
//!
//! The lock is an open-file-description lock (`F_OFD_SETLK`): it belongs
//! to the open file, so the kernel releases it when the process exits in
//! any way, SIGKILL and crashes included, and a child that `lbd` starts
//! (BIRD) does not inherit it (the file is opened close-on-exec). The
//! holder writes its PID into the file, which is how a refused `lbd` and
//! the BGP guard name it; [`holder`] tests the lock without taking it.

use std::{
    fs::{File, OpenOptions},
    io::{Read, Seek, Write},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
};

/// Where instance locks live (also the default home of the API socket).
pub const LOCK_DIR: &str = "/run/lb";

/// The lock file of instance `name`.
pub fn lock_path(name: &str) -> PathBuf {
    Path::new(LOCK_DIR).join(format!("{name}.lock"))
}

/// Why the lock was not taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "another lbd (pid {pid}) runs instance {instance}: it owns the pinned data plane; \
         stop it first, or give this one another --instance (lock {path})"
    )]
    Held {
        instance: String,
        pid: String,
        path: String,
    },
    #[error("cannot use the instance lock {path}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// The held lock of an instance; released when dropped or when the process
/// ends.
#[derive(Debug)]
pub struct InstanceLock {
    _file: File,
    path: PathBuf,
}

fn flock(kind: libc::c_short) -> libc::flock {
    // SAFETY: a plain C struct; all-zero is a valid value.
    let mut l: libc::flock = unsafe { std::mem::zeroed() };
    l.l_type = kind;
    l.l_whence = libc::SEEK_SET as libc::c_short;
    l
}

fn open(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o644)
        .open(path)
}

fn recorded_pid(file: &mut File) -> String {
    let mut s = String::new();
    let _ = file.rewind().and_then(|()| file.read_to_string(&mut s));
    match s.trim() {
        "" => "unknown".to_string(),
        pid => pid.to_string(),
    }
}

impl InstanceLock {
    /// Takes the lock of instance `name` at [`lock_path`].
    pub fn acquire(name: &str) -> Result<InstanceLock, LockError> {
        Self::acquire_at(name, &lock_path(name))
    }

    /// Takes the lock of instance `name` at `path`; refuses, naming the
    /// holder's PID, if another process holds it.
    pub fn acquire_at(name: &str, path: &Path) -> Result<InstanceLock, LockError> {
        let io = |source| LockError::Io {
            path: path.display().to_string(),
            source,
        };
        let mut file = open(path).map_err(io)?;
        let l = flock(libc::F_WRLCK as libc::c_short);
        // SAFETY: a valid fd and a valid flock struct.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &l) } != 0 {
            let e = std::io::Error::last_os_error();
            if matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EACCES)) {
                return Err(LockError::Held {
                    instance: name.to_string(),
                    pid: recorded_pid(&mut file),
                    path: path.display().to_string(),
                });
            }
            return Err(io(e));
        }
        file.set_len(0).map_err(io)?;
        file.rewind().map_err(io)?;
        writeln!(file, "{}", std::process::id()).map_err(io)?;
        file.sync_data().map_err(io)?;
        Ok(InstanceLock {
            _file: file,
            path: path.to_path_buf(),
        })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The PID recorded by the process holding the lock at `path`, if one
/// holds it (`Some("unknown")` if it has not written its PID yet). Does not
/// take the lock.
pub fn holder(path: &Path) -> std::io::Result<Option<String>> {
    let mut file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut l = flock(libc::F_WRLCK as libc::c_short);
    // SAFETY: a valid fd and a valid flock struct, which F_OFD_GETLK fills.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut l) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if l.l_type == libc::F_UNLCK as libc::c_short {
        return Ok(None);
    }
    Ok(Some(recorded_pid(&mut file)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_owner_is_refused_with_the_first_ones_pid_and_dropping_releases() {
        let dir = std::env::temp_dir().join(format!("lb-lock-test-{}", std::process::id()));
        let path = dir.join("x.lock");
        let first = InstanceLock::acquire_at("x", &path).unwrap();
        assert_eq!(
            holder(&path).unwrap().as_deref(),
            Some(std::process::id().to_string().as_str())
        );
        // OFD locks conflict between two opens even in one process.
        let e = InstanceLock::acquire_at("x", &path).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains(&format!("pid {}", std::process::id())) && msg.contains("instance x"),
            "{msg}"
        );
        drop(first);
        assert_eq!(holder(&path).unwrap(), None);
        let again = InstanceLock::acquire_at("x", &path).unwrap();
        drop(again);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
