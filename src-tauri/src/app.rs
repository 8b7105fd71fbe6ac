//! The Tauri wiring: the dashboard window, the tray icon and its menu, single instance, and the
//! forwarding of daemon events to the window (`daemon-event`, `link-state`) and the tray.

use crate::api::{self, AppInfo, TrayInfo};
use crate::link::{DaemonLink, LinkError};
use crate::{autostart, tray_support, tray_text};
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};
use tauri::image::Image;
use tauri::menu::{CheckMenuItem, Menu, MenuEvent, MenuItem, PredefinedMenuItem};
use tauri::tray::TrayIconBuilder;
use tauri::{AppHandle, Emitter, Manager, RunEvent, WindowEvent, Wry};

/// Label of the dashboard window in tauri.conf.json.
const DASHBOARD: &str = "dashboard";
/// Event kinds after which the tray's status line may have changed.
const TRAY_KINDS: &[&str] = &[
    "session.started",
    "session.paused",
    "session.resumed",
    "session.finished",
    "session.stopped",
    "candidate.measured",
    "policy.promoted",
    "policy.demoted",
    "config.reloaded",
    "daemon.started",
];

#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Started at login: stay in the menu bar, do not open the dashboard (unless there is no tray).
    pub background: bool,
}

/// State shared by the commands, the tray and the forwarding tasks.
struct Ctx {
    link: Arc<DaemonLink>,
    info: Mutex<AppInfo>,
    tray: Mutex<Option<TrayItems>>,
}

impl Ctx {
    fn info(&self) -> AppInfo {
        self.info.lock().expect("app info lock").clone()
    }
    fn has_tray(&self) -> bool {
        self.info().tray.available
    }
}

/// The menu items whose text or check mark follows the daemon.
struct TrayItems {
    status: MenuItem<Wry>,
    start: MenuItem<Wry>,
    pause: MenuItem<Wry>,
    only_idle: CheckMenuItem<Wry>,
    login: CheckMenuItem<Wry>,
    daemon: MenuItem<Wry>,
}

// ---- commands (the dashboard's `invoke`; the table lives in api.rs) -----------------------------

#[tauri::command]
async fn app_state(ctx: tauri::State<'_, Ctx>) -> Result<Value, LinkError> {
    api::dispatch(&ctx.link, &ctx.info(), "app_state", Value::Null).await
}

#[tauri::command]
async fn daemon_call(ctx: tauri::State<'_, Ctx>, method: String, params: Option<Value>) -> Result<Value, LinkError> {
    api::dispatch(&ctx.link, &ctx.info(), "daemon_call", json!({"method": method, "params": params})).await
}

#[tauri::command]
async fn start_daemon(ctx: tauri::State<'_, Ctx>) -> Result<Value, LinkError> {
    api::dispatch(&ctx.link, &ctx.info(), "start_daemon", Value::Null).await
}

// ---- the app ------------------------------------------------------------------------------------

pub fn run(link: Arc<DaemonLink>, options: Options) -> anyhow::Result<()> {
    let tray_reason = tray_support::check();
    let info = AppInfo { tray: TrayInfo { available: tray_reason.is_none(), reason: tray_reason }, autostart: Value::Null };
    let app = tauri::Builder::default()
        // A second launch shows the first instance's dashboard instead of starting another app.
        .plugin(tauri_plugin_single_instance::init(|app, _argv, _cwd| show_dashboard(app)))
        .manage(Ctx { link, info: Mutex::new(info), tray: Mutex::new(None) })
        .invoke_handler(tauri::generate_handler![app_state, daemon_call, start_daemon])
        .setup(move |app| {
            platform_setup(app);
            let handle = app.handle().clone();
            let ctx = handle.state::<Ctx>();
            if ctx.has_tray() {
                if let Err(why) = build_tray(&handle) {
                    tracing::warn!("no tray icon: {why}");
                    *ctx.info.lock().expect("app info lock") =
                        AppInfo { tray: TrayInfo { available: false, reason: Some(why) }, ..ctx.info() };
                }
            } else {
                tracing::warn!("no tray icon: {}", ctx.info().tray.reason.unwrap_or_default());
            }
            if !options.background || !ctx.has_tray() {
                show_dashboard(&handle);
            }
            spawn_forwarding(&handle);
            Ok(())
        })
        .on_window_event(|window, event| {
            // Closing the dashboard hides it while the tray keeps the app reachable; without a
            // tray, closing the window quits the app.
            if let WindowEvent::CloseRequested { api, .. } = event {
                if window.state::<Ctx>().has_tray() {
                    api.prevent_close();
                    let _ = window.hide();
                }
            }
        })
        .build(tauri::generate_context!())?;
    app.run(|handle, event| {
        // The last window going away does not end a menu-bar app; only "Quit tilewise" does.
        if let RunEvent::ExitRequested { api, code: None, .. } = event {
            if handle.state::<Ctx>().has_tray() {
                api.prevent_exit();
            }
        }
    });
    Ok(())
}

fn show_dashboard(app: &AppHandle) {
    if let Some(w) = app.get_webview_window(DASHBOARD) {
        let _ = w.unminimize();
        let _ = w.show();
        let _ = w.set_focus();
    }
}

/// macOS: a menu-bar app has no Dock icon (Accessory activation policy).
#[cfg(target_os = "macos")]
fn platform_setup(app: &mut tauri::App) {
    app.set_activation_policy(tauri::ActivationPolicy::Accessory);
}
#[cfg(not(target_os = "macos"))]
fn platform_setup(_app: &mut tauri::App) {}

/// The tray icon: a template image on macOS (tinted by the system), the coloured one elsewhere.
fn tray_icon() -> tauri::Result<Image<'static>> {
    if cfg!(target_os = "macos") {
        Image::from_bytes(include_bytes!("../icons/tray-template.png"))
    } else {
        Image::from_bytes(include_bytes!("../icons/tray.png"))
    }
}

fn build_tray(app: &AppHandle) -> Result<(), String> {
    let items = (|| -> tauri::Result<(TrayItems, Menu<Wry>)> {
        let status = MenuItem::with_id(app, "status", "Connecting…", false, None::<&str>)?;
        let start = MenuItem::with_id(app, "start", "Start tuning now", false, None::<&str>)?;
        let pause = MenuItem::with_id(app, "pause", "Pause", false, None::<&str>)?;
        let only_idle = CheckMenuItem::with_id(app, "only_idle", "Tune only when idle", false, false, None::<&str>)?;
        let open = MenuItem::with_id(app, "open", "Open dashboard", true, None::<&str>)?;
        // Enabled once the service manager's answer is known (refresh_login).
        let login = CheckMenuItem::with_id(app, "login", "Start at login", false, false, None::<&str>)?;
        let daemon = MenuItem::with_id(app, "daemon", "Stop daemon", false, None::<&str>)?;
        let quit = MenuItem::with_id(app, "quit", "Quit tilewise", true, None::<&str>)?;
        let sep = || PredefinedMenuItem::separator(app);
        let menu = Menu::with_items(app, &[&status, &sep()?, &start, &pause, &only_idle, &sep()?, &open, &login, &sep()?, &daemon, &quit])?;
        Ok((TrayItems { status, start, pause, only_idle, login, daemon }, menu))
    })();
    let (items, menu) = items.map_err(|e| format!("cannot build the tray menu: {e}"))?;
    let icon = tray_icon().map_err(|e| format!("cannot load the tray icon: {e}"))?;
    // The tray library can panic where the platform lacks pieces tray_support did not detect;
    // a panic here must cost the tray, never the app.
    let built = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        TrayIconBuilder::with_id("tilewise")
            .icon(icon)
            .icon_as_template(cfg!(target_os = "macos"))
            .tooltip("tilewise")
            .menu(&menu)
            .show_menu_on_left_click(true)
            .on_menu_event(on_menu_event)
            .build(app)
    }));
    match built {
        Ok(Ok(_tray)) => {
            *app.state::<Ctx>().tray.lock().expect("tray lock") = Some(items);
            Ok(())
        }
        Ok(Err(e)) => Err(format!("the tray icon could not be created: {e}")),
        Err(_) => Err("the tray library failed (panicked) while creating the icon".into()),
    }
}

fn on_menu_event(app: &AppHandle, event: MenuEvent) {
    let id = event.id().as_ref().to_string();
    let app = app.clone();
    tauri::async_runtime::spawn(async move {
        let link = app.state::<Ctx>().link.clone();
        let result = match id.as_str() {
            "open" => {
                show_dashboard(&app);
                Ok(Value::Null)
            }
            "quit" => {
                app.exit(0);
                Ok(Value::Null)
            }
            // "Start tuning now" means now: past the idle gate (which still pauses a session it started).
            "start" => link.call("tuning.start", json!({"now": true})).await,
            "pause" => link.call("tuning.stop", json!({})).await,
            "only_idle" => {
                let wanted = tray_check(&app, |t| &t.only_idle);
                link.call("config.set", json!({"key": "idle.enabled", "value": wanted})).await
            }
            "login" => {
                let wanted = tray_check(&app, |t| &t.login);
                let logs = link.paths().logs_dir.clone();
                let state = tauri::async_runtime::spawn_blocking(move || autostart::set(&logs, wanted)).await;
                match state {
                    Ok(state) => {
                        let error = state.error.clone();
                        show_login(&app, state);
                        error.map_or(Ok(Value::Null), |e| Err(LinkError::unreachable(e)))
                    }
                    Err(e) => Err(LinkError::unreachable(e.to_string())),
                }
            }
            "daemon" => {
                if link.state().connected {
                    link.call("daemon.shutdown", Value::Null).await
                } else {
                    link.start_daemon().await
                }
            }
            _ => Ok(Value::Null),
        };
        if let Err(e) = result {
            tracing::warn!("menu action {id} failed: {e}");
            let _ = app.emit("app-error", format!("{id}: {e}"));
        }
        refresh_tray(&app).await;
    });
}

/// The check mark a check item has just been toggled to (the menu toggles it itself before the event
/// arrives); what is sent is that wish, and the item is then re-set from what the daemon/OS reports.
fn tray_check(app: &AppHandle, item: impl Fn(&TrayItems) -> &CheckMenuItem<Wry>) -> bool {
    let ctx = app.state::<Ctx>();
    let guard = ctx.tray.lock().expect("tray lock");
    guard.as_ref().and_then(|t| item(t).is_checked().ok()).unwrap_or(false)
}

/// Shows the login-service state on the menu item and in app_state.
fn show_login(app: &AppHandle, state: autostart::LoginState) {
    let ctx = app.state::<Ctx>();
    if let Some(items) = ctx.tray.lock().expect("tray lock").as_ref() {
        let _ = items.login.set_checked(state.enabled);
        // Unknown state (no service manager here): the item stays disabled rather than guessing.
        let _ = items.login.set_enabled(state.status.is_some());
    }
    ctx.info.lock().expect("app info lock").autostart = serde_json::to_value(&state).unwrap_or_default();
}

/// Forwards daemon events and connection changes to the window, and refreshes the tray after the
/// events that change what it shows.
fn spawn_forwarding(app: &AppHandle) {
    let link = app.state::<Ctx>().link.clone();
    tauri::async_runtime::spawn(Arc::clone(&link).run_event_pump());

    let (handle, mut events) = (app.clone(), link.subscribe_events());
    tauri::async_runtime::spawn(async move {
        loop {
            match events.recv().await {
                Ok(ev) => {
                    let _ = handle.emit_to(DASHBOARD, "daemon-event", &ev);
                    if ev["kind"].as_str().is_some_and(|k| TRAY_KINDS.contains(&k)) {
                        refresh_tray(&handle).await;
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => refresh_tray(&handle).await,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
            }
        }
    });

    let handle = app.clone();
    let logs = link.paths().logs_dir.clone();
    tauri::async_runtime::spawn(async move {
        if let Ok(state) = tauri::async_runtime::spawn_blocking(move || autostart::read(&logs)).await {
            show_login(&handle, state);
        }
    });

    let (handle, mut state) = (app.clone(), link.watch_state());
    tauri::async_runtime::spawn(async move {
        refresh_tray(&handle).await;
        while state.changed().await.is_ok() {
            let s = state.borrow_and_update().clone();
            let _ = handle.emit_to(DASHBOARD, "link-state", &s);
            refresh_tray(&handle).await;
        }
    });
}

/// Re-reads status (and the running session, and the config) and updates the tray's items.
async fn refresh_tray(app: &AppHandle) {
    let ctx = app.state::<Ctx>();
    if ctx.tray.lock().expect("tray lock").is_none() {
        return;
    }
    let status = ctx.link.call("status", Value::Null).await.ok();
    let session_id = status.as_ref().map(|s| s["tuning"]["session_id"].clone()).filter(|v| !v.is_null());
    let session = match session_id {
        Some(id) => ctx.link.call("session.show", json!({"session_id": id})).await.ok(),
        None => None,
    };
    let idle_enabled = match status {
        Some(_) => ctx.link.call("config.get", Value::Null).await.ok().and_then(|c| c["idle"]["enabled"].as_bool()),
        None => None,
    };
    let line = tray_text::status_line(status.as_ref(), session.as_ref());
    let tuning = status.as_ref().and_then(|s| s["tuning"]["state"].as_str().map(str::to_string));
    let guard = ctx.tray.lock().expect("tray lock");
    let Some(items) = guard.as_ref() else { return };
    let up = status.is_some();
    let _ = items.status.set_text(&line);
    let _ = items.start.set_enabled(up && tuning.as_deref() != Some("tuning"));
    let _ = items.pause.set_enabled(up && matches!(tuning.as_deref(), Some("tuning")));
    let _ = items.only_idle.set_enabled(idle_enabled.is_some());
    if let Some(on) = idle_enabled {
        let _ = items.only_idle.set_checked(on);
    }
    let _ = items.daemon.set_text(if up { "Stop daemon" } else { "Start daemon" });
    let _ = items.daemon.set_enabled(true);
    if let Some(tray) = app.tray_by_id("tilewise") {
        let _ = tray.set_tooltip(Some(format!("tilewise — {line}")));
    }
}
