//! DaemonLink against the real `tilewised` on a real socket in a temp TILEWISE_HOME: connection
//! state, event forwarding, transparent reconnect after a daemon restart, and the dashboard's method
//! allowlist. Needs target/<profile>/tilewised built (scripts/test.d/50-app-smoke.sh builds it first).

use serde_json::{json, Value};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;
use tilewise::ipc::client::Client;
use tilewise::paths::Paths;
use tilewise_app::api::{self, AppInfo, TrayInfo};
use tilewise_app::link::{DaemonLink, LinkError};

/// `tilewised` next to this test's own target directory (target/debug/deps/link-… → target/debug).
fn daemon_exe() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let path = exe.parent().unwrap().parent().unwrap().join("tilewised");
    assert!(path.is_file(), "{} is missing: cargo build -p tilewise --bin tilewised", path.display());
    path
}

struct TempHome(PathBuf);
impl TempHome {
    fn new() -> TempHome {
        let dir = std::env::temp_dir().join(format!("tilewise-app-link-{}-{}", std::process::id(), rand_suffix()));
        std::fs::create_dir_all(&dir).unwrap();
        TempHome(dir)
    }
}
impl Drop for TempHome {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
fn rand_suffix() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
}

fn start_daemon(home: &TempHome) -> Child {
    Command::new(daemon_exe())
        .env("TILEWISE_HOME", &home.0)
        .env_remove("TILEWISE_SOCKET")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

async fn until<T>(what: &str, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    for _ in 0..300 {
        if let Some(v) = f().await {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for {what}");
}

fn info() -> AppInfo {
    AppInfo { tray: TrayInfo { available: false, reason: Some("test".into()) }, autostart: Value::Null }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_link_follows_the_daemon_across_a_restart() {
    let home = TempHome::new();
    let paths = Paths::under_home(&home.0);
    let link = DaemonLink::new(paths.clone(), "tilewise-app-test/1");

    // No daemon: a clear "unreachable" error, and the state says why.
    let err = link.call("status", Value::Null).await.unwrap_err();
    assert_eq!(err.code, LinkError::UNREACHABLE);
    assert!(!link.state().connected);
    assert!(link.state().error.unwrap().contains("not running"), "{:?}", link.state());

    let mut first = start_daemon(&home);
    let status = until("tilewised", async || link.call("status", Value::Null).await.ok()).await;
    let state = link.state();
    assert!(state.connected);
    assert_eq!(state.pid, status["pid"].as_u64());

    // Events: another client's hello reaches the link's subscribers.
    tokio::spawn(Arc::clone(&link).run_event_pump());
    let mut events = link.subscribe_events();
    // The pump connects on its own; wait until its subscription is live (its own hello arrives).
    let _ = until("the pump's subscription", async || {
        let mut probe = Client::connect(&paths).await.ok()?.with_name("link-probe/1");
        probe.hello().await.ok()?;
        tokio::time::timeout(Duration::from_millis(300), async {
            loop {
                let ev = events.recv().await.ok()?;
                if ev["kind"] == "client.hello" && ev["data"]["client"] == "link-probe/1" {
                    return Some(ev);
                }
            }
        })
        .await
        .ok()
        .flatten()
    })
    .await;

    // The dashboard may not stop the daemon; the tray's own call may.
    let refused = api::dispatch(&link, &info(), "daemon_call", json!({"method": "daemon.shutdown"})).await.unwrap_err();
    assert_eq!(refused.code, -32602);
    link.call("status", Value::Null).await.expect("still running after a refused call");
    link.call("daemon.shutdown", Value::Null).await.unwrap();
    let _ = first.wait();
    let mut state_rx = link.watch_state();
    until("the link to notice", async || {
        let connected = state_rx.borrow_and_update().connected;
        (!connected).then_some(())
    })
    .await;

    // A new daemon: the next call reconnects by itself and sees the new pid.
    let mut second = start_daemon(&home);
    let status2 = until("the second tilewised", async || link.call("status", Value::Null).await.ok()).await;
    assert_ne!(status2["pid"], status["pid"]);
    assert_eq!(link.state().pid, status2["pid"].as_u64());
    // The new daemon announced itself before the pump was back (it retries after a second or
    // more); the pump resubscribes from the last id it saw, so that event still arrives.
    until("the second daemon's daemon.started through the pump", async || loop {
        match events.try_recv() {
            Ok(ev) if ev["kind"] == "daemon.started" && ev["data"]["pid"] == status2["pid"] => return Some(()),
            Ok(_) | Err(tokio::sync::broadcast::error::TryRecvError::Lagged(_)) => continue,
            Err(_) => return None,
        }
    })
    .await;
    link.call("daemon.shutdown", Value::Null).await.unwrap();
    let _ = second.wait();
}
