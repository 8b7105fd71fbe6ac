//! The activity-source parsers on recorded outputs (see tests/fixtures/schedule/README.md), and
//! the gates applied to the readings they produce.

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tilewise::schedule::activity::{linux, macos, Activity, ActivitySource, LinuxSource, Thermal};
use tilewise::schedule::{Gate, Gates};

fn fixture_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/schedule").join(name)
}

fn fixture(name: &str) -> String {
    std::fs::read_to_string(fixture_path(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

// ---- macOS ----------------------------------------------------------------------------------

#[test]
fn hid_idle_time_is_read_from_the_iohidsystem_entry_in_nanoseconds() {
    let idle = macos::parse_hid_idle(&fixture("ioreg-c-IOHIDSystem.txt")).unwrap();
    assert_eq!(idle, Duration::from_nanos(187_654_321_000));
    let idle = macos::parse_hid_idle(&fixture("ioreg-c-IOHIDSystem-r-k-HIDIdleTime.txt")).unwrap();
    assert_eq!(idle, Duration::from_nanos(151_627_250));
}

#[test]
fn hid_idle_time_of_other_entries_is_ignored() {
    // A decoy entry before IOHIDSystem carries the same key: only IOHIDSystem's value counts.
    let text = "+-o Root  <class IORegistryEntry, id 0x100000100, retain 29>\n\
                  +-o SomeDriver  <class IOHIDEventDriver, id 0x1, registered>\n\
                  | {\n\
                  |   \"HIDIdleTime\" = 1\n\
                  | }\n\
                  +-o IOHIDSystem  <class IOHIDSystem, id 0x2, registered, matched, active>\n\
                  | {\n\
                  |   \"HIDIdleTime\" = 42000000000\n\
                  | }\n";
    assert_eq!(macos::parse_hid_idle(text).unwrap(), Duration::from_secs(42));
}

#[test]
fn hid_idle_time_errors_say_what_is_wrong() {
    let none = macos::parse_hid_idle("+-o IOHIDSystem  <class IOHIDSystem>\n").unwrap_err();
    assert!(none.to_string().contains("no IOHIDSystem entry with HIDIdleTime"), "{none}");
    let bad = macos::parse_hid_idle("+-o IOHIDSystem  <class IOHIDSystem>\n  \"HIDIdleTime\" = oops\n").unwrap_err();
    assert!(bad.to_string().contains("oops"), "{bad}");
    assert!(macos::parse_hid_idle("").is_err());
}

#[test]
fn pmset_batt_reports_power_source_and_charge() {
    let cases = [
        ("pmset-g-batt-ac-charged.txt", true, Some(100), Some("charged")),
        ("pmset-g-batt-battery.txt", false, Some(95), Some("discharging")),
        ("pmset-g-batt-ac-not-charging.txt", true, Some(88), Some("AC attached")),
        ("pmset-g-batt-battery-no-estimate.txt", false, Some(90), Some("discharging")),
        ("pmset-g-batt-desktop.txt", true, None, None),
    ];
    for (file, ac, percent, state) in cases {
        let b = macos::parse_pmset_batt(&fixture(file)).unwrap();
        assert_eq!(b.on_ac_power, ac, "{file}");
        assert_eq!(b.percent, percent, "{file}");
        assert_eq!(b.state.as_deref(), state, "{file}");
    }
    assert!(macos::parse_pmset_batt("garbage").is_err());
}

#[test]
fn pmset_low_power_mode_reads_both_spellings() {
    assert!(!macos::parse_pmset_low_power(&fixture("pmset-g-lowpowermode-off.txt")));
    assert!(macos::parse_pmset_low_power(&fixture("pmset-g-lowpowermode-on.txt")));
    assert!(macos::parse_pmset_low_power(&fixture("pmset-g-powermode-low.txt")));
    assert!(!macos::parse_pmset_low_power(&fixture("pmset-g-powermode-high.txt")));
    assert!(!macos::parse_pmset_low_power(&fixture("pmset-g-no-lowpowermode.txt")));
}

#[test]
fn pmset_therm_maps_to_thermal_levels() {
    let cases = [
        ("pmset-g-therm-apple-silicon.txt", Thermal::Nominal),
        ("pmset-g-therm-intel-nominal.txt", Thermal::Nominal),
        ("pmset-g-therm-throttled.txt", Thermal::Critical),
        ("pmset-g-therm-throttled-28.txt", Thermal::Critical),
        ("pmset-g-therm-warning-level.txt", Thermal::Serious),
    ];
    for (file, want) in cases {
        assert_eq!(macos::parse_pmset_therm(&fixture(file)), want, "{file}");
    }
    assert_eq!(macos::parse_pmset_therm("\tCPU_Speed_Limit \t= 80\n"), Thermal::Fair);
    assert_eq!(macos::parse_pmset_therm("x Thermal Warning Level = 10\n"), Thermal::Critical);
    assert_eq!(macos::parse_pmset_therm(""), Thermal::Unknown);
    assert_eq!(macos::parse_pmset_therm("something unrelated"), Thermal::Unknown);
}

// ---- Linux ----------------------------------------------------------------------------------

#[test]
fn logind_idle_hint_counts_only_for_a_desktop_that_manages_it() {
    let now = UNIX_EPOCH + Duration::from_secs(1_764_201_600 + 600);
    let idle = linux::parse_loginctl_session(&fixture("loginctl-show-session-wayland-idle.txt")).unwrap();
    assert!(idle.is_managed_graphical());
    assert_eq!(idle.user_idle(now), Duration::from_secs(600));

    let active = linux::parse_loginctl_session(&fixture("loginctl-show-session-x11-active.txt")).unwrap();
    assert!(active.is_managed_graphical());
    assert_eq!(active.user_idle(now), Duration::ZERO);

    let tty = linux::parse_loginctl_session(&fixture("loginctl-show-session-tty.txt")).unwrap();
    assert!(!tty.is_managed_graphical());
    assert!(linux::parse_loginctl_session("Type=x11\n").is_err());

    assert_eq!(linux::parse_loginctl_display(&fixture("loginctl-show-user-display.txt")).as_deref(), Some("2"));
    assert_eq!(linux::parse_loginctl_display(&fixture("loginctl-show-user-no-display.txt")), None);
}

#[test]
fn input_interrupts_count_keyboard_and_touchpad_lines_only() {
    let counts = linux::parse_input_interrupts(&fixture("proc-interrupts-laptop.txt"));
    assert_eq!(counts.len(), 2, "{counts:?}");
    assert_eq!(counts["1:IR-IO-APIC 1-edge i8042"], 3992 + 490, "summed over CPUs");
    assert_eq!(counts["12:IR-IO-APIC 12-edge i8042"], 0);
    assert!(linux::parse_input_interrupts(&fixture("proc-interrupts-vm.txt")).is_empty());
}

#[test]
fn power_supplies_decide_ac() {
    use linux::PowerSupply;
    let sup = |kind: &str, online: Option<bool>, status: Option<&str>| PowerSupply {
        name: kind.into(),
        kind: kind.into(),
        online,
        status: status.map(Into::into),
        capacity: None,
    };
    assert!(linux::on_ac_power(&[]), "no supply at all is a desktop/server: on AC");
    assert!(!linux::on_ac_power(&[sup("Mains", Some(false), None), sup("Battery", None, Some("Discharging"))]));
    assert!(linux::on_ac_power(&[sup("Mains", Some(true), None), sup("Battery", None, Some("Charging"))]));
    assert!(linux::on_ac_power(&[sup("USB", Some(true), None), sup("Battery", None, Some("Discharging"))]));
    assert!(linux::on_ac_power(&[sup("Battery", None, Some("Full"))]));
}

#[test]
fn linux_source_reads_a_laptop_on_battery() {
    let src = LinuxSource::with_root(fixture_path("sysroot-laptop-battery"));
    let a = src.sample().unwrap();
    assert!(!a.on_ac_power);
    assert_eq!(a.battery_percent, Some(57));
    assert!(a.low_power_mode);
    assert_eq!(a.thermal, Thermal::Serious, "97 °C is past the 95 °C passive trip");
    // The PS/2 interrupt line exists: input activity is the signal; the first reading is "now".
    assert_eq!(a.source, "linux-input");
    assert!(a.user_idle < Duration::from_secs(5));
}

#[test]
fn linux_source_reads_a_laptop_on_ac_and_a_headless_server() {
    let a = LinuxSource::with_root(fixture_path("sysroot-laptop-ac")).sample().unwrap();
    assert!(a.on_ac_power);
    assert!(!a.low_power_mode);
    assert_eq!(a.thermal, Thermal::Nominal);

    let s = LinuxSource::with_root(fixture_path("sysroot-server")).sample().unwrap();
    assert!(s.on_ac_power, "no power supply: on AC");
    assert_eq!(s.thermal, Thermal::Unknown);
    assert_eq!(s.source, "linux-headless");
}

// ---- gates ----------------------------------------------------------------------------------

fn reading() -> Activity {
    Activity {
        user_idle: Duration::from_secs(600),
        on_ac_power: true,
        battery_percent: Some(80),
        low_power_mode: false,
        thermal: Thermal::Nominal,
        load_1m: 0.2,
        source: "test",
    }
}

fn gates() -> Gates {
    Gates { idle_seconds: 300.0, max_load_1m: Some(1.0), ..Gates::default() }
}

#[test]
fn gates_pass_an_idle_machine_on_ac() {
    let now = SystemTime::now();
    let d = gates().decide(&reading(), now);
    assert!(d.run && d.may_start, "{d:?}");
    assert!(d.blocked_by.is_empty());
    assert_eq!(d.user_active_at, Some(now - Duration::from_secs(600)));
}

#[test]
fn each_gate_blocks_with_a_readable_reason() {
    let now = SystemTime::now();
    let cases: Vec<(Activity, Gate, &str)> = vec![
        (Activity { user_idle: Duration::from_secs(12), ..reading() }, Gate::Idle, "user active 12 s ago (needs 5 min idle)"),
        (Activity { on_ac_power: false, battery_percent: Some(57), ..reading() }, Gate::AcPower, "on battery (57 %)"),
        (Activity { low_power_mode: true, ..reading() }, Gate::LowPowerMode, "Low Power Mode is on"),
        (Activity { thermal: Thermal::Serious, ..reading() }, Gate::Thermal, "thermal state serious (limit nominal)"),
        (Activity { load_1m: 1.5, ..reading() }, Gate::Load, "system load 1.50 (limit 1.00)"),
    ];
    for (a, gate, reason) in cases {
        let d = gates().decide(&a, now);
        assert!(!d.may_start);
        // Load only keeps a new session from starting: a running one loads the machine itself.
        assert_eq!(d.run, gate == Gate::Load, "{gate:?}");
        assert_eq!(d.blocked_by, vec![gate]);
        assert_eq!(d.reasons, vec![reason.to_string()]);
    }
    // Several at once: all reasons, in gate order.
    let a = Activity { user_idle: Duration::from_secs(3), on_ac_power: false, battery_percent: None, ..reading() };
    let d = gates().decide(&a, now);
    assert_eq!(d.blocked_by, vec![Gate::Idle, Gate::AcPower]);
    assert_eq!(d.summary(), "user active 3 s ago (needs 5 min idle); on battery");
}

#[test]
fn gates_can_be_relaxed() {
    let g = Gates {
        auto_start: true,
        idle_seconds: 0.0,
        require_ac_power: false,
        block_in_low_power_mode: false,
        max_thermal: Thermal::Critical,
        max_load_1m: None,
    };
    let a = Activity {
        user_idle: Duration::ZERO,
        on_ac_power: false,
        low_power_mode: true,
        thermal: Thermal::Critical,
        load_1m: 99.0,
        ..reading()
    };
    assert!(g.decide(&a, SystemTime::now()).run);
    // A platform that cannot tell its thermal state does not block tuning.
    assert!(gates().decide(&Activity { thermal: Thermal::Unknown, ..reading() }, SystemTime::now()).run);
    let fair_ok = Gates { max_thermal: Thermal::Fair, ..gates() };
    assert!(fair_ok.decide(&Activity { thermal: Thermal::Fair, ..reading() }, SystemTime::now()).run);
    assert!(!fair_ok.decide(&Activity { thermal: Thermal::Serious, ..reading() }, SystemTime::now()).run);
}

#[test]
fn gates_come_from_the_idle_section_of_the_config() {
    let text = "[idle]\nenabled = false\nmin_idle_s = 90\nrequire_ac_power = false\n\
                block_in_low_power_mode = false\nmax_cpu_load = 0.25\nmax_thermal_level = 1\n";
    let config = tilewise::config::Config::from_toml_str(text).unwrap();
    let g = Gates::from_config(&config.idle);
    let cpus = std::thread::available_parallelism().unwrap().get() as f64;
    assert_eq!(
        g,
        Gates {
            auto_start: false,
            idle_seconds: 90.0,
            require_ac_power: false,
            block_in_low_power_mode: false,
            max_thermal: Thermal::Fair,
            max_load_1m: Some(0.25 * cpus),
        }
    );
    let d = Gates::default();
    assert!(d.auto_start && d.require_ac_power && d.block_in_low_power_mode);
    assert_eq!((d.idle_seconds, d.max_thermal), (300.0, Thermal::Nominal));
}
