"""Shared-prompt attention: the ``G`` completions of a group read their prompt's keys and values, stored once.

RMT's rollouts have long document contexts and short completions, ``G`` per context. Copying each prompt's
cache to its ``G`` rows makes every decoding step read ``G`` copies of the same keys and values. Here attention
runs in two parts and merges them exactly, as flash-decoding merges the blocks of a split key sequence:

- the prompt part: each prompt's rows, gathered into one batch, against the prompt's keys and values
  ``[P, kv_heads, prompt length, dim]`` (masking the prompt's left padding);
- the own part: each row against its own completion's keys and values ``[rows, kv_heads, length, dim]``
  (causal when several tokens are queried at once, as in the loss forward);
- the merge: ``out = out_p * exp(lse_p - lse) + out_c * exp(lse_c - lse)`` with ``lse = logaddexp(lse_p, lse_c)``,
  where ``lse`` is each part's log-sum-exp of its scores: the softmax over the union of both key sets.

A decoding step (one query token per row, no graph kept) skips the merge: both parts' scores go side by side
into one softmax (``_decode``), which takes a sixth off a SmolLM2 decoding step on a CPU; the loss forward keeps
the merge, whose backward recomputes each part's probabilities from its log-sum-exp.

The function plugs into transformers' attention interface under ``SHARED_PROMPT_ATTENTION``; a model uses it
inside ``shared_prompt_attention(model)`` when its forward receives ``cache=`` a ``SharedPromptCache`` and
``shared_prompt=`` the same object. Models whose attention is not plain full attention over the cache (sliding
windows, linear attention, soft-capping, attention outside the interface) are reported by
``shared_prompt_unsupported``, and the callers keep the copied-cache path for them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor
from transformers import AttentionInterface, PreTrainedModel

from .kv_cache import SharedPromptCache, is_plain_layer

SHARED_PROMPT_ATTENTION = "rmt_shared_prompt"
"""Name of the two-part attention in transformers' attention interface."""

log = logging.getLogger(__name__)
_reported: set[str] = set()


def _wide(tensor: Tensor) -> Tensor:
    """Half-precision tensors in float32 (softmax statistics and their gradients); wider ones as they are."""
    return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor


def _scores(query: Tensor, keys: Tensor, visible: Tensor | None, scaling: float) -> Tensor:
    scores = _wide(torch.matmul(query * scaling, keys.transpose(-1, -2)))
    return scores if visible is None else scores.masked_fill(~visible, float("-inf"))


def _attend(query: Tensor, keys: Tensor, values: Tensor, visible: Tensor | None, scaling: float) -> tuple[Tensor, Tensor]:
    scores = _scores(query, keys, visible, scaling)
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    return torch.matmul(torch.exp(scores - lse).to(values.dtype), values), lse


class _Attention(torch.autograd.Function):
    """``attend`` without dropout, saving only the inputs, the output and the log-sum-exp for backward.

    Autograd through the plain formula would keep the scores and probabilities ``[B, kv_heads, R, L]`` of
    every layer until backward; here backward recomputes them one layer at a time (as flash attention does),
    so the loss forward keeps less than the plain path, which keeps the prompt's keys and values repeated for
    every row. With ``P = softmax(S)``, ``O = P V`` and upstream ``dO``, ``dlse``:
    ``dS = P * (dO V^T - rowsum(dO * O)) + P * dlse``, ``dQ = dS K s``, ``dK = dS^T Q s``, ``dV = P^T dO``.
    """

    @staticmethod
    def forward(ctx, query, keys, values, visible, scaling):
        out, lse = _attend(query, keys, values, visible, scaling)
        ctx.save_for_backward(query, keys, values, visible, out, lse)
        ctx.scaling = scaling
        return out, lse.squeeze(-1)

    @staticmethod
    def backward(ctx, d_out, d_lse):
        query, keys, values, visible, out, lse = ctx.saved_tensors
        probs = torch.exp(_scores(query, keys, visible, ctx.scaling) - lse)
        d_out = torch.zeros_like(_wide(out)) if d_out is None else _wide(d_out)
        d_values = torch.matmul(probs.transpose(-1, -2), d_out).to(values.dtype)
        d_scores = probs * (torch.matmul(d_out, _wide(values).transpose(-1, -2)) - (d_out * _wide(out)).sum(-1, keepdim=True))
        if d_lse is not None:
            d_scores = d_scores + probs * d_lse.unsqueeze(-1)
        d_scores = d_scores * ctx.scaling
        d_query = torch.matmul(d_scores, _wide(keys)).to(query.dtype)
        d_keys = torch.matmul(d_scores.transpose(-1, -2), _wide(query)).to(keys.dtype)
        return d_query, d_keys, d_values, None, None


def attend(query: Tensor, keys: Tensor, values: Tensor, visible: Tensor | None, scaling: float,
           dropout: float = 0.0) -> tuple[Tensor, Tensor]:
    """Softmax attention of ``query [B, kv_heads, R, dim]`` over ``keys``/``values [B, kv_heads, L, dim]``, where
    ``visible`` (bool, broadcast to ``[B, kv_heads, R, L]``; None: all) masks keys out. Returns the output
    ``[B, kv_heads, R, dim]`` (in the values' dtype) and the scores' log-sum-exp ``[B, kv_heads, R]`` (float32 for half-precision inputs).
    ``dropout`` (training only) drops attention probabilities as the models' own attention does."""
    if dropout == 0 and torch.is_grad_enabled() and any(t.requires_grad for t in (query, keys, values)):
        return _Attention.apply(query, keys, values, visible, scaling)
    if dropout == 0:  # decoding: no graph to keep
        out, lse = _attend(query, keys, values, visible, scaling)
        return out, lse.squeeze(-1)
    scores = _scores(query, keys, visible, scaling)
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    probs = torch.nn.functional.dropout(torch.exp(scores - lse), p=dropout)
    return torch.matmul(probs.to(values.dtype), values), lse.squeeze(-1)


def merge_parts(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor) -> Tensor:
    """Attention over the union of two disjoint key sets from each set's output and log-sum-exp (in float32 for
    half-precision outputs)."""
    # exp(lse_a - logaddexp(lse_a, lse_b)) is the share of the first set in the union's softmax mass.
    share_a = torch.sigmoid(lse_a - lse_b).unsqueeze(-1)
    out_b = _wide(out_b)
    return out_b + share_a * (_wide(out_a) - out_b)


def _rows_layout(per_prompt: Tensor, slots: int, slot_index: Tensor | None) -> Tensor:
    """``[P, kv_heads, slots * width, n]`` (the rows of each prompt side by side) to ``[rows, kv_heads, width, n]``;
    ``width`` is what a row holds per key/value head (its ``group`` query heads, times its query tokens)."""
    prompts, kv_heads, width, n = per_prompt.shape
    per_row = per_prompt.view(prompts, kv_heads, slots, width // slots, n).transpose(1, 2)
    per_row = per_row.reshape(prompts * slots, kv_heads, -1, n)
    return per_row if slot_index is None else per_row.index_select(0, slot_index)


def _prompt_layout(per_row: Tensor, prompts: int, slots: int, slot_index: Tensor | None) -> Tensor:
    """``[rows, kv_heads, width, n]`` to ``[P, kv_heads, slots * width, n]`` (empty slots hold zeros)."""
    if slot_index is not None:
        per_row = per_row.new_zeros((prompts * slots, *per_row.shape[1:])).index_copy_(0, slot_index, per_row)
    _, kv_heads, group, n = per_row.shape
    return per_row.view(prompts, slots, kv_heads, group, n).transpose(1, 2).reshape(prompts, kv_heads, slots * group, n)


def _decode(gathered: Tensor, own_query: Tensor, own_keys: Tensor, own_values: Tensor, shared_prompt: SharedPromptCache,
            layer_idx: int, scaling: float) -> Tensor:
    """One decoding step of two-part attention with one softmax over both parts' scores side by side.

    ``gathered [P, kv_heads, slots * group, dim]`` is the step's query laid out per prompt, as the prompt part
    reads it, and ``own_query [rows, kv_heads, group, dim]`` the same laid out per row. The own part's scores
    ``[rows, kv_heads, group, t]`` are moved into the prompt's layout (cheap: ``t`` is the completion's length).
    Equal to merging the two parts by their log-sum-exp (``merge_parts``, the path of the loss forward) within
    float rounding, at less cost: one exponential per score instead of two, and no merge. Returns
    ``[rows, heads, 1, dim]``.
    """
    layer = shared_prompt.layers[layer_idx]
    prompt_keys, prompt_values, visible_prompt = layer.prompt_keys, layer.prompt_values, shared_prompt.visible_prompt
    slots, slot_index = shared_prompt.rows_per_prompt, shared_prompt.slot_index
    prompts = gathered.shape[0]
    rows, kv_heads, group, dim = own_query.shape
    scores_p = _scores(gathered, prompt_keys, visible_prompt, scaling)
    scores_c = _prompt_layout(_scores(own_query, own_keys, None, scaling), prompts, slots, slot_index)
    probs = torch.softmax(torch.cat([scores_p, scores_c], dim=-1), dim=-1)
    prompt_width = scores_p.shape[-1]
    out_p = torch.matmul(probs[..., :prompt_width].to(prompt_values.dtype), prompt_values)
    out_c = torch.matmul(_rows_layout(probs[..., prompt_width:], slots, slot_index).to(own_values.dtype), own_values)
    out = _wide(_rows_layout(out_p, slots, slot_index)) + _wide(out_c)
    return out.reshape(rows, kv_heads * group, 1, dim)


def two_part_attention(module, query: Tensor, key: Tensor, value: Tensor, attention_mask, scaling: float | None = None,
                       dropout: float = 0.0, shared_prompt: SharedPromptCache | None = None, **kwargs):
    """The attention-interface function: ``query [rows, heads, q, dim]`` against the prompt part held by
    ``shared_prompt`` and the own part ``key``/``value [rows, kv_heads, t, dim]`` that the cache's update returned.
    ``attention_mask`` is ignored: the prompt's padding mask is the cache's, the own part is causal."""
    if shared_prompt is None:
        raise ValueError(f"attention '{SHARED_PROMPT_ATTENTION}' needs shared_prompt=<SharedPromptCache> in the forward")
    layer = shared_prompt.layers[module.layer_idx]
    rows, heads, q, dim = query.shape
    kv_heads = key.shape[1]
    group = heads // kv_heads  # query heads per key/value head (grouped-query attention)
    scaling = dim**-0.5 if scaling is None else scaling
    prompts = shared_prompt.prompt_mask.shape[0]
    slots, slot_index = shared_prompt.rows_per_prompt, shared_prompt.slot_index
    per_row_query = query.reshape(rows, kv_heads, group * q, dim)

    # Prompt part: the rows of each prompt side by side, so its keys and values are read once for all of them.
    gathered = _prompt_layout(per_row_query, prompts, slots, slot_index)
    decoding = q == 1 and dropout == 0 and not (torch.is_grad_enabled() and query.requires_grad)
    if decoding:
        out = _decode(gathered, per_row_query, key, value, shared_prompt, module.layer_idx, scaling)
        return out.to(query.dtype).transpose(1, 2).contiguous(), None
    out_p, lse_p = attend(gathered, layer.prompt_keys, layer.prompt_values, shared_prompt.visible_prompt, scaling, dropout)
    out_p = _rows_layout(out_p, slots, slot_index).reshape(rows, heads, q, dim)
    lse_p = _rows_layout(lse_p.unsqueeze(-1), slots, slot_index).reshape(rows, heads, q)

    # Own part: the row's completion so far; the queried tokens are its last q.
    length = key.shape[2]
    causal = None
    if q > 1:
        causal = torch.arange(length, device=query.device) <= torch.arange(length - q, length, device=query.device)[:, None]
        causal = causal.repeat(group, 1)
    out_c, lse_c = attend(per_row_query, key, value, causal, scaling, dropout)
    out_c, lse_c = out_c.view(rows, heads, q, dim), lse_c.view(rows, heads, q)

    out = merge_parts(out_p, lse_p, out_c, lse_c)
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


AttentionInterface.register(SHARED_PROMPT_ATTENTION, two_part_attention)


def pretrained_model(model) -> PreTrainedModel | None:
    """The Hugging Face model inside ``model`` (itself, or the first one among its modules: wrappers such as FSDP)."""
    return next((module for module in model.modules() if isinstance(module, PreTrainedModel)), None)


def shared_prompt_unsupported(model, cache) -> str | None:
    """Why ``model`` cannot attend with shared-prompt attention over ``cache`` (its prompts' cache); None if it can."""
    inner = pretrained_model(model)
    if inner is None:
        return f"{type(model).__name__} holds no Hugging Face model"
    model, config = inner, inner.config
    if not getattr(model, "_supports_attention_backend", False):
        return f"{type(model).__name__} does not route its attention through transformers' attention interface"
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return f"{type(model).__name__} uses sliding-window attention (sliding_window={config.sliding_window})"
    kinds = set(getattr(config, "layer_types", None) or ["full_attention"])
    if kinds != {"full_attention"}:
        return f"{type(model).__name__} has layers of kinds {sorted(kinds)}, not only full attention"
    for option in ("attn_logit_softcapping", "attention_chunk_size"):
        if getattr(config, option, None):
            return f"{type(model).__name__} sets {option}={getattr(config, option)}"
    layers = getattr(cache, "layers", None)
    if not layers or not all(is_plain_layer(layer) for layer in layers):
        return f"its cache ({type(cache).__name__}) is not plain key/value layers"
    return None


def use_shared_prompt(model, cache, enabled: bool) -> bool:
    """Whether to attend with shared-prompt attention over ``cache`` (the prompts' prefill cache): when
    ``enabled`` and ``model`` is covered. A model that is not is logged once per reason, with the path taken instead."""
    if not enabled:
        return False
    reason = shared_prompt_unsupported(model, cache)
    if reason is not None and reason not in _reported:
        _reported.add(reason)
        log.warning("shared-prompt attention is off: %s; each row reads its own copy of the prompt's keys and values", reason)
    return reason is None


@contextmanager
def shared_prompt_attention(model) -> Iterator[None]:
    """Within the block, the attention layers of ``model`` (or of the Hugging Face model it wraps) call
    ``two_part_attention``."""
    config = pretrained_model(model).config
    previous = config._attn_implementation
    config._attn_implementation = SHARED_PROMPT_ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = previous
