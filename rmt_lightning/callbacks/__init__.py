"""Callbacks: the token budget schedule, completions and histograms for every logger, and the Hugging Face export."""

from .export import HuggingFaceExport
from .inspection import CompletionsTable
from .writers import completions_markdown
from .token_budget import TokenBudget

__all__ = ["TokenBudget", "CompletionsTable", "completions_markdown", "HuggingFaceExport"]
