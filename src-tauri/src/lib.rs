//! tilewise's menu-bar app: a tray icon whose menu says what the daemon is doing and controls it, and
//! a dashboard window (../ui/src). It talks to `tilewised` only through `tilewise::ipc::client`.
//!
//! - [`link`]: the connection (calls + the event stream), reconnecting when the daemon restarts.
//! - [`api`]: the commands the dashboard may invoke; shared with the browser-test bridge.
//! - [`tray_text`], [`tray_support`]: the tray's words and whether a tray can exist (pure, tested).
//! - [`autostart`]: "Start at login" through `tilewise::service`.
//! - [`app`]: the Tauri wiring (window, tray, single instance, event forwarding).

pub mod api;
pub mod app;
pub mod autostart;
pub mod link;
pub mod tray_support;
pub mod tray_text;
