"""A checkpoint of REBAR's state (η, λ, their Adam moments) is refused by RELAX, and LAX's by RELAX with a network
control variate, whose keys it matches (found by porting: rebar's state loaded into relax with strict=True, which
then trained on it). The refusal comes before torch copies η and λ; a checkpoint without the record of who saved
it (from before it was written) loads as it did."""

from __future__ import annotations

import pytest
import torch
from torch.distributions import Bernoulli

import storch


def _trained(name: str, **options) -> storch.Estimator:
    est = storch.estimator(name, plate="z", n_samples=2, **options)
    theta = torch.zeros(3, requires_grad=True)
    torch.manual_seed(0)
    for _ in range(3):
        with storch.Graph():
            z = est(Bernoulli(logits=theta))
            storch.add_cost(((z - 0.3) ** 2).sum(), name="c")
            storch.backward()
    return est


def test_rebar_state_is_refused_by_relax_before_eta_and_lambda_are_copied():
    rebar = _trained("rebar")
    saved = rebar.state_dict()
    assert rebar.update_steps == 3 and saved["_extra_state"]["optimizer"] is not None
    relax = storch.estimator("relax", plate="z", n_samples=2)
    eta, log_t = relax.eta.detach().clone(), relax.log_temperature.detach().clone()
    assert not torch.equal(eta, rebar.eta.detach())  # (trained: a copy would show)
    for strict in (True, False):
        with pytest.raises(storch.OptionError) as info:
            relax.load_state_dict(saved, strict=strict)
        assert "saved by another estimator: saved by 'rebar'; this estimator is 'relax' " \
               "(control_variate='rebar+network')" in str(info.value)
    assert torch.equal(relax.eta.detach(), eta) and torch.equal(relax.log_temperature.detach(), log_t)
    assert relax.update_steps == 0 and relax._optimizer is None


def test_lax_state_is_refused_by_relax_with_the_keys_it_matches():
    lax_state = storch.estimator("lax", plate="z", n_samples=2).state_dict()
    relax = storch.estimator("relax", plate="z", n_samples=2, control_variate="network")
    assert set(relax.state_dict()) == set(lax_state)  # (torch's key check passes)
    with pytest.raises(storch.OptionError, match="saved by 'lax'; this estimator is 'relax'"):
        relax.load_state_dict(lax_state)
    other = storch.estimator("relax", plate="z", n_samples=2).state_dict()
    with pytest.raises(storch.OptionError, match=r"control_variate differs"):
        relax.load_state_dict(other, strict=False)


def test_the_same_estimator_loads_and_a_checkpoint_without_the_record_loads_as_before():
    rebar = _trained("rebar")
    saved = rebar.state_dict()
    assert saved["_extra_state"]["saved_by"] == {"estimator": "rebar"}
    fresh = storch.estimator("rebar", plate="z", n_samples=2, lr=0.5)  # lr: not what the state means
    fresh.load_state_dict(saved)
    assert torch.equal(fresh.eta.detach(), rebar.eta.detach()) and fresh.update_steps == 3
    # before the record (backward compatible): loads, into relax too, as it did
    old = dict(saved)
    old["_extra_state"] = {k: v for k, v in saved["_extra_state"].items() if k != "saved_by"}
    storch.estimator("rebar", plate="z", n_samples=2).load_state_dict(old)
    relax = storch.estimator("relax", plate="z", n_samples=2)
    relax.load_state_dict(old)
    assert torch.equal(relax.eta.detach(), rebar.eta.detach())


@pytest.mark.parametrize("name", ["rebar", "relax"])
def test_a_checkpoint_loads_into_the_other_plain_direct_gradient_form(name):
    """plain_direct_gradient is not in state_options(): η, λ (and ρ) and their Adam moments mean the same in both
    forms (c = η f(σ_λ(z)) [+ r_ρ]; the option changes the plate's blocks and the direct-path part only), so a run
    may resume in the other form and train on."""
    trained = _trained(name)
    other = storch.estimator(name, plate="z", n_samples=2, plain_direct_gradient=True)
    other.load_state_dict(trained.state_dict())
    assert torch.equal(other.eta.detach(), trained.eta.detach()) and other.update_steps == 3
    theta = torch.zeros(3, requires_grad=True)
    with storch.Graph():
        z = other(Bernoulli(logits=theta))
        storch.add_cost(((z - 0.3) ** 2).sum(), name="c")
        storch.backward()
    assert other.update_steps == 4
