//! A corrupted database is detected when the store opens it, moved aside byte for byte, and
//! replaced by a fresh one — never written to, never silently overwritten. The live form
//! (a real daemon restarted on a corrupted file) is in the reliability suite (reliability/).

use std::path::Path;
use tilewise::store::{Budget, NewSession, Store};

fn session(store: &Store, model: &str) -> i64 {
    store
        .create_session(&NewSession {
            device: "dev".into(),
            model: model.into(),
            mlx: "0.32.4".into(),
            backend: "cpu".into(),
            seed: 1,
            budget: Budget { evaluations: Some(3), seconds: None },
        })
        .unwrap()
}

/// A closed database with enough rows to span several pages.
fn populated(path: &Path) {
    let store = Store::open(path).unwrap();
    for i in 0..200 {
        session(&store, &format!("model-{i:04}-{}", "x".repeat(100)));
    }
    store.close().unwrap();
}

fn corrupt_pages(path: &Path) -> Vec<u8> {
    let mut bytes = std::fs::read(path).unwrap();
    let page = 4096;
    assert!(bytes.len() >= 4 * page, "test database too small: {} bytes", bytes.len());
    // Keep page 1 (the header and schema) so SQLite opens the file; wreck the b-tree pages.
    for p in 1..bytes.len() / page {
        for i in 0..32 {
            bytes[p * page + i] = 0xA5 ^ (i as u8).wrapping_mul(31) ^ p as u8;
        }
    }
    std::fs::write(path, &bytes).unwrap();
    bytes
}

/// Main files moved aside (their `-wal`/`-shm` companions travel with them).
fn aside_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            name.contains(".corrupt-") && !name.ends_with("-wal") && !name.ends_with("-shm")
        })
        .collect();
    v.sort();
    v
}

#[test]
fn damaged_pages_are_found_by_integrity_check_and_moved_aside_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("tilewise.db");
    populated(&db);
    let damaged = corrupt_pages(&db);

    let store = Store::open(&db).expect("a corrupted database is moved aside, not an error");
    let moved = store.moved_aside().expect("corruption detected").to_path_buf();
    assert!(moved.file_name().unwrap().to_string_lossy().starts_with("tilewise.db.corrupt-"), "{}", moved.display());
    assert_eq!(std::fs::read(&moved).unwrap(), damaged, "the damaged file is kept byte for byte");
    // The fresh database works and holds none of the old rows.
    assert_eq!(store.list_sessions(1000).unwrap().len(), 0);
    let id = session(&store, "after");
    assert!(store.session(id).unwrap().is_some());
    drop(store);

    // Opening again finds a healthy database: nothing more is moved.
    let again = Store::open(&db).unwrap();
    assert!(again.moved_aside().is_none());
    assert_eq!(again.list_sessions(10).unwrap().len(), 1);
    assert_eq!(aside_files(dir.path()), vec![moved]);
}

#[test]
fn a_file_that_is_not_a_database_is_moved_aside_too() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("tilewise.db");
    let junk: Vec<u8> = (0..20_000u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    std::fs::write(&db, &junk).unwrap();
    let store = Store::open(&db).unwrap();
    let moved = store.moved_aside().expect("not-a-database detected").to_path_buf();
    assert_eq!(std::fs::read(&moved).unwrap(), junk);
    assert_eq!(store.schema_version().unwrap(), tilewise::store::SCHEMA_VERSION);
}

#[test]
fn a_healthy_database_is_opened_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("tilewise.db");
    populated(&db);
    let store = Store::open(&db).unwrap();
    assert!(store.moved_aside().is_none());
    assert_eq!(store.list_sessions(1000).unwrap().len(), 200);
    assert!(aside_files(dir.path()).is_empty());
}

#[test]
fn a_second_corruption_gets_its_own_name() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("tilewise.db");
    std::fs::write(&db, b"not a database, first").unwrap();
    let first = Store::open(&db).unwrap().moved_aside().unwrap().to_path_buf();
    std::fs::remove_file(&db).unwrap();
    for side in ["-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{side}", db.display()));
    }
    std::fs::write(&db, b"not a database, second").unwrap();
    let second = Store::open(&db).unwrap().moved_aside().unwrap().to_path_buf();
    assert_ne!(first, second);
    assert_eq!(std::fs::read(&first).unwrap(), b"not a database, first");
    assert_eq!(std::fs::read(&second).unwrap(), b"not a database, second");
}
