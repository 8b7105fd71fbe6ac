//! The real `tilewised` binary in a temp `TILEWISE_HOME`, spoken to over its real socket: every
//! promise of the socket server (README, Reliability), plus the error contract of docs/protocol.md.

mod common;

use common::*;
use serde_json::{json, Value};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::time::{Duration, Instant};
use tilewise::ipc::client::{Client, ClientError};
use tilewise::ipc::protocol::{codes, HistoryParams, PolicyGetParams, PolicySource, PROTOCOL_VERSION};
use tilewise::policy::Policy;
use tilewise::store::{BestKey, Promotion, Store};

fn code(reply: &Value) -> i64 {
    reply["error"]["code"].as_i64().unwrap_or_else(|| panic!("expected an error reply, got {reply}"))
}

/// A second, well-behaved client must keep getting answers (quickly) while another misbehaves.
async fn assert_answers(client: &mut Client) {
    let t = Instant::now();
    let s = client.status().await.expect("the well-behaved client got no answer");
    assert!(s.pid > 0);
    assert!(t.elapsed() < Duration::from_secs(2), "status took {:?}", t.elapsed());
}

#[tokio::test]
async fn hello_reports_daemon_and_protocol_versions() {
    let d = TestDaemon::start();
    let mut c = d.client().await;
    let h = c.hello().await.unwrap();
    assert_eq!(h.daemon, "tilewised");
    assert_eq!(h.version, env!("CARGO_PKG_VERSION"));
    assert_eq!(h.protocol, PROTOCOL_VERSION);
    assert_eq!(h.pid, d.pid());

    // A client of another protocol major is refused with -32005, and the connection stays usable.
    let err = c.call("hello", Some(json!({"client": "future/9", "protocol": PROTOCOL_VERSION + 1}))).await.unwrap_err();
    assert_eq!(err.rpc_code(), Some(codes::PROTOCOL_MISMATCH), "{err}");
    assert!(err.to_string().contains("protocol mismatch"), "{err}");

    let s = c.status().await.unwrap();
    assert_eq!(s.device_fingerprint, s.device.fingerprint());
    assert_eq!(s.socket, d.paths.socket);
    assert_eq!(s.db.schema_version, tilewise::store::SCHEMA_VERSION);
    assert_eq!(s.home.as_deref(), Some(d.home.path()));
    assert_eq!(s.tuning.state, "idle");
}

#[tokio::test]
async fn unknown_model_gets_native_with_a_reason() {
    let d = TestDaemon::start();
    let mut c = d.client().await;
    let r = c
        .policy_get(&PolicyGetParams {
            model: "no-such-model".into(),
            mlx: "0.32.4".into(),
            backend: None,
            device: None,
            model_name: None,
            dtype: None,
        })
        .await
        .unwrap();
    assert_eq!(r.source, PolicySource::Native);
    assert_eq!(r.hash, Policy::native().content_hash());
    assert_eq!(r.policy.to_value(), Policy::native().to_value());
    assert!(r.reason.contains("no policy has been proven") && r.reason.contains("no-such-model"), "{}", r.reason);
    assert!(r.evidence.is_none());
}

/// A split policy proven for `key` (a real, schema-valid document).
fn proven_policy(key: &BestKey) -> Value {
    json!({
        "schema": "tilewise.policy/1",
        "name": "test-split",
        "target": {"device": key.device, "model": key.model, "mlx": key.mlx, "backend": key.backend},
        "matmul": {
            "rules": [{"m": [257, null], "plan": {"kind": "split", "tile_m": 256, "tile_n": null, "tile_k": null}}],
            "default": {"kind": "native"}
        }
    })
}

#[tokio::test]
async fn a_stored_best_is_served_only_for_its_exact_key() {
    let d = TestDaemon::start();
    let mut c = d.client().await;
    let device = c.status().await.unwrap().device_fingerprint;
    let key = BestKey { device, model: "model-a".into(), mlx: "0.32.4".into(), backend: "cpu".into() };
    let doc = proven_policy(&key);
    let hash = Policy::from_value(&doc).unwrap().content_hash();
    {
        // Written through the store, on the same file, while the daemon runs (WAL).
        let store = Store::open(&d.paths.db_file).unwrap();
        store
            .promote(&Promotion {
                key: key.clone(),
                policy: doc.clone(),
                hash: hash.clone(),
                ratio: 1.12,
                lo: 1.05,
                hi: 1.2,
                session_id: None,
                candidate_id: None,
                summary: None,
            })
            .unwrap();
    }
    let get = |mlx: &str| PolicyGetParams {
        model: "model-a".into(),
        mlx: mlx.into(),
        backend: Some("cpu".into()),
        device: None,
        model_name: None,
        dtype: None,
    };
    let r = c.policy_get(&get("0.32.4")).await.unwrap();
    assert_eq!(r.source, PolicySource::Best, "{}", r.reason);
    assert_eq!((r.hash.as_str(), &r.policy.to_value()), (hash.as_str(), &doc));
    let ev = r.evidence.unwrap();
    assert_eq!((ev.ratio, ev.lo, ev.hi), (1.12, 1.05, 1.2));
    assert!(r.reason.contains("1.120x"), "{}", r.reason);

    // Another MLX version is another key: native.
    assert_eq!(c.policy_get(&get("0.33.0")).await.unwrap().source, PolicySource::Native);

    // history lists the promotion.
    let h = c.history(&HistoryParams::default()).await.unwrap();
    assert_eq!(h.promotions.len(), 1);
    assert_eq!(h.promotions[0].hash, hash);

    // A stored best that is not a valid policy is never served: native, with the reason.
    let bad_key = BestKey { model: "model-b".into(), ..key.clone() };
    let mut bad = proven_policy(&bad_key);
    bad["matmul"]["rules"][0]["m"] = json!([900, 10]);
    Store::open(&d.paths.db_file)
        .unwrap()
        .promote(&Promotion {
            key: bad_key,
            policy: bad,
            hash: "sha256:bogus".into(),
            ratio: 2.0,
            lo: 1.9,
            hi: 2.1,
            session_id: None,
            candidate_id: None,
            summary: None,
        })
        .unwrap();
    let r = c
        .policy_get(&PolicyGetParams {
            model: "model-b".into(),
            mlx: "0.32.4".into(),
            backend: Some("cpu".into()),
            device: None,
            model_name: None,
            dtype: None,
        })
        .await
        .unwrap();
    assert_eq!(r.source, PolicySource::Native);
    assert!(r.reason.contains("refused") && r.reason.contains("lo > hi"), "{}", r.reason);
}

/// `proven_policy(key)` with another tile size: another valid policy, with another hash.
fn other_policy(key: &BestKey, tile_m: u32) -> Value {
    let mut doc = proven_policy(key);
    doc["matmul"]["rules"][0]["plan"]["tile_m"] = json!(tile_m);
    doc
}

fn promotion(key: &BestKey, doc: &Value, ratio: f64) -> (Promotion, String) {
    let hash = Policy::from_value(doc).unwrap().content_hash();
    let p = Promotion {
        key: key.clone(),
        policy: doc.clone(),
        hash: hash.clone(),
        ratio,
        lo: ratio - 0.05,
        hi: ratio + 0.05,
        session_id: None,
        candidate_id: None,
        summary: None,
    };
    (p, hash)
}

/// The daemon caches `policy.get` answers; the cache must never serve a stale best. (b): writes
/// made by ANOTHER connection to the same database file while the real `tilewised` runs (what
/// tests, `seed_best` and a second store handle do) are seen by the very next `policy.get`.
#[tokio::test]
async fn policy_get_never_serves_a_stale_best_after_another_connection_writes() {
    let d = TestDaemon::start();
    let mut c = d.client().await;
    let device = c.status().await.unwrap().device_fingerprint;
    let key = BestKey { device, model: "model-c".into(), mlx: "0.32.4".into(), backend: "cpu".into() };
    let get = PolicyGetParams {
        model: key.model.clone(),
        mlx: key.mlx.clone(),
        backend: Some("cpu".into()),
        device: None,
        model_name: None,
        dtype: None,
    };
    // Asked twice first, so a cached native answer exists before the write.
    for _ in 0..2 {
        assert_eq!(c.policy_get(&get).await.unwrap().source, PolicySource::Native);
    }
    let other = Store::open(&d.paths.db_file).unwrap(); // stays open: a live second connection
    let mut served = Vec::new();
    // Many in a row: the daemon skips SQLite's change check while the WAL index header is
    // unchanged (store/wal_watch.rs), so every promotion here must still be seen at once.
    for (i, tile_m) in (0..25u32).map(|i| 64 + 8 * i).enumerate() {
        let (p, hash) = promotion(&key, &other_policy(&key, tile_m), 1.1 + i as f64 / 100.0);
        other.promote(&p).unwrap();
        for _ in 0..3 {
            let r = c.policy_get(&get).await.unwrap();
            assert_eq!((r.source, r.hash.as_str()), (PolicySource::Best, hash.as_str()), "after write {i}: {}", r.reason);
            assert_eq!(r.evidence.unwrap().ratio, p.ratio);
        }
        served.push(hash);
    }
    // A write to another key's row also leaves every answer right (it empties the whole cache).
    let key2 = BestKey { model: "model-d".into(), ..key.clone() };
    other.promote(&promotion(&key2, &proven_policy(&key2), 1.3).0).unwrap();
    assert_eq!(&c.policy_get(&get).await.unwrap().hash, served.last().unwrap());
    // And a row deleted behind the daemon's back goes back to native.
    drop(other);
    let raw = rusqlite::Connection::open(&d.paths.db_file).unwrap();
    raw.busy_timeout(Duration::from_secs(5)).unwrap();
    raw.execute("DELETE FROM best WHERE model = 'model-c'", []).unwrap();
    assert_eq!(c.policy_get(&get).await.unwrap().source, PolicySource::Native);
}

/// (a): a promotion written by the daemon itself, through its own store connection (what a tuning
/// session's promotion does), is served by the next `policy.get`. Its own commits do not move
/// SQLite's `data_version`, so this is the case the connection's change count must catch. The
/// library's daemon (what `tilewised` runs) on a real socket, in this process, so the test can
/// write through the daemon's own connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_get_never_serves_a_stale_best_after_the_daemon_itself_promotes() {
    use std::sync::Arc;
    use tilewise::ipc::server::{DaemonState, Server};
    let home = tempfile::tempdir().unwrap();
    let state = Arc::new(DaemonState::open(paths_for(home.path()), Default::default()).unwrap());
    let server = Server::bind(state.clone()).unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let served = tokio::spawn({
        let stop = stop.clone();
        async move { server.run(async move { stop.cancelled().await }).await }
    });
    let mut c = Client::connect_path(&state.paths.socket).await.unwrap();
    let key = BestKey { device: state.device_fingerprint.clone(), model: "model-e".into(), mlx: "0.32.4".into(), backend: "cpu".into() };
    let get = PolicyGetParams {
        model: key.model.clone(),
        mlx: key.mlx.clone(),
        backend: Some("cpu".into()),
        device: None,
        model_name: None,
        dtype: None,
    };
    for _ in 0..2 {
        assert_eq!(c.policy_get(&get).await.unwrap().source, PolicySource::Native);
    }
    for (i, tile_m) in [256u32, 128, 64].into_iter().enumerate() {
        let (p, hash) = promotion(&key, &other_policy(&key, tile_m), 1.1 + i as f64 / 10.0);
        state.store.lock().unwrap().promote(&p).unwrap(); // the daemon's own connection
        c.hello().await.unwrap(); // and an event appended through it (a write that is not a promotion)
        for _ in 0..3 {
            let r = c.policy_get(&get).await.unwrap();
            assert_eq!((r.source, r.hash.as_str()), (PolicySource::Best, hash.as_str()), "after promotion {i}: {}", r.reason);
        }
        // The in-process seam (fuzz target, benchmark) gives the same answer, byte for byte the
        // encoding of the uncached lookup.
        let line = tilewise::ipc::server::handle_request_line(
            &state,
            r#"{"jsonrpc":"2.0","id":"x","method":"policy.get","params":{"model":"model-e","mlx":"0.32.4","backend":"cpu"}}"#,
        )
        .await
        .unwrap();
        let direct = serde_json::to_value(state.policy_get(&get).unwrap()).unwrap();
        assert_eq!(line, serde_json::to_string(&tilewise::ipc::protocol::Response::ok(json!("x"), direct)).unwrap());
    }
    stop.cancel();
    served.await.unwrap();
}

#[tokio::test]
async fn malformed_json_gets_a_parse_error_and_the_connection_stays_open() {
    let d = TestDaemon::start();
    let mut good = d.client().await;
    good.hello().await.unwrap();
    let mut bad = d.raw();
    let reply = bad.call("{this is not json");
    assert_eq!(code(&reply), codes::PARSE_ERROR);
    assert_eq!(reply["id"], Value::Null);
    assert_answers(&mut good).await;
    // Same connection still works.
    let reply = bad.call(r#"{"jsonrpc":"2.0","id":7,"method":"hello","params":{"client":"raw","protocol":1}}"#);
    assert_eq!((reply["id"].clone(), reply["result"]["daemon"].clone()), (json!(7), json!("tilewised")));
}

#[tokio::test]
async fn a_line_over_64_kib_gets_frame_too_large_and_is_closed() {
    let d = TestDaemon::start();
    let mut good = d.client().await;
    let mut bad = d.raw();
    // 70 000 bytes and no newline: the daemon must not wait for the end of the line.
    let _ = bad.send(&vec![b'x'; 70_000]);
    let reply = bad.read_json().expect("an error reply before the close");
    assert_eq!(code(&reply), codes::INVALID_REQUEST);
    assert!(reply["error"]["message"].as_str().unwrap().contains("frame too large"), "{reply}");
    assert!(bad.read_json().is_none(), "the connection should be closed");
    assert_answers(&mut good).await;

    // A line of exactly 64 KiB is still accepted (it is JSON padded with spaces).
    let mut ok = d.raw();
    let req = r#"{"jsonrpc":"2.0","id":1,"method":"status"}"#;
    let padded = format!("{req}{}", " ".repeat(64 * 1024 - req.len()));
    let reply = ok.call(&padded);
    assert!(reply.get("result").is_some(), "{reply}");
}

#[tokio::test]
async fn a_half_written_frame_then_disconnect_harms_no_one() {
    let d = TestDaemon::start();
    let mut good = d.client().await;
    for _ in 0..5 {
        let mut bad = d.raw();
        bad.send(br#"{"jsonrpc":"2.0","id":1,"method":"sta"#).unwrap();
        drop(bad);
    }
    // A client that half-writes and then stays silent holds only its own task.
    let mut silent = d.raw();
    silent.send(br#"{"jsonrpc":"2.0","id":1,"#).unwrap();
    assert_answers(&mut good).await;
    let mut fresh = d.client().await;
    fresh.hello().await.unwrap();
    drop(silent);
    assert_answers(&mut good).await;
}

#[tokio::test]
async fn a_one_byte_at_a_time_writer_does_not_delay_others() {
    let d = TestDaemon::start();
    let mut good = d.client().await;
    let socket = d.paths.socket.clone();
    let slow = std::thread::spawn(move || {
        let mut raw = Raw::connect(&socket);
        let req = b"{\"jsonrpc\":\"2.0\",\"id\":5,\"method\":\"status\"}\n";
        for b in req {
            raw.send(&[*b]).unwrap();
            std::thread::sleep(Duration::from_millis(20));
        }
        (Instant::now(), raw.read_json().unwrap())
    });
    let t = Instant::now();
    for _ in 0..20 {
        assert_answers(&mut good).await;
    }
    let others_done = Instant::now();
    let (slow_sent, slow_reply) = slow.join().unwrap();
    assert!(others_done < slow_sent, "20 calls of another client finished only after the slow writer ({:?})", t.elapsed());
    assert_eq!(slow_reply["id"], json!(5));
    assert!(slow_reply.get("result").is_some());
}

#[tokio::test]
async fn error_codes_follow_the_protocol() {
    let d = TestDaemon::start();
    let mut raw = d.raw();
    assert_eq!(code(&raw.call(r#"{"jsonrpc":"2.0","id":1}"#)), codes::INVALID_REQUEST);
    assert_eq!(code(&raw.call(r#"[1,2]"#)), codes::INVALID_REQUEST);
    assert_eq!(code(&raw.call(r#"{"jsonrpc":"1.0","id":1,"method":"status"}"#)), codes::INVALID_REQUEST);
    assert_eq!(code(&raw.call(r#"{"jsonrpc":"2.0","id":1,"method":"no.such"}"#)), codes::METHOD_NOT_FOUND);
    assert_eq!(code(&raw.call(r#"{"jsonrpc":"2.0","id":1,"method":"policy.get","params":{"model":5}}"#)), codes::INVALID_PARAMS);
    // The sharing methods refuse what they were not asked (-32602 naming the problem, the request's
    // id kept) and never read a file a relative path would name in the daemon's directory.
    let bad = [
        ("policy.export", r#"{"session_id":1}"#, "unknown field"),
        ("policy.import", r#"{"path":"bundle.json"}"#, "path: must be absolute"),
        ("policy.import", r#"{"path":"/nonexistent/tilewise-bundle.json"}"#, "/nonexistent/tilewise-bundle.json"),
        ("imports.list", r#"{"state":"served"}"#, "state"),
    ];
    for (m, params, says) in bad {
        let reply = raw.call(&format!(r#"{{"jsonrpc":"2.0","id":"{m}","method":"{m}","params":{params}}}"#));
        assert_eq!(code(&reply), codes::INVALID_PARAMS, "{m} {params}: {reply}");
        assert!(reply["error"]["message"].as_str().unwrap().contains(says), "{m} {params}: {reply}");
        assert_eq!(reply["id"], json!(m));
    }
    // A notification (no id) gets no reply: the next line read answers the next request.
    raw.send(b"{\"jsonrpc\":\"2.0\",\"method\":\"status\"}\n").unwrap();
    let reply = raw.call(r#"{"jsonrpc":"2.0","id":99,"method":"config.get"}"#);
    assert_eq!(reply["id"], json!(99));
    assert_eq!(reply["result"]["worker"]["max_restarts"], json!(tilewise::config::Config::default().worker.max_restarts));
}

#[tokio::test]
async fn socket_is_0600_in_a_0700_directory() {
    let d = TestDaemon::start();
    let meta = std::fs::symlink_metadata(&d.paths.socket).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let dir = std::fs::metadata(&d.paths.run_dir).unwrap();
    assert_eq!(dir.permissions().mode() & 0o777, 0o700);
    assert_eq!(d.paths.socket.parent().unwrap(), d.paths.run_dir);
    assert!(d.paths.socket.starts_with(d.home.path()));
}

#[tokio::test]
async fn a_second_daemon_refuses_with_a_clear_message() {
    let mut d = TestDaemon::start();
    let (mut second, err_file) = spawn_daemon(d.home.path());
    let status = wait_exit(&mut second, Duration::from_secs(20)).expect("the second daemon should exit");
    assert!(!status.success());
    let stderr = std::fs::read_to_string(err_file).unwrap();
    assert!(stderr.contains("already running"), "{stderr}");
    assert_eq!(stderr.matches("already running").count(), 1, "said once: {stderr}");
    assert!(!stderr.contains('\x1b'), "no colour codes into a file: {stderr:?}");
    assert!(stderr.contains(&format!("pid {}", d.pid())), "{stderr}");
    assert!(stderr.contains(&d.paths.lock_file.display().to_string()), "{stderr}");
    // The first one is unharmed.
    assert!(d.is_running());
    d.client().await.hello().await.unwrap();
}

#[tokio::test]
async fn sigterm_shuts_down_cleanly() {
    let mut d = TestDaemon::start();
    d.client().await.hello().await.unwrap();
    let status = d.terminate();
    assert!(status.success(), "{status}: {}", d.stderr());
    assert!(std::fs::symlink_metadata(&d.paths.socket).is_err(), "socket file left after SIGTERM");
    // The lock is free: a new daemon starts in the same home and sees the old events.
    let home = std::mem::replace(&mut d.home, tempfile::tempdir().unwrap());
    let d2 = TestDaemon::start_in(home);
    let store = Store::open(&d2.paths.db_file).unwrap();
    let kinds: Vec<String> = store.events_since(0, None, 100).unwrap().into_iter().map(|e| e.kind).collect();
    assert!(kinds.starts_with(&["daemon.started".to_string()]), "{kinds:?}");
    assert!(kinds.contains(&"daemon.stopping".to_string()), "{kinds:?}");
}

#[tokio::test]
async fn daemon_shutdown_request_stops_it() {
    let mut d = TestDaemon::start();
    assert!(d.client().await.shutdown().await.unwrap().stopping);
    let status = wait_exit(&mut d.child, Duration::from_secs(20)).expect("exit after daemon.shutdown");
    assert!(status.success());
    assert!(std::fs::symlink_metadata(&d.paths.socket).is_err());
}

#[tokio::test]
async fn a_stale_socket_is_cleaned_up_at_start_but_a_live_one_is_not_touched() {
    let home = tempfile::tempdir().unwrap();
    let paths = paths_for(home.path());
    paths.ensure_dirs().unwrap();
    {
        // What a crashed daemon leaves: a socket file nobody listens on.
        let _l = std::os::unix::net::UnixListener::bind(&paths.socket).unwrap();
    }
    assert!(paths.socket.exists());
    let d = TestDaemon::start_in(home);
    d.client().await.hello().await.unwrap();
    drop(d);

    // A socket someone is listening on (lock free) is not removed: the daemon refuses to start.
    let home = tempfile::tempdir().unwrap();
    let paths = paths_for(home.path());
    paths.ensure_dirs().unwrap();
    let _live = std::os::unix::net::UnixListener::bind(&paths.socket).unwrap();
    let (mut child, err_file) = spawn_daemon(home.path());
    let status = wait_exit(&mut child, Duration::from_secs(20)).expect("exit");
    assert!(!status.success());
    let stderr = std::fs::read_to_string(err_file).unwrap();
    assert!(stderr.contains("already serving"), "{stderr}");
    assert!(paths.socket.exists());
}

#[tokio::test]
async fn events_are_streamed_to_subscribers_and_filtered_by_kind() {
    let d = TestDaemon::start();
    let all = d.client().await.subscribe_events(None).await.unwrap();
    let only_hello = d.client().await.subscribe_events(Some(vec!["client.hello".into()])).await.unwrap();
    let mut other = d.client().await.with_name("events-test/1");
    other.hello().await.unwrap();
    let (mut all, mut only_hello) = (all, only_hello);
    let ev = tokio::time::timeout(Duration::from_secs(5), all.recv()).await.unwrap().unwrap();
    assert_eq!((ev.kind.as_str(), ev.data["client"].as_str()), ("client.hello", Some("events-test/1")));
    let ev = tokio::time::timeout(Duration::from_secs(5), only_hello.recv()).await.unwrap().unwrap();
    assert_eq!(ev.kind, "client.hello");
    // Events are persisted too.
    let stored = Store::open(&d.paths.db_file).unwrap().events_since(0, None, 100).unwrap();
    assert!(stored.iter().any(|e| e.id == ev.id && e.kind == "client.hello"));
}

#[tokio::test]
async fn client_reports_a_daemon_that_is_not_running() {
    let home = tempfile::tempdir().unwrap();
    let err = Client::connect(&paths_for(home.path())).await.unwrap_err();
    assert!(matches!(err, ClientError::DaemonNotRunning { .. }), "{err:?}");
    assert!(err.to_string().contains("tilewise daemon start"), "{err}");
}

#[test]
fn other_users_are_refused_by_the_peer_uid_check() {
    // Needs root to connect as another uid; the run dir is opened up for this test only so the
    // connection reaches the daemon's own UID check (the 0700 dir normally stops it first).
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root to act as another user");
        return;
    }
    let d = TestDaemon::start();
    std::fs::set_permissions(d.home.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&d.paths.run_dir, std::fs::Permissions::from_mode(0o711)).unwrap();
    std::fs::set_permissions(&d.paths.socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let script = r#"
import socket, sys
s = socket.socket(socket.AF_UNIX); s.settimeout(10); s.connect(sys.argv[1])
try:
    s.sendall(b'{"jsonrpc":"2.0","id":1,"method":"status"}\n')
    print("answer" if s.recv(100) else "closed")
except (ConnectionResetError, BrokenPipeError):
    print("closed")
"#;
    use std::os::unix::process::CommandExt;
    let out =
        std::process::Command::new("python3").args(["-c", script]).arg(&d.paths.socket).uid(65534).gid(65534).output().expect("python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(stdout.trim(), "closed", "another user got an answer: {stdout}");
    assert!(d.stderr().contains("refused a connection from another user"), "{}", d.stderr());
    // This user still gets answers.
    let mut raw = d.raw();
    assert!(raw.call(r#"{"jsonrpc":"2.0","id":1,"method":"status"}"#).get("result").is_some());
}

#[test]
fn cli_works_against_the_real_daemon() {
    let home = tempfile::tempdir().unwrap();
    let cli = |args: &[&str]| {
        std::process::Command::new(TILEWISE).args(args).env("TILEWISE_HOME", home.path()).env_remove("TILEWISE_SOCKET").output().unwrap()
    };
    // Without a daemon: a readable error that says how to start it, exit code 3.
    let out = cli(&["status"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("tilewise daemon start"));
    // probe works without the daemon.
    let out = cli(&["probe", "--json"]);
    assert!(out.status.success());
    let probe: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(probe["fingerprint"].as_str().unwrap().len() > 8);
    let out = cli(&["probe"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.matches(probe["fingerprint"].as_str().unwrap()).count(), 1, "the fingerprint once: {text}");
    // Stopping a daemon that is not running is already done: exit 0, says so.
    let out = cli(&["daemon", "stop", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(serde_json::from_slice::<Value>(&out.stdout).unwrap()["outcome"], "not_running");

    let out = cli(&["daemon", "start", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let started: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(started["outcome"], "started", "{started}");
    let out = cli(&["daemon", "start", "--json"]);
    let again: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((again["outcome"].as_str(), &again["pid"]), (Some("already_running"), &started["pid"]), "{again}");
    let out = cli(&["status", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let status: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["device_fingerprint"], probe["fingerprint"]);
    let out = cli(&["policy", "get", "--model", "mdl-0123456789abcdef0123456789abcdef", "--mlx", "0.32.4", "--json"]);
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["source"], json!("native"));
    let out = cli(&["history", "--json"]);
    assert_eq!(serde_json::from_slice::<Value>(&out.stdout).unwrap(), json!({"promotions": []}));
    let out = cli(&["daemon", "stop", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stopped: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((stopped["outcome"].as_str(), &stopped["pid"]), (Some("stopped"), &started["pid"]), "{stopped}");
    assert!(std::fs::symlink_metadata(home.path().join("run/tilewised.sock")).is_err());
}

#[tokio::test]
async fn config_set_persists_valid_changes_and_refuses_bad_ones() {
    let d = TestDaemon::start();
    let mut raw = d.raw();
    let file = d.home.path().join("config.toml");
    let ok = raw.call(r#"{"jsonrpc":"2.0","id":1,"method":"config.set","params":{"key":"idle.enabled","value":false}}"#);
    assert_eq!(ok["result"]["idle"]["enabled"], json!(false), "{ok}");
    let got = raw.call(r#"{"jsonrpc":"2.0","id":2,"method":"config.get"}"#);
    assert_eq!(got["result"]["idle"]["enabled"], json!(false), "{got}");
    let on_disk = std::fs::read_to_string(&file).unwrap();
    assert!(!tilewise::config::Config::load(&file).unwrap().idle.enabled, "{on_disk}");
    // An unknown key and an out-of-range value are refused; file and running config unchanged.
    for bad in [
        r#"{"key":"idle.no_such_key","value":1}"#,
        r#"{"key":"worker.request_timeout_s","value":0}"#,
        r#"{"key":"idle.enabled.x","value":1}"#,
    ] {
        let reply = raw.call(&format!(r#"{{"jsonrpc":"2.0","id":3,"method":"config.set","params":{bad}}}"#));
        assert_eq!(code(&reply), codes::INVALID_PARAMS, "{bad}: {reply}");
        assert_eq!(std::fs::read_to_string(&file).unwrap(), on_disk, "{bad} changed the file");
    }
    let got = raw.call(r#"{"jsonrpc":"2.0","id":4,"method":"config.get"}"#);
    assert_eq!(got["result"]["idle"]["enabled"], json!(false));
}

/// The store's one use-driven growth is bounded: `client.hello` events older than 30 days are
/// removed by the running daemon (at start, then daily); recent ones and other kinds stay.
#[tokio::test]
async fn the_daemon_prunes_client_hello_events_older_than_30_days() {
    let home = tempfile::tempdir().unwrap();
    let paths = paths_for(home.path());
    paths.ensure_dirs().unwrap();
    let (old_hello, old_other, recent_hello) = {
        let store = Store::open(&paths.db_file).unwrap();
        let e = |kind: &str| store.append_event(kind, None, &json!({})).unwrap().id;
        let ids = (e("client.hello"), e("session.started"), e("client.hello"));
        let raw = rusqlite::Connection::open(&paths.db_file).unwrap();
        let forty_days_ago =
            humantime::format_rfc3339_millis(std::time::SystemTime::now() - Duration::from_secs(40 * 24 * 3600)).to_string();
        for id in [ids.0, ids.1] {
            raw.execute("UPDATE events SET at = ?1 WHERE id = ?2", rusqlite::params![forty_days_ago, id]).unwrap();
        }
        ids
    };
    let d = TestDaemon::start_in(home);
    let ids = || -> Vec<i64> { Store::open(&d.paths.db_file).unwrap().events_since(0, None, 1000).unwrap().iter().map(|e| e.id).collect() };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while ids().contains(&old_hello) {
        assert!(std::time::Instant::now() < deadline, "the 40-day-old hello was not pruned: {:?}", ids());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let left = ids();
    assert!(left.contains(&old_other) && left.contains(&recent_hello), "pruned too much: {left:?}");
}

/// The daemon's log rotates daily (a resident process must not grow one file for ever): it writes
/// `tilewised.<YYYY-MM-DD>.log` under the logs dir.
#[tokio::test]
async fn the_daemon_logs_to_a_dated_file() {
    let d = TestDaemon::start();
    let dated = |name: &str| {
        name.strip_prefix("tilewised.").and_then(|r| r.strip_suffix(".log")).is_some_and(|date| {
            date.len() == 10 && date.chars().enumerate().all(|(i, c)| if i == 4 || i == 7 { c == '-' } else { c.is_ascii_digit() })
        })
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let files: Vec<std::path::PathBuf> =
            std::fs::read_dir(&d.paths.logs_dir).map(|r| r.flatten().map(|e| e.path()).collect()).unwrap_or_default();
        let serving = files.iter().any(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(dated)
                && std::fs::read_to_string(p).is_ok_and(|t| t.contains("tilewised serving"))
        });
        if serving {
            break;
        }
        assert!(Instant::now() < deadline, "no tilewised.<date>.log with the serving line; logs dir has {files:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A proven fusion policy is described in words wherever it is shown: `policy.get`'s evidence and
/// reason, `history`, and the CLI's `policy get` and `history`.
#[tokio::test]
async fn a_fusion_policys_summary_is_served_and_printed() {
    let d = TestDaemon::start();
    let mut c = d.client().await;
    let device = c.status().await.unwrap().device_fingerprint;
    let key = BestKey { device, model: "model-f".into(), mlx: "0.32.4".into(), backend: "cpu".into() };
    let doc = json!({
        "schema": "tilewise.policy/1", "name": "fuse-siblings",
        "target": {"device": key.device, "model": key.model, "mlx": key.mlx, "backend": key.backend},
        "matmul": {"rules": [], "default": {"kind": "native"}},
        "fusion": {"groups": [{"scope": "model.layers.*.self_attn", "members": ["q_proj", "k_proj", "v_proj"]},
                              {"scope": "model.layers.*.mlp", "members": ["gate_proj", "up_proj"]}]}
    });
    let summary: tilewise::store::PolicySummary = serde_json::from_value(json!({
        "text": "q/k/v fused, gate/up fused: 169 → 97 matmuls per token", "fused": ["q/k/v", "gate/up"],
        "matmuls_per_token": [169, 97], "rules": 0,
        "workloads": {"decode": {"ratio": 1.28, "lo": 1.22, "hi": 1.31}, "training": {"ratio": 1.1, "lo": 1.05, "hi": 1.15}}
    }))
    .unwrap();
    let hash = Policy::from_value(&doc).unwrap().content_hash();
    Store::open(&d.paths.db_file)
        .unwrap()
        .promote(&Promotion {
            key: key.clone(),
            policy: doc,
            hash: hash.clone(),
            ratio: 1.22,
            lo: 1.18,
            hi: 1.25,
            session_id: None,
            candidate_id: None,
            summary: Some(summary.clone()),
        })
        .unwrap();
    let r = c
        .policy_get(&PolicyGetParams {
            model: "model-f".into(),
            mlx: "0.32.4".into(),
            backend: Some("cpu".into()),
            device: None,
            model_name: None,
            dtype: None,
        })
        .await
        .unwrap();
    assert_eq!(r.hash, hash);
    assert_eq!(r.evidence.as_ref().unwrap().summary.as_ref(), Some(&summary));
    assert!(r.reason.ends_with(": q/k/v fused, gate/up fused: 169 → 97 matmuls per token"), "{}", r.reason);
    let h = c.history(&HistoryParams::default()).await.unwrap();
    assert_eq!(h.promotions[0].summary.as_ref(), Some(&summary));

    let cli = |args: &[&str]| {
        let out = std::process::Command::new(TILEWISE)
            .args(args)
            .env("TILEWISE_HOME", d.home.path())
            .env_remove("TILEWISE_SOCKET")
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let text = cli(&["policy", "get", "--model", "model-f", "--mlx", "0.32.4", "--backend", "cpu"]);
    assert!(text.contains("what: q/k/v fused, gate/up fused: 169 → 97 matmuls per token\n"), "{text}");
    assert!(text.contains("measured: decode +28.0 % [22.0, 31.0], training +10.0 % [5.0, 15.0]\n"), "{text}");
    let text = cli(&["history"]);
    assert!(text.contains("    q/k/v fused, gate/up fused: 169 → 97 matmuls per token; decode +28.0 % [22.0, 31.0]"), "{text}");
}

/// Every string a client sends has a length limit and every enum is checked: -32602 naming the
/// field, never an answer that echoes the input back.
#[tokio::test]
async fn oversized_and_out_of_range_params_are_refused_naming_the_field() {
    let d = TestDaemon::start();
    let mut raw = d.raw();
    let long = "m".repeat(60_000);
    let cases = [
        (json!({"model": long, "mlx": "0.32.4"}), "policy.get", "model: at most 4096 characters (got 60000)"),
        (json!({"model": "m", "mlx": "0.32.4", "backend": "tpu"}), "policy.get", "backend: one of metal, cuda, cpu (got \"tpu\")"),
        (json!({"model": "", "mlx": "0.32.4"}), "policy.get", "model: must not be empty"),
        (json!({"model": "m", "mlx": "x".repeat(65)}), "policy.get", "mlx: at most 64 characters (got 65)"),
        (json!({"model": "m", "mlx": "0.32.4", "device": "d".repeat(129)}), "policy.get", "device: at most 128 characters (got 129)"),
        (json!({"client": "c".repeat(201), "protocol": 1}), "hello", "client: at most 200 characters (got 201)"),
        (json!({"limit": 0}), "history", "limit: 1..=10000 (got 0)"),
        (json!({"kinds": ["k".repeat(65)]}), "events.list", "kinds[0]: at most 64 characters (got 65)"),
        (json!({"key": "k".repeat(129), "value": 1}), "config.set", "key: at most 128 characters (got 129)"),
    ];
    for (params, method, message) in cases {
        let line = json!({"jsonrpc": "2.0", "id": 7, "method": method, "params": params}).to_string();
        let reply = raw.call(&line);
        assert_eq!(code(&reply), codes::INVALID_PARAMS, "{method}: {reply}");
        assert_eq!(reply["error"]["message"], json!(format!("invalid params: {message}")), "{method}");
        assert!(reply.to_string().len() < 1000, "the reply does not echo the input: {}", reply.to_string().len());
    }
    assert_answers(&mut d.client().await).await;
}
