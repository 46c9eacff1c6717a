"""The estimators' own updates on a backward pass of the surrogate (``surrogate_loss().backward()``).

The loss gets a zero leaf (a probe) whose gradient accumulation checks the step and queues each estimator's
``update_parameters`` for the end of the pass, once per step (``update_on_backward``; storch.compile uses it for
each replay); ``torch.autograd.grad`` never reaches it, so an evaluation pass changes no state.
"""

from __future__ import annotations

from typing import Any, Callable, Union

import torch

from ..conditions.order_guard import unbatched
from ..distributed.ranks import _dist, _join_skipped_update, _skips_synced_update
from ..errors import StorchError
from ..estimators.step_state import mark_updated
from ..graph import Graph, tracing_recorder
from ..graph.node import Node
from .finite import _check_finite
from .refusals import _batched


def _updating(graph: Graph) -> dict[int, list[Node]]:
    """The nodes of each estimator in the graph that has an update, by estimator."""
    updating: dict[int, list[Node]] = {}
    for node in graph.nodes:
        if node.estimator.has_update:
            updating.setdefault(id(node.estimator), []).append(node)
    return updating


def _skipping(graph: Graph) -> dict[int, Any]:
    """The estimators of the graph that skip their update (built with ``update=False``) and must join the
    ranks' check there, by estimator (``storch.distributed.ranks._skips_synced_update``); empty in one process."""
    dist = _dist()
    if dist is None or not dist.is_initialized():
        return {}
    return {id(node.estimator): node.estimator for node in graph.nodes
            if not node.estimator.has_update and _skips_synced_update(node.estimator)}


def _run_updates(graph: Graph, updating: dict[int, list[Node]], loss: torch.Tensor, ran) -> None:
    """``storch.backward()``'s updates: ``update_parameters`` of each estimator in ``updating`` (but those in
    ``ran``), in the order of the graph's nodes; under torch.distributed an estimator that skips its update
    joins the ranks' check at the place its update would run on a rank that has it (:func:`_skipping`)."""
    skipping = _skipping(graph)
    if not skipping:  # (the common path)
        for key, nodes in updating.items():
            if key not in ran:
                nodes[0].estimator.update_parameters(nodes, loss)
        return
    for key in dict.fromkeys(id(node.estimator) for node in graph.nodes):
        if key in updating and key not in ran:
            updating[key][0].estimator.update_parameters(updating[key], loss)
        elif key in skipping:
            _join_skipped_update(skipping[key])


def _updates_on_backward(loss: torch.Tensor, graph: Graph) -> torch.Tensor:
    """``loss`` plus a zero leaf whose gradient accumulation (``.backward()`` reaches it first: the
    engine runs AccumulateGrad nodes before the others) checks the step and queues the estimators'
    updates for the end of the pass. ``torch.autograd.grad(loss, params)`` never accumulates into
    it: evaluation passes change no estimator state. Under torch.distributed an estimator built with
    ``update=False`` joins the ranks' check there, in the graph's order, as in ``storch.backward()``
    (:func:`_run_updates`; review r-30: a rank with it left the others waiting in their update's collective); in a
    step that ``storch.compile`` records, at each replayed call's ``.backward()`` (the recorder keeps them)."""
    updating, skipping = _updating(graph), _skipping(graph)
    if not updating and not skipping:
        return loss
    keys = tuple(updating) if not skipping else tuple(  # (in the graph's order, the skipped ones among them)
        k for k in dict.fromkeys(id(node.estimator) for node in graph.nodes) if k in updating or k in skipping)
    recorder = tracing_recorder()
    if recorder is not None:  # storch.compile records the step: it attaches the probe to each replay, which
        # joins the ranks' check for the skipped updates too (a rank with update=False left the others waiting)
        return recorder(loss, updating, skipping, keys)
    if not loss.requires_grad:
        # under torch.func.vmap the batched loss reports requires_grad=False although the tensor it batches
        # takes part in the autograd outside vmap (vmap(step)(params).sum().backward()): that pass must not
        # silently skip the updates (it did), nor run them on batched values (one state would mix members)
        if updating and _batched(loss) and unbatched(loss).requires_grad:
            return _refuse_updates_under_vmap(loss, updating)
        return loss
    # one zero leaf, one node: loss + loss · probe (addcmul) has the loss's value and derivatives in θ at
    # every order (probe = 0: the added terms are exact zeros), and .backward() accumulates into probe
    # (∂/∂probe = loss). A second-order objective built from g = autograd.grad(loss, θ, create_graph=True)
    # (a gradient penalty, a MAML outer step through θ - lr·g) reaches it too: g = ∂loss + probe ∂loss
    # holds it in its graph
    probe = torch.zeros((), dtype=loss.dtype, device=loss.device, requires_grad=True)
    # one record for every probe of the step: a pass that reaches two of its surrogates (main + 0 * another,
    # an order-1 and an order-2 part) updates once, as storch.backward() does
    done = graph.step_updated
    if done is None:
        done = graph.step_updated = set()

    def check():
        learners = sorted({f"{n[0].estimator.name!r} (plate {n[0].plate.name!r})" for n in updating.values()
                           if getattr(n[0].estimator, "update_uses_loss_graph", False)})
        if learners:
            # the pass is the surrogate's own .backward() (the probe is the root's input: stopped before any
            # gradient accumulates) or one that reaches it through g = grad(loss, θ, create_graph=True): a gradient
            # penalty, or the storch.backward() of a later step that uses MAML's adapted θ - lr·g (found by
            # porting MAML: "call storch.backward() instead" was said to a storch.backward(), and the outer step's
            # own gradients had accumulated)
            raise StorchError(
                f"a backward pass reached storch.surrogate_loss() of a step with estimator {', '.join(learners)}, "
                "whose update trains its learned control variate by differentiating that surrogate again after the "
                "pass: it needs the surrogate's graph then (storch cannot see whether this pass retains it), so it "
                "runs only in the step's own storch.backward(). No estimator state was changed. If the pass is "
                "surrogate_loss().backward() (stopped before any gradient was accumulated), call storch.backward() "
                "instead (it backpropagates, updates every estimator and resets the graph; "
                "storch.backward(scale=scaler) with a torch.amp.GradScaler for loss scaling). If it is the backward "
                "of an objective built from the surrogate's gradient (torch.autograd.grad(..., create_graph=True): "
                "a gradient penalty, or a MAML inner step whose adapted parameters a later step's storch.backward() "
                "reaches; gradients may have been accumulated in part: zero them), create that step's estimator "
                "with update=False (est.parameters() are then yours to train) or use one without a learned control "
                "variate there (score, whose baselines update in such a pass)")
        _check_finite(loss, graph)

    def run(todo):
        for key in todo:
            if key in skipping:
                _join_skipped_update(skipping[key])
                continue
            nodes = updating[key]
            # the step's later surrogates (a second epoch on the batch, storch.backward() after this pass) read
            # the baselines as before this update: one that read the updated state would depend on the samples
            mark_updated(nodes)
            nodes[0].estimator.update_parameters(nodes, loss)

    update_on_backward(probe, check, run, done, keys)
    return torch.addcmul(loss, loss, probe)


def _refuse_updates_under_vmap(loss: torch.Tensor, updating: dict[int, list[Node]]) -> torch.Tensor:
    """``loss`` plus a zero probe (as :func:`_updates_on_backward`'s) whose gradient accumulation raises: a
    ``.backward()`` outside ``torch.func.vmap`` of a surrogate built inside it would update the estimators.
    ``torch.autograd.grad`` of it (an evaluation pass, which never updates) never reaches the probe and is
    left alone. The probe's AccumulateGrad runs first, so nothing is backpropagated when it raises."""
    names = ", ".join(sorted({f"{n[0].estimator.name!r} (plate {n[0].plate.name!r})" for n in updating.values()}))
    message = (
        f"storch.surrogate_loss() was built inside torch.func.vmap, and its .backward() outside vmap would have to "
        f"update the state of estimator {names} (a moving average, a learned baseline or control variate, an "
        "annealing schedule, a memory buffer): storch cannot. Inside vmap the step's values are batched over "
        "the vmapped members, and one estimator's state would mix them. "
        "Nothing was backpropagated. Run the members in a Python loop (an estimator per member, each step "
        "ending with storch.backward()), use an estimator without state (e.g. score with "
        "baseline='leave_one_out' or 'none', a constant temperature), or create the estimator with "
        "update=False where it has that option (score, relax, lax, rebar: its state is then never updated). "
        "torch.autograd.grad of the vmapped surrogate (an evaluation pass) updates nothing and is not refused")

    def refuse(_):
        raise StorchError(message)

    probe = torch.zeros((), dtype=loss.dtype, device=loss.device, requires_grad=True)
    probe.register_post_accumulate_grad_hook(refuse)
    return torch.addcmul(loss, loss, probe)


def update_on_backward(probe: Union[torch.Tensor, tuple], check: Callable[[], None],
                       run: Callable[[list], None], done: set, keys: tuple = (None,)) -> None:
    """The update probe's mechanism (eager surrogates, and each call of a step compiled by
    ``storch.compile``): when ``.backward()`` accumulates into the zero leaf ``probe`` (added to
    the loss; ``torch.autograd.grad`` never accumulates into it), or into one of several, ``check()`` runs
    (it raises to stop the pass before any state changes) and ``run()`` (the estimators' updates) is queued
    for the end of the pass, once per step and estimator: ``done`` is the step's record of the ``keys`` (the
    estimators, by id) updated, shared by the probes of all its surrogates, so neither a pass that reaches
    several of them nor a second pass (``retain_graph=True``, or another surrogate of the step) updates an
    estimator again, while one that an earlier pass did not reach (a node added after it) is updated;
    ``run(todo)`` updates the keys in ``todo``. ``run`` has grad mode on, as under ``storch.backward()``
    (the engine's callback runs with it off, so a learned baseline's regression would build no graph and
    silently not train)."""

    def on_backward(_):
        todo = [k for k in keys if k not in done]
        if not todo:
            return
        check()  # before the record: a refused pass (a non-finite loss) is refused again, never let through
        done.update(todo)

        def queued():
            with torch.enable_grad():
                run(todo)

        torch.autograd.Variable._execution_engine.queue_callback(queued)

    for p in probe if isinstance(probe, tuple) else (probe,):
        p.register_post_accumulate_grad_hook(on_backward)
