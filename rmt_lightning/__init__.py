"""rmt_lightning: Reinforcement Mid-Training (arXiv 2509.24375) as a PyTorch Lightning project."""

from .callbacks import CompletionsTable, HuggingFaceExport, PeriodicCheckpoint, PreemptionCheckpoint, TokenBudget
from .data.datamodule import RMTDataModule
from .module import RMTModule

__all__ = [
    "RMTModule", "RMTDataModule", "TokenBudget", "CompletionsTable", "HuggingFaceExport", "PeriodicCheckpoint",
    "PreemptionCheckpoint",
]
__version__ = "0.1.0"
