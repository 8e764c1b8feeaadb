"""Budget-capped group generation for RMT rollouts.

``generate_group`` prefills each prompt once (``forward.prefill``), keeps its keys and values once for the group's
``G`` rows (``kv_cache.SharedPromptCache``, read by ``attention.two_part_attention``; copied to each row by
``kv_cache.expand_cache`` for attention kinds that path does not cover), and decodes token by token: sample a token per row, advance each row's
state by it (``_Row.advance``), drop finished rows, run the model one step. A row goes through thinking, then
answering, then done. With budget forcing, a row whose thinking reaches its cap (or that closes ``</think>`` or
ends without an answer) gets the answer scaffold ``</think> \\boxed{`` written for it, token by token, so the
model only has to write the answer. Written-for-it tokens are part of the context but not of the
policy-gradient mask.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import cached_property

import torch
from torch import Tensor

from ..method import extract_prediction, generation_cap
from .attention import shared_prompt_attention, use_shared_prompt
from .decoding_weights import decoding_weights
from .forward import Prefill, prefill
from .kv_cache import SharedPromptCache, expand_cache
from .padding import pad_right
from .prepacked import prepacked_linears
from .prompts import ANSWER_SCAFFOLD, BOX_SCAFFOLD, BOXED, RESPONSE_PREFIX, THINK_CLOSE, THINK_OPEN
from .tokens import TokenBytes

_THINKING, _ANSWERING, _DONE = 0, 1, 2


@dataclass
class Rollout:
    """A rollout: the ``G`` completions of each prompt of one draw (row ``i`` belongs to prompt ``i // G``)."""

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
    logprobs: Tensor | None = None
    """``[N, C]`` log-prob of each sampled token under the policy's untempered distribution when it was sampled
    (0 elsewhere), by the decoding's own arithmetic; recorded with ``record_logprobs``. Updates that reuse a
    rollout take pi_old by the loss's forward instead (``Trajectory.old_logprobs``); trajectories kept by
    checkpoints written before that still hold these."""

    @cached_property
    def predictions(self) -> list[str | None]:
        """The ``\\boxed{}`` answer after ``</think>`` of each row, or None."""
        return [extract_prediction(text) for text in self.texts]


def invert_cdf(probs: Tensor, uniform: Tensor, block: int = 256) -> Tensor:
    """The token of each row of ``probs [N, V]`` (non-negative, any total) at which the cumulative mass first
    exceeds ``uniform [N, 1]`` (in ``[0, 1)``) times the row's total: a draw from the row's distribution.

    The search runs in two levels, over the masses of blocks of ``block`` tokens and then within the chosen block,
    so only ``[N, V / block]`` and ``[N, block]`` cumulative sums are taken (in float64), at a tenth of the cost of
    one over the vocabulary. A block's mass is summed in the probabilities' own precision (float32: about 1e-6
    of the block's mass, the size of the softmax's own rounding); within the block the draw is exact. A token of
    probability 0 is never drawn.
    """
    rows, vocab = probs.shape
    blocks = -(-vocab // block)
    if blocks * block != vocab:
        probs = torch.nn.functional.pad(probs, (0, blocks * block - vocab))
    tokens = probs.view(rows, blocks, block)
    block_mass = tokens.sum(-1).double()
    block_cdf = block_mass.cumsum(-1)
    total = block_cdf[:, -1:]
    # Below the total even where u * total rounds up to it.
    target = torch.minimum(uniform.double() * total, torch.nextafter(total, torch.zeros_like(total)))
    chosen = torch.searchsorted(block_cdf, target, right=True).clamp_max(blocks - 1)
    within_cdf = tokens.gather(1, chosen.unsqueeze(-1).expand(rows, 1, block)).squeeze(1).cumsum(-1, dtype=torch.float64)
    # The target's place inside the chosen block, on the scale of the block's own cumulative sum, kept inside
    # [0, its total) against rounding.
    mass = block_mass.gather(-1, chosen)
    fraction = (target - (block_cdf.gather(-1, chosen) - mass)) / mass
    within_total = within_cdf[:, -1:]
    below_total = torch.nextafter(within_total, torch.zeros_like(within_total))
    rest = torch.minimum((fraction * within_total).clamp_min(0.0), below_total)
    within = torch.searchsorted(within_cdf, rest, right=True)
    return (chosen * block + within).squeeze(-1)


def _sample(logits: Tensor, temperature: float, top_p: float, generator: torch.Generator | None,
            rows: int | None = None, index: Tensor | None = None) -> Tensor:
    """One token per row of ``logits``: argmax at temperature 0, else a draw from the tempered (nucleus) softmax.

    The draw inverts each row's cumulative distribution at one uniform number (``invert_cdf``): one number per
    row instead of the one per vocabulary entry of ``torch.multinomial``'s exponential noise, which cost 6% of a
    decoding step on a CPU. The numbers are drawn for all ``rows`` rows of the rollout and ``index`` picks the
    ones present in ``logits``, so the random stream, and every row's sample, is the same whether or not
    finished rows were dropped.
    """
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() if temperature == 1 else logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest set whose mass reaches top_p (the first token always stays).
        drop = sorted_probs.cumsum(-1) - sorted_probs > top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    rows = probs.shape[0] if rows is None else rows
    uniform = torch.rand((rows, 1), dtype=torch.float64, device=probs.device, generator=generator)
    if index is not None:
        uniform = uniform.index_select(0, index)
    return invert_cdf(probs, uniform)


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


@dataclass(frozen=True)
class GenerationSettings:
    """What a rollout samples: ``group_size`` completions per prompt under the budget's caps."""

    group_size: int
    """G: completions per prompt."""
    think_cap: int
    """Thinking tokens a completion may write (``method.thinking_cap``: 2B); with budget forcing the scaffold
    ``</think> \\boxed{`` is written for it there."""
    answer_allowance: int
    """Tokens the model may write after its thinking to close its answer."""
    temperature: float = 0.8
    """Sampling temperature (0: greedy)."""
    top_p: float = 1.0
    """Nucleus sampling mass (1: off)."""
    budget_forcing: bool = False
    """Write the answer scaffold for a completion whose thinking reaches the cap or ends without an answer."""
    response_prefix: str = RESPONSE_PREFIX
    """The text every response starts from (part of the prompt), read with the completion by the reward."""
    max_new_tokens: int | None = None
    """Hard cap on a completion's tokens (``method.generation_cap``)."""


@dataclass(frozen=True)
class DecodingOptions:
    """How the decoding runs; none of these changes the samples (prepacking: within float32 rounding)."""

    compact_finished: bool = True
    """Drop finished rows from the batch (and the cache) once they are a quarter of it."""
    prefill_common_prefix: bool = True
    """Prefill the prefix every prompt shares once for all of them (``forward.prefill``)."""
    share_prompt_attention: bool = True
    """Keep each prompt's keys and values once for its G rows, read by shared-prompt attention (``attention``;
    models it does not cover fall back with one logged line), instead of a copy per row."""
    record_logprobs: bool = False
    """Keep each sampled token's log-prob under the untempered distribution (``Rollout.logprobs``)."""
    prepack_weights: bool = True
    """On a CPU, decode with the float32 linear weights reordered once for oneDNN (``prepacked``)."""
    gather_weights: bool = True
    """Under FSDP, gather the weights once for the rollout instead of at every decoding step."""


@dataclass(frozen=True)
class _Rules:
    """What every row of one rollout follows: the sampling, the caps, the tokens that end it, and budget forcing's
    scaffolds."""

    settings: GenerationSettings
    cap: int
    """New tokens a row may hold (``method.generation_cap``)."""
    pad_id: int
    eos_ids: frozenset[int]
    answer_scaffold: tuple[int, ...]
    """Token ids of ``</think> \\boxed{``."""
    box_scaffold: tuple[int, ...]
    """Token ids of `` \\boxed{``."""
    token_bytes: TokenBytes

    @classmethod
    def of(cls, model, tokenizer, settings: GenerationSettings, token_bytes: TokenBytes | None) -> _Rules:
        encode = lambda text: tuple(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
        answer_scaffold = encode(ANSWER_SCAFFOLD)
        scaffold = len(answer_scaffold) if settings.budget_forcing else 0
        cap = generation_cap(settings.think_cap, settings.answer_allowance, scaffold, settings.max_new_tokens)
        return cls(settings, cap, tokenizer.pad_token_id, frozenset(end_of_sequence_ids(model, tokenizer)),
                   answer_scaffold, encode(BOX_SCAFFOLD), token_bytes or TokenBytes(tokenizer))


@dataclass
class _Row:
    """One completion being generated: its tokens and which the policy sampled, its text, and where it is in
    the answer format (thinking, answering, done)."""

    tokens: list[int] = field(default_factory=list)
    sampled: list[bool] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    """The policy's log-prob of each token it sampled (0.0 for written tokens)."""
    raw: bytearray = field(default_factory=bytearray)
    char_ends: list[int] = field(default_factory=list)
    """Length of the decoded text after each token (for the reasoning length)."""
    queued: list[int] = field(default_factory=list)
    """Scaffold tokens budget forcing writes next, one per step."""
    phase: int = _THINKING
    thinking_tokens: int = 0
    answer_tokens: int = 0
    clipped: bool = False
    forced: bool = False

    @property
    def done(self) -> bool:
        return self.phase == _DONE

    def _force(self, scaffold: tuple[int, ...]) -> None:
        self.queued, self.forced = list(scaffold), True

    def advance(self, draw: int, rules: _Rules, logprob: float = 0.0) -> int:
        """Take the step's token (the policy's ``draw``, whose log-prob is ``logprob``, or the next scaffold token
        budget forcing writes) and move the row on; returns the token, which the model reads next."""
        token, by_policy = draw, True
        if self.queued:
            token, by_policy = self.queued.pop(0), False
        elif token in rules.eos_ids and self.phase == _THINKING and rules.settings.budget_forcing:
            # Ending without an answer: write the answer scaffold instead of the end token.
            self._force(rules.answer_scaffold)
            token, by_policy = self.queued.pop(0), False
        self.tokens.append(token)
        self.sampled.append(by_policy)
        self.logprobs.append(logprob if by_policy else 0.0)
        self.raw += rules.token_bytes(token)
        text = self.raw.decode("utf-8", errors="ignore")
        self.char_ends.append(len(text))
        if self.phase == _THINKING:
            self.thinking_tokens += int(by_policy)
            if THINK_CLOSE in text:
                self.phase = _ANSWERING
                if rules.settings.budget_forcing and not self.queued and BOXED not in text.split(THINK_CLOSE, 1)[1]:
                    self._force(rules.box_scaffold)
            elif token in rules.eos_ids:
                self.phase = _DONE
            elif rules.settings.budget_forcing and not self.queued and self.thinking_tokens >= rules.settings.think_cap:
                self._force(rules.answer_scaffold)
                self.phase = _ANSWERING
        else:
            self.answer_tokens += int(by_policy)
            if extract_prediction(rules.settings.response_prefix + text) is not None or token in rules.eos_ids:
                if not self.queued:
                    self.phase = _DONE
            elif rules.settings.budget_forcing and self.answer_tokens >= rules.settings.answer_allowance:
                self.phase, self.clipped = _DONE, True
        return token

    def stop_at_the_cap(self) -> None:
        if not self.done:
            self.phase, self.clipped = _DONE, True


def _logprobs_of(logits: Tensor, tokens: Tensor) -> list[float]:
    """The untempered log-prob of each row's token."""
    return torch.log_softmax(logits.float(), -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1).tolist()


class _DecodingCache:
    """The rollout's key/value cache and what each decoding step passes the model with it.

    With shared-prompt attention (models with plain full attention) the prompts' keys and values are stored once
    per prompt and their padding mask lives in the cache; otherwise they are copied to each prompt's rows and each
    step passes the filled part of the rollout's attention mask.
    """

    def __init__(self, model, start: Prefill, group_size: int, capacity: int, share_prompt_attention: bool):
        self.prompt_width = start.attention.shape[1]
        if use_shared_prompt(model, start.cache, share_prompt_attention):
            self.cache = SharedPromptCache(start.cache, start.attention, group_size, capacity)
            self.mask, self.attending = None, shared_prompt_attention(model)
            return
        self.cache = expand_cache(start.cache, group_size, capacity)
        rows = start.attention.shape[0] * group_size
        self.mask = torch.ones((rows, self.prompt_width + capacity), dtype=start.attention.dtype, device=start.attention.device)
        self.mask[:, : self.prompt_width] = start.attention.repeat_interleave(group_size, dim=0)
        self.attending = nullcontext()

    def select(self, keep: Tensor) -> None:
        """Keep the batch rows ``keep`` (finished rows dropped)."""
        self.cache.batch_select_indices(keep)
        if self.mask is not None:
            self.mask = self.mask.index_select(0, keep)

    def inputs(self, steps: int) -> dict:
        """The cache arguments of the forward that reads the ``steps``-th generated token."""
        if self.mask is None:
            return {"cache": self.cache, "shared_prompt": self.cache}
        return {"cache": self.cache, "attention_mask": self.mask[:, : self.prompt_width + steps]}


def _to_rollout(rows: list[_Row], pad_id: int, response_prefix: str, with_logprobs: bool) -> Rollout:
    completion_ids, completion_mask = pad_right([row.tokens for row in rows], pad_id, min_width=1)
    sampled_mask = pad_right([[int(flag) for flag in row.sampled] for row in rows], 0, min_width=1)[0].bool()
    texts = [response_prefix + bytes(row.raw).decode("utf-8", errors="replace") for row in rows]
    lengths = [_reasoning_length(row.char_ends, bytes(row.raw).decode("utf-8", errors="ignore"), response_prefix) for row in rows]
    logprobs = None
    if with_logprobs:
        logprobs = torch.zeros(completion_ids.shape, dtype=torch.float32)
        for i, row in enumerate(rows):
            logprobs[i, : len(row.logprobs)] = torch.tensor(row.logprobs, dtype=torch.float32)
    return Rollout(completion_ids, completion_mask.bool(), sampled_mask, texts, lengths,
                        [row.clipped for row in rows], [row.forced for row in rows], logprobs)


class _Batch:
    """The rows still decoding and the model's state for them: batch row ``b`` holds rollout row ``active[b]``;
    compaction drops finished rows from both."""

    def __init__(self, model, start: Prefill, rules: _Rules, options: DecodingOptions, rows: int, device):
        self.device = device
        group_size = rules.settings.group_size
        self.cache = _DecodingCache(model, start, group_size, rules.cap, options.share_prompt_attention)
        self.logits = start.last_logits.repeat_interleave(group_size, dim=0)
        self.next_position = start.positions.repeat_interleave(group_size) + 1
        self.active = list(range(rows))
        self.active_index = torch.arange(rows, device=device)
        self.steps = 0

    def drop_finished(self, rows: list[_Row]) -> None:
        """Drop the finished rows once they are a quarter of the batch (a process whose rows are all done keeps
        one row, to step along with the others)."""
        done = sum(rows[r].done for r in self.active)
        if not done or 4 * done < len(self.active):
            return
        keep = [b for b, r in enumerate(self.active) if not rows[r].done] or [0]
        if len(keep) < len(self.active):
            keep_index = torch.tensor(keep, device=self.device)
            self.cache.select(keep_index)
            self.next_position = self.next_position.index_select(0, keep_index)
            self.active = [self.active[b] for b in keep]
            self.active_index = self.active_index.index_select(0, keep_index)

    def forward(self, model, tokens: list[int]) -> None:
        """Run the model one step on each active row's token."""
        ids = torch.tensor(tokens, device=self.device).unsqueeze(1)
        out = model(input_ids=ids, position_ids=self.next_position.unsqueeze(1), use_cache=True,
                    **self.cache.inputs(self.steps))
        self.logits = out.logits[:, -1]
        self.next_position = self.next_position + 1


def _decode(model, rows: list[_Row], batch: _Batch, rules: _Rules, options: DecodingOptions,
            generator: torch.Generator | None, all_finished: Callable[[bool], bool] | None) -> None:
    """Sample a token per row, advance each row by it, drop finished rows, run the model one step; until every row
    is done (on every process, with ``all_finished``)."""
    settings = rules.settings
    while True:
        # Past its own cap a process only steps along (padding) while another one is still generating.
        step = {r: rules.pad_id for r in batch.active}
        if batch.steps < rules.cap:
            batch.steps += 1
            drawn = _sample(batch.logits, settings.temperature, settings.top_p, generator, len(rows), batch.active_index)
            logprobs = _logprobs_of(batch.logits, drawn) if options.record_logprobs else [0.0] * len(batch.active)
            for r, draw, logprob in zip(batch.active, drawn.tolist(), logprobs):
                if not rows[r].done:
                    step[r] = rows[r].advance(draw, rules, logprob)
        if batch.steps >= rules.cap:
            for r in batch.active:
                rows[r].stop_at_the_cap()
        finished = all(rows[r].done for r in batch.active)
        if all_finished(finished) if all_finished is not None else finished:
            return
        if options.compact_finished:
            batch.drop_finished(rows)
        batch.forward(model, [step[r] for r in batch.active])


@torch.no_grad()
def generate_group(model, tokenizer, prompts: list[list[int]], settings: GenerationSettings,
                   options: DecodingOptions = DecodingOptions(), generator: torch.Generator | None = None,
                   token_bytes: TokenBytes | None = None,
                   all_finished: Callable[[bool], bool] | None = None) -> Rollout:
    """Sample ``settings.group_size`` completions per prompt, at most ``think_cap + answer_allowance`` new tokens
    each (plus the scaffold budget forcing writes; ``method.generation_cap``).

    Without budget forcing a row stops at its closed answer, at an end-of-sequence token or at the cap.
    With it, thinking stops at ``think_cap`` tokens and the answer gets ``answer_allowance`` tokens written
    by the model; the scaffold the generator writes does not count against either.

    Each prompt is prefilled once (``forward.prefill``), its keys and values kept once for its rows or copied to
    each (``DecodingOptions``); each row's own tokens go to storage sized for the whole rollout, so decoding
    writes in place. The samples are the same whichever ``options`` (see ``_sample``). The prefill and the
    decoding steps run on weights prepared once for the rollout (``decoding_weights.decoding_weights``: cast once
    under ``bf16-mixed``, gathered once under FSDP with ``gather_weights``).

    ``all_finished(local_done) -> bool``, when given, decides when to stop from every process's state: each
    decoding step of a sharded model whose weights are not gathered is a collective, so a process whose rows are
    done keeps stepping (on one row of padding) until the others are done too; it also makes the processes agree
    on the prefill's path. Once the weights are gathered the forwards are no longer collectives: it is not called,
    and each process stops when its own rows are done.
    """
    rules = _Rules.of(model, tokenizer, settings, token_bytes)
    rows = [_Row() for _ in range(len(prompts) * settings.group_size)]
    was_training = model.training
    model.eval()
    try:
        with decoding_weights(model, gather=options.gather_weights) as weights:
            agree = None if weights.gathered else all_finished
            # Read once gathered: FSDP1 with offloaded parameters gathers them onto its compute device.
            device = next(model.parameters()).device
            # all_finished is an AND over processes: it also makes them agree on the prefill's path.
            start = prefill(model, prompts, rules.pad_id, device, options.prefill_common_prefix, agree)
            batch = _Batch(model, start, rules, options, len(rows), device)
            with batch.cache.attending, prepacked_linears(model, len(rows), enabled=options.prepack_weights):
                _decode(model, rows, batch, rules, options, generator, agree)
    finally:
        model.train(was_training)
    return _to_rollout(rows, rules.pad_id, settings.response_prefix, options.record_logprobs)
