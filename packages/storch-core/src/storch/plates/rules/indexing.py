"""Indexing plate tensors: per-sample indices, and sampled (plate) tensors as indices anywhere.

``x[i]`` addresses the per-sample dims. Any index may be a PlateTensor (``Q[s, a]``, ``x[:, j]``,
``x[..., j]``, ``B[i, :, j]``, ``v[[0, 2], j]``): per plate entry, the result is what torch gives
for that entry's ``x`` and that entry's index values (the plates of ``x`` and of the indices are
aligned by name). The same holds for index assignment ``x[idx] = value`` into a plate tensor.

How: the plate dims are indexed by broadcast ``arange`` tensors, so they join torch's advanced
indices; torch then puts the broadcast block (plates, then the indices' per-sample broadcast
shape) first, and the block of per-sample index dims is moved to where torch puts it for one
sample (where the tensor indices are adjacent after removing ints: at their place; else first).

Boolean masks that vary per sample would select different numbers of elements and are refused
(except as the single index of an assignment, ``x[mask] = v``).

``torch.select(x, dim, i)`` with a sampled ``i`` is ``x[..., i]`` (at ``dim``); ``roll`` by a sampled
shift and ``repeat_interleave`` with sampled repeats are refused with what to write instead;
``select_scatter`` / ``slice_scatter`` at a sampled index or start are refused with the index write to use instead
(``index_copy`` at ``i + arange(k)``); ``index_add`` with a sampled index is a ``scatter_add`` (torch's vmap rule for it loops over the batch),
``index_fill`` with a sampled index or value a ``where`` of the positions it fills (torch's vmap of it fails,
or gives every entry one entry's value); ``index_select`` with a sampled index (0-dim or 1-d per sample) is a
``gather`` (vmap's rule read a batched 0-dim index as the whole table); in place, ``index_fill_`` with a
sampled value is the same ``where``, written into a tensor that carries the value's plates. ``bincount`` of a
sampled input is a ``scatter_add`` into one length for all samples (refused where torch's length, the
largest value + 1, differs between them).
"""

from __future__ import annotations

import operator

import torch

from ...errors import PlateError
from ..kit import dispatch, register, register_copy, wrap_same
from .shape import _dim_handler, _full
from .pointwise import broadcast, write_in_place
from .vmap import _recording, check_in_range, record_check, vmap_call
from ..tensor import PlateTensor, align, sampled_index_advice, union_plates, write_plates

_PT = PlateTensor
_T = torch.Tensor


def _index_tuple(idx):
    return idx if isinstance(idx, tuple) else (idx,)


def _is_tensor_index(i) -> bool:
    return isinstance(i, (_T, list))


def _simple(x, idx):
    """The fast path: no PlateTensor in the index, and tensor indices (if any) adjacent, so that
    full slices over the plate dims keep torch's placement of the advanced-index dims."""
    for i in idx:
        if type(i) is _PT or (isinstance(i, list) and any(type(v) is _PT for v in i)):
            return False
    adv = [j for j, i in enumerate(idx) if _is_tensor_index(i)]
    return not adv or adv == list(range(adv[0], adv[0] + len(adv)))


def _normalise(x, idx) -> list:
    """The per-sample index as a list: Ellipsis expanded into full slices, lists as tensors, plain
    boolean masks as their (long) nonzero indices (checked against the dims they cover, as torch does)."""
    items = []
    for i in idx:
        if isinstance(i, list):
            i = torch.stack([v if isinstance(v, _T) else torch.as_tensor(v) for v in i]) if any(
                isinstance(v, _T) for v in i) else torch.as_tensor(i, device=x.device)
        if isinstance(i, _T) and i.dtype in (torch.bool, torch.uint8):
            if type(i) is _PT:
                along = ", ".join(f"{q.name!r} ({'a data' if q.independent else 'a sample'} plate)" for q in i._plates)
                raise PlateError(
                    f"a boolean mask that varies per plate entry (along {along}) may select a different number of "
                    "elements per entry, which a plate tensor cannot hold; use torch.where(mask, x, other) instead "
                    "(or x[mask] = value as the only index of an assignment). A one-hot mask (a OneHotCategorical sample z.bool()) selects "
                    "one row: index with z.argmax(-1) (table[z.argmax(-1)]), or write z @ table")
            if i.dim() == 0:
                raise PlateError("a 0-dim boolean index on a plate tensor is not supported; use x.unsqueeze(0) "
                                 "or torch.where")
        items.append(i)
    n_ell = sum(1 for i in items if i is Ellipsis)
    if n_ell > 1:
        raise IndexError("an index can only have a single ellipsis ('...')")
    if n_ell:
        used = sum(i.dim() if _is_mask(i) else 1 for i in items if i is not None and i is not Ellipsis)
        at = next(j for j, i in enumerate(items) if i is Ellipsis)
        items[at:at + 1] = [slice(None)] * max(0, x.dim() - used)
    out, pos, shape = [], 0, tuple(x.shape)
    for i in items:
        if _is_mask(i):
            k = i.dim()
            if tuple(i.shape) != shape[pos:pos + k]:
                raise IndexError(f"The shape of the mask {list(i.shape)} at index {pos} does not match the shape "
                                 f"of the indexed tensor {list(shape[pos:pos + k])} at index {pos}")
            out.extend(i.nonzero().unbind(1))
            pos += k
        else:
            out.append(i)
            pos += i is not None
    return out


def _is_mask(i) -> bool:
    return isinstance(i, _T) and i.dtype in (torch.bool, torch.uint8)


def _per_sample_dims(i) -> int:
    return i._raw.dim() - len(i._plates) if type(i) is _PT else i.dim()


def _general(x, idx, plain: bool = False):
    """``(raw_index, plates, r, q, direct)``: the raw index into ``x`` expanded to ``plates`` (its
    plate dims indexed by aranges), the result's plates, the number ``r`` of per-sample broadcast
    index dims and ``q``, the per-sample position of that block. The raw result is (plates, block,
    rest).

    ``direct``: with ``plain`` (``x`` a plain tensor: a table, an embedding), ``raw_index`` indexes
    ``x`` itself, without aranges and without an expanded view of ``x`` (the index tensors carry the
    plate dims), when torch puts the broadcast block first there too (``table[s]``, ``Q[s, a]``)."""
    items = _normalise(x, idx)
    xp = x._plates if type(x) is _PT else ()
    plates = union_plates([xp] + [i._plates for i in items if type(i) is _PT])
    m = len(plates)
    tensors = [i for i in items if isinstance(i, _T)]
    r = max((_per_sample_dims(i) for i in tensors), default=0)
    # torch's rule for one sample: ints and 0-dim integer tensors select (their dims vanish); the
    # other tensor indices are adjacent if nothing else lies between them, and then their block
    # takes their place; otherwise it comes first
    kinds = ["t" if isinstance(i, _T) else "k" for i in items
             if not (isinstance(i, int) or (isinstance(i, _T) and _per_sample_dims(i) == 0))]
    ts = [j for j, k in enumerate(kinds) if k == "t"]
    adjacent = bool(ts) and ts == list(range(ts[0], ts[0] + len(ts)))
    q = ts[0] if adjacent else 0
    raw = []
    for i in items:
        if type(i) is _PT:
            raw.append(align(i._raw, i._plates, plates, r))
        elif isinstance(i, _T) and i.dim():
            raw.append(i.reshape((1,) * (m + r - i.dim()) + tuple(i.shape)))
        else:
            raw.append(i)  # ints, slices, None, 0-dim tensors: as for one sample
    if plain:
        # the same rule on the raw index, where every plate tensor has dims: the block comes first
        # if the first index that does not select is a tensor, or if the tensors are not adjacent
        rk = ["t" if isinstance(i, _T) else "k" for i in raw if not (isinstance(i, int) or (
            isinstance(i, _T) and i.dim() == 0))]
        rt = [j for j, k in enumerate(rk) if k == "t"]
        if rt and (rt[0] == 0 or rt != list(range(rt[0], rt[0] + len(rt)))):
            return tuple(raw), plates, r, q, True
    ar = tuple(_arange(p.size, j, m + r, x.device) for j, p in enumerate(plates))
    return ar + tuple(raw), plates, r, q, False


_ARANGES: dict = {}


def _arange(size: int, j: int, dims: int, device) -> torch.Tensor:
    """``arange(size)`` viewed along dim ``j`` of ``dims`` (the index of a plate dim), made once per
    shape and device (an index tensor that nothing writes to; two aranges cost ~4 us per call)."""
    key = (size, j, dims, device)
    t = _ARANGES.get(key)
    if t is None:
        with torch.inference_mode(False):  # a normal tensor also when first made in inference mode
            t = torch.arange(size, device=device).view((1,) * j + (size,) + (1,) * (dims - j - 1))
        # not a tracer's fake tensor, nor one made inside a torch.func level (kept, a later call at another
        # level fails torch's internal assert "level <= current_level")
        if type(t) is torch.Tensor and torch._C._functorch.maybe_current_level() is None:
            if len(_ARANGES) >= 1024:
                _ARANGES.clear()
            _ARANGES[key] = t
    return t


@register(_T.__getitem__)
def _getitem(func, args, kwargs):
    """per-sample indexing; plate tensors anywhere in the index, aligned by name"""
    x, idx = args
    if type(idx) is _PT and type(x) is not _PT and idx.dtype not in (torch.bool, torch.uint8):
        # table[s]: one plate-tensor index into a plain tensor; the raw index leads with the plates
        out = wrap_same(x[idx._raw], idx._plates)
        if idx._raw.dim() == len(idx._plates):  # a 0-dim s: torch's table[s] is a view, ours a copy
            register_copy(out, x, (idx,), _read)  # (a plain table: only a marker, a write through it is refused)
        return out
    idx = _index_tuple(idx)
    if type(x) is _PT:
        if _simple(x, idx):
            return wrap_same(x._raw[(slice(None),) * len(x._plates) + idx], x._plates)
        if len(idx) <= x._raw.dim() - len(x._plates):
            out = _table_lookup(x, idx)  # (an amortised table: one per data point, W[z])
            if out is not None:
                return out
    elif type(idx) is tuple and len(idx) <= x.dim():
        out = _table_lookup(x, idx)
        if out is not None:
            return out
    out, r = _general_read(x, idx)
    if not r:
        # every tensor index is one integer per sample, which torch reads as an int: for one sample the
        # result is a view of x, here a gather (a copy); writes through it are written back to x
        register_copy(out, x, idx, _read)
    return out


_INDEX_DTYPES = (torch.int64, torch.int32)


def _table_lookup(x, idx: tuple):
    """``x[idx]`` for a plain table ``x`` (a parameter, an embedding) indexed by sampled indices and ints only
    (``logA[z_prev, z]``, ``logB[z, x_t]``, ``logB[z, x]`` with ``x`` a data-plate tensor), else None.

    The fast path of a structured model's lookups (an HMM step's transition and emission rows: a quarter of
    its time on the general path, p-hmm15). With the tensor indices first and nothing but ints between them,
    torch puts their broadcast block first, for one sample and for the raw index tensors that carry the plate
    dims alike: the result is the raw advanced index of the table by the aligned raw indices (what
    ``_general`` builds for such an index, without its normalisation). Everything else goes the general way:
    slices, None, Ellipsis, lists, boolean masks, Python bools, floating-point indices (whose error carries the
    hint). Out-of-range indices raise torch's IndexError from the same raw call as there; negative ones wrap, as
    for one sample.

    A plate-tensor table (an amortised one: a table per data point, ``W[z]``) is the same lookup with its plate
    dims indexed first by aranges (size 1 where its raw dim is broadcast), after it is aligned to the index's
    plates: the general path's raw index, without its normalisation and its expanded view of the table."""
    xp = x._plates if type(x) is _PT else None
    groups = [] if xp is None else [xp]
    r = 0
    for i in idx:
        t = type(i)
        if t is _PT:
            raw = i._raw
            if raw.dtype not in _INDEX_DTYPES:
                return None
            groups.append(i._plates)
            k = raw.dim() - len(i._plates)
        elif t is _T:
            if i.dtype not in _INDEX_DTYPES:
                return None
            k = i.dim()
        elif t is int:
            continue
        else:
            return None
        if k > r:
            r = k
    if len(groups) == (0 if xp is None else 1):
        return None
    plates = groups[0]
    for g in groups[1:]:
        if g is not plates:
            plates = union_plates(groups)  # (z_prev and z of two steps: the later step, z_prev re-indexed)
            break
    n = len(plates) + r  # the raw index's dims: plates, then the per-sample broadcast block
    raw_idx = []
    table = x
    if xp is not None:
        table = x._raw if xp is plates else align(x._raw, xp, plates)
        raw_idx.extend(_arange(table.shape[j], j, n, table.device) for j in range(len(plates)))
    for i in idx:
        t = type(i)
        if t is _PT:
            raw = i._raw
            raw_idx.append(raw if i._plates is plates and raw.dim() == n else align(raw, i._plates, plates, r))
        elif t is _T and i.dim():
            raw_idx.append(i.reshape((1,) * (n - i.dim()) + tuple(i.shape)))
        else:
            raw_idx.append(i)  # ints and 0-dim tensors: as for one sample
    out = wrap_same(table[tuple(raw_idx)], plates)
    if not r:  # one integer per sample in each index: a view for one sample, a copy here (as _getitem's)
        register_copy(out, x, idx, _read)
    return out


def _general_read(x, idx: tuple):
    """``(x[idx], r)`` for an index with plate tensors (or non-adjacent tensor indices); ``r``: the
    number of per-sample broadcast index dims (0: every tensor index is a 0-dim integer)."""
    raw_idx, plates, r, q, direct = _general(x, idx, plain=type(x) is not _PT)
    m = len(plates)
    if direct:  # a plain x indexed directly: the index tensors carry the plate dims
        out = x[raw_idx]
    else:
        # the plate dims are indexed by aranges: the raw result is (plates, index block, rest)
        full = type(x) is _PT and plates == x._plates and tuple(x._raw.shape[:m]) == tuple(p.size for p in plates)
        src = x._raw if full else _full(x, plates)  # (a view: size-1 plate dims expanded)
        out = src[raw_idx]
    if q and r:  # the block where torch puts it for one sample
        out = out.movedim(tuple(range(m, m + r)), tuple(range(m + q, m + q + r)))
    return wrap_same(out, plates), r


def _read(x, idx: tuple) -> torch.Tensor:
    """The raw values of ``x[idx]`` again (a copy's refresh after ``x`` was written in place)."""
    return _general_read(x, idx)[0]._raw


_PLAIN = ("cannot assign into a plain tensor with a per-sample (plate) index or value: the plain tensor "
          "would have to become one value per sample. Build a new tensor instead, e.g. for a boolean "
          "`visited[a] = True`: `visited = visited | F.one_hot(a, n).bool()` or "
          "`visited = visited.scatter(0, a.unsqueeze(0), True)`; in general `x = torch.where(mask, value, x)`. "
          "A tensor from `torch.zeros(...)` or `z.new_zeros(...)` (new_ones, new_full, new_empty, new_tensor) is "
          "plain even when made from a plate tensor: write out of place, `A = torch.zeros(N, N, K).index_put((i, j), "
          "z)` (or scatter, torch.stack), or start from a per-sample tensor such as `torch.zeros_like(z)`")


@register(_T.__setitem__)
def _setitem(func, args, kwargs):
    """per-sample index assignment; plate tensors anywhere in the index or the value"""
    x, idx, value = args
    if type(x) is not _PT:
        raise PlateError(_PLAIN)
    n = len(x._plates)
    t = _index_tuple(idx)
    if len(t) == 1 and type(t[0]) is _PT and t[0].dtype == torch.bool:
        _mask_assign(x, t[0], value)
        return None
    vp = value._plates if type(value) is _PT else ()
    if _simple(x, t):
        plates = union_plates([x._plates, vp])
        raw_idx = (slice(None),) * n + t
        # a table of step t-1 of a partition written with step t's values: the operands align to
        # step t's plates, whose raw dims are x's where the entries stayed in place (write_plates)
        wp = write_plates(x._plates, plates)
        if wp is None:
            raise PlateError(_more_plates(x, plates))
        _held_once(x, t, value)
        if type(value) is _PT:
            target = x._raw[raw_idx]
            value = align(value._raw, value._plates, wp, target.dim() - n)
        x._raw[raw_idx] = value
        return None
    raw_idx, plates, r, q, _ = _general(x, t)
    plates = union_plates([plates, vp])
    wp = write_plates(x._plates, plates)  # (as above)
    if wp is None:
        raise PlateError(_more_plates(x, plates))
    short = _held_once(x, t, value)
    if short:
        raw_idx = tuple(i.narrow(j, 0, 1) if x._plates[j].name in short else i
                        for j, i in enumerate(raw_idx[:n])) + raw_idx[n:]
    target = x._raw[raw_idx]  # (plates, index block, rest): the layout the value must take
    k = target.dim() - n
    block, rest = tuple(target.shape[n:n + r]), tuple(target.shape[n + r:])
    shape = rest[:q] + block + rest[q:]  # one sample's result shape
    v = (value._raw if type(value) is _PT else torch.as_tensor(value, device=x.device)).to(x.dtype)
    v = align(v, vp, wp, k).expand(target.shape[:n] + shape)
    if q and r:  # from one sample's layout to the raw one
        v = v.movedim(tuple(range(n + q, n + q + r)), tuple(range(n, n + r)))
    x._raw[raw_idx] = v
    return None


def _mask_assign(x, mask, value) -> None:
    """``x[mask] = value`` with a per-sample (plate) mask: per plate entry what torch does for one
    sample. The mask covers x's leading per-sample dims (a row mask selects whole rows); the
    selected elements form (count, *rest), and the value broadcasts to that as torch allows (leading
    size-1 dims dropped): a scalar or a row (*rest) for every selected element, or one row per
    selected element ((count, *rest)), which needs every entry to select that many."""
    n = len(x._plates)
    vp = value._plates if type(value) is _PT else ()
    plates = union_plates([x._plates, mask._plates, vp])
    wp = write_plates(x._plates, plates)  # (as in _setitem: a table of an earlier step of a partition)
    if wp is None:
        raise PlateError(_more_plates(x, plates))
    _held_once(x, (mask,), value)
    shape = tuple(x._raw.shape[n:])  # one sample's shape
    k = mask._raw.dim() - len(mask._plates)
    if k > len(shape) or tuple(mask.shape) != shape[:k]:
        raise IndexError(f"The shape of the mask {list(mask.shape)} at index 0 does not match the shape of the "
                         f"indexed tensor {list(shape[:k])} at index 0")
    rest = shape[k:]
    # the mask on x's raw plate dims: the selection is (total over entries, *rest), entry by entry
    m = align(mask._raw, mask._plates, wp).expand(x._raw.shape[:n + k])
    v = (value._raw if type(value) is _PT else torch.as_tensor(value, device=x.device)).to(x.dtype)
    vn = len(vp)
    vs = tuple(v.shape[vn:])
    while vs and vs[0] == 1:  # torch drops the value's leading size-1 dims
        v, vs = v.squeeze(vn), vs[1:]
    if len(vs) <= len(rest):  # the same value (per entry) for every selected element
        if type(value) is not _PT:
            x._raw[m] = v
            return
        v = align(v, vp, wp, len(rest))
        v = v[(slice(None),) * n + (None,) * k].expand(x._raw.shape)[m]
    elif len(vs) == len(rest) + 1:  # one row per selected element: each entry selects vs[0]
        counts = m.reshape(m.shape[:n] + (-1,)).sum(-1)
        if not bool((counts == vs[0]).all()):
            raise PlateError(
                f"x[mask] = value with a value of per-sample shape {list(vs)} (one row per selected element) "
                f"needs every sample's mask to select {vs[0]} elements, but the numbers selected differ "
                f"by sample (from {int(counts.min())} to {int(counts.max())}), as in torch for one sample "
                "where they differ from the rows given. Give a value for every element instead: "
                "`x = torch.where(mask, value, x)` with value of x's shape (or broadcastable to it)")
        v = align(v, vp, wp, len(vs)).expand(x._raw.shape[:n] + vs[:1] + rest).reshape((-1,) + rest)
    else:
        raise PlateError(f"shape mismatch: value tensor of per-sample shape {list(vs)} cannot be broadcast to "
                         f"the indexing result of per-sample shape [number selected{''.join(f', {r}' for r in rest)}]")
    x._raw[m] = v


def _held_once(x, idx, value) -> set:
    """The plates over which ``x`` holds one value (a size-1 raw dim); raises if the index or the
    value varies over one of them (per-entry writes into a value held once)."""
    short = {p.name for j, p in enumerate(x._plates) if x._raw.shape[j] != p.size}
    if short:
        varies = {p.name for a in tuple(idx) + (value,) if type(a) is _PT
                  for j, p in enumerate(a._plates) if a._raw.shape[j] > 1}
        if short & varies:
            raise PlateError(_more_plates(x, x._plates, sorted(short & varies)))
    return short


def _more_plates(x, plates, extra=None) -> str:
    if extra is None:
        extra = [p.name for p in plates if p.name not in {q.name for q in x._plates}]
    return (f"the index or the value varies over plates {extra}, over which the assigned tensor (plates "
            f"{[p.name for p in x._plates]}) does not vary (it does not have them, or holds one value for all "
            "their entries): in place, it cannot become one value per "
            "sample. Build a new tensor instead, e.g. `x = torch.where(F.one_hot(a, n).bool(), value, x)` "
            "or `x = x.scatter(0, a.unsqueeze(0), value)`")


_select_dim = _dim_handler(1)


@register(torch.select, _T.select)
def _select(func, args, kwargs):
    """dim counts per-sample dims; a sampled index selects per sample (as x[:, i] at dim) from a plate tensor x (a plain x with a sampled index: torch reads the index as an int first, refused: write x[i])"""
    args = args + tuple(kwargs[k] for k in ("dim", "index")[len(args) - 1:] if k in kwargs)
    if len(args) != 3 or type(args[2]) is not _PT:
        return _select_dim(func, args, kwargs)
    x, d, i = args
    k = x.dim()  # per-sample rank (a plain x: its own)
    if i.dim() or i.dtype.is_floating_point or i.dtype == torch.bool:
        raise PlateError(f"select's index must be one integer per sample, got per-sample shape {tuple(i.shape)} "
                         f"and dtype {i.dtype}")
    if not -k <= d < k:
        raise IndexError(f"Dimension out of range (expected to be in range of [{-k}, {k - 1}], but got {d})")
    return dispatch(_T.__getitem__, (x, (slice(None),) * (d % k) + (i,)), {})


_index_select_dim = _dim_handler(1)


@register(torch.index_select, _T.index_select)
def _index_select(func, args, kwargs):
    """dim counts per-sample dims; a sampled index (0-dim or 1-d per sample) selects per sample

    (torch.func.vmap's rule read a batched 0-dim index as the whole table, and a 1-d one loops.)"""
    i = args[2] if len(args) > 2 else kwargs.get("index")
    if type(i) is not _PT:
        return _index_select_dim(func, args, kwargs)
    names = ("input", "dim", "index")
    bound = dict(zip(names, args))
    bound.update((key, v) for key, v in kwargs.items() if key in names)
    x, d = bound.get("input"), bound.get("dim")
    if set(kwargs) - set(names) or not isinstance(x, _T) or not isinstance(d, int):
        return vmap_call(func, args, kwargs)  # a named dim: torch's own, per sample
    # torch's checks, in per-sample terms
    if i.dtype not in (torch.int64, torch.int32):
        raise RuntimeError("index_select(): Expected dtype int32 or int64 for index")
    if i.dim() > 1:
        raise IndexError("index_select(): Index is supposed to be a vector")
    k = x.dim()  # per-sample rank (a plain x: its own)
    lo, hi = (-k, k - 1) if k else (-1, 0)
    if not lo <= d <= hi:
        raise IndexError(f"Dimension out of range (expected to be in range of [{lo}, {hi}], but got {d})")
    if k == 0 and i.numel() != 1:
        raise IndexError(f"index_select(): Index to scalar can have only 1 value, got {i.numel()} value(s)")
    if type(x) is not _PT and k:
        return _table_select(x, d % k, i)
    # per sample x.index_select(d, i) is x.gather(d, I) with I the index (as a vector) placed at d and
    # expanded over x's other dims; the gather refuses indices out of range, as index_select does (and
    # negative ones, which an advanced index would wrap); a 0-dim x is read as a vector of one element
    plates = union_plates([x._plates if type(x) is _PT else (), i._plates])
    m = len(plates)
    raw_x = _full(x, plates)
    if k == 0:
        raw_x, k = raw_x.unsqueeze(-1), 1
    d %= k
    idx = align(i._raw, i._plates, plates)
    idx = idx.reshape(idx.shape[:m] + (1,) * d + (-1,) + (1,) * (k - d - 1))
    idx = idx.long().expand(*raw_x.shape[:m + d], idx.shape[m + d], *raw_x.shape[m + d + 1:])
    try:
        out = torch.gather(raw_x, m + d, idx)
    except RuntimeError as e:
        if "out of bounds" in str(e):
            raise IndexError("index out of range in self") from None
        raise
    if x.dim() == 0:
        out = out.squeeze(-1)
    return wrap_same(out, plates)


def _table_select(x: torch.Tensor, d: int, i: PlateTensor) -> PlateTensor:
    """``index_select(x, d, i)`` of a plain table ``x`` (at least 1-d) by a sampled index (0-dim or 1-d per
    sample, checked): one index_select of the table by every entry's indices, flattened, then the plate dims
    moved first. It is the fast path of ``emb.index_select(0, z)``: no expanded table, no gather index; torch's
    own index_select refuses indices out of range, negative ones included, as it does for one sample."""
    raw = i._raw
    n = len(i._plates)
    out = torch.index_select(x, d, raw.reshape(-1))
    lead = tuple(raw.shape[:n])
    out = out.reshape(tuple(x.shape[:d]) + lead + (-1,) + tuple(x.shape[d + 1:]))
    if d and n:
        out = out.movedim(tuple(range(d, d + n)), tuple(range(n)))
    return wrap_same(out, i._plates)


def _sampled(*values) -> bool:
    return any(type(v) is _PT or (isinstance(v, (tuple, list)) and any(type(u) is _PT for u in v))
               for v in values)


def _bound(args: tuple, kwargs: dict, names: tuple) -> dict:
    bound = dict(zip(names, args))
    bound.update((key, v) for key, v in kwargs.items() if key in names)
    return bound


def _plates_of(x) -> tuple:
    return tuple(p.name for p in x._plates)


@register(torch.select_scatter, _T.select_scatter)
def _select_scatter(func, args, kwargs):
    """per sample (vmap); a sampled index is refused (torch takes it as a Python int): index_copy / index_put"""
    b = _bound(args, kwargs, ("input", "src", "dim", "index"))
    i, dim = b.get("index"), b.get("dim", 0)
    if type(i) is _PT:
        raise PlateError(
            f"select_scatter got a sampled index (a PlateTensor over plates {_plates_of(i)}): torch takes one Python "
            "number as its index, so the row it writes cannot differ per sample. "
            + sampled_index_advice(dim, None, "i", read=False, write=True))
    return vmap_call(func, args, kwargs)


@register(torch.slice_scatter, _T.slice_scatter)
def _slice_scatter(func, args, kwargs):
    """per sample (vmap); a sampled start or end is refused (torch takes them as Python ints): index_copy at i + arange(k)"""
    b = _bound(args, kwargs, ("input", "src", "dim", "start", "end", "step"))
    dim = b.get("dim", 0)
    for name in ("start", "end", "step"):
        v = b.get(name)
        if type(v) is not _PT:
            continue
        src = b.get("src")
        k = src.shape[dim] if isinstance(src, _T) and isinstance(dim, int) and -src.dim() <= dim < src.dim() else "k"
        raise PlateError(
            f"slice_scatter got a sampled {name} (a PlateTensor over plates {_plates_of(v)}): torch takes one "
            "Python number as its start and end, so the slice it writes cannot start differently per sample; "
            f"its length is fixed by src ({k} along dim {dim}). "
            + sampled_index_advice(dim, k, "i", read=False, write=True))
    return vmap_call(func, args, kwargs)


@register(torch.roll, _T.roll)
def _roll(func, args, kwargs):
    """per sample (vmap); a sampled shift is refused (torch takes it as a Python int): index by (arange(n) - shift) % n"""
    if _sampled(*args[1:], *kwargs.values()):
        raise PlateError(
            "roll by a sampled shift: torch takes the shift as a Python int, one for the whole call, so it "
            "cannot be a different number per sample. Index instead, which is the same per sample: with "
            "`idx = (torch.arange(n) - shift) % n`, `x[idx]` rolls dim 0 of length n (`x[:, idx]` dim 1), or "
            "gather: `x.gather(0, idx[:, None].expand_as(x))` for a 2-D x")
    return vmap_call(func, args, kwargs)


@register(torch.repeat_interleave, _T.repeat_interleave)
def _repeat_interleave(func, args, kwargs):
    """per sample (vmap); sampled repeats are refused (the result's shape would depend on the sample)"""
    repeats = args[1:2] + tuple(v for key, v in kwargs.items() if key == "repeats")
    if _sampled(*repeats) or (len(args) == 1 and not repeats and type(args[0]) is _PT):
        raise PlateError(
            "repeat_interleave with sampled repeats: the length of its result is the sum of the repeats, "
            "which depends on the sample, so the plate entries would have different shapes (as x[mask]). Keep "
            "a fixed length M (at least the largest sum) and mask the padding. The rows in order, padded at the "
            "end (a duration model's frames): find each position's row from the cumulative repeats, "
            "`end = repeats.cumsum(0)`, `row = torch.searchsorted(end, torch.arange(M), right=True)"
            ".clamp(max=len(repeats) - 1)`, `y = x[row]`, `valid = torch.arange(M) < end[-1]` (or the alignment "
            "matrix `t = torch.arange(M)[:, None]`, `A = (t >= end - repeats) & (t < end)`, `y = A.to(x.dtype) @ x`); "
            "or each row repeated by the largest count R, the rest masked where it stands: "
            "`y = x.repeat_interleave(R, 0)` with `keep = (torch.arange(R) < repeats.unsqueeze(-1)).flatten()` "
            "as a weight or in torch.where")
    return vmap_call(func, args, kwargs)


@register(torch.index_add, _T.index_add)
def _index_add(func, args, kwargs):
    """per sample; a sampled index as a scatter_add of it placed at dim

    (vmap's batching rule for a batched index loops over the batch: ~60x slower.)
    Per sample ``x.index_add(d, i, src, alpha=a)`` is ``x.scatter_add(d, I, a * src)`` with ``I`` the index
    placed at ``d`` and expanded to ``src``'s shape: the same sums, and the same derivatives (the gradient of
    ``src`` gathers the output's at ``I``, as index_add's selects it at ``i``)."""
    names = ("input", "dim", "index", "source")
    bound = dict(zip(names, args))
    extra = {k: v for k, v in kwargs.items() if k not in names}
    bound.update((k, v) for k, v in kwargs.items() if k in names)
    x, d, i, src = (bound.get(k) for k in names)
    if (type(i) is not _PT or set(extra) - {"alpha"} or not isinstance(d, int) or not isinstance(src, _T)
            or src.dim() == 0 or i.dim() != 1 or not isinstance(x, _T) or x.dim() != src.dim()):
        return vmap_call(func, args, kwargs)  # (torch's own checks and errors, per sample)
    k = src.dim()
    if not -k <= d < k:
        raise IndexError(f"Dimension out of range (expected to be in range of [{-k}, {k - 1}], but got {d})")
    d %= k
    if x.shape[:d] != src.shape[:d] or x.shape[d + 1:] != src.shape[d + 1:] or src.shape[d] != i.shape[0]:
        return vmap_call(func, args, kwargs)  # torch's own error per sample (scatter_add would fill part of x)
    shape = [1] * k
    shape[d] = i.shape[0]
    index = i.reshape(shape).expand(src.shape)
    alpha = extra.get("alpha", 1)
    return torch.scatter_add(x, d, index, src if alpha == 1 else src * alpha)


@register(torch.index_fill, _T.index_fill)
def _index_fill(func, args, kwargs):
    """per sample; a sampled index or value as a where of the positions it fills (a scatter of the index at dim)

    torch's vmap of index_fill is wrong where the input is not mapped: with a mapped index under two
    nested vmap levels (a sample plate and a data plate) it fails ("use out-of-place operators instead
    of index_fill_", a torch bug that plain torch shows too), and with a mapped value it fills every
    entry with one entry's value, silently. Per sample ``x.index_fill(d, i, v)`` is ``torch.where(hit, v,
    x)`` with ``hit`` the positions of ``i`` along ``d`` (a scatter of True, which checks the index's range
    as index_fill does): the same values, and the same derivatives (``x``'s gradient is zero where filled,
    ``v``'s sums the gradient over the filled positions, each once, as index_fill's does over the unique
    index)."""
    names = ("input", "dim", "index", "value")
    bound = dict(zip(names, args))
    bound.update(kwargs)
    x, d, i, v = (bound.get(k) for k in names)
    if ((type(i) is not _PT and type(v) is not _PT) or set(kwargs) - set(names) or len(bound) != 4 or not isinstance(d, int)
            or not isinstance(x, _T) or not isinstance(i, _T) or i.dim() > 1 or i.dtype != torch.long
            or not (isinstance(v, (bool, int, float)) or (isinstance(v, _T) and v.dim() == 0))):
        return vmap_call(func, args, kwargs)  # (torch's own checks and errors, per sample)
    k = max(x.dim(), 1)  # (a 0-d input is indexed as one of 1 element, at dim 0 or -1)
    if not -k <= d < k:
        raise IndexError(f"Dimension out of range (expected to be in range of [{-k}, {k - 1}], but got {d})")
    d %= k
    shape = tuple(x.shape) or (1,)
    i = i.reshape(-1)
    raw = i._raw if type(i) is _PT else i
    # torch's IndexError (scatter's would be a RuntimeError, in the raw dims); under storch.compile, at every call
    check_in_range((raw < -shape[d]) | (raw >= shape[d]), lambda v: f"index_fill: index {'(sampled)' if v is None else v} "
                   f"is out of bounds for dimension {d} with size {shape[d]}", raw)
    i = torch.where(i < 0, i + shape[d], i)  # index_fill takes negative indices
    place = [1] * k
    place[d] = i.shape[0]
    index = i.reshape(place).expand(shape[:d] + (i.shape[0],) + shape[d + 1:])
    hit = torch.zeros(shape, dtype=torch.bool, device=x.device).scatter(d, index, True).reshape(x.shape)
    value = v.to(x.dtype) if isinstance(v, _T) else torch.tensor(v, dtype=x.dtype, device=x.device)
    return torch.where(hit, value, x)


@register(_T.index_fill_)
def _index_fill_inplace(func, args, kwargs):
    """per sample (vmap); a sampled value (a plate tensor): the out-of-place fill, written in place

    (torch's vmap rule for index_fill with a batched value and an unbatched ``self`` fills every entry with
    the last entry's value.) The values are ``_index_fill``'s; the write is ``pointwise``'s in-place write,
    so ``x`` must carry the value's plates."""
    names = ("input", "dim", "index", "value")
    bound = dict(zip(names, args))
    bound.update(("input" if k == "self" else k, v) for k, v in kwargs.items())
    x, d, i, v = (bound.get(k) for k in names)
    if (type(v) is not _PT or set(bound) - set(names) or not isinstance(d, int) or not isinstance(x, _T)
            or not isinstance(i, _T) or v.dim() != 0 or i.dim() > 1 or i.dtype != torch.long):
        return vmap_call(func, args, kwargs)  # (a sampled index with a plain value; torch's own errors)
    return broadcast(_WRITE_INDEX_FILL, (x, _index_fill(_T.index_fill, (x, d, i, v), {})), {})


_WRITE_INDEX_FILL = write_in_place("index_fill_")


_BINCOUNT_ARGS = ("input", "weights", "minlength")
_BINCOUNT_DTYPES: dict = {}


def _bincount_dtype(weights) -> torch.dtype:
    """The dtype of torch's bincount of a non-empty input: int64 without weights; with them, torch's own
    choice for the weights' dtype (their float32 / float64, float64 for the others), asked of torch once per
    dtype (with an input of one element: torch gives an empty input int64 counts, whatever the weights)."""
    if weights is None:
        return torch.int64
    d = _BINCOUNT_DTYPES.get(weights.dtype)
    if d is None:
        d = _BINCOUNT_DTYPES[weights.dtype] = torch.bincount(
            torch.zeros(1, dtype=torch.long), weights=torch.zeros(1, dtype=weights.dtype)).dtype
    return d


def _bincount_replay_message(minlength: int) -> str:
    return (f"torch.bincount(k, minlength={minlength}) of a sampled k in a step compiled by storch.compile drew a value "
            f">= {minlength}: the program was traced with a draw that fitted, so its counts have length {minlength}, "
            f"and eagerly this draw's counts would be longer (max(k) + 1). Pass minlength= the number of values k can "
            f"take (the distribution's support size, K of a Categorical: torch.bincount(k, minlength=K))")


@register(torch.bincount, _T.bincount)
def _bincount(func, args, kwargs):
    """per sample (a scatter_add); refused where the length, max + 1, differs between samples: pass minlength= above the largest value

    Per sample ``torch.bincount(i, weights=w, minlength=K)`` has length ``max(K, max(i) + 1)``, which
    depends on the drawn values; a plate tensor holds one per-sample shape, so the largest value is
    read once (one host sync) and the call is refused where the samples' lengths differ. Otherwise the
    counts are ``zeros(L).scatter_add(0, i, w)`` per sample: torch's values and dtype (int64 without
    weights), and a gradient for ``w`` (torch's bincount has none). torch's vmap of bincount loops
    over the entries (with a performance warning) and failed where the lengths differ. ``minlength`` is an int
    or what torch takes as one (a numpy integer: ``operator.index``). On the meta device the values are unknown:
    the length is ``minlength``, and a non-empty input without it is refused (torch has no meta bincount)."""
    b = dict(zip(_BINCOUNT_ARGS, args))
    b.update(("input" if k == "self" else k, v) for k, v in kwargs.items())
    x, w, minlength = b.get("input"), b.get("weights"), b.get("minlength", 0)
    if type(minlength) is not int and hasattr(type(minlength), "__index__") and not isinstance(minlength, (bool, _T)):
        minlength = operator.index(minlength)  # a numpy integer (K = len(np.unique(...))), as torch takes it
    if (len(args) > 3 or set(b) - set(_BINCOUNT_ARGS) or not isinstance(x, _T)
            or not (w is None or isinstance(w, _T)) or type(minlength) is not int):
        return vmap_call(func, args, kwargs)  # (torch's own errors, per sample)
    # torch's checks, in per-sample terms
    if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        raise RuntimeError(f"bincount only supports 1-d non-negative integral inputs; got dtype {x.dtype}")
    if x.dim() != 1:
        raise RuntimeError("bincount only supports 1-d non-negative integral inputs.")
    if w is not None and (w.dim() != 1 or w.shape[0] != x.shape[0]):
        raise RuntimeError("weights should be 1-d and have the same length as input")
    if minlength < 0:
        raise RuntimeError("minlength should be >= 0")
    plates = union_plates([x._plates if type(x) is _PT else (), w._plates if type(w) is _PT else ()])
    m = len(plates)
    rx = align(x._raw, x._plates, plates) if type(x) is _PT else x.reshape((1,) * m + tuple(x.shape))
    n = x.shape[0]
    length = minlength
    if n and rx.is_meta and not minlength:
        raise PlateError(
            "torch.bincount of a meta tensor without minlength: its length, max(input) + 1, depends on values that a "
            "meta tensor does not hold (torch's bincount has no meta kernel either). Pass minlength= greater than the "
            "largest value the input can take (the number of categories K: torch.bincount(i, minlength=K))")
    if n and not rx.is_meta:
        top = rx.amax(-1)
        low, short, long = (int(v) for v in torch.stack((rx.amin(), top.amin(), top.amax())).tolist())
        if low < 0:
            raise RuntimeError("bincount only supports 1-d non-negative integral inputs.")
        length = max(minlength, long + 1)
        if length > minlength and _recording():
            # storch.compile: the program would keep this trace's length, max + 1, for every later draw (a draw
            # whose largest value is smaller would get extra zero counts where eager storch gives a shorter result)
            raise PlateError(
                f"storch.compile cannot trace torch.bincount of a sampled input without a minlength that covers its "
                f"values: its length, max(input) + 1 = {length} here (minlength={minlength}), depends on the draw, "
                f"and the compiled program would keep this first draw's length for every later one. Pass "
                f"minlength= greater than the largest value the input can take (the number of categories K: "
                f"torch.bincount(i, minlength=K)), or count with F.one_hot(i, K).sum(0)")
        if length == minlength and _recording() and type(x) is _PT:
            # storch.compile: the program keeps the length minlength, which this draw fits; a later draw of a larger
            # value would fail in scatter_add with torch's bare index error, so the program checks every draw
            record_check((rx < minlength).all(), _bincount_replay_message(minlength))
        if max(minlength, short + 1) != length:
            raise PlateError(
                f"torch.bincount's result has length max(input) + 1 (or minlength, if larger) per sample, so "
                f"its length depends on the drawn values: here from {max(minlength, short + 1)} to {length} "
                f"over plates {[p.name for p in plates]}, and a plate tensor holds one per-sample shape. Pass "
                f"minlength= greater than the largest value the input can take (the number of categories K: "
                f"torch.bincount(i, minlength=K)), or count with F.one_hot(i, K).sum(0) "
                f"((F.one_hot(i, K) * w.unsqueeze(-1)).sum(0) with weights)")
    dtype = _bincount_dtype(w) if n else torch.int64  # (torch: an empty input counts in int64)
    rw = None
    if w is not None:
        rw = align(w._raw, w._plates, plates) if type(w) is _PT else w.reshape((1,) * m + tuple(w.shape))
    sizes = tuple(max(rx.shape[j], rw.shape[j] if rw is not None else 1) for j in range(m))
    index = rx.long().expand(sizes + (n,))
    src = (torch.ones((), dtype=dtype, device=rx.device) if rw is None else rw.to(dtype)).expand(sizes + (n,))
    out = torch.zeros(sizes + (length,), dtype=dtype, device=rx.device).scatter_add(-1, index, src)
    return wrap_same(out, plates)
