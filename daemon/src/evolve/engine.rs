//! Islands + MAP-Elites over policy data, as a resumable state machine.
//!
//! The session asks [`Engine::next_child`] for work, measures it, and reports an [`Outcome`] with
//! [`Engine::resolve`]. When every child of a generation is resolved, the generation is folded into
//! the islands and the archive, migration runs every `migration_interval` generations, and the next
//! call proposes the next generation. The whole engine is plain serde data: the session stores it
//! after every resolution, and a restarted daemon continues from the stored copy.
//!
//! Determinism: each (generation, island) draws from its own ChaCha8 stream derived from
//! (seed, generation, island), so the proposals depend only on the seed and the outcomes fed back —
//! there is no RNG position to lose in a crash.

use super::archive::{cell_of, Archive, Elite};
use super::space::SearchSpace;
use crate::policy::Policy;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EngineConfig {
    pub islands: usize,
    /// Members kept per island (the fittest survive).
    pub island_size: usize,
    /// Children proposed per island per generation.
    pub children_per_island: usize,
    /// Every this many generations each island sends its best member to the next island.
    pub migration_interval: u64,
    pub crossover_rate: f64,
    /// Probability that a parent is drawn from the archive instead of the island.
    pub archive_parent_rate: f64,
    /// Attempts to find a child not seen before, per child slot.
    pub novelty_attempts: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            islands: 3,
            island_size: 6,
            children_per_island: 2,
            migration_interval: 3,
            crossover_rate: 0.25,
            archive_parent_rate: 0.2,
            novelty_attempts: 40,
        }
    }
}

/// A member of an island population.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Member {
    pub key: String,
    pub policy: Policy,
    pub fitness: f64,
}

/// A proposed candidate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Child {
    pub island: usize,
    pub generation: u64,
    pub policy: Policy,
    /// Behaviour key (hash of the effective plan table): the search's identity of a candidate.
    pub key: String,
    /// Operator: `seed`, `mutation:<op>`, `crossover`, `llm`, `migration`.
    pub origin: String,
    /// Content hashes of the parents.
    pub parents: Vec<String>,
}

/// What became of a child.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Outcome {
    /// Measured end to end (combined ratio of the worker's `evaluate`).
    Measured { correct: bool, ratio: Option<f64>, lo: Option<f64>, hi: Option<f64> },
    /// Screened out by the cost model without an end-to-end run.
    Screened { predicted: f64 },
    /// The worker failed on it (the reason is stored with the candidate).
    Failed { reason: String },
}

impl Outcome {
    /// Selection fitness. Predictions are shrunk so a measured result outranks an equal guess.
    pub fn fitness(&self) -> f64 {
        match self {
            Outcome::Measured { correct: true, ratio: Some(r), .. } => *r,
            Outcome::Measured { .. } => 0.0,
            Outcome::Screened { predicted } => predicted * 0.9,
            Outcome::Failed { .. } => 0.0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pending {
    pub child: Child,
    pub outcome: Option<Outcome>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Engine {
    pub seed: u64,
    pub config: EngineConfig,
    /// Generations completed.
    pub generation: u64,
    pub islands: Vec<Vec<Member>>,
    pub archive: Archive,
    /// Every behaviour key proposed so far, with its fitness once known.
    pub seen: BTreeMap<String, Option<f64>>,
    /// The generation being measured.
    pub pending: Vec<Pending>,
    /// Consecutive generations that found nothing new.
    pub stalls: u64,
    /// Children handed in from outside (the LLM mutator), proposed with the next generation.
    #[serde(default)]
    pub injected: Vec<(Policy, String)>,
    /// Policies proven on other machines (imports), proposed first in generation 0: a warm start.
    #[serde(default)]
    pub warm: Vec<(Policy, String)>,
}

fn stream(seed: u64, generation: u64, island: usize) -> ChaCha8Rng {
    let mut h = Sha256::new();
    h.update(b"tilewise.evolve/1");
    h.update(seed.to_le_bytes());
    h.update(generation.to_le_bytes());
    h.update((island as u64).to_le_bytes());
    ChaCha8Rng::from_seed(h.finalize().into())
}

impl Engine {
    /// A new search: every island starts with `native`; generation 0 proposes the seeds.
    pub fn new(seed: u64, config: EngineConfig, space: &SearchSpace) -> Engine {
        let native = space.native();
        let member = Member { key: space.behaviour_key(&native), policy: native.clone(), fitness: 1.0 };
        let mut seen = BTreeMap::new();
        seen.insert(member.key.clone(), Some(1.0));
        let mut archive = Archive::default();
        archive.offer(cell_of(0.0, 0.0), Elite { key: member.key.clone(), policy: native, fitness: 1.0 });
        Engine {
            seed,
            islands: vec![vec![member]; config.islands.max(1)],
            config,
            generation: 0,
            archive,
            seen,
            pending: Vec::new(),
            stalls: 0,
            injected: Vec::new(),
            warm: Vec::new(),
        }
    }

    /// The next child to measure, proposing a new generation when the current one is done.
    /// `None` when the search found nothing new for several generations (exhausted).
    pub fn next_child(&mut self, space: &SearchSpace) -> Option<(usize, Child)> {
        loop {
            if let Some(i) = self.pending.iter().position(|p| p.outcome.is_none()) {
                return Some((i, self.pending[i].child.clone()));
            }
            if !self.pending.is_empty() {
                self.fold_generation(space);
            }
            if self.stalls >= 5 {
                return None;
            }
            let children = self.propose(space);
            if children.is_empty() {
                self.stalls += 1;
                self.generation += 1;
                continue;
            }
            self.stalls = 0;
            for c in &children {
                self.seen.insert(c.key.clone(), None);
            }
            self.pending = children.into_iter().map(|child| Pending { child, outcome: None }).collect();
        }
    }

    /// Records what became of pending child `index`.
    pub fn resolve(&mut self, index: usize, outcome: Outcome) {
        if let Some(p) = self.pending.get_mut(index) {
            self.seen.insert(p.child.key.clone(), Some(outcome.fitness()));
            p.outcome = Some(outcome);
        }
    }

    /// Queues externally made policies (LLM replies) for the next generation.
    pub fn inject(&mut self, policy: Policy, origin: String) {
        self.injected.push((policy, origin));
    }

    /// Queues a policy proven elsewhere to be measured before the seeds (call before the first
    /// `next_child`; `admit` it first to learn whether it would be proposed at all).
    pub fn warm_start(&mut self, policy: Policy, origin: String) {
        self.warm.push((policy, origin));
    }

    /// The best member over all islands.
    pub fn best(&self) -> Option<&Member> {
        self.islands.iter().flatten().max_by(|a, b| a.fitness.total_cmp(&b.fitness))
    }

    fn fold_generation(&mut self, space: &SearchSpace) {
        let done = std::mem::take(&mut self.pending);
        for p in done {
            let Some(outcome) = p.outcome else { continue };
            let fitness = outcome.fitness();
            let member = Member { key: p.child.key.clone(), policy: p.child.policy.clone(), fitness };
            let (share, tile) = space.features(&member.policy);
            self.archive.offer(cell_of(share, tile), Elite { key: member.key.clone(), policy: member.policy.clone(), fitness });
            let island = &mut self.islands[p.child.island % self.config.islands.max(1)];
            if !island.iter().any(|m| m.key == member.key) {
                island.push(member);
            }
        }
        for island in &mut self.islands {
            // Stable order: fitness descending, then key, so ties never depend on insertion order.
            island.sort_by(|a, b| b.fitness.total_cmp(&a.fitness).then_with(|| a.key.cmp(&b.key)));
            island.truncate(self.config.island_size.max(1));
        }
        self.generation += 1;
        if self.config.migration_interval > 0 && self.generation.is_multiple_of(self.config.migration_interval) && self.islands.len() > 1 {
            let bests: Vec<Member> = self.islands.iter().map(|i| i[0].clone()).collect();
            let n = self.islands.len();
            for (i, b) in bests.into_iter().enumerate() {
                let dest = &mut self.islands[(i + 1) % n];
                if !dest.iter().any(|m| m.key == b.key) {
                    dest.push(b);
                    dest.sort_by(|a, b| b.fitness.total_cmp(&a.fitness).then_with(|| a.key.cmp(&b.key)));
                    dest.truncate(self.config.island_size.max(1));
                }
            }
        }
    }

    fn tournament<'a>(&'a self, rng: &mut ChaCha8Rng, island: usize) -> &'a Policy {
        if !self.archive.is_empty() && rng.random_bool(self.config.archive_parent_rate) {
            let elites: Vec<&Elite> = self.archive.elites().collect();
            return &elites.choose(rng).expect("non-empty").policy;
        }
        let pop = &self.islands[island];
        let a = pop.choose(rng).expect("islands are never empty");
        let b = pop.choose(rng).expect("islands are never empty");
        if a.fitness >= b.fitness {
            &a.policy
        } else {
            &b.policy
        }
    }

    /// `policy` as the search would propose it (pruned to the model's matmuls and validated), or
    /// why it would not be proposed: it fails validation once pruned, computes exactly what stock
    /// computes, or behaves like a candidate already seen (or already waiting to be proposed).
    pub fn admit(&self, space: &SearchSpace, policy: Policy) -> Result<Policy, &'static str> {
        let policy = space.validated(space.prune(policy)).ok_or("invalid once pruned to this model's matmuls")?;
        if space.is_effectively_stock(&policy) {
            return Err("computes exactly what stock computes");
        }
        let key = space.behaviour_key(&policy);
        if self.seen.contains_key(&key) || self.injected.iter().any(|(p, _)| space.behaviour_key(p) == key) {
            return Err("repeat of a candidate already seen");
        }
        Ok(policy)
    }

    fn candidate_child(&self, space: &SearchSpace, policy: Policy, island: usize, origin: String, parents: Vec<String>) -> Option<Child> {
        let policy = self.admit(space, policy).ok()?;
        let key = space.behaviour_key(&policy);
        Some(Child { island, generation: self.generation, policy, key, origin, parents })
    }

    /// Proposes one generation (pure given the state: same state, same children).
    pub fn propose(&mut self, space: &SearchSpace) -> Vec<Child> {
        let mut out: Vec<Child> = Vec::new();
        let taken = |c: &Child, out: &Vec<Child>| out.iter().any(|o| o.key == c.key);
        // What another machine proved comes first: it is the likeliest win here too.
        for (policy, origin) in std::mem::take(&mut self.warm) {
            if let Some(c) = self.candidate_child(space, policy, 0, origin, vec![]) {
                if !taken(&c, &out) {
                    out.push(c);
                }
            }
        }
        if self.generation == 0 {
            // Fusion first (the level where the time is), then the seed document's tile heuristic.
            let mut seeds = space.fusion_seeds();
            seeds.push(space.seed_heuristic());
            for (i, seed) in seeds.into_iter().enumerate() {
                let name = seed.name.clone().unwrap_or_default();
                let island = i % self.islands.len().max(1);
                if let Some(c) = self.candidate_child(space, seed, island, format!("seed:{name}"), vec![]) {
                    if !taken(&c, &out) {
                        out.push(c);
                    }
                }
            }
        }
        for (policy, origin) in std::mem::take(&mut self.injected) {
            if let Some(c) = self.candidate_child(space, policy, 0, origin, vec![]) {
                if !taken(&c, &out) {
                    out.push(c);
                }
            }
        }
        for island in 0..self.islands.len() {
            let mut rng = stream(self.seed, self.generation, island);
            for _ in 0..self.config.children_per_island {
                for _attempt in 0..self.config.novelty_attempts {
                    let a = self.tournament(&mut rng, island).clone();
                    let (child, origin, parents) = if rng.random_bool(self.config.crossover_rate) {
                        let b = self.tournament(&mut rng, island).clone();
                        let c = space.crossover(&mut rng, &a, &b);
                        (c, "crossover".to_string(), vec![a.content_hash(), b.content_hash()])
                    } else {
                        let (c, op) = space.mutate(&mut rng, &a);
                        (c, format!("mutation:{op}"), vec![a.content_hash()])
                    };
                    let label = format!("g{}-i{}-{}", self.generation, island, out.len());
                    let child = space.named(child, label);
                    if let Some(c) = self.candidate_child(space, child, island, origin, parents) {
                        if !taken(&c, &out) {
                            out.push(c);
                            break;
                        }
                    }
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::super::space::tests::tiny_space;
    use super::*;

    /// A stand-in fitness (the real one is a measurement): splitting the output head's N helps.
    fn fake_outcome(space: &SearchSpace, p: &Policy) -> Outcome {
        let (share, tile) = space.features(p);
        let r = 1.0 + 0.1 * share - 0.01 * (tile - 6.0).abs();
        Outcome::Measured { correct: true, ratio: Some(r), lo: Some(r - 0.01), hi: Some(r + 0.01) }
    }

    fn run(seed: u64, steps: usize) -> (Vec<String>, Engine) {
        let s = tiny_space("cpu");
        let mut e = Engine::new(seed, EngineConfig::default(), &s);
        let mut keys = Vec::new();
        for _ in 0..steps {
            let Some((i, c)) = e.next_child(&s) else { break };
            keys.push(c.policy.content_hash());
            let o = fake_outcome(&s, &c.policy);
            e.resolve(i, o);
        }
        (keys, e)
    }

    #[test]
    fn same_seed_same_search_other_seed_other_search() {
        let (a, _) = run(7, 40);
        let (b, _) = run(7, 40);
        let (c, _) = run(8, 40);
        assert_eq!(a.len(), 40);
        assert_eq!(a, b);
        assert_ne!(a, c);
        // Never proposes the same behaviour twice.
        let s = tiny_space("cpu");
        let mut e = Engine::new(7, EngineConfig::default(), &s);
        let mut keys = std::collections::BTreeSet::new();
        for _ in 0..40 {
            let (i, c) = e.next_child(&s).unwrap();
            assert!(keys.insert(c.key.clone()), "duplicate {}", c.key);
            e.resolve(i, fake_outcome(&s, &c.policy));
        }
    }

    #[test]
    fn resumes_from_serialized_state_exactly() {
        let s = tiny_space("cpu");
        let (full, _) = run(3, 30);
        let mut e = Engine::new(3, EngineConfig::default(), &s);
        let mut got = Vec::new();
        for step in 0..30 {
            // Round-trip through JSON at every step, as the session does after each commit.
            e = serde_json::from_str(&serde_json::to_string(&e).unwrap()).unwrap();
            let (i, c) = e.next_child(&s).unwrap();
            got.push(c.policy.content_hash());
            if step % 7 == 3 {
                // A crash before resolve: the same child comes back.
                let mut again: Engine = serde_json::from_str(&serde_json::to_string(&e).unwrap()).unwrap();
                assert_eq!(again.next_child(&s).unwrap().1.policy, c.policy);
            }
            e.resolve(i, fake_outcome(&s, &c.policy));
        }
        assert_eq!(got, full);
    }

    /// Evaluations until a child reaches `goal` fitness (None: not within `limit`).
    fn evaluations_to(e: &mut Engine, s: &SearchSpace, goal: f64, limit: usize) -> Option<usize> {
        for n in 1..=limit {
            let (i, c) = e.next_child(s)?;
            let o = fake_outcome(s, &c.policy);
            let reached = o.fitness() >= goal;
            e.resolve(i, o);
            if reached {
                return Some(n);
            }
        }
        None
    }

    #[test]
    fn a_warm_start_reaches_what_another_machine_proved_in_fewer_evaluations() {
        // "Another machine": a long search's best, as its bundle would carry it.
        let s = tiny_space("cpu");
        let (_, long) = run(11, 120);
        let proven = long.best().unwrap().clone();
        assert!(proven.fitness > 1.05);
        let goal = proven.fitness - 1e-9;
        for seed in [1, 2, 3] {
            let cold = evaluations_to(&mut Engine::new(seed, EngineConfig::default(), &s), &s, goal, 400);
            let mut warm = Engine::new(seed, EngineConfig::default(), &s);
            let imported = warm.admit(&s, proven.policy.clone()).expect("admitted");
            warm.warm_start(imported, "warm:another machine".into());
            let (i, first) = warm.next_child(&s).unwrap();
            assert_eq!(first.origin, "warm:another machine", "the import is measured first");
            warm.resolve(i, fake_outcome(&s, &first.policy));
            assert!(fake_outcome(&s, &first.policy).fitness() >= goal);
            eprintln!("seed {seed}: cold start {cold:?} evaluations, warm start 1");
            assert!(cold.is_none_or(|n| n > 1), "seed {seed}: cold start reached it in {cold:?}");
        }
        // An import that behaves like a seed is proposed once, as the import: that seed is not.
        let mut e = Engine::new(5, EngineConfig::default(), &s);
        let fused = s.fusion_seeds().remove(0);
        let seed_origin = format!("seed:{}", fused.name.clone().unwrap_or_default());
        e.warm_start(fused, "warm:x".into());
        let mut origins = vec![];
        while let Some((i, c)) = e.next_child(&s) {
            if c.generation > 0 {
                break;
            }
            origins.push(c.origin.clone());
            e.resolve(i, fake_outcome(&s, &c.policy));
        }
        assert_eq!(origins[0], "warm:x");
        assert!(origins.len() > 1 && !origins.contains(&seed_origin), "{origins:?}");
    }

    #[test]
    fn search_improves_and_fills_the_archive() {
        let (_, e) = run(11, 120);
        assert!(e.generation >= 10);
        assert!(e.archive.len() >= 4, "archive cells: {}", e.archive.len());
        assert!(e.best().unwrap().fitness > 1.05, "{}", e.best().unwrap().fitness);
    }
}
