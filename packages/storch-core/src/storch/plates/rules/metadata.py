"""Metadata, conversions and Python protocols of plate tensors (handlers).

A plate tensor answers metadata questions (``shape``, ``dim()``, ``dtype``, ``stride()``, ...)
per sample; conversions to one Python value (``item()``, ``bool()``, ``int()``) are refused in user
code, also for a single plate entry; asked by torch's own code they answer for a single entry
(``bool()``, such as a distribution's argument check, also when every plate entry gives the same
truth value);
``backward()`` is refused in favour of ``storch.backward()``.
"""

from __future__ import annotations

import math

import torch

from ...conditions.order_guard import in_estimator_own_pass
from ...errors import OrderError, PlateError
from ..kit import _from_torch, _operands, dispatch, refuse_sampled_size, register, too_many_samples, wrap_same
from .pointwise import broadcast
from .vmap import vmap_call
from ..tensor import PlateTensor, _names, align, union_plates
from ..tensor import new_plate_tensor as _new

_PT = PlateTensor
_T = torch.Tensor


# -- metadata and conversions ----------------------------------------------------------------


def _meta(func, args, kwargs):
    """answers for one sample (sizes, dims and flags of the per-sample tensor)"""
    # the wrapper itself carries the per-sample shape, dtype and device
    with torch._C.DisableTorchFunctionSubclass():
        return func(*args, **kwargs)


register(
    *[getattr(torch, n) for n in ("is_floating_point", "is_complex", "numel", "is_conj", "is_neg",
                                  "is_inference") if hasattr(torch, n)],
    _T.is_conj, _T.is_neg, _T.is_inference,
    _T.size, _T.dim, _T.ndimension, _T.numel, _T.nelement, _T.__len__, _T.is_floating_point,
    _T.is_complex, _T.is_signed, _T.element_size, _T.get_device,
    *(getattr(_T, p).__get__ for p in (
        "shape", "ndim", "dtype", "device", "layout", "is_cuda", "is_sparse", "is_quantized",
        "is_meta", "is_mps", "is_nested", "is_cpu",
    )),
)(_meta)


@register(_T.itemsize.__get__, _T.nbytes.__get__)
def _per_sample_bytes(func, args, kwargs):
    """bytes of one sample"""
    x = args[0]
    size = x._raw.element_size()
    return size if func == _T.itemsize.__get__ else size * x.numel()


@register(_T.is_contiguous, _T.stride)
def _raw_layout(func, args, kwargs):
    """layout of the raw storage (the per-sample dims are its trailing dims)"""
    x = args[0]
    n = len(x._plates)
    d = args[1] if len(args) > 1 else kwargs.get("dim")
    if func is _T.stride:
        return x._raw.stride()[n:] if d is None else x._raw.stride(d + n if d >= 0 else d)
    return func(x._raw, *args[1:], **kwargs)


@register(torch.is_same_size, _T.is_same_size)
def _same_size(func, args, kwargs):
    """per-sample shapes"""
    return tuple(args[0].shape) == tuple(args[1].shape)


@register(*(getattr(_T, p).__get__ for p in ("requires_grad", "grad_fn", "is_leaf", "grad", "data")))
def _raw_property(func, args, kwargs):
    """autograd properties (requires_grad, grad_fn, is_leaf, grad, data) of the raw storage"""
    x = args[0]
    return wrap_same(func(x._raw), x._plates)


@register(_T.register_hook)
def _register_hook(func, args, kwargs):
    """a hook on the raw tensor; it receives the gradient as a plate tensor (per-sample shape, the tensor's plates) and may return a replacement, as torch's hooks do (of the entries a node hands out as samples: an estimator's own evaluation entries, REBAR's and RELAX's relaxed inputs, keep their gradient); refused on a raw tensor with a size-1 (broadcast) plate dim, whose gradient is the sum over the plate's entries"""
    x, hook = args[0], (args[1] if len(args) > 1 else kwargs["hook"])
    plates = x._plates
    for p, size in zip(plates, x._raw.shape):
        if size != p.size:
            raise PlateError(
                f"register_hook on a plate tensor whose raw tensor has size {size} along plate {p.name!r} of "
                f"{p.size} entries: one value broadcast to every entry (storch.PlateTensor(raw, plates) with a "
                "size-1 dim), whose gradient is the sum over the entries, so the hook would receive that sum as "
                "each entry's gradient. Expand the tensor to the plate's entries first and use the expanded "
                "tensor, with the hook on it: `t = t.expand_as(x)` (x a tensor with those plates) or "
                "`t = t + 0 * x`")
    return x._raw.register_hook(_PlateHook(hook, plates))


class _PlateHook:
    """The hook registered on a plate tensor's raw tensor: hands the user's hook the gradient as a plate tensor
    with the tensor's plates (what the user's code saw: ``g.shape`` is the per-sample shape, ``g.tensor`` the raw
    gradient with the plate dims first), and turns what it returns (``None``: the gradient unchanged) back into a
    raw gradient of the raw tensor's shape: a plate tensor on (some of) those plates, a plain tensor of the
    per-sample shape (the same for every plate entry) or a plain tensor of the raw shape (computed from
    ``g.tensor``)."""

    __slots__ = ("hook", "plates")

    def __init__(self, hook, plates) -> None:
        self.hook = hook
        self.plates = plates

    def __call__(self, grad: torch.Tensor):
        if in_estimator_own_pass():
            return None  # ∂(Σ ĝ²)/∂(tensor) in a variance-minimising update: not the loss's gradient
        out = self._replacement(grad)
        if out is None or not isinstance(out, _T):
            return out
        for d, p in enumerate(self.plates):
            # an estimator's own evaluation entries (REBAR's and RELAX's relaxed inputs: Lineage.evaluation_from):
            # their gradient passes through unchanged. The control variate reads its value there (cost.live()) and
            # its pathwise part through them: a hook that changed the one and not the other would bias it.
            start = p.lineage.evaluation_from if p.lineage is not None else None
            if start is not None and start < p.size:
                mask = torch.arange(p.size, device=grad.device) < start
                out = torch.where(mask.reshape((-1,) + (1,) * (grad.dim() - d - 1)), out, grad)
        return out

    def _replacement(self, grad: torch.Tensor):
        plates = self.plates
        out = self.hook(_new(grad, plates))
        if out is None:
            return None
        k = grad.dim() - len(plates)
        if type(out) is _PT:
            rp = out._plates
            if len(union_plates((plates, rp))) != len(plates):
                raise PlateError(
                    f"a hook registered with register_hook on a plate tensor with plates {_names(plates)} returned a "
                    f"gradient with plates {_names(rp)}: it may vary only over the tensor's own plates. Return a "
                    "tensor computed from the gradient it receives (`g * 0.5`), or None to keep the gradient")
            raw = align(out._raw, rp, plates, k)
        elif isinstance(out, _T):
            if out.dim() > k and out.shape == grad.shape:
                return out  # the raw gradient (computed from `g.tensor`)
            raw = out.reshape((1,) * len(plates) + tuple(out.shape))
        else:
            return out  # torch's own error for a hook that returns something else
        if tuple(raw.shape[len(plates):]) != tuple(grad.shape[len(plates):]):
            raise PlateError(
                f"a hook registered with register_hook on a plate tensor returned a gradient of per-sample shape "
                f"{tuple(out.shape)} where the tensor's per-sample shape is {tuple(grad.shape[len(plates):])}: "
                "return a tensor of the shape of the gradient it receives, a plate tensor computed from it, a plain tensor "
                "of the shape of its `.tensor` (or None to keep the gradient)")
        return raw.expand(grad.shape)


@register(_T.T.__get__, _T.mT.__get__)
def _transposed(func, args, kwargs):
    """the transpose of each sample (.T reverses the per-sample dims, .mT swaps the last two)"""
    x = args[0]
    n, k = len(x._plates), x._raw.dim() - len(x._plates)
    if func == _T.mT.__get__:
        return wrap_same(x._raw.transpose(-2, -1), x._plates)
    return wrap_same(x._raw.permute(*range(n), *reversed(range(n, n + k))), x._plates)


@register(torch._is_all_true, torch._is_any_true)
def _over_all_samples(func, args, kwargs):
    """true when it holds for every sample (all plate entries)"""
    # used by torch.distributions argument validation: every sample must be valid
    out = func(args[0]._raw)
    if func is torch._is_all_true:
        _refuse_thresholded(args[0]._plates, out)
    return out


def _refuse_thresholded(plates: tuple, valid: torch.Tensor) -> None:
    """torch.distributions' argument validation is about to refuse a parameter (torch's ValueError "Expected
    parameter ... found invalid values") that carries the plate of a node whose relaxed sample a comparison
    thresholded in this step (``Node.thresholded``, set by the plate's ``Lineage.watch`` of a ``jump_free``
    estimator: REBAR, RELAX). Such an estimator evaluates the model on relaxed samples, where a threshold of one
    (``used > 0.5`` of a running sum of one-hot draws) may mask every value of a later distribution (NaN logits):
    raise storch's explanation instead (an OrderError, a ValueError as torch's is). The graph would be refused by
    the surrogate anyway (its gradient misses the jump). The common path reads an attribute per plate; the
    validity itself (a host read) only where such a node is found."""
    for plate in plates:
        lineage = plate.lineage
        ref = getattr(lineage.watch, "node", None) if lineage is not None else None
        node = ref() if ref is not None else None
        if node is None or node.thresholded is None or node.thresholded_in is not None or not node.estimator.jump_free:
            continue
        if valid.is_meta or bool(valid):
            return
        est = node.estimator.name
        raise OrderError(
            f"torch.distributions' argument validation found invalid values in a tensor that carries the plate "
            f"{plate.name!r} of estimator {est!r} (a distribution's parameter, or a value given to log_prob; e.g. "
            f"NaN logits, logits masked to -inf everywhere, a negative scale), and {est!r}'s sample was thresholded "
            f"in this step ({node.thresholded}: a comparison, argmax or cast of a value computed from it). If the "
            f"invalid values come from that threshold: {est!r} evaluates the model on relaxed samples too (REBAR "
            f"and RELAX: σ_λ(z), σ_λ(z̃)), where a threshold or comparison of the sample (a mask built as "
            f"used > 0.5 from earlier draws) need not mean what it means on a hard sample, so it cannot build a "
            f"later distribution's parameters (and its jump has no derivative: the gradient would be biased); use "
            f"an estimator that evaluates the model on hard samples only for this node: 'score' (with "
            f"baseline='leave_one_out'), 'unordered_set' or 'sum_and_sample' (a Plackett-Luce ranking: "
            f"'unordered_set' per position, or 'score'). Otherwise the values are invalid for another reason: "
            f"check the parameter as torch's ValueError would (set validate_args=False on the distribution to see "
            f"where they arise)")


def _single(func, args, kwargs):
    """refused in user code (a PlateError); asked by torch's own code, answered for a single plate entry (``bool()``: when every entry agrees)"""
    x = args[0]
    if type(x) is not _PT:
        return func(*args, **kwargs)
    n = len(x._plates)
    if func is _T.__bool__ and n:
        return _same_truth(x)
    # user code is refused also with a single plate entry (n_samples=1, no data plate): the Python
    # value leaves the plates, and a cost computed through it would get no credit from the estimator
    if n and (x._raw.shape[:n].numel() != 1 or not _from_torch()):
        raise too_many_samples(x, f"`{getattr(func, '__name__', func)}`")
    return func(x._raw.reshape(x._raw.shape[n:]), *args[1:], **kwargs)


def _same_truth(x) -> bool:
    """``bool(x)`` asked by torch's own code (torch.distributions' argument checks,
    ``if not valid.all(): raise``, in Geometric, ContinuousBernoulli, positive-definite matrices,
    Wishart), answered when it is the same for every plate entry (a single entry: always): then it
    is exactly what the one-sample code decides for each of them. Entries that decide differently
    are refused (PlateError): no single branch is right for all of them. In the user's own code
    every ``bool()`` of a plate tensor is refused, also when the entries agree: a loop such as
    ``if tok == EOS: break`` would otherwise run while the samples agree and fail at the first step
    where they do not, mid-training, instead of at once; and with a single entry (n_samples=1) the
    branch taken would leave the plates, so a cost computed in it would get no credit."""
    raw, n = x._raw, len(x._plates)
    if raw.shape[n:].numel() != 1:
        return bool(raw[(0,) * n])  # torch's own error: a per-sample tensor with several values is ambiguous
    if raw.is_meta or not _from_torch():
        raise _control_flow(x)
    k = int(torch.count_nonzero(raw))
    total = raw.numel()
    if k == 0 or k == total:
        return k == total
    raise _control_flow(x, k)


def _control_flow(x, true: int = -1) -> PlateError:
    n = math.prod(p.size for p in x._plates)
    held = x._raw.shape[: len(x._plates)].numel()  # fewer where a raw size-1 dim holds one value for its plate
    split = f" ({true * n // held} True, {(held - true) * n // held} False)" if true >= 0 else ""
    check = (" If this comes from a torch.distributions constructor's argument check (e.g. Geometric's "
             "`if not valid.all()`), the distribution's parameters are invalid for some plate entries: fix them "
             "there." if true >= 0 else "")
    return PlateError(
        f"Python control flow (`if`, `while`, `and`/`or`, e.g. `if tok == EOS: break`) needs one truth value, "
        f"but this PlateTensor holds {n} values over plates {[p.name for p in x._plates]}"
        + (f" that differ{split}: each sample decides differently. " if true >= 0 else
           ": each sample may decide differently" + (" (one entry here, but the branch taken would leave the "
                                                    "plates and get no credit from the estimators). " if n == 1
                                                    else ". "))
        + "Keep every sample going and write the decision as a mask, as one-sample code. A branch on a sample "
        "(`if k == 0: h = f(h) else: h = g(h)`, `if b: h = h + f(h)`) computes both sides and selects: "
        "`h = torch.where(k == 0, f(h), g(h))`, `h = h + b * f(h)`. A loop that stops (`if tok == EOS: break`, "
        "`while not done:`) keeps a mask: `done = done | (tok == EOS)`, then `tok = torch.where(done, EOS, tok)`, "
        "`h = torch.where(done, h, f(h))` and `cost = torch.where(done, 0.0, step_cost)` (for sequences, the "
        "estimators' `eos=` option does this: a finished sequence draws EOS with probability 1). To leave such a "
        "loop early once every sample is done, test all of them after the masked updates that read `done` and "
        "before the next draw: `if bool(done.tensor.all()): break` at the top of the next step, after `h = "
        "torch.where(done, h, f(h))`. Not right after the draw that set `done`: the state (`h`) would not carry "
        "that draw's plate, so the costs computed from it would get no credit for it (a biased gradient)."
        f"{check}")


register(_T.item, _T.tolist, _T.numpy, _T.__bool__, _T.__int__, _T.__float__, _T.__index__,
         _T.__array__, _T.__complex__, _T.__dlpack__)(_single)  # (__dlpack__: np.from_dlpack, torch.from_dlpack)


@register(_T.new_zeros, _T.new_ones, _T.new_full, _T.new_empty, _T.new_tensor, _T.new_empty_strided)
def _no_plates(func, args, kwargs):
    """a new plain tensor of the given per-sample shape (it holds no plates)"""
    if func is _T.new_tensor and any(type(a) is _PT for a in _operands(args[1:], kwargs)):
        raise PlateError("Tensor.new_tensor(data) with a PlateTensor as data makes a plain tensor, which cannot hold a "
                         "value per sample: copy the plate tensor itself (`data.detach().clone()`, `data.to(dtype)`)")
    try:
        return func(args[0]._raw, *args[1:], **kwargs)
    except Exception:  # (a sampled size fails: looking for it costs nothing on the normal path)
        name = func.__name__
        rest = args[1:] if name in ("new_zeros", "new_ones", "new_empty") else args[1:2]  # (*size) or (size, ...)
        refuse_sampled_size(func, [s for a in (*rest, kwargs.get("size", ()))
                                   for s in (a if isinstance(a, (tuple, list)) else (a,))])
        raise


@register(_T.new)
def _new_per_entry(func, args, kwargs):
    """a new tensor for every plate entry, each with its own storage (in-place draws into it, as torch.distributions' Laplace and Exponential make, are independent per entry)"""
    x = args[0]
    if type(x) is not _PT or any(type(a) is _PT for a in _operands(args[1:], kwargs)):
        return vmap_call(func, args, kwargs)
    # Tensor.new reads only x's dtype and device; the per-sample result (a shape's uninitialised
    # tensor or a copy of data) is copied out to every plate entry: a broadcast view would refuse
    # the in-place writes that typically follow, and shared storage would share their draws
    one = func(x._raw.new_empty(0), *args[1:], **kwargs)
    plates = x._plates
    return _new(one.expand(tuple(p.size for p in plates) + one.shape).contiguous(), plates)


@register(_T.backward)
def _no_backward(func, args, kwargs):
    """refused: call storch.backward() (the surrogate loss), not .backward() on a plate tensor"""
    raise PlateError(
        ".backward() on a PlateTensor: a value computed from storch's samples holds one entry per sample, and "
        "its gradient is the gradient estimators' work. For the gradient of the step's costs (storch.add_cost), "
        "call storch.backward() (or differentiate storch.surrogate_loss()). A loss that trains another part of "
        "the model on the samples (a GAN discriminator's loss on `x.detach()`, a critic's regression) must not "
        "become an ordinary cost, which would credit the samples with it (score-function gradient to the "
        "parameters that drew them): compute it with plain torch on the raw samples (`D(x.tensor.detach())`, "
        "the plate dims first) and call .backward() on that, or add it with "
        "storch.add_cost(loss, name=..., credit=False), which storch.backward() differentiates as written, "
        "without that credit"
    )


@register(_T.__deepcopy__)
def _deepcopy(func, args, kwargs):
    """a copy of the raw tensor with the same plates"""
    import copy

    x = args[0]
    return _new(copy.deepcopy(x._raw, args[1] if len(args) > 1 else None), x._plates)


@register(_T.__iter__)
def _iter(func, args, kwargs):
    """iterates over the first per-sample dim (unbind(0)): one plate tensor per entry"""
    return iter(dispatch(_T.unbind, (args[0], 0), {}))


@register(torch.where, _T.where)
def _where(func, args, kwargs):
    """where(condition, x, y) is pointwise; where(condition) alone is nonzero: refused"""
    if len(args) + len(kwargs) == 1:
        raise PlateError(
            "torch.where(condition) with one argument returns the indices of the true elements; their "
            "number depends on the values, so the plate entries would have different shapes; use "
            "torch.where(condition, x, other) or the mask as a weight"
        )
    return broadcast(func, args, kwargs)


@register(torch.nn.functional.one_hot)
def _one_hot(func, args, kwargs):
    """elementwise (a new last dim) with num_classes given; inferring it from the values is refused"""
    x = args[0]
    n = args[1] if len(args) > 1 else kwargs.get("num_classes", -1)
    if n < 0:
        raise PlateError(
            "F.one_hot without num_classes infers the number of classes from the largest value of each "
            "sample, which can differ between plate entries; pass num_classes"
        )
    return wrap_same(func(x._raw, n), x._plates)
