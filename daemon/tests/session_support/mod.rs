//! Shared by the session_* integration tests: the REAL `tilewised` in a temp `TILEWISE_HOME`, its
//! worker pointed at the project's Python environment through the config file, extra environment
//! for the worker's fault switch, and a socket client.
#![allow(dead_code)]

use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tilewise::ipc::client::Client;
use tilewise::paths::Paths;
use tilewise::store::Event;
use tokio::sync::mpsc;

pub const TILEWISED: &str = env!("CARGO_BIN_EXE_tilewised");

pub fn python() -> PathBuf {
    std::env::var_os("TILEWISE_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python"))
}

/// A daemon process in `home`; killed (SIGKILL, with its worker) on drop.
pub struct Daemon {
    pub home: PathBuf,
    pub paths: Paths,
    pub child: Child,
    pub log: PathBuf,
}

/// Writes the config that points the worker at the project's Python.
pub fn prepare_home(home: &Path) -> Paths {
    // Idle gates off: these tests run sessions on a machine someone may be using.
    prepare_home_with_idle(home, "enabled = false\n")
}

/// Same, with the given body of the `[idle]` section.
pub fn prepare_home_with_idle(home: &Path, idle: &str) -> Paths {
    let paths = Paths::under_home(home);
    std::fs::create_dir_all(home).unwrap();
    if let Some(dir) = paths.config_file.parent() {
        std::fs::create_dir_all(dir).unwrap();
    }
    let config = format!("python = {:?}\n\n[idle]\n{idle}", python().display().to_string());
    std::fs::write(&paths.config_file, config).unwrap();
    paths
}

impl Daemon {
    pub fn start(home: &Path, env: &[(&str, &str)]) -> Daemon {
        Daemon::start_with_idle(home, env, "enabled = false\n")
    }

    /// Starts with `idle` as the body of the config's `[idle]` section.
    pub fn start_with_idle(home: &Path, env: &[(&str, &str)], idle: &str) -> Daemon {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let paths = prepare_home_with_idle(home, idle);
        let log = home.join(format!("daemon-{}.log", N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)));
        let mut cmd = Command::new(TILEWISED);
        cmd.env("TILEWISE_HOME", home)
            .env_remove("TILEWISE_SOCKET")
            .env_remove("TILEWISE_WORKER_FAULT")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn tilewised");
        let mut d = Daemon { home: home.to_path_buf(), paths, child, log };
        d.wait_socket();
        d
    }

    fn wait_socket(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self.paths.socket.exists() || std::os::unix::net::UnixStream::connect(&self.paths.socket).is_err() {
            if let Some(st) = self.child.try_wait().unwrap() {
                panic!("tilewised exited at start ({st}): {}", std::fs::read_to_string(&self.log).unwrap_or_default());
            }
            assert!(Instant::now() < deadline, "tilewised did not open its socket");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub async fn client(&self) -> Client {
        Client::connect_path(&self.paths.socket).await.expect("connect")
    }

    pub fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// SIGKILL the daemon and every process it started (the worker runs in its own group).
    pub fn kill9(&mut self) {
        let pid = self.child.id();
        let children = children_of(pid);
        unsafe {
            libc::kill(pid as i32, libc::SIGKILL);
        }
        let _ = self.child.wait();
        for c in children {
            unsafe {
                libc::killpg(c as i32, libc::SIGKILL);
                libc::kill(c as i32, libc::SIGKILL);
            }
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.alive() {
            self.kill9();
        }
    }
}

/// Direct children of a process (Linux /proc).
pub fn children_of(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            if let Ok(text) = std::fs::read_to_string(t.path().join("children")) {
                out.extend(text.split_whitespace().filter_map(|s| s.parse::<u32>().ok()));
            }
        }
    }
    out
}

pub async fn call(c: &mut Client, method: &str, params: Value) -> Value {
    c.call(method, Some(params)).await.unwrap_or_else(|e| panic!("{method}: {e}"))
}

/// Polls `session.show` until the session reaches a final state; returns the last answer.
pub async fn wait_finished(c: &mut Client, session_id: i64, limit: Duration) -> Value {
    let deadline = Instant::now() + limit;
    loop {
        let shown = call(c, "session.show", json!({"session_id": session_id})).await;
        let state = shown["session"]["state"].as_str().unwrap_or("").to_string();
        if ["finished", "stopped", "failed"].contains(&state.as_str()) {
            return shown;
        }
        assert!(Instant::now() < deadline, "session {session_id} still {state} after {limit:?}: {shown}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// A policy whose split tiles cover every matmul of the tiny model: an A/A candidate (≡ native).
pub fn aa_policy(tile: u64) -> Value {
    json!({"schema": "tilewise.policy/1", "name": format!("aa-{tile}"),
           "target": {"device": "*", "model": "*", "mlx": "*", "backend": "*"},
           "matmul": {"rules": [], "default": {"kind": "split", "tile_m": tile, "tile_n": tile, "tile_k": tile}}})
}

/// A policy that really splits (N in tiles of 16): slower or not, it runs through the split path.
pub fn split_policy(tile_n: u64) -> Value {
    json!({"schema": "tilewise.policy/1", "name": format!("split-n{tile_n}"),
           "target": {"device": "*", "model": "*", "mlx": "*", "backend": "*"},
           "matmul": {"rules": [], "default": {"kind": "split", "tile_m": null, "tile_n": tile_n, "tile_k": null}}})
}

/// The next event of `kind` from a subscription (others are skipped); panics after `within`.
pub async fn next(rx: &mut mpsc::Receiver<Event>, kind: &str, within: Duration) -> Event {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(e)) if e.kind == kind => return e,
            Ok(Some(_)) => {}
            Ok(None) => panic!("event stream ended before {kind}"),
            Err(_) => panic!("no {kind} within {within:?}"),
        }
    }
}

/// The pause budget is 1 s. A machine loaded beyond its CPU count (several test suites at once on
/// a 2-core CI box) cannot promise any latency, so there the bound is 5 s and the test says why.
pub fn pause_budget() -> Duration {
    let load = tilewise::schedule::activity::load_1m();
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) as f64;
    if load > cpus {
        eprintln!("NOTE: load {load:.1} on {cpus} CPUs: pause bound relaxed from 1 s to 5 s");
        Duration::from_secs(5)
    } else {
        Duration::from_secs(1)
    }
}
