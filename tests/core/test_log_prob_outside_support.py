"""An estimator whose extra (evaluation-only) entries lie outside the distribution's support and that
scores them with node.log_prob gets a storch error naming it and the component, not torch's raw
ValueError of argument validation (p-ext: x̄ = E_p[x] = 0.57 appended to a Bernoulli's samples)."""
import pytest
import torch

import storch
from storch.extending import assume


class _MeanPointAll(storch.Estimator):
    """Score function over n samples plus the evaluation-only mean x̄ (weight 0), scoring every entry."""

    name = "test_mean_point_all"

    def proposal(self, node):
        x = node.distribution.sample((self.n_samples,))
        return torch.cat([x, node.distribution.mean.detach().unsqueeze(0)], 0)  # x̄: a constant of the step

    @property
    def uniform_weights(self) -> bool:
        return False

    def weighting_function(self, node):
        w = torch.full((self.n_samples + 1,), 1.0 / self.n_samples, dtype=node.sample.dtype)
        w[-1] = 0.0
        return w

    def gradient_function(self, node):
        return node.log_prob(node.sample)  # x̄ is not in a Bernoulli's support


class _MeanPointSamples(_MeanPointAll):
    """The fix the message suggests: log p of the ordinary samples only, 0 at x̄."""

    name = "test_mean_point_samples"

    def gradient_function(self, node):
        lp = node.log_prob(node.sample[:self.n_samples])
        return torch.cat([lp, torch.zeros_like(lp[:1])])


def _step(est, validate_args=None):
    torch.manual_seed(0)
    th = torch.tensor([0.3, -0.5], dtype=torch.float64, requires_grad=True)
    z = est(torch.distributions.Bernoulli(logits=th, validate_args=validate_args))
    storch.add_cost(((z - 0.9) ** 2).sum(-1), name="c")
    storch.backward()
    return th.grad


def test_extra_entries_outside_support_name_the_estimator_and_component():
    with pytest.raises(storch.StorchError) as info:
        _step(_MeanPointAll("z", n_samples=2))
    message = str(info.value)
    assert "'test_mean_point_all'" in message and "node.log_prob" in message and "gradient_function" in message
    assert "outside the support" in message and "Bernoulli" in message
    assert "node.sample[:n]" in message and "validate_args=False" in message
    assert isinstance(info.value, ValueError)  # still a ValueError: code that catches torch's keeps working
    assert isinstance(info.value.__cause__, ValueError)  # torch's own message is kept as the cause
    # the step was discarded: a new one runs
    g = _step(_MeanPointSamples("z", n_samples=2))
    assert g is not None and torch.isfinite(g).all()


def test_both_fixes_run_and_agree_on_the_samples():
    # validate_args=False: torch's log p at x̄ is a number, with weight 0 in the surrogate
    g_all = _step(_MeanPointAll("z", n_samples=2), validate_args=False)
    g_samples = _step(_MeanPointSamples("z", n_samples=2), validate_args=False)
    assert g_all is not None and g_samples is not None
    torch.testing.assert_close(g_all, g_samples)


class _UniformExtraPoint(_MeanPointSamples):
    """n samples of a Uniform(0, high), then the point high + 1 outside its support (evaluation-only)."""

    name = "test_uniform_extra_point"
    score_function = None  # storch compares the overridden gradient function with node.log_prob of every entry

    def proposal(self, node):
        x = node.distribution.sample((self.n_samples,))
        return torch.cat([x, (node.distribution.high.detach() + 1.0).expand_as(x[:1])], 0)


def test_storch_own_comparison_of_all_entries_still_tells_the_outside_of_the_support_apart():
    # the base class's score-function comparison calls node.log_prob(node.sample) and treats a ValueError as
    # "not log p" (entries outside the support): the storch error is still one, so the step runs
    high = torch.tensor([1.0, 2.0], requires_grad=True)
    z = _UniformExtraPoint("z", n_samples=2)(torch.distributions.Uniform(torch.zeros(2), high))
    storch.add_cost(z.sum(-1), name="c")
    storch.backward()
    assert high.grad is not None


def test_reraised_errors_have_public_names():
    """The outside-support error of node.log_prob and a failed ``storch.extending.assume`` of a compiled step were
    shown in users' tracebacks as storch.errors._OutsideSupportError / _AssumptionError (private names one cannot
    catch by); now storch.OutsideSupportError (still a ValueError) and storch.AssumptionError (still a
    RuntimeError), exported like storch.PlateRuntimeError."""
    with pytest.raises(storch.OutsideSupportError, match="outside the support") as info:
        _step(_MeanPointAll("z", n_samples=2))
    assert type(info.value) is storch.OutsideSupportError and "._" not in info.typename
    assert isinstance(info.value, ValueError)

    message = "test: the scale must stay below 2 (checked at every call of the step storch.compile traced)"
    est = storch.estimator("reparameterization", plate="z", n_samples=2)  # (tests/core: core estimators only)

    def step(scale):
        with storch.Graph():
            assume(scale < 2, message)
            z = est(torch.distributions.Normal(scale, 1.0))
            storch.add_cost(z, name="c")
            return storch.surrogate_loss()

    compiled = storch.compile(step, backend=None)
    assert torch.isfinite(compiled(torch.tensor(1.0, requires_grad=True)))
    with pytest.raises(storch.AssumptionError, match="the scale must stay below 2") as info:
        compiled(torch.tensor(3.0, requires_grad=True))  # a replay
    assert type(info.value) is storch.AssumptionError and "._" not in info.typename
    assert isinstance(info.value, RuntimeError)
    for cls in (storch.OutsideSupportError, storch.AssumptionError):
        assert issubclass(cls, storch.StorchError) and not cls.__name__.startswith("_") and cls.__name__ in storch.__all__
