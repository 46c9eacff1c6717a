"""``check_against_enumeration``: an estimator's estimates of orders 0..n against exact values."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Union, overload

import torch

from ..graph.cost_frame import _lead
from ..errors import OrderError, UnsupportedDistributionError
from ..estimators.base import Estimator
from ..graph import Graph, current_graph
from ..registry import created_by_design
from ..surrogate import value_surrogate
from ..surrogate.loss import unchecked_surrogate_loss
from ._models import EstimatorFactory, Model, models_to_run
from ._resolve import EstimatorLike, default_orders, is_factory, replicas, resolve
from ._stats import UnbiasednessReport, per_replicate_derivatives, z_test
from ._warmup import persistent, warm_up

__all__ = ["check_against_enumeration", "ConformanceReport", "exact_derivatives", "direction"]


@dataclass
class ConformanceReport:
    """Outcome of :func:`check_against_enumeration`: one z-test per (model, order).

    Attributes:
        estimator: the estimator's registry name; for a factory that made estimators of several kinds,
            which estimator ran at which node (``"factory (arm at R; score at C, S)"``).
        orders: the derivative orders that were tested, a sorted tuple without repeats (``(0, 1, 2)`` for
            ``orders=[2, 0, 1]``; the table prints it as a list): compare it with a tuple.
        checks: one :class:`UnbiasednessReport` per (model, order), named ``"model, order m"``.
        skipped: models (or a model's orders, ``"model, order m"``) not run, with the reason: a
            distribution the estimator does not support (by its class attributes, or an
            ``UnsupportedDistributionError`` raised when sampling), or an order storch refused on a
            model where a refusal is an accepted outcome (``Model.may_refuse``).
        errors: models passed explicitly (``models=[...]``) that could not run, with the reason (a
            distribution an estimator does not support): failures, since a model the test names must be
            tested (the kit's own models that an estimator does not support are skipped instead); and,
            with ``raise_on_failure=False``, every model on which the estimator raised, with
            ``"raised <type>: <message>"`` (with ``raise_on_failure=True`` the exception propagates), and every
            model where a node's estimator says ``uniform_weights`` but its ``weighting_function`` gives weights
            that are not 1/N (which the surrogate would drop), with ``"drops its weights: <what>"`` (not run;
            with ``raise_on_failure=True`` an ``AssertionError``).
        hints: per model name, what a failure of that model most likely means (``Model.hint``).
        seconds: wall time of the whole check.
        biased: the estimator is declared biased (``biased = True``): a failed z-test is its bias, which the
            table and the failure text say.
    """

    estimator: str
    orders: tuple[int, ...]
    checks: list[UnbiasednessReport] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    hints: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    biased: bool = False

    @property
    def ok(self) -> bool:
        """True if there was at least one check, every check passed and every model passed explicitly ran."""
        return bool(self.checks) and all(c.ok for c in self.checks) and not self.errors

    @property
    def failures(self) -> list[UnbiasednessReport]:
        """The checks that failed."""
        return [c for c in self.checks if not c.ok]

    def raise_if_failed(self, failed: str) -> None:
        """Raise ``AssertionError`` with the table unless :attr:`ok`: ``failed`` says what the failed z-tests mean
        (``"does not match the exact values"``); models passed in ``models=[...]`` that could not run are named."""
        if self.ok:
            return
        whys = self.errors.values()
        errors = ("drops the weights of some nodes (uniform_weights)" if all(w.startswith(_DROPPED) for w in whys)
                  else "could not run on some models" if any(w.startswith(("raised ", _DROPPED)) for w in whys)
                  else "could not run on models passed in models=[...]")
        what = (f"{failed}, and {errors}" if self.errors else failed) if self.failures else \
            f"{errors} (a model the test names must be tested)"
        raise AssertionError(f"{self.estimator} {what}:\n" + self.table())

    def table(self, details: bool = True) -> str:
        """One row per (model, order); below it the per-component table of each failure."""
        head = f"{self.estimator}: orders {list(self.orders)}, {len(self.checks)} z-tests in {self.seconds:.1f}s"
        rows = [head, f"{'model, order':<34} {'estimates':>9} {'components':>10} {'max |z|':>8}  result"]
        for c in self.checks:
            verdict = "ok" if c.ok else "FAIL"
            rows.append(f"{c.name:<34} {c.n:>9} {c.z.numel():>10} {c.max_abs_z:>8.2f}  {verdict}")
        for name, why in self.errors.items():
            rows.append(f"{name:<34} FAIL: {why}" if why.startswith(("raised ", _DROPPED)) else
                        f"{name:<34} FAIL: passed in models=[...] but could not run: {why}")
        for name, why in self.skipped.items():
            rows.append(f"{name:<34} skipped: {why}")
        if details:
            for c in self.failures:
                rows += ["", c.table()]
        failed = {c.name.rsplit(", order ", 1)[0] for c in self.failures}
        tested = {c.name.rsplit(", order ", 1)[0] for c in self.checks}
        hints = [f"\n{name} failed: {hint}" for name, hint in self.hints.items() if name in failed]
        if failed and self.biased:
            rows.insert(1, _BIASED_ROW)
        elif len(tested) > 1 and failed == tested:
            rows.insert(1, f"fails on every model ({len(tested)} of them): the estimator itself is biased (its "
                           "components, not one model's structure: check the proposal, weights, gradient function "
                           "and output against the estimator's derivation on the simplest model first)"
                           + ("; the models' hints below are less likely causes" if hints else ""))
        rows += hints
        return "\n".join(rows)

    def __str__(self) -> str:
        return self.table()


# what a failed z-test of an estimator declared biased means (the table's second row, and the failure text)
_BIASED_ROW = ("the estimator is declared biased (biased = True in its class, `biased` in "
               "storch.available_estimators()): its estimates need not match the exact values, and a failed z-test "
               "measures that bias (a relaxation's, which shrinks as its temperature goes to 0), not a bug; the kit "
               "tests such an estimator by default only at order 0 and only where its forward value is a sample of p")


def direction(d: int) -> torch.Tensor:
    """The fixed, generic direction v along which third derivatives are taken (∇³f·v).

    Not the all-ones vector: derivatives of softmax models along all-ones vanish identically.
    """
    return torch.cos(torch.arange(1, d + 1, dtype=torch.float64))


def exact_derivatives(fn: Callable[[torch.Tensor], torch.Tensor], theta: torch.Tensor, order: int) -> list[torch.Tensor]:
    """``[fn(θ), ∇fn, ∇²fn, ∇³fn·v]`` up to ``order``, shaped like :func:`per_replicate_derivatives`.

    ``v`` is :func:`direction`; ``fn`` must be differentiable in θ (plain torch).
    """
    leaf = theta.detach().to(torch.float64).reshape(1, -1).clone().requires_grad_(True)
    value = fn(leaf[0].reshape(theta.shape))
    out = [value.detach().reshape(1)]
    if order >= 1:
        v = direction(leaf.shape[1])
        out += [d[0].detach() for d in per_replicate_derivatives(value, leaf, order, v)]
    return out


class _NotComparable(Exception):
    """A model whose estimates cannot be compared with its exact values (the reason is the message)."""


def _values_outside_support(graph: Graph) -> Optional[str]:
    """The first node whose values handed to the model lie outside its distribution's support (a relaxed
    sample), described; ``None`` if every node hands out samples of its distribution."""
    for node in graph.nodes:
        value = node.value
        if value is None:
            continue
        raw = value.tensor
        try:
            support = node.distribution.support
            if support is None:
                continue  # no declared support: nothing to check the values against
            inside = bool(support.check(raw).all())
        except (NotImplementedError, RuntimeError, TypeError, ValueError):
            continue  # a support that cannot be checked on these values: assume a sample
        if not inside:
            return (f"node {node.plate.name!r} hands out values outside the support of its "
                    f"{type(node.distribution).__name__} (a relaxed sample)")
    return None


def _run_model(model: Model, make: EstimatorFactory, orders: Sequence[int], n: int, seed: int,
               threshold: float, warmup: int = 0, warmup_replicates: int = 64,
               forward_is_a_sample: bool = False) -> list[UnbiasednessReport]:
    top = max(orders)
    make = persistent(make)  # one estimator per node for the whole check (its learned parts persist)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 7919)
        warm_up(model, make, warmup, warmup_replicates)
    with torch.random.fork_rng(devices=[]), Graph():
        torch.manual_seed(seed)
        leaf, weights, theta = replicas(model.theta, n)
        model.build(make, theta)
        if forward_is_a_sample:  # order 0 of a biased estimator: only an exact sample's value is comparable
            outside = _values_outside_support(current_graph())
            if outside is not None:
                raise _NotComparable(
                    f"{outside}: the estimator is declared biased and its forward value estimates another "
                    "(relaxed) objective, so there is nothing to compare with the exact values; pass orders= "
                    "to measure its distance from them")
        # order 0 alone: surrogate_loss(order=0) is detached; its graph, differentiated in the weights only
        loss = unchecked_surrogate_loss(top, current_graph()) if top else value_surrogate(current_graph())
        estimates: dict[int, torch.Tensor] = {}
        if 0 in orders:
            # ∂loss/∂u_r = S_r: each replicate's forward estimate (see _resolve._Replicas)
            estimates[0] = torch.autograd.grad(loss, weights, retain_graph=top > 0)[0].reshape(n, 1)
        if top > 0:
            derivatives = per_replicate_derivatives(loss, leaf, top, direction(leaf[0].numel()))
            for m, d in enumerate(derivatives, start=1):
                estimates[m] = d
        low = _lowest_precision(current_graph())
    exact = exact_derivatives(model.exact, model.theta, top)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        _without_plates(model, make, top)
    reports = [z_test(estimates[m], exact[m], f"{model.name}, order {m}", threshold) for m in orders]
    if low is not None:  # (the estimates are float64, as θ; a cost computed in a lower precision limits them)
        for r in reports:
            r.dtype = low
    return reports


def _lowest_precision(graph: Graph) -> Optional[torch.dtype]:
    """float32 (or lower) if a cost of ``graph`` is computed in it, else ``None``."""
    low = None
    for _, cost in graph.costs:
        dtype = getattr(getattr(cost, "tensor", cost), "dtype", None)
        if dtype in (torch.float32, torch.float16, torch.bfloat16) and (
                low is None or torch.finfo(dtype).eps > torch.finfo(low).eps):
            low = dtype
    return low


def _without_plates(model: Model, make: EstimatorFactory, top: int) -> None:
    """Build ``model`` once with a plain θ (nodes without parent plates) and differentiate it.

    The replicate plate makes every node of the statistical run a child of a plate; this run
    makes sure the plainest use works too, and gives finite values.
    """
    leaf = model.theta.detach().reshape(1, -1).clone().requires_grad_(True)
    try:
        with Graph():
            model.build(make, leaf[0].reshape(model.theta.shape))
            loss = unchecked_surrogate_loss(top, current_graph())
            values = [loss.reshape(1)] + per_replicate_derivatives(loss, leaf, top, direction(leaf.shape[1]))
    except Exception as e:
        raise AssertionError(
            f"{model.name}: building the model with a plain parameter (no plates) and differentiating it "
            f"to order {top} raised {type(e).__name__}: {e}") from e
    bad = [m for m, v in enumerate(values) if not torch.isfinite(v).all()]
    if bad:
        raise AssertionError(f"{model.name}: non-finite estimates of orders {bad} with a plain parameter (no plates)")


class _DroppedWeights(AssertionError):
    """:func:`_check_uniform_weights`' finding (an ``AssertionError``, as under ``raise_on_failure=True``): told
    apart from an exception the estimator raised, so that ``raise_on_failure=False`` reports it."""


# the start of a model's entry in ConformanceReport.errors for that finding
_DROPPED = "drops its weights: "


def _check_uniform_weights(model: Model, make: EstimatorFactory) -> bool:
    """An estimator that says ``uniform_weights`` and overrides ``weighting_function``: the surrogate never
    calls the weighting function then (it reduces the plate by its mean), so weights that are not 1/N,
    or carry gradient, would be silently dropped (:class:`_DroppedWeights`). Built once with a plain θ;
    ``False`` where the estimator refuses the model's distribution when sampling (the caller tries the next
    model)."""
    leaf = model.theta.detach().clone().requires_grad_(True)
    make = persistent(make)  # one estimator per node, as the model's own run: a partition calls make(plate) per step
    with torch.random.fork_rng(devices=[]), Graph():
        torch.manual_seed(0)
        try:
            model.build(make, leaf)
        except UnsupportedDistributionError:
            return False  # refused when sampling: the model's own run reports the refusal (a pass)
        for node in current_graph().nodes:
            est = node.estimator
            if not est.uniform_weights or type(est).weighting_function is Estimator.weighting_function:
                continue
            w = _lead(est.weighting_function(node), len(node.plates))
            n = node.plate.size
            if w.requires_grad or not torch.allclose(w.detach(), torch.full_like(w.detach(), 1.0 / n)):
                values = w.detach().flatten()[:4].tolist()
                raise _DroppedWeights(
                    f"{est.name or type(est).__name__}: uniform_weights is True, but weighting_function (overridden) "
                    f"returns weights {values}{' ...' if w.numel() > 4 else ''}"
                    f"{' that carry gradient' if w.requires_grad else ''}, not 1/N = {1.0 / n:.4g} (node "
                    f"{node.plate.name!r} of model {model.name}). With uniform_weights the surrogate reduces the "
                    "plate by its mean and never reads the weighting function, so these weights are dropped: make "
                    "uniform_weights False (for the options under which the weights are not 1/N)")
    return True


# Overloads, so that a type checker infers a factory's parameter (``lambda plate: ...``): against the
# plain union ``EstimatorLike`` pyright types it from Estimator.__call__ (a Distribution) instead.
# Options are used only with a name or a class (with an instance the kit raises TypeError).
@overload
def check_against_enumeration(
    estimator: EstimatorFactory, *, orders: Optional[Sequence[int]] = ..., models: Optional[Sequence[Model]] = ...,
    options: None = ..., n_replicates: int = ..., seed: int = ..., threshold: float = ...,
    raise_on_failure: bool = ..., warmup: int = ..., warmup_replicates: int = ...,
) -> ConformanceReport: ...


@overload
def check_against_enumeration(
    estimator: Estimator, *, orders: Optional[Sequence[int]] = ..., models: Optional[Sequence[Model]] = ...,
    options: None = ..., n_replicates: int = ..., seed: int = ..., threshold: float = ...,
    raise_on_failure: bool = ..., warmup: int = ..., warmup_replicates: int = ...,
) -> ConformanceReport: ...


@overload
def check_against_enumeration(
    estimator: Union[str, type[Estimator]], *, orders: Optional[Sequence[int]] = ...,
    models: Optional[Sequence[Model]] = ..., options: Optional[dict[str, Any]] = ..., n_replicates: int = ...,
    seed: int = ..., threshold: float = ..., raise_on_failure: bool = ..., warmup: int = ...,
    warmup_replicates: int = ...,
) -> ConformanceReport: ...


def check_against_enumeration(
    estimator: EstimatorLike,
    *,
    orders: Optional[Sequence[int]] = None,
    models: Optional[Sequence[Model]] = None,
    options: Optional[dict[str, Any]] = None,
    n_replicates: int = 4000,
    seed: int = 0,
    threshold: float = 4.0,
    raise_on_failure: bool = True,
    warmup: int = 0,
    warmup_replicates: int = 64,
) -> ConformanceReport:
    """z-test an estimator's estimates of orders 0..n against exact values on small models.

    Every model (see :func:`storch.testing.standard_models`) is built ONCE with ``n_replicates``
    independent copies of its parameter on a replicate plate, so one surrogate loss holds all
    estimates; its forward value and derivatives per replicate are z-tested against the exact
    expectation (plain-torch enumeration or a closed form) and its derivatives.

    Args:
        estimator: a registry name, an estimator instance, class, or factory ``make(plate)``.
        orders: derivative orders to test; default 0..min(max_order, 3), or only 0 (the forward
            value) for an estimator declared ``biased``.
        models: the models to run; default the kit's models whose distributions it supports.
        options: constructor options for a name or class (default ``n_samples=2`` if accepted).
        n_replicates: independent estimates per model (>= 2000 recommended).
        seed: seed of the first model (model i uses ``seed + i``); the global RNG is restored.
        threshold: the largest accepted |z| per component.
        raise_on_failure: raise ``AssertionError`` with the report's table when a test fails; False: return
            the report, with an exception the estimator raised on a model recorded in ``errors`` (``ok`` False).
        warmup: training steps (``storch.backward()``, so ``update_parameters`` runs) of each model
            at its θ before the test, with the same estimator instances the test then uses, so
            that learned baselines and control variates are tested trained, not at their initial
            weights. Each step holds ``warmup_replicates`` copies of θ on a data plate.
        warmup_replicates: copies of θ per warm-up step.

    Returns:
        a :class:`ConformanceReport`.

    Example:
        >>> def test_my_estimator():
        ...     storch.testing.check_against_enumeration("my_estimator")
    """
    with created_by_design():  # (one estimator per node of every model, made anew by design: not warned)
        return _check(estimator, orders, models, options, n_replicates, seed, threshold, raise_on_failure, warmup,
                      warmup_replicates)


class _Recorder:
    """The estimators a factory made, per node (plate) name, and the node made last (whose sampling ran next)."""

    def __init__(self, make: EstimatorFactory) -> None:
        self._make = make
        self.used: dict[str, str] = {}
        self.last: Optional[tuple[str, str]] = None

    def __call__(self, plate: str) -> Estimator:
        est = self._make(plate)
        name = getattr(est, "name", None) or type(est).__name__
        self.used.setdefault(plate, name)
        self.last = (plate, name)
        return est

    def label(self, probe: str) -> str:
        """``probe`` if every node got that estimator, else which estimator ran at which node."""
        if set(self.used.values()) <= {probe}:
            return probe
        by_name: dict[str, list[str]] = {}
        for plate, name in self.used.items():
            by_name.setdefault(name, []).append(plate)
        return "factory (" + "; ".join(f"{name} at {', '.join(plates)}" for name, plates in sorted(by_name.items())) + ")"


def _raised(e: Exception) -> str:
    """A model's entry in ``ConformanceReport.errors`` for an exception raised while it ran."""
    return f"raised {type(e).__name__}: {e}"


def _check(estimator: EstimatorLike, orders: Optional[Sequence[int]], models: Optional[Sequence[Model]],
           options: Optional[dict[str, Any]], n_replicates: int, seed: int, threshold: float, raise_on_failure: bool,
           warmup: int, warmup_replicates: int) -> ConformanceReport:
    start = time.perf_counter()
    make, probe = resolve(estimator, options)
    recorder = _Recorder(make)
    make = recorder
    # the default for a biased estimator is its forward value (order 0), comparable only where it is a
    # sample of p: a model where it hands out relaxed values is skipped, with the reason
    forward_is_a_sample = orders is None and probe.biased
    orders = tuple(sorted(set(orders))) if orders is not None else default_orders(probe)
    if not orders or min(orders) < 0 or max(orders) > 3:
        raise ValueError(f"orders must be a non-empty subset of 0..3, got {orders!r}")
    explicit = models is not None  # a model the test names must run: one that cannot is a failure
    factory = is_factory(estimator)
    models, skipped, errors = models_to_run(probe, models, factory)
    report = ConformanceReport(probe.name or type(probe).__name__, orders, skipped=skipped, errors=errors,
                               biased=bool(probe.biased))
    if models and (factory or (probe.uniform_weights
                               and type(probe).weighting_function is not Estimator.weighting_function)):
        # weights that uniform_weights makes the surrogate drop: for one estimator, once, on the first model it
        # samples; a factory's probe make("probe") need not be the estimator of any node (it may make one per
        # node), so each model is checked at every node (a check keyed on the probe missed a node's estimator)
        for model in models:
            try:
                if _check_uniform_weights(model, make) and not factory:
                    break
            except _DroppedWeights as e:  # (the check's own finding: a failure of the check, reported as the others)
                if raise_on_failure:
                    raise
                report.errors[model.name] = f"{_DROPPED}{e}"
                if not factory:
                    break
            except Exception:  # noqa: BLE001  (the estimator raised building this model: its own run below records
                if raise_on_failure:  # it with raise_on_failure=False; review p-docs7)
                    raise
                continue
    for i, model in enumerate(models):
        if report.errors.get(model.name, "").startswith(_DROPPED):
            continue  # (its estimates would miss the dropped weights: the finding says why it fails)
        if model.hint and (model.hint_applies is None or model.hint_applies(probe)):
            report.hints[model.name] = model.hint
        tested = orders
        while tested:
            try:
                report.checks += _run_model(model, make, tested, n_replicates, seed + i, threshold, warmup,
                                            warmup_replicates, forward_is_a_sample)
            except UnsupportedDistributionError as e:  # refused when sampling, not by its class attributes
                at = f" by {recorder.last[1]} at node {recorder.last[0]!r}" if recorder.last else ""
                (report.errors if explicit and not model.may_refuse else report.skipped)[model.name] = (
                    f"refused while sampling{at}: {e}")
            except _NotComparable as e:
                report.skipped[model.name] = str(e)
            except OrderError as e:
                if model.may_refuse:
                    # a refused order (a score function at a kink of log p): test the lower ones
                    report.skipped[f"{model.name}, order {max(tested)}"] = f"refused: {e}"
                    tested = tuple(o for o in tested if o < max(tested))
                    continue
                if raise_on_failure:
                    raise
                report.errors[model.name] = _raised(e)
            except Exception as e:  # noqa: BLE001  (the estimator failed on this model: a failure of the check)
                if raise_on_failure:
                    raise
                report.errors[model.name] = _raised(e)
            break
    report.seconds = time.perf_counter() - start
    report.estimator = recorder.label(report.estimator)
    if not report.checks and not (report.errors and not raise_on_failure):
        relaxed = any("relaxed" in why for why in report.skipped.values())
        raise AssertionError(
            (f"{report.estimator}: declared biased, and on every model it supports its forward value is not a "
             "sample of p, so the kit has nothing to compare with exact values; pass orders=(0, ...) to "
             "measure its distance from them (e.g. its bias as the temperature goes to 0)\n" if relaxed else
             f"{report.estimator}: none of the models ran: each uses a distribution that an estimator of it does "
             "not support (see below); pass models=[...] that it supports\n")
            + report.table()
        )
    if raise_on_failure:
        report.raise_if_failed("does not match the exact values" + (
            ", as an estimator declared biased need not (see the table's second row)" if report.biased else ""))
    return report
