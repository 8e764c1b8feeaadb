"""Tests for the embedded GSM8K-style math corpus generator."""

from __future__ import annotations

import random
import re
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest

from rmt_lightning.data.mathgen import (
    TEMPLATE_NAMES,
    MathProblem,
    generate_math_corpus,
    generate_math_problems,
    generate_problem,
)

_NUMBER = r"\d+(?:\.\d+)?"
# A chain like "2 * 14 + 2 * 3 = 34"; the lookbehind stops a match from
# starting in the middle of a longer number.
_STATEMENT = re.compile(
    rf"(?<![\d.])({_NUMBER}(?:\s*[-+*/]\s*{_NUMBER})+)\s*=\s*({_NUMBER})"
)
_TOKEN = re.compile(rf"{_NUMBER}|[-+*/]")


def _evaluate(expression: str) -> Fraction:
    """Evaluate numbers joined by + - * / with usual precedence, exactly."""
    tokens = _TOKEN.findall(expression)
    assert "".join(tokens) == re.sub(r"\s+", "", expression), expression
    terms: list[Fraction] = []
    signs: list[int] = []
    current = Fraction(tokens[0])
    sign = 1
    i = 1
    while i < len(tokens):
        op, value = tokens[i], Fraction(tokens[i + 1])
        if op == "*":
            current *= value
        elif op == "/":
            current /= value
        else:
            terms.append(current)
            signs.append(sign)
            current = value
            sign = 1 if op == "+" else -1
        i += 2
    terms.append(current)
    signs.append(sign)
    return sum((s * t for s, t in zip(signs, terms)), Fraction(0))


def test_at_least_24_templates_and_all_appear() -> None:
    assert len(TEMPLATE_NAMES) >= 24
    assert len(set(TEMPLATE_NAMES)) == len(TEMPLATE_NAMES)
    problems = generate_math_problems(200, seed=3)
    assert {p.template for p in problems} == set(TEMPLATE_NAMES)


def test_corpus_is_texts_of_problems() -> None:
    problems = generate_math_problems(50, seed=11)
    assert generate_math_corpus(50, seed=11) == [p.text for p in problems]
    for p in problems:
        assert isinstance(p, MathProblem)
        assert p.text == p.question + "\n" + p.solution


def test_deterministic_for_seed_and_differs_between_seeds() -> None:
    first = generate_math_corpus(100, seed=7)
    assert first == generate_math_corpus(100, seed=7)
    assert first != generate_math_corpus(100, seed=8)
    rng_a, rng_b = random.Random(5), random.Random(5)
    assert generate_problem(rng_a) == generate_problem(rng_b)


def test_deterministic_across_processes() -> None:
    code = (
        "from rmt_lightning.data.mathgen import generate_math_corpus;"
        "import sys; sys.stdout.write('\\x00'.join(generate_math_corpus(40, seed=9)))"
    )
    outputs = set()
    for hash_seed in ("1", "2"):
        result = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={"PYTHONHASHSEED": hash_seed, "PATH": ""},
            cwd=str(Path(__file__).resolve().parents[1]),
        )
        outputs.add(result.stdout)
    assert outputs == {"\x00".join(generate_math_corpus(40, seed=9))}


def test_thousands_of_distinct_documents() -> None:
    corpus = generate_math_corpus(5000, seed=0)
    assert len(corpus) == 5000
    assert len(set(corpus)) >= 4900


def test_every_document_ends_with_answer_line() -> None:
    for p in generate_math_problems(600, seed=1):
        lines = p.text.splitlines()
        assert lines[-1] == f"#### {p.answer}"
        assert isinstance(p.answer, int)
        assert p.solution.count("####") == 1
        steps = lines[len(p.question.splitlines()):-1]
        assert 2 <= len(steps) <= 5, p.text


def test_every_arithmetic_statement_is_correct() -> None:
    for p in generate_math_problems(3000, seed=2):
        body = p.solution.rsplit("\n####", 1)[0]
        matches = list(_STATEMENT.finditer(body))
        assert matches, p.text
        # Every "=" must belong to a parsed statement, so none escape checking.
        assert len(matches) == body.count("="), p.text
        for m in matches:
            assert _evaluate(m.group(1)) == Fraction(m.group(2)), (m.group(0), p.text)
        # The final computed value is the stated answer.
        assert Fraction(matches[-1].group(2)) == p.answer, p.text


def test_each_template_can_be_requested() -> None:
    rng = random.Random(0)
    for name in TEMPLATE_NAMES:
        problem = generate_problem(rng, name)
        assert problem.template == name
    with pytest.raises(ValueError, match="no_such_template"):
        generate_problem(rng, "no_such_template")


@pytest.mark.parametrize("bad", [0, -3])
def test_invalid_num_documents_raises(bad: int) -> None:
    with pytest.raises(ValueError, match=str(bad)):
        generate_math_corpus(bad)
