"""The two workloads a policy is measured on: mlx_lm generation and full training steps.

Inference: `mlx_lm.generate.generate_step` on a fixed prompt of P token ids, greedy, exactly G tokens
(EOS does not stop it, so both arms always do the same work). Prefill = time until the first token
is materialised; decode = the rest. Tokens/s are reported separately.

Each run also reports `cpu_s`, the process's CPU time over the same region: on the CPU backend it is
a second cost measure that other processes on a shared machine disturb far less than wall time.

Training: one full step = forward, mean cross-entropy, `nn.value_and_grad`, AdamW update, all
evaluated. To keep the arms comparable, every step starts from the *same* weights and a *fresh*
optimizer state: the weights are restored after the step (MLX arrays are immutable, so keeping the
old parameter tree and `model.update()`-ing it back is free), and a new AdamW is built per step (its
lazy state initialisation is part of every step, identical for both arms). Otherwise the candidate
arm would train a different model than the stock arm one pair later.
"""

import time

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim

from .backend import backend, device_name  # noqa: F401 (workloads.backend() is what callers use)

# Per-backend default sizes. CPU (reference BLAS, 2 cores) runs the tiny model; GPUs the 0.5B one.
DEFAULTS = {
    "cpu": {"inference": {"prompt_tokens": 64, "gen_tokens": 16}, "training": {"batch": 2, "seq": 64}},
    "cuda": {"inference": {"prompt_tokens": 512, "gen_tokens": 64}, "training": {"batch": 4, "seq": 512}},
    "metal": {"inference": {"prompt_tokens": 512, "gen_tokens": 64}, "training": {"batch": 4, "seq": 512}},
}


def defaults(kind, backend_name=None):
    return dict(DEFAULTS[backend_name or backend()][kind])


def token_ids(vocab_size, count, seed):
    """`count` seeded pseudo-random token ids in [0, vocab_size) (timing does not depend on them)."""
    key = mx.random.key(seed)
    return mx.random.randint(0, vocab_size, (count,), key=key).astype(mx.int32)


def vocab_size(model):
    return model.args.vocab_size


def run_inference(model, prompt, gen_tokens, prefill_step_size=2048, should_stop=None):
    """One generation: returns {"seconds", "prefill_s", "decode_s", "tokens"}.

    `should_stop()` is polled after every token (measure.Cancelled is raised): a sample of a big
    model lasts seconds, and a person coming back must get the machine within one second."""
    from mlx_lm.generate import generate_step

    tokens = []
    cpu = time.process_time()
    tic = time.perf_counter()
    first = None
    for tok, _ in generate_step(prompt, model, max_tokens=gen_tokens, prefill_step_size=prefill_step_size):
        if first is None:
            first = time.perf_counter()
        tokens.append(tok)
        stop_if_asked(should_stop)
    return generation_timings(tic, first, cpu, tokens)


def stop_if_asked(should_stop):
    """Raises measure.Cancelled when `should_stop()` says so (polled after every generated token)."""
    if should_stop is not None and should_stop():
        from .measure import Cancelled

        raise Cancelled()


def generation_timings(tic, first, cpu, tokens):
    """The result of a generation started at `tic` (perf_counter; `cpu`: process_time) whose first
    token came at `first`: wall, prefill and decode seconds, CPU seconds and the tokens."""
    end = time.perf_counter()
    return {
        "seconds": end - tic,
        "prefill_s": first - tic,
        "decode_s": end - first,
        "cpu_s": time.process_time() - cpu,
        "tokens": tokens,
    }


def run_batch_inference(model, prompts, gen_tokens, prefill_step_size=2048, should_stop=None):
    """A batched generation, as a batching server runs it: B prompts of P tokens prefilled together
    (in steps of `prefill_step_size`, as generate_step does), then `gen_tokens` greedy steps of the
    whole batch, pipelined with async_eval like mlx_lm's generators. Same result keys as
    run_inference; `tokens` holds one list of B ids per step."""
    from mlx_lm.generate import generation_stream
    from mlx_lm.models.cache import make_prompt_cache

    def step(tokens):
        with mx.stream(generation_stream):
            return mx.argmax(model(tokens, cache=cache)[:, -1, :], axis=-1)

    cpu = time.process_time()
    tic = time.perf_counter()
    cache = make_prompt_cache(model)
    rest = prompts
    while rest.shape[1] > 1:
        n = min(prefill_step_size, rest.shape[1] - 1)
        with mx.stream(generation_stream):
            model(rest[:, :n], cache=cache)
        mx.eval([c.state for c in cache])
        rest = rest[:, n:]
    y = step(rest)
    mx.eval(y)
    first = time.perf_counter()
    tokens = [y.tolist()]
    nxt = step(y[:, None]) if gen_tokens > 1 else None
    if nxt is not None:
        mx.async_eval(nxt)
    for i in range(1, gen_tokens):
        cur = nxt
        if i < gen_tokens - 1:
            nxt = step(cur[:, None])
            mx.async_eval(nxt)
        tokens.append(cur.tolist())
        stop_if_asked(should_stop)
    return generation_timings(tic, first, cpu, tokens)


def make_batch(model, batch, seq, seed):
    """A fixed (inputs, targets) batch of B sequences of L tokens (targets = inputs shifted)."""
    ids = token_ids(vocab_size(model), batch * (seq + 1), seed).reshape(batch, seq + 1)
    return ids[:, :-1], ids[:, 1:]


def loss_fn(model, inputs, targets):
    logits = model(inputs)
    return nn.losses.cross_entropy(logits.astype(mx.float32), targets, reduction="mean")


def loss_and_grads(model, batch):
    """(loss, grads) on the batch, evaluated; the weights are not changed (for the gate)."""
    loss, grads = nn.value_and_grad(model, loss_fn)(model, *batch)
    mx.eval(loss, grads)
    return loss, grads


def run_training_step(model, batch, learning_rate=1e-5, optimizer=None):
    """One full training step, timed; the weights are restored afterwards (see module doc).
    `optimizer`: one kept across steps (its state then carries over); None makes a fresh AdamW."""
    saved = model.parameters()
    optimizer = optimizer if optimizer is not None else optim.AdamW(learning_rate=learning_rate)
    step = nn.value_and_grad(model, loss_fn)
    cpu = time.process_time()
    tic = time.perf_counter()
    loss, grads = step(model, *batch)
    optimizer.update(model, grads)
    mx.eval(loss, model.parameters(), optimizer.state)
    seconds = time.perf_counter() - tic
    cpu_s = time.process_time() - cpu
    model.update(saved)
    return {"seconds": seconds, "cpu_s": cpu_s, "loss": loss.item()}
