"""A gradient hook on a cost (docs/plates.md, register_hook): DiCE's semantics."""

from __future__ import annotations

import torch
from torch.distributions import Bernoulli

import storch


def test_a_hook_on_a_cost_scales_its_pathwise_gradient_not_its_score_term():
    """What docs/plates.md says (DiCE's semantics): ``cost.register_hook(lambda g: 2 * g)`` doubles the gradient
    that flows through the cost's graph (to w), not the score-function term (the cost's value times the gradient
    of log p, to θ). Same seed, same samples: θ's gradient is unchanged, w's doubled."""
    theta = torch.tensor([0.3], requires_grad=True)
    w = torch.tensor([1.5], requires_grad=True)
    grads = []
    for hook in (None, lambda g: 2 * g):
        torch.manual_seed(0)
        theta.grad = w.grad = None
        with storch.Graph():
            z = storch.estimator("score", plate="z", n_samples=4)(Bernoulli(logits=theta))
            cost = (w * (z + 1)).sum()
            if hook is not None:
                cost.register_hook(hook)
            storch.add_cost(cost, name="c")
            storch.backward()
        grads.append((theta.grad.clone(), w.grad.clone()))
    assert grads[0][0].abs().item() > 0 and grads[0][1].abs().item() > 0
    torch.testing.assert_close(grads[1][0], grads[0][0])
    torch.testing.assert_close(grads[1][1], 2 * grads[0][1])
