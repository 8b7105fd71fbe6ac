//! The daemon's settings: one TOML file (`Paths::config_file`), every field optional, defaults in code.
//!
//! A missing file means "all defaults". A file that does not parse, has an unknown key, a value of the
//! wrong type or out of range is refused with field-level errors (`worker.request_timeout_s: must be
//! at least 1`), so a typo never silently falls back to a default. Other parts add their own
//! sections here: add a struct with `#[serde(default, deny_unknown_fields)]`, a `Default`, and its
//! checks in [`Config::validate`].
//!
//! ```toml
//! python = "/path/to/.venv/bin/python"   # else TILEWISE_PYTHON, else ./.venv/bin/python, else python3
//! [worker]
//! start_timeout_s = 120
//! request_timeout_s = 900
//! max_restarts = 3
//! [idle]
//! enabled = true
//! min_idle_s = 300
//! require_ac_power = true
//! block_in_low_power_mode = true
//! max_cpu_load = 0.5
//! max_thermal_level = 0
//! model = "synthetic:tiny"             # what idle time tunes (default: the backend's embedded model)
//! session_evaluations = 100            # budget of each automatic session
//! retune_after_h = 24                  # after a finished automatic session, wait this long
//! [llm]                                  # optional: an OpenAI-compatible endpoint for mutations
//! endpoint = "http://127.0.0.1:8080/v1"   # e.g. `mlx_lm.server --model <path> --port 8080`
//! model = "default_model"                # mlx_lm.server's name for the model it serves
//! api_key_env = "OPENAI_API_KEY"
//! [share]                                # optional: share proven policies through a folder
//! dir = "/Volumes/team/tilewise"         # bundles are written and imported here (verified first)
//! ```

use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::{Path, PathBuf};

/// All settings. `Config::default()` is what a machine without a config file runs with.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Python interpreter that runs the evaluator worker (`python -m tilewise.worker`).
    pub python: Option<PathBuf>,
    /// A virtual environment whose `bin/python` to use when `python` is not set.
    pub venv: Option<PathBuf>,
    pub worker: WorkerConfig,
    pub idle: IdleConfig,
    /// Optional LLM endpoint that proposes policies; without it mutations are purely random.
    pub llm: Option<LlmConfig>,
    /// A folder shared with other machines (docs/sharing.md).
    pub share: ShareConfig,
}

/// Sharing proven policies through a folder other machines also use (a network drive, Syncthing,
/// iCloud Drive, a git checkout): this daemon writes its proven policies there as a bundle and
/// imports the bundles others put there, verifying each here before serving it. Read at start.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ShareConfig {
    pub dir: Option<PathBuf>,
}

/// Limits on the Python evaluator child process.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkerConfig {
    /// Seconds the worker may take to print its `ready` line (importing MLX is slow on a cold disk).
    pub start_timeout_s: u64,
    /// Seconds one request (e.g. a whole `evaluate`) may take before the worker is killed.
    pub request_timeout_s: u64,
    /// Restarts in a row after which the session fails instead of retrying.
    pub max_restarts: u32,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig { start_timeout_s: 120, request_timeout_s: 900, max_restarts: 3 }
    }
}

/// When tuning may run in the background (the gates of `schedule`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IdleConfig {
    /// Tune automatically when the machine is idle; `false` tunes only when asked.
    pub enabled: bool,
    /// Seconds without user input before the machine counts as idle.
    pub min_idle_s: u64,
    /// Tune only on AC power (never drain a battery).
    pub require_ac_power: bool,
    /// Do not tune while Low Power Mode (macOS) / the `low-power` platform profile (Linux) is on.
    pub block_in_low_power_mode: bool,
    /// Highest 1-minute load average per core at which tuning may start (timings are noise above it).
    pub max_cpu_load: f64,
    /// Highest thermal pressure level tolerated (0 = nominal, 1 = fair, 2 = serious, 3 = critical).
    pub max_thermal_level: u8,
    /// The model idle time tunes (a path, a locally cached Hugging Face id, or `synthetic:…`);
    /// unset = the backend's embedded default (`session::default_model`).
    pub model: Option<String>,
    /// Evaluation budget of each session the daemon starts by itself.
    pub session_evaluations: u32,
    /// After an automatic session finished (budget spent or search exhausted), hours before the
    /// daemon starts another one for the same model (a fresh seed re-checks the result).
    pub retune_after_h: f64,
}

impl Default for IdleConfig {
    fn default() -> Self {
        IdleConfig {
            enabled: true,
            min_idle_s: 300,
            require_ac_power: true,
            block_in_low_power_mode: true,
            max_cpu_load: 0.5,
            max_thermal_level: 0,
            model: None,
            session_evaluations: 100,
            retune_after_h: 24.0,
        }
    }
}

/// An OpenAI-compatible chat endpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LlmConfig {
    /// Base URL, e.g. `http://127.0.0.1:8080/v1`.
    pub endpoint: String,
    pub model: String,
    /// Name of the environment variable holding the API key (the key itself never goes in the file).
    #[serde(default)]
    pub api_key_env: Option<String>,
}

/// One problem in the config file, located by its dotted key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ConfigFieldError {
    pub field: String,
    pub message: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config {path} is invalid: {}", FieldList(.errors))]
    Invalid { path: PathBuf, errors: Vec<ConfigFieldError> },
}

struct FieldList<'a>(&'a [ConfigFieldError]);
impl fmt::Display for FieldList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                write!(f, "; ")?;
            }
            write!(f, "{}: {}", e.field, e.message)?;
        }
        Ok(())
    }
}

impl ConfigError {
    /// The field-level errors (empty for I/O errors).
    pub fn field_errors(&self) -> &[ConfigFieldError] {
        match self {
            ConfigError::Invalid { errors, .. } => errors,
            ConfigError::Read { .. } => &[],
        }
    }
}

impl Config {
    /// Reads and validates the config file; a missing file gives the defaults.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Config::from_toml_str(&text).map_err(|errors| ConfigError::Invalid { path: path.to_path_buf(), errors }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Config::default()),
            Err(source) => Err(ConfigError::Read { path: path.to_path_buf(), source }),
        }
    }

    /// Sets one dotted key (`idle.enabled`) in the config file and returns the new, validated
    /// config. The file is rewritten only when the result validates (write to a temp file, then
    /// rename), so a bad `config.set` leaves both the file and the running config as they were.
    /// Other keys and their values are kept; comments are not (the file is re-serialized).
    pub fn set_in_file(path: &Path, key: &str, value: &serde_json::Value) -> Result<Config, ConfigError> {
        let invalid = |field: &str, message: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            errors: vec![ConfigFieldError { field: field.to_string(), message }],
        };
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(source) => return Err(ConfigError::Read { path: path.to_path_buf(), source }),
        };
        let mut table: toml::Table = text.parse().map_err(|e| invalid("(file)", format!("{e}")))?;
        let new_value: toml::Value =
            serde_json::from_value(value.clone()).map_err(|e| invalid(key, format!("not representable in TOML: {e}")))?;
        let parts: Vec<&str> = key.split('.').collect();
        if parts.iter().any(|p| p.is_empty()) {
            return Err(invalid(key, "empty key segment".into()));
        }
        let (last, parents) = parts.split_last().expect("split gives at least one part");
        let mut node = &mut table;
        for part in parents {
            let entry = node.entry(part.to_string()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
            node = entry.as_table_mut().ok_or_else(|| invalid(key, format!("`{part}` is not a section")))?;
        }
        node.insert(last.to_string(), new_value);
        let out = toml::to_string(&table).map_err(|e| invalid(key, format!("cannot write TOML: {e}")))?;
        let config = Config::from_toml_str(&out).map_err(|errors| ConfigError::Invalid { path: path.to_path_buf(), errors })?;
        let tmp = path.with_extension("toml.tmp");
        let write = || -> std::io::Result<()> {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            std::fs::write(&tmp, out.as_bytes())?;
            std::fs::rename(&tmp, path)
        };
        write().map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
        Ok(config)
    }

    /// Parses and validates TOML text.
    pub fn from_toml_str(text: &str) -> Result<Config, Vec<ConfigFieldError>> {
        let de = toml::Deserializer::parse(text).map_err(|e| vec![toml_error("(file)", text, &e)])?;
        let config: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let field = match e.path().to_string() {
                p if p == "." || p.is_empty() => "(file)".to_string(),
                p => p,
            };
            vec![toml_error(&field, text, e.inner())]
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Range and consistency checks that types alone cannot express. Returns every problem found.
    pub fn validate(&self) -> Result<(), Vec<ConfigFieldError>> {
        let mut errors = Vec::new();
        let mut bad = |field: &str, message: String| errors.push(ConfigFieldError { field: field.into(), message });
        if self.worker.start_timeout_s == 0 {
            bad("worker.start_timeout_s", "must be at least 1".into());
        }
        if self.worker.request_timeout_s == 0 {
            bad("worker.request_timeout_s", "must be at least 1".into());
        }
        if !(self.idle.max_cpu_load > 0.0 && self.idle.max_cpu_load.is_finite()) {
            bad("idle.max_cpu_load", format!("must be a positive number, got {}", self.idle.max_cpu_load));
        }
        if self.idle.max_thermal_level > 3 {
            bad("idle.max_thermal_level", format!("must be 0..=3, got {}", self.idle.max_thermal_level));
        }
        if self.idle.session_evaluations == 0 {
            bad("idle.session_evaluations", "must be at least 1".into());
        }
        if !(self.idle.retune_after_h >= 0.0 && self.idle.retune_after_h.is_finite()) {
            bad("idle.retune_after_h", format!("must be a number of hours >= 0, got {}", self.idle.retune_after_h));
        }
        if self.idle.model.as_deref().is_some_and(|m| m.trim().is_empty()) {
            bad("idle.model", "must not be empty (leave it out for the default model)".into());
        }
        if let Some(llm) = &self.llm {
            if !(llm.endpoint.starts_with("http://") || llm.endpoint.starts_with("https://")) {
                bad("llm.endpoint", format!("must be an http(s) URL, got {:?}", llm.endpoint));
            }
            if llm.model.trim().is_empty() {
                bad("llm.model", "must not be empty".into());
            }
        }
        if let (Some(_), Some(_)) = (&self.python, &self.venv) {
            bad("venv", "set either python or venv, not both".into());
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }

    /// The Python interpreter for the worker: `python`, else `venv/bin/python`, else
    /// `TILEWISE_PYTHON`, else `python3` from PATH.
    pub fn python_path(&self) -> PathBuf {
        if let Some(p) = &self.python {
            return p.clone();
        }
        if let Some(v) = &self.venv {
            return v.join("bin").join("python");
        }
        std::env::var_os("TILEWISE_PYTHON").filter(|v| !v.is_empty()).map(PathBuf::from).unwrap_or_else(|| PathBuf::from("python3"))
    }
}

/// A toml error as `field: message (line L)`.
fn toml_error(field: &str, text: &str, e: &toml::de::Error) -> ConfigFieldError {
    let mut message = e.message().trim().to_string();
    if let Some(span) = e.span() {
        let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
        message = format!("{message} (line {line})");
    }
    ConfigFieldError { field: field.to_string(), message }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_file_gives_defaults() {
        let tmp = tempfile::tempdir().unwrap();
        assert_eq!(Config::load(&tmp.path().join("none.toml")).unwrap(), Config::default());
    }

    #[test]
    fn partial_file_keeps_other_defaults() {
        let c = Config::from_toml_str("[worker]\nrequest_timeout_s = 60\n").unwrap();
        assert_eq!(c.worker.request_timeout_s, 60);
        assert_eq!(c.worker.start_timeout_s, WorkerConfig::default().start_timeout_s);
        assert_eq!(c.idle, IdleConfig::default());
    }

    #[test]
    fn unknown_key_names_the_field() {
        let errs = Config::from_toml_str("[worker]\nrequest_timeout = 60\n").unwrap_err();
        assert_eq!(errs.len(), 1);
        assert!(errs[0].message.contains("request_timeout"), "{errs:?}");
        assert!(errs[0].message.contains("line 2"), "{errs:?}");
    }

    #[test]
    fn wrong_type_names_the_field() {
        let errs = Config::from_toml_str("[idle]\nmin_idle_s = \"five\"\n").unwrap_err();
        assert_eq!(errs[0].field, "idle.min_idle_s", "{errs:?}");
    }

    #[test]
    fn range_checks_report_every_field() {
        let text = "[worker]\nstart_timeout_s = 0\n[idle]\nmax_thermal_level = 9\n[llm]\nendpoint = \"ftp://x\"\nmodel = \"\"\n";
        let fields: Vec<String> = Config::from_toml_str(text).unwrap_err().into_iter().map(|e| e.field).collect();
        assert_eq!(fields, ["worker.start_timeout_s", "idle.max_thermal_level", "llm.endpoint", "llm.model"]);
    }

    #[test]
    fn load_reports_path_and_fields() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("config.toml");
        std::fs::write(&p, "[worker]\nmax_restarts = -1\n").unwrap();
        let err = Config::load(&p).unwrap_err();
        assert_eq!(err.field_errors()[0].field, "worker.max_restarts");
        assert!(err.to_string().contains("config.toml"), "{err}");
    }

    #[test]
    fn default_round_trips_through_toml() {
        let text = toml::to_string(&Config::default()).unwrap();
        assert_eq!(Config::from_toml_str(&text).unwrap(), Config::default());
    }
}
