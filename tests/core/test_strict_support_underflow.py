"""strict_support on a Categorical given by logits: a finite logit is made -inf exactly where torch's own
probability (``Categorical.probs``: softmax of the logits, what ``sample`` draws from) is 0, in every dtype,
eagerly and traced; the copy keeps the log-probabilities and their derivatives (orders 1 and 2) on every value
of positive probability."""

from __future__ import annotations

import pytest
import torch
from torch.distributions import Categorical, Independent, OneHotCategorical

from storch.distributions import strict_support

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def _sweep(dtype: torch.dtype, others: int) -> torch.Tensor:
    """Rows of one logit swept through every dtype's underflow (-5 to -800), beside ``others`` zero logits."""
    xs = torch.linspace(-5, -800, 2001, dtype=torch.float64)
    raw = torch.zeros(len(xs), others + 1, dtype=torch.float64)
    raw[:, 0] = xs
    # the points where softmax and exp(normalised logit) round differently (found by a finer sweep)
    edge = torch.zeros(2, others + 1, dtype=torch.float64)
    edge[:, 0] = torch.tensor([-97.06497192382812, -10.421875], dtype=torch.float64)
    return torch.cat([raw, edge]).to(dtype)


def _impossible(d) -> torch.Tensor:
    """Where the strict copy's log-probability of each value is -inf (values as indices)."""
    k = d.logits.shape[-1]
    lp = d.log_prob(torch.arange(k).reshape(k, *([1] * len(d.batch_shape))))
    return torch.isinf(lp).movedim(0, -1)


@pytest.mark.parametrize("traced", [False, True])
@pytest.mark.parametrize("others", [1, 1000])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_minus_inf_exactly_where_torchs_probability_is_0(dtype, others, traced):
    d = Categorical(logits=_sweep(dtype, others))
    never = d.probs == 0  # what torch's sample never draws
    s = strict_support(d, traced)
    got = _impossible(s) if s is not d else torch.zeros_like(never)
    assert bool(never.any())  # the sweep reaches the underflow
    wrong = got != never
    assert not bool(wrong.any()), (
        f"{int((got & ~never).sum())} values torch can draw made impossible (e.g. logit "
        f"{d.logits[(got & ~never).any(-1)][:1, 0].tolist()}), {int((never & ~got).sum())} values it never draws "
        "left possible")


def test_a_value_of_probability_1e_45_keeps_its_log_probability():
    """float32: a logit of -97.065 beside 1000 zeros has probability 1.4e-45 (softmax), though exp of its
    normalised logit underflows to 0; torch can draw it, so its log-probability stays finite."""
    raw = torch.zeros(1001)
    raw[0] = -97.06497192382812
    d = Categorical(logits=raw)
    assert float(d.probs[0]) > 0
    s = strict_support(d)
    assert float(s.log_prob(torch.tensor(0))) == float(d.log_prob(torch.tensor(0)))


@pytest.mark.parametrize("wrap", ["categorical", "one_hot", "independent"])
def test_masked_copy_keeps_derivatives_to_the_other_logits_at_orders_1_and_2(wrap):
    """A -1e9 mask in float64 (batch of 2 rows): the copy's log p of every possible value has the original's
    gradient and Hessian with respect to the raw logits, the masked ones included (through the normalisation)."""
    raw = torch.tensor([[0.3, -1e9, 1.2, -0.4], [-1e9, 0.5, -1e9, 0.1]], dtype=torch.float64, requires_grad=True)
    values = torch.tensor([[0, 3], [1, 3]])  # possible values, one per row and column

    def log_p(make):
        if wrap == "categorical":
            d = make(Categorical(logits=raw))
            return d.log_prob(values.T).sum()
        if wrap == "one_hot":
            d = make(OneHotCategorical(logits=raw))
            return d.log_prob(torch.nn.functional.one_hot(values.T, 4).to(raw.dtype)).sum()
        d = make(Independent(Categorical(logits=raw), 1))
        return d.log_prob(values.T).sum()

    assert log_p(strict_support).detach() == log_p(lambda d: d).detach()

    def derivatives(make):
        (g,) = torch.autograd.grad(log_p(make), raw, create_graph=True)
        h = torch.stack([torch.autograd.grad(g.reshape(-1)[i], raw, retain_graph=True)[0].reshape(-1)
                         for i in range(raw.numel())])
        return g, h

    (g, h), (want_g, want_h) = derivatives(strict_support), derivatives(lambda d: d)
    assert float(want_h.abs().max()) > 0.1
    torch.testing.assert_close(g, want_g, rtol=0, atol=1e-12)
    torch.testing.assert_close(h, want_h, rtol=0, atol=1e-12)
    made = strict_support(Categorical(logits=raw.detach()))
    assert _impossible(made).tolist() == [[False, True, False, False], [True, False, True, False]]
