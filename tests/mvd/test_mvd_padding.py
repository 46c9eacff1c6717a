"""storch.padding for mvd: an inactive slot (a p^± outside the element's proposals G_e: a Categorical's p⁺_k = δ_k
at p_k = 0, its p⁻_k at p_k = 1, a Bernoulli's δ₁ at probs 0 and δ₀ at probs 1) holds a stand-in, a possible value at
weight 0 and l = 0, which is padding by the protocol's definition (docs/writing-an-estimator.md); every other slot
is a draw of its p^± and is not, even where its weight is 0.

Oracle: by hand, from the plate's order (replicate, component k, sign ±, element), which slots are inactive; and the
definition checked on the node: weight 0, l = 0 and a possible value on each padding entry.
"""

import math

import pytest
import torch
from torch.distributions import Bernoulli, Categorical

import storch

INF = math.inf


def _draw(d_of, logits, n_samples=1):
    """(padding, weights, l, log p of the value), each a raw tensor (entry, data), and the node's plate names."""
    torch.manual_seed(0)
    est = storch.estimator("mvd", plate="z", n_samples=n_samples)
    with storch.Graph():
        d = d_of(storch.denote_independent(logits, 0, "data"))
        z = est(d)
        pad = storch.padding(z)
        node = storch.current_graph().nodes[-1]
        lp = d.log_prob(z)
        assert [p.name for p in pad.plates] == ["z", "data"] and pad.dtype == torch.bool
        names = [p.name for p in lp.plates]
        lp = lp.tensor.permute(names.index("z"), names.index("data"), *range(2, lp.tensor.dim()))
        shape = pad.tensor.shape
        w = node.state.weights.expand(shape)
        grad = node.state.gradient.expand(shape)
        return pad.tensor, w, grad, lp


def _check_definition(pad, w, grad, lp):
    # padding: weight 0, l = 0, a possible value; every other entry has weight > 0 here (no Poisson-like slot)
    assert (w[pad] == 0).all() and (grad[pad] == 0).all() and torch.isfinite(lp[pad]).all()
    assert (w[~pad] > 0).all()


@pytest.mark.parametrize("n_samples", [1, 3])
def test_categorical_inactive_slots_are_padding(n_samples):
    # data point 0: p_2 = 0 (p⁺_2 inactive); data point 1: p_0 = 1 (p⁻_0 and p⁺_1, p⁺_2 inactive); data point 2:
    # every probability in (0, 1), nothing inactive. Plate order per replicate: (k, ±), 6 entries.
    logits = torch.tensor([[0.3, -0.2, -INF], [0.0, -INF, -INF], [0.1, 0.5, -0.4]], dtype=torch.float64)
    pad, w, grad, lp = _draw(lambda x: Categorical(logits=x), logits, n_samples)
    expected = torch.tensor([[False, False, False, False, True, False],
                             [False, True, True, False, True, False],
                             [False] * 6]).T.repeat(n_samples, 1)
    assert torch.equal(pad, expected)
    _check_definition(pad, w, grad, lp)


def test_categorical_without_zero_probability_has_no_padding():
    logits = torch.tensor([[0.3, -0.2, 1.0], [0.1, 0.5, -0.4]], dtype=torch.float64)
    pad, w, grad, lp = _draw(lambda x: Categorical(logits=x), logits, 2)
    assert pad.shape == (2 * 3 * 2, 2) and not pad.any()
    _check_definition(pad, w, grad, lp)


def test_bernoulli_certain_bits_are_padding():
    # three elements per data point: p = 0, p in (0, 1), p = 1; plate order per replicate: (±, element)
    # (in probs: torch's Bernoulli(logits=-inf).log_prob(0) is NaN, not 0)
    probs = torch.tensor([[0.0, 0.6, 1.0], [0.5, 0.4, 0.6]], dtype=torch.float64)
    pad, w, grad, lp = _draw(lambda x: Bernoulli(probs=x), probs)
    expected = torch.tensor([[True, False, False, False, False, True], [False] * 6]).T
    assert torch.equal(pad, expected)
    _check_definition(pad, w, grad, lp.sum(-1))


def test_families_without_inactive_slots_say_false():
    torch.manual_seed(0)
    est = storch.estimator("mvd", plate="z", n_samples=2)
    with storch.Graph():
        x = storch.denote_independent(torch.tensor([0.3, -1.0]), 0, "data")
        pad = storch.padding(est(torch.distributions.Normal(x, 1.0)))
    assert pad.dtype == torch.bool and not pad.tensor.any() and [p.name for p in pad.plates] == ["z", "data"]
