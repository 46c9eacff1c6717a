"""storch: automatic differentiation for stochastic computation graphs (Storchastic).

Write the model for one sample, pick an estimator per stochastic node by name, add costs, and
differentiate ``storch.surrogate_loss(order=n)``.
"""

from .errors import (
    AssumptionError,
    CostError,
    NonFiniteCostError,
    NonFiniteParameterError,
    OptionError,
    OrderError,
    OutsideSupportError,
    PlateError,
    PlateIndexError,
    PlateRuntimeError,
    PlateTypeError,
    PluginError,
    UnusedSampleWarning,
    UnusedLastDrawWarning,
    IndependentStepWarning,
    PrecisionWarning,
    ConstantCostWarning,
    UntrackedDrawWarning,
    StorchError,
    UnknownEstimatorError,
    UnsupportedDistributionError,
)
from .plates import Lineage, Plate, PlateTensor, aligned, ancestor_index  # importing storch.plates installs its dispatcher
from .plates.treatments import Entry, Treatment, refuse, register_plate_handler, treatment_of
from .graph.cost_frame import CostFrame, magic_box
from .graph.node import Node
from .graph import Graph, add_cost, current_graph, denote_independent, reset
from .estimators.base import Estimator
from .registry import (
    EstimatorInfo,
    available_estimators,
    estimator,
    get_estimator_class,
    hookimpl,
    hookspec,
    reload_estimators,
)
from .surrogate import backward, cost_estimates, estimate, padding, surrogate_loss
from .runtime.generators import current_generator
from .compiled import CompiledStep, compile
from . import distributed  # noqa: F401  (storch.distributed: estimator state under torch.distributed)
from ._old_paths import install as _install_old_paths

_install_old_paths()
del _install_old_paths

__all__ = [
    "Plate", "Lineage", "PlateTensor", "ancestor_index", "aligned", "Graph", "Node", "Estimator", "CostFrame", "EstimatorInfo",
    "add_cost", "denote_independent", "reset", "current_graph", "surrogate_loss", "backward", "cost_estimates", "estimate", "padding",
    "compile", "CompiledStep",
    "magic_box", "estimator", "available_estimators", "get_estimator_class", "reload_estimators",
    "hookimpl", "hookspec", "StorchError", "PlateError", "PlateRuntimeError",
    "PlateIndexError", "PlateTypeError", "OrderError", "UnknownEstimatorError",
    "UnsupportedDistributionError", "OptionError", "CostError", "NonFiniteCostError", "NonFiniteParameterError", "PluginError",
    "OutsideSupportError", "AssumptionError",
    "UnusedSampleWarning", "UnusedLastDrawWarning", "IndependentStepWarning", "PrecisionWarning", "ConstantCostWarning",
    "UntrackedDrawWarning",
    "register_plate_handler", "refuse", "treatment_of", "Treatment", "Entry",
    "current_generator",
    "distributed",
]
