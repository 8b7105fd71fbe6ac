//! notify-based watchers on real files: live config reload (valid edits apply, bad edits keep the
//! old config and say why) and the model directory (weights/config changes signal a new model).

use std::path::Path;
use std::time::Duration;

use std::sync::Arc;

use tilewise::config::Config;
use tilewise::schedule::watch::{map_watch, ConfigWatcher, ModelWatcher, WatchEvent};
use tilewise::schedule::Gates;
use tokio::sync::mpsc;

const DEBOUNCE: Duration = Duration::from_millis(150);

fn load(path: &Path) -> Config {
    Config::load(path).unwrap()
}

async fn next_event(rx: &mut mpsc::UnboundedReceiver<WatchEvent>, within: Duration) -> WatchEvent {
    tokio::time::timeout(within, rx.recv()).await.expect("event in time").expect("watcher alive")
}

async fn no_event(rx: &mut mpsc::UnboundedReceiver<WatchEvent>, within: Duration) {
    if let Ok(Some(ev)) = tokio::time::timeout(within, rx.recv()).await {
        panic!("unexpected event {ev:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_edits_apply_live_and_bad_edits_keep_the_old_config() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(&path, "[idle]\nmin_idle_s = 300\n").unwrap();
    let (tx, mut events) = mpsc::unbounded_channel();
    let watcher = ConfigWatcher::spawn(&path, load(&path), Config::load, tx, DEBOUNCE).unwrap();
    // What the scheduler consumes: the gates, derived from the config, changing only with it.
    let mut gates_rx = map_watch(watcher.subscribe(), |c: &Arc<Config>| Gates::from_config(&c.idle));
    assert_eq!(gates_rx.borrow_and_update().idle_seconds, 300.0);

    // A valid edit, written in place.
    std::fs::write(&path, "[idle]\nmin_idle_s = 60\nrequire_ac_power = false\n").unwrap();
    let ev = next_event(&mut events, Duration::from_secs(3)).await;
    assert_eq!(ev, WatchEvent::ConfigReloaded { path: path.clone() });
    assert_eq!(ev.kind(), "config.reloaded");
    assert_eq!(ev.data()["applied"], true);
    assert_eq!(watcher.current().idle.min_idle_s, 60);
    assert!(!watcher.current().idle.require_ac_power);
    tokio::time::timeout(Duration::from_secs(1), gates_rx.changed()).await.unwrap().unwrap();
    assert_eq!(gates_rx.borrow_and_update().idle_seconds, 60.0);

    // An out-of-range value: rejected with the field and reason, old config stays.
    std::fs::write(&path, "[idle]\nmin_idle_s = 5\nmax_thermal_level = 9\n").unwrap();
    match next_event(&mut events, Duration::from_secs(3)).await {
        WatchEvent::ConfigRejected { error, .. } => assert!(error.contains("idle.max_thermal_level"), "{error}"),
        other => panic!("expected rejection, got {other:?}"),
    }
    assert_eq!(watcher.current().idle.min_idle_s, 60);

    // Broken TOML, then a typo'd key: both rejected.
    std::fs::write(&path, "[idle\nmin_idle_s = 5\n").unwrap();
    assert!(matches!(next_event(&mut events, Duration::from_secs(3)).await, WatchEvent::ConfigRejected { .. }));
    std::fs::write(&path, "[idle]\nmin_idle_secs = 5\n").unwrap();
    let ev = next_event(&mut events, Duration::from_secs(3)).await;
    assert_eq!(ev.data()["applied"], false);
    assert!(ev.data()["error"].as_str().unwrap().contains("min_idle_secs"), "{ev:?}");
    assert_eq!(watcher.current().idle.min_idle_s, 60);
    assert!(gates_rx.has_changed().is_ok_and(|c| !c), "rejected edits do not reach the gates");

    // An edit that leaves the gates alone does not wake the scheduler.
    std::fs::write(&path, "[idle]\nmin_idle_s = 60\nrequire_ac_power = false\n[worker]\nmax_restarts = 5\n").unwrap();
    assert!(matches!(next_event(&mut events, Duration::from_secs(3)).await, WatchEvent::ConfigReloaded { .. }));
    assert_eq!(watcher.current().worker.max_restarts, 5);
    assert!(gates_rx.has_changed().is_ok_and(|c| !c));

    // The way editors save: write a temp file, rename it over the config.
    let tmp = dir.path().join(".config.toml.swp");
    std::fs::write(&tmp, "[idle]\nmin_idle_s = 120\n").unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    assert!(matches!(next_event(&mut events, Duration::from_secs(3)).await, WatchEvent::ConfigReloaded { .. }));
    assert_eq!(watcher.current().idle.min_idle_s, 120);

    // Unrelated files in the same directory are ignored.
    std::fs::write(dir.path().join("notes.txt"), "x").unwrap();
    no_event(&mut events, Duration::from_millis(600)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_writes_is_one_reload() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(&path, "[idle]\nmin_idle_s = 1\n").unwrap();
    let (tx, mut events) = mpsc::unbounded_channel();
    let watcher = ConfigWatcher::spawn(&path, load(&path), Config::load, tx, DEBOUNCE).unwrap();
    for i in 2..=6 {
        std::fs::write(&path, format!("[idle]\nmin_idle_s = {i}\n")).unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(matches!(next_event(&mut events, Duration::from_secs(3)).await, WatchEvent::ConfigReloaded { .. }));
    no_event(&mut events, Duration::from_millis(500)).await;
    assert_eq!(watcher.current().idle.min_idle_s, 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_directory_changes_signal_a_new_model() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("Qwen2.5-0.5B");
    std::fs::create_dir(&model).unwrap();
    std::fs::write(model.join("config.json"), r#"{"hidden_size": 896}"#).unwrap();
    std::fs::write(model.join("model.safetensors"), b"weights v1").unwrap();
    let (tx, mut events) = mpsc::unbounded_channel();
    let watcher = ModelWatcher::spawn(&model, tx, DEBOUNCE).unwrap();
    let mut generation = watcher.generation();
    assert_eq!(*generation.borrow_and_update(), 0);

    // Files that do not change the model: no signal.
    std::fs::write(model.join("README.md"), "notes").unwrap();
    std::fs::write(model.join("tokenizer.json"), "{}").unwrap();
    no_event(&mut events, Duration::from_millis(600)).await;

    // New weights (written as a download does: partial file, then renamed).
    std::fs::write(model.join("model.safetensors.incomplete"), b"weights v2").unwrap();
    std::fs::rename(model.join("model.safetensors.incomplete"), model.join("model.safetensors")).unwrap();
    match next_event(&mut events, Duration::from_secs(3)).await {
        ev @ WatchEvent::ModelChanged { .. } => {
            assert_eq!(ev.kind(), "model.changed");
            let WatchEvent::ModelChanged { dir: d, paths } = ev else { unreachable!() };
            assert_eq!(d, model);
            assert_eq!(paths, vec![model.join("model.safetensors")]);
        }
        other => panic!("{other:?}"),
    }
    tokio::time::timeout(Duration::from_secs(1), generation.changed()).await.unwrap().unwrap();
    assert_eq!(*generation.borrow_and_update(), 1);

    // A config edit in a nested snapshot directory (Hugging Face cache layout) counts too.
    let snap = model.join("snapshots/abc123");
    std::fs::create_dir_all(&snap).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await; // let the recursive watch pick it up
    std::fs::write(snap.join("config.json"), r#"{"hidden_size": 1024}"#).unwrap();
    let WatchEvent::ModelChanged { paths, .. } = next_event(&mut events, Duration::from_secs(3)).await else {
        panic!("expected model.changed");
    };
    assert_eq!(paths, vec![snap.join("config.json")]);
    assert_eq!(*generation.borrow_and_update(), 2);

    // Removing the weights is a change as well.
    std::fs::remove_file(model.join("model.safetensors")).unwrap();
    assert!(matches!(next_event(&mut events, Duration::from_secs(3)).await, WatchEvent::ModelChanged { .. }));
}
