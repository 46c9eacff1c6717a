"""Checks of one training step shared by the test folders (``tests/conftest.py`` puts this folder on ``sys.path``):
what the garbage collector frees after a step (storch promises none: a step's tensors are freed by reference
counting), the pickle round trips of a pathwise node's plate tensors, and the logits of a low-precision model."""

from __future__ import annotations

import contextlib
import copy
import gc
import io
import os
import pickle
import sys
import sysconfig
import tracemalloc
import types
from typing import Callable, Optional

import pytest
import torch

import storch


def garbage_after(step: Callable[[], object], warmups: int = 1) -> int:
    """Run ``step`` ``warmups`` times (first-call caches: lazy imports, decompositions), then once with the
    collector off: the number of storch's objects ``gc.collect()`` frees after it (0: no reference cycles of
    storch's; see :func:`storch_unreachable`)."""
    return unreachable_after(step, warmups)[0]


def unreachable_after(step: Callable[[], object], warmups: int = 2) -> tuple[int, dict]:
    """As :func:`garbage_after` (default: two warm-ups), with the unreachable objects' types counted (for a
    failure message): ``(number of storch's objects gc.collect() frees after the step, {type name: count})``.
    The step's allocations are traced (:func:`allocations_traced`; not the warm-ups', which may compile: tracing
    slows torch.compile's tracing several times), so a cycle of containers that storch's code allocated in the step
    is counted though it holds no tensor."""
    for _ in range(warmups):
        step()
    gc.collect()
    gc.disable()
    try:
        with allocations_traced():
            step()
            return storch_unreachable()
    finally:
        gc.enable()


# frames kept per traced allocation: enough to pass the standard library's frames (dataclasses' generated __init__,
# functools, contextlib, copy) between the allocation and the code that asked for it
_TRACED_FRAMES = 12


@contextlib.contextmanager
def allocations_traced():
    """Trace allocations (``tracemalloc``) in the block, for :func:`storch_unreachable` to tell a cycle that storch's
    code allocated (a dict or a list that holds no tensor, f-silent17) from other garbage; where tracing is on already
    (``python -X tracemalloc``), it is left as it is.

    Not caught (r-56): a dict, list or tuple that CPython makes from its free list out of a block allocated before
    tracing started has no traceback (tracemalloc re-attributes a reused block to its new maker only where the block
    is traced). Such blocks come from objects that lived since before the traced block and are freed in it (a dict
    kept from the previous step and replaced in this one), and they pass on through the free list from object to
    object, so tracing a warm-up too does not help: a cycle that storch's code makes of such containers is missed
    (a dict made in storch/registry.py after 4 dicts of the previous step were freed: counted 0). Only tracing from
    the start of the process (``python -X tracemalloc``) counts every one."""
    if tracemalloc.is_tracing():
        yield
        return
    tracemalloc.start(_TRACED_FRAMES)
    try:
        yield
    finally:
        tracemalloc.stop()


def storch_unreachable() -> tuple[int, dict]:
    """Collect (the collector switched off since before the step) and count the unreachable objects that are
    storch's (:func:`storch_garbage`): ``(number, {kind: count})``. Not every unreachable object: a step can run
    after a test that compiled in the same process, and torch.compile's own objects (dynamo's fake tensors, FX nodes,
    frame summaries: 1941 of them after tests/models/test_compile.py) become garbage whenever their caches let go,
    during the step too."""
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        gc.collect()
        return storch_garbage(gc.garbage)
    finally:
        gc.garbage.clear()
        gc.set_debug(0)


def storch_garbage(objects) -> tuple[int, dict]:
    """How many of ``objects`` (unreachable ones) are storch's, by kind: ``(number, {kind: count})``. An object is
    storch's if it is one by type (:func:`storch_object`: a node, a plate tensor, a tensor, an autograd node, a frame
    or function of storch's code; kind: the type's name), or if storch's code allocated it (a dict, a list, any
    object: the nearest frame of its allocation outside the standard library is in one of storch's packages, while
    :func:`allocations_traced` traces; kind: ``"dict from storch/graph/node.py:120"``). A cycle of containers made by
    storch holds no tensor, and torch.compile's garbage is allocated by torch's code, not storch's."""
    roots = _storch_roots()
    kinds: dict = {}
    for o in objects:
        if storch_object(o, roots):
            kind = type(o).__qualname__
        else:
            where = _allocated_by_storch(o, roots)
            if where is None:
                continue
            kind = f"{type(o).__qualname__} from {where}"
        kinds[kind] = kinds.get(kind, 0) + 1
    return sum(kinds.values()), kinds


def _storch_roots() -> tuple:
    """The folders of storch's imported packages (storch, storch_score, ..., each with a trailing separator)."""
    roots = []
    for name, module in list(sys.modules.items()):
        if "." in name or not (name == "storch" or name.startswith("storch_")):
            continue
        path = getattr(module, "__file__", None)
        if path:
            roots.append(os.path.join(os.path.dirname(os.path.abspath(path)), ""))
    return tuple(roots)


_STDLIB = os.path.join(os.path.abspath(sysconfig.get_paths()["stdlib"]), "")
_SITE = tuple(os.path.join(os.path.abspath(sysconfig.get_paths()[k]), "") for k in ("purelib", "platlib"))


def _passing(filename: str) -> bool:
    """A frame that does not decide whose an allocation is: the standard library's, or code without a file (a
    dataclass's generated __init__, ``<frozen importlib._bootstrap>``)."""
    return filename.startswith("<") or (filename.startswith(_STDLIB) and not filename.startswith(_SITE))


def _allocated_by_storch(o, roots: tuple):
    """``"path:line"`` (from storch's package folder on) where storch's code allocated ``o``, or None (allocated by
    other code, before tracing, or not traced)."""
    trace = tracemalloc.get_object_traceback(o)
    for frame in reversed(trace or ()):  # the allocation first
        if _passing(frame.filename):
            continue
        root = next((r for r in roots if frame.filename.startswith(r)), None)
        if root is None:
            return None
        return f"{frame.filename[len(os.path.dirname(root[:-1])) + 1:]}:{frame.lineno}"
    return None


def storch_object(o, roots: Optional[tuple] = None) -> bool:
    """Whether garbage ``o`` is storch's by type: an object of a storch class (storch and its families), a tensor that
    is not torch.compile's fake or functional one, an autograd graph node (a grad_fn, a custom Function's context: a
    cycle through one holds its saved tensors, which live in C++ and are never Python garbage), or a frame or function
    of storch's code (in one of ``roots``, storch's package folders: :func:`_storch_roots` by default)."""
    # by type, never by the object's attributes: a dead weakref.proxy among the garbage raises on any access
    module = type(o).__module__ or ""
    if module.startswith("storch"):
        return True
    if issubclass(type(o), torch.Tensor):
        return not module.startswith("torch._subclasses")
    if issubclass(type(o), torch.autograd.graph.Node):
        return True
    if type(o) is types.FrameType:
        code = o.f_code
    elif type(o) is types.FunctionType:
        code = o.__code__
    else:
        return False
    return code.co_filename.startswith(_storch_roots() if roots is None else roots)


def pickle_round_trips(est, dist_of) -> None:
    """Pickle and torch.save round trips of a pathwise node's plate tensors (z, z.detach(), a cost of z), as a
    score node's pickle; an unpickled one mixed into a new step is refused as unpickled; deepcopy keeps the node's watch."""
    x = torch.randn(5, 3)
    lin = torch.nn.Linear(3, 2)
    with storch.Graph():
        xs = storch.denote_independent(x, 0, "data")
        z = est(dist_of(lin(xs)))
        cost = ((z - 0.3) ** 2).sum()
        assert z.plates[0].lineage.watch is not None  # the closure that did not pickle
        saved = []
        for obj in (z, z.detach(), cost):
            back = pickle.loads(pickle.dumps(obj))
            buffer = io.BytesIO()
            torch.save(obj, buffer)
            buffer.seek(0)
            loaded = torch.load(buffer, weights_only=False)
            for copy_ in (back, loaded):
                assert isinstance(copy_, storch.PlateTensor)
                assert [p.name for p in copy_.plates] == [p.name for p in obj.plates]
                assert torch.equal(copy_.tensor, obj.tensor.detach())
                assert copy_.plates[0].lineage.watch is None
            saved.append(back)
        kept = copy.deepcopy(z.detach())
        assert kept.plates[0].lineage.watch is z.plates[0].lineage.watch
        storch.add_cost(cost, name="c")
        storch.backward()
    with storch.Graph():
        xs = storch.denote_independent(x, 0, "data")
        z = est(dist_of(lin(xs)))
        with pytest.raises(storch.PlateError, match="made in another process or unpickled"):
            storch.add_cost((z * saved[0]).sum(), name="mixed")


def low_precision_logits(a: torch.Tensor, dtype: torch.dtype, autocast: bool, batch: int) -> torch.Tensor:
    """Logits ``a`` (one row per data point of a data plate of ``batch``) computed by a model in ``dtype``: a
    ``Linear`` under ``torch.autocast("cpu", dtype)``, or a float16 / bfloat16 model (``x.to(dtype) * a``). For the
    low-precision tests (tests/score/test_low_precision_offset.py, tests/relaxed/test_relaxed_low_precision_offset.py);
    call it inside a graph."""
    # float32 inputs whatever torch's default dtype (tests/score's modules set float64, which autocast leaves alone)
    x = storch.denote_independent(torch.ones(batch, 1, dtype=torch.float32), 0, "data")
    if autocast:
        with torch.autocast("cpu", dtype=dtype):
            logits = torch.nn.functional.linear(x, torch.zeros(a.shape[-1], 1, dtype=torch.float32), a.float())
    else:
        logits = x.to(dtype) * a.to(dtype)
    assert logits.dtype is dtype
    return logits


@pytest.fixture(autouse=True)
def distribution_validation_kept():
    """torch.compile's first use (aot_eager) turns torch.distributions' argument validation off for the process
    (torch._dynamo's TorchPatcher.patch); restored after each test, so later tests' checks still run. Autouse in a
    module that imports it (``from step_checks import distribution_validation_kept``)."""
    validate = torch.distributions.Distribution._validate_args
    yield
    torch.distributions.Distribution.set_default_validate_args(validate)
