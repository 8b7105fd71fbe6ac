//! Login-service files: generated content against fixtures, checked by the real tools where they
//! exist (`systemd-analyze verify`, Python's plistlib), and install/uninstall/status against a
//! temp home with the service-manager calls recorded.

use std::cell::RefCell;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

use tilewise::service::{
    launchd_plist, parse_launchctl_list, parse_systemctl_show, parse_systemd_version, systemd_unit, CommandOutput, CommandRunner, Manager,
    ServiceError, ServiceSpec, SystemdFeatures,
};

fn fixture_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/service").join(name)
}

fn fixture(name: &str) -> String {
    std::fs::read_to_string(fixture_path(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// Compares with a fixture; `TILEWISE_UPDATE_FIXTURES=1` rewrites it (review the diff!).
fn assert_fixture(name: &str, actual: &str) {
    if std::env::var_os("TILEWISE_UPDATE_FIXTURES").is_some() {
        std::fs::write(fixture_path(name), actual).unwrap();
    }
    assert_eq!(actual, fixture(name), "generated {name} differs from the fixture");
}

fn mac_spec() -> ServiceSpec {
    ServiceSpec {
        program: "/Users/alice/.cargo/bin/tilewised".into(),
        args: vec![],
        env: vec![("TILEWISE_HOME".into(), "/Users/alice/tilewise home".into())],
        log_dir: "/Users/alice/Library/Logs/tilewise".into(),
    }
}

fn linux_spec(program: &Path) -> ServiceSpec {
    ServiceSpec {
        program: program.to_path_buf(),
        args: vec![],
        env: vec![
            ("TILEWISE_HOME".into(), "/home/alice/tilewise 100%".into()),
            ("TILEWISE_PYTHON".into(), "/home/alice/.venv/bin/python".into()),
        ],
        log_dir: "/home/alice/.local/share/tilewise/logs".into(),
    }
}

#[test]
fn launchd_plist_matches_fixture_and_escapes_xml() {
    assert_fixture("dev.tilewise.daemon.plist", &launchd_plist(&mac_spec()));
    let odd = ServiceSpec { program: "/Apps/R&D <x>/tilewised".into(), ..mac_spec() };
    let text = launchd_plist(&odd);
    assert!(text.contains("<string>/Apps/R&amp;D &lt;x&gt;/tilewised</string>"), "{text}");
}

#[test]
fn launchd_plist_is_a_valid_property_list() {
    // Python's plistlib is a strict reader of Apple's format; use it where python3 exists.
    let script = "import plistlib,sys,json; d=plistlib.loads(sys.stdin.buffer.read()); print(json.dumps(d))";
    let child = Command::new("python3")
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let Ok(mut child) = child else {
        eprintln!("SKIPPED: python3 not found, plist not parsed");
        return;
    };
    use std::io::Write;
    child.stdin.take().unwrap().write_all(launchd_plist(&mac_spec()).as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "plistlib rejected it: {}", String::from_utf8_lossy(&out.stderr));
    let d: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(d["Label"], "dev.tilewise.daemon");
    assert_eq!(d["ProgramArguments"][0], "/Users/alice/.cargo/bin/tilewised");
    assert_eq!(d["RunAtLoad"], true);
    assert_eq!(d["KeepAlive"]["SuccessfulExit"], false);
    assert_eq!(d["ThrottleInterval"], 30);
    assert_eq!(d["EnvironmentVariables"]["TILEWISE_HOME"], "/Users/alice/tilewise home");
    assert_eq!(d["StandardErrorPath"], "/Users/alice/Library/Logs/tilewise/tilewised.err.log");
}

#[test]
fn systemd_units_match_fixtures_per_systemd_version() {
    let spec = linux_spec(Path::new("/home/alice/.cargo/bin/tilewised"));
    let v252 = parse_systemd_version(&fixture("systemctl-version-252.txt"));
    assert_eq!(v252, Some(252));
    assert_fixture("tilewised-systemd252.service", &systemd_unit(&spec, SystemdFeatures::for_version(v252)));
    assert_fixture("tilewised-systemd254.service", &systemd_unit(&spec, SystemdFeatures::for_version(Some(254))));
    assert!(!fixture("tilewised-systemd252.service").contains("RestartSteps"));
}

/// Runs `systemd-analyze verify` on a unit; Some(problems) or None when the tool is missing.
fn systemd_verify(unit_text: &str) -> Option<String> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tilewised.service");
    std::fs::write(&path, unit_text).unwrap();
    let out = Command::new("systemd-analyze").args(["verify", "--man=no"]).arg(&path).output().ok()?;
    // verify exits 0 on unknown keys but prints them: any output is a problem.
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    Some(if out.status.success() { text.trim().to_owned() } else { format!("exit {}: {text}", out.status) })
}

#[test]
fn systemd_analyze_verifies_the_generated_unit() {
    let installed = Command::new("systemctl").arg("--version").output().ok();
    let version = installed.and_then(|o| parse_systemd_version(&String::from_utf8_lossy(&o.stdout)));
    // The real daemon binary: verify checks that ExecStart exists and is executable.
    let spec = linux_spec(Path::new(env!("CARGO_BIN_EXE_tilewised")));
    let Some(problems) = systemd_verify(&systemd_unit(&spec, SystemdFeatures::for_version(version))) else {
        eprintln!("SKIPPED: systemd-analyze not found; the unit was not verified (apt-get install systemd)");
        return;
    };
    assert_eq!(problems, "", "systemd-analyze verify found problems");
    // The check is not vacuous: a broken unit is reported.
    let broken = systemd_unit(&spec, SystemdFeatures::for_version(version)).replace("Restart=on-failure", "Restart=sometimes");
    assert!(systemd_verify(&broken).unwrap().contains("sometimes"), "verify did not flag a bad Restart=");
    let missing = systemd_unit(&linux_spec(Path::new("/nonexistent/tilewised")), SystemdFeatures::for_version(version));
    assert!(!systemd_verify(&missing).unwrap().is_empty(), "verify did not flag a missing ExecStart");
}

#[test]
fn systemd_quoting_survives_spaces_percent_and_quotes() {
    let spec = ServiceSpec {
        program: "/opt/my apps/tilewised".into(),
        args: vec!["--flag=\"x\"".into()],
        env: vec![("TILEWISE_HOME".into(), "/data/50% \\ full".into())],
        log_dir: "/tmp".into(),
    };
    let unit = systemd_unit(&spec, SystemdFeatures { restart_backoff: false });
    assert!(unit.contains("ExecStart=\"/opt/my apps/tilewised\" \"--flag=\\\"x\\\"\"\n"), "{unit}");
    assert!(unit.contains("Environment=\"TILEWISE_HOME=/data/50%% \\\\ full\"\n"), "{unit}");
}

#[test]
fn manager_state_is_parsed_from_recorded_outputs() {
    let run = parse_launchctl_list(&fixture("launchctl-list-running.txt"));
    assert!(run.loaded && run.running);
    assert_eq!((run.pid, run.last_exit), (Some(4821), Some(0)));
    let crashed = parse_launchctl_list(&fixture("launchctl-list-crashed.txt"));
    assert!(crashed.loaded && !crashed.running);
    assert_eq!(crashed.last_exit, Some(256));

    let s = parse_systemctl_show(&fixture("systemctl-show-running.txt"));
    assert!(s.loaded && s.running);
    assert_eq!(s.pid, Some(31337));
    assert_eq!(s.detail.as_deref(), Some("active (running)"));
    let f = parse_systemctl_show(&fixture("systemctl-show-failed.txt"));
    assert!(f.loaded && !f.running);
    assert_eq!((f.pid, f.last_exit), (None, Some(101)));
    assert!(!parse_systemctl_show(&fixture("systemctl-show-not-found.txt")).loaded);
}

/// Records every command; answers from a script keyed by the command line.
struct Recorder {
    calls: RefCell<Vec<String>>,
    fail: Option<&'static str>,
    answers: Vec<(&'static str, String)>,
}

impl Recorder {
    fn new() -> Self {
        Recorder { calls: RefCell::new(Vec::new()), fail: None, answers: Vec::new() }
    }
    fn calls(&self) -> Vec<String> {
        self.calls.borrow().clone()
    }
}

impl CommandRunner for Recorder {
    fn run(&self, program: &str, args: &[&str]) -> io::Result<CommandOutput> {
        let line = format!("{program} {}", args.join(" "));
        self.calls.borrow_mut().push(line.clone());
        if self.fail.is_some_and(|f| line.starts_with(f)) {
            return Ok(CommandOutput {
                success: false,
                stdout: String::new(),
                stderr: "Failed to connect to bus: No medium found\n".into(),
            });
        }
        let stdout = self.answers.iter().find(|(k, _)| line.starts_with(k)).map(|(_, v)| v.clone()).unwrap_or_default();
        Ok(CommandOutput { success: true, stdout, stderr: String::new() })
    }
}

#[test]
fn systemd_install_status_uninstall_round_trip() {
    let home = tempfile::tempdir().unwrap();
    let unit = home.path().join(".config/systemd/user/tilewised.service");
    let m = Manager::Systemd { unit: unit.clone() };
    let spec = linux_spec(Path::new("/home/alice/.cargo/bin/tilewised"));
    let mut r = Recorder::new();
    r.answers.push(("systemctl --version", fixture("systemctl-version-252.txt")));
    r.answers.push(("systemctl --user show", fixture("systemctl-show-running.txt")));

    let before = m.status(&spec, &r);
    assert!(!before.installed && !before.stale);
    r.calls.borrow_mut().clear();

    assert_eq!(m.install(&spec, &r).unwrap(), unit);
    assert_eq!(std::fs::read_to_string(&unit).unwrap(), fixture("tilewised-systemd252.service"));
    assert_eq!(r.calls(), vec!["systemctl --version", "systemctl --user daemon-reload", "systemctl --user enable --now tilewised.service"]);

    let st = m.status(&spec, &r);
    assert!(st.installed && !st.stale && st.runtime.running, "{st:?}");
    assert_eq!(st.runtime.pid, Some(31337));

    // An edited file (or one from an older version) is reported as stale.
    std::fs::write(&unit, "[Service]\nExecStart=/old\n").unwrap();
    assert!(m.status(&spec, &r).stale);

    r.calls.borrow_mut().clear();
    assert!(m.uninstall(&r).unwrap());
    assert!(!unit.exists());
    assert_eq!(r.calls(), vec!["systemctl --user disable --now tilewised.service", "systemctl --user daemon-reload"]);
    assert!(!m.uninstall(&r).unwrap(), "uninstalling twice is fine");
}

#[test]
fn failed_manager_call_is_a_clear_error_and_keeps_the_file() {
    let home = tempfile::tempdir().unwrap();
    let unit = home.path().join("systemd/user/tilewised.service");
    let m = Manager::Systemd { unit: unit.clone() };
    let mut r = Recorder::new();
    r.fail = Some("systemctl --user daemon-reload");
    let err = m.install(&linux_spec(Path::new("/usr/bin/tilewised")), &r).unwrap_err();
    assert!(matches!(err, ServiceError::Command { .. }));
    let msg = err.to_string();
    assert!(msg.contains("systemctl --user daemon-reload") && msg.contains("No medium found"), "{msg}");
    assert!(msg.contains("systemctl --user enable --now tilewised.service"), "tells how to finish: {msg}");
    assert!(unit.exists(), "the unit file is kept");
}

#[test]
fn launchd_install_status_uninstall_round_trip() {
    let home = tempfile::tempdir().unwrap();
    let plist = home.path().join("Library/LaunchAgents/dev.tilewise.daemon.plist");
    let m = Manager::Launchd { plist: plist.clone(), uid: 501 };
    let spec = ServiceSpec { log_dir: home.path().join("Library/Logs/tilewise"), ..mac_spec() };
    let mut r = Recorder::new();
    r.answers.push(("launchctl list dev.tilewise.daemon", fixture("launchctl-list-running.txt")));

    m.install(&spec, &r).unwrap();
    assert_eq!(std::fs::read_to_string(&plist).unwrap(), launchd_plist(&spec));
    assert!(spec.log_dir.is_dir(), "log directory created for launchd");
    let p = plist.display();
    assert_eq!(r.calls(), vec!["launchctl bootout gui/501/dev.tilewise.daemon".to_string(), format!("launchctl bootstrap gui/501 {p}")]);
    let st = m.status(&spec, &r);
    assert!(st.installed && !st.stale && st.runtime.running);
    assert_eq!(st.manager, "launchd");

    r.calls.borrow_mut().clear();
    assert!(m.uninstall(&r).unwrap());
    assert!(!plist.exists());
    assert_eq!(r.calls(), vec!["launchctl bootout gui/501/dev.tilewise.daemon"]);
}
