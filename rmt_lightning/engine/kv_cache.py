"""Key/value cache storage for group decoding, in storage sized for the whole rollout so that each decoding step
writes one slot in place: each prompt's keys and values either copied to its ``G`` rows (``expand_cache``) or
stored once for all of them (``SharedPromptCache``, read by ``attention.two_part_attention``)."""

from __future__ import annotations

import torch
from torch import Tensor
from transformers.cache_utils import Cache, DynamicLayer


class GrowingLayer(DynamicLayer):
    """A ``DynamicLayer`` whose keys and values live in storage allocated once for the whole rollout.

    ``DynamicLayer`` concatenates every new token onto its tensors, copying the whole cache at each decoding
    step (quadratic in the length; at a 1024-token context it costs more than the step's matmuls on a CPU).
    Here each step writes one slot in place and ``keys``/``values`` are views of the filled part.
    """

    def __init__(self, keys: Tensor, values: Tensor, length: int):
        super().__init__()
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True
        self._keys, self._values, self._length = keys, values, length
        self._refresh()

    def _refresh(self) -> None:
        self.keys = self._keys[:, :, : self._length]
        self.values = self._values[:, :, : self._length]

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        end = self._length + key_states.shape[-2]
        if end > self._keys.shape[-2]:  # past the planned length: grow (never happens within generate_group)
            extra = max(end - self._keys.shape[-2], self._keys.shape[-2])
            pad = (0, 0, 0, extra)
            self._keys = torch.nn.functional.pad(self._keys, pad)
            self._values = torch.nn.functional.pad(self._values, pad)
        self._keys[:, :, self._length : end] = key_states
        self._values[:, :, self._length : end] = value_states
        self._length = end
        self._refresh()
        return self.keys, self.values

    def batch_select_indices(self, indices: Tensor) -> None:
        self._keys = self._keys.index_select(0, indices)
        self._values = self._values.index_select(0, indices)
        self._refresh()

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._keys = self._keys.repeat_interleave(repeats, dim=0)
        self._values = self._values.repeat_interleave(repeats, dim=0)
        self._refresh()

    def reorder_cache(self, beam_idx: Tensor) -> None:
        self.batch_select_indices(beam_idx)

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative number of tokens to remove")
        self._length = max(0, self._length + tokens_to_remove)
        self._refresh()


def is_plain_layer(layer) -> bool:
    """A full-attention layer holding keys and values ``[batch, heads, length, dim]`` (not a sliding window, linear
    attention or quantised layer): the kind whose storage ``expand_cache`` and ``SharedPromptCache`` lay out."""
    return type(layer) is DynamicLayer and layer.is_initialized and layer.keys is not None and layer.keys.dim() == 4


def expand_cache(cache, group_size: int, new_tokens: int):
    """Give each of the cache's prompts ``group_size`` rows, with room for ``new_tokens`` more tokens.

    Plain ``DynamicLayer`` layers (full attention) become ``GrowingLayer`` storage, filled by one broadcast
    copy of the prompt's keys and values per group row; any other layer type (sliding windows, linear
    attention, quantised caches) is repeated by its own ``batch_repeat_interleave``.
    """
    layers = getattr(cache, "layers", None)
    if layers is None:
        cache.batch_repeat_interleave(group_size)
        return cache
    for i, layer in enumerate(layers):
        if not is_plain_layer(layer):
            layer.batch_repeat_interleave(group_size)
            continue
        grown = []
        for tensor in (layer.keys, layer.values):
            prompts, heads, length, dim = tensor.shape
            storage = tensor.new_empty((prompts * group_size, heads, length + new_tokens, dim))
            storage.view(prompts, group_size, heads, length + new_tokens, dim)[:, :, :, :length] = tensor.unsqueeze(1)
            grown.append(storage)
        layers[i] = GrowingLayer(*grown, length=layer.keys.shape[-2])
    return cache


class SharedPromptLayer(DynamicLayer):
    """One layer's keys and values with the prompt part stored once per prompt.

    ``prompt_keys``/``prompt_values`` are ``[P, kv_heads, prompt width, dim]``; ``own`` holds each row's completion
    (in storage sized for the rollout, or grown by concatenation with ``capacity`` 0, as the loss forward needs to
    keep its graph). ``update`` stores the new tokens and returns the row's own part only: the two-part attention
    (``attention.two_part_attention``) reads the prompt part from here.
    """

    def __init__(self, prompt_keys: Tensor, prompt_values: Tensor, rows: int, capacity: int):
        super().__init__()
        self.prompt_keys, self.prompt_values = prompt_keys, prompt_values
        self.dtype, self.device = prompt_keys.dtype, prompt_keys.device
        self.is_initialized = True
        if capacity > 0:
            _, heads, _, dim = prompt_keys.shape
            storage = [prompt_keys.new_empty((rows, heads, capacity, dim)) for _ in range(2)]
            self.own: DynamicLayer = GrowingLayer(*storage, length=0)
        else:
            self.own = DynamicLayer()

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        self.keys, self.values = self.own.update(key_states, value_states)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.prompt_keys.shape[-2] + self.own.get_seq_length()

    def select(self, rows: Tensor, prompts: Tensor | None) -> None:
        """Keep the rows ``rows`` and, when given, only the prompts ``prompts``."""
        if prompts is not None:
            self.prompt_keys = self.prompt_keys.index_select(0, prompts)
            self.prompt_values = self.prompt_values.index_select(0, prompts)
        if self.own.is_initialized:
            self.own.batch_select_indices(rows)


class SharedPromptCache(Cache):
    """The cache of a group rollout (or of the loss forward) whose prompts' keys and values are stored once.

    Built from the prompts' prefill cache (one row per prompt) and its ``[P, W]`` attention mask; row ``i`` of
    the batch reads prompt ``i // group_size`` until ``batch_select_indices`` drops finished rows (and prompts
    no row reads any more). ``rows_per_prompt`` and ``slot_index`` lay the rows out per prompt for one batched
    product per prompt: ``slot_index`` is None while every prompt has the same number of rows in order, else the
    flat ``prompt * rows_per_prompt + rank`` slot of each row. ``visible_prompt`` is the prompt mask shaped for
    the attention scores, or None when no prompt is padded.
    """

    def __init__(self, prompt_cache, prompt_mask: Tensor, group_size: int, capacity: int):
        prompts = prompt_mask.shape[0]
        rows = prompts * group_size
        super().__init__(layers=[SharedPromptLayer(layer.keys, layer.values, rows, capacity) for layer in prompt_cache.layers])
        self.prompt_mask = prompt_mask.bool()
        self._lay_out(torch.arange(prompts, device=prompt_mask.device).repeat_interleave(group_size))

    def _lay_out(self, row_prompt: Tensor) -> None:
        if len(row_prompt) > 1 and bool((row_prompt[1:] < row_prompt[:-1]).any()):
            raise ValueError("SharedPromptCache: the rows of each prompt must stay together and in order")
        prompts = self.prompt_mask.shape[0]
        counts = torch.bincount(row_prompt, minlength=prompts)
        self.row_prompt, self.rows_per_prompt = row_prompt, int(counts.max())
        # None when no prompt is padded: the prompt part then needs no mask.
        self.visible_prompt = None if bool(self.prompt_mask.all()) else self.prompt_mask[:, None, None, :]
        if bool((counts == self.rows_per_prompt).all()):
            self.slot_index = None
            return
        first = torch.cumsum(counts, 0) - counts
        rank = torch.arange(len(row_prompt), device=row_prompt.device) - first[row_prompt]
        self.slot_index = row_prompt * self.rows_per_prompt + rank

    def batch_select_indices(self, indices: Tensor) -> None:
        prompts, row_prompt = torch.unique(self.row_prompt.index_select(0, indices), return_inverse=True)
        drop = len(prompts) < self.prompt_mask.shape[0]
        for layer in self.layers:
            layer.select(indices, prompts if drop else None)
        if drop:
            self.prompt_mask = self.prompt_mask.index_select(0, prompts)
        self._lay_out(row_prompt)

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("SharedPromptCache stores each prompt once: build it with the group size instead")
