//! [`Client`]: the one way Rust code talks to `tilewised` (the CLI, the app, tests, benchmarks).
//!
//! ```no_run
//! # async fn demo() -> Result<(), tilewise::ipc::client::ClientError> {
//! use tilewise::ipc::client::Client;
//! let paths = tilewise::paths::Paths::from_env().unwrap();
//! let mut client = Client::connect(&paths).await?;     // DaemonNotRunning says how to start it
//! let hello = client.hello().await?;                    // checks the protocol version
//! let status = client.status().await?;
//! let mut events = client.subscribe_events(None).await?; // consumes the client
//! while let Some(event) = events.recv().await { println!("{} {}", event.kind, event.data); }
//! # Ok(()) }
//! ```
//!
//! One request at a time per client (calls take `&mut self`); open several clients for concurrency.

use super::protocol::*;
use crate::config::Config;
use crate::paths::Paths;
use crate::store::Event;
use futures_util::{SinkExt, StreamExt};
use interprocess::local_socket::tokio::{prelude::*, Stream};
use interprocess::local_socket::GenericFilePath;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::io;
use std::path::{Path, PathBuf};
use tokio::sync::mpsc;
use tokio_util::codec::{Framed, LinesCodec};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("the tilewise daemon is not running (no one listens on {}). Start it with `tilewise daemon start`, or run `tilewised` in a terminal", .socket.display())]
    DaemonNotRunning { socket: PathBuf },
    #[error("cannot connect to the tilewise daemon at {}: {source}", .socket.display())]
    Connect { socket: PathBuf, source: io::Error },
    #[error("connection to the daemon failed: {0}")]
    Io(#[from] io::Error),
    #[error("the daemon closed the connection")]
    Closed,
    #[error("the daemon sent something that is not a valid reply: {0}")]
    Protocol(String),
    /// The daemon answered with an error.
    #[error("daemon error: {0}")]
    Rpc(RpcError),
}

impl ClientError {
    /// The JSON-RPC error code when the daemon answered with an error.
    pub fn rpc_code(&self) -> Option<i64> {
        match self {
            ClientError::Rpc(e) => Some(e.code),
            _ => None,
        }
    }
}

/// A connection to the daemon.
pub struct Client {
    framed: Framed<Stream, LinesCodec>,
    next_id: u64,
    socket: PathBuf,
    name: String,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("socket", &self.socket).finish()
    }
}

impl Client {
    /// Connects to the daemon of these paths (`TILEWISE_SOCKET` overrides the socket).
    pub async fn connect(paths: &Paths) -> Result<Client, ClientError> {
        Client::connect_path(&paths.client_socket()).await
    }

    /// Connects to a socket path.
    pub async fn connect_path(socket: &Path) -> Result<Client, ClientError> {
        let connect_err = |source: io::Error| match source.kind() {
            io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => ClientError::DaemonNotRunning { socket: socket.to_path_buf() },
            _ => ClientError::Connect { socket: socket.to_path_buf(), source },
        };
        let name = socket.to_fs_name::<GenericFilePath>().map_err(connect_err)?;
        let stream = Stream::connect(name).await.map_err(connect_err)?;
        Ok(Client {
            framed: Framed::new(stream, LinesCodec::new_with_max_length(MAX_REPLY_LINE)),
            next_id: 1,
            socket: socket.to_path_buf(),
            name: format!("tilewise-rs/{VERSION}"),
        })
    }

    /// Sets the name sent in `hello` (e.g. `tilewise-cli/0.1.0`, `tilewise-app/0.1.0`).
    pub fn with_name(mut self, name: impl Into<String>) -> Client {
        self.name = name.into();
        self
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Calls `method` and returns its result, or the daemon's error as [`ClientError::Rpc`].
    /// Event notifications arriving meanwhile are skipped (use [`Client::subscribe_events`]).
    pub async fn call(&mut self, method: &str, params: Option<Value>) -> Result<Value, ClientError> {
        self.round_trip(method, params.as_ref()).await
    }

    /// [`Client::call`] with typed params and result.
    pub async fn call_typed<P: Serialize, R: DeserializeOwned>(&mut self, method: &str, params: &P) -> Result<R, ClientError> {
        self.round_trip(method, Some(params)).await
    }

    /// One request out, its reply in. The params are encoded straight into the request line and
    /// the result decoded straight from the reply line (no `serde_json::Value` in between): this
    /// is the latency every `policy.get` at MLX start pays.
    async fn round_trip<P: Serialize, R: DeserializeOwned>(&mut self, method: &str, params: Option<&P>) -> Result<R, ClientError> {
        let id = self.next_id;
        self.next_id += 1;
        let req = OutgoingRequest { jsonrpc: "2.0", id, method, params };
        let line = serde_json::to_string(&req).map_err(|e| ClientError::Protocol(e.to_string()))?;
        self.framed.send(line).await.map_err(codec_err)?;
        loop {
            let line = self.framed.next().await.ok_or(ClientError::Closed)?.map_err(codec_err)?;
            if let Some(result) = decode_reply(&line, id, method)? {
                return Ok(result);
            }
        }
    }

    /// The handshake: daemon name, version, protocol (a protocol mismatch is an `Rpc` error -32005).
    pub async fn hello(&mut self) -> Result<HelloResult, ClientError> {
        let p = HelloParams { client: self.name.clone(), protocol: PROTOCOL_VERSION, pid: Some(std::process::id()) };
        self.call_typed(methods::HELLO, &p).await
    }

    pub async fn status(&mut self) -> Result<StatusResult, ClientError> {
        self.call_typed(methods::STATUS, &serde_json::json!({})).await
    }

    pub async fn policy_get(&mut self, params: &PolicyGetParams) -> Result<PolicyGetResult, ClientError> {
        self.call_typed(methods::POLICY_GET, params).await
    }

    pub async fn history(&mut self, params: &HistoryParams) -> Result<HistoryResult, ClientError> {
        self.call_typed(methods::HISTORY, params).await
    }

    /// The models the daemon has seen (`models.list`).
    pub async fn models_list(&mut self) -> Result<ModelsListResult, ClientError> {
        self.call_typed(methods::MODELS_LIST, &ModelsListParams::default()).await
    }

    /// The processes that fetched a policy (`clients.list`).
    pub async fn clients_list(&mut self, p: &ClientsListParams) -> Result<ClientsListResult, ClientError> {
        self.call_typed(methods::CLIENTS_LIST, p).await
    }

    pub async fn config_get(&mut self) -> Result<Config, ClientError> {
        self.call_typed(methods::CONFIG_GET, &serde_json::json!({})).await
    }

    /// The newest stored events, oldest first (`events.list`).
    pub async fn events_list(&mut self, p: &EventsListParams) -> Result<EventsListResult, ClientError> {
        self.call_typed(methods::EVENTS_LIST, p).await
    }

    /// Asks the daemon to stop (it replies first, then shuts down).
    pub async fn shutdown(&mut self) -> Result<ShutdownResult, ClientError> {
        self.call_typed(methods::DAEMON_SHUTDOWN, &serde_json::json!({})).await
    }

    /// Subscribes to events (all kinds, or only `kinds`) and hands the connection to a task that
    /// forwards each event. The receiver ends (`recv()` → `None`) when the daemon goes away.
    /// Needs a tokio runtime.
    pub async fn subscribe_events(self, kinds: Option<Vec<String>>) -> Result<mpsc::Receiver<Event>, ClientError> {
        self.subscribe_events_since(kinds, None).await
    }

    /// Like [`Client::subscribe_events`], but first receives the stored events with an id above
    /// `since` (a reconnecting client passes the last id it saw: nothing is missed or repeated).
    pub async fn subscribe_events_since(
        mut self,
        kinds: Option<Vec<String>>,
        since: Option<i64>,
    ) -> Result<mpsc::Receiver<Event>, ClientError> {
        let _: SubscribeResult = self.call_typed(methods::EVENTS_SUBSCRIBE, &SubscribeParams { kinds, since }).await?;
        let (tx, rx) = mpsc::channel(256);
        tokio::spawn(async move {
            while let Some(Ok(line)) = self.framed.next().await {
                let Ok(Incoming::Notification(n)) = Incoming::parse(&line) else { continue };
                if n.method != EVENT_NOTIFICATION {
                    continue;
                }
                let Ok(event) = serde_json::from_value::<Event>(n.params) else { continue };
                if tx.send(event).await.is_err() {
                    break; // the receiver was dropped
                }
            }
        });
        Ok(rx)
    }
}

/// A request as the client writes it: the same fields, order and bytes as [`Request`], but the
/// params are borrowed and encoded in place instead of going through a `Value`.
#[derive(Serialize)]
struct OutgoingRequest<'a, P: Serialize> {
    jsonrpc: &'static str,
    id: u64,
    method: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    params: Option<&'a P>,
}

/// The common reply shape, decoded with the result already typed.
#[derive(Deserialize)]
struct TypedReply<R> {
    #[serde(default)]
    id: Option<Value>,
    #[serde(default)]
    method: Option<serde::de::IgnoredAny>,
    #[serde(default = "none")]
    result: Option<R>,
    #[serde(default)]
    error: Option<RpcError>,
}

fn none<R>() -> Option<R> {
    None
}

/// Decodes one line received while waiting for the reply to request `id` of `method`:
/// `Ok(Some(result))` for its result, `Ok(None)` for a line to skip (an event notification), an
/// error otherwise (the daemon's error as [`ClientError::Rpc`]). Public so the IPC benchmark
/// measures the client's real decode.
///
/// The common case (our reply, with a result of the expected type) is decoded in one pass straight
/// into `R`. Anything else — a notification, another id, an error, a result of the wrong shape —
/// is decoded again the general way, so every such case answers exactly as it always did.
pub fn decode_reply<R: DeserializeOwned>(line: &str, id: u64, method: &str) -> Result<Option<R>, ClientError> {
    if let Ok(TypedReply { id: Some(Value::Number(n)), method: None, result: Some(result), error: None }) =
        serde_json::from_str::<TypedReply<R>>(line)
    {
        if n.as_u64() == Some(id) {
            return Ok(Some(result));
        }
    }
    match Incoming::parse(line).map_err(|e| ClientError::Protocol(format!("{e}: {line}")))? {
        Incoming::Notification(_) => Ok(None),
        Incoming::Response(r) if r.id == id => match (r.result, r.error) {
            (_, Some(e)) => Err(ClientError::Rpc(e)),
            (Some(v), None) => serde_json::from_value(v).map(Some).map_err(|e| ClientError::Protocol(format!("{method} result: {e}"))),
            (None, None) => Err(ClientError::Protocol("reply has neither result nor error".into())),
        },
        // An error about an unreadable frame (id null) is about our last request.
        Incoming::Response(r) if r.id.is_null() && r.error.is_some() => Err(ClientError::Rpc(r.error.unwrap())),
        Incoming::Response(r) => Err(ClientError::Protocol(format!("reply for id {} while waiting for {id}", r.id))),
    }
}

fn codec_err(e: tokio_util::codec::LinesCodecError) -> ClientError {
    match e {
        tokio_util::codec::LinesCodecError::MaxLineLengthExceeded => {
            ClientError::Protocol(format!("reply longer than {MAX_REPLY_LINE} bytes"))
        }
        tokio_util::codec::LinesCodecError::Io(e) => ClientError::Io(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_reply_types_our_result_and_answers_everything_else_as_before() {
        let ok = r#"{"jsonrpc":"2.0","id":7,"result":{"daemon":"tilewised","version":"0.1.0","protocol":1,"pid":42}}"#;
        let h: HelloResult = decode_reply(ok, 7, "hello").unwrap().unwrap();
        assert_eq!((h.daemon.as_str(), h.pid), ("tilewised", 42));
        // An event notification is skipped.
        let ev = r#"{"jsonrpc":"2.0","method":"event","params":{"id":1}}"#;
        assert!(decode_reply::<HelloResult>(ev, 7, "hello").unwrap().is_none());
        // The daemon's error, for our id or about an unreadable frame (id null).
        for line in [
            r#"{"jsonrpc":"2.0","id":7,"error":{"code":-32601,"message":"m"}}"#,
            r#"{"jsonrpc":"2.0","id":null,"error":{"code":-32700,"message":"m"}}"#,
        ] {
            assert!(matches!(decode_reply::<HelloResult>(line, 7, "hello"), Err(ClientError::Rpc(_))), "{line}");
        }
        // Another id, a result of the wrong shape, no result at all, not JSON: protocol errors.
        let other = decode_reply::<HelloResult>(&ok.replace(":7,", ":8,"), 7, "hello").unwrap_err();
        assert!(other.to_string().contains("reply for id 8 while waiting for 7"), "{other}");
        let shape = decode_reply::<PolicyGetResult>(ok, 7, "policy.get").unwrap_err();
        assert!(matches!(&shape, ClientError::Protocol(m) if m.starts_with("policy.get result:")), "{shape}");
        let empty = decode_reply::<HelloResult>(r#"{"jsonrpc":"2.0","id":7}"#, 7, "hello").unwrap_err();
        assert!(empty.to_string().contains("neither result nor error"), "{empty}");
        assert!(matches!(decode_reply::<HelloResult>("{nope", 7, "hello"), Err(ClientError::Protocol(_))));
    }

    #[test]
    fn requests_are_written_as_the_protocol_type_would_write_them() {
        let p = PolicyGetParams {
            model: "m".into(),
            mlx: "0.32.4".into(),
            backend: Some("cpu".into()),
            device: None,
            model_name: None,
            dtype: None,
        };
        let line =
            serde_json::to_string(&OutgoingRequest { jsonrpc: "2.0", id: 3, method: methods::POLICY_GET, params: Some(&p) }).unwrap();
        let as_request: Request = serde_json::from_str(&line).unwrap();
        assert_eq!(as_request, Request::new(3, methods::POLICY_GET, Some(serde_json::to_value(&p).unwrap())));
        let bare = serde_json::to_string(&OutgoingRequest::<Value> { jsonrpc: "2.0", id: 4, method: "status", params: None }).unwrap();
        assert_eq!(bare, r#"{"jsonrpc":"2.0","id":4,"method":"status"}"#);
    }
}
