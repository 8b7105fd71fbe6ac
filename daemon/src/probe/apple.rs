//! Apple Silicon: pure parsers over the text of `sysctl hw machdep.cpu.brand_string` and
//! `ioreg -rc AGXAccelerator`, and the assembly of a [`Device`] from them. Tested on recorded
//! outputs in `daemon/tests/fixtures/probe/` (see the README there for each fixture's source).

use super::bandwidth::memory_bandwidth_gbs;
use super::{Backend, Device, PerfLevel, Variant};
use std::collections::BTreeMap;

/// What `sysctl hw machdep.cpu.brand_string` told us.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SysctlFacts {
    /// `machdep.cpu.brand_string`, e.g. "Apple M3 Max".
    pub brand: Option<String>,
    /// `hw.optional.arm64: 1`: the hardware is Apple Silicon, even when this process runs under
    /// Rosetta as x86_64 (`sysctl hw` does not list `hw.machine`).
    pub arm64: bool,
    /// `hw.perflevelN.*` for N in 0..`hw.nperflevels`; when the OS has no perflevels (macOS 11),
    /// one level built from `hw.physicalcpu`, `hw.logicalcpu`, `hw.l1dcachesize`, `hw.l2cachesize`.
    pub perf_levels: Vec<PerfLevel>,
    pub memsize: Option<u64>,
    pub cachelinesize: Option<u64>,
    pub pagesize: Option<u64>,
}

/// Parses `sysctl` output lines of the form `name: value` (what `sysctl hw` prints). Unknown names
/// and malformed lines are ignored; a missing value stays `None`.
pub fn parse_sysctl(text: &str) -> SysctlFacts {
    let kv: BTreeMap<&str, &str> = text
        .lines()
        .filter_map(|line| {
            let (k, v) = line.split_once(':')?;
            let k = k.trim();
            (!k.is_empty() && !k.contains(' ')).then_some((k, v.trim()))
        })
        .collect();
    let num = |k: &str| kv.get(k).and_then(|v| v.parse::<u64>().ok());
    let text_of = |k: &str| kv.get(k).map(|v| v.to_string()).filter(|v| !v.is_empty());

    let nlevels = num("hw.nperflevels").unwrap_or_else(|| {
        // Older or trimmed outputs: count the perflevel indices that are present.
        (0..).take_while(|i| kv.contains_key(format!("hw.perflevel{i}.physicalcpu").as_str())).count() as u64
    });
    let mut perf_levels: Vec<PerfLevel> = (0..nlevels)
        .filter_map(|i| {
            let key = |f: &str| format!("hw.perflevel{i}.{f}");
            let physical = num(&key("physicalcpu"))? as u32;
            Some(PerfLevel {
                name: text_of(&key("name")).unwrap_or_else(|| default_level_name(i)),
                physical_cores: physical,
                logical_cores: num(&key("logicalcpu")).map_or(physical, |n| n as u32),
                l1d_bytes: num(&key("l1dcachesize")),
                l2_bytes: num(&key("l2cachesize")),
                cpus_per_l2: num(&key("cpusperl2")).map(|n| n as u32),
            })
        })
        .collect();
    if perf_levels.is_empty() {
        if let Some(physical) = num("hw.physicalcpu") {
            perf_levels.push(PerfLevel {
                name: default_level_name(0),
                physical_cores: physical as u32,
                logical_cores: num("hw.logicalcpu").map_or(physical as u32, |n| n as u32),
                l1d_bytes: num("hw.l1dcachesize"),
                l2_bytes: num("hw.l2cachesize"),
                cpus_per_l2: None,
            });
        }
    }
    SysctlFacts {
        brand: text_of("machdep.cpu.brand_string"),
        arm64: num("hw.optional.arm64") == Some(1),
        perf_levels,
        memsize: num("hw.memsize"),
        cachelinesize: num("hw.cachelinesize"),
        pagesize: num("hw.pagesize"),
    }
}

fn default_level_name(i: u64) -> String {
    match i {
        0 => "Performance".to_string(),
        1 => "Efficiency".to_string(),
        _ => format!("Level {i}"),
    }
}

/// What `ioreg -rc AGXAccelerator` told us about the GPU.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IoregGpu {
    /// The `"model"` property, e.g. "Apple M3 Max".
    pub model: Option<String>,
    /// `"gpu-core-count"`, else `num_cores` inside `"GPUConfigurationVariable"`.
    pub gpu_cores: Option<u32>,
}

/// Parses `ioreg -rc AGXAccelerator` (property lines like `"gpu-core-count" = 40`). The first
/// accelerator's values win.
pub fn parse_ioreg_gpu(text: &str) -> IoregGpu {
    let mut out = IoregGpu::default();
    let mut config_cores = None;
    for line in text.lines() {
        // `ioreg -l` draws the tree with "| |" before properties; `-rc` output has none.
        let line = line.trim_start_matches(|c: char| c == '|' || c.is_whitespace());
        let Some((k, v)) = line.split_once(" = ") else {
            continue;
        };
        let v = v.trim();
        match k.trim() {
            "\"gpu-core-count\"" if out.gpu_cores.is_none() => out.gpu_cores = v.parse().ok(),
            "\"model\"" if out.model.is_none() => out.model = Some(v.trim_matches('"').to_string()).filter(|m| !m.is_empty()),
            "\"GPUConfigurationVariable\"" if config_cores.is_none() => config_cores = dict_number(v, "num_cores"),
            _ => {}
        }
    }
    out.gpu_cores = out.gpu_cores.or(config_cores);
    out
}

/// `"num_cores"=40` inside an ioreg inline dictionary `{"gpu_gen"=15,"num_cores"=40,...}`.
fn dict_number(dict: &str, name: &str) -> Option<u32> {
    let pat = format!("\"{name}\"=");
    let rest = &dict[dict.find(&pat)? + pat.len()..];
    let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
    digits.parse().ok()
}

/// Family and variant from a brand string: "Apple M3 Max" → ("M3", Max), "Apple M4" → ("M4",
/// Base). `None` for anything that is not "Apple M<n>[ Pro| Max| Ultra]".
pub fn parse_brand(brand: &str) -> Option<(String, Variant)> {
    let mut words = brand.split_whitespace();
    if words.next()? != "Apple" {
        return None;
    }
    let family = words.next()?;
    let generation = family.strip_prefix('M')?;
    if generation.is_empty() || !generation.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let variant = match (words.next(), words.next()) {
        (None, _) => Variant::Base,
        (Some("Pro"), None) => Variant::Pro,
        (Some("Max"), None) => Variant::Max,
        (Some("Ultra"), None) => Variant::Ultra,
        _ => return None,
    };
    Some((family.to_string(), variant))
}

/// Builds the [`Device`] of a Mac from its parsed command outputs. Pure. `fallback_arch` (this
/// binary's architecture) is used only when sysctl did not say the hardware is arm64.
pub fn device_from_facts(fallback_arch: &str, s: &SysctlFacts, gpu: &IoregGpu) -> Device {
    // macOS 11 reported "Apple processor" as the brand; the GPU's "model" names the chip there.
    let brand = [&s.brand, &gpu.model]
        .into_iter()
        .flatten()
        .find(|b| parse_brand(b).is_some())
        .or(s.brand.as_ref())
        .or(gpu.model.as_ref())
        .cloned();
    let parsed = brand.as_deref().and_then(parse_brand);
    let arch = if s.arm64 { "aarch64" } else { fallback_arch }.to_string();
    // MLX runs on Metal on any Apple Silicon Mac, whatever architecture this binary was built for.
    let backend = if parsed.is_some() || s.arm64 { Backend::Metal } else { Backend::Cpu };
    let bandwidth = parsed.as_ref().and_then(|(fam, var)| memory_bandwidth_gbs(fam, *var, gpu.gpu_cores));
    Device {
        os: "macos".to_string(),
        arch,
        chip: brand,
        family: parsed.as_ref().map(|(f, _)| f.clone()),
        variant: parsed.as_ref().map(|(_, v)| *v),
        p_cores: s.perf_levels.first().map_or(0, |l| l.physical_cores),
        e_cores: s.perf_levels.iter().skip(1).map(|l| l.physical_cores).sum(),
        perf_levels: s.perf_levels.clone(),
        cache_line_bytes: s.cachelinesize,
        page_size_bytes: s.pagesize,
        memory_bytes: s.memsize,
        gpu_cores: gpu.gpu_cores,
        memory_bandwidth_gbs: bandwidth,
        backend,
        nvidia: None,
    }
}
