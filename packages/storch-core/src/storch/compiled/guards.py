"""A trace's guard: the per-call check that its program still fits what the step reads outside its arguments
(the module attributes through which it reached a captured parameter or buffer; with inductor, the captured
tensors' metadata and the autocast state; for every backend, their ``requires_grad``), and the modules a step
reaches by name (its closure, globals, bound ``self``, defaults, module arguments)."""

from __future__ import annotations

import functools
import types
from typing import Callable, Optional

import torch

from .keys import _requires_grad

_T = torch.Tensor


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
