"""storch's built-in estimators, registered through the ``storch.estimators`` entry point like any plugin."""

from ..hookspecs import hookimpl
from .expect import Expect
from .reparameterization import Reparameterization

__all__ = ["Expect", "Reparameterization", "storch_estimators"]


@hookimpl
def storch_estimators() -> list[type]:
    """The plugin hook: the built-in estimator classes (``expect``, ``reparameterization``)."""
    return [Expect, Reparameterization]
