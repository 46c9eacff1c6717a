"""The checks a new trace passes before its program is used: the estimators it recorded can be replayed,
it captured no non-parameter tensor that requires grad, it drew nothing from Python's or numpy's generator,
and run eagerly on the traced paths and as traced, from the same random state, the step gives the same values."""

from __future__ import annotations

import random
import sys
from typing import Callable

import torch

from ..errors import StorchError
from ..estimators.construction import created_after, creation_mark
from ..estimators.messages import updating_message
from ..graph import Graph, tracing_nodes
from .refusals import _created_in_step_message, _custom_function_message, _name, _replay_only_message
from .updates import _Recorder


def _check_replay(gm: torch.fx.GraphModule, flat: Callable, tensors: list, inputs: list, devices: list, fn,
                  updates: bool, loss_graph: bool = False, restore: Callable[[], None] = lambda: None,
                  changed: int = 0) -> None:
    """Run the step eagerly and its trace from the same random state: they must agree.

    The eager run is the step's second call: an estimator with state it creates (one made anew at every call,
    e.g. a local ``est = storch.estimator(..., baseline="moving_average")`` in the step) is refused first. One
    created only at the first call and kept (``if self.est is None: self.est = ...``) is created in the trace
    only, and is replayed as usual.

    The trace records torch operations only. A step whose result also depends on what it does to
    Python or generator state (an estimator that replays the random state for common random numbers,
    as SPSA's coupled draws do; a per-graph generator; Python's ``random``) would replay differently,
    silently; this check (once per trace, on the first call) turns that into an error. ``tensors``:
    ``flat``'s inputs (the arguments and the probe), ``inputs``: the program's (the probe if it has
    ``updates``, then the estimators' state); the values the updates read are compared too. ``restore``
    undoes the in-place updates of arguments and captured tensors after each run (see _TraceMode);
    ``changed``: how many arguments the step changed in place (for the message)."""
    validate = torch.distributions.Distribution._validate_args
    torch.distributions.Distribution.set_default_validate_args(False)
    try:
        # eagerly, but on the paths the trace took (estimators that pick a path by values take their
        # value-independent one while tracing: storch.extending.is_tracing)
        recorder = _Recorder(fn, decided=updates)  # the trace's decision: grad is off here, unless an
        # update differentiates the loss (its update_inputs are what the loss is differentiated for, and
        # an estimator may record them only where they have a graph)
        grad = torch.enable_grad() if loss_graph else torch.no_grad()
        eager: list = []
        mark = creation_mark()
        try:
            with torch.random.fork_rng(devices=devices), grad, tracing_nodes(eager, recorder), Graph():
                want = flat(*tensors)
        finally:
            restore()
        _check_created(eager, fn, mark)
        try:
            with torch.random.fork_rng(devices=devices), torch.no_grad():
                got = gm(*inputs)
        finally:
            restore()
    finally:
        torch.distributions.Distribution.set_default_validate_args(validate)
    if len(want) != len(got):
        raise StorchError(f"storch.compile cannot replay {_name(fn)}: run eagerly on the traced paths it returns "
                          f"{len(want)} tensors, as traced {len(got)}. Run this step eagerly")
    for w, g in zip(want, got):
        if w.shape != g.shape or not torch.allclose(w, g, rtol=1e-4, atol=1e-5, equal_nan=True):
            raise StorchError(
                f"storch.compile cannot replay {_name(fn)}: run eagerly and as traced from the same random state, "
                "it gives different values. The step's result depends on more than its torch operations: e.g. an "
                "estimator that replays the random state (SPSA's coupled draws), a storch.Graph(generator=...), "
                "or Python-side randomness or counters. Run this step eagerly"
                + (f". It also changes {changed} of its tensor arguments in place (e.g. `x.sub_(0.5)`): if that is "
                   "the cause, compute a new tensor instead (`x = x - 0.5`)" if changed else ""))


def _python_random_state() -> tuple:
    """The state of Python's ``random`` and (if imported) numpy's global generator: see _check_python_random."""
    np = sys.modules.get("numpy")
    return random.getstate(), None if np is None else np.random.get_state()


def _check_python_random(before: tuple, fn) -> None:
    """A trace records torch operations only: a draw from Python's ``random`` or numpy's global generator in the
    step (a random flip augmentation, ``np.random.rand()``) would be fixed to the trace's value in every replayed
    call. The replay check (_check_replay) sees it only where the trace and the eager run happen to draw values
    that differ, so the generators' states are compared around the trace instead: a step that drew from them
    changed them. The state is put back (a refused call changes nothing)."""
    after = _python_random_state()
    which = []
    if after[0] != before[0]:
        which.append("Python's `random`")
    if before[1] is not None and after[1] is not None:
        import numpy as np

        if (before[1][2:] != after[1][2:]) or not np.array_equal(before[1][1], after[1][1]):
            which.append("numpy's global generator (`np.random`)")
    if not which:
        return
    random.setstate(before[0])
    if before[1] is not None:
        sys.modules["numpy"].random.set_state(before[1])
    raise StorchError(
        f"storch.compile cannot replay {_name(fn)}: it draws from {' and '.join(which)}, which a trace cannot record "
        "(every replayed call would reuse the traced call's draw). Draw with torch instead (`torch.rand(())`, "
        "`torch.randint`, `torch.bernoulli`: recorded, fresh at every call; e.g. a random flip as "
        "`torch.where(torch.rand(()) < 0.5, x.flip(-1), x)`), or run this step eagerly")


def _check_created(nodes: list, fn, mark: int) -> None:
    """No estimator with state among ``nodes`` (those of a run of the step after its trace) was created during that
    run (after ``mark``: :func:`storch.estimators.construction.creation_mark`): the step makes it anew at every call, so
    eagerly it would start from scratch each time, while the replay would keep the traced instance."""
    for node in nodes:
        est = node.estimator
        if created_after(mark, est) and (est.has_update or est.state_tensors()):
            raise StorchError(_created_in_step_message(fn, est))


def _check_nodes(nodes: list, fn, replay_only: bool = False) -> None:
    """The traced nodes' estimators can be replayed: their updates (``replays_update``; with a compiler, not one that
    differentiates the loss again)."""
    for node in nodes:
        est = node.estimator
        if est.has_update and not est.replays_update:
            raise StorchError(updating_message(est))
        if est.has_update and est.update_uses_loss_graph and not replay_only:
            raise StorchError(_replay_only_message(est))


_REPLAYED_FUNCTIONS = ("storch.", "torch._library.autograd")  # (the modules of Functions a replay runs again)


def _check_custom_functions(outs: list, fn) -> None:
    """No custom ``torch.autograd.Function`` (a user's, or torch's ``_Dirichlet`` that Dirichlet's and Beta's
    rsample apply) on the autograd path to the step's outputs, walked in the trace's own (eager) autograd graph. The
    trace records the operations its forward runs, not its backward: replayed, the program differentiated them as
    written (a Function doubling the gradient gave half of eager's, silently; Dirichlet's rsample failed at backward
    with torch's "derivative for aten::_sample_dirichlet is not implemented"). storch's own Functions (the order
    guards) are not the step's. Nor is the Function torch generates for a ``torch.library.custom_op`` with
    ``register_autograd``: its forward runs the op below autograd, so the trace records the op itself, whose
    autograd kernel (that Function, with its backward) runs again in the replay (eager's gradient)."""
    stack = [o.grad_fn for o in outs if isinstance(o, torch.Tensor) and o.grad_fn is not None]
    seen: set = set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        cls = getattr(node, "_forward_cls", None)  # set on the backward node of a custom Function
        if cls is not None and not cls.__module__.startswith(_REPLAYED_FUNCTIONS):
            raise StorchError(_custom_function_message(fn, cls))
        stack.extend(n for n, _ in node.next_functions)


def _check_constants(gm: torch.fx.GraphModule, fn) -> None:
    params = {id(p) for p in gm.parameters()}
    captured = [*gm.buffers(), *(v for v in vars(gm).values() if isinstance(v, torch.Tensor))]
    for value in captured:
        if value.requires_grad and id(value) not in params:
            raise StorchError(
                f"{_name(fn)} reads a tensor of shape {tuple(value.shape)} that requires grad but is neither an "
                "argument of the step nor an nn.Parameter; the compiled step would not pass gradients to it. "
                "Pass it as an argument")
