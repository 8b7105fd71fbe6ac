//! Devices and models seen, and worker failures (kept for diagnosis: what died, how, its stderr).

use super::{json_col, now, to_json, CandidateId, Result, SessionId, Store};
use rusqlite::{params, OptionalExtension};
use serde::{Deserialize, Serialize};
use serde_json::Value;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceRecord {
    pub fingerprint: String,
    /// The probed `Device` as JSON.
    pub info: Value,
    pub first_seen: String,
    pub last_seen: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelRecord {
    pub fingerprint: String,
    pub path: Option<String>,
    /// The model's config (architecture) as the worker reported it.
    pub config: Value,
    pub first_seen: String,
    pub last_seen: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NewWorkerFailure {
    pub session_id: Option<SessionId>,
    pub candidate_id: Option<CandidateId>,
    /// `timeout`, `crash`, `protocol`, `start`, ...
    pub kind: String,
    pub message: String,
    pub exit_code: Option<i32>,
    /// Last lines of the worker's stderr.
    pub stderr_tail: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerFailure {
    pub id: i64,
    pub at: String,
    #[serde(flatten)]
    pub failure: NewWorkerFailure,
}

impl Store {
    /// Records (or refreshes `last_seen` and `info` of) a device.
    pub fn upsert_device(&self, fingerprint: &str, info: &Value) -> Result<()> {
        let at = now();
        self.conn.execute(
            "INSERT INTO devices (fingerprint, info_json, first_seen, last_seen) VALUES (?1, ?2, ?3, ?3)
             ON CONFLICT (fingerprint) DO UPDATE SET info_json = excluded.info_json, last_seen = excluded.last_seen",
            params![fingerprint, to_json(info)?, at],
        )?;
        Ok(())
    }

    pub fn device(&self, fingerprint: &str) -> Result<Option<DeviceRecord>> {
        Ok(self
            .conn
            .query_row("SELECT * FROM devices WHERE fingerprint = ?1", [fingerprint], |r| {
                Ok(DeviceRecord {
                    fingerprint: r.get("fingerprint")?,
                    info: json_col(r, "info_json")?,
                    first_seen: r.get("first_seen")?,
                    last_seen: r.get("last_seen")?,
                })
            })
            .optional()?)
    }

    /// Records (or refreshes) a model.
    pub fn upsert_model(&self, fingerprint: &str, path: Option<&str>, config: &Value) -> Result<()> {
        let at = now();
        self.conn.execute(
            "INSERT INTO models (fingerprint, path, config_json, first_seen, last_seen) VALUES (?1, ?2, ?3, ?4, ?4)
             ON CONFLICT (fingerprint) DO UPDATE SET path = excluded.path, config_json = excluded.config_json,
               last_seen = excluded.last_seen",
            params![fingerprint, path, to_json(config)?, at],
        )?;
        Ok(())
    }

    pub fn model(&self, fingerprint: &str) -> Result<Option<ModelRecord>> {
        Ok(self
            .conn
            .query_row("SELECT * FROM models WHERE fingerprint = ?1", [fingerprint], |r| {
                Ok(ModelRecord {
                    fingerprint: r.get("fingerprint")?,
                    path: r.get("path")?,
                    config: json_col(r, "config_json")?,
                    first_seen: r.get("first_seen")?,
                    last_seen: r.get("last_seen")?,
                })
            })
            .optional()?)
    }

    pub fn record_worker_failure(&self, f: &NewWorkerFailure) -> Result<i64> {
        self.conn.execute(
            "INSERT INTO worker_failures (at, session_id, candidate_id, kind, message, exit_code, stderr_tail)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![now(), f.session_id, f.candidate_id, f.kind, f.message, f.exit_code, f.stderr_tail],
        )?;
        Ok(self.conn.last_insert_rowid())
    }

    /// Worker failures, newest first, optionally of one session.
    pub fn worker_failures(&self, session_id: Option<SessionId>, limit: u32) -> Result<Vec<WorkerFailure>> {
        let mut st =
            self.conn.prepare_cached("SELECT * FROM worker_failures WHERE (?1 IS NULL OR session_id = ?1) ORDER BY id DESC LIMIT ?2")?;
        let rows = st.query_map(params![session_id, limit], |r| {
            Ok(WorkerFailure {
                id: r.get("id")?,
                at: r.get("at")?,
                failure: NewWorkerFailure {
                    session_id: r.get("session_id")?,
                    candidate_id: r.get("candidate_id")?,
                    kind: r.get("kind")?,
                    message: r.get("message")?,
                    exit_code: r.get("exit_code")?,
                    stderr_tail: r.get("stderr_tail")?,
                },
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }
}
