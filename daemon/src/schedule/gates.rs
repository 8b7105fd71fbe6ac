//! The gates that decide whether tuning may run now: idle long enough, on AC, not in Low Power
//! Mode, thermally nominal, machine load low. Each is configurable (`[idle]` in the config, see
//! [`Gates::from_config`]); the
//! [`Decision`] says which gates block, in words a person can read in the menu bar.

use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::config::IdleConfig;
use crate::gate::{Activity, Thermal};
pub use crate::gate::{Decision, Gate};

/// The gates in force, derived from the `[idle]` section of the config
/// ([`crate::config::IdleConfig`], the one place they are configured) by [`Gates::from_config`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Gates {
    /// Start tuning by itself when the gates open (`idle.enabled`); false: only when asked.
    /// The gates still pause an explicitly started session.
    pub auto_start: bool,
    /// Seconds without keyboard/mouse input before tuning may run.
    pub idle_seconds: f64,
    pub require_ac_power: bool,
    pub block_in_low_power_mode: bool,
    /// Hottest thermal state tolerated. `Unknown` (a platform that cannot tell) always passes.
    pub max_thermal: Thermal,
    /// Tuning is blocked while the 1-minute load average is at or above this; None: no limit.
    pub max_load_1m: Option<f64>,
}

impl Gates {
    /// The config's idle section as gates: `max_cpu_load` is per core, so the load limit is it
    /// times the number of CPUs; `max_thermal_level` 0..=3 is nominal..critical.
    pub fn from_config(idle: &IdleConfig) -> Gates {
        let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) as f64;
        Gates {
            auto_start: idle.enabled,
            idle_seconds: idle.min_idle_s as f64,
            require_ac_power: idle.require_ac_power,
            block_in_low_power_mode: idle.block_in_low_power_mode,
            max_thermal: match idle.max_thermal_level {
                0 => Thermal::Nominal,
                1 => Thermal::Fair,
                2 => Thermal::Serious,
                _ => Thermal::Critical,
            },
            max_load_1m: Some(idle.max_cpu_load * cpus),
        }
    }
}

impl Default for Gates {
    fn default() -> Self {
        Gates::from_config(&IdleConfig::default())
    }
}

/// "12 s", "4 min 10 s", "2 h 5 min": short and readable.
pub fn human_duration(d: Duration) -> String {
    let s = d.as_secs();
    if s < 60 {
        format!("{s} s")
    } else if s < 3600 {
        let (m, r) = (s / 60, s % 60);
        if r == 0 {
            format!("{m} min")
        } else {
            format!("{m} min {r} s")
        }
    } else {
        let (h, m) = (s / 3600, (s % 3600) / 60);
        if m == 0 {
            format!("{h} h")
        } else {
            format!("{h} h {m} min")
        }
    }
}

impl Gates {
    pub fn idle_required(&self) -> Duration {
        Duration::from_secs_f64(self.idle_seconds.max(0.0))
    }

    /// Applies every gate to one reading, taken at wall-clock time `now`.
    pub fn decide(&self, a: &Activity, now: SystemTime) -> Decision {
        let mut reasons = Vec::new();
        let mut blocked_by = Vec::new();
        let idle_needed = self.idle_required();
        if a.user_idle < idle_needed {
            blocked_by.push(Gate::Idle);
            reasons.push(format!("user active {} ago (needs {} idle)", human_duration(a.user_idle), human_duration(idle_needed)));
        }
        if self.require_ac_power && !a.on_ac_power {
            blocked_by.push(Gate::AcPower);
            reasons.push(match a.battery_percent {
                Some(p) => format!("on battery ({p} %)"),
                None => "on battery".to_owned(),
            });
        }
        if self.block_in_low_power_mode && a.low_power_mode {
            blocked_by.push(Gate::LowPowerMode);
            reasons.push("Low Power Mode is on".to_owned());
        }
        if a.thermal != Thermal::Unknown && a.thermal > self.max_thermal {
            blocked_by.push(Gate::Thermal);
            reasons.push(format!("thermal state {} (limit {})", a.thermal.as_str(), self.max_thermal.as_str()));
        }
        if let Some(max) = self.max_load_1m {
            if a.load_1m >= max {
                blocked_by.push(Gate::Load);
                reasons.push(format!("system load {:.2} (limit {:.2})", a.load_1m, max));
            }
        }
        let may_start = blocked_by.is_empty();
        let run = blocked_by.iter().all(|g| *g == Gate::Load);
        if may_start {
            reasons.push(format!(
                "idle {}, {}, thermal {}, load {:.2}",
                human_duration(a.user_idle),
                if a.on_ac_power { "on AC" } else { "on battery (allowed)" },
                a.thermal.as_str(),
                a.load_1m
            ));
        }
        Decision { run, may_start, reasons, blocked_by, user_active_at: now.checked_sub(a.user_idle), activity: Some(a.clone()) }
    }

    /// How long until the idle gate alone could open, if it is what blocks (None: not blocking).
    pub fn idle_remaining(&self, a: &Activity) -> Option<Duration> {
        let need = self.idle_required();
        (a.user_idle < need).then(|| need - a.user_idle)
    }
}
