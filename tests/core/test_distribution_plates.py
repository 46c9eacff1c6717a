"""Plate tensors where a distribution keeps them outside its arg_constraints (transforms, temperatures,
components), torch's own argument checks on plate tensors (``if not valid.all()``), and ``expect`` on a
Binomial whose total count is per data point. Never a shared noise draw, never a nested plate tensor."""

import math

import pytest
import torch
from torch.distributions import (
    Binomial,
    Categorical,
    ContinuousBernoulli,
    Distribution,
    Geometric,
    Independent,
    LKJCholesky,
    MixtureSameFamily,
    Multinomial,
    MultivariateNormal,
    Normal,
    RelaxedBernoulli,
    TransformedDistribution,
    Wishart,
    constraints,
)
from torch.distributions.transforms import (
    AffineTransform,
    ComposeTransform,
    ExpTransform,
    PowerTransform,
    TanhTransform,
)

import storch
from storch.testing import assert_unbiased, per_replicate_derivatives, replicate


class ScoreFunction(storch.Estimator):
    """The base class's components: the plain score function (this test runs with storch-core alone)."""

    name = "test_core_score_function"


D = torch.float64
R = 3000


# -- TransformedDistribution with plate tensors in its transforms (or its base) -------------------


def test_affine_transform_with_a_plate_tensor_loc_draws_per_data_point():
    """The repro: loc on a data plate, base plain. Each data point draws its own noise; the sample is a
    plain raw tensor; the surrogate is a 0-dim loss; value and gradient are unbiased (z-tests)."""
    torch.manual_seed(0)
    theta = torch.zeros((), dtype=D)
    base_loc = torch.arange(4, dtype=D) * 10
    est = storch.estimator("reparameterization", plate="y", n_samples=2)
    with storch.Graph():
        leaf, th = replicate(theta, R)
        x = storch.denote_independent(base_loc, 0, "data") + th
        d = TransformedDistribution(Normal(torch.zeros((), dtype=D), torch.ones((), dtype=D)),
                                    [AffineTransform(loc=x, scale=2.0)])
        y = est(d)
        assert type(y.tensor) is torch.Tensor
        assert "data" in [p.name for p in y.plates]
        noise = (y - x).tensor.detach()  # 2 eps per entry
        assert noise.std(dim=[p.name for p in y.plates].index("data")).min() > 0  # not one draw for all
        storch.add_cost(y ** 2)  # E = x^2 + 4 per data point
        loss = storch.surrogate_loss()
        assert type(loss) is torch.Tensor and loss.dim() == 0
        g, = per_replicate_derivatives(loss, leaf, 1)

    def exact(t):
        return ((base_loc + t) ** 2 + 4).mean()

    assert_unbiased(g, torch.autograd.functional.jacobian(exact, theta.clone()), "gradient")


def test_noise_is_independent_between_data_points():
    """cov(eps_i, eps_j) = 0 for i != j (it was 1: one draw shared by every data point)."""
    torch.manual_seed(1)
    est = storch.estimator("reparameterization", plate="y", n_samples=20000)
    with storch.Graph():
        x = storch.denote_independent(torch.arange(3, dtype=D), 0, "data")
        y = est(TransformedDistribution(Normal(torch.zeros((), dtype=D), torch.ones((), dtype=D)),
                                        [AffineTransform(loc=x, scale=1.0)]))
        eps = (y - x).tensor  # (y, data)
        prod = eps[:, 0] * eps[:, 1]
        assert abs(prod.mean()) < 4 * prod.std() / prod.numel() ** 0.5


def test_plate_tensors_in_the_base_and_in_power_transform():
    """Base Normal(loc on a data plate) under ExpTransform, then PowerTransform(exponent on the data
    plate): y = exp(X)^k with X ~ N(m, 1), E[y] = exp(k m + k^2 / 2). Was refused (base) and silently
    shared (transform)."""
    torch.manual_seed(2)
    m = torch.tensor([0.1, -0.3, 0.2], dtype=D)
    k = torch.tensor([1.0, 0.5, 2.0], dtype=D)
    est = storch.estimator("reparameterization", plate="y", n_samples=1)
    with storch.Graph():
        leaf, th = replicate(torch.zeros((), dtype=D), R)
        mm, kk = storch.denote_independent([m, k], 0, "data")
        mm = mm + th
        y = est(TransformedDistribution(Normal(mm, torch.ones((), dtype=D)), [ExpTransform(), PowerTransform(kk)]))
        storch.add_cost(y)
        g, = per_replicate_derivatives(storch.surrogate_loss(), leaf, 1)

    def exact(t):
        return torch.exp(k * (m + t) + k ** 2 / 2).mean()

    assert_unbiased(g, torch.autograd.functional.jacobian(exact, torch.zeros((), dtype=D)), "gradient")


def test_affine_transform_in_a_partition_step():
    """A loop: step 2 shifts a plain base by step 1's sample (the partition plate)."""
    torch.manual_seed(3)
    est = storch.estimator("reparameterization", plate="x", n_samples=3)
    with storch.Graph():
        x1 = est(Normal(torch.zeros((), dtype=D), torch.ones((), dtype=D)))
        x2 = est(TransformedDistribution(Normal(torch.zeros((), dtype=D), torch.ones((), dtype=D)),
                                         [AffineTransform(loc=x1 * 10, scale=1.0)]))
        assert type(x2.tensor) is torch.Tensor and x2.tensor.shape == (3,)
        assert ((x2 - x1 * 10).tensor - (x2 - x1 * 10).tensor[0]).abs().max() > 0


# -- a caching transform (TanhTransform(cache_size=1)) and log_prob of the value storch hands out ---------


def _squashed(mu, s, c=None):
    ts = [TanhTransform(cache_size=1)]
    if c is not None:  # a transform storch rebuilds (a plate tensor loc): the walk pairs it with the user's
        ts.append(AffineTransform(loc=c, scale=2.0, cache_size=1))
    return TransformedDistribution(Normal(mu, s), ts)


@pytest.mark.parametrize("on_data", [False, True])
def test_sac_log_prob_of_the_value_reuses_the_cached_pre_tanh_sample(on_data):
    """SAC's entropy term q.log_prob(a) on the value storch handed out: in float32 about 5% of the samples
    of tanh(N(6, 2)) round to 1, where atanh is infinite. torch's cache (cache_size=1) keys on the raw
    sample, so storch re-keys it to the plate tensor: loss and gradients equal plain torch's on the same
    random numbers (they were inf)."""
    mu = torch.tensor([6.0, 5.0, -6.0], requires_grad=True)
    log_s = torch.tensor(0.7, requires_grad=True)
    c = torch.tensor([0.0, 1.0, -1.0])
    n = 256

    torch.manual_seed(0)
    q = _squashed(mu, log_s.exp(), c if on_data else None)
    a = q.rsample((n,))
    assert (a.abs() == 1 + (2 * c.abs() if on_data else 0)).any()  # saturated samples in the batch
    want = ((a - 0.5) ** 2 + 0.1 * q.log_prob(a)).mean()
    want_g = torch.autograd.grad(want, (mu, log_s))

    torch.manual_seed(0)
    est = storch.estimator("reparameterization", plate="x", n_samples=n)
    with storch.Graph():
        if on_data:
            m, cc = storch.denote_independent((mu, c), 0, "data")
            q = _squashed(m, log_s.exp(), cc)
        else:
            q = _squashed(mu, log_s.exp())
        a = est(q)
        lp = q.log_prob(a)
        assert torch.isfinite(lp.tensor).all()
        storch.add_cost(((a - 0.5) ** 2 + 0.1 * lp).mean())  # (per data point: the mean of a scalar)
        loss = storch.surrogate_loss()
        got_g = torch.autograd.grad(loss, (mu, log_s))
    torch.testing.assert_close(loss, want)
    for g, w in zip(got_g, want_g):
        torch.testing.assert_close(g, w)


def test_a_partition_step_re_keys_the_cache_too():
    torch.manual_seed(1)
    mu = torch.tensor(6.0, requires_grad=True)
    est = storch.estimator("reparameterization", plate="x", n_samples=256)
    with storch.Graph():
        for _ in range(2):
            q = _squashed(mu, 2.0)
            a = est(q)
            assert (a.tensor == 1).any() and torch.isfinite(q.log_prob(a).tensor).all()


def _sac_step(mu, log_s, n, separate, steps=1, alpha=0.2, cut=False):
    """A squashed Gaussian policy's action cost and SAC's entropy term alpha * q.log_prob(a): as a cost of
    its own (``separate``) or summed into the action cost; ``steps`` calls of the estimator (a partition)."""
    est = storch.estimator("reparameterization", plate="x", n_samples=n)
    with storch.Graph():
        for t in range(steps):
            q = _squashed(mu, log_s.exp())
            a = est(q)
            ent = alpha * q.log_prob(a.detach() if cut else a)
            if separate:
                storch.add_cost((a - 0.5) ** 2, name=f"c{t}")
                storch.add_cost(ent, name=f"ent{t}")
            else:
                storch.add_cost((a - 0.5) ** 2 + ent, name=f"c{t}")
        loss = storch.surrogate_loss()
        return loss, torch.autograd.grad(loss, (mu, log_s))


@pytest.mark.parametrize("steps", [1, 2])
def test_sac_entropy_term_as_a_cost_of_its_own_is_differentiated_through_the_pre_tanh_sample(steps):
    """SAC's entropy term alpha * q.log_prob(a) added as its own cost: log_prob(a) is computed from the pre-tanh
    sample u that TanhTransform(cache_size=1) cached (a = tanh(u)), so its autograd graph reaches u, not a. It was
    refused ("depends on the node's sample only through operations without a derivative"); its pathwise
    gradient is the one of the same term summed into the action cost, and the closed form's (atanh written out)."""
    mu = torch.tensor(0.3, dtype=D, requires_grad=True)
    log_s = torch.tensor(-0.4, dtype=D, requires_grad=True)
    torch.manual_seed(0)
    loss, got = _sac_step(mu, log_s, 64, separate=True, steps=steps)
    torch.manual_seed(0)
    want_loss, want = _sac_step(mu, log_s, 64, separate=False, steps=steps)
    torch.testing.assert_close(loss, want_loss)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    if steps == 1:  # the closed form on the same noise: log q(a) = log N(u; mu, s) - log(1 - tanh(u)^2)
        torch.manual_seed(0)
        s = log_s.exp()
        u = Normal(mu, s).rsample((64,))
        lp = Normal(mu, s).log_prob(u) - 2 * (torch.log(torch.tensor(2.0, dtype=D)) - u
                                             - torch.nn.functional.softplus(-2 * u))
        closed = ((u.tanh() - 0.5) ** 2 + 0.2 * lp).mean()
        torch.testing.assert_close(loss, closed)
        for g, w in zip(got, torch.autograd.grad(closed, (mu, log_s))):
            torch.testing.assert_close(g, w)


def test_sac_entropy_term_of_a_detached_action_is_still_refused():
    """log_prob(a.detach()) is no cached value: torch inverts it afresh, its graph reaches neither a nor u
    (only the parameters), and its pathwise gradient would be cut: refused as before."""
    mu = torch.tensor(0.3, dtype=D, requires_grad=True)
    log_s = torch.tensor(-0.4, dtype=D, requires_grad=True)
    with pytest.raises(storch.OrderError, match="'ent0' depends on the node's sample .* only through operations "
                                                "without a derivative"):
        _sac_step(mu, log_s, 4, separate=True, cut=True)


def test_sac_entropy_term_as_a_cost_of_its_own_is_unbiased():
    """z-test of the entropy term alone, E[alpha log q(a) + (a - 0.5)^2] for a = tanh(u), u ~ N(mu, s^2), as
    two costs: the exact gradient by Gauss-Hermite quadrature over u (80 nodes: the integrand is smooth)."""
    torch.manual_seed(4)
    theta = torch.tensor([0.3, -0.4], dtype=D)  # mu, log s
    est = storch.estimator("reparameterization", plate="x", n_samples=2)
    with storch.Graph():
        leaf, th = replicate(theta, R)
        q = _squashed(th[0], th[1].exp())
        a = est(q)
        storch.add_cost((a - 0.5) ** 2, name="action")
        storch.add_cost(0.2 * q.log_prob(a), name="ent")
        g, = per_replicate_derivatives(storch.surrogate_loss(), leaf, 1)

    # Golub-Welsch: the probabilists' Hermite nodes z_i and weights w_i (E_{z ~ N(0, 1)}[f(z)] = sum w_i f(z_i))
    k = torch.arange(1, 80, dtype=D)
    z, v = torch.linalg.eigh(torch.diag(k.sqrt(), 1) + torch.diag(k.sqrt(), -1))
    w = v[0] ** 2

    def exact(t):
        s = t[1].exp()
        u = t[0] + s * z
        lp = Normal(t[0], s).log_prob(u) - 2 * (torch.log(torch.tensor(2.0, dtype=D)) - u
                                               - torch.nn.functional.softplus(-2 * u))
        return (w * ((u.tanh() - 0.5) ** 2 + 0.2 * lp)).sum()

    assert_unbiased(g, torch.autograd.functional.jacobian(exact, theta.clone()), "gradient")


@pytest.mark.parametrize("make", [
    lambda x: TransformedDistribution(Normal(0.0, 1.0), [ComposeTransform([AffineTransform(loc=x, scale=1.0)])]),
    lambda x: TransformedDistribution(Normal(0.0, 1.0), [AffineTransform(0.0, 1.0).inv, AffineTransform(loc=x, scale=1.0).inv]),
    lambda x: RelaxedBernoulli(x.abs() + 0.5, logits=torch.zeros(())),
    lambda x: RelaxedBernoulli(x.abs() + 0.5, logits=storch.denote_independent(torch.zeros(2), 0, "other")),
], ids=["compose", "inverse", "relaxed-temperature", "relaxed-two-plates"])
def test_plate_tensors_storch_cannot_realign_are_refused(make):
    est = ScoreFunction(plate="y", n_samples=2)
    with storch.Graph():
        x = storch.denote_independent(torch.arange(3.0), 0, "data")
        with pytest.raises(storch.UnsupportedDistributionError, match="plate tensors"):
            est(make(x))


# -- MixtureSameFamily whose parts are per data point (a mixture density network) ---------------------

SIGMA = 0.5


def _mixture_parts(c, th, event: bool):
    """Per data point c: weights softmax([th + c, -th]), component means [c + th, -c] (σ = 0.5); with
    ``event``, 2-dim components Independent(Normal) whose second coordinate's means are the first's times th."""
    logits = torch.stack([th + c, -th])
    loc = torch.stack([c + th, -c])
    if event:
        loc = torch.stack([loc, loc * th], -1)  # (K, 2)
    return logits, loc


def _mixture(c, th, event: bool):
    logits, loc = _mixture_parts(c, th, event)
    comp = Normal(loc, SIGMA * torch.ones_like(loc))
    return MixtureSameFamily(Categorical(logits=logits), Independent(comp, 1) if event else comp)


@pytest.mark.parametrize("event", [False, True], ids=["normal", "independent-normal"])
def test_a_mixture_per_data_point_is_unbiased_at_orders_1_and_2(event):
    """A Gaussian mixture whose weights and means are per data point: each entry draws its own component
    and value; the score function's gradient and Hessian of E[|a - 1|^2] (mean over the data points) match
    the closed form Σ_k π_k (|μ_k - 1|^2 + dim σ^2) (z-tests). It was refused (its plate tensors are not
    among arg_constraints)."""
    torch.manual_seed(4)
    data = torch.tensor([0.0, 1.0, -1.5], dtype=D)
    theta = torch.tensor(0.3, dtype=D)
    est = ScoreFunction(plate="a", n_samples=2)
    with storch.Graph():
        leaf, th = replicate(theta, R)
        c = storch.denote_independent(data, 0, "data")
        a = est(_mixture(c, th, event))
        assert {p.name for p in a.plates} == {"a", "data", "replicate"}
        cost = (a - 1.0) ** 2
        storch.add_cost(cost.sum(-1) if event else cost)
        g, h = per_replicate_derivatives(storch.surrogate_loss(order=2), leaf, 2)

    def exact(t):  # per data point (a loop), then the mean
        total = 0
        for ci in data:
            logits, loc = _mixture_parts(ci, t, event)
            per = (loc - 1) ** 2 + SIGMA ** 2
            total = total + (torch.softmax(logits, 0) * (per.sum(-1) if event else per)).sum()
        return total / len(data)

    assert_unbiased(g, torch.autograd.functional.jacobian(exact, theta.clone()), "gradient")
    assert_unbiased(h.reshape(R), torch.autograd.functional.hessian(exact, theta.clone()), "hessian")


def test_a_mixture_per_data_point_has_no_pathwise_gradient():
    """MixtureSameFamily has no rsample: reparameterization refuses it, naming what it needs."""
    with storch.Graph():
        c = storch.denote_independent(torch.arange(3.0), 0, "data")
        with pytest.raises(storch.UnsupportedDistributionError, match="rsample"):
            storch.estimator("reparameterization", plate="y")(_mixture(c, torch.tensor(0.0), False))


# -- torch's own argument checks on plate tensors ---------------------------------------------------


def _data(t):
    return storch.denote_independent(t, 0, "data")


CHECKED = {  # name -> (parameters per data point, the distribution from them)
    "Geometric": (torch.tensor([0.2, 0.5, 0.9]), lambda p: Geometric(probs=p)),
    "ContinuousBernoulli": (torch.tensor([0.2, 0.5, 0.9]), lambda p: ContinuousBernoulli(probs=p, validate_args=True)),
    "MultivariateNormal(covariance_matrix)": (torch.eye(2) * torch.tensor([1.0, 2.0, 3.0]).view(3, 1, 1),
                                              lambda c: MultivariateNormal(torch.zeros(2), covariance_matrix=c)),
    "MultivariateNormal(precision_matrix)": (torch.eye(2) * torch.tensor([1.0, 2.0, 3.0]).view(3, 1, 1),
                                             lambda c: MultivariateNormal(torch.zeros(2), precision_matrix=c)),
    "Wishart(df)": (torch.tensor([3.0, 4.0, 5.0]), lambda df: Wishart(df=df, covariance_matrix=torch.eye(2))),
}


@pytest.mark.parametrize("name", list(CHECKED))
def test_argument_checks_in_torch_constructors_pass_on_plate_tensors(name):
    """Their ``if not valid.all()`` is answered when every plate entry agrees; the node's log-probabilities
    equal those of torch's distribution built per data point."""
    torch.manual_seed(4)
    params, make = CHECKED[name]
    est = ScoreFunction(plate="s", n_samples=2)
    with storch.Graph():
        s = est(make(_data(params)))
        node = storch.current_graph().nodes[0]
        lp = node.distribution.log_prob(s.tensor)  # (s, data)
        for i in range(params.shape[0]):
            assert torch.allclose(lp[:, i], make(params[i]).log_prob(s.tensor[:, i]))


def test_a_check_that_fails_for_some_plate_entries_is_a_plate_error_that_says_so():
    with storch.Graph():
        with pytest.raises(storch.PlateError, match=r"differ \(2 True, 1 False\).*argument check.*invalid for some"):
            Geometric(probs=_data(torch.tensor([0.0, 0.5, 0.9])))
    with storch.Graph():  # invalid for every entry: refused (torch's message indexes by the mask)
        with pytest.raises((ValueError, storch.PlateError)):
            Geometric(probs=_data(torch.tensor([0.0, 0.0])))


def test_bool_of_a_plate_tensor_in_user_code_is_refused_also_when_the_entries_agree():
    """torch's own checks get an answer when every entry agrees (the tests above); the user's own control
    flow is refused whatever the values, so `if tok == EOS: break` fails at once, not at the first step
    where the samples happen to disagree."""
    with storch.Graph():
        x = _data(torch.tensor([1.0, 2.0, 3.0]))
        with pytest.raises(storch.PlateError, match=r"Python control flow"):
            bool(x > 0)
        with pytest.raises(storch.PlateError, match=r"Python control flow"):
            bool(x > 5)
        with pytest.raises(storch.PlateError, match=r"Python control flow"):
            bool(x > 1.5)
        with pytest.raises(RuntimeError, match="ambiguous"):  # torch's own: several values per sample
            bool(storch.denote_independent(torch.ones(3, 2), 0, "other") > 0)


def test_python_numbers_of_a_single_plate_entry_are_refused_in_user_code_and_answered_to_torch():
    """With one plate entry in total (score's default n_samples=1, no data plate), `.item()`, `int(z)`,
    `x[z:z + 1]` (`__index__`) and `if z == k:` were answered: the value left the plates and a cost computed
    through it got no credit (REINFORCE on one episode: z-scores over 1000 against exact enumeration).
    They are refused as with several entries; torch's own argument checks still get their answer."""
    table = torch.tensor([0.0, 1.0, 2.0, 3.0])
    est = ScoreFunction(plate="z")  # n_samples=1
    with storch.Graph():
        z = est(Categorical(logits=torch.zeros(4)))
        assert z.tensor.numel() == 1
        for what, f in [("`item`", lambda: z.item()), ("`__int__`", lambda: int(z)),
                        ("`__float__`", lambda: float(z)), ("`__index__`", lambda: table[z:z + 1]),
                        ("`tolist`", lambda: z.tolist())]:
            with pytest.raises(storch.PlateError, match=f"{what} needs a single value.*1 over plates.*no credit"):
                f()
        with pytest.raises(storch.PlateError, match=r"Python control flow.*one entry here.*no credit"):
            bool(z == 1)
        with pytest.raises(storch.PlateError, match=r"Python control flow"):
            next(k for k in range(4) if z == k)
        g = Geometric(probs=z.float() * 0.1 + 0.5, validate_args=True)  # torch's `if not valid.all()`
        assert torch.allclose(g.log_prob(torch.tensor(1.0)).tensor, Geometric(z.tensor * 0.1 + 0.5).log_prob(torch.tensor(1.0)))


# -- expect on a Binomial with a total count per data point -----------------------------------------


def test_expect_binomial_with_a_total_count_per_data_point_is_exact():
    """E[(k - 1.2)^2] = n p (1 - p) + (n p - 1.2)^2, averaged over the data; value and gradient exact."""
    n = torch.tensor([1.0, 3.0, 5.0], dtype=D)
    theta = torch.tensor([0.3, -0.6, 0.1], dtype=D, requires_grad=True)
    est = storch.estimator("expect", plate="k")
    with storch.Graph():
        nn, tt = storch.denote_independent([n, theta], 0, "data")
        k = est(Binomial(total_count=nn, logits=tt))
        assert k.tensor.shape == (6, 3) and bool((k.tensor <= n).all())  # never a count above the total
        storch.add_cost((k - 1.2) ** 2)
        loss = storch.surrogate_loss(order=2)
        g, = torch.autograd.grad(loss, theta, create_graph=True)

    def exact(t):
        p = torch.sigmoid(t)
        return (n * p * (1 - p) + (n * p - 1.2) ** 2).mean()

    assert torch.allclose(loss, exact(theta))
    assert torch.allclose(g, torch.autograd.functional.jacobian(exact, theta.detach()))


# -- constructor arguments outside arg_constraints (total_count, lims, temperature, a user's k) -----


class TopK(Distribution):
    """A user's Gumbel-top-k ordered subset of k out of n items (Plackett-Luce); k is a constructor
    argument outside arg_constraints, kept as ``self.k``; ``positions`` is a plain tensor attribute."""

    arg_constraints = {"logits": constraints.real_vector}

    def __init__(self, logits, k=None, validate_args=None):
        self.logits, self.n = logits, logits.shape[-1]
        self.k = self.n if k is None else k
        self.positions = torch.arange(self.k)
        super().__init__(logits.shape[:-1], torch.Size([self.k]), validate_args=validate_args)

    def sample(self, sample_shape=torch.Size()):
        with torch.no_grad():
            lg = self.logits.expand(*sample_shape, *self.logits.shape)
            return (lg - torch.log(-torch.log(torch.rand_like(lg)))).topk(self.k, dim=-1).indices

    def log_prob(self, v):
        lg = self.logits.expand(v.shape[:-1] + (self.n,))
        out, mask = 0, torch.zeros_like(lg, dtype=torch.bool)
        for i in range(v.shape[-1]):
            out = out + lg.gather(-1, v[..., i:i + 1])[..., 0] - lg.masked_fill(mask, -float("inf")).logsumexp(-1)
            mask = mask | torch.nn.functional.one_hot(v[..., i], self.n).bool()
        return out


class TopKUnderAnotherName(TopK):
    """k kept as ``self.size``: storch cannot find it, and its copy would take k = n."""

    def __init__(self, logits, k=None, validate_args=None):
        super().__init__(logits, k, validate_args)
        self.size = self.__dict__.pop("k")

    def sample(self, sample_shape=torch.Size()):
        self.k = self.size
        return super().sample(sample_shape)


class TopKFromOptions(TopK):
    """k passed in ``**options``: storch cannot see it; its copy takes k = n, another event shape."""

    def __init__(self, logits, validate_args=None, **options):
        super().__init__(logits, options.get("k"), validate_args)


def test_a_user_distribution_keeps_its_constructor_argument_outside_arg_constraints():
    """The repro: TopK(logits=<data plate>, k=2) was sampled as a full permutation (k = 5, its default);
    its raw copy now has k = 2, its event shape, and each data point's log-probabilities."""
    torch.manual_seed(5)
    x = torch.randn(3, 5, dtype=D)
    est = ScoreFunction(plate="s", n_samples=4)
    with storch.Graph():
        s = est(TopK(_data(x), k=2))
        raw = storch.current_graph().nodes[0].distribution
        assert raw.k == 2 and raw.event_shape == (2,) and s.tensor.shape == (4, 3, 2)
        lp = raw.log_prob(s.tensor)
        for i in range(3):
            assert torch.allclose(lp[:, i], TopK(x[i], k=2).log_prob(s.tensor[:, i]))


class Tempered(Categorical):
    """A user's categorical with a temperature outside arg_constraints, folded into its logits."""

    def __init__(self, logits=None, temperature=1.0, validate_args=None):
        self.t = float(temperature)  # not kept as self.temperature
        super().__init__(logits=logits / self.t, validate_args=validate_args)


class TemperedKept(Categorical):
    """The same, keeping ``self.temperature``: its stored logits are already divided by it, and a copy
    built from them and the temperature would divide twice."""

    def __init__(self, logits=None, temperature=1.0, validate_args=None):
        self.temperature = float(temperature)
        super().__init__(logits=logits / self.temperature, validate_args=validate_args)


@pytest.mark.parametrize("make, match", [
    (lambda x: TopKUnderAnotherName(x, k=2), r"TopKUnderAnotherName.*also takes 'k'.*does not keep as self.k"),
    (lambda x: TopKFromOptions(x, k=2), r"TopKFromOptions.*differs from yours in event_shape"),
    (lambda x: Tempered(x, temperature=0.5), r"Tempered.*also takes 'temperature'.*self.temperature = temperature"),
    (lambda x: TemperedKept(x, temperature=0.5), r"TemperedKept.*does not keep 'logits' as it was given"),
], ids=["another-name", "kwargs", "folded", "transformed"])
def test_a_user_distribution_whose_copy_may_differ_is_refused(make, match):
    """A constructor argument storch cannot carry over (or a copy that would transform the parameters a
    second time): refused, naming the class and the argument or attribute, instead of sampling another
    distribution."""
    est = ScoreFunction(plate="s", n_samples=2)
    with storch.Graph():
        with pytest.raises(storch.UnsupportedDistributionError, match=match):
            est(make(_data(torch.randn(3, 5))))


def test_torch_distributions_keep_their_constructor_arguments_outside_arg_constraints():
    """Multinomial's total_count (sampled with 1 trial), ContinuousBernoulli's lims (the default ones),
    RelaxedBernoulli's and LKJCholesky's temperature and dim (refused before): the raw copy has them,
    and each data point's log-probabilities are those of torch's distribution built for it."""
    torch.manual_seed(6)
    p = torch.tensor([0.3, 0.5, 0.65], dtype=D)
    logits3 = torch.randn(3, 4, dtype=D)
    cases = [
        (logits3, lambda v: Multinomial(total_count=5, logits=v), "total_count", 5),
        (p, lambda v: ContinuousBernoulli(probs=v, lims=(0.2, 0.8)), "_lims", (0.2, 0.8)),
        (p, lambda v: RelaxedBernoulli(torch.tensor(0.5, dtype=D), probs=v), "temperature", 0.5),
        (p + 1, lambda v: LKJCholesky(3, v), "dim", 3),
    ]
    for params, make, attr, want in cases:
        est = ScoreFunction(plate="s", n_samples=3)
        with storch.Graph():
            s = est(make(_data(params)))
            raw = storch.current_graph().nodes[0].distribution
            got = getattr(raw, attr)
            assert (got.item() if isinstance(got, torch.Tensor) else got) == want, attr
            lp = raw.log_prob(s.tensor)
            for i in range(3):
                assert torch.allclose(lp[:, i], make(params[i]).log_prob(s.tensor[:, i])), (attr, i)
    with storch.Graph():
        assert (est(Multinomial(total_count=5, logits=_data(logits3))).tensor.sum(-1) == 5).all()


def test_a_temperature_per_data_point_is_refused_naming_it():
    est = ScoreFunction(plate="s", n_samples=2)
    with storch.Graph():
        t, lg = storch.denote_independent([torch.tensor([0.5, 1.0]), torch.zeros(2)], 0, "data")
        with pytest.raises(storch.UnsupportedDistributionError, match=r"RelaxedBernoulli.*'temperature'.*plate tensor"):
            est(RelaxedBernoulli(t, logits=lg))


def test_every_torch_distribution_with_arguments_outside_arg_constraints_is_known():
    """torch's classes whose constructor takes more than their parameters are in storch's table (or are
    unwrapped or refused otherwise): a new one in a later torch fails here, not silently."""
    import inspect

    import torch.distributions as dists
    from storch.distributions.rebuild import _TORCH_EXTRA_ARGUMENTS

    elsewhere = {dists.Independent, dists.TransformedDistribution, dists.MixtureSameFamily,
                 dists.ExponentialFamily, dists.Uniform, dists.Wishart}  # the last two: properties that list them
    for name in dir(dists):
        cls = getattr(dists, name)
        if not (isinstance(cls, type) and issubclass(cls, Distribution)) or cls is Distribution or cls in elsewhere:
            continue
        params = [n for n in inspect.signature(cls.__init__).parameters if n not in ("self", "validate_args")]
        extra = {n for n in params if n not in cls.arg_constraints}
        assert extra <= set(_TORCH_EXTRA_ARGUMENTS.get(cls, {})), (name, extra)


# -- a user's constructor that transforms a parameter, without other constructor arguments ----------


class _Biased(Distribution):
    """A user's categorical over K values with logits + bias, both in arg_constraints, both kept as given
    and combined where they are used: storch's copy from the two is the same distribution."""

    arg_constraints = {"logits": constraints.real_vector, "bias": constraints.real_vector}
    has_enumerate_support = True

    def __init__(self, logits, bias, validate_args=None):
        self.logits, self.bias = logits, bias
        super().__init__(torch.broadcast_shapes(logits.shape, bias.shape)[:-1], validate_args=validate_args)

    def _log_probs(self):
        return torch.log_softmax(self.logits + self.bias, -1)

    def sample(self, sample_shape=torch.Size()):
        return Categorical(logits=self._log_probs()).sample(sample_shape)

    def log_prob(self, value):
        lp = self._log_probs()
        lp = lp.expand(torch.broadcast_shapes(value.shape, lp.shape[:-1]) + lp.shape[-1:])
        return lp.gather(-1, value.long().expand(lp.shape[:-1]).unsqueeze(-1)).squeeze(-1)

    def enumerate_support(self, expand=True):
        k = self.logits.shape[-1]
        values = torch.arange(k, dtype=torch.long).view((k,) + (1,) * len(self.batch_shape))
        return values.expand((k,) + self.batch_shape) if expand else values


class _BiasFolded(_Biased):
    """The tester's PL2: keeps logits + bias as ``self.logits`` (and uses that alone). Rebuilt from what
    it keeps, its copy added the bias twice: a silently wrong gradient (unordered_set z = -140)."""

    def __init__(self, logits, bias, validate_args=None):
        super().__init__(logits + bias, bias, validate_args)

    def _log_probs(self):
        return torch.log_softmax(self.logits, -1)


class _WrappedCategorical(Categorical):
    """A user's subclass of torch's Categorical with its own constructor: Categorical normalises the
    logits it keeps (not kept as given), but normalising them again gives the same values."""

    def __init__(self, logits, validate_args=None):
        super().__init__(logits=logits, validate_args=validate_args)


P0 = torch.tensor([0.2, -0.4, 0.5, 0.7, -0.3, 0.1], dtype=D)  # z0's logits, then the data's slopes
XD = torch.tensor([0.5, -1.5], dtype=D)  # two data points


def _cost_biased(z, z0, x):
    return (z - 1 + x) ** 2 + 0.5 * z0


def _exact_biased(p):
    """E over the data (mean) and z0 ~ Categorical(p[:3]), z ~ Categorical(x p[3:] + 1.5 onehot(z0))."""
    total = 0
    p0 = torch.softmax(p[:3], -1)
    for z0 in range(3):
        for x in XD:
            pz = torch.softmax(x * p[3:] + 1.5 * torch.nn.functional.one_hot(torch.tensor(z0), 3), -1)
            total = total + p0[z0] * (pz * _cost_biased(torch.arange(3, dtype=D), z0, x)).sum() / len(XD)
    return total


def _biased_model(make, est0, est, p):
    """z0 on its own plate, the logits on the data plate: the parameters have different plates, so storch
    rebuilds the distribution from them (not its fast path)."""
    x = storch.denote_independent(XD, 0, "data")
    z0 = est0(Categorical(logits=p[..., :3]))
    z = est(make(x.unsqueeze(-1) * p[..., 3:], 1.5 * torch.nn.functional.one_hot(z0, 3).to(D)))
    storch.add_cost(_cost_biased(z, z0, x))
    return storch.surrogate_loss()


def test_a_user_constructor_that_folds_one_parameter_into_another_is_refused():
    """PL2 without a constructor argument outside arg_constraints: the kept-as-given check used to run only
    with one, so the copy (logits + 2 bias) was sampled silently. Refused, naming the parameter."""
    with storch.Graph():
        with pytest.raises(storch.UnsupportedDistributionError,
                           match=r"_BiasFolded.*does not keep 'logits' as it was given.*self.logits = logits"):
            _biased_model(_BiasFolded, storch.estimator("expect", plate="z0"), storch.estimator("expect", plate="z"),
                          P0.clone().requires_grad_(True))


@pytest.mark.parametrize("make", [_Biased, lambda logits, bias: _WrappedCategorical(logits + bias)],
                         ids=["kept-as-given", "idempotent-normalisation"])
def test_a_user_distribution_rebuilt_from_parameters_on_different_plates_is_exact_and_unbiased(make):
    """A class that keeps its parameters as given (PL3), and a Categorical subclass whose constructor
    normalises (the same values again on the copy): accepted; expect's value and gradient are exact, the
    score function's gradient unbiased (z-test against enumeration)."""
    torch.manual_seed(21)
    exact_grad = torch.autograd.functional.jacobian(_exact_biased, P0.clone())
    p = P0.clone().requires_grad_(True)
    with storch.Graph():
        loss = _biased_model(make, storch.estimator("expect", plate="z0"), storch.estimator("expect", plate="z"), p)
        g, = torch.autograd.grad(loss, p)
    assert torch.allclose(loss, _exact_biased(P0)) and torch.allclose(g, exact_grad)
    with storch.Graph():
        leaf, pr = replicate(P0, R)
        loss = _biased_model(make, ScoreFunction(plate="z0", n_samples=2), ScoreFunction(plate="z", n_samples=2), pr)
        g, = per_replicate_derivatives(loss, leaf, 1)
    assert_unbiased(g, exact_grad, "gradient, a user distribution rebuilt")


# -- a subclass of TransformedDistribution (pytorch_sac's SquashedNormal) built from plate tensors -----------------

class SacTanh(torch.distributions.transforms.Transform):
    """pytorch_sac's (Yarats) TanhTransform, verbatim."""

    domain = constraints.real
    codomain = constraints.interval(-1.0, 1.0)
    bijective = True
    sign = +1

    def __init__(self, cache_size=1):
        super().__init__(cache_size=cache_size)

    @staticmethod
    def atanh(x):
        return 0.5 * (x.log1p() - (-x).log1p())

    def __eq__(self, other):
        return isinstance(other, SacTanh)

    def _call(self, x):
        return x.tanh()

    def _inverse(self, y):
        return self.atanh(y)

    def log_abs_det_jacobian(self, x, y):
        return 2. * (math.log(2.) - x - torch.nn.functional.softplus(-2. * x))


class SquashedNormal(TransformedDistribution):
    """pytorch_sac's SquashedNormal, verbatim: no arg_constraints, no validate_args keyword, its own ``mean``."""

    def __init__(self, loc, scale):
        self.loc = loc
        self.scale = scale

        self.base_dist = Normal(loc, scale)
        transforms = [SacTanh()]
        super().__init__(self.base_dist, transforms)

    @property
    def mean(self):
        mu = self.loc
        for tr in self.transforms:
            mu = tr(mu)
        return mu


class SquashedNormalConstrained(SquashedNormal):
    """With arg_constraints but still no validate_args keyword (storch could not rebuild it)."""

    arg_constraints = {"loc": constraints.real, "scale": constraints.positive}


class SquashedNormalHidden(SquashedNormal):
    """Holds a plate tensor in another distribution too: no sound copy from base_dist and transforms."""

    def __init__(self, loc, scale):
        super().__init__(loc, scale)
        self.other = Normal(loc, scale)


def _sac_q(a):
    return -(a - 0.3) ** 2 + 0.5 * torch.sin(3 * a)


def _sac_exact(theta):
    """E[0.2 log q(a) - Q(a)], a = tanh(u), u ~ N(mu, exp(log_s)^2): Gauss-Hermite quadrature over u (Golub-Welsch,
    100 nodes: the integrand is smooth)."""
    k = torch.arange(1, 100, dtype=D)
    z, v = torch.linalg.eigh(torch.diag(k.sqrt(), 1) + torch.diag(k.sqrt(), -1))
    w = v[0] ** 2
    s = theta[1].exp()
    u = theta[0] + s * z
    lp = Normal(theta[0], s).log_prob(u) - 2 * (math.log(2.0) - u - torch.nn.functional.softplus(-2 * u))
    return (w * (0.2 * lp - _sac_q(u.tanh()))).sum()


@pytest.mark.parametrize("cls", [SquashedNormal, SquashedNormalConstrained])
def test_a_transformed_distribution_subclass_of_plate_tensors_is_unbiased_at_orders_1_and_2(cls):
    """pytorch_sac's SquashedNormal with parameters that are plate tensors (a batch on a data plate, here the
    replicate plate) was refused: "holds plate tensors that storch cannot find among its arg_constraints []" (and with
    arg_constraints, "unexpected keyword argument 'validate_args'"). Its raw copy is now made as the plain
    TransformedDistribution's is: SAC's actor loss E[0.2 log q(a) - Q(a)], gradient and Hessian in (mu, log s)
    z-tested against quadrature."""
    theta = torch.tensor([0.3, math.log(0.8)], dtype=D)
    t = theta.clone().requires_grad_(True)
    g_exact, = torch.autograd.grad(_sac_exact(t), t, create_graph=True)
    h_exact = torch.stack([torch.autograd.grad(g_exact[i], t, retain_graph=True)[0] for i in range(2)])
    torch.manual_seed(11)
    est = storch.estimator("reparameterization", plate="x", n_samples=2)
    with storch.Graph():
        leaf, th = replicate(theta, R)
        q = cls(th[0], th[1].exp())
        a = est(q)
        storch.add_cost(0.2 * q.log_prob(a) - _sac_q(a), name="actor")
        g, h = per_replicate_derivatives(storch.surrogate_loss(order=2), leaf, 2)
    assert_unbiased(g, g_exact.detach(), "gradient")
    assert_unbiased(h, h_exact, "Hessian")


def test_the_raw_copy_of_a_transformed_distribution_subclass_keeps_its_class_and_methods():
    """The raw copy is the user's class (its ``mean``, its ``self.loc`` re-aligned to the plates), with the raw base
    and each data point's own noise; the user's distribution is left as it was."""
    from storch.distributions import unwrap_distribution
    with storch.Graph():
        loc, scale = storch.denote_independent((torch.tensor([[0.1, 2.0], [-3.0, 0.5], [0.0, 0.0]], dtype=D),
                                                torch.full((3, 2), 0.5, dtype=D)), 0, "data")
        q = SquashedNormal(loc, scale)
        raw, plates = unwrap_distribution(q)
        assert type(raw) is SquashedNormal and [p.name for p in plates] == ["data"]
        assert raw.batch_shape == (3, 2) and raw.event_shape == () and raw.transforms == q.transforms
        assert type(raw.loc) is torch.Tensor and type(raw.base_dist.loc) is torch.Tensor
        torch.testing.assert_close(raw.mean, torch.tanh(loc._raw))
        assert q.base_dist is q.__dict__["base_dist"] and type(q.loc) is not torch.Tensor  # (unchanged)
        torch.manual_seed(0)
        x = raw.rsample((4000,))
        torch.testing.assert_close(x.mean(0), Normal(loc._raw, 0.5).sample((4000,)).tanh().mean(0),
                                   atol=0.05, rtol=0)  # (se about 0.01)
        r = torch.corrcoef(torch.stack([x[:, 0, 0], x[:, 2, 0]]))[0, 1]
        assert abs(r) < 0.1  # each data point its own noise (one shared draw: r near 1; independent: sd 0.016)


def test_a_transformed_distribution_subclass_holding_plate_tensors_elsewhere_names_both_fixes():
    """A plate tensor held outside base_dist, transforms and its own attributes (another distribution): no sound
    copy; the refusal says to list the parameters in arg_constraints and give __init__ a validate_args keyword."""
    est = storch.estimator("reparameterization", plate="x", n_samples=2)
    with storch.Graph():
        loc, scale = storch.denote_independent((torch.zeros(3), torch.ones(3)), 0, "data")
        with pytest.raises(storch.UnsupportedDistributionError,
                           match=r"SquashedNormalHidden holds plate tensors.*arg_constraints.*validate_args keyword"):
            est(SquashedNormalHidden(loc, scale))
