"""The plain node (issue 19): a node of a torch distribution with an estimator whose per-type checks all come out as
no-ops is sampled by ``storch.estimators.first_steps._plain_node``, decided once per (estimator, distribution type) and
cached on the estimator. These tests assert the path (not a time): taken in the plain case from the second call on,
with the general path's samples, log-probabilities, loss and gradients bitwise; not taken where an option was set
since, a hook runs, the distribution or the estimator is a subclass that changes what is checked, a parent plate is
a sample plate, the step is traced by storch.compile or grad is disabled."""

from __future__ import annotations

import pytest
import torch
from torch.distributions import Bernoulli, Categorical, Normal

import storch
from path_probes import calls, hooked
from storch.errors import UnsupportedDistributionError


class _Plain(storch.Estimator):
    """The base class's components (the score function, sampling with replacement), no requirements."""

    name = "plain_node_for_tests"


def _bernoulli(x):
    return Bernoulli(logits=x)


def _step(est, theta, make=_bernoulli, **call):
    """One step; returns (the path the estimator call took, sample, l, loss, gradient)."""
    torch.manual_seed(0)
    with storch.Graph():
        x = storch.denote_independent(theta, 0, "data")
        d = make(x)
        z, seen = calls(lambda: est(d, **call))
        node = storch.current_graph().nodes[-1]
        storch.add_cost(((z - 0.45) ** 2).sum(-1), name="f")
        loss = storch.surrogate_loss(order=1)
        g, = torch.autograd.grad(loss, [theta])
    path = "plain" if "_plain_node" in seen else "general"
    assert (path == "plain") != ("_sample_node" in seen)
    return path, z.tensor.detach(), node.gradient_values.detach(), loss.detach(), g


def _same(a, b):
    for x, y in zip(a[1:], b[1:]):
        assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)


def test_plain_node_is_taken_from_the_second_call_with_the_general_paths_values():
    theta = torch.randn(4, 3, requires_grad=True)
    est = _Plain(plate="z", n_samples=5)
    runs = [_step(est, theta) for _ in range(3)]
    assert [r[0] for r in runs] == ["general", "plain", "plain"]
    _same(runs[0], runs[1])
    _same(runs[0], runs[2])
    assert est.__dict__["_storch_plain"] == {Bernoulli: True}


def test_an_option_set_clears_the_decision():
    theta = torch.randn(4, 3, requires_grad=True)
    est = _Plain(plate="z", n_samples=5)
    assert [_step(est, theta)[0] for _ in range(2)] == ["general", "plain"]
    est.n_samples = 7
    first = _step(est, theta)
    assert first[0] == "general" and first[1].shape[0] == 7
    second = _step(est, theta)
    assert second[0] == "plain"
    _same(first, second)
    est.train()  # nn.Module.train() / .eval() set `training`, which decides nothing: the decision is kept (r-24)
    est.eval()
    assert _step(est, theta)[0] == "plain"
    est.jump_free = True  # a flag set on the instance: decided again, and a jump-free estimator is not plain
    assert [_step(est, theta)[0] for _ in range(2)] == ["general", "general"]


def test_hooks_take_the_general_path():
    theta = torch.randn(4, 3, requires_grad=True)
    est = _Plain(plate="z", n_samples=5)
    ref = [_step(est, theta) for _ in range(2)]
    assert [r[0] for r in ref] == ["general", "plain"]
    general, heard = hooked(est, lambda: _step(est, theta))
    assert general[0] == "general" and heard == 1
    _same(ref[1], general)
    pre = []  # a global forward pre-hook too
    handle = torch.nn.modules.module.register_module_forward_pre_hook(lambda m, i: pre.append(2))
    try:
        assert _step(est, theta)[0] == "general"
    finally:
        handle.remove()
    assert pre == [2]
    assert _step(est, theta)[0] == "plain"


class _MyBernoulli(Bernoulli):
    """A user's subclass of a torch class: its type does not tell what storch may skip."""


def test_a_distribution_subclass_takes_the_general_path():
    theta = torch.randn(4, 3, requires_grad=True)
    est = _Plain(plate="z", n_samples=5)
    assert [_step(est, theta, lambda x: _MyBernoulli(logits=x))[0] for _ in range(3)] == ["general"] * 3
    assert est.__dict__["_storch_plain"] == {_MyBernoulli: False}
    assert [_step(est, theta)[0] for _ in range(2)] == ["general", "plain"]  # decided per type


def test_an_estimator_subclass_that_checks_more_keeps_its_checks():
    theta = torch.randn(4, 3, requires_grad=True)
    asked = []

    class _Checking(_Plain):
        def check_distribution(self, d):
            asked.append(type(d))
            super().check_distribution(d)
            if getattr(self, "refuse", False):
                raise UnsupportedDistributionError("refused by the test")

    est = _Checking(plate="z", n_samples=5)
    assert [_step(est, theta)[0] for _ in range(3)] == ["general"] * 3
    assert asked == [Bernoulli] * 3
    object.__setattr__(est, "refuse", True)  # (bypassing Estimator.__setattr__: the check is asked anyway)
    with pytest.raises(UnsupportedDistributionError, match="refused by the test"):
        _step(est, theta)

    class _OwnOutput(_Plain):
        def output(self, node):
            return node.sample * 1.0

    assert [_step(_OwnOutput(plate="z", n_samples=5), theta)[0] for _ in range(2)] == ["general"] * 2
    est = _Plain(plate="z", n_samples=5)  # an output set on the instance: called, so not plain
    assert [_step(est, theta)[0] for _ in range(2)] == ["general", "plain"]
    outputs = []
    est.output = lambda node: outputs.append(1) or node.sample
    assert [_step(est, theta)[0] for _ in range(2)] == ["general", "general"] and outputs == [1, 1]


def test_a_sample_plate_among_the_parents_takes_the_general_path():
    theta = torch.randn(4, 3, requires_grad=True)
    first, second = _Plain(plate="a", n_samples=2), _Plain(plate="b", n_samples=3)
    for i in range(3):
        with storch.Graph():
            x = storch.denote_independent(theta, 0, "data")
            a = first(Bernoulli(logits=x))
            b, seen = calls(lambda: second(Bernoulli(logits=x * a)))  # parents: a's sample plate and data
            assert "_plain_node" not in seen and "_sample_node" in seen
            storch.add_cost(((b - 0.45) ** 2).sum(-1), name="f")
            torch.autograd.grad(storch.surrogate_loss(order=1), [theta])
    with storch.Graph():  # the same estimator on independent parents only: plain (decided for the type above)
        x = storch.denote_independent(theta, 0, "data")
        b, seen = calls(lambda: second(Bernoulli(logits=x)))
        assert "_plain_node" in seen


def test_no_grad_inputs_and_other_types():
    theta = torch.randn(4, 3, requires_grad=True)
    est = _Plain(plate="z", n_samples=5)
    assert [_step(est, theta)[0] for _ in range(2)] == ["general", "plain"]
    with torch.no_grad():  # the general path records a step sampled without grad
        with storch.Graph():
            x = storch.denote_independent(theta, 0, "data")
            _, seen = calls(lambda: est(Bernoulli(logits=x)))
            assert "_plain_node" not in seen
            assert storch.current_graph().nodes[0].no_grad_step == 0
    checked = []

    class _Inputs(_Plain):
        def check_inputs(self, inputs, plates, step):
            checked.append(inputs)
            super().check_inputs(inputs, plates, step)

    with_inputs = _Inputs(plate="z", n_samples=5)
    for i in range(2):  # inputs= keeps the lean call: checked (an overridden check_inputs too) and kept on the node
        with storch.Graph():
            x = storch.denote_independent(theta, 0, "data")
            _, seen = calls(lambda: with_inputs(Bernoulli(logits=x), inputs=x))
            assert ("_plain_node" in seen) == (i == 1) and "check_inputs" in seen
            assert storch.current_graph().nodes[0].inputs is x and checked[-1] is x
    with storch.Graph():  # inputs of another plate: refused on the plain path as on the general one
        x = storch.denote_independent(theta, 0, "data")
        y = storch.denote_independent(theta, 0, "other")
        with pytest.raises(storch.StorchError):
            with_inputs(Bernoulli(logits=x), inputs=y)
    with storch.Graph():  # a positional inputs is refused (an observed value meant as Pyro's obs= would be ignored)
        x = storch.denote_independent(theta, 0, "data")
        with pytest.raises(storch.OptionError, match="inputs="):
            est(Bernoulli(logits=x), x)
    # a Categorical is plain too; a Normal's draws are checked for their precision at every node: never plain
    assert [_step(est, theta, lambda x: Categorical(logits=x))[0] for _ in range(2)] == ["general", "plain"]
    assert [_step(est, theta, lambda x: Normal(x, 1.0))[0] for _ in range(2)] == ["general", "general"]
    assert est.__dict__["_storch_plain"] == {Bernoulli: True, Categorical: True, Normal: False}


def test_a_step_traced_by_storch_compile_takes_the_general_path():
    theta = torch.randn(4, 3, requires_grad=True)
    est = _Plain(plate="z", n_samples=5)
    assert [_step(est, theta)[0] for _ in range(2)] == ["general", "plain"]
    paths = []

    def step(theta):
        with storch.Graph():
            x = storch.denote_independent(theta, 0, "data")
            z, seen = calls(lambda: est(Bernoulli(logits=x)))
            paths.append("plain" if "_plain_node" in seen else "general")
            storch.add_cost(((z - 0.45) ** 2).sum(-1), name="f")
            return storch.surrogate_loss(order=1)

    compiled = storch.compile(step, backend=None)
    torch.manual_seed(0)
    compiled(theta).backward()
    assert paths and set(paths) == {"general"}
    assert _step(est, theta)[0] == "plain"  # eager again: the cached decision holds
