"""The surrogate loss (paper, Eq. 2) of a graph: ``surrogate_loss``, its value alone, the costs' estimates.

``_surrogate_loss`` checks each cost's nodes (:mod:`.order`, :mod:`.pathwise`) and the samples (drawn with
gradient, not changed in place, each reaching a cost), then sums the costs' terms: stacked per partition
(:mod:`.steps`), one by one (:mod:`.terms`), or as written (``credit=False``); ``surrogate_loss`` adds the
estimators' updates on backward (:mod:`.updates`).
"""

from __future__ import annotations

import math
import warnings
from typing import Optional

import torch

from .._ranks import _skips_synced_update
from .._stacklevel import user_stacklevel
from ..cost import magic_box
from ..eager import eager_only, mark_eager_only, set_eval_frame
from ..errors import StorchError, UnusedSampleWarning
from ..estimators.watch import is_pathwise
from ..graph import Graph, _stack, current_graph, tracing_recorder
from ..node import Node
from ..plates.tensor import PlateTensor, align, plates_of, raw_of
from ..score_conditions import KINK_FREE
from .finite import _is_wrapped, refuse_on_backward
from .order import _check_order, _guard_low_order
from .pathwise import _REACH_KEY, _check_compared, _check_integer_reads, _check_reaches, _check_smooth
from .refusals import _PENDING, _check_mixed, _keep_counted
from .steps import _step_group, _steps_surrogate
from .terms import _ensure_weights, _grouped_terms, _one_node_surrogate, _Sums, _at_cost, _cost_surrogate, cost_nodes
from .updates import _updates_on_backward


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


@mark_eager_only
def surrogate_loss(order: int = 1, graph: Optional[Graph] = None) -> torch.Tensor:
    """The surrogate loss of the current graph (paper, Eq. 2).

    Its value is the estimate of the expected total cost; differentiating it ``order`` times
    gives unbiased estimates of the ``order``-th derivative (Theorem 1) for every estimator whose
    ``max_order`` >= ``order``.

    ``order=0`` is the value alone: the same estimate of the expected total cost, returned detached (no
    ``grad_fn``; like :func:`cost_estimates`, whose values it sums), because storch checks nothing a
    derivative needs at order 0 (the jumps and kinks on a pathwise path, the estimators unbiased only at
    order 1), so a derivative of it would not be guaranteed unbiased. Its ``.backward()`` raises torch's
    "does not require grad"; for a gradient build order 1 (the default) or higher.

    ``surrogate_loss().backward()`` leaves the estimators as ``storch.backward()`` does: when the
    backward pass accumulates gradients (``.backward()``, not ``torch.autograd.grad``, which stays an
    evaluation pass), the estimators' ``update_parameters`` run once, after the pass (moving
    averages, sum-and-sample's buffer, annealing steps). Once per step: the step's surrogates share one
    record, so a pass that reaches several of them (``(main + 0 * storch.surrogate_loss()).backward()``, an
    order-1 and an order-2 surrogate) updates once, and a later pass of the step (a second ``.backward()``
    with ``retain_graph=True``, of this or another of its surrogates, or ``storch.backward()``) accumulates
    its gradients again but updates nothing: estimator state advances one step per training step. An
    estimator whose update differentiates the loss again (a learned control variate: RELAX, LAX, REBAR) is refused there, before any gradient
    is accumulated, with the advice to call ``storch.backward()`` (reached through the surrogate's gradient, by
    the backward of a gradient penalty or a later step's ``storch.backward()`` through MAML's adapted parameters:
    refused too, with the advice ``update=False``). Unlike ``storch.backward()``, the
    graph is not reset. A second-order training objective built from ``g = torch.autograd.grad(loss,
    params, create_graph=True)`` (a gradient penalty, a MAML outer step through ``params - lr * g``) runs
    the updates too when it is backpropagated with ``.backward()``: the loss is ``loss + loss · probe`` with a
    zero leaf ``probe`` (one node; the same value and derivatives), and ``g = ∂loss + probe ∂loss`` holds it.

    Built inside ``torch.func.vmap`` (an ensemble: ``vmap(step, randomness="different")(params).sum()
    .backward()``, or ``stack_module_state`` + ``functional_call``), the surrogate's ``.backward()`` outside
    vmap raises ``StorchError`` when an estimator of the step would update its state (before any gradient is
    accumulated): the step's values are batched over the members, and one estimator's state would mix them.
    Estimators without state (``score`` with ``baseline='leave_one_out'`` or none, ``update=False``) train
    under vmap; ``torch.autograd.grad`` (and ``torch.func.grad``) of a vmapped surrogate, which never updates, is
    not refused. ``storch.backward()`` inside vmap raises ``StorchError`` (no backward pass runs inside vmap).

    A node that no cost is downstream of (no cost carries its plate) and whose gradient function or
    weights carry gradient gets a :class:`storch.UnusedSampleWarning`: its parameters get no gradient
    from it, typically because a cost was computed from its samples outside storch's plates
    (``z.tensor``).

    The order-1 surrogate is the any-order form of Eq. 2: differentiated twice (``torch.autograd.grad``
    with ``create_graph=True``, ``torch.autograd.functional.hessian`` / ``hvp``) it gives unbiased
    higher derivatives for the estimators whose ``max_order`` allows them (score, expect, importance,
    RELAX, ...). Where a node is unbiased only at order 1 (ARM, DisARM, GO, MVD, SPSA, the unordered
    set with its baseline), a pathwise node's cost has a kink on the path from its sample (ReLU,
    abs, max; REBAR's, RELAX's and LAX's control variates likewise, their cost at the relaxed sample and
    their network), or a score-function node's log p has a kink in its learned parameters (Laplace's
    |x - loc|), the backward pass with ``create_graph=True`` through its term raises ``OrderError``
    (torch.func: two nested differentiating transforms raise it when the surrogate is built, and so does
    one (``torch.func.jvp``, ``grad``, ``vjp``, ``jacrev``) whose inputs or captured tensors require grad
    outside it: a ``torch.autograd.grad`` / ``.backward`` of its result, the jvp's tangent or the gradient,
    would be a second derivative that no hook sees; pass it detached tensors for a first derivative).
    Under ``torch.func.vmap`` (``randomness="different"``) the tensors under the batching are hooked and
    checked, so a derivative of the vmapped surrogate outside vmap is refused or allowed as eagerly (the
    estimators' updates excepted: see above).

    Forward mode (``torch.func.jvp`` / ``jacfwd``, ``torch.autograd.forward_ad``) of detached primals through a
    pathwise node: there is no autograd graph in which to check its cost for a jump (round, sign, floor: a
    tangent of 0 where the expectation's is not, which reverse mode refuses), so it uses the verdict of an
    earlier step of the same estimator and cost name built with parameters that require grad (outside the
    forward-mode transform), and without one raises ``OrderError``: run one such step first.

    A backward pass that reaches a loss that is not finite (NaN or inf: a cost is, or an estimator's weights or
    log-probabilities are) raises :class:`storch.NonFiniteCostError` naming the costs, as ``storch.backward()``
    does, before it accumulates any gradient of the loss: ``.backward()`` and ``torch.autograd.grad`` alike, whose
    gradients would be NaN. On the CPU the loss's value is read when it is built (a finite one costs nothing
    more); on an accelerator when the pass reaches it (reading it waits for the device, as ``storch.backward()``
    does). Under ``torch.func.vmap`` the batched values are read (an ensemble with a NaN member is refused on
    backward outside vmap); not under ``torch.func.grad`` and the other differentiating transforms.

    Raises:
        OrderError: an estimator upstream of a cost is not unbiased to ``order``. Like every
            error raised during a step, it discards the step (the graph is reset). At order 1,
            raised by the backward pass with ``create_graph=True`` described above.
        StorchError: built with gradients enabled, a cost depends on a node that was sampled under
            ``torch.no_grad()`` from parameters that require grad (its gradient would be missing).
    """
    prior = set_eval_frame(None)  # (eager_only's suspension of dynamo inline: a Python frame fewer per step)
    try:
        graph = graph or _stack()[-1]  # (current_graph() without its call)
        # the commonest step (order 1, one node: _one_node_loss) without the general path's calls around it;
        # storch.compile records the general path's loss and update probe
        if type(order) is int and order == 1 and len(graph.nodes) == 1 and graph.costs and tracing_recorder() is None:
            try:  # what `with graph.guard():` does: an error discards the step
                loss = _one_node_loss(graph)
            except BaseException as e:
                graph.discard(e)
                raise
            if loss is not None:
                graph.loss_built = True
                est = graph.nodes[0].estimator
                if est.has_update or _skips_synced_update(est):  # (_updating / _skipping: the one node's estimator)
                    loss = _updates_on_backward(loss, graph)
                # refuse_on_backward's common case inline (a finite 0-dim loss on the CPU, outside torch.func: nothing
                # to hook), a call fewer per step; anything else goes to it
                if not _is_wrapped(loss) and loss.is_cpu and (loss.is_meta or math.isfinite(loss.item())):
                    return loss
                refuse_on_backward(loss, graph)
                return loss
            loss = _unchecked(order, graph, common=False)  # (not asked again: a pathwise node's step, a partition's)
        else:
            loss = _unchecked(order, graph)
        if tracing_recorder() is None:  # (storch.compile checks its replays' losses itself)
            refuse_on_backward(loss, graph)
        return loss
    finally:
        if prior is not None:
            set_eval_frame(prior)


def unchecked_surrogate_loss(order: int, graph: Graph) -> torch.Tensor:
    """:func:`surrogate_loss` without the check that a backward pass refuses a non-finite loss: for
    storch.testing's kit, whose replicated graph sums R independent estimates into one loss, where one
    replicate's NaN is a failed check of that replicate (an infinite z-score), not an error of the run."""
    return _unchecked(order, graph)


def _unchecked(order: int, graph: Graph, common: bool = True) -> torch.Tensor:
    """:func:`unchecked_surrogate_loss`; ``common=False``: :func:`_one_node_loss` already declined the step."""
    if not isinstance(order, int) or isinstance(order, bool) or order < 0:
        raise StorchError(f"order must be an int >= 0, got {order!r}")  # a bad argument: the step is intact
    if order == 0:
        # detached because no guard of a derivative ran (before, its gradient skipped the order-1 refusals:
        # round(z) gave 0, a ReLU's or ARM's Hessian no OrderError)
        return value_surrogate(graph).detach()
    with graph.guard():
        if order >= 2:
            recorder = tracing_recorder()
            if recorder is not None and not recorder.replay_only:
                raise StorchError(
                    f"surrogate_loss(order={order}) in a step compiled by storch.compile with a compiler backend: "
                    "torch's compiled programs cannot be differentiated twice (inductor says it does not support "
                    "double backward; with aot_eager the second derivative came out unused, None with "
                    "allow_unused=True). Use storch.compile(step, backend=None), whose replay runs the traced "
                    "operations through autograd (every order), or run the step eagerly")
        loss = _surrogate_loss(order, graph, common)
    graph.loss_built = True
    loss = _updates_on_backward(loss, graph)
    if order >= 2:
        _keep_counted(loss)
    recorder = tracing_recorder()
    if recorder is not None:  # storch.compile records the step: a replay checks this output is finite on backward
        recorder.losses.append(loss)
    return loss


def value_surrogate(graph: Graph) -> torch.Tensor:
    """The order-0 surrogate with its autograd graph (``surrogate_loss(order=0)`` detaches it): for
    storch.testing, which differentiates it only in the replicate plate's weights (each replicate's
    estimate: the loss is linear in them), never in the parameters, whose derivatives nothing here guards.
    Built with grad: the partition views and weights it caches on the nodes serve a later surrogate of the
    step, which must keep their graph."""
    with graph.guard():
        loss = _surrogate_loss(0, graph)
    graph.loss_built = True
    return loss


def _surrogate_loss(order: int, graph: Graph, common: bool = True) -> torch.Tensor:
    if common and order == 1 and len(graph.nodes) == 1 and graph.costs:
        loss = _one_node_loss(graph)
        if loss is not None:
            return loss
    if not graph.costs:
        ended = ("" if graph.nodes or graph.last_end is None else
                 f" (its last step was {graph.last_end}: storch.backward() ends the step and resets the graph, "
                 "so call it once per step, after the step's costs)")
        from .._ranks import _announce_no_costs

        # under torch.distributed the other ranks may be in their estimators' collectives: join their check,
        # so that every rank raises instead of theirs waiting forever (nothing in one process)
        others = _announce_no_costs(tuple(n.estimator for n in graph.nodes))
        ranks = ("" if others is None else
                 ". Under torch.distributed every rank must register costs in every step: a rank without them "
                 "cannot take part in the others' estimator updates (nor in DDP's gradient allreduce, where "
                 "the others then wait); pad the episode or the shard instead of skipping it"
                 + (f" (the ranks ran: {others}; every rank raised)" if others else ""))
        raise StorchError(f"the graph has no costs{ended}; call storch.add_cost(...) before the surrogate loss"
                          + ranks)
    pending = _PENDING.mixed
    pending.clear()  # (refusals of an earlier build of this thread that raised)
    per_cost = []
    plain = []  # costs added with credit=False: differentiated as written
    reached = 0
    no_credit = graph.no_credit
    memos: dict = {}  # the smoothness walks' memo, shared by the costs of this surrogate
    # at order 1, the nodes on which the per-cost checks below may act, asked once per node (a chain of M score
    # nodes with a cost per step asked each cost's nodes: M²/2 calls); a cost with none of them skips the checks
    needy = _needy_nodes(graph) if order == 1 else None
    for name, cost in graph.costs:
        nodes = cost_nodes(graph, cost)
        if no_credit and id(cost) in no_credit:
            plain.append((cost, nodes))
            reached += len(nodes)
            continue
        if nodes and needy is not None and (not needy or needy.isdisjoint(map(id, nodes))):
            reached += len(nodes)  # (the checks would do nothing for this cost: see _needy_nodes)
        elif nodes:
            _check_order(nodes, order)
            _check_smooth(name, cost, nodes, order, memos)
            _check_reaches(name, cost, nodes, order)
            _check_integer_reads(name, cost, nodes, order, graph.integer_costs)
            if order >= 2:
                _check_compared(name, nodes, order)
            reached += len(nodes)
        if nodes and raw_of(cost).dtype is torch.float64:
            _widen_to_float64(nodes)
        per_cost.append((name, cost, nodes))
    grad = None
    for node in graph.nodes:
        for raw, version in node.handed:
            if raw._version != version and _reads_its_samples(node):
                _changed_in_place(node)
        if node.no_grad_cut:
            if grad is None:
                grad = torch.is_grad_enabled()
            if grad:  # a training surrogate (an evaluation one is built under no_grad too)
                _check_sampled_with_grad(node, per_cost)
    n = len(graph.nodes)
    if n and (reached == 0 or n > 1):  # one node and some cost upstream of it: nothing to look for
        _warn_unused(graph, per_cost + [(None, c, ns) for c, ns in plain])
    if reached:
        _warn_unreached_steps(graph, per_cost)
    renamed = _state_names(per_cost) if len(graph.costs) > 1 and n else None
    loss = None
    single, groups = [], {}
    if any(len(nodes) == 1 and nodes[0].history is not None for _, _, nodes in per_cost):
        stackable: dict = {}  # id(node) -> whether its steps' costs may be stacked (asked once per node)
        for name, cost, nodes in per_cost:
            key = _step_group(cost, nodes, stackable)
            if key is None:
                single.append((name, cost, nodes))
            else:
                groups.setdefault(key, []).append((name, cost, nodes))
    else:  # only the costs of a partition's steps (one node with a history) can be stacked
        single = per_cost
    for members in groups.values():
        if len(members) == 1:
            single.extend(members)
        else:
            s = _steps_surrogate(members[0][2][0], members, order)
            loss = s if loss is None else loss + s
    sums = _Sums()  # the running sums of the gradient functions, shared by the costs
    if len(single) > 1:
        sums.settle(graph.nodes)  # (what each cost would ask its nodes, asked once per node)
        sums.groups = {}  # (the costs' control variates summed by node: see terms._grouped_cost)
    for name, cost, nodes in single:
        s = _cost_surrogate(cost, nodes, name, order, renamed and renamed.get(id(cost)), sums)
        loss = s if loss is None else loss + s
    if sums.groups:
        s = _grouped_terms(sums)
        if s is not None:
            loss = s if loss is None else loss + s
    for cost, nodes in plain:
        s = _plain_surrogate(cost, nodes)
        loss = s if loss is None else loss + s
    if n and order:  # (order 0, the value alone: nothing differentiated)
        _guard_low_order(graph, order)
    if pending:
        _check_mixed(loss)
    return loss if loss.dim() == 0 else loss.reshape(())  # a reshape of a 0-dim loss is one more node


def _needy_nodes(graph: Graph) -> set:
    """The ids of the graph's nodes on which the order-1 checks of a cost (``_check_order``, ``_check_smooth``,
    ``_check_reaches``) may act: an estimator or node below order 1; a pathwise node (its estimator
    ``requires_rsample`` or is ``pathwise``) that handed out samples; a jump refused by ``_check_reaches``
    (``thresholded``); an estimator whose verdict ``_check_reaches`` has not settled as never pathwise
    (``_REACH_KEY`` is not ``None``), unless the node was sampled under no_grad and the surrogate is built with grad
    (skipped there); a node drawn from parameters computed from an integer read from a pathwise sample
    (``integer_parameter``: ``_check_integer_reads``). For the other nodes each check only reads and moves on (and nothing a check does to an
    earlier cost makes one of them act), so a cost none of whose nodes is here is not checked: the same refusals,
    asked once per node instead of once per (cost, upstream node)."""
    needy = set()
    grad = None
    for node in graph.nodes:
        est = node.estimator
        if (est.max_order < 1 or node.max_order < 1 or node.thresholded is not None
                or (node.handed and is_pathwise(est)) or node.integer_parameter is not None):
            needy.add(id(node))
        elif est.__dict__.get(_REACH_KEY, ()) is not None:
            if node.no_grad_cut:
                if grad is None:
                    grad = torch.is_grad_enabled()
                if grad:
                    continue
            needy.add(id(node))
    return needy


def _one_node_loss(graph: Graph) -> Optional[torch.Tensor]:
    """The order-1 surrogate of the commonest step, one node and one cost downstream of it (and any costs of the
    data alone: a VAE's KL), where the general path's checks are known to do nothing (no refusal, warning or
    hook): the same terms in the same order (:func:`_one_node_surrogate`, the data costs' means: the same loss
    and autograd graph) without the per-cost and per-node loops around them. ``None`` where one of them might
    act; the general path then decides (and raises, warns or hooks as it does for every graph)."""
    node = graph.nodes[0]
    if graph.no_credit or node.step_log is not None or node.no_grad_cut or node.thresholded is not None:
        return None  # (credit=False, a partition, a node sampled under no_grad, a jump refused by _check_reaches)
    for raw, version in node.handed:
        if raw._version != version:
            return None  # its samples changed in place: the general path decides whether that is refused
    est = node.estimator
    # what the general path's checks of the node would find, read inline (a call each cost ~0.5 us in a step):
    # _check_order passes and _guard_low_order hooks nothing (unbiased above order 1, a log p known smooth:
    # KINK_FREE); _check_smooth and _check_reaches do nothing (not pathwise, and an earlier surrogate found its
    # gradient flows through no sample it hands out: _REACH_KEY is None)
    if not (est.max_order > 1 and node.max_order > 1 and type(node.distribution) in KINK_FREE
            and not est.requires_rsample and not est.pathwise and est.__dict__.get(_REACH_KEY, ()) is None):
        return None
    costs = graph.costs
    if len(costs) == 1:  # (the toy's step: no list of terms)
        name, cost = costs[0]
        if type(cost) is not PlateTensor or node.plate not in cost._plates:
            return None  # a cost of the data alone: the general path warns that no cost is downstream of the node
        uniform = est.uniform_weights  # (read once: _ensure_weights and _one_node_surrogate would read it again)
        if not uniform:
            _ensure_weights(node)
        raw, plates = cost._raw, cost._plates
        if raw.dtype is torch.float64:
            _widen_to_float64(graph.nodes)
        # MagicBox(l) at the cost's plates, as _one_node_surrogate builds it, without its three calls: the node is
        # no partition (its gradient_values are its l), and a cost of exactly its plates needs no alignment
        l, own = node._gradient_values, (node.plate,) + node.parents
        box = magic_box(l if plates == own else align(l, own, plates))
        loss = _one_node_surrogate(raw, plates, node, name, box=box, uniform=uniform)
        return loss if loss.dim() == 0 else loss.reshape(())
    terms = _costs_at(costs, node.plate.name)
    if terms is None:
        return None
    terms, reached = terms
    if any(raw.dtype is torch.float64 for _, raw, _ in terms):
        _widen_to_float64(graph.nodes)
    if reached > 1:
        return _many_costs_loss(node, terms)
    loss = None
    for name, raw, plates in terms:
        if plates is None:  # a cost of the data alone: the mean over the data points (_cost_surrogate)
            s = raw.mean() if raw.dim() else raw
        else:
            _ensure_weights(node)
            s = _one_node_surrogate(raw, plates, node, name)
        loss = s if loss is None else loss + s
    return loss if loss.dim() == 0 else loss.reshape(())  # type: ignore[union-attr]


def _widen_to_float64(nodes: list[Node]) -> None:
    """Give the nodes upstream of a float64 cost their l (and weights) in float64 (:meth:`Node.widen_to_float64`;
    a partition's per-step l_t too, which its cumulative L_t reads, found by p-docs6)."""
    for node in nodes:
        node.widen_to_float64()


def _many_costs_loss(node: Node, terms: list) -> torch.Tensor:
    """:func:`_one_node_loss` for several costs downstream of its node (a loss in several terms, a reward per
    time step without a partition, a KL per latent dim): the costs of the same plates (and dtype) share one
    MagicBox(l) and one weighting. Without a control variate their surrogate is one term, MagicBox(l) · Σ_i C_i
    reduced once (as by hand: the costs summed before the score term; the same function, its value summed in
    another order); with one (a baseline per cost, kept under the cost's name) each cost keeps its term and
    frame, built on the shared MagicBox(l) (the same values as the general path's)."""
    _ensure_weights(node)
    boxes: dict = {}  # plates -> MagicBox(l) at them
    if node.estimator.has_control_variate():
        loss = None
        for name, raw, plates in terms:
            if plates is None:  # a cost of the data alone: the mean over the data points (_cost_surrogate)
                s = raw.mean() if raw.dim() else raw
            else:
                box = boxes.get(plates)
                if box is None:
                    box = boxes[plates] = magic_box(align(node.gradient_values, node.plates, plates))
                s = _one_node_surrogate(raw, plates, node, name, box=box)
            loss = s if loss is None else loss + s
        return loss if loss.dim() == 0 else loss.reshape(())  # type: ignore[union-attr]
    sums: dict = {}  # (plates, dtype) -> [the sum of its costs, their first name]
    loss = None
    box_dtype = node.gradient_values.dtype
    for name, raw, plates in terms:
        if plates is None:
            s = raw.mean() if raw.dim() else raw
            loss = s if loss is None else loss + s
            continue
        # summed in the dtype the general path's MagicBox(l) · C computes in (a bf16 / fp16 cost is promoted
        # before it is added: summed in bf16, 300 + 0.5 is 300, and a small cost's term was lost; review r-ten)
        dtype = torch.promote_types(raw.dtype, box_dtype)
        if raw.dtype != dtype:
            raw = raw.to(dtype)
        key = (plates, dtype)
        group = sums.get(key)
        if group is None:
            sums[key] = [raw, name]
        else:
            group[0] = group[0] + raw
    for (plates, _), (raw, name) in sums.items():
        s = _one_node_surrogate(raw, plates, node, name)
        loss = s if loss is None else loss + s
    return loss if loss.dim() == 0 else loss.reshape(())  # type: ignore[union-attr]


def _costs_at(costs: list, own: str) -> Optional[tuple[list, int]]:
    """For :func:`_one_node_loss`: ``(name, raw, plates)`` of each cost, ``plates`` ``None`` for a cost of the
    data alone (it does not carry the node's plate ``own``), and how many carry it; ``None`` where none does (the
    general path warns that no cost is downstream of the node) or two of those have one name (the general path
    may keep their estimator state under per-plate names, :func:`_state_names`, or warns that they share it)."""
    out = []
    names: Optional[set] = None
    first = None
    reached = 0
    for name, cost in costs:
        if type(cost) is not PlateTensor:
            out.append((name, cost, None))
            continue
        plates = cost._plates
        for p in plates:
            if p.name == own:
                if reached == 1:
                    names = {first}
                if names is not None:
                    if name in names:
                        return None
                    names.add(name)
                first = name
                reached += 1
                break
        else:
            plates = None
        out.append((name, cost._raw, plates))
    return (out, reached) if reached else None


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


def _reads_its_samples(node: Node) -> bool:
    """Whether the node's estimator reads the values it drew (a gradient function or weights that carry
    gradient, a control variate). A pathwise node (reparameterization, a relaxation without control
    variate) does not: autograd follows an in-place change of its sample as of any tensor."""
    est = node.estimator
    return bool(node.gradient_values.requires_grad or not est.uniform_weights or est.has_control_variate())


def _check_sampled_with_grad(node: Node, per_cost: list) -> None:
    """Refuse a node sampled under ``torch.no_grad()`` from parameters that require grad when a cost
    reaches it and the surrogate is built with grad: its gradient function (and a pathwise sample)
    has no graph, so its score term is silently missing from the gradient (only the other costs'
    terms remain, e.g. an entropy bonus). A node without costs may be sampled so (it silences
    :class:`UnusedSampleWarning`), and so may every node of an evaluation pass under no_grad. A cost added
    with ``credit=False`` is differentiated as written (no score term), and as written it reads a sample
    drawn without gradient: not refused (a world model trained on the actions of a policy sampled under
    no_grad)."""
    if not any(n is node for _, _, nodes in per_cost for n in nodes):
        return
    step = f" (step {node.no_grad_step} of its partition)" if node.step_log is not None else ""
    raise StorchError(
        f"node {node.plate.name!r} (estimator {node.estimator.name!r}) was sampled under torch.no_grad() (or "
        f"torch.inference_mode()){step}, from a distribution whose parameters require grad, and a cost depends "
        "on it: its gradient function was computed without grad, so these parameters would get no gradient "
        "through it (the gradient would silently be only the other costs'). Sample it with gradients enabled "
        "(est(distribution) outside the no_grad block); use torch.no_grad() only for evaluation steps (sampling, "
        "storch.cost_estimates() and the surrogate all under no_grad) or for nodes without costs; a loss that "
        "should give this node no score-function gradient (a world model trained on its samples) can be added "
        "with storch.add_cost(..., credit=False): differentiated as written, without score-function credit")


def _changed_in_place(node: Node) -> None:
    raise StorchError(
        f"the samples of node {node.plate.name!r} (estimator {node.estimator.name!r}) were changed in place after "
        "the estimator handed them out (z.mul_(2), z += 1, z[...] = v, z.clamp_(...)): its gradient function, "
        "weights and control variates refer to the values it drew, so the gradient would be wrong or torch would "
        "fail in the backward pass. Compute a new tensor instead (z = z * 2, z = z + 1, torch.where(...), "
        "z.clamp(...))")


def _state_names(per_cost: list) -> Optional[dict]:
    """The state names of costs that share a name with a cost of other plates reaching the same node.

    Per-cost estimator state (moving averages, NVIL's heads, the frames ``update_parameters`` reads,
    sum_and_sample's buffer totals) is kept by the frame's key, the cost's name and step. Costs added per
    layer under one name (``storch.add_cost(term, name="nelbo")`` for each layer) have different plates,
    and one baseline for all of them (the last one's average) would silently cost variance: at a node
    that several such costs reach, each is kept under its name with its plate names, sorted
    (``"nelbo[z1,z2]"``). A model without such costs keeps its keys (and state_dict) as they were.
    Two costs of one name with the same plates at one step do share the state: warned about.

    Returns:
        ``None`` (nothing renamed), or by ``id(cost)`` the cost's state name and the plate names of the
        nodes where it is used.
    """
    by_name: dict = {}
    for name, cost, nodes in per_cost:
        if nodes:
            by_name.setdefault(name, []).append((cost, nodes))
    renamed: Optional[dict] = None
    warned = False
    for name, members in by_name.items():
        if len(members) < 2:
            continue
        kinds: dict = {}  # the plate names of a cost: its costs (and their nodes)
        seen: set = set()
        for cost, nodes in members:
            plates = plates_of(cost)
            if plates in seen and not warned:
                warned = True
                warnings.warn(
                    f"two costs named {name!r} were added at the same step (the same plates): the loss counts both, "
                    "but estimator state kept per cost (moving-average and learned baselines, sum_and_sample's "
                    "buffer) is kept by name, plates and step, so they share it and one replaces the other there. "
                    "Give each cost of a step its own name (the same name at different steps of a partition, or "
                    "for costs of different plates such as one per layer, is fine)", UserWarning, stacklevel=user_stacklevel())
            seen.add(plates)
            kinds.setdefault(frozenset([p.name for p in plates]), []).append((cost, nodes))
        if len(kinds) < 2:  # (the steps of a partition: one kind)
            continue
        at_node: dict = {}  # a node's plate name -> the kinds of the costs that reach it
        for kind, costs in kinds.items():
            for _, nodes in costs:
                for node in nodes:
                    at_node.setdefault(node.plate.name, set()).add(kind)
        for kind, costs in kinds.items():
            state = f"{name or ''}[{','.join(sorted(kind))}]"
            for cost, nodes in costs:
                split = {node.plate.name for node in nodes if len(at_node[node.plate.name]) > 1}
                if split:
                    if renamed is None:
                        renamed = {}
                    renamed[id(cost)] = (state, split)
    return renamed


def _warn_unreached_steps(graph: Graph, per_cost: list) -> None:
    """Warn about a partition whose last steps no cost reaches: no cost carries its plate at those steps, so
    their draws get no credit (their l_t is in no cost's L_t, causal credit, docs/partitions.md).

    Every partition step drawn for a reason affects some later cost. Where the draws of the last steps reach none,
    the usual cause is a loop left in Python (``if bool(done.tensor.all()): break``) right after the draw that
    ended it: the state the costs read was last updated before that draw, so it does not carry its plate, and a
    sample's halting decision goes uncredited whenever every sample halted at once (a halting model at
    n_samples=1: z -75 against the exact gradient, tests/models/test_adaptive_computation.py). The partition's
    whole node unused is :func:`_warn_unused`'s. Costs are scanned from the last added, which typically reaches
    the last step (one cost a step): O(1) per partition there.
    """
    for node in graph.nodes:
        log = node.step_log
        if log is None:
            continue
        last, name, seen = len(log) - 1, node.plate.name, -1
        for _, cost, nodes in reversed(per_cost):
            for p in plates_of(cost):
                if p.name == name:
                    seen = max(seen, p.step)
                    break
            if seen == last:
                break
        if seen < 0 or seen == last or not any(lt.requires_grad for _, lt in log[seen + 1:]):
            continue  # (unused as a whole: _warn_unused; no gradient in the late steps: nothing is lost)
        late = f"step {last}" if seen + 1 == last else f"steps {seen + 1}-{last}"
        warnings.warn(UnusedSampleWarning(
            f"partition {name!r} (estimator {node.estimator.name!r}) drew {late} (of 0-{last}), but no cost carries "
            f"its plate at a step after {seen}: those draws get no credit (causal credit: a cost is credited to the "
            "steps up to its plate's step). If the costs depend on them through Python control flow, typically a "
            "loop left once every sample is done (`if bool(done.tensor.all()): break`) right after the draw that "
            "set `done`, the state they read does not carry that draw's plate and the gradient is biased: leave "
            "the loop after the masked updates that read `done` (`h = torch.where(done, h, f(h))`), before the "
            "next draw. A last draw that affects no cost can be left out, or drawn under torch.no_grad()"),
            stacklevel=user_stacklevel())


def _warn_unused(graph: Graph, per_cost: list) -> None:
    """Warn about each node whose gradient function carries gradient and that no cost is downstream of.

    Its score term (l, or its weights) reaches the parameters only through the costs downstream of it,
    which are the costs that carry its plate. A cost computed from its samples outside storch's plates
    (``z.tensor``, ``.item()``, numpy; a reduction over the sample plate such as an IWAE bound) does not
    carry it, so that node's parameters silently got no gradient from it. A node with a zero gradient
    function (reparameterization, the relaxations) is not reported: its gradient flows pathwise.
    """
    seen: set = set()
    for _, _, nodes in per_cost:  # (a set of all (cost, node) pairs' ids: M²/2 steps of Python for a chain)
        seen.update(map(id, nodes))
    if len(seen) == len(graph.nodes):
        return
    for node in graph.nodes:
        if id(node) in seen:
            continue
        w = node.weight_values if not node.estimator.uniform_weights else None
        carries = node.gradient_values.requires_grad or (w is not None and w.requires_grad)
        if carries:
            warnings.warn(UnusedSampleWarning(
                f"node {node.plate.name!r} (estimator {node.estimator.name!r}) is upstream of no cost: no cost carries "
                f"its plate {node.plate.name!r}, so its distribution's parameters get no gradient from its estimator. "
                "If a cost was computed from its samples outside storch's plates (z.tensor, .item(), numpy, or a "
                "reduction over the sample plate such as an IWAE bound), storch cannot see that dependence: compute "
                "the cost from the plate tensor itself, one value per sample (a reduction over the samples is not a "
                "cost storch can differentiate with a score function; a continuous node can use "
                "'reparameterization'; a multi-sample bound such as IWAE's is the cost of ONE sample that holds its K "
                "draws: est(Bernoulli(logits=logits.expand(K, *logits.shape))), reduced over the first dim, or the "
                "'vimco' estimator, see docs/plates.md). A node sampled on purpose without a cost can be sampled under "
                "torch.no_grad() (or from detached parameters)"), stacklevel=user_stacklevel())
