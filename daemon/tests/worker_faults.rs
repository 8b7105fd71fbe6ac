//! The worker driver against the REAL Python worker (`python -m tilewise.worker`, tiny synthetic
//! model on CPU MLX): protocol errors keep it alive; hang, crash, garbage and out-of-memory (through
//! the worker's own fault-injection switch) kill it with a typed reason, and the supervisor brings it
//! back with the model loaded again.

use serde_json::json;
use std::path::PathBuf;
use std::time::Duration;
use tilewise::worker::{Supervisor, Worker, WorkerConfig, WorkerError};
use tokio_util::sync::CancellationToken;

fn python() -> PathBuf {
    std::env::var_os("TILEWISE_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python"))
}

fn config(home: &std::path::Path) -> WorkerConfig {
    let mut cfg = WorkerConfig::new(python());
    cfg.env.push(("TILEWISE_HOME".into(), home.display().to_string()));
    cfg
}

const LONG: Duration = Duration::from_secs(300);

#[tokio::test]
async fn protocol_errors_keep_the_worker_and_cancel_stops_a_measurement() {
    let home = tempfile::tempdir().unwrap();
    // This test is about the cooperative path (the worker answers `cancelled` and lives on), so
    // a loaded CI box must not turn a slow sample boundary into a kill.
    let mut cfg = config(home.path());
    cfg.cancel_grace = Duration::from_secs(30);
    let mut w = Worker::spawn(&cfg).await.expect("worker starts");
    assert_eq!(w.ready().protocol, 1);
    assert_eq!(w.ready().backend, "cpu");

    // Errors the worker reports itself are Remote and not fatal.
    let e = w.request("frobnicate", json!({}), LONG, None, |_| {}).await.unwrap_err();
    assert!(matches!(&e, WorkerError::Remote { code, .. } if code == "bad_request"), "{e}");
    let e = w.request("evaluate", json!({"policy": {}}), LONG, None, |_| {}).await.unwrap_err();
    assert!(matches!(&e, WorkerError::Remote { .. }), "{e}");
    assert!(!e.is_fatal());
    assert_eq!(w.request("ping", json!({}), LONG, None, |_| {}).await.unwrap()["pong"], true);

    let loaded = w.request("load", json!({"model": "synthetic:tiny"}), LONG, None, |_| {}).await.unwrap();
    assert!(loaded["model_fingerprint"].as_str().unwrap().starts_with("mdl-"));
    assert!(loaded["shapes"].as_array().unwrap().len() >= 4);

    // Cancel an evaluation once it reports progress: it ends `cancelled`, the worker lives on.
    let cancel = CancellationToken::new();
    let trigger = cancel.clone();
    let policy = json!({"schema": "tilewise.policy/1", "target": {"device": "*", "model": "*", "mlx": "*", "backend": "*"},
                        "matmul": {"rules": [], "default": {"kind": "split", "tile_m": null, "tile_n": 32, "tile_k": null}}});
    let mut progress = 0;
    let r = w
        .request("evaluate", json!({"policy": policy, "pairs": 500, "warmup": 1}), LONG, Some(&cancel), |p| {
            progress += 1;
            if p["stage"] == "inference" {
                trigger.cancel();
            }
        })
        .await;
    assert!(matches!(r, Err(WorkerError::Cancelled)), "{r:?}");
    assert!(progress >= 1);
    assert!(w.is_alive());
    assert_eq!(w.request("ping", json!({}), LONG, None, |_| {}).await.unwrap()["pong"], true);
    w.shutdown().await;
}

#[tokio::test]
async fn hang_crash_garbage_and_oom_are_survived_with_their_reason() {
    let home = tempfile::tempdir().unwrap();
    let mut sup = Supervisor::new(config(home.path()));
    let loaded = sup.load(json!({"model": "synthetic:tiny"}), LONG).await.unwrap();
    let fp = loaded["model_fingerprint"].clone();
    assert_eq!(sup.starts, 1);

    let cases: [(&str, Duration, &str); 4] = [
        ("hang", Duration::from_secs(3), "hung"),
        ("crash", LONG, "exit status 3"),
        ("garbage", LONG, "this line is not JSON"),
        ("oom", LONG, "out of memory"),
    ];
    for (i, (fault, timeout, text)) in cases.into_iter().enumerate() {
        let e = sup.request("ping", json!({"inject_fault": fault}), timeout, None, |_| {}).await.expect_err(fault);
        assert_eq!(e.kind(), fault, "{fault}: {e}");
        assert!(e.is_fatal());
        assert!(e.to_string().contains(text), "{fault}: {e}");
        // The stderr tail is part of the reason (the worker announces each injected fault).
        assert!(e.to_string().contains("injecting fault"), "{fault}: {e}");
        // The next request gets a fresh worker with the model loaded again.
        let pong = sup.request("ping", json!({}), LONG, None, |_| {}).await.unwrap();
        assert_eq!(pong["pong"], true);
        assert_eq!(sup.starts, i as u64 + 2, "{fault}: restarted once");
        assert_eq!(sup.loaded().unwrap()["model_fingerprint"], fp);
    }
    sup.shutdown().await;
}

#[tokio::test]
async fn a_missing_interpreter_is_a_spawn_error() {
    let e = match Worker::spawn(&WorkerConfig::new("/nonexistent/python")).await {
        Err(e) => e,
        Ok(_) => panic!("spawned a missing interpreter"),
    };
    assert_eq!(e.kind(), "spawn");
    assert!(e.to_string().contains("/nonexistent/python"), "{e}");
}

/// A worker that cannot stop (hung inside a request) is killed once the cancel grace is over: the
/// scheduler's one-second pause does not depend on the worker's cooperation.
#[tokio::test]
async fn a_worker_that_ignores_a_cancel_is_killed_after_the_grace() {
    let home = tempfile::tempdir().unwrap();
    let mut cfg = config(home.path());
    cfg.env.push(("TILEWISE_WORKER_FAULT".into(), "evaluate:hang".into()));
    assert_eq!(cfg.cancel_grace, Duration::from_millis(700), "the default leaves the 1 s pause budget room");
    let mut w = Worker::spawn(&cfg).await.expect("worker starts");
    w.request("load", json!({"model": "synthetic:tiny"}), LONG, None, |_| {}).await.unwrap();
    let cancel = CancellationToken::new();
    let trigger = cancel.clone();
    let fired = std::sync::Arc::new(std::sync::Mutex::new(None));
    let fired_at = fired.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(500)).await;
        *fired_at.lock().unwrap() = Some(std::time::Instant::now());
        trigger.cancel();
    });
    let policy = json!({"schema": "tilewise.policy/1", "target": {"device": "*", "model": "*", "mlx": "*", "backend": "*"},
                        "matmul": {"rules": [], "default": {"kind": "native"}}});
    let r = w.request("evaluate", json!({"policy": policy, "pairs": 4}), LONG, Some(&cancel), |_| {}).await;
    let took = fired.lock().unwrap().expect("cancel fired").elapsed();
    eprintln!("hung worker gone {took:?} after the cancel");
    assert!(matches!(r, Err(WorkerError::Cancelled)), "{r:?}");
    assert!(!w.is_alive(), "the hung worker was killed");
    // Grace plus the kill; far below the old 10 s grace even on a loaded machine.
    assert!(took < Duration::from_secs(3), "took {took:?}");
}
