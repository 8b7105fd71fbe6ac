//! `tilewise tune`: starts (or attaches to) a tuning session in the daemon and follows it from the
//! event stream with a progress bar (generation, evaluations, best speedup with its interval), then
//! prints a table of what was measured and what is now served.
//!
//! Ctrl-C only detaches: the session keeps running in the daemon (`tilewise tune` again attaches).

use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};
use std::io::IsTerminal;
use std::time::Duration;
use tilewise::ipc::client::Client;
use tilewise::store::{Budget, Event};

#[derive(clap::Args, Debug, Clone, Default)]
pub struct TuneArgs {
    /// Model: a local mlx_lm directory, a Hugging Face id found in the local cache, or
    /// `synthetic:tiny` / `synthetic:qwen2.5-0.5b` (default: tiny on CPU, the 0.5B shape on a GPU).
    #[arg(long)]
    pub model: Option<String>,
    /// How much to spend: a duration (`90s`, `10m`, `1h`) or a number of evaluations (`50evals`, `50`).
    #[arg(long, value_parser = parse_budget)]
    pub budget: Option<Budget>,
    /// Seed of the search (recorded with the session; the same seed proposes the same candidates
    /// given the same measurements).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Stock/candidate pairs per end-to-end evaluation.
    #[arg(long)]
    pub pairs: Option<u32>,
    /// Also ask the LLM endpoint of the config (`[llm]`) for candidates (data only; see
    /// docs/sessions.md).
    #[arg(long)]
    pub llm: bool,
    /// Start the search cold: policies imported from other machines do not seed it.
    #[arg(long)]
    pub cold: bool,
    /// Start the session and return at once.
    #[arg(long)]
    pub detach: bool,
    /// A verification session (`tilewise verify`): measure the model's pending imports.
    #[arg(skip)]
    pub verify: bool,
    /// Print the final session as JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// `10m` / `90s` / `1h30m` → seconds; `50evals`, `50 evaluations`, `50` → evaluations.
pub fn parse_budget(text: &str) -> Result<Budget, String> {
    let t = text.trim().to_lowercase();
    let digits: String = t.chars().take_while(|c| c.is_ascii_digit()).collect();
    let rest = t[digits.len()..].trim();
    if !digits.is_empty() && ["", "e", "eval", "evals", "evaluation", "evaluations"].contains(&rest) {
        let n: u64 = digits.parse().map_err(|e| format!("{text:?}: {e}"))?;
        if n == 0 {
            return Err("the budget must be at least 1 evaluation".into());
        }
        return Ok(Budget { evaluations: Some(n), seconds: None });
    }
    let d = humantime::parse_duration(&t).map_err(|e| {
        // humantime's own words help only when the text began like a duration ("10x": unknown unit).
        let detail = if digits.is_empty() { String::new() } else { format!(" ({e})") };
        format!("{text:?} is neither a duration (10m, 90s, 1h30m) nor a count of evaluations (50evals){detail}")
    })?;
    if d.as_secs() == 0 {
        return Err("the budget must be at least 1 s".into());
    }
    Ok(Budget { evaluations: None, seconds: Some(d.as_secs()) })
}

/// A speedup with its 95 % interval: (ratio, lo, hi).
type Speedup = (f64, f64, f64);

/// Progress as the events tell it.
#[derive(Debug, Default, Clone)]
pub struct Progress {
    pub generation: u64,
    pub evaluations: u64,
    pub failures: u64,
    pub best: Option<Speedup>,
    pub last: Option<String>,
}

impl Progress {
    /// Folds one event of the session in. Returns true when the session ended.
    pub fn apply(&mut self, e: &Event) -> bool {
        let d = &e.data;
        let f = |k: &str| d.get(k).and_then(Value::as_f64);
        match e.kind.as_str() {
            "candidate.measured" => {
                self.evaluations += 1;
                if let Some(g) = d.get("generation").and_then(Value::as_u64) {
                    self.generation = self.generation.max(g);
                }
                if let (Some(r), Some(lo), Some(hi)) = (f("ratio"), f("lo"), f("hi")) {
                    self.last = Some(format!("{} {r:.3}× [{lo:.3}–{hi:.3}]", d["origin"].as_str().unwrap_or("candidate")));
                }
            }
            "candidate.failed" => {
                self.failures += 1;
                self.last = Some(format!("failed: {}", d["reason"].as_str().unwrap_or("?").chars().take(60).collect::<String>()));
            }
            "policy.promoted" => {
                if let (Some(r), Some(lo), Some(hi)) = (f("ratio"), f("lo"), f("hi")) {
                    self.best = Some((r, lo, hi));
                }
            }
            "session.paused" => self.last = Some(format!("paused: {}", d["reason"].as_str().unwrap_or(""))),
            "session.finished" | "session.stopped" => return true,
            _ => {}
        }
        false
    }

    pub fn message(&self) -> String {
        let best = match self.best {
            Some((r, lo, hi)) => format!("best {r:.3}× [{lo:.3}–{hi:.3}]"),
            None => "best: native (nothing proven yet)".into(),
        };
        let failed = if self.failures > 0 { format!(" · {} failed", self.failures) } else { String::new() };
        format!(
            "gen {} · {} evals{failed} · {best}{}",
            self.generation,
            self.evaluations,
            self.last.as_ref().map(|l| format!(" · last {l}")).unwrap_or_default()
        )
    }
}

/// Runs the command. `events` and `rpc` are two connections to the daemon (one becomes the event
/// stream).
pub async fn run(args: TuneArgs, events: Client, mut rpc: Client) -> anyhow::Result<()> {
    let mut rx = events.subscribe_events(None).await?;
    // A foreground `tilewise tune` is an explicit request: it runs now, not only when idle.
    let mut params = json!({"now": true});
    if let Some(m) = &args.model {
        params["model"] = json!(m);
    }
    if let Some(b) = args.budget {
        params["budget"] = serde_json::to_value(b)?;
    }
    if let Some(s) = args.seed {
        params["seed"] = json!(s);
    }
    if args.llm {
        params["llm"] = json!(true);
    }
    if args.cold {
        params["cold"] = json!(true);
    }
    if args.verify {
        params["verify"] = json!(true);
    }
    if let Some(p) = args.pairs {
        params["pairs"] = json!(p);
    }
    eprintln!("tilewise: loading {} in the worker…", args.model.as_deref().unwrap_or("the default model"));
    let started = rpc.call("tuning.start", Some(params)).await?;
    let sid = started["session_id"].as_i64().ok_or_else(|| anyhow::anyhow!("tuning.start: no session_id in {started}"))?;
    let resumed = started["resumed"].as_bool().unwrap_or(false);
    let shown = rpc.call("session.show", Some(json!({"session_id": sid}))).await?;
    let budget: Budget = serde_json::from_value(shown["session"]["budget"].clone()).unwrap_or_default();
    eprintln!(
        "tilewise: session {sid} {} (seed {}, budget {})",
        if resumed { "resumed" } else { "started" },
        shown["session"]["seed"],
        budget_text(&budget)
    );
    if let Some(why) = shown["search"]["workload_from"].as_str() {
        eprintln!("tilewise: workload {why}");
    }
    if let Some(warm) = shown["search"]["warm_start"].as_array().filter(|w| !w.is_empty()) {
        let from: std::collections::BTreeSet<&str> = warm.iter().filter_map(|w| w["from"].as_str()).collect();
        eprintln!(
            "tilewise: warm start: {} imported {} from {} measured first (`--cold` to skip)",
            warm.len(),
            if warm.len() == 1 { "policy" } else { "policies" },
            from.into_iter().collect::<Vec<_>>().join(", ")
        );
    }
    if let Some(asked) = args.budget.filter(|b| resumed && *b != budget) {
        eprintln!(
            "tilewise: note: session {sid} continues with its own budget ({}); --budget {} applies to a new session \
             (`tilewise stop`, then `tilewise tune --budget …`)",
            budget_text(&budget),
            budget_text(&asked)
        );
    }
    if args.detach {
        println!("{sid}");
        return Ok(());
    }
    let mut progress = Progress {
        evaluations: shown["session"]["evaluations"].as_u64().unwrap_or(0),
        failures: shown["session"]["failures"].as_u64().unwrap_or(0),
        generation: shown["search"]["generation"].as_u64().unwrap_or(0),
        best: shown["best"]
            .as_object()
            .map(|b| (b["ratio"].as_f64().unwrap_or(0.0), b["lo"].as_f64().unwrap_or(0.0), b["hi"].as_f64().unwrap_or(0.0))),
        last: None,
    };
    let bar = match budget.evaluations {
        Some(n) => ProgressBar::new(n),
        None => ProgressBar::new(budget.seconds.unwrap_or(0)),
    };
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    // The bar draws only on a terminal; into a pipe or a log file, a line per generation and per
    // promotion instead.
    let lines = !std::io::stderr().is_terminal();
    let mut printed: Option<(u64, Option<Speedup>)> = None;
    let started_at = std::time::Instant::now();
    let finished = loop {
        if lines && printed != Some((progress.generation, progress.best)) {
            printed = Some((progress.generation, progress.best));
            eprintln!(
                "tilewise: [{}] {}",
                humantime::format_duration(Duration::from_secs(started_at.elapsed().as_secs())),
                progress.message()
            );
        }
        bar.set_position(if budget.evaluations.is_some() {
            progress.evaluations + progress.failures
        } else {
            started_at.elapsed().as_secs()
        });
        bar.set_message(progress.message());
        tokio::select! {
            e = rx.recv() => match e {
                None => break false, // the daemon went away
                Some(e) if e.session_id == Some(sid) => {
                    if progress.apply(&e) {
                        break true;
                    }
                }
                Some(_) => {}
            },
            _ = tokio::signal::ctrl_c() => {
                bar.abandon_with_message(format!("detached; session {sid} keeps running in the daemon (`tilewise tune` attaches again)"));
                return Ok(());
            }
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    };
    bar.finish_with_message(progress.message());
    if !finished {
        anyhow::bail!("the daemon went away during session {sid}; start it again and the session resumes");
    }
    let shown = rpc.call("session.show", Some(json!({"session_id": sid}))).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&shown)?);
    } else {
        print!("{}", render_table(&shown));
    }
    Ok(())
}

fn budget_text(b: &Budget) -> String {
    match (b.evaluations, b.seconds) {
        (Some(e), Some(s)) => format!("{e} evaluations or {s} s"),
        (Some(e), None) => format!("{e} evaluations"),
        (None, Some(s)) => format!("{s} s"),
        (None, None) => "unbounded".into(),
    }
}

/// The end-of-session table: the measured candidates (best first) and the served policy.
pub fn render_table(shown: &Value) -> String {
    let mut out = String::new();
    let s = &shown["session"];
    let (state, reason) = (s["state"].as_str().unwrap_or("?"), s["reason"].as_str().unwrap_or(""));
    // "session 3 stopped on request", "session 2 finished — budget of 4m spent".
    let ended = if reason.starts_with(state) {
        reason.to_string()
    } else if reason.is_empty() {
        state.to_string()
    } else {
        format!("{state} — {reason}")
    };
    out.push_str(&format!(
        "\nsession {} {ended} ({} evaluations, {} failed, {} promoted; {} screened by the cost model, memo {} shapes)\n",
        s["id"],
        s["evaluations"],
        s["failures"],
        s["promotions"],
        shown["search"]["screened"].as_u64().unwrap_or(0),
        shown["memo_size"],
    ));
    let mut rows: Vec<&Value> = shown["candidates"].as_array().map(|a| a.iter().collect()).unwrap_or_default();
    rows.sort_by(|a, b| {
        let r = |c: &Value| c["measurement"]["ratio"].as_f64().unwrap_or(-1.0);
        r(b).total_cmp(&r(a))
    });
    out.push_str(&format!(
        "{:>5} {:>4} {:<24} {:<9} {:>8} {:>19}  {}\n",
        "id", "gen", "origin", "status", "speedup", "95% interval", "hash"
    ));
    for c in rows.iter().take(15) {
        let m = &c["measurement"];
        let (ratio, interval) = match (m["ratio"].as_f64(), m["lo"].as_f64(), m["hi"].as_f64()) {
            (Some(r), Some(lo), Some(hi)) => (format!("{r:.3}×"), format!("[{lo:.3}, {hi:.3}]")),
            _ if c["status"] == "failed" => ("—".into(), c["failure_reason"].as_str().unwrap_or("").chars().take(19).collect()),
            _ => ("—".into(), String::new()),
        };
        out.push_str(&format!(
            "{:>5} {:>4} {:<24} {:<9} {:>8} {:>19}  {}\n",
            // Value's Display ignores width: format the numbers as strings first.
            c["id"].to_string(),
            c["generation"].to_string(),
            c["origin"].as_str().unwrap_or("").chars().take(24).collect::<String>(),
            c["status"].as_str().unwrap_or(""),
            ratio,
            interval,
            c["hash"].as_str().unwrap_or("").get(..19).unwrap_or(""),
        ));
    }
    match shown["best"].as_object() {
        Some(b) => {
            out.push_str(&format!(
                "\nserved: {} — {:.3}× faster than stock, 95% interval [{:.3}, {:.3}] (confirmed by a second measurement)\n",
                b["hash"].as_str().unwrap_or(""),
                b["ratio"].as_f64().unwrap_or(0.0),
                b["lo"].as_f64().unwrap_or(0.0),
                b["hi"].as_f64().unwrap_or(0.0)
            ));
            if let Some(summary) = b.get("summary").and_then(|v| serde_json::from_value::<tilewise::store::PolicySummary>(v.clone()).ok()) {
                let measured = summary.measured_text();
                out.push_str(&format!(
                    "        {}{}\n",
                    summary.text,
                    if measured.is_empty() { String::new() } else { format!("; {measured}") }
                ));
            }
        }
        None => {
            out.push_str("\nserved: native — no candidate was proven faster than stock on this machine (nothing is promoted on noise)\n")
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgets_parse() {
        assert_eq!(parse_budget("10m").unwrap(), Budget { evaluations: None, seconds: Some(600) });
        assert_eq!(parse_budget("90s").unwrap(), Budget { evaluations: None, seconds: Some(90) });
        assert_eq!(parse_budget("1h30m").unwrap(), Budget { evaluations: None, seconds: Some(5400) });
        assert_eq!(parse_budget("50evals").unwrap(), Budget { evaluations: Some(50), seconds: None });
        assert_eq!(parse_budget("50 evaluations").unwrap(), Budget { evaluations: Some(50), seconds: None });
        assert_eq!(parse_budget("7").unwrap(), Budget { evaluations: Some(7), seconds: None });
        assert!(parse_budget("0").is_err());
        assert!(parse_budget("soon").unwrap_err().contains("neither a duration"));
        // No parser jargon for text that is not a number at all.
        assert!(!parse_budget("abc").unwrap_err().contains("expected number"), "{}", parse_budget("abc").unwrap_err());
        assert!(parse_budget("10x").unwrap_err().contains("unknown time unit"), "{}", parse_budget("10x").unwrap_err());
    }

    #[test]
    fn progress_follows_events() {
        let ev = |kind: &str, data: Value| Event { id: 1, at: String::new(), kind: kind.into(), session_id: Some(1), data };
        let mut p = Progress::default();
        assert!(!p.apply(&ev("candidate.measured", json!({"generation": 2, "origin": "crossover", "ratio": 1.01, "lo": 0.98, "hi": 1.03}))));
        assert!(!p.apply(&ev("candidate.failed", json!({"reason": "worker crashed during evaluate: exit status 3"}))));
        assert!(!p.apply(&ev("policy.promoted", json!({"ratio": 1.08, "lo": 1.03, "hi": 1.1}))));
        assert_eq!((p.generation, p.evaluations, p.failures), (2, 1, 1));
        assert!(p.message().contains("best 1.080× [1.030–1.100]"), "{}", p.message());
        assert!(p.apply(&ev("session.finished", json!({}))));
        let table = render_table(
            &json!({"session": {"id": 1, "state": "finished", "reason": "budget", "evaluations": 1, "failures": 1, "promotions": 0},
            "candidates": [{"id": 3, "generation": 1, "origin": "seed", "status": "measured", "hash": "sha256:abcdef0123456789abcdef",
                            "measurement": {"ratio": 0.97, "lo": 0.9, "hi": 1.02}}],
            "memo_size": 12, "search": {"screened": 4}, "best": null}),
        );
        assert!(table.contains("0.970×") && table.contains("served: native"), "{table}");
        assert!(table.contains("session 1 finished — budget ("), "{table}");
        let stopped = render_table(&json!({"session": {"id": 2, "state": "stopped", "reason": "stopped on request"}, "best": null}));
        assert!(stopped.contains("session 2 stopped on request ("), "{stopped}");
    }
}
