"""The unordered set estimator: exact set probabilities, k = K, extreme logits, distributions."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Bernoulli, Categorical, OneHotCategorical

import storch
from storch.testing import assert_unbiased, per_replicate_derivatives, replicate
from storch_score.unordered_set import _linear_ok, _log1mexp, _log_h, _log_h_linear, _set_terms

torch.set_default_dtype(torch.float64)


def _brute_h(p, chosen, removed):
    """p^{D∖C}(S∖C) by summing over every order of S∖C (plain torch)."""
    rest = [s for s in chosen if s not in removed]
    total = torch.zeros(())
    for order in itertools.permutations(rest):
        prob, used = torch.ones(()), sum(p[c] for c in removed) if removed else torch.zeros(())
        for s in order:
            prob = prob * p[s] / (1 - used)
            used = used + p[s]
        total = total + prob
    return total


def test_set_probabilities_match_sum_over_orderings():
    torch.manual_seed(0)
    p = torch.softmax(torch.randn(7) * 2, -1)
    chosen = [4, 1, 6, 2]
    lp = p[chosen].log().unsqueeze(1)
    log_rest = torch.log1p(-p[chosen].sum()).reshape(1)
    h0, h1, h2 = _log_h(lp, log_rest)
    assert torch.allclose(h0.exp(), _brute_h(p, chosen, []), rtol=1e-10)
    for i, s in enumerate(chosen):
        assert torch.allclose(h1[i].exp(), _brute_h(p, chosen, [s]), rtol=1e-10)
        for j, t in enumerate(chosen):
            if i != j:
                assert torch.allclose(h2[i, j].exp(), _brute_h(p, chosen, [s, t]), rtol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k", [1, 2, 5, 8, 12])
def test_linear_programme_matches_log_space(dtype, k):
    """The float64 programme without exp/log per layer (q = h / Π p) gives the weights and baseline
    coefficients of the log-space one (they use differences of log h only), and _set_terms takes it
    where p(D∖S) is not tiny, the log-space one where it is or where an element has probability 0."""
    torch.manual_seed(7)
    for scale in (0.1, 1.0, 4.0):
        lp = torch.randn(k, 30, dtype=dtype) * scale - 3
        lp = lp - torch.logsumexp(torch.cat([lp, torch.zeros(1, 30, dtype=dtype)]), 0)  # p(D∖S) >= some p(s)
        rest = _log1mexp(torch.logsumexp(lp, 0))
        assert _linear_ok(lp, rest)
        a0, a1, a2 = _log_h(lp, rest)
        b0, b1, b2 = _set_terms(lp, rest)
        tol = 1e-4 if dtype == torch.float32 else 1e-10
        assert torch.allclose((lp + b1 - b0).exp(), (lp + a1 - a0).exp(), rtol=tol, atol=tol)  # weights
        coef = lp.unsqueeze(0) + a2 - a1.unsqueeze(1)
        assert torch.allclose((lp.unsqueeze(0) + b2 - b1.unsqueeze(1)).exp(), coef.exp(), rtol=tol, atol=tol)
        assert torch.allclose(b0, _log_h_linear(lp, rest)[0])
    tiny = torch.full((1,), -800.0, dtype=dtype)  # p(D∖S) = e^-800 and p(s) = e^-800: q(∅) would overflow
    assert not _linear_ok(torch.full((k, 1), -800.0, dtype=dtype), tiny)
    if k > 1:  # told that every element is possible, the linear programme overflows and the log one answers
        small = torch.full((k, 1), -800.0, dtype=dtype) + torch.arange(k, dtype=dtype).unsqueeze(1)
        assert not torch.isfinite(_log_h_linear(small, tiny)[0]).all()
        for got, want in zip(_set_terms(small, tiny, True), _log_h(small, tiny)):
            assert torch.equal(got, want)
    # S holds all the mass (p(D∖S) = 0) but every p(s) is large: every p(D∖C) >= min p(s), linear
    whole = torch.log_softmax(torch.randn(k, 5, dtype=dtype), 0)
    assert _linear_ok(whole, torch.full((5,), -1e30, dtype=dtype))
    a0, a1, a2 = _log_h(whole, torch.full((5,), -1e30, dtype=dtype))
    b0, b1, b2 = _log_h_linear(whole, torch.full((5,), -1e30, dtype=dtype))
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    assert torch.allclose((whole + b1 - b0).exp(), (whole + a1 - a0).exp(), rtol=tol, atol=tol)
    assert torch.allclose((whole.unsqueeze(0) + b2 - b1.unsqueeze(1)).exp(),
                          (whole.unsqueeze(0) + a2 - a1.unsqueeze(1)).exp(), rtol=tol, atol=tol)
    assert not _linear_ok(torch.tensor([[-1e30]] + [[-1.0]] * (k - 1), dtype=dtype), torch.zeros(1, dtype=dtype) - 1)


def test_weights_sum_to_one_in_expectation():
    # E[Σ_s w(s)] = Σ_x p(x) = 1 (the unordered-set identity, Kool et al. 2020)
    torch.manual_seed(1)
    theta = torch.tensor([1.0, -0.5, 0.2, 2.0, -1.5, 0.0])
    est = storch.estimator("unordered_set", plate="z", n_samples=3)
    with storch.Graph() as graph:
        _, th = replicate(theta, 4000)
        est(Categorical(logits=th))
        w = graph.nodes[0].weight_values.sum(0)
    assert_unbiased(w.unsqueeze(1), 1.0, "Σ_s w(s)")


@pytest.mark.parametrize("baseline,order", [(True, 1), (False, 2)])
def test_k_equal_to_K_is_exact(baseline, order):
    torch.manual_seed(2)
    theta = torch.tensor([0.3, -1.0, 0.5, 2.0])
    c = torch.tensor([1.0, 4.0, -2.0, 0.5])
    est = storch.estimator("unordered_set", plate="z", n_samples=6, baseline=baseline)  # capped at K = 4
    with storch.Graph():
        leaf, th = replicate(theta, 50)
        z = est(Categorical(logits=th))
        assert z.plates[0].size == 4
        storch.add_cost(F.one_hot(z, 4).to(th.dtype) @ c)
        got = per_replicate_derivatives(storch.surrogate_loss(order=order), leaf, order)
    t = theta.clone().requires_grad_(True)
    g = torch.autograd.grad(torch.softmax(t, -1) @ c, t, create_graph=True)[0]
    want = [g.detach(), torch.stack([torch.autograd.grad(g[i], t, retain_graph=True)[0] for i in range(4)])]
    for o in range(order):
        assert torch.allclose(got[o], want[o].expand_as(got[o]), atol=1e-10), f"order {o + 1}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k", [2, 4, 5])
def test_extreme_logits_give_no_nan(dtype, k):
    torch.manual_seed(3)
    theta = torch.tensor([80.0, 0.0, -80.0, 1e3, -math.inf], dtype=dtype)
    c = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], dtype=dtype)
    for baseline, order in ((True, 1), (False, 2)):
        est = storch.estimator("unordered_set", plate="z", n_samples=k, baseline=baseline)
        with storch.Graph() as graph:
            leaf, th = replicate(theta, 20)
            z = est(Categorical(logits=th))
            storch.add_cost(F.one_hot(z, 5).to(dtype) @ c)
            loss = storch.surrogate_loss(order=order)
            derivatives = per_replicate_derivatives(loss, leaf, order)
            w = graph.nodes[0].weight_values
        assert torch.isfinite(loss) and torch.isfinite(w).all(), (baseline, k)
        for d in derivatives:
            assert torch.isfinite(d).all(), (baseline, k, order)
        # category 3 has probability 1 up to e^-920: every estimate is the exact value c[3]
        assert torch.allclose(loss, torch.tensor(4.0, dtype=dtype))


def test_one_hot_and_bernoulli_batch():
    # OneHotCategorical node and a Bernoulli node with batch shape (3,) (joint support of 8 values)
    torch.manual_seed(4)
    theta = torch.tensor([0.5, -0.3, 0.8, 0.2, -1.0, 0.4])
    v = torch.tensor([1.0, -2.0, 3.0])
    e1 = storch.estimator("unordered_set", plate="z", n_samples=2)
    e2 = storch.estimator("unordered_set", plate="b", n_samples=4)
    with storch.Graph():
        leaf, th = replicate(theta, 4000)
        z = e1(OneHotCategorical(logits=th[:3]))
        b = e2(Bernoulli(logits=th[3:] + z @ v))
        storch.add_cost(((b - 0.3) ** 2).sum() * (z @ v))
        g, = per_replicate_derivatives(storch.surrogate_loss(1), leaf, 1)
    t = theta.clone().requires_grad_(True)
    total = 0.0
    for i in range(3):
        zi = torch.eye(3)[i]
        p = torch.sigmoid(t[3:] + zi @ v)
        for bits in itertools.product([0.0, 1.0], repeat=3):
            bb = torch.tensor(bits)
            pb = torch.where(bb > 0, p, 1 - p).prod()
            total = total + torch.softmax(t[:3], -1)[i] * pb * ((bb - 0.3) ** 2).sum() * (zi @ v)
    assert_unbiased(g, torch.autograd.grad(total, t)[0], "unordered_set on OneHot -> Bernoulli(3)")


def test_samples_are_distinct():
    torch.manual_seed(5)
    est = storch.estimator("unordered_set", plate="z", n_samples=4)
    with storch.Graph():
        z = est(Categorical(logits=storch.denote_independent(torch.randn(100, 6), 0, "data")))
        assert z.tensor.shape == (4, 100)
        s = z.tensor.sort(0).values
        assert (s[1:] != s[:-1]).all()


_MASK = torch.tensor([0.0, -math.inf, 0.0, -math.inf, 0.0])


def _exact_expected_cost(theta, make):
    """E[Σ (x - 0.45)^2] by enumerating the support of ``make(theta)`` (float64)."""
    d = make(theta)
    values = d.enumerate_support(expand=True)  # (K, *batch)
    lp = d.log_prob(values)
    f = ((values.to(theta.dtype) - 0.45) ** 2)
    if lp.dim() > 1:  # independent Bernoullis: sum over all joint values
        joint = torch.stack(torch.meshgrid(*[torch.arange(2)] * lp.shape[1], indexing="ij"), -1).reshape(-1, lp.shape[1])
        cols = torch.arange(lp.shape[1])
        return (lp[joint, cols].sum(-1).exp() * f[joint, cols].sum(-1)).sum()
    return (lp.exp().nan_to_num() * f).sum()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", ["bernoulli", "categorical", "categorical masked", "bernoulli beam",
                                  "categorical masked beam"])
def test_reduced_precision_is_unbiased(dtype, case):
    """float16 / bfloat16 parameters (autocast's dtypes): the set probabilities' floor for log 0 (-1e30)
    did not convert to float16 ('value cannot be converted to type c10::Half without overflow'; with
    masked logits reported as NonFiniteParameterError, 'the logits diverged'), nor did the beam's
    stand-in for impossible candidates. The gradient is z-tested against enumeration at the same
    (rounded) parameters, on the small-support and the beam path, with and without -inf masks."""
    theta = torch.tensor([0.3, -0.5, 1.0, 0.2, -1.0]).to(dtype).double()  # representable in dtype
    bern = case.startswith("bernoulli")
    mask = torch.zeros(5) if "masked" not in case else _MASK

    def make(t):
        return Bernoulli(logits=t) if bern else Categorical(logits=t + mask.to(t.dtype))

    budget = {"budget": 4} if "beam" in case else {}  # budget < the support: stochastic beam search
    torch.manual_seed(0)
    est = storch.estimator("unordered_set", plate="z", n_samples=3 if bern else 2, **budget)
    with storch.Graph():
        leaf, th = replicate(theta.to(dtype), 2000)
        x = est(make(th))
        storch.add_cost(((x.to(dtype) - 0.45) ** 2).sum() if bern else (x.to(dtype) - 0.45) ** 2)
        loss = storch.surrogate_loss(1)
        assert loss.dtype == torch.float32  # a reduced-precision node's l enters the surrogate widened to float32
        g, = per_replicate_derivatives(loss, leaf, 1)
    t = theta.clone().requires_grad_(True)
    exact = torch.autograd.grad(_exact_expected_cost(t, make), t)[0]
    assert torch.isfinite(exact).all()
    # a masked value's logit gets no gradient (its probability is 0 whatever the logit)
    assert_unbiased(g.double(), exact, f"unordered_set {case} in {dtype}", atol=1e-2)


def test_linear_programme_caches_index_tables_only():
    """_log_h_linear multiplied each layer by a dense float64 0/1 matrix C(k,j) x C(k,j+1) (each row k-j
    ones) and kept them for the process: time and memory ~4^k (k=16: 4.6 GB held, 3 s a step). Now it
    gathers the k-j parents of each subset: the cache holds integer index tables of O(k 2^k) entries."""
    from storch_score import unordered_set as us

    k = 12
    us._LINEAR_TABLES.clear()
    lp = torch.log_softmax(torch.randn(k, 3), 0)
    us._log_h_linear(lp, torch.full((3,), -1e30))
    held = []

    def walk(v):
        if torch.is_tensor(v):
            held.append(v)
        elif not isinstance(v, str):  # (the tables' form, "gather" at k = 12)
            for t in v:
                walk(t)

    walk(us._LINEAR_TABLES.values())
    assert held and all(not t.is_floating_point() for t in held)
    assert sum(t.numel() * t.element_size() for t in held) <= 8 * k * 2**k  # dense: C(24, 11) * 8 ~ 20 MB


@pytest.mark.parametrize("k", [1, 2, 5, 8])
def test_small_sets_take_the_dense_programme(monkeypatch, k):
    """For k <= 8 a layer is one matmul with a dense 0/1 matrix (2 operations a layer instead of the
    gather's 5: k = 8 at batch 1 ~170 -> ~70 us a step); the path is asserted, and both forms give the
    same numbers (to float64 rounding)."""
    from storch_score import unordered_set as us

    torch.manual_seed(3)
    lp = torch.log_softmax(torch.randn(k + 1, 7, dtype=torch.float64), 0)[:k]
    rest = _log1mexp(torch.logsumexp(lp, 0))
    us._LINEAR_TABLES.clear()
    dense = us._log_h_linear(lp, rest)
    assert us._LINEAR_TABLES[(k, lp.device)][0] == "dense"
    monkeypatch.setattr(us, "_DENSE_MAX", 0)
    us._LINEAR_TABLES.clear()
    gathered = us._log_h_linear(lp, rest)
    assert us._LINEAR_TABLES[(k, lp.device)][0] == "gather"
    us._LINEAR_TABLES.clear()
    for a, b in zip(dense, gathered):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)


def test_tables_made_inside_torch_func_are_not_cached():
    """unordered_set's index tables were cached in dicts: made inside jacrev(grad(f)) (refused: order 2),
    they belonged to that functorch level, and every later torch.func.grad step failed PyTorch's internal
    assert "level <= current_level". Now the refusal is followed by a working step."""
    from storch_score import unordered_set as us

    us._LINEAR_TABLES.clear()
    us._plan.cache_clear()
    est = storch.estimator("unordered_set", plate="z", n_samples=2)

    def step(th):
        with storch.Graph():
            z = est(Categorical(logits=torch.stack([th, -th, 0.5 * th])))
            storch.add_cost((z.float() - 0.3) ** 2 * th, name="c")
            return storch.surrogate_loss()

    with pytest.raises(storch.OrderError):
        torch.func.jacrev(torch.func.grad(step))(torch.tensor(0.4))
    assert torch.isfinite(torch.func.grad(step)(torch.tensor(0.4)))


def _set_gradient_float64(theta, x, f):
    """The unordered set estimator's gradient on the sample x (k, n) with costs f, in float64 by hand: Σ_s w(s)
    (f(s) - b(s)) ∇log p(s), w(s) = p(s) R(S, s), b(s) = Σ_s' p(s') R^{D∖s}(S, s') f(s') (Kool et al. 2020)."""
    from storch_score.unordered_set import _set_terms

    th = theta.detach().double().requires_grad_(True)
    lp = Bernoulli(logits=th).log_prob(x.double()).sum(-1)
    with torch.no_grad():
        log_rest = torch.log1p(-lp.exp().sum().clamp_max(1.0))
        h0, h1, h2 = _set_terms(lp.detach()[:, None], log_rest.reshape(1), True)
        h0, h1, h2 = h0[0], h1[:, 0], h2[:, :, 0]
        w = (lp + h1 - h0).exp()
        b = (lp[None] + h2 - h1[:, None]).exp() @ f
    return torch.autograd.grad((w * (f - b) * lp).sum(), th)[0]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduced_precision_set_weights_and_baseline_match_float64(dtype):
    """784 Bernoulli latents (a VAE's binarised MNIST), k = 16, costs ~400, in bfloat16: the joint log p(s) was
    summed over the 784 variables in bfloat16 (rounded to units of 4 near -700), so p(s), and the set's weights
    and baseline coefficients, were off by factors up to e^2: the gradient was off by 60% and 316% of its norm
    on two of three seeds (float16: 0.4-1%). The sums, the sampler's uniforms and the baseline's coefficients now
    compute in float32 (to_work, as leave_one_out and sum_and_sample) and return in the model's dtype: the
    gradient matches the float64 formula on the same sample and the same (rounded) costs to 1%."""
    n, k = 784, 16
    scale = torch.linspace(-1, 1, n, dtype=dtype)
    for seed in range(3):
        torch.manual_seed(seed)
        theta = (2.0 * torch.randn(n)).to(dtype).requires_grad_(True)
        with storch.Graph():
            z = storch.estimator("unordered_set", plate="z", n_samples=k)(Bernoulli(logits=theta))
            storch.add_cost(400 + 20 * (z * scale).sum(), name="nll")
            (g,) = torch.autograd.grad(storch.surrogate_loss(), theta)
            x = z.tensor.detach()
        assert g.dtype == dtype and torch.isfinite(g).all()
        f = (400 + 20 * (x * scale).sum(-1)).double()  # the costs the estimator saw (rounded to the dtype)
        want = _set_gradient_float64(theta, x, f)
        assert (g.double() - want).norm() / want.norm() < 0.02, seed


class _Coins(torch.distributions.Distribution):
    """Independent coins, P(1) = sigmoid(weight): an enumerable distribution whose parameter is named neither
    ``logits`` nor ``probs``."""

    arg_constraints: dict = {}
    support = torch.distributions.constraints.boolean
    has_enumerate_support = True

    def __init__(self, weight):
        self.weight = weight
        super().__init__(weight.shape, validate_args=False)

    def sample(self, sample_shape=torch.Size()):
        with torch.no_grad():
            return torch.bernoulli(torch.sigmoid(self.weight).expand(self._extended_shape(sample_shape)))

    def log_prob(self, value):
        w = self.weight.expand(value.shape)
        return -F.binary_cross_entropy_with_logits(w, value.to(w.dtype), reduction="none")

    def enumerate_support(self, expand=True):
        v = torch.arange(2, dtype=self.weight.dtype).reshape((2,) + (1,) * len(self.batch_shape))
        return v.expand((2,) + self.batch_shape) if expand else v


def test_a_float64_model_s_l_and_w_are_float64_whatever_its_parameters_are_named():
    """The model's dtype was guessed from a ``logits`` / ``probs`` attribute, else the default dtype: 40 coins of
    float64 parameters under another name (too many joint values to list: the i.i.d. sampler), with float32 the
    default dtype, got l and w cast to float32 (w off by ~1e-8 relative). They now take the dtype of the model's
    log-probabilities: float64, and w equals p(s) p^{D∖s}(S∖s) / p(S) by hand (k = 2) to 1e-12."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        torch.manual_seed(0)
        theta = (0.5 * torch.randn(40, dtype=torch.float64)).requires_grad_(True)
        with storch.Graph():
            z = storch.estimator("unordered_set", plate="z", n_samples=2)(_Coins(theta))
            storch.add_cost(((z - 0.3) ** 2).sum(), name="c")
            node = storch.current_graph().nodes[0]
            l, w = node.estimator.gradient_function(node), node.estimator.weighting_function(node)
            (g,) = torch.autograd.grad(storch.surrogate_loss(), theta)
            x = z.tensor.detach()
    finally:
        torch.set_default_dtype(default)
    assert l.dtype == w.dtype == g.dtype == torch.float64
    lp = Bernoulli(logits=theta.detach()).log_prob(x).sum(-1)  # (2,)
    assert torch.equal(l.detach(), lp)
    p = lp.exp()
    p_set = p[0] * p[1] / (1 - p[0]) + p[1] * p[0] / (1 - p[1])  # p(S), both orders
    want = torch.stack([p[0] * p[1] / (1 - p[0]), p[1] * p[0] / (1 - p[1])]) / p_set
    torch.testing.assert_close(w, want, rtol=1e-12, atol=0)


def test_a_float64_model_s_baseline_stays_float64_for_float32_costs():
    """A float64 model with float32 costs: b(s) = Σ_s' A[s, s'] f(s') was cast to the cost's float32 (since the
    float16 / bfloat16 change); as before it, b is float64, the same bits as for the same costs in float64 (the
    float32 costs promote exactly), and the gradient matches the float64 formula on the same sample."""
    seen = []

    class Recording(type(storch.estimator("unordered_set", plate="z", n_samples=2))):
        name = "test_unordered_set_recording"

        def baseline(self, node, cost):
            b = super().baseline(node, cost)
            seen.append(b)
            return b

    got = []
    for as_float64 in (False, True):
        torch.manual_seed(1)
        theta = (0.5 * torch.randn(40)).requires_grad_(True)
        with storch.Graph():
            z = Recording(plate="z", n_samples=4)(Bernoulli(logits=theta))
            c = ((z.to(torch.float32) - 0.3) ** 2).sum()  # float32 costs of a float64 model
            storch.add_cost(c.to(torch.float64) if as_float64 else c, name="c")
            (g,) = torch.autograd.grad(storch.surrogate_loss(), theta)
            got.append((seen[-1], g, z.tensor.detach(), c.tensor.detach()))
    (b32, g32, x, f), (b64, _, _, _) = got
    assert b32.dtype == torch.float64 and torch.equal(b32, b64)
    want = _set_gradient_float64(theta, x, f.double())
    torch.testing.assert_close(g32, want, rtol=1e-12, atol=1e-14)
