"""Shared fixtures: one synthetic tiny model per test session, in a private models dir."""

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def models_dir(tmp_path_factory):
    # Worker subprocesses inherit this too, so they reuse the synthesized model.
    d = tmp_path_factory.mktemp("models")
    old = os.environ.get("TILEWISE_MODELS_DIR")
    os.environ["TILEWISE_MODELS_DIR"] = str(d)
    yield d
    if old is None:
        os.environ.pop("TILEWISE_MODELS_DIR", None)
    else:
        os.environ["TILEWISE_MODELS_DIR"] = old


@pytest.fixture(scope="session")
def tiny(models_dir):
    """(model, tokenizer, info) of synthetic:tiny in float32. Tests must leave it unpatched."""
    from tilewise import models

    return models.load_model("synthetic:tiny")


@pytest.fixture(autouse=True)
def clean_patch_state():
    from tilewise import patch

    patch.plant_bug(None)
    patch.reset_call_counts()
    yield
    patch.plant_bug(None)


@pytest.fixture
def model(tiny):
    """The tiny model, guaranteed unpatched after the test whatever it did."""
    from tilewise import patch

    yield tiny[0]
    patch.remove(tiny[0])
