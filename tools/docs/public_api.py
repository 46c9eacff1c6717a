"""The public API the documentation covers, and the check that every public name has a docstring.

Used by the docs build (tools/docs/hooks.py fails the build on a missing docstring) and by
tests/docs. Public = the names in ``__all__`` of the modules below, and the public methods and
properties those classes define themselves (an override of a documented base-class method inherits
its docstring, as ``help()`` shows it).
"""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path
from typing import Any, Iterator

from marked import between, write_between  # tools/docs/, on sys.path for this module's users

#: The modules whose ``__all__`` is public API, in the order of the reference pages.
MODULES = ["storch", "storch.testing", "storch.distributed", "storch.extending", "storch.estimators.validators",
           "storch.builtins", "storch_score", "storch_relaxed", "storch_mvd"]


#: modules documented under another public path (``storch.extending.options`` is ``storch.estimators.validators``)
DOCUMENTED_AS = {"storch.estimators.validators": "storch.extending.options"}


def public_modules() -> list[str]:
    return list(MODULES)


def _own_doc(obj: Any) -> str:
    doc = obj.__dict__.get("__doc__") if isinstance(obj, type) else getattr(obj, "__doc__", None)
    return (doc or "").strip()


def _member_doc(cls: type, name: str) -> str:
    for base in cls.__mro__:
        if name in vars(base):
            member = vars(base)[name]
            func = getattr(member, "fget", None) or getattr(member, "__func__", None) or member
            doc = (getattr(func, "__doc__", None) or "").strip()
            if doc and not (isinstance(member, (str, int, float, bool, tuple, type(None)))):
                return doc
    return ""


def _data_doc(modname: str, name: str) -> str:
    import griffe

    try:
        obj = griffe.load(modname, resolve_aliases=True, resolve_external=False)[name]
    except (KeyError, griffe.AliasResolutionError, griffe.CyclicAliasError):
        return ""
    return obj.docstring.value.strip() if obj.docstring else ""


def _public_members(cls: type) -> Iterator[tuple[str, Any]]:
    for name, member in vars(cls).items():
        if name.startswith("_"):
            continue
        if isinstance(member, (staticmethod, classmethod, property)) or inspect.isfunction(member):
            yield name, member


def missing_docstrings() -> list[str]:
    """The public names (``module.name`` or ``module.Class.member``) that have no docstring."""
    missing = []
    for modname in public_modules():
        module = importlib.import_module(modname)
        if not (module.__doc__ or "").strip():
            missing.append(modname)
        for name in getattr(module, "__all__", []):
            obj = getattr(module, name)
            path = f"{modname}.{name}"
            if inspect.ismodule(obj):
                continue  # documented as a module of its own
            if inspect.isclass(obj) or inspect.isfunction(obj):
                doc = _own_doc(obj)
            elif callable(obj) and type(obj).__module__.split(".")[0] not in ("typing", "collections"):
                doc = _own_doc(obj) or (type(obj).__doc__ or "").strip()  # e.g. pluggy's markers
            else:
                doc = _data_doc(modname, name)  # an alias or constant: its docstring in the source
            if not doc:
                missing.append(path)
            if inspect.isclass(obj) and obj.__module__.split(".")[0] == modname.split(".")[0]:
                for member_name, _ in _public_members(obj):
                    if not _member_doc(obj, member_name):
                        missing.append(f"{path}.{member_name}")
    return sorted(set(missing))


def _callables() -> Iterator[tuple[str, Any]]:
    """Every public function, class constructor and public method, as (path, function)."""
    for modname in public_modules():
        module = importlib.import_module(modname)
        for name in getattr(module, "__all__", []):
            obj = getattr(module, name)
            path = f"{modname}.{name}"
            if inspect.isfunction(obj):
                yield path, obj
            elif inspect.isclass(obj) and obj.__module__.split(".")[0] == modname.split(".")[0]:
                init = vars(obj).get("__init__")
                if inspect.isfunction(init):
                    yield f"{path}.__init__", init
                for member_name, member in _public_members(obj):
                    func = getattr(member, "fget", None) or getattr(member, "__func__", None) or member
                    if inspect.isfunction(func):
                        yield f"{path}.{member_name}", func


def unannotated() -> list[str]:
    """Public functions and methods with a parameter or return value that has no annotation."""
    missing = []
    for path, func in _callables():
        sig = inspect.signature(func)
        params = list(sig.parameters.values())
        if params and params[0].name in ("self", "cls"):
            params = params[1:]
        bare = [p.name for p in params if p.annotation is inspect.Parameter.empty]
        if sig.return_annotation is inspect.Signature.empty and not path.endswith("__init__"):
            bare.append("return")
        if bare:
            missing.append(f"{path}: {', '.join(bare)}")
    return sorted(missing)


def unreferenced(pages: list[str]) -> list[str]:
    """The public names no ``::: identifier`` directive of ``pages`` (Markdown texts) renders.

    A directive renders its object; a module's directive renders the module's public names too,
    unless its options say ``members: false`` or list ``members: [a, b]``.
    """
    shown: set[str] = set()
    for text in pages:
        for m in re.finditer(r"^::: ([\w.]+)\n((?:[ \t]+.*\n)*)", text, re.M):
            ident, options = m.group(1), m.group(2)
            shown.add(ident)
            listed = re.search(r"members:\s*(false|\[([^\]]*)\])", options)
            if listed is None:
                shown.add(ident + ".*")
            elif listed.group(2) is not None:
                shown.update(f"{ident}.{name.strip()}" for name in listed.group(2).split(","))
    missing = []
    for modname in public_modules():
        module = importlib.import_module(modname)
        documented = DOCUMENTED_AS.get(modname, modname)
        for name in getattr(module, "__all__", []):
            if inspect.ismodule(getattr(module, name)):
                continue
            if f"{documented}.{name}" not in shown and f"{documented}.*" not in shown:
                missing.append(f"{documented}.{name}")
    return missing


FIRST_PARTY = ("storch.", "storch_score.", "storch_relaxed.", "storch_mvd.")
ESTIMATOR_PAGE = "estimators/README.md"
TABLE_START, TABLE_END = "<!-- estimator-table: start -->", "<!-- estimator-table: end -->"
ROOT = Path(__file__).resolve().parents[2]


def estimator_table() -> str:
    """The first-party estimators as the registry has them: page, class, max_order, biased, partitions, summary."""
    rows = ["| estimator | class | max_order | biased | partitions | summary |", "|---|---|---|---|---|---|"]
    for name, cls in _first_party():
        module = cls.__module__
        public = "storch.builtins" if module.startswith("storch.") else module.split(".")[0]
        if not (ROOT / "docs" / "estimators" / f"{name}.md").exists():
            raise ValueError(f"estimator {name!r} ({public}.{cls.__name__}) has no page docs/estimators/{name}.md")
        order = "∞" if cls.max_order == float("inf") else str(cls.max_order)
        summary = (cls.__doc__ or "").strip().splitlines()[0].rstrip(".").replace("|", "\\|")
        rows.append(f"| [`{name}`]({name}.md) | `{public}.{cls.__name__}` | {order} | "
                    f"{'yes' if cls.biased else 'no'} | {'yes' if cls.supports_partitions else 'no'} | {summary} |")
    return "\n".join(rows) + "\n"


def _first_party() -> list:
    """(name, class) of the installed first-party estimators, in the registry's order."""
    import storch

    found = []
    for name in storch.available_estimators():
        cls = storch.get_estimator_class(name)
        if cls.__module__.startswith(FIRST_PARTY):  # (a third-party plugin installed next to storch: not here)
            found.append((name, cls))
    return found


PARTITIONS_PAGE = "partitions.md"
PARTITIONS_START, PARTITIONS_END = "<!-- partition-estimators: start -->", "<!-- partition-estimators: end -->"


def partition_list() -> str:
    """The first-party estimators with ``supports_partitions`` (one instance called at several steps), with what a
    partition of each needs (``partition_options``)."""
    rows = []
    for name, cls in _first_party():
        if cls.supports_partitions:
            needs = (cls.partition_options or "").strip()
            rows.append(f"- [`{name}`](estimators/{name}.md)" + (f": needs {needs}" if needs else ""))
    return "\n".join(rows) + "\n"



def estimator_table_problem() -> str:
    """Why docs/estimators/README.md's table is not the registry's, or "" when it is."""
    shown = between(ROOT / "docs" / ESTIMATOR_PAGE, TABLE_START, TABLE_END)
    if shown is None:
        return f"docs/{ESTIMATOR_PAGE} has no {TABLE_START} ... {TABLE_END} markers"
    try:
        expected = estimator_table().strip()
    except ValueError as e:
        return str(e)
    if shown != expected:
        return (f"the table of docs/{ESTIMATOR_PAGE} is not the registry's; "
                "`python tools/docs/public_api.py --write-estimator-table` rewrites it")
    return ""


def partition_list_problem() -> str:
    """Why docs/partitions.md's list of estimators that support partitions is not the registry's, or ""."""
    shown = between(ROOT / "docs" / PARTITIONS_PAGE, PARTITIONS_START, PARTITIONS_END)
    if shown is None:
        return f"docs/{PARTITIONS_PAGE} has no {PARTITIONS_START} ... {PARTITIONS_END} markers"
    if shown != partition_list().strip():
        return (f"the list of estimators that support partitions in docs/{PARTITIONS_PAGE} is not the registry's "
                "(supports_partitions); `python tools/docs/public_api.py --write-estimator-table` rewrites it")
    return ""


def write_estimator_table() -> None:
    write_between(ROOT / "docs" / ESTIMATOR_PAGE, TABLE_START, TABLE_END, estimator_table())
    write_between(ROOT / "docs" / PARTITIONS_PAGE, PARTITIONS_START, PARTITIONS_END, partition_list())


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["--write-estimator-table"]:
        write_estimator_table()
        raise SystemExit(0)
    names = missing_docstrings()
    print("\n".join(names) or "every public name has a docstring")
    bare = unannotated()
    print("\n".join(bare) or "every public function and method is annotated")
    raise SystemExit(1 if names or bare else 0)
