"""Linear weights packed once per rollout for oneDNN, for the decoding steps of a rollout on a CPU.

A decoding step multiplies a few rows (the batch's completions) by every weight matrix of the model. On a CPU,
``torch.nn.functional.linear`` hands that to MKL's sgemm, which reorders the weight into its blocked layout at
every call: at 8 rows that reordering costs about as much as the product itself. The weights do not change during
a rollout, so ``prepacked_linears`` reorders each large enough ``nn.Linear`` weight once into oneDNN's layout
(the ``torch.ops.mkldnn`` linear that PyTorch's compiler uses for frozen CPU models) and the decoding steps
multiply by that copy: SmolLM2-135M's matmuls at 8 rows take about 40% less time (docs/results.md). The copies
are freed when the rollout ends; while it runs they take as much memory again as the weights they copy.

Another kernel sums in another order: results equal ``F.linear``'s within float32 rounding (about 1e-6 of the
logits' scale), so a sampled or greedy token can differ from the unpacked path's where two logits tie that closely.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)
_reported: set[str] = set()

MIN_PACKED_WEIGHT = 2**18
"""Smallest weight (elements) worth packing: oneDNN's call costs about 20 us more than ``F.linear``'s, which
smaller products at 8 rows do not win back (a 384 x 384 weight breaks even on this project's CPU)."""


def _packed_linear(packed: Tensor, bias: Tensor | None, original, x: Tensor) -> Tensor:
    if torch.is_grad_enabled():  # the packed op has no backward: anything that trains takes the layer's own path
        return original(x)
    flat = x.reshape(-1, x.shape[-1])
    out = torch.ops.mkldnn._linear_pointwise(flat, packed, bias, "none", [], "")
    return out.view(*x.shape[:-1], out.shape[-1])


def _why_not(model: nn.Module) -> str | None:
    """Why the linear layers of ``model`` cannot be packed (None: they can)."""
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return "this PyTorch build has no oneDNN linear"
    if not torch.distributed.is_available():
        return None
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    if any(isinstance(module, (FullyShardedDataParallel, FSDPModule)) for module in model.modules()):
        return "FSDP gathers the weights inside each forward"
    return None


def _packable(module: nn.Module) -> bool:
    """A plain ``nn.Linear`` with full float32 CPU weights worth packing, whose forward nothing else has replaced."""
    return (type(module) is nn.Linear and "forward" not in vars(module) and module.weight.numel() >= MIN_PACKED_WEIGHT
            and type(module.weight.detach()) is Tensor and module.weight.device.type == "cpu"
            and module.weight.dtype == torch.float32)


@contextmanager
def prepacked_linears(model: nn.Module, rows: int, enabled: bool = True) -> Iterator[int]:
    """Within the block, every plain float32 CPU ``nn.Linear`` of ``model`` with at least ``MIN_PACKED_WEIGHT``
    weights multiplies by its weight packed once for oneDNN, laid out for ``rows`` rows at a time (any number
    works), wherever gradients are off; with gradients on it takes its own path. Yields how many layers were
    packed: 0 when ``enabled`` is False or nothing applies (a GPU, other dtypes, FSDP-sharded weights, a PyTorch
    without oneDNN). The layers are restored on leaving the block, also when it raises."""
    linears = [module for module in model.modules() if _packable(module)] if enabled else []
    reason = _why_not(model) if linears else None
    if reason is not None:
        if reason not in _reported:
            _reported.add(reason)
            log.info("decoding multiplies by the unpacked weights: %s", reason)
        linears = []
    try:
        for module in linears:
            packed = torch.ops.mkldnn._reorder_linear_weight(module.weight.detach(), rows)
            bias = None if module.bias is None else module.bias.detach()
            module.forward = partial(_packed_linear, packed, bias, module.forward)
        yield len(linears)
    finally:
        for module in linears:
            vars(module).pop("forward", None)
