//! Tuning sessions and the candidates they propose.

use super::{json_col, now, to_json, Result, Store, StoreError};
use rusqlite::{params, OptionalExtension, Row};
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub type SessionId = i64;
pub type CandidateId = i64;

/// How much a session may spend; `None` is unbounded on that axis.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Budget {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evaluations: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seconds: Option<u64>,
}

/// Life cycle of a session. `running`/`paused` can resume; the other three are final.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SessionState {
    Created,
    Running,
    Paused,
    Stopped,
    Finished,
    Failed,
}

impl SessionState {
    pub fn as_str(self) -> &'static str {
        match self {
            SessionState::Created => "created",
            SessionState::Running => "running",
            SessionState::Paused => "paused",
            SessionState::Stopped => "stopped",
            SessionState::Finished => "finished",
            SessionState::Failed => "failed",
        }
    }
    pub fn parse(s: &str) -> Option<SessionState> {
        Some(match s {
            "created" => SessionState::Created,
            "running" => SessionState::Running,
            "paused" => SessionState::Paused,
            "stopped" => SessionState::Stopped,
            "finished" => SessionState::Finished,
            "failed" => SessionState::Failed,
            _ => return None,
        })
    }
    /// True for states a session can be resumed from.
    pub fn is_resumable(self) -> bool {
        matches!(self, SessionState::Created | SessionState::Running | SessionState::Paused)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewSession {
    pub device: String,
    pub model: String,
    pub mlx: String,
    pub backend: String,
    pub seed: i64,
    pub budget: Budget,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Session {
    pub id: SessionId,
    pub device: String,
    pub model: String,
    pub mlx: String,
    pub backend: String,
    pub seed: i64,
    pub state: SessionState,
    /// Why the session is paused/stopped/failed (free text), if it is.
    pub reason: Option<String>,
    pub budget: Budget,
    /// Completed measurements (bumped by `record_measurement`).
    pub evaluations: i64,
    /// Failed candidates (bumped by `mark_candidate_failed`).
    pub failures: i64,
    /// Promotions this session made (bumped by `promote`).
    pub promotions: i64,
    pub created_at: String,
    pub updated_at: String,
}

/// Where a candidate is in its evaluation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CandidateStatus {
    Pending,
    Measuring,
    Measured,
    Failed,
}

impl CandidateStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            CandidateStatus::Pending => "pending",
            CandidateStatus::Measuring => "measuring",
            CandidateStatus::Measured => "measured",
            CandidateStatus::Failed => "failed",
        }
    }
    pub fn parse(s: &str) -> Option<CandidateStatus> {
        Some(match s {
            "pending" => CandidateStatus::Pending,
            "measuring" => CandidateStatus::Measuring,
            "measured" => CandidateStatus::Measured,
            "failed" => CandidateStatus::Failed,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NewCandidate {
    pub session_id: SessionId,
    /// The policy document (already validated by the caller; stored as given, hashed canonically).
    pub policy: Value,
    /// `Policy::content_hash()` of `policy`.
    pub hash: String,
    /// Candidates this one was derived from (empty for seeds).
    pub parents: Vec<CandidateId>,
    pub island: i64,
    pub generation: i64,
    /// How it was made: `seed`, `mutation`, `crossover`, `llm`, ... (free text for the search).
    pub origin: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Candidate {
    pub id: CandidateId,
    pub session_id: SessionId,
    pub hash: String,
    pub policy: Value,
    pub parents: Vec<CandidateId>,
    pub island: i64,
    pub generation: i64,
    pub origin: String,
    pub status: CandidateStatus,
    pub failure_reason: Option<String>,
    pub created_at: String,
    pub updated_at: String,
}

fn bad_enum(col: &str, v: &str) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, format!("unknown {col} {v:?} in database").into())
}

fn session_from_row(r: &Row<'_>) -> rusqlite::Result<Session> {
    let state: String = r.get("state")?;
    Ok(Session {
        id: r.get("id")?,
        device: r.get("device")?,
        model: r.get("model")?,
        mlx: r.get("mlx")?,
        backend: r.get("backend")?,
        seed: r.get("seed")?,
        state: SessionState::parse(&state).ok_or_else(|| bad_enum("session state", &state))?,
        reason: r.get("reason")?,
        budget: json_col(r, "budget_json")?,
        evaluations: r.get("evaluations")?,
        failures: r.get("failures")?,
        promotions: r.get("promotions")?,
        created_at: r.get("created_at")?,
        updated_at: r.get("updated_at")?,
    })
}

pub(super) fn candidate_from_row(r: &Row<'_>) -> rusqlite::Result<Candidate> {
    let status: String = r.get("status")?;
    Ok(Candidate {
        id: r.get("id")?,
        session_id: r.get("session_id")?,
        hash: r.get("hash")?,
        policy: json_col(r, "policy_json")?,
        parents: json_col(r, "parents_json")?,
        island: r.get("island")?,
        generation: r.get("generation")?,
        origin: r.get("origin")?,
        status: CandidateStatus::parse(&status).ok_or_else(|| bad_enum("candidate status", &status))?,
        failure_reason: r.get("failure_reason")?,
        created_at: r.get("created_at")?,
        updated_at: r.get("updated_at")?,
    })
}

impl Store {
    /// Starts a session in state `created`.
    pub fn create_session(&self, s: &NewSession) -> Result<SessionId> {
        let at = now();
        self.conn.execute(
            "INSERT INTO sessions (device, model, mlx, backend, seed, state, budget_json, created_at, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5, 'created', ?6, ?7, ?7)",
            params![s.device, s.model, s.mlx, s.backend, s.seed, to_json(&s.budget)?, at],
        )?;
        Ok(self.conn.last_insert_rowid())
    }

    pub fn session(&self, id: SessionId) -> Result<Option<Session>> {
        Ok(self.conn.query_row("SELECT * FROM sessions WHERE id = ?1", [id], session_from_row).optional()?)
    }

    /// Most recent first.
    pub fn list_sessions(&self, limit: u32) -> Result<Vec<Session>> {
        let mut st = self.conn.prepare_cached("SELECT * FROM sessions ORDER BY id DESC LIMIT ?1")?;
        let rows = st.query_map([limit], session_from_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// The newest session for this target that can still resume (created/running/paused).
    pub fn resumable_session(&self, device: &str, model: &str, mlx: &str, backend: &str) -> Result<Option<Session>> {
        Ok(self
            .conn
            .query_row(
                "SELECT * FROM sessions WHERE device = ?1 AND model = ?2 AND mlx = ?3 AND backend = ?4
                 AND state IN ('created','running','paused') ORDER BY id DESC LIMIT 1",
                params![device, model, mlx, backend],
                session_from_row,
            )
            .optional()?)
    }

    /// The newest session of `device` whose saved search tuned `model` (the `spec.model` of its
    /// search state). SQLite reads the one field: the auto-starter asks on every gate change, and
    /// parsing whole saved states (the engine, every key seen) under the store lock would hold up
    /// `policy.get`.
    pub fn newest_session_of_model(&self, device: &str, model: &str) -> Result<Option<Session>> {
        Ok(self
            .conn
            .query_row(
                "SELECT s.* FROM sessions s JOIN search_state st ON st.session_id = s.id
                 WHERE s.device = ?1 AND json_extract(st.state_json, '$.spec.model') = ?2
                 ORDER BY s.id DESC LIMIT 1",
                params![device, model],
                session_from_row,
            )
            .optional()?)
    }

    /// Moves a session to `state`, recording why (pass `None` to clear the reason).
    pub fn set_session_state(&self, id: SessionId, state: SessionState, reason: Option<&str>) -> Result<()> {
        let n = self.conn.execute(
            "UPDATE sessions SET state = ?2, reason = ?3, updated_at = ?4 WHERE id = ?1",
            params![id, state.as_str(), reason, now()],
        )?;
        if n == 0 {
            return Err(StoreError::NotFound { what: "session", id: id.to_string() });
        }
        Ok(())
    }

    /// Adds a candidate in state `pending`.
    pub fn add_candidate(&self, c: &NewCandidate) -> Result<CandidateId> {
        let at = now();
        self.conn.execute(
            "INSERT INTO candidates (session_id, hash, policy_json, parents_json, island, generation, origin, status, created_at, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 'pending', ?8, ?8)",
            params![c.session_id, c.hash, to_json(&c.policy)?, to_json(&c.parents)?, c.island, c.generation, c.origin, at],
        )?;
        Ok(self.conn.last_insert_rowid())
    }

    pub fn candidate(&self, id: CandidateId) -> Result<Option<Candidate>> {
        Ok(self.conn.query_row("SELECT * FROM candidates WHERE id = ?1", [id], candidate_from_row).optional()?)
    }

    /// The first candidate of a session with this content hash (to skip re-proposals).
    pub fn find_candidate(&self, session_id: SessionId, hash: &str) -> Result<Option<Candidate>> {
        Ok(self
            .conn
            .query_row(
                "SELECT * FROM candidates WHERE session_id = ?1 AND hash = ?2 ORDER BY id LIMIT 1",
                params![session_id, hash],
                candidate_from_row,
            )
            .optional()?)
    }

    /// A session's candidates in creation order, optionally only those with `status`.
    pub fn candidates(&self, session_id: SessionId, status: Option<CandidateStatus>) -> Result<Vec<Candidate>> {
        let mut st =
            self.conn.prepare_cached("SELECT * FROM candidates WHERE session_id = ?1 AND (?2 IS NULL OR status = ?2) ORDER BY id")?;
        let rows = st.query_map(params![session_id, status.map(|s| s.as_str())], candidate_from_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Sets `pending`/`measuring` (use `record_measurement` / `mark_candidate_failed` for the end states).
    pub fn set_candidate_status(&self, id: CandidateId, status: CandidateStatus) -> Result<()> {
        let n =
            self.conn.execute("UPDATE candidates SET status = ?2, updated_at = ?3 WHERE id = ?1", params![id, status.as_str(), now()])?;
        if n == 0 {
            return Err(StoreError::NotFound { what: "candidate", id: id.to_string() });
        }
        Ok(())
    }

    /// Marks a candidate `failed` with its reason and counts the failure on its session (one transaction).
    pub fn mark_candidate_failed(&self, id: CandidateId, reason: &str) -> Result<()> {
        let tx = self.conn.unchecked_transaction()?;
        let at = now();
        let session_id: Option<SessionId> = tx
            .query_row(
                "UPDATE candidates SET status = 'failed', failure_reason = ?2, updated_at = ?3 WHERE id = ?1 RETURNING session_id",
                params![id, reason, at],
                |r| r.get(0),
            )
            .optional()?;
        let Some(session_id) = session_id else {
            return Err(StoreError::NotFound { what: "candidate", id: id.to_string() });
        };
        tx.execute("UPDATE sessions SET failures = failures + 1, updated_at = ?2 WHERE id = ?1", params![session_id, at])?;
        tx.commit()?;
        Ok(())
    }
}
