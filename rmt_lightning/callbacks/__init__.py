"""Callbacks: the token budget schedule, completions and histograms for every logger, the Hugging Face export,
and checkpoints on preemption and every N steps or T minutes."""

from .checkpoints import PeriodicCheckpoint, Preempted, PreemptionCheckpoint
from .export import HuggingFaceExport
from .inspection import CompletionsTable
from .token_budget import TokenBudget
from .writers import completions_markdown

__all__ = [
    "TokenBudget", "CompletionsTable", "completions_markdown", "HuggingFaceExport", "PeriodicCheckpoint",
    "PreemptionCheckpoint", "Preempted",
]
