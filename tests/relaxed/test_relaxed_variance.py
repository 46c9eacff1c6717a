"""Variance claims on the REBAR toy with t = 0.499 (where the gradient signal is tiny), and on LAX's Normal toy."""

from __future__ import annotations

import pytest
import torch
from torch.distributions import Bernoulli, Normal

import storch
from storch.testing import assert_unbiased, replicate

from relaxed_problems import (
    SCALE_THETA, TOY_THETA, estimates, exact_derivatives, normal_scale_exact, normal_scale_model, score_at_1, toy_model,
)

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


def test_lax_training_lowers_the_variance_and_stays_unbiased():
    """LAX's score term was -MagicBox(l) c_φ(x).detach(): ĝ's -c_φ(x) ∇l term was cut from φ, so the update
    descended only the pathwise term's part of ∂/∂φ Σ ĝ², and the variance grew with training (2.2 untrained,
    482 after these 200 steps). The score term is now c_φ(⊥x): the update descends ∂/∂φ Σ ĝ² of the LAX
    estimate (next test), the variance falls (to 0.2), and the trained estimator stays unbiased (z-test
    against the closed form)."""
    torch.manual_seed(32)
    est = storch.estimator("lax", plate="y", n_samples=2)
    model = lambda x: normal_scale_model(est, x)  # noqa: E731
    before = estimates(model, SCALE_THETA, 1)[0]
    for _ in range(200):
        with storch.Graph():
            _, x = replicate(SCALE_THETA, 16)
            model(x)
            storch.backward()  # one Adam step on ∂/∂φ Σ ĝ² over the 16 replicates
    after = estimates(model, SCALE_THETA, 1)[0]
    print(f"LAX Normal toy: variance untrained {variance(before):.4g}, after {est.update_steps} steps "
          f"{variance(after):.4g}")
    assert est.update_steps == 200 and est.skipped_updates == 0
    assert variance(after) < 0.5 * variance(before)
    assert_unbiased(after, exact_derivatives(normal_scale_exact, SCALE_THETA, 1)[0], "lax trained")


def test_lax_update_differentiates_the_whole_estimate():
    """The update's ∂/∂φ Σ ĝ² against LAX written by hand on the same draws and network:
    ĝ = mean_i (f(x_i) - c_φ(x_i)) ∇log p(x_i) + ∇c_φ(x_i), x_i = μ + σ ε_i, ĝ over (μ, σ) (old code: ĝ
    equal, its φ-gradient not: the -c_φ(x) ∇l term was detached from φ)."""
    torch.manual_seed(33)
    est = storch.estimator("lax", plate="y", n_samples=2)
    for _ in range(3):  # a network away from its initialisation
        normal_scale_model(est, SCALE_THETA.clone().requires_grad_(True))
        storch.backward()
    theta = SCALE_THETA.clone().requires_grad_(True)
    with storch.Graph() as graph:
        normal_scale_model(est, theta)
        loss = storch.surrogate_loss()
        node = graph.nodes[0]
        got = est.loss_graph_values(loss, est.update_inputs([node])).grads
        x = node.state.z.detach()
    mu, sigma = theta[0].detach().requires_grad_(True), theta[1].exp().detach().requires_grad_(True)
    c = est.network(((x - mu.detach()) / sigma.detach() * sigma + mu).unsqueeze(-1)).squeeze(-1)
    log_p = Normal(mu, sigma).log_prob(x)
    g_hat = 0
    for i in range(2):
        score = torch.autograd.grad(log_p[i], (mu, sigma), create_graph=True)
        path = torch.autograd.grad(c[i], (mu, sigma), create_graph=True)
        g_hat = g_hat + torch.stack([(0.5 * (x[i] - 0.5) ** 2 - c[i]) * s + p for s, p in zip(score, path)]) / 2
    want = torch.autograd.grad((g_hat ** 2).sum(), est._trainable())
    for g, w in zip(got, want):
        assert torch.allclose(g, w, rtol=1e-9, atol=1e-12)


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


def test_a_hook_upstream_of_a_variance_trained_node_runs_in_the_loss_pass_then_the_variance_pass():
    """What docs/plates.md says of ``register_hook`` upstream of relax/rebar (found by review): the hook runs twice
    per storch.backward(), first in the loss's backward pass (gradients disabled), then in the control variate's
    variance-training pass (create_graph: gradients enabled), with the same gradient; a node without a variance pass (disarm), once."""
    data = torch.randn(2, 4, generator=torch.Generator().manual_seed(0))
    for name, passes in (("relax", [False, True]), ("rebar", [False, True]), ("disarm", [False])):
        torch.manual_seed(0)
        enc, dec = torch.nn.Linear(4, 3), torch.nn.Linear(3, 4)
        est = storch.estimator(name, plate="z", n_samples=3)
        calls = []
        x = storch.denote_independent(data, 0, "data")
        logits = enc(x)
        logits.register_hook(lambda g: calls.append((torch.is_grad_enabled(), g.tensor.detach().clone())))
        z = est(Bernoulli(logits=logits))
        storch.add_cost(((dec(z) - x) ** 2).sum(), name="rec")
        storch.backward()
        assert [c[0] for c in calls] == passes, name
        assert all(torch.equal(c[1], calls[0][1]) for c in calls)
