"""``storch.compile``: a storch step traced once into plain batched torch, then compiled.

``torch.compile`` cannot trace plate tensors well: dynamo does not construct tensor wrapper
subclasses inside a graph, so every torch call on a :class:`storch.PlateTensor` is a graph break
(and storch's bookkeeping in between runs as many small frames). ``storch.compile(step)`` takes the
other route. The first call with a given signature (the shapes, strides, dtypes, devices and
``requires_grad`` of the tensor arguments, the other arguments' values, grad mode) runs ``step``
once with storch's Python dispatch under ``make_fx(pre_dispatch=True)``: storch does its plate
alignment, estimator and surrogate bookkeeping on the real tensors as in eager mode, and what gets
recorded is only the raw batched torch program it emits (the same operations a hand-written
surrogate would run, plus storch's grad-mode switches and ``detach``es). A function storch runs per
plate entry with ``torch.func.vmap`` (the vmap treatment: ``flip``, ``gather``, ``scatter``,
``Categorical.log_prob``) is recorded as the batched operations vmap runs (a pre-dispatch trace sees
vmap's wrappers only, so storch traces that call below dispatch and replays it in the trace:
storch.plates.rules.vmap; a non-torch function that storch vmaps is refused there, since a grad-mode
switch or custom autograd.Function inside it would be lost). That program is handed
to ``torch.compile(fullgraph=True)``: one graph, no breaks. Later calls with the same signature
replay the compiled program and never enter storch's Python.

An estimator whose eager code picks a path by values (is every value possible? did the i.i.d.
draws find k distinct values?) takes a value-independent path while traced
(``storch.extending.is_tracing``), with the same distribution, and the replayed program checks
what that path assumes at every call (``storch.extending.assume``: an error that says to run the
step eagerly, never a silently wrong sample). So ``unordered_set`` on one node compiles: it samples
by stochastic beam search and computes its set probabilities in log space, and from the same seed
draws other samples than the eager step (:meth:`CompiledStep.eager` runs the traced paths eagerly).
Over sequences (a partition) its beam step assumes every child of the beam possible, checked at
every call; with ``eos=`` (finished sequences make impossible children) it is refused. The one-step
``sum_and_sample`` compiles the same way: traced, it sums
as many values and draws as many samples as eager code does when the support is large enough (k'
possible values in some entry, and a value outside them), always draws the rejection sampler's
replacement, and assumes that every value of every variable is possible beyond its budget; each
assumption is checked at every call. With ``buffer=`` (sequences) its memory is state: refused.

With ``backend=None`` nothing is compiled: later calls run the traced program as recorded (an FX
graph of the plain torch calls, in Python). That is the eager cost of the same step written by
hand, without storch's per-call dispatch and bookkeeping and without a compiler's first-call time
(a trace takes about a second); the limits below are the same.

What a trace fixes, and what a step may not do (each raises a clear error where it can be seen):

- the step returns tensors (e.g. ``storch.surrogate_loss()``), not plate tensors, and does not call
  ``storch.backward()``: call ``loss.backward()`` on the result;
- estimators that update their own state (``has_update``) are refused unless the update can be
  replayed (``replays_update``: score's moving-average and learned (NVIL) baselines,
  gumbel_softmax's and gumbel_straight_through's temperature schedule; learned control variates
  (relax, rebar, lax) with ``backend=None`` only; a user's trainable baseline module and
  sum_and_sample's buffer of sequences are refused), see below;
- tensors the step reads but does not receive as arguments are captured: ``nn.Parameter``s by
  reference (gradients and optimizer updates work as usual); any other captured tensor that
  requires grad is refused (pass it as an argument); other captured tensors are read live (same
  object) but must not be replaced by new objects between calls. A parameter or buffer that the step
  reached through module attributes (``model.enc.weight``) and that is replaced later
  (``model.load_state_dict(sd, assign=True)``, ``model.enc = nn.Linear(...)``) is seen at the next call,
  which traces again (:func:`_guard`: a dict lookup per attribute of the modules the step names: its
  closure, globals, bound ``self``, and its module arguments); one replaced elsewhere (a global name
  rebound) is not: call :meth:`CompiledStep.clear`. The captured tensors' ``requires_grad`` is checked at
  each call (a parameter unfrozen after a first call made while frozen: traced again, since storch decided
  in Python whether the loss updates estimators and refuses a second differentiation); the ``requires_grad``
  of the reached modules' parameters is part of the key (:meth:`CompiledStep._python_state`), so alternating
  freezes (a GAN) trace each state once. With the default
  backend (inductor, compiled without dynamo's guards) their dtype, device and shape and the autocast state
  are checked as well (``model.double()``: traced again);
- in-place updates of captured buffers and of arguments (BatchNorm's running statistics, a counter,
  ``x.sub_(0.5)``) happen once per call, as eagerly: the trace and the replay check run the step on the
  real tensors, so what they wrote is saved first and put back after each (a refused call changes nothing);
- Python values the step reads (global options, Python numbers, plain objects' attributes) are fixed at
  trace time; call :meth:`CompiledStep.clear` after changing them. Two are watched and key the trace
  (:meth:`CompiledStep._python_state`): the ``training`` flags of the modules the step reaches (``model.eval()``)
  and the values last set of each estimator's options (``est.temperature = 0.1``). A non-tensor argument is traced once per
  value (a step traced ``_RETRACE_WARNING`` times warns: pass a changing number as a 0-dim tensor), and
  tensors the step stores outside itself (a metrics dict) keep the traced call's values;
- data-dependent Python control flow (``if tensor.item() > 0``) cannot be traced: the error says so; so
  are Python reads of a traced tensor's values (``.tolist()``, ``.numpy()``, ``np.asarray``: a loop over
  ``range(max(lengths.tolist()))`` would be fixed to the first call's lengths) and data-dependent shapes
  (a boolean mask ``x[mask]``, ``nonzero``, ``masked_select``, ``unique``: use ``torch.where``), refused
  by a torch function mode active during the trace only (:class:`_TraceMode`);
- differentiating inside the step (``torch.autograd.grad`` or ``.backward()`` on what it computed: a
  gradient penalty, a lookahead step) is refused: the backward pass reads tensors autograd saved in
  the forward pass, which a ``pre_dispatch`` trace cannot connect to the program (they would be fixed
  to the first call's values);
- an order-1 surrogate whose eager hooks refuse a second differentiation (an order-1 estimator, a kink
  on a pathwise path: storch._order_guard) is refused the same way: each call's outputs are hooked
  (so any create_graph pass through them is refused, outside ``estimator_create_graph``);
- with a compiler backend (not ``backend=None``) every output is hooked so: torch's compiled program cannot
  be differentiated twice, and ``torch.autograd.functional.hessian`` of it returned zeros silently. The
  replay (``backend=None``) differentiates to every order (``surrogate_loss(order=2)`` in the step);
- on the first call the step also runs eagerly and its trace runs from the same random state; if they
  disagree (the result depends on Python or generator state the trace cannot see: SPSA's coupled
  draws replay the random state, a ``storch.Graph(generator=...)``) it is refused. A draw from Python's
  ``random`` or numpy's global generator is refused by comparing their states around the trace
  (:func:`_check_python_random`: the values may agree by chance).

An estimator whose update can be replayed (``Estimator.replays_update``; ``score`` with
``baseline="moving_average"``) keeps the eager semantics: the baseline of a step is the average
of earlier steps only, and the update runs when the returned loss is backpropagated with
``.backward()`` (``torch.autograd.grad``, a ``no_grad`` call and a second ``retain_graph``
backward update nothing; a non-finite loss raises ``storch.NonFiniteCostError`` there; so does a step
without updates, whose surrogate loss is checked when a backward pass reaches it, as
``storch.backward()`` would: see :func:`_finite_on_backward`). While
the step is traced, ``surrogate_loss`` adds a zero "probe" input of the program to the loss (two
entries: the second in the graph of the loss's gradient, so that the ``.backward()`` of a second-order
objective built from ``autograd.grad(loss, θ, create_graph=True)`` updates too, as eagerly) and
the estimator's ``update_inputs`` (for the moving average: each cost's detached mean) become extra
outputs of the program; every call makes a fresh probe whose gradient accumulation queues the
estimator's ``update_from`` with that call's values (and ``storch.distributed`` averages them over
ranks there, as eagerly). The state its components read (``state_tensors``: the averages) is
passed to the program as inputs at every call, never baked in, so ``load_state_dict`` works; the
cache keeps a trace per structure of that state (the first step, with no average and so no
baseline, is one program; the steps after it another). Such a step builds one surrogate loss with
updates (a second one is refused), and :meth:`CompiledStep.graph_module`'s program then takes
the inputs :meth:`CompiledStep.program_inputs` lists (the arguments, the probe, the state).
An annealed temperature (``gumbel_softmax(temperature=schedule)``) is the simplest case: its update
needs nothing from the step (``update_inputs`` is empty; ``update_from`` advances the step and
evaluates the schedule in Python), and its state is τ at the current step, a 0-dim float64 tensor
that the program reads at every call (one trace for every step; a bad schedule value raises
``storch.OptionError`` at the next call, before the program runs, as it does eagerly where the
estimator samples). With CUDA tensors, eager torch divides by that CPU scalar as by a float and
inductor copies it to the device in the program (not yet run on a GPU).
NVIL's learned baseline (``score(baseline="learned")``, b = c + b_ψ(h)) replays its regression: the
program returns the detached input h of b_ψ (viewed in each cost's frame) and the detached costs,
and ``update_from`` evaluates b_ψ on them and takes its Adam step eagerly (the code an eager step
runs too), then updates the running means c (state tensors); the replayed forward reads ψ live
(parameters are captured by reference). Its networks are built on first use, which a trace cannot
record: run one step eagerly first (or load a state_dict), else the trace is refused with that reason.
Learned control variates (relax, rebar, lax: φ trained on the gradient's variance) differentiate the
loss again (``update_uses_loss_graph``). With ``backend=None`` the replay runs the program's operations
in autograd's graph, so the program returns their ``update_inputs`` (the distribution parameters) with
their graph and the loss, and right after each call ``loss_graph_values`` computes ∂/∂φ Σ ĝ² from them
(for every call with grad on, also one only evaluated with ``torch.autograd.grad``, whose values are
then dropped); ``update_from`` takes the Adam step on ``.backward()``. A compiled program is one
autograd node, so other backends refuse them. Differentiating inside the traced step itself cannot
work (see above), which is why the second differentiation happens outside the program.
An estimator without an update is tracked this way only if it has state when first traced (a
``score(baseline="moving_average", update=False)`` with loaded averages); one whose first
average is loaded after that first trace needs :meth:`CompiledStep.clear`.

Random draws are recorded as torch random operations, so every call draws fresh samples from
torch's generator. During the trace torch's RNG state is saved and restored (the trace's draws do
not shift the first real call's samples), and torch.distributions argument validation is turned
off, as ``torch.compile`` itself does for the whole process on its first compile. Inductor compiles
with ``fallback_random=True`` (torch's generator: the draws eager storch makes for a seed) unless
``options=`` sets it: its own generator gave two normal draws of one shape the same noise.
"""

from __future__ import annotations

import builtins
import functools
import math
import operator
import random
import sys
import threading
import types
import warnings
import weakref
from typing import Any, Callable, Generic, Optional, TypeVar, Union, overload

import torch
import torch.utils._pytree as pytree

from .errors import NonFiniteCostError, StorchError, assumption_failed
from .estimators.base import Estimator, updating_message
from .graph import Graph, tracing_nodes, tracing_recorder
from .plates.tensor import PlateTensor
from ._order_guard import CountedRefusal, keep_counted_view, refuse_create_graph
from .smoothness import _reaches, inspecting_saved, saved_values_unread
from .surrogate import update_on_backward

if sys.version_info >= (3, 10):
    from typing import ParamSpec
else:  # (a dependency of torch; storch-core requires it on 3.9)
    from typing_extensions import ParamSpec

__all__ = ["compile", "CompiledStep"]

# the compiled step is called like the step: its parameters and return type
_P = ParamSpec("_P")
_R = TypeVar("_R")

_T = torch.Tensor
_RETRACE_WARNING = 8  # traces of one step before a warning (torch._dynamo.config.recompile_limit's default)


class CompiledStep(Generic[_P, _R]):
    """A storch step compiled by :func:`storch.compile`; call it like the step itself.

    Attributes:
        fn: the step function.
        compile_options: keyword arguments for ``torch.compile`` (``backend``, ``mode``, ...).
        traces: the number of traces made so far (one per distinct signature).
    """

    def __init__(self, fn: Callable[_P, _R], compile_options: dict) -> None:
        self.fn = fn
        self.compile_options = compile_options
        self._cache: dict = {}
        self._fast: dict = {}
        self._watch: Optional[tuple] = None  # the modules and estimators whose Python state keys a trace
        self.traces = 0
        functools.update_wrapper(self, fn)

    def __call__(self, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:  # (not a wrapper calling the body: a frame more cost ~0.5 us a call)
            if not kwargs and all(type(a) is _T for a in args):
                # the common call, plain tensors only: a cheaper key (no pytree), its own cache entry
                key = (torch.is_grad_enabled(), self._python_state(()),
                       *[(a.shape, a.stride(), a.dtype, a.device, a.requires_grad)  # type: ignore[attr-defined]
                         for a in args])
                if len(args) > 1:
                    key += _aliasing(args)
                entry = self._fast.get(key)
                if entry is None:
                    entry = self._fast[key] = self._entry(args, kwargs)
                elif entry.__class__ is tuple and entry[5] is not None and not entry[5]():
                    self.clear()  # a captured parameter replaced, or (inductor) its metadata changed: see _guard
                    entry = self._fast[key] = self._entry(args, kwargs)
                if type(entry) is _Stateful:
                    return self._call_stateful(entry, args, kwargs, list(args), key[0])
                outs = _run(entry[1], args, key[0])
                if entry[4] is not None:
                    outs = _refuse_twice(outs, entry[4])
                if key[0]:
                    _finite_on_backward(outs, entry[6], self.fn)
                return outs[0] if entry[3] else pytree.tree_unflatten(list(outs), entry[2])
            leaves, spec = pytree.tree_flatten((args, kwargs))
            key, tensors = _signature(leaves, spec, self._python_state(leaves))
            entry = self._cache.get(key)
            if entry is None or (type(entry) is tuple and entry[5] is not None and not entry[5]()):
                self._fast.clear()
                entry = self._cache[key] = self._new_entry(leaves, spec, tensors)
            if type(entry) is _Stateful:
                return self._call_stateful(entry, args, kwargs, tensors, key[1])
            outs = _run(entry[1], tensors, key[1])
            if entry[4] is not None:
                outs = _refuse_twice(outs, entry[4])
            if key[1]:
                _finite_on_backward(outs, entry[6], self.fn)
            return pytree.tree_unflatten(list(outs), entry[2])
        except RuntimeError as e:  # a check of storch.extending.assume (at the trace's first run too): a StorchError
            failed = assumption_failed(e)
            if failed is None:
                raise
            raise failed from e

    def _entry(self, args, kwargs):
        return self._lookup(args, kwargs)[0]

    def _lookup(self, args, kwargs) -> tuple:
        """The cache entry for these arguments (traced now if new) and their tensors."""
        leaves, spec = pytree.tree_flatten((args, kwargs))
        key, tensors = _signature(leaves, spec, self._python_state(leaves))
        entry = self._cache.get(key)
        if entry is None or (type(entry) is tuple and entry[5] is not None and not entry[5]()):
            entry = self._cache[key] = self._new_entry(leaves, spec, tensors)
        return entry, tensors

    def _python_state(self, leaves) -> tuple:
        """What a trace fixes of Python state outside the arguments, as part of its key: the ``training`` flag of
        the modules the step reaches by name (and of module arguments) and their submodules, the values last set
        of each estimator's options, and the parameters' ``requires_grad``. ``model.eval()`` or ``est.temperature = 0.1`` after a trace selects
        (or makes) the trace for that state, as torch.compile's guards on them do; a trace made before would
        go on computing with training-mode dropout and batch statistics, or the old temperature."""
        watch = self._watch
        if watch is None:
            watch = self._watch = _watched(_reached_modules(self.fn, ()))
        state = _python_state_of(watch)
        for a in leaves:
            if isinstance(a, torch.nn.Module):
                state += _python_state_of(_watched_argument(a))
        return state

    def _new_entry(self, leaves: list, spec, tensors: list):
        """A new cache entry: ``(gm, program, out_spec, single, refusal, guard, checked)``, or for a step with estimator state
        (``state_tensors``, ``replays_update``) a :class:`_Stateful` that holds a trace per structure
        of that state."""
        trace = self._trace(leaves, spec, tensors)
        if not trace.estimators:
            return trace.gm, trace.program, trace.spec, trace.single, trace.refusal, trace.guard, trace.checked
        return _Stateful(trace.estimators, {trace.sig: trace})

    def _variant(self, entry: "_Stateful", args, kwargs, tensors: list) -> tuple["_Trace", list]:
        """The trace for the estimators' state as it is now (traced now if its structure is new), and
        the state's tensors (the program's inputs after the arguments and the update probe)."""
        sig, state = _state_of(entry.estimators)
        trace = entry.variants.get(sig)
        if trace is not None and trace.guard is not None and not trace.guard():
            entry.variants.clear()  # see _guard
            trace = None
        if trace is None:
            leaves, spec = pytree.tree_flatten((args, kwargs))
            trace = self._trace(leaves, spec, tensors)
            if [id(e) for e in trace.estimators] != [id(e) for e in entry.estimators]:
                raise StorchError(
                    f"{_name(self.fn)} uses other estimators than when it was first traced with these arguments: "
                    "call .clear() on the compiled step after changing what it runs")
            entry.variants[trace.sig] = trace
        return trace, state

    def _call_stateful(self, entry: "_Stateful", args, kwargs, tensors: list, grad: bool) -> Any:
        trace, state = self._variant(entry, args, kwargs, tensors)
        probe = None
        if trace.probe is not None:
            dtype, device = trace.probe
            probe = torch.zeros((), dtype=dtype, device=device, requires_grad=True)
            outs = _run(trace.program, [*tensors, probe, *state], grad)
        else:
            outs = _run(trace.program, [*tensors, *state], grad)
        n = trace.n_out
        if trace.refusal is not None:
            outs = [*_refuse_twice(outs[:n], trace.refusal), *outs[n:]]
        if probe is not None:
            values = outs[n + 1:]
            computed = None
            if trace.live_loss:  # an update that differentiates the loss: its values, now (see _Recorder)
                values, loss = values[:-1], values[-1]
                computed = _loss_graph_values(values, loss, trace.updates)
            _update_on_backward(probe, outs[n], values, trace.updates, self.fn, computed)
        elif grad:
            _finite_on_backward(outs, trace.checked, self.fn)
        return outs[0] if trace.single else pytree.tree_unflatten(list(outs[:n]), trace.spec)

    def graph_module(self, *args: Any, **kwargs: Any) -> torch.fx.GraphModule:
        """The traced raw torch program for these arguments (traced now if it was not yet): what
        ``torch.compile`` receives. E.g. ``torch._dynamo.explain(step.graph_module(x))(x)``. For a step
        with estimator state, the program for the state's current structure; its inputs are the
        tensor arguments, then (if the step's loss updates estimators) the update probe, then the
        estimators' ``state_tensors`` (see :meth:`program_inputs`)."""
        entry, tensors = self._lookup(args, kwargs)
        if type(entry) is _Stateful:
            return self._variant(entry, args, kwargs, tensors)[0].gm
        return entry[0]

    def program_inputs(self, *args: Any, **kwargs: Any) -> list:
        """The inputs :meth:`graph_module`'s program takes for these arguments (a fresh update probe)."""
        entry, tensors = self._lookup(args, kwargs)
        if type(entry) is not _Stateful:
            return list(tensors)
        trace, state = self._variant(entry, args, kwargs, tensors)
        if trace.probe is None:
            return [*tensors, *state]
        return [*tensors, torch.zeros((), dtype=trace.probe[0], device=trace.probe[1], requires_grad=True), *state]

    def eager(self, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        """The step run eagerly by storch, on the paths its trace takes: what a compiled call computes
        from the same random state. For most steps that is just ``fn(*args)``; an estimator that picks
        a path by values (``unordered_set``'s i.i.d. sampler, its float64 set programme) takes its
        value-independent path while traced, which draws other samples from the same seed (with the
        same distribution), and here too."""
        with tracing_nodes([]):
            return self.fn(*args, **kwargs)

    def clear(self) -> None:
        """Forget every trace: the next call traces again (after replacing a tensor the step captured elsewhere,
        or changing a Python value it reads that is not watched: see the README's storch.compile section)."""
        self._cache.clear()
        self._fast.clear()
        self._watch = None
        _WATCHED_ARGUMENTS.clear()

    def _trace(self, leaves: list, spec, tensors: list) -> "_Trace":
        positions = [i for i, a in enumerate(leaves) if isinstance(a, torch.Tensor)]
        n_args = len(tensors)
        out_spec = []
        checked: list = []  # the outputs _finite_on_backward checks

        def flat(*ts):
            # ts: the tensor arguments, then the update probe (an input of the program: see _Recorder)
            items = list(leaves)
            for i, t in zip(positions, ts):
                items[i] = t
            recorder = tracing_recorder()
            recorder.probe = ts[n_args]
            args, kwargs = pytree.tree_unflatten(items, spec)
            if watch is None:
                out = self.fn(*args, **kwargs)  # type: ignore[call-arg]  # (the step's own arguments, unflattened)
            else:
                with watch:
                    out = self.fn(*args, **kwargs)  # type: ignore[call-arg]
            outs, s = pytree.tree_flatten(out)
            for o in outs:
                if isinstance(o, PlateTensor):
                    raise StorchError(
                        f"{_name(self.fn)} returned a PlateTensor; a compiled step returns plain tensors: "
                        "return storch.surrogate_loss() (and, for other values, their `.tensor`)")
                if not isinstance(o, torch.Tensor):
                    raise StorchError(
                        f"{_name(self.fn)} returned a {type(o).__name__}; a compiled step returns tensors "
                        "(e.g. storch.surrogate_loss()), whose values change from call to call")
            if not out_spec:  # (the trace; flat runs again in the replay check)
                checked.extend(_losses_among(outs, recorder.losses))
            out_spec.append(s)
            return (*outs, *recorder.extras())

        from torch.fx.experimental.proxy_tensor import make_fx

        devices = sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})
        validate = torch.distributions.Distribution._validate_args
        nodes: list = []
        recorder = _Recorder(self.fn, replay_only=self.compile_options.get("backend") is None)
        floats = [t for t in tensors if t.is_floating_point()]
        probe = torch.zeros((), dtype=floats[0].dtype if floats else torch.get_default_dtype(),
                            device=tensors[0].device if tensors else None, requires_grad=True)
        torch.distributions.Distribution.set_default_validate_args(False)
        watch = _TraceMode(self.fn, tensors)
        python_random = _python_random_state()
        try:
            with torch.random.fork_rng(devices=devices), tracing_nodes(nodes, recorder), Graph(), \
                    _no_backward_in_trace(self.fn), saved_values_unread():
                gm = make_fx(flat, pre_dispatch=True)(*tensors, probe)
        except StorchError:
            raise
        except RuntimeError as e:
            if "data-dependent" in str(e) or "_local_scalar_dense" in str(e):
                raise StorchError(
                    f"storch.compile cannot trace {_name(self.fn)}: some code reads a tensor's value in Python "
                    "(`.item()`, `bool(t)`, `if t > 0:`, a value check), so the program depends on the data. "
                    f"Run this step eagerly, or move that check out of the step. torch said: {e}") from e
            if "does not require grad and does not have a grad_fn" in str(e):
                raise StorchError(_backward_message(self.fn, _traceback_component(e.__traceback__))
                                  + f" torch said: {e}") from e
            raise
        finally:
            torch.distributions.Distribution.set_default_validate_args(validate)
            changed = watch.changed_arguments()
            watch.restore()  # the trace ran the step's in-place updates on the real tensors: undone
        saved, watch = watch, None  # flat runs unwatched from here (the replay check)
        _check_python_random(python_random, self.fn)
        _check_nodes(nodes, self.fn, self.compile_options.get("backend") is None)
        _check_constants(gm, self.fn)
        estimators = _stateful(nodes)
        sig, state = _state_of(estimators)
        used = recorder.loss is not None
        if not used:  # no update to attach: the program takes the arguments (and the state) only
            placeholder = [n for n in gm.graph.nodes if n.op == "placeholder"][n_args]
            gm.graph.erase_node(placeholder)
            gm.recompile()
        _lift_state(gm, state)
        _drop_identity_views(gm)
        _fold_batch_views(gm)
        inputs = [*tensors, probe, *state] if used else [*tensors, *state]
        _check_replay(gm, flat, [*tensors, probe], inputs, devices, self.fn, used, recorder.live is not None,
                      saved.restore, changed)
        self.traces += 1
        if self.traces == _RETRACE_WARNING:  # once per step, as torch.compile's recompile limit warns
            warnings.warn(
                f"storch.compile has traced {_name(self.fn)} {self.traces} times (about a second each, every program "
                "kept). Each distinct value of a non-tensor argument traces again: pass a number that changes "
                "between calls (an annealed KL weight, a learning rate) as a 0-dim tensor, "
                "`torch.tensor(beta)`; so do new argument shapes, grad mode, (un)freezing parameters, train()/eval() and "
                "estimator options (each state once)",
                RuntimeWarning, stacklevel=4)
        trace = _Trace()
        trace.gm, trace.spec = gm, out_spec[0]
        trace.program = _compile_graph(gm, inputs, self.compile_options)
        trace.single = out_spec[0] == pytree.tree_structure(torch.empty(()))  # the step returned one tensor
        trace.n_out = out_spec[0].num_leaves
        trace.checked = tuple(checked)
        trace.probe = (probe.dtype, probe.device) if used else None
        trace.updates, trace.estimators, trace.sig = recorder.updates, estimators, sig
        trace.live_loss = recorder.live is not None
        trace.refusal = (recorder.refusal if recorder.replay_only
                         else _compiled_twice_message(self.fn, recorder.refusal))
        arguments = tuple(a for a in leaves if not isinstance(a, torch.Tensor))
        trace.guard = _guard(gm, _module_attributes(self.fn, arguments), _compiled_by_inductor(self.compile_options))
        return trace

    def __repr__(self) -> str:
        return f"storch.compile({_name(self.fn)}, traces={self.traces})"


@overload
def compile(fn: Callable[_P, _R], *, backend: Any = "inductor", mode: Optional[str] = None,
            options: Optional[dict] = None, dynamic: Optional[bool] = False) -> CompiledStep[_P, _R]: ...


@overload
def compile(fn: None = None, *, backend: Any = "inductor", mode: Optional[str] = None,
            options: Optional[dict] = None, dynamic: Optional[bool] = False,
            ) -> Callable[[Callable[_P, _R]], CompiledStep[_P, _R]]: ...


def compile(fn: Optional[Callable[_P, _R]] = None, *, backend: Any = "inductor", mode: Optional[str] = None,
            options: Optional[dict] = None, dynamic: Optional[bool] = False,
            ) -> Union[CompiledStep[_P, _R], Callable[[Callable[_P, _R]], CompiledStep[_P, _R]]]:
    """Compile a storch step: trace its plate program once into plain torch, then ``torch.compile`` it.

    ``fn(*args)`` builds one step's stochastic computation graph (estimators, costs) and returns
    ``storch.surrogate_loss()`` (or any tensors). The result is called like ``fn``; differentiate its
    output as usual (``loss.backward()``, then the optimizer step). Each distinct signature of the
    arguments (tensor shapes, dtypes, devices, ``requires_grad``; other arguments by value; grad
    mode) is traced and compiled once. The compiled program is one graph without breaks.

    Usable as ``storch.compile(fn)``, ``@storch.compile`` or ``@storch.compile(backend="aot_eager")``.

    Args:
        fn: the step function.
        backend, mode, options, dynamic: passed to ``torch.compile`` (``dynamic=False`` by default:
            every new shape is traced anyway). ``backend=None`` compiles nothing: the traced plain
            torch program is replayed as recorded (eager torch's speed, no compile time); ``mode``
            and ``options`` are then not allowed.

    Raises:
        StorchError: when the step cannot be replayed faithfully (see :mod:`storch.compiled`): it calls
            ``storch.backward()``, returns plate tensors or non-tensors, uses an estimator whose update
            cannot be replayed (a trainable baseline module; a moving average, NVIL's learned baseline
            and an annealed temperature can, and learned control variates with ``backend=None``),
            differentiates inside the step,
            captures a non-parameter tensor that requires grad, or branches on values.

    Example:
        >>> est = storch.estimator("score", plate="z", n_samples=8, baseline="leave_one_out")
        >>> @storch.compile
        ... def loss_fn(x):
        ...     with storch.Graph():
        ...         x = storch.denote_independent(x, 0, "data")
        ...         z = est(Bernoulli(logits=encoder(x)))
        ...         storch.add_cost(reconstruction(decoder(z), x), name="rec")
        ...         return storch.surrogate_loss()
        >>> loss_fn(x).backward()
    """
    if backend is None and (mode is not None or options is not None):
        raise StorchError("storch.compile(backend=None) replays the traced program without a compiler, so it "
                          f"takes no mode= or options= (got mode={mode!r}, options={options!r}); pass a backend "
                          "such as 'inductor' to compile it")
    opts = {"backend": backend, "dynamic": dynamic}
    if mode is not None:
        opts["mode"] = mode
    if options is not None:
        opts["options"] = options
    if fn is None:
        return lambda f: CompiledStep(f, opts)
    if not callable(fn):
        raise TypeError(f"storch.compile expects a function, got {type(fn).__name__}")
    return CompiledStep(fn, opts)


def _compile_graph(gm: torch.fx.GraphModule, tensors: list, options: dict):
    """The traced program, compiled: by inductor directly for the default backend (no dynamo frame
    and guards: :class:`CompiledStep` keys its cache on the arguments itself, and dynamo's call
    overhead on a GraphModule was ~25 us per call, a third of a small compiled step), by
    ``torch.compile(fullgraph=True)`` for any other backend (``"aot_eager"``, a custom one); with
    ``backend=None`` not at all: the traced GraphModule itself runs (its plain torch calls, in Python)."""
    if options.get("backend") is None:
        return _direct_calls(gm)
    if _compiled_by_inductor(options):
        import torch._inductor as inductor

        config = dict(inductor.list_mode_options(options["mode"])) if options.get("mode") else {}
        config.setdefault(_RANDOM, True)  # (see _RANDOM)
        config.update(options.get("options") or {})
        return inductor.compile(gm, list(tensors), options=config)
    if options.get("backend") == "inductor" and not options.get("mode"):
        options = {**options, "options": {_RANDOM: True, **(options.get("options") or {})}}
    return torch.compile(gm, fullgraph=True, **options)


# inductor's own random number generation (torch 2.13, CPU) gave two `aten.normal` draws of one shape in a program
# the SAME noise (the two steps of a Gaussian policy's episode: a silently biased gradient, |z| 10 to 22, found by
# porting REINFORCE on an LQR); with fallback_random it calls torch's generator, as eagerly (the draws are then
# eager's for a seed). A user's options={"fallback_random": False} still decides (with mode= and dynamic=True,
# torch.compile takes no options: patch torch._inductor.config.fallback_random yourself there)
_RANDOM = "fallback_random"


def _compiled_by_inductor(options: dict) -> bool:
    return options.get("backend") == "inductor" and not options.get("dynamic")


def _direct_calls(gm: torch.fx.GraphModule) -> Callable:
    """The traced program as a plain function (``backend=None``): ``gm``'s generated code, with each
    ``torch.ops.<ns>.<op>.<overload>(...)`` call made to the overload's C++ entry point
    (``OpOverload._op``, which ``OpOverload.__call__`` forwards to) and without ``nn.Module.__call__``:
    the same operations with the same arguments, ~0.4 us less per operation (38 in the VAE step's
    program, 261 in the GRU decoder's). ``gm`` itself (``CompiledStep.graph_module``) is unchanged."""
    from torch.fx.node import _get_qualified_name

    code = gm.graph.python_code(root_module="self")
    src, namespace = code.src, dict(code.globals)
    aliases = {}
    for node in gm.graph.nodes:
        target = node.target
        if node.op == "call_function" and isinstance(target, torch._ops.OpOverload):
            call = _get_qualified_name(target) + "("
            if call not in aliases and call in src:
                name = aliases[call] = f"_storch_op_{len(aliases)}"
                namespace[name] = target._op
    for call, name in aliases.items():
        src = src.replace(call, name + "(")
    exec(builtins.compile(src, f"<storch.compile replay of {gm.__class__.__name__}>", "exec"), namespace)
    return functools.partial(namespace["forward"], gm)


def _run(program: Callable, tensors, grad: bool):
    """Run a traced program. The trace records storch's grad-mode switches as they happened: a call
    that raises inside one (a check the replayed program makes, e.g. storch.extending.assume) would
    leave the caller's grad mode switched, so it is restored on the way out."""
    try:
        return program(*tensors)
    except BaseException:
        torch._C._set_grad_enabled(grad)
        raise


def _signature(leaves: list, spec, state: tuple = ()) -> tuple:
    key = [spec, torch.is_grad_enabled(), state]
    tensors = []
    for a in leaves:
        if isinstance(a, torch.Tensor):
            if type(a) is PlateTensor:
                raise StorchError(
                    "a compiled step takes plain tensors: call storch.denote_independent inside the step, "
                    "not before it (plate tensors belong to one graph)")
            tensors.append(a)
            key.append((a.shape, a.stride(), a.dtype, a.device, a.requires_grad))  # inductor checks strides
        else:
            try:
                hash(a)
            except TypeError:
                raise StorchError(
                    f"a compiled step's non-tensor arguments must be hashable (they select the trace); got a "
                    f"{type(a).__name__}") from None
            key.append((type(a), a))
    key.extend(_aliasing(tensors))
    return tuple(key), tensors


def _aliasing(tensors) -> tuple:
    """A key entry where some tensor arguments are one tensor object (``()`` where none are): for each argument, the
    position of its first occurrence. A trace made
    with one tensor passed twice (``step(theta, zeros, zeros)``) holds a single input for both (make_fx follows
    tensors by identity), so a later call with two different tensors computed with one of them for both
    (silently: a masked argument's -inf reached the loss as NaN; found by review): such calls are traced apart."""
    if len(set(map(id, tensors))) == len(tensors):
        return ()
    first: dict = {}
    return (tuple(first.setdefault(id(t), i) for i, t in enumerate(tensors)),)


def _check_replay(gm: torch.fx.GraphModule, flat: Callable, tensors: list, inputs: list, devices: list, fn,
                  updates: bool, loss_graph: bool = False, restore: Callable[[], None] = lambda: None,
                  changed: int = 0) -> None:
    """Run the step eagerly and its trace from the same random state: they must agree.

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
        try:
            with torch.random.fork_rng(devices=devices), grad, tracing_nodes([], recorder), Graph():
                want = flat(*tensors)
        finally:
            restore()
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


def _check_nodes(nodes: list, fn, replay_only: bool = False) -> None:
    for node in nodes:
        est = node.estimator
        if est.has_update and not est.replays_update:
            raise StorchError(updating_message(est))
        if est.has_update and est.update_uses_loss_graph and not replay_only:
            raise StorchError(_replay_only_message(est))


def _replay_only_message(est) -> str:
    return (f"storch.compile can replay estimator {est.name!r} (plate {est.plate!r}) only without a compiler: its "
            "update differentiates the loss again (e.g. a control variate trained on the gradient's variance), "
            "which needs the program's operations in autograd's graph, and a compiled program is one autograd "
            "node. Use storch.compile(step, backend=None), or run the step eagerly")


def _compiled_twice_message(fn, eager: Optional[Callable[[], str]]) -> Callable[[], str]:
    """The refusal hooked on every output of a compiler backend's program (see :func:`_refuse_twice`): torch's
    compiled program is one autograd node that cannot be differentiated twice, and
    ``torch.autograd.functional.hessian`` of it gave zeros silently (its second pass found no graph; a
    grad-of-grad and ``hvp`` raised torch's "does not currently support double backward"). ``eager``: the
    traced step's own refusal (an order-1 estimator, a kink), which ``backend=None`` keeps."""
    def message() -> str:
        text = (f"{_name(fn)}, compiled by storch.compile with a compiler backend, is differentiated again (a backward "
                "pass with create_graph=True: torch.autograd.grad(..., create_graph=True), "
                "torch.autograd.functional.hessian / hvp / vhp / jacobian(create_graph=True)): torch's compiled "
                "programs cannot be differentiated twice (torch.autograd.functional.hessian returns zeros). For "
                "higher derivatives use storch.compile(step, backend=None), whose replay runs the traced operations "
                "through autograd (return storch.surrogate_loss(order=n) from the step for derivatives of order n), "
                "or run the step eagerly")
        return text if eager is None else f"{text}. Besides, {eager()}"
    return message


# -- estimators with state: the update a compiled step replays (Estimator.replays_update) ----------


class _Trace:
    """One traced and compiled program. Its inputs: the step's tensor arguments, the update probe (if
    ``probe``: its dtype and device), the estimators' state tensors; its outputs: the step's ``n_out``
    tensors (``spec``; ``single``: one tensor), then (with a probe) the surrogate loss without it and
    the tensors of each of ``updates``' ``update_inputs`` (``(estimator, spec, leaves)``: its
    flattened leaves, ``None`` where a tensor output goes).
    ``estimators``: those whose state the program reads, ``sig`` its structure when traced."""

    __slots__ = ("gm", "program", "spec", "single", "n_out", "checked", "probe", "updates", "estimators", "sig", "live_loss",
                 "refusal", "guard")


class _Stateful:
    """The cache entry of a step with estimator state: a trace per structure of the state (which
    moving averages exist: the first step has none, and so no baseline, and traces another program)."""

    __slots__ = ("estimators", "variants")

    def __init__(self, estimators: list, variants: dict) -> None:
        self.estimators, self.variants = estimators, variants


def _stateful(nodes: list) -> list:
    """The estimators of the traced nodes whose state the program reads or whose update it replays."""
    out, seen = [], set()
    for node in nodes:
        est = node.estimator
        if id(est) not in seen and (est.replays_update or est.state_tensors()):
            seen.add(id(est))
            out.append(est)
    return out


def _state_of(estimators: list) -> tuple[tuple, list]:
    """The structure of the estimators' state (keys, shapes, dtypes, devices: the trace's key) and its tensors."""
    sig, state = [], []
    for est in estimators:
        items = []
        for key, value in est.state_tensors().items():
            if not isinstance(value, torch.Tensor):
                raise StorchError(f"estimator {est.name!r}: state_tensors() must map names to tensors; {key!r} "
                                  f"is a {type(value).__name__}")
            items.append((key, value.shape, value.dtype, value.device, value.requires_grad))
            state.append(value)
        sig.append(tuple(items))
    return tuple(sig), state


def _lift_state(gm: torch.fx.GraphModule, state: list) -> None:
    """Make the estimators' state tensors, which the trace captured as constants, inputs of the
    program (after the others, in ``state``'s order): each call passes their current values."""
    if not state:
        return
    graph = gm.graph
    index = {}
    for i, t in enumerate(state):
        index.setdefault(id(t), i)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    inputs = []
    for i, t in enumerate(state):
        if i == 0 and not placeholders:  # no tensor argument and no probe (a call under no_grad): the first inputs
            with graph.inserting_before(next(iter(graph.nodes))):
                anchor = graph.placeholder(f"state_{i}")
        else:
            with graph.inserting_after(anchor if i else placeholders[-1]):
                anchor = graph.placeholder(f"state_{i}")
        anchor.meta["val"] = t
        inputs.append(anchor)
    lifted = set()
    for node in list(graph.nodes):
        if node.op == "get_attr":
            value = getattr(gm, node.target, None)
            i = index.get(id(value)) if isinstance(value, torch.Tensor) else None
            if i is not None:
                node.replace_all_uses_with(inputs[i])
                graph.erase_node(node)
                lifted.add(node.target)
    # removed after the walk: make_fx records one get_attr node per read of a constant, so a state tensor
    # read twice (two costs of one name share a moving average) has two nodes of one target, and deleting
    # the attribute at the first left the second reading a constant the module no longer had
    for target in lifted:
        delattr(gm, target)
    gm.recompile()


class _Recorder:
    """What ``surrogate_loss`` hands over while ``storch.compile`` records a step whose loss updates
    estimators (storch.surrogate.updates._updates_on_backward): the loss gets the program's probe input
    added (a zero whose gradient accumulation, at each replay, queues the updates, as the eager
    probe does), and the program returns the loss and the estimators' ``update_inputs`` as extra
    outputs. ``decided``: on the replay check (grad off), whether the trace recorded an update."""

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

    def __call__(self, loss: torch.Tensor, updating: dict) -> torch.Tensor:
        if not (loss.requires_grad if self.decided is None else self.decided):
            return loss  # eagerly too: no backward, no update
        if self.loss is not None:
            raise StorchError(
                f"storch.compile: {_name(self.fn)} builds more than one surrogate loss with estimators that update "
                "their state on .backward(); a compiled step builds one: return it, and call .backward() on it")
        for nodes in updating.values():
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


def _refuse_twice(outs, message: Callable[[], str]) -> Any:
    """Hook a replayed call's outputs (the surrogate loss) with the traced step's refusal of a second
    differentiation (storch._order_guard): a backward pass with ``create_graph=True`` through them raises
    storch's OrderError, as the eager step's hooks on the terms inside do (outside
    ``estimator_create_graph``). With a compiler backend the program is one autograd node whose outputs
    cannot be differentiated twice anyway (torch said only that a tensor "appears to not have been used
    in the graph"), so the error says what was wrong there too."""
    if not isinstance(message, CountedRefusal):
        for o in outs:
            if o.grad_fn is not None:  # (an input returned as it is holds no term: hooked, it got a hook per call)
                refuse_create_graph(o, message)
        return outs
    # an order-n refusal (n >= 2) counts the passes with a hook that holds its tensor weakly: the caller gets a
    # view of each hooked output whose autograd node keeps it (a result used in an expression, `step(x) + reg`,
    # would free it otherwise; a review found that refused)
    views: dict[int, Any] = {}  # (one view per output tensor: a step returning (loss, loss) keeps the identity)
    return [views[id(o)] if id(o) in views else views.setdefault(id(o), keep_counted_view(o, message)) for o in outs]


def _loss_graph_values(values: tuple, loss: torch.Tensor, updates: list) -> dict:
    """For each update that differentiates the loss again (``update_uses_loss_graph``), by its position
    in ``updates``: ``est.loss_graph_values(loss, inputs)`` of this replayed call, computed now, while
    the call's graph exists (``_NO_UPDATE`` when it has none: grad off, no backward, no update, as
    eagerly). ``values``: the program's update outputs (the ``update_inputs`` leaves, with their graph)."""
    out = {}
    tensors = iter(values)
    for j, (est, spec, template) in enumerate(updates):
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
            leaves = [next(tensors) if v is None else v for v in template]
            if computed and j in computed:  # loss_graph_values, computed after the call
                if computed[j] is not _NO_UPDATE:
                    est.update_from(computed[j])
                continue
            est.update_from(pytree.tree_unflatten(leaves, spec))

    update_on_backward(probe, check, lambda todo: run(), set())  # a call is a step, with one surrogate (a second is refused)


def _losses_among(outs: list, losses: list) -> list[int]:
    """The positions among a traced step's outputs of the surrogate losses it built and of what it computed from
    them (``surrogate_loss() + reg``, ``2 * loss``, ``torch.stack([l1, l2])``, ``loss.reshape(1)``): the outputs
    whose autograd graph reaches one of them (not an input returned as it is, not a metric beside the loss)."""
    if not losses:
        return []
    return [i for i, o in enumerate(outs)
            if o.grad_fn is not None and o.is_floating_point()
            and (any(o is loss for loss in losses) or _reaches([o], losses))]


def _finite_on_backward(outs, checked: tuple, fn) -> None:
    """Check the surrogate losses among ``outs`` of a replayed call whose step updates no estimator (no update
    probe; ``checked``: their positions, :func:`_losses_among`) for being finite when a backward pass reaches them,
    before the pass goes on. ``.backward()`` on the compiled step's loss is what replaces ``storch.backward()``
    there (refused in a traced step), and storch.backward() raises ``NonFiniteCostError`` on a non-finite loss:
    without this check a NaN loss (a Bernoulli's infinite logit under score, arm, disarm, mvd, rebar or relax,
    whose torch log p is NaN there) gave NaN gradients silently. A ``torch.autograd.grad`` of the loss is checked
    too (eagerly only ``storch.backward()`` is), which refuses nothing that would not be NaN.

    On the CPU the value is read now (~1 us) and only a non-finite loss gets a hook on its autograd node, which
    raises when a pass reaches it: a Python hook on the node costs ~5 us a call (measured: ~10% of a replayed toy
    step) and reading a value on an accelerator waits for it, so there the hook reads it, as storch.backward()
    does, when a pass reaches it. The hook holds a detached alias (a weak reference missed ``(step(x) + reg)
    .backward()``: the temporary output was freed before the pass; found by review). Only the losses: eagerly
    storch.backward() checks the costs, not what else a step returns (a masked -inf logit returned beside a finite
    loss, whose backward shares the loss's node under a compiler backend, was refused by a first version), and
    never an input returned as it is (a first version hooked a parameter on every call)."""
    for i in checked:
        o = outs[i]
        if o.is_cpu:
            if not _finite(o):
                node = o.grad_fn
                if node is not None:
                    node.register_prehook(_refusal(fn))
        elif not o.is_meta and o.grad_fn is not None:
            o.grad_fn.register_prehook(_finite_check(o.detach(), fn))


def _finite(o: torch.Tensor) -> bool:
    return math.isfinite(o.item()) if o.dim() == 0 else bool(torch.isfinite(o.detach()).all())


def _finite_check(value: torch.Tensor, fn) -> Callable[[Any], None]:
    def check(_grad) -> None:
        if not _finite(value):
            _refusal(fn)(_grad)
    return check


def _refusal(fn) -> Callable[[Any], None]:
    def refuse(_grad) -> None:
        raise NonFiniteCostError(
            f"a result of the compiled step {_name(fn)} that a backward pass reached is not finite (NaN or inf), "
            "so its gradient would be too, as storch.backward() refuses eagerly: the backward pass stopped "
            "before accumulating any gradient. A common cause: a Bernoulli or Binomial "
            "with an infinite logit (a masked or pinned bit) under an estimator that reads torch's log_prob "
            "(score, arm, disarm, mvd, rebar, relax), which is NaN for the value such a bit always takes: use a "
            "large finite logit (±30), or an estimator that handles infinite logits (expect, sum_and_sample, "
            "go; eagerly also unordered_set and spsa). Run the step eagerly with storch.backward() to see which "
            "cost is not finite, or catch storch.NonFiniteCostError to skip the batch")
    return refuse


def _backward_message(fn, component: Optional[str] = None) -> str:
    if component is not None:
        # the backward pass runs inside an estimator's component, not in the user's code
        return (f"storch.compile cannot trace {_name(fn)}: {component} differentiates (torch.autograd.grad or "
                ".backward()) inside the step. The trace records the forward program only; the saved tensors that "
                "backward pass reads would be fixed to the first call's values, so an estimator component that "
                "differentiates cannot be compiled. Run this step eagerly (without storch.compile), or use an "
                "estimator whose components compute that derivative without autograd.")
    return (f"storch.compile cannot trace {_name(fn)}: it differentiates inside the step (torch.autograd.grad or "
            ".backward() on something the step computed: a gradient penalty, a lookahead step, a learned control "
            "variate's update). The trace records the forward program only; the saved tensors that backward pass "
            "reads would be fixed to the first call's values. Return the loss and differentiate the compiled "
            "step's result outside it, or run this step eagerly.")


def _estimator_component(frame) -> Optional[str]:
    """The innermost estimator method on the stack from ``frame`` outwards, described
    (``"the control_variate of estimator 'x' (X)"``), or ``None`` when no estimator code is running."""
    while frame is not None:
        est = frame.f_locals.get("self")
        if isinstance(est, Estimator):
            return f"the {frame.f_code.co_name} of estimator {est.name!r} ({type(est).__qualname__})"
        frame = frame.f_back
    return None


def _traceback_component(tb) -> Optional[str]:
    """:func:`_estimator_component` of the innermost frame of a traceback."""
    last = None
    while tb is not None:
        last, tb = tb.tb_frame, tb.tb_next
    return _estimator_component(last)


def _no_backward_in_trace(fn):
    """Saved-tensor hooks for the trace: a backward pass run inside the step unpacks tensors that autograd
    saved in the forward pass, which ``make_fx(pre_dispatch=True)`` cannot connect to the program (they
    would become constants of the first call, or lose their graph): it is refused where it happens."""
    tracing_thread = threading.get_ident()  # autograd may run the hook on a device thread: read this one's stack

    def unpack(saved):
        if inspecting_saved():  # storch's smoothness walk reads a saved tensor's dtype or shape: no backward
            return saved
        raise StorchError(_backward_message(fn, _estimator_component(sys._current_frames().get(tracing_thread))))

    return torch.autograd.graph.saved_tensors_hooks(lambda t: t, unpack)


def _check_constants(gm: torch.fx.GraphModule, fn) -> None:
    params = {id(p) for p in gm.parameters()}
    captured = [*gm.buffers(), *(v for v in vars(gm).values() if isinstance(v, torch.Tensor))]
    for value in captured:
        if value.requires_grad and id(value) not in params:
            raise StorchError(
                f"{_name(fn)} reads a tensor of shape {tuple(value.shape)} that requires grad but is neither an "
                "argument of the step nor an nn.Parameter; the compiled step would not pass gradients to it. "
                "Pass it as an argument")


def _drop_identity_views(gm: torch.fx.GraphModule) -> None:
    """Remove views that change nothing (``expand`` to the same shape, ``movedim(x, d, d)``) from the
    trace: storch's alignment emits them where plates already line up, and inductor treats an
    ``expand`` as a layout constraint (it copied the channels-last output of a convolution that
    the next convolution would read as it is)."""
    aten = torch.ops.aten
    changed = False
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        src = node.args[0] if node.args else None
        if not isinstance(src, torch.fx.Node):
            continue
        same = False
        if node.target is aten.expand.default:
            a, b = src.meta.get("val"), node.meta.get("val")
            same = a is not None and b is not None and tuple(a.shape) == tuple(b.shape)
        elif node.target is aten.movedim.int:
            same = node.args[1] == node.args[2]
        if same:
            node.replace_all_uses_with(src)
            gm.graph.erase_node(node)
            changed = True
    if changed:
        gm.recompile()


def _fold_batch_views(gm: torch.fx.GraphModule) -> None:
    """Let elementwise functions between two batch-first calls run on the folded batch.

    storch runs a convolution with every plate folded into its batch dim and unfolds the result
    (``unflatten(out, 0, plates)``); an activation then runs on the unfolded view and the next
    convolution folds it again (``flatten(0, k)``). Eagerly these are free views; inductor,
    however, gives the activation's 5-dim output its own (contiguous) layout and copies it back to
    the channels-last layout the next convolution wants. Moving the ``unflatten`` after
    single-tensor elementwise ops and cancelling ``flatten(unflatten(x))`` gives the graph a
    hand-written batched step has. Only rewrites that keep every value the same."""
    aten = torch.ops.aten
    pointwise = torch.Tag.pointwise
    changed = False
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        if node.target is aten.flatten.using_ints:
            src = node.args[0]
            if (isinstance(src, torch.fx.Node) and src.target is aten.unflatten.int and src.args[1] == 0
                    and tuple(node.args[1:]) == (0, len(src.args[2]) - 1)):
                node.replace_all_uses_with(src.args[0])
                gm.graph.erase_node(node)
                changed = True
            continue
        if pointwise not in node.target.tags or node.kwargs or node.target._schema.is_mutable:
            continue
        tensors = [a for a in node.args if isinstance(a, torch.fx.Node)]
        if len(tensors) != 1 or node.args[0] is not tensors[0]:
            continue
        src = tensors[0]
        if src.target is not aten.unflatten.int or src.args[1] != 0:
            continue
        with gm.graph.inserting_before(node):
            inner = gm.graph.call_function(node.target, (src.args[0], *node.args[1:]))
            outer = gm.graph.call_function(aten.unflatten.int, (inner, 0, src.args[2]))
        node.replace_all_uses_with(outer)
        gm.graph.erase_node(node)
        changed = True
    if changed:
        gm.graph.eliminate_dead_code()
        gm.recompile()


def _name(fn) -> str:
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)


# -- what the trace watches: value reads, data-dependent shapes, in-place state, module attributes --

_VALUE_READS = frozenset((_T.tolist, _T.numpy, _T.__array__))
# reads that make_fx refuses itself for a tensor the program computes, but not for a captured one (no proxy slot)
_SCALAR_READS = frozenset((_T.item, _T.__bool__, _T.__int__, _T.__float__, _T.__index__, _T.__complex__))
_DATA_SHAPES = frozenset(f for f in (
    torch.nonzero, _T.nonzero, torch.argwhere, _T.argwhere, torch.masked_select, _T.masked_select,
    torch.unique, _T.unique, torch.unique_consecutive, _T.unique_consecutive, torch.Tensor.unique_consecutive,
) if f is not None)
# data-dependent shapes only for some arguments (see _TraceMode._data_shape)
_WHERE = frozenset((torch.where, _T.where))
_BINCOUNT = frozenset((torch.bincount, _T.bincount))
_REPEAT_INTERLEAVE = frozenset((torch.repeat_interleave, _T.repeat_interleave))
_TENSOR_SPLIT = frozenset((torch.tensor_split, _T.tensor_split))
# functions that update running statistics (their 2nd and 3rd arguments) in place, without a version bump
_RUNNING_STATS = frozenset((torch.nn.functional.batch_norm, torch.batch_norm, torch.nn.functional.instance_norm,
                            torch.instance_norm, torch.native_batch_norm))


def _value_message(fn, what: str) -> str:
    return (f"storch.compile cannot trace {_name(fn)}: some code reads a tensor's value in Python ({what}), so the "
            "program depends on the data and the trace would fix it to the first call's values. Run this step "
            "eagerly, or move that code out of the step (pass what it computes as an argument: each value "
            "of a non-tensor argument is traced once)")


def _shape_message(fn, what: str) -> str:
    return (f"storch.compile cannot trace {_name(fn)}: {what} gives a data-dependent shape (the number of "
            "selected entries depends on the values), which a trace would fix to the first call's. Use "
            "torch.where (keep the shape, mask the values: e.g. a zero cost for padding rows), or run this step "
            "eagerly")


class _TraceMode(torch.overrides.TorchFunctionMode):
    """Active while ``make_fx`` traces the step (only then: a mode routes every torch call through Python).

    - It refuses Python reads of a traced tensor's values that ``make_fx`` lets through (``tolist``,
      ``numpy``, ``__array__``: ``.item()`` and ``bool()`` are refused by make_fx itself) and selections
      whose shape depends on the values (a boolean mask index, ``nonzero``): the trace would silently fix
      them to the first call's data.
    - The trace, and then the replay check, run the step's torch operations on the real tensors, so an
      in-place update of a captured buffer (BatchNorm's running statistics, a step counter) or of an argument
      would happen three times before the first call's own. The first time such a tensor is about to be
      written, its value is saved; :meth:`restore` puts back every saved tensor that changed, after each of
      those runs (the first call then has one eager call's effect, a refused one none)."""

    def __init__(self, fn, args: list) -> None:
        super().__init__()
        self.fn = fn
        self.args = {id(t) for t in args}
        self.saved: dict = {}  # id -> [tensor, version after saving, value]
        self.tracer = None

    def __enter__(self):
        from torch.fx.experimental.proxy_tensor import get_proxy_mode

        mode = get_proxy_mode()
        self.tracer = None if mode is None else mode.tracer
        return super().__enter__()

    def _traced(self, t) -> bool:
        """``t`` is a plain tensor the program computes (not a constant ``torch.tensor(...)``): make_fx's own test
        for ``.item()``."""
        from torch.fx.experimental.proxy_tensor import get_proxy_slot, has_proxy_slot

        return (type(t) is _T and self.tracer is not None and has_proxy_slot(t, self.tracer)
                and get_proxy_slot(t, self.tracer).constant is None)

    def _captured(self, t) -> bool:
        """``t`` is a tensor from outside the step (a captured buffer or parameter: no proxy slot; a parameter
        is a subclass). Its value may change between calls (an optimizer step, ``buffer.fill_``), so a Python
        read of it in the trace would fix the first call's value."""
        from torch._C._functorch import is_functorch_wrapped_tensor
        from torch.fx.experimental.proxy_tensor import get_proxy_mode, has_proxy_slot

        if not isinstance(t, _T) or self.tracer is None or is_functorch_wrapped_tensor(t):
            return False
        mode = get_proxy_mode()
        if mode is None or mode.tracer is not self.tracer:
            return False  # a nested trace, or proxy tracing switched off (torch's own bookkeeping)
        return isinstance(t, torch.nn.Parameter) or not has_proxy_slot(t, self.tracer)

    def _data_shape(self, func, args, kwargs) -> Optional[str]:
        """The name of a call whose output shape depends on its input's values (beyond _DATA_SHAPES), or None."""
        if func in _DATA_SHAPES:
            return func.__name__ if args and self._traced(args[0]) else None
        if func in _WHERE:  # one argument: nonzero(as_tuple=True)
            cond = args[0] if args else kwargs.get("condition")
            if len(args) + len(kwargs) == 1 and self._traced(cond):
                return "torch.where(condition) with one argument"
        elif func in _BINCOUNT:  # its length is the largest value + 1 (at least minlength)
            if args and self._traced(args[0]):
                return "bincount"
        elif func in _REPEAT_INTERLEAVE:  # tensor repeats: the output's length is their sum
            repeats = args[1] if len(args) > 1 else kwargs.get("repeats", args[0] if len(args) == 1 else None)
            if self._traced(repeats):
                return "repeat_interleave with tensor repeats"
        elif func in _TENSOR_SPLIT:  # tensor indices: the pieces' lengths are their values
            sections = args[1] if len(args) > 1 else kwargs.get("indices_or_sections",
                                                                 kwargs.get("indices", kwargs.get("sections")))
            if self._traced(sections):
                return "tensor_split with tensor indices"
        return None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _VALUE_READS and args and (self._traced(args[0]) or self._captured(args[0])):
            raise StorchError(_value_message(
                self.fn, f"`.{func.__name__}()` of a tensor the program computes or reads from outside the step "
                         "(a buffer or parameter, whose value changes between calls)"))
        if func in _SCALAR_READS and args and self._captured(args[0]):
            raise StorchError(_value_message(
                self.fn, f"`{func.__name__}` of a tensor from outside the step (a buffer or parameter, whose "
                         "value changes between calls)"))
        shape = self._data_shape(func, args, kwargs)
        if shape is not None:
            raise StorchError(_shape_message(self.fn, f"`{shape}`"))
        if func is _T.__getitem__ and len(args) > 1:
            index = args[1] if isinstance(args[1], tuple) else (args[1],)
            for i in index:
                if isinstance(i, _T) and i.dtype in (torch.bool, torch.uint8) and self._traced(i):
                    raise StorchError(_shape_message(self.fn, "indexing with a boolean mask (`x[mask]`)"))
        name = getattr(func, "__name__", "")
        if args and ((name.endswith("_") and not name.endswith("__")) or func is _T.__setitem__):
            self._save(args[:1])
        elif func in _RUNNING_STATS:
            self._save([*args[1:3], kwargs.get("running_mean"), kwargs.get("running_var")])
        if "out" in kwargs:
            self._save(pytree.tree_leaves(kwargs["out"]))
        return func(*args, **kwargs)

    def _save(self, values) -> None:
        from torch._C._functorch import is_functorch_wrapped_tensor
        from torch.fx.experimental.proxy_tensor import disable_proxy_modes_tracing, get_proxy_mode, has_proxy_slot

        mode = get_proxy_mode()
        if mode is None or mode.tracer is not self.tracer:
            return  # a nested trace (storch's vmap rule traces a vmapped call below dispatch): its own tensors
        for t in values:
            if type(t) is not _T or is_functorch_wrapped_tensor(t):
                continue  # a parameter's update is the optimizer's; plate tensors hold traced tensors
            while t._base is not None:  # a write through a view (`stats[0].add_(1)`, `x[:, 0].add_(1)`)
                t = t._base             # changes its root: save the root, if it is an argument or captured
            if type(t) is not _T or id(t) in self.saved:
                continue
            if id(t) in self.args or self.tracer is None or not has_proxy_slot(t, self.tracer):
                # an argument, or a tensor from outside the step (a captured buffer): the trace would change it
                with disable_proxy_modes_tracing(), torch._C.DisableTorchFunction(), torch.no_grad():
                    self.saved[id(t)] = [t, t._version, t.clone()]

    def changed_arguments(self) -> int:
        return sum(1 for k, (t, v, value) in self.saved.items()
                   if k in self.args and (t._version != v or not torch.equal(t, value)))

    def restore(self) -> None:
        with torch.no_grad():
            for item in self.saved.values():
                t, version, value = item
                # batch_norm's update of its running statistics does not bump their version
                if t._version != version or not torch.equal(t, value):
                    t.copy_(value)
                    item[1] = t._version


def _watched(roots: list) -> tuple:
    """The modules among ``roots`` and their submodules (their ``training`` flag: read by dropout, batch norm,
    RNNs, a user's modules, the step itself (``training=model.training``) and hooks (spectral_norm's), so every
    module's), the estimators (their options), and the parameters (their ``requires_grad``: freezing and
    unfreezing, e.g. a GAN's alternating steps, selects a trace per state instead of tracing again at each
    switch; :func:`_guard` still checks the captured ones)."""
    modules, estimators, seen = [], [], set()
    for root in roots:
        for m in root.modules():
            if id(m) in seen:
                continue
            seen.add(id(m))
            if isinstance(m, Estimator):
                estimators.append(m)  # estimators do not read training (docs/reliability.md): their options
            else:
                modules.append(m)
    parameters = {id(p): p for root in roots for p in root.parameters()}
    return tuple(modules), tuple(estimators), tuple(parameters.values())


_training = operator.attrgetter("training")
_options_key = operator.attrgetter("_options_key")


def _python_state_of(watch: tuple) -> tuple:
    # (map with attribute getters: ~0.05 us a module or parameter)
    modules, estimators, parameters = watch
    return (*map(_training, modules), *map(_options_key, estimators), *map(_requires_grad, parameters))


_WATCHED_ARGUMENTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # module argument -> _watched([it])


def _watched_argument(module: torch.nn.Module) -> tuple:
    watch = _WATCHED_ARGUMENTS.get(module)
    if watch is None:
        watch = _WATCHED_ARGUMENTS[module] = _watched([module])
    return watch


def _module_attributes(fn: Callable, arguments: tuple = ()) -> dict:
    """Every module attribute (``model.enc``, ``enc.weight``) of the modules the step can reach by name: the
    function's closure, its bound ``self``, its defaults and the globals its code names (also those of the
    functions these hold, a few levels deep), and its non-tensor ``arguments`` (``step(model, x)``: a module
    argument selects the trace by identity, so its replaced parameters must be watched as well). The trace captures the parameters and buffers it read, so if
    one is replaced later (``load_state_dict(sd, assign=True)``, ``model.enc = nn.Linear(...)``) the program
    would go on computing with (and training) the old ones; :func:`_guard` keeps the attributes that lead to
    captured tensors and checks them at each call. A module reached otherwise (an attribute of a plain
    object, a container built in the step) is not seen: call :meth:`CompiledStep.clear` after replacing its
    parameters. Returns ``{(id(holder), name): (owner, holder, name, value)}``."""
    out: dict = {}
    for root in _reached_modules(fn, arguments):
        for owner in root.modules():
            d = owner.__dict__
            for kind in ("_parameters", "_buffers", "_modules"):
                holder = d.get(kind)
                if holder:
                    for name, value in holder.items():
                        if value is not None:
                            out.setdefault((id(holder), name), (owner, holder, name, value))
    return out


def _reached_modules(fn: Callable, arguments: tuple = ()) -> list:
    """The modules ``fn`` reaches by name (see :func:`_module_attributes`) and the module ``arguments``."""
    roots: list = []
    seen: set = set()

    def visit(v, depth: int) -> None:
        if id(v) in seen:
            return
        seen.add(id(v))
        if isinstance(v, torch.nn.Module):
            roots.append(v)
        elif isinstance(v, (list, tuple)) and depth < 4:
            for item in v[:64]:
                visit(item, depth + 1)
        elif isinstance(v, dict) and depth < 4:
            for item in list(v.values())[:64]:
                visit(item, depth + 1)
        elif isinstance(v, functools.partial) and depth < 4:
            visit(v.func, depth + 1)
            visit(v.args, depth + 1)
            visit(v.keywords, depth + 1)
        elif callable(v) and depth < 4:
            self_ = getattr(v, "__self__", None)
            if self_ is not None:
                visit(self_, depth + 1)
            f = getattr(v, "__func__", v)
            code = getattr(f, "__code__", None)
            if code is None:
                return
            for cell in getattr(f, "__closure__", None) or ():
                try:
                    visit(cell.cell_contents, depth + 1)
                except ValueError:  # an empty cell
                    pass
            for d in getattr(f, "__defaults__", None) or ():
                visit(d, depth + 1)
            names, codes = set(), [code]
            while codes:
                c = codes.pop()
                names.update(c.co_names)
                codes.extend(k for k in c.co_consts if isinstance(k, types.CodeType))
            g = getattr(f, "__globals__", {})
            for n in names:
                if n in g:
                    visit(g[n], depth + 1)

    visit(fn, 0)
    for a in arguments:
        visit(a, 1)
    return roots


def _autocast_state():
    if not torch._C._is_any_autocast_enabled():
        return None
    return tuple((d, torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in ("cpu", "cuda"))


def _metadata(tensors) -> tuple:
    return _autocast_state(), *[(t.requires_grad, t.dtype, t.device, t.shape) for t in tensors]


def _tensor_check(tensors: tuple) -> Optional[Callable[..., bool]]:
    """dynamo's C++ check of tensors' dtype, device, requires_grad, sizes and strides (its guard on a compiled
    frame's tensors; ~0.06 us a tensor, building _metadata's tuples ~0.4), or None where this torch lacks it.
    It also compares the dispatch keys under the thread's current ones (inference_mode changes them): so a
    failing check is only a hint, confirmed by _metadata. The same tensor objects stay captured (a module's
    .to() and .double() replace a parameter's .data in place), so only their metadata is compared."""
    try:
        from torch._C._dynamo.guards import TensorGuards

        check = TensorGuards(*tensors, dynamic_dims_sizes=[list(t.shape) for t in tensors],
                             dynamic_dims_strides=[list(t.stride()) for t in tensors]).check
        if not check(*tensors):
            return None
    except Exception:  # a private API: another torch version's signature
        return None
    return check


_requires_grad = operator.attrgetter("requires_grad")


def _guard(gm: torch.fx.GraphModule, reads: dict, metadata: bool) -> Optional[Callable[[], bool]]:
    """A per-call check that the program still fits what the step reads outside its arguments, or None.

    - Every module attribute through which the trace reached a captured parameter or buffer still holds the
      same object (see :func:`_module_attributes`): a dict lookup each.
    - With ``metadata`` (inductor, compiled without dynamo's guards: :func:`_compile_graph`): the captured
      tensors' ``requires_grad``, dtype, device and shape and the autocast state are as when traced
      (inductor specialises its program to them: a parameter unfrozen after the first call got no gradient,
      ``model.double()`` gave NaN). The other backends follow them: dynamo guards them, ``backend=None``
      runs the recorded torch calls.
    - For every backend, the captured tensors' ``requires_grad``: storch's Python decided at trace time whether
      the loss requires grad, so a trace made while the parameters were frozen (``requires_grad_(False)``, an
      evaluation before training) has no update probe (moving averages, temperature schedules, NVIL never
      updated after unfreezing) and no refusal of a second differentiation (an order-1 estimator's Hessian
      replayed silently). A list of bools per call."""
    captured = [*gm.parameters(), *gm.buffers(), *(v for v in vars(gm).values() if isinstance(v, _T))]
    ids = {id(t) for t in captured}
    keep = {k: r for k, r in reads.items() if isinstance(r[3], _T) and id(r[3]) in ids}
    owners = {id(r[0]) for r in keep.values()}
    while True:  # the modules on the way to them (model.enc for enc.weight)
        more = {k: r for k, r in reads.items() if k not in keep and id(r[3]) in owners}
        if not more:
            break
        keep.update(more)
        owners |= {id(r[0]) for r in more.values()}
    checks = tuple((r[1], r[2], r[3]) for r in keep.values())
    if not checks and not metadata and not captured:
        return None
    tensors = tuple(captured) if metadata else ()
    traced = _metadata(tensors) if metadata else None
    fast = _tensor_check(tensors) if metadata else None
    autocast = traced[0] if metadata else None
    grads = list(map(_requires_grad, captured))

    def valid() -> bool:
        for holder, name, value in checks:
            if holder.get(name) is not value:
                return False
        if traced is None:
            return list(map(_requires_grad, captured)) == grads  # ~0.2 us a tensor
        if fast is not None and fast(*tensors):  # the same metadata: only the autocast state left to compare
            return _autocast_state() == autocast
        return _metadata(tensors) == traced

    return valid
