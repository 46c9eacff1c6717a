"""Checks of one training step shared by the test folders (``tests/conftest.py`` puts this folder on ``sys.path``):
what the garbage collector frees after a step (storch promises none: a step's tensors are freed by reference
counting), the pickle round trips of a pathwise node's plate tensors, and the logits of a low-precision model."""

from __future__ import annotations

import copy
import gc
import io
import pickle
import types
from typing import Callable

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
    failure message): ``(number of storch's objects gc.collect() frees after the step, {type name: count})``."""
    for _ in range(warmups):
        step()
    gc.collect()
    gc.disable()
    try:
        step()
        return storch_unreachable()
    finally:
        gc.enable()


def storch_unreachable() -> tuple[int, dict]:
    """Collect (the collector switched off since before the step) and count the unreachable objects that are
    storch's (:func:`storch_object`): ``(number, {type name: count})``. Not every unreachable object: a step can run
    after a test that compiled in the same process, and torch.compile's own objects (dynamo's fake tensors, FX nodes,
    frame summaries: 1941 of them after tests/models/test_compile.py) become garbage whenever their caches let go,
    during the step too; a cycle of storch's holds a node, a plate tensor, a tensor or one of storch's frames."""
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        gc.collect()
        kinds: dict = {}
        for o in gc.garbage:
            if storch_object(o):
                kinds[type(o).__qualname__] = kinds.get(type(o).__qualname__, 0) + 1
    finally:
        gc.garbage.clear()
        gc.set_debug(0)
    return sum(kinds.values()), kinds


def storch_object(o) -> bool:
    """Whether garbage ``o`` is storch's: an object of a storch class (storch and its families), a tensor that is not
    torch.compile's fake or functional one, an autograd graph node (a grad_fn, a custom Function's context: a cycle
    through one holds its saved tensors, which live in C++ and are never Python garbage), or a frame or function of
    storch's code."""
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
    return "storch" in code.co_filename.replace("\\", "/").split("/site-packages/")[-1]


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
