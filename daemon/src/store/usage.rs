//! Who uses what: the processes that fetched a policy (`fetches`), what they ran (`usage`), and the
//! models seen by name.
//!
//! Both tables grow with use, so both are bounded: a process and model is one `fetches` row however
//! often it asks, and one `usage` row per UTC day however often it reports (reports are merged:
//! counts add up, each row keeps at most `USAGE_GENERATIONS` kinds and `USAGE_SHAPES` shapes, the
//! most used). Rows older than [`KEEP_USAGE_FOR`] are pruned, and each table keeps at most its
//! newest [`MAX_FETCH_ROWS`] / [`MAX_USAGE_ROWS`] rows. A usage row holds at most about 40 KB, so
//! the `usage` table stays under about 80 MB even when flooded.

use super::{json_col, now, to_json, Result, Store};
use crate::ipc::protocol::limits;
use rusqlite::{params, OptionalExtension};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// How long fetches and usage are kept.
pub const KEEP_USAGE_FOR: std::time::Duration = std::time::Duration::from_secs(30 * 24 * 3600);
/// Rows kept at most (the newest by `last_at`).
pub const MAX_FETCH_ROWS: usize = 10_000;
pub const MAX_USAGE_ROWS: usize = 2_000;

/// One kind of generation call a process made, and how often: sizes only, bucketed by the plugin
/// to powers of two (a prompt of 300 tokens is reported as 256), never text or token ids.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GenerationUsage {
    /// Sequences generated together (1 for `generate`, the batch for a batched server).
    pub batch: u32,
    pub prompt_tokens: u32,
    pub generated_tokens: u32,
    /// The prefill step the call ran with, when the caller set one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefill_step: Option<u32>,
    pub count: u64,
}

/// Matmul calls of one shape: `m` is the bucket's lower bound (1, 2, 4, 8, ...).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShapeUsage {
    pub m: u32,
    pub n: u32,
    pub k: u32,
    pub calls: u64,
}

/// What one process ran with one model since its previous report (the `usage.report` params).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UsageReport {
    /// Model fingerprint.
    pub model: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_name: Option<String>,
    /// Seconds the report covers.
    pub period_s: f64,
    #[serde(default)]
    pub generations: Vec<GenerationUsage>,
    #[serde(default)]
    pub shapes: Vec<ShapeUsage>,
}

/// One policy fetch as the server saw it.
#[derive(Debug, Clone, PartialEq)]
pub struct Fetch {
    pub client: String,
    /// 0 when unknown.
    pub pid: u32,
    pub model: String,
    pub model_name: Option<String>,
    pub dtype: Option<String>,
    /// `best` or `native`.
    pub source: String,
    pub policy_hash: String,
    pub at: String,
}

/// A `fetches` row: one process and model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FetchRow {
    pub client: String,
    pub pid: u32,
    pub model: String,
    pub model_name: Option<String>,
    pub source: String,
    pub policy_hash: String,
    pub fetches: u64,
    pub first_at: String,
    pub last_at: String,
}

/// A `usage` row: one process, model and day, its reports merged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UsageRow {
    pub model: String,
    pub client: String,
    pub pid: u32,
    pub day: String,
    pub reports: u64,
    pub period_s: f64,
    pub generations: Vec<GenerationUsage>,
    pub shapes: Vec<ShapeUsage>,
    pub first_at: String,
    pub last_at: String,
}

/// A model as the store knows it: from a session's load or a plugin's fetch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelSeen {
    pub fingerprint: String,
    pub name: Option<String>,
    pub path: Option<String>,
    pub dtype: Option<String>,
    pub first_seen: String,
    pub last_used: String,
}

/// `a + b`, saturating at the protocol's count ceiling.
fn add(a: u64, b: u64) -> u64 {
    a.saturating_add(b).min(limits::USAGE_COUNT)
}

/// Sums the counts of equal generation kinds; keeps the `USAGE_GENERATIONS` most frequent, in a
/// stable order (most generated tokens first).
pub fn merge_generations(rows: impl IntoIterator<Item = GenerationUsage>) -> Vec<GenerationUsage> {
    let mut by_kind: BTreeMap<(u32, u32, u32, Option<u32>), u64> = BTreeMap::new();
    for g in rows {
        let c = by_kind.entry((g.batch, g.prompt_tokens, g.generated_tokens, g.prefill_step)).or_default();
        *c = add(*c, g.count);
    }
    let mut out: Vec<GenerationUsage> = by_kind
        .into_iter()
        .map(|((batch, prompt_tokens, generated_tokens, prefill_step), count)| GenerationUsage {
            batch,
            prompt_tokens,
            generated_tokens,
            prefill_step,
            count,
        })
        .collect();
    let tokens = |g: &GenerationUsage| g.count.saturating_mul(u64::from(g.generated_tokens) * u64::from(g.batch));
    out.sort_by(|a, b| tokens(b).cmp(&tokens(a)).then(b.count.cmp(&a.count)));
    out.truncate(limits::USAGE_GENERATIONS);
    out
}

/// Sums the calls of equal shapes; keeps the `USAGE_SHAPES` most called, most called first.
pub fn merge_shapes(rows: impl IntoIterator<Item = ShapeUsage>) -> Vec<ShapeUsage> {
    let mut by_shape: BTreeMap<(u32, u32, u32), u64> = BTreeMap::new();
    for s in rows {
        let c = by_shape.entry((s.m, s.n, s.k)).or_default();
        *c = add(*c, s.calls);
    }
    let mut out: Vec<ShapeUsage> = by_shape.into_iter().map(|((m, n, k), calls)| ShapeUsage { m, n, k, calls }).collect();
    out.sort_by(|a, b| b.calls.cmp(&a.calls).then((a.m, a.n, a.k).cmp(&(b.m, b.n, b.k))));
    out.truncate(limits::USAGE_SHAPES);
    out
}

fn fetch_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<FetchRow> {
    Ok(FetchRow {
        client: r.get("client")?,
        pid: r.get("pid")?,
        model: r.get("model")?,
        model_name: r.get("model_name")?,
        source: r.get("source")?,
        policy_hash: r.get("policy_hash")?,
        fetches: r.get("fetches")?,
        first_at: r.get("first_at")?,
        last_at: r.get("last_at")?,
    })
}

fn usage_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<UsageRow> {
    Ok(UsageRow {
        model: r.get("model")?,
        client: r.get("client")?,
        pid: r.get("pid")?,
        day: r.get("day")?,
        reports: r.get("reports")?,
        period_s: r.get("period_s")?,
        generations: json_col(r, "generations_json")?,
        shapes: json_col(r, "shapes_json")?,
        first_at: r.get("first_at")?,
        last_at: r.get("last_at")?,
    })
}

impl Store {
    /// Records policy fetches (the server batches them off its hot path): one row per process and
    /// model, counting; the model is noted as used, with its name and weight type when given.
    pub fn record_fetches(&self, fetches: &[Fetch]) -> Result<()> {
        if fetches.is_empty() {
            return Ok(());
        }
        let tx = self.conn.unchecked_transaction()?;
        for f in fetches {
            tx.execute(
                "INSERT INTO fetches (client, pid, model, model_name, source, policy_hash, fetches, first_at, last_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, 1, ?7, ?7)
                 ON CONFLICT (client, pid, model) DO UPDATE SET
                   model_name = coalesce(excluded.model_name, model_name), source = excluded.source,
                   policy_hash = excluded.policy_hash, fetches = fetches + 1, last_at = excluded.last_at",
                params![f.client, f.pid, f.model, f.model_name, f.source, f.policy_hash, f.at],
            )?;
            note_model(&tx, &f.model, f.model_name.as_deref(), f.dtype.as_deref(), &f.at)?;
        }
        cap(&tx, "fetches", MAX_FETCH_ROWS)?;
        tx.commit()?;
        Ok(())
    }

    /// Records a model known only from an imported bundle, by the exporter's name for it (never
    /// overwrites what this machine knows; not a use).
    pub fn note_model_imported(&self, fingerprint: &str, name: &str) -> Result<()> {
        let at = now();
        self.conn.execute(
            "INSERT OR IGNORE INTO models (fingerprint, path, config_json, first_seen, last_seen, name) VALUES (?1, NULL, '{}', ?2, ?2, ?3)",
            params![fingerprint, at, name],
        )?;
        Ok(())
    }

    /// Notes that a model was used (loaded by a session): name and weight type when known.
    pub fn note_model_used(&self, fingerprint: &str, name: Option<&str>, dtype: Option<&str>) -> Result<()> {
        note_model(&self.conn, fingerprint, name, dtype, &now())
    }

    /// The processes that fetched a policy, most recent first.
    pub fn fetches(&self, limit: u32) -> Result<Vec<FetchRow>> {
        let mut st = self.conn.prepare_cached("SELECT * FROM fetches ORDER BY last_at DESC, rowid DESC LIMIT ?1")?;
        let rows = st.query_map([limit], fetch_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Merges one usage report into its process's row of the day.
    pub fn record_usage(&self, client: &str, pid: u32, report: &UsageReport) -> Result<()> {
        let UsageReport { model, model_name, period_s, generations, shapes } = report;
        let (model_name, period_s) = (model_name.as_deref(), *period_s);
        let at = now();
        let day = &at[..10];
        let tx = self.conn.unchecked_transaction()?;
        let old = tx
            .query_row(
                "SELECT * FROM usage WHERE model = ?1 AND client = ?2 AND pid = ?3 AND day = ?4",
                params![model, client, pid, day],
                usage_row,
            )
            .optional()?;
        let (reports, total_s, gens, shps, first_at) = match old {
            Some(o) => (
                o.reports.saturating_add(1),
                o.period_s + period_s,
                merge_generations(o.generations.into_iter().chain(generations.iter().cloned())),
                merge_shapes(o.shapes.into_iter().chain(shapes.iter().cloned())),
                o.first_at,
            ),
            None => (1, period_s, merge_generations(generations.iter().cloned()), merge_shapes(shapes.iter().cloned()), at.clone()),
        };
        tx.execute(
            "INSERT OR REPLACE INTO usage (model, client, pid, day, reports, period_s, generations_json, shapes_json, first_at, last_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            params![model, client, pid, day, reports, total_s, to_json(&gens)?, to_json(&shps)?, first_at, at],
        )?;
        note_model(&tx, model, model_name, None, &at)?;
        cap(&tx, "usage", MAX_USAGE_ROWS)?;
        tx.commit()?;
        Ok(())
    }

    /// Every usage row of a model (all processes and days kept), newest first.
    pub fn usage_of(&self, model: &str) -> Result<Vec<UsageRow>> {
        let mut st = self.conn.prepare_cached("SELECT * FROM usage WHERE model = ?1 ORDER BY last_at DESC")?;
        let rows = st.query_map([model], usage_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// The models that have usage rows.
    pub fn models_with_usage(&self) -> Result<Vec<String>> {
        let mut st = self.conn.prepare_cached("SELECT DISTINCT model FROM usage ORDER BY model")?;
        let rows = st.query_map([], |r| r.get(0))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// The models seen, most recently used first.
    pub fn models_seen(&self) -> Result<Vec<ModelSeen>> {
        let mut st = self.conn.prepare_cached(
            "SELECT fingerprint, name, path, dtype, first_seen, coalesce(last_used, last_seen) AS last_used FROM models
             ORDER BY last_used DESC",
        )?;
        let rows = st.query_map([], |r| {
            Ok(ModelSeen {
                fingerprint: r.get("fingerprint")?,
                name: r.get("name")?,
                path: r.get("path")?,
                dtype: r.get("dtype")?,
                first_seen: r.get("first_seen")?,
                last_used: r.get("last_used")?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Removes fetches and usage older than `older_than`; returns how many rows went.
    pub fn prune_usage(&self, older_than: std::time::Duration) -> Result<usize> {
        let cutoff = super::time_text(std::time::SystemTime::now() - older_than);
        let fetches = self.conn.execute("DELETE FROM fetches WHERE last_at < ?1", [&cutoff])?;
        let usage = self.conn.execute("DELETE FROM usage WHERE last_at < ?1", [&cutoff])?;
        Ok(fetches + usage)
    }
}

/// Inserts the model if new (config unknown: `{}`), else refreshes its name, weight type and use.
fn note_model(conn: &rusqlite::Connection, fingerprint: &str, name: Option<&str>, dtype: Option<&str>, at: &str) -> Result<()> {
    conn.execute(
        "INSERT INTO models (fingerprint, path, config_json, first_seen, last_seen, name, dtype, last_used)
         VALUES (?1, NULL, '{}', ?2, ?2, ?3, ?4, ?2)
         ON CONFLICT (fingerprint) DO UPDATE SET name = coalesce(excluded.name, name),
           dtype = coalesce(excluded.dtype, dtype), last_used = excluded.last_used",
        params![fingerprint, at, name, dtype],
    )?;
    Ok(())
}

/// Keeps the newest `max` rows of `table` (by `last_at`).
fn cap(conn: &rusqlite::Connection, table: &str, max: usize) -> Result<()> {
    conn.execute(
        &format!("DELETE FROM {table} WHERE rowid IN (SELECT rowid FROM {table} ORDER BY last_at DESC, rowid DESC LIMIT -1 OFFSET ?1)"),
        [max as i64],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gen(batch: u32, prompt: u32, count: u64) -> GenerationUsage {
        GenerationUsage { batch, prompt_tokens: prompt, generated_tokens: 64, prefill_step: None, count }
    }

    #[test]
    fn merging_sums_equal_kinds_and_keeps_the_most_used() {
        let merged = merge_generations([gen(1, 512, 3), gen(8, 128, 2), gen(1, 512, 4)]);
        assert_eq!(merged, vec![gen(8, 128, 2), gen(1, 512, 7)], "batch 8 × 2 calls generated more tokens than batch 1 × 7");
        let many = (0..200).map(|i| gen(1, i + 1, u64::from(i) + 1));
        let kept = merge_generations(many);
        assert_eq!(kept.len(), limits::USAGE_GENERATIONS);
        assert_eq!(kept[0].prompt_tokens, 200, "the most frequent first");
        let huge = merge_shapes([ShapeUsage { m: 1, n: 2, k: 3, calls: u64::MAX }, ShapeUsage { m: 1, n: 2, k: 3, calls: 5 }]);
        assert_eq!(huge[0].calls, limits::USAGE_COUNT, "saturates at the ceiling");
    }

    #[test]
    fn a_flood_of_reports_from_one_process_is_one_row() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("t.db")).unwrap();
        for _ in 0..500 {
            let report = UsageReport {
                model: "mdl-a".into(),
                model_name: Some("org/model".into()),
                period_s: 60.0,
                generations: vec![gen(8, 128, 1)],
                shapes: vec![ShapeUsage { m: 8, n: 896, k: 896, calls: 10 }],
            };
            s.record_usage("p/1", 42, &report).unwrap();
        }
        let rows = s.usage_of("mdl-a").unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!((rows[0].reports, rows[0].generations[0].count, rows[0].shapes[0].calls), (500, 500, 5000));
        assert_eq!(rows[0].period_s, 30_000.0);
        let models = s.models_seen().unwrap();
        assert_eq!((models[0].fingerprint.as_str(), models[0].name.as_deref()), ("mdl-a", Some("org/model")));
    }

    #[test]
    fn fetches_and_usage_older_than_the_limit_are_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("t.db")).unwrap();
        let report = |model: &str| UsageReport {
            model: model.into(),
            model_name: None,
            period_s: 1.0,
            generations: vec![gen(1, 8, 1)],
            shapes: vec![],
        };
        s.record_usage("p/1", 1, &report("mdl-old")).unwrap();
        s.record_usage("p/1", 1, &report("mdl-new")).unwrap();
        let fetch = |model: &str| Fetch {
            client: "p/1".into(),
            pid: 1,
            model: model.into(),
            model_name: None,
            dtype: None,
            source: "native".into(),
            policy_hash: "sha256:x".into(),
            at: now(),
        };
        s.record_fetches(&[fetch("mdl-old"), fetch("mdl-new")]).unwrap();
        let long_ago = super::super::time_text(std::time::SystemTime::now() - std::time::Duration::from_secs(31 * 24 * 3600));
        s.conn.execute("UPDATE usage SET last_at = ?1 WHERE model = 'mdl-old'", [&long_ago]).unwrap();
        s.conn.execute("UPDATE fetches SET last_at = ?1 WHERE model = 'mdl-old'", [&long_ago]).unwrap();
        assert_eq!(s.prune_usage(KEEP_USAGE_FOR).unwrap(), 2);
        assert!(s.usage_of("mdl-old").unwrap().is_empty());
        assert_eq!(s.usage_of("mdl-new").unwrap().len(), 1);
        assert_eq!(s.fetches(10).unwrap().iter().map(|f| f.model.as_str()).collect::<Vec<_>>(), vec!["mdl-new"]);
    }

    #[test]
    fn fetches_count_per_process_and_are_capped() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("t.db")).unwrap();
        let f = |pid: u32| Fetch {
            client: "tilewise-plugin/0.1".into(),
            pid,
            model: "mdl-b".into(),
            model_name: Some("/models/b".into()),
            dtype: Some("bfloat16".into()),
            source: "native".into(),
            policy_hash: "sha256:x".into(),
            at: now(),
        };
        s.record_fetches(&[f(7), f(7), f(8)]).unwrap();
        let rows = s.fetches(10).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows.iter().find(|r| r.pid == 7).unwrap().fetches, 2);
        let flood: Vec<Fetch> = (0..(MAX_FETCH_ROWS as u32 + 50)).map(f).collect();
        s.record_fetches(&flood).unwrap();
        assert_eq!(s.fetches(u32::MAX).unwrap().len(), MAX_FETCH_ROWS);
        let m = &s.models_seen().unwrap()[0];
        assert_eq!((m.name.as_deref(), m.dtype.as_deref()), (Some("/models/b"), Some("bfloat16")));
    }
}
