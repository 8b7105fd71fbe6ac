//! The event bus: every event is appended to the store's `events` table AND broadcast to live
//! subscribers (`events.subscribe` connections, the app). Anyone holding an [`EventBus`] (a cheap
//! clone) calls [`EventBus::publish`]; event kinds are the constants in [`kind`].

use crate::store::{Event, SessionId, SharedStore, StoreError};
use serde_json::Value;
use tokio::sync::broadcast;

/// Names of the events (docs/protocol.md lists them). Use these, not string literals.
pub mod kind {
    pub const DAEMON_STARTED: &str = "daemon.started";
    pub const DAEMON_STOPPING: &str = "daemon.stopping";
    pub const CLIENT_HELLO: &str = "client.hello";
    pub const SESSION_STARTED: &str = "session.started";
    pub const SESSION_PAUSED: &str = "session.paused";
    pub const SESSION_RESUMED: &str = "session.resumed";
    /// The session ended by itself: budget spent, search exhausted, or failed (`state` says which).
    pub const SESSION_FINISHED: &str = "session.finished";
    /// Someone stopped the session (`tilewise stop`, the app, `tuning.stop`).
    pub const SESSION_STOPPED: &str = "session.stopped";
    pub const CANDIDATE_MEASURED: &str = "candidate.measured";
    pub const CANDIDATE_FAILED: &str = "candidate.failed";
    pub const POLICY_PROMOTED: &str = "policy.promoted";
    /// A best policy measured again (in a fresh worker after its promotion: `final`; on a later day).
    pub const POLICY_REMEASURED: &str = "policy.remeasured";
    /// A re-measurement found the best slower than stock (or wrong): the previous best or native is
    /// served again.
    pub const POLICY_DEMOTED: &str = "policy.demoted";
    /// Policies imported from a bundle (`policy.import`, the shared folder): pending until verified.
    pub const POLICY_IMPORTED: &str = "policy.imported";
    /// A bundle refused whole (tampered, malformed, unreadable), with the reason.
    pub const POLICY_IMPORT_REFUSED: &str = "policy.import_refused";
    /// A verification session decided an imported policy: verified (served) or rejected.
    pub const POLICY_VERIFIED: &str = "policy.verified";
    pub const WORKER_FAILED: &str = "worker.failed";
    pub const CONFIG_RELOADED: &str = "config.reloaded";
    pub const MODEL_CHANGED: &str = "model.changed";
    /// The daemon started (or resumed) a session by itself because the machine was free.
    pub const TUNING_AUTO_STARTED: &str = "tuning.auto_started";
    /// An automatic start failed; `retry_in_s` says when it is tried again.
    pub const TUNING_AUTO_START_FAILED: &str = "tuning.auto_start_failed";
}

/// How many events a slow subscriber may fall behind before it starts missing some (it is told
/// through `RecvError::Lagged`; the store still has them all).
const CAPACITY: usize = 1024;

/// Persist-then-broadcast. Clone it freely.
#[derive(Clone)]
pub struct EventBus {
    store: SharedStore,
    tx: broadcast::Sender<Event>,
}

impl std::fmt::Debug for EventBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventBus").field("subscribers", &self.tx.receiver_count()).finish()
    }
}

impl EventBus {
    pub fn new(store: SharedStore) -> EventBus {
        EventBus { store, tx: broadcast::channel(CAPACITY).0 }
    }

    /// Stores the event, then sends it to every live subscriber. Returns it with its id and time.
    /// Fails only when the store does (the event is then neither stored nor broadcast).
    pub fn publish(&self, kind: &str, session_id: Option<SessionId>, data: Value) -> Result<Event, StoreError> {
        let event = self.store.lock().unwrap_or_else(|p| p.into_inner()).append_event(kind, session_id, &data)?;
        // No subscribers is fine: the event is in the store.
        let _ = self.tx.send(event.clone());
        Ok(event)
    }

    /// Receives every event published from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.tx.subscribe()
    }
}

/// How long `client.hello` events are kept: one is appended at every MLX process start, the only
/// event whose count grows with use rather than with tuning, so without a limit the store grows
/// for ever. Sessions, candidates and promotions are history and are kept.
pub const KEEP_CLIENT_HELLO_FOR: std::time::Duration = std::time::Duration::from_secs(30 * 24 * 3600);

/// Prunes `client.hello` events older than [`KEEP_CLIENT_HELLO_FOR`] now and then once a day, for
/// as long as the runtime runs. A failure is logged and tried again the next day.
pub fn spawn_hello_retention(store: SharedStore) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut every_day = tokio::time::interval(std::time::Duration::from_secs(24 * 3600));
        loop {
            every_day.tick().await;
            let store = store.clone();
            let pruned = tokio::task::spawn_blocking(move || {
                store.lock().unwrap_or_else(|p| p.into_inner()).prune_events(kind::CLIENT_HELLO, KEEP_CLIENT_HELLO_FOR)
            })
            .await;
            match pruned {
                Ok(Ok(0)) => {}
                Ok(Ok(n)) => tracing::info!(
                    pruned = n,
                    "removed client.hello events older than {}",
                    humantime::format_duration(KEEP_CLIENT_HELLO_FOR)
                ),
                Ok(Err(e)) => tracing::warn!("could not prune old client.hello events: {e}"),
                Err(e) => tracing::warn!("pruning old client.hello events stopped: {e}"),
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;
    use serde_json::json;
    use std::sync::{Arc, Mutex};

    #[tokio::test]
    async fn publish_persists_and_broadcasts() {
        let tmp = tempfile::tempdir().unwrap();
        let store: SharedStore = Arc::new(Mutex::new(Store::open(&tmp.path().join("db")).unwrap()));
        let bus = EventBus::new(store.clone());
        let mut rx = bus.subscribe();
        let sent = bus.publish(kind::DAEMON_STARTED, None, json!({"pid": 1})).unwrap();
        assert_eq!(rx.recv().await.unwrap(), sent);
        let stored = store.lock().unwrap().events_since(0, None, 10).unwrap();
        assert_eq!(stored, vec![sent]);
    }
}
