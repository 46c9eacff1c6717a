"""Sample sets never hold values the model cannot produce (issue 20).

When fewer than k values (or sequences) have positive probability, ``unordered_set`` returns a
smaller set (and, where the support differs between entries of a plate, repeats a possible value
with weight 0); ``sum_and_sample`` keeps impossible values out of its memory, and its unused memory
slots follow a sample. The user's cost is never evaluated on a value the model forbids, so a cost
that is infinite there (a tour that visits a city twice) gives a finite loss and gradient.
"""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Categorical, OneHotCategorical

import storch

torch.set_default_dtype(torch.float64)

XY = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
DIST = torch.cdist(XY, XY)


def tsp_tours(est, theta, seen, **first):
    """One-sample TSP decoding: 3 cities, visited cities masked with -inf; the cost is the open path
    length divided by 'every city visited' (infinite on a tour the mask forbids)."""
    visited = torch.zeros(3, dtype=torch.bool)
    steps = []
    for t in range(3):
        a = est(Categorical(logits=theta[t].masked_fill(visited, -math.inf)), **(first if t == 0 else {}))
        visited = visited | F.one_hot(a, 3).bool()
        steps.append(a)
    length = sum(F.one_hot(steps[i], 3).to(theta.dtype) @ DIST @ F.one_hot(steps[i + 1], 3).to(theta.dtype)
                 for i in range(2))
    cost = length / visited.to(theta.dtype).prod()
    seen.append((steps[0] * 9 + steps[1] * 3 + steps[2]).tensor.detach().reshape(-1))
    storch.add_cost(cost, name="length")
    return steps


def tsp_exact(theta):
    total = 0.0
    for perm in itertools.permutations(range(3)):
        lp, mask = 0.0, torch.zeros(3, dtype=torch.bool)
        for t, a in enumerate(perm):
            lp = lp + torch.log_softmax(theta[t].masked_fill(mask, -math.inf), -1)[a]
            mask = mask | F.one_hot(torch.tensor(a), 3).bool()
        total = total + lp.exp() * (DIST[perm[0], perm[1]] + DIST[perm[1], perm[2]])
    return total


TOURS = {a * 9 + b * 3 + c for a, b, c in itertools.permutations(range(3))}


def test_tsp_unordered_set_at_8_is_exact_and_trains_without_nan():
    """3 cities have 6 tours: unordered_set@8 draws all 6 (plate sizes 3, 6, 6), evaluates the cost
    only on tours, and its gradient is exact enumeration's; 30 training steps stay finite."""
    torch.manual_seed(0)
    theta = torch.randn(3, 3, requires_grad=True)
    est = storch.estimator("unordered_set", plate="tour", n_samples=8)
    seen = []
    with storch.Graph():
        steps = tsp_tours(est, theta, seen)
        assert [s.plates[0].size for s in steps] == [3, 6, 6]
        loss = storch.surrogate_loss()
        g, = torch.autograd.grad(loss, theta)
    assert set(seen[0].tolist()) == TOURS and seen[0].numel() == 6
    want = torch.autograd.grad(tsp_exact(theta), theta)[0]
    err = float((g - want).abs().max())
    assert err < 1e-12, err
    assert float(loss.detach()) == pytest.approx(float(tsp_exact(theta).detach()), rel=1e-12)
    opt = torch.optim.SGD([theta], lr=0.5)
    for _ in range(30):
        opt.zero_grad()
        tsp_tours(est, theta, seen)
        value = storch.backward()
        assert math.isfinite(float(value))
        opt.step()
        assert torch.isfinite(theta).all()
    assert all(set(s.tolist()) <= TOURS for s in seen)
    assert float(tsp_exact(theta).detach()) < float(loss.detach())  # it learned a shorter tour


@pytest.mark.parametrize("k", [4, 8])
def test_tsp_with_a_data_plate_of_different_masks(k):
    """Two instances: one with every city open, one with city 2 already visited (2 tours): the set
    is the largest support's size; the smaller support repeats a tour with weight 0; exact gradient."""
    torch.manual_seed(1)
    theta = torch.randn(3, 3, requires_grad=True)
    est = storch.estimator("unordered_set", plate="tour", n_samples=k)
    start = torch.tensor([[False, False, False], [False, False, True]])
    with storch.Graph():
        visited = storch.denote_independent(start, 0, "data")
        toks = []
        for t in range(2):
            a = est(Categorical(logits=theta[t].masked_fill(visited, -math.inf)))
            visited = visited | F.one_hot(a, 3).bool()
            toks.append(a)
        cost = (1.0 + toks[0] + 2.0 * toks[1]) / visited.to(theta.dtype).sum(-1).clamp_max(2).eq(2).to(theta.dtype)
        storch.add_cost(cost)
        codes = (toks[0] * 3 + toks[1]).tensor  # (k', data)
        w = storch.current_graph().nodes[0]
        loss = storch.surrogate_loss()
        g, = torch.autograd.grad(loss, theta)
        weights = w.weight_values.detach()
    assert codes.shape[0] == min(k, 6)
    ok0 = {a * 3 + b for a, b in itertools.permutations(range(3), 2)}
    assert set(codes[:, 0].tolist()) <= ok0 and set(codes[:, 1].tolist()) <= {1, 3}
    assert torch.isfinite(loss) and torch.isfinite(g).all()
    # the second instance has 2 possible pairs: its other entries repeat one of them with weight 0
    dup = codes[:, 1].unsqueeze(0) == codes[:, 1].unsqueeze(1)
    assert int((weights.reshape(codes.shape)[:, 1] > 0).sum()) == 2 and dup.any(0).all()
    if k >= 6:  # the whole support of both instances: exact
        def exact(th):
            total = 0.0
            for row in start:
                for a, b in itertools.permutations(range(3), 2):
                    if row[a] or row[b]:
                        continue
                    p0 = torch.softmax(th[0].masked_fill(row, -math.inf), -1)[a]
                    p1 = torch.softmax(th[1].masked_fill(row | F.one_hot(torch.tensor(a), 3).bool(), -math.inf), -1)[b]
                    total = total + p0 * p1 * (1.0 + a + 2.0 * b)
            return total / 2
        torch.testing.assert_close(g, torch.autograd.grad(exact(theta), theta)[0], rtol=1e-10, atol=1e-12)


def test_unordered_set_one_node_smaller_support_than_k():
    """Categorical with 3 possible values of 5, k = 4: a set of 3, all possible, exact."""
    theta = torch.tensor([0.2, 0.0, -0.5, 0.0, 1.0], requires_grad=True)
    forbid = torch.tensor([False, True, False, True, False])
    cost_of = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    est = storch.estimator("unordered_set", plate="z", n_samples=4)
    with storch.Graph():
        z = est(OneHotCategorical(logits=theta.masked_fill(forbid, -math.inf)))
        assert z.plates[0].size == 3 and not (z.tensor[:, forbid] > 0).any()
        storch.add_cost((z * cost_of).sum() / (1.0 - (z * forbid.double()).sum()))  # inf on a forbidden value
        g, = torch.autograd.grad(storch.surrogate_loss(), theta)
    p = torch.softmax(theta.masked_fill(forbid, -math.inf), -1)
    want, = torch.autograd.grad((p * cost_of).sum(), theta)
    torch.testing.assert_close(g, want)


def test_unordered_set_beam_path_never_draws_an_impossible_joint_value():
    """3 categorical variables (27 joint values, 4 possible) over budget: stochastic beam search
    draws a set of the 4 possible values, exact."""
    torch.manual_seed(2)
    theta = torch.randn(3, 3, requires_grad=True)
    forbid = torch.tensor([[False, True, True], [False, False, True], [True, False, False]])
    est = storch.estimator("unordered_set", plate="z", n_samples=8, budget=4)
    cost_of = torch.randn(3, 3)
    with storch.Graph():
        z = est(OneHotCategorical(logits=theta.masked_fill(forbid, -math.inf)))
        assert z.plates[0].size == 4
        assert not (z.tensor * forbid).any()
        storch.add_cost((z * cost_of).sum() / (1.0 - (z * forbid.double()).sum()))
        loss = storch.surrogate_loss()
        g, = torch.autograd.grad(loss, theta)
    p = torch.softmax(theta.masked_fill(forbid, -math.inf), -1)
    want, = torch.autograd.grad((p * cost_of).sum(), theta)
    torch.testing.assert_close(g, want)


def test_sum_and_sample_memory_holds_only_possible_values():
    """n_enumerate=4 on a Categorical with 2 possible values: the memory is those 2, no remainder."""
    theta = torch.tensor([0.3, 0.0, -0.2, 0.0], requires_grad=True)
    forbid = torch.tensor([False, True, False, True])
    cost_of = torch.tensor([1.0, 2.0, 3.0, 4.0])
    est = storch.estimator("sum_and_sample", plate="z", n_enumerate=4, n_samples=2)
    with storch.Graph():
        z = est(Categorical(logits=theta.masked_fill(forbid, -math.inf)))
        assert sorted(z.tensor.tolist()) == [0, 2]
        storch.add_cost(F.one_hot(z, 4).double() @ cost_of / (1.0 - forbid.double()[z]))
        loss = storch.surrogate_loss()
        g, = torch.autograd.grad(loss, theta)
    p = torch.softmax(theta.masked_fill(forbid, -math.inf), -1)
    torch.testing.assert_close(loss, (p * cost_of).sum())
    torch.testing.assert_close(g, torch.autograd.grad((p * cost_of).sum(), theta)[0])


def test_sum_and_sample_memory_of_possible_values_with_a_remainder_per_data_point():
    """Two data points, 2 and 4 possible values, n_enumerate=3: the first's memory repeats a possible
    value (counted once), its remainder is empty (samples from p, weight 0); finite, unbiased by
    construction (the first data point is exact)."""
    torch.manual_seed(3)
    theta = torch.tensor([0.3, 0.5, -0.2, 0.1], requires_grad=True)
    forbid = torch.tensor([[False, True, False, True], [False, False, False, False]])
    cost_of = torch.tensor([1.0, 2.0, 3.0, 4.0])
    est = storch.estimator("sum_and_sample", plate="z", n_enumerate=3, n_samples=2)
    with storch.Graph():
        mask = storch.denote_independent(forbid, 0, "data")
        z = est(Categorical(logits=theta.masked_fill(mask, -math.inf)))
        assert not mask.tensor.gather(1, z.tensor.t()).any()  # every value possible for its data point
        storch.add_cost(F.one_hot(z, 4).double() @ cost_of / (1.0 - mask.double().gather(-1, z.unsqueeze(-1)).squeeze(-1)))
        loss = storch.surrogate_loss()
        g, = torch.autograd.grad(loss, theta)
    assert torch.isfinite(loss) and torch.isfinite(g).all()


def test_sum_and_sample_buffer_unused_slots_follow_a_sample():
    """MAPO on the TSP: one data point has 2 remembered tours, the other none, so the second one's 2
    slots are unused: they repeat its first sample (weight 0) instead of the padding token sequence
    (0, 0, 0), which the mask forbids and whose cost is infinite."""
    torch.manual_seed(4)
    theta = torch.randn(3, 3, requires_grad=True)
    seeds = {7: torch.tensor([[0, 1, 2], [2, 1, 0]])}
    est = storch.estimator("sum_and_sample", plate="tour", buffer=2, n_samples=3, memory=seeds)
    with storch.Graph():
        batch = storch.denote_independent(torch.tensor([7, 8]), 0, "data")
        visited = torch.zeros(3, dtype=torch.bool) & (batch > 0).unsqueeze(-1)
        steps = []
        for t in range(3):
            a = est(Categorical(logits=theta[t].masked_fill(visited, -math.inf)),
                    **({"memory_key": batch} if t == 0 else {}))
            visited = visited | F.one_hot(a, 3).bool()
            steps.append(a)
        cost = (F.one_hot(steps[0], 3).double() @ DIST @ F.one_hot(steps[1], 3).double()) / visited.double().prod()
        codes = (steps[0] * 9 + steps[1] * 3 + steps[2]).tensor  # (2 slots + 3 samples, data)
        storch.add_cost(cost)
        loss = storch.surrogate_loss()
        g, = torch.autograd.grad(loss, theta)
    assert set(codes.reshape(-1).tolist()) <= TOURS, codes
    assert codes[:2, 0].tolist() == [0 * 9 + 1 * 3 + 2, 2 * 9 + 1 * 3 + 0]  # the remembered tours
    assert (codes[:2, 1] == codes[2, 1]).all()  # unused slots follow the first sample
    assert torch.isfinite(loss) and torch.isfinite(g).all()


def test_sum_and_sample_beyond_budget_memory_holds_only_possible_values():
    """27 joint values (4 possible) over budget: the beam-search memory of 8 is the 4 possible
    values (no remainder): exact, and never an impossible value."""
    torch.manual_seed(5)
    theta = torch.randn(3, 3, requires_grad=True)
    forbid = torch.tensor([[False, True, True], [False, False, True], [True, False, False]])
    est = storch.estimator("sum_and_sample", plate="z", n_enumerate=8, n_samples=2, budget=4)
    cost_of = torch.randn(3, 3)
    with storch.Graph():
        z = est(OneHotCategorical(logits=theta.masked_fill(forbid, -math.inf)))
        assert not (z.tensor * forbid).any()
        storch.add_cost((z * cost_of).sum() / (1.0 - (z * forbid.double()).sum()))
        loss = storch.surrogate_loss()
        g, = torch.autograd.grad(loss, theta)
    p = torch.softmax(theta.masked_fill(forbid, -math.inf), -1)
    torch.testing.assert_close(loss.detach(), (p * cost_of).sum().detach())
    torch.testing.assert_close(g, torch.autograd.grad((p * cost_of).sum(), theta)[0])


@pytest.mark.parametrize("cls", ["Categorical", "OneHotCategorical"])
@pytest.mark.parametrize("given", ["logits", "probs with a zero"])
def test_joint_log_probs_of_own_batch_dims_are_gathered_from_the_logits(cls, given):
    """A Categorical node with batch dims of its own (3 variables over 4 values: 64 joint values) gets the
    log p of every joint value by gathering its normalised logits, not by log_prob of the joint values
    expanded over the batch, whose backward pass saved (M, *batch, K): the same values and gradients as
    that reference, and no saved tensor as large as it."""
    from torch.distributions import Categorical, OneHotCategorical

    from storch_score._support import enumerate_values

    torch.manual_seed(3)
    dist = {"Categorical": Categorical, "OneHotCategorical": OneHotCategorical}[cls]
    lg = torch.randn(5, 2, 3, 4, requires_grad=True)  # plates (5, 2), own (3,), K = 4
    if given == "logits":
        d = dist(logits=lg)
    else:
        p = lg.softmax(-1) * torch.tensor([1.0, 1.0, 0.0, 1.0])
        d = storch.extending.strict_support(dist(probs=p / p.sum(-1, keepdim=True)))
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        values, lp = enumerate_values(d, 2, 4096, "test", "z")
    assert max(sizes) < 64 * 5 * 2 * 3 * 4  # (M, *batch, K) is not saved
    full = values.reshape((64, 1, 1) + tuple(values.shape[1:]))
    ref = d.log_prob(full.expand((64,) + tuple(d.batch_shape) + tuple(d.event_shape))).sum(-1)
    assert lp.shape == (64, 5, 2)
    finite = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(lp), finite)
    torch.testing.assert_close(lp[finite], ref[finite])
    w = torch.rand(64, 5, 2)
    (g,) = torch.autograd.grad(lp[finite].mul(w[finite]).sum(), lg, retain_graph=True)
    (g_ref,) = torch.autograd.grad(ref[finite].mul(w[finite]).sum(), lg)
    torch.testing.assert_close(g, g_ref)
