"""NVIL's learned, input-dependent baseline b_ψ(h) (Mnih & Gregor, 2014), as a score baseline."""

from __future__ import annotations

import re
from typing import Optional

import torch
from torch.distributions import OneHotCategorical

from storch import CostFrame, Node, OptionError, PlateError, PlateTensor, StorchError
from storch.extending import align, base_distribution, is_tracing, options

__all__ = ["LearnedBaseline", "baseline_features"]


def _default_features(node: Node) -> torch.Tensor:
    """The node's distribution parameters (logits, probs, loc, ...), when no inputs were given."""
    d = node.distribution
    base = base_distribution(d)
    base = base._categorical if isinstance(base, OneHotCategorical) else base  # it holds the logits
    for name in ("logits", "probs", "loc", "rate", "concentration"):
        v = base.__dict__.get(name)
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            return v
    raise OptionError(
        f"baseline='learned' on {type(base).__name__}: cannot find a parameter tensor to condition on; pass "
        "the baseline's inputs at the call, est(distribution, inputs=h)")


def baseline_features(node: Node) -> torch.Tensor:
    """h for b_ψ(h): ``node.inputs`` (or the distribution's parameters), shape ``(*parents, F)``.

    Leading dims are the node's parent plates (size 1 where h does not vary along one); the
    per-sample dims are flattened into F. Detached: the baseline never sends gradient into the
    model (⊥b, appendix C), and its regression trains ψ only.
    """
    x, parents = node.inputs, node.parents
    if x is None:
        raw = _default_features(node)  # leading dims: the parent plates
    elif type(x) is PlateTensor:
        if any(p not in parents for p in x.plates):
            raise PlateError(
                f"the learned baseline's inputs have plates {[p.name for p in x.plates]}, not all among the node's "
                f"parent plates {[p.name for p in parents]}")
        raw = align(x.tensor, x.plates, parents)
    elif isinstance(x, torch.Tensor):
        raw = x.reshape((1,) * len(parents) + tuple(x.shape))
    else:
        raise OptionError(f"baseline='learned': inputs must be a tensor or a PlateTensor, got {type(x).__name__}")
    lead = len(parents)
    raw = raw.detach()  # ⊥h: ψ is trained by regression only, the model gets no gradient from b
    raw = raw.reshape(tuple(raw.shape[:lead]) + (-1,))
    return raw if raw.is_floating_point() else raw.to(torch.get_default_dtype())


class LearnedBaseline(torch.nn.Module):
    """b_ψ(h): a one-hidden-layer MLP per cost on the node's inputs h (NVIL's input-dependent baseline).

    Called as ``baseline(node, cost)`` by the score estimator's control variate, it returns one
    number per parent entry, aligned into the cost's frame; it never sees the node's samples, so
    (1 - MagicBox(l)) ⊥b is zero in expectation at every order (appendix C). ``storch.backward()``
    trains ψ by regression on the cost: ``update_parameters`` descends Σ (b_ψ(h) - f)², with f the
    detached cost estimates of the node's :class:`storch.CostFrame` (Mnih & Gregor 2014, Eq. 11).
    The heads are created at the first node (their input width is h's), with a zero output layer,
    so the untrained baseline is 0 (no baseline); a step traced by ``storch.compile`` cannot create
    them (run one step eagerly first, or load a state_dict).

    Args:
        hidden: width of the hidden layer.

    References:
        [1] Neural Variational Inference and Learning in Belief Networks (Mnih & Gregor, 2014)
    """

    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        options.integer("learned baseline", "hidden", hidden, minimum=1)
        self.hidden = hidden
        self.heads = torch.nn.ModuleDict()

    def head(self, name: Optional[str], h: torch.Tensor) -> torch.nn.Module:
        """The network of the cost named ``name``, built on first use with ``h``'s width, dtype and device."""
        key = "cost_" + re.sub(r"\W", "_", name or "")
        if key not in self.heads:
            if is_tracing():  # its parameters' creation would be recorded, and replayed at every call
                raise StorchError(
                    f"storch.compile: score's learned baseline builds its network for cost {name!r} on first use "
                    "(its input width is h's), which a traced step cannot do. Run one step eagerly first (or "
                    "load a state_dict that holds the network), then call the compiled step")
            net = torch.nn.Sequential(torch.nn.Linear(h.shape[-1], self.hidden), torch.nn.Tanh(),
                                      torch.nn.Linear(self.hidden, 1)).to(dtype=h.dtype, device=h.device)
            torch.nn.init.zeros_(net[2].weight)
            torch.nn.init.zeros_(net[2].bias)
            self.heads[key] = net
        return self.heads[key]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # heads saved after they were built load into a fresh (not yet built) baseline: build them first
        for key, weight in state_dict.items():
            m = re.fullmatch(re.escape(prefix) + r"heads\.(\w+)\.0\.weight", key)
            if m and m.group(1) not in self.heads:
                self.heads[m.group(1)] = torch.nn.Sequential(
                    torch.nn.Linear(weight.shape[1], self.hidden), torch.nn.Tanh(),
                    torch.nn.Linear(self.hidden, 1)).to(dtype=weight.dtype, device=weight.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, node: Node, cost: CostFrame) -> torch.Tensor:
        h = baseline_features(node)
        b = self.head(cost.name, h)(h).squeeze(-1)  # (*parents)
        return cost.align(b, node.parents)
