//! One daemon per user, and the socket file's life cycle.
//!
//! The lock is an exclusive `flock` on `<run dir>/tilewised.lock`, which holds the owner's pid as
//! text. The kernel releases it when the process dies, so a crashed daemon never blocks the next.
//! A socket file left behind by a crash is removed only when connecting to it is refused (nobody
//! listens); a socket that answers is someone else's and is never touched.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Held for the daemon's whole life; dropping it releases the lock.
#[derive(Debug)]
pub struct InstanceLock {
    _file: File,
    path: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum InstanceError {
    #[error("tilewised is already running{} (lock {} is held); stop it with `tilewise daemon stop`",
            .pid.map(|p| format!(" as pid {p}")).unwrap_or_default(), .lock.display())]
    AlreadyRunning { pid: Option<u32>, lock: PathBuf },
    #[error("cannot use lock file {}: {source}", .lock.display())]
    Lock { lock: PathBuf, source: io::Error },
    #[error("a process is already serving on {} although the lock was free; refusing to displace it", .socket.display())]
    SocketInUse { socket: PathBuf },
    #[error("cannot remove the stale socket {}: {source}", .socket.display())]
    Stale { socket: PathBuf, source: io::Error },
}

impl InstanceLock {
    /// Takes the lock without waiting, writing this process's pid into the file.
    pub fn acquire(path: &Path) -> Result<InstanceLock, InstanceError> {
        let err = |source| InstanceError::Lock { lock: path.to_path_buf(), source };
        let mut file = OpenOptions::new().read(true).write(true).create(true).truncate(false).mode(0o600).open(path).map_err(err)?;
        // SAFETY: flock on a valid, owned descriptor.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                return Err(InstanceError::AlreadyRunning { pid: read_pid(&mut file), lock: path.to_path_buf() });
            }
            return Err(err(e));
        }
        file.set_len(0).map_err(err)?;
        file.rewind().map_err(err)?;
        write!(file, "{}", std::process::id()).map_err(err)?;
        file.flush().map_err(err)?;
        Ok(InstanceLock { _file: file, path: path.to_path_buf() })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn read_pid(file: &mut File) -> Option<u32> {
    let mut s = String::new();
    file.rewind().ok()?;
    file.read_to_string(&mut s).ok()?;
    s.trim().parse().ok()
}

/// The pid written in a lock file (whether or not its owner still runs).
pub fn lock_holder(path: &Path) -> Option<u32> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Removes a socket file nobody listens on. Call it only while holding the [`InstanceLock`].
/// Returns whether a stale file was removed.
pub fn clear_stale_socket(socket: &Path) -> Result<bool, InstanceError> {
    if fs::symlink_metadata(socket).is_err() {
        return Ok(false);
    }
    match std::os::unix::net::UnixStream::connect(socket) {
        Ok(_) => Err(InstanceError::SocketInUse { socket: socket.to_path_buf() }),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            fs::remove_file(socket).map_err(|source| InstanceError::Stale { socket: socket.to_path_buf(), source })?;
            Ok(true)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(InstanceError::Stale { socket: socket.to_path_buf(), source }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_lock_names_the_holder() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("tilewised.lock");
        let held = InstanceLock::acquire(&path).unwrap();
        let err = InstanceLock::acquire(&path).unwrap_err();
        assert!(matches!(err, InstanceError::AlreadyRunning { pid: Some(p), .. } if p == std::process::id()));
        assert!(err.to_string().contains("already running as pid"), "{err}");
        drop(held);
        InstanceLock::acquire(&path).expect("released on drop");
    }

    #[test]
    fn stale_socket_is_removed_live_one_is_not() {
        let tmp = tempfile::tempdir().unwrap();
        let sock = tmp.path().join("s.sock");
        assert!(!clear_stale_socket(&sock).unwrap());
        {
            let _l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
            assert!(matches!(clear_stale_socket(&sock), Err(InstanceError::SocketInUse { .. })));
        }
        // The listener is gone, the file stays: stale.
        assert!(sock.exists());
        assert!(clear_stale_socket(&sock).unwrap());
        assert!(!sock.exists());
    }
}
