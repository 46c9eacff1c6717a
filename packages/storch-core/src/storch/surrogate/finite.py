"""A non-finite loss is refused before anything is backpropagated or any estimator state changes
(:class:`storch.NonFiniteCostError`, naming the costs or the estimators whose values are not finite)."""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from ..conditions.order_guard import unbatched
from ..distributions.parameters import parameters
from ..distributions.precision import exact_draws_hint, precision_checked
from ..errors import NonFiniteCostError
from ..estimators.base import Estimator
from ..estimators.messages import PAD_WITH_FINITE
from ..graph import Graph
from ..plates.tensor import align, raw_of


def _check_finite(loss: torch.Tensor, graph: Graph) -> None:
    """Raise NonFiniteCostError naming the non-finite costs (one check of the total; the costs only if it fails)."""
    if loss.is_meta or math.isfinite(loss.item()):  # item(): ~0.2 us, torch.isfinite ~4 us; not .device (~5 us)
        return
    raise NonFiniteCostError(_message(list(graph.costs), list(graph.nodes)))


_AFTER = ("nothing was backpropagated, estimator state (moving averages, learned control variates) is "
          "unchanged and the step is discarded. ")


def _message(costs: list, nodes: list, after: str = _AFTER) -> str:
    """Why a surrogate loss is not finite: the costs that are not, or else the estimators of the graph."""
    bad = [name for name, cost in costs if _holds(raw_of(cost), lambda t: ~torch.isfinite(t))]
    exact = _exact_draws(nodes)
    if exact:  # (a Kumaraswamy's draw of exactly 1: log p and a cost's log(1 - x) are infinite; the cause, not a guess)
        what = f"cost {', '.join(repr(b) for b in bad)} is" if bad else "the surrogate loss is"
        return f"{what} not finite (NaN or inf): {exact} {after}Catch storch.NonFiniteCostError to skip the batch"
    if bad:
        ended = _ended_sequences(costs, bad, nodes)  # the likelier cause where it applies: said first
        return (f"cost {', '.join(repr(b) for b in bad)} is not finite (NaN or inf), so its gradient would be too: "
                f"{after}{ended}{'Otherwise, find' if ended else 'Find'} where the non-finite value comes from (e.g. "
                "log(0), NaN parameters, a diverging learning rate), or catch storch.NonFiniteCostError to skip the "
                "batch" + _some_entries(costs, bad))
    culprits = _nonfinite_components(nodes)
    if culprits:
        return (f"the surrogate loss is not finite although every cost is: {'; '.join(culprits)}. "
                f"{after}Check the component named (e.g. a baseline that divides by n_samples - 1 at n_samples=1: "
                "check options in check_option, which est.<option> = v on a constructed estimator goes through), "
                "or catch storch.NonFiniteCostError to skip the batch")
    names = sorted({f"{n.estimator.name!r} (plate {n.plate.name!r})" for n in nodes})
    return (f"the surrogate loss is not finite although every cost is: the weights or gradient-function values of "
            f"an estimator are (estimators in this graph: {', '.join(names) or 'none'}; e.g. log p(x) = -inf, or "
            f"diverged parameters; a tanh-squashed distribution whose sample saturated at ±1, where "
            f"TanhTransform's inverse is infinite: use TanhTransform(cache_size=1) so log_prob reuses the "
            f"pre-tanh sample){_infinite_logits_hint(nodes)}{_infinite_parameters_hint(nodes)}: {after}Catch "
            "storch.NonFiniteCostError to skip the batch")


def _exact_draws(nodes: list) -> str:
    """For :func:`_message` (error path only): the nodes whose Beta, Kumaraswamy or Dirichlet drew 0 or 1 exactly
    (torch's Kumaraswamy sampler does for (eps/4)^concentration0 of its draws, and for ~6e-8 of any float32 draws),
    where log p(x) and a cost's log(1 - x) are infinite: what storch.distributions.precision says of them."""
    found = []
    for n in nodes:
        checked = precision_checked(n.distribution)
        if checked is None or checked[0] != "unit" or n.sample is None:
            continue
        d, sample = checked[1], _outside(raw_of(n.sample).detach())
        hint = None if sample is None else _quietly(lambda d=d, sample=sample: exact_draws_hint(d, sample))
        if isinstance(hint, str):
            found.append(f"estimator {n.estimator.name or type(n.estimator).__qualname__!r} (plate "
                         f"{n.plate.name!r}): {hint}.")
    return " ".join(found)


def _some_entries(costs: list, bad: list) -> str:
    """For :func:`_message` (error path only): where a non-finite cost is so in some of its entries only (a
    black-box reward of an invalid decode), how many, and the finite penalty to put there."""
    counts = []
    for name, cost in costs:
        plain = _outside(raw_of(cost).detach()) if name in bad else None
        if plain is not None and plain.dim() > 0:
            k = int((~torch.isfinite(plain)).sum())
            if 0 < k < plain.numel():
                counts.append(f"{name!r}: {k} of {plain.numel()} entries")
    if not counts:
        return ""
    return (f". Only some entries are ({'; '.join(counts)}): for a value computed outside torch (a black-box "
            "reward that is NaN for an invalid decode or a failed simulation), give those entries a finite penalty "
            "before adding the cost, c = torch.where(torch.isfinite(c), c, penalty) (a finite number worse than any "
            "valid cost); in torch, remove the NaN at its source (torch.where's gradient through a NaN branch is NaN "
            "too)")


def _ended_sequences(costs: list, bad: list, nodes: list) -> str:
    """For :func:`_message` (error path only): the partitions with ``eos=`` whose ended sequences hold non-finite
    entries of the costs ``bad``. After eos the estimator draws eos with log-probability 0, but a cost that user
    code computes from its own distribution there (a per-token KL penalty to a reference model, log p(token)) reads
    log p(eos) of the distribution the user built: -inf where eos is masked out (top-k truncation, a mask), so the
    cost is inf in exactly those entries. Said only where some non-finite entry is in an ended sequence (a NaN in
    live ones has another cause); a cost whose plates do not hold the partition's last step is not matched."""
    found = []
    for n in nodes:
        finished = n.finished if isinstance(n.finished, torch.Tensor) else None
        finished = None if finished is None else _outside(finished.detach())
        if finished is None or not bool(finished.any()):
            continue
        hit = total = 0
        for name, cost in costs:
            raw = _outside(raw_of(cost).detach()) if name in bad else None
            plates = tuple(getattr(cost, "plates", ()))
            if raw is None or raw.dim() < len(plates):
                continue
            nonfinite = ~torch.isfinite(raw)
            if raw.dim() > len(plates):
                nonfinite = nonfinite.flatten(len(plates)).any(-1)  # per entry of the cost's plates
            ended = _quietly(lambda: align(finished, (n.plate,) + n.parents, plates).bool())
            if not isinstance(ended, torch.Tensor):  # (the cost does not carry the partition's last step: not matched)
                continue
            hit += int((nonfinite & ended).sum())
            total += int(nonfinite.sum())
        if hit:
            found.append(f"non-finite cost entries ({hit} of {total}) are in ended sequences of the partition with "
                         f"eos= on plate {n.plate.name!r} ({int(finished.sum())} of {finished.numel()} sequences have "
                         "ended)")
    if not found:
        return ""
    return ("; ".join(found) + ": after eos the estimator draws eos with log-probability 0, but your own "
            "distribution's log_prob there is log p(eos), -inf where eos is masked out (top-k, a mask). If the cost "
            "reads it (a per-token KL penalty), compute it for live sequences only: live = live & (token != eos) after "
            "each step, c = torch.where(live, c, 0). ")


def _nonfinite_components(nodes: list) -> list[str]:
    """For :func:`_message` (error path only): the baselines and control variates whose values are not finite, as
    ``"NaN or inf in the baseline (`baseline`) for cost <c> of estimator <name> (plate <p>)"``, recomputed for each
    cost frame the surrogate built (their values are not kept), where the node's weights and gradient-function
    values are finite (those the general message covers, with its hints). A component that raises when
    recomputed is skipped."""
    found = []
    for n in nodes:
        est = n.estimator
        if not n.frames or any(isinstance(v, torch.Tensor) and _holds(raw_of(v), lambda t: ~torch.isfinite(t))
                               for v in (_quietly(lambda: n.weight_values), _quietly(lambda: n.gradient_values))):
            continue
        base = type(est).control_variate is Estimator.control_variate
        what = "baseline (`baseline`)" if base else "control variate (`control_variate`)"
        for frame in list(n.frames.values()):
            value = _quietly(lambda: est.baseline(n, frame) if base else est.control_variate(n, frame))
            if isinstance(value, torch.Tensor) and _holds(raw_of(value), lambda t: ~torch.isfinite(t)):
                found.append(f"NaN or inf in the {what} for cost {frame.name!r} of estimator "
                             f"{(est.name or type(est).__qualname__)!r} (plate {n.plate.name!r})")
    return found


def _quietly(get: Callable[[], object]) -> object:
    try:
        return get()
    except Exception:  # (a component that cannot be recomputed here: not named)
        return None


_ON_BACKWARD = ("the backward pass stopped at the surrogate loss, before accumulating any gradient of it, and "
                "estimator state is unchanged. ")


def refuse_on_backward(loss: torch.Tensor, graph: Graph) -> None:
    """Make a backward pass that reaches ``surrogate_loss()``'s ``loss`` raise NonFiniteCostError when ``loss``
    is not finite, as ``storch.backward()`` does (eagerly ``surrogate_loss().backward()`` of a step whose
    estimators have no update backpropagated a NaN loss silently: NaN gradients; with an update, the update's
    probe refused ``.backward()`` only). ``torch.autograd.grad`` of the loss is refused too: its gradients
    would be NaN. Under ``torch.func.vmap`` the loss's batched values are checked (the tensor under the batching,
    which the autograd outside vmap differentiates: ``vmap(step)(params).sum().backward()`` of an ensemble with a NaN
    member is refused, as that member's step would be eagerly); skipped under ``torch.func.grad`` and the other
    differentiating transforms, which differentiate the loss themselves."""
    if not _is_wrapped(loss) and loss.is_cpu:  # the common case, in a few C calls (a 0-dim loss, read here)
        if loss.is_meta or math.isfinite(loss.item()):
            return
    else:
        loss = _outside(loss)
        if loss is None:
            return
    if loss.is_cpu:  # the message is made now, only for a non-finite loss: from the graph as it is
        hook_unless_finite(loss, lambda: _message(list(graph.costs), list(graph.nodes), _ON_BACKWARD))
        return
    costs, nodes = list(graph.costs), list(graph.nodes)  # (made when a pass reaches the loss: the graph may be reset)
    hook_unless_finite(loss, lambda: _message(costs, nodes, _ON_BACKWARD))


def hook_unless_finite(t: torch.Tensor, message: Callable[[], str]) -> None:
    """A hook on ``t``'s autograd node that raises NonFiniteCostError(``message()``) when a backward pass reaches
    it, if ``t`` is not finite (for :func:`refuse_on_backward` and ``storch.compile``'s replays).

    On the CPU the value is read now (``item()``, well under a microsecond) and only a non-finite ``t`` gets the
    hook (the message is made now): a Python hook on the node costs ~5 us a step (measured: ~10% of a replayed
    toy step). On an accelerator reading the value now would wait for it, so the hook reads it when a pass
    reaches it, as ``storch.backward()`` reads it then. The hook holds a detached alias of ``t`` (a weak
    reference missed ``(step(x) + reg).backward()`` of a compiled step: the temporary output was freed before
    the pass; found by review). Nothing on the meta device or without an autograd node."""
    node = t.grad_fn
    if node is None or t.is_meta:
        return
    if t.is_cpu:
        if _finite(t):
            return
        text = message()

        def refuse(_grad) -> None:
            raise NonFiniteCostError(text)
        node.register_prehook(refuse)
        return
    value = t.detach()

    def check(_grad) -> None:
        if not _finite(value):
            raise NonFiniteCostError(message())
    node.register_prehook(check)


def _finite(t: torch.Tensor) -> bool:
    return math.isfinite(t.item()) if t.dim() == 0 else bool(torch.isfinite(t.detach()).all())


def _holds(t: torch.Tensor, test: Callable[[torch.Tensor], torch.Tensor]) -> bool:
    """Whether ``test`` holds for an entry of ``t`` (for the messages: under vmap, of the values it batches)."""
    plain = _outside(t.detach())
    return plain is not None and bool(test(plain).any())


_is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor


def _outside(t: torch.Tensor) -> Optional[torch.Tensor]:
    """The tensor a backward pass outside torch.func's transforms reaches for ``t``: ``t`` itself, or under
    ``vmap`` the plain tensor it batches (whose autograd node is the vmapped result's: its values can be read,
    where ``item()`` of the batched one raises); None under a differentiating transform (``grad``, ``jvp``,
    ``vjp``: it differentiates ``t`` itself, not a backward pass of the user's)."""
    t = unbatched(t)
    return None if _is_wrapped(t) else t


def _user_base(n) -> torch.distributions.Distribution:
    """Node ``n``'s distribution as the user built it, under its ``Independent`` and ``TransformedDistribution``
    wrappers (the one that holds the parameters: logits, scores), for the hints below."""
    d = n.original if n.original is not None else n.distribution
    while isinstance(d, (torch.distributions.Independent, torch.distributions.TransformedDistribution)):
        d = d.base_dist
    return d


def _infinite_logits_hint(nodes: list) -> str:
    """For :func:`_check_finite`'s message (error path only): the nodes whose Bernoulli / Binomial has infinite
    logits, where torch's log_prob is NaN (inf - inf) for the value the bit always takes."""
    found = []
    for n in nodes:
        d = _user_base(n)
        logits = d.__dict__.get("logits") if isinstance(d, (torch.distributions.Bernoulli,
                                                            torch.distributions.Binomial)) else None
        if isinstance(logits, torch.Tensor) and _holds(raw_of(logits), torch.isinf):
            found.append(f"{n.estimator.name!r} (plate {n.plate.name!r}, a {type(d).__name__})")
    if not found:
        return ""
    return (f". Infinite logits (a masked or certain bit) at {', '.join(found)}, "
            "where torch's log_prob is NaN (inf - inf) for the value the bit always takes, and the formulas of "
            "the relaxed estimators (arm, disarm, rebar, relax, lax, gumbel_softmax: the logistic density and "
            "σ(z / λ) at an infinite logit) are NaN too: use a large finite logit (±30) for a masked bit, give the "
            "distribution by probs, in float32 or wider (Bernoulli(probs=torch.sigmoid(logits.float())): torch "
            "clamps a probability of 0 or 1 to the dtype's eps, so log p is finite and a pinned bit gets no "
            "gradient, and score trains; in bfloat16 that eps, 2^-7, would zero the gradient of any logit above "
            "~4.8), or an estimator that "
            f"handles infinite logits ({', '.join(INFINITE_LOGITS_ESTIMATORS)})")


def _infinite_parameters_hint(nodes: list) -> str:
    """For :func:`_check_finite`'s message (error path only): the nodes whose gradient-function values or weights hold
    a NaN and whose distribution has an infinite parameter (Bernoulli and Binomial aside: :func:`_infinite_logits_hint`). A
    class of your own padded with -inf, as logits are masked (Plackett-Luce scores of a shorter ranking), computes
    -inf - -inf = NaN in its log_prob (tests/models/test_plackett_luce_ranking.py). A distribution whose parameters
    hold a NaN is named for that instead (a diverged model, or -inf - -inf already computed in its constructor): its
    -inf entries may be a Categorical's masked logits, which are fine (review r-53: only the padding advice was given
    for a diverged, masked Categorical)."""
    found, nan = [], []
    for n in nodes:
        d = _user_base(n)
        if isinstance(d, (torch.distributions.Bernoulli, torch.distributions.Binomial)):
            continue
        values = (_quietly(lambda n=n: n.gradient_values), _quietly(lambda n=n: n.weight_values))
        if not any(isinstance(v, torch.Tensor) and _holds(raw_of(v), torch.isnan) for v in values):
            continue
        params = _quietly(lambda d=d: parameters(d))
        tensors = {k: raw_of(v) for k, v in (params if isinstance(params, dict) else {}).items()
                   if isinstance(v, torch.Tensor)}
        where = f"{n.estimator.name!r} (plate {n.plate.name!r}, a {type(d).__name__}: "
        nans = [k for k, v in tensors.items() if _holds(v, torch.isnan)]
        names = [k for k, v in tensors.items() if _holds(v, torch.isinf)]
        if nans:
            nan.append(f"{where}{', '.join(nans)})")
        elif names:
            found.append(f"{where}{', '.join(names)})")
    text = ""
    if nan:
        text += (f". NaN parameters at {', '.join(nan)}: the model's outputs diverged or its inputs hold NaN, or a "
                 "parameter was computed from -inf entries (-inf - -inf: a Categorical normalizes logits that are -inf "
                 "in a whole row to NaN; keep one entry finite, or pad with a very low finite value); torch's argument "
                 "validation, on by default, refuses them where the distribution is built")
    if found:
        text += (f". Infinite parameters at {', '.join(found)}, whose log-probabilities are NaN: a log_prob that "
                 f"meets -inf - -inf (entries padded or masked with -inf, as logits are masked) is NaN there. "
                 f"{PAD_WITH_FINITE}")
    return text


#: the estimators that take a Bernoulli / Binomial with infinite logits (a pinned bit: log p = 0 on the value it
#: always takes, and no derivative), each tested so (tests/relaxed and tests/mvd): named by the NonFiniteCostError
#: of a graph whose surrogate loss such a bit made NaN. score reads torch's log_prob (NaN there); detecting the
#: pinned bits costs a host read per node and step (~4 us on the toy step), so it is not done: the message points to
#: Bernoulli(probs=...) instead (tests/score/test_score_errors.py)
INFINITE_LOGITS_ESTIMATORS = ("expect", "unordered_set", "sum_and_sample", "importance", "mvd", "spsa", "go")
