//! A person who builds in a checkout, creates its `.venv` and runs `tilewise daemon start` with no
//! configuration gets a worker that has the package (the checkout's `.venv`, found from the binary's
//! path); a named Python that cannot run the worker fails the start with the fix in the message and
//! a `worker.failed` event. The real `tilewised`, real socket.

mod session_support;

use serde_json::json;
use session_support::*;
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::Duration;
use tilewise::paths::Paths;

fn start_unconfigured(home: &std::path::Path, config: Option<&str>) -> (std::process::Child, Paths) {
    let paths = Paths::under_home(home);
    std::fs::create_dir_all(paths.config_file.parent().unwrap()).unwrap();
    std::fs::write(&paths.config_file, config.unwrap_or("[idle]\nenabled = false\n")).unwrap();
    let child = Command::new(TILEWISED)
        .env("TILEWISE_HOME", home)
        .env_remove("TILEWISE_PYTHON")
        .env_remove("TILEWISE_SOCKET")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(home.join("daemon.log")).unwrap())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while std::os::unix::net::UnixStream::connect(&paths.socket).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "no socket: {}",
            std::fs::read_to_string(home.join("daemon.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    (child, paths)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_configuration_the_checkouts_venv_runs_the_worker() {
    let home = tempfile::tempdir().unwrap();
    let (mut child, paths) = start_unconfigured(home.path(), None);
    let mut c = tilewise::ipc::client::Client::connect_path(&paths.socket).await.unwrap();
    let native = json!({"schema": "tilewise.policy/1", "target": {"device": "*", "model": "*", "mlx": "*", "backend": "*"},
                        "matmul": {"rules": [], "default": {"kind": "native"}}});
    let started = c.call("tuning.start", Some(json!({"policies": [native], "pairs": 2, "warmup": 0, "now": true}))).await.unwrap();
    assert!(started["session_id"].as_i64().is_some(), "{started}");
    let log = std::fs::read_to_string(home.path().join("logs").read_dir().unwrap().next().unwrap().unwrap().path()).unwrap_or_default();
    assert!(log.contains("worker python") && log.contains(".venv"), "{log}");
    let _ = c.call("daemon.shutdown", None).await;
    let _ = child.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_named_python_that_cannot_run_the_worker_says_how_to_fix_it() {
    let home = tempfile::tempdir().unwrap();
    let fake = home.path().join("python");
    std::fs::write(&fake, "#!/bin/sh\necho \"ModuleNotFoundError: No module named 'tilewise'\" >&2\nexit 1\n").unwrap();
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let config = format!("python = {:?}\n[idle]\nenabled = false\n", fake.display().to_string());
    let (mut child, paths) = start_unconfigured(home.path(), Some(&config));
    let mut c = tilewise::ipc::client::Client::connect_path(&paths.socket).await.unwrap();
    let err = c.call("tuning.start", Some(json!({"now": true}))).await.unwrap_err().to_string();
    assert!(err.contains("the measuring worker did not start") && err.contains("name a Python that has it"), "{err}");
    let events = c.call("events.list", Some(json!({"kinds": ["worker.failed"]}))).await.unwrap();
    let e = &events["events"][0]["data"];
    assert!(e["python"].as_str().unwrap().ends_with("/python") && e["reason"].as_str().unwrap().contains("did not start"), "{events}");
    let _ = c.call("daemon.shutdown", None).await;
    let _ = child.wait();
}
