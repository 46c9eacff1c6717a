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
