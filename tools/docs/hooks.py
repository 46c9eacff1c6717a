"""MkDocs hooks for storch's documentation site (mkdocs.yml: ``hooks:``).

- The README is the home page (``index.md``); its links into ``docs/`` become site links.
- A link to a repository file outside ``docs/`` (an example script, an example's README) becomes a
  link to a generated page that shows that file, so every link resolves in the site and strict
  mode catches the broken ones.
- ``<!-- tutorial: examples/tutorials/NAME.py -->`` in a page is replaced by the script, the output
  it printed and the figure it drew. The scripts are run here with their small defaults, unless
  tests/docs/test_tutorials.py has just run them (its output in build/docs/tutorials/ is newer than
  every Python file of the repository).
- ``<!-- estimator-table -->`` becomes the table of first-party estimators, from the registry.
- A page of docs/ that mkdocs.yml's nav does not list is added to the guides (so a new page is
  never left out).
- The build fails (beyond mkdocs' strict mode) on a public name without a docstring or on no
  page of the reference (tools/docs/public_api.py), and on a first-party estimator without a
  page in docs/estimators/.
"""

from __future__ import annotations

import os
import posixpath
import re
import sys
from pathlib import Path

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
REPO_PAGES = "source"  # generated pages for repository files outside docs/
LINK = re.compile(r"(!?\[[^\]]*\]\()([^)\s]+)(\))")
TUTORIAL = re.compile(r"<!-- tutorial: (\S+) -->")

sys.path.insert(0, str(Path(__file__).resolve().parent))
import public_api  # noqa: E402
import tutorials  # noqa: E402

# src_uri of each page -> the repository directory its relative links start from
_origin: dict[str, Path] = {}
# repository path (relative, posix) -> src_uri of the generated page that shows it
_repo_pages: dict[str, str] = {}


def _nav_files(nav) -> set[str]:
    found: set[str] = set()
    for entry in nav:
        value = next(iter(entry.values())) if isinstance(entry, dict) else entry
        if isinstance(value, list):
            found |= _nav_files(value)
        elif isinstance(value, str):
            found.add(value)
    return found


def on_config(config):
    # a page added to docs/ without a nav entry (another branch's new guide) joins the guides
    listed = _nav_files(config["nav"])
    for path in sorted(DOCS.rglob("*.md")):
        rel = path.relative_to(DOCS).as_posix()
        if rel not in listed:
            title = path.read_text(encoding="utf-8").lstrip().splitlines()[0].lstrip("# ").strip("`")
            for section in config["nav"]:
                if isinstance(section, dict) and "Guides" in section:
                    section["Guides"].append({title: rel})
    return config


def on_pre_build(config) -> None:
    missing = public_api.missing_docstrings()
    if missing:
        raise PluginError("public names without a docstring (add one; tools/docs/public_api.py):\n  "
                          + "\n  ".join(missing))
    pages = [p.read_text(encoding="utf-8") for p in DOCS.rglob("*.md")]
    unlisted = public_api.unreferenced(pages)
    if unlisted:
        raise PluginError("public names on no page of the API reference (add `::: NAME` to a page of "
                          "docs/reference/ or docs/estimators/):\n  " + "\n  ".join(unlisted))


def _links(markdown: str):
    for m in LINK.finditer(markdown):
        target = m.group(2)
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            continue
        yield m, target


def _outside_target(base: Path, target: str) -> str | None:
    """The repository path a relative link points at when it leaves docs/, else None."""
    path = target.split("#", 1)[0]
    if not path:
        return None
    resolved = Path(os.path.normpath(base / path))
    try:
        resolved.relative_to(DOCS)
        return None
    except ValueError:
        pass
    try:
        rel = resolved.relative_to(ROOT).as_posix()
    except ValueError:
        return None
    if resolved.is_dir() and (resolved / "README.md").exists():
        rel += "/README.md"
    return rel if (ROOT / rel).is_file() else None


def _repo_page(config, files: Files, rel: str, pending: list[str]) -> None:
    if rel in _repo_pages:
        return
    if rel == "README.md":
        _repo_pages[rel] = "index.md"  # the home page
        return
    if Path(rel).suffix.lower() in (".png", ".svg", ".jpg", ".jpeg", ".gif"):
        src_uri = f"{REPO_PAGES}/{rel}"  # an image: copied as it is
        files.append(File.generated(config, src_uri, abs_src_path=str(ROOT / rel)))
        _repo_pages[rel] = src_uri
        return
    src_uri = f"{REPO_PAGES}/{rel}" + ("" if rel.endswith(".md") else ".md")
    text = (ROOT / rel).read_text(encoding="utf-8")
    if rel.endswith(".md"):
        content = text
    else:
        lang = {".py": "python", ".toml": "toml", ".cfg": "ini", ".ini": "ini"}.get(Path(rel).suffix, "text")
        content = f"# `{rel}`\n\n```{lang}\n{text.rstrip()}\n```\n"
        # a python file's code is shown whole, its links are not followed
    files.append(File.generated(config, src_uri, content=content))
    _repo_pages[rel] = src_uri
    _origin[src_uri] = (ROOT / rel).parent
    if rel.endswith(".md"):
        pending.append(src_uri)


def on_files(files: Files, config) -> Files:
    _origin.clear()
    _repo_pages.clear()
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    files.append(File.generated(config, "index.md", content=readme))
    _origin["index.md"] = ROOT
    for f in files.documentation_pages():
        _origin.setdefault(f.src_uri, (DOCS / f.src_uri).parent)

    # tutorials: run (or reuse the test run's output) and add their figures
    for f in list(files.documentation_pages()):
        if f.generated_by:
            continue
        for rel in TUTORIAL.findall(Path(f.abs_src_path).read_text(encoding="utf-8")):
            result = tutorials.result(rel)
            if result.figure is not None:
                files.append(File.generated(config, tutorials.figure_uri(rel),
                                            abs_src_path=str(result.figure)))

    # repository files outside docs/ that pages link to (followed through generated READMEs)
    pending = [f.src_uri for f in files.documentation_pages()]
    while pending:
        src_uri = pending.pop()
        f = files.get_file_from_path(src_uri)
        text = f.content_string
        for _, target in _links(text):
            rel = _outside_target(_origin[src_uri], target)
            if rel is not None:
                _repo_page(config, files, rel, pending)
        for rel in TUTORIAL.findall(text):
            _repo_page(config, files, rel, pending)
    return files


def _rewrite_link(src_uri: str, target: str) -> str:
    base = _origin.get(src_uri)
    if base is None:
        return target
    path, _, anchor = target.partition("#")
    rel = _outside_target(base, target)
    if rel is not None and rel in _repo_pages:
        dest = _repo_pages[rel]
    elif base != (DOCS / src_uri).parent and path:
        # a page generated from elsewhere (README, a repository page): its links into docs/
        resolved = Path(os.path.normpath(base / path))
        try:
            dest = resolved.relative_to(DOCS).as_posix()
        except ValueError:
            return target  # left as written: mkdocs reports it if it is broken
        if resolved.is_dir() and (resolved / "README.md").exists():
            dest += "/README.md"
    else:
        return target
    new = posixpath.relpath(dest, posixpath.dirname(src_uri) or ".")
    return new + ("#" + anchor if anchor else "")


def on_page_markdown(markdown: str, page, config, files) -> str:
    src_uri = page.file.src_uri
    if src_uri == public_api.ESTIMATOR_PAGE:
        stale = public_api.estimator_table_problem()
        if stale:
            raise PluginError(stale)
    if src_uri == public_api.PARTITIONS_PAGE:
        stale = public_api.partition_list_problem()
        if stale:
            raise PluginError(stale)

    def tutorial(m: re.Match) -> str:
        rel = m.group(1)
        result = tutorials.result(rel)
        parts = [f"The whole script, [`{rel}`]({posixpath.relpath(_repo_pages[rel], posixpath.dirname(src_uri))}),"
                 f" run with its defaults in {result.seconds:.0f} s when this site was built:",
                 f"```python\n{(ROOT / rel).read_text(encoding='utf-8').rstrip()}\n```",
                 "It printed:", f"```text\n{result.output.rstrip()}\n```"]
        if result.figure is not None:
            fig = posixpath.relpath(tutorials.figure_uri(rel), posixpath.dirname(src_uri))
            parts.append(f"![the figure {Path(rel).name} drew]({fig})")
        return "\n\n".join(parts)

    markdown = TUTORIAL.sub(tutorial, markdown)
    return LINK.sub(lambda m: m.group(1) + _rewrite_link(src_uri, m.group(2)) + m.group(3)
                    if not re.match(r"^[a-z]+:|^#", m.group(2)) else m.group(0), markdown)


def on_nav(nav, config, files):
    in_nav = {page.file.src_uri for page in nav.pages}
    missing = [f.src_uri for f in files.documentation_pages()
               if not f.generated_by and f.src_uri not in in_nav]
    if missing:
        raise PluginError("pages in docs/ that mkdocs.yml's nav does not list: " + ", ".join(missing))
    return nav


def on_page_content(html: str, page, config, files) -> str:
    # docstrings written for Sphinx use :class:`X` / :func:`X`: show the name as code, not the role
    return re.sub(r":(?:class|func|meth|attr|mod|data|exc|obj):(<code>)", r"\1", html)
