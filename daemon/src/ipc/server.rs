//! The daemon side of the socket: state, listener, one task per connection, method dispatch.
//!
//! Isolation between clients is structural: every connection is its own task with its own bounded
//! line buffer (64 KiB), so a client that sends garbage, an oversized line, half a frame, or one
//! byte a second only ever occupies its own task. Store calls are short and synchronous under a
//! mutex (tens of µs), never held across an `.await`.

use super::instance::{clear_stale_socket, InstanceError, InstanceLock};
use super::protocol::*;
use super::TuningService;
use crate::config::Config;
use crate::events::{kind, EventBus};
use crate::paths::{Paths, PathsError};
use crate::policy::Policy;
use crate::probe::Device;
use crate::store::{BestKey, BestStamp, Event, SharedStore, Store, StoreError};
use crate::usage::FetchLog;
use futures_util::{SinkExt, StreamExt};
use interprocess::local_socket::tokio::{prelude::*, Listener, Stream};
use interprocess::local_socket::{GenericFilePath, ListenerOptions};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::os::unix::fs::PermissionsExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;
use tokio::sync::broadcast;
use tokio_util::codec::{Framed, LinesCodec, LinesCodecError};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Paths(#[from] PathsError),
    #[error(transparent)]
    Instance(#[from] InstanceError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot listen on {}: {source}", .socket.display())]
    Listen { socket: std::path::PathBuf, source: std::io::Error },
}

/// Everything the daemon's handlers share. Built by [`DaemonState::open`]; the tuning service is
/// plugged into `tuning` before the state is wrapped in an `Arc` (see `ipc` module docs).
pub struct DaemonState {
    pub paths: Paths,
    /// Shared with the sessions, which read `[llm]` from it when they ask (edits apply at once).
    pub config: Arc<RwLock<Config>>,
    pub store: SharedStore,
    pub events: EventBus,
    /// This machine, probed once at start.
    pub device: Device,
    pub device_fingerprint: String,
    pub tuning: Option<Arc<dyn TuningService>>,
    /// Cancel to stop the daemon (what `daemon.shutdown` and the signal handler do).
    pub shutdown: CancellationToken,
    started: Instant,
    clients: AtomicUsize,
    native: PolicyGetResult,
    /// Hashes of stored best policies that passed validation (checked once, served many times).
    validated: Mutex<HashSet<String>>,
    /// `policy.get` answers, already encoded, valid for one [`BestStamp`] of the store.
    policy_cache: Mutex<PolicyCache>,
    /// Policy fetches noted on the hot path, written in batches (`usage::spawn_upkeep`).
    pub fetches: Arc<FetchLog>,
    lock: Mutex<Option<InstanceLock>>,
}

/// A `policy.get` answer as served: the encoded result, and what the fetch log records of it.
#[derive(Clone)]
pub struct Answer {
    pub encoded: Arc<str>,
    pub best: bool,
    pub hash: Arc<str>,
}

/// Who is on the other end of a connection: the name it gave in `hello` and its process id (the
/// kernel's where it tells, else the one the client stated; 0 unknown).
#[derive(Debug, Clone)]
pub struct Peer {
    pub client: Arc<str>,
    pub pid: u32,
    kernel_pid: bool,
}

impl Default for Peer {
    fn default() -> Self {
        Peer { client: Arc::from("unnamed"), pid: 0, kernel_pid: false }
    }
}

/// Encoded `policy.get` results per resolved key, valid for one [`BestStamp`] of the store.
/// Why: the answer is a pure function of the key and the `best` table, and re-reading SQLite,
/// re-parsing the stored policy JSON and re-serializing it cost ~20 µs per call on a 2-core
/// machine, more than the socket round trip itself.
///
/// Never stale: a commit by any OTHER connection or process (tests, `seed_best`, a second store
/// handle) or a promotion through this daemon's own connection moves the stamp and empties the
/// cache. The daemon's own non-promotion writes do not, so the event a client's `hello` appends
/// does not throw away the answer its next `policy.get` asks for.
#[derive(Default)]
struct PolicyCache {
    stamp: Option<BestStamp>,
    /// The JSON text of each `PolicyGetResult`, exactly as `to_line` would have encoded it.
    entries: HashMap<BestKey, Answer>,
}

/// Live processes listed in `status` at most (`clients.list` has them all).
const STATUS_PROCESSES: u32 = 50;

/// Cap on cached keys: clients choose the keys, so memory must stay bounded; past it the cache
/// starts over (real use asks for a handful of keys).
const POLICY_CACHE_MAX: usize = 1024;

impl DaemonState {
    /// Prepares a daemon: private dirs, the single-instance lock, the store (migrated), the probe.
    pub fn open(paths: Paths, config: Config) -> Result<DaemonState, StartError> {
        paths.ensure_dirs()?;
        let lock = InstanceLock::acquire(&paths.lock_file)?;
        let store = Store::open(&paths.db_file)?;
        let device = crate::probe::detect();
        let device_fingerprint = device.fingerprint();
        store.upsert_device(&device_fingerprint, &serde_json::to_value(&device).unwrap_or(Value::Null))?;
        let store: SharedStore = Arc::new(Mutex::new(store));
        let native_policy = Policy::native();
        Ok(DaemonState {
            events: EventBus::new(store.clone()),
            store,
            paths,
            config: Arc::new(RwLock::new(config)),
            device,
            device_fingerprint,
            tuning: None,
            shutdown: CancellationToken::new(),
            started: Instant::now(),
            clients: AtomicUsize::new(0),
            native: PolicyGetResult {
                policy: native_policy.to_value().into(),
                hash: native_policy.content_hash(),
                source: PolicySource::Native,
                reason: String::new(),
                evidence: None,
            },
            validated: Mutex::new(HashSet::new()),
            policy_cache: Mutex::new(PolicyCache::default()),
            fetches: Arc::new(FetchLog::default()),
            lock: Mutex::new(Some(lock)),
        })
    }

    fn store(&self) -> std::sync::MutexGuard<'_, Store> {
        // A panic while holding the lock leaves SQLite consistent (transactions roll back), so a
        // poisoned mutex is still safe to use.
        self.store.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Connections open now.
    pub fn clients(&self) -> usize {
        self.clients.load(Ordering::Relaxed)
    }

    /// Writes the fetches noted so far (before a view of them is read).
    fn flush_fetches(&self) {
        if let Err(e) = self.fetches.flush(&self.store()) {
            warn!("could not record policy fetches: {e}");
        }
    }

    fn status(&self) -> Result<StatusResult, RpcError> {
        self.flush_fetches();
        let schema_version = self.store().schema_version().map_err(RpcError::internal)?;
        let processes =
            crate::usage::clients(&self.store(), &self.device_fingerprint, true, STATUS_PROCESSES).map_err(RpcError::internal)?;
        let tuning = match &self.tuning {
            Some(t) => t.status(),
            None => TuningStatus {
                state: "idle".into(),
                reason: Some("tuning is not available in this build".into()),
                session_id: None,
                detail: None,
            },
        };
        Ok(StatusResult {
            version: VERSION.into(),
            pid: std::process::id(),
            uptime_s: self.started.elapsed().as_secs_f64(),
            home: self.paths.home.clone(),
            socket: self.paths.socket.clone(),
            device: self.device.clone(),
            device_fingerprint: self.device_fingerprint.clone(),
            db: DbStatus { path: self.paths.db_file.clone(), schema_version },
            tuning,
            clients: self.clients(),
            processes,
        })
    }

    /// The key a `policy.get` asks about, with this machine's device and backend filled in.
    fn best_key(&self, p: &PolicyGetParams) -> BestKey {
        BestKey {
            device: p.device.clone().unwrap_or_else(|| self.device_fingerprint.clone()),
            model: p.model.clone(),
            mlx: p.mlx.clone(),
            backend: p.backend.clone().unwrap_or_else(|| self.device.backend.as_str().to_string()),
        }
    }

    /// `policy.get`: the stored best for the key if it is (still) a valid policy, else native with why.
    /// Always reads the store (the socket path uses [`DaemonState::policy_get_encoded`]).
    pub fn policy_get(&self, p: &PolicyGetParams) -> Result<PolicyGetResult, RpcError> {
        p.check()?;
        let key = self.best_key(p);
        let store = self.store();
        self.policy_get_from(&store, key)
    }

    /// `policy.get`'s result as JSON text, served from the cache when the store has not changed
    /// since it was encoded (see [`PolicyCache`]); byte for byte what encoding
    /// [`DaemonState::policy_get`]'s result gives.
    pub fn policy_get_encoded(&self, p: &PolicyGetParams) -> Result<Answer, RpcError> {
        p.check()?;
        let key = self.best_key(p);
        // The store lock is held from the stamp to the insert, so the entry is tagged with a stamp
        // taken before its read: a write racing us can only cause a later miss, never a stale hit.
        let store = self.store();
        let mut cache = self.policy_cache.lock().unwrap_or_else(|p| p.into_inner());
        let stamp = store.best_stamp().map_err(RpcError::internal)?;
        if !cache.stamp.is_some_and(|earlier| stamp.best_unchanged_since(&earlier)) {
            cache.entries.clear();
        }
        cache.stamp = Some(stamp);
        if let Some(hit) = cache.entries.get(&key) {
            return Ok(hit.clone());
        }
        drop(cache);
        let result = self.policy_get_from(&store, key.clone())?;
        let (best, hash) = (result.source == PolicySource::Best, Arc::from(result.hash.as_str()));
        // Through a `Value` on purpose: the same key order, hence the same bytes, as `to_line`.
        let encoded: Arc<str> = serde_json::to_string(&to_value(result)?).map_err(RpcError::internal)?.into();
        let answer = Answer { encoded, best, hash };
        let mut cache = self.policy_cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.stamp == Some(stamp) {
            if cache.entries.len() >= POLICY_CACHE_MAX {
                cache.entries.clear();
            }
            cache.entries.insert(key, answer.clone());
        }
        Ok(answer)
    }

    fn policy_get_from(&self, store: &Store, key: BestKey) -> Result<PolicyGetResult, RpcError> {
        let best = store.best(&key).map_err(RpcError::internal)?;
        let native = |reason: String| PolicyGetResult { reason, ..self.native.clone() };
        let Some(best) = best else {
            return Ok(native(format!(
                "no policy has been proven yet for model {} with mlx {} ({}) on device {}",
                key.model, key.mlx, key.backend, key.device
            )));
        };
        if !self.validated.lock().unwrap_or_else(|p| p.into_inner()).contains(&best.hash) {
            let problem = match Policy::from_value(&best.policy) {
                Ok(policy) if policy.content_hash() == best.hash => None,
                Ok(policy) => Some(format!("its content hashes to {}, not {}", policy.content_hash(), best.hash)),
                Err(e) => Some(e.to_string()),
            };
            if let Some(problem) = problem {
                warn!(hash = %best.hash, %problem, "stored best policy refused");
                return Ok(native(format!("the stored best policy {} was refused ({problem}); serving native", best.hash)));
            }
            self.validated.lock().unwrap_or_else(|p| p.into_inner()).insert(best.hash.clone());
        }
        let reason = format!(
            "proven {:.3}x faster (95% interval {:.3}-{:.3}){}, promoted {}{}",
            best.ratio,
            best.lo,
            best.hi,
            best.session_id.map(|s| format!(" in session {s}")).unwrap_or_default(),
            best.promoted_at,
            best.summary.as_ref().map(|s| format!(": {}", s.text)).unwrap_or_default()
        ) + &best.origin.as_ref().map(|o| format!(" ({o})")).unwrap_or_default();
        Ok(PolicyGetResult {
            policy: best.policy.into(),
            hash: best.hash,
            source: PolicySource::Best,
            reason,
            evidence: Some(Evidence {
                ratio: best.ratio,
                lo: best.lo,
                hi: best.hi,
                session_id: best.session_id,
                promoted_at: best.promoted_at,
                summary: best.summary,
                origin: best.origin,
            }),
        })
    }
}

/// A bound listener, ready to serve.
pub struct Server {
    state: Arc<DaemonState>,
    listener: Listener,
}

impl Server {
    /// Clears a stale socket (only if connecting to it is refused), binds, and makes the socket 0600.
    pub fn bind(state: Arc<DaemonState>) -> Result<Server, StartError> {
        let socket = state.paths.socket.clone();
        if clear_stale_socket(&socket)? {
            info!(socket = %socket.display(), "removed a stale socket left by a previous daemon");
        }
        let listen_err = |source| StartError::Listen { socket: socket.clone(), source };
        let name = socket.as_path().to_fs_name::<GenericFilePath>().map_err(listen_err)?;
        let listener = ListenerOptions::new().name(name).create_tokio().map_err(listen_err)?;
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600)).map_err(listen_err)?;
        Ok(Server { state, listener })
    }

    pub fn state(&self) -> &Arc<DaemonState> {
        &self.state
    }

    /// Serves until `stop` completes or `state.shutdown` is cancelled, then shuts down cleanly:
    /// the tuning service is told, the socket file removed, the WAL checkpointed, the lock released.
    pub async fn run(self, stop: impl Future<Output = ()>) {
        let Server { state, listener } = self;
        let _ = state.events.publish(
            kind::DAEMON_STARTED,
            None,
            json!({"pid": std::process::id(), "version": VERSION, "socket": state.paths.socket,
                   "device_fingerprint": state.device_fingerprint}),
        );
        info!(socket = %state.paths.socket.display(), pid = std::process::id(), "tilewised serving");
        tokio::pin!(stop);
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(stream) => {
                        let st = state.clone();
                        tokio::spawn(async move { serve_connection(st, stream).await });
                    }
                    // EMFILE and friends: keep serving the connections we have.
                    Err(e) => {
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    }
                },
                _ = &mut stop => break,
                _ = state.shutdown.cancelled() => break,
            }
        }
        info!("shutting down");
        state.shutdown.cancel();
        let _ = state.events.publish(kind::DAEMON_STOPPING, None, json!({"pid": std::process::id()}));
        if let Some(t) = &state.tuning {
            t.shutdown().await;
        }
        drop(listener);
        state.flush_fetches();
        match std::fs::remove_file(&state.paths.socket) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => warn!(error = %e, "cannot remove the socket file"),
        }
        if let Err(e) = state.store().checkpoint() {
            warn!(error = %e, "WAL checkpoint at shutdown failed");
        }
        state.lock.lock().unwrap_or_else(|p| p.into_inner()).take();
        info!("stopped");
    }
}

/// Counts a connection for `status.clients` while it lives.
struct ClientGuard<'a>(&'a AtomicUsize);
impl<'a> ClientGuard<'a> {
    fn new(c: &'a AtomicUsize) -> Self {
        c.fetch_add(1, Ordering::Relaxed);
        ClientGuard(c)
    }
}
impl Drop for ClientGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A connection's event subscription: the live receiver, the kinds it wants (all when `None`),
/// stored events still to replay, and the newest id replayed (live events up to it were in the
/// replay already: the receiver is created before the store is read, so nothing falls between).
struct Subscription {
    rx: broadcast::Receiver<Event>,
    kinds: Option<Vec<String>>,
    backlog: std::collections::VecDeque<Event>,
    replayed_up_to: i64,
}

async fn next_event(sub: &mut Option<Subscription>) -> Result<Event, broadcast::error::RecvError> {
    let Some(s) = sub else { return std::future::pending().await };
    if let Some(ev) = s.backlog.pop_front() {
        return Ok(ev);
    }
    loop {
        let ev = s.rx.recv().await?;
        if ev.id > s.replayed_up_to {
            return Ok(ev);
        }
    }
}

async fn serve_connection(state: Arc<DaemonState>, stream: Stream) {
    // Only this user's processes may talk to the daemon (the 0700 dir is the first fence).
    let me = unsafe { libc::geteuid() };
    let creds = stream.peer_creds();
    match creds.as_ref().map(|c| c.euid()) {
        Ok(Some(uid)) if uid == me => {}
        other => {
            warn!(peer = ?other, "refused a connection from another user");
            return;
        }
    }
    let kernel_pid = creds.ok().and_then(|c| c.pid()).and_then(|p| u32::try_from(p).ok());
    let mut peer = Peer { pid: kernel_pid.unwrap_or(0), kernel_pid: kernel_pid.is_some(), ..Peer::default() };
    let _guard = ClientGuard::new(&state.clients);
    let mut framed = Framed::new(stream, LinesCodec::new_with_max_length(MAX_REQUEST_LINE));
    let mut sub: Option<Subscription> = None;
    // Made once, not per line: registering with the token costs a lock each time (hot path).
    let shutdown = state.shutdown.cancelled();
    tokio::pin!(shutdown);
    loop {
        let reply: Option<String> = tokio::select! {
            frame = framed.next() => match frame {
                None => break,
                Some(Ok(line)) => {
                    if line.trim().is_empty() {
                        continue;
                    }
                    handle_line(&state, &line, &mut sub, &mut peer).await
                }
                Some(Err(LinesCodecError::MaxLineLengthExceeded)) => {
                    let err = RpcError::new(
                        codes::INVALID_REQUEST,
                        format!("frame too large: a line may hold at most {MAX_REQUEST_LINE} bytes; closing the connection"),
                    );
                    let _ = framed.send(to_line(&Response::err(Value::Null, err))).await;
                    break;
                }
                Some(Err(LinesCodecError::Io(e))) => {
                    if e.kind() == std::io::ErrorKind::InvalidData {
                        let _ = framed.send(to_line(&Response::err(Value::Null, RpcError::parse("line is not UTF-8; closing the connection")))).await;
                    }
                    debug!(error = %e, "connection read error");
                    break;
                }
            },
            ev = next_event(&mut sub) => match ev {
                Ok(ev) => {
                    let wanted = sub.as_ref().and_then(|s| s.kinds.as_ref()).is_none_or(|k| k.contains(&ev.kind));
                    wanted.then(|| to_line(&Notification { jsonrpc: "2.0".into(), method: EVENT_NOTIFICATION.into(), params: serde_json::to_value(&ev).unwrap_or(Value::Null) }))
                }
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    warn!(missed = n, "a subscriber fell behind; events skipped (they remain in the store)");
                    None
                }
                Err(broadcast::error::RecvError::Closed) => { sub = None; None }
            },
            _ = &mut shutdown => break,
        };
        if let Some(line) = reply {
            if framed.send(line).await.is_err() {
                break;
            }
        }
    }
}

fn to_line<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_else(|e| {
        format!(r#"{{"jsonrpc":"2.0","id":null,"error":{{"code":{},"message":"cannot encode reply: {e}"}}}}"#, codes::INTERNAL)
    })
}

/// One request line through the daemon's own decode and dispatch, without a socket: the seam the
/// protocol fuzz target (fuzz/fuzz_targets/protocol.rs) and the IPC benchmark drive. Returns the
/// reply line, if any. An `events.subscribe` here subscribes nothing (there is no connection to
/// stream to).
pub async fn handle_request_line(state: &Arc<DaemonState>, line: &str) -> Option<String> {
    let mut sub = None;
    handle_line(state, line, &mut sub, &mut Peer::default()).await
}

/// One line in, at most one reply line out (`None` for notifications).
async fn handle_line(state: &Arc<DaemonState>, line: &str, sub: &mut Option<Subscription>, peer: &mut Peer) -> Option<String> {
    // Fast path: straight into the typed request, no intermediate `Value` of the whole line. Any
    // line it cannot take (not JSON, a batch, a missing field, a duplicate key, ...) goes through
    // `decode_slow`, so every error reply is exactly what it always was.
    let req = match serde_json::from_str::<Request>(line) {
        Ok(r) => r,
        Err(_) => match decode_slow(line) {
            Ok(r) => r,
            Err(reply) => return Some(to_line(&reply)),
        },
    };
    if req.jsonrpc != "2.0" {
        return Some(to_line(&Response::err(req.id.unwrap_or(Value::Null), RpcError::invalid_request("jsonrpc must be \"2.0\""))));
    }
    if req.method == methods::POLICY_GET {
        // The hot path of every MLX process start: the result comes encoded (usually from the
        // cache) and is spliced into the reply, which is byte for byte what `to_line` would build.
        let result = params::<PolicyGetParams>(req.params).and_then(|p| {
            let answer = state.policy_get_encoded(&p)?;
            state.fetches.note(&peer.client, peer.pid, &p.model, p.model_name.as_deref(), p.dtype.as_deref(), answer.best, &answer.hash);
            Ok(answer.encoded)
        });
        let id = req.id?;
        return Some(match result {
            Ok(encoded) => match serde_json::to_string(&id) {
                Ok(id) => format!(r#"{{"jsonrpc":"2.0","id":{id},"result":{encoded}}}"#),
                Err(e) => to_line(&Response::err(Value::Null, RpcError::internal(e))),
            },
            Err(e) => to_line(&Response::err(id, e)),
        });
    }
    let result = dispatch(state, &req.method, req.params, sub, peer).await;
    let id = req.id?; // a notification gets no reply
    Some(to_line(&match result {
        Ok(v) => Response::ok(id, v),
        Err(e) => Response::err(id, e),
    }))
}

/// The general decode (whole line to `Value`, then to `Request`), used only when the typed fast
/// path refused the line: it tells a parse error from a batch from an invalid request, with the
/// request's id when it has one.
fn decode_slow(line: &str) -> Result<Request, Box<Response>> {
    let value: Value = serde_json::from_str(line).map_err(|e| Box::new(Response::err(Value::Null, RpcError::parse(e))))?;
    let id = value.get("id").cloned();
    if value.is_array() {
        return Err(Box::new(Response::err(Value::Null, RpcError::invalid_request("batches are not supported"))));
    }
    serde_json::from_value(value).map_err(|e| Box::new(Response::err(id.unwrap_or(Value::Null), RpcError::invalid_request(e))))
}

/// Params of a method; absent params read as `{}` so all-optional param structs work without them.
fn params<T: DeserializeOwned>(p: Option<Value>) -> Result<T, RpcError> {
    serde_json::from_value(p.unwrap_or_else(|| json!({}))).map_err(RpcError::invalid_params)
}

/// [`params`], then their bounds ([`Checked`]).
fn checked<T: DeserializeOwned + Checked>(p: Option<Value>) -> Result<T, RpcError> {
    let v: T = params(p)?;
    v.check()?;
    Ok(v)
}

fn to_value<T: serde::Serialize>(v: T) -> Result<Value, RpcError> {
    serde_json::to_value(v).map_err(RpcError::internal)
}

const NO_TUNING: &str = "no tuning service is attached to this daemon";

async fn dispatch(
    state: &Arc<DaemonState>,
    method: &str,
    p: Option<Value>,
    sub: &mut Option<Subscription>,
    peer: &mut Peer,
) -> Result<Value, RpcError> {
    match method {
        methods::HELLO => {
            let h: HelloParams = checked(p)?;
            if h.protocol != PROTOCOL_VERSION {
                return Err(RpcError::new(
                    codes::PROTOCOL_MISMATCH,
                    format!(
                        "protocol mismatch: tilewised {VERSION} speaks protocol {PROTOCOL_VERSION}, the client {} speaks {}",
                        h.client, h.protocol
                    ),
                ));
            }
            peer.client = Arc::from(h.client.as_str());
            if !peer.kernel_pid {
                peer.pid = h.pid.unwrap_or(0);
            }
            // The command-line client says hello on every command (`events -f` included): its
            // hellos would bury what the daemon did. MLX processes and the app are recorded.
            if !h.client.starts_with(CLI_CLIENT_PREFIX) {
                let _ = state.events.publish(kind::CLIENT_HELLO, None, json!({"client": h.client}));
            }
            to_value(HelloResult {
                daemon: DAEMON_NAME.into(),
                version: VERSION.into(),
                protocol: PROTOCOL_VERSION,
                pid: std::process::id(),
            })
        }
        methods::STATUS => to_value(state.status()?),
        // Answered by `handle_line` before dispatch; kept here so `dispatch` stays complete.
        methods::POLICY_GET => to_value(state.policy_get(&checked(p)?)?),
        methods::HISTORY => {
            let h: HistoryParams = checked(p)?;
            let limit = h.limit.unwrap_or(50);
            let promotions = state.store().history(h.model.as_deref(), limit).map_err(RpcError::internal)?;
            to_value(HistoryResult { promotions })
        }
        methods::EVENTS_SUBSCRIBE => {
            let s: SubscribeParams = checked(p)?;
            let rx = state.events.subscribe();
            let (backlog, replayed_up_to) = match s.since {
                Some(after) => {
                    let stored = state.store().events_since(after, None, MAX_EVENT_REPLAY).map_err(RpcError::internal)?;
                    let last = stored.last().map_or(after, |e| e.id);
                    (stored.into(), last)
                }
                None => (Default::default(), 0),
            };
            *sub = Some(Subscription { rx, kinds: s.kinds, backlog, replayed_up_to });
            to_value(SubscribeResult { subscribed: true })
        }
        methods::EVENTS_LIST => {
            let l: EventsListParams = checked(p)?;
            let limit = l.limit.unwrap_or(50).min(MAX_EVENT_REPLAY);
            let events = state
                .store()
                .recent_events(limit, l.session_id, l.kinds.as_deref(), l.exclude_kinds.as_deref())
                .map_err(RpcError::internal)?;
            to_value(EventsListResult { events })
        }
        methods::CONFIG_GET => to_value(&*state.config.read().unwrap_or_else(|p| p.into_inner())),
        methods::USAGE_REPORT => {
            let u: UsageReportParams = checked(p)?;
            state.store().record_usage(&peer.client, peer.pid, &u).map_err(RpcError::internal)?;
            to_value(UsageReportResult { stored: true })
        }
        methods::CLIENTS_LIST => {
            let l: ClientsListParams = checked(p)?;
            state.flush_fetches();
            let clients = crate::usage::clients(&state.store(), &state.device_fingerprint, l.live_only, l.limit.unwrap_or(100).min(1000))
                .map_err(RpcError::internal)?;
            to_value(ClientsListResult { clients })
        }
        methods::POLICY_EXPORT => {
            let e: PolicyExportParams = checked(p)?;
            let bundle = crate::share::bundle::export(&state.store(), &state.device, &state.device_fingerprint, e.model.as_deref())
                .map_err(RpcError::internal)?;
            to_value(bundle)
        }
        methods::POLICY_IMPORT => {
            let i: PolicyImportParams = checked(p)?;
            let outcomes = crate::share::import_file(&state.store(), &i.path, &state.device_fingerprint, state.device.backend.as_str())
                .map_err(RpcError::invalid_params)?;
            let new: Vec<_> = outcomes.iter().filter(|o| o.new).collect();
            if !new.is_empty() {
                let _ = state.events.publish(kind::POLICY_IMPORTED, None, json!({"source": i.path, "imported": new}));
            }
            to_value(PolicyImportResult { imported: outcomes })
        }
        methods::IMPORTS_LIST => {
            let l: ImportsListParams = checked(p)?;
            to_value(ImportsListResult { imports: state.store().imports(l.state(), None).map_err(RpcError::internal)? })
        }
        methods::MODELS_LIST => {
            let _: ModelsListParams = checked(p)?;
            state.flush_fetches();
            let models = crate::usage::models(&state.store(), &state.device_fingerprint).map_err(RpcError::internal)?;
            to_value(ModelsListResult { models })
        }
        methods::DAEMON_SHUTDOWN => {
            info!("shutdown requested by a client");
            state.shutdown.cancel();
            to_value(ShutdownResult { stopping: true })
        }
        methods::TUNING_START => match &state.tuning {
            Some(t) => to_value(t.start(checked(p)?).await?),
            None => Err(RpcError::not_available(NO_TUNING)),
        },
        methods::TUNING_STOP => match &state.tuning {
            Some(t) => to_value(t.stop(params(p)?).await?),
            None => Err(RpcError::not_available(NO_TUNING)),
        },
        methods::SESSION_LIST => match &state.tuning {
            Some(t) => to_value(t.list_sessions().await?),
            None => Err(RpcError::not_available(NO_TUNING)),
        },
        methods::SESSION_SHOW => match &state.tuning {
            Some(t) => to_value(t.show_session(params(p)?).await?),
            None => Err(RpcError::not_available(NO_TUNING)),
        },
        methods::CONFIG_SET => {
            let set: ConfigSetParams = checked(p)?;
            let config = crate::config::Config::set_in_file(&state.paths.config_file, &set.key, &set.value)
                .map_err(|e| RpcError::invalid_params(format!("config.set {}: {e}", set.key)))?;
            info!(key = %set.key, "config changed by a client");
            *state.config.write().unwrap_or_else(|p| p.into_inner()) = config.clone();
            to_value(&config)
        }
        other => Err(RpcError::method_not_found(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(id: i64) -> Event {
        Event { id, at: String::new(), kind: "k".into(), session_id: None, data: json!({}) }
    }

    /// The seam between replay and live: events published after the receiver was created but
    /// before the store was read are in both, and must come out once, in order.
    #[tokio::test]
    async fn replay_then_live_skips_what_the_replay_already_sent() {
        let (tx, rx) = broadcast::channel(16);
        for id in [2, 3, 4, 5] {
            tx.send(ev(id)).unwrap();
        }
        let mut sub = Some(Subscription { rx, kinds: None, backlog: [1, 2, 3].map(ev).into(), replayed_up_to: 3 });
        let mut out = Vec::new();
        for _ in 0..5 {
            out.push(next_event(&mut sub).await.unwrap().id);
        }
        assert_eq!(out, [1, 2, 3, 4, 5]);
    }
}
