//! The words of the tray menu, as pure functions of what the daemon reports, so they are tested
//! without a tray, a window or a daemon.

use serde_json::Value;

/// Speedup ratio (stock time / candidate time) as a signed percentage: 1.031 → "+3.1".
pub fn signed_pct(ratio: f64) -> String {
    format!("{:+.1}", (ratio - 1.0) * 100.0)
}

/// The first line of the tray menu:
/// `Idle`, `Tuning — generation N, best +x.x % [lo, hi]`, `Paused — on battery`,
/// or `Daemon not running` when there is no status at all.
///
/// `status` is the result of `status`; `session` the result of `session.show` for the session that
/// status names (when there is one). The generation is `tuning.detail.generation`, else the search's
/// (`search.generation`), else the highest among the session's candidates; the best is the session's promoted best (or
/// `tuning.detail.best`). Missing fields are left out rather than guessed.
pub fn status_line(status: Option<&Value>, session: Option<&Value>) -> String {
    let Some(status) = status else { return "Daemon not running".to_string() };
    let tuning = &status["tuning"];
    let reason = tuning["reason"].as_str().filter(|r| !r.is_empty());
    match tuning["state"].as_str().unwrap_or("idle") {
        "tuning" => {
            let mut parts = Vec::new();
            let generation = tuning["detail"]["generation"]
                .as_u64()
                .or_else(|| session?["search"]["generation"].as_u64())
                .or_else(|| session?["candidates"].as_array()?.iter().filter_map(|c| c["generation"].as_u64()).max());
            if let Some(generation) = generation {
                parts.push(format!("generation {generation}"));
            }
            let best = session
                .map(|s| &s["best"])
                .filter(|b| b["ratio"].is_f64())
                .or_else(|| Some(&tuning["detail"]["best"]).filter(|b| b["ratio"].is_f64()));
            if let Some(best) = best {
                parts.push(format!("best {}", ratio_with_interval(best)));
            }
            if parts.is_empty() {
                "Tuning".to_string()
            } else {
                format!("Tuning — {}", parts.join(", "))
            }
        }
        "paused" => match reason {
            Some(r) => format!("Paused — {r}"),
            None => "Paused".to_string(),
        },
        "idle" => "Idle".to_string(),
        other => capitalise(other),
    }
}

/// `+3.1 % [+0.8, +5.0]` from `{ratio, lo, hi}`; the interval is omitted when absent.
pub fn ratio_with_interval(v: &Value) -> String {
    let Some(ratio) = v["ratio"].as_f64() else { return "—".to_string() };
    match (v["lo"].as_f64(), v["hi"].as_f64()) {
        (Some(lo), Some(hi)) => format!("{} % [{}, {}]", signed_pct(ratio), signed_pct(lo), signed_pct(hi)),
        _ => format!("{} %", signed_pct(ratio)),
    }
}

fn capitalise(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().collect::<String>() + c.as_str(),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn idle_and_missing_daemon() {
        assert_eq!(status_line(None, None), "Daemon not running");
        assert_eq!(status_line(Some(&json!({"tuning": {"state": "idle", "reason": null}})), None), "Idle");
    }

    #[test]
    fn tuning_shows_generation_and_best_interval() {
        let status = json!({"tuning": {"state": "tuning", "session_id": 3}});
        let show = json!({
            "session": {"id": 3},
            "candidates": [{"generation": 6}, {"generation": 7}, {"generation": 2}],
            "best": {"ratio": 1.031, "lo": 1.008, "hi": 1.05}
        });
        assert_eq!(status_line(Some(&status), Some(&show)), "Tuning — generation 7, best +3.1 % [+0.8, +5.0]");
        // A session without a promoted best yet: no made-up numbers.
        let early = json!({"session": {"id": 3}, "candidates": [{"generation": 0}], "best": null});
        assert_eq!(status_line(Some(&status), Some(&early)), "Tuning — generation 0");
        assert_eq!(status_line(Some(&status), None), "Tuning");
        // The search's own generation counter wins over the candidates' (which may lag behind).
        let searched = json!({"search": {"generation": 9}, "candidates": [{"generation": 7}], "best": null});
        assert_eq!(status_line(Some(&status), Some(&searched)), "Tuning — generation 9");
        // The tuning service's own progress, when it reports one, needs no session.show.
        let detailed = json!({"tuning": {"state": "tuning", "detail": {"generation": 4, "best": {"ratio": 1.1}}}});
        assert_eq!(status_line(Some(&detailed), None), "Tuning — generation 4, best +10.0 %");
    }

    #[test]
    fn slower_candidates_read_negative() {
        assert_eq!(ratio_with_interval(&json!({"ratio": 0.95, "lo": 0.9, "hi": 1.01})), "-5.0 % [-10.0, +1.0]");
        assert_eq!(ratio_with_interval(&json!({"ratio": 1.2})), "+20.0 %");
    }

    #[test]
    fn paused_says_why() {
        let s = json!({"tuning": {"state": "paused", "reason": "on battery"}});
        assert_eq!(status_line(Some(&s), None), "Paused — on battery");
        let s = json!({"tuning": {"state": "paused", "reason": ""}});
        assert_eq!(status_line(Some(&s), None), "Paused");
    }
}
