"""storch.compile records the step's grad-mode switches as the eager step makes them.

Found when the suites ran on torch 2.7 and 2.8: their ``make_fx(pre_dispatch=True)`` records ``torch._C._set_grad_enabled``
without switching, so the trace ran with grad enabled throughout and each ``no_grad`` exit recorded the mode it read
then. A ``no_grad`` block nested in another (``Binomial.sample``'s inside storch's own sampling) left the rest of the outer
block recorded as grad-enabled: a value the step holds constant was differentiated (a silently wrong gradient), and
GO on a Binomial failed at the replay's backward ("derivative for aten::binomial is not implemented"). storch's
trace mode now switches too, as torch 2.9 and later do. On torch 2.13 both tests pass on the old code as well; on
torch 2.7.1 and 2.8.0 they fail there (the first by a gradient 3.3 times the exact one, the second by torch's RuntimeError). The GO test is in
tests/relaxed/test_relaxed_compile_grad_mode.py (GO is in the relaxed family).
"""

import torch
from torch.distributions import Bernoulli

import storch

F64 = torch.float64


def test_a_value_computed_under_nested_no_grad_is_a_constant_in_the_compiled_gradient():
    """``expect`` enumerates the Bernoulli, so the gradient is exact: w = exp(theta) is held constant by the outer
    ``no_grad`` (after an inner one closes), d/dtheta E[w z] = w sigmoid'(theta), as eagerly. Differentiating
    through w would add exp(theta) sigmoid(theta)."""
    est = storch.estimator("expect", plate="z")

    def step(theta):
        with storch.Graph():  # (a step of its own: the thread's default graph is left as it was)
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
    assert not storch.current_graph().nodes  # (the eager call left no step in the default graph)

