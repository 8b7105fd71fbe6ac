//! The LLM mutator against a local fake OpenAI-compatible server on 127.0.0.1: valid replies (policy
//! JSON), refused ones (code, prose, bad JSON), failing ones (a non-completion body, an HTTP error)
//! and a slow one (cut at the timeout). Then sessions with the mutator on: the policy reply becomes a
//! measured candidate, code in a reply is refused with its reason and never runs (a planted
//! file-writing function writes nothing), and a stop returns within a second while a request to an
//! endpoint that never answers is out.

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tilewise::config::LlmConfig;
use tilewise::events::EventBus;
use tilewise::llm::{ask_with_timeout, Proposal};
use tilewise::session::{DeviceInfo, LlmSource, ManagerOptions, SessionManager, StartParams};
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
            let _ = write!(
                stream,
                "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
                text.len()
            );
        }
    });
    (url, seen)
}

fn cfg(url: &str) -> LlmConfig {
    LlmConfig { endpoint: url.to_string(), model: "fake-model".into(), api_key_env: None }
}

const POLICY: &str = r#"{"schema":"tilewise.policy/1","name":"llm-head","target":{"device":"*","model":"*","mlx":"*","backend":"*"},
 "matmul":{"rules":[{"n":[1024,1024],"plan":{"kind":"split","tile_m":null,"tile_n":256,"tile_k":null}}],"default":{"kind":"native"}}}"#;
/// A planted `choose_tile_size` that writes a marker file wherever it runs (it must run nowhere).
fn planted_function(marker: &std::path::Path) -> String {
    format!(
        "def choose_tile_size(M, N, K, device_info):\n    open({:?}, 'w').write('ran')\n    return (None, 64 if N >= 128 else None, None)\n",
        marker.display().to_string()
    )
}

fn mixed_reply(marker: &std::path::Path) -> String {
    format!(
        "Two ideas.\n```json\n{POLICY}\n```\nAnd a rule as code:\n```python\n{}```\nAlso this, which is broken:\n```json\n{{\"matmul\": \n```\n",
        planted_function(marker)
    )
}

#[tokio::test]
async fn replies_valid_invalid_and_slow() {
    let marker_dir = tempfile::tempdir().unwrap();
    let marker = marker_dir.path().join("PWNED");
    let (url, seen) = fake_server(vec![
        Reply::Content(mixed_reply(&marker)),
        Reply::Content("I'd rather not.".into()),
        Reply::Body(200, "not json at all".into()),
        Reply::Body(500, "{\"error\": \"overloaded\"}".into()),
        Reply::Slow(Duration::from_secs(5)),
    ]);
    let messages = vec![json!({"role": "user", "content": "propose"})];
    let got = ask_with_timeout(&cfg(&url), &messages, Duration::from_secs(3)).await.unwrap();
    assert!(
        matches!(&got[..], [Proposal::Policy(p), Proposal::Refused { reason: code, excerpt }, Proposal::Refused { reason: bad, .. }]
            if p["name"] == "llm-head" && code == "code proposals are not run" && excerpt.contains("def choose_tile_size") && bad == "bad JSON block"),
        "{got:?}"
    );
    assert_eq!(seen.lock().unwrap()[0]["model"], "fake-model");
    assert_eq!(seen.lock().unwrap()[0]["messages"], json!(messages));

    let got = ask_with_timeout(&cfg(&url), &messages, Duration::from_secs(3)).await.unwrap();
    assert!(matches!(&got[..], [Proposal::Refused { .. }]), "{got:?}");
    let e = ask_with_timeout(&cfg(&url), &messages, Duration::from_secs(3)).await.unwrap_err();
    assert!(e.to_string().contains("not a chat completion") && e.to_string().contains(&url), "{e}");
    // An HTTP error names the endpoint, the status and the body's first line.
    let e = ask_with_timeout(&cfg(&url), &messages, Duration::from_secs(3)).await.unwrap_err();
    assert_eq!(e.to_string(), format!("llm endpoint {url}/chat/completions: HTTP 500: {{\"error\": \"overloaded\"}}"));
    let t = Instant::now();
    let e = ask_with_timeout(&cfg(&url), &messages, Duration::from_secs(1)).await.unwrap_err();
    assert!(t.elapsed() < Duration::from_secs(4), "a slow endpoint is cut at the timeout ({:?})", t.elapsed());
    assert!(e.to_string().to_lowercase().contains("timeout") || e.to_string().to_lowercase().contains("timed out"), "{e}");
    assert!(!marker.exists(), "nothing an endpoint sends is run");
}

fn python() -> PathBuf {
    std::env::var_os("TILEWISE_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python"))
}

fn manager(home: &std::path::Path, llm: LlmSource) -> (SessionManager, SharedStore) {
    let store: SharedStore = Arc::new(Mutex::new(Store::open(&home.join("tilewise.db")).unwrap()));
    let mut worker = WorkerConfig::new(python());
    worker.env.push(("TILEWISE_HOME".into(), home.display().to_string()));
    let m = SessionManager::new(ManagerOptions {
        store: store.clone(),
        events: EventBus::new(store.clone()),
        worker,
        device: DeviceInfo { fingerprint: "dev-test".into(), chip: "test cpu".into() },
        llm,
        gate: None,
        load_timeout: Duration::from_secs(300),
        python_problem: None,
    });
    (m, store)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_measures_what_the_llm_proposed_and_runs_none_of_its_code() {
    let home = tempfile::tempdir().unwrap();
    let marker = home.path().join("PWNED");
    let (url, seen) = fake_server(vec![Reply::Content(mixed_reply(&marker))]);
    let (m, store) = manager(home.path(), LlmSource::Fixed(cfg(&url)));
    let params = StartParams {
        // Generation 0 (three fusion seeds, the seed heuristic, six children) runs while the reply
        // is on its way; the LLM's policy opens generation 1. Confirmations and incumbent
        // re-measurements count too.
        budget: Some(Budget { evaluations: Some(18), seconds: Some(900) }),
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
    let asked = seen.lock().unwrap().len();
    assert!(asked >= 1, "the endpoint was asked");
    let llm = &shown["search"]["llm"];
    assert_eq!(llm["requests"].as_u64().unwrap() as usize, asked, "{llm}");
    // Every reply holds the same policy: used once, then a repeat.
    assert_eq!(llm["valid"], 1, "{llm}");
    assert_eq!(llm["refused"]["code proposals are not run"].as_u64().unwrap() as usize, asked, "{llm}");
    assert_eq!(llm["refused"]["bad JSON block"].as_u64().unwrap() as usize, asked, "{llm}");
    if asked > 1 {
        assert_eq!(llm["refused"]["repeat of a candidate already seen"].as_u64().unwrap() as usize, asked - 1, "{llm}");
    }
    let examples = llm["examples"].as_array().unwrap();
    assert!(!examples.is_empty() && examples.len() <= 5, "{llm}");
    assert!(
        examples
            .iter()
            .any(|e| e["reason"] == "code proposals are not run" && e["detail"].as_str().unwrap().contains("def choose_tile_size")),
        "{llm}"
    );
    assert!(!marker.exists(), "a function in an LLM reply was run");
    let from_llm: Vec<&Value> = shown["candidates"].as_array().unwrap().iter().filter(|c| c["origin"] == "llm").collect();
    assert_eq!(from_llm.len(), 1, "{}", shown["candidates"]);
    assert_eq!(from_llm[0]["policy"]["name"], "llm-head");
    assert_eq!(from_llm[0]["status"], "measured", "{from_llm:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_does_not_wait_for_an_endpoint_that_never_answers() {
    let home = tempfile::tempdir().unwrap();
    let (url, seen) = fake_server(vec![Reply::Slow(Duration::from_secs(3600))]);
    let (m, store) = manager(home.path(), LlmSource::Fixed(cfg(&url)));
    let params = StartParams {
        budget: Some(Budget { evaluations: Some(200), seconds: None }),
        seed: Some(4),
        pairs: Some(3),
        warmup: Some(0),
        screen: Some(false),
        llm: Some(true),
        ..Default::default()
    };
    let (sid, _) = m.start(params).await.unwrap();
    // Wait until the request is out and the search has gone on measuring without it.
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let trials = store.lock().unwrap().session(sid).unwrap().unwrap().evaluations;
        if !seen.lock().unwrap().is_empty() && trials >= 2 {
            break;
        }
        assert!(Instant::now() < deadline, "no request, or the search waited for it");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let t = Instant::now();
    assert!(m.stop(Some(sid)).await);
    m.wait().await;
    let took = t.elapsed();
    // A measurement is cancelled at its next sample; the LLM request is simply dropped.
    assert!(took < Duration::from_secs(2), "stop took {took:?} with a request out");
    eprintln!("stopped in {took:?} with an LLM request out");
    let shown = m.show(sid).unwrap();
    assert_eq!(shown["search"]["llm"]["abandoned"], 1, "{}", shown["search"]["llm"]);
    assert_eq!(shown["search"]["llm"]["requests"], 1);
}

#[tokio::test]
async fn llm_true_without_an_endpoint_is_refused_with_the_fix() {
    let home = tempfile::tempdir().unwrap();
    let (m, _) = manager(home.path(), LlmSource::None);
    let e = m.start(StartParams { llm: Some(true), ..Default::default() }).await.unwrap_err();
    assert!(e.to_string().contains("set [llm] endpoint and model in config.toml"), "{e}");
}
