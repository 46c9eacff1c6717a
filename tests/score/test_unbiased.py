"""Unbiasedness z-tests against exact enumeration (plain torch), 4000 seeded estimates each.

Every estimator of the family at orders 1 and 2 (the unordered set estimator with its baseline at
order 1, its max_order; without it at orders 1 and 2), score with leave-one-out also at order 3,
on three problems: one categorical node (K = 5); a two-node chain whose second distribution depends
on the first sample and whose cost depends on θ directly; a data plate with a Bernoulli node of
batch shape (2,) and two costs, one of which does not depend on the sample.
"""

import pytest
import torch
from score_problems import PROBLEMS, Maker, estimates, exact
from storch.testing import assert_unbiased

# unordered set: k = 3 of 5 (categorical), 2 of 3 (chain), 3 of 4 joint values (plate)
K_SET = {"categorical": 3, "chain": 2, "plate": 3}


def _tempered(p):
    # a proposal q ≠ p that covers p's support (detached: q is only sampled from)
    return type(p)(logits=p.logits.detach() * 0.5)


def _constant_baseline(node, cost):
    return torch.tensor(1.5)


CONFIGS = {
    "score@1": ("score", dict(n_samples=1), 1),
    "score@4-leave_one_out": ("score", dict(n_samples=4, baseline="leave_one_out"), 1),
    "score@3-batch_average": ("score", dict(n_samples=3, baseline="batch_average"), 1),
    "score@2-moving_average": ("score", dict(n_samples=2, baseline="moving_average", decay=0.5), 3),
    "score@2-callable": ("score", dict(n_samples=2, baseline=_constant_baseline), 1),
    "reinforce@2": ("reinforce", dict(n_samples=2), 1),
    "importance@2": ("importance", dict(n_samples=2, proposal=_tempered), 1),
    "sum_and_sample@2+2": ("sum_and_sample", dict(n_enumerate=2, n_samples=2), 1),
    "mapo@1+3-leave_one_out": ("mapo", dict(n_enumerate=1, n_samples=3, baseline="leave_one_out"), 1),
    "unordered_set-no-baseline": ("unordered_set", dict(per_plate_n_samples=None, baseline=False), 1),
}


def _maker(name, options, problem):
    opts = dict(options)
    if "per_plate_n_samples" in opts:
        del opts["per_plate_n_samples"]
        opts["n_samples"] = K_SET[problem]
    return Maker(name, **opts)


@pytest.mark.parametrize("problem", list(PROBLEMS))
@pytest.mark.parametrize("config", list(CONFIGS))
def test_orders_1_and_2(problem, config):
    torch.manual_seed(1)
    name, options, steps = CONFIGS[config]
    got = estimates(problem, _maker(name, options, problem), 2, steps=steps)
    want = exact(problem, 2)
    for order, (g, w) in enumerate(zip(got, want), 1):
        assert_unbiased(g, w, f"{config} on {problem}, order {order}")


@pytest.mark.parametrize("problem", list(PROBLEMS))
def test_unordered_set_with_baseline_order_1(problem):
    torch.manual_seed(2)
    got = estimates(problem, Maker("unordered_set", n_samples=K_SET[problem]), 1)
    assert_unbiased(got[0], exact(problem, 1)[0], f"unordered_set (baseline) on {problem}, order 1")


@pytest.mark.parametrize("problem", list(PROBLEMS))
def test_score_leave_one_out_order_3(problem):
    torch.manual_seed(3)
    got = estimates(problem, Maker("score", n_samples=3, baseline="leave_one_out"), 3, replicates=3000)
    for order, (g, w) in enumerate(zip(got, exact(problem, 3)), 1):
        assert_unbiased(g, w, f"score@3 leave-one-out on {problem}, order {order}")
