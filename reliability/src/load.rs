//! Concurrent load: C clients × N `policy.get` each against one real daemon, every reply checked
//! (same id, result of the contract's shape). Latency under load is shown next to one client's
//! unloaded latency measured in the same run.

use crate::client::{check_policy_result, unknown_model_params, Client};
use crate::harness::Daemon;
use crate::report::Row;
use crate::stats::{latency, micros, Latency};
use anyhow::Result;
use std::path::Path;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

pub struct LoadFigures {
    pub unloaded: Latency,
    pub loaded: Latency,
    pub requests: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    pub wall: Duration,
}

/// `n` sequential `policy.get` round trips on one connection; latencies in µs and error count.
pub fn one_client(socket: &Path, n: usize, tag: &str) -> (Vec<f64>, u64, Option<String>) {
    let mut lat = Vec::with_capacity(n);
    let mut errors = 0u64;
    let mut first_error = None;
    let mut note = |e: String, errors: &mut u64| {
        *errors += 1;
        first_error.get_or_insert(e);
    };
    let mut client = match Client::connect_hello(socket, Duration::from_secs(30), "tilewise-reliability/load") {
        Ok(c) => c,
        Err(e) => {
            note(format!("connect: {e:#}"), &mut errors);
            return (lat, n as u64, first_error);
        }
    };
    let params = unknown_model_params(tag);
    for _ in 0..n {
        let t0 = Instant::now();
        match client.call("policy.get", params.clone()) {
            Ok(Ok(r)) => {
                lat.push(micros(t0.elapsed()));
                if let Err(e) = check_policy_result(&r) {
                    note(format!("{e:#}"), &mut errors);
                }
            }
            Ok(Err(e)) => note(format!("error reply: {e}"), &mut errors),
            Err(e) => {
                note(format!("{e:#}"), &mut errors);
                // The connection is in an unknown state: reconnect so one failure is counted once.
                match Client::connect_hello(socket, Duration::from_secs(30), "tilewise-reliability/load") {
                    Ok(c) => client = c,
                    Err(_) => {
                        let missed = (n - lat.len()) as u64;
                        return (lat, errors + missed, first_error);
                    }
                }
            }
        }
    }
    (lat, errors, first_error)
}

pub fn run(daemon: &Daemon, clients: usize, per_client: usize, unloaded_n: usize) -> Result<LoadFigures> {
    // Warm the daemon's path (first policy.get may touch the database cold).
    let _ = one_client(&daemon.socket, 200, "warm");
    let (mut un, un_err, un_first) = one_client(&daemon.socket, unloaded_n, "unloaded");
    let unloaded = latency(&mut un);

    let barrier = Arc::new(Barrier::new(clients + 1));
    let handles: Vec<_> = (0..clients)
        .map(|i| {
            let socket = daemon.socket.clone();
            let barrier = barrier.clone();
            std::thread::Builder::new()
                .name(format!("load-{i}"))
                .stack_size(256 * 1024)
                .spawn(move || {
                    barrier.wait();
                    one_client(&socket, per_client, &format!("load-{}", i % 8))
                })
                .expect("spawn load client")
        })
        .collect();
    barrier.wait();
    let t0 = Instant::now();
    let mut all = Vec::with_capacity(clients * per_client);
    let mut errors = un_err;
    let mut first_error = un_first;
    for h in handles {
        let (lat, e, first) = h.join().unwrap_or_else(|_| (Vec::new(), per_client as u64, Some("client thread panicked".into())));
        all.extend(lat);
        errors += e;
        if first_error.is_none() {
            first_error = first;
        }
    }
    let wall = t0.elapsed();
    let loaded = latency(&mut all);
    Ok(LoadFigures { unloaded, loaded, requests: (clients * per_client) as u64, errors, first_error, wall })
}

pub fn rows(daemon: &mut Daemon, clients: usize, per_client: usize, unloaded_n: usize) -> Vec<Row> {
    let f = match run(daemon, clients, per_client, unloaded_n) {
        Ok(f) => f,
        Err(e) => return vec![Row::error("load", &e)],
    };
    let alive = daemon.alive();
    let mut err_fig = format!("{} errors / {} requests ({clients} clients × {per_client})", f.errors, f.requests);
    if let Some(e) = &f.first_error {
        err_fig.push_str(&format!("; first: {e:.160}"));
    }
    vec![
        Row::pass_if("load: policy.get errors", err_fig, "0", f.errors == 0 && alive),
        Row::info(
            "load: latency under load",
            format!(
                "{} under load vs {} unloaded (×{:.1} p99); {:.0} req/s",
                f.loaded,
                f.unloaded,
                f.loaded.p99_us / f.unloaded.p99_us.max(1.0),
                f.requests as f64 / f.wall.as_secs_f64()
            ),
        ),
    ]
}
