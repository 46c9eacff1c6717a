"""No surrogate of a step reads the relaxed estimators' state as the step's own update left it.

A tester (p-rl) found score's moving average read after the step's update by a second surrogate of the step
(biased; tests/score/test_state_within_a_step.py). The relaxed estimators with state: relax, rebar and lax
train their control variates on the gradient's variance, an update that ``surrogate_loss().backward()`` refuses
before anything changes (the step's later surrogates read the state as it was), and ``storch.backward()`` ends
the step after it; gumbel_softmax's annealed temperature advances after the step, while its samples were drawn
with the step's temperature.
"""

import pytest
import torch
from torch.distributions import Bernoulli, Normal

import storch
from storch.testing import assert_unbiased

THETA = (0.3, -0.7, 1.1)


def _cost(x):
    return ((x - 0.45) ** 2).sum()


def _exact(theta):
    # E[(x - 0.45)²] = σ(θ) (0.55² - 0.45²) + 0.45²: ∂/∂θ = 0.1 σ'(θ)
    s = torch.sigmoid(theta)
    return 0.1 * s * (1.0 - s)


@pytest.mark.parametrize("name", ["relax", "rebar", "lax"])
def test_a_refused_first_epoch_leaves_the_state_and_the_next_surrogate_is_unbiased(name):
    """The first epoch's surrogate_loss().backward() is refused before the update (the control variate's
    parameters and temperature unchanged), so the step's next surrogate, storch.backward(), reads the state of
    earlier steps: its gradient is unbiased (z-test against the exact gradient; a Normal's mean for lax)."""
    torch.manual_seed(0)
    est = storch.estimator(name, plate="z")
    theta = torch.tensor(THETA, requires_grad=True)
    got = []
    for _ in range(400 if name != "lax" else 300):
        theta.grad = None
        with storch.Graph():
            x = est(Normal(theta, 1.0) if name == "lax" else Bernoulli(logits=theta))
            storch.add_cost(_cost(x), name="c")
            first = torch.autograd.grad(storch.surrogate_loss(), theta, retain_graph=True)[0]
            before = {k: v.clone() for k, v in est.state_dict().items() if isinstance(v, torch.Tensor)}
            with pytest.raises(storch.StorchError, match=r"storch\.backward\(\)"):
                storch.surrogate_loss().backward(retain_graph=True)
            after = est.state_dict()
            assert all(torch.equal(before[k], after[k]) for k in before)
            storch.backward()
        torch.testing.assert_close(theta.grad, first, rtol=0, atol=0)
        got.append(theta.grad.clone())
    exact = 2.0 * (theta.detach() - 0.45) if name == "lax" else _exact(theta.detach())
    assert est.update_steps == len(got)
    assert_unbiased(torch.stack(got), exact, name=f"{name}: storch.backward() after a refused pass")


def test_an_annealed_gumbel_softmax_gives_every_surrogate_of_a_step_the_same_gradient():
    """The schedule advances on the step's first backward pass; the step's later surrogates differentiate the
    samples drawn at the step's temperature: the same gradient, exactly."""
    torch.manual_seed(1)
    est = storch.estimator("gumbel_softmax", plate="z", n_samples=2, temperature=lambda s: 1.0 / (1.0 + s))
    theta = torch.tensor(THETA, requires_grad=True)
    for step in range(3):
        with storch.Graph():
            x = est(Bernoulli(logits=theta))
            storch.add_cost(_cost(x), name="c")
            first = torch.autograd.grad(storch.surrogate_loss(), theta, retain_graph=True)[0]
            storch.surrogate_loss().backward(retain_graph=True)
            assert est.step == step + 1  # the update ran
            again = torch.autograd.grad(storch.surrogate_loss(), theta, retain_graph=True)[0]
            torch.testing.assert_close(again, first, rtol=0, atol=0)
