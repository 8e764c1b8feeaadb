"""A corpus of 50M tokens trains with the memory of a 64-document one: its tokens, entropies and curriculum index
are memory-mapped files, and no process holds them (the benchmark for sizes up to 1B: benchmarks/scale.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rmt_lightning.data.datamodule import RMTDataModule
from rmt_lightning.engine.models import BUILTIN_TINY, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from synthetic import synthetic_entropy, synthetic_store  # noqa: E402

TOKENS = 50_000_000


def start_fit(corpus: str, cache: Path, out: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "benchmarks"), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "rmt_lightning", "fit", "--config", str(ROOT / "configs" / "tiny.yaml"),
               "--data.corpus", corpus, "--data.cache_dir", str(cache), "--trainer.max_steps", "2",
               "--trainer.limit_val_batches", "0", "--trainer.logger", "false", "--trainer.enable_checkpointing", "false",
               "--trainer.callbacks", "[]", "--trainer.callbacks+=memory_probe.MemoryProbe", f"--trainer.callbacks.path={out}"]
    return subprocess.Popen(command, env=env, cwd=out.parent, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def peaks(run: subprocess.Popen, out: Path) -> dict:
    _, stderr = run.communicate(timeout=600)
    assert run.returncode == 0, stderr[-3000:]
    return json.loads(out.read_text())["peaks"]


def test_a_fit_over_a_50m_token_store_holds_no_more_private_memory_than_a_64_document_one(tmp_path, monkeypatch):
    tokenizer = load_tokenizer(BUILTIN_TINY)
    store = synthetic_store(tmp_path / "corpus", tokenizer, TOKENS)
    cache = tmp_path / "cache"
    datamodule = RMTDataModule(corpus=str(store.folder), model_name_or_path=BUILTIN_TINY, cache_dir=str(cache),
                               val_documents=8, max_context_tokens=64)
    synthetic_entropy(datamodule, store)
    monkeypatch.setattr(RMTDataModule, "_load_proxy", lambda self: pytest.fail("the shards are all there"))
    datamodule.score_corpus()  # builds the index from the shards, as fit's setup would
    assert len(datamodule.train_index) > TOKENS // 2

    # Side by side (one core each): memory is per process.
    runs = {"large": start_fit(str(store.folder), cache, tmp_path / "large.json"),
            "small": start_fit("embedded:math", cache, tmp_path / "small.json")}
    large, small = (peaks(runs[name], tmp_path / f"{name}.json") for name in ("large", "small"))
    # The 50M tokens, 200 MB of entropies and 330 MB of index are on disk and mapped; before they were mapped,
    # each process held ~200 bytes a token (10 GB here).
    assert large["anonymous_mb"] - small["anonymous_mb"] < 150, (large, small)
