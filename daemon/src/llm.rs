//! The optional LLM mutator's endpoint side (off by default): an OpenAI-compatible
//! `/v1/chat/completions` endpoint from the config (`[llm] endpoint = "http://127.0.0.1:8080/v1"`; a
//! local `mlx_lm.server` works with `model = "default_model"`, its name for the model it serves) is
//! shown the model's shapes, its sibling groups, the workload's M values and the best policies with
//! their measurements, and asked for better ones.
//!
//! An endpoint proposes **data only**: policy JSON (fenced ```json blocks, or the whole reply). Code in
//! a reply — a ```python block, a `def` — is refused with the reason "code proposals are not run":
//! nothing an endpoint sends is ever executed, by the daemon or by the worker (the endpoint may be
//! remote, and an LLM is "elsewhere"; the policy is data precisely so that no code from elsewhere
//! runs). The user's own OpenEvolve `best_program.py`, a file they name, is another matter and stays
//! with the plugin (`tilewise.plugin`, `tabulate`).
//!
//! A request runs on a detached thread (blocking `ureq` with a global timeout) and its answer comes
//! back through a channel ([`PendingReply`]): the session polls it between steps and never waits for
//! it, and dropping the handle abandons the request — so a stop, a pause or a daemon shutdown never
//! waits for an endpoint. How the session paces requests and keeps the reasons is in
//! `session/llm.rs`.

use crate::config::LlmConfig;
use crate::evolve::engine::Engine;
use crate::evolve::space::SearchSpace;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::time::Duration;
use tokio::sync::oneshot;

/// Longest wait for one reply.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Most proposals taken from one reply.
pub const MAX_PROPOSALS: usize = 4;
/// Largest reply body read.
const MAX_BODY_BYTES: u64 = 1 << 20;
/// The refusal of every proposal that holds code.
pub const CODE_REFUSED: &str = "code proposals are not run";

/// One thing parsed out of a reply.
#[derive(Debug, Clone, PartialEq)]
pub enum Proposal {
    /// A policy document (still to be validated against the schema and the machine).
    Policy(Value),
    /// Not usable: `reason` is the class counted per session (`CODE_REFUSED`, "not JSON", ...),
    /// `excerpt` the start of what was refused.
    Refused { reason: String, excerpt: String },
}

impl Proposal {
    fn refused(reason: impl Into<String>, text: &str) -> Proposal {
        Proposal::Refused { reason: reason.into(), excerpt: clip(text) }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LlmError {
    #[error("llm endpoint {url}: {message}")]
    Http { url: String, message: String },
    #[error("llm endpoint {url}: HTTP {status}: {first_line}")]
    Status { url: String, status: u16, first_line: String },
    #[error("llm endpoint {url}: the reply is not a chat completion: {message}")]
    Shape { url: String, message: String },
    #[error("llm request abandoned")]
    Abandoned,
}

/// The chat messages for one request.
pub fn prompt(space: &SearchSpace, engine: &Engine) -> Vec<Value> {
    let mut members: Vec<_> = engine.islands.iter().flatten().collect();
    members.sort_by(|a, b| b.fitness.total_cmp(&a.fitness));
    members.dedup_by(|a, b| a.key == b.key);
    let best: Vec<Value> =
        members.iter().take(5).map(|m| json!({"speedup": (m.fitness * 1000.0).round() / 1000.0, "policy": m.policy.to_value()})).collect();
    let shapes: Vec<Value> = space.shapes.iter().map(|s| json!({"name": s.name, "N": s.n, "K": s.k, "layers": s.count})).collect();
    let groups: Vec<Value> = space.fusion.iter().map(|g| json!({"scope": g.scope, "members": g.members, "N": g.n, "K": g.k})).collect();
    let m_values: Vec<u64> = space.m_bands().iter().map(|b| b.0).collect();
    let system = format!(
        "You tune how MLX runs the matrix multiplications of a model on {backend}. A policy is JSON (schema tilewise.policy/1): \
         {{\"schema\":\"tilewise.policy/1\",\"target\":{target},\"fusion\":{{\"groups\":[{{\"scope\":\"...\",\"members\":[...]}}]}},\
         \"matmul\":{{\"rules\":[{{\"m\":[lo,hi],\"n\":[lo,hi],\"k\":[lo,hi],\"plan\":PLAN}}],\"default\":PLAN}}}}. \
         `fusion` (optional) runs the listed sibling groups as one matmul each (their N summed); rules then see the fused \
         shapes. In `matmul`, the first matching rule wins, ranges are inclusive (hi null = unbounded), and PLAN is \
         {{\"kind\":\"native\"}} or {{\"kind\":\"split\",\"tile_m\":int|null,\"tile_n\":int|null,\"tile_k\":int|null}}. \
         M = tokens in flight, N = output features, K = input features. Answer with up to 3 policies, each in its own \
         ```json block. Code is not run: answer with JSON only.",
        backend = space.target.backend,
        target = serde_json::to_string(&space.target).unwrap_or_default(),
    );
    let user = format!(
        "Model linear shapes: {}\nSibling groups that may be fused: {}\nWorkload M values: {:?}\n\
         Best policies so far with their measured speedup over stock (>1 is faster):\n{}\nPropose better policies.",
        serde_json::to_string(&shapes).unwrap_or_default(),
        serde_json::to_string(&groups).unwrap_or_default(),
        m_values,
        serde_json::to_string_pretty(&best).unwrap_or_default(),
    );
    vec![json!({"role": "system", "content": system}), json!({"role": "user", "content": user})]
}

/// Fenced code blocks of a markdown text: (language, body).
fn fenced_blocks(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("```") {
        let after = &rest[start + 3..];
        let (lang, body_start) = match after.find('\n') {
            Some(nl) => (after[..nl].trim().to_lowercase(), nl + 1),
            None => break,
        };
        let body = &after[body_start..];
        let Some(end) = body.find("```") else { break };
        out.push((lang, body[..end].to_string()));
        rest = &body[end + 3..];
    }
    out
}

fn policies_in(v: Value) -> Vec<Proposal> {
    match v {
        Value::Array(items) => items.into_iter().flat_map(policies_in).collect(),
        Value::Object(ref o) if o.contains_key("policies") => policies_in(o["policies"].clone()),
        Value::Object(ref o) if o.contains_key("matmul") => vec![Proposal::Policy(v)],
        other => vec![Proposal::refused("JSON that is not a policy", &other.to_string())],
    }
}

fn clip(s: &str) -> String {
    let s = s.trim();
    let mut out: String = s.chars().take(120).collect();
    if out.len() < s.len() {
        out.push('…');
    }
    out
}

/// Whether a block (or a bare reply) is code rather than data.
fn is_code(lang: &str, body: &str) -> bool {
    const CODE_LANGS: [&str; 8] = ["python", "py", "python3", "sh", "bash", "shell", "javascript", "js"];
    CODE_LANGS.contains(&lang) || body.lines().any(|l| l.trim_start().starts_with("def ") || l.trim_start().starts_with("import "))
}

/// Parses a reply's text into proposals (at most [`MAX_PROPOSALS`]). Pure, so it is tested directly.
pub fn parse_reply(text: &str) -> Vec<Proposal> {
    let mut out = Vec::new();
    let blocks = fenced_blocks(text);
    if blocks.is_empty() {
        match serde_json::from_str::<Value>(text.trim()) {
            Ok(v) => out.extend(policies_in(v)),
            Err(_) if is_code("", text) => out.push(Proposal::refused(CODE_REFUSED, text)),
            Err(e) => out.push(Proposal::refused("neither a ```json block nor JSON", &format!("{e}: {text}"))),
        }
    }
    for (lang, body) in blocks {
        if is_code(&lang, &body) {
            out.push(Proposal::refused(CODE_REFUSED, &body));
        } else if lang.is_empty() || lang == "json" {
            match serde_json::from_str::<Value>(body.trim()) {
                Ok(v) => out.extend(policies_in(v)),
                Err(e) => out.push(Proposal::refused("bad JSON block", &format!("{e}: {body}"))),
            }
        } else {
            out.push(Proposal::refused(format!("a {lang} block (only ```json is read)"), &body));
        }
    }
    out.truncate(MAX_PROPOSALS);
    out
}

/// The chat-completions URL of an endpoint base (`…/v1` or the full URL).
pub fn completions_url(endpoint: &str) -> String {
    let e = endpoint.trim_end_matches('/');
    if e.ends_with("/chat/completions") {
        e.to_string()
    } else {
        format!("{e}/chat/completions")
    }
}

/// A request on its way: [`PendingReply::poll`] takes the answer once it is there; dropping the
/// handle abandons the request (its thread ends at the timeout at the latest; nothing waits for it).
pub struct PendingReply {
    rx: oneshot::Receiver<Result<Vec<Proposal>, LlmError>>,
}

impl PendingReply {
    /// The answer if it has arrived, without waiting.
    pub fn poll(&mut self) -> Option<Result<Vec<Proposal>, LlmError>> {
        match self.rx.try_recv() {
            Ok(r) => Some(r),
            Err(oneshot::error::TryRecvError::Empty) => None,
            Err(oneshot::error::TryRecvError::Closed) => Some(Err(LlmError::Abandoned)),
        }
    }

    /// Waits for the answer (tests and one-shot callers).
    pub async fn wait(self) -> Result<Vec<Proposal>, LlmError> {
        self.rx.await.unwrap_or(Err(LlmError::Abandoned))
    }
}

/// Sends the messages on a detached thread; the answer (the first choice's content, parsed) comes
/// back through the returned handle within `timeout`.
pub fn send(cfg: &LlmConfig, messages: &[Value], timeout: Duration) -> PendingReply {
    let (tx, rx) = oneshot::channel();
    let url = completions_url(&cfg.endpoint);
    let key = cfg.api_key_env.as_ref().and_then(|k| std::env::var(k).ok());
    let body = json!({"model": cfg.model, "messages": messages, "temperature": 0.8, "max_tokens": 2048});
    std::thread::Builder::new()
        .name("tilewise-llm".into())
        .spawn(move || {
            let _ = tx.send(exchange(&url, key, &body, timeout));
        })
        .map_err(|e| tracing::warn!("llm: cannot start the request thread: {e}"))
        .ok();
    PendingReply { rx }
}

/// [`send`], waiting for the answer.
pub async fn ask_with_timeout(cfg: &LlmConfig, messages: &[Value], timeout: Duration) -> Result<Vec<Proposal>, LlmError> {
    send(cfg, messages, timeout).wait().await
}

fn exchange(url: &str, key: Option<String>, body: &Value, timeout: Duration) -> Result<Vec<Proposal>, LlmError> {
    let http = |message: String| LlmError::Http { url: url.to_string(), message };
    let agent: ureq::Agent = ureq::Agent::config_builder().timeout_global(Some(timeout)).http_status_as_error(false).build().into();
    let mut req = agent.post(url).header("Content-Type", "application/json");
    if let Some(k) = key {
        req = req.header("Authorization", &format!("Bearer {k}"));
    }
    let mut resp = req.send_json(body).map_err(|e| http(e.to_string()))?;
    let status = resp.status().as_u16();
    let text = resp.body_mut().with_config().limit(MAX_BODY_BYTES).read_to_string().map_err(|e| http(e.to_string()))?;
    if !(200..300).contains(&status) {
        let first_line = clip(text.lines().find(|l| !l.trim().is_empty()).unwrap_or("(empty body)"));
        return Err(LlmError::Status { url: url.to_string(), status, first_line });
    }
    let shape = |message: String| LlmError::Shape { url: url.to_string(), message };
    let reply: Value = serde_json::from_str(&text).map_err(|e| shape(format!("{e}: {}", clip(&text))))?;
    let content = reply
        .pointer("/choices/0/message/content")
        .and_then(Value::as_str)
        .ok_or_else(|| shape(format!("no choices[0].message.content in {}", clip(&reply.to_string()))))?;
    Ok(parse_reply(content))
}

/// What the session keeps of its LLM requests (saved with the session, shown by `session.show` as
/// `search.llm`). Bounded: counts per reason plus the last [`LlmStats::EXAMPLES`] refused proposals.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LlmStats {
    pub requests: u64,
    pub requests_failed: u64,
    /// Proposals that became candidates of the search.
    pub valid: u64,
    /// Proposals refused (every reason counted in `refused`).
    pub invalid: u64,
    /// The generation of the last request sent.
    pub asked_at_generation: Option<u64>,
    /// Refused proposals per reason (`code proposals are not run`, `invalid policy`, `repeat of a
    /// candidate already seen`, ...).
    #[serde(default)]
    pub refused: BTreeMap<String, u64>,
    /// The last refused proposals, newest last.
    #[serde(default)]
    pub examples: Vec<RefusedExample>,
    /// Candidates from the LLM that the cost model screened out (not measured end to end).
    #[serde(default)]
    pub screened: u64,
    /// The next request is due at this generation (the backoff's state).
    #[serde(default)]
    pub next_ask_generation: u64,
    /// Generations between requests now (doubles after a failure or a reply without a usable
    /// proposal, back to the minimum after a usable one).
    #[serde(default)]
    pub backoff_generations: u64,
    /// The last request's error, if it failed.
    #[serde(default)]
    pub last_error: Option<String>,
    /// Requests abandoned because the session stopped or paused while they were out.
    #[serde(default)]
    pub abandoned: u64,
}

/// One refused proposal, as `session.show` lists it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RefusedExample {
    pub reason: String,
    pub detail: String,
    pub generation: u64,
}

impl LlmStats {
    /// Refused proposals kept as examples.
    pub const EXAMPLES: usize = 5;
    /// Fewest generations between two requests.
    pub const MIN_INTERVAL: u64 = 2;
    /// Most generations between two requests (the backoff's ceiling).
    pub const MAX_INTERVAL: u64 = 32;

    /// Counts one refusal under `reason` and keeps it as the newest example.
    pub fn refuse(&mut self, reason: &str, detail: &str, generation: u64) {
        self.invalid += 1;
        *self.refused.entry(reason.to_string()).or_default() += 1;
        self.examples.push(RefusedExample { reason: reason.to_string(), detail: clip(detail), generation });
        if self.examples.len() > Self::EXAMPLES {
            self.examples.remove(0);
        }
    }

    /// Whether a request is due at `generation`.
    pub fn due(&self, generation: u64) -> bool {
        generation >= self.next_ask_generation
    }

    /// After an answer: a reply with a usable proposal keeps the pace at the minimum; a failure or
    /// a reply with nothing usable doubles the interval, up to the ceiling.
    pub fn paced(&mut self, generation: u64, usable: bool) {
        self.backoff_generations = if usable {
            Self::MIN_INTERVAL
        } else {
            (self.backoff_generations.max(Self::MIN_INTERVAL / 2) * 2).clamp(Self::MIN_INTERVAL, Self::MAX_INTERVAL)
        };
        self.next_ask_generation = generation + self.backoff_generations;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: &str = r#"{"schema":"tilewise.policy/1","target":{"device":"d","model":"m","mlx":"x","backend":"cpu"},"matmul":{"rules":[],"default":{"kind":"native"}}}"#;

    #[test]
    fn replies_parse_into_policies_and_reasoned_refusals() {
        assert!(matches!(&parse_reply(POLICY)[..], [Proposal::Policy(_)]));
        let text = format!("Here you go:\n```json\n{POLICY}\n```\nand\n```python\ndef choose_tile_size(M, N, K, device_info):\n    return None, 256, None\n```\n");
        let got = parse_reply(&text);
        assert!(
            matches!(&got[..], [Proposal::Policy(_), Proposal::Refused { reason, excerpt }] if reason == CODE_REFUSED && excerpt.contains("def choose_tile_size")),
            "{got:?}"
        );
        // Code is refused however it is dressed: a bare function, an unlabelled block, a shell block.
        for code in [
            "def choose_tile_size(M, N, K, d):\n    import os; os.system('touch /tmp/x')\n",
            "```\nimport os\nos.system('id')\n```",
            "```sh\nrm -rf ~\n```",
        ] {
            let got = parse_reply(code);
            assert!(matches!(&got[..], [Proposal::Refused { reason, .. }] if reason == CODE_REFUSED), "{code}: {got:?}");
        }
        assert!(
            matches!(&parse_reply("I cannot help with that.")[..], [Proposal::Refused { reason, .. }] if reason.starts_with("neither"))
        );
        assert!(matches!(&parse_reply("```json\n{not json\n```")[..], [Proposal::Refused { reason, .. }] if reason == "bad JSON block"));
        assert!(matches!(&parse_reply(r#"{"policies": [{"matmul": {}}, 3]}"#)[..], [Proposal::Policy(_), Proposal::Refused { .. }]));
        assert_eq!(completions_url("http://h/v1/"), "http://h/v1/chat/completions");
    }

    #[test]
    fn refusals_are_bounded_and_pacing_backs_off_then_recovers() {
        let mut s = LlmStats::default();
        for i in 0..12 {
            s.refuse(if i % 3 == 0 { CODE_REFUSED } else { "bad JSON block" }, &"x".repeat(500), i);
        }
        assert_eq!((s.invalid, s.refused[CODE_REFUSED], s.refused["bad JSON block"]), (12, 4, 8));
        assert_eq!(s.examples.len(), LlmStats::EXAMPLES);
        assert_eq!(s.examples.last().unwrap().generation, 11);
        assert!(s.examples[0].detail.chars().count() <= 121);

        assert!(s.due(0));
        let mut intervals = Vec::new();
        for g in [0, 2, 6, 14, 30, 62, 94] {
            s.paced(g, false);
            intervals.push(s.backoff_generations);
        }
        assert_eq!(intervals, vec![2, 4, 8, 16, 32, 32, 32]);
        assert!(!s.due(100) && s.due(126));
        s.paced(126, true);
        assert_eq!((s.backoff_generations, s.next_ask_generation), (2, 128));
    }
}
