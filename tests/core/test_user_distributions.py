"""What storch needs from a distribution written outside torch (docs/your-own-distribution.md), and the
clear errors where one does not provide it: an enumerate_support that is not implemented although
has_enumerate_support is set, an enumerate_support laid out against batch_shape / event_shape, a log_prob
that returns per-event terms. Each used to fail with torch's bare NotImplementedError or reshape error, or
with a message for estimator authors; a correct one is exact (expect) against enumeration."""

import itertools

import pytest
import torch

import storch
from user_distributions import EventAsBatch, LogProbPerRank, NoEnumeration, PlackettLuce

D = torch.float64
LOGITS = torch.tensor([[0.3, -0.5, 1.0], [-0.2, 0.4, 0.1]], dtype=D)  # two data points, three items
DISC = torch.tensor([1.0, 0.5, 0.25], dtype=D)


class ScoreFunction(storch.Estimator):
    """The base class's components: the plain score function (this test runs with storch-core alone)."""

    name = "test_core_user_distributions_score"


def _cost(z):
    return (z.to(D) * DISC).sum(-1) ** 2


def _exact(logits):
    perms = torch.tensor(list(itertools.permutations(range(3))))
    return torch.stack([(PlackettLuce(lg).log_prob(perms).exp() * _cost(perms)).sum() for lg in logits]).mean()


def _loss(est, cls, logits):
    with storch.Graph():
        z = est(cls(storch.denote_independent(logits, 0, "data")))
        storch.add_cost(_cost(z))
        return storch.surrogate_loss()


def test_expect_on_a_correct_user_distribution_is_exact():
    theta = LOGITS.clone().requires_grad_(True)
    loss = _loss(storch.estimator("expect", plate="z"), PlackettLuce, theta)
    g, = torch.autograd.grad(loss, theta)
    assert torch.allclose(loss, _exact(LOGITS))
    assert torch.allclose(g, torch.autograd.functional.jacobian(_exact, LOGITS))


def test_expect_on_a_user_distribution_is_exact_at_order_2():
    """A top-1 precision cost (item 0 ranked first): P = softmax(logits)[0], so the exact Hessian is the
    softmax's. log_prob by torch.logcumsumexp gave a NaN Hessian (its second derivative is NaN where the value
    multiplying log p is exactly 0); the masked logsumexp of the docs' example is finite and exact."""
    top = torch.tensor([1.0, 0.0, 0.0], dtype=D)
    theta = LOGITS[0].clone().requires_grad_(True)
    with storch.Graph():
        z = storch.estimator("expect", plate="z")(PlackettLuce(theta))
        storch.add_cost(-top[z[..., 0]])
        g, = torch.autograd.grad(storch.surrogate_loss(order=2), theta, create_graph=True)
        hess = torch.stack([torch.autograd.grad(g[i], theta, retain_graph=True)[0] for i in range(3)])
    exact = torch.autograd.functional.hessian(lambda lg: -lg.softmax(-1)[0], LOGITS[0])
    assert torch.isfinite(hess).all()
    assert torch.allclose(hess, exact)


def test_enumerate_support_not_implemented_is_named():
    with pytest.raises(storch.UnsupportedDistributionError,
                       match=r"estimator 'expect'.*NoEnumeration declares has_enumerate_support = True, but its "
                             r"enumerate_support raised NotImplementedError.*has_enumerate_support = False"):
        _loss(storch.estimator("expect", plate="z"), NoEnumeration, LOGITS)


def test_enumerate_support_against_batch_and_event_shape_is_named():
    """batch_shape (2, 3) (data, the event dim declared as a batch dim), event_shape (), values (6, 1, 3):
    torch's "shape '[6]' is invalid for input of size 18" before."""
    with pytest.raises(storch.UnsupportedDistributionError,
                       match=r"EventAsBatch.enumerate_support\(expand=False\) returned a tensor of shape \(6, 1, 3\), "
                             r"but its batch_shape is \(2, 3\) and its event_shape \(\).*\(K, 2, 3\)"):
        _loss(storch.estimator("expect", plate="z"), EventAsBatch, LOGITS)


@pytest.mark.parametrize("make", [lambda: storch.estimator("expect", plate="z"),
                                  lambda: ScoreFunction(plate="z", n_samples=3)], ids=["expect", "score-function"])
def test_log_prob_with_per_event_terms_is_blamed_on_the_distribution(make):
    """A log_prob of shape batch + event: the message names the distribution's log_prob and the shape it must
    return, not the estimator's gradient or weighting function (docs/writing-an-estimator.md) as before."""
    with pytest.raises(storch.StorchError,
                       match=r"LogProbPerRank.log_prob returned a tensor of shape \(\d+, 2, 3\) for samples of shape "
                             r"\(\d+, 2, 3\).*without its event dims, \(\d+, 2\).*Sum the per-element terms"):
        _loss(make(), LogProbPerRank, LOGITS)


def test_the_check_reads_a_user_class_once_per_node_and_torch_classes_never(monkeypatch):
    """The check reads enumerate_support of classes written outside torch only, once per node (torch's own
    classes keep their fast path: their layout is torch's)."""
    import importlib

    support = importlib.import_module("storch.distributions.support")
    calls = []
    real = support.enumeration_support
    monkeypatch.setattr(support, "enumeration_support", lambda d: calls.append(type(d).__name__) or real(d))
    for make in (lambda x: torch.distributions.Categorical(logits=x), PlackettLuce):
        with storch.Graph():
            z = storch.estimator("expect", plate="z")(make(storch.denote_independent(LOGITS, 0, "data")))
            storch.add_cost(z.to(D).sum())
            storch.surrogate_loss()
    assert calls == ["PlackettLuce"]
