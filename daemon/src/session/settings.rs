//! What a session is asked to do: the `tuning.start` parameters ([`StartParams`]) and the fully
//! resolved settings stored with the session ([`SessionSpec`]), so a resumed session runs the same
//! session.

use super::SessionError;
use crate::evolve::engine::EngineConfig;
use crate::evolve::space::Workload;
use crate::store::Budget;
use serde::{Deserialize, Serialize};
use serde_json::Value;

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
    /// Only measure the model's best policy again (in this session's fresh worker) and judge it:
    /// what the idle auto-starter runs when a best was last measured on an earlier day.
    #[serde(default)]
    pub remeasure: Option<bool>,
    /// Measure the model's pending imported policies (docs/sharing.md) and decide each: verified
    /// (promoted through the normal rule, then served) or rejected with the reason.
    #[serde(default)]
    pub verify: Option<bool>,
    /// Start the search cold: no imported policy seeds its first generation (docs/sharing.md,
    /// "Warm start").
    #[serde(default)]
    pub cold: Option<bool>,
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
    /// Only re-measure the best policy (see `StartParams::remeasure`).
    #[serde(default)]
    pub remeasure: bool,
    /// Where `workload` came from when it was derived from the model's usage (`usage_mix`); `None`
    /// when given by the caller or the backend's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload_from: Option<String>,
    /// A verification session: the imports it measures (`fixed` holds their policies, retargeted).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub verify: Vec<VerifyItem>,
    /// No warm start (see `StartParams::cold`).
    #[serde(default)]
    pub cold: bool,
    /// The imported policies that seeded the first generation, in the order proposed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warm_start: Vec<WarmItem>,
}

/// An imported policy proposed first by a search session (a warm start).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WarmItem {
    pub import_id: i64,
    /// The content hash as retargeted to this machine (the candidate's hash).
    pub hash: String,
    /// "Apple M3 Max (dev-…)": the machine that proved it.
    pub from: String,
    /// Whether it was proven for this very model (else a sibling model of the same backend).
    pub same_model: bool,
}

/// One imported policy a verification session decides.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VerifyItem {
    pub import_id: i64,
    /// The content hash of the policy as retargeted to this machine (what the session measures).
    pub hash: String,
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
            remeasure: self.remeasure.unwrap_or(false),
            workload_from: None,
            verify: vec![],
            cold: self.cold.unwrap_or(false),
            warm_start: vec![],
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

/// Pairs a raced first evaluation takes before it may stop (fewer give no useful interval: with 3
/// pairs the bootstrap upper bound is the largest pair ratio, so every pair must have lost).
pub const RACE_MIN_PAIRS: u32 = 3;
