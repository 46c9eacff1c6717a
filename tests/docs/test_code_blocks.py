"""Every code block in README.md and docs/ runs, or is a marked excerpt of a file that does.

- ```python blocks run in order, one namespace per page (blocks of a page share their setup). A
  page may hold hidden setup in ``<!-- test-setup ... -->`` (python, run where it stands): the
  stand-ins for the reader's own data and model (``batches``, ``encoder``...); and hidden checks
  in ``<!-- test-check ... -->`` (e.g. an estimator a page defines, run through storch.testing).
- ``<!-- excerpt: PATH -->`` right before a block marks it as taken from PATH (abridged); the
  test checks PATH exists and holds the names the block defines and calls. PATH runs elsewhere
  (a test of it, or the tutorial tests).
- ```bash blocks: every command is checked without running it: ``python3 tasks.py VERB`` (VERB
  exists), ``storch-compare ARGS`` (the CLI accepts ARGS), ``python/torchrun FILE ARGS`` (FILE
  exists), ``pip install -e PATH`` (PATH exists).
- ```text blocks (and bare ``` blocks that do not parse as Python) are output or diagrams shown
  to the reader, not code; a bare block of Python must be tagged.
"""

from __future__ import annotations

import ast
import re
import shlex
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", re.S | re.M)
MARKER = re.compile(r"<!--\s*(excerpt|test-setup)(?::\s*(\S+))?\s*(.*?)-->\s*$", re.S)
SETUP = re.compile(r"<!--\s*test-(?:setup|check)\s*\n(.*?)-->", re.S)


def blocks(page: Path):
    """(kind, lang, code, line, excerpt path) in page order; kind: 'block' or 'setup'."""
    text = page.read_text(encoding="utf-8")
    found = []
    for m in SETUP.finditer(text):
        found.append((m.start(), "setup", "python", m.group(1), None))
    for m in FENCE.finditer(text):
        before = text[:m.start()].rstrip()
        excerpt = None
        last = before.rsplit("\n", 1)[-1]
        em = re.fullmatch(r"<!--\s*excerpt:\s*(\S+)\s*-->", last.strip())
        if em:
            excerpt = em.group(1)
        found.append((m.start(), "block", m.group(1), m.group(2), excerpt))
    found.sort(key=lambda item: item[0])
    return [(kind, lang, code, text.count("\n", 0, pos) + 1, excerpt) for pos, kind, lang, code, excerpt in found]


def _names(code: str) -> set[str]:
    """Functions and classes the block defines, and the attribute names it calls."""
    try:
        tree = ast.parse(code)
    except SyntaxError:
        # a signature excerpt (``f(a, *, b=1) -> R``): the called name
        return {m.group(1) for m in re.finditer(r"(\w+)\(", code.split("\n", 1)[0])}
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
    return names


def _looks_like_python(code: str) -> bool:
    """A bare fence that parses as Python statements (not just names) is code: it needs a tag."""
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return False
    return any(not isinstance(node, ast.Expr) or not isinstance(node.value, (ast.Name, ast.Constant))
               for node in tree.body)


def _check_signature(code: str, where: str) -> None:
    """A block that shows a storch.testing signature (``kit.f(a, *, b=1) -> R``) lists its parameters."""
    m = re.match(r"kit\.(\w+)\(", code)
    if not m:
        return
    import inspect

    import storch.testing

    inside, depth = "", 0
    for ch in code[m.end():]:
        if ch == ")" and depth == 0:
            break
        depth += ch in "([{"
        depth -= ch in ")]}"
        inside += ch
    shown = [part.split("=")[0].strip() for part in re.split(r",(?![^(\[]*[)\]])", inside)]
    shown = [name for name in shown if name and name != "*"]
    actual = [name for name in inspect.signature(getattr(storch.testing, m.group(1))).parameters]
    assert shown == actual, f"{where}: kit.{m.group(1)} shows parameters {shown}, the function has {actual}"


def _check_command(line: str) -> None:
    words = shlex.split(line, comments=True)
    if not words:
        return
    prog, args = words[0], words[1:]
    if prog in ("python", "python3") and args and args[0] == "tasks.py":
        sys.path.insert(0, str(ROOT))
        import tasks

        assert args[1] in tasks.VERBS, f"tasks.py has no verb {args[1]!r}"
    elif prog in ("python", "python3", "torchrun"):
        script = next(a for a in args if a.endswith(".py"))
        assert (ROOT / script).is_file(), f"{script} does not exist"
    elif prog == "storch-compare":
        pytest.importorskip("storch_bench")
        from storch_bench import cli

        argv = args if args and (args[0] in cli.COMMANDS or args[0] in ("-h", "--help")) else ["vae", *args]
        cli._parser().parse_args(argv)  # exits (SystemExit) on an option the CLI does not have
    elif prog == "pip" and args[:1] == ["install"]:
        for a in args[1:]:
            if a.startswith((".", "packages/", "benchmarks", "examples/")):
                assert (ROOT / a.lstrip("./")).exists(), f"pip install {a}: no such path"
    else:
        raise AssertionError(f"unknown command in a bash block: {line!r} (teach tests/docs/test_code_blocks.py)")


PAGE_IDS = [p.relative_to(ROOT).as_posix() for p in PAGES]


@pytest.mark.parametrize("page", PAGES, ids=PAGE_IDS)
def test_page_code_blocks(page: Path, monkeypatch, tmp_path) -> None:
    import torch

    import storch

    monkeypatch.chdir(ROOT)
    torch.manual_seed(0)
    storch.reset()
    module = types.ModuleType("docs_page_" + re.sub(r"\W", "_", page.stem))
    monkeypatch.setitem(sys.modules, module.__name__, module)  # dataclasses look their module up
    namespace = module.__dict__
    try:
        for kind, lang, code, line, excerpt in blocks(page):
            where = f"{page.relative_to(ROOT)}:{line}"
            if excerpt is not None:
                path = ROOT / excerpt
                assert path.is_file(), f"{where}: excerpt of {excerpt}, which does not exist"
                source = path.read_text(encoding="utf-8")
                for name in _names(code):
                    assert re.search(rf"\b{name}\b", source), f"{where}: {name!r} is not in {excerpt}"
                _check_signature(code, where)
            elif lang == "python":
                try:
                    exec(compile(code, where, "exec"), namespace)
                except Exception as e:
                    raise AssertionError(f"{where}: the {kind} block failed: {type(e).__name__}: {e}") from e
            elif lang == "bash":
                for cmd in code.splitlines():
                    _check_command(cmd)
            elif lang in ("text", "console"):
                pass  # output shown to the reader
            elif lang == "" and not _looks_like_python(code):
                pass  # a diagram or output in a bare fence
            else:
                raise AssertionError(f"{where}: a ```{lang} block that is neither run nor marked "
                                     "<!-- excerpt: PATH --> (tests/docs/test_code_blocks.py)")
    finally:
        storch.reset()


def test_count() -> None:
    """The numbers the closing note of issue 21 reports (printed with -s)."""
    run = excerpts = setup = shown = checked = 0
    listed = []
    for page in PAGES:
        for kind, lang, code, line, excerpt in blocks(page):
            if kind == "setup":
                setup += 1
            elif excerpt is not None:
                excerpts += 1
                listed.append(f"{page.relative_to(ROOT)}:{line} <- {excerpt}")
            elif lang == "python":
                run += 1
            elif lang == "bash":
                checked += 1
            else:
                shown += 1
    print(f"\n{run} python blocks run, {checked} bash blocks checked, {shown} output blocks, "
          f"{setup} hidden test-setup/test-check blocks, {excerpts} excerpts:\n  " + "\n  ".join(listed))
    assert run > 0
