"""The estimates of a graph's costs (detached; for logging and statistics): ``cost_estimates``, ``estimate``.

A cost is reduced as the surrogate (paper, Eq. 2) reduces it: over each sampling plate by the weights of the
node that owns it (1/N for uniform ones), over the data plates by the mean. A cost added with ``credit=False``
enters the surrogate so reduced too, with its graph (``_plain_surrogate``).
"""

from __future__ import annotations

from typing import Optional

import torch

from ..runtime.eager import eager_only
from ..graph import Graph, current_graph
from ..graph.node import Node
from ..plates.tensor import PlateTensor, align, plates_of, raw_of
from .terms import _at_cost, cost_nodes


@eager_only
def cost_estimates(graph: Optional[Graph] = None) -> dict[str, torch.Tensor]:
    """The estimate of the expectation of each cost, by name (detached; for logging).

    Each cost is reduced as the surrogate reduces it: sampling plates by their estimators'
    weights, data plates by the mean. This is the number a user computes by averaging the samples
    of plain Monte Carlo, and the right one where the plate holds entries that are not samples of
    p: the greedy entry of ``score(baseline="greedy")`` (weight 0), the memory slots and rejected
    samples of ``sum_and_sample``, the weight-0 padding of ``unordered_set`` when the support is
    smaller than k, and the weighted sets of ``expect`` and ``unordered_set``. Averaging a cost's
    sample dimension by hand counts those entries as samples. The values are the estimates of the costs,
    not a decomposition of the surrogate: they sum to the surrogate's forward value only where every
    control variate's forward value is 0 (a baseline enters as (1 - MagicBox(l)) b, whose value is 0); a
    control variate that is 0 in expectation only (its value at the samples is not: a learned or relaxed
    control variate, such as RELAX's c(z) - c(z̃) terms) adds to the surrogate's value, not to these.

    The expectation is the one over the values the nodes hand the cost: where a node hands out relaxed
    samples (``gumbel_softmax``; under ``torch.no_grad()`` too) it is the relaxed objective E_z[f(z)], not
    E_b[f(b)] (Bernoulli(logits=0), τ = 1, f = (b − 0.5)²: 0.083 against the exact 0.25 over 20000 samples).
    To evaluate a model, sample discrete values in the evaluation step (``score``, or ``expect`` for small
    supports), or in plain torch outside storch, as the validation −ELBO of the README's demo does
    (docs/estimators/gumbel_softmax.md).
    """
    graph = graph or current_graph()
    out: dict[str, torch.Tensor] = {}
    for name, cost in graph.costs:
        value = _estimate(graph, cost).reshape(())
        out[name] = out[name] + value if name in out else value
    graph.costs_read = len(graph.costs)  # (an evaluation step read: Graph._ends_evaluation)
    return out


@eager_only
def estimate(x: torch.Tensor, graph: Optional[Graph] = None) -> torch.Tensor:
    """The estimate of E[x] for a plate tensor ``x`` of any per-sample shape (detached; a plain tensor).

    ``x`` is reduced as :func:`cost_estimates` reduces a cost: over the sampling plates by their
    estimators' weights, over the data plates by the mean, leaving ``x``'s per-sample shape (``x.shape``).
    A statistic of the samples kept across steps (a VQ-VAE's EMA codebook counts ``E[one_hot(z)]``, a
    running mean) needs it: ``z.tensor.mean(0)`` is right for estimators with uniform weights (``score``,
    ``gumbel_softmax``, reparameterization) and silently wrong for the rest: the weighted set of
    ``unordered_set`` and ``expect`` (with the weight-0 padding where the support is smaller than the set),
    the memory slots and rejected samples of ``sum_and_sample``, the greedy entry of
    ``score(baseline="greedy")`` (weight 0). A plain tensor (no plates) is returned as it is. Under a
    ``gumbel_softmax`` node ``x`` is computed from relaxed samples: the estimate is of E_z[x(z)], not E_b[x(b)]
    (see :func:`cost_estimates`).

    Raises:
        PlateError: ``x`` has a plate that is not part of ``graph`` (the current graph by default): a
            tensor of an earlier step or of another graph.
    """
    if type(x) is not PlateTensor:
        return x
    graph = graph or current_graph()
    if not graph.owns(x._plates):
        graph.check_plates(x._plates, "storch.estimate's tensor")
    return _estimate(graph, x, x._raw.dim() - len(x._plates))


def _estimate(graph: Graph, x, event: int = 0) -> torch.Tensor:
    """``x`` (a cost, or a plate tensor with ``event`` per-sample dims) reduced over its plates: the sampling
    plates by the weights of the nodes that own them, the data plates by the mean (detached)."""
    # the partition views (cumulative L_t) and weights that _at_cost builds are cached on the nodes for
    # the surrogate: built with grad, also when this is called under torch.no_grad() (built without,
    # they cut the loss of a later storch.backward() off from autograd; found by porting a TSP policy)
    with torch.enable_grad():
        plates, raw, nodes = _at_cost(plates_of(x), raw_of(x), cost_nodes(graph, x))
    with torch.no_grad():
        return _weighted_mean(plates, raw.detach(), nodes, event)


def _plain_surrogate(cost, nodes: list[Node]) -> torch.Tensor:
    """A cost added with ``credit=False``: no MagicBox, no control variate; reduced as
    :func:`cost_estimates` reduces a cost, but with the cost's graph."""
    return _weighted_mean(*_at_cost(plates_of(cost), raw_of(cost), nodes))


def _weighted_mean(plates: tuple, inner: torch.Tensor, nodes: list[Node], event: int = 0) -> torch.Tensor:
    """``inner`` (leading dims ``plates``) reduced over the nodes' sampling plates by their weights
    (detached: not differentiated; 1/N as a mean for uniform ones), then the mean over what is left;
    ``event`` > 0: ``inner`` has that many per-sample dims after the plates, which are kept."""
    for node in reversed(nodes):
        dim = plates.index(node.plate)
        if node.estimator.uniform_weights:
            inner = inner.mean(dim, keepdim=True)
        else:
            inner = (align(node.weight_values.detach(), node.plates, plates, pad_to=event) * inner).sum(
                dim, keepdim=True)
    if event:
        return inner.mean(tuple(range(len(plates)))) if plates else inner
    return inner.mean() if inner.dim() else inner
