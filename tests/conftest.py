"""Fixtures the test files share: the built-in tiny model and its tokenizer, and a variant with dropout."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from rmt_lightning.engine.models import BUILTIN_TINY, build_builtin_tiny, load_causal_lm, load_tokenizer

# The tests' models are tiny: one thread is as fast, and it keeps parallel test processes from
# oversubscribing the cores (OpenMP spin-waits make that many times slower).
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tokenizer():
    """The built-in tiny model's tokenizer (a BPE trained on the embedded corpus)."""
    return load_tokenizer(BUILTIN_TINY)


@pytest.fixture(scope="module")
def model():
    """The built-in tiny model (a seeded random 2-layer Llama), in eval mode; one per test file."""
    return load_causal_lm(BUILTIN_TINY).eval()


@pytest.fixture(scope="module")
def dropout_model(tmp_path_factory) -> Path:
    """A folder with the tiny model with attention dropout: its training steps draw from the global RNG, so a
    resume is exact only when the checkpoint restores the RNG states too."""
    folder = tmp_path_factory.mktemp("models") / "tiny-dropout"
    shutil.copytree(build_builtin_tiny(), folder)
    config = json.loads((folder / "config.json").read_text())
    config["attention_dropout"] = 0.2
    (folder / "config.json").write_text(json.dumps(config))
    return folder
