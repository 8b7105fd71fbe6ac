//! Drives the Python evaluator worker (`python -m tilewise.worker`) as a child process.
//!
//! The wire contract is docs/worker-protocol.md: JSON Lines over stdin/stdout, a `ready` line first,
//! progress lines then exactly one final `result`/`error` per request id, each line ≤ 1 MiB. This
//! module owns everything that can go wrong with a child process so the session never has to: a
//! per-request timeout (hang), an exit with a status or signal (crash, out-of-memory), output that is
//! not a protocol line (garbage), a line over the bound. Every such failure kills the child, keeps the
//! tail of its stderr and comes back as a typed [`WorkerError`] whose `Display` is the reason stored
//! with the failed candidate. [`Supervisor`] restarts the child on the next request and replays the
//! model `load`, so one bad candidate costs one restart, not the session.

use futures_util::StreamExt;
use serde_json::{json, Map, Value};
use std::collections::VecDeque;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio_util::codec::{FramedRead, LinesCodec, LinesCodecError};
use tokio_util::sync::CancellationToken;

/// Largest line the worker may print (docs/worker-protocol.md).
pub const MAX_LINE_BYTES: usize = 1 << 20;
/// Lines of stderr kept for failure reports.
const STDERR_TAIL_LINES: usize = 40;
/// Protocol major version this driver speaks.
pub const PROTOCOL: u64 = 1;

/// How to start a worker.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// The Python interpreter of the environment that has `tilewise` and `mlx_lm` installed.
    pub python: PathBuf,
    /// Extra environment (e.g. `TILEWISE_HOME`, `TILEWISE_WORKER_FAULT` in tests).
    pub env: Vec<(String, String)>,
    /// Working directory of the child; `None` inherits the daemon's.
    pub cwd: Option<PathBuf>,
    /// How long the interpreter may take to import MLX and print `ready`.
    pub ready_timeout: Duration,
    /// After a cancel, how long the worker may take to answer `cancelled` before it is killed.
    /// The worker checks for a cancel between samples and between generated tokens, which is
    /// quick on small models; a training step of a big model may not be. The scheduler's
    /// contract is that a returning person gets the machine back within one second (it notices
    /// within 250 ms), so the default leaves 700 ms: a worker that cannot stop by then is killed
    /// and a new one is started (and its model loaded again) when tuning resumes.
    pub cancel_grace: Duration,
}

impl WorkerConfig {
    pub fn new(python: impl Into<PathBuf>) -> Self {
        WorkerConfig {
            python: python.into(),
            env: Vec::new(),
            cwd: None,
            ready_timeout: Duration::from_secs(120),
            cancel_grace: Duration::from_millis(700),
        }
    }

    /// The interpreter to use when nothing is configured: `TILEWISE_PYTHON`, else `python3` on PATH.
    pub fn python_from_env() -> PathBuf {
        std::env::var_os("TILEWISE_PYTHON").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("python3"))
    }
}

/// The worker's `ready` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ready {
    pub protocol: u64,
    pub mlx: String,
    pub backend: String,
    pub pid: u32,
}

/// Why a request did not produce a result. `Display` is the human reason stored with a failed
/// candidate and shown in `candidate.failed` events.
#[derive(Debug, Clone, thiserror::Error)]
pub enum WorkerError {
    #[error("could not start the worker ({python}): {reason}")]
    Spawn { python: String, reason: String },
    #[error("worker did not become ready: {reason}{}", tail(.stderr_tail))]
    NotReady { reason: String, stderr_tail: String },
    #[error("worker hung: no reply to {op} within {after:?}; killed{}", tail(.stderr_tail))]
    Timeout { op: String, after: Duration, stderr_tail: String },
    #[error("worker crashed during {op}: {status}{}", tail(.stderr_tail))]
    Crashed { op: String, status: String, stderr_tail: String },
    #[error("worker ran out of memory during {op}: {status}{}", tail(.stderr_tail))]
    OutOfMemory { op: String, status: String, stderr_tail: String },
    #[error("worker printed garbage during {op}: {line:?}; killed{}", tail(.stderr_tail))]
    Garbage { op: String, line: String, stderr_tail: String },
    /// The worker answered with a protocol `error` (it is still healthy).
    #[error("worker error {code}: {message}")]
    Remote { code: String, message: String },
    #[error("cancelled")]
    Cancelled,
}

fn tail(t: &str) -> String {
    if t.trim().is_empty() {
        String::new()
    } else {
        format!("; stderr: {}", t.trim())
    }
}

impl WorkerError {
    /// Short machine-readable kind, stored next to the reason.
    pub fn kind(&self) -> &'static str {
        match self {
            WorkerError::Spawn { .. } => "spawn",
            WorkerError::NotReady { .. } => "not_ready",
            WorkerError::Timeout { .. } => "hang",
            WorkerError::Crashed { .. } => "crash",
            WorkerError::OutOfMemory { .. } => "oom",
            WorkerError::Garbage { .. } => "garbage",
            WorkerError::Remote { .. } => "remote",
            WorkerError::Cancelled => "cancelled",
        }
    }

    /// True when the child was killed or died and must be restarted before the next request.
    pub fn is_fatal(&self) -> bool {
        !matches!(self, WorkerError::Remote { .. } | WorkerError::Cancelled)
    }
}

/// Classifies how a child ended. Pure so it can be tested without processes.
/// Out-of-memory shows up as SIGKILL (the kernel's OOM killer), SIGABRT/SIGSEGV after a failed
/// allocation, or a Python `MemoryError`/`std::bad_alloc` in the stderr tail.
pub fn classify_exit(code: Option<i32>, signal: Option<i32>, stderr_tail: &str) -> (bool, String) {
    let oom_text =
        ["MemoryError", "bad_alloc", "Out of memory", "out of memory", "Cannot allocate memory"].iter().any(|s| stderr_tail.contains(s));
    let status = match (code, signal) {
        (Some(c), _) => format!("exit status {c}"),
        (None, Some(s)) => format!("killed by signal {s} ({})", signal_name(s)),
        (None, None) => "ended".to_string(),
    };
    let oom = oom_text || signal == Some(libc::SIGKILL);
    (oom, status)
}

fn signal_name(s: i32) -> &'static str {
    match s {
        libc::SIGKILL => "SIGKILL",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGABRT => "SIGABRT",
        libc::SIGTERM => "SIGTERM",
        libc::SIGBUS => "SIGBUS",
        _ => "signal",
    }
}

fn status_parts(st: &ExitStatus) -> (Option<i32>, Option<i32>) {
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        (st.code(), st.signal())
    }
    #[cfg(not(unix))]
    {
        (st.code(), None)
    }
}

/// One parsed reply line.
#[derive(Debug)]
enum Reply {
    Progress(Value),
    Result(Value),
    Error { code: String, message: String },
}

/// Parses one stdout line for request `id`. `Ok(None)`: a line for another id (a late reply to a
/// request we already gave up on), which is skipped. `Err`: not a protocol line.
fn parse_reply(line: &str, id: u64) -> Result<Option<Reply>, ()> {
    let v: Value = serde_json::from_str(line).map_err(|_| ())?;
    let obj = v.as_object().ok_or(())?;
    let rid = obj.get("id").and_then(Value::as_u64).ok_or(())?;
    let ty = obj.get("type").and_then(Value::as_str).ok_or(())?;
    if rid != id {
        return Ok(None);
    }
    match ty {
        "progress" => Ok(Some(Reply::Progress(v))),
        "result" => Ok(Some(Reply::Result(obj.get("result").cloned().unwrap_or(Value::Null)))),
        "error" => {
            let e = obj.get("error").ok_or(())?;
            Ok(Some(Reply::Error {
                code: e.get("code").and_then(Value::as_str).unwrap_or("internal").to_string(),
                message: e.get("message").and_then(Value::as_str).unwrap_or("").to_string(),
            }))
        }
        _ => Err(()),
    }
}

/// A running worker process. Dropping it kills the child.
pub struct Worker {
    child: Child,
    stdin: ChildStdin,
    stdout: FramedRead<ChildStdout, LinesCodec>,
    stderr_tail: Arc<Mutex<VecDeque<String>>>,
    next_id: u64,
    ready: Ready,
    dead: bool,
    cancel_grace: Duration,
}

impl Worker {
    /// Starts the child and waits for its `ready` line.
    pub async fn spawn(cfg: &WorkerConfig) -> Result<Worker, WorkerError> {
        let mut cmd = Command::new(&cfg.python);
        cmd.args(["-u", "-m", "tilewise.worker"]).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
        // The child gets its own process group so a kill reaches anything it started (tabulate's
        // sandbox process) and a Ctrl-C at the CLI does not hit it twice.
        #[cfg(unix)]
        cmd.process_group(0);
        for (k, v) in &cfg.env {
            cmd.env(k, v);
        }
        if let Some(d) = &cfg.cwd {
            cmd.current_dir(d);
        }
        let mut child = cmd.spawn().map_err(|e| WorkerError::Spawn { python: cfg.python.display().to_string(), reason: e.to_string() })?;
        let stdin = child.stdin.take().expect("piped stdin");
        let stdout = FramedRead::new(child.stdout.take().expect("piped stdout"), LinesCodec::new_with_max_length(MAX_LINE_BYTES));
        let stderr_tail = Arc::new(Mutex::new(VecDeque::new()));
        let stderr = child.stderr.take().expect("piped stderr");
        let tail_sink = stderr_tail.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let mut t = tail_sink.lock().unwrap();
                if t.len() == STDERR_TAIL_LINES {
                    t.pop_front();
                }
                // Bound each kept line too: a runaway traceback must not grow the daemon.
                t.push_back(line.chars().take(2000).collect());
            }
        });
        let mut w = Worker {
            child,
            stdin,
            stdout,
            stderr_tail,
            next_id: 1,
            ready: Ready { protocol: 0, mlx: String::new(), backend: String::new(), pid: 0 },
            dead: false,
            cancel_grace: cfg.cancel_grace,
        };
        let ready = match tokio::time::timeout(cfg.ready_timeout, w.stdout.next()).await {
            Err(_) => {
                let st = w.kill_and_tail().await;
                return Err(WorkerError::NotReady { reason: format!("no ready line within {:?}", cfg.ready_timeout), stderr_tail: st });
            }
            Ok(None) | Ok(Some(Err(_))) => {
                let status = w.wait_status().await;
                let st = w.kill_and_tail().await;
                let status = status.map_or("no exit status".to_string(), |s| s.to_string());
                return Err(WorkerError::NotReady { reason: format!("exited before ready ({status})"), stderr_tail: st });
            }
            Ok(Some(Ok(line))) => line,
        };
        let parsed: Option<Ready> = serde_json::from_str::<Value>(&ready).ok().and_then(|v| {
            (v.get("type")?.as_str()? == "ready").then(|| Ready {
                protocol: v.get("protocol").and_then(Value::as_u64).unwrap_or(0),
                mlx: v.get("mlx").and_then(Value::as_str).unwrap_or("").to_string(),
                backend: v.get("backend").and_then(Value::as_str).unwrap_or("").to_string(),
                pid: v.get("pid").and_then(Value::as_u64).unwrap_or(0) as u32,
            })
        });
        match parsed {
            Some(r) if r.protocol == PROTOCOL => {
                w.ready = r;
                Ok(w)
            }
            Some(r) => {
                let st = w.kill_and_tail().await;
                Err(WorkerError::NotReady { reason: format!("worker speaks protocol {}, daemon {PROTOCOL}", r.protocol), stderr_tail: st })
            }
            None => {
                let st = w.kill_and_tail().await;
                Err(WorkerError::NotReady { reason: format!("first line is not a ready line: {:?}", clip(&ready)), stderr_tail: st })
            }
        }
    }

    pub fn ready(&self) -> &Ready {
        &self.ready
    }

    /// OS process id of the child.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// False once the child was killed or died; a dead worker refuses requests.
    pub fn is_alive(&self) -> bool {
        !self.dead
    }

    /// The last lines the worker wrote to stderr.
    pub fn stderr_tail(&self) -> String {
        self.stderr_tail.lock().unwrap().iter().cloned().collect::<Vec<_>>().join("\n")
    }

    /// Sends `{"id", "op", ...fields}` and waits for its final reply. `on_progress` sees each progress
    /// line. After `timeout` with no final reply the child is killed ([`WorkerError::Timeout`]). When
    /// `cancel` fires, a protocol `cancel` is sent and the worker gets a short grace period to reply
    /// `cancelled` before it is killed.
    pub async fn request(
        &mut self,
        op: &str,
        fields: Value,
        timeout: Duration,
        cancel: Option<&CancellationToken>,
        mut on_progress: impl FnMut(&Value),
    ) -> Result<Value, WorkerError> {
        if self.dead {
            return Err(WorkerError::Crashed { op: op.into(), status: "worker is not running".into(), stderr_tail: self.stderr_tail() });
        }
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = match fields {
            Value::Object(m) => m,
            Value::Null => Map::new(),
            other => {
                return Err(WorkerError::Remote {
                    code: "bad_request".into(),
                    message: format!("request fields must be an object, got {other}"),
                })
            }
        };
        msg.insert("id".into(), json!(id));
        msg.insert("op".into(), json!(op));
        if let Err(e) = self.write_line(&Value::Object(msg)).await {
            return Err(self.died(op, format!("stdin closed ({e})")).await);
        }
        let deadline = tokio::time::Instant::now() + timeout;
        let never = CancellationToken::new();
        let cancel = cancel.unwrap_or(&never);
        let mut cancel_deadline: Option<tokio::time::Instant> = None;
        loop {
            let until = cancel_deadline.map_or(deadline, |c| c.min(deadline));
            let next = tokio::select! {
                biased;
                _ = cancel.cancelled(), if cancel_deadline.is_none() => {
                    // Ask the worker to stop at its next sample boundary; it must answer soon.
                    let _ = self.write_line(&json!({"id": self.next_id, "op": "cancel", "target": id})).await;
                    self.next_id += 1;
                    cancel_deadline = Some(tokio::time::Instant::now() + self.cancel_grace);
                    continue;
                }
                r = tokio::time::timeout_at(until, self.stdout.next()) => r,
            };
            let line = match next {
                Err(_) => {
                    let stderr_tail = self.kill_and_tail().await;
                    if cancel_deadline.is_some() {
                        return Err(WorkerError::Cancelled);
                    }
                    return Err(WorkerError::Timeout { op: op.into(), after: timeout, stderr_tail });
                }
                Ok(None) => return Err(self.died(op, "stdout closed".into()).await),
                Ok(Some(Err(LinesCodecError::MaxLineLengthExceeded))) => {
                    let stderr_tail = self.kill_and_tail().await;
                    return Err(WorkerError::Garbage { op: op.into(), line: format!("<line over {MAX_LINE_BYTES} bytes>"), stderr_tail });
                }
                Ok(Some(Err(LinesCodecError::Io(e)))) => return Err(self.died(op, format!("read error ({e})")).await),
                Ok(Some(Ok(line))) => line,
            };
            match parse_reply(&line, id) {
                Ok(None) => continue,
                Ok(Some(Reply::Progress(p))) => on_progress(&p),
                Ok(Some(Reply::Result(r))) => return Ok(r),
                Ok(Some(Reply::Error { code, message })) => {
                    return Err(if code == "cancelled" { WorkerError::Cancelled } else { WorkerError::Remote { code, message } })
                }
                Err(()) => {
                    // A line that is not protocol: the child's state is unknown, so it goes.
                    let stderr_tail = self.kill_and_tail().await;
                    return Err(WorkerError::Garbage { op: op.into(), line: clip(&line), stderr_tail });
                }
            }
        }
    }

    /// Asks the worker to exit (`shutdown`), killing it if it does not within a few seconds.
    pub async fn shutdown(mut self) {
        if !self.dead {
            let _ = self.request("shutdown", Value::Null, Duration::from_secs(5), None, |_| {}).await;
            if tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await.is_err() {
                let _ = self.kill_and_tail().await;
            }
            self.dead = true;
        }
    }

    async fn write_line(&mut self, v: &Value) -> std::io::Result<()> {
        let mut s = serde_json::to_string(v).expect("json serializes");
        s.push('\n');
        self.stdin.write_all(s.as_bytes()).await?;
        self.stdin.flush().await
    }

    /// The child's stdout ended or stdin broke: wait for its status and classify it.
    async fn died(&mut self, op: &str, why: String) -> WorkerError {
        let status = self.wait_status().await;
        let stderr_tail = self.kill_and_tail().await;
        let (code, signal) = status.as_ref().map(status_parts).unwrap_or((None, None));
        let (oom, mut text) = classify_exit(code, signal, &stderr_tail);
        if status.is_none() {
            text = why;
        }
        if oom {
            WorkerError::OutOfMemory { op: op.into(), status: text, stderr_tail }
        } else {
            WorkerError::Crashed { op: op.into(), status: text, stderr_tail }
        }
    }

    async fn wait_status(&mut self) -> Option<ExitStatus> {
        tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await.ok().and_then(Result::ok)
    }

    /// Kills the child's whole process group, reaps it, and returns the stderr tail (after giving the
    /// reader a moment to drain what the child wrote last).
    async fn kill_and_tail(&mut self) -> String {
        self.dead = true;
        #[cfg(unix)]
        if let Some(pid) = self.child.id() {
            // SAFETY: plain syscall on our own child's process group.
            unsafe {
                libc::killpg(pid as i32, libc::SIGKILL);
            }
        }
        let _ = self.child.start_kill();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        self.stderr_tail()
    }
}

fn clip(s: &str) -> String {
    let mut out: String = s.chars().take(200).collect();
    if out.len() < s.len() {
        out.push('…');
    }
    out
}

/// Keeps one worker alive across failures: starts it lazily, restarts it after a fatal error and
/// replays the last `load` so the next request finds the model loaded again.
pub struct Supervisor {
    cfg: WorkerConfig,
    worker: Option<Worker>,
    load: Option<(Value, Duration)>,
    /// `load` result of the current model (shapes, fingerprint...).
    loaded: Option<Value>,
    /// How many times the child was (re)started.
    pub starts: u64,
}

impl Supervisor {
    pub fn new(cfg: WorkerConfig) -> Self {
        Supervisor { cfg, worker: None, load: None, loaded: None, starts: 0 }
    }

    pub fn config(&self) -> &WorkerConfig {
        &self.cfg
    }

    /// The running worker, started (and the model re-loaded) when needed.
    pub async fn worker(&mut self) -> Result<&mut Worker, WorkerError> {
        if self.worker.as_ref().is_some_and(|w| !w.is_alive()) {
            self.worker = None;
        }
        if self.worker.is_none() {
            let mut w = Worker::spawn(&self.cfg).await?;
            self.starts += 1;
            if let Some((fields, timeout)) = self.load.clone() {
                let r = w.request("load", fields, timeout, None, |_| {}).await?;
                self.loaded = Some(r);
            }
            self.worker = Some(w);
        }
        Ok(self.worker.as_mut().expect("just started"))
    }

    /// Loads a model and remembers the request so restarts load it again.
    pub async fn load(&mut self, fields: Value, timeout: Duration) -> Result<Value, WorkerError> {
        let w = self.worker().await?;
        let r = w.request("load", fields.clone(), timeout, None, |_| {}).await?;
        self.load = Some((fields, timeout));
        self.loaded = Some(r.clone());
        Ok(r)
    }

    pub fn loaded(&self) -> Option<&Value> {
        self.loaded.as_ref()
    }

    /// One request; a fatal failure drops the child so the next call starts a fresh one.
    pub async fn request(
        &mut self,
        op: &str,
        fields: Value,
        timeout: Duration,
        cancel: Option<&CancellationToken>,
        on_progress: impl FnMut(&Value),
    ) -> Result<Value, WorkerError> {
        let w = self.worker().await?;
        let r = w.request(op, fields, timeout, cancel, on_progress).await;
        if let Err(e) = &r {
            if e.is_fatal() || !self.worker.as_ref().is_some_and(Worker::is_alive) {
                self.worker = None;
            }
        }
        r
    }

    pub async fn shutdown(&mut self) {
        if let Some(w) = self.worker.take() {
            w.shutdown().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_are_parsed_per_id() {
        assert!(matches!(parse_reply(r#"{"id":3,"type":"progress","done":1}"#, 3), Ok(Some(Reply::Progress(_)))));
        assert!(
            matches!(parse_reply(r#"{"id":3,"type":"result","result":{"pong":true}}"#, 3), Ok(Some(Reply::Result(v))) if v["pong"] == true)
        );
        match parse_reply(r#"{"id":3,"type":"error","error":{"code":"no_model","message":"load first"}}"#, 3) {
            Ok(Some(Reply::Error { code, message })) => assert_eq!((code.as_str(), message.as_str()), ("no_model", "load first")),
            other => panic!("{other:?}"),
        }
        // A late reply to an abandoned request is skipped, not an error.
        assert!(matches!(parse_reply(r#"{"id":2,"type":"result","result":{}}"#, 3), Ok(None)));
        for bad in ["hello", "[1,2]", r#"{"id":3}"#, r#"{"id":3,"type":"weird"}"#, r#"{"type":"result"}"#] {
            assert!(parse_reply(bad, 3).is_err(), "{bad}");
        }
    }

    #[test]
    fn exits_are_classified() {
        assert_eq!(classify_exit(Some(3), None, ""), (false, "exit status 3".into()));
        let (oom, s) = classify_exit(None, Some(libc::SIGKILL), "");
        assert!(oom && s.contains("SIGKILL"), "{s}");
        assert!(classify_exit(Some(1), None, "Traceback...\nMemoryError").0);
        assert!(!classify_exit(None, Some(libc::SIGSEGV), "").0);
    }
}
