//! The search over policy data (never code).
//!
//! - [`space`]: what a candidate can be for one model and workload (the real (N, K) shapes from the
//!   worker's `load`, the workload's M values), the seeds (`native` and the seed document's
//!   `choose_tile_size` heuristic written as rules), mutation and crossover. Every child is run
//!   through `Policy::from_value` + `validate_for_backend` before it leaves this module.
//! - [`archive`]: the MAP-Elites grid over behaviour features (non-native FLOP fraction, tile
//!   granularity).
//! - [`engine`]: islands with periodic migration, deterministic for a seed (one ChaCha stream per
//!   generation and island, so the only state to persist is data, not an RNG position).
//! - [`cost`]: the shape-memo cost model that screens candidates before end-to-end evaluation.
//! - [`promotion`]: the rule that decides when a measured candidate becomes the best policy.

pub mod archive;
pub mod cost;
pub mod engine;
pub mod promotion;
pub mod space;

pub use engine::{Child, Engine, EngineConfig, Outcome};
pub use space::{SearchSpace, Shape, Workload};
