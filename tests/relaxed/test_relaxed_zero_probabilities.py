"""Probabilities that are exactly 0 (``probs=``) are never drawn by the relaxed family.

torch computes the logits of a Bernoulli, Categorical or OneHotCategorical given by ``probs`` from
probabilities clamped to [eps, 1 - eps]. The relaxed estimators add noise to those logits (Gumbel-max,
logistic), so before ``storch_relaxed._params.exact_logits`` they drew a value of probability 0
about eps of the time: 1.2e-7 per entry in float32, 0.5-1.5 % in bfloat16, where these tests see it
(``gumbel_straight_through`` on Bernoulli(probs=[0, 0.4, 1]) drew 1 at p = 0 and 0 at p = 1; rebar
and relax drew masked categories). ``d.sample()`` never draws them: an action a mask forbids.

The masked policy a user writes, ``probs = σ(x) * mask`` or ``softmax(x) * mask / Σ``, is the model of
the unbiasedness tests: the gradient with respect to ``x`` against exact enumeration (z-test), and a
learned temperature and RELAX's network stay finite while they train on it.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Bernoulli, Categorical, OneHotCategorical, Poisson

import storch
from storch.testing import assert_unbiased, per_replicate_derivatives, replicate

DRAWS = 4000

HARD = ["gumbel_straight_through", "straight_through", "rebar", "relax", "arm", "disarm"]  # hand out discrete values
KINDS = {"gumbel_straight_through": ("bernoulli", "categorical", "onehot"),
         "straight_through": ("bernoulli", "categorical", "onehot"), "rebar": ("bernoulli", "categorical", "onehot"),
         "relax": ("bernoulli", "categorical", "onehot"), "arm": ("bernoulli",), "disarm": ("bernoulli",),
         "gumbel_softmax": ("bernoulli", "categorical", "onehot")}
CASES = [(name, kind) for name, kinds in KINDS.items() for kind in kinds]

BERNOULLI_P = [0.0, 0.4, 1.0]  # the first never 1, the last never 0
CATEGORICAL_P = [0.0, 0.5, 0.5, 0.0]  # categories 0 and 3 never drawn


def _distribution(kind: str, dtype: torch.dtype):
    if kind == "bernoulli":
        return Bernoulli(probs=torch.tensor(BERNOULLI_P, dtype=dtype))
    p = torch.tensor(CATEGORICAL_P, dtype=dtype)
    return Categorical(probs=p) if kind == "categorical" else OneHotCategorical(probs=p)


def _drawn(name: str, kind: str, dtype: torch.dtype) -> torch.Tensor:
    """The estimator's DRAWS values as the user's code receives them (the real block only)."""
    # these estimators take a Categorical only as one-hot vectors (categorical="one_hot")
    opt_in = {"categorical": "one_hot"} if kind == "categorical" and name not in ("arm", "disarm") else {}
    est = storch.estimator(name, plate="z", n_samples=DRAWS, **opt_in)
    with storch.Graph():
        z = est(_distribution(kind, dtype))
        return z.tensor.detach()[:DRAWS].to(torch.float64)  # rebar/relax/arm/disarm: the first block


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bfloat16", "float32"])
@pytest.mark.parametrize("name,kind", [c for c in CASES if c[0] in HARD])
def test_values_of_probability_zero_are_never_drawn(name, kind, dtype):
    torch.manual_seed(0)
    z = _drawn(name, kind, dtype)
    if kind == "bernoulli":
        assert set(z.unique().tolist()) <= {0.0, 1.0}
        assert (z[:, 0] == 0).all(), f"{name} drew 1 at p = 0 in {int(z[:, 0].sum())} of {DRAWS} draws"
        assert (z[:, 2] == 1).all(), f"{name} drew 0 at p = 1 in {int((z[:, 2] == 0).sum())} of {DRAWS} draws"
        # the possible entry is still drawn as often as its probability says (4 standard errors)
        assert abs(float(z[:, 1].mean()) - 0.4) < 4 * math.sqrt(0.4 * 0.6 / DRAWS)
    else:  # relaxations hand out one-hot vectors for a Categorical they take (categorical="one_hot")
        counts = z.reshape(DRAWS, 4).sum(0)
        assert counts[0] == 0 and counts[3] == 0, f"{name} drew masked categories: counts {counts.tolist()}"
        assert abs(float(counts[1]) / DRAWS - 0.5) < 4 * math.sqrt(0.25 / DRAWS)


@pytest.mark.parametrize("kind", ["bernoulli", "categorical", "onehot"])
def test_gumbel_softmax_relaxes_masked_values_towards_zero(kind):
    """The relaxed sample's hard value (argmax, or > 1/2) is never a value of probability 0, and its
    weight there is below eps of bfloat16 (it was up to 0.5 at p = 0 before)."""
    torch.manual_seed(1)
    z = _drawn("gumbel_softmax", kind, torch.bfloat16)
    eps = torch.finfo(torch.bfloat16).eps
    if kind == "bernoulli":
        assert float(z[:, 0].max()) < eps and float(z[:, 2].min()) > 1 - eps
    else:
        z = z.reshape(DRAWS, 4)
        assert float(z[:, [0, 3]].max()) < eps
        assert set(z.argmax(-1).unique().tolist()) <= {1, 2}


# -- unbiased on a masked policy ------------------------------------------------------------------

MASK_B = torch.tensor([1.0, 0.0, 1.0])  # σ(x) * mask: the middle entry is never 1
MASK_C = torch.tensor([True, False, True, True, False])  # softmax(x) * mask / Σ: 3 of 5 categories
X_B = torch.tensor([0.3, -0.2, -0.6], dtype=torch.float64)
X_C = torch.tensor([0.2, -0.3, 0.5, -1.0, 0.7], dtype=torch.float64)
VALUES = torch.tensor([0.3, 5.0, 1.1, -0.4, 5.0], dtype=torch.float64)  # 5.0: the cost of masked values


def _masked_probs_c(x: torch.Tensor) -> torch.Tensor:
    p = torch.softmax(x, -1) * MASK_C
    return p / p.sum(-1, keepdim=True)


def _bernoulli_exact(x: torch.Tensor) -> torch.Tensor:
    p = torch.sigmoid(x) * MASK_B
    return (p * 0.55 ** 2 + (1 - p) * 0.45 ** 2).sum()


def _categorical_exact(x: torch.Tensor) -> torch.Tensor:
    return (_masked_probs_c(x) * VALUES).sum()


def _model(est, kind: str):
    def model(x):
        if kind == "bernoulli":
            b = est(Bernoulli(probs=torch.sigmoid(x) * MASK_B))
            storch.add_cost(((b - 0.45) ** 2).sum(-1))
        else:
            z = est(OneHotCategorical(probs=_masked_probs_c(x)))
            storch.add_cost((z * VALUES).sum(-1))
    return model


@pytest.mark.parametrize("name,kind", [("arm", "bernoulli"), ("disarm", "bernoulli"), ("rebar", "bernoulli"),
                                       ("relax", "bernoulli"), ("rebar", "onehot"), ("relax", "onehot")])
def test_gradient_on_a_masked_policy_is_unbiased(name, kind):
    torch.manual_seed(3)
    theta, exact = (X_B, _bernoulli_exact) if kind == "bernoulli" else (X_C, _categorical_exact)
    with storch.Graph():
        leaf, x = replicate(theta, 4000)
        _model(storch.estimator(name, plate="z"), kind)(x)
        (got,) = per_replicate_derivatives(storch.surrogate_loss(), leaf, 1)
    x0 = theta.clone().requires_grad_(True)
    (want,) = torch.autograd.grad(exact(x0), x0)
    assert torch.isfinite(got).all()
    assert_unbiased(got, want, f"{name} {kind} masked gradient")
    # no signal through a masked entry: its estimate is 0 (as its exact derivative), up to the rounding
    # of the renormalisation Σ
    masked = ~MASK_B.bool() if kind == "bernoulli" else ~MASK_C
    assert float(got[:, masked].abs().max()) < 1e-12


@pytest.mark.parametrize("kind", ["bernoulli", "onehot"])
def test_relax_trains_finitely_on_a_masked_policy(kind):
    """RELAX trains its temperature, η and network on the variance of the gradient (one Adam step per
    ``storch.backward()``): they move and stay finite, as does the policy's gradient, when the policy has
    probabilities that are exactly 0."""
    torch.manual_seed(4)
    est = storch.estimator("relax", plate="z", n_samples=4)
    before = [p.detach().clone() for p in est.parameters()]
    theta = (X_B if kind == "bernoulli" else X_C).clone().requires_grad_(True)
    model = _model(est, kind)
    for _ in range(5):
        theta.grad = None
        with storch.Graph():
            model(theta)
            storch.backward()
        assert torch.isfinite(theta.grad).all()
    after = list(est.parameters())
    assert all(torch.isfinite(p).all() for p in after)
    assert all(not torch.equal(a.detach(), b) for a, b in zip(after, before)), "relax's update did not run"


@pytest.mark.parametrize("fill", [-math.inf, -1e9], ids=["-inf", "-1e9"])
@pytest.mark.parametrize("name", ["rebar", "relax"])
def test_masked_logits_give_finite_unbiased_gradients(name, fill):
    """logits.masked_fill(~mask, -inf) (the masking idiom of the docs) made REBAR's and RELAX's noise
    conditioned on the sample overflow (exp(-log p)): NaN gradients in every estimate, though the loss
    was finite (found by porting a relaxed top-k model). z-test against exact enumeration."""
    torch.manual_seed(5)
    est = storch.estimator(name, plate="z")
    with storch.Graph():
        leaf, x = replicate(X_C, 4000)
        z = est(OneHotCategorical(logits=x.masked_fill(~MASK_C, fill)))
        storch.add_cost((z * VALUES).sum(-1))
        (got,) = per_replicate_derivatives(storch.surrogate_loss(), leaf, 1)
    x0 = X_C.clone().requires_grad_(True)
    (want,) = torch.autograd.grad(_categorical_exact(x0), x0)
    assert torch.isfinite(got).all()
    assert_unbiased(got, want, f"{name}, logits masked with {fill}")


# -- GO on categories of probability 0 or nearly 0 ------------------------------------------------
# GO's summation by parts ran over all K categories in index order: a masked category k was never
# sampled, yet its term ∇P(k) = ∇P(k - 1) ≠ 0 belonged to the gradient (z up to 245 against
# enumeration), and the cost saw k as the neighbour of k - 1. A category of probability e^-30 in the
# middle of the order is exact in expectation only: its term is O(1 / p) with probability p, so every
# realistic mean missed it (the same z). storch_relaxed.go now orders each row's possible categories
# (rare ones last) and leaves the impossible ones out.

GO_THETA = torch.tensor([0.3, -0.5, 1.0, 0.2, -1.0], dtype=torch.float64)
GO_CASES = {"masked -inf": [0.0, -math.inf, 0.0, -math.inf, 0.0], "probs 0": [0.0, 1.0, 0.0, 1.0, 0.0],
            "near-masked -30": [0.0, -30.0, 0.0, -30.0, 0.0], "extreme": [30.0, -30.0, 0.0, 29.0, -80.0]}
GO_MASK = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0], dtype=torch.float64)


def _go_probs(theta: torch.Tensor, case: str) -> torch.Tensor:
    if case == "probs 0":  # softmax(θ) * mask / Σ: probabilities exactly 0
        p = torch.softmax(theta, -1) * GO_MASK.to(theta.dtype)
        return p / p.sum(-1, keepdim=True)
    return torch.softmax(theta + torch.tensor(GO_CASES[case], dtype=theta.dtype), -1)


def _go_estimates(theta, build, cost):
    """R = 4000 GO estimates of ∇ E[cost(k)]; also the categories the cost saw (neighbours included)."""
    seen = []
    with storch.Graph():
        leaf, x = replicate(theta, 4000)
        k = build(x)
        seen.append(k.tensor.detach())
        storch.add_cost(cost(k))
        (got,) = per_replicate_derivatives(storch.surrogate_loss(), leaf, 1)
    return got, seen[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("onehot", [False, True], ids=["categorical", "onehot"])
@pytest.mark.parametrize("case", list(GO_CASES))
def test_go_on_impossible_and_rare_categories_is_unbiased(case, onehot, dtype):
    torch.manual_seed(6)
    values = torch.arange(5, dtype=dtype)
    est = storch.estimator("go", plate="z")

    def build(x):
        probs = _go_probs(x, case)
        if case != "probs 0":  # the logits as the user writes them (-inf, -30, ...)
            return est((OneHotCategorical if onehot else Categorical)(logits=x + torch.tensor(GO_CASES[case], dtype=dtype)))
        return est((OneHotCategorical if onehot else Categorical)(probs=probs))

    def cost(k):
        v = (k * values).sum(-1) if onehot else k.to(dtype)
        return (v - 1.3) ** 2

    got, seen = _go_estimates(GO_THETA.to(dtype), build, cost)
    x0 = GO_THETA.clone().requires_grad_(True)
    (want,) = torch.autograd.grad((_go_probs(x0, case) * (torch.arange(5.0, dtype=torch.float64) - 1.3) ** 2).sum(), x0)
    assert torch.isfinite(got).all()
    # atol: a masked θ_k's derivative is 0 up to rounding (1e-9 in float32: the renormalisation Σ)
    atol = 1e-6 if dtype == torch.float32 else 1e-9
    assert_unbiased(got.to(torch.float64), want, f"go {case} {'onehot' if onehot else 'categorical'} {dtype}", atol=atol)
    # the cost never saw a category of probability 0 (in this dtype), neighbours included
    cats = seen.argmax(-1) if onehot else seen
    assert (_go_probs(GO_THETA.to(dtype), case)[cats.unique()] > 0).all(), f"the cost saw {cats.unique().tolist()}"


def test_go_on_rows_that_mask_different_categories():
    """Own batch of 3 rows (independent dimensions, one neighbour each), each masking other categories:
    the first and last category, a rare one beside a masked one."""
    torch.manual_seed(7)
    masks = torch.tensor([[0.0, -math.inf, 0.0, -math.inf, 0.0], [-math.inf, 0.0, 0.0, 0.0, -math.inf],
                          [0.0, 0.0, -30.0, -math.inf, 0.0]], dtype=torch.float64)
    theta = torch.tensor([[0.3, -0.5, 1.0, 0.2, -1.0], [0.1, 0.4, -0.6, 0.9, 0.0], [-0.2, 0.5, 0.3, 0.0, 0.8]],
                         dtype=torch.float64)
    c = torch.tensor([1.3, 2.2, 0.7], dtype=torch.float64)
    est = storch.estimator("go", plate="z")

    def build(x):
        k = est(Categorical(logits=x + masks))
        assert k.shape == (3,)
        return k

    got, seen = _go_estimates(theta, build, lambda k: ((k.to(torch.float64) - c) ** 2).sum(-1))
    x0 = theta.clone().requires_grad_(True)
    exact = (torch.softmax(x0 + masks, -1) * (torch.arange(5.0, dtype=torch.float64)[:, None] - c).T ** 2).sum()
    (want,) = torch.autograd.grad(exact, x0)
    assert_unbiased(got, want.reshape(-1), "go rows with different masks")
    possible = torch.isfinite(masks)
    for row in range(3):
        assert possible[row, seen[..., row].unique()].all(), f"row {row}: the cost saw {seen[..., row].unique().tolist()}"


def test_go_neighbours_follow_the_order_of_the_possible_categories():
    """Index order over the categories of probability >= 1e-3, then the rarer possible ones by
    decreasing probability; a masked category is nobody's neighbour (the last possible one keeps x)."""
    torch.manual_seed(8)
    n = 300
    with storch.Graph():
        k = storch.estimator("go", plate="z", n_samples=n)(
            Categorical(logits=torch.tensor([0.0, -30.0, 0.0, -math.inf, 0.0, -20.0], dtype=torch.float64)))
        x, nb = k.tensor[:n], k.tensor[n:]
    assert set(x.unique().tolist()) == {0, 2, 4}
    following = {0: 2, 2: 4, 4: 5, 5: 1, 1: 1}  # 5 (e^-20) before 1 (e^-30); 1 is the last possible
    assert all(following[a] == b for a, b in zip(x.tolist(), nb.tolist()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_go_on_bernoulli_bits_with_infinite_logits(dtype):
    """Bits masked by logits + [−inf, 0, +inf, 0]: bit 0 is 0 surely, bit 2 is 1 surely. go raised bit 0
    to its neighbour 1 regardless (``raised = x < 0.5``), so the cost saw the impossible 1, and a cost
    that is +inf there (a log-policy that forbids it) gave NaN (−inf · 0); log p(x) was NaN too (torch's
    Bernoulli log_prob at an infinite logit). The neighbour's coefficient −σ'(−∞) ∇θ is exactly 0: it is
    not evaluated, the masked bits' derivatives are exactly 0, the others unbiased (exact enumeration)."""
    torch.manual_seed(9)
    theta = torch.tensor([0.3, -0.5, 1.0, 0.2], dtype=dtype)
    mask = torch.tensor([-math.inf, 0.0, math.inf, 0.0], dtype=dtype)
    w = torch.tensor([1.0, 2.0, -1.0, 0.5], dtype=dtype)
    inf = torch.tensor(math.inf, dtype=dtype)
    est = storch.estimator("go", plate="z")

    def f(z):  # not additive over the bits; +inf at the values the mask forbids
        return (((z * w).sum(-1) - 0.7) ** 2 + torch.where(z[..., 0] > 0.5, inf, 0.0 * inf.new_ones(()))
                + torch.where(z[..., 2] < 0.5, inf, 0.0 * inf.new_ones(())))

    got, seen = _go_estimates(theta, lambda x: est(Bernoulli(logits=x + mask)), f)
    assert torch.isfinite(got).all()
    assert (seen[..., 0] == 0).all() and (seen[..., 2] == 1).all(), "the cost saw a value of probability 0"
    assert (got[:, 0] == 0).all() and (got[:, 2] == 0).all()
    # exact: enumerate bits 1 and 3, bits 0 and 2 at their sure values
    x0 = theta.to(torch.float64).clone().requires_grad_(True)
    p = torch.sigmoid(x0)
    w64 = w.to(torch.float64)
    exact = sum((p[1] if a else 1 - p[1]) * (p[3] if b else 1 - p[3])
                * ((torch.tensor([0.0, a, 1.0, b], dtype=torch.float64) * w64).sum() - 0.7) ** 2
                for a in (0, 1) for b in (0, 1))
    (want,) = torch.autograd.grad(exact, x0)
    assert_unbiased(got[:, [1, 3]].to(torch.float64), want[[1, 3]], f"go Bernoulli infinite logits {dtype}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_go_on_bernoulli_probs_exactly_0_and_1_never_sees_the_impossible_value(dtype):
    """Bernoulli(probs=θ), θ = [1, 0.3, 0, 0.8], a cost that is +inf at the impossible values (x₀ = 0, x₂ = 1).
    The bit at θ = 0 kept its neighbour 1 and the bit at θ = 1 was ordered (1, 0), its neighbour 0: the cost saw
    both impossible values (NonFiniteCostError with this cost). As for a Categorical's probs 0, the one-sided
    derivatives on the boundary (which need the cost there) are not estimated: exactly 0; the free bits are
    unbiased against exact enumeration."""
    torch.manual_seed(10)
    theta = torch.tensor([1.0, 0.3, 0.0, 0.8], dtype=dtype)
    w = torch.tensor([1.0, 2.0, -1.5, 0.5], dtype=dtype)
    inf = torch.tensor(math.inf, dtype=dtype)
    est = storch.estimator("go", plate="z")

    def f(z):  # not additive over the bits; +inf at the values of probability 0
        bad = (z[..., 0] < 0.5) | (z[..., 2] > 0.5)
        return torch.where(bad, inf, ((z * w).sum(-1) - 0.7) ** 2)

    got, seen = _go_estimates(theta, lambda x: est(Bernoulli(probs=x)), f)
    assert torch.isfinite(got).all()
    assert (seen[..., 0] == 1).all() and (seen[..., 2] == 0).all(), "the cost saw a value of probability 0"
    assert (got[:, 0] == 0).all() and (got[:, 2] == 0).all()
    x0 = theta.to(torch.float64).clone().requires_grad_(True)
    w64 = w.to(torch.float64)
    exact = sum((x0[1] if a else 1 - x0[1]) * (x0[3] if b else 1 - x0[3])
                * ((torch.tensor([1.0, a, 0.0, b], dtype=torch.float64) * w64).sum() - 0.7) ** 2
                for a in (0, 1) for b in (0, 1))
    (want,) = torch.autograd.grad(exact, x0)
    assert_unbiased(got[:, [1, 3]].to(torch.float64), want[[1, 3]], f"go Bernoulli probs on the boundary {dtype}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_go_on_bernoulli_with_a_mask_multiplied_into_probs(dtype):
    """probs = σ(θ) · mask (action masking), a different mask per row, a cost that is +inf where a masked bit
    is 1: the masked bits had their neighbour 1 and the cost saw it (NonFiniteCostError). Now never, and the
    gradient (θ is shared by the rows; ∇p = 0 at the masked entries) is unbiased against exact enumeration."""
    torch.manual_seed(11)
    theta = torch.tensor([0.2, -0.5, 0.4], dtype=dtype)
    mask = torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 0.0]], dtype=dtype)
    w = torch.tensor([1.0, 2.0, -1.0], dtype=dtype)
    inf = torch.tensor(math.inf, dtype=dtype)
    est = storch.estimator("go", plate="z")

    def f(z):  # (..., 2 rows, 3 bits) -> (...)
        bad = ((z * (1 - mask)).sum(-1) > 0).any(-1)
        return torch.where(bad, inf, (((z * w).sum(-1) - 0.3) ** 2).sum(-1))

    got, seen = _go_estimates(theta, lambda x: est(Bernoulli(probs=torch.sigmoid(x) * mask)), f)
    assert torch.isfinite(got).all()
    assert ((seen * (1 - mask)) == 0).all(), "the cost saw a value of probability 0"
    x0 = theta.to(torch.float64).clone().requires_grad_(True)
    m64, w64 = mask.to(torch.float64), w.to(torch.float64)
    exact = 0.0
    for r in range(2):
        p = torch.sigmoid(x0) * m64[r]
        for bits in range(8):
            z = torch.tensor([(bits >> i) & 1 for i in range(3)], dtype=torch.float64)
            exact = exact + torch.prod(torch.where(z > 0.5, p, 1 - p)) * ((z * w64).sum() - 0.3) ** 2
    (want,) = torch.autograd.grad(exact, x0)
    assert_unbiased(got.to(torch.float64), want, f"go Bernoulli probs * mask {dtype}")


# -- a Poisson whose rate is exactly 0 (a zero-inflated Poisson) ----------------------------------------
# GO's term was (P - ⊥P) / ⊥p(x) with the CDF P = gammaincc(x + 1, λ), whose derivative at λ = 0 torch
# computes as 0 · log 0 = NaN, and its log p was torch's, whose derivative is 0 / 0 there: the gradient of
# every parameter (λ of Poisson(λ z)) was NaN although d rate / d λ = 0 there.

def _zip_cost(k):
    return (k - 3.0) ** 2 + 0.4 * k ** 3


def _poisson_mean_cost(lam: torch.Tensor, top: int = 80) -> torch.Tensor:
    """E f(k), k ~ Poisson(λ), λ > 0, by enumeration truncated at ``top``."""
    k = torch.arange(top + 1, dtype=lam.dtype)
    return (torch.exp(k * lam.log() - lam - torch.lgamma(k + 1)) * _zip_cost(k)).sum()


@pytest.mark.parametrize("upstream", ["expect", "score"])
def test_go_on_a_zero_inflated_poisson_is_unbiased(upstream):
    """z ~ Bernoulli(π), k ~ Poisson(λ z): where z = 0 the rate is exactly 0."""
    torch.manual_seed(17)
    theta = torch.tensor([0.4, 0.3], dtype=torch.float64)  # π = σ(θ₀), λ = exp(θ₁)
    if upstream == "score":
        pytest.importorskip("storch_score")  # (not installed with this family alone)
    up = storch.estimator(upstream, plate="z", **({"n_samples": 2} if upstream == "score" else {}))
    est = storch.estimator("go", plate="k")
    with storch.Graph():
        leaf, x = replicate(theta, DRAWS)
        z = up(Bernoulli(logits=x[0]))
        storch.add_cost(_zip_cost(est(Poisson(x[1].exp() * z))))
        (got,) = per_replicate_derivatives(storch.surrogate_loss(), leaf, 1)
    t = theta.clone().requires_grad_(True)
    pi = torch.sigmoid(t[0])
    (want,) = torch.autograd.grad((1 - pi) * 9.0 + pi * _poisson_mean_cost(t[1].exp()), t)
    assert torch.isfinite(got).all()
    print(assert_unbiased(got, want, f"go, zero-inflated Poisson below {upstream}").table())


def test_go_poisson_derivative_at_a_rate_of_0_is_f1_minus_f0():
    """A rate that is a parameter at 0 (its boundary): ∂_λ E f = f(1) − f(0) (E f is entire in λ), from the
    neighbour x + 1 = 1 as at any rate; a rate above 0 beside it."""
    torch.manual_seed(18)
    theta = torch.tensor([0.0, 1.2], dtype=torch.float64)
    est = storch.estimator("go", plate="k")
    with storch.Graph():
        leaf, x = replicate(theta, DRAWS)
        storch.add_cost(_zip_cost(est(Poisson(x))).sum())
        (got,) = per_replicate_derivatives(storch.surrogate_loss(), leaf, 1)
    # the moments E k = λ, E k² = λ + λ², E k³ = λ³ + 3λ² + λ: ∂ E f = 2λ - 4.6 + 0.4 (3λ² + 6λ)
    want = 2 * theta - 4.6 + 0.4 * (3 * theta ** 2 + 6 * theta)
    assert torch.isfinite(got).all()
    print(assert_unbiased(got, want, "go, Poisson at a rate of 0").table())


@pytest.mark.parametrize("which", ["arm", "disarm", "rebar", "relax"])
def test_relaxed_estimators_on_infinite_logits_refuse_and_name_every_alternative(which):
    """A pinned bit (``logits + mask``, mask ±inf) under arm / disarm / rebar / relax: their formulas (the
    logistic density at α = ±inf, σ(z / λ)) are NaN there, so storch.backward() raises NonFiniteCostError.
    Its message says so and names every estimator that takes infinite logits: it left out importance and mvd
    (which did already), and points to giving the Bernoulli by probs."""
    torch.manual_seed(16)
    pin = torch.tensor([0.0, -math.inf, math.inf, 0.0])
    theta = torch.tensor([0.3, 0.0, 0.0, -0.2], requires_grad=True)
    with storch.Graph():
        b = storch.estimator(which, plate="b")(Bernoulli(logits=theta + pin))
        storch.add_cost(((b * torch.tensor([1.0, 2.0, -1.5, 0.7])).sum(-1) - 0.4) ** 2)
        with pytest.raises(storch.NonFiniteCostError) as info:
            storch.backward()
    text = str(info.value)
    assert f"'{which}' (plate 'b', a Bernoulli)" in text
    assert "the relaxed estimators (arm, disarm, rebar, relax" in text
    assert "Bernoulli(probs=torch.sigmoid(logits.float()))" in text
    for name in ("expect", "unordered_set", "sum_and_sample", "importance", "mvd", "spsa", "go"):
        assert f" {name}," in text or f" {name})" in text or f"({name}," in text, name
