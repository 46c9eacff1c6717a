"""The API reference covers the public API (the docs build checks the same; this runs without mkdocs)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools" / "docs"))
import public_api  # noqa: E402


def test_every_public_name_has_a_docstring() -> None:
    assert public_api.missing_docstrings() == []


def test_every_public_name_is_on_a_reference_page() -> None:
    import importlib.util

    pages = [p.read_text(encoding="utf-8") for p in (ROOT / "docs").rglob("*.md")]
    if importlib.util.find_spec("storch.extending") is not None:
        pages.append("::: storch.extending\n")  # its page is generated (tools/docs/hooks.py)
    assert public_api.unreferenced(pages) == []


def test_the_estimator_table_is_the_registrys() -> None:
    assert public_api.estimator_table_problem() == ""
