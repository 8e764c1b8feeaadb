"""Every code name the README and docs/ give (``module.attr``, ``Class.method``, ``package.module.name``) names code
that exists, so a move or a rename cannot leave the pages pointing at nothing."""

import importlib
import inspect
import pkgutil
import re
from pathlib import Path

import pytest

import rmt_lightning

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted(p for p in (ROOT / "docs").glob("*.md") if p.name != "results.md")]
"""The pages that describe the code as it is; ``docs/results.md`` records measurements with their dates, in the
words of the code of that day."""

TOKEN = re.compile(r"`([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+)(?:\(\))?`")
NOT_CODE = {
    # Config keys and command-line flags (``model.lr``, ``data.corpus``), and the loggers' names.
    "model", "data", "trainer", "preemption", "optimizer", "lr_scheduler",
    # Fields of a dataset's records (Skywork-OR1's ``reward_model.ground_truth``).
    "reward_model",
    # Other libraries.
    "torch", "F", "np", "numpy", "L", "lightning", "transformers", "datasets", "math_verify", "wandb", "mlflow",
    "trl", "yaml", "json", "os", "sys", "signal", "sympy", "tokenizers", "jsonargparse",
}
SUFFIXES = {"py", "md", "yaml", "json", "jsonl", "ckpt", "png", "safetensors", "txt", "parquet", "csv", "pt", "gguf", "sh"}


def _package():
    modules = {"rmt_lightning": rmt_lightning}
    for info in pkgutil.walk_packages(rmt_lightning.__path__, "rmt_lightning."):
        modules[info.name] = importlib.import_module(info.name)
    by_leaf, defined = {}, {}
    for name, module in modules.items():
        by_leaf.setdefault(name.rsplit(".", 1)[-1], []).append(module)
        for attr, value in vars(module).items():
            if (inspect.isclass(value) or inspect.isfunction(value)) and value.__module__.startswith("rmt_lightning"):
                defined.setdefault(attr, []).append(value)
    return modules, by_leaf, defined


def _has(owner, name: str) -> bool:
    """An attribute, a dataclass field, an annotated or ``self.``-assigned attribute, or a constructor argument."""
    if hasattr(owner, name):
        return True
    if not inspect.isclass(owner):
        return False
    for cls in owner.__mro__:
        if name in getattr(cls, "__dataclass_fields__", {}) or name in getattr(cls, "__annotations__", {}):
            return True
        if cls.__module__.startswith("rmt_lightning") and re.search(rf"self\.{name}\b\s*(:[^=]+)?=", inspect.getsource(cls)):
            return True
    return name in inspect.signature(owner.__init__).parameters


def _resolves(token: str, modules, by_leaf, defined) -> bool:
    first, *rest = token.split(".")
    for owner in [*by_leaf.get(first, []), *defined.get(first, [])]:
        for part in rest:
            child = f"{owner.__name__}.{part}" if inspect.ismodule(owner) else None
            if child in modules:
                owner = modules[child]
            elif _has(owner, part):
                owner = getattr(owner, part, owner)
            else:
                break
        else:
            return True
    return False


def test_every_code_name_in_the_readme_and_docs_exists():
    modules, by_leaf, defined = _package()
    stale = []
    for page in PAGES:
        for token in sorted(set(TOKEN.findall(page.read_text()))):
            first, last = token.split(".")[0], token.rsplit(".", 1)[-1]
            if first in NOT_CODE or last in SUFFIXES:
                continue
            if not _resolves(token, modules, by_leaf, defined):
                stale.append(f"{page.relative_to(ROOT)}: `{token}`")
    assert not stale, "names that no code has:\n" + "\n".join(stale)


@pytest.mark.parametrize("token, exists", [
    ("engine.generation.generate_group", True), ("generation.generate_group", True), ("RMTModule.rl_step", True),
    ("Trajectory.old_logprobs", True), ("RMTModule.budget", True), ("TokenBudget.b0", True),
    ("rollout.generate_group", False), ("RMTModule.trajectory_for", False), ("method.no_such_formula", False),
])
def test_the_resolver_tells_stale_names_from_real_ones(token, exists):
    assert _resolves(token, *_package()) is exists
