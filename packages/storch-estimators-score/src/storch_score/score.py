"""The score function (REINFORCE) with baselines."""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch

from storch import CostFrame, Estimator, Node, OptionError, PlateTensor

__all__ = ["Score"]

_KINDS = {"none": "none", "moving_average": "moving_average", "leave_one_out": "leave_one_out",
          "batch_average": "leave_one_out"}


class Score(Estimator):
    """Score-function estimator (REINFORCE) with an optional baseline (appendix D.2.1, appendix C).

    Components:
        q(X | x<i) = n i.i.d. samples from p(x | x<i);
        w(x) = 1/n;
        l(x) = log p(x | x<i), summed over the node's own batch dims;
        a(x<i, X) = (1 - MagicBox(l(x))) ⊥b(x<i, X \\ {x}) (the any-order baseline of appendix C),
        b one of: none; the moving average of the cost over earlier steps; the leave-one-out mean
        (1/(n-1)) Σ_{x' ≠ x} f(x'); a user callable.

    On a partition (the estimator called at every step of an episode, docs/partitions.md), l is
    the log-probability of the sequence up to the step a cost was computed at (causal credit), so
    baselines are per time step: leave-one-out and moving averages of the cost-to-go.

    Requires: any distribution with ``sample`` and ``log_prob``.

    max_order: ∞ — the score function is unbiased at any order (D.2.1) and a detached baseline
    that does not depend on x is zero-mean at any order (appendix C).

    Args:
        plate: name of the node's plate.
        n_samples: number of samples with replacement.
        baseline: ``"none"``, ``"moving_average"``, ``"leave_one_out"`` (alias ``"batch_average"``,
            needs ``n_samples >= 2``) or a callable ``baseline(node, cost) -> tensor`` that gets the
            :class:`storch.Node` and the :class:`storch.CostFrame` and returns b in the frame of
            ``cost`` (a tensor broadcastable to ``cost.tensor``, or a PlateTensor whose plates are
            among ``cost.plates``). It must not depend on the sample x it is used for (a
            self-critical or learned baseline); its result is detached.
        decay: the moving average's decay in [0, 1): b <- decay·b + (1 - decay)·mean cost.
        eos: for a partition (the estimator called at every step of a sequence): the index (in the
            support) of the end-of-sequence value; a finished sequence draws it again with
            log-probability 0 at later steps (variable length). ``None``: fixed length.

    Example:
        >>> est = storch.estimator("score", plate="z", n_samples=8, baseline="leave_one_out")
        >>> z = est(torch.distributions.Bernoulli(logits=theta))

    References:
        [1] Simple statistical gradient-following algorithms for connectionist reinforcement
            learning (Williams, 1992)
        [2] Buy 4 REINFORCE samples, get a baseline for free! (Kool et al., 2019)
        [3] Storchastic: A Framework for General Stochastic Automatic Differentiation (van Krieken et al., 2021)
    """

    name = "score"
    aliases = ("reinforce",)
    supports_partitions = True

    def __init__(self, plate: str, n_samples: int = 1,
                 baseline: Union[str, Callable[[Node, CostFrame], torch.Tensor]] = "none",
                 decay: float = 0.9, eos: Optional[int] = None) -> None:
        super().__init__(plate, n_samples)
        if eos is not None and (isinstance(eos, bool) or not isinstance(eos, int) or eos < 0):
            raise OptionError(f"score: eos must be None or the index of the end value in the support, got {eos!r}")
        self.eos = eos
        if callable(baseline) and not isinstance(baseline, str):
            self.baseline_kind, self.baseline_fn = "callable", baseline
        elif isinstance(baseline, str) and baseline in _KINDS:
            self.baseline_kind, self.baseline_fn = _KINDS[baseline], None
        else:
            raise OptionError(
                f"score: baseline={baseline!r} is not accepted; use 'none', 'moving_average', 'leave_one_out' "
                "(alias 'batch_average') or a callable baseline(node, cost)")
        if self.baseline_kind == "leave_one_out" and n_samples < 2:
            raise OptionError(
                f"score: baseline={baseline!r} needs n_samples >= 2 (it averages the other samples' costs), "
                f"got n_samples={n_samples}")
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay < 1.0:
            raise OptionError(f"score: decay must be a float in [0, 1), got {decay!r}")
        self.decay = float(decay)
        self.moving_averages: dict[str, torch.Tensor] = {}  # cost name -> average of earlier steps
        self._pending: dict[str, torch.Tensor] = {}  # this step's mean costs, committed next step

    def proposal(self, node: Node) -> torch.Tensor:
        if self._pending:  # a new step: the previous step's costs enter the moving average now
            self._commit()
        return super().proposal(node)

    def baseline(self, node: Node, cost: CostFrame) -> Optional[torch.Tensor]:
        kind = self.baseline_kind
        if kind == "leave_one_out":
            # b_j = 1/(n-1) Σ_{j' ≠ j} f(x_j') (paper, section 3.2.5); cost.tensor is detached
            t = cost.tensor
            n = node.n
            if t.shape[cost.dim] != n:
                t = t.expand(t.shape[:cost.dim] + (n,) + t.shape[cost.dim + 1:])
            return (cost.sum_plate(t) - t) / (n - 1)
        if kind == "moving_average":
            # the average of EARLIER steps only: this step's cost is recorded and committed at the
            # next step, so b never depends on the current samples (appendix D.2.1, condition on b)
            key = cost.name or ""
            step = cost.plates[cost.dim].step
            if step:  # a cost at step t of a partition: its own average (a per-time-step baseline)
                key = f"{key}@{step}"
            self._pending[key] = cost.tensor.mean()
            return self.moving_averages.get(key)
        if kind == "callable":
            b = self.baseline_fn(node, cost)
            if b is None:
                return None
            if type(b) is PlateTensor:
                if b.dim() != 0:
                    raise OptionError(
                        f"score: the baseline callable returned a PlateTensor with per-sample shape "
                        f"{tuple(b.shape)}; a baseline is one number per sample, like the cost")
                return cost.align(b.tensor, b.plates)
            return torch.as_tensor(b, dtype=cost.tensor.dtype, device=cost.tensor.device)
        return None

    def control_variate_stacks(self) -> bool:
        # leave-one-out reads only the costs along the node's plate; a moving average is per cost
        # name and step, a callable may read anything
        return self.baseline_kind in ("none", "leave_one_out")

    def _commit(self) -> None:
        for key, value in self._pending.items():
            old = self.moving_averages.get(key)
            self.moving_averages[key] = value if old is None else self.decay * old + (1.0 - self.decay) * value
        self._pending = {}

    def extra_repr(self) -> str:
        b = self.baseline_kind if self.baseline_fn is None else repr(self.baseline_fn)
        return f"{super().extra_repr()}, baseline={b}" + (
            f", decay={self.decay}" if self.baseline_kind == "moving_average" else "")

