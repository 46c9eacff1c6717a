"""spsa under storch.compile: coupled draws (the default) replay the generator state, which a trace cannot
record, so a compiled step is refused at every scale, by the estimator at the trace (the replay check, a
comparison of values, let it through at small scales); coupled=False draws are recorded like any other."""

import math

import pytest
import torch
from torch.distributions import Normal

import storch
from storch.testing import assert_unbiased


def _step(est, mu):
    def step(sigma):
        with storch.Graph():
            z = est(Normal(mu, sigma))
            storch.add_cost(torch.cos(3 * z).sum(-1), name="c")
            return storch.surrogate_loss()
    return step


# 1 and 0.1: the replay check's values differ; 1e-2 and 1e-4: x₂ ≈ x₁ ≈ μ, the traced program's fresh
# draw for x₂ agreed with eager's replayed one within the check's tolerance and the step compiled (per-seed
# gradients off by up to 0.2, 30x eager's standard deviation at 1e-2)
@pytest.mark.parametrize("sigma", [1.0, 1e-1, 1e-2, 1e-4])
def test_coupled_spsa_is_refused_under_compile_at_every_scale(sigma):
    torch.manual_seed(0)
    mu = torch.nn.Parameter(torch.tensor([0.5], dtype=torch.float64))
    compiled = storch.compile(_step(storch.estimator("spsa", plate="z", n_samples=8), mu), backend=None)
    with pytest.raises(storch.StorchError, match="cannot replay estimator 'spsa' with coupled=True") as refused:
        compiled(torch.tensor([sigma], dtype=torch.float64))
    assert "Run this step eagerly" in str(refused.value)
    # refused before anything ran: the step runs eagerly as before
    torch.manual_seed(0)
    _step(storch.estimator("spsa", plate="z", n_samples=8), mu)(torch.tensor([sigma], dtype=torch.float64)).backward()
    assert mu.grad is not None and torch.isfinite(mu.grad).all()


@pytest.mark.parametrize("sigma", [1.0, 1e-2])
def test_uncoupled_spsa_compiles_and_replays_the_eager_gradient(sigma):
    # coupled=False draws x₁ and x₂ independently: the trace records both draws, and each replayed call
    # gives the eager gradient of the same seed; their mean is the smoothed gradient. (μ is a leaf: a
    # parameter computed in the step is not differentiated in the replay check's no-grad eager run, where
    # spsa samples plainly, so that check refuses such a step)
    # d/dμ E_ε[E cos(3(μ + cε + σ n))] = -3 sin(3μ) e^{-9σ²/2} sin(3c) / (3c)
    mu = torch.nn.Parameter(torch.tensor([0.5], dtype=torch.float64))
    c = 0.1
    step = _step(storch.estimator("spsa", plate="z", n_samples=8, perturbation=c, coupled=False), mu)
    compiled = storch.compile(step, backend=None)
    s = torch.tensor([sigma], dtype=torch.float64)
    grads = []
    for seed in range(300):
        got = []
        for f in (step, compiled):
            torch.manual_seed(seed)
            mu.grad = None
            f(s).backward()
            assert mu.grad is not None
            got.append(mu.grad.clone())
        torch.testing.assert_close(got[1], got[0], rtol=1e-9, atol=1e-12)
        grads.append(got[1])
    exact = -3 * math.sin(1.5) * math.exp(-9 * sigma ** 2 / 2) * math.sin(3 * c) / (3 * c)
    assert_unbiased(torch.cat(grads), torch.tensor(exact, dtype=torch.float64), f"compiled spsa(coupled=False), σ {sigma}")
