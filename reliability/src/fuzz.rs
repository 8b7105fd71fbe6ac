//! Runs the libFuzzer target on the protocol decoder and dispatcher (fuzz/fuzz_targets/protocol.rs)
//! through `cargo fuzz`, and reads libFuzzer's own figures (inputs executed, coverage, crashes).
//!
//! `cargo fuzz` needs nightly compiler flags (`-Zsanitizer=address`); on a stable toolchain
//! `RUSTC_BOOTSTRAP=1` allows them. The corpus grows in fuzz/corpus/protocol (not committed),
//! starting from the committed seeds in fuzz/seeds/protocol; crashes land in fuzz/artifacts/.

use crate::report::{Row, Verdict};
use std::path::Path;
use std::process::Command;
use std::time::Instant;

const TARGET: &str = "protocol";

fn cargo_fuzz(args: &[&str]) -> Command {
    let mut c = Command::new("cargo");
    c.arg("fuzz").args(args).env("RUSTC_BOOTSTRAP", "1");
    c
}

/// The number after `key` in libFuzzer's output (e.g. `Done 1000000 runs`, `cov: 1234`).
fn last_number_after(text: &str, key: &str) -> Option<u64> {
    text.rmatch_indices(key).find_map(|(i, _)| {
        let rest = &text[i + key.len()..];
        let digits: String = rest.trim_start().chars().take_while(|c| c.is_ascii_digit()).collect();
        digits.parse().ok()
    })
}

/// Where `cargo fuzz build -O` leaves the target's binary.
fn built_binary() -> std::path::PathBuf {
    Path::new("fuzz/target").join(format!("{}-unknown-linux-gnu", std::env::consts::ARCH)).join("release").join(TARGET)
}

/// `build`: false runs the binary already built (after a `cargo fuzz build -O protocol`), e.g.
/// while the daemon's sources change under a long run.
pub fn rows(quick: bool, runs: Option<u64>, build: bool) -> Vec<Row> {
    let check = "fuzz: protocol decode + dispatch (libFuzzer)";
    if !Path::new("fuzz/Cargo.toml").exists() {
        return vec![Row::new(check, "fuzz/Cargo.toml not found: run from the repository root", "runs", Verdict::Fail)];
    }
    match cargo_fuzz(&["--version"]).output() {
        Ok(o) if o.status.success() => {}
        _ => {
            return vec![Row::new(
                check,
                "cargo-fuzz is not installed: bash scripts/setup.d/60-reliability.sh --fuzz (cargo install cargo-fuzz --locked)",
                "runs",
                Verdict::Skip,
            )]
        }
    }
    let t0 = Instant::now();
    let built =
        if build || !built_binary().exists() { cargo_fuzz(&["build", "-O", TARGET]).output() } else { Command::new("true").output() };
    match built {
        Ok(o) if o.status.success() => {}
        Ok(o) => {
            let err = String::from_utf8_lossy(&o.stderr);
            let tail: Vec<&str> = err.lines().rev().take(6).collect();
            return vec![Row::new(
                check,
                format!("build failed: {}", tail.into_iter().rev().collect::<Vec<_>>().join(" ⏎ ")),
                "builds",
                Verdict::Fail,
            )];
        }
        Err(e) => return vec![Row::new(check, format!("cannot run cargo fuzz: {e}"), "builds", Verdict::Fail)],
    }
    let build_s = t0.elapsed().as_secs_f64();
    let corpus = format!("fuzz/corpus/{TARGET}");
    let _ = std::fs::create_dir_all(&corpus);
    let limit = match (runs, quick) {
        (Some(n), _) => format!("-runs={n}"),
        (None, true) => "-max_total_time=45".to_string(),
        (None, false) => "-runs=1000000".to_string(),
    };
    let t1 = Instant::now();
    let out = Command::new(built_binary())
        .args([
            &corpus,
            &format!("fuzz/seeds/{TARGET}"),
            "-dict=fuzz/protocol.dict",
            &limit,
            "-max_len=4096",
            "-timeout=10",
            "-rss_limit_mb=2048",
            "-print_final_stats=1",
        ])
        .output();
    let run_s = t1.elapsed().as_secs_f64();
    let out = match out {
        Ok(o) => o,
        Err(e) => return vec![Row::new(check, format!("cannot run cargo fuzz: {e}"), "runs", Verdict::Fail)],
    };
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let _ = std::fs::write("fuzz/last-run.log", &text);
    let executed = last_number_after(&text, "stat::number_of_executed_units:").or_else(|| last_number_after(&text, "Done"));
    let cov = last_number_after(&text, "cov:");
    let crashed = !out.status.success()
        || text.contains("==ERROR")
        || text.contains("panicked at")
        || text.contains("deadly signal")
        || text.contains("Test unit written to");
    let n = executed.unwrap_or(0);
    let goal_runs = if quick { 1 } else { runs.unwrap_or(1_000_000) };
    let figure = format!(
        "{n} inputs in {run_s:.0} s ({:.0}/s), coverage {} edges, {} (build {build_s:.0} s){}",
        n as f64 / run_s.max(0.001),
        cov.map(|c| c.to_string()).unwrap_or_else(|| "?".into()),
        if crashed { "CRASH" } else { "0 crashes" },
        if crashed {
            let first = text.lines().find(|l| l.contains("panicked at") || l.contains("==ERROR")).unwrap_or("see fuzz/last-run.log");
            format!(": {first:.200}")
        } else {
            String::new()
        }
    );
    let goal = if quick { "0 crashes (45 s run)".to_string() } else { format!("≥ {goal_runs} inputs, 0 crashes") };
    vec![Row::pass_if(check, figure, goal, !crashed && n >= goal_runs)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_libfuzzer_figures() {
        let out = "#1048576 pulse cov: 812 ft: 2000\nDone 1000000 runs in 93 second(s)\nstat::number_of_executed_units: 1000002\n";
        assert_eq!(last_number_after(out, "stat::number_of_executed_units:"), Some(1_000_002));
        assert_eq!(last_number_after(out, "Done"), Some(1_000_000));
        assert_eq!(last_number_after(out, "cov:"), Some(812));
        assert_eq!(last_number_after("nothing", "cov:"), None);
    }
}
