//! notify-based watchers on real files: live config reload (valid edits apply, bad edits keep the
//! old config and say why) and the model directory (weights/config changes signal a new model).

use std::path::Path;
use std::time::Duration;

use tilewise::schedule::watch::{map_watch, ConfigWatcher, ModelWatcher, WatchEvent};
use tilewise::schedule::Gates;
use tokio::sync::mpsc;

const DEBOUNCE: Duration = Duration::from_millis(150);

/// The loader the test uses for the scheduler's part of the config: JSON gates, validated.
fn load_gates(path: &Path) -> Result<Gates, String> {
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    let g: Gates = serde_json::from_str(&text).map_err(|e| e.to_string())?;
    g.validate()?;
    Ok(g)
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
    let path = dir.path().join("config.json");
    std::fs::write(&path, r#"{"idle_seconds": 300}"#).unwrap();
    let initial = load_gates(&path).unwrap();
    let (tx, mut events) = mpsc::unbounded_channel();
    let watcher = ConfigWatcher::spawn(&path, initial, load_gates, tx, DEBOUNCE).unwrap();
    let mut gates_rx = map_watch(watcher.subscribe(), |g: &std::sync::Arc<Gates>| (**g).clone());
    assert_eq!(watcher.current().idle_seconds, 300.0);

    // A valid edit, written in place.
    std::fs::write(&path, r#"{"idle_seconds": 60, "require_ac_power": false}"#).unwrap();
    let ev = next_event(&mut events, Duration::from_secs(3)).await;
    assert_eq!(ev, WatchEvent::ConfigReloaded { path: path.clone() });
    assert_eq!(ev.kind(), "config.reloaded");
    assert_eq!(ev.data()["applied"], true);
    assert_eq!(watcher.current().idle_seconds, 60.0);
    assert!(!watcher.current().require_ac_power);
    tokio::time::timeout(Duration::from_secs(1), gates_rx.changed()).await.unwrap().unwrap();
    assert_eq!(gates_rx.borrow_and_update().idle_seconds, 60.0);

    // An invalid value: rejected with the reason, old config stays.
    std::fs::write(&path, r#"{"idle_seconds": -5}"#).unwrap();
    match next_event(&mut events, Duration::from_secs(3)).await {
        WatchEvent::ConfigRejected { error, .. } => assert!(error.contains("idle_seconds"), "{error}"),
        other => panic!("expected rejection, got {other:?}"),
    }
    assert_eq!(watcher.current().idle_seconds, 60.0);

    // Broken JSON, then a typo'd key: both rejected.
    std::fs::write(&path, r#"{"idle_seconds": "#).unwrap();
    assert!(matches!(next_event(&mut events, Duration::from_secs(3)).await, WatchEvent::ConfigRejected { .. }));
    std::fs::write(&path, r#"{"idle_secnds": 5}"#).unwrap();
    let ev = next_event(&mut events, Duration::from_secs(3)).await;
    assert_eq!(ev.data()["applied"], false);
    assert!(ev.data()["error"].as_str().unwrap().contains("idle_secnds"));
    assert_eq!(watcher.current().idle_seconds, 60.0);
    assert!(gates_rx.has_changed().is_ok_and(|c| !c), "rejected edits do not reach the gates");

    // The way editors save: write a temp file, rename it over the config.
    let tmp = dir.path().join(".config.json.swp");
    std::fs::write(&tmp, r#"{"idle_seconds": 120}"#).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    assert!(matches!(next_event(&mut events, Duration::from_secs(3)).await, WatchEvent::ConfigReloaded { .. }));
    assert_eq!(watcher.current().idle_seconds, 120.0);

    // Unrelated files in the same directory are ignored.
    std::fs::write(dir.path().join("notes.txt"), "x").unwrap();
    no_event(&mut events, Duration::from_millis(600)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_writes_is_one_reload() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.json");
    std::fs::write(&path, r#"{"idle_seconds": 1}"#).unwrap();
    let (tx, mut events) = mpsc::unbounded_channel();
    let watcher = ConfigWatcher::spawn(&path, load_gates(&path).unwrap(), load_gates, tx, DEBOUNCE).unwrap();
    for i in 2..=6 {
        std::fs::write(&path, format!(r#"{{"idle_seconds": {i}}}"#)).unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(matches!(next_event(&mut events, Duration::from_secs(3)).await, WatchEvent::ConfigReloaded { .. }));
    no_event(&mut events, Duration::from_millis(500)).await;
    assert_eq!(watcher.current().idle_seconds, 6.0);
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
