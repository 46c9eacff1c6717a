"""GO on Binomial, Geometric and NegativeBinomial: z-tests (R = 4000 seeded estimates, 4 standard errors)
against exact enumeration (a truncated support for Geometric and NegativeBinomial, whose tail beyond it
is below 1e-30).

The cost is a table lookup (``TABLE[k]``, no derivative in k at all) and not additive over the two
dimensions of a node, so each neighbour block matters; every family is given by ``logits`` and by
``probs``, as a plain distribution and inside ``Independent``. Then the boundary cases: probabilities
exactly 0 or 1 give the exact one-sided derivative (or a refusal where the distribution has no finite
sample), infinite logits give exactly 0 and hand no impossible value to the cost, a differentiated
``total_count`` is refused.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Binomial, Geometric, Independent, NegativeBinomial

import storch
from storch.testing import assert_unbiased, per_replicate_derivatives, replicate

DRAWS = 4000
F64 = torch.float64
TABLE = torch.tensor([0.3, -1.2, 2.0, 0.7, -0.4, 1.5, 0.0, -2.0, 0.9, 1.1, -0.8, 0.5], dtype=F64)
TOP = 400  # truncation of the unbounded supports: P(X > 400) < 1e-30 for every parameter below
N = torch.tensor([3.0, 5.0], dtype=F64)  # Binomial total_count per dimension
R = torch.tensor([2.0, 1.5], dtype=F64)  # NegativeBinomial total_count per dimension
LOGITS = torch.tensor([0.4, -0.7], dtype=F64)
PROBS = torch.tensor([0.35, 0.6], dtype=F64)


def table(k):
    """f(k) = TABLE[min(k, 11)]: a lookup, not smooth (not even defined between counts)."""
    return TABLE[k.long().clamp(max=len(TABLE) - 1)]


def cost(k):
    """Not additive over the two dimensions (last dim of k)."""
    return table(k[..., 0]) * table(k[..., 1]) + table(k[..., 1])


def _build(family: str, param: torch.Tensor, by: str):
    probs, logits = (param, None) if by == "probs" else (None, param)
    if family == "binomial":
        return Binomial(N.to(param.dtype), probs=probs, logits=logits)
    if family == "geometric":
        return Geometric(probs=probs, logits=logits)
    return NegativeBinomial(R.to(param.dtype), probs=probs, logits=logits)


def _pmf(family: str, param: torch.Tensor, by: str, k: torch.Tensor) -> torch.Tensor:
    """p(k) per dimension, shape (len(k), 2), by hand (polynomial in p: exact one-sided derivatives at 0 and 1)."""
    p = param if by == "probs" else torch.sigmoid(param)
    kk = k.unsqueeze(-1)
    if family == "binomial":
        ok = kk <= N
        c = torch.lgamma(N + 1) - torch.lgamma(kk + 1) - torch.lgamma((N - kk).clamp_min(0) + 1)
        return torch.where(ok, c.exp() * p ** kk * (1 - p) ** (N - kk).clamp_min(0), torch.zeros((), dtype=F64))
    if family == "geometric":
        return p * (1 - p) ** kk
    c = torch.lgamma(kk + R) - torch.lgamma(R) - torch.lgamma(kk + 1)
    return c.exp() * p ** kk * (1 - p) ** R


def _exact_gradient(family: str, theta: torch.Tensor, by: str, f=None) -> torch.Tensor:
    t = theta.detach().clone().requires_grad_(True)
    k = torch.arange(int(N.max()) + 1 if family == "binomial" else TOP, dtype=F64)
    pm = _pmf(family, t, by, k)  # (K, 2)
    fk = (f or cost)(torch.stack(torch.meshgrid(k, k, indexing="ij"), -1))  # (K, K)
    (g,) = torch.autograd.grad((pm[:, 0, None] * pm[None, :, 1] * fk).sum(), t)
    return g


def _estimates(theta, build, f=cost, n=DRAWS):
    """n GO estimates of ∇ E[f(k)], and every value the cost saw (neighbours included)."""
    with storch.Graph():
        leaf, x = replicate(theta, n)
        k = build(x)
        seen = k.tensor.detach()
        storch.add_cost(f(k))
        (got,) = per_replicate_derivatives(storch.surrogate_loss(), leaf, 1)
    return got, seen


@pytest.mark.parametrize("wrap", ["plain", "independent"])
@pytest.mark.parametrize("by", ["logits", "probs"])
@pytest.mark.parametrize("family", ["binomial", "geometric", "negative_binomial"])
def test_go_counts_are_unbiased_with_a_table_lookup_cost(family, by, wrap):
    torch.manual_seed(70)
    theta = LOGITS if by == "logits" else PROBS
    est = storch.estimator("go", plate="k")

    def build(x):
        d = _build(family, x, by)
        k = est(Independent(d, 1) if wrap == "independent" else d)
        assert k.shape == (2,)
        return k

    got, seen = _estimates(theta, build)
    assert ((seen >= 0) & (seen == seen.round())).all()
    if family == "binomial":
        assert (seen <= N).all(), "the cost saw a count above total_count (the last value has no neighbour)"
    report = assert_unbiased(got, _exact_gradient(family, theta, by), f"go {family} {by} {wrap}")
    print(f"{report.name}: z = {[round(float(z), 2) for z in report.z]}")


def test_go_neighbours_of_a_binomial_stop_at_total_count():
    """x = total_count has no next value: its neighbour is x itself (its term 0); the plate is n (1 + m)."""
    torch.manual_seed(71)
    n = 200
    with storch.Graph():
        k = storch.estimator("go", plate="k", n_samples=n)(Binomial(torch.tensor([2.0, 1.0]), logits=torch.zeros(2)))
        raw = k.tensor
    assert raw.shape == (n * 3, 2)
    x, first, second = raw[:n], raw[n:2 * n], raw[2 * n:]
    assert torch.equal(first[:, 1], x[:, 1]) and torch.equal(second[:, 0], x[:, 0])
    assert torch.equal(first[:, 0], torch.where(x[:, 0] < 2, x[:, 0] + 1, x[:, 0]))
    assert torch.equal(second[:, 1], torch.where(x[:, 1] < 1, x[:, 1] + 1, x[:, 1]))
    assert (x[:, 0] == 2).any() and (x[:, 1] == 1).any()  # the last values were drawn


# -- probabilities on their boundary ----------------------------------------------------------------
# E f is a polynomial in p (Binomial) or a power series (Geometric, NegativeBinomial), so at p = 0 or 1 a
# parameter θ = p has one-sided derivatives, which the exact functions above give by autograd.


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_go_binomial_probs_exactly_0_and_1_is_exact(dtype):
    """Binomial(total_count [3, 5], probs=θ) at θ = (1, 0) and (0, 1). At p = 1 every draw is x = n, the last
    value in the order (0, ..., n), which has no term: that order gave exactly 0. (A Bernoulli at probs 0 or 1 is
    not differentiated instead, so that the cost never sees its impossible value: docs/estimators/go.md.) Such an entry is ordered (n, ..., 0): the neighbour
    of n is n − 1, and the term n (f(n) − f(n − 1)) ∇p is the exact one-sided derivative. At p = 0 the draw is 0
    and its neighbour 1 gives n (f(1) − f(0)) ∇p."""
    torch.manual_seed(72)
    est = storch.estimator("go", plate="k")
    for theta in ([1.0, 0.0], [0.0, 1.0]):
        th = torch.tensor(theta, dtype=dtype)
        got, seen = _estimates(th, lambda x: est(Binomial(N.to(dtype), probs=x)), lambda k: cost(k.to(F64)))
        assert torch.isfinite(got).all() and (seen <= N.to(dtype)).all() and (seen >= 0).all()
        want = _exact_gradient("binomial", th.to(F64), "probs")
        assert want.abs().min() > 0.1  # the exact one-sided derivatives are not 0
        # (both entries sure: every estimate is the same number, which must equal the exact one to rounding)
        assert_unbiased(got.to(F64), want, f"go Binomial probs {theta} {dtype}", atol=1e-6 if dtype == torch.float32 else 1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_go_binomial_infinite_logits_are_exact_zeros_and_hide_impossible_counts(dtype):
    """Binomial(total_count [3, 5, 4, 2], logits=θ + [−∞, 0, +∞, 0]): entry 0 is 0 surely, entry 2 is 4 surely.
    Their coefficients σ'(±∞) are exactly 0: no neighbour is evaluated (the cost is +inf at the impossible
    counts), their derivatives are exactly 0, the others' unbiased (exact enumeration of entries 1 and 3)."""
    torch.manual_seed(73)
    n4 = torch.tensor([3.0, 5.0, 4.0, 2.0], dtype=dtype)
    theta = torch.tensor([0.3, -0.5, 1.0, 0.2], dtype=dtype)
    mask = torch.tensor([-math.inf, 0.0, math.inf, 0.0], dtype=dtype)
    inf = torch.tensor(math.inf, dtype=dtype)
    est = storch.estimator("go", plate="k")

    def f(k):
        impossible = (k[..., 0] != 0) | (k[..., 2] != 4)
        return torch.where(impossible, inf, table(k[..., 1]).to(dtype) * table(k[..., 3]).to(dtype))

    got, seen = _estimates(theta, lambda x: est(Binomial(n4, logits=x + mask)), f)
    assert torch.isfinite(got).all()
    assert (seen[..., 0] == 0).all() and (seen[..., 2] == 4).all(), "the cost saw a count of probability 0"
    assert (got[:, 0] == 0).all() and (got[:, 2] == 0).all()
    t = theta.to(F64).clone().requires_grad_(True)
    k1, k3 = torch.arange(6, dtype=F64), torch.arange(3, dtype=F64)
    p1 = Binomial(torch.tensor(5.0, dtype=F64), logits=t[1]).log_prob(k1).exp()
    p3 = Binomial(torch.tensor(2.0, dtype=F64), logits=t[3]).log_prob(k3).exp()
    (want,) = torch.autograd.grad((p1[:, None] * p3[None, :] * table(k1)[:, None] * table(k3)[None, :]).sum(), t)
    assert_unbiased(got[:, [1, 3]].to(F64), want[[1, 3]], f"go Binomial infinite logits {dtype}")


def test_go_geometric_probs_exactly_1_is_exact():
    """Geometric(probs=θ), θ = (1, 0.4): at p = 1 every draw is 0, and its neighbour 1 gives the term
    (f(0) − f(1)) ∇p / p(0), the exact one-sided derivative (no reordering needed: 0 is not the last value)."""
    torch.manual_seed(74)
    theta = torch.tensor([1.0, 0.4], dtype=F64)
    got, seen = _estimates(theta, lambda x: storch.estimator("go", plate="k")(Geometric(probs=x)))
    assert torch.isfinite(got).all() and (seen[0, :, 0] == 0).all()  # the real draws (block 0 of the plate)
    want = _exact_gradient("geometric", theta, "probs")
    assert want[0].abs() > 0.1
    assert_unbiased(got, want, "go Geometric probs 1")


def test_go_geometric_logit_plus_inf_is_an_exact_zero_and_hides_the_impossible_count():
    torch.manual_seed(75)
    theta = torch.tensor([0.3, -0.2], dtype=F64)
    mask = torch.tensor([math.inf, 0.0], dtype=F64)

    def f(k):
        return torch.where(k[..., 0] != 0, torch.tensor(math.inf, dtype=F64), table(k[..., 1]))

    got, seen = _estimates(theta, lambda x: storch.estimator("go", plate="k")(Geometric(logits=x + mask)), f)
    assert torch.isfinite(got).all() and (seen[..., 0] == 0).all() and (got[:, 0] == 0).all()
    t = theta.clone().requires_grad_(True)
    k = torch.arange(TOP, dtype=F64)
    p = torch.sigmoid(t[1])
    (want,) = torch.autograd.grad((p * (1 - p) ** k * table(k)).sum(), t)
    assert_unbiased(got[:, 1], want[1], "go Geometric logit +inf")


def test_go_negative_binomial_probs_exactly_0_is_exact():
    """NegativeBinomial(r, probs=θ), θ = (0, 0.3): at p = 0 every draw is 0; the neighbour 1 gives
    r (f(1) − f(0)), the exact one-sided derivative."""
    torch.manual_seed(76)
    theta = torch.tensor([0.0, 0.3], dtype=F64)
    got, seen = _estimates(theta, lambda x: storch.estimator("go", plate="k")(NegativeBinomial(R, probs=x)))
    assert torch.isfinite(got).all() and (seen[0, :, 0] == 0).all()  # the real draws (block 0 of the plate)
    want = _exact_gradient("negative_binomial", theta, "probs")
    assert want[0].abs() > 0.1
    assert_unbiased(got, want, "go NegativeBinomial probs 0")


@pytest.mark.parametrize("make,match", [
    (lambda: Geometric(probs=torch.tensor([0.0, 0.5]), validate_args=False), "Geometric with probs 0"),
    (lambda: Geometric(logits=torch.tensor([-math.inf, 0.0])), "Geometric with probs 0"),
    (lambda: NegativeBinomial(2.0, probs=torch.tensor([1.0, 0.5]), validate_args=False), "probs 1"),
    (lambda: NegativeBinomial(2.0, logits=torch.tensor([math.inf, 0.0])), "probs 1"),
    (lambda: NegativeBinomial(2.0, logits=torch.tensor([-math.inf, 0.0])), "logit of -inf"),
    (lambda: Binomial(torch.tensor(3.0, requires_grad=True), logits=torch.zeros(2)), "total_count"),
    (lambda: NegativeBinomial(torch.tensor(3.0, requires_grad=True), logits=torch.zeros(2)), "total_count"),
    (lambda: Geometric(logits=torch.tensor([-120.0, 0.0])), "underflows to 0 in torch.float32"),
    (lambda: NegativeBinomial(2.0, logits=torch.tensor([20.0, 0.0])), r"rounds to 1 in torch.float32: above about 16\.6"),
    (lambda: NegativeBinomial(2.0, logits=torch.tensor([40.0, 0.0], dtype=F64)),
     r"rounds to 1 in torch.float64: above about 36\.7"),
], ids=["geometric-probs-0", "geometric-logit-minus-inf", "negbin-probs-1", "negbin-logit-plus-inf",
        "negbin-logit-minus-inf", "binomial-total-count-grad", "negbin-total-count-grad", "geometric-logit-f32-underflow",
        "negbin-logit-f32-rounds-to-1", "negbin-logit-f64-rounds-to-1"])
def test_go_refuses_what_it_cannot_differentiate_or_sample(make, match):
    """Geometric at probs 0 and NegativeBinomial at probs 1 have no finite sample (torch draws inf, or a huge
    count through its clamp); a NegativeBinomial logit of −∞ makes torch's log_prob NaN; a differentiated
    total_count would get a silent 0 (GO differentiates the CDF in probs only)."""
    with storch.Graph(), pytest.raises(storch.UnsupportedDistributionError, match=match):
        storch.estimator("go", plate="k")(make())


@pytest.mark.parametrize("logit,dtype", [(20.0, torch.float32), (17.0, torch.float32), (40.0, F64)])
def test_go_negative_binomial_logit_that_rounds_probs_to_1_says_so(logit, dtype):
    """A finite logit whose sigmoid rounds to 1 in its dtype (float32 from about 16.6): the refusal names that
    case, not only "a logit of +inf" (which the user did not give), and what to do; the logit of -inf has its
    own message. A logit just below (16 in float32) is accepted."""
    def call(x):
        with storch.Graph():
            storch.estimator("go", plate="k")(NegativeBinomial(torch.tensor(2.0, dtype=dtype), logits=x))

    with pytest.raises(storch.UnsupportedDistributionError) as info:
        call(torch.tensor([logit, 0.0], dtype=dtype))
    message = str(info.value)
    assert "a logit of +inf, or one so large that sigmoid rounds to 1" in message
    assert "Keep probs below 1" in message and "log_prob NaN" not in message
    call(torch.tensor([16.0 if dtype == torch.float32 else 36.0, 0.0], dtype=dtype))


@pytest.mark.parametrize("family", ["binomial", "negative_binomial"])
@pytest.mark.parametrize("wrap", [False, True])
def test_go_differentiated_total_count_is_refused_and_not_listed(family, wrap):
    """A total_count that requires grad would get no gradient from GO (its term differentiates probs / logits
    only): refused by check_distribution with storch.extending.differentiated_total_count's reason (the words
    mvd uses), and Go.supports / the registry's list of supporting estimators agree; a fixed count is listed."""
    from storch.extending import differentiated_total_count
    from storch.registry import supporting_estimators

    def make(count):
        d = (Binomial if family == "binomial" else NegativeBinomial)(count, logits=LOGITS)
        return Independent(d, 1) if wrap else d

    go = storch.get_estimator_class("go")
    learned = make(torch.tensor([3.0, 5.0], dtype=F64, requires_grad=True))
    reason = differentiated_total_count(learned)
    assert reason is not None and reason.startswith("with a total_count that requires grad")
    assert not go.supports(learned) and "go" not in supporting_estimators(learned)
    with storch.Graph(), pytest.raises(storch.UnsupportedDistributionError) as info:
        storch.estimator("go", plate="k")(learned)
    name = "Binomial" if family == "binomial" else "NegativeBinomial"
    assert str(info.value) == f"estimator 'go' (plate 'k') does not support {name} {reason}"
    assert ("'score'" in reason) == (family == "negative_binomial")  # r is real: score differentiates it
    fixed = make(torch.tensor([3.0, 5.0], dtype=F64))
    assert differentiated_total_count(fixed) is None
    assert go.supports(fixed) and "go" in supporting_estimators(fixed)


def _smooth(k):
    """Smooth and bounded in k (a quadratic cost's heavy-tailed estimates made the sample variances of a
    Geometric too noisy to rank at R = 4000: ratios 0.25 to 1.03 over 12 seeds)."""
    s = 1 - torch.exp(-0.5 * k)
    return (s ** 2).sum(-1) + 0.5 * s[..., 0] * s[..., 1]


@pytest.mark.parametrize("family", ["binomial", "geometric", "negative_binomial"])
def test_go_counts_have_lower_variance_than_score_with_as_many_evaluations(family):
    """The docstring's claim: on a smooth cost, GO (1 + m = 3 evaluations per sample) has a lower variance per
    component than score with n_samples = 3 and the leave-one-out baseline (3 evaluations); both unbiased.
    The largest ratio go / score over 12 seeds: 0.44 (binomial), 0.18 (geometric), 0.17 (negative binomial);
    the test asserts only that GO's is lower."""
    pytest.importorskip("storch_score")  # (not installed with this family alone)
    want = _exact_gradient(family, LOGITS, "logits", _smooth)
    var = {}
    for i, (name, kw) in enumerate([("go", {}), ("score", {"n_samples": 3, "baseline": "leave_one_out"})]):
        torch.manual_seed(77 + i)
        est = storch.estimator(name, plate="k", **kw)
        got, _ = _estimates(LOGITS, lambda x: est(_build(family, x, "logits")), _smooth)
        assert_unbiased(got, want, f"{name} {family} smooth cost")
        var[name] = got.var(0)
    ratio = var["go"] / var["score"]
    print(f"go {family}: variance / score's (3 samples, leave-one-out) = {[round(float(r), 3) for r in ratio]}")
    assert (ratio < 1).all()


@pytest.mark.parametrize("family", ["binomial", "geometric", "negative_binomial"])
def test_go_counts_compiled_step_equals_eager_and_checks_its_refusals(family):
    """storch.compile (backend=None): the replayed gradient equals the eager one; the refusal of a Geometric
    with probs 0 / a NegativeBinomial with probs 1 is an ``assume`` of the replayed step (no branch on values)."""
    theta = torch.nn.Parameter(torch.tensor([0.3, -0.5], dtype=F64))
    est = storch.estimator("go", plate="k", n_samples=4)

    def step(x):
        with storch.Graph():
            k = est(_build(family, theta + x, "logits"))
            storch.add_cost(cost(k))
            return storch.surrogate_loss()

    compiled = storch.compile(step, backend=None)
    zero = torch.zeros(2, dtype=F64)
    for _ in range(2):
        torch.manual_seed(78)
        (eager,) = torch.autograd.grad(step(zero), theta)
        torch.manual_seed(78)
        (replayed,) = torch.autograd.grad(compiled(zero), theta)
        assert torch.equal(eager, replayed)
    if family != "binomial":
        bad = torch.tensor([-math.inf if family == "geometric" else math.inf, 0.0], dtype=F64)
        with pytest.raises(storch.StorchError, match="probs 0" if family == "geometric" else "probs 1"):
            compiled(bad)
