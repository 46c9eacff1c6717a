"""A generated block of a page between two HTML-comment markers: read it, or write it anew."""

from __future__ import annotations

from pathlib import Path
from typing import Optional


def between(path: Path, start: str, end: str) -> Optional[str]:
    """The text between the markers (stripped), or ``None`` when the page lacks them."""
    text = path.read_text(encoding="utf-8")
    try:
        return text[text.index(start) + len(start):text.index(end)].strip()
    except ValueError:
        return None


def write_between(path: Path, start: str, end: str, body: str) -> None:
    """Replace what lies between the markers by ``body`` (a newline after the start marker)."""
    text = path.read_text(encoding="utf-8")
    i, j = text.index(start) + len(start), text.index(end)
    path.write_text(text[:i] + "\n" + body + text[j:], encoding="utf-8")
