"""The generic treatment: ``torch.func.vmap`` over the plate dims of the raw storage.

A function that is neither pointwise, nor handled, nor batch-first is run per plate entry by
PyTorch's own batching rules: each PlateTensor operand is aligned to the union of the plates,
its broadcast (size-1) plate dims are not mapped, plain operands are not mapped at all, and
random functions draw independently per entry (``randomness="different"``). Every output gets
the plates as leading dims.
"""

from __future__ import annotations

import functools
import math

import torch

from ..._util.flatten import flatten, unflatten
from ...errors import ASSUMPTIONS, PlateError, StorchError
from ..kit import _from_torch, _is_inplace
from ..tensor import PlateTensor, align, inplace_write_message, map_tensors, union_plates, write_plates
from ..tensor import new_plate_tensor as _new
from ..treatments import describe, from_torch
from .flat_vmap import vmap as flat_vmap

__all__ = ["vmap_call"]

_PT = PlateTensor


def vmap_call(func, args, kwargs):
    """Run ``func`` once per plate entry with ``torch.func.vmap`` (one level per mapped plate)."""
    # a torch.Size stays a leaf: pytree would rebuild it as a plain tuple, and some functions read
    # the two differently (Tensor.new(torch.Size) is a shape, Tensor.new(tuple) is data)
    leaves, spec = flatten((args, kwargs), is_leaf=_is_size)
    pos = [i for i, a in enumerate(leaves) if type(a) is _PT]
    plates = union_plates([leaves[i]._plates for i in pos])
    m = len(plates)
    sizes = tuple(p.size for p in plates)
    raws, mapped = _raws(leaves, pos, plates, sizes)
    levels = [j for j in range(m) if any(mk[j] for mk in mapped)]
    inplace = _is_inplace(func)
    if inplace and type(args[0]) is _PT and args[0]._plates != plates:
        # a tensor of an earlier step of a partition whose entries the estimator re-indexes (beams):
        # aligned by the parents, the write would go into a copy (lost); refused (write_plates)
        write_plates(args[0]._plates, plates, describe(func))
    if inplace and (type(args[0]) is not _PT or not all(mapped[0][j] for j in levels)):
        raise PlateError(inplace_write_message(
            describe(func), plates, args[0], "a tensor that does not vary over all of them"))

    def call(*rs, base=leaves):
        ls = list(base)
        for i, r in zip(pos, rs):
            ls[i] = r
        a, k = unflatten(ls, spec)
        return func(*a, **k)

    missing = [j for j in range(m) if j not in levels]
    try:
        # with plate dims that no operand maps, "error" tells a random function (it raises, before
        # drawing) from the others, which need no copy per entry of those dims
        out = _run(call, raws, mapped, levels, sizes, inplace, func, "error" if missing and not inplace else "different",
                   leaves)
    except RuntimeError as e:
        if "randomness error mode" not in str(e):
            raise
        # a random function (torch.multinomial, Categorical.sample on a plate tensor built with a
        # size-1 plate dim): every plate entry draws its own, so every plate dim is mapped
        raws, mapped = _raws(leaves, pos, plates, sizes, expand=True)
        levels, missing = list(range(m)), []
        out = _run(call, raws, mapped, levels, sizes, inplace, func, "different", leaves)
    if inplace:
        return args[0]
    if missing:
        def expand(o):
            for j in missing:
                o = o.unsqueeze(j)
            return o

        out = map_tensors(out, expand)
    return map_tensors(out, lambda o: _new(o, plates))


def _raws(leaves, pos, plates, sizes, expand: bool = False):
    """The raw operands aligned to ``plates``, their broadcast (size-1) plate dims squeezed out, and
    which plate dims each maps; ``expand``: the first one expanded to every plate's full size."""
    m = len(plates)
    raws, mapped = [], []
    for n, i in enumerate(pos):
        x = leaves[i]
        r = align(x._raw, x._plates, plates)
        if expand and n == 0:
            r = r.expand(sizes + r.shape[m:])
        mk = tuple(r.shape[j] == sizes[j] for j in range(m))
        drop = tuple(j for j in range(m) if not mk[j])
        if drop:
            r = r.squeeze(drop)
        raws.append(r)
        mapped.append(mk)
    return raws, mapped


def _run(call, raws, mapped, levels, sizes, inplace, func, randomness, leaves):
    full = all(all(mk[j] for j in levels) for mk in mapped)

    def vmapped(c, rs):
        return _vmap(c, rs, mapped, levels, sizes, full, inplace, randomness)

    try:
        if _recording():  # storch.compile: recorded as the batched operations (see _recorded)
            return _recorded(call, raws, leaves, vmapped, func)
        return vmapped(call, raws)
    except RuntimeError as e:
        if inplace or "Batching rule not implemented" not in str(e):
            raise
        # torch has no batching rule (and no fallback) for this operator: one call per entry
        return _loop(call, raws, mapped, levels, sizes, func)


def _is_size(x) -> bool:
    return type(x) is torch.Size


def _recording() -> bool:
    """Whether a ``make_fx(pre_dispatch=True)`` trace (``storch.compile``) is recording this call."""
    mode = getattr(torch._ops, "_get_dispatch_mode_pre_dispatch", None)  # (torch versions without it: never)
    return mode is not None and mode(torch._C._TorchDispatchModeKey.PROXY) is not None


def record_check(ok: torch.Tensor, message: str) -> None:
    """In a ``storch.compile`` trace: record in the program that ``ok`` (a 0-dim bool tensor computed from the draw)
    must hold at every call, where the trace's own values would fix a check a later draw needs
    (``torch._assert_async``: storch.compile re-raises its failure as a StorchError with ``message``)."""
    ASSUMPTIONS.add(message)
    torch._assert_async(ok, message)


def check_in_range(bad: torch.Tensor, message, values: torch.Tensor) -> None:
    """Raise ``IndexError(message(v))`` where ``bad`` (a bool tensor: the entries of the index ``values`` out of
    range) has an entry, ``v`` the first such value (one host sync). Under a ``storch.compile`` trace the values are
    the trace's, which a later draw does not keep, and a Python read of them is refused: the program checks every
    call instead (``torch._assert_async``, whose failure storch.compile re-raises as a StorchError with the message,
    ``message(None)``), where the kernel would have raised torch's message in the raw dims (plates first)."""
    if bad.is_meta:
        return
    if _recording():
        record_check(~bad.any(), message(None))
    elif bool(bad.any()):
        raise IndexError(message(int(values[bad][0])))


def _recorded(call, raws, leaves, run, func):
    """``run(call, raws)`` (the vmap), recorded as the batched torch operations it runs.

    A pre-dispatch trace records above functorch's batching: inside ``torch.func.vmap`` it sees
    the batched wrappers, not tensors it knows, so it bakes them into the program as constants
    (whose values escaped the vmap) and drops the connection to the inputs. Traced below
    dispatch (plain ``make_fx``), vmap is recorded as the batched operations its batching rules
    run, which are the ones eager autograd records too. So the vmap is traced on its own, on fake
    copies of its tensors (no values computed, no random numbers drawn, nothing written in
    place), with the outer trace switched off, and that program is then run on the real tensors
    inside the outer trace, which records its operations. The plain tensor operands are inputs
    of the inner program too, so the outer trace connects them (and their gradients).

    That inner trace runs below autograd: it keeps the operations, not grad-mode switches or a
    custom autograd.Function's backward. torch's own functions have neither; a function of the
    user's (declared "vmap", or any non-torch function that reaches storch) might, and it cannot
    be seen from here, so it is refused rather than risk a wrong gradient."""
    if not from_torch(func):
        raise StorchError(
            f"storch.compile cannot record {describe(func)}: storch runs it per plate entry with torch.func.vmap, "
            "and a compiled step records a vmapped call below autograd, which would lose a grad-mode switch "
            "(torch.no_grad) or a custom autograd.Function inside it (a wrong gradient). Only torch's own functions "
            "are recorded that way. Register a handler that runs it on the batched tensors "
            "(storch.register_plate_handler(func, handler), or 'pointwise' if it is elementwise), call it on "
            "plain tensors (the .tensor of a plate tensor, plates as leading dims), or run this step eagerly")
    from torch.fx.experimental.proxy_tensor import (
        _temp_remove_pre_dispatch_torch_function_mode,
        disable_proxy_modes_tracing,
        make_fx,
    )

    n = len(raws)
    others = [i for i, a in enumerate(leaves) if isinstance(a, torch.Tensor) and type(a) is not _PT]

    def inner(*ts):
        base = list(leaves)
        for i, t in zip(others, ts[n:]):
            base[i] = t
        return run(functools.partial(call, base=base), list(ts[:n]))

    tensors = [*raws, *(leaves[i] for i in others)]
    with disable_proxy_modes_tracing(), _temp_remove_pre_dispatch_torch_function_mode():
        program = make_fx(inner, tracing_mode="fake")(*tensors)
    return program(*tensors)


def _loop(call, raws, mapped, levels, sizes, func):
    """Per plate entry, one call; the outputs stacked (for operators without a batching rule)."""
    import itertools

    outs = []
    for idx in itertools.product(*[range(sizes[j]) for j in levels]):
        entry = []
        for r, mk in zip(raws, mapped):
            sel = tuple(i for i, j in zip(idx, levels) if mk[j])
            entry.append(r[sel] if sel else r)
        outs.append(call(*entry))
    if type(outs[0]) is bool:
        return _same_bool(outs, func)
    # storch's flatten, not pytree's tree_flatten: that leaves a reference cycle per call (issue 19)
    flat = [flatten(o) for o in outs]
    spec = flat[0][1]
    leaves = []
    for k, first in enumerate(flat[0][0]):
        items = [f[0][k] for f in flat]
        if not isinstance(first, torch.Tensor):
            if all(v is first or (type(v) is type(first) and v == first) for v in items):
                leaves.append(first)  # the same for every entry (None weights of attention): as it is
                continue
            raise PlateError(f"{describe(func)} returns a {type(first).__name__}, not a tensor, per plate entry, "
                             "and not the same one for every entry")
        if any(t.shape != first.shape for t in items):
            raise PlateError(
                f"{describe(func)} returns tensors of different shapes for different plate entries "
                f"({tuple(first.shape)} and others); a plate tensor needs one per-sample shape"
            )
        st = torch.stack(items)
        leaves.append(st.reshape(tuple(sizes[j] for j in levels) + first.shape))
    return unflatten(leaves, spec)


_BOOL_ADVICE = {
    getattr(torch, "_nested_tensor_from_mask_left_aligned", None): (
        "This is nn.TransformerEncoder's (and nn.Transformer's) check, in eval mode, that src_key_padding_mask "
        "is left-aligned for its nested-tensor fast path; that path is never taken on plate tensors, so build "
        "the encoder with enable_nested_tensor=False (or mask_check=False) and storch runs its layers per sample"),
}


def _same_bool(outs, func) -> bool:
    """The per-entry bools of a check torch's own code makes (TransformerEncoder's mask check): the
    answer when every entry gives the same one, as for ``bool()`` of a plate tensor; else a PlateError."""
    n, k = len(outs), sum(outs)
    if k == 0 or k == n:
        if _from_torch():
            return outs[0]
        raise PlateError(
            f"{describe(func)} returns a bool, not a tensor, per plate entry; storch answers such a check only "
            "inside torch's own code, when every entry agrees (as for bool() of a plate tensor). In your own code, "
            "call it per entry on the raw values (`.tensor`, plate dims first)")
    advice = _BOOL_ADVICE.get(func, "No single answer is right for all of them: call it per entry on the raw "
                                    "values (`.tensor`, plate dims first)")
    raise PlateError(f"{describe(func)} returns a bool that differs between plate entries ({k} True, {n - k} "
                     f"False). {advice}")


def _vmap(call, raws, mapped, levels, sizes, full, inplace, randomness):
    """``torch.func.vmap`` of ``call``; its non-tensor outputs (multi_head_attention_forward's None
    weights with need_weights=False) are returned as they are.

    torch.func.vmap refuses an output that is not a tensor, so ``call`` is wrapped to return only
    its tensors, and the others are put back in their places afterwards. Such a value cannot
    differ between plate entries: vmap runs ``call`` once, for all of them (a value computed from
    a mapped tensor would be a tensor, or a data-dependent error)."""
    kept = []

    def tensors_only(*rs):
        out = call(*rs)
        if isinstance(out, torch.Tensor):
            return out
        split = _non_tensor_leaves(out)
        if split is None:
            return out
        kept[:] = split
        return tuple(v for v in split[0] if isinstance(v, torch.Tensor))

    out = _vmap_tensors(tensors_only, raws, mapped, levels, sizes, full, inplace, randomness)
    if not kept:
        return out
    leaves, spec = kept
    it = iter(out)
    return unflatten([next(it) if isinstance(v, torch.Tensor) else v for v in leaves], spec)


def _non_tensor_leaves(out):
    """``out``'s leaves and structure where some leaf is not a tensor; ``None`` where all are. Flattened
    by storch's flatten, not pytree's ``tree_flatten``, which leaves a reference cycle per call (issue 19)."""
    leaves, spec = flatten(out)
    if all(isinstance(v, torch.Tensor) for v in leaves):
        return None
    return leaves, spec


def _leading_dims_merge(r: torch.Tensor, k: int) -> bool:
    """Whether ``r``'s first ``k`` dims can be flattened into one by a view (no copy): each dim of
    size > 1 steps over whole blocks of the next such dim (size-1 dims have no stride to match)."""
    if r.numel() == 0:
        return True
    dims = [(r.shape[i], r.stride(i)) for i in range(k) if r.shape[i] != 1]
    return all(s0 == s1 * n1 for (_, s0), (n1, s1) in zip(dims, dims[1:]))


def _vmap_tensors(call, raws, mapped, levels, sizes, full, inplace, randomness):
    if full and len(levels) > 1 and not inplace:
        # one vmap over the flattened plates (cheaper than nested levels), where the flattening is a
        # view: a reshape that copies (plate dims permuted in the raw storage) would make the outputs
        # of a view function (diagonal, tensor_split, unfold, ...) alias the copy, and writes through
        # them (y.diagonal().fill_(1)) would be lost; then the nested levels below, which keep views
        lead = tuple(sizes[j] for j in levels)
        n = math.prod(lead)
        # decided from the strides, not by trying the view: a failed view raises RuntimeError eagerly
        # but ValueError on storch.compile's fake tensors (torch._refs), so a try would only work eagerly
        if all(_leading_dims_merge(r, len(levels)) for r in raws):
            flat = [r.view((n,) + r.shape[len(levels):]) for r in raws]
            out = flat_vmap(call, [0] * len(flat), n, randomness)(*flat)
            # splitting the leading dim of an output is always a view
            return map_tensors(out, lambda o: o.view(lead + o.shape[1:]))
    f = call
    for j in reversed(levels):
        f = flat_vmap(f, [0 if mk[j] else None for mk in mapped], sizes[j], randomness)
    return f(*raws)
