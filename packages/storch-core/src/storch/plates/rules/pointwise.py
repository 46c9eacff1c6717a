"""The pointwise treatment: elementwise functions on plate tensors, plates aligned by name.

Pointwise functions take a fast path when all plate operands share the same plates and
per-sample rank: unwrap, call once, wrap. Otherwise operands are aligned by plate name (views
only: permute/unsqueeze) and their per-sample dims left-padded so that a plain tensor never
broadcasts into a plate dimension. Random elementwise functions expand every plate so that each
entry draws its own noise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as _F

from ...errors import PlateError
from ..kit import _is_inplace, _ndim, _operands, plates_or_empty, register, scan, unwrap, wrap, wrap_same
from ..tensor import PlateTensor, _names, align, inplace_write_message, later_step, union_plates, write_plates
from ..tensor import new_plate_tensor as _new
from ..treatments import describe, register_plate_handler

__all__ = ["broadcast", "broadcast_inplace", "random_pointwise", "per_sample_dtype", "write_in_place"]

_PT = PlateTensor
_T = torch.Tensor


# -- type promotion per sample -------------------------------------------------------------------
# torch promotes a dimensioned tensor over a 0-dim one of the same category (float16 x * float32
# 0-dim t is float16). A 0-dim per-sample plate tensor has raw dims (its plates), so the raw call
# would count it as dimensioned. Where operand dtypes differ and such an operand meets another
# tensor, the dtype torch gives per sample is computed (``per_sample_dtype``) and, where the raw
# call would give another, the 0-dim plate operands are cast to it first: torch casts every
# operand to that common dtype before computing, so the values are torch's per sample too.

_NO_PROMOTION = {"to", "type", "type_as"}  # a tensor argument names the dtype: it is not promoted


def _scalar_dtype(x) -> torch.dtype:
    """The dtype torch gives a Python number in promotion (a wrapped number)."""
    if isinstance(x, bool):
        return torch.bool
    if isinstance(x, int):
        return torch.int64
    if isinstance(x, float):
        return torch.get_default_dtype()
    return torch.complex128 if torch.get_default_dtype() == torch.float64 else torch.complex64


_COMPLEX = {torch.float16: torch.complex32, torch.float32: torch.complex64, torch.float64: torch.complex128}


def _combine(higher, lower):
    # c10's combine_categories (None: no operand of that kind)
    if higher is None:
        return lower
    if lower is None or higher.is_complex:
        return higher
    if lower.is_complex:
        return _COMPLEX.get(higher, lower) if higher.is_floating_point else lower  # higher's precision
    if higher.is_floating_point:
        return higher
    if higher == torch.bool or lower.is_floating_point:
        return torch.promote_types(higher, lower)
    return higher


def per_sample_dtype(operands, raw: bool = False):
    """torch's common dtype (``torch.result_type`` over any number of operands) of ``operands``
    as one sample sees them: a plate tensor is 0-dim when its per-sample shape is (its raw dims,
    its plates, make no difference); with ``raw``: as the raw call sees them. ``None`` where no
    operand is a tensor or a number."""
    dim = zero = wrapped = None
    for a in operands:
        t = type(a)
        if t is _PT:
            d = a._raw.dtype
            is_zero = (a._raw.dim() == 0) if raw else (a._raw.dim() == len(a._plates))
        elif isinstance(a, _T):
            d, is_zero = a.dtype, a.dim() == 0
        elif isinstance(a, (bool, int, float, complex)):
            d = _scalar_dtype(a)
            wrapped = d if wrapped is None else torch.promote_types(wrapped, d)
            continue
        else:
            continue
        if is_zero:
            zero = d if zero is None else torch.promote_types(zero, d)
        else:
            dim = d if dim is None else torch.promote_types(dim, d)
    return _combine(dim, _combine(zero, wrapped))


def _promoted(func, args, kwargs):
    """``(args, kwargs, result_dtype)`` with the 0-dim per-sample plate operands cast to the dtype torch promotes
    to per sample, where the raw call would promote to another (``result_dtype``: for an integral one, the
    operands as they are and the dtype an integral result is cast to); ``None`` where it would not."""
    dtype = None
    zero = mixed = False  # cheap first: a 0-dim sample among tensors of more than one dtype
    for a in _operands(args, kwargs):
        if type(a) is _PT:
            r = a._raw
            d = r.dtype
            if r.dim() == len(a._plates):
                zero = True
        elif isinstance(a, _T):
            d = a.dtype
        else:
            continue
        if dtype is None:
            dtype = d
        elif d is not dtype:
            mixed = True
    if not (zero and mixed) or getattr(func, "__name__", "") in _NO_PROMOTION:
        return None
    ops = list(_operands(args, kwargs))
    want = per_sample_dtype(ops)
    if want is None or want == per_sample_dtype(ops, raw=True):
        return None
    if not (want.is_floating_point or want.is_complex) and not _is_inplace(func):
        # an integral common dtype: the operands are not cast (true division and atan2 compute in floating point
        # with the operands' values, and a sampled -5 cast to uint8 is 251: found by review), the call runs in the
        # raw call's wider integer dtype and an integral result is cast to torch's per-sample dtype (the same
        # values modulo the narrower range, as torch's arithmetic in it gives)
        return args, kwargs, want

    def cast(a):
        # bool operands never change a promotion (the lowest dtype) and may be a condition or a mask
        if (type(a) is _PT and a._raw.dim() == len(a._plates) and a._raw.dtype != want
                and a._raw.dtype != torch.bool):
            return _new(a._raw.to(want), a._plates)
        if type(a) is list or type(a) is tuple:
            return type(a)(cast(b) for b in a)
        return a

    # an in-place function writes into its first argument: that one is never replaced by a cast copy
    first = args[:1] if _is_inplace(func) else tuple(cast(a) for a in args[:1])
    return first + tuple(cast(a) for a in args[1:]), {k: cast(v) for k, v in kwargs.items()}, None


def _dtypes_differ(args, kwargs) -> bool:
    ds = {a._raw.dtype if type(a) is _PT else a.dtype for a in _operands(args, kwargs) if isinstance(a, _T)}
    return len(ds) > 1


def _call(func, args, kwargs, pad: int):
    integral = None  # the per-sample integral dtype of the result (_promoted)
    # (the common cases, nothing to promote: two plate tensors of one dtype, a tensor and a number)
    if len(args) != 2 or kwargs or isinstance(args[1], _T) and not (
            type(args[0]) is _PT and type(args[1]) is _PT and args[0]._raw.dtype is args[1]._raw.dtype):
        fixed = _promoted(func, args, kwargs)
        if fixed is not None:
            args, kwargs, integral = fixed
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
            raise PlateError(inplace_write_message(
                getattr(func, '__name__', str(func)), plates, self,
                f"a tensor with plates {_names(plates_or_empty(self))}"))
        # a tensor of step t-1 of a partition written with step t's values: aligned to step t's plates,
        # whose raw dims are self's where the entries stayed in place (write_plates); self keeps its plates
        wp = write_plates(self._plates, plates, func)
        plates = self._plates if wp is None else wp
    raws = tuple(unwrap(a, plates, pad) for a in args)
    rkw = {k: unwrap(v, plates, pad) for k, v in kwargs.items()} if kwargs else kwargs
    if inplace:
        try:
            func(*raws, **rkw)
        except RuntimeError:
            # (torch's "output with shape [1, ...] doesn't match the broadcast shape": the error path only)
            _check_shared(func, self, plates, args, kwargs)
            raise
        return self  # the raw tensor was modified in place; the wrapper still describes it
    out = func(*raws, **rkw)
    if integral is not None and isinstance(out, _T) and out.dtype != integral and out.dtype != torch.bool \
            and not (out.is_floating_point() or out.is_complex()):
        out = out.to(integral)
    return wrap(out, plates)


def _check_shared(func, self, plates, args, kwargs) -> None:
    """Refuse an in-place write into a tensor that holds a plate once (a size-1 raw plate dim, which
    ``PlateTensor(raw, plates)`` allows) with values that vary over that plate."""
    shared = [i for i, p in enumerate(plates) if self._raw.shape[i] == 1 and p.size > 1]
    varying = set()
    for a in _operands(args, kwargs):
        if type(a) is _PT and a is not self:
            r = align(a._raw, a._plates, plates)
            varying.update(plates[i].name for i in shared if r.shape[i] > 1)
    if varying:
        raise PlateError(
            f"in-place {getattr(func, '__name__', func)} would write values that vary over plates "
            f"{tuple(n for n in _names(plates) if n in varying)} into a tensor that holds them once (its raw "
            "tensor has size 1 there: one value shared by every entry); use the out-of-place version "
            "(e.g. x = x + v instead of x += v)"
        )


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
                    if pa is pb or pa == pb:  # one per-sample rank: the raw call promotes as torch does
                        return _new(func(a._raw, b._raw), pa)
                    # steps t-1 and t of a partition without parent indices: the raw dims line up
                    same = later_step(pa, pb)
                    if same is not None:
                        return _new(func(a._raw, b._raw), same)
                ka, kb = a._raw.dim() - len(pa), b._raw.dim() - len(pb)
                if (ka == 0) != (kb == 0) and a._raw.dtype is not b._raw.dtype:
                    return _call(func, args, kwargs, max(ka, kb))  # a 0-dim sample of another dtype
                plates = union_plates((pa, pb))
                k = max(ka, kb)
                return _new(func(align(a._raw, pa, plates, k), align(b._raw, pb, plates, k)), plates)
            if not isinstance(b, _T):
                return wrap_same(func(a._raw, b), a._plates)
            if a._raw.dtype is not b.dtype and a._raw.dim() == len(a._plates):  # a 0-dim sample, another dtype
                return _call(func, args, kwargs, b.dim())
            pa = a._plates
            return wrap_same(func(align(a._raw, pa, pa, b.dim()), b), pa)
        if tb is _PT:
            if not isinstance(a, _T):
                return wrap_same(func(a, b._raw), b._plates)
            if b._raw.dtype is not a.dtype and b._raw.dim() == len(b._plates):
                return _call(func, args, kwargs, a.dim())
            pb = b._plates
            return wrap_same(func(a, align(b._raw, pb, pb, a.dim())), pb)
    if (len(args) == 1 and type(args[0]) is _PT and not any(isinstance(v, _T) for v in kwargs.values())
            and not _is_inplace(func)):
        # one plate tensor and options that are not tensors (F.relu's inplace=, F.leaky_relu's
        # negative_slope=, clamp's min=): the raw call, as the general loop below would make it
        x = args[0]
        return wrap_same(func(x._raw, **kwargs), x._plates)
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
    # (0-dim samples meeting a plain 0-dim tensor of another dtype: _call promotes them as torch does per sample)
    if same and plain <= k0 and not _is_inplace(func) and not (k0 == 0 and plain == 0 and _dtypes_differ(args, kwargs)):
        # fast path: one set of plates and one per-sample rank: no views needed
        out = func(*[a._raw if type(a) is _PT else a for a in args],
                   **{k: (v._raw if type(v) is _PT else unwrap(v, first)) for k, v in kwargs.items()})
        return wrap_same(out, first)
    return _call(func, args, kwargs, max(ks, plain))


@register(torch.result_type)
def _result_type(func, args, kwargs):
    """torch's answer for one sample: a plate tensor counts with its per-sample shape (0-dim or not)"""
    def stand_in(a):  # an empty tensor of the per-sample rank and dtype (no data: torch reads neither)
        if type(a) is _PT:
            return torch.empty((1,) * (a._raw.dim() - len(a._plates)), dtype=a._raw.dtype, device="meta")
        return a
    return func(*[stand_in(a) for a in args], **{k: stand_in(v) for k, v in kwargs.items()})


@register(torch.broadcast_tensors)
def _broadcast_tensors(func, args, kwargs):
    """broadcasts per-sample shapes; plates aligned by name, every result a plate tensor"""
    # fast path (every distribution built from plate tensors calls this through broadcast_all):
    # plate tensors that already share plates and raw shape broadcast to themselves
    first = args[0] if args else None
    if len(args) == 1 and not kwargs and type(first) is _PT:  # (Bernoulli(logits=x): the test below, of one tensor,
        return tuple(args)  # without its generator's frames)
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
    return tuple(_new(r, plates) for r in torch.broadcast_tensors(*raws))



# elementwise functions of torch.nn.functional whose Python name has no aten operator
register_plate_handler([_F.threshold, _F.threshold_, _F.logsigmoid, _F.hardtanh, _F.relu6, _F.elu, _F.selu,
                        _F.celu, _F.leaky_relu, _F.hardsigmoid, _F.hardswish, _F.silu, _F.mish, _F.softplus,
                        _F.softshrink, _F.hardshrink, _F.tanhshrink, _F.softsign, _F.gelu, _F.relu,
                        _F.sigmoid, _F.tanh],
                       "pointwise", note="elementwise activation")

# dropout functions: the position, name and default of their `training` argument; without training
# they return their input (torch's own behaviour), so nothing is expanded or drawn
_DROPOUT_TRAINING = {_F.dropout: (2, "training", True), _F.alpha_dropout: (2, "training", False),
                     torch.dropout: (2, "train", True), torch.alpha_dropout: (2, "train", True)}


def random_pointwise(func, args, kwargs):
    """Random elementwise functions: every plate expanded to full size, so each entry draws its own noise."""
    training = _DROPOUT_TRAINING.get(func)
    if training is not None:
        pos, key, default = training
        if not kwargs.get(key, args[pos] if len(args) > pos else default):
            return args[0]  # eval mode: the input itself, as torch returns it
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


def _fill(x, mask, value):
    # masked_fill per sample with a 0-dim tensor value: value cast to x's dtype (as masked_fill does),
    # the result of x's shape broadcast with the mask's; the value's derivative sums the filled positions
    return torch.where(mask, value.to(x.dtype), x)


def write_in_place(name: str):
    """The raw write ``x.copy_(filled)`` of the in-place function ``name`` whose values are computed out of
    place (``masked_fill_``, ``index_fill_`` with a per-sample value). Passed to :func:`broadcast` with
    ``(x, filled)`` it gets ``_call``'s in-place checks (x must carry every plate of ``filled``; a table of a
    partition's earlier step), whose refusals name it, and returns ``x``."""
    def write(x, filled):
        return x.copy_(filled)
    write.__name__ = write.__qualname__ = name
    return write


masked_fill_ = write_in_place("masked_fill_")


@register(torch.masked_fill, _T.masked_fill, _T.masked_fill_)
def _masked_fill(func, args, kwargs):
    """elementwise; a per-sample 0-dim value (a plate tensor) fills each sample with its own value

    On the raw tensors that value has the plate dims, which masked_fill refuses (a 0-dim value only)."""
    value = args[2] if len(args) > 2 else kwargs.get("value")
    if type(value) is not _PT:
        return broadcast(func, args, kwargs)
    k = value._raw.dim() - len(value._plates)
    if k:  # torch's refusal, in per-sample dims
        raise RuntimeError(f"masked_fill_ only supports a 0-dimensional value tensor, but got tensor with {k} "
                           "dimension(s).")
    bound = dict(zip(("input", "mask"), args))
    bound.update((key, v) for key, v in kwargs.items() if key in ("input", "mask"))
    x, mask = bound.get("input"), bound.get("mask")
    if x is None or mask is None or set(kwargs) - {"input", "mask", "value"}:
        return broadcast(func, args, kwargs)  # torch's own error (a missing argument)
    filled = broadcast(_fill, (x, mask, value), {})
    if func is _T.masked_fill_:
        return broadcast(masked_fill_, (x, filled), {})
    return filled
