//! The cost model: predicts a candidate's speedup from per-shape timings in the shape memo, so only
//! candidates predicted to win pay for an end-to-end evaluation (the cascade).
//!
//! Predicted workload time = Σ over the workload's matmuls of weight × layers × time(M, N, K, plan).
//! A memo entry holds a paired stock/plan measurement of one (M, N, K, dtype, plan); a plan's time is
//! the entry's stock median divided by its paired ratio (so the pairing's noise cancellation is kept),
//! and a native matmul's time is the stock median of that shape. The prediction covers matmul time
//! only (attention, norms and sampling are the same in both arms), so it overstates the size of a
//! change but not its sign — good enough to screen, never used to promote.

use super::space::{effective_plan, plan_hash, SearchSpace};
use crate::policy::{Plan, Policy};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// One memo timing (from `store::MemoEntry`, reduced to what prediction needs).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ShapeTiming {
    pub stock_median_s: f64,
    pub ratio: f64,
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
        self.entries.range((m, n, k, String::new())..).take_while(|(key, _)| (key.0, key.1, key.2) == (m, n, k)).map(|(_, t)| t.stock_median_s).next()
    }

    /// Shape measurements missing to predict `p`: a native entry for every matmul whose stock time is
    /// unknown, and an entry for every (matmul, non-native plan) not yet timed.
    pub fn needed(&self, space: &SearchSpace, p: &Policy) -> Vec<Needed> {
        let mut out = Vec::new();
        let mut seen = BTreeSet::new();
        for (w, s) in space.matmuls() {
            let plan = effective_plan(p.plan_for(w.m, s.n, s.k), w.m, s.n, s.k);
            let mut want = |plan: Plan| {
                let key = (w.m, s.n, s.k, plan_hash(&plan));
                if !self.entries.contains_key(&key) && seen.insert(key) {
                    out.push(Needed { m: w.m, n: s.n, k: s.k, plan });
                }
            };
            if self.stock_s(w.m, s.n, s.k).is_none() {
                want(Plan::Native);
            }
            if plan != Plan::Native {
                want(plan);
            }
        }
        out
    }

    /// Predicted speedup of `p`, or `None` while a needed entry is missing.
    pub fn predict(&self, space: &SearchSpace, p: &Policy) -> Option<Prediction> {
        let (mut inf, mut trn) = ((0.0, 0.0), (0.0, 0.0)); // (stock, candidate) seconds
        for (w, s) in space.matmuls() {
            let stock = self.stock_s(w.m, s.n, s.k)?;
            let plan = effective_plan(p.plan_for(w.m, s.n, s.k), w.m, s.n, s.k);
            let cand = if plan == Plan::Native {
                stock
            } else {
                let t = self.get(w.m, s.n, s.k, &plan)?;
                t.stock_median_s / t.ratio.max(1e-9)
            };
            let scale = w.weight * s.count as f64;
            let acc = if w.training { &mut trn } else { &mut inf };
            acc.0 += scale * stock;
            acc.1 += scale * cand;
        }
        let ratio = |(s, c): (f64, f64)| (c > 0.0).then(|| s / c);
        let (i, t) = (ratio(inf), ratio(trn));
        // Same weighting as the worker's `combined` (a missing workload gets weight 0).
        let combined = match (i, t) {
            (Some(i), Some(t)) => 0.7 * i + 0.3 * t,
            (Some(x), None) | (None, Some(x)) => x,
            (None, None) => 1.0,
        };
        Some(Prediction { inference: i, training: t, combined })
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
            memo.insert(n.m, n.n, n.k, n.plan_hash(), ShapeTiming { stock_median_s: (n.m * n.n * n.k) as f64 * 1e-9, ratio: 1.0 });
        }
        assert_eq!(memo.predict(&s, &native).unwrap().combined, 1.0);

        // A policy that splits only the output head at prefill: needs that one entry.
        let head = crate::policy::Rule {
            m: Some(crate::policy::Range(2, Some(95))),
            n: Some(crate::policy::Range(1024, Some(1024))),
            k: None,
            plan: Plan::Split { tile_m: None, tile_n: Some(256), tile_k: None },
        };
        let p = s.policy("head", vec![head], Plan::Native);
        let needed = memo.needed(&s, &p);
        assert_eq!(needed.len(), 1);
        assert_eq!((needed[0].m, needed[0].n), (63, 1024));
        memo.insert(63, 1024, 64, needed[0].plan_hash(), ShapeTiming { stock_median_s: 63.0 * 1024.0 * 64.0 * 1e-9, ratio: 2.0 });
        let pred = memo.predict(&s, &p).unwrap();
        assert!(pred.inference.unwrap() > 1.0 && pred.training.unwrap() == 1.0, "{pred:?}");
        assert!(pred.combined > 1.0);
        // The same split, but twice as slow: predicted to lose.
        memo.insert(63, 1024, 64, needed[0].plan_hash(), ShapeTiming { stock_median_s: 63.0 * 1024.0 * 64.0 * 1e-9, ratio: 0.5 });
        assert!(memo.predict(&s, &p).unwrap().combined < 1.0);
    }
}
