"""The ``storch_estimators`` hook of the score family (entry point group ``storch.estimators``)."""

from __future__ import annotations

import storch

from .importance import Importance
from .score import Score
from .sum_and_sample import SumAndSample
from .unordered_set import UnorderedSet
from .vimco import Vimco

__all__ = ["storch_estimators"]


@storch.hookimpl
def storch_estimators() -> list:
    """The plugin hook: this family's estimator classes."""
    return [Score, Importance, SumAndSample, UnorderedSet, Vimco]
