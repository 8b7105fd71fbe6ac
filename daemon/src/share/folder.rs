//! The shared folder (`[share] dir`): machines share proven policies through whatever sync people
//! already run — a network drive, Syncthing, iCloud Drive, a git checkout — with no network protocol
//! of our own.
//!
//! This daemon keeps one bundle of its own proven policies there, `tilewise-<device>-<db>.json`,
//! rewritten (atomically: a temporary file, then a rename) at start and after every promotion,
//! re-measurement or demotion. Every other `*.json` file there is imported when it appears or
//! changes (watched with `notify`, debounced): a bundle that fails its checks is refused whole and
//! the refusal is an event; what it holds is `pending` until verified here (share/mod.rs).

use crate::events::{kind, EventBus};
use crate::ipc::server::DaemonState;
use crate::store::SharedStore;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Quiet time before a burst of file changes is acted on (a sync tool writes in pieces).
const DEBOUNCE: Duration = Duration::from_millis(500);

/// The file name of this daemon's own bundle: the device, and a short hash of the database path
/// so that two daemons of one machine (two user accounts) do not write the same file.
pub fn own_file_name(device: &str, db: &Path) -> String {
    use sha2::Digest;
    let h = hex::encode(sha2::Sha256::digest(db.to_string_lossy().as_bytes()));
    format!("tilewise-{device}-{}.json", &h[..8])
}

fn is_bundle_file(p: &Path) -> bool {
    p.extension().is_some_and(|e| e == "json") && !p.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.'))
}

/// Writes this machine's bundle into `dir` (temporary file + rename, so a reader never sees half).
pub fn write_own(state: &DaemonState, dir: &Path) -> Result<PathBuf, String> {
    let bundle = {
        let store = state.store.lock().unwrap_or_else(|p| p.into_inner());
        super::bundle::export(&store, &state.device, &state.device_fingerprint, None).map_err(|e| e.to_string())?
    };
    let name = own_file_name(&state.device_fingerprint, &state.paths.db_file);
    let path = dir.join(&name);
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let text = serde_json::to_string_pretty(&bundle).map_err(|e| e.to_string())?;
    std::fs::write(&tmp, text).map_err(|e| format!("{}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, &path).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(path)
}

/// Imports one file from the folder (unless it is this machine's own) and publishes what happened.
fn import_one(store: &SharedStore, events: &EventBus, path: &Path, own: &str, device: &str, backend: &str) {
    if path.file_name().is_some_and(|n| n.to_string_lossy() == own) || !path.is_file() {
        return;
    }
    let result = {
        let s = store.lock().unwrap_or_else(|p| p.into_inner());
        super::import_file(&s, path, device, backend)
    };
    match result {
        Ok(outcomes) => {
            let new: Vec<_> = outcomes.iter().filter(|o| o.new).collect();
            if !new.is_empty() {
                tracing::info!(file = %path.display(), "imported {} policies from the shared folder", new.len());
                let _ = events.publish(kind::POLICY_IMPORTED, None, json!({"source": path, "imported": new}));
            }
        }
        Err(why) => {
            tracing::warn!("shared folder: {why}");
            let _ = events.publish(kind::POLICY_IMPORT_REFUSED, None, json!({"source": path, "reason": why}));
        }
    }
}

/// Starts sharing through `dir`: writes this machine's bundle, imports what is there, then follows
/// changes to the folder and this machine's promotions. Needs a tokio runtime.
pub fn spawn(state: Arc<DaemonState>, dir: PathBuf) -> Result<(), String> {
    std::fs::create_dir_all(&dir).map_err(|e| format!("[share] dir {}: {e}", dir.display()))?;
    let (watcher, mut rx) = crate::schedule::watch::raw_watch(&dir, notify::RecursiveMode::NonRecursive).map_err(|e| e.to_string())?;
    let backend = state.device.backend.as_str().to_string();
    let device = state.device_fingerprint.clone();
    let own = own_file_name(&device, &state.paths.db_file);
    if let Err(e) = write_own(&state, &dir) {
        tracing::warn!("shared folder: cannot write this machine's bundle: {e}");
    }
    for entry in std::fs::read_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))?.flatten() {
        if is_bundle_file(&entry.path()) {
            import_one(&state.store, &state.events, &entry.path(), &own, &device, &backend);
        }
    }
    // New or changed bundles in the folder.
    let (store, events) = (state.store.clone(), state.events.clone());
    let (device2, backend2, own2) = (device.clone(), backend.clone(), own.clone());
    tokio::spawn(async move {
        let _keep = watcher;
        while let Some(paths) = crate::schedule::watch::next_burst(&mut rx, DEBOUNCE, &is_bundle_file).await {
            for p in paths {
                import_one(&store, &events, &p, &own2, &device2, &backend2);
            }
        }
    });
    // This machine's bundle follows its bests.
    let mut bus = state.events.subscribe();
    tokio::spawn(async move {
        use tokio::sync::broadcast::error::RecvError;
        loop {
            match bus.recv().await {
                Ok(e) if [kind::POLICY_PROMOTED, kind::POLICY_DEMOTED, kind::POLICY_REMEASURED].contains(&e.kind.as_str()) => {}
                Ok(_) => continue,
                Err(RecvError::Lagged(_)) => {}
                Err(RecvError::Closed) => return,
            }
            if let Err(e) = write_own(&state, &dir) {
                tracing::warn!("shared folder: cannot write this machine's bundle: {e}");
            }
        }
    });
    Ok(())
}
