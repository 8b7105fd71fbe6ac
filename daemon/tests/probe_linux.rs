//! The Linux probe's readers on recorded sysfs trees and /proc/cpuinfo (this CI machine's, an
//! H100 host's, and a hybrid Intel layout), and the nvidia-smi parser on a recorded H100 line.
//! Sources: fixtures/probe/README.md.

use std::path::{Path, PathBuf};
use tilewise::probe::linux::{
    device_from_facts, parse_cache_size, parse_cpu_list, parse_cpuinfo_model, perf_levels, read_sysfs_cpus, LinuxFacts, SysfsCache,
};
use tilewise::probe::nvidia::parse_nvidia_smi;
use tilewise::probe::{Backend, NvidiaGpu, PerfLevel};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;

fn fixture_dir(name: &str) -> PathBuf {
    [env!("CARGO_MANIFEST_DIR"), "tests/fixtures/probe", name].iter().collect()
}

fn sysfs(name: &str) -> PathBuf {
    fixture_dir(name).join("sys/devices/system/cpu")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Facts as `linux::gather` would collect them on the recorded machine (memory and page size are
/// given, not read: they come from sysinfo and sysconf, which have no file to record).
fn facts(name: &str, memory: u64, nvidia: &str) -> LinuxFacts {
    LinuxFacts {
        arch: "x86_64".into(),
        cpus: read_sysfs_cpus(&sysfs(name)),
        cpuinfo: Some(read(&fixture_dir(name).join("cpuinfo"))),
        memory_bytes: Some(memory),
        page_size_bytes: Some(4096),
        fallback_cores: None,
        nvidia: parse_nvidia_smi(nvidia),
    }
}

#[test]
fn this_ci_machine_sysfs_reads_exactly() {
    let cpus = read_sysfs_cpus(&sysfs("linux-xeon-2vcpu"));
    assert_eq!(cpus.iter().map(|c| c.id).collect::<Vec<_>>(), [0, 1]);
    let c1 = &cpus[1];
    assert_eq!((c1.package, c1.core, c1.max_freq_khz), (Some(0), Some(1), None));
    let cache = |level, kind: &str, size, shared: Vec<u32>| SysfsCache {
        level,
        kind: kind.to_string(),
        size_bytes: Some(size),
        shared_cpus: shared,
        line_bytes: Some(64),
    };
    assert_eq!(
        c1.caches,
        vec![
            cache(1, "Data", 48 * KIB, vec![1]),
            cache(1, "Instruction", 32 * KIB, vec![1]),
            cache(2, "Unified", 2 * MIB, vec![1]),
            cache(3, "Unified", 300 * MIB, vec![0, 1]),
        ]
    );
}

#[test]
fn this_ci_machine_becomes_its_exact_device() {
    let f = facts("linux-xeon-2vcpu", 24 * GIB, "");
    let d = device_from_facts(&f);
    assert_eq!(d.os, "linux");
    assert_eq!(d.arch, "x86_64");
    assert_eq!(d.chip.as_deref(), Some("Intel(R) Xeon(R) Processor"));
    assert_eq!((d.family.clone(), d.variant), (None, None));
    assert_eq!(
        d.perf_levels,
        vec![PerfLevel {
            name: "Performance".into(),
            physical_cores: 2,
            logical_cores: 2,
            l1d_bytes: Some(48 * KIB),
            l2_bytes: Some(2 * MIB),
            cpus_per_l2: Some(1),
        }]
    );
    assert_eq!((d.p_cores, d.e_cores), (2, 0));
    assert_eq!(d.cache_line_bytes, Some(64));
    assert_eq!(d.page_size_bytes, Some(4096));
    assert_eq!(d.memory_bytes, Some(24 * GIB));
    assert_eq!((d.gpu_cores, d.memory_bandwidth_gbs), (None, None));
    assert_eq!(d.backend, Backend::Cpu);
    assert_eq!(d.nvidia, None);
    // Pinned: a change to the canonical form must be deliberate (bump FINGERPRINT_VERSION).
    assert_eq!(d.fingerprint(), "dev-c13717bf0b9d05c9");
}

#[test]
fn h100_host_becomes_its_exact_device() {
    let dir = fixture_dir("linux-h100-16vcpu");
    let f = facts("linux-h100-16vcpu", 135_148_564_480, &read(&dir.join("nvidia-smi.csv")));
    assert_eq!(f.cpus.len(), 16);
    let d = device_from_facts(&f);
    assert_eq!(d.chip.as_deref(), Some("Intel(R) Xeon(R) Processor"));
    assert_eq!(
        d.perf_levels,
        vec![PerfLevel {
            name: "Performance".into(),
            physical_cores: 16,
            logical_cores: 16,
            l1d_bytes: Some(48 * KIB),
            l2_bytes: Some(2 * MIB),
            cpus_per_l2: Some(1),
        }]
    );
    assert_eq!((d.p_cores, d.e_cores), (16, 0));
    assert_eq!(d.cache_line_bytes, Some(64));
    assert_eq!(d.backend, Backend::Cuda);
    assert_eq!(
        d.nvidia,
        Some(NvidiaGpu {
            name: "NVIDIA H100 80GB HBM3".into(),
            memory_bytes: Some(81559 * MIB),
            driver: Some("580.159.04".into()),
            compute_capability: Some("9.0".into()),
        })
    );
    // The value `tilewise::probe::detect()` printed live on that machine (see the README).
    assert_eq!(d.fingerprint(), "dev-247e487b3d81221d");
}

#[test]
fn this_ci_machine_fixture_matches_the_live_probe() {
    // The recording is of this machine; where the tests run elsewhere this only checks that the
    // live probe works, since the hardware differs.
    let recorded = device_from_facts(&facts("linux-xeon-2vcpu", 24 * GIB, ""));
    let live = tilewise::probe::detect();
    if live.chip == recorded.chip && live.perf_levels == recorded.perf_levels {
        assert_eq!(live.fingerprint(), recorded.fingerprint());
    } else {
        eprintln!("running on other hardware: {:?}", live.chip);
        assert!(live.p_cores > 0);
    }
}

#[test]
fn hybrid_intel_splits_into_performance_and_efficiency_levels() {
    let f = facts("linux-hybrid-i7-12700h", 16 * GIB, "");
    assert_eq!(f.cpus.len(), 20);
    let d = device_from_facts(&f);
    assert_eq!(d.chip.as_deref(), Some("12th Gen Intel(R) Core(TM) i7-12700H"));
    let expected = vec![
        PerfLevel {
            name: "Performance".into(),
            physical_cores: 6,
            logical_cores: 12,
            l1d_bytes: Some(48 * KIB),
            l2_bytes: Some(1280 * KIB),
            cpus_per_l2: Some(2),
        },
        PerfLevel {
            name: "Efficiency".into(),
            physical_cores: 8,
            logical_cores: 8,
            l1d_bytes: Some(32 * KIB),
            l2_bytes: Some(2 * MIB),
            cpus_per_l2: Some(4),
        },
    ];
    assert_eq!(d.perf_levels, expected);
    assert_eq!((d.p_cores, d.e_cores), (6, 8));

    // Without cpufreq (most VMs) the L1d size still puts the P-cores first.
    let mut cpus = f.cpus.clone();
    cpus.iter_mut().for_each(|c| c.max_freq_khz = None);
    assert_eq!(perf_levels(&cpus), expected);
}

#[test]
fn offline_cpus_are_skipped_and_a_missing_root_gives_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    for cpu in ["cpu0", "cpu1", "cpufreq", "cpuidle"] {
        std::fs::create_dir_all(root.join(cpu)).unwrap();
    }
    std::fs::create_dir_all(root.join("cpu0/topology")).unwrap();
    std::fs::write(root.join("cpu0/topology/core_id"), "3\n").unwrap();
    std::fs::write(root.join("online"), "0\n").unwrap();
    let cpus = read_sysfs_cpus(root);
    assert_eq!(cpus.len(), 1);
    assert_eq!((cpus[0].id, cpus[0].core, cpus[0].package), (0, Some(3), None));
    assert!(cpus[0].caches.is_empty());

    assert!(read_sysfs_cpus(&root.join("absent")).is_empty());
    // No sysfs at all: sysinfo's counts stand in, caches stay unknown.
    let d = device_from_facts(&LinuxFacts { arch: "aarch64".into(), fallback_cores: Some((4, 8)), ..Default::default() });
    assert_eq!((d.p_cores, d.e_cores), (4, 0));
    assert_eq!(d.perf_levels[0].logical_cores, 8);
    assert_eq!(d.perf_levels[0].l1d_bytes, None);
    assert_eq!((d.chip, d.cache_line_bytes, d.memory_bytes), (None, None, None));
    assert_eq!(d.backend, Backend::Cpu);
}

#[test]
fn cpu_lists_and_cache_sizes_parse() {
    assert_eq!(parse_cpu_list("0-3,8,10-11\n"), [0, 1, 2, 3, 8, 10, 11]);
    assert_eq!(parse_cpu_list("5"), [5]);
    assert_eq!(parse_cpu_list(""), Vec::<u32>::new());
    assert_eq!(parse_cpu_list("x,2,3-y"), [2]);
    assert_eq!(parse_cache_size("48K\n"), Some(48 * KIB));
    assert_eq!(parse_cache_size("307200K"), Some(300 * MIB));
    assert_eq!(parse_cache_size("1M"), Some(MIB));
    assert_eq!(parse_cache_size("512"), Some(512));
    assert_eq!(parse_cache_size("lots"), None);
    assert_eq!(parse_cache_size(""), None);
}

#[test]
fn cpuinfo_model_name_falls_back_to_arm_board_fields() {
    assert_eq!(parse_cpuinfo_model(&read(&fixture_dir("linux-xeon-2vcpu").join("cpuinfo"))).as_deref(), Some("Intel(R) Xeon(R) Processor"));
    let arm = "processor\t: 0\nBogoMIPS\t: 48.00\nCPU part\t: 0xd08\n\nHardware\t: BCM2835\nModel\t\t: Raspberry Pi 4 Model B Rev 1.4\n";
    assert_eq!(parse_cpuinfo_model(arm).as_deref(), Some("Raspberry Pi 4 Model B Rev 1.4"));
    assert_eq!(parse_cpuinfo_model("processor\t: 0\nmodel name\t:\n"), None);
    assert_eq!(parse_cpuinfo_model(""), None);
}

#[test]
fn nvidia_smi_h100_line_parses_exactly() {
    let text = read(&fixture_dir("linux-h100-16vcpu").join("nvidia-smi.csv"));
    assert_eq!(
        parse_nvidia_smi(&text),
        vec![NvidiaGpu {
            name: "NVIDIA H100 80GB HBM3".into(),
            memory_bytes: Some(81559 * MIB),
            driver: Some("580.159.04".into()),
            compute_capability: Some("9.0".into()),
        }]
    );
}

#[test]
fn nvidia_smi_multiple_gpus_and_unknown_fields() {
    let text = "NVIDIA H100 80GB HBM3, 81559, 550.54.15, 9.0\n\
                NVIDIA GeForce RTX 4090, [N/A], 560.35.03, [Not Supported]\n\
                \n\
                , 100, 1, 2\n";
    let gpus = parse_nvidia_smi(text);
    assert_eq!(gpus.len(), 2);
    assert_eq!(gpus[1].name, "NVIDIA GeForce RTX 4090");
    assert_eq!(gpus[1].memory_bytes, None);
    assert_eq!(gpus[1].driver.as_deref(), Some("560.35.03"));
    assert_eq!(gpus[1].compute_capability, None);
    assert!(parse_nvidia_smi("").is_empty());
    let failure = "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. \
                   Make sure that the latest NVIDIA driver is installed and running.\n";
    assert!(parse_nvidia_smi(failure).is_empty());
}

#[test]
fn an_nvidia_gpu_makes_the_backend_cuda_and_enters_the_fingerprint() {
    let h100 = read(&fixture_dir("linux-h100-16vcpu").join("nvidia-smi.csv"));
    let without = device_from_facts(&facts("linux-xeon-2vcpu", 24 * GIB, ""));
    let with = device_from_facts(&facts("linux-xeon-2vcpu", 24 * GIB, &h100));
    assert_eq!(with.backend, Backend::Cuda);
    assert_eq!(with.nvidia.as_ref().map(|g| g.name.as_str()), Some("NVIDIA H100 80GB HBM3"));
    assert_ne!(with.fingerprint(), without.fingerprint());
}
