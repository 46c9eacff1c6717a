"""The bundled data set: scikit-learn's ``load_digits`` (1797 images of 8x8), binarised."""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["load_binary_digits"]


def load_binary_digits(n_valid: int = 360, split_seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Binarised digits (pixel > 8 of 16 -> 1) as float tensors ``(train, valid)`` of 64 columns.

    The train/validation split is fixed (a permutation with ``split_seed``), whatever the
    experiment seed, so runs with different seeds see the same data.
    """
    from sklearn.datasets import load_digits

    images = load_digits().data  # (1797, 64), values 0..16
    binary = (images > 8).astype(np.float32)
    order = np.random.RandomState(split_seed).permutation(len(binary))
    binary = binary[order]
    x = torch.from_numpy(binary)
    return x[n_valid:].contiguous(), x[:n_valid].contiguous()
