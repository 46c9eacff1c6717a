"""The checks of a partition's later step (paper, section 3.2): its draw (a raw tensor of the step distribution's
shape), ``eos=`` on a step of another support than the first step's (refused), and a step independent of the
earlier ones that lacks their plates (warned: two branches of a model sharing one estimator). Called by the general
step (:func:`storch.estimators.partition_steps._extend_partition`; the plain step checks the draw only)."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

from torch.distributions import Bernoulli, Categorical, Distribution, OneHotCategorical

from ..distributions.support import _STRICT
from .._util.stacklevel import user_stacklevel
from ..errors import IndependentStepWarning, OptionError, StorchError, UnsupportedDistributionError
from ..graph.node import Node
from ..plates.tensor import Plate, PlateTensor
from .messages import _plate_tensor_draw_message, _sample_shape_message

if TYPE_CHECKING:
    from .base import Estimator


_STRICT_BASES = {strict: base for base, strict in _STRICT.items()}  # storch's strict copies -> the user's class


def _eos_support(d: Distribution) -> tuple:
    """What ``eos=`` reads of a step's distribution: its class (the user's: a saturated Bernoulli that
    storch.extending.strict_support copied is still a Bernoulli), event shape and number of values (of a
    Categorical / OneHotCategorical read from its parameters: enumerating a OneHotCategorical's support builds
    eye(K), K x K per step; review r-eighteen)."""
    kind = _STRICT_BASES.get(type(d), type(d))
    if isinstance(d, Categorical):
        n = d._num_events
    elif isinstance(d, OneHotCategorical):
        n = d._categorical._num_events
    elif isinstance(d, Bernoulli):
        n = 2
    else:
        n = d.enumerate_support(expand=False).shape[0] if d.has_enumerate_support else None
    return kind, tuple(d.event_shape), n


def _describe_support(d: Distribution) -> str:
    kind, event, n = _eos_support(d)
    values = "no finite support" if n is None else f"{n} values"
    return f"{kind.__name__} ({values}, event shape {event})"


def _check_eos_step(est: Estimator, node: Node, raw: Distribution, t: int) -> None:
    """Refuse step t of a partition with ``eos=`` whose distribution has another support than its first
    step's (another class, event shape or number of values): eos applies to every step, so such a step
    (an environment transition drawn by the policy's estimator) would be forced to the value at index
    ``eos`` once a sequence ended, even where it has probability 0, and drawing that value would end the
    sequence (found by porting an RL loop with a stopping action). A step with the same support cannot
    be told apart from a token of the sequence (docs/partitions.md, 'Variable length: eos=')."""
    first = node.distribution
    if _eos_support(raw) == _eos_support(first):
        return
    name = est.name or type(est).__qualname__
    raise OptionError(
        f"estimator {name!r} (plate {est.plate!r}) has eos={est.eos}, and step {t} of its partition draws from "
        f"{_describe_support(raw)}, its first step from {_describe_support(first)}. eos= ends the whole "
        f"sequence: once an entry drew the value at index {est.eos}, EVERY later step of the partition draws "
        f"that value again with log-probability 0, whatever its distribution, and any step that draws it ends "
        "the sequence. A step of another kind, such as an environment transition drawn by the policy's estimator "
        "(docs/partitions.md, 'Stochastic environments and options', option 2), would be forced to that value "
        "(even where it has probability 0) and would end episodes. With eos=, draw environment transitions with "
        "plain torch, s = Categorical(probs=P[s, a]).sample() (option 1), or by an estimator created anew per "
        "segment (option 3); or leave out eos= and mask the costs of finished episodes yourself "
        "(docs/partitions.md, 'Variable length: eos=')")


def _check_step_sample(est: "Estimator", sample: Any, raw: Any, distribution: Any, t: int) -> None:
    """A partition step's draw: a raw tensor (not a plate tensor) with the step distribution's own shape after the
    leading plate dim."""
    if type(sample) is PlateTensor:
        raise UnsupportedDistributionError(_plate_tensor_draw_message(est, distribution, f"extend (step {t})"))
    # (raw's first dim: the partition's plate at step t-1; every torch Distribution sets these two in __init__)
    own = raw._batch_shape[1:] + raw._event_shape
    if sample.shape[1:len(own) + 1] != own:
        raise StorchError(_sample_shape_message(est, "extend", sample.shape, own, t))



def _warn_independent_step(est: Estimator, node: Node, own: tuple[Plate, ...], step: int) -> None:
    """Warn (once per partition) when step ``step`` of ``node``'s partition draws from a distribution that
    carries none of the partition's plates (it depends on no earlier step's sample) and lacks parent plates
    the partition already has (it is drawn for every entry of them): the signature of two independent
    branches of a model sharing one estimator (found by porting M2: the labelled z, drawn after the
    unlabelled one by the same estimator, got the unlabelled data's and the labels' plates, 12x the work).
    A sequence whose steps do not depend on each other but share their plates (i.i.d. pulls of a bandit,
    a gate per block, actions given one option) lacks none and is not reported. One pass over plates."""
    q = est.plate
    names = set()
    for o in own:
        if o.name == q:  # (any step of the partition): the step depends on an earlier one
            return
        names.add(o.name)
    missing = [p for p in node.parents if p.name not in names]
    size = 1
    for p in missing:
        size *= p.size
    if size <= 1:
        return
    node.branch_warned = True
    have = ", ".join(repr(o.name) for o in own) or "none"
    extra = ", ".join(f"{p.name!r} (size {p.size})" for p in missing)
    warnings.warn(IndependentStepWarning(
        f"estimator {est.name or type(est).__qualname__!r} (plate {q!r}) is called again in this graph (step {step} "
        "of its partition: calling one estimator several times in a graph makes its calls ONE partition, a "
        f"sequence), but this call's distribution depends on no earlier call (its plates: {have}; none is {q!r}) "
        f"and lacks the plates {extra} of the earlier calls: it is drawn for every entry of them, {size}x the "
        "samples it needs (gradients stay unbiased). If the calls are independent branches of your model (e.g. "
        "the labelled and the unlabelled data of a semi-supervised VAE), create one estimator per branch, "
        f"storch.estimator(...) for each, with plates of their own (plate='{q}_a', plate='{q}_b'). If a sequence is "
        "meant, silence this with warnings.filterwarnings('ignore', category=storch.IndependentStepWarning) "
        "(docs/partitions.md)"), stacklevel=user_stacklevel())
