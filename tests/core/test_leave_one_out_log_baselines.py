"""storch.extending.leave_one_out_log_baselines: VIMCO's per-draw baselines of a multi-sample bound (Mnih & Rezende,
2016, Eq. 9-10), public so that a third party's multi-sample estimator (docs/writing-an-estimator.md, section 1d)
need not write its own. Checked against an explicit loop over the sets and the draws."""

from __future__ import annotations

import math

import pytest
import torch

from storch.extending import leave_one_out_log_baselines


def _loop(log_w: torch.Tensor) -> torch.Tensor:
    """b_k of each set (last dim) one draw at a time: log w_k replaced by the mean of the other log-weights (-inf
    where one of them is -inf: a geometric mean of weights with a zero), b_k = -(logsumexp - log K); 0 where b_k is
    not finite or another draw holds +inf / NaN."""
    flat = log_w.reshape(-1, log_w.shape[-1]).tolist()
    out = []
    for row in flat:
        k = len(row)
        b = []
        for i in range(k):
            others = [row[j] for j in range(k) if j != i]
            mean = -math.inf if -math.inf in others else sum(x for x in others if math.isfinite(x)) / (k - 1)
            replaced = [mean if j == i else row[j] for j in range(k)]
            top = max(replaced)
            if math.isnan(top) or top == -math.inf or top == math.inf:
                value = math.nan
            else:
                value = -(top + math.log(sum(math.exp(x - top) for x in replaced)) - math.log(k))
            bad_other = any(math.isnan(x) or x == math.inf for x in others)
            b.append(value if math.isfinite(value) and not bad_other else 0.0)
        out.append(b)
    return torch.tensor(out, dtype=torch.float64).reshape(log_w.shape)


def test_leave_one_out_log_baselines_equal_an_explicit_loop():
    gen = torch.Generator().manual_seed(0)
    for seed in range(40):
        k = int(torch.randint(2, 12, (), generator=gen))
        log_w = torch.randn(3, k, generator=gen, dtype=torch.float64) * float(torch.rand((), generator=gen) * 30) - 20
        log_w[torch.rand(log_w.shape, generator=gen) < 0.15 * (seed % 3)] = -math.inf  # impossible draws
        if seed % 4 == 0:
            log_w[:, 0] += 150.0  # a draw far above the others
        torch.testing.assert_close(leave_one_out_log_baselines(log_w), _loop(log_w), rtol=1e-12, atol=1e-12)
    for row in ([0.0, -1.0, -2.0], [math.inf, 1.0, 2.0], [math.nan, 1.0, 2.0], [-math.inf, 5.0, -math.inf],
                [-math.inf] * 3, [0.0, -math.inf]):
        log_w = torch.tensor(row, dtype=torch.float64)
        torch.testing.assert_close(leave_one_out_log_baselines(log_w), _loop(log_w), rtol=1e-12, atol=0)


def test_leave_one_out_log_baselines_along_another_dim():
    log_w = torch.randn(4, 5, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = leave_one_out_log_baselines(log_w, dim=1)
    assert got.shape == log_w.shape
    torch.testing.assert_close(got, _loop(log_w.movedim(1, -1)).movedim(-1, 1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(leave_one_out_log_baselines(log_w, dim=-1), _loop(log_w), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape,dim", [((3, 1), -1), ((), -1), ((1, 4), 0)])
def test_leave_one_out_log_baselines_need_two_draws(shape, dim):
    with pytest.raises(ValueError, match=r"needs K >= 2 draws along dim"):
        leave_one_out_log_baselines(torch.zeros(shape), dim)


def test_leave_one_out_log_baselines_carry_no_gradient():
    """Log-weights with their gradient (a third party's estimator that did not detach them) give baselines without
    one: (1 - MagicBox(l)) b with b's gradient adds -2 ∇l ∇b to the order-2 estimate; with b detached,
    d²/dθ² (1 - exp(θ - ⊥θ)) b = -b."""
    theta = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    log_w = torch.stack([3 * theta, torch.tensor(-1.0, dtype=torch.float64), 2 * theta])
    b = leave_one_out_log_baselines(log_w)
    assert not b.requires_grad
    assert torch.equal(b, leave_one_out_log_baselines(log_w.detach()))
    cv = (1 - torch.exp(theta - theta.detach())) * b[1]  # (b[1]: draw 1's baseline, a function of 3θ and 2θ)
    g, = torch.autograd.grad(cv, theta, create_graph=True)
    h, = torch.autograd.grad(g, theta)
    assert h.item() == pytest.approx(-b[1].item(), rel=1e-12)


@pytest.mark.parametrize("log_w, dim, what", [
    (torch.zeros(2, 3), 2, "dim=2"), (torch.zeros(2, 3), -3, "dim=-3"), (torch.tensor([1, 2, 3]), -1, "torch.int64")])
def test_leave_one_out_log_baselines_refuse_a_dim_out_of_range_or_integer_weights(log_w, dim, what):
    with pytest.raises(ValueError, match="floating-point log-weights") as info:
        leave_one_out_log_baselines(log_w, dim=dim)
    assert what in str(info.value) and "log_w.float()" in str(info.value)
