//! Tuning follows usage, through the real daemon and the real worker on the tiny model: recorded
//! batch-8 server traffic makes the next session measure batch-8 generation (and nothing else),
//! while a session asked for an explicit workload keeps it.

mod session_support;

use serde_json::json;
use session_support::*;
use std::time::Duration;
use tilewise::store::Store;

/// synthetic:tiny's fingerprint, computed by the evaluator exactly as the worker and plugin do.
fn tiny_fingerprint(home: &std::path::Path) -> String {
    let out = std::process::Command::new(python())
        .args(["-c", "from tilewise import models; print(models.load_model('synthetic:tiny')[2]['model_fingerprint'])"])
        .env("TILEWISE_HOME", home)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recorded_batch_8_traffic_makes_the_session_measure_batch_8_generation() {
    let home = tempfile::tempdir().unwrap();
    let d = Daemon::start(home.path(), &[]);
    let fp = tiny_fingerprint(home.path());
    let mut c = d.client().await;
    // What a batching server's plugin reports: mostly batch 8; some single requests.
    let report = json!({"model": fp, "model_name": "synthetic:tiny", "period_s": 60.0, "generations": [
        {"batch": 8, "prompt_tokens": 64, "generated_tokens": 16, "count": 40},
        {"batch": 1, "prompt_tokens": 32, "generated_tokens": 8, "count": 30}]});
    assert_eq!(call(&mut c, "usage.report", report).await["stored"], true);

    let one = |extra: serde_json::Value| {
        let mut p = json!({"policies": [aa_policy(4096)], "budget": {"evaluations": 1}, "pairs": 2, "warmup": 0, "race": false});
        p.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        p
    };
    let sid = call(&mut c, "tuning.start", one(json!({}))).await["session_id"].as_i64().unwrap();
    let shown = wait_finished(&mut c, sid, Duration::from_secs(600)).await;
    assert_eq!(shown["session"]["model"], json!(fp), "{shown}");
    let search = &shown["search"];
    assert_eq!(search["workload"], json!({"inference": {"prompt_tokens": 64, "gen_tokens": 16, "batch": 8}}), "{search}");
    let why = search["workload_from"].as_str().unwrap();
    assert!(why.starts_with("from usage (1 report of 1 process)"), "{why}");
    // The worker measured exactly that: batch-8 generation, no training.
    let store = Store::open(&d.paths.db_file).unwrap();
    let candidate = shown["candidates"][0]["id"].as_i64().unwrap();
    let m = store.measurements(candidate).unwrap().pop().expect("a measurement");
    assert_eq!(m.detail.pointer("/inference/sizes"), Some(&json!({"batch": 8, "prompt_tokens": 64, "gen_tokens": 16})), "{}", m.detail);
    assert!(m.detail["training"].is_null(), "nobody trains this model: training is not measured");

    // An explicit workload wins over usage.
    let explicit = json!({"workload": {"inference": {"prompt_tokens": 16, "gen_tokens": 4}, "training": null}});
    let sid = call(&mut c, "tuning.start", one(explicit)).await["session_id"].as_i64().unwrap();
    let shown = wait_finished(&mut c, sid, Duration::from_secs(600)).await;
    assert_eq!(shown["search"]["workload"], json!({"inference": {"prompt_tokens": 16, "gen_tokens": 4}}), "{shown}");
    assert!(shown["search"]["workload_from"].is_null());
}
