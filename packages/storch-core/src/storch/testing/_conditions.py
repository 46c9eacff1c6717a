"""``check_conditions``: statistical checks of Theorem 1's local conditions 1-3 (paper, 3.4, B.1).

For one estimator 〈q, w, l, a〉 on one node x ~ p(x; θ) and a deterministic test function f,
with MagicBox written ⊡ and X the node's sample set drawn from q:

1. E_q[Σ_{x∈X} ∇^m (w(x) ⊡(l(x)) f(x))] = ∇^m E_p[f(x)]   (m = 0..n)
2. E_q[Σ_{x∈X} ∇^m (w(x) a(X))] = 0                        (m = 0..n)
3. E_q[Σ_{x∈X} ∇^m w(x)] = 0                               (m = 1..n)

Each left-hand side is computed for many independent replicates in one batched graph and
z-tested against the right-hand side, exact by enumeration or Gauss-Hermite quadrature. A
condition that the check could not exercise (a control variate that returned ``None``, as an
untrained learned one does) is reported "not tested", which is not "ok".
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Union, overload

import numpy as np
import torch
from torch.distributions import Distribution, Normal

from ..graph.cost_frame import CostFrame, magic_box
from ..graph import Graph, add_cost
from ..plates.tensor import PlateTensor, align
from ..registry import created_by_design
from ._enumeration import direction, exact_derivatives
from ..estimators.base import Estimator
from ._models import EstimatorFactory, Model
from ._resolve import EstimatorLike, default_orders, resolve
from ._stats import UnbiasednessReport, per_replicate_derivatives, replicate, z_test
from ._warmup import persistent, warm_up

__all__ = ["check_conditions", "ConditionsReport", "exact_expectation"]

_MAX_POINTS = 4096
# the cost's name in the check's frame and in the warm-up: the name storch.add_cost gives a graph's
# first unnamed cost, so per-cost state trained in the warm-up (keyed by cost.key) is found in the check
_COST = "cost0"


@dataclass
class ConditionsReport:
    """Outcome of :func:`check_conditions`: one z-test per (condition, order).

    Attributes:
        estimator: the estimator's registry name.
        distribution: the distribution's class name.
        orders: the derivative orders that were tested, a sorted tuple without repeats (``(0, 1, 2)`` for
            ``orders=[2, 0, 1]``; the table prints it as a list): compare it with a tuple.
        checks: :class:`UnbiasednessReport` s named ``"condition k, order m"``.
        not_tested: ``"condition k, order m"`` -> why it was never exercised (the estimator has a
            control variate, but it returned ``None``: an untrained learned one does; pass
            ``warmup=``). Not ok: nothing was shown about that condition.
        seconds: wall time of the check.
    """

    estimator: str
    distribution: str
    orders: tuple[int, ...]
    checks: list[UnbiasednessReport] = field(default_factory=list)
    not_tested: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """True if every check passed and every condition was tested."""
        return not self.not_tested and all(c.ok for c in self.checks)

    @property
    def failures(self) -> list[UnbiasednessReport]:
        """The checks that failed."""
        return [c for c in self.checks if not c.ok]

    def condition_ok(self, k: int) -> bool:
        """Whether every order of condition ``k`` was tested and passed."""
        prefix = f"condition {k},"
        return (all(c.ok for c in self.checks if c.name.startswith(prefix))
                and not any(name.startswith(prefix) for name in self.not_tested))

    def table(self, details: bool = True) -> str:
        """One row per check; with ``details``, the per-component table of each failure."""
        rows = [f"{self.estimator} on {self.distribution}: Theorem 1, orders {list(self.orders)} "
                f"({self.seconds:.1f}s)", f"{'condition, order':<22} {'components':>10} {'max |z|':>8}  result"]
        lines = [(c.name, f"{c.name:<22} {c.z.numel():>10} {c.max_abs_z:>8.2f}  {'ok' if c.ok else 'FAIL'}")
                 for c in self.checks]
        lines += [(name, f"{name:<22} {'-':>10} {'-':>8}  not tested: {why}") for name, why in self.not_tested.items()]
        rows += [row for _, row in sorted(lines)]  # "condition k, order m": by k, then m
        if details:
            for c in self.failures:
                rows += ["", c.table()]
        return "\n".join(rows)

    def __str__(self) -> str:
        return self.table()


def exact_expectation(distribution: Callable[[torch.Tensor], Distribution],
                      test_function: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """``θ -> E_{p(x;θ)}[f(x)]`` in plain torch, differentiable in θ.

    Enumerates every joint value of a distribution with ``enumerate_support`` (at most 4096),
    or uses 16-point Gauss-Hermite quadrature per batch dim for a ``Normal`` (exact for
    polynomials of degree <= 31; at most 3 batch dims). ``f`` is called on one joint value at a
    time (a plain tensor of the distribution's ``batch_shape + event_shape``).
    """

    def fn(theta: torch.Tensor) -> torch.Tensor:
        d = distribution(theta)
        if isinstance(d, Normal):
            return _quadrature(d, test_function)
        if not d.has_enumerate_support:
            raise ValueError(
                f"cannot compute E[f] for {type(d).__name__} exactly; pass exact=lambda theta: ... "
                "(a closed form), or use a distribution with enumerate_support or a Normal"
            )
        return _enumerate(d, test_function)

    return fn


def _enumerate(d: Distribution, f: Callable) -> torch.Tensor:
    support = d.enumerate_support(expand=True)  # (K, *batch, *event)
    k, batch, event = support.shape[0], tuple(d.batch_shape), tuple(d.event_shape)
    nb = math.prod(batch)
    if k ** nb > _MAX_POINTS:
        raise ValueError(f"{type(d).__name__} has {k}^{nb} joint values, more than {_MAX_POINTS} to enumerate")
    flat = support.reshape((k, nb) + event)
    total = 0.0
    for idx in itertools.product(range(k), repeat=nb):
        x = flat[list(idx), list(range(nb))].reshape(batch + event)
        total = total + d.log_prob(x).sum().exp() * f(x)
    return torch.as_tensor(total)


def _quadrature(d: Normal, f: Callable) -> torch.Tensor:
    batch = tuple(d.batch_shape)
    nb = math.prod(batch)
    if nb > 3:
        raise ValueError(f"Gauss-Hermite quadrature is limited to 3 batch dims, the Normal has {nb}")
    nodes, weights = np.polynomial.hermite.hermgauss(16)
    loc, scale = d.loc.reshape(-1), d.scale.reshape(-1)
    total = 0.0
    for idx in itertools.product(range(len(nodes)), repeat=nb):
        t = torch.tensor(nodes[list(idx)], dtype=loc.dtype)
        x = (loc + math.sqrt(2.0) * scale * t).reshape(batch)  # x = μ + √2 σ t (Gauss-Hermite)
        total = total + float(np.prod(weights[list(idx)])) / math.pi ** (nb / 2) * f(x)
    return torch.as_tensor(total)


def _per_replicate(t: torch.Tensor, n: int) -> torch.Tensor:
    """A term summed over the node's plate, as one value per replicate (shape ``(n,)``)."""
    return torch.broadcast_to(t.reshape(-1), (n,))


_Node = Callable[[torch.Tensor], Distribution]
_Function = Callable[[torch.Tensor], torch.Tensor]


# Overloads, so that a type checker infers a factory's parameter (as for check_against_enumeration).
@overload
def check_conditions(
    estimator: EstimatorFactory, distribution: _Node, theta: torch.Tensor, test_function: _Function, *,
    orders: Optional[Sequence[int]] = ..., exact: Optional[_Function] = ..., options: None = ...,
    n_replicates: int = ..., seed: int = ..., threshold: float = ..., raise_on_failure: bool = ...,
    warmup: int = ..., warmup_replicates: int = ...,
) -> ConditionsReport: ...


@overload
def check_conditions(
    estimator: Estimator, distribution: _Node, theta: torch.Tensor, test_function: _Function, *,
    orders: Optional[Sequence[int]] = ..., exact: Optional[_Function] = ..., options: None = ...,
    n_replicates: int = ..., seed: int = ..., threshold: float = ..., raise_on_failure: bool = ...,
    warmup: int = ..., warmup_replicates: int = ...,
) -> ConditionsReport: ...


@overload
def check_conditions(
    estimator: Union[str, type[Estimator]], distribution: _Node, theta: torch.Tensor, test_function: _Function, *,
    orders: Optional[Sequence[int]] = ..., exact: Optional[_Function] = ..., options: Optional[dict[str, Any]] = ...,
    n_replicates: int = ..., seed: int = ..., threshold: float = ..., raise_on_failure: bool = ...,
    warmup: int = ..., warmup_replicates: int = ...,
) -> ConditionsReport: ...


def check_conditions(
    estimator: EstimatorLike,
    distribution: Callable[[torch.Tensor], Distribution],
    theta: torch.Tensor,
    test_function: Callable[[torch.Tensor], torch.Tensor],
    *,
    orders: Optional[Sequence[int]] = None,
    exact: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    options: Optional[dict[str, Any]] = None,
    n_replicates: int = 4000,
    seed: int = 0,
    threshold: float = 4.0,
    raise_on_failure: bool = True,
    warmup: int = 0,
    warmup_replicates: int = 64,
) -> ConditionsReport:
    """z-test Theorem 1's local conditions 1-3 for one estimator, distribution and test function.

    Args:
        estimator: a registry name, an estimator instance, class, or factory ``make(plate)``.
        distribution: ``distribution(θ)`` builds the node's distribution, written for one sample
            (it is called with a plate tensor in the check and with a plain tensor for exact values).
        theta: the parameter (float64 recommended) at which the conditions are checked.
        test_function: a deterministic f(x) -> a scalar, for one sample; differentiable in x for
            pathwise estimators.
        orders: derivative orders; default 0..min(max_order, 3) (order 0 only if ``biased``).
        exact: ``θ -> E_p[f(x)]``; default :func:`exact_expectation`.
        options: constructor options for a name or class (default ``n_samples=2`` if accepted).
        n_replicates: independent estimates per term.
        seed: the seed; the global RNG is restored afterwards.
        threshold: the largest accepted |z| per component.
        raise_on_failure: raise ``AssertionError`` with the report's table when a test fails or a
            condition was not tested.
        warmup: training steps (``storch.backward()``, so ``update_parameters`` runs) before the
            test, with the estimator instance the test then uses, as in
            :func:`check_against_enumeration`: the node x ~ ``distribution(θ)`` with the cost
            ``test_function(x)`` (named ``"cost0"``, as in the check's cost frame), with
            ``warmup_replicates`` copies of θ on a data plate per step. Without it, a learned
            control variate that returns ``None`` until trained leaves condition 2 not tested.
        warmup_replicates: copies of θ per warm-up step.

    Example:
        >>> storch.testing.check_conditions(
        ...     "score", lambda th: Bernoulli(logits=th), torch.tensor([0.3, -0.2], dtype=torch.float64),
        ...     lambda x: ((x - 0.45) ** 2).sum())
    """
    with created_by_design():  # (estimators made anew by design: not counted as made in every training step)
        start = time.perf_counter()
        make, probe = resolve(estimator, options)
        orders = tuple(sorted(set(orders))) if orders is not None else default_orders(probe)
        if not orders or min(orders) < 0 or max(orders) > 3:
            raise ValueError(f"orders must be a non-empty subset of 0..3, got {orders!r}")
        top, n = max(orders), n_replicates
        exact_fn = exact or exact_expectation(distribution, test_function)
        make = persistent(make)  # one estimator for the warm-up and the check (its learned parts persist)
        if warmup:
            def build(make_: Callable, th: torch.Tensor) -> None:
                add_cost(test_function(make_("x")(distribution(th))), name=_COST)

            model = Model("conditions", theta, build, exact_fn, lambda: [distribution(theta)])
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed + 7919)
                warm_up(model, make, warmup, warmup_replicates)
        with torch.random.fork_rng(devices=[]), Graph() as graph:
            torch.manual_seed(seed)
            leaf, th = replicate(theta, n)
            dist = distribution(th)
            est = make("x")
            x = est(dist)
            node = graph.nodes[-1]
            fx = test_function(x)
            if fx.shape != ():
                raise ValueError(f"test_function must return one number per sample, got shape {tuple(fx.shape)}")
            f = align(fx.tensor, fx.plates, node.plates) if isinstance(fx, PlateTensor) else fx
            inner = magic_box(node.gradient_values) * f  # ⊡(l(x)) f(x), as in Eq. 2
            a = est.control_variate(node, CostFrame(inner.detach(), node.plates, node, inner, _COST, order=max(top, 1)))
            w = node.weight_values
            terms = {1: (w * inner).sum(0), 2: None if a is None else (w * a).sum(0), 3: w.sum(0)}
            values: dict[tuple[int, int], torch.Tensor] = {}
            for k, t in terms.items():
                if t is None:
                    continue
                t = _per_replicate(t, n)
                values[k, 0] = t.detach().reshape(n, 1)
                if top > 0:
                    derivatives = per_replicate_derivatives(t.mean(), leaf, top, direction(leaf[0].numel()))
                    for m, d in enumerate(derivatives, start=1):
                        values[k, m] = d
        exact_d = exact_derivatives(exact_fn, theta, top)
        report = ConditionsReport(probe.name or type(probe).__name__, type(dist).__name__, orders)
        for k in (1, 2, 3):
            for m in orders:
                if k == 3 and m == 0:
                    continue  # condition 3 constrains derivatives only
                if k == 2 and (2, m) not in values:
                    if est.has_control_variate():
                        # a control variate that returned None (an untrained learned one) showed nothing:
                        # a z-test of zeros would report "ok" for any control variate, a biased one too
                        report.not_tested[f"condition 2, order {m}"] = (
                            "control_variate returned None on every replicate (a learned part not trained yet?): "
                            "pass warmup= or a trained instance")
                        continue
                    est_m = torch.zeros((n,) + exact_d[m].shape, dtype=torch.float64)  # no control variate: a = 0
                else:
                    est_m = values[k, m]
                target = exact_d[m] if k == 1 else torch.zeros_like(exact_d[m])
                report.checks.append(z_test(est_m, target, f"condition {k}, order {m}", threshold))
        report.seconds = time.perf_counter() - start
        if raise_on_failure and not report.ok:
            what = "violates" if report.failures else "leaves untested"
            raise AssertionError(f"{report.estimator} {what} Theorem 1's local conditions:\n" + report.table())
        return report
