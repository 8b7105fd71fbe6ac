"""Workloads stop promptly when asked: a generation sample polls `should_stop` after every token."""

import pytest

from tilewise import measure
from tilewise import workloads as W


def test_generation_stops_at_the_next_token_when_asked(tiny):
    model = tiny[0]
    prompt = W.token_ids(W.vocab_size(model), 8, seed=0)
    full = W.run_inference(model, prompt, 12)
    assert len(full["tokens"]) == 12

    polls = []

    def stop_after_three():
        polls.append(1)
        return len(polls) >= 3

    with pytest.raises(measure.Cancelled):
        W.run_inference(model, prompt, 12, should_stop=stop_after_three)
    assert len(polls) == 3, "polled once per token, stopped at the third"


def test_a_batched_generation_decodes_every_sequence_like_generate_alone(tiny):
    """run_batch_inference is what a batching server runs: B greedy sequences stepped together.
    Each row's tokens are those a single greedy generation of that prompt gives (tiny is float32)."""
    model = tiny[0]
    prompts = W.token_ids(W.vocab_size(model), 3 * 9, seed=4).reshape(3, 9)
    r = W.run_batch_inference(model, prompts, 6, prefill_step_size=4)
    assert len(r["tokens"]) == 6 and all(len(step) == 3 for step in r["tokens"])
    assert r["prefill_s"] > 0 and r["decode_s"] > 0 and r["seconds"] >= r["prefill_s"] + r["decode_s"] * 0.99
    for row in range(3):
        alone = W.run_inference(model, prompts[row], 6)["tokens"]
        assert [step[row] for step in r["tokens"]] == [int(t) for t in alone], row
    with pytest.raises(measure.Cancelled):
        W.run_batch_inference(model, prompts, 6, should_stop=lambda: True)


def test_evaluate_passes_the_stop_into_generation(tiny):
    """A cancel that arrives mid-sample ends the evaluation without finishing the sample."""
    from tilewise import evaluate as E
    from tilewise import policy as P

    model = tiny[0]
    calls = []

    def should_stop():
        calls.append(1)
        # The poll at the first sample boundary sees False; a later one (inside the generation
        # when tokens are polled, else at the next boundary) sees True.
        return len(calls) > 3

    with pytest.raises(measure.Cancelled) as raised:
        E.evaluate(
            model,
            P.native(),
            dtype="float32",
            pairs=2,
            warmup=0,
            inference={"prompt_tokens": 8, "gen_tokens": 50},
            skip_training=True,
            should_stop=should_stop,
        )
    # Raised inside the generation, not at the next sample boundary.
    assert any(entry.name == "run_inference" for entry in raised.traceback), raised.traceback
