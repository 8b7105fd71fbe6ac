//! The store: one SQLite database (WAL) holding everything tilewise learns on this machine.
//!
//! Tables (see `schema.rs`): devices, models, sessions, candidates, measurements + samples (every
//! raw timing), the shape memo, best (one row per device/model/mlx/backend) + best_history, events,
//! worker_failures.
//!
//! # Using it
//!
//! [`Store`] is a plain synchronous handle around one connection (`Send`, not `Sync`). Each component
//! may open its own handle on the same file — WAL lets readers and one writer proceed together and a
//! 5 s busy timeout absorbs short write overlaps — or share one behind a `Mutex`. From async code,
//! calls are short (tens of µs); wrap long scans in `spawn_blocking`.
//!
//! ```no_run
//! # use tilewise::store::*;
//! let store = Store::open(std::path::Path::new("/tmp/x/tilewise.db"))?;
//! let sid = store.create_session(&NewSession {
//!     device: "dev-fp".into(), model: "model-fp".into(), mlx: "0.32.4".into(), backend: "cpu".into(),
//!     seed: 7, budget: Budget { evaluations: Some(20), seconds: None },
//! })?;
//! # Ok::<(), StoreError>(())
//! ```
//!
//! Writes that belong together are one transaction: [`Store::record_measurement`] (measurement, all
//! samples, candidate status, session counter) and [`Store::promote`] (best, history, counter).
//!
//! A database written by a newer tilewise (higher `user_version`) is refused by [`Store::open`] with
//! [`StoreError::NewerSchema`] and left exactly as it was.

mod best;
mod catalog;
mod events;
mod measurements;
mod memo;
mod schema;
mod search;
mod sessions;

pub use best::{Best, BestKey, HistoryEntry, Promotion};
pub use catalog::{DeviceRecord, ModelRecord, NewWorkerFailure, WorkerFailure};
pub use events::Event;
pub use measurements::{Arm, Measurement, NewMeasurement, NewSample, Sample};
pub use memo::MemoEntry;
pub use schema::SCHEMA_VERSION;
pub use sessions::{
    Budget, Candidate, CandidateId, CandidateStatus, NewCandidate, NewSession, Session, SessionId, SessionState,
};

use rusqlite::{Connection, OpenFlags};
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "database {path} has schema version {found}, but this tilewise knows only up to {known}: \
         it was written by a newer tilewise. Upgrade tilewise, or point TILEWISE_HOME elsewhere; \
         the database was not modified"
    )]
    NewerSchema { path: PathBuf, found: u32, known: u32 },
    #[error("cannot open database {path}: {source}")]
    Open { path: PathBuf, source: rusqlite::Error },
    #[error("cannot migrate database {path}: {source}")]
    Migrate { path: PathBuf, source: rusqlite_migration::Error },
    #[error("{what} {id} not found")]
    NotFound { what: &'static str, id: String },
    #[error("invalid value for {field}: {message}")]
    Invalid { field: &'static str, message: String },
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("stored JSON is malformed: {0}")]
    Json(#[from] serde_json::Error),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// One handle shared by several tasks of the daemon (the server, the event bus).
pub type SharedStore = std::sync::Arc<std::sync::Mutex<Store>>;

/// A handle on the database. See the module docs.
pub struct Store {
    conn: Connection,
    path: PathBuf,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

impl Store {
    /// Opens (creating if needed) the database at `path` and brings its schema up to date.
    ///
    /// The version is checked on a read-only connection first, so a newer database is refused
    /// before any pragma or migration could write to it.
    pub fn open(path: &Path) -> Result<Store> {
        let open_err = |source| StoreError::Open { path: path.to_path_buf(), source };
        if path.exists() {
            let ro = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)
                .map_err(open_err)?;
            let found: u32 = ro.pragma_query_value(None, "user_version", |r| r.get(0)).map_err(open_err)?;
            drop(ro);
            if found > SCHEMA_VERSION {
                return Err(StoreError::NewerSchema { path: path.to_path_buf(), found, known: SCHEMA_VERSION });
            }
        } else if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| open_err(rusqlite::Error::InvalidPath(format!("{}: {e}", dir.display()).into())))?;
        }
        let mut conn = Connection::open(path).map_err(open_err)?;
        Self::configure(&conn).map_err(open_err)?;
        schema::migrations()
            .to_latest(&mut conn)
            .map_err(|source| StoreError::Migrate { path: path.to_path_buf(), source })?;
        Ok(Store { conn, path: path.to_path_buf() })
    }

    fn configure(conn: &Connection) -> rusqlite::Result<()> {
        conn.busy_timeout(Duration::from_secs(5))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        Ok(())
    }

    /// Path of the database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The schema version recorded in the file.
    pub fn schema_version(&self) -> Result<u32> {
        Ok(self.conn.pragma_query_value(None, "user_version", |r| r.get(0))?)
    }

    /// The journal mode in effect (`"wal"` for a file database).
    pub fn journal_mode(&self) -> Result<String> {
        Ok(self.conn.pragma_query_value(None, "journal_mode", |r| r.get(0))?)
    }

    /// Copies the WAL into the main file (the daemon does this at shutdown).
    pub fn checkpoint(&self) -> Result<()> {
        self.conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
        Ok(())
    }

    /// Checkpoints the WAL into the main file and closes the connection (used at daemon shutdown).
    pub fn close(self) -> Result<()> {
        let _ = self.checkpoint();
        self.conn.close().map_err(|(_, e)| StoreError::Sqlite(e))
    }
}

/// Current UTC time as RFC 3339 with milliseconds (`2026-11-27T01:02:03.456Z`); sorts as text.
pub fn now() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

/// Serializes a value for a `*_json` column.
fn to_json<T: serde::Serialize>(v: &T) -> Result<String> {
    Ok(serde_json::to_string(v)?)
}

/// Reads a `*_json` column, mapping malformed text to a rusqlite conversion error (so it works
/// inside row-mapping closures).
fn json_col<T: serde::de::DeserializeOwned>(row: &rusqlite::Row<'_>, idx: &str) -> rusqlite::Result<T> {
    let text: String = row.get(idx)?;
    serde_json::from_str(&text)
        .map_err(|e| rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e)))
}
