"""The generic treatment: ``torch.func.vmap`` over the plate dims of the raw storage.

A function that is neither pointwise, nor handled, nor batch-first is run per plate entry by
PyTorch's own batching rules: each PlateTensor operand is aligned to the union of the plates,
its broadcast (size-1) plate dims are not mapped, plain operands are not mapped at all, and
random functions draw independently per entry (``randomness="different"``). Every output gets
the plates as leading dims.
"""

from __future__ import annotations

import math

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from ...errors import PlateError
from ..kit import _is_inplace
from ..tensor import PlateTensor, _names, align, map_tensors, union_plates
from ..tensor import new_plate_tensor as _new
from ..treatments import describe

__all__ = ["vmap_call"]

_PT = PlateTensor


def vmap_call(func, args, kwargs):
    """Run ``func`` once per plate entry with ``torch.func.vmap`` (one level per mapped plate)."""
    leaves, spec = tree_flatten((args, kwargs))
    pos = [i for i, a in enumerate(leaves) if type(a) is _PT]
    plates = union_plates([leaves[i]._plates for i in pos])
    m = len(plates)
    sizes = tuple(p.size for p in plates)
    raws, mapped = [], []
    for i in pos:
        x = leaves[i]
        r = align(x._raw, x._plates, plates)
        mk = tuple(r.shape[j] == sizes[j] for j in range(m))
        drop = tuple(j for j in range(m) if not mk[j])
        if drop:
            r = r.squeeze(drop)
        raws.append(r)
        mapped.append(mk)
    levels = [j for j in range(m) if any(mk[j] for mk in mapped)]
    inplace = _is_inplace(func)
    if inplace and (type(args[0]) is not _PT or not all(mapped[0][j] for j in levels)):
        raise PlateError(
            f"in-place {describe(func)} would write values that vary over plates {_names(plates)} into a "
            "tensor that does not vary over all of them; use the out-of-place version"
        )

    def call(*rs):
        ls = list(leaves)
        for i, r in zip(pos, rs):
            ls[i] = r
        a, k = tree_unflatten(ls, spec)
        return func(*a, **k)

    full = all(all(mk[j] for j in levels) for mk in mapped)
    try:
        out = _vmap(call, raws, mapped, levels, sizes, full, inplace)
    except RuntimeError as e:
        if inplace or "Batching rule not implemented" not in str(e):
            raise
        # torch has no batching rule (and no fallback) for this operator: one call per entry
        out = _loop(call, raws, mapped, levels, sizes, func)
    if inplace:
        return args[0]
    missing = [j for j in range(m) if j not in levels]
    if missing:
        def expand(o):
            for j in missing:
                o = o.unsqueeze(j)
            return o

        out = map_tensors(out, expand)
    return map_tensors(out, lambda o: _new(o, plates))


def _loop(call, raws, mapped, levels, sizes, func):
    """Per plate entry, one call; the outputs stacked (for operators without a batching rule)."""
    import itertools

    outs = []
    for idx in itertools.product(*[range(sizes[j]) for j in levels]):
        entry = []
        for r, mk in zip(raws, mapped):
            sel = tuple(i for i, j in zip(idx, levels) if mk[j])
            entry.append(r[sel] if sel else r)
        outs.append(call(*entry))
    flat = [tree_flatten(o) for o in outs]
    spec = flat[0][1]
    leaves = []
    for k, first in enumerate(flat[0][0]):
        if not isinstance(first, torch.Tensor):
            raise PlateError(f"{describe(func)} returns a {type(first).__name__}, not a tensor, per plate entry")
        items = [f[0][k] for f in flat]
        if any(t.shape != first.shape for t in items):
            raise PlateError(
                f"{describe(func)} returns tensors of different shapes for different plate entries "
                f"({tuple(first.shape)} and others); a plate tensor needs one per-sample shape"
            )
        st = torch.stack(items)
        leaves.append(st.reshape(tuple(sizes[j] for j in levels) + first.shape))
    return tree_unflatten(leaves, spec)


def _vmap(call, raws, mapped, levels, sizes, full, inplace):
    if full and len(levels) > 1 and not inplace:
        # one vmap over the flattened plates (cheaper than nested levels)
        lead = tuple(sizes[j] for j in levels)
        n = math.prod(lead)
        flat = [r.reshape((n,) + r.shape[len(levels):]) for r in raws]
        out = torch.func.vmap(call, randomness="different")(*flat)
        return map_tensors(out, lambda o: o.reshape(lead + o.shape[1:]))
    f = call
    for j in reversed(levels):
        f = torch.func.vmap(f, in_dims=tuple(0 if mk[j] else None for mk in mapped), randomness="different")
    return f(*raws)
