//! Live protocol fuzzing against a running daemon, and what a well-behaved client sees meanwhile.
//!
//! Two parts:
//! - [`conformance`]: each kind of bad frame once, deterministically, with the reply the contract
//!   (docs/protocol.md, "Framing") prescribes checked exactly.
//! - [`run`]: fuzz threads send random, mutated, wrongly-shaped, truncated, oversized and invalid
//!   UTF-8 frames, slow clients dribble valid requests one byte at a time, and one client writes
//!   requests without ever reading; meanwhile one good client times `policy.get`. The fuzz is
//!   switched on and off in alternating windows so that the unloaded and fuzzed figures come from
//!   the same minutes of this (shared, 2-core) machine.
//!
//! The fuzzers are rate-limited: on two cores, an unthrottled flood measures CPU contention, not
//! whether bad clients can delay good ones (head-of-line blocking, unbounded buffering, a stuck
//! task). The rate is printed with the figure.

use crate::client::{codes, error_code, unknown_model_params, Client, Wire, MAX_REQUEST_LINE};
use crate::harness::Daemon;
use crate::report::Row;
use crate::stats::{latency, micros};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Methods a fuzzer may call with random params: none of them changes the daemon's state
/// (no shutdown, no tuning, no config writes, no imports), so the fuzz cannot "succeed" at
/// stopping the daemon through a legitimate request.
const SAFE_METHODS: &[&str] =
    &["hello", "status", "policy.get", "history", "session.list", "session.show", "config.get", "events.subscribe", "policy.export"];

#[derive(Debug, Clone)]
pub struct LiveFuzzConfig {
    /// Pairs of (quiet window, fuzzed window).
    pub phases: usize,
    pub window: Duration,
    pub fuzz_threads: usize,
    /// Frames per second per fuzz thread.
    pub rate: f64,
    pub slow_clients: usize,
    pub seed: u64,
    /// Whether the p99 goal decides pass/fail. Off in the quick (CI) form: timing goals belong to
    /// the full run on a quiet machine, not to a shared 2-core CI box.
    pub gate_latency: bool,
}

// ---------------------------------------------------------------- conformance

fn expect_code(check: &str, c: &mut Client, want: &[i64]) -> Result<(), String> {
    match c.read_line() {
        Ok(Wire::Line(l)) => {
            let v: Value = serde_json::from_str(&l).map_err(|e| format!("{check}: reply not JSON ({e}): {l:.200}"))?;
            let code = v.get("error").map(error_code).unwrap_or(0);
            if want.contains(&code) {
                Ok(())
            } else {
                Err(format!("{check}: expected error {want:?}, got {l:.200}"))
            }
        }
        Ok(other) => Err(format!("{check}: expected error {want:?}, got {other:?}")),
        Err(e) => Err(format!("{check}: {e:#}")),
    }
}

fn still_serves(check: &str, c: &mut Client) -> Result<(), String> {
    match c.call("policy.get", unknown_model_params("conformance")) {
        Ok(Ok(_)) => Ok(()),
        other => Err(format!("{check}: the same connection no longer serves policy.get: {other:?}")),
    }
}

/// Each bad frame once, with the contract's answer checked. Returns (cases, failures).
pub fn conformance(socket: &Path) -> (usize, Vec<String>) {
    let t = Duration::from_secs(10);
    let mut fails = Vec::new();
    let mut cases = 0;
    let mut case = |name: &str, f: &mut dyn FnMut() -> Result<(), String>| {
        cases += 1;
        if let Err(e) = f() {
            fails.push(format!("{name}: {e}"));
        }
    };
    let conn = || Client::connect(socket, t).map_err(|e| format!("{e:#}"));

    case("malformed JSON → -32700, connection stays open", &mut || {
        let mut c = conn()?;
        c.send_raw(b"{\"jsonrpc\": \"2.0\", \"id\": 1, \"method\": \n").map_err(|e| e.to_string())?;
        expect_code("malformed", &mut c, &[codes::PARSE_ERROR])?;
        still_serves("malformed", &mut c)
    });
    case("invalid UTF-8 → error reply (the connection may close), others unaffected", &mut || {
        let mut c = conn()?;
        c.send_raw(b"\xff\xfe{\"id\":1}\xc3\x28\n").map_err(|e| e.to_string())?;
        expect_code("utf8", &mut c, &[codes::PARSE_ERROR, codes::INVALID_REQUEST])?;
        still_serves("utf8", &mut conn()?)
    });
    case("wrong shapes (array, number, jsonrpc 1.0, method not a string) → -32600/-32700", &mut || {
        let mut c = conn()?;
        for frame in ["[]", "42", "null", r#"{"jsonrpc":"1.0","id":1,"method":"hello"}"#, r#"{"jsonrpc":"2.0","id":1,"method":7}"#] {
            c.send_raw(format!("{frame}\n").as_bytes()).map_err(|e| e.to_string())?;
            expect_code(frame, &mut c, &[codes::INVALID_REQUEST, codes::PARSE_ERROR])?;
        }
        still_serves("shapes", &mut c)
    });
    case("unknown method → -32601", &mut || {
        let mut c = conn()?;
        c.send_raw(b"{\"jsonrpc\":\"2.0\",\"id\":5,\"method\":\"rm -rf /\"}\n").map_err(|e| e.to_string())?;
        expect_code("unknown", &mut c, &[codes::METHOD_NOT_FOUND])
    });
    case("bad params → -32602", &mut || {
        let mut c = conn()?;
        for params in [json!({"mlx": 5}), json!("x"), json!({"model": ["a"], "mlx": "0.32.4"})] {
            let line = json!({"jsonrpc":"2.0","id":9,"method":"policy.get","params":params}).to_string();
            c.send_raw(format!("{line}\n").as_bytes()).map_err(|e| e.to_string())?;
            expect_code("params", &mut c, &[codes::INVALID_PARAMS])?;
        }
        Ok(())
    });
    case("deep nesting (30,000 levels) → error reply, no crash", &mut || {
        let mut c = conn()?;
        let deep = format!("{}{}\n", "[".repeat(30_000), "]".repeat(30_000));
        c.send_raw(deep.as_bytes()).map_err(|e| e.to_string())?;
        expect_code("deep", &mut c, &[codes::PARSE_ERROR, codes::INVALID_REQUEST])?;
        still_serves("deep", &mut c)
    });
    case("frame over 64 KiB → -32600 and connection closed", &mut || {
        let mut c = conn()?;
        let mut big = vec![b'a'; MAX_REQUEST_LINE + 1];
        big.push(b'\n');
        // The daemon may close before reading all of it: a write error is acceptable here.
        let _ = c.send_raw(&big);
        expect_code("oversize", &mut c, &[codes::INVALID_REQUEST])?;
        match c.read_line() {
            Ok(Wire::Closed) => Ok(()),
            other => Err(format!("oversize: connection not closed after the error: {other:?}")),
        }
    });
    case("endless line without newline (8 MiB) → error and close, not buffered", &mut || {
        let mut c = conn()?;
        let chunk = vec![b'{'; 1 << 20];
        for _ in 0..8 {
            if c.send_raw(&chunk).is_err() {
                break; // closed by the daemon: what we want
            }
        }
        match c.read_line() {
            Ok(Wire::Line(l)) if l.contains(&codes::INVALID_REQUEST.to_string()) => Ok(()),
            Ok(Wire::Closed) => Ok(()),
            other => Err(format!("endless: {other:?}")),
        }
    });
    case("notification (no id) → no reply", &mut || {
        let mut c = conn()?;
        c.send_raw(b"{\"jsonrpc\":\"2.0\",\"method\":\"status\"}\n").map_err(|e| e.to_string())?;
        // The next line must be the reply to the next request, not to the notification.
        still_serves("notification", &mut c)
    });
    case("half frame then hang-up → others unaffected", &mut || {
        let c = conn()?;
        let mut c2 = conn()?;
        let mut c = c;
        c.send_raw(b"{\"jsonrpc\":\"2.0\",\"id\":1,\"meth").map_err(|e| e.to_string())?;
        c.shutdown_write();
        drop(c);
        still_serves("half frame", &mut c2)
    });
    case("pipelined requests → replies in order, ids matched", &mut || {
        let mut c = conn()?;
        let mut batch = String::new();
        for id in 1..=100 {
            batch.push_str(&json!({"jsonrpc":"2.0","id":id,"method":"policy.get","params":unknown_model_params("pipe")}).to_string());
            batch.push('\n');
        }
        c.send_raw(batch.as_bytes()).map_err(|e| e.to_string())?;
        for id in 1..=100 {
            match c.read_line() {
                Ok(Wire::Line(l)) => {
                    let v: Value = serde_json::from_str(&l).map_err(|e| e.to_string())?;
                    if v.get("id") != Some(&json!(id)) || v.get("result").is_none() {
                        return Err(format!("pipelined reply {id}: {l:.200}"));
                    }
                }
                other => return Err(format!("pipelined reply {id}: {other:?}")),
            }
        }
        Ok(())
    });
    (cases, fails)
}

// ---------------------------------------------------------------- generators

fn valid_request(rng: &mut StdRng) -> String {
    let method = SAFE_METHODS[rng.random_range(0..SAFE_METHODS.len())];
    let params = match method {
        "hello" => json!({"client": "fuzz", "protocol": rng.random_range(0..3)}),
        "policy.get" => unknown_model_params("fuzz"),
        "history" => json!({"limit": rng.random_range(0..1000)}),
        "session.show" => json!({"session_id": rng.random_range(-5..5)}),
        _ => json!({}),
    };
    json!({"jsonrpc": "2.0", "id": rng.random::<u32>(), "method": method, "params": params}).to_string()
}

fn random_value(rng: &mut StdRng, depth: u32) -> Value {
    match rng.random_range(0..if depth > 3 { 5 } else { 8 }) {
        0 => Value::Null,
        1 => json!(rng.random::<bool>()),
        2 => json!(rng.random::<i64>()),
        3 => json!(rng.random::<f64>() * 1e300),
        4 => json!((0..rng.random_range(0..40)).map(|_| rng.random::<char>()).collect::<String>()),
        5 => Value::Array((0..rng.random_range(0..5)).map(|_| random_value(rng, depth + 1)).collect()),
        _ => {
            let keys = ["jsonrpc", "id", "method", "params", "model", "mlx", "backend", "device", "limit", "x"];
            Value::Object(
                (0..rng.random_range(0..6))
                    .map(|_| (keys[rng.random_range(0..keys.len())].to_string(), random_value(rng, depth + 1)))
                    .collect(),
            )
        }
    }
}

/// One fuzz frame (bytes to write, usually ending in `\n`), and its kind for the counters.
fn frame(rng: &mut StdRng) -> (Vec<u8>, usize) {
    let kind = rng.random_range(0..100);
    let bytes = match kind {
        // random bytes, newline-terminated
        0..=19 => {
            let n = rng.random_range(0..2048);
            let mut b: Vec<u8> = (0..n).map(|_| rng.random()).collect();
            b.push(b'\n');
            b
        }
        // a valid request with bytes flipped, deleted or inserted
        20..=49 => {
            let mut b = valid_request(rng).into_bytes();
            for _ in 0..rng.random_range(1..6) {
                let i = rng.random_range(0..b.len());
                match rng.random_range(0..3) {
                    0 => b[i] = rng.random(),
                    1 => {
                        b.remove(i);
                    }
                    _ => b.insert(i, rng.random()),
                }
                if b.is_empty() {
                    break;
                }
            }
            b.retain(|&c| c != b'\n');
            b.push(b'\n');
            b
        }
        // well-formed JSON of random shape, sometimes under a real method name
        50..=69 => {
            let mut v = random_value(rng, 0);
            if rng.random_bool(0.5) {
                v = json!({"jsonrpc": "2.0", "id": random_value(rng, 3),
                           "method": SAFE_METHODS[rng.random_range(0..SAFE_METHODS.len())], "params": v});
            }
            format!("{v}\n").into_bytes()
        }
        // a valid request truncated (no newline: the rest never comes on this connection)
        70..=79 => {
            let b = valid_request(rng).into_bytes();
            b[..rng.random_range(0..b.len())].to_vec()
        }
        // invalid UTF-8 inside JSON strings
        80..=89 => {
            let mut b = br#"{"jsonrpc":"2.0","id":1,"method":"policy.get","params":{"model":""#.to_vec();
            b.extend((0..rng.random_range(1..64)).map(|_| 0x80 | rng.random::<u8>()));
            b.extend(br#"","mlx":"0.32.4"}}"#);
            b.push(b'\n');
            b
        }
        // valid requests (the fuzz stream must not be only errors)
        90..=97 => format!("{}\n", valid_request(rng)).into_bytes(),
        // oversized: over the 64 KiB limit
        _ => {
            let n = rng.random_range(MAX_REQUEST_LINE + 1..4 * MAX_REQUEST_LINE);
            let mut b = vec![b' '; n];
            b[0] = b'{';
            b.push(b'\n');
            b
        }
    };
    (bytes, kind)
}

// ---------------------------------------------------------------- the run

#[derive(Default)]
struct Counters {
    frames: AtomicU64,
    connections: AtomicU64,
    slow_requests: AtomicU64,
    slow_errors: AtomicU64,
}

fn fuzz_thread(socket: PathBuf, seed: u64, rate: f64, active: Arc<AtomicBool>, stop: Arc<AtomicBool>, n: Arc<Counters>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut conn: Option<Client> = None;
    let period = Duration::from_secs_f64(1.0 / rate);
    let mut next = Instant::now();
    while !stop.load(Relaxed) {
        if !active.load(Relaxed) {
            conn = None; // hang up during quiet windows: nothing of the fuzz lingers
            std::thread::sleep(Duration::from_millis(2));
            next = Instant::now();
            continue;
        }
        if conn.is_none() || rng.random_bool(0.02) {
            conn = Client::connect(&socket, Duration::from_millis(1)).ok();
            n.connections.fetch_add(1, Relaxed);
        }
        let Some(c) = conn.as_mut() else { continue };
        let (bytes, kind) = frame(&mut rng);
        let ok = c.send_raw(&bytes).is_ok();
        n.frames.fetch_add(1, Relaxed);
        // A truncated frame poisons the rest of this connection's stream: hang up after it.
        let closed = c.drain();
        if !ok || closed || (70..=79).contains(&kind) {
            conn = None;
        }
        next += period;
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        } else {
            next = now;
        }
    }
}

/// A client that sends a valid request one byte at a time, 2–10 ms apart, and checks the answer.
fn slow_thread(socket: PathBuf, seed: u64, active: Arc<AtomicBool>, stop: Arc<AtomicBool>, n: Arc<Counters>) {
    let mut rng = StdRng::seed_from_u64(seed);
    while !stop.load(Relaxed) {
        if !active.load(Relaxed) {
            std::thread::sleep(Duration::from_millis(5));
            continue;
        }
        let Ok(mut c) = Client::connect(&socket, Duration::from_secs(10)) else {
            n.slow_errors.fetch_add(1, Relaxed);
            std::thread::sleep(Duration::from_millis(50));
            continue;
        };
        n.connections.fetch_add(1, Relaxed);
        let line = json!({"jsonrpc":"2.0","id":77,"method":"policy.get","params":unknown_model_params("slow")}).to_string() + "\n";
        let mut sent_all = true;
        for b in line.as_bytes() {
            if stop.load(Relaxed) || !active.load(Relaxed) {
                sent_all = false;
                break;
            }
            if c.send_raw(&[*b]).is_err() {
                n.slow_errors.fetch_add(1, Relaxed);
                sent_all = false;
                break;
            }
            std::thread::sleep(Duration::from_millis(rng.random_range(2..10)));
        }
        if sent_all {
            n.slow_requests.fetch_add(1, Relaxed);
            match c.read_line() {
                Ok(Wire::Line(l)) if l.contains("\"id\":77") && l.contains("\"result\"") => {}
                _ => {
                    n.slow_errors.fetch_add(1, Relaxed);
                }
            }
        }
    }
}

/// A client that pipelines requests and never reads a reply: the daemon must apply backpressure to
/// it alone.
fn non_reader_thread(socket: PathBuf, active: Arc<AtomicBool>, stop: Arc<AtomicBool>, n: Arc<Counters>) {
    let line = json!({"jsonrpc":"2.0","id":1,"method":"status"}).to_string() + "\n";
    while !stop.load(Relaxed) {
        if !active.load(Relaxed) {
            std::thread::sleep(Duration::from_millis(5));
            continue;
        }
        let Ok(mut c) = Client::connect(&socket, Duration::from_millis(200)) else { continue };
        n.connections.fetch_add(1, Relaxed);
        while active.load(Relaxed) && !stop.load(Relaxed) {
            if c.send_raw(line.as_bytes()).is_err() {
                // Blocked (the daemon stopped reading us: backpressure) or closed; wait, don't spin.
                std::thread::sleep(Duration::from_millis(20));
            } else {
                n.frames.fetch_add(1, Relaxed);
            }
        }
    }
}

pub struct LiveFigures {
    pub unloaded_p99: f64,
    pub fuzzed_p99: f64,
    pub unloaded: crate::stats::Latency,
    pub fuzzed: crate::stats::Latency,
    pub good_errors: u64,
    pub frames: u64,
    pub connections: u64,
    pub slow_requests: u64,
    pub slow_errors: u64,
    pub fuzz_seconds: f64,
}

pub fn run(socket: &Path, cfg: &LiveFuzzConfig) -> anyhow::Result<LiveFigures> {
    let active = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let n = Arc::new(Counters::default());
    let mut handles = Vec::new();
    for i in 0..cfg.fuzz_threads {
        let (s, a, st, c) = (socket.to_path_buf(), active.clone(), stop.clone(), n.clone());
        let (seed, rate) = (cfg.seed + i as u64, cfg.rate);
        handles.push(std::thread::spawn(move || fuzz_thread(s, seed, rate, a, st, c)));
    }
    for i in 0..cfg.slow_clients {
        let (s, a, st, c) = (socket.to_path_buf(), active.clone(), stop.clone(), n.clone());
        let seed = cfg.seed + 1000 + i as u64;
        handles.push(std::thread::spawn(move || slow_thread(s, seed, a, st, c)));
    }
    {
        let (s, a, st, c) = (socket.to_path_buf(), active.clone(), stop.clone(), n.clone());
        handles.push(std::thread::spawn(move || non_reader_thread(s, a, st, c)));
    }

    let mut good = Client::connect_hello(socket, Duration::from_secs(10), "tilewise-reliability/good")?;
    let params = unknown_model_params("good");
    let (mut quiet, mut fuzzed) = (Vec::new(), Vec::new());
    let mut good_errors = 0u64;
    let mut fuzz_seconds = 0.0;
    for _ in 0..cfg.phases {
        for fuzz_on in [false, true] {
            active.store(fuzz_on, Relaxed);
            std::thread::sleep(Duration::from_millis(100)); // let the switch take effect
            let t0 = Instant::now();
            while t0.elapsed() < cfg.window {
                let t = Instant::now();
                match good.call("policy.get", params.clone()) {
                    Ok(Ok(_)) => (if fuzz_on { &mut fuzzed } else { &mut quiet }).push(micros(t.elapsed())),
                    _ => {
                        good_errors += 1;
                        good = Client::connect_hello(socket, Duration::from_secs(10), "tilewise-reliability/good")?;
                    }
                }
                // A plugin asks now and then, not in a tight loop: 0.5 ms between requests.
                std::thread::sleep(Duration::from_micros(500));
            }
            if fuzz_on {
                fuzz_seconds += t0.elapsed().as_secs_f64() + 0.1;
            }
        }
    }
    active.store(false, Relaxed);
    stop.store(true, Relaxed);
    for h in handles {
        let _ = h.join();
    }
    let (unloaded, fuzzed_l) = (latency(&mut quiet), latency(&mut fuzzed));
    Ok(LiveFigures {
        unloaded_p99: unloaded.p99_us,
        fuzzed_p99: fuzzed_l.p99_us,
        unloaded,
        fuzzed: fuzzed_l,
        good_errors,
        frames: n.frames.load(Relaxed),
        connections: n.connections.load(Relaxed),
        slow_requests: n.slow_requests.load(Relaxed),
        slow_errors: n.slow_errors.load(Relaxed),
        fuzz_seconds,
    })
}

pub fn rows(daemon: &mut Daemon, cfg: &LiveFuzzConfig) -> Vec<Row> {
    let mut rows = Vec::new();
    let (cases, fails) = conformance(&daemon.socket);
    rows.push(Row::pass_if(
        "protocol: bad frames get the contract's reply",
        if fails.is_empty() { format!("{cases}/{cases} cases") } else { format!("{} of {cases} wrong: {}", fails.len(), fails.join("; ")) },
        "all",
        fails.is_empty(),
    ));
    match run(&daemon.socket, cfg) {
        Err(e) => rows.push(Row::error("live fuzz", &e)),
        Ok(f) => {
            let ratio = f.fuzzed_p99 / f.unloaded_p99.max(1.0);
            let alive = daemon.alive() && daemon.answers();
            let figure = format!("{} fuzzed vs {} quiet: ×{ratio:.2} ({} + {} samples)", f.fuzzed, f.unloaded, f.fuzzed.n, f.unloaded.n);
            rows.push(if cfg.gate_latency {
                Row::pass_if("live fuzz: good client's p99", figure, "≤ 2×", ratio <= 2.0)
            } else {
                Row::new("live fuzz: good client's p99", figure, "≤ 2× (full run only)", crate::report::Verdict::Info)
            });
            rows.push(Row::pass_if(
                "live fuzz: daemon survives, good/slow clients served",
                format!(
                    "{} bad frames ({:.0}/s) on {} connections, {} one-byte-at-a-time requests; alive: {alive}; good-client errors {}, slow-client errors {}",
                    f.frames,
                    f.frames as f64 / f.fuzz_seconds.max(0.001),
                    f.connections,
                    f.slow_requests,
                    f.good_errors,
                    f.slow_errors
                ),
                "alive, 0 errors",
                alive && f.good_errors == 0 && f.slow_errors == 0,
            ));
        }
    }
    rows
}
