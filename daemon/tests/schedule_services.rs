//! The scheduling services as tilewised runs them: a real config file reloaded live into the
//! gates, events persisted through the real EventBus/SQLite store, model-directory watching.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tilewise::events::EventBus;
use tilewise::schedule::activity::ActivityFile;
use tilewise::schedule::daemon::ScheduleServices;
use tilewise::schedule::{FileSource, Gate};
use tilewise::store::{SharedStore, Store};
use tokio::sync::broadcast;

async fn next_event(rx: &mut broadcast::Receiver<tilewise::store::Event>, kind: &str) -> tilewise::store::Event {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Ok(e)) if e.kind == kind => return e,
            Ok(Ok(_)) => {}
            other => panic!("no {kind} event: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_edits_reach_the_gates_and_the_event_log() {
    let home = tempfile::tempdir().unwrap();
    let config_file = home.path().join("config/config.toml"); // directory created by start()
    let activity = home.path().join("activity.json");
    ActivityFile { user_idle_s: 10.0, ..Default::default() }.write_to(&activity).unwrap();
    let store: SharedStore = Arc::new(Mutex::new(Store::open(&home.path().join("tilewise.db")).unwrap()));
    let bus = EventBus::new(store.clone());
    let mut events = bus.subscribe();
    let applied_idle = Arc::new(AtomicU64::new(0));
    let seen = applied_idle.clone();
    let services = ScheduleServices::start(
        &config_file,
        tilewise::config::Config::default(),
        bus,
        Arc::new(FileSource::new(&activity).unwrap()),
        move |c| seen.store(c.idle.min_idle_s, Ordering::SeqCst),
    )
    .unwrap();
    let mut decisions = services.decisions();
    decisions.wait_for(|d| d.blocked_by == vec![Gate::Idle]).await.unwrap();
    assert!(decisions.borrow().summary().contains("needs 5 min idle"), "{}", decisions.borrow().summary());

    // Lower the idle requirement in the file: the gate opens without a restart.
    std::fs::write(&config_file, "[idle]\nmin_idle_s = 5\n").unwrap();
    let ev = next_event(&mut events, "config.reloaded").await;
    assert_eq!(ev.data["applied"], true);
    tokio::time::timeout(Duration::from_secs(2), decisions.wait_for(|d| d.run)).await.unwrap().unwrap();
    assert_eq!(applied_idle.load(Ordering::SeqCst), 5);

    // A bad edit is refused, logged as an event with the reason, and changes nothing.
    std::fs::write(&config_file, "[idle]\nmin_idle_s = \"soon\"\n").unwrap();
    let ev = next_event(&mut events, "config.reloaded").await;
    assert_eq!(ev.data["applied"], false);
    assert!(ev.data["error"].as_str().unwrap().contains("idle.min_idle_s"), "{}", ev.data);
    assert!(decisions.borrow().run);
    assert_eq!(applied_idle.load(Ordering::SeqCst), 5);
    // Both events are in the database, not only on the bus.
    let stored: Vec<_> = store.lock().unwrap().events_since(0, None, 100).unwrap().into_iter().map(|e| e.kind).collect();
    assert_eq!(stored.iter().filter(|k| *k == "config.reloaded").count(), 2, "{stored:?}");

    // A model directory: a weights change is published as model.changed.
    let model = home.path().join("model");
    std::fs::create_dir(&model).unwrap();
    let mut generation = services.watch_model(&model).unwrap();
    std::fs::write(model.join("model.safetensors"), b"new weights").unwrap();
    let ev = next_event(&mut events, "model.changed").await;
    assert_eq!(ev.data["dir"], model.display().to_string());
    generation.wait_for(|g| *g == 1).await.unwrap();
    services.stop().await;
}
