//! "Has any connection committed since I last looked?" answered without a syscall, from SQLite's
//! shared WAL index.
//!
//! Why: `PRAGMA data_version` is the documented way to notice another connection's commit, but it
//! opens a read transaction, and in WAL mode that is a lock and an unlock (two `fcntl`s) on the
//! `-shm` file. On `policy.get`'s path that was ~0.2 of issue 2's latency ratio against a bare
//! echo. The WAL index is a file that every connection maps shared, and its header (the first
//! 96 bytes: two copies of one 48-byte header) is rewritten on every commit, with a counter
//! (`iChange`) that each commit increments (sqlite3.c, `sqlite3WalFrames`; layout in SQLite's
//! "WAL-mode file format" document, section 2.2). So: if the header reads exactly as it did just
//! before the last `PRAGMA data_version`, no commit has happened since and that answer still holds;
//! if it differs in any byte (a commit, a recovery, a write caught half-done), ask SQLite again.
//! A wrong "unchanged" is impossible for writers that use the shared index; writers that do not
//! (a connection in `locking_mode=EXCLUSIVE` keeps its index in private memory) are caught by
//! [`Store::best_stamp`](super::Store::best_stamp)'s time limit on trusting the header.
//!
//! Safety of the mapping: SQLite itself maps this file and reads this header at every transaction,
//! and it only truncates the file when no connection has it open; ours stays open as long as the
//! [`Store`](super::Store) that owns this watch. Anything that would make our read fault (someone
//! truncating the file under a live database) would fault SQLite's own read first.

use memmap2::{Mmap, MmapOptions};
use std::ffi::OsString;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

/// Both copies of the wal-index header, in 32-bit words.
const HEADER_WORDS: usize = 24;
const HEADER_BYTES: usize = HEADER_WORDS * 4;

/// The wal-index header as read at one moment. Equal headers mean no commit in between.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct WalIndexHeader([u32; HEADER_WORDS]);

/// A read-only view of `<database>-shm`'s header.
pub(super) struct WalIndexWatch {
    map: Mmap,
}

impl WalIndexWatch {
    /// Maps the WAL index of the database at `db`; `None` when there is none to map (not in WAL
    /// mode, or an index smaller than its header), in which case every check asks SQLite.
    pub(super) fn open(db: &Path) -> Option<WalIndexWatch> {
        let file = File::open(shm_path(db)).ok()?;
        if file.metadata().ok()?.len() < HEADER_BYTES as u64 {
            return None;
        }
        // SAFETY: a read-only shared mapping of a file other processes write; it is only ever read
        // through the atomic loads in `header`, never through a Rust reference to its bytes.
        let map = unsafe { MmapOptions::new().len(HEADER_BYTES).map(&file) }.ok()?;
        Some(WalIndexWatch { map })
    }

    /// The header now. Word by word with atomic loads: other processes write it while we read,
    /// and a read that catches a write half-done differs from any earlier header, which is safe
    /// (it only makes the caller ask SQLite).
    pub(super) fn header(&self) -> WalIndexHeader {
        let base = self.map.as_ptr() as *mut u32; // page-aligned, so every word is aligned
        let mut words = [0u32; HEADER_WORDS];
        for (i, w) in words.iter_mut().enumerate() {
            // SAFETY: `i < HEADER_WORDS` keeps the read inside the mapping's HEADER_BYTES; an
            // aligned 32-bit atomic load is a plain load, valid on read-only memory.
            *w = unsafe { AtomicU32::from_ptr(base.add(i)) }.load(Ordering::Acquire);
        }
        WalIndexHeader(words)
    }
}

fn shm_path(db: &Path) -> PathBuf {
    let mut name = OsString::from(db.as_os_str());
    name.push("-shm");
    PathBuf::from(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rusqlite::Connection;

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
        let watch = WalIndexWatch::open(&path).expect("a WAL database has an index to map");
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
        assert!(WalIndexWatch::open(&path).is_none());
        assert!(WalIndexWatch::open(&dir.path().join("missing.db")).is_none());
    }
}
