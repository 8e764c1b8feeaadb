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

from .method import extract_prediction, token_logprobs
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


def completion_logprobs(model, prompt_ids: Tensor, prompt_mask: Tensor, completion_ids: Tensor,
                        completion_mask: Tensor, group_size: int = 1, share_prompt: bool = True) -> Tensor:
    """Log-probs ``[N, C]`` of each completion token given its prompt and the completion before it.

    Prompts are ``[P, Lp]`` (left-padded), completions ``[P * group_size, C]`` (right-padded), row ``i``
    belonging to prompt ``i // group_size``. With ``share_prompt`` each prompt runs through the model
    once and its key/value cache, still attached to the graph, is repeated for its group, so the
    gradient through the shared prompt is computed once instead of G times.
    """
    prompt_rows = prompt_mask.repeat_interleave(group_size, 0)
    if not share_prompt:
        ids = torch.cat([prompt_ids.repeat_interleave(group_size, 0), completion_ids], dim=1)
        attention = torch.cat([prompt_rows, completion_mask], dim=1)
        width = completion_ids.shape[1]
        logits = model(input_ids=ids, attention_mask=attention, position_ids=positions_from_mask(attention),
                       logits_to_keep=width + 1).logits
        return token_logprobs(logits[:, :-1], completion_ids)
    out = model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=positions_from_mask(prompt_mask),
                use_cache=True, logits_to_keep=1)
    logits = out.logits[:, -1:].repeat_interleave(group_size, 0)
    if completion_ids.shape[1] > 1:
        cache = out.past_key_values
        cache.batch_repeat_interleave(group_size)
        attention = torch.cat([prompt_rows, completion_mask], dim=1)[:, :-1]
        positions = positions_from_mask(attention)[:, prompt_ids.shape[1]:]
        rest = model(input_ids=completion_ids[:, :-1], attention_mask=attention, position_ids=positions,
                     past_key_values=cache, use_cache=True).logits
        logits = torch.cat([logits, rest], dim=1)
    return token_logprobs(logits, completion_ids)


def _sample(logits: Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> Tensor:
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest set whose mass reaches top_p (the first token always stays).
        drop = sorted_probs.cumsum(-1) - sorted_probs > top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


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
) -> GroupRollout:
    """Sample ``group_size`` completions per prompt, at most ``think_cap + answer_allowance`` new tokens each.

    Without budget forcing a row stops at its closed answer, at an end-of-sequence token or at the cap.
    With it, thinking stops at ``think_cap`` tokens and the answer gets ``answer_allowance`` tokens written
    by the model; the scaffold the generator writes does not count against either.

    ``all_finished(local_done) -> bool``, when given, decides when to stop from every process's state: under
    FSDP each decoding step is a collective, so a process whose rows are done keeps stepping (its rows
    unchanged) until the others are done too.
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

    ids, attention = (t.to(device) for t in pad_left(prompts, pad_id))
    positions = positions_from_mask(attention)

    was_training = model.training
    model.eval()
    try:
        out = model(input_ids=ids, attention_mask=attention, position_ids=positions, use_cache=True, logits_to_keep=1)
        cache = out.past_key_values
        cache.batch_repeat_interleave(group_size)
        logits = out.logits[:, -1].repeat_interleave(group_size, dim=0)
        attention = attention.repeat_interleave(group_size, dim=0)
        next_position = positions[:, -1].repeat_interleave(group_size) + 1

        rows = len(prompts) * group_size
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
            step = [pad_id] * rows
            if steps < cap:
                steps += 1
                draws = _sample(logits, temperature, top_p, generator).tolist()
                step = []
                for r in range(rows):
                    if phase[r] == _DONE:
                        step.append(pad_id)
                        continue
                    token, by_policy = draws[r], True
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
                    step.append(token)
            if steps >= cap:
                for r in range(rows):
                    if phase[r] != _DONE:
                        phase[r], clipped[r] = _DONE, True
            finished = all(p == _DONE for p in phase)
            if all_finished(finished) if all_finished is not None else finished:
                break
            tokens = torch.tensor(step, device=device).unsqueeze(1)
            attention = torch.cat([attention, torch.ones((rows, 1), dtype=attention.dtype, device=device)], dim=1)
            out = model(input_ids=tokens, attention_mask=attention, position_ids=next_position.unsqueeze(1),
                        past_key_values=cache, use_cache=True)
            cache = out.past_key_values
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
