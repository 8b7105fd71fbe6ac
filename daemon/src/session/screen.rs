//! Screening a candidate with the shape memo before an end-to-end run: the shape timings it lacks are
//! measured (and committed) first, then the cost model predicts.

use super::manager::str_field;
use super::run::{Requested, Runner};
use super::SessionError;
use crate::evolve::cost::{Memo, ShapeTiming};
use crate::policy::Policy;
use crate::store::MemoEntry;
use serde_json::{json, Value};
use std::time::Duration;

pub(super) enum Screen {
    Predicted(crate::evolve::cost::Prediction),
    Failed(String),
    Stopped,
}

impl Runner {
    pub(super) fn load_memo(&self) -> Result<Memo, SessionError> {
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

    /// Measures the memo entries `p` lacks (committing each), then predicts.
    pub(super) async fn screen(&mut self, p: &Policy) -> Result<Screen, SessionError> {
        let space = self.state.space.clone();
        let dtype = self.sup.loaded().map(|l| str_field(l, "dtype")).unwrap_or_else(|| "float32".into());
        loop {
            if let Some(pred) = self.memo.predict(&space, p) {
                return Ok(Screen::Predicted(pred));
            }
            let needed = self.memo.needed(&space, p);
            // Small batches: each batch's results are committed before the next is asked for.
            let batch: Vec<_> = needed.into_iter().take(8).collect();
            let items: Vec<Value> = batch.iter().map(|n| json!({"m": n.m, "n": n.n, "k": n.k, "dtype": dtype, "plan": n.plan})).collect();
            let req = json!({"items": items, "pairs": self.state.spec.shape_pairs, "warmup": 1});
            let timeout = Duration::from_secs(self.state.spec.evaluate_timeout_s);
            let result = match self.request("shapes", req, timeout).await {
                Requested::Stopped => return Ok(Screen::Stopped),
                Requested::Done(v) => v,
                Requested::Failed(e) => {
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
