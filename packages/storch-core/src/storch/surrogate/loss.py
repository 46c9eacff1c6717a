"""The surrogate loss (paper, Eq. 2) of a graph: ``surrogate_loss``, and its value alone (``value_surrogate``).

``_surrogate_loss`` checks each cost's nodes (:mod:`.order`, :mod:`.pathwise`, :mod:`.reaches`, :mod:`.integer_reads`) and the samples (:mod:`.samples`:
drawn with gradient, not changed in place, each reaching a cost), then sums the costs' terms of Theorem 2:
stacked per partition (:mod:`.steps`), one by one (:mod:`.terms`), or as written (``credit=False``,
:mod:`.estimates`); the commonest step (one node) takes :mod:`.one_node` instead. ``surrogate_loss`` adds the
estimators' updates on backward (:mod:`.updates`).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from ..distributed.ranks import _skips_synced_update
from ..runtime.eager import mark_eager_only, set_eval_frame
from ..errors import StorchError
from ..estimators.watch import is_pathwise
from ..graph import Graph, _stack, tracing_recorder
from ..plates.tensor import raw_of
from .estimates import _plain_surrogate
from .finite import _is_wrapped, refuse_on_backward
from .grouped_baselines import _grouped_terms
from .integer_reads import _check_integer_reads
from .one_node import _one_node_loss, _widen_to_float64
from .order import _check_order, _guard_low_order
from .pathwise import _check_compared, _check_smooth
from .reaches import _REACH_KEY, _check_reaches
from .refusals import _PENDING, _check_mixed, _keep_counted
from .running_sums import _Sums
from .samples import _changed_in_place, _check_sampled_with_grad, _warn_unreached_steps, _warn_unused
from .state_names import _state_names
from .steps import _step_group, _steps_surrogate
from .terms import _cost_surrogate, cost_nodes
from .updates import _updates_on_backward


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
                graph.costs_read = len(graph.costs)  # (an evaluation step read: Graph._ends_evaluation)
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
    graph.costs_read = len(graph.costs)  # (an evaluation step read: Graph._ends_evaluation)
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
        from ..distributed.ranks import _announce_no_costs

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
    wide: dict = {}  # id(node) -> node, upstream of a float64 cost: widened once, after the loop (per cost, a
    # partition's T per-step costs each walked its T logged l_t: O(T²), 4.8 s at T = 2000, p-hmm15)
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
            wide.update((id(node), node) for node in nodes)
        per_cost.append((name, cost, nodes))
    if wide:
        _widen_to_float64(list(wide.values()))
    grad = None
    for node in graph.nodes:
        for raw, version in node.handed:
            if raw._version != version and node.reads_its_samples():
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
        sums.groups = {}  # (the costs' control variates summed by node: see grouped_baselines._grouped_cost)
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
