"""The no-cycles filter of tests/step_checks.py (``unreachable_after``, ``storch_garbage``) with planted cycles.

It counted only storch's objects by type (a node, a plate tensor, a tensor, a frame of storch's code), so a reference
cycle made only of containers that storch's code allocated, holding no tensor, was missed (f-silent17). Allocations
are now traced during the check and classified by the code that made them: such a cycle is counted and named by its
allocation site, while a cycle that the test's own code makes and torch.compile's garbage are still not counted.
"""

from __future__ import annotations

import gc

import pytest
import torch
from torch.distributions import Normal

import storch

from step_checks import (allocations_traced, distribution_validation_kept,  # noqa: F401 (an autouse fixture)
                         storch_garbage, unreachable_after)


def _step(plant=None):
    """A small reparameterised step; ``plant()`` runs inside it."""
    theta = torch.tensor([0.3, -0.2], requires_grad=True)

    def step():
        with storch.Graph():
            z = storch.estimator("reparameterization", plate="z", n_samples=3)(Normal(theta, 1.0))
            storch.add_cost(((z - 0.5) ** 2).sum(), name="c")
            if plant is not None:
                plant()
            storch.backward()
    return step


def _storch_made_cycle():
    """A cycle of a dict that storch's code allocated (``storch.available_estimators()``'s dict comprehension, in
    storch/registry.py) through a list of the test's: no tensor, no storch object in the garbage."""
    d = storch.available_estimators()
    d["cycle"] = [d]


def _test_made_cycle():
    a: dict = {}
    a["b"] = [a]


def test_a_step_alone_leaves_nothing():
    torch.manual_seed(0)
    n, kinds = unreachable_after(_step())
    assert n == 0, kinds


def test_a_tensor_free_cycle_allocated_by_storch_code_is_counted():
    """The dict (storch's allocation) is counted and named by where storch allocated it; the list (the test's) is
    not. The filter before counted 0 here."""
    torch.manual_seed(0)
    n, kinds = unreachable_after(_step(_storch_made_cycle))
    assert n == 1, kinds
    (kind,) = kinds
    assert kind.startswith("dict from storch/registry.py:"), kinds


def test_a_cycle_of_the_tests_own_code_is_not_counted():
    torch.manual_seed(0)
    n, kinds = unreachable_after(_step(_test_made_cycle))
    assert n == 0, kinds


@pytest.mark.filterwarnings("ignore")
def test_torch_compiles_own_garbage_is_not_counted():
    """torch.compile in every step, and its caches reset (torch._dynamo.reset(): what lets go of a compiled graph):
    hundreds of unreachable objects made by torch's code (FX nodes, frame summaries, guards, fake tensors; 242 with
    torch 2.13), none of them counted; a storch-made cycle beside them still is."""
    torch.manual_seed(0)
    inner = _step()

    def compiled_step(plant=None):
        def step():
            f = torch.compile(lambda x: torch.sin(x) * 2 + 1, backend="eager")
            f(torch.randn(4))
            torch._dynamo.reset()
            inner()
            if plant is not None:
                plant()
        return step

    try:
        step = compiled_step()
        step()  # (untraced: the process's first torch.compile, cold, took ~35 s under tracemalloc alone)
        with allocations_traced():
            gc.collect()
            gc.disable()
            try:
                step()
                gc.set_debug(gc.DEBUG_SAVEALL)
                gc.collect()
                everything = len(gc.garbage)
                n, kinds = storch_garbage(gc.garbage)
            finally:
                gc.garbage.clear()
                gc.set_debug(0)
                gc.enable()
        assert everything > 100, everything  # the garbage to ignore is there
        assert n == 0, kinds
        n, kinds = unreachable_after(compiled_step(_storch_made_cycle), warmups=1)
        assert n == 1 and next(iter(kinds)).startswith("dict from storch/registry.py:"), kinds
    finally:
        torch._dynamo.reset()
