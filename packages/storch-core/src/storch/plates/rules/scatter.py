"""Scatter-like functions that torch's vmap runs one plate entry at a time: rules that run them batched.

torch has no batching rule for ``index_reduce``, ``nonzero_static`` or the in-place ``scatter_`` and
``index_reduce_``: its vmap
fallback loops over the plate entries (with a performance warning) and stacks the results. Each has a
batched form with the same values per sample:

- ``x.index_reduce(d, i, src, reduce, include_self=...)`` is ``x.scatter_reduce(d, I, src, reduce,
  include_self=...)`` with ``I`` the index placed at ``d`` and expanded to ``src``'s shape (as ``index_add``
  is a ``scatter_add``: ``rules.indexing``); with ``reduce="prod"`` and a gradient to take, a segmented product
  (below), because torch's derivative of a product reduction refuses to be differentiated again where two or
  more zeros meet at one position (``Double backward is unsupported for source when >1 zeros ...``), which a
  sampled mask times values (``b * w``) makes at once;
- ``torch.nonzero_static(x, size=S, fill_value=f)``: the positions of the nonzero elements in row-major order
  are a stable sort of the flat positions by "is zero", the first ``S`` of them unravelled, the rest ``f``;
- ``x.scatter_(...)`` and ``x.index_reduce_(...)`` into a per-sample buffer (a plate tensor that carries the
  written values' plates): the out-of-place ``scatter`` or ``index_reduce`` written into ``x`` (as
  ``index_fill_``'s sampled value is).
"""

from __future__ import annotations

import torch

from ..kit import register, wrap_same
from ..tensor import PlateTensor, align, union_plates
from .pointwise import broadcast, write_in_place
from .vmap import check_in_range, vmap_call

_PT = PlateTensor
_T = torch.Tensor

_REDUCES = ("prod", "mean", "amax", "amin")


@register(torch.index_reduce, _T.index_reduce)
def _index_reduce(func, args, kwargs):
    """per sample; a scatter_reduce of the index placed at dim (a segmented product where a gradient of prod is taken)

    (torch's vmap of index_reduce loops over the plate entries.) The values are scatter_reduce's, which reduces
    as index_reduce does (the same modes; ``include_self`` counts ``x`` in the mean as index_reduce does); the
    segmented product (:func:`_segment_prod`) is exact at every derivative order."""
    names = ("input", "dim", "index", "source", "reduce")
    b = dict(zip(names, args))
    b.update(("input" if k == "self" else k, v) for k, v in kwargs.items())
    x, d, i, src, reduce = (b.get(k) for k in names)
    include_self = b.get("include_self", True)
    if (len(args) > 5 or set(b) - set(names) - {"include_self"} or not isinstance(d, int)
            or not all(isinstance(t, _T) for t in (x, i, src)) or reduce not in _REDUCES
            or type(include_self) is not bool or i.dim() != 1 or i.dtype != torch.long or src.dim() == 0
            or src.dim() != x.dim() or src.dtype != x.dtype or x.dtype is torch.bool):
        # (torch's own checks and errors, per sample; torch has no bool index_reduce, where scatter_reduce would
        # give values)
        return vmap_call(func, args, kwargs)
    k = src.dim()
    if not -k <= d < k:
        raise IndexError(f"Dimension out of range (expected to be in range of [{-k}, {k - 1}], but got {d})")
    d %= k
    if x.shape[:d] != src.shape[:d] or x.shape[d + 1:] != src.shape[d + 1:] or src.shape[d] != i.shape[0]:
        return vmap_call(func, args, kwargs)  # torch's own error per sample
    raw = i._raw if type(i) is _PT else i
    # torch's IndexError (scatter_reduce's would be a RuntimeError, in the raw dims); under storch.compile, at every call
    check_in_range((raw < 0) | (raw >= x.shape[d]), lambda v: f"index_reduce: index {'(sampled)' if v is None else v} "
                   f"is out of range for dimension {d} of size {x.shape[d]} (index_reduce takes no negative indices)",
                   raw)
    place = [1] * k
    place[d] = i.shape[0]
    index = i.reshape(place).expand(src.shape)
    if reduce == "prod" and torch.is_grad_enabled() and (x.requires_grad or src.requires_grad):
        out = _segment_prod(x, d, index, src, include_self)
        # its plates in the order of the operands' (scatter_reduce's, torch's loop's): the segmented product's
        # gathers put src's first, and .tensor's leading dims would follow whether a gradient is taken
        plates = union_plates([t._plates for t in (x, index, src) if type(t) is _PT])
        if type(out) is _PT and out._plates != plates:
            out = wrap_same(align(out._raw, out._plates, plates), plates)
        return out
    return torch.scatter_reduce(x, d, index, src, reduce, include_self=include_self)


def _segment_prod(x, d: int, index, src, include_self: bool):
    """``x.scatter_reduce(d, index, src, "prod", include_self=...)`` from multiplications, gathers, ``where`` and a
    ``scatter_add``, whose derivatives of every order autograd has (torch's product reduction has none past the
    first where two zeros meet at one position).

    The entries are sorted by their index along ``d`` (stably), so each position's entries form one segment;
    an inclusive scan of products that stops at segment starts (Hillis and Steele's doubling: ⌈log2 L⌉ steps of
    ``L`` products) leaves each segment's product at its last entry, which a ``scatter_add`` puts at its
    position. The products are the same numbers multiplied in another order (equal up to rounding)."""
    order = index.argsort(dim=d, stable=True)
    seg = index.gather(d, order)
    val = src.gather(d, order)
    n = src.shape[d]
    step = 1
    while step < n:
        before = torch.cat((torch.ones_like(val.narrow(d, 0, step)), val.narrow(d, 0, n - step)), d)
        same = torch.cat((torch.zeros_like(seg.narrow(d, 0, step), dtype=torch.bool),
                          seg.narrow(d, step, n - step) == seg.narrow(d, 0, n - step)), d)
        val = val * torch.where(same, before, torch.ones_like(before))
        step *= 2
    last = torch.cat((seg.narrow(d, 1, n - 1) != seg.narrow(d, 0, n - 1),
                      torch.ones_like(seg.narrow(d, 0, 1), dtype=torch.bool)), d) if n else seg.bool()
    total = torch.zeros_like(x).scatter_add(d, seg, torch.where(last, val, torch.zeros_like(val)))
    hit = torch.zeros_like(x, dtype=torch.bool).scatter(d, seg, True)
    return torch.where(hit, total * x if include_self else total, x)


@register(torch.nonzero_static, _T.nonzero_static)
def _nonzero_static(func, args, kwargs):
    """per sample; the first size positions of a stable sort by "is zero", unravelled, padded with fill_value

    (torch's vmap of nonzero_static loops over the plate entries.) Integer operations only: the same
    positions, in the same (row-major) order, as torch gives each sample."""
    b = dict(zip(("input",), args))
    b.update(("input" if k == "self" else k, v) for k, v in kwargs.items())
    x, size, fill = b.get("input"), b.get("size"), b.get("fill_value", -1)
    if (len(args) != 1 or set(b) - {"input", "size", "fill_value"} or type(x) is not _PT or type(size) is not int
            or size < 0 or type(fill) is not int or x.dim() == 0):
        return vmap_call(func, args, kwargs)  # (torch's own checks and errors, per sample)
    m = len(x._plates)
    raw = x._raw
    flat = raw.reshape(raw.shape[:m] + (-1,))
    n = flat.shape[-1]
    # the nonzero positions first, each group in its own order (a stable sort of 0 = nonzero, 1 = zero)
    order = (flat == 0).to(torch.uint8).argsort(dim=-1, stable=True)
    found = (flat != 0).sum(-1, keepdim=True)
    if size > n:
        order = torch.cat((order, order.new_zeros(order.shape[:-1] + (size - n,))), -1)
    pos = order[..., :size]
    coords = torch.stack(torch.unravel_index(pos, tuple(x.shape)), -1) if n else pos.new_zeros(
        pos.shape + (x.dim(),))
    keep = (torch.arange(size, device=raw.device) < found).unsqueeze(-1)
    out = torch.where(keep, coords, torch.full((), fill, dtype=coords.dtype, device=raw.device))
    return wrap_same(out, x._plates)


_WRITE_SCATTER = write_in_place("scatter_")


@register(_T.scatter_)
def _scatter_inplace(func, args, kwargs):
    """per sample; the out-of-place scatter (torch's batching rule) written into the per-sample buffer

    (torch's vmap of the in-place ``scatter_`` loops over the plate entries.) ``x`` must carry every plate of
    the written values (pointwise's in-place checks); the write is a copy of ``scatter``'s result, whose
    derivatives are those of the in-place scatter."""
    x = args[0] if args else kwargs.get("self")
    if type(x) is not _PT or (not args and "self" not in kwargs):
        return vmap_call(func, args, kwargs)
    rest = {k: v for k, v in kwargs.items() if k != "self"}
    out = torch.scatter(x, *args[1:], **rest)
    return broadcast(_WRITE_SCATTER, (x, out), {})


_WRITE_INDEX_REDUCE = write_in_place("index_reduce_")


@register(_T.index_reduce_)
def _index_reduce_inplace(func, args, kwargs):
    """per sample; the out-of-place index_reduce (the rule above) written into the per-sample buffer

    (torch's vmap of the in-place ``index_reduce_`` loops over the plate entries.) ``x`` must carry every plate
    of the written values (pointwise's in-place checks); the write is a copy of ``index_reduce``'s result (which
    reads ``x`` where ``include_self``), so the derivatives are those of the in-place reduction, at every order
    for ``prod`` too (the segmented product)."""
    x = args[0] if args else kwargs.get("self")
    if type(x) is not _PT or (not args and "self" not in kwargs):
        return vmap_call(func, args, kwargs)
    rest = {k: v for k, v in kwargs.items() if k != "self"}
    src = args[3] if len(args) > 3 else rest.get("source")
    if torch.is_grad_enabled() and (x.requires_grad or (isinstance(src, _T) and src.requires_grad)):
        # the reduction's derivative may read x (a product, amax's ties, the mean's count with include_self):
        # it reads a copy, since the write below changes x (autograd's "modified by an inplace operation")
        x_read = x.clone()
    else:
        x_read = x
    out = _index_reduce(_T.index_reduce, (x_read,) + tuple(args[1:]), rest)
    return broadcast(_WRITE_INDEX_REDUCE, (x, out), {})
