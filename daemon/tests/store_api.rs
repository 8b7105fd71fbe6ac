//! The store on real SQLite files in temp dirs: every table through the typed API, the
//! transactions that must be all-or-nothing, and the refusal of a database from a newer tilewise.

use serde_json::json;
use std::path::Path;
use tilewise::store::*;

fn open(dir: &Path) -> Store {
    Store::open(&dir.join("tilewise.db")).expect("open store")
}

fn session(store: &Store) -> SessionId {
    store
        .create_session(&NewSession {
            device: "dev".into(),
            model: "model".into(),
            mlx: "0.32.4".into(),
            backend: "cpu".into(),
            seed: 42,
            budget: Budget { evaluations: Some(10), seconds: None },
        })
        .unwrap()
}

fn candidate(store: &Store, sid: SessionId, hash: &str) -> CandidateId {
    store
        .add_candidate(&NewCandidate {
            session_id: sid,
            policy: json!({"schema": "tilewise.policy/1", "x": hash}),
            hash: hash.into(),
            parents: vec![],
            island: 0,
            generation: 0,
            origin: "seed".into(),
        })
        .unwrap()
}

fn measurement(cid: CandidateId, pairs: u32) -> NewMeasurement {
    let mut samples = Vec::new();
    for pair in 0..pairs {
        for (arm, s) in [(Arm::Stock, 0.10), (Arm::Candidate, 0.09)] {
            samples.push(NewSample { workload: "inference".into(), pair, arm, seconds: s + pair as f64 * 1e-3, extra: None });
        }
    }
    NewMeasurement {
        candidate_id: cid,
        correct: true,
        ratio: Some(1.11),
        lo: Some(1.05),
        hi: Some(1.2),
        gate: json!({"logits_rel_err": 0.0}),
        detail: json!({"calls": {"split": 3}}),
        samples,
    }
}

#[test]
fn fresh_database_is_wal_at_current_schema() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(tmp.path());
    assert_eq!(store.journal_mode().unwrap(), "wal");
    assert_eq!(store.schema_version().unwrap(), SCHEMA_VERSION);
    drop(store);
    // Reopening an up-to-date database is a no-op that keeps the data.
    let store = open(tmp.path());
    assert_eq!(store.schema_version().unwrap(), SCHEMA_VERSION);
}

#[test]
fn newer_schema_is_refused_and_left_untouched() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("tilewise.db");
    {
        let store = Store::open(&path).unwrap();
        store.append_event("daemon.started", None, &json!({})).unwrap();
        store.close().unwrap();
    }
    // Simulate a newer tilewise: bump user_version past what this binary knows.
    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.pragma_update(None, "journal_mode", "DELETE").unwrap();
        conn.pragma_update(None, "user_version", SCHEMA_VERSION + 7).unwrap();
    }
    let before = std::fs::read(&path).unwrap();
    let err = Store::open(&path).unwrap_err();
    match &err {
        StoreError::NewerSchema { found, known, .. } => {
            assert_eq!((*found, *known), (SCHEMA_VERSION + 7, SCHEMA_VERSION));
        }
        other => panic!("expected NewerSchema, got {other:?}"),
    }
    let msg = err.to_string();
    assert!(msg.contains("newer tilewise") && msg.contains("not modified"), "{msg}");
    assert_eq!(std::fs::read(&path).unwrap(), before, "the refused database was modified");
    assert!(!tmp.path().join("tilewise.db-wal").exists(), "refusal switched the database to WAL");
}

#[test]
fn sessions_track_state_and_counters() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(tmp.path());
    let sid = session(&store);
    let s = store.session(sid).unwrap().unwrap();
    assert_eq!((s.state, s.seed, s.budget.evaluations), (SessionState::Created, 42, Some(10)));
    assert_eq!(store.resumable_session("dev", "model", "0.32.4", "cpu").unwrap().unwrap().id, sid);

    store.set_session_state(sid, SessionState::Paused, Some("on battery")).unwrap();
    let s = store.session(sid).unwrap().unwrap();
    assert_eq!((s.state, s.reason.as_deref()), (SessionState::Paused, Some("on battery")));

    store.set_session_state(sid, SessionState::Finished, None).unwrap();
    assert!(store.resumable_session("dev", "model", "0.32.4", "cpu").unwrap().is_none());
    assert!(matches!(store.set_session_state(9999, SessionState::Running, None), Err(StoreError::NotFound { .. })));
    assert_eq!(store.list_sessions(10).unwrap().len(), 1);
}

#[test]
fn the_newest_session_of_a_model_is_found_by_its_saved_spec() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(tmp.path());
    let (a, b, c) = (session(&store), session(&store), session(&store));
    store.save_search_state(a, &serde_json::json!({"spec": {"model": "synthetic:tiny"}, "engine": {"big": [1, 2, 3]}})).unwrap();
    store.save_search_state(b, &serde_json::json!({"spec": {"model": "synthetic:tiny"}})).unwrap();
    store.save_search_state(c, &serde_json::json!({"spec": {"model": "/models/other"}})).unwrap();
    store.set_session_state(b, SessionState::Finished, Some("budget spent")).unwrap();
    let found = store.newest_session_of_model("dev", "synthetic:tiny").unwrap().unwrap();
    assert_eq!((found.id, found.state), (b, SessionState::Finished));
    assert_eq!(store.newest_session_of_model("dev", "/models/other").unwrap().unwrap().id, c);
    assert!(store.newest_session_of_model("dev", "nothing").unwrap().is_none());
    assert!(store.newest_session_of_model("another-device", "synthetic:tiny").unwrap().is_none());
}

#[test]
fn candidates_keep_lineage_and_status() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(tmp.path());
    let sid = session(&store);
    let a = candidate(&store, sid, "sha256:a");
    let b = store
        .add_candidate(&NewCandidate {
            session_id: sid,
            policy: json!({"p": 2}),
            hash: "sha256:b".into(),
            parents: vec![a],
            island: 3,
            generation: 1,
            origin: "mutation".into(),
        })
        .unwrap();
    let cb = store.candidate(b).unwrap().unwrap();
    assert_eq!((cb.parents.clone(), cb.island, cb.generation, cb.status), (vec![a], 3, 1, CandidateStatus::Pending));
    assert_eq!(store.find_candidate(sid, "sha256:b").unwrap().unwrap().id, b);
    assert!(store.find_candidate(sid, "sha256:zzz").unwrap().is_none());

    store.set_candidate_status(a, CandidateStatus::Measuring).unwrap();
    store.mark_candidate_failed(b, "worker timed out").unwrap();
    let failed = store.candidates(sid, Some(CandidateStatus::Failed)).unwrap();
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].failure_reason.as_deref(), Some("worker timed out"));
    assert_eq!(store.candidates(sid, None).unwrap().len(), 2);
    assert_eq!(store.session(sid).unwrap().unwrap().failures, 1);
}

#[test]
fn a_measurement_and_all_its_samples_are_one_transaction() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(tmp.path());
    let sid = session(&store);
    let cid = candidate(&store, sid, "sha256:a");

    let mid = store.record_measurement(&measurement(cid, 5)).unwrap();
    assert_eq!(store.samples(mid).unwrap().len(), 10);
    assert_eq!(store.candidate(cid).unwrap().unwrap().status, CandidateStatus::Measured);
    assert_eq!(store.session(sid).unwrap().unwrap().evaluations, 1);
    let ms = store.measurements(cid).unwrap();
    assert_eq!((ms.len(), ms[0].ratio, ms[0].correct), (1, Some(1.11), true));
    assert_eq!(store.session_measurements(sid).unwrap().len(), 1);

    // A measurement whose samples collide (same pair and arm twice) fails as a whole: no summary
    // row, no samples, no counter bump, candidate status unchanged.
    let cid2 = candidate(&store, sid, "sha256:b");
    let mut bad = measurement(cid2, 2);
    bad.samples.push(bad.samples[0].clone());
    assert!(store.record_measurement(&bad).is_err());
    assert!(store.measurements(cid2).unwrap().is_empty());
    assert_eq!(store.candidate(cid2).unwrap().unwrap().status, CandidateStatus::Pending);
    assert_eq!(store.session(sid).unwrap().unwrap().evaluations, 1);

    // Unknown candidate: a clear NotFound.
    assert!(matches!(store.record_measurement(&measurement(12345, 1)), Err(StoreError::NotFound { .. })));
}

#[test]
fn worker_results_map_to_measurements_with_every_sample() {
    let result = json!({
        "policy_hash": "sha256:x", "correct": true,
        "gate": {"logits_rel_err": 1e-7, "reason": null},
        "inference": {"ratio": 1.02, "lo": 0.99, "hi": 1.05, "n_pairs": 2, "samples": [
            {"pair": 0, "arm": "stock", "seconds": 0.5, "prefill_s": 0.1, "decode_s": 0.4},
            {"pair": 0, "arm": "candidate", "seconds": 0.49, "prefill_s": 0.1, "decode_s": 0.39},
            {"pair": 1, "arm": "stock", "seconds": 0.51},
            {"pair": 1, "arm": "candidate", "seconds": 0.5}]},
        "training": {"ratio": 1.0, "lo": 0.98, "hi": 1.01, "n_pairs": 1, "samples": [
            {"pair": 0, "arm": "stock", "seconds": 0.2}, {"pair": 0, "arm": "candidate", "seconds": 0.2}]},
        "combined": {"ratio": 1.014, "lo": 0.987, "hi": 1.038},
        "calls": {"native": 10, "split": 4, "kernel": 0}
    });
    let tmp = tempfile::tempdir().unwrap();
    let store = open(tmp.path());
    let cid = candidate(&store, session(&store), "sha256:x");
    let m = NewMeasurement::from_worker_result(cid, &result).unwrap();
    assert_eq!((m.ratio, m.lo, m.hi, m.correct), (Some(1.014), Some(0.987), Some(1.038), true));
    assert_eq!(m.samples.len(), 6);
    assert_eq!(m.samples[0].extra, Some(json!({"prefill_s": 0.1, "decode_s": 0.4})));
    assert!(m.detail["inference"].get("samples").is_none(), "samples must not be duplicated in detail");
    assert_eq!(m.detail["inference"]["ratio"], json!(1.02));
    assert_eq!(m.gate["logits_rel_err"], json!(1e-7));
    let mid = store.record_measurement(&m).unwrap();
    let stored = store.samples(mid).unwrap();
    assert_eq!(stored.len(), 6);
    assert!(stored.iter().any(|s| s.workload == "training" && s.arm == Arm::Candidate && s.seconds == 0.2));

    let broken = json!({"correct": true, "inference": {"samples": [{"pair": 0, "arm": "sideways", "seconds": 1.0}]}});
    let err = NewMeasurement::from_worker_result(cid, &broken).unwrap_err();
    assert!(err.to_string().contains("inference.samples[0].arm"), "{err}");
}

#[test]
fn shape_memo_upserts_by_key() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(tmp.path());
    let mut e = MemoEntry {
        device: "dev".into(),
        mlx: "0.32.4".into(),
        backend: "cpu".into(),
        m: 512,
        n: 896,
        k: 4864,
        dtype: "float32".into(),
        plan_hash: "sha256:p".into(),
        plan: json!({"kind": "split", "tile_m": 128, "tile_n": null, "tile_k": null}),
        stock_median_s: 0.010,
        plan_median_s: 0.011,
        ratio: 0.91,
        lo: Some(0.88),
        hi: Some(0.95),
        samples: 7,
        updated_at: String::new(),
    };
    store.upsert_memo(&e).unwrap();
    e.ratio = 0.93;
    e.samples = 14;
    store.upsert_memo(&e).unwrap();
    let got = store.memo("dev", "0.32.4", "cpu", 512, 896, 4864, "float32", "sha256:p").unwrap().unwrap();
    assert_eq!((got.ratio, got.samples), (0.93, 14));
    assert!(!got.updated_at.is_empty());
    assert_eq!(store.memo_size("dev", "0.32.4", "cpu").unwrap(), 1);
    assert_eq!(store.memo_for("dev", "0.32.4", "cpu").unwrap().len(), 1);
    assert!(store.memo("dev", "0.32.5", "cpu", 512, 896, 4864, "float32", "sha256:p").unwrap().is_none());
}

/// A promotion of `hash` for `key` at `ratio` ± 0.02, from session `sid`.
fn promotion(key: &BestKey, sid: SessionId, hash: &str, ratio: f64) -> Promotion {
    Promotion {
        key: key.clone(),
        policy: json!({"h": hash}),
        hash: hash.into(),
        ratio,
        lo: ratio - 0.02,
        hi: ratio + 0.02,
        session_id: Some(sid),
        candidate_id: None,
        summary: None,
    }
}

#[test]
fn promotion_replaces_best_and_appends_history() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(tmp.path());
    let sid = session(&store);
    let key = BestKey { device: "dev".into(), model: "model".into(), mlx: "0.32.4".into(), backend: "cpu".into() };
    assert!(store.best(&key).unwrap().is_none());
    let promo = |hash: &str, ratio: f64| promotion(&key, sid, hash, ratio);
    store.promote(&promo("sha256:one", 1.05)).unwrap();
    store.promote(&promo("sha256:two", 1.10)).unwrap();
    let best = store.best(&key).unwrap().unwrap();
    assert_eq!((best.hash.as_str(), best.ratio), ("sha256:two", 1.10));
    let hist = store.history(None, 50).unwrap();
    assert_eq!(hist.len(), 2);
    assert_eq!(hist[0].hash, "sha256:two");
    assert_eq!(hist[0].replaced_hash.as_deref(), Some("sha256:one"));
    assert_eq!(hist[1].replaced_hash, None);
    assert!(store.history(Some("other-model"), 50).unwrap().is_empty());
    assert_eq!(store.session(sid).unwrap().unwrap().promotions, 2);

    // A summary is stored with the best and its history row, and read back as it was written.
    let summary: tilewise::store::PolicySummary = serde_json::from_value(json!({
        "text": "q/k/v fused: 15 → 11 matmuls per token", "fused": ["q/k/v"], "matmuls_per_token": [15, 11],
        "rules": 0, "workloads": {"decode": {"ratio": 1.05, "lo": 1.02, "hi": 1.08}}}))
    .unwrap();
    store.promote(&Promotion { summary: Some(summary.clone()), ..promo("sha256:three", 1.2) }).unwrap();
    assert_eq!(store.best(&key).unwrap().unwrap().summary, Some(summary.clone()));
    let hist = store.history(None, 50).unwrap();
    assert_eq!((hist[0].summary.as_ref(), hist[1].summary.as_ref()), (Some(&summary), None));
}

#[test]
fn a_demotion_that_serves_an_imported_policy_again_keeps_where_it_came_from() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(tmp.path());
    let sid = session(&store);
    let key = BestKey { device: "dev".into(), model: "model".into(), mlx: "0.32.4".into(), backend: "cpu".into() };
    let promo = |hash: &str, ratio: f64| promotion(&key, sid, hash, ratio);
    let origin = "imported from Apple M3 Max (dev-other), verified here in session 1";
    store.promote(&promo("sha256:imported", 1.10)).unwrap();
    assert!(!store.set_best_origin(&key, "sha256:not-the-best", origin).unwrap(), "only the best is labelled");
    assert!(store.set_best_origin(&key, "sha256:imported", origin).unwrap());
    assert_eq!(store.history(None, 10).unwrap()[0].origin.as_deref(), Some(origin));

    // A policy found here replaces it (no label), then is found slower than stock: the imported
    // one is served again, still labelled, and the demotion row says so.
    store.promote(&promo("sha256:local", 1.20)).unwrap();
    assert_eq!(store.best(&key).unwrap().unwrap().origin, None);
    assert_eq!(store.history(None, 10).unwrap()[0].origin, None);
    assert_eq!(store.demote(&key, "sha256:local", "slower than stock").unwrap().as_deref(), Some("sha256:imported"));
    let best = store.best(&key).unwrap().unwrap();
    assert_eq!((best.hash.as_str(), best.origin.as_deref()), ("sha256:imported", Some(origin)));
    let demotion = &store.history(None, 10).unwrap()[0];
    assert_eq!((demotion.kind.as_str(), demotion.origin.as_deref()), ("demotion", Some(origin)));
}

#[test]
fn events_devices_models_and_worker_failures_persist_across_reopen() {
    let tmp = tempfile::tempdir().unwrap();
    {
        let store = open(tmp.path());
        let sid = session(&store);
        store.append_event("session.started", Some(sid), &json!({"seed": 42})).unwrap();
        store.append_event("daemon.started", None, &json!({})).unwrap();
        store.upsert_device("dev", &json!({"os": "linux"})).unwrap();
        store.upsert_device("dev", &json!({"os": "linux", "p_cores": 2})).unwrap();
        store.upsert_model("model", Some("/m"), &json!({"hidden_size": 64})).unwrap();
        store
            .record_worker_failure(&NewWorkerFailure {
                session_id: Some(sid),
                candidate_id: None,
                kind: "timeout".into(),
                message: "no reply in 900 s".into(),
                exit_code: None,
                stderr_tail: Some("Traceback ...".into()),
            })
            .unwrap();
    }
    let store = open(tmp.path());
    let all = store.events_since(0, None, 100).unwrap();
    assert_eq!(all.iter().map(|e| e.kind.as_str()).collect::<Vec<_>>(), ["session.started", "daemon.started"]);
    assert_eq!(store.events_since(all[0].id, None, 100).unwrap().len(), 1);
    assert_eq!(store.events_since(0, Some(1), 100).unwrap().len(), 1);
    assert_eq!(store.device("dev").unwrap().unwrap().info["p_cores"], json!(2));
    assert_eq!(store.model("model").unwrap().unwrap().path.as_deref(), Some("/m"));
    let wf = store.worker_failures(Some(1), 10).unwrap();
    assert_eq!((wf.len(), wf[0].failure.kind.as_str()), (1, "timeout"));
}

#[test]
fn two_handles_on_one_file_see_each_other() {
    let tmp = tempfile::tempdir().unwrap();
    let a = open(tmp.path());
    let b = open(tmp.path());
    let sid = session(&a);
    assert_eq!(b.session(sid).unwrap().unwrap().id, sid);
    b.append_event("x", Some(sid), &json!(null)).unwrap();
    assert_eq!(a.events_since(0, None, 10).unwrap().len(), 1);
}
