"""Callbacks: the token budget schedule, TensorBoard inspection, and the Hugging Face export."""

from .export import HuggingFaceExport
from .inspection import CompletionsTable, completions_markdown
from .token_budget import TokenBudget

__all__ = ["TokenBudget", "CompletionsTable", "completions_markdown", "HuggingFaceExport"]
