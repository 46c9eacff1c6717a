"""The estimates of a graph's costs (detached; for logging and statistics): ``cost_estimates``, ``estimate``; and
``padding``, the entries of a sample's plate that the estimate leaves out as its estimator's padding.

A cost is reduced as the surrogate (paper, Eq. 2) reduces it: over each sampling plate by the weights of the
node that owns it (1/N for uniform ones), over the data plates by the mean. A cost added with ``credit=False``
enters the surrogate so reduced too, with its graph (``_plain_surrogate``). ``keep_data`` keeps data plates
instead of averaging them (per-data-point estimates: ``_kept_names``, ``_per_data_point``); the weights are
the same, so the mean of a per-data-point estimate over its data dims is the full estimate.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional, Union

import torch

from ..runtime.eager import eager_only
from ..graph import Graph, current_graph
from ..errors import PlateError
from ..graph.node import Node, draw_of
from ..plates.tensor import Plate, PlateTensor, align, plates_of, raw_of
from .terms import _at_cost, cost_nodes


KeepData = Union[bool, str, Sequence[str]]
"""``keep_data`` of :func:`estimate` and :func:`cost_estimates`: ``False`` (average every data plate), ``True``
(keep every data plate the tensor carries), a data plate's name, or a sequence of names."""


@eager_only
def cost_estimates(graph: Optional[Graph] = None, *, keep_data: KeepData = False) -> dict[str, torch.Tensor]:
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

    ``keep_data``: per-data-point estimates (a per-example ELBO), as :func:`estimate`'s ``keep_data``; each value
    then has one dim per kept data plate. With ``True``, costs of one name must carry the same data plates
    (name the plates to give them one shape: a cost that lacks one is constant along it).

    Raises:
        PlateError: ``keep_data`` is not ``True``, ``False``, a data plate's name or a sequence of names; it names
            a plate that is not a data plate of the graph; or (``True``) costs of one name carry different data
            plates.
    """
    graph = graph or current_graph()
    out: dict[str, torch.Tensor] = {}
    if keep_data is not False:
        return _cost_estimates_per_data_point(graph, keep_data)
    for name, cost in graph.costs:
        value = _estimate(graph, cost).reshape(())
        out[name] = out[name] + value if name in out else value
    graph.costs_read = len(graph.costs)  # (an evaluation step read: Graph._ends_evaluation)
    return out


@eager_only
def estimate(x: torch.Tensor, graph: Optional[Graph] = None, *, keep_data: KeepData = False) -> torch.Tensor:
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

    ``keep_data`` gives an estimate per data point (a posterior predictive p(y | x_i) per test point, a
    per-example bound): the sampling plates are reduced by the same weights, but the kept data plates are not
    averaged. ``True`` keeps every data plate ``x`` carries, in the order of their ``storch.denote_independent``
    calls (documents, then the words nested in them); a name or a sequence of names keeps those, in that
    order, and averages the others; a named plate that ``x`` does not carry (``x`` does not depend on it) is
    a dim along which the estimate is constant. The result's shape is the kept plates' sizes, then
    ``x.shape``; its mean over those dims is ``estimate(x)``. A tensor under no data plate keeps none.

    Raises:
        PlateError: ``x`` has a plate that is not part of ``graph`` (the current graph by default): a
            tensor of an earlier step or of another graph; ``keep_data`` is not ``True``, ``False``, a data
            plate's name or a sequence of names, or names a plate that is not a data plate of the graph.
    """
    if type(x) is not PlateTensor:
        if keep_data is False:
            return x
        graph = graph or current_graph()
        return _per_data_point(graph, x, _kept_names(graph, (), keep_data, "storch.estimate"), x.dim())
    graph = graph or current_graph()
    if not graph.owns(x._plates):
        graph.check_plates(x._plates, "storch.estimate's tensor")
    if keep_data is not False:
        names = _kept_names(graph, x._plates, keep_data, "storch.estimate")
        return _per_data_point(graph, x, names, x._raw.dim() - len(x._plates))
    return _estimate(graph, x, x._raw.dim() - len(x._plates))


@eager_only
def padding(sample: torch.Tensor, graph: Optional[Graph] = None) -> PlateTensor:
    """Which entries of a sample's plate are the estimator's padding: a bool plate tensor on the node's plates.

    Where an entry of the parents (a data point) has fewer possible values than the plate has entries (a
    ``-inf`` mask, sequences that end early with ``eos``), ``unordered_set``, ``expect`` and ``sum_and_sample``
    (its memory, and its buffer's unused slots with ``buffer=``) fill the rest of the plate with repeats of a
    possible value, at weight 0 and l = 0 (:meth:`storch.Estimator.padding`). Storch's estimates leave them out;
    a loss of the whole set written by the user (minimum risk training's Q ∝ p^α renormalised over the plate,
    a ranking loss, a normaliser of its own) counts them twice unless it masks them:
    ``torch.where(storch.padding(x), float("-inf"), alpha * log_p)``. ``importance`` pads the entries whose draw
    of q it replaced by a value p can produce (weight 0); ``mvd`` its inactive slots (a Categorical's p⁺_k = δ_k at
    p_k = 0: a stand-in at weight 0). False everywhere for an estimator that
    does not pad (``score``, the relaxations, ...). Entries that are drawn but get weight 0 (``sum_and_sample``'s
    rejected samples) are not padding.

    For a partition (one estimator called at every step of a sequence), any step's value names it and the
    result is that of the whole sequences as the last step so far left them (plates of that step): call it
    after the loop.

    Args:
        sample: a value an estimator returned, ``est(distribution)``, as returned (not a tensor computed from it).
        graph: the graph it belongs to (default: the current one).

    Raises:
        PlateError: ``sample`` is not a value an estimator of ``graph`` returned (a tensor computed from one, a
            plain tensor, a sample of another graph, or of one already ended by ``storch.backward()``: call it
            before); the estimator's ``padding()`` returned a tensor that is not bool or not of the plates' shape.
    """
    graph = graph or current_graph()
    node = _node_of(graph, sample) if type(sample) is PlateTensor else None
    if node is None:
        if type(sample) is PlateTensor and not graph.owns(sample._plates):
            graph.check_plates(sample._plates, "storch.padding's sample")  # (an ended graph: call it before backward)
        raise PlateError(_not_a_sample_message(sample))
    mask = node.estimator.padding(node)
    shape = tuple(p.size for p in node.plates)
    if mask is None:
        mask = torch.zeros((), dtype=torch.bool, device=node.sample.device)
    elif not isinstance(mask, torch.Tensor) or mask.dtype is not torch.bool:
        got = f"dtype {mask.dtype}" if isinstance(mask, torch.Tensor) else f"a {type(mask).__name__}"
        raise PlateError(f"estimator {node.estimator.name!r} (plate {node.plate.name!r}): padding() must return a "
                         f"bool tensor (True on padding) or None, got {got}")
    # leading dims are the plates (as a gradient function's: (N, *parents), trailing size-1 dims added), not
    # torch's trailing broadcast, which would read an (N,) mask as one over the last parent plate
    elif mask.dim() > len(shape) or any(m not in (1, s) for m, s in zip(mask.shape, shape)):
        raise PlateError(f"estimator {node.estimator.name!r} (plate {node.plate.name!r}): padding() must return a "
                         f"bool tensor of shape (plates' sizes) {shape}, or leading dims of it with size-1 dims "
                         f"where constant, one value per entry of the plates; got shape {tuple(mask.shape)}")
    mask = mask.reshape(mask.shape + (1,) * (len(shape) - mask.dim()))
    return PlateTensor._wrap(mask.detach().expand(shape), node.plates)


def _node_of(graph: Graph, sample: PlateTensor) -> Optional[Node]:
    """The node of ``graph`` that handed out ``sample`` (at any step of a partition), ``None`` if none did."""
    found = draw_of(graph.nodes, sample)
    return found[0] if found is not None else None


def _not_a_sample_message(x) -> str:
    what = (f"a plate tensor with plates {tuple(p.name for p in x.plates)} that no estimator of this graph returned "
            "(a tensor computed from a sample, or a sample of an earlier step or of another graph)"
            if type(x) is PlateTensor else f"a {type(x).__name__}, not a plate tensor")
    return (f"storch.padding takes a sample, the value an estimator returned (z = est(distribution)), as it was "
            f"returned; got {what}. Pass the sample itself, inside the graph that drew it: "
            "storch.padding(z), then mask the tensors computed from it with the result")


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


def _weighted_mean(plates: tuple, inner: torch.Tensor, nodes: list[Node], event: int = 0,
                   data: bool = False) -> torch.Tensor:
    """``inner`` (leading dims ``plates``) reduced over the nodes' sampling plates by their weights
    (detached: not differentiated; 1/N as a mean for uniform ones), then the mean over what is left;
    ``event`` > 0: ``inner`` has that many per-sample dims after the plates, which are kept. ``data``: the
    mean is not taken (every plate's dim stays, the sampling plates' of size 1: :func:`_per_data_point`
    keeps data plates; a keyword, not a second function, so the default path makes no extra call)."""
    for node in reversed(nodes):
        dim = plates.index(node.plate)
        if node.estimator.uniform_weights:
            inner = inner.mean(dim, keepdim=True)
        else:
            inner = (align(node.weight_values.detach(), node.plates, plates, pad_to=event) * inner).sum(
                dim, keepdim=True)
    if data:
        return inner
    if event:
        return inner.mean(tuple(range(len(plates)))) if plates else inner
    return inner.mean() if inner.dim() else inner


def _data_plates(graph: Graph) -> list[str]:
    """The graph's data plates, in the order of their ``denote_independent`` calls."""
    return [name for name, owner in graph.plates.items() if type(owner) is Plate and owner.independent]


def _kept_names(graph: Graph, plates: tuple, keep_data, what: str) -> tuple[str, ...]:
    """The data plates ``keep_data`` keeps of a tensor with ``plates``, checked against the graph."""
    data = _data_plates(graph)
    if keep_data is True:
        carried = {p.name for p in plates}
        return tuple(name for name in data if name in carried)
    names = (keep_data,) if isinstance(keep_data, str) else keep_data
    usage = (f"{what}: keep_data takes True (every data plate the tensor carries), False (the mean over them), "
             "a data plate's name or a sequence of names")
    if not isinstance(names, (tuple, list)) or not all(isinstance(n, str) for n in names):
        raise PlateError(f"{usage}; got {keep_data!r}")
    if len(set(names)) != len(names):
        raise PlateError(f"{usage}; got {keep_data!r}, which names a plate twice")
    for name in names:
        if name not in data:
            kind = ("the sample plate of a stochastic node (reduced by its estimator's weights, never kept)"
                    if name in graph.plates else "not a plate of the graph")
            raise PlateError(f"{usage}; {name!r} is {kind}. The graph's data plates (storch.denote_independent) "
                             f"are {tuple(data)}")
    return tuple(names)


def _per_data_point(graph: Graph, x, names: tuple[str, ...], event: int) -> torch.Tensor:
    """``x`` reduced as :func:`_estimate` reduces it, but with the data plates ``names`` kept: leading dims in
    that order (expanded to the plates' sizes where ``x`` is constant along them), then the ``event`` dims."""
    nodes = cost_nodes(graph, x) if type(x) is PlateTensor else []
    with torch.enable_grad():  # (as _estimate: the cached partition views are built with grad)
        plates, raw, nodes = _at_cost(plates_of(x), raw_of(x), nodes)
    with torch.no_grad():
        inner = _weighted_mean(plates, raw.detach(), nodes, event, data=True)
        where = {p.name: i for i, p in enumerate(plates)}
        kept = [where[n] for n in names if n in where]
        other = [i for i in range(len(plates)) if i not in kept]
        if other:  # (the sampling plates are size 1 by now; the data plates not kept: their mean)
            inner = inner.mean(other, keepdim=True)
        inner = inner.permute(kept + other + list(range(len(plates), inner.dim())))
        inner = inner.reshape(inner.shape[:len(kept)] + inner.shape[len(plates):])
        for i, name in enumerate(names):
            if name not in where:  # x is the same for every entry of it
                inner = inner.unsqueeze(i)
        sizes = tuple(graph.plates[n].size for n in names)
        return inner.expand(sizes + inner.shape[len(names):]).contiguous()


def _cost_estimates_per_data_point(graph: Graph, keep_data) -> dict[str, torch.Tensor]:
    """:func:`cost_estimates` with ``keep_data``: each cost per data point, the costs of one name summed."""
    out: dict[str, torch.Tensor] = {}
    kept: dict[str, tuple[str, ...]] = {}
    for name, cost in graph.costs:
        names = _kept_names(graph, plates_of(cost), keep_data, "storch.cost_estimates")
        value = _per_data_point(graph, cost, names, raw_of(cost).dim() - len(plates_of(cost)))
        value = value.reshape(value.shape[:len(names)])  # (a cost is one number per sample)
        if name in out:
            if kept[name] != names:
                raise PlateError(
                    f"storch.cost_estimates(keep_data=True): the costs named {name!r} carry different data plates, "
                    f"{kept[name]} and {names}; name the plates to keep (keep_data={tuple(_data_plates(graph))!r}: "
                    "a cost is constant along a plate it does not carry) or give the costs different names")
            value = out[name] + value
        out[name], kept[name] = value, names
    graph.costs_read = len(graph.costs)  # (an evaluation step read: Graph._ends_evaluation)
    return out
