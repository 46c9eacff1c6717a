"""Every estimator on a CUDA device (skipped where CUDA is not available): samples, costs, the
surrogate and the gradient stay on the device, and the estimator's own parameters and state
(moved with `.to(device)`) work there."""

from __future__ import annotations

import pytest
import torch

import storch

from _roster import cost, distribution, installed, options

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")


@pytest.mark.parametrize("name", installed())
def test_estimator_on_cuda(name):
    torch.manual_seed(0)
    device = torch.device("cuda")
    theta = torch.tensor([0.3, -0.2, 0.5], device=device, requires_grad=True)
    est = storch.estimator(name, plate="z", **options(name)).to(device)
    for _ in range(3):  # several steps: learned parts and moving averages update on the device
        with storch.Graph():
            x = storch.denote_independent(theta.expand(4, 3), 0, "data")
            z = est(distribution(name, x))
            assert z.tensor.device.type == "cuda"
            storch.add_cost(cost(name, z), name="c")
            theta.grad = None
            value = storch.backward()
    assert value.device.type == "cuda" and theta.grad.device.type == "cuda"
    assert torch.isfinite(theta.grad).all()
    for t in est.state_dict().values():
        if isinstance(t, torch.Tensor):
            assert t.device.type == "cuda"


def test_moving_average_baseline_on_cuda():
    device = torch.device("cuda")
    theta = torch.zeros(3, device=device, requires_grad=True)
    est = storch.estimator("score", plate="z", n_samples=2, baseline="moving_average") \
        if "score" in storch.available_estimators() else pytest.skip("score not installed")
    for _ in range(3):
        z = est(distribution("score", theta))
        storch.add_cost(cost("score", z), name="c")
        storch.backward()
    assert all(v.device.type == "cuda" for v in est.moving_averages.values())


def test_gru_with_a_plain_state_on_cuda():
    """A per-sample GRU whose input varies per sample and whose initial state does not: the plates
    are folded into the state's batch dim (dim 1), which cuDNN needs contiguous ("hx is not
    contiguous" before the fold made it so); the result equals a per-sample loop."""
    torch.manual_seed(0)
    device = torch.device("cuda")
    gru = torch.nn.GRU(4, 6).to(device)
    x = torch.randn(5, 3, 1, 4, device=device)  # (samples, T, N, F)
    h0 = torch.randn(1, 1, 6, device=device)
    with storch.Graph():
        xs = storch.denote_independent(x, 0, "z")
        out, h = gru(xs, h0)
        assert out.tensor.shape == (5, 3, 1, 6) and h.tensor.shape == (5, 1, 1, 6)
        for i in range(5):
            o_i, h_i = gru(x[i], h0)
            torch.testing.assert_close(out.tensor[i], o_i)
            torch.testing.assert_close(h.tensor[i], h_i)
