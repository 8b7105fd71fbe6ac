//! macOS: runs the two commands whose output [`super::apple`] parses. Kept to plain command calls
//! because this file cannot be compiled or tested on the Linux CI machine.

use super::apple::{device_from_facts, parse_ioreg_gpu, parse_sysctl};
use super::Device;
use crate::command::{run_stdout, COMMAND_TIMEOUT};

/// Probes this Mac. A command that fails contributes nothing (its fields stay `None`).
pub fn detect() -> Device {
    // Two sysctl calls: one unknown name would make a combined call exit non-zero.
    let mut sysctl = run_stdout("sysctl", &["hw"], COMMAND_TIMEOUT).unwrap_or_default();
    sysctl.push('\n');
    sysctl.push_str(&run_stdout("sysctl", &["machdep.cpu.brand_string"], COMMAND_TIMEOUT).unwrap_or_default());
    let ioreg = run_stdout("ioreg", &["-rc", "AGXAccelerator"], COMMAND_TIMEOUT).unwrap_or_default();
    device_from_facts(std::env::consts::ARCH, &parse_sysctl(&sysctl), &parse_ioreg_gpu(&ioreg))
}
