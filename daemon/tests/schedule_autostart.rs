//! The daemon tunes by itself when the machine is free (schedule::autostart), through the real
//! `tilewised`, its socket, store and Python worker (tiny model, CPU MLX), with the file-driven
//! activity source (`TILEWISE_ACTIVITY_FILE`):
//! - on battery nothing starts; on AC and idle a session starts by itself;
//! - a session a person stops is not restarted while the same idle period lasts, but is after the
//!   person came back and left again;
//! - a finished session is not repeated before `retune_after_h`;
//! - `idle.enabled = false` (set live through `config.set`) starts nothing.

mod session_support;

use serde_json::json;
use session_support::*;
use std::path::Path;
use std::time::Duration;
use tilewise::schedule::activity::ActivityFile;
use tilewise::store::Event;
use tokio::sync::mpsc;

/// Asserts that no `kind` event arrives for `quiet`.
async fn none_of(rx: &mut mpsc::Receiver<Event>, kind: &str, quiet: Duration) {
    let deadline = tokio::time::Instant::now() + quiet;
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(e)) if e.kind == kind => panic!("unexpected {kind}: {}", e.data),
            Ok(Some(_)) => {}
            Ok(None) => panic!("event stream ended"),
            Err(_) => return,
        }
    }
}

fn set(activity: &Path, a: ActivityFile) {
    a.write_to(activity).unwrap();
}

const IDLE: &str = "enabled = true\nmin_idle_s = 1\nrequire_ac_power = true\nmodel = \"synthetic:tiny\"\n\
                    session_evaluations = 2\nretune_after_h = 24\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_starts_tuning_when_the_machine_is_free() {
    let home = tempfile::tempdir().unwrap();
    let activity = home.path().join("activity.json");
    set(&activity, ActivityFile { on_ac_power: false, battery_percent: Some(80), ..Default::default() });
    let d = Daemon::start_with_idle(home.path(), &[("TILEWISE_ACTIVITY_FILE", activity.to_str().unwrap())], IDLE);
    let mut events = d.client().await.subscribe_events(None).await.unwrap();
    let mut c = d.client().await;

    // On battery: idle or not, nothing starts.
    none_of(&mut events, "tuning.auto_started", Duration::from_secs(4)).await;
    assert_eq!(call(&mut c, "status", json!({})).await["tuning"]["state"], "idle");

    // On AC and idle: a session of the configured model starts by itself.
    set(&activity, ActivityFile::default());
    let auto = next(&mut events, "tuning.auto_started", Duration::from_secs(60)).await;
    assert_eq!(auto.data["model"], "synthetic:tiny", "{}", auto.data);
    assert_eq!(auto.data["budget"]["evaluations"], 2);
    let first = auto.data["session_id"].as_i64().unwrap();
    next(&mut events, "session.started", Duration::from_secs(60)).await;
    assert_eq!(call(&mut c, "status", json!({})).await["tuning"]["session_id"], json!(first));

    // A person stops it: not restarted while the machine stays idle...
    assert_eq!(call(&mut c, "tuning.stop", json!({})).await["stopped"], true);
    none_of(&mut events, "tuning.auto_started", Duration::from_secs(5)).await;
    // ...but after they came back and left again (a new idle period), it starts again.
    set(&activity, ActivityFile { user_idle_s: 0.0, ..Default::default() });
    tokio::time::sleep(Duration::from_millis(1500)).await; // the gate closes (file source: at once)
    set(&activity, ActivityFile::default());
    let again = next(&mut events, "tuning.auto_started", Duration::from_secs(60)).await;
    let second = again.data["session_id"].as_i64().unwrap();
    assert_ne!(second, first, "a stopped session is not resumed: a new one starts");

    // It runs to the end of its budget; a finished session is not repeated within retune_after_h.
    let shown = wait_finished(&mut c, second, Duration::from_secs(900)).await;
    assert_eq!(shown["session"]["state"], "finished", "{shown}");
    none_of(&mut events, "tuning.auto_started", Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn automatic_tuning_off_starts_nothing_until_turned_on() {
    let home = tempfile::tempdir().unwrap();
    let activity = home.path().join("activity.json");
    set(&activity, ActivityFile::default());
    let idle = IDLE.replace("enabled = true", "enabled = false");
    let d = Daemon::start_with_idle(home.path(), &[("TILEWISE_ACTIVITY_FILE", activity.to_str().unwrap())], &idle);
    let mut events = d.client().await.subscribe_events(None).await.unwrap();
    let mut c = d.client().await;
    none_of(&mut events, "tuning.auto_started", Duration::from_secs(4)).await;
    // Turned on live (what the app's "Tune only when idle" toggle does): it starts.
    call(&mut c, "config.set", json!({"key": "idle.enabled", "value": true})).await;
    let auto = next(&mut events, "tuning.auto_started", Duration::from_secs(60)).await;
    let sid = auto.data["session_id"].as_i64().unwrap();
    call(&mut c, "tuning.stop", json!({"session_id": sid})).await;
}

/// With no `[idle] model`, the idle machine tunes the model people ran most through the plugin
/// that has no proven policy, by the name they loaded it with (here a model directory).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_configured_model_the_most_used_untuned_model_is_tuned() {
    let home = tempfile::tempdir().unwrap();
    // The tiny model in a directory of its own, and its fingerprint, as a plugin would see them
    // (made before the daemon starts: it takes seconds on a loaded box).
    let out = std::process::Command::new(python())
        .args(["-c", "from tilewise import models; d = models.synthesize('tiny'); print(d); print(models.load_model(str(d))[2]['model_fingerprint'])"])
        .env("TILEWISE_HOME", home.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (dir, fp) = {
        let mut lines = text.lines();
        (lines.next().unwrap().to_string(), lines.next().unwrap().to_string())
    };
    // A person is active until the plugin's report is in: idle time grows from the file's last
    // write, and 5 s of it open the gate (far more than one call takes, even on a loaded box).
    let activity = home.path().join("activity.json");
    let active = || set(&activity, ActivityFile { user_idle_s: 0.0, ..Default::default() });
    active();
    let idle = "enabled = true\nmin_idle_s = 5\nrequire_ac_power = true\nsession_evaluations = 2\nretune_after_h = 24\n";
    let d = Daemon::start_with_idle(home.path(), &[("TILEWISE_ACTIVITY_FILE", activity.to_str().unwrap())], idle);
    active();
    let mut c = d.client().await;
    let report = json!({"model": fp, "model_name": dir, "period_s": 60.0,
                        "generations": [{"batch": 1, "prompt_tokens": 32, "generated_tokens": 16, "count": 5}]});
    assert_eq!(call(&mut c, "usage.report", report).await["stored"], true);
    let mut events = d.client().await.subscribe_events(None).await.unwrap();
    set(&activity, ActivityFile::default()); // the person leaves
    let auto = next(&mut events, "tuning.auto_started", Duration::from_secs(60)).await;
    assert_eq!(auto.data["model"], json!(dir), "{}\n{}", auto.data, std::fs::read_to_string(&d.log).unwrap_or_default());
    assert_eq!(call(&mut c, "tuning.stop", json!({})).await["stopped"], true);
}
