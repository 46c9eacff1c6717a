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
    pages = [p.read_text(encoding="utf-8") for p in (ROOT / "docs").rglob("*.md")]
    assert public_api.unreferenced(pages) == []


def test_the_estimator_table_is_the_registrys() -> None:
    assert public_api.estimator_table_problem() == ""


def test_the_partition_column_and_list_are_the_classes_supports_partitions(tmp_path, monkeypatch) -> None:
    """p-attn: which estimators support partitions (one instance called at several steps) was in neither the
    estimator table nor docs/partitions.md. Both are generated from ``supports_partitions`` and checked here (and by
    the docs build), so they cannot go stale: a page that lists another set is reported."""
    import storch

    assert public_api.partition_list_problem() == ""
    table = public_api.between(ROOT / "docs" / public_api.ESTIMATOR_PAGE, public_api.TABLE_START, public_api.TABLE_END)
    header = [c.strip() for c in table.splitlines()[0].strip("|").split("|")]
    column = header.index("partitions")
    shown = {}
    for row in table.splitlines()[2:]:
        cells = [c.strip() for c in row.strip("|").split("|")]
        shown[cells[0].split("`")[1]] = cells[column] == "yes"
    truth = {name: bool(cls.supports_partitions) for name, cls in public_api._first_party()}
    assert shown == truth and any(truth.values()) and not all(truth.values())
    listed = public_api.between(ROOT / "docs" / public_api.PARTITIONS_PAGE, public_api.PARTITIONS_START,
                                public_api.PARTITIONS_END)
    assert {line.split("`")[1] for line in listed.splitlines()} == {n for n, yes in truth.items() if yes}
    # a stale page is caught: one estimator more in the list
    page = tmp_path / "docs" / public_api.PARTITIONS_PAGE
    page.parent.mkdir()
    text = (ROOT / "docs" / public_api.PARTITIONS_PAGE).read_text(encoding="utf-8")
    page.write_text(text.replace(public_api.PARTITIONS_END, "- [`vimco`](estimators/vimco.md)\n"
                                 + public_api.PARTITIONS_END), encoding="utf-8")
    monkeypatch.setattr(public_api, "ROOT", tmp_path)
    assert "supports_partitions" in public_api.partition_list_problem()
    assert storch.get_estimator_class("vimco").supports_partitions is False


def test_every_class_the_docs_name_by_package_exists_there() -> None:
    """p-api: docs/estimators/sum_and_sample.md named ``storch_score.SumAndSampleSequences``, which storch_score did
    not export. Every ``storch*.Name`` (a capitalised name: a class) written in the docs is importable as written."""
    import importlib
    import re

    missing = []
    for page in sorted((ROOT / "docs").rglob("*.md")):
        text = page.read_text(encoding="utf-8")
        for module, name in sorted(set(re.findall(r"`(storch(?:_score|_relaxed|_mvd)?)\.([A-Z]\w*)", text))):
            if not hasattr(importlib.import_module(module), name):
                missing.append(f"{page.relative_to(ROOT)}: {module}.{name}")
    assert missing == []


def test_storch_estimator_says_where_to_find_names_and_what_it_raises() -> None:
    """p-api: ``storch.estimator``'s docstring named neither how to list the names nor what it raises."""
    import storch

    doc = storch.estimator.__doc__ or ""
    assert "storch.available_estimators()" in doc and "docs/estimators/README.md" in doc
    raises = doc.split("Raises:")[1]
    for error in ("UnknownEstimatorError", "OptionError", "PluginError"):
        assert f"storch.{error}:" in raises
    assert (ROOT / "docs" / "estimators" / "README.md").exists()
