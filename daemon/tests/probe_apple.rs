//! The macOS probe's parsers on recorded `sysctl hw` + `sysctl machdep.cpu.brand_string` and
//! `ioreg -rc AGXAccelerator` outputs of eight Apple chips (sources: fixtures/probe/README.md).
//! Every field the probe reports is checked against the exact value of that machine.

use std::path::PathBuf;
use tilewise::probe::apple::{device_from_facts, parse_brand, parse_ioreg_gpu, parse_sysctl, IoregGpu, SysctlFacts};
use tilewise::probe::{Backend, Device, PerfLevel, Variant};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;

fn fixture(name: &str, file: &str) -> String {
    let path: PathBuf = [env!("CARGO_MANIFEST_DIR"), "tests/fixtures/probe", name, file].iter().collect();
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn parsed(name: &str) -> (SysctlFacts, IoregGpu, Device) {
    let s = parse_sysctl(&fixture(name, "sysctl.txt"));
    let g = parse_ioreg_gpu(&fixture(name, "ioreg.txt"));
    // The binary's own arch must not matter on Apple Silicon: pass x86_64 (Rosetta) on purpose.
    let d = device_from_facts("x86_64", &s, &g);
    (s, g, d)
}

fn level(name: &str, cores: u32, l1d: u64, l2: u64, per_l2: Option<u32>) -> PerfLevel {
    PerfLevel {
        name: name.to_string(),
        physical_cores: cores,
        logical_cores: cores,
        l1d_bytes: Some(l1d),
        l2_bytes: Some(l2),
        cpus_per_l2: per_l2,
    }
}

/// What each fixture must produce.
struct Expected {
    fixture: &'static str,
    chip: &'static str,
    family: &'static str,
    variant: Variant,
    levels: Vec<PerfLevel>,
    memory: u64,
    gpu_cores: u32,
    bandwidth: f64,
}

fn expected() -> Vec<Expected> {
    let p = |n, l2, per| level("Performance", n, 128 * KIB, l2, Some(per));
    let e = |n, l2, per| level("Efficiency", n, 64 * KIB, l2, Some(per));
    vec![
        Expected {
            fixture: "apple-m1",
            chip: "Apple M1",
            family: "M1",
            variant: Variant::Base,
            levels: vec![p(4, 12 * MIB, 4), e(4, 4 * MIB, 4)],
            memory: 16 * GIB,
            gpu_cores: 8,
            bandwidth: 68.25,
        },
        Expected {
            // macOS 11: no perflevels, brand "Apple processor"; the chip comes from ioreg's model
            // and the single level from hw.physicalcpu / hw.l1dcachesize / hw.l2cachesize.
            fixture: "apple-m1-macos11",
            chip: "Apple M1",
            family: "M1",
            variant: Variant::Base,
            levels: vec![level("Performance", 8, 64 * KIB, 4 * MIB, None)],
            memory: 8 * GIB,
            gpu_cores: 8,
            bandwidth: 68.25,
        },
        Expected {
            fixture: "apple-m2-pro",
            chip: "Apple M2 Pro",
            family: "M2",
            variant: Variant::Pro,
            levels: vec![p(8, 16 * MIB, 4), e(4, 4 * MIB, 4)],
            memory: 16 * GIB,
            gpu_cores: 19,
            bandwidth: 200.0,
        },
        Expected {
            fixture: "apple-m3-max",
            chip: "Apple M3 Max",
            family: "M3",
            variant: Variant::Max,
            levels: vec![p(10, 16 * MIB, 5), e(4, 4 * MIB, 4)],
            memory: 36 * GIB,
            gpu_cores: 30,
            bandwidth: 300.0,
        },
        Expected {
            fixture: "apple-m4",
            chip: "Apple M4",
            family: "M4",
            variant: Variant::Base,
            levels: vec![p(4, 16 * MIB, 4), e(6, 4 * MIB, 6)],
            memory: 16 * GIB,
            gpu_cores: 10,
            bandwidth: 120.0,
        },
        Expected {
            fixture: "apple-m4-max",
            chip: "Apple M4 Max",
            family: "M4",
            variant: Variant::Max,
            levels: vec![p(12, 16 * MIB, 6), e(4, 4 * MIB, 4)],
            memory: 64 * GIB,
            gpu_cores: 40,
            bandwidth: 546.0,
        },
        Expected {
            fixture: "apple-m1-ultra",
            chip: "Apple M1 Ultra",
            family: "M1",
            variant: Variant::Ultra,
            levels: vec![p(16, 12 * MIB, 4), e(4, 4 * MIB, 2)],
            memory: 128 * GIB,
            gpu_cores: 64,
            bandwidth: 800.0,
        },
        Expected {
            // macOS 26 names the M5's top level "Super"; the name is reported as the OS gives it.
            fixture: "apple-m5",
            chip: "Apple M5",
            family: "M5",
            variant: Variant::Base,
            levels: vec![level("Super", 4, 128 * KIB, 16 * MIB, Some(4)), e(6, 6 * MIB, 6)],
            memory: 24 * GIB,
            gpu_cores: 10,
            bandwidth: 153.0,
        },
    ]
}

#[test]
fn every_apple_fixture_parses_to_its_exact_device() {
    for x in expected() {
        let (s, g, d) = parsed(x.fixture);
        let ctx = x.fixture;
        assert_eq!(s.perf_levels, x.levels, "{ctx}: perf levels");
        assert_eq!(s.memsize, Some(x.memory), "{ctx}: hw.memsize");
        assert_eq!(s.cachelinesize, Some(128), "{ctx}: hw.cachelinesize");
        assert_eq!(s.pagesize, Some(16384), "{ctx}: hw.pagesize");
        assert!(s.arm64, "{ctx}: hw.optional.arm64");
        assert_eq!(g.gpu_cores, Some(x.gpu_cores), "{ctx}: gpu-core-count");

        assert_eq!(d.os, "macos", "{ctx}");
        assert_eq!(d.arch, "aarch64", "{ctx}");
        assert_eq!(d.chip.as_deref(), Some(x.chip), "{ctx}: chip");
        assert_eq!(d.family.as_deref(), Some(x.family), "{ctx}: family");
        assert_eq!(d.variant, Some(x.variant), "{ctx}: variant");
        assert_eq!(d.perf_levels, x.levels, "{ctx}");
        assert_eq!(d.p_cores, x.levels[0].physical_cores, "{ctx}: p_cores");
        let e: u32 = x.levels[1..].iter().map(|l| l.physical_cores).sum();
        assert_eq!(d.e_cores, e, "{ctx}: e_cores");
        assert_eq!(d.memory_bytes, Some(x.memory), "{ctx}");
        assert_eq!(d.cache_line_bytes, Some(128), "{ctx}");
        assert_eq!(d.page_size_bytes, Some(16384), "{ctx}");
        assert_eq!(d.gpu_cores, Some(x.gpu_cores), "{ctx}");
        assert_eq!(d.memory_bandwidth_gbs, Some(x.bandwidth), "{ctx}: bandwidth");
        assert_eq!(d.backend, Backend::Metal, "{ctx}");
        assert_eq!(d.nvidia, None, "{ctx}");
    }
}

#[test]
fn sysctl_brand_and_ioreg_model_are_read_verbatim() {
    let (s, g, _) = parsed("apple-m3-max");
    assert_eq!(s.brand.as_deref(), Some("Apple M3 Max"));
    assert_eq!(g.model.as_deref(), Some("Apple M3 Max"));
    let (s, g, _) = parsed("apple-m1-macos11");
    assert_eq!(s.brand.as_deref(), Some("Apple processor"));
    assert_eq!(g.model.as_deref(), Some("Apple M1"));
}

#[test]
fn every_apple_fixture_has_its_own_fingerprint() {
    let mut seen = std::collections::BTreeMap::new();
    for x in expected() {
        let fp = parsed(x.fixture).2.fingerprint();
        if let Some(other) = seen.insert(fp.clone(), x.fixture) {
            panic!("{} and {other} share fingerprint {fp}", x.fixture);
        }
    }
    assert_eq!(seen.len(), 8);
}

#[test]
fn fingerprint_is_pinned_so_a_change_is_deliberate() {
    // Changing which fields are hashed orphans every stored result; if this fails on purpose,
    // bump probe::FINGERPRINT_VERSION and update the value.
    let d = parsed("apple-m3-max").2;
    assert_eq!(d.fingerprint(), "dev-ba29fd336ca6031d");
}

#[test]
fn brand_strings_parse_into_family_and_variant() {
    let cases: [(&str, Option<(&str, Variant)>); 10] = [
        ("Apple M1", Some(("M1", Variant::Base))),
        ("Apple M1 Pro", Some(("M1", Variant::Pro))),
        ("Apple M2 Max", Some(("M2", Variant::Max))),
        ("Apple M3 Ultra", Some(("M3", Variant::Ultra))),
        ("Apple M5", Some(("M5", Variant::Base))),
        ("Apple M10 Pro", Some(("M10", Variant::Pro))),
        ("Apple processor", None),
        ("Apple M4 Extreme", None),
        ("Intel(R) Core(TM) i9-9880H CPU @ 2.30GHz", None),
        ("", None),
    ];
    for (brand, want) in cases {
        let got = parse_brand(brand);
        assert_eq!(got.as_ref().map(|(f, v)| (f.as_str(), *v)), want, "{brand:?}");
    }
}

#[test]
fn gpu_cores_fall_back_to_the_configuration_dictionary() {
    let text = r#"+-o AGXAcceleratorG15X  <class AGXAcceleratorG15X, id 0x100000571>
    {
      "GPUConfigurationVariable" = {"num_gps"=8,"gpu_gen"=15,"num_cores"=40,"num_frags"=40}
      "model" = "Apple M3 Max"
    }"#;
    let g = parse_ioreg_gpu(text);
    assert_eq!(g.gpu_cores, Some(40));
    assert_eq!(g.model.as_deref(), Some("Apple M3 Max"));
}

#[test]
fn ioreg_tree_output_with_pipes_parses_too() {
    // `ioreg -l` prefixes properties with the tree's "| |" (scripts often grep it for the count).
    let text = "  | |   {\n  | |     \"model\" = \"Apple M3 Pro\"\n  | |     \"gpu-core-count\" = 14\n  | |   }\n";
    let g = parse_ioreg_gpu(text);
    assert_eq!(g.gpu_cores, Some(14));
    assert_eq!(g.model.as_deref(), Some("Apple M3 Pro"));
}

#[test]
fn empty_or_foreign_output_gives_unknowns_not_guesses() {
    let s = parse_sysctl("");
    assert_eq!(s, SysctlFacts::default());
    let g = parse_ioreg_gpu("garbage\n\"gpu-core-count\" = many\n");
    assert_eq!(g, IoregGpu::default());
    let d = device_from_facts("x86_64", &s, &g);
    assert_eq!((d.chip, d.family, d.variant), (None, None, None));
    assert_eq!((d.p_cores, d.e_cores), (0, 0));
    assert_eq!((d.gpu_cores, d.memory_bandwidth_gbs), (None, None));
    assert_eq!(d.backend, Backend::Cpu);

    // An Intel Mac: a brand that is not Apple Silicon, no perflevels, no arm64.
    let intel = "hw.ncpu: 16\nhw.physicalcpu: 8\nhw.logicalcpu: 16\nhw.memsize: 34359738368\n\
                 hw.l1dcachesize: 32768\nhw.l2cachesize: 262144\nhw.cachelinesize: 64\n\
                 hw.pagesize: 4096\nmachdep.cpu.brand_string: Intel(R) Core(TM) i9-9880H CPU @ 2.30GHz\n";
    let d = device_from_facts("x86_64", &parse_sysctl(intel), &IoregGpu::default());
    assert_eq!(d.family, None);
    assert_eq!(d.backend, Backend::Cpu);
    assert_eq!(d.arch, "x86_64");
    assert_eq!(
        d.perf_levels,
        vec![PerfLevel {
            name: "Performance".into(),
            physical_cores: 8,
            logical_cores: 16,
            l1d_bytes: Some(32768),
            l2_bytes: Some(262144),
            cpus_per_l2: None
        }]
    );
}

#[test]
fn human_rendering_names_levels_as_the_os_does() {
    let text = tilewise::probe::render_human(&parsed("apple-m5").2);
    for want in [
        "Chip          Apple M5 (family M5, base)",
        "System        macos aarch64",
        "CPU cores     10 (4 Super + 6 Efficiency)",
        "  Super       4 cores (4 logical), L1d 128 KiB, L2 16 MiB shared by 4 CPUs",
        "  Efficiency  6 cores (6 logical), L1d 64 KiB, L2 6 MiB shared by 6 CPUs",
        "Memory        24 GiB, bandwidth 153 GB/s",
        "GPU cores     10",
        "MLX backend   metal",
    ] {
        assert!(text.contains(want), "missing {want:?} in\n{text}");
    }
}
