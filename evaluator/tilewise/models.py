"""Models: load a real one when it exists, else synthesize one with the exact architecture.

`load_model(spec)` accepts
- a local directory in mlx_lm format (config.json + *.safetensors + tokenizer files),
- a Hugging Face repo id or cache entry found locally (`~/.cache/huggingface/hub/models--org--name/
  snapshots/<rev>`; nothing is ever downloaded),
- `synthetic:tiny`, `synthetic:qwen2.5-0.5b` or `synthetic:llama-3.2-1b`: written once (seeded random weights, a trained
  byte-level BPE tokenizer) in mlx_lm's own format under the models dir, then loaded with
  `mlx_lm.load()` exactly like a real model. Timing does not depend on weight values.

Models dir: `TILEWISE_MODELS_DIR`, else `$TILEWISE_HOME/models`, else the platform's data dir
(`$XDG_DATA_HOME/tilewise/models`, `~/Library/Application Support/tilewise/models`), as the daemon's
paths.rs computes it.

Model fingerprint (`fingerprint(model)`): "mdl-" + the first 32 hex digits of SHA-256 over
  1. the canonical JSON (sorted keys) of the model's parsed config (`model.args`, the ModelArgs
     dataclass mlx_lm builds from config.json), and
  2. for every parameter in name order: its name, shape and dtype, then a strided sample of at most
     4096 of its raw elements (stride = size // 4096, taken from the flattened tensor, viewed as
     unsigned ints so bf16/quantized words hash exactly).
It is computed from the in-memory model, not from files, so the plugin can recompute it inside any
mlx_lm process cheaply (a few ms even for 0.5B parameters) and it is stable across reloads. It covers
the dtype the model runs in (a bf16 and a float32 copy are different models for tuning purposes).
"""

import dataclasses
import hashlib
import json
import os
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from .patch import PATCHED

# Qwen2.5-0.5B-Instruct's config.json (bos/eos ids are replaced by the synthetic tokenizer's).
QWEN25_05B_CONFIG = {
    "architectures": ["Qwen2ForCausalLM"],
    "attention_dropout": 0.0,
    "hidden_act": "silu",
    "hidden_size": 896,
    "initializer_range": 0.02,
    "intermediate_size": 4864,
    "max_position_embeddings": 32768,
    "max_window_layers": 21,
    "model_type": "qwen2",
    "num_attention_heads": 14,
    "num_hidden_layers": 24,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 32768,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
}

# The same architecture, small enough for tests and the CPU demo (2 cores, reference BLAS).
TINY_CONFIG = dict(
    QWEN25_05B_CONFIG,
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_hidden_layers=2,
    max_window_layers=2,
    vocab_size=1024,
    max_position_embeddings=4096,
    sliding_window=4096,
    torch_dtype="float32",
)

# Llama-3.2-1B's config.json (another architecture family: untied in most checkpoints, but 1B ties;
# no projection biases; 16 layers; grouped-query attention 32/8).
LLAMA32_1B_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "max_position_embeddings": 131072,
    "mlp_bias": False,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 16,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "factor": 32.0,
        "high_freq_factor": 4.0,
        "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "rope_theta": 500000.0,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "vocab_size": 128256,
}

SYNTHETIC = {
    "tiny": {"config": TINY_CONFIG, "tokenizer_vocab": 1000, "seed": 0},
    "qwen2.5-0.5b": {"config": QWEN25_05B_CONFIG, "tokenizer_vocab": 8192, "seed": 0},
    "llama-3.2-1b": {"config": LLAMA32_1B_CONFIG, "tokenizer_vocab": 8192, "seed": 0},
}
# Bump when the synthesized files change, so stale copies are rebuilt instead of reused.
SYNTH_VERSION = 1

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Qwen's ChatML template, so `apply_chat_template` works on synthetic models too.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Fixed training text for the synthetic BPE: deterministic merges, English prose plus code.
_TOKENIZER_CORPUS = """\
The quick brown fox jumps over the lazy dog. A matrix multiplication multiplies every row of the
first matrix with every column of the second one and sums the products. Large language models spend
most of their time in such products: the attention projections, the feed-forward layers and the
output head. Tuning the tile sizes of a matrix multiplication for one machine can make it faster,
but only a careful measurement shows whether it did. Interleave the arms, repeat the trials, keep
every sample, and report an interval rather than a single number.
def choose_tile_size(M, N, K, device_info):
    if M <= 16:
        return None, 1024, None
    return 256, 512, None
for i in range(0, 10): print(i * i)  # squares
Hello, world! How are you today? I am fine, thank you. What time is it? It is half past three.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 16 32 64 128 256 512 1024 2048 4096 896 4864 151936.
"""


def models_dir():
    if os.environ.get("TILEWISE_MODELS_DIR"):
        return Path(os.environ["TILEWISE_MODELS_DIR"])
    if os.environ.get("TILEWISE_HOME"):
        return Path(os.environ["TILEWISE_HOME"]) / "models"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "tilewise" / "models"
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "tilewise" / "models"


class ModelNotFound(FileNotFoundError):
    pass


def hf_cache_path(repo_id):
    """The newest local snapshot of `org/name` in the Hugging Face cache, or None."""
    hub = Path(
        os.environ.get("HF_HUB_CACHE")
        or Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub"
    )
    snaps = hub / ("models--" + repo_id.replace("/", "--")) / "snapshots"
    if not snaps.is_dir():
        return None
    candidates = [p for p in snaps.iterdir() if (p / "config.json").is_file()]
    return max(candidates, key=lambda p: p.stat().st_mtime) if candidates else None


def resolve(spec):
    """`spec` -> a local directory in mlx_lm format (synthesizing it if needed)."""
    if spec.startswith("synthetic:"):
        return synthesize(spec.split(":", 1)[1])
    p = Path(spec).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ModelNotFound(f"{p} has no config.json (not an mlx_lm model directory)")
        return p
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")):  # looks like org/name
        cached = hf_cache_path(spec)
        if cached is not None:
            return cached
    raise ModelNotFound(
        f"model {spec!r} not found: not a directory, not in the Hugging Face cache; "
        f"use one of {', '.join('synthetic:' + n for n in SYNTHETIC)}"
    )


def load_model(spec, dtype=None):
    """Loads a model with `mlx_lm.load()`; returns (model, tokenizer, info).

    `dtype` ("float32" | "bfloat16" | "float16") casts floating weights after loading; None keeps
    the stored dtype. `info` has model_path, config, dtype and model_fingerprint.
    """
    from mlx_lm import load as mlx_lm_load

    path = resolve(spec)
    model, tokenizer, config = mlx_lm_load(str(path), return_config=True)
    if dtype is not None:
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
        model.set_dtype(DTYPES[dtype])
        mx.eval(model.parameters())
    info = {
        "model_path": str(path),
        "config": config,
        "dtype": dtype or model_dtype(model),
        "weights": weights_label(model),
        "model_fingerprint": fingerprint(model),
    }
    return model, tokenizer, info


def model_dtype(model):
    """The dtype of the model's floating-point weights, as a string ("bfloat16", ...)."""
    for _, v in tree_flatten(model.parameters()):
        if mx.issubdtype(v.dtype, mx.floating):
            return str(v.dtype).split(".")[-1]
    return "float32"


def weights_label(model):
    """How a person names the model's weight type: "q4" for 4-bit quantized linears (the most
    common bit width), else the floating dtype ("bfloat16")."""
    import collections

    import mlx.nn as nn

    bits = collections.Counter(m.bits for _, m in model.named_modules() if isinstance(m, nn.QuantizedLinear))
    if bits:
        return f"q{bits.most_common(1)[0][0]}"
    return model_dtype(model)


def _json_safe(v):
    if isinstance(v, dict):
        return {str(k): _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    return repr(v)


_UINT_OF_SIZE = {1: mx.uint8, 2: mx.uint16, 4: mx.uint32, 8: mx.uint64}
_SAMPLE = 4096


def fingerprint(model):
    """ "mdl-" + hash of the parsed config and a strided sample of every weight (see module doc)."""
    h = hashlib.sha256()
    args = getattr(model, "args", None)
    cfg = dataclasses.asdict(args) if dataclasses.is_dataclass(args) else {"class": type(model).__module__}
    h.update(json.dumps(_json_safe(cfg), sort_keys=True, separators=(",", ":")).encode())
    for name, v in sorted(tree_flatten(model.parameters()), key=lambda kv: kv[0]):
        h.update(f"\n{name}:{tuple(v.shape)}:{v.dtype}\n".encode())
        flat = v.reshape(-1)
        stride = max(1, flat.size // _SAMPLE)
        sample = flat[::stride][:_SAMPLE]
        if sample.dtype == mx.bool_:
            sample = sample.astype(mx.uint8)
        h.update(np.asarray(sample.view(_UINT_OF_SIZE[sample.dtype.size])).tobytes())
    return "mdl-" + h.hexdigest()[:32]


def model_shapes(model):
    """Every distinct linear (N, K) of the model with a name and how many layers use it.

    Includes a tied output head (`embed_tokens.as_linear`) when the model ties its embeddings. The
    name joins the distinct last path components sharing that shape, sorted (`o_proj+q_proj`).
    """
    found = {}
    tied_head = False
    args = getattr(model, "args", None)
    if args is not None and getattr(args, "tie_word_embeddings", False):
        tied_head = True
    for name, module in model.named_modules():
        cls = type(module)
        base = cls if cls in PATCHED else next((b for b, p in PATCHED.items() if p is cls), None)
        if base is None:
            continue
        is_embedding = issubclass(base, (nn.Embedding, nn.QuantizedEmbedding))
        if is_embedding and not tied_head:
            continue
        w = module["weight"]
        n = w.shape[0]
        k = w.shape[1] * 32 // module.bits if hasattr(module, "bits") else w.shape[1]
        short = name.split(".")[-1] + (".as_linear" if is_embedding else "")
        entry = found.setdefault((n, k), {"names": [], "n": n, "k": k, "count": 0})
        if short not in entry["names"]:
            entry["names"].append(short)
        entry["count"] += 1
    return [
        {"name": "+".join(sorted(e["names"])), "n": e["n"], "k": e["k"], "count": e["count"]} for e in found.values()
    ]


# ---------------------------------------------------------------------------------------------
# Synthesis


def _train_tokenizer(vocab_size):
    """A byte-level BPE trained on a fixed text: deterministic, encodes any string, decodes back."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [line for line in _TOKENIZER_CORPUS.splitlines() if line] * 4
    tok.train_from_iterator(corpus, trainer=trainer)
    return tok


def synthesize(name, root=None):
    """Writes synthetic model `name` once (config.json, model.safetensors, tokenizer files);
    returns its directory. A finished copy is marked by `.complete` and reused."""
    if name not in SYNTHETIC:
        raise ModelNotFound(f"unknown synthetic model {name!r}; known: {', '.join(SYNTHETIC)}")
    spec = SYNTHETIC[name]
    out = Path(root or models_dir()) / f"synthetic-{name}-v{SYNTH_VERSION}"
    if (out / ".complete").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)

    tok = _train_tokenizer(spec["tokenizer_vocab"])
    config = dict(spec["config"])
    assert tok.get_vocab_size() <= config["vocab_size"], "tokenizer vocab must fit the model"
    eos = tok.token_to_id("<|endoftext|>")
    config["bos_token_id"] = eos
    config["eos_token_id"] = tok.token_to_id("<|im_end|>")

    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": None,
                "eos_token": "<|im_end|>",
                "pad_token": "<|endoftext|>",
                "unk_token": None,
                "model_max_length": config["max_position_embeddings"],
                "chat_template": CHAT_TEMPLATE,
                "clean_up_tokenization_spaces": False,
            },
            indent=2,
        )
    )

    from mlx_lm.utils import _get_classes

    model_cls, args_cls = _get_classes(config)  # the architecture's own mlx_lm classes
    args = args_cls.from_dict(config)
    mx.random.seed(spec["seed"])
    model = model_cls(args)
    model.set_dtype(DTYPES[config["torch_dtype"]])
    weights = dict(tree_flatten(model.parameters()))
    mx.eval(weights)
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    (out / ".complete").write_text("ok\n")
    return out
