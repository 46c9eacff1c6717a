"""The plate dispatcher's table: which of five treatments every torch function gets.

A torch function called on a :class:`storch.PlateTensor` (user code written for ONE sample) is
run for all plate entries at once by exactly one treatment, decided here once per function and
cached:

1. ``pointwise``: elementwise functions (torch's own ``pointwise`` tag on the aten operator of
   the same name, plus a short curated list of operators and conversions). Operands are lined
   up by plate name and their per-sample dims left-padded, so a plain tensor never broadcasts
   into a plate dim; one call. Random elementwise functions (``bernoulli``, ``dropout``,
   ``randn_like``, ...) first expand every plate to its full size, so each entry gets its own
   noise.
2. ``handler``: a registered plate-aware function (reductions and other functions with a
   ``dim``, shape functions, indexing, ``matmul``/``linear``, losses, ...) and user handlers
   registered with :func:`register_plate_handler`.
3. ``batch-first``: functions with a batch dimension of their own (convolutions, pools, RNNs and
   their cells, attention, normalisation, interpolation, ...): all plate dims are flattened into
   the function's batch dim, the function is called once, and the result is unflattened.
4. ``vmap``: every other function: ``torch.func.vmap`` over the plate dims of the raw storage
   (plain operands are not mapped; ``randomness="different"``), i.e. PyTorch's own batching
   rules.
5. ``refused``: a :class:`storch.PlateError` that says what to do instead, where no correct
   treatment exists (data-dependent output shapes such as ``nonzero``).

Nothing falls through to "assume the function acts on trailing dims". ``docs/plates.md`` is
generated from this table (``storch.plates.table_doc``, run by
``packages/storch-core/scripts/gen_plates_doc.py``).
"""

from __future__ import annotations

import enum
from typing import Any, Callable, NamedTuple, TypeVar, Union, overload

import torch

from ..errors import PlateError

__all__ = [
    "Treatment", "Entry", "treatment_of", "register_plate_handler", "refuse", "TABLE",
    "POINTWISE_EXTRA", "RANDOM", "describe", "from_torch",
]


class Treatment(str, enum.Enum):
    """The five ways a torch function runs on plate tensors (see the module docstring)."""

    POINTWISE = "pointwise"
    HANDLER = "handler"
    BATCH_FIRST = "batch-first"
    VMAP = "vmap"
    REFUSED = "refused"


class Entry(NamedTuple):
    """A function's plate treatment: one row of the table (what :func:`treatment_of` returns and
    :func:`refuse` makes).

    Attributes:
        treatment: which of the five treatments.
        impl: for ``handler``: ``handler(func, args, kwargs)``; for ``batch-first``: the spec
            ``spec(args, kwargs)`` (see ``storch.plates.rules.batch_first``); for ``refused``: the message;
            for ``pointwise``: True when the function draws random numbers; else None.
        note: one line for the generated docs.
    """

    treatment: Treatment
    impl: Any = None
    note: str = ""


# Explicit registrations: func -> Entry (handlers, batch-first specs, refusals).
TABLE: dict = {}
# Decisions made so far (explicit or derived), func -> Entry; the dispatcher also caches its
# implementation per function, so each function is decided once.
_DECIDED: dict = {}


def _register(funcs, entry: Entry, override: bool) -> None:
    for f in funcs:
        old = TABLE.get(f)
        if old is not None and not override and old != entry:
            raise PlateError(
                f"{_qualname(f)} already has the plate treatment {old.treatment.value!r} "
                f"({old.note or (_qualname(old.impl) if old.impl is not None else 'registered before')}); "
                "pass override=True to replace it"
            )
        TABLE[f] = entry
        _DECIDED.pop(f, None)
    _invalidate()


_LISTENERS: list = []


def _invalidate() -> None:
    for fn in _LISTENERS:
        fn()


_Funcs = Union[Callable[..., Any], tuple[Callable[..., Any], ...], list[Callable[..., Any]]]
_Handler = TypeVar("_Handler", bound=Callable[..., Any])
_Given = TypeVar("_Given", bound=Union[str, Entry, Callable[..., Any]])


@overload
def register_plate_handler(func: _Funcs, handler: None = None, *, override: bool = False,
                           note: str = "") -> Callable[[_Handler], _Handler]: ...


@overload
def register_plate_handler(func: _Funcs, handler: _Given, *, override: bool = False, note: str = "") -> _Given: ...


def register_plate_handler(func: _Funcs, handler: Union[None, str, Entry, Callable[..., Any]] = None, *,
                           override: bool = False, note: str = "") -> Any:
    """Register how ``func`` runs on plate tensors (a handler); usable as a decorator.

    ``handler(func, args, kwargs)`` is called with the original arguments (PlateTensors
    included) whenever ``func`` is called on a PlateTensor, and must return the result for all
    plate entries at once (PlateTensors with their plates in the leading dims of ``.tensor``).
    Instead of writing a handler, a function can also be declared ``"pointwise"``,
    ``"vmap"`` or refused: pass ``handler="pointwise"`` / ``"vmap"`` or ``storch.refuse(msg)``.

    Args:
        func: the torch function, ``torch.Tensor`` method, ``torch.ops`` operator, or any
            function that goes through ``__torch_function__`` (or a list or tuple of them).
        handler: the handler, a treatment name, or a :func:`refuse` marker (an :class:`Entry`).
            Omit it to use this as a decorator (which returns the handler itself).
        override: replace an existing registration (otherwise that is an error).
        note: one line for the generated table of supported functions.

    Example:
        >>> @storch.register_plate_handler(my_op)
        ... def my_op_on_plates(func, args, kwargs):
        ...     x = args[0]
        ...     return storch.PlateTensor(my_op(x.tensor), x.plates)
    """
    if handler is None:
        def deco(h):
            register_plate_handler(func, h, override=override, note=note)
            return h
        return deco
    funcs = func if isinstance(func, (tuple, list)) else (func,)
    if isinstance(handler, str):
        kind = Treatment(handler)
        if kind not in (Treatment.POINTWISE, Treatment.VMAP):
            raise PlateError(f"handler={handler!r}: pass a function, 'pointwise', 'vmap' or storch.refuse(message)")
        entry = Entry(kind, None, note)
    elif isinstance(handler, Entry):
        entry = handler if not note else handler._replace(note=note)
    elif callable(handler):
        entry = Entry(Treatment.HANDLER, handler, note)
    else:
        raise PlateError(f"handler must be callable, a treatment name or storch.refuse(...), got {handler!r}")
    _register(funcs, entry, override)
    return handler


def refuse(message: str) -> Entry:
    """A table entry that refuses a function with a :class:`storch.PlateError` saying ``message``."""
    return Entry(Treatment.REFUSED, message, message.split(";")[0])


# -- deriving the treatment --------------------------------------------------------------------

_T = torch.Tensor

# Operators and conversions that act elementwise but whose name has no pointwise-tagged aten
# operator (Python operators, dtype/device conversions, *_like factories).
POINTWISE_EXTRA = {
    "to", "type", "type_as", "float", "double", "half", "bfloat16", "int", "long", "short",
    "bool", "byte", "char", "cpu", "cuda", "detach", "detach_", "clone", "contiguous",
    "requires_grad_", "zeros_like", "ones_like", "full_like", "empty_like", "zero_", "fill_",
    "abs", "absolute", "neg", "negative", "positive", "logical_not", "bitwise_not", "real",
    "conj", "resolve_conj", "resolve_neg", "retain_grad", "pin_memory", "share_memory_",
    "softsign", "tanhshrink", "relu6", "hardsigmoid", "silu", "mish",
    "hardswish", "logsigmoid", "selu", "celu", "sigmoid", "float_power", "true_divide",
    "masked_fill", "masked_fill_", "clamp_min", "clamp_max", "where", "rsub", "isclose",
    "xlogy", "xlog1py", "nan_to_num", "logit", "erfinv", "expit", "frac", "threshold",
    "__add__", "__radd__", "__iadd__", "__sub__", "__rsub__", "__isub__", "__mul__", "__rmul__",
    "__imul__", "__truediv__", "__rtruediv__", "__itruediv__", "__div__", "__rdiv__", "__idiv__",
    "__floordiv__", "__rfloordiv__", "__ifloordiv__", "__mod__", "__rmod__", "__imod__",
    "__pow__", "__rpow__", "__ipow__", "__and__", "__rand__", "__iand__", "__or__", "__ror__",
    "__ior__", "__xor__", "__rxor__", "__ixor__", "__lshift__", "__rlshift__", "__ilshift__",
    "__rshift__", "__rrshift__", "__irshift__", "__eq__", "__ne__", "__lt__", "__le__",
    "__gt__", "__ge__", "__neg__", "__pos__", "__abs__", "__invert__",
    # aliases whose aten operator carries no tag
    "arccos", "arccosh", "arcsin", "arcsinh", "arctan", "arctan2", "arctanh", "multiply", "divide",
    "subtract", "greater", "greater_equal", "less", "less_equal", "not_equal", "fix", "log_sigmoid",
    "cdouble", "cfloat", "chalf", "isreal", "eq", "ne", "lt", "le", "gt", "ge", "gcd", "lcm",
    "copysign", "heaviside",
}

# Elementwise functions that draw random numbers: every plate is expanded to its full size
# first, so each plate entry gets its own draw.
RANDOM = {
    "bernoulli", "bernoulli_", "normal", "normal_", "poisson", "rand_like", "randn_like",
    "randint_like", "uniform_", "exponential_", "geometric_", "log_normal_", "cauchy_",
    "random_", "dropout", "dropout_", "alpha_dropout", "alpha_dropout_", "rrelu", "rrelu_",
    "binomial", "_standard_gamma",
}


def _public_name(space: str, name: str, f) -> str:
    """The name ``f`` has in ``torch.<space>``: torch's C bindings of torch.special, torch.linalg and torch.fft are
    named with the space as a prefix (``torch.special.logsumexp.__name__`` is ``special_logsumexp``), which the
    generated table of docs/plates.md and the messages showed as ``torch.special.special_logsumexp``."""
    public = name[len(space) + 1:] if name.startswith(f"{space}_") else name
    return public if getattr(getattr(torch, space), public, None) is f else name


def _qualname(f) -> str:
    mod = getattr(f, "__module__", None) or ""
    name = getattr(f, "__qualname__", None) or getattr(f, "__name__", None) or repr(f)
    if "<locals>" in name or name.startswith("_VariableFunctionsClass"):
        name = getattr(f, "__name__", name)
    objclass = getattr(f, "__objclass__", None)
    if objclass is not None and issubclass(objclass, torch._C.TensorBase):
        return f"Tensor.{getattr(f, '__name__', name)}"
    if mod == "torch._tensor":
        return name
    if mod.startswith("torch.nn.functional") or mod == "torch._C._nn":
        return f"F.{name}"
    for space in ("special", "linalg", "fft"):
        if mod.startswith(f"torch._C._{space}") or mod == f"torch.{space}":
            return f"torch.{space}.{_public_name(space, name, f)}"
    if mod in ("torch", "torch._C._VariableFunctions", "torch.functional", "") and not name.startswith("<"):
        return f"torch.{name}"
    if mod.startswith("torch"):
        return f"{mod}.{name}"
    return f"{mod}.{name}" if mod else name


def from_torch(func) -> bool:
    """Whether ``func`` belongs to torch (its namespaces or ``torch.Tensor``)."""
    objclass = getattr(func, "__objclass__", None)
    if objclass is not None:
        return issubclass(objclass, torch._C.TensorBase)
    mod = getattr(func, "__module__", None) or ""
    if mod.startswith("torch"):
        return True
    # torch.add & co. are builtins of torch._C._VariableFunctions, which report no module
    self_ = getattr(func, "__self__", None)
    return self_ is not None and getattr(self_, "__name__", "").startswith("torch")


_ATEN_PREFIX = {"torch._C._special": "special_", "torch.special": "special_", "torch._C._linalg": "linalg_"}


def _aten_pointwise(func) -> bool:
    """torch's own metadata: the aten operator of this name carries the ``pointwise`` tag."""
    name = getattr(func, "__name__", None)
    if not name:
        return False
    mod = getattr(func, "__module__", None) or ""
    name = _ATEN_PREFIX.get(mod, "") + name
    for n in (name, name[:-1]) if name.endswith("_") and not name.startswith("_") else (name,):
        packet = getattr(torch.ops.aten, n, None)
        if packet is None:
            continue
        try:
            if any(torch.Tag.pointwise in getattr(packet, o).tags for o in packet.overloads()):
                return True
        except Exception:  # an operator without tags: not pointwise by metadata
            pass
    return False


def treatment_of(func: Callable[..., Any]) -> Entry:
    """The treatment ``func`` gets on plate tensors (decided once, then cached)."""
    e = _DECIDED.get(func)
    if e is None:
        e = _decide(func)
        _DECIDED[func] = e
    return e


def _decide(func) -> Entry:
    e = TABLE.get(func)
    if e is not None:
        return e
    if not from_torch(func):
        return Entry(Treatment.VMAP, None, "not a torch function: vmap")
    name = getattr(func, "__name__", "")
    if name in RANDOM:
        return Entry(Treatment.POINTWISE, True, "random: each plate entry gets its own draw")
    if name in POINTWISE_EXTRA or (name.endswith("_") and name[:-1] in POINTWISE_EXTRA):
        return Entry(Treatment.POINTWISE, False, "elementwise (curated)")
    if _aten_pointwise(func):
        return Entry(Treatment.POINTWISE, False, "elementwise (aten pointwise tag)")
    return Entry(Treatment.VMAP, None, "torch.func.vmap over the plates")


# -- refusals: no correct treatment exists ---------------------------------------------------------

_DATA_DEPENDENT = (
    "the number of elements it returns depends on the values, so the plate entries would "
    "have different shapes; {instead}"
)
PACKED_SEQUENCES = ("packed sequences (nn.utils.rnn.PackedSequence) are not supported on plate tensors; pad "
                    "the sequences and pass the padded tensor (the per-sample code stays the same). A packed RNN "
                    "stops at each sequence's length (its final state is the one at length - 1, e.g. a message read "
                    "up to its eos); the padded run goes on over the padding, so take its output there instead of "
                    "its final state: out, _ = rnn(padded); h = torch.where(length > 0, out[(length - 1).clamp("
                    "min=0)], h0[-1]) (a unidirectional rnn, per sample, unbatched input; h0 is the initial state "
                    "passed to the rnn, zeros unless passed, an LSTM's h of (h0, c0), and h0[-1] its last layer's: "
                    "the whole h0 would broadcast the result to (num_layers, H); a length of 0 takes no step, and "
                    "out[length - 1] alone would read out[-1], the last padded position; batched, batch_first=False, "
                    "torch.where((length > 0).unsqueeze(-1), out[(length - 1).clamp(min=0), torch.arange(B)], "
                    "h0[-1]); length may be a sampled plate "
                    "tensor), or step a cell and keep the state past the end, h = torch.where(t < length, "
                    "cell(x[t], h), h) (also with t from the end for a bidirectional rnn, whose padded run's "
                    "backward half starts in the padding)")

REFUSALS = {
    # name (looked up on torch and torch.Tensor) -> what to do instead
    "nonzero": _DATA_DEPENDENT.format(instead="use a mask with torch.where(mask, x, other), or "
                                              "nonzero_static(x, size=...) with a fixed size"),
    "argwhere": _DATA_DEPENDENT.format(instead="use a mask with torch.where(mask, x, other)"),
    "masked_select": _DATA_DEPENDENT.format(instead="use torch.where(mask, x, 0) and reduce with a sum, "
                                                    "or keep the mask as a weight"),
    "unique": _DATA_DEPENDENT.format(instead="compare against a fixed set of values (x == values[:, None]), and "
                                             "count each with torch.bincount(x, minlength=K) for integers in 0..K-1 "
                                             "((x == values[:, None]).sum(-1) for others) in place of "
                                             "return_counts"),
    "unique_consecutive": _DATA_DEPENDENT.format(instead="work with a mask of x[1:] != x[:-1]"),
    "equal": "it returns one Python bool for all plate entries; use (a == b).all(-1) per sample, or "
             "compare the raw `.tensor`s",
    "allclose": "it returns one Python bool for all plate entries; use torch.isclose(a, b).all() per sample, "
                "or compare the raw `.tensor`s",
    "is_nonzero": "it returns one Python bool for all plate entries; compare per sample instead",
    "__contains__": "it returns one Python bool for all plate entries; use (x == value).any() per sample",
    "as_strided": "its strides address the raw storage, which holds every plate entry; use view, "
                  "reshape, unfold or indexing instead",
    "as_strided_": "its strides address the raw storage, which holds every plate entry; use view, "
                   "reshape, unfold or indexing instead",
    "as_strided_scatter": "its strides address the raw storage, which holds every plate entry; use "
                          "indexing instead",
    "resize_": "resizing in place cannot keep the plate dims; build a new tensor per sample instead",
    "resize_as_": "resizing in place cannot keep the plate dims; build a new tensor per sample instead",
    "set_": "it replaces the storage that holds every plate entry; build a new tensor instead",
    "data_ptr": "the raw storage holds every plate entry; use `.tensor.data_ptr()` for the raw tensor",
    "untyped_storage": "the raw storage holds every plate entry; use `.tensor.untyped_storage()`",
    "storage": "the raw storage holds every plate entry; use `.tensor.storage()`",
    # pack_padded_sequence / pack_sequence: refused when packing, before a PackedSequence whose
    # batch_sizes vary over plates reaches an RNN (torch.lstm refuses it too: see rules.batch_first)
    "_pack_padded_sequence": PACKED_SEQUENCES,
}


def _register_refusals() -> None:
    for name, msg in REFUSALS.items():
        funcs = [f for f in (getattr(torch, name, None), getattr(_T, name, None)) if callable(f)]
        _register(funcs, refuse(msg), override=False)


_register_refusals()


def describe(func) -> str:
    """A readable name for ``func`` (used in error messages and the generated docs)."""
    if getattr(func, "__name__", "") == "__get__" and hasattr(func, "__self__"):
        return f"Tensor.{func.__self__.__name__}"
    return _qualname(func)
