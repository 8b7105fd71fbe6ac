//! Parsers for the output of macOS's `ioreg` and `pmset`. Formats: see
//! `daemon/tests/fixtures/schedule/README.md` for the recorded outputs and where they come from.
//! The macOS source itself (`MacSource`) is thin on purpose: it cannot be compiled on Linux.

use super::{ActivityError, Thermal};
use std::sync::Mutex;
use std::time::Duration;
use std::time::Instant;

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
            let ns: u64 = value.parse().map_err(|_| ActivityError::parse("ioreg HIDIdleTime", format!("not a number: {value:?}")))?;
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
    let source = source.ok_or_else(|| ActivityError::parse("pmset -g batt", "no \"Now drawing from\" line"))?;
    Ok(Battery { on_ac_power: source != "Battery Power", percent, state })
}

/// `pmset -g`: the "Currently in use" settings. Low Power Mode appears as `lowpowermode 1`
/// (macOS 12–13) or `powermode 1` (newer: 0 automatic, 1 low power, 2 high power). A machine
/// that prints neither has no Low Power Mode.
pub fn parse_pmset_low_power(text: &str) -> bool {
    text.lines().any(|line| {
        let mut words = line.split_whitespace();
        matches!((words.next(), words.next()), (Some("lowpowermode") | Some("powermode"), Some("1")))
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
    use super::super::{load_1m, Activity, ActivityError, ActivitySource};
    use super::SlowFields;
    use std::sync::Mutex;
    use std::time::Instant;

    /// HIDIdleTime on every sample; power and thermal state through [`SlowFields`].
    #[derive(Default)]
    pub struct MacSource {
        slow: Mutex<Option<SlowFields>>,
    }

    fn run(program: &str, args: &[&str]) -> Result<String, ActivityError> {
        crate::command::run(program, args, crate::command::COMMAND_TIMEOUT)
            .map_err(|message| ActivityError::Command { command: format!("{program} {}", args.join(" ")), message })
    }

    impl ActivitySource for MacSource {
        fn sample(&self) -> Result<Activity, ActivityError> {
            let user_idle = super::parse_hid_idle(&run("/usr/sbin/ioreg", &["-c", "IOHIDSystem"])?)?;
            let slow = SlowFields::get_or_refresh(&self.slow, || {
                let batt = super::parse_pmset_batt(&run("/usr/bin/pmset", &["-g", "batt"])?)?;
                Ok(SlowFields {
                    at: Instant::now(),
                    on_ac_power: batt.on_ac_power,
                    battery_percent: batt.percent,
                    low_power_mode: super::parse_pmset_low_power(&run("/usr/bin/pmset", &["-g"])?),
                    thermal: super::parse_pmset_therm(&run("/usr/bin/pmset", &["-g", "therm"])?),
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
