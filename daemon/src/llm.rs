//! The optional LLM mutator (off by default): an OpenAI-compatible `/v1/chat/completions` endpoint
//! from the config (`[llm] endpoint = "http://127.0.0.1:8080/v1"`, a local `mlx_lm.server` works) is
//! shown the model's shapes, the workload's M values and the best policies with their measurements,
//! and asked for better ones.
//!
//! A reply may hold policy JSON (fenced ```json blocks, or the whole reply) or an OpenEvolve-style
//! `choose_tile_size(M, N, K, device_info)` function (a fenced ```python block). The daemon never
//! runs that code: the session hands it to the worker's `tabulate` op, which runs it in its own
//! process with a time limit and returns the table as policy data. Anything else is counted as
//! invalid and dropped. The HTTP call is blocking `ureq` on a blocking thread with a global timeout,
//! so a slow endpoint costs at most that timeout and never stalls the runtime.

use crate::config::LlmConfig;
use crate::evolve::engine::Engine;
use crate::evolve::space::SearchSpace;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::time::Duration;

/// Ask once every this many generations.
pub const ASK_EVERY_GENERATIONS: u64 = 2;
/// Longest wait for one reply.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Most proposals taken from one reply.
pub const MAX_PROPOSALS: usize = 4;
/// Largest reply body read.
const MAX_BODY_BYTES: u64 = 1 << 20;

/// Counters kept in the session state and shown by `session.show`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LlmStats {
    pub requests: u64,
    pub requests_failed: u64,
    pub valid: u64,
    pub invalid: u64,
    pub asked_at_generation: Option<u64>,
}

/// One thing parsed out of a reply.
#[derive(Debug, Clone, PartialEq)]
pub enum Proposal {
    /// A policy document (still to be validated against the schema and the machine).
    Policy(Value),
    /// Source of a `choose_tile_size` function, for the worker's `tabulate`.
    Function(String),
    /// Neither; the text says what was wrong.
    Invalid(String),
}

#[derive(Debug, thiserror::Error)]
pub enum LlmError {
    #[error("llm request failed: {0}")]
    Http(String),
    #[error("llm reply is not a chat completion: {0}")]
    Shape(String),
}

/// The chat messages for one request.
pub fn prompt(space: &SearchSpace, engine: &Engine) -> Vec<Value> {
    let mut members: Vec<_> = engine.islands.iter().flatten().collect();
    members.sort_by(|a, b| b.fitness.total_cmp(&a.fitness));
    members.dedup_by(|a, b| a.key == b.key);
    let best: Vec<Value> = members
        .iter()
        .take(5)
        .map(|m| json!({"speedup": (m.fitness * 1000.0).round() / 1000.0, "policy": m.policy.to_value()}))
        .collect();
    let shapes: Vec<Value> = space.shapes.iter().map(|s| json!({"name": s.name, "N": s.n, "K": s.k, "layers": s.count})).collect();
    let m_values: Vec<u64> = space.m_bands().iter().map(|b| b.0).collect();
    let system = format!(
        "You tune matrix-multiplication tiling for MLX on {backend}. A policy is JSON (schema tilewise.policy/1): \
         {{\"schema\":\"tilewise.policy/1\",\"target\":{target},\"matmul\":{{\"rules\":[{{\"m\":[lo,hi],\"n\":[lo,hi],\"k\":[lo,hi],\"plan\":PLAN}}],\"default\":PLAN}}}} \
         where the first matching rule wins, ranges are inclusive (hi null = unbounded), and PLAN is {{\"kind\":\"native\"}} or \
         {{\"kind\":\"split\",\"tile_m\":int|null,\"tile_n\":int|null,\"tile_k\":int|null}}. M = tokens in flight, N = output features, \
         K = input features. Answer with up to 3 policies, each in its own ```json block, or with a Python function \
         `def choose_tile_size(M, N, K, device_info)` returning (tile_M, tile_N, tile_K) (None = do not split) in a ```python block.",
        backend = space.target.backend,
        target = serde_json::to_string(&space.target).unwrap_or_default(),
    );
    let user = format!(
        "Model linear shapes: {}\nWorkload M values: {:?}\nBest policies so far with their measured speedup over stock (>1 is faster):\n{}\nPropose better policies.",
        serde_json::to_string(&shapes).unwrap_or_default(),
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
        other => vec![Proposal::Invalid(format!("JSON that is not a policy: {}", clip(&other.to_string())))],
    }
}

fn clip(s: &str) -> String {
    s.chars().take(120).collect()
}

/// Parses a reply's text into proposals (at most [`MAX_PROPOSALS`]). Pure, so it is tested directly.
pub fn parse_reply(text: &str) -> Vec<Proposal> {
    let mut out = Vec::new();
    let blocks = fenced_blocks(text);
    if blocks.is_empty() {
        match serde_json::from_str::<Value>(text.trim()) {
            Ok(v) => out.extend(policies_in(v)),
            Err(_) if text.contains("def choose_tile_size") => out.push(Proposal::Function(text.trim().to_string())),
            Err(e) => out.push(Proposal::Invalid(format!("neither JSON nor a choose_tile_size function: {e}"))),
        }
    }
    for (lang, body) in blocks {
        if body.contains("def choose_tile_size") {
            out.push(Proposal::Function(body));
        } else if lang.is_empty() || lang == "json" {
            match serde_json::from_str::<Value>(body.trim()) {
                Ok(v) => out.extend(policies_in(v)),
                Err(e) => out.push(Proposal::Invalid(format!("bad JSON block: {e}"))),
            }
        } else {
            out.push(Proposal::Invalid(format!("a {lang} block without choose_tile_size")));
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

/// Sends the messages and parses the first choice's content (waiting at most [`REQUEST_TIMEOUT`]).
pub async fn ask(cfg: &LlmConfig, messages: &[Value]) -> Result<Vec<Proposal>, LlmError> {
    ask_with_timeout(cfg, messages, REQUEST_TIMEOUT).await
}

/// [`ask`] with an explicit limit on the whole exchange.
pub async fn ask_with_timeout(cfg: &LlmConfig, messages: &[Value], timeout: Duration) -> Result<Vec<Proposal>, LlmError> {
    let url = completions_url(&cfg.endpoint);
    let key = cfg.api_key_env.as_ref().and_then(|k| std::env::var(k).ok());
    let body = json!({"model": cfg.model, "messages": messages, "temperature": 0.8, "max_tokens": 2048});
    let reply = tokio::task::spawn_blocking(move || -> Result<Value, LlmError> {
        let agent: ureq::Agent = ureq::Agent::config_builder().timeout_global(Some(timeout)).build().into();
        let mut req = agent.post(&url).header("Content-Type", "application/json");
        if let Some(k) = key {
            req = req.header("Authorization", &format!("Bearer {k}"));
        }
        let mut resp = req.send_json(&body).map_err(|e| LlmError::Http(e.to_string()))?;
        resp.body_mut()
            .with_config()
            .limit(MAX_BODY_BYTES)
            .read_json::<Value>()
            .map_err(|e| LlmError::Shape(e.to_string()))
    })
    .await
    .map_err(|e| LlmError::Http(format!("request task: {e}")))??;
    let content = reply
        .pointer("/choices/0/message/content")
        .and_then(Value::as_str)
        .ok_or_else(|| LlmError::Shape(format!("no choices[0].message.content in {}", clip(&reply.to_string()))))?;
    Ok(parse_reply(content))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_parse_into_policies_functions_and_rejects() {
        let p = r#"{"schema":"tilewise.policy/1","target":{"device":"d","model":"m","mlx":"x","backend":"cpu"},"matmul":{"rules":[],"default":{"kind":"native"}}}"#;
        assert!(matches!(&parse_reply(p)[..], [Proposal::Policy(_)]));
        let text = format!("Here you go:\n```json\n{p}\n```\nand\n```python\ndef choose_tile_size(M, N, K, device_info):\n    return None, 256, None\n```\n");
        let got = parse_reply(&text);
        assert!(matches!(&got[..], [Proposal::Policy(_), Proposal::Function(f)] if f.contains("return None, 256")), "{got:?}");
        assert!(matches!(&parse_reply("I cannot help with that.")[..], [Proposal::Invalid(_)]));
        assert!(matches!(&parse_reply("```json\n{not json\n```")[..], [Proposal::Invalid(_)]));
        assert!(matches!(&parse_reply(r#"{"policies": [{"matmul": {}}, 3]}"#)[..], [Proposal::Policy(_), Proposal::Invalid(_)]));
        assert_eq!(completions_url("http://h/v1/"), "http://h/v1/chat/completions");
    }
}
