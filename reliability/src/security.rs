//! Security checks against the real daemon:
//! - the socket's directory is 0700 and the socket 0600;
//! - a client of another UID is refused, twice over: by the directory's mode, and — with the
//!   directory and socket deliberately loosened for the test — by the daemon's own peer-UID check;
//! - policy content is inert data: a policy whose strings are shell and Python code is stored,
//!   served byte for byte, and nothing runs;
//! - a policy that failed the correctness gate is never served, however fast it measured.
//!
//! The other-UID client is this same binary (`tilewise-reliability connect-probe SOCKET`) started
//! through `setpriv --reuid=nobody`; it prints one word saying what happened.

use crate::client::{Client, Wire};
use crate::harness::{Binaries, Daemon};
use crate::report::{Row, Verdict};
use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use tilewise::policy::Policy;
use tilewise::store::{BestKey, Budget, NewCandidate, NewMeasurement, NewSession, Promotion, Store};

/// What `connect-probe` prints (one line): how far a connection got.
pub fn connect_probe(socket: &Path) -> String {
    let mut c = match Client::connect(socket, Duration::from_secs(5)) {
        Ok(c) => c,
        Err(e) => return format!("refused-connect {}", e.root_cause()),
    };
    let hello = json!({"jsonrpc":"2.0","id":1,"method":"hello","params":{"client":"intruder","protocol":1}});
    if c.send_raw(format!("{hello}\n").as_bytes()).is_err() {
        return "closed".into();
    }
    match c.read_line() {
        Ok(Wire::Line(l)) if l.contains("\"result\"") => format!("answered {l:.200}"),
        Ok(Wire::Line(l)) => format!("error-reply {l:.200}"),
        Ok(Wire::Closed) => "closed".into(),
        Ok(Wire::Silent) => "silent".into(),
        Err(e) => format!("closed {e}"),
    }
}

fn mode(p: &Path) -> Result<u32> {
    Ok(std::fs::metadata(p).with_context(|| format!("stat {}", p.display()))?.permissions().mode() & 0o777)
}

/// Runs `connect-probe` as `nobody`. `None` when this process cannot switch users (not root, or no
/// setpriv): the check is then skipped with that reason.
fn probe_as_nobody(exe: &Path, socket: &Path) -> Result<String> {
    if unsafe { libc::geteuid() } != 0 {
        bail!("not root: cannot start a client under another UID");
    }
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(exe)
        .arg("connect-probe")
        .arg(socket)
        .output()
        .context("running setpriv (util-linux)")?;
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if text.is_empty() {
        bail!("connect-probe as nobody printed nothing (exit {}): {}", out.status, String::from_utf8_lossy(&out.stderr));
    }
    Ok(text)
}

/// The binary must be executable by `nobody`: copy it somewhere world-readable when its own path
/// is not (e.g. under a 0700 home).
fn exe_for_nobody(scratch: &Path) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let copy = scratch.join("tilewise-reliability-probe");
    std::fs::copy(&exe, &copy)?;
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755))?;
    std::fs::set_permissions(scratch, std::fs::Permissions::from_mode(0o755))?;
    Ok(copy)
}

fn other_uid_rows(daemon: &Daemon, scratch: &Path) -> Vec<Row> {
    let scratch_root = scratch.parent().unwrap_or(scratch);
    let mut rows = Vec::new();
    let run_dir = daemon.socket.parent().unwrap().to_path_buf();
    let modes = (mode(&run_dir), mode(&daemon.socket));
    match &modes {
        (Ok(d), Ok(s)) => rows.push(Row::pass_if(
            "security: socket dir and file modes",
            format!("dir {d:o}, socket {s:o}, owner uid {}", std::fs::metadata(&run_dir).map(|m| m.uid()).unwrap_or(u32::MAX)),
            "0700 / 0600",
            *d == 0o700 && *s == 0o600,
        )),
        (d, s) => rows.push(Row::new("security: socket dir and file modes", format!("{d:?} {s:?}"), "0700 / 0600", Verdict::Fail)),
    }
    let exe = match exe_for_nobody(scratch) {
        Ok(e) => e,
        Err(e) => {
            rows.push(Row::error("security: other UID", &e));
            return rows;
        }
    };
    // 1. As deployed: the directory alone keeps the other user out.
    match probe_as_nobody(&exe, &daemon.socket) {
        Ok(out) => rows.push(Row::pass_if(
            "security: other UID, as deployed (0700 dir)",
            out.clone(),
            "refused",
            out.starts_with("refused-connect") || out.starts_with("closed"),
        )),
        Err(e) => rows.push(Row::new("security: other UID, as deployed (0700 dir)", format!("{e:#}"), "refused", Verdict::Skip)),
    }
    // 2. Directory and socket opened to everyone: only the daemon's peer-UID check remains.
    let loosen = || -> Result<()> {
        std::fs::set_permissions(&run_dir, std::fs::Permissions::from_mode(0o755))?;
        std::fs::set_permissions(&daemon.socket, std::fs::Permissions::from_mode(0o666))?;
        // The path down to the socket must be traversable by nobody: open up the suite's own
        // temp dirs (never anything above the scratch root).
        let mut p = run_dir.parent();
        while let Some(dir) = p.filter(|d| d.starts_with(scratch_root)) {
            let m = mode(dir)?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(m | 0o005))?;
            p = dir.parent();
        }
        Ok(())
    };
    let result = loosen().and_then(|_| probe_as_nobody(&exe, &daemon.socket));
    let restored = std::fs::set_permissions(&run_dir, std::fs::Permissions::from_mode(0o700))
        .and_then(|_| std::fs::set_permissions(&daemon.socket, std::fs::Permissions::from_mode(0o600)));
    match result {
        Ok(out) => rows.push(Row::pass_if(
            "security: other UID, dir loosened (daemon's peer-UID check)",
            out.clone(),
            "closed, no answer",
            !out.starts_with("answered") && !out.starts_with("refused-connect"),
        )),
        Err(e) => rows.push(Row::new(
            "security: other UID, dir loosened (daemon's peer-UID check)",
            format!("{e:#}"),
            "closed, no answer",
            Verdict::Skip,
        )),
    }
    if restored.is_err() || !daemon.answers() {
        rows.push(Row::new("security: modes restored, owner still served", format!("{restored:?}"), "ok", Verdict::Fail));
    }
    rows
}

/// A policy that is valid data but whose free-text fields are code that would leave marker files
/// if anything ever evaluated them (shell, Python, a format string).
fn code_bearing_policy(device: &str, marks: &Path) -> Value {
    let m = |i: u32| marks.join(format!("m{i}")).display().to_string();
    json!({
        "schema": "tilewise.policy/1",
        "name": format!("$(touch {}); `touch {}`; __import__('os').system('touch {}') {{0.__class__}}", m(1), m(2), m(3)),
        "target": {
            "device": device,
            "model": format!("x';import os;os.system('touch {}')#", m(4)),
            "mlx": "0.32.4",
            "backend": "cpu"
        },
        "matmul": {"rules": [{"m": [1, 1], "plan": {"kind": "native"}}], "default": {"kind": "native"}}
    })
}

fn inert_policy_row(daemon: &Daemon, device: &str) -> Result<Row> {
    // Short absolute marker paths: the policy's string fields are bounded (name 200, model 128).
    let marks_dir = tempfile::Builder::new().prefix("twm").tempdir_in("/tmp")?;
    let marks = marks_dir.path().to_path_buf();
    let doc = code_bearing_policy(device, &marks);
    let policy = Policy::from_value(&doc).map_err(|e| anyhow!("the planted policy must be valid data: {e}"))?;
    let hash = policy.content_hash();
    let store = Store::open(&daemon.db)?;
    let t = &policy.target;
    store.promote(&Promotion {
        key: BestKey { device: t.device.clone(), model: t.model.clone(), mlx: t.mlx.clone(), backend: t.backend.clone() },
        policy: policy.to_value(),
        hash: hash.clone(),
        ratio: 1.2,
        lo: 1.1,
        hi: 1.3,
        session_id: None,
        candidate_id: None,
        summary: None,
    })?;
    drop(store);
    let mut c = daemon.client()?;
    let got = c
        .call("policy.get", json!({"model": t.model, "mlx": "0.32.4", "backend": "cpu", "device": device}))?
        .map_err(|e| anyhow!("policy.get of the planted policy: {e}"))?;
    // Code in request params too: the daemon must treat them as lookup keys only.
    let _ = c.call("policy.get", json!({"model": format!("$(touch {})", marks.join("m5").display()), "mlx": "`touch x`"}))?;
    let _ = c.call("history", json!({"model": format!("'; DROP TABLE best; --{}", marks.join("m6").display())}))?;
    std::thread::sleep(Duration::from_millis(300));
    let ran: Vec<String> =
        std::fs::read_dir(&marks)?.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    let served_same = got.get("hash").and_then(Value::as_str) == Some(hash.as_str())
        && got.get("policy") == Some(&policy.to_value())
        && got.get("source").and_then(Value::as_str) == Some("best");
    // The SQL-looking history param must not have dropped anything: the best is still served.
    let still = c
        .call("policy.get", json!({"model": t.model, "mlx": "0.32.4", "backend": "cpu", "device": device}))?
        .map(|r| r.get("hash").and_then(Value::as_str) == Some(hash.as_str()))
        .unwrap_or(false);
    Ok(Row::pass_if(
        "security: policy content is inert data",
        format!(
            "served byte-identical: {served_same}; marker files created: {}; still served after SQL-ish params: {still}",
            if ran.is_empty() { "none".to_string() } else { ran.join(",") }
        ),
        "served as data, nothing runs",
        served_same && ran.is_empty() && still,
    ))
}

/// A split policy for the planted-candidate checks.
pub fn split_policy(device: &str, model: &str) -> Value {
    json!({
        "schema": "tilewise.policy/1",
        "name": "planted: fast but wrong",
        "target": {"device": device, "model": model, "mlx": "0.32.4", "backend": "cpu"},
        "matmul": {"rules": [], "default": {"kind": "split", "tile_m": null, "tile_n": null, "tile_k": 16}}
    })
}

/// Plants a candidate that measured 9× faster but failed the gate, straight into the store, and
/// checks the daemon never serves it.
fn planted_wrong_row(daemon: &Daemon, device: &str) -> Result<Row> {
    let model = "reliability-planted-model";
    let doc = split_policy(device, model);
    let policy = Policy::from_value(&doc).map_err(|e| anyhow!("planted split policy invalid: {e}"))?;
    let hash = policy.content_hash();
    let store = Store::open(&daemon.db)?;
    let sid = store.create_session(&NewSession {
        device: device.into(),
        model: model.into(),
        mlx: "0.32.4".into(),
        backend: "cpu".into(),
        seed: 1,
        budget: Budget { evaluations: Some(1), seconds: None },
    })?;
    let cid = store.add_candidate(&NewCandidate {
        session_id: sid,
        policy: policy.to_value(),
        hash: hash.clone(),
        parents: vec![],
        island: 0,
        generation: 0,
        origin: "planted".into(),
    })?;
    store.record_measurement(&NewMeasurement {
        candidate_id: cid,
        correct: false,
        ratio: Some(9.0),
        lo: Some(8.0),
        hi: Some(10.0),
        gate: json!({"reason": "planted: logits differ from stock", "logits_rel_err": 0.5}),
        detail: json!({}),
        samples: vec![],
    })?;
    drop(store);
    let mut c = daemon.client()?;
    let got = c
        .call("policy.get", json!({"model": model, "mlx": "0.32.4", "backend": "cpu", "device": device}))?
        .map_err(|e| anyhow!("policy.get: {e}"))?;
    let served = got.get("hash").and_then(Value::as_str) == Some(hash.as_str());
    let source = got.get("source").and_then(Value::as_str).unwrap_or("?").to_string();
    let history = c.call("history", json!({"model": model}))?.map_err(|e| anyhow!("history: {e}"))?;
    let promoted = history.to_string().contains(&hash);
    Ok(Row::pass_if(
        "security: planted wrong-but-fast candidate (store)",
        format!("served: {source}; planted hash served: {served}; in history: {promoted}"),
        "never served",
        !served && !promoted && source == "native",
    ))
}

/// A planted bug of the worker (`TILEWISE_PLANT_BUG`, docs/worker-protocol.md) and a policy it makes
/// wrong: a split whose last K tile is dropped, or a fusion whose members get each other's slices.
pub enum PlantedBug {
    Split,
    Fusion,
}

impl PlantedBug {
    fn env(&self) -> &'static str {
        match self {
            PlantedBug::Split => "drop_last_k_tile",
            PlantedBug::Fusion => "rotate_parts",
        }
    }

    pub fn label(&self) -> &'static str {
        match self {
            PlantedBug::Split => "security: planted wrong policy (live session, gate must fail)",
            PlantedBug::Fusion => "security: planted wrong fusion (live session, gate must fail)",
        }
    }

    fn policy(&self) -> Value {
        let target = json!({"device": "*", "model": "*", "mlx": "*", "backend": "*"});
        match self {
            PlantedBug::Split => json!({
                "schema": "tilewise.policy/1", "name": "planted: wrong K tiles", "target": target,
                "matmul": {"rules": [], "default": {"kind": "split", "tile_m": null, "tile_n": null, "tile_k": 16}}
            }),
            PlantedBug::Fusion => json!({
                "schema": "tilewise.policy/1", "name": "planted: rotated fusion slices", "target": target,
                "matmul": {"rules": [], "default": {"kind": "native"}},
                "fusion": {"groups": [{"scope": "model.layers.*.mlp", "members": ["gate_proj", "up_proj"]}]}
            }),
        }
    }
}

/// The live form: a real session measures a policy whose plans (or fusion) the worker computes
/// wrongly, so the correctness gate must fail it; meanwhile and afterwards, `policy.get` for that
/// model must serve native.
pub fn planted_wrong_session_row(bins: &Binaries, home: &Path, bug: PlantedBug) -> Result<Row> {
    let d = Daemon::start(bins, home, &[("TILEWISE_PLANT_BUG", bug.env())])?;
    let wrong = bug.policy();
    let mut c = d.client()?;
    c.set_timeout(Duration::from_secs(300))?;
    let r = c
        .call(
            "tuning.start",
            json!({"model": "synthetic:tiny", "budget": {"evaluations": 1}, "seed": 5, "pairs": 2, "warmup": 0, "policies": [wrong]}),
        )?
        .map_err(|e| anyhow!("tuning.start: {e}"))?;
    let sid = r.get("session_id").and_then(Value::as_i64).context("session_id")?;
    let conn = || rusqlite::Connection::open_with_flags(&d.db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY);
    let model: String = conn()?.query_row("SELECT model FROM sessions WHERE id = ?1", [sid], |r| r.get(0))?;
    let params = json!({"model": model, "mlx": "0.32.4", "backend": "cpu"});
    let (mut polls, mut served_wrong) = (0, 0);
    let t0 = Instant::now();
    loop {
        let got = c.call("policy.get", params.clone())?.map_err(|e| anyhow!("policy.get: {e}"))?;
        polls += 1;
        if got.get("source").and_then(Value::as_str) != Some("native") {
            served_wrong += 1;
        }
        let state: String = conn()?.query_row("SELECT state FROM sessions WHERE id = ?1", [sid], |r| r.get(0))?;
        if matches!(state.as_str(), "finished" | "failed" | "stopped") {
            break;
        }
        if t0.elapsed() > Duration::from_secs(300) {
            bail!("session {sid} did not end in 300 s");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let (correct, gate): (bool, String) =
        conn()?.query_row("SELECT correct, gate_json FROM measurements WHERE session_id = ?1 ORDER BY id LIMIT 1", [sid], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })?;
    let reason = serde_json::from_str::<Value>(&gate)
        .ok()
        .and_then(|g| g.get("reason").and_then(Value::as_str).map(str::to_string))
        .unwrap_or_default();
    let promotions: i64 = conn()?.query_row("SELECT count(*) FROM best_history WHERE model = ?1", [&model], |r| r.get(0))?;
    let after = c.call("policy.get", params)?.map_err(|e| anyhow!("policy.get: {e}"))?;
    let native_after = after.get("source").and_then(Value::as_str) == Some("native");
    Ok(Row::pass_if(
        bug.label(),
        format!(
            "gate passed: {correct} (reason: {reason:.80}); promotions {promotions}; served non-native {served_wrong}/{polls} polls during, native after: {native_after}"
        ),
        "never served",
        !correct && !reason.is_empty() && promotions == 0 && served_wrong == 0 && native_after,
    ))
}

pub fn rows(daemon: &mut Daemon, scratch: &Path) -> Vec<Row> {
    let mut rows = other_uid_rows(daemon, scratch);
    let device = match daemon.client().and_then(|mut c| c.call("status", json!({}))) {
        Ok(Ok(s)) => s.get("device_fingerprint").and_then(Value::as_str).unwrap_or_default().to_string(),
        other => {
            rows.push(Row::new("security: status", format!("{other:?}"), "answers", Verdict::Fail));
            return rows;
        }
    };
    rows.push(inert_policy_row(daemon, &device).unwrap_or_else(|e| Row::error("security: policy content is inert data", &e)));
    rows.push(planted_wrong_row(daemon, &device).unwrap_or_else(|e| Row::error("security: planted wrong-but-fast candidate (store)", &e)));
    rows
}
