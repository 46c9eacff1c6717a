"""A RAM-like glimpse (found by porting): a continuous location l ~ Normal(mu, 1) read through an index, the crop
im[round(l) + arange(2)], beside a smooth term 0.1 l². A pathwise estimator is refused for it (the index jumps
where l crosses k + 1/2: storch.plates.integer_reads); the score function, the estimator the refusal points to,
is exact (z-test against the normal's cdf)."""

import torch
from torch.distributions import Normal

import storch
from storch.testing import assert_unbiased

D = torch.float64
IM = torch.tensor([1.0, -0.5, 2.0, 0.3, -1.2, 0.7, 0.1], dtype=D)
MU = 2.3


def _expected(mu: torch.Tensor) -> torch.Tensor:
    k = torch.arange(6, dtype=D)
    n = Normal(mu, 1.0)
    hi = torch.where(k < 5, n.cdf(k + 0.5), torch.ones((), dtype=D))
    lo = torch.where(k > 0, n.cdf(k - 0.5), torch.zeros((), dtype=D))
    crop = IM[:6] + IM[1:]  # the glimpse im[k] + im[k + 1]
    return (crop * (hi - lo)).sum() + 0.1 * (mu ** 2 + 1)


def _glimpse(l):
    k = l.round().clamp(0, 5).long()
    return IM[k + torch.arange(2)].sum(-1) + 0.1 * l ** 2


def test_a_glimpse_read_by_index_is_exact_with_the_score_function():
    mu = torch.tensor(MU, dtype=D, requires_grad=True)
    exact, = torch.autograd.grad(_expected(mu), mu)
    est = storch.estimator("score", plate="l", n_samples=4, baseline="leave_one_out")
    grads = []
    for seed in range(400):
        torch.manual_seed(seed)
        m = torch.tensor(MU, dtype=D, requires_grad=True)
        with storch.Graph():
            l = est(Normal(m, 1.0))
            storch.add_cost(_glimpse(l), name="glimpse")
            g, = torch.autograd.grad(storch.surrogate_loss(), m)
        grads.append(g.detach())
    assert_unbiased(torch.stack(grads)[:, None], exact.detach()[None], name="d/dmu")


def test_the_same_glimpse_is_refused_with_reparameterization():
    mu = torch.tensor(MU, dtype=D, requires_grad=True)
    torch.manual_seed(0)
    with storch.Graph():
        l = storch.estimator("reparameterization", plate="l", n_samples=4)(Normal(mu, 1.0))
        storch.add_cost(_glimpse(l), name="glimpse")
        try:
            storch.surrogate_loss()
        except storch.OrderError as e:
            assert "integer value that long read" in str(e) and "'score'" in str(e)
        else:
            raise AssertionError("a glimpse read by index from a reparameterised location was accepted")


def test_a_score_node_drawn_from_an_index_of_a_reparameterised_sample_is_refused():
    """Found by review: x ~ N(2.3, 1) reparameterised, k = x.clamp(0, 5).long(), z ~ Categorical(logits=EMB[k])
    under 'score' with leave_one_out, cost VAL[z] + 0.1 x²: accepted, 0.4598 for the exact -0.3229 (z = +218). z's
    score term credits its logits, EMB[k], which have no gradient to mu; the jump of k is nowhere."""
    torch.manual_seed(123)
    emb = torch.randn(6, 3, dtype=D) * 2
    val = torch.tensor([1.0, -2.0, 3.0], dtype=D)
    mu = torch.tensor(MU, dtype=D, requires_grad=True)
    for order in (1, 2):
        torch.manual_seed(0)
        with storch.Graph():
            x = storch.estimator("reparameterization", plate="x", n_samples=8)(Normal(mu, 1.0))
            z = storch.estimator("score", plate="z", n_samples=4, baseline="leave_one_out")(
                torch.distributions.Categorical(logits=emb[x.clamp(0, 5).long()]))
            storch.add_cost(val[z] + 0.1 * x ** 2, name="c")
            try:
                storch.surrogate_loss(order=order)
            except storch.OrderError as e:
                assert "reaches node 'z' (estimator 'score')" in str(e) and "Categorical.logits" in str(e)
            else:
                raise AssertionError(f"order {order}: a score node drawn from EMB[x.long()] was accepted")
