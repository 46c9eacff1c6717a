"""Options set on a constructed estimator (``est.<option> = v``): taken as the constructor takes them (checked), or
refused with an OptionError that says to create a new estimator where the option is read only at construction."""

import pytest
import torch
from torch.distributions import Bernoulli

import storch


def _grad(est, seed):
    theta = torch.tensor([0.3, -0.4, 0.8], requires_grad=True)
    torch.manual_seed(seed)
    with storch.Graph():
        z = est(Bernoulli(logits=theta))
        storch.add_cost(((z - 0.45) ** 2).sum(-1), name="f")
        loss = storch.surrogate_loss()
    return torch.autograd.grad(loss, theta)[0]


def test_a_baseline_set_after_construction_is_refused_not_ignored():
    # found by porting: est.baseline = "leave_one_out" was accepted and ignored (the no-baseline gradient exactly),
    # and est.baseline = "none" on a leave_one_out estimator shadowed the method ('str' object is not callable)
    est = storch.estimator("score", plate="z", n_samples=2)
    with pytest.raises(storch.OptionError, match=r"est\.baseline = 'leave_one_out' after construction.*"
                                                 r"storch\.estimator\('score', plate='z', \.\.\., baseline="):
        setattr(est, "baseline", "leave_one_out")
    loo = storch.estimator("score", plate="z", n_samples=2, baseline="leave_one_out")
    with pytest.raises(storch.OptionError, match="moving averages and network are not carried over"):
        setattr(loo, "baseline", "none")
    assert loo.baseline_kind == "leave_one_out" and callable(loo.baseline)
    _grad(loo, 0)  # still works


@pytest.mark.parametrize("name, kwargs, option, value", [
    ("score", {}, "hidden", 8), ("score", {}, "update", False),
    ("unordered_set", {"n_samples": 2}, "baseline", False),
    ("sum_and_sample", {"n_samples": 2}, "baseline", "leave_one_out"),
    ("sum_and_sample", {"buffer": 2}, "buffer", 3),
    ("importance", {"proposal": torch.distributions.Normal(0.0, 1.0)}, "proposal", torch.distributions.Normal(0.0, 2.0)),
    ("relax", {}, "control_variate", "network"), ("relax", {}, "temperature", 0.1), ("rebar", {}, "eta", 0.5),
    ("lax", {}, "network", None),
])
def test_options_fixed_at_construction_are_refused(name, kwargs, option, value):
    est = storch.estimator(name, plate="z", **kwargs)
    with pytest.raises(storch.OptionError, match=f"est.{option} = .* after construction is not supported"):
        setattr(est, option, value)


@pytest.mark.parametrize("name, kwargs, option, bad", [
    ("score", {"baseline": "moving_average"}, "decay", 1.5), ("score", {}, "lr", -1.0),
    ("score", {"n_samples": 2, "baseline": "leave_one_out"}, "n_samples", 1), ("score", {}, "n_samples", 0),
    ("unordered_set", {"n_samples": 2}, "n_samples", 1), ("unordered_set", {}, "budget", 0),
    ("vimco", {}, "n_draws", 1), ("spsa", {}, "perturbation", -0.1), ("mvd", {}, "coupled", 2),
    ("expect", {}, "budget", 0), ("lax", {}, "lr", 0.0),
])
def test_options_set_after_construction_are_checked_as_the_constructor_checks_them(name, kwargs, option, bad):
    est = storch.estimator(name, plate="z", **kwargs)
    with pytest.raises(storch.OptionError):
        storch.estimator(name, plate="z", **{**kwargs, option: bad})
    before = getattr(est, option)
    with pytest.raises(storch.OptionError):
        setattr(est, option, bad)
    assert getattr(est, option) == before


def test_decay_and_lr_set_after_construction_work_as_given_to_the_constructor():
    # decay: the moving average after two updates equals the one of an estimator made with that decay
    made = storch.estimator("score", plate="z", n_samples=2, baseline="moving_average", decay=0.5)
    set_ = storch.estimator("score", plate="z", n_samples=2, baseline="moving_average")
    set_.decay = 0.5
    for est in (made, set_):
        for seed in range(2):
            theta = torch.tensor([0.3, -0.4], requires_grad=True)
            torch.manual_seed(seed)
            with storch.Graph():
                z = est(Bernoulli(logits=theta))
                storch.add_cost(((z - 0.45) ** 2).sum(-1), name="f")
                storch.backward()
    assert set_.moving_averages["f"].item() == made.moving_averages["f"].item()
    # lr: a learned baseline's optimizer, already made, steps with the new learning rate
    nvil = storch.estimator("score", plate="z", n_samples=2, baseline="learned", lr=0.01)
    theta = torch.tensor([0.3, -0.4], requires_grad=True)
    for seed in range(2):
        torch.manual_seed(seed)
        with storch.Graph():
            z = nvil(Bernoulli(logits=theta))
            storch.add_cost(((z - 0.45) ** 2).sum(-1), name="f")
            storch.backward()
        nvil.lr = 0.2
    assert [g["lr"] for g in nvil._optimizer.param_groups] == [0.2]
