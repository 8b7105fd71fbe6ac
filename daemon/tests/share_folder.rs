//! Sharing through a folder, with two real daemons (their own homes) and the real worker on the tiny
//! model: the first writes its proven policy into the shared folder; the second imports it, serves
//! native until it has verified it here, then serves it only if the verification promoted it (with
//! where it came from), else keeps it rejected with the reason. A tampered bundle is refused whole.

mod session_support;

use serde_json::{json, Value};
use session_support::*;
use std::path::Path;
use std::time::{Duration, Instant};
use tilewise::paths::Paths;
use tilewise::store::{BestKey, Promotion, Store};

/// synthetic:tiny's fingerprint and this Python's MLX version.
fn tiny_model_and_mlx(home: &Path) -> (String, String) {
    let out = std::process::Command::new(python())
        .args([
            "-c",
            "import mlx.core as mx; from tilewise import models; print(models.load_model('synthetic:tiny')[2]['model_fingerprint']); print(mx.__version__)",
        ])
        .env("TILEWISE_HOME", home)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let mut lines = text.lines();
    (lines.next().unwrap().to_string(), lines.next().unwrap().to_string())
}

fn wait_for<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn bundle_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> =
        std::fs::read_dir(dir).unwrap().flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|e| e == "json")).collect();
    v.sort();
    v
}

/// Stores, in the home's database, a best for synthetic:tiny on this machine that fuses `groups`
/// (as if a session had proven it 1.06× [1.03, 1.07]); returns its key and hash.
fn seed_best(home: &Path, groups: &[(&str, &[&str])]) -> (BestKey, String) {
    let (model, mlx) = tiny_model_and_mlx(home);
    let key = BestKey { device: tilewise::probe::detect().fingerprint(), model, mlx, backend: "cpu".into() };
    let policy = json!({"schema": "tilewise.policy/1", "name": "shared fusion",
        "target": {"device": key.device, "model": key.model, "mlx": key.mlx, "backend": key.backend},
        "matmul": {"rules": [], "default": {"kind": "native"}},
        "fusion": {"groups": groups.iter().map(|(s, m)| json!({"scope": s, "members": m})).collect::<Vec<_>>()}});
    let hash = tilewise::policy::Policy::from_value(&policy).unwrap().content_hash();
    let paths = Paths::under_home(home);
    std::fs::create_dir_all(paths.db_file.parent().unwrap()).unwrap();
    let store = Store::open(&paths.db_file).unwrap();
    store
        .promote(&Promotion {
            key: key.clone(),
            policy,
            hash: hash.clone(),
            ratio: 1.06,
            lo: 1.03,
            hi: 1.07,
            session_id: None,
            candidate_id: None,
            summary: None,
        })
        .unwrap();
    (key, hash)
}

/// Origins of a session's candidates, in the order measured.
fn origins(shown: &Value) -> Vec<String> {
    shown["candidates"].as_array().unwrap().iter().map(|c| c["origin"].as_str().unwrap().to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_imported_policy_is_measured_first_by_a_search_unless_it_starts_cold() {
    // Machine A proved gate/up fusion alone (not the search's first seed here), and exports it.
    let (home_a, home_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (key, _) = seed_best(home_a.path(), &[("model.layers.*.mlp", &["gate_proj", "up_proj"])]);
    let bundle_file = home_b.path().join("from-a.json");
    {
        let a = Daemon::start_with_idle(home_a.path(), &[], "enabled = false\n");
        let mut c = a.client().await;
        let bundle = call(&mut c, "policy.export", json!({})).await;
        std::fs::write(&bundle_file, bundle.to_string()).unwrap();
    }
    let b = Daemon::start_with_idle(home_b.path(), &[], "enabled = false\n");
    let mut c = b.client().await;
    let imported = call(&mut c, "policy.import", json!({"path": bundle_file})).await;
    assert_eq!(imported["imported"][0]["state"], "pending", "{imported}");
    let one_evaluation = json!({"model": "synthetic:tiny", "now": true, "pairs": 4, "warmup": 1, "budget": {"evaluations": 1}});

    // Cold: the search's own seeds, the import untouched.
    let mut cold = one_evaluation.clone();
    cold["cold"] = json!(true);
    let sid = call(&mut c, "tuning.start", cold).await["session_id"].as_i64().unwrap();
    let shown = wait_finished(&mut c, sid, Duration::from_secs(600)).await;
    assert!(origins(&shown).iter().all(|o| !o.starts_with("warm:")), "{:?}", origins(&shown));
    assert_eq!(call(&mut c, "imports.list", json!({})).await["imports"][0]["state"], "pending");

    // Warm: the import is the first candidate, the session says so, and it is decided after.
    let mut events = b.client().await.subscribe_events(Some(vec!["session.started".into()])).await.unwrap();
    let sid = call(&mut c, "tuning.start", one_evaluation).await["session_id"].as_i64().unwrap();
    let started = next(&mut events, "session.started", Duration::from_secs(60)).await;
    let warm = started.data["warm_start"].as_array().unwrap();
    assert_eq!(warm.len(), 1, "{}", started.data);
    assert_eq!(warm[0]["same_model"], true);
    let shown = wait_finished(&mut c, sid, Duration::from_secs(600)).await;
    let first = &shown["candidates"][0];
    assert!(first["origin"].as_str().unwrap().starts_with("warm:"), "{:?}", origins(&shown));
    assert_eq!(first["hash"], warm[0]["hash"]);
    let imp = call(&mut c, "imports.list", json!({})).await["imports"][0].clone();
    assert!(["verified", "rejected"].contains(&imp["state"].as_str().unwrap()), "{imp}");
    assert_eq!(imp["session_id"], json!(sid));
    let served = call(&mut c, "policy.get", json!({"model": key.model, "mlx": key.mlx, "backend": "cpu"})).await;
    assert_eq!(served["hash"] == first["hash"], imp["state"] == "verified", "served iff verified: {served}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_shared_through_a_folder_is_served_only_after_this_machine_verified_it() {
    let shared = tempfile::tempdir().unwrap();
    let (home_a, home_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let config = format!("enabled = false\n\n[share]\ndir = {:?}\n", shared.path().display().to_string());

    // Machine A has proven a fusion of the tiny model (written through its store before it starts).
    let (key, hash) = seed_best(
        home_a.path(),
        &[("model.layers.*.self_attn", &["q_proj", "k_proj", "v_proj"]), ("model.layers.*.mlp", &["gate_proj", "up_proj"])],
    );
    let a = Daemon::start_with_idle(home_a.path(), &[], &config);
    let a_file = wait_for("A's bundle in the shared folder", Duration::from_secs(30), || bundle_files(shared.path()).into_iter().next());
    let bundle = tilewise::share::bundle::check(&std::fs::read_to_string(&a_file).unwrap()).unwrap();
    assert_eq!(bundle.entries.iter().map(|e| e.hash.as_str()).collect::<Vec<_>>(), vec![hash.as_str()]);

    // Machine B imports it at start: pending, and native is served meanwhile.
    let b = Daemon::start_with_idle(home_b.path(), &[], &config);
    let mut c = b.client().await;
    let get = json!({"model": key.model, "mlx": key.mlx, "backend": "cpu"});
    let mut pending = Value::Null;
    for _ in 0..100 {
        pending = call(&mut c, "imports.list", json!({})).await;
        if pending["imports"].as_array().is_some_and(|a| !a.is_empty()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let imp = &pending["imports"][0];
    assert_eq!((imp["hash"].as_str(), imp["state"].as_str()), (Some(hash.as_str()), Some("pending")), "{pending}");
    assert_eq!(call(&mut c, "policy.get", get.clone()).await["source"], "native", "an import is not served unverified");

    // A tampered copy in the folder is refused whole: an event says why, nothing new is stored.
    let mut tampered: Value = serde_json::from_str(&std::fs::read_to_string(&a_file).unwrap()).unwrap();
    tampered["entries"][0]["evidence"]["lo"] = json!(1.5);
    tampered["entries"][0]["evidence"]["model"] = json!("mdl-ffffffffffffffffffffffffffffffff");
    let mut events = b.client().await.subscribe_events(Some(vec!["policy.import_refused".into()])).await.unwrap();
    std::fs::write(shared.path().join("edited.json"), tampered.to_string()).unwrap();
    let refused = next(&mut events, "policy.import_refused", Duration::from_secs(30)).await;
    assert!(refused.data["reason"].as_str().unwrap().contains("tampered bundle"), "{}", refused.data);
    assert_eq!(call(&mut c, "imports.list", json!({})).await["imports"].as_array().unwrap().len(), 1);

    // B verifies it here (what `tilewise verify` and the idle auto-starter run).
    let started =
        call(&mut c, "tuning.start", json!({"model": "synthetic:tiny", "verify": true, "now": true, "pairs": 10, "warmup": 1})).await;
    let sid = started["session_id"].as_i64().unwrap();
    let shown = wait_finished(&mut c, sid, Duration::from_secs(900)).await;
    let decided = call(&mut c, "imports.list", json!({})).await;
    let imp = &decided["imports"][0];
    let state = imp["state"].as_str().unwrap();
    let served = call(&mut c, "policy.get", get).await;
    eprintln!("verification: {state}: {}", imp["reason"]);
    match state {
        "verified" => {
            assert_eq!((served["source"].as_str(), served["hash"].as_str()), (Some("best"), Some(hash.as_str())), "{served}");
            let origin = served["evidence"]["origin"].as_str().unwrap();
            assert!(origin.starts_with("imported from") && origin.contains(&format!("session {sid}")), "{origin}");
            // And B now shares it too, from its own evidence.
            wait_for("B's bundle with the verified policy", Duration::from_secs(30), || {
                bundle_files(shared.path()).into_iter().filter(|p| *p != a_file && !p.ends_with("edited.json")).find(|p| {
                    std::fs::read_to_string(p).is_ok_and(|t| tilewise::share::bundle::check(&t).is_ok_and(|b| b.entries.len() == 1))
                })
            });
        }
        "rejected" => {
            assert_eq!(served["source"], "native", "a rejected import is never served: {served}");
            assert!(
                imp["reason"].as_str().unwrap().starts_with("measured here") || imp["reason"].as_str().unwrap().starts_with("failed here")
            );
        }
        other => panic!("the verification session left the import {other}: {decided}\n{shown}"),
    }
    assert_eq!(imp["session_id"], json!(sid));
    drop(a);
}
