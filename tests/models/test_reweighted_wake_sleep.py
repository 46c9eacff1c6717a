"""Reweighted wake-sleep (Bornschein & Bengio 2015; Le et al. 2019) written with storch as a user would, on a model
small enough to enumerate, against exact values.

The model: 3 binary latents z with a learned prior p(z) = Bernoulli(σ(a)), 4 observed bits x with p(x | z) =
Bernoulli(σ(W z + b)), and the encoder q(z | x) = Bernoulli(σ(A x + c)); two data points on a data plate. θ = (a, W,
b), φ = (A, c). With K draws z_k ~ q(z | x), log w_k = log p(x, z_k) - log q(z_k | x) and w̄ = softmax(log w):

- wake-θ: -Σ_k w̄_k ∇θ log p(x, z_k), the gradient of the negative IWAE bound -log (1/K Σ_k w_k) in θ (q does not
  depend on θ, so it is unbiased for ∇θ E[-IWAE_K]);
- wake-φ: -Σ_k w̄_k ∇φ log q(z_k | x), the self-normalised estimate of ∇φ KL(p(z | x) || q(z | x)): unbiased for no
  objective at finite K. Its exact expectation is computed below, and its bias for the KL gradient is measured (|bias|
  / |∇KL| = 1 at K = 1, where the expectation is 0; 0.55, 0.37, 0.22, 0.13, 0.063 at K = 2, 3, 5, 8, 16: K |bias| stays
  0.50-0.55, the O(1/K) of self-normalised importance sampling).

Exact expectations over the K draws come from the multinomial counts of the 8 latent values (C(K + 7, 7) count
vectors, 120 at K = 3; cross-checked against the 512 ordered triples), so they are exact at any K used here.

The storch code (``rws_wake``): the K samples are the estimator's plate (``n_samples=K``), drawn from q's parameters
detached (the sampling is not differentiated); the IWAE bound and the wake-φ loss are values of the whole set,
reduced over the plate's dim of the raw values (read with ``storch.aligned``, the plate last) and added with
``credit=False`` on the plates left (the data plate).
Its gradients are the hand-written RWS gradients bit for bit at the same seed, and so are those of the other layout
(one sample holding the K draws: docs/estimators/vimco.md's recipe).

On the same bound, vimco and score + leave-one-out (sets of K draws, one sample each) are z-tested against the
exact gradient of E[-IWAE_K] in θ and φ. φ's total variance per estimate (K = 3, 2 sets, 8000 estimates): vimco
0.21, score + leave-one-out 1.8, score 18; vimco with one set 0.41 (score, one set, 36). RWS's wake-φ (one set of
3) has 0.45, for another target.
"""

from __future__ import annotations

import itertools
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from storch.testing import assert_unbiased, per_replicate_derivatives, replicate, z_test
from torch.distributions import Bernoulli

import storch

# each test makes its estimators anew (one graph of R replicates each)
pytestmark = pytest.mark.filterwarnings("ignore:storch.estimator.*was created anew:UserWarning")

D, V = 3, 4  # latents, observed bits
SHAPES = {"a": (D,), "W": (V, D), "b": (V,), "A": (D, V), "c": (D,)}  # prior, decoder (θ); encoder (φ)
SIZES = {k: math.prod(s) for k, s in SHAPES.items()}
OFFSETS = dict(zip(SHAPES, itertools.accumulate([0, *SIZES.values()])))
DIM = sum(SIZES.values())
THETA, PHI = slice(0, OFFSETS["A"]), slice(OFFSETS["A"], DIM)
X = torch.tensor([[1.0, 0.0, 1.0, 1.0], [0.0, 1.0, 0.0, 0.0]], dtype=torch.float64)
PARAMS = 0.8 * torch.randn(DIM, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
VALUES = torch.tensor(list(itertools.product([0.0, 1.0], repeat=D)), dtype=torch.float64)  # the 8 latent values
R = 8000  # independent estimates
THRESHOLD = 4.5  # 34 coordinates at once: a false-alarm rate of 34 x 6.8e-6 per test (Bonferroni)


def unpack(params) -> dict:
    return {k: params[OFFSETS[k]:OFFSETS[k] + SIZES[k]].reshape(s) for k, s in SHAPES.items()}


def encoder_logits(p: dict, x):
    return F.linear(x, p["A"], p["c"])


def log_joint(p: dict, x, z):
    """log p(z) + log p(x | z), summed over the bits."""
    return (Bernoulli(logits=p["a"]).log_prob(z).sum(-1)
            + Bernoulli(logits=F.linear(z, p["W"], p["b"])).log_prob(x).sum(-1))


# -- exact values ----------------------------------------------------------------------------------------------


def enumerated(params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log q(z | x) and log p(x, z) at the 8 latent values: (data points, 8) each."""
    p = unpack(params)
    log_q = Bernoulli(logits=encoder_logits(p, X)[:, None, :]).log_prob(VALUES).sum(-1)
    return log_q, log_joint(p, X[:, None, :], VALUES)


def counts(K: int) -> torch.Tensor:
    """Every count vector of K draws over the 8 latent values: (C(K + 7, 7), 8)."""
    n = len(VALUES)
    rows = [[b - a - 1 for a, b in zip((-1, *cut), (*cut, K + n - 1))]
            for cut in itertools.combinations(range(K + n - 1), n - 1)]
    return torch.tensor(rows, dtype=torch.float64)


def _over_counts(params: torch.Tensor, K: int):
    """log q, log p, the log-probability of each count vector (data points, C) and log n (C, 8; -inf where 0)."""
    log_q, log_p = enumerated(params)
    n = counts(K)
    log_pmf = math.lgamma(K + 1) - torch.lgamma(n + 1).sum(-1) + log_q @ n.T
    return log_q, log_p, log_pmf, torch.where(n > 0, n.log(), torch.full_like(n, -math.inf))


def negative_iwae(params: torch.Tensor, K: int) -> torch.Tensor:
    """E_q[-log (1/K Σ_k w_k)], averaged over the data points: its gradient in φ includes the score term."""
    log_q, log_p, log_pmf, log_n = _over_counts(params, K)
    bound = torch.logsumexp((log_p - log_q)[:, None, :] + log_n, -1) - math.log(K)
    return -(log_pmf.exp() * bound).sum(-1).mean()


def rws_expectation(params: torch.Tensor, K: int) -> torch.Tensor:
    """A function whose gradient is the exact expectation of the RWS wake gradients: in θ, ∇θ E[-IWAE_K]; in φ,
    -E[Σ_k w̄_k ∇φ log q(z_k | x)] (the count vector's probability and the weights held fixed)."""
    log_q, log_p, log_pmf, log_n = _over_counts(params, K)
    log_w = log_p - log_q.detach()
    bound = torch.logsumexp(log_w[:, None, :] + log_n, -1) - math.log(K)
    w = torch.softmax(log_w.detach()[:, None, :] + log_n, -1)  # w̄ of each value, given the counts
    return -(log_pmf.exp().detach() * (bound + (w * log_q[:, None, :]).sum(-1))).sum(-1).mean()


def kl_to_posterior(params: torch.Tensor) -> torch.Tensor:
    """KL(p(z | x) || q(z | x)), averaged over the data points."""
    log_q, log_p = enumerated(params)
    log_post = torch.log_softmax(log_p, -1)
    return (log_post.exp() * (log_post - log_q)).sum(-1).mean()


def exact_gradient(f, *args) -> torch.Tensor:
    return torch.autograd.functional.jacobian(lambda t: f(t, *args), PARAMS)


def log_evidence(params: torch.Tensor) -> torch.Tensor:
    return enumerated(params)[1].logsumexp(-1).mean()


# -- the storch code -------------------------------------------------------------------------------------------


def rws_wake(est, params, K: int) -> None:
    """RWS's wake updates with the K samples on the estimator's plate (``est``: ``n_samples=K``)."""
    p = unpack(params)
    x = storch.denote_independent(X, 0, "data")
    logits = encoder_logits(p, x)
    z = est(Bernoulli(logits=logits.detach()))  # the sampling is not differentiated
    log_q = Bernoulli(logits=logits).log_prob(z).sum(-1)
    log_w = log_joint(p, x, z) - log_q.detach()
    (lw, lq), plates = storch.aligned(log_w, log_q, plates=(..., "z"))  # the raw values, z's plate last
    w = torch.softmax(lw.detach(), -1)
    storch.add_cost(-storch.PlateTensor(lw.logsumexp(-1) - math.log(K), plates[:-1]), name="wake_theta", credit=False)
    storch.add_cost(-storch.PlateTensor((w * lq).sum(-1), plates[:-1]), name="wake_phi", credit=False)


def rws_wake_in_one_sample(est, params, K: int) -> None:
    """The other layout (docs/estimators/vimco.md, 'Reweighted wake-sleep'): one sample holds the K draws."""
    p = unpack(params)
    x = storch.denote_independent(X, 0, "data")
    logits = encoder_logits(p, x)
    z = est(Bernoulli(logits=logits.detach().expand(K, D)))
    log_q = Bernoulli(logits=logits).log_prob(z).sum(-1)
    log_p = log_joint(p, x, z)
    w = torch.softmax((log_p - log_q).detach(), 0)
    storch.add_cost(-(w * log_q).sum(), name="wake_phi")
    storch.add_cost(-(torch.logsumexp(log_p - log_q.detach(), 0) - math.log(K)), name="wake_theta")


def negative_iwae_cost(est, params, K: int, vimco: bool = False) -> None:
    """The IWAE bound's score-function gradient: one sample holds the K draws (vimco makes the K copies itself)."""
    p = unpack(params)
    x = storch.denote_independent(X, 0, "data")
    logits = encoder_logits(p, x)
    q = Bernoulli(logits=logits if vimco else logits.expand(K, D))
    z = est(q)
    log_w = log_joint(p, x, z) - q.log_prob(z).sum(-1)
    storch.add_cost(est.bound(log_w) if vimco else -(torch.logsumexp(log_w, 0) - math.log(K)), name="negative_iwae")


def estimates(build, est, K: int, n: int = R, **options) -> torch.Tensor:
    """(n, DIM): n independent estimates (a replicate plate) of the gradient ``build`` gives."""
    with storch.Graph():
        leaf, params = replicate(PARAMS, n)
        build(est, params, K, **options)
        return per_replicate_derivatives(storch.surrogate_loss(), leaf, 1)[0]


def hand_written_rws(params: torch.Tensor, K: int, draws_first: bool = True) -> torch.Tensor:
    """RWS's wake loss in plain torch, the K draws (K, data, D) or, with draws_first=False, (data, K, D)."""
    p = unpack(params)
    logits = encoder_logits(p, X)
    if draws_first:
        z = Bernoulli(logits=logits.detach()).sample((K,))
    else:
        z = Bernoulli(logits=logits.detach()[:, None, :].expand(len(X), K, D)).sample().transpose(0, 1)
    log_q = Bernoulli(logits=logits).log_prob(z).sum(-1)  # (K, data)
    log_w = log_joint(p, X, z) - log_q.detach()
    w = torch.softmax(log_w.detach(), 0)
    return (-(log_w.logsumexp(0) - math.log(K)) - (w * log_q).sum(0)).mean()


# -- the tests -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["plate", "one sample"])
def test_storch_rws_gives_the_hand_written_gradients(layout):
    """Same seed, same draws: the storch step's loss and gradients are the hand-written RWS's, to rounding."""
    K = 5
    params = PARAMS.clone().requires_grad_(True)
    if layout == "plate":
        est, build = storch.estimator("score", plate="z", n_samples=K), rws_wake
    else:
        est, build = storch.estimator("score", plate="z"), rws_wake_in_one_sample
    for seed in range(3):
        torch.manual_seed(seed)
        with storch.Graph():
            build(est, params, K)
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # no UnusedSampleWarning: the sampling is meant to get no gradient
                value = storch.backward()
        got, params.grad = params.grad, None
        torch.manual_seed(seed)
        want_loss = hand_written_rws(params, K, draws_first=layout == "plate")
        (want,) = torch.autograd.grad(want_loss, params)
        torch.testing.assert_close(value, want_loss.detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        assert got[THETA].abs().max() > 0 and got[PHI].abs().max() > 0


def test_the_exact_expectations_over_counts_match_ordered_draws():
    """The count-vector sums used as exact values agree with the sum over all 8^3 ordered triples."""
    K = 3
    triples = torch.tensor(list(itertools.product(range(len(VALUES)), repeat=K)))

    def negative_iwae_by_triples(params):
        log_q, log_p = enumerated(params)
        bound = (log_p - log_q)[:, triples].logsumexp(-1) - math.log(K)
        return -(log_q[:, triples].sum(-1).exp() * bound).sum(-1).mean()

    torch.testing.assert_close(exact_gradient(negative_iwae, K), exact_gradient(negative_iwae_by_triples),
                               rtol=1e-10, atol=1e-12)
    # K = 1: a self-normalised weight of 1, and E_q[∇ log q] = 0; wake-θ is then the ELBO's θ-gradient
    torch.testing.assert_close(exact_gradient(rws_expectation, 1)[PHI], torch.zeros(DIM)[PHI].double(), atol=1e-12,
                               rtol=0)


@pytest.mark.parametrize("layout", ["plate", "one sample"])
def test_wake_theta_is_unbiased_for_the_iwae_bound_and_wake_phi_has_its_exact_mean(layout):
    K = 3
    torch.manual_seed(1)
    if layout == "plate":
        got = estimates(rws_wake, storch.estimator("score", plate="z", n_samples=K), K)
    else:
        got = estimates(rws_wake_in_one_sample, storch.estimator("score", plate="z"), K)
    want = exact_gradient(rws_expectation, K)
    # the θ part of the RWS expectation is the gradient of the IWAE bound
    torch.testing.assert_close(want[THETA], exact_gradient(negative_iwae, K)[THETA], rtol=1e-10, atol=1e-12)
    assert_unbiased(got[:, THETA], want[THETA], f"{layout}: wake-θ against ∇θ E[-IWAE_3]", threshold=THRESHOLD)
    assert_unbiased(got[:, PHI], want[PHI], f"{layout}: wake-φ against its exact mean", threshold=THRESHOLD)
    # and wake-φ is not the KL gradient at K = 3: 8000 estimates reject it (|z| 28 measured)
    assert z_test(got[:, PHI], exact_gradient(kl_to_posterior)[PHI]).max_abs_z > 10


def test_wake_phi_is_biased_for_the_kl_gradient_by_order_one_over_k():
    """Exact: |E[wake-φ] - ∇φ KL(p || q)| relative to |∇φ KL| is 1 at K = 1 and falls as 1/K (K |bias| between 0.49
    and 0.56 from K = 2 to 16); the direction approaches the KL gradient's (cosine 0.983 at K = 2, 0.9995 at 16)."""
    kl = exact_gradient(kl_to_posterior)[PHI]
    ks = [1, 2, 3, 5, 8, 16]
    bias = {K: float((exact_gradient(rws_expectation, K)[PHI] - kl).norm()) for K in ks}
    assert abs(bias[1] / float(kl.norm()) - 1) < 1e-9  # the expectation is 0 at K = 1
    relative = [bias[K] / float(kl.norm()) for K in ks]
    assert all(a > b for a, b in zip(relative, relative[1:])), relative
    scaled = [K * bias[K] for K in ks[1:]]
    assert max(scaled) < 1.15 * min(scaled), scaled  # O(1/K)
    assert relative[ks.index(3)] > 0.3 and relative[-1] < 0.07, relative
    mean16 = exact_gradient(rws_expectation, 16)[PHI]
    assert float(mean16 @ kl / mean16.norm() / kl.norm()) > 0.999


@pytest.mark.parametrize("name", ["vimco", "score + leave_one_out", "score"])
def test_vimco_and_score_on_the_same_bound_are_unbiased(name):
    """Two sets of K = 3 draws each; every coordinate against the exact gradient of E[-IWAE_3] (θ and φ)."""
    K = 3
    torch.manual_seed(2)
    got = _iwae_estimates(name, K)
    assert_unbiased(got, exact_gradient(negative_iwae, K), f"{name}: ∇E[-IWAE_3]", threshold=THRESHOLD)


def _iwae_estimates(name: str, K: int, sets: int = 2) -> torch.Tensor:
    if name == "vimco":
        return estimates(negative_iwae_cost, storch.estimator("vimco", plate="z", n_draws=K, n_samples=sets), K,
                         vimco=True)
    options = {"baseline": "leave_one_out"} if "leave_one_out" in name else {}
    return estimates(negative_iwae_cost, storch.estimator("score", plate="z", n_samples=sets, **options), K)


def test_vimco_has_less_phi_variance_than_score_with_leave_one_out():
    """φ's total variance at two sets of 3 draws (measured 0.21 vimco, 1.8 leave-one-out, 18 score) and vimco's with
    one set against RWS's wake-φ, which draws as many samples (0.41 and 0.45: the same order, for another target)."""
    K = 3
    torch.manual_seed(3)
    variance = {name: float(_iwae_estimates(name, K)[:, PHI].var(0).sum())
                for name in ("vimco", "score + leave_one_out", "score")}
    assert variance["vimco"] < 0.2 * variance["score + leave_one_out"], variance
    assert variance["score + leave_one_out"] < 0.2 * variance["score"], variance
    vimco_one_set = float(_iwae_estimates("vimco", K, sets=1)[:, PHI].var(0).sum())
    rws = float(estimates(rws_wake, storch.estimator("score", plate="z", n_samples=K), K)[:, PHI].var(0).sum())
    assert 0.5 < rws / vimco_one_set < 2, (rws, vimco_one_set)


def test_rws_trains_the_model_and_moves_q_to_the_posterior():
    """300 Adam steps of the storch RWS step (K = 10) from PARAMS: the exact mean log p(x) goes from -2.79 to -0.75
    (the best this model can do for two distinct points is -log 2 = -0.69) and KL(p(z | x) || q) from 0.39 to 0.008."""
    K = 10
    torch.manual_seed(0)
    params = PARAMS.clone().requires_grad_(True)
    opt = torch.optim.Adam([params], lr=0.05)
    est = storch.estimator("score", plate="z", n_samples=K)
    assert float(log_evidence(PARAMS)) < -2.7 and float(kl_to_posterior(PARAMS)) > 0.35
    for _ in range(300):
        opt.zero_grad()
        with storch.Graph():
            rws_wake(est, params, K)
            storch.backward()
        opt.step()
    assert float(log_evidence(params.detach())) > -0.85
    assert float(kl_to_posterior(params.detach())) < 0.05


def test_sleep_phi_is_unbiased_for_the_expected_kl_over_the_model():
    """The sleep-φ update: (z, x) drawn from the model with its parameters detached, the cost -log q(z | x). Its
    mean is ∇φ E_{p(x)} KL(p(z | x) || q(z | x)) (over all 16 x and 8 z: exact)."""
    torch.manual_seed(4)
    prior, likelihood = storch.estimator("score", plate="z"), storch.estimator("score", plate="x")
    with storch.Graph():
        leaf, params = replicate(PARAMS, R)
        p = unpack(params)
        z = prior(Bernoulli(logits=p["a"].detach()))
        x = likelihood(Bernoulli(logits=F.linear(z, p["W"], p["b"]).detach()))
        storch.add_cost(-Bernoulli(logits=encoder_logits(p, x)).log_prob(z).sum(), name="sleep_phi")
        got = per_replicate_derivatives(storch.surrogate_loss(), leaf, 1)[0]

    def expected_negative_log_q(params):
        p = unpack(params)
        xs = torch.tensor(list(itertools.product([0.0, 1.0], repeat=V)), dtype=torch.float64)
        log_pz = Bernoulli(logits=p["a"]).log_prob(VALUES).sum(-1).detach()  # (8,)
        log_px = Bernoulli(logits=F.linear(VALUES, p["W"], p["b"])[:, None, :]).log_prob(xs).sum(-1).detach()
        log_q = Bernoulli(logits=encoder_logits(p, xs)[None, :, :]).log_prob(VALUES[:, None, :]).sum(-1)  # (8, 16)
        return -((log_pz[:, None] + log_px).exp() * log_q).sum()

    want = torch.autograd.functional.jacobian(expected_negative_log_q, PARAMS)
    assert float(want[THETA].abs().max()) == 0  # sleep trains q only
    assert_unbiased(got, want, "sleep-φ", threshold=THRESHOLD)


# -- the natural first attempts, and what storch says ---------------------------------------------------------


def _first_attempt(body, K: int = 4, **options):
    """Run ``body(x, q, z, log_w)`` in a fresh graph: the K samples on the plate, q live (as a first attempt)."""
    est = storch.estimator("score", plate="z", n_samples=K, **options)
    torch.manual_seed(0)
    with storch.Graph():
        params = PARAMS.clone().requires_grad_(True)
        p = unpack(params)
        x = storch.denote_independent(X, 0, "data")
        q = Bernoulli(logits=encoder_logits(p, x))
        z = est(q)
        log_w = log_joint(p, x, z) - q.log_prob(z).sum(-1)
        body(x, q, z, log_w)
        return storch.surrogate_loss()


@pytest.mark.parametrize("reduce", [lambda t: torch.logsumexp(t, 0), lambda t: torch.softmax(t, 0)],
                         ids=["logsumexp", "softmax"])
def test_the_bound_over_the_sample_plate_written_per_sample_is_refused(reduce):
    """As batched code writes it: on a per-sample scalar it would reduce nothing (each entry: -ELBO + log K). The
    refusal names both ways: one sample of K draws / vimco for IWAE, and credit=False for RWS's set losses."""
    with pytest.raises(storch.PlateError) as info:
        _first_attempt(lambda x, q, z, log_w: storch.add_cost(-(reduce(log_w) - math.log(4))))
    message = str(info.value)
    assert "ONE sample" in message and "'vimco'" in message
    assert "reweighted wake-sleep" in message and "credit=False" in message


@pytest.mark.parametrize("how", ["keepdim", "expand"])
@pytest.mark.parametrize("options", [{}, {"baseline": "leave_one_out"}], ids=["score", "leave_one_out"])
def test_a_set_value_broadcast_back_onto_the_sample_plate_is_refused(how, options):
    """The negative IWAE bound reduced over the plate and put back on it (`keepdim=True`, or expanded), one value for
    every entry, added as a credited cost: before, a silent bias (z = 16 against ∇E[-IWAE] with score, 152 with
    leave-one-out, whose baseline cancelled the score term; for keepdim, leave-one-out failed inside its baseline
    with a shape error). Now a CostError naming the plate and both ways. (An expanded value computed on after the
    expand is a full tensor, which storch cannot tell from a cost per sample.)"""

    def body(x, q, z, log_w):
        i = log_w.plate_names.index("z")
        negative_bound = math.log(4) - log_w.tensor.logsumexp(i, keepdim=True)
        if how == "expand":
            negative_bound = negative_bound.expand_as(log_w.tensor)
        storch.add_cost(storch.PlateTensor(negative_bound, log_w.plates), name="negative_iwae")

    with pytest.raises(storch.CostError) as info:
        _first_attempt(body, **options)
    message = str(info.value)
    assert "'negative_iwae'" in message and "all 4 entries of the sample plate 'z'" in message
    assert "ONE sample" in message and "'vimco'" in message and "credit=False" in message


def test_a_set_value_broadcast_back_is_accepted_without_credit_and_on_a_plate_of_one():
    """Controls: credit=False (differentiated as written: the plate's mean of one value is that value), and the
    one-sample layout's plate of size 1 (n_samples=1: one value per entry is every entry's)."""
    K = 4

    def body(x, q, z, log_w):
        i = log_w.plate_names.index("z")
        bound = log_w.tensor.logsumexp(i, keepdim=True) - math.log(K)
        storch.add_cost(-storch.PlateTensor(bound, log_w.plates), name="negative_iwae", credit=False)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", storch.UnusedSampleWarning)  # q is live and gets no credit: as meant here
        loss = _first_attempt(body, K)
    assert torch.isfinite(loss)
    torch.manual_seed(0)
    with storch.Graph():
        _, params = replicate(PARAMS, 3)
        negative_iwae_cost(storch.estimator("score", plate="z"), params, K)
        assert torch.isfinite(storch.surrogate_loss())


def test_a_set_value_added_as_a_plain_tensor_says_which_plates_to_put_it_on():
    """The raw bound (one value per data point) added as it is: refused for its shape, as before; the message used
    to advise only storch.denote_independent (refused for the data plate's name, or a second data plate of the same
    points), and now names the plates it belongs on and credit=False."""

    def body(x, q, z, log_w):
        i = log_w.plate_names.index("z")
        storch.add_cost(-(log_w.tensor.logsumexp(i) - math.log(4)), name="wake_theta", credit=False)

    with pytest.raises(storch.CostError) as info:
        _first_attempt(body)
    message = str(info.value)
    assert "per-sample shape (2,)" in message
    assert "the plates ('data',) that the sample of node 'z' carries besides its sample plate 'z'" in message
    assert "storch.PlateTensor(r, plates)" in message and "credit=False" in message


def test_set_losses_of_a_live_q_warn_and_say_to_detach():
    """The RWS losses reduced over the plate of samples drawn from q's live parameters: the node is upstream of no
    cost (its estimator would add nothing), and the warning names RWS's losses, credit=False and the detach."""

    def body(x, q, z, log_w):
        i = log_w.plate_names.index("z")
        rest = tuple(p for p in log_w.plates if p.name != "z")
        storch.add_cost(-storch.PlateTensor(log_w.tensor.logsumexp(i), rest), name="wake_theta", credit=False)

    with pytest.warns(storch.UnusedSampleWarning) as record:
        _first_attempt(body)
    message = str(record[0].message)
    assert "reweighted wake-sleep" in message and "credit=False" in message and "detached parameters" in message


def test_a_live_log_q_in_the_wake_theta_bound_cancels_wake_phi():
    """docs/estimators/vimco.md: with log q live in the bound, -∇φ IWAE = +Σ w̄_k ∇φ log q(z_k), which cancels the
    wake-φ term: φ's gradient is 0 (to rounding) where the detached version's is not."""
    K = 4
    for live in (True, False):
        est = storch.estimator("score", plate="z", n_samples=K)
        torch.manual_seed(0)
        params = PARAMS.clone().requires_grad_(True)
        with storch.Graph():
            p = unpack(params)
            x = storch.denote_independent(X, 0, "data")
            logits = encoder_logits(p, x)
            z = est(Bernoulli(logits=logits.detach()))
            log_q = Bernoulli(logits=logits).log_prob(z).sum(-1)
            log_w = log_joint(p, x, z) - (log_q if live else log_q.detach())
            (lw, lq), plates = storch.aligned(log_w, log_q, plates=(..., "z"))
            w = torch.softmax(lw.detach(), -1)
            storch.add_cost(-storch.PlateTensor(lw.logsumexp(-1), plates[:-1]), name="wake_theta", credit=False)
            storch.add_cost(-storch.PlateTensor((w * lq).sum(-1), plates[:-1]), name="wake_phi", credit=False)
            (g,) = torch.autograd.grad(storch.surrogate_loss(), params)
        assert (float(g[PHI].abs().max()) < 1e-12) == live, (live, g[PHI])


def test_per_sample_weighted_losses_are_averaged_over_the_plate():
    """The wake losses written per sample, -w̄_k log p(x, z_k) and -w̄_k log q(z_k), with credit=False: storch
    averages a sample plate, so the gradient is RWS's divided by K (the docs say to reduce over the plate)."""
    K = 4
    params = PARAMS.clone().requires_grad_(True)
    est = storch.estimator("score", plate="z", n_samples=K)
    torch.manual_seed(0)
    with storch.Graph():
        p = unpack(params)
        x = storch.denote_independent(X, 0, "data")
        logits = encoder_logits(p, x)
        z = est(Bernoulli(logits=logits.detach()))
        log_q = Bernoulli(logits=logits).log_prob(z).sum(-1)
        log_p = log_joint(p, x, z)
        i = log_p.plate_names.index("z")
        w = storch.PlateTensor(torch.softmax((log_p - log_q).detach().tensor, i), log_p.plates)
        storch.add_cost(-(w * log_p), name="wake_theta", credit=False)
        storch.add_cost(-(w * log_q), name="wake_phi", credit=False)
        (per_sample,) = torch.autograd.grad(storch.surrogate_loss(), params)
    torch.manual_seed(0)
    (rws,) = torch.autograd.grad(hand_written_rws(params, K), params)
    torch.testing.assert_close(K * per_sample, rws, rtol=1e-10, atol=1e-12)


@pytest.mark.usefixtures("restore_validation")
def test_the_rws_step_compiles_and_replays_without_storch(forbid_storch):
    """storch.compile (backend=None) of the RWS step: the replayed calls run no storch code and give the eager
    step's gradients from the same seed."""
    K = 4
    params = PARAMS.clone().requires_grad_(True)
    est = storch.estimator("score", plate="z", n_samples=K)

    def step(params):
        with storch.Graph():
            rws_wake(est, params, K)
            return storch.surrogate_loss()

    compiled = storch.compile(step, backend=None)
    torch.manual_seed(0)
    compiled(params)  # the trace
    eager = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        eager.append(torch.autograd.grad(step(params), params)[0])
    forbid_storch()
    for seed, want in zip((1, 2), eager):
        torch.manual_seed(seed)
        (got,) = torch.autograd.grad(compiled(params), params)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert not torch.equal(eager[0], eager[1])
