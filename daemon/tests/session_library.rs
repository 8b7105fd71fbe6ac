//! A session driven through the library API (real SQLite file, real Python worker, tiny model on CPU
//! MLX): the search screens with the memo, measures end to end, and whatever it promotes is what the
//! store serves; a population of A/A candidates (split plans whose tiles cover the whole matmul,
//! ≡ native) promotes nothing. The socket-level versions are in session_daemon.rs.

use serde_json::json;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tilewise::events::EventBus;
use tilewise::session::{DeviceInfo, ManagerOptions, SessionManager, StartParams};
use tilewise::store::{BestKey, Budget, CandidateStatus, SessionState, SharedStore, Store};
use tilewise::worker::WorkerConfig;

fn python() -> PathBuf {
    std::env::var_os("TILEWISE_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python"))
}

fn manager(home: &std::path::Path) -> (SessionManager, SharedStore, EventBus) {
    let store: SharedStore = Arc::new(Mutex::new(Store::open(&home.join("tilewise.db")).unwrap()));
    let events = EventBus::new(store.clone());
    let mut worker = WorkerConfig::new(python());
    worker.env.push(("TILEWISE_HOME".into(), home.display().to_string()));
    let m = SessionManager::new(ManagerOptions {
        store: store.clone(),
        events: events.clone(),
        worker,
        device: DeviceInfo { fingerprint: "dev-test".into(), chip: "test cpu".into() },
        llm: Default::default(),
        gate: None,
        load_timeout: Duration::from_secs(300),
        python_problem: None,
    });
    (m, store, events)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_search_session_ends_with_what_the_store_serves() {
    let home = tempfile::tempdir().unwrap();
    let (m, store, events) = manager(home.path());
    let mut rx = events.subscribe();
    let params = StartParams {
        // The seeds (three fusion seeds and the tile heuristic here) skip the screen; the budget
        // leaves room for children after them, which go through it.
        budget: Some(Budget { evaluations: Some(8), seconds: Some(600) }),
        seed: Some(5),
        pairs: Some(4),
        warmup: Some(1),
        shape_pairs: Some(3),
        ..Default::default()
    };
    let (sid, resumed) = m.start(params).await.unwrap();
    assert!(!resumed);
    m.wait().await;
    // `show` takes the store's lock itself: read it before holding the lock here.
    let shown = m.show(sid).unwrap();
    let st = store.lock().unwrap();
    let s = st.session(sid).unwrap().unwrap();
    assert_eq!(s.state, SessionState::Finished, "{:?}", s.reason);
    eprintln!("{}", serde_json::to_string_pretty(&shown["search"]).unwrap());
    eprintln!("session: {}", serde_json::to_string(&shown["session"]).unwrap());
    for c in shown["candidates"].as_array().unwrap() {
        eprintln!("candidate {} {} {} {}", c["id"], c["origin"], c["status"], c["measurement"]);
    }
    let seeds = shown["candidates"].as_array().unwrap().iter().filter(|c| c["origin"].as_str().unwrap().starts_with("seed:")).count();
    assert!(seeds >= 3, "the seeds are measured end to end");
    assert!(shown["memo_size"].as_u64().unwrap() > 0, "the cascade measured shapes for the children after the seeds");
    let key = BestKey { device: s.device.clone(), model: s.model.clone(), mlx: s.mlx.clone(), backend: s.backend.clone() };
    if let Some(best) = st.best(&key).unwrap() {
        assert!(best.lo > 1.0);
        assert_eq!(best.session_id, Some(sid));
        assert_eq!(shown["best"]["hash"], json!(best.hash));
    }
    drop(st);
    let mut kinds = Vec::new();
    while let Ok(e) = rx.try_recv() {
        kinds.push(e.kind);
    }
    assert_eq!(kinds.first().map(String::as_str), Some("session.started"), "{kinds:?}");
    assert_eq!(kinds.last().map(String::as_str), Some("session.finished"), "{kinds:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_all_a_a_population_promotes_nothing() {
    let home = tempfile::tempdir().unwrap();
    let (m, store, _) = manager(home.path());
    // Tiles at or above every dimension of the tiny model: each plan is a split that splits nothing.
    let aa: Vec<_> = [2048, 4096, 8192, 16384]
        .iter()
        .map(|t| {
            json!({"schema": "tilewise.policy/1", "name": format!("aa-{t}"),
                   "target": {"device": "*", "model": "*", "mlx": "*", "backend": "*"},
                   "matmul": {"rules": [], "default": {"kind": "split", "tile_m": t, "tile_n": t, "tile_k": t}}})
        })
        .collect();
    let params = StartParams { policies: Some(aa), pairs: Some(6), warmup: Some(1), seed: Some(1), ..Default::default() };
    let (sid, _) = m.start(params).await.unwrap();
    m.wait().await;
    let st = store.lock().unwrap();
    let s = st.session(sid).unwrap().unwrap();
    assert_eq!(s.state, SessionState::Finished, "{:?}", s.reason);
    let measured = st.candidates(sid, Some(CandidateStatus::Measured)).unwrap();
    assert_eq!(measured.len(), 4, "every A/A candidate was measured end to end");
    assert_eq!(s.promotions, 0);
    let key = BestKey { device: s.device.clone(), model: s.model.clone(), mlx: s.mlx.clone(), backend: s.backend.clone() };
    assert!(st.best(&key).unwrap().is_none());
    // Every A/A arm passes the correctness gate (same computation); a single interval may exclude
    // 1.0 by chance under load, which is what the confirmation measurement is for.
    for c in measured {
        for m in st.measurements(c.id).unwrap() {
            eprintln!("A/A {}: ratio {:?} [{:?}, {:?}]", c.policy["name"], m.ratio, m.lo, m.hi);
            assert!(m.correct, "{m:?}");
        }
    }
}

/// Racing: a first evaluation of a clear loser stops after `RACE_MIN_PAIRS` pairs and is stored as a
/// measured loser flagged `stopped_early`; with racing off the same candidate runs every pair.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raced_loser_stops_early_and_is_stored_as_measured() {
    // Tiles of 16 split every matmul of the tiny model into many small ones: far slower than stock.
    let slow = json!({"schema": "tilewise.policy/1", "name": "split-16",
                      "target": {"device": "*", "model": "*", "mlx": "*", "backend": "*"},
                      "matmul": {"rules": [], "default": {"kind": "split", "tile_m": 16, "tile_n": 16, "tile_k": 16}}});
    for race in [true, false] {
        let home = tempfile::tempdir().unwrap();
        let (m, store, _) = manager(home.path());
        let params = StartParams {
            policies: Some(vec![slow.clone()]),
            pairs: Some(8),
            warmup: Some(1),
            seed: Some(1),
            race: Some(race),
            ..Default::default()
        };
        let (sid, _) = m.start(params).await.unwrap();
        m.wait().await;
        let shown = m.show(sid).unwrap();
        let st = store.lock().unwrap();
        let s = st.session(sid).unwrap().unwrap();
        assert_eq!(s.state, SessionState::Finished, "{:?}", s.reason);
        let measured = st.candidates(sid, Some(CandidateStatus::Measured)).unwrap();
        assert_eq!(measured.len(), 1);
        let ms = st.measurements(measured[0].id).unwrap();
        assert_eq!(ms.len(), 1, "a loser gets no confirmation");
        let d = &ms[0].detail;
        eprintln!("race {race}: ratio {:?} [{:?}, {:?}] race {}", ms[0].ratio, ms[0].lo, ms[0].hi, d["race"]);
        assert!(ms[0].hi.unwrap() < 1.0, "split-16 is slower than stock");
        let n_inf = d.pointer("/inference/n_pairs").and_then(|v| v.as_u64()).unwrap();
        let n_trn = d.pointer("/training/n_pairs").and_then(|v| v.as_u64()).unwrap();
        let stopped = shown["candidates"][0]["measurement"]["stopped_early"].as_bool().unwrap();
        if race {
            assert_eq!(d.pointer("/race/stopped_early"), Some(&json!(true)));
            assert!(stopped);
            assert_eq!(n_trn, u64::from(tilewise::session::RACE_MIN_PAIRS), "training stops at the minimum");
            assert!(n_inf < 8, "inference stopped before its 8 pairs");
            let samples = st.samples(ms[0].id).unwrap();
            assert_eq!(samples.len() as u64, 2 * (n_inf + n_trn), "every pair taken is stored");
        } else {
            assert!(d.get("race").is_none() && !stopped);
            assert_eq!((n_inf, n_trn), (8, 8));
        }
        assert_eq!(s.promotions, 0);
    }
}
