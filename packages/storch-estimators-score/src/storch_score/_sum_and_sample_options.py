"""What the two sum-and-sample estimators share: the registered description and the option checks.

``sum_and_sample`` (alias ``mapo``) is one registered name for two estimators: the one-step
:class:`~storch_score.SumAndSample` and MAPO's sequence mode
:class:`~storch_score.sum_and_sample_sequences.SumAndSampleSequences` (``buffer=``).
"""

from __future__ import annotations

from typing import Optional

from storch import OptionError
from storch.extending import options

__all__ = ["NAME", "SUMMARY", "BASELINES", "check_n_enumerate", "check_baseline"]

NAME = "sum_and_sample"

#: the registered one-line description (``EstimatorInfo.description``): the first line of
#: ``SumAndSample``'s docstring, and what ``SumAndSampleSequences.describe()`` gives too
SUMMARY = "Sum exactly over a memory set M of values and sample the rest from p(x | x ∉ M) (appendix D.2.3)."

# the accepted baselines; 'batch_average' is an alias of 'leave_one_out'
BASELINES = ("none", "leave_one_out", "batch_average")


def check_n_enumerate(n_enumerate: Optional[int], default: int) -> int:
    """k', the number of memory values (or slots) summed exactly: ``default`` if not given."""
    return options.integer(NAME, "n_enumerate", default if n_enumerate is None else n_enumerate, minimum=0)


def check_baseline(baseline: str, n_samples: int) -> bool:
    """Whether the leave-one-out baseline is on; it needs two samples or more."""
    options.choice(NAME, "baseline", baseline, BASELINES)
    if baseline != "none" and n_samples < 2:
        raise OptionError(f"{NAME}: baseline={baseline!r} needs n_samples >= 2, got {n_samples}")
    return baseline != "none"
