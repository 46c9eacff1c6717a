"""How torch functions run on plate tensors: the dispatcher, the pointwise treatment and metadata.

Every call that involves a :class:`PlateTensor` comes here through ``__torch_function__``. The
function's treatment (pointwise, handler, batch-first, vmap, refused) is looked up in the table
of ``storch._treatments`` once and its implementation cached. Pointwise functions take a fast
path when all plate operands share the same plates and per-sample rank: unwrap, call once,
wrap. Otherwise operands are aligned by plate name (views only: permute/unsqueeze) and their
per-sample dims left-padded so that a plain tensor never broadcasts into a plate dimension.
Functions whose arguments name dimensions are handled in ``_plate_shape_ops``, batch-first
functions in ``_plate_batch`` and everything else by ``torch.func.vmap`` (``_plate_vmap``).
Any error torch raises inside a plate call is re-raised as a :class:`storch.PlateError` that
speaks of the per-sample shapes the user sees.
"""

from __future__ import annotations

import torch

from ._eager import eager_only
from ._errors import PlateError, plate_error_from
from ._plates import Plate, PlateTensor, _names, align, later_step, map_tensors, union_plates
from ._treatments import _LISTENERS, Entry, Treatment, describe, register_plate_handler, treatment_of

__all__ = ["dispatch", "register", "wrap", "scan", "unwrap", "too_many_samples", "user_error"]

_PT = PlateTensor
_T = torch.Tensor


def register(*funcs, note: str = ""):
    """Decorator: storch's own handler for these torch functions (an entry of the table)."""

    def deco(handler):
        register_plate_handler(funcs, handler, note=note or (handler.__doc__ or "").strip().split("\n")[0])
        return handler

    return deco


def dispatch(func, args, kwargs):
    """Run torch function ``func`` on arguments that include plate tensors."""
    return _torch_function(PlateTensor, func, (), args, kwargs)


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
    if type(out) is _T:
        return _PT._wrap(out, plates)
    return wrap(out, plates)


def wrap(out, plates: tuple[Plate, ...]):
    """Wrap raw outputs (tensors, or tuples of them) with ``plates``, checking their leading dims."""
    if isinstance(out, _T):
        if not plates:
            return out
        check_leading(out, plates)
        return _PT._wrap(out, plates)
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


def too_many_samples(x: PlateTensor, what: str) -> PlateError:
    n = x._raw[tuple(slice(None) for _ in x._plates)].shape[: len(x._plates)].numel()
    return PlateError(
        f"{what} needs a single value, but this PlateTensor holds {n} values over plates "
        f"{_names(x._plates)}. Reduce over the plates first (storch.surrogate_loss does that "
        "for costs) or use `.tensor` to get the raw values with the plate dims first"
    )


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


def _call(func, args, kwargs, pad: int):
    groups = scan(args, kwargs)
    first = groups[0]
    if all(g is first or g == first for g in groups):
        plates = first
    else:
        plates = union_plates(groups)
    self = args[0] if args else None
    inplace = _is_inplace(func)
    if inplace:
        if type(self) is not _PT or len(self._plates) != len(plates):
            raise PlateError(
                f"in-place {getattr(func, '__name__', func)} would write values that vary over plates "
                f"{_names(plates)} into a tensor with plates {_names(plates_or_empty(self))}; use the "
                "out-of-place version"
            )
        plates = self._plates
    args = tuple(unwrap(a, plates, pad) for a in args)
    if kwargs:
        kwargs = {k: unwrap(v, plates, pad) for k, v in kwargs.items()}
    out = func(*args, **kwargs)
    if inplace:
        return self  # the raw tensor was modified in place; the wrapper still describes it
    return wrap(out, plates)


def plates_or_empty(x):
    return x._plates if type(x) is _PT else ()


def broadcast(func, args, kwargs):
    """Pointwise: elementwise with torch broadcasting; per-sample dims padded, plates aligned by name."""
    if not kwargs and len(args) == 2 and not _is_inplace(func):
        # fast paths: a plate tensor and a Python scalar, or two plate tensors with equal plates
        a, b = args
        ta, tb = type(a), type(b)
        if ta is _PT:
            if tb is _PT:
                pa, pb = a._plates, b._plates
                if a._raw.dim() == b._raw.dim():
                    if pa is pb or pa == pb:
                        return _PT._wrap(func(a._raw, b._raw), pa)
                    # steps t-1 and t of a partition without parent indices: the raw dims line up
                    same = later_step(pa, pb)
                    if same is not None:
                        return _PT._wrap(func(a._raw, b._raw), same)
                plates = union_plates((pa, pb))
                k = max(a._raw.dim() - len(pa), b._raw.dim() - len(pb))
                return _PT._wrap(func(align(a._raw, pa, plates, k), align(b._raw, pb, plates, k)), plates)
            if not isinstance(b, _T):
                return wrap_same(func(a._raw, b), a._plates)
            pa = a._plates
            return wrap_same(func(align(a._raw, pa, pa, b.dim()), b), pa)
        if tb is _PT:
            if not isinstance(a, _T):
                return wrap_same(func(a, b._raw), b._plates)
            pb = b._plates
            return wrap_same(func(a, align(b._raw, pb, pb, a.dim())), pb)
    first = None
    same = True
    k0 = ks = plain = -1
    for a in _operands(args, kwargs):
        if type(a) is _PT:
            k = a._raw.dim() - len(a._plates)
            if first is None:
                first, k0 = a._plates, k
            elif k != k0 or (a._plates is not first and a._plates != first):
                same = False
            ks = max(ks, k)
        elif isinstance(a, _T):
            plain = max(plain, a.dim())
    if same and plain <= k0 and not _is_inplace(func):
        # fast path: one set of plates and one per-sample rank: no views needed
        out = func(*[a._raw if type(a) is _PT else a for a in args],
                   **{k: (v._raw if type(v) is _PT else unwrap(v, first)) for k, v in kwargs.items()})
        return wrap_same(out, first)
    return _call(func, args, kwargs, max(ks, plain))


@register(torch.broadcast_tensors)
def _broadcast_tensors(func, args, kwargs):
    # fast path (every distribution built from plate tensors calls this through broadcast_all):
    # plate tensors that already share plates and raw shape broadcast to themselves
    first = args[0] if args else None
    if not kwargs and type(first) is _PT and all(
        type(a) is _PT and (a._plates is first._plates or a._plates == first._plates)
        and a._raw.shape == first._raw.shape for a in args
    ):
        return tuple(args)
    groups = scan(args, kwargs)
    plates = union_plates(groups)
    pad = max(_ndim(a) for a in args)
    raws = [unwrap(a, plates, pad) for a in args]
    # plain operands get the plate dims too, so every result is a PlateTensor
    return tuple(_PT._wrap(r, plates) for r in torch.broadcast_tensors(*raws))


import torch.nn.functional as _F  # noqa: E402

# elementwise functions of torch.nn.functional whose Python name has no aten operator
register_plate_handler([_F.threshold, _F.threshold_, _F.logsigmoid, _F.hardtanh, _F.relu6, _F.elu, _F.selu,
                        _F.celu, _F.leaky_relu, _F.hardsigmoid, _F.hardswish, _F.silu, _F.mish, _F.softplus,
                        _F.softshrink, _F.hardshrink, _F.tanhshrink, _F.softsign, _F.gelu, _F.relu,
                        _F.sigmoid, _F.tanh],
                       "pointwise", note="elementwise activation")

from . import _plate_meta  # noqa: E402,F401  (registers metadata and conversion handlers)
from . import _plate_shape_ops  # noqa: E402,F401  (registers the dim-aware handlers)
from ._plate_batch import batch_first  # noqa: E402  (registers the batch-first functions)
from ._plate_vmap import vmap_call  # noqa: E402


def random_pointwise(func, args, kwargs):
    """Random elementwise functions: every plate expanded to full size, so each entry draws its own noise."""
    groups = scan(args, kwargs)
    plates = union_plates(groups)
    sizes = [p.size for p in plates]
    if _is_inplace(func):
        x = args[0]
        if type(x) is not _PT or tuple(x._raw.shape[: len(plates)]) != tuple(sizes):
            raise PlateError(
                f"in-place random {describe(func)} on a tensor that is shared across plates "
                f"{_names(plates)} would give every plate entry the same draw; use the out-of-place "
                "version (e.g. torch.rand_like(x) instead of x.uniform_())"
            )
        return _call(func, args, kwargs, -1)
    pad = max([_ndim(a) for a in _operands(args, kwargs) if isinstance(a, _T)] or [0])

    def full(a):
        if type(a) is _PT:
            r = align(a._raw, a._plates, plates, pad)
            return r.expand(*sizes, *r.shape[len(plates):])
        return a

    out = func(*[full(a) for a in args], **{k: full(v) for k, v in kwargs.items()})
    return wrap(out, plates)


def broadcast_inplace(func, args, kwargs):
    """Pointwise, in place: the written tensor must already carry every plate of the result."""
    return broadcast(func, args, kwargs)


def refused(message: str):
    def handler(func, args, kwargs):
        raise PlateError(f"{describe(func)} cannot run on plate tensors: {message}")
    return handler


def user_error(func, args, kwargs, e: BaseException) -> PlateError:
    """A PlateError (of the original exception's kind) that describes the call in per-sample terms."""
    parts = []
    for a in _operands(args, kwargs or {}):
        if type(a) is _PT:
            ps = ", ".join(f"{p.name}={p.size}" for p in a._plates)
            parts.append(f"{tuple(a.shape)} on plates ({ps})")
        elif isinstance(a, _T):
            parts.append(f"{tuple(a.shape)} (plain)")
    return plate_error_from(
        e,
        f"{describe(func)} failed on plate tensors. Per sample (as your code sees them) its tensor "
        f"arguments have shapes {', '.join(parts) or '()'}; the plates are vectorised by storch "
        f"({treatment_of(func).treatment.value} treatment). torch said: {e}",
    )


_IMPL: dict = {}
_LISTENERS.append(_IMPL.clear)


def _implementation(func):
    e: Entry = treatment_of(func)
    t = e.treatment
    if t is Treatment.POINTWISE:
        impl = random_pointwise if e.impl else (broadcast_inplace if _is_inplace(func) else broadcast)
    elif t is Treatment.HANDLER:
        impl = e.impl
    elif t is Treatment.BATCH_FIRST:
        spec = e.impl

        def impl(func, args, kwargs):
            return batch_first(spec, func, args, kwargs)
    elif t is Treatment.VMAP:
        impl = vmap_call
    else:
        impl = refused(e.impl)
    _IMPL[func] = impl
    return impl


def _torch_function(cls, func, types, args=(), kwargs=None):
    # PlateTensor.__torch_function__, the dispatcher. The implementation of each function is
    # decided once (storch._treatments) and cached; the most common case (one plate tensor
    # through an elementwise function: sigmoid, tanh, exp, ...) runs inline.
    impl = _IMPL.get(func)
    if impl is None:
        impl = _implementation(func)
    try:
        if impl is broadcast and not kwargs and len(args) == 1 and type(args[0]) is _PT:
            x = args[0]
            out = func(x._raw)
            if type(out) is _T:
                return _PT._wrap(out, x._plates)
            return wrap(out, x._plates)
        return impl(func, args, kwargs or {})
    except PlateError:
        raise
    except (RuntimeError, ValueError, IndexError, TypeError) as e:
        raise user_error(func, args, kwargs, e) from e


# bound here, once, rather than looked up on every torch call (our own class: nothing in torch
# is patched)
PlateTensor.__torch_function__ = classmethod(eager_only(_torch_function))
