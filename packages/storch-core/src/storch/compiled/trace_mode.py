"""What the trace watches while ``make_fx`` records the step (:class:`_TraceMode`, a torch function mode active
then only): Python reads of a traced or captured tensor's values or of a sample, selections whose shape depends
on the data, reads and writes of a ``.grad`` (an optimizer's ``zero_grad``), a tensor's gradient hook
(``register_hook``, ``register_post_accumulate_grad_hook``), draws from a generator of the step's own and a
``torch.inference_mode()`` block are refused, and so is a torch.func transform (vmap, jvp) or a
``torch.autograd.forward_ad.dual_level`` opened in the step;
each grad-mode switch (``no_grad``, ``enable_grad``) is made as well as recorded (torch 2.7 and 2.8's trace only
records it); a captured buffer or an argument about to be written in place is saved, and put back after the trace
and the replay check."""

from __future__ import annotations

import os
import sys
from typing import Optional

import torch
import torch.autograd.forward_ad as _fwAD
import torch.utils._pytree as pytree

from ..errors import StorchError
from ..graph.node import draw_of
from ..plates.tensor import PlateTensor
from .refusals import _dual_level_in_step_message, _gradient_message, _name, _optimizer_message, _tensor_hook_message, _transform_in_step_message

_T = torch.Tensor


_VALUE_READS = frozenset((_T.tolist, _T.numpy, _T.__array__))


# routes to a tensor's memory that make_fx lets through: the first call's values, read outside the program (a
# black-box cost read by `np.from_dlpack(t)` or by a C simulator at `t.data_ptr()`; pickle, torch.save and
# copy.deepcopy read `untyped_storage()`); each mapped to how the message names it
_MEMORY_READS = {
    _T.__dlpack__: "`__dlpack__` (np.from_dlpack, torch.from_dlpack)",
    _T.data_ptr: "`.data_ptr()` (ctypes, a C extension)",
    _T.untyped_storage: "`.untyped_storage()` (pickle, torch.save)",
    _T.storage: "`.storage()`",
    _T.__deepcopy__: "`copy.deepcopy`",
}


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


# a tensor's gradient hooks: registered in the trace, they are not in the program (see _tensor_hook_message)
_HOOKS = frozenset((_T.register_hook, _T.register_post_accumulate_grad_hook))


_STORCH = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # storch's package folder
_TORCH = os.path.dirname(os.path.abspath(torch.__file__))


_functorch_level = torch._C._functorch.maybe_current_level  # the innermost torch.func transform's level, or None


def _called_by_storch() -> bool:
    """Whether the innermost caller outside torch (and this module) is storch's own code (its hooks on what it
    builds), not the step's."""
    frame = sys._getframe(2)
    while frame is not None and (frame.f_code.co_filename.startswith(_TORCH)
                                 or frame.f_code.co_filename == __file__):
        frame = frame.f_back
    return frame is not None and frame.f_code.co_filename.startswith(_STORCH + os.sep)


# the descriptor of Tensor.grad: a read or write of a tensor's .grad reaches a torch function mode as its bound
# __get__ / __set__ (an optimizer's zero_grad, model.zero_grad(), `p.grad = None`, a hand-written update)
_GRAD = torch._C.TensorBase.__dict__.get("grad")
_SET_GRAD_ENABLED = torch._C._set_grad_enabled


# torch's FlexAttention: its Python API and its higher-order op, whose implementation outside torch.compile (the
# reference, "math" one, on every device) calls score_mod and mask_mod under torch.func.vmap
_FLEX_ATTENTION = tuple(os.path.join(_TORCH, *parts) for parts in (("nn", "attention", "flex_attention.py"),
                                                                    ("_higher_order_ops", "flex_attention.py")))


def _in_flex_attention() -> bool:
    """Whether torch's flex_attention is on the stack (read only to name a refused transform)."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_filename in _FLEX_ATTENTION:
            return True
        frame = frame.f_back
    return False


def _flex_attention_message(fn) -> str:
    """The refusal of ``torch.nn.attention.flex_attention.flex_attention`` in the step, seen as the torch.func.vmap it
    opens (:meth:`_TraceMode._transform_opened`), which the generic message named without saying where it came
    from. Refused on every device and backend before its autograd Function (FlexAttentionAutogradOp, a backward of its
    own) reaches the check of custom Functions (storch.compiled.checks._check_custom_functions)."""
    return (f"storch.compile cannot trace {_name(fn)}: it calls torch.nn.attention.flex_attention.flex_attention, "
            "which outside torch.compile runs its reference implementation with score_mod and mask_mod under "
            "torch.func.vmap, and storch.compile's trace cannot see through a torch.func transform (its values would "
            "be fixed into the program as the traced call's, cut off from the step's arguments). Write the attention "
            "with torch operations, which storch.compile traces: `s = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5`, "
            "a score_mod as a torch expression on s (a sampled hard mask as `s.masked_fill(~mask, -1e4)`), "
            "then `s.softmax(-1) @ v`; or run this step eagerly (without storch.compile). (torch 2.13's FlexAttention "
            "has no backward on CPU either.)")


def _generator_message(fn, func) -> str:
    name = getattr(func, "__name__", None) or str(func)
    return (f"storch.compile cannot trace {_name(fn)}: it draws from a generator of its own (`{name}(..., "
            "generator=g)`, or storch draws from one: `storch.Graph(generator=g)`). A trace records draws from "
            "torch's default generator, fresh at every call; a generator of its own is state outside the torch "
            "program, so the replayed calls could not draw from it as the eager step does. Draw from torch's default "
            "generator (seeded by torch.manual_seed: drop `generator=`), or run this step eagerly")


def _inference_mode_message(fn) -> str:
    return (f"storch.compile cannot trace {_name(fn)}: it runs code under torch.inference_mode(), which a trace does "
            "not record (a program records the switches of torch.no_grad(), not inference mode): the replayed calls "
            "would run that code with gradients enabled and differentiate what the step holds constant (a silently "
            "wrong gradient). Use torch.no_grad() inside the step (calling the compiled step under "
            "torch.inference_mode() is fine), or run this step eagerly")


def _sample_read_message(fn, func) -> str:
    name = getattr(func, "__name__", None) or str(func)
    return (f"storch.compile cannot trace {_name(fn)}: some code reads the values of a plate tensor the step computes "
            f"(a sample, or a value computed from one) in Python (`{name}`: `if z.sum() > 3:`, `.tolist()`), so the "
            "program would depend on the samples and the trace would fix it to the first call's. Write the decision "
            "as a mask that every sample follows (`storch.add_cost(torch.where(z.sum() > 3, extra, 0.0), ...)`), or "
            "run this step eagerly")


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


# a count into a fixed length: torch.bincount's length is max(input) + 1 when that exceeds minlength (a GNN's in-degree
# torch.bincount(dst, weights=b, minlength=N) of an edge list the step computes)
# (without weights the counts are int64, as bincount's: a float torch.zeros(K) refuses scatter_add's int64 ones)
_BINCOUNT_ADVICE = (". For torch.bincount, count into a fixed length instead: torch.zeros(K).scatter_add(0, i, w) "
                    "with weights w; without, torch.zeros(K, dtype=torch.long).scatter_add(0, i, torch.ones_like(i)) "
                    "(bincount's int64 counts), or F.one_hot(i, K).sum(0)")


def _support_size(x) -> tuple[bool, Optional[int]]:
    """``(known, size)`` for a plate tensor ``x`` that is a node's sample as handed out (``k = est(Categorical(...))``,
    at any step of a partition): the number of values its distribution can take, ``max + 1`` of an integer interval
    from 0 (``None``: unbounded, a Poisson's or a Geometric's). ``known`` is False for anything else (a value computed from a sample, a bound
    the step computes): the program then checks the drawn values at every call (storch.plates.rules.indexing)."""
    from torch.distributions import constraints

    from ..graph import current_graph

    distribution = _sampled_from(current_graph().nodes, x)
    if distribution is None:
        return False, None
    support = getattr(distribution, "support", None)
    if isinstance(support, constraints._IntegerGreaterThan) and support.lower_bound == 0:
        return True, None
    if not isinstance(support, constraints._IntegerInterval) or not isinstance(support.lower_bound, (int, float)) \
            or support.lower_bound != 0:
        return False, None
    top = support.upper_bound
    if isinstance(top, _T):
        from torch.fx.experimental.proxy_tensor import disable_proxy_modes_tracing

        with disable_proxy_modes_tracing():  # (a read of the distribution's bound, recorded nowhere)
            top = top.max().item() if top.numel() and not top.is_meta else None
    return (True, int(top) + 1) if isinstance(top, (int, float)) else (False, None)


def _sampled_from(nodes, x):
    """The distribution whose draw ``x`` is, as handed out by an estimator call (the user's, else the raw one), or
    None: the first step of a node (``node.value``) or a later step of a partition (its ``step_draws``, which hold
    each step's value and distributions: ``node.value`` is the first step's only)."""
    found = draw_of(nodes, x)
    if found is None:
        return None
    node, t = found
    draw = node if t == 0 else node.step_draws[t]
    return draw.original or draw.distribution


def _bincount_minlength(fn, args, kwargs) -> None:
    """Refuse ``torch.bincount(k, minlength=M)`` of a node's sample ``k`` whose distribution can draw ``M`` or more:
    the traced draw fitted (the program keeps the length ``M``), and a later draw that does not would fail."""
    x = args[0] if args else kwargs.get("input")
    if type(x) is not PlateTensor:
        return
    minlength = args[2] if len(args) > 2 else kwargs.get("minlength", 0)
    if not isinstance(minlength, int) or minlength <= 0:
        return  # (without minlength the length is max(k) + 1 for every draw: the handler refuses that at the trace)
    known, size = _support_size(x)
    if not known or (size is not None and size <= minlength):
        return
    can = f"{size} values (0 to {size - 1})" if size is not None else "any value from 0 up (its support is unbounded)"
    fix = (f"Pass minlength={size}, the distribution's support size (torch.bincount(k, minlength={size}))"
           if size is not None else
           "Count into a fixed length K of your choice with the larger values clamped or dropped "
           "(torch.bincount(k.clamp(max=K - 1), minlength=K)), or run the step eagerly")
    raise StorchError(
        f"storch.compile cannot trace {_name(fn)}: torch.bincount(k, minlength={minlength}) of a sample whose "
        f"distribution can draw {can}. The traced draw fitted in {minlength} counts, so the program keeps that "
        f"length, and a later draw of a value >= {minlength} would not fit (eagerly the length is max(k) + 1). "
        f"{fix}")


class _TraceMode(torch.overrides.TorchFunctionMode):
    """Active while ``make_fx`` traces the step (only then: a mode routes every torch call through Python).

    - It refuses Python reads of a traced tensor's values that ``make_fx`` lets through (``tolist``,
      ``numpy``, ``__array__``: ``.item()`` and ``bool()`` are refused by make_fx itself; the routes to its
      memory: ``__dlpack__``, ``data_ptr``, ``untyped_storage`` / ``storage`` (pickle, ``torch.save``),
      ``copy.deepcopy``) and selections
      whose shape depends on the values (a boolean mask index, ``nonzero``): the trace would silently fix
      them to the first call's data. So are a ``torch.optim`` optimizer's ``step()`` and ``zero_grad()`` (seen by
      their profiler records, which torch makes for every optimizer, before anything changes and even where no
      gradient exists yet), any other read or write of a tensor's ``.grad`` (``model.zero_grad()``,
      ``p.grad = None``, ``clip_grad_norm_``, another optimizer's update), which no replayed call would repeat,
      and draws with ``generator=`` of the step's own. So is the step's ``register_hook`` or
      ``register_post_accumulate_grad_hook`` on any tensor (storch's own hooks pass): the program records no
      hook, and one on a parameter or argument would be registered at the trace only. So is a
      ``torch.inference_mode()`` block in the step (not a torch function: the program cannot record it, and the
      replayed calls differentiated what it computed; seen as inference mode switched on at a torch call, where the
      call of the compiled step was made outside it). (A global optimizer step pre-hook would see the step too,
      but registering and removing it while another thread's ``opt.step()`` iterates torch's dict of global
      hooks raises "OrderedDict mutated during iteration" there; a mode is per thread.)
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
        self.inference = False  # whether the compiled step was called under torch.inference_mode()
        self.level = None  # the torch.func level the compiled step was called at (None: under no transform)
        self.dual = -1  # the forward-AD level (torch.autograd.forward_ad.dual_level) it was called at

    def __enter__(self):
        from torch.fx.experimental.proxy_tensor import get_proxy_mode

        mode = get_proxy_mode()
        self.tracer = None if mode is None else mode.tracer
        self.inference = torch.is_inference_mode_enabled()
        self.level = _functorch_level()
        self.dual = _fwAD._current_level  # (-1: a compiled step is not called in one: CompiledStep.__call__)
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

        if not isinstance(t, _T) or type(t) is PlateTensor or self.tracer is None or is_functorch_wrapped_tensor(t):
            return False  # (a plate tensor holds the step's own values: storch's dispatch checks the read)
        mode = get_proxy_mode()
        if mode is None or mode.tracer is not self.tracer:
            return False  # a nested trace, or proxy tracing switched off (torch's own bookkeeping)
        return isinstance(t, torch.nn.Parameter) or not has_proxy_slot(t, self.tracer)

    def _transform_opened(self) -> None:
        """Refuse a torch.func transform that the step opened (a torch call at another functorch level than the
        step's call), unless a nested trace records it: storch's vmap rule traces its own vmapped calls on
        their own (storch.plates.rules.vmap._recorded), and proxy tracing is off or another trace's there."""
        from torch.fx.experimental.proxy_tensor import get_proxy_mode

        mode = get_proxy_mode()
        if self.tracer is None or mode is None or mode.tracer is not self.tracer:
            return
        stack = torch._C._functorch.get_interpreter_stack() or []
        depth = 0 if self.level is None else len(stack) - (_functorch_level() - self.level)
        kind = stack[depth].key().name if 0 <= depth < len(stack) else "unknown"
        if _in_flex_attention():
            raise StorchError(_flex_attention_message(self.fn))
        raise StorchError(_transform_in_step_message(self.fn, kind))

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
        if _functorch_level() != self.level:
            self._transform_opened()
        if _fwAD._current_level != self.dual:  # a dual level opened in the step (a torch.func.jvp's: refused above)
            raise StorchError(_dual_level_in_step_message(self.fn))
        if func is _SET_GRAD_ENABLED:
            return self._set_grad_enabled(func, args, kwargs)
        if not self.inference and torch.is_inference_mode_enabled():
            raise StorchError(_inference_mode_message(self.fn))
        if _GRAD is not None and getattr(func, "__self__", None) is _GRAD:
            raise StorchError(_gradient_message(
                self.fn, "it writes a tensor's `.grad`" if func.__name__ == "__set__" else "it reads a tensor's `.grad`"))
        if args and type(args[0]) is str and args[0].startswith("Optimizer."):  # a torch.optim profiler record
            kind, _, method = args[0].partition("#")
            if kind == "Optimizer.step":
                raise StorchError(_optimizer_message(self.fn, method))
            if kind == "Optimizer.zero_grad":
                raise StorchError(_gradient_message(self.fn, f"it calls {method}()"))
        if func in _HOOKS and not _called_by_storch():
            raise StorchError(_tensor_hook_message(self.fn, f"{func.__name__}", type(args[0]) is PlateTensor))
        generator = kwargs.get("generator")
        if generator is not None and generator is not torch.default_generator:
            raise StorchError(_generator_message(self.fn, func))
        if (func in _VALUE_READS or func in _SCALAR_READS or func in _MEMORY_READS) and args \
                and type(args[0]) is PlateTensor:
            raise StorchError(_sample_read_message(self.fn, func))
        if func in _MEMORY_READS and args and (self._traced(args[0]) or self._captured(args[0])):
            raise StorchError(_value_message(
                self.fn, f"{_MEMORY_READS[func]} of a tensor the program computes or reads from outside the step "
                         "(a buffer or parameter, whose value changes between calls)"))
        if func in _VALUE_READS and args and (self._traced(args[0]) or self._captured(args[0])):
            raise StorchError(_value_message(
                self.fn, f"`.{func.__name__}()` of a tensor the program computes or reads from outside the step "
                         "(a buffer or parameter, whose value changes between calls)"))
        if func in _SCALAR_READS and args and self._captured(args[0]):
            raise StorchError(_value_message(
                self.fn, f"`{func.__name__}` of a tensor from outside the step (a buffer or parameter, whose "
                         "value changes between calls)"))
        if func in _BINCOUNT:
            _bincount_minlength(self.fn, args, kwargs)
        shape = self._data_shape(func, args, kwargs)
        if shape == "bincount":  # its length, max + 1, comes from the values even with minlength=
            raise StorchError(_shape_message(self.fn, "`bincount`") + _BINCOUNT_ADVICE)
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

    @staticmethod
    def _set_grad_enabled(func, args, kwargs):
        """A grad-mode switch (``torch.no_grad()``, ``enable_grad``, ``set_grad_enabled``) in the step: make_fx's
        pre-dispatch mode, below this one, records it in the program; torch below 2.9 records it without switching,
        so the trace ran with grad enabled throughout and each ``no_grad`` exit recorded the mode it read then (a
        nested block's exit, or ``Binomial.sample``'s inside storch's own, recorded True: the program differentiated
        a value the step holds constant). Switched here too, as torch 2.9 and later do (the same value again there)."""
        node = func(*args, **kwargs)
        with torch._C.DisableTorchFunction():
            func(*args, **kwargs)
        return node

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
