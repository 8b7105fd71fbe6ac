//! The store: one SQLite database (WAL) holding everything tilewise learns on this machine.
//!
//! Tables (see `schema.rs`): devices, models, sessions, candidates, measurements + samples (every
//! raw timing), the shape memo, best (one row per device/model/mlx/backend) + best_history, events,
//! worker_failures, and who uses what: fetches and usage.
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
//!
//! A corrupted database (SQLite cannot read it, or `PRAGMA integrity_check` is not `ok`) is never
//! written to: [`Store::open`] renames it (with its `-wal`/`-shm`) to `<name>.corrupt-<UTC time>`,
//! logs an error naming both files, and starts a fresh database; [`Store::moved_aside`] tells.

mod best;
mod catalog;
mod events;
mod imports;
mod measurements;
mod memo;
mod schema;
mod search;
mod sessions;
mod usage;
mod wal_watch;

pub use best::{Best, BestKey, HistoryEntry, Interval, PolicySummary, Promotion, Remeasurement};
pub use catalog::{DeviceRecord, ModelRecord, NewWorkerFailure, WorkerFailure};
pub use events::Event;
pub use imports::{Import, ImportState, NewImport};
pub use measurements::{Arm, Measurement, NewMeasurement, NewSample, Sample};
pub use memo::MemoEntry;
pub use schema::SCHEMA_VERSION;
pub use sessions::{Budget, Candidate, CandidateId, CandidateStatus, NewCandidate, NewSession, Session, SessionId, SessionState};
pub use usage::{
    merge_generations, merge_shapes, Fetch, FetchRow, GenerationUsage, ModelSeen, ShapeUsage, UsageReport, UsageRow, KEEP_USAGE_FOR,
    MAX_FETCH_ROWS, MAX_USAGE_ROWS,
};

use rusqlite::{Connection, OpenFlags};
use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use wal_watch::{WalIndexHeader, WalIndexWatch};

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
    /// Where a corrupted database found at `path` was moved by `open` (this handle is a fresh one).
    moved_aside: Option<PathBuf>,
    /// [`Store::promote`] calls through this handle, for [`BestStamp`].
    own_promotions: Cell<u64>,
    /// The header of `conn`'s WAL index, for [`Store::best_stamp`]'s syscall-free check. Points
    /// into `conn`'s own mapping: never read after `conn` closes (nothing reads it in drop).
    wal_watch: Option<WalIndexWatch>,
    /// The last `PRAGMA data_version` asked, with the WAL index header read just before it.
    last_data_version: Cell<Option<DataVersionSeen>>,
    /// How many [`Store::best_stamp`] calls had to ask SQLite (the rest trusted the header).
    data_version_queries: Cell<u64>,
}

/// One `PRAGMA data_version` answer and what the WAL index looked like just before it was asked.
#[derive(Clone, Copy)]
struct DataVersionSeen {
    header: WalIndexHeader,
    data_version: i64,
    at: Instant,
}

/// How long an unchanged WAL index header is trusted before SQLite is asked anyway: the bound on
/// how late a commit by a writer that bypasses the shared index (see `wal_watch`) is noticed.
const TRUST_WAL_HEADER_FOR: Duration = Duration::from_millis(250);

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
        let mut moved_aside = None;
        if path.exists() {
            match Self::inspect(path) {
                Ok(found) if found > SCHEMA_VERSION => {
                    return Err(StoreError::NewerSchema { path: path.to_path_buf(), found, known: SCHEMA_VERSION });
                }
                Ok(_) => {}
                Err(Inspect::Corrupt(detail)) => {
                    let moved = move_aside(path).map_err(|e| open_err(rusqlite::Error::InvalidPath(e.to_string().into())))?;
                    tracing::error!(
                        "database {} is corrupt ({detail}); moved it aside to {} (kept as it was, never overwritten) \
                         and started a fresh database",
                        path.display(),
                        moved.display()
                    );
                    moved_aside = Some(moved);
                }
                Err(Inspect::Open(e)) => return Err(open_err(e)),
            }
        }
        if !path.exists() {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)
                    .map_err(|e| open_err(rusqlite::Error::InvalidPath(format!("{}: {e}", dir.display()).into())))?;
            }
        }
        let mut conn = Connection::open(path).map_err(open_err)?;
        Self::configure(&conn).map_err(open_err)?;
        schema::migrations().to_latest(&mut conn).map_err(|source| StoreError::Migrate { path: path.to_path_buf(), source })?;
        // SAFETY: the watch lives in the same Store as `conn` and the Store never takes the
        // connection out of WAL mode (`configure` puts it there; nothing changes it after).
        let wal_watch = unsafe { WalIndexWatch::open(&conn) };
        Ok(Store {
            conn,
            path: path.to_path_buf(),
            moved_aside,
            own_promotions: Default::default(),
            wal_watch,
            last_data_version: Cell::new(None),
            data_version_queries: Cell::new(0),
        })
    }

    /// Reads an existing file's schema version and checks its integrity on a read-only
    /// connection, so that neither a newer nor a damaged database is ever written to.
    fn inspect(path: &Path) -> std::result::Result<u32, Inspect> {
        let classify = |e: rusqlite::Error| match e.sqlite_error_code() {
            Some(rusqlite::ErrorCode::DatabaseCorrupt | rusqlite::ErrorCode::NotADatabase) => Inspect::Corrupt(e.to_string()),
            _ => Inspect::Open(e),
        };
        let ro = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX).map_err(classify)?;
        let found: u32 = ro.pragma_query_value(None, "user_version", |r| r.get(0)).map_err(classify)?;
        if found > SCHEMA_VERSION {
            return Ok(found); // refused by the caller without further reads
        }
        let mut problems: Vec<String> = Vec::new();
        ro.pragma_query(None, "integrity_check", |r| {
            problems.push(r.get(0)?);
            Ok(())
        })
        .map_err(classify)?;
        if problems.len() == 1 && problems[0] == "ok" {
            Ok(found)
        } else {
            let shown: Vec<&str> = problems.iter().take(3).map(String::as_str).collect();
            Err(Inspect::Corrupt(format!("integrity_check: {}{}", shown.join("; "), if problems.len() > 3 { "; ..." } else { "" })))
        }
    }

    /// The file a corrupted database was moved to when this handle was opened, if that happened.
    pub fn moved_aside(&self) -> Option<&Path> {
        self.moved_aside.as_deref()
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
        // Cached: `status` asks on every call (the plugin's path at each MLX start).
        Ok(self.conn.prepare_cached("PRAGMA user_version")?.query_row([], |r| r.get(0))?)
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

/// What [`Store::inspect`] found wrong with an existing file.
enum Inspect {
    /// Damaged: to be moved aside, never written to.
    Corrupt(String),
    /// Could not be read for another reason (permissions, I/O): refused as is.
    Open(rusqlite::Error),
}

/// Renames a corrupted database and its WAL/shm side files to `<name>.corrupt-<UTC time>[-wal|-shm]`
/// (kept together, so the pair stays readable by SQLite for forensics); returns the new main path.
fn move_aside(path: &Path) -> std::io::Result<PathBuf> {
    let stamp = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string().replace(':', "");
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "tilewise.db".into());
    let mut target = path.with_file_name(format!("{name}.corrupt-{stamp}"));
    let mut n = 1;
    while target.exists() {
        target = path.with_file_name(format!("{name}.corrupt-{stamp}-{n}"));
        n += 1;
    }
    for suffix in ["-wal", "-shm"] {
        let side = PathBuf::from(format!("{}{suffix}", path.display()));
        if side.exists() {
            std::fs::rename(&side, format!("{}{suffix}", target.display()))?;
        }
    }
    std::fs::rename(path, &target)?;
    Ok(target)
}

/// Current UTC time as RFC 3339 with milliseconds (`2026-11-27T01:02:03.456Z`); sorts as text.
pub fn now() -> String {
    time_text(std::time::SystemTime::now())
}

/// A time as the store writes it (`at` columns): RFC 3339 UTC with milliseconds.
pub(crate) fn time_text(t: std::time::SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// Serializes a value for a `*_json` column.
fn to_json<T: serde::Serialize>(v: &T) -> Result<String> {
    Ok(serde_json::to_string(v)?)
}

/// Reads a `*_json` column, mapping malformed text to a rusqlite conversion error (so it works
/// inside row-mapping closures).
fn json_col<T: serde::de::DeserializeOwned>(row: &rusqlite::Row<'_>, idx: &str) -> rusqlite::Result<T> {
    let text: String = row.get(idx)?;
    serde_json::from_str(&text).map_err(|e| rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e)))
}

/// What the `best` table looked like to one connection at one moment, cheaply: if
/// [`BestStamp::best_unchanged_since`] holds for two stamps of the same [`Store`], `best` was not
/// written in between, by this connection or any other.
///
/// Why these parts: SQLite's `PRAGMA data_version` changes when *another* connection (another
/// process, or another handle in this one) commits anything, but by design not for this
/// connection's own commits; those are counted by the store itself, because through this library
/// `best` is only ever written by [`Store::promote`]. This connection's other writes (events,
/// measurements) move neither, so a cache keyed on the stamp survives them, and taking a stamp
/// never reads a table: after a write SQLite's first table read costs ~15 µs, which was most of
/// `policy.get`'s time after a client's `hello` (the plugin's latency at every MLX start).
///
/// A caller that caches what it read must take the stamp BEFORE reading, so a commit racing the
/// read can only make the cache look older than it is (a spurious miss), never newer (a stale hit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BestStamp {
    /// `PRAGMA data_version`: moves when another connection commits.
    pub data_version: i64,
    /// Promotions attempted through this handle: moves when this connection writes `best`.
    pub own_promotions: u64,
}

impl BestStamp {
    /// True when `best` cannot have changed between `earlier` (a stamp of the same store) and this.
    pub fn best_unchanged_since(&self, earlier: &BestStamp) -> bool {
        self == earlier
    }
}

impl Store {
    /// The current [`BestStamp`]: `PRAGMA data_version` and a counter.
    ///
    /// The pragma opens a read transaction (that is when SQLite notices another connection's WAL
    /// commit): a lock and an unlock on the `-shm` file, two syscalls on every `policy.get`. So it
    /// is asked only when the WAL index header has changed since it was last asked (any commit,
    /// ours included, changes it; see `wal_watch`) or when its answer is older than
    /// [`TRUST_WAL_HEADER_FOR`]; otherwise that answer still holds and no syscall is made.
    pub fn best_stamp(&self) -> Result<BestStamp> {
        let own_promotions = self.own_promotions.get();
        let Some(watch) = &self.wal_watch else {
            return Ok(BestStamp { data_version: self.query_data_version()?, own_promotions });
        };
        // The header is read BEFORE the pragma: a commit landing between the two then shows as a
        // changed header next time (one query too many), never as an unchanged one (a stale answer).
        let header = watch.header();
        let now = Instant::now();
        if let Some(seen) = self.last_data_version.get() {
            if seen.header == header && now.duration_since(seen.at) < TRUST_WAL_HEADER_FOR {
                return Ok(BestStamp { data_version: seen.data_version, own_promotions });
            }
        }
        let data_version = self.query_data_version()?;
        self.last_data_version.set(Some(DataVersionSeen { header, data_version, at: now }));
        Ok(BestStamp { data_version, own_promotions })
    }

    fn query_data_version(&self) -> Result<i64> {
        self.data_version_queries.set(self.data_version_queries.get() + 1);
        Ok(self.conn.prepare_cached("PRAGMA data_version")?.query_row([], |r| r.get(0))?)
    }

    /// How many [`Store::best_stamp`] calls asked SQLite; the others were answered from the WAL
    /// index header alone (tests and the IPC benchmark show the split).
    pub fn data_version_queries(&self) -> u64 {
        self.data_version_queries.get()
    }
}

#[cfg(test)]
mod best_stamp_tests {
    use super::*;

    fn promotion(model: &str, hash: &str) -> Promotion {
        Promotion {
            key: BestKey { device: "d".into(), model: model.into(), mlx: "0.32.4".into(), backend: "cpu".into() },
            policy: serde_json::json!({"any": hash}),
            hash: hash.into(),
            ratio: 1.1,
            lo: 1.0,
            hi: 1.2,
            session_id: None,
            candidate_id: None,
            summary: None,
        }
    }

    #[test]
    fn the_stamp_moves_on_own_promotions_and_other_connections_commits_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let a = Store::open(&path).unwrap();
        let b = Store::open(&path).unwrap();
        let mut last = a.best_stamp().unwrap();
        let mut check = |changed: bool, why: &str| {
            let now = a.best_stamp().unwrap();
            assert_eq!(!now.best_unchanged_since(&last), changed, "{why}");
            last = now;
        };
        a.best(&promotion("m", "h").key).unwrap();
        check(false, "a read must not move the stamp");
        a.append_event("client.hello", None, &serde_json::json!({})).unwrap();
        check(false, "this connection's writes other than promotions must not move it");
        a.promote(&promotion("m", "h1")).unwrap();
        check(true, "this connection's own promotion must move the stamp");
        check(false, "nothing happened");
        b.append_event("client.hello", None, &serde_json::json!({})).unwrap();
        check(true, "any commit by another connection must move the stamp");
        b.promote(&promotion("m", "h2")).unwrap();
        check(true, "another connection's promotion must move the stamp");
        a.append_event("client.hello", None, &serde_json::json!({})).unwrap();
        a.promote(&promotion("m", "h3")).unwrap();
        check(true, "a promotion after an event, both through this connection");
    }

    #[test]
    fn an_unchanged_wal_index_answers_without_asking_sqlite() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let a = Store::open(&path).unwrap();
        let b = Store::open(&path).unwrap();
        let first = a.best_stamp().unwrap();
        let asked = a.data_version_queries();
        for _ in 0..200 {
            assert_eq!(a.best_stamp().unwrap(), first);
        }
        // At most one more: the trust window may run out once if this thread is descheduled.
        assert!(a.data_version_queries() <= asked + 1, "200 checks with no commit asked SQLite {} times", a.data_version_queries() - asked);

        b.append_event("client.hello", None, &serde_json::json!({})).unwrap();
        let asked = a.data_version_queries();
        let after = a.best_stamp().unwrap();
        assert_eq!(a.data_version_queries(), asked + 1, "another connection's commit must make it ask");
        assert!(!after.best_unchanged_since(&first));

        // A writer that bypassed the shared index would be caught by the time limit: once it has
        // passed, SQLite is asked even though the header did not move.
        std::thread::sleep(TRUST_WAL_HEADER_FOR + Duration::from_millis(50));
        let asked = a.data_version_queries();
        assert_eq!(a.best_stamp().unwrap(), after);
        assert_eq!(a.data_version_queries(), asked + 1, "an answer older than the trust window must be refreshed");
    }
}
