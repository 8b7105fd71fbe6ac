//! Fault injection against the real daemon and its real worker, each fault in its own home:
//!
//! - `kill -9` of the daemon, many times, during one tuning session (resumed after each restart);
//! - worker hang, crash, garbage and out-of-memory, through the worker's fault switch
//!   (`TILEWISE_WORKER_FAULT=evaluate:<kind>`, docs/worker-protocol.md);
//! - the database file made read-only under a running session (`chattr +i`: see [`read_only`]);
//! - the disk full (the home on a small tmpfs, filled up by a filler file mid-session);
//! - the database file corrupted while the daemon is stopped.
//!
//! For each: the daemon survives (answers a fresh client), no committed trial is lost (every
//! measurement and failed candidate seen before the fault is still there, unchanged, after it), and
//! the reason of each failure is stored (a non-empty reason on each failed candidate / worker
//! failure / session).
//!
//! "Committed" means visible to another connection on the database file, which is read directly
//! (read-only) between the steps.

use crate::client::{codes, error_code, unknown_model_params};
use crate::harness::{Binaries, Daemon};
use crate::report::{Row, Verdict};
use anyhow::{anyhow, bail, Context, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rusqlite::{Connection, OpenFlags, OptionalExtension};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

pub struct FaultOptions {
    /// kill -9 cycles during the kill test.
    pub kills: u32,
    pub quick: bool,
}

// ---------------------------------------------------------------- what is committed

/// One committed measurement, as another reader sees it.
#[derive(Debug, Clone, PartialEq)]
struct Trial {
    candidate: i64,
    correct: bool,
    ratio: Option<f64>,
    samples: i64,
}

#[derive(Debug, Clone, Default)]
struct Snapshot {
    measurements: BTreeMap<i64, Trial>,
    /// Failed candidates and their stored reason.
    failed: BTreeMap<i64, Option<String>>,
    /// Worker failures: (kind, message).
    worker_failures: Vec<(String, String)>,
}

impl Snapshot {
    fn trials(&self) -> usize {
        self.measurements.len() + self.failed.len()
    }
    fn samples(&self) -> i64 {
        self.measurements.values().map(|t| t.samples).sum()
    }
    /// What `before` had that `self` lost or changed.
    fn lost_from(&self, before: &Snapshot) -> Vec<String> {
        let mut lost = Vec::new();
        for (id, t) in &before.measurements {
            match self.measurements.get(id) {
                Some(now) if now == t => {}
                Some(now) => lost.push(format!("measurement {id} changed: {t:?} → {now:?}")),
                None => lost.push(format!("measurement {id} lost")),
            }
        }
        for (id, reason) in &before.failed {
            // A failed candidate may later be measured again (not lost); its row must remain.
            if !self.failed.contains_key(id) && !self.measurements.values().any(|t| t.candidate == *id) {
                lost.push(format!("failed candidate {id} ({reason:?}) lost"));
            }
        }
        lost
    }
}

fn open_ro(db: &Path) -> Result<Connection> {
    let c = Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)
        .with_context(|| format!("opening {} read-only", db.display()))?;
    c.busy_timeout(Duration::from_secs(10))?;
    Ok(c)
}

fn snapshot(db: &Path) -> Result<Snapshot> {
    let c = open_ro(db)?;
    let mut s = Snapshot::default();
    let mut q = c.prepare(
        "SELECT m.id, m.candidate_id, m.correct, m.ratio, (SELECT count(*) FROM samples s WHERE s.measurement_id = m.id)
         FROM measurements m",
    )?;
    for r in
        q.query_map([], |r| Ok((r.get(0)?, Trial { candidate: r.get(1)?, correct: r.get(2)?, ratio: r.get(3)?, samples: r.get(4)? })))?
    {
        let (id, t) = r?;
        s.measurements.insert(id, t);
    }
    let mut q = c.prepare("SELECT id, failure_reason FROM candidates WHERE status = 'failed'")?;
    for r in q.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))? {
        let (id, reason) = r?;
        s.failed.insert(id, reason);
    }
    let mut q = c.prepare("SELECT kind, message FROM worker_failures ORDER BY id")?;
    for r in q.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))? {
        s.worker_failures.push(r?);
    }
    Ok(s)
}

/// A session as the checks read it straight from the database: (state, reason, evaluations, failures).
type SessionRow = (String, Option<String>, i64, i64);

fn session_row(db: &Path, sid: i64) -> Result<Option<SessionRow>> {
    let c = open_ro(db)?;
    Ok(c.query_row("SELECT state, reason, evaluations, failures FROM sessions WHERE id = ?1", [sid], |r| {
        Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
    })
    .optional()?)
}

/// Policies stored twice in one session: work a restart repeated. The incumbent's re-measurement
/// row (origin `incumbent`) shares the promoted candidate's hash on purpose, so it is counted apart.
fn duplicate_candidates(db: &Path, sid: i64) -> Result<i64> {
    let c = open_ro(db)?;
    Ok(c.query_row(
        "SELECT count(*) FROM (SELECT hash FROM candidates WHERE session_id = ?1
                               GROUP BY hash, origin = 'incumbent' HAVING count(*) > 1)",
        [sid],
        |r| r.get(0),
    )?)
}

// ---------------------------------------------------------------- sessions over the socket

/// A small, fast session on the tiny synthetic model.
fn session_params(evaluations: u64, seed: u64, policies: Option<Vec<Value>>, evaluate_timeout_s: Option<u64>) -> Value {
    let mut p = json!({
        "model": "synthetic:tiny",
        "budget": {"evaluations": evaluations},
        "seed": seed,
        "pairs": 2,
        "warmup": 0,
        "shape_pairs": 2,
    });
    if let Some(list) = policies {
        p["policies"] = json!(list);
    }
    if let Some(t) = evaluate_timeout_s {
        p["evaluate_timeout_s"] = json!(t);
    }
    p
}

/// Why a session-dependent check cannot run in this build (tuning not plugged into the daemon).
#[derive(Debug)]
struct NotAvailable(String);
impl std::fmt::Display for NotAvailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "tuning not available in this build of tilewised: {}", self.0)
    }
}
impl std::error::Error for NotAvailable {}

/// `tuning.start`; returns (session id, resumed).
fn start_session(d: &Daemon, params: &Value) -> Result<(i64, bool)> {
    let mut c = d.client()?;
    c.set_timeout(Duration::from_secs(300))?; // the first start synthesizes the model
    match c.call("tuning.start", params.clone())? {
        Ok(r) => Ok((
            r.get("session_id").and_then(Value::as_i64).ok_or_else(|| anyhow!("tuning.start result without session_id: {r}"))?,
            r.get("resumed").and_then(Value::as_bool).unwrap_or(false),
        )),
        Err(e) if error_code(&e) == codes::NOT_AVAILABLE => Err(NotAvailable(e.to_string()).into()),
        Err(e) => bail!("tuning.start refused: {e}"),
    }
}

fn is_terminal(state: &str) -> bool {
    matches!(state, "finished" | "failed" | "stopped")
}

/// Waits until the session reaches a terminal state; returns (state, reason).
fn wait_session_end(d: &Daemon, sid: i64, timeout: Duration) -> Result<(String, Option<String>)> {
    let t0 = Instant::now();
    loop {
        if let Some((state, reason, _, _)) = session_row(&d.db, sid)? {
            if is_terminal(&state) {
                return Ok((state, reason));
            }
        }
        if t0.elapsed() > timeout {
            bail!("session {sid} did not end within {timeout:?}; daemon log:\n{}", d.log_tail(15));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Which session the daemon is running now (`status.tuning.session_id`).
fn running_session(d: &Daemon) -> Option<i64> {
    let mut c = d.client().ok()?;
    let s = c.call("status", json!({})).ok()?.ok()?;
    s.pointer("/tuning/session_id").and_then(Value::as_i64)
}

/// A fault this machine cannot inject (not root, not Linux): the row is skipped with the reason.
#[derive(Debug)]
struct Unsupported(String);
impl std::fmt::Display for Unsupported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "cannot inject here: {}", self.0)
    }
}
impl std::error::Error for Unsupported {}

fn skip_or_error(check: &str, e: anyhow::Error) -> Row {
    if let Some(na) = e.downcast_ref::<NotAvailable>() {
        Row::new(check, na.to_string(), "runs", Verdict::Skip)
    } else if let Some(u) = e.downcast_ref::<Unsupported>() {
        Row::new(check, u.to_string(), "runs", Verdict::Skip)
    } else {
        Row::error(check, &e)
    }
}

// ---------------------------------------------------------------- kill -9 at scale

fn kill9(bins: &Binaries, root: &Path, o: &FaultOptions) -> Result<Row> {
    let home = crate::home(root, "kill9")?;
    let mut d = Daemon::start(bins, &home, &[("TILEWISE_LOG", "info")])?;
    // Short sessions, one after another: the kills continue across session boundaries, so their
    // number does not depend on how fast this machine measures.
    let params = |seed: u64| session_params(6, seed, None, None);
    let mut seed = 7;
    let (mut sid, _) = start_session(&d, &params(seed))?;
    let mut sessions = vec![sid];
    let budget = Duration::from_secs(if o.quick { 150 } else { 900 });
    let t0 = Instant::now();
    let mut rng = StdRng::seed_from_u64(9);
    let mut seen = Snapshot::default(); // union of everything seen committed before any kill
    let (mut kills, mut restarts_ok, mut resumed_ok) = (0u32, 0u32, 0u32);
    let mut lost: Vec<String> = Vec::new();
    while kills < o.kills && t0.elapsed() < budget {
        if session_row(&d.db, sid)?.map(|r| is_terminal(&r.0)).unwrap_or(false) {
            seed += 1;
            sid = start_session(&d, &params(seed))?.0;
            sessions.push(sid);
        }
        // Alternate the moment: right after a commit plus a random part of the next measurement
        // (odd kills), or at a random time after the restart — during worker start, model load,
        // screening (even kills).
        let base = snapshot(&d.db)?.trials();
        if kills % 2 == 1 {
            let w0 = Instant::now();
            while snapshot(&d.db)?.trials() == base && w0.elapsed() < Duration::from_secs(60) {
                std::thread::sleep(Duration::from_millis(50));
            }
            std::thread::sleep(Duration::from_millis(rng.random_range(0..1500)));
        } else {
            std::thread::sleep(Duration::from_millis(rng.random_range(300..3000)));
        }
        let before = snapshot(&d.db)?;
        let was_running = session_row(&d.db, sid)?.map(|r| !is_terminal(&r.0)).unwrap_or(false);
        d.kill9();
        kills += 1;
        for (id, t) in before.measurements.iter() {
            seen.measurements.insert(*id, t.clone());
        }
        for (id, r) in before.failed.iter() {
            seen.failed.insert(*id, r.clone());
        }
        d.restart().with_context(|| format!("restart after kill {kills}"))?;
        restarts_ok += 1;
        lost.extend(snapshot(&d.db)?.lost_from(&before));
        if !was_running {
            resumed_ok += 1; // nothing to resume: the session had just finished
            continue;
        }
        // The daemon resumes an interrupted session by itself; if not, tuning.start must resume
        // the same session rather than start a new one.
        let w0 = Instant::now();
        let mut resumed = false;
        while w0.elapsed() < Duration::from_secs(20) {
            if running_session(&d) == Some(sid) {
                resumed = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        if !resumed {
            let (again, was_resumed) = start_session(&d, &params(seed))?;
            resumed = again == sid && was_resumed;
        }
        if resumed {
            resumed_ok += 1;
        }
    }
    let end = wait_session_end(&d, sid, Duration::from_secs(if o.quick { 240 } else { 400 }))?;
    let fin = snapshot(&d.db)?;
    lost.extend(fin.lost_from(&seen));
    let mut dups = 0;
    let mut states = Vec::new();
    for s in &sessions {
        dups += duplicate_candidates(&d.db, *s)?;
        states.push(session_row(&d.db, *s)?.map(|r| r.0).unwrap_or_else(|| "missing".into()));
    }
    let all_finished = states.iter().all(|s| s == "finished");
    let unexplained = fin.failed.values().filter(|r| r.as_deref().unwrap_or("").trim().is_empty()).count();
    let alive = d.answers();
    let ok = kills == o.kills
        && restarts_ok == kills
        && resumed_ok == kills
        && lost.is_empty()
        && dups == 0
        && unexplained == 0
        && alive
        && all_finished
        && end.0 == "finished";
    Ok(Row::pass_if(
        "faults: kill -9 during sessions",
        format!(
            "{kills} kills, {restarts_ok} restarts, {resumed_ok} resumed; {} sessions all finished: {all_finished}; {} trials ({} samples) committed, lost {}{}; duplicate candidates {dups}; failures without reason {unexplained}",
            sessions.len(),
            fin.trials(),
            fin.samples(),
            lost.len(),
            lost.first().map(|l| format!(" (first: {l})")).unwrap_or_default(),
        ),
        "all survived, 0 lost",
        ok,
    ))
}

// ---------------------------------------------------------------- worker faults

/// A valid policy the session measures as given (its target is replaced by the session's).
fn fixed_policy(name: &str, tile_k: u64) -> Value {
    json!({
        "schema": "tilewise.policy/1",
        "name": name,
        "target": {"device": "*", "model": "*", "mlx": "*", "backend": "*"},
        "matmul": {"rules": [{"m": [2, null], "plan": {"kind": "split", "tile_m": null, "tile_n": null, "tile_k": tile_k}}],
                   "default": {"kind": "native"}}
    })
}

/// Worker faults, one home: a clean session first (committed trials to protect), then for each
/// fault kind a daemon whose workers fault on every `evaluate` runs a session of `per_kind`
/// evaluations. After each: the daemon answered throughout, every earlier trial is intact, and
/// each new failure has its reason stored (on the candidate and in worker_failures).
fn worker_faults(bins: &Binaries, root: &Path, kinds: &[&str], per_kind: u64) -> Vec<Row> {
    let home = match crate::home(root, "worker-faults") {
        Ok(h) => h,
        Err(e) => return vec![Row::error("faults: worker", &e)],
    };
    let clean = (|| -> Result<()> {
        let mut d = Daemon::start(bins, &home, &[])?;
        let (sid0, _) = start_session(&d, &session_params(1, 3, Some(vec![fixed_policy("clean", 16)]), None))?;
        wait_session_end(&d, sid0, Duration::from_secs(240))?;
        anyhow::ensure!(!snapshot(&d.db)?.measurements.is_empty(), "the clean session committed no measurement");
        d.terminate(Duration::from_secs(30));
        Ok(())
    })();
    if let Err(e) = clean {
        return kinds.iter().map(|k| skip_or_error(&format!("faults: worker {k}"), anyhow!("{e:#}"))).collect();
    }
    kinds
        .iter()
        .enumerate()
        .map(|(i, kind)| {
            let check = format!("faults: worker {kind}");
            worker_fault(bins, &home, kind, per_kind, 100 + i as u64).unwrap_or_else(|e| skip_or_error(&check, e))
        })
        .collect()
}

fn worker_fault(bins: &Binaries, home: &Path, kind: &str, per_kind: u64, seed: u64) -> Result<Row> {
    let before = snapshot(&tilewise::paths::Paths::under_home(home).db_file)?;
    let fault = format!("evaluate:{kind}");
    let mut d = Daemon::start(bins, home, &[("TILEWISE_WORKER_FAULT", fault.as_str())])?;
    let t0 = Instant::now();
    let policies: Vec<Value> = (0..per_kind).map(|j| fixed_policy(&format!("{kind}-{j}"), 32 << j)).collect();
    let (sid, _) = start_session(&d, &session_params(per_kind, seed, Some(policies), Some(10)))?;
    // While the worker misbehaves, other clients keep being served.
    let (mut asked, mut served) = (0, 0);
    let mut end = None;
    while t0.elapsed() < Duration::from_secs(300) {
        asked += 1;
        if d.answers() {
            served += 1;
        }
        if let Some((state, reason, _, _)) = session_row(&d.db, sid)? {
            if is_terminal(&state) {
                end = Some((state, reason));
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let Some((state, reason)) = end else { bail!("session with worker {kind} did not end in 300 s; log:\n{}", d.log_tail(20)) };
    let after = snapshot(&d.db)?;
    d.terminate(Duration::from_secs(30));
    let lost = after.lost_from(&before);
    let new_failures: Vec<&(String, String)> = after.worker_failures.iter().skip(before.worker_failures.len()).collect();
    let failed_now: Vec<(&i64, &Option<String>)> = after.failed.iter().filter(|(id, _)| !before.failed.contains_key(id)).collect();
    let reasons_stored = !failed_now.is_empty()
        && new_failures.len() >= failed_now.len()
        && failed_now.iter().all(|(_, r)| r.as_deref().is_some_and(|r| !r.trim().is_empty()))
        && new_failures.iter().all(|(k, m)| k == kind && !m.trim().is_empty());
    let alive = served == asked;
    let example = new_failures.first().map(|(k, m)| format!("{k}: {m}")).unwrap_or_default();
    Ok(Row::pass_if(
        format!("faults: worker {kind}"),
        format!(
            "daemon answered {served}/{asked} probes meanwhile; session {state}{}; {} candidates failed, {} worker failures stored (e.g. {:.80}); lost {} of {} earlier trials",
            reason.map(|r| format!(" ({r:.40})")).unwrap_or_default(),
            failed_now.len(),
            new_failures.len(),
            example,
            lost.len(),
            before.trials()
        ),
        "survived, 0 lost, reason stored",
        alive && lost.is_empty() && reasons_stored,
    ))
}

// ---------------------------------------------------------------- storage faults

fn sh(cmd: &str, args: &[&str]) -> Result<()> {
    let out = Command::new(cmd).args(args).output().with_context(|| format!("running {cmd}"))?;
    if !out.status.success() {
        bail!("{cmd} {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Unmounts on drop, so a failing check never leaves a mount behind.
struct Mount(PathBuf);
impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn can_mount() -> Result<()> {
    if !cfg!(target_os = "linux") || unsafe { libc::geteuid() } != 0 {
        return Err(Unsupported("needs root on Linux to mount a tmpfs".into()).into());
    }
    Ok(())
}

/// Runs a session, lets it commit at least `min_trials`, applies `fault`, keeps the session going
/// for `hold`, removes the fault, and checks survival, losses and stored reasons.
fn storage_fault(
    bins: &Binaries,
    home: &Path,
    check: &str,
    min_trials: usize,
    hold: Duration,
    apply: &mut dyn FnMut() -> Result<()>,
    undo: &mut dyn FnMut() -> Result<()>,
) -> Result<Row> {
    let mut d = Daemon::start(bins, home, &[("TILEWISE_LOG", "info")])?;
    let params = session_params(40, 11, None, None);
    let (sid, _) = start_session(&d, &params)?;
    let w0 = Instant::now();
    while snapshot(&d.db)?.trials() < min_trials {
        if w0.elapsed() > Duration::from_secs(240) {
            bail!("no {min_trials} trials committed in 240 s; log:\n{}", d.log_tail(15));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let before = snapshot(&d.db)?;
    let log_mark = d.log_text().len();
    apply()?;
    // During the fault: reads keep being served.
    let h0 = Instant::now();
    let (mut asked, mut answered) = (0, 0);
    // At least `hold`, and longer (up to 4×) until the daemon has run into the fault and said so.
    while h0.elapsed() < hold || (first_warning(&d.log_text(), log_mark).is_none() && h0.elapsed() < hold * 4) {
        asked += 1;
        if d.answers() {
            answered += 1;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let alive_during = d.alive();
    undo()?;
    std::thread::sleep(Duration::from_millis(500));
    let alive_after = d.alive() && d.answers();
    // Once the fault is gone the session must continue (or be resumable) and record why it stopped.
    let (state, reason, _, _) = session_row(&d.db, sid)?.ok_or_else(|| anyhow!("session {sid} vanished"))?;
    let mut resumed = "running on".to_string();
    if is_terminal(&state) || running_session(&d) != Some(sid) {
        let (again, _) = start_session(&d, &params)?;
        let why = reason.clone().map(|r| format!(" ({r})")).unwrap_or_default();
        resumed =
            if again == sid { format!("stored as {state}{why}, resumed") } else { format!("stored as {state}{why}, new session {again}") };
    }
    let w1 = Instant::now();
    while snapshot(&d.db)?.trials() <= before.trials() && w1.elapsed() < Duration::from_secs(120) {
        std::thread::sleep(Duration::from_millis(200));
    }
    let after = snapshot(&d.db)?;
    let lost = after.lost_from(&before);
    let progressed = after.trials() > before.trials();
    // The daemon's own account of the fault (the database may not have been writable to hold it).
    let log = d.log_text();
    let logged = first_warning(&log, log_mark).unwrap_or_default();
    let _ = d.client().and_then(|mut c| c.call("tuning.stop", json!({})));
    let integrity = open_ro(&d.db)?.query_row("PRAGMA integrity_check", [], |r| r.get::<_, String>(0))?;
    let unexplained = after.failed.values().filter(|r| r.as_deref().unwrap_or("").trim().is_empty()).count();
    let error_logged = !logged.is_empty();
    let ok = alive_during && alive_after && lost.is_empty() && progressed && integrity == "ok" && unexplained == 0 && error_logged;
    Ok(Row::pass_if(
        check.to_string(),
        format!(
            "alive during/after: {alive_during}/{alive_after}, reads served {answered}/{asked}; session after: {resumed}; trials {} → {}, lost {}; integrity {integrity}; failures without reason {unexplained}; reason logged: {:.110}",
            before.trials(),
            after.trials(),
            lost.len(),
            if logged.is_empty() { "none".to_string() } else { logged.clone() }
        ),
        "survived, 0 lost, reason stored",
        ok,
    ))
}

/// The database file (and its WAL) made read-only under a running session. As root, a chmod is
/// ignored (and an already-open descriptor keeps its write access anyway); a read-only remount is
/// refused while the daemon holds files open for writing (EBUSY). The immutable attribute
/// (`chattr +i`) is what takes write access away from a running process on ext4: its next write
/// gets EPERM.
fn read_only(bins: &Binaries, root: &Path) -> Result<Row> {
    if unsafe { libc::geteuid() } != 0 || !cfg!(target_os = "linux") {
        return Err(Unsupported("needs root on Linux (chattr +i)".into()).into());
    }
    let home = crate::home(root, "read-only")?;
    let db = tilewise::paths::Paths::under_home(&home).db_file;
    let files =
        move || -> Vec<String> { ["", "-wal"].iter().map(|s| format!("{}{s}", db.display())).filter(|p| Path::new(p).exists()).collect() };
    let f2 = files.clone();
    let mut apply = move || {
        for f in files() {
            sh("chattr", &["+i", &f])?;
        }
        Ok(())
    };
    let mut undo = move || {
        for f in f2() {
            sh("chattr", &["-i", &f])?;
        }
        Ok(())
    };
    storage_fault(bins, &home, "faults: database read-only (chattr +i mid-session)", 2, Duration::from_secs(10), &mut apply, &mut undo)
}

fn disk_full(bins: &Binaries, root: &Path) -> Result<Row> {
    can_mount()?;
    let home = crate::home(root, "disk-full")?;
    let hs = home.to_str().context("home path")?.to_string();
    // Big enough for the tiny synthetic model, the database and logs; then a filler takes the rest.
    sh("mount", &["-t", "tmpfs", "-o", "size=256m,mode=0755", "tmpfs", &hs])?;
    let _m = Mount(home.clone());
    let filler = home.join("filler");
    let f2 = filler.clone();
    let db = tilewise::paths::Paths::under_home(&home).db_file;
    let mut apply = move || {
        // The WAL is reused in place after a checkpoint, so a full disk alone may never reach the
        // daemon's commits: empty the WAL first, and its next commit must allocate.
        truncate_wal(&db)?;
        // Fill until ENOSPC (a write error is the point), to the last byte: a 1 MiB write that
        // fails can leave most of a MiB free, enough for many small commits.
        let mut f = std::fs::File::create(&filler)?;
        use std::io::Write;
        for size in [1 << 20, 4096, 1] {
            let chunk = vec![0u8; size];
            while f.write_all(&chunk).is_ok() {}
        }
        let _ = f.sync_all();
        Ok(())
    };
    let mut undo = move || Ok(std::fs::remove_file(&f2)?);
    storage_fault(bins, &home, "faults: disk full (256 MiB tmpfs filled mid-session)", 2, Duration::from_secs(8), &mut apply, &mut undo)
}

/// The daemon's first WARN or ERROR line in `log` after byte `mark`, from its module path on.
fn first_warning(log: &str, mark: usize) -> Option<String> {
    log.get(mark..)?
        .lines()
        .map(strip_ansi)
        .find(|l| l.contains("WARN") || l.contains("ERROR"))
        .map(|l| l.split_once(" tilewise").map(|(_, rest)| format!("tilewise{rest}")).unwrap_or(l))
}

/// `PRAGMA wal_checkpoint(TRUNCATE)` from a connection of our own, retried while the daemon's
/// transactions keep it busy.
fn truncate_wal(db: &Path) -> Result<()> {
    let c = Connection::open(db)?;
    c.busy_timeout(Duration::from_secs(5))?;
    for _ in 0..100 {
        let busy: i64 = c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get(0))?;
        if busy == 0 {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("the WAL of {} stayed busy; cannot truncate it", db.display())
}

/// Corrupts pages of a stopped daemon's database (keeping the 100-byte header, so SQLite opens it
/// and only an integrity check finds the damage), then restarts the daemon.
fn corrupted(bins: &Binaries, root: &Path) -> Result<Row> {
    let home = crate::home(root, "corrupt")?;
    let mut d = Daemon::start(bins, &home, &[])?;
    // Give the database some content through the real daemon (a hello event per client).
    for _ in 0..50 {
        let _ = d.client()?.call("policy.get", unknown_model_params("corrupt"))?;
    }
    anyhow::ensure!(d.terminate(Duration::from_secs(30)), "daemon did not stop on SIGTERM");
    let db = d.db.clone();
    let mut bytes = std::fs::read(&db)?;
    let page = 4096;
    anyhow::ensure!(bytes.len() >= 4 * page, "database unexpectedly small ({} bytes)", bytes.len());
    let mut rng = StdRng::seed_from_u64(5);
    for p in 1..bytes.len() / page {
        // Scramble the b-tree page headers and some cells: structure damage integrity_check sees.
        for i in 0..64 {
            bytes[p * page + i] = rng.random();
        }
    }
    std::fs::write(&db, &bytes)?;
    let corrupt_copy = bytes;
    let started = d.restart();
    let log = d.log_text();
    let moved: Vec<PathBuf> = std::fs::read_dir(&home)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("tilewise.db.corrupt")))
        .filter(|p| !p.to_string_lossy().ends_with("-wal") && !p.to_string_lossy().ends_with("-shm"))
        .collect();
    let preserved = moved.iter().any(|p| std::fs::read(p).map(|b| b == corrupt_copy).unwrap_or(false));
    let fresh_ok = started.is_ok()
        && open_ro(&db)
            .and_then(|c| Ok(c.query_row("PRAGMA integrity_check", [], |r| r.get::<_, String>(0))?))
            .map(|s| s == "ok")
            .unwrap_or(false);
    let message = log
        .lines()
        .map(strip_ansi)
        .find(|l| l.contains("corrupt"))
        .map(|l| l.find("database ").map(|i| l[i..].to_string()).unwrap_or(l))
        .unwrap_or_default();
    let alive = started.is_ok() && d.answers();
    let logged = !message.is_empty();
    Ok(Row::pass_if(
        "faults: corrupted database file",
        format!(
            "daemon {}; moved aside byte-identical: {preserved} ({}); fresh database ok: {fresh_ok}; message: {:.140}",
            if alive { "serving" } else { "not serving" },
            moved.first().and_then(|p| p.file_name()).map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "none".into()),
            if message.is_empty() { started.err().map(|e| format!("{e:#}")).unwrap_or_else(|| "none logged".into()) } else { message }
        ),
        "detected, moved aside, never overwritten",
        alive && preserved && fresh_ok && logged,
    ))
}

/// The daemon's stderr log carries terminal colour codes; figures show plain text.
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

pub fn rows(bins: &Binaries, root: &Path, o: &FaultOptions) -> Vec<Row> {
    let step = |name: &str, r: Result<Row>| r.unwrap_or_else(|e| skip_or_error(name, e));
    let mut rows =
        vec![step("faults: corrupted database file", corrupted(bins, root)), step("faults: kill -9 during sessions", kill9(bins, root, o))];
    rows.extend(worker_faults(bins, root, &["crash", "garbage", "oom", "hang"], if o.quick { 1 } else { 3 }));
    rows.push(step("faults: database read-only", read_only(bins, root)));
    rows.push(step("faults: disk full", disk_full(bins, root)));
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_colour_codes() {
        assert_eq!(strip_ansi("\u{1b}[2m12:00\u{1b}[0m \u{1b}[31mERROR\u{1b}[0m database x"), "12:00 ERROR database x");
    }

    #[test]
    fn lost_trials_are_named() {
        let t = |c, r| Trial { candidate: c, correct: true, ratio: Some(r), samples: 4 };
        let mut before = Snapshot::default();
        before.measurements.insert(1, t(10, 1.0));
        before.measurements.insert(2, t(11, 1.1));
        before.failed.insert(12, Some("crash".into()));
        let mut after = before.clone();
        assert!(after.lost_from(&before).is_empty());
        after.measurements.remove(&1);
        after.measurements.insert(2, t(11, 1.2));
        after.failed.clear();
        let lost = after.lost_from(&before);
        assert_eq!(lost.len(), 3, "{lost:?}");
        // A failed candidate measured later is not lost.
        let mut later = before.clone();
        later.failed.clear();
        later.measurements.insert(3, t(12, 1.0));
        assert!(later.lost_from(&before).is_empty());
    }
}
