"""rmt_lightning: Reinforcement Mid-Training (arXiv 2509.24375) as a PyTorch Lightning project.

The classes below are imported on first use, so a process that needs only part of the package (the answer
verifier's workers, ``rmt_lightning.method``) does not import Lightning and transformers.
"""

from importlib import import_module

_EXPORTS = {
    "RMTModule": ".module",
    "PostTrainModule": ".posttrain",
    "RMTDataModule": ".data.datamodule",
    "QuestionDataModule": ".data.question_datamodule",
    "TokenBudget": ".callbacks",
    "CompletionsTable": ".callbacks",
    "HuggingFaceExport": ".callbacks",
    "PeriodicCheckpoint": ".callbacks",
    "PreemptionCheckpoint": ".callbacks",
    "verify_answer": ".method.answers",
}

__all__ = list(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'rmt_lightning' has no attribute '{name}'")
    value = getattr(import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
