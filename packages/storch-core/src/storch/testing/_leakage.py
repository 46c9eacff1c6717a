"""``check_leakage``: replicates as separate graphs, so that a baseline which sees other samples is caught.

:func:`check_against_enumeration` puts R replicates in ONE graph (a plate), which is fast, but a
control variate sees the whole cost frame: a baseline that averages over the frame, its own
sample included (``cost.tensor.mean()``), mixes R·n costs and its own share is 1/(R·n), too small
to bias the test. In real use the frame is one minibatch and the same baseline is clearly biased.
Here every replicate is its own graph holding a small data plate (``data`` copies of θ, like a
minibatch), and the graph's estimate (the mean over its copies) is one independent draw.
"""

from __future__ import annotations

import time
from typing import Any, Optional, Sequence, Union, overload

import torch

from ..errors import UnsupportedDistributionError
from ..estimators.base import Estimator
from ..graph import Graph, current_graph
from ..registry import created_by_design
from ..surrogate.loss import unchecked_surrogate_loss
from ._enumeration import ConformanceReport, _Recorder, exact_derivatives
from ._models import EstimatorFactory, Model, models_to_run
from ._resolve import EstimatorLike, default_orders, is_factory, resolve
from ._stats import _grad, replicate, z_test
from ._warmup import persistent, warm_up

__all__ = ["check_leakage"]


def _graph_estimate(model: Model, make: EstimatorFactory, data: int, top: int) -> list[torch.Tensor]:
    """One graph with ``data`` copies of θ: its estimate and derivatives w.r.t. θ (orders 0..top)."""
    with Graph():
        leaf, theta = replicate(model.theta, data)
        model.build(make, theta)
        loss = unchecked_surrogate_loss(top, current_graph())
        out = [loss.detach().reshape(1)]
        if top >= 1:
            # d/dθ of L(θ, ..., θ) = Σ_copies ∂L/∂leaf[c]: the mean of the copies' gradient estimates
            g = _grad(loss, leaf, create_graph=top > 1).sum(0).reshape(-1)
            out.append(g.detach())
            if top >= 2:
                d = g.shape[0]
                out.append(torch.stack([_grad(g[i], leaf, top > 2).sum(0).reshape(-1) for i in range(d)]).detach())
    return out


# Overloads, so that a type checker infers a factory's parameter (as for check_against_enumeration).
@overload
def check_leakage(
    estimator: EstimatorFactory, *, orders: Optional[Sequence[int]] = ..., models: Optional[Sequence[Model]] = ...,
    options: None = ..., n_graphs: int = ..., data: int = ..., seed: int = ..., threshold: float = ...,
    raise_on_failure: bool = ..., warmup: int = ..., warmup_replicates: int = ...,
) -> ConformanceReport: ...


@overload
def check_leakage(
    estimator: Estimator, *, orders: Optional[Sequence[int]] = ..., models: Optional[Sequence[Model]] = ...,
    options: None = ..., n_graphs: int = ..., data: int = ..., seed: int = ..., threshold: float = ...,
    raise_on_failure: bool = ..., warmup: int = ..., warmup_replicates: int = ...,
) -> ConformanceReport: ...


@overload
def check_leakage(
    estimator: Union[str, type[Estimator]], *, orders: Optional[Sequence[int]] = ...,
    models: Optional[Sequence[Model]] = ..., options: Optional[dict[str, Any]] = ..., n_graphs: int = ...,
    data: int = ..., seed: int = ..., threshold: float = ..., raise_on_failure: bool = ..., warmup: int = ...,
    warmup_replicates: int = ...,
) -> ConformanceReport: ...


def check_leakage(
    estimator: EstimatorLike,
    *,
    orders: Optional[Sequence[int]] = None,
    models: Optional[Sequence[Model]] = None,
    options: Optional[dict[str, Any]] = None,
    n_graphs: int = 1000,
    data: int = 2,
    seed: int = 0,
    threshold: float = 4.0,
    raise_on_failure: bool = True,
    warmup: int = 0,
    warmup_replicates: int = 64,
) -> ConformanceReport:
    """z-test estimates from ``n_graphs`` separate graphs, each with a data plate of ``data`` copies.

    Catches what one batched graph cannot: a baseline or control variate that uses other entries
    of its cost frame in a way that is biased (its own sample's cost, a data point's own cost
    through a batch mean). Slower than :func:`check_against_enumeration` (one graph per estimate),
    so it defaults to fewer estimates and orders 0..min(max_order, 1).

    Args:
        estimator: a registry name, an estimator instance, class, or factory ``make(plate)``.
        orders: derivative orders to test (at most 2); default 0..min(max_order, 1) (0 if biased).
        models: the models to run; default the kit's models the estimator supports.
        options: constructor options for a name or class (default ``n_samples=2`` if accepted).
        n_graphs: independent graphs (estimates) per model.
        data: size of each graph's data plate (> 1: the minibatch a leaking baseline averages over).
        seed: seed of the first model (model i uses ``seed + i``); the global RNG is restored.
        threshold: the largest accepted |z| per component.
        raise_on_failure: raise ``AssertionError`` with the report's table when a test fails.
        warmup: training steps through ``storch.backward()`` before the test (see
            :func:`check_against_enumeration`).
        warmup_replicates: copies of θ per warm-up step.
    """
    with created_by_design():  # (estimators made anew by design: not counted as made in every training step)
        if data < 2:
            raise ValueError(f"data must be >= 2 (a data plate a leaking baseline can average over), got {data}")
        start = time.perf_counter()
        make, probe = resolve(estimator, options)
        recorder = _Recorder(make)
        make = recorder
        if orders is None:
            orders = tuple(o for o in default_orders(probe) if o <= 1)
        orders = tuple(sorted(set(orders)))
        if not orders or min(orders) < 0 or max(orders) > 2:
            raise ValueError(f"orders must be a non-empty subset of 0..2, got {orders!r}")
        explicit = models is not None  # a model the test names must run: one that cannot is a failure
        models, skipped, errors = models_to_run(probe, models, is_factory(estimator))
        report = ConformanceReport(probe.name or type(probe).__name__, orders, skipped=skipped, errors=errors)
        top = max(orders)
        for i, model in enumerate(models):
            make_once = persistent(make)
            try:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(seed + i)
                    warm_up(model, make_once, warmup, warmup_replicates)
                    draws = [_graph_estimate(model, make_once, data, top) for _ in range(n_graphs)]
            except UnsupportedDistributionError as e:
                at = f" by {recorder.last[1]} at node {recorder.last[0]!r}" if recorder.last else ""
                (report.errors if explicit and not model.may_refuse else report.skipped)[model.name] = (
                    f"refused while sampling{at}: {e}")
                continue
            exact = exact_derivatives(model.exact, model.theta, top)
            for m in orders:
                estimates = torch.stack([d[m] for d in draws]).reshape((n_graphs,) + exact[m].shape)
                report.checks.append(z_test(estimates, exact[m], f"{model.name}, order {m}", threshold))
        report.seconds = time.perf_counter() - start
        report.estimator = recorder.label(report.estimator) + " (separate graphs)"
        if not report.checks:
            raise AssertionError(f"{report.estimator}: no model could run; pass models=[...]\n" + report.table())
        if raise_on_failure:
            report.raise_if_failed("is biased when replicates are separate graphs")
        return report
