"""``model.requires_grad_(False)`` on a parent module that holds a LAX / RELAX estimator, and the default network
built at the estimator's first node. torch's ``Module.requires_grad_`` loops over the parameters that exist when it
is called: it froze RELAX's η and λ, and storch built the network trainable and trained it (4 of 6 parameters with
requires_grad=True, update_steps 1 after one step). The network now follows η and λ when it is built; an explicit
``est.network.requires_grad_(True)`` still trains it alone. LAX has no parameter before its network, so nothing to
follow: the two ways that freeze it (docs/reliability.md) are freezing the estimator itself and freezing the parent
after the first step (``test_relaxed_frozen_before_build.py`` covers the estimator's own call)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.distributions import Bernoulli, Normal

import storch


class _Model(torch.nn.Module):
    def __init__(self, name: str) -> None:
        super().__init__()
        self.encoder = torch.nn.Linear(1, 3)  # trained apart (fine-tuning)
        self.est = storch.estimator(name, plate="x")
        self.dist = Normal if name == "lax" else Bernoulli

    def step(self) -> None:
        theta = self.encoder(torch.ones(1)).detach().requires_grad_()
        with storch.Graph():
            z = self.est(Normal(theta, 1.0) if self.dist is Normal else Bernoulli(logits=theta))
            storch.add_cost(((z - 0.4) ** 2).sum(), name="c")
            storch.backward()


def _values(module) -> dict:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def _trainable(module) -> list:
    return [n for n, p in module.named_parameters() if p.requires_grad]


def test_relax_network_built_under_a_parent_frozen_before_the_first_step_is_frozen():
    torch.manual_seed(0)
    model = _Model("relax").requires_grad_(False)
    with pytest.warns(RuntimeWarning, match="was built frozen"):  # (as η and λ: said, as their freeze may be on purpose)
        model.step()
    assert any(n.startswith("est.network.net.") for n, _ in model.named_parameters())  # built at the first node
    assert _trainable(model) == []
    before = _values(model)
    model.step()
    assert model.est.update_steps == 0
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


def test_relax_network_built_while_loading_into_a_frozen_parent_is_frozen():
    torch.manual_seed(0)
    trained = _Model("relax")
    trained.step()
    frozen = _Model("relax").requires_grad_(False)
    frozen.load_state_dict(trained.state_dict())
    assert _trainable(frozen) == []


def test_relax_network_asked_trainable_trains_alone_with_eta_and_lambda_frozen():
    torch.manual_seed(0)
    model = _Model("relax")
    model.est.eta.requires_grad_(False)
    model.est.log_temperature.requires_grad_(False)
    model.est.network.requires_grad_(True)
    model.step()
    assert _trainable(model.est) == ["network.net.0.weight", "network.net.0.bias", "network.net.2.weight",
                                     "network.net.2.bias"]
    before = _values(model.est)
    model.step()
    assert model.est.update_steps == 2
    assert torch.equal(before["eta"], model.est.eta)
    assert not torch.equal(before["network.net.2.weight"], model.est.network.net[2].weight)


@pytest.mark.parametrize("name", ["lax", "relax"])
def test_a_parent_unfrozen_before_the_first_step_trains_the_network(name):
    torch.manual_seed(0)
    model = _Model(name).requires_grad_(False).requires_grad_(True)
    model.step()
    assert model.est.update_steps == 1
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("name", ["lax", "relax"])
@pytest.mark.parametrize("how", ["estimator", "parent_after_first_step"])
def test_the_documented_ways_freeze_the_network_built_at_the_first_step(name, how):
    torch.manual_seed(0)
    model = _Model(name)
    if how == "estimator":
        model.requires_grad_(False)
        model.est.requires_grad_(False)  # reaches the layers not built yet
    model.step()
    if how == "parent_after_first_step":
        model.requires_grad_(False)  # the layers exist now
    assert any(n.startswith("est.network.net.") for n, _ in model.named_parameters())
    steps = model.est.update_steps
    before = _values(model)
    model.step()
    assert _trainable(model) == []
    assert model.est.update_steps == steps
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


def test_relax_network_frozen_by_following_eta_and_lambda_says_so():
    """η and λ frozen on purpose (a fixed REBAR part, the residual learned alone) look like a parent's freeze: the
    network was built frozen and never trained, in silence. The build now warns, naming the request that trains it;
    an explicit request either way (the documented est.requires_grad_(False)) is not warned about."""
    torch.manual_seed(0)
    model = _Model("relax")
    model.est.eta.requires_grad_(False)
    model.est.log_temperature.requires_grad_(False)
    with pytest.warns(RuntimeWarning, match=r"was built frozen.*est\.network\.requires_grad_\(True\)"):
        model.step()
    assert _trainable(model.est) == []
    for explicit in (False, True):
        model = _Model("relax")
        model.est.eta.requires_grad_(False)
        model.est.log_temperature.requires_grad_(False)
        if explicit:
            model.est.network.requires_grad_(True)
        else:
            model.est.requires_grad_(False)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            model.step()


def test_relax_network_first_built_in_a_no_grad_pass_warns_at_its_first_training_step():
    """η and λ frozen on purpose, and the layers first built in a no_grad validation pass: they were built frozen
    with no warning and stayed frozen in training with none either. The warning now comes at the first training step
    (once), pointing at the user's file."""
    torch.manual_seed(0)
    model = _Model("relax")
    model.est.eta.requires_grad_(False)
    model.est.log_temperature.requires_grad_(False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad(), storch.Graph():
            z = model.est(Bernoulli(logits=model.encoder(torch.ones(1))))
            storch.add_cost(((z - 0.4) ** 2).sum(), name="c")
            storch.surrogate_loss()
        assert not [w for w in caught if "was built frozen" in str(w.message)]  # none in validation
        model.step()
        model.step()
    ours = [w for w in caught if "was built frozen" in str(w.message)]
    assert _trainable(model.est) == []
    assert len(ours) == 1 and ours[0].filename == __file__, [(str(w.message)[:60], w.filename) for w in ours]
