"""One capability check (issue 18): ``Estimator.supports`` decides for the factory, the registry's list
of supporting estimators and the benchmark roster, over every installed estimator and every torch
distribution. The message of an estimator that refuses a distribution never names that estimator
among those that support it (``storch.estimator("mvd", plate="z")(LogNormal(...))`` listed mvd)."""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.distributions as D

import storch
from storch.estimators.catalog import supporting_estimators
from storch_bench.roster import supports as roster_supports

_t = torch.tensor


def _examples() -> dict[str, D.Distribution]:
    """One small instance of every distribution class that torch.distributions exports."""
    p3 = _t([0.2, 0.3, 0.5])
    eye = torch.eye(2)
    return {
        "Bernoulli": D.Bernoulli(probs=_t(0.3)),
        "Beta": D.Beta(_t(2.0), _t(3.0)),
        "Binomial": D.Binomial(5, probs=_t(0.4)),
        "Categorical": D.Categorical(probs=p3),
        "Cauchy": D.Cauchy(_t(0.0), _t(1.0)),
        "Chi2": D.Chi2(_t(3.0)),
        "ContinuousBernoulli": D.ContinuousBernoulli(probs=_t(0.3)),
        "Dirichlet": D.Dirichlet(_t([1.0, 2.0, 3.0])),
        "Exponential": D.Exponential(_t(1.5)),
        "FisherSnedecor": D.FisherSnedecor(_t(3.0), _t(4.0)),
        "Gamma": D.Gamma(_t(2.0), _t(1.0)),
        **({"GeneralizedPareto": D.GeneralizedPareto(_t(0.0), _t(1.0), _t(0.1))}  # (torch after 2.7)
           if hasattr(D, "GeneralizedPareto") else {}),
        "Geometric": D.Geometric(probs=_t(0.3)),
        "Gumbel": D.Gumbel(_t(0.0), _t(1.0)),
        "HalfCauchy": D.HalfCauchy(_t(1.0)),
        "HalfNormal": D.HalfNormal(_t(1.0)),
        "Independent": D.Independent(D.Normal(torch.zeros(3), torch.ones(3)), 1),
        "InverseGamma": D.InverseGamma(_t(2.0), _t(1.0)),
        "Kumaraswamy": D.Kumaraswamy(_t(2.0), _t(3.0)),
        "LKJCholesky": D.LKJCholesky(3, _t(1.0)),
        "Laplace": D.Laplace(_t(0.0), _t(1.0)),
        "LogNormal": D.LogNormal(_t(0.0), _t(1.0)),
        "LogisticNormal": D.LogisticNormal(torch.zeros(2), torch.ones(2)),
        "LowRankMultivariateNormal": D.LowRankMultivariateNormal(torch.zeros(2), torch.ones(2, 1), torch.ones(2)),
        "MixtureSameFamily": D.MixtureSameFamily(D.Categorical(probs=p3), D.Normal(torch.zeros(3), torch.ones(3))),
        "Multinomial": D.Multinomial(4, probs=p3),
        "MultivariateNormal": D.MultivariateNormal(torch.zeros(2), eye),
        "NegativeBinomial": D.NegativeBinomial(3, probs=_t(0.4)),
        "Normal": D.Normal(_t(0.0), _t(1.0)),
        "OneHotCategorical": D.OneHotCategorical(probs=p3),
        "OneHotCategoricalStraightThrough": D.OneHotCategoricalStraightThrough(probs=p3),
        "Pareto": D.Pareto(_t(1.0), _t(2.0)),
        "Poisson": D.Poisson(_t(2.0)),
        "RelaxedBernoulli": D.RelaxedBernoulli(_t(0.5), probs=_t(0.3)),
        "RelaxedOneHotCategorical": D.RelaxedOneHotCategorical(_t(0.5), probs=p3),
        "StudentT": D.StudentT(_t(3.0)),
        "TransformedDistribution": D.TransformedDistribution(D.Normal(_t(0.0), _t(1.0)), [D.ExpTransform()]),
        "Uniform": D.Uniform(_t(0.0), _t(1.0)),
        "VonMises": D.VonMises(_t(0.0), _t(1.0)),
        "Weibull": D.Weibull(_t(1.0), _t(2.0)),
        "Wishart": D.Wishart(_t(3.0), covariance_matrix=eye),
        # the same family under one Independent: unwrapped once, like the estimators do
        "Independent(Bernoulli)": D.Independent(D.Bernoulli(probs=torch.full((3,), 0.3)), 1),
        "Independent(LogNormal)": D.Independent(D.LogNormal(torch.zeros(3), torch.ones(3)), 1),
    }


EXAMPLES = _examples()
ABSTRACT = {"Distribution", "ExponentialFamily"}


def test_the_examples_cover_every_torch_distribution():
    exported = {n for n in D.__all__ if inspect.isclass(getattr(D, n)) and issubclass(getattr(D, n), D.Distribution)}
    assert exported - ABSTRACT <= set(EXAMPLES), sorted(exported - ABSTRACT - set(EXAMPLES))


ESTIMATORS = sorted(storch.available_estimators())


@pytest.mark.parametrize("name", ESTIMATORS)
def test_refusal_message_lists_only_supporting_estimators(name):
    cls = storch.get_estimator_class(name)
    refused = 0
    for label, d in EXAMPLES.items():
        listed = supporting_estimators(d)
        # every listed estimator's capability check accepts d, and an estimator is listed iff it does
        assert listed == [n for n in ESTIMATORS if storch.get_estimator_class(n).supports(d)], label
        if cls.supports(d):
            assert name in listed, label
            continue
        refused += 1
        assert name not in listed, f"{name} refuses {label} but the registry lists it as supporting it"
        est = storch.estimator(name, plate="z")
        with pytest.raises(storch.UnsupportedDistributionError) as info:
            est.check_distribution(d)
        message = str(info.value)
        assert f"estimator {name!r} does not support" in message
        hint = message.partition("Estimators that support it:")[2]
        assert name not in [n.strip(" .") for n in hint.split(",")], (label, message)
        for other in [n.strip(" .") for n in hint.split(",") if n.strip(" .")]:
            assert storch.get_estimator_class(other).supports(d), (label, other, message)
        # the benchmarks' roster asks the same check
        assert roster_supports(cls, d) is not None, label
    if cls.distributions is not None or cls.requires_rsample or cls.requires_enumerate_support:
        assert refused, f"{name} declares requirements but accepted every distribution"


def test_mvd_refuses_lognormal_without_naming_itself():
    with storch.Graph():
        with pytest.raises(storch.UnsupportedDistributionError) as info:
            storch.estimator("mvd", plate="z")(D.LogNormal(_t(0.0), _t(1.0)))
    message = str(info.value)
    assert "'mvd' does not support LogNormal" in message
    listed = message.partition("Estimators that support it:")[2]
    assert "mvd" not in listed and "score" in listed, message
    # an Independent Normal is a Normal to mvd; a LogNormal under Independent is not
    assert storch.get_estimator_class("mvd").supports(D.Independent(D.Normal(torch.zeros(2), torch.ones(2)), 1))
    assert not storch.get_estimator_class("mvd").supports(EXAMPLES["Independent(LogNormal)"])


def test_the_roster_takes_a_categorical_under_a_relaxation_only_with_the_opt_in():
    """gumbel_softmax / gumbel_straight_through / rebar / relax refuse a Categorical by default (their sample of it is
    a one-hot vector, not an index); the roster skips them with that reason, and runs a spec that opts in."""
    from storch_bench.roster import parse_spec, resolve

    d = D.Categorical(logits=torch.zeros(3))
    for name in ("gumbel_softmax", "gumbel_straight_through", "rebar", "relax"):
        cls = storch.get_estimator_class(name)
        why = roster_supports(cls, d)
        assert why is not None and "not Categorical" in why and f"{name}[categorical=one_hot]" in why, why
        assert roster_supports(cls, d, (("categorical", "one_hot"),)) is None
    assert roster_supports(storch.get_estimator_class("relax"), d, (("control_variate", "network"),)) is None
    runnable, skipped = resolve([parse_spec("gumbel_softmax@1"), parse_spec("gumbel_softmax[categorical=one_hot]@1"),
                                 parse_spec("gumbel_softmax[categorical=bogus]@1")], d)
    assert [s.label for s, _ in runnable] == ["gumbel_softmax[categorical=one_hot]@1"]
    assert {label for label, _ in skipped} == {"gumbel_softmax@1", "gumbel_softmax[categorical=bogus]@1"}
