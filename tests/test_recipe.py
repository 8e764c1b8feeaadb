"""Recorded per-step figures of two short runs of configs/tiny.yaml, pinned so that a change meant to keep
behaviour (a refactor) proves it does: one format warm-up step then three RL steps (budget 8, then 4), and two
steps of NTP only. The random tiny model earns no reward here, so the RL term is the KL penalty; the GRPO terms
with advantages are pinned by the hand-computed cases in test_method.py. Recorded on CPU with torch 2.13,
with the inverse-CDF sampler (rollout.invert_cdf)."""

from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from rmt_lightning.cli import build_cli

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"

RMT = {
        "train/loss": [6.2805934, 0.62463015, 0.62110478, 0.62352967],
        "train/loss_rl": [2.514e-05, 7.456e-05, 8.192e-05],
        "train/loss_ntp": [6.2460499, 6.2103024, 6.2344775],
        "train/kl": [0.00251398, 0.00745579, 0.00819188],
        "train/reward": [0.0, 0.0, 0.0],
        "train/budget": [8.0, 8.0, 4.0, 4.0],
        "train/reasoning_length": [16.0, 8.0, 8.0],
        "train/ppo_clip_fraction": [0.0, 0.0, 0.0],
    }

NTP_ONLY = {
        "train/loss": [6.2382612, 6.2300382],
        "train/loss_ntp": [6.2382612, 6.2300382],
        "train/budget": [8.0, 8.0],
    }


def logged(tmp_path, name: str, *args) -> dict[str, list[float]]:
    cli = build_cli(["fit", "--config", str(TINY), "--trainer.enable_progress_bar", "false",
                     "--trainer.logger.init_args.save_dir", str(tmp_path / "logs"), "--trainer.logger.init_args.name", name,
                     "--data.cache_dir", str(tmp_path / "cache"), *args])
    events = EventAccumulator(cli.trainer.logger.log_dir)
    events.Reload()
    return {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@pytest.mark.parametrize(("name", "args", "recorded"), [
    ("rmt", ["--model.format_warmup_steps", "1"], RMT),
    ("ntp-only", ["--model.rl", "false", "--trainer.max_epochs", "1"], NTP_ONLY),
], ids=["warm-up-then-rl", "ntp-only"])
def test_per_step_figures_match_the_recorded_run(tmp_path, name, args, recorded):
    figures = logged(tmp_path, name, *args)
    for tag, values in recorded.items():
        assert figures[tag] == pytest.approx(values, rel=1e-5, abs=1e-6), tag
