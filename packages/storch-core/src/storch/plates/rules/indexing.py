"""Indexing plate tensors: per-sample indices, and sampled (plate) tensors as indices.

``x[i]`` addresses the per-sample dims; a PlateTensor index ``x[z]`` selects, per plate entry,
with that entry's index (the plates of ``x`` and ``z`` are aligned by name). Boolean masks that
vary per sample would select different numbers of elements and are refused.
"""

from __future__ import annotations

import torch

from ...errors import PlateError
from ..kit import register, wrap_same
from .shape import _full
from ..tensor import PlateTensor, align, union_plates

_PT = PlateTensor
_T = torch.Tensor


def _index_tuple(idx):
    return idx if isinstance(idx, tuple) else (idx,)


def _raw_index(x, idx):
    """The raw index for per-sample index ``idx`` into plate tensor ``x`` (and the result plates)."""
    idx = _index_tuple(idx)
    pts = [i for i in idx if type(i) is _PT]
    if not pts:
        adv = [j for j, i in enumerate(idx) if isinstance(i, (_T, list))]
        if adv and adv != list(range(adv[0], adv[0] + len(adv))) and len(x._plates):
            raise PlateError("non-adjacent tensor indices would move plate dims; index in two steps")
        return (slice(None),) * len(x._plates) + idx, x._plates
    if type(idx[0]) is not _PT or any(type(i) is _PT for i in idx[1:]):
        raise PlateError(
            "a PlateTensor used as an index must be the first index (x[z] or x[z, ...]); move the "
            "indexed dim to the front first (e.g. with movedim)"
        )
    z = idx[0]
    if z._raw.dtype == torch.bool:
        raise PlateError(
            "boolean masks that vary per sample select a different number of elements per sample; "
            "use torch.where(mask, x, other) instead"
        )
    xp = x._plates if type(x) is _PT else ()
    plates = union_plates([xp, z._plates])
    m = len(plates)
    raw_z = align(z._raw, z._plates, plates)
    if type(x) is not _PT:  # a plain tensor indexed per plate entry: no plate dims to index
        return (raw_z,) + idx[1:], plates
    e = raw_z.dim() - m
    ar = tuple(
        torch.arange(p.size, device=raw_z.device).view((1,) * j + (p.size,) + (1,) * (m - j - 1 + e))
        for j, p in enumerate(plates)
    )
    return ar + (raw_z,) + idx[1:], plates


@register(_T.__getitem__)
def _getitem(func, args, kwargs):
    """indexing addresses per-sample dims; a plate-tensor index (e.g. a sampled index) selects per plate entry"""
    x, idx = args
    raw_idx, plates = _raw_index(x, idx)
    src = _full(x, plates) if type(x) is _PT and plates != x._plates else (x._raw if type(x) is _PT else x)
    return wrap_same(src[raw_idx], plates)  # the plate dims are indexed by full slices / aranges


@register(_T.__setitem__)
def _setitem(func, args, kwargs):
    """assignment into per-sample dims; the written tensor must already carry every plate of the value"""
    x, idx, value = args
    if type(x) is not _PT:
        raise PlateError("cannot assign per-sample values into a plain tensor; build a new tensor instead")
    n = len(x._plates)
    t = _index_tuple(idx)
    if len(t) == 1 and type(t[0]) is _PT and t[0].dtype == torch.bool:
        mask = align(t[0]._raw, t[0]._plates, x._plates).expand(x._raw.shape)
        if type(value) is _PT:
            value = align(value._raw, value._plates, x._plates).expand(x._raw.shape)[mask]
        x._raw[mask] = value
        return None
    raw_idx, plates = _raw_index(x, idx)
    if plates != x._plates:
        raise PlateError("the index varies over plates the indexed tensor does not have")
    if type(value) is _PT:
        target = x._raw[raw_idx]
        value = align(value._raw, value._plates, x._plates, target.dim() - n)
    x._raw[raw_idx] = value
    return None
