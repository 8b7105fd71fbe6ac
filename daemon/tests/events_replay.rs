//! The event log through the real daemon: `events.list` returns the newest stored events, and
//! `events.subscribe {since}` replays what a client missed and then streams live events, with no
//! event missing or repeated at the seam; `tilewise events` prints them.

mod common;

use common::*;
use serde_json::json;
use std::time::Duration;
use tilewise::ipc::protocol::EventsListParams;

async fn hello_from(d: &TestDaemon, name: &str) {
    let mut c = d.client().await.with_name(name.to_string());
    c.hello().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_and_replay_then_live_without_gaps_or_repeats() {
    let d = TestDaemon::start();
    let mut c = d.client().await;
    for i in 0..5 {
        hello_from(&d, &format!("early-{i}")).await;
    }
    // events.list: the newest, oldest first; filtered by kind; bad params are refused.
    let three = c.events_list(&EventsListParams { limit: Some(3), ..Default::default() }).await.unwrap().events;
    let clients: Vec<_> = three.iter().map(|e| e.data["client"].as_str().unwrap_or("").to_string()).collect();
    assert_eq!(clients, ["early-2", "early-3", "early-4"], "{three:?}");
    assert!(three.windows(2).all(|w| w[0].id < w[1].id));
    let started = c
        .events_list(&EventsListParams { limit: Some(100), kinds: Some(vec!["daemon.started".into()]), ..Default::default() })
        .await
        .unwrap()
        .events;
    assert_eq!(started.len(), 1, "{started:?}");
    let err = c.call("events.list", Some(json!({"limitt": 3}))).await.unwrap_err();
    assert!(err.to_string().contains("limitt"), "{err}");

    // A subscriber that saw up to early-1 gets early-2.. replayed, then live events.
    let seen_up_to = three[0].id - 1;
    // Hellos racing the subscription (some stored before it reads the store, some during, some
    // after): each must arrive exactly once, in order.
    let racing = {
        let socket = d.paths.socket.clone();
        tokio::spawn(async move {
            for i in 0..20 {
                let mut c = tilewise::ipc::client::Client::connect_path(&socket).await.unwrap().with_name(format!("live-{i}"));
                c.hello().await.unwrap();
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(5)).await;
    let mut rx = d.client().await.subscribe_events_since(Some(vec!["client.hello".into()]), Some(seen_up_to)).await.unwrap();
    let mut got = Vec::new();
    while got.len() < 3 + 20 {
        let e = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await.expect("events keep coming").expect("stream open");
        got.push(e);
    }
    racing.await.unwrap();
    let names: Vec<String> = got.iter().map(|e| e.data["client"].as_str().unwrap().to_string()).collect();
    let mut expected: Vec<String> = (2..5).map(|i| format!("early-{i}")).collect();
    expected.extend((0..20).map(|i| format!("live-{i}")));
    assert_eq!(names, expected);
    assert!(got.windows(2).all(|w| w[0].id < w[1].id), "ids strictly increase: nothing repeated");
    assert!(tokio::time::timeout(Duration::from_millis(300), rx.recv()).await.is_err(), "nothing extra");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tilewise_events_prints_the_newest() {
    let d = TestDaemon::start();
    hello_from(&d, "printed-client").await;
    let out = std::process::Command::new(TILEWISE)
        .env("TILEWISE_HOME", d.home.path())
        .env_remove("TILEWISE_SOCKET")
        .args(["events", "--limit", "50"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.lines().any(|l| l.contains("daemon.started")), "{text}");
    assert!(!text.contains("client.hello"), "hellos are left out by default: {text}");
    let out = std::process::Command::new(TILEWISE)
        .env("TILEWISE_HOME", d.home.path())
        .env_remove("TILEWISE_SOCKET")
        .args(["events", "--limit", "50", "--all"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.lines().any(|l| l.contains("client.hello") && l.contains("printed-client")), "{text}");
    assert!(!text.contains("tilewise-cli/"), "the command line's own hellos are not stored: {text}");
    let out = std::process::Command::new(TILEWISE)
        .env("TILEWISE_HOME", d.home.path())
        .env_remove("TILEWISE_SOCKET")
        .args(["events", "--limit", "2", "--all", "--json"])
        .output()
        .unwrap();
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2);
    assert!(lines[0]["id"].as_i64() < lines[1]["id"].as_i64());
}
