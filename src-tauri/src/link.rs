//! The app's one connection to the daemon, through `tilewise::ipc::client::Client` (the type the CLI
//! uses): request/response calls on one connection, and live events on a second one.
//!
//! Nothing here polls the daemon for data. While it is down, the event pump retries connecting with
//! a growing delay (1 s → 30 s) so the app notices when it comes up; once connected it just waits for
//! events. Everything the tray and the dashboard show is fetched in reaction to those events.

use serde::Serialize;
use serde_json::Value;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tilewise::ipc::client::Client;
use tilewise::ipc::protocol::HelloResult;
use tilewise::paths::Paths;
use tokio::sync::{broadcast, watch, Mutex};

/// How the app and dashboard see the daemon connection (sent to the UI as `link-state`).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct LinkState {
    pub connected: bool,
    /// The daemon's version and pid from its `hello` reply.
    pub version: Option<String>,
    pub pid: Option<u64>,
    /// Why the last connection attempt failed (e.g. "no daemon at /run/.../tilewised.sock").
    pub error: Option<String>,
    pub socket: String,
}

/// An error for the caller (a Tauri command or the bridge): JSON-RPC code when the daemon answered.
#[derive(Debug, Clone, Serialize, thiserror::Error)]
#[error("{message}")]
pub struct LinkError {
    pub code: i64,
    pub message: String,
}

impl LinkError {
    /// The daemon could not be reached at all (not a JSON-RPC code; see docs/protocol.md).
    pub const UNREACHABLE: i64 = -1;

    pub fn unreachable(message: impl Into<String>) -> Self {
        LinkError { code: Self::UNREACHABLE, message: message.into() }
    }
}

pub struct DaemonLink {
    paths: Paths,
    client_name: String,
    calls: Mutex<Option<Client>>,
    state: watch::Sender<LinkState>,
    events: broadcast::Sender<Value>,
    /// Id of the last event forwarded: a reconnect asks the daemon to replay from there, so a
    /// daemon restart or a dropped connection loses no event.
    last_event_id: std::sync::atomic::AtomicI64,
}

impl DaemonLink {
    /// `client_name` is what the daemon's `hello` sees, e.g. "tilewise-app/0.1.0".
    pub fn new(paths: Paths, client_name: impl Into<String>) -> Arc<Self> {
        let socket = paths.client_socket().display().to_string();
        let (state, _) = watch::channel(LinkState { socket, ..LinkState::default() });
        let (events, _) = broadcast::channel(256);
        Arc::new(DaemonLink {
            paths,
            client_name: client_name.into(),
            calls: Mutex::new(None),
            state,
            events,
            last_event_id: std::sync::atomic::AtomicI64::new(0),
        })
    }

    pub fn paths(&self) -> &Paths {
        &self.paths
    }

    pub fn state(&self) -> LinkState {
        self.state.borrow().clone()
    }

    /// Connection changes, for the tray and the `link-state` UI event.
    pub fn watch_state(&self) -> watch::Receiver<LinkState> {
        self.state.subscribe()
    }

    /// The daemon's events (`params` of each `event` notification), as they arrive.
    pub fn subscribe_events(&self) -> broadcast::Receiver<Value> {
        self.events.subscribe()
    }

    async fn connect(&self) -> Result<Client, LinkError> {
        let client = Client::connect(&self.paths).await.map_err(|e| LinkError::unreachable(e.to_string()))?;
        let mut client = client.with_name(self.client_name.clone());
        let hello = client.hello().await.map_err(|e| LinkError::unreachable(e.to_string()))?;
        self.set_connected(&hello);
        Ok(client)
    }

    fn set_connected(&self, hello: &HelloResult) {
        self.state.send_if_modified(|s| {
            let next = LinkState {
                connected: true,
                version: Some(hello.version.clone()),
                pid: Some(u64::from(hello.pid)),
                error: None,
                socket: s.socket.clone(),
            };
            std::mem::replace(s, next.clone()) != next
        });
    }

    fn set_disconnected(&self, why: &str) {
        self.state.send_if_modified(|s| {
            let changed = s.connected || s.error.as_deref() != Some(why);
            s.connected = false;
            s.error = Some(why.to_string());
            changed
        });
    }

    /// One JSON-RPC call. Connects on first use; when the connection turns out to be dead (daemon
    /// restarted), reconnects once and retries, so a restart is invisible to the user.
    pub async fn call(&self, method: &str, params: Value) -> Result<Value, LinkError> {
        let mut slot = self.calls.lock().await;
        for attempt in 0..2 {
            if slot.is_none() {
                match self.connect().await {
                    Ok(c) => *slot = Some(c),
                    Err(e) => {
                        self.set_disconnected(&e.message);
                        return Err(e);
                    }
                }
            }
            let client = slot.as_mut().expect("connected above");
            let params = Some(params.clone()).filter(|p| !p.is_null());
            match client.call(method, params).await {
                Ok(v) => return Ok(v),
                Err(e) => match e.rpc_code() {
                    // The daemon answered: its error goes to the caller as is.
                    Some(code) => return Err(LinkError { code, message: e.to_string() }),
                    // Transport failure: drop the connection; retry once on a fresh one.
                    None => {
                        *slot = None;
                        if attempt == 1 {
                            self.set_disconnected(&e.to_string());
                            return Err(LinkError::unreachable(e.to_string()));
                        }
                    }
                },
            }
        }
        unreachable!("the loop returns on its second attempt")
    }

    /// Runs forever (spawn it on the async runtime): connect, subscribe to events, forward each one;
    /// when the connection ends or cannot be made, wait (1 s, doubling to 30 s) and try again.
    pub async fn run_event_pump(self: Arc<Self>) {
        let mut delay = Duration::from_secs(1);
        loop {
            let why = match self.pump_once().await {
                Ok(()) => unreachable!("pump_once only returns on failure"),
                Err((why, was_connected)) => {
                    if was_connected {
                        delay = Duration::from_secs(1);
                    }
                    why
                }
            };
            self.set_disconnected(&why);
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(30));
        }
    }

    /// Connects a dedicated event connection and forwards until it ends (the client's receiver ends
    /// when the daemon goes away). The error says why, and whether a connection had been made (which
    /// resets the retry delay).
    async fn pump_once(&self) -> Result<(), (String, bool)> {
        let client = self.connect().await.map_err(|e| (e.message, false))?;
        let last = self.last_event_id.load(std::sync::atomic::Ordering::Relaxed);
        // The link talks to one socket, whose daemon keeps one database: ids go on across its
        // restarts, so what happened while we were away is replayed.
        let since = (last > 0).then_some(last);
        let mut stream = client.subscribe_events_since(None, since).await.map_err(|e| (e.to_string(), true))?;
        while let Some(event) = stream.recv().await {
            self.last_event_id.fetch_max(event.id, std::sync::atomic::Ordering::Relaxed);
            // No receivers (window closed, tray absent) is fine: the event is just dropped.
            if let Ok(v) = serde_json::to_value(&event) {
                let _ = self.events.send(v);
            }
        }
        Err(("the daemon closed the connection".into(), true))
    }

    /// Starts `tilewised` in the background (its own session, so it outlives the app), then waits
    /// up to 15 s for it to answer `hello`.
    pub async fn start_daemon(&self) -> Result<Value, LinkError> {
        if self.call("status", Value::Null).await.is_ok() {
            return Ok(serde_json::json!({"started": false, "already_running": true}));
        }
        let exe = daemon_executable()
            .ok_or_else(|| LinkError::unreachable("cannot find the tilewised executable (next to this app or on PATH)"))?;
        let child = spawn_detached(&exe).map_err(|e| LinkError::unreachable(format!("{}: {e}", exe.display())))?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if self.call("status", Value::Null).await.is_ok() {
                return Ok(serde_json::json!({"started": true, "pid": child, "exe": exe}));
            }
            if tokio::time::Instant::now() > deadline {
                return Err(LinkError::unreachable(format!(
                    "started {} (pid {child}) but it did not answer within 15 s; see its log in {}",
                    exe.display(),
                    self.paths.logs_dir.display()
                )));
            }
        }
    }
}

/// `TILEWISE_DAEMON` if set, else `tilewised` next to this executable, else the first on `PATH`.
pub fn daemon_executable() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("TILEWISE_DAEMON").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    let sibling = std::env::current_exe().ok()?.with_file_name("tilewised");
    if sibling.is_file() {
        return Some(sibling);
    }
    std::env::split_paths(&std::env::var_os("PATH")?).map(|d| d.join("tilewised")).find(|p| p.is_file())
}

fn spawn_detached(exe: &std::path::Path) -> std::io::Result<u32> {
    use std::os::unix::process::CommandExt;
    use std::process::{Command, Stdio};
    let mut cmd = Command::new(exe);
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
    // SAFETY: setsid is async-signal-safe; it detaches the daemon from the app's session so quitting
    // the app (or its terminal) does not take the daemon down.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let child = cmd.spawn()?;
    let pid = child.id();
    // Reap it if it exits while the app runs, so no zombie is left behind.
    std::thread::spawn(move || {
        let mut child = child;
        let _ = child.wait();
    });
    Ok(pid)
}
