//! `tilewise-ui-bridge`: the dashboard in a plain browser, for tests (and for looking at it without
//! the app). It serves ../ui/src over HTTP on 127.0.0.1 and answers the page's `invoke` calls with
//! the app's own [`tilewise_app::api::dispatch`] against the real daemon, so what a browser test sees
//! is what the app window would show. ui/src/bridge.js is the page-side half.
//!
//!   POST /invoke/<command>   JSON args → 200 JSON result | 4xx/502 {"error": {code, message}}
//!   GET  /events             Server-Sent Events: `daemon-event` and `link-state`, JSON data
//!   GET  /<file>             a file of the UI directory
//!
//! It prints `listening on http://127.0.0.1:<port>/` once ready (port 0 picks a free one).

use clap::Parser;
use serde_json::Value;
use std::io::{Read, Write};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use tilewise::paths::Paths;
use tilewise_app::api::{self, AppInfo, TrayInfo};
use tilewise_app::link::DaemonLink;

#[derive(Parser)]
struct Cli {
    /// Port on 127.0.0.1 (0: any free port).
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// The dashboard's files.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../ui/src"))]
    ui: PathBuf,
}

/// Request bodies above this are refused (the page sends a few hundred bytes).
const MAX_BODY: u64 = 1 << 20;

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt().with_writer(std::io::stderr).init();
    let cli = Cli::parse();
    let rt = tokio::runtime::Runtime::new()?;
    let link = DaemonLink::new(Paths::from_env()?, concat!("tilewise-ui-bridge/", env!("CARGO_PKG_VERSION")));
    rt.spawn(Arc::clone(&link).run_event_pump());
    let info = AppInfo {
        tray: TrayInfo { available: false, reason: Some("this is the browser bridge, not the menu-bar app".into()) },
        autostart: Value::Null,
    };
    let server = tiny_http::Server::http(("127.0.0.1", cli.port)).map_err(|e| anyhow::anyhow!("{e}"))?;
    let port = server.server_addr().to_ip().map(|a| a.port()).unwrap_or_default();
    println!("listening on http://127.0.0.1:{port}/");
    std::io::stdout().flush()?;
    let ui = Arc::new(cli.ui.canonicalize()?);
    for request in server.incoming_requests() {
        let (link, info, ui, rt) = (Arc::clone(&link), info.clone(), Arc::clone(&ui), rt.handle().clone());
        // One thread per request: event streams stay open for as long as the page does.
        std::thread::spawn(move || {
            if let Err(e) = handle(request, &link, &info, &ui, &rt) {
                tracing::debug!("request ended: {e}");
            }
        });
    }
    Ok(())
}

fn handle(
    mut request: tiny_http::Request,
    link: &Arc<DaemonLink>,
    info: &AppInfo,
    ui: &Path,
    rt: &tokio::runtime::Handle,
) -> std::io::Result<()> {
    let url = request.url().split('?').next().unwrap_or("/").to_string();
    let json_header = tiny_http::Header::from_bytes("Content-Type", "application/json").expect("static header");
    if let (tiny_http::Method::Post, Some(command)) = (request.method(), url.strip_prefix("/invoke/")) {
        let mut body = String::new();
        request.as_reader().take(MAX_BODY).read_to_string(&mut body)?;
        let args: Value = if body.trim().is_empty() {
            Value::Null
        } else {
            match serde_json::from_str(&body) {
                Ok(v) => v,
                Err(e) => {
                    let err = serde_json::json!({"error": {"code": -32700, "message": format!("bad JSON: {e}")}});
                    return request
                        .respond(tiny_http::Response::from_string(err.to_string()).with_status_code(400).with_header(json_header));
                }
            }
        };
        let (status, body) = match rt.block_on(api::dispatch(link, info, command, args)) {
            Ok(v) => (200, v),
            Err(e) => (if e.code == tilewise_app::link::LinkError::UNREACHABLE { 502 } else { 400 }, serde_json::json!({"error": e})),
        };
        return request.respond(tiny_http::Response::from_string(body.to_string()).with_status_code(status).with_header(json_header));
    }
    if url == "/events" {
        return stream_events(request, link, rt);
    }
    let rel = if url == "/" { "index.html" } else { url.trim_start_matches('/') };
    let rel = Path::new(rel);
    if rel.components().any(|c| !matches!(c, Component::Normal(_))) {
        return request.respond(tiny_http::Response::from_string("bad path").with_status_code(400));
    }
    match std::fs::read(ui.join(rel)) {
        Ok(bytes) => {
            let mime = mime_guess::from_path(rel).first_or_octet_stream().to_string();
            let header = tiny_http::Header::from_bytes("Content-Type", mime).expect("mime is ASCII");
            request.respond(tiny_http::Response::from_data(bytes).with_header(header))
        }
        Err(_) => request.respond(tiny_http::Response::from_string("not found").with_status_code(404)),
    }
}

/// Writes the response by hand so each event is flushed as it arrives (tiny_http buffers bodies).
fn stream_events(request: tiny_http::Request, link: &Arc<DaemonLink>, rt: &tokio::runtime::Handle) -> std::io::Result<()> {
    let mut events = link.subscribe_events();
    let mut state = link.watch_state();
    let mut out = request.into_writer();
    out.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nConnection: close\r\n\r\n")?;
    out.write_all(b": connected\n\n")?;
    out.flush()?;
    loop {
        let next = rt.block_on(async {
            tokio::select! {
                ev = events.recv() => match ev {
                    Ok(ev) => Some(("daemon-event", ev)),
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => Some(("link-state", serde_json::to_value(link.state()).unwrap_or_default())),
                    Err(_) => None,
                },
                changed = state.changed() => match changed {
                    Ok(()) => Some(("link-state", serde_json::to_value(state.borrow_and_update().clone()).unwrap_or_default())),
                    Err(_) => None,
                },
            }
        });
        let Some((name, data)) = next else { return Ok(()) };
        // A write error means the page went away: end this stream.
        write!(out, "event: {name}\ndata: {data}\n\n")?;
        out.flush()?;
    }
}
