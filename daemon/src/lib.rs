//! tilewise: finds, per machine and model, a matmul policy for MLX-LM that is measurably faster and
//! output-preserving, and serves it to mlx_lm processes over a local socket.
//!
//! Modules follow the pipeline: probe → evolve → measure (worker) → store → serve (ipc) → apply
//! (the Python plugin). `schedule` gates tuning on idle/power/thermal state (`gate` holds what it
//! shares with sessions); `service` installs the login service. See docs/design.md and docs/.

mod command;
pub mod config;
pub mod events;
pub mod evolve;
pub mod gate;
pub mod ipc;
pub mod llm;
pub mod paths;
pub mod policy;
pub mod probe;
pub mod python;
pub mod schedule;
pub mod service;
pub mod session;
pub mod share;
pub mod store;
pub mod usage;
pub mod worker;
