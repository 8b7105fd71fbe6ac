//! Idle-time scheduling: tune only while the person is away, get out of the way at once when they
//! come back, and stay quiet otherwise.
//!
//! # Contract with the session runner
//!
//! The [`Scheduler`] publishes a [`Decision`] on a `tokio::sync::watch` channel
//! ([`SchedulerHandle::decisions`]). The session runner holds a `watch::Receiver<Decision>` and:
//!
//! 1. runs (or resumes) a session only while `decision.run` is true, and starts one by itself
//!    only when `decision.may_start` is true too (`run` plus the load gate: a running measurement
//!    loads the machine itself, so load never pauses a running session) and `Gates::auto_start`;
//! 2. when `run` turns false, stops the running measurement **within one second**: it sends the
//!    worker `{"op":"cancel","target":<id>}` (docs/worker-protocol.md) and, if the worker has not
//!    answered `cancelled` within the remaining time, kills it (a new worker is started on resume);
//! 3. stores **no sample from the active period**: a cancelled request yields no result at all, and
//!    any result that completed at or after `decision.user_active_at` (the moment the person came
//!    back, which can be slightly before the scheduler noticed) is discarded too;
//! 4. marks the session `paused` (event `session.paused` with `decision.reasons`), and when `run`
//!    turns true again resumes the same session where it left off (`session.resumed`), re-running
//!    the candidate that was interrupted.
//!
//! The scheduler notifies receivers only when `run` or the set of blocking gates changes
//! ([`Decision::differs_materially`]); the latest reading (idle seconds, reasons) is always
//! available through `borrow()`.
//!
//! # Cost while idle
//!
//! No busy polling. While tuning is blocked by the idle gate the scheduler sleeps for the idle
//! time still missing (a person who is typing keeps resetting it; we look again when it could
//! first have been reached), capped at `idle_poll` to notice power/thermal/load changes. While a
//! measurement may run (`SchedulerOptions::busy`, driven by session events in [`daemon`]) it
//! samples every `active_poll` (default 250 ms) so that a returning person is noticed well
//! within the one-second budget; an open gate with nothing to tune is sampled every `idle_poll`.
//! Sources that know when they change ([`ActivitySource::changes`], the file source) wake the
//! scheduler immediately.

pub mod activity;
pub mod autostart;
pub mod daemon;
pub mod gates;
pub mod watch;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch as tokio_watch;
use tokio::task::JoinHandle;

pub use crate::gate::{Activity, Decision, Gate, PauseToken, Thermal};
pub use activity::{ActivityError, ActivitySource, FileSource};
pub use gates::Gates;

/// How often the scheduler looks when nothing tells it about changes.
#[derive(Debug, Clone)]
pub struct SchedulerOptions {
    /// Sampling period while tuning runs (must be well under 1 s: the pause budget).
    pub active_poll: Duration,
    /// Longest sleep otherwise (to notice power, thermal and load changes).
    pub idle_poll: Duration,
    /// Whether a measurement may be running (true while a session runs). The fast
    /// `active_poll` is used only then: an open gate with nothing to tune costs one sample per
    /// `idle_poll`. None: always assume busy (a scheduler used on its own, as in tests).
    pub busy: Option<tokio_watch::Receiver<bool>>,
}

impl Default for SchedulerOptions {
    fn default() -> Self {
        SchedulerOptions { active_poll: Duration::from_millis(250), idle_poll: Duration::from_secs(30), busy: None }
    }
}

/// The running scheduler task and its output.
pub struct SchedulerHandle {
    /// The latest decision; `changed()` fires when `run` or the blocking gates change.
    pub decisions: tokio_watch::Receiver<Decision>,
    shutdown: tokio_watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl SchedulerHandle {
    /// A fresh receiver for another consumer (status, the app, the session runner).
    pub fn subscribe(&self) -> tokio_watch::Receiver<Decision> {
        self.decisions.clone()
    }

    /// Stops the task and waits for it.
    pub async fn stop(self) {
        let _ = self.shutdown.send(true);
        let _ = self.task.await;
    }
}

/// Samples an [`ActivitySource`], applies the [`Gates`] and publishes [`Decision`]s.
pub struct Scheduler;

impl Scheduler {
    /// Spawns the scheduler on the current tokio runtime. `gates` is live: a config reload that
    /// changes the gates takes effect at once (see [`watch::ConfigWatcher`]).
    pub fn spawn(source: Arc<dyn ActivitySource>, gates: tokio_watch::Receiver<Gates>, options: SchedulerOptions) -> SchedulerHandle {
        let (tx, rx) = tokio_watch::channel(Decision::pending());
        let (shutdown_tx, shutdown_rx) = tokio_watch::channel(false);
        let task = tokio::spawn(run(source, gates, options, tx, shutdown_rx));
        SchedulerHandle { decisions: rx, shutdown: shutdown_tx, task }
    }
}

async fn sample(source: &Arc<dyn ActivitySource>) -> Result<Activity, String> {
    let s = source.clone();
    match tokio::task::spawn_blocking(move || s.sample()).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(e) if e.is_panic() => Err(format!("activity sampling panicked: {e}")),
        // The runtime is shutting down: not a fault of the source.
        Err(e) => Err(format!("activity sampling was cancelled: {e}")),
    }
}

/// How long to sleep after a decision, per the policy in the module docs.
fn next_wake(decision: &Decision, gates: &Gates, options: &SchedulerOptions) -> Duration {
    if decision.run {
        let busy = options.busy.as_ref().is_none_or(|b| *b.borrow());
        return if busy { options.active_poll } else { options.idle_poll };
    }
    match (&decision.activity, decision.blocked_by.as_slice()) {
        // Only the idle gate blocks: wake when it could first open (plus a hair, so the
        // reading is past the threshold rather than a rounding error short of it).
        (Some(a), [Gate::Idle]) => {
            gates.idle_remaining(a).map(|d| d + Duration::from_millis(20)).unwrap_or(options.active_poll).min(options.idle_poll)
        }
        _ => options.idle_poll,
    }
}

async fn run(
    source: Arc<dyn ActivitySource>,
    mut gates: tokio_watch::Receiver<Gates>,
    mut options: SchedulerOptions,
    tx: tokio_watch::Sender<Decision>,
    mut shutdown: tokio_watch::Receiver<bool>,
) {
    let changes = source.changes();
    let mut busy = options.busy.clone();
    // Once the config side drops its sender, stop listening to it (else `changed()` would return
    // an error at once, every turn: a busy loop).
    let mut gates_open = true;
    loop {
        let current_gates = gates.borrow_and_update().clone();
        let decision = match sample(&source).await {
            Ok(a) => current_gates.decide(&a, SystemTime::now()),
            Err(e) => Decision::source_failed(&e),
        };
        let wake = next_wake(&decision, &current_gates, &options);
        tx.send_if_modified(|old| {
            let notify = old.differs_materially(&decision);
            if notify {
                tracing::info!("tuning gate changed: {}", decision.describe());
            }
            *old = decision;
            notify
        });
        let notified = async {
            match &changes {
                Some(n) => n.notified().await,
                None => std::future::pending().await,
            }
        };
        let gates_changed = async {
            if gates_open {
                gates.changed().await.is_ok()
            } else {
                std::future::pending().await
            }
        };
        let busy_changed = async {
            match busy.as_mut() {
                Some(b) => b.changed().await.is_ok(),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(wake) => {}
            _ = notified => {}
            ok = gates_changed => gates_open = ok,
            ok = busy_changed => if !ok {
                // The busy signal's owner is gone: from now on assume busy (the safe side).
                busy = None;
                options.busy = None;
            },
            _ = shutdown.changed() => return,
        }
        if tx.is_closed() {
            return;
        }
    }
}
