"""``storch.compile`` and :class:`CompiledStep`: the cache of traces by key, the trace itself (``make_fx`` of the
step under :class:`~storch.compiled.trace_mode._TraceMode`, then the checks, rewrites and compilation), and each
call: the key looked up (a cheaper one for plain tensor arguments), the guard checked, the program run, its
outputs hooked (a second differentiation refused, the finite check, the replayed update). See
:mod:`storch.compiled` for what a trace fixes and what a step may not do."""

from __future__ import annotations

import contextlib
import functools
import sys
import warnings
from typing import Any, Callable, Generic, Optional, TypeVar, Union, overload

import torch
import torch.autograd.forward_ad as _fwAD
import torch.utils._pytree as pytree

from .._util.flatten import flatten, unflatten
from ..errors import StorchError, assumption_failed
from ..graph import Graph, tracing_nodes, tracing_recorder
from ..plates.tensor import PlateTensor
from ..conditions.smoothness import saved_values_unread
from .checks import _check_constants, _check_custom_functions, _check_nodes, _check_python_random, _check_replay, _python_random_state
from .finite import _finite_on_backward, _losses_among
from .guards import _guard, _reached, _reached_modules
from .keys import _WATCHED_ARGUMENTS, _aliasing, _python_state_of, _signature, _watched, _watched_argument
from .program import _TRACING, _Trace, _compile_graph, _compiled_by_inductor, _drop_identity_views, _dynamo_lock, \
    _fold_batch_views, _run
from .refusals import _backward_message, _binomial_support_message, _compiled_twice_message, _func_transform_message, _name, \
    _compiler_failure, _no_backward_in_trace, _no_data_parallel_in_trace, _refuse_twice, _traceback_component, \
    _transform_around_step_message
from .state import _lift_state, _state_of, _Stateful, _stateful
from .trace_mode import _functorch_level, _TraceMode
from .updates import _loss_graph_values, _Recorder, _update_on_backward

if sys.version_info >= (3, 10):
    from typing import ParamSpec
else:  # (a dependency of torch; storch-core requires it on 3.9)
    from typing_extensions import ParamSpec

__all__ = ["compile", "CompiledStep"]

# the compiled step is called like the step: its parameters and return type
_P = ParamSpec("_P")


_R = TypeVar("_R")


_T = torch.Tensor


class _Stale(Exception):
    """A stateful entry's trace no longer fits what the step reaches (its guard failed: see _guard)."""


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
        if _functorch_level() is not None or _fwAD._current_level >= 0:
            # called inside torch.func.vmap / grad / jvp, or a torch.autograd.forward_ad.dual_level (one C call, one
            # int read): refused
            raise StorchError(_transform_around_step_message(self.fn))
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
                    try:
                        return self._call_stateful(entry, args, kwargs, list(args), key[0])
                    except _Stale:  # (see _variant)
                        self.clear()
                        return self(*args, **kwargs)
                outs = _run(entry[1], args, key[0])
                if entry[4] is not None:
                    outs = _refuse_twice(outs, entry[4])
                if key[0]:
                    _finite_on_backward(outs, entry[6], self.fn)
                return outs[0] if entry[3] else pytree.tree_unflatten(list(outs), entry[2])
            leaves, spec = flatten((args, kwargs))
            key, tensors = _signature(leaves, spec, self._python_state(leaves))
            entry = self._cache.get(key)
            if entry is not None and type(entry) is tuple and entry[5] is not None and not entry[5]():
                self.clear()  # (as above: what the step reaches is looked up again)
                key, tensors = _signature(leaves, spec, self._python_state(leaves))
                entry = None
            if entry is None:
                self._fast.clear()
                entry = self._cache[key] = self._new_entry(leaves, spec, tensors)
            if type(entry) is _Stateful:
                try:
                    return self._call_stateful(entry, args, kwargs, tensors, key[1])
                except _Stale:
                    self.clear()
                    return self(*args, **kwargs)
            outs = _run(entry[1], tensors, key[1])
            if entry[4] is not None:
                outs = _refuse_twice(outs, entry[4])
            if key[1]:
                _finite_on_backward(outs, entry[6], self.fn)
            return pytree.tree_unflatten(list(outs), entry[2])
        except RuntimeError as e:  # a check of storch.extending.assume (at the trace's first run too): a StorchError
            # (and a failure of the compiler backend, at a trace's first run: storch's error names the cause and the fix)
            failed = assumption_failed(e) or _compiler_failure(e, self.fn, self.compile_options.get("backend"))
            if failed is None:
                raise
            raise failed from e

    def _entry(self, args, kwargs):
        return self._lookup(args, kwargs)[0]

    def _lookup(self, args, kwargs) -> tuple:
        """The cache entry for these arguments (traced now if new) and their tensors."""
        leaves, spec = flatten((args, kwargs))
        key, tensors = _signature(leaves, spec, self._python_state(leaves))
        entry = self._cache.get(key)
        if entry is not None and type(entry) is tuple and entry[5] is not None and not entry[5]():
            self.clear()
            key, tensors = _signature(leaves, spec, self._python_state(leaves))
            entry = None
        if entry is None:
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
        if not trace.estimators and trace.probe is None:  # (a probe without estimators: skipped updates, _Recorder)
            return trace.gm, trace.program, trace.spec, trace.single, trace.refusal, trace.guard, trace.checked
        return _Stateful(trace.estimators, {trace.sig: trace})

    def _variant(self, entry: "_Stateful", args, kwargs, tensors: list) -> tuple["_Trace", list]:
        """The trace for the estimators' state as it is now (traced now if its structure is new), and
        the state's tensors (the program's inputs after the arguments and the update probe)."""
        sig, state = _state_of(entry.estimators)
        trace = entry.variants.get(sig)
        if trace is not None and trace.guard is not None and not trace.guard():
            raise _Stale  # see _guard: the caller forgets every trace (the modules reached are found again) and retries
        if trace is None:
            leaves, spec = flatten((args, kwargs))
            trace = self._trace(leaves, spec, tensors)
            if [id(e) for e in trace.estimators] != [id(e) for e in entry.estimators]:
                raise StorchError(
                    f"{_name(self.fn)} uses other estimators than when it was first traced with these arguments. If "
                    "the step creates its estimators, create them once, outside the step (in your module's __init__, "
                    "or before the training loop: their state lives on the instance); after changing what the step "
                    "runs, call .clear() on the compiled step")
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
        if grad:  # (with a probe too: it checks .backward() only, and torch.autograd.grad of a NaN loss is refused eagerly)
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
            try:
                return self._variant(entry, args, kwargs, tensors)[0].gm
            except _Stale:
                self.clear()
                return self.graph_module(*args, **kwargs)
        return entry[0]

    def program_inputs(self, *args: Any, **kwargs: Any) -> list:
        """The inputs :meth:`graph_module`'s program takes for these arguments (a fresh update probe)."""
        entry, tensors = self._lookup(args, kwargs)
        if type(entry) is not _Stateful:
            return list(tensors)
        try:
            trace, state = self._variant(entry, args, kwargs, tensors)
        except _Stale:
            self.clear()
            return self.program_inputs(*args, **kwargs)
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
        if _functorch_level() is not None or _fwAD._current_level >= 0:  # (graph_module, program_inputs: __call__)
            raise StorchError(_transform_around_step_message(self.fn))
        while True:  # one trace at a time in the process: torch's tracing state is global (see program._TRACING)
            dynamo = _dynamo_lock()
            with dynamo if dynamo is not None else contextlib.nullcontext(), _TRACING:
                if dynamo is None and _dynamo_lock() is not None:
                    continue  # torch._dynamo was imported meanwhile (the last trace's torch.compile): take its lock too
                return self._trace_now(leaves, spec, tensors)

    def _trace_now(self, leaves: list, spec, tensors: list) -> "_Trace":
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
            args, kwargs = unflatten(items, spec)
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
                _check_custom_functions(outs, self.fn)
                checked.extend(_losses_among(outs, recorder.losses))
            out_spec.append(s)
            return (*outs, *recorder.extras())

        from torch.fx.experimental.proxy_tensor import make_fx

        called: dict = {}  # the modules the step calls (by id): their hooks are checked at each call (see _guard)
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
                    _no_backward_in_trace(self.fn), _no_data_parallel_in_trace(self.fn, called), saved_values_unread():
                gm = make_fx(flat, pre_dispatch=True)(*tensors, probe)
        except StorchError:
            raise
        except RuntimeError as e:
            if "data-dependent" in str(e) or "_local_scalar_dense" in str(e):
                binomial = _binomial_support_message(self.fn, e.__traceback__)
                if binomial is not None:
                    raise StorchError(f"{binomial}. torch said: {e}") from e
                raise StorchError(
                    f"storch.compile cannot trace {_name(self.fn)}: some code reads a tensor's value in Python "
                    "(`.item()`, `bool(t)`, `if t > 0:`, a value check), so the program depends on the data. "
                    "Run this step eagerly, or move that check out of the step. torch's indexing reads one too: a 0-dim "
                    "integer tensor as an index (`w[:, x[t]]`, `w[x[t]]` with `x` a tensor) is read as a Python int; "
                    "keep it a tensor with a 1-element slice (`w[:, x[t:t + 1]].squeeze(1)`, "
                    f"`w.index_select(1, x[t:t + 1]).squeeze(1)`), or index with a Python int. torch said: {e}") from e
            if "don't yet support saved tensor hooks" in str(e):  # torch.func refuses the trace's hooks
                raise StorchError(_func_transform_message(self.fn, _traceback_component(e.__traceback__))
                                  + f" torch said: {e}") from e
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
                         else _compiled_twice_message(self.fn, recorder.refusal,
                                                      self.compile_options.get("backend") == "inductor"))
        arguments = tuple(a for a in leaves if not isinstance(a, torch.Tensor))
        trace.guard = _guard(gm, *_reached(self.fn, arguments), _compiled_by_inductor(self.compile_options),
                             tuple(called.values()))
        return trace

    def __repr__(self) -> str:
        return f"storch.compile({_name(self.fn)}, traces={self.traces})"


@overload
def compile(fn: Callable[_P, _R], *, backend: Any = "inductor", mode: Optional[str] = None,
            options: Optional[dict[str, Any]] = None, dynamic: Optional[bool] = False) -> CompiledStep[_P, _R]: ...


@overload
def compile(fn: None = None, *, backend: Any = "inductor", mode: Optional[str] = None,
            options: Optional[dict[str, Any]] = None, dynamic: Optional[bool] = False,
            ) -> Callable[[Callable[_P, _R]], CompiledStep[_P, _R]]: ...


def compile(fn: Optional[Callable[_P, _R]] = None, *, backend: Any = "inductor", mode: Optional[str] = None,
            options: Optional[dict[str, Any]] = None, dynamic: Optional[bool] = False,
            ) -> Union[CompiledStep[_P, _R], Callable[[Callable[_P, _R]], CompiledStep[_P, _R]]]:
    """Compile a storch step: trace its plate program once into plain torch, then ``torch.compile`` it.

    ``fn(*args)`` builds one step's stochastic computation graph (estimators, costs) and returns
    ``storch.surrogate_loss()`` (or any tensors). The result is called like ``fn``; differentiate its
    output as usual (``loss.backward()``, then the optimizer step). Each distinct signature of the
    arguments (tensor shapes, dtypes, devices, ``requires_grad``; other arguments by value; grad
    mode) is traced and compiled once. The compiled program is one graph without breaks.

    Usable as ``storch.compile(fn)``, ``@storch.compile`` or ``@storch.compile(backend="aot_eager")``.

    ``torch.jit.trace``, ``torch.jit.script`` and ``torch.export`` cannot carry a storch step (they replay torch
    operations without storch's per-step checks and estimator state updates): ``torch.jit.trace`` and
    ``torch.export`` are refused with a StorchError that names this function. With inductor, draws are eager's for
    a seed (``fallback_random``) except a float64 ``torch.bernoulli``, which torch 2.13's CPU inductor draws
    otherwise; ``backend=None`` replays eager's draws exactly.

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
            differentiates inside the step, calls a DistributedDataParallel or FSDP module (call
            ``ddp.module`` and average the gradients after backward),
            captures a non-parameter tensor that requires grad, branches on values, steps an optimizer or
            reads or writes a ``.grad`` (``zero_grad``: step outside, after ``loss.backward()``), draws with a
            generator of its own, creates an estimator with state (create it once, outside the step), registers
            a gradient hook (``register_hook``, ``register_post_accumulate_grad_hook``) or calls a module with
            a backward hook (register hooks on parameters once, outside the step, or run it eagerly), or when the
            compiled step is called inside a ``torch.func`` transform (vmap, grad, jvp: call the uncompiled step
            under the transform, or differentiate the compiled step's result with torch.autograd outside it).

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
