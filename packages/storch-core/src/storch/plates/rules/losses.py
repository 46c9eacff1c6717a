"""Loss functions on plate tensors: computed per sample, reduced over per-sample dims only.

``F.mse_loss(x, y)`` in one-sample code means the mean over that sample's elements; on plate
tensors the loss is evaluated with ``reduction="none"`` once for all samples and then reduced
over the per-sample dims, so no reduction ever crosses a plate.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...errors import PlateError
from ..kit import register, scan, unwrap, wrap, wrap_same
from .shape import _full
from ..tensor import PlateTensor, union_plates

_PT = PlateTensor


def _reduce(out, reduction, n, what):
    if reduction == "none":
        return out
    flat = out.reshape(out.shape[:n] + (-1,))
    if reduction == "sum":
        return flat.sum(-1)
    if reduction == "mean":
        return flat.mean(-1)
    raise PlateError(f"reduction={reduction!r} of {what} is not supported on plate tensors")


def _broadcast_pair(a: torch.Tensor, b: torch.Tensor) -> tuple:
    """``torch.broadcast_tensors(a, b)`` by at most two ``expand``s (a plain or data-plate target
    against (samples, data) logits: a VAE's reconstruction loss)."""
    sa, sb = tuple(a.shape), tuple(b.shape)
    m = max(len(sa), len(sb))
    pa, pb = (1,) * (m - len(sa)) + sa, (1,) * (m - len(sb)) + sb
    shape = []
    for x, y in zip(pa, pb):
        if x != y and x != 1 and y != 1:
            return torch.broadcast_tensors(a, b)  # torch's own error
        shape.append(x if y == 1 else y)
    shape = tuple(shape)
    return (a if sa == shape else a.expand(shape)), (b if sb == shape else b.expand(shape))


def _expand_to_trailing(a, b):
    """``(plates, raw a, raw b)`` with the operand on fewer plates expanded by one ``expand`` to
    the other's raw shape, when its raw shape is the trailing part of the other's: its plates are
    the other's last plates, in order, with the same sizes, and the per-sample shapes are equal
    (a target on the data plate against logits on (samples, data): a VAE's reconstruction loss).
    Trailing alignment is then exactly storch's alignment by name. ``None`` otherwise."""
    ops = []
    for x in (a, b):
        if type(x) is _PT:
            ops.append((x._plates, x._raw))
        elif isinstance(x, torch.Tensor):
            ops.append(((), x))
        else:
            return None
    (pa, ra), (pb, rb) = ops
    na, nb = len(pa), len(pb)
    if na > nb:
        if pa[na - nb:] == pb and ra.shape[na - nb:] == rb.shape:
            return pa, ra, rb.expand(ra.shape)
    elif nb > na and pb[nb - na:] == pa and rb.shape[nb - na:] == ra.shape:
        return pb, ra.expand(rb.shape), rb
    return None


def _elementwise_loss(func, args, kwargs):
    reduction = kwargs.pop("reduction", "mean") if kwargs else "mean"
    if kwargs:
        kwargs = {k: v for k, v in kwargs.items() if k not in ("size_average", "reduce")}
    a, b = args[0], args[1]
    if (type(a) is _PT and type(b) is _PT and (a._plates is b._plates or a._plates == b._plates)
            and a._raw.dim() == b._raw.dim()):
        plates = a._plates  # fast path: the operands already line up (no alignment, no padding)
        ra, rb = a._raw, b._raw
        pad = ra.dim() - len(plates)
    elif (expanded := _expand_to_trailing(a, b)) is not None:
        plates, ra, rb = expanded
        pad = ra.dim() - len(plates)
    else:
        plates = union_plates(scan(args, kwargs))
        ka = a._raw.dim() - len(a._plates) if type(a) is _PT else a.dim()
        kb = b._raw.dim() - len(b._plates) if type(b) is _PT else b.dim()
        pad = ka if ka > kb else kb
        ra, rb = unwrap(a, plates, pad), unwrap(b, plates, pad)
    # these losses want equal shapes: broadcast both operands fully (views)
    raws = (ra, rb) if ra.shape == rb.shape else _broadcast_pair(ra, rb)
    shape = raws[0].shape
    kw = {k: unwrap(v, plates, pad) for k, v in kwargs.items()} if kwargs else kwargs
    red = reduction
    if func is F.kl_div and reduction == "batchmean":
        red = "sum"
    out = func(*raws, *args[2:], reduction="none", **kw)
    out = _reduce(out, red, len(plates), func.__name__)
    if reduction == "batchmean":
        out = out / (shape[len(plates)] if len(shape) > len(plates) else 1)
    return wrap_same(out, plates)


register(F.binary_cross_entropy, F.binary_cross_entropy_with_logits, F.mse_loss, F.l1_loss,
         F.smooth_l1_loss, F.huber_loss, F.kl_div, F.poisson_nll_loss, F.soft_margin_loss,
         note="elementwise loss computed with reduction=\"none\", then reduced over each sample's dims")(
    lambda func, args, kwargs: _elementwise_loss(func, args, dict(kwargs)))


@register(F.cross_entropy, F.nll_loss)
def _class_loss(func, args, kwargs):
    """computed with reduction="none" per sample (class dim 1 of a batch, 0 of one input), then reduced per sample"""
    kwargs = dict(kwargs)
    inp, target = args[0], args[1]
    weight = args[2] if len(args) > 2 else kwargs.pop("weight", None)
    reduction = kwargs.pop("reduction", "mean")
    ignore = kwargs.get("ignore_index", -100)
    kwargs.pop("size_average", None)
    kwargs.pop("reduce", None)
    plates = union_plates(scan((inp, target), {}))
    n = len(plates)
    ri, rt = _full(inp, plates), _full(target, plates)
    sizes = ri.shape[:n]
    k = ri.dim() - n
    probs = rt.dtype.is_floating_point
    if k == 1:
        out = func(ri.reshape(-1, ri.shape[-1]), rt.reshape((-1, ri.shape[-1]) if probs else (-1,)),
                   weight, reduction="none", **kwargs).reshape(sizes)
    else:
        out = func(ri.reshape((-1,) + ri.shape[n + 1:]), rt.reshape((-1,) + rt.shape[n + 1:]),
                   weight, reduction="none", **kwargs).reshape(sizes + (ri.shape[n],) + ri.shape[n + 2:])
    if reduction == "mean" and not probs:
        if k == 1 and weight is None:
            # one target per sample: the mean is the loss itself, NaN (0/0) where it is ignored, as torch's
            out = out / (rt != ignore)
        else:
            w = torch.ones_like(out) if weight is None else weight[rt.clamp(min=0)]
            w = w * (rt != ignore)
            out = out.reshape(sizes + (-1,)).sum(-1) / w.reshape(sizes + (-1,)).sum(-1)
    elif not (k == 1 and reduction == "sum"):  # one target per sample: its sum is the loss itself
        out = _reduce(out, reduction, n, func.__name__)
    return wrap(out, plates)



@register(F.gaussian_nll_loss)
def _gaussian_nll(func, args, kwargs):
    """per sample: evaluated with reduction="none" on all entries, then reduced per sample"""
    kwargs = dict(kwargs)
    names = ("input", "target", "var")
    vals = [args[i] if len(args) > i else kwargs.pop(n) for i, n in enumerate(names)]
    rest = args[3:]
    reduction = kwargs.pop("reduction", rest[2] if len(rest) > 2 else "mean")
    rest = rest[:2]
    plates = union_plates(scan(vals, {}))
    raws = [_full(v, plates) if isinstance(v, torch.Tensor) else v for v in vals]
    out = func(*raws, *rest, reduction="none", **kwargs)
    return wrap(_reduce(out, reduction, len(plates), "gaussian_nll_loss"), plates)
