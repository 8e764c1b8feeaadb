"""Questions with checkable answers, from any ``datasets`` source or the built-in generator: the question (text or
chat messages) and the reference answers of each record, read by field names that may be dotted paths.

GSM8K (``question``, ``answer`` = a worked solution ending in ``#### 42``), MATH-style (``problem``, ``solution``
with a ``\\boxed{}``) and Skywork-OR1 (``prompt`` = chat messages, ``reward_model.ground_truth`` = a JSON list)
all read with the right field names; the reference's form is told apart by its shape (``method.answers``).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

from ..method.answers import parse_reference, reference_answers
from ..runtime.errors import InputError
from .corpus import _LOCAL_BUILDERS, EMBEDDED_CORPUS, _is_local, check_corpus_source

__all__ = ["Question", "QuestionSource", "read_questions", "field_value", "parse_references", "EMBEDDED_QUESTIONS"]

EMBEDDED_QUESTIONS = EMBEDDED_CORPUS
"""The built-in questions: the embedded generator's problems at a difficulty (``mathgen.generate_questions``)."""


@dataclass(frozen=True)
class Question:
    """One question and its reference."""

    content: str | list[dict]
    """The question text, or a conversation (chat messages with ``role`` and ``content``) that ends with it."""
    answers: list[str]
    """The acceptable reference answers, as written (``method.answers.reference_answers``); empty: unusable."""
    record: int = 0
    """Index of the record in its source (what an error names)."""


@dataclass(frozen=True)
class QuestionSource:
    """Where questions come from and which fields hold what."""

    source: str = EMBEDDED_QUESTIONS
    """``embedded:math`` (the built-in generator), a local jsonl/json/parquet/csv file, or a hub dataset."""
    split: str = "train"
    """Split of a hub dataset (a local file is read whole)."""
    subset: str | None = None
    """Configuration of a hub dataset (``main`` for ``openai/gsm8k``, ``math`` for Skywork-OR1's math part)."""
    question_field: str = "question"
    """Field of the question: text, or chat messages; a dotted path reaches inside a record (``a.b``)."""
    answer_field: str = "answer"
    """Field of the reference: an answer, a GSM8K solution, a solution with a box, or a JSON list of answers."""
    reference_form: str = "auto"
    """How the reference is written (``method.answers.REFERENCE_FORMS``); ``auto`` tells by its shape."""
    max_questions: int | None = None
    """Read at most this many records (None: all)."""
    streaming: bool = False
    """Read a hub dataset by streaming its first ``max_questions`` records instead of downloading it whole."""
    difficulty: int = 1
    """Level of the built-in questions (``mathgen.QUESTION_DIFFICULTIES``)."""
    seed: int = 0
    """Seed of the built-in questions."""


def field_value(record: dict, path: str):
    """The value at dotted ``path`` in ``record`` (``reward_model.ground_truth``), or None where it is absent."""
    value = record
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def _is_messages(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) and "content" in m for m in value)


def _dataset(source: QuestionSource):
    import datasets

    path = Path(source.source).expanduser()
    try:
        if path.is_file():
            return datasets.load_dataset(_LOCAL_BUILDERS[path.suffix.lower()], data_files={source.split: str(path)},
                                         split=source.split)
        return datasets.load_dataset(source.source, source.subset, split=source.split, streaming=source.streaming)
    except Exception as error:
        raise InputError(f"questions '{source.source}' cannot be read ({type(error).__name__}: {error})") from None


def check_question_source(source: QuestionSource, field: str = "questions") -> None:
    """A local file exists, has a known suffix and is not empty (``corpus.check_corpus_source``)."""
    if source.source != EMBEDDED_QUESTIONS and _is_local(source.source):
        check_corpus_source(source.source, field)


def read_questions(source: QuestionSource, count: int | None = None, exclude: frozenset[str] = frozenset()) -> list[Question]:
    """The questions of ``source`` (at most ``count``, or ``max_questions``); for the built-in set, ``count``
    generated ones whose texts are not in ``exclude``. A record without either field is an ``InputError`` that
    names the fields the records have."""
    limit = count if count is not None else source.max_questions
    if source.source == EMBEDDED_QUESTIONS:
        from .mathgen import generate_questions

        try:
            problems = generate_questions(limit or 2000, source.difficulty, source.seed, exclude)
        except ValueError as error:
            raise InputError(str(error)) from None
        return [Question(p.question, [str(p.answer)], i) for i, p in enumerate(problems)]
    check_question_source(source)
    records = _dataset(source)
    if limit is not None:
        records = records.select(range(min(limit, len(records)))) if hasattr(records, "select") and not source.streaming \
            else itertools.islice(records, limit)
    questions = []
    for row, record in enumerate(records):
        content, raw = field_value(record, source.question_field), field_value(record, source.answer_field)
        missing = [name for name, value in ((source.question_field, content), (source.answer_field, raw)) if value is None]
        if missing:
            raise InputError(f"questions '{source.source}' record {row} has no field {missing}; its fields are "
                             f"{sorted(record)}: set data.question_field and data.answer_field (dotted paths reach inside)")
        if not (isinstance(content, str) or _is_messages(content)):
            raise InputError(f"questions '{source.source}' record {row}: field '{source.question_field}' holds a "
                             f"{type(content).__name__}; valid: text or a list of chat messages with 'content'")
        if isinstance(content, list):
            content = [{"role": m.get("role", "user"), "content": m["content"]} for m in content]
        questions.append(Question(content, reference_answers(raw, source.reference_form), row))
    if not questions:
        raise InputError(f"questions '{source.source}' (split '{source.split}') holds no record")
    return questions


def parse_references(questions: list[Question], where: str) -> list[list]:
    """The parsed reference of each question (``method.answers.parse_reference``), parsed once; an empty or
    unparseable one is an ``InputError`` that says how many and shows the first."""
    parsed = [parse_reference(q.answers) for q in questions]
    bad = [i for i, values in enumerate(parsed) if not values]
    if bad:
        first = questions[bad[0]]
        raise InputError(
            f"{len(bad)} of the {len(questions)} questions of {where} have an empty or unparseable reference; the first "
            f"is record {first.record}: answers {first.answers!r} (question {str(first.content)[:80]!r}); valid: an answer "
            "math-verify reads, in the form of data.reference_form"
        )
    return parsed
