//! `probe::detect()` on the machine running the tests: it must describe a real machine, and describe
//! it the same way twice.

use tilewise::probe::{self, Backend, Device};

#[test]
fn detect_describes_this_machine() {
    let d = probe::detect();
    eprintln!("{}", probe::render_human(&d));
    assert_eq!(d.os, std::env::consts::OS);
    assert!(d.p_cores > 0, "no cores found: {d:?}");
    assert!(!d.perf_levels.is_empty());
    let logical: u32 = d.perf_levels.iter().map(|l| l.logical_cores).sum();
    assert!(logical >= d.p_cores + d.e_cores);
    assert!(d.memory_bytes.unwrap_or(0) > 0, "no memory found: {d:?}");
    let page = d.page_size_bytes.expect("page size");
    assert!(page.is_power_of_two() && page >= 4096);
    if cfg!(target_os = "linux") {
        if cfg!(target_arch = "x86_64") {
            assert!(d.chip.is_some(), "x86 /proc/cpuinfo has a model name");
        }
        let expected = if d.nvidia.is_some() { Backend::Cuda } else { Backend::Cpu };
        assert_eq!(d.backend, expected);
        assert_eq!(d.gpu_cores, None);
    }
    if cfg!(target_os = "macos") {
        assert_eq!(d.backend, Backend::Metal);
        assert!(d.gpu_cores.unwrap_or(0) > 0);
    }
}

#[test]
fn detect_is_stable_and_round_trips_through_json() {
    let a = probe::detect();
    let b = probe::detect();
    assert_eq!(a.fingerprint(), b.fingerprint());
    let fp = a.fingerprint();
    assert!(fp.starts_with("dev-") && fp.len() == 20, "{fp}");
    assert!(fp[4..].chars().all(|c| c.is_ascii_hexdigit()));
    let json = serde_json::to_string(&a).unwrap();
    let back: Device = serde_json::from_str(&json).unwrap();
    assert_eq!(back, a);
    assert_eq!(back.fingerprint(), fp);
    let text = probe::render_human(&a);
    assert!(text.contains(&fp));
    assert!(text.contains(a.backend.as_str()));
}
