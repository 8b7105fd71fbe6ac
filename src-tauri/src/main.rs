//! `tilewise-app`: the menu-bar app. See lib.rs.
#![cfg_attr(not(debug_assertions), windows_subsystem = "windows")]

use clap::Parser;
use tilewise::paths::Paths;
use tilewise_app::{app, link::DaemonLink};

/// tilewise menu-bar app: tray menu and dashboard for the tilewised daemon.
#[derive(Parser)]
#[command(version)]
struct Cli {
    /// Start in the menu bar without opening the dashboard (used by the login item).
    #[arg(long)]
    background: bool,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let paths = Paths::from_env()?;
    let link = DaemonLink::new(paths, concat!("tilewise-app/", env!("CARGO_PKG_VERSION")));
    app::run(link, app::Options { background: cli.background })
}
