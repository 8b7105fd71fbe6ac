//! Runs the REAL `tilewised` binary in a temp `TILEWISE_HOME` for integration tests, and gives raw
//! socket access for sending bytes no well-behaved client would.
#![allow(dead_code)]

use serde_json::Value;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};
use tilewise::ipc::client::Client;
use tilewise::paths::Paths;

pub const TILEWISED: &str = env!("CARGO_BIN_EXE_tilewised");
pub const TILEWISE: &str = env!("CARGO_BIN_EXE_tilewise");

/// A running daemon in its own temp home. Dropping it kills the daemon if still running.
pub struct TestDaemon {
    pub home: tempfile::TempDir,
    pub paths: Paths,
    pub child: Child,
    pub stderr_file: PathBuf,
}

/// The Paths a daemon with `TILEWISE_HOME=home` uses (the one definition, from the library).
pub fn paths_for(home: &Path) -> Paths {
    Paths::under_home(home)
}

/// Spawns `tilewised` for `home` without waiting for it. Its stderr goes to a file (a pipe nobody
/// reads would fill up and stall the daemon), whose path is returned.
pub fn spawn_daemon(home: &Path) -> (Child, PathBuf) {
    static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    std::fs::create_dir_all(home).unwrap();
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let err_file = home.join(format!("tilewised-stderr-{n}.log"));
    let child = Command::new(TILEWISED)
        .env("TILEWISE_HOME", home)
        .env_remove("TILEWISE_SOCKET")
        .arg("--log-level")
        .arg("debug")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&err_file).unwrap())
        .spawn()
        .expect("spawn tilewised");
    (child, err_file)
}

impl TestDaemon {
    pub fn start() -> TestDaemon {
        let home = tempfile::tempdir().expect("temp home");
        TestDaemon::start_in(home)
    }

    /// Starts in an existing (possibly prepared) home and waits until it answers.
    pub fn start_in(home: tempfile::TempDir) -> TestDaemon {
        let paths = paths_for(home.path());
        let (child, stderr_file) = spawn_daemon(home.path());
        let mut d = TestDaemon { home, paths, child, stderr_file };
        d.wait_ready();
        d
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("tilewised exited during start ({status}): {}", self.stderr());
            }
            if let Ok(mut s) = UnixStream::connect(&self.paths.socket) {
                s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                if s.write_all(b"{\"jsonrpc\":\"2.0\",\"id\":0,\"method\":\"status\"}\n").is_ok() {
                    let mut line = String::new();
                    if BufReader::new(&s).read_line(&mut line).is_ok() && line.contains("\"result\"") {
                        return;
                    }
                }
            }
            assert!(Instant::now() < deadline, "tilewised did not answer within 30 s");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the daemon wrote to stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_file).unwrap_or_default()
    }

    pub async fn client(&self) -> Client {
        Client::connect_path(&self.paths.socket).await.expect("connect")
    }

    pub fn raw(&self) -> Raw {
        Raw::connect(&self.paths.socket)
    }

    /// Sends SIGTERM and waits (at most 20 s) for the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        wait_exit(&mut self.child, Duration::from_secs(20)).expect("tilewised did not exit within 20 s of SIGTERM")
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for TestDaemon {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

pub fn wait_exit(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return Some(s);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A raw connection: arbitrary bytes out, lines in (10 s read timeout).
pub struct Raw {
    pub stream: UnixStream,
    reader: BufReader<UnixStream>,
}

impl Raw {
    pub fn connect(socket: &PathBuf) -> Raw {
        let stream = UnixStream::connect(socket).expect("raw connect");
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let reader = BufReader::new(stream.try_clone().unwrap());
        Raw { stream, reader }
    }

    pub fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// The next line as JSON; `None` at EOF (the daemon closed the connection).
    pub fn read_json(&mut self) -> Option<Value> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => None,
            Ok(_) => Some(serde_json::from_str(&line).unwrap_or_else(|e| panic!("daemon sent non-JSON {line:?}: {e}"))),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => None,
            Err(e) => panic!("reading from the daemon: {e}"),
        }
    }

    /// Sends one request line and returns the reply.
    pub fn call(&mut self, line: &str) -> Value {
        self.send(format!("{line}\n").as_bytes()).unwrap();
        self.read_json().expect("a reply")
    }
}
