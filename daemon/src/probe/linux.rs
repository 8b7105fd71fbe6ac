//! Linux: cores and caches from sysfs, the CPU's name from /proc/cpuinfo, memory from sysinfo, the
//! page size from `sysconf`, and an NVIDIA GPU from `nvidia-smi`.
//!
//! Every reader takes a root path or text so the tests run it on recorded copies of a real
//! machine's files (`daemon/tests/fixtures/probe/linux-*`). CPUs are grouped into performance levels
//! by (L1d, L2, top frequency), so a hybrid Intel part gets a "Performance" and an "Efficiency"
//! level like Apple Silicon, and a uniform server CPU gets a single level.

use super::{Backend, Device, NvidiaGpu, PerfLevel};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Where the kernel exposes per-CPU topology and caches.
pub const SYSFS_CPU_ROOT: &str = "/sys/devices/system/cpu";

/// One cache as described by `cpuN/cache/indexM/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SysfsCache {
    pub level: u32,
    /// "Data", "Instruction" or "Unified".
    pub kind: String,
    pub size_bytes: Option<u64>,
    /// Logical CPUs sharing this cache instance (`shared_cpu_list`).
    pub shared_cpus: Vec<u32>,
    pub line_bytes: Option<u64>,
}

/// One logical CPU as described by `cpuN/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SysfsCpu {
    pub id: u32,
    pub package: Option<u32>,
    pub core: Option<u32>,
    pub caches: Vec<SysfsCache>,
    /// `cpufreq/cpuinfo_max_freq` (kHz); absent in most VMs.
    pub max_freq_khz: Option<u64>,
}

impl SysfsCpu {
    fn cache(&self, level: u32, data: bool) -> Option<&SysfsCache> {
        self.caches.iter().find(|c| c.level == level && if data { c.kind != "Instruction" } else { true })
    }
    pub fn l1d(&self) -> Option<&SysfsCache> {
        self.cache(1, true)
    }
    pub fn l2(&self) -> Option<&SysfsCache> {
        self.cache(2, true)
    }
}

/// Parses a kernel CPU list such as `0-3,8,10-11`. Malformed parts are skipped.
pub fn parse_cpu_list(text: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for part in text.trim().split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                if let (Ok(a), Ok(b)) = (a.parse::<u32>(), b.parse::<u32>()) {
                    out.extend(a..=b);
                }
            }
            None => out.extend(part.parse::<u32>().ok()),
        }
    }
    out
}

/// Parses a sysfs cache size: `48K`, `2048K`, `1M`, or plain bytes.
pub fn parse_cache_size(text: &str) -> Option<u64> {
    let t = text.trim();
    let (num, mult) = match t.chars().last()? {
        'K' | 'k' => (&t[..t.len() - 1], 1024),
        'M' | 'm' => (&t[..t.len() - 1], 1024 * 1024),
        'G' | 'g' => (&t[..t.len() - 1], 1024 * 1024 * 1024),
        _ => (t, 1),
    };
    num.trim().parse::<u64>().ok().map(|n| n * mult)
}

fn read_trimmed(path: &Path) -> Option<String> {
    std::fs::read_to_string(path).ok().map(|s| s.trim().to_string())
}

fn read_num<T: std::str::FromStr>(path: &Path) -> Option<T> {
    read_trimmed(path)?.parse().ok()
}

/// Reads every online CPU under `root` (normally [`SYSFS_CPU_ROOT`]), sorted by id. A missing root
/// gives an empty list.
pub fn read_sysfs_cpus(root: &Path) -> Vec<SysfsCpu> {
    let online: Option<BTreeSet<u32>> = read_trimmed(&root.join("online")).map(|s| parse_cpu_list(&s).into_iter().collect());
    let Ok(entries) = std::fs::read_dir(root) else {
        return Vec::new();
    };
    let mut cpus: Vec<SysfsCpu> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let id: u32 = name.strip_prefix("cpu")?.parse().ok()?;
            if online.as_ref().is_some_and(|on| !on.contains(&id)) {
                return None;
            }
            Some(read_sysfs_cpu(&e.path(), id))
        })
        .collect();
    cpus.sort_by_key(|c| c.id);
    cpus
}

fn read_sysfs_cpu(dir: &Path, id: u32) -> SysfsCpu {
    let mut caches = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir.join("cache")) {
        let mut idx: Vec<_> =
            entries.flatten().filter(|e| e.file_name().to_string_lossy().starts_with("index")).map(|e| e.path()).collect();
        idx.sort();
        for p in idx {
            let Some(level) = read_num::<u32>(&p.join("level")) else {
                continue;
            };
            caches.push(SysfsCache {
                level,
                kind: read_trimmed(&p.join("type")).unwrap_or_default(),
                size_bytes: read_trimmed(&p.join("size")).and_then(|s| parse_cache_size(&s)),
                shared_cpus: read_trimmed(&p.join("shared_cpu_list")).map(|s| parse_cpu_list(&s)).unwrap_or_default(),
                line_bytes: read_num(&p.join("coherency_line_size")),
            });
        }
    }
    SysfsCpu {
        id,
        package: read_num(&dir.join("topology/physical_package_id")),
        core: read_num(&dir.join("topology/core_id")),
        caches,
        max_freq_khz: read_num(&dir.join("cpufreq/cpuinfo_max_freq")),
    }
}

/// Groups CPUs into performance levels, fastest first: CPUs with the same (top frequency, L1d, L2)
/// form one level, ordered by those values descending (top frequency when cpufreq reports it; an
/// Intel E-core's L1d is smaller than a P-core's, so the order holds in VMs without cpufreq too).
/// Physical cores count distinct (package, core) pairs.
pub fn perf_levels(cpus: &[SysfsCpu]) -> Vec<PerfLevel> {
    // Key sorted descending: (max freq, l1d, l2).
    type Key = (Option<u64>, Option<u64>, Option<u64>);
    let mut groups: BTreeMap<std::cmp::Reverse<Key>, Vec<&SysfsCpu>> = BTreeMap::new();
    for c in cpus {
        let key = (c.max_freq_khz, c.l1d().and_then(|x| x.size_bytes), c.l2().and_then(|x| x.size_bytes));
        groups.entry(std::cmp::Reverse(key)).or_default().push(c);
    }
    let n = groups.len();
    groups
        .into_iter()
        .enumerate()
        .map(|(i, (std::cmp::Reverse((_, l1d, l2)), members))| {
            let cores: BTreeSet<(Option<u32>, u32)> = members.iter().map(|c| (c.package, c.core.unwrap_or(c.id))).collect();
            let first = members[0];
            PerfLevel {
                name: level_name(i, n),
                physical_cores: cores.len() as u32,
                logical_cores: members.len() as u32,
                l1d_bytes: l1d,
                l2_bytes: l2,
                cpus_per_l2: first.l2().map(|c| c.shared_cpus.len() as u32).filter(|&k| k > 0),
            }
        })
        .collect()
}

fn level_name(i: usize, n: usize) -> String {
    match (i, n) {
        (0, _) => "Performance".to_string(),
        (1, 2) => "Efficiency".to_string(),
        _ => format!("Level {i}"),
    }
}

/// The CPU's marketing name from /proc/cpuinfo: `model name` (x86), else `Model` or `Hardware`
/// (some ARM boards). `None` when none is present.
pub fn parse_cpuinfo_model(text: &str) -> Option<String> {
    for key in ["model name", "Model", "Hardware"] {
        let found = text.lines().find_map(|line| {
            let (k, v) = line.split_once(':')?;
            (k.trim() == key && !v.trim().is_empty()).then(|| v.trim().to_string())
        });
        if found.is_some() {
            return found;
        }
    }
    None
}

/// Everything the Linux probe reads, gathered before any interpretation so tests can build it from
/// fixtures.
#[derive(Debug, Clone, Default)]
pub struct LinuxFacts {
    pub arch: String,
    pub cpus: Vec<SysfsCpu>,
    pub cpuinfo: Option<String>,
    pub memory_bytes: Option<u64>,
    pub page_size_bytes: Option<u64>,
    /// Used only when sysfs shows no CPUs: (physical, logical) from sysinfo.
    pub fallback_cores: Option<(u32, u32)>,
    pub nvidia: Vec<NvidiaGpu>,
}

/// Builds the [`Device`] from what was read. Pure.
pub fn device_from_facts(f: &LinuxFacts) -> Device {
    let mut levels = perf_levels(&f.cpus);
    if levels.is_empty() {
        if let Some((physical, logical)) = f.fallback_cores {
            levels.push(PerfLevel {
                name: level_name(0, 1),
                physical_cores: physical,
                logical_cores: logical,
                l1d_bytes: None,
                l2_bytes: None,
                cpus_per_l2: None,
            });
        }
    }
    let p_cores = levels.first().map_or(0, |l| l.physical_cores);
    let e_cores = levels.iter().skip(1).map(|l| l.physical_cores).sum();
    let cache_line_bytes = f.cpus.first().and_then(|c| c.l1d().or(c.caches.first())).and_then(|c| c.line_bytes);
    let nvidia = f.nvidia.first().cloned();
    Device {
        os: "linux".to_string(),
        arch: f.arch.clone(),
        chip: f.cpuinfo.as_deref().and_then(parse_cpuinfo_model),
        family: None,
        variant: None,
        perf_levels: levels,
        p_cores,
        e_cores,
        cache_line_bytes,
        page_size_bytes: f.page_size_bytes,
        memory_bytes: f.memory_bytes,
        gpu_cores: None,
        memory_bandwidth_gbs: None,
        backend: Backend::expected("linux", &f.arch, nvidia.is_some()),
        nvidia,
    }
}

/// Page size of this process's address space.
pub fn page_size() -> Option<u64> {
    // SAFETY: sysconf has no preconditions; it returns -1 for an unknown name.
    let v = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    (v > 0).then_some(v as u64)
}

/// Reads this machine's facts.
pub fn gather() -> LinuxFacts {
    use sysinfo::{MemoryRefreshKind, RefreshKind, System};
    let sys = System::new_with_specifics(RefreshKind::nothing().with_memory(MemoryRefreshKind::nothing().with_ram())).ok();
    let memory_bytes = sys.as_ref().map(|s| s.total_memory()).filter(|&m| m > 0);
    let logical = std::thread::available_parallelism().map_or(0, |n| n.get() as u32);
    let physical = System::physical_core_count().map_or(logical, |n| n as u32);
    LinuxFacts {
        arch: std::env::consts::ARCH.to_string(),
        cpus: read_sysfs_cpus(Path::new(SYSFS_CPU_ROOT)),
        cpuinfo: std::fs::read_to_string("/proc/cpuinfo").ok(),
        memory_bytes,
        page_size_bytes: page_size(),
        fallback_cores: (logical > 0).then_some((physical, logical)),
        nvidia: super::nvidia::query(),
    }
}

/// Probes this Linux machine.
pub fn detect() -> Device {
    device_from_facts(&gather())
}
