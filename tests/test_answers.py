"""The question task's answers: the last box, references of each dataset's form, equality by math-verify, the
reward on hand-built tensors, and verification in worker processes that a hang cannot stop."""

import os
import signal
import time

import pytest
import torch

import rmt_lightning
from rmt_lightning.method.answers import (
    answer_rewards, gsm8k_reference, has_answer, last_boxed, last_number, parse_reference, reference_answers,
    verify_answer, verify_parsed,
)
from rmt_lightning.runtime.verification import AnswerVerifier

pytest.importorskip("math_verify")


@pytest.mark.parametrize("completion, expected", [
    ("no box here, the answer is 4", None),
    ("\\boxed{3} then I changed my mind: \\boxed{4}", "4"),
    ("first \\boxed{3} and a broken \\boxed{4", None),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("\\boxed{a \\boxed{b} c}", "a \\boxed{b} c"),
    ("\\boxed{}", ""),
    ("<think>x</think> \\boxed{ 7 }", " 7 "),
])
def test_last_boxed_reads_the_last_top_level_box(completion, expected):
    assert last_boxed(completion) == expected


def test_an_empty_box_is_no_answer():
    assert not has_answer("\\boxed{}") and not has_answer("\\boxed{  }") and not has_answer("none")
    assert has_answer("\\boxed{0}")


@pytest.mark.parametrize("raw, form, expected", [
    ("Natalia sold 48/2 = 24 clips in May.\n#### 72", "auto", ["72"]),  # GSM8K
    ("He earns 1,000 + 200 = 1,200\n#### 1,200", "gsm8k", ["1200"]),
    ("So the area is $\\boxed{\\frac{3}{4}}$.", "auto", ["\\frac{3}{4}"]),  # MATH-style
    ('["18", "18.0"]', "auto", ["18", "18.0"]),  # Skywork-OR1's ground_truth
    ("\\sqrt{2}", "plain", ["\\sqrt{2}"]),
    (42, "auto", ["42"]),
    ("   ", "auto", []),
    ("a solution without its marker", "gsm8k", []),
    ("[not json", "json_list", []),
])
def test_reference_answers_of_each_dataset_form(raw, form, expected):
    assert reference_answers(raw, form) == expected


def test_gsm8k_reference_is_the_number_after_the_last_marker():
    assert gsm8k_reference("#### 3\nmore\n#### 5") == "5"
    assert gsm8k_reference("no marker") is None


@pytest.mark.parametrize("completion, reference", [
    ("so \\boxed{0.5}", "\\frac{1}{2}"),
    ("\\boxed{\\frac{1}{2}}", "0.5"),
    ("\\boxed{1,000}", "1000"),
    ("\\boxed{1000}", "#### 1,000"),
    ("\\boxed{\\$18}", "18"),
    ("\\boxed{18}", '["18"]'),
])
def test_equal_values_in_other_forms_count(completion, reference):
    assert verify_answer(completion, reference)


@pytest.mark.parametrize("completion, reference", [
    ("the answer is 72", "72"),  # no box
    ("\\boxed{72} no wait \\boxed{71}", "72"),  # the last box counts
    ("\\boxed{72", "72"),  # never closed
    ("\\boxed{}", "72"),
    ("\\boxed{7}", "72"),
])
def test_wrong_or_missing_answers_do_not_count(completion, reference):
    assert not verify_answer(completion, reference)


def test_an_unusable_reference_matches_nothing():
    assert not verify_answer("\\boxed{5}", "")
    assert parse_reference([]) == []


def test_verify_parsed_puts_the_reference_first(monkeypatch):
    import math_verify

    seen = []
    real = math_verify.verify
    monkeypatch.setattr(math_verify, "verify", lambda gold, target, **kw: seen.append((gold, target)) or real(gold, target, **kw))
    reference = parse_reference(["3"])
    assert verify_parsed(reference, "\\boxed{3}")
    assert seen[0][0] is reference[0]


def test_verify_answer_is_exported_at_the_top():
    assert rmt_lightning.verify_answer("\\boxed{2}", "2")


def test_answer_rewards_on_a_hand_built_batch():
    correct = torch.tensor([[1, 0, 0, 1, 0, 0], [0, 0, 0, 0, 0, 0]], dtype=torch.float32)
    answered = torch.tensor([[1, 1, 0, 1, 0, 1], [1, 0, 0, 0, 0, 1]], dtype=torch.float32)
    assert torch.equal(answer_rewards(correct, answered), correct)
    expected = torch.tensor([[1.2, 0.2, 0.0, 1.2, 0.0, 0.2], [0.2, 0.0, 0.0, 0.0, 0.0, 0.2]])
    assert torch.allclose(answer_rewards(correct, answered, 0.2), expected)
    with pytest.raises(ValueError, match="format_weight"):
        answer_rewards(correct, answered, -1.0)


# ---- verification in worker processes -----------------------------------------------------------------


def _hang_on_request(reference, completion, timeout):
    if "hang" in completion:
        time.sleep(3600)
    return "right" in completion


def _die_once(reference, completion, timeout):
    marker = reference[0]
    if "die" in completion and not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(1)
    return "right" in completion


def test_verifier_checks_answers_in_workers():
    verifier = AnswerVerifier(workers=1, timeout_s=60)
    try:
        references = [parse_reference(reference_answers(r)) for r in ["72", "#### 1,000", "\\boxed{\\frac{1}{2}}", '["18"]', ""]]
        verdicts = verifier.verify(references, ["\\boxed{72}", "\\boxed{1000}", "\\boxed{0.5} \\boxed{3}", "\\boxed{\\$18}",
                                                "\\boxed{1}"])
        assert verdicts.correct == [True, True, False, True, False]
        assert verdicts.timeouts == 0
    finally:
        verifier.close()


def test_a_hung_check_is_cut_at_the_time_limit_and_scores_zero():
    verifier = AnswerVerifier(workers=1, timeout_s=1.0, function=_hang_on_request)
    try:
        verifier.verify([[1]], ["right"])  # workers started before the clock
        started = time.perf_counter()
        verdicts = verifier.verify([[1]] * 4, ["right", "hang", "right", "wrong"])
        elapsed = time.perf_counter() - started
        assert verdicts.correct == [True, False, True, False]
        assert verdicts.timeouts == 1
        assert verifier.restarts == 1
        assert elapsed < 30  # one time limit and a restart, not the hour the check would take
    finally:
        verifier.close()


def test_a_worker_that_dies_is_replaced_and_its_check_run_again(tmp_path):
    verifier = AnswerVerifier(workers=1, timeout_s=60, function=_die_once)
    try:
        marker = str(tmp_path / "died")
        verdicts = verifier.verify([[marker]] * 3, ["right", "die right", "wrong"])
        assert verdicts.correct == [True, True, False] and verdicts.timeouts == 0
        assert os.path.exists(marker)
    finally:
        verifier.close()


def test_workers_ignore_the_preemption_signals_meant_for_the_trainer():
    verifier = AnswerVerifier(workers=1, timeout_s=60, function=_hang_on_request)
    try:
        verifier.verify([[1]], ["right"])
        for process in verifier._pool._processes.values():
            os.kill(process.pid, signal.SIGTERM)
            os.kill(process.pid, signal.SIGUSR1)
        time.sleep(0.5)
        assert verifier.verify([[1]] * 2, ["right", "wrong"]).correct == [True, False]
        assert verifier.restarts == 0
    finally:
        verifier.close()


def test_verifier_arguments_are_checked():
    with pytest.raises(ValueError, match="workers"):
        AnswerVerifier(workers=0)
    with pytest.raises(ValueError, match="timeout_s"):
        AnswerVerifier(timeout_s=0)


@pytest.mark.parametrize("completion, expected", [
    ("Ben has 14 + 7 = 21 buttons.", "21"),
    ("It costs 1,200 dollars, then 3.5 more", "3.5"),
    ("-4 degrees", "-4"),
    ("no number", None),
])
def test_last_number_reads_the_last_number(completion, expected):
    assert last_number(completion) == expected


def test_the_answer_format_decides_what_is_read():
    reference = parse_reference(["21"])
    assert verify_parsed(reference, "Ben has 14 + 7 = 21 buttons.", answer_format="last_number")
    assert not verify_parsed(reference, "Ben has 14 + 7 = 21 buttons.")  # no box
    assert not verify_parsed(reference, "\\boxed{21} no, 20", answer_format="last_number")
    assert has_answer("so 3", "last_number") and not has_answer("so three", "last_number")
    with pytest.raises(ValueError, match="answer format 'words'"):
        has_answer("x", "words")


def test_the_verifier_checks_in_the_format_it_is_given():
    from functools import partial

    from rmt_lightning.runtime.verification import check_answer

    verifier = AnswerVerifier(timeout_s=60, function=partial(check_answer, answer_format="last_number"))
    try:
        verdicts = verifier.verify([parse_reference(["21"])] * 2, ["14 + 7 = 21", "\\boxed{21} or 22"])
        assert verdicts.correct == [True, False]
    finally:
        verifier.close()
