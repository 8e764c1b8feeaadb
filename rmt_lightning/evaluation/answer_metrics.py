"""Answer accuracy on held-out questions (the question task's evaluation): ``k`` completions per question, each
verified against the reference.

- ``answer_acc``: mean correctness over all completions, pass@1 estimated from the ``k`` samples (greedy with
  ``k = 1`` at temperature 0);
- ``answer_pass_at_k``: the share of questions with at least one correct completion of the ``k``;
- ``answer_rate``: the share of completions with a ``\\boxed{}`` answer at all (apart from accuracy: a model that
  never boxes its answer scores 0 however well it computes);
- ``response_length``: tokens per completion.

The states are sums, reduced across ranks by ``torchmetrics`` when computed; the evaluation JSON adds each
accuracy's 95% Wilson interval over the questions.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

from .charts import wilson_interval

__all__ = ["AnswerMetrics", "answer_record"]


class AnswerMetrics(Metric):
    """Sums over the held-out questions of one evaluation: ``update(correct [Q, k], answered [Q, k], lengths [Q, k])``."""

    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        for name in ("correct", "passed", "answered", "length", "completions", "questions"):
            self.add_state(name, default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, correct: Tensor, answered: Tensor, lengths: Tensor) -> None:
        correct, answered, lengths = (t.to(self.correct.device, torch.float64) for t in (correct, answered, lengths))
        self.correct += correct.sum()
        self.passed += (correct.amax(1) > 0).sum()
        self.answered += answered.sum()
        self.length += lengths.sum()
        self.completions += correct.numel()
        self.questions += correct.shape[0]

    def compute(self) -> dict[str, Tensor]:
        completions = self.completions.clamp(min=1)
        return {
            "answer_acc": (self.correct / completions).float(),
            "answer_pass_at_k": (self.passed / self.questions.clamp(min=1)).float(),
            "answer_rate": (self.answered / completions).float(),
            "response_length": (self.length / completions).float(),
            "questions": self.questions.clone(),
        }


def answer_record(stage: str, global_step: int, epoch: int, samples_per_question: int, temperature: float,
                  figures: dict[str, Tensor]) -> dict:
    """One evaluation as written to ``<log_dir>/<stage>_metrics.json``: the figures under ``<stage>/...``, the
    number of questions, how they were sampled, and the 95% Wilson interval of each accuracy over the questions."""
    questions = int(figures["questions"])
    record = {"stage": stage, "global_step": int(global_step), "epoch": int(epoch), "questions": questions,
              "samples_per_question": int(samples_per_question), "temperature": float(temperature),
              "scored_by": "answer"}
    for name, value in figures.items():
        if name == "questions":
            continue
        record[f"{stage}/{name}"] = float(value)
        if name in ("answer_acc", "answer_pass_at_k", "answer_rate") and questions:
            record[f"{stage}/{name}_interval"] = list(wilson_interval(float(value), questions))
    return record
