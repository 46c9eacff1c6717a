"""A credited cost that holds one value for all the entries of a node's sample plate (a value of the whole set of
samples, reduced over the plate and broadcast back: size 1 or stride 0 along it). ``storch.add_cost`` refuses it
where the node's estimator reads its samples (the score function credits each entry with it as its own cost:
biased; tests/models/test_reweighted_wake_sleep.py), and only there (review r-57):

- a pathwise node (reparameterization) differentiates it through every sample: the plate's mean of one value is that
  value, so the batched IWAE bound written with ``keepdim=True`` is the IWAE gradient, as hand-written;
- ``expect``'s weights are the probabilities of its whole support, which sum to 1: a value of the whole support is
  exact;
- an enumerated sample is one expanded view of the support, stride 0 along the plate of a node upstream: as a cost it
  holds one value per entry of the enumeration, weighted by probabilities that vary along the upstream plate, not a
  set value of that plate.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from storch.testing import assert_unbiased, per_replicate_derivatives, replicate
from torch.distributions import Bernoulli, Categorical, Normal

import storch
from path_probes import calls

K = 4


class _Score(storch.Estimator):
    """The base class's components: the score function, no baseline (a node that reads its samples)."""

    name = "set_value_costs_score"


def _log_weights(loc, x, z):
    """IWAE's per-sample log-weight of a Normal latent with a Normal likelihood (q = N(loc, 1), prior N(0, 1))."""
    return (Normal(z, 1.0).log_prob(x) + Normal(0.0, 1.0).log_prob(z) - Normal(loc, 1.0).log_prob(z)).sum(-1)


@pytest.mark.parametrize("how", ["keepdim", "expand"])
def test_a_set_value_on_a_pathwise_plate_is_credited_exactly(how):
    """The negative IWAE bound of K reparameterised samples, reduced over the plate's dim and put back on the plate,
    credited: the gradient of the hand-written IWAE bound from the same draws (and of the cost added with
    credit=False). It was refused with a CostError (as for the score function, which it biases)."""
    x_raw = torch.randn(2, 3, generator=torch.Generator().manual_seed(0))
    loc = torch.tensor([0.3, -0.2, 0.5], requires_grad=True)

    def storch_gradient(credit):
        torch.manual_seed(1)
        with storch.Graph():
            x = storch.denote_independent(x_raw, 0, "data")
            z = storch.estimator("reparameterization", plate="z", n_samples=K)(Normal(loc + 0 * x, 1.0))
            lw = _log_weights(loc, x, z)
            i = lw.plate_names.index("z")
            bound = math.log(K) - lw.tensor.logsumexp(i, keepdim=True)
            if how == "expand":
                bound = bound.expand_as(lw.tensor)
                assert bound.stride(i) == 0  # (one value broadcast back: the case the refusal reads)
            storch.add_cost(storch.PlateTensor(bound, lw.plates), name="negative_iwae", credit=credit)
            return torch.autograd.grad(storch.surrogate_loss(), loc)[0]

    torch.manual_seed(1)
    eps = torch.randn(K, 2, 3)  # rsample((K,)) of a (2, 3) Normal: the same draws
    z = loc + eps
    lw = _log_weights(loc, x_raw, z)  # (K, 2)
    (want,) = torch.autograd.grad((math.log(K) - lw.logsumexp(0)).mean(), loc)
    got = storch_gradient(True)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got, storch_gradient(False), rtol=0, atol=0)


def test_a_set_value_of_an_enumerated_node_is_exact():
    """expect: L = logsumexp over the 3 enumerated values of a[z], put back on the plate (keepdim). Its expectation is
    L itself: gradient softmax(a) in a and 0 in the logits (the weights sum to 1)."""
    logits = torch.tensor([0.2, -0.4, 1.0], requires_grad=True)
    a = torch.tensor([1.0, 0.0, -2.0], requires_grad=True)
    with storch.Graph():
        z = storch.estimator("expect", plate="e")(Categorical(logits=logits))
        v = a[z]
        bound = v.tensor.logsumexp(0, keepdim=True)
        storch.add_cost(storch.PlateTensor(bound, v.plates), name="log_sum")
        g_logits, g_a = torch.autograd.grad(storch.surrogate_loss(), (logits, a))
    torch.testing.assert_close(g_a, torch.softmax(a.detach(), 0))
    torch.testing.assert_close(g_logits, torch.zeros(3), atol=1e-7, rtol=0)


def test_an_enumerated_sample_over_an_upstream_plate_is_a_cost_per_entry():
    """u ~ Bernoulli(σ(θ)) by the score function on plate "u", z ~ Bernoulli(σ(θ + u)) enumerated: z's raw values are
    one expanded view of {0, 1}, stride 0 along "u", and the cost z is credited to u through the weights p(z | u),
    which vary along it. Unbiased for d/dθ E[z] = d/dθ [(1 - σ(θ)) σ(θ) + σ(θ) σ(θ + 1)] (it was refused as a value
    of the whole set of u's samples)."""
    theta0 = torch.tensor(0.3, dtype=torch.float64)
    s = torch.sigmoid
    t = theta0.clone().requires_grad_(True)
    (want,) = torch.autograd.grad((1 - s(t)) * s(t) + s(t) * s(t + 1), t)
    torch.manual_seed(0)
    with storch.Graph():
        leaf, theta = replicate(theta0, 4000)
        u = _Score("u", n_samples=2)(Bernoulli(logits=theta))
        z = storch.estimator("expect", plate="e")(Bernoulli(logits=theta + u))
        assert z.tensor.stride(z.plate_names.index("u")) == 0
        storch.add_cost(z, name="z")
        got = per_replicate_derivatives(storch.surrogate_loss(), leaf, 1)[0]
    assert_unbiased(got.reshape(-1, 1), want.reshape(1), "d/dθ E[z]")


@pytest.mark.parametrize("how", ["keepdim", "expand"])
def test_a_set_value_on_a_score_function_plate_is_refused(how):
    """The control: the same IWAE bound over the samples of a node that reads them (the score function)."""
    loc = torch.zeros(3, requires_grad=True)
    with storch.Graph():
        z = _Score("z", n_samples=K)(Bernoulli(logits=loc))
        lw = (z * loc).sum(-1) - Bernoulli(logits=loc).log_prob(z).sum(-1)
        bound = math.log(K) - lw.tensor.logsumexp(0, keepdim=True)
        if how == "expand":
            bound = bound.expand(K)
        with pytest.raises(storch.CostError, match="holds one value for all 4 entries of the sample plate 'z'"):
            storch.add_cost(storch.PlateTensor(bound, lw.plates), name="negative_iwae")


def test_a_full_contiguous_cost_skips_the_stride_reads_and_a_permuted_one_is_accepted():
    """The common cost (one value per entry, contiguous) pays two C calls and no per-plate read; one whose raw values
    are lined up in another plate order (storch.aligned: a permuted view, no stride 0) is read per plate and
    accepted, with the gradient of the same cost added as it was."""
    theta = torch.tensor([0.1, -0.3], requires_grad=True)

    def gradient(permuted):
        torch.manual_seed(0)
        with storch.Graph():
            x = storch.denote_independent(torch.tensor([[1.0, 2.0], [0.5, -1.0], [2.0, 0.0]]), 0, "data")
            z = _Score("z", n_samples=K)(Bernoulli(logits=theta + x))
            c = ((z - x) ** 2).sum(-1)
            assert c.plate_names == ("z", "data") and c.tensor.is_contiguous()
            if permuted:
                (raw,), plates = storch.aligned(c, plates=("data", "z"))
                assert not raw.is_contiguous()
                c = storch.PlateTensor(raw, plates)
            _, seen = calls(lambda: storch.add_cost(c, name="c"))
            assert ("_check_set_value" in seen) == permuted, seen
            return torch.autograd.grad(storch.surrogate_loss(), theta)[0]

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(gradient(True), gradient(False))
