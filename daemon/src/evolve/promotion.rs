//! When a measured candidate becomes the best policy.
//!
//! A candidate is promoted only when all hold:
//! 1. it passed the correctness gate;
//! 2. the lower bound of its bootstrap 95 % interval of the combined speedup is above 1.0 (it is
//!    faster than stock with evidence, not by luck of one run);
//! 3. it beats the incumbent: its lower bound is above the incumbent's *current* estimate — the
//!    ratio of the incumbent's latest measurement (the session re-measures it now and then, so a
//!    promotion that was lucky does not stay the bar forever).
//!
//! Rule 3 compares a lower bound with a point estimate on purpose: a challenger whose interval
//! merely overlaps the incumbent's ratio is not better *with evidence*, so the incumbent stays.

use serde::{Deserialize, Serialize};

/// What one end-to-end measurement showed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Evidence {
    pub hash: String,
    pub correct: bool,
    pub ratio: Option<f64>,
    pub lo: Option<f64>,
    pub hi: Option<f64>,
}

/// The policy currently served and its current speedup estimate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Incumbent {
    pub hash: String,
    pub ratio: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Decision {
    Promote { reason: String },
    Keep { reason: String },
}

impl Decision {
    pub fn is_promote(&self) -> bool {
        matches!(self, Decision::Promote { .. })
    }
}

pub fn decide(c: &Evidence, incumbent: Option<&Incumbent>) -> Decision {
    let keep = |reason: String| Decision::Keep { reason };
    if !c.correct {
        return keep("failed the correctness gate".into());
    }
    let (Some(ratio), Some(lo)) = (c.ratio, c.lo) else {
        return keep("no timing".into());
    };
    if lo <= 1.0 {
        return keep(format!("interval lower bound {lo:.4} is not above 1.0 (ratio {ratio:.4})"));
    }
    match incumbent {
        Some(inc) if inc.hash == c.hash => keep("already the best policy".into()),
        Some(inc) if lo <= inc.ratio => keep(format!("lower bound {lo:.4} does not beat the incumbent's ratio {:.4}", inc.ratio)),
        Some(inc) => Decision::Promote { reason: format!("lower bound {lo:.4} > 1.0 and > incumbent's ratio {:.4}", inc.ratio) },
        None => Decision::Promote { reason: format!("lower bound {lo:.4} > 1.0; no incumbent") },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(correct: bool, ratio: f64, lo: f64) -> Evidence {
        Evidence { hash: "sha256:c".into(), correct, ratio: Some(ratio), lo: Some(lo), hi: Some(ratio + 0.05) }
    }

    #[test]
    fn rules() {
        assert!(decide(&ev(true, 1.10, 1.02), None).is_promote());
        assert!(!decide(&ev(false, 1.10, 1.02), None).is_promote());
        assert!(!decide(&ev(true, 1.10, 0.99), None).is_promote());
        assert!(!decide(&ev(true, 1.10, 1.00), None).is_promote(), "a bound of exactly 1.0 is not evidence");
        let inc = Incumbent { hash: "sha256:i".into(), ratio: 1.05 };
        assert!(!decide(&ev(true, 1.10, 1.04), Some(&inc)).is_promote());
        assert!(decide(&ev(true, 1.12, 1.06), Some(&inc)).is_promote());
        let same = Incumbent { hash: "sha256:c".into(), ratio: 1.0 };
        assert!(!decide(&ev(true, 1.12, 1.06), Some(&same)).is_promote());
        let mut no_time = ev(true, 1.0, 1.0);
        no_time.lo = None;
        assert!(!decide(&no_time, None).is_promote());
    }
}
