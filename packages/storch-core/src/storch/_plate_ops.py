"""How torch functions run on plate tensors: the dispatch table and the generic handlers.

Every call that involves a :class:`PlateTensor` comes here through ``__torch_function__``.
The common case (all plate operands share the same plates and per-sample rank) takes a fast
path: unwrap, call once, wrap. Otherwise operands are aligned by plate name (views only:
permute/unsqueeze) and, for broadcasting functions, their per-sample dims are left-padded so
that a plain tensor never broadcasts into a plate dimension. Functions whose arguments name
dimensions are handled in ``_plate_shape_ops``; anything that would silently mix plates
raises :class:`storch.PlateError` instead.
"""

from __future__ import annotations

import torch

from ._errors import PlateError
from ._plates import Plate, PlateTensor, _names, align, union_plates

__all__ = ["dispatch", "register", "wrap", "scan", "unwrap", "too_many_samples"]

_PT = PlateTensor
_T = torch.Tensor
HANDLERS: dict = {}


def register(*funcs):
    """Decorator: use the decorated handler for these torch functions."""

    def deco(handler):
        for f in funcs:
            HANDLERS[f] = handler
        return handler

    return deco


def dispatch(func, args, kwargs):
    """Run torch function ``func`` on arguments that include plate tensors."""
    return _torch_function(PlateTensor, func, (), args, kwargs)


# -- helpers -----------------------------------------------------------------------------


def wrap(out, plates: tuple[Plate, ...]):
    """Wrap raw outputs (tensors, or tuples of them) with ``plates``."""
    if isinstance(out, _T):
        return _PT._wrap(out, plates) if plates else out
    if isinstance(out, (tuple, list)):
        items = [wrap(o, plates) for o in out]
        if type(out) in (tuple, list):
            return type(out)(items)
        try:  # torch.return_types.* structseqs
            return type(out)(items)
        except TypeError:
            return tuple(items)
    return out


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


def _default(func, args, kwargs):
    """Functions that act on trailing dims (elementwise, softmax(dim=-1), linear, ...)."""
    ks = set()
    plain = 0
    first = None
    same = True
    for a in _operands(args, kwargs):
        if type(a) is _PT:
            ks.add(a._raw.dim() - len(a._plates))
            if first is None:
                first = a._plates
            elif a._plates is not first and a._plates != first:
                same = False
        elif isinstance(a, _T):
            plain = max(plain, a.dim())
    if same and len(ks) == 1 and plain <= min(ks) and not _is_inplace(func):
        # fast path (linear, binary_cross_entropy_with_logits, ...): one set of plates and one
        # per-sample rank among the operands, so the raw tensors line up without any view
        out = func(*[a._raw if type(a) is _PT else unwrap(a, first) for a in args],
                   **{k: (v._raw if type(v) is _PT else unwrap(v, first)) for k, v in kwargs.items()})
        return wrap(out, first)
    if len(ks) > 1 or (ks and plain > min(ks)):
        raise PlateError(
            f"storch does not know how {getattr(func, '__qualname__', func)} broadcasts, and its "
            "operands have different numbers of per-sample dims, so plain dims could land on plate "
            "dims. Reshape the operands to the same number of dims (e.g. with unsqueeze) first"
        )
    return _call(func, args, kwargs, -1)


def broadcast(func, args, kwargs):
    """Elementwise functions with torch broadcasting: pad per-sample dims, align by plate."""
    if not kwargs and len(args) == 2 and not _is_inplace(func):
        # fast paths: a plate tensor and a Python scalar, or two plate tensors with equal plates
        a, b = args
        ta, tb = type(a), type(b)
        if ta is _PT:
            if tb is _PT:
                pa, pb = a._plates, b._plates
                if (pa is pb or pa == pb) and a._raw.dim() == b._raw.dim():
                    return _PT._wrap(func(a._raw, b._raw), pa)
                plates = union_plates((pa, pb))
                k = max(a._raw.dim() - len(pa), b._raw.dim() - len(pb))
                return _PT._wrap(func(align(a._raw, pa, plates, k), align(b._raw, pb, plates, k)), plates)
            if not isinstance(b, _T):
                return wrap(func(a._raw, b), a._plates)
            pa = a._plates
            return wrap(func(align(a._raw, pa, pa, b.dim()), b), pa)
        if tb is _PT:
            if not isinstance(a, _T):
                return wrap(func(a, b._raw), b._plates)
            pb = b._plates
            return wrap(func(a, align(b._raw, pb, pb, a.dim())), pb)
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
        return wrap(out, first)
    return _call(func, args, kwargs, max(ks, plain))


def _broadcast_names():
    ops = [
        "add", "sub", "subtract", "mul", "multiply", "div", "divide", "true_divide", "floor_divide",
        "pow", "float_power", "remainder", "fmod", "eq", "ne", "lt", "le", "gt", "ge", "greater",
        "less", "greater_equal", "less_equal", "not_equal", "maximum", "minimum", "fmax", "fmin",
        "atan2", "arctan2", "logaddexp", "logaddexp2", "where", "clamp", "clip", "lerp", "addcmul",
        "addcdiv", "xlogy", "logical_and", "logical_or", "logical_xor", "bitwise_and", "bitwise_or",
        "bitwise_xor", "copysign", "hypot", "masked_fill", "isclose", "heaviside", "rsub",
    ]
    funcs = []
    for name in ops:
        for owner in (torch, _T):
            f = getattr(owner, name, None)
            if f is not None:
                funcs.append(f)
            f = getattr(_T, name + "_", None)
            if f is not None and owner is _T:
                funcs.append(f)
    for d in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "and", "or", "xor",
              "eq", "ne", "lt", "le", "gt", "ge", "lshift", "rshift"):
        for pre in ("__", "__r", "__i"):
            f = getattr(_T, f"{pre}{d}__", None)
            if f is not None:
                funcs.append(f)
    funcs += [torch.special.xlogy, torch.special.xlog1py]
    return funcs


register(*_broadcast_names())(broadcast)


# -- metadata and conversions ----------------------------------------------------------------


def _meta(func, args, kwargs):
    # the wrapper itself carries the per-sample shape, dtype and device
    with torch._C.DisableTorchFunctionSubclass():
        return func(*args, **kwargs)


register(
    _T.size, _T.dim, _T.ndimension, _T.numel, _T.nelement, _T.__len__, _T.is_floating_point,
    _T.is_complex, _T.is_signed, _T.element_size, _T.get_device,
    *(getattr(_T, p).__get__ for p in (
        "shape", "ndim", "dtype", "device", "layout", "is_cuda", "is_sparse", "is_quantized",
        "is_meta", "is_mps", "is_nested", "is_cpu",
    )),
)(_meta)


@register(*(getattr(_T, p).__get__ for p in ("requires_grad", "grad_fn", "is_leaf", "grad", "data")))
def _raw_property(func, args, kwargs):
    x = args[0]
    return wrap(func(x._raw), x._plates)


@register(_T.T.__get__, _T.mT.__get__)
def _transposed(func, args, kwargs):
    x = args[0]
    n, k = len(x._plates), x._raw.dim() - len(x._plates)
    if func == _T.mT.__get__:
        return wrap(x._raw.transpose(-2, -1), x._plates)
    return wrap(x._raw.permute(*range(n), *reversed(range(n, n + k))), x._plates)


@register(torch._is_all_true, torch._is_any_true)
def _over_all_samples(func, args, kwargs):
    # used by torch.distributions argument validation: every sample must be valid
    return func(args[0]._raw)


def _single(func, args, kwargs):
    x = args[0]
    if type(x) is not _PT:
        return func(*args, **kwargs)
    if x._raw.shape[: len(x._plates)].numel() != 1:
        raise too_many_samples(x, f"`{getattr(func, '__name__', func)}`")
    return func(x._raw.reshape(x._raw.shape[len(x._plates):]), *args[1:], **kwargs)


register(_T.item, _T.tolist, _T.numpy, _T.__bool__, _T.__int__, _T.__float__, _T.__index__,
         _T.__array__, _T.__complex__)(_single)


@register(_T.new_zeros, _T.new_ones, _T.new_full, _T.new_empty, _T.new_tensor)
def _no_plates(func, args, kwargs):
    return func(args[0]._raw, *args[1:], **kwargs)


@register(_T.backward)
def _no_backward(func, args, kwargs):
    raise PlateError(
        "call storch.backward() (or differentiate storch.surrogate_loss()) instead of .backward() "
        "on a PlateTensor: the surrogate loss is what carries the gradient estimators"
    )


@register(_T.__deepcopy__)
def _deepcopy(func, args, kwargs):
    import copy

    x = args[0]
    return _PT._wrap(copy.deepcopy(x._raw, args[1] if len(args) > 1 else None), x._plates)


@register(_T.__iter__)
def _iter(func, args, kwargs):
    return iter(dispatch(_T.unbind, (args[0], 0), {}))


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


from . import _plate_shape_ops  # noqa: E402,F401  (registers the dim-aware handlers)


def _torch_function(cls, func, types, args=(), kwargs=None):
    # PlateTensor.__torch_function__, the dispatcher: a registered handler if there is one;
    # otherwise the most common case (one plate tensor through a function acting on trailing
    # dims: sigmoid, tanh, exp, ...) runs inline, and the rest goes to _default
    handler = HANDLERS.get(func)
    if handler is not None:
        return handler(func, args, kwargs or {})
    if not kwargs and len(args) == 1 and type(args[0]) is _PT:
        x = args[0]
        out = func(x._raw)
        if _is_inplace(func):
            return x
        if type(out) is _T:
            return _PT._wrap(out, x._plates)
        return wrap(out, x._plates)
    return _default(func, args, kwargs or {})


# bound here, once, rather than looked up on every torch call (our own class: nothing in torch
# is patched)
PlateTensor.__torch_function__ = classmethod(_torch_function)
