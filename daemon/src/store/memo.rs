//! The shape memo: how long one (M, N, K, dtype) matmul takes under one plan on this device and MLX
//! version, next to stock. It predicts a candidate's cost without an end-to-end run.

use super::{json_col, now, to_json, Result, Store};
use rusqlite::{params, OptionalExtension, Row};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// One memo row. The key is (device, mlx, backend, m, n, k, dtype, plan_hash).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemoEntry {
    pub device: String,
    pub mlx: String,
    pub backend: String,
    pub m: u64,
    pub n: u64,
    pub k: u64,
    pub dtype: String,
    /// `sha256:` of the plan's canonical JSON.
    pub plan_hash: String,
    pub plan: Value,
    pub stock_median_s: f64,
    pub plan_median_s: f64,
    /// Median of per-pair stock/plan ratios (> 1: the plan is faster).
    pub ratio: f64,
    pub lo: Option<f64>,
    pub hi: Option<f64>,
    /// Number of pairs behind the figures.
    pub samples: u32,
    /// Set by the store on write.
    #[serde(default)]
    pub updated_at: String,
}

fn memo_from_row(r: &Row<'_>) -> rusqlite::Result<MemoEntry> {
    Ok(MemoEntry {
        device: r.get("device")?,
        mlx: r.get("mlx")?,
        backend: r.get("backend")?,
        m: r.get("m")?,
        n: r.get("n")?,
        k: r.get("k")?,
        dtype: r.get("dtype")?,
        plan_hash: r.get("plan_hash")?,
        plan: json_col(r, "plan_json")?,
        stock_median_s: r.get("stock_median_s")?,
        plan_median_s: r.get("plan_median_s")?,
        ratio: r.get("ratio")?,
        lo: r.get("lo")?,
        hi: r.get("hi")?,
        samples: r.get("samples")?,
        updated_at: r.get("updated_at")?,
    })
}

impl Store {
    /// Inserts or replaces the memo row with this key.
    pub fn upsert_memo(&self, e: &MemoEntry) -> Result<()> {
        self.conn.execute(
            "INSERT INTO shape_memo (device, mlx, backend, m, n, k, dtype, plan_hash, plan_json, stock_median_s,
                                     plan_median_s, ratio, lo, hi, samples, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)
             ON CONFLICT (device, mlx, backend, m, n, k, dtype, plan_hash) DO UPDATE SET
               plan_json = excluded.plan_json, stock_median_s = excluded.stock_median_s,
               plan_median_s = excluded.plan_median_s, ratio = excluded.ratio, lo = excluded.lo,
               hi = excluded.hi, samples = excluded.samples, updated_at = excluded.updated_at",
            params![
                e.device,
                e.mlx,
                e.backend,
                e.m,
                e.n,
                e.k,
                e.dtype,
                e.plan_hash,
                to_json(&e.plan)?,
                e.stock_median_s,
                e.plan_median_s,
                e.ratio,
                e.lo,
                e.hi,
                e.samples,
                now()
            ],
        )?;
        Ok(())
    }

    /// The memo row for one shape and plan, if measured.
    #[allow(clippy::too_many_arguments)]
    pub fn memo(
        &self,
        device: &str,
        mlx: &str,
        backend: &str,
        m: u64,
        n: u64,
        k: u64,
        dtype: &str,
        plan_hash: &str,
    ) -> Result<Option<MemoEntry>> {
        Ok(self
            .conn
            .query_row(
                "SELECT * FROM shape_memo WHERE device = ?1 AND mlx = ?2 AND backend = ?3 AND m = ?4 AND n = ?5
                 AND k = ?6 AND dtype = ?7 AND plan_hash = ?8",
                params![device, mlx, backend, m, n, k, dtype, plan_hash],
                memo_from_row,
            )
            .optional()?)
    }

    /// Every memo row for a device + MLX version + backend.
    pub fn memo_for(&self, device: &str, mlx: &str, backend: &str) -> Result<Vec<MemoEntry>> {
        let mut st = self.conn.prepare_cached(
            "SELECT * FROM shape_memo WHERE device = ?1 AND mlx = ?2 AND backend = ?3 ORDER BY m, n, k, dtype, plan_hash",
        )?;
        let rows = st.query_map(params![device, mlx, backend], memo_from_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Number of memo rows for a device + MLX version + backend.
    pub fn memo_size(&self, device: &str, mlx: &str, backend: &str) -> Result<u64> {
        Ok(self.conn.query_row(
            "SELECT count(*) FROM shape_memo WHERE device = ?1 AND mlx = ?2 AND backend = ?3",
            params![device, mlx, backend],
            |r| r.get(0),
        )?)
    }
}
