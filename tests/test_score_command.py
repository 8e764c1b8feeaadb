"""``python -m rmt_lightning score``: the corpus's entropy scored by every process (its share of the shards), stopped
by a scheduler's signal with the finished shards kept, and continued by the same command or by ``fit``; the result
bit for bit what one uninterrupted process gives."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from rmt_lightning.data.datamodule import RMTDataModule
from rmt_lightning.data.entropy_shards import load_shards_flat

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny.yaml"
SHARD_TOKENS = 1000  # the tiny config's corpus (7,880 tokens) in 9 shards


def run(command: str, cache: Path, log: Path, *extra: str, signal_after: int | None = None, signal_rank: int = 0,
        cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RMT_TEST_SCORED_LOG": str(log),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    if signal_after is not None:
        env.update(RMT_TEST_SIGNAL_AFTER=str(signal_after), RMT_TEST_SIGNAL_RANK=str(signal_rank))
    arguments = [sys.executable, str(ROOT / "tests" / "signal_while_scoring.py"), command, "--config", str(CONFIG),
                 "--data.cache_dir", str(cache), "--data.scoring_shard_tokens", str(SHARD_TOKENS), *extra]
    return subprocess.run(arguments, env=env, cwd=cwd, capture_output=True, text=True, timeout=600)


def scored(log: Path) -> list[tuple[int, int]]:
    """(rank, tokens) of every shard scored so far, in order; the log is emptied."""
    lines = log.read_text().split() if log.exists() else []
    log.unlink(missing_ok=True)
    return [(int(rank), int(tokens)) for rank, tokens in zip(lines[::2], lines[1::2])]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> RMTDataModule:
    """One process, never stopped, in the test process itself."""
    config = yaml.safe_load(CONFIG.read_text())
    datamodule = RMTDataModule(**config["data"], model_name_or_path=config["model"]["model_name_or_path"],
                               cache_dir=str(tmp_path_factory.mktemp("reference")), scoring_shard_tokens=SHARD_TOKENS)
    datamodule.setup("fit")
    return datamodule


def assert_same_scores_and_index(cache: Path, reference: RMTDataModule) -> None:
    key = reference.train_index.manifest["scores_key"]
    lengths = reference.train_index.store.lengths
    mine, theirs = load_shards_flat(cache / f"entropy-{key[:24]}", key, lengths), load_shards_flat(
        Path(reference.cache_folder) / f"entropy-{key[:24]}", key, lengths)
    assert mine is not None and torch.equal(mine[0].view(torch.int32), theirs[0].view(torch.int32))  # bit for bit
    [index] = cache.glob("index-*")
    assert index.name == reference.train_index.folder.name
    for name in sorted(p.name for p in reference.train_index.folder.glob("*.bin")):
        assert np.array_equal(np.fromfile(index / name, np.uint8), np.fromfile(reference.train_index.folder / name, np.uint8)), name


def test_two_processes_share_the_shards_stop_together_on_one_ranks_sigterm_and_continue_bit_for_bit(tmp_path, reference):
    cache, log = tmp_path / "cache", tmp_path / "scored.log"
    ddp = ["--trainer.devices", "2", "--trainer.strategy", "ddp"]
    shards = len(list((Path(reference.cache_folder)).glob("entropy-*/shard-*.safetensors")))
    assert shards == 9

    # SIGTERM reaches rank 1 only, while it scores its first shard: both processes finish the round and stop.
    stopped = run("score", cache, log, *ddp, signal_after=1, signal_rank=1, cwd=tmp_path)
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]
    assert sorted(rank for rank, _ in scored(log)) == [0, 1]
    folder = next(cache.glob("entropy-*"))
    assert len(list(folder.glob("shard-*.safetensors"))) == 2 and not list(cache.glob("index-*"))
    lines = [line for line in stopped.stderr.splitlines() if "SIGTERM" in line]
    assert lines == [f"SIGTERM received: entropy scoring stopped with 2 of {shards} shards finished in {folder}; "
                     "the same command continues from them"]

    # The same command scores the 7 missing shards, rank r the shards i with i % 2 == r, and indexes them.
    resumed = run("score", cache, log, *ddp, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    by_rank = scored(log)
    assert len(by_rank) == shards - 2 and sorted({rank for rank, _ in by_rank}) == [0, 1]
    assert "entropy of embedded:math" in resumed.stderr and "tok/s" in resumed.stderr
    assert_same_scores_and_index(cache, reference)


def test_a_sigterm_while_fit_scores_exits_143_and_fit_continues_from_the_finished_shards(tmp_path, reference):
    cache, log = tmp_path / "cache", tmp_path / "scored.log"
    fit = ["--trainer.max_steps", "1", "--trainer.limit_val_batches", "0", "--trainer.enable_checkpointing", "false",
           "--trainer.callbacks", "[]", "--trainer.logger", "false"]
    stopped = run("fit", cache, log, *fit, signal_after=3, cwd=tmp_path)
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]
    assert len(scored(log)) == 3 and "entropy scoring stopped with 3 of 9 shards finished" in stopped.stderr

    finished = run("fit", cache, log, *fit, cwd=tmp_path)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert len(scored(log)) == 6  # only the missing shards
    assert_same_scores_and_index(cache, reference)
