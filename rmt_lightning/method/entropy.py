"""Next-token entropy, chunked so a long sequence never needs a full float32 copy (RMT, section 1)."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["token_entropy"]


def _chunk_log_probs(chunk: Tensor, top_k: int | None) -> tuple[Tensor, Tensor | None]:
    x = chunk.float()
    index = None
    if top_k is not None and top_k < x.shape[-1]:
        x, index = x.topk(top_k, dim=-1)
    return torch.log_softmax(x, dim=-1), index


def _finite(logp: Tensor) -> Tensor:
    # A -inf logit has p = 0; 0 * -inf would be NaN, while its term in -sum p log p is 0.
    return logp.masked_fill(torch.isneginf(logp), 0.0)


def _full_entropy(chunk: Tensor) -> Tensor:
    """``H = log Z - sum_v e_v x_v / Z`` with ``e = exp(x - max x)``, ``Z = sum_v e_v``.

    Three passes over the chunk and one temporary (max, exp, then sum and dot product) instead of
    log-softmax, exp, the -inf fix-up, product and sum: about half the time, and entropy scoring runs this
    at every position of the corpus.
    """
    x = chunk.float()
    top = x.amax(dim=-1, keepdim=True)
    e = (x - top).exp_()
    z = e.sum(dim=-1)
    dot = torch.linalg.vecdot(e, x)
    bad = torch.isnan(dot)
    if bad.any():
        # A -inf logit has p = 0 and contributes 0, but e * x = 0 * -inf is NaN: redo those rows with -inf
        # replaced by the smallest finite float (its e is exactly 0 as well).
        finite = x[bad].clamp(min=torch.finfo(x.dtype).min)
        dot[bad] = torch.linalg.vecdot(e[bad], finite)
    return z.log() + top.squeeze(-1) - dot / z


class _ChunkedEntropy(torch.autograd.Function):
    """Saves only the input and the per-row entropy; backward recomputes each chunk."""

    @staticmethod
    def forward(ctx, logits2d: Tensor, top_k: int | None, chunk_size: int) -> Tensor:
        rows = logits2d.shape[0]
        out = torch.empty(rows, dtype=torch.float32, device=logits2d.device)
        for start in range(0, rows, chunk_size):
            chunk = logits2d[start : start + chunk_size]
            if top_k is None:
                out[start : start + chunk_size] = _full_entropy(chunk)
            else:
                logp, _ = _chunk_log_probs(chunk, top_k)
                out[start : start + chunk_size] = -(logp.exp() * _finite(logp)).sum(dim=-1)
        ctx.save_for_backward(logits2d, out)
        ctx.top_k = top_k
        ctx.chunk_size = chunk_size
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        logits2d, entropy = ctx.saved_tensors
        grad = torch.empty_like(logits2d)
        for start in range(0, logits2d.shape[0], ctx.chunk_size):
            stop = start + ctx.chunk_size
            logp, index = _chunk_log_probs(logits2d[start:stop], ctx.top_k)
            # dH/dx_j = -p_j * (log p_j + H)
            g = -logp.exp() * (_finite(logp) + entropy[start:stop, None])
            g = g * grad_out[start:stop, None].float()
            if index is not None:
                g = torch.zeros(
                    (g.shape[0], logits2d.shape[1]), dtype=g.dtype, device=g.device
                ).scatter_(-1, index, g)
            grad[start:stop] = g.to(grad.dtype)
        return grad, None, None


def token_entropy(logits: Tensor, top_k: int | None = None, chunk_size: int = 1024) -> Tensor:
    """Natural-log entropy of the next-token distribution at every position.

    ``H = -sum_v p(v) log p(v)`` with ``p = softmax(logits)`` over the last
    dimension. With ``top_k``, ``p`` is the softmax of the ``k`` largest logits
    only, i.e. the top-k probabilities renormalised to sum to 1.

    ``logits`` is ``[..., V]`` in any floating dtype; the result is float32 of
    shape ``[...]``. Rows of the flattened leading dims are processed
    ``chunk_size`` at a time in float32, and backward recomputes per chunk, so
    extra memory stays at one chunk in both directions.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size!r}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k!r}")
    if logits.dim() < 1:
        raise ValueError("logits must have a vocabulary dimension")
    leading = logits.shape[:-1]
    flat = logits.reshape(-1, logits.shape[-1])
    return _ChunkedEntropy.apply(flat, top_k, int(chunk_size)).reshape(leading)
