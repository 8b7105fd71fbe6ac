//! Policies imported from other machines' bundles (`share/`), and what this machine made of each.
//!
//! An import is never served as such: a `pending` one waits for a verification session here (the
//! correctness gate and a confirmed A/B whose lower bound is above 1), which promotes it through the
//! normal path — then the best row carries its `origin` — or leaves it `rejected` with the reason.
//! One for another model, MLX version or backend is a `starting_point` only.

use super::{json_col, now, to_json, Result, SessionId, Store};
use rusqlite::{params, OptionalExtension};
use serde::{Deserialize, Serialize};
use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ImportState {
    Pending,
    Verified,
    Rejected,
    StartingPoint,
}

impl ImportState {
    pub fn as_str(self) -> &'static str {
        match self {
            ImportState::Pending => "pending",
            ImportState::Verified => "verified",
            ImportState::Rejected => "rejected",
            ImportState::StartingPoint => "starting_point",
        }
    }

    /// Every state, for checking what a client names.
    pub const ALL: [ImportState; 4] = [ImportState::Pending, ImportState::Verified, ImportState::Rejected, ImportState::StartingPoint];

    fn parse(s: &str) -> ImportState {
        match s {
            "verified" => ImportState::Verified,
            "rejected" => ImportState::Rejected,
            "starting_point" => ImportState::StartingPoint,
            _ => ImportState::Pending,
        }
    }
}

/// An imported policy as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Import {
    pub id: i64,
    pub hash: String,
    pub model: String,
    pub mlx: String,
    pub backend: String,
    pub from_device: String,
    pub from_chip: Option<String>,
    pub policy: Value,
    /// The exporting machine's evidence, as it was in the bundle.
    pub evidence: Value,
    pub bundle_hash: String,
    /// The file or folder it came from.
    pub source: String,
    pub state: ImportState,
    pub reason: Option<String>,
    pub imported_at: String,
    pub decided_at: Option<String>,
    pub session_id: Option<SessionId>,
}

/// What to store for one bundle entry.
#[derive(Debug, Clone, PartialEq)]
pub struct NewImport<'a> {
    pub hash: &'a str,
    pub model: &'a str,
    pub mlx: &'a str,
    pub backend: &'a str,
    pub from_device: &'a str,
    pub from_chip: Option<&'a str>,
    pub policy: &'a Value,
    pub evidence: &'a Value,
    pub bundle_hash: &'a str,
    pub source: &'a str,
    pub state: ImportState,
    pub reason: Option<&'a str>,
}

fn import_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Import> {
    Ok(Import {
        id: r.get("id")?,
        hash: r.get("hash")?,
        model: r.get("model")?,
        mlx: r.get("mlx")?,
        backend: r.get("backend")?,
        from_device: r.get("from_device")?,
        from_chip: r.get("from_chip")?,
        policy: json_col(r, "policy_json")?,
        evidence: json_col(r, "evidence_json")?,
        bundle_hash: r.get("bundle_hash")?,
        source: r.get("source")?,
        state: ImportState::parse(&r.get::<_, String>("state")?),
        reason: r.get("reason")?,
        imported_at: r.get("imported_at")?,
        decided_at: r.get("decided_at")?,
        session_id: r.get("session_id")?,
    })
}

impl Store {
    /// Stores an import unless the same policy for the same target is already here (then the
    /// existing row, whatever its state, is kept: a verified or rejected one is not re-opened by
    /// importing the same bundle again). Returns the row and whether it is new.
    pub fn add_import(&self, i: &NewImport<'_>) -> Result<(Import, bool)> {
        let inserted = self.conn.execute(
            "INSERT OR IGNORE INTO imports (hash, model, mlx, backend, from_device, from_chip, policy_json, evidence_json,
               bundle_hash, source, state, reason, imported_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
            params![
                i.hash,
                i.model,
                i.mlx,
                i.backend,
                i.from_device,
                i.from_chip,
                to_json(i.policy)?,
                to_json(i.evidence)?,
                i.bundle_hash,
                i.source,
                i.state.as_str(),
                i.reason,
                now()
            ],
        )?;
        let row = self.conn.query_row(
            "SELECT * FROM imports WHERE hash = ?1 AND model = ?2 AND mlx = ?3 AND backend = ?4",
            params![i.hash, i.model, i.mlx, i.backend],
            import_row,
        )?;
        Ok((row, inserted == 1))
    }

    /// Imports, newest first; optionally only those in `state` and/or of `model`.
    pub fn imports(&self, state: Option<ImportState>, model: Option<&str>) -> Result<Vec<Import>> {
        let mut st = self
            .conn
            .prepare_cached("SELECT * FROM imports WHERE (?1 IS NULL OR state = ?1) AND (?2 IS NULL OR model = ?2) ORDER BY id DESC")?;
        let rows = st.query_map(params![state.map(ImportState::as_str), model], import_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    pub fn import_by_id(&self, id: i64) -> Result<Option<Import>> {
        Ok(self.conn.query_row("SELECT * FROM imports WHERE id = ?1", [id], import_row).optional()?)
    }

    /// Records what verification made of an import.
    pub fn decide_import(&self, id: i64, state: ImportState, reason: &str, session_id: Option<SessionId>) -> Result<()> {
        self.conn.execute(
            "UPDATE imports SET state = ?2, reason = ?3, decided_at = ?4, session_id = ?5 WHERE id = ?1",
            params![id, state.as_str(), reason, now(), session_id],
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn an_import_is_stored_once_and_keeps_its_decision() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("t.db")).unwrap();
        let policy = json!({"schema": "tilewise.policy/1"});
        let evidence = json!({"ratio": 1.2});
        let new = NewImport {
            hash: "sha256:a",
            model: "mdl-1",
            mlx: "0.32.4",
            backend: "metal",
            from_device: "dev-other",
            from_chip: Some("Apple M3"),
            policy: &policy,
            evidence: &evidence,
            bundle_hash: "sha256:b",
            source: "/tmp/x.json",
            state: ImportState::Pending,
            reason: None,
        };
        let (first, fresh) = s.add_import(&new).unwrap();
        assert!(fresh && first.state == ImportState::Pending);
        s.decide_import(first.id, ImportState::Rejected, "0.98x [0.95, 1.01]: not proven here", Some(3)).unwrap();
        let (again, fresh) = s.add_import(&new).unwrap();
        assert!(!fresh, "the same policy for the same target is not imported twice");
        assert_eq!((again.state, again.reason.as_deref()), (ImportState::Rejected, Some("0.98x [0.95, 1.01]: not proven here")));
        assert_eq!(s.imports(Some(ImportState::Pending), None).unwrap().len(), 0);
        assert_eq!(s.imports(None, Some("mdl-1")).unwrap().len(), 1);
    }
}
