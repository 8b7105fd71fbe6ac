//! Where the scheduler learns whether the person is using the machine, and on what power.
//!
//! One trait, [`ActivitySource`], gives an [`Activity`] snapshot. Sources:
//! - [`FileSource`]: a JSON file, reloaded on change (tests, demos, and a manual override).
//! - `MacSource` (macOS only): runs `ioreg` and `pmset` and parses their output with the pure
//!   functions in [`macos`] (tested here on recorded fixtures, since this code cannot run on Linux).
//! - [`LinuxSource`]: logind's IdleHint where a desktop sets it, otherwise input activity
//!   (terminal access times and input-device interrupt counts), otherwise (headless) idle;
//!   `/sys/class/power_supply` for power, `platform_profile` for low-power mode, thermal zones.
//!
//! Every platform parser is a pure function over text so it can be tested anywhere.
//!
//! One file per source: `file.rs`, `macos.rs` (parsers everywhere, the source on macOS), `linux.rs`;
//! the platform's source is chosen by [`platform_source`], as `probe` chooses its prober.

mod file;
pub mod linux;
pub mod macos;

pub use file::{ActivityFile, FileSource};
pub use linux::LinuxSource;
#[cfg(target_os = "macos")]
pub use macos::MacSource;
pub use macos::SlowFields;

use std::path::PathBuf;
use std::sync::Arc;

pub use crate::gate::{Activity, Thermal};

use tokio::sync::Notify;

#[derive(Debug, thiserror::Error)]
pub enum ActivityError {
    #[error("{command}: {message}")]
    Command { command: String, message: String },
    #[error("cannot parse {what}: {message}")]
    Parse { what: &'static str, message: String },
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
}

impl ActivityError {
    fn parse(what: &'static str, message: impl Into<String>) -> Self {
        ActivityError::Parse { what, message: message.into() }
    }
}

/// A place that can say how active the machine is right now.
///
/// `sample` may block briefly (it can run a command); the scheduler calls it on a blocking thread.
pub trait ActivitySource: Send + Sync + 'static {
    fn sample(&self) -> Result<Activity, ActivityError>;

    /// Sources that learn about changes by themselves (a watched file) return a `Notify` that is
    /// signalled on every change, so the scheduler can react at once instead of polling.
    fn changes(&self) -> Option<Arc<Notify>> {
        None
    }

    fn name(&self) -> &'static str;
}

/// The load average through sysinfo (macOS and Linux alike); 0 where the platform has none.
pub fn load_1m() -> f64 {
    sysinfo::System::load_average().map(|l| l.one).unwrap_or(0.0)
}

/// The source for this platform (`TILEWISE_ACTIVITY_FILE` selects the file-driven source, which
/// tests and demos use to play "the person is away / back / on battery").
pub fn platform_source() -> Result<Arc<dyn ActivitySource>, ActivityError> {
    if let Some(path) = std::env::var_os("TILEWISE_ACTIVITY_FILE") {
        return Ok(Arc::new(FileSource::new(PathBuf::from(path))?));
    }
    #[cfg(target_os = "macos")]
    {
        Ok(Arc::new(MacSource::default()))
    }
    #[cfg(not(target_os = "macos"))]
    {
        Ok(Arc::new(LinuxSource::new()))
    }
}
