//! tilewise: finds, per machine and model, a matmul policy for MLX-LM that is measurably faster and
//! output-preserving, and serves it to mlx_lm processes over a local socket.
//!
//! Modules follow the pipeline: probe → policy → store → ipc (serve). The evolution, worker and
//! schedule modules plug into the same pipeline (see ../shared/DESIGN.md and docs/).

pub mod policy;
pub mod probe;
