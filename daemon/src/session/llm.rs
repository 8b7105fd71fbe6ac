//! A session's use of the optional LLM mutator: requests run beside the search, never in its way.
//!
//! Between two steps the session polls ([`Runner::poll_llm`]): an answer that has arrived is turned
//! into candidates for the next generation; when none is out and one is due, a new request is sent
//! (`crate::llm::send`, a detached thread). The search never waits for a reply, and a stop, a pause
//! or the end of the session drops the request in flight (counted as `abandoned`) — so a session stops
//! within a second whatever the endpoint does.
//!
//! Pace: a request is due every `LlmStats::MIN_INTERVAL` generations; a failed request or a reply with
//! nothing usable doubles the interval, up to `LlmStats::MAX_INTERVAL`; a usable reply brings it back
//! to the minimum. A garbage-answering endpoint therefore costs the search almost nothing.
//!
//! Every proposal that is not used is kept with its reason (bounded: counts per reason and the last
//! few examples): code (never run), unparsable or non-policy JSON, a policy that fails validation or
//! cannot run here, one that computes what stock computes, a repeat of a candidate already seen; and a
//! candidate the cost model screens out is counted as `screened`.

use super::run::{retarget, Runner};
use crate::config::{Config, LlmConfig};
use crate::llm::{Proposal, REQUEST_TIMEOUT};
use std::sync::{Arc, RwLock};

/// Where sessions read the LLM endpoint from.
#[derive(Clone, Default)]
pub enum LlmSource {
    /// No endpoint: `llm: true` is refused at start.
    #[default]
    None,
    /// A fixed endpoint (tests).
    Fixed(LlmConfig),
    /// The daemon's live config: an edit of `[llm]` applies to running sessions from their next
    /// request.
    Live(Arc<RwLock<Config>>),
}

impl LlmSource {
    /// The endpoint as configured now.
    pub fn current(&self) -> Option<LlmConfig> {
        match self {
            LlmSource::None => None,
            LlmSource::Fixed(c) => Some(c.clone()),
            LlmSource::Live(config) => config.read().unwrap_or_else(|p| p.into_inner()).llm.clone(),
        }
    }
}

impl From<Option<LlmConfig>> for LlmSource {
    fn from(c: Option<LlmConfig>) -> LlmSource {
        c.map_or(LlmSource::None, LlmSource::Fixed)
    }
}

impl Runner {
    /// Takes an answer that has arrived and sends a new request when one is due. Never waits.
    pub(super) fn poll_llm(&mut self) {
        if !self.state.spec.llm {
            return;
        }
        let generation = self.state.engine.generation;
        if let Some(pending) = &mut self.llm_reply {
            match pending.poll() {
                None => return, // still out: the search goes on
                Some(answer) => {
                    self.llm_reply = None;
                    self.take_llm_answer(answer, generation);
                }
            }
        }
        let Some(cfg) = self.opts.llm.current() else { return };
        if !self.state.llm.due(generation) {
            return;
        }
        let prompt = crate::llm::prompt(&self.state.space, &self.state.engine);
        self.state.llm.asked_at_generation = Some(generation);
        self.state.llm.requests += 1;
        self.llm_reply = Some(crate::llm::send(&cfg, &prompt, REQUEST_TIMEOUT));
    }

    /// Drops the request in flight, if any (a stop, a pause, the end of the session).
    pub(super) fn abandon_llm_request(&mut self) {
        if self.llm_reply.take().is_some() {
            self.state.llm.abandoned += 1;
        }
    }

    fn take_llm_answer(&mut self, answer: Result<Vec<Proposal>, crate::llm::LlmError>, generation: u64) {
        let proposals = match answer {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!("{e}");
                self.state.llm.requests_failed += 1;
                self.state.llm.last_error = Some(e.to_string());
                self.state.llm.paced(generation, false);
                return;
            }
        };
        self.state.llm.last_error = None;
        let mut usable = false;
        for proposal in proposals {
            let doc = match proposal {
                Proposal::Refused { reason, excerpt } => {
                    self.state.llm.refuse(&reason, &excerpt, generation);
                    continue;
                }
                Proposal::Policy(doc) => doc,
            };
            let name = doc.get("name").and_then(|n| n.as_str()).unwrap_or("unnamed").to_string();
            let policy = match retarget(&doc, &self.state.space.target) {
                Ok(p) => p,
                Err(e) => {
                    self.state.llm.refuse("invalid policy", &format!("{name}: {e}"), generation);
                    continue;
                }
            };
            match self.state.engine.admit(&self.state.space, policy) {
                Ok(policy) => {
                    self.state.llm.valid += 1;
                    usable = true;
                    self.state.engine.inject(policy, "llm".into());
                }
                Err(why) => self.state.llm.refuse(why, &name, generation),
            }
        }
        self.state.llm.paced(generation, usable);
    }
}
