"""storch-estimators-relaxed: relaxations, learned control variates and antithetic/neighbour estimators.

Registered with storch through the ``storch.estimators`` entry point (this module implements
the ``storch_estimators`` hook); use them by name: ``storch.estimator("rebar", plate="z")``.
"""

from storch import hookimpl

from .arm import Arm
from .disarm import DisArm
from .go import Go
from .gumbel_softmax import GumbelSoftmax
from .gumbel_straight_through import GumbelStraightThrough
from .lax import Lax
from .rebar import Rebar
from .relax import Relax
from .straight_through import StraightThrough

__all__ = ["GumbelSoftmax", "GumbelStraightThrough", "StraightThrough", "Lax", "Relax", "Rebar", "Arm", "DisArm", "Go",
           "storch_estimators"]


@hookimpl
def storch_estimators() -> list[type]:
    """The plugin hook: this family's estimator classes."""
    return [GumbelSoftmax, GumbelStraightThrough, StraightThrough, Lax, Relax, Rebar, Arm, DisArm, Go]
