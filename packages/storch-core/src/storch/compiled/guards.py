"""A trace's guard: the per-call check that its program still fits what the step reads outside its arguments
(the module attributes through which it reached a captured parameter or buffer; with inductor, the captured
tensors' metadata and the autocast state; for every backend, their ``requires_grad``), and the modules a step
reaches by name (its closure, globals, bound ``self``, defaults, module arguments)."""

from __future__ import annotations

import functools
import itertools
import operator
import types
from typing import Callable, Optional

import torch

from .keys import _requires_grad
from .refusals import _TRACE_HOOKS

_T = torch.Tensor


# how a link (see _reached) is looked up again at each call: ``holder.get(key)`` (a dict: a function's globals, a
# dict the step reads, a module's _parameters / _buffers / _modules), ``holder.cell_contents`` (a closure cell),
# ``holder[key]`` (a list); a fixed link (a tuple's item, a bound method's self, a default) cannot change
_DICT, _CELL, _ITEM, _FIXED = range(4)


def _reached(fn: Callable, arguments: tuple = ()) -> tuple[list, list]:
    """What the step can reach by name, and how: ``(links, roots)``.

    ``roots``: the modules it reaches: through its closure, its bound ``self``, its defaults and the globals its code
    names (also those of the functions these hold, a few levels deep), through the dicts, lists and tuples these
    hold (``holder["dec"]``, ``layers[0]``), and its non-tensor ``arguments`` (``step(model, x)``).
    ``links``: ``(owner, kind, holder, key, value)``, one per lookup on the way: a global name (``owner`` the
    function, ``holder`` its globals), a closure cell, a dict entry or list item, and every parameter, buffer and
    submodule of the modules reached (``holder``: the module's ``_parameters`` / ``_buffers`` / ``_modules``).

    The trace captures the parameters, buffers and tensors it read, and bakes in the modules it called, so if one
    of these lookups gives another object later (``holder["dec"] = nn.Linear(...)``, a global or nonlocal name
    rebound, ``load_state_dict(sd, assign=True)``, ``model.enc = nn.Linear(...)``) the program would go on
    computing with (and training) the old ones; :func:`_guard` keeps the links that lead to what the trace
    captured and to the modules reached, and checks them at each call. A module or tensor reached otherwise (an
    attribute of a plain object, a container built in the step) is not seen: call :meth:`CompiledStep.clear`
    after replacing it."""
    links: list = []
    roots: list = []
    seen: set = set()

    def visit(v, depth: int) -> None:
        if id(v) in seen:
            return
        seen.add(id(v))
        if isinstance(v, torch.nn.Module):
            roots.append(v)
        elif isinstance(v, dict) and depth < 4:
            for key, item in list(v.items())[:64]:
                links.append((v, _DICT, v, key, item))
                visit(item, depth + 1)
        elif isinstance(v, list) and depth < 4:
            for i, item in enumerate(v[:64]):
                links.append((v, _ITEM, v, i, item))
                visit(item, depth + 1)
        elif isinstance(v, tuple) and depth < 4:
            for item in v[:64]:
                links.append((v, _FIXED, None, None, item))
                visit(item, depth + 1)
        elif isinstance(v, functools.partial) and depth < 4:
            for item in (v.func, v.args, v.keywords):
                links.append((v, _FIXED, None, None, item))
                visit(item, depth + 1)
        elif callable(v) and not isinstance(v, type) and depth < 4:
            self_ = getattr(v, "__self__", None)
            if self_ is not None and not isinstance(self_, types.ModuleType):
                links.append((v, _FIXED, None, None, self_))
                visit(self_, depth + 1)
            f = getattr(v, "__func__", v)
            code = getattr(f, "__code__", None)
            if code is None:
                return
            for cell in getattr(f, "__closure__", None) or ():
                try:
                    item = cell.cell_contents
                except ValueError:  # an empty cell
                    continue
                links.append((v, _CELL, cell, None, item))
                visit(item, depth + 1)
            for d in getattr(f, "__defaults__", None) or ():
                links.append((v, _FIXED, None, None, d))
                visit(d, depth + 1)
            names, codes = set(), [code]
            while codes:
                c = codes.pop()
                names.update(c.co_names)
                codes.extend(k for k in c.co_consts if isinstance(k, types.CodeType))
            g = getattr(f, "__globals__", {})
            for n in names:
                if n in g:
                    item = g[n]
                    if not isinstance(item, (types.ModuleType, type)):  # (torch, storch, classes: never a module)
                        links.append((v, _DICT, g, n, item))
                    visit(item, depth + 1)

    visit(fn, 0)
    for a in arguments:
        visit(a, 1)
    done: set = set()
    for root in roots:
        for owner in root.modules():
            if id(owner) in done:
                continue
            done.add(id(owner))
            d = owner.__dict__
            for kind in ("_parameters", "_buffers", "_modules"):
                holder = d.get(kind)
                if holder:
                    for name, value in holder.items():
                        if value is not None:
                            links.append((owner, _DICT, holder, name, value))
    return links, roots


def _reached_modules(fn: Callable, arguments: tuple = ()) -> list:
    """The modules ``fn`` reaches by name and the module ``arguments`` (see :func:`_reached`)."""
    return _reached(fn, arguments)[1]


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


# a module's hook dicts (the ``_with_kwargs`` / ``_always_called`` ones hold some of these keys) and torch's global ones
_HOOK_DICTS = operator.attrgetter("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_GLOBAL_HOOK_DICTS = operator.attrgetter("_global_forward_hooks", "_global_forward_pre_hooks",
                                         "_global_backward_hooks", "_global_backward_pre_hooks")
_TORCH_MODULE = torch.nn.modules.module
_chain = itertools.chain.from_iterable


def _hooks_of(modules: tuple) -> tuple:
    """The ids of the forward and backward (pre-)hooks of ``modules`` and of torch's global module hooks (storch's
    own trace-time hook aside: :data:`~storch.compiled.refusals._TRACE_HOOKS`). A hook's id is its handle's, unique
    in the process (``RemovableHandle.next_id``), so a hook added, removed or replaced changes the tuple. ~0.25 us a
    module (C iteration over its four dicts) and ~0.5 us more: 1.2 us for three modules."""
    ids = tuple(_chain(_chain(map(_HOOK_DICTS, modules))))
    global_ = _GLOBAL_HOOK_DICTS(_TORCH_MODULE)
    if any(global_):
        ids += tuple(k for k in _chain(global_) if k not in _TRACE_HOOKS)
    return ids


def _guard(gm: torch.fx.GraphModule, links: list, roots: list, metadata: bool,
           called: tuple = ()) -> Optional[Callable[[], bool]]:
    """A per-call check that the program still fits what the step reads outside its arguments, or None.

    - Every lookup (see :func:`_reached`: a global name, a closure cell, a dict entry or list item, a module
      attribute) through which the trace reached a captured parameter, buffer or tensor, or a module the step
      reaches by name (whose forward the trace baked in: ``holder["drop"]``'s dropout probability), still gives
      the same object: a dict lookup or an attribute read each.
    - With ``metadata`` (inductor, compiled without dynamo's guards: :func:`_compile_graph`): the captured
      tensors' ``requires_grad``, dtype, device and shape and the autocast state are as when traced
      (inductor specialises its program to them: a parameter unfrozen after the first call got no gradient,
      ``model.double()`` gave NaN). The other backends follow them: dynamo guards them, ``backend=None``
      runs the recorded torch calls.
    - For every backend, the captured tensors' ``requires_grad``: storch's Python decided at trace time whether
      the loss requires grad, so a trace made while the parameters were frozen (``requires_grad_(False)``, an
      evaluation before training) has no update probe (moving averages, temperature schedules, NVIL never
      updated after unfreezing) and no refusal of a second differentiation (an order-1 estimator's Hessian
      replayed silently). A list of bools per call.
    - The hooks of the modules the trace ``called`` (recorded by ``refusals._no_data_parallel_in_trace``) and torch's
      global module hooks (``register_module_forward_hook``, ...) are the ones it ran: the trace records what a
      forward (pre-)hook computes, so a hook added later would never run and a removed one would go on running in
      every replay (a removed warm-up hook that doubled an encoder's output kept doubling it: found by a tester); a
      backward hook added later must be refused by a new trace. ~0.25 us a module (:func:`_hooks_of`)."""
    captured = [*gm.parameters(), *gm.buffers(), *(v for v in vars(gm).values() if isinstance(v, _T))]
    targets = {id(t) for t in captured}
    keep = [link for link in links if id(link[4]) in targets]  # the lookups that give a captured tensor,
    targets = {id(link[0]) for link in keep} | {id(m) for m in roots}  # and the ones on the way to those
    kept = {id(link) for link in keep}
    while targets:
        more = [link for link in links if id(link) not in kept and id(link[4]) in targets]
        keep.extend(more)
        kept.update(map(id, more))
        targets = {id(link[0]) for link in more}
    checks = tuple((h, k, v) for _, kind, h, k, v in keep if kind == _DICT)
    cells = tuple((h, v) for _, kind, h, _k, v in keep if kind == _CELL)
    items = tuple((h, k, v) for _, kind, h, k, v in keep if kind == _ITEM)
    if not checks and not cells and not items and not metadata and not captured and not called:
        return None
    hooks = _hooks_of(called)  # (no module called: the global hooks ran on none)
    tensors = tuple(captured) if metadata else ()
    traced = _metadata(tensors) if metadata else None
    fast = _tensor_check(tensors) if metadata else None
    autocast = traced[0] if metadata else None
    grads = list(map(_requires_grad, captured))

    rare = bool(cells or items)

    def valid() -> bool:  # (~35 ns a lookup)
        if called and _hooks_of(called) != hooks:
            return False
        for holder, name, value in checks:
            if holder.get(name) is not value:
                return False
        if rare:
            for cell, value in cells:  # (a nonlocal rebound)
                if cell.cell_contents is not value:
                    return False
            for holder, i, value in items:
                if len(holder) <= i or holder[i] is not value:
                    return False
        if traced is None:
            return list(map(_requires_grad, captured)) == grads  # ~0.2 us a tensor
        if fast is not None and fast(*tensors):  # the same metadata: only the autocast state left to compare
            return _autocast_state() == autocast
        return _metadata(tensors) == traced

    return valid
