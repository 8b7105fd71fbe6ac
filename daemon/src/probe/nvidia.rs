//! NVIDIA GPUs through `nvidia-smi` (present wherever the driver is installed). MLX's CUDA backend
//! uses one GPU; its name, memory and compute capability decide which kernels and tiles are viable.

use super::NvidiaGpu;
use crate::command::{run_stdout, COMMAND_TIMEOUT};

/// The exact query whose output [`parse_nvidia_smi`] reads.
pub const NVIDIA_SMI_ARGS: [&str; 2] = ["--query-gpu=name,memory.total,driver_version,compute_cap", "--format=csv,noheader,nounits"];

/// Columns in [`NVIDIA_SMI_ARGS`]'s query.
const NVIDIA_SMI_COLUMNS: usize = 4;

/// Parses `nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap
/// --format=csv,noheader,nounits`: one GPU per line, `memory.total` in MiB. Lines without the four
/// queried columns or without a name (error messages, blank lines) are skipped; fields nvidia-smi
/// cannot report ("[N/A]", "[Not Supported]") are `None`.
pub fn parse_nvidia_smi(text: &str) -> Vec<NvidiaGpu> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(',').map(str::trim).collect();
            if fields.len() != NVIDIA_SMI_COLUMNS {
                return None;
            }
            let known = |i: usize| fields.get(i).copied().filter(|v| !v.is_empty() && !v.starts_with('[') && *v != "N/A");
            let name = known(0)?.to_string();
            Some(NvidiaGpu {
                name,
                memory_bytes: known(1).and_then(|m| m.parse::<u64>().ok()).map(|mib| mib * 1024 * 1024),
                driver: known(2).map(str::to_string),
                compute_capability: known(3).map(str::to_string),
            })
        })
        .collect()
}

/// GPUs on this machine, or empty when `nvidia-smi` is absent, fails or hangs.
pub fn query() -> Vec<NvidiaGpu> {
    run_stdout("nvidia-smi", &NVIDIA_SMI_ARGS, COMMAND_TIMEOUT).map(|text| parse_nvidia_smi(&text)).unwrap_or_default()
}
