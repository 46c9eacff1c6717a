"""What a relaxed estimator hands out for a ``Categorical`` node, and the option that decides whether it takes one.

A relaxed sample (``gumbel_softmax``; ``rebar``'s and ``relax``'s relaxed blocks) is a point of the
simplex, a straight-through one (``gumbel_straight_through``; the b block next to relaxed blocks) a
one-hot vector: neither has an index form, so for a ``Categorical`` node they hand out a vector of
shape ``(..., K)`` where every other estimator hands out the index. Code written for the index
(``(x - 1.3) ** 2``, ``x == k``, ``x.float()``) still runs on the vector and computes another cost,
silently. So these estimators refuse a ``Categorical`` by default (``categorical="refuse"``) and take
it only with ``categorical="one_hot"``, the user's word that the model is written for one-hot
vectors; ``OneHotCategorical`` (the same parameters) is the distribution that says so itself.
"""

from __future__ import annotations

from typing import Any

from torch.distributions import Bernoulli, Categorical, Distribution, OneHotCategorical

from storch import OptionError
from storch.extending import base_distribution

__all__ = ["CATEGORICAL_FORMS", "OneHotForCategorical", "check_categorical"]

#: the values of the ``categorical`` option: refuse a Categorical node, or hand it out as one-hot vectors
CATEGORICAL_FORMS = ("refuse", "one_hot")

#: the distributions a relaxed estimator takes by default (a Categorical only with categorical="one_hot")
DEFAULT_DISTRIBUTIONS = (Bernoulli, OneHotCategorical)
WITH_CATEGORICAL = (Bernoulli, Categorical, OneHotCategorical)

# the estimators that hand out a Categorical's index (named in the refusal)
_INDEX_ESTIMATORS = ("score (with any baseline, e.g. baseline='leave_one_out')", "unordered_set", "sum_and_sample",
                     "expect", "go", "relax with control_variate='network'")


def check_categorical(name: str, value: Any) -> str:
    """``value`` if it is one of :data:`CATEGORICAL_FORMS`, else :class:`storch.OptionError`."""
    if not isinstance(value, str) or value not in CATEGORICAL_FORMS:
        raise OptionError(f"{name}: categorical={value!r} is not accepted; use 'refuse' (the default: a Categorical "
                          "node is refused, as its sample here would be a one-hot vector, not an index) or "
                          "'one_hot' (a Categorical node hands out one-hot vectors of shape (..., K); write the "
                          "model for them)")
    return value


class OneHotForCategorical:
    """Mixin of the estimators that hand out one-hot vectors for a Categorical node: the ``categorical``
    option (checked as the constructor checks it when set later, ``est.categorical = "one_hot"``), the
    instance's ``distributions`` that follow it, and the refusal that says why and what to do.

    ``_takes_index``: why this instance hands out a Categorical's index anyway (``relax`` with
    ``control_variate="network"``), so that it takes a Categorical and ``"one_hot"`` does not apply; empty
    where it does not. Set before the option."""

    name: str
    plate: str
    distributions: Any
    _takes_index: str = ""

    @property
    def categorical(self) -> str:
        """``"refuse"`` (the default) or ``"one_hot"``: whether a Categorical node is taken, handed out as one-hot
        vectors (see :mod:`storch_relaxed._categorical`)."""
        return self.__dict__.get("_categorical", "refuse")

    @categorical.setter
    def categorical(self, value: str) -> None:
        value = check_categorical(self.name, value)
        if value == "one_hot" and self._takes_index:
            raise OptionError(f"{self.name}: categorical='one_hot' does not apply with {self._takes_index}: a "
                              "Categorical node keeps its index there (leave the option out, or use "
                              "OneHotCategorical for one-hot vectors)")
        object.__setattr__(self, "_categorical", value)
        self._set_distributions()

    def _set_distributions(self) -> None:
        # an instance attribute: Estimator.supports on the instance reads it, the class keeps the default
        taken = bool(self._takes_index) or self.categorical == "one_hot"
        object.__setattr__(self, "distributions", WITH_CATEGORICAL if taken else DEFAULT_DISTRIBUTIONS)

    def _unsupported_message(self, d: Distribution) -> str:
        if isinstance(base_distribution(d), Categorical):
            what = "a Categorical" if isinstance(d, Categorical) else f"an {type(d).__name__} of a Categorical"
            return categorical_message(self.name, self.plate, what)
        return super()._unsupported_message(d)  # type: ignore[misc]


def categorical_message(name: str, plate: str, given: str) -> str:
    """Why estimator ``name`` refuses a Categorical node (``given``: "a Categorical", or its wrapper) by
    default, and what to do instead."""
    return (f"estimator {name!r} does not support {given} by default (plate {plate!r}): its sample is a "
            "one-hot vector of shape (..., K) (a relaxed or straight-through sample has no index form), not the "
            "category index that Categorical's samples are, so code written for Categorical's indices (emb[x], x == k, "
            "arithmetic on x) would compute another cost, silently. Pass OneHotCategorical(logits=...) (or probs=: the "
            "same parameters) and write the model for one-hot vectors (x @ emb instead of emb[x], x[..., k] instead of "
            f"x == k); or, for a model already written for one-hot vectors, pass categorical='one_hot' to {name!r}; or "
            f"choose an estimator that hands out indices: {', '.join(_INDEX_ESTIMATORS)}.")
