//! The persisted event log. `crate::events::EventBus` appends here and then broadcasts; the same
//! [`Event`] struct is what `events.subscribe` sends on the wire.

use super::{json_col, now, to_json, Result, SessionId, Store};
use rusqlite::params;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// One event: `kind` is one of the names in docs/protocol.md (`daemon.started`, `policy.promoted`, ...).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub id: i64,
    pub at: String,
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_id: Option<SessionId>,
    pub data: Value,
}

impl Store {
    /// Appends an event and returns it with its id and time.
    pub fn append_event(&self, kind: &str, session_id: Option<SessionId>, data: &Value) -> Result<Event> {
        let at = now();
        // Cached: every client's `hello` appends one, on the plugin's path at each MLX start.
        self.conn
            .prepare_cached("INSERT INTO events (at, kind, session_id, data_json) VALUES (?1, ?2, ?3, ?4)")?
            .execute(params![at, kind, session_id, to_json(data)?])?;
        Ok(Event { id: self.conn.last_insert_rowid(), at, kind: kind.to_string(), session_id, data: data.clone() })
    }

    /// Events with id > `after_id`, oldest first, at most `limit`; optionally one session's only.
    pub fn events_since(&self, after_id: i64, session_id: Option<SessionId>, limit: u32) -> Result<Vec<Event>> {
        let mut st = self.conn.prepare_cached(
            "SELECT id, at, kind, session_id, data_json FROM events
             WHERE id > ?1 AND (?2 IS NULL OR session_id = ?2) ORDER BY id LIMIT ?3",
        )?;
        let rows = st.query_map(params![after_id, session_id, limit], |r| {
            Ok(Event { id: r.get(0)?, at: r.get(1)?, kind: r.get(2)?, session_id: r.get(3)?, data: json_col(r, "data_json")? })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// The newest `limit` events, oldest first; optionally one session's only, only `kinds`.
    pub fn recent_events(&self, limit: u32, session_id: Option<SessionId>, kinds: Option<&[String]>) -> Result<Vec<Event>> {
        let kinds_json = kinds.map(|k| serde_json::to_string(k).expect("strings serialize"));
        let mut st = self.conn.prepare_cached(
            "SELECT id, at, kind, session_id, data_json FROM events
             WHERE (?1 IS NULL OR session_id = ?1)
               AND (?2 IS NULL OR kind IN (SELECT value FROM json_each(?2)))
             ORDER BY id DESC LIMIT ?3",
        )?;
        let rows = st.query_map(params![session_id, kinds_json, limit], |r| {
            Ok(Event { id: r.get(0)?, at: r.get(1)?, kind: r.get(2)?, session_id: r.get(3)?, data: json_col(r, "data_json")? })
        })?;
        let mut out: Vec<Event> = rows.collect::<rusqlite::Result<_>>()?;
        out.reverse();
        Ok(out)
    }
}
