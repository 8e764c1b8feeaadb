"""bf16 runs that train and rotary buffers that stay float32: the rounding estimate on hand-built values, the
warning before a run whose updates round away, the paper config's precision moving the weights a float32 run
moves, and ``inv_freq`` kept float32 under ``.to(dtype)``, Lightning's ``bf16-true`` and FSDP1 mixed precision."""

import copy
import logging
import pickle

import lightning as L
import pytest
import torch
import torch.distributed as dist
import yaml
from lightning.pytorch.plugins.precision import FSDPPrecision
from lightning.pytorch.strategies import FSDPStrategy
from transformers import AutoModelForCausalLM

from rmt_lightning.runtime.distributed import fsdp1_settings, wrap_fsdp1
from rmt_lightning.engine.models import BUILTIN_TINY, build_builtin_tiny, half_precision_float32_buffers, load_causal_lm
from rmt_lightning.runtime.precision import fraction_below_rounding, low_precision_warning

from test_configs import CONFIG_DIR
from test_training import make_run

ROTARY = {"model.rotary_emb.inv_freq", "model.rotary_emb.original_inv_freq"}


def _warnings(caplog):
    return [r for r in caplog.records if r.name == "rmt_lightning.runtime.precision" and r.levelno == logging.WARNING]


# ---- the estimate --------------------------------------------------------------------------------------------------

def test_fraction_below_rounding_on_hand_built_values():
    # bf16 keeps 8 significant bits, so half a ULP is 2**-8 * 2**floor(log2|x|):
    # 1.0 -> 3.9e-3, 0.04 -> 1.2e-4, -2.0 -> 7.8e-3 all exceed 1e-5; 1e-4 (2.4e-7) and 0 (subnormal) move.
    values = [1.0, 0.04, 1e-4, 0.0, -2.0]
    assert fraction_below_rounding([torch.tensor(values, dtype=torch.bfloat16)], 1e-5) == pytest.approx(3 / 5)
    assert fraction_below_rounding([torch.tensor(values, dtype=torch.bfloat16)], 1e-8) == pytest.approx(4 / 5)
    assert fraction_below_rounding([torch.tensor(values, dtype=torch.bfloat16)], 1e-2) == 0.0
    assert fraction_below_rounding([torch.tensor(values)], 1e-6) == 0.0  # float32: half a ULP of 2.0 is 1.2e-7
    assert fraction_below_rounding([torch.tensor([1.0], dtype=torch.float16)], 1e-4) == 1.0  # fp16: 4.9e-4
    # Counted over all tensors' elements together, whatever their dtypes.
    mixed = [torch.tensor([1.0, 1.0], dtype=torch.bfloat16), torch.tensor([1.0, 1.0])]
    assert fraction_below_rounding(mixed, 1e-5) == 0.5
    assert fraction_below_rounding([], 1e-5) == 0.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fraction_is_the_share_an_upward_step_leaves_unchanged(dtype):
    # Positive values over six decades: the estimate equals the rounding it predicts.
    generator = torch.Generator().manual_seed(0)
    x = (torch.rand(20000, generator=generator) * torch.logspace(-6, 0, 20000)).to(dtype)
    for lr in (1e-6, 1e-5, 1e-4, 1e-3):
        unchanged = float(((x.double() + lr).to(dtype) == x).double().mean())
        assert fraction_below_rounding([x], lr) == pytest.approx(unchanged, abs=1e-9)


def test_warning_names_the_fix_only_when_most_half_weights_would_not_move():
    weights = torch.randn(4096, generator=torch.Generator().manual_seed(0)) * 0.04  # a model's scale
    message = low_precision_warning([weights.to(torch.bfloat16)], 1e-6)
    assert message is not None and "bf16-mixed" in message and "float32" in message and "bfloat16" in message
    assert low_precision_warning([weights.to(torch.bfloat16)], 1e-3) is None  # lr above the rounding
    assert low_precision_warning([weights], 1e-6) is None  # float32 weights
    assert low_precision_warning([weights.to(torch.float16)], 1e-6) is not None


# ---- the runs ------------------------------------------------------------------------------------------------------

def _moved_elements(tmp_path, precision, lr, caplog):
    """Elements of the policy that 3 RL steps on the tiny model change, and the precision warnings logged."""
    caplog.clear()
    L.seed_everything(0)
    module, datamodule, trainer = make_run(tmp_path / precision, model={"lr": lr}, max_steps=3, precision=precision)
    with caplog.at_level(logging.WARNING, logger="rmt_lightning.runtime.precision"):
        trainer.fit(module, datamodule=datamodule)
    return _changed(module.policy, load_causal_lm(BUILTIN_TINY)), _warnings(caplog)


def _changed(model, initial) -> int:
    """Elements of ``model``'s parameters that differ from ``initial``'s cast to their dtype (bf16-true rounds
    every weight once when it casts them, which is no update)."""
    before = dict(initial.named_parameters())
    return sum(int((p.detach() != before[name].to(p.dtype)).sum()) for name, p in model.named_parameters())


def test_paper_precision_moves_the_weights_a_float32_run_moves(tmp_path, caplog):
    paper = yaml.safe_load((CONFIG_DIR / "rmt_paper.yaml").read_text())
    precision, lr = paper["trainer"]["precision"], float(paper["model"]["lr"])
    assert precision == "bf16-mixed"
    float32_moved, _ = _moved_elements(tmp_path, "32-true", lr, caplog)
    paper_moved, warned = _moved_elements(tmp_path, precision, lr, caplog)
    total = sum(p.numel() for p in load_causal_lm(BUILTIN_TINY).parameters())
    assert float32_moved > 0.5 * total
    assert paper_moved >= 0.9 * float32_moved
    assert warned == []


class _AtTrainStart(L.Callback):
    """Records the policy's rotary buffer dtype and logits after the trainer's setup, before any update."""

    def __init__(self, tokens):
        self.tokens = tokens

    def on_train_start(self, trainer, pl_module):
        self.inv_freq_dtype = pl_module.policy.model.rotary_emb.inv_freq.dtype
        self.weight_dtype = pl_module.policy.model.embed_tokens.weight.dtype
        with torch.no_grad():
            self.logits = pl_module.policy(self.tokens).logits


def test_bf16_true_warns_once_and_keeps_rotary_float32_as_from_pretrained_does(tmp_path, caplog):
    folder = build_builtin_tiny()  # written by save_pretrained
    # Positions up to 1000, where a bf16 inv_freq puts the angles off by about 0.18 rad.
    tokens = torch.randint(0, 500, (1, 1000), generator=torch.Generator().manual_seed(0))
    probe = _AtTrainStart(tokens)
    L.seed_everything(0)
    model = {"model_name_or_path": str(folder), "lr": 1e-6, "reference_dtype": "bfloat16"}
    module, datamodule, trainer = make_run(tmp_path, callbacks=[probe], model=model,
                                           data={"model_name_or_path": str(folder)}, max_steps=1, precision="bf16-true")
    with caplog.at_level(logging.WARNING, logger="rmt_lightning.runtime.precision"):
        trainer.fit(module, datamodule=datamodule)
    warned = _warnings(caplog)
    assert len(warned) == 1 and "--trainer.precision bf16-mixed" in warned[0].getMessage()

    assert probe.weight_dtype == torch.bfloat16 and probe.inv_freq_dtype == torch.float32
    loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    with torch.no_grad():
        expected = loaded(tokens).logits
    assert torch.equal(probe.logits, expected)
    # What the warning says: a step at lr 1e-6 leaves nearly all bf16 weights as they were.
    assert _changed(module.policy, loaded) < 0.1 * sum(p.numel() for p in loaded.parameters())
    # The comparison can tell: the same weights with a bf16 inv_freq give other logits.
    rounded = loaded.model.rotary_emb
    rounded.inv_freq = rounded.inv_freq.to(torch.bfloat16)
    with torch.no_grad():
        assert not torch.equal(loaded(tokens).logits, expected)

    # The frozen reference, cast by reference_dtype, and a later validate under bf16-true keep them too.
    assert {module.reference.get_buffer(name).dtype for name in ROTARY} == {torch.float32}
    validator = L.Trainer(accelerator="cpu", devices=1, precision="bf16-true", logger=False, limit_val_batches=0,
                          enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))
    validator.validate(module, datamodule=datamodule)
    assert {module.policy.get_buffer(name).dtype for name in ROTARY} == {torch.float32}


# ---- the mechanism -------------------------------------------------------------------------------------------------

def test_casts_leave_the_float32_buffers_of_a_bf16_load_alone():
    model = load_causal_lm(BUILTIN_TINY)
    assert half_precision_float32_buffers(model) == ROTARY
    assert model.config.dtype == torch.float32  # the meta-device copy leaves the model's config alone
    original = {name: model.get_buffer(name).clone() for name in ROTARY}
    copied, unpickled = copy.deepcopy(model), pickle.loads(pickle.dumps(model))
    for cast in (lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: m.float()):
        cast(model)
        for name in ROTARY:
            assert torch.equal(model.get_buffer(name), original[name])
    assert model.model.embed_tokens.weight.dtype == torch.float32
    copied.to("meta", torch.bfloat16)  # a device move still applies; the dtype change does not
    assert copied.model.embed_tokens.weight.dtype == torch.bfloat16
    kept = {(copied.get_buffer(name).device.type, copied.get_buffer(name).dtype) for name in ROTARY}
    assert kept == {("meta", torch.float32)}
    unpickled.bfloat16()
    assert {unpickled.get_buffer(name).dtype for name in ROTARY} == {torch.float32}
    assert not ROTARY & set(model.state_dict())


def test_fsdp1_settings_leave_buffers_in_their_dtype(tmp_path):
    strategy = FSDPStrategy()
    strategy.precision_plugin = FSDPPrecision("bf16-mixed")
    settings = fsdp1_settings(strategy)
    assert settings["mixed_precision"].param_dtype == torch.bfloat16
    assert settings["mixed_precision"].buffer_dtype is None
    assert fsdp1_settings(FSDPStrategy())["mixed_precision"].buffer_dtype is None  # 32-true
    # FSDP1 casts buffers at the root's first forward: one CPU process over gloo runs it.
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = wrap_fsdp1(load_causal_lm(BUILTIN_TINY), torch.device("cpu"), **settings)
        with torch.no_grad():
            model(torch.arange(8)[None])
        assert {b.dtype for name, b in model.named_buffers() if "rotary_emb" in name} == {torch.float32}
    finally:
        dist.destroy_process_group()
