"""Integer values read from a pathwise sample: the indices of ``argmax``, ``topk(...).indices``, ``l.long()``.

A pathwise estimator (reparameterization, gumbel_softmax, LAX) differentiates the cost through its sample. An
integer value computed from that sample (a cast, an argmax, the indices of ``max`` / ``topk`` / ``sort``,
``bucketize``) jumps where the sample crosses a threshold, and it has no autograd history: a cost that reads it
(``img[l.long()] + l ** 2``) gets the gradient of its smooth part alone, the jump's term is lost without a word
(found by porting: a gradient of 0.460 for 0.511, z = -10.5). The walk of the autograd graph
(:mod:`storch.conditions.smoothness`) cannot see it, so the value is marked here when it is made
(:func:`storch.estimators.watch._compare_watch` says which results), the mark follows every plate tensor computed
from it (the dispatcher: :func:`spread`), and the surrogate refuses a cost that carries it
(:func:`storch.surrogate.integer_reads._check_integer_reads`). A bool mask (``x > 0``) is not marked: a continuous
function selected by it (``torch.where(x > 0, x, 0)``) is unbiased at order 1; nor an integer cast of a bool or
integer value (``(x > 0).long()`` is such a mask; an integer computed from a mark is marked by spreading).
The indices of max / topk / sort of a REBAR or RELAX node's relaxed sample are marked too
(:func:`storch.estimators.watch._threshold_watch`: their other jumps are refused as thresholds already).

The marks are kept by the id of the plate tensor, with a weak reference: a mark goes with its tensor, or with the
graph of its node when that ends (:func:`forget`). While no mark is live (the common step), the dispatcher pays one
test of an empty dict per call.
"""

from __future__ import annotations

import threading
import weakref
from typing import Optional

import torch
from torch.distributions import Distribution, Transform

from .kit import _is_inplace, _operands

# id(plate tensor) -> (weak reference to it, the record: (weak reference to the node, the function's name, the
# operand's raw tensor, or None where it had no autograd graph))
MARKS: dict = {}


def _forget(key: int):
    def gone(_ref) -> None:
        MARKS.pop(key, None)
    return gone


def mark(t, record: tuple) -> None:
    """Mark the plate tensor ``t`` (or each plate tensor of a tuple or list ``t``) with ``record``."""
    if isinstance(t, (tuple, list)):
        for o in t:
            mark(o, record)
        return
    if not isinstance(t, torch.Tensor) or getattr(t, "_plates", None) is None:
        return
    key = id(t)
    old = MARKS.get(key)
    if old is not None and old[0]() is t:
        return
    MARKS[key] = (weakref.ref(t, _forget(key)), record)


def record_of(t) -> Optional[tuple]:
    """The record of the mark of ``t``, or None."""
    entry = MARKS.get(id(t))
    if entry is None or entry[0]() is not t:
        return None
    return entry[1]


def forget(nodes) -> None:
    """Drop the marks made by the watches of ``nodes`` (a graph's, at its end: ``Graph._close``), and those whose
    node is gone. Only a cost of the node's own graph can be refused for a mark, and a plate tensor of an ended graph
    is refused as stale wherever it is used, so a marked tensor kept alive after its step (a logger's list of
    argmaxes) no longer keeps every later step on the dispatcher's slower path (:func:`spread`: ~2 us a call)."""
    ids = {id(n) for n in nodes}
    for key, entry in list(MARKS.items()):
        node = entry[1][0]()
        if node is None or id(node) in ids:
            MARKS.pop(key, None)


_INNER = threading.local()


def spread(call, cls, func, types, args, kwargs):
    """``call(cls, func, types, args, kwargs)`` (the dispatcher, which calls this while marks are live and
    ``_INNER.on`` is not set): its results are marked
    with the record of a marked operand (one level into lists), and so is the tensor an in-place function or
    ``__setitem__`` writes. The calls the dispatcher makes inside it (a handler's) are not looked at: the outer
    call's results are what the user's code sees."""
    _INNER.on = True
    try:
        out = call(cls, func, types, args, kwargs)
    finally:
        _INNER.on = False
    record = None
    for a in _operands(args, kwargs or {}):
        if type(a) is not torch.Tensor and isinstance(a, torch.Tensor):
            record = record_of(a)
            if record is not None:
                break
    if record is not None:
        mark(out, record)
        if args and (func is torch.Tensor.__setitem__ or _is_inplace(func)):
            mark(args[0], record)
    return out


def marked_parameter(d, depth: int = 0, path: str = "") -> Optional[tuple]:
    """``(path, record)`` of the first marked plate tensor that the distribution ``d`` holds (its parameters, base
    distributions, components, transforms and their parts, lists and tuples of them), ``path`` naming it
    (``"Normal.loc"``, ``"Independent.base_dist.Categorical.logits"``), or None. Read by an estimator's call while a
    mark is live: a later node drawn from parameters computed from an integer value read from a pathwise sample
    (``Normal(img[x.long()], 1)``) keeps the record (``Node.integer_parameter``), since neither its sample nor the
    costs computed from it carry the mark (found by review: a gradient of 0.460 for 0.504, z = -12)."""
    where = f"{path}{type(d).__name__}."
    for k, v in vars(d).items():
        if k == "_cached_x_y":
            continue
        items = v if isinstance(v, (list, tuple)) else (v,)
        for i, item in enumerate(items):
            name = k if items is not v else f"{k}[{i}]"
            if isinstance(item, torch.Tensor):
                if getattr(item, "_plates", None) is not None:
                    record = record_of(item)
                    if record is not None:
                        return where + name, record
            elif depth < 8 and isinstance(item, (Distribution, Transform)):
                found = marked_parameter(item, depth + 1, f"{where}{name}.")
                if found is not None:
                    return found
    return None
