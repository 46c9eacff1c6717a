"""storch-estimators-mvd: SPSA and measure-valued derivatives for storch.

This module is the plugin: the ``storch.estimators`` entry point ``mvd`` names it, and it
answers the ``storch_estimators()`` hook.
"""

from storch import hookimpl

from .mvd import Mvd
from .spsa import Spsa

__all__ = ["Mvd", "Spsa", "storch_estimators"]


@hookimpl
def storch_estimators() -> list[type]:
    """The plugin hook: this family's estimator classes (``spsa``, ``mvd``)."""
    return [Spsa, Mvd]
