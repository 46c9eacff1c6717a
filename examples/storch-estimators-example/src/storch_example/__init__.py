"""storch-estimators-example: a third-party storch estimator package (the Gumbel-Rao estimator).

Installed next to ``storch-core``, its estimators are found by name through the
``storch.estimators`` entry point, which names this module; the module implements the
``storch_estimators()`` hook:

    >>> est = storch.estimator("gumbel_rao", plate="z", temperature=0.5, n_gumbels=10)
"""

from storch import hookimpl

from .gumbel_rao import GumbelRao

__all__ = ["GumbelRao", "storch_estimators"]


@hookimpl
def storch_estimators() -> list:
    """The estimator classes this package provides."""
    return [GumbelRao]
