"""No hard-coded CPU device or dtype: every estimator runs on the `meta` device (shapes and
devices only, no data) and in float64, with a data plate, and its gradient follows the inputs."""

from __future__ import annotations

import pytest
import torch

import storch

from _roster import cost, distribution, installed, options

def _step(name: str, theta: torch.Tensor) -> tuple[torch.Tensor, storch.PlateTensor]:
    est = storch.estimator(name, plate="z", **options(name)).to(theta.device)
    with storch.Graph():
        x = storch.denote_independent(theta.expand(4, 3), 0, "data")
        z = est(distribution(name, x))
        storch.add_cost(cost(name, z), name="c")
        loss = storch.surrogate_loss()
        (g,) = torch.autograd.grad(loss, theta, allow_unused=True)
    return loss, z, g


@pytest.mark.parametrize("name", installed())
def test_meta_device(name):
    theta = torch.zeros(3, device="meta", requires_grad=True)
    loss, z, g = _step(name, theta)
    assert loss.device.type == "meta" and loss.shape == ()
    assert z.tensor.device.type == "meta" and z.plate_names[-1] == "data" and z.tensor.shape[1] == 4
    assert g is not None and g.device.type == "meta" and g.shape == (3,)


@pytest.mark.parametrize("name", installed())
def test_float64(name):
    torch.manual_seed(0)
    theta = torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64, requires_grad=True)
    loss, z, g = _step(name, theta)
    assert loss.dtype == torch.float64 and g.dtype == torch.float64
    assert torch.isfinite(g).all() and g.abs().sum() > 0  # a real gradient reached theta


def _anneal(step: int) -> float:
    return max(0.5, 0.9 ** step)


# the estimators that update state in storch.backward() (has_update), beyond the roster's options
UPDATING = {
    "score-moving_average": ("score", {"n_samples": 2, "baseline": "moving_average"}),
    "score-learned": ("score", {"n_samples": 2, "baseline": "learned", "hidden": 8}),
    "gumbel_softmax-annealed": ("gumbel_softmax", {"n_samples": 2, "temperature": _anneal}),
    "gumbel_straight_through-annealed": ("gumbel_straight_through", {"n_samples": 2, "temperature": _anneal}),
}


def _backward_cases() -> list:
    cases = [pytest.param(name, options(name), id=name) for name in installed()]
    names = storch.available_estimators()
    return cases + [pytest.param(name, opts, id=case) for case, (name, opts) in UPDATING.items() if name in names]


@pytest.mark.parametrize("name,opts", _backward_cases())
def test_meta_device_backward(name, opts):
    """storch.backward() (the training route, which runs the estimators' updates) on the meta device: NVIL's,
    RELAX's, REBAR's and LAX's updates read whether their loss was finite (`bool(...)`, a `.item()` that meta
    tensors refuse) and failed there."""
    theta = torch.zeros(3, device="meta", requires_grad=True)
    est = storch.estimator(name, plate="z", **opts).to("meta")
    with storch.Graph():
        x = storch.denote_independent(theta.expand(4, 3), 0, "data")
        z = est(distribution(name, x))
        storch.add_cost(cost(name, z), name="c")
        storch.backward()
    assert theta.grad is not None and theta.grad.device.type == "meta" and theta.grad.shape == (3,)
    assert all(p.device.type == "meta" for p in est.parameters())
    if name in ("lax", "relax", "rebar") or opts.get("baseline") == "learned":  # an Adam step on shapes
        assert est.update_steps == 1 and est.skipped_updates == 0
