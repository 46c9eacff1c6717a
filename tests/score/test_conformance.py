"""storch.testing's conformance kit on every estimator of the family: forward values (order 0)
and derivatives up to min(max_order, 3) against exact values on the kit's standard models."""

import pytest
from torch.distributions import Independent, Laplace, Normal

from storch.testing import check_against_enumeration


def _proposal(p):
    # a proposal different from p that covers its support: tempered logits, or a wider shifted Normal
    if isinstance(p, Independent):  # the kit's independent[...] model: the same wrapper around q
        return Independent(_proposal(p.base_dist), p.reinterpreted_batch_ndims)
    if isinstance(p, (Normal, Laplace)):  # (the kit's laplace[loc] model: a wider, shifted Laplace)
        return type(p)(p.loc.detach() + 0.3, p.scale.detach() * 1.5)
    return type(p)(logits=p.logits.detach() / 2)


CASES = {
    "score": dict(n_samples=2),
    "score-leave_one_out": dict(n_samples=3, baseline="leave_one_out"),
    "importance": dict(n_samples=2, proposal=_proposal),
    "sum_and_sample": dict(n_enumerate=1, n_samples=2, baseline="leave_one_out"),
    "unordered_set": dict(n_samples=2),
    "unordered_set-no-baseline": dict(n_samples=2, baseline=False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_conformance(case):
    report = check_against_enumeration(case.split("-")[0], options=CASES[case], seed=7)
    print(f"\n{report.table(details=False)}")


def test_a_model_refused_when_sampling_is_reported_not_raised_by_the_uniform_weights_check():
    # score overrides weighting_function (greedy's 0 weight) and says uniform_weights: the kit's check of those
    # weights built its first model unguarded, so a model score refuses when sampling (a moving support) raised
    import storch
    import storch.testing as kit
    uniform = [m for m in kit.standard_models(storch.estimator("reparameterization", plate="z"))[0]
               if m.name == "uniform[high]"]
    with pytest.raises(AssertionError, match="none of the models"):
        check_against_enumeration("score", models=uniform, orders=[1])
