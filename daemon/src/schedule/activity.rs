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

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

/// How hot the machine runs, in the four levels macOS's `ProcessInfo.thermalState` uses.
/// `Unknown` means the platform told us nothing (not "fine").
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Thermal {
    Nominal,
    Fair,
    Serious,
    Critical,
    Unknown,
}

impl Thermal {
    pub fn as_str(self) -> &'static str {
        match self {
            Thermal::Nominal => "nominal",
            Thermal::Fair => "fair",
            Thermal::Serious => "serious",
            Thermal::Critical => "critical",
            Thermal::Unknown => "unknown",
        }
    }

    /// The hotter of two readings; `Unknown` only when both are unknown.
    pub fn worst(self, other: Thermal) -> Thermal {
        match (self, other) {
            (Thermal::Unknown, o) => o,
            (s, Thermal::Unknown) => s,
            (s, o) => s.max(o),
        }
    }
}

/// One reading of everything the gates look at.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Activity {
    /// Time since the person last touched keyboard, mouse or trackpad.
    #[serde(serialize_with = "ser_secs")]
    pub user_idle: Duration,
    pub on_ac_power: bool,
    /// Battery charge in percent, when there is a battery.
    pub battery_percent: Option<u8>,
    pub low_power_mode: bool,
    pub thermal: Thermal,
    /// One-minute load average of the whole machine.
    pub load_1m: f64,
    /// Which source produced this reading (e.g. "file", "macos", "linux-logind").
    pub source: &'static str,
}

fn ser_secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

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

// ------------------------------------------------------------------------------------------------
// File-driven source
// ------------------------------------------------------------------------------------------------

/// The JSON document a [`FileSource`] reads. Every field is optional; missing ones take the
/// "machine is free" value so a test states only what it changes, e.g. `{"user_idle_s": 0}`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ActivityFile {
    /// Idle seconds at the moment the file was written; the source adds the time since the
    /// file's modification, so idle time grows by itself as it does on a real machine.
    #[serde(default = "ActivityFile::default_idle")]
    pub user_idle_s: f64,
    #[serde(default = "yes")]
    pub on_ac_power: bool,
    #[serde(default)]
    pub battery_percent: Option<u8>,
    #[serde(default)]
    pub low_power_mode: bool,
    #[serde(default = "ActivityFile::default_thermal")]
    pub thermal: Thermal,
    #[serde(default)]
    pub load_1m: f64,
}

fn yes() -> bool {
    true
}

impl ActivityFile {
    fn default_idle() -> f64 {
        3600.0
    }
    fn default_thermal() -> Thermal {
        Thermal::Nominal
    }

    /// Writes the file atomically (temp file + rename), so a reader never sees half a document.
    pub fn write_to(&self, path: &Path) -> std::io::Result<()> {
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(self).expect("serializable"))?;
        std::fs::rename(&tmp, path)
    }
}

impl Default for ActivityFile {
    fn default() -> Self {
        serde_json::from_str("{}").expect("all fields have defaults")
    }
}

/// Reads activity from a JSON file ([`ActivityFile`]) and watches it with `notify`, signalling
/// [`ActivitySource::changes`] on every edit. A malformed file is an error for that sample (the
/// scheduler then blocks tuning with the error as the reason), never a crash.
pub struct FileSource {
    path: PathBuf,
    changed: Arc<Notify>,
    // Kept alive for as long as the source lives; dropping it stops the watch.
    _watcher: Mutex<Option<notify::RecommendedWatcher>>,
}

impl FileSource {
    pub fn new(path: impl Into<PathBuf>) -> Result<Self, ActivityError> {
        use notify::Watcher;
        let path: PathBuf = path.into();
        let changed = Arc::new(Notify::new());
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_path_buf();
        let file_name = path.file_name().map(|n| n.to_os_string());
        let signal = changed.clone();
        // Watch the directory, not the file: editors and our own atomic writes replace the file.
        let mut watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
            if let Ok(ev) = ev {
                // Our own reads show up as access events; only changes matter (else: busy loop).
                if matches!(ev.kind, notify::EventKind::Access(_)) {
                    return;
                }
                if ev.paths.iter().any(|p| p.file_name().map(|n| n.to_os_string()) == file_name) {
                    signal.notify_one();
                }
            }
        })
        .map_err(|e| ActivityError::File { path: dir.clone(), message: e.to_string() })?;
        watcher
            .watch(&dir, notify::RecursiveMode::NonRecursive)
            .map_err(|e| ActivityError::File { path: dir.clone(), message: e.to_string() })?;
        Ok(FileSource { path, changed, _watcher: Mutex::new(Some(watcher)) })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl ActivitySource for FileSource {
    fn sample(&self) -> Result<Activity, ActivityError> {
        let file_err = |m: String| ActivityError::File { path: self.path.clone(), message: m };
        let text = std::fs::read_to_string(&self.path).map_err(|e| file_err(e.to_string()))?;
        let doc: ActivityFile = serde_json::from_str(&text).map_err(|e| file_err(e.to_string()))?;
        if !(doc.user_idle_s.is_finite() && doc.user_idle_s >= 0.0) {
            return Err(file_err(format!("user_idle_s must be >= 0, got {}", doc.user_idle_s)));
        }
        let age = std::fs::metadata(&self.path)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| SystemTime::now().duration_since(t).ok())
            .unwrap_or_default();
        Ok(Activity {
            user_idle: Duration::from_secs_f64(doc.user_idle_s) + age,
            on_ac_power: doc.on_ac_power,
            battery_percent: doc.battery_percent,
            low_power_mode: doc.low_power_mode,
            thermal: doc.thermal,
            load_1m: doc.load_1m,
            source: "file",
        })
    }

    fn changes(&self) -> Option<Arc<Notify>> {
        Some(self.changed.clone())
    }

    fn name(&self) -> &'static str {
        "file"
    }
}

// ------------------------------------------------------------------------------------------------
// macOS: pure parsers (compiled and tested everywhere) + a thin command runner
// ------------------------------------------------------------------------------------------------

/// Parsers for the output of macOS's `ioreg` and `pmset`. Formats: see
/// `daemon/tests/fixtures/schedule/README.md` for the recorded outputs and where they come from.
pub mod macos {
    use super::{ActivityError, Thermal};
    use std::time::Duration;

    /// `ioreg -c IOHIDSystem`: the `HIDIdleTime` (nanoseconds since the last HID event) of the
    /// `IOHIDSystem` entry. Other entries in the tree (user clients, drivers) are ignored.
    pub fn parse_hid_idle(text: &str) -> Result<Duration, ActivityError> {
        let mut in_hid_system = false;
        for line in text.lines() {
            let content = line.trim_start_matches([' ', '|', '\t']);
            if let Some(entry) = content.strip_prefix("+-o ") {
                // "+-o IOHIDSystem  <class IOHIDSystem, id 0x..., ...>"
                in_hid_system = entry.contains("<class IOHIDSystem,") || entry.contains("<class IOHIDSystem>");
                continue;
            }
            if !in_hid_system {
                continue;
            }
            if let Some(rest) = content.strip_prefix("\"HIDIdleTime\"") {
                let value = rest.trim_start().trim_start_matches('=').trim();
                let ns: u64 = value
                    .parse()
                    .map_err(|_| ActivityError::parse("ioreg HIDIdleTime", format!("not a number: {value:?}")))?;
                return Ok(Duration::from_nanos(ns));
            }
        }
        Err(ActivityError::parse("ioreg HIDIdleTime", "no IOHIDSystem entry with HIDIdleTime"))
    }

    /// What `pmset -g batt` says about the power source.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Battery {
        pub on_ac_power: bool,
        /// None on machines without a battery (desktops print only the first line).
        pub percent: Option<u8>,
        /// "charging", "discharging", "charged", "AC attached", "finishing charge", ...
        pub state: Option<String>,
    }

    /// `pmset -g batt`: "Now drawing from 'AC Power'" / 'Battery Power' / 'UPS Power', then one
    /// line per battery: " -InternalBattery-0 (id=…)\t95%; discharging; 3:06 remaining present: true".
    pub fn parse_pmset_batt(text: &str) -> Result<Battery, ActivityError> {
        let mut source = None;
        let mut percent = None;
        let mut state = None;
        for line in text.lines() {
            if let Some(rest) = line.trim().strip_prefix("Now drawing from '") {
                source = rest.split('\'').next().map(str::to_owned);
            } else if line.trim_start().starts_with("-InternalBattery") && percent.is_none() {
                // Fields after the tab: "95%; discharging; 3:06 remaining present: true"
                let fields = line.split_once('\t').map(|(_, f)| f).unwrap_or(line);
                let mut parts = fields.split(';').map(str::trim);
                if let Some(p) = parts.next().and_then(|p| p.strip_suffix('%')) {
                    percent = p.trim().parse::<u8>().ok();
                }
                state = parts.next().map(str::to_owned);
            }
        }
        let source =
            source.ok_or_else(|| ActivityError::parse("pmset -g batt", "no \"Now drawing from\" line"))?;
        Ok(Battery { on_ac_power: source != "Battery Power", percent, state })
    }

    /// `pmset -g`: the "Currently in use" settings. Low Power Mode appears as `lowpowermode 1`
    /// (macOS 12–13) or `powermode 1` (newer: 0 automatic, 1 low power, 2 high power). A machine
    /// that prints neither has no Low Power Mode.
    pub fn parse_pmset_low_power(text: &str) -> bool {
        text.lines().any(|line| {
            let mut words = line.split_whitespace();
            matches!(
                (words.next(), words.next()),
                (Some("lowpowermode") | Some("powermode"), Some("1"))
            )
        })
    }

    /// `pmset -g therm`: the thermal warning level if one was recorded
    /// ("Thermal Warning Level = N": 0 normal, 5/100 danger/warning, 10/110 crisis/trap), and the
    /// CPU speed limit (`CPU_Speed_Limit = N` percent; below 100 means the CPU is throttled). The
    /// worse of the two wins. "No thermal warning level has been recorded" alone is nominal: that
    /// is what an Apple-silicon Mac prints when nothing is wrong.
    pub fn parse_pmset_therm(text: &str) -> Thermal {
        let mut thermal = Thermal::Unknown;
        for line in text.lines() {
            let line = line.trim();
            if line.starts_with("Note: No thermal warning level has been recorded") {
                thermal = thermal.worst(Thermal::Nominal);
            } else if let Some(level) = value_after(line, "Warning Level") {
                thermal = thermal.worst(match level {
                    0 => Thermal::Nominal,
                    5 | 100 => Thermal::Serious,
                    10 | 110 => Thermal::Critical,
                    _ => Thermal::Fair,
                });
            } else if let Some(limit) = value_after(line, "CPU_Speed_Limit") {
                thermal = thermal.worst(match limit {
                    100.. => Thermal::Nominal,
                    70..=99 => Thermal::Fair,
                    40..=69 => Thermal::Serious,
                    _ => Thermal::Critical,
                });
            }
        }
        thermal
    }

    /// `"...<key> = <integer>"` anywhere in the line (pmset pads with tabs and spaces).
    fn value_after(line: &str, key: &str) -> Option<i64> {
        let at = line.find(key)?;
        let rest = line[at + key.len()..].trim_start().strip_prefix('=')?;
        rest.trim().parse().ok()
    }
}

/// The slowly changing part of a reading (power, Low Power Mode, thermal state). Sources whose
/// readings cost a command each re-read it at most every [`SlowFields::MAX_AGE`], so the fast
/// sampling needed while a measurement runs (a few per second) costs one command, not four.
#[derive(Debug, Clone, PartialEq)]
pub struct SlowFields {
    pub at: Instant,
    pub on_ac_power: bool,
    pub battery_percent: Option<u8>,
    pub low_power_mode: bool,
    pub thermal: Thermal,
}

impl SlowFields {
    pub const MAX_AGE: Duration = Duration::from_secs(5);

    /// The cached value if it is recent enough, else a fresh one from `read` (which is cached).
    pub fn get_or_refresh(
        cache: &Mutex<Option<SlowFields>>,
        read: impl FnOnce() -> Result<SlowFields, ActivityError>,
    ) -> Result<SlowFields, ActivityError> {
        let mut c = cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(v) = c.as_ref().filter(|v| v.at.elapsed() < Self::MAX_AGE) {
            return Ok(v.clone());
        }
        let fresh = read()?;
        *c = Some(fresh.clone());
        Ok(fresh)
    }
}

#[cfg(target_os = "macos")]
pub use mac_source::MacSource;

/// The commands behind the macOS parsers. Thin on purpose: it cannot be compiled on Linux.
#[cfg(target_os = "macos")]
mod mac_source {
    use super::*;

    /// HIDIdleTime on every sample; power and thermal state through [`SlowFields`].
    #[derive(Default)]
    pub struct MacSource {
        slow: Mutex<Option<SlowFields>>,
    }

    fn run(program: &str, args: &[&str]) -> Result<String, ActivityError> {
        let command = format!("{program} {}", args.join(" "));
        let out = std::process::Command::new(program)
            .args(args)
            .output()
            .map_err(|e| ActivityError::Command { command: command.clone(), message: e.to_string() })?;
        if !out.status.success() {
            let message = format!("{}: {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
            return Err(ActivityError::Command { command, message });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    impl ActivitySource for MacSource {
        fn sample(&self) -> Result<Activity, ActivityError> {
            let user_idle = macos::parse_hid_idle(&run("/usr/sbin/ioreg", &["-c", "IOHIDSystem"])?)?;
            let slow = SlowFields::get_or_refresh(&self.slow, || {
                let batt = macos::parse_pmset_batt(&run("/usr/bin/pmset", &["-g", "batt"])?)?;
                Ok(SlowFields {
                    at: Instant::now(),
                    on_ac_power: batt.on_ac_power,
                    battery_percent: batt.percent,
                    low_power_mode: macos::parse_pmset_low_power(&run("/usr/bin/pmset", &["-g"])?),
                    thermal: macos::parse_pmset_therm(&run("/usr/bin/pmset", &["-g", "therm"])?),
                })
            })?;
            Ok(Activity {
                user_idle,
                on_ac_power: slow.on_ac_power,
                battery_percent: slow.battery_percent,
                low_power_mode: slow.low_power_mode,
                thermal: slow.thermal,
                load_1m: load_1m(),
                source: "macos",
            })
        }

        fn name(&self) -> &'static str {
            "macos"
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Linux
// ------------------------------------------------------------------------------------------------

/// Parsers for what Linux exposes (`loginctl`, `/proc/interrupts`, `/sys/class/power_supply`,
/// thermal zones). Pure functions; [`LinuxSource`] feeds them.
pub mod linux {
    use super::{ActivityError, Thermal};
    use std::collections::BTreeMap;
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    /// `loginctl show-session <id> -p IdleHint -p IdleSinceHint -p Type` (KEY=VALUE lines).
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct LogindIdle {
        pub idle_hint: bool,
        /// Microseconds since the epoch at which IdleHint last changed (0 = never set).
        pub idle_since_us: u64,
        pub session_type: String,
    }

    pub fn parse_loginctl_session(text: &str) -> Result<LogindIdle, ActivityError> {
        let mut idle_hint = None;
        let mut idle_since_us = 0;
        let mut session_type = String::new();
        for line in text.lines() {
            match line.split_once('=') {
                Some(("IdleHint", v)) => idle_hint = Some(v.trim() == "yes"),
                Some(("IdleSinceHint", v)) => idle_since_us = v.trim().parse().unwrap_or(0),
                Some(("Type", v)) => session_type = v.trim().to_owned(),
                _ => {}
            }
        }
        let idle_hint = idle_hint.ok_or_else(|| ActivityError::parse("loginctl show-session", "no IdleHint"))?;
        Ok(LogindIdle { idle_hint, idle_since_us, session_type })
    }

    impl LogindIdle {
        /// A graphical session whose desktop manages IdleHint (GNOME and KDE set it after their
        /// own idle delay). Others (tty, or a desktop that never set it) say nothing useful.
        pub fn is_managed_graphical(&self) -> bool {
            matches!(self.session_type.as_str(), "x11" | "wayland" | "mir") && self.idle_since_us > 0
        }

        /// Idle time as logind sees it: zero while IdleHint is "no".
        pub fn user_idle(&self, now: SystemTime) -> Duration {
            if !self.idle_hint {
                return Duration::ZERO;
            }
            let since = UNIX_EPOCH + Duration::from_micros(self.idle_since_us);
            now.duration_since(since).unwrap_or_default()
        }
    }

    /// `loginctl show-user <uid> -p Display`: the user's graphical session id, if any.
    pub fn parse_loginctl_display(text: &str) -> Option<String> {
        text.lines()
            .find_map(|l| l.strip_prefix("Display="))
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
    }

    /// `/proc/interrupts`: the total count of each interrupt line driven by a human input device
    /// (PS/2 keyboard and touchpad `i8042`, I²C-HID touchpads and keyboards). A change between
    /// two readings means someone typed or moved the pointer. USB HID shares its interrupt with
    /// every USB device, so it is not counted (terminal access times cover typing there).
    pub fn parse_input_interrupts(text: &str) -> BTreeMap<String, u64> {
        let mut lines = text.lines();
        let cpus = lines.next().map(|h| h.split_whitespace().count()).unwrap_or(0);
        let mut out = BTreeMap::new();
        for line in lines {
            let Some((irq, rest)) = line.split_once(':') else { continue };
            let fields: Vec<&str> = rest.split_whitespace().collect();
            if fields.len() <= cpus {
                continue;
            }
            let name = fields[cpus..].join(" ");
            let lname = name.to_ascii_lowercase();
            if !(lname.contains("i8042") || lname.contains("i2c-hid") || lname.contains("hid-over-i2c")) {
                continue;
            }
            let total: u64 = fields[..cpus].iter().filter_map(|c| c.parse::<u64>().ok()).sum();
            out.insert(format!("{}:{}", irq.trim(), name), total);
        }
        out
    }

    /// One entry of `/sys/class/power_supply/<name>/`.
    #[derive(Debug, Clone, PartialEq, Eq, Default)]
    pub struct PowerSupply {
        pub name: String,
        /// `type`: "Mains", "Battery", "USB", "UPS", ...
        pub kind: String,
        /// `online` (mains, USB): "1" when connected.
        pub online: Option<bool>,
        /// `status` (batteries): "Charging", "Discharging", "Full", "Not charging", "Unknown".
        pub status: Option<String>,
        pub capacity: Option<u8>,
    }

    /// On AC unless a battery is discharging with no mains/USB supply online. No supplies at all
    /// (desktops, servers, VMs) means on AC.
    pub fn on_ac_power(supplies: &[PowerSupply]) -> bool {
        let external_online = supplies
            .iter()
            .any(|s| matches!(s.kind.as_str(), "Mains" | "USB" | "UPS") && s.online == Some(true));
        if external_online {
            return true;
        }
        let discharging = supplies
            .iter()
            .any(|s| s.kind == "Battery" && s.status.as_deref() == Some("Discharging"));
        !discharging
    }

    /// `/sys/firmware/acpi/platform_profile`: "low-power" (or "quiet") is Linux's Low Power Mode.
    pub fn parse_platform_profile(text: &str) -> bool {
        matches!(text.trim(), "low-power" | "quiet")
    }

    /// One thermal zone: its temperature and trip points (`trip_point_N_type`, `_temp`), all in
    /// millidegrees Celsius as sysfs gives them.
    #[derive(Debug, Clone, PartialEq, Eq, Default)]
    pub struct ThermalZone {
        pub temp_mc: i64,
        pub trips: Vec<(String, i64)>,
    }

    /// Nominal below every trip point; Fair at an "active" (fan) trip; Serious at "passive"
    /// (the kernel throttles); Critical at "hot"/"critical". No zones: Unknown.
    pub fn classify_thermal(zones: &[ThermalZone]) -> Thermal {
        let mut out = Thermal::Unknown;
        for z in zones {
            let mut level = Thermal::Nominal;
            for (kind, temp) in &z.trips {
                if *temp <= 0 || z.temp_mc < *temp {
                    continue;
                }
                let reached = match kind.as_str() {
                    "active" => Thermal::Fair,
                    "passive" => Thermal::Serious,
                    "hot" | "critical" => Thermal::Critical,
                    _ => Thermal::Nominal,
                };
                level = level.max(reached);
            }
            out = out.worst(level);
        }
        out
    }
}

/// How the Linux source decided the idle time (reported as [`Activity::source`]).
const LINUX_LOGIND: &str = "linux-logind";
const LINUX_INPUT: &str = "linux-input";
const LINUX_HEADLESS: &str = "linux-headless";

/// Linux activity. Idle time, in order of preference:
/// 1. logind's IdleHint of the user's graphical session, when the desktop manages it;
/// 2. otherwise the latest input: access times of the user's terminals (`/dev/pts/*`, `/dev/tty*`,
///    the same signal `w` shows as IDLE) and changes in input-device interrupt counts
///    (`/proc/interrupts`, see [`linux::parse_input_interrupts`]). `/dev/input/event*` times are
///    not used: evdev does not update them on reads, so they say nothing about activity.
/// 3. a machine with neither a graphical session, nor a terminal, nor an input interrupt line is
///    headless: nobody can be typing at it, so it is idle (since boot).
pub struct LinuxSource {
    root: PathBuf,
    state: Mutex<InputState>,
    /// The graphical session id from `loginctl show-user` (re-asked every minute: logins change rarely).
    session: Mutex<Option<(Instant, Option<String>)>>,
}

#[derive(Default)]
struct InputState {
    counts: std::collections::BTreeMap<String, u64>,
    last_change: Option<Instant>,
}

impl LinuxSource {
    pub fn new() -> Self {
        Self::with_root("/")
    }

    /// Reads `<root>/sys`, `<root>/proc`, `<root>/dev` (tests point this at a recorded tree).
    pub fn with_root(root: impl Into<PathBuf>) -> Self {
        LinuxSource { root: root.into(), state: Mutex::new(InputState::default()), session: Mutex::new(None) }
    }

    fn read(&self, rel: &str) -> Option<String> {
        std::fs::read_to_string(self.root.join(rel)).ok()
    }

    fn power_supplies(&self) -> Vec<linux::PowerSupply> {
        let dir = self.root.join("sys/class/power_supply");
        let Ok(entries) = std::fs::read_dir(&dir) else { return Vec::new() };
        let mut out = Vec::new();
        for e in entries.flatten() {
            let p = e.path();
            let get = |f: &str| std::fs::read_to_string(p.join(f)).ok().map(|s| s.trim().to_owned());
            out.push(linux::PowerSupply {
                name: e.file_name().to_string_lossy().into_owned(),
                kind: get("type").unwrap_or_default(),
                online: get("online").map(|v| v == "1"),
                status: get("status"),
                capacity: get("capacity").and_then(|v| v.parse().ok()),
            });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    fn thermal_zones(&self) -> Vec<linux::ThermalZone> {
        let dir = self.root.join("sys/class/thermal");
        let Ok(entries) = std::fs::read_dir(&dir) else { return Vec::new() };
        let mut zones = Vec::new();
        for e in entries.flatten() {
            if !e.file_name().to_string_lossy().starts_with("thermal_zone") {
                continue;
            }
            let p = e.path();
            let num = |f: &str| std::fs::read_to_string(p.join(f)).ok().and_then(|s| s.trim().parse::<i64>().ok());
            let Some(temp_mc) = num("temp") else { continue };
            let mut trips = Vec::new();
            for i in 0..16 {
                let (Some(kind), Some(t)) = (
                    std::fs::read_to_string(p.join(format!("trip_point_{i}_type"))).ok(),
                    num(&format!("trip_point_{i}_temp")),
                ) else {
                    break;
                };
                trips.push((kind.trim().to_owned(), t));
            }
            zones.push(linux::ThermalZone { temp_mc, trips });
        }
        zones
    }

    /// logind's view, when there is a managed graphical session.
    fn logind_idle(&self) -> Option<Duration> {
        if self.root != Path::new("/") {
            return None; // a recorded tree has no logind
        }
        let session = {
            let mut cached = self.session.lock().unwrap_or_else(|p| p.into_inner());
            match cached.as_ref().filter(|(at, _)| at.elapsed() < Duration::from_secs(60)) {
                Some((_, s)) => s.clone(),
                None => {
                    let uid = unsafe { libc::getuid() }.to_string();
                    let s = command_output("loginctl", &["show-user", &uid, "-p", "Display"])
                        .and_then(|t| linux::parse_loginctl_display(&t));
                    *cached = Some((Instant::now(), s.clone()));
                    s
                }
            }
        }?;
        let text = command_output(
            "loginctl",
            &["show-session", &session, "-p", "IdleHint", "-p", "IdleSinceHint", "-p", "Type"],
        )?;
        let idle = linux::parse_loginctl_session(&text).ok()?;
        idle.is_managed_graphical().then(|| idle.user_idle(SystemTime::now()))
    }

    /// Time since the newest access to one of this user's terminals, if it has any.
    fn terminal_idle(&self) -> Option<Duration> {
        use std::os::unix::fs::MetadataExt;
        let uid = unsafe { libc::getuid() };
        let mut newest: Option<SystemTime> = None;
        for dir in ["dev/pts", "dev"] {
            let Ok(entries) = std::fs::read_dir(self.root.join(dir)) else { continue };
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let is_tty = dir == "dev/pts" && name.chars().all(|c| c.is_ascii_digit())
                    || dir == "dev" && name.starts_with("tty") && name[3..].chars().all(|c| c.is_ascii_digit()) && name.len() > 3;
                if !is_tty {
                    continue;
                }
                let Ok(meta) = e.metadata() else { continue };
                if meta.uid() != uid {
                    continue;
                }
                if let Ok(t) = meta.accessed() {
                    newest = Some(newest.map_or(t, |n| n.max(t)));
                }
            }
        }
        newest.map(|t| SystemTime::now().duration_since(t).unwrap_or_default())
    }

    /// Time since input-device interrupt counts last changed (None: no such devices).
    fn interrupt_idle(&self) -> Option<Duration> {
        let counts = linux::parse_input_interrupts(&self.read("proc/interrupts")?);
        if counts.is_empty() {
            return None;
        }
        let mut st = self.state.lock().unwrap();
        let now = Instant::now();
        if st.last_change.is_none() || st.counts != counts {
            // First reading counts as activity: we cannot know how long it has been quiet.
            st.counts = counts;
            st.last_change = Some(now);
        }
        Some(now - st.last_change.unwrap())
    }
}

impl Default for LinuxSource {
    fn default() -> Self {
        Self::new()
    }
}

fn command_output(program: &str, args: &[&str]) -> Option<String> {
    let out = std::process::Command::new(program).args(args).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

impl ActivitySource for LinuxSource {
    fn sample(&self) -> Result<Activity, ActivityError> {
        let (user_idle, source) = if let Some(idle) = self.logind_idle() {
            (idle, LINUX_LOGIND)
        } else {
            match (self.terminal_idle(), self.interrupt_idle()) {
                (None, None) => (Duration::from_secs(sysinfo::System::uptime().unwrap_or(0)), LINUX_HEADLESS),
                (a, b) => (a.unwrap_or(Duration::MAX).min(b.unwrap_or(Duration::MAX)), LINUX_INPUT),
            }
        };
        let supplies = self.power_supplies();
        let battery_percent = supplies.iter().find(|s| s.kind == "Battery").and_then(|s| s.capacity);
        Ok(Activity {
            user_idle,
            on_ac_power: linux::on_ac_power(&supplies),
            battery_percent,
            low_power_mode: self
                .read("sys/firmware/acpi/platform_profile")
                .is_some_and(|t| linux::parse_platform_profile(&t)),
            thermal: linux::classify_thermal(&self.thermal_zones()),
            load_1m: load_1m(),
            source,
        })
    }

    fn name(&self) -> &'static str {
        "linux"
    }
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
