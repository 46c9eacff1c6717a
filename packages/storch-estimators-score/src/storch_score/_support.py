"""Shared helpers of the score family: the finite joint support of a node, stable log-sum-exp."""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch.distributions import Bernoulli, Categorical, OneHotCategorical

from storch import Estimator, Node, UnsupportedDistributionError
from storch.extending import base_distribution, varying_total_count

__all__ = ["OneHotRows", "check_one_support", "dense", "enumerate_joint", "enumerate_values", "masked_logsumexp", "n_categories",
           "support_log_probs", "support_table", "to_work"]

REDUCED = (torch.float16, torch.bfloat16)


def check_one_support(est: Estimator, d: torch.distributions.Distribution) -> None:
    """Refuse a ``Binomial`` whose ``total_count`` differs between entries in an estimator that samples
    torch's ``enumerate_support`` without replacement (``unordered_set``, ``sum_and_sample``): torch's
    ``enumerate_support`` raised its own ``NotImplementedError`` deep in the proposal
    (:func:`storch.extending.varying_total_count` says why, and what to use instead; ``Estimator.supports``
    asks the estimators' ``check_distribution``, so that the registry's lists agree)."""
    reason = varying_total_count(d)
    if reason is not None:
        raise UnsupportedDistributionError(
            f"estimator {est.name!r} (plate {est.plate!r}) does not support {type(base_distribution(d)).__name__} "
            f"{reason}")


def to_work(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32 if it is float16 / bfloat16, else ``x`` itself (no cast, no autograd node).

    The set estimators sum and log-sum-exp log-probabilities, and their backward passes sum gradients
    over the plate (a weight p(x ∉ M) / m broadcast to m samples gets Σ_j f(x_j) ≈ m · f, 256 x 400 >
    65504): in float16 those overflow to inf, and LogsumexpBackward turned inf into NaN (inf x 0 at the
    masked entries). The components compute in float32 and cast their outputs back to the model's dtype,
    so the backward sums run in float32 (as ``storch.extending.leave_one_out`` sums costs).
    """
    return x.float() if x.dtype in REDUCED else x


def enumerate_joint(node: Node, budget: int, who: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Every joint value of the node's own batch dims and its log-probability per parent entry.

    Returns:
        ``(values, logp)``: ``values`` has shape ``(M, *own_batch, *event)`` (M = K^n joint values),
        ``logp`` has shape ``(M, *parents)`` and carries gradient.
    """
    return enumerate_values(node.distribution, len(node.parents), budget, who, node.estimator.plate)


def enumerate_values(d, n_plates: int, budget: int, who: str, plate: str) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`enumerate_joint` for a raw distribution whose first ``n_plates`` batch dims are plates.

    A OneHotCategorical's values are a :class:`OneHotRows` (indexed as the tensor would be)."""
    single = support_table(d)  # (K, *event)
    k = single.shape[0]
    event = tuple(d.event_shape)
    own = tuple(d.batch_shape[n_plates:])
    n = math.prod(own)
    if not own and type(d) in (Categorical, OneHotCategorical):
        # one variable per entry: log p of every value is the normalised logits (support_log_probs), and the
        # values are arange(K) or the rows of eye(K), never built: nothing is listed beyond the K logits, so
        # no budget applies (a 32000-token vocabulary was refused at the default budget of 4096)
        return single, support_log_probs(d, single)
    if k ** n > budget:
        raise UnsupportedDistributionError(
            f"{who}: the node on plate {plate!r} has {k}^{n} = {k ** n} joint values, more than "
            f"budget={budget}; raise `budget`, split the node into several nodes, or use 'score'"
        )
    idx = _joint_index(k, n, single.device)
    values = single[idx].reshape((k ** n,) + own + event)
    if type(d) in (Categorical, OneHotCategorical):
        # log p of joint value m is the sum over the own variables j of the normalised logit of its value
        # idx[m, j]: gathered from the logits, (M, *plates, n); log_prob of the expanded joint values would
        # broadcast each against all K logits, (M, *batch, K) in the backward pass
        logits = (d if type(d) is Categorical else d._categorical).logits
        flat = logits.reshape(tuple(logits.shape[:n_plates]) + (n, k))
        picked = flat[..., torch.arange(n, device=idx.device), idx]  # (*plates, M, n)
        return values, picked.sum(-1).movedim(-1, 0)
    full = values.reshape((k ** n,) + (1,) * n_plates + own + event)
    lp = d.log_prob(full.expand((k ** n,) + tuple(d.batch_shape) + event))
    m = len(own)
    logp = lp.sum(tuple(range(-m, 0))) if m else lp  # summed over the own batch dims
    return values, logp


def support_table(d):
    """The values of one variable of ``d``, ``(K, *event)``: ``enumerate_support(expand=False)`` without its
    batch dims. A OneHotCategorical's, the rows of ``eye(K)``, as a :class:`OneHotRows` that is never built:
    its K x K table was the largest tensor of a step (5000 categories: 100 MB, 10x a Categorical's time)."""
    if type(d) is OneHotCategorical:
        return OneHotRows(d._categorical.logits.shape[-1], d._param.dtype, d._param.device)
    support = d.enumerate_support(expand=False)  # (K, 1, ..., 1, *event)
    return support.reshape((support.shape[0],) + tuple(d.event_shape))


class OneHotRows:
    """The support of a OneHotCategorical with K categories, the rows of ``eye(K)``, without building it:
    ``rows[idx]`` is the one-hot rows of the indices ``idx`` (``F.one_hot``, the dtype of torch's
    ``enumerate_support``), O(K) per row handed out instead of the K x K table."""

    def __init__(self, k: int, dtype: torch.dtype, device: torch.device):
        self.k, self.dtype, self.device = k, dtype, device
        self.shape = torch.Size((k, k))

    def __getitem__(self, idx: torch.Tensor) -> torch.Tensor:
        return F.one_hot(idx, self.k).to(self.dtype)

    def reshape(self, shape) -> OneHotRows:
        if tuple(shape) != (self.k, self.k):
            raise ValueError(f"OneHotRows of {self.k} categories reshaped to {tuple(shape)}")
        return self

    def dense(self) -> torch.Tensor:
        """The K x K table (``enumerate_support(expand=False)``), for the rare paths that compare values."""
        return torch.eye(self.k, dtype=self.dtype, device=self.device)


def dense(values) -> torch.Tensor:
    """The values of :func:`enumerate_values` or :func:`support_table` as a tensor (a :class:`OneHotRows`
    built: for the rare paths that compare values, memory= and eos=)."""
    return values.dense() if type(values) is OneHotRows else values


def n_categories(d) -> int:
    """The number of values of one variable of ``d`` (the first dim of ``enumerate_support``), without
    listing them where it is known: a Categorical's or OneHotCategorical's K from its logits, a Bernoulli's 2."""
    if type(d) in (Categorical, OneHotCategorical):
        return (d if type(d) is Categorical else d._categorical).logits.shape[-1]
    if type(d) is Bernoulli:
        return 2
    return d.enumerate_support(expand=False).shape[0]


def support_log_probs(d, support) -> torch.Tensor:
    """log p of every value of every variable of ``d``: ``(K, *batch)``, with gradient.

    ``support`` is :func:`support_table` of ``d`` (or ``d.enumerate_support(expand=False)``). For a
    Categorical or OneHotCategorical the normalised logits are those values (what ``log_prob`` reads),
    O(K · batch); ``log_prob`` of the expanded support broadcasts each value against all K logits,
    (K, *batch, K), and its backward materialises that (400 GB for 5000 categories on 2000 data points).
    """
    if type(d) in (Categorical, OneHotCategorical):
        cat = d if type(d) is Categorical else d._categorical
        return cat.logits.movedim(-1, 0)
    event = tuple(d.event_shape)
    k = support.shape[0]
    full = support.reshape((k,) + (1,) * len(d.batch_shape) + event)
    return d.log_prob(full.expand((k,) + tuple(d.batch_shape) + event))


_JOINT_INDEX: dict = {}


def _joint_index(k: int, n: int, device: torch.device) -> torch.Tensor:
    """(k^n, n): every joint value of n variables with k values each, row-major; made once per device."""
    key = (k, n, device)
    idx = _JOINT_INDEX.get(key)
    if idx is None:
        with torch.inference_mode(False):  # normal tensors, also when first made under inference mode (see table_cache)
            idx = torch.tensor(list(itertools.product(range(k), repeat=n)), dtype=torch.long).reshape(k ** n, n)
            idx = idx.to(device)
            if torch._C._functorch.maybe_current_level() is None and len(_JOINT_INDEX) < 256:  # (see table_cache)
                _JOINT_INDEX[key] = idx
    return idx


def masked_logsumexp(x: torch.Tensor, mask: torch.Tensor, dim: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """log Σ exp(x) over the entries where ``mask`` is False, without NaN gradients.

    Returns:
        ``(lse, empty)``: ``lse`` is -inf where every entry is masked (``empty``), with zero gradient there.
        ``lse`` is float32 for a float16 / bfloat16 ``x`` (:func:`to_work`; the caller casts back): a
        log-sum-exp and its gradient in float16 overflowed (a NaN gradient).
    """
    x = to_work(x)
    empty = mask.all(dim)
    masked = x.masked_fill(mask, -math.inf)
    # a row with every entry masked would give NaN gradients in logsumexp: use a dummy row there
    safe = torch.where(empty.unsqueeze(dim), torch.zeros_like(x), masked)
    lse = torch.logsumexp(safe, dim)
    return torch.where(empty, torch.full_like(lse, -math.inf), lse), empty
