"""Hand-computed checks of the RMT formulas in rmt_lightning.method."""

from __future__ import annotations

import math

import pytest
import torch

from rmt_lightning.method import (
    TIER_NAMES,
    assign_tiers,
    contiguous_share,
    exact_match,
    extract_prediction,
    generation_cap,
    group_advantages,
    grpo_token_loss,
    grpo_token_loss_terms,
    length_reward,
    prefix_match,
    renormalise_over_nonempty,
    rollout_update,
    thinking_cap,
    tier_probabilities,
    token_budget,
    token_entropy,
    token_logprobs,
    total_reward,
    zero_std_groups,
)

# ---------------------------------------------------------------- budget


def test_token_budget_paper_defaults():
    assert token_budget(0.0, 800, 1, 0.2) == 800
    assert token_budget(1.0, 800, 1, 0.2) == 160
    # 800 * 0.2 ** 0.5 = 357.77...
    assert token_budget(0.5, 800, 1, 0.2) == 357


def test_token_budget_b_min_clamp_and_k():
    assert token_budget(1.0, 800, 200, 0.2) == 200
    assert token_budget(0.0, 800, 200, 0.2) == 800
    # k = 2: 800 * 0.2 ** (0.5 ** 2) = 800 * 0.2 ** 0.25 = 534.99...
    assert token_budget(0.5, 800, 1, 0.2, k=2.0) == 534
    # k = 0.5: 800 * 0.2 ** (0.25 ** 0.5) = 800 * 0.2 ** 0.5 = 357.77...
    assert token_budget(0.25, 800, 1, 0.2, k=0.5) == 357


def test_token_budget_float_error_does_not_lose_a_token():
    assert 100 * 0.29 < 29  # the float product sits just below 29
    assert token_budget(1.0, 100, 1, 0.29) == 29


@pytest.mark.parametrize("progress", [-0.1, 1.1, float("nan")])
def test_token_budget_rejects_progress(progress):
    with pytest.raises(ValueError, match="progress"):
        token_budget(progress, 800, 1, 0.2)


def test_length_reward_triangle():
    b = 100
    assert length_reward(0, b) == 0.0
    assert length_reward(50, b) == pytest.approx(0.5)
    assert length_reward(100, b) == pytest.approx(1.0)
    assert length_reward(150, b) == pytest.approx(0.5)
    assert length_reward(200, b) == 0.0
    assert length_reward(300, b) == 0.0
    assert length_reward(150, b, r_max=2.0) == pytest.approx(1.0)


def test_length_reward_validation():
    with pytest.raises(ValueError, match="budget"):
        length_reward(10, 0)
    with pytest.raises(ValueError, match="length"):
        length_reward(-1, 10)


def test_the_generation_cap_is_2b_plus_the_allowance_plus_the_scaffold_within_the_hard_cap():
    assert thinking_cap(8) == 16 and length_reward(thinking_cap(8), 8) == 0.0  # where the length reward ends
    assert generation_cap(thinking_cap(8), 4) == 20
    assert generation_cap(thinking_cap(8), 4, scaffold_tokens=5) == 25  # budget forcing's scaffold counts against neither
    assert generation_cap(thinking_cap(800), 16, 5, max_new_tokens=2048) == 1621
    assert generation_cap(thinking_cap(1200), 16, 5, max_new_tokens=2048) == 2048


# ---------------------------------------------------------------- curriculum

P1 = (0.6, 0.3, 0.1)
P2 = (0.1, 0.3, 0.6)


@pytest.mark.parametrize(
    "s, expected",
    [
        (0.0, P1),
        (0.3, P1),  # a = 0 at t1
        (0.4, (0.475, 0.3, 0.225)),  # a = 0.25
        (0.5, (0.35, 0.3, 0.35)),  # midpoint, a = 0.5
        (0.7, P2),
        (1.0, P2),
    ],
)
def test_tier_probabilities_schedule(s, expected):
    got = tier_probabilities(s, P1, P2, 0.3, 0.7)
    assert got == pytest.approx(expected)
    assert sum(got) == pytest.approx(1.0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(t1=0.0, t2=0.7), "t1"),
        (dict(t1=0.3, t2=1.0), "t2"),
        (dict(t1=0.7, t2=0.3), "t1"),
        (dict(p1=(0.5, 0.5)), "p1"),
        (dict(p1=(0.6, 0.3, 0.0)), "p1"),
        (dict(p2=(1.2, -0.1, -0.1)), "p2"),
        (dict(progress=1.5), "progress"),
    ],
)
def test_tier_probabilities_validation(kwargs, match):
    args = dict(progress=0.5, p1=P1, p2=P2, t1=0.3, t2=0.7)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        tier_probabilities(**args)


def test_assign_tiers_boundaries():
    h = torch.tensor([0.0, 0.5, 0.5001, 1.0, 1.2, 1.5, 1.5001, 3.0])
    tiers = assign_tiers(h)
    assert tiers.dtype == torch.int64
    assert tiers.tolist() == [-1, -1, 0, 0, 1, 1, 2, 2]
    # Tier t is TIER_NAMES[t]: the lowest entropies are the easy tier.
    assert [TIER_NAMES[t] for t in tiers.tolist() if t >= 0] == ["easy", "easy", "medium", "medium", "hard", "hard"]


def test_assign_tiers_shape_and_custom_thresholds():
    h = torch.tensor([[0.1, 0.2], [0.3, 0.4]])
    tiers = assign_tiers(h, thresholds=(0.1, 0.2, 0.3))
    assert tiers.shape == (2, 2)
    assert tiers.tolist() == [[-1, 0], [1, 2]]
    with pytest.raises(ValueError, match="thresholds"):
        assign_tiers(h, thresholds=(1.0, 0.5, 1.5))


def test_renormalise_over_nonempty():
    got = renormalise_over_nonempty(P1, (True, False, True))
    assert got == pytest.approx((0.6 / 0.7, 0.0, 0.1 / 0.7))
    assert renormalise_over_nonempty(P1, (True, True, True)) == pytest.approx(P1)
    # no mass left on the non-empty tiers: uniform over them
    assert renormalise_over_nonempty((0.0, 0.0, 1.0), (True, True, False)) == pytest.approx((0.5, 0.5, 0.0))
    with pytest.raises(ValueError, match="empty"):
        renormalise_over_nonempty(P1, (False, False, False))


# ---------------------------------------------------------------- rewards


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("<think>x</think> the answer is \\boxed{ 72}", " 72"),
        ("<think>x</think>\\boxed{a{b}c}", "a{b}c"),
        ("<think>x</think>\\boxed{1} then \\boxed{2}", "2"),
        ("<think>\\boxed{1}</think> \\boxed{3}", "3"),
        ("<think>\\boxed{1}</think> no answer", None),
        ("\\boxed{1}", None),  # no </think>
        ("<think>a</think>\\boxed{1}<think>b</think>x", None),  # nothing after the last </think>
        ("<think>x</think>\\boxed{1} \\boxed{2", None),  # last one unclosed
        ("<think>x</think>\\boxed{a{b}", None),
        ("<think>x</think>\\boxed{}", ""),
        ("<think>x</think>\\boxed{é}", "é"),
        ("<think>x</think>\\boxed{日本}", "日本"),
        ("<think>x</think>\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ],
)
def test_extract_prediction(completion, expected):
    assert extract_prediction(completion) == expected


def test_exact_match():
    assert exact_match(" 7", " 7")
    assert not exact_match("7", " 7")  # leading spaces matter
    assert not exact_match(" 7", "7")
    assert exact_match(" 7", b" 7")
    assert exact_match("é", b"\xc3\xa9")
    assert not exact_match("é", b"\xc3")
    assert not exact_match(None, " 7")
    assert not exact_match("", "")
    assert not exact_match("", b"")


def test_prefix_match_token_boundaries():
    assert prefix_match(" 72", [" 7", "2", "0"])  # j = 2
    # " 72" is the whole first token (j = 1), so it is a valid boundary here
    assert prefix_match(" 72", [" 72", "0"])
    assert not prefix_match(" 7", [" 72", "0"])  # ends inside " 72"
    assert not prefix_match(" 7", [" 720"])
    assert prefix_match(" 720", [" 72", "0"])
    assert prefix_match(" 7", [" 7", "2", "0"])
    assert not prefix_match("7", [" 7", "2"])
    assert not prefix_match(" 7", ["7", "2"])
    assert not prefix_match(" 7205", [" 72", "0"])  # longer than the continuation


def test_prefix_match_bytes_and_non_ascii():
    assert prefix_match("é", [b"\xc3", b"\xa9", b"x"])
    assert not prefix_match("é", [b"\xc3\xa9x"])
    assert prefix_match("aé", ["a", b"\xc3", b"\xa9"])
    assert prefix_match("é!", ["é", "!"])
    assert not prefix_match(None, [" 7"])
    assert not prefix_match("", [" 7"])
    assert not prefix_match(" 7", [])


def test_total_reward():
    assert total_reward(1.0, 0.5, w=0.1) == pytest.approx(0.9 + 0.05)
    assert total_reward(0.0, 1.0, w=0.1) == pytest.approx(0.1)
    # Length counted only when correct: a wrong completion gets 0 whatever its length.
    assert total_reward(1.0, 0.5, w=0.1, length_only_when_correct=True) == pytest.approx(0.9 + 0.05)
    assert total_reward(0.0, 1.0, w=0.1, length_only_when_correct=True) == 0.0
    with pytest.raises(ValueError, match="w"):
        total_reward(1.0, 1.0, w=1.5)


# ---------------------------------------------------------------- GRPO


def test_group_advantages_hand_computed():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5], [3.0, 1.0, 2.0, 2.0]])
    adv = group_advantages(rewards, eps=1e-4)
    # group 0: mean 0.5, unbiased std sqrt((4 * 0.25) / 3) = sqrt(1/3)
    a0 = 0.5 / (math.sqrt(1.0 / 3.0) + 1e-4)
    # group 2: mean 2, deviations (1, -1, 0, 0), std sqrt(2/3)
    a2 = 1.0 / (math.sqrt(2.0 / 3.0) + 1e-4)
    expected = torch.tensor([[a0, -a0, -a0, a0], [0.0, 0.0, 0.0, 0.0], [a2, -a2, 0.0, 0.0]])
    assert adv.shape == rewards.shape
    assert torch.allclose(adv, expected, atol=1e-6)
    assert zero_std_groups(rewards).tolist() == [False, True, False]


def test_group_advantages_int_rewards_and_validation():
    adv = group_advantages(torch.tensor([[1, 0]]))
    assert adv.dtype.is_floating_point
    assert torch.allclose(adv, torch.tensor([[0.5, -0.5]]) / (math.sqrt(0.5) + 1e-4))
    with pytest.raises(ValueError, match="G"):
        group_advantages(torch.ones(3, 1))


def _grpo_batch():
    # ratios row 0 (A = +1): 1.0, 1.5, 0.5, 1.1, pad, pad
    # ratios row 1 (A = -2): 1.0, 1.5, 0.5, 0.9, 0.7, pad
    ratios = torch.tensor([[1.0, 1.5, 0.5, 1.1, 9.0, 9.0], [1.0, 1.5, 0.5, 0.9, 0.7, 9.0]], dtype=torch.float64)
    old = torch.full((2, 6), -1.0, dtype=torch.float64)
    logp = (old + ratios.log()).requires_grad_(True)
    adv = torch.tensor([1.0, -2.0], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    return logp, old, adv, mask


def test_grpo_token_loss_hand_computed_with_clipping():
    logp, old, adv, mask = _grpo_batch()
    # row 0: -[1.0, min(1.5, 1.2), min(0.5, 0.8), 1.1] = -[1.0, 1.2, 0.5, 1.1] -> -3.8
    # row 1: -[-2.0, min(-3.0, -2.4), min(-1.0, -1.6), -1.8, min(-1.4, -1.6)] = [2.0, 3.0, 1.6, 1.8, 1.6] -> 10.0
    # mean over 9 masked tokens: 6.2 / 9
    terms = grpo_token_loss_terms(logp, old, adv, mask, clip_eps=0.2)
    assert terms.loss.item() == pytest.approx(6.2 / 9, abs=1e-9)
    # clip active at row 0 ratio 1.5 and row 1 ratios 0.5, 0.7
    assert terms.clipped_fraction.item() == pytest.approx(3 / 9)
    assert terms.kl.item() == 0.0
    assert grpo_token_loss(logp, old, adv, mask).item() == pytest.approx(6.2 / 9, abs=1e-9)

    terms.loss.backward()
    # d(-rho*A)/dlogp = -rho*A where unclipped; 0 where the clip is active or masked
    expected = torch.tensor(
        [[-1.0, 0.0, -0.5, -1.1, 0.0, 0.0], [2.0, 3.0, 0.0, 1.8, 0.0, 0.0]], dtype=torch.float64
    ) / 9
    assert torch.allclose(logp.grad, expected, atol=1e-9)


def test_grpo_token_loss_ratio_one_is_policy_gradient():
    logp = torch.zeros(2, 3, requires_grad=True)
    adv = torch.tensor([2.0, -1.0])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    loss = grpo_token_loss(logp, logp.detach(), adv, mask)
    # loss = -(2 + 2 - 1) / 3
    assert loss.item() == pytest.approx(-1.0)
    loss.backward()
    assert torch.allclose(logp.grad, torch.tensor([[-2.0, -2.0, 0.0], [1.0, 0.0, 0.0]]) / 3)


def test_grpo_token_loss_k3_term():
    ln2 = math.log(2.0)
    logp = torch.zeros(1, 4, dtype=torch.float64, requires_grad=True)
    # ref - logp = ln2, 0, -ln2, (padding)
    ref = torch.tensor([[ln2, 0.0, -ln2, 5.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0]])
    adv = torch.zeros(1, dtype=torch.float64)
    # k3 = (2 - ln2 - 1) + 0 + (0.5 + ln2 - 1) = 0.5 over 3 tokens
    terms = grpo_token_loss_terms(logp, logp.detach(), adv, mask, ref_logprobs=ref, beta=0.1)
    assert terms.kl.item() == pytest.approx(0.5 / 3)
    assert terms.loss.item() == pytest.approx(0.1 * 0.5 / 3)
    assert not terms.kl.requires_grad
    terms.loss.backward()
    # dk3/dlogp = 1 - exp(ref - logp): 1 - 2, 0, 1 - 0.5
    assert torch.allclose(logp.grad, torch.tensor([[-1.0, 0.0, 0.5, 0.0]], dtype=torch.float64) * 0.1 / 3)
    # beta = 0 with a reference still reports kl but adds nothing
    terms0 = grpo_token_loss_terms(logp, logp.detach(), adv, mask, ref_logprobs=ref, beta=0.0)
    assert terms0.loss.item() == 0.0
    assert terms0.kl.item() == pytest.approx(0.5 / 3)


def test_grpo_token_loss_combined_clip_and_kl():
    logp, old, adv, mask = _grpo_batch()
    ref = logp.detach() + math.log(2.0)  # k3 = 1 - ln2 on every token
    loss = grpo_token_loss(logp, old, adv, mask, ref_logprobs=ref, beta=0.05)
    assert loss.item() == pytest.approx(6.2 / 9 + 0.05 * (1 - math.log(2.0)), abs=1e-9)


def test_grpo_token_loss_empty_mask_and_validation():
    logp = torch.randn(2, 3, requires_grad=True)
    mask = torch.zeros(2, 3, dtype=torch.bool)
    loss = grpo_token_loss(logp, logp.detach(), torch.ones(2), mask)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(logp.grad, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="ref_logprobs"):
        grpo_token_loss(logp, logp.detach(), torch.ones(2), mask, beta=0.1)
    with pytest.raises(ValueError, match="advantages"):
        grpo_token_loss(logp, logp.detach(), torch.ones(3), mask)


# ---------------------------------------------------------------- entropy


def _direct_entropy(logits):
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def test_token_entropy_uniform_and_direct():
    assert token_entropy(torch.zeros(3, 7)).tolist() == pytest.approx([math.log(7)] * 3)
    # p = (0.5, 0.25, 0.25): H = 0.5 ln2 + 2 * 0.25 ln4 = 1.5 ln2
    logits = torch.tensor([math.log(2.0), 0.0, 0.0])
    assert token_entropy(logits).item() == pytest.approx(1.5 * math.log(2.0), abs=1e-6)
    x = torch.randn(2, 5, 11, generator=torch.Generator().manual_seed(0))
    got = token_entropy(x)
    assert got.shape == (2, 5) and got.dtype == torch.float32
    assert torch.allclose(got, _direct_entropy(x), atol=1e-6)


def test_token_entropy_top_k_renormalises():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    p = math.e / (math.e + 1.0)  # softmax over the top-2 logits (2, 1)
    expected = -(p * math.log(p) + (1 - p) * math.log(1 - p))
    assert token_entropy(logits, top_k=2).item() == pytest.approx(expected, abs=1e-6)
    assert token_entropy(logits, top_k=1).item() == pytest.approx(0.0, abs=1e-7)
    assert token_entropy(logits, top_k=10).item() == pytest.approx(_direct_entropy(logits).item(), abs=1e-6)


def test_token_entropy_chunking_dtype_and_neg_inf():
    x = torch.randn(3, 5, 13, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(token_entropy(x, chunk_size=2), token_entropy(x, chunk_size=1024), atol=1e-6)
    assert torch.allclose(token_entropy(x, top_k=4, chunk_size=4), token_entropy(x, top_k=4), atol=1e-6)
    assert token_entropy(x.bfloat16()).dtype == torch.float32
    masked = torch.tensor([0.0, 0.0, float("-inf")])
    assert token_entropy(masked).item() == pytest.approx(math.log(2.0), abs=1e-6)
    with torch.no_grad():
        assert token_entropy(x, chunk_size=3).shape == (3, 5)


@pytest.mark.parametrize("top_k", [None, 3])
def test_token_entropy_gradient(top_k):
    x = torch.randn(4, 3, 9, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    weights = torch.randn(4, 3, generator=torch.Generator().manual_seed(3))
    a = x.clone().requires_grad_(True)
    (token_entropy(a, top_k=top_k, chunk_size=5) * weights).sum().backward()
    b = x.clone().requires_grad_(True)
    ref_in = b
    if top_k is not None:
        vals, idx = b.topk(top_k, dim=-1)
        ref_in = vals
    (_direct_entropy(ref_in) * weights).sum().backward()
    assert torch.allclose(a.grad, b.grad, atol=1e-5)
    m = torch.tensor([0.0, 1.0, float("-inf")], requires_grad=True)
    token_entropy(m).backward()
    assert torch.isfinite(m.grad).all()


# ---------------------------------------------------------------- logprobs


def test_token_logprobs_hand_values():
    assert token_logprobs(torch.zeros(4), torch.tensor(1)).item() == pytest.approx(-math.log(4.0))
    logits = torch.tensor([[math.log(3.0), 0.0]])  # p = (0.75, 0.25)
    got = token_logprobs(logits, torch.tensor([1]))
    assert got.tolist() == pytest.approx([math.log(0.25)])


def test_token_logprobs_matches_log_softmax_value_and_grad():
    x = torch.randn(2, 5, 11, generator=torch.Generator().manual_seed(4))
    ids = torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(5))
    weights = torch.randn(2, 5, generator=torch.Generator().manual_seed(6))

    a = x.clone().requires_grad_(True)
    got = token_logprobs(a, ids, chunk_size=3)
    (got * weights).sum().backward()

    b = x.clone().requires_grad_(True)
    want = torch.log_softmax(b, dim=-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    (want * weights).sum().backward()

    assert got.shape == (2, 5) and got.dtype == torch.float32
    assert torch.allclose(got, want, atol=1e-6)
    assert torch.allclose(a.grad, b.grad, atol=1e-6)


def test_token_logprobs_bf16_no_grad_and_validation():
    x = torch.randn(3, 7, generator=torch.Generator().manual_seed(7)).bfloat16()
    ids = torch.tensor([0, 3, 6])
    with torch.no_grad():
        got = token_logprobs(x, ids, chunk_size=2)
    want = torch.log_softmax(x.float(), dim=-1).gather(-1, ids[:, None]).squeeze(-1)
    assert got.dtype == torch.float32
    assert torch.allclose(got, want, atol=1e-6)

    xb = x.clone().requires_grad_(True)
    token_logprobs(xb, ids, chunk_size=2).sum().backward()
    assert xb.grad.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="token_ids"):
        token_logprobs(x, torch.tensor([0, 1]))


def test_completion_rewards_assemble_correctness_length_and_total_per_group():
    from rmt_lightning.method import completion_rewards

    # 2 positions x 3 completions; budget 4: r_len = l/4 up to 4, (8 - l)/4 up to 8, 0 beyond.
    predictions = [" 7", " 7x", None, "abc", " ab", ""]
    lengths = [4, 2, 9, 6, 0, 1]
    continuations = [[b" 7", b" and"], [b" ab", b"c"]]
    total, correct, length = completion_rewards(predictions, lengths, continuations, budget=4, w=0.5)
    assert correct.tolist() == [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]
    assert length.tolist() == [[1.0, 0.5, 0.0], [0.5, 0.0, 0.25]]
    assert total.tolist() == [[1.0, 0.25, 0.0], [0.25, 0.5, 0.125]]
    # RPT's prefix rule: the prediction must be whole tokens of the continuation (" 7x" and "abc" are not).
    _, prefix, _ = completion_rewards(predictions, lengths, continuations, budget=4, correctness="prefix")
    assert prefix.tolist() == [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]
    # Length counted for correct completions only.
    only, _, _ = completion_rewards(predictions, lengths, continuations, budget=4, w=0.5, length_only_when_correct=True)
    assert only.tolist() == [[1.0, 0.0, 0.0], [0.0, 0.5, 0.0]]
    with pytest.raises(ValueError, match="do not make whole groups"):
        completion_rewards(predictions[:5], lengths[:5], continuations, budget=4)


# ---------------------------------------------------------------- reusing a rollout


def test_rollout_update_counts_from_each_rollouts_first_step_after_the_single_draw_steps():
    assert [rollout_update(t, 2, 3) for t in range(9)] == [0, 0, 0, 1, 2, 0, 1, 2, 0]
    assert [rollout_update(t, 0, 1) for t in range(4)] == [0, 0, 0, 0]
    for bad in [(-1, 0, 1), (0, -1, 1), (0, 0, 0)]:
        with pytest.raises(ValueError):
            rollout_update(*bad)


def test_contiguous_share_cuts_like_tensor_split():
    for count in range(7):
        for parts in range(1, 5):
            items = torch.arange(count)
            shares = [items[contiguous_share(count, parts, index)] for index in range(parts)]
            assert [s.tolist() for s in shares] == [s.tolist() for s in torch.tensor_split(items, parts)]
    with pytest.raises(ValueError):
        contiguous_share(4, 2, 2)
