//! Which Python runs the measuring worker (and tells the CLI the MLX version): one that has the
//! `tilewise` package.
//!
//! A person who follows the README builds the binaries in a checkout and creates `.venv` there, then
//! runs `tilewise daemon start`: a bare `python3` would not have the package, and the first
//! `tilewise tune` would fail with "No module named 'tilewise'". So, in this order:
//!
//! 1. the config's `python` or `venv`, then `TILEWISE_PYTHON` — what a person named is used as
//!    named (a worker that then fails to start says so, with the fix);
//! 2. otherwise the first of these that can import `tilewise.worker`: the checkout's `.venv` next to
//!    the running binary (`<repo>/target/<profile>/tilewised` → `<repo>/.venv/bin/python`), then
//!    `python3` and `python` on `PATH` (where `pip install` may have put the package).
//!
//! When none can, the error lists what was tried and how to point tilewise at a Python.

use crate::config::Config;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How long one candidate may take to import the package (a cold MLX import can take seconds).
const PROBE_TIMEOUT: Duration = Duration::from_secs(30);

/// The Python to run the worker with, and how it was chosen (for logs and `status`).
#[derive(Debug, Clone, PartialEq)]
pub struct Chosen {
    pub path: PathBuf,
    pub how: String,
}

/// Finds the worker's Python (see the module doc). `Err` explains what was tried and how to fix it.
pub fn find(config: &Config, config_file: &Path) -> Result<Chosen, String> {
    if let Some(p) = &config.python {
        return Ok(Chosen { path: p.clone(), how: format!("python in {}", config_file.display()) });
    }
    if let Some(v) = &config.venv {
        return Ok(Chosen { path: v.join("bin").join("python"), how: format!("venv in {}", config_file.display()) });
    }
    if let Some(p) = std::env::var_os("TILEWISE_PYTHON").filter(|v| !v.is_empty()) {
        return Ok(Chosen { path: PathBuf::from(p), how: "TILEWISE_PYTHON".into() });
    }
    let mut tried = Vec::new();
    for (path, how) in candidates() {
        match has_tilewise(&path) {
            Ok(()) => return Ok(Chosen { path, how }),
            Err(why) => tried.push(format!("{} ({how}): {why}", path.display())),
        }
    }
    Err(format!(
        "no Python with the tilewise package was found (tried {}). Install it into one \
         (`scripts/setup --tuning` in a checkout, or `pip install -e <checkout>/evaluator`), or name one: \
         `python = \"/path/to/python\"` in {}, or the TILEWISE_PYTHON environment variable",
        tried.join("; "),
        config_file.display()
    ))
}

/// The automatic candidates, in order.
fn candidates() -> Vec<(PathBuf, String)> {
    let mut out = Vec::new();
    if let Some(repo) = std::env::current_exe().ok().and_then(|exe| checkout_of(&exe)) {
        out.push((repo.join(".venv").join("bin").join("python"), format!("the checkout's .venv ({})", repo.display())));
    }
    out.push((PathBuf::from("python3"), "python3 on PATH".into()));
    out.push((PathBuf::from("python"), "python on PATH".into()));
    out
}

/// The checkout a binary was built in: `<repo>/target/<profile>/<binary>` → `<repo>`, when that
/// directory holds the evaluator.
pub fn checkout_of(exe: &Path) -> Option<PathBuf> {
    let repo = exe.parent()?.parent()?.parent()?;
    (exe.parent()?.parent()?.file_name()? == "target" && repo.join("evaluator").join("tilewise").is_dir()).then(|| repo.to_path_buf())
}

/// Whether `python` can import the worker (the package and its MLX).
fn has_tilewise(python: &Path) -> Result<(), String> {
    if python.components().count() > 1 && !python.exists() {
        return Err("does not exist".into());
    }
    let program = python.to_string_lossy();
    crate::command::run(&program, &["-c", "import tilewise.worker"], PROBE_TIMEOUT).map(|_| ()).map_err(|e| {
        let last = e.lines().last().unwrap_or("").trim().to_string();
        if last.contains("No module named") {
            last
        } else {
            e.chars().take(200).collect()
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_build_in_a_checkout_finds_its_checkout() {
        let repo = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(repo.path().join("evaluator/tilewise")).unwrap();
        std::fs::create_dir_all(repo.path().join("target/release")).unwrap();
        let exe = repo.path().join("target/release/tilewised");
        assert_eq!(checkout_of(&exe).as_deref(), Some(repo.path()));
        assert_eq!(checkout_of(Path::new("/usr/local/bin/tilewised")), None);
    }

    #[test]
    fn named_pythons_win_and_a_missing_package_is_explained() {
        let cfg = Config { python: Some("/opt/py/bin/python".into()), ..Default::default() };
        let chosen = find(&cfg, Path::new("/home/x/config.toml")).unwrap();
        assert_eq!((chosen.path, chosen.how.as_str()), (PathBuf::from("/opt/py/bin/python"), "python in /home/x/config.toml"));
        // A Python that exists but lacks the package, and one that does not exist.
        assert!(has_tilewise(Path::new("/nonexistent/python")).unwrap_err().contains("does not exist"));
        let err = has_tilewise(Path::new("sh")).unwrap_err();
        assert!(!err.is_empty());
    }
}
