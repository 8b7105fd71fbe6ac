//! The scheduler driving a real tuning session: file-driven activity source (a JSON file watched
//! with notify), real SQLite store, real Python worker measuring the tiny model on CPU MLX.
//!
//! - idle starts the session's measurements; activity stops the running measurement within 1 s
//!   and stores nothing from it; idle again resumes and re-measures the interrupted candidate;
//! - on battery nothing runs.

mod session_support;

use serde_json::json;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tilewise::events::EventBus;
use tilewise::schedule::activity::ActivityFile;
use tilewise::schedule::{FileSource, Gates, Scheduler, SchedulerHandle, SchedulerOptions};
use tilewise::session::{DeviceInfo, ManagerOptions, SessionManager, StartParams};
use tilewise::store::{CandidateStatus, SessionState, SharedStore, Store};
use tilewise::worker::WorkerConfig;
use tokio::sync::{broadcast, watch};

fn python() -> PathBuf {
    std::env::var_os("TILEWISE_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python"))
}

struct Rig {
    manager: SessionManager,
    store: SharedStore,
    events: broadcast::Receiver<tilewise::store::Event>,
    activity: PathBuf,
    scheduler: SchedulerHandle,
    _gates: watch::Sender<Gates>,
}

fn rig(home: &Path, initial: ActivityFile) -> Rig {
    let activity = home.join("activity.json");
    initial.write_to(&activity).unwrap();
    let gates = Gates { idle_seconds: 1.0, max_load_1m: None, ..Gates::default() };
    let (gates_tx, gates_rx) = watch::channel(gates);
    let scheduler = Scheduler::spawn(Arc::new(FileSource::new(&activity).unwrap()), gates_rx, SchedulerOptions::default());
    let store: SharedStore = Arc::new(Mutex::new(Store::open(&home.join("tilewise.db")).unwrap()));
    let bus = EventBus::new(store.clone());
    let events = bus.subscribe();
    let mut worker = WorkerConfig::new(python());
    worker.env.push(("TILEWISE_HOME".into(), home.display().to_string()));
    let manager = SessionManager::new(ManagerOptions {
        store: store.clone(),
        events: bus,
        worker,
        device: DeviceInfo { fingerprint: "dev-test".into(), chip: "test cpu".into() },
        llm: Default::default(),
        gate: Some(scheduler.subscribe()),
        load_timeout: Duration::from_secs(300),
        python_problem: None,
    });
    Rig { manager, store, events, activity, scheduler, _gates: gates_tx }
}

/// Policies that each cost a full end-to-end evaluation (A/A splits: tiles cover every matmul).
fn policies(n: usize) -> Vec<serde_json::Value> {
    (0..n)
        .map(|i| {
            let t = 2048 << i;
            json!({"schema": "tilewise.policy/1", "name": format!("aa-{t}"),
                   "target": {"device": "*", "model": "*", "mlx": "*", "backend": "*"},
                   "matmul": {"rules": [], "default": {"kind": "split", "tile_m": t, "tile_n": t, "tile_k": t}}})
        })
        .collect()
}

async fn next_event(rx: &mut broadcast::Receiver<tilewise::store::Event>, kind: &str, within: Duration) -> tilewise::store::Event {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Ok(e)) if e.kind == kind => return e,
            Ok(Ok(_)) | Ok(Err(broadcast::error::RecvError::Lagged(_))) => {}
            Ok(Err(e)) => panic!("event bus closed: {e}"),
            Err(_) => panic!("no {kind} event within {within:?}"),
        }
    }
}

fn count(store: &SharedStore, sql: &str) -> i64 {
    // A second connection on the same file (WAL): sees every committed row, as another process would.
    let path = store.lock().unwrap().path().to_path_buf();
    let conn = rusqlite::Connection::open_with_flags(&path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
    conn.query_row(sql, [], |r| r.get(0)).unwrap()
}

use session_support::pause_budget;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn activity_pauses_the_measurement_within_a_second_and_idle_resumes_it() {
    let home = tempfile::tempdir().unwrap();
    // The person is at the machine when the session is asked for.
    let mut r = rig(home.path(), ActivityFile { user_idle_s: 0.0, ..Default::default() });
    let params = StartParams { policies: Some(policies(3)), pairs: Some(8), warmup: Some(1), seed: Some(3), ..Default::default() };
    // Keep them active (input every 300 ms) while the worker loads the model.
    let keep_active = {
        let path = r.activity.clone();
        tokio::spawn(async move {
            loop {
                ActivityFile { user_idle_s: 0.0, ..Default::default() }.write_to(&path).unwrap();
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        })
    };
    let (sid, _) = r.manager.start(params).await.unwrap();
    let paused = next_event(&mut r.events, "session.paused", Duration::from_secs(60)).await;
    assert_eq!(paused.session_id, Some(sid));
    assert!(paused.data["reason"].as_str().unwrap().starts_with("user active"), "{}", paused.data);
    assert_eq!(count(&r.store, "SELECT COUNT(*) FROM candidates WHERE status != 'pending'"), 0);

    // The person leaves; after the configured second of idle time the measurements start by
    // themselves (no file change needed: the scheduler sleeps the missing idle time).
    keep_active.abort();
    let left = Instant::now();
    let ev = next_event(&mut r.events, "session.resumed", Duration::from_secs(10)).await;
    assert_eq!(ev.session_id, Some(sid));
    let after = left.elapsed();
    assert!(after >= Duration::from_millis(600) && after < Duration::from_secs(3), "resumed {after:?} after the last input");

    // Wait until a candidate is being measured, then let a little of it run.
    let deadline = Instant::now() + Duration::from_secs(120);
    let measuring = loop {
        let c = r.store.lock().unwrap().candidates(sid, Some(CandidateStatus::Measuring)).unwrap();
        if let Some(c) = c.into_iter().next() {
            break c;
        }
        assert!(Instant::now() < deadline, "no candidate was measured");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let samples_before = count(&r.store, "SELECT COUNT(*) FROM samples");
    let measurements_before = count(&r.store, "SELECT COUNT(*) FROM measurements");

    // The person comes back.
    let back = Instant::now();
    ActivityFile { user_idle_s: 0.0, ..Default::default() }.write_to(&r.activity).unwrap();
    let paused = next_event(&mut r.events, "session.paused", Duration::from_secs(10)).await;
    let took = back.elapsed();
    eprintln!("measurement stopped and session paused {took:?} after the activity: {}", paused.data);
    assert!(took < pause_budget(), "pause took {took:?}");
    assert!(paused.data["reason"].as_str().unwrap().contains("user active"), "{}", paused.data);
    {
        let st = r.store.lock().unwrap();
        assert_eq!(st.session(sid).unwrap().unwrap().state, SessionState::Paused);
        // 300 ms into a run of several seconds: it was interrupted, and nothing of it is stored.
        let c = st.candidates(sid, None).unwrap().into_iter().find(|c| c.id == measuring.id).unwrap();
        assert_eq!(c.status, CandidateStatus::Pending, "the interrupted candidate is left to be redone");
        assert!(st.measurements(c.id).unwrap().is_empty(), "samples of an interrupted run were stored");
    }
    // Whatever finished before the person came back stays; nothing from after it is stored.
    let measurements_at_pause = count(&r.store, "SELECT COUNT(*) FROM measurements");
    let samples_at_pause = count(&r.store, "SELECT COUNT(*) FROM samples");
    assert!(
        measurements_at_pause == measurements_before && samples_at_pause == samples_before,
        "rows stored during the active period: measurements {measurements_before}->{measurements_at_pause}, samples {samples_before}->{samples_at_pause}"
    );

    // Stays paused while the person is active (the file does not change; idle needs 1 s, so
    // write activity again to keep them "active").
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        ActivityFile { user_idle_s: 0.0, ..Default::default() }.write_to(&r.activity).unwrap();
    }
    assert_eq!(count(&r.store, "SELECT COUNT(*) FROM measurements"), measurements_at_pause);

    // Away again: it resumes where it left off and measures every policy exactly once.
    ActivityFile { user_idle_s: 600.0, ..Default::default() }.write_to(&r.activity).unwrap();
    next_event(&mut r.events, "session.resumed", Duration::from_secs(10)).await;
    tokio::time::timeout(Duration::from_secs(600), r.manager.wait()).await.expect("session finished");
    {
        let st = r.store.lock().unwrap();
        let s = st.session(sid).unwrap().unwrap();
        assert_eq!(s.state, SessionState::Finished, "{:?}", s.reason);
        let all = st.candidates(sid, None).unwrap();
        assert_eq!(all.len(), 3);
        for c in &all {
            assert_eq!(c.status, CandidateStatus::Measured, "{c:?}");
            assert_eq!(st.measurements(c.id).unwrap().len(), 1, "candidate {} measured once", c.id);
        }
    }
    r.scheduler.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_battery_nothing_runs() {
    let home = tempfile::tempdir().unwrap();
    let mut r = rig(home.path(), ActivityFile { user_idle_s: 3600.0, on_ac_power: false, battery_percent: Some(64), ..Default::default() });
    let params = StartParams { policies: Some(policies(2)), pairs: Some(4), warmup: Some(1), ..Default::default() };
    let (sid, _) = r.manager.start(params).await.unwrap();
    let paused = next_event(&mut r.events, "session.paused", Duration::from_secs(60)).await;
    assert_eq!(paused.data["reason"], "on battery (64 %)");
    tokio::time::sleep(Duration::from_secs(3)).await;
    {
        let st = r.store.lock().unwrap();
        assert_eq!(st.session(sid).unwrap().unwrap().state, SessionState::Paused);
        for c in st.candidates(sid, None).unwrap() {
            assert_ne!(c.status, CandidateStatus::Measuring);
            assert!(st.measurements(c.id).unwrap().is_empty());
        }
    }
    assert_eq!(count(&r.store, "SELECT COUNT(*) FROM samples"), 0);
    assert!(r.manager.stop(Some(sid)).await);
    tokio::time::timeout(Duration::from_secs(30), r.manager.wait()).await.expect("stopped");
    assert_eq!(r.store.lock().unwrap().session(sid).unwrap().unwrap().state, SessionState::Stopped);
    r.scheduler.stop().await;
}
