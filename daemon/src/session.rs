//! Tuning sessions: one (device, model, mlx version, backend) searched by a tokio task that drives
//! the Python worker, records every step in the store, promotes proven winners and publishes events.
//!
//! # One step, and why a kill -9 loses nothing
//!
//! The task repeats: take the engine's next child → (screening) measure the shapes the memo lacks,
//! each committed as it arrives, and predict; a predicted loser is resolved `Screened` →
//! otherwise add (or find again, by content hash) the candidate row, mark it `measuring`, run the
//! worker's `evaluate`, and commit the measurement with all its samples in one transaction
//! (`Store::record_measurement`) → decide promotion → save the engine state.
//!
//! The engine state is saved after the measurement's transaction, not inside it. A kill between the
//! two leaves a committed measurement whose child the saved engine still has pending; on resume
//! that child comes back, `find_candidate` finds its row already `measured`, and the step is
//! completed from the stored measurement (promotion decided again, idempotently) instead of being
//! measured again. A candidate left `measuring` is re-run under the same row, never duplicated.
//!
//! # Budget
//!
//! `evaluations` counts the session's trials (measurements + failures, as the store counts them);
//! screening by the cost model is not a trial. `seconds` counts running time across restarts.

mod llm;
pub mod tune;

pub use llm::LlmSource;

use crate::events::{kind, EventBus};
use crate::evolve::cost::{Memo, ShapeTiming};
use crate::evolve::engine::{Engine, EngineConfig, Outcome};
use crate::evolve::promotion::{self, Evidence, Incumbent};
use crate::evolve::space::{FusionCandidate, SearchSpace, Shape, Workload};
use crate::policy::{Policy, Target};
use crate::store::{
    BestKey, Budget, CandidateId, CandidateStatus, Interval, MemoEntry, NewCandidate, NewMeasurement, NewSession,
    NewWorkerFailure, PolicySummary, Promotion, SessionId, SessionState, SharedStore, StoreError,
};
use crate::worker::{Supervisor, WorkerConfig, WorkerError};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// What `tuning.start` asks for. Every field is optional; see [`StartParams::defaults_for`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartParams {
    /// A model path, Hugging Face id found locally, or `synthetic:tiny` / `synthetic:qwen2.5-0.5b`.
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub dtype: Option<String>,
    #[serde(default)]
    pub budget: Option<Budget>,
    #[serde(default)]
    pub seed: Option<u64>,
    /// Measure exactly these policies (their `target` is replaced by the session's) instead of
    /// searching: the way to check a hand-written policy, and how the A/A test feeds its population.
    #[serde(default)]
    pub policies: Option<Vec<Value>>,
    /// Cost-model screening before end-to-end runs (default true; ignored with `policies`).
    #[serde(default)]
    pub screen: Option<bool>,
    /// Stock/candidate pairs per end-to-end evaluation (worker default 10).
    #[serde(default)]
    pub pairs: Option<u32>,
    #[serde(default)]
    pub warmup: Option<u32>,
    /// Pairs per shape microbenchmark.
    #[serde(default)]
    pub shape_pairs: Option<u32>,
    /// A candidate goes on to an end-to-end run only when its predicted speedup exceeds this (1.02)
    /// and its conservative prediction (every shape at the slow end of its interval) exceeds 1.0.
    #[serde(default)]
    pub screen_threshold: Option<f64>,
    /// Stop a first end-to-end evaluation early once it can no longer be promoted, and extend a
    /// promising one (default true; see `RACE_MIN_PAIRS`, `max_pairs`). Confirmations and
    /// re-measurements always run a number of pairs fixed before they start.
    #[serde(default)]
    pub race: Option<bool>,
    /// Most pairs a raced first evaluation may take per workload while its median is above 1.0 and
    /// its interval still reaches below (default 6 × `pairs`; `pairs` turns extension off).
    #[serde(default)]
    pub max_pairs: Option<u32>,
    #[serde(default)]
    pub workload: Option<Workload>,
    /// Per-request worker timeout for `evaluate` in seconds (default 600).
    #[serde(default)]
    pub evaluate_timeout_s: Option<u64>,
    /// Ask the configured LLM for candidates (needs `[llm]` in the config).
    #[serde(default)]
    pub llm: Option<bool>,
    /// Run now, ignoring the idle/power gate (an explicit `tilewise tune` in the foreground).
    #[serde(default)]
    pub now: Option<bool>,
}

/// The fully resolved settings of a session, stored with it so a resume runs the same session.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionSpec {
    pub model: String,
    pub dtype: Option<String>,
    pub seed: u64,
    pub budget: Budget,
    pub fixed: Option<Vec<Value>>,
    pub screen: bool,
    pub pairs: u32,
    pub warmup: u32,
    pub shape_pairs: u32,
    pub workload: Workload,
    pub evaluate_timeout_s: u64,
    pub llm: bool,
    /// Re-measure the incumbent after this many of the session's own measurements.
    pub remeasure_every: u64,
    /// A prediction must exceed this to earn an end-to-end run.
    pub screen_threshold: f64,
    /// Race first evaluations (stop losers early); sessions saved before this field existed did not.
    #[serde(default)]
    pub race: bool,
    /// Extend a raced first evaluation up to this many pairs per workload while it is promising but
    /// unresolved (0, as in sessions saved before this field existed: never).
    #[serde(default)]
    pub max_pairs: u32,
    pub engine: EngineConfig,
    /// Ignore the idle/power gate.
    #[serde(default)]
    pub now: bool,
}

/// Everything a session needs to continue after a restart (saved in `search_state`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SavedState {
    pub spec: SessionSpec,
    pub space: SearchSpace,
    pub engine: Engine,
    /// Index of the next policy of a fixed list.
    pub fixed_next: usize,
    pub screened: u64,
    pub shape_items: u64,
    pub elapsed_s: f64,
    #[serde(default)]
    pub llm: crate::llm::LlmStats,
    /// How much this session's screen predictions overstated end-to-end results (see `Calibration`).
    #[serde(default)]
    pub calibration: crate::evolve::cost::Calibration,
}

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("bad params: {0}")]
    BadParams(String),
    #[error("invalid policy: {0}")]
    InvalidPolicy(String),
    #[error("session {0} not found")]
    NotFound(SessionId),
    #[error("busy: session {0} is running; stop it first")]
    Busy(SessionId),
    #[error("worker: {0}")]
    Worker(#[from] WorkerError),
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
    pub gate: Option<watch::Receiver<crate::schedule::gates::Decision>>,
    /// Timeout for `load` (synthesizing a model the first time takes a while).
    pub load_timeout: Duration,
}

struct Running {
    session_id: SessionId,
    target: BestKey,
    stop: CancellationToken,
    done: watch::Receiver<bool>,
}

/// What the running session is doing now, for `status` (kept in memory: `status` must not block).
#[derive(Debug, Clone, Default)]
struct Now {
    paused: Option<String>,
    progress: Value,
    /// How the last session ended, for `status` while idle ("session 4 failed: ..."): the
    /// store may not have been able to take it (disk full, read-only), and a person asking why
    /// nothing is tuning should not need the log.
    last_end: Option<String>,
}

/// Owns the running session (at most one per daemon: the measurements must not share the machine).
#[derive(Clone)]
pub struct SessionManager {
    /// Serializes `start`: it loads a worker for seconds before the session is registered, and
    /// two overlapping starts (two clients, or the auto-starter and a person) would both launch.
    starting: Arc<tokio::sync::Mutex<()>>,
    opts: ManagerOptions,
    running: Arc<Mutex<Option<Running>>>,
    now: Arc<Mutex<Now>>,
    /// Set when the daemon stops: the session is left `paused` (resumed at the next start), not `stopped`.
    shutting_down: Arc<std::sync::atomic::AtomicBool>,
}

fn lock(store: &SharedStore) -> std::sync::MutexGuard<'_, crate::store::Store> {
    store.lock().unwrap_or_else(|p| p.into_inner())
}

impl StartParams {
    /// Fills every unset field for a machine with this backend.
    pub fn resolve(&self, backend: &str) -> Result<SessionSpec, SessionError> {
        let seed = self.seed.unwrap_or_else(|| {
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64 % 1_000_000_007).unwrap_or(1)
        });
        let budget = self.budget.unwrap_or(Budget { evaluations: Some(20), seconds: None });
        if budget.evaluations == Some(0) || budget.seconds == Some(0) {
            return Err(SessionError::BadParams("budget must be positive".into()));
        }
        let pairs = self.pairs.unwrap_or(10);
        if !(2..=1000).contains(&pairs) {
            return Err(SessionError::BadParams("pairs must be in 2..=1000".into()));
        }
        let max_pairs = self.max_pairs.unwrap_or(pairs.saturating_mul(6).min(1000));
        if !(pairs..=10_000).contains(&max_pairs) {
            return Err(SessionError::BadParams(format!("max_pairs must be in {pairs}..=10000 (at least pairs)")));
        }
        if let Some(list) = &self.policies {
            if list.is_empty() {
                return Err(SessionError::BadParams("policies: give at least one".into()));
            }
        }
        Ok(SessionSpec {
            model: self.model.clone().unwrap_or_else(|| default_model(backend).to_string()),
            dtype: self.dtype.clone(),
            seed,
            budget,
            fixed: self.policies.clone(),
            screen: self.screen.unwrap_or(true),
            pairs,
            warmup: self.warmup.unwrap_or(2),
            shape_pairs: self.shape_pairs.unwrap_or(10).max(2),
            workload: self.workload.clone().unwrap_or_else(|| Workload::default_for(backend)),
            evaluate_timeout_s: self.evaluate_timeout_s.unwrap_or(600),
            llm: self.llm.unwrap_or(false),
            remeasure_every: 5,
            // A predicted matmul-time gain under 2 % is within what the shape timings' noise
            // produces and would almost never be proven end to end (lower bound > 1.0).
            screen_threshold: self.screen_threshold.unwrap_or(1.02),
            race: self.race.unwrap_or(true),
            max_pairs,
            engine: EngineConfig::default(),
            now: self.now.unwrap_or(false),
        })
    }
}

/// The model a session tunes when none is named: the tiny synthetic one on CPU (a 0.5B model
/// generates about one token per second there), Qwen2.5-0.5B's architecture on a GPU.
pub fn default_model(backend: &str) -> &'static str {
    if backend == "cpu" {
        "synthetic:tiny"
    } else {
        "synthetic:qwen2.5-0.5b"
    }
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

fn str_field(v: &Value, k: &str) -> String {
    v.get(k).and_then(Value::as_str).unwrap_or("").to_string()
}

impl SessionManager {
    pub fn new(opts: ManagerOptions) -> SessionManager {
        SessionManager {
            opts,
            running: Arc::new(Mutex::new(None)),
            now: Arc::new(Mutex::new(Now::default())),
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
            let r = self.running.lock().unwrap();
            let running_model = r.as_ref().map(|r| r.target.model.clone()).unwrap_or_default();
            drop(r);
            let _ = running_model;
            return Err(SessionError::Busy(id));
        }
        if params.llm == Some(true) && self.opts.llm.current().is_none() {
            return Err(SessionError::BadParams(
                "llm: no LLM endpoint is configured: set [llm] endpoint and model in config.toml (docs/sessions.md)".into(),
            ));
        }
        let mut sup = Supervisor::new(self.opts.worker.clone());
        let ready = sup.worker().await?.ready().clone();
        let spec = params.resolve(&ready.backend)?;
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
        }
        let key = BestKey { device: target.device.clone(), model: target.model.clone(), mlx: target.mlx.clone(), backend: target.backend.clone() };
        let existing = lock(&self.opts.store).resumable_session(&key.device, &key.model, &key.mlx, &key.backend)?;
        // A fixed list is its own session: it never resumes a search (or vice versa).
        let resumable = existing.filter(|s| {
            let saved = lock(&self.opts.store).search_state(s.id).ok().flatten();
            let saved_fixed = saved.as_ref().and_then(|v| v.get("spec")).and_then(|s| s.get("fixed")).is_some_and(|f| !f.is_null());
            saved_fixed == spec.fixed.is_some()
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
                && (s.state == SessionState::Running || (s.state == SessionState::Paused && s.reason.as_deref().is_some_and(|r| r.starts_with("daemon stopped"))))
        }) else {
            return Ok(None);
        };
        let Some(saved) = lock(&self.opts.store).search_state(s.id)? else { return Ok(None) };
        let Ok(state) = serde_json::from_value::<SavedState>(saved) else { return Ok(None) };
        let p = StartParams { model: Some(state.spec.model.clone()), dtype: state.spec.dtype.clone(), policies: state.spec.fixed.clone(), ..Default::default() };
        let (id, _) = self.start(p).await?;
        Ok(Some(id))
    }

    fn fresh_state(&self, spec: SessionSpec, target: &Target, loaded: &Value) -> Result<SavedState, SessionError> {
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
        let engine = Engine::new(spec.seed, spec.engine.clone(), &space);
        Ok(SavedState { spec, space, engine, fixed_next: 0, screened: 0, shape_items: 0, elapsed_s: 0.0, llm: Default::default(), calibration: Default::default() })
    }

    fn launch(&self, session_id: SessionId, target: BestKey, state: SavedState, sup: Supervisor, resumed: bool) {
        let stop = CancellationToken::new();
        let (done_tx, done_rx) = watch::channel(false);
        *self.running.lock().unwrap() = Some(Running { session_id, target: target.clone(), stop: stop.clone(), done: done_rx });
        *self.now.lock().unwrap() = Now::default();
        let runner = Runner {
            opts: self.opts.clone(),
            session_id,
            key: target,
            state,
            sup,
            stop,
            memo: Memo::default(),
            now: self.now.clone(),
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
                Some(run) if session_id.is_none_or(|id| id == run.session_id) && !*run.done.borrow() => (run.stop.clone(), run.done.clone()),
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
        // Per-shape timings, stock vs each measured plan: the dashboard's per-shape chart (issue 7).
        let memo = st.memo_for(&s.device, &s.mlx, &s.backend)?;
        let search = st.search_state(session_id)?.and_then(|v| serde_json::from_value::<SavedState>(v).ok()).map(|state| {
            json!({
                "seed": state.spec.seed, "model": state.spec.model, "generation": state.engine.generation,
                "archive_cells": state.engine.archive.len(), "screened": state.screened, "shape_items": state.shape_items,
                "elapsed_s": state.elapsed_s, "budget": state.spec.budget, "llm": state.llm,
                "screen_bias": state.calibration.bias(), "screen_bias_samples": state.calibration.pairs.len(),
            })
        });
        Ok(json!({"session": s, "best": best, "candidates": candidates, "memo_size": memo_size, "memo": memo, "search": search}))
    }
}

/// Replaces a given policy's target by the session's and validates it for the machine.
fn retarget(doc: &Value, target: &Target) -> Result<Policy, String> {
    let mut v = doc.clone();
    if !v.is_object() {
        return Err("not an object".into());
    }
    v["target"] = serde_json::to_value(target).expect("target serializes");
    let p = Policy::from_value(&v).map_err(|e| e.to_string())?;
    p.validate_for_backend(&target.backend).map_err(|e| e.to_string())?;
    Ok(p)
}

/// Pairs a raced first evaluation takes before it may stop (fewer give no useful interval: with 3
/// pairs the bootstrap upper bound is the largest pair ratio, so every pair must have lost).
pub const RACE_MIN_PAIRS: u32 = 3;

/// The most pairs any workload of a stored measurement took.
fn pairs_taken(detail: &Value) -> u64 {
    ["/inference/n_pairs", "/training/n_pairs"].iter().filter_map(|p| detail.pointer(p).and_then(Value::as_u64)).max().unwrap_or(0)
}

/// Whether a stored measurement's detail says the worker's race stopped it before all its pairs.
fn stopped_early(detail: &Value) -> bool {
    detail.pointer("/race/stopped_early").and_then(Value::as_bool).unwrap_or(false)
}

/// The session task.
struct Runner {
    opts: ManagerOptions,
    session_id: SessionId,
    key: BestKey,
    state: SavedState,
    sup: Supervisor,
    stop: CancellationToken,
    memo: Memo,
    now: Arc<Mutex<Now>>,
    shutting_down: Arc<std::sync::atomic::AtomicBool>,
    /// An LLM request on its way (never waited for; dropped = abandoned).
    llm_reply: Option<crate::llm::PendingReply>,
}

/// Why the loop ended.
enum End {
    Finished(String),
    Stopped,
    Failed(String),
}

impl Runner {
    fn store(&self) -> std::sync::MutexGuard<'_, crate::store::Store> {
        lock(&self.opts.store)
    }

    fn publish(&self, k: &str, data: Value) {
        if let Err(e) = self.opts.events.publish(k, Some(self.session_id), data) {
            tracing::warn!("event {k} not stored: {e}");
        }
    }

    /// The gate this session obeys (none when it runs `now`).
    fn gate(&self) -> Option<watch::Receiver<crate::schedule::gates::Decision>> {
        if self.state.spec.now {
            None
        } else {
            self.opts.gate.clone()
        }
    }

    fn save(&self) -> Result<(), StoreError> {
        self.now.lock().unwrap().progress = json!({
            "generation": self.state.engine.generation, "screened": self.state.screened,
            "shape_items": self.state.shape_items, "elapsed_s": self.state.elapsed_s,
            "budget": self.state.spec.budget, "model": self.state.spec.model, "seed": self.state.spec.seed,
        });
        self.store().save_search_state(self.session_id, &serde_json::to_value(&self.state).expect("state serializes"))
    }

    async fn run(mut self, resumed: bool) {
        let _ = self.store().set_session_state(self.session_id, SessionState::Running, None);
        self.publish(
            if resumed { kind::SESSION_RESUMED } else { kind::SESSION_STARTED },
            json!({"model": self.state.spec.model, "seed": self.state.spec.seed, "budget": self.state.spec.budget,
                   "target": self.key, "resumed": resumed}),
        );
        let end = match self.run_loop().await {
            Ok(end) => end,
            Err(e) => End::Failed(e.to_string()),
        };
        self.abandon_llm_request();
        let _ = self.save();
        let (state, reason) = match &end {
            End::Finished(r) => (SessionState::Finished, r.clone()),
            End::Stopped if self.shutting_down.load(std::sync::atomic::Ordering::SeqCst) => {
                (SessionState::Paused, "daemon stopped; resumes when it starts again".to_string())
            }
            End::Stopped => (SessionState::Stopped, "stopped".to_string()),
            End::Failed(r) => (SessionState::Failed, r.clone()),
        };
        let stored = self.store().set_session_state(self.session_id, state, Some(&reason));
        self.now.lock().unwrap().last_end = Some(match &stored {
            Ok(()) => format!("session {} {}: {reason}", self.session_id, state.as_str()),
            Err(e) => format!("session {} {}: {reason} (the database could not record it: {e}; it resumes when the daemon restarts)", self.session_id, state.as_str()),
        });
        let summary = self.store().session(self.session_id).ok().flatten();
        let best = self.store().best(&self.key).ok().flatten();
        self.publish(
            kind::SESSION_FINISHED,
            json!({"state": state.as_str(), "reason": reason, "session": summary,
                   "best": best.map(|b| json!({"hash": b.hash, "ratio": b.ratio, "lo": b.lo, "hi": b.hi, "session_id": b.session_id}))}),
        );
        self.sup.shutdown().await;
    }

    async fn run_loop(&mut self) -> Result<End, SessionError> {
        self.memo = self.load_memo()?;
        let mut last_tick = Instant::now();
        loop {
            self.state.elapsed_s += last_tick.elapsed().as_secs_f64();
            last_tick = Instant::now();
            if self.stop.is_cancelled() {
                return Ok(End::Stopped);
            }
            self.wait_for_gate().await;
            if self.stop.is_cancelled() {
                return Ok(End::Stopped);
            }
            let s = self.store().session(self.session_id)?.ok_or(SessionError::NotFound(self.session_id))?;
            let trials = (s.evaluations + s.failures) as u64;
            let budget = self.state.spec.budget;
            if budget.evaluations.is_some_and(|b| trials >= b) {
                return Ok(End::Finished(format!("budget of {} evaluations spent", budget.evaluations.unwrap())));
            }
            if budget.seconds.is_some_and(|b| self.state.elapsed_s >= b as f64) {
                return Ok(End::Finished(format!("budget of {} s spent", budget.seconds.unwrap())));
            }
            if self.state.spec.fixed.is_none() && self.remeasure_due(s.evaluations as u64)? {
                self.remeasure_incumbent().await?;
                self.save()?;
                continue;
            }
            if self.state.spec.fixed.is_some() {
                if !self.fixed_step().await? {
                    return Ok(End::Finished("every given policy measured".into()));
                }
            } else if !self.search_step().await? {
                return Ok(End::Finished("search exhausted: no new candidate in 5 generations".into()));
            }
            self.save()?;
        }
    }

    /// Holds between steps while the idle/power gate says no.
    async fn wait_for_gate(&mut self) {
        if self.state.spec.now {
            return;
        }
        let Some(mut gate) = self.opts.gate.clone() else { return };
        if gate.borrow().run {
            return;
        }
        let reason = gate.borrow().summary();
        self.abandon_llm_request();
        self.now.lock().unwrap().paused = Some(reason.clone());
        let _ = self.store().set_session_state(self.session_id, SessionState::Paused, Some(&reason));
        self.publish(kind::SESSION_PAUSED, json!({"reason": reason}));
        tokio::select! {
            _ = gate.wait_for(|d| d.run) => {}
            _ = self.stop.cancelled() => return,
        }
        self.now.lock().unwrap().paused = None;
        let _ = self.store().set_session_state(self.session_id, SessionState::Running, None);
        self.publish(kind::SESSION_RESUMED, json!({"reason": gate.borrow().summary()}));
    }

    fn load_memo(&self) -> Result<Memo, SessionError> {
        let t = &self.state.space.target;
        let dtype = self.sup.loaded().map(|l| str_field(l, "dtype")).unwrap_or_default();
        let mut memo = Memo::default();
        for e in self.store().memo_for(&t.device, &t.mlx, &t.backend)? {
            if e.dtype == dtype && e.plan_hash.starts_with("sha256:") {
                memo.insert(e.m, e.n, e.k, e.plan_hash.clone(), ShapeTiming { stock_median_s: e.stock_median_s, ratio: e.ratio, lo: e.lo });
            }
        }
        Ok(memo)
    }

    /// One child of a fixed list. False when the list is done.
    async fn fixed_step(&mut self) -> Result<bool, SessionError> {
        let list = self.state.spec.fixed.clone().unwrap_or_default();
        let Some(doc) = list.get(self.state.fixed_next) else { return Ok(false) };
        let policy = retarget(doc, &self.state.space.target).map_err(SessionError::InvalidPolicy)?;
        let origin = "given".to_string();
        // None: stopped or paused mid-measurement; the same policy is measured again on resume.
        if self.measure_candidate(&policy, 0, 0, &origin, vec![]).await?.is_some() {
            self.state.fixed_next += 1;
        }
        Ok(true)
    }

    /// One child of the search. False when the engine has nothing new left.
    async fn search_step(&mut self) -> Result<bool, SessionError> {
        self.poll_llm();
        let space = self.state.space.clone();
        let Some((index, child)) = self.state.engine.next_child(&space) else { return Ok(false) };
        let hash = child.policy.content_hash();
        let existing = self.store().find_candidate(self.session_id, &hash)?;
        let mut predicted = None;
        if existing.is_none() && self.state.spec.screen {
            match self.screen(&child.policy).await? {
                Screen::Predicted(raw) => {
                    let threshold = self.state.spec.screen_threshold;
                    let p = self.state.calibration.apply(raw);
                    // Held back by the learned correction alone: now and then measured anyway
                    // (see `Calibration::EXPLORE_EVERY`).
                    let explore = !p.earns_evaluation(threshold) && raw.earns_evaluation(threshold) && self.state.calibration.explore();
                    if !p.earns_evaluation(threshold) && !explore {
                        self.state.screened += 1;
                        if child.origin == "llm" {
                            self.state.llm.screened += 1;
                        }
                        self.state.engine.resolve(index, Outcome::Screened { predicted: p.combined });
                        return Ok(true);
                    }
                    predicted = Some(raw.combined);
                }
                Screen::Failed(reason) => {
                    // A plan that kills the worker in a microbenchmark is recorded as a failed candidate.
                    let id = self.add_candidate(&child.policy, child.island, child.generation, &child.origin, &child.parents)?;
                    self.fail(id, &reason)?;
                    self.state.engine.resolve(index, Outcome::Failed { reason });
                    return Ok(true);
                }
                Screen::Stopped => return Ok(true),
            }
        }
        let parents = child.parents.clone();
        // None: stopped mid-measurement, the child stays pending.
        if let Some(outcome) = self.measure_candidate(&child.policy, child.island, child.generation, &child.origin, parents).await? {
            // Teach the screen how far its raw prediction was from what was measured.
            if let (Some(pred), Outcome::Measured { correct: true, ratio: Some(r), .. }) = (predicted, &outcome) {
                self.state.calibration.record(pred, *r);
            }
            self.state.engine.resolve(index, outcome)
        }
        Ok(true)
    }

    fn add_candidate(&self, p: &Policy, island: usize, generation: u64, origin: &str, parents: &[String]) -> Result<CandidateId, SessionError> {
        let st = self.store();
        let parent_ids: Vec<CandidateId> =
            parents.iter().filter_map(|h| st.find_candidate(self.session_id, h).ok().flatten().map(|c| c.id)).collect();
        Ok(st.add_candidate(&NewCandidate {
            session_id: self.session_id,
            policy: p.to_value(),
            hash: p.content_hash(),
            parents: parent_ids,
            island: island as i64,
            generation: generation as i64,
            origin: origin.to_string(),
        })?)
    }

    fn fail(&self, candidate: CandidateId, reason: &str) -> Result<(), SessionError> {
        self.store().mark_candidate_failed(candidate, reason)?;
        self.publish(kind::CANDIDATE_FAILED, json!({"candidate_id": candidate, "reason": reason}));
        Ok(())
    }

    /// Measures (or, after a crash, completes) one candidate end to end. `None` when stopped.
    async fn measure_candidate(
        &mut self,
        policy: &Policy,
        island: usize,
        generation: u64,
        origin: &str,
        parents: Vec<String>,
    ) -> Result<Option<Outcome>, SessionError> {
        let hash = policy.content_hash();
        let existing = self.store().find_candidate(self.session_id, &hash)?;
        let id = match existing {
            Some(c) if c.status == CandidateStatus::Measured => {
                // Committed before a crash: finish the step from the stored measurement.
                if !self.store().measurements(c.id)?.is_empty() {
                    return self.prove(c.id, policy).await;
                }
                c.id
            }
            Some(c) if c.status == CandidateStatus::Failed => {
                return Ok(Some(Outcome::Failed { reason: c.failure_reason.unwrap_or_default() }));
            }
            Some(c) => c.id,
            None => self.add_candidate(policy, island, generation, origin, &parents)?,
        };
        match self.evaluate(id, policy, origin, generation).await? {
            Evaluated::Done => self.prove(id, policy).await,
            Evaluated::Stopped => Ok(None),
            Evaluated::Failed(reason) => Ok(Some(Outcome::Failed { reason })),
        }
    }

    /// The worker's `evaluate` request for `policy`: this session's workload, pairs and warm-up.
    fn evaluate_request(&self, policy: &Policy) -> Value {
        let spec = &self.state.spec;
        let mut req = spec.workload.request_fields();
        req["policy"] = policy.to_value();
        req["pairs"] = json!(spec.pairs);
        req["warmup"] = json!(spec.warmup);
        req
    }

    /// The worker's seed for measurement `attempt` of candidate row `id`: fixed by the session's
    /// seed (a resumed session repeats it), different for every row and attempt.
    fn measurement_seed(&self, id: CandidateId, attempt: u64) -> u64 {
        (self.state.spec.seed.wrapping_add(id as u64 * 7919 + attempt)) % (1 << 31)
    }

    /// One end-to-end evaluation of candidate `id`, committed as a measurement with all its samples.
    async fn evaluate(&mut self, id: CandidateId, policy: &Policy, origin: &str, generation: u64) -> Result<Evaluated, SessionError> {
        self.store().set_candidate_status(id, CandidateStatus::Measuring)?;
        let mut req = self.evaluate_request(policy);
        let spec = &self.state.spec;
        let attempt = self.store().measurements(id)?.len() as u64;
        req["seed"] = json!(self.measurement_seed(id, attempt));
        // Only a candidate's first measurement races (and may be extended): a confirmation
        // (attempt ≥ 1) is what a promotion rests on; it runs as many pairs as the first one took,
        // a number fixed before it starts.
        if spec.race && attempt == 0 && origin != "confirmation" {
            req["race"] = json!({"bar": 1.0, "min_pairs": RACE_MIN_PAIRS.min(spec.pairs)});
            if spec.max_pairs > spec.pairs {
                req["race"]["max_pairs"] = json!(spec.max_pairs);
            }
        }
        if attempt >= 1 {
            let first = self.store().measurements(id)?.into_iter().next();
            let taken = first.map_or(0, |m| pairs_taken(&m.detail));
            req["pairs"] = json!(taken.max(spec.pairs as u64));
        }
        let timeout = Duration::from_secs(spec.evaluate_timeout_s);
        // Cancelled by a stop or by the idle gate closing; a result taken while the person came
        // back is discarded (the candidate goes back to pending and is measured again later).
        let pause = crate::schedule::PauseToken::new(&self.stop, self.gate());
        let stop = pause.token();
        let hash = policy.content_hash();
        match self.sup.request("evaluate", req, timeout, Some(&stop), |_| {}).await {
            Ok(_) | Err(WorkerError::Cancelled) if stop.is_cancelled() => {
                self.store().set_candidate_status(id, CandidateStatus::Pending)?;
                Ok(Evaluated::Stopped)
            }
            Ok(result) => {
                let m = NewMeasurement::from_worker_result(id, &result)?;
                let measurement_id = self.store().record_measurement(&m)?;
                self.publish(
                    kind::CANDIDATE_MEASURED,
                    json!({"candidate_id": id, "measurement_id": measurement_id, "hash": hash, "origin": origin,
                           "generation": generation, "attempt": attempt, "correct": m.correct, "ratio": m.ratio,
                           "lo": m.lo, "hi": m.hi, "gate_reason": m.gate.get("reason")}),
                );
                Ok(Evaluated::Done)
            }
            Err(e) => {
                let reason = e.to_string();
                self.record_worker_failure(Some(id), &e);
                self.fail(id, &reason)?;
                Ok(Evaluated::Failed(reason))
            }
        }
    }

    /// Decides promotion from a candidate's stored measurements. A first measurement that passes
    /// (correct, lower bound > 1.0, beats the incumbent) is confirmed by a second, independent one
    /// before anything is promoted: one lucky run among many candidates is the common way to promote
    /// noise, and the confirmation is also the unbiased estimate (the first was selected for being
    /// high), so it is the one recorded as the best's ratio. Idempotent: after a crash it picks up
    /// from whatever measurements were committed.
    async fn prove(&mut self, id: CandidateId, policy: &Policy) -> Result<Option<Outcome>, SessionError> {
        let hash = policy.content_hash();
        loop {
            let ms = self.store().measurements(id)?;
            let Some(last) = ms.last().cloned() else { return Ok(None) };
            let outcome = Outcome::Measured { correct: last.correct, ratio: last.ratio, lo: last.lo, hi: last.hi };
            let ev = |m: &crate::store::Measurement| Evidence { hash: hash.clone(), correct: m.correct, ratio: m.ratio, lo: m.lo, hi: m.hi };
            let inc = self.incumbent()?.map(|(i, _)| i);
            // A raced measurement that stopped early is a measured loser, never grounds to promote
            // (its stop needed an upper bound under 1.0; this holds even if later pairs disagreed).
            if stopped_early(&last.detail) {
                return Ok(Some(outcome));
            }
            let promotion::Decision::Promote { reason } = promotion::decide(&ev(&last), inc.as_ref()) else {
                return Ok(Some(outcome));
            };
            if ms.len() == 1 {
                // Passed once: measure again before believing it.
                match self.evaluate(id, policy, "confirmation", self.state.engine.generation).await? {
                    Evaluated::Done => continue,
                    Evaluated::Stopped => return Ok(None),
                    Evaluated::Failed(reason) => return Ok(Some(Outcome::Failed { reason })),
                }
            }
            let first = &ms[ms.len() - 2];
            if !promotion::decide(&ev(first), inc.as_ref()).is_promote() {
                return Ok(Some(outcome));
            }
            let (Some(ratio), Some(lo), Some(hi)) = (last.ratio, last.lo, last.hi) else { return Ok(Some(outcome)) };
            if self.store().best(&self.key)?.is_some_and(|b| b.hash == hash) {
                return Ok(Some(outcome)); // already promoted (resumed after the promote committed)
            }
            let summary = self.summarize(policy, &last.detail);
            self.store().promote(&Promotion {
                key: self.key.clone(),
                policy: policy.to_value(),
                hash: hash.clone(),
                ratio,
                lo,
                hi,
                session_id: Some(self.session_id),
                candidate_id: Some(id),
                summary: Some(summary.clone()),
            })?;
            let evidence: Vec<Value> = ms[ms.len() - 2..]
                .iter()
                .map(|m| json!({"measurement_id": m.id, "at": m.at, "ratio": m.ratio, "lo": m.lo, "hi": m.hi,
                                "n_pairs": m.detail.pointer("/inference/n_pairs"), "gate": m.gate}))
                .collect();
            self.publish(
                kind::POLICY_PROMOTED,
                json!({"candidate_id": id, "hash": hash, "ratio": ratio, "lo": lo, "hi": hi, "reason": reason,
                       "replaced": inc, "target": self.key, "evidence": evidence, "summary": summary}),
            );
            return Ok(Some(outcome));
        }
    }

    /// A promoted policy in words (what it changes) and per workload (the promoting measurement).
    fn summarize(&self, policy: &Policy, detail: &Value) -> PolicySummary {
        let (text, fused, calls) = self.state.space.describe(policy);
        let interval = |v: Option<&Value>| -> Option<Interval> {
            let v = v?;
            let num = |k: &str| v.get(k).and_then(Value::as_f64);
            Some(Interval { ratio: num("ratio")?, lo: num("lo")?, hi: num("hi")? })
        };
        let mut workloads = std::collections::BTreeMap::new();
        for (name, pointer) in
            [("inference", "/inference"), ("training", "/training"), ("decode", "/inference/decode"), ("prefill", "/inference/prefill")]
        {
            if let Some(i) = interval(detail.pointer(pointer)) {
                workloads.insert(name.to_string(), i);
            }
        }
        PolicySummary {
            text,
            fused,
            matmuls_per_token: Some(calls),
            rules: policy.matmul.rules.len(),
            workloads,
        }
    }

    fn record_worker_failure(&self, candidate: Option<CandidateId>, e: &WorkerError) {
        if !e.is_fatal() && !matches!(e, WorkerError::Remote { .. }) {
            return;
        }
        let stderr_tail = match e {
            WorkerError::Timeout { stderr_tail, .. }
            | WorkerError::Crashed { stderr_tail, .. }
            | WorkerError::OutOfMemory { stderr_tail, .. }
            | WorkerError::Garbage { stderr_tail, .. }
            | WorkerError::NotReady { stderr_tail, .. } => Some(stderr_tail.clone()),
            _ => None,
        };
        let f = NewWorkerFailure {
            session_id: Some(self.session_id),
            candidate_id: candidate,
            kind: e.kind().to_string(),
            message: e.to_string(),
            exit_code: None,
            stderr_tail,
        };
        if let Err(err) = self.store().record_worker_failure(&f) {
            tracing::warn!("worker failure not stored: {err}");
        }
        if e.is_fatal() {
            self.publish(kind::WORKER_FAILED, json!({"candidate_id": candidate, "kind": e.kind(), "reason": e.to_string()}));
        }
    }

    /// The incumbent for this target: the stored best, with its ratio replaced by its latest
    /// re-measurement in this session when there is one.
    fn incumbent(&self) -> Result<Option<(Incumbent, Policy)>, SessionError> {
        let st = self.store();
        let Some(best) = st.best(&self.key)? else { return Ok(None) };
        let mut ratio = best.ratio;
        if let Some(row) = st.candidates(self.session_id, None)?.into_iter().find(|c| c.origin == "incumbent" && c.hash == best.hash) {
            if let Some(m) = st.measurements(row.id)?.pop() {
                ratio = if m.correct { m.ratio.unwrap_or(0.0) } else { 0.0 };
            }
        }
        let policy = Policy::from_value(&best.policy).map_err(|e| SessionError::InvalidPolicy(e.to_string()))?;
        Ok(Some((Incumbent { hash: best.hash, ratio }, policy)))
    }

    /// Due when this session made `remeasure_every` measurements of its own per re-measurement so far.
    fn remeasure_due(&self, evaluations: u64) -> Result<bool, SessionError> {
        let Some((inc, _)) = self.incumbent()? else { return Ok(false) };
        let st = self.store();
        let rows: Vec<_> = st.candidates(self.session_id, None)?.into_iter().filter(|c| c.origin == "incumbent" && c.hash == inc.hash).collect();
        let mut done = 0u64;
        for r in &rows {
            done += st.measurements(r.id)?.len() as u64;
        }
        let own = evaluations.saturating_sub(done);
        Ok(own >= (done + 1) * self.state.spec.remeasure_every)
    }

    /// Measures the incumbent again (as a candidate row with origin `incumbent`).
    async fn remeasure_incumbent(&mut self) -> Result<(), SessionError> {
        let Some((inc, policy)) = self.incumbent()? else { return Ok(()) };
        let row = self.store().candidates(self.session_id, None)?.into_iter().find(|c| c.origin == "incumbent" && c.hash == inc.hash);
        let id = match row {
            Some(r) => r.id,
            None => self.add_candidate(&policy, 0, self.state.engine.generation, "incumbent", &[])?,
        };
        self.store().set_candidate_status(id, CandidateStatus::Measuring)?;
        let mut req = self.evaluate_request(&policy);
        // Each re-measurement orders its pairs differently, as a candidate's attempts do.
        req["seed"] = json!(self.measurement_seed(id, self.store().measurements(id)?.len() as u64));
        let spec = &self.state.spec;
        let pause = crate::schedule::PauseToken::new(&self.stop, self.gate());
        let stop = pause.token();
        match self.sup.request("evaluate", req, Duration::from_secs(spec.evaluate_timeout_s), Some(&stop), |_| {}).await {
            Ok(_) | Err(WorkerError::Cancelled) if stop.is_cancelled() => {
                self.store().set_candidate_status(id, CandidateStatus::Pending)?;
            }
            Ok(result) => {
                let m = NewMeasurement::from_worker_result(id, &result)?;
                self.store().record_measurement(&m)?;
                self.publish(
                    kind::CANDIDATE_MEASURED,
                    json!({"candidate_id": id, "hash": inc.hash, "origin": "incumbent", "correct": m.correct,
                           "ratio": m.ratio, "lo": m.lo, "hi": m.hi, "previous_ratio": inc.ratio}),
                );
            }
            Err(e) => {
                self.record_worker_failure(Some(id), &e);
                // The incumbent row must stay usable for the next re-measurement: count the failure
                // on the session but leave the row measured/pending.
                self.store().set_candidate_status(id, CandidateStatus::Pending)?;
                self.publish(kind::CANDIDATE_FAILED, json!({"candidate_id": id, "origin": "incumbent", "reason": e.to_string()}));
                return Err(SessionError::Worker(e));
            }
        }
        Ok(())
    }

    /// Measures the memo entries `p` lacks (committing each), then predicts.
    async fn screen(&mut self, p: &Policy) -> Result<Screen, SessionError> {
        let space = self.state.space.clone();
        let dtype = self.sup.loaded().map(|l| str_field(l, "dtype")).unwrap_or_else(|| "float32".into());
        loop {
            if let Some(pred) = self.memo.predict(&space, p) {
                return Ok(Screen::Predicted(pred));
            }
            let needed = self.memo.needed(&space, p);
            // Small batches: each batch's results are committed before the next is asked for.
            let batch: Vec<_> = needed.into_iter().take(8).collect();
            let items: Vec<Value> =
                batch.iter().map(|n| json!({"m": n.m, "n": n.n, "k": n.k, "dtype": dtype, "plan": n.plan})).collect();
            let req = json!({"items": items, "pairs": self.state.spec.shape_pairs, "warmup": 1});
            let pause = crate::schedule::PauseToken::new(&self.stop, self.gate());
            let stop = pause.token();
            let r = self.sup.request("shapes", req, Duration::from_secs(self.state.spec.evaluate_timeout_s), Some(&stop), |_| {}).await;
            let result = match r {
                Ok(_) | Err(WorkerError::Cancelled) if stop.is_cancelled() => return Ok(Screen::Stopped),
                Ok(v) => v,
                Err(e) => {
                    self.record_worker_failure(None, &e);
                    return Ok(Screen::Failed(format!("shape microbenchmark: {e}")));
                }
            };
            let t = &space.target;
            let got = result.get("items").and_then(Value::as_array).cloned().unwrap_or_default();
            if got.len() != batch.len() {
                return Ok(Screen::Failed(format!("shape microbenchmark returned {} items for {}", got.len(), batch.len())));
            }
            for (n, item) in batch.iter().zip(got) {
                let num = |k: &str| item.get(k).and_then(Value::as_f64);
                let correct = item.get("correct").and_then(Value::as_bool).unwrap_or(false);
                // An incorrect or failing plan is memoized as infinitely slow (ratio 0), so no
                // policy using it is ever predicted to win.
                let ratio = if correct { num("ratio").unwrap_or(0.0) } else { 0.0 };
                let stock = num("native_median_s").unwrap_or(0.0);
                let entry = MemoEntry {
                    device: t.device.clone(),
                    mlx: t.mlx.clone(),
                    backend: t.backend.clone(),
                    m: n.m,
                    n: n.n,
                    k: n.k,
                    dtype: dtype.clone(),
                    plan_hash: n.plan_hash(),
                    plan: serde_json::to_value(&n.plan).expect("plan serializes"),
                    stock_median_s: stock,
                    plan_median_s: num("plan_median_s").unwrap_or(f64::INFINITY).min(1e9),
                    ratio,
                    lo: num("lo"),
                    hi: num("hi"),
                    samples: item.get("plan_s").and_then(Value::as_array).map_or(0, |a| a.len() as u32),
                    updated_at: String::new(),
                };
                self.store().upsert_memo(&entry)?;
                let lo = if correct { num("lo") } else { Some(0.0) };
                self.memo.insert(n.m, n.n, n.k, n.plan_hash(), ShapeTiming { stock_median_s: stock, ratio, lo });
                self.state.shape_items += 1;
            }
            // Persist progress counters with the committed memo rows.
            self.save()?;
        }
    }

}

enum Evaluated {
    Done,
    Stopped,
    Failed(String),
}

enum Screen {
    Predicted(crate::evolve::cost::Prediction),
    Failed(String),
    Stopped,
}

// ---------------------------------------------------------------------------------------------
// The daemon seam: `tilewised` plugs the manager in as its `TuningService` (see `ipc` module docs).

use crate::ipc::protocol::{
    codes, RpcError, SessionListResult, SessionShowParams, SessionShowResult, TuningStartParams, TuningStartResult,
    TuningStatus, TuningStopParams, TuningStopResult,
};
use crate::ipc::{BoxFuture, TuningService};

impl SessionManager {
    /// A manager wired to a daemon: its store, event bus, probed device and config (Python
    /// interpreter, worker timeouts, LLM endpoint).
    pub fn from_state(state: &crate::ipc::server::DaemonState) -> SessionManager {
        let config = state.config.read().unwrap_or_else(|p| p.into_inner()).clone();
        let mut worker = WorkerConfig::new(config.python_path());
        worker.ready_timeout = Duration::from_secs(config.worker.start_timeout_s.max(1));
        let chip = state.device.chip.clone().unwrap_or_else(|| format!("{} cpu", state.device.arch));
        SessionManager::new(ManagerOptions {
            store: state.store.clone(),
            events: state.events.clone(),
            worker,
            device: DeviceInfo { fingerprint: state.device_fingerprint.clone(), chip },
            llm: LlmSource::Live(state.config.clone()),
            gate: None,
            load_timeout: Duration::from_secs(config.worker.request_timeout_s.max(60)),
        })
    }

    /// Pauses sessions while the scheduler's gate is closed.
    pub fn with_gate(mut self, gate: watch::Receiver<crate::schedule::gates::Decision>) -> SessionManager {
        self.opts.gate = Some(gate);
        self
    }

    fn show_typed(&self, session_id: SessionId) -> Result<SessionShowResult, SessionError> {
        let mut v = self.show(session_id)?;
        let session = serde_json::from_value(v["session"].take()).map_err(StoreError::from)?;
        Ok(SessionShowResult {
            session,
            best: serde_json::from_value(v["best"].take()).map_err(StoreError::from)?,
            candidates: serde_json::from_value(v["candidates"].take()).map_err(StoreError::from)?,
            memo_size: v["memo_size"].as_u64().unwrap_or(0),
            memo: serde_json::from_value(v["memo"].take()).map_err(StoreError::from)?,
            search: Some(v["search"].take()).filter(|s| !s.is_null()),
        })
    }
}

impl From<SessionError> for RpcError {
    fn from(e: SessionError) -> RpcError {
        let code = match &e {
            SessionError::BadParams(_) => codes::INVALID_PARAMS,
            SessionError::InvalidPolicy(_) => codes::INVALID_POLICY,
            SessionError::NotFound(_) => codes::NOT_FOUND,
            SessionError::Busy(_) => codes::BUSY,
            SessionError::Worker(_) | SessionError::Store(_) => codes::INTERNAL,
        };
        RpcError::new(code, e.to_string())
    }
}

impl TuningService for SessionManager {
    fn status(&self) -> TuningStatus {
        let now = self.now.lock().unwrap().clone();
        match self.current() {
            Some(id) => TuningStatus {
                state: if now.paused.is_some() { "paused" } else { "tuning" }.into(),
                reason: now.paused,
                session_id: Some(id),
                detail: Some(now.progress),
            },
            None => TuningStatus { state: "idle".into(), reason: now.last_end, session_id: None, detail: None },
        }
    }

    fn start(&self, params: TuningStartParams) -> BoxFuture<'_, Result<TuningStartResult, RpcError>> {
        Box::pin(async move {
            let value = serde_json::to_value(&params).map_err(|e| RpcError::new(codes::INVALID_PARAMS, e.to_string()))?;
            let p: StartParams = serde_json::from_value(value).map_err(|e| RpcError::new(codes::INVALID_PARAMS, format!("tuning.start: {e}")))?;
            let (session_id, resumed) = SessionManager::start(self, p).await?;
            Ok(TuningStartResult { session_id, resumed })
        })
    }

    fn stop(&self, params: TuningStopParams) -> BoxFuture<'_, Result<TuningStopResult, RpcError>> {
        Box::pin(async move { Ok(TuningStopResult { stopped: SessionManager::stop(self, params.session_id).await }) })
    }

    fn list_sessions(&self) -> BoxFuture<'_, Result<SessionListResult, RpcError>> {
        Box::pin(async move {
            let sessions = lock(&self.opts.store).list_sessions(100).map_err(SessionError::from)?;
            Ok(SessionListResult { sessions })
        })
    }

    fn show_session(&self, params: SessionShowParams) -> BoxFuture<'_, Result<SessionShowResult, RpcError>> {
        Box::pin(async move { Ok(self.show_typed(params.session_id)?) })
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            self.shutting_down.store(true, std::sync::atomic::Ordering::SeqCst);
            SessionManager::stop(self, None).await;
        })
    }
}
