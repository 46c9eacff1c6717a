"""storch.compile records the step's grad-mode switches as the eager step makes them.

Found when the suites ran on torch 2.7 and 2.8: their ``make_fx(pre_dispatch=True)`` records ``torch._C._set_grad_enabled``
without switching, so the trace ran with grad enabled throughout and each ``no_grad`` exit recorded the mode it read
then. A ``no_grad`` block nested in another (``Binomial.sample``'s inside storch's own sampling) left the rest of the outer
block recorded as grad-enabled: a value the step holds constant was differentiated (a silently wrong gradient), and
GO on a Binomial failed at the replay's backward ("derivative for aten::binomial is not implemented"). storch's
trace mode now switches too, as torch 2.9 and later do. On torch 2.13 both tests pass on the old code as well; on
torch 2.7.1 and 2.8.0 they fail there (the first by a gradient 3.3 times the exact one, the second by torch's RuntimeError).
"""

import torch
from torch.distributions import Bernoulli, Binomial

import storch

F64 = torch.float64


def test_a_value_computed_under_nested_no_grad_is_a_constant_in_the_compiled_gradient():
    """``expect`` enumerates the Bernoulli, so the gradient is exact: w = exp(theta) is held constant by the outer
    ``no_grad`` (after an inner one closes), d/dtheta E[w z] = w sigmoid'(theta), as eagerly. Differentiating
    through w would add exp(theta) sigmoid(theta)."""
    est = storch.estimator("expect", plate="z")

    def step(theta):
        z = est(Bernoulli(logits=theta)).to(theta.dtype)
        with torch.no_grad():
            with torch.no_grad():
                pass
            w = theta.exp()
        storch.add_cost((w * z).sum())
        return storch.surrogate_loss()

    theta = torch.tensor([0.3, -1.2], dtype=F64, requires_grad=True)
    s = torch.sigmoid(theta.detach())
    exact = theta.detach().exp() * s * (1 - s)
    compiled = storch.compile(step, backend=None)
    for _ in range(2):  # the trace's first call, then a replay
        torch.testing.assert_close(torch.autograd.grad(compiled(theta), theta)[0], exact)
    torch.testing.assert_close(torch.autograd.grad(step(theta), theta)[0], exact)
    assert torch.is_grad_enabled()


def test_go_on_a_binomial_compiles_and_its_gradient_is_unbiased():
    """GO on a Binomial, compiled: the replays' gradients of E[k^2] = n p (1 - p) + (n p)^2 in the logits match the
    closed form (z-test over independent replays, each averaging its own draws)."""
    torch.manual_seed(0)
    n = torch.tensor([3.0, 5.0], dtype=F64)
    est = storch.estimator("go", plate="k", n_samples=16)

    def step(logits):
        k = est(Binomial(n, logits=logits))
        storch.add_cost((k ** 2).sum(-1))
        return storch.surrogate_loss()

    logits = torch.tensor([0.3, -0.5], dtype=F64, requires_grad=True)
    compiled = storch.compile(step, backend=None)
    grads = torch.stack([torch.autograd.grad(compiled(logits), logits)[0] for _ in range(400)])
    p = torch.sigmoid(logits.detach())
    exact = (n * (1 - 2 * p) + 2 * n ** 2 * p) * p * (1 - p)  # d/dp E[k^2] times dp/dlogit
    z = (grads.mean(0) - exact) / (grads.std(0) / len(grads) ** 0.5)
    assert z.abs().max() < 4, (grads.mean(0), exact, z)
