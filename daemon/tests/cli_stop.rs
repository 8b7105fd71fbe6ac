//! `tilewise stop` against the real daemon: it stops the running session and says which; with
//! nothing running it says so (and still exits 0: the wanted state holds).

mod session_support;

use serde_json::json;
use session_support::*;
use std::process::Command;
use std::time::Duration;

const TILEWISE: &str = env!("CARGO_BIN_EXE_tilewise");

fn tilewise(home: &std::path::Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(TILEWISE).env("TILEWISE_HOME", home).env_remove("TILEWISE_SOCKET").args(args).output().unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_stops_the_running_session() {
    let home = tempfile::tempdir().unwrap();
    let d = Daemon::start(home.path(), &[]);
    let mut c = d.client().await;
    let policies: Vec<_> = [1024, 2048, 4096].iter().map(|&t| aa_policy(t)).collect();
    let sid = call(&mut c, "tuning.start", json!({"policies": policies, "pairs": 50, "warmup": 1})).await["session_id"].as_i64().unwrap();

    let (ok, out) = tilewise(home.path(), &["stop", "--session", &(sid + 1).to_string()]);
    assert!(ok, "{out}");
    assert!(out.contains(&format!("session {} is not running (session {sid} is)", sid + 1)), "{out}");

    let (ok, out) = tilewise(home.path(), &["stop"]);
    assert!(ok, "{out}");
    assert_eq!(out.trim(), format!("stopped session {sid}"));
    let shown = wait_finished(&mut c, sid, Duration::from_secs(60)).await;
    assert_eq!(shown["session"]["state"], "stopped", "{shown}");

    let (ok, out) = tilewise(home.path(), &["stop", "--json"]);
    assert!(ok, "{out}");
    assert_eq!(serde_json::from_str::<serde_json::Value>(&out).unwrap()["stopped"], false, "{out}");
    let (_, out) = tilewise(home.path(), &["stop"]);
    assert_eq!(out.trim(), "no tuning session is running");
}
