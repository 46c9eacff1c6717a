"""IndependentStepWarning (tests/core/test_partition_branches.py) is not raised for documented partitions whose steps
do not depend on each other but keep their plates: a bandit's i.i.d. pulls, a contextual bandit on a data plate,
actions given an option, and a sequence that depends on its previous step (score: in the score environment)."""

import warnings

import torch
from torch.distributions import Bernoulli, Categorical

import storch


def _no_independent_step_warning(build):
    with storch.Graph(), warnings.catch_warnings():
        warnings.simplefilter("error", storch.IndependentStepWarning)
        build()


def test_iid_pulls_of_a_bandit_are_not_reported():
    """Documented uses whose steps do not depend on each other (docs/partitions.md): they keep their plates."""
    theta = torch.zeros(3, requires_grad=True)
    est = storch.estimator("score", plate="pulls", n_samples=4, baseline="leave_one_out")

    def bandit():
        for _ in range(5):
            arm = est(Categorical(logits=theta))  # no plates at all, every step
            storch.add_cost(-(arm == 2).double(), name="reward")
    _no_independent_step_warning(bandit)

    contexts = torch.randn(6, 2)
    policy = torch.nn.Linear(2, 3)
    est2 = storch.estimator("score", plate="ctx_pulls", n_samples=2)

    def contextual():
        x = storch.denote_independent(contexts, 0, "batch")
        for _ in range(3):
            arm = est2(Categorical(logits=policy(x)))  # the data plate at every step
            storch.add_cost(-(arm == 1).float(), name="reward")
    _no_independent_step_warning(contextual)


def test_actions_given_an_option_and_a_dependent_sequence_are_not_reported():
    theta_o = torch.zeros(2, requires_grad=True)
    theta_a = torch.zeros(2, 3, requires_grad=True)

    def options():
        o = storch.estimator("score", plate="opt", n_samples=2)(Categorical(logits=theta_o))
        act = storch.estimator("score", plate="ep", n_samples=2)
        for _ in range(3):
            a = act(Categorical(logits=theta_a[o]))  # carries 'opt', not 'ep': as the first step
            storch.add_cost(a.double(), name="c")
    _no_independent_step_warning(options)

    est = storch.estimator("score", plate="seq", n_samples=3)

    def rnn():
        x = storch.denote_independent(torch.randn(4), 0, "batch")
        h = x
        for _ in range(3):
            b = est(Bernoulli(logits=h))
            h = h + b  # the next step reads this one
        storch.add_cost(h, name="c")
    _no_independent_step_warning(rnn)
