//! Unified-memory bandwidth of Apple Silicon chips, in GB/s (10^9 bytes/s), from Apple's published
//! figures. No command reports it, yet it bounds decode speed (every weight is read once per token)
//! and so decides which matmul plans can win. Where one brand ships in two memory configurations
//! (M3 Max, M4 Max) the GPU core count tells them apart; if it is unknown the answer is `None`
//! rather than a guess.

use super::Variant;

/// One row: family, variant, GPU core counts it applies to (`None` = any), GB/s.
type Row = (&'static str, Variant, Option<&'static [u32]>, f64);

const TABLE: &[Row] = &[
    // M1: LPDDR4X-4266 on a 128-bit bus = 68.25 GB/s (Apple's M1 Pro/Max announcement,
    // 2021-10-18, calls M1 Pro's 200 GB/s "nearly 3x" M1).
    ("M1", Variant::Base, None, 68.25),
    // Apple newsroom "Introducing M1 Pro and M1 Max", 2021-10-18: "up to 200GB/s", "up to 400GB/s".
    ("M1", Variant::Pro, None, 200.0),
    ("M1", Variant::Max, None, 400.0),
    // Apple newsroom "Apple unveils M1 Ultra", 2022-03-08: "800GB/s of memory bandwidth".
    ("M1", Variant::Ultra, None, 800.0),
    // Apple newsroom "Apple unveils M2", 2022-06-06: "100GB/s of unified memory bandwidth".
    ("M2", Variant::Base, None, 100.0),
    // Apple newsroom "M2 Pro and M2 Max", 2023-01-17: 200GB/s and 400GB/s.
    ("M2", Variant::Pro, None, 200.0),
    ("M2", Variant::Max, None, 400.0),
    // Apple newsroom "Apple introduces M2 Ultra", 2023-06-05: "800GB/s of memory bandwidth".
    ("M2", Variant::Ultra, None, 800.0),
    // MacBook Pro (14-inch, M3, Nov 2023) tech specs: 100GB/s; M3 Pro: 150GB/s.
    ("M3", Variant::Base, None, 100.0),
    ("M3", Variant::Pro, None, 150.0),
    // MacBook Pro (M3 Max, Nov 2023) tech specs: 14-core CPU / 30-core GPU → 300GB/s;
    // 16-core CPU / 40-core GPU → 400GB/s.
    ("M3", Variant::Max, Some(&[30]), 300.0),
    ("M3", Variant::Max, Some(&[40]), 400.0),
    // Mac Studio (2025) tech specs, M3 Ultra (60- or 80-core GPU): 819GB/s.
    ("M3", Variant::Ultra, None, 819.0),
    // Apple newsroom "Apple introduces M4 chip", 2024-05-07: "120GB/s".
    ("M4", Variant::Base, None, 120.0),
    // Apple newsroom "Apple introduces M4 Pro and M4 Max", 2024-10-30: M4 Pro 273GB/s; M4 Max
    // 14-core CPU / 32-core GPU → 410GB/s, 16-core CPU / 40-core GPU → 546GB/s (MacBook Pro specs).
    ("M4", Variant::Pro, None, 273.0),
    ("M4", Variant::Max, Some(&[32]), 410.0),
    ("M4", Variant::Max, Some(&[40]), 546.0),
    // Apple newsroom "Apple unveils M5", 2025-10-15: "153GB/s of unified memory bandwidth".
    ("M5", Variant::Base, None, 153.0),
    // Apple's M5 Pro / M5 Max announcement (March 2026, as reported by lowyat.net and others): M5
    // Pro "up to 20 GPU cores ... 307GB/s", M5 Max "40 GPU cores ... 614GB/s". Only the top GPU
    // configurations are stated; lesser ones stay unknown until Apple's spec pages are checked.
    ("M5", Variant::Pro, Some(&[20]), 307.0),
    ("M5", Variant::Max, Some(&[40]), 614.0),
];

/// Published bandwidth for a chip, or `None` when it is not in the table (or needs a GPU core
/// count that is unknown).
pub fn memory_bandwidth_gbs(family: &str, variant: Variant, gpu_cores: Option<u32>) -> Option<f64> {
    TABLE
        .iter()
        .find(|(f, v, cores, _)| {
            *f == family
                && *v == variant
                && match cores {
                    None => true,
                    Some(list) => gpu_cores.is_some_and(|n| list.contains(&n)),
                }
        })
        .map(|row| row.3)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_configurations_need_the_gpu_core_count() {
        assert_eq!(memory_bandwidth_gbs("M3", Variant::Max, Some(30)), Some(300.0));
        assert_eq!(memory_bandwidth_gbs("M3", Variant::Max, Some(40)), Some(400.0));
        assert_eq!(memory_bandwidth_gbs("M3", Variant::Max, None), None);
        assert_eq!(memory_bandwidth_gbs("M4", Variant::Max, Some(32)), Some(410.0));
        assert_eq!(memory_bandwidth_gbs("M4", Variant::Max, Some(40)), Some(546.0));
        assert_eq!(memory_bandwidth_gbs("M4", Variant::Max, Some(36)), None);
        assert_eq!(memory_bandwidth_gbs("M5", Variant::Pro, Some(20)), Some(307.0));
        assert_eq!(memory_bandwidth_gbs("M5", Variant::Max, Some(40)), Some(614.0));
        assert_eq!(memory_bandwidth_gbs("M5", Variant::Max, Some(32)), None);
    }

    #[test]
    fn single_configurations_ignore_gpu_cores() {
        assert_eq!(memory_bandwidth_gbs("M1", Variant::Base, Some(7)), Some(68.25));
        assert_eq!(memory_bandwidth_gbs("M1", Variant::Base, None), Some(68.25));
        assert_eq!(memory_bandwidth_gbs("M2", Variant::Pro, Some(19)), Some(200.0));
        assert_eq!(memory_bandwidth_gbs("M4", Variant::Pro, Some(20)), Some(273.0));
        assert_eq!(memory_bandwidth_gbs("M1", Variant::Ultra, Some(64)), Some(800.0));
    }

    #[test]
    fn unknown_chips_have_no_bandwidth() {
        assert_eq!(memory_bandwidth_gbs("M9", Variant::Base, None), None);
        assert_eq!(memory_bandwidth_gbs("M5", Variant::Ultra, None), None);
    }
}
