"""docs/architecture.md's tree of storch-core names every module, and only modules that exist.

The tree had fallen behind the code (``distributions/rsample_kinks.py``, ``distributions/precision.py``,
``surrogate/blackbox.py``, ``plates/draws.py``, most of ``plates/rules/``, ``testing/``, ``builtins/`` were missing):
a new or moved module now fails here until the tree says where it sits.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CORE = ROOT / "packages" / "storch-core" / "src" / "storch"
PAGE = ROOT / "docs" / "architecture.md"

# the tree's columns: a folder (or a top-level module) at column 2, a folder's module at column 16
_FOLDER = re.compile(r"^(\w+)/(?:\s|$)")
_TOP = re.compile(r"^(\w+\.py)\b")
_MODULE = re.compile(r"^([\w/]+\.py)\b")


def tree_modules(text: str) -> set[str]:
    """The module paths (relative to storch/) the first code block of ``text`` names."""
    block = text.split("```", 2)[1]
    folder, found = "", set()
    for line in block.splitlines():
        head, rest = line[2:16], line[16:]
        if (top := _TOP.match(head)) is not None:
            folder = ""
            found.add(top.group(1))
            continue
        if (m := _FOLDER.match(head)) is not None:
            folder = m.group(1) + "/"
        elif head.strip():
            continue  # the header line, the layer rule
        if (module := _MODULE.match(rest)) is not None:
            found.add(folder + module.group(1))
    return found


def core_files() -> set[str]:
    return {p.relative_to(CORE).as_posix() for p in CORE.rglob("*.py")}


def test_the_architecture_tree_names_every_core_module() -> None:
    """Every module but the packages' ``__init__.py`` (named where it holds code of its own, as distributed's)."""
    listed = tree_modules(PAGE.read_text(encoding="utf-8"))
    missing = sorted(f for f in core_files() - listed if not f.endswith("__init__.py"))
    assert missing == [], "modules of storch-core missing from docs/architecture.md's tree"
    assert sorted(listed - core_files()) == [], "docs/architecture.md's tree names modules that do not exist"


def test_the_tree_parser_reads_folders_and_top_level_modules() -> None:
    text = "```\n  errors.py            x\n  graph/        node.py   y\n                steps.py  z\n" \
           "                rules/a.py  w\n  registry.py     v\n```\n"
    assert tree_modules(text) == {"errors.py", "graph/node.py", "graph/steps.py", "graph/rules/a.py", "registry.py"}
