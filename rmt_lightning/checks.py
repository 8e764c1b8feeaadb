"""Checks of a run's inputs before any work starts: each bad input gets one error naming it and what is valid.

Value checks run in the constructors: LightningCLI builds the module, the datamodule and the callbacks
before anything is loaded. Checks that look at files, folders or the model hub run in
``RMTDataModule.check_inputs`` and in the CLI's ``before_fit`` (``preflight``), still before any model is
loaded. The CLI prints an ``InputError`` as one line and exits with status 2.
"""

from __future__ import annotations

from .engine.models import check_fits_model, check_model_source, max_positions, model_config, parse_dtype
from .method.rewards import CORRECTNESS_RULES
from .runtime.errors import (
    InputError, as_input_error, at_least, between, check_writable_directory, in_open_interval, names_a_local_path,
)

__all__ = [
    "InputError", "as_input_error", "at_least", "between", "in_open_interval", "names_a_local_path",
    "check_writable_directory", "check_model_source", "check_fits_model", "check_rollout_fits", "check_mini_batches",
    "check_module_arguments", "check_question_fits",
]


def check_rollout_fits(model, max_context_tokens: int, budget: int) -> None:
    """The longest RL sequence fits the policy: the prompt around ``max_context_tokens`` of context, then the
    longest completion under ``budget`` (thinking cap 2B, answer allowance, budget-forcing scaffold)."""
    from .engine.models import load_tokenizer
    from .engine.prompts import ANSWER_SCAFFOLD, build_prompt_ids
    from .method import generation_cap, thinking_cap

    hp = model.hparams
    limit = max_positions(model_config(hp.model_name_or_path, hp.trust_remote_code))
    if limit is None or not hp.rl:
        return
    tokenizer = load_tokenizer(hp.model_name_or_path, trust_remote_code=hp.trust_remote_code)
    prompt = len(build_prompt_ids(tokenizer, "", budget, hp.instruction, hp.response_prefix, hp.use_chat_template))
    scaffold = len(tokenizer(ANSWER_SCAFFOLD, add_special_tokens=False)["input_ids"]) if hp.budget_forcing else 0
    completion = generation_cap(thinking_cap(budget), hp.answer_allowance, scaffold, hp.max_response_length)
    longest = prompt + max_context_tokens + completion
    if longest > limit:
        raise InputError(
            f"the longest RL sequence, prompt {prompt} + max_context_tokens={max_context_tokens} + completion {completion} "
            f"(budget {budget}) = {longest} tokens, is longer than model '{hp.model_name_or_path}' supports ({limit} "
            "positions); valid: a sum within it: lower data.max_context_tokens, the budget (TokenBudget b0, model.budget) "
            "or model.max_response_length"
        )


def check_question_fits(model, max_prompt_tokens: int) -> None:
    """The longest post-training sequence, a prompt of ``max_prompt_tokens`` and a completion of
    ``max_response_length``, fits the policy's positions."""
    hp = model.hparams
    limit = max_positions(model_config(hp.model_name_or_path, hp.trust_remote_code))
    longest = max_prompt_tokens + max(hp.max_response_length, hp.val_max_response_length or 0)
    if limit is not None and longest > limit:
        raise InputError(
            f"the longest sequence, data.max_prompt_tokens={max_prompt_tokens} + a completion of model.max_response_length="
            f"{hp.max_response_length} (val_max_response_length={hp.val_max_response_length}) = {longest} tokens, is longer "
            f"than model '{hp.model_name_or_path}' supports ({limit} positions); valid: a sum within it"
        )


# RMTModule arguments and the least value each may take.
_MODULE_MINIMUMS = {
    "lr": 0.0, "weight_decay": 0.0, "grad_clip": 0.0, "beta": 0.0, "temperature": 0.0, "clip_eps": 0.0, "ntp_weight": 0.0,
    "budget": 1, "answer_allowance": 0, "max_response_length": 1, "lr_warmup_steps": 0, "format_warmup_steps": 0,
    "rl_micro_batch_size": 1, "ntp_micro_batch_size": 1, "max_consecutive_skips": 1,
    "updates_per_rollout": 1, "mini_batches_per_rollout": 1,
}


def check_mini_batches(mini_batches: int, positions: int) -> None:
    """``mini_batches`` (``model.mini_batches_per_rollout``) cuts a rank's ``positions`` RL positions per step
    (``data.batch_size``) into equal mini-batches of whole groups, else an InputError naming the valid values."""
    if positions % mini_batches:
        valid = [d for d in range(1, positions + 1) if positions % d == 0]
        raise InputError(
            f"mini_batches_per_rollout={mini_batches} does not cut data.batch_size={positions} RL positions per step "
            f"into equal mini-batches of whole groups; valid: a divisor of {positions} ({valid}), or a batch_size "
            f"that is a multiple of {mini_batches}"
        )


def check_module_arguments(hp) -> None:
    """``RMTModule``'s arguments (its hyperparameters) in their valid ranges; the first that is not raises one
    ValueError (InputError for a dtype) naming it and what is valid."""
    if hp["correctness"] not in CORRECTNESS_RULES:
        raise ValueError(f"correctness '{hp['correctness']}' is not a rule; valid: {list(CORRECTNESS_RULES)}")
    if hp["group_size"] < 2:
        raise ValueError(f"group_size={hp['group_size']}: GRPO needs G >= 2 completions per position")
    if "{context}" not in hp["instruction"]:
        raise ValueError("instruction must contain the '{context}' placeholder")
    with as_input_error():
        parse_dtype(hp["dtype"])
    if hp["reference_dtype"] is not None:
        with as_input_error("reference_dtype: "):
            parse_dtype(hp["reference_dtype"])
    for name, minimum in _MODULE_MINIMUMS.items():
        at_least(name, hp[name], minimum)
    between("length_reward_weight", hp["length_reward_weight"], 0.0, 1.0)
    between("top_p", hp["top_p"], 1e-9, 1.0)
    warmup_lr, lr = hp["format_warmup_lr"], hp["lr"]
    if warmup_lr is not None and not (warmup_lr > 0 and lr > 0):
        raise ValueError(
            f"format_warmup_lr={warmup_lr} needs format_warmup_lr > 0 and lr > 0 (lr={lr}); leave it unset (None) to "
            "warm up at lr"
        )
    budgets = hp["format_warmup_budgets"]
    if budgets is not None and (not budgets or any(b < 1 for b in budgets)):
        raise ValueError(f"format_warmup_budgets={list(budgets)} must be a non-empty list of budgets >= 1 (or None: "
                         "each step's budget)")
    if hp["val_budget"] is not None and hp["val_budget"] < 1:
        raise ValueError(f"val_budget={hp['val_budget']} must be >= 1 (or None for the final budget)")
    if hp["val_group_size"] < 1:
        raise ValueError(f"val_group_size={hp['val_group_size']} must be >= 1")
    if not hp["val_temperature"] >= 0:
        raise ValueError(f"val_temperature={hp['val_temperature']} must be >= 0 (0: greedy)")
