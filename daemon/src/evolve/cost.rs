//! The cost model: predicts a candidate's speedup from per-shape timings in the shape memo, so only
//! candidates predicted to win pay for an end-to-end evaluation (the cascade).
//!
//! Predicted workload time = Σ over the workload's matmuls of weight × layers × time(M, N, K, plan).
//! A memo entry holds a paired stock/plan measurement of one (M, N, K, dtype, plan); a plan's time is
//! the entry's stock median divided by its paired ratio (so the pairing's noise cancellation is kept),
//! and a native matmul's time is the stock median of that shape. The prediction covers matmul time
//! only (attention, norms and sampling are the same in both arms), so it overstates the size of a
//! change but not its sign — good enough to screen, never used to promote.
//!
//! Each memo entry also carries the bootstrap interval of its paired ratio. The prediction `lo` puts
//! every non-native shape at the slow end of its interval (time = stock / lo): a candidate whose
//! predicted gain rests on shape timings that are within their own noise gets `lo` ≤ 1.0, and the
//! session does not spend an end-to-end run on it. (Taking every shape's bound at once is more
//! conservative than a joint interval would be; it is a screen, and a true win of a few per cent per
//! shape survives it because the shape intervals are narrow — microbenchmarks of one matmul.)

use super::space::{effective_plan, plan_hash, SearchSpace};
use crate::policy::{Plan, Policy};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// One memo timing (from `store::MemoEntry`, reduced to what prediction needs).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ShapeTiming {
    pub stock_median_s: f64,
    pub ratio: f64,
    /// Lower end of the ratio's 95 % interval; `None` (an entry stored without one) counts as `ratio`.
    #[serde(default)]
    pub lo: Option<f64>,
}

impl ShapeTiming {
    /// The ratio at the slow end of its interval (never above the point estimate).
    fn conservative_ratio(&self) -> f64 {
        self.lo.map_or(self.ratio, |lo| lo.min(self.ratio))
    }
}

/// The memo entries of one (device, mlx, backend, dtype), keyed by (m, n, k, plan_hash).
#[derive(Debug, Clone, Default)]
pub struct Memo {
    entries: BTreeMap<(u64, u64, u64, String), ShapeTiming>,
}

/// One shape measurement the worker must run before a candidate can be predicted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Needed {
    pub m: u64,
    pub n: u64,
    pub k: u64,
    pub plan: Plan,
}

impl Needed {
    pub fn plan_hash(&self) -> String {
        plan_hash(&self.plan)
    }
}

/// Predicted speedups (stock time / candidate time) per workload and combined 0.7 / 0.3.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Prediction {
    pub inference: Option<f64>,
    pub training: Option<f64>,
    pub combined: f64,
    /// `combined` with every non-native shape at the lower end of its interval (see the module doc).
    pub lo: f64,
}

impl Prediction {
    /// Worth an end-to-end run: the point prediction clears `threshold` and the predicted gain
    /// survives the shapes' own noise (`lo` > 1.0).
    pub fn earns_evaluation(&self, threshold: f64) -> bool {
        self.combined > threshold && self.lo > 1.0
    }
}

/// How far this session's predictions have overstated the end-to-end result: the cost model times
/// single matmuls, the session measures the whole model with the policy applied as it ships (patched
/// layers, dispatch, memory traffic between layers), and on some machines the two disagree by more
/// than the screen's margin. Each end-to-end first measurement adds (predicted, measured); once
/// `MIN_SAMPLES` are in, the median overstatement (never negative: an understating model is not
/// made more generous) is taken off every prediction before the screen decides. Saved with the
/// session so a resume screens the same way.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Calibration {
    /// (predicted combined, measured combined ratio), newest last, at most `WINDOW`.
    pub pairs: Vec<(f64, f64)>,
    /// Candidates the raw prediction would have sent on but the correction held back.
    #[serde(default)]
    pub held_back: u64,
}

impl Calibration {
    pub const MIN_SAMPLES: usize = 5;
    pub const WINDOW: usize = 50;
    /// Every this many candidates held back by the correction alone, one is measured anyway.
    ///
    /// Why: the correction is learned only from candidates that pass the screen, which are the
    /// ones the cost model rates highest — the search selects for its own prediction errors, so
    /// their overstatement is the largest (winner's curse), the correction grows on itself, and a
    /// modest real win would end up held back for good. Measuring some candidates from just below
    /// the corrected bar keeps the estimate honest and gives such a win a way through.
    pub const EXPLORE_EVERY: u64 = 5;

    /// Call for a candidate the raw prediction passes but the corrected one does not: true when
    /// this one should be measured anyway (every `EXPLORE_EVERY`-th; deterministic, so a resumed
    /// session decides the same way).
    pub fn explore(&mut self) -> bool {
        self.held_back += 1;
        self.held_back.is_multiple_of(Self::EXPLORE_EVERY)
    }

    pub fn record(&mut self, predicted: f64, measured: f64) {
        if !(predicted.is_finite() && measured.is_finite()) {
            return;
        }
        self.pairs.push((predicted, measured));
        if self.pairs.len() > Self::WINDOW {
            self.pairs.remove(0);
        }
    }

    /// The median overstatement, 0.0 until there are `MIN_SAMPLES`.
    pub fn bias(&self) -> f64 {
        if self.pairs.len() < Self::MIN_SAMPLES {
            return 0.0;
        }
        let mut d: Vec<f64> = self.pairs.iter().map(|(p, m)| p - m).collect();
        d.sort_by(|a, b| a.total_cmp(b));
        let n = d.len();
        let med = if n % 2 == 1 { d[n / 2] } else { 0.5 * (d[n / 2 - 1] + d[n / 2]) };
        med.max(0.0)
    }

    /// `p` with the bias taken off both its point and its conservative bound.
    pub fn apply(&self, p: Prediction) -> Prediction {
        let b = self.bias();
        Prediction { combined: p.combined - b, lo: p.lo - b, ..p }
    }
}

/// 0.7 × inference + 0.3 × training, as the worker's `combined` (a missing workload gets weight 0).
fn combine(i: Option<f64>, t: Option<f64>) -> f64 {
    match (i, t) {
        (Some(i), Some(t)) => 0.7 * i + 0.3 * t,
        (Some(x), None) | (None, Some(x)) => x,
        (None, None) => 1.0,
    }
}

/// The matmuls the candidate arm runs under `p`: its fused shapes, except in the training workload
/// when the fusion is for inference only (then that workload keeps the stock shapes).
fn candidate_matmuls(space: &SearchSpace, p: &Policy) -> Vec<(super::space::WorkM, super::space::Shape)> {
    let inference_only = p.fusion.as_ref().is_some_and(|f| !f.fuses_training());
    if !inference_only {
        return space.matmuls_for(p);
    }
    let mut unfused = p.clone();
    unfused.fusion = None;
    let inference = space.matmuls_for(p).into_iter().filter(|(w, _)| !w.training);
    inference.chain(space.matmuls_for(&unfused).into_iter().filter(|(w, _)| w.training)).collect()
}

impl Memo {
    pub fn insert(&mut self, m: u64, n: u64, k: u64, plan_hash: String, t: ShapeTiming) {
        self.entries.insert((m, n, k, plan_hash), t);
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn get(&self, m: u64, n: u64, k: u64, plan: &Plan) -> Option<&ShapeTiming> {
        self.entries.get(&(m, n, k, plan_hash(plan)))
    }

    /// Stock time of a shape: its native entry, else the stock arm of any entry of that shape.
    fn stock_s(&self, m: u64, n: u64, k: u64) -> Option<f64> {
        if let Some(t) = self.get(m, n, k, &Plan::Native) {
            return Some(t.stock_median_s);
        }
        self.entries
            .range((m, n, k, String::new())..)
            .take_while(|(key, _)| (key.0, key.1, key.2) == (m, n, k))
            .map(|(_, t)| t.stock_median_s)
            .next()
    }

    /// Shape measurements missing to predict `p`: a native entry for every matmul whose stock time is
    /// unknown, and an entry for every (matmul, non-native plan) not yet timed.
    pub fn needed(&self, space: &SearchSpace, p: &Policy) -> Vec<Needed> {
        let mut out = Vec::new();
        let mut seen = BTreeSet::new();
        let mut want = |m: u64, n: u64, k: u64, plan: Plan| {
            let key = (m, n, k, plan_hash(&plan));
            if !self.entries.contains_key(&key) && seen.insert(key) {
                out.push(Needed { m, n, k, plan });
            }
        };
        // The stock model's shapes (stock time) and `p`'s shapes (fused ones included).
        for (w, s) in space.matmuls_for(&space.native()) {
            if self.stock_s(w.m, s.n, s.k).is_none() {
                want(w.m, s.n, s.k, Plan::Native);
            }
        }
        for (w, s) in candidate_matmuls(space, p) {
            let plan = effective_plan(p.plan_for(w.m, s.n, s.k), w.m, s.n, s.k);
            if plan != Plan::Native {
                want(w.m, s.n, s.k, plan);
            } else if self.stock_s(w.m, s.n, s.k).is_none() {
                want(w.m, s.n, s.k, Plan::Native);
            }
        }
        out
    }

    /// Predicted speedup of `p`, or `None` while a needed entry is missing.
    pub fn predict(&self, space: &SearchSpace, p: &Policy) -> Option<Prediction> {
        // (stock, candidate, candidate at the slow end of each shape's interval) seconds
        let (mut inf, mut trn) = ((0.0, 0.0, 0.0), (0.0, 0.0, 0.0));
        for (w, s) in space.matmuls_for(&space.native()) {
            let acc = if w.training { &mut trn } else { &mut inf };
            acc.0 += w.weight * s.count as f64 * self.stock_s(w.m, s.n, s.k)?;
        }
        for (w, s) in candidate_matmuls(space, p) {
            let stock = self.stock_s(w.m, s.n, s.k)?;
            let plan = effective_plan(p.plan_for(w.m, s.n, s.k), w.m, s.n, s.k);
            let (cand, slow) = if plan == Plan::Native {
                (stock, stock)
            } else {
                let t = self.get(w.m, s.n, s.k, &plan)?;
                (t.stock_median_s / t.ratio.max(1e-9), t.stock_median_s / t.conservative_ratio().max(1e-9))
            };
            let scale = w.weight * s.count as f64;
            let acc = if w.training { &mut trn } else { &mut inf };
            acc.1 += scale * cand;
            acc.2 += scale * slow;
        }
        let ratio = |s: f64, c: f64| (c > 0.0).then(|| s / c);
        let (i, t) = (ratio(inf.0, inf.1), ratio(trn.0, trn.1));
        let (i_lo, t_lo) = (ratio(inf.0, inf.2), ratio(trn.0, trn.2));
        Some(Prediction { inference: i, training: t, combined: combine(i, t), lo: combine(i_lo, t_lo) })
    }
}

#[cfg(test)]
mod tests {
    use super::super::space::tests::tiny_space;
    use super::*;

    #[test]
    fn needs_then_predicts() {
        let s = tiny_space("cpu");
        let mut memo = Memo::default();
        let native = s.native();
        let needed = memo.needed(&s, &native);
        // One native entry per (M, shape): 3 M values × 5 shapes.
        assert_eq!(needed.len(), 15);
        assert!(memo.predict(&s, &native).is_none());
        for n in &needed {
            memo.insert(
                n.m,
                n.n,
                n.k,
                n.plan_hash(),
                ShapeTiming { stock_median_s: (n.m * n.n * n.k) as f64 * 1e-9, ratio: 1.0, lo: Some(0.97) },
            );
        }
        assert_eq!(memo.predict(&s, &native).unwrap().combined, 1.0);

        // A policy that splits only the output head at prefill: needs that one entry.
        let p = head_split_policy(&s);
        let needed = memo.needed(&s, &p);
        assert_eq!(needed.len(), 1);
        assert_eq!((needed[0].m, needed[0].n), (63, 1024));
        memo.insert(63, 1024, 64, needed[0].plan_hash(), ShapeTiming { stock_median_s: 63.0 * 1024.0 * 64.0 * 1e-9, ratio: 2.0, lo: None });
        let pred = memo.predict(&s, &p).unwrap();
        assert!(pred.inference.unwrap() > 1.0 && pred.training.unwrap() == 1.0, "{pred:?}");
        assert!(pred.combined > 1.0);
        // The same split, but twice as slow: predicted to lose.
        memo.insert(63, 1024, 64, needed[0].plan_hash(), ShapeTiming { stock_median_s: 63.0 * 1024.0 * 64.0 * 1e-9, ratio: 0.5, lo: None });
        assert!(memo.predict(&s, &p).unwrap().combined < 1.0);
    }

    #[test]
    fn fusion_is_predicted_from_the_fused_shapes() {
        // Per-call cost dominates: every matmul takes 10 µs plus a little per output row.
        let time = |n: u64| 10e-6 + n as f64 * 1e-9;
        let s = tiny_space("cpu");
        let fused = s.fusion_seeds().remove(0);
        let mut memo = Memo::default();
        for n in memo.needed(&s, &s.native()) {
            memo.insert(n.m, n.n, n.k, n.plan_hash(), ShapeTiming { stock_median_s: time(n.n), ratio: 1.0, lo: Some(0.98) });
        }
        assert!(memo.predict(&s, &fused).is_none(), "the fused shapes are not timed yet");
        let needed = memo.needed(&s, &fused);
        let mut ns: Vec<u64> = needed.iter().map(|n| n.n).collect();
        ns.sort_unstable();
        ns.dedup();
        // gate|up (128+128); q|k|v (64+32+32 = 128) has the shape gate and up have, timed already.
        assert_eq!(ns, vec![256]);
        assert!(needed.iter().all(|n| n.plan == Plan::Native));
        for n in needed {
            memo.insert(n.m, n.n, n.k, n.plan_hash(), ShapeTiming { stock_median_s: time(n.n), ratio: 1.0, lo: Some(0.98) });
        }
        let pred = memo.predict(&s, &fused).unwrap();
        assert!(pred.combined > 1.2 && pred.lo == pred.combined, "{pred:?}");
        // Inference-only: the training workload keeps its stock shapes.
        let mut inf_only = fused.clone();
        inf_only.fusion.as_mut().unwrap().training = Some(false);
        let p2 = memo.predict(&s, &inf_only).unwrap();
        assert_eq!(p2.training, Some(1.0));
        assert_eq!(p2.inference, pred.inference);
    }

    /// The policy that splits only the output head at prefill (N = 1024, M 2..=95) into 256 columns.
    fn head_split_policy(s: &SearchSpace) -> Policy {
        let head = crate::policy::Rule {
            m: Some(crate::policy::Range(2, Some(95))),
            n: Some(crate::policy::Range(1024, Some(1024))),
            k: None,
            plan: Plan::Split { tile_m: None, tile_n: Some(256), tile_k: None },
        };
        s.policy("head", vec![head], Plan::Native)
    }

    /// A memo where every native shape is timed and the output head at prefill has one split plan
    /// with the given (ratio, lo); returns the policy that uses that plan.
    fn head_memo(ratio: f64, lo: Option<f64>) -> (SearchSpace, Memo, Policy) {
        let s = tiny_space("cpu");
        let mut memo = Memo::default();
        for n in memo.needed(&s, &s.native()) {
            memo.insert(
                n.m,
                n.n,
                n.k,
                n.plan_hash(),
                ShapeTiming { stock_median_s: (n.m * n.n * n.k) as f64 * 1e-9, ratio: 1.0, lo: Some(0.9) },
            );
        }
        let p = head_split_policy(&s);
        let needed = memo.needed(&s, &p);
        assert_eq!(needed.len(), 1);
        memo.insert(63, 1024, 64, needed[0].plan_hash(), ShapeTiming { stock_median_s: 63.0 * 1024.0 * 64.0 * 1e-9, ratio, lo });
        (s, memo, p)
    }

    #[test]
    fn a_gain_inside_the_shape_noise_does_not_earn_an_evaluation() {
        // A 10 % faster head whose interval reaches down to 0.95: the point prediction clears the
        // threshold, the conservative one does not.
        let (s, memo, p) = head_memo(1.10, Some(0.95));
        let pred = memo.predict(&s, &p).unwrap();
        assert!(pred.combined > 1.02, "{pred:?}");
        assert!(pred.lo < 1.0, "{pred:?}");
        assert!(!pred.earns_evaluation(1.02));

        // The same point estimate with a tight interval (lo 1.08) does.
        let (s, memo, p) = head_memo(1.10, Some(1.08));
        let pred = memo.predict(&s, &p).unwrap();
        assert!(pred.lo > 1.0 && pred.lo < pred.combined, "{pred:?}");
        assert!(pred.earns_evaluation(1.02));

        // Native shapes' intervals do not matter (native is never the candidate's risk), and an
        // entry stored without an interval counts at its point estimate.
        let (s, memo, p) = head_memo(1.10, None);
        let pred = memo.predict(&s, &p).unwrap();
        assert_eq!(pred.lo, pred.combined);
        assert!(pred.earns_evaluation(1.02));
        assert_eq!(memo.predict(&s, &s.native()).unwrap().lo, 1.0);

        // A lo above the point estimate (not a bootstrap interval) never makes it look better.
        let (s, memo, p) = head_memo(1.01, Some(1.5));
        let pred = memo.predict(&s, &p).unwrap();
        assert_eq!(pred.lo, pred.combined);
        assert!(!pred.earns_evaluation(1.02));
    }

    #[test]
    fn calibration_measures_every_fifth_held_back_candidate_and_remembers_across_a_resume() {
        let mut c = Calibration::default();
        let picks: Vec<bool> = (0..10).map(|_| c.explore()).collect();
        assert_eq!(picks.iter().filter(|&&x| x).count(), 2);
        assert!(picks[4] && picks[9]);
        // Saved with the session: a resumed session continues the count (and an old saved
        // state without the field reads as zero).
        let saved: Calibration = serde_json::from_value(serde_json::to_value(&c).unwrap()).unwrap();
        assert_eq!(saved.held_back, 10);
        let old: Calibration = serde_json::from_value(serde_json::json!({"pairs": []})).unwrap();
        assert_eq!(old.held_back, 0);
    }

    #[test]
    fn calibration_takes_the_median_overstatement_off_once_it_has_evidence() {
        let p = Prediction { inference: Some(1.06), training: None, combined: 1.06, lo: 1.03 };
        let mut c = Calibration::default();
        for _ in 0..Calibration::MIN_SAMPLES - 1 {
            c.record(1.05, 0.97);
        }
        assert_eq!(c.bias(), 0.0, "too few samples to believe");
        assert!(c.apply(p).earns_evaluation(1.02));
        c.record(1.05, 0.97);
        assert!((c.bias() - 0.08).abs() < 1e-12);
        let q = c.apply(p);
        assert!((q.combined - 0.98).abs() < 1e-12 && (q.lo - 0.95).abs() < 1e-12);
        assert!(!q.earns_evaluation(1.02), "a predicted 6 % gain is within this session's usual overstatement");
        // A large predicted gain still earns its run.
        assert!(c.apply(Prediction { inference: Some(1.4), training: None, combined: 1.4, lo: 1.3 }).earns_evaluation(1.02));
        // Understatement is not rewarded; non-finite input is ignored; the window is bounded.
        let mut u = Calibration::default();
        for _ in 0..10 {
            u.record(1.0, 1.2);
        }
        u.record(f64::NAN, 1.0);
        assert_eq!(u.bias(), 0.0);
        assert_eq!(u.pairs.len(), 10);
        for _ in 0..100 {
            u.record(1.1, 1.0);
        }
        assert_eq!(u.pairs.len(), Calibration::WINDOW);
        assert!((u.bias() - 0.1).abs() < 1e-12);
    }
}
