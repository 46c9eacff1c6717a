"""storch: automatic differentiation for stochastic computation graphs (Storchastic).

Write the model for one sample, pick an estimator per stochastic node by name, add costs, and
differentiate ``storch.surrogate_loss(order=n)``.
"""

from ._errors import (
    CostError,
    OptionError,
    OrderError,
    PlateError,
    PluginError,
    StorchError,
    UnknownEstimatorError,
    UnsupportedDistributionError,
)
from ._estimator import CostFrame, Estimator, magic_box
from ._graph import Graph, Node, add_cost, current_graph, denote_independent, reset
from ._plates import Lineage, Plate, PlateTensor
from . import _plate_ops  # noqa: F401  (torch functions on plate tensors)
from ._registry import (
    EstimatorInfo,
    available_estimators,
    estimator,
    get_estimator_class,
    hookimpl,
    hookspec,
    reload_estimators,
)
from ._surrogate import backward, surrogate_loss

__all__ = [
    "Plate", "Lineage", "PlateTensor", "Graph", "Node", "Estimator", "CostFrame", "EstimatorInfo",
    "add_cost", "denote_independent", "reset", "current_graph", "surrogate_loss", "backward",
    "magic_box", "estimator", "available_estimators", "get_estimator_class", "reload_estimators",
    "hookimpl", "hookspec", "StorchError", "PlateError", "OrderError", "UnknownEstimatorError",
    "UnsupportedDistributionError", "OptionError", "CostError", "PluginError",
]
