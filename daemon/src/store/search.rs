//! The evolution engine's resumable state, one row per session.
//!
//! The session writes it after each completed step (a measurement, a failure, a screened
//! candidate). A step whose measurement committed but whose state write did not (kill -9 between
//! the two) is found again on resume through the candidate's stored status, so the two writes need
//! not share a transaction; see daemon/src/session.rs.

use super::{now, to_json, Result, SessionId, Store};
use rusqlite::{params, OptionalExtension};
use serde_json::Value;

impl Store {
    /// Stores (replacing) the search state of a session.
    pub fn save_search_state(&self, session_id: SessionId, state: &Value) -> Result<()> {
        self.conn.execute(
            "INSERT INTO search_state (session_id, state_json, updated_at) VALUES (?1, ?2, ?3)
             ON CONFLICT (session_id) DO UPDATE SET state_json = excluded.state_json, updated_at = excluded.updated_at",
            params![session_id, to_json(state)?, now()],
        )?;
        Ok(())
    }

    /// The stored search state of a session, if any.
    pub fn search_state(&self, session_id: SessionId) -> Result<Option<Value>> {
        let text: Option<String> =
            self.conn.query_row("SELECT state_json FROM search_state WHERE session_id = ?1", [session_id], |r| r.get(0)).optional()?;
        Ok(text.map(|t| serde_json::from_str(&t)).transpose()?)
    }
}
