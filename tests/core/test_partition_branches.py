"""One estimator called for two independent branches of a model (found by porting M2, the semi-supervised VAE:
one `reparameterization` estimator for the labelled and for the unlabelled z) makes one partition (a sequence,
docs/partitions.md). With the labelled branch first, the unlabelled z depends on y, sampled after the partition
started: refused, and the message says that two calls of one estimator make a partition and that independent
branches need one estimator each. With the unlabelled branch first, the labelled z is drawn for every entry of
the unlabelled data and the labels (12x its samples): storch.IndependentStepWarning. A sequence whose steps do
not depend on each other but keep their plates (a bandit's i.i.d. pulls, gates, actions given an option) is not
reported."""

import math
import warnings

import pytest
import torch
from torch.distributions import Bernoulli, Categorical, Normal

import storch

XL = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)  # labelled data: plate "lab"
XU = torch.tensor([1.5, -0.5, 0.2, -2.0], dtype=torch.float64)  # unlabelled data: plate "unl"
K = 3


def _params():
    return (torch.tensor(0.7, dtype=torch.float64, requires_grad=True),               # a: z's mean, a x
            torch.tensor([0.3, -1.0, 0.8], dtype=torch.float64, requires_grad=True),  # b: plus b[y]
            torch.tensor([0.5, -0.2, 0.1], dtype=torch.float64, requires_grad=True))  # w: q(y | x) logits w x


def _labelled(est_z, a, b, w):
    x = storch.denote_independent(XL, 0, "lab")
    z = est_z(Normal(a * x + b[0], 1.0))
    storch.add_cost((z - 1.0) ** 2, name="rec_l")
    return z


def _unlabelled(est_z, est_y, a, b, w):
    x = storch.denote_independent(XU, 0, "unl")
    y = est_y(Categorical(logits=w * x.unsqueeze(-1)))
    z = est_z(Normal(a * x + b[y], 1.0))
    storch.add_cost(z ** 2, name="rec_u")
    return z


def _exact(a, b, w):
    """E over z (and y) of the costs, averaged over each branch's data (as storch reduces data plates)."""
    lab = ((a * XL + b[0] - 1.0) ** 2 + 1.0).mean()
    p = torch.softmax(w * XU.unsqueeze(-1), -1)  # (4, K)
    unl = (p * ((a * XU.unsqueeze(-1) + b) ** 2 + 1.0)).sum(-1).mean()
    return lab + unl


def _z_scores(estimates: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    return (estimates.mean(0) - exact) / (estimates.std(0) / math.sqrt(estimates.shape[0]))


def test_labelled_branch_first_is_refused_saying_one_estimator_per_branch():
    a, b, w = _params()
    est_z = storch.estimator("reparameterization", plate="z")
    est_y = storch.estimator("expect", plate="y")
    with storch.Graph():
        _labelled(est_z, a, b, w)
        with pytest.raises(storch.PlateError) as info:
            _unlabelled(est_z, est_y, a, b, w)
    text = str(info.value)
    assert "makes its calls ONE partition" in text
    assert "This call depends on no earlier call of 'z'" in text  # (its distribution carries no 'z')
    assert "create one estimator per branch, storch.estimator(...) for each" in text
    # before the suggestions for a real sequence
    assert text.index("one estimator per branch") < text.index("(1) start a new partition")


def test_a_step_that_depends_on_the_partition_is_not_called_a_branch():
    """A step that reads the partition (a transition) and a node drawn after it: the sequence advice only."""
    est = storch.estimator("reparameterization", plate="z")
    with storch.Graph():
        z0 = est(Normal(torch.zeros(()), 1.0))
        y = storch.estimator("expect", plate="y")(Bernoulli(logits=torch.zeros(())))
        with pytest.raises(storch.PlateError) as info:
            est(Normal(z0 + y, 1.0))
    assert "depends on no earlier call" not in str(info.value)
    assert "one estimator per branch" in str(info.value)  # (what a partition is: said in every case)


def test_unlabelled_branch_first_warns_once_naming_the_inherited_plates():
    a, b, w = _params()
    est_z = storch.estimator("reparameterization", plate="z")
    est_y = storch.estimator("expect", plate="y")
    with storch.Graph(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _unlabelled(est_z, est_y, a, b, w)
        z_l = _labelled(est_z, a, b, w)
        x = storch.denote_independent(XL, 0, "lab2")
        storch.add_cost(0.0 * est_z(Normal(a * x, 1.0)), name="third")  # a third independent call: no second warning
    found = [c for c in caught if issubclass(c.category, storch.IndependentStepWarning)]
    assert len(found) == 1
    text = str(found[0].message)
    assert "'y' (size 3), 'unl' (size 4)" in text and "12x the samples" in text
    assert "one estimator per branch" in text
    assert found[0].filename == __file__  # points at the user's call
    # what it warns about: the labelled z is drawn for every label and unlabelled data point
    assert [p.name for p in z_l.plates] == ["z", "y", "unl", "lab"]
    assert tuple(z_l.tensor.shape) == (1, K, 4, 3)


def test_the_warning_can_be_silenced_and_is_not_raised_for_one_estimator_per_branch():
    a, b, w = _params()
    est_y = storch.estimator("expect", plate="y")
    with storch.Graph(), warnings.catch_warnings():
        warnings.simplefilter("error", storch.IndependentStepWarning)
        # one estimator per branch: the labelled z has its own plates only
        _unlabelled(storch.estimator("reparameterization", plate="zu"), est_y, a, b, w)
        z_l = _labelled(storch.estimator("reparameterization", plate="zl"), a, b, w)
        assert [p.name for p in z_l.plates] == ["zl", "lab"]
    est_z = storch.estimator("reparameterization", plate="z")
    with storch.Graph(), warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", category=storch.IndependentStepWarning)  # the documented opt-out
        _unlabelled(est_z, est_y, a, b, w)
        _labelled(est_z, a, b, w)


@pytest.mark.parametrize("shared", [True, False])
def test_both_layouts_are_unbiased(shared):
    """The warning is about work, not bias: the shared estimator's gradient (the labelled z drawn 12x) and that
    of one estimator per branch both match the exact gradient (z-test over 400 estimates)."""
    a, b, w = _params()
    exact = torch.cat([g.reshape(-1) for g in torch.autograd.grad(_exact(a, b, w), (a, b, w))])
    est_y = storch.estimator("expect", plate="y")
    est_u = storch.estimator("reparameterization", plate="zu")
    est_l = est_u if shared else storch.estimator("reparameterization", plate="zl")
    torch.manual_seed(3)
    estimates, values = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", storch.IndependentStepWarning)
        for _ in range(400):
            with storch.Graph():
                _unlabelled(est_u, est_y, a, b, w)
                _labelled(est_l, a, b, w)
                loss = storch.surrogate_loss()
                estimates.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, (a, b, w))]))
                values.append(loss.detach())
    z = _z_scores(torch.stack(estimates), exact)
    assert z.abs().max() < 4, z
    assert _z_scores(torch.stack(values)[:, None], _exact(a, b, w).detach()).abs().max() < 4


# (the documented uses that are not reported, with score: tests/score/test_partition_branches_score.py)
