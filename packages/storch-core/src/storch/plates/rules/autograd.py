"""``torch.autograd.grad`` on plate tensors (a handler): the per-sample derivative of per-sample outputs.

A cost that holds a derivative in the sample (a decoder's Jacobian penalty at z, a score-matching or
physics-informed cost, a Langevin step) calls ``torch.autograd.grad(dec(z).sum(), z, create_graph=True)``
inside the step. The samples are independent, so one backward pass of the raw outputs gives every plate
entry its own derivative exactly, where the outputs and the inputs are on the same plates: each raw entry
of an input feeds one raw entry of each output. Where they are not, the raw gradient would be a sum over
entries, and the call is refused (the vmap fallback said only "element 0 of tensors does not require grad",
found porting a Jacobian regulariser).
"""

from __future__ import annotations

import torch

from ...errors import PlateError
from ..kit import register
from ..tensor import PlateTensor, _names, align
from ..tensor import new_plate_tensor as _new

_PT = PlateTensor


def _as_tuple(x) -> tuple:
    if x is None:
        return ()
    return (x,) if isinstance(x, torch.Tensor) else tuple(x)


def _raw_grad_output(out, g):
    """The raw grad_output of ``out`` (a plate tensor) for the per-sample ``g`` (None: ones, for a per-sample
    scalar, as torch creates it implicitly for a scalar output)."""
    raw = out._raw
    if g is None:
        if out.dim() != 0:
            raise PlateError(
                f"torch.autograd.grad of a plate tensor of per-sample shape {tuple(out.shape)} without "
                "grad_outputs: as for a tensor, the gradient can be created implicitly only for a scalar (per "
                "sample). Reduce it per sample first (`out.sum(-1)`) or pass grad_outputs")
        return torch.ones_like(raw)
    if not isinstance(g, torch.Tensor):  # (torch's own words for a plain output)
        raise TypeError(f"torch.autograd.grad: grad_outputs can be either Tensors or None, but got {type(g).__name__}")
    if tuple(g.shape) != tuple(out.shape):
        # as torch on one sample ("Mismatch in shape"): a plain tensor never spreads into plate dims (review r-29:
        # a (3, 2) grad_output for a per-sample (2,) output on a data plate of 3 gave each data point its own row)
        raise PlateError(
            f"torch.autograd.grad: a grad_output of per-sample shape {tuple(g.shape)} for an output of per-sample "
            f"shape {tuple(out.shape)}; they must be equal, as for one sample (a grad_output that differs per plate "
            "entry is a plate tensor on the output's plates)")
    if type(g) is _PT:
        if not set(g._plates) <= set(out._plates):
            raise PlateError(
                f"torch.autograd.grad: a grad_output on plates {_names(g._plates)} for an output on plates "
                f"{_names(out._plates)}; it must be on (some of) the output's plates")
        g = align(g._raw, g._plates, out._plates, pad_to=out.dim())
    return g.to(dtype=raw.dtype, device=raw.device).expand(raw.shape)


def _shown(plates) -> tuple:
    """Plate names for a message, with the partition step where there is one (``w@1``: the same name, another
    step)."""
    return tuple(f"{p.name}@{p.step}" if p.step else p.name for p in plates)


def _check_same_plates(outputs, inputs) -> None:
    """Every plate output on the plates of every plate input (one raw entry each), and no plain input."""
    for x in inputs:
        if type(x) is not _PT:
            raise PlateError(
                "torch.autograd.grad of plate tensors (per-sample values) with respect to a tensor that is not "
                "on their plates (a parameter, a plain input): each plate entry has its own derivative, and one "
                "backward pass gives their sum. For the gradient of the sum (or mean) of the entries, reduce "
                "the raw values first: torch.autograd.grad(out.tensor.sum(), params); for the step's gradient, "
                "differentiate storch.surrogate_loss()")
        if not x._raw.requires_grad:
            # (review r-29: a score-function or enumerating estimator's sample, or a pathwise sample of parameters
            # that do not require grad, reached the raw call as torch's "element 0 of tensors does not require grad")
            raise PlateError(
                "torch.autograd.grad with respect to a plate tensor that does not require grad: no gradient path "
                "leads to it (a score-function or enumerating estimator's sample, or a reparameterized sample of "
                "parameters that do not require grad). To differentiate in the sample, compute the outputs from "
                "`zd = z.detach().requires_grad_()` and differentiate with respect to zd")
        for p, size in zip(x._plates, x._raw.shape):
            if size != p.size:
                raise PlateError(
                    f"torch.autograd.grad with respect to a plate tensor whose raw tensor has size {size} along "
                    f"plate {p.name!r} of {p.size} entries (one value broadcast to every entry): its gradient "
                    "would be the sum over the entries. Expand it to the plate's entries before computing the "
                    "outputs from it (`t = t.expand_as(x)`, x a tensor with those plates)")
        for o in outputs:
            if type(o) is _PT and set(o._plates) != set(x._plates):
                raise PlateError(
                    f"torch.autograd.grad of an output on plates {_shown(o._plates)} with respect to an input on "
                    f"plates {_shown(x._plates)}: an entry of the input feeds several entries of the output (a "
                    "plate of a later node, another step of a partition), so one backward pass would sum their "
                    "derivatives. Differentiate outputs on the input's plates only (computed before the later "
                    "node's sample enters), or use plain torch on the raw tensors (`.tensor`) if the sum is what "
                    "you want")


@register(torch.autograd.grad)
def _grad(func, args, kwargs):
    """per-sample derivative by one backward pass of the raw outputs; refused unless outputs and inputs share plates

    (Each raw entry of an input then feeds one entry of each output. Refused too for a plain (parameter) input
    of plate outputs, whose per-entry gradients one pass would sum.)"""
    kwargs = dict(kwargs)
    outputs = _as_tuple(args[0] if args else kwargs.pop("outputs"))
    inputs = _as_tuple(args[1] if len(args) > 1 else kwargs.pop("inputs"))
    grad_outputs = args[2] if len(args) > 2 else kwargs.pop("grad_outputs", None)
    if kwargs.get("is_grads_batched"):
        raise PlateError("torch.autograd.grad(..., is_grads_batched=True) of plate tensors (what "
                         "torch.autograd.functional.jacobian/hessian(..., vectorize=True) call): pass vectorize=False "
                         "there (one backward pass per output entry, exact), or batch the grad_outputs along a plate "
                         "(the plates are storch's batching)")
    _check_same_plates(outputs, inputs)
    gs = _as_tuple(grad_outputs) if grad_outputs is not None else (None,) * len(outputs)
    raw_outputs = tuple(o._raw if type(o) is _PT else o for o in outputs)
    raw_gs = tuple(_raw_grad_output(o, g) if type(o) is _PT else (g._raw if type(g) is _PT else g)
                   for o, g in zip(outputs, gs))
    if all(g is None for g in raw_gs):
        raw_gs = None
    grads = func(raw_outputs, tuple(x._raw for x in inputs), raw_gs, **kwargs)
    return tuple(None if g is None else _new(g, x._plates) for g, x in zip(grads, inputs))
