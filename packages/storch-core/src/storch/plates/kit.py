"""The helper kit of the plate rules: wrap and unwrap raw tensors, walk operands, re-enter dispatch.

Every rule module (``storch.plates.rules``) builds on these helpers; this module imports neither
the dispatcher nor any rule (the shape ``torch._prims_common`` has in torch). Re-entering the
dispatcher from a rule (``dispatch``) goes through ``PlateTensor.__torch_function__``, which the
dispatcher installs on the tensor (``storch.plates.tensor.install_dispatcher``).
"""

from __future__ import annotations

import sys
import weakref
from typing import Callable

import torch

from ..errors import PlateError
from .tensor import SAMPLED_SIZE, Plate, PlateTensor, align, map_tensors, too_many_samples
from .tensor import new_plate_tensor as _new
from .treatments import describe, register_plate_handler

__all__ = [
    "dispatch", "register", "check_leading", "wrap", "wrap_same", "scan", "unwrap", "too_many_samples",
    "plates_or_empty", "register_copy", "write_through", "refuse_sampled_size",
]

_PT = PlateTensor
_T = torch.Tensor


def register(*funcs, note: str = ""):
    """Decorator: storch's own handler for these torch functions (an entry of the table)."""

    def deco(handler):
        register_plate_handler(funcs, handler, note=note or (handler.__doc__ or "").strip().split("\n")[0])
        return handler

    return deco


def dispatch(func, args, kwargs):
    """Run torch function ``func`` on arguments that include plate tensors (from inside a rule)."""
    return _PT.__torch_function__(func, (), args, kwargs)


# -- helpers -----------------------------------------------------------------------------


def check_leading(out: torch.Tensor, plates: tuple[Plate, ...]) -> None:
    """Raise unless the leading dims of raw ``out`` are ``plates`` (each of its size, or 1)."""
    s = out.shape
    if len(s) < len(plates) or any(s[i] != p.size and s[i] != 1 for i, p in enumerate(plates)):
        raise PlateError(
            f"internal error: a plate treatment returned a tensor of raw shape {tuple(s)}, whose leading "
            f"dims do not match the plates {tuple(f'{p.name}={p.size}' for p in plates)}; please report it"
        )


def wrap_same(out, plates: tuple[Plate, ...]):
    """Unchecked wrap for treatments whose construction keeps the plates in the leading dims
    (elementwise on aligned operands, reductions over per-sample dims): the hot path."""
    t = type(out)
    if t is _T:
        return _new(out, plates)
    if (t is tuple or t is list or (isinstance(out, tuple) and hasattr(t, "n_fields"))) and all(
            type(o) is _T for o in out):  # split, chunk, unbind; max(dim)'s (values, indices) structseq
        return t([_new(o, plates) for o in out])
    return wrap(out, plates)


def wrap(out, plates: tuple[Plate, ...]):
    """Wrap raw outputs (tensors, or tuples of them) with ``plates``, checking their leading dims."""
    if isinstance(out, _T):
        if not plates:
            return out
        check_leading(out, plates)
        return _new(out, plates)
    return map_tensors(out, lambda o: wrap(o, plates))


def scan(args, kwargs):
    """Plates of every PlateTensor operand (one level into lists), and whether all are equal."""
    groups = []
    for a in args:
        t = type(a)
        if t is _PT:
            groups.append(a._plates)
        elif t is list or t is tuple:
            groups.extend(b._plates for b in a if type(b) is _PT)
    for a in kwargs.values():
        if type(a) is _PT:
            groups.append(a._plates)
    return groups


def _ndim(x) -> int:
    return x._raw.dim() - len(x._plates) if type(x) is _PT else x.dim()


def unwrap(x, plates, pad: int = -1):
    """Raw value of ``x`` aligned to ``plates`` (recursing one level into lists)."""
    t = type(x)
    if t is _PT:
        return align(x._raw, x._plates, plates, pad)
    if t is list or t is tuple:
        return t(unwrap(b, plates, pad) for b in x)
    return x


def _operands(args, kwargs):
    for a in args:
        t = type(a)
        if t is list or t is tuple:
            yield from a
        else:
            yield a
    yield from kwargs.values()


def refuse_sampled_size(func, sizes) -> None:
    """Refuse a plate tensor among ``sizes`` (the shape argument of view / reshape / expand / repeat / new_zeros):
    torch reads one Python number from it, and a sampled size would give every plate entry its own shape (a
    variable length, as ``repeat_interleave`` with sampled repeats). Without this, the handler would pass the plate
    tensor on to torch with the raw tensor, and the call would come back to storch with a plain first operand.
    Called where the handler's call failed, so that a call with plain sizes pays nothing for it (review r-52:
    naming the call on every view / reshape / expand cost 1-2 us each)."""
    for s in sizes:
        if type(s) is _PT:
            raise PlateError(
                f"{describe(func)} got a sampled size (a PlateTensor over plates {tuple(p.name for p in s._plates)}) where "
                "torch takes a Python number: one number cannot hold every sample's value, and each sample would "
                "have its own shape. " + SAMPLED_SIZE)


# -- generic handlers ----------------------------------------------------------------------

_INPLACE_DUNDERS = {
    "__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__", "__imod__",
    "__ipow__", "__iand__", "__ior__", "__ixor__", "__ilshift__", "__irshift__", "__imatmul__",
}


_INPLACE_CACHE: dict = {}


def _is_inplace(func) -> bool:
    r = _INPLACE_CACHE.get(func)
    if r is None:
        name = getattr(func, "__name__", "")
        r = _INPLACE_CACHE[func] = (name.endswith("_") and not name.startswith("__")) or name in _INPLACE_DUNDERS
    return r


def _from_torch() -> bool:
    """Whether the call (``bool()``, or a check that returns a bool) was made by torch's own Python
    code (the first frame outside storch)."""
    f = sys._getframe(2)
    while f is not None:
        module = f.f_globals.get("__name__", "")
        if module != "storch" and not module.startswith("storch."):
            return module.startswith("torch.")
        f = f.f_back
    return False


def plates_or_empty(x):
    return x._plates if type(x) is _PT else ()


# -- copies where torch gives a view -------------------------------------------------------
# For one sample, ``y[s]`` with ``s`` a 0-dim integer tensor is a view of ``y`` (torch reads such an
# index as an int), but per plate entry the offsets differ, so storch's result is a gather: a copy.
# To keep torch's aliasing, the copy remembers where it was read from: an in-place write into it
# (or into a view of it) is written back (``y[s] = copy``), and an in-place write into ``y`` (or a
# view of it) refreshes the copies read from it.
#
# The read (``table[s]``, ``Q[s, a]``) runs at every step of a sampled episode, so it only stores:
# the record is an attribute of the copy's raw root tensor (its lifetime is the tensor's; a view of
# the copy reaches it through ``_base``), and the copies read from a plate tensor ``y`` are weak
# references in a list on ``y``'s raw root. The checks, the write-back and the refresh run in the
# in-place path (``write_through``, called by the dispatcher after in-place calls and __setitem__).
# A copy read from a plain table only carries a marker: a write into it is refused (the plain table
# cannot hold per-sample values), and storch never sees writes into a plain table, which torch
# shows in its views, so such a copy is not refreshed (as before).
_COPY = "_storch_copy"  # attribute of a copy's raw root: a _Record
_TAKEN = "_storch_taken"  # attribute of a plate tensor's raw root: a _Taken of the copies read from it


class _Record(tuple):
    """(src, idx, plates, the sum of the index tensors' versions, read): the copy is ``src[idx]`` with
    ``plates``; ``read(src, idx)`` gives its raw values again (the refresh)."""
    __slots__ = ()

    def __reduce__(self):  # pickled / deep-copied tensors are no views: drop the record (an empty
        return set, ()      # set, which torch.load(weights_only=True) accepts)


class _Taken(list):
    """Weak references to the raw roots of the copies read from a plate tensor."""
    __slots__ = ()

    def __reduce__(self):
        return set, ()


_PLAIN_SOURCE = _Record(())  # the marker of a copy read from a plain table
_ACTIVE: set = set()  # ids of the copies being written back now (not refreshed by their own write)
_seen = False  # whether any copy was registered (the in-place path looks only then)


def _root(t: torch.Tensor) -> torch.Tensor:
    b = t._base
    return t if b is None else b


def register_copy(out: PlateTensor, src, idx: tuple, read: Callable[..., torch.Tensor]) -> None:
    """Record that ``out`` = ``src[idx]`` is a copy where, for one sample, torch gives a view of ``src``.
    ``out``'s raw tensor is the result of an advanced (tensor) index, which torch always makes anew: it
    is its own root (the views of it reach the record through ``_base``)."""
    global _seen
    _seen = True
    if type(src) is not _PT:
        out._raw._storch_copy = _PLAIN_SOURCE
        return
    root = out._raw
    root._storch_copy = _Record((src, idx, out._plates, _versions(idx), read))
    s = src._raw
    b = s._base
    if b is not None:
        s = b
    try:
        taken = s._storch_taken
        taken.append(weakref.ref(root))
    except AttributeError:  # the first copy read from it (or a loaded tensor's placeholder)
        s._storch_taken = _Taken((weakref.ref(root),))
        return
    n = len(taken)
    if n >= 64 and not n & (n - 1):  # at 64, 128, 256, ...: drop the dead (amortised)
        taken[:] = [r for r in taken if r() is not None]


def _versions(idx: tuple) -> int:
    """The sum of the versions of the tensors in ``idx`` (counters only grow: equal iff none changed)."""
    v = 0
    for i in idx:
        t = type(i)
        if t is _PT:
            v += i._raw._version
        elif t is not int and isinstance(i, torch.Tensor):
            v += i._version
    return v


def _unchanged_index(c: _Record) -> None:
    if _versions(c[1]) != c[3]:
        raise PlateError(
            "a sampled index was changed in place after it indexed a tensor (v = y[s], then s was written "
            "to): for one sample v is a view of y at the old index, which storch cannot follow. Index again "
            "after changing the index, or change a copy of it (s = s + 1 instead of s += 1)")


def _record(root: torch.Tensor):
    c = root.__dict__.get(_COPY)
    return c if type(c) is _Record else None


def write_through(target: PlateTensor) -> None:
    """After an in-place write into ``target``: write it back where it is such a copy (or a view of
    one), and refresh the copies read from it (or from the tensor it is a view of)."""
    if not _seen:
        return
    root = _root(target._raw)
    c = _record(root)
    if c is not None and id(root) not in _ACTIVE:
        if not c:
            raise PlateError(
                "an in-place write into `table[s]` with a plain tensor `table` and a sampled 0-dim index `s`: "
                "for one sample torch returns a view of `table`, so the write would change the plain tensor, "
                "differently per sample, which it cannot hold. storch's result is a copy and the write does not "
                "reach `table`. Write into a per-sample tensor instead (`y = table + 0 * s`, then `y[s]...`), or "
                "compute the new values out of place (`table.index_put((s,), v)`, `torch.where`); or call "
                "`.clone()` on the row first to change only the row")
        src, idx, plates, _, _ = c
        _unchanged_index(c)
        _ACTIVE.add(id(root))
        try:
            value = _new(root, plates)
            dispatch(torch.Tensor.__setitem__, (src, idx, value), {})
        finally:
            _ACTIVE.discard(id(root))
    _refresh(root)


def _refresh(root: torch.Tensor) -> None:
    taken = root.__dict__.get(_TAKEN)
    if type(taken) is not _Taken:
        return
    taken[:] = [r for r in taken if r() is not None]
    for r in list(taken):
        copy = r()
        c = _record(copy) if copy is not None else None
        if c is None or not c or id(copy) in _ACTIVE:
            continue
        src, idx, _, _, read = c
        _unchanged_index(c)
        copy.copy_(read(src, idx))
        _refresh(copy)
