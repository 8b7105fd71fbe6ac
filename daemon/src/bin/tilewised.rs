//! `tilewised`: the resident daemon. Serves the local socket until SIGTERM/SIGINT or a
//! `daemon.shutdown` request, then removes the socket, closes the database and releases the lock.
//! Logs go to `<logs dir>/tilewised.<date>.log` (one file a day, the last 14 kept) and to stderr.

use clap::Parser;
use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::Arc;
use tilewise::config::Config;
use tilewise::ipc::server::{DaemonState, Server};
use tilewise::paths::Paths;
use tracing_subscriber::{filter::filter_fn, fmt, prelude::*, EnvFilter};

#[derive(Parser, Debug)]
#[command(name = "tilewised", version, about = "tilewise daemon: finds and serves a proven-faster matmul policy for MLX-LM")]
struct Args {
    /// Run in the foreground (the only mode: `tilewise daemon start` detaches it; launchd/systemd supervise it).
    #[arg(long, default_value_t = true)]
    foreground: bool,
    /// Log filter: error, warn, info, debug, trace, or a tracing directive such as `tilewise=debug`.
    #[arg(long, default_value = "info", env = "TILEWISE_LOG")]
    log_level: String,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let paths = match Paths::from_env() {
        Ok(p) => p,
        Err(e) => return fail(&e),
    };
    if let Err(e) = paths.ensure_dirs() {
        return fail(&e);
    }
    let _log_guard = match init_logging(&paths, &args.log_level) {
        Ok(g) => g,
        Err(e) => return fail(&e),
    };
    let config = match Config::load(&paths.config_file) {
        Ok(c) => c,
        Err(e) => return fail(&e),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => return fail(&e),
    };
    runtime.block_on(async move {
        let mut state = match DaemonState::open(paths, config) {
            Ok(s) => s,
            Err(e) => return fail(&e),
        };
        // Idle/power gates, live config reload, model-directory watching (schedule::daemon).
        let schedule = match tilewise::schedule::daemon::ScheduleServices::for_daemon(&state) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!("idle gates and config reload are off: {e}");
                None
            }
        };
        // Tuning sessions (session.rs); a session a previous daemon left running resumes.
        let mut manager = tilewise::session::SessionManager::from_state(&state);
        if let Some(s) = &schedule {
            manager = manager.with_gate(s.decisions());
        }
        let tuning = Arc::new(manager);
        state.tuning = Some(tuning.clone());
        let state = Arc::new(state);
        if let Some(s) = &schedule {
            s.attach(&state);
            // Tune by itself while the machine is free (schedule::autostart).
            tilewise::schedule::autostart::spawn(tilewise::schedule::autostart::AutoStartDeps {
                tuning: tuning.clone(),
                store: state.store.clone(),
                events: state.events.clone(),
                decisions: s.decisions(),
                config: s.config(),
                device: state.device_fingerprint.clone(),
                backend: state.device.backend.as_str().to_string(),
            });
        }
        // The store's only use-driven growth: one event per MLX start (events.rs).
        tilewise::events::spawn_hello_retention(state.store.clone());
        // Policy fetches are noted in memory and written every 2 s; fetches and usage are kept 30 days.
        tilewise::usage::spawn_upkeep(state.fetches.clone(), state.store.clone());
        let server = match Server::bind(state) {
            Ok(s) => s,
            Err(e) => return fail(&e),
        };
        // Proven policies shared through a folder (docs/sharing.md).
        let share_dir = server.state().config.read().unwrap_or_else(|p| p.into_inner()).share.dir.clone();
        if let Some(dir) = share_dir {
            match tilewise::share::folder::spawn(server.state().clone(), dir.clone()) {
                Ok(()) => tracing::info!(dir = %dir.display(), "sharing proven policies through this folder"),
                Err(e) => tracing::warn!("sharing is off: {e}"),
            }
        }
        tokio::spawn(async move {
            if let Err(e) = tuning.resume_interrupted().await {
                tracing::warn!("could not resume the interrupted session: {e}");
            }
        });
        server.run(shutdown_signal()).await;
        ExitCode::SUCCESS
    })
}

/// Target of the log line that records a startup failure in the log file only: the terminal gets
/// the plain message once.
const STARTUP_FAILURE: &str = "tilewised::startup_failure";

/// Prints a startup failure for a person and logs it; exit code 1.
fn fail(e: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("tilewised: {e}");
    tracing::error!(target: STARTUP_FAILURE, "{e}");
    ExitCode::FAILURE
}

/// Daily log files kept.
const LOG_DAYS: usize = 14;

fn init_logging(paths: &Paths, level: &str) -> Result<tracing_appender::non_blocking::WorkerGuard, String> {
    let filter = EnvFilter::try_new(level).map_err(|e| format!("--log-level {level:?}: {e}"))?;
    // A resident daemon's log must not grow for ever: one file a day, the last LOG_DAYS kept.
    let file = tracing_appender::rolling::RollingFileAppender::builder()
        .rotation(tracing_appender::rolling::Rotation::DAILY)
        .filename_prefix("tilewised")
        .filename_suffix("log")
        .max_log_files(LOG_DAYS)
        .build(&paths.logs_dir)
        .map_err(|e| format!("log file in {}: {e}", paths.logs_dir.display()))?;
    let (file, guard) = tracing_appender::non_blocking(file);
    tracing_subscriber::registry()
        .with(filter)
        .with(
            fmt::layer()
                .with_ansi(std::io::stderr().is_terminal())
                .with_writer(std::io::stderr)
                .with_filter(filter_fn(|m| m.target() != STARTUP_FAILURE)),
        )
        .with(fmt::layer().with_ansi(false).with_writer(file))
        .try_init()
        .map_err(|e| e.to_string())?;
    Ok(guard)
}

/// Completes on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        tracing::error!("cannot install signal handlers; stop the daemon with `tilewise daemon stop`");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM"),
        _ = int.recv() => tracing::info!("SIGINT"),
    }
}
