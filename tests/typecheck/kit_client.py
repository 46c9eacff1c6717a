# pyright: strict, reportUnnecessaryTypeIgnoreComment=true
"""storch.testing as an estimator author calls it, checked by pyright in strict mode.

``check_against_enumeration``, ``check_leakage`` and ``check_conditions`` take a registry name, an
estimator class, an instance or a factory ``make(plate)``; a factory is usually a lambda. Against a
plain union of the four, pyright typed the lambda's parameter from ``Estimator.__call__`` (a
Distribution, not the plate's name) and reported the call as an error; the overloads let it infer
``plate: str`` and the report's type. pyright runs over this file (pyrightconfig.json, the
``typecheck`` tox environment, and ``test_public_api_types.py::test_kit_client_type_checks``
where pyright is installed); it is also run, so each form is one that works.
"""

from __future__ import annotations

import torch
from torch.distributions import Bernoulli, Distribution

import storch
import storch.testing as kit
from storch import Estimator
from storch_score import Score
from typing_extensions import assert_type

THETA = torch.tensor([0.3, -0.7], dtype=torch.float64)
R = 300  # estimates per model: the file checks types and that each form runs, not statistics


def bernoulli(theta: torch.Tensor) -> Distribution:
    return Bernoulli(logits=theta)


def make_score(plate: str) -> Score:
    return Score(plate, n_samples=2, baseline="leave_one_out")


def enumeration() -> list[kit.ConformanceReport]:
    models = kit.standard_models(Score("probe"))[0][:1]  # bernoulli[3]
    reports = [
        kit.check_against_enumeration(lambda plate: Score(plate, n_samples=2, baseline="leave_one_out"),
                                      models=models, n_replicates=R, raise_on_failure=False),
        kit.check_against_enumeration(lambda plate: storch.estimator("score", plate=plate, n_samples=2),
                                      models=models, n_replicates=R, raise_on_failure=False),
        kit.check_against_enumeration(make_score, models=models, n_replicates=R, raise_on_failure=False),
        kit.check_against_enumeration(Score("z", n_samples=2), models=models, n_replicates=R,
                                      raise_on_failure=False),
        kit.check_against_enumeration(Score, options={"n_samples": 2}, models=models, n_replicates=R,
                                      raise_on_failure=False),
        kit.check_against_enumeration("score", options={"n_samples": 2}, models=models, n_replicates=R,
                                      raise_on_failure=False),
    ]
    assert_type(reports[0], kit.ConformanceReport)
    return reports


def leakage() -> kit.ConformanceReport:
    models = kit.standard_models(Score("probe"))[0][:1]
    report = kit.check_leakage(lambda plate: Score(plate, n_samples=2), models=models, n_graphs=200,
                               raise_on_failure=False)
    return assert_type(report, kit.ConformanceReport)


def conditions() -> list[kit.ConditionsReport]:
    def f(x: torch.Tensor) -> torch.Tensor:
        return ((x - 0.2) ** 2).sum()

    reports = [
        kit.check_conditions(lambda plate: Score(plate, n_samples=2), lambda theta: Bernoulli(logits=theta), THETA,
                             lambda x: ((x - 0.2) ** 2).sum(), n_replicates=R, raise_on_failure=False),
        kit.check_conditions(Score("z", n_samples=2), bernoulli, THETA, f, exact=kit.exact_expectation(bernoulli, f),
                             n_replicates=R, raise_on_failure=False),
        kit.check_conditions("score", bernoulli, THETA, f, options={"n_samples": 2}, n_replicates=R,
                             raise_on_failure=False),
    ]
    assert_type(reports[0], kit.ConditionsReport)
    return reports


def refused() -> None:
    """Options go to a name or a class only: with a factory or an instance they are a type error (the
    kit ignores them with a factory, raises TypeError with an instance). Never run; an unneeded ignore
    comment is an error (reportUnnecessaryTypeIgnoreComment)."""
    kit.check_against_enumeration(  # pyright: ignore[reportCallIssue]
        lambda plate: Score(plate), options={"n_samples": 2})  # pyright: ignore[reportArgumentType]
    kit.check_leakage(  # pyright: ignore[reportCallIssue]
        Score("z"), options={"n_samples": 2})  # pyright: ignore[reportArgumentType]


def factory_type() -> kit.EstimatorFactory:
    """A factory is the public ``EstimatorFactory``: a lambda, a function, or a class."""
    factories: list[kit.EstimatorFactory] = [lambda plate: Score(plate), make_score, Score]
    made: Estimator = factories[0]("z")
    assert made.plate == "z"
    return factories[1]


def typed_attributes() -> int:
    """The base's attributes and storch.compile's options are typed (p-api: in strict code ``n_samples`` and
    ``skipped_updates`` were Any through ``__getattr__``, ``options=`` a partially unknown dict)."""
    est = storch.estimator("score", plate="z", n_samples=3)
    assert_type(est.n_samples, int)
    assert_type(est.skipped_updates, int)
    assert_type(est.plate, str)

    def step() -> None:
        pass

    compiled = storch.compile(step, options={"max_autotune": False})
    assert compiled is not None
    return est.n_samples + est.skipped_updates


if __name__ == "__main__":
    torch.set_num_threads(1)
    found = [*enumeration(), leakage(), *conditions()]
    assert all(r.ok for r in found), "\n".join(str(r.table()) for r in found if not r.ok)
    assert factory_type()("p").plate == "p"
    assert typed_attributes() == 3
    print("ok")
