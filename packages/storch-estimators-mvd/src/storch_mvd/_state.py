"""The per-node record of SPSA and MVD: both compute w and l together in ``proposal``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

__all__ = ["PrecomputedState"]


@dataclass
class PrecomputedState:
    """Filled by ``proposal``; read by ``weighting_function`` and ``gradient_function``.

    Attributes:
        weights: w(x) per entry of the node's plate.
        gradient: l(x) per entry of the node's plate.
    """

    weights: Optional[torch.Tensor] = None
    gradient: Optional[torch.Tensor] = None
