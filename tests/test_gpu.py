"""The RMT loop on CUDA in bf16 under each strategy: DDP, FSDP1 (Lightning's ``fsdp``, GPU only) and FSDP2.

Skipped without a GPU (CI has none). Each run trains ``tiny.yaml`` for one epoch through the distributed probe and
checks finite losses, a policy that moved and a reference that did not; step times and peak GPU memory are in
the probe's records (``benchmarks/`` measures speed, not these tests).
"""

from pathlib import Path

import pytest
import torch

from distributed_probe import assert_trained, run_probe

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
GPU_STRATEGIES = {
    "ddp": ["--trainer.strategy", "ddp"],
    "fsdp1": ["--trainer.strategy", "fsdp"],
    "fsdp2": ["--trainer.strategy.class_path", "lightning.pytorch.strategies.ModelParallelStrategy"],
}

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _train(tmp_path: Path, devices: int, *args: str) -> list[dict]:
    return run_probe(tmp_path, tmp_path / "probe", [
        "--config", TINY, "--trainer.accelerator", "gpu", "--trainer.devices", str(devices),
        "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false", "--trainer.limit_val_batches", "1",
        "--data.cache_dir", str(tmp_path / "cache"), *args,
    ], processes=devices)


def _assert_trained(records: list[dict]) -> None:
    """Trained (``assert_trained``), on the GPU, with everything the module makes on the root device; one
    validation batch ran (reasoning mode included, under inference mode where Lightning uses it); no rollout made a
    collective of its own (under FSDP its weights were gathered once, not at every decoding step)."""
    assert_trained(records)
    for record in records:
        root = record["root_device"]
        assert record["steps"] and record["peak_gpu_memory_bytes"] > 0 and root.startswith("cuda")
        assert record["parameter_devices"] == [root]
        assert record["devices_seen"] == {"generator": [root], "loss_inputs": [root], "logged": [root]}
        assert record["collectives"]["in_rollouts"] == 0, record["collectives"]


@pytest.mark.parametrize("strategy", sorted(GPU_STRATEGIES))
def test_bf16_mixed_on_one_gpu(strategy, tmp_path):
    records = _train(tmp_path, 1, *GPU_STRATEGIES[strategy], "--trainer.precision", "bf16-mixed")
    _assert_trained(records)
    assert records[0]["policy_sharded"] is (strategy != "ddp")


def test_bf16_weights_on_one_gpu(tmp_path):
    """Weights loaded in bf16 (``model.dtype``), as a model too large for fp32 weights would be trained."""
    _assert_trained(_train(tmp_path, 1, "--model.dtype", "bfloat16"))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
@pytest.mark.parametrize("strategy", sorted(GPU_STRATEGIES))
def test_bf16_mixed_on_two_gpus_same_budget_on_both(strategy, tmp_path):
    records = _train(tmp_path, 2, *GPU_STRATEGIES[strategy], "--trainer.precision", "bf16-mixed")
    _assert_trained(records)
    assert [s["budget"] for s in records[0]["steps"]] == [s["budget"] for s in records[1]["steps"]]
