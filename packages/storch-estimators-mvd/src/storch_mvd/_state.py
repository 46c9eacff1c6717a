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
        active: mvd only: per decomposition part, its slots' active flags ``(1, K, 2, E, *parents)`` (``None``: all
            are) and its number of entries per replicate K·2·E, in the plate's order; ``padding`` reads them (an
            inactive slot holds a stand-in at weight 0).
    """

    weights: Optional[torch.Tensor] = None
    gradient: Optional[torch.Tensor] = None
    active: Optional[list[tuple[Optional[torch.Tensor], int]]] = None
