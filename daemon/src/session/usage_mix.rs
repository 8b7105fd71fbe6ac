//! A session's workload from what people run with the model (the plugin's usage reports), so a
//! session measures — and its cost model weighs — the sizes that are actually run.
//!
//! The mapping (docs/sessions.md, "Workloads from usage"):
//! - every stored usage row of the model is merged (counts add up);
//! - the generation kind that generated the most tokens (count × batch × generated tokens) becomes
//!   the inference workload: its batch, prompt length and generated tokens, each within the
//!   backend's caps below (a CPU session must finish evaluations in seconds);
//! - training is left out: usage reports describe generations, and a workload nobody runs must not
//!   weigh in the objective, which is then the inference speedup alone;
//! - no recorded generation: the backend's default mix (70 % inference / 30 % training).
//!
//! A `workload` given to `tuning.start` always wins.

use crate::evolve::space::{Inference, Workload};
use crate::store::{merge_generations, UsageRow};

/// Largest (batch, prompt tokens, generated tokens) a session measures on this backend.
fn caps(backend: &str) -> (u64, u64, u64) {
    if backend == "cpu" {
        (8, 128, 32)
    } else {
        (64, 4096, 256)
    }
}

/// The workload the model's recorded usage asks for, and why in words; `None` without usage.
pub fn workload_from_usage(rows: &[UsageRow], backend: &str) -> Option<(Workload, String)> {
    let kinds = merge_generations(rows.iter().flat_map(|r| r.generations.iter().cloned()));
    let tokens =
        |g: &crate::store::GenerationUsage| g.count.saturating_mul(u64::from(g.batch)).saturating_mul(u64::from(g.generated_tokens));
    let top = kinds.iter().max_by_key(|g| tokens(g))?;
    let total: u64 = kinds.iter().map(tokens).fold(0, u64::saturating_add);
    let (max_batch, max_prompt, max_gen) = caps(backend);
    let inference = Inference {
        batch: u64::from(top.batch).clamp(1, max_batch),
        prompt_tokens: u64::from(top.prompt_tokens).clamp(2, max_prompt),
        gen_tokens: u64::from(top.generated_tokens).clamp(2, max_gen),
    };
    let reports: u64 = rows.iter().map(|r| r.reports).sum();
    let processes = rows.iter().map(|r| (&r.client, r.pid)).collect::<std::collections::BTreeSet<_>>().len();
    let share = if total > 0 { 100.0 * tokens(top) as f64 / total as f64 } else { 100.0 };
    let capped = (u64::from(top.batch), u64::from(top.prompt_tokens), u64::from(top.generated_tokens))
        != (inference.batch, inference.prompt_tokens, inference.gen_tokens);
    let why = format!(
        "from usage ({reports} report{} of {processes} process{}): batch {}, prompt {}, {} generated made {share:.0} % of the \
         tokens; measured as batch {}, prompt {}, {} tokens{}, inference only",
        if reports == 1 { "" } else { "s" },
        if processes == 1 { "" } else { "es" },
        top.batch,
        top.prompt_tokens,
        top.generated_tokens,
        inference.batch,
        inference.prompt_tokens,
        inference.gen_tokens,
        if capped { format!(" ({backend} caps)") } else { String::new() },
    );
    Some((Workload { inference: Some(inference), training: None }, why))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::GenerationUsage;

    fn row(gens: Vec<GenerationUsage>) -> UsageRow {
        UsageRow {
            model: "mdl-x".into(),
            client: "tilewise-py/0".into(),
            pid: 7,
            day: "2026-12-05".into(),
            reports: 2,
            period_s: 120.0,
            generations: gens,
            shapes: vec![],
            first_at: String::new(),
            last_at: String::new(),
        }
    }

    fn g(batch: u32, prompt: u32, generated: u32, count: u64) -> GenerationUsage {
        GenerationUsage { batch, prompt_tokens: prompt, generated_tokens: generated, prefill_step: None, count }
    }

    #[test]
    fn the_kind_that_generated_most_tokens_becomes_the_workload() {
        // 100 single-sequence chats of 32 tokens (3,200) lose to 10 batch-8 requests of 64 (5,120).
        let rows = [row(vec![g(1, 256, 32, 100), g(8, 512, 64, 10)])];
        let (w, why) = workload_from_usage(&rows, "cuda").unwrap();
        assert_eq!(w.inference, Some(Inference { batch: 8, prompt_tokens: 512, gen_tokens: 64 }));
        assert_eq!(w.training, None, "nobody trains: training does not weigh in");
        assert!(why.contains("batch 8, prompt 512, 64 generated made 62 %"), "{why}");
        let (cpu, why) = workload_from_usage(&rows, "cpu").unwrap();
        assert_eq!(cpu.inference, Some(Inference { batch: 8, prompt_tokens: 128, gen_tokens: 32 }));
        assert!(why.ends_with("(cpu caps), inference only"), "{why}");
    }

    #[test]
    fn no_usage_means_the_default_mix() {
        assert!(workload_from_usage(&[], "cpu").is_none());
        assert!(workload_from_usage(&[row(vec![])], "cpu").is_none());
    }
}
