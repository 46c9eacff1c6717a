"""The refusal of a second call of an estimator without partitions names those that support partitions and the
distribution (storch.estimators.catalog.partition_estimators), each with what a partition of it needs: named bare,
sum_and_sample was advice that its next call refused (a second call without buffer=)."""

from __future__ import annotations

import pytest
import torch
from torch.distributions import Categorical

import storch


def test_second_call_advice_names_what_a_partition_of_each_needs():
    token = Categorical(logits=torch.zeros(3))
    est = storch.estimator("importance", plate="z", proposal=Categorical(logits=torch.zeros(3)))
    with storch.Graph(), pytest.raises(storch.PlateError) as info:
        est(token)
        est(token)
    message = str(info.value)
    assert "sum_and_sample (a partition needs buffer=K" in message and "one token per call" in message
    assert "score, sum_and_sample" in message and "unordered_set" in message
    # the advice, followed as the message says it, is taken: without buffer= the second call is refused
    with storch.Graph(), pytest.raises(storch.PlateError, match="already used"):
        bare = storch.estimator("sum_and_sample", plate="z")
        bare(token)
        bare(token)
    seq = storch.estimator("sum_and_sample", plate="z", n_samples=2, buffer=4)
    with storch.Graph():
        seq(token)
        z = seq(token)
    assert [(p.name, p.step) for p in z.plates] == [("z", 1)]  # one partition
