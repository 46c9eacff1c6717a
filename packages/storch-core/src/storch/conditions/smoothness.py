"""Smoothness of a pathwise term: the operations whose derivatives jump (ReLU, abs, clamp, max, sort, ...).

A pathwise (relaxed, reparameterised) term E[∇ⁿc(z)] equals ∇ⁿE[c(z)] only when c's derivatives of order
< n are continuous in the sample z. Autograd differentiates a kink as if its next derivative had no delta,
so from order 2 (order 1 for a jump) such a term is silently biased. :func:`require_smooth` walks the
autograd graph from a cost down to the samples and refuses (``storch.OrderError``) where an operation
of the table :func:`nonsmooth_operations` lies on a path between them. Public as
``storch.extending.require_smooth`` and ``storch.extending.nonsmooth_operations``; REBAR, RELAX and LAX call
it at order >= 2 at every surrogate, and at order 1 (for a jump) at the first step of each plate and cost name.
"""

from __future__ import annotations

import contextlib
import math
import threading
from types import MappingProxyType
from typing import Callable, Iterator, Mapping, Optional, Sequence, Union

import torch

from ..errors import OrderError

__all__ = ["nonsmooth_operations", "require_smooth"]

_inspecting = threading.local()


def inspecting_saved() -> bool:
    """Whether this thread is reading an autograd node's saved tensors to inspect them (their dtype,
    shape or values, in :func:`_order_of`), not to differentiate. storch.compile's saved-tensor hook
    refuses a backward pass inside a traced step, and a read of ``node._saved_self`` unpacks the same
    way: it asks this to let storch's own reads through."""
    return getattr(_inspecting, "active", False)


@contextlib.contextmanager
def saved_values_unread() -> Iterator[None]:
    """While storch.compile traces a step: the table's entries read saved tensors' metadata (dtype, shape)
    only. A verdict from saved values (``hypot`` and ``atan2`` with a constant off the path) would be fixed
    into the program for every later call, and the operations on the values recorded in it (a saved
    tensor unpacked in a trace is a constant of the first call), so those entries give their
    conservative verdict, as where the values cannot be read (under a torch.func transform)."""
    outer = getattr(_inspecting, "metadata_only", False)
    _inspecting.metadata_only = True
    try:
        yield
    finally:
        _inspecting.metadata_only = outer


def _values_readable() -> bool:
    return not getattr(_inspecting, "metadata_only", False)


def _order_of(k: Callable, fn, reach: tuple) -> Optional[int]:
    """``k(fn, reach)``, an entry of the table that reads ``fn``'s saved attributes, marked as an inspection
    (:func:`inspecting_saved`)."""
    outer = inspecting_saved()
    _inspecting.active = True
    try:
        return k(fn, reach)
    finally:
        _inspecting.active = outer


def _clamp_order(node, reach=()) -> Optional[int]:
    """A clamp whose bounds are numerical guards is not counted: a probability clamped to [eps, 1 - eps] of its
    dtype (torch.distributions' ``clamp_probs`` for a Bernoulli or Categorical given by ``probs``, the
    relaxations' conditional noise), a logit clamped at magnitude >= -3 log eps (47.7 in float32: a
    probability of e^-47.7; the relaxations' finite logits). They are active only where a probability is
    within eps of 0 or 1. Any other clamp (``clamp(min=0)``, ``clamp(-1, 1)``) is a kink: 1."""
    lo, hi = getattr(node, "_saved_min", None), getattr(node, "_saved_max", None)
    try:
        dtype = node._saved_self.dtype
    except (AttributeError, RuntimeError):
        return 1
    if not dtype.is_floating_point:
        return 1
    eps = torch.finfo(dtype).eps
    far = -3.0 * math.log(eps) * (1 - 1e-6)

    def guard(bound, probability: float) -> bool:
        return bound is None or bound == probability or (isinstance(bound, float) and abs(bound) >= far)

    return None if (lo is not None or hi is not None) and guard(lo, eps) and guard(hi, 1 - eps) else 1


def _elu_order(node, reach=()) -> int:
    """ELU's first derivative is continuous at 0 when α · input_scale = 1 (ELU with α = 1, CELU): 2; else
    (SELU, ELU with another α) it is a kink: 1."""
    alpha, input_scale = getattr(node, "_saved_alpha", None), getattr(node, "_saved_input_scale", None)
    return 2 if isinstance(alpha, float) and alpha * float(input_scale or 1) == 1.0 else 1


def _grid_order(node, reach=()) -> Optional[int]:
    """grid_sample is linear in the image and piecewise in the sampling locations (the grid): counted only
    when the grid is on the path. Bilinear interpolation has kinks at the pixel centres (1), nearest
    jumps (0), bicubic (Keys' cubic convolution) has a continuous first derivative (2) unless the
    border or reflection padding folds the locations (1)."""
    if len(reach) > 1 and not reach[1]:
        return None
    mode = getattr(node, "_saved_interpolation_mode", 0)
    if mode == 1:
        return 0
    if mode == 2:
        return 2 if getattr(node, "_saved_padding_mode", 0) == 0 else 1
    return 1


def _rounding_order(node, reach=()) -> Optional[int]:
    """Division (DivBackward2/3, the same autograd node as plain division): with ``rounding_mode`` "floor" or
    "trunc" (``torch.div(x, d, rounding_mode=...)``) the value jumps and autograd reports 0: a jump (0);
    plain (true) division is smooth where finite."""
    return None if getattr(node, "_saved_rounding_mode", None) is None else 0


def _lp_order(p, m: Optional[int]) -> Optional[int]:
    """The order of the first discontinuous derivative of the p-norm of a vector of ``m`` elements (``None``:
    unknown, counted as 1). p = 0 (the number of non-zero entries) jumps where an entry is 0: 0. p = ±inf
    (max |x_i|), p <= 1 (|x_i|^p, at x_i = 0) and m = 1 (the norm of one element is |x|): a kink, 1. Otherwise
    |x_i|^p has a discontinuous derivative of order ceil(p) at x_i = 0 unless p is an even integer, and the
    norm is not differentiable at the zero vector: its n-th derivative ~ r^(1-n) is integrable there, with no
    delta, up to n = m, so a continuous sample meets it as a point of measure zero until order m. That holds
    where the vector's entries vary independently near 0 (a full-rank map of the samples); a vector confined
    to a line through 0 (||z · v|| for a scalar z) is a kink the table cannot tell from its node."""
    try:
        p = float(p)
    except (TypeError, ValueError):
        return 1
    if p == 0:
        return 0
    if math.isinf(p) or p <= 1 or m is None or m <= 1:
        return 1
    k = m
    if not (p == int(p) and int(p) % 2 == 0):
        k = min(k, math.ceil(p))
    return k


def _numel_reduced(node, saved: str = "_saved_self") -> Optional[int]:
    """The number of elements one output of a norm reduces: the product of the saved input's sizes over
    ``_saved_dim`` (all of them where it is None or empty). None where the input is not readable."""
    try:
        shape = tuple(getattr(node, saved).shape)
    except (AttributeError, RuntimeError):
        return None
    dims = getattr(node, "_saved_dim", None)
    if isinstance(dims, int):
        dims = (dims,)
    if not dims:
        return math.prod(shape)
    if not shape:
        return 1
    # a negative dim is saved as an unsigned 64-bit integer (dim=-1: 2**64 - 1)
    return math.prod(shape[(d - 2 ** 64 if d >= 2 ** 63 else d) % len(shape)] for d in dims)


def _norm_order(node, reach=()) -> Optional[int]:
    """``torch.linalg.vector_norm`` / ``linalg.norm`` of a vector, ``torch.norm``, ``Tensor.norm``,
    ``F.pairwise_distance`` (LinalgVectorNormBackward0, NormBackward0-3): by the saved ord / p and the number
    of elements reduced, see :func:`_lp_order` (ord 1 and inf: a kink; ord 2: a kink for one element)."""
    p = getattr(node, "_saved_ord", None)
    if p is None:
        p = getattr(node, "_saved_p", 2.0)
    return _lp_order(2.0 if p is None else p, _numel_reduced(node))


def _dist_order(node, reach=()) -> Optional[int]:
    """``torch.dist(x, y, p)``: the p-norm of x - y over all its (broadcast) elements."""
    try:
        m = math.prod(torch.broadcast_shapes(node._saved_self.shape, node._saved_other.shape))
    except (AttributeError, RuntimeError):
        m = None
    return _lp_order(getattr(node, "_saved_p", 2.0), m)


def _pdist_order(node, reach=()) -> Optional[int]:
    """``F.pdist`` (rows of an (N, M) input) and ``torch.cdist`` (the last dimension): p-norms of M elements."""
    try:
        m = int((node._saved_self if hasattr(node, "_saved_self") else node._saved_x1).shape[-1])
    except (AttributeError, RuntimeError, IndexError):
        m = None
    return _lp_order(getattr(node, "_saved_p", 2.0), m)


def _copysign_order(node, reach=()) -> Optional[int]:
    """``copysign(a, b)`` = |a| · sign(b): a kink in a (1), a jump in b (0; autograd reports 0 for it)."""
    return 0 if len(reach) > 1 and reach[1] else 1


def _constant_holds(node, name: str, test) -> bool:
    """Whether the saved tensor ``name`` of ``node`` (an argument off the path: a constant) passes ``test``
    at every entry; False where it cannot be read (under a torch.func transform: then the conservative verdict)."""
    if not _values_readable():
        return False
    try:
        return bool(test(getattr(node, name)).all())
    except (AttributeError, RuntimeError, TypeError):
        return False


def _hypot_order(node, reach=()) -> Optional[int]:
    """``hypot(a, b)``: the 2-norm of (a, b); with both on the path see :func:`_lp_order` for m = 2; with one
    of them off it, a constant c: sqrt(x² + c²) is smooth where c != 0 everywhere, and |x| where c = 0 (a
    kink, 1: ``hypot(x, 0)``)."""
    if len(reach) > 1 and reach[0] and reach[1]:
        return 2
    # autograd keeps no copy of the constant: c != 0 where the result exceeds |x| (x the argument on the path)
    on = "_saved_self" if reach and reach[0] else "_saved_other"
    if not _values_readable():
        return 1
    try:
        x, r = getattr(node, on), node._saved_result
        smooth = bool((r > x.abs()).all())
    except (AttributeError, RuntimeError, TypeError):
        smooth = False
    return None if smooth else 1


def _atan2_order(node, reach=()) -> Optional[int]:
    """``atan2(y, x)``: the angle of (x, y), which jumps by 2 pi across its branch cut (x < 0, y = 0) and is
    undefined at the origin: a jump (0) with both on the path. With x a constant off the path, atan2(y, c)
    is smooth in y where every c > 0 (it is atan(y / c)), a jump at y = 0 where some c <= 0; with y a
    constant c, atan2(c, x) is smooth in x where every c != 0 (the angle turns through pi / 2, not across the
    cut), a jump at x = 0 where some c = 0 (from 0 to pi)."""
    if len(reach) < 2 or (reach[0] and reach[1]):
        return 0
    if reach[0]:  # y on the path, x a constant
        return None if _constant_holds(node, "_saved_other", lambda c: c > 0) else 0
    return None if _constant_holds(node, "_saved_self", lambda c: c != 0) else 0


def _softplus_order(node, reach=()) -> Optional[int]:
    """``softplus(x, beta, threshold)`` returns x where beta · x > threshold: its value jumps there by
    log(1 + e^-threshold) / beta, its derivative by about e^-threshold. At torch's default threshold 20 that is
    2e-9, below float32's resolution: not counted; a lower threshold is a jump (0)."""
    t = getattr(node, "_saved_threshold", 20)
    return None if isinstance(t, (int, float)) and t >= 20 else 0


def _logit_order(node, reach=()) -> Optional[int]:
    """``logit(p, eps)`` clamps p to [eps, 1 - eps] (derivative 0 outside): a kink unless eps is None or the
    dtype's eps (a numerical guard, as for :func:`_clamp_order`)."""
    eps = getattr(node, "_saved_eps", None)
    if eps is None:
        return None
    try:
        guard = torch.finfo(node._saved_self.dtype).eps
    except (AttributeError, RuntimeError, TypeError):
        return 1
    return None if eps <= guard else 1


def _smooth_l1_order(node, reach=()) -> Optional[int]:
    """``smooth_l1_loss``: quadratic within beta, linear outside: C¹ (its second derivative jumps, 2) for
    beta > 0; beta = 0 is the L1 loss, a kink (1)."""
    beta = getattr(node, "_saved_beta", None)
    return 2 if isinstance(beta, (int, float)) and beta > 0 else 1


def _reduce_order(node, reach=()) -> Optional[int]:
    """``scatter_reduce`` / ``index_reduce`` / ``segment_reduce``: a max or min reduction selects by value (a
    kink, 1); sum, mean and prod are smooth."""
    return 1 if getattr(node, "_saved_reduce", None) in ("amax", "amin", "max", "min") else None


def _embedding_bag_order(node, reach=()) -> Optional[int]:
    """``F.embedding_bag`` with mode "max" (saved mode 2) selects by value in the weight: a kink (1)."""
    return 1 if reach and reach[0] and getattr(node, "_saved_mode", 2) == 2 else None


_NORMS = frozenset({"LinalgVectorNormBackward0", "NormBackward0", "NormBackward1", "NormBackward2",
                    "NormBackward3"})


def _clamp_min_order(node, reach=()) -> Optional[int]:
    """``clamp_min`` is a kink (1), except the guard of ``F.normalize`` (a norm clamped below at eps <= 1e-6, so
    as not to divide by 0): a norm is >= 0 and below eps only in a ball of radius eps about the zero vector,
    which the norm's own entry accounts for (:func:`_norm_order`)."""
    lo = getattr(node, "_saved_min", None)
    below = node.next_functions[0][0] if node.next_functions else None
    if isinstance(lo, (int, float)) and 0 <= lo <= 1e-6 and type(below).__name__ in _NORMS:
        return None
    return 1


# the table of nonsmooth_operations() (see there)
_NONSMOOTH: Mapping[str, Union[int, Callable[[object], Optional[int]]]] = MappingProxyType({
    # kinks (k = 1): activations
    "ReluBackward0": 1, "ThresholdBackward0": 0, "ThresholdBackward1": 0,  # F.threshold may jump
    "LeakyReluBackward0": 1, "LeakyReluBackward1": 1, "PreluKernelBackward0": 1,
    "RreluWithNoiseBackward0": 1, "RreluWithNoiseBackward1": 1, "RreluWithNoiseFunctionalBackward0": 1,
    "HardtanhBackward0": 1,  # hardtanh, relu6
    "HardswishBackward0": 1, "HardsigmoidBackward0": 1, "SoftshrinkBackward0": 1, "HardshrinkBackward0": 0,
    "EluBackward0": _elu_order, "EluBackward1": _elu_order, "CeluBackward0": 2, "CeluBackward1": 2,
    # kinks: clamp, abs, elementwise max/min
    "ClampBackward0": 1, "ClampBackward1": _clamp_order, "ClampMinBackward0": _clamp_min_order, "ClampMinBackward1": 1,
    "ClampMaxBackward0": 1, "ClampMaxBackward1": 1, "AbsBackward0": 1,
    "MaximumBackward0": 1, "MinimumBackward0": 1, "FmaxBackward0": 1, "FminBackward0": 1,
    # reductions and selections by value: which entry is taken changes with the values
    "MaxBackward0": 1, "MaxBackward1": 1, "MinBackward0": 1, "MinBackward1": 1, "AmaxBackward0": 1,
    "AminBackward0": 1, "AminmaxBackward0": 1, "SortBackward0": 1, "SortBackward1": 1, "TopkBackward0": 1,
    "KthvalueBackward0": 1, "MedianBackward0": 1, "MedianBackward1": 1, "NanmedianBackward0": 1,
    "NanmedianBackward1": 1, "ModeBackward0": 1, "CummaxBackward0": 1, "CumminBackward0": 1,
    "ScatterReduceBackward0": _reduce_order, "IndexReduceBackward0": _reduce_order,
    "SegmentReduceBackward0": _reduce_order, "EmbeddingBagBackward0": _embedding_bag_order,
    "MaxPool2DBackward0": 1, "MaxPool2DWithIndicesBackward0": 1, "MaxPool3DWithIndicesBackward0": 1,
    "AdaptiveMaxPool2DBackward0": 1, "AdaptiveMaxPool3DBackward0": 1, "FractionalMaxPool2DBackward0": 1,
    "FractionalMaxPool3DBackward0": 1,
    # interpolation at sampled locations (a glimpse, a spatial transformer): see _grid_order
    "GridSampler2DBackward0": _grid_order, "GridSampler3DBackward0": _grid_order,
    # norms and distances (ord 1, inf: kinks; ord 2: a kink of one element) and what is built on them
    "LinalgVectorNormBackward0": _norm_order, "NormBackward0": _norm_order, "NormBackward1": _norm_order,
    "NormBackward2": _norm_order, "NormBackward3": _norm_order, "DistBackward0": _dist_order,
    "PdistBackward0": _pdist_order, "CdistBackward0": _pdist_order, "RenormBackward0": 1,  # rescales above maxnorm
    "HypotBackward0": _hypot_order, "CopysignBackward0": _copysign_order, "CopysignBackward1": 1,
    "SoftplusBackward0": _softplus_order, "LogitBackward0": _logit_order,
    # losses with kinks
    "SmoothL1LossBackward0": _smooth_l1_order, "HuberLossBackward0": 2, "MultiMarginLossBackward0": 1,
    "MultilabelMarginLossBackward0": 1,
    # jumps (k = 0)
    "SignBackward0": 0, "SgnBackward0": 0, "RoundBackward0": 0, "RoundBackward1": 0, "FloorBackward0": 0,
    "CeilBackward0": 0, "TruncBackward0": 0, "FracBackward0": 0, "FrexpBackward0": 0, "FmodBackward0": 0, "FmodBackward1": 0,
    "RemainderBackward0": 0, "RemainderBackward1": 0, "DivBackward2": _rounding_order, "DivBackward3": _rounding_order,
    "AngleBackward0": 0,  # of a real x: 0 or pi; of a complex one: its branch cut
    "Atan2Backward0": _atan2_order,  # its branch cut: a jump of 2 pi where x < 0, y = 0
    # fake quantization rounds; its gradient is the straight-through estimator's
    "FakeQuantizePerTensorAffineCachemaskBackward0": 0, "FakeQuantizePerChannelAffineCachemaskBackward0": 0,
    "FakeQuantizePerTensorAffineCachemaskTensorQparamsBackward0": 0,
    "FakeQuantizeLearnablePerTensorAffineBackward0": 0, "FakeQuantizeLearnablePerChannelAffineBackward0": 0,
})


def nonsmooth_operations() -> dict[str, Union[int, Callable[[object], Optional[int]]]]:
    """The autograd operations :func:`require_smooth` looks for: ``type(tensor.grad_fn).__name__`` -> the
    order k of the operation's first discontinuous derivative (0: the value jumps, as ``sign``; 1: a kink,
    as ReLU's), or a function of the autograd node and of which of its inputs lie on the path giving k
    (``None``: not counted; clamps to the numerical guards [eps, 1 - eps] of probabilities, ELU whose
    first derivative is continuous, ``grid_sample`` whose grid is not on the path: it is linear in the image).
    Differentiating n > k times through one of them loses the delta of its (k+1)-th derivative.

    ``torch.where`` is not listed: its condition is not in the autograd graph, so a selection by data
    (or by a downstream node's discrete sample, which that node's estimator accounts for) cannot be
    told from one by the values differentiated (for a node of a ``requires_rsample`` or ``pathwise`` estimator the plate
    dispatcher sees a comparison of a value its sample reaches instead: ``Node.compared``, refused by
    ``storch.surrogate_loss`` from order 2). Decompositions show as their parts (``softsign`` and
    ``l1_loss`` as ``AbsBackward0``, ``hinge_embedding_loss`` as ``ClampMinBackward0``);
    ``smooth_l1_loss`` and ``huber_loss`` are C¹ (2; ``smooth_l1_loss`` with beta = 0 is l1: 1). Norms read their
    saved ord / p and the number of elements reduced (ord 1, inf: 1; a 2-norm of m elements: m, see
    ``_lp_order``); division reads its rounding mode (floor, trunc: 0); frexp's mantissa jumps at the powers of 2
    (0). Not listed: ``floor_divide`` (autograd raises for it; on a plate tensor storch computes it as the division
    with rounding mode floor, ``storch.plates.dispatch.FLOOR_DIVISIONS``), the SVD and eigendecompositions (their spectral functions are smooth; the nuclear norm of a
    square matrix, a sum of singular values, has a kink where it is singular and is not detected).
    A copy: changing it changes nothing.
    """
    return dict(_NONSMOOTH)


def _nonsmooth_on_path(output: torch.Tensor, inputs: Sequence[torch.Tensor], order: int,
                       log_of_abs: bool = False, memo: Optional["PathMemo"] = None,
                       any_leaf: bool = False, table: Optional[Mapping] = None) -> dict[str, int]:
    """{name: k} of the operations of nonsmooth_operations() with k < ``order`` that lie on a path from one of
    ``inputs`` to ``output`` in the autograd graph: one memoised walk from ``output.grad_fn`` down to
    the inputs (not below them: what made the inputs is not on such a path).

    ``log_of_abs``: an ``abs`` whose every consumer in the walked graph is a ``log`` is not counted:
    log|u| is smooth wherever it is finite (its kink at u = 0 is where it is -inf). The log-densities of
    torch's transformed distributions hold one (log|scale|, log|exponent · y / x| in log|det J|).

    ``memo``: a :class:`PathMemo` for ``inputs`` and ``order`` shared by several walks (not with
    ``log_of_abs``): an autograd node already expanded by an earlier walk is not walked again.

    ``any_leaf``: every leaf that requires grad (its ``AccumulateGrad`` node) that the walk meets before an
    input is an input too (a parameter that ``inputs`` missed: held where a distribution's attributes do not
    show it).

    ``table``: the ``{name: k}`` to look for on this walk instead of :func:`nonsmooth_operations` (not with
    ``memo``): the rsample walk's adds operations whose backward is correct up to order ``k`` only without being
    kinks (torch's implicit reparameterisation of the gamma family,
    :data:`storch.distributions.rsample_kinks.IMPLICIT_REPARAMETERISATION`)."""
    if memo is not None and not log_of_abs:
        return _walk_memo(output, memo)
    root = output.grad_fn
    if root is None:
        return {}
    targets = {t.grad_fn for t in inputs if t.grad_fn is not None}
    leaves = {id(t) for t in inputs if t.grad_fn is None and t.requires_grad}  # their AccumulateGrad nodes
    if not targets and not leaves and not any_leaf:
        return {}
    if table is None:
        table = _NONSMOOTH
    found: dict[str, int] = {}
    hits: list = []  # (autograd node, name, k), when log_of_abs: filtered by consumers at the end
    consumers: dict = {}  # autograd node -> names of the nodes that read it (log_of_abs only)
    reaches: dict = {}  # autograd node -> whether it reaches an input
    stack = [(root, False)]
    while stack:  # iterative post-order (graphs of long episodes are deeper than Python's recursion)
        fn, expanded = stack.pop()
        if expanded:
            reach = tuple(m is not None and reaches.get(m, False) for m, _ in fn.next_functions)
            r = any(reach)
            reaches[fn] = r
            if r:
                name = type(fn).__name__
                if log_of_abs:
                    for m, _ in fn.next_functions:
                        if m is not None:
                            consumers.setdefault(m, set()).add(name)
                k = table.get(name)
                if k is not None and not isinstance(k, int):
                    k = _order_of(k, fn, reach)
                if k is not None and k < order:
                    if log_of_abs:
                        hits.append((fn, name, k))
                    else:
                        found[name] = min(k, found.get(name, k))
            continue
        if fn in reaches:
            continue
        if fn in targets or (leaves and id(getattr(fn, "variable", None)) in leaves) or (
                any_leaf and type(fn).__name__ == "AccumulateGrad"):
            reaches[fn] = True
            continue
        stack.append((fn, True))
        stack.extend((m, False) for m, _ in fn.next_functions if m is not None and m not in reaches)
    for fn, name, k in hits:
        if name == "AbsBackward0" and consumers.get(fn, set()) == {"LogBackward0"}:
            continue  # log|u|: smooth where finite
        found[name] = min(k, found.get(name, k))
    return found


class PathMemo:
    """What :func:`_nonsmooth_on_path` learned about the autograd nodes below one set of ``inputs`` at one
    ``order``, kept across the walks from several outputs (the costs of a long episode, each step's
    log-probability of a downstream partition): each autograd node is expanded once per surrogate, so
    the walks of T costs over a graph of T steps cost O(T), not O(T²). ``below[fn]``: the non-smooth
    operations (name -> order of its first discontinuous derivative, those below ``order``) on paths
    from ``fn`` down to the inputs, ``None`` where no path reaches them."""

    __slots__ = ("targets", "leaves", "order", "below")

    def __init__(self, inputs: Sequence[torch.Tensor], order: int) -> None:
        self.targets = {t.grad_fn for t in inputs if t.grad_fn is not None}
        self.leaves = {id(t) for t in inputs if t.grad_fn is None and t.requires_grad}
        self.order = order
        self.below: dict = {}


def _walk_memo(output: torch.Tensor, memo: PathMemo) -> dict[str, int]:
    """:func:`_nonsmooth_on_path` of ``output`` with the memo of earlier walks (no ``log_of_abs``)."""
    root = output.grad_fn
    if root is None or not (memo.targets or memo.leaves):
        return {}
    table, order, below, targets, leaves = _NONSMOOTH, memo.order, memo.below, memo.targets, memo.leaves
    stack = [(root, False)]
    while stack:  # iterative post-order (graphs of long episodes are deeper than Python's recursion)
        fn, expanded = stack.pop()
        if expanded:
            acc = None
            reach = []
            for m, _ in fn.next_functions:
                sub = below.get(m) if m is not None else None
                reach.append(sub is not None)
                if sub is not None:
                    if acc is None:
                        acc = dict(sub)
                    else:
                        for name, k in sub.items():
                            acc[name] = min(k, acc.get(name, k))
            if acc is not None:
                name = type(fn).__name__
                k = table.get(name)
                if k is not None and not isinstance(k, int):
                    k = _order_of(k, fn, tuple(reach))
                if k is not None and k < order:
                    acc[name] = min(k, acc.get(name, k))
            below[fn] = acc
            continue
        if fn in below:
            continue
        if fn in targets or (leaves and id(getattr(fn, "variable", None)) in leaves):
            below[fn] = {}
            continue
        stack.append((fn, True))
        stack.extend((m, False) for m, _ in fn.next_functions if m is not None and m not in below)
    return dict(below.get(root) or {})


def _reaches(outputs: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor],
             avoid: Sequence[torch.Tensor] = ()) -> bool:
    """Whether a path in the autograd graph leads from one of ``outputs`` down to one of ``inputs`` (their
    ``grad_fn``, or the ``AccumulateGrad`` of a leaf): a depth-first walk that stops at the first input it
    meets. ``False`` for outputs without a graph (no ``grad_fn``: built from no tensor that requires grad,
    or through operations with no derivative such as comparisons, integer casts and argmax). ``avoid``:
    tensors the path may not pass through (the walk does not go below them, nor count them as inputs)."""
    targets = {t.grad_fn for t in inputs if t.grad_fn is not None}
    leaves = {id(t) for t in inputs if t.grad_fn is None and t.requires_grad}
    blocked = {t.grad_fn for t in avoid if t.grad_fn is not None}
    blocked_leaves = {id(t) for t in avoid if t.grad_fn is None}
    stack = [t.grad_fn for t in outputs if t.grad_fn is not None]
    seen = set()
    while stack:
        fn = stack.pop()
        if fn in blocked or (blocked_leaves and id(getattr(fn, "variable", None)) in blocked_leaves):
            continue
        if fn in targets or (leaves and id(getattr(fn, "variable", None)) in leaves):
            return True
        for m, _ in fn.next_functions:
            if m is not None and m not in seen:
                seen.add(m)
                stack.append(m)
    return False


def require_smooth(output: torch.Tensor, inputs: Sequence[torch.Tensor], order: int, *, who: str, what: str,
                   through: str, instead: str = "an estimator that does not differentiate through the "
                   "sample, e.g. 'score'") -> tuple[str, ...]:
    """Refuse to differentiate ``output`` ``order`` times through ``inputs`` along a non-smooth operation.

    A pathwise term E[∇ⁿc(z)] equals ∇ⁿE[c(z)] only when c's derivatives of order < n are continuous in
    z. Autograd differentiates ReLU (abs, clamp, max, sort, ...) as if its next derivative had no
    delta, so with a continuous z such a term is silently biased from the order at which that
    delta is lost (order 2 for a kink, order 1 for a jump). This walks the autograd graph of
    ``output`` once (memoised, down to ``inputs``) and raises if an operation of
    :func:`nonsmooth_operations` whose first discontinuous derivative has order < ``order`` lies on a path
    from one of ``inputs`` to ``output``. Operations on other paths (a ReLU of the parameters alone)
    are fine. The walk is Python over the graph's nodes: at order 1, where only a jump matters, call
    it once per estimator and cost name (the first step), not at every step.

    Args:
        output: what is differentiated (a cost with its graph, a control variate network's output).
        inputs: the samples it is differentiated through (tensors of its graph: their ``grad_fn``,
            or leaves).
        order: the derivative order (``cost.order``).
        who: the estimator and node, e.g. ``"estimator 'rebar' on plate 'z'"``.
        what: the output, e.g. ``"the cost 'rec'"``.
        through: the inputs, e.g. ``"the relaxed sample σ_λ(z)"``.
        instead: the alternative estimator to suggest.

    Returns:
        At order 1, the kinks found on that path (operation names, sorted; ``()`` if none): not refused at
        order 1, but an order-1 surrogate differentiated twice through ``output`` would lose their delta,
        so where there are some, hook ``output`` with :func:`storch.extending.refuse_create_graph` at every
        step (record them with the order-1 check's cache). The same walk finds them: nothing more is walked.
        ``()`` at other orders (at order >= 2 a kink is refused).

    Raises:
        OrderError: naming ``who``, ``what``, the operations found and what to do.
    """
    walked = _nonsmooth_on_path(output, inputs, 2 if order == 1 else order)
    found = {k: v for k, v in walked.items() if v < order} if order == 1 else walked
    if not found:
        return tuple(sorted(walked)) if order == 1 else ()
    ops = ", ".join(f"{name} (its derivative of order {k} is discontinuous)" for name, k in sorted(found.items()))
    lowest = min(found.values())
    lower = (f"differentiate at most {lowest} time(s) (storch.surrogate_loss(order={lowest})), " if lowest >= 1
             else "")
    raise OrderError(
        f"{who}: the order-{order} surrogate differentiates {what} {order} times through {through}, which is "
        f"unbiased only if it is {order} times differentiable there (E[∇ⁿc(z)] = ∇ⁿE[c(z)] needs the "
        f"derivatives of order < {order} to be continuous). On a path from {through} to it the autograd graph "
        f"holds {ops}: autograd reports 0 for the delta in the next derivative, so the estimate would be biased. "
        "Use smooth operations on that path (an activation such as softplus, GELU, SiLU or tanh instead of "
        "ReLU / leaky_relu / hardtanh / clamp; logsumexp instead of max); or "
        f"{lower.replace(', ', '; or ')}use {instead} for this node{_unread_note(found)}")


def _unread_note(found: Mapping[str, int]) -> str:
    """Where the trace's verdict is :func:`saved_values_unread`'s conservative one, says so."""
    if _values_readable() or not found.keys() & {"HypotBackward0", "Atan2Backward0"}:
        return ""
    return (". (Under storch.compile the constant argument of hypot / atan2 is not read: whether it is nonzero "
            "(hypot) or of the sign that keeps atan2 off its branch cut would be fixed into the program for "
            "every call. Run this step eagerly, where each surrogate reads it.)")
