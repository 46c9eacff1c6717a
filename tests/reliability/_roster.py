"""Every first-party estimator with a distribution it supports and a differentiable cost (shared by
the device, dtype and CUDA tests)."""

from __future__ import annotations

import torch
from torch.distributions import Bernoulli, Normal, OneHotCategorical

import storch

# name -> (kind of latent, options)
ROSTER = {
    "expect": ("bernoulli", {}),
    "reparameterization": ("normal", {"n_samples": 2}),
    "score": ("bernoulli", {"n_samples": 3, "baseline": "leave_one_out"}),
    "importance": ("bernoulli", {"n_samples": 2}),
    "sum_and_sample": ("categorical", {"n_samples": 2}),
    "unordered_set": ("categorical", {"n_samples": 2}),
    "gumbel_softmax": ("categorical", {"n_samples": 2}),
    "gumbel_straight_through": ("categorical", {"n_samples": 2}),
    "straight_through": ("categorical", {"n_samples": 2}),
    "lax": ("normal", {}),
    "relax": ("bernoulli", {"n_samples": 2}),
    "rebar": ("bernoulli", {"n_samples": 2}),
    "arm": ("bernoulli", {}),
    "disarm": ("bernoulli", {}),
    "go": ("bernoulli", {}),
    "spsa": ("normal", {"n_samples": 2}),
    "mvd": ("normal", {}),
}


def installed() -> list[str]:
    names = storch.available_estimators()
    return [n for n in ROSTER if n in names]


def options(name: str) -> dict:
    opts = dict(ROSTER[name][1])
    if name == "importance":
        opts["proposal"] = lambda p: Bernoulli(probs=torch.full_like(p.probs, 0.5), validate_args=False)
    return opts


def distribution(name: str, theta: torch.Tensor):
    """q for one data point from parameters ``theta`` (shape (3,) or a plate tensor of it)."""
    kind = ROSTER[name][0]
    v = None if theta.device.type != "meta" else False  # argument validation reads values
    if kind == "bernoulli":
        return Bernoulli(logits=theta, validate_args=v)
    if kind == "normal":
        return Normal(theta, torch.ones_like(theta), validate_args=v)
    if v is None:
        return OneHotCategorical(logits=theta)
    # OneHotCategorical builds its Categorical with the default validation: switch it off around it
    previous = torch.distributions.Distribution._validate_args
    torch.distributions.Distribution.set_default_validate_args(False)
    try:
        return OneHotCategorical(logits=theta)
    finally:
        torch.distributions.Distribution.set_default_validate_args(previous)


def cost(name: str, z: torch.Tensor) -> torch.Tensor:
    return ((z - 0.45) ** 2).sum()
