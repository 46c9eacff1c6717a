"""Module paths a user's doc names keep working after a module moved into a layer folder.

docs/reliability.md named ``storch.generators.RANDOM_FUNCTIONS``; the module is now ``storch.runtime.generators``.
The old path is the same module object (``storch._old_paths``), so a patch through it patches what storch reads.
"""

from __future__ import annotations

import importlib

import storch
import storch.runtime.generators as generators


def test_storch_generators_is_the_moved_module():
    assert importlib.import_module("storch.generators") is generators
    assert storch.generators is generators
    from storch.generators import RANDOM_FUNCTIONS

    assert RANDOM_FUNCTIONS is generators.RANDOM_FUNCTIONS and RANDOM_FUNCTIONS


def test_the_older_private_path_follows_it():
    assert importlib.import_module("storch._random") is generators


# the top-level modules this release moved into layer folders -> where they are now
MOVED = {"node": "graph.node", "cost": "graph.cost_frame", "options": "estimators.validators", "eager": "runtime.eager",
         "score_conditions": "conditions.score", "smoothness": "conditions.smoothness",
         "_order_guard": "conditions.order_guard", "_ranks": "distributed.ranks",
         "_own_optimizer": "estimators.own_optimizer", "_state_record": "estimators.state_record",
         "_stacklevel": "_util.stacklevel", "_qualname": "_util.qualname", "_flatten": "_util.flatten",
         "_table_cache": "_util.table_cache"}


def test_the_modules_moved_into_layer_folders_keep_their_old_paths():
    """A plugin's ``from storch.node import Node`` or ``storch.score_conditions`` (no underscore before the move)
    raised ModuleNotFoundError; each old path is the moved module itself."""
    for old, new in MOVED.items():
        assert importlib.import_module(f"storch.{old}") is importlib.import_module(f"storch.{new}"), old
    from storch.cost import CostFrame, magic_box
    from storch.node import Node

    assert Node is storch.Node and CostFrame is storch.CostFrame and magic_box is storch.magic_box
