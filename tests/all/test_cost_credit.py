"""storch.add_cost(loss, credit=False): a loss that gives no credit to the samples it depends on.

Found by porting actor-critic: the critic's regression loss on the returns, added as a cost, also sent
score-function gradient to the policy (correct for the sum of the costs, not what a critic loss is for),
and backpropagating it separately needed `.tensor` and ignored the plates' weights.
"""

from __future__ import annotations

import pytest
import torch
from torch.distributions import Categorical

import storch


def _episode(est, theta, value, critic):
    s = torch.tensor(0)
    for t in range(3):
        a = est(Categorical(logits=theta[s]))
        storch.add_cost(-(a == 1).float() * (t + 1), name="reward")
        s = (s + a).clamp(0, 2)
    if critic is not None:
        storch.add_cost((value[s] - 2.0) ** 2, name="critic", credit=critic)
    return s


@pytest.mark.parametrize("name,options", [("score", {"n_samples": 4, "baseline": "moving_average"}),
                                          ("unordered_set", {"n_samples": 3})])
def test_a_loss_without_credit_leaves_the_policy_gradient_alone(name, options):
    theta = torch.zeros(3, 2, requires_grad=True)
    value = torch.tensor([0.0, 1.0, 3.0], requires_grad=True)  # a cost that varies with the final state
    grads, critic_grads, averages = [], [], []
    for critic in (None, False, True):
        theta.grad = value.grad = None
        torch.manual_seed(1)
        est = storch.estimator(name, plate="a", **options)
        with storch.Graph():
            s = _episode(est, theta, value, critic)
            estimates = storch.cost_estimates()
            if critic is False:
                node = storch.current_graph().nodes[0]
                w = node.weight_values.detach() if not est.uniform_weights else torch.full((node.n,), 1.0 / node.n)
                w = w.reshape(s.tensor.shape)
                # the critic's gradient by hand: d/dV Σ_j w_j (V[s_j] - 2)² (the weights, not differentiated)
                want = torch.zeros(3).index_add(0, s.tensor, 2 * w * (value.detach()[s.tensor] - 2.0))
                assert "critic" in estimates
            storch.backward()
        grads.append(theta.grad.clone())
        critic_grads.append(None if value.grad is None else value.grad.clone())
        averages.append(dict(getattr(est, "moving_averages", {})))
        if critic is False:
            assert torch.allclose(value.grad, want)
    assert torch.equal(grads[0], grads[1])  # no credit: the policy gradient is the one without the loss
    assert not torch.equal(grads[0], grads[2])  # an ordinary cost sends score-function gradient too
    assert torch.equal(critic_grads[1], critic_grads[2])
    assert averages[0].keys() == averages[1].keys()  # no estimator state for a loss without credit


def test_credit_must_be_a_bool():
    with storch.Graph():
        with pytest.raises(storch.CostError, match="credit must be True or False"):
            storch.add_cost(torch.ones(()), credit="no")
