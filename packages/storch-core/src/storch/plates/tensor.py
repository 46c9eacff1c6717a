"""Plates: named dimensions that hold independent samples or data points (paper, section 3.7).

A :class:`PlateTensor` is what user code sees: a tensor for ONE sample. Its raw storage
(``.tensor``) has one leading dimension per plate, in the order of ``.plates``; the
per-sample shape (``.shape``) is what is left. Torch functions called on plate tensors are
routed through ``__torch_function__`` (see ``storch.plates.dispatch``), which lines plates up by name,
runs the function once on the raw tensors (vectorised over all samples) and wraps the result.
Nothing in torch is patched.
"""

from __future__ import annotations

import copy
import math
import operator
import os
from typing import Any, Callable, NamedTuple, Optional, Sequence

import torch

from ..runtime.eager import eager_only, foreign_trace_message, under_jit_trace
from ..errors import PlateError

__all__ = [
    "Plate", "Lineage", "PlateTensor", "plates_of", "union_plates", "align", "raw_of", "MAX_DIMS", "install_dispatcher",
    "ancestor_index",
]


class Lineage:
    """The identity of one plate instance in one graph, and the ancestry of a partition's steps.

    Every plate a graph creates (a node's sample plate, a data plate) gets a fresh lineage, so
    two plates with the same name from different graphs (or from before a reset) are never
    equal and never align: mixing them is an error, not a silent merge.

    A partition (one estimator called at several steps, paper section 3.2) keeps one lineage
    for all its steps; ``Plate.step`` says which step a tensor was last touched at. Entry ``i``
    at step ``t`` continues entry ``parents[t][i]`` of step ``t - 1``, or entry ``i`` itself when
    step ``t`` has no parent indices (sampling with replacement). When tensors of two steps
    meet, the earlier one is re-indexed to the later step (``index``), lazily, in ``align``.

    A lineage is *closed* (``closed`` holds the reason) when its graph is reset or finished
    (``storch.backward()``, ``storch.reset()``, the end of a ``with storch.Graph():`` block, or an
    exception during the step): a tensor carrying it can no longer be used as a cost or as a
    distribution parameter, and the error says so.

    ``watch``: ``None``, or a callable ``watch(func, raw, plates, caller)`` that the dispatcher calls when ``func``, a
    function whose result jumps outside the autograd graph (a comparison, ``argmax``, a bool or integer
    cast: ``storch.plates.dispatch``), is applied to a plate tensor of this plate whose raw tensor is ``raw``
    (``max`` too: ``storch.plates.dispatch.INDEX_VALUES``); ``plates`` is ``None`` where ``raw`` requires grad
    and grad is enabled (its autograd graph can be walked), else the tensor's plates (detached, or under
    ``torch.no_grad()``); ``caller()`` is the code of torch.distributions that made the call, or ``None`` (user
    code), found once per call (``storch.plates.dispatch.Caller``). Set by a
    node whose estimator is ``jump_free`` (REBAR and RELAX differentiate the cost at their relaxed sample: a
    threshold of it makes that cost jump), and by a Categorical / OneHotCategorical node whose handed-out
    one-hot value carries gradient (torch's log_prob reads it as indices); dropped when the graph ends.

    ``evaluation_from``: ``None``, or the index of the plate's first entry that is the estimator's own evaluation
    point rather than a sample it hands out (REBAR's and RELAX's relaxed inputs σ_λ(z), σ_λ(z̃) after the n hard
    samples: :meth:`storch.Estimator.evaluation_from`): a user's gradient hook (``register_hook`` on a plate
    tensor) changes only the entries before it, the others' gradient passes through as autograd computed it.
    Set by the node at its first step.

    ``unpickled``: ``True`` for a lineage rebuilt by unpickling (``pickle``, ``torch.load``, a DataLoader worker's
    batch sent to the main process): no graph of this process made it, and the refusal says so
    (:func:`unpickled_message`) rather than naming a closed or another graph.

    Compared and hashed by identity.
    """

    __slots__ = ("parents", "index_plates", "_cache", "closed", "watch", "evaluation_from", "unpickled",
                 "__weakref__")

    def __init__(self) -> None:
        self.parents: dict[int, torch.Tensor] = {}
        self.index_plates: dict[int, tuple] = {}  # step -> plates of dims 1.. of its parent index
        self._cache: dict = {}
        self.closed: Optional[str] = None  # why its graph ended; None while the graph is live
        self.watch: Optional[Callable[[Any, torch.Tensor, Optional[tuple], Any], None]] = None
        self.evaluation_from: Optional[int] = None
        self.unpickled = False

    def __getstate__(self):
        """Pickled (and deep-copied) without ``watch``: a closure of the step's node, runtime state of that step
        only (a pathwise node's plate tensors, and the costs computed from them, failed to pickle with "Can't
        pickle local object '_compare_watch.<locals>.watch'"). The copy is a lineage of its own, which no live
        graph owns: a step that mixes it with its own plate tensors refuses it, as it does a score node's, and says
        it was unpickled (``unpickled``: a DataLoader worker's batch looked like a stale tensor of a failed step)."""
        state = {name: getattr(self, name) for name in self.__slots__ if name != "__weakref__" and hasattr(self, name)}
        state["watch"] = None
        state["unpickled"] = True
        return None, state

    def __deepcopy__(self, memo):
        """A deep copy as before ``__getstate__`` was written: every slot copied, ``watch`` kept (a function, which
        ``copy.deepcopy`` does not copy)."""
        new = Lineage.__new__(Lineage)
        memo[id(self)] = new
        for name in self.__slots__:
            if name != "__weakref__" and hasattr(self, name):
                setattr(new, name, copy.deepcopy(getattr(self, name), memo))
        return new

    def set_parents(self, step: int, index: torch.Tensor, plates: tuple = ()) -> None:
        """Record that entry ``i`` at ``step`` descends from entry ``index[i]`` at ``step - 1``.

        Args:
            step: the step whose entries' parents are recorded (>= 1).
            index: long tensor of shape ``(size at step, *[p.size for p in plates])``: per entry of
                the other plates (e.g. one beam per data point) its own parent indices.
            plates: the plates of ``index``'s dims after the first (default: none, one index for all).
        """
        plates = tuple(plates)
        if index.dim() != 1 + len(plates):
            raise PlateError(
                f"parent index of step {step} has {index.dim()} dims but {1 + len(plates)} were declared "
                f"(the partition's own entries and plates {_names(plates)})"
            )
        self.parents[step] = index
        self.index_plates[step] = plates
        self._cache.clear()

    def index(self, from_step: int, to_step: int) -> Optional[torch.Tensor]:
        """Indices into ``from_step``'s entries of the ancestors of ``to_step``'s entries.

        ``None`` when every step in between kept its entries in place (no re-indexing needed).
        The result has the shape of a parent index (see :meth:`index_plates_of` for its plates).
        """
        if not self.parents:
            return None
        return self._compose(from_step, to_step)[0]

    def index_plates_of(self, from_step: int, to_step: int) -> tuple:
        """The plates of dims 1.. of ``index(from_step, to_step)``."""
        if not self.parents:
            return ()
        return self._compose(from_step, to_step)[1]

    def _compose(self, from_step: int, to_step: int):
        # (index, plates) from `to_step` back to `from_step`, built from the to_step end and cached
        # for every step in between, so that costs of all steps of a long sequence moved to its last
        # step cost one composition each (linear in the steps, not quadratic)
        cache = self._cache
        hit = cache.get((from_step, to_step))
        if hit is not None:
            return hit
        s = from_step
        chain = []
        while s < to_step and (s, to_step) not in cache:
            chain.append(s)
            s += 1
        acc = cache[(s, to_step)] if s < to_step else (None, ())
        for s in reversed(chain):  # index(s, to) = parents[s + 1] composed with index(s + 1, to)
            p = self.parents.get(s + 1)
            if p is not None:
                acc = _chain(p, self.index_plates[s + 1], *acc)
            cache[(s, to_step)] = acc
        return acc

    def __repr__(self) -> str:
        return f"Lineage(steps with parents={sorted(self.parents)})"


def _chain(a: torch.Tensor, a_plates: tuple, b, b_plates: tuple):
    """a ∘ b: ``a`` maps entries of step s+1 to step s, ``b`` entries of step `to` to step s+1."""
    if b is None:
        return a, a_plates
    if not a_plates and not b_plates:
        return a[b], ()
    u = union_plates([b_plates, a_plates])  # per-entry parents: compose entry-wise
    a = _index_view(a, a_plates, u)
    b = _index_view(b, b_plates, u)
    shape = _broadcast_shapes(a.shape[1:], b.shape[1:])
    return a.expand(a.shape[:1] + shape).gather(0, b.expand(b.shape[:1] + shape)), u


def _broadcast_shapes(a, b) -> tuple:
    """``torch.broadcast_shapes(a, b)`` for two shapes of Python ints, in plain Python: torch's runs its
    symbolic-shape checks per dim, ~40 us a call, and a partition re-indexes tensors by the lineage a
    few times per step and cost (a 10-step unordered_set sequence: 26 calls, ~1 ms a step). Symbolic
    sizes (a trace) go to torch's."""
    if not all(type(x) is int for x in (*a, *b)):
        return tuple(torch.broadcast_shapes(a, b))
    n = max(len(a), len(b))
    a, b = (1,) * (n - len(a)) + tuple(a), (1,) * (n - len(b)) + tuple(b)
    out = []
    for x, y in zip(a, b):
        if x != y and x != 1 and y != 1:
            raise RuntimeError(f"shapes {a} and {b} cannot be broadcast: {x} against {y}")
        out.append(y if x == 1 else x)
    return tuple(out)


def _index_view(idx: torch.Tensor, plates: tuple, target: tuple) -> torch.Tensor:
    """A parent index (dims: entries, *plates) viewed with dims (entries, *target)."""
    entry = Plate("(entries)", idx.shape[0])
    return align(idx, (entry,) + plates, (entry,) + target)


class Plate(NamedTuple):
    """A named plate dimension.

    Args:
        name: the plate's name, unique within a graph.
        size: the number of samples (or data points) along it.
        independent: True for data plates from ``denote_independent`` (reduced by the mean in
            the surrogate), False for sample plates of stochastic nodes (reduced by weights).
        step: for the plate of a partition, the step a tensor was last touched at (0 otherwise).
        lineage: the plate instance this belongs to (set by the graph that created it; ``None``
            for plates built by hand); see :class:`Lineage`.
    """

    name: str
    size: int
    independent: bool = False
    step: int = 0
    lineage: Optional[Lineage] = None


_make_wrapper = torch.Tensor._make_wrapper_subclass
_func_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
_func_level = torch._C._functorch.maybe_get_level
_func_unwrapped = torch._C._functorch.get_unwrapped
_FINISHED = -2  # torch.func's level of a wrapper whose transform has returned (maybe_get_level)


def _outside_finished_transforms(raw: torch.Tensor) -> torch.Tensor:
    """``raw`` at the level outside the torch.func transforms that have returned since it was computed.

    A plate tensor in the aux of ``torch.func.grad(step, has_aux=True)`` (or ``grad_and_value``, ``vjp``,
    ``jacrev``) leaves the transform as it is: torch unwraps the plain tensors of an aux, not the raw tensor a
    wrapper subclass holds, which kept the finished transform's wrapper (``GradTrackingTensor(lvl=-2)``: torch.save
    and pickle failed with "Cannot access storage of TensorWrapper"). Unwrapping it is what torch does for a
    plain aux; a wrapper of a transform still running (a level >= 0) is kept.
    """
    while _func_wrapped(raw) and _func_level(raw) == _FINISHED:
        raw = _func_unwrapped(raw)
    return raw


class PlateTensor(torch.Tensor):
    """A tensor that represents one sample of a value drawn over one or more plates.

    Use it as if it were the tensor for a single sample: ``.shape``, ``.dim()``, ``dim=``
    arguments, indexing and ``view`` all address the per-sample dimensions only.

    Attributes:
        plates: tuple of :class:`Plate`, in the order of the leading dims of ``.tensor``.
        tensor: the raw ``torch.Tensor`` with the plate dimensions first.
    """

    # slots: a result's two attributes are set without a per-instance dict (~0.2 us per torch call)
    __slots__ = ("_raw", "_plates")
    _raw: torch.Tensor
    _plates: tuple[Plate, ...]

    # eager_only (storch.runtime.eager), as ``.tensor`` below and storch's public functions on plate tensors: user code
    # under torch.compile that calls it takes a graph break there, and dynamo never traces its checks into a frame of
    # its own (a cache entry per plate size and raw rank, guarded on storch's own objects)
    @staticmethod
    @eager_only
    def __new__(cls, tensor: torch.Tensor, plates: Sequence[Plate]):
        if not isinstance(tensor, torch.Tensor):
            raise PlateError(
                f"storch.PlateTensor(tensor, plates) needs a torch tensor, got a {type(tensor).__name__}: convert "
                "it first, e.g. storch.PlateTensor(torch.as_tensor(r, dtype=torch.float32, "
                "device=z.device), z.plates) for values r computed per entry outside torch (from z.tensor, in numpy), "
                "with the plate dims first")
        plates = tuple(plates)
        n = len(plates)
        if tensor.dim() < n:
            raise PlateError(
                f"a tensor of shape {tuple(tensor.shape)} cannot hold {n} plate dims {_names(plates)}"
            )
        for i, p in enumerate(plates):
            if tensor.shape[i] != p.size and tensor.shape[i] != 1:
                raise PlateError(
                    f"dim {i} of the tensor has size {tensor.shape[i]} but plate {p.name!r} has size {p.size}"
                )
        if _wrap_check is not None:  # (storch.surrogate.blackbox: a value per entry of a pathwise node's plate)
            _wrap_check(tensor, plates)
        return cls._wrap(tensor, plates)

    @classmethod
    def _wrap(cls, tensor: torch.Tensor, plates: tuple[Plate, ...]) -> "PlateTensor":
        # Unchecked constructor: `plates` matches tensor's leading dims (see `new_plate_tensor`).
        return new_plate_tensor(tensor, plates)

    @property
    def plates(self) -> tuple[Plate, ...]:
        """The plates of the leading dims of :attr:`tensor`, outermost first."""
        return self._plates

    @property
    @eager_only
    def tensor(self) -> torch.Tensor:
        """The raw storage: one leading dim per plate (in the order of :attr:`plates`), then the per-sample dims."""
        raw = self._raw
        if _func_wrapped(raw):  # (one C call; a plate tensor out of a finished torch.func transform: its value outside)
            raw = self._raw = _outside_finished_transforms(raw)
        return raw

    @property
    def plate_names(self) -> tuple[str, ...]:
        """The names of :attr:`plates`, in order."""
        return tuple(p.name for p in self._plates)

    # Per-sample metadata answered in Python, without a trip through ``__torch_function__`` (issue
    # 19: torch.distributions' argument validation and nn.GRU's input checks ask for dim(), size()
    # and shape dozens of times per step; through the dispatcher each answer cost ~1.5 us). The
    # wrapper's own shape is the per-sample shape, and the raw tensor's trailing dims are it, so the
    # answers are those of the dispatched handlers (``rules.metadata``); anything unusual (a named
    # dim, an out-of-range dim: torch's own error) still goes through the dispatcher.

    @property
    def shape(self) -> torch.Size:  # type: ignore[override]
        """The per-sample shape (the raw tensor's shape without the plate dims)."""
        return self._raw.shape[len(self._plates):]

    @property
    def ndim(self) -> int:  # type: ignore[override]
        """The number of per-sample dims."""
        return self._raw.dim() - len(self._plates)

    @property
    def dtype(self) -> torch.dtype:  # type: ignore[override]
        """The dtype (that of the raw tensor)."""
        return self._raw.dtype

    @property
    def device(self) -> torch.device:  # type: ignore[override]
        """The device (that of the raw tensor)."""
        return self._raw.device

    def dim(self) -> int:  # type: ignore[override]
        """The number of per-sample dims."""
        return self._raw.dim() - len(self._plates)

    ndimension = dim

    def numel(self) -> int:  # type: ignore[override]
        """The number of elements of one sample."""
        return self._raw.shape[len(self._plates):].numel()

    nelement = numel

    def is_floating_point(self) -> bool:  # type: ignore[override]
        """Whether the dtype is a floating point dtype."""
        return self._raw.is_floating_point()

    def size(self, dim: Any = None) -> Any:  # type: ignore[override]
        """The per-sample shape, or the size of per-sample dim ``dim``."""
        s = self._raw.shape[len(self._plates):]
        if dim is None:
            return s
        if type(dim) is int and -len(s) <= dim < len(s):
            return s[dim]
        return torch.Tensor.size(self, dim)  # a named dim, or torch's own out-of-range error

    def __repr__(self, *args, **kwargs) -> str:  # noqa: D105
        return f"PlateTensor(plates={_names(self._plates)}, tensor={self.tensor!r})"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        """``f"{x}"`` is ``repr(x)``; a format spec (``f"{x:.3f}"``) needs one number, refused as ``.item()`` is."""
        if not spec:
            return self.__repr__()
        if not self._plates:
            return format(self._raw, spec)
        raise too_many_samples(self, f"a format spec (f\"{{x:{spec}}}\")")

    def __round__(self, ndigits: Optional[int] = None):
        """``round(x, n)`` needs one number, refused as ``.item()`` is (``torch.round(x, decimals=n)`` rounds every
        entry)."""
        if not self._plates:
            raise TypeError(f"type {type(self._raw).__name__} doesn't define __round__ method")
        raise too_many_samples(self, "`round`")

    def __reduce_ex__(self, protocol):
        return (PlateTensor, (self.tensor, self._plates))

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        return _dispatch(func, args, kwargs or {})

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        # Every torch call on a PlateTensor is handled by __torch_function__ on raw tensors;
        # reaching the dispatcher means some code bypassed it (e.g. a custom C++ extension).
        if func is torch.ops.aten._local_scalar_dense.default:
            # torch's argument parser reads a Python number (an int argument, a size) from a tensor
            # without asking __torch_function__ (e.g. torch.select(plain, 0, sampled)): refused, as .item()
            raise PlateError(
                "a PlateTensor was passed where torch takes a Python number (an int or float argument such as "
                "an index, a shift or a size): one number cannot hold every sample's value. Index with the "
                "plate tensor instead (`x[i]`, `x[:, i]`, `torch.gather`), or keep the number a fixed constant. "
                + SAMPLED_INDEX + ". " + SAMPLED_SIZE)
        if getattr(func, "__name__", "").lstrip("_").startswith(_SPARSE_CONSTRUCTORS):
            # (torch's sparse constructors do not ask __torch_function__: their aten operator is the first storch sees)
            raise PlateError(SPARSE_CONSTRUCTOR)
        if func is torch.ops.aten.is_pinned.default and torch.sparse.check_sparse_tensor_invariants.is_enabled():
            # torch.sparse_coo_tensor(..., check_invariants=True) (or under torch.sparse.check_sparse_tensor_invariants)
            # validates first: is_pinned of its indices and values, before its aten operator. Python's x.is_pinned()
            # and pin_memory() ask __torch_function__, so a plate tensor reaches this aten call only from C++ code,
            # which with the checks on is the sparse validator (the compressed constructors validate in their operator)
            raise PlateError("torch's sparse invariant checks (check_invariants=True, or "
                             "torch.sparse.check_sparse_tensor_invariants) read a plate tensor: " + SPARSE_CONSTRUCTOR)
        if under_jit_trace():  # (torch.jit.trace of plate tensors, without grad: its copy of them; p-ext3)
            raise PlateError(foreign_trace_message(f"{func} on plate tensors"))
        if any(type(a) is PlateTensor and _func_wrapped(a._raw) for a in args):
            # (p-func) torch.func unwrapping a transform's outputs: vmap's _remove_batch_dim expands a plate tensor
            # whose raw tensor it batched (it sees the wrapper, not the raw); no torch.func level is visible here
            raise PlateError(
                f"{func} reached a PlateTensor below __torch_function__: a plate tensor computed inside a torch.func "
                "transform (its raw tensor batched by vmap or tracked by grad) is among the transform's outputs "
                "(e.g. a vmapped function returned it, or storch's samples fed to vmap(functional_call) over stacked "
                "ensemble members), and torch.func cannot carry its plates out. Run the members in a Python loop "
                "(`torch.stack([m(z) for m in models])`), run the whole storch step inside the transform "
                "(parameters in, the surrogate out: `torch.func.vmap(torch.func.grad(step), randomness=...)` with "
                "randomness='different' for a sampler that takes the parameters (sample() of Bernoulli, Categorical, "
                "Normal), randomness='same' for one that fills a tensor in place (rsample() of Normal, Laplace, "
                "...: 'different' refuses it; the members then share the noise): docs/plates.md, 'torch.func "
                "transforms of a whole step', has the table), or return plain tensors (`z.tensor`, plate dims first)")
        raise PlateError(
            f"{func} reached a PlateTensor below __torch_function__: a sparse tensor (torch.sparse_coo_tensor), "
            "a custom C++ operator, a torch.func transform (torch.func.grad, jacrev, vjp, jvp, vmap) applied to a "
            "plate tensor, or another code path that bypasses torch's Python dispatch. Plate tensors work "
            "with dense torch operations: build the dense tensor instead (index_add, scatter_add, a dense "
            "adjacency mask); for a derivative in a sample use torch.autograd.grad(out, z, create_graph=True), "
            "which gives each plate entry its own; or pass `.tensor` explicitly and handle the plate dimensions "
            "(leading) yourself"
        )


# the aten operators of torch.sparse_coo_tensor and of the compressed constructors (csr, csc, bsr, bsc)
_SPARSE_CONSTRUCTORS = ("sparse_coo_tensor", "sparse_compressed_tensor", "sparse_csr_tensor", "sparse_csc_tensor",
                        "sparse_bsr_tensor", "sparse_bsc_tensor")

SPARSE_CONSTRUCTOR = (
    "a sparse tensor (torch.sparse_coo_tensor, or a CSR / CSC / BSR / BSC constructor) was built from sampled "
    "indices or values (plate tensors): that is one sparse tensor per sample, and storch holds a plate tensor's "
    "samples in one dense tensor (plates leading) that no sparse layout can batch, so it is unsupported. Build the "
    "dense tensor instead, per sample as your code sees it: from COO indices (d, nnz) and values (nnz,), "
    "`A = torch.zeros(size).index_put(tuple(indices), values, accumulate=True)` (duplicate indices summed, as "
    "coalescing sums them), or `torch.zeros(n).scatter_add(0, i, values)` for one index row; then `A @ h` in place "
    "of the sparse product. A plain sparse matrix (a fixed graph) times per-sample dense values does run: S @ h, "
    "torch.sparse.mm(S, h) (docs/plates.md, 'Sparse tensors')")


def sampled_index_advice(dim: object = "d", k: object = "k", i: str = "i", read: bool = True,
                         write: bool = False) -> str:
    """What to write for a sampled start with a fixed length ``k`` (``k=None``: a single sampled index) where torch
    takes one Python number (``narrow``, a slice ``x[i:i + k]``, ``select_scatter``, ``slice_scatter``): an index
    tensor, ``i + torch.arange(k)``, read with ``index_select`` / ``gather`` and written with ``index_copy`` /
    ``index_put`` / ``scatter``."""
    if k is None:
        what, idx, put, src = "A sampled index", f"{i}.reshape(1)", f"({i},), src", f"src.unsqueeze({dim})"
    else:
        what, idx, src = "A sampled start with a fixed length", f"{i} + torch.arange({k})", "src"
        put = f"({idx},), src"
    ways = []
    if read:
        ways.append(f"index with the start plus an arange, `x.index_select({dim}, {idx})`"
                    + (f" (`x[{idx}]`)" if dim == 0 else "") + f", or torch.gather with that index along dim {dim}"
                    if k is not None else f"index with it, `x.index_select({dim}, {idx})` or `x[..., {i}]` at dim {dim}")
    if write:
        ways.append(f"write with `x.index_copy({dim}, {idx}, {src})`"
                    + (f" (`x.index_put({put})`)" if dim == 0 else "") + f", or torch.scatter along dim {dim}")
    return (f"{what} is an index: " + "; ".join(ways) + ". The shapes stay fixed, and the "
            + ("start" if k is not None else "index") + " may be sampled (a score-function node's value, e.g. a "
            "glimpse's position)")


SAMPLED_SIZE = (
    "Where the number is a size, a length or a slice bound (`range(n)`, `x[:n]`, `torch.arange(n)`, "
    "`x.narrow(d, 0, n)`: a variable length), the shapes cannot differ per sample: keep a fixed maximum length "
    "M and mask the entries past n, `z * (torch.arange(M) < n.unsqueeze(-1))` (or `torch.where` with that mask)")


# a sampled choice among Python objects (ENAS-style architecture search: one of K candidate layers per layer)
SAMPLED_CHOICE = ("Where it picks one of several layers or functions (`ops[int(k)](h)`, `ops[k](h)`), run "
                  "every candidate and select with the tensor: `torch.stack([op(h) for op in ops])[k]`, or weight "
                  "them by `F.one_hot(k, len(ops))`; a number read from `.tensor` would leave the plates, so a cost "
                  "computed through it would get no credit from the estimators")


# a sampled start or index where torch reads one Python number from it (a slice's start, `x[i:i + k]`; an int
# argument of select_scatter / slice_scatter with plain tensors, which never reaches storch's handlers)
SAMPLED_INDEX = ("Where it is a start with a fixed length k (`x[i:i + k]`, `x.narrow(d, i, k)`, "
                 "`torch.slice_scatter(x, src, d, i, i + k)`), it is an index: read with "
                 "`x.index_select(d, i + torch.arange(k))` or torch.gather, write with "
                 "`x.index_copy(d, i + torch.arange(k), src)` or torch.scatter (a single index, as in "
                 "`torch.select_scatter(x, src, d, i)`: `x.index_copy(d, i.reshape(1), src.unsqueeze(d))`); the "
                 "shapes stay fixed and the start may be sampled")


def too_many_samples(x: PlateTensor, what: str) -> PlateError:
    n = math.prod(p.size for p in x._plates)
    one = (" (one entry here, but a Python number leaves the plates: a cost computed through it would get no "
           "credit from the estimators)" if n == 1 else "")
    size = ("" if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype is torch.bool
            else ". " + SAMPLED_CHOICE + ". " + SAMPLED_INDEX + ". " + SAMPLED_SIZE)
    return PlateError(
        f"{what} needs a single value, but this PlateTensor holds one value per plate entry, {n} over plates "
        f"{_names(x._plates)}{one}. Keep computing with the tensor (index with it: `table[z]`), reduce over "
        "the plates first (storch.surrogate_loss does that for costs) or use `.tensor` to get the raw values "
        f"with the plate dims first{size}"
    )


def new_plate_tensor(tensor: torch.Tensor, plates: tuple[Plate, ...]) -> PlateTensor:
    """Unchecked constructor for the hot path (every dispatched result): ``plates`` must match the
    leading dims of ``tensor``. A module function rather than a classmethod: one call less per result."""
    r = _make_wrapper(PlateTensor, tensor.shape[len(plates):], dtype=tensor.dtype, device=tensor.device)
    r._raw = tensor
    r._plates = plates
    return r


# the check of the public constructor's values (``storch.PlateTensor(raw, plates)``, not ``_wrap``), installed by
# the layer that knows the graph's nodes (storch.surrogate.blackbox), which this module never imports
_wrap_check: Optional[Callable[[torch.Tensor, tuple], None]] = None


def install_wrap_check(check: Callable[[torch.Tensor, tuple], None]) -> None:
    """Make ``check(raw, plates)`` run in ``storch.PlateTensor(raw, plates)`` (the public constructor) after its
    shape checks; it raises to refuse the value."""
    global _wrap_check
    _wrap_check = check


def _dispatch(func, args, kwargs):
    raise PlateError(
        "no plate dispatcher is installed: import storch (storch.plates.dispatch installs it) before "
        "calling torch functions on plate tensors"
    )


def install_dispatcher(torch_function) -> None:
    """Make ``torch_function(cls, func, types, args, kwargs)`` the ``__torch_function__`` of plate tensors.

    The dispatcher (``storch.plates.dispatch``) sits above this module and installs itself here
    when it is imported, so this module never imports it.
    """
    PlateTensor.__torch_function__ = classmethod(torch_function)
    for name in _PYTHON_OPERATORS:
        setattr(PlateTensor, name, _direct_operator(name, torch_function))


# torch.Tensor's operators written in Python (torch/_tensor.py: ``1 - x``, ``x ** 2``, ``2 / x``, ...):
# on a plate tensor they reach __torch_function__ through torch's Python ``handle_torch_function``
# (~2 us per call, issue 19); the C++ operators (``x - 1``, ``x * y``) reach it directly
_PYTHON_OPERATORS = ("__rsub__", "__rdiv__", "__rtruediv__", "__pow__", "__rpow__", "__rmod__",
                     "__floordiv__", "__rfloordiv__", "__rmatmul__")
_mode_enabled = torch._C._is_torch_function_mode_enabled


def _direct_operator(name: str, torch_function):
    """PlateTensor's ``name``: torch's own operator, with __torch_function__ called directly.

    It is what torch's version does when nothing else takes part (``handle_torch_function`` then calls
    ``PlateTensor.__torch_function__(torch.Tensor.<name>, ...)``), minus that Python detour: a
    ``TorchFunctionMode`` that is active, or another operand of a tensor subclass, takes torch's version,
    which orders them; a TypeError gives NotImplemented there as here (Python then tries the other
    operand)."""
    base = getattr(torch.Tensor, name)
    types = (PlateTensor,)
    reflected = name.startswith("__r")

    def operator(self, other):
        if isinstance(other, torch.Tensor):
            if reflected:
                # ``t - x`` with a tensor t: Python asks the subclass first; the tensor's own operator
                # (a C++ one: ``t.__sub__(x)``) computes it as before this override (``t / x`` is a
                # division, where torch's ``__rdiv__`` multiplies by a reciprocal)
                return NotImplemented
            if type(other) is not torch.Tensor and type(other) is not PlateTensor:
                return base(self, other)
        if _mode_enabled():
            return base(self, other)
        try:
            return torch_function(PlateTensor, base, types, (self, other), None)
        except TypeError:
            return NotImplemented

    operator.__name__ = operator.__qualname__ = name
    operator.__doc__ = base.__doc__
    # dynamo does not inline it: the dispatcher runs eagerly under torch.compile (storch.runtime.eager)
    operator._torchdynamo_disable = True  # type: ignore[attr-defined]
    return operator


def _names(plates: Sequence[Plate]) -> tuple[str, ...]:
    return tuple(p.name for p in plates)


@eager_only
def ancestor_index(x: "PlateTensor", plate: str, step: Optional[int] = None) -> "PlateTensor":
    """Which entry of an earlier step of a partition each entry of ``x`` continues.

    Entry ``i`` of ``x`` (at the step of its plate ``plate``, t) continues entry ``ancestor_index(x,
    plate)[i]`` of step ``t - 1`` (``step=s``: of step s <= t). Estimators that sample with replacement keep
    entry i in place (the index is ``arange``); beams (``unordered_set``, ``sum_and_sample`` with ``buffer=``)
    re-index the entries between the steps, and the plate's size may change. Plate tensors follow that
    re-indexing by themselves; what was taken out of them does not: a raw tensor from ``.tensor``, a Python
    list or object per entry (a simulator per episode). Carry such state to step t with the index:
    ``envs = [copy.deepcopy(envs[j]) for j in storch.ancestor_index(a, "ep").tensor.tolist()]``.

    Returns an int64 plate tensor of per-sample shape ``()`` with x's plates, in x's order (its ``.tensor``
    lines up with the leading dims of ``x.tensor``): the index along ``plate``; with a data plate a beam runs
    per data point, so the index is per data point too.
    Raises ``PlateError`` where ``x`` has no sample plate ``plate``, or ``step`` is not an earlier step
    (step 0 has none).
    """
    plates = plates_of(x)
    p = next((q for q in plates if q.name == plate and not q.independent), None)
    if p is None or p.lineage is None:
        raise PlateError(f"storch.ancestor_index: the value has no sample plate {plate!r} (its plates: "
                         f"{list(_names(plates))}); pass a value the partition's estimator returned at this step, "
                         "or one computed from it")
    t = p.step
    s = t - 1 if step is None else step
    if step is None and t == 0:
        raise PlateError(f"storch.ancestor_index: plate {plate!r} of the value is at step 0 (the first step of the "
                         "partition, or no partition): it has no parent step; start the per-entry state there")
    if not isinstance(s, int) or isinstance(s, bool) or not 0 <= s <= t:
        raise PlateError(f"storch.ancestor_index: plate {plate!r} of the value is at step {t}; step must be a step "
                         f"0..{t}, got {s!r}")
    raw = raw_of(x)
    index = p.lineage.index(s, t) if s < t else None
    if index is None:  # the entries stayed in place
        index, index_plates = torch.arange(p.size, device=raw.device), (p,)
    else:
        index_plates = (p,) + p.lineage.index_plates_of(s, t)
    target = plates + tuple(q for q in index_plates if q not in plates)  # x's layout, then any plate x lacks
    shape = tuple(q.size for q in target)
    # _wrap, not the public constructor: an index is no black-box value (which the constructor refuses on a
    # pathwise node's plate); its plates match its dims by construction
    return PlateTensor._wrap(align(index, index_plates, target).expand(shape).clone(), target)


def plates_of(x: Any) -> tuple[Plate, ...]:
    """The plates of ``x`` (empty for anything that is not a PlateTensor)."""
    return x._plates if type(x) is PlateTensor else ()


def raw_of(x: Any) -> Any:
    """The raw tensor of a PlateTensor; ``x`` itself otherwise."""
    return x._raw if type(x) is PlateTensor else x


def later_step(a: tuple[Plate, ...], b: tuple[Plate, ...]) -> Optional[tuple[Plate, ...]]:
    """``a`` and ``b`` as one tuple when they differ only in the steps of partition plates whose
    entries stayed in place between those steps (no parent indices: nothing to re-index, the raw
    tensors line up as they are), with the later step of each; ``None`` otherwise.

    The hot case of a sequence: a tensor of step t-1 meets one of step t. Anything else (other
    plates, another order, parent indices, sizes that differ) is left to :func:`union_plates` and
    :func:`align`, which re-index or raise.
    """
    if len(a) != len(b):
        return None
    a_later = b_later = False
    for i, p in enumerate(a):
        q = b[i]
        if p is q or p == q:
            continue
        lin = p.lineage
        if (p.step == q.step or lin is None or lin is not q.lineage or p.name != q.name or p.size != q.size
                or p.independent != q.independent):
            return None
        if p.step < q.step:
            b_later = True
            if lin.parents and lin.index(p.step, q.step) is not None:
                return None
        else:
            a_later = True
            if lin.parents and lin.index(q.step, p.step) is not None:
                return None
    if not a_later:
        return b
    if not b_later:
        return a
    return tuple(p if p.step >= q.step else q for p, q in zip(a, b))


def write_plates(x: tuple[Plate, ...], plates: tuple[Plate, ...], func: Any = None) -> Optional[tuple[Plate, ...]]:
    """The plates an in-place write into a tensor with plates ``x`` aligns its index and value to,
    where the write's operands have plates ``plates`` (their union with ``x``); ``None`` where the
    write adds plates that ``x`` lacks (the caller's refusal).

    A tensor made at step t-1 of a partition and written at step t with step t's values (a table
    ``counts[s, a] += 1`` in an episode): where the partition's entries stay in place between the two
    steps (entry i of step t continues entry i of step t-1: sampling with replacement) the raw
    tensors line up as they are, so the write is exact per entry; ``x`` keeps its plate objects (an
    in-place write cannot change them: later reads align them as before) and the operands align to
    the later step's (``later_step``). Where the estimator re-indexes the entries between the steps
    (beams, ``unordered_set``) entry i of step t is not entry i of step t-1: refused, with how to
    bring the tensor to the current step first. ``func``: the in-place function, named in that message.
    """
    if plates is x or plates == x:
        return x
    later = later_step(x, plates)
    if later is not None:
        return later
    if len(plates) == len(x) and all(p.name == q.name for p, q in zip(x, plates)):
        moved = [(p, q) for p, q in zip(x, plates) if p.step < q.step and p.lineage is not None]
        if moved:
            p, q = moved[0]
            what = "written in place" + ("" if func is None else f" by {getattr(func, '__name__', func)}")
            raise PlateError(
                f"the tensor {what} belongs to step {p.step} of partition {p.name!r}, and the value or index "
                f"to step {q.step}; the estimator re-indexes the partition's entries between those steps (it "
                f"selects which prefixes survive: beams, unordered_set), so entry i of step {q.step} is not "
                f"entry i of step {p.step} and an in-place write cannot reach the right entries. Bring the "
                f"tensor to step {q.step} first, out of place (re-indexed by the parents), at each step "
                "before writing into it: e.g. `tab = tab + 0 * a[..., None, None]` with `a` the step's "
                "sample (then `tab[s, a] += 1`), or rebuild it out of place at each step "
                "(`tab = torch.where(mask, value, tab)`)")
    return None


_UNIONS: dict = {}


def union_plates(groups: Sequence[tuple[Plate, ...]]) -> tuple[Plate, ...]:
    """Union of plate tuples: the longest first, then others' missing plates in order."""
    if len(groups) == 2:
        # two operands (x * y of a sample and a data point): cached per pair of plate tuples, as
        # alignment plans are (_plan); a pair that raises is not cached and raises again
        a, b = groups
        if a is b:
            return a
        key = (a, b)
        out = _UNIONS.get(key)
        if out is None:
            out = _union(groups)
            _remember(_UNIONS, key, out)
        return out
    return _union(groups)


def _union(groups: Sequence[tuple[Plate, ...]]) -> tuple[Plate, ...]:
    best = max(groups, key=len)
    if all(g is best or not g or g == best for g in groups):  # an empty group adds nothing
        return best
    if len(groups) == 2:
        same = later_step(groups[0], groups[1])
        if same is not None:
            return same
    out = list(best)
    seen = {p.name: p for p in best}
    for g in groups:
        for p in g:
            q = seen.get(p.name)
            if q is None:
                seen[p.name] = p
                out.append(p)
            elif q != p:
                if q.lineage is not None and q.lineage is p.lineage and q.step != p.step:
                    if p.step > q.step:  # the later step of a partition wins; align re-indexes
                        out[out.index(q)] = seen[p.name] = p
                    continue
                raise PlateError(_mixed_message(q, p))
    if len(out) > MAX_DIMS:
        raise PlateError(too_many_dims_message(len(out)))
    entries = 1
    for p in out:
        if not p.independent:
            entries *= p.size
    if entries > MAX_COMBINED_ENTRIES:  # (a new union only: the pairs are cached, so not on the common path)
        raise PlateError(too_many_combinations_message(out, entries))
    return tuple(out)


MAX_DIMS = 64  # torch's limit on the number of dims of a tensor
# Independent nodes joined in one value hold every combination of their samples: 30 gates of 2 samples each,
# summed into one cost, asked for 4 GiB per element and the process ran out of memory without a storch
# message (found by a tester). Beyond this many sample-plate entries per data point (the chain limit,
# storch.estimators.checks.MAX_SAMPLE_ENTRIES) a value is refused before torch allocates it.
MAX_COMBINED_ENTRIES = 2 ** 24


# ... and a value computed on a chain's plates holds its per-sample size for each of those entries: a world model
# with one 'go' estimator per step (a plate of 3 entries each) under a GRU was killed by the OS at about step 13
# (918 MB for one gru_cell output, on a 23 GiB machine) while its samples, a few values each, stayed below the chain
# limits of storch.estimators.checks; such a chain holds ~20-22 tensors of its latest state's size (the earlier
# steps' and autograd's: 1.8 GB of RSS at a 80 MB state, H=64, 16 data points). A value of sample plates spread
# over another sample plate (where the next tensor of the chain is computed: align) is refused, before torch
# allocates it, past a bound on its bytes that scales with the memory of the device it is on: that memory / 32
# (CHAIN_TENSOR_FRACTION), so that ~22 such tensors (a chain's peak) stay under ~70% of it, with room for the model,
# the data and the rest of the process; the 918 MB state is refused on a 23 GiB machine (bound ~790 MB, where the
# step before it, 306 MB, runs), and an 80 GB GPU admits 2.5 GB (a two-level VAE's 64-channel 28x28 feature map
# spread over the second level's 8 x 8 samples at batch 64: ~820 MB). CUDA: the device's total_memory; CPU: the
# physical memory, or the container's cgroup memory limit where one is set and lower (a container capped at 8 GB on
# a 256 GB host was killed by the OS before a bound from 256 GB fired); where neither can be read, or on another
# device, the fixed DEFAULT_CHAIN_TENSOR_BYTES. A single node, or a data value spread over samples, is never checked.
#
# MAX_CHAIN_TENSOR_BYTES, when set to an int, overrides the computed bound on every device (raise it where the
# chain is meant to be that large and fits, lower it to fail earlier), as storch.estimators.checks.MAX_DRAW_ENTRIES
# is set: ``storch.plates.tensor.MAX_CHAIN_TENSOR_BYTES = 2 ** 31``; None (the default) uses the device's bound.
MAX_CHAIN_TENSOR_BYTES: Optional[int] = None
DEFAULT_CHAIN_TENSOR_BYTES = 2 ** 28
CHAIN_TENSOR_FRACTION = 32
_DEVICE_CHAIN_BOUNDS: dict = {}  # (device type, index) -> (bytes, where from): each device's memory read once


# the process's memory limit: cgroup v2's file ("max": none), else cgroup v1's (no limit reads as ~2^63)
CGROUP_V2_MEMORY_MAX = "/sys/fs/cgroup/memory.max"
CGROUP_V1_MEMORY_LIMIT = "/sys/fs/cgroup/memory/memory.limit_in_bytes"
_NO_CGROUP_LIMIT = 2 ** 60  # at or above: no limit (v1 writes 2^63 - page size; no machine has an EiB)


def _read_limit(path: str) -> Optional[str]:
    """The text of a cgroup limit file, or None where it cannot be read (no such file: no cgroup of that version)."""
    try:
        with open(path) as f:
            return f.read().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _cgroup_memory_limit() -> Optional[int]:
    """The memory limit of the process's cgroup in bytes, or None where none is set or it cannot be read: cgroup
    v2's ``memory.max`` where that file is there (``max``: no limit), else cgroup v1's ``memory.limit_in_bytes``. A
    container's limit is far below the host's physical memory, which is what ``os.sysconf`` reads in it."""
    text = _read_limit(CGROUP_V2_MEMORY_MAX)
    if text is None:
        text = _read_limit(CGROUP_V1_MEMORY_LIMIT)
    try:
        limit = int(text) if text is not None else None
    except ValueError:  # "max" (v2: no limit), or a file storch does not understand: no limit
        return None
    return limit if limit is not None and 0 < limit < _NO_CGROUP_LIMIT else None


def _device_memory(device: torch.device) -> Optional[tuple[int, str]]:
    """The memory ``device`` may use in bytes and what it is (``"memory"``, ``"cgroup limit"``), or None where storch
    cannot read it (a device other than CUDA and CPU, or a platform without ``os.sysconf`` and no cgroup limit). On
    CPU the lower of the physical memory and the process's cgroup limit: in a container, the memory it may use."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory), "memory"
    if device.type == "cpu":
        try:
            total: Optional[int] = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (AttributeError, ValueError, OSError):  # no sysconf (Windows) or no such name
            total = None
        total = total if total is not None and total > 0 else None
        limit = _cgroup_memory_limit()
        if limit is not None and (total is None or limit < total):
            return limit, "cgroup limit"
        return (total, "memory") if total is not None else None
    return None


def chain_tensor_bound(device: torch.device) -> int:
    """The bytes one tensor of a chain may hold on ``device``: ``MAX_CHAIN_TENSOR_BYTES`` where the user set it,
    else the device's memory / ``CHAIN_TENSOR_FRACTION`` (read once per device: align only asks for a value already
    known to be a chain's, from the cached plan), else ``DEFAULT_CHAIN_TENSOR_BYTES``."""
    if MAX_CHAIN_TENSOR_BYTES is not None:
        return MAX_CHAIN_TENSOR_BYTES
    return _device_chain_bound(device)[0]


def _device_chain_bound(device: torch.device) -> tuple[int, str]:
    """``device``'s bound and where it comes from (for the message): cached, else read."""
    known = _DEVICE_CHAIN_BOUNDS.get((device.type, device.index))
    return known if known is not None else _read_chain_bound(device)


def _read_chain_bound(device: torch.device) -> tuple[int, str]:
    """``device``'s bound and where it comes from (for the message), read and cached: once per device."""
    memory = _device_memory(device)
    if memory is None:
        known = (DEFAULT_CHAIN_TENSOR_BYTES, "a fixed bound: storch cannot read this device's memory")
    else:
        total, what = memory
        known = (total // CHAIN_TENSOR_FRACTION, f"1/{CHAIN_TENSOR_FRACTION} of its "
                 + (f"cgroup limit of {_in_bytes(total)}" if what == "cgroup limit" else _in_bytes(total)))
    _DEVICE_CHAIN_BOUNDS[(device.type, device.index)] = known
    return known


def _in_bytes(n: int) -> str:
    """``n`` bytes for a message: in the largest of KiB, MiB, GiB that keeps it at 1 or more."""
    unit = next((u for u in (3, 2, 1) if n >= 2 ** (10 * u)), 0)
    return f"{n / 2 ** (10 * unit):.{1 if unit else 0}f} {('B', 'KiB', 'MiB', 'GiB')[unit]}"


def chain_tensor_message(plates: Sequence[Plate], target: Sequence[Plate], inserts: Sequence[int], entries: int,
                         per: int, raw: torch.Tensor, bound: int) -> str:
    """The error for a value on sample ``plates`` spread over the sample plates ``target[i]`` (``i`` in
    ``inserts``) into a tensor of ``entries`` x ``per`` elements of ``raw``'s dtype, past ``bound`` bytes
    (``chain_tensor_bound`` of ``raw``'s device)."""
    sampled = [p for p in target if not p.independent and p.size > 1]
    shown = ", ".join(f"{p.name}={p.size}" for p in sampled[:8]) + (
        f", ... ({len(sampled)} sample plates)" if len(sampled) > 8 else "")
    new = ", ".join(f"{target[i].name}={target[i].size}" for i in inserts if not target[i].independent)
    data = [f"{p.name}={p.size}" for p in target if p.independent and p.size > 1]
    shown += f"; data plates {', '.join(data)}" if data else ""
    size = entries * per * raw.element_size()
    if MAX_CHAIN_TENSOR_BYTES is not None:
        source = "set by storch.plates.tensor.MAX_CHAIN_TENSOR_BYTES"
    else:
        source = _device_chain_bound(raw.device)[1]
    return (f"this operation would spread a value of {per} elements per sample, which varies over the samples of "
            f"{len([p for p in plates if not p.independent and p.size > 1])} earlier node(s), over the samples of "
            f"plates {new}: the tensor computed would hold {entries} entries (sample plates {shown}) x {per} "
            f"elements ({_in_bytes(size)} of {raw.dtype}), above storch's limit of "
            f"{_in_bytes(bound)} for one tensor of a chain on {raw.device} ({source}; its earlier steps and "
            "autograd hold many such tensors: the process would run out of memory). Each node's samples are drawn "
            "for every sample of the nodes before it, so the entries multiply along a chain. For a sequence of stochastic steps "
            "(an episode, a recurrent state), create ONE estimator outside the loop and call it at every step, with "
            "an estimator that supports partitions (storch.estimators.catalog.partition_estimators(d) lists those "
            "that accept the distribution d): its calls make one plate (docs/partitions.md). Otherwise give each "
            "node one sample (n_samples=1; an estimator whose plate holds more than its samples, such as 'go' or "
            "'spsa', multiplies even then: use 'score' or 'reparameterization' for some nodes), use fewer chained "
            "steps, or a smaller per-sample value or batch. Where the chain is meant to be this large and fits in "
            "memory, set storch.plates.tensor.MAX_CHAIN_TENSOR_BYTES to a larger number of bytes (None: the device's "
            "bound)")


def too_many_combinations_message(plates: Sequence[Plate], entries: int) -> str:
    """The error for a value whose sample plates would hold more than ``MAX_COMBINED_ENTRIES`` combinations."""
    sampled = [f"{p.name}={p.size}" for p in plates if not p.independent]
    shown = ", ".join(sampled[:8]) + (f", ... ({len(sampled)} sample plates)" if len(sampled) > 8 else "")
    return (f"this operation would combine the samples of plates {shown}: {entries} combinations per data point "
            f"(above storch's limit of {MAX_COMBINED_ENTRIES}; the tensor would not fit in memory). Independent "
            "nodes joined in one value hold every combination of their samples. Draw them as one node (one "
            "distribution with a batch dim, e.g. Bernoulli(logits=theta) for all the gates), or call one estimator "
            "for each of them in turn (a partition: docs/partitions.md), or use fewer samples per node (n_samples=1 "
            "for nodes that need no baseline), or add a cost per node instead of one cost of all of them")


def inplace_write_message(func: str, plates: Sequence[Plate], self: Any, shared: str) -> str:
    """The error for an in-place ``func`` that would write values varying over ``plates`` into ``self``, which
    does not vary over all of them (``shared`` says how it does vary). Into a plain tensor, the advice is for
    state kept across steps too (a module buffer, a running statistic: reduce over the plates first; assigned
    out of place it would become a plate tensor of this step's graph, refused in the next step)."""
    head = f"in-place {func} would write values that vary over plates {_names(plates)} into "
    method = func.rsplit(".", 1)[-1]
    # name the out-of-place method (x.index_add_ -> x = x.index_add(...): the usual combine into a zeros buffer);
    # copy_ and fill_ have none (no Tensor.copy / Tensor.fill): the value broadcast to x's shape is their result
    if method in ("copy_", "fill_"):
        out_of_place = f"x = torch.zeros_like(x) + v instead of x.{method}(v)"
    elif method.endswith("_") and not method.startswith("__") and callable(getattr(torch.Tensor, method[:-1], None)):
        out_of_place = f"x = x.{method[:-1]}(...) instead of x.{method}(...), as x = x + v instead of x += v"
    else:
        out_of_place = "x = x + v instead of x += v"
    if isinstance(self, PlateTensor):
        return head + f"{shared}; use the out-of-place version (e.g. {out_of_place})"
    return head + (
        "a plain tensor (no plates), which holds one value for all the samples. For state kept across steps (a "
        "module buffer, a running statistic such as a VQ-VAE's EMA codebook counts), reduce over the plates "
        "first: `counts.mul_(0.9).add_(0.1 * storch.estimate(z))`, where storch.estimate(z) is the estimate of "
        "E[z] of shape z.shape, weighted by each sample plate's estimator as storch.cost_estimates weighs a cost "
        "(`z.tensor.mean(0)` is right only for estimators with uniform weights; for unordered_set, expect, "
        "sum_and_sample and score(baseline='greedy') it is silently wrong). Assigning out of place "
        "(`m.counts = 0.9 * m.counts + 0.1 * z`) would make the buffer a plate tensor of this step's graph, "
        "which the next step refuses. For a value used in this step only, use the out-of-place version "
        f"({out_of_place})")


def too_many_dims_message(n: int) -> str:
    """The error for a tensor that would need ``n`` > 64 dims (plates and per-sample dims)."""
    return (
        f"this needs a tensor with {n} dims, but torch supports at most {MAX_DIMS}: every stochastic "
        "node adds a plate dim. For a sequence of stochastic steps (an episode, a decoder loop) create "
        "ONE estimator outside the loop and call it at every step: its calls make one partition with "
        "one plate (docs/partitions.md), so a 1000-step episode needs one dim, not 1000"
    )


def unpickled_message(what: str, name: str) -> str:
    """The refusal of a plate tensor whose plate ``name`` was unpickled (:attr:`Lineage.unpickled`), ``what`` being
    the tensor's role (``"the distribution passed to estimator 'z'"``)."""
    return (
        f"{what} has plate {name!r} from another process or an unpickled copy: this plate tensor was made in "
        "another process or unpickled (a DataLoader worker's collate_fn or a Dataset's __getitem__ calling "
        "storch.denote_independent with num_workers > 0, torch.load or pickle.loads of plate tensors). Plate "
        "tensors belong to one step of one process: return plain tensors from the loader (or save "
        "`x.tensor`, the raw values) and call storch.denote_independent in the step, on the batch the loader "
        "returned")


# How a value crosses steps (docs/reliability.md, "Stale tensors"): the end of every refusal of a tensor of an ended graph
CARRY_ACROSS_STEPS = (
    ". To carry a value into a later step (a logged sample, a running statistic, the next step's input), keep a "
    "plain tensor, taken before its step ends: storch.estimate(t) (its estimate of E[t]) or t.tensor.detach() "
    "(the samples, plate dims first)")


def _mixed_message(q: Plate, p: Plate) -> str:
    for r in (q, p):
        if r.lineage is not None and r.lineage.unpickled:
            return unpickled_message("a tensor", r.name)
    closed = None
    if q.size != p.size:
        what = f"appears with sizes {q.size} and {p.size}"
    elif q.lineage is not p.lineage:
        what = "comes from two different graphs (or from before a reset)"
        closed = next((r.lineage.closed for r in (q, p) if r.lineage is not None and r.lineage.closed), None)
        if closed is not None:  # (why the older one ended: an evaluation step ended by the next says what to do)
            what += f"; the older graph was {closed}"
    else:
        what = "appears both as a data plate and as a sample plate"
    return (
        f"plate {p.name!r} {what}: tensors from different graphs (or an old graph) were mixed. "
        "Compute every tensor of a step inside that step's graph; storch.backward() and "
        "storch.reset() end a graph, after which its plate tensors cannot be used"
        + (CARRY_ACROSS_STEPS if closed is not None else "")
    )


_PLANS: dict = {}


def _plan(plates: tuple[Plate, ...], target: tuple[Plate, ...]):
    """(permutation or None, positions of size-1 dims to insert), cached per pair of plate tuples."""
    key = (plates, target)
    plan = _PLANS.get(key)
    if plan is None:
        n = len(plates)
        pos = {p.name: i for i, p in enumerate(plates)}
        order = [pos[p.name] for p in target if p.name in pos]
        if len(order) != n:
            missing = set(_names(plates)) - set(_names(target))
            raise PlateError(f"plates {sorted(missing)} are not among {_names(target)}")
        inserts = tuple([i for i, p in enumerate(target) if p.name not in pos])  # (a list: no generator step per plate)
        # plates of a partition at an earlier step than the target's: re-indexed by the parents
        steps = tuple([(i, plates[pos[p.name]].step, p) for i, p in enumerate(target)
                       if p.name in pos and plates[pos[p.name]].step != p.step])
        # a value that varies over sample plates spread over another sample plate (the next node of a chain, or
        # an independent node joined to it): the entries of the target, which the tensor computed from it holds
        # per element of one sample (0: not such a value, never checked)
        chain = 0
        if any(not p.independent and p.size > 1 for p in plates) and any(
                not target[i].independent and target[i].size > 1 for i in inserts):
            chain = math.prod(p.size for p in target)
        plan = (None if order == list(range(n)) else tuple(order), inserts, steps, chain)
        _remember(_PLANS, key, plan)
    return plan


# The cache keys of _PLANS and _UNIONS (pairs of plate tuples) by the lineages their plates carry: when
# a graph ends, _release() drops its keys, so the caches keep no finished graph alive (a key holds its
# plates' lineages, a partition's lineage its parent index tensors: 2 lineages and ~28 tensors per
# training step were kept until 4096 keys had piled up). Entries of plates built by hand (no lineage) stay.
_KEYS_OF: dict = {}
_LINEAGE = operator.attrgetter("lineage")


def _remember(cache: dict, key: tuple, value) -> None:
    """``cache[key] = value``, the key filed under its lineages; a key with a plate of a finished graph
    is not cached (computed again where used: such tensors are only read after their step)."""
    # (hashed by identity; a set, not a list: a key of a chain of M nodes holds M lineages; gathered without a
    # Python step per plate: a chain's cost at step k has k plates)
    lineages: set = set()
    for plates in key:
        lineages.update(map(_LINEAGE, plates))
    lineages.discard(None)
    for lin in lineages:
        if lin.closed is not None:
            return
    if len(cache) >= 4096:
        # a graph's keys are hit within its step only: start over rather than stop caching (a
        # 1000-step partition makes 1000s of keys); both caches and the filing at once, so that a
        # graph never ended (dropped without a `with` block's end or a reset) is held only until then
        _PLANS.clear()
        _UNIONS.clear()
        _KEYS_OF.clear()
    cache[key] = value
    for lin in lineages:
        _KEYS_OF.setdefault(lin, []).append(key)


def _release(lineage: Lineage) -> None:
    """Drop what the module's caches hold for ``lineage`` (its graph ended), and its own composed
    re-indexings (made again from its parents if its tensors are still combined)."""
    for key in _KEYS_OF.pop(lineage, ()):
        _PLANS.pop(key, None)
        _UNIONS.pop(key, None)
    lineage._cache.clear()
    lineage.watch = None  # (it refers to the node: nothing of the step is held after it)


def align(raw: torch.Tensor, plates: tuple[Plate, ...], target: tuple[Plate, ...], pad_to: int = -1) -> torch.Tensor:
    """View ``raw`` (leading dims ``plates``) with leading dims ``target`` (size 1 where missing).

    ``plates`` must be a subset of ``target``. With ``pad_to`` >= 0 the per-sample part is
    left-padded with size-1 dims to that many dims (for broadcasting against other operands).
    Only views are taken: no copies.
    """
    if plates is not target and plates != target and later_step(plates, target) is not target:
        order, inserts, steps, chain = _plan(plates, target)
        if chain:  # (a chain's plates only: a sample of earlier nodes spread over another node's samples)
            per = raw.shape[len(plates):].numel()
            bound = chain_tensor_bound(raw.device)
            if chain * per * raw.element_size() > bound:
                raise PlateError(chain_tensor_message(plates, target, inserts, chain, per, raw, bound))
        if order is not None:
            raw = raw.permute(*order, *range(len(plates), raw.dim()))
        if len(inserts) == 1 or (inserts and not raw.is_contiguous()):
            # (unsqueeze's strides for a non-contiguous raw: view gives its size-1 dims other strides, and a later
            # op's output another memory layout, so its sums another order of addition; review r-fourteen)
            for i in inserts:
                raw = raw.unsqueeze(i)
        elif inserts:  # one view, not one unsqueeze per missing plate (the sum of a chain of M nodes: M²/2 of them)
            shape = list(raw.shape)
            for i in inserts:
                shape.insert(i, 1)
            raw = raw.view(shape)
        for i, step, p in steps:
            raw = _to_step(raw, i, step, p, target)
    if pad_to >= 0:
        m = len(target)
        k = raw.dim() - m
        if k < pad_to:
            raw = _unsqueeze_n(raw, m, pad_to - k)
    return raw


def _to_step(raw: torch.Tensor, dim: int, step: int, target: Plate, plates: tuple[Plate, ...]) -> torch.Tensor:
    """Re-index dim ``dim`` (a partition plate at ``step``) to ``target.step`` by the parents.

    ``raw``'s leading dims are ``plates`` (which holds ``target`` at ``dim``). A parent index that
    differs per entry of other plates (one beam per data point) expands ``raw`` along them.
    """
    if step > target.step:
        raise PlateError(
            f"a tensor from step {step} of partition {target.name!r} cannot be used at the earlier "
            f"step {target.step}"
        )
    if target.lineage is None:
        raise PlateError(f"plate {target.name!r} has steps but no lineage; it was not made by a graph")
    if raw.shape[dim] == 1:
        # a broadcast dim (the same value for every entry, e.g. a gradient function that is 0):
        # every parent reads that one value, whichever parents each data point chose, so it stays
        # broadcast; gathering it by parent indices up to k - 1 would be out of bounds
        return raw
    idx = target.lineage.index(step, target.step)
    if idx is None:
        return raw
    iplates = target.lineage.index_plates_of(step, target.step)
    idx = idx.to(raw.device)
    if not iplates:
        return raw.index_select(dim, idx)
    names = {p.name: p for p in iplates}
    missing = [n for n in names if n not in {p.name for p in plates}]
    if missing:
        raise PlateError(
            f"partition {target.name!r} chose its parents per entry of plates {missing}, which the "
            f"tensor's plates {_names(plates)} do not have"
        )
    # the index in raw's layout: entries at `dim`, the index plates at their positions, 1 elsewhere
    entry = Plate("(entries)", idx.shape[0])
    layout = tuple(entry if i == dim else (p if p.name in names else None) for i, p in enumerate(plates))
    idx = align(idx, (entry,) + tuple(iplates), tuple(p for p in layout if p is not None))
    shape = [1] * raw.dim()
    j = 0
    for i, p in enumerate(layout):
        if p is not None:
            shape[i] = idx.shape[j]
            j += 1
    idx = idx.reshape(shape)
    shape[dim] = 1
    full = list(_broadcast_shapes(raw.shape, shape))
    full[dim] = raw.shape[dim]
    raw = raw.expand(full)
    full[dim] = idx.shape[dim]
    return raw.gather(dim, idx.expand(full))


def map_tensors(out, fn):
    """Apply ``fn`` to every tensor in a torch result: a tensor, or (nested) tuples and lists of
    them, ``torch.return_types`` structseqs included; anything else is returned as it is."""
    if isinstance(out, torch.Tensor):
        return fn(out)
    if isinstance(out, (tuple, list)):
        items = [map_tensors(o, fn) for o in out]
        if type(out) in (tuple, list):
            return type(out)(items)
        try:  # torch.return_types.* structseqs
            return type(out)(items)
        except TypeError:
            return tuple(items)
    return out


def _unsqueeze_n(raw: torch.Tensor, at: int, n: int) -> torch.Tensor:
    for _ in range(n):
        raw = raw.unsqueeze(at)
    return raw
