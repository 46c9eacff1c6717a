"""A third-party estimator family in one module outside storch (for tests/core/test_stacklevel.py): its methods
reach storch.extending's warning helpers through a helper function and a helper module of its own, as
storch_score's learned baseline and storch_relaxed's network do."""

from __future__ import annotations

from typing import Callable, Optional

import torch

import storch
from storch.extending import skip_nonfinite_update, warn_untrained_part


def _built_lazily(est: storch.Estimator) -> None:
    # the family's helper between its method and storch's helper: a fixed stacklevel pointed here
    warn_untrained_part(est, f"{est.name} (plate {est.plate!r})", "its part", "est.parameters()", "part=")


class _Part(torch.nn.Module):
    """A learned part (not an estimator) whose own method reaches storch's helper."""

    def update(self, owner: storch.Estimator) -> None:
        skip_nonfinite_update(owner, torch.tensor(False), "the part", "regression", "check the costs")


class Lazy(storch.Estimator):
    """Pathwise samples; builds a part lazily in its proposal and skips every update (a non-finite loss).
    ``callback``: the user's code, called from the proposal."""

    name = "test_third_party_lazy"
    max_order = 1
    requires_rsample = True
    has_update = True

    def __init__(self, plate: str, n_samples: int = 2, callback: Optional[Callable[[], None]] = None) -> None:
        super().__init__(plate, n_samples)
        self.update = False
        self.callback = callback
        self.part = _Part()

    def proposal(self, node):
        _built_lazily(self)
        if self.callback is not None:
            self.callback()
        return node.distribution.rsample((self.n_samples,))

    def update_parameters(self, nodes, loss) -> None:
        self.part.update(self)
