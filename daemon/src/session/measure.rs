//! Measuring a candidate end to end, deciding its promotion (confirmation first), and what becomes of
//! a promoted policy: re-measured in a fresh worker before it is final, demoted when a later
//! re-measurement finds it slower than stock.

use super::run::{pairs_taken, stopped_early, Requested, Runner};
use super::settings::RACE_MIN_PAIRS;
use super::SessionError;
use crate::events::kind;
use crate::evolve::engine::Outcome;
use crate::evolve::promotion::{self, Evidence, Incumbent};
use crate::policy::Policy;
use crate::store::{CandidateId, CandidateStatus, Interval, NewMeasurement, NewWorkerFailure, PolicySummary, Promotion, Remeasurement};
use crate::worker::WorkerError;
use serde_json::{json, Value};
use std::time::Duration;

pub(super) enum Evaluated {
    Done,
    Stopped,
    Failed(String),
}

/// Why the best policy is measured again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Remeasure {
    /// Every few of a session's own measurements: the incumbent's bar stays current.
    InSession,
    /// Right after its promotion, in a fresh worker process: its promotion is final only then.
    AfterPromotion,
    /// On a later day (a session that only re-measures; see `StartParams::remeasure`).
    LaterDay,
}

impl Remeasure {
    fn reason(self) -> &'static str {
        match self {
            Remeasure::InSession => "in a later session step",
            Remeasure::AfterPromotion => "in a fresh worker process after its promotion",
            Remeasure::LaterDay => "on a later day",
        }
    }

    /// Whether the history records it even when it confirms the policy.
    fn recorded(self) -> bool {
        self != Remeasure::InSession
    }
}

impl Runner {
    /// Measures (or, after a crash, completes) one candidate end to end. `None` when stopped.
    pub(super) async fn measure_candidate(
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
        let hash = policy.content_hash();
        match self.request("evaluate", req, timeout).await {
            Requested::Stopped => {
                self.store().set_candidate_status(id, CandidateStatus::Pending)?;
                Ok(Evaluated::Stopped)
            }
            Requested::Done(result) => {
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
            Requested::Failed(e) => {
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
            let ev =
                |m: &crate::store::Measurement| Evidence { hash: hash.clone(), correct: m.correct, ratio: m.ratio, lo: m.lo, hi: m.hi };
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
                .map(|m| {
                    json!({"measurement_id": m.id, "at": m.at, "ratio": m.ratio, "lo": m.lo, "hi": m.hi,
                                "n_pairs": m.detail.pointer("/inference/n_pairs"), "gate": m.gate})
                })
                .collect();
            self.publish(
                kind::POLICY_PROMOTED,
                json!({"candidate_id": id, "hash": hash, "ratio": ratio, "lo": lo, "hi": hi, "reason": reason,
                       "replaced": inc, "target": self.key, "evidence": evidence, "summary": summary}),
            );
            // Final only once a fresh worker process (the model loaded anew) measures it again: a
            // result that held only in one process's state shows here.
            self.sup.shutdown().await;
            self.remeasure_incumbent(Remeasure::AfterPromotion, Some(pairs_taken(&last.detail))).await?;
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
        PolicySummary { text, fused, matmuls_per_token: Some(calls), rules: policy.matmul.rules.len(), workloads }
    }

    pub(super) fn record_worker_failure(&self, candidate: Option<CandidateId>, e: &WorkerError) {
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
    pub(super) fn incumbent(&self) -> Result<Option<(Incumbent, Policy)>, SessionError> {
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
    pub(super) fn remeasure_due(&self, evaluations: u64) -> Result<bool, SessionError> {
        let Some((inc, _)) = self.incumbent()? else { return Ok(false) };
        let st = self.store();
        let rows: Vec<_> =
            st.candidates(self.session_id, None)?.into_iter().filter(|c| c.origin == "incumbent" && c.hash == inc.hash).collect();
        let mut done = 0u64;
        for r in &rows {
            done += st.measurements(r.id)?.len() as u64;
        }
        let own = evaluations.saturating_sub(done);
        Ok(own >= (done + 1) * self.state.spec.remeasure_every)
    }

    /// Measures the incumbent again (as a candidate row with origin `incumbent`) and judges the
    /// result ([`Runner::judge_remeasurement`]). `pairs`: the number of pairs (default: the
    /// session's); a re-measurement is never raced or extended.
    pub(super) async fn remeasure_incumbent(&mut self, why: Remeasure, pairs: Option<u64>) -> Result<(), SessionError> {
        let Some((inc, policy)) = self.incumbent()? else { return Ok(()) };
        let row = self.store().candidates(self.session_id, None)?.into_iter().find(|c| c.origin == "incumbent" && c.hash == inc.hash);
        let id = match row {
            Some(r) => r.id,
            None => self.add_candidate(&policy, 0, self.state.engine.generation, "incumbent", &[])?,
        };
        self.store().set_candidate_status(id, CandidateStatus::Measuring)?;
        let mut req = self.evaluate_request(&policy);
        if let Some(p) = pairs {
            req["pairs"] = json!(p.max(self.state.spec.pairs as u64));
        }
        // Each re-measurement orders its pairs differently, as a candidate's attempts do.
        req["seed"] = json!(self.measurement_seed(id, self.store().measurements(id)?.len() as u64));
        let timeout = Duration::from_secs(self.state.spec.evaluate_timeout_s);
        match self.request("evaluate", req, timeout).await {
            Requested::Stopped => {
                self.store().set_candidate_status(id, CandidateStatus::Pending)?;
            }
            Requested::Done(result) => {
                let m = NewMeasurement::from_worker_result(id, &result)?;
                self.store().record_measurement(&m)?;
                self.publish(
                    kind::CANDIDATE_MEASURED,
                    json!({"candidate_id": id, "hash": inc.hash, "origin": "incumbent", "correct": m.correct,
                           "ratio": m.ratio, "lo": m.lo, "hi": m.hi, "previous_ratio": inc.ratio, "why": why.reason()}),
                );
                self.judge_remeasurement(&inc, id, &m, why)?;
            }
            Requested::Failed(e) => {
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

    /// What a re-measurement of the best policy means: one that failed the gate, or whose interval
    /// lies below 1 (its upper bound under 1.0: measured slower than stock), demotes it — the
    /// previous best or native is served again, with the reason in the history. Re-measurements in a
    /// fresh worker after a promotion and on a later day are recorded in the history either way; the
    /// periodic ones inside a session only when they demote.
    fn judge_remeasurement(&self, inc: &Incumbent, id: CandidateId, m: &NewMeasurement, why: Remeasure) -> Result<(), SessionError> {
        let slower = m.hi.is_some_and(|hi| hi < 1.0);
        let (ratio, lo, hi) = (m.ratio.unwrap_or(0.0), m.lo.unwrap_or(0.0), m.hi.unwrap_or(0.0));
        if why.recorded() && m.correct {
            self.store().record_remeasure(&Remeasurement {
                key: self.key.clone(),
                hash: inc.hash.clone(),
                ratio,
                lo,
                hi,
                session_id: Some(self.session_id),
                candidate_id: Some(id),
                reason: why.reason().into(),
            })?;
        }
        let demote = if !m.correct {
            Some(format!(
                "re-measured {}: failed the correctness gate ({})",
                why.reason(),
                m.gate.get("reason").and_then(Value::as_str).unwrap_or("no reason")
            ))
        } else if slower {
            Some(format!("re-measured {}: {ratio:.3} [{lo:.3}, {hi:.3}], slower than stock", why.reason()))
        } else {
            None
        };
        if let Some(reason) = &demote {
            let served = self.store().demote(&self.key, &inc.hash, reason)?;
            tracing::warn!(hash = %inc.hash, "{reason}; demoted");
            self.publish(
                kind::POLICY_DEMOTED,
                json!({"hash": inc.hash, "reason": reason, "served": served.clone().unwrap_or_else(|| "native".into()), "target": self.key}),
            );
        }
        if why.recorded() {
            self.publish(
                kind::POLICY_REMEASURED,
                json!({"hash": inc.hash, "why": why.reason(), "correct": m.correct, "ratio": m.ratio, "lo": m.lo, "hi": m.hi,
                       "promoted_ratio": inc.ratio, "demoted": demote.is_some(), "final": why == Remeasure::AfterPromotion,
                       "target": self.key}),
            );
        }
        Ok(())
    }
}
