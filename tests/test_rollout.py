"""Prompt building, the budget-forcing state machine of ``generate_group`` and ``completion_logprobs``.

The state machine is checked with a scripted model: the real tiny Llama, with +1e4 added to the logit of
the token each row is scripted to write next, so sampling at temperature 0.8 is deterministic.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from rmt_lightning.engine.models import BUILTIN_TINY, load_tokenizer
from rmt_lightning.engine.forward import CompletionBatch, ForwardOptions, completion_logprobs, positions_from_mask
from rmt_lightning.engine.prompts import DEFAULT_INSTRUCTION, build_prompt_ids, render_instruction
from generate import generate
from rmt_lightning.engine.generation import _sample, invert_cdf
from rmt_lightning.engine.tokens import TokenBytes

PREFIX = "<think>\n"


# ---------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def token_bytes(tokenizer):
    return TokenBytes(tokenizer)


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _one(tokenizer, text: str) -> int:
    ids = _ids(tokenizer, text)
    assert len(ids) == 1, (text, ids)
    return ids[0]


def _text(token_bytes, ids) -> str:
    return b"".join(token_bytes.many(ids)).decode("utf-8")


def _prompts(tokenizer, contexts: list[str], budget: int = 8) -> list[list[int]]:
    return [build_prompt_ids(tokenizer, c, budget) for c in contexts]


class ScriptedLM(nn.Module):
    """The real model, with the logit of each row's scripted next token raised by 1e4.

    ``scripts[r]`` is the token row ``r`` (= prompt * G + g) should write at each generated position (counting
    tokens written for it by budget forcing too); past its end the row writes ``filler``. The prefill call
    gives one logit row per prompt, so the G rows of a prompt must share their first scripted token.
    """

    def __init__(self, lm: nn.Module, scripts: list[list[int]], group_size: int, filler: int):
        super().__init__()
        self.lm = lm
        self.scripts = scripts
        self.group_size = group_size
        self.filler = filler
        self.step = -1
        self.fed: list[list[int]] = []  # tokens fed to the model at each decode step

    @property
    def generation_config(self):
        return self.lm.generation_config

    def _scripted(self, row: int, step: int) -> int:
        script = self.scripts[row]
        return script[step] if step < len(script) else self.filler

    def forward(self, input_ids, cache=None, **kwargs):
        out = self.lm(input_ids=input_ids, cache=cache, **kwargs)
        logits = out.logits
        # Prompt passes (the shared prefix, then the prompts) feed several tokens; decoding steps feed one.
        if cache is None or input_ids.shape[1] > 1:
            self.step = 0
            for p in range(logits.shape[0]):
                first = {self._scripted(p * self.group_size + g, 0) for g in range(self.group_size)}
                assert len(first) == 1, "rows of one prompt must share their first scripted token"
                logits[p, -1, first.pop()] += 1e4
        else:
            self.fed.append(input_ids[:, 0].tolist())
            self.step += 1
            for r in range(logits.shape[0]):
                logits[r, -1, self._scripted(r, self.step)] += 1e4
        return out


def _row(rollout, r: int) -> tuple[list[int], list[bool], list[bool]]:
    """Valid tokens, their sampled flags and the full completion mask of row ``r``."""
    n = int(rollout.completion_mask[r].sum())
    return (rollout.completion_ids[r, :n].tolist(), rollout.sampled_mask[r, :n].tolist(),
            rollout.completion_mask[r].tolist())


def ids_of_row(rollout, r: int) -> list[int]:
    """Valid tokens of row ``r``."""
    return _row(rollout, r)[0]


def _run_scripted(model, tokenizer, scripts, group_size, seed=0, **kwargs):
    filler = _one(tokenizer, " y")
    lm = ScriptedLM(model, scripts, group_size, filler)
    prompts = _prompts(tokenizer, ["1 + 1 = 2", "a much longer context: 3 * 4 = 12, and 5 - 2 = 3"][: len(scripts) // group_size])
    generator = torch.Generator().manual_seed(seed)
    # The scripted model picks each row's token by its index in the batch, which dropping finished rows would
    # renumber; compaction is checked on its own (test_compaction_changes_no_sample) and keeps every sample.
    kwargs.setdefault("compact_finished", False)
    rollout = generate(lm, tokenizer, prompts, group_size, temperature=0.8, generator=generator, **kwargs)
    return rollout, lm


# ---------------------------------------------------------------- prompts


def test_render_instruction_fills_only_budget_and_context():
    template = "Use {budget} tokens on {context}, answer in \\boxed{} or {other}; again {budget}."
    out = render_instruction(template, 37, "x {y} z")
    assert out == "Use 37 tokens on x {y} z, answer in \\boxed{} or {other}; again 37."
    # Context text is inserted verbatim, even when it looks like a placeholder.
    assert render_instruction("[{context}]", 5, "{budget} {context}") == "[{budget} {context}]"
    default = render_instruction(DEFAULT_INSTRUCTION, 12, "2 + 2 =")
    assert "exactly 12 tokens" in default
    assert default.endswith("<|text_start|>2 + 2 =<|text_end|>")
    assert "\\boxed{}" in default and "{budget}" not in default and "{context}" not in default


def test_build_prompt_ids_chat_template(tokenizer, token_bytes):
    context = "3 * 4 = 12"
    ids = build_prompt_ids(tokenizer, context, 16, response_prefix=PREFIX)
    tail = _ids(tokenizer, "<|im_start|>assistant\n" + PREFIX)
    assert ids[-len(tail):] == tail
    text = _text(token_bytes, ids)
    user = render_instruction(DEFAULT_INSTRUCTION, 16, context)
    assert text == f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n{PREFIX}"
    assert "<|text_start|>3 * 4 = 12<|text_end|>" in text
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")


def test_build_prompt_ids_plain(tokenizer, token_bytes):
    context = "7 + 8 = 15"
    ids = build_prompt_ids(tokenizer, context, 4, instruction="Budget {budget}: {context}", response_prefix="<think>",
                           use_chat_template=False)
    assert _text(token_bytes, ids) == "Budget 4: 7 + 8 = 15\n<think>"
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") not in ids
    # A tokenizer without a chat template falls back to the plain form.
    bare = load_tokenizer(BUILTIN_TINY)
    bare.chat_template = None
    assert build_prompt_ids(bare, context, 4, instruction="Budget {budget}: {context}", response_prefix="<think>") == ids


def test_positions_from_mask_skips_left_padding():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    assert positions_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4], [0, 0, 0, 0, 0]]


# ---------------------------------------------------------------- state machine (scripted model)


def test_scripted_without_forcing(model, tokenizer, token_bytes):
    """(a) a closed answer stops right after ``}``; (d) nothing exceeds the cap and capped rows are clipped."""
    eos = tokenizer.eos_token_id
    y, x = _one(tokenizer, " y"), _one(tokenizer, " c")
    answer = _ids(tokenizer, " a b</think> \\boxed{ 7}")
    closed = _ids(tokenizer, " c</think>")
    scripts = [
        answer,                         # row 0: answers, then would go on writing " y"
        [answer[0]],                    # row 1: thinks forever
        [x, _one(tokenizer, " b"), eos],  # row 2: ends while thinking
        closed,                         # row 3: closes thinking but never boxes an answer
    ]
    think_cap, allowance = 30, 10
    rollout, lm = _run_scripted(model, tokenizer, scripts, 2, think_cap=think_cap, answer_allowance=allowance,
                                budget_forcing=False)
    cap = think_cap + allowance
    assert rollout.completion_ids.shape == (4, cap)

    ids, sampled, mask = _row(rollout, 0)
    assert ids == answer and len(answer) == 17
    assert sampled == [True] * 17 and mask == [True] * 17 + [False] * (cap - 17)
    assert rollout.texts[0] == PREFIX + " a b</think> \\boxed{ 7}"
    assert rollout.predictions[0] == " 7"
    assert rollout.reasoning_lengths[0] == 2
    assert rollout.clipped[0] is False and rollout.forced[0] is False
    assert rollout.completion_ids[0, 17:].tolist() == [tokenizer.pad_token_id] * (cap - 17)

    ids, sampled, _ = _row(rollout, 1)
    assert ids == [answer[0]] + [y] * (cap - 1)
    assert all(sampled)
    assert rollout.clipped[1] is True and rollout.forced[1] is False
    assert rollout.predictions[1] is None
    assert rollout.reasoning_lengths[1] == cap

    ids, sampled, _ = _row(rollout, 2)
    assert ids == scripts[2] and sampled == [True] * 3  # the end token is the policy's own action
    assert rollout.clipped[2] is False and rollout.forced[2] is False
    assert rollout.predictions[2] is None

    ids, sampled, _ = _row(rollout, 3)
    assert ids == closed + [y] * (cap - len(closed))
    assert all(sampled)
    assert rollout.clipped[3] is True and rollout.forced[3] is False
    assert rollout.predictions[3] is None
    assert rollout.reasoning_lengths[3] == 1

    assert (rollout.completion_mask.sum(1) <= cap).all()
    assert torch.equal(rollout.sampled_mask, rollout.completion_mask)
    # Each generated token but the last was fed back as context; finished rows are fed padding.
    assert len(lm.fed) == cap - 1
    assert [step[0] for step in lm.fed] == answer + [tokenizer.pad_token_id] * (cap - 1 - 17)
    assert [step[1] for step in lm.fed] == ids_of_row(rollout, 1)[:-1]


def test_scripted_max_new_tokens_caps_below_think_cap(model, tokenizer):
    y = _one(tokenizer, " y")
    rollout, _ = _run_scripted(model, tokenizer, [[y], [y]], 2, think_cap=30, answer_allowance=10, max_new_tokens=6)
    assert rollout.completion_ids.shape == (2, 6)
    assert rollout.completion_mask.all()
    assert rollout.clipped == [True, True]


def test_scripted_budget_forcing_at_think_cap(model, tokenizer, token_bytes):
    """(b) thinking that never closes gets ``</think> \\boxed{`` written after exactly ``think_cap`` tokens."""
    y = _one(tokenizer, " y")
    seven, brace = _one(tokenizer, " 7"), _one(tokenizer, "}")
    scaffold = _ids(tokenizer, "</think> \\boxed{")
    close_think = _ids(tokenizer, "</think>")
    box = _ids(tokenizer, " \\boxed{")
    assert scaffold == close_think + box and len(scaffold) == 13
    think_cap, allowance = 4, 20
    # Positions 4..16 are written by forcing; the scripted draws there are ignored.
    scripts = [
        [y] * 4 + [y] * 13 + [seven, brace],  # row 0: forced, then answers " 7"
        [y],                                  # row 1: forced, never closes the box
    ]
    rollout, lm = _run_scripted(model, tokenizer, scripts, 2, think_cap=think_cap, answer_allowance=allowance,
                                budget_forcing=True)

    ids, sampled, mask = _row(rollout, 0)
    assert ids == [y] * 4 + scaffold + [seven, brace]
    assert sampled == [True] * 4 + [False] * 13 + [True, True]
    assert mask[:19] == [True] * 19 and not any(mask[19:])
    assert rollout.forced[0] is True and rollout.clipped[0] is False
    assert rollout.reasoning_lengths[0] == 4
    assert rollout.predictions[0] == " 7"
    assert rollout.texts[0] == PREFIX + " y y y y</think> \\boxed{ 7}"

    # The scaffold does not count against the answer allowance: the model still writes ``allowance`` tokens.
    ids, sampled, _ = _row(rollout, 1)
    assert len(ids) == think_cap + 13 + allowance
    assert ids == [y] * 4 + scaffold + [y] * allowance
    assert sampled == [True] * 4 + [False] * 13 + [True] * allowance
    assert rollout.forced[1] is True and rollout.clipped[1] is True
    assert rollout.reasoning_lengths[1] == 4
    assert rollout.predictions[1] is None
    assert rollout.completion_ids.shape == (2, think_cap + 13 + allowance)

    # Forced tokens are part of the context: they are what the model is fed next.
    assert [step[0] for step in lm.fed[:19]] == ids_of_row(rollout, 0)
    # Row 1's last token finishes every row, so it is not fed.
    assert len(lm.fed) == think_cap + 13 + allowance - 1
    assert [step[1] for step in lm.fed] == ids_of_row(rollout, 1)[:-1]
    assert not (rollout.sampled_mask & ~rollout.completion_mask).any()


def test_scripted_budget_forcing_after_own_close(model, tokenizer):
    """(b) a row that closes ``</think>`` itself gets only `` \\boxed{`` written, right after the close (before the
    model could write it itself), and the model writes the answer."""
    x, y = _one(tokenizer, " c"), _one(tokenizer, " y")
    seven, brace = _one(tokenizer, " 7"), _one(tokenizer, "}")
    close_think = _ids(tokenizer, "</think>")
    box = _ids(tokenizer, " \\boxed{")
    own = [x] + _ids(tokenizer, "</think> \\boxed{ 7}")
    scripts = [
        [x, _one(tokenizer, " a")] + close_think + [y] * 7 + [seven, brace],  # 8 thinking tokens < cap
        own,
    ]
    rollout, _ = _run_scripted(model, tokenizer, scripts, 2, think_cap=10, answer_allowance=20, budget_forcing=True)

    ids, sampled, _ = _row(rollout, 0)
    assert ids == [x, _one(tokenizer, " a")] + close_think + box + [seven, brace]
    assert sampled == [True] * 8 + [False] * 7 + [True, True]
    assert rollout.forced[0] is True and rollout.clipped[0] is False
    assert rollout.reasoning_lengths[0] == 2
    assert rollout.predictions[0] == " 7"

    # The box is written for it even though the model would have written the same tokens.
    ids, sampled, _ = _row(rollout, 1)
    assert ids == own
    assert sampled == [True] * 7 + [False] * 7 + [True, True]
    assert rollout.forced[1] is True and rollout.clipped[1] is False
    assert rollout.reasoning_lengths[1] == 1
    assert rollout.predictions[1] == " 7"


def test_scripted_budget_forcing_answer_allowance(model, tokenizer):
    """(b) with forcing, the answer phase ends after ``answer_allowance`` tokens written by the model (clipped),
    before the overall cap; tokens written for it do not count."""
    c, y = _one(tokenizer, " c"), _one(tokenizer, " y")
    close_think = _ids(tokenizer, "</think>")
    box = _ids(tokenizer, " \\boxed{")
    scaffold = _ids(tokenizer, "</think> \\boxed{")
    think_cap, allowance = 10, 3
    scripts = [
        [c, _one(tokenizer, " a")] + close_think,  # closes after 8 thinking tokens, box forced, then rambles
        [c],                                       # forced at the thinking cap, then rambles
    ]
    rollout, _ = _run_scripted(model, tokenizer, scripts, 2, think_cap=think_cap, answer_allowance=allowance,
                               budget_forcing=True, max_new_tokens=100)
    ids, sampled, _ = _row(rollout, 0)
    assert ids == [c, _one(tokenizer, " a")] + close_think + box + [y] * allowance
    assert sampled == [True] * 8 + [False] * 7 + [True] * allowance
    ids, sampled, _ = _row(rollout, 1)
    assert ids == [c] + [y] * (think_cap - 1) + scaffold + [y] * allowance
    assert sampled == [True] * think_cap + [False] * 13 + [True] * allowance
    assert rollout.clipped == [True, True] and rollout.forced == [True, True]
    assert rollout.predictions == [None, None]
    assert rollout.reasoning_lengths == [2, think_cap]


def test_scripted_budget_forcing_replaces_eos_while_thinking(model, tokenizer):
    """(c) an end token while thinking becomes the answer scaffold; one while answering ends the row."""
    eos = tokenizer.eos_token_id
    y = _one(tokenizer, " y")
    seven, brace = _one(tokenizer, " 7"), _one(tokenizer, "}")
    scaffold = _ids(tokenizer, "</think> \\boxed{")
    scripts = [
        [y, y, eos] + [y] * 12 + [seven, brace],   # EOS at position 2, scaffold occupies 2..14
        [y] + scaffold + [eos],                    # closes (the box is written for it), then ends
    ]
    rollout, _ = _run_scripted(model, tokenizer, scripts, 2, think_cap=20, answer_allowance=30, budget_forcing=True)

    ids, sampled, _ = _row(rollout, 0)
    assert eos not in ids
    assert ids == [y, y] + scaffold + [seven, brace]
    assert sampled == [True, True] + [False] * 13 + [True, True]
    assert rollout.forced[0] is True and rollout.clipped[0] is False
    assert rollout.reasoning_lengths[0] == 2
    assert rollout.predictions[0] == " 7"

    ids, sampled, _ = _row(rollout, 1)
    assert ids == [y] + scaffold + [eos]
    assert sampled == [True] * 7 + [False] * 7 + [True]
    assert rollout.forced[1] is True and rollout.clipped[1] is False
    assert rollout.predictions[1] is None


def test_scripted_eos_near_think_cap_writes_scaffold_once(model, tokenizer):
    eos = tokenizer.eos_token_id
    y = _one(tokenizer, " y")
    seven, brace = _one(tokenizer, " 7"), _one(tokenizer, "}")
    scaffold = _ids(tokenizer, "</think> \\boxed{")
    scripts = [[y, y, eos] + [y] * 12 + [seven, brace]] * 2
    rollout, _ = _run_scripted(model, tokenizer, scripts, 2, think_cap=4, answer_allowance=30, budget_forcing=True)
    ids, sampled, _ = _row(rollout, 0)
    assert rollout.texts[0] == PREFIX + " y y</think> \\boxed{ 7}"
    assert ids == [y, y] + scaffold + [seven, brace]
    assert sampled == [True, True] + [False] * 13 + [True, True]
    assert rollout.reasoning_lengths[0] == 2


# ---------------------------------------------------------------- the sampler


@pytest.mark.parametrize("block", [2, 4, 256])
def test_invert_cdf_on_hand_built_rows(block):
    """The first token whose cumulative mass exceeds u * total, at every block size (blocks of 2 and 4 split
    and pad the six tokens); tokens of probability 0 are never drawn, whatever u in [0, 1) and rounding."""
    probs = torch.tensor([[0.0, 0.0, 0.3, 0.7, 0.0, 0.0], [2.0, 0.0, 0.0, 0.0, 0.0, 2.0]])  # row 2: total 4
    cases = {0.0: [2, 0], 0.2999: [2, 0], 0.3001: [3, 0], 0.5: [3, 5], 0.9999999999: [3, 5], 1 - 2**-53: [3, 5]}
    for u, expected in cases.items():
        assert invert_cdf(probs, torch.full((2, 1), u, dtype=torch.float64), block=block).tolist() == expected, u


def test_invert_cdf_equals_one_cumulative_sum_over_the_vocabulary():
    probs = torch.softmax(3 * torch.randn(64, 1000, generator=torch.Generator().manual_seed(4)), -1)
    uniform = torch.rand((64, 1), dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    cumulative = probs.double().cumsum(-1)
    full = torch.searchsorted(cumulative, uniform * cumulative[:, -1:], right=True).squeeze(-1)
    assert invert_cdf(probs, uniform, block=64).tolist() == full.tolist()


def test_sampler_draws_the_tempered_nucleus_distribution():
    """Frequencies of 40,000 draws per row match the softmax of hand-built logits at temperature 0.5; top_p
    0.75 keeps the smallest set of largest tokens reaching it, renormalised, and never draws a token it cut;
    argmax at temperature 0."""
    probs = torch.tensor([[0.5, 0.3, 0.2, 0.0], [0.1, 0.1, 0.1, 0.7]])
    logits = probs.clamp_min(1e-30).log() / 2  # softmax(logits / 0.5) == probs
    draws = 40_000
    repeated = logits.repeat_interleave(draws, dim=0)
    tokens = _sample(repeated, 0.5, 1.0, torch.Generator().manual_seed(0)).view(2, draws)
    frequencies = torch.stack([torch.bincount(row, minlength=4) for row in tokens]).double() / draws
    # Four standard errors of a frequency of 0.5 over 40,000 draws: 0.01.
    assert frequencies.numpy() == pytest.approx(probs.double().numpy(), abs=0.01)
    assert frequencies[0, 3].item() == 0.0  # probability 0: never drawn
    nucleus = _sample(repeated, 0.5, 0.75, torch.Generator().manual_seed(1)).view(2, draws)
    kept = torch.bincount(nucleus[0], minlength=4).double() / draws
    assert kept.numpy() == pytest.approx([0.625, 0.375, 0.0, 0.0], abs=0.01)
    # [0.1, 0.1, 0.1, 0.7]: the nucleus is 0.7 and one of the tied 0.1s, renormalised to 0.875 / 0.125.
    assert (nucleus[1] == 3).double().mean().item() == pytest.approx(0.875, abs=0.01)
    assert len(set(nucleus[1].tolist())) == 2
    assert _sample(logits, 0.0, 1.0, None).tolist() == [0, 3]


def test_sampler_stream_ignores_which_rows_are_present():
    """Row r's draw depends on the generator and its own logits only: sampling rows [1, 3] of 4 with their
    index gives what sampling all four gives for those rows."""
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(2))
    everything = _sample(logits, 1.0, 1.0, torch.Generator().manual_seed(3))
    index = torch.tensor([1, 3])
    some = _sample(logits[index], 1.0, 1.0, torch.Generator().manual_seed(3), rows=4, index=index)
    assert some.tolist() == everything[index].tolist()


# ---------------------------------------------------------------- real tiny model


def _reference_draws(model, prompts, group_size, steps, temperature, generator):
    """Sample ``steps`` tokens per row with a full forward over each row's unpadded prompt + draws, no cache."""
    rows = [list(prompts[i // group_size]) for i in range(len(prompts) * group_size)]
    draws = [[] for _ in rows]
    for _ in range(steps):
        logits = torch.stack([model(input_ids=torch.tensor([row])).logits[0, -1] for row in rows])
        probs = torch.softmax(logits.float() / temperature, dim=-1).double().numpy()
        uniform = torch.rand((len(rows), 1), dtype=torch.float64, generator=generator).numpy()
        # Inverse-CDF draw, written independently of _sample: the first token whose cumulative mass exceeds u.
        tokens = [int(np.searchsorted(np.cumsum(p), u[0] * p.sum(), side="right")) for p, u in zip(probs, uniform)]
        for r, t in enumerate(tokens):
            rows[r].append(t)
            draws[r].append(t)
    return draws


@torch.no_grad()
def test_generate_group_real_model_shapes_seeds_and_groups(model, tokenizer):
    prompts = _prompts(tokenizer, ["1 + 1 = 2", "a longer context: 3 * 4 = 12, 5 - 2 = 3, 9 / 3 = 3"])
    assert len(prompts[0]) != len(prompts[1])
    P, G, think_cap, allowance = 2, 4, 8, 4
    cap = think_cap + allowance

    def run(seed):
        return generate(model, tokenizer, prompts, G, think_cap=think_cap, answer_allowance=allowance,
                              temperature=1.0, generator=torch.Generator().manual_seed(seed))

    a, b, c = run(3), run(3), run(4)
    assert a.completion_ids.shape == a.completion_mask.shape == a.sampled_mask.shape
    assert a.completion_ids.shape[0] == P * G and 1 <= a.completion_ids.shape[1] <= cap
    assert a.completion_ids.shape[1] == int(a.completion_mask.sum(1).max())
    assert len(a.texts) == len(a.reasoning_lengths) == len(a.clipped) == len(a.forced) == P * G
    assert torch.equal(a.completion_ids, b.completion_ids) and a.texts == b.texts
    assert not torch.equal(a.completion_ids[:, :4], c.completion_ids[:, :4])
    # Each group holds G distinct samples.
    for p in range(P):
        group = {tuple(a.completion_ids[p * G + g].tolist()) for g in range(G)}
        assert len(group) == G
    # Without forcing nothing is written for the model; capped rows are clipped.
    assert torch.equal(a.sampled_mask, a.completion_mask)
    assert a.forced == [False] * (P * G)
    lengths = a.completion_mask.sum(1).tolist()
    for r, n in enumerate(lengths):
        assert n <= cap
        last = a.completion_ids[r, n - 1].item()
        if a.clipped[r]:
            assert n == cap
        else:
            assert last == tokenizer.eos_token_id or a.predictions[r] is not None


@torch.no_grad()
def test_generate_group_matches_uncached_reference(model, tokenizer):
    """Cached, prefill-shared decoding draws exactly what sampling from full forwards over each row's own
    prompt draws with the same generator: row ``i`` continues prompt ``i // G``."""
    prompts = _prompts(tokenizer, ["2 + 2 = 4", "a longer context here: 7 * 6 = 42"])
    G, steps = 3, 10
    rollout = generate(model, tokenizer, prompts, G, think_cap=steps, answer_allowance=0, temperature=1.0,
                             generator=torch.Generator().manual_seed(11))
    draws = _reference_draws(model, prompts, G, steps, 1.0, torch.Generator().manual_seed(11))
    for r in range(len(prompts) * G):
        ids = ids_of_row(rollout, r)
        assert ids == draws[r][: len(ids)]
        if len(ids) < steps:
            assert ids[-1] == tokenizer.eos_token_id or rollout.predictions[r] is not None


# ---------------------------------------------------------------- completion_logprobs


def _padded_batch(tokenizer, G=3):
    gen = torch.Generator().manual_seed(5)
    prompts = _prompts(tokenizer, ["5 + 5 = 10", "a much longer context to pad against: 12 * 3 = 36"])
    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id
    prompt_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    prompt_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        prompt_ids[i, width - len(p):] = torch.tensor(p)
        prompt_mask[i, width - len(p):] = 1
    lengths = [7, 1, 4, 7, 5, 2]
    C = max(lengths)
    completions = torch.randint(3, len(tokenizer), (len(prompts) * G, C), generator=gen)
    cmask = torch.zeros((len(prompts) * G, C), dtype=torch.long)
    for r, n in enumerate(lengths):
        cmask[r, :n] = 1
        completions[r, n:] = pad
    return prompts, prompt_ids, prompt_mask, completions, cmask, G


def test_completion_logprobs_share_prompt_is_exact(model, tokenizer):
    prompts, prompt_ids, prompt_mask, completions, cmask, G = _padded_batch(tokenizer)
    assert prompt_mask[0].sum() < prompt_mask[1].sum()
    weights = torch.linspace(-1.0, 2.0, completions.numel()).reshape(completions.shape)
    results = []
    for share in (True, False):
        model.zero_grad(set_to_none=True)
        lp = completion_logprobs(model, CompletionBatch(prompt_ids, prompt_mask, completions, cmask, group_size=G),
                                 ForwardOptions(prefill_prompts_once=share))
        assert lp.shape == completions.shape
        (lp * weights * cmask).sum().backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((lp.detach(), grads))
    model.zero_grad(set_to_none=True)
    (lp_shared, g_shared), (lp_plain, g_plain) = results
    valid = cmask.bool()
    assert torch.allclose(lp_shared[valid], lp_plain[valid], atol=1e-5, rtol=0)
    assert (lp_shared[valid] < 0).all()
    assert set(g_shared) == set(g_plain) and len(g_shared) == len(list(model.parameters()))
    for name in g_shared:
        ref = g_plain[name]
        assert ref.norm() > 0, name
        assert ((g_shared[name] - ref).norm() / ref.norm()).item() < 1e-5, name


def test_completion_logprobs_single_token_completions(model, tokenizer):
    prompts, prompt_ids, prompt_mask, completions, cmask, G = _padded_batch(tokenizer)
    first, first_mask = completions[:, :1].clone(), torch.ones_like(cmask[:, :1])
    with torch.no_grad():
        shared = completion_logprobs(model, CompletionBatch(prompt_ids, prompt_mask, first, first_mask, group_size=G))
        plain = completion_logprobs(model, CompletionBatch(prompt_ids, prompt_mask, first, first_mask, group_size=G),
                                    ForwardOptions(prefill_prompts_once=False))
        for r in range(first.shape[0]):
            logits = model(input_ids=torch.tensor([prompts[r // G]])).logits[0, -1]
            expected = torch.log_softmax(logits.float(), -1)[first[r, 0]]
            assert abs(shared[r, 0].item() - expected.item()) < 1e-4
            assert abs(plain[r, 0].item() - expected.item()) < 1e-4


@torch.no_grad()
def test_completion_logprobs_match_independent_loop(model, tokenizer):
    prompts, prompt_ids, prompt_mask, completions, cmask, G = _padded_batch(tokenizer)
    shared = completion_logprobs(model, CompletionBatch(prompt_ids, prompt_mask, completions, cmask, group_size=G))
    plain = completion_logprobs(model, CompletionBatch(prompt_ids, prompt_mask, completions, cmask, group_size=G),
                                ForwardOptions(prefill_prompts_once=False))
    for r in range(completions.shape[0]):
        prompt = prompts[r // G]
        n = int(cmask[r].sum())
        comp = completions[r, :n].tolist()
        logits = model(input_ids=torch.tensor([prompt + comp])).logits[0].float()
        logp = torch.log_softmax(logits, -1)
        expected = torch.stack([logp[len(prompt) - 1 + j, comp[j]] for j in range(n)])
        assert torch.allclose(shared[r, :n], expected, atol=1e-4, rtol=0), r
        assert torch.allclose(plain[r, :n], expected, atol=1e-4, rtol=0), r


# ---------------------------------------------------------------- decoding fast paths (real tiny model)


class EndsByContent(nn.Module):
    """The real model, with the end-of-sequence logit raised by 1e4 after any fed token divisible by ``every``.

    Rows then end at different steps, decided by their own tokens rather than their place in the batch, so
    the outcome does not depend on which rows share a batch. Records the batch size of every decoding step.
    """

    def __init__(self, lm: nn.Module, eos: int, every: int = 5):
        super().__init__()
        self.lm, self.eos, self.every = lm, eos, every
        self.batch_sizes: list[int] = []

    @property
    def generation_config(self):
        return self.lm.generation_config

    def forward(self, input_ids, **kwargs):
        out = self.lm(input_ids=input_ids, **kwargs)
        if input_ids.shape[1] == 1:  # a decoding step (prompt passes feed several tokens)
            self.batch_sizes.append(input_ids.shape[0])
        trigger = input_ids[:, -1] % self.every == 0
        out.logits[trigger, -1, self.eos] += 1e4
        return out


@pytest.mark.parametrize("budget_forcing, top_p", [(False, 1.0), (True, 0.9)])
def test_compaction_changes_no_sample(model, tokenizer, budget_forcing, top_p):
    """Dropping finished rows from the batch and the cache leaves every completion exactly as it was."""
    prompts = _prompts(tokenizer, ["1 + 1 = 2", "a longer context: 3 * 4 = 12, 5 - 2 = 3", "7 - 7 = 0"])
    G = 4
    results = []
    for compact in (False, True):
        lm = EndsByContent(model, tokenizer.eos_token_id)
        rollout = generate(lm, tokenizer, prompts, G, think_cap=24, answer_allowance=6, temperature=1.0,
                                 top_p=top_p, budget_forcing=budget_forcing, compact_finished=compact,
                                 generator=torch.Generator().manual_seed(7))
        results.append((rollout, lm.batch_sizes))
    (plain, plain_sizes), (compact, compact_sizes) = results
    lengths = plain.completion_mask.sum(1)
    assert lengths.min() < lengths.max(), "rows should end at different steps for this test to mean anything"
    assert torch.equal(plain.completion_ids, compact.completion_ids)
    assert torch.equal(plain.completion_mask, compact.completion_mask)
    assert torch.equal(plain.sampled_mask, compact.sampled_mask)
    assert (plain.texts, plain.reasoning_lengths, plain.clipped, plain.forced) == (
        compact.texts, compact.reasoning_lengths, compact.clipped, compact.forced)
    assert set(plain_sizes) == {len(prompts) * G}
    assert len(compact_sizes) == len(plain_sizes)
    assert min(compact_sizes) < len(prompts) * G
    assert sum(compact_sizes) < sum(plain_sizes)


def test_compaction_keeps_stepping_for_other_processes(model, tokenizer):
    """With ``all_finished`` saying another process is still decoding, a process whose rows are all done keeps
    calling the model (on one padding row), and its completions are unchanged."""
    prompts = _prompts(tokenizer, ["2 + 3 = 5"])
    kwargs = dict(think_cap=10, answer_allowance=0, temperature=1.0)
    alone = generate(EndsByContent(model, tokenizer.eos_token_id), tokenizer, prompts, 3,
                           generator=torch.Generator().manual_seed(1), **kwargs)
    extra_steps = 4
    waited = []

    def others_still_going(local_done: bool) -> bool:
        if local_done:
            waited.append(1)
        return local_done and len(waited) > extra_steps

    lm = EndsByContent(model, tokenizer.eos_token_id)
    synced = generate(lm, tokenizer, prompts, 3, generator=torch.Generator().manual_seed(1),
                            all_finished=others_still_going, **kwargs)
    assert torch.equal(alone.completion_ids, synced.completion_ids) and alone.texts == synced.texts
    assert lm.batch_sizes[-extra_steps:] == [1] * extra_steps


@torch.no_grad()
def test_expanded_cache_matches_repeated_cache(model, tokenizer):
    """The prompt cache copied into preallocated storage gives the same next-token logits, step after step, as
    the cache repeated by ``batch_repeat_interleave`` and grown by concatenation."""
    from rmt_lightning.engine.padding import pad_left
    from rmt_lightning.engine.kv_cache import GrowingLayer, expand_cache

    ids, mask = pad_left(_prompts(tokenizer, ["4 * 4 = 16", "a longer one: 9 - 1 = 8, 2 + 2 = 4"]), tokenizer.pad_token_id)
    G, steps = 3, 5
    tokens = torch.randint(3, len(tokenizer), (2 * G, steps), generator=torch.Generator().manual_seed(2))
    outputs = []
    for expand in (False, True):
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask), use_cache=True)
        cache = out.cache
        if expand:
            expand_cache(cache, G, steps)
            assert all(isinstance(layer, GrowingLayer) for layer in cache.layers)
        else:
            cache.batch_repeat_interleave(G)
        attention = mask.repeat_interleave(G, 0)
        position = positions_from_mask(mask)[:, -1].repeat_interleave(G) + 1
        logits = []
        for s in range(steps):
            attention = torch.cat([attention, torch.ones_like(attention[:, :1])], dim=1)
            step = model(input_ids=tokens[:, s : s + 1], attention_mask=attention, position_ids=(position + s)[:, None],
                         cache=cache, use_cache=True)
            cache = step.cache
            logits.append(step.logits[:, -1])
        # Dropping rows keeps the others' cache intact.
        keep = torch.tensor([0, 2, 5])
        cache.batch_select_indices(keep)
        attention = torch.cat([attention, torch.ones_like(attention[:, :1])], dim=1)[keep]
        last = model(input_ids=tokens[keep, :1], attention_mask=attention, position_ids=(position[keep] + steps)[:, None],
                     cache=cache, use_cache=True).logits[:, -1]
        outputs.append(torch.stack(logits + [torch.zeros_like(logits[0])]).clone())
        outputs[-1][-1, keep] = last
    assert torch.allclose(outputs[0], outputs[1], atol=1e-5, rtol=0)


def test_completion_logprobs_only_where_asked(model, tokenizer):
    """With a ``scored_mask`` the head projects only those positions: the same log-probs and gradients there as
    the full computation, 0 elsewhere, on both the shared-prompt and the plain path."""
    prompts, prompt_ids, prompt_mask, completions, cmask, G = _padded_batch(tokenizer)
    wanted = cmask.bool() & (torch.arange(completions.shape[1]) % 3 != 1)
    wanted[2, 0] = False  # a row whose first token (predicted from the prompt) is not wanted
    weights = torch.linspace(-1.0, 2.0, completions.numel()).reshape(completions.shape)
    for share in (True, False):
        runs = []
        for mask in (None, wanted):
            model.zero_grad(set_to_none=True)
            lp = completion_logprobs(model, CompletionBatch(prompt_ids, prompt_mask, completions, cmask, mask, G),
                                     ForwardOptions(prefill_prompts_once=share))
            (lp * weights * wanted).sum().backward()
            runs.append((lp.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
        (full, g_full), (narrow, g_narrow) = runs
        assert torch.allclose(narrow[wanted], full[wanted], atol=1e-5, rtol=0)
        assert (narrow[~wanted] == 0).all()
        for name, ref in g_full.items():
            assert ((g_narrow[name] - ref).norm() / ref.norm()).item() < 1e-5, name
    model.zero_grad(set_to_none=True)


@torch.no_grad()
def test_head_positions_returns_the_selected_logits(model, tokenizer):
    from rmt_lightning.engine.forward import head_positions

    ids = torch.randint(3, len(tokenizer), (3, 9), generator=torch.Generator().manual_seed(4))
    full = model(input_ids=ids).logits
    select = torch.rand(3, 9, generator=torch.Generator().manual_seed(5)) < 0.4
    with head_positions(model, select) as pick:
        narrow = model(input_ids=ids).logits
        assert narrow.shape == (1, int(select.sum()), full.shape[-1])
        assert torch.allclose(pick(narrow), full[select], atol=1e-5, rtol=0)
    # The hook is gone after the block.
    assert model(input_ids=ids).logits.shape == full.shape


def test_common_prefix_length_leaves_each_prompt_a_token():
    from rmt_lightning.engine.forward import common_prefix_length

    assert common_prefix_length([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]]) == 2
    assert common_prefix_length([[1, 2, 3], [1, 2, 3]]) == 2  # identical prompts keep their last token
    assert common_prefix_length([[7], [7, 8]]) == 0
    assert common_prefix_length([[1, 2], [3, 4]]) == 0


@torch.no_grad()
def test_shared_prefix_prefill_matches_plain_prefill(model, tokenizer):
    """The common prefix computed once and the prompts' suffixes against it give the same last-token logits
    and the same continuation logits as a plain left-padded prefill, and the same rollout for a seed."""
    from rmt_lightning.engine.forward import prefill

    prompts = _prompts(tokenizer, ["1 + 1 = 2", "a much longer context: 3 * 4 = 12, and 5 - 2 = 3", "9 - 4 = 5"])
    pad = tokenizer.pad_token_id
    shared, plain = prefill(model, prompts, pad, "cpu"), prefill(model, prompts, pad, "cpu", prefill_common_prefix=False)
    assert shared.shared >= 8 and plain.shared == 0
    assert torch.allclose(shared.last_logits, plain.last_logits, atol=1e-5, rtol=0)
    assert torch.equal(shared.positions, plain.positions)
    token = torch.tensor([[5], [6], [7]])
    nexts = []
    for start in (shared, plain):
        attention = torch.cat([start.attention, torch.ones_like(token)], dim=1)
        nexts.append(model(input_ids=token, attention_mask=attention, position_ids=start.positions[:, None] + 1,
                           cache=start.cache, use_cache=True).logits[:, -1])
    assert torch.allclose(nexts[0], nexts[1], atol=1e-5, rtol=0)
    runs = [generate(model, tokenizer, prompts, 2, think_cap=12, answer_allowance=0, temperature=1.0,
                           prefill_common_prefix=share, generator=torch.Generator().manual_seed(9)) for share in (True, False)]
    assert torch.equal(runs[0].completion_ids, runs[1].completion_ids) and runs[0].texts == runs[1].texts


def test_recorded_logprobs_are_the_policys_at_sampling_time(model, tokenizer):
    """``record_logprobs`` keeps ``log pi(token)`` of each sampled token under the untempered distribution (the
    ``pi_old`` of updates that reuse the rollout): equal to a teacher-forced forward over prompt + completion,
    0 on tokens budget forcing wrote and on padding; and recording changes no sample."""
    prompts = _prompts(tokenizer, ["2 + 2 = 4", "a longer context here: 7 * 6 = 42"])
    G = 3
    kwargs = dict(think_cap=3, answer_allowance=2, temperature=0.8, budget_forcing=True)
    recorded = generate(model, tokenizer, prompts, G, generator=torch.Generator().manual_seed(2),
                              record_logprobs=True, **kwargs)
    plain = generate(model, tokenizer, prompts, G, generator=torch.Generator().manual_seed(2), **kwargs)
    assert plain.logprobs is None and torch.equal(recorded.completion_ids, plain.completion_ids)
    assert any(recorded.forced), "the case must have written tokens"
    prompt_ids, prompt_mask = (torch.tensor(t) for t in zip(*[(
        [tokenizer.pad_token_id] * (max(map(len, prompts)) - len(p)) + p,
        [0] * (max(map(len, prompts)) - len(p)) + [1] * len(p)) for p in prompts]))
    with torch.no_grad():
        forward = completion_logprobs(model, CompletionBatch(prompt_ids, prompt_mask, recorded.completion_ids,
                                                             recorded.completion_mask.long(), group_size=G))
    sampled = recorded.sampled_mask
    assert torch.allclose(recorded.logprobs[sampled], forward[sampled], atol=1e-5)
    assert (recorded.logprobs[~sampled] == 0).all()
    assert (recorded.logprobs[sampled] < 0).all()
