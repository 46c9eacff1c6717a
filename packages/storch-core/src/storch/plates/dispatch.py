"""The plate dispatcher: ``PlateTensor.__torch_function__``.

Every call that involves a :class:`PlateTensor` comes here through ``__torch_function__``. The
function's treatment (pointwise, handler, batch-first, vmap, refused) is looked up in the table
of ``storch.plates.treatments`` once and its implementation cached: pointwise functions in
``rules.pointwise``, functions whose arguments name dimensions in ``rules.shape`` (and
``rules.indexing``, ``rules.losses``, ``rules.metadata``), batch-first functions in
``rules.batch_first`` and everything else by ``torch.func.vmap`` (``rules.vmap``).
Any error torch raises inside a plate call is re-raised as a :class:`storch.PlateError` that
speaks of the per-sample shapes the user sees. No rule imports this module: it installs itself
on the tensor (``storch.plates.tensor.install_dispatcher``) when imported.
"""

from __future__ import annotations

import sys
from typing import Optional

import torch

from ..runtime.eager import foreign_trace_message, mark_eager_only, set_eval_frame, under_jit_trace
from ..errors import OrderError, PlateError, plate_error_from
from .draws import DRAWS, check_no_grad_call, watch_draw
from .integer_reads import _INNER, MARKS, mark, spread
from .kit import (_is_inplace, _operands, dispatch, register, scan, too_many_samples, unwrap, wrap, wrap_same,
                  write_through)
from .rules import autograd, indexing, losses, metadata, scatter, shape  # noqa: F401  (register their handlers)
from .rules.batch_first import batch_first
from .rules.pointwise import broadcast, broadcast_inplace, random_pointwise
from .rules.sparse import SPARSE_ADVICE
from .rules.vmap import vmap_call
from .tensor import (SAMPLED_SIZE, PlateTensor, _names, align, install_dispatcher, too_many_dims_message,
                     union_plates)
from .tensor import new_plate_tensor as _new
from .treatments import _LISTENERS, Entry, Treatment, describe, treatment_of

__all__ = ["dispatch", "register", "wrap", "scan", "unwrap", "too_many_samples", "user_error", "JUMPS", "INDEXING",
           "INDEX_VALUES", "INTEGER_SOURCES", "COUNTS", "FINITENESS_TESTS", "CASTS", "casts_to_jump", "FLOOR_DIVISIONS"]

_PT = PlateTensor
_T = torch.Tensor


def refused(message: str):
    def handler(func, args, kwargs):
        raise PlateError(f"{describe(func)} cannot run on plate tensors: {message}")
    return handler


_FLOAT_INDEX_HINT = (
    ". A floating-point sample used as an index: the relaxed estimators (gumbel_softmax, gumbel_straight_through, "
    "straight_through, rebar, relax) hand out one-hot vectors (or relaxed ones), not indices, for a "
    "OneHotCategorical node and for a Categorical they take with categorical='one_hot'; write the lookup "
    "for one-hot inputs (z @ emb.weight instead of emb(z), (z * values).sum(-1) instead of values[z]), or use an "
    "estimator that hands out indices (score, unordered_set, expect, ...)")


# torch's words where it read one Python number from a tensor argument: vmap's (torch.zeros(n), F.pad, diff(n=...)
# under the vmap treatment) and the argument parser's (topk(x, k), view(n), full_like(x, v))
_NUMBER_READ = ("calling .item() on a Tensor", "must be int, not", "must be Number, not", "iterable of 'int'",
                "must be tuple of ints")


def user_error(func, args, kwargs, e: BaseException) -> PlateError:
    """A PlateError (of the original exception's kind) that describes the call in per-sample terms."""
    if under_jit_trace():
        # (torch.jit.trace of a function of plate tensors outside a storch step: torch's "Cannot insert a Tensor that
        # requires grad as a constant" read as a bug in the user's op; found by a third-party author, p-ext3)
        return plate_error_from(e, foreign_trace_message(f"{describe(func)} on plate tensors") + f". torch said: {e}")
    parts = []
    for a in _operands(args, kwargs or {}):
        if type(a) is _PT:
            ps = ", ".join(f"{p.name}={p.size}" for p in a._plates)
            parts.append(f"{tuple(a.shape)} on plates ({ps})")
        elif isinstance(a, _T):
            parts.append(f"{tuple(a.shape)} (plain)")
    hint = ""
    if _float_index(func, args, kwargs or {}) or (
            "indices" in str(e) and any(type(a) is _PT and a.is_floating_point() for a in _operands(args, kwargs or {}))):
        hint = _FLOAT_INDEX_HINT
    elif "up to 64 dims" in str(e) or "more than 64 dimensions" in str(e):
        hint = ". Every stochastic node adds a plate dim: " + too_many_dims_message(64 + 1).split(": ", 1)[1]
    elif any((a._raw if type(a) is _PT else a).layout is not torch.strided
             for a in _operands(args, kwargs or {}) if isinstance(a, _T)):
        hint = ". A sparse operand: " + SPARSE_ADVICE
    elif any(m in str(e) for m in _NUMBER_READ) and any(  # (a factory's size is its first argument: torch.zeros(n))
            type(a) is _PT for a in _operands(args if _NUMBER_READ[0] in str(e) else args[1:], kwargs or {})):
        hint = (". A PlateTensor (a sample) was passed where torch takes a Python number (a size, a count, a bound, "
                "a fill value): one number cannot hold every sample's value (a sampled fill value: `torch.zeros_like(x) + v`). "
                + SAMPLED_SIZE)
    elif "refers to a single memory location" in str(e):
        hint = (". The written-to tensor is a broadcast view (a sample that is the same for several plate "
                "entries, as expect's enumerated values are, or an expanded tensor): compute a new tensor instead "
                "of writing in place (z = z * 2, torch.where(...))")
    return plate_error_from(
        e,
        f"{describe(func)} failed on plate tensors. Per sample (as your code sees them) its tensor "
        f"arguments have shapes {', '.join(parts) or '()'}; the plates are vectorised by storch "
        f"({treatment_of(func).treatment.value} treatment). torch said: {e}{_raw_shapes(e, args, kwargs or {})}{hint}",
    )


def _index_arguments() -> dict:
    """The functions that take an index tensor: where it is among the arguments (position, name)."""
    out = {}
    for names, at in ((("index_select", "gather", "index_add", "index_add_", "index_copy", "index_copy_", "index_fill",
                        "index_fill_", "index_reduce", "index_reduce_", "scatter", "scatter_", "scatter_add",
                        "scatter_add_", "scatter_reduce", "scatter_reduce_"), (2, "index")),
                      (("take_along_dim",), (1, "indices")), (("take", "put", "put_"), (1, "index")),
                      (("bincount",), (0, "input"))):
        for n in names:
            out.update((f, at) for f in (getattr(torch, n, None), getattr(_T, n, None)) if f is not None)
    return out


# the index argument of the functions that take one (for the hint of a floating-point sample used as an index)
_INDEX_ARGUMENT: dict = _index_arguments()


def _float_index(func, args, kwargs) -> bool:
    """Whether ``func`` takes an index tensor and was given a floating-point plate tensor (a sample) as it."""
    at = _INDEX_ARGUMENT.get(func)
    if at is None:
        return False
    i = args[at[0]] if len(args) > at[0] else kwargs.get(at[1], kwargs.get("self") if at[0] == 0 else None)
    return type(i) is _PT and i.is_floating_point()


def _raw_shapes(e: BaseException, args, kwargs) -> str:
    """A note where torch's message shows the raw shape of a plate operand (plate dims first): a handler ran
    torch on the raw tensors, and its shapes and dim numbers would contradict the per-sample ones above."""
    msg = str(e)
    passed = None
    for a in _operands(args, kwargs):
        if type(a) is _PT and a._plates:
            s = tuple(a._raw.shape)
            if passed is None:
                passed = _passed_sizes(args, kwargs)
            if s in passed:  # torch may be quoting the user's own sizes (x.unflatten(0, (2, 3)))
                continue
            if str(list(s)) in msg or str(s) in msg or f"torch.Size({list(s)})" in msg:
                ps = ", ".join(f"{p.name}={p.size}" for p in a._plates)
                return (f" (torch's shapes and dims here are the raw tensors', which hold the plates first: {s} is "
                        f"the per-sample shape {tuple(a.shape)} after plate dims ({ps}))")
    return ""


def _passed_sizes(args, kwargs) -> set:
    """The sizes the user passed in a call (error path only): each sequence of ints among the arguments
    (``(2, 3)`` of ``x.unflatten(0, (2, 3))``, a ``torch.Size``) and each run of int positional arguments (``2, 3``
    of ``x.view(2, 3)``), as tuples."""
    out: set = set()
    run: list = []
    for a in (*args, None, *kwargs.values()):
        if isinstance(a, int) and not isinstance(a, bool):
            run.append(a)
            continue
        if run:
            out.add(tuple(run))
            run = []
        if isinstance(a, (tuple, list)) and all(isinstance(v, int) and not isinstance(v, bool) for v in a):
            out.add(tuple(a))
    if run:
        out.add(tuple(run))
    return out


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
    if _is_inplace(func) or func is _T.__setitem__:
        impl = _writing(impl)
    if func in JUMPS or func in INDEX_VALUES:
        impl = _watched(impl)
    elif func in CASTS:
        impl = _watched_cast(impl)
    elif func is _GUMBEL_SOFTMAX:
        impl = _watched_hard(impl)
    if func in DRAWS:
        impl = watch_draw(impl)
    floor = FLOOR_DIVISIONS.get(func)
    if floor is not None:  # (computed as torch.div(..., rounding_mode="floor"), which autograd records)
        impl = _as_floor_division(impl, floor)
    _IMPL[func] = impl
    return impl


def _jumps() -> frozenset:
    names = ("eq", "ne", "gt", "ge", "lt", "le", "greater", "greater_equal", "less", "less_equal", "not_equal",
             "isclose", "argmax", "argmin", "argsort", "bucketize", "logical_not", "logical_and", "logical_or",
             "logical_xor", "heaviside", "signbit", "isfinite", "isinf", "isposinf", "isneginf", "isnan", "histc",
             "count_nonzero", "frexp")
    methods = ("__eq__", "__ne__", "__gt__", "__ge__", "__lt__", "__le__", "bool", "long", "int", "short", "char",
               "byte")
    out = {getattr(torch, n) for n in names if hasattr(torch, n)}
    out.update(getattr(_T, n) for n in names + methods if hasattr(_T, n))
    out.update(getattr(_T, n + "_") for n in names if hasattr(_T, n + "_"))
    out.add(torch.searchsorted)
    # signbit and the finiteness tests are thresholds as `x < 0` is (isfinite(log(z - 0.5)) is z > 0.5); histc and
    # count_nonzero count the entries past thresholds, frexp's exponent is floor(log2 |x|) + 1: each jumps where its
    # operand crosses a threshold, with no autograd history (found by porting: REBAR's gradient 0.0246 for 0.7578).
    # Not here: bincount (its input is already an integer, read by a cast or argmax that is here; its weights are
    # summed, linearly), nan_to_num (the identity on finite values: docs/estimators/rebar.md), nonzero / argwhere /
    # unique / unique_consecutive (refused on plate tensors: their result's shape depends on the values).
    # Not here: max / min / median with a dim, topk, sort, kthvalue, mode, cummax / cummin. Their indices jump
    # as argmax does, but their values are continuous, and a decoder's x - x.max(-1, keepdim=True).values is
    # common: recording the call refused it (found by review), and telling which output a cost uses would need
    # a mark on every tensor computed from the indices. They are in INDEX_VALUES: a pathwise node's watch marks the
    # indices, and the mark follows the tensors computed from them (storch.plates.integer_reads); so does a
    # jump_free estimator's watch (REBAR, RELAX: storch.estimators.watch._threshold_watch) in user code.
    return frozenset(out)


# The functions whose result jumps where their (floating-point) operand crosses a threshold, outside the
# autograd graph (a bool or integer result carries no grad_fn, so storch.extending.require_smooth, which
# walks that graph, cannot see them): comparisons and their method, operator and in-place forms, argmax /
# argmin / argsort, bucketize / searchsorted, logical operations, bool and integer casts. Applied to a plate
# tensor, they are reported to the watch of its plates' lineages (Lineage.watch: set by a node whose estimator
# must not see its sample thresholded), with its plates where it has no autograd graph to walk. No other function
# pays anything: the check is part of these functions' cached implementation only.
JUMPS: frozenset = _jumps()

def _floor_divisions() -> dict:
    """``floor_divide`` in its forms (``//``, ``//=``, ``Tensor.floor_divide(_)``) -> the same division written with
    ``torch.div(..., rounding_mode="floor")``, with the original's name. On a plate tensor it is computed so:
    torch's ``floor_divide`` has no derivative (autograd raises its own RuntimeError in backward, after the
    surrogate was built), while the division with a rounding mode is recorded as ``DivBackward`` with its mode,
    which :mod:`storch.conditions.smoothness` counts as a jump (a pathwise node's cost is refused at order 1, as ``floor``
    is). The values are torch's: ``floor_divide`` rounds towards -inf, as the floor division does."""
    def rfloor(a, b):
        return torch.div(b if isinstance(b, torch.Tensor) else torch.as_tensor(b, device=a.device), a,
                         rounding_mode="floor")

    def inplace(a, b):
        return a.div_(b, rounding_mode="floor")

    def plain(a, b, *, out=None):
        return torch.div(a, b, rounding_mode="floor", out=out)

    def make(name: str):
        body = rfloor if name == "__rfloordiv__" else inplace if name in ("floor_divide_", "__ifloordiv__") else plain

        def fn(*args, **kwargs):
            return body(*args, **kwargs)
        fn.__name__ = fn.__qualname__ = name
        return fn

    out = {}
    for owner, name in ((torch, "floor_divide"), (_T, "floor_divide"), (_T, "__floordiv__"), (_T, "__rfloordiv__"),
                        (_T, "floor_divide_"), (_T, "__ifloordiv__")):
        f = getattr(owner, name, None)
        if f is not None:
            out[f] = make(name)
    return out


def _as_floor_division(impl, floor):
    """``impl`` of a function of :data:`FLOOR_DIVISIONS`, called with its floor division in its place."""
    def run(func, args, kwargs):
        return impl(floor, args, kwargs)
    return run


FLOOR_DIVISIONS: dict = _floor_divisions()

# Casts that are a jump for some targets only: Tensor.to / Tensor.type to a bool or integer dtype (y.to(torch.bool),
# y.type(torch.long)), as Tensor.bool / Tensor.long are (casts_to_jump); a cast to another floating dtype is smooth.
CASTS: frozenset = frozenset({_T.to, _T.type})


def _jump_dtype(a) -> Optional[bool]:
    if isinstance(a, torch.dtype):
        return not (a.is_floating_point or a.is_complex)
    if isinstance(a, str):  # (Tensor.type's type strings: "torch.BoolTensor", "torch.cuda.LongTensor")
        return not any(k in a for k in ("Float", "Double", "Half", "BFloat", "Complex"))
    if isinstance(a, torch.Tensor):  # (Tensor.to(other): other's dtype)
        return not (a.dtype.is_floating_point or a.dtype.is_complex)
    dtype = getattr(a, "dtype", None)  # (Tensor.type's tensor types: torch.LongTensor, found by review)
    if isinstance(dtype, torch.dtype):
        return not (dtype.is_floating_point or dtype.is_complex)
    return None


def casts_to_jump(args, kwargs) -> bool:
    """Whether a call of a function of :data:`CASTS` (``Tensor.to``, ``Tensor.type``) casts its tensor to a bool or
    integer dtype: a jump, as ``Tensor.bool()`` is."""
    for a in args[1:]:
        v = _jump_dtype(a)
        if v is not None:
            return v
    if kwargs:
        v = _jump_dtype(kwargs.get("dtype"))
        return bool(v)
    return False


# The functions of JUMPS that read their operand as indices: argmax / argmin / argsort, bucketize / searchsorted,
# integer casts. Comparisons made inside torch.distributions are not counted as jumps (constraint checks, formula
# branches: storch.estimators.watch._threshold_watch), these are: Categorical.log_prob(value) does value.long(),
# which reads a relaxed one-hot vector as K indices (found by porting: |z| 161 with REBAR).
INDEXING: frozenset = frozenset(f for f in JUMPS if getattr(f, "__name__", "") in (
    "argmax", "argmin", "argsort", "bucketize", "searchsorted", "long", "int", "short", "char", "byte"))

# max with a dim returns indices beside its (continuous) values, as min, median, mode, kthvalue, topk, sort,
# cummax and cummin do: they are watched too. A jump_free estimator's watch records them only where
# torch.distributions is known to use the indices (OneHotCategorical.log_prob's value.max(-1)[1], an argmax of a
# relaxed simplex point); a pathwise node's watch marks their indices (storch.plates.integer_reads), not their
# values. Watching costs these functions one check of their operands, as for JUMPS.
_NN = getattr(torch._C, "_nn")  # (the native functions behind torch.nn.functional: max_pool2d_with_indices)
INDEX_VALUES: frozenset = frozenset(
    f for n in ("max", "min", "median", "nanmedian", "mode", "kthvalue", "topk", "sort", "cummax", "cummin")
    for f in (getattr(torch, n, None), getattr(_T, n, None)) if f is not None) | frozenset(
    # the max poolings, which return (values, indices) (found by review): F.max_pool2d(..., return_indices=True)
    # calls F.max_pool2d_with_indices, which calls torch._C._nn.max_pool2d_with_indices; the adaptive and
    # fractional ones call torch.adaptive_max_pool1d, torch._C._nn.adaptive_max_pool2d, ...
    f for n in ("max_pool1d", "max_pool2d", "max_pool3d", "adaptive_max_pool1d", "adaptive_max_pool2d",
                "adaptive_max_pool3d", "fractional_max_pool2d", "fractional_max_pool3d")
    for f in (getattr(torch.nn.functional, n + "_with_indices", None), getattr(torch, n + "_with_indices", None),
              getattr(_NN, n + "_with_indices", None),
              getattr(torch, n, None) if n.startswith("adaptive") else None,
              getattr(_NN, n, None) if not n.startswith("max") else None) if f is not None)

# The functions whose result is (or holds) an integer value read from a floating-point operand: INDEXING,
# INDEX_VALUES' indices (max / topk / sort, the max poolings), COUNTS, and Tensor.to / Tensor.type to an integer dtype
# (torch.long, torch.LongTensor, "torch.LongTensor"). A pathwise node's watch marks that value
# (storch.plates.integer_reads, storch.estimators.watch._compare_watch): a cost computed from it is refused.
# The functions of JUMPS whose result is a count or an integer read from a floating-point operand: histc's counts (a
# floating-point tensor), count_nonzero, frexp's exponent (its mantissa is in the autograd graph: FrexpBackward0).
COUNTS: frozenset = frozenset(f for f in JUMPS if getattr(f, "__name__", "") in ("histc", "count_nonzero", "frexp"))

# The finiteness tests of JUMPS: isfinite / isnan / isinf / isposinf / isneginf. On an operand whose entries are all
# finite their result is constant (all True, or all False), so there they are no jump: the watches
# (storch.estimators.watch.finite_test) do not record them, and a NaN guard, torch.where(torch.isfinite(c), c, 0),
# is accepted (refused by a first version: found by review). Where the operand is not finite somewhere in the step
# (isfinite(log(z - 0.5)) is z > 0.5) they are thresholds, recorded as `x < 0` is.
FINITENESS_TESTS: frozenset = frozenset(f for f in JUMPS if getattr(f, "__name__", "") in (
    "isfinite", "isnan", "isinf", "isposinf", "isneginf"))

_HISTC = frozenset(f for f in COUNTS if getattr(f, "__name__", "") == "histc")

INTEGER_SOURCES: frozenset = INDEXING | INDEX_VALUES | CASTS | COUNTS


def _mark_integers(func, out, record) -> None:
    """Mark the integer part of ``out`` (a function of :data:`INTEGER_SOURCES`'s result) with ``record``: the
    indices of a (values, indices) result, histc's counts, or an integer (not bool) result (of a tuple: frexp's
    exponent)."""
    if func in INDEX_VALUES:
        if isinstance(out, tuple) and len(out) == 2:
            mark(out[1], record)
    elif func in _HISTC and isinstance(out, _T):
        mark(out, record)  # (counts in a floating-point tensor)
    elif isinstance(out, tuple):  # (frexp: the exponent, an integer, beside the mantissa)
        for o in out:
            _mark_integers(func, o, record)
    elif isinstance(out, _T) and not out.is_floating_point() and not out.is_complex() and out.dtype is not torch.bool:
        mark(out, record)


def _watched(impl):
    """``impl`` of a function of :data:`JUMPS`, which first reports its plate operands to their plates' watches:
    ``watch(func, raw, None, caller)`` for one whose autograd graph can be walked (it requires grad, grad enabled),
    else ``watch(func, raw, plates, caller)`` with its plates (a detached value, one made under
    ``torch.no_grad()``: no graph says what it was computed from; found by review: ``torch.where(x.detach() > 0,
    x, 0)`` was not seen). ``caller`` (a :class:`Caller`, one per call) says whether torch.distributions made it."""
    def run(func, args, kwargs):
        grad = _grad_enabled()
        caller = None
        record = None  # (a watch's mark for an integer result: storch.plates.integer_reads)
        # (positional operands directly: these functions take no tensor lists; every argument-validating
        # Distribution compares its parameters, logits == logits, so this runs in most steps)
        for a in (_operands(args, kwargs) if kwargs else args):
            if type(a) is _PT:
                raw = a._raw
                plates = a._plates
                graph = None if grad and raw.requires_grad else plates
                for p in plates:
                    lin = p.lineage
                    if lin is not None and lin.watch is not None:
                        if caller is None:
                            caller = Caller()
                        found = lin.watch(func, raw, graph, caller)
                        if found is not None and record is None:
                            record = found
        if pointwise and not kwargs and len(args) == 1 and record is None:
            # (a cast of one plate tensor, `s.long()` of a sampled state: the dispatcher's own short path for one
            # operand, as broadcast's one-operand branch computes it; a marked integer result takes impl below)
            x = args[0]
            if type(x) is _PT:
                return wrap_same(func(x._raw), x._plates)
        if pointwise and not kwargs and len(args) == 2:
            # (torch.distributions' argument validation, `value == value`, and a user's `z > 0.5`: the
            # dispatcher's own short path for two operands, as broadcast's first lines compute it)
            x, y = args
            if type(x) is _PT:
                ty = type(y)
                if ty is float or ty is int:
                    out = func(x._raw, y)
                    return _new(out, x._plates) if type(out) is _T else wrap_same(out, x._plates)
                if ty is _PT and y._plates is x._plates and y._raw.dim() == x._raw.dim():
                    return _new(func(x._raw, y._raw), x._plates)
        out = impl(func, args, kwargs)
        if record is not None:
            _mark_integers(func, out, record)
        return out
    pointwise = impl is broadcast
    return run


_UNSET = object()


class Caller:
    """The code of the nearest caller outside storch of one watched call where it is ``torch.distributions``'
    (else ``None``), found by :func:`distributions_caller` at most once however many watches ask: the operand of
    a comparison carries the plates of every node upstream of it, and each pathwise node's watch asked (M nodes
    in a chain: ~M² walks of the frames a step, half the step's time at M 50, and most of them for
    torch.distributions' own argument validation). Called from a watch: ``caller()``."""

    __slots__ = ("code",)

    def __init__(self) -> None:
        self.code = _UNSET

    def __call__(self):
        code = self.code
        if code is _UNSET:
            code = self.code = distributions_caller(sys._getframe(2))  # (the watch's caller: _watched's run)
        return code


def distributions_caller(frame):
    """The code of the first frame from ``frame`` outward that is not storch's if it is ``torch.distributions``'
    (its module's name), else ``None`` (also past 16 frames of storch). The comparisons torch.distributions makes
    are a constraint's ``check`` (argument validation), and internal ones, which select between formulas of one
    smooth function or guard a boundary (``kl_divergence``'s ``q.probs == 0``, ContinuousBernoulli's Taylor branch
    near 1/2, VonMises' Bessel approximation, Geometric's ``probs == 1``), not a jump of the cost (found by review:
    REBAR's analytic KL of a sigmoid belief net was refused): the watches of storch.estimators.watch skip them. A
    user's own comparison in the step is still seen."""
    for _ in range(16):
        if frame is None:
            return None
        name = frame.f_globals.get("__name__", "")
        if not name.startswith("storch."):
            return frame.f_code if name.startswith("torch.distributions") else None
        frame = frame.f_back
    return None


# F.gumbel_softmax(x, hard=True) of a value a relaxed or reparameterised sample reaches: its forward value is a one-hot
# argmax (a jump of x) and its gradient the soft one's (straight-through), handled as one function by the plate rules,
# so the argmax inside it was not seen (REBAR / RELAX accepted it at order 1; review r-nineteen): watched as the
# functions of JUMPS are where hard=True
_GUMBEL_SOFTMAX = torch.nn.functional.gumbel_softmax


def _watched_hard(impl):
    """``impl`` of ``F.gumbel_softmax``: watched as :func:`_watched` where ``hard=True``, else as it is."""
    watched = _watched(impl)

    def run(func, args, kwargs):
        hard = kwargs.get("hard", args[2] if len(args) > 2 else False)
        return (watched if hard else impl)(func, args, kwargs)
    return run


def _watched_cast(impl):
    """``impl`` of a function of :data:`CASTS`: watched as :func:`_watched` where it casts to a bool or integer
    dtype (:func:`casts_to_jump`), else as it is."""
    watched = _watched(impl)

    def run(func, args, kwargs):
        return (watched if casts_to_jump(args, kwargs) else impl)(func, args, kwargs)
    return run


def _writing(impl):
    """``impl`` of an in-place function, followed by what torch's views would do: the write reaches the
    tensor a copy was read from, and the copies read from the written tensor (``kit.write_through``)."""
    def run(func, args, kwargs):
        out = impl(func, args, kwargs)
        if args and type(args[0]) is _PT:
            write_through(args[0])
        return out
    return run


_grad_enabled = torch.is_grad_enabled
_fw_grad_enabled = torch._C._is_fwd_grad_enabled


def _check_custom_function(func, args, kwargs) -> None:
    """Refuse a plate call in the forward of a custom ``torch.autograd.Function`` that reaches tensors that need grad.

    ``MyFn.apply(x)`` does not go through ``__torch_function__``: torch runs the forward on the plate
    tensors with autograd off (grad mode and forward-mode AD both disabled, which is how this is told
    from ``torch.no_grad()``), and it records the Function's backward on the wrappers, which storch does
    not read. The result would be cut off from the gradient without a word (reentrant checkpointing is
    such a Function). The signal is an operand that needs grad, a plate tensor or a plain one (a module's
    parameter: ``checkpoint(enc, x, use_reentrant=True)`` on data that needs no grad reaches
    ``F.linear(x, enc.weight)``, found by porting); nothing computed inside the forward needs grad, so only
    what comes from outside it does. Inside ``torch.inference_mode()`` nothing needs grad. Under an outer
    ``torch.no_grad()`` nothing is lost either, but it is refused too: the grad mode outside ``apply`` is
    recorded nowhere the forward can read (the ctx differs, by empty ``next_functions``, only where an input
    needs grad, not for ``checkpoint(enc, x, use_reentrant=True)`` on data), so the messages say to call the
    function directly there.
    """
    if torch.is_inference_mode_enabled():
        return
    for a in _operands(args, kwargs or {}):
        if type(a) is _PT:
            if a._raw.requires_grad:
                break
        elif isinstance(a, _T) and a.requires_grad:
            break
    else:
        return
    which = _innermost_function()
    if which == "ddp":
        raise PlateError(
            "a DistributedDataParallel module returned plate tensors (storch's samples, or values computed from "
            "them) with find_unused_parameters=True or static_graph=True: DDP then passes its outputs through "
            "its own torch.autograd.Function (_DDPSink), whose backward storch cannot follow on plate tensors, "
            "so their gradient would be lost. Wrap the whole model in DDP instead (the estimators as its "
            "submodules) and end its forward with `return storch.surrogate_loss()` (a plain tensor), then call "
            "storch.backward(); see docs/reliability.md and examples/distributed/train_ddp.py. A DDP-wrapped "
            "submodule that returns plate tensors works with the default DDP arguments only")
    lost = ("torch runs it with autograd off and records its backward on the plate tensors' wrappers, which "
            "storch does not follow, so the gradient of the parameters and inputs it reaches would be lost without "
            "a word")
    if which == "checkpoint":
        raise PlateError(
            "torch.utils.checkpoint.checkpoint(..., use_reentrant=True) was called on plate tensors (storch's "
            "samples, data from storch.denote_independent, or values computed from them), and the checkpointed "
            "function reaches tensors that need grad (a module's parameters, or the plate tensors themselves); "
            "use_reentrant=True is torch's default where use_reentrant is not passed (in checkpoint_sequential "
            f"too). A reentrant checkpoint is a custom torch.autograd.Function: {lost}. Use "
            "torch.utils.checkpoint.checkpoint(..., use_reentrant=False), which gives exact gradients on plate "
            "tensors; checkpoint the networks, not the sampling (keep estimator calls outside the checkpointed "
            "function). Under torch.no_grad(), where nothing is recomputed, call the function without checkpoint")
    if which == "hook":
        raise PlateError(
            f"a module with {_backward_hooks_used()} "
            "was called on plate tensors (storch's samples, data from storch.denote_independent, or values "
            "computed from them) that need grad, or returned them. torch wraps such a module's inputs and outputs "
            f"in a custom torch.autograd.Function (BackwardHookFunction): {lost}. Use a forward hook "
            "(register_forward_hook), or tensor.register_hook on the module's output (a plate tensor's hook "
            "receives its gradient as a plate tensor: docs/plates.md)")
    raise PlateError(
        f"{describe(func)} was called on plate tensors inside the forward of a custom torch.autograd.Function "
        "(MyFn.apply(x): autograd disabled and forward-mode AD disabled) with operands that need grad: "
        f"{lost}. Write the function with torch operations (autograd differentiates them) instead of a custom "
        "Function; for checkpointing use torch.utils.checkpoint.checkpoint(..., use_reentrant=False); instead of a "
        "module's full backward hook use a forward hook or tensor.register_hook. Under torch.no_grad(), where "
        "nothing is lost, call the function directly (what its forward computes, without MyFn.apply): inside the "
        "forward, torch.no_grad() outside cannot be told from the autograd that the Function turns off")


def _backward_hooks_used() -> str:
    """Which of torch's full backward hooks the module being called has (the ``full_backward_hooks`` and
    ``backward_pre_hooks`` of ``Module._call_impl``'s frame, or of the ``inner`` it defines: the module's own
    and torch's global ones), in the words of the message (error path only: a walk up the stack)."""
    where = getattr(sys.modules.get("torch.nn.modules.module"), "__file__", None)
    frame = sys._getframe(1)
    while frame is not None and not (frame.f_code.co_filename == where and "backward_pre_hooks" in frame.f_locals):
        frame = frame.f_back
    full = pre = False
    if frame is not None:
        full = bool(frame.f_locals.get("full_backward_hooks"))
        pre = bool(frame.f_locals.get("backward_pre_hooks"))
    if pre and not full:
        return "a full backward pre-hook (register_full_backward_pre_hook, or a library that registers one)"
    if pre:
        return ("a full backward hook and a full backward pre-hook (register_full_backward_hook and "
                "register_full_backward_pre_hook, or a library that registers them)")
    return "a full backward hook (register_full_backward_hook, or a library that registers one)"


def _code_of(module: str, owner: str, attr: str = "forward"):
    """The code object of ``module.owner.attr`` where the module is imported (error path only), else None."""
    f = getattr(getattr(sys.modules.get(module), owner, None), attr, None)
    return getattr(f, "__code__", None)


def _innermost_function() -> Optional[str]:
    """Which of torch's own custom Functions runs the innermost forward among the dispatcher's callers: "ddp"
    (DDP's _DDPSink), "checkpoint" (reentrant checkpointing) or "hook" (a module's full backward hook), else
    None (a user's Function). Error path only: a walk up the stack."""
    codes = {
        _code_of("torch.nn.parallel.distributed", "_DDPSink"): "ddp",
        _code_of("torch.utils.checkpoint", "CheckpointFunction"): "checkpoint",
        _code_of("torch.nn.modules._functions", "BackwardHookFunction"): "hook",
    }
    codes.pop(None, None)
    frame = sys._getframe(1)
    while frame is not None:
        which = codes.get(frame.f_code)
        if which is not None:
            return which
        frame = frame.f_back
    return None


def _with_out(func, args, kwargs):
    """``func(..., out=...)`` with plate tensors among the arguments (or as ``out``).

    No rule reads ``out``: passed on, the raw call would write (and resize) the buffer with the raw
    plate storage, and rules that compute per plate entry (vmap, index_select's gather) return the
    last entry's value for every entry. So the call runs without ``out`` and its result is written
    into ``out`` only where that is exactly torch's per-sample behaviour: every ``out`` is a plate
    tensor with the result's per-sample shape and dtype and (at least) the result's plates (autograd
    follows the copy, where torch refuses out= on operands that need grad). A plain buffer cannot
    hold a value per plate entry: refused.
    """
    out = kwargs["out"]
    rest = {k: v for k, v in kwargs.items() if k != "out"}
    name = describe(func)
    several = isinstance(out, (tuple, list))
    outs = tuple(out) if several else (out,)
    if not all(type(o) is _PT for o in outs):
        raise PlateError(
            f"{name} was called with out= a plain tensor and plate tensors among its arguments: its result holds "
            "one value per plate entry, which a plain out= buffer cannot hold (torch would overwrite or resize "
            f"it with storch's raw plate storage). Drop out= and assign the result: `buf = {name}(...)` (a "
            "buffer that is a plate tensor of the result's per-sample shape, dtype and plates is written as asked)")
    res = func(*args, **rest)  # re-enters the dispatcher (plain torch where only out= is a plate tensor)
    results = tuple(res) if several and isinstance(res, tuple) else (res,)
    if len(results) != len(outs) or not all(isinstance(r, _T) for r in results):
        raise PlateError(f"{name}(..., out=...) on plate tensors: out= holds {len(outs)} tensor(s) where the "
                         "function returns a different structure; drop out= and assign the result")
    srcs = []  # every out checked before any is written
    for o, r in zip(outs, results):
        rp = r._plates if type(r) is _PT else ()
        if tuple(r.shape) != tuple(o.shape) or r.dtype != o.dtype:
            raise PlateError(
                f"{name}(..., out=...) on plate tensors: the result has per-sample shape {tuple(r.shape)} and dtype "
                f"{r.dtype}, out= has {tuple(o.shape)} and {o.dtype}; storch writes out= only where they are equal "
                f"(it does not resize or cast a plate tensor). Drop out= and assign the result: `buf = {name}(...)`")
        src = r  # a plain result (only out= is a plate tensor): every entry gets it
        if rp:
            fits = len(union_plates((o._plates, rp))) == len(o._plates)  # rp among out's plates
            if fits:
                src = align(r._raw, rp, o._plates, o.dim())
                fits = all(s == 1 or s == d for s, d in zip(src.shape, o._raw.shape))  # not a size-1 plate dim
            if not fits:
                raise PlateError(
                    f"{name}(..., out=...) would write values that vary over plates {_names(rp)} into a plate "
                    f"tensor with plates {_names(o._plates)} (or one that is shared along them); drop out= and "
                    f"assign the result: `buf = {name}(...)`")
        srcs.append(src)
    for o, src in zip(outs, srcs):
        o._raw.copy_(src)  # the wrapper describes its raw tensor, now written
    if not several:
        return outs[0]
    return type(res)(outs) if hasattr(type(res), "n_fields") else type(out)(outs)


@mark_eager_only
def _torch_function(cls, func, types, args=(), kwargs=None):
    # PlateTensor.__torch_function__, the dispatcher. The implementation of each function is
    # decided once (storch.plates.treatments) and cached; the most common case (one plate tensor
    # through an elementwise function: sigmoid, tanh, exp, ...) runs inline.
    prior = set_eval_frame(None)
    if prior is not None:  # called from code compiled by torch.compile: run eagerly (storch.runtime.eager)
        try:
            return _torch_function(cls, func, types, args, kwargs)
        finally:
            set_eval_frame(prior)
    if MARKS and not getattr(_INNER, "on", False):
        # an integer value read from a pathwise sample is live: results computed from it are marked as it is
        return spread(_torch_function, cls, func, types, args, kwargs)
    if not _grad_enabled():
        if not _fw_grad_enabled():
            _check_custom_function(func, args, kwargs)
        check_no_grad_call(func, args, kwargs)  # a torch.distributions .sample() of learned parameters (draws)
    impl = _IMPL.get(func)
    if impl is None:
        impl = _implementation(func)
    try:
        # the only cost on the common path (calls without keywords skip it); out=None is no buffer
        # (Python functions such as F.normalize pass it on to torch.overrides)
        if kwargs and kwargs.get("out") is not None:
            return _with_out(func, args, kwargs)
        if impl is broadcast and not kwargs:  # (pointwise and not in place: those are _writing(broadcast_inplace))
            n = len(args)
            x = args[0] if n else None
            if type(x) is _PT:
                if n == 1:
                    out = func(x._raw)
                    if type(out) is _T:
                        return _new(out, x._plates)
                    return wrap(out, x._plates)
                if n == 2:
                    # a plate tensor and a Python number (z - 0.45, z ** 2, 2.0 * z through __rmul__), or two of
                    # the very same plates and raw rank: what broadcast's first lines do, without its calls
                    y = args[1]
                    ty = type(y)
                    if ty is float or ty is int:
                        out = func(x._raw, y)
                        return _new(out, x._plates) if type(out) is _T else wrap_same(out, x._plates)
                    if ty is _PT and y._plates is x._plates and y._raw.dim() == x._raw.dim():
                        return _new(func(x._raw, y._raw), x._plates)
        return impl(func, args, kwargs or {})
    except PlateError as e:
        # storch's own refusal (an in-place write into a plain tensor, ...) of a call whose index is a
        # floating-point sample: that is the first thing to fix, so the hint comes with it (once)
        if _float_index(func, args, kwargs or {}) and _FLOAT_INDEX_HINT not in str(e):
            raise plate_error_from(e, f"{e}{_FLOAT_INDEX_HINT}") from e
        raise
    except OrderError:  # storch's own explanation (a thresholded relaxed sample in a parameter: rules.metadata)
        raise
    except (RuntimeError, ValueError, IndexError, TypeError) as e:
        raise user_error(func, args, kwargs, e) from e


# bound here, once, rather than looked up on every torch call (our own class: nothing in torch
# is patched); eager only: under torch.compile each plate call is a graph break that runs eagerly
install_dispatcher(_torch_function)
