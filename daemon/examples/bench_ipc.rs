//! Benchmark (not a test): `policy.get` round-trip latency against a raw local-socket echo, measured
//! side by side in one run. Goal: `policy.get` p50 at most 1.5x the raw echo's.
//!
//!     cargo run --release --example bench_ipc [-- --iters 10000]
//!
//! Three processes, all on tokio's multi-thread runtime: this one (the client), a daemon serving
//! the real protocol (the library's `DaemonState` + `Server`, exactly what `tilewised` runs) in a
//! temp `TILEWISE_HOME` with a proven best stored for the key asked, and a raw echo server that
//! answers each line with a canned line of the same length as the `policy.get` reply (so both
//! sides move the same bytes; the difference is the protocol: JSON-RPC parse, dispatch, SQLite
//! lookup, serialization, typed decode in the client). Echo and policy.get alternate in blocks so
//! drift in machine load hits both alike.
//!
//! The daemon caches `policy.get` answers until the `best` table changes (see `PolicyCache` in
//! ipc/server.rs), so repeated asks take the cached path, as every MLX start after the first does.
//! A third block times `policy.get` after `hello` + `status`, the Python plugin's sequence at
//! every MLX start; hello's event append is a write the cache must see past. Another block sends
//! the request line and only reads the reply line, as the echo client does: the daemon's share.
//! The in-process breakdown also shows the per-request store check and what a cache miss (after a
//! promotion) costs.

use futures_util::{SinkExt, StreamExt};
use interprocess::local_socket::tokio::{prelude::*, Stream};
use interprocess::local_socket::{GenericFilePath, ListenerOptions};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tilewise::ipc::client::Client;
use tilewise::ipc::protocol::{PolicyGetParams, PolicySource, Request};
use tilewise::ipc::server::{DaemonState, Server};
use tilewise::paths::Paths;
use tilewise::policy::Policy;
use tilewise::store::{BestKey, Promotion, Store};
use tokio_util::codec::{Framed, LinesCodec};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    match args.get(1).map(String::as_str) {
        Some("--serve-echo") => rt.block_on(serve_echo(PathBuf::from(&args[2]), args[3].parse().unwrap())),
        Some("--serve-daemon") => rt.block_on(serve_daemon(PathBuf::from(&args[2]))),
        _ => {
            let iters =
                args.iter().position(|a| a == "--iters").and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(10_000);
            rt.block_on(orchestrate(iters))
        }
    }
}

/// Raw echo: for every line read, write `reply_len` bytes + `\n`.
async fn serve_echo(socket: PathBuf, reply_len: usize) {
    let name = socket.as_path().to_fs_name::<GenericFilePath>().unwrap();
    let listener = ListenerOptions::new().name(name).create_tokio().unwrap();
    let reply = "x".repeat(reply_len);
    loop {
        let stream = listener.accept().await.unwrap();
        let reply = reply.clone();
        tokio::spawn(async move {
            let mut framed = Framed::new(stream, LinesCodec::new_with_max_length(64 * 1024));
            while let Some(Ok(_line)) = framed.next().await {
                if framed.send(reply.as_str()).await.is_err() {
                    break;
                }
            }
        });
    }
}

/// The daemon exactly as `tilewised` builds it, for the home `home`.
async fn serve_daemon(home: PathBuf) {
    let state = DaemonState::open(Paths::under_home(home), Default::default()).unwrap();
    Server::bind(Arc::new(state)).unwrap().run(std::future::pending()).await;
}

/// A server child process, killed when dropped (also when the benchmark panics).
struct ChildGuard(Child);
impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_self(args: &[&str]) -> ChildGuard {
    ChildGuard(Command::new(std::env::current_exe().unwrap()).args(args).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap())
}

async fn wait_for(socket: &Path) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Client::connect_path(socket).await.is_err() {
        assert!(Instant::now() < deadline, "{} never came up", socket.display());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `n` round trips of `line` on `framed`, each reply checked for its length; kept in µs when `keep`.
async fn line_round_trips(framed: &mut Framed<Stream, LinesCodec>, line: &str, reply_len: usize, n: usize, keep: bool, out: &mut Vec<f64>) {
    for _ in 0..n {
        let t = Instant::now();
        framed.send(line).await.unwrap();
        let reply = framed.next().await.unwrap().unwrap();
        let dt = t.elapsed();
        assert_eq!(reply.len(), reply_len);
        if keep {
            out.push(dt.as_secs_f64() * 1e6);
        }
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

async fn orchestrate(iters: usize) {
    let home = tempfile::tempdir().unwrap();
    let paths = Paths::under_home(home.path());
    paths.ensure_dirs().unwrap();

    // A proven best for the key the benchmark asks for, so policy.get takes the real serving path.
    let device = tilewise::probe::detect().fingerprint();
    let key = BestKey { device: device.clone(), model: "bench-model".into(), mlx: "0.32.4".into(), backend: "cpu".into() };
    let doc = json!({
        "schema": "tilewise.policy/1", "name": "bench",
        "target": {"device": key.device, "model": key.model, "mlx": key.mlx, "backend": key.backend},
        "matmul": {"rules": [{"m": [257, null], "plan": {"kind": "split", "tile_m": 256, "tile_n": null, "tile_k": null}}],
                   "default": {"kind": "native"}}
    });
    let hash = Policy::from_value(&doc).unwrap().content_hash();
    Store::open(&paths.db_file)
        .unwrap()
        .promote(&Promotion {
            key: key.clone(),
            policy: doc,
            hash,
            ratio: 1.1,
            lo: 1.05,
            hi: 1.15,
            session_id: None,
            candidate_id: None,
            summary: None,
        })
        .unwrap();

    let daemon = spawn_self(&["--serve-daemon", home.path().to_str().unwrap()]);
    wait_for(&paths.socket).await;
    let params = PolicyGetParams {
        model: key.model.clone(),
        mlx: key.mlx.clone(),
        backend: Some("cpu".into()),
        device: None,
        model_name: None,
        dtype: None,
    };
    let mut client = Client::connect_path(&paths.socket).await.unwrap();
    client.hello().await.unwrap();
    let first = client.policy_get(&params).await.unwrap();
    assert_eq!(first.source, PolicySource::Best, "{}", first.reason);

    // Same byte counts for the echo: the request line and the reply line of policy.get.
    let request_line = serde_json::to_string(&Request::new(1_000_000, "policy.get", Some(serde_json::to_value(&params).unwrap()))).unwrap();
    let reply_len = serde_json::to_string(&json!({"jsonrpc": "2.0", "id": 1_000_000, "result": first})).unwrap().len();
    let echo_socket = paths.run_dir.join("echo.sock");
    let echo = spawn_self(&["--serve-echo", echo_socket.to_str().unwrap(), &reply_len.to_string()]);
    wait_for(&echo_socket).await;
    let stream = Stream::connect(echo_socket.as_path().to_fs_name::<GenericFilePath>().unwrap()).await.unwrap();
    let mut raw = Framed::new(stream, LinesCodec::new_with_max_length(1 << 20));

    // A second connection to the daemon that sends the same request line and only reads the reply
    // line, as the echo client does: the daemon's share of the difference, without the client's.
    let daemon_stream = Stream::connect(paths.socket.as_path().to_fs_name::<GenericFilePath>().unwrap()).await.unwrap();
    let mut daemon_raw = Framed::new(daemon_stream, LinesCodec::new_with_max_length(1 << 20));
    let (mut t_echo, mut t_rpc, mut t_rpc_hello) = (Vec::with_capacity(iters), Vec::with_capacity(iters), Vec::with_capacity(iters));
    let mut t_rpc_line = Vec::with_capacity(iters);
    let warmup = iters / 10;
    let block = 500;
    let mut done = 0;
    while done < iters + warmup {
        let n = block.min(iters + warmup - done);
        line_round_trips(&mut raw, &request_line, reply_len, n, done >= warmup, &mut t_echo).await;
        for _ in 0..n {
            let t = Instant::now();
            let r = client.policy_get(&params).await.unwrap();
            let dt = t.elapsed();
            assert_eq!(r.source, PolicySource::Best);
            if done >= warmup {
                t_rpc.push(dt.as_secs_f64() * 1e6);
            }
        }
        line_round_trips(&mut daemon_raw, &request_line, reply_len, n, done >= warmup, &mut t_rpc_line).await;
        // As the Python plugin does at every MLX start (evaluator/tilewise/plugin.py): `hello`
        // (which appends an event to the store: a write by the daemon's own connection), `status`,
        // then `policy.get`, timed alone.
        for _ in 0..n {
            client.hello().await.unwrap();
            client.status().await.unwrap();
            let t = Instant::now();
            let r = client.policy_get(&params).await.unwrap();
            let dt = t.elapsed();
            assert_eq!(r.source, PolicySource::Best);
            if done >= warmup {
                t_rpc_hello.push(dt.as_secs_f64() * 1e6);
            }
        }
        done += n;
    }
    drop((daemon, echo));

    // Where the difference goes, in-process and without a socket: the daemon's decode + dispatch +
    // lookup + encode of one request line, and the client's decode of one reply line.
    let home2 = tempfile::tempdir().unwrap();
    let paths2 = Paths::under_home(home2.path());
    paths2.ensure_dirs().unwrap();
    Store::open(&paths2.db_file)
        .unwrap()
        .promote(&Promotion {
            key: key.clone(),
            policy: first.policy.to_value(),
            hash: first.hash.clone(),
            ratio: 1.1,
            lo: 1.05,
            hi: 1.15,
            session_id: None,
            candidate_id: None,
            summary: None,
        })
        .unwrap();
    let state = Arc::new(DaemonState::open(paths2, Default::default()).unwrap());
    let mut reply_line = String::new();
    let t = Instant::now();
    for _ in 0..iters {
        reply_line = tilewise::ipc::server::handle_request_line(&state, &request_line).await.unwrap();
    }
    let server_us = t.elapsed().as_secs_f64() * 1e6 / iters as f64;
    // The same after the plugin's `hello` + `status` (hello's event append is a write by the
    // daemon's own connection: the first reads after it cost more, and the stamp re-reads the
    // newest promotion id).
    let hello_line = r#"{"jsonrpc":"2.0","id":1,"method":"hello","params":{"client":"bench","protocol":1}}"#;
    let status_line = r#"{"jsonrpc":"2.0","id":2,"method":"status"}"#;
    let mut after_hello = Vec::with_capacity(iters);
    for _ in 0..iters {
        tilewise::ipc::server::handle_request_line(&state, hello_line).await.unwrap();
        tilewise::ipc::server::handle_request_line(&state, status_line).await.unwrap();
        let t = Instant::now();
        let line = tilewise::ipc::server::handle_request_line(&state, &request_line).await.unwrap();
        after_hello.push(t.elapsed().as_secs_f64() * 1e6);
        assert_eq!(line, reply_line);
    }
    let server_hello_us = after_hello.iter().sum::<f64>() / iters as f64;
    let t = Instant::now();
    for _ in 0..iters {
        // The client's real decode of its reply (what `Client::policy_get` runs per line).
        let typed: tilewise::ipc::protocol::PolicyGetResult =
            tilewise::ipc::client::decode_reply(&reply_line, 1_000_000, "policy.get").unwrap().unwrap();
        assert_eq!(typed.source, PolicySource::Best);
    }
    let client_us = t.elapsed().as_secs_f64() * 1e6 / iters as f64;
    // Parts of the daemon's handling: the store check every request pays (is the cache still
    // valid?), and what a cache miss costs (the uncached lookup + validation + encoding).
    let store2 = Store::open(&state.paths.db_file).unwrap();
    let asked_before = store2.data_version_queries();
    let t = Instant::now();
    for _ in 0..iters {
        std::hint::black_box(store2.best_stamp().unwrap());
    }
    let stamp_us = t.elapsed().as_secs_f64() * 1e6 / iters as f64;
    // How many of those checks had to ask SQLite (a read transaction); the rest read the WAL index.
    let stamp_asked = store2.data_version_queries() - asked_before;
    let t = Instant::now();
    for _ in 0..iters {
        let r = state.policy_get(&params).unwrap();
        std::hint::black_box(serde_json::to_string(&serde_json::to_value(&r).unwrap()).unwrap());
    }
    let miss_us = t.elapsed().as_secs_f64() * 1e6 / iters as f64;

    t_echo.sort_by(f64::total_cmp);
    t_rpc.sort_by(f64::total_cmp);
    t_rpc_hello.sort_by(f64::total_cmp);
    t_rpc_line.sort_by(f64::total_cmp);
    let (e50, e99) = (percentile(&t_echo, 0.5), percentile(&t_echo, 0.99));
    let (r50, r99) = (percentile(&t_rpc, 0.5), percentile(&t_rpc, 0.99));
    let (h50, h99) = (percentile(&t_rpc_hello, 0.5), percentile(&t_rpc_hello, 0.99));
    let (l50, l99) = (percentile(&t_rpc_line, 0.5), percentile(&t_rpc_line, 0.99));
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string()))
        .unwrap_or_else(|| std::env::consts::ARCH.to_string());
    println!("# tilewise bench_ipc — {}", tilewise::store::now());
    println!(
        "# machine: {} ({} cpus), {} {}",
        cpu,
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        std::env::consts::OS,
        std::env::consts::ARCH
    );
    println!("# {} round trips each after {} warm-up, alternating blocks of {} (echo, policy.get, policy.get line only, hello + status + timed policy.get); separate processes, tokio multi-thread runtimes", t_rpc.len(), warmup, block);
    println!("# request {} bytes, reply {} bytes (echo moves the same bytes)", request_line.len() + 1, reply_len + 1);
    println!("{:<28} {:>10} {:>10}", "round trip (µs)", "p50", "p99");
    println!("{:<28} {:>10.1} {:>10.1}", "raw local-socket echo", e50, e99);
    println!("{:<28} {:>10.1} {:>10.1}", "policy.get (best, typed)", r50, r99);
    println!("{:<28} {:>10.2} {:>10.2}", "ratio policy.get / echo", r50 / e50, r99 / e99);
    println!("{:<28} {:>10.1} {:>10.1}", "  reply line only (no decode)", l50, l99);
    println!("{:<28} {:>10.2} {:>10.2}", "  ratio that / echo", l50 / e50, l99 / e99);
    println!("{:<28} {:>10.1} {:>10.1}", "after hello+status (plugin)", h50, h99);
    println!("{:<28} {:>10.2} {:>10.2}", "ratio that / echo", h50 / e50, h99 / e99);
    println!("{:<28} {:>10.1}", "  of which daemon handling", server_us);
    println!("{:<28} {:>10.1}   (asked SQLite {} of {} times)", "    store change check", stamp_us, stamp_asked, iters);
    println!("{:<28} {:>10.1}", "    (after hello + status)", server_hello_us);
    println!("{:<28} {:>10.1}", "  of which client decoding", client_us);
    println!("{:<28} {:>10.1}", "(a cache miss would add)", miss_us);
    println!(
        "goal: p50 ratio <= 1.50 -> {} (after hello+status, as the plugin: {})",
        if r50 / e50 <= 1.5 { "met" } else { "NOT met" },
        if h50 / e50 <= 1.5 { "met" } else { "NOT met" }
    );
}
