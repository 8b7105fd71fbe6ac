//! Latency percentiles (nearest-rank on the sorted samples; no interpolation, so p99 of 10,000
//! samples is the 9,900th value).

use std::time::Duration;

#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Latency {
    pub n: usize,
    pub p50_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
}

/// Percentiles of `samples` (microseconds); all zero for an empty set.
pub fn latency(samples: &mut [f64]) -> Latency {
    if samples.is_empty() {
        return Latency::default();
    }
    samples.sort_by(|a, b| a.total_cmp(b));
    let rank = |p: f64| samples[(((p / 100.0) * samples.len() as f64).ceil() as usize).clamp(1, samples.len()) - 1];
    Latency { n: samples.len(), p50_us: rank(50.0), p99_us: rank(99.0), max_us: samples[samples.len() - 1] }
}

pub fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

impl std::fmt::Display for Latency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "p50 {:.0} µs, p99 {:.0} µs", self.p50_us, self.p99_us)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let mut v: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        let l = latency(&mut v);
        assert_eq!((l.n, l.p50_us, l.p99_us, l.max_us), (100, 50.0, 99.0, 100.0));
        let mut one = vec![7.0];
        assert_eq!(latency(&mut one).p99_us, 7.0);
        assert_eq!(latency(&mut []).n, 0);
    }
}
