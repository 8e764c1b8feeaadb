"""Forward passes the losses and the rollout share: prompts prefilled once (the prefix every prompt shares once
for all of them), completion log-probs with each prompt's keys and values shared by its group, position ids that
skip left padding, and an output head that projects only the positions a loss reads."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor

from ..method import token_logprobs
from .attention import shared_prompt_attention, use_shared_prompt
from .kv_cache import SharedPromptCache
from .padding import pad_left


def positions_from_mask(attention: Tensor) -> Tensor:
    """Position ids that skip left padding: each row's first real token is at position 0."""
    return (attention.cumsum(-1) - 1).clamp(min=0)


MIN_SHARED_PREFIX = 8
"""Shortest common prefix (tokens) worth a forward pass of its own in ``prefill``."""


@dataclass
class Prefill:
    """Prompts run through the model, ready to be continued: row ``p`` is prompt ``p``."""

    last_logits: Tensor
    """``[P, V]`` logits at each prompt's last token (the first completion token's distribution)."""
    cache: object
    """The key/value cache of the ``[P, W]`` layout of ``attention``."""
    attention: Tensor
    """``[P, W]`` attention mask of the cached positions (1: a prompt token)."""
    positions: Tensor
    """``[P]`` position id of each prompt's last token."""
    shared: int
    """Tokens of the common prefix computed once for all prompts (0: none)."""


def common_prefix_length(prompts: list[list[int]]) -> int:
    """Length of the longest prefix every prompt starts with, leaving each prompt at least one token of its own."""
    if not prompts:
        return 0
    shortest = min(len(p) for p in prompts)
    first = prompts[0]
    n = 0
    while n < shortest - 1 and all(p[n] == first[n] for p in prompts):
        n += 1
    return n


def prefill(model, prompts: list[list[int]], pad_id: int, device, prefill_common_prefix: bool = True,
            all_agree: Callable[[bool], bool] | None = None) -> Prefill:
    """Run the prompts through the model once, for a cache to continue from (with gradients when enabled).

    Prompts built from one template start with the same tokens (chat template, system prompt, the task
    instruction with the budget: 79 of SmolLM2's 144 prompt tokens in the quickstart). With
    ``prefill_common_prefix`` and two or more prompts, that common prefix runs once as a batch of one and its cache
    is copied to every prompt; the prompts' own suffixes then run, left-padded, against it. The cache
    layout is ``[prefix | padding | suffix]``: the padding is masked and position ids count only real
    tokens, so every prompt token sees exactly what it sees in a plain left-padded forward.

    ``all_agree(flag) -> bool`` (True when ``flag`` holds on every process) makes all processes take the
    same path: under FSDP every forward is a collective, so they must all run two forwards or all one.
    """
    shared = common_prefix_length(prompts) if prefill_common_prefix and len(prompts) > 1 else 0
    use = shared >= MIN_SHARED_PREFIX
    if all_agree is not None:
        use = all_agree(use)
    if not use:
        ids, mask = (t.to(device) for t in pad_left(prompts, pad_id))
        positions = positions_from_mask(mask)
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
        return Prefill(out.logits[:, -1], out.cache, mask, positions[:, -1], 0)
    head = torch.tensor([prompts[0][:shared]], device=device)
    out = model(input_ids=head, attention_mask=torch.ones_like(head), use_cache=True, logits_to_keep=1)
    # The prefix reaches the loss only through its keys and values. FSDP2 gathers a layer's weights for
    # backward when gradients reach that layer's outputs, so those outputs are kept in the graph, at weight 0.
    tie = out.logits.sum() * 0.0 if torch.is_grad_enabled() else None
    cache = out.cache
    cache.batch_repeat_interleave(len(prompts))
    ids, suffix_mask = (t.to(device) for t in pad_left([p[shared:] for p in prompts], pad_id))
    mask = torch.cat([torch.ones((len(prompts), shared), dtype=suffix_mask.dtype, device=device), suffix_mask], dim=1)
    positions = positions_from_mask(mask)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions[:, shared:], cache=cache,
                use_cache=True, logits_to_keep=1)
    last_logits = out.logits[:, -1] if tie is None else out.logits[:, -1] + tie
    return Prefill(last_logits, out.cache, mask, positions[:, -1], shared)


@dataclass(frozen=True)
class CompletionBatch:
    """Completions to score after their prompts: ``G`` (``group_size``) rows per prompt, row ``i`` answering prompt
    ``i // G``, every tensor on the device the forward runs on."""

    prompt_ids: Tensor
    """``[P, Lp]`` prompt tokens, left-padded."""
    prompt_mask: Tensor
    """``[P, Lp]`` 1 for a prompt token, 0 for padding."""
    completion_ids: Tensor
    """``[P * G, C]`` completion tokens, right-padded."""
    completion_mask: Tensor
    """``[P * G, C]`` 1 for a completion token (sampled or written for the model), 0 for padding."""
    scored_mask: Tensor | None = None
    """``[P * G, C]`` the tokens that get a log-prob (the policy's samples); None: every completion token."""
    group_size: int = 1

    @classmethod
    def of(cls, prompts: list[list[int]], rollout, pad_id: int, device) -> CompletionBatch:
        """The prompts (token lists) and the ``Rollout`` that answered them, scored at its sampled tokens."""
        prompt_ids, prompt_mask = pad_left(prompts, pad_id)
        tensors = (prompt_ids, prompt_mask, rollout.completion_ids, rollout.completion_mask.long(), rollout.sampled_mask)
        return cls(*(t.to(device) for t in tensors), group_size=len(rollout.texts) // len(prompts))

    @property
    def rows(self) -> int:
        return self.completion_ids.shape[0]

    def scored(self) -> Tensor:
        return (self.completion_mask if self.scored_mask is None else self.scored_mask).bool()

    def groups(self, micro_batch_size: int) -> Iterator[tuple[slice, CompletionBatch]]:
        """``(rows, part)`` of each pass of ``micro_batch_size`` completions (whole groups, at least one): the
        completions' slice and the part of the batch it is."""
        per_pass, prompts = max(1, micro_batch_size // self.group_size), self.prompt_ids.shape[0]
        for first in range(0, prompts, per_pass):
            owners = slice(first, min(first + per_pass, prompts))
            rows = slice(first * self.group_size, owners.stop * self.group_size)
            yield rows, CompletionBatch(self.prompt_ids[owners], self.prompt_mask[owners], self.completion_ids[rows],
                                        self.completion_mask[rows],
                                        None if self.scored_mask is None else self.scored_mask[rows], self.group_size)


@dataclass(frozen=True)
class ForwardOptions:
    """How ``completion_logprobs`` runs its forward; every choice gives the same log-probs within float rounding."""

    prefill_prompts_once: bool = True
    """Run each prompt through the model once for its group (its keys and values shared by the group's rows),
    instead of concatenating a copy of it before every completion."""
    prefill_common_prefix: bool = True
    """Run the prefix every prompt shares once for all of them (``prefill``)."""
    share_prompt_attention: bool = True
    """Keep a prompt's keys and values once for its group and read them by shared-prompt attention
    (``attention.two_part_attention``), instead of a copy per row."""


def completion_logprobs(model, batch: CompletionBatch, options: ForwardOptions = ForwardOptions(),
                        all_agree: Callable[[bool], bool] | None = None) -> Tensor:
    """Log-probs ``[N, C]`` of each completion token given its prompt and the completion before it.

    With ``options.prefill_prompts_once`` each prompt runs through the model once and the completions attend to
    its keys and values, still attached to the graph: stored once for the group with
    ``options.share_prompt_attention`` (``attention.two_part_attention``, for models with plain full attention;
    others fall back with one logged line), else repeated for the group's rows. Either way the gradient through
    the shared prompt is computed once instead of G times. With ``options.prefill_common_prefix`` too, the prefix
    all prompts share is computed once for all of them (``prefill``; ``all_agree`` as there).

    Only the positions of ``batch.scored_mask`` (default: the completion mask) get a log-prob, the others are 0:
    the output head projects just those positions (``head_positions``), so padding and tokens written by
    budget forcing, which no loss reads, cost no vocabulary projection.
    """
    prompt_ids, prompt_mask, group_size = batch.prompt_ids, batch.prompt_mask, batch.group_size
    completion_ids, completion_mask = batch.completion_ids, batch.completion_mask
    keep = batch.scored()
    out_logprobs = torch.zeros(completion_ids.shape, dtype=torch.float32, device=completion_ids.device)
    if not options.prefill_prompts_once:
        ids = torch.cat([prompt_ids.repeat_interleave(group_size, 0), completion_ids], dim=1)
        attention = torch.cat([prompt_mask.repeat_interleave(group_size, 0), completion_mask], dim=1)
        width = completion_ids.shape[1]
        # logits_to_keep=width+1 leaves the hidden states from the last prompt token on; the last one predicts
        # nothing that is scored.
        select = torch.cat([keep, torch.zeros_like(keep[:, :1])], dim=1)
        with head_positions(model, select) as pick:
            logits = model(input_ids=ids, attention_mask=attention, position_ids=positions_from_mask(attention),
                           logits_to_keep=width + 1).logits
            return out_logprobs.masked_scatter(keep, token_logprobs(pick(logits), completion_ids[keep]))
    prompts = [row[m.bool()].tolist() for row, m in zip(prompt_ids, prompt_mask)]
    start = prefill(model, prompts, 0, prompt_ids.device, options.prefill_common_prefix, all_agree)
    # The first completion token is predicted by its prompt's last position, shared by the group.
    first = token_logprobs(start.last_logits.repeat_interleave(group_size, 0), completion_ids[:, 0])
    parts = [torch.where(keep[:, 0], first, torch.zeros_like(first)).unsqueeze(1)]
    width = completion_ids.shape[1]
    # Under FSDP the pass over the rest of the completions is a collective: a process whose completions are
    # one token wide still runs it when another process needs it, on one column of padding that scores nothing.
    rest_needed = width > 1 if all_agree is None else not all_agree(width <= 1)
    if rest_needed and width == 1:
        completion_ids = torch.cat([completion_ids, completion_ids[:, :1]], dim=1)
        completion_mask = torch.cat([completion_mask, torch.zeros_like(completion_mask[:, :1])], dim=1)
        keep = torch.cat([keep, torch.zeros_like(keep[:, :1])], dim=1)
        out_logprobs = torch.zeros(completion_ids.shape, dtype=torch.float32, device=completion_ids.device)
    if rest_needed:
        cached = start.attention.repeat_interleave(group_size, 0)
        attention = torch.cat([cached, completion_mask], dim=1)[:, :-1]
        positions = positions_from_mask(attention)[:, cached.shape[1]:]
        if use_shared_prompt(model, start.cache, options.share_prompt_attention):
            # The prompt's keys and values stay [P, ...] in the graph: their gradient is summed over the group
            # inside attention instead of through G copies.
            cache = SharedPromptCache(start.cache, start.attention, group_size, capacity=0)
            attending, inputs = shared_prompt_attention(model), {"shared_prompt": cache}
        else:
            cache = start.cache
            cache.batch_repeat_interleave(group_size)
            attending, inputs = nullcontext(), {"attention_mask": attention}
        rest_keep = keep[:, 1:]
        with attending, head_positions(model, rest_keep) as pick:
            logits = model(input_ids=completion_ids[:, :-1], position_ids=positions, cache=cache, use_cache=True,
                           **inputs).logits
            rest = out_logprobs[:, 1:].masked_scatter(rest_keep, token_logprobs(pick(logits), completion_ids[:, 1:][rest_keep]))
        if width == 1:
            # The padding column is dropped, but the pass stays in the graph (at weight 0) so that backward, a
            # collective under FSDP too, reaches every layer on this process as on the others.
            parts[0] = parts[0] + logits.sum() * 0.0 if torch.is_grad_enabled() else parts[0]
        else:
            parts.append(rest)
    return torch.cat(parts, dim=1)


@contextmanager
def head_positions(model, select: Tensor) -> Iterator[Callable[[Tensor], Tensor]]:
    """Within the block, ``model``'s output head computes logits only at the ``select``-ed positions.

    ``select`` is a ``[N, T]`` bool mask over the hidden states the head receives (after any
    ``logits_to_keep`` slicing). A forward pre-hook on ``model.get_output_embeddings()`` hands the head
    ``hidden[select]`` as a ``[1, K, H]`` batch, so positions that are padding, text written for the model or
    untrained context never cost a vocabulary projection (nor its memory, ``N*T*V`` floats). The head still
    runs inside the model's forward, so wrappers that gather weights around it (FSDP) see an ordinary call.

    Yields ``pick(logits) -> [K, V]``: the selected positions' logits, in the order of ``select.nonzero()``,
    from the model's output. A model without an output-embeddings accessor is left as it is and ``pick``
    selects from its full logits instead.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        yield lambda logits: logits[select]
        return

    def keep_selected(module, args):
        hidden = args[0]
        if hidden.shape[:2] != select.shape:
            raise ValueError(f"head_positions: mask {tuple(select.shape)} does not fit hidden states {tuple(hidden.shape[:2])}")
        return (hidden[select].unsqueeze(0), *args[1:])

    handle = head.register_forward_pre_hook(keep_selected)
    try:
        yield lambda logits: logits.reshape(-1, logits.shape[-1])
    finally:
        handle.remove()
