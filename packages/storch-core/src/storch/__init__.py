"""storch: automatic differentiation for stochastic computation graphs (Storchastic).

Write the model for one sample, pick an estimator per stochastic node by name, add costs, and
differentiate ``storch.surrogate_loss(order=n)``.
"""

from ._errors import (
    CostError,
    NonFiniteCostError,
    NonFiniteParameterError,
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
from ._treatments import Treatment, refuse, register_plate_handler, treatment_of
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
from ._compile import CompiledStep, compile
from ._random import current_generator
from . import distributed  # noqa: F401  (storch.distributed: estimator state under torch.distributed)

__all__ = [
    "Plate", "Lineage", "PlateTensor", "Graph", "Node", "Estimator", "CostFrame", "EstimatorInfo",
    "add_cost", "denote_independent", "reset", "current_graph", "surrogate_loss", "backward",
    "compile", "CompiledStep",
    "magic_box", "estimator", "available_estimators", "get_estimator_class", "reload_estimators",
    "hookimpl", "hookspec", "StorchError", "PlateError", "OrderError", "UnknownEstimatorError",
    "UnsupportedDistributionError", "OptionError", "CostError", "NonFiniteCostError", "NonFiniteParameterError", "PluginError",
    "register_plate_handler", "refuse", "treatment_of", "Treatment",
    "current_generator",
    "distributed",
]
