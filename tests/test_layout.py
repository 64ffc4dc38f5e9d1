"""The package's house rules, read from the source: files of at most 400 lines and functions of at most 60
(package, callbacks, tests and benchmarks), imports that point only down the layers, no private name imported
from another file of the repository. ``python tests/test_layout.py [PATH ...]`` prints what breaks a rule."""

import ast
import functools
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 60
CHECKED = ("lit_rlhf", "callbacks", "tests", "benchmarks")

LAYERS = {  # a part of lit_rlhf -> the parts it may import (besides itself)
    "objectives": set(),
    "moved": set(),
    "runtime": set(),
    "settings": {"objectives"},
    "models": {"runtime", "settings", "objectives"},
    "rewards": {"models", "runtime", "settings", "objectives"},
    "rollout": {"models", "rewards", "runtime", "settings", "objectives"},
    "data": {"rollout", "models", "rewards", "runtime", "settings", "objectives"},
    "modules": {"data", "rollout", "models", "rewards", "runtime", "settings", "objectives"},
    "callbacks": {"data", "rollout", "models", "rewards", "runtime", "settings", "objectives"},
    "cli": {"modules", "callbacks", "data", "rollout", "models", "rewards", "runtime", "settings", "objectives",
            "moved"},
}
"""Arrows point down: cli -> modules, data, callbacks -> rollout -> models, rewards -> objectives, runtime."""


def python_files(paths=CHECKED) -> list[Path]:
    files = []
    for path in paths:
        path = ROOT / path
        files += [path] if path.is_file() else sorted(p for p in path.rglob("*.py") if "fixtures" not in p.parts)
    return files


@functools.cache
def own_modules() -> frozenset[str]:
    """The top-level names of this repository's importable code: lit_rlhf and the helper modules of tests/ and
    benchmarks/ (conftest, ppo_step, ...), which import each other by those names."""
    names = {"lit_rlhf"}
    for folder in ("tests", "benchmarks"):
        for path in (ROOT / folder).rglob("*"):
            if path.suffix == ".py" or path.is_dir() and (path / "__init__.py").exists():
                names.add(path.stem)
    return frozenset(names)


def part_of(path: Path) -> str | None:
    """``lit_rlhf/models/lm.py`` -> ``models``; ``callbacks/x.py`` -> ``callbacks``; tests and benchmarks: None."""
    rel = path.relative_to(ROOT).parts
    if rel[0] == "callbacks":
        return "callbacks"
    if rel[0] != "lit_rlhf" or rel[-1] == "__init__.py" and len(rel) == 2:
        return None
    return rel[1].removesuffix(".py")


def imported_part(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "lit_rlhf" or len(parts) < 2:
        return None
    return parts[1]


def long_functions(path: Path, tree: ast.AST) -> list[str]:
    return [f"{path.relative_to(ROOT)}:{node.lineno} {node.name} has {node.end_lineno - node.lineno + 1} lines"
            for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]


def bad_imports(path: Path, tree: ast.AST) -> list[str]:
    where, mine, found = path.relative_to(ROOT), part_of(path), []
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom) or not node.module:
            continue
        names = [alias.name for alias in node.names]
        private = [n for n in names if n.startswith("_") and not n.startswith("__")]
        if private and node.module.split(".")[0] in own_modules():
            found.append(f"{where}:{node.lineno} imports private {private} from {node.module}")
        theirs = imported_part(node.module)
        if mine and mine in LAYERS and theirs and theirs != mine and theirs not in LAYERS[mine]:
            found.append(f"{where}:{node.lineno} {mine} imports {node.module} (not below it)")
        if node.module == "lit_rlhf" and mine:
            found += [f"{where}:{node.lineno} {mine} imports lit_rlhf.{n} (not below it)"
                      for n in names if n != mine and n in LAYERS and n not in LAYERS.get(mine, set())]
    return found


def non_torch_imports(path: Path, tree: ast.AST) -> list[str]:
    """objectives/ is pure tensor math: it imports torch, the standard library and itself, nothing else."""
    if part_of(path) != "objectives":
        return []
    modules = [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
    modules += [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module]
    allowed = {"torch", "lit_rlhf", *sys.stdlib_module_names}
    return [f"{path.relative_to(ROOT)} imports {m} (objectives import only torch)"
            for m in modules if m.split(".")[0] not in allowed or m.startswith("lit_rlhf.") and
            not m.startswith("lit_rlhf.objectives")]


def violations(paths=CHECKED) -> list[str]:
    found = []
    for path in python_files(paths):
        text = path.read_text()
        lines = text.count("\n")
        if lines > MAX_FILE_LINES:
            found.append(f"{path.relative_to(ROOT)} has {lines} lines")
        tree = ast.parse(text)
        found += long_functions(path, tree) + bad_imports(path, tree) + non_torch_imports(path, tree)
    return found


def test_house_rules_hold():
    found = violations()
    assert not found, "\n".join(found)


def test_the_rules_see_a_violation(tmp_path):
    long = "def f():\n" + "    x = 1\n" * MAX_FUNCTION_LINES
    tree = ast.parse(long)
    assert long_functions(ROOT / "lit_rlhf" / "x.py", tree)
    upward = ast.parse("from lit_rlhf.modules import PPOModule\nfrom lit_rlhf.data.prompts import _pad\n")
    found = bad_imports(ROOT / "lit_rlhf" / "models" / "x.py", upward)
    assert len(found) == 3, found  # an upward import (twice: modules, data) and a private name
    numpy = ast.parse("import numpy as np\nimport torch\nfrom lit_rlhf.objectives.statistics import masked_mean\n")
    assert len(non_torch_imports(ROOT / "lit_rlhf" / "objectives" / "x.py", numpy)) == 1


if __name__ == "__main__":
    print("\n".join(violations(sys.argv[1:] or CHECKED)) or "no violation")
