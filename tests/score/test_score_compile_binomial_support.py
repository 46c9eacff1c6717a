"""storch.compile of unordered_set / sum_and_sample on a Binomial node: the refusal says why and what to do.

Found by a tester: the generic "some code reads a tensor's value" message; the values of a Binomial's support are
enumerated from ``total_count`` read as a Python number (torch's ``enumerate_support``, storch's check that the count is
one number), which a trace cannot read. tests/core/test_compile_binomial_support.py: expect, and the advice run.
"""

import pytest
import torch
from torch.distributions import Binomial, Categorical

import storch

N = 3


@pytest.mark.parametrize("backend", ["default", None])
@pytest.mark.parametrize("name", ["unordered_set", "sum_and_sample"])
@pytest.mark.parametrize("count", [N, [N, N]])
def test_an_enumerating_estimator_on_a_binomial_inside_compile_is_refused_with_the_reason(name, backend, count):
    torch.manual_seed(0)
    est = storch.estimator(name, plate="z", n_samples=2)

    def step(p):
        z = est(Binomial(total_count=torch.tensor(count, dtype=p.dtype), probs=p))
        storch.add_cost(((z - 1.0) ** 2).sum(), name="c")
        return storch.surrogate_loss()

    p = torch.tensor([0.3, 0.6], dtype=torch.float64, requires_grad=True)
    kw = {} if backend == "default" else {"backend": None}
    with pytest.raises(storch.StorchError,
                       match=rf"(?s)cannot trace \S*step: the \w+ of estimator '{name}'.*Binomial node's support 0\.\.n"
                             r".*total_count as a Python number.*backend=None.*fails alike.*eagerly.*Categorical"):
        storch.compile(step, **kw)(p)


def test_the_advised_categorical_under_unordered_set_is_unbiased():
    """The advice under unordered_set, compiled: over 400 seeded steps the cost estimate's mean is E[(z - 1)^2] of the
    Binomial (z-test, 4 standard errors)."""
    torch.manual_seed(2)
    est = storch.estimator("unordered_set", plate="z", n_samples=2)

    def step(p):
        k = torch.arange(N + 1.0, dtype=p.dtype)
        logits = Binomial(N, probs=p).log_prob(k.view(-1, *[1] * p.dim())).movedim(0, -1)
        z = est(Categorical(logits=logits)).to(p.dtype)
        storch.add_cost(((z - 1.0) ** 2).sum(), name="c")
        storch.surrogate_loss()
        return storch.cost_estimates()["c"]

    compiled = storch.compile(step)
    p = torch.tensor([0.3, 0.6], dtype=torch.float64)
    exact = float((N * p * (1 - p) + (N * p - 1) ** 2).sum())
    est_values = torch.stack([compiled(p) for _ in range(400)])
    z = (float(est_values.mean()) - exact) / (float(est_values.std()) / 400 ** 0.5)
    assert abs(z) < 4, (float(est_values.mean()), exact, z)
