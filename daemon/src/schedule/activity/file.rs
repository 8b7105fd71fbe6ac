//! The file-driven source: a JSON file, reloaded on change (tests, demos, and a manual override).

use super::{Activity, ActivityError, ActivitySource, Thermal};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tokio::sync::Notify;

/// The JSON document a [`FileSource`] reads. Every field is optional; missing ones take the
/// "machine is free" value so a test states only what it changes, e.g. `{"user_idle_s": 0}`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ActivityFile {
    /// Idle seconds at the moment the file was written; the source adds the time since the
    /// file's modification, so idle time grows by itself as it does on a real machine.
    #[serde(default = "ActivityFile::default_idle")]
    pub user_idle_s: f64,
    #[serde(default = "yes")]
    pub on_ac_power: bool,
    #[serde(default)]
    pub battery_percent: Option<u8>,
    #[serde(default)]
    pub low_power_mode: bool,
    #[serde(default = "ActivityFile::default_thermal")]
    pub thermal: Thermal,
    #[serde(default)]
    pub load_1m: f64,
}

fn yes() -> bool {
    true
}

impl ActivityFile {
    fn default_idle() -> f64 {
        3600.0
    }
    fn default_thermal() -> Thermal {
        Thermal::Nominal
    }

    /// Writes the file atomically (temp file + rename), so a reader never sees half a document.
    pub fn write_to(&self, path: &Path) -> std::io::Result<()> {
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(self).expect("serializable"))?;
        std::fs::rename(&tmp, path)
    }
}

impl Default for ActivityFile {
    fn default() -> Self {
        serde_json::from_str("{}").expect("all fields have defaults")
    }
}

/// Reads activity from a JSON file ([`ActivityFile`]) and watches it with `notify`, signalling
/// [`ActivitySource::changes`] on every edit. A malformed file is an error for that sample (the
/// scheduler then blocks tuning with the error as the reason), never a crash.
pub struct FileSource {
    path: PathBuf,
    changed: Arc<Notify>,
    // Kept alive for as long as the source lives; dropping it stops the watch.
    _watcher: Mutex<Option<notify::RecommendedWatcher>>,
}

impl FileSource {
    pub fn new(path: impl Into<PathBuf>) -> Result<Self, ActivityError> {
        use notify::Watcher;
        let path: PathBuf = path.into();
        let changed = Arc::new(Notify::new());
        let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_path_buf();
        let file_name = path.file_name().map(|n| n.to_os_string());
        let signal = changed.clone();
        // Watch the directory, not the file: editors and our own atomic writes replace the file.
        let mut watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
            if let Ok(ev) = ev {
                // Our own reads show up as access events; only changes matter (else: busy loop).
                if matches!(ev.kind, notify::EventKind::Access(_)) {
                    return;
                }
                if ev.paths.iter().any(|p| p.file_name().map(|n| n.to_os_string()) == file_name) {
                    signal.notify_one();
                }
            }
        })
        .map_err(|e| ActivityError::File { path: dir.clone(), message: e.to_string() })?;
        watcher
            .watch(&dir, notify::RecursiveMode::NonRecursive)
            .map_err(|e| ActivityError::File { path: dir.clone(), message: e.to_string() })?;
        Ok(FileSource { path, changed, _watcher: Mutex::new(Some(watcher)) })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl ActivitySource for FileSource {
    fn sample(&self) -> Result<Activity, ActivityError> {
        let file_err = |m: String| ActivityError::File { path: self.path.clone(), message: m };
        let text = std::fs::read_to_string(&self.path).map_err(|e| file_err(e.to_string()))?;
        let doc: ActivityFile = serde_json::from_str(&text).map_err(|e| file_err(e.to_string()))?;
        if !(doc.user_idle_s.is_finite() && doc.user_idle_s >= 0.0) {
            return Err(file_err(format!("user_idle_s must be >= 0, got {}", doc.user_idle_s)));
        }
        let age = std::fs::metadata(&self.path)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| SystemTime::now().duration_since(t).ok())
            .unwrap_or_default();
        Ok(Activity {
            user_idle: Duration::from_secs_f64(doc.user_idle_s) + age,
            on_ac_power: doc.on_ac_power,
            battery_percent: doc.battery_percent,
            low_power_mode: doc.low_power_mode,
            thermal: doc.thermal,
            load_1m: doc.load_1m,
            source: "file",
        })
    }

    fn changes(&self) -> Option<Arc<Notify>> {
        Some(self.changed.clone())
    }

    fn name(&self) -> &'static str {
        "file"
    }
}
