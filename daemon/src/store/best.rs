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
    /// When it was last measured again (`None`: not since its promotion).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remeasured_at: Option<String>,
    /// Where it came from when not from a search here: "imported from <chip> (<device>), verified
    /// here" (`None`: found and proven on this machine).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
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
    /// `promotion`; `remeasure` (`hash` measured again: `ratio`/`lo`/`hi` are the new measurement's);
    /// `demotion` (`replaced_hash` was found slower than stock and `hash` — the previous best, or
    /// `native` — is served again).
    #[serde(default = "promotion_kind")]
    pub kind: String,
    /// Why (remeasurements and demotions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Where the policy came from when not from a search here (promotions and demotions; see
    /// [`Best::origin`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
}

fn promotion_kind() -> String {
    "promotion".into()
}

/// A proven policy measured again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Remeasurement {
    pub key: BestKey,
    pub hash: String,
    pub ratio: f64,
    pub lo: f64,
    pub hi: f64,
    pub session_id: Option<SessionId>,
    pub candidate_id: Option<CandidateId>,
    /// Where and why: `in a fresh worker after its promotion`, `in session 12`, ...
    pub reason: String,
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
        remeasured_at: r.get("remeasured_at")?,
        origin: r.get("origin")?,
    })
}

impl Store {
    /// The best policy for `key`, if one was ever promoted.
    pub fn best(&self, key: &BestKey) -> Result<Option<Best>> {
        let mut st = self.conn.prepare_cached("SELECT * FROM best WHERE device = ?1 AND model = ?2 AND mlx = ?3 AND backend = ?4")?;
        Ok(st.query_row(params![key.device, key.model, key.mlx, key.backend], best_from_row).optional()?)
    }

    /// Marks the best of `key` with hash `hash` as coming from elsewhere (see [`Best::origin`]), and
    /// its promotion in the history with it, so that a demotion which serves it again keeps the
    /// label. One transaction; `false` (nothing written) when `hash` is not the best.
    pub fn set_best_origin(&self, key: &BestKey, hash: &str, origin: &str) -> Result<bool> {
        // A write to `best` like a promotion: cached `policy.get` answers must not outlive it.
        self.own_promotions.set(self.own_promotions.get() + 1);
        let tx = self.conn.unchecked_transaction()?;
        let n = tx.execute(
            "UPDATE best SET origin = ?6 WHERE device = ?1 AND model = ?2 AND mlx = ?3 AND backend = ?4 AND hash = ?5",
            params![key.device, key.model, key.mlx, key.backend, hash, origin],
        )?;
        if n != 1 {
            return Ok(false);
        }
        tx.execute(
            "UPDATE best_history SET origin = ?6 WHERE id = (SELECT max(id) FROM best_history
               WHERE device = ?1 AND model = ?2 AND mlx = ?3 AND backend = ?4 AND hash = ?5 AND kind = 'promotion')",
            params![key.device, key.model, key.mlx, key.backend, hash, origin],
        )?;
        tx.commit()?;
        Ok(true)
    }

    /// Every best of `device` (optionally of one model), newest promotion first.
    pub fn bests_of_device(&self, device: &str, model: Option<&str>) -> Result<Vec<Best>> {
        let mut st =
            self.conn.prepare_cached("SELECT * FROM best WHERE device = ?1 AND (?2 IS NULL OR model = ?2) ORDER BY promoted_at DESC")?;
        let rows = st.query_map(params![device, model], best_from_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// The newest best of `model` on `device`, whatever the MLX version and backend.
    pub fn best_for_model(&self, device: &str, model: &str) -> Result<Option<Best>> {
        let mut st = self.conn.prepare_cached("SELECT * FROM best WHERE device = ?1 AND model = ?2 ORDER BY promoted_at DESC LIMIT 1")?;
        Ok(st.query_row(params![device, model], best_from_row).optional()?)
    }

    /// The proven speedup of the best with this hash for `model` on `device`, if it is still one.
    pub fn best_ratio_by_hash(&self, device: &str, model: &str, hash: &str) -> Result<Option<f64>> {
        let mut st = self.conn.prepare_cached("SELECT ratio FROM best WHERE device = ?1 AND model = ?2 AND hash = ?3 LIMIT 1")?;
        Ok(st.query_row(params![device, model, hash], |r| r.get(0)).optional()?)
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
               summary_json = excluded.summary_json, remeasured_at = NULL, origin = NULL",
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

    /// Records a re-measurement of `m.hash` in the history (kind `remeasure`) and, when it is the
    /// current best, when it was re-measured. One transaction. Returns the history row id.
    pub fn record_remeasure(&self, m: &Remeasurement) -> Result<i64> {
        let tx = self.conn.unchecked_transaction()?;
        let at = now();
        let k = &m.key;
        let policy_json: String = tx.query_row(
            "SELECT policy_json FROM best_history WHERE device = ?1 AND model = ?2 AND mlx = ?3 AND backend = ?4 AND hash = ?5
             ORDER BY id DESC LIMIT 1",
            params![k.device, k.model, k.mlx, k.backend, m.hash],
            |r| r.get(0),
        )?;
        tx.execute(
            "INSERT INTO best_history (device, model, mlx, backend, hash, policy_json, ratio, lo, hi, session_id, candidate_id, promoted_at, kind, reason)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, 'remeasure', ?13)",
            params![k.device, k.model, k.mlx, k.backend, m.hash, policy_json, m.ratio, m.lo, m.hi, m.session_id, m.candidate_id, at, m.reason],
        )?;
        let id = tx.last_insert_rowid();
        tx.execute(
            "UPDATE best SET remeasured_at = ?6 WHERE device = ?1 AND model = ?2 AND mlx = ?3 AND backend = ?4 AND hash = ?5",
            params![k.device, k.model, k.mlx, k.backend, m.hash, at],
        )?;
        tx.commit()?;
        Ok(id)
    }

    /// Demotes `hash` when it is the best for `key` (a re-measurement found it slower than stock):
    /// the best before it — the newest promotion of another policy for this key that was not itself
    /// demoted — is served again, else nothing (native). Records a `demotion` row with the reason.
    /// Returns what is served now (`Some(hash)` or `None` for native), or `Err` untouched when `hash`
    /// is no longer the best.
    pub fn demote(&self, key: &BestKey, hash: &str, reason: &str) -> Result<Option<String>> {
        self.own_promotions.set(self.own_promotions.get() + 1);
        let tx = self.conn.unchecked_transaction()?;
        let at = now();
        let k = key;
        let current: Option<String> = tx
            .query_row(
                "SELECT hash FROM best WHERE device = ?1 AND model = ?2 AND mlx = ?3 AND backend = ?4",
                params![k.device, k.model, k.mlx, k.backend],
                |r| r.get(0),
            )
            .optional()?;
        if current.as_deref() != Some(hash) {
            return Err(super::StoreError::Invalid { field: "demote", message: format!("{hash} is not the best for this target") });
        }
        // Every policy ever demoted for this key, so that none of them comes back.
        let demoted: Vec<String> = {
            let mut st = tx.prepare(
                "SELECT replaced_hash FROM best_history WHERE device = ?1 AND model = ?2 AND mlx = ?3 AND backend = ?4
                 AND kind = 'demotion' AND replaced_hash IS NOT NULL",
            )?;
            let rows = st.query_map(params![k.device, k.model, k.mlx, k.backend], |r| r.get::<_, String>(0))?;
            rows.collect::<rusqlite::Result<_>>()?
        };
        let previous: Option<Best> = {
            let mut st = tx.prepare(
                "SELECT device, model, mlx, backend, hash, policy_json, ratio, lo, hi, session_id, candidate_id, promoted_at,
                        summary_json, NULL AS remeasured_at, origin
                 FROM best_history WHERE device = ?1 AND model = ?2 AND mlx = ?3 AND backend = ?4 AND kind = 'promotion'
                 AND hash != ?5 ORDER BY id DESC",
            )?;
            let rows = st.query_map(params![k.device, k.model, k.mlx, k.backend, hash], best_from_row)?;
            let mut found = None;
            for b in rows {
                let b = b?;
                if !demoted.contains(&b.hash) && b.hash != hash {
                    found = Some(b);
                    break;
                }
            }
            found
        };
        let native = crate::policy::Policy::native();
        let (served_hash, served_policy) = match &previous {
            Some(b) => {
                tx.execute(
                    "UPDATE best SET hash = ?5, policy_json = ?6, ratio = ?7, lo = ?8, hi = ?9, session_id = ?10, candidate_id = ?11,
                       promoted_at = ?12, summary_json = ?13, remeasured_at = NULL, origin = ?14
                     WHERE device = ?1 AND model = ?2 AND mlx = ?3 AND backend = ?4",
                    params![
                        k.device,
                        k.model,
                        k.mlx,
                        k.backend,
                        b.hash,
                        to_json(&b.policy)?,
                        b.ratio,
                        b.lo,
                        b.hi,
                        b.session_id,
                        b.candidate_id,
                        b.promoted_at,
                        b.summary.as_ref().map(to_json).transpose()?,
                        b.origin
                    ],
                )?;
                (b.hash.clone(), to_json(&b.policy)?)
            }
            None => {
                tx.execute(
                    "DELETE FROM best WHERE device = ?1 AND model = ?2 AND mlx = ?3 AND backend = ?4",
                    params![k.device, k.model, k.mlx, k.backend],
                )?;
                ("native".to_string(), native.canonical_json())
            }
        };
        let (ratio, lo, hi) = previous.as_ref().map_or((1.0, 1.0, 1.0), |b| (b.ratio, b.lo, b.hi));
        let origin = previous.as_ref().and_then(|b| b.origin.clone());
        tx.execute(
            "INSERT INTO best_history (device, model, mlx, backend, hash, policy_json, ratio, lo, hi, replaced_hash, promoted_at, kind, reason, origin)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, 'demotion', ?12, ?13)",
            params![k.device, k.model, k.mlx, k.backend, served_hash, served_policy, ratio, lo, hi, hash, at, reason, origin],
        )?;
        tx.commit()?;
        Ok(previous.map(|b| b.hash))
    }

    /// The best policies of `device` last measured (promoted or re-measured) more than `older_than`
    /// ago, oldest first, with the path their model was loaded from (`None` when unknown).
    pub fn stale_bests(&self, device: &str, older_than: std::time::Duration) -> Result<Vec<(Best, Option<String>)>> {
        let cutoff = super::time_text(std::time::SystemTime::now() - older_than);
        let mut st = self.conn.prepare_cached(
            "SELECT best.*, models.path AS model_path FROM best LEFT JOIN models ON models.fingerprint = best.model
             WHERE best.device = ?1 AND coalesce(best.remeasured_at, best.promoted_at) < ?2
             ORDER BY coalesce(best.remeasured_at, best.promoted_at)",
        )?;
        let rows = st.query_map(params![device, cutoff], |r| Ok((best_from_row(r)?, r.get("model_path")?)))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Promotions, newest first, optionally for one model.
    pub fn history(&self, model: Option<&str>, limit: u32) -> Result<Vec<HistoryEntry>> {
        let mut st = self.conn.prepare_cached(
            "SELECT id, promoted_at, device, model, mlx, backend, hash, ratio, lo, hi, session_id, candidate_id, replaced_hash, summary_json,
                    kind, reason, origin
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
                kind: r.get("kind")?,
                reason: r.get("reason")?,
                origin: r.get("origin")?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }
}
