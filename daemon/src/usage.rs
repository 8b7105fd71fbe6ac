//! What people run with their models: the policy fetches the server sees, the usage reports the
//! plugin sends, and the views built from them (`clients.list`, `models.list`, the status line).
//! How usage becomes a session's workloads is in `session::usage_mix`.
//!
//! A fetch is noted in memory on the `policy.get` hot path (a push under a mutex, no SQLite) and
//! written in batches by [`spawn_upkeep`] every [`FLUSH_EVERY`], before any view is read, and at
//! shutdown.

use crate::ipc::protocol::{ClientRecord, ModelBest, ModelInfo, UsageSummary, TOOL_CLIENT_PREFIXES};
use crate::store::{Fetch, SharedStore, Store, StoreError, KEEP_USAGE_FOR};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

/// How often noted fetches are written.
pub const FLUSH_EVERY: Duration = Duration::from_secs(2);
/// Fetches held in memory at most between writes; past it the oldest unwritten are dropped (and
/// counted in the log): a client looping on `policy.get` must not grow the daemon's memory.
const PENDING_MAX: usize = 10_000;
/// A process whose last fetch is older than this is not called live even if its pid exists: the
/// pid may belong to another process by now.
const LIVE_WITHIN: Duration = Duration::from_secs(24 * 3600);

/// One fetch, as cheap to note as possible (formatted when written).
struct Pending {
    client: Arc<str>,
    pid: u32,
    model: String,
    model_name: Option<String>,
    dtype: Option<String>,
    best: bool,
    hash: Arc<str>,
    at: SystemTime,
}

/// Fetches noted and not yet written.
#[derive(Default)]
pub struct FetchLog {
    pending: Mutex<Vec<Pending>>,
    dropped: Mutex<u64>,
}

impl FetchLog {
    /// Notes one `policy.get` answered for a process. tilewise's own tools (the command line, the
    /// app) show policies to people; they are not processes running a model and are not noted.
    #[allow(clippy::too_many_arguments)]
    pub fn note(
        &self,
        client: &Arc<str>,
        pid: u32,
        model: &str,
        model_name: Option<&str>,
        dtype: Option<&str>,
        best: bool,
        hash: &Arc<str>,
    ) {
        if TOOL_CLIENT_PREFIXES.iter().any(|p| client.starts_with(p)) {
            return;
        }
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        if pending.len() >= PENDING_MAX {
            pending.remove(0);
            *self.dropped.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        }
        pending.push(Pending {
            client: client.clone(),
            pid,
            model: model.to_string(),
            model_name: model_name.map(str::to_string),
            dtype: dtype.map(str::to_string),
            best,
            hash: hash.clone(),
            at: SystemTime::now(),
        });
    }

    /// Writes what was noted. On a store error the batch is lost (logged): fetch records are a
    /// view of use, not data a person made, and retrying could grow memory without bound.
    pub fn flush(&self, store: &Store) -> Result<usize, StoreError> {
        let batch = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|p| p.into_inner()));
        let dropped = std::mem::take(&mut *self.dropped.lock().unwrap_or_else(|p| p.into_inner()));
        if dropped > 0 {
            tracing::warn!(dropped, "policy fetches arrived faster than they are written; the oldest were not recorded");
        }
        let fetches: Vec<Fetch> = batch
            .into_iter()
            .map(|p| Fetch {
                client: p.client.to_string(),
                pid: p.pid,
                model: p.model,
                model_name: p.model_name,
                dtype: p.dtype,
                source: if p.best { "best" } else { "native" }.into(),
                policy_hash: p.hash.to_string(),
                at: crate::store::time_text(p.at),
            })
            .collect();
        store.record_fetches(&fetches)?;
        Ok(fetches.len())
    }
}

/// Whether process `pid` exists (signal 0 checks without sending anything).
pub fn process_exists(pid: u32) -> bool {
    if pid == 0 || pid > i32::MAX as u32 {
        return false;
    }
    // SAFETY: kill with signal 0 only checks the pid; EPERM means it exists under another user.
    let r = unsafe { libc::kill(pid as libc::pid_t, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

fn age(at: &str) -> Option<Duration> {
    let t = humantime::parse_rfc3339_weak(at.trim_end_matches('Z')).ok()?;
    SystemTime::now().duration_since(t).ok()
}

/// The processes that fetched a policy, live first, with the served best's speedup.
pub fn clients(store: &Store, device: &str, live_only: bool, limit: u32) -> Result<Vec<ClientRecord>, StoreError> {
    let mut out: Vec<ClientRecord> = vec![];
    for f in store.fetches(limit.max(1).saturating_mul(4))? {
        let recent = age(&f.last_at).is_some_and(|a| a < LIVE_WITHIN);
        let live = recent && process_exists(f.pid);
        if live_only && !live {
            continue;
        }
        let ratio = if f.source == "best" { store.best_ratio_by_hash(device, &f.model, &f.policy_hash)? } else { None };
        out.push(ClientRecord {
            client: f.client,
            pid: (f.pid != 0).then_some(f.pid),
            live,
            model: f.model,
            model_name: f.model_name,
            source: f.source,
            policy_hash: f.policy_hash,
            ratio,
            fetches: f.fetches,
            first_at: f.first_at,
            last_at: f.last_at,
        });
    }
    out.sort_by_key(|c| !c.live); // stable: live first, each group newest first
    out.truncate(limit as usize);
    Ok(out)
}

/// Every model seen, most recently used first, with its usage and its best on `device`.
pub fn models(store: &Store, device: &str) -> Result<Vec<ModelInfo>, StoreError> {
    let mut out = vec![];
    for m in store.models_seen()? {
        let rows = store.usage_of(&m.fingerprint)?;
        let mut usage = UsageSummary { reports: rows.iter().map(|r| r.reports).sum(), ..Default::default() };
        let mut tokens_by_batch: std::collections::BTreeMap<u32, u64> = Default::default();
        for r in &rows {
            for g in &r.generations {
                usage.generations = usage.generations.saturating_add(g.count);
                let tokens = g.count.saturating_mul(u64::from(g.generated_tokens)).saturating_mul(u64::from(g.batch));
                usage.generated_tokens = usage.generated_tokens.saturating_add(tokens);
                *tokens_by_batch.entry(g.batch).or_default() += tokens;
            }
        }
        usage.main_batch = tokens_by_batch.iter().max_by_key(|(_, t)| **t).map(|(b, _)| *b);
        usage.last_report_at = rows.first().map(|r| r.last_at.clone());
        let best = store.best_for_model(device, &m.fingerprint)?.map(|b| ModelBest {
            hash: b.hash,
            ratio: b.ratio,
            lo: b.lo,
            hi: b.hi,
            mlx: b.key.mlx,
            backend: b.key.backend,
            summary: b.summary.map(|s| s.text),
        });
        out.push(ModelInfo {
            fingerprint: m.fingerprint,
            name: m.name,
            path: m.path,
            dtype: m.dtype,
            first_seen: m.first_seen,
            last_used: m.last_used,
            usage,
            best,
        });
    }
    Ok(out)
}

/// Tokens generated with `model` in the usage kept (count × batch × generated, summed).
fn tokens_generated(store: &Store, model: &str) -> Result<u64, StoreError> {
    let mut total = 0u64;
    for r in store.usage_of(model)? {
        for g in &r.generations {
            total = total.saturating_add(g.count.saturating_mul(u64::from(g.batch)).saturating_mul(u64::from(g.generated_tokens)));
        }
    }
    Ok(total)
}

/// The model people ran most (tokens generated, in the usage kept) that has no proven policy on
/// `device`, by the name it was loaded with — what the idle auto-starter tunes when the config
/// names no model. A name that is a path must still exist (a deleted model is not retried).
pub fn most_used_untuned(store: &Store, device: &str) -> Result<Option<String>, StoreError> {
    let names: std::collections::HashMap<String, Option<String>> =
        store.models_seen()?.into_iter().map(|m| (m.fingerprint, m.name)).collect();
    let mut best: Option<(u64, String)> = None;
    for model in store.models_with_usage()? {
        let Some(Some(name)) = names.get(&model) else { continue };
        let loadable = !(name.starts_with('/') || name.starts_with('.') || name.starts_with('~')) || std::path::Path::new(name).exists();
        if !loadable || store.best_for_model(device, &model)?.is_some() {
            continue;
        }
        let tokens = tokens_generated(store, &model)?;
        if tokens > 0 && best.as_ref().is_none_or(|(t, _)| tokens > *t) {
            best = Some((tokens, name.clone()));
        }
    }
    Ok(best.map(|(_, name)| name))
}

/// Whether `s` has the form of a model fingerprint (`mdl-` and 32 hex digits).
pub fn is_model_fingerprint(s: &str) -> bool {
    s.strip_prefix("mdl-").is_some_and(|h| h.len() == 32 && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Which seen model `wanted` names: a fingerprint, a name as loaded, a path (compared after
/// resolving it), or the last component of either. Several matches are an error that lists them.
pub fn resolve_model<'a>(models: &'a [ModelInfo], wanted: &str) -> Result<&'a ModelInfo, String> {
    if let Some(m) = models.iter().find(|m| m.fingerprint == wanted) {
        return Ok(m);
    }
    let canonical = std::fs::canonicalize(wanted).ok().map(|p| p.to_string_lossy().into_owned());
    let last = |s: &str| s.trim_end_matches('/').rsplit('/').next().unwrap_or("").to_string();
    let exact: Vec<&ModelInfo> = models
        .iter()
        .filter(|m| {
            [m.name.as_deref(), m.path.as_deref()]
                .into_iter()
                .flatten()
                .any(|n| n == wanted || canonical.as_deref().is_some_and(|c| c == n))
        })
        .collect();
    let found = if exact.is_empty() {
        models.iter().filter(|m| [m.name.as_deref(), m.path.as_deref()].into_iter().flatten().any(|n| last(n) == wanted)).collect()
    } else {
        exact
    };
    match found.as_slice() {
        [one] => Ok(one),
        [] => Err(format!(
            "no model named {wanted:?} has been seen by the daemon (a model is seen when a session loads it or a process \
             using the plugin loads it); `tilewise models` lists the ones seen"
        )),
        many => Err(format!(
            "{wanted:?} names {} models: {}; give the fingerprint",
            many.len(),
            many.iter().map(|m| format!("{} ({})", m.fingerprint, m.name.as_deref().unwrap_or("?"))).collect::<Vec<_>>().join(", ")
        )),
    }
}

/// Writes noted fetches every [`FLUSH_EVERY`] and prunes fetches and usage older than
/// [`KEEP_USAGE_FOR`] at start and daily.
pub fn spawn_upkeep(log: Arc<FetchLog>, store: SharedStore) {
    tokio::spawn(async move {
        let mut last_prune: Option<std::time::Instant> = None;
        loop {
            let log = log.clone();
            let store = store.clone();
            let prune = last_prune.is_none_or(|t| t.elapsed() > Duration::from_secs(24 * 3600));
            let done = tokio::task::spawn_blocking(move || {
                let s = store.lock().unwrap_or_else(|p| p.into_inner());
                if let Err(e) = log.flush(&s) {
                    tracing::warn!("could not record policy fetches: {e}");
                }
                if prune {
                    match s.prune_usage(KEEP_USAGE_FOR) {
                        Ok(0) => {}
                        Ok(n) => tracing::info!("removed {n} fetch and usage records older than 30 days"),
                        Err(e) => tracing::warn!("could not prune old usage records: {e}"),
                    }
                }
            })
            .await;
            if done.is_err() {
                return;
            }
            if prune {
                last_prune = Some(std::time::Instant::now());
            }
            tokio::time::sleep(FLUSH_EVERY).await;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(fp: &str, name: Option<&str>) -> ModelInfo {
        ModelInfo {
            fingerprint: fp.into(),
            name: name.map(Into::into),
            path: None,
            dtype: None,
            first_seen: String::new(),
            last_used: String::new(),
            usage: UsageSummary::default(),
            best: None,
        }
    }

    #[test]
    fn models_resolve_by_fingerprint_name_or_last_component() {
        let ms = [
            info("mdl-1", Some("/models/Qwen2.5-0.5B-Instruct-bf16")),
            info("mdl-2", Some("synthetic:tiny")),
            info("mdl-3", Some("/other/Qwen2.5-0.5B-Instruct-bf16")),
        ];
        assert_eq!(resolve_model(&ms, "mdl-2").unwrap().fingerprint, "mdl-2");
        assert_eq!(resolve_model(&ms, "synthetic:tiny").unwrap().fingerprint, "mdl-2");
        assert_eq!(resolve_model(&ms, "/models/Qwen2.5-0.5B-Instruct-bf16").unwrap().fingerprint, "mdl-1");
        let two = resolve_model(&ms, "Qwen2.5-0.5B-Instruct-bf16").unwrap_err();
        assert!(two.contains("names 2 models") && two.contains("mdl-1") && two.contains("mdl-3"), "{two}");
        assert!(resolve_model(&ms, "").unwrap_err().contains("tilewise models"));
        assert!(resolve_model(&ms, "nothing-like-it").unwrap_err().contains("has been seen"));
    }

    #[test]
    fn this_process_exists_and_pid_zero_does_not() {
        assert!(process_exists(std::process::id()));
        assert!(!process_exists(0));
    }
}
