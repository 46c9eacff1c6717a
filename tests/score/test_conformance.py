"""storch.testing's conformance kit on every estimator of the family: forward values (order 0)
and derivatives up to min(max_order, 3) against exact values on the kit's standard models."""

import pytest
import torch
from torch.distributions import Bernoulli, Independent, Laplace, Normal

import storch
import storch.testing as kit
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


def test_the_kit_in_a_loop_does_not_warn_of_an_estimator_made_in_every_training_step():
    """The kit makes one estimator per node of every model and check, by design: running it in a loop with a
    stateful estimator (a moving-average baseline) in a factory used to warn 'created anew 4 times in a row ...
    an estimator made in every training step' (found by a porting tester); the same making outside the kit
    still warns."""
    import warnings

    plate = "kit_loop"  # (the kit's models name their nodes 'x'; this plate is for the outside-the-kit control)
    make = lambda p: storch.estimator("score", plate=p, n_samples=2, baseline="moving_average")  # noqa: E731
    bern = [m for m in kit.standard_models(make("probe"))[0] if m.name == "bernoulli[3]"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(5):  # (this one warned)
            kit.check_conditions(make, lambda th: Bernoulli(logits=th), torch.tensor([0.3, -0.7], dtype=torch.float64),
                                 lambda x: ((x - 0.2) ** 2).sum(), raise_on_failure=False)
        for _ in range(5):
            assert check_against_enumeration(make, models=bern, orders=(0, 1), n_replicates=400).ok
        assert not [w for w in caught if "created anew" in str(w.message)]
        for _ in range(5):  # the control: made anew in every step by the user, drawing one node each
            with storch.Graph():
                storch.add_cost(make(plate)(Bernoulli(logits=torch.zeros(2, requires_grad=True))).sum(), name="c")
                storch.backward()
    assert len([w for w in caught if "created anew" in str(w.message)]) == 1
