//! Runs the real `tilewised` binary in its own `TILEWISE_HOME`, the way a user would, and lets a
//! check kill it (-9 or TERM), restart it on the same home, and read its log.

use crate::client::Client;
use anyhow::{bail, Context, Result};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where the binaries under test are, and the environment every daemon gets.
#[derive(Debug, Clone)]
pub struct Binaries {
    pub tilewised: PathBuf,
    /// Python with the `tilewise` evaluator installed (for the worker): `TILEWISE_PYTHON`.
    pub python: PathBuf,
}

/// A running daemon. Dropping it kills the process (never leaves one behind).
pub struct Daemon {
    pub home: PathBuf,
    pub socket: PathBuf,
    pub db: PathBuf,
    bins: Binaries,
    env: Vec<(String, String)>,
    child: Option<Child>,
    log: PathBuf,
    starts: u32,
}

impl Daemon {
    /// Starts `tilewised` with `TILEWISE_HOME=home` (plus `env`) and waits until it answers `hello`.
    pub fn start(bins: &Binaries, home: &Path, env: &[(&str, &str)]) -> Result<Daemon> {
        let paths = tilewise::paths::Paths::under_home(home);
        // No automatic tuning: the checks start the sessions they measure, and a session the
        // daemon started by itself (an idle headless box counts as idle) would load the machine.
        if !paths.config_file.exists() {
            if let Some(dir) = paths.config_file.parent() {
                std::fs::create_dir_all(dir)?;
            }
            std::fs::write(&paths.config_file, "[idle]\nenabled = false\n")?;
        }
        let mut d = Daemon {
            home: home.to_path_buf(),
            socket: paths.socket,
            db: paths.db_file,
            bins: bins.clone(),
            env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            child: None,
            // Beside the home, not in it: a check may fill or freeze the home's filesystem, and the
            // daemon's account of that fault must still reach the file the check reads.
            log: home.with_file_name(format!("{}-daemon-output.log", home.file_name().and_then(|n| n.to_str()).unwrap_or("home"))),
            starts: 0,
        };
        d.restart()?;
        Ok(d)
    }

    /// Starts the process again on the same home (after a kill), waiting for `hello`.
    pub fn restart(&mut self) -> Result<()> {
        if self.alive() {
            bail!("restart: the daemon is still running");
        }
        std::fs::create_dir_all(&self.home)?;
        let log = File::options().create(true).append(true).open(&self.log)?;
        let mut cmd = Command::new(&self.bins.tilewised);
        cmd.env("TILEWISE_HOME", &self.home)
            .env_remove("TILEWISE_SOCKET")
            .env("TILEWISE_PYTHON", &self.bins.python)
            // Warnings and errors only by default: under fuzz, per-connection info lines would
            // measure the logger. A check may pass its own TILEWISE_LOG in `env`.
            .env("TILEWISE_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        // If the suite itself is killed, its daemons (and through them their workers) go too.
        #[cfg(target_os = "linux")]
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd.spawn().with_context(|| format!("starting {}", self.bins.tilewised.display()))?;
        self.child = Some(child);
        self.starts += 1;
        self.wait_ready(Duration::from_secs(60))
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let t0 = Instant::now();
        loop {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                bail!("tilewised exited during start-up ({status}); log tail:\n{}", self.log_tail(30));
            }
            if let Ok(_c) = Client::connect_hello(&self.socket, Duration::from_secs(2), "tilewise-reliability/ready") {
                return Ok(());
            }
            if t0.elapsed() > timeout {
                bail!("tilewised did not answer hello within {timeout:?}; log tail:\n{}", self.log_tail(30));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// SIGKILL: no cleanup of any kind runs.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait up to `timeout` for a clean exit; returns whether it exited by itself.
    pub fn terminate(&mut self, timeout: Duration) -> bool {
        let Some(mut c) = self.child.take() else { return true };
        unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGTERM) };
        let t0 = Instant::now();
        while t0.elapsed() < timeout {
            if let Ok(Some(_)) = c.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = c.kill();
        let _ = c.wait();
        false
    }

    /// A fresh connection that has said hello.
    pub fn client(&self) -> Result<Client> {
        Client::connect_hello(&self.socket, Duration::from_secs(10), "tilewise-reliability/0.1")
    }

    /// Whether the daemon still answers a fresh client (the "survived" test of every fault).
    pub fn answers(&self) -> bool {
        self.client()
            .and_then(|mut c| c.call("policy.get", crate::client::unknown_model_params("alive")))
            .map(|r| r.is_ok())
            .unwrap_or(false)
    }

    /// The last `n` lines the daemon wrote (stdout and stderr).
    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Whole log text (for checks that look for a message).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
