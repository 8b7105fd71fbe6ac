//! Fuzz target: bytes as a client would send them on the socket → the daemon's own line framing
//! (the same `LinesCodec` with the same 64 KiB bound as `serve_connection`) → its decode and
//! dispatch (`ipc::server::handle_request_line`) on a real `DaemonState` (real SQLite store in a temp
//! `TILEWISE_HOME`).
//!
//! Beyond "does not crash", every reply is checked against the contract (docs/protocol.md): one
//! JSON object, `jsonrpc: "2.0"`, exactly one of `result`/`error`, an error code from the
//! documented set, and the request's own id echoed back. A violation panics, which libFuzzer
//! reports as a crash with the input that caused it.

#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use std::sync::{Arc, OnceLock};
use tilewise::config::Config;
use tilewise::ipc::protocol::{codes, MAX_REQUEST_LINE};
use tilewise::ipc::server::{handle_request_line, DaemonState};
use tilewise::paths::Paths;
use tokio_util::codec::{Decoder, LinesCodec};

struct Harness {
    rt: tokio::runtime::Runtime,
    state: Arc<DaemonState>,
    _home: tempfile::TempDir,
}

fn harness() -> &'static Harness {
    static H: OnceLock<Harness> = OnceLock::new();
    H.get_or_init(|| {
        let home = tempfile::Builder::new().prefix("tilewise-fuzz-").tempdir().expect("temp home");
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        // DaemonState::open spawns nothing, but the event bus may expect a runtime context.
        let state = rt.block_on(async { DaemonState::open(Paths::under_home(home.path()), Config::default()) }).expect("daemon state");
        Harness { rt, state: Arc::new(state), _home: home }
    })
}

const KNOWN_CODES: &[i64] = &[
    codes::PARSE_ERROR,
    codes::INVALID_REQUEST,
    codes::METHOD_NOT_FOUND,
    codes::INVALID_PARAMS,
    codes::INTERNAL,
    codes::BUSY,
    codes::NOT_FOUND,
    codes::INVALID_POLICY,
    codes::NOT_AVAILABLE,
    codes::PROTOCOL_MISMATCH,
];

/// The contract's checks on one reply to one request line.
fn check(request: &str, reply: Option<String>) {
    let req: Option<Value> = serde_json::from_str(request).ok();
    let req_id = req.as_ref().and_then(|r| r.get("id")).filter(|id| !id.is_null()).cloned();
    let Some(reply) = reply else {
        // No reply is only right for a notification: a well-formed request object without an id.
        let is_request_object = req.as_ref().map(|r| r.is_object() && r.get("method").map(Value::is_string) == Some(true)).unwrap_or(false);
        assert!(is_request_object && req_id.is_none(), "no reply to a line that is not a notification: {request:?}");
        return;
    };
    assert!(!reply.contains('\n'), "reply spans lines: {reply:?}");
    let v: Value = serde_json::from_str(&reply).unwrap_or_else(|e| panic!("reply is not JSON ({e}): {reply:?}"));
    assert_eq!(v.get("jsonrpc"), Some(&Value::from("2.0")), "reply lacks jsonrpc 2.0: {reply}");
    match (v.get("result"), v.get("error")) {
        (Some(_), None) => {}
        (None, Some(e)) => {
            let code = e.get("code").and_then(Value::as_i64).unwrap_or_else(|| panic!("error without integer code: {reply}"));
            assert!(KNOWN_CODES.contains(&code), "undocumented error code {code}: {reply}");
            assert!(e.get("message").map(Value::is_string) == Some(true), "error without message: {reply}");
        }
        _ => panic!("reply has not exactly one of result/error: {reply}"),
    }
    if let Some(id) = req_id {
        if v.get("result").is_some() || req.as_ref().map(Value::is_object) == Some(true) {
            // Once the line parsed as an object with an id, that id is echoed (even on errors).
            assert_eq!(v.get("id"), Some(&id), "reply id differs from the request's: {request:?} → {reply}");
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let h = harness();
    let mut codec = LinesCodec::new_with_max_length(MAX_REQUEST_LINE);
    let mut buf = BytesMut::from(data);
    loop {
        match codec.decode(&mut buf) {
            Ok(Some(line)) => {
                if line.trim().is_empty() {
                    continue; // the server skips blank lines
                }
                let reply = h.rt.block_on(handle_request_line(&h.state, &line));
                check(&line, reply);
            }
            // A partial frame waits for more bytes; an oversized or non-UTF-8 line ends the
            // connection (the server answers it and closes): either way this input is done.
            Ok(None) | Err(_) => break,
        }
    }
});
