"""The enumerating estimators of the score family on a distribution written outside torch: a correct one is
unbiased against enumeration; a broken one gets the core's clear error (named class, shapes, what to do)
where unordered_set and sum_and_sample raised a bare NotImplementedError from their proposal, torch's
reshape or expand error, or a message for estimator authors (tests/core/test_user_distributions.py has
expect's)."""

import itertools

import pytest
import torch

import storch
from storch.testing import assert_unbiased, per_replicate_derivatives, replicate
from user_distributions import EventAsBatch, LogProbPerRank, NoEnumeration, PlackettLuce

D = torch.float64
LOGITS = torch.tensor([[0.3, -0.5, 1.0], [-0.2, 0.4, 0.1]], dtype=D)
DISC = torch.tensor([1.0, 0.5, 0.25], dtype=D)
ESTIMATORS = {
    "unordered_set": lambda: storch.estimator("unordered_set", plate="z", n_samples=3),
    "sum_and_sample": lambda: storch.estimator("sum_and_sample", plate="z", n_samples=2, baseline="leave_one_out"),
}


def _cost(z):
    return (z.to(D) * DISC).sum(-1) ** 2


def _exact(logits):
    perms = torch.tensor(list(itertools.permutations(range(3))))
    return torch.stack([(PlackettLuce(lg).log_prob(perms).exp() * _cost(perms)).sum() for lg in logits]).mean()


def _loss(name, cls, logits):
    z = ESTIMATORS[name]()(cls(storch.denote_independent(logits, 0, "data")))
    storch.add_cost(_cost(z))
    return storch.surrogate_loss()


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_a_user_distribution_is_unbiased(name):
    torch.manual_seed(3)
    with storch.Graph():
        leaf, lg = replicate(LOGITS, 1500)
        g, = per_replicate_derivatives(_loss(name, PlackettLuce, lg), leaf, 1)
    assert_unbiased(g, torch.autograd.functional.jacobian(_exact, LOGITS).reshape(-1), f"{name} on a user class")


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
@pytest.mark.parametrize("cls, match", [
    (NoEnumeration, r"NoEnumeration declares has_enumerate_support = True, but its enumerate_support raised "
                    r"NotImplementedError"),
    (EventAsBatch, r"EventAsBatch.enumerate_support\(expand=False\) returned a tensor of shape \(6, 1, 3\), but its "
                   r"batch_shape is \(2, 3\) and its event_shape \(\)"),
    (LogProbPerRank, r"LogProbPerRank.log_prob returned a tensor of shape \(2, 3\) for samples of shape \(2, 3\).*"
                     r"without its event dims, \(2,\)"),
], ids=["not-implemented", "event-as-batch", "per-event-log-prob"])
def test_a_broken_user_distribution_is_named(name, cls, match):
    with storch.Graph():
        with pytest.raises(storch.StorchError, match=rf"estimator '{name}' \(plate 'z'\): {match}"):
            _loss(name, cls, LOGITS)
