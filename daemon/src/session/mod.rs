//! Tuning sessions: one (device, model, mlx version, backend) searched by a tokio task that drives
//! the Python worker, records every step in the store, promotes proven winners and publishes events.
//!
//! # One step, and why a kill -9 loses nothing
//!
//! The task repeats: take the engine's next child → (screening) measure the shapes the memo lacks,
//! each committed as it arrives, and predict; a predicted loser is resolved `Screened` →
//! otherwise add (or find again, by content hash) the candidate row, mark it `measuring`, run the
//! worker's `evaluate`, and commit the measurement with all its samples in one transaction
//! (`Store::record_measurement`) → decide promotion → save the engine state.
//!
//! The engine state is saved after the measurement's transaction, not inside it. A kill between the
//! two leaves a committed measurement whose child the saved engine still has pending; on resume
//! that child comes back, `find_candidate` finds its row already `measured`, and the step is
//! completed from the stored measurement (promotion decided again, idempotently) instead of being
//! measured again. A candidate left `measuring` is re-run under the same row, never duplicated.
//!
//! # Budget
//!
//! `evaluations` counts the session's trials (measurements + failures, as the store counts them);
//! screening by the cost model is not a trial. `seconds` counts running time across restarts.
//!
//! # Files
//!
//! [`settings`] (what a session is asked to do), [`manager`] (start, resume, stop, show), `run`
//! (the step loop), `measure` (end-to-end measurement, promotion, re-measurement, demotion),
//! `screen` (the cost model's screen), `llm` (the optional LLM mutator), `rpc` (the daemon seam).

mod llm;
pub mod manager;
mod measure;
mod rpc;
mod run;
mod screen;
pub mod settings;
mod usage_mix;

pub use llm::LlmSource;
pub use manager::{DeviceInfo, ManagerOptions, SessionError, SessionManager};
pub use run::SavedState;
pub use settings::{default_model, SessionSpec, StartParams, RACE_MIN_PAIRS};
