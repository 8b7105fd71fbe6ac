//! `tilewise-reliability`: the reliability suite in one command.
//!
//! Runs, against the real `tilewised` binary (each check in its own `TILEWISE_HOME`):
//! - `fuzz`: the libFuzzer target on the protocol decoder and dispatcher (fuzz/, cargo fuzz);
//! - `live-fuzz`: bad frames of every kind against a running daemon while a good client times itself;
//! - `load`: C concurrent clients × N `policy.get`, every reply checked;
//! - `security`: socket modes, other-UID refusal, inert policy content, a planted wrong policy;
//! - `faults`: kill -9 during sessions, worker hang/crash/garbage/oom, read-only database, full
//!   disk, corrupted database.
//!
//! and prints one table (check, figure, goal, result). `--quick` is the reduced form CI runs
//! (scripts/test.d/60-reliability.sh); the full form is what bench/results/reliability-*.txt and the
//! README's Reliability section show. Exit status: 0 when no row failed.

mod client;
mod faults;
mod fuzz;
mod harness;
mod live_fuzz;
mod load;
mod report;
mod security;
mod stats;

use anyhow::{Context, Result};
use clap::Parser;
use harness::{Binaries, Daemon};
use report::Row;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const CHECKS: &[&str] = &["fuzz", "live-fuzz", "load", "security", "faults"];

#[derive(Parser, Debug)]
#[command(name = "tilewise-reliability", about = "Fuzz, load, fault-injection and security checks against the real tilewised")]
struct Args {
    /// The reduced form (smaller counts, a short fuzz run): what CI runs.
    #[arg(long, env = "TILEWISE_RELIABILITY_QUICK")]
    quick: bool,
    /// Run only these checks (fuzz, live-fuzz, load, security, faults); default: all.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Directory holding the `tilewised` binary (default: next to this one).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Python with the evaluator installed, for the worker (default: $TILEWISE_PYTHON, else .venv/bin/python).
    #[arg(long)]
    python: Option<PathBuf>,
    /// Also write the table, with date and settings, to this file.
    #[arg(long)]
    out: Option<PathBuf>,
    /// libFuzzer inputs for the fuzz target (default: 1,000,000; quick: 60 s of fuzzing).
    #[arg(long)]
    fuzz_runs: Option<u64>,
    /// Run the fuzz binary already built instead of rebuilding it (cargo fuzz build -O protocol).
    #[arg(long)]
    no_fuzz_build: bool,
    /// kill -9 cycles during tuning sessions (default 30; quick 5).
    #[arg(long)]
    kills: Option<u32>,
    /// Load: concurrent clients and requests per client (default 64 × 10,000; quick 16 × 1,000).
    #[arg(long)]
    clients: Option<usize>,
    #[arg(long)]
    requests: Option<usize>,
    /// Keep the temp homes (daemon logs, databases) for inspection.
    #[arg(long)]
    keep: bool,
}

fn main() {
    // The other-UID client of the security check re-enters here under `setpriv`.
    let argv: Vec<String> = std::env::args().collect();
    if argv.get(1).map(String::as_str) == Some("connect-probe") {
        println!("{}", security::connect_probe(Path::new(&argv[2])));
        return;
    }
    let args = Args::parse();
    match run(&args) {
        Ok(failed) => std::process::exit(if failed { 1 } else { 0 }),
        Err(e) => {
            eprintln!("tilewise-reliability: {e:#}");
            std::process::exit(2);
        }
    }
}

/// A fresh home for one check under the suite's root; world-traversable so that the security
/// check's other-UID client reaches the socket directory (whose own 0700 mode is what is tested).
fn home(root: &Path, name: &str) -> Result<PathBuf> {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir)?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
    Ok(dir)
}

fn run(args: &Args) -> Result<bool> {
    for c in &args.only {
        anyhow::ensure!(CHECKS.contains(&c.as_str()), "unknown check {c:?}; checks: {}", CHECKS.join(", "));
    }
    let wanted = |c: &str| args.only.is_empty() || args.only.iter().any(|o| o == c);
    let bin_dir = match &args.bin_dir {
        Some(d) => d.clone(),
        None => std::env::current_exe()?.parent().context("exe has no dir")?.to_path_buf(),
    };
    let python = args
        .python
        .clone()
        .or_else(|| std::env::var_os("TILEWISE_PYTHON").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(".venv/bin/python"));
    // Absolute but not canonical: a venv's python is a symlink, and resolving it loses the venv.
    let bins = Binaries { tilewised: bin_dir.join("tilewised"), python: std::path::absolute(&python).unwrap_or(python) };
    anyhow::ensure!(bins.tilewised.exists(), "{} not found: build it first (cargo build -p tilewise --bins)", bins.tilewised.display());

    let q = args.quick;
    let root = tempfile::Builder::new().prefix("tilewise-reliability-").tempdir()?;
    std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o755))?;
    let started = Instant::now();
    let mut rows: Vec<Row> = Vec::new();
    let section = |name: &str, rows: &mut Vec<Row>, f: &mut dyn FnMut() -> Vec<Row>| {
        eprintln!("==> {name}");
        let t0 = Instant::now();
        let got = f();
        for r in &got {
            eprintln!("    {} | {} | {:?}", r.check, r.figure, r.verdict);
        }
        eprintln!("<== {name} ({:.0} s)", t0.elapsed().as_secs_f64());
        rows.extend(got);
    };

    if wanted("fuzz") {
        let (runs, build) = (args.fuzz_runs, !args.no_fuzz_build);
        section("fuzz (libFuzzer on decode/dispatch)", &mut rows, &mut || fuzz::rows(q, runs, build));
    }
    if wanted("live-fuzz") {
        let cfg = live_fuzz::LiveFuzzConfig {
            phases: if q { 3 } else { 15 },
            window: Duration::from_millis(if q { 700 } else { 2000 }),
            fuzz_threads: if q { 2 } else { 4 },
            rate: 250.0,
            slow_clients: if q { 4 } else { 16 },
            seed: 8,
            gate_latency: !q,
        };
        section("live fuzz", &mut rows, &mut || match home(root.path(), "live-fuzz").and_then(|h| Daemon::start(&bins, &h, &[])) {
            Ok(mut d) => live_fuzz::rows(&mut d, &cfg),
            Err(e) => vec![Row::error("live fuzz: start daemon", &e)],
        });
    }
    if wanted("load") {
        let clients = args.clients.unwrap_or(if q { 16 } else { 64 });
        let per = args.requests.unwrap_or(if q { 1000 } else { 10_000 });
        section("load", &mut rows, &mut || match home(root.path(), "load").and_then(|h| Daemon::start(&bins, &h, &[])) {
            Ok(mut d) => load::rows(&mut d, clients, per, if q { 2000 } else { 20_000 }),
            Err(e) => vec![Row::error("load: start daemon", &e)],
        });
    }
    if wanted("security") {
        section("security", &mut rows, &mut || {
            let scratch = match home(root.path(), "security").and_then(|s| home(&s, "scratch").map(|x| (s, x))) {
                Ok(v) => v,
                Err(e) => return vec![Row::error("security: scratch", &e)],
            };
            let mut rows = match Daemon::start(&bins, &scratch.0.join("home"), &[]) {
                Ok(mut d) => security::rows(&mut d, &scratch.1),
                Err(e) => vec![Row::error("security: start daemon", &e)],
            };
            for (bug, dir) in [(security::PlantedBug::Split, "planted"), (security::PlantedBug::Fusion, "planted-fusion")] {
                let label = bug.label();
                rows.push(security::planted_wrong_session_row(&bins, &scratch.0.join(dir), bug).unwrap_or_else(|e| Row::error(label, &e)));
            }
            rows
        });
    }
    if wanted("faults") {
        let opts = faults::FaultOptions { kills: args.kills.unwrap_or(if q { 5 } else { 30 }), quick: q };
        section("faults", &mut rows, &mut || faults::rows(&bins, root.path(), &opts));
    }

    let (pass, fail, skip) = report::tally(&rows);
    let when = tilewise::store::now();
    let header = format!(
        "tilewise reliability suite — {} — {} form, {:.0} s on {} ({} cores)\n",
        when,
        if q { "quick" } else { "full" },
        started.elapsed().as_secs_f64(),
        std::env::consts::OS,
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)
    );
    let table = report::table(&rows);
    let footer = format!("\n{pass} passed, {fail} failed, {skip} skipped\n");
    println!("\n{header}\n{table}{footer}");
    if let Some(out) = &args.out {
        std::fs::write(out, format!("{header}\n{table}{footer}")).with_context(|| format!("writing {}", out.display()))?;
    }
    if args.keep {
        let kept = root.keep();
        eprintln!("kept: {}", kept.display());
    }
    Ok(fail > 0)
}
