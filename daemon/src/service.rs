//! `tilewise service install|uninstall|status`: run `tilewised` at login, opt-in, restarted with
//! backoff when it fails.
//!
//! - macOS: a launchd LaunchAgent, `~/Library/LaunchAgents/dev.tilewise.daemon.plist`. `KeepAlive`
//!   with `SuccessfulExit = false` restarts it after a crash but not after a clean
//!   `daemon.shutdown`; `ThrottleInterval` is launchd's (fixed) backoff between restarts.
//! - Linux: a systemd user unit, `$XDG_CONFIG_HOME/systemd/user/tilewised.service`,
//!   `Restart=on-failure` after `RestartSec`; on systemd >= 254 the delay grows over
//!   `RestartSteps` up to `RestartMaxDelaySec` (exponential backoff). Older systemd would warn
//!   about those keys, so they are only written where supported.
//!
//! The file contents come from pure functions ([`launchd_plist`], [`systemd_unit`]) checked
//! against fixtures; installing is writing that file and calling `launchctl` / `systemctl --user`
//! through a [`CommandRunner`] (tests record the calls instead of running them).

use std::fmt::Write as _;
use std::io;
use std::path::{Path, PathBuf};

use serde::Serialize;

/// launchd label and plist name.
pub const LAUNCHD_LABEL: &str = "dev.tilewise.daemon";
/// systemd unit name.
pub const SYSTEMD_UNIT: &str = "tilewised.service";
/// Seconds launchd waits before restarting a crashed daemon (its only backoff knob).
pub const LAUNCHD_THROTTLE_S: u32 = 30;
/// First restart delay under systemd.
pub const SYSTEMD_RESTART_SEC: u32 = 5;
/// systemd >= 254: restart delay grows from `RestartSec` to this over `SYSTEMD_RESTART_STEPS`.
pub const SYSTEMD_RESTART_MAX_DELAY_S: u32 = 300;
pub const SYSTEMD_RESTART_STEPS: u32 = 6;
/// Environment variables passed from the installing shell into the service, when set there, so
/// the service uses the same files and Python as the person who installed it.
pub const PASSED_ENV: &[&str] = &["TILEWISE_HOME", "TILEWISE_PYTHON", "TILEWISE_MODELS_DIR"];

/// What the service runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServiceSpec {
    /// Absolute path of `tilewised`.
    pub program: PathBuf,
    pub args: Vec<String>,
    /// Environment for the daemon (name, value), in order.
    pub env: Vec<(String, String)>,
    /// Where launchd writes the daemon's stdout/stderr (systemd uses the journal).
    pub log_dir: PathBuf,
}

impl ServiceSpec {
    /// The spec for this installation: `tilewised` next to the running `tilewise`, and the
    /// variables of [`PASSED_ENV`] that are set now.
    pub fn for_this_install(log_dir: PathBuf) -> io::Result<ServiceSpec> {
        let exe = std::env::current_exe()?;
        let program = exe.with_file_name("tilewised");
        if !program.is_file() {
            return Err(io::Error::new(io::ErrorKind::NotFound, format!("{} not found next to {}", program.display(), exe.display())));
        }
        let env = PASSED_ENV.iter().filter_map(|k| std::env::var(k).ok().filter(|v| !v.is_empty()).map(|v| (k.to_string(), v))).collect();
        Ok(ServiceSpec { program, args: Vec::new(), env, log_dir })
    }
}

// ------------------------------------------------------------------------------------------------
// launchd
// ------------------------------------------------------------------------------------------------

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// The LaunchAgent property list.
pub fn launchd_plist(spec: &ServiceSpec) -> String {
    let mut out = String::new();
    let s = |p: &Path| xml_escape(&p.to_string_lossy());
    out.push_str("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    out.push_str("<!DOCTYPE plist PUBLIC \"-//Apple//DTD PLIST 1.0//EN\" \"http://www.apple.com/DTDs/PropertyList-1.0.dtd\">\n");
    out.push_str("<plist version=\"1.0\">\n<dict>\n");
    let _ = writeln!(out, "\t<key>Label</key>\n\t<string>{LAUNCHD_LABEL}</string>");
    out.push_str("\t<key>ProgramArguments</key>\n\t<array>\n");
    let _ = writeln!(out, "\t\t<string>{}</string>", s(&spec.program));
    for a in &spec.args {
        let _ = writeln!(out, "\t\t<string>{}</string>", xml_escape(a));
    }
    out.push_str("\t</array>\n");
    if !spec.env.is_empty() {
        out.push_str("\t<key>EnvironmentVariables</key>\n\t<dict>\n");
        for (k, v) in &spec.env {
            let _ = writeln!(out, "\t\t<key>{}</key>\n\t\t<string>{}</string>", xml_escape(k), xml_escape(v));
        }
        out.push_str("\t</dict>\n");
    }
    out.push_str("\t<key>RunAtLoad</key>\n\t<true/>\n");
    // Restart after a crash, not after a clean shutdown the person asked for.
    out.push_str("\t<key>KeepAlive</key>\n\t<dict>\n\t\t<key>SuccessfulExit</key>\n\t\t<false/>\n\t</dict>\n");
    let _ = writeln!(out, "\t<key>ThrottleInterval</key>\n\t<integer>{LAUNCHD_THROTTLE_S}</integer>");
    // Not "Background": launchd would throttle CPU and I/O, which distorts every measurement.
    out.push_str("\t<key>ProcessType</key>\n\t<string>Standard</string>\n");
    let _ = writeln!(out, "\t<key>StandardOutPath</key>\n\t<string>{}</string>", s(&spec.log_dir.join("tilewised.out.log")));
    let _ = writeln!(out, "\t<key>StandardErrorPath</key>\n\t<string>{}</string>", s(&spec.log_dir.join("tilewised.err.log")));
    out.push_str("</dict>\n</plist>\n");
    out
}

/// `launchctl list <label>` (exit 0: loaded) prints a dictionary with `"PID" = N;` while running
/// and `"LastExitStatus" = N;`. Parsed into the state shown by `tilewise service status`.
pub fn parse_launchctl_list(text: &str) -> RuntimeState {
    let field = |key: &str| -> Option<i64> {
        text.lines().find_map(|l| {
            let rest = l.trim().strip_prefix(&format!("\"{key}\""))?;
            rest.trim().strip_prefix('=')?.trim().trim_end_matches(';').trim().parse().ok()
        })
    };
    let pid = field("PID").map(|p| p as u32);
    RuntimeState { loaded: true, running: pid.is_some(), pid, last_exit: field("LastExitStatus").map(|s| s as i32), detail: None }
}

// ------------------------------------------------------------------------------------------------
// systemd
// ------------------------------------------------------------------------------------------------

/// What the installed systemd understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SystemdFeatures {
    /// `RestartSteps=` / `RestartMaxDelaySec=` (systemd 254 and later).
    pub restart_backoff: bool,
}

impl SystemdFeatures {
    pub fn for_version(version: Option<u32>) -> Self {
        SystemdFeatures { restart_backoff: version.is_some_and(|v| v >= 254) }
    }
}

/// `systemctl --version` → the major version ("systemd 252 (252.38-1~deb12u1)" → 252).
pub fn parse_systemd_version(text: &str) -> Option<u32> {
    text.lines().next()?.split_whitespace().nth(1)?.parse().ok()
}

/// Quotes one word for a unit file: double quotes, backslash escapes, `%` doubled (systemd
/// expands `%` specifiers even inside quotes).
fn systemd_quote(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '%' => out.push_str("%%"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The systemd user unit.
pub fn systemd_unit(spec: &ServiceSpec, features: SystemdFeatures) -> String {
    let mut out = String::new();
    out.push_str("[Unit]\n");
    out.push_str("Description=tilewise daemon: tunes MLX matmul policies while this machine is idle\n");
    // Give up after 10 failures in 10 minutes instead of restarting forever.
    out.push_str("StartLimitIntervalSec=600\nStartLimitBurst=10\n\n");
    out.push_str("[Service]\nType=simple\n");
    let mut exec = systemd_quote(&spec.program.to_string_lossy());
    for a in &spec.args {
        exec.push(' ');
        exec.push_str(&systemd_quote(a));
    }
    let _ = writeln!(out, "ExecStart={exec}");
    for (k, v) in &spec.env {
        let _ = writeln!(out, "Environment={}", systemd_quote(&format!("{k}={v}")));
    }
    let _ = writeln!(out, "Restart=on-failure\nRestartSec={SYSTEMD_RESTART_SEC}");
    if features.restart_backoff {
        let _ = writeln!(out, "RestartSteps={SYSTEMD_RESTART_STEPS}\nRestartMaxDelaySec={SYSTEMD_RESTART_MAX_DELAY_S}");
    }
    out.push_str("\n[Install]\nWantedBy=default.target\n");
    out
}

/// `systemctl --user show tilewised.service -p LoadState -p ActiveState -p SubState -p MainPID
/// -p ExecMainStatus` (KEY=VALUE lines).
pub fn parse_systemctl_show(text: &str) -> RuntimeState {
    let get = |key: &str| text.lines().find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix('='))).map(str::trim);
    let pid = get("MainPID").and_then(|p| p.parse::<u32>().ok()).filter(|p| *p != 0);
    let active = get("ActiveState").unwrap_or("unknown");
    let sub = get("SubState").unwrap_or("unknown");
    RuntimeState {
        loaded: get("LoadState") == Some("loaded"),
        running: active == "active" && sub == "running",
        pid,
        last_exit: get("ExecMainStatus").and_then(|s| s.parse().ok()),
        detail: Some(format!("{active} ({sub})")),
    }
}

// ------------------------------------------------------------------------------------------------
// Install / uninstall / status
// ------------------------------------------------------------------------------------------------

/// What the service manager says about the service now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RuntimeState {
    pub loaded: bool,
    pub running: bool,
    pub pid: Option<u32>,
    pub last_exit: Option<i32>,
    /// Manager-specific words ("active (running)", "failed (failed)").
    pub detail: Option<String>,
}

impl RuntimeState {
    fn not_loaded() -> Self {
        RuntimeState { loaded: false, running: false, pid: None, last_exit: None, detail: None }
    }
}

/// The result of `tilewise service status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServiceStatus {
    pub manager: &'static str,
    pub path: PathBuf,
    pub installed: bool,
    /// The installed file differs from what this version would write (run install again).
    pub stale: bool,
    pub runtime: RuntimeState,
}

/// Output of one command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandOutput {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `launchctl` / `systemctl`. [`SystemRunner`] runs them for real; tests record them.
pub trait CommandRunner {
    fn run(&self, program: &str, args: &[&str]) -> io::Result<CommandOutput>;
}

pub struct SystemRunner;

impl CommandRunner for SystemRunner {
    fn run(&self, program: &str, args: &[&str]) -> io::Result<CommandOutput> {
        let out = std::process::Command::new(program).args(args).output()?;
        Ok(CommandOutput {
            success: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error("cannot remove {path}: {source}")]
    Remove { path: PathBuf, source: io::Error },
    #[error("`{command}` failed: {message}{hint}")]
    Command { command: String, message: String, hint: String },
    #[error("cannot find the home directory for the service file")]
    NoHome,
}

/// Which service manager, and where its file lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Manager {
    Launchd { plist: PathBuf, uid: u32 },
    Systemd { unit: PathBuf },
}

impl Manager {
    /// The manager of this platform, at its conventional path for the current user.
    pub fn for_this_platform() -> Result<Manager, ServiceError> {
        let dirs = directories::BaseDirs::new().ok_or(ServiceError::NoHome)?;
        let uid = unsafe { libc::getuid() };
        if cfg!(target_os = "macos") {
            let plist = dirs.home_dir().join("Library/LaunchAgents").join(format!("{LAUNCHD_LABEL}.plist"));
            Ok(Manager::Launchd { plist, uid })
        } else {
            Ok(Manager::Systemd { unit: dirs.config_dir().join("systemd/user").join(SYSTEMD_UNIT) })
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Manager::Launchd { .. } => "launchd",
            Manager::Systemd { .. } => "systemd --user",
        }
    }

    pub fn path(&self) -> &Path {
        match self {
            Manager::Launchd { plist, .. } => plist,
            Manager::Systemd { unit } => unit,
        }
    }

    /// The file content this version writes for `spec`.
    pub fn render(&self, spec: &ServiceSpec, runner: &dyn CommandRunner) -> String {
        match self {
            Manager::Launchd { .. } => launchd_plist(spec),
            Manager::Systemd { .. } => {
                let version =
                    runner.run("systemctl", &["--version"]).ok().filter(|o| o.success).and_then(|o| parse_systemd_version(&o.stdout));
                systemd_unit(spec, SystemdFeatures::for_version(version))
            }
        }
    }

    /// Writes the service file and asks the manager to load and start it. If the manager call
    /// fails the file stays in place and the error says how to finish by hand.
    pub fn install(&self, spec: &ServiceSpec, runner: &dyn CommandRunner) -> Result<PathBuf, ServiceError> {
        let path = self.path().to_path_buf();
        let content = self.render(spec, runner);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|source| ServiceError::Write { path: path.clone(), source })?;
        }
        if let Manager::Launchd { .. } = self {
            // launchd opens the log files itself and fails silently when their directory is missing.
            std::fs::create_dir_all(&spec.log_dir).map_err(|source| ServiceError::Write { path: spec.log_dir.clone(), source })?;
        }
        write_atomically(&path, &content).map_err(|source| ServiceError::Write { path: path.clone(), source })?;
        match self {
            Manager::Launchd { plist, uid } => {
                let domain = format!("gui/{uid}");
                // Reload if an older version is loaded; "not loaded" is fine here.
                let _ = runner.run("launchctl", &["bootout", &format!("{domain}/{LAUNCHD_LABEL}")]);
                let p = plist.to_string_lossy();
                run_checked(runner, "launchctl", &["bootstrap", &domain, &p], &manual_hint(&format!("launchctl bootstrap {domain} {p}")))?;
            }
            Manager::Systemd { .. } => {
                let hint = manual_hint("systemctl --user daemon-reload && systemctl --user enable --now tilewised.service");
                run_checked(runner, "systemctl", &["--user", "daemon-reload"], &hint)?;
                run_checked(runner, "systemctl", &["--user", "enable", "--now", SYSTEMD_UNIT], &hint)?;
            }
        }
        Ok(path)
    }

    /// Stops and unloads the service and removes its file. Not installed is not an error.
    pub fn uninstall(&self, runner: &dyn CommandRunner) -> Result<bool, ServiceError> {
        let path = self.path().to_path_buf();
        let existed = path.exists();
        match self {
            Manager::Launchd { uid, .. } => {
                let _ = runner.run("launchctl", &["bootout", &format!("gui/{uid}/{LAUNCHD_LABEL}")]);
            }
            Manager::Systemd { .. } => {
                if existed {
                    let _ = runner.run("systemctl", &["--user", "disable", "--now", SYSTEMD_UNIT]);
                }
            }
        }
        if existed {
            std::fs::remove_file(&path).map_err(|source| ServiceError::Remove { path: path.clone(), source })?;
            if let Manager::Systemd { .. } = self {
                let _ = runner.run("systemctl", &["--user", "daemon-reload"]);
            }
        }
        Ok(existed)
    }

    /// Whether the file is installed (and current) and what the manager says about it.
    pub fn status(&self, spec: &ServiceSpec, runner: &dyn CommandRunner) -> ServiceStatus {
        let path = self.path().to_path_buf();
        let installed_text = std::fs::read_to_string(&path).ok();
        let runtime = match self {
            Manager::Launchd { .. } => match runner.run("launchctl", &["list", LAUNCHD_LABEL]) {
                Ok(o) if o.success => parse_launchctl_list(&o.stdout),
                _ => RuntimeState::not_loaded(),
            },
            Manager::Systemd { .. } => match runner.run(
                "systemctl",
                &[
                    "--user",
                    "show",
                    SYSTEMD_UNIT,
                    "-p",
                    "LoadState",
                    "-p",
                    "ActiveState",
                    "-p",
                    "SubState",
                    "-p",
                    "MainPID",
                    "-p",
                    "ExecMainStatus",
                ],
            ) {
                Ok(o) if o.success => parse_systemctl_show(&o.stdout),
                Ok(o) => RuntimeState { detail: Some(o.stderr.trim().to_owned()), ..RuntimeState::not_loaded() },
                Err(e) => RuntimeState { detail: Some(e.to_string()), ..RuntimeState::not_loaded() },
            },
        };
        ServiceStatus {
            manager: self.name(),
            installed: installed_text.is_some(),
            stale: installed_text.as_deref().is_some_and(|t| t != self.render(spec, runner)),
            path,
            runtime,
        }
    }
}

fn manual_hint(command: &str) -> String {
    format!(" (the service file is written; once the problem is fixed, run: {command})")
}

fn run_checked(runner: &dyn CommandRunner, program: &str, args: &[&str], hint: &str) -> Result<(), ServiceError> {
    let command = format!("{program} {}", args.join(" "));
    match runner.run(program, args) {
        Ok(o) if o.success => Ok(()),
        Ok(o) => Err(ServiceError::Command {
            command,
            message: o.stderr.trim().lines().last().unwrap_or("non-zero exit").to_owned(),
            hint: hint.to_owned(),
        }),
        Err(e) => Err(ServiceError::Command { command, message: e.to_string(), hint: hint.to_owned() }),
    }
}

fn write_atomically(path: &Path, content: &str) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, content)?;
    std::fs::rename(&tmp, path)
}

// ------------------------------------------------------------------------------------------------
// `tilewise service ...`
// ------------------------------------------------------------------------------------------------

/// The `tilewise service` subcommands (wired into the CLI in `bin/tilewise.rs`).
#[derive(clap::Subcommand, Debug, Clone)]
pub enum ServiceCmd {
    /// Run tilewised at login (launchd LaunchAgent on macOS, systemd user unit on Linux),
    /// restarted with backoff if it crashes.
    Install,
    /// Stop it and remove the login service.
    Uninstall,
    /// Whether the login service is installed, current, and running.
    Status {
        /// Print JSON for programs instead of text for people.
        #[arg(long)]
        json: bool,
    },
}

/// Runs one `tilewise service` subcommand on this machine. `log_dir` is where launchd writes the
/// daemon's output (`Paths::logs_dir`).
pub fn run_cli(cmd: ServiceCmd, log_dir: PathBuf) -> anyhow::Result<()> {
    let manager = Manager::for_this_platform()?;
    let runner = SystemRunner;
    match cmd {
        ServiceCmd::Install => {
            let spec = ServiceSpec::for_this_install(log_dir)?;
            let path = manager.install(&spec, &runner)?;
            println!("installed {} ({}): tilewised starts at login and now", path.display(), manager.name());
            if !spec.env.is_empty() {
                let names: Vec<&str> = spec.env.iter().map(|(k, _)| k.as_str()).collect();
                println!("with {} from this shell", names.join(", "));
            }
        }
        ServiceCmd::Uninstall => {
            if manager.uninstall(&runner)? {
                println!("removed {} ({})", manager.path().display(), manager.name());
            } else {
                println!("not installed ({} has no {})", manager.name(), manager.path().display());
            }
        }
        ServiceCmd::Status { json } => {
            // The spec only serves the "is the file current" check; no tilewised is needed for it.
            let spec = ServiceSpec::for_this_install(log_dir.clone()).unwrap_or(ServiceSpec {
                program: PathBuf::from("tilewised"),
                args: Vec::new(),
                env: Vec::new(),
                log_dir,
            });
            let st = manager.status(&spec, &runner);
            if json {
                println!("{}", serde_json::to_string_pretty(&st)?);
            } else if !st.installed {
                println!("not installed ({}); `tilewise service install` runs tilewised at login", st.manager);
            } else {
                let r = &st.runtime;
                let state = match (r.loaded, r.running, r.pid) {
                    (false, _, _) => "not loaded".to_string(),
                    (true, true, Some(pid)) => format!("running, pid {pid}"),
                    (true, true, None) => "running".to_string(),
                    (true, false, _) => {
                        format!("not running{}", r.last_exit.map(|c| format!(" (last exit {c})")).unwrap_or_default())
                    }
                };
                println!(
                    "installed {} ({}{}): {state}{}",
                    st.path.display(),
                    st.manager,
                    if st.stale { ", differs from what install would write now: run it again" } else { "" },
                    r.detail.as_deref().map(|d| format!(" [{d}]")).unwrap_or_default()
                );
            }
        }
    }
    Ok(())
}
