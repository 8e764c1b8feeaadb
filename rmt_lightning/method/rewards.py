"""Prediction extraction and correctness rules (RPT / RMT, section 3)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .budget import length_reward

__all__ = [
    "extract_prediction", "exact_match", "prefix_match", "total_reward", "completion_rewards", "CORRECTNESS_RULES",
    "THINK_OPEN", "THINK_CLOSE", "BOXED",
]

CORRECTNESS_RULES = ("exact", "prefix")
"""Correctness rules of the reward: ``exact`` (RMT: the next token) and ``prefix`` (RPT: whole tokens of the
continuation)."""

# The answer format the reward reads: ``<think>thought</think> \boxed{prediction}``.
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
BOXED = "\\boxed{"


def extract_prediction(completion: str) -> str | None:
    """Content of the last ``\\boxed{...}`` after the last ``</think>``.

    Braces nest (``\\boxed{a{b}c}`` gives ``a{b}c``) and the content is returned
    verbatim, leading spaces included; ``\\boxed{}`` gives ``""``. Returns None
    when there is no ``</think>``, no ``\\boxed{`` after it, or the last one is
    never closed.
    """
    end = completion.rfind(THINK_CLOSE)
    if end < 0:
        return None
    tail = completion[end + len(THINK_CLOSE) :]
    # Scan forward over top-level boxes so that a box written inside another
    # box's content is part of that content, not a separate answer.
    found: str | None = None
    pos = tail.find(BOXED)
    while pos >= 0:
        start = pos + len(BOXED)
        depth = 1
        i = start
        while i < len(tail) and depth:
            ch = tail[i]
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
            i += 1
        if depth:
            return None
        found = tail[start : i - 1]
        pos = tail.find(BOXED, i)
    return found


def _token_bytes(token: str | bytes) -> bytes:
    if isinstance(token, str):
        return token.encode("utf-8")
    if isinstance(token, (bytes, bytearray, memoryview)):
        return bytes(token)
    raise TypeError(f"a token must be str or bytes, got {type(token).__name__}")


def exact_match(prediction: str | None, next_token: str | bytes) -> bool:
    """RMT rule: ``utf8(prediction) == bytes(next_token)``.

    A str token is UTF-8 encoded; None or an empty prediction is wrong.
    """
    if not prediction:
        return False
    return prediction.encode("utf-8") == _token_bytes(next_token)


def prefix_match(prediction: str | None, continuation_tokens: Sequence[str | bytes]) -> bool:
    """RPT rule: ``utf8(prediction) == bytes(c_1) + ... + bytes(c_j)`` for some ``j >= 1``.

    The prediction must end on a token boundary of the corpus continuation, so
    ``" 72"`` is right against ``[" 7", "2", ...]`` and against ``[" 72", "0"]``,
    and wrong against ``[" 7", "20"]`` (it would end inside a token). None or an
    empty prediction is wrong.
    """
    if not prediction:
        return False
    target = prediction.encode("utf-8")
    joined = b""
    for token in continuation_tokens:
        joined += _token_bytes(token)
        if len(joined) >= len(target):
            return joined == target
    return False


def total_reward(correct: float, length: float, w: float = 0.1, length_only_when_correct: bool = False) -> float:
    """Combined rollout reward ``r = (1 - w) * r_correct + w * r_len``.

    ``w`` is not given by the paper; the project default is 0.1. With ``length_only_when_correct`` the length
    term counts for correct completions only, ``r = (1 - w) * r_correct + w * r_len * r_correct``: a group with
    no correct completion then has equal rewards and no advantage, instead of one that GRPO's per-group
    normalisation blows the small length term up into. Raises ValueError unless ``0 <= w <= 1``.
    """
    if not 0.0 <= w <= 1.0:
        raise ValueError(f"w must be in [0, 1], got {w!r}")
    if length_only_when_correct:
        length = length * correct
    return float((1.0 - w) * correct + w * length)


def completion_rewards(
    predictions: Sequence[str | None],
    reasoning_lengths: Sequence[int],
    continuations: Sequence[Sequence[bytes]],
    budget: int,
    correctness: str = "exact",
    r_max: float = 1.0,
    w: float = 0.1,
    length_only_when_correct: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Rewards of ``P * G`` completions, row ``i`` answering position ``i // G``: ``(total, correct, length)``,
    each ``[P, G]`` float32.

    ``correct`` is ``exact_match`` of the prediction with the position's next token (``correctness="exact"``,
    RMT) or ``prefix_match`` with its continuation (``"prefix"``, RPT); ``length`` is
    ``length_reward(reasoning length, budget, r_max)``; ``total`` is ``total_reward(correct, length, w,
    length_only_when_correct)``.
    """
    if correctness not in CORRECTNESS_RULES:
        raise ValueError(f"correctness '{correctness}' is not a rule; valid: {list(CORRECTNESS_RULES)}")
    positions = len(continuations)
    if positions == 0 or len(predictions) % positions or len(predictions) != len(reasoning_lengths):
        raise ValueError(
            f"{len(predictions)} predictions and {len(reasoning_lengths)} reasoning lengths do not make whole groups "
            f"for {positions} positions"
        )
    group = len(predictions) // positions
    correct, length = [], []
    for row, (prediction, reasoning) in enumerate(zip(predictions, reasoning_lengths)):
        continuation = continuations[row // group]
        hit = exact_match(prediction, continuation[0]) if correctness == "exact" else prefix_match(prediction, continuation)
        correct.append(float(hit))
        length.append(length_reward(reasoning, budget, r_max))
    total = [total_reward(c, l, w, length_only_when_correct) for c, l in zip(correct, length)]
    return tuple(torch.tensor(values, dtype=torch.float32).view(positions, group) for values in (total, correct, length))
