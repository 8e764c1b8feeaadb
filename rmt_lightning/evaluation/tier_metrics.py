"""Next-token accuracy by nested entropy tier, in the two modes the paper scores models with.

- NTP mode: the argmax of the model's next-token distribution at the position (how the paper scores NTP
  baselines).
- Reasoning mode: the policy writes ``<think>...</think> \\boxed{...}`` under a budget, the prediction is
  extracted and matched with the configured rule (how it scores RPT and RMT).

Both report accuracy on RPT's nested splits (easy ``H > 0.5``, medium ``H > 1.0``, hard ``H > 1.5`` under the
proxy) and their unweighted mean. The states are sums, reduced across ranks by ``torchmetrics`` when computed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics import MeanMetric, Metric

from ..engine.forward import positions_from_mask
from ..engine.padding import pad_left
from ..method import TIER_NAMES, nested_tier_masks
from ..runtime.atomic import staged_file

EVAL_STAGES = ("val", "test")
"""Lightning stages whose figures are logged as ``<stage>/acc_easy`` and so on."""


class TierAccuracy(Metric):
    """Accuracy on the nested entropy splits: position-weighted within a split, splits averaged unweighted.

    ``update(correct, tiers)`` takes each position's correctness in ``[0, 1]`` (the share of its completions
    that were right, or 0/1 for an argmax) and its disjoint tier (-1 .. 2). ``compute()`` returns
    ``{"accuracy": [easy, medium, hard], "positions": [easy, medium, hard]}`` over all ranks; a split with no
    position has accuracy NaN.
    """

    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        splits = len(TIER_NAMES)
        self.add_state("correct", default=torch.zeros(splits, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", default=torch.zeros(splits, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, correct: Tensor, tiers: Tensor) -> None:
        members = nested_tier_masks(tiers.to(self.correct.device)).to(torch.float64)  # [N, 3]
        self.correct += (correct.to(members).unsqueeze(-1) * members).sum(0)
        self.total += members.sum(0)

    def compute(self) -> dict[str, Tensor]:
        accuracy = torch.where(self.total > 0, self.correct / self.total.clamp(min=1), torch.full_like(self.total, float("nan")))
        return {"accuracy": accuracy, "positions": self.total.clone()}


def tier_figures(prefix: str, accuracies: Tensor) -> dict[str, Tensor]:
    """``{prefix}_easy``, ``_medium``, ``_hard`` and ``_avg`` (the unweighted mean of the splits that have positions)."""
    figures = {f"{prefix}_{name}": accuracies[t].float() for t, name in enumerate(TIER_NAMES)}
    present = accuracies[~torch.isnan(accuracies)]
    figures[f"{prefix}_avg"] = present.mean().float() if len(present) else torch.tensor(float("nan"))
    return figures


class EvaluationMetrics(torch.nn.Module):
    """The metrics of one stage: NTP-mode and reasoning-mode tier accuracy, reasoning length, answer rate."""

    def __init__(self):
        super().__init__()
        self.ntp = TierAccuracy()
        self.reasoning = TierAccuracy()
        self.reasoning_length = MeanMetric()
        self.answer_rate = MeanMetric()

    def update_reasoning(self, correct: Tensor, predictions: Sequence[str | None], reasoning_lengths: Sequence[int], tiers: Tensor) -> None:
        """``correct`` is ``[P, G]`` (rule applied to each completion); the other two have one entry per completion."""
        self.reasoning.update(correct.float().mean(1), tiers)
        self.reasoning_length.update(torch.tensor(reasoning_lengths, dtype=torch.float32))
        self.answer_rate.update(torch.tensor([p is not None for p in predictions], dtype=torch.float32))

    def compute(self, stage: str, reasoning: bool) -> tuple[dict[str, Tensor], int]:
        """Figures named ``{stage}/ntp_acc_*`` and, with ``reasoning``, ``{stage}/acc_*``, ``reasoning_length``,
        ``answer_rate``; and the number of positions scored on all ranks.

        Every rank must call this with the same ``reasoning``: computing a metric is a collective under DDP.
        """
        ntp = self.ntp.compute()
        figures = tier_figures(f"{stage}/ntp_acc", ntp["accuracy"])
        if reasoning:
            figures.update(tier_figures(f"{stage}/acc", self.reasoning.compute()["accuracy"]))
            figures[f"{stage}/reasoning_length"] = self.reasoning_length.compute()
            figures[f"{stage}/answer_rate"] = self.answer_rate.compute()
        return figures, int(ntp["positions"][0])  # every scored position is in the widest split

    def reset(self) -> None:
        for metric in (self.ntp, self.reasoning, self.reasoning_length, self.answer_rate):
            metric.reset()


@torch.no_grad()
def argmax_hits(model, contexts: Sequence[Sequence[int]], next_token_ids: Tensor, pad_token_id: int) -> Tensor:
    """1.0 where the model's most likely next token after each context is the corpus token, else 0.0.

    Contexts are left-padded into one batch with position ids that skip the padding, so each row sees
    exactly what it would see alone.
    """
    device = next(model.parameters()).device
    ids, mask = (t.to(device) for t in pad_left([list(c) for c in contexts], pad_token_id))
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask), logits_to_keep=1).logits
    return (logits[:, -1].argmax(-1) == next_token_ids.to(device)).float()


def write_figures(folder: str, stage: str, record: dict) -> str:
    """Write ``record`` to ``{folder}/{stage}_metrics.json`` (the latest evaluation) and append it as a line to
    ``{folder}/{stage}_metrics.jsonl`` (every evaluation of the run). Returns the JSON file's path."""
    os.makedirs(folder, exist_ok=True)
    latest = os.path.join(folder, f"{stage}_metrics.json")
    # A reader never sees half a file.
    with staged_file(latest) as staging, open(staging, "w") as handle:
        json.dump(record, handle, indent=2, sort_keys=True)
    with open(os.path.join(folder, f"{stage}_metrics.jsonl"), "a") as handle:
        handle.write(json.dumps(record, sort_keys=True) + "\n")
    return latest


def evaluation_budget(fitting: bool, current_budget: int, final_budget: int, val_budget: int | None) -> int:
    """Budget of reasoning-mode evaluation: while ``fitting`` the current one; outside ``fit`` ``val_budget``, else
    the final budget (where the schedule ends, or the fixed budget without one)."""
    if fitting:
        return current_budget
    return int(val_budget) if val_budget is not None else final_budget


def evaluation_record(stage: str, global_step: int, epoch: int, positions: int, budget: int | None, headline: str,
                      figures: dict[str, Tensor]) -> dict:
    """The figures of one evaluation as written to ``<log_dir>/<stage>_metrics.json``; ``headline`` is the
    accuracy the model is scored by (``acc_avg``: reasoning mode, else ``ntp_acc_avg``: the argmax)."""
    return {
        "stage": stage,
        "global_step": int(global_step),
        "epoch": int(epoch),
        "positions": positions,
        "budget": budget,
        "scored_by": "reasoning" if headline == "acc_avg" else "argmax",
        # NaN (a split without positions) is not JSON: write null.
        **{name: (float(v) if torch.isfinite(v) else None) for name, v in figures.items()},
    }
