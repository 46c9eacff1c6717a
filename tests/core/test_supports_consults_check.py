"""``Estimator.supports`` asks an overridden ``check_distribution`` (third-party estimators need not override both)."""
import pytest
import torch
from torch.distributions import Bernoulli, Distribution, Normal

import storch
from storch.estimators import catalog
from storch.extending import base_distribution


class CdfOnly(storch.Estimator):
    """A pathwise-style estimator for distributions with a cdf (the test's own class)."""

    name = "cdf_only_test"
    distributions = None

    def __init__(self, plate: str, n_samples: int = 1) -> None:
        super().__init__(plate, n_samples)
        self.learned = torch.nn.Linear(2, 2)  # a learned part: its init draws from torch's random state

    def check_distribution(self, d: Distribution) -> None:
        super().check_distribution(d)
        if type(base_distribution(d)).cdf is Distribution.cdf:
            raise storch.UnsupportedDistributionError(f"cdf_only_test needs a cdf; {type(d).__name__} has none")


class NeedsArgument(CdfOnly):
    """A constructor with a required option: no instance with defaults, the attributes decide on the class."""

    name = "needs_argument_test"

    def __init__(self, plate: str, width: int) -> None:
        super().__init__(plate)


def test_supports_follows_check_distribution():
    torch.manual_seed(0)
    p = torch.tensor(0.3, requires_grad=True)
    assert not CdfOnly.supports(Bernoulli(p))
    assert not CdfOnly("z").supports(Bernoulli(p))
    assert CdfOnly.supports(Normal(p, 1.0)) and CdfOnly("z").supports(Normal(p, 1.0))
    assert NeedsArgument.supports(Bernoulli(p))  # cannot be asked on the class: the attributes' answer
    assert not NeedsArgument("z", 2).supports(Bernoulli(p))  # an instance is asked
    with pytest.raises(storch.UnsupportedDistributionError, match="needs a cdf"):
        with storch.Graph():
            CdfOnly("z")(Bernoulli(p))


def test_supports_leaves_the_random_state():
    torch.manual_seed(1)
    state = torch.random.get_rng_state()
    assert not CdfOnly.supports(Bernoulli(torch.tensor(0.3)))
    assert torch.equal(torch.random.get_rng_state(), state)


def test_other_estimators_errors_do_not_list_it(monkeypatch):
    installed = dict(catalog.installed_classes())
    monkeypatch.setattr(catalog, "_classes", lambda: {**installed, CdfOnly.name: CdfOnly})
    p = torch.tensor(0.3, requires_grad=True)
    assert CdfOnly.name not in catalog.supporting_estimators(Bernoulli(p))
    assert CdfOnly.name in catalog.supporting_estimators(Normal(p, 1.0))
    with pytest.raises(storch.UnsupportedDistributionError) as info:
        storch.estimator("reparameterization", plate="z")(Bernoulli(p))
    assert "Estimators that support it" in str(info.value) and CdfOnly.name not in str(info.value)


def test_each_check_is_asked_once_per_listing(monkeypatch):
    """A consulted check that refuses builds its own message, which lists supporting estimators too: those are
    not consulted again (the checks would nest, once per installed class at every level)."""
    calls = []

    class Counted(CdfOnly):
        name = "counted_test"

        def check_distribution(self, d):
            calls.append(type(self).__name__)
            super().check_distribution(d)

    class CountedToo(Counted):
        name = "counted_too_test"

    installed = dict(catalog.installed_classes())
    monkeypatch.setattr(catalog, "_classes", lambda: {**installed, Counted.name: Counted,
                                                      CountedToo.name: CountedToo})
    names = catalog.supporting_estimators(Bernoulli(torch.tensor(0.3)))
    assert Counted.name not in names and CountedToo.name not in names
    assert sorted(calls) == ["Counted", "CountedToo"]


def test_a_class_is_asked_through_one_instance_built_once():
    """Review r-24: building the instance per query under warnings.catch_warnings() reset the warnings already
    shown once (they were shown again after every listing); the instance with default options is built once."""

    class Counted(CdfOnly):
        name = "counted_test"
        built = 0

        def __init__(self, plate: str, n_samples: int = 1) -> None:
            super().__init__(plate, n_samples)
            type(self).built += 1

    p = torch.tensor(0.3)
    for _ in range(3):
        assert not Counted.supports(Bernoulli(p)) and Counted.supports(Normal(p, 1.0))
    assert Counted.built == 1



def test_the_instance_is_kept_on_its_class():
    """Review r-25: kept as a WeakKeyDictionary's value keyed by its own class, the instance kept the class alive
    (the entry was never dropped); it is kept on the class itself (and a subclass gets its own)."""

    class Throwaway(CdfOnly):
        name = "throwaway_test"

    assert not Throwaway.supports(Bernoulli(torch.tensor(0.3)))
    kept = Throwaway.__dict__["_storch_default_instance"]
    assert type(kept) is Throwaway
    assert not Throwaway.supports(Bernoulli(torch.tensor(0.5)))
    assert Throwaway.__dict__["_storch_default_instance"] is kept  # built once
