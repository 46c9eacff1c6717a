"""The batch-first treatment: functions with a batch dimension of their own.

Convolutions, pools, RNNs and their cells, attention, normalisation, interpolation, ... already
run on a batch. On plate tensors all plate dims are folded into the function's batch dim (next
to the per-sample batch dim when the per-sample input has one, or as a new batch dim when it
does not), the function is called once, and the batch dim of every output is unfolded back into
the plates: one kernel call, exact, and it covers functions (``_VF.lstm``) that
``torch.func.vmap`` has no batching rule for. A spec ``spec(args, kwargs) -> Plan | None``
says where the batch dims are; ``None`` (e.g. a per-sample weight tensor) sends the call to
the vmap treatment instead.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from ...errors import PlateError
from ..tensor import PlateTensor, align, later_step, union_plates
from ..tensor import new_plate_tensor as _new
from .vmap import vmap_call
from ..treatments import PACKED_SEQUENCES, Entry, Treatment, register_plate_handler

__all__ = ["Plan", "batch_first", "register_batch_first"]

_PT = PlateTensor
_T = torch.Tensor


class Plan(NamedTuple):
    """Where the batch dims are in one call.

    Attributes:
        inputs: ``((position, keyword, batch dim), ...)`` of the batched tensor arguments (a
            tuple/list argument means each of its tensors); ``batch dim`` is in per-sample coords.
        outputs: batch dim of each output (in per-sample coords), ``None`` for an output without
            one; a single int for a function that returns one tensor.
        unbatched: True when the per-sample inputs have no batch dim (one is created from the
            plates, and removed from the outputs).
        merged: positions of batched inputs whose batch dim exists per sample even when ``unbatched``
            (attention's (heads, L, S) mask of an unbatched query): the plates are folded into it,
            not into a new dim.
        call: ``(args, kwargs)`` as the spec rewrote them for the folded call (a sampled (L, S)
            attention mask as the (N * heads, L, S) mask it stands for), or ``None``: as they are.
    """

    inputs: tuple
    outputs: object
    unbatched: bool = False
    merged: tuple = ()
    call: Optional[tuple] = None


def register_batch_first(*funcs, note: str = ""):
    """Decorator: the decorated ``spec(args, kwargs) -> Plan | None`` is the batch-first spec of ``funcs``."""

    def deco(spec):
        register_plate_handler(funcs, Entry(Treatment.BATCH_FIRST, spec, note or (spec.__doc__ or "").strip()))
        return spec

    return deco


def _get(args, kwargs, pos, key, default=None):
    if key in kwargs:
        return kwargs[key]
    return args[pos] if len(args) > pos else default


def _set(args, kwargs, pos, key, value):
    if key in kwargs or len(args) <= pos:
        return args, {**kwargs, key: value}
    return args[:pos] + (value,) + args[pos + 1:], kwargs


def _rank(x) -> int:
    return x._raw.dim() - len(x._plates) if type(x) is _PT else x.dim()


def _fold(t, plates, b: int, batched: bool, sizes: Optional[tuple] = None):
    """Raw tensor with the plates folded into (per-sample) dim ``b`` (``sizes``: the plates' sizes)."""
    m = len(plates)
    if sizes is None:
        sizes = tuple(p.size for p in plates)
    if type(t) is _PT:
        r = t._raw if t._plates is plates else align(t._raw, t._plates, plates)
    else:
        r = t.expand(sizes + t.shape)
    return _fold_raw(r, m, b, batched, sizes)


def _fold_raw(r, m: int, b: int, batched: bool, sizes: tuple):
    """``_fold`` of a raw tensor whose leading ``m`` dims already are the plates (size 1 or full)."""
    s = r.shape
    if s[:m] != sizes:  # no expand (and no autograd node) when every plate is there
        r = r.expand(sizes + s[m:])
        s = r.shape
    if b and s[m:m + b].numel() == 1:
        # the per-sample dims before the batch dim have size 1 (an RNN's one-step input (1, N, F),
        # one layer's state (1, N, H)): moving the plates past them changes no element's place, so
        # one view (a copy only where `r` is an expanded or strided view) gives the folded layout,
        # contiguous as cuDNN wants it, without the permute and its autograd node
        per = s[m:]
        return r.reshape(per[:b] + (-1,) + per[b + batched:]).contiguous()
    if b:
        # a batch dim inside (RNN states (layers, N, H), (T, N, F) inputs, attention's (L, N, E)):
        # the moved layout is not contiguous, and cuDNN refuses a non-contiguous RNN state ("hx is
        # not contiguous"); the kernels copy such operands anyway, so copy once here
        r = r.movedim(tuple(range(m)), tuple(range(b, b + m)))
        return (r.flatten(b, b + m - 1 + batched) if m > 1 or batched else r).contiguous()
    return r.flatten(b, b + m - 1 + batched) if m > 1 or batched else r


def _unfold(o, sizes, c: int, batched: bool):
    if not c and not batched and len(sizes) == 1:
        # one plate folded into a new leading batch dim (a conv or pool on one data point per
        # entry): dim 0 already is that plate, so the output is returned as it is, without an
        # unflatten view and its autograd node (as a batched call by hand)
        return o
    if c and o.shape[:c].numel() == 1:  # the dims before the batch dim have size 1: one view
        return o.reshape(sizes + o.shape[:c] + ((-1,) if batched else ()) + o.shape[c + 1:])
    m = len(sizes)
    o = o.unflatten(c, sizes + ((-1,) if batched else ()))
    return o.movedim(tuple(range(c, c + m)), tuple(range(m))) if c else o


def batch_first(spec, func, args, kwargs):
    """Fold the plates into the batch dim of ``func``, call it once, unfold the outputs."""
    plan: Optional[Plan] = spec(args, kwargs)
    if plan is None:
        return vmap_call(func, args, kwargs)
    if plan.call is not None:
        args, kwargs = plan.call
    fast = None if kwargs else _positional_same_plates(plan, args)
    if fast is not None:
        plates, sizes = fast
        batched = not plan.unbatched
        folded = list(args)
        m = len(plates)
        for pos, _, b in plan.inputs:
            if pos < len(folded):  # its raw dims line up with `plates` (_positional_same_plates)
                folded[pos] = _fold_raw(folded[pos]._raw, m, b, batched or pos in plan.merged, sizes)
        return _unfold_outputs(func(*folded), plan, plates, sizes)
    batched_ids = set()
    groups = []
    for pos, key, b in plan.inputs:
        a = _get(args, kwargs, pos, key)
        for t in (a if isinstance(a, (tuple, list)) else (a,)):
            if isinstance(t, _T):
                batched_ids.add(id(t))
                if type(t) is _PT:
                    groups.append(t._plates)
    # any other per-sample tensor (a sampled weight, ...) goes to vmap
    for vals in (args, kwargs.values()):
        for a in vals:
            ta = type(a)
            if ta is _PT:
                if id(a) not in batched_ids:
                    return vmap_call(func, args, kwargs)
            elif isinstance(a, (tuple, list)):
                for t in a:
                    if type(t) is _PT and id(t) not in batched_ids:
                        return vmap_call(func, args, kwargs)
    if not groups:
        return vmap_call(func, args, kwargs)
    plates = groups[0] if len(groups) == 1 else union_plates(groups)
    sizes = tuple(p.size for p in plates)
    for pos, key, b in plan.inputs:
        a = _get(args, kwargs, pos, key)
        if a is None:
            continue
        batched = not plan.unbatched or pos in plan.merged
        if isinstance(a, (tuple, list)):
            new = type(a)(_fold(t, plates, b, batched, sizes) for t in a)
        else:
            new = _fold(a, plates, b, batched, sizes)
        args, kwargs = _set(args, kwargs, pos, key, new)
    return _unfold_outputs(func(*args, **kwargs), plan, plates, sizes)


def _positional_same_plates(plan: Plan, args: tuple):
    """``(plates, sizes)`` when every batched input is a positional plate tensor (no list), all on
    the same plates (or on steps of a partition that line up, :func:`later_step`), and no other
    argument holds a plate tensor (an RNN step, a convolution): the common case, without the
    general bookkeeping of ``batch_first``. ``None`` otherwise."""
    n = len(args)
    plates = None
    for pos, _, _ in plan.inputs:
        if pos >= n:  # an optional batched input left out (a key padding mask): nothing to fold
            continue
        a = args[pos]
        if type(a) is not _PT:
            return None
        if plates is None:
            plates = a._plates
        elif a._plates is not plates and a._plates != plates:
            # steps t-1 and t of a partition without parent indices (an RNN's state and its next
            # input): the raw dims line up as they are, under the later step's plates
            plates = later_step(plates, a._plates)
            if plates is None:
                return None
    if plates is None:
        return None
    inputs = [pos for pos, _, _ in plan.inputs]
    for i, a in enumerate(args):
        if i in inputs:
            continue
        if type(a) is _PT:
            return None
        if (type(a) is list or type(a) is tuple) and any(type(t) is _PT for t in a):
            return None
    return plates, tuple(p.size for p in plates)


def _unfold_outputs(out, plan: Plan, plates, sizes):
    if isinstance(out, _T):  # e.g. max_pool2d without return_indices: the first output's batch dim
        c = plan.outputs if isinstance(plan.outputs, int) else plan.outputs[0]
        return _new(_unfold(out, sizes, c, not plan.unbatched), plates)
    res = []
    for o, c in zip(out, plan.outputs):
        if isinstance(o, (tuple, list)) and c is not None:
            res.append(type(o)(_new(_unfold(x, sizes, c, not plan.unbatched), plates) for x in o))
        elif isinstance(o, _T) and c is not None:
            res.append(_new(_unfold(o, sizes, c, not plan.unbatched), plates))
        else:
            res.append(o)
    try:
        return type(out)(res)
    except TypeError:
        return tuple(res)


# -- specs ------------------------------------------------------------------------------------


def _spatial(d: int, outputs=0, extra=()):
    """Spec of an N-d spatial function: per-sample (C, *d) is unbatched, (N, C, *d) batched."""

    def spec(args, kwargs):
        x = _get(args, kwargs, 0, "input")
        k = _rank(x)
        if k == d + 2:
            return Plan(((0, "input", 0),) + extra, outputs)
        if k == d + 1:
            return Plan(((0, "input", 0),) + extra, outputs, True)
        return None

    spec.__doc__ = f"(C, {d}-d spatial) or (N, C, {d}-d spatial): plates folded into N"
    return spec


for _d in (1, 2, 3):
    register_batch_first(getattr(torch, f"conv{_d}d"), getattr(torch, f"conv_transpose{_d}d"))(_spatial(_d))
    register_batch_first(*[getattr(F, f"{p}{_d}d") for p in ("avg_pool", "adaptive_avg_pool", "lp_pool")
                           if hasattr(F, f"{p}{_d}d")])(_spatial(_d))
    _pool = [getattr(F, f"{p}{_d}d") for p in ("max_pool", "adaptive_max_pool", "fractional_max_pool")
             if hasattr(F, f"{p}{_d}d")]
    _pool += [getattr(F, f"{p}{_d}d_with_indices") for p in ("max_pool", "adaptive_max_pool", "fractional_max_pool")
              if hasattr(F, f"{p}{_d}d_with_indices")]
    register_batch_first(*_pool)(_spatial(_d, (0, 0)))
    register_batch_first(getattr(F, f"max_unpool{_d}d"))(_spatial(_d, 0, ((1, "indices", 0),)))
    register_batch_first(getattr(F, f"dropout{_d}d"))(_spatial(_d))


def _always_batched(min_rank: int, max_rank: int = 99, extra=()):
    def spec(args, kwargs):
        k = _rank(_get(args, kwargs, 0, "input"))
        if min_rank <= k <= max_rank:
            return Plan(((0, "input", 0),) + extra, 0)
        return None

    spec.__doc__ = "dim 0 of the per-sample input is the batch: plates folded into it"
    return spec


register_batch_first(F.interpolate, F.upsample, F.upsample_nearest, F.upsample_bilinear)(_always_batched(3, 5))
register_batch_first(F.group_norm)(_always_batched(2))
register_batch_first(F.local_response_norm)(_always_batched(3))
register_batch_first(F.instance_norm)(_always_batched(2))
register_batch_first(F.prelu)(_always_batched(2))
register_batch_first(F.feature_alpha_dropout)(_always_batched(2))
register_batch_first(F.grid_sample)(_always_batched(4, 5, ((1, "grid", 0),)))


@register_batch_first(F.batch_norm)
def _batch_norm(args, kwargs):
    """running statistics (eval): plates folded into N; without them (track_running_stats=False): per entry over its own batch; training with running statistics: refused"""  # noqa: E501
    if _get(args, kwargs, 5, "training", False):
        if _get(args, kwargs, 1, "running_mean") is None and _get(args, kwargs, 2, "running_var") is None:
            return None  # each entry normalised over its own batch dim, as the one-sample code does
        raise PlateError(
            "BatchNorm in training mode with running statistics (track_running_stats=True) on a plate tensor: "
            "each plate entry (sample, data point) would normalise with the statistics of its own batch and "
            "update the one set of running statistics in place, which the entries cannot share. Use model.eval() "
            "(running statistics: works), BatchNorm(..., track_running_stats=False) (each entry normalised over "
            "its own per-sample batch dim: works), or a normalisation of each sample alone (nn.LayerNorm, "
            "nn.GroupNorm)"
        )
    k = _rank(_get(args, kwargs, 0, "input"))
    return Plan(((0, "input", 0),), 0) if k >= 2 else None


@register_batch_first(F.embedding_bag)
def _embedding_bag(args, kwargs):
    """2-d (bags, indices) input: plates folded into the bags"""
    if _rank(_get(args, kwargs, 0, "input")) != 2 or _get(args, kwargs, 2, "offsets") is not None:
        return None
    return Plan(((0, "input", 0), (7, "per_sample_weights", 0)), 0)


@register_batch_first(F.bilinear)
def _bilinear(args, kwargs):
    """(*, H1), (*, H2): plates folded into a new leading dim"""
    return Plan(((0, "input1", 0), (1, "input2", 0)), 0, True)


@register_batch_first(torch.cdist)
def _cdist(args, kwargs):
    """(*, P, M), (*, R, M): plates folded into a new leading dim (one batched call, cheaper than vmap)"""
    r1, r2 = _rank(_get(args, kwargs, 0, "x1")), _rank(_get(args, kwargs, 1, "x2"))
    if r1 != r2 or r1 < 2:
        return None
    return Plan(((0, "x1", 0), (1, "x2", 0)), 0, True)


@register_batch_first(F.scaled_dot_product_attention)
def _sdpa(args, kwargs):
    """(*, L, E) query/key/value: plates folded into a new leading dim"""
    q, k, v = (_get(args, kwargs, i, n) for i, n in enumerate(("query", "key", "value")))
    mask = _get(args, kwargs, 3, "attn_mask")
    ranks = {_rank(t) for t in (q, k, v)}
    if len(ranks) != 1 or (type(mask) is _PT and _rank(mask) not in ranks):
        return None
    inputs = ((0, "query", 0), (1, "key", 0), (2, "value", 0))
    if type(mask) is _PT:
        inputs += ((3, "attn_mask", 0),)
    return Plan(inputs, 0, True)


@register_batch_first(F.multi_head_attention_forward)
def _mha(args, kwargs):
    """(L, N, E) or unbatched (L, E): plates folded into N; key_padding_mask, the weights and a sampled or 3-d attn_mask likewise"""  # noqa: E501
    q = _get(args, kwargs, 0, "query")
    if _get(args, kwargs, 21, "static_k") is not None or _get(args, kwargs, 22, "static_v") is not None:
        return None  # static keys with a batch*heads dim: vmap
    k = _rank(q)
    if k not in (2, 3):
        return None
    inputs = ((0, "query", 1), (1, "key", 1), (2, "value", 1), (14, "key_padding_mask", 0))
    mask = _get(args, kwargs, 16, "attn_mask")
    if not isinstance(mask, _T) or (type(mask) is not _PT and mask.dim() == 2):
        return Plan(inputs, (1, 0), k == 2)  # no mask, or one (L, S) mask for every entry: passed as it is
    r = _rank(mask)
    heads = _get(args, kwargs, 4, "num_heads")
    n = heads * (q.shape[1] if k == 3 else 1)
    if r not in (2, 3) or tuple(mask.shape[-2:]) != (q.shape[0], _get(args, kwargs, 1, "key").shape[0]) \
            or (r == 3 and mask.shape[0] != n):
        return None  # torch's own error, per sample (vmap)
    if r == 2:
        # a sampled (L, S) mask: torch applies it to every (batch, head) pair, which is the same as the
        # (N * heads, L, S) mask (unbatched: (heads, L, S)) that repeats it; the plates fold into that
        # one's leading dim as into N, so each entry's rows meet its own mask (the need_weights=False
        # path went to vmap, which cannot return the None weights)
        args, kwargs = _set(args, kwargs, 16, "attn_mask", mask.unsqueeze(0).expand(n, *mask.shape))
    # a 3-d mask is (N * heads, L, S), batch-major (unbatched: (heads, L, S)): the plates fold into its dim
    # 0 ahead of N, as into the query's N, also for an unbatched query
    return Plan(inputs + ((16, "attn_mask", 0),), (1, 0), k == 2, (16,), (args, kwargs))


def _rnn(has_cell_state: bool):
    def spec(args, kwargs):
        if len(args) > 1 and isinstance(args[1], _T) and not args[1].is_floating_point():
            raise PlateError(PACKED_SEQUENCES)
        batch_first_ = bool(args[-1]) if len(args) >= 9 else bool(kwargs.get("batch_first", False))
        if _rank(args[0]) != 3:
            return None
        b = 0 if batch_first_ else 1
        return Plan(((0, "input", b), (1, "hx", 1)), (b, 1, 1) if has_cell_state else (b, 1))

    spec.__doc__ = "(T, N, F) or (N, T, F) input, (layers, N, H) states: plates folded into N"
    return spec


register_batch_first(torch.lstm)(_rnn(True))
register_batch_first(torch.gru, torch.rnn_tanh, torch.rnn_relu)(_rnn(False))


@register_batch_first(torch.lstm_cell, torch.gru_cell, torch.rnn_tanh_cell, torch.rnn_relu_cell)
def _cell(args, kwargs):
    """(N, F) or unbatched (F,) input and states: plates folded into N"""
    k = _rank(args[0])
    outputs = (0, 0) if isinstance(_get(args, kwargs, 1, "hx"), (tuple, list)) else 0
    if k == 2:
        return Plan(((0, "input", 0), (1, "hx", 0)), outputs)
    if k == 1:
        return Plan(((0, "input", 0), (1, "hx", 0)), outputs, True)
    return None


@register_batch_first(F.unfold)
def _im2col(args, kwargs):
    """(C, H, W) or (N, C, H, W): plates folded into N"""
    k = _rank(_get(args, kwargs, 0, "input"))
    return Plan(((0, "input", 0),), 0, k == 3) if k in (3, 4) else None


@register_batch_first(F.fold)
def _col2im(args, kwargs):
    """(C*k, L) or (N, C*k, L): plates folded into N"""
    k = _rank(_get(args, kwargs, 0, "input"))
    return Plan(((0, "input", 0),), 0, k == 2) if k in (2, 3) else None


@register_batch_first(F.pad)
def _pad(args, kwargs):
    """constant mode: the last dims of each sample; other modes: (C, *) or (N, C, *), plates folded into N"""
    x = _get(args, kwargs, 0, "input")
    pad = _get(args, kwargs, 1, "pad")
    mode = _get(args, kwargs, 2, "mode", "constant")
    k = _rank(x)
    d = len(pad) // 2
    if mode == "constant":
        return Plan(((0, "input", 0),), 0, True) if d <= k else None
    if k == d + 2:
        return Plan(((0, "input", 0),), 0)
    if k == d + 1:
        return Plan(((0, "input", 0),), 0, True)
    return None

