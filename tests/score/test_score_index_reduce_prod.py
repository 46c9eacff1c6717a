"""index_reduce(..., reduce="prod") of per-sample values at order 2, z-tested against enumeration.

A product aggregation of masked messages (``b * w`` with ``b`` a Bernoulli per edge, two edges into one node)
failed at the second derivative with torch's "Double backward is unsupported for source when >1 zeros in source
are scattered to the same position": a draw with both edges off puts two zeros at one position. The plate rule
(storch.plates.rules.scatter) computes the product by a segmented scan that autograd differentiates at every
order; score with a leave-one-out baseline is unbiased at orders 0-2 (the old code raised at order 2).
"""

import itertools

import torch
from torch.distributions import Bernoulli

import storch
import storch.testing as kit

F64 = torch.float64
THETA = torch.tensor([0.4, -0.3, 0.8], dtype=F64)
INDEX = torch.tensor([0, 0, 1])  # edges 0 and 1 into node 0, edge 2 into node 1


def _weights(theta):
    return 1.5 - theta  # the messages, also in θ (a pathwise part through the product)


def _cost(out):
    return (out - 0.5).pow(2).sum(-1)


def build(make, theta):
    b = make("b")(Bernoulli(logits=theta))
    out = torch.ones(2, dtype=F64).index_reduce(0, INDEX, b * _weights(theta), "prod", include_self=False)
    storch.add_cost(_cost(out), name="product")


def exact(theta):
    p = torch.sigmoid(theta)
    w = _weights(theta)
    total = theta.new_zeros(())
    for bits in itertools.product((0.0, 1.0), repeat=3):
        b = torch.tensor(bits, dtype=F64)
        prob = torch.where(b > 0, p, 1 - p).prod()
        m = b * w
        out = torch.stack((m[0] * m[1], m[2]))  # the products written out
        total = total + prob * _cost(out)
    return total


def test_a_product_aggregation_of_masked_values_is_unbiased_at_order_two():
    model = kit.Model("index_reduce[prod]", THETA, build, exact, lambda: [Bernoulli(logits=THETA)])
    kit.check_against_enumeration("score", models=[model], orders=(0, 1, 2), n_replicates=2000,
                                  options={"n_samples": 3, "baseline": "leave_one_out"})
