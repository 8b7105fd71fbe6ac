//! The search space of one session: which policies are worth proposing for this model and workload,
//! how to seed it, and how to vary a policy (mutation, crossover).
//!
//! Candidates are only ever about the model's real linear shapes (from the worker's `load` reply)
//! and the M values the workload really runs, so no rule is written for a matmul that never happens.
//! Rules address one shape exactly (`n = [N, N]`, `k = [K, K]`) and an M *band* (midpoints between
//! the workload's distinct M values), so a rule still fires when the evaluator's exact M differs by a
//! token from the estimate here (mlx_lm prefills `P - 1` tokens, then decodes one at a time).
//!
//! Fusion is the first level of the space: which sibling groups the worker's trace found (`fusion`,
//! from the `load` reply) run as one matmul. A policy's matmuls are the model's shapes with each
//! fused group's members replaced by one shape of the summed N ([`SearchSpace::shapes_for`]); rules,
//! the cost model and the behaviour key all work on those, so the plans of fused shapes are searched
//! like any other.

use crate::policy::{Fusion, FusionGroup, KernelFamily, KernelPlan, Plan, Policy, Range, Rule, Target, SCHEMA_ID};
use rand::seq::IndexedRandom;
use rand::Rng;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;

/// Largest number of rules a proposed policy may hold (the schema allows 256; more is noise).
pub const MAX_RULES: usize = 24;

/// One distinct linear (N, K) of the model and how many layers use it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shape {
    pub name: String,
    pub n: u64,
    pub k: u64,
    pub count: u64,
}

/// A sibling group the worker's trace found (`fusion_groups` of the `load` reply): the members of
/// every module matching `scope` read the same input; `n` is each member's N, `count` how many
/// modules match.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FusionCandidate {
    pub scope: String,
    pub members: Vec<String>,
    pub n: Vec<u64>,
    pub k: u64,
    pub count: u64,
}

impl FusionCandidate {
    pub fn group(&self) -> FusionGroup {
        FusionGroup { scope: self.scope.clone(), members: self.members.clone() }
    }

    fn is(&self, g: &FusionGroup) -> bool {
        self.scope == g.scope && self.members == g.members
    }
}

/// `[q_proj, k_proj, v_proj]` → `q/k/v` (a suffix all members share is dropped).
pub fn short_members(members: &[String]) -> String {
    let suffix = ["_proj", "_linear", "_dense"].into_iter().find(|s| members.iter().all(|m| m.ends_with(s)));
    members.iter().map(|m| suffix.map_or(m.as_str(), |s| &m[..m.len() - s.len()])).collect::<Vec<_>>().join("/")
}

/// The workload a session measures on (the `inference`/`training` fields of the worker's `evaluate`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Workload {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inference: Option<Inference>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub training: Option<Training>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inference {
    pub prompt_tokens: u64,
    pub gen_tokens: u64,
    /// Sequences generated together: 1 is `generate`; more is what a batching server runs (the
    /// evaluator then times B prompts prefilled and decoded together).
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub batch: u64,
}

fn one() -> u64 {
    1
}

fn is_one(n: &u64) -> bool {
    *n == 1
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Training {
    pub batch: u64,
    pub seq: u64,
}

/// One M value of the workload and how many forward matmul passes at that M one run makes.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct WorkM {
    pub m: u64,
    pub weight: f64,
    /// `true` for the training workload (weighted 0.3 in the combined score), else inference (0.7).
    pub training: bool,
}

impl Workload {
    /// The evaluator's per-backend defaults (evaluator/tilewise/workloads.py `DEFAULTS`).
    pub fn default_for(backend: &str) -> Workload {
        if backend == "cpu" {
            Workload {
                inference: Some(Inference { prompt_tokens: 64, gen_tokens: 16, batch: 1 }),
                training: Some(Training { batch: 2, seq: 64 }),
            }
        } else {
            Workload {
                inference: Some(Inference { prompt_tokens: 512, gen_tokens: 64, batch: 1 }),
                training: Some(Training { batch: 4, seq: 512 }),
            }
        }
    }

    /// The M values this workload runs. Inference: mlx_lm prefills `P - 1` tokens in one step (when
    /// `P - 1 <= prefill_step_size`, else in steps of that size), then runs `G` single-token steps.
    /// Training: one forward at `B × L` plus a backward that costs about two forwards.
    pub fn m_values(&self) -> Vec<WorkM> {
        let mut out = Vec::new();
        if let Some(i) = self.inference {
            let b = i.batch.max(1);
            let prefill = i.prompt_tokens.saturating_sub(1).clamp(1, 2048);
            out.push(WorkM { m: b * prefill, weight: 1.0, training: false });
            out.push(WorkM { m: b, weight: i.gen_tokens.max(1) as f64, training: false });
        }
        if let Some(t) = self.training {
            out.push(WorkM { m: (t.batch * t.seq).max(1), weight: 3.0, training: true });
        }
        out
    }

    /// The fields for the worker's `evaluate` request; a workload left out is sent as `null` (the
    /// worker would otherwise measure its default for it).
    pub fn request_fields(&self) -> Value {
        let mut v = json!({"inference": null, "training": null});
        if let Some(i) = self.inference {
            v["inference"] = json!({"prompt_tokens": i.prompt_tokens, "gen_tokens": i.gen_tokens});
            if i.batch > 1 {
                v["inference"]["batch"] = json!(i.batch);
            }
        }
        if let Some(t) = self.training {
            v["training"] = json!({"batch": t.batch, "seq": t.seq});
        }
        v
    }
}

/// Everything the search needs to know about the session's target.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SearchSpace {
    pub target: Target,
    pub shapes: Vec<Shape>,
    pub workload: Workload,
    /// Chip name from the device probe (the seed heuristic keys its base tile on it).
    pub chip: String,
    /// The model's dtype as the worker loaded it (`float32`, `bfloat16`, `float16`): kernel plans
    /// are valid or not per element size.
    #[serde(default)]
    pub dtype: String,
    /// Sibling groups that may be fused (empty for sessions saved before fusion existed).
    #[serde(default)]
    pub fusion: Vec<FusionCandidate>,
}

/// Whether a kernel plan obeys the validity rules of docs/kernels.md ("mirror these in Rust") that
/// do not depend on the tensor-core/SIMT path: gemv `32 × rows_per_block × split_k ≤ 1024`, vector
/// width `4 ≤ V × itemsize ≤ 16` bytes, gemm `block_k % V == 0`, V = 16 bytes / itemsize for gemm,
/// and the shared-memory bound `(block_m + block_n) × (block_k + 8) × itemsize ≤ 48 KiB` (CUDA) /
/// 32 KiB (Metal). The path-specific rules (5, 6) are left to the evaluator, which rejects such a
/// plan at its correctness gate; the search then records it as failed.
pub fn kernel_plan_ok(k: &KernelPlan, itemsize: u32) -> bool {
    let bytes = k.vector_width * itemsize;
    match k.family {
        KernelFamily::Gemv => {
            let r = k.rows_per_block.unwrap_or(0);
            r > 0 && 32 * r * k.split_k <= 1024 && (4..=16).contains(&bytes)
        }
        KernelFamily::Gemm => {
            let (Some(bm), Some(bn), Some(bk), Some(_w)) = (k.block_m, k.block_n, k.block_k, k.warps) else { return false };
            let limit = if k.backend == crate::policy::KernelBackend::Cuda { 48 * 1024 } else { 32 * 1024 };
            bytes == 16 && bk % k.vector_width == 0 && (bm + bn) * (bk + 8) * itemsize <= limit
        }
    }
}

/// The plan actually run for one matmul once tiles that do not split anything are dropped: a split
/// whose tile covers the whole axis is the same computation as not splitting that axis, and a split
/// that splits nothing is native. Two policies with the same effective table are the same candidate.
pub fn effective_plan(plan: &Plan, m: u64, n: u64, k: u64) -> Plan {
    match plan {
        Plan::Split { tile_m, tile_n, tile_k } => {
            let keep = |t: &Option<u32>, dim: u64| t.filter(|&t| (t as u64) < dim);
            let (tm, tn, tk) = (keep(tile_m, m), keep(tile_n, n), keep(tile_k, k));
            if tm.is_none() && tn.is_none() && tk.is_none() {
                Plan::Native
            } else {
                Plan::Split { tile_m: tm, tile_n: tn, tile_k: tk }
            }
        }
        other => other.clone(),
    }
}

/// `sha256:` of a plan's canonical JSON: the memo's plan key.
pub fn plan_hash(plan: &Plan) -> String {
    let text = serde_json::to_string(&serde_json::to_value(plan).expect("plan serializes")).expect("json");
    format!("sha256:{}", hex::encode(Sha256::digest(text.as_bytes())))
}

/// Tile sizes a split may use along an axis of length `dim`: powers of two from 8 below `dim`
/// (`None` = do not split that axis). Steps move along this ladder, so tiles stay aligned.
fn tile_ladder(dim: u64) -> Vec<u32> {
    (3..=20).map(|p| 1u32 << p).filter(|&t| (t as u64) < dim).collect()
}

fn step_tile(current: Option<u32>, dim: u64, up: bool) -> Option<u32> {
    let ladder = tile_ladder(dim);
    if ladder.is_empty() {
        return None;
    }
    match current {
        None => {
            // From "whole axis", stepping down enters the ladder at its top.
            if up {
                None
            } else {
                ladder.last().copied()
            }
        }
        Some(t) => {
            let pos = ladder.iter().position(|&x| x >= t).unwrap_or(ladder.len() - 1);
            if up {
                ladder.get(pos + 1).copied() // past the top = whole axis
            } else {
                Some(ladder[pos.saturating_sub(1)])
            }
        }
    }
}

impl SearchSpace {
    /// Distinct workload M values, ascending, with the band each one owns.
    pub fn m_bands(&self) -> Vec<(u64, Range)> {
        let mut ms: Vec<u64> = self.workload.m_values().iter().map(|w| w.m).collect();
        ms.sort_unstable();
        ms.dedup();
        let mut out = Vec::new();
        for (i, &m) in ms.iter().enumerate() {
            let lo = if i == 0 { 1 } else { (ms[i - 1] + m) / 2 + 1 };
            let hi = ms.get(i + 1).map(|&next| (m + next) / 2);
            out.push((m, Range(lo, hi)));
        }
        out
    }

    fn band_of(&self, m: u64) -> Range {
        self.m_bands().into_iter().find(|(_, r)| r.contains(m)).map(|(_, r)| r).unwrap_or(Range(1, None))
    }

    /// A policy document for this target.
    pub fn policy(&self, name: &str, rules: Vec<Rule>, default: Plan) -> Policy {
        Policy {
            schema: SCHEMA_ID.to_string(),
            name: Some(name.to_string()),
            target: self.target.clone(),
            matmul: crate::policy::Matmul { rules, default },
            fusion: None,
            generation: None,
            training: None,
        }
    }

    /// `native` for this target (the baseline every session holds).
    pub fn native(&self) -> Policy {
        self.policy("native", vec![], Plan::Native)
    }

    /// The seed document's `choose_tile_size` heuristic (reference/seed-openevolve-mlx-lm-optimization.md)
    /// tabulated as data over this model's shapes and workload M values:
    /// base tile 512 / alignment 32 on M3/M4-class chips, 256 / 16 otherwise; decode (M ≤ 16) left
    /// native; tile_m = M rounded up to the alignment, capped at the base tile; tile_n doubled for
    /// very rectangular problems (aspect > 4); tile_k doubled when K dominates (K > 2 max(M, N)).
    pub fn seed_heuristic(&self) -> Policy {
        let big = ["M3", "M4", "M5"].iter().any(|c| self.chip.contains(c));
        let (base, align) = if big { (512u64, 32u64) } else { (256, 16) };
        let mut rules = Vec::new();
        for (m, band) in self.m_bands() {
            if m <= 16 {
                continue;
            }
            for s in &self.shapes {
                let k_dominance = s.k as f64 / m.max(s.n) as f64;
                let aspect = m.max(s.n) as f64 / m.min(s.n).max(1) as f64;
                let tile_m = (m.div_ceil(align) * align).min(base);
                let tile_n = if aspect > 4.0 { base * 2 } else { base };
                let tile_k = if k_dominance > 2.0 { base * 2 } else { base };
                let plan = Plan::Split { tile_m: Some(tile_m as u32), tile_n: Some(tile_n as u32), tile_k: Some(tile_k as u32) };
                if effective_plan(&plan, m, s.n, s.k) == Plan::Native {
                    continue;
                }
                rules.push(Rule { m: Some(band), n: Some(Range(s.n, Some(s.n))), k: Some(Range(s.k, Some(s.k))), plan });
            }
        }
        rules.truncate(MAX_RULES);
        self.policy("seed-choose_tile_size", rules, Plan::Native)
    }

    /// The groups of `p` that this model has (a group the trace did not find is ignored here, as
    /// the plugin ignores it), in the space's order.
    pub fn fused_groups(&self, p: &Policy) -> Vec<&FusionCandidate> {
        let groups = p.fusion_groups();
        self.fusion.iter().filter(|c| groups.iter().any(|g| c.is(g))).collect()
    }

    /// The model's linear shapes under `p`: each fused group's members leave their shapes and one
    /// shape of the summed N takes their place (`count` = modules the group applies to).
    pub fn shapes_for(&self, p: &Policy) -> Vec<Shape> {
        let mut shapes = self.shapes.clone();
        for g in self.fused_groups(p) {
            for &n in &g.n {
                if let Some(s) = shapes.iter_mut().find(|s| s.n == n && s.k == g.k) {
                    s.count = s.count.saturating_sub(g.count);
                }
            }
            let n: u64 = g.n.iter().sum();
            let name = g.members.join("+");
            match shapes.iter_mut().find(|s| s.n == n && s.k == g.k) {
                Some(s) => {
                    s.count += g.count;
                    s.name = format!("{}+[{name}]", s.name);
                }
                None => shapes.push(Shape { name: format!("[{name}]"), n, k: g.k, count: g.count }),
            }
        }
        shapes.retain(|s| s.count > 0);
        shapes
    }

    /// What `p` changes, in words: `q/k/v fused, gate/up fused: 169 → 97 matmuls per token; 2 plan
    /// rules` (fused groups by their members' names without a shared `_proj` suffix).
    pub fn describe(&self, p: &Policy) -> (String, Vec<String>, [u64; 2]) {
        let fused: Vec<String> = self.fused_groups(p).iter().map(|g| short_members(&g.members)).collect();
        let (stock, tuned) = self.calls_per_token(p);
        let rules = p.matmul.rules.iter().filter(|r| r.plan != Plan::Native).count() + usize::from(p.matmul.default != Plan::Native);
        let mut parts = Vec::new();
        if !fused.is_empty() {
            let mut text = fused.iter().map(|f| format!("{f} fused")).collect::<Vec<_>>().join(", ");
            if p.fusion.as_ref().is_some_and(|f| !f.fuses_training()) {
                text.push_str(" (inference only)");
            }
            parts.push(format!("{text}: {stock} → {tuned} matmuls per token"));
        }
        if rules > 0 {
            parts.push(format!("{rules} plan rule{}", if rules == 1 { "" } else { "s" }));
        }
        if parts.is_empty() {
            parts.push("native plans".into());
        }
        (parts.join("; "), fused, [stock, tuned])
    }

    /// Linear calls one decode step (one token) runs: stock, and under `p`.
    pub fn calls_per_token(&self, p: &Policy) -> (u64, u64) {
        let count = |shapes: &[Shape]| shapes.iter().map(|s| s.count).sum();
        (count(&self.shapes), count(&self.shapes_for(p)))
    }

    /// The fusion seeds: every group this model has fused together, and (when there are several)
    /// each group alone, all plans native. Data from the trace, nothing named per architecture.
    pub fn fusion_seeds(&self) -> Vec<Policy> {
        if self.fusion.is_empty() {
            return Vec::new();
        }
        let with = |groups: Vec<FusionGroup>, name: String| {
            let mut p = self.policy(&name, vec![], Plan::Native);
            p.fusion = Some(Fusion { groups, training: None });
            p
        };
        let all: Vec<FusionGroup> = self.fusion.iter().map(|g| g.group()).collect();
        let mut out = vec![with(all, "fuse-siblings".into())];
        if self.fusion.len() > 1 {
            for g in &self.fusion {
                out.push(with(vec![g.group()], format!("fuse-{}", g.members.join("+"))));
            }
        }
        out
    }

    /// Every (M, shape) the workload runs under `p`, with its weight (forward passes × layers using
    /// the shape). The stock model's matmuls are `matmuls_for(&space.native())`.
    pub fn matmuls_for(&self, p: &Policy) -> Vec<(WorkM, Shape)> {
        let shapes = self.shapes_for(p);
        let mut out = Vec::new();
        for w in self.workload.m_values() {
            for s in &shapes {
                out.push((w, s.clone()));
            }
        }
        out
    }

    /// The plan each of the workload's matmuls runs under `p`, after dropping non-splits. Two
    /// policies with the same table (and the same fusion) do the same work: the search measures only
    /// one of them.
    pub fn effective_table(&self, p: &Policy) -> BTreeMap<(u64, u64, u64), Plan> {
        let mut t = BTreeMap::new();
        for (w, s) in self.matmuls_for(p) {
            t.insert((w.m, s.n, s.k), effective_plan(p.plan_for(w.m, s.n, s.k), w.m, s.n, s.k));
        }
        t
    }

    /// Hash of the fused groups and the effective table (the search's identity of a candidate's
    /// behaviour).
    pub fn behaviour_key(&self, p: &Policy) -> String {
        let table: Vec<Value> = self.effective_table(p).into_iter().map(|((m, n, k), plan)| json!([m, n, k, plan])).collect();
        let fused: Vec<FusionGroup> = self.fused_groups(p).into_iter().map(|g| g.group()).collect();
        let training = !fused.is_empty() && p.fusion.as_ref().is_some_and(|f| !f.fuses_training());
        let text = if fused.is_empty() {
            serde_json::to_string(&table).expect("json")
        } else {
            serde_json::to_string(&json!({"fusion": fused, "inference_only": training, "table": table})).expect("json")
        };
        hex::encode(&Sha256::digest(text.as_bytes())[..12])
    }

    /// True when `p` computes exactly what stock computes: nothing fused and every matmul of the
    /// workload native (an A/A candidate).
    pub fn is_effectively_stock(&self, p: &Policy) -> bool {
        self.fused_groups(p).is_empty() && self.effective_table(p).values().all(|pl| *pl == Plan::Native)
    }

    /// Behaviour features for the MAP-Elites grid: (fraction of the workload's matmul FLOPs that run
    /// changed — fused or non-native —, FLOP-weighted mean log2 of the split tiles used; 0 when
    /// nothing is split).
    pub fn features(&self, p: &Policy) -> (f64, f64) {
        let (mut total, mut non_native, mut tile_log_sum) = (0.0, 0.0, 0.0);
        let fused_shapes: Vec<(u64, u64)> = self.fused_groups(p).iter().map(|g| (g.n.iter().sum(), g.k)).collect();
        for (w, s) in self.matmuls_for(p) {
            let flops = w.weight * s.count as f64 * (w.m * s.n * s.k) as f64;
            total += flops;
            let plan = effective_plan(p.plan_for(w.m, s.n, s.k), w.m, s.n, s.k);
            if plan == Plan::Native && fused_shapes.contains(&(s.n, s.k)) {
                non_native += flops;
            }
            if plan != Plan::Native {
                non_native += flops;
                let tiles: Vec<f64> = match plan {
                    Plan::Split { tile_m, tile_n, tile_k } => {
                        [tile_m, tile_n, tile_k].iter().flatten().map(|&t| (t as f64).log2()).collect()
                    }
                    Plan::Kernel(k) => {
                        [k.block_m, k.block_n, k.block_k, k.rows_per_block].iter().flatten().map(|&t| (t as f64).log2()).collect()
                    }
                    Plan::Native => vec![],
                };
                if !tiles.is_empty() {
                    tile_log_sum += flops * tiles.iter().sum::<f64>() / tiles.len() as f64;
                }
            }
        }
        if total == 0.0 || non_native == 0.0 {
            return (0.0, 0.0);
        }
        (non_native / total, tile_log_sum / non_native)
    }

    /// Runs the document through the same validation the plugin applies; `None` when it fails.
    pub fn validated(&self, p: Policy) -> Option<Policy> {
        let v = p.to_value();
        let parsed = Policy::from_value(&v).ok()?;
        parsed.validate_for_backend(&self.target.backend).ok()?;
        Some(parsed)
    }

    /// Drops rules that no workload matmul reaches (shadowed or out of range) and caps the count, so
    /// a policy only carries rules that change something.
    pub fn prune(&self, mut p: Policy) -> Policy {
        // A GEMV kernel serves only M <= 16: narrow its rule's M range to that, or, when the range
        // starts above it, switch the plan to the GEMM family (the schema's cross-field rule).
        for r in &mut p.matmul.rules {
            if let Plan::Kernel(k) = &mut r.plan {
                if k.family == KernelFamily::Gemv {
                    let lo = r.m.map_or(1, |m| m.0);
                    if lo <= crate::policy::GEMV_MAX_M {
                        let hi = r.m.and_then(|m| m.1).map_or(crate::policy::GEMV_MAX_M, |h| h.min(crate::policy::GEMV_MAX_M));
                        r.m = Some(Range(lo, Some(hi)));
                    } else {
                        *k = KernelPlan {
                            backend: k.backend,
                            family: KernelFamily::Gemm,
                            rows_per_block: None,
                            block_m: Some(64),
                            block_n: Some(64),
                            block_k: Some(16),
                            warps: Some(4),
                            vector_width: 16 / self.itemsize(),
                            split_k: 1,
                        };
                    }
                }
            }
        }
        if let Plan::Kernel(k) = &p.matmul.default {
            if k.family == KernelFamily::Gemv {
                p.matmul.default = Plan::Native;
            }
        }
        // A kernel step can leave the valid set (docs/kernels.md): such a plan falls back to native.
        let itemsize = self.itemsize();
        for r in &mut p.matmul.rules {
            if matches!(&r.plan, Plan::Kernel(k) if !kernel_plan_ok(k, itemsize)) {
                r.plan = Plan::Native;
            }
        }
        if matches!(&p.matmul.default, Plan::Kernel(k) if !kernel_plan_ok(k, itemsize)) {
            p.matmul.default = Plan::Native;
        }
        // Fusion: only groups this model has, in the space's order (one set, one hash); a flag
        // that says the default is left out.
        let groups: Vec<FusionGroup> = self.fused_groups(&p).into_iter().map(|g| g.group()).collect();
        let inference_only = p.fusion.as_ref().is_some_and(|f| !f.fuses_training());
        p.fusion = (!groups.is_empty()).then(|| Fusion { groups, training: inference_only.then_some(false) });
        let mut used = vec![false; p.matmul.rules.len()];
        for (w, s) in self.matmuls_for(&p) {
            if let Some(i) = p.matmul.rules.iter().position(|r| r.matches(w.m, s.n, s.k)) {
                used[i] = true;
            }
        }
        let mut i = 0;
        p.matmul.rules.retain(|_| {
            let keep = used[i];
            i += 1;
            keep
        });
        p.matmul.rules.truncate(MAX_RULES);
        p
    }

    /// Bytes per element of the model's dtype (bf16 when unknown: the GPU default).
    pub fn itemsize(&self) -> u32 {
        match self.dtype.as_str() {
            "float32" => 4,
            _ => 2,
        }
    }

    fn kernels_available(&self) -> bool {
        matches!(self.target.backend.as_str(), "cuda" | "metal")
    }

    /// A random plan for a matmul at (m, n, k). On CPU only `native` and `split` exist.
    fn random_plan<R: Rng>(&self, rng: &mut R, m: u64, n: u64, k: u64) -> Plan {
        let pick = |rng: &mut R, dim: u64| -> Option<u32> {
            let ladder = tile_ladder(dim);
            if ladder.is_empty() || rng.random_bool(0.4) {
                None
            } else {
                ladder.choose(rng).copied()
            }
        };
        if self.kernels_available() && rng.random_bool(0.3) {
            return self.random_kernel(rng, m);
        }
        let mut plan = Plan::Split { tile_m: pick(rng, m), tile_n: pick(rng, n), tile_k: pick(rng, k) };
        if effective_plan(&plan, m, n, k) == Plan::Native {
            // Force at least one real split so the child differs from native.
            let (ln, lk) = (tile_ladder(n), tile_ladder(k));
            plan = if !ln.is_empty() && (lk.is_empty() || rng.random_bool(0.5)) {
                Plan::Split { tile_m: None, tile_n: ln.choose(rng).copied(), tile_k: None }
            } else if !lk.is_empty() {
                Plan::Split { tile_m: None, tile_n: None, tile_k: lk.choose(rng).copied() }
            } else {
                Plan::Native
            };
        }
        plan
    }

    /// A kernel plan drawn from the schema's enumerations (docs/kernels.md documents the space).
    fn random_kernel<R: Rng>(&self, rng: &mut R, m: u64) -> Plan {
        // Draw until the plan obeys the documented validity rules (most draws do).
        for _ in 0..64 {
            let plan = self.draw_kernel(rng, m);
            if let Plan::Kernel(k) = &plan {
                if kernel_plan_ok(k, self.itemsize()) {
                    return plan;
                }
            }
        }
        Plan::Native
    }

    fn draw_kernel<R: Rng>(&self, rng: &mut R, m: u64) -> Plan {
        let backend = if self.target.backend == "cuda" { crate::policy::KernelBackend::Cuda } else { crate::policy::KernelBackend::Metal };
        let vw = *[1u32, 2, 4, 8].choose(rng).unwrap();
        if m <= crate::policy::GEMV_MAX_M {
            Plan::Kernel(KernelPlan {
                backend,
                family: KernelFamily::Gemv,
                rows_per_block: Some(*[1u32, 2, 4, 8, 16, 32].choose(rng).unwrap()),
                block_m: None,
                block_n: None,
                block_k: None,
                warps: None,
                vector_width: vw,
                split_k: 1,
            })
        } else {
            Plan::Kernel(KernelPlan {
                backend,
                family: KernelFamily::Gemm,
                rows_per_block: None,
                block_m: Some(*[16u32, 32, 64, 128].choose(rng).unwrap()),
                block_n: Some(*[16u32, 32, 64, 128, 256].choose(rng).unwrap()),
                block_k: Some(*[8u32, 16, 32, 64].choose(rng).unwrap()),
                warps: Some(*[1u32, 2, 4, 8].choose(rng).unwrap()),
                split_k: *[1u32, 2, 4, 8].choose(rng).unwrap(),
                vector_width: 16 / self.itemsize(),
            })
        }
    }

    /// Steps one kernel parameter to a neighbouring valid value.
    fn step_kernel<R: Rng>(&self, rng: &mut R, k: &mut KernelPlan) {
        fn step<R: Rng>(rng: &mut R, v: &mut Option<u32>, values: &[u32]) {
            if let Some(cur) = *v {
                let i = values.iter().position(|&x| x == cur).unwrap_or(0);
                let j = if rng.random_bool(0.5) { i.saturating_sub(1) } else { (i + 1).min(values.len() - 1) };
                *v = Some(values[j]);
            }
        }
        match rng.random_range(0..4) {
            0 => step(rng, &mut k.rows_per_block, &[1, 2, 4, 8, 16, 32]),
            1 => {
                step(rng, &mut k.block_m, &[16, 32, 64, 128]);
                step(rng, &mut k.block_n, &[16, 32, 64, 128, 256]);
            }
            2 => {
                step(rng, &mut k.block_k, &[8, 16, 32, 64]);
                step(rng, &mut k.warps, &[1, 2, 4, 8]);
            }
            _ => {
                // GEMM's vector width is fixed by the dtype (16 bytes); GEMV's may vary.
                if k.family == KernelFamily::Gemv {
                    let mut vw = Some(k.vector_width);
                    step(rng, &mut vw, &[1, 2, 4, 8]);
                    k.vector_width = vw.unwrap_or(1);
                } else {
                    let mut sk = Some(k.split_k);
                    step(rng, &mut sk, &[1, 2, 4, 8]);
                    k.split_k = sk.unwrap_or(1);
                }
            }
        }
    }

    /// A rule for one of the workload's matmuls under `p` (fused shapes included), drawn at random.
    fn random_rule<R: Rng>(&self, rng: &mut R, p: &Policy) -> Option<Rule> {
        let matmuls = self.matmuls_for(p);
        let (w, s) = matmuls.choose(rng)?;
        let band = self.band_of(w.m);
        let plan = self.random_plan(rng, w.m, s.n, s.k);
        Some(Rule { m: Some(band), n: Some(Range(s.n, Some(s.n))), k: Some(Range(s.k, Some(s.k))), plan })
    }

    /// One random variation of `p` (before validation). Returns the operator's name for the record.
    pub fn mutate<R: Rng>(&self, rng: &mut R, p: &Policy) -> (Policy, &'static str) {
        let mut c = p.clone();
        // Fusion is the first level: with groups to fuse, a third of the mutations change the fusion.
        if !self.fusion.is_empty() && (c.matmul.rules.is_empty() && rng.random_bool(0.5) || rng.random_bool(0.33)) {
            return (self.toggle_fusion(rng, c), "toggle_fusion");
        }
        let rules = &mut c.matmul.rules;
        let op = if rules.is_empty() { 0 } else { rng.random_range(0..7) };
        let name = match op {
            // Add a rule for a real (M band, shape).
            0 => {
                if let Some(r) = self.random_rule(rng, p) {
                    let at = rng.random_range(0..=rules.len());
                    rules.insert(at, r);
                }
                "add_rule"
            }
            // Remove a rule.
            1 => {
                let i = rng.random_range(0..rules.len());
                rules.remove(i);
                "remove_rule"
            }
            // Move one tile one aligned step along its ladder.
            2 | 3 => {
                let i = rng.random_range(0..rules.len());
                let r = &mut rules[i];
                let (m_dim, n_dim, k_dim) = self.rule_dims(r, p);
                match &mut r.plan {
                    Plan::Split { tile_m, tile_n, tile_k } => {
                        let up = rng.random_bool(0.5);
                        match rng.random_range(0..3) {
                            0 => *tile_m = step_tile(*tile_m, m_dim, up),
                            1 => *tile_n = step_tile(*tile_n, n_dim, up),
                            _ => *tile_k = step_tile(*tile_k, k_dim, up),
                        }
                    }
                    Plan::Kernel(k) => self.step_kernel(rng, k),
                    Plan::Native => r.plan = self.random_plan(rng, m_dim, n_dim, k_dim),
                }
                "step_tile"
            }
            // Split a rule in two along M (at a band boundary) or by dropping its shape filter.
            4 => {
                let i = rng.random_range(0..rules.len());
                let r = rules[i].clone();
                let bands = self.m_bands();
                let covered: Vec<&(u64, Range)> = bands.iter().filter(|(m, _)| r.m.is_none_or(|rm| rm.contains(*m))).collect();
                if covered.len() >= 2 {
                    let cut = rng.random_range(1..covered.len());
                    let lo_part = Range(covered[0].1 .0, covered[cut - 1].1 .1);
                    let hi_part = Range(covered[cut].1 .0, covered.last().unwrap().1 .1);
                    let mut a = r.clone();
                    a.m = Some(lo_part);
                    let mut b = r.clone();
                    b.m = Some(hi_part);
                    let (md, nd, kd) = self.rule_dims(&b, p);
                    b.plan = self.random_plan(rng, md, nd, kd);
                    rules[i] = a;
                    rules.insert(i + 1, b);
                } else if let Some(extra) = self.random_rule(rng, p) {
                    rules.insert(i, extra);
                }
                "split_rule"
            }
            // Change a rule's bounds: widen its M to the neighbouring band, or drop the N/K filter.
            5 => {
                let i = rng.random_range(0..rules.len());
                let bands = self.m_bands();
                let r = &mut rules[i];
                match rng.random_range(0..3) {
                    0 => {
                        if let Some(Range(lo, hi)) = r.m {
                            let widen_up = rng.random_bool(0.5);
                            let next = if widen_up {
                                bands.iter().find(|(_, b)| hi.is_some_and(|h| b.0 == h + 1)).map(|(_, b)| Range(lo, b.1))
                            } else {
                                bands.iter().find(|(_, b)| b.1 == Some(lo.saturating_sub(1))).map(|(_, b)| Range(b.0, hi))
                            };
                            r.m = next.or(r.m);
                        }
                    }
                    1 => r.n = None,
                    _ => r.k = None,
                }
                "change_bounds"
            }
            // Switch the plan kind (native / split / kernel where available).
            _ => {
                let i = rng.random_range(0..rules.len());
                let (md, nd, kd) = self.rule_dims(&rules[i], p);
                rules[i].plan = match rules[i].plan {
                    Plan::Native => self.random_plan(rng, md, nd, kd),
                    _ if rng.random_bool(0.5) => Plan::Native,
                    _ => self.random_plan(rng, md, nd, kd),
                };
                "switch_plan"
            }
        };
        (c, name)
    }

    /// Fuses a group `p` does not fuse, or unfuses one it does; now and then flips whether the
    /// fusion also applies to training.
    fn toggle_fusion<R: Rng>(&self, rng: &mut R, mut p: Policy) -> Policy {
        let Some(g) = self.fusion.choose(rng) else { return p };
        let mut groups: Vec<FusionGroup> = self.fused_groups(&p).into_iter().map(|c| c.group()).collect();
        let mut training = p.fusion.as_ref().and_then(|f| f.training);
        if !groups.is_empty() && rng.random_bool(0.15) {
            training = if training == Some(false) { None } else { Some(false) };
        } else if let Some(i) = groups.iter().position(|x| g.is(x)) {
            groups.remove(i);
        } else {
            groups.push(g.group());
        }
        p.fusion = (!groups.is_empty()).then_some(Fusion { groups, training });
        p
    }

    /// The (M, N, K) a rule is mainly about: the largest workload M and shape (under `p`) it matches.
    fn rule_dims(&self, r: &Rule, p: &Policy) -> (u64, u64, u64) {
        let mut best = (1, 1, 1);
        for (w, s) in self.matmuls_for(p) {
            if r.matches(w.m, s.n, s.k) && w.m * s.n * s.k >= best.0 * best.1 * best.2 {
                best = (w.m, s.n, s.k);
            }
        }
        if best == (1, 1, 1) {
            let s = self.shapes.first();
            best = (r.m.map_or(1, |m| m.0), s.map_or(1, |s| s.n), s.map_or(1, |s| s.k));
        }
        best
    }

    /// Uniform crossover of two rule lists (rules kept in order, each taken from either parent).
    pub fn crossover<R: Rng>(&self, rng: &mut R, a: &Policy, b: &Policy) -> Policy {
        let mut rules = Vec::new();
        for r in a.matmul.rules.iter().chain(b.matmul.rules.iter()) {
            if rng.random_bool(0.5) && !rules.iter().any(|x: &Rule| x.m == r.m && x.n == r.n && x.k == r.k) {
                rules.push(r.clone());
            }
        }
        let default = if rng.random_bool(0.5) { a.matmul.default.clone() } else { b.matmul.default.clone() };
        let mut c = a.clone();
        c.matmul.rules = rules;
        c.matmul.default = default;
        // Each group the parents disagree on comes from either parent.
        let (fa, fb) = (self.fused_groups(a), self.fused_groups(b));
        let groups: Vec<FusionGroup> = self
            .fusion
            .iter()
            .filter(|g| match (fa.contains(g), fb.contains(g)) {
                (true, true) => true,
                (false, false) => false,
                _ => rng.random_bool(0.5),
            })
            .map(|g| g.group())
            .collect();
        let training = if rng.random_bool(0.5) { a.fusion.as_ref() } else { b.fusion.as_ref() }.and_then(|f| f.training);
        c.fusion = (!groups.is_empty()).then_some(Fusion { groups, training });
        c
    }

    /// A policy's name after an operator (names are part of the content hash; keep them short).
    pub fn named(&self, mut p: Policy, label: String) -> Policy {
        p.name = Some(label);
        p
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    /// The tiny synthetic Qwen2's shapes (hidden 64, MLP 128, 4 heads / 2 KV heads of 16, vocab 1024).
    pub fn tiny_space(backend: &str) -> SearchSpace {
        SearchSpace {
            target: Target { device: "dev-test".into(), model: "mdl-test".into(), mlx: "0.32.4".into(), backend: backend.into() },
            shapes: vec![
                Shape { name: "o_proj+q_proj".into(), n: 64, k: 64, count: 4 },
                Shape { name: "k_proj+v_proj".into(), n: 32, k: 64, count: 4 },
                Shape { name: "gate_proj+up_proj".into(), n: 128, k: 64, count: 4 },
                Shape { name: "down_proj".into(), n: 64, k: 128, count: 2 },
                Shape { name: "embed_tokens.as_linear".into(), n: 1024, k: 64, count: 1 },
            ],
            workload: Workload::default_for(backend),
            chip: "x86_64 cpu".into(),
            dtype: if backend == "cpu" { "float32".into() } else { "bfloat16".into() },
            // In forward order, as the worker's trace reports them.
            fusion: vec![
                FusionCandidate {
                    scope: "model.layers.*.self_attn".into(),
                    members: vec!["q_proj".into(), "k_proj".into(), "v_proj".into()],
                    n: vec![64, 32, 32],
                    k: 64,
                    count: 2,
                },
                FusionCandidate {
                    scope: "model.layers.*.mlp".into(),
                    members: vec!["gate_proj".into(), "up_proj".into()],
                    n: vec![128, 128],
                    k: 64,
                    count: 2,
                },
            ],
        }
    }

    #[test]
    fn bands_cover_every_m_once() {
        let s = tiny_space("cpu");
        let bands = s.m_bands();
        assert_eq!(bands.iter().map(|b| b.0).collect::<Vec<_>>(), vec![1, 63, 128]);
        for m in 1..5000 {
            assert_eq!(bands.iter().filter(|(_, r)| r.contains(m)).count(), 1, "m={m}");
        }
    }

    #[test]
    fn non_splitting_tiles_are_native() {
        let p = Plan::Split { tile_m: Some(512), tile_n: Some(64), tile_k: None };
        assert_eq!(effective_plan(&p, 63, 64, 64), Plan::Native);
        assert_eq!(effective_plan(&p, 600, 64, 64), Plan::Split { tile_m: Some(512), tile_n: None, tile_k: None });
    }

    #[test]
    fn seeds_are_valid_and_the_heuristic_splits_something() {
        let s = tiny_space("cpu");
        assert!(s.validated(s.native()).is_some());
        let h = s.validated(s.seed_heuristic()).expect("heuristic policy validates");
        assert!(!h.matmul.rules.is_empty());
        assert!(!s.is_effectively_stock(&h), "the heuristic splits the output head at least");
        // Decode stays native.
        assert_eq!(effective_plan(h.plan_for(1, 1024, 64), 1, 1024, 64), Plan::Native);
    }

    #[test]
    fn mutations_and_crossover_keep_policies_valid() {
        for backend in ["cpu", "cuda"] {
            let s = tiny_space(backend);
            let mut rng = ChaCha8Rng::seed_from_u64(1);
            let mut pop = vec![s.native(), s.seed_heuristic()];
            let mut invalid = 0;
            let mut kinds = std::collections::BTreeSet::new();
            for i in 0..600 {
                let a = pop[rng.random_range(0..pop.len())].clone();
                let child = if i % 5 == 0 {
                    let b = pop[rng.random_range(0..pop.len())].clone();
                    s.crossover(&mut rng, &a, &b)
                } else {
                    s.mutate(&mut rng, &a).0
                };
                match s.validated(s.prune(child)) {
                    Some(c) => {
                        assert!(c.matmul.rules.len() <= MAX_RULES);
                        for r in &c.matmul.rules {
                            kinds.insert(r.plan.kind());
                        }
                        pop.push(c);
                    }
                    None => invalid += 1,
                }
            }
            // Operators only build valid documents; validation is a guard, not a filter doing work.
            assert_eq!(invalid, 0, "{backend}");
            assert!(kinds.contains("split"));
            assert_eq!(kinds.contains("kernel"), backend == "cuda", "{backend}: {kinds:?}");
            for p in &pop {
                for r in &p.matmul.rules {
                    if let Plan::Kernel(k) = &r.plan {
                        assert!(kernel_plan_ok(k, s.itemsize()), "{k:?}");
                    }
                }
            }
        }
    }

    /// Qwen2.5-0.5B's shapes and the groups its trace finds (24 layers, tied head).
    fn qwen_space() -> SearchSpace {
        let mut s = tiny_space("cuda");
        s.shapes = vec![
            Shape { name: "o_proj+q_proj".into(), n: 896, k: 896, count: 48 },
            Shape { name: "k_proj+v_proj".into(), n: 128, k: 896, count: 48 },
            Shape { name: "gate_proj+up_proj".into(), n: 4864, k: 896, count: 48 },
            Shape { name: "down_proj".into(), n: 896, k: 4864, count: 24 },
            Shape { name: "embed_tokens.as_linear".into(), n: 151936, k: 896, count: 1 },
        ];
        s.fusion = vec![
            FusionCandidate {
                scope: "model.layers.*.self_attn".into(),
                members: vec!["q_proj".into(), "k_proj".into(), "v_proj".into()],
                n: vec![896, 128, 128],
                k: 896,
                count: 24,
            },
            FusionCandidate {
                scope: "model.layers.*.mlp".into(),
                members: vec!["gate_proj".into(), "up_proj".into()],
                n: vec![4864, 4864],
                k: 896,
                count: 24,
            },
        ];
        s
    }

    #[test]
    fn fused_shapes_replace_their_members() {
        let s = qwen_space();
        let all = s.fusion_seeds().remove(0);
        assert_eq!(s.calls_per_token(&s.native()), (169, 169));
        assert_eq!(s.calls_per_token(&all), (169, 97));
        assert_eq!(
            s.describe(&all),
            (
                "q/k/v fused, gate/up fused: 169 → 97 matmuls per token".to_string(),
                vec!["q/k/v".to_string(), "gate/up".to_string()],
                [169, 97]
            )
        );
        assert_eq!(s.describe(&s.native()).0, "native plans");
        let mut with_rule = all.clone();
        with_rule.matmul.rules.push(Rule {
            m: Some(Range(2, None)),
            n: None,
            k: None,
            plan: Plan::Split { tile_m: Some(64), tile_n: None, tile_k: None },
        });
        with_rule.fusion.as_mut().unwrap().training = Some(false);
        assert_eq!(s.describe(&with_rule).0, "q/k/v fused, gate/up fused (inference only): 169 → 97 matmuls per token; 1 plan rule");
        let shapes = s.shapes_for(&all);
        let find = |n, k| shapes.iter().find(|x| x.n == n && x.k == k).map(|x| x.count);
        assert_eq!(find(896, 896), Some(24), "o_proj stays");
        assert_eq!(find(128, 896), None, "k and v are gone");
        assert_eq!(find(1152, 896), Some(24));
        assert_eq!(find(9728, 896), Some(24));
        // Fusion changes behaviour; a group the model does not have does not.
        assert!(!s.is_effectively_stock(&all));
        assert_ne!(s.behaviour_key(&all), s.behaviour_key(&s.native()));
        let mut foreign = s.native();
        foreign.fusion =
            Some(Fusion { groups: vec![FusionGroup { scope: "x.*".into(), members: vec!["a".into(), "b".into()] }], training: None });
        assert!(s.is_effectively_stock(&foreign));
        assert!(s.prune(foreign).fusion.is_none(), "prune drops groups the model does not have");
        // Seeds: all groups, then each alone; all valid.
        let seeds = s.fusion_seeds();
        assert_eq!(seeds.len(), 3);
        for p in seeds {
            let v = s.validated(s.prune(p)).expect("seed validates");
            assert!(!v.fusion_groups().is_empty());
        }
        // An inference-only fusion is another behaviour.
        let mut inf_only = s.fusion_seeds().remove(0);
        inf_only.fusion.as_mut().unwrap().training = Some(false);
        assert_ne!(s.behaviour_key(&inf_only), s.behaviour_key(&s.fusion_seeds()[0]));
    }

    #[test]
    fn mutation_reaches_fusion_and_rules_for_fused_shapes() {
        let s = qwen_space();
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let mut p = s.native();
        let (mut fused, mut fused_rule) = (false, false);
        for _ in 0..400 {
            let (c, _) = s.mutate(&mut rng, &p);
            let c = s.validated(s.prune(c)).expect("valid");
            fused |= !c.fusion_groups().is_empty();
            fused_rule |= c.matmul.rules.iter().any(|r| r.n == Some(Range(1152, Some(1152))) || r.n == Some(Range(9728, Some(9728))));
            p = c;
        }
        assert!(fused && fused_rule, "fused {fused}, rule for a fused shape {fused_rule}");
    }

    #[test]
    fn features_measure_non_native_share() {
        let s = tiny_space("cpu");
        assert_eq!(s.features(&s.native()), (0.0, 0.0));
        let all = s.policy("all", vec![], Plan::Split { tile_m: None, tile_n: Some(16), tile_k: None });
        let (share, tile) = s.features(&all);
        assert!((share - 1.0).abs() < 1e-9, "{share}");
        assert!((tile - 4.0).abs() < 1e-9, "{tile}");
    }
}
