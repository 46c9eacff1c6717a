"""Variance claims on the REBAR toy with t = 0.499 (where the gradient signal is tiny)."""

from __future__ import annotations

import pytest
import torch
from torch.distributions import Bernoulli

import storch

from relaxed_problems import TOY_THETA, estimates, score_at_1, toy_model

T = 0.499
N = 20000


def variance(g: torch.Tensor) -> float:
    """Total variance of the gradient estimate (sum over the components)."""
    return float(g.var(0).sum())


def test_disarm_has_lower_variance_than_arm():
    # same seed, same proposal code: both use the same logistic noise (common random numbers)
    out = {}
    for name in ("arm", "disarm"):
        torch.manual_seed(30)
        est = storch.estimator(name, plate="b")
        out[name] = variance(estimates(lambda x: toy_model(est, x, T), TOY_THETA, 1, n=N)[0])
    print(f"t={T}: variance ARM {out['arm']:.4g}, DisARM {out['disarm']:.4g} "
          f"(ratio {out['disarm'] / out['arm']:.3f})")
    assert out["disarm"] < out["arm"]


def test_relax_after_500_updates_beats_plain_score():
    torch.manual_seed(31)
    est = storch.estimator("relax", plate="b", lr=0.03)
    before = variance(estimates(lambda x: toy_model(est, x, T), TOY_THETA, 1, n=N)[0])
    for _ in range(500):
        with storch.Graph():
            _, x = storch.testing.replicate(TOY_THETA, 16)
            toy_model(est, x, T)
            storch.backward()  # runs Relax.update_parameters: one variance-minimising step
    after = variance(estimates(lambda x: toy_model(est, x, T), TOY_THETA, 1, n=N)[0])
    score = variance(score_at_1(TOY_THETA, T, N))
    print(f"t={T}: variance score@1 {score:.4g}; RELAX untrained {before:.4g}, "
          f"after {est.update_steps} control-variate steps {after:.4g}")
    assert est.update_steps == 500
    assert after < score
    assert after < before


class _Residual(torch.nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, u):
        return self.layer(u).squeeze(-1)


@pytest.mark.parametrize("update", [True, False])
@pytest.mark.parametrize("shared", [True, False])
def test_shared_network_layer_keeps_the_model_gradient(shared, update):
    """RELAX's update set φ's .grad to ∂Σĝ²/∂φ, stepped, and set it to None: a layer that a user network=
    shares with the model lost the model's gradient before the user's optimizer could step it. Now the model's
    and the user network's .grad are the surrogate's gradient (as loss.backward() leaves it; storch's own η, λ
    are cleared as before), and φ moves by the same Adam
    step on ∂Σĝ²/∂φ as before (the oracle: loss_graph_values of the same step, stepped by a fresh Adam)."""
    torch.manual_seed(0)
    data = torch.randn(4, 4)
    enc, layer = torch.nn.Linear(4, 3), torch.nn.Linear(7, 1)  # the network's input: z (3) and h (4)
    est = storch.estimator("relax", plate="z", network=_Residual(layer), update=update)

    def step():
        torch.manual_seed(5)
        x = storch.denote_independent(data, 0, "data")
        logits = enc(x) + (layer(torch.cat([x, torch.zeros(3)], -1)) if shared else 0.0)
        z = est(Bernoulli(logits=logits), inputs=x)
        storch.add_cost(((z - 0.45) ** 2).sum(-1), name="c")

    phi = est._trainable()
    params = list({id(p): p for p in [*enc.parameters(), *phi]}.values())
    with storch.Graph() as graph:
        step()
        loss = storch.surrogate_loss()
        reference = torch.autograd.grad(loss, params, retain_graph=True)
        dphi = est.loss_graph_values(loss, est.update_inputs(list(graph.nodes))).grads
    expected = [p.detach().clone().requires_grad_(True) for p in phi]
    if update:
        for p, g in zip(expected, dphi):
            p.grad = g
        torch.optim.Adam(expected, lr=est.lr).step()
    step()
    storch.backward()
    user, own = {id(p) for p in layer.parameters()}, {id(p) for p in phi}
    for p, g in zip(params, reference):
        if update and id(p) in own and id(p) not in user:
            # η, λ (storch's own): their .grad, the surrogate's zero-mean derivative in φ, is cleared after the
            # update as before, so an optimizer over a model holding the estimator does not step them on it
            assert p.grad is None
        else:
            assert p.grad is not None and torch.allclose(p.grad, g, rtol=1e-5, atol=1e-7)
    assert all(torch.allclose(p, q, rtol=1e-6, atol=1e-8) for p, q in zip(phi, expected))
    assert est.update_steps == int(update)
