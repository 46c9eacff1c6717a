"""The cost frame: a cost as one estimator's control variate sees it, and DiCE's MagicBox.

Sits between the graph (nodes, plates) and the estimators, which read a cost through a
:class:`CostFrame` when the surrogate (``storch.surrogate``) builds their control variates.
"""

from __future__ import annotations

import math
import weakref
from typing import Callable, Optional, Union

import torch

from .node import Node
from ..plates.tensor import Plate, align

__all__ = ["CostFrame", "magic_box", "leave_one_out", "leave_one_out_log_baselines"]


def magic_box(x: torch.Tensor) -> torch.Tensor:
    """MagicBox(x) = exp(x - ⊥x): evaluates to 1, its derivative is MagicBox(x)·∇x (DiCE)."""
    return torch.exp(x - x.detach())  # detach: Foerster et al. 2018, Eq. 3


def _widened(l: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A node's gradient function ``l`` in ``promote_types(l's dtype, dtype)``, for MagicBox(l) and the weights that
    meet the costs (``dtype``: float32, or a float64 cost's). The surrogate differentiates MagicBox(l) · C and
    (1 - MagicBox(l)) · ⊥b as separate terms: autograd rounds each term's gradient to l's dtype before adding
    them, so in bfloat16 (or float32 under a float64 cost of 1e8) the two large terms, C and -b, cancel to 0
    (found by testers). Widened once per node, every term reads the same widened tensor: their gradients are
    added in the wide dtype, and only the sum C - b is rounded to l's (the cast's backward). The same values
    and derivatives at every order (a cast is linear); a tensor already as wide is returned as it is."""
    if l.dtype is dtype or l.dtype is torch.float64 or not l.is_floating_point():
        return l
    # the wider of the two in Python: torch.promote_types would be recorded by storch.compile's trace (an aten op
    # returning a dtype, which a compiling backend refuses)
    return l if l.dtype is torch.float32 and dtype is not torch.float64 else l.to(dtype)


class CostFrame:
    """The cost as one estimator's control variate sees it (inside the surrogate, Eq. 2).

    Attributes:
        tensor: forward values of the (inner) cost estimate, detached, leading dims ``plates``;
            plates of later nodes have been reduced already (size 1).
        plates: the plates of the frame.
        dim: position of the node's own plate in ``plates``.
        name: the cost's name (from ``storch.add_cost``).
        state_name: the name per-cost estimator state is kept under (moving averages, NVIL's heads,
            sum_and_sample's buffer totals): the cost's name, or, where costs of one name but different
            plates (costs added per layer under one name) reach the node, the name with the cost's plate
            names, ``"nelbo[z1,z2]"``, so that each keeps its own state.
        order: the derivative order the surrogate is built for (``storch.surrogate_loss(order)``;
            1 for ``storch.backward()``): a control variate that is unbiased only for a cost
            differentiable enough checks it here (``storch.extending.require_smooth``: jumps at order 1,
            kinks too at order >= 2).
    """

    __slots__ = ("tensor", "plates", "dim", "_node", "_node_plates", "name", "state_name", "_live", "order")

    def __init__(self, tensor: torch.Tensor, plates: tuple[Plate, ...], node: Node,
                 live: Union[torch.Tensor, Callable[[], torch.Tensor]], name: Optional[str] = None,
                 state_name: Optional[str] = None, order: int = 1):
        self.tensor = tensor
        self.name = name
        self.state_name = name if state_name is None else state_name
        self.order = order
        self.plates = plates
        # the node keeps its frames (node.frames): a weak reference back, so that a finished step's
        # nodes, frames and tensors are freed by reference counting (no cycle for the collector)
        self._node = weakref.ref(node)
        self._node_plates = node_plates = node.plates
        name = node_plates[0].name
        # the node's plate is usually the cost's first
        self.dim = 0 if plates[0].name == name else next(i for i, p in enumerate(plates) if p.name == name)
        self._live = live

    def __repr__(self) -> str:
        return (f"CostFrame({self.name!r}, plates={tuple(p.name for p in self.plates)}, "
                f"shape={tuple(self.tensor.shape)}, dim={self.dim}, order={self.order})")

    @property
    def node(self) -> Optional[Node]:
        """The node whose control variate this frame is for (``None`` once its graph is freed)."""
        return self._node()

    def align(self, t: torch.Tensor, plates: Optional[tuple[Plate, ...]] = None) -> torch.Tensor:
        """View a node tensor (leading dims ``plates``, default the node's) in this frame."""
        plates = plates or self._node_plates
        return align(_lead(t, len(plates)), plates, self.plates)

    @property
    def key(self) -> str:
        """The cost's state name (``state_name``), with ``@t`` for a cost at step t > 0 of a partition: the
        key of per-cost estimator state (moving averages, the frames ``update_parameters`` receives)."""
        step = self.plates[self.dim].step
        name = self.state_name or ""
        return f"{name}@{step}" if step else name

    def sum_plate(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of ``t`` over the node's plate (kept as a size-1 dim)."""
        return t.sum(self.dim, keepdim=True)

    def live(self) -> torch.Tensor:
        """The inner cost estimate WITH its graph (for learned control variates that need it)."""
        live = self._live
        if not isinstance(live, torch.Tensor):  # built when first asked for (the surrogate may not need it)
            live = self._live = live()
        return live


def _lead(t, n: int):
    """Give ``t`` at least ``n`` dims by appending size-1 dims (for per-plate weights like (N,))."""
    if not isinstance(t, torch.Tensor):
        t = torch.as_tensor(t)
    if t.dim() < n:
        t = t.reshape(t.shape + (1,) * (n - t.dim()))
    return t


def leave_one_out(cost: CostFrame, n: int, start: int = 0) -> torch.Tensor:
    """The leave-one-out baseline of the node's samples (paper, section 3.2.5), along ``cost.dim``.

    b_j = 1/(m-1) Σ_{j' ≠ j, j' >= start} f(x_j') for the entries ``j >= start`` of the node's plate
    (m = n - start of them, m >= 2), and 0 for the entries before ``start`` (e.g. the enumerated
    part of sum-and-sample). The cost is detached (``cost.tensor``), so b carries no gradient.

    Args:
        cost: the frame the estimator's ``control_variate`` (or ``baseline``) receives.
        n: the size of the node's plate (``node.n``); a cost that does not vary along it is expanded.
        start: the first entry of the sampled part.
    """
    t = cost.tensor
    d = cost.dim
    if t.shape[d] != n:
        t = t.expand(t.shape[:d] + (n,) + t.shape[d + 1:])
    if t.dtype in _REDUCED:  # the sum over the plate in float32: 256 costs of ~400 overflow float16 (65504) to inf,
        return _leave_one_out_of(t.float(), d, n, start).to(t.dtype)  # a NaN loss (found by a tester); b fits
    if not start:  # (_leave_one_out_of's first case, without its call: every leave-one-out step)
        return (t.sum(d, keepdim=True) - t) / (n - 1)
    return _leave_one_out_of(t, d, n, start)


_REDUCED = (torch.float16, torch.bfloat16)


def _leave_one_out_of(t: torch.Tensor, d: int, n: int, start: int = 0) -> torch.Tensor:
    """:func:`leave_one_out` of the tensor ``t`` along its dim ``d`` of size ``n``."""
    if not start:
        return (t.sum(d, keepdim=True) - t) / (n - 1)  # cost.sum_plate(t)
    smp = t.narrow(d, start, n - start)
    b = (smp.sum(d, keepdim=True) - smp) / (n - start - 1)
    return torch.cat([torch.zeros_like(t.narrow(d, 0, start)), b], d)


def leave_one_out_log_baselines(log_weights: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """The per-draw baselines of a multi-sample bound L = -(log Σ_k w_k - log K): VIMCO's (Mnih & Rezende, 2016,
    Eq. 9-10), for estimators of such a bound (the first-party ``vimco``, a third party's own).

    b_k is L with log w_k replaced by the mean of the other draws' log-weights (their geometric mean):
    b_k = -(log(Σ_{j≠k} w_j + exp(mean_{j≠k} log w_j)) - log K). It depends on the other draws only, so
    Σ_k (1 - MagicBox(l_k)) ⊥b_k is a zero-mean control variate at every order (appendix C).

    O(K) time and memory per set (no K x K tensor): with m = max_j log w_j and e_j = exp(log w_j - m),
    Σ_{j≠k} w_j = exp(m) Σ_{j≠k} e_j, the total less e_k, except at the largest weight (where that difference
    would cancel; it is summed again without it, shifted by the largest other log-weight, so that other draws
    far below the top do not underflow); the mean of the others is the total of the log-weights less log w_k.
    float16 / bfloat16 log-weights are summed in float32 (K log-weights of ~-50 overflow float16).

    Impossible draws (log w_j = -inf: p(x, z_j) = 0, or a masked draw) make the geometric mean of the others
    0 (their mean -inf) where another draw is impossible, instead of the NaN of -inf - (-inf). A b_k that is
    not finite (every other draw impossible: +inf, which the control variate's factor 1 - MagicBox(l_k), of
    value 0, would turn into NaN) is 0, and so is a b_k whose other draws hold +inf or NaN (the bound itself
    is then not finite): any baseline that is a function of the other draws keeps the estimate unbiased.

    Args:
        log_weights: the K per-draw log-weights log w_k (floating point), along ``dim``. Read detached: a
            baseline carries no gradient (one with the log-weights' gradient, whose control variate
            (1 - MagicBox(l_k)) b_k is 0 in value and first derivative, adds -2 ∇l_k ∇b_k to every order-2
            estimate).
        dim: the dim of the K draws (K >= 2).

    Returns:
        b, the shape of ``log_weights``: b_k at the position of draw k, without gradient.

    Raises:
        ValueError: fewer than 2 draws along ``dim``, ``dim`` out of range, or log-weights not floating point.

    Example:
        >>> b = leave_one_out_log_baselines(torch.tensor([0.0, -1.0, -2.0]))
        >>> # b[0] = -(logsumexp([-1.5, -1.0, -2.0]) - log 3): draw 0's log-weight replaced by mean(-1, -2)
    """
    if log_weights.dim() and not (log_weights.is_floating_point() and -log_weights.dim() <= dim < log_weights.dim()):
        raise ValueError(f"leave_one_out_log_baselines takes floating-point log-weights with the K draws along a dim "
                         f"they have, got {log_weights.dtype} log-weights of shape {tuple(log_weights.shape)} and "
                         f"dim={dim}: pass log_w.float() (log w_k = log p(x, z_k) - log q(z_k)) and the draws' dim")
    log_weights = log_weights.detach()  # (a baseline carries no gradient: see log_weights above)
    if log_weights.dim() == 0 or log_weights.shape[dim] < 2:
        raise ValueError(f"leave_one_out_log_baselines needs K >= 2 draws along dim {dim} (each draw's baseline "
                         f"averages the others), got log-weights of shape {tuple(log_weights.shape)}")
    if dim not in (-1, log_weights.dim() - 1):
        return _log_baselines(log_weights.movedim(dim, -1)).movedim(-1, dim)
    return _log_baselines(log_weights)


def _log_baselines(log_w: torch.Tensor) -> torch.Tensor:
    """:func:`leave_one_out_log_baselines` along the last dim."""
    if log_w.dtype in _REDUCED:  # the sum of K log-weights of ~-50 overflows float16
        return _log_baselines(log_w.float()).to(log_w.dtype)
    k = log_w.shape[-1]
    finite = torch.isfinite(log_w)
    ninf = torch.full((), -math.inf, dtype=log_w.dtype, device=log_w.device)
    zero = torch.zeros((), dtype=log_w.dtype, device=log_w.device)
    x = torch.where(finite, log_w, ninf)  # +inf and NaN handled below (their other draws get b = 0)
    m = x.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, zero)  # all -inf: e = 0 below
    e = torch.exp(x - m)
    rest = e.sum(-1, keepdim=True) - e  # Σ_{j≠k} e_j >= e_top = 1 for k != top: no cancellation
    xf = torch.where(finite, log_w, zero)
    others = (xf.sum(-1, keepdim=True) - xf) / (k - 1)  # the mean of the finite others (Eq. 10)
    impossible = log_w == -math.inf
    others = torch.where(_at_another_draw(impossible), ninf, others)  # the geometric mean of weights with a zero
    lse = m + torch.log(rest + torch.exp(others - m))
    # the largest draw's own entry is shifted by the largest of the OTHER log-weights, m2 (its mean of the others
    # is <= m2): shifted by m, every term of it is exp(x_j - m), which underflows to 0 once all other draws lie
    # ~103 nats below the top in float32 (745 in float64) and gave b = +inf, then 0 (a review: log w [0, -120,
    # -130, -140] gave b_top 0 for 121.39); the K x K form shifted each row by its own maximum
    top = e.argmax(-1, keepdim=True)
    x2 = x.scatter(-1, top, -math.inf)
    m2 = x2.amax(-1, keepdim=True)
    m2 = torch.where(torch.isfinite(m2), m2, zero)
    lse_top = m2 + torch.log(torch.exp(x2 - m2).sum(-1, keepdim=True) + torch.exp(others.gather(-1, top) - m2))
    b = -(lse.scatter(-1, top, lse_top) - math.log(k))  # Eq. 9 with w_k replaced
    return torch.where(torch.isfinite(b) & ~_at_another_draw(~finite & ~impossible), b, zero)


def _at_another_draw(mask: torch.Tensor) -> torch.Tensor:
    """[..., k]: whether mask holds at some j != k (last dim)."""
    n = mask.sum(-1, keepdim=True)
    return n - mask.to(n.dtype) > 0
