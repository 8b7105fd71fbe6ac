//! The LLM mutator against a local fake OpenAI-compatible server on 127.0.0.1: valid replies (policy
//! JSON, a `choose_tile_size` function), invalid ones (prose, bad JSON, a non-completion body, an
//! HTTP error) and a slow one (cut at the timeout). Then a session with the mutator on: the policy
//! reply becomes a measured candidate, the function is tabulated by the worker (never run by the
//! daemon) into another, and the invalid parts are counted and dropped.

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tilewise::config::LlmConfig;
use tilewise::events::EventBus;
use tilewise::llm::{ask_with_timeout, Proposal};
use tilewise::session::{DeviceInfo, ManagerOptions, SessionManager, StartParams};
use tilewise::store::{Budget, SessionState, SharedStore, Store};
use tilewise::worker::WorkerConfig;

/// What the fake server answers, in order (the last one repeats).
#[derive(Clone)]
enum Reply {
    Content(String),
    Body(u16, String),
    Slow(Duration),
}

/// Serves canned replies on 127.0.0.1; records each request body.
fn fake_server(replies: Vec<Reply>) -> (String, Arc<Mutex<Vec<Value>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    std::thread::spawn(move || {
        let mut i = 0;
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut len = 0usize;
            let mut request_line = String::new();
            reader.read_line(&mut request_line).unwrap();
            loop {
                let mut h = String::new();
                if reader.read_line(&mut h).unwrap() == 0 || h == "\r\n" {
                    break;
                }
                if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap();
                }
            }
            let mut body = vec![0; len];
            reader.read_exact(&mut body).unwrap();
            log.lock().unwrap().push(serde_json::from_slice(&body).unwrap_or(Value::Null));
            assert!(request_line.starts_with("POST /v1/chat/completions"), "{request_line}");
            let reply = replies[i.min(replies.len() - 1)].clone();
            i += 1;
            let (status, text) = match reply {
                Reply::Content(c) => (200, json!({"id": "x", "object": "chat.completion", "choices": [{"index": 0, "message": {"role": "assistant", "content": c}}]}).to_string()),
                Reply::Body(s, b) => (s, b),
                Reply::Slow(d) => {
                    std::thread::sleep(d);
                    (200, json!({"choices": [{"message": {"content": "too late"}}]}).to_string())
                }
            };
            let _ = write!(stream, "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}", text.len());
        }
    });
    (url, seen)
}

fn cfg(url: &str) -> LlmConfig {
    LlmConfig { endpoint: url.to_string(), model: "fake-model".into(), api_key_env: None }
}

const POLICY: &str = r#"{"schema":"tilewise.policy/1","name":"llm-head","target":{"device":"*","model":"*","mlx":"*","backend":"*"},
 "matmul":{"rules":[{"n":[1024,1024],"plan":{"kind":"split","tile_m":null,"tile_n":256,"tile_k":null}}],"default":{"kind":"native"}}}"#;
const FUNCTION: &str = "def choose_tile_size(M, N, K, device_info):\n    if M <= 16:\n        return None\n    return (None, 64 if N >= 128 else None, None)\n";

fn valid_reply() -> String {
    format!("Two ideas.\n```json\n{POLICY}\n```\nAnd a rule as code:\n```python\n{FUNCTION}```\nAlso this, which is broken:\n```json\n{{\"matmul\": \n```\n")
}

#[tokio::test]
async fn replies_valid_invalid_and_slow() {
    let (url, seen) = fake_server(vec![
        Reply::Content(valid_reply()),
        Reply::Content("I'd rather not.".into()),
        Reply::Body(200, "not json at all".into()),
        Reply::Body(500, "{\"error\": \"overloaded\"}".into()),
        Reply::Slow(Duration::from_secs(5)),
    ]);
    let messages = vec![json!({"role": "user", "content": "propose"})];
    let got = ask_with_timeout(&cfg(&url), &messages, Duration::from_secs(3)).await.unwrap();
    assert!(matches!(&got[..], [Proposal::Policy(p), Proposal::Function(f), Proposal::Invalid(_)] if p["name"] == "llm-head" && f.contains("def choose_tile_size")), "{got:?}");
    assert_eq!(seen.lock().unwrap()[0]["model"], "fake-model");
    assert_eq!(seen.lock().unwrap()[0]["messages"], json!(messages));

    let got = ask_with_timeout(&cfg(&url), &messages, Duration::from_secs(3)).await.unwrap();
    assert!(matches!(&got[..], [Proposal::Invalid(_)]), "{got:?}");
    let e = ask_with_timeout(&cfg(&url), &messages, Duration::from_secs(3)).await.unwrap_err();
    assert!(e.to_string().contains("not a chat completion"), "{e}");
    let e = ask_with_timeout(&cfg(&url), &messages, Duration::from_secs(3)).await.unwrap_err();
    assert!(e.to_string().contains("500"), "{e}");
    let t = Instant::now();
    let e = ask_with_timeout(&cfg(&url), &messages, Duration::from_secs(1)).await.unwrap_err();
    assert!(t.elapsed() < Duration::from_secs(4), "a slow endpoint is cut at the timeout ({:?})", t.elapsed());
    assert!(e.to_string().to_lowercase().contains("timeout") || e.to_string().to_lowercase().contains("timed out"), "{e}");
}

fn python() -> PathBuf {
    std::env::var_os("TILEWISE_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_measures_what_the_llm_proposed() {
    let (url, seen) = fake_server(vec![Reply::Content(valid_reply())]);
    let home = tempfile::tempdir().unwrap();
    let store: SharedStore = Arc::new(Mutex::new(Store::open(&home.path().join("tilewise.db")).unwrap()));
    let mut worker = WorkerConfig::new(python());
    worker.env.push(("TILEWISE_HOME".into(), home.path().display().to_string()));
    let m = SessionManager::new(ManagerOptions {
        store: store.clone(),
        events: EventBus::new(store.clone()),
        worker,
        device: DeviceInfo { fingerprint: "dev-test".into(), chip: "test cpu".into() },
        llm: Some(cfg(&url)),
        gate: None,
        load_timeout: Duration::from_secs(300),
    });
    let params = StartParams {
        // Generation 0 (three fusion seeds, the seed heuristic) and the two LLM candidates come
        // first; each may need a confirmation.
        budget: Some(Budget { evaluations: Some(12), seconds: Some(900) }),
        seed: Some(4),
        pairs: Some(3),
        warmup: Some(0),
        screen: Some(false),
        llm: Some(true),
        ..Default::default()
    };
    let (sid, _) = m.start(params).await.unwrap();
    m.wait().await;
    let shown = m.show(sid).unwrap();
    let st = store.lock().unwrap();
    assert_eq!(st.session(sid).unwrap().unwrap().state, SessionState::Finished);
    assert!(!seen.lock().unwrap().is_empty(), "the endpoint was asked");
    let llm = &shown["search"]["llm"];
    assert_eq!(llm["requests"], 1, "{llm}");
    assert_eq!(llm["valid"], 2, "policy + tabulated function: {llm}");
    assert_eq!(llm["invalid"], 1, "the broken JSON block: {llm}");
    let from_llm: Vec<&Value> = shown["candidates"].as_array().unwrap().iter().filter(|c| c["origin"] == "llm").collect();
    assert_eq!(from_llm.len(), 2, "{}", shown["candidates"]);
    // The function came back as data: split rules tabulated over the model's shapes.
    assert!(from_llm.iter().any(|c| c["policy"]["name"] == "llm-head"));
    let tabulated = from_llm.iter().find(|c| c["policy"]["name"] != "llm-head").unwrap();
    let rules = tabulated["policy"]["matmul"]["rules"].as_array().unwrap();
    assert!(!rules.is_empty() && rules.iter().all(|r| r["plan"]["kind"] == "split"), "{}", tabulated["policy"]);
    assert!(from_llm.iter().all(|c| c["status"] == "measured"), "{from_llm:?}");
}
