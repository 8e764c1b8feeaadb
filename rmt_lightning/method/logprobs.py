"""Log-probabilities of chosen tokens, chunked so no full float32 log-softmax is ever built."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["token_logprobs"]


class _ChunkedTokenLogprobs(torch.autograd.Function):
    """Saves the input and one logsumexp per row; backward rebuilds softmax per chunk."""

    @staticmethod
    def forward(ctx, logits2d: Tensor, ids: Tensor, chunk_size: int) -> Tensor:
        rows = logits2d.shape[0]
        out = torch.empty(rows, dtype=torch.float32, device=logits2d.device)
        lse = torch.empty(rows, dtype=torch.float32, device=logits2d.device)
        for start in range(0, rows, chunk_size):
            stop = start + chunk_size
            x = logits2d[start:stop].float()
            chunk_lse = torch.logsumexp(x, dim=-1)
            lse[start:stop] = chunk_lse
            out[start:stop] = x.gather(-1, ids[start:stop, None]).squeeze(-1) - chunk_lse
        ctx.save_for_backward(logits2d, ids, lse)
        ctx.chunk_size = chunk_size
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        logits2d, ids, lse = ctx.saved_tensors
        grad = torch.empty_like(logits2d)
        for start in range(0, logits2d.shape[0], ctx.chunk_size):
            stop = start + ctx.chunk_size
            g_row = grad_out[start:stop, None].float()
            # d(x_id - logsumexp(x))/dx_j = 1[j = id] - p_j
            g = -torch.exp(logits2d[start:stop].float() - lse[start:stop, None]) * g_row
            g.scatter_add_(-1, ids[start:stop, None], g_row)
            grad[start:stop] = g.to(grad.dtype)
        return grad, None, None


def token_logprobs(logits: Tensor, token_ids: Tensor, chunk_size: int = 1024) -> Tensor:
    """Log-probability of each given token: ``log_softmax(logits)[..., token_ids]``.

    ``log p(y) = x_y - logsumexp_v(x_v)`` over the last dimension of
    ``logits[..., V]``, with ``token_ids[...]`` of the leading shape. Computed in
    float32, ``chunk_size`` rows of the flattened leading dims at a time; the
    backward pass (``dlog p(y)/dx_j = 1[j = y] - p_j``) is chunked the same way,
    so neither direction materialises a float32 ``[..., V]`` tensor. Returns
    float32 of the leading shape.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size!r}")
    if logits.dim() < 1:
        raise ValueError("logits must have a vocabulary dimension")
    if token_ids.shape != logits.shape[:-1]:
        raise ValueError(
            f"token_ids must have shape {tuple(logits.shape[:-1])} (logits without the vocabulary dim), "
            f"got {tuple(token_ids.shape)}"
        )
    if token_ids.dtype.is_floating_point or token_ids.dtype == torch.bool:
        raise ValueError(f"token_ids must be an integer tensor, got {token_ids.dtype}")
    leading = logits.shape[:-1]
    flat = logits.reshape(-1, logits.shape[-1])
    ids = token_ids.reshape(-1).to(device=logits.device, dtype=torch.int64)
    return _ChunkedTokenLogprobs.apply(flat, ids, int(chunk_size)).reshape(leading)
