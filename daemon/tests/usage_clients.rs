//! Who uses what, against the real daemon: policy fetches recorded per process, usage reports
//! validated and merged (a flood stays one row), `tilewise models` / `clients` / `status`, and
//! `policy get --model` by name.

mod common;

use common::*;
use serde_json::{json, Value};
use tilewise::ipc::protocol::codes;

const FP: &str = "mdl-0123456789abcdef0123456789abcdef";

fn code(reply: &Value) -> i64 {
    reply["error"]["code"].as_i64().unwrap_or(0)
}

fn cli(d: &TestDaemon, args: &[&str]) -> std::process::Output {
    std::process::Command::new(TILEWISE).args(args).env("TILEWISE_HOME", d.home.path()).env_remove("TILEWISE_SOCKET").output().unwrap()
}

/// A connection that introduces itself as a plugin would.
fn plugin(d: &TestDaemon) -> Raw {
    let mut raw = d.raw();
    let hello = raw.call(r#"{"jsonrpc":"2.0","id":1,"method":"hello","params":{"client":"tilewise-py/test","protocol":1}}"#);
    assert!(hello["result"].is_object(), "{hello}");
    raw
}

fn report(batch: u32) -> Value {
    json!({"model": FP, "model_name": "/models/Qwen2.5-0.5B-Instruct", "period_s": 60.0,
           "generations": [{"batch": batch, "prompt_tokens": 512, "generated_tokens": 64, "count": 3}],
           "shapes": [{"m": batch, "n": 896, "k": 896, "calls": 3 * 64 * 48}]})
}

#[test]
fn fetches_and_usage_are_recorded_bounded_and_shown_by_name() {
    let d = TestDaemon::start();
    let mut p = plugin(&d);
    let get = json!({"jsonrpc":"2.0","id":2,"method":"policy.get",
                     "params":{"model": FP, "mlx":"0.32.4", "backend":"cpu", "model_name":"/models/Qwen2.5-0.5B-Instruct", "dtype":"bfloat16"}});
    let r = p.call(&get.to_string());
    assert_eq!(r["result"]["source"], "native", "{r}");
    // Noted in memory on the hot path, written by the daemon within a few seconds (nobody asked).
    let store = tilewise::store::Store::open(&d.paths.db_file).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while store.fetches(10).unwrap().is_empty() {
        assert!(std::time::Instant::now() < deadline, "the fetch was never written");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }

    // Reports out of bounds are refused naming the field; nothing is stored for them.
    for (bad, field) in [
        (
            json!({"model": FP, "period_s": 1.0, "generations": [{"batch": 0, "prompt_tokens": 1, "generated_tokens": 1, "count": 1}]}),
            "generations[0].batch",
        ),
        (json!({"model": FP, "period_s": -1.0}), "period_s"),
        (json!({"model": "x".repeat(500), "period_s": 1.0}), "model"),
        (json!({"model": FP, "period_s": 1.0, "shapes": vec![json!({"m": 1, "n": 1, "k": 1, "calls": 1}); 513]}), "shapes"),
    ] {
        let reply = p.call(&json!({"jsonrpc":"2.0","id":3,"method":"usage.report","params": bad}).to_string());
        assert_eq!(code(&reply), codes::INVALID_PARAMS, "{reply}");
        assert!(reply["error"]["message"].as_str().unwrap().contains(&format!(": {field}: ")), "{field}: {reply}");
    }
    // A flood from one process merges into one row: counts add up, the database does not grow.
    for _ in 0..300 {
        let reply = p.call(&json!({"jsonrpc":"2.0","id":4,"method":"usage.report","params": report(8)}).to_string());
        assert_eq!(reply["result"]["stored"], true, "{reply}");
    }
    let rows = store.usage_of(FP).unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!((rows[0].reports, rows[0].generations[0].count), (300, 900));

    // The fetch: this process, its pid from the kernel, still live.
    let out = cli(&d, &["clients", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let clients: Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows = clients["clients"].as_array().unwrap();
    assert_eq!(rows.len(), 1, "the command line's own calls are not recorded: {clients}");
    assert_eq!(
        (&rows[0]["client"], &rows[0]["pid"], &rows[0]["live"], &rows[0]["source"]),
        (&json!("tilewise-py/test"), &json!(std::process::id()), &json!(true), &json!("native")),
        "{clients}"
    );
    let out = cli(&d, &["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("1 process, 1 model") && text.contains("Qwen2.5-0.5B-Instruct → native, not tuned yet"), "{text}");

    // The model by name: listed with its weights and usage; `policy get` takes the name.
    let out = cli(&d, &["models", "--json"]);
    let models: Value = serde_json::from_slice(&out.stdout).unwrap();
    let m = &models["models"][0];
    assert_eq!((&m["fingerprint"], &m["name"], &m["dtype"]), (&json!(FP), &json!("/models/Qwen2.5-0.5B-Instruct"), &json!("bfloat16")));
    assert_eq!((&m["usage"]["main_batch"], &m["usage"]["generations"]), (&json!(8), &json!(900)), "{m}");
    let out = cli(&d, &["models"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Qwen2.5-0.5B-Instruct  mdl-") && text.contains("mostly at batch 8"), "{text}");
    for name in ["Qwen2.5-0.5B-Instruct", "/models/Qwen2.5-0.5B-Instruct", FP] {
        let out = cli(&d, &["policy", "get", "--model", name, "--mlx", "0.32.4"]);
        assert!(out.status.success(), "{name}: {}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.starts_with("native policy sha256:") && text.lines().next().unwrap().ends_with(&format!("for model {FP}")),
            "{name}: {text}"
        );
    }
    for unknown in ["", "synthetic:tiny"] {
        let out = cli(&d, &["policy", "get", "--model", unknown, "--mlx", "0.32.4"]);
        assert!(!out.status.success(), "{unknown:?} must not be answered silently");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("tilewise models"), "{unknown:?}: {err}");
    }
    // Still one recorded process: `policy get` from the command line is not a process running a model.
    let out = cli(&d, &["clients", "--json"]);
    let clients: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(clients["clients"].as_array().unwrap().len(), 1, "{clients}");
}
