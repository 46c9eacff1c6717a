"""unordered_set's baseline b(s) = Σ_s' A[s, s'] f(s') under a float64 cost with a large common offset and a float32
model (review r-twenty-two): A, computed from the float32 log-probabilities, carries ~1e-7 of rounding, and summed as
written it moved b by ~10 under a cost of 1e8 (z ~ 20 against enumeration). Σ_s' A[s, s'] = 1, so b is computed as
r + Σ_s' A[s, s'] (f(s') - r) with r the set's mean cost: the offset cancels exactly. Seeded; z-tests against
enumeration, and the same draws give the same gradient with and without the offset."""

from __future__ import annotations

import math

import torch
from torch.distributions import Categorical

import storch

_THETA = (0.3, -0.2, 0.5, 0.1, -0.4)
_C = torch.tensor([1.0, -2.0, 0.5, 3.0, 0.0], dtype=torch.float64)


def _gradients(offset: float, reps: int, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    theta = torch.tensor(_THETA, dtype=torch.float32, requires_grad=True)  # a float32 model
    est = storch.estimator("unordered_set", plate="s", n_samples=3)
    gs = []
    for _ in range(reps):
        with storch.Graph():
            x = est(Categorical(logits=theta))
            storch.add_cost(offset + _C[x], name="c")
            gs.append(torch.autograd.grad(storch.surrogate_loss(), theta)[0].double())
    return torch.stack(gs)


def test_a_common_offset_of_a_float64_cost_cancels_in_the_baseline():
    torch.set_num_threads(1)
    plain, offset = _gradients(0.0, 40, 1), _gradients(1e8, 40, 1)
    assert torch.allclose(plain, offset, rtol=0, atol=1e-5), (plain - offset).abs().max()
    g = _gradients(1e8, 600, 2)
    theta = torch.tensor(_THETA, dtype=torch.float64)
    exact = torch.autograd.functional.jacobian(lambda t: (torch.softmax(t, 0) * _C).sum(), theta)
    z = (g.mean(0) - exact) / (g.std(0) / math.sqrt(len(g)))
    assert z.abs().max() < 4, (g.mean(0), exact, z)
