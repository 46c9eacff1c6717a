"""unordered_set's short paths: asserted taken (and not taken where they must not be), with the values and
gradients of the general path."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Categorical

import storch
from storch_score import unordered_set as us
from storch_score.unordered_set import _log1mexp, _log_h, _set_weights

torch.set_default_dtype(torch.float64)


def _step(make, steps=1, n=3, seed=0, baseline=True):
    """A step of unordered_set on ``make(h)`` (``steps`` > 1: a sequence, the estimator called at every
    step); the samples, the loss and the gradient of the parameters."""
    torch.manual_seed(seed)
    ws = [torch.randn(4, 5, requires_grad=True) for _ in range(steps)]
    data = torch.randn(6, 4)
    est = storch.estimator("unordered_set", plate="z", n_samples=n, baseline=baseline)
    with storch.Graph():
        h = storch.denote_independent(data, 0, "d")
        samples = []
        for i, w in enumerate(ws):
            z = est(make(h @ w))
            samples.append(z.tensor.detach().clone())
            h = F.one_hot(z, 5).to(w.dtype)[..., :4] if z.dtype == torch.long else z[..., :4]
            storch.add_cost((z.to(w.dtype) - 1.5) ** 2 if z.dtype == torch.long else (z - 0.4).pow(2).sum(-1),
                            name=f"c{i}")
        loss = storch.surrogate_loss()
    return samples, loss.detach(), torch.autograd.grad(loss, ws)


def _refuse(monkeypatch, name):
    calls = []

    def refuse(*a, **k):
        calls.append(name)
        return getattr(us, "_orig_" + name)(*a, **k)

    monkeypatch.setattr(us, "_orig_" + name, getattr(us, name), raising=False)
    monkeypatch.setattr(us, name, refuse)
    return calls


@pytest.mark.parametrize("steps", [1, 3])
def test_categorical_sample_is_the_drawn_index(monkeypatch, steps):
    """One Categorical variable per entry: the sample is the top-k index itself (its values are arange(K)),
    without listing the support (enumerate_joint / enumerate_values are not called); the same samples, loss
    and gradient as the general path (taken when the estimator does not see the type as a Categorical)."""
    calls = _refuse(monkeypatch, "enumerate_joint")
    calls_v = _refuse(monkeypatch, "enumerate_values")
    fast = _step(lambda t: Categorical(logits=t), steps)
    assert calls == [] and calls_v == []  # the short path: the support is never listed

    # the estimator not recognising the type: the general path (values[idx] of the listed support)
    monkeypatch.setattr(us, "Categorical", type("NotCategorical", (), {}))
    general = _step(lambda t: Categorical(logits=t), steps)
    assert calls == ["enumerate_joint"] and calls_v == ["enumerate_values"] * (steps - 1)  # control
    for a, b in zip(fast[0], general[0]):
        assert a.dtype == b.dtype == torch.long and torch.equal(a, b)
    assert torch.equal(fast[1], general[1])
    for a, b in zip(fast[2], general[2]):
        assert torch.equal(a, b)


def test_categorical_with_own_dims_lists_the_joint_support(monkeypatch):
    """Control: two Categorical variables per entry (an own batch dim) are enumerated jointly (values[idx])."""
    calls = _refuse(monkeypatch, "enumerate_joint")
    torch.manual_seed(1)
    est = storch.estimator("unordered_set", plate="z", n_samples=3)
    with storch.Graph():
        z = est(Categorical(logits=torch.randn(2, 5)))
    assert calls == ["enumerate_joint"] and z.tensor.shape == (3, 2)


def _log_space(lp, rest):
    h0, h1, h2 = _log_h(lp, rest.clamp_min(-1e30))
    return (lp + h1 - h0).exp(), (lp.unsqueeze(0) + h2 - h1.unsqueeze(1)).exp()


@pytest.mark.parametrize("dense", [True, False])
@pytest.mark.parametrize("k", [1, 2, 4, 8, 11])
def test_weights_from_the_linear_layers_match_log_space(monkeypatch, dense, k):
    """w(s) = q({s}) / q(∅) and A[s, s'] = q({s, s'}) / q({s}) from the linear programme's layers give the
    log-space programme's exp(log p + log h - log h) (to float64 rounding), on both forms of a layer, with
    p(D∖S) > 0 and = 0 (-inf); the log-space programme is not run (path asserted)."""
    if not dense:
        monkeypatch.setattr(us, "_DENSE_MAX", 0)
    us._LINEAR_TABLES.clear()
    torch.manual_seed(k)
    logs = _refuse(monkeypatch, "_log_h")
    for whole in (False, True):
        lp = torch.log_softmax(torch.randn(k + (0 if whole else 2), 9) * 1.5, 0)[:k]
        rest = torch.full((9,), -math.inf) if whole else _log1mexp(torch.logsumexp(lp, 0))
        for possible in (True, False):
            w, coef = _set_weights(lp, rest, possible, True)
            assert coef is not None
            want_w, want_coef = _log_space(lp, rest)
            assert torch.allclose(w, want_w, rtol=1e-11, atol=1e-13)
            assert torch.allclose(coef, want_coef, rtol=1e-11, atol=1e-13)
            assert torch.allclose(coef.diagonal(0, 0, 1).t(), lp.exp())  # A[s, s] = p(s)
            assert _set_weights(lp, rest, possible, False)[1] is None
    assert logs == []  # every case above is the linear programme's
    us._LINEAR_TABLES.clear()


def test_weights_fall_back_to_log_space_where_linear_overflows(monkeypatch):
    """Control: p(D∖S) and every p(s) ~ e^-800 (q(∅) overflows float64): the log-space programme answers,
    told the elements are possible (tried, overflowed) or not (_linear_ok refuses), with its exact values."""
    logs = _refuse(monkeypatch, "_log_h")
    lp = torch.full((3, 2), -800.0) + torch.arange(3.0).unsqueeze(1)
    rest = torch.full((2,), -800.0)
    want = _log_space(lp, rest)  # (the unpatched _log_h)
    for possible in (True, False):
        w, coef = _set_weights(lp, rest, possible, True)
        assert coef is not None
        assert torch.isfinite(w).all() and torch.equal(w, want[0]) and torch.equal(coef, want[1])
    assert logs == ["_log_h"] * 2
