"""``storch.backward()``: the first-order training step (backpropagate, update the estimators, reset the graph).

(Not named ``backward.py``: the package re-exports the function ``backward``, which would hide a submodule of
that name.)
"""

from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence, Union

import torch

from ..runtime.eager import eager_only
from ..errors import OrderError, StorchError
from ..estimators.base import Estimator
from ..graph import Graph, current_graph, is_tracing
from .finite import _check_finite
from .loss import _surrogate_loss
from .refusals import _batched
from .updates import _run_updates, _updating


@eager_only
def backward(graph: Optional[Graph] = None, *, order: int = 1,
             scale: Optional[Union[float, torch.Tensor, "torch.amp.GradScaler"]] = None,
             inputs: Optional[Union[torch.Tensor, Sequence[torch.Tensor]]] = None) -> torch.Tensor:
    """Backpropagate the first-order surrogate, run estimators' own updates, reset the graph.

    Order: the surrogate loss (order 1) is built and backpropagated (its graph kept for the updates,
    unless each of them reads the step's tensors as values only: ``update_uses_loss_graph = False``,
    or ``replays_update`` without it set), then ``update_parameters(nodes, loss)`` runs once per estimator with
    ``has_update`` (the only place estimator state changes; skipped where a ``surrogate_loss().backward()``
    of this step ran them already: once per step), then the graph is reset (also after an exception).

    ``inputs``: accumulate gradients into these tensors only (``Tensor.backward(inputs=...)``: one
    optimizer per parameter group). The estimators' updates run as without it. (``surrogate_loss().backward(
    inputs=...)`` runs no updates: a restricted pass never reaches the loss's update probe.)

    ``scale``: loss scaling for mixed precision. A ``torch.amp.GradScaler`` (or any object with a
    ``scale(loss)`` method): backpropagate ``scaler.scale(loss)``, then ``scaler.step(opt)``,
    ``scaler.update()`` as with ``scaler.scale(loss).backward()``::

        scaler = torch.amp.GradScaler(device)
        storch.backward(scale=scaler)
        scaler.step(opt); scaler.update(); opt.zero_grad()

    A finite number or a one-element tensor: backpropagate ``scale * loss`` (a fixed loss scale; not
    ``scaler.get_scale()``, which leaves the scaler without the scale that ``scaler.step`` unscales
    by). 0 and negative scales are applied (0 gives zero gradients). The estimators' updates read the
    unscaled loss, so their state is the same as without it.

    Returns:
        the detached estimate of the expected total cost.

    Raises:
        NonFiniteCostError: a cost (or the surrogate) is not finite (NaN or infinite); a
            ``CostError`` and a ``FloatingPointError``. Nothing is backpropagated and no estimator
            state changes (moving averages, learned control variates); the step is discarded.
            Catch it to skip the batch.
        OrderError: ``order`` other than 1 (a surrogate of higher order is built with
            :func:`surrogate_loss` and differentiated with ``torch.autograd.grad``).
        StorchError: a ``scale`` it cannot apply (not a GradScaler, number or tensor; nan or infinite; a
            tensor of more than one element), or gradients disabled (``torch.no_grad()``,
            ``torch.inference_mode()``). These refusals, like every error of ``storch.backward()``, discard the
            step of the thread's default graph; inside a ``with storch.Graph():`` block they leave it as it was.
    """
    graph = graph or current_graph()
    try:
        _refuse_arguments(order, scale)
    except BaseException as e:  # a refusal discards the step as any raising backward does (in the default graph;
        graph.discard(e)        # inside a `with storch.Graph():` block the step stays: fix the call and go on)
        raise
    if is_tracing():
        graph.reset()
        raise StorchError(
            "storch.backward() inside a step compiled with storch.compile: a compiled step cannot run "
            "backward and estimator updates inside it. Return storch.surrogate_loss() from the step and "
            "call .backward() on what the compiled step returns")
    try:
        try:
            loss = _surrogate_loss(1, graph)
        except BaseException as e:
            graph.discard(e)
            raise
        if _batched(loss):  # torch said only "vmap: ... calling .item() on a Tensor" (the finiteness check)
            raise StorchError(
                "storch.backward() inside torch.func.vmap: a backward pass (and the estimators' updates) cannot "
                "run inside vmap. Return storch.surrogate_loss() from the vmapped function and call .backward() "
                "on its result outside vmap (for estimators without state: one whose state would be updated is "
                "refused there), or run the members in a Python loop, each step ending with storch.backward()")
        _check_finite(loss, graph)
        if not loss.requires_grad:
            # a node sampled under torch.no_grad() from parameters that do not require grad there (a
            # distribution built inside the block); one that does is refused by the surrogate
            cut = [n.plate.name for n in graph.nodes if n.no_grad_step is not None]
            no_grad = (f" The nodes {cut} were sampled under torch.no_grad() (or torch.inference_mode()): their "
                       "gradient functions and samples have no gradient; sample them, and build their "
                       "distributions, with gradients enabled (torch.no_grad() only for evaluation steps or nodes "
                       "without costs).") if cut else ""
            raise StorchError(
                "storch.backward(): the surrogate loss depends on no tensor that requires grad, so there is "
                f"nothing to backpropagate.{no_grad} Check that the distributions' parameters require grad, and "
                "that a pathwise node's (reparameterization, relaxations) cost is differentiable in its sample: "
                "(x > c).float(), round(x) or an integer cast have no gradient; use a score-function estimator "
                "('score') for such a cost")
        updating = _updating(graph)
        # the graph is kept for update_parameters (which may differentiate the loss again), except
        # when every update says it reads values only (update_uses_loss_graph False: sum_and_sample's
        # buffer) or replays from detached tensors (replays_update: a moving average, NVIL, a
        # schedule) without saying it differentiates the loss. Keeping it for those held all of the
        # backward's saved tensors to the end of the pass (peak memory 1.16-1.24x hand-written)
        keep = any(_needs_loss_graph(n[0].estimator) for n in updating.values())
        try:
            if scale is None:
                scaled = loss
            elif isinstance(scale, (numbers.Number, torch.Tensor)):
                scaled = loss * scale
            else:
                # a GradScaler: its scale() creates the scale tensor that scaler.step() unscales by (lazily,
                # at the first call), so scale=scaler.get_scale() failed there ("_scale is None")
                scaled = scale.scale(loss)
            scaled.backward(retain_graph=keep, inputs=inputs)
        except RuntimeError as e:
            if "backward through the graph a second time" not in str(e):
                raise
            raise StorchError(
                "storch.backward(): the step's autograd graph was already freed by an earlier backward pass "
                "through it (torch.autograd.grad(storch.surrogate_loss(), ...) or loss.backward() without "
                "retain_graph=True). Pass retain_graph=True to that earlier call, or build the step again; no "
                "estimator state was changed") from e
        # (but those a surrogate_loss().backward() of this step ran: once per step)
        _run_updates(graph, updating, loss, graph.step_updated or ())
        return loss.detach()
    except RuntimeError as e:
        _explain_ddp_error(e)
        raise
    finally:
        graph.reset()


def _refuse_arguments(order, scale) -> None:
    """Raise what is wrong with a ``storch.backward()`` call before it builds the surrogate (nothing built yet)."""
    if not torch.is_grad_enabled():
        raise StorchError(
            "storch.backward() with gradients disabled (inside torch.no_grad() or torch.inference_mode()): "
            "nothing can be backpropagated. Build the step with gradients enabled; for an evaluation pass use "
            "storch.cost_estimates() and end the step with storch.reset() (or a `with storch.Graph():` block)")
    if order != 1:
        raise OrderError(
            f"storch.backward(order={order!r}): storch.backward() is the first-order training step. For "
            "derivatives of order n, build loss = storch.surrogate_loss(order=n) and differentiate it n times "
            "with torch.autograd.grad(..., create_graph=True) (or loss.backward(create_graph=True)); end the "
            "step with storch.reset() or a `with storch.Graph():` block")
    accepted = ("scale must be a torch.amp.GradScaler (storch.backward(scale=scaler), then scaler.step(opt) and "
                "scaler.update()), a finite number or a one-element tensor holding one")
    if not (scale is None or isinstance(scale, (numbers.Number, torch.Tensor)) or callable(getattr(scale, "scale", None))):
        raise StorchError(f"storch.backward(scale={scale!r}): {accepted}")
    if isinstance(scale, torch.Tensor) and scale.numel() != 1:
        # torch said "grad can be implicitly created only for scalar outputs" (the scaled loss was not a scalar)
        raise StorchError(
            f"storch.backward(scale=<tensor of shape {tuple(scale.shape)}>): the loss is a scalar and is scaled by "
            f"one number; {accepted}")
    if isinstance(scale, (numbers.Number, torch.Tensor)):
        # nan or inf made every gradient nan with no error (0 and negative scales are applied: 0 skips a step)
        value = scale.detach().cpu().item() if isinstance(scale, torch.Tensor) else scale
        if isinstance(value, bool) or not isinstance(value, (int, float)) and not (
                isinstance(value, numbers.Real) and type(value).__module__ == "numpy"):
            # a bool (False zeroed every gradient), a complex, a Decimal or a Fraction (torch refused it later):
            # review r-twenty-two
            raise StorchError(f"storch.backward(scale={value!r}): a {type(value).__name__} is no scale; {accepted}")
        try:
            finite = math.isfinite(value)
        except OverflowError:  # an int beyond a float (10**400)
            finite = False
        if not finite:
            raise StorchError(
                f"storch.backward(scale={value!r}): every gradient would be nan or inf; {accepted}. A GradScaler "
                "skips steps with inf or nan gradients itself")


def _needs_loss_graph(est: Estimator) -> bool:
    """Whether ``est.update_parameters`` may differentiate the loss, so ``storch.backward()`` keeps
    its graph: what the estimator says (``update_uses_loss_graph`` True or False), and where it says
    nothing (``None``), unless the update replays from detached tensors (``replays_update``:
    ``update_from`` of ``update_inputs``)."""
    uses = est.update_uses_loss_graph
    return (not est.replays_update) if uses is None else bool(uses)


def _explain_ddp_error(e: RuntimeError) -> None:
    """Raise a StorchError that says what to do for DDP's error with find_unused_parameters=True."""
    if "mark a variable ready only once" not in str(e):
        return
    # DistributedDataParallel(find_unused_parameters=True) looked for the used parameters from the
    # forward's outputs, which do not lead to storch's costs
    raise StorchError(
        "DistributedDataParallel(find_unused_parameters=True) marked the model's parameters unused, then "
        "storch.backward() gave them gradients: DDP finds used parameters from the outputs of the wrapped "
        "module's forward, and storch's loss is built from the registered costs. End the forward with "
        "`return storch.surrogate_loss()` (then call storch.backward() as before), or use "
        "find_unused_parameters=False. See storch.distributed.") from e
