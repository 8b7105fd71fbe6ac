//! What becomes of a proven policy after its promotion: a re-measurement session (what the idle
//! auto-starter runs on a later day) keeps a best that still holds and demotes one that no longer
//! does — the previous best, or native, is served again, with the reason in the history. Real SQLite
//! file, real Python worker, tiny model on CPU MLX; the store's side alone is in store_api.rs.

use serde_json::json;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tilewise::events::EventBus;
use tilewise::session::{DeviceInfo, ManagerOptions, SessionManager, StartParams};
use tilewise::store::{BestKey, Promotion, SessionState, SharedStore, Store};
use tilewise::worker::WorkerConfig;

fn python() -> PathBuf {
    std::env::var_os("TILEWISE_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python"))
}

fn manager(home: &std::path::Path, env: &[(&str, &str)]) -> (SessionManager, SharedStore) {
    let store: SharedStore = Arc::new(Mutex::new(Store::open(&home.join("tilewise.db")).unwrap()));
    let mut worker = WorkerConfig::new(python());
    worker.env.push(("TILEWISE_HOME".into(), home.display().to_string()));
    for (k, v) in env {
        worker.env.push((k.to_string(), v.to_string()));
    }
    let m = SessionManager::new(ManagerOptions {
        store: store.clone(),
        events: EventBus::new(store.clone()),
        worker,
        device: DeviceInfo { fingerprint: "dev-test".into(), chip: "test cpu".into() },
        llm: Default::default(),
        gate: None,
        load_timeout: Duration::from_secs(300),
        python_problem: None,
    });
    (m, store)
}

/// The tiny model's key, found by loading it once (a fixed-list session of one native policy).
async fn tiny_key(home: &std::path::Path) -> BestKey {
    let (m, store) = manager(home, &[]);
    let native = json!({"schema": "tilewise.policy/1", "target": {"device": "*", "model": "*", "mlx": "*", "backend": "*"},
                        "matmul": {"rules": [], "default": {"kind": "native"}}});
    let (sid, _) =
        m.start(StartParams { policies: Some(vec![native]), pairs: Some(2), warmup: Some(0), ..Default::default() }).await.unwrap();
    m.wait().await;
    let s = store.lock().unwrap().session(sid).unwrap().unwrap();
    BestKey { device: s.device, model: s.model, mlx: s.mlx, backend: s.backend }
}

/// A fusion of the tiny model's sibling groups: really faster than stock (~5 % here), and exact when
/// the worker is healthy.
fn fusion(key: &BestKey, name: &str, groups: &[(&str, &[&str])]) -> serde_json::Value {
    let groups: Vec<_> = groups.iter().map(|(scope, members)| json!({"scope": scope, "members": members})).collect();
    json!({"schema": "tilewise.policy/1", "name": name,
           "target": {"device": key.device, "model": key.model, "mlx": key.mlx, "backend": key.backend},
           "matmul": {"rules": [], "default": {"kind": "native"}}, "fusion": {"groups": groups}})
}

const QKV: (&str, &[&str]) = ("model.layers.*.self_attn", &["q_proj", "k_proj", "v_proj"]);
const GATE_UP: (&str, &[&str]) = ("model.layers.*.mlp", &["gate_proj", "up_proj"]);

fn promote(store: &SharedStore, key: &BestKey, doc: &serde_json::Value, ratio: f64) -> String {
    let hash = tilewise::policy::Policy::from_value(doc).unwrap().content_hash();
    store
        .lock()
        .unwrap()
        .promote(&Promotion {
            key: key.clone(),
            policy: doc.clone(),
            hash: hash.clone(),
            ratio,
            lo: ratio - 0.02,
            hi: ratio + 0.02,
            session_id: None,
            candidate_id: None,
            summary: None,
        })
        .unwrap();
    hash
}

async fn remeasure(home: &std::path::Path, env: &[(&str, &str)]) -> (String, SharedStore) {
    let (m, store) = manager(home, env);
    let (sid, resumed) =
        m.start(StartParams { remeasure: Some(true), pairs: Some(8), warmup: Some(0), ..Default::default() }).await.unwrap();
    assert!(!resumed);
    m.wait().await;
    let s = store.lock().unwrap().session(sid).unwrap().unwrap();
    assert_eq!(s.state, SessionState::Finished, "{:?}", s.reason);
    (s.reason.unwrap_or_default(), store)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_best_that_no_longer_holds_is_demoted_to_the_previous_one_then_native() {
    let home = tempfile::tempdir().unwrap();
    let key = tiny_key(home.path()).await;
    let store = Arc::new(Mutex::new(Store::open(&home.path().join("tilewise.db")).unwrap()));
    let first = promote(&store, &key, &fusion(&key, "first", &[QKV]), 1.03);
    let second = promote(&store, &key, &fusion(&key, "second", &[QKV, GATE_UP]), 1.05);
    drop(store);

    // A healthy worker: the re-measurement is recorded and the best kept (it is demoted only when
    // its whole interval lies below 1, which a real 5 % win does not do).
    let (reason, store) = remeasure(home.path(), &[]).await;
    assert!(reason.ends_with("kept"), "{reason}");
    {
        let st = store.lock().unwrap();
        let best = st.best(&key).unwrap().unwrap();
        assert_eq!(best.hash, second);
        assert!(best.remeasured_at.is_some());
        let h = st.history(None, 10).unwrap();
        assert_eq!((h[0].kind.as_str(), h[0].hash.as_str()), ("remeasure", second.as_str()));
        assert_eq!(h[0].reason.as_deref(), Some("on a later day"));
    }

    // The worker now fuses wrongly (each member gets the next member's slice): the re-measurement
    // fails the correctness gate, so the best is demoted and the previous one is served again; then
    // that one goes too: native.
    let planted = [("TILEWISE_PLANT_BUG", "rotate_parts")];
    let (reason, store) = remeasure(home.path(), &planted).await;
    assert!(reason.ends_with("demoted"), "{reason}");
    {
        let st = store.lock().unwrap();
        assert_eq!(st.best(&key).unwrap().unwrap().hash, first);
        let h = st.history(None, 10).unwrap();
        assert_eq!(h[0].kind, "demotion");
        assert_eq!((h[0].hash.as_str(), h[0].replaced_hash.as_deref()), (first.as_str(), Some(second.as_str())));
        assert!(h[0].reason.as_deref().unwrap().contains("failed the correctness gate"), "{:?}", h[0].reason);
    }
    let (_, store) = remeasure(home.path(), &planted).await;
    let st = store.lock().unwrap();
    assert!(st.best(&key).unwrap().is_none(), "native is served once every proven policy has gone");
    let h = st.history(None, 10).unwrap();
    assert_eq!((h[0].kind.as_str(), h[0].hash.as_str(), h[0].replaced_hash.as_deref()), ("demotion", "native", Some(first.as_str())));
}
