"""The update a compiled step replays (``Estimator.replays_update``): :class:`_Recorder` (what
``surrogate_loss`` hands over while the step is traced: the probe added to the loss, the estimators'
``update_inputs`` as extra outputs), and at each replayed call the probe's backward that checks the loss and runs
the estimators' ``update_from`` (with ``loss_graph_values`` computed right after a ``backend=None`` call)."""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.utils._pytree as pytree

from ..distributed.ranks import _join_skipped_update, _skips_synced_update
from ..errors import NonFiniteCostError, StorchError
from ..estimators.messages import updating_message
from ..surrogate import update_on_backward
from .refusals import _name, _replay_only_message


class _Recorder:
    """What ``surrogate_loss`` hands over while ``storch.compile`` records a step whose loss updates
    estimators (storch.surrogate.updates._updates_on_backward): the loss gets the program's probe input
    added (a zero whose gradient accumulation, at each replay, queues the updates, as the eager
    probe does), and the program returns the loss and the estimators' ``update_inputs`` as extra
    outputs. ``decided``: on the replay check (grad off), whether the trace recorded an update.

    Under torch.distributed the estimators built with ``update=False`` that must join the ranks' check where they
    skip their update (``storch.distributed.ranks._skips_synced_update``) are kept too, in the graph's order among the
    updates (a template of None): each replay's probe has them join it, as the eager probe does, where another
    rank's update would run its collective (before, a compiled step left them out, and a rank that updated waited
    there forever). A step whose only such estimators skip gets the probe all the same."""

    def __init__(self, fn, decided: Optional[bool] = None, replay_only: bool = True) -> None:
        self.fn, self.decided, self.replay_only = fn, decided, replay_only
        self.probe: Optional[torch.Tensor] = None
        self.loss: Optional[torch.Tensor] = None
        self.live: Optional[torch.Tensor] = None  # the loss with its graph, for updates that differentiate it
        self.updates: list = []
        self.values: list = []
        self.refusal: Optional[Callable[[], str]] = None  # see refuse
        self.losses: list = []  # every surrogate loss the step built (storch.surrogate_loss hands them over)

    def refuse(self, message: Callable[[], str]) -> None:
        """The traced order-1 surrogate holds a term that differentiating it again would bias (an order-1
        estimator, a kink on a pathwise path: storch.surrogate.refusals._refuse_twice): its eager hooks on the traced
        tensors are not part of the program, so every replay's outputs get the refusal (the first message)."""
        if self.refusal is None:
            self.refusal = message

    def __call__(self, loss: torch.Tensor, updating: dict, skipping: dict, keys: tuple) -> torch.Tensor:
        """``updating``: each updating estimator's nodes, ``skipping``: the estimators that join the ranks' check
        instead, by id; ``keys``: both, in the graph's order (storch.surrogate.updates._updates_on_backward)."""
        if not (loss.requires_grad if self.decided is None else self.decided):
            return loss  # eagerly too: no backward, no update
        if self.loss is not None and any(template is not None for _, _, template in self.updates):
            raise StorchError(
                f"storch.compile: {_name(self.fn)} builds more than one surrogate loss with estimators that update "
                "their state on .backward(); a compiled step builds one: return it, and call .backward() on it")
        if self.loss is not None:
            # an earlier surrogate of the step recorded only skipped updates (update=False under torch.distributed):
            # this one, over the graph as it is now, holds them too (and any estimator called since), so it is
            # recorded instead. Keeping the earlier record refused a step that one process compiles (there the
            # earlier surrogate records nothing), and a returned later surrogate never reached its probe
            self.updates, self.values, self.live = [], [], None
        for key in keys:
            if key in skipping:
                self.updates.append((skipping[key], None, None))
                continue
            nodes = updating[key]
            est = nodes[0].estimator
            live = est.update_uses_loss_graph
            if not est.replays_update:
                raise StorchError(updating_message(est))
            if live and not self.replay_only:
                raise StorchError(_replay_only_message(est))
            leaves, spec = pytree.tree_flatten(est.update_inputs(nodes))
            # the tensors are outputs of the program; other leaves (cost names) are fixed by the trace.
            # An update that differentiates the loss again (update_uses_loss_graph) keeps their graph:
            # after each replayed call (backend=None: the program's operations are in autograd's graph)
            # est.loss_graph_values(loss, inputs) computes what its update_from needs from them
            tensors = [v if live or not v.requires_grad else v.detach() for v in leaves if isinstance(v, torch.Tensor)]
            self.updates.append((est, spec, [None if isinstance(v, torch.Tensor) else v for v in leaves]))
            self.values.extend(tensors)
            if live:
                self.live = loss
        self.loss = loss.detach()
        probe = self.probe
        if probe.dtype != loss.dtype or probe.device != loss.device:
            probe = probe.to(dtype=loss.dtype, device=loss.device)
        # as the eager step's probe (storch.surrogate.updates._updates_on_backward): loss + loss · probe, one node with
        # the loss's value and derivatives (probe = 0); plain .backward() accumulates into the probe, and so does
        # a second-order objective built from g = autograd.grad(loss, θ, create_graph=True) (a gradient
        # penalty, a MAML outer loss through θ - lr·g): g = ∂loss + probe ∂loss holds it
        return torch.addcmul(loss, loss, probe)

    def extras(self) -> tuple:
        if self.loss is None:
            return ()
        return (self.loss, *self.values) if self.live is None else (self.loss, *self.values, self.live)


def _loss_graph_values(values: tuple, loss: torch.Tensor, updates: list) -> dict:
    """For each update that differentiates the loss again (``update_uses_loss_graph``), by its position
    in ``updates``: ``est.loss_graph_values(loss, inputs)`` of this replayed call, computed now, while
    the call's graph exists (``_NO_UPDATE`` when it has none: grad off, no backward, no update, as
    eagerly). ``values``: the program's update outputs (the ``update_inputs`` leaves, with their graph)."""
    out = {}
    tensors = iter(values)
    for j, (est, spec, template) in enumerate(updates):
        if template is None:  # a skipped update (see _Recorder)
            continue
        leaves = [next(tensors) if v is None else v for v in template]
        if est.update_uses_loss_graph:
            out[j] = (est.loss_graph_values(loss, pytree.tree_unflatten(leaves, spec)) if loss.requires_grad
                      else _NO_UPDATE)
    return out


_NO_UPDATE = object()


def _update_on_backward(probe: torch.Tensor, loss: torch.Tensor, values: tuple, updates: list, fn,
                        computed: Optional[dict] = None) -> None:
    """The eager probe's mechanism (storch.surrogate.updates.update_on_backward) for a replayed call: when
    ``.backward()`` accumulates into ``probe`` (``torch.autograd.grad`` does not), the loss is checked
    and the estimators' ``update_from`` run once, at the end of the pass, from this replay's values."""

    def check():
        if not loss.is_meta and not math.isfinite(loss.item()):
            raise NonFiniteCostError(
                f"the surrogate loss of the compiled step {_name(fn)} is not finite (NaN or inf), so its gradient "
                "would be too: the backward pass stopped and estimator state (moving averages) is unchanged; "
                "gradients it accumulated before may hold NaN (zero them). Run the step eagerly to see which cost "
                "is not finite, or catch storch.NonFiniteCostError to skip the batch")

    def run():
        tensors = iter(values)
        for j, (est, spec, template) in enumerate(updates):
            if template is None:  # update=False under torch.distributed: the ranks' check, once per estimator
                if _skips_synced_update(est):
                    _join_skipped_update(est)
                continue
            leaves = [next(tensors) if v is None else v for v in template]
            if computed and j in computed:  # loss_graph_values, computed after the call
                if computed[j] is not _NO_UPDATE:
                    est.update_from(computed[j])
                continue
            est.update_from(pytree.tree_unflatten(leaves, spec))

    update_on_backward(probe, check, lambda todo: run(), set())  # a call is a step, with one surrogate (a second is refused)
