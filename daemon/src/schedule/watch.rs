//! File watching with `notify`: the config file (edits apply live after validation) and a model's
//! directory (changed weights or config mean a new model fingerprint and a new tuning target).
//!
//! Both watch the *directory* that holds what they care about: editors and downloaders replace
//! files by renaming a temporary file over them, which a watch on the file itself would miss.
//! Bursts of events (an editor writes, renames, chmods; a download writes for minutes) are
//! debounced: we act once things have been quiet for `debounce`.

use std::ffi::OsString;
use std::fmt::Display;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::Watcher;
use serde_json::json;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

/// What the watchers report; the daemon forwards these to its event stream (`kind()` is the
/// protocol's event kind, `data()` its payload).
#[derive(Debug, Clone, PartialEq)]
pub enum WatchEvent {
    /// The config file changed and the new content was applied.
    ConfigReloaded { path: PathBuf },
    /// The config file changed but is invalid: the previous config stays in force.
    ConfigRejected { path: PathBuf, error: String },
    /// Weights or config of a watched model changed (or were removed).
    ModelChanged { dir: PathBuf, paths: Vec<PathBuf> },
}

impl WatchEvent {
    /// The event kind in docs/protocol.md (`config.reloaded` covers both outcomes; `applied` in
    /// the data tells them apart).
    pub fn kind(&self) -> &'static str {
        match self {
            WatchEvent::ConfigReloaded { .. } | WatchEvent::ConfigRejected { .. } => "config.reloaded",
            WatchEvent::ModelChanged { .. } => "model.changed",
        }
    }

    pub fn data(&self) -> serde_json::Value {
        match self {
            WatchEvent::ConfigReloaded { path } => json!({"path": path, "applied": true}),
            WatchEvent::ConfigRejected { path, error } => {
                json!({"path": path, "applied": false, "error": error})
            }
            WatchEvent::ModelChanged { dir, paths } => json!({"dir": dir, "paths": paths}),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("cannot watch {path}: {source}")]
pub struct WatchError {
    pub path: PathBuf,
    #[source]
    pub source: notify::Error,
}

/// Starts a `notify` watcher on `dir` whose raw events (paths) arrive on the returned channel.
pub(crate) fn raw_watch(
    dir: &Path,
    mode: notify::RecursiveMode,
) -> Result<(notify::RecommendedWatcher, mpsc::UnboundedReceiver<Vec<PathBuf>>), WatchError> {
    let (tx, rx) = mpsc::unbounded_channel();
    let err = |source| WatchError { path: dir.to_path_buf(), source };
    let mut watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| match ev {
        // Reads (access events) change nothing; everything else might.
        Ok(ev) if !matches!(ev.kind, notify::EventKind::Access(_)) => {
            let _ = tx.send(ev.paths);
        }
        Ok(_) => {}
        Err(e) => tracing::warn!("file watch error: {e}"),
    })
    .map_err(err)?;
    watcher.watch(dir, mode).map_err(err)?;
    Ok((watcher, rx))
}

/// Waits for the first relevant event, then until none has come for `debounce`; returns the
/// relevant paths seen, or None when the watcher is gone.
pub(crate) async fn next_burst(
    rx: &mut mpsc::UnboundedReceiver<Vec<PathBuf>>,
    debounce: Duration,
    relevant: &(dyn Fn(&Path) -> bool + Send + Sync),
) -> Option<Vec<PathBuf>> {
    let mut seen: Vec<PathBuf> = Vec::new();
    let add = |paths: Vec<PathBuf>, seen: &mut Vec<PathBuf>| {
        for p in paths.into_iter().filter(|p| relevant(p)) {
            if !seen.contains(&p) {
                seen.push(p);
            }
        }
    };
    while seen.is_empty() {
        add(rx.recv().await?, &mut seen);
    }
    loop {
        match tokio::time::timeout(debounce, rx.recv()).await {
            Ok(Some(paths)) => add(paths, &mut seen),
            Ok(None) => return Some(seen),
            Err(_quiet) => return Some(seen),
        }
    }
}

/// Watches one config file and keeps the current, valid config in a `watch` channel.
///
/// On each (debounced) change it calls `load`; a valid result replaces the config and emits
/// [`WatchEvent::ConfigReloaded`]; an error keeps the old config, logs why and emits
/// [`WatchEvent::ConfigRejected`]. A deleted file counts as an error (the old config stays).
pub struct ConfigWatcher<T> {
    current: watch::Receiver<Arc<T>>,
    task: JoinHandle<()>,
}

impl<T> ConfigWatcher<T> {
    pub fn current(&self) -> Arc<T> {
        self.current.borrow().clone()
    }

    /// A receiver of every applied config.
    pub fn subscribe(&self) -> watch::Receiver<Arc<T>> {
        self.current.clone()
    }
}

impl<T> Drop for ConfigWatcher<T> {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl<T: Send + Sync + 'static> ConfigWatcher<T> {
    /// `initial` is the config already loaded at start-up; `load` is normally
    /// `crate::config::Config::load`.
    pub fn spawn<F, E>(
        path: impl Into<PathBuf>,
        initial: T,
        load: F,
        events: mpsc::UnboundedSender<WatchEvent>,
        debounce: Duration,
    ) -> Result<Self, WatchError>
    where
        F: Fn(&Path) -> Result<T, E> + Send + Sync + 'static,
        E: Display,
    {
        let path: PathBuf = path.into();
        let dir = parent_dir(&path);
        let (watcher, mut rx) = raw_watch(&dir, notify::RecursiveMode::NonRecursive)?;
        let (tx, current) = watch::channel(Arc::new(initial));
        let name: Option<OsString> = path.file_name().map(|n| n.to_os_string());
        let task = tokio::spawn(async move {
            let _watcher = watcher; // lives as long as the task
            let relevant = move |p: &Path| p.file_name().map(|n| n.to_os_string()) == name;
            while next_burst(&mut rx, debounce, &relevant).await.is_some() {
                match load(&path) {
                    Ok(config) => {
                        tracing::info!(path = %path.display(), "config reloaded");
                        tx.send_replace(Arc::new(config));
                        let _ = events.send(WatchEvent::ConfigReloaded { path: path.clone() });
                    }
                    Err(e) => {
                        let error = e.to_string();
                        tracing::warn!(path = %path.display(), %error, "config change rejected; keeping the previous config");
                        let _ = events.send(WatchEvent::ConfigRejected { path: path.clone(), error });
                    }
                }
            }
        });
        Ok(ConfigWatcher { current, task })
    }
}

/// Derives a channel of one part of a config (e.g. the scheduler's gates) that fires only when
/// that part changes.
pub fn map_watch<T, U, F>(mut source: watch::Receiver<T>, f: F) -> watch::Receiver<U>
where
    T: Send + Sync + 'static,
    U: PartialEq + Send + Sync + 'static,
    F: Fn(&T) -> U + Send + 'static,
{
    let (tx, rx) = watch::channel(f(&source.borrow_and_update()));
    tokio::spawn(async move {
        while source.changed().await.is_ok() {
            let next = f(&source.borrow_and_update());
            tx.send_if_modified(|cur| {
                let differs = *cur != next;
                if differs {
                    *cur = next;
                }
                differs
            });
            if tx.is_closed() {
                return;
            }
        }
    });
    rx
}

/// Files whose change changes the model as tuned: weights and configuration (what the evaluator
/// fingerprints). Tokenizer files, READMEs and partial downloads are not.
pub fn is_model_file(path: &Path) -> bool {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else { return false };
    if name.ends_with(".incomplete") || name.ends_with(".tmp") || name.starts_with('.') {
        return false;
    }
    name == "config.json"
        || name.ends_with(".safetensors")
        || name.ends_with(".safetensors.index.json")
        || name.ends_with(".npz")
        || name.ends_with(".gguf")
}

/// Watches a model directory (recursively: the Hugging Face cache keeps files under
/// `snapshots/<revision>/`). After each debounced change to weights or config it bumps
/// [`ModelWatcher::generation`] and emits [`WatchEvent::ModelChanged`]; the daemon then asks the
/// evaluator for the new fingerprint and stops serving the old best for this model.
pub struct ModelWatcher {
    pub dir: PathBuf,
    generation: watch::Receiver<u64>,
    task: JoinHandle<()>,
}

impl ModelWatcher {
    pub fn spawn(dir: impl Into<PathBuf>, events: mpsc::UnboundedSender<WatchEvent>, debounce: Duration) -> Result<Self, WatchError> {
        let dir: PathBuf = dir.into();
        let (watcher, mut rx) = raw_watch(&dir, notify::RecursiveMode::Recursive)?;
        let (tx, generation) = watch::channel(0u64);
        let task_dir = dir.clone();
        let task = tokio::spawn(async move {
            let _watcher = watcher;
            while let Some(paths) = next_burst(&mut rx, debounce, &is_model_file).await {
                tracing::info!(dir = %task_dir.display(), files = paths.len(), "model changed on disk");
                tx.send_modify(|g| *g += 1);
                let _ = events.send(WatchEvent::ModelChanged { dir: task_dir.clone(), paths });
            }
        });
        Ok(ModelWatcher { dir, generation, task })
    }

    /// Counts changes since the watch started; `changed()` fires on each.
    pub fn generation(&self) -> watch::Receiver<u64> {
        self.generation.clone()
    }
}

impl Drop for ModelWatcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn parent_dir(path: &Path) -> PathBuf {
    path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_path_buf()
}
