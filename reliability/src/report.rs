//! The suite's result: one row per check (check, figure, goal, verdict), printed as a table.

use std::fmt::Write as _;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    Fail,
    /// A figure reported for context, with no goal of its own (e.g. unloaded latency).
    Info,
    /// Could not run here (the reason is in the figure), e.g. a feature not yet in the daemon.
    Skip,
}

impl Verdict {
    pub fn from_bool(ok: bool) -> Verdict {
        if ok {
            Verdict::Pass
        } else {
            Verdict::Fail
        }
    }
    fn label(self) -> &'static str {
        match self {
            Verdict::Pass => "pass",
            Verdict::Fail => "FAIL",
            Verdict::Info => "info",
            Verdict::Skip => "skip",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Row {
    pub check: String,
    pub figure: String,
    pub goal: String,
    pub verdict: Verdict,
}

impl Row {
    pub fn new(check: impl Into<String>, figure: impl Into<String>, goal: impl Into<String>, verdict: Verdict) -> Row {
        Row { check: check.into(), figure: figure.into(), goal: goal.into(), verdict }
    }
    pub fn pass_if(check: impl Into<String>, figure: impl Into<String>, goal: impl Into<String>, ok: bool) -> Row {
        Row::new(check, figure, goal, Verdict::from_bool(ok))
    }
    pub fn info(check: impl Into<String>, figure: impl Into<String>) -> Row {
        Row::new(check, figure, "—", Verdict::Info)
    }
    /// A check that could not complete: a failure, with the error as its figure.
    pub fn error(check: impl Into<String>, err: &anyhow::Error) -> Row {
        Row::new(check, format!("error: {}", one_line(&format!("{err:#}"))), "runs", Verdict::Fail)
    }
}

fn one_line(s: &str) -> String {
    let s = s.replace('\n', " ⏎ ");
    if s.chars().count() > 400 {
        format!("{}…", s.chars().take(400).collect::<String>())
    } else {
        s
    }
}

/// A Markdown table (readable in a terminal and pasteable into the README as is).
pub fn table(rows: &[Row]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "| check | figure | goal | result |");
    let _ = writeln!(out, "| --- | --- | --- | --- |");
    for r in rows {
        let esc = |s: &str| s.replace('|', "\\|");
        let _ = writeln!(out, "| {} | {} | {} | {} |", esc(&r.check), esc(&r.figure), esc(&r.goal), r.verdict.label());
    }
    out
}

/// Counts of (pass, fail, skip).
pub fn tally(rows: &[Row]) -> (usize, usize, usize) {
    let count = |v| rows.iter().filter(|r| r.verdict == v).count();
    (count(Verdict::Pass), count(Verdict::Fail), count(Verdict::Skip))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_escapes_pipes_and_labels_verdicts() {
        let t = table(&[Row::pass_if("a|b", "1", "0", false), Row::info("c", "2")]);
        assert!(t.contains("| a\\|b | 1 | 0 | FAIL |"), "{t}");
        assert!(t.contains("| c | 2 | — | info |"), "{t}");
        assert_eq!(tally(&[Row::pass_if("x", "", "", true), Row::pass_if("y", "", "", false)]), (1, 1, 0));
    }
}
