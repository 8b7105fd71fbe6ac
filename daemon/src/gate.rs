//! What the session and the scheduler share, below both: a reading of the machine ([`Activity`]),
//! the scheduler's verdict on it ([`Decision`], which [`Gate`]s block), and the [`PauseToken`] a
//! measurement step holds so that a stop or a closing gate cancels it. The scheduler (`schedule`)
//! makes decisions; sessions (`session`) obey them; neither needs the other for that.

use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::JoinHandle;

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

/// One gate, for callers that want to know which blocked without parsing the reasons.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Gate {
    Idle,
    AcPower,
    LowPowerMode,
    Thermal,
    Load,
    /// The activity source failed: we cannot tell, so we do not tune.
    Source,
}

/// Whether tuning may run now, and why not.
///
/// Two answers, because the load gate is a *start* condition only: a running measurement loads
/// the machine itself (the worker keeps a core busy), so pausing on load would pause on our own
/// work and oscillate. `run` (pause/resume a session) ignores load; `may_start` (start a new
/// session by itself) also needs the load below its limit.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Decision {
    /// A session may run (every gate but load passes).
    pub run: bool,
    /// A new session may start by itself (every gate passes, load included).
    pub may_start: bool,
    /// One readable line per blocking gate ("on battery", "user active 12 s ago (needs 300 s
    /// idle)"); when `run` is true, one line that says why it may run.
    pub reasons: Vec<String>,
    /// The gates that block (only `Load` can be here while `run` is true).
    pub blocked_by: Vec<Gate>,
    /// Wall-clock moment the person was last active (now − idle time) at the time of the
    /// reading. The session runner discards every sample taken at or after this moment.
    #[serde(serialize_with = "ser_epoch_s")]
    pub user_active_at: Option<SystemTime>,
    /// The reading the decision was made from (None when the source failed).
    pub activity: Option<Activity>,
}

fn ser_epoch_s<S: serde::Serializer>(t: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
    match t.and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok()) {
        Some(d) => s.serialize_some(&d.as_secs_f64()),
        None => s.serialize_none(),
    }
}

impl Decision {
    /// The decision before anything has been sampled: do not run.
    pub fn pending() -> Self {
        Decision {
            run: false,
            may_start: false,
            reasons: vec!["activity not sampled yet".into()],
            blocked_by: vec![Gate::Source],
            user_active_at: None,
            activity: None,
        }
    }

    /// The decision when the activity source failed: do not run, and say why.
    pub fn source_failed(error: &str) -> Self {
        Decision {
            run: false,
            may_start: false,
            reasons: vec![format!("cannot read activity: {error}")],
            blocked_by: vec![Gate::Source],
            user_active_at: None,
            activity: None,
        }
    }

    /// Reasons joined for one-line displays (status, logs).
    pub fn summary(&self) -> String {
        self.reasons.join("; ")
    }

    /// The decision in words, for the log: what it allows, then why ("a running session goes on,
    /// none starts by itself: system load 5.20 (limit 1.00)").
    pub fn describe(&self) -> String {
        let allows = match (self.run, self.may_start) {
            (true, true) => "tuning may run and start",
            (true, false) => "a running session goes on, none starts by itself",
            (false, _) => "tuning waits",
        };
        format!("{allows}: {}", self.summary())
    }

    /// True when `other` differs in what a consumer acts on (run or the set of blocking gates);
    /// a changing idle count alone is not a change worth waking anyone for.
    pub fn differs_materially(&self, other: &Decision) -> bool {
        self.run != other.run || self.may_start != other.may_start || self.blocked_by != other.blocked_by
    }
}

/// A cancellation token for one measurement step that fires when the session is stopped (its
/// parent) **or** when the gate closes (`run` turns false): pass it to the worker request, and
/// treat a result that arrives once it is cancelled as taken in the active period (discard it).
/// The watching task ends with the guard.
pub struct PauseToken {
    token: tokio_util::sync::CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl PauseToken {
    /// `gate` None (no scheduler: tests, explicit runs) gives a plain child of `parent`.
    pub fn new(parent: &tokio_util::sync::CancellationToken, gate: Option<watch::Receiver<Decision>>) -> Self {
        let token = parent.child_token();
        let task = gate.map(|mut gate| {
            let t = token.clone();
            tokio::spawn(async move {
                tokio::select! {
                    // An Err means the scheduler is gone: nothing will close the gate any more.
                    r = gate.wait_for(|d| !d.run) => if r.is_ok() { t.cancel() },
                    _ = t.cancelled() => {}
                }
            })
        });
        PauseToken { token, task }
    }

    pub fn token(&self) -> tokio_util::sync::CancellationToken {
        self.token.clone()
    }

    /// True once the step must stop (session stopped or gate closed).
    pub fn is_cancelled(&self) -> bool {
        self.token.is_cancelled()
    }
}

impl Drop for PauseToken {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_load_block_reads_as_a_start_condition_not_a_contradiction() {
        let d = Decision {
            run: true,
            may_start: false,
            reasons: vec!["system load 5.20 (limit 1.00)".into()],
            blocked_by: vec![Gate::Load],
            user_active_at: None,
            activity: None,
        };
        assert_eq!(d.describe(), "a running session goes on, none starts by itself: system load 5.20 (limit 1.00)");
        assert!(Decision::pending().describe().starts_with("tuning waits: "));
    }
}
