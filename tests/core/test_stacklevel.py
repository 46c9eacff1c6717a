"""storch._util.stacklevel: a storch warning points at the user's call, not at a frame inside storch.

The helper lives in storch/_util/; the frames it skips must be the whole storch package (every layer a warning is
issued from: graph/, plates/, estimators/, surrogate/), not only the folder the helper is in.
"""

from __future__ import annotations

import os
import sys
import warnings

import torch

import storch
from storch._util import stacklevel


def test_the_skipped_files_are_the_whole_storch_package_and_torch():
    assert os.path.dirname(os.path.abspath(storch.__file__)) + os.sep in stacklevel._OWN_DIRS
    assert os.path.dirname(os.path.abspath(torch.__file__)) + os.sep in stacklevel._OWN_DIRS


def test_a_warning_from_the_graph_points_at_the_users_add_cost():
    """graph/costs.py warns of a constant cost (storch.ConstantCostWarning) with user_stacklevel(): the warning's
    file is this test file, the caller of storch.add_cost, not storch/graph/costs.py."""
    with storch.Graph(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        storch.add_cost(torch.tensor(1.0), name="constant")
    found = [w for w in caught if issubclass(w.category, storch.ConstantCostWarning)]
    assert len(found) == 1
    assert found[0].filename == __file__, found[0].filename


def test_user_stacklevel_skips_the_frames_of_the_packages_a_family_names():
    """storch.extending.user_stacklevel(pkg) skips pkg's folder too (a family passes its own package, so that its
    warnings point at the user's line; the score family had a private copy of the frame walk for it). Named with
    this test's own module, the walk leaves this folder's frames: the level is above the caller's own (1)."""
    import sys

    from storch.extending import user_stacklevel

    assert user_stacklevel() == 1
    assert user_stacklevel(sys.modules[__name__]) > 1


def test_user_stacklevel_refuses_a_module_without_a_file(tmp_path, monkeypatch):
    """A namespace package (``__file__`` None) was read as the path 'None' in the working directory, so the walk
    skipped every frame under it, the user's own script's included; such a module is refused with what to pass."""
    import importlib
    import sys

    import pytest

    from storch.extending import user_stacklevel

    (tmp_path / "nsfamily").mkdir()  # no __init__.py: a namespace package
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(os.path.dirname(__file__))  # the working directory holds this test's file
    ns = importlib.import_module("nsfamily")
    try:
        assert ns.__file__ is None
        with pytest.raises(TypeError, match=r"namespace package.*sys\.modules\[__name__\]"):
            user_stacklevel(ns)
    finally:
        sys.modules.pop("nsfamily", None)


# -- a warning of storch's issued under a third-party estimator's method ------------------------------------


def _lines(fn) -> dict:
    """The warnings ``fn`` issues, by (file, line) of where they point."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    return {(w.filename, w.lineno): str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)}


def test_a_warning_under_a_third_party_estimators_method_points_at_the_users_call():
    """storch.extending's helpers (warn_untrained_part, skip_nonfinite_update) warn with user_stacklevel(), which skips
    the frames of the estimator's methods and of its family's module: the warnings point at this file's est(...) and
    storch.backward() lines. A fixed stacklevel pointed into storch's own first_steps.py and surrogate/updates.py
    (where storch calls the family) or, one frame less deep, into the family's file."""
    from third_party_family import Lazy

    import inspect
    from torch.distributions import Normal

    est = Lazy("z")
    mu = torch.tensor(0.5, requires_grad=True)
    line = inspect.currentframe().f_lineno

    def step():
        with storch.Graph():
            z = est(Normal(mu, 1.0))  # line + 4
            storch.add_cost(z ** 2)
            storch.backward()  # line + 6

    found = _lines(step)
    assert set(found) == {(__file__, line + 4), (__file__, line + 6)}, found
    assert "its part was built now" in found[(__file__, line + 4)]
    assert "the part's regression loss" in found[(__file__, line + 6)]


def test_user_code_an_estimator_calls_is_where_its_warnings_point():
    """A frame of other code that an estimator's method calls (the user's callback, in this file: not the family's
    module, not an estimator's method) stops the walk: user_stacklevel() there is 1, the callback's own frame."""
    from third_party_family import Lazy

    from storch.extending import user_stacklevel
    from torch.distributions import Normal

    levels = []
    est = Lazy("z", callback=lambda: levels.append(user_stacklevel()))
    with storch.Graph(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est(Normal(torch.tensor(0.5), 1.0))
    assert levels == [1]


def test_a_family_whose_estimator_is_defined_in_its_packages_init(tmp_path, monkeypatch):
    """A family package whose estimator class is in ``__init__.py`` (module name without a dot) and whose helper module
    warns: the family is the package's folder, not ``__init__.py`` alone (which pointed the warning into the helper)."""
    import inspect
    from torch.distributions import Normal

    pkg = tmp_path / "initfamily"
    pkg.mkdir()
    (pkg / "_helper.py").write_text(
        "from storch.extending import warn_untrained_part\n\n\ndef built_lazily(est):\n"
        "    warn_untrained_part(est, 'x', 'its part', 'est.parameters()', 'part=')\n")
    (pkg / "__init__.py").write_text(
        "import storch\nfrom ._helper import built_lazily\n\n\nclass Lazy(storch.Estimator):\n"
        "    name = 'test_init_family_lazy'\n    max_order = 1\n    requires_rsample = True\n\n"
        "    def __init__(self, plate):\n        super().__init__(plate, 2)\n        self.update = False\n\n"
        "    def proposal(self, node):\n        built_lazily(self)\n        return node.distribution.rsample((2,))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        from initfamily import Lazy

        est, mu = Lazy("z"), torch.tensor(0.5, requires_grad=True)
        line = inspect.currentframe().f_lineno

        def step():
            with storch.Graph():
                storch.add_cost(est(Normal(mu, 1.0)) ** 2)  # line + 4
                storch.reset()

        assert set(_lines(step)) == {(__file__, line + 4)}
    finally:
        sys.modules.pop("initfamily", None)
        sys.modules.pop("initfamily._helper", None)


def test_the_walk_keeps_no_locals_of_a_users_method_alive():
    """The walk reads ``f_locals`` only of estimator methods' frames: reading it of a user's method on the stack (a
    training loop ``Trainer.fit(self)``) left a snapshot of its locals on the frame (Python < 3.13), which kept that
    iteration's objects alive after the loop rebound them."""
    import gc
    import weakref

    from third_party_family import Lazy
    from torch.distributions import Normal

    class Batch:
        pass

    class Trainer:
        def fit(self) -> bool:
            batch = Batch()
            alive = weakref.ref(batch)
            with warnings.catch_warnings(record=True):
                warnings.simplefilter("always")
                with storch.Graph():
                    storch.add_cost(Lazy("z")(Normal(torch.tensor(0.5, requires_grad=True), 1.0)) ** 2)
                    storch.reset()
            batch = None  # noqa: F841 (the next iteration's)
            gc.collect()
            return alive() is None

    assert Trainer().fit()
