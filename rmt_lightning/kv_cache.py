"""Key/value cache storage for group decoding: each prompt's keys and values copied to its ``G`` rows into storage
sized for the whole rollout, so each decoding step writes one slot in place."""

from __future__ import annotations

import torch
from torch import Tensor
from transformers.cache_utils import DynamicLayer


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
        if type(layer) is not DynamicLayer or not layer.is_initialized or layer.keys is None or layer.keys.dim() != 4:
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
