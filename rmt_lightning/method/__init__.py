"""The RMT paper's formulas as small pure functions (arXiv 2509.24375)."""

from .answers import answer_rewards, has_answer, last_boxed, reference_answers, verify_answer
from .budget import generation_cap, length_reward, thinking_cap, token_budget
from .curriculum import TIER_NAMES, assign_tiers, nested_tier_masks, renormalise_over_nonempty, tier_probabilities
from .entropy import token_entropy
from .grpo import GRPOLossTerms, group_advantages, grpo_token_loss, grpo_token_loss_terms, zero_std_groups
from .logprobs import token_logprobs
from .reuse import contiguous_share, rollout_update
from .rewards import completion_rewards, exact_match, extract_prediction, prefix_match, total_reward

__all__ = [
    "token_budget",
    "length_reward",
    "thinking_cap",
    "generation_cap",
    "TIER_NAMES",
    "tier_probabilities",
    "assign_tiers",
    "nested_tier_masks",
    "renormalise_over_nonempty",
    "extract_prediction",
    "exact_match",
    "prefix_match",
    "total_reward",
    "completion_rewards",
    "group_advantages",
    "zero_std_groups",
    "GRPOLossTerms",
    "grpo_token_loss_terms",
    "grpo_token_loss",
    "token_entropy",
    "token_logprobs",
    "rollout_update",
    "contiguous_share",
    "last_boxed",
    "has_answer",
    "reference_answers",
    "verify_answer",
    "answer_rewards",
]
