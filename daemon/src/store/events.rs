//! The persisted event log. `crate::events::EventBus` appends here and then broadcasts; the same
//! [`Event`] struct is what `events.subscribe` sends on the wire.

use super::{json_col, now, time_text, to_json, Result, SessionId, Store};
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
        self.conn.prepare_cached("INSERT INTO events (at, kind, session_id, data_json) VALUES (?1, ?2, ?3, ?4)")?.execute(params![
            at,
            kind,
            session_id,
            to_json(data)?
        ])?;
        Ok(Event { id: self.conn.last_insert_rowid(), at, kind: kind.to_string(), session_id, data: data.clone() })
    }

    /// Deletes events of `kind` recorded more than `older_than` ago, never the newest event of all
    /// (replay cursors and new ids stay monotonic). Returns how many.
    pub fn prune_events(&self, kind: &str, older_than: std::time::Duration) -> Result<usize> {
        let cutoff = time_text(std::time::SystemTime::now() - older_than);
        Ok(self
            .conn
            .execute("DELETE FROM events WHERE kind = ?1 AND at < ?2 AND id < (SELECT max(id) FROM events)", params![kind, cutoff])?)
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

    /// The newest `limit` events, oldest first; optionally one session's only, only `kinds`, none of
    /// `exclude`.
    pub fn recent_events(
        &self,
        limit: u32,
        session_id: Option<SessionId>,
        kinds: Option<&[String]>,
        exclude: Option<&[String]>,
    ) -> Result<Vec<Event>> {
        let as_json = |k: &[String]| serde_json::to_string(k).expect("strings serialize");
        let (kinds_json, exclude_json) = (kinds.map(as_json), exclude.map(as_json));
        let mut st = self.conn.prepare_cached(
            "SELECT id, at, kind, session_id, data_json FROM events
             WHERE (?1 IS NULL OR session_id = ?1)
               AND (?2 IS NULL OR kind IN (SELECT value FROM json_each(?2)))
               AND (?4 IS NULL OR kind NOT IN (SELECT value FROM json_each(?4)))
             ORDER BY id DESC LIMIT ?3",
        )?;
        let rows = st.query_map(params![session_id, kinds_json, limit, exclude_json], |r| {
            Ok(Event { id: r.get(0)?, at: r.get(1)?, kind: r.get(2)?, session_id: r.get(3)?, data: json_col(r, "data_json")? })
        })?;
        let mut out: Vec<Event> = rows.collect::<rusqlite::Result<_>>()?;
        out.reverse();
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pruning_removes_only_old_events_of_the_kind_and_never_the_newest() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("t.db")).unwrap();
        let hello = |s: &Store| s.append_event("client.hello", None, &serde_json::json!({"client": "x"})).unwrap().id;
        let old_hellos = [hello(&store), hello(&store)];
        let old_session = store.append_event("session.started", None, &serde_json::json!({})).unwrap().id;
        let recent_hello = hello(&store);
        let newest_old_hello = hello(&store);
        for id in [old_hellos[0], old_hellos[1], old_session, newest_old_hello] {
            store.conn.execute("UPDATE events SET at = '2020-01-01T00:00:00.000Z' WHERE id = ?1", [id]).unwrap();
        }
        let pruned = store.prune_events("client.hello", std::time::Duration::from_secs(365 * 24 * 3600)).unwrap();
        assert_eq!(pruned, 2, "the two old hellos, not the newest event even though it is an old hello");
        let left: Vec<i64> = store.events_since(0, None, 100).unwrap().iter().map(|e| e.id).collect();
        assert_eq!(left, vec![old_session, recent_hello, newest_old_hello]);
        // A new event after pruning still gets a higher id than every event ever handed out.
        assert!(hello(&store) > newest_old_hello);
    }
}
