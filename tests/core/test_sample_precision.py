"""Samples the dtype cannot resolve, where a score-function gradient reads them (storch.distributions.precision):
a Beta drawn at the float spacing of 0 or 1 by a concentration near 0 (float64 too; a Dirichlet near 0 only), a
location-scale family whose scale is below 12 float spacings at loc. Refused with UnsupportedDistributionError; what is accepted is z-tested against the
exact gradient. Runs with storch-core alone: the score function is the base class's components."""

import math
import warnings

import pytest
import torch
from torch.distributions import (Bernoulli, Beta, Cauchy, Dirichlet, Gumbel, Independent, Kumaraswamy, Laplace,
                                 Normal, StudentT)

import storch
from storch.distributions.precision import precision_checked
from storch.testing import assert_unbiased, per_replicate_derivatives, replicate

R = 3000


class ScoreFunction(storch.Estimator):
    """The base class's components: the plain score function, sampling with replacement."""

    name = "test_core_sample_precision"


class PartitionScore(ScoreFunction):
    """The same, whose calls in a graph make a partition."""

    name = "test_core_sample_precision_partition"
    supports_partitions = True


class Pathwise(storch.Estimator):
    """A reparameterised draw whose gradient function is 0: not a score function, not checked."""

    name = "test_core_sample_precision_pathwise"
    requires_rsample = True

    def gradient_function(self, node):
        return torch.zeros(())


def _score_gradient(make, theta, cost, dtype, n=1, seed=0):
    """Per-replicate score-function gradients of E[cost(x)] in ``theta`` (R replicates)."""
    torch.manual_seed(seed)
    with storch.Graph():
        leaf, th = replicate(theta.to(dtype), R)
        x = ScoreFunction(plate="x", n_samples=n)(make(th))
        storch.add_cost(cost(x))
        return per_replicate_derivatives(storch.surrogate_loss(), leaf, 1)[0]


def _draw(make, dtype, est=None, seed=0):
    torch.manual_seed(seed)
    with storch.Graph():
        return (est or ScoreFunction(plate="x", n_samples=200))(make(dtype))


# -- the unit interval: a concentration near 0 ---------------------------------------------------------------

UNIT = {  # name -> (distribution in a dtype, the concentration named)
    "Beta(1, 1e-3)": (lambda d: Beta(torch.tensor(1.0, dtype=d), torch.tensor(1e-3, dtype=d)), "concentration0"),
    "Beta(1e-3, 1)": (lambda d: Beta(torch.tensor(1e-3, dtype=d), torch.tensor(1.0, dtype=d)), "concentration1"),
    "Beta(0.01, 0.01)": (lambda d: Beta(torch.full((3,), 0.01, dtype=d), torch.full((3,), 0.01, dtype=d)),
                         "concentration0"),
    "Beta(1000, 0.01)": (lambda d: Beta(torch.tensor(1000.0, dtype=d), torch.tensor(0.01, dtype=d)),
                         "concentration0"),
    "Independent(Beta)": (lambda d: Independent(Beta(torch.ones(2, dtype=d), torch.full((2,), 1e-3, dtype=d)), 1),
                          "concentration0"),
    "Kumaraswamy(1, 1e-3)": (lambda d: Kumaraswamy(torch.tensor(1.0, dtype=d), torch.tensor(1e-3, dtype=d)),
                             "concentration0"),
    "Dirichlet(1e-3, 1, 1)": (lambda d: Dirichlet(torch.tensor([1e-3, 1.0, 1.0], dtype=d)), "concentration"),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("name", list(UNIT))
def test_concentration_near_zero_is_refused(name, dtype):
    make, param = UNIT[name]
    with pytest.raises(storch.UnsupportedDistributionError, match=rf"(?s)has {param} .*(resolves|exactly).*"
                                                                  "(closed-form|floor)"):
        _draw(make, dtype)


@pytest.mark.parametrize("conc, dtype", [((0.1, 0.1, 0.1), torch.float32), ((0.1, 0.1), torch.float32),
                                         ((0.1, 0.1), torch.float64)], ids=["0.1x3-f32", "0.1x2-f32", "0.1x2-f64"])
def test_dirichlet_near_one_is_accepted_and_unbiased(conc, dtype):
    """Dirichlet.log_prob reads xlogy(c - 1, x), never log(1 - x): a component near 1 (the others' concentrations
    summing to 0.1 or 0.2, below the near-1 limit) was refused although the score gradient is unbiased (the
    reviewer's z 0.5, -0.1, -0.1 over 1e7 draws); accepted now, z-tested against d/dc of E[x0] = c0 / sum(c)."""
    c64 = torch.tensor(conc, dtype=torch.float64, requires_grad=True)
    (want,) = torch.autograd.grad(c64[0] / c64.sum(), c64)
    g = _score_gradient(lambda th: Dirichlet(th), torch.tensor(conc), lambda x: x[..., 0], dtype, n=4)
    assert_unbiased(g.double(), want, f"score gradient, Dirichlet{conc} {dtype}")


def test_dirichlet_near_zero_is_refused_without_log_one_minus_x():
    """The side Dirichlet's log p reads: Dirichlet(0.05·ones(3)) in float32 (below the near-0 limit 0.079) has a
    biased score gradient (z 25 over 1e7 draws); refused, and the message names log(x), not log(1 - x)."""
    with pytest.raises(storch.UnsupportedDistributionError, match=r"has concentration 0\.05.*log\(x\)") as info:
        _draw(lambda d: Dirichlet(torch.full((3,), 0.05, dtype=d)), torch.float32)
    assert "1 - x" not in str(info.value)


def test_beta_score_was_silently_wrong_in_float64():
    """The porting tester's case, Beta(1, 1e-3) in float64: the score's gradient in concentration0 reads
    log(1 - x) stuck near log(eps/2) = -37 (z ~ 3000 against the exact -a/(a+b)²); the draw is refused now.
    The pathwise gradient of the same node is right for a bounded cost (z-test), as the message says (and biased for
    one that reads log(1 - x): test_pathwise_log_one_minus_x_is_biased_below_the_limit)."""
    a, b = 1.0, 1e-3
    exact = torch.tensor([b / (a + b) ** 2, -a / (a + b) ** 2], dtype=torch.float64)
    with pytest.raises(storch.UnsupportedDistributionError, match=r"(?s)no general remedy.*bounded as x -> 1.*"
                                                                   "closed-form"):
        _score_gradient(lambda th: Beta(th[0], th[1]), torch.tensor([a, b]), lambda x: x, torch.float64)
    torch.manual_seed(0)
    with storch.Graph():
        leaf, th = replicate(torch.tensor([a, b], dtype=torch.float64), R)
        with pytest.warns(storch.PrecisionWarning, match="concentration0 0.001"):
            x = storch.estimator("reparameterization", plate="x")(Beta(th[0], th[1]))
        storch.add_cost(x)
        g = per_replicate_derivatives(storch.surrogate_loss(), leaf, 1)[0]
    assert_unbiased(g, exact, "pathwise gradient of E[x]")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("ab", [(0.5, 0.5), (1.0, 1.0), (2.0, 0.7)])
def test_moderate_concentrations_are_accepted_and_unbiased(ab, dtype):
    """Concentrations whose draws rarely sit at the float spacing of 0 or 1 are accepted, and the score's gradient
    of E[(1 - x)²] is unbiased (z-test against the closed form)."""
    a, b = ab

    def exact(th):
        a, b = th[0], th[1]
        return b * (b + 1) / ((a + b) * (a + b + 1))  # E[(1 - x)²]: 1 - x ~ Beta(b, a)
    th64 = torch.tensor([a, b], dtype=torch.float64, requires_grad=True)
    (want,) = torch.autograd.grad(exact(th64), th64)
    g = _score_gradient(lambda th: Beta(th[0], th[1]), torch.tensor([a, b]), lambda x: (1 - x) ** 2, dtype, n=4)
    assert_unbiased(g.double(), want, f"score gradient, Beta{ab} {dtype}")


def test_a_partition_step_is_checked():
    """A later call of the estimator in the graph (a partition step) draws and is checked as the first."""
    est = PartitionScore(plate="x", n_samples=50)
    torch.manual_seed(0)
    with storch.Graph():
        x = est(Beta(torch.tensor(2.0, dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64)))
        with pytest.raises(storch.UnsupportedDistributionError, match="concentration0 0.001"):
            est(Beta(x * 0 + 1.0, x * 0 + 1e-3))


def test_pathwise_estimators_are_warned_not_refused():
    """reparameterization's gradient does not read log p: the same draws are accepted, with a PrecisionWarning
    (exact for a bounded cost, wrong for one that reads log(1 - x)), once per estimator."""
    for make, _ in UNIT.values():
        est = Pathwise(plate="x", n_samples=200)
        with pytest.warns(storch.PrecisionWarning, match="(log\\(1 - x\\)|log\\(x\\))") as record:
            _draw(make, torch.float64, est)
            _draw(make, torch.float64, est, seed=1)
        assert len([w for w in record if w.category is storch.PrecisionWarning]) == 1


# -- pathwise estimators: a cost that reads log(1 - x) (storch.PrecisionWarning) ----------------------------------

def _pathwise_log_gradient(c, dtype, side=1, cost=None, reps=200, n=256, seed=0):
    """Per-draw pathwise gradients of E[cost(x)] (default log(1 - x), or log x at ``side`` 0) in log c, for
    Beta(1, c) (Beta(c, 1) at side 0), with reparameterization (its PrecisionWarning ignored)."""
    torch.manual_seed(seed)
    lc = torch.tensor(math.log(c), dtype=dtype, requires_grad=True)
    est = storch.estimator("reparameterization", plate="x", n_samples=n)
    one = torch.tensor(1.0, dtype=dtype)
    cost = cost or (torch.log1p if side == 1 else torch.log)
    gs = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", storch.PrecisionWarning)
        for _ in range(reps):
            with storch.Graph():
                x = est(Beta(one, lc.exp()) if side == 1 else Beta(lc.exp(), one))
                storch.add_cost(cost(-x) if cost is torch.log1p else cost(x))
                gs.append(torch.autograd.grad(storch.surrogate_loss(), lc)[0].double())
    return torch.stack(gs)


@pytest.mark.parametrize("dtype, c, side", [(torch.float32, 0.1, 1), (torch.float64, 0.1, 1), (torch.float32, 0.03, 0)],
                         ids=["f32-0.1", "f64-0.1", "f32-near0-0.03"])
def test_pathwise_log_one_minus_x_is_biased_below_the_limit(dtype, c, side):
    """The porting tester's silent case: reparameterization of Beta(1, c) with a cost reading log(1 - x) (a
    Beta-Bernoulli likelihood): d/dlog c E[log(1 - x)] = 1/c (digamma closed form) came out 4.8 for 10 at c 0.1
    in float32. It still does (storch cannot see the cost), and the draw now gives a PrecisionWarning that names
    the concentration and the measured bias. The z-test here detects the bias (|z| > 8)."""
    g = _pathwise_log_gradient(c, dtype, side)
    z = (g.mean() - 1 / c) / (g.std() / math.sqrt(len(g)))
    assert z < -8, f"z {float(z):.1f}: the bias this warning is about was not seen"
    est = storch.estimator("reparameterization", plate="x", n_samples=4)
    one, cc = torch.tensor(1.0, dtype=dtype), torch.tensor(c, dtype=dtype)
    name, log = ("concentration0", r"log\(1 - x\)") if side else ("concentration1", r"log\(x\)")
    with pytest.warns(storch.PrecisionWarning, match=rf"{name} {c:g}, below .*{log}.*closed-form"):
        with storch.Graph():
            est(Beta(one, cc) if side else Beta(cc, one))


@pytest.mark.parametrize("dtype, c, side", [(torch.float32, 0.8, 1), (torch.float64, 0.3, 1),
                                            (torch.float32, 0.15, 0), (torch.float64, 0.02, 0)],
                         ids=["f32-0.8", "f64-0.3", "f32-near0-0.15", "f64-near0-0.02"])
def test_pathwise_log_cost_above_the_limit_is_unbiased_and_not_warned(dtype, c, side):
    """Above the limit (0.55 / 0.25 near 1, 0.11 / 0.013 near 0, float32 / float64; measured, see
    storch.distributions.precision.LIKELY_PATHWISE) no warning, and the log cost's pathwise gradient is unbiased."""
    from storch.distributions.precision import unit_interval_limits
    near_0, near_1 = unit_interval_limits(Beta, dtype, pathwise=True)
    assert c > (near_1 if side == 1 else near_0)
    one, cc = torch.tensor(1.0, dtype=dtype), torch.tensor(c, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error", storch.PrecisionWarning)
        with storch.Graph():
            storch.estimator("reparameterization", plate="x", n_samples=4)(Beta(one, cc) if side else Beta(cc, one))
    g = _pathwise_log_gradient(c, dtype, side)
    assert_unbiased(g, torch.tensor(1 / c, dtype=torch.float64), f"d/dlog c E[log] of Beta, c {c}, {dtype}")


@pytest.mark.parametrize("dtype, c", [(torch.float32, 0.5), (torch.float64, 0.2)], ids=["f32-0.5", "f64-0.2"])
def test_pathwise_warns_just_below_the_limit(dtype, c):
    """Just below the limit (float32 0.5: measured bias 0.13%, z 3.4 over 6e6 draws; float64 0.2: 0.46%, z 13)."""
    with pytest.warns(storch.PrecisionWarning, match=f"concentration0 {c:g}, below"):
        with storch.Graph():
            storch.estimator("reparameterization", plate="x", n_samples=4)(
                Beta(torch.tensor(1.0, dtype=dtype), torch.tensor(c, dtype=dtype)))


def test_pathwise_bounded_cost_stays_exact_below_the_limit():
    """A cost bounded as x -> 1 (E[x]) keeps an exact pathwise gradient at Beta(1, 0.1) in float32 (z-test
    against d/dlog b of 1/(1 + b)): why this is a warning and not a refusal."""
    b = 0.1
    g = _pathwise_log_gradient(b, torch.float32, cost=lambda x: x)
    assert_unbiased(g, torch.tensor(-b / (1 + b) ** 2, dtype=torch.float64), "d/dlog b E[x], Beta(1, 0.1)")


def test_precision_warning_follows_warnings_filters():
    """'error' makes the warning a refusal, 'ignore' silences it; it is a UserWarning."""
    assert issubclass(storch.PrecisionWarning, UserWarning)
    make = lambda: Beta(torch.tensor(1.0), torch.tensor(0.1))  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("error", storch.PrecisionWarning)
        with pytest.raises(storch.PrecisionWarning):
            with storch.Graph():
                storch.estimator("reparameterization", plate="x", n_samples=4)(make())
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", category=storch.PrecisionWarning)
        with storch.Graph():
            storch.estimator("reparameterization", plate="x", n_samples=4)(make())
    assert not [w for w in record if w.category is storch.PrecisionWarning]


# -- Kumaraswamy: its sampler returns 0 and 1 exactly ---------------------------------------------------------

def test_kumaraswamy_score_limit_is_its_own():
    """Kumaraswamy(1, 0.6) in float32 passed the Beta limit (0.42) but its sampler returns exactly 1.0 for ~3e-5
    of the draws (1 - u^(1/b) rounds to 1), where log p is infinite: 14 of 100 steps raised NonFiniteCostError at
    n_samples 4096. Its own limit (draws of exactly 0 or 1 above 1e-6: 0.80 in float32, 0.37 in float64) refuses
    it, naming the exact draws; float64 accepts it."""
    make = lambda d: Kumaraswamy(torch.tensor(1.0, dtype=d), torch.tensor(0.6, dtype=d))  # noqa: E731
    with pytest.raises(storch.UnsupportedDistributionError, match=r"concentration0 0\.6, below 0\.8 .*exactly 1"):
        _draw(make, torch.float32)
    _draw(make, torch.float64)


def test_nonfinite_cost_from_an_exact_draw_names_the_cause():
    """reparameterization of Kumaraswamy(1, 0.3) with a sampled log q(x) (the porting tester's KL term): ~0.5% of
    float32 draws equal 1, log q is infinite, and storch.backward() says so (the draws, the concentration, the
    remedies) instead of the generic 'log p(x) = -inf, or diverged parameters; a tanh-squashed distribution'."""
    torch.manual_seed(0)
    b = torch.tensor(0.3, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", storch.PrecisionWarning)
        with storch.Graph():
            q = Kumaraswamy(torch.tensor(1.0), b)
            x = storch.estimator("reparameterization", plate="x", n_samples=4096)(q)
            storch.add_cost(q.log_prob(x), name="logq")
            with pytest.raises(storch.NonFiniteCostError) as info:
                storch.backward()
    text = str(info.value)
    assert "of the 4096 draws of Kumaraswamy (concentration1 min 1, concentration0 min 0.3; float32) equal 1 " \
        "exactly" in text and "float64" in text and "tanh" not in text


# -- location-scale families: a scale below 12 float spacings at loc -----------------------------------------

LOC_SCALE = {
    "Normal": Normal, "Laplace": Laplace, "Cauchy": Cauchy, "Gumbel": Gumbel,
    "StudentT": lambda loc, scale: StudentT(torch.full_like(loc, 5.0), loc, scale),
}


@pytest.mark.parametrize("family", list(LOC_SCALE))
@pytest.mark.parametrize("dtype, loc, scale", [(torch.float32, 0.5, 1e-8), (torch.float32, 1e8, 1.0),
                                               (torch.float64, 1e16, 1.0)], ids=["f32-0.5", "f32-1e8", "f64-1e16"])
def test_scale_below_the_spacing_at_loc_is_refused(family, dtype, loc, scale):
    make = LOC_SCALE[family]
    advice = r"use float64 .*center" if dtype == torch.float32 else r"one of: center"
    with pytest.raises(storch.UnsupportedDistributionError,
                       match=rf"(?s)below 12 float spacings at loc in {str(dtype)[6:]}.*{advice}"):
        _draw(lambda d: make(torch.tensor([0.0, loc], dtype=d), torch.tensor([1.0, scale], dtype=d)), dtype)


# (loc, the float32 spacing there): 1000 is near the top of its binade (spacing 0.51·eps·|loc|), 1025 at the bottom
_SPACINGS = [(1000.0, 2.0 ** -14), (1025.0, 2.0 ** -13), (0.75, 2.0 ** -24)]


@pytest.mark.parametrize("loc, spacing", _SPACINGS)
def test_the_threshold_is_twelve_spacings_at_loc(loc, spacing):
    """Refused just below 12 float32 spacings at loc, accepted just above (measured, score gradient of
    E[(x - loc - 2 scale)²], 1e7 draws: z 8 at 4 spacings per scale, 2-4 at 8, 3 at 10, 0.8 at 12; the old bound,
    16·eps·|loc|, refused up to 32 spacings: Normal(1000, 1e-3), 16 spacings, z -0.3 and 0.7, was refused)."""
    def make(s):
        return lambda d: Normal(torch.tensor(loc, dtype=d), torch.tensor(s, dtype=d))
    with pytest.raises(storch.UnsupportedDistributionError, match="below 12 float spacings"):
        _draw(make(11.5 * spacing), torch.float32)
    _draw(make(12.5 * spacing), torch.float32)
    _draw(make(11.5 * spacing), torch.float64)  # float64 resolves it


def test_normal_1000_scale_1e_3_is_accepted_in_float32_and_unbiased():
    """The reviewer's case: Normal(1000, 1e-3) in float32 (16 spacings per scale) was refused although its score
    gradient is unbiased (z -0.3, 0.7 over 1e7 draws); accepted now, and z-tested here (f centred at loc, scaled)."""
    mu, s = 1000.0, 1e-3
    g = _score_gradient(lambda th: Normal(th[0], th[1]), torch.tensor([mu, s]),
                        lambda x: (x - mu) ** 2 * 1e6, torch.float32, n=4)
    mu32, s32 = float(torch.tensor(mu)), float(torch.tensor(s))
    assert_unbiased(g.double(), torch.tensor([2 * (mu32 - mu) * 1e6, 2 * s32 * 1e6], dtype=torch.float64),
                    "score gradient, Normal(1000, 1e-3) float32", atol=1e-3)


def test_normal_score_was_silently_wrong_in_float32_and_is_right_in_float64():
    """Normal(0.5, 1e-8) in float32: 92% of the draws equal loc, and the score's gradient of E[x²] was off (z -14
    in loc on the old code); refused now. In float64 (its spacing at 0.5 is 1.1e-16, far below the scale) the
    same node is accepted and its gradient is unbiased: z-test against (2 loc, 2 scale)."""
    mu, s = 0.5, 1e-8
    make = lambda th: Normal(th[0], th[1])  # noqa: E731
    with pytest.raises(storch.UnsupportedDistributionError, match="float64"):
        _score_gradient(make, torch.tensor([mu, s]), lambda x: x ** 2, torch.float32, n=4)
    g = _score_gradient(make, torch.tensor([mu, s]), lambda x: x ** 2, torch.float64, n=4)
    assert_unbiased(g, torch.tensor([2 * mu, 2 * s], dtype=torch.float64), "score gradient, float64")


def test_a_scale_resolved_by_float32_is_accepted_and_unbiased():
    """Normal(0.5, 1e-4) in float32 (about 800 floats per scale at 0.5): accepted, and unbiased."""
    mu, s = 0.5, 1e-4
    g = _score_gradient(lambda th: Normal(th[0], th[1]), torch.tensor([mu, s]), lambda x: (x - 0.5) ** 2 * 1e8,
                        torch.float32, n=4)
    assert_unbiased(g.double(), torch.tensor([0.0, 2 * s * 1e8], dtype=torch.float64), "score gradient, float32",
                    atol=1e-4)


# -- the common path: other classes are not looked at --------------------------------------------------------


def test_other_classes_take_no_check():
    """The check costs one dict lookup for a class it does not look at (the fast path, asserted taken)."""
    assert precision_checked(Bernoulli(probs=torch.tensor(0.3))) is None
    assert precision_checked(Independent(Bernoulli(probs=torch.full((2,), 0.3)), 1)) is None
    found = precision_checked(Independent(Normal(torch.zeros(2), 1.0), 1))
    assert found is not None and found[0] == "loc" and type(found[1]) is Normal
    found = precision_checked(Beta(1.0, 1.0))
    assert found is not None and found[0] == "unit"
