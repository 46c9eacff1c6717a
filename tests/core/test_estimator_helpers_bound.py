"""The helper modules of storch.estimators that compare a subclass's methods with the base class's read the class
as a module global which ``storch/estimators/base.py`` binds in them once it is defined (they cannot import it:
the ``estimators-layers`` contract). A helper left out of that binding keeps its placeholder ``None`` and fails
only when its path runs ("'NoneType' object has no attribute 'output'"), so the binding is checked here."""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys

import storch
import storch.estimators


def _helpers() -> list[str]:
    return [f"storch.estimators.{m.name}" for m in pkgutil.iter_modules(storch.estimators.__path__)]


def test_every_helper_that_reads_the_base_class_has_it_bound():
    readers = []
    for name in _helpers():
        module = importlib.import_module(name)
        if "Estimator" in vars(module):
            assert module.Estimator is storch.Estimator, f"{name}.Estimator is {module.Estimator!r}"
            readers.append(name.rpartition(".")[2])
    assert {"capabilities", "construction", "first_steps", "partition_paths", "partition_steps"} <= set(readers)


def test_a_helper_imported_first_is_bound():
    # importing a helper imports the storch package first, whose __init__ defines the class and binds it
    code = ("import storch.estimators.partition_steps as p, storch.estimators.first_steps as n, storch; "
            "assert p.Estimator is n.Estimator is storch.Estimator, (p.Estimator, n.Estimator)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
