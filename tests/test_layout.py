"""The package's layers: a module imports only from its own layer or the ones below it, so the folders read
bottom-up (``method``/``runtime`` <- ``engine`` <- ``data`` <- ``rl``/``evaluation`` <- ``module`` <- ``callbacks``
<- ``cli``), and no function takes its inputs as a long list of positional values."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "rmt_lightning"

LAYERS = {
    "method": 0, "runtime": 0,
    "engine": 1,
    "data": 2,
    "rl": 3, "evaluation": 3,
    "checks": 4,
    "module": 5, "grpo_module": 5, "posttrain": 5,
    "callbacks": 6,
    "cli": 7,
    # The compare command drives the CLI's validate for each checkpoint: a command beside cli.py.
    "commands": 8,
    "__main__": 9, "": 9,
}
"""Layer of each module or package (the longest matching prefix counts); ``""`` is the package's ``__init__``."""

SIDEWAYS = {
    # The built-in tiny model's tokenizer is trained on the built-in corpus's words; mathgen imports nothing.
    ("engine.builtin_models", "data.mathgen"): "the tiny model's tokenizer learns the built-in corpus",
}
"""Imports that leave their layer's order, each with its reason."""


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def layer_of(module: str) -> int:
    matches = [prefix for prefix in LAYERS if module == prefix or module.startswith(prefix + ".") or prefix == ""]
    return LAYERS[max(matches, key=len)]


def imports_of(module: str, path: Path) -> set[str]:
    """Every module of the package that ``module`` imports, at the top or inside a function."""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    package = [p for p in package if p]
    modules = _modules()
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - (node.level - 1)] + (node.module.split(".") if node.module else [])
            target = ".".join(base)
            for alias in node.names:
                child = f"{target}.{alias.name}".strip(".")
                found.add(child if child in modules else target)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("rmt_lightning"):
            found.add(node.module.removeprefix("rmt_lightning").strip("."))
    return found - {module}


def test_no_module_imports_from_a_layer_above_its_own():
    upward = []
    for module, path in sorted(_modules().items()):
        for target in sorted(imports_of(module, path)):
            if layer_of(target) > layer_of(module) and (module, target) not in SIDEWAYS:
                upward.append(f"{module or '__init__'} (layer {layer_of(module)}) imports {target} (layer {layer_of(target)})")
    assert not upward, "\n".join(upward)


def test_the_listed_exceptions_are_still_needed():
    modules = _modules()
    for (module, target), reason in SIDEWAYS.items():
        assert target in imports_of(module, modules[module]), f"{module} no longer imports {target} ({reason}): drop it"


def test_the_top_level_holds_only_the_entry_points_the_modules_and_the_checks():
    loose = sorted(p.name for p in PACKAGE.glob("*.py"))
    # The shared GRPO step (grpo_module.py) and one LightningModule per task: next-token (module.py), questions
    # (posttrain.py).
    assert loose == ["__init__.py", "__main__.py", "checks.py", "cli.py", "grpo_module.py", "module.py", "posttrain.py"]


CONSTRUCTORS_OF_THE_CLI = {"RMTModule.__init__", "RMTDataModule.__init__", "PostTrainModule.__init__",
                           "QuestionDataModule.__init__"}
"""Constructors whose arguments are the configuration (LightningCLI's ``--help``): as long as the options are."""


@pytest.mark.parametrize("limit", [8])
def test_no_function_takes_more_than_about_eight_arguments(limit):
    long = []
    for module, path in sorted(_modules().items()):
        tree = ast.parse(path.read_text())
        for parent in ast.walk(tree):
            for node in ast.iter_child_nodes(parent):
                if not isinstance(node, ast.FunctionDef):
                    continue
                args = node.args
                names = [a.arg for a in args.posonlyargs + args.args + args.kwonlyargs]
                count = len(names) - (names[:1] in (["self"], ["cls"]))
                qualified = f"{parent.name}.{node.name}" if isinstance(parent, ast.ClassDef) else node.name
                if count > limit and qualified not in CONSTRUCTORS_OF_THE_CLI:
                    long.append(f"{module}.{qualified}: {count} arguments")
    assert not long, "\n".join(long)
