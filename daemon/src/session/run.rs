//! The session task: the step loop, the idle gate, fixed lists, search steps and the saved state.
//! Measuring and promotion are in `measure.rs`, screening in `screen.rs`, the LLM in `llm.rs`.

use super::manager::{lock, LiveProgress, ManagerOptions};
use super::measure::Remeasure;
use super::screen::Screen;
use super::settings::SessionSpec;
use super::SessionError;
use crate::events::kind;
use crate::evolve::cost::{Calibration, Memo};
use crate::evolve::engine::{Engine, Outcome};
use crate::evolve::space::SearchSpace;
use crate::gate::{Decision, PauseToken};
use crate::policy::{Policy, Target};
use crate::store::{BestKey, CandidateId, ImportState, NewCandidate, SessionId, SessionState, StoreError};
use crate::worker::{Supervisor, WorkerError};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

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
    pub calibration: Calibration,
}

/// Replaces a given policy's target by the session's and validates it for the machine.
pub(super) fn retarget(doc: &Value, target: &Target) -> Result<Policy, String> {
    let mut v = doc.clone();
    if !v.is_object() {
        return Err("not an object".into());
    }
    v["target"] = serde_json::to_value(target).expect("target serializes");
    let p = Policy::from_value(&v).map_err(|e| e.to_string())?;
    p.validate_for_backend(&target.backend).map_err(|e| e.to_string())?;
    Ok(p)
}

/// The most pairs any workload of a stored measurement took.
pub(super) fn pairs_taken(detail: &Value) -> u64 {
    ["/inference/n_pairs", "/training/n_pairs"].iter().filter_map(|p| detail.pointer(p).and_then(Value::as_u64)).max().unwrap_or(0)
}

/// Whether a stored measurement's detail says the worker's race stopped it before all its pairs.
pub(super) fn stopped_early(detail: &Value) -> bool {
    detail.pointer("/race/stopped_early").and_then(Value::as_bool).unwrap_or(false)
}

/// The session task.
pub(super) struct Runner {
    pub(super) opts: ManagerOptions,
    pub(super) session_id: SessionId,
    pub(super) key: BestKey,
    pub(super) state: SavedState,
    pub(super) sup: Supervisor,
    pub(super) stop: CancellationToken,
    pub(super) memo: Memo,
    pub(super) live: Arc<Mutex<LiveProgress>>,
    pub(super) shutting_down: Arc<std::sync::atomic::AtomicBool>,
    /// An LLM request on its way (never waited for; dropped = abandoned).
    pub(super) llm_reply: Option<crate::llm::PendingReply>,
}

/// Why the loop ended.
enum End {
    Finished(String),
    Stopped,
    Failed(String),
}

/// What became of a worker request that a stop or a closing gate may cancel.
pub(super) enum Requested {
    Done(Value),
    /// Stopped or paused: whatever arrived after the cancel was (partly) taken while the person was
    /// back, and is dropped.
    Stopped,
    Failed(WorkerError),
}

impl Runner {
    pub(super) fn store(&self) -> std::sync::MutexGuard<'_, crate::store::Store> {
        lock(&self.opts.store)
    }

    pub(super) fn publish(&self, k: &str, data: Value) {
        if let Err(e) = self.opts.events.publish(k, Some(self.session_id), data) {
            tracing::warn!("event {k} not stored: {e}");
        }
    }

    /// The gate this session obeys (none when it runs `now`).
    pub(super) fn gate(&self) -> Option<watch::Receiver<Decision>> {
        if self.state.spec.now {
            None
        } else {
            self.opts.gate.clone()
        }
    }

    pub(super) fn save(&self) -> Result<(), StoreError> {
        self.live.lock().unwrap().progress = json!({
            "generation": self.state.engine.generation, "screened": self.state.screened,
            "shape_items": self.state.shape_items, "elapsed_s": self.state.elapsed_s,
            "budget": self.state.spec.budget, "model": self.state.spec.model, "seed": self.state.spec.seed,
        });
        self.store().save_search_state(self.session_id, &serde_json::to_value(&self.state).expect("state serializes"))
    }

    /// One worker request for this session's step: cancelled by a stop or by the idle gate closing.
    pub(super) async fn request(&mut self, op: &str, req: Value, timeout: Duration) -> Requested {
        let pause = PauseToken::new(&self.stop, self.gate());
        let stop = pause.token();
        match self.sup.request(op, req, timeout, Some(&stop), |_| {}).await {
            Ok(_) | Err(WorkerError::Cancelled) if stop.is_cancelled() => Requested::Stopped,
            Ok(v) => Requested::Done(v),
            Err(e) => Requested::Failed(e),
        }
    }

    pub(super) async fn run(mut self, resumed: bool) {
        let _ = self.store().set_session_state(self.session_id, SessionState::Running, None);
        self.publish(
            if resumed { kind::SESSION_RESUMED } else { kind::SESSION_STARTED },
            json!({"model": self.state.spec.model, "seed": self.state.spec.seed, "budget": self.state.spec.budget,
                   "target": self.key, "resumed": resumed, "workload": self.state.spec.workload,
                   "workload_from": self.state.spec.workload_from, "warm_start": self.state.spec.warm_start}),
        );
        let end = match self.run_loop().await {
            Ok(end) => end,
            Err(e) => End::Failed(e.to_string()),
        };
        self.abandon_llm_request();
        let _ = self.save();
        let (state, reason, event) = match &end {
            End::Finished(r) => (SessionState::Finished, r.clone(), kind::SESSION_FINISHED),
            End::Stopped if self.shutting_down.load(std::sync::atomic::Ordering::SeqCst) => {
                (SessionState::Paused, "daemon stopped; resumes when it starts again".to_string(), kind::SESSION_PAUSED)
            }
            End::Stopped => (SessionState::Stopped, "stopped on request".to_string(), kind::SESSION_STOPPED),
            End::Failed(r) => (SessionState::Failed, r.clone(), kind::SESSION_FINISHED),
        };
        let stored = self.store().set_session_state(self.session_id, state, Some(&reason));
        self.live.lock().unwrap().last_end = Some(match &stored {
            Ok(()) => format!("session {} {}: {reason}", self.session_id, state.as_str()),
            Err(e) => format!(
                "session {} {}: {reason} (the database could not record it: {e}; it resumes when the daemon restarts)",
                self.session_id,
                state.as_str()
            ),
        });
        if (!self.state.spec.verify.is_empty() || !self.state.spec.warm_start.is_empty()) && state != SessionState::Paused {
            self.decide_imports();
        }
        let summary = self.store().session(self.session_id).ok().flatten();
        let best = self.store().best(&self.key).ok().flatten();
        self.publish(
            event,
            json!({"state": state.as_str(), "reason": reason, "session": summary,
                   "best": best.map(|b| json!({"hash": b.hash, "ratio": b.ratio, "lo": b.lo, "hi": b.hi, "session_id": b.session_id}))}),
        );
        self.sup.shutdown().await;
    }

    /// After a verification session: each import it measured is verified (its policy is the best
    /// now: served, marked with where it came from) or rejected with what this machine measured.
    /// One the session never measured (stopped first) stays pending. After a warm-started search,
    /// the same for the imports it proposed, except that one that lost is rejected only when it was
    /// pending for this very model (a starting point stays one).
    fn decide_imports(&self) {
        // Events are published after the store's lock is released: publishing stores the event.
        let mut decided = vec![];
        let store = self.store();
        let best = store.best(&self.key).ok().flatten();
        let candidates = store.candidates(self.session_id, None).unwrap_or_default();
        let items = self.state.spec.verify.iter().map(|v| (v.import_id, &v.hash, true));
        let items = items.chain(self.state.spec.warm_start.iter().map(|w| (w.import_id, &w.hash, false)));
        for (import_id, hash, verifying) in items {
            let Ok(Some(imp)) = store.import_by_id(import_id) else { continue };
            if !verifying && !matches!(imp.state, ImportState::Pending | ImportState::StartingPoint) {
                continue;
            }
            let may_reject = verifying || (imp.state == ImportState::Pending && imp.model == self.key.model);
            let from = format!("{} ({})", imp.from_chip.as_deref().unwrap_or("another machine"), imp.from_device);
            let Some(c) = candidates.iter().find(|c| &c.hash == hash) else { continue };
            let measured = store.measurements(c.id).ok().and_then(|m| m.into_iter().rev().find(|m| m.ratio.is_some()));
            let (state, reason) = match (&best, measured) {
                (Some(b), Some(_)) if &b.hash == hash && imp.model == self.key.model => {
                    let origin = format!("imported from {from}, verified here in session {}", self.session_id);
                    let _ = store.set_best_origin(&self.key, &b.hash, &origin);
                    let reason = format!("verified here: {:.3}x [{:.3}, {:.3}] (session {}); served", b.ratio, b.lo, b.hi, self.session_id);
                    (ImportState::Verified, reason)
                }
                (_, Some(m)) if may_reject => {
                    let (r, lo, hi) = (m.ratio.unwrap_or(0.0), m.lo.unwrap_or(0.0), m.hi.unwrap_or(0.0));
                    let why = if !m.correct {
                        "its outputs differ from stock here".to_string()
                    } else if lo > 1.0 {
                        "faster than stock here but not confirmed faster than the current best".to_string()
                    } else {
                        "not proven faster than stock here (the lower bound must beat 1.0)".to_string()
                    };
                    (ImportState::Rejected, format!("measured here {r:.3}x [{lo:.3}, {hi:.3}] (session {}): {why}", self.session_id))
                }
                (_, None) if c.status == crate::store::CandidateStatus::Failed => {
                    (ImportState::Rejected, format!("failed here: {}", c.failure_reason.as_deref().unwrap_or("no reason given")))
                }
                _ => continue,
            };
            if let Err(e) = store.decide_import(imp.id, state, &reason, Some(self.session_id)) {
                tracing::warn!("could not record the verification of import {}: {e}", imp.id);
                continue;
            }
            decided.push((imp.hash, from, state, reason));
        }
        drop(store);
        for (hash, from, state, reason) in decided {
            publish_verified(&self.opts.events, self.session_id, &hash, &from, state, &reason);
        }
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
            if self.state.spec.remeasure {
                let Some((inc, _)) = self.incumbent()? else {
                    return Ok(End::Finished("no best policy to re-measure".into()));
                };
                self.remeasure_incumbent(Remeasure::LaterDay, None).await?;
                if self.stop.is_cancelled() {
                    return Ok(End::Stopped);
                }
                let now_best = self.store().best(&self.key)?.map(|b| b.hash);
                let verdict = if now_best.as_deref() == Some(inc.hash.as_str()) { "kept" } else { "demoted" };
                return Ok(End::Finished(format!("re-measured the best policy {}: {verdict}", inc.hash)));
            }
            if self.state.spec.fixed.is_none() && self.remeasure_due(s.evaluations as u64)? {
                self.remeasure_incumbent(Remeasure::InSession, None).await?;
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
        self.live.lock().unwrap().paused = Some(reason.clone());
        let _ = self.store().set_session_state(self.session_id, SessionState::Paused, Some(&reason));
        self.publish(kind::SESSION_PAUSED, json!({"reason": reason}));
        tokio::select! {
            _ = gate.wait_for(|d| d.run) => {}
            _ = self.stop.cancelled() => return,
        }
        self.live.lock().unwrap().paused = None;
        let _ = self.store().set_session_state(self.session_id, SessionState::Running, None);
        self.publish(kind::SESSION_RESUMED, json!({"reason": gate.borrow().summary()}));
    }

    /// One child of a fixed list. False when the list is done.
    async fn fixed_step(&mut self) -> Result<bool, SessionError> {
        let list = self.state.spec.fixed.clone().unwrap_or_default();
        let Some(doc) = list.get(self.state.fixed_next) else { return Ok(false) };
        let policy = retarget(doc, &self.state.space.target).map_err(SessionError::InvalidPolicy)?;
        let origin = if self.state.spec.verify.is_empty() { "given" } else { "imported" }.to_string();
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
        // A warm start is measured end to end: another machine proved it that way, and the screen's
        // matmul-time prediction is no judge of what it measured there. So are the search's seeds (a
        // handful per session, fusion first): fusion's gain is mostly per-call launch cost, which
        // matmul microbenchmarks barely see, and on a loaded machine their noise screened fusion
        // seeds out, leaving a session that never measured the one change that makes models faster.
        let measured_anyway = child.origin.starts_with("warm:") || child.origin.starts_with("seed:");
        if existing.is_none() && self.state.spec.screen && !measured_anyway {
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

    pub(super) fn add_candidate(
        &self,
        p: &Policy,
        island: usize,
        generation: u64,
        origin: &str,
        parents: &[String],
    ) -> Result<CandidateId, SessionError> {
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

    pub(super) fn fail(&self, candidate: CandidateId, reason: &str) -> Result<(), SessionError> {
        self.store().mark_candidate_failed(candidate, reason)?;
        self.publish(kind::CANDIDATE_FAILED, json!({"candidate_id": candidate, "reason": reason}));
        Ok(())
    }
}

/// The `policy.verified` event of one decided import.
fn publish_verified(events: &crate::events::EventBus, session: SessionId, hash: &str, from: &str, state: ImportState, reason: &str) {
    let _ = events.publish(
        kind::POLICY_VERIFIED,
        Some(session),
        json!({"hash": hash, "from": from, "state": state.as_str(), "reason": reason}),
    );
}
