"""docs/estimators/README.md's compile table is what storch.compile does now (tools/docs/compile_table.py
measures it: each configuration is compiled and run)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools" / "docs"))
import compile_table  # noqa: E402


def test_the_compile_table_is_what_storch_compile_does() -> None:
    assert compile_table.compile_table_problem() == ""


def test_a_changed_table_is_caught(tmp_path, monkeypatch) -> None:
    # the control: a page whose table says "yes" where storch refuses is reported, with the table now
    page = tmp_path / "README.md"
    text = compile_table.PAGE.read_text(encoding="utf-8")
    page.write_text(text.replace("| [`relax`](relax.md) | defaults | yes | refused", "| [`relax`](relax.md) | defaults | yes | yes"),
                    encoding="utf-8")
    monkeypatch.setattr(compile_table, "PAGE", page)
    monkeypatch.setattr(compile_table, "ROOT", tmp_path)
    problem = compile_table.compile_table_problem()
    assert "is not what storch.compile does now" in problem and "compile_table.py --write" in problem
