//! Starts tuning by itself when the machine is free: the resident half of "tune while idle".
//!
//! The scheduler says *whether* tuning may run ([`Decision::may_start`]); this task decides
//! *when to start a session* and which one. It starts (or resumes, through
//! [`SessionManager::start`], which picks up an unfinished session of the same target) a session
//! of the idle model (`[idle] model`; else the model people ran most through the plugin that has no
//! proven policy yet, by the name they loaded it with; else the backend's embedded default) with the
//! `[idle] session_evaluations` budget, when all of these hold:
//!
//! - `[idle] enabled` is true and the gates allow a start (`may_start`: idle, AC, not Low Power
//!   Mode, thermals, load);
//! - no session is running (an explicitly started one always wins; the auto-starter waits for it);
//! - this daemon has been up for `min_idle_s` — on a headless machine the activity source reports
//!   "idle since boot", and a person who just started the daemon to run `tilewise tune` must not
//!   find an automatic session there first;
//! - the newest session of this model on this device did not finish less than `retune_after_h`
//!   ago (a finished search is not repeated at every idle minute; after the wait a new seed
//!   re-checks the result);
//! - after a session a person stopped, the gate has closed and opened again (a new idle period),
//!   or `retune_after_h` has passed: "stop" means "not now", not "at the next poll";
//! - after a failed start or a failed session, a backoff (1 min doubling to 1 h) has passed, so a
//!   missing model or a broken Python does not spin.
//!
//! Before anything else, policies imported from other machines and still pending are verified
//! (docs/sharing.md), a model at a time. Before a search, a best policy last measured more than a day ago (promoted or re-measured: on an
//! earlier day, perhaps before the machine, its drivers or its load changed) is measured again in a
//! session of its own (`remeasure`), which demotes it if it is now slower than stock.
//!
//! Every automatic start is an event (`tuning.auto_started`), every failed one too
//! (`tuning.auto_start_failed`, with the error and when it is tried again). The task sleeps on the
//! scheduler's and the config's watch channels and on timers only: no polling.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use serde_json::json;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::Decision;
use crate::config::{Config, IdleConfig};
use crate::events::{kind, EventBus};
use crate::session::{SessionManager, StartParams};
use crate::store::{Budget, SessionState, SharedStore};

/// A best policy last measured longer ago than this is measured again at the next idle time.
pub const REMEASURE_AFTER: Duration = Duration::from_secs(24 * 3600);

/// Shortest and longest wait after a failed automatic start or session.
const BACKOFF_MIN: Duration = Duration::from_secs(60);
const BACKOFF_MAX: Duration = Duration::from_secs(3600);

/// What the auto-starter remembers between attempts (in memory: a restarted daemon starts afresh,
/// and the store keeps what matters — which sessions finished when).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AutoState {
    /// Backoff after a failure: no automatic start before this moment, and why.
    pub hold_until: Option<(Instant, String)>,
    /// A person stopped the last automatic session: no start before this moment unless the gate
    /// closes and opens again first (a new idle period; the run loop then clears it).
    pub stopped_until: Option<Instant>,
    /// Failed starts/sessions in a row (for the backoff).
    pub failures: u32,
    /// Best policies this daemon run has already re-measured (or tried to).
    pub remeasured: Vec<String>,
    /// Models whose pending imports this daemon run has already tried to verify.
    pub verified_models: Vec<String>,
}

/// The next move of the auto-starter.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    Start,
    /// Sleep at most this long (or until the gate or the config changes), then look again.
    Wait(Duration, String),
    /// Nothing to do until the gate or the config changes.
    WaitForChange(String),
}

/// Pure decision (unit-tested): `uptime` is how long this daemon has run, `last_finished_ago`
/// how long ago the newest session of the idle model finished (None: it did not, or there is none).
pub fn next_step(
    now: Instant,
    state: &AutoState,
    decision: &Decision,
    idle: &IdleConfig,
    uptime: Duration,
    last_finished_ago: Option<Duration>,
) -> Step {
    if !idle.enabled {
        return Step::WaitForChange("automatic tuning is off (idle.enabled = false)".into());
    }
    if !decision.may_start {
        return Step::WaitForChange(format!("gates closed: {}", decision.summary()));
    }
    if let Some((until, why)) = &state.hold_until {
        if *until > now {
            return Step::Wait(*until - now, why.clone());
        }
    }
    if let Some(until) = state.stopped_until {
        if until > now {
            return Step::Wait(until - now, "stopped by a person: waiting for the next idle period".into());
        }
    }
    let settle = Duration::from_secs(idle.min_idle_s);
    if uptime < settle {
        return Step::Wait(settle - uptime, format!("daemon up for {}s of the {}s idle minimum", uptime.as_secs(), idle.min_idle_s));
    }
    let retune = Duration::from_secs_f64(idle.retune_after_h * 3600.0);
    if let Some(ago) = last_finished_ago {
        if ago < retune {
            return Step::Wait(
                retune - ago,
                format!("a session of this model finished {}s ago; next one after {}h", ago.as_secs(), idle.retune_after_h),
            );
        }
    }
    Step::Start
}

/// Backoff after `failures` failures in a row: 1 min, 2, 4, ... capped at 1 h.
pub fn backoff(failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(16);
    (BACKOFF_MIN * 2u32.pow(exp)).min(BACKOFF_MAX)
}

/// What the task needs from the daemon.
pub struct AutoStartDeps {
    pub tuning: Arc<SessionManager>,
    pub store: SharedStore,
    pub events: EventBus,
    pub decisions: watch::Receiver<Decision>,
    pub config: watch::Receiver<Arc<Config>>,
    /// This machine's fingerprint (sessions of other devices in a copied database are ignored).
    pub device: String,
    /// The backend this machine's MLX is expected to use (picks the default model).
    pub backend: String,
}

/// Spawns the auto-starter on the current runtime; it ends when the decisions' sender is dropped.
pub fn spawn(deps: AutoStartDeps) -> JoinHandle<()> {
    tokio::spawn(run(deps, Instant::now()))
}

/// The model idle time tunes under `idle`.
pub fn idle_model(idle: &IdleConfig, backend: &str) -> String {
    idle.model.clone().unwrap_or_else(|| crate::session::default_model(backend).to_string())
}

/// How long ago the newest session of `model` on `device` finished, if the newest one did.
fn last_finished_ago(store: &SharedStore, device: &str, model: &str) -> Option<Duration> {
    let newest = store.lock().unwrap_or_else(|p| p.into_inner()).newest_session_of_model(device, model).ok()??;
    if newest.state != SessionState::Finished {
        return None;
    }
    let at = humantime::parse_rfc3339(&newest.updated_at).ok()?;
    Some(SystemTime::now().duration_since(at).unwrap_or_default())
}

async fn run(mut deps: AutoStartDeps, daemon_started: Instant) {
    let mut state = AutoState::default();
    loop {
        // An explicitly started (or resumed) session runs first; look again when it ends.
        if deps.tuning.current().is_some() {
            deps.tuning.wait().await;
            continue;
        }
        let decision = deps.decisions.borrow_and_update().clone();
        if !decision.run {
            // The gate closed: its next opening is a new idle period.
            state.stopped_until = None;
        }
        let config = deps.config.borrow_and_update().clone();
        let model = match &config.idle.model {
            Some(m) => m.clone(),
            // What people run most and is not tuned yet, else the embedded default.
            None => {
                let used = crate::usage::most_used_untuned(&deps.store.lock().unwrap_or_else(|p| p.into_inner()), &deps.device);
                if let Err(e) = &used {
                    tracing::warn!("cannot tell which model people use most: {e}; tuning the default model");
                }
                used.ok().flatten().unwrap_or_else(|| idle_model(&config.idle, &deps.backend))
            }
        };
        let now = Instant::now();
        // Imported policies waiting for this machine's verdict go first (each model at most once
        // per daemon run), by the name this machine knows the model by.
        let verify = {
            let store = deps.store.lock().unwrap_or_else(|p| p.into_inner());
            let names: std::collections::HashMap<String, Option<String>> =
                store.models_seen().unwrap_or_default().into_iter().map(|m| (m.fingerprint, m.name)).collect();
            store
                .imports(Some(crate::store::ImportState::Pending), None)
                .unwrap_or_default()
                .into_iter()
                .filter(|i| !state.verified_models.contains(&i.model))
                .find_map(|i| names.get(&i.model).cloned().flatten().map(|name| (i.model, name)))
        };
        // A verification does not wait for the idle model's retune interval.
        let ago = if verify.is_some() { None } else { last_finished_ago(&deps.store, &deps.device, &model) };
        let step = next_step(now, &state, &decision, &config.idle, now - daemon_started, ago);
        let wait = match step {
            Step::Start => None,
            Step::Wait(d, why) => {
                tracing::debug!("auto-start: waiting {}s: {why}", d.as_secs());
                Some(Some(d))
            }
            Step::WaitForChange(why) => {
                tracing::debug!("auto-start: waiting: {why}");
                Some(None)
            }
        };
        if let Some(limit) = wait {
            let sleep = async {
                match limit {
                    Some(d) => tokio::time::sleep(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                r = deps.decisions.changed() => if r.is_err() { return },
                r = deps.config.changed() => if r.is_err() { return },
                _ = sleep => {}
            }
            continue;
        }

        // A best last measured on an earlier day is measured again first (each at most once per
        // daemon run: a model that moved or changed cannot loop here).
        let stale = deps
            .store
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .stale_bests(&deps.device, REMEASURE_AFTER)
            .unwrap_or_default()
            .into_iter()
            .find(|(b, path)| path.is_some() && !state.remeasured.contains(&b.hash));
        let stale = if verify.is_some() { None } else { stale };
        let (params, model) = match (verify, stale) {
            (Some((fingerprint, name)), _) => {
                state.verified_models.push(fingerprint);
                tracing::info!(model = %name, "machine idle: verifying imported policies");
                (StartParams { model: Some(name.clone()), verify: Some(true), ..Default::default() }, name)
            }
            (None, Some((best, Some(path)))) => {
                state.remeasured.push(best.hash.clone());
                tracing::info!(model = %path, hash = %best.hash, "machine idle: re-measuring a best policy last measured on an earlier day");
                (StartParams { model: Some(path.clone()), remeasure: Some(true), ..Default::default() }, path)
            }
            (None, _) => {
                let params = StartParams {
                    model: Some(model.clone()),
                    budget: Some(Budget { evaluations: Some(u64::from(config.idle.session_evaluations)), seconds: None }),
                    ..Default::default()
                };
                (params, model)
            }
        };
        tracing::info!(model = %model, "machine idle: starting a tuning session");
        match deps.tuning.start(params).await {
            Ok((id, resumed)) => {
                publish(
                    &deps.events,
                    kind::TUNING_AUTO_STARTED,
                    Some(id),
                    json!({
                        "session_id": id, "resumed": resumed, "model": model,
                        "budget": {"evaluations": config.idle.session_evaluations}, "reason": decision.summary(),
                    }),
                );
                deps.tuning.wait().await;
                let end = deps.store.lock().unwrap_or_else(|p| p.into_inner()).session(id).ok().flatten();
                match end.map(|s| s.state) {
                    Some(SessionState::Finished) => state.failures = 0,
                    Some(SessionState::Stopped) => {
                        state.failures = 0;
                        let retune = Duration::from_secs_f64(config.idle.retune_after_h * 3600.0);
                        state.stopped_until = Some(Instant::now() + retune);
                    }
                    Some(SessionState::Failed) => {
                        state.failures += 1;
                        let wait = backoff(state.failures);
                        state.hold_until =
                            Some((Instant::now() + wait, format!("the last automatic session failed; retrying in {}s", wait.as_secs())));
                    }
                    // Paused by a stopping daemon, or still marked running: nothing to decide now.
                    _ => {}
                }
            }
            Err(crate::session::SessionError::Busy(..)) => {} // someone started one first: wait for it
            Err(e) => {
                state.failures += 1;
                let wait = backoff(state.failures);
                tracing::warn!("automatic tuning session could not start: {e}; retrying in {}s", wait.as_secs());
                publish(
                    &deps.events,
                    kind::TUNING_AUTO_START_FAILED,
                    None,
                    json!({
                        "model": model, "error": e.to_string(), "retry_in_s": wait.as_secs(),
                    }),
                );
                state.hold_until = Some((Instant::now() + wait, format!("the last automatic start failed: {e}")));
            }
        }
    }
}

fn publish(bus: &EventBus, kind: &str, session: Option<i64>, data: serde_json::Value) {
    if let Err(e) = bus.publish(kind, session, data) {
        tracing::warn!("event {kind} not stored: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open() -> Decision {
        let gates = super::super::Gates { max_load_1m: None, ..super::super::Gates::default() };
        let free = super::super::Activity {
            user_idle: Duration::from_secs(10_000),
            on_ac_power: true,
            battery_percent: None,
            low_power_mode: false,
            thermal: super::super::Thermal::Nominal,
            load_1m: 0.0,
            source: "test",
        };
        let d = gates.decide(&free, SystemTime::now());
        assert!(d.may_start, "{d:?}");
        d
    }

    fn idle() -> IdleConfig {
        IdleConfig { min_idle_s: 300, retune_after_h: 24.0, ..IdleConfig::default() }
    }

    const UP: Duration = Duration::from_secs(3600);

    #[test]
    fn starts_when_free_and_settled() {
        assert_eq!(next_step(Instant::now(), &AutoState::default(), &open(), &idle(), UP, None), Step::Start);
    }

    #[test]
    fn off_or_closed_gates_wait_for_a_change() {
        let off = IdleConfig { enabled: false, ..idle() };
        assert!(matches!(next_step(Instant::now(), &AutoState::default(), &open(), &off, UP, None), Step::WaitForChange(_)));
        let mut closed = open();
        closed.may_start = false;
        assert!(matches!(next_step(Instant::now(), &AutoState::default(), &closed, &idle(), UP, None), Step::WaitForChange(_)));
    }

    #[test]
    fn a_young_daemon_waits_out_the_idle_minimum() {
        let step = next_step(Instant::now(), &AutoState::default(), &open(), &idle(), Duration::from_secs(100), None);
        assert!(matches!(step, Step::Wait(d, _) if d == Duration::from_secs(200)), "{step:?}");
    }

    #[test]
    fn a_recently_finished_session_is_not_repeated_until_retune_time() {
        let step = next_step(Instant::now(), &AutoState::default(), &open(), &idle(), UP, Some(Duration::from_secs(3600)));
        assert!(matches!(step, Step::Wait(d, _) if d == Duration::from_secs(23 * 3600)), "{step:?}");
        assert_eq!(
            next_step(Instant::now(), &AutoState::default(), &open(), &idle(), UP, Some(Duration::from_secs(25 * 3600))),
            Step::Start
        );
    }

    #[test]
    fn holds_and_stops_are_respected() {
        let now = Instant::now();
        let held = AutoState { hold_until: Some((now + Duration::from_secs(60), "backoff".into())), ..Default::default() };
        assert!(matches!(next_step(now, &held, &open(), &idle(), UP, None), Step::Wait(d, _) if d == Duration::from_secs(60)));
        let stopped = AutoState { stopped_until: Some(now + Duration::from_secs(7200)), ..Default::default() };
        assert!(matches!(next_step(now, &stopped, &open(), &idle(), UP, None), Step::Wait(d, _) if d == Duration::from_secs(7200)));
        // Expired holds no longer hold.
        let later = now + Duration::from_secs(7201);
        let both = AutoState { stopped_until: Some(now + Duration::from_secs(7200)), ..held };
        assert_eq!(next_step(later, &both, &open(), &idle(), UP, None), Step::Start);
    }

    #[test]
    fn backoff_doubles_to_an_hour() {
        assert_eq!(backoff(1), Duration::from_secs(60));
        assert_eq!(backoff(2), Duration::from_secs(120));
        assert_eq!(backoff(7), Duration::from_secs(3600));
        assert_eq!(backoff(100), Duration::from_secs(3600));
    }
}
