"""The oldest Python and torch storch declares are one claim, stated once and guarded here without installing them.

Every package's pyproject.toml declares the same ``requires-python`` and ``torch>=`` minimum, and README.md states
that minimum; no source file uses syntax newer than the minimum Python (``ast.parse(..., feature_version=...)``), nor
the Python 3.10+ runtime forms that parse on 3.9 but fail when run there (``X | Y`` evaluated at runtime,
``zip(strict=)``, ``dataclass(slots=/kw_only=)``). That the suites pass on the minimums themselves was checked by
running them there (README.md, "Requirements", says when and how); CI runs only the pinned torch.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MIN_PYTHON = (3, 9)
MIN_TORCH = "2.7"  # the oldest torch whose suites pass (README.md, Packages: "Requirements")

# the installable packages: the four of storch, the example plugin, the benchmarks
PYPROJECTS = sorted([*ROOT.glob("packages/*/pyproject.toml"), ROOT / "examples/storch-estimators-example/pyproject.toml",
                     ROOT / "benchmarks/pyproject.toml"])
SOURCES = sorted(p for folder in ("packages", "tests", "benchmarks", "examples", "tools")
                 for p in (ROOT / folder).rglob("*.py")) + [ROOT / "tasks.py"]


def _declared(text: str) -> tuple:
    python = re.findall(r'^requires-python\s*=\s*"([^"]*)"', text, re.M)
    torch = re.findall(r'"torch\s*([^";]*)"', text)
    return python, torch


@pytest.mark.parametrize("path", PYPROJECTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_package_declares_the_same_minimums(path):
    python, torch = _declared(path.read_text())
    assert python == [">=%d.%d" % MIN_PYTHON], f"{path}: requires-python {python}"
    assert torch == [f">={MIN_TORCH}"], f"{path}: torch {torch}"


def test_the_readme_states_the_declared_minimums():
    text = (ROOT / "README.md").read_text()
    assert f"Requirements: Python {MIN_PYTHON[0]}.{MIN_PYTHON[1]}+ and torch {MIN_TORCH}+" in text
    # the writing-an-estimator guide's pyproject example declares what the packages do
    guide = (ROOT / "docs/writing-an-estimator.md").read_text()
    assert re.findall(r'"torch\s*([^";]*)"', guide) == [f">={MIN_TORCH}"]


def test_every_source_file_parses_as_the_minimum_python():
    bad = []
    for path in SOURCES:
        try:
            ast.parse(path.read_text(), str(path), feature_version=MIN_PYTHON)
        except SyntaxError as e:
            bad.append(f"{path.relative_to(ROOT)}:{e.lineno}: {e.msg}")
    assert bad == []


def _is_union(node) -> bool:
    return isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr)


def _newer_runtime_forms(tree: ast.Module) -> list:
    """(line, what) of each form that parses on Python 3.9 but fails when it runs there."""
    future = any(isinstance(n, ast.ImportFrom) and n.module == "__future__"
                 and any(a.name == "annotations" for a in n.names) for n in tree.body)
    found = []
    annotations = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = [*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs, node.args.vararg, node.args.kwarg]
            annotations.update(id(a.annotation) for a in args if a is not None and a.annotation is not None)
            if node.returns is not None:
                annotations.add(id(node.returns))
        elif isinstance(node, ast.AnnAssign):
            annotations.add(id(node.annotation))
    for node in ast.walk(tree):
        if id(node) in annotations and not future and any(_is_union(n) for n in ast.walk(node)):
            found.append((node.lineno, "an X | Y annotation without `from __future__ import annotations`"))
        if not isinstance(node, ast.Call):
            continue
        name = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", None)
        keywords = {k.arg for k in node.keywords}
        if name == "zip" and "strict" in keywords:
            found.append((node.lineno, "zip(strict=)"))
        if name == "dataclass" and keywords & {"slots", "kw_only"}:
            found.append((node.lineno, "dataclass(slots= / kw_only=)"))
        if name in ("isinstance", "issubclass") and len(node.args) == 2 and _is_union(node.args[1]):
            found.append((node.lineno, f"{name}(x, X | Y)"))
    return found


def test_no_source_file_uses_a_newer_python_at_runtime():
    bad = [f"{path.relative_to(ROOT)}:{line}: {what}"
           for path in SOURCES for line, what in _newer_runtime_forms(ast.parse(path.read_text()))]
    assert bad == []


@pytest.mark.parametrize("code, what", [
    ("def f(x: int | None): pass", "annotation"),
    ("isinstance(1, int | str)", "isinstance"),
    ("list(zip([1], [2], strict=True))", "zip(strict=)"),
    ("from dataclasses import dataclass\n@dataclass(slots=True)\nclass A:\n    x: int = 0", "dataclass"),
])
def test_the_runtime_check_finds_each_form(code, what):
    assert [w for _, w in _newer_runtime_forms(ast.parse(code)) if what.split("(")[0] in w]
    # and the annotation is fine once annotations are not evaluated
    if what == "annotation":
        assert _newer_runtime_forms(ast.parse("from __future__ import annotations\n" + code)) == []
