//! Stores a policy as the proven best for its own target, through the store API, exactly as a
//! promotion records it (best row + history, one transaction) — but without a tuning session.
//!
//! Why it exists: the plugin's end-to-end test and `bench/plugin_bench.py` need a daemon that
//! holds a stored best, and the serving path must be exercised on a database written by the real
//! store code, not on rows faked by the client. Not shipped: an example, built by the tests.
//!
//! ```text
//! cargo run --example seed_best -- POLICY.json [--ratio 1.05 --lo 1.02 --hi 1.08] [--db PATH] [--summary JSON] [--origin TEXT]
//! ```
//! The database defaults to the one `TILEWISE_HOME` (or the platform) points at. The policy is
//! fully validated first, and its target's device, model, mlx and backend (none may be `*`) are the
//! key it is stored under. Prints `{"hash", "history_id", "db"}` as one JSON line.

use anyhow::{bail, Context, Result};
use clap::Parser;
use std::path::PathBuf;
use tilewise::paths::Paths;
use tilewise::policy::Policy;
use tilewise::store::{BestKey, Promotion, Store};

#[derive(Parser)]
#[command(about = "Store a policy as the proven best for its target (tests and benchmarks)")]
struct Args {
    /// The policy JSON file (tilewise.policy/1).
    policy: PathBuf,
    /// Evidence recorded with it: the median speed-up ratio and its 95 % interval.
    #[arg(long, default_value_t = 1.05)]
    ratio: f64,
    #[arg(long, default_value_t = 1.02)]
    lo: f64,
    #[arg(long, default_value_t = 1.08)]
    hi: f64,
    /// Database file (default: the tilewise home's).
    #[arg(long)]
    db: Option<PathBuf>,
    /// The promotion's summary, as the session records it (JSON of `store::PolicySummary`).
    #[arg(long)]
    summary: Option<String>,
    /// Where it came from, as a verification session records an imported policy it promoted
    /// ("imported from Apple M3 Max (dev-…), verified here in session 7").
    #[arg(long)]
    origin: Option<String>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let text = std::fs::read_to_string(&args.policy).with_context(|| format!("reading {}", args.policy.display()))?;
    let policy = Policy::from_json_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", args.policy.display()))?;
    let t = &policy.target;
    if [&t.device, &t.model, &t.mlx, &t.backend].iter().any(|v| v.as_str() == "*") {
        bail!("a best is stored for one exact target; this policy's target has a '*': {t:?}");
    }
    policy.validate_for_backend(&t.backend).map_err(|e| anyhow::anyhow!("{e}"))?;
    let db = match args.db {
        Some(db) => db,
        None => {
            let paths = Paths::from_env()?;
            paths.ensure_dirs()?;
            paths.db_file
        }
    };
    let store = Store::open(&db)?;
    let key = BestKey { device: t.device.clone(), model: t.model.clone(), mlx: t.mlx.clone(), backend: t.backend.clone() };
    let hash = policy.content_hash();
    let history_id = store.promote(&Promotion {
        key: key.clone(),
        policy: policy.to_value(),
        hash: hash.clone(),
        ratio: args.ratio,
        lo: args.lo,
        hi: args.hi,
        session_id: None,
        candidate_id: None,
        summary: args.summary.as_deref().map(serde_json::from_str).transpose().context("--summary: not a policy summary")?,
    })?;
    if let Some(origin) = &args.origin {
        store.set_best_origin(&key, &hash, origin)?;
    }
    println!("{}", serde_json::json!({"hash": hash, "history_id": history_id, "db": db}));
    Ok(())
}
