"""The finite check of a replayed call that updates no estimator: its surrogate losses (and what the step
computed from them) refuse a backward pass through a non-finite value, as ``storch.backward()`` does eagerly
(:class:`storch.NonFiniteCostError`). A finite CPU loss gets no hook (the fast path)."""

from __future__ import annotations

from ..conditions.smoothness import _reaches
from ..estimators.messages import PADDED_WITH_MINUS_INF
from ..surrogate.finite import hook_unless_finite
from .refusals import _name


def _losses_among(outs: list, losses: list) -> list[int]:
    """The positions among a traced step's outputs of the surrogate losses it built and of what it computed from
    them (``surrogate_loss() + reg``, ``2 * loss``, ``torch.stack([l1, l2])``, ``loss.reshape(1)``): the outputs
    whose autograd graph reaches one of them (not an input returned as it is, not a metric beside the loss)."""
    if not losses:
        return []
    return [i for i, o in enumerate(outs)
            if o.grad_fn is not None and o.is_floating_point()
            and (any(o is loss for loss in losses) or _reaches([o], losses))]


def _finite_on_backward(outs, checked: tuple, fn) -> None:
    """Check the surrogate losses among ``outs`` of a replayed call whose step updates no estimator (no update
    probe; ``checked``: their positions, :func:`_losses_among`) for being finite when a backward pass reaches them,
    before the pass goes on. ``.backward()`` on the compiled step's loss is what replaces ``storch.backward()``
    there (refused in a traced step), and storch.backward() raises ``NonFiniteCostError`` on a non-finite loss:
    without this check a NaN loss (a Bernoulli's infinite logit under score, arm, disarm, mvd, rebar or relax,
    whose torch log p is NaN there) gave NaN gradients silently. A ``torch.autograd.grad`` of the loss is checked
    too (eagerly only ``storch.backward()`` is), which refuses nothing that would not be NaN.

    On the CPU a finite loss gets no hook (``storch.surrogate.finite.hook_unless_finite``, shared with the eager
    ``surrogate_loss()``; on an accelerator the hook reads the value when a pass reaches it). Only the losses: eagerly
    storch.backward() checks the costs, not what else a step returns (a masked -inf logit returned beside a finite
    loss, whose backward shares the loss's node under a compiler backend, was refused by a first version), and
    never an input returned as it is (a first version hooked a parameter on every call)."""
    for i in checked:
        hook_unless_finite(outs[i], lambda: _message(fn))


def _message(fn) -> str:
    return (f"a result of the compiled step {_name(fn)} that a backward pass reached is not finite (NaN or inf), "
            "so its gradient would be too, as storch.backward() refuses eagerly: the backward pass stopped "
            "before accumulating any gradient. A common cause: a Bernoulli or Binomial "
            "with an infinite logit (a masked or pinned bit) under an estimator that reads torch's log_prob "
            "or its logits (score, arm, disarm, rebar, relax), which is NaN for the value such a bit always "
            "takes: use a large finite logit (±30), give it by probs in float32 (Bernoulli(probs=torch.sigmoid(logits.float()))), "
            "or an estimator that handles infinite logits (expect, sum_and_sample, go; eagerly also "
            f"unordered_set, importance, mvd and spsa). Another: {PADDED_WITH_MINUS_INF}. Run the step eagerly "
            "with storch.backward() to see which cost is not finite, or catch storch.NonFiniteCostError to skip the "
            "batch")
