"""Probes for the fast-path tests (issue 19): which functions a call ran, and the autograd graph it built.

Shared by tests/core and tests/score (each tox environment runs one of them; ``tests/conftest.py``
puts this folder on ``sys.path``).
"""

from __future__ import annotations

import sys
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


def hooked(module, fn) -> tuple[object, int]:
    """``fn()`` with a forward hook on ``module`` (its calls then take ``nn.Module.__call__``, the general path: the
    control of a fast-path test), and how many calls the hook heard."""
    heard: list = []
    handle = module.register_forward_hook(lambda m, i, o: heard.append(1))
    try:
        return fn(), len(heard)
    finally:
        handle.remove()


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


class Allocations(TorchDispatchMode):
    """What a block of torch calls allocates, counted, not timed (for tests that a path builds no large tensor):
    the operations run (``names``), the most elements of any tensor one returns (``largest``) and the most
    elements of any storage one returns (``largest_storage``: an expanded view counts as its storage)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest, self.largest_storage, self.names = 0, 0, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.names.add(func.overloadpacket.__name__)
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
                if t.layout == torch.strided:
                    self.largest_storage = max(self.largest_storage, t.untyped_storage().nbytes() // t.element_size())
        return out
