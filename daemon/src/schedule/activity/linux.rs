//! Parsers for what Linux exposes (`loginctl`, `/proc/interrupts`, `/sys/class/power_supply`,
//! thermal zones). Pure functions; [`LinuxSource`] feeds them.

use super::{load_1m, Activity, ActivityError, ActivitySource, Thermal};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;
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
    text.lines().find_map(|l| l.strip_prefix("Display=")).map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned)
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
    let external_online = supplies.iter().any(|s| matches!(s.kind.as_str(), "Mains" | "USB" | "UPS") && s.online == Some(true));
    if external_online {
        return true;
    }
    let discharging = supplies.iter().any(|s| s.kind == "Battery" && s.status.as_deref() == Some("Discharging"));
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

/// How the Linux source decided the idle time (reported as [`Activity::source`]).
const LINUX_LOGIND: &str = "linux-logind";
const LINUX_INPUT: &str = "linux-input";
const LINUX_HEADLESS: &str = "linux-headless";

/// Linux activity. Idle time, in order of preference:
/// 1. logind's IdleHint of the user's graphical session, when the desktop manages it;
/// 2. otherwise the latest input: access times of the user's terminals (`/dev/pts/*`, `/dev/tty*`,
///    the same signal `w` shows as IDLE) and changes in input-device interrupt counts
///    (`/proc/interrupts`, see [`parse_input_interrupts`]). `/dev/input/event*` times are
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

    fn power_supplies(&self) -> Vec<PowerSupply> {
        let dir = self.root.join("sys/class/power_supply");
        let Ok(entries) = std::fs::read_dir(&dir) else { return Vec::new() };
        let mut out = Vec::new();
        for e in entries.flatten() {
            let p = e.path();
            let get = |f: &str| std::fs::read_to_string(p.join(f)).ok().map(|s| s.trim().to_owned());
            out.push(PowerSupply {
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

    fn thermal_zones(&self) -> Vec<ThermalZone> {
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
                let (Some(kind), Some(t)) =
                    (std::fs::read_to_string(p.join(format!("trip_point_{i}_type"))).ok(), num(&format!("trip_point_{i}_temp")))
                else {
                    break;
                };
                trips.push((kind.trim().to_owned(), t));
            }
            zones.push(ThermalZone { temp_mc, trips });
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
                    let s = command_output("loginctl", &["show-user", &uid, "-p", "Display"]).and_then(|t| parse_loginctl_display(&t));
                    *cached = Some((Instant::now(), s.clone()));
                    s
                }
            }
        }?;
        let text = command_output("loginctl", &["show-session", &session, "-p", "IdleHint", "-p", "IdleSinceHint", "-p", "Type"])?;
        let idle = parse_loginctl_session(&text).ok()?;
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
        let counts = parse_input_interrupts(&self.read("proc/interrupts")?);
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
    crate::command::run_stdout(program, args, crate::command::COMMAND_TIMEOUT)
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
            on_ac_power: on_ac_power(&supplies),
            battery_percent,
            low_power_mode: self.read("sys/firmware/acpi/platform_profile").is_some_and(|t| parse_platform_profile(&t)),
            thermal: classify_thermal(&self.thermal_zones()),
            load_1m: load_1m(),
            source,
        })
    }

    fn name(&self) -> &'static str {
        "linux"
    }
}
