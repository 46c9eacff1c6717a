"""A finished step leaves nothing for the cyclic garbage collector (issue 19): its nodes, cost
frames, plate tensors and their tensors are freed by reference counting when the step ends.

With the collector switched off, one training step (``storch.backward()``) or one evaluation
step (``with storch.Graph():`` + ``storch.surrogate_loss()`` + ``torch.autograd.grad``) runs,
then ``gc.collect()`` must find nothing unreachable of storch's (step_checks.storch_unreachable: not
torch.compile's garbage, after a test that compiled in the same process): every first-party estimator of the roster,
the score function with each of its baselines, and partitions (one estimator called at every
step of a sequence, with per-step costs).
"""

from __future__ import annotations

import gc

import pytest
import torch
from torch.distributions import Categorical, Normal

import storch

from _roster import cost, distribution, installed, options
from step_checks import unreachable_after as _unreachable_after


def _training_step(est, name: str, theta: torch.Tensor):
    def step():
        x = storch.denote_independent(theta.expand(4, 3), 0, "data")
        z = est(distribution(name, x))
        storch.add_cost(cost(name, z), name="c")
        storch.backward()
    return step


@pytest.mark.parametrize("name", installed())
def test_training_step_leaves_no_cycles(name):
    torch.manual_seed(0)
    est = storch.estimator(name, plate="z", **options(name))
    theta = torch.tensor([0.3, -0.2, 0.5], requires_grad=True)
    n, kinds = _unreachable_after(_training_step(est, name, theta))
    assert n == 0, f"{name}: gc.collect() found {n} unreachable objects after a step: {kinds}"


@pytest.mark.parametrize("name", installed())
def test_evaluation_graph_leaves_no_cycles(name):
    torch.manual_seed(0)
    est = storch.estimator(name, plate="z", **options(name))
    theta = torch.tensor([0.3, -0.2, 0.5], requires_grad=True)

    def step():
        with storch.Graph():
            x = storch.denote_independent(theta.expand(4, 3), 0, "data")
            z = est(distribution(name, x))
            storch.add_cost(cost(name, z), name="c")
            torch.autograd.grad(storch.surrogate_loss(), theta, allow_unused=True)

    n, kinds = _unreachable_after(step)
    assert n == 0, f"{name}: gc.collect() found {n} unreachable objects after a step: {kinds}"


@pytest.mark.parametrize("pattern", ["backward", "evaluation"])
def test_vimco_step_leaves_no_cycles(pattern):
    """vimco (storch-estimators-score) is not in the shared roster: its cost is its multi-sample bound
    (``est.bound(log_w)``), not the roster's cost of z (a tester found it missing here)."""
    if "vimco" not in storch.available_estimators():
        pytest.skip("vimco is not installed (storch-estimators-score)")
    torch.manual_seed(0)
    est = storch.estimator("vimco", plate="z", n_draws=3)
    theta = torch.tensor([0.3, -0.2, 0.5], requires_grad=True)

    def body():
        x = storch.denote_independent(theta.expand(4, 3), 0, "data")
        q = Normal(x, torch.ones_like(x))
        z = est(q)
        storch.add_cost(est.bound(-((z - 0.45) ** 2).sum(-1) - q.log_prob(z).sum(-1)), name="c")

    def step():
        if pattern == "backward":
            body()
            storch.backward()
        else:
            with storch.Graph():
                body()
                torch.autograd.grad(storch.surrogate_loss(), theta, allow_unused=True)

    n, kinds = _unreachable_after(step)
    assert n == 0, f"vimco ({pattern}): gc.collect() found {n} unreachable objects after a step: {kinds}"


@pytest.mark.parametrize("baseline", ["none", "leave_one_out", "moving_average", "learned", "greedy"])
def test_score_baselines_leave_no_cycles(baseline):
    if "score" not in storch.available_estimators():
        pytest.skip("storch-estimators-score is not installed")
    torch.manual_seed(0)
    est = storch.estimator("score", plate="z", n_samples=3, baseline=baseline)
    theta = torch.tensor([0.3, -0.2, 0.5], requires_grad=True)
    n, kinds = _unreachable_after(_training_step(est, "score", theta))
    assert n == 0, f"score[{baseline}]: gc.collect() found {n} unreachable objects after a step: {kinds}"


PARTITIONS = {
    "score": {"n_samples": 3},
    "score+loo": {"n_samples": 3, "baseline": "leave_one_out"},
    "unordered_set": {"n_samples": 3},
    "sum_and_sample": {"n_samples": 2, "buffer": 2},
}


@pytest.mark.parametrize("config", list(PARTITIONS))
def test_partition_leaves_no_cycles(config):
    name = config.split("+")[0]
    if name not in storch.available_estimators():
        pytest.skip(f"{name} is not installed")
    torch.manual_seed(0)
    est = storch.estimator(name, plate="z", **PARTITIONS[config])
    w = torch.tensor([[0.3, -0.2, 0.1], [0.5, -0.4, 0.2], [-0.3, 0.6, 0.1]], requires_grad=True)

    def step():  # a sequence of 3 tokens, a cost at every step (causal credit / moved to the end)
        x = storch.denote_independent(torch.eye(3)[:2], 0, "data")
        prev = x
        for t in range(3):
            # sum_and_sample's buffer keeps one memory per data point: its first call names them
            key = {"memory_key": torch.arange(2)} if name == "sum_and_sample" and t == 0 else {}
            tok = est(Categorical(logits=prev @ w), **key)
            storch.add_cost(tok.to(w.dtype) * 0.5 ** t, name=f"c{t}")
            prev = torch.nn.functional.one_hot(tok, 3).to(w.dtype)
        storch.backward()

    n, kinds = _unreachable_after(step)
    assert n == 0, f"{config} partition: gc.collect() found {n} unreachable objects after a step: {kinds}"


# -- per-call garbage of torch's pytree helpers (issue 19) ---------------------------------------------
# torch.utils._pytree.tree_flatten walks with a recursive local function whose closure cell holds itself:
# a cycle of 7 objects per call. storch.compile's replay flattened its arguments with it on every call
# with a non-tensor argument, and einsum with an ellipsis went through torch.func.vmap (whose own
# flattening leaves ~34 objects a call: functions storch still runs through vmap do, docs/performance-log.md).


def test_einsum_on_plate_tensors_leaves_no_cycles():
    torch.manual_seed(0)
    est = storch.estimator("reparameterization", plate="z", n_samples=2)
    theta = torch.tensor([0.3, -0.2, 0.5], requires_grad=True)
    w = torch.tensor([[0.5, -1.0], [0.2, 0.3], [-0.4, 0.1]], requires_grad=True)

    def step():
        x = storch.denote_independent(theta.expand(4, 3), 0, "data")
        z = est(Normal(x, 1.0))
        h = torch.einsum("...i,ij->...j", z, w)  # an ellipsis: it went through vmap
        storch.add_cost(torch.einsum("...j,...j->...", h, h) + torch.einsum("i,i->", z, x), name="c")
        storch.backward()

    n, kinds = _unreachable_after(step)
    assert n == 0, f"gc.collect() found {n} unreachable objects after a step with einsum: {kinds}"


@pytest.mark.parametrize("call", ["int", "keyword", "nested"])
def test_compiled_step_with_non_tensor_arguments_leaves_no_cycles(call):
    torch.manual_seed(0)
    est = storch.estimator("reparameterization", plate="z", n_samples=2)
    theta = torch.tensor([0.3, -0.2, 0.5], requires_grad=True)

    def loss(th, n, scale=1.0, extra=None):
        with storch.Graph():
            x = storch.denote_independent(th.expand(n, 3), 0, "data")
            z = est(Normal(x, scale))
            storch.add_cost((z ** 2).sum(-1) + (extra["w"][0].sum() if extra else 0), name="c")
            return storch.surrogate_loss()

    compiled = storch.compile(loss, backend=None)
    args = {"int": lambda: compiled(theta, 4),
            "keyword": lambda: compiled(theta, n=4, scale=2.0),
            "nested": lambda: compiled(theta, 4, extra={"w": [theta, (1, None)]})}[call]
    n, kinds = _unreachable_after(lambda: args().backward())
    assert n == 0, f"gc.collect() found {n} unreachable objects after a compiled step ({call}): {kinds}"
    assert compiled.traces == 1


class _Node:
    pass


class _CostFrame:
    pass


@pytest.mark.parametrize("held", ["sample", "raw tensor"])
def test_the_count_still_catches_a_cycle_holding_a_sample(held):
    """The count leaves torch.compile's garbage out (below), not storch's: a planted cycle in the shape of a node and
    its cost frame holding each other, the frame holding the sample (the plate tensor, or only its raw tensor), is
    caught, though neither object's class is storch's."""
    est = storch.estimator("reparameterization", plate="z", n_samples=2)
    theta = torch.tensor([0.3, -0.2, 0.5], requires_grad=True)

    def step():
        x = storch.denote_independent(theta.expand(4, 3), 0, "data")
        z = est(Normal(x, 1.0))
        node, frame = _Node(), _CostFrame()
        node.frame, frame.node, frame.sample = frame, node, z if held == "sample" else z.tensor
        storch.add_cost((z ** 2).sum(-1), name="c")
        storch.backward()

    n, kinds = _unreachable_after(step)
    assert n > 0 and kinds.get("PlateTensor" if held == "sample" else "Tensor", 0) > 0, kinds


def test_the_count_catches_a_cycle_through_an_autograd_node():
    """A cycle through the autograd graph (a hook on a cost's grad_fn that holds that grad_fn, as a pre-hook storch
    registers on a node could) keeps the graph's saved tensors, the sample's among them, alive until the collector
    runs; those tensors live in C++ and are never Python garbage, and the hook here is a bound method of a plain
    object: the count saw nothing of storch's in it (0) while gc.collect() freed the cycle. Autograd nodes count."""
    est = storch.estimator("reparameterization", plate="z", n_samples=2)
    theta = torch.tensor([0.3, -0.2, 0.5], requires_grad=True)

    class _Hook:
        def __call__(self, grad_outputs):
            return None

    def step():
        x = storch.denote_independent(theta.expand(4, 3), 0, "data")
        z = est(Normal(x, 1.0))
        c = (z * z).sum(-1)  # (the sample's raw tensor: saved by the product, in C++ only)
        hook = _Hook()
        hook.node = c.tensor.grad_fn.next_functions[0][0]
        hook.node.register_prehook(hook.__call__)  # node -> its hooks -> bound method -> hook -> node
        storch.add_cost(c, name="c")
        storch.backward()

    step()
    gc.collect()
    gc.disable()
    try:
        step()
        control = gc.collect()
    finally:
        gc.enable()
    assert control > 0, "the planted cycle is no longer garbage: this test no longer covers it"
    n, kinds = _unreachable_after(step)
    assert n > 0 and any(k.endswith("Backward0") for k in kinds), kinds


def test_the_count_leaves_torch_compile_s_garbage_out():
    """After a test that compiled in the same process (tests/models/test_compile.py), torch.compile's own objects
    (fake tensors, FX nodes, dynamo's variable trackers) became garbage during a step and failed these tests: they
    are not storch's cycles. A step that also compiles a plain function (a new code object each time, no storch in
    it) leaves dynamo's garbage (the control), and the count of storch's unreachable objects is 0."""
    est = storch.estimator("reparameterization", plate="z", n_samples=2)
    theta = torch.tensor([0.3, -0.2, 0.5], requires_grad=True)

    def step():
        scope: dict = {}
        exec("def f(t):\n    return t.sin() + 1\n", scope)  # a fresh code object: dynamo traces it anew
        torch.compile(scope["f"], backend="eager")(torch.randn(3))
        _training_step(est, "reparameterization", theta)()

    step()
    gc.collect()
    gc.disable()
    try:
        step()
        control = gc.collect()
    finally:
        gc.enable()
    assert control > 0, "compiling no longer leaves garbage: this test no longer covers torch.compile's garbage"
    n, kinds = _unreachable_after(step)
    assert n == 0, f"gc.collect() found {n} unreachable objects of storch's after a step that compiled: {kinds}"
