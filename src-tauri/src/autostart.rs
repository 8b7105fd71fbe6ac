//! "Start at login": whether `tilewised` runs at login, through `tilewise::service` (the same code as
//! `tilewise service install|uninstall|status`: a launchd LaunchAgent on macOS, a systemd user unit on
//! Linux). Opt-in: nothing is installed until the person ticks the menu item, and the tick shows what
//! the service manager reports, re-read after every change.

use serde::Serialize;
use std::path::Path;
use tilewise::service::{Manager, ServiceSpec, ServiceStatus, SystemRunner};

/// What the menu item and the dashboard show.
#[derive(Debug, Clone, Serialize)]
pub struct LoginState {
    /// The service file is installed (the daemon starts at login).
    pub enabled: bool,
    /// The full status from the service manager, when it could be read.
    pub status: Option<ServiceStatus>,
    /// Why the state is unknown or why the last change failed.
    pub error: Option<String>,
}

fn manager_and_spec(logs_dir: &Path) -> Result<(Manager, ServiceSpec), String> {
    let manager = Manager::for_this_platform().map_err(|e| e.to_string())?;
    // tilewised next to this app's executable, with TILEWISE_HOME etc. passed through.
    let spec = ServiceSpec::for_this_install(logs_dir.to_path_buf()).map_err(|e| e.to_string())?;
    Ok((manager, spec))
}

/// Reads the state (runs `launchctl list` / `systemctl --user show`; call it off the UI thread).
pub fn read(logs_dir: &Path) -> LoginState {
    match manager_and_spec(logs_dir) {
        Ok((manager, spec)) => {
            let status = manager.status(&spec, &SystemRunner);
            LoginState { enabled: status.installed, status: Some(status), error: None }
        }
        Err(error) => LoginState { enabled: false, status: None, error: Some(error) },
    }
}

/// Installs or removes the login service, then reads the state back.
pub fn set(logs_dir: &Path, enabled: bool) -> LoginState {
    let result = manager_and_spec(logs_dir).and_then(|(manager, spec)| {
        if enabled {
            manager.install(&spec, &SystemRunner).map(drop).map_err(|e| e.to_string())
        } else {
            manager.uninstall(&SystemRunner).map(drop).map_err(|e| e.to_string())
        }
    });
    let mut state = read(logs_dir);
    if let Err(e) = result {
        state.error = Some(e);
    }
    state
}
