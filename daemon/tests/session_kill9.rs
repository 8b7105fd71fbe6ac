//! kill -9 at random moments: the real daemon runs a real session (real worker, tiny model, CPU
//! MLX) and is SIGKILLed 20 times at seeded-random moments, with its worker, and restarted each
//! time. After every kill the database passes `PRAGMA integrity_check` and holds at least as many
//! committed trials as before; every restart resumes the session by itself; in the end the session
//! completes its budget, no candidate was added twice and no measurement was repeated beyond the
//! one confirmation a promotion needs.

mod session_support;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rusqlite::{Connection, OpenFlags};
use serde_json::json;
use session_support::*;
use std::path::Path;
use std::time::Duration;

/// (committed trials = measurements + failed candidates, shape memo rows, integrity_check result).
fn inspect(db: &Path) -> (i64, i64, String) {
    let conn = Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
    let integrity: String = conn.query_row("PRAGMA integrity_check", [], |r| r.get(0)).unwrap();
    let measurements: i64 = conn.query_row("SELECT count(*) FROM measurements", [], |r| r.get(0)).unwrap();
    let failed: i64 = conn.query_row("SELECT count(*) FROM candidates WHERE status = 'failed'", [], |r| r.get(0)).unwrap();
    let memo: i64 = conn.query_row("SELECT count(*) FROM shape_memo", [], |r| r.get(0)).unwrap();
    (measurements + failed, memo, integrity)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_twenty_times_loses_no_committed_trial_and_the_session_completes() {
    let home = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(home.path(), &[]);
    let sid = {
        let mut c = d.client().await;
        let r = call(&mut c, "tuning.start", json!({"budget": {"evaluations": 14}, "seed": 21, "pairs": 3, "warmup": 0, "shape_pairs": 2}))
            .await;
        let sid = r["session_id"].as_i64().unwrap();
        // The first start synthesizes the tiny model (once per home); the kills are meant for the
        // session, so they begin once it has committed its first shape timings.
        let deadline = std::time::Instant::now() + Duration::from_secs(600);
        while call(&mut c, "session.show", json!({"session_id": sid})).await["memo_size"].as_u64() == Some(0) {
            assert!(std::time::Instant::now() < deadline, "no shape timing committed in 600 s");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        sid
    };
    let db = d.paths.db_file.clone();
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let (mut last, mut last_memo) = (0, 0);
    let mut history = Vec::new();
    for kill in 0..20 {
        // Each life is long enough to start the worker and load the model (a few seconds) and then
        // be cut somewhere in screening, measuring or committing.
        tokio::time::sleep(Duration::from_millis(rng.random_range(3000..20000))).await;
        d.kill9();
        let (trials, memo, integrity) = inspect(&db);
        assert_eq!(integrity, "ok", "after kill {kill}");
        assert!(trials >= last, "kill {kill}: committed trials went from {last} to {trials}");
        assert!(memo >= last_memo, "kill {kill}: memo rows went from {last_memo} to {memo}");
        (last, last_memo) = (trials, memo);
        history.push((trials, memo));
        d = Daemon::start(home.path(), &[]);
    }
    eprintln!("(committed trials, memo rows) after each kill: {history:?}");
    assert!(last > 0, "the kills all came before any measurement committed: lives too short to test anything");

    let mut c = d.client().await;
    let shown = wait_finished(&mut c, sid, Duration::from_secs(1200)).await;
    let s = &shown["session"];
    assert_eq!(s["state"], "finished", "{shown}");
    assert!(s["evaluations"].as_i64().unwrap() + s["failures"].as_i64().unwrap() >= 14, "{s}");
    let (trials, _, integrity) = inspect(&db);
    assert_eq!(integrity, "ok");
    assert!(trials >= last);

    // No duplicated work: one row per candidate policy, at most measurement + confirmation each
    // (incumbent re-measurements live on their own `incumbent` row).
    let conn = Connection::open_with_flags(&db, OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
    let dup: i64 = conn
        .query_row(
            "SELECT count(*) FROM (SELECT hash FROM candidates WHERE session_id = ?1 AND origin != 'incumbent' GROUP BY hash HAVING count(*) > 1)",
            [sid],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(dup, 0, "a candidate was added twice");
    let mut st = conn
        .prepare("SELECT c.id, count(m.id) FROM candidates c JOIN measurements m ON m.candidate_id = c.id WHERE c.session_id = ?1 AND c.origin != 'incumbent' GROUP BY c.id")
        .unwrap();
    let per: Vec<(i64, i64)> = st.query_map([sid], |r| Ok((r.get(0)?, r.get(1)?))).unwrap().map(Result::unwrap).collect();
    for (cand, n) in &per {
        assert!(*n <= 2, "candidate {cand} measured {n} times");
        if *n == 2 {
            // The only reason for a second measurement: the first passed and needed confirmation.
            let lo: f64 =
                conn.query_row("SELECT lo FROM measurements WHERE candidate_id = ?1 ORDER BY id LIMIT 1", [cand], |r| r.get(0)).unwrap();
            assert!(lo > 1.0, "candidate {cand} re-measured although its first interval did not pass ({lo})");
        }
    }
    // Every restart resumed the same session instead of starting another.
    let sessions: i64 = conn.query_row("SELECT count(*) FROM sessions", [], |r| r.get(0)).unwrap();
    assert_eq!(sessions, 1);
    let resumed: i64 =
        conn.query_row("SELECT count(*) FROM events WHERE kind = 'session.resumed' AND session_id = ?1", [sid], |r| r.get(0)).unwrap();
    assert!(resumed >= 1, "restarts resumed the session");
}
