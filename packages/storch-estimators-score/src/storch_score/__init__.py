"""Score-function estimators for storch: ``score`` (REINFORCE) with baselines, ``importance``,
``sum_and_sample`` (MAPO; with ``buffer=`` it builds :class:`SumAndSampleSequences`, the sequence estimator with a
memory buffer), ``unordered_set`` and ``vimco``; ``storch_estimators`` is the plugin hook that registers them (its
module, ``storch_score.plugin``, is the entry point)."""

from .importance import Importance
from .learned_baseline import LearnedBaseline
from .plugin import storch_estimators
from .score import Score
from .sum_and_sample import SumAndSample
from .sum_and_sample_sequences import SumAndSampleSequences
from .unordered_set import UnorderedSet
from .vimco import Vimco

__all__ = ["Score", "Importance", "SumAndSample", "SumAndSampleSequences", "UnorderedSet", "Vimco", "LearnedBaseline",
           "storch_estimators"]
