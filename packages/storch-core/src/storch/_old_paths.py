"""The private module paths of storch <= 0.x (``storch._plates``, ...), kept for one release.

Tests and third-party plugins import them today. Each old path is an alias of the module that
replaced it (the same module object, so ``monkeypatch.setattr(storch._registry, ...)`` still
patches the registry). They will be removed in the next release: import public names from
``storch``, ``storch.extending`` or ``storch.testing`` instead.
"""

from __future__ import annotations

import importlib
import sys

__all__ = ["OLD_PATHS", "install"]

# old private module -> the module that holds its contents now
OLD_PATHS = {
    "_errors": "errors",
    "_random": "runtime.generators",
    # public in docs/reliability.md before the move (storch.generators.RANDOM_FUNCTIONS), now under runtime/
    "generators": "runtime.generators",
    "_plates": "plates.tensor",
    "_treatments": "plates.treatments",
    "_treatments_doc": "plates.table_doc",
    "_plate_ops": "plates.dispatch",
    "_plate_meta": "plates.rules.metadata",
    "_plate_shape_ops": "plates.rules.shape",
    "_plate_index": "plates.rules.indexing",
    "_plate_losses": "plates.rules.losses",
    "_plate_batch": "plates.rules.batch_first",
    "_plate_vmap": "plates.rules.vmap",
    "_distributions": "distributions",
    "_graph": "graph",
    "_estimator": "estimators.base",
    "_surrogate": "surrogate",
    "_registry": "registry",
    # moved from the top level into the layer folders in this release: node.py, cost.py, options.py,
    # eager.py, score_conditions.py and smoothness.py had no underscore, so a plugin may import them
    # (from storch.node import Node, storch.score_conditions.KINK_FREE)
    "node": "graph.node",
    "cost": "graph.cost_frame",
    "options": "estimators.validators",
    "eager": "runtime.eager",
    "score_conditions": "conditions.score",
    "smoothness": "conditions.smoothness",
    "_order_guard": "conditions.order_guard",
    "_ranks": "distributed.ranks",
    "_own_optimizer": "estimators.own_optimizer",
    "_state_record": "estimators.state_record",
    "_stacklevel": "_util.stacklevel",
    "_qualname": "_util.qualname",
    "_flatten": "_util.flatten",
    "_table_cache": "_util.table_cache",
}


def install() -> None:
    """Make ``storch.<old>`` an alias of its new module (in ``sys.modules`` and as an attribute)."""
    package = sys.modules[__name__.rpartition(".")[0]]
    for old, new in OLD_PATHS.items():
        module = importlib.import_module(f"{package.__name__}.{new}")
        sys.modules.setdefault(f"{package.__name__}.{old}", module)
        setattr(package, old, module)
