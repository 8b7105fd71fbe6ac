//! Where tilewise keeps its files.
//!
//! One variable, `TILEWISE_HOME`, relocates everything (data, config, database, logs, socket, lock,
//! synthesized models) so that every test runs in its own temp dir and nothing touches the user's real
//! files. Without it the platform's conventions apply (through `directories`):
//!
//! | what | `TILEWISE_HOME` set | Linux | macOS |
//! | --- | --- | --- | --- |
//! | data (db, models) | `$H` | `$XDG_DATA_HOME/tilewise` | `~/Library/Application Support/tilewise` |
//! | config file | `$H/config.toml` | `$XDG_CONFIG_HOME/tilewise/config.toml` | `<data>/config.toml` |
//! | logs | `$H/logs` | `<data>/logs` | `~/Library/Logs/tilewise` |
//! | socket dir (0700) | `$H/run` | `$XDG_RUNTIME_DIR/tilewise`, else `<data>/run` | `<data>/run` |
//!
//! The socket is never placed under `/tmp` or `$TMPDIR` (see docs/protocol.md). `TILEWISE_SOCKET`
//! overrides the socket path for clients only; the daemon always serves at [`Paths::socket`].

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Environment variable that relocates every file tilewise uses.
pub const HOME_ENV: &str = "TILEWISE_HOME";
/// Environment variable that points clients at another socket (the daemon ignores it).
pub const SOCKET_ENV: &str = "TILEWISE_SOCKET";
/// File name of the socket inside [`Paths::run_dir`].
pub const SOCKET_NAME: &str = "tilewised.sock";
/// File name of the single-instance lock inside [`Paths::run_dir`].
pub const LOCK_NAME: &str = "tilewised.lock";

/// Every location tilewise reads or writes. Build it once with [`Paths::from_env`] (or
/// [`Paths::under_home`] in tests) and pass it around; nothing else computes paths.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Paths {
    /// `TILEWISE_HOME` when set, else `None` (platform conventions in effect).
    pub home: Option<PathBuf>,
    /// Long-lived data: the database and synthesized models.
    pub data_dir: PathBuf,
    /// The config file (may not exist: defaults apply).
    pub config_file: PathBuf,
    /// SQLite database.
    pub db_file: PathBuf,
    /// Daemon log files.
    pub logs_dir: PathBuf,
    /// Directory of the socket and the lock, created with mode 0700.
    pub run_dir: PathBuf,
    /// The daemon's socket.
    pub socket: PathBuf,
    /// Exclusive lock held by the running daemon; holds its pid as text.
    pub lock_file: PathBuf,
    /// Synthesized models (the worker writes them here; `TILEWISE_MODELS_DIR` overrides it there).
    pub models_dir: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum PathsError {
    #[error("cannot find a home directory for tilewise's files: set {HOME_ENV} to a directory")]
    NoHome,
    #[error("cannot create {path}: {source}")]
    Create { path: PathBuf, source: io::Error },
    #[error("{path} is owned by uid {owner}, not by this user (uid {me}); refusing to put the socket there")]
    NotOwned { path: PathBuf, owner: u32, me: u32 },
}

impl Paths {
    /// Locations from the environment: `TILEWISE_HOME` if set (and non-empty), else the platform's.
    pub fn from_env() -> Result<Paths, PathsError> {
        match std::env::var_os(HOME_ENV).filter(|v| !v.is_empty()) {
            Some(home) => Ok(Paths::under_home(absolute(PathBuf::from(home)))),
            None => Paths::platform(),
        }
    }

    /// Everything under one directory (what `TILEWISE_HOME` does).
    pub fn under_home(home: impl Into<PathBuf>) -> Paths {
        let home = home.into();
        let run_dir = home.join("run");
        Paths {
            data_dir: home.clone(),
            config_file: home.join("config.toml"),
            db_file: home.join("tilewise.db"),
            logs_dir: home.join("logs"),
            socket: run_dir.join(SOCKET_NAME),
            lock_file: run_dir.join(LOCK_NAME),
            run_dir,
            models_dir: home.join("models"),
            home: Some(home),
        }
    }

    fn platform() -> Result<Paths, PathsError> {
        let dirs = directories::ProjectDirs::from("", "", "tilewise").ok_or(PathsError::NoHome)?;
        let data_dir = dirs.data_dir().to_path_buf();
        // Linux: $XDG_RUNTIME_DIR/tilewise (per-user tmpfs, 0700 by the system); macOS has no
        // runtime dir, and $TMPDIR is ruled out by the socket rules, so the data dir is used.
        let run_dir = match dirs.runtime_dir() {
            Some(rt) if cfg!(target_os = "linux") => rt.to_path_buf(),
            _ => data_dir.join("run"),
        };
        let logs_dir = if cfg!(target_os = "macos") {
            directories::BaseDirs::new().map(|b| b.home_dir().join("Library/Logs/tilewise")).unwrap_or_else(|| data_dir.join("logs"))
        } else {
            data_dir.join("logs")
        };
        Ok(Paths {
            home: None,
            config_file: dirs.config_dir().join("config.toml"),
            db_file: data_dir.join("tilewise.db"),
            logs_dir,
            socket: run_dir.join(SOCKET_NAME),
            lock_file: run_dir.join(LOCK_NAME),
            run_dir,
            models_dir: data_dir.join("models"),
            data_dir,
        })
    }

    /// The socket a client should connect to: `TILEWISE_SOCKET` if set, else [`Paths::socket`].
    pub fn client_socket(&self) -> PathBuf {
        std::env::var_os(SOCKET_ENV).filter(|v| !v.is_empty()).map(PathBuf::from).unwrap_or_else(|| self.socket.clone())
    }

    /// Creates the data, logs and models dirs, and the run dir with mode 0700 (tightened if it
    /// already exists with looser bits). Refuses a run dir owned by someone else.
    pub fn ensure_dirs(&self) -> Result<(), PathsError> {
        for dir in [&self.data_dir, &self.logs_dir, &self.models_dir] {
            fs::create_dir_all(dir).map_err(|source| PathsError::Create { path: dir.clone(), source })?;
        }
        if let Some(parent) = self.config_file.parent() {
            fs::create_dir_all(parent).map_err(|source| PathsError::Create { path: parent.to_path_buf(), source })?;
        }
        ensure_private_dir(&self.run_dir)
    }
}

/// Creates `dir` (and parents) so that `dir` itself is mode 0700 and owned by this user.
pub fn ensure_private_dir(dir: &Path) -> Result<(), PathsError> {
    let create = |source| PathsError::Create { path: dir.to_path_buf(), source };
    if let Some(parent) = dir.parent() {
        fs::create_dir_all(parent).map_err(create)?;
    }
    match fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(create(e)),
    }
    let meta = fs::metadata(dir).map_err(create)?;
    let me = unsafe { libc::geteuid() };
    use std::os::unix::fs::MetadataExt;
    if meta.uid() != me {
        return Err(PathsError::NotOwned { path: dir.to_path_buf(), owner: meta.uid(), me });
    }
    if meta.permissions().mode() & 0o777 != 0o700 {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(create)?;
    }
    Ok(())
}

fn absolute(p: PathBuf) -> PathBuf {
    if p.is_absolute() {
        p
    } else {
        std::env::current_dir().map(|cwd| cwd.join(&p)).unwrap_or(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn home_relocates_everything() {
        let p = Paths::under_home("/x/h");
        for path in [&p.data_dir, &p.config_file, &p.db_file, &p.logs_dir, &p.run_dir, &p.socket, &p.lock_file, &p.models_dir] {
            assert!(path.starts_with("/x/h"), "{} is outside TILEWISE_HOME", path.display());
        }
        assert_eq!(p.socket, PathBuf::from("/x/h/run/tilewised.sock"));
        assert_eq!(p.lock_file, PathBuf::from("/x/h/run/tilewised.lock"));
    }

    #[test]
    fn run_dir_is_created_private_and_tightened() {
        let tmp = tempfile::tempdir().unwrap();
        let p = Paths::under_home(tmp.path().join("home"));
        p.ensure_dirs().unwrap();
        let mode = |d: &Path| fs::metadata(d).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&p.run_dir), 0o700);
        assert!(p.models_dir.is_dir() && p.logs_dir.is_dir());
        fs::set_permissions(&p.run_dir, fs::Permissions::from_mode(0o755)).unwrap();
        p.ensure_dirs().unwrap();
        assert_eq!(mode(&p.run_dir), 0o700);
    }

    #[test]
    fn platform_paths_never_use_tmp() {
        // Only meaningful where a home exists; CI machines have one.
        if let Ok(p) = Paths::platform() {
            assert!(!p.socket.starts_with("/tmp"), "{}", p.socket.display());
            assert!(p.socket.ends_with(SOCKET_NAME));
            assert!(p.home.is_none());
        }
    }
}
