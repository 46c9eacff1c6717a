"""`expect` is exact: derivatives of the surrogate equal closed forms computed with plain torch.

Orders 1, 2 (full Hessian) and 3 (a directional third derivative), float64 precision.
"""

import itertools
import re

import pytest
import torch
from torch.distributions import Bernoulli, Categorical, OneHotCategorical

import storch
from storch.builtins import expect as _expect_indices



# float64 by default in this module's tests only (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("float64_default")

K1, K2 = 3, 4


def _split(theta):
    logits1 = theta[:K1]
    w = theta[K1:K1 + K1 * K2].reshape(K1, K2)
    phi = theta[-1]
    return logits1, w, phi


def _chain_cost(z1_onehot, z2_onehot, phi):
    # pathwise dependence on phi, nonlinear in both samples
    v = torch.arange(1.0, K2 + 1)
    u = torch.tensor([0.5, -1.0, 2.0])
    return (z2_onehot @ v + phi * (z1_onehot @ u)) ** 2 + torch.sin(phi) * (z2_onehot @ v)


def chain_exact(theta):
    logits1, w, phi = _split(theta)
    p1 = torch.softmax(logits1, -1)
    total = 0.0
    eye1, eye2 = torch.eye(K1), torch.eye(K2)
    for i in range(K1):
        p2 = torch.softmax(eye1[i] @ w, -1)
        for j in range(K2):
            total = total + p1[i] * p2[j] * _chain_cost(eye1[i], eye2[j], phi)
    return total


def chain_storch(theta, order, one_hot_first=True):
    logits1, w, phi = _split(theta)
    e1, e2 = storch.estimator("expect", plate="z1"), storch.estimator("expect", plate="z2")
    with storch.Graph():
        if one_hot_first:
            z1 = e1(OneHotCategorical(logits=logits1))
        else:
            z1 = torch.nn.functional.one_hot(e1(Categorical(logits=logits1)), K1).to(theta.dtype)
        z2 = e2(OneHotCategorical(logits=z1 @ w))
        storch.add_cost(_chain_cost(z1, z2, phi), name="chain")
        return storch.surrogate_loss(order=order)


def directional3(fn, theta, v):
    g = torch.autograd.grad(fn(theta), theta, create_graph=True)[0]
    h = torch.autograd.grad(g @ v, theta, create_graph=True)[0]
    return torch.autograd.grad(h @ v, theta)[0] @ v


@pytest.fixture
def theta():
    torch.manual_seed(0)
    return (torch.randn(K1 + K1 * K2 + 1) * 0.7).requires_grad_(True)


@pytest.mark.parametrize("one_hot_first", [True, False])
def test_chain_orders_0_to_3(theta, one_hot_first):
    fn = lambda t: chain_storch(t, order=3, one_hot_first=one_hot_first)
    assert torch.allclose(fn(theta), chain_exact(theta), rtol=1e-12, atol=1e-12)
    g = torch.autograd.grad(fn(theta), theta)[0]
    g_exact = torch.autograd.grad(chain_exact(theta), theta)[0]
    assert torch.allclose(g, g_exact, rtol=1e-10, atol=1e-12)
    H = torch.autograd.functional.hessian(fn, theta)
    H_exact = torch.autograd.functional.hessian(chain_exact, theta)
    assert torch.allclose(H, H_exact, rtol=1e-10, atol=1e-11)
    v = torch.linspace(-1, 1, theta.numel())
    d3 = directional3(fn, theta, v)
    d3_exact = directional3(chain_exact, theta, v)
    assert torch.allclose(d3, d3_exact, rtol=1e-9, atol=1e-10), (d3, d3_exact)
    assert d3_exact.abs() > 1e-3  # the check is not vacuous


B, D = 4, 2
X = torch.tensor([[0.0, 1.0], [1.0, 1.0], [-1.0, 0.5], [2.0, -0.5]], dtype=torch.float64)


def _plate_split(theta):
    return theta[:D * D].reshape(D, D), theta[D * D:D * D + D], theta[-1]


def plate_exact(theta):
    w, c, phi = _plate_split(theta)
    rec = 0.0
    for b in range(B):
        p = torch.sigmoid(X[b] @ w + c)
        for z in itertools.product([0.0, 1.0], repeat=D):
            z = torch.tensor(z)
            prob = torch.prod(torch.where(z > 0, p, 1 - p))
            rec = rec + prob * (phi * ((z - X[b]) ** 2).sum() + phi ** 3 * z[0] * z[1])
    other = ((w ** 2).sum() + (X * phi).sum(-1)).mean()
    return rec / B + other


def plate_storch(theta, order=3):
    w, c, phi = _plate_split(theta)
    est = storch.estimator("enumerate", plate="z")  # the alias
    with storch.Graph():
        x = storch.denote_independent(X, 0, "data")
        z = est(Bernoulli(logits=x @ w + c))
        storch.add_cost(phi * ((z - x) ** 2).sum() + phi ** 3 * z[0] * z[1], name="rec")
        storch.add_cost((w ** 2).sum() + (x * phi).sum(), name="independent_of_z")
        return storch.surrogate_loss(order=order)


def test_data_plate_two_costs_orders_0_to_3():
    torch.manual_seed(1)
    theta = torch.randn(D * D + D + 1).requires_grad_(True)
    assert torch.allclose(plate_storch(theta), plate_exact(theta), rtol=1e-12)
    g = torch.autograd.grad(plate_storch(theta), theta)[0]
    assert torch.allclose(g, torch.autograd.grad(plate_exact(theta), theta)[0], rtol=1e-10, atol=1e-12)
    H = torch.autograd.functional.hessian(plate_storch, theta)
    assert torch.allclose(H, torch.autograd.functional.hessian(plate_exact, theta), rtol=1e-10, atol=1e-11)
    v = torch.linspace(1, -0.5, theta.numel())
    d3, d3_exact = directional3(plate_storch, theta, v), directional3(plate_exact, theta, v)
    assert torch.allclose(d3, d3_exact, rtol=1e-9, atol=1e-10)
    assert d3_exact.abs() > 1e-3


def test_expect_budget_error():
    est = storch.estimator("expect", plate="z", budget=16)
    with storch.Graph(), pytest.raises(storch.UnsupportedDistributionError, match="budget"):
        est(Bernoulli(logits=torch.zeros(5)))


def test_expect_budget_error_for_a_minibatch_left_in_the_batch_dims_says_to_denote_it():
    """Bernoulli(logits=enc(x)) of shape (32, 4) without denote_independent: the error said only to raise
    the budget (2^128 values) or split the node; the batch belongs on a data plate (2^4 values per point)."""
    enc = torch.nn.Linear(8, 4)
    x = torch.rand(32, 8)
    est = storch.estimator("expect", plate="z")
    with storch.Graph(), pytest.raises(storch.UnsupportedDistributionError) as info:
        est(Bernoulli(logits=enc(x)))
    msg = str(info.value)
    assert re.search(r"If dim 0 \(size 32\) holds independent data points, it belongs on a data plate: "
                     r"`x = storch\.denote_independent\(x, 0, 'data'\)`.*expect then enumerates 2\^4 = 16 values "
                     r"per data point\. Otherwise use a sampling estimator", msg), msg
    assert "raise `budget`" not in msg, msg
    with storch.Graph():  # as the message says
        z = est(Bernoulli(logits=enc(storch.denote_independent(x, 0, "data"))))
        assert z.plates[0].size == 16


def test_expect_budget_error_for_astronomically_many_values_says_to_sample():
    """10^20 joint values (the README's 20 latents of 10 classes, on a data plate): raising the budget
    cannot help, so the message no longer says to."""
    est = storch.estimator("expect", plate="z")
    with storch.Graph(), pytest.raises(storch.UnsupportedDistributionError) as info:
        x = storch.denote_independent(torch.zeros(16, 1), 0, "data")
        est(OneHotCategorical(logits=torch.zeros(20, 10) + x))
    msg = str(info.value)
    assert re.search(r"10\^20 = 10+ joint values .* exceeds the budget of 4096; that many values cannot be "
                     r"enumerated whatever the budget: use a sampling estimator \(such as 'unordered_set'.*'score'\)",
                     msg), msg
    assert "raise `budget`" not in msg and "data plate" not in msg, msg


def test_expect_budget_error_within_reach_still_offers_the_budget():
    est = storch.estimator("expect", plate="z", budget=16)
    with storch.Graph(), pytest.raises(storch.UnsupportedDistributionError,
                                       match=r"2\^5 = 32 joint values .*; raise `budget`, split the node"):
        est(Bernoulli(logits=torch.zeros(5)))


def test_expect_rejects_continuous():
    est = storch.estimator("expect", plate="z")
    with storch.Graph(), pytest.raises(storch.UnsupportedDistributionError, match="finite support"):
        est(torch.distributions.Normal(0.0, 1.0))


def test_expect_under_nested_torch_func_can_be_called_again():
    """expect's table of joint values was cached with functools.lru_cache: made inside jacrev(jacrev(f)),
    it belonged to that call's functorch level, and every later call failed PyTorch's internal assert
    "level <= current_level". Now: three calls, each equal to the eager Hessian."""
    est = storch.estimator("expect", plate="z")

    def step(th):
        with storch.Graph():
            x = storch.denote_independent(torch.tensor([0.5, -1.0]), 0, "data")
            z = est(Bernoulli(logits=th[0] * x + th[1]))
            storch.add_cost((z - th[2] * x) ** 2, name="c")
            return storch.surrogate_loss()

    th0 = torch.tensor([0.7, -0.3, 0.4])
    _expect_indices._joint_indices.cache_clear()  # (an eager call first would cache a plain table)
    hessians = [torch.func.jacrev(torch.func.jacrev(step))(th0) for _ in range(3)]
    eager = torch.autograd.functional.hessian(step, th0)
    for h in hessians:
        torch.testing.assert_close(h, eager)


@pytest.mark.parametrize("form", ["one_hot", "categorical_logits_read"])
def test_expect_on_a_data_plate_with_probs_of_exactly_0(form):
    """Probs with exact zeros on a data plate: the raw copy of a OneHotCategorical (whose argument
    validation computed torch's logits from clamped probabilities, log(eps) = -15.9 at 0) or of a
    Categorical whose logits the user read took those logits as the given form, so they were never made
    -inf: expect handed the cost 26 of 32 impossible values (and gave inf with a cost infinite there).
    Now: none, and the exact value and gradient. Fails on that code."""
    mask = torch.tensor([[[0.0, 1, 0, 1], [0, 0, 1, 0]], [[1, 0, 1, 0], [0, 1, 0, 1]]])
    theta = torch.linspace(-1.0, 1.2, 16).reshape(2, 2, 4).requires_grad_()
    values = torch.arange(4.0)

    def masked(th, m):
        p = torch.softmax(th, -1) * m
        return p / p.sum(-1, keepdim=True)

    seen = []
    with storch.Graph():
        th, m = storch.denote_independent((theta, mask), 0, "data")
        if form == "one_hot":
            z = storch.estimator("expect", plate="z")(OneHotCategorical(probs=masked(th, m)))
        else:
            d = Categorical(probs=masked(th, m))
            d.logits  # read: cached in d
            z = torch.nn.functional.one_hot(storch.estimator("expect", plate="z")(d), 4).to(theta.dtype)
        impossible = (z.bool() & (m == 0)).any(-1).any(-1)
        seen.append(impossible.tensor)
        storch.add_cost((z * values).sum((-1, -2)) + torch.where(impossible, float("inf"), 0.0), name="c")
        loss = storch.surrogate_loss()
        (g,) = torch.autograd.grad(loss, theta)
    exact = (masked(theta, mask) * values).sum((-1, -2)).mean()
    (want,) = torch.autograd.grad(exact, theta)
    assert not bool(seen[0].any()), f"{int(seen[0].sum())} impossible values handed to the cost"
    assert float(loss.detach()) == pytest.approx(float(exact.detach()), rel=1e-12)
    torch.testing.assert_close(g, want, rtol=0, atol=1e-12)


class _Categorical(Categorical):
    """A subclass: expect computes its log p with ``log_prob`` (the general path), the oracle below."""


class _OneHotCategorical(OneHotCategorical):
    pass


@pytest.mark.parametrize("one_hot", [False, True])
@pytest.mark.parametrize("own", [(), (2,)])
@pytest.mark.parametrize("masked", ["none", "logits", "probs"])
def test_expect_categorical_log_probs_read_from_logits(monkeypatch, one_hot, own, masked):
    """expect's log p of every value of a Categorical over a data plate was ``log_prob`` of the support
    expanded to (K, B): torch broadcasts it against the logits to (K, B, K), and the backward
    materialised that (K = 4000, B = 16: 572 ms and 5.9 GB; by hand 0.5 MB). Now read from the
    normalised logits, O(K · B): ``log_prob`` is never called, and the value and the gradients equal
    those of the ``log_prob`` path (a subclass takes it), impossible values (-inf logits, probabilities
    of exactly 0) included."""
    K, B = 5, 3
    torch.manual_seed(3)
    w = torch.randn(B, *own, K, requires_grad=True)
    x = torch.randn(B)
    emb = torch.randn(K)
    mask = torch.zeros(B, *own, K, dtype=torch.bool)
    if masked != "none":
        mask[0, ..., 1] = mask[1, ..., 0] = mask[1, ..., 3] = True

    def run(fast):
        cat = (OneHotCategorical if one_hot else Categorical) if fast else (_OneHotCategorical if one_hot else _Categorical)
        est = storch.estimator("expect", plate="z")
        with storch.Graph():
            xs, ws, m = storch.denote_independent((x, w, mask), 0, "data")
            logits = xs * ws  # (per data point: (*own, K))
            if masked == "probs" and fast:
                d = cat(probs=torch.softmax(logits, -1).masked_fill(m, 0.0))
            else:  # (the oracle, a subclass, has no strict support for probabilities of 0: -inf logits)
                d = cat(logits=logits.masked_fill(m, -torch.inf))
            z = est(d)
            v = (z * emb).sum(-1) if one_hot else emb[z]
            if own:
                v = v.sum(-1)
            storch.add_cost(torch.exp(v) * xs, name="c")
            loss = storch.surrogate_loss()
            return loss, torch.autograd.grad(loss, w)[0]

    slow_value, slow_grad = run(False)
    calls = []
    for cls in (Categorical, OneHotCategorical):
        def counted(self, value, _orig=cls.log_prob):
            calls.append(type(self))
            return _orig(self, value)
        monkeypatch.setattr(cls, "log_prob", counted)
    value, grad = run(True)
    assert calls == []  # the fast path was taken
    assert torch.isfinite(value) and torch.isfinite(grad).all()
    torch.testing.assert_close(value, slow_value, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad, slow_grad, rtol=1e-12, atol=1e-14)
    if masked == "logits":
        assert (grad[mask] == 0).all()
