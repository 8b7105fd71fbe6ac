//! What the dashboard may ask for: the one table of commands, used by the Tauri commands of the app
//! and by the browser-test bridge alike, so a browser test exercises the same code as the window.
//!
//! | command | args | result |
//! | --- | --- | --- |
//! | `app_state` | — | `{link: LinkState, tray: {available, reason}, autostart}` |
//! | `daemon_call` | `{method, params}` | the daemon's result for one of [`DASHBOARD_METHODS`] |
//! | `start_daemon` | — | `{started, pid?, already_running?}` |

use crate::link::{DaemonLink, LinkError};
use serde::Serialize;
use serde_json::{json, Value};

/// Daemon methods the dashboard may call. Not `daemon.shutdown` or `config.set` with arbitrary
/// keys: stopping the daemon and changing settings are tray actions with fixed arguments.
pub const DASHBOARD_METHODS: [&str; 11] = [
    "status",
    "policy.get",
    "history",
    "session.list",
    "session.show",
    "tuning.start",
    "tuning.stop",
    "config.get",
    "events.list",
    "models.list",
    "clients.list",
];

/// Whether a tray icon exists, and if not, why (shown on the dashboard).
#[derive(Debug, Clone, Serialize)]
pub struct TrayInfo {
    pub available: bool,
    pub reason: Option<String>,
}

/// What the app knows that the daemon does not: tray availability and the login-item state.
#[derive(Debug, Clone, Serialize)]
pub struct AppInfo {
    pub tray: TrayInfo,
    /// `null` where login-item support is not available on this platform/build.
    pub autostart: Value,
}

/// Runs one dashboard command.
pub async fn dispatch(link: &DaemonLink, app: &AppInfo, command: &str, args: Value) -> Result<Value, LinkError> {
    match command {
        "app_state" => Ok(json!({"link": link.state(), "tray": app.tray, "autostart": app.autostart})),
        "daemon_call" => {
            let method = args["method"].as_str().ok_or_else(|| bad("daemon_call needs a string `method`"))?;
            if !DASHBOARD_METHODS.contains(&method) {
                return Err(bad(format!("the dashboard may not call `{method}`")));
            }
            let params = args.get("params").cloned().unwrap_or(Value::Null);
            link.call(method, params).await
        }
        "start_daemon" => link.start_daemon().await,
        other => Err(bad(format!("unknown command `{other}`"))),
    }
}

/// JSON-RPC's "invalid params" code, reused for a bad command from the page.
fn bad(message: impl Into<String>) -> LinkError {
    LinkError { code: -32602, message: message.into() }
}
