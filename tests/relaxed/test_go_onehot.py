"""GO on OneHotCategorical: z-tests (R = 4000 seeded estimates, 4 standard errors) against enumeration.

Three problems: one K = 4 node whose cost also depends on θ directly (a pathwise term); a two-node
chain whose second distribution depends on the first one-hot sample; a data plate of 3 points.
"""

from __future__ import annotations

import itertools

import torch
from torch.distributions import OneHotCategorical

import storch
from storch.testing import assert_unbiased

from relaxed_problems import estimates, exact_derivatives

F64 = torch.float64
V4 = torch.tensor([1.0, -0.5, 2.0, 0.3], dtype=F64)
W4 = torch.tensor([0.4, 1.0, -1.0, 0.2], dtype=F64)
THETA4 = torch.tensor([0.2, -0.4, 0.9, -1.1], dtype=F64)


def _check(name, model, exact_fn, theta):
    g, = estimates(model, theta, 1)
    report = assert_unbiased(g, exact_derivatives(exact_fn, theta, 1)[0].reshape(-1), f"go {name} order 1")
    print(f"{report.name}: max |z| = {report.max_abs_z:.2f}")


def test_onehot_k4_with_a_pathwise_term():
    torch.manual_seed(60)
    est = storch.estimator("go", plate="x")

    def model(th):
        x = est(OneHotCategorical(logits=th))
        assert x.shape == (4,)
        storch.add_cost(((x * V4).sum() - 0.5 * th[0]) ** 2 + th[1] * (x * W4).sum())

    def exact(th):
        p = torch.softmax(th, -1)
        return (p * ((V4 - 0.5 * th[0]) ** 2 + th[1] * W4)).sum()

    _check("K=4 pathwise", model, exact, THETA4)


def test_onehot_two_node_chain():
    torch.manual_seed(61)
    e1, e2 = storch.estimator("go", plate="x1"), storch.estimator("go", plate="x2")
    theta = torch.tensor([0.3, -0.2, 0.5, 0.1, -0.6, 0.4], dtype=F64)
    shift = torch.tensor([[0.0, 1.0, -1.0], [0.5, -0.5, 0.0], [-1.0, 0.0, 1.0]], dtype=F64)
    v3 = torch.tensor([0.0, 1.0, 2.5], dtype=F64)

    def model(th):
        x1 = e1(OneHotCategorical(logits=th[:3]))
        x2 = e2(OneHotCategorical(logits=th[3:] + x1 @ shift))
        storch.add_cost(((x2 * v3).sum() - (x1 * v3).sum() * 0.7) ** 2, name="c2")
        storch.add_cost((x1 * v3).sum(), name="c1")

    def exact(th):
        total = th.new_zeros(())
        p1 = torch.softmax(th[:3], -1)
        for i in range(3):
            p2 = torch.softmax(th[3:] + shift[i], -1)
            total = total + p1[i] * ((p2 * (v3 - v3[i] * 0.7) ** 2).sum() + v3[i])
        return total

    _check("chain", model, exact, theta)


def test_onehot_with_a_data_plate_and_own_batch_dims():
    torch.manual_seed(62)
    est = storch.estimator("go", plate="x")
    offsets = torch.tensor([[0.0, 0.5, -0.5], [1.0, 0.0, 0.0], [-0.3, 0.2, 0.8]], dtype=F64)  # 3 data points
    theta = torch.tensor([[0.2, -0.1, 0.4], [-0.5, 0.3, 0.0]], dtype=F64)  # 2 own batch elements, K = 3
    v3 = torch.tensor([1.0, -1.0, 0.5], dtype=F64)

    def model(th):
        data = storch.denote_independent(offsets, 0, "data")
        x = est(OneHotCategorical(logits=th + data))  # batch (2,): two jointly sampled one-hot latents
        assert x.shape == (2, 3)
        storch.add_cost(((x * v3).sum() - 0.3) ** 2)

    def exact(th):
        total = th.new_zeros(())
        for off in offsets:
            p = torch.softmax(th + off, -1)  # (2, 3)
            for i, j in itertools.product(range(3), range(3)):
                total = total + p[0, i] * p[1, j] * (v3[i] + v3[j] - 0.3) ** 2
        return total / len(offsets)

    _check("data plate", model, exact, theta)


def test_onehot_neighbours_are_one_hot_and_the_plate_is_n_times_1_plus_m():
    torch.manual_seed(63)
    with storch.Graph():
        x = storch.estimator("go", plate="x", n_samples=2)(OneHotCategorical(logits=torch.zeros(3, 4)))
        raw = x.tensor
        assert x.plates[0].size == 2 * (1 + 3) and x.shape == (3, 4)  # m = 3 latents (K does not count)
        assert torch.equal(raw.sum(-1), torch.ones(raw.shape[:-1]))  # every entry is one-hot
