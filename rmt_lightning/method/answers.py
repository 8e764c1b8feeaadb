"""Answers to questions with a checkable reference (post-training): the last ``\\boxed{}`` of a completion, the
reference of each dataset's form, equality of values by ``math-verify`` (Hugging Face's checker, used by TRL,
open-r1, verl and NeMo RL), and the reward.

Pure functions of strings and tensors. ``math-verify`` (and sympy under it) is imported on first use, so importing
``rmt_lightning.method`` stays cheap. Its own time limits are SIGALRM-based and work on a process's main thread
only; ``runtime.verification.AnswerVerifier`` runs these functions in worker processes with a hard wall-clock
limit, which is what training uses.
"""

from __future__ import annotations

import json
import re
import threading
from functools import lru_cache

from torch import Tensor

from .rewards import BOXED

__all__ = [
    "last_boxed", "last_number", "extract_answer", "has_answer", "ANSWER_FORMATS", "gsm8k_reference", "reference_answers", "parse_reference", "verify_parsed", "verify_answer",
    "answer_rewards", "REFERENCE_FORMS",
]

ANSWER_FORMATS = ("boxed", "last_number")
"""Where a completion's answer is read: ``boxed``, its last ``\\boxed{}`` (RPT, open-r1, TRL's math reward, the
paper's post-training); ``last_number``, its last number (verl's "flexible" GSM8K score), for models that compute
but do not yet write the format."""

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")

REFERENCE_FORMS = ("auto", "plain", "gsm8k", "boxed", "json_list")
"""How a dataset writes its reference answer: ``plain`` (the answer itself), ``gsm8k`` (a worked solution ending in
``#### <answer>``), ``boxed`` (a solution whose last ``\\boxed{}`` is the answer, MATH-style), ``json_list`` (a JSON
list of acceptable answers, Skywork-OR1's ``ground_truth``); ``auto`` tells them apart by their shape."""

_GSM8K_MARK = "####"


def last_boxed(completion: str) -> str | None:
    """Content of the last top-level ``\\boxed{...}`` of ``completion``, verbatim (braces nest), or None when
    there is no box or the last one is never closed. A box written inside another box belongs to its content."""
    found, pos = None, completion.find(BOXED)
    while pos >= 0:
        depth, i = 1, pos + len(BOXED)
        while i < len(completion) and depth:
            depth += {"{": 1, "}": -1}.get(completion[i], 0)
            i += 1
        if depth:
            return None
        found = completion[pos + len(BOXED) : i - 1]
        pos = completion.find(BOXED, i)
    return found


def last_number(completion: str) -> str | None:
    """The last number of ``completion`` (thousands separators removed), or None."""
    numbers = _NUMBER.findall(re.sub(r"(?<=\d),(?=\d{3})", "", completion))
    return numbers[-1] if numbers else None


def extract_answer(completion: str, answer_format: str = "boxed") -> str | None:
    """The answer ``completion`` gives in ``answer_format`` (``ANSWER_FORMATS``), or None."""
    if answer_format == "boxed":
        return last_boxed(completion)
    if answer_format == "last_number":
        return last_number(completion)
    raise ValueError(f"answer format '{answer_format}' is not one of {list(ANSWER_FORMATS)}")


def has_answer(completion: str, answer_format: str = "boxed") -> bool:
    """Whether ``completion`` gives an answer: a last ``\\boxed{}`` with something in it (an empty box, which a
    model learns to copy from the instruction, is no answer), or a number with ``last_number``."""
    content = extract_answer(completion, answer_format)
    return content is not None and bool(content.strip())


def gsm8k_reference(solution: str) -> str | None:
    """The answer after the last ``####`` of a GSM8K solution, thousands separators removed (None without one)."""
    if _GSM8K_MARK not in solution:
        return None
    answer = solution.rsplit(_GSM8K_MARK, 1)[1].strip()
    return answer.replace(",", "") or None


def reference_answers(raw, form: str = "auto") -> list[str]:
    """The acceptable answers a dataset's reference field holds, in ``form`` (``REFERENCE_FORMS``); empty when
    there is none (an empty field, a solution without its marker)."""
    if form not in REFERENCE_FORMS:
        raise ValueError(f"reference form '{form}' is not one of {list(REFERENCE_FORMS)}")
    if isinstance(raw, (list, tuple)):
        return [a for item in raw for a in reference_answers(item, "plain")]
    if isinstance(raw, (int, float)) and not isinstance(raw, bool):
        return [str(raw)]
    if not isinstance(raw, str):
        return []
    text = raw.strip()
    if form == "auto":
        form = ("json_list" if text.startswith("[") and text.endswith("]") else
                "gsm8k" if _GSM8K_MARK in text else "boxed" if BOXED in text else "plain")
    if form == "json_list":
        try:
            items = json.loads(text)
        except json.JSONDecodeError:
            return []
        return reference_answers(items if isinstance(items, list) else [items], "plain")
    if form == "gsm8k":
        answer = gsm8k_reference(text)
    elif form == "boxed":
        answer = last_boxed(text)
    else:
        answer = text
    return [answer.strip()] if answer and answer.strip() else []


def _timeout(seconds: int) -> int | None:
    # math-verify's limits use SIGALRM, which Python allows on the main thread only.
    return seconds if threading.current_thread() is threading.main_thread() else None


def _parse_boxed(content: str, timeout: int):
    from math_verify import parse

    return parse(f"{BOXED}{content}}}", parsing_timeout=_timeout(timeout))


def parse_reference(answers: list[str], timeout: int = 5) -> list:
    """The parsed values of a reference's acceptable answers (``math_verify.parse`` of each as a boxed answer);
    an answer math-verify cannot read is left out, so an empty list means the reference is unusable."""
    parsed = []
    for answer in answers:
        value = _parse_boxed(answer, timeout)
        if value:
            parsed.append(value)
    return parsed


def verify_parsed(reference: list, completion: str, timeout: int = 5, answer_format: str = "boxed") -> bool:
    """Whether the answer of ``completion`` (its last ``\\boxed{}``, or with ``answer_format="last_number"`` its
    last number) equals one of the parsed reference values (the reference goes first: ``math_verify.verify`` is
    not symmetric). No answer, or one math-verify cannot read, is wrong."""
    from math_verify import verify

    content = extract_answer(completion, answer_format)
    if content is None or not content.strip():
        return False
    prediction = _parse_boxed(content, timeout)
    if not prediction:
        return False
    return any(verify(gold, prediction, timeout_seconds=_timeout(timeout)) for gold in reference)


@lru_cache(maxsize=4096)
def _parsed(reference: str) -> tuple:
    return tuple(parse_reference(reference_answers(reference)))


def verify_answer(completion: str, reference: str) -> bool:
    """Whether ``completion``'s final answer (its last ``\\boxed{}``) equals ``reference``, as a value: ``0.5`` and
    ``\\frac{1}{2}``, ``1,000`` and ``1000``, ``\\$18`` and ``18`` are equal. ``reference`` may be in any of the
    forms of ``REFERENCE_FORMS`` (a plain answer, a GSM8K solution, a solution with a box, a JSON list).

    For checks of one's own; training verifies in worker processes with a hard time limit instead
    (``runtime.verification.AnswerVerifier``)."""
    parsed = _parsed(reference)
    return bool(parsed) and verify_parsed(list(parsed), completion)


def answer_rewards(correct: Tensor, answered: Tensor, format_weight: float = 0.0) -> Tensor:
    """Reward of each completion of a question task: ``r = r_correct + format_weight * r_answered``, where
    ``r_correct`` is 1 for a verified answer and ``r_answered`` 1 for a completion with a non-empty ``\\boxed{}`` answer (``has_answer``)
    (open-r1's accuracy and format rewards, summed with weights). ``format_weight = 0`` is plain correctness,
    as the paper post-trains."""
    if format_weight < 0:
        raise ValueError(f"format_weight must be >= 0, got {format_weight!r}")
    return correct.float() + format_weight * answered.float()

