"""Prompts and budget-capped group generation for RMT rollouts.

``generate_group`` prefills each prompt once, copies its key/value cache to the group's ``G`` rows, and
decodes token by token. Each row runs a small state machine: thinking, then answering, then done.
With budget forcing, a row whose thinking reaches its cap (or that closes ``</think>`` or ends without an
answer) gets ``</think> \\boxed{`` written for it, token by token, so the model only has to write the
answer. Written-for-it tokens are part of the context but not of the policy-gradient mask.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor
from transformers.cache_utils import DynamicLayer

from .method import extract_prediction, head_positions, token_logprobs
from .padding import pad_left, pad_right
from .tokens import TokenBytes

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"

DEFAULT_INSTRUCTION = (
    "Predict the next token of the text between <|text_start|> and <|text_end|>. "
    "Think inside <think></think> using exactly {budget} tokens, then write the next token in \\boxed{}.\n"
    "<|text_start|>{context}<|text_end|>"
)
"""RPT's task instruction with RMT's budget sentence; ``{budget}`` and ``{context}`` are filled in."""

_THINKING, _ANSWERING, _DONE = 0, 1, 2


def render_instruction(template: str, budget: int, context: str) -> str:
    """Fill ``{budget}`` and ``{context}`` by plain replacement, so other braces need no escaping."""
    return template.replace("{budget}", str(budget)).replace("{context}", context)


def build_prompt_ids(tokenizer, context: str, budget: int, instruction: str = DEFAULT_INSTRUCTION,
                     response_prefix: str = "<think>\n", use_chat_template: bool = True) -> list[int]:
    """Prompt token ids: the instruction as a user turn (chat template when the tokenizer has one), then the
    text the response starts from."""
    user = render_instruction(instruction, budget, context)
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True)
        return tokenizer(text + response_prefix, add_special_tokens=False)["input_ids"]
    return tokenizer(user + "\n" + response_prefix)["input_ids"]


@dataclass
class GroupRollout:
    """Completions of a batch of prompts, ``G`` rows per prompt (row ``i`` belongs to prompt ``i // G``)."""

    completion_ids: Tensor
    """``[N, C]`` generated tokens, padded on the right."""
    completion_mask: Tensor
    """``[N, C]`` True for generated tokens (sampled or written by budget forcing), False for padding."""
    sampled_mask: Tensor
    """``[N, C]`` True where the policy sampled the token (not padding, not written by budget forcing)."""
    texts: list[str]
    """Response prefix + decoded completion, what the reward reads."""
    reasoning_lengths: list[int]
    """Tokens inside ``<think>...</think>``."""
    clipped: list[bool]
    """Stopped by the token cap before the answer was closed or the model ended."""
    forced: list[bool]
    """Budget forcing wrote ``</think> \\boxed{`` for this row."""

    @cached_property
    def predictions(self) -> list[str | None]:
        """The ``\\boxed{}`` answer after ``</think>`` of each row, or None."""
        return [extract_prediction(text) for text in self.texts]


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


def prefill(model, prompts: list[list[int]], pad_id: int, device, share_prefix: bool = True,
            all_agree: Callable[[bool], bool] | None = None) -> Prefill:
    """Run the prompts through the model once, for a cache to continue from (with gradients when enabled).

    Prompts built from one template start with the same tokens (chat template, system prompt, the task
    instruction with the budget: 79 of SmolLM2's 144 prompt tokens in the quickstart). With
    ``share_prefix`` and two or more prompts, that common prefix runs once as a batch of one and its cache
    is copied to every prompt; the prompts' own suffixes then run, left-padded, against it. The cache
    layout is ``[prefix | padding | suffix]``: the padding is masked and position ids count only real
    tokens, so every prompt token sees exactly what it sees in a plain left-padded forward.

    ``all_agree(flag) -> bool`` (True when ``flag`` holds on every process) makes all processes take the
    same path: under FSDP every forward is a collective, so they must all run two forwards or all one.
    """
    shared = common_prefix_length(prompts) if share_prefix and len(prompts) > 1 else 0
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


def completion_logprobs(model, prompt_ids: Tensor, prompt_mask: Tensor, completion_ids: Tensor,
                        completion_mask: Tensor, group_size: int = 1, share_prompt: bool = True,
                        logprob_mask: Tensor | None = None, share_prefix: bool = True,
                        all_agree: Callable[[bool], bool] | None = None) -> Tensor:
    """Log-probs ``[N, C]`` of each completion token given its prompt and the completion before it.

    Prompts are ``[P, Lp]`` (left-padded), completions ``[P * group_size, C]`` (right-padded), row ``i``
    belonging to prompt ``i // group_size``. With ``share_prompt`` each prompt runs through the model
    once and its key/value cache, still attached to the graph, is repeated for its group, so the
    gradient through the shared prompt is computed once instead of G times; with ``share_prefix`` too, the
    prefix all prompts share is computed once for all of them (``prefill``; ``all_agree`` as there).

    Only the positions of ``logprob_mask`` (default: ``completion_mask``) get a log-prob, the others are 0:
    the output head projects just those positions (``head_positions``), so padding and tokens written by
    budget forcing, which no loss reads, cost no vocabulary projection.
    """
    keep = (completion_mask if logprob_mask is None else logprob_mask).bool()
    out_logprobs = torch.zeros(completion_ids.shape, dtype=torch.float32, device=completion_ids.device)
    if not share_prompt:
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
    start = prefill(model, prompts, 0, prompt_ids.device, share_prefix=share_prefix, all_agree=all_agree)
    # The first completion token is predicted by its prompt's last position, shared by the group.
    first = token_logprobs(start.last_logits.repeat_interleave(group_size, 0), completion_ids[:, 0])
    parts = [torch.where(keep[:, 0], first, torch.zeros_like(first)).unsqueeze(1)]
    if completion_ids.shape[1] > 1:
        cache = start.cache
        cache.batch_repeat_interleave(group_size)
        cached = start.attention.repeat_interleave(group_size, 0)
        attention = torch.cat([cached, completion_mask], dim=1)[:, :-1]
        positions = positions_from_mask(attention)[:, cached.shape[1]:]
        rest_keep = keep[:, 1:]
        with head_positions(model, rest_keep) as pick:
            logits = model(input_ids=completion_ids[:, :-1], attention_mask=attention, position_ids=positions,
                           cache=cache, use_cache=True).logits
            rest = out_logprobs[:, 1:].masked_scatter(rest_keep, token_logprobs(pick(logits), completion_ids[:, 1:][rest_keep]))
        parts.append(rest)
    return torch.cat(parts, dim=1)


def _sample(logits: Tensor, temperature: float, top_p: float, generator: torch.Generator | None,
            rows: int | None = None, index: Tensor | None = None) -> Tensor:
    """One token per row of ``logits``: argmax at temperature 0, else a draw from the tempered (nucleus) softmax.

    The draw is ``argmax(p / q)`` with ``q ~ Exp(1)``, exactly what ``torch.multinomial(p, 1)`` computes. The
    noise is drawn for all ``rows`` rows of the rollout and ``index`` picks the ones present in ``logits``, so
    the random stream, and every row's sample, is the same whether or not finished rows were dropped.
    """
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest set whose mass reaches top_p (the first token always stays).
        drop = sorted_probs.cumsum(-1) - sorted_probs > top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    rows = probs.shape[0] if rows is None else rows
    noise = torch.empty((rows, probs.shape[-1]), dtype=probs.dtype, device=probs.device).exponential_(1, generator=generator)
    if index is not None:
        noise = noise.index_select(0, index)
    return (probs / noise).argmax(-1)


class _GrowingLayer(DynamicLayer):
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


def _expand_cache(cache, group_size: int, new_tokens: int):
    """Give each of the cache's prompts ``group_size`` rows, with room for ``new_tokens`` more tokens.

    Plain ``DynamicLayer`` layers (full attention) become ``_GrowingLayer`` storage, filled by one broadcast
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
        layers[i] = _GrowingLayer(*grown, length=layer.keys.shape[-2])
    return cache


def end_of_sequence_ids(model, tokenizer) -> set[int]:
    """Tokens that end a response: the tokenizer's EOS and those of the model's generation config."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = {tokenizer.eos_token_id, *(configured if isinstance(configured, list) else [configured])}
    ids.discard(None)
    return ids


def _reasoning_length(char_ends: list[int], text: str, response_prefix: str) -> int:
    """Count tokens lying wholly between the opening and the closing think tags."""
    open_end = 0
    if THINK_OPEN not in response_prefix:
        found = text.find(THINK_OPEN)
        open_end = found + len(THINK_OPEN) if found >= 0 else 0
    close_start = text.find(THINK_CLOSE, open_end)
    if close_start < 0:
        close_start = len(text)
    starts = [0] + char_ends[:-1]
    return sum(1 for start, end in zip(starts, char_ends) if start >= open_end and end <= close_start)


@torch.no_grad()
def generate_group(
    model,
    tokenizer,
    prompts: list[list[int]],
    group_size: int,
    think_cap: int,
    answer_allowance: int,
    temperature: float = 0.8,
    top_p: float = 1.0,
    budget_forcing: bool = False,
    response_prefix: str = "<think>\n",
    max_new_tokens: int | None = None,
    generator: torch.Generator | None = None,
    token_bytes: TokenBytes | None = None,
    all_finished: Callable[[bool], bool] | None = None,
    compact_finished: bool = True,
    share_prefix: bool = True,
) -> GroupRollout:
    """Sample ``group_size`` completions per prompt, at most ``think_cap + answer_allowance`` new tokens each.

    Without budget forcing a row stops at its closed answer, at an end-of-sequence token or at the cap.
    With it, thinking stops at ``think_cap`` tokens and the answer gets ``answer_allowance`` tokens written
    by the model; the scaffold the generator writes does not count against either.

    Each prompt is prefilled once (the prefix common to all prompts once for all, with ``share_prefix``; see
    ``prefill``); its key/value cache is copied to its ``group_size`` rows into storage sized for the whole
    rollout, so decoding writes in place. With ``compact_finished``, rows that are done
    are dropped from the batch (and from the cache) once they are a quarter of it, so finished rows stop
    costing compute; the samples are the same either way (see ``_sample``).

    ``all_finished(local_done) -> bool``, when given, decides when to stop from every process's state: under
    FSDP each decoding step is a collective, so a process whose rows are done keeps stepping (on one row of
    padding) until the others are done too.
    """
    device = next(model.parameters()).device
    token_bytes = token_bytes or TokenBytes(tokenizer)
    eos_ids = end_of_sequence_ids(model, tokenizer)
    close_ids = tokenizer(THINK_CLOSE + " \\boxed{", add_special_tokens=False)["input_ids"]
    box_ids = tokenizer(" \\boxed{", add_special_tokens=False)["input_ids"]
    pad_id = tokenizer.pad_token_id
    cap = think_cap + answer_allowance + (len(close_ids) if budget_forcing else 0)
    if max_new_tokens is not None:
        cap = min(cap, max_new_tokens)

    rows = len(prompts) * group_size

    was_training = model.training
    model.eval()
    try:
        # all_finished is an AND over processes: it also makes them agree on the prefill's path.
        start = prefill(model, prompts, pad_id, device, share_prefix=share_prefix, all_agree=all_finished)
        prompt_width = start.attention.shape[1]
        cache = _expand_cache(start.cache, group_size, cap)
        logits = start.last_logits.repeat_interleave(group_size, dim=0)
        # The attention mask of the whole rollout, filled as it goes; each step passes its filled part.
        attention = torch.ones((rows, prompt_width + cap), dtype=start.attention.dtype, device=device)
        attention[:, :prompt_width] = start.attention.repeat_interleave(group_size, dim=0)
        next_position = start.positions.repeat_interleave(group_size) + 1
        # Batch row b of the cache holds rollout row active[b]; compaction drops finished rows from both.
        active = list(range(rows))
        active_index = torch.arange(rows, device=device)

        generated = [[] for _ in range(rows)]
        sampled = [[] for _ in range(rows)]
        raw = [bytearray() for _ in range(rows)]
        char_ends = [[] for _ in range(rows)]
        queued = [[] for _ in range(rows)]
        phase = [_THINKING] * rows
        thinking_tokens = [0] * rows
        answer_tokens = [0] * rows
        clipped = [False] * rows
        forced = [False] * rows

        steps = 0
        while True:
            # Past its own cap a process only steps along (padding) while another one is still generating.
            step = {r: pad_id for r in active}
            if steps < cap:
                steps += 1
                draws = _sample(logits, temperature, top_p, generator, rows, active_index).tolist()
                for b, r in enumerate(active):
                    if phase[r] == _DONE:
                        continue
                    token, by_policy = draws[b], True
                    if queued[r]:
                        token, by_policy = queued[r].pop(0), False
                    elif token in eos_ids and phase[r] == _THINKING and budget_forcing:
                        # Ending without an answer: write the answer scaffold instead of the end token.
                        queued[r] = list(close_ids)
                        token, by_policy, forced[r] = queued[r].pop(0), False, True
                    generated[r].append(token)
                    sampled[r].append(by_policy)
                    raw[r] += token_bytes(token)
                    text = raw[r].decode("utf-8", errors="ignore")
                    char_ends[r].append(len(text))
                    if phase[r] == _THINKING:
                        thinking_tokens[r] += int(by_policy)
                        if THINK_CLOSE in text:
                            phase[r] = _ANSWERING
                            if budget_forcing and not queued[r] and "\\boxed{" not in text.split(THINK_CLOSE, 1)[1]:
                                queued[r] = list(box_ids)
                                forced[r] = True
                        elif token in eos_ids:
                            phase[r] = _DONE
                        elif budget_forcing and not queued[r] and thinking_tokens[r] >= think_cap:
                            queued[r] = list(close_ids)
                            forced[r] = True
                            phase[r] = _ANSWERING
                    else:
                        answer_tokens[r] += int(by_policy)
                        if extract_prediction(response_prefix + text) is not None or token in eos_ids:
                            if not queued[r]:
                                phase[r] = _DONE
                        elif budget_forcing and answer_tokens[r] >= answer_allowance:
                            phase[r], clipped[r] = _DONE, True
                    step[r] = token
            if steps >= cap:
                for r in active:
                    if phase[r] != _DONE:
                        phase[r], clipped[r] = _DONE, True
            finished = all(phase[r] == _DONE for r in active)
            if all_finished(finished) if all_finished is not None else finished:
                break
            done_rows = sum(phase[r] == _DONE for r in active)
            if compact_finished and done_rows and 4 * done_rows >= len(active):
                # A process whose rows are all done keeps one row to step along with the others.
                keep = [b for b, r in enumerate(active) if phase[r] != _DONE] or [0]
                if len(keep) < len(active):
                    keep_index = torch.tensor(keep, device=device)
                    cache.batch_select_indices(keep_index)
                    attention = attention.index_select(0, keep_index)
                    next_position = next_position.index_select(0, keep_index)
                    active = [active[b] for b in keep]
                    active_index = active_index.index_select(0, keep_index)
            tokens = torch.tensor([step[r] for r in active], device=device).unsqueeze(1)
            out = model(input_ids=tokens, attention_mask=attention[:, : prompt_width + steps],
                        position_ids=next_position.unsqueeze(1), cache=cache, use_cache=True)
            cache = out.cache
            logits = out.logits[:, -1]
            next_position = next_position + 1
    finally:
        model.train(was_training)

    completion_ids, completion_mask = pad_right(generated, pad_id, min_width=1)
    sampled_mask = pad_right([[int(flag) for flag in row] for row in sampled], 0, min_width=1)[0].bool()
    completion_mask = completion_mask.bool()
    texts = [response_prefix + bytes(b).decode("utf-8", errors="replace") for b in raw]
    lengths = [
        _reasoning_length(ends, bytes(b).decode("utf-8", errors="ignore"), response_prefix) for ends, b in zip(char_ends, raw)
    ]
    return GroupRollout(completion_ids, completion_mask, sampled_mask, texts, lengths, clipped, forced)
