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
