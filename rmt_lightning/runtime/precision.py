"""Whether optimizer updates survive the rounding of the weights they are added to.

AdamW's step per element is about ``lr`` early on (``m / sqrt(v)`` is near +-1), whatever the gradient's scale.
Added to a weight whose dtype spaces neighbouring values more than ``2 * lr`` apart, it rounds back to the
weight: bf16 has 8 significant bits, so a weight of 0.04 only moves for steps above 1.2e-4, and a bf16-true run at
the paper's lr of 1e-6 logs losses while its weights barely change.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from torch import Tensor

log = logging.getLogger(__name__)

FROZEN_SHARE_TO_WARN = 0.5
"""Share of the trainable weights an update of ``lr`` would not move from which a run warns."""

_CHUNK = 1 << 22
"""Elements per pass: bounds the temporary memory on a large parameter."""


def fraction_below_rounding(tensors: Iterable[Tensor], lr: float) -> float:
    """Fraction of the elements of ``tensors`` that an update of ``lr`` leaves unchanged, each in its own dtype.

    An element ``x`` does not move when half its ULP (the spacing of its dtype's values at ``|x|``:
    ``eps * 2**floor(log2|x|)``, subnormal spacing below the smallest normal) exceeds ``lr``, since round to
    nearest then gives ``x`` back. Counted with the spacing above ``|x|``, so at exact powers of two, where the
    spacing below is half as large, a step towards zero may still move ``x``. 0 for no elements.
    """
    frozen, total = 0, 0
    for tensor in tensors:
        info = torch.finfo(tensor.dtype)
        for chunk in tensor.detach().reshape(-1).split(_CHUNK):
            # float32 holds every bf16/fp16 value exactly and its exponents span theirs.
            magnitude = chunk.float().abs().clamp_min(info.smallest_normal)
            _, exponent = torch.frexp(magnitude)  # |x| = m * 2**exponent, 0.5 <= m < 1
            half_ulp = torch.ldexp(torch.full_like(magnitude, info.eps / 2), exponent - 1)
            frozen += int((half_ulp > lr).sum())
            total += chunk.numel()
    return frozen / total if total else 0.0


def low_precision_warning(parameters: Iterable[Tensor], lr: float) -> str | None:
    """A warning naming the fix when most elements of the bf16/fp16 tensors among ``parameters`` would not move
    by an update of ``lr`` (``fraction_below_rounding`` above ``FROZEN_SHARE_TO_WARN``); None otherwise, and for
    float32 weights."""
    half = [p for p in parameters if p.dtype in (torch.bfloat16, torch.float16)]
    if not half:
        return None
    frozen = fraction_below_rounding(half, lr)
    if frozen <= FROZEN_SHARE_TO_WARN:
        return None
    dtypes = ", ".join(sorted({str(p.dtype).removeprefix("torch.") for p in half}))
    return (
        f"{frozen:.0%} of the trainable {dtypes} weights round an update of lr={lr:g} away, so the run will "
        "barely train: keep the weights in float32 (model.dtype float32) and compute in bf16 with "
        "`--trainer.precision bf16-mixed`, or raise the lr."
    )


def warn_if_updates_round_away(parameters: Iterable[Tensor], lr: float) -> str | None:
    """Log ``low_precision_warning`` for the trainable ``parameters`` (their local shards under FSDP2, whose
    DTensors would otherwise gather) and return it, or None when there is nothing to say."""
    local = [p.to_local() if hasattr(p, "to_local") else p for p in parameters if p.requires_grad]
    message = low_precision_warning(local, lr)
    if message is not None:
        log.warning(message)
    return message
