"""A reduction with a dim of a per-sample scalar that carries a sample plate: refused, not a silent no-op.

Found by a tester (p-hier): an IWAE bound written as in batched code on the per-sample log-weight,
``add_cost(-(torch.logsumexp(lw, 0) - math.log(4)))`` with ``lw`` of per-sample shape (), reduces nothing (torch
accepts dim 0 / -1 of a scalar): each entry's cost was -ELBO + log 4 and the model trained on the ELBO (mean cost
3.71 where E[-IWAE_4] is 1.86). The plate is not a dim of the per-sample tensor; the error says so and what to do.
"""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Bernoulli, Normal, constraints

import storch

FORMS = {
    "torch.logsumexp": lambda lw: torch.logsumexp(lw, 0),
    "logsumexp_-1": lambda lw: lw.logsumexp(-1),
    "mean": lambda lw: lw.mean(0),
    "sum_dim_kw": lambda lw: lw.sum(dim=0),
    "sum_axis": lambda lw: lw.sum(axis=0),
    "sum_tuple": lambda lw: lw.sum((0,)),
    "prod": lambda lw: lw.prod(0),
    "max": lambda lw: lw.max(0).values,
    "min": lambda lw: torch.min(lw, dim=0)[0],
    "amax": lambda lw: lw.amax(0),
    "amin": lambda lw: lw.amin(0),
    "argmax": lambda lw: lw.argmax(0),
    "var_biased": lambda lw: lw.var(0, correction=0),
    "softmax": lambda lw: lw.softmax(0),
    "log_softmax": lambda lw: torch.log_softmax(lw, 0),
    "F.softmax": lambda lw: F.softmax(lw, dim=0),
    "F.softmax_implicit": lambda lw: F.softmax(lw),
    "F.log_softmax": lambda lw: F.log_softmax(lw, -1),
    "nn.Softmax": lambda lw: torch.nn.Softmax(dim=0)(lw),
    "cumsum": lambda lw: lw.cumsum(0),
    "logcumsumexp": lambda lw: torch.logcumsumexp(lw, 0),
    "norm": lambda lw: lw.norm(dim=0),
    "vector_norm": lambda lw: torch.linalg.vector_norm(lw, dim=0),
    "F.normalize": lambda lw: F.normalize(lw, dim=0),
    # review r-52: these ran per sample silently (nanmedian was listed with median, but had no handler)
    "nanmedian": lambda lw: lw.nanmedian(0).values,
    "torch.nanmedian": lambda lw: torch.nanmedian(lw, dim=0)[0],
    "aminmax": lambda lw: torch.aminmax(lw, dim=0).max,
    "Tensor.aminmax": lambda lw: lw.aminmax(dim=0, keepdim=True).min,
    "special.logsumexp": lambda lw: torch.special.logsumexp(lw, 0),
    "special.logsumexp_-1": lambda lw: torch.special.logsumexp(lw, -1),
    "special.softmax": lambda lw: torch.special.softmax(lw, 0),
    "special.log_softmax": lambda lw: torch.special.log_softmax(lw, dim=-1),
}


def _log_weights(n=4):
    mu = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    z = storch.estimator("reparameterization", plate="z", n_samples=n)(Normal(mu, 1.0))
    return Normal(0.0, 1.0).log_prob(z) - Normal(mu, 1.0).log_prob(z)  # per-sample shape ()


@pytest.mark.filterwarnings("ignore:Implicit dimension choice")
@pytest.mark.parametrize("form", list(FORMS))
def test_a_reduction_with_a_dim_of_a_per_sample_scalar_is_refused(form):
    torch.manual_seed(0)
    with storch.Graph():
        lw = _log_weights()
        assert lw.shape == () and lw.plate_names == ("z",)
        with pytest.raises(storch.PlateError,
                           match=r"(?s)per-sample shape \(\).*'z' \(size 4\).*reduces nothing.*"
                                 r"logsumexp\(0\).*vimco"):
            FORMS[form](lw)


def test_the_testers_iwae_bound_is_refused():
    torch.manual_seed(0)
    with storch.Graph():
        lw = _log_weights()
        with pytest.raises(storch.PlateError, match="logsumexp with dim=0"):
            storch.add_cost(-(torch.logsumexp(lw, 0) - math.log(4)), name="iwae")


def test_without_a_dim_and_on_a_per_sample_vector_the_reductions_run_per_sample():
    torch.manual_seed(1)
    with storch.Graph():
        lw = _log_weights()
        for f in (lambda t: t.sum(), lambda t: t.mean(), lambda t: torch.logsumexp(t, dim=()), lambda t: t.amax()):
            out = f(lw)  # over every per-sample dim: the value itself
            assert out.plate_names == ("z",)
            torch.testing.assert_close(out.tensor, lw.tensor)
        v = torch.stack([lw, 2 * lw])  # per-sample shape (2,): dim 0 is a dim of the sample
        for name in ("logsumexp", "mean", "softmax", "cumsum", "amax"):
            out = getattr(v, name)(0)
            torch.testing.assert_close(out.tensor, getattr(v.tensor, name)(1))
        for f, raw in ((lambda t: t.nanmedian(0).values, lambda r: r.nanmedian(1).values),
                       (lambda t: torch.aminmax(t, dim=0).max, lambda r: torch.aminmax(r, dim=1).max),
                       (lambda t: torch.special.logsumexp(t, 0), lambda r: torch.special.logsumexp(r, 1)),
                       (lambda t: torch.special.softmax(t, -1), lambda r: torch.special.softmax(r, -1)),
                       (lambda t: t.nanmedian(), lambda r: r.nanmedian(1).values)):
            torch.testing.assert_close(f(v).tensor, raw(v.tensor))
        torch.testing.assert_close(lw.nanmedian().tensor, lw.tensor)  # no dim: the sample's own value


def test_a_reduction_over_the_last_dim_of_a_per_sample_scalar_runs_as_torch_does():
    """Generic cost code reduces a sample's last dim (``((z - t) ** 2).sum(-1)``, written for vector samples and run on
    a Categorical's scalar ones): dim -1 is the sample's own value, not the samples' dim of batched code (dim 0), so
    sum / mean / amin / max / var over it run per sample. logsumexp and the softmax family are refused at any dim
    (one value's softmax is 1)."""
    torch.manual_seed(4)
    with storch.Graph():
        lw = _log_weights()
        for f in (lambda t: t.sum(-1), lambda t: t.mean(dim=-1), lambda t: t.amin(-1), lambda t: t.max(-1).values,
                  lambda t: t.cumsum(-1), lambda t: ((t - 0.5) ** 2).sum(-1)):
            out = f(lw)
            assert out.plate_names == ("z",)
            torch.testing.assert_close(out.tensor, f(lw.tensor.unsqueeze(-1)).squeeze(-1))


def test_a_batch_reduction_on_a_data_plate_runs_and_user_modules_named_storch_are_user_code():
    """Review r-24: ``rec.mean(0)`` of a per-data-point cost (dim 0 was the batch in the ported code) runs, as
    on main: storch averages the data plates itself; logsumexp still is refused there. A user's module whose
    name starts with ``storch_`` is user code (only storch's own packages are exempt)."""
    torch.manual_seed(5)
    with storch.Graph():
        x = storch.denote_independent(torch.randn(3, dtype=torch.float64), 0, "data")
        mu = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
        z = storch.estimator("reparameterization", plate="z", n_samples=4)(Normal(mu + 0 * x, 1.0))
        rec = (z - x) ** 2
        assert rec.shape == () and set(rec.plate_names) == {"z", "data"}
        for f in (lambda t: t.mean(0), lambda t: t.sum(0), lambda t: torch.mean(t, dim=[0])):
            torch.testing.assert_close(f(rec).tensor, rec.tensor)
        with pytest.raises(storch.PlateError, match="drop the reduction"):
            torch.logsumexp(rec, 0)
        for f in (lambda t: t.max(0), lambda t: t.amax(0), lambda t: t.prod(0), lambda t: t.var(0, correction=0)):
            with pytest.raises(storch.PlateError, match="reduces nothing"):  # a hand-written logsumexp's (r-25)
                f(rec)
    scope = {"__name__": "storch_mylib", "torch": torch}
    exec("def bound(lw):\n    return torch.logsumexp(lw, 0)\n", scope)
    with storch.Graph():
        with pytest.raises(storch.PlateError, match="logsumexp with dim=0"):
            scope["bound"](_log_weights())


def test_one_sample_and_a_data_plate_of_one_point_are_not_refused():
    """A plate of size 1 (one sample, a batch of one data point): nothing to combine."""
    torch.manual_seed(2)
    with storch.Graph():
        lw = _log_weights(n=1)
        torch.testing.assert_close(torch.logsumexp(lw, 0).tensor, lw.tensor)
        x = storch.denote_independent(torch.randn(1, dtype=torch.float64), 0, "data")
        torch.testing.assert_close(x.logsumexp(0).tensor, x.tensor)
        torch.testing.assert_close(torch.quantile(x, 0.9, dim=0).tensor, x.tensor)


# batched code's statistics over the batch (dim 0) of a per-data-point scalar: on a data plate alone they were each
# data point's own value, silently (f-silent17: a risk-seeking threshold r - quantile(r, q, 0) of 0 for every point)
_BATCH_STATISTICS = {
    "quantile": lambda r: torch.quantile(r, 0.9, dim=0),
    "Tensor.quantile": lambda r: r.quantile(0.9, 0, keepdim=True),
    "nanquantile": lambda r: torch.nanquantile(r, 0.5, 0),
    "sort": lambda r: r.sort(0).values,
    "argsort": lambda r: r.argsort(0),
    "msort": torch.msort,
    "topk": lambda r: r.topk(1, 0).values,
    "kthvalue": lambda r: r.kthvalue(1, 0).values,
    "median": lambda r: r.median(0).values,
    "nanmedian": lambda r: r.nanmedian(0).values,
    "mode": lambda r: r.mode(0).values,
    "max": lambda r: r.max(0).values,
    "amin": lambda r: r.amin(0),
    "prod": lambda r: r.prod(0),
    "cumsum": lambda r: r.cumsum(0),
    "norm": lambda r: r.norm(dim=0),
    "logsumexp": lambda r: r.logsumexp(0),
    "softmax_-1": lambda r: F.softmax(r, -1),
    "special.logsumexp": lambda r: torch.special.logsumexp(r, 0),
}


@pytest.mark.parametrize("form", list(_BATCH_STATISTICS))
def test_a_statistic_over_dim_0_of_a_per_data_point_scalar_is_refused(form):
    """On a data plate alone (no sample plate) the call's dim 0 was the ported code's batch: storch gave each data
    point its own value (what torch gives one data point, but a statistic of the batch is what the line computes in
    the code it came from), now refused with the raw tensor's recipe, as it is with a sample plate beside it."""
    raw = torch.randn(6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with storch.Graph():
        r = storch.denote_independent(raw, 0, "data")
        assert r.shape == () and r.plate_names == ("data",)
        with pytest.raises(storch.PlateError,
                           match=r"(?s)per-sample shape \(\).*data plate\(s\) 'data' \(size 6\).*reduces nothing"
                                 r".*mixes the data points.*r\.tensor, q, dim=0"):
            _BATCH_STATISTICS[form](r)


def test_the_refused_risk_seeking_threshold_and_its_advised_form():
    """The brief's case: ``torch.quantile(r, q, dim=0)`` on per-data-point rewards. storch computed each point's own
    reward (a per-entry loop's value: r - q was 0 at every point, where the batch's threshold leaves only the top
    points positive); refused now, and the advised form, the quantile of the raw tensor along the data plate's dim as a
    plain tensor, is the batched code's threshold, shared by every point, with its gradient."""
    theta = torch.randn(6, dtype=torch.float64, generator=torch.Generator().manual_seed(4)).requires_grad_(True)
    with storch.Graph():
        r = storch.denote_independent(theta * 2.0, 0, "data")
        with pytest.raises(storch.PlateError, match="quantile with dim=0 .* data plate"):
            torch.quantile(r, 0.75, dim=0)
        threshold = torch.quantile(r.tensor, 0.75, dim=0)  # the advice: a plain tensor
        margin = r - threshold
        assert margin.plate_names == ("data",)
        want = theta * 2.0 - torch.quantile(theta * 2.0, 0.75, dim=0)
        torch.testing.assert_close(margin.tensor, want)
        assert int((margin.tensor > 0).sum()) == 2  # above the 0.75-quantile of 6 points (the old r - q: 0 everywhere)
        got, = torch.autograd.grad(margin.tensor.square().sum(), theta)
    ref, = torch.autograd.grad(want.square().sum(), theta)
    torch.testing.assert_close(got, ref)


def test_on_a_data_plate_alone_a_batch_mean_a_dimless_reduction_and_a_vector_run_per_data_point():
    """What stays accepted on a data plate alone, equal to a loop over the data points: mean(0) / sum(0) (storch
    averages the data plate itself, review r-24), a reduction without a dim or over the last dim (the point's own
    value), and any dim of a per-data-point vector (a dim of the point)."""
    raw = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    with storch.Graph():
        v = storch.denote_independent(raw, 0, "data")
        r = v[0]
        forms = (lambda t: t.mean(0), lambda t: t.sum(0), lambda t: torch.quantile(t, 0.3),
                 lambda t: t.amax(-1), lambda t: t.median())
        for f in forms:
            torch.testing.assert_close(f(r).tensor, torch.stack([f(row[0]) for row in raw]))
        for f in (lambda t: torch.quantile(t, 0.3, dim=0), lambda t: t.sort(0).values, lambda t: t.logsumexp(0),
                  lambda t: t.softmax(-1)):
            torch.testing.assert_close(f(v).tensor, torch.stack([f(row) for row in raw]))


def test_torch_distributions_own_reductions_of_a_per_sample_scalar_are_not_refused():
    """torch.distributions' own calls (here the simplex constraint's value.sum(-1) of its argument) are its
    formulas, not the user's batched habit: they run as torch computes them on one sample."""
    torch.manual_seed(3)
    with storch.Graph():
        lw = _log_weights()
        ok = constraints.simplex.check(lw.exp())
        assert ok.plate_names == ("z",) and ok.shape == ()
        assert torch.equal(ok.tensor, constraints.simplex.check(lw.tensor.exp().unsqueeze(-1)))


def test_the_advised_form_k_draws_in_one_sample_is_the_exact_iwae_bound():
    """The error's advice: the K draws in one sample (K copies of q), the bound over the sample's dim 0. Under
    `expect` (every joint value of the K copies enumerated) the cost estimate is E[-IWAE_K] exactly."""
    K = 3
    a, d = torch.tensor(0.4, dtype=torch.float64), torch.tensor(1.3, dtype=torch.float64)
    prior = Bernoulli(logits=torch.tensor(-0.2, dtype=torch.float64))

    def log_w(z):
        return Normal(d * z, 1.0).log_prob(torch.tensor(0.7, dtype=torch.float64)) + prior.log_prob(z) - \
            Bernoulli(logits=a).log_prob(z)

    exact = torch.zeros((), dtype=torch.float64)
    for combo in itertools.product((0.0, 1.0), repeat=K):
        z = torch.tensor(combo, dtype=torch.float64)
        exact = exact + Bernoulli(logits=a).log_prob(z).sum().exp() * -(log_w(z).logsumexp(0) - math.log(K))
    with storch.Graph():
        z = storch.estimator("expect", plate="z")(Bernoulli(logits=a.expand(K)))
        assert z.shape == (K,)
        storch.add_cost(-(log_w(z).logsumexp(0) - math.log(K)), name="iwae")
        torch.testing.assert_close(storch.cost_estimates()["iwae"], exact)


@pytest.mark.parametrize("reduce", [lambda v: v.sum(0), lambda v: v.mean(0), lambda v: v.logsumexp(0),
                                    lambda v: v.softmax(-1).sum(0)])
def test_a_real_size_one_dim_with_a_per_sample_scalar_runs_as_torch_runs_it(reduce):
    """A batch of one data point (x of shape (1,)) times a per-sample scalar sample: storch broadcasts the scalar
    (an unsqueeze of its raw tensor) and the (1,) dim is the model's; reducing it runs, per sample, as torch runs
    it (review r-26 D1: a refusal of size-1 dims made from a sample's one value refused this; it was reverted)."""
    torch.manual_seed(0)
    mu = torch.tensor(0.3, requires_grad=True)
    x, y = torch.tensor([2.0]), torch.tensor([1.0])
    with storch.Graph():
        w = storch.estimator("reparameterization", plate="z", n_samples=4)(Normal(mu, 1.0))
        out = reduce(y * (w * x) - (w * x).exp())
        expected = torch.stack([reduce(y * (wi * x) - (wi * x).exp()) for wi in w.tensor])
        assert torch.equal(out.tensor, expected)


def test_the_batch_statistic_advice_beside_a_sample_plate_of_size_one():
    """With a sample plate of size 1 beside the data plate (score's n_samples=1, a risk-seeking policy gradient's
    setup), ``r.tensor`` has a size-1 dim besides the data plate's: the advice ``torch.quantile(r.tensor, q, dim=k)``
    gave a plain tensor of shape (1,), whose difference with r has a per-sample dim (a CostError at add_cost; review
    r-56). The message now gives the flattened form, which is the batch's threshold and a valid cost."""
    theta = torch.randn(6, dtype=torch.float64, generator=torch.Generator().manual_seed(7)).requires_grad_(True)
    est = storch.estimator("reparameterization", plate="z", n_samples=1)
    with storch.Graph():
        mu = storch.denote_independent(theta, 0, "data")
        r = est(torch.distributions.Normal(mu, 1.0)) * 2.0
        assert r.shape == () and set(r.plate_names) == {"data", "z"}
        with pytest.raises(storch.PlateError, match=r"(?s)data plate.*torch\.quantile\(r\.tensor\.flatten\(\), q\)"):
            torch.quantile(r, 0.75, dim=0)
        threshold = torch.quantile(r.tensor.flatten(), 0.75)  # the advice, a 0-dim plain tensor
        margin = r - threshold
        assert margin.shape == () and set(margin.plate_names) == {"data", "z"}
        torch.testing.assert_close(margin.tensor.flatten(), r.tensor.flatten() - torch.quantile(r.tensor.flatten(), 0.75))
        storch.add_cost(margin.relu(), name="risk")  # a valid cost (the old advice's shape (1,) made a CostError)
        storch.backward()
    assert theta.grad is not None and bool(torch.isfinite(theta.grad).all())
