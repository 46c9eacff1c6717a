"""The iterated prisoner's dilemma of ``storch_bench.ipd`` / ``examples/lola``: the exact returns,
storch's DiCE surrogate against the hand-written one on the same samples, the second-order
estimate LOLA uses against the exact one, and a smoke run of ``storch-compare ipd``."""

import csv

import pytest
import torch

from storch.testing import assert_unbiased
from storch_bench.cli import main
from storch_bench.ipd import StorchDice, TorchDice, exact_returns, torch_rollout
from storch_bench.lola import exact_mixed_hessian

THETA = torch.tensor([[0.3, -0.2, 0.5, -0.7, 0.1], [-0.4, 0.6, 0.2, 0.0, -0.3]])


def test_exact_returns_match_monte_carlo():
    torch.manual_seed(0)
    steps, batch = 10, 20000
    _, rewards, _ = torch_rollout(THETA, batch, steps)
    returns = (rewards * 0.96 ** torch.arange(steps).unsqueeze(-1)).sum(1).double()  # (batch, 2)
    assert_unbiased(returns, exact_returns(THETA.double(), steps), "discounted returns")


def _derivatives(loss, theta):
    (g,) = torch.autograd.grad(loss, theta, create_graph=True)
    h = torch.stack([torch.autograd.grad(g[0, k], theta, retain_graph=True)[0] for k in range(5)])
    return g.detach(), h


@pytest.mark.parametrize("baseline", ["none", "leave_one_out"])
def test_storch_surrogate_equals_hand_written_dice(baseline):
    """Same samples: storch's gradient and Hessian rows equal the hand-written DiCE ones."""
    theta = THETA.clone().requires_grad_(True)
    storch_dice = StorchDice(batch=16, steps=12, baseline=baseline)
    by_hand = TorchDice(batch=16, steps=12, baseline=baseline)
    torch.manual_seed(1)
    gs, hs = _derivatives(storch_dice(theta, 1, order=2), theta)
    actions = torch.stack(storch_dice.last_actions, 1)
    gt, ht = _derivatives(by_hand(theta, 1, order=2, actions=actions), theta)
    torch.testing.assert_close(gs, gt, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(hs, ht, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("baseline", ["none", "leave_one_out"])
def test_lola_second_order_estimate_is_unbiased(baseline):
    """The block ∂²J_1/∂θ_1∂θ_2 through which a LOLA agent differentiates the other's step."""
    torch.manual_seed(2)
    steps, v = 4, torch.tensor([1.0, -0.5, 2.0, 0.3, -1.2])
    objective = StorchDice(batch=8, steps=steps, baseline=baseline)
    theta = THETA.clone().requires_grad_(True)
    estimates = []
    for _ in range(300):  # v^T ∂²J_1/∂θ_1∂θ_2: one backward pass per estimate
        (g,) = torch.autograd.grad(objective(theta, 0, order=2), theta, create_graph=True)
        estimates.append(torch.autograd.grad(g[0] @ v, theta)[0][1])
    exact = v.double() @ exact_mixed_hessian(THETA, steps)
    assert_unbiased(torch.stack(estimates).double(), exact, f"mixed Hessian-vector product ({baseline})")


def test_storch_compare_ipd_smoke(tmp_path):
    out = tmp_path / "ipd"
    assert main(["ipd", "--iterations", "2", "--steps", "5", "--batch", "8", "--variance-reps", "3",
                 "--implementations", "storch,torch", "--no-progress", "--out", str(out)]) == 0
    rows = list(csv.DictReader(open(out / "ipd.csv")))
    assert {(r["learners"], r["implementation"]) for r in rows} == {
        (c, i) for c in ("LOLA-DiCE", "LOLA-DiCE + baseline", "naive") for i in ("storch", "torch")}
    assert all(-3.0 <= float(r["mean"]) <= 0.0 for r in rows)
    assert (out / "ipd.png").stat().st_size > 0 and "variance" in (out / "ipd.md").read_text()
