//! Hardware probe: one [`Device`] record describing what matters for matmul tuning on this machine,
//! and a stable [`Device::fingerprint`] that keys every policy, session and measurement in the store.
//!
//! What is read where, and why:
//!
//! * **macOS (Apple Silicon)** — `sysctl hw machdep.cpu.brand_string` gives the chip brand
//!   ("Apple M3 Max", from which family and variant are parsed), the performance levels
//!   (`hw.perflevelN.{name,physicalcpu,logicalcpu,l1dcachesize,l2cachesize,cpusperl2}`: P and E
//!   clusters differ in core count and cache, which bounds CPU-side work), `hw.memsize`,
//!   `hw.cachelinesize` and `hw.pagesize`. `ioreg -rc AGXAccelerator` gives `gpu-core-count`: the
//!   same brand ships with different GPU core counts (M3 Max 30 or 40) and different memory
//!   bandwidth, and MLX's Metal GEMM tiles depend on both. Both commands' outputs are parsed by
//!   pure functions in [`apple`], tested on recorded outputs; only [`macos`] runs them.
//! * **Linux** — `/sys/devices/system/cpu/cpu*/{topology,cache/index*,cpufreq}` gives the cores
//!   and caches (grouped into performance levels for hybrid CPUs), `/proc/cpuinfo` the model name,
//!   `sysinfo` the installed memory, `sysconf(_SC_PAGESIZE)` the page size, and
//!   `nvidia-smi --query-gpu=...` an NVIDIA GPU when one is present (MLX's CUDA backend).
//!   All parsers in [`linux`] and [`nvidia`] take a root path or text so they run on fixtures.
//! * Memory bandwidth is not reported by any command; it comes from Apple's published figures in
//!   [`bandwidth`], keyed by family, variant and GPU core count.
//!
//! [`detect`] never panics: whatever cannot be read is `None` (or empty), never guessed.

pub mod apple;
pub mod bandwidth;
pub mod linux;
#[cfg(target_os = "macos")]
pub mod macos;
pub mod nvidia;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fmt;

/// Version tag of the fingerprint's canonical form. Changing which fields are hashed changes every
/// fingerprint (and so orphans stored results): bump this only on purpose.
pub const FINGERPRINT_VERSION: &str = "tilewise.device/1";

/// The MLX backend a process on this machine is expected to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Metal,
    Cuda,
    Cpu,
}

impl Backend {
    /// The name used in policies (`target.backend`) and on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Metal => "metal",
            Backend::Cuda => "cuda",
            Backend::Cpu => "cpu",
        }
    }

    /// Metal on Apple Silicon macOS, CUDA where an NVIDIA GPU answers `nvidia-smi`, CPU otherwise.
    pub fn expected(os: &str, arch: &str, has_nvidia_gpu: bool) -> Backend {
        if os == "macos" && arch == "aarch64" {
            Backend::Metal
        } else if has_nvidia_gpu {
            Backend::Cuda
        } else {
            Backend::Cpu
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Apple Silicon variant, from the brand string ("Apple M3 Max" → `Max`; "Apple M4" → `Base`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Variant {
    #[serde(rename = "base")]
    Base,
    Pro,
    Max,
    Ultra,
}

impl Variant {
    pub fn as_str(self) -> &'static str {
        match self {
            Variant::Base => "base",
            Variant::Pro => "Pro",
            Variant::Max => "Max",
            Variant::Ultra => "Ultra",
        }
    }
}

impl fmt::Display for Variant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One class of CPU cores (Apple: a `hw.perflevelN`; Linux: CPUs with the same caches and top
/// frequency). Level 0 is the fastest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PerfLevel {
    /// "Performance", "Efficiency" (Apple's names; Linux uses the same for hybrid CPUs).
    pub name: String,
    pub physical_cores: u32,
    pub logical_cores: u32,
    /// L1 data cache of one core.
    pub l1d_bytes: Option<u64>,
    /// Size of one L2 instance (on Apple Silicon shared by a whole cluster; see `cpus_per_l2`).
    pub l2_bytes: Option<u64>,
    /// How many logical CPUs share one L2 instance.
    pub cpus_per_l2: Option<u32>,
}

/// An NVIDIA GPU as reported by `nvidia-smi`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NvidiaGpu {
    pub name: String,
    pub memory_bytes: Option<u64>,
    pub driver: Option<String>,
    /// "9.0" for an H100.
    pub compute_capability: Option<String>,
}

/// What the probe found. Serialized as-is in `status` replies and `tilewise probe --json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Device {
    /// `std::env::consts::OS`: "macos", "linux".
    pub os: String,
    /// `std::env::consts::ARCH`: "aarch64", "x86_64".
    pub arch: String,
    /// Brand string: "Apple M3 Max", "Intel(R) Xeon(R) Processor".
    pub chip: Option<String>,
    /// Apple Silicon generation, "M1" … "M5".
    pub family: Option<String>,
    pub variant: Option<Variant>,
    /// Fastest first.
    pub perf_levels: Vec<PerfLevel>,
    /// Physical cores of level 0, the fastest ("Performance"; "Super" on M5-generation chips).
    pub p_cores: u32,
    /// Physical cores of all other levels ("Efficiency"; on an M5 Pro/Max the 12 cores Apple
    /// calls "performance" cores, which are still the second level).
    pub e_cores: u32,
    pub cache_line_bytes: Option<u64>,
    pub page_size_bytes: Option<u64>,
    pub memory_bytes: Option<u64>,
    /// Apple GPU cores (`gpu-core-count`); `None` elsewhere.
    pub gpu_cores: Option<u32>,
    /// Unified-memory bandwidth from Apple's published figures ([`bandwidth`]).
    pub memory_bandwidth_gbs: Option<f64>,
    pub backend: Backend,
    pub nvidia: Option<NvidiaGpu>,
}

/// Probes this machine. Never panics; whatever cannot be read is left `None`.
pub fn detect() -> Device {
    #[cfg(target_os = "macos")]
    {
        macos::detect()
    }
    #[cfg(not(target_os = "macos"))]
    {
        linux::detect()
    }
}

impl Device {
    /// The fields that matter for tuning, one `key=value` per line, in a fixed order. Hostnames,
    /// memory size (tuning does not depend on it, and VMs report it inexactly), the derived
    /// bandwidth and the NVIDIA driver version are deliberately left out, so the fingerprint
    /// survives reboots and driver updates.
    pub fn fingerprint_input(&self) -> String {
        fn opt<T: fmt::Display>(v: &Option<T>) -> String {
            v.as_ref().map_or_else(|| "-".to_string(), |v| v.to_string())
        }
        let mut s = String::new();
        let mut line = |k: &str, v: String| {
            s.push_str(k);
            s.push('=');
            s.push_str(&v);
            s.push('\n');
        };
        line("v", FINGERPRINT_VERSION.to_string());
        line("os", self.os.clone());
        line("arch", self.arch.clone());
        line("chip", opt(&self.chip));
        line("family", opt(&self.family));
        line("variant", opt(&self.variant));
        for (i, l) in self.perf_levels.iter().enumerate() {
            line(
                &format!("level{i}"),
                format!(
                    "{},{},{},{},{},{}",
                    l.name,
                    l.physical_cores,
                    l.logical_cores,
                    opt(&l.l1d_bytes),
                    opt(&l.l2_bytes),
                    opt(&l.cpus_per_l2)
                ),
            );
        }
        line("p_cores", self.p_cores.to_string());
        line("e_cores", self.e_cores.to_string());
        line("cache_line", opt(&self.cache_line_bytes));
        line("page_size", opt(&self.page_size_bytes));
        line("gpu_cores", opt(&self.gpu_cores));
        line("backend", self.backend.to_string());
        if let Some(g) = &self.nvidia {
            line("nvidia", format!("{},{},{}", g.name, opt(&g.memory_bytes), opt(&g.compute_capability)));
        }
        s
    }

    /// Stable id of this machine for tuning purposes: `"dev-"` + 16 hex digits of the SHA-256 of
    /// [`Device::fingerprint_input`].
    pub fn fingerprint(&self) -> String {
        let digest = Sha256::digest(self.fingerprint_input().as_bytes());
        format!("dev-{}", &hex::encode(digest)[..16])
    }
}

/// This machine, probed once per process. The hardware does not change while the daemon runs, and
/// probing spawns commands (`nvidia-smi` can take a second), so callers share one result.
pub fn this_machine() -> &'static Device {
    static DEVICE: std::sync::OnceLock<Device> = std::sync::OnceLock::new();
    DEVICE.get_or_init(detect)
}

/// The text `tilewise probe` prints for a person.
pub fn render_human(device: &Device) -> String {
    device.to_string()
}

/// What `tilewise probe --json` prints: `{"fingerprint": "dev-…", "device": {…Device}}`.
pub fn render_json(device: &Device) -> serde_json::Value {
    serde_json::json!({ "fingerprint": device.fingerprint(), "device": device })
}

/// Bytes for a person: whole units where exact ("48 KiB", "16 MiB", "64 GiB"), else one decimal.
fn fmt_bytes(b: u64) -> String {
    const UNITS: [(&str, u64); 3] = [("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)];
    for (name, size) in UNITS {
        if b >= size {
            return if b.is_multiple_of(size) { format!("{} {name}", b / size) } else { format!("{:.1} {name}", b as f64 / size as f64) };
        }
    }
    format!("{b} B")
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNKNOWN: &str = "unknown";
        let chip = self.chip.as_deref().unwrap_or(UNKNOWN);
        match (&self.family, &self.variant) {
            (Some(fam), Some(var)) => writeln!(f, "Chip          {chip} (family {fam}, {var})")?,
            _ => writeln!(f, "Chip          {chip}")?,
        }
        writeln!(f, "System        {} {}", self.os, self.arch)?;
        // Levels by their own names: an M5 Pro's are "Super" and "Performance", not P and E.
        let split: Vec<String> = self.perf_levels.iter().map(|l| format!("{} {}", l.physical_cores, l.name)).collect();
        writeln!(f, "CPU cores     {} ({})", self.p_cores + self.e_cores, split.join(" + "))?;
        for l in &self.perf_levels {
            let mut parts = vec![format!("{} cores ({} logical)", l.physical_cores, l.logical_cores)];
            if let Some(b) = l.l1d_bytes {
                parts.push(format!("L1d {}", fmt_bytes(b)));
            }
            if let Some(b) = l.l2_bytes {
                match l.cpus_per_l2 {
                    Some(1) => parts.push(format!("L2 {} per CPU", fmt_bytes(b))),
                    Some(n) => parts.push(format!("L2 {} shared by {n} CPUs", fmt_bytes(b))),
                    None => parts.push(format!("L2 {}", fmt_bytes(b))),
                }
            }
            writeln!(f, "  {:<12}{}", l.name, parts.join(", "))?;
        }
        let or_unknown = |v: Option<u64>| v.map_or_else(|| UNKNOWN.to_string(), fmt_bytes);
        writeln!(f, "Cache line    {}; page size {}", or_unknown(self.cache_line_bytes), or_unknown(self.page_size_bytes))?;
        let bw = self.memory_bandwidth_gbs.map_or_else(String::new, |g| format!(", bandwidth {g} GB/s"));
        writeln!(f, "Memory        {}{bw}", or_unknown(self.memory_bytes))?;
        if let Some(n) = self.gpu_cores {
            writeln!(f, "GPU cores     {n}")?;
        }
        if let Some(g) = &self.nvidia {
            let mut parts = vec![g.name.clone()];
            if let Some(m) = g.memory_bytes {
                parts.push(fmt_bytes(m));
            }
            if let Some(cc) = &g.compute_capability {
                parts.push(format!("compute {cc}"));
            }
            if let Some(d) = &g.driver {
                parts.push(format!("driver {d}"));
            }
            writeln!(f, "NVIDIA GPU    {}", parts.join(", "))?;
        }
        writeln!(f, "MLX backend   {}", self.backend)?;
        write!(f, "Fingerprint   {}", self.fingerprint())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m3_max() -> Device {
        let level = |name: &str, n, l1d, l2, per| PerfLevel {
            name: name.to_string(),
            physical_cores: n,
            logical_cores: n,
            l1d_bytes: Some(l1d),
            l2_bytes: Some(l2),
            cpus_per_l2: Some(per),
        };
        Device {
            os: "macos".into(),
            arch: "aarch64".into(),
            chip: Some("Apple M3 Max".into()),
            family: Some("M3".into()),
            variant: Some(Variant::Max),
            perf_levels: vec![level("Performance", 10, 131072, 16 << 20, 5), level("Efficiency", 4, 65536, 4 << 20, 4)],
            p_cores: 10,
            e_cores: 4,
            cache_line_bytes: Some(128),
            page_size_bytes: Some(16384),
            memory_bytes: Some(36 << 30),
            gpu_cores: Some(30),
            memory_bandwidth_gbs: Some(300.0),
            backend: Backend::Metal,
            nvidia: None,
        }
    }

    fn h100_host() -> Device {
        Device {
            os: "linux".into(),
            arch: "x86_64".into(),
            chip: Some("Intel(R) Xeon(R) Platinum 8480+".into()),
            family: None,
            variant: None,
            perf_levels: vec![PerfLevel {
                name: "Performance".into(),
                physical_cores: 8,
                logical_cores: 16,
                l1d_bytes: Some(48 << 10),
                l2_bytes: Some(2 << 20),
                cpus_per_l2: Some(2),
            }],
            p_cores: 8,
            e_cores: 0,
            cache_line_bytes: Some(64),
            page_size_bytes: Some(4096),
            memory_bytes: Some(128 << 30),
            gpu_cores: None,
            memory_bandwidth_gbs: None,
            backend: Backend::Cuda,
            nvidia: Some(NvidiaGpu {
                name: "NVIDIA H100 80GB HBM3".into(),
                memory_bytes: Some(81559 << 20),
                driver: Some("580.159.04".into()),
                compute_capability: Some("9.0".into()),
            }),
        }
    }

    #[test]
    fn probe_fingerprint_has_the_documented_shape_and_is_deterministic() {
        let fp = m3_max().fingerprint();
        assert_eq!(fp.len(), 20);
        assert!(fp.starts_with("dev-"));
        assert!(fp[4..].chars().all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        assert_eq!(fp, m3_max().fingerprint());
        assert_eq!(fp, m3_max().clone().fingerprint());
    }

    #[test]
    fn probe_fingerprint_ignores_volatile_and_derived_fields() {
        let base = m3_max();
        let mut d = base.clone();
        d.memory_bytes = Some(48 << 30);
        d.memory_bandwidth_gbs = None;
        assert_eq!(d.fingerprint(), base.fingerprint(), "memory size and bandwidth");

        let host = h100_host();
        let mut d = host.clone();
        d.nvidia.as_mut().unwrap().driver = Some("590.10.01".into());
        d.memory_bytes = Some(127 << 30);
        assert_eq!(d.fingerprint(), host.fingerprint(), "driver update and memory");
    }

    #[test]
    fn probe_fingerprint_changes_with_anything_that_matters_for_tuning() {
        let base = m3_max();
        type Change = Box<dyn Fn(&mut Device)>;
        let variants: Vec<(&str, Change)> = vec![
            ("gpu cores", Box::new(|d| d.gpu_cores = Some(40))),
            ("chip", Box::new(|d| d.chip = Some("Apple M3 Pro".into()))),
            ("variant", Box::new(|d| d.variant = Some(Variant::Pro))),
            ("family", Box::new(|d| d.family = Some("M4".into()))),
            ("backend", Box::new(|d| d.backend = Backend::Cpu)),
            ("p cores", Box::new(|d| d.perf_levels[0].physical_cores = 12)),
            ("l2", Box::new(|d| d.perf_levels[1].l2_bytes = Some(6 << 20))),
            ("l1d", Box::new(|d| d.perf_levels[0].l1d_bytes = None)),
            ("page size", Box::new(|d| d.page_size_bytes = Some(4096))),
            ("cache line", Box::new(|d| d.cache_line_bytes = Some(64))),
            (
                "levels",
                Box::new(|d| {
                    d.perf_levels.pop();
                }),
            ),
            ("arch", Box::new(|d| d.arch = "x86_64".into())),
        ];
        let mut seen = std::collections::BTreeSet::from([base.fingerprint()]);
        for (what, change) in variants {
            let mut d = base.clone();
            change(&mut d);
            assert!(seen.insert(d.fingerprint()), "changing {what} kept or reused a fingerprint");
        }

        let host = h100_host();
        let mut d = host.clone();
        d.nvidia.as_mut().unwrap().name = "NVIDIA H200".into();
        assert_ne!(d.fingerprint(), host.fingerprint(), "GPU model");
        let mut d = host.clone();
        d.nvidia.as_mut().unwrap().memory_bytes = Some(95830 << 20);
        assert_ne!(d.fingerprint(), host.fingerprint(), "GPU memory");
        let mut d = host.clone();
        d.nvidia = None;
        assert_ne!(d.fingerprint(), host.fingerprint(), "GPU present");
    }

    #[test]
    fn probe_fingerprint_input_is_one_named_line_per_field() {
        // Named lines keep values from running into each other (unknown fields hash as "-").
        let text = m3_max().fingerprint_input();
        assert!(text.starts_with(&format!("v={FINGERPRINT_VERSION}\n")));
        assert!(text.contains("\nchip=Apple M3 Max\n"));
        assert!(text.contains("\nlevel0=Performance,10,10,131072,16777216,5\n"));
        assert!(text.contains("\ngpu_cores=30\n"));
        assert!(!text.contains("memory"), "{text}");
    }

    #[test]
    fn probe_device_json_round_trips_with_documented_field_values() {
        let d = h100_host();
        let v = serde_json::to_value(&d).unwrap();
        assert_eq!(v["backend"], "cuda");
        assert_eq!(v["nvidia"]["compute_capability"], "9.0");
        assert_eq!(serde_json::to_value(m3_max()).unwrap()["variant"], "Max");
        let mut base = m3_max();
        base.variant = Some(Variant::Base);
        assert_eq!(serde_json::to_value(&base).unwrap()["variant"], "base");
        let back: Device = serde_json::from_value(v).unwrap();
        assert_eq!(back, d);
    }

    #[test]
    fn probe_render_human_shows_every_known_field() {
        let text = render_human(&m3_max());
        for want in [
            "Apple M3 Max (family M3, Max)",
            "CPU cores     14 (10 Performance + 4 Efficiency)",
            "Performance 10 cores (10 logical), L1d 128 KiB, L2 16 MiB shared by 5 CPUs",
            "Efficiency  4 cores (4 logical), L1d 64 KiB, L2 4 MiB shared by 4 CPUs",
            "Cache line    128 B; page size 16 KiB",
            "Memory        36 GiB, bandwidth 300 GB/s",
            "GPU cores     30",
            "MLX backend   metal",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
        assert!(text.ends_with(&m3_max().fingerprint()));
        let text = render_human(&h100_host());
        assert!(text.contains("NVIDIA GPU    NVIDIA H100 80GB HBM3, 79.6 GiB, compute 9.0, driver 580.159.04"), "{text}");
        assert!(text.contains("MLX backend   cuda"));
    }

    #[test]
    fn probe_json_report_carries_the_fingerprint_and_the_device() {
        let d = m3_max();
        let v = render_json(&d);
        assert_eq!(v["fingerprint"], d.fingerprint());
        assert_eq!(serde_json::from_value::<Device>(v["device"].clone()).unwrap(), d);
    }

    #[test]
    fn probe_this_machine_is_probed_once() {
        let a = this_machine();
        assert!(std::ptr::eq(a, this_machine()));
        assert_eq!(a.fingerprint(), detect().fingerprint());
    }

    #[test]
    fn probe_expected_backend() {
        assert_eq!(Backend::expected("macos", "aarch64", false), Backend::Metal);
        assert_eq!(Backend::expected("linux", "x86_64", true), Backend::Cuda);
        assert_eq!(Backend::expected("linux", "aarch64", false), Backend::Cpu);
        assert_eq!(Backend::expected("macos", "x86_64", false), Backend::Cpu);
    }
}
