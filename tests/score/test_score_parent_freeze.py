"""``model.requires_grad_(False)`` on a parent module that holds ``score(baseline="learned")`` (NVIL): the heads are
built at their cost's first node, and torch's ``Module.requires_grad_`` reaches only the parameters that exist when
it is called, so the two ways that freeze them (docs/reliability.md) are freezing the estimator itself (its request
is kept for heads built later, ``test_score_frozen_baselines.py``) and freezing the parent after the first step."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.distributions import Bernoulli

import storch


class _Model(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = torch.nn.Linear(1, 3)  # trained apart (fine-tuning)
        self.nvil = storch.estimator("score", plate="y", baseline="learned")

    def step(self) -> None:
        theta = self.encoder(torch.ones(1)).detach().requires_grad_()
        with storch.Graph():
            y = self.nvil(Bernoulli(logits=theta))
            storch.add_cost(((y - 0.4) ** 2).sum(), name="d")
            storch.backward()


def _values(module) -> dict:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


@pytest.mark.parametrize("how", ["estimator", "parent_after_first_step"])
def test_the_documented_ways_freeze_the_heads_built_at_the_first_step(how):
    torch.manual_seed(0)
    model = _Model()
    if how == "estimator":
        model.requires_grad_(False)
        model.nvil.requires_grad_(False)  # reaches the heads not built yet
    model.step()
    if how == "parent_after_first_step":
        model.requires_grad_(False)  # the head exists now
    assert any(n.startswith("nvil.baseline_fn.heads.") for n, _ in model.named_parameters())
    model.step()  # the output layer starts at zero: a trained head would move at the second step
    before = _values(model)
    model.step()
    assert [n for n, p in model.named_parameters() if p.requires_grad] == []
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


def test_without_either_way_the_head_would_train():
    """The control: the same steps on an unfrozen model move the head (the test above could fail)."""
    torch.manual_seed(0)
    model = _Model()
    model.step()
    model.step()
    before = _values(model)
    model.step()
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters() if n.startswith("nvil."))


class _TwoCosts(_Model):
    def step(self, costs=("d",)) -> None:
        theta = self.encoder(torch.ones(1)).detach().requires_grad_()
        with storch.Graph():
            y = self.nvil(Bernoulli(logits=theta))
            for name in costs:  # one head per cost name, built at its first node
                storch.add_cost(((y - 0.4) ** 2).sum(), name=name)
            storch.backward()


def _head_flags(model) -> dict:
    return {n: p.requires_grad for n, p in model.named_parameters() if n.startswith("nvil.baseline_fn.heads.")}


@pytest.mark.parametrize("parent_frozen", [True, False])
def test_a_head_for_a_cost_first_met_after_the_freeze_follows_the_frozen_heads(parent_frozen):
    """model.requires_grad_(False) after the first step froze the head of cost 'd'; the head of cost 'e', first met
    later, was built trainable and storch.backward() trained it. Where every earlier head is frozen (and no request
    reached the estimator) it is now built frozen, with one RuntimeWarning; where they are trainable it is too."""
    torch.manual_seed(0)
    model = _TwoCosts()
    model.step()
    if parent_frozen:
        model.requires_grad_(False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.step(("d", "e"))
        model.step(("d", "e", "f"))  # a third head: frozen too, and no second warning
    ours = [w for w in caught if "was built frozen" in str(w.message)]
    flags = _head_flags(model)
    assert {n.split(".")[3] for n in flags} == {"cost_d", "cost_e", "cost_f"}
    if not parent_frozen:
        assert all(flags.values()) and not ours
        return
    assert not any(flags.values()), flags
    assert len(ours) == 1 and ours[0].category is RuntimeWarning and ours[0].filename == __file__
    assert "'cost_e'" in str(ours[0].message) and "est.requires_grad_(False)" in str(ours[0].message)
    before = _values(model)
    model.step(("d", "e", "f"))  # nothing moves: a trained head would (its output layer starts at zero)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


@pytest.mark.parametrize("request_", [False, True])
def test_an_explicit_request_decides_a_later_head_and_silences_the_warning(request_):
    """est.requires_grad_(...) after the parent's freeze: the new head takes the request, with no warning."""
    torch.manual_seed(0)
    model = _TwoCosts()
    model.step()
    model.requires_grad_(False)
    model.nvil.requires_grad_(request_)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.step(("d", "e"))
    assert not [w for w in caught if "was built frozen" in str(w.message)]
    assert _head_flags(model)["nvil.baseline_fn.heads.cost_e.0.weight"] is request_


def _validate(model, costs) -> None:
    """A validation pass under no_grad that meets ``costs`` (builds their heads)."""
    with torch.no_grad():
        theta = model.encoder(torch.ones(1))
        with storch.Graph():
            y = model.nvil(Bernoulli(logits=theta))
            for name in costs:
                storch.add_cost(((y - 0.4) ** 2).sum(), name=name)
            storch.surrogate_loss()


@pytest.mark.parametrize("request_", [None, True])
def test_a_head_first_built_in_a_no_grad_pass_warns_at_its_first_training_step(request_):
    """The head of cost 'e', first met in a no_grad validation pass after the parent's freeze, was built frozen with
    no warning (none in a no_grad pass), and stayed frozen in training with none either. The warning now comes at the
    first training step that uses it; an explicit request in between decides the head's flag and silences it."""
    torch.manual_seed(0)
    model = _TwoCosts()
    model.step()
    model.requires_grad_(False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _validate(model, ("d", "e"))
        assert not [w for w in caught if "was built frozen" in str(w.message)]  # no warning in validation
        if request_ is not None:
            model.nvil.requires_grad_(request_)
        model.step(("d", "e"))
        model.step(("d", "e"))
    ours = [w for w in caught if "was built frozen" in str(w.message)]
    if request_ is not None:
        assert not ours and _head_flags(model)["nvil.baseline_fn.heads.cost_e.0.weight"] is request_
        return
    assert not _head_flags(model)["nvil.baseline_fn.heads.cost_e.0.weight"]
    assert len(ours) == 1 and ours[0].filename == __file__ and "'cost_e'" in str(ours[0].message)
