"""Dimension-aware handlers: reductions, shape functions, concatenation, indexing, matmul, losses.

User code addresses per-sample dims; these handlers translate every ``dim`` argument past the
plate dims (negative dims already point at per-sample dims) and refuse dims out of the
per-sample range with a :class:`storch.PlateError`.
"""

from __future__ import annotations

import functools
import math
import sys
import warnings
from typing import NoReturn, Optional

import torch
import torch.nn.functional as F

from ...errors import PlateError
from ..kit import dispatch, refuse_sampled_size, register, scan, wrap, wrap_same
from .pointwise import broadcast
from .sparse import is_sparse, sparse_matmul
from .vmap import vmap_call
from ..tensor import SAMPLED_SIZE, PlateTensor, align, sampled_index_advice, union_plates

_PT = PlateTensor
_T = torch.Tensor


def _both(name):
    return [f for f in (getattr(torch, name, None), getattr(_T, name, None)) if f is not None]


def tdim(d, n: int, k: int, what="dim"):
    """Translate a per-sample dim ``d`` (rank ``k``) to the raw tensor with ``n`` plate dims."""
    if isinstance(d, (tuple, list)):
        return type(d)(tdim(x, n, k, what) for x in d)
    if d < 0:
        if d >= -k:
            return d
    elif d < k:
        return d + n
    raise PlateError(
        f"{what} {d} is out of range for a per-sample tensor with {k} dims; plate dims are not "
        "addressable by dim (storch reduces plates in the surrogate loss)"
    )


def _get_dim(args, kwargs, pos, default=None):
    if "dim" in kwargs:
        return kwargs["dim"], "kw"
    if len(args) > pos:
        return args[pos], "pos"
    return default, "default"


def _set_dim(args, kwargs, pos, where, value):
    if where == "pos":
        return args[:pos] + (value,) + args[pos + 1:], kwargs
    return args, {**kwargs, "dim": value}


def _numpy_names(kwargs):
    """``kwargs`` with torch's numpy aliases ``axis=`` / ``keepdims=`` (which torch's argument parser
    accepts for ``dim`` / ``keepdim``) under their own names, where the handlers look for them."""
    if "axis" not in kwargs and "keepdims" not in kwargs:
        return kwargs
    return {{"axis": "dim", "keepdims": "keepdim"}.get(k, k): v for k, v in kwargs.items()}


def _no_repeats(dims, k: int) -> None:
    """torch's refusal of a dim given twice (``sum((0, -3))``), in per-sample dims (the raw call would
    name a raw dim); dims out of range are left to :func:`tdim`."""
    seen = set()
    for d in dims:
        if isinstance(d, int) and -k <= d < k:
            if d % k in seen:
                raise RuntimeError(f"dim {d % k} appears multiple times in the list of dims")
            seen.add(d % k)


def _warn_implicit_dim(func) -> None:
    """torch's warning for F.softmax & co. without dim (its own is never reached: on plate tensors
    F.softmax hands over to the dispatcher first), attributed to the first frame outside storch and torch."""
    level, f = 1, sys._getframe(0)
    while f is not None and f.f_globals.get("__name__", "").partition(".")[0] in ("storch", "torch"):
        f, level = f.f_back, level + 1
    warnings.warn(f"Implicit dimension choice for {func.__name__} has been deprecated. Change the call to "
                  "include dim=X as an argument.", stacklevel=level)


def _input_first(args, kwargs):
    """``args``, ``kwargs`` with a keyword ``input=`` (``torch.sum(input=x, dim=0)``) made the first
    positional argument, where the handlers look for it."""
    if not args and "input" in kwargs:
        kwargs = dict(kwargs)
        return (kwargs.pop("input"),), kwargs
    return args, kwargs


def _dim_handler(pos: int, default=None, extra: int = 0, reduce_all: bool = False):
    """Handler for functions of one plate tensor with a dim argument at ``pos``.

    ``extra`` = 1 for functions that insert a dim (unsqueeze). With ``reduce_all`` a missing
    dim means "over all per-sample dims" (sum(), mean(), max(), ...).
    """

    def handler(func, args, kwargs):
        if not args:
            args, kwargs = _input_first(args, kwargs)
        x = args[0]
        # fast path (distribution validation, logsumexp, softmax, sum(-1), unsqueeze(0)): one plate
        # tensor and an int dim in the per-sample range, nothing else a plate tensor
        if type(x) is _PT:
            na = len(args)
            d = args[pos] if na == pos + 1 else (kwargs.get("dim") if na == 1 else None)
            if type(d) is int and (not kwargs or not any(type(v) is _PT for v in kwargs.values())) and (
                    pos == 1 or not any(type(a) is _PT for a in args[1:pos])):
                n = len(x._plates)
                k = x._raw.dim() - n
                if k + extra > 0:  # (unsqueeze of a 0-dim sample too: Categorical.log_prob of a token, p-hmm15)
                    if -(k + extra) <= d < 0:
                        return wrap_same(func(x._raw, *args[1:], **kwargs), x._plates)
                    if 0 <= d < k + extra:
                        if na > 1:
                            return wrap_same(func(x._raw, *args[1:pos], d + n, **kwargs), x._plates)
                        return wrap_same(func(x._raw, **{**kwargs, "dim": d + n}), x._plates)
        if kwargs:
            kwargs = _numpy_names(kwargs)  # sum(axis=1), cumsum(axis=0), mean(axis=0, keepdims=True)
        if len(args) > 1 and isinstance(args[1], bool) and func in _UNBIASED:
            args, kwargs = args[:1], {**kwargs, "unbiased": args[1]}  # std(x, False)
        if len(args) > 1 and isinstance(args[1], _T):
            return broadcast(func, args, kwargs)  # e.g. torch.max(a, b) is elementwise
        if type(x) is not _PT or ((len(args) > 2 or kwargs) and (
                any(type(a) is _PT for a in args[1:]) or any(type(v) is _PT for v in kwargs.values()))):
            return vmap_call(func, args, kwargs)  # e.g. diff(x, prepend=sampled)
        n = len(x._plates)
        k = x._raw.dim() - n
        if k == 0:
            if func in ACROSS_SAMPLES:
                d = _get_dim(args, kwargs, pos, default)[0]
                _refuse_reduction_of_one_value(func, x, default if d is None and callable(default) else d)
            return vmap_call(func, args, kwargs)  # 0-dim samples: dim 0 / -1 address the scalar itself
        d, where = _get_dim(args, kwargs, pos, default)
        if callable(d) or (d is None and callable(default)):
            # torch's implicit dim (F.softmax(x), nn.Softmax()): F.softmax passes dim=None on, and
            # the rule depends on the rank, which is the per-sample rank here; torch's warning too
            _warn_implicit_dim(func)
            d = default(k)
        elif type(d) in (tuple, list):
            if not d and func in _EMPTY_IS_ALL:
                d = None  # sum(dim=()): torch reduces every dim of the sample (all/any: none, as on the raw)
            else:
                _no_repeats(d, k + extra)
        if d is None:
            if not reduce_all:
                raise PlateError(f"{func.__name__} on a PlateTensor needs an explicit dim")
            if len(args) > pos + 1:
                return vmap_call(func, args, kwargs)  # positional arguments after dim=None: torch's own, per sample
            kw = {k_: v for k_, v in kwargs.items() if k_ != "dim"}
            if func in _TUPLE_DIMS:  # every per-sample dim at once: no reshape (and no view to differentiate)
                out = func(x._raw, *args[1:pos], dim=tuple(range(n, n + k)), **kw)
                return wrap_same(out, x._plates)  # keepdim keeps every per-sample dim, as torch does
            flat = x._raw.reshape(x._raw.shape[:n] + (-1,))
            out = func(flat, *args[1:pos], dim=-1, **kw)  # args[1:pos]: without a positional dim=None
            if isinstance(out, tuple):  # max()/min()/median() without dim return values only
                out = out[0]
            if kw.get("keepdim"):  # every per-sample dim kept, of size 1
                out = out.reshape(out.shape[:n] + (1,) * k)
            return wrap(out, x._plates)
        args, kwargs = _set_dim(args, kwargs, pos, where, tdim(d, n, k + extra))
        return wrap_same(func(x._raw, *args[1:], **kwargs), x._plates)

    if reduce_all:
        handler.__doc__ = "dim counts per-sample dims; without dim, over all of a sample's dims"
    elif extra:
        handler.__doc__ = "inserts a per-sample dim; dim counts per-sample dims (plate dims stay first)"
    else:
        handler.__doc__ = "dim counts per-sample dims" + ("" if default is None else " (default: torch's, per sample)")
    return handler


_UNBIASED = set(_both("std") + _both("var"))

# The reductions and normalisations that batched code applies along its samples' dim (an IWAE bound's
# logsumexp(lw, 0), lw.mean(0), lw.softmax(0), lw.max(0)). On a per-sample tensor of one value (per-sample
# shape ()) torch accepts dim 0 and -1 and reduces nothing: each entry's "bound" is its own value, and the
# objective is silently another one (found by a tester: an IWAE_4 written so trained on the ELBO, mean cost 3.71
# where E[-IWAE_4] is 1.86). Such a call, in user code, on a tensor that carries a sample plate (or a data plate) is
# refused (:func:`_refuse_reduction_of_one_value`); only these functions on 0-dim samples pay for the check.
ACROSS_SAMPLES: frozenset = frozenset(
    f for n in ("sum", "mean", "nansum", "nanmean", "prod", "amax", "amin", "max", "min", "median", "nanmedian",
                "logsumexp", "argmax", "argmin", "std", "var", "norm", "softmax", "log_softmax", "cumsum", "cumprod",
                "logcumsumexp", "cummax", "cummin", "sort", "argsort", "topk", "kthvalue", "quantile", "nanquantile",
                "mode", "msort", "aminmax")
    for f in _both(n)) | {F.softmax, F.log_softmax, F.softmin, F.normalize, torch.linalg.vector_norm,
                          torch.linalg.norm, torch.special.logsumexp, torch.special.softmax,
                          torch.special.log_softmax}

# of those, the ones whose result on one value is a constant or the value itself whatever the dim (softmax: 1,
# log_softmax: 0, normalize: the sign, logsumexp: the value): refused at any dim. The others only at dim 0, the
# samples' dim of batched code: a generic cost's ``.sum(-1)`` over a sample's last dim (written for vector
# samples, run on a Categorical's scalar ones) is a reduction over the sample's own value, as torch does it.
_ANY_DIM: frozenset = frozenset(
    f for n in ("logsumexp", "softmax", "log_softmax", "logcumsumexp") for f in _both(n)) | {
        F.softmax, F.log_softmax, F.softmin, F.normalize, torch.special.logsumexp, torch.special.softmax,
        torch.special.log_softmax}

# of the others, those that agree with storch's averaging of a data plate (up to a scale) where dim 0 was the batch
# of the ported code; max / min / prod / ... over it there were a hand-written logsumexp's (review r-25): refused
_BATCH_MEANS: frozenset = frozenset(f for n in ("sum", "mean", "nansum", "nanmean") for f in _both(n))

# the modules between a user's call and the dispatcher (torch's Python wrappers that hand over to
# __torch_function__: F.softmax, Tensor.norm, torch.norm), skipped when looking for who made the call. (No
# storch.runtime.eager frame sits there: the dispatcher suspends dynamo inline, without eager_only's wrapper, also
# under torch.compile and storch.compile.)
_PASSING = ("torch.overrides", "torch.nn.functional", "torch.functional", "torch._tensor", "torch.linalg")


def _made_by_user() -> bool:
    """Whether the nearest caller outside storch's plate code and torch's Python wrappers is user code: not
    torch.distributions (a distribution's own formulas), and not storch or an estimator package (storch's own
    calls). Refusal path only: a walk up the stack."""
    f = sys._getframe(2)
    while f is not None:
        name = f.f_globals.get("__name__", "")
        if name.startswith("storch.plates") or name.startswith(_PASSING):
            f = f.f_back
            continue
        return not (name.startswith(_OWN) or name in ("storch", "storch_score", "storch_relaxed", "storch_mvd"))
    return False


# storch's packages and torch.distributions (by their names: a user's module named storch_mylib is user code)
_OWN = ("storch.", "storch_score.", "storch_relaxed.", "storch_mvd.", "torch.distributions")


def _refuse_reduction_of_one_value(func, x, d) -> None:
    """Refuse (a PlateError) ``func`` with a dim (or softmax's implicit one) on ``x``, a plate tensor of per-sample
    shape (), where it carries a plate of size > 1 made by storch (a node's sample plate, or a data plate: not a plate
    built by hand, which has no lineage) and the call is the user's: it reduces nothing, where the user meant to
    reduce over the samples or the batch (on data plates alone: :func:`_refuse_batch_statistic`; their sum / mean
    over dim 0 is accepted)."""
    if d is None or (type(d) in (tuple, list) and not d):
        return  # sum(), sum(dim=()): over every per-sample dim, which torch does on one value too
    if func not in _ANY_DIM and (not (d == 0 if type(d) is int else type(d) in (tuple, list) and 0 in d)
                                 or func in _BATCH_MEANS and any(p.independent for p in x._plates)):
        # x.sum(-1): a generic reduction over a sample's last dim (_ANY_DIM); and a tensor on a data plate, where
        # dim 0 was the batch in the ported code (`rec.mean(0)`, `kld.sum(1).mean(0)`): storch averages the
        # data plates itself, so the reduction of the per-point value is right (found by review r-24)
        return
    # a data plate alone is refused too (f-silent17): storch's value, each data point's own number (a quantile's
    # baseline r - q of 0, a softmax of 1), is what torch gives one data point, but no code written for one data point
    # asks for dim 0 of a scalar; the line is batched code's statistic over the batch, which mixes the data points
    # (and with a sample plate beside the data plate the same line was refused already)
    lined = [p for p in x._plates if p.size > 1 and p.lineage is not None]
    if not lined or not _made_by_user():
        return
    name = getattr(func, "__name__", str(func))
    dim = "its implicit dim" if callable(d) else f"dim={d!r}"
    sampled = [p for p in lined if not p.independent]
    if not sampled:
        _refuse_batch_statistic(name, dim, x, lined)
    plates = ", ".join(f"{p.name!r} (size {p.size})" for p in sampled)
    raise PlateError(
        f"{name} with {dim} on a plate tensor of per-sample shape () that carries the sample plate(s) {plates}: "
        "the plate is not a dim of the per-sample tensor (your code sees one sample, whose value is a single "
        f"number), so torch's {name} over dim 0 / -1 of it reduces nothing and returns that value (or 1, 0) "
        "per sample: it does not combine the samples, as the same line does in batched code. storch computes "
        "each plate entry's cost from that entry alone (docs/plates.md, 'Each entry's cost from that entry "
        "alone'). For an objective that couples K draws (a multi-sample bound such as IWAE's logsumexp of the K "
        "log-weights minus log K), hold the K draws in ONE sample: the node's distribution is K copies of q, "
        "z = est(Bernoulli(logits=logits.expand(K, *logits.shape))), and the bound reduces over z's first "
        "per-sample dim, log_w(z).logsumexp(0) (docs/plates.md, Pitfalls, '.tensor'); or use the 'vimco' "
        "estimator, which draws the K copies itself and gives each its own baseline (docs/estimators/vimco.md). "
        "For a loss of the set whose sampling is not differentiated (reweighted wake-sleep's wake losses, with the "
        "self-normalised weights softmax(log_w) over the samples), read the raw values with the plate last, "
        f"`(lw,), plates = storch.aligned(log_w, plates=(..., {sampled[0].name!r}))`, reduce over that dim, put the "
        "result on the plates left, `storch.PlateTensor(lw.logsumexp(-1), plates[:-1])`, and add it with "
        "credit=False (docs/estimators/vimco.md, 'Reweighted wake-sleep'). "
        "For a baseline from the other samples use the estimator's baseline='leave_one_out'; for one that ranks "
        "the samples' costs (a quantile: a risk-seeking policy gradient), a callable baseline(node, cost) that "
        "reads cost.tensor along cost.dim (docs/estimators/score.md, 'Baselines that read the batch'). "
        "A reduction of a sample's own value needs no dim: sum() / mean(). If the dim was your batch (a data "
        "plate), drop the reduction: storch averages a cost over its data plates")


def _refuse_batch_statistic(name: str, dim: str, x, data) -> NoReturn:
    """The refusal of :func:`_refuse_reduction_of_one_value` for a per-data-point scalar on data plates only (no
    sample plate): the user's dim 0 was the batch of the ported code."""
    plates = ", ".join(f"{p.name!r} (size {p.size})" for p in data)
    at = x._plates.index(data[0])
    if len(x._plates) == 1:
        example = f"e.g. `torch.quantile(r.tensor, q, dim={at})`"
    else:  # other plates too (a sample plate of size 1: score with n_samples=1): dim=at would keep their dims, and a
        # plain tensor of shape (1,) beside a per-sample scalar gives the cost a per-sample dim (review r-56)
        others = ", ".join(repr(p.name) for p in x._plates if p is not data[0])
        example = (f"e.g. `torch.quantile(r.tensor.flatten(), q)`, one number over every entry of `r.tensor` (the data "
                   f"points and the plates {others}; or along {data[0].name!r} alone, dim={at} of `r.tensor`, which "
                   "keeps the other plates' dims: put that result back on them, "
                   f"`storch.PlateTensor(result, plates)`, with plates the tensor's plates other than {data[0].name!r})")
    raise PlateError(
        f"{name} with {dim} on a plate tensor of per-sample shape () that carries the data plate(s) {plates}: "
        "the data plate is not a dim of the per-data-point tensor (your code sees one data point, whose value is a "
        f"single number), so torch's {name} over dim 0 / -1 of it reduces nothing and returns that value (or 1, 0) "
        "per data point: it does not combine the data points, as the same line does in batched code whose dim 0 "
        "is the batch. A statistic over the batch (a quantile or ranking of the batch's values, a softmax or "
        "normalisation over the data points) mixes the data points, which per-data-point code does not express "
        "(docs/plates.md, 'A cost that mixes data points'): compute it on the plain batch before "
        f"storch.denote_independent, or from the raw tensor, whose leading dims are the plates, {example}, and use "
        "the result as a plain tensor, shared by every data point. A reduction of a data point's own value needs no dim: sum() / "
        "mean(); a sum or mean over the batch needs none either: storch averages a cost over its data plates")
# reductions that take a tuple of any number of dims (the others reduce a flattened view; not norm:
# its default p='fro' refuses more than two dims)
_TUPLE_DIMS = set(sum((_both(n) for n in ("sum", "mean", "nansum", "nanmean", "amax", "amin", "logsumexp", "std",
                                            "var", "count_nonzero", "all", "any")), [])) | {torch.linalg.vector_norm}
# reductions that read an empty dim list (sum(dim=())) as every dim, as dim=None (all and any: as no dim)
_EMPTY_IS_ALL = (_TUPLE_DIMS - set(_both("all") + _both("any"))) | set(_both("norm"))
_REDUCE = ["sum", "mean", "nansum", "nanmean", "prod", "amax", "amin", "all", "any", "argmax",
           "argmin", "logsumexp", "max", "min", "median", "count_nonzero"]
for _name in _REDUCE:
    register(*_both(_name))(_dim_handler(1, reduce_all=True))
_spread_dim = _dim_handler(1, reduce_all=True)


def _refuse_one_value(func, args, kwargs) -> None:
    """A spread (std, var) of a plate tensor whose samples hold one value each: per-sample code sees
    one value per plate entry, so the spread is NaN (0 without Bessel's correction), not the spread over
    the data points or samples that "normalising over the batch" means (found by porting an RL loop:
    ``ret / (ret.std() + 1e-8)`` gave NaN on every entry and a NonFiniteCostError that did not say why)."""
    x = args[0] if args else kwargs.get("input")
    if type(x) is not _PT or math.prod(x._raw.shape[len(x._plates):]) != 1:
        return
    # a spread over a given dim without Bessel's correction is 0, not NaN: a layer norm written by hand,
    # x.var(-1, correction=0, keepdim=True), on a feature size of 1 (review r-eighteen); refused are the
    # spread over every dim (the batch habit) and any spread with the correction (NaN)
    legacy = len(args) > 1 and isinstance(args[1], bool)  # std(x, unbiased)
    dim = kwargs.get("dim", args[1] if len(args) > 1 and not legacy else None)
    unbiased = kwargs.get("unbiased", args[1] if legacy else args[2] if len(args) > 2 else None)
    if dim not in (None, (), []) and (kwargs.get("correction") == 0 or unbiased is False):
        return
    names = tuple(p.name for p in x._plates)
    raise PlateError(
        f"{func.__name__} of a plate tensor whose samples hold one value each (per-sample shape "
        f"{tuple(x.shape)}, plates {names}): per-sample code sees one value per plate entry, so its "
        f"{func.__name__} is over that one value (NaN, or 0 without Bessel's correction), not over the "
        "plate's entries. To normalise over the data points (a batch of returns), use the raw tensor, "
        "`ret.tensor`, whose leading dims are the plates: its mean and std over the data plate's dim (a cost "
        "that mixes data points is biased: docs/plates.md, 'A cost that mixes data points'); to centre a "
        "return for a score-function gradient, use the estimator's baseline (score's "
        "baseline='leave_one_out') instead")


@register(*_both("std"), *_both("var"))
def _spread(func, args, kwargs):
    """dim counts per-sample dims; without dim, over all of a sample's dims; refused (a PlateError) where a sample holds one value, but over a given dim without the correction (0)"""
    _refuse_one_value(func, args, kwargs)
    return _spread_dim(func, args, kwargs)


_DIM_AFTER_Q = frozenset(_both("quantile") + _both("nanquantile"))


@register(*_both("quantile"), *_both("nanquantile"), *_both("mode"), *_both("msort"), *_both("nanmedian"),
          *_both("aminmax"))
def _order_statistic(func, args, kwargs):
    """per sample (vmap); over dim 0 of a sample of one value (batched code's samples or batch), refused (a PlateError)

    A quantile or rank over the samples written as in batched code (a risk-seeking baseline's (1 - eps)-quantile of
    the batch's rewards, ``torch.quantile(r, 1 - eps, dim=0)``) would be each sample's own value: a weight of 0 for
    every sample, a zero gradient, silently (found by porting DSR's policy gradient). nanmedian and aminmax too
    (review r-52: ``r.nanmedian(0)`` ran, though nanmedian was listed with median)."""
    x = args[0] if args else kwargs.get("input")
    if type(x) is _PT and x._raw.dim() == len(x._plates):
        d = 0 if func.__name__ == "msort" else _get_dim(args, kwargs, 2 if func in _DIM_AFTER_Q else 1)[0]
        _refuse_reduction_of_one_value(func, x, d)
    return vmap_call(func, args, kwargs)


@register(torch.special.logsumexp, torch.special.softmax, torch.special.log_softmax)
def _special_normalisation(func, args, kwargs):
    """per sample (vmap); on a sample of one value, refused at any dim (a PlateError), as torch.logsumexp / softmax

    torch.special's logsumexp and softmax are functions of their own, not torch's: on a per-sample scalar they
    returned the value (or 1, 0) per sample silently where torch.logsumexp(lw, 0) is refused (review r-52)."""
    x = args[0] if args else kwargs.get("input")
    if type(x) is _PT and x._raw.dim() == len(x._plates):
        _refuse_reduction_of_one_value(func, x, _get_dim(args, kwargs, 1)[0])
    return vmap_call(func, args, kwargs)


@register(torch.std_mean, torch.var_mean)
def _spread_mean(func, args, kwargs):
    """per sample (vmap); refused (a PlateError) where a sample holds one value"""
    _refuse_one_value(func, args, kwargs)
    return vmap_call(func, args, kwargs)
_norm = _dim_handler(2, reduce_all=True)


@register(*_both("norm"))
def _norm_handler(func, args, kwargs):
    """dims of each sample (p='fro', the default, too); a nuclear norm without dims goes to vmap

    p='fro' is the 2-norm over the given dims, or over all of a sample's elements."""
    p = args[1] if len(args) > 1 else kwargs.get("p", "fro")
    if isinstance(p, str) and p != "fro" and (args[2] if len(args) > 2 else kwargs.get("dim")) is None:
        return vmap_call(func, args, kwargs)
    return _norm(func, args, kwargs)


register(torch.linalg.vector_norm)(_norm)  # vector_norm(x, ord, dim): without dim, over all of a sample's elements


@register(torch.linalg.norm)
def _linalg_norm(func, args, kwargs):
    """dims of each sample (vector norm over one, matrix norm over two); without dim, vmap

    Without dim the kind of norm depends on the per-sample rank."""
    if (args[2] if len(args) > 2 else kwargs.get("dim")) is None:
        return vmap_call(func, args, kwargs)
    return _norm(func, args, kwargs)
for _name in ["softmax", "log_softmax", "cumsum", "cumprod", "logcumsumexp", "cummax", "cummin",
              "unbind", "sort", "argsort"]:  # select, index_select: in .indexing
    register(*_both(_name))(_dim_handler(1, default={"unbind": 0, "sort": -1, "argsort": -1}.get(_name)))
_narrow_dim = _dim_handler(1)


@register(*_both("narrow"))
def _narrow(func, args, kwargs):
    """dim counts per-sample dims; a sampled start or length is refused (a PlateError: mask over a fixed length)"""
    bounds = list(args[2:4]) + [kwargs.get(k) for k in ("start", "length")]
    length = args[3] if len(args) > 3 else kwargs.get("length")
    for name, b in zip(("start", "length", "start", "length"), bounds):
        if name == "start" and type(b) is _PT and type(length) is not _PT:
            # (found by porting: the length's advice, a fixed maximum length and a mask, for a fixed length)
            dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
            n = length if isinstance(length, int) else "n"
            raise PlateError(
                f"narrow got a sampled start (a PlateTensor over plates {tuple(p.name for p in b._plates)}) and a "
                f"fixed length {n}: narrow takes one Python number as its start, so the slice cannot start "
                "differently per sample. " + sampled_index_advice(dim, n, "r"))
        if type(b) is _PT:
            raise PlateError(
                f"narrow got a sampled {name} (a PlateTensor over plates {tuple(p.name for p in b._plates)}): "
                "narrow takes one Python number, and the slice it makes cannot start or end differently per "
                "sample. " + SAMPLED_SIZE)
    return _narrow_dim(func, args, kwargs)
_diff_dim = _dim_handler(2, default=-1)  # diff(input, n, dim, prepend, append)


@register(*_both("diff"))
def _diff(func, args, kwargs):
    """dim counts per-sample dims (default: torch's, per sample); a plain prepend/append is joined to every sample"""
    args, kwargs = _input_first(args, kwargs)
    x = args[0]
    if type(x) is _PT and len(args) > 3:  # prepend / append given positionally
        kwargs = {**kwargs, **dict(zip(("prepend", "append"), args[3:]))}
        args = args[:3]
    ends = [key for key in ("prepend", "append") if isinstance(kwargs.get(key), _T)]
    n = len(x._plates) if type(x) is _PT else 0
    if ends and type(x) is _PT and x._raw.dim() > n and not any(type(kwargs[key]) is _PT for key in ends):
        # per sample, torch concatenates the plain tensor to each sample along dim: on the raw tensor
        # it is expanded over the plate dims first (a view), where it stands for every entry alike.
        # A sampled prepend/append goes to vmap, as do 0-dim samples (torch's own error per sample).
        size = x._raw.shape[:n]
        kwargs = {**kwargs, **{key: kwargs[key].expand(*size, *kwargs[key].shape) for key in ends}}
    return _diff_dim(func, args, kwargs)


def _softmax_dim(k: int) -> int:
    # torch's implicit softmax dim (nn.functional._get_softmax_dim) of the per-sample rank
    return 0 if k in (0, 1, 3) else 1


register(F.softmax, F.log_softmax, F.softmin)(_dim_handler(1, default=_softmax_dim))
register(F.glu)(_dim_handler(1, default=-1))


@register(_T.unflatten, *_both("unflatten"))
def _unflatten(func, args, kwargs):
    """one per-sample dim split into several"""
    if not args:
        args, kwargs = _input_first(args, kwargs)
    x = args[0]
    n = len(x._plates)
    d = args[1] if len(args) > 1 else kwargs["dim"]
    sizes = args[2] if len(args) > 2 else kwargs["sizes"]
    return wrap(x._raw.unflatten(tdim(d, n, x._raw.dim() - n), sizes), x._plates)


@register(*_both("t"))
def _t(func, args, kwargs):
    """per-sample transpose of a matrix (a vector or scalar is returned as is)"""
    x = args[0]
    n = len(x._plates)
    if x._raw.dim() - n < 2:
        return x
    if x._raw.dim() - n > 2:
        return vmap_call(func, args, kwargs)  # torch's own error, in per-sample shapes
    return wrap(x._raw.transpose(-2, -1), x._plates)


@register(*_both("tril"), *_both("triu"))
def _last_two(func, args, kwargs):
    """the last two dims of each sample"""
    x = args[0]
    if type(x) is not _PT or x._raw.dim() - len(x._plates) < 2:
        return vmap_call(func, args, kwargs)
    return wrap(func(x._raw, *args[1:], **kwargs), x._plates)


@register(*_both("ravel"))
def _ravel(func, args, kwargs):
    """the per-sample elements, flattened"""
    x = args[0]
    return wrap(x._raw.reshape(x._raw.shape[: len(x._plates)] + (-1,)), x._plates)


@register(_T.view_as, _T.reshape_as)
def _view_as(func, args, kwargs):
    """the per-sample shape of the other tensor"""
    x, other = args[0], args[1]
    if type(x) is not _PT:
        return vmap_call(func, args, kwargs)
    return wrap(x._raw.reshape(x._raw.shape[: len(x._plates)] + tuple(other.shape)), x._plates)
register(F.gumbel_softmax)(_dim_handler(4, default=-1))
register(F.normalize)(_dim_handler(2, default=1))
for _name in ["split", "chunk", "topk", "kthvalue"]:
    register(*_both(_name))(_dim_handler(2, default=0 if _name in ("split", "chunk") else -1))
register(*_both("unsqueeze"))(_dim_handler(1, extra=1))


@register(*_both("squeeze"))
def _squeeze(func, args, kwargs):
    """squeezes per-sample dims only (all size-1 per-sample dims without dim)"""
    if not args:
        args, kwargs = _input_first(args, kwargs)
    x = args[0]
    n = len(x._plates)
    k = x._raw.dim() - n
    d, _ = _get_dim(args, _numpy_names(kwargs) if kwargs else kwargs, 1)
    if d is None:
        d = tuple(i for i in range(n, n + k) if x._raw.shape[i] == 1)
        return wrap_same(x._raw.squeeze(d) if d else x._raw, x._plates)
    if type(d) in (tuple, list):
        _no_repeats(d, k)  # (torch's refusal in per-sample dims: the raw call names a raw dim)
    return wrap_same(x._raw.squeeze(tdim(d, n, k)), x._plates)


@register(*_both("flatten"))
def _flatten(func, args, kwargs):
    """start_dim/end_dim count per-sample dims; plate dims are kept"""
    if not args:
        args, kwargs = _input_first(args, kwargs)
    x = args[0]
    n = len(x._plates)
    k = x._raw.dim() - n
    start = kwargs.get("start_dim", args[1] if len(args) > 1 else 0)
    end = kwargs.get("end_dim", args[2] if len(args) > 2 else -1)
    if k == 0:
        return wrap(x._raw.unsqueeze(-1), x._plates)
    return wrap_same(x._raw.flatten(tdim(start, n, k), tdim(end, n, k)), x._plates)


@register(*_both("transpose"), *_both("swapaxes"), *_both("swapdims"), *_both("movedim"), *_both("moveaxis"))
def _two_dims(func, args, kwargs):
    """both dim arguments count per-sample dims"""
    if not args:
        args, kwargs = _input_first(args, kwargs)
    x = args[0]
    n = len(x._plates)
    k = x._raw.dim() - n
    # the keywords: transpose/swapdims dim0, dim1; swapaxes axis0, axis1; movedim/moveaxis source, destination
    a = args[1] if len(args) > 1 else next((kwargs[key] for key in ("dim0", "axis0", "source") if key in kwargs), None)
    b = args[2] if len(args) > 2 else next((kwargs[key] for key in ("dim1", "axis1", "destination") if key in kwargs),
                                           None)
    if a is None or b is None:
        return vmap_call(func, args, kwargs)  # torch's own error (a missing argument), per sample
    return wrap_same(func(x._raw, tdim(a, n, k), tdim(b, n, k)), x._plates)


def _shape_arg(args, kwargs, key):
    if key in kwargs:
        return tuple(kwargs[key])
    rest = args[1:]
    if len(rest) == 1 and isinstance(rest[0], (tuple, list, torch.Size)):
        return tuple(rest[0])
    return tuple(rest)


@register(*_both("permute"))
def _permute(func, args, kwargs):
    """a permutation of the per-sample dims; plate dims stay first"""
    if not args:
        args, kwargs = _input_first(args, kwargs)
    x = args[0]
    n = len(x._plates)
    k = x._raw.dim() - n
    dims = [d % k + n if d < 0 else tdim(d, n, k) for d in _shape_arg(args, kwargs, "dims")]
    return wrap_same(x._raw.permute(*range(n), *dims), x._plates)


@register(*_both("reshape"), _T.view)
def _reshape(func, args, kwargs):
    """the new shape is per sample; plate dims stay first"""
    if not args:
        args, kwargs = _input_first(args, kwargs)  # torch.reshape(input=x, shape=...)
    x = args[0]
    if len(args) == 2 and isinstance(args[1], torch.dtype) or "dtype" in kwargs:
        return wrap(func(x._raw, *args[1:], **kwargs), x._plates)  # view(dtype): the last dim
    shape = _shape_arg(args, kwargs, "shape")
    raw = x._raw
    try:
        new = raw.shape[: len(x._plates)] + shape
    except TypeError:  # (torch.Size of a sampled size: "takes an iterable of 'int'")
        refuse_sampled_size(func, shape)
        raise
    # plate dims may be non-contiguous views after alignment; reshape copies only if needed
    return wrap_same(raw.reshape(new), x._plates)


def _pad_raw(x, k_to):
    n = len(x._plates)
    raw = x._raw
    for _ in range(k_to - (raw.dim() - n)):
        raw = raw.unsqueeze(n)
    return raw


@register(_T.expand, *_both("broadcast_to"))
def _expand(func, args, kwargs):
    """the target shape is per sample; plate dims keep their size"""
    x = args[0]
    sizes = _shape_arg(args, kwargs, "size")
    raw = _pad_raw(x, len(sizes))
    try:
        return wrap(raw.expand(*([-1] * len(x._plates)), *sizes), x._plates)
    except Exception as e:
        refuse_sampled_size(func, sizes)  # (a sampled size reaches storch again with the raw tensor: it fails)
        if not isinstance(e, RuntimeError):
            raise
        # torch's message for one sample (the raw call's shows the plate dims, and counts them in its dim
        # numbers and sizes): the same call on a stand-in of the per-sample shape (zero strides, no memory)
        func(torch.zeros((), dtype=x.dtype, device=x.device).expand(tuple(x.shape)), *args[1:], **kwargs)
        raise


@register(_T.expand_as)
def _expand_as(func, args, kwargs):
    """expands to the other tensor's per-sample shape (plates aligned by name)"""
    x, other = args[0], args[1]
    plates = union_plates(scan(args, kwargs))
    shape = tuple(other.shape)
    raw = align(x._raw if type(x) is _PT else x, x._plates if type(x) is _PT else (), plates, len(shape))
    return wrap(raw.expand(*[p.size for p in plates], *shape), plates)


@register(_T.repeat)
def _repeat(func, args, kwargs):
    """repeats per-sample dims; plate dims are not repeated"""
    x = args[0]
    sizes = _shape_arg(args, kwargs, "repeats")
    try:
        return wrap(_pad_raw(x, len(sizes)).repeat(*([1] * len(x._plates)), *sizes), x._plates)
    except Exception:
        refuse_sampled_size(func, sizes)  # (as in _expand: on the error path only)
        raise


def _full(x, plates, k=None):
    """``x`` aligned to ``plates`` and expanded to the plate sizes (for cat, stack, gather)."""
    if type(x) is _PT:
        raw = align(x._raw, x._plates, plates)
        return raw.expand(*[p.size for p in plates], *raw.shape[len(plates):])
    return x.expand(*[p.size for p in plates], *x.shape)


@register(*_both("cat"), *_both("concat"), *_both("concatenate"), *_both("stack"))
def _cat(func, args, kwargs):
    """concatenates / stacks along a per-sample dim; plates aligned by name first"""
    tensors = args[0] if args else kwargs["tensors"]
    first = tensors[0] if tensors else None
    if type(first) is _PT and len(args) + len(kwargs) <= 2 and all(k == "dim" for k in kwargs):
        # fast path: plate tensors on the same plates, every plate dim full: one call on the raw tensors
        pf = first._plates
        n = len(pf)
        size = first._raw.shape[:n]
        if all(type(t) is _PT and (t._plates is pf or t._plates == pf) and t._raw.shape[:n] == size
               for t in tensors):
            d = args[1] if len(args) > 1 else kwargs.get("dim", 0)
            extra = 1 if func in (torch.stack, getattr(_T, "stack", None)) else 0
            try:
                return wrap_same(func([t._raw for t in tensors], tdim(d, n, first._raw.dim() - n + extra)), pf)
            except (RuntimeError, PlateError):
                pass  # a legacy empty (0,) sample among them (first: its rank): the general path (or its error)
    plates = union_plates(scan((tensors,), {}))
    n = len(plates)
    ks = [t._raw.dim() - len(t._plates) if type(t) is _PT else t.dim() for t in tensors]
    d, _ = _get_dim(args, _numpy_names(kwargs) if kwargs else kwargs, 1, 0)  # cat(..., axis=1)
    stack = func in (torch.stack, getattr(_T, "stack", None))
    # torch.cat skips a 1-d empty tensor (the legacy `out = torch.tensor([])` accumulation) whatever the
    # others' shapes: per sample such a tensor is passed on as a raw (0,) tensor, which torch skips on
    # the raw tensors too (its dtype still takes part in the type promotion, as for one sample)
    skip = [not stack and k_ == 1 and t.shape[0] == 0 for t, k_ in zip(tensors, ks)]
    if all(skip):
        skip = [False] * len(tensors)
    rank = {k_ for k_, s in zip(ks, skip) if not s}
    if not stack and len(rank) > 1:  # torch's refusal, in per-sample dims (the raw tensors' would count plate dims)
        raise RuntimeError(f"Tensors must have same number of dimensions: got {min(rank)} and {max(rank)}")
    k = max(ks)
    raws = [(t if type(t) is not _PT else t._raw.new_empty(0)) if s else _full(t, plates)
            for t, s in zip(tensors, skip)]
    return wrap_same(func(raws, tdim(d, n, k + stack)), plates)


@register(*_both("gather"), *_both("take_along_dim"))
def _gather(func, args, kwargs):
    """index and input aligned by plate; dim counts per-sample dims (take_along_dim without dim: each sample flattened)"""
    args, kwargs = _input_first(args, kwargs)
    x = args[0]
    take = func in _TAKE_ALONG_DIM
    if take:  # take_along_dim(input, indices, dim=None)
        index = args[1] if len(args) > 1 else kwargs["indices"]
        d = args[2] if len(args) > 2 else kwargs.get("dim")
        if d is None:
            # dim=None: per sample, input and indices flattened to 1-d (torch: input.view(-1).gather(0,
            # indices.view(-1))); here over the per-sample dims only, plate dims kept
            x, index, d = _flat(x), _flat(index), 0
    else:  # gather(input, dim, index, *, sparse_grad=False)
        d = args[1] if len(args) > 1 else kwargs["dim"]
        index = args[2] if len(args) > 2 else kwargs["index"]
    if not take and type(x) is _PT and type(index) is _PT and type(d) is int and not kwargs.get("sparse_grad"):
        # fast path (log-probabilities at sampled indices): input and index on the same plates, every
        # plate dim of the same size in both: one gather on the raw tensors (not take_along_dim, which
        # broadcasts the per-sample dims where gather does not)
        px, n = x._plates, len(x._plates)
        if (index._plates is px or index._plates == px) and x._raw.shape[:n] == index._raw.shape[:n]:
            return wrap_same(torch.gather(x._raw, tdim(d, n, x._raw.dim() - n), index._raw), px)
    elif (not take and type(x) is not _PT and isinstance(x, _T) and type(index) is _PT and type(d) is int
          and not kwargs.get("sparse_grad")):
        # fast path (a plain table at sampled indices: table.gather(0, z)): the table viewed with the index's
        # plate dims (expanded, no copy), one gather on the raw tensors
        n = len(index._plates)
        raw_i = index._raw
        raw_x = x.expand(tuple(raw_i.shape[:n]) + tuple(x.shape))
        return wrap_same(torch.gather(raw_x, tdim(d, n, x.dim()), raw_i), index._plates)
    plates = union_plates(scan((x, index), {}))
    k = x._raw.dim() - len(x._plates) if type(x) is _PT else x.dim()
    raw_x, raw_i = _full(x, plates), _full(index, plates)
    dd = tdim(d, len(plates), k)
    out = torch.take_along_dim(raw_x, raw_i, dd) if take else torch.gather(raw_x, dd, raw_i)
    return wrap(out, plates)


_TAKE_ALONG_DIM = frozenset(_both("take_along_dim"))


def _flat(t):
    """``t``'s per-sample elements as one per-sample dim (a plain tensor: all of its elements)."""
    if type(t) is _PT:
        return wrap_same(t._raw.reshape(t._raw.shape[: len(t._plates)] + (-1,)), t._plates)
    return t.reshape(-1)


# -- matmul, linear --------------------------------------------------------------------------------


_STRIDED = torch.strided
# the per-sample ranks of the dense operand next to a sparse left operand (torch.mm: matrices, mv: vectors)
_SPARSE_RANKS = {**dict.fromkeys(_both("mm"), (2,)), **dict.fromkeys(_both("mv"), (1,))}


@register(*_both("matmul"), _T.__matmul__, _T.__rmatmul__, *_both("mm"), *_both("bmm"), *_both("mv"))
def _matmul(func, args, kwargs):
    """matrix product of the per-sample tensors (1-d operands as in torch.matmul)"""
    if len(args) < 2:  # keyword operands: matmul(input=, other=), mm(mat2=), mv(vec=)
        args = (*args, *[kwargs[key] for key in ("input", "other", "mat2", "vec") if key in kwargs])
    a, b = (args[1], args[0]) if func is _T.__rmatmul__ else (args[0], args[1])
    if type(a) is _PT and type(b) is _T and 0 < b.dim() <= 2 and a._raw.dim() > len(a._plates):
        # per-sample vector or matrices times one plain matrix or vector: the plate dims are batch
        # dims of torch.matmul's own (a single mm / mv, as written by hand for a batch of row
        # vectors; a per-sample dot product with a plain vector contracts the last dim the same way)
        try:
            return wrap_same(torch.matmul(a._raw, b), a._plates)
        except RuntimeError:
            if is_sparse(b):  # torch.matmul expands the batch dims, which a sparse b does not support
                return sparse_matmul(a, b, torch.mm, (2, 1), func)
            raise
    if type(a) is _PT and type(b) is _PT and (a._plates is b._plates or a._plates == b._plates):
        n = len(a._plates)
        if a._raw.dim() == b._raw.dim() >= n + 2:
            # two plate tensors on the same plates, per-sample matrices (or stacks of them) of one
            # rank: the plate dims are batch dims that line up (x @ x.mT, attention scores)
            return wrap_same(torch.matmul(a._raw, b._raw), a._plates)
    if (type(a) is _T and a.layout is not _STRIDED) or (type(b) is _T and b.layout is not _STRIDED):
        # a plain sparse matrix (a fixed graph): the plates folded into the dense operand's columns or rows
        return sparse_matmul(a, b, torch.mm, _SPARSE_RANKS.get(func, (2, 1)), func)
    plates = union_plates(scan((a, b), {}))
    ka = a._raw.dim() - len(a._plates) if type(a) is _PT else a.dim()
    kb = b._raw.dim() - len(b._plates) if type(b) is _PT else b.dim()
    ra = align(a._raw, a._plates, plates) if type(a) is _PT else a
    rb = align(b._raw, b._plates, plates) if type(b) is _PT else b
    if ka == 1 and kb == 1:  # vector · vector: a per-sample dot product
        return dispatch(_T.sum, (broadcast(torch.mul, (a, b), {}), -1), {})
    sq = None
    if type(a) is _PT and ka == 1:
        ra, ka, sq = ra.unsqueeze(-2), 2, -2
    elif type(b) is _PT and kb == 1:
        rb, kb, sq = rb.unsqueeze(-1), 2, -1
    k = max(ka, kb)
    if type(a) is _PT:
        ra = align(ra, plates, plates, k)
    if type(b) is _PT:
        rb = align(rb, plates, plates, k)
    out = _broadcast_matmul(ra, rb) if ra.dim() == rb.dim() >= 3 else torch.matmul(ra, rb)
    if sq is not None:
        out = out.squeeze(sq)
    return wrap(out, plates)


def _broadcast_matmul(ra: torch.Tensor, rb: torch.Tensor) -> torch.Tensor:
    """``torch.matmul(ra, rb)`` for ``ra`` (..., M, K) and ``rb`` (..., K, N) with equally many batch
    dims, a batch dim that is size 1 in one operand folded into the other's rows (M) or columns (N).

    torch.matmul expands a broadcast batch dim: a sampled weight (n, 1, K, N) against data-plate
    inputs (1, B, 1, K) was copied once per data point, an n*B*K*N tensor in forward and backward
    (>10x the hand-written batch at n=4). Folded, it is one (B, K) @ (K, n*N) product, as
    torch.einsum's sumproduct_pair does; the operands are reshaped (a view where their strides allow,
    else one copy of the operand itself), never expanded.
    """
    nb = ra.dim() - 2
    both, lo, ro, ones = [], [], [], []  # batch dims of size > 1 in both operands, only in ra, only in rb, in neither
    for i in range(nb):
        sa, sb = ra.shape[i], rb.shape[i]
        if sa != 1 and sb != 1:
            if sa != sb:
                return torch.matmul(ra, rb)  # torch's own error
            both.append(i)
        elif sa != 1:
            lo.append(i)
        elif sb != 1:
            ro.append(i)
        else:
            ones.append(i)
    if not lo and not ro:
        return torch.matmul(ra, rb)  # nothing to expand
    m, kk, n = ra.shape[-2], ra.shape[-1], rb.shape[-1]
    s_both = [ra.shape[i] for i in both]
    s_lo = [ra.shape[i] for i in lo]
    s_ro = [rb.shape[i] for i in ro]
    lead = (math.prod(s_both),) if both else ()  # one mm where no batch dim is in both
    # each operand's size-1 batch dims lead (the reshape drops them), then (both, lo*M, K) and (both, K, ro*N)
    fa = ra.permute(*ones, *ro, *both, *lo, nb, nb + 1).reshape(*lead, math.prod(s_lo) * m, kk)
    fb = rb.permute(*ones, *lo, *both, nb, *ro, nb + 1).reshape(*lead, kk, math.prod(s_ro) * n)
    out = torch.bmm(fa, fb) if both else torch.mm(fa, fb)
    # (ones, both, lo, M, ro, N), back to the batch dims in their own order
    order = [*ones, *both, *lo, nb, *ro, nb + 1]
    out = out.reshape(*[1] * len(ones), *s_both, *s_lo, m, *s_ro, n)
    return out.permute(*[order.index(i) for i in range(nb + 2)])


_EINSUM_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"  # the subscripts torch.einsum accepts


@functools.lru_cache(maxsize=256)
def _einsum_equation(equation: str, plate_operands: tuple, m: int) -> Optional[tuple]:
    """``equation`` with the ``m`` plate dims as subscript letters it does not use, leading the term
    of each plate operand (``plate_operands``: one bool per operand) and the result; and each term's
    per-sample rank: exact, or for a term with an ellipsis the least (its letters). ``None`` where
    it is not an equation of that many operands, or uses too many of the 52 letters to add ``m``."""
    eq = equation.replace(" ", "")
    lhs, arrow, rhs = eq.partition("->")
    terms = lhs.split(",")
    if len(terms) != len(plate_operands):
        return None
    free = [c for c in _EINSUM_LETTERS if c not in eq]
    if len(free) < m:
        return None
    lead = "".join(free[:m])
    if not arrow:  # implicit output: the ellipsis dims, then the labels that appear once, in torch's (ASCII) order
        rhs = ("..." if "..." in lhs else "") + "".join(
            sorted(c for c in set(lhs) if c.isalpha() and lhs.count(c) == 1))
    new = ",".join(lead + t if p else t for t, p in zip(terms, plate_operands)) + "->" + lead + rhs
    ranks = tuple((len(t) - 3, True) if "..." in t else (len(t), False) for t in terms)
    return new, ranks


def _einsum_ranks_fit(ops, ranks) -> bool:
    """Whether each plate operand has its term's per-sample rank (at least it, for an ellipsis)."""
    for (r, ellipsis), t in zip(ranks, ops):
        if type(t) is _PT:
            k = t._raw.dim() - len(t._plates)
            if k != r and not (ellipsis and k > r):
                return False
    return True


@register(torch.einsum)
def _einsum(func, args, kwargs):
    """the equation is per sample; each plate dim becomes a subscript letter the equation does not
    use, leading the plate operands (aligned to the union of their plates) and the result"""
    if kwargs or not args or not isinstance(args[0], str):
        return vmap_call(func, args, kwargs)  # (torch turns the sublist format into an equation first)
    ops = args[1:]
    if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
        ops = tuple(ops[0])
    first = None
    for t in ops:
        if type(t) is _PT:
            if first is None:
                first = t._plates
            elif t._plates is not first and t._plates != first:
                first = None
                break
    # every plate operand on the same plates: no alignment
    plates = first if first is not None else union_plates(scan(ops, {}))
    plan = _einsum_equation(args[0], tuple(type(t) is _PT for t in ops), len(plates))
    if plan is None or not _einsum_ranks_fit(ops, plan[1]):
        return vmap_call(func, args, kwargs)  # over 52 subscripts, or torch's own error per sample
    if first is not None:
        return wrap_same(torch.einsum(plan[0], *[t._raw if type(t) is _PT else t for t in ops]), first)
    raws = [align(t._raw, t._plates, plates) if type(t) is _PT else t for t in ops]
    return wrap(torch.einsum(plan[0], *raws), plates)


@register(*_both("dot"))
def _dot(func, args, kwargs):
    """per-sample dot product (sum of the elementwise product over the last dim)"""
    return dispatch(_T.sum, (broadcast(torch.mul, args[:2], {}), -1), {})


@register(*_both("inner"))
def _inner(func, args, kwargs):
    """a 0-dim operand multiplies; else Σ_k a[i.., k] b[j.., k] over the last dims (shape A[:-1] + B[:-1])"""
    a, b = args[0], args[1] if len(args) > 1 else kwargs["other"]
    da = a._raw.dim() - len(a._plates) if type(a) is _PT else a.dim()
    db = b._raw.dim() - len(b._plates) if type(b) is _PT else b.dim()
    if da == 0 or db == 0:
        return broadcast(torch.mul, (a, b), {})
    for _ in range(db - 1):
        a = dispatch(_T.unsqueeze, (a, -2), {}) if type(a) is _PT else a.unsqueeze(-2)  # (*A[:-1], 1, .., K)
    for _ in range(da - 1):
        b = dispatch(_T.unsqueeze, (b, 0), {}) if type(b) is _PT else b.unsqueeze(0)  # (1, .., *B[:-1], K)
    return dispatch(_T.sum, (broadcast(torch.mul, (a, b), {}), -1), {})


@register(F.linear)
def _linear(func, args, kwargs):
    """x @ W.T + b per sample; a per-sample weight goes through matmul"""
    if not args:
        args, kwargs = _input_first(args, kwargs)  # F.linear(input=x, weight=W)
    x = args[0]
    w = args[1] if len(args) > 1 else kwargs["weight"]
    b = args[2] if len(args) > 2 else kwargs.get("bias")
    if type(w) is not _PT and type(b) is not _PT:
        return wrap_same(F.linear(x._raw, w, b), x._plates)
    # matmul folds the plates that only one of x and W has into the product's rows or columns
    # (_broadcast_matmul): a sampled weight is not copied once per data point. W.t() as torch's
    # linear reads a 1-d weight; a plain W with a sampled bias is plain torch
    wt = dispatch(_T.t, (w,), {}) if type(w) is _PT else w.t()
    out = _matmul(torch.matmul, (x, wt), {})
    return out if b is None else broadcast(torch.add, (out, b), {})


@register(F.layer_norm, *([F.rms_norm] if hasattr(F, "rms_norm") else []))
def _layer_norm(func, args, kwargs):
    """the last dims of each sample (normalized_shape); a per-sample weight goes to vmap"""
    x = args[0]
    if type(x) is not _PT or any(type(a) is _PT for a in args[1:]) or any(type(v) is _PT for v in kwargs.values()):
        return vmap_call(func, args, kwargs)
    shape = args[1] if len(args) > 1 else kwargs["normalized_shape"]
    if len(tuple(shape)) > x._raw.dim() - len(x._plates):
        return vmap_call(func, args, kwargs)  # torch's own error, in per-sample shapes
    return wrap(func(x._raw, *args[1:], **kwargs), x._plates)


@register(F.embedding)
def _embedding(func, args, kwargs):
    """indices of any shape: the table is looked up per element; a per-sample table is gathered per sample"""
    if type(args[1] if len(args) > 1 else kwargs.get("weight")) is _PT or (
            (args[5] if len(args) > 5 else kwargs.get("scale_grad_by_freq")) is True and type(args[0]) is _PT
            and (args[6] if len(args) > 6 else kwargs.get("sparse")) is not True):
        # (scale_grad_by_freq on the raw indices would count a row over all plate entries, not per sample; with
        # sparse=True torch's own backward refuses the pair, "scale_grad_by_freq not supported with sparse
        # gradients": the raw call below keeps that refusal, where the laid-out tables gave a dense gradient)
        return _embedding_table(func, args, kwargs)
    if type(args[0]) is not _PT or any(type(a) is _PT for a in list(args[1:]) + list(kwargs.values())):
        return vmap_call(func, args, kwargs)
    x = args[0]
    return wrap(func(x._raw, *args[1:], **kwargs), x._plates)


def _refuse_sparse_table(w) -> NoReturn:
    """F.embedding(..., sparse=True) of a table on plates whose gradient is needed: refused (a PlateError)."""
    plates = ", ".join(f"{p.name!r} (size {p.size})" for p in w._plates)
    raise PlateError(
        f"F.embedding with sparse=True of a table on the plates {plates} (one table per plate entry, e.g. a sampled "
        "table): torch gives one sample's table a sparse gradient, which storch cannot give here: the plates' raw "
        "tables are made of your plain tensors broadcast over the plates, and a sparse gradient cannot flow back "
        "through that broadcast (torch has no view of a sparse tensor), so the gradient would be a dense one "
        "silently. Pass sparse=False (the same gradient values, dense: optimise with a dense optimizer such as "
        "Adam, not SparseAdam); or look the rows up in a plain table, where storch keeps torch's sparse gradient, "
        "and make them per-sample after the lookup (for a table mu + sigma * eps: F.embedding(z, mu, sparse=True) "
        "+ F.embedding(z, sigma, sparse=True) * eps[z]); or detach the table if it needs no gradient")


_EMBEDDING_ARGS = ("input", "weight", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse")


def _embedding_table(func, args, kwargs):
    """F.embedding with a per-sample table (or a plain one with ``scale_grad_by_freq``): ``weight[input]`` per sample,
    by advanced indexing of the raw tables.

    torch's vmap rule is wrong when the table and the indices are both batched (the padding row got a
    gradient). Here the padding row's value is read and its gradient stopped (``torch.where`` with the
    detached lookup); with ``scale_grad_by_freq`` the tables are laid out one after another (one per
    plate entry) and torch's own embedding runs on them with offset indices, so each row's gradient is
    divided by its count in that entry's indices, as per sample. ``max_norm`` (renormalises the table
    in place) of a per-sample table and torch's own errors go to vmap."""
    b = dict(zip(_EMBEDDING_ARGS, args))
    b.update(kwargs)
    idx, w, pad = b.get("input"), b.get("weight"), b.get("padding_idx")
    scale = b.get("scale_grad_by_freq", False)
    sparse = b.get("sparse") is True
    if sparse and not scale and type(w) is _PT and w.requires_grad and torch.is_grad_enabled():
        _refuse_sparse_table(w)
    if (set(b) - set(_EMBEDDING_ARGS) or (b.get("max_norm") is not None and type(w) is _PT)
            or not isinstance(idx, torch.Tensor) or idx.dtype not in (torch.long, torch.int) or w.dim() != 2 or not isinstance(scale, bool)
            or not (pad is None or (type(pad) is int and -w.shape[0] <= pad < w.shape[0]))):
        return vmap_call(func, args, kwargs)
    n = w.shape[0]
    if b.get("max_norm") is not None:
        # a plain table (with scale_grad_by_freq) is renormalised in place as F.embedding does, once for the rows
        # any entry reads: what one call per entry does (a row's renorm is idempotent); vmap cannot
        raw = idx._raw.contiguous()
        if not raw.is_meta and bool(((raw < 0) | (raw >= n)).any()):
            raise IndexError("index out of range in self")  # (before the table is written)
        with torch.no_grad():
            torch.embedding_renorm_(w.detach(), raw, b["max_norm"], b.get("norm_type", 2.0))
    plates = union_plates(scan((idx, w), {}))
    m = len(plates)
    wr = align(w._raw, w._plates, plates) if type(w) is _PT else w.reshape((1,) * m + tuple(w.shape))  # (plates or 1, n, D)
    ir = align(idx._raw, idx._plates, plates) if type(idx) is _PT else idx.reshape((1,) * m + idx.shape)
    shape = ir.shape[m:]  # the per-sample index shape
    sizes = tuple(max(a, c) for a, c in zip(wr.shape[:m], ir.shape[:m]))
    if scale:
        if not ir.is_meta and bool(((ir < 0) | (ir >= n)).any()):  # (offset indices out of range would read another table)
            raise IndexError("index out of range in self")
        count = math.prod(sizes)
        tables = wr.expand(sizes + wr.shape[m:]).reshape(count * n, wr.shape[-1])
        offsets = torch.arange(0, count * n, n, device=ir.device).reshape(sizes + (1,) * len(shape))
        # sparse=True: torch's backward refuses the pair, as on one sample ("scale_grad_by_freq not supported
        # with sparse gradients"), where the laid-out tables' dense gradient was given silently (f-silent17)
        out = torch.embedding(tables, ir + offsets, -1, True, sparse)
    else:
        ir_ok = torch.where(ir < 0, n, ir)  # negative indices are out of range for embedding (indexing raises)
        at = [torch.arange(wr.shape[j], device=ir.device).reshape((1,) * j + (-1,) + (1,) * (m - j - 1 + len(shape)))
              for j in range(m)]
        out = wr[(*at, ir_ok)]
    if pad is not None:
        # the padding row is read as it is, but gets no gradient (torch's padding_idx)
        out = torch.where((ir != pad % n).unsqueeze(-1), out, out.detach())
    return wrap(out, plates)
