//! Sharing proven policies between machines: bundles out (`policy.export`), bundles in
//! (`policy.import`, a watched folder), and verification here before anything is served
//! (docs/sharing.md).
//!
//! The rule that only a policy proven *here* is served makes sharing safe: an imported policy is a
//! candidate that skips the search, not a result. It is stored `pending` and measured by a
//! verification session on this machine (the correctness gate, then an A/B and its confirmation
//! whose lower bound must beat 1.0, exactly as for a policy the search found); only a promotion
//! there makes it served, with this machine's evidence. One proven for another backend is kept as a
//! `starting_point` (it may seed a search, never be served).

pub mod bundle;
pub mod folder;

use crate::store::{ImportState, NewImport, Store, StoreError};
use serde::{Deserialize, Serialize};

/// What importing one bundle entry did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImportOutcome {
    pub hash: String,
    pub model: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_name: Option<String>,
    pub from_chip: Option<String>,
    /// `pending`, `starting_point`, `verified`, `rejected` (the stored state), or `skipped`.
    pub state: String,
    pub reason: String,
    /// False when this policy for this target was imported before (its stored state is shown).
    pub new: bool,
}

/// Stores what a checked bundle holds, each entry in the state it starts in here.
pub fn import(
    store: &Store,
    bundle: &bundle::Bundle,
    this_device: &str,
    this_backend: &str,
    source: &str,
) -> Result<Vec<ImportOutcome>, StoreError> {
    let mut out = vec![];
    for e in &bundle.entries {
        let ev = &e.evidence;
        let mut outcome = ImportOutcome {
            hash: e.hash.clone(),
            model: ev.model.clone(),
            model_name: ev.model_name.clone(),
            from_chip: ev.chip.clone(),
            state: "skipped".into(),
            reason: String::new(),
            new: false,
        };
        // Already this machine's best for that target: nothing to do. (Another daemon on the same
        // hardware — another user account — may well have proven something this one has not.)
        let key = crate::store::BestKey {
            device: this_device.to_string(),
            model: ev.model.clone(),
            mlx: ev.mlx.clone(),
            backend: ev.backend.clone(),
        };
        if store.best(&key)?.is_some_and(|b| b.hash == e.hash) {
            outcome.reason = "already proven and served here".into();
            out.push(outcome);
            continue;
        }
        let (state, reason) = if ev.backend != this_backend {
            (
                ImportState::StartingPoint,
                format!("proven for the {} backend; this machine runs {this_backend}: kept as a starting point only", ev.backend),
            )
        } else {
            (
                ImportState::Pending,
                format!(
                    "proven {:.3}x [{:.3}, {:.3}] on {}: not served until measured here",
                    ev.ratio,
                    ev.lo,
                    ev.hi,
                    ev.chip.as_deref().unwrap_or(&ev.device)
                ),
            )
        };
        let evidence = serde_json::to_value(ev).map_err(StoreError::from)?;
        let (row, new) = store.add_import(&NewImport {
            hash: &e.hash,
            model: &ev.model,
            mlx: &ev.mlx,
            backend: &ev.backend,
            from_device: &ev.device,
            from_chip: ev.chip.as_deref(),
            policy: &e.policy,
            evidence: &evidence,
            bundle_hash: &bundle.bundle_hash,
            source,
            state,
            reason: Some(&reason),
        })?;
        if let Some(name) = &ev.model_name {
            // The exporter's name for the model helps a person recognize it; this machine's own
            // name (from a session or a plugin here) wins when it has one.
            if store.models_seen()?.iter().all(|m| m.fingerprint != ev.model) {
                store.note_model_imported(&ev.model, name)?;
            }
        }
        outcome.state = row.state.as_str().into();
        outcome.reason = row.reason.unwrap_or_default();
        outcome.new = new;
        out.push(outcome);
    }
    Ok(out)
}

/// Reads, checks and imports one bundle file.
pub fn import_file(store: &Store, path: &std::path::Path, this_device: &str, this_backend: &str) -> Result<Vec<ImportOutcome>, String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if meta.len() > bundle::MAX_BUNDLE_BYTES {
        return Err(format!("{}: {} bytes; a bundle may hold at most {}", path.display(), meta.len(), bundle::MAX_BUNDLE_BYTES));
    }
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let b = bundle::check(&text).map_err(|e| format!("{}: {e}; nothing imported", path.display()))?;
    import(store, &b, this_device, this_backend, &path.display().to_string()).map_err(|e| e.to_string())
}
