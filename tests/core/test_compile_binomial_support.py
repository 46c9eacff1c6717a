"""storch.compile of a step that enumerates a Binomial's support: a refusal that says why and what to do.

Found by a tester: ``storch.expect`` (and ``unordered_set``, tests/score) on a Binomial inside ``storch.compile``
failed with the generic "some code reads a tensor's value" message: torch's ``Binomial.enumerate_support`` reads
``int(total_count.max())`` to size the support 0..n, which a trace cannot read. The refusal names the Binomial, says
``backend=None`` fails alike, and gives the two ways out (eagerly; a Categorical over 0..n), which the tests run.
"""

import pytest
import torch
from torch.distributions import Binomial, Categorical

import storch

N = 3


def _cost(z):
    return ((z - 1.0) ** 2).sum()


def _exact(p):
    return (N * p * (1 - p) + (N * p - 1) ** 2).sum()  # E[(z - 1)^2] = Var z + (E z - 1)^2


@pytest.mark.parametrize("backend", ["default", None])
def test_expect_on_a_binomial_inside_compile_is_refused_with_the_reason(backend):
    torch.manual_seed(0)
    est = storch.estimator("expect", plate="z")

    def step(p):
        storch.add_cost(_cost(est(Binomial(total_count=N, probs=p))), name="c")
        return storch.surrogate_loss()

    p = torch.tensor([0.3, 0.6], dtype=torch.float64, requires_grad=True)
    kw = {} if backend == "default" else {"backend": None}
    with pytest.raises(storch.StorchError,
                       match=r"(?s)cannot trace \S*step: the proposal of estimator 'expect'.*Binomial node's support "
                             r"0\.\.n.*total_count as a Python number.*backend=None.*fails alike.*eagerly.*Categorical"):
        storch.compile(step, **kw)(p)
    with storch.Graph():  # the first way out: the same step, eagerly (exact: expect enumerates 0..n)
        step_eager = step(p)
        loss = storch.cost_estimates()["c"]
    torch.testing.assert_close(loss, _exact(p).detach())
    torch.testing.assert_close(torch.autograd.grad(step_eager, p)[0], torch.autograd.grad(_exact(p), p)[0])


def test_the_advised_categorical_over_the_counts_traces_and_is_exact():
    """The second way out, as the message writes it: a Categorical over 0..n with the Binomial's log-probabilities,
    compiled: the value and gradient are the Binomial's exactly (expect enumerates every count)."""
    torch.manual_seed(1)
    est = storch.estimator("expect", plate="z")

    def step(p):
        k = torch.arange(N + 1.0, dtype=p.dtype)
        logits = Binomial(N, probs=p).log_prob(k.view(-1, *[1] * p.dim())).movedim(0, -1)
        z = est(Categorical(logits=logits)).to(p.dtype)
        storch.add_cost(_cost(z), name="c")
        return storch.surrogate_loss()

    compiled = storch.compile(step)
    for values in ([0.3, 0.6], [0.1, 0.85]):
        p = torch.tensor(values, dtype=torch.float64, requires_grad=True)
        loss = compiled(p)
        torch.testing.assert_close(loss.detach(), _exact(p).detach())
        torch.testing.assert_close(torch.autograd.grad(loss, p)[0], torch.autograd.grad(_exact(p), p)[0])
