"""A non-finite loss is refused before anything is backpropagated or any estimator state changes
(:class:`storch.NonFiniteCostError`, naming the costs or the estimators whose values are not finite)."""

from __future__ import annotations

import math

import torch

from ..errors import NonFiniteCostError
from ..graph import Graph
from ..plates.tensor import raw_of


def _check_finite(loss: torch.Tensor, graph: Graph) -> None:
    """Raise NonFiniteCostError naming the non-finite costs (one check of the total; the costs only if it fails)."""
    if loss.is_meta or math.isfinite(loss.item()):  # item(): ~0.2 us, torch.isfinite ~4 us; not .device (~5 us)
        return
    bad = [name for name, cost in graph.costs if not bool(torch.isfinite(raw_of(cost).detach()).all())]
    after = ("nothing was backpropagated, estimator state (moving averages, learned control variates) is "
             "unchanged and the step is discarded. ")
    if bad:
        raise NonFiniteCostError(
            f"cost {', '.join(repr(b) for b in bad)} is not finite (NaN or inf), so its gradient would be too: "
            f"{after}Find where the non-finite value comes from (e.g. log(0), NaN parameters, a diverging "
            "learning rate), or catch storch.NonFiniteCostError to skip the batch")
    names = sorted({f"{n.estimator.name!r} (plate {n.plate.name!r})" for n in graph.nodes})
    raise NonFiniteCostError(
        f"the surrogate loss is not finite although every cost is: the weights or gradient-function values of "
        f"an estimator are (estimators in this graph: {', '.join(names) or 'none'}; e.g. log p(x) = -inf, or "
        f"diverged parameters; a tanh-squashed distribution whose sample saturated at ±1, where "
        f"TanhTransform's inverse is infinite: use TanhTransform(cache_size=1) so log_prob reuses the "
        f"pre-tanh sample){_infinite_logits_hint(graph)}: {after}Catch storch.NonFiniteCostError to skip the batch")


def _infinite_logits_hint(graph: Graph) -> str:
    """For :func:`_check_finite`'s message (error path only): the nodes whose Bernoulli / Binomial has infinite
    logits, where torch's log_prob is NaN (inf - inf) for the value the bit always takes."""
    found = []
    for n in graph.nodes:
        d = n.original if n.original is not None else n.distribution
        while isinstance(d, (torch.distributions.Independent, torch.distributions.TransformedDistribution)):
            d = d.base_dist
        logits = d.__dict__.get("logits") if isinstance(d, (torch.distributions.Bernoulli,
                                                            torch.distributions.Binomial)) else None
        if isinstance(logits, torch.Tensor) and bool(torch.isinf(raw_of(logits).detach()).any()):
            found.append(f"{n.estimator.name!r} (plate {n.plate.name!r}, a {type(d).__name__})")
    if not found:
        return ""
    return (f". Infinite logits (a masked or certain bit) at {', '.join(found)}, "
            "where torch's log_prob is NaN (inf - inf) for the value the bit always takes: use a large finite "
            "logit (±30) for a masked bit, or an estimator that handles infinite logits (expect, unordered_set, "
            "sum_and_sample, spsa, go)")
