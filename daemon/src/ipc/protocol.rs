//! THE wire types of the local-socket protocol (docs/protocol.md): JSON-RPC 2.0, one message per
//! `\n`-terminated line. `tilewised`, `tilewise`, the app and the tests all use these definitions;
//! the Python plugin mirrors the few it needs.

use crate::probe::Device;
use crate::store::{Best, Budget, Event, HistoryEntry, MemoEntry, PolicySummary, Session, SessionId};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::PathBuf;

/// Protocol major version. A client whose major differs is refused by `hello` with
/// [`codes::PROTOCOL_MISMATCH`].
pub const PROTOCOL_VERSION: u32 = 1;
/// Longest line the daemon reads (bytes, without the `\n`).
pub const MAX_REQUEST_LINE: usize = 64 * 1024;
/// Longest line a client accepts from the daemon (replies like `session.show` can be large).
pub const MAX_REPLY_LINE: usize = 16 * 1024 * 1024;
/// Name the daemon reports in `hello`.
pub const DAEMON_NAME: &str = "tilewised";
/// This build's version (daemon and clients share it).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// Method name of event notifications sent to subscribers.
pub const EVENT_NOTIFICATION: &str = "event";
/// Client names of the `tilewise` command line start with this; the daemon does not store their
/// `client.hello` events.
pub const CLI_CLIENT_PREFIX: &str = "tilewise-cli/";
/// tilewise's own tools (the command line, the app, its test bridge): their `policy.get` calls
/// show a policy to a person and are not recorded as processes running a model.
pub const TOOL_CLIENT_PREFIXES: [&str; 3] = [CLI_CLIENT_PREFIX, "tilewise-app/", "tilewise-ui-bridge/"];

/// Method names.
pub mod methods {
    pub const HELLO: &str = "hello";
    pub const STATUS: &str = "status";
    pub const POLICY_GET: &str = "policy.get";
    pub const HISTORY: &str = "history";
    pub const EVENTS_SUBSCRIBE: &str = "events.subscribe";
    pub const EVENTS_LIST: &str = "events.list";
    pub const CONFIG_GET: &str = "config.get";
    pub const CONFIG_SET: &str = "config.set";
    pub const TUNING_START: &str = "tuning.start";
    pub const TUNING_STOP: &str = "tuning.stop";
    pub const SESSION_LIST: &str = "session.list";
    pub const SESSION_SHOW: &str = "session.show";
    pub const DAEMON_SHUTDOWN: &str = "daemon.shutdown";
    /// A plugin's record of what its process runs (shapes and counts, never text).
    pub const USAGE_REPORT: &str = "usage.report";
    /// The models the daemon has seen, with usage and best policy.
    pub const MODELS_LIST: &str = "models.list";
    /// The processes that fetched a policy, live ones first.
    pub const CLIENTS_LIST: &str = "clients.list";
    /// A bundle of this machine's proven policies (docs/sharing.md).
    pub const POLICY_EXPORT: &str = "policy.export";
    /// Imports a bundle file: its policies wait, pending, for verification here.
    pub const POLICY_IMPORT: &str = "policy.import";
    /// Imported policies and what this machine made of them.
    pub const IMPORTS_LIST: &str = "imports.list";
}

/// Error codes (JSON-RPC's standard ones, and ours in -32000..-32099).
pub mod codes {
    pub const PARSE_ERROR: i64 = -32700;
    pub const INVALID_REQUEST: i64 = -32600;
    pub const METHOD_NOT_FOUND: i64 = -32601;
    pub const INVALID_PARAMS: i64 = -32602;
    pub const INTERNAL: i64 = -32000;
    pub const BUSY: i64 = -32001;
    pub const NOT_FOUND: i64 = -32002;
    pub const INVALID_POLICY: i64 = -32003;
    pub const NOT_AVAILABLE: i64 = -32004;
    pub const PROTOCOL_MISMATCH: i64 = -32005;
}

/// A request (or, without `id`, a notification) as sent by clients.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Request {
    pub jsonrpc: String,
    /// Absent for notifications (the daemon does not answer those).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<Value>,
    pub method: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub params: Option<Value>,
}

impl Request {
    pub fn new(id: u64, method: &str, params: Option<Value>) -> Request {
        Request { jsonrpc: "2.0".into(), id: Some(Value::from(id)), method: method.into(), params }
    }
}

/// A reply: exactly one of `result` / `error` is set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    pub jsonrpc: String,
    /// The request's id; `null` when the request could not be read far enough to know it.
    pub id: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<RpcError>,
}

impl Response {
    pub fn ok(id: Value, result: Value) -> Response {
        Response { jsonrpc: "2.0".into(), id, result: Some(result), error: None }
    }
    pub fn err(id: Value, error: RpcError) -> Response {
        Response { jsonrpc: "2.0".into(), id, result: None, error: Some(error) }
    }
}

/// A message the daemon sends without being asked (events).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Notification {
    pub jsonrpc: String,
    pub method: String,
    pub params: Value,
}

/// A JSON-RPC error object.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, thiserror::Error)]
#[error("{message} (code {code})")]
pub struct RpcError {
    pub code: i64,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
}

impl RpcError {
    pub fn new(code: i64, message: impl Into<String>) -> RpcError {
        RpcError { code, message: message.into(), data: None }
    }
    pub fn with_data(mut self, data: Value) -> RpcError {
        self.data = Some(data);
        self
    }
    pub fn parse(why: impl std::fmt::Display) -> RpcError {
        RpcError::new(codes::PARSE_ERROR, format!("parse error: {why}"))
    }
    pub fn invalid_request(why: impl std::fmt::Display) -> RpcError {
        RpcError::new(codes::INVALID_REQUEST, format!("invalid request: {why}"))
    }
    pub fn method_not_found(method: &str) -> RpcError {
        RpcError::new(codes::METHOD_NOT_FOUND, format!("method not found: {method}"))
    }
    pub fn invalid_params(why: impl std::fmt::Display) -> RpcError {
        RpcError::new(codes::INVALID_PARAMS, format!("invalid params: {why}"))
    }
    pub fn internal(why: impl std::fmt::Display) -> RpcError {
        RpcError::new(codes::INTERNAL, format!("internal error: {why}"))
    }
    /// For methods whose part of the product is not in this build.
    pub fn not_available(why: impl std::fmt::Display) -> RpcError {
        RpcError::new(codes::NOT_AVAILABLE, format!("not available: {why}"))
    }
}

/// Any line a client may receive.
#[derive(Debug, Clone, PartialEq)]
pub enum Incoming {
    Response(Response),
    Notification(Notification),
}

impl Incoming {
    /// Parses one line from the daemon.
    pub fn parse(line: &str) -> Result<Incoming, serde_json::Error> {
        let v: Value = serde_json::from_str(line)?;
        if v.get("method").is_some() && v.get("id").is_none() {
            Ok(Incoming::Notification(serde_json::from_value(v)?))
        } else {
            Ok(Incoming::Response(serde_json::from_value(v)?))
        }
    }
}

// ---- params and results, per method ----

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HelloParams {
    /// Who is calling, e.g. `tilewise-cli/0.1.0`.
    pub client: String,
    pub protocol: u32,
    /// The caller's process id, recorded with its policy fetches where the kernel does not tell the
    /// daemon the peer's pid (macOS: the socket's credentials carry no pid).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
}

/// Limits on what a client may send, so that no request makes the daemon store or echo unbounded
/// text: the policy schema's for the fields a policy has too (fingerprints 128, MLX version 64,
/// backend one of its enum), the rest sized for what they hold. A violation is -32602 naming the
/// field ([`Checked::check`]).
pub mod limits {
    pub const FINGERPRINT: usize = 128;
    pub const MLX_VERSION: usize = 64;
    pub const BACKENDS: [&str; 3] = ["metal", "cuda", "cpu"];
    pub const CLIENT_NAME: usize = 200;
    /// A model as a person names it: a path, a Hugging Face id or `synthetic:<name>`.
    pub const MODEL_SPEC: usize = 4096;
    pub const EVENT_KIND: usize = 64;
    pub const EVENT_KINDS: usize = 64;
    pub const CONFIG_KEY: usize = 128;
    pub const HISTORY_LIMIT: u32 = 10_000;
    /// A usage report: distinct generation kinds and shapes in one report, and the counts' ceiling.
    pub const USAGE_GENERATIONS: usize = 64;
    pub const USAGE_SHAPES: usize = 512;
    pub const USAGE_COUNT: u64 = 1 << 40;
    /// Batch, token and feature sizes a report may name.
    pub const USAGE_SIZE: u32 = 1 << 24;
    /// The longest period one report may cover (a week).
    pub const USAGE_PERIOD_S: f64 = 7.0 * 24.0 * 3600.0;
    pub const DTYPE: usize = 32;
}

/// Params that check their own bounds (see [`limits`]).
pub trait Checked {
    fn check(&self) -> Result<(), RpcError>;
}

/// `field` holds at most `max` characters (and, when `required`, at least one).
pub fn check_text(field: &str, value: &str, max: usize, required: bool) -> Result<(), RpcError> {
    let n = value.chars().count();
    if required && value.trim().is_empty() {
        return Err(RpcError::invalid_params(format!("{field}: must not be empty")));
    }
    if n > max {
        return Err(RpcError::invalid_params(format!("{field}: at most {max} characters (got {n})")));
    }
    Ok(())
}

impl Checked for HelloParams {
    fn check(&self) -> Result<(), RpcError> {
        check_text("client", &self.client, limits::CLIENT_NAME, true)
    }
}

/// `field` is within `1..=max`.
fn check_size(field: &str, value: u64, max: u64) -> Result<(), RpcError> {
    if value == 0 || value > max {
        return Err(RpcError::invalid_params(format!("{field}: from 1 to {max} (got {value})")));
    }
    Ok(())
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HelloResult {
    pub daemon: String,
    pub version: String,
    pub protocol: u32,
    pub pid: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DbStatus {
    pub path: PathBuf,
    pub schema_version: u32,
}

/// What tuning is doing right now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TuningStatus {
    /// `idle`, `tuning` or `paused`.
    pub state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_id: Option<SessionId>,
    /// Anything else the tuning service wants to show (progress, best so far).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusResult {
    pub version: String,
    pub pid: u32,
    pub uptime_s: f64,
    /// `TILEWISE_HOME` if set.
    pub home: Option<PathBuf>,
    pub socket: PathBuf,
    pub device: Device,
    pub device_fingerprint: String,
    pub db: DbStatus,
    pub tuning: TuningStatus,
    /// Connections open now (this one included).
    pub clients: usize,
    /// Processes running a model that fetched a policy and still exist (at most 50).
    #[serde(default)]
    pub processes: Vec<ClientRecord>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicyGetParams {
    /// Model fingerprint.
    pub model: String,
    /// MLX version the caller runs.
    pub mlx: String,
    /// MLX backend (`metal`, `cuda`, `cpu`); default: this machine's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    /// Device fingerprint; default: this machine's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// How the caller named the model it loaded (a path or Hugging Face id): recorded with the
    /// fetch, so `tilewise models` can show names, not only fingerprints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_name: Option<String>,
    /// The model's weight type as loaded (`bfloat16`, `q4`...), recorded likewise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dtype: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PolicySource {
    Best,
    Native,
}

impl Checked for PolicyGetParams {
    fn check(&self) -> Result<(), RpcError> {
        check_text("model", &self.model, limits::MODEL_SPEC, true)?;
        check_text("mlx", &self.mlx, limits::MLX_VERSION, true)?;
        if let Some(b) = &self.backend {
            if !limits::BACKENDS.contains(&b.as_str()) {
                let shown: String = b.chars().take(32).collect();
                return Err(RpcError::invalid_params(format!("backend: one of {} (got {shown:?})", limits::BACKENDS.join(", "))));
            }
        }
        if let Some(d) = &self.device {
            check_text("device", d, limits::FINGERPRINT, true)?;
        }
        if let Some(n) = &self.model_name {
            check_text("model_name", n, limits::MODEL_SPEC, true)?;
        }
        if let Some(d) = &self.dtype {
            check_text("dtype", d, limits::DTYPE, true)?;
        }
        Ok(())
    }
}

/// Why a served policy is trusted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Evidence {
    pub ratio: f64,
    pub lo: f64,
    pub hi: f64,
    pub session_id: Option<SessionId>,
    pub promoted_at: String,
    /// What the policy does and what each workload measured (absent for promotions recorded
    /// before summaries existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<PolicySummary>,
    /// Where the policy came from when not from a search here ("imported from Apple M3 Pro (dev-…),
    /// verified here in session 7"); absent: found and proven on this machine.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
}

/// A policy document inside a reply, kept as the JSON text the daemon sent. Why: clients mostly
/// pass it on (the plugin caches it, the CLI prints it), and building a `Value` tree of it was over
/// half of a client's `policy.get` decode time. [`PolicyJson::to_value`]
/// gives the tree when one is wanted; equality compares documents, not spellings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(transparent)]
pub struct PolicyJson(Box<serde_json::value::RawValue>);

impl PolicyJson {
    pub fn from_value(v: &Value) -> PolicyJson {
        // Serializing a `Value` to text cannot fail (its map keys are strings).
        PolicyJson(serde_json::value::to_raw_value(v).expect("a Value always serializes"))
    }

    /// The document as a tree. The text was valid JSON when decoded, so this cannot fail.
    pub fn to_value(&self) -> Value {
        serde_json::from_str(self.0.get()).unwrap_or(Value::Null)
    }

    /// The JSON text as received.
    pub fn as_str(&self) -> &str {
        self.0.get()
    }
}

impl PartialEq for PolicyJson {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str() || self.to_value() == other.to_value()
    }
}

impl From<Value> for PolicyJson {
    fn from(v: Value) -> PolicyJson {
        PolicyJson::from_value(&v)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicyGetResult {
    pub policy: PolicyJson,
    pub hash: String,
    pub source: PolicySource,
    /// Why this policy: the evidence in words, or why native is served.
    pub reason: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evidence: Option<Evidence>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HistoryParams {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
}

impl Checked for HistoryParams {
    fn check(&self) -> Result<(), RpcError> {
        if let Some(m) = &self.model {
            check_text("model", m, limits::MODEL_SPEC, true)?;
        }
        match self.limit {
            Some(l) if l == 0 || l > limits::HISTORY_LIMIT => {
                Err(RpcError::invalid_params(format!("limit: 1..={} (got {l})", limits::HISTORY_LIMIT)))
            }
            _ => Ok(()),
        }
    }
}

fn check_kinds(field: &str, kinds: &Option<Vec<String>>) -> Result<(), RpcError> {
    let Some(kinds) = kinds else { return Ok(()) };
    if kinds.len() > limits::EVENT_KINDS {
        return Err(RpcError::invalid_params(format!("{field}: at most {} (got {})", limits::EVENT_KINDS, kinds.len())));
    }
    for (i, k) in kinds.iter().enumerate() {
        check_text(&format!("{field}[{i}]"), k, limits::EVENT_KIND, true)?;
    }
    Ok(())
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryResult {
    pub promotions: Vec<HistoryEntry>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SubscribeParams {
    /// Only these event kinds; all when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kinds: Option<Vec<String>>,
    /// First send the stored events with an id above this (at most [`MAX_EVENT_REPLAY`], oldest
    /// first), then the live ones, with none missing or repeated in between: a client that
    /// reconnects passes the last id it saw.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<i64>,
}

impl Checked for SubscribeParams {
    fn check(&self) -> Result<(), RpcError> {
        check_kinds("kinds", &self.kinds)
    }
}

/// Most stored events one `events.subscribe` replays or one `events.list` returns.
pub const MAX_EVENT_REPLAY: u32 = 1000;

/// `events.list`: the newest stored events.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventsListParams {
    /// How many (default 50, at most [`MAX_EVENT_REPLAY`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_id: Option<i64>,
    /// Only these kinds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kinds: Option<Vec<String>>,
    /// Not these kinds (`tilewise events` leaves `client.hello` out unless asked for `--all`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exclude_kinds: Option<Vec<String>>,
}

impl Checked for EventsListParams {
    fn check(&self) -> Result<(), RpcError> {
        check_kinds("kinds", &self.kinds)?;
        check_kinds("exclude_kinds", &self.exclude_kinds)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventsListResult {
    /// Oldest first.
    pub events: Vec<Event>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SubscribeResult {
    pub subscribed: bool,
}

/// Params of the `event` notification: the stored event itself.
pub type EventParams = Event;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TuningStartParams {
    /// A model path or `synthetic:<name>`; default: the service's choice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<Budget>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// Further session settings the tuning service understands (`policies`, `pairs`, `workload`,
    /// `screen`, ...: see `session::StartParams`); passed through untouched.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TuningStartResult {
    pub session_id: SessionId,
    pub resumed: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TuningStopParams {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_id: Option<SessionId>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TuningStopResult {
    pub stopped: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionListResult {
    pub sessions: Vec<Session>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionShowParams {
    pub session_id: SessionId,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionShowResult {
    pub session: Session,
    pub best: Option<Best>,
    /// Each a store `Candidate` plus `measurement`: its latest `{id, correct, ratio, lo, hi, at}` or null.
    pub candidates: Vec<Value>,
    pub memo_size: u64,
    /// The shape memo entries (`MemoEntry`) of the session's device/mlx/backend.
    #[serde(default)]
    pub memo: Vec<MemoEntry>,
    /// The search's own view: seed, model, generation, archive cells, screened count, budget, LLM counters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub search: Option<Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConfigSetParams {
    /// Dotted key, e.g. `idle.min_idle_s`.
    pub key: String,
    pub value: Value,
}

impl Checked for ConfigSetParams {
    fn check(&self) -> Result<(), RpcError> {
        check_text("key", &self.key, limits::CONFIG_KEY, true)
    }
}

impl Checked for TuningStartParams {
    fn check(&self) -> Result<(), RpcError> {
        match &self.model {
            Some(m) => check_text("model", m, limits::MODEL_SPEC, true),
            None => Ok(()),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShutdownResult {
    pub stopping: bool,
}

// ---- usage, clients, models ----

pub use crate::store::{GenerationUsage, ShapeUsage};

/// `usage.report`: what one process ran with one model since its previous report.
pub use crate::store::UsageReport as UsageReportParams;

impl Checked for UsageReportParams {
    fn check(&self) -> Result<(), RpcError> {
        check_text("model", &self.model, limits::FINGERPRINT, true)?;
        if let Some(n) = &self.model_name {
            check_text("model_name", n, limits::MODEL_SPEC, true)?;
        }
        if !(self.period_s.is_finite() && self.period_s >= 0.0 && self.period_s <= limits::USAGE_PERIOD_S) {
            return Err(RpcError::invalid_params(format!("period_s: from 0 to {} seconds", limits::USAGE_PERIOD_S)));
        }
        if self.generations.len() > limits::USAGE_GENERATIONS {
            return Err(RpcError::invalid_params(format!(
                "generations: at most {} kinds (got {})",
                limits::USAGE_GENERATIONS,
                self.generations.len()
            )));
        }
        if self.shapes.len() > limits::USAGE_SHAPES {
            return Err(RpcError::invalid_params(format!("shapes: at most {} (got {})", limits::USAGE_SHAPES, self.shapes.len())));
        }
        let size = u64::from(limits::USAGE_SIZE);
        for (i, g) in self.generations.iter().enumerate() {
            check_size(&format!("generations[{i}].batch"), g.batch.into(), size)?;
            check_size(&format!("generations[{i}].prompt_tokens"), g.prompt_tokens.into(), size)?;
            check_size(&format!("generations[{i}].generated_tokens"), g.generated_tokens.into(), size)?;
            if let Some(p) = g.prefill_step {
                check_size(&format!("generations[{i}].prefill_step"), p.into(), size)?;
            }
            check_size(&format!("generations[{i}].count"), g.count, limits::USAGE_COUNT)?;
        }
        for (i, s) in self.shapes.iter().enumerate() {
            check_size(&format!("shapes[{i}].m"), s.m.into(), size)?;
            check_size(&format!("shapes[{i}].n"), s.n.into(), size)?;
            check_size(&format!("shapes[{i}].k"), s.k.into(), size)?;
            check_size(&format!("shapes[{i}].calls"), s.calls, limits::USAGE_COUNT)?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UsageReportResult {
    pub stored: bool,
}

/// A process that fetched a policy: the newest fetch per (pid, model).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClientRecord {
    pub client: String,
    pub pid: Option<u32>,
    /// The process still exists (checked when asked; a pid may be reused by an unrelated process
    /// long after, so records older than a day are never called live).
    pub live: bool,
    pub model: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_name: Option<String>,
    /// `best` or `native`.
    pub source: String,
    pub policy_hash: String,
    /// The served best's proven speedup (absent for native).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ratio: Option<f64>,
    pub fetches: u64,
    pub first_at: String,
    pub last_at: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct ClientsListParams {
    /// Only processes that still exist.
    #[serde(default)]
    pub live_only: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
}

impl Checked for ClientsListParams {
    fn check(&self) -> Result<(), RpcError> {
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClientsListResult {
    pub clients: Vec<ClientRecord>,
}

/// What the recorded usage of a model adds up to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct UsageSummary {
    pub reports: u64,
    pub generations: u64,
    pub generated_tokens: u64,
    /// The batch size that generated the most tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub main_batch: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_report_at: Option<String>,
}

/// A model the daemon has seen (tuned by a session or fetched for by a plugin).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelInfo {
    pub fingerprint: String,
    /// How it was named when loaded: a directory, a Hugging Face id, `synthetic:<name>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// `bfloat16`, `float16`, `q4`, ...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dtype: Option<String>,
    pub first_seen: String,
    /// Last time a process fetched its policy or a session loaded it.
    pub last_used: String,
    pub usage: UsageSummary,
    /// The best proven policy for it on this device (any MLX version), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub best: Option<ModelBest>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelBest {
    pub hash: String,
    pub ratio: f64,
    pub lo: f64,
    pub hi: f64,
    pub mlx: String,
    pub backend: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct ModelsListParams {}

impl Checked for ModelsListParams {
    fn check(&self) -> Result<(), RpcError> {
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelsListResult {
    pub models: Vec<ModelInfo>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn responses_carry_exactly_one_of_result_or_error() {
        let ok = serde_json::to_value(Response::ok(json!(1), json!({"a": 1}))).unwrap();
        assert_eq!(ok, json!({"jsonrpc": "2.0", "id": 1, "result": {"a": 1}}));
        let err = serde_json::to_value(Response::err(Value::Null, RpcError::parse("eof"))).unwrap();
        assert_eq!(err, json!({"jsonrpc": "2.0", "id": null, "error": {"code": -32700, "message": "parse error: eof"}}));
    }

    #[test]
    fn incoming_tells_notifications_from_responses() {
        let n = Incoming::parse(r#"{"jsonrpc":"2.0","method":"event","params":{"id":1}}"#).unwrap();
        assert!(matches!(n, Incoming::Notification(n) if n.method == EVENT_NOTIFICATION));
        let r = Incoming::parse(r#"{"jsonrpc":"2.0","id":3,"error":{"code":-32601,"message":"m"}}"#).unwrap();
        assert!(matches!(r, Incoming::Response(r) if r.error.as_ref().unwrap().code == codes::METHOD_NOT_FOUND));
    }

    #[test]
    fn policy_get_params_default_device_and_backend() {
        let p: PolicyGetParams = serde_json::from_value(json!({"model": "m", "mlx": "0.32.4"})).unwrap();
        assert_eq!((p.backend, p.device), (None, None));
        assert!(serde_json::from_value::<PolicyGetParams>(json!({"mlx": "0.32.4"})).is_err());
    }
}

// ---- sharing ----

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct PolicyExportParams {
    /// Only this model's policies (a fingerprint).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
}

impl Checked for PolicyExportParams {
    fn check(&self) -> Result<(), RpcError> {
        if let Some(m) = &self.model {
            check_text("model", m, limits::FINGERPRINT, true)?;
        }
        Ok(())
    }
}

/// `policy.import`: a bundle file by path (the daemon reads it: a bundle may exceed a request line).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyImportParams {
    pub path: PathBuf,
}

impl Checked for PolicyImportParams {
    fn check(&self) -> Result<(), RpcError> {
        check_text("path", &self.path.to_string_lossy(), limits::MODEL_SPEC, true)?;
        // The daemon's working directory is not the caller's: a relative path would name another file.
        if !self.path.is_absolute() {
            return Err(RpcError::invalid_params("path: must be absolute"));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicyImportResult {
    pub imported: Vec<crate::share::ImportOutcome>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ImportsListParams {
    /// Only imports in this state (`pending`, `verified`, `rejected`, `starting_point`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
}

impl ImportsListParams {
    /// The state asked for, once `check` has accepted it.
    pub fn state(&self) -> Option<crate::store::ImportState> {
        let want = self.state.as_deref()?;
        crate::store::ImportState::ALL.into_iter().find(|s| s.as_str() == want)
    }
}

impl Checked for ImportsListParams {
    fn check(&self) -> Result<(), RpcError> {
        match &self.state {
            Some(s) if self.state().is_none() => Err(RpcError::invalid_params(format!(
                "state: {:?} is not one of pending, verified, rejected, starting_point",
                s.chars().take(64).collect::<String>()
            ))),
            _ => Ok(()),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImportsListResult {
    pub imports: Vec<crate::store::Import>,
}
