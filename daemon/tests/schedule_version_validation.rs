//! Version validation (as PyTorch TunableOp does): a best policy is served only for the exact
//! device, model, mlx version and backend it was proven on. A changed model on disk gets a new
//! fingerprint, so its old best is no longer found for it. Real SQLite file in a temp dir.

use serde_json::json;
use tilewise::store::{BestKey, Budget, NewSession, Promotion, Store};

fn key() -> BestKey {
    BestKey { device: "dev-fp-1".into(), model: "model-fp-1".into(), mlx: "0.32.4".into(), backend: "cpu".into() }
}

#[test]
fn best_is_found_only_for_the_exact_target_it_was_proven_on() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(&tmp.path().join("tilewise.db")).unwrap();
    let k = key();
    let sid = store
        .create_session(&NewSession {
            device: k.device.clone(),
            model: k.model.clone(),
            mlx: k.mlx.clone(),
            backend: k.backend.clone(),
            seed: 1,
            budget: Budget { evaluations: Some(1), seconds: None },
        })
        .unwrap();
    store
        .promote(&Promotion {
            key: k.clone(),
            policy: json!({"schema": "tilewise.policy/1"}),
            hash: "sha256:proven".into(),
            ratio: 1.08,
            lo: 1.03,
            hi: 1.12,
            session_id: Some(sid),
            candidate_id: None,
            summary: None,
        })
        .unwrap();
    assert_eq!(store.best(&k).unwrap().unwrap().hash, "sha256:proven");

    let others = [
        ("another mlx version", BestKey { mlx: "0.32.5".into(), ..key() }),
        ("an mlx prerelease", BestKey { mlx: "0.32.4.dev0".into(), ..key() }),
        ("another backend", BestKey { backend: "metal".into(), ..key() }),
        ("another device", BestKey { device: "dev-fp-2".into(), ..key() }),
        ("the model after its weights changed", BestKey { model: "model-fp-2".into(), ..key() }),
        ("a case-changed fingerprint", BestKey { model: "MODEL-FP-1".into(), ..key() }),
    ];
    for (what, other) in others {
        assert!(store.best(&other).unwrap().is_none(), "a best was served for {what}");
    }

    // Reopening the file changes nothing: the key is what the best was stored under.
    drop(store);
    let store = Store::open(&tmp.path().join("tilewise.db")).unwrap();
    assert!(store.best(&key()).unwrap().is_some());
    assert!(store.best(&BestKey { mlx: "0.33.0".into(), ..key() }).unwrap().is_none());
}

mod common;

use std::path::PathBuf;
use std::time::Duration;
use tilewise::ipc::protocol::{PolicyGetParams, PolicySource};
use tilewise::policy::Policy;

fn proven(key: &BestKey) -> serde_json::Value {
    json!({"schema": "tilewise.policy/1", "name": "proven",
           "target": {"device": key.device, "model": key.model, "mlx": key.mlx, "backend": key.backend},
           "matmul": {"rules": [{"m": [1, 16], "plan": {"kind": "native"}}], "default": {"kind": "native"}}})
}

/// The same rule over the socket, for every part of the key (daemon_socket.rs covers mlx).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_get_serves_the_best_only_for_its_exact_key() {
    let d = common::TestDaemon::start();
    let mut c = d.client().await;
    let device = c.status().await.unwrap().device_fingerprint;
    let k = BestKey { device: device.clone(), model: "model-fp-1".into(), mlx: "0.32.4".into(), backend: "cpu".into() };
    let doc = proven(&k);
    let hash = Policy::from_value(&doc).unwrap().content_hash();
    Store::open(&d.paths.db_file)
        .unwrap()
        .promote(&Promotion {
            key: k.clone(),
            policy: doc,
            hash: hash.clone(),
            ratio: 1.1,
            lo: 1.04,
            hi: 1.15,
            session_id: None,
            candidate_id: None,
            summary: None,
        })
        .unwrap();
    let get = |model: &str, mlx: &str, backend: &str, device: Option<&str>| PolicyGetParams {
        model: model.into(),
        mlx: mlx.into(),
        backend: Some(backend.into()),
        device: device.map(Into::into),
        model_name: None,
        dtype: None,
    };
    // Exact key (device defaulting to this machine, and given explicitly): the proven best.
    for dev in [None, Some(device.as_str())] {
        let r = c.policy_get(&get("model-fp-1", "0.32.4", "cpu", dev)).await.unwrap();
        assert_eq!((r.source, r.hash.as_str()), (PolicySource::Best, hash.as_str()), "{}", r.reason);
    }
    // Any other part differs: native, never the best proven elsewhere.
    for (what, p) in [
        ("backend", get("model-fp-1", "0.32.4", "metal", None)),
        ("device", get("model-fp-1", "0.32.4", "cpu", Some("dev-another-machine"))),
        ("model", get("model-fp-2", "0.32.4", "cpu", None)),
        ("mlx", get("model-fp-1", "0.32.5", "cpu", None)),
    ] {
        let r = c.policy_get(&p).await.unwrap();
        assert_eq!(r.source, PolicySource::Native, "another {what} got the best: {}", r.reason);
    }
}

fn python() -> PathBuf {
    std::env::var_os("TILEWISE_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python"))
}

/// A model's weights change on disk: the watcher signals it, the evaluator gives the model a new
/// fingerprint, and the best proven for the old weights is not found for the new ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changed_weights_are_a_new_target_without_the_old_best() {
    use tilewise::schedule::watch::{ModelWatcher, WatchEvent};
    use tilewise::worker::{Supervisor, WorkerConfig};
    let home = tempfile::tempdir().unwrap();
    let mut cfg = WorkerConfig::new(python());
    cfg.env.push(("TILEWISE_HOME".into(), home.path().display().to_string()));
    let load = |cfg: WorkerConfig| async move {
        let mut sup = Supervisor::new(cfg);
        let v = sup.load(json!({"model": "synthetic:tiny"}), Duration::from_secs(300)).await.unwrap();
        sup.shutdown().await;
        (v["model_path"].as_str().unwrap().to_string(), v["model_fingerprint"].as_str().unwrap().to_string())
    };
    let (dir, fp1) = load(cfg.clone()).await;

    let store = Store::open(&home.path().join("tilewise.db")).unwrap();
    let k1 = BestKey { model: fp1.clone(), ..key() };
    store
        .promote(&Promotion {
            key: k1.clone(),
            policy: proven(&k1),
            hash: "sha256:old".into(),
            ratio: 1.1,
            lo: 1.05,
            hi: 1.2,
            session_id: None,
            candidate_id: None,
            summary: None,
        })
        .unwrap();

    let (tx, mut events) = tokio::sync::mpsc::unbounded_channel();
    let _watcher = ModelWatcher::spawn(&dir, tx, Duration::from_millis(300)).unwrap();
    // New weights: one tensor shifted, written the way mlx saves them.
    let script = "import glob,sys,mlx.core as mx\n\
                  p=sorted(glob.glob(sys.argv[1]+'/*.safetensors'))[0]\n\
                  w=mx.load(p); k=sorted(w)[0]; w[k]=w[k]+1; mx.save_safetensors(p, w, metadata={'format':'mlx'})\n";
    let st = std::process::Command::new(python()).args(["-c", script, &dir]).status().unwrap();
    assert!(st.success());
    let ev = tokio::time::timeout(Duration::from_secs(10), events.recv()).await.expect("model.changed in time").unwrap();
    assert!(matches!(&ev, WatchEvent::ModelChanged { dir: d, .. } if d == &PathBuf::from(&dir)), "{ev:?}");

    let (_, fp2) = load(cfg).await;
    assert_ne!(fp1, fp2, "changed weights must change the fingerprint");
    assert!(store.best(&k1).unwrap().is_some());
    assert!(store.best(&BestKey { model: fp2, ..key() }).unwrap().is_none(), "the old best was found for the new weights");
}
