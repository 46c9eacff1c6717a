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
from ..tensor import PlateTensor, _names, align, later_step, union_plates, write_plates
from ..tensor import new_plate_tensor as _new
from ..treatments import describe, register_plate_handler

__all__ = ["broadcast", "broadcast_inplace", "random_pointwise"]

_PT = PlateTensor
_T = torch.Tensor


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
        # a tensor of step t-1 of a partition written with step t's values: aligned to step t's plates,
        # whose raw dims are self's where the entries stayed in place (write_plates); self keeps its plates
        wp = write_plates(self._plates, plates, func)
        plates = self._plates if wp is None else wp
    args = tuple(unwrap(a, plates, pad) for a in args)
    if kwargs:
        kwargs = {k: unwrap(v, plates, pad) for k, v in kwargs.items()}
    out = func(*args, **kwargs)
    if inplace:
        return self  # the raw tensor was modified in place; the wrapper still describes it
    return wrap(out, plates)


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
                        return _new(func(a._raw, b._raw), pa)
                    # steps t-1 and t of a partition without parent indices: the raw dims line up
                    same = later_step(pa, pb)
                    if same is not None:
                        return _new(func(a._raw, b._raw), same)
                plates = union_plates((pa, pb))
                k = max(a._raw.dim() - len(pa), b._raw.dim() - len(pb))
                return _new(func(align(a._raw, pa, plates, k), align(b._raw, pb, plates, k)), plates)
            if not isinstance(b, _T):
                return wrap_same(func(a._raw, b), a._plates)
            pa = a._plates
            return wrap_same(func(align(a._raw, pa, pa, b.dim()), b), pa)
        if tb is _PT:
            if not isinstance(a, _T):
                return wrap_same(func(a, b._raw), b._plates)
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
    if same and plain <= k0 and not _is_inplace(func):
        # fast path: one set of plates and one per-sample rank: no views needed
        out = func(*[a._raw if type(a) is _PT else a for a in args],
                   **{k: (v._raw if type(v) is _PT else unwrap(v, first)) for k, v in kwargs.items()})
        return wrap_same(out, first)
    return _call(func, args, kwargs, max(ks, plain))


@register(torch.broadcast_tensors)
def _broadcast_tensors(func, args, kwargs):
    """broadcasts per-sample shapes; plates aligned by name, every result a plate tensor"""
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


def masked_fill_(x, filled):
    # the raw write of masked_fill_ with a per-sample value (named so: _call's in-place checks and
    # its refusals read the name)
    return x.copy_(filled)


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
