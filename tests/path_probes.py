"""Probes for the fast-path tests (issue 19): which functions a call ran, and the autograd graph it built.

Shared by tests/core and tests/score (each tox environment runs one of them; ``tests/conftest.py``
puts this folder on ``sys.path``).
"""

from __future__ import annotations

import sys
from collections import Counter

import torch


def calls(fn) -> tuple[object, set]:
    """``fn()`` and the names of the Python and builtin functions it called."""
    seen: set = set()

    def probe(frame, event, arg):
        if event == "call":
            seen.add(frame.f_code.co_name)
        elif event == "c_call":
            seen.add(getattr(arg, "__name__", ""))

    sys.setprofile(probe)
    try:
        out = fn()
    finally:
        sys.setprofile(None)
    return out, seen


def graph_ops(t: torch.Tensor) -> Counter:
    """The autograd nodes behind ``t``, by type (a multiset)."""
    out: Counter = Counter()
    seen, stack = set(), [t.grad_fn]
    while stack:
        f = stack.pop()
        if f is None or f in seen:
            continue
        seen.add(f)
        out[type(f).__name__] += 1
        stack.extend(g for g, _ in f.next_functions)
    return out
