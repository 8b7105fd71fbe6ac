//! The session manager: starts, resumes, stops and shows sessions; at most one runs at a time, as a
//! tokio task ([`super::run`]).

use super::run::{retarget, stopped_early, Runner, SavedState};
use super::settings::{SessionSpec, StartParams, VerifyItem, WarmItem};
use super::LlmSource;
use crate::events::{kind, EventBus};
use crate::evolve::cost::Memo;
use crate::evolve::engine::Engine;
use crate::evolve::space::{FusionCandidate, SearchSpace, Shape};
use crate::ipc::protocol::SessionShowResult;
use crate::policy::Target;
use crate::store::{BestKey, ImportState, NewSession, SessionId, SessionState, SharedStore, StoreError};
use crate::worker::{Supervisor, WorkerConfig, WorkerError};
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Imported policies a search proposes first at most (each costs an evaluation).
const MAX_WARM_START: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("bad params: {0}")]
    BadParams(String),
    #[error("invalid policy: {0}")]
    InvalidPolicy(String),
    #[error("session {0} not found")]
    NotFound(SessionId),
    #[error("busy: session {0} is tuning model {1}; stop it first (`tilewise stop`)")]
    Busy(SessionId, String),
    #[error("worker: {0}")]
    Worker(#[from] WorkerError),
    #[error("{0}")]
    WorkerStart(String),
    #[error("store: {0}")]
    Store(#[from] StoreError),
}

/// The machine the daemon runs on, as sessions need it.
#[derive(Debug, Clone)]
pub struct DeviceInfo {
    pub fingerprint: String,
    pub chip: String,
}

/// How the manager starts workers and talks to the rest of the daemon.
#[derive(Clone)]
pub struct ManagerOptions {
    pub store: SharedStore,
    pub events: EventBus,
    pub worker: WorkerConfig,
    pub device: DeviceInfo,
    /// The LLM endpoint sessions ask when they run with `llm: true`.
    pub llm: LlmSource,
    /// Idle/power gate from the scheduler; `None` = always allowed (tests, `tilewise tune`).
    pub gate: Option<watch::Receiver<crate::gate::Decision>>,
    /// Timeout for `load` (synthesizing a model the first time takes a while).
    pub load_timeout: Duration,
    /// Why no Python with the package was found, when none was: added to a worker that fails to
    /// start (see `crate::python`).
    pub python_problem: Option<String>,
}

pub(super) struct Running {
    session_id: SessionId,
    target: BestKey,
    stop: CancellationToken,
    done: watch::Receiver<bool>,
}

/// What the running session is doing now, for `status` (kept in memory: `status` must not block).
#[derive(Debug, Clone, Default)]
pub(super) struct LiveProgress {
    pub(super) paused: Option<String>,
    pub(super) progress: Value,
    /// How the last session ended, for `status` while idle ("session 4 failed: ..."): the
    /// store may not have been able to take it (disk full, read-only), and a person asking why
    /// nothing is tuning should not need the log.
    pub(super) last_end: Option<String>,
}

/// Owns the running session (at most one per daemon: the measurements must not share the machine).
#[derive(Clone)]
pub struct SessionManager {
    /// Serializes `start`: it loads a worker for seconds before the session is registered, and
    /// two overlapping starts (two clients, or the auto-starter and a person) would both launch.
    pub(super) starting: Arc<tokio::sync::Mutex<()>>,
    pub(super) opts: ManagerOptions,
    pub(super) running: Arc<Mutex<Option<Running>>>,
    pub(super) live: Arc<Mutex<LiveProgress>>,
    /// Set when the daemon stops: the session is left `paused` (resumed at the next start), not `stopped`.
    pub(super) shutting_down: Arc<std::sync::atomic::AtomicBool>,
}

pub(super) fn lock(store: &SharedStore) -> std::sync::MutexGuard<'_, crate::store::Store> {
    store.lock().unwrap_or_else(|p| p.into_inner())
}

/// The shapes of a worker `load` reply.
fn shapes_of(loaded: &Value) -> Result<Vec<Shape>, SessionError> {
    serde_json::from_value(loaded.get("shapes").cloned().unwrap_or(Value::Null))
        .map_err(|e| SessionError::BadParams(format!("worker load reply has no usable shapes: {e}")))
}

/// The sibling groups of a worker `load` reply (none from a worker that does not report them).
fn fusion_of(loaded: &Value) -> Result<Vec<FusionCandidate>, SessionError> {
    match loaded.get("fusion_groups") {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(v) => serde_json::from_value(v.clone())
            .map_err(|e| SessionError::BadParams(format!("worker load reply has unusable fusion_groups: {e}"))),
    }
}

pub(super) fn str_field(v: &Value, k: &str) -> String {
    v.get(k).and_then(Value::as_str).unwrap_or("").to_string()
}

impl SessionManager {
    pub fn new(opts: ManagerOptions) -> SessionManager {
        SessionManager {
            opts,
            running: Arc::new(Mutex::new(None)),
            live: Arc::new(Mutex::new(LiveProgress::default())),
            shutting_down: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            starting: Arc::default(),
        }
    }

    /// The running session's id, if any.
    pub fn current(&self) -> Option<SessionId> {
        let r = self.running.lock().unwrap();
        r.as_ref().filter(|r| !*r.done.borrow()).map(|r| r.session_id)
    }

    /// `tuning.start`: loads the model in a fresh worker (that fixes the session's identity), then
    /// resumes the newest unfinished session of that (device, model, mlx, backend) or creates one,
    /// and runs it in a task. A session already running for the same target is attached to.
    pub async fn start(&self, params: StartParams) -> Result<(SessionId, bool), SessionError> {
        let _one_start_at_a_time = self.starting.lock().await;
        if let Some(id) = self.current() {
            // Attach when the request names nothing different; refuse to run two at once.
            let same = params.model.is_none() && params.policies.is_none();
            if same {
                return Ok((id, true));
            }
            let model = self.running.lock().unwrap().as_ref().map(|r| r.target.model.clone()).unwrap_or_default();
            return Err(SessionError::Busy(id, model));
        }
        if params.llm == Some(true) && self.opts.llm.current().is_none() {
            return Err(SessionError::BadParams(
                "llm: no LLM endpoint is configured: set [llm] endpoint and model in config.toml (docs/sessions.md)".into(),
            ));
        }
        let mut sup = Supervisor::new(self.opts.worker.clone());
        let ready = match sup.worker().await {
            Ok(w) => w.ready().clone(),
            Err(e) => {
                let python = self.opts.worker.python.display().to_string();
                let why = match &self.opts.python_problem {
                    Some(problem) => format!("the measuring worker did not start ({e}): {problem}"),
                    None => format!(
                        "the measuring worker did not start with {python} ({e}); if it lacks the tilewise package, name a \
                         Python that has it: `python = \"...\"` in the config file, or TILEWISE_PYTHON"
                    ),
                };
                let _ = self.opts.events.publish(kind::WORKER_FAILED, None, json!({"kind": e.kind(), "reason": why, "python": python}));
                return Err(SessionError::WorkerStart(why));
            }
        };
        let mut spec = params.resolve(&ready.backend)?;
        let mut load = json!({"model": spec.model});
        if let Some(d) = &spec.dtype {
            load["dtype"] = json!(d);
        }
        let loaded = sup.load(load, self.opts.load_timeout).await?;
        let target = Target {
            device: self.opts.device.fingerprint.clone(),
            model: str_field(&loaded, "model_fingerprint"),
            mlx: ready.mlx.clone(),
            backend: ready.backend.clone(),
        };
        {
            let st = lock(&self.opts.store);
            st.upsert_model(&target.model, loaded.get("model_path").and_then(Value::as_str), loaded.get("config").unwrap_or(&Value::Null))?;
            st.note_model_used(&target.model, Some(&spec.model), loaded.get("weights").and_then(Value::as_str))?;
            // Tune what people run with this model, unless the caller named a workload.
            if params.workload.is_none() {
                if let Some((workload, why)) = super::usage_mix::workload_from_usage(&st.usage_of(&target.model)?, &ready.backend) {
                    tracing::info!(model = %target.model, "workload {why}");
                    spec.workload = workload;
                    spec.workload_from = Some(why);
                }
            }
        }
        let key = BestKey {
            device: target.device.clone(),
            model: target.model.clone(),
            mlx: target.mlx.clone(),
            backend: target.backend.clone(),
        };
        if params.verify == Some(true) {
            self.prepare_verification(&mut spec, &target)?;
        }
        let existing = lock(&self.opts.store).resumable_session(&key.device, &key.model, &key.mlx, &key.backend)?;
        // A fixed list (or a re-measurement) is its own session: it never resumes a search (or
        // vice versa).
        let resumable = existing.filter(|s| {
            let saved = lock(&self.opts.store).search_state(s.id).ok().flatten();
            let saved_spec = saved.as_ref().and_then(|v| v.get("spec"));
            let saved_fixed = saved_spec.and_then(|s| s.get("fixed")).is_some_and(|f| !f.is_null());
            let saved_remeasure = saved_spec.and_then(|s| s.get("remeasure")).and_then(Value::as_bool).unwrap_or(false);
            let saved_verify = saved_spec.and_then(|s| s.get("verify")).is_some_and(|v| v.as_array().is_some_and(|a| !a.is_empty()));
            saved_fixed == spec.fixed.is_some() && saved_remeasure == spec.remeasure && saved_verify != spec.verify.is_empty()
        });
        let (session_id, resumed, state) = match resumable {
            Some(s) => {
                let saved = lock(&self.opts.store).search_state(s.id)?;
                match saved.map(serde_json::from_value::<SavedState>) {
                    Some(Ok(state)) => (s.id, true, state),
                    _ => {
                        // A session created but killed before its first state write: start it over.
                        let state = self.fresh_state(spec.clone(), &target, &loaded)?;
                        (s.id, true, state)
                    }
                }
            }
            None => {
                let state = self.fresh_state(spec.clone(), &target, &loaded)?;
                let id = lock(&self.opts.store).create_session(&NewSession {
                    device: key.device.clone(),
                    model: key.model.clone(),
                    mlx: key.mlx.clone(),
                    backend: key.backend.clone(),
                    seed: spec.seed as i64,
                    budget: spec.budget,
                })?;
                (id, false, state)
            }
        };
        lock(&self.opts.store).save_search_state(session_id, &serde_json::to_value(&state).expect("state serializes"))?;
        self.launch(session_id, key, state, sup, resumed);
        Ok((session_id, resumed))
    }

    /// Resumes the newest session left `running` by a daemon that died (called at daemon start).
    pub async fn resume_interrupted(&self) -> Result<Option<SessionId>, SessionError> {
        let sessions = lock(&self.opts.store).list_sessions(50)?;
        let Some(s) = sessions.into_iter().find(|s| {
            s.device == self.opts.device.fingerprint
                && (s.state == SessionState::Running
                    || (s.state == SessionState::Paused && s.reason.as_deref().is_some_and(|r| r.starts_with("daemon stopped"))))
        }) else {
            return Ok(None);
        };
        let Some(saved) = lock(&self.opts.store).search_state(s.id)? else { return Ok(None) };
        let Ok(state) = serde_json::from_value::<SavedState>(saved) else { return Ok(None) };
        let p = StartParams {
            model: Some(state.spec.model.clone()),
            dtype: state.spec.dtype.clone(),
            policies: state.spec.fixed.clone(),
            ..Default::default()
        };
        let (id, _) = self.start(p).await?;
        Ok(Some(id))
    }

    /// Turns `spec` into a verification session: the model's pending imports for this MLX version,
    /// retargeted to this machine, become its fixed list. Imports for another MLX version become
    /// starting points; one that is not a valid policy here is rejected. Nothing pending: an error.
    fn prepare_verification(&self, spec: &mut SessionSpec, target: &Target) -> Result<(), SessionError> {
        let st = lock(&self.opts.store);
        let mut fixed = vec![];
        for imp in st.imports(Some(ImportState::Pending), Some(&target.model))? {
            if imp.backend != target.backend || imp.mlx != target.mlx {
                let why = format!(
                    "proven with MLX {} ({}); this machine runs {} ({}): kept as a starting point only",
                    imp.mlx, imp.backend, target.mlx, target.backend
                );
                st.decide_import(imp.id, ImportState::StartingPoint, &why, None)?;
                continue;
            }
            match retarget(&imp.policy, target) {
                Ok(p) => {
                    spec.verify.push(VerifyItem { import_id: imp.id, hash: p.content_hash() });
                    fixed.push(p.to_value());
                }
                Err(e) => st.decide_import(imp.id, ImportState::Rejected, &format!("not a valid policy on this machine: {e}"), None)?,
            }
        }
        if fixed.is_empty() {
            return Err(SessionError::BadParams(format!(
                "nothing to verify: no imported policy for model {} with MLX {} ({}) is pending (`tilewise imports` lists them)",
                target.model, target.mlx, target.backend
            )));
        }
        spec.fixed = Some(fixed);
        spec.screen = false;
        Ok(())
    }

    /// Imported policies to propose before the seeds: pending or starting-point imports of this
    /// backend, those proven for this model first, newest first, at most `MAX_WARM_START`.
    fn warm_start(&self, spec: &mut SessionSpec, space: &SearchSpace, engine: &mut Engine) -> Result<(), SessionError> {
        if spec.cold || spec.fixed.is_some() || spec.remeasure {
            return Ok(());
        }
        let mut imports: Vec<_> = lock(&self.opts.store)
            .imports(None, None)?
            .into_iter()
            .filter(|i| matches!(i.state, ImportState::Pending | ImportState::StartingPoint) && i.backend == space.target.backend)
            .collect();
        imports.sort_by_key(|i| (i.model != space.target.model, std::cmp::Reverse(i.id)));
        for imp in imports {
            if spec.warm_start.len() >= MAX_WARM_START {
                break;
            }
            let Ok(policy) = retarget(&imp.policy, &space.target) else { continue };
            let Ok(policy) = engine.admit(space, policy) else { continue };
            let from = format!("{} ({})", imp.from_chip.as_deref().unwrap_or("another machine"), imp.from_device);
            spec.warm_start.push(WarmItem {
                import_id: imp.id,
                hash: policy.content_hash(),
                from: from.clone(),
                same_model: imp.model == space.target.model,
            });
            engine.warm_start(policy, format!("warm:{from}"));
        }
        Ok(())
    }

    fn fresh_state(&self, mut spec: SessionSpec, target: &Target, loaded: &Value) -> Result<SavedState, SessionError> {
        let space = SearchSpace {
            target: target.clone(),
            shapes: shapes_of(loaded)?,
            workload: spec.workload.clone(),
            chip: self.opts.device.chip.clone(),
            dtype: str_field(loaded, "dtype"),
            fusion: fusion_of(loaded)?,
        };
        if let Some(list) = &spec.fixed {
            for (i, doc) in list.iter().enumerate() {
                retarget(doc, target).map_err(|e| SessionError::InvalidPolicy(format!("policies[{i}]: {e}")))?;
            }
        }
        let mut engine = Engine::new(spec.seed, spec.engine.clone(), &space);
        self.warm_start(&mut spec, &space, &mut engine)?;
        Ok(SavedState {
            spec,
            space,
            engine,
            fixed_next: 0,
            screened: 0,
            shape_items: 0,
            elapsed_s: 0.0,
            llm: Default::default(),
            calibration: Default::default(),
        })
    }

    fn launch(&self, session_id: SessionId, target: BestKey, state: SavedState, sup: Supervisor, resumed: bool) {
        let stop = CancellationToken::new();
        let (done_tx, done_rx) = watch::channel(false);
        *self.running.lock().unwrap() = Some(Running { session_id, target: target.clone(), stop: stop.clone(), done: done_rx });
        *self.live.lock().unwrap() = LiveProgress::default();
        let runner = Runner {
            opts: self.opts.clone(),
            session_id,
            key: target,
            state,
            sup,
            stop,
            memo: Memo::default(),
            live: self.live.clone(),
            shutting_down: self.shutting_down.clone(),
            llm_reply: None,
        };
        tokio::spawn(async move {
            runner.run(resumed).await;
            let _ = done_tx.send(true);
        });
    }

    /// `tuning.stop`: stops the running session (any, or only `session_id`). An evaluation in
    /// progress is cancelled at its next sample; its candidate goes back to `pending`.
    pub async fn stop(&self, session_id: Option<SessionId>) -> bool {
        let (stop, mut done) = {
            let r = self.running.lock().unwrap();
            match r.as_ref() {
                Some(run) if session_id.is_none_or(|id| id == run.session_id) && !*run.done.borrow() => {
                    (run.stop.clone(), run.done.clone())
                }
                _ => return false,
            }
        };
        stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(60), done.wait_for(|d| *d)).await;
        true
    }

    /// Waits until the running session (if any) ends.
    pub async fn wait(&self) {
        let done = self.running.lock().unwrap().as_ref().map(|r| r.done.clone());
        if let Some(mut d) = done {
            let _ = d.wait_for(|d| *d).await;
        }
    }

    /// `session.list`.
    pub fn list(&self) -> Result<Value, SessionError> {
        let sessions = lock(&self.opts.store).list_sessions(100)?;
        Ok(json!({"sessions": sessions}))
    }

    /// `session.show`: the session, the best policy of its target, its candidates with their latest
    /// measurement, the memo size and the search's own counters.
    pub fn show(&self, session_id: SessionId) -> Result<Value, SessionError> {
        Ok(serde_json::to_value(self.show_typed(session_id)?).map_err(StoreError::from)?)
    }

    /// `session.show` as its protocol type (what the socket answers).
    pub fn show_typed(&self, session_id: SessionId) -> Result<SessionShowResult, SessionError> {
        let st = lock(&self.opts.store);
        let s = st.session(session_id)?.ok_or(SessionError::NotFound(session_id))?;
        let key = BestKey { device: s.device.clone(), model: s.model.clone(), mlx: s.mlx.clone(), backend: s.backend.clone() };
        let best = st.best(&key)?;
        let mut candidates = Vec::new();
        for c in st.candidates(session_id, None)? {
            let m = st.measurements(c.id)?.pop();
            candidates.push(json!({
                "id": c.id, "hash": c.hash, "status": c.status, "origin": c.origin, "island": c.island,
                "generation": c.generation, "failure_reason": c.failure_reason, "policy": c.policy,
                "measurement": m.map(|m| json!({"id": m.id, "correct": m.correct, "ratio": m.ratio, "lo": m.lo, "hi": m.hi, "at": m.at,
                                                 "stopped_early": stopped_early(&m.detail)})),
            }));
        }
        let memo_size = st.memo_size(&s.device, &s.mlx, &s.backend)?;
        // Per-shape timings, stock vs each measured plan: the dashboard's per-shape chart.
        let memo = st.memo_for(&s.device, &s.mlx, &s.backend)?;
        let search = st.search_state(session_id)?.and_then(|v| serde_json::from_value::<SavedState>(v).ok()).map(|state| {
            json!({
                "seed": state.spec.seed, "model": state.spec.model, "generation": state.engine.generation,
                "archive_cells": state.engine.archive.len(), "screened": state.screened, "shape_items": state.shape_items,
                "elapsed_s": state.elapsed_s, "budget": state.spec.budget, "llm": state.llm,
                "workload": state.spec.workload, "workload_from": state.spec.workload_from,
                "warm_start": state.spec.warm_start,
                "screen_bias": state.calibration.bias(), "screen_bias_samples": state.calibration.pairs.len(),
            })
        });
        Ok(SessionShowResult { session: s, best, candidates, memo_size, memo, search })
    }
}
