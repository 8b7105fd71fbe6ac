"""Synthetic models load through mlx_lm.load(), tokenize for real, and fingerprint stably."""

import json
import os
from pathlib import Path

import pytest

from tilewise import models


def test_synthetic_tiny_is_in_mlx_lm_format(tiny):
    model, tokenizer, info = tiny
    path = Path(info["model_path"])
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (path / f).is_file(), f
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "qwen2" and config["tie_word_embeddings"] is True
    assert info["config"]["hidden_size"] == 64 and info["dtype"] == "float32"
    assert path.parent == Path(os.environ["TILEWISE_MODELS_DIR"])


def test_tokenizer_round_trips_and_fits_the_vocab(tiny):
    model, tokenizer, _ = tiny
    text = "Hello, world! A matrix multiplication: 4864 x 896 — naïve?"
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert len(ids) < len(text.encode())  # real merges, not one token per byte
    assert max(ids) < model.args.vocab_size
    assert len(tokenizer.get_vocab()) <= model.args.vocab_size
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.eos_token_ids == {tokenizer.convert_tokens_to_ids("<|im_end|>")}


def test_fingerprint_is_stable_across_reloads_and_tracks_weights_and_dtype(tiny):
    _, _, info = tiny
    fp = info["model_fingerprint"]
    assert fp.startswith("mdl-") and len(fp) == 36
    model2, _, info2 = models.load_model(info["model_path"])
    assert info2["model_fingerprint"] == fp == models.fingerprint(model2)
    _, _, bf16 = models.load_model(info["model_path"], dtype="bfloat16")
    assert bf16["dtype"] == "bfloat16" and bf16["model_fingerprint"] != fp
    w = model2.model.layers[0].mlp.up_proj.weight
    model2.model.layers[0].mlp.up_proj.weight = w.at[0, 0].add(1.0)
    assert models.fingerprint(model2) != fp


def test_synthesis_is_reused_and_deterministic(tiny, tmp_path):
    _, _, info = tiny
    assert models.synthesize("tiny") == Path(info["model_path"])  # reused, not rewritten
    other = models.synthesize("tiny", root=tmp_path)
    for f in ("config.json", "tokenizer.json", "model.safetensors"):
        assert (other / f).read_bytes() == (Path(info["model_path"]) / f).read_bytes(), f


def test_model_shapes_of_tiny(tiny):
    shapes = {(s["n"], s["k"]): s for s in models.model_shapes(tiny[0])}
    assert shapes[(1024, 64)] == {"name": "embed_tokens.as_linear", "n": 1024, "k": 64, "count": 1}
    assert shapes[(128, 64)]["count"] == 4 and shapes[(128, 64)]["name"] == "gate_proj+up_proj"
    assert shapes[(64, 128)]["count"] == 2
    assert sum(s["count"] for s in shapes.values()) == 15


def test_qwen25_05b_architecture_shapes():
    """The full config builds Qwen2.5-0.5B's exact linear shapes (lazily: nothing is evaluated)."""
    from mlx_lm.models import qwen2

    model = qwen2.Model(qwen2.ModelArgs.from_dict(models.QWEN25_05B_CONFIG))
    shapes = {(s["n"], s["k"]): s["count"] for s in models.model_shapes(model)}
    assert shapes == {(896, 896): 48, (128, 896): 48, (4864, 896): 48, (896, 4864): 24, (151936, 896): 1}


def test_hugging_face_cache_entry_is_found(tiny, tmp_path, monkeypatch):
    src = Path(tiny[2]["model_path"])
    snap = tmp_path / "hub" / "models--acme--tiny-qwen" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    for f in src.iterdir():
        (snap / f.name).symlink_to(f)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    model, _, info = models.load_model("acme/tiny-qwen")
    assert info["model_path"] == str(snap)
    assert info["model_fingerprint"] == tiny[2]["model_fingerprint"]


def test_missing_models_are_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(models.ModelNotFound, match="not found"):
        models.resolve("acme/absent")
    with pytest.raises(models.ModelNotFound, match="no config.json"):
        models.resolve(str(tmp_path))
    with pytest.raises(models.ModelNotFound, match="unknown synthetic model"):
        models.resolve("synthetic:gpt-5")
