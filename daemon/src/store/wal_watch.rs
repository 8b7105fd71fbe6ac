//! "Has any connection committed since I last looked?" answered without a syscall, from SQLite's
//! shared WAL index.
//!
//! Why: `PRAGMA data_version` is the documented way to notice another connection's commit, but it
//! opens a read transaction, and in WAL mode that is a lock and an unlock (two `fcntl`s) on the
//! `-shm` file. On `policy.get`'s path that was ~0.2 of the latency ratio against a bare
//! echo. The WAL index is memory that every connection maps shared, and its header (the first
//! 96 bytes: two copies of one 48-byte header) is rewritten on every commit, with a counter
//! (`iChange`) that each commit increments (sqlite3.c, `sqlite3WalFrames`; layout in SQLite's
//! "WAL-mode file format" document, section 2.2). So: if the header reads exactly as it did just
//! before the last `PRAGMA data_version`, no commit has happened since and that answer still holds;
//! if it differs in any byte (a commit, a recovery, a write caught half-done), ask SQLite again.
//! A wrong "unchanged" is impossible for writers that use the shared index; writers that do not
//! (a connection in `locking_mode=EXCLUSIVE` keeps its index in private memory) are caught by
//! [`Store::best_stamp`](super::Store::best_stamp)'s time limit on trusting the header.
//!
//! Why SQLite's own mapping and not our own `mmap` of the `-shm` file: SQLite locks that file with
//! POSIX record locks, and closing ANY descriptor of a file drops every such lock the process
//! holds on it — including the connections' "I have the index open" lock, after which another
//! process may re-initialise (truncate) the index under them. An earlier version of this module
//! opened, mapped and closed the file, and the reliability suite's fault checks caught exactly
//! that (a daemon killed by SIGBUS, sessions that stopped progressing). Asking the connection's
//! own VFS for the region it already has mapped (`xShmMap`, the call SQLite's WAL code makes)
//! opens nothing and closes nothing.

use rusqlite::{ffi, Connection};
use std::ffi::c_void;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};

/// Both copies of the wal-index header, in 32-bit words.
const HEADER_WORDS: usize = 24;
/// The size of a wal-index region; SQLite asks for every region with this size (WALINDEX_PGSZ).
const WAL_INDEX_REGION_BYTES: i32 = 32768;

/// The wal-index header as read at one moment. Equal headers mean no commit in between.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct WalIndexHeader([u32; HEADER_WORDS]);

/// The first region of one connection's wal-index mapping.
pub(super) struct WalIndexWatch {
    header: NonNull<u32>,
}

// SAFETY: the pointer is to memory shared between processes, valid as long as the connection it
// came from (see `open`); it is only ever read, with atomic loads, so any thread may hold it.
unsafe impl Send for WalIndexWatch {}

impl WalIndexWatch {
    /// The wal-index region `conn` has mapped; `None` when the database is not in WAL mode (then
    /// every check asks SQLite).
    ///
    /// # Safety
    /// The watch must not outlive `conn`, and `conn` must stay in WAL mode while the watch lives:
    /// SQLite unmaps the region only when the connection leaves WAL mode or closes.
    pub(super) unsafe fn open(conn: &Connection) -> Option<WalIndexWatch> {
        let mode: String = conn.pragma_query_value(None, "journal_mode", |r| r.get(0)).ok()?;
        if mode != "wal" {
            return None;
        }
        // A read opens the connection's WAL and wal-index if nothing has yet, so the region below
        // is SQLite's existing mapping and the call has no side effect of its own.
        conn.query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get::<_, i64>(0)).ok()?;
        let db = unsafe { conn.handle() };
        let mut file: *mut ffi::sqlite3_file = std::ptr::null_mut();
        let rc =
            unsafe { ffi::sqlite3_file_control(db, c"main".as_ptr(), ffi::SQLITE_FCNTL_FILE_POINTER, (&raw mut file).cast::<c_void>()) };
        if rc != ffi::SQLITE_OK || file.is_null() {
            return None;
        }
        let methods = unsafe { (*file).pMethods };
        if methods.is_null() || unsafe { (*methods).iVersion } < 2 {
            return None;
        }
        let shm_map = unsafe { (*methods).xShmMap }?;
        let mut region: *mut c_void = std::ptr::null_mut();
        // Region 0, not extending the file: the mapping the connection already has.
        let rc = unsafe { shm_map(file, 0, WAL_INDEX_REGION_BYTES, 0, &raw mut region) };
        if rc != ffi::SQLITE_OK {
            return None;
        }
        Some(WalIndexWatch { header: NonNull::new(region.cast::<u32>())? })
    }

    /// The header now. Word by word with atomic loads: other processes write it while we read,
    /// and a read that catches a write half-done differs from any earlier header, which is safe
    /// (it only makes the caller ask SQLite).
    pub(super) fn header(&self) -> WalIndexHeader {
        let mut words = [0u32; HEADER_WORDS];
        for (i, w) in words.iter_mut().enumerate() {
            // SAFETY: the region is WAL_INDEX_REGION_BYTES long and page-aligned, so word `i`
            // (< HEADER_WORDS) is in bounds and aligned; it stays mapped while the watch lives.
            *w = unsafe { AtomicU32::from_ptr(self.header.as_ptr().add(i)) }.load(Ordering::Acquire);
        }
        WalIndexHeader(words)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn wal_db(path: &Path) -> Connection {
        let c = Connection::open(path).unwrap();
        c.pragma_update(None, "journal_mode", "WAL").unwrap();
        c.execute_batch("CREATE TABLE IF NOT EXISTS t(x)").unwrap();
        c
    }

    #[test]
    fn every_commit_changes_the_header_and_reads_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let a = wal_db(&path);
        let b = wal_db(&path);
        let watch = unsafe { WalIndexWatch::open(&a) }.expect("a WAL database has an index");
        let mut last = watch.header();
        for i in 0..50 {
            let writer = if i % 2 == 0 { &a } else { &b };
            // Same row count each time after a while: the header must still move (iChange).
            writer.execute("INSERT INTO t VALUES (?1)", [i]).unwrap();
            writer.execute("DELETE FROM t WHERE x = ?1", [i]).unwrap();
            let now = watch.header();
            assert_ne!(now, last, "commit {i} left the header as it was");
            last = now;
            let _: i64 = a.query_row("SELECT count(*) FROM t", [], |r| r.get(0)).unwrap();
            let _: i64 = b.query_row("PRAGMA data_version", [], |r| r.get(0)).unwrap();
            assert_eq!(watch.header(), last, "a read moved the header");
        }
        // A checkpoint that restarts the WAL, then a commit into the restarted WAL.
        a.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(())).unwrap();
        let before = watch.header();
        b.execute("INSERT INTO t VALUES (1)", []).unwrap();
        assert_ne!(watch.header(), before, "a commit after a WAL restart left the header as it was");
    }

    #[test]
    fn no_index_means_no_watch() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rollback.db");
        let c = Connection::open(&path).unwrap();
        c.execute_batch("CREATE TABLE t(x); INSERT INTO t VALUES (1)").unwrap();
        assert!(unsafe { WalIndexWatch::open(&c) }.is_none());
        assert!(!dir.path().join("rollback.db-shm").exists(), "looking must not create an index");
        let memory = Connection::open_in_memory().unwrap();
        assert!(unsafe { WalIndexWatch::open(&memory) }.is_none());
    }

    /// The bug an earlier version had: opening and closing our own descriptor of `-shm` dropped
    /// the POSIX locks SQLite's connections hold on it. The kernel's lock table must show this
    /// process's locks on the index still there after a watch was set up and another handle came
    /// and went.
    #[cfg(target_os = "linux")]
    #[test]
    fn setting_up_a_watch_leaves_sqlites_locks_on_the_index_alone() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let a = wal_db(&path);
        let inode = std::fs::metadata(dir.path().join("t.db-shm")).unwrap().ino();
        let locks = || {
            let me = std::process::id().to_string();
            std::fs::read_to_string("/proc/locks")
                .unwrap()
                .lines()
                .filter(|l| {
                    let f: Vec<&str> = l.split_whitespace().collect();
                    // "1: POSIX ADVISORY READ 1234 fd:01:5678 128 128"
                    f.get(1) == Some(&"POSIX")
                        && f.get(4) == Some(&me.as_str())
                        && f.get(5).and_then(|d| d.rsplit(':').next()) == Some(inode.to_string().as_str())
                })
                .count()
        };
        let held = locks();
        assert!(held >= 1, "SQLite holds its shared lock on the index while a connection has it open");
        let watch = unsafe { WalIndexWatch::open(&a) }.unwrap();
        {
            let b = wal_db(&path);
            let w2 = unsafe { WalIndexWatch::open(&b) }.unwrap();
            assert_eq!(w2.header(), watch.header());
        }
        assert!(locks() >= held, "the process's locks on the index were dropped");
    }
}
