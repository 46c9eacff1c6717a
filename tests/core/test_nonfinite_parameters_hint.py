"""NonFiniteCostError's hint about a distribution's non-finite parameters names the cause it sees: -inf padding
(-inf - -inf = NaN in a log_prob) where the parameters hold no NaN; NaN parameters as such (a diverged model, or
-inf - -inf in the constructor). A Categorical with masked (-inf) logits, which are fine, whose logits also went NaN
(diverged, validation off) was told only to pad with a finite value."""

from __future__ import annotations

import pytest
import torch
from torch.distributions import Categorical

import storch

INF = float("inf")


def _refusal(logits: torch.Tensor) -> str:
    with storch.Graph():
        q = Categorical(logits=storch.denote_independent(logits, 0, "data"), validate_args=False)
        z = storch.estimator("expect", plate="z")(q)
        storch.add_cost((z.float() - 1.0) ** 2, name="f")
        with pytest.raises(storch.NonFiniteCostError) as info:
            storch.backward()
    return str(info.value)


def test_a_masked_categorical_whose_logits_went_nan_is_named_for_the_nan():
    message = _refusal(torch.tensor([[0.0, 0.0, -INF], [float("nan"), 0.0, -INF]], requires_grad=True))
    assert "NaN parameters at 'expect' (plate 'z', a Categorical: logits)" in message, message
    assert "diverged" in message and "Infinite parameters" not in message, message


def test_a_row_masked_entirely_is_named_with_the_minus_infinity_cause():
    # every category masked: Categorical's logits - logsumexp = -inf - -inf = NaN in its constructor
    message = _refusal(torch.tensor([[0.0, 0.0, -INF], [-INF, -INF, -INF]], requires_grad=True))
    assert "NaN parameters at 'expect' (plate 'z', a Categorical: logits)" in message, message
    assert "-inf in a whole row" in message and "very low finite value" in message, message
