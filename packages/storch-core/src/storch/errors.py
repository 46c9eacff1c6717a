"""Exceptions raised by storch. Every user-facing error is one of these, with a message
that says what was wrong and how to fix it."""

from __future__ import annotations

from typing import Optional

__all__ = [
    "StorchError",
    "PlateError",
    "PlateRuntimeError",
    "PlateIndexError",
    "PlateTypeError",
    "OrderError",
    "UnknownEstimatorError",
    "UnsupportedDistributionError",
    "OptionError",
    "CostError",
    "NonFiniteCostError",
    "NonFiniteParameterError",
    "PluginError",
    "OutsideSupportError",
    "AssumptionError",
    "UnusedSampleWarning",
    "UnusedLastDrawWarning",
    "IndependentStepWarning",
    "PrecisionWarning",
    "ConstantCostWarning",
    "UntrackedDrawWarning",
    "plate_error_from",
]


class StorchError(Exception):
    """Base class of all storch errors."""


class UnusedSampleWarning(UserWarning):
    """A stochastic node whose gradient function carries gradient is upstream of no cost: its
    distribution's parameters get no gradient from it (see ``storch.surrogate_loss``); or a partition's
    last draws reach no cost (docs/partitions.md, "Causal credit")."""


class UnusedLastDrawWarning(UnusedSampleWarning):
    """A partition's last draw, and only that one, reaches no cost: no cost carries its plate at the last step.

    Its own class because a loop that draws the next action at the end of its body (SARSA-style) leaves exactly
    this draw unused, which is harmless (it is in no cost's gradient function), so that a user whose loop does so
    can silence it alone: ``warnings.filterwarnings("ignore", category=storch.UnusedLastDrawWarning)`` keeps every
    other :class:`UnusedSampleWarning` (a node upstream of no cost, several last steps unreached). storch cannot
    tell that loop from the harmful one that warns the same way: a loop left in Python right after the draw that
    ended it, whose decision then gets no credit (docs/partitions.md, "Causal credit")."""


class IndependentStepWarning(UserWarning):
    """A later call of one estimator in a graph (a step of its partition) draws from a distribution that
    depends on none of the partition's earlier steps and lacks plates the partition already has, so the
    step is drawn for every entry of them: the signature of two independent branches of a model sharing
    one estimator (labelled and unlabelled data), which need one estimator each (docs/partitions.md).
    Gradients stay unbiased; the step's compute is multiplied by the sizes of those plates."""


class PrecisionWarning(UserWarning):
    """A pathwise estimator (``reparameterization``, a plugin with ``requires_rsample``) draws a Beta,
    Kumaraswamy or Dirichlet whose concentration puts mass closer to 0 or 1 than the dtype resolves: its
    gradient is exact for a cost that stays bounded there (E[x]), but biased (Beta, Dirichlet) or infinite at
    random steps (Kumaraswamy's draws of exactly 0 or 1) for a cost that reads log(1 - x) or log x (a
    Beta-Bernoulli likelihood, a sampled KL). Given once per estimator; storch cannot see the cost
    (docs/reliability.md, "Float precision of the samples")."""


class ConstantCostWarning(UserWarning):
    """A cost that carries no sample plate and needs no gradient was added while gradients are enabled: it
    contributes nothing to any gradient. Harmless for a term that is constant by construction (the entropy of a
    Normal of fixed scale, a frozen module's weight decay); a reward computed per sample outside torch and then
    reduced (``r.sum()``) or put on a data plate gets no credit at all: wrap it back on the sample's plates,
    ``storch.PlateTensor(r, z.plates)`` (docs/plates.md, "A cost computed outside torch")."""


class UntrackedDrawWarning(UserWarning):
    """A plain draw (``dist.sample()``, ``torch.multinomial``, ``torch.bernoulli``, ...) on plate tensors from a
    distribution whose parameters require grad: the draw carries no gradient to them and no estimator sees it,
    so its score-function term is missing and the gradient of the expected cost is biased. Make the draw a storch
    node (``storch.estimator("score", plate="y")(dist)``) for an unbiased gradient, or sample from detached
    parameters (``Categorical(logits=logits.detach()).sample()``) where no gradient through the draw is wanted
    (an environment's transition, scheduled sampling's token): that gives no warning (docs/partitions.md)."""


class PlateError(StorchError, ValueError):
    """An operation would mix plate (sample or data) dimensions, or a plate name is reused."""


class OrderError(StorchError, ValueError):
    """An estimator in the graph is not unbiased to the requested derivative order."""


class UnknownEstimatorError(StorchError, LookupError):
    """No installed plugin provides an estimator of the requested name."""


class UnsupportedDistributionError(StorchError, TypeError):
    """An estimator was applied to a distribution it does not support."""


class OptionError(StorchError, ValueError):
    """An estimator option has an invalid value."""


class CostError(StorchError, ValueError):
    """A cost passed to ``storch.add_cost`` cannot be used (for example, it has an event shape)."""


class NonFiniteCostError(CostError, FloatingPointError):
    """``storch.backward()`` met a NaN or infinite cost (or surrogate): nothing was backpropagated,
    no estimator state changed, and the step was discarded."""


class NonFiniteParameterError(StorchError, ValueError):
    """The distribution given to an estimator has NaN or infinite parameters (found after sampling failed)."""


class PluginError(StorchError, RuntimeError):
    """A plugin is malformed or two plugins claim the same estimator name."""


class OutsideSupportError(StorchError, ValueError):
    """``node.log_prob`` of values outside the distribution's support (torch's argument validation; an estimator
    scoring an evaluation-only entry such as a Bernoulli's mean), re-raised naming the estimator and what to do;
    still a ValueError, so that code that tells such values apart by it keeps working."""


class PlateRuntimeError(PlateError, RuntimeError):
    """A torch RuntimeError inside a plate call (``torch.topk(z, k)`` with ``k`` larger than a sample's dim),
    re-raised in per-sample terms: a :class:`PlateError` that still is a RuntimeError, so that code catching
    torch's error keeps working."""


class PlateIndexError(PlateError, IndexError):
    """A torch IndexError inside a plate call, re-raised in per-sample terms (still an IndexError)."""


class PlateTypeError(PlateError, TypeError):
    """A TypeError inside a plate call, re-raised in per-sample terms (still a TypeError, so that
    Python's reflected operators keep working)."""


def plate_error_from(exc: BaseException, message: str) -> PlateError:
    """A PlateError with ``message`` that is also an instance of ``exc``'s kind."""
    for base, cls in ((IndexError, PlateIndexError), (TypeError, PlateTypeError), (RuntimeError, PlateRuntimeError)):
        if isinstance(exc, base):
            return cls(message)
    return PlateError(message)


class AssumptionError(StorchError, RuntimeError):
    """A check a step traced by ``storch.compile`` makes at every call (``storch.extending.assume``: a proposal
    that puts no mass on values p can draw, non-finite log-probabilities) failed: torch raised it as a
    RuntimeError (``torch._assert_async``); re-raised with the check's message as a StorchError that still is a
    RuntimeError, so that code catching torch's error keeps working."""


# the messages storch.extending.assume was given (what storch.compile re-raises as AssumptionError)
ASSUMPTIONS: set = set()


def assumption_failed(exc: BaseException) -> Optional[StorchError]:
    """The StorchError for torch's RuntimeError of a failed ``storch.extending.assume``, or ``None``."""
    if isinstance(exc, RuntimeError) and not isinstance(exc, StorchError):
        text = str(exc)
        for message in ASSUMPTIONS:
            if message in text:
                return AssumptionError(message)
    return None
