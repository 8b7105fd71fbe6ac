//! The scheduling parts wired together for `tilewised`, in one call: the config-file watcher
//! (live reload), the gates derived from it, the activity scheduler, model-directory watchers,
//! and the forwarding of their events to the daemon's [`EventBus`].
//!
//! ```ignore
//! let schedule = ScheduleServices::start(&paths.config_file, config.clone(), state.events.clone(),
//!                                        activity::platform_source()?, move |c| { /* apply c */ })?;
//! let gate = schedule.decisions();        // -> session::ManagerOptions::gate
//! schedule.watch_model(&model_dir)?;      // after a worker `load` returned its model_path
//! ```

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::{mpsc, watch as tokio_watch};
use tokio::task::JoinHandle;

use super::activity::ActivitySource;
use super::watch::{map_watch, ConfigWatcher, ModelWatcher, WatchError, WatchEvent};
use super::{Decision, Gates, Scheduler, SchedulerHandle, SchedulerOptions};
use crate::config::Config;
use crate::events::{kind, EventBus};
use crate::ipc::server::DaemonState;

/// Quiet time after the last file event before a config reload or a model change is acted on.
pub const CONFIG_DEBOUNCE: Duration = Duration::from_millis(300);
/// Weights are big and written for a while: wait longer before calling a model changed.
pub const MODEL_DEBOUNCE: Duration = Duration::from_secs(2);

/// The running scheduling services of a daemon. Dropping it stops them.
pub struct ScheduleServices {
    scheduler: Option<SchedulerHandle>,
    config: ConfigWatcher<Config>,
    events: mpsc::UnboundedSender<WatchEvent>,
    models: ModelWatchers,
    tasks: Vec<JoinHandle<()>>,
    /// Tasks started by `attach`.
    extra_tasks: Mutex<Vec<JoinHandle<()>>>,
    /// Where `for_daemon` copies applied configs, once `attach`ed.
    daemon_slot: Option<Arc<Mutex<Option<Weak<DaemonState>>>>>,
}

impl ScheduleServices {
    /// Starts everything on the current tokio runtime. `initial` is the config the daemon started
    /// with; `on_config` is called with every config applied later (to update the daemon's copy).
    pub fn start(
        config_file: &Path,
        initial: Config,
        bus: EventBus,
        source: Arc<dyn ActivitySource>,
        on_config: impl Fn(&Config) + Send + Sync + 'static,
    ) -> Result<ScheduleServices, WatchError> {
        if let Some(dir) = config_file.parent() {
            // The watch is on the directory (editors replace the file); it must exist.
            let _ = std::fs::create_dir_all(dir);
        }
        let (events_tx, mut events_rx) = mpsc::unbounded_channel::<WatchEvent>();
        let mut tasks = Vec::new();

        let forward_bus = bus.clone();
        tasks.push(tokio::spawn(async move {
            while let Some(ev) = events_rx.recv().await {
                if let Err(e) = forward_bus.publish(ev.kind(), None, ev.data()) {
                    tracing::warn!("event {} not stored: {e}", ev.kind());
                }
            }
        }));

        let config = ConfigWatcher::spawn(config_file, initial, Config::load, events_tx.clone(), CONFIG_DEBOUNCE)?;
        let mut applied = config.subscribe();
        tasks.push(tokio::spawn(async move {
            while applied.changed().await.is_ok() {
                let c = applied.borrow_and_update().clone();
                on_config(&c);
            }
        }));

        // Measurements may run between session.started/resumed and session.paused/finished/stopped.
        let (busy_tx, busy_rx) = tokio_watch::channel(false);
        let mut bus_rx = bus.subscribe();
        tasks.push(tokio::spawn(async move {
            use tokio::sync::broadcast::error::RecvError;
            loop {
                match bus_rx.recv().await {
                    Ok(e) => match e.kind.as_str() {
                        kind::SESSION_STARTED | kind::SESSION_RESUMED => {
                            busy_tx.send_replace(true);
                        }
                        kind::SESSION_PAUSED | kind::SESSION_FINISHED | kind::SESSION_STOPPED => {
                            busy_tx.send_replace(false);
                        }
                        _ => {}
                    },
                    // Missed events: assume a measurement may be running (the safe side).
                    Err(RecvError::Lagged(_)) => {
                        busy_tx.send_replace(true);
                    }
                    Err(RecvError::Closed) => return,
                }
            }
        }));

        let gates = map_watch(config.subscribe(), |c: &Arc<Config>| Gates::from_config(&c.idle));
        let scheduler = Scheduler::spawn(source, gates, SchedulerOptions { busy: Some(busy_rx), ..SchedulerOptions::default() });
        Ok(ScheduleServices {
            scheduler: Some(scheduler),
            config,
            events: events_tx,
            models: Arc::default(),
            tasks,
            extra_tasks: Mutex::default(),
            daemon_slot: None,
        })
    }

    /// Starts the services for a daemon being built: its config file and config, its event bus,
    /// and this platform's activity source (`TILEWISE_ACTIVITY_FILE` selects the file source).
    /// Call [`ScheduleServices::attach`] once the state is in its `Arc`, so that every applied
    /// config is copied into `state.config` (what `config.get` serves).
    ///
    /// ```ignore
    /// let schedule = ScheduleServices::for_daemon(&state)?;
    /// state.tuning = Some(Arc::new(SessionManager::from_state(&state).with_gate(schedule.decisions())));
    /// let state = Arc::new(state);
    /// schedule.attach(&state);
    /// ```
    pub fn for_daemon(state: &DaemonState) -> Result<ScheduleServices, String> {
        let source = super::activity::platform_source().map_err(|e| e.to_string())?;
        let initial = state.config.read().unwrap_or_else(|p| p.into_inner()).clone();
        let slot: Arc<Mutex<Option<Weak<DaemonState>>>> = Arc::default();
        let target = slot.clone();
        let mut services = ScheduleServices::start(&state.paths.config_file, initial, state.events.clone(), source, move |c| {
            let state = target.lock().unwrap_or_else(|p| p.into_inner()).as_ref().and_then(Weak::upgrade);
            match state {
                Some(state) => *state.config.write().unwrap_or_else(|p| p.into_inner()) = c.clone(),
                None => tracing::warn!("config reloaded before the daemon state was attached; config.get serves the old one"),
            }
        })
        .map_err(|e| e.to_string())?;
        services.daemon_slot = Some(slot);
        Ok(services)
    }

    /// Connects the services to the running daemon (see [`ScheduleServices::for_daemon`]):
    /// applied configs reach `state.config`, and the model of every session that starts is
    /// watched. When a watched model changes on disk while its session runs, that session is
    /// tuning weights that no longer exist: it is stopped and a new one started for the same
    /// model (same seed and budget), which loads the new weights and so gets a new fingerprint
    /// and target. The old best stays stored under the old fingerprint and is not served for
    /// the new one.
    pub fn attach(&self, state: &Arc<DaemonState>) {
        if let Some(slot) = &self.daemon_slot {
            *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::downgrade(state));
        }
        let weak = Arc::downgrade(state);
        let models = self.models.clone();
        let events = self.events.clone();
        let mut rx = state.events.subscribe();
        let task = tokio::spawn(async move {
            use tokio::sync::broadcast::error::RecvError;
            // Model directory -> (session id, the started event's data) of the session tuning it.
            let mut tuned: HashMap<PathBuf, (i64, serde_json::Value)> = HashMap::new();
            loop {
                let e = match rx.recv().await {
                    Ok(e) => e,
                    Err(RecvError::Lagged(_)) => continue,
                    Err(RecvError::Closed) => return,
                };
                let Some(state) = weak.upgrade() else { return };
                match e.kind.as_str() {
                    kind::SESSION_STARTED | kind::SESSION_RESUMED => {
                        let (Some(sid), Some(fp)) = (e.session_id, e.data["target"]["model"].as_str()) else { continue };
                        let record = state.store.lock().unwrap_or_else(|p| p.into_inner()).model(fp);
                        let Some(dir) = record.ok().flatten().and_then(|m| m.path).map(PathBuf::from) else { continue };
                        if !dir.is_dir() {
                            continue;
                        }
                        if let Err(err) = watch_model_in(&models, &events, &dir) {
                            tracing::warn!("cannot watch model {}: {err}", dir.display());
                            continue;
                        }
                        tuned.insert(dir, (sid, e.data.clone()));
                    }
                    kind::MODEL_CHANGED => {
                        let Some(dir) = e.data["dir"].as_str().map(PathBuf::from) else { continue };
                        let Some((sid, started)) = tuned.remove(&dir) else { continue };
                        let Some(tuning) = state.tuning.clone() else { continue };
                        let running = tuning.status().session_id == Some(sid);
                        if !running {
                            continue;
                        }
                        tracing::info!(session = sid, dir = %dir.display(), "model changed on disk: restarting its session");
                        let _ = tuning.stop(crate::ipc::protocol::TuningStopParams { session_id: Some(sid) }).await;
                        let params = crate::ipc::protocol::TuningStartParams {
                            model: started["model"].as_str().map(str::to_owned),
                            budget: serde_json::from_value(started["budget"].clone()).ok(),
                            seed: started["seed"].as_u64(),
                            extra: Default::default(),
                        };
                        if let Err(err) = tuning.start(params).await {
                            tracing::warn!("could not start a session for the changed model: {}", err.message);
                        }
                    }
                    _ => {}
                }
            }
        });
        self.extra_tasks.lock().unwrap_or_else(|p| p.into_inner()).push(task);
    }

    /// The gate decisions (give one to the session manager, one to `status`).
    pub fn decisions(&self) -> tokio_watch::Receiver<Decision> {
        self.scheduler.as_ref().expect("running until dropped").subscribe()
    }

    /// Every applied config.
    pub fn config(&self) -> tokio_watch::Receiver<Arc<Config>> {
        self.config.subscribe()
    }

    /// Watches a model directory (once per directory); its changes are published as
    /// `model.changed` and counted in the returned generation channel.
    pub fn watch_model(&self, dir: &Path) -> Result<tokio_watch::Receiver<u64>, WatchError> {
        watch_model_in(&self.models, &self.events, dir)
    }

    /// Stops the scheduler and every watcher.
    pub async fn stop(mut self) {
        if let Some(s) = self.scheduler.take() {
            s.stop().await;
        }
    }
}

impl Drop for ScheduleServices {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        for t in self.extra_tasks.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            t.abort();
        }
    }
}

type ModelWatchers = Arc<Mutex<HashMap<PathBuf, ModelWatcher>>>;

fn watch_model_in(
    models: &ModelWatchers,
    events: &mpsc::UnboundedSender<WatchEvent>,
    dir: &Path,
) -> Result<tokio_watch::Receiver<u64>, WatchError> {
    let mut models = models.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(w) = models.get(dir) {
        return Ok(w.generation());
    }
    let w = ModelWatcher::spawn(dir, events.clone(), MODEL_DEBOUNCE)?;
    let generation = w.generation();
    models.insert(dir.to_path_buf(), w);
    Ok(generation)
}
