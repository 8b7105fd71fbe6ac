//! The best proven policy per (device, model, mlx, backend), and the history of promotions.
//!
//! Only the promotion logic (evolve) decides what is proven; the store just records it atomically.

use super::{json_col, now, to_json, CandidateId, Result, SessionId, Store};
use rusqlite::{params, OptionalExtension, Row};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// What a best policy is for.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct BestKey {
    pub device: String,
    pub model: String,
    pub mlx: String,
    pub backend: String,
}

/// A promotion to record: the policy that is now best for `key`, and the evidence.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Promotion {
    pub key: BestKey,
    pub policy: Value,
    pub hash: String,
    pub ratio: f64,
    pub lo: f64,
    pub hi: f64,
    pub session_id: Option<SessionId>,
    pub candidate_id: Option<CandidateId>,
    /// What the policy does and what it measured, in words and per workload (`None` for promotions
    /// recorded before summaries existed, and for policies seeded by hand).
    pub summary: Option<PolicySummary>,
}

/// A proven policy in terms a user reads: what it changes and how much faster each workload ran.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicySummary {
    /// One line, e.g. `q/k/v fused, gate/up fused: 169 → 97 matmuls per token`.
    pub text: String,
    /// The fused sibling groups, short (`q/k/v`).
    #[serde(default)]
    pub fused: Vec<String>,
    /// Linear calls of one decode step: stock, then under the policy.
    #[serde(default)]
    pub matmuls_per_token: Option<[u64; 2]>,
    /// How many plan rules the policy has (0: fusion alone, or native plans only).
    #[serde(default)]
    pub rules: usize,
    /// The promoting measurement per workload: `inference`, `training`, and the phases of the
    /// generation, `prefill` and `decode` (each `{ratio, lo, hi}`).
    #[serde(default)]
    pub workloads: std::collections::BTreeMap<String, Interval>,
}

/// A median ratio stock/candidate with its bootstrap 95 % interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Interval {
    pub ratio: f64,
    pub lo: f64,
    pub hi: f64,
}

impl Interval {
    /// `+28.1 % [22.0, 31.2]`
    pub fn percent(&self) -> String {
        format!("{:+.1} % [{:.1}, {:.1}]", (self.ratio - 1.0) * 100.0, (self.lo - 1.0) * 100.0, (self.hi - 1.0) * 100.0)
    }
}

impl PolicySummary {
    /// The measured side in words: `decode +28.1 % [22.0, 31.2], prefill …, training …`.
    pub fn measured_text(&self) -> String {
        ["decode", "prefill", "inference", "training"]
            .iter()
            .filter_map(|k| self.workloads.get(*k).map(|i| format!("{k} {}", i.percent())))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The current best for a key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Best {
    pub key: BestKey,
    pub policy: Value,
    pub hash: String,
    pub ratio: f64,
    pub lo: f64,
    pub hi: f64,
    pub session_id: Option<SessionId>,
    pub candidate_id: Option<CandidateId>,
    pub promoted_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<PolicySummary>,
}

/// One past promotion (the `history` method serves these).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryEntry {
    pub id: i64,
    pub at: String,
    pub device: String,
    pub model: String,
    pub mlx: String,
    pub backend: String,
    pub hash: String,
    pub ratio: f64,
    pub lo: f64,
    pub hi: f64,
    pub session_id: Option<SessionId>,
    pub candidate_id: Option<CandidateId>,
    /// Hash of the best it replaced (`None` when it replaced native).
    pub replaced_hash: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<PolicySummary>,
}

/// The `summary_json` column (NULL for rows written before it existed; unreadable JSON reads as
/// none rather than failing the whole row: the summary is words, the row's numbers are the record).
fn summary_col(r: &Row<'_>, col: &str) -> rusqlite::Result<Option<PolicySummary>> {
    let text: Option<String> = r.get(col)?;
    Ok(text.and_then(|t| serde_json::from_str(&t).ok()))
}

fn best_from_row(r: &Row<'_>) -> rusqlite::Result<Best> {
    Ok(Best {
        key: BestKey { device: r.get("device")?, model: r.get("model")?, mlx: r.get("mlx")?, backend: r.get("backend")? },
        policy: json_col(r, "policy_json")?,
        hash: r.get("hash")?,
        ratio: r.get("ratio")?,
        lo: r.get("lo")?,
        hi: r.get("hi")?,
        session_id: r.get("session_id")?,
        candidate_id: r.get("candidate_id")?,
        promoted_at: r.get("promoted_at")?,
        summary: summary_col(r, "summary_json")?,
    })
}

impl Store {
    /// The best policy for `key`, if one was ever promoted.
    pub fn best(&self, key: &BestKey) -> Result<Option<Best>> {
        let mut st = self.conn.prepare_cached(
            "SELECT * FROM best WHERE device = ?1 AND model = ?2 AND mlx = ?3 AND backend = ?4",
        )?;
        Ok(st.query_row(params![key.device, key.model, key.mlx, key.backend], best_from_row).optional()?)
    }

    /// Makes `p` the best for its key, appends it to the history (with the hash it replaced) and
    /// counts it on its session — one transaction. Returns the history row id.
    pub fn promote(&self, p: &Promotion) -> Result<i64> {
        // Counted before trying: a failed attempt only costs a cache miss (see `BestStamp`).
        self.own_promotions.set(self.own_promotions.get() + 1);
        let tx = self.conn.unchecked_transaction()?;
        let at = now();
        let k = &p.key;
        let replaced: Option<String> = tx
            .query_row(
                "SELECT hash FROM best WHERE device = ?1 AND model = ?2 AND mlx = ?3 AND backend = ?4",
                params![k.device, k.model, k.mlx, k.backend],
                |r| r.get(0),
            )
            .optional()?;
        let policy_json = to_json(&p.policy)?;
        let summary_json = p.summary.as_ref().map(to_json).transpose()?;
        tx.execute(
            "INSERT INTO best (device, model, mlx, backend, hash, policy_json, ratio, lo, hi, session_id, candidate_id, promoted_at, summary_json)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)
             ON CONFLICT (device, model, mlx, backend) DO UPDATE SET hash = excluded.hash,
               policy_json = excluded.policy_json, ratio = excluded.ratio, lo = excluded.lo, hi = excluded.hi,
               session_id = excluded.session_id, candidate_id = excluded.candidate_id, promoted_at = excluded.promoted_at,
               summary_json = excluded.summary_json",
            params![k.device, k.model, k.mlx, k.backend, p.hash, policy_json, p.ratio, p.lo, p.hi, p.session_id, p.candidate_id, at, summary_json],
        )?;
        tx.execute(
            "INSERT INTO best_history (device, model, mlx, backend, hash, policy_json, ratio, lo, hi, session_id, candidate_id, replaced_hash, promoted_at, summary_json)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
            params![k.device, k.model, k.mlx, k.backend, p.hash, policy_json, p.ratio, p.lo, p.hi, p.session_id, p.candidate_id, replaced, at, summary_json],
        )?;
        let id = tx.last_insert_rowid();
        if let Some(sid) = p.session_id {
            tx.execute("UPDATE sessions SET promotions = promotions + 1, updated_at = ?2 WHERE id = ?1", params![sid, at])?;
        }
        tx.commit()?;
        Ok(id)
    }

    /// Promotions, newest first, optionally for one model.
    pub fn history(&self, model: Option<&str>, limit: u32) -> Result<Vec<HistoryEntry>> {
        let mut st = self.conn.prepare_cached(
            "SELECT id, promoted_at, device, model, mlx, backend, hash, ratio, lo, hi, session_id, candidate_id, replaced_hash, summary_json
             FROM best_history WHERE (?1 IS NULL OR model = ?1) ORDER BY id DESC LIMIT ?2",
        )?;
        let rows = st.query_map(params![model, limit], |r| {
            Ok(HistoryEntry {
                id: r.get(0)?,
                at: r.get(1)?,
                device: r.get(2)?,
                model: r.get(3)?,
                mlx: r.get(4)?,
                backend: r.get(5)?,
                hash: r.get(6)?,
                ratio: r.get(7)?,
                lo: r.get(8)?,
                hi: r.get(9)?,
                session_id: r.get(10)?,
                candidate_id: r.get(11)?,
                replaced_hash: r.get(12)?,
                summary: summary_col(r, "summary_json")?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }
}
