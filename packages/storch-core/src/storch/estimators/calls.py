"""The estimator call (``Estimator.__call__``): whether it may take the lean path (no module hooks), the arguments
it refuses (a positional argument taken for ``inputs``, Pyro's ``obs=``), a call during a backward pass, and what
it says when torch cannot draw (non-finite parameters; vmap, jacfwd and torch.autograd.functional's randomness)."""

from __future__ import annotations

import inspect
import sys
import weakref
from typing import TYPE_CHECKING, Any, Optional

import torch

from ..errors import NonFiniteParameterError, OptionError, StorchError
from .messages import PAD_WITH_FINITE, _minus_inf_only, _nonfinite_parameters, _under_jacfwd

if TYPE_CHECKING:
    from .base import Estimator


# what makes torch.func.jacfwd of a step draw: its columns (one per input direction) share the draw, so it computes
# the Jacobian of one estimate, equal to torch.autograd.functional.jacobian's on the same draws; randomness='different'
# (a draw per column) fails for samplers that fill a new tensor in place (Normal's rsample)
_JACFWD = ("torch.func.jacfwd(f, randomness='same') (its columns then differentiate one draw: the Jacobian of one "
           "estimate, as torch.autograd.functional.jacobian(f, x) computes it)")


# which randomness of torch.func.vmap runs an estimator's draw (tests/core/test_vmap_randomness.py, docs/plates.md's
# table): it depends on torch's sampler, not on storch. A sampler that takes the distribution's parameters
# (torch.bernoulli, multinomial, torch.normal(loc, scale), _standard_gamma) draws per member, and "same" has no draw
# for parameters that differ per member; one that fills torch.empty(shape) in place (normal_, uniform_, cauchy_,
# exponential_) draws once for every member, so only "same" runs it (review of round 12); torch.rand(shape) (Uniform,
# Gumbel) runs under both; Beta and Dirichlet's autograd.Function under neither
_VMAP_RANDOMNESS = (
    "randomness='different' (each vmapped member draws its own samples: unbiased, independent per-member results, e.g. "
    "torch.func.vmap(torch.func.grad(step), randomness='different')) for a draw by a sampler that takes the "
    "distribution's parameters (sample() of Bernoulli, Categorical, Normal, LogNormal, sample() and rsample() of "
    "Gamma), which randomness='same' runs only where the members' parameters are equal; a sampler that fills a new "
    "tensor in place (rsample() of Normal and LogNormal, sample() and rsample() of Laplace, Cauchy, Exponential, "
    "MultivariateNormal) runs only with randomness='same' (the members share the noise: each member's result "
    "unbiased, the members' correlated); Uniform and Gumbel (torch.rand) run with either ('same': shared noise); Beta "
    "and Dirichlet with neither (torch samples them through an autograd.Function torch.func cannot run)")


def _vmap_draw_message(est: Estimator, distribution: Any, randomness: str, why: str, use: str, e: Exception) -> str:
    """What an estimator says when torch cannot draw from ``distribution`` inside
    ``torch.func.vmap(randomness=randomness)``: ``why`` (torch's sampler), ``use`` (the other randomness), and the
    two ways around vmap."""
    return (f"estimator {est.name!r} (plate {est.plate!r}) cannot draw from {type(distribution).__name__} inside "
            f"torch.func.vmap(randomness={randomness!r}){':' if randomness == 'different' else ''} {why}. Use {use}, "
            "or give the members a plate instead of vmap (storch.denote_independent(x, dim, 'data'): one independent "
            "draw per data point, vectorised), or run the members in a Python loop "
            f"(torch said: {str(e)[:200]})")


_graph_task_id = torch._C._current_graph_task_id


def _in_backward_message(est: "Estimator") -> str:
    return (
        f"estimator {est.name or type(est).__qualname__!r} (plate {est.plate!r}) was called during a backward pass. "
        "torch.utils.checkpoint.checkpoint(..., use_reentrant=False) runs the checkpointed function again during "
        "backward to recompute what it saved, and an estimator called there would sample anew: a new node or "
        "partition step whose samples are not the ones the costs were computed from. Checkpoint the networks, not "
        "the sampling: checkpoint the module that computes the distribution's parameters "
        "(`logits = checkpoint(enc, x, use_reentrant=False)`) and call the estimator outside the checkpointed "
        "function (the same holds for an estimator called from a tensor hook or a custom Function's backward)")


_module = sys.modules[torch.nn.Module.__module__]  # torch.nn.modules.module: the global module hooks it keeps
_get_tracing_state = torch._C._get_tracing_state


# per estimator class: (whether its forward takes a positional argument after the distribution, the keywords it
# takes, or None for any): read by _check_call_arguments, on the calls that pass more than inputs=
_CALL_SIGNATURES: "weakref.WeakKeyDictionary[type, tuple[bool, Optional[frozenset]]]" = weakref.WeakKeyDictionary()


def _call_signature(cls: type) -> tuple[bool, Optional[frozenset]]:
    """What ``cls``'s ``forward`` takes after the distribution: positional arguments (a first parameter not named
    ``inputs``, or ``*args``: a user's forward that reads them itself), and its keywords (``None``: ``**kwargs``)."""
    known = _CALL_SIGNATURES.get(cls)
    if known is None:
        after_self = list(inspect.signature(cls.forward).parameters.values())[1:]
        # (after the distribution; a forward(self, *args, **kwargs) wrapper takes the distribution in *args)
        params = after_self if after_self and after_self[0].kind is inspect.Parameter.VAR_POSITIONAL else after_self[1:]
        positional = any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params) or bool(params) and (
            params[0].kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
            and params[0].name != "inputs")
        keywords = None if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params) else frozenset(
            p.name for p in params if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                 inspect.Parameter.KEYWORD_ONLY))
        known = _CALL_SIGNATURES[cls] = (positional, keywords)
    return known


def _check_call_arguments(est: Estimator, args: tuple, kwargs: dict) -> None:
    """Refuse a positional argument after the distribution (``est(d, x)``: taken for ``inputs``, which only an
    input-dependent baseline or network reads, so an observed value meant as Pyro's ``obs=``, or a stored action
    meant for a policy-gradient update, would be silently ignored and the node sampled) and a keyword the
    estimator's ``forward`` does not take (``obs=``, ``value=``)."""
    if "forward" in est.__dict__:  # a forward set on the instance reads its own arguments (review r-25)
        return
    positional, keywords = _call_signature(type(est))
    unknown = [] if keywords is None else [k for k in kwargs if k not in keywords]
    if (not args or positional) and not unknown:
        return
    what = (f"{len(args)} positional argument{'s' if len(args) > 1 else ''} after the distribution" if args and not
            positional else "keyword" + ("s " if len(unknown) > 1 else " ") + ", ".join(f"{k}=" for k in unknown))
    takes = ", ".join(f"{k}=" for k in sorted(keywords)) if keywords is not None else ""
    inputs = ("Extra inputs that the estimator's components read as node.inputs (a learned or callable baseline's "
              "features, NVIL's x; relax's network) go as a keyword: est(d, inputs=x). " if keywords is None or
              "inputs" in keywords else "")
    raise OptionError(
        f"estimator {est.name or type(est).__qualname__!r} (plate {est.plate!r}) was called with {what}; it takes "
        f"the distribution{' and the keyword ' + takes if takes else ''} only. {inputs}An OBSERVED value (Pyro's "
        "pyro.sample(..., obs=x)) is not an estimator call: nothing is sampled for it, its log-likelihood is a "
        "cost: storch.add_cost(-d.log_prob(x_obs), name='likelihood') (docs/coming-from-pyro.md). Nor is a STORED "
        "action (drawn earlier, by an older or another policy: PPO's epochs on one rollout, a replay buffer): nothing "
        "is drawn for it now either. Keep it with its behaviour log-probability log_q as plain tensors, put them on a "
        "data plate (storch.denote_independent) and write the ratio exp(d.log_prob(a) - log_q) into the cost "
        "(docs/tutorials/policy-gradients.md, 'PPO on an MDP: a stored rollout and minibatches')")


def _no_module_hooks(est: Estimator) -> bool:
    """Whether ``nn.Module.__call__`` would call the class's ``forward`` directly (its own fast path): no
    ``forward`` set on the instance, the estimator is not compiled (``est.compile()``; torch >= 2.2), torch.jit is not tracing,
    and neither the estimator nor any module globally has forward or backward hooks (``register_forward_hook``,
    ``register_module_forward_hook``, ...). Otherwise the call goes through ``nn.Module.__call__``, which runs
    them."""
    return not ("forward" in est.__dict__ or getattr(est, "_compiled_call_impl", None) is not None or est._forward_hooks
                or est._forward_pre_hooks or est._backward_hooks or est._backward_pre_hooks
                or _module._global_forward_hooks
                or _module._global_forward_pre_hooks or _module._global_backward_hooks
                or _module._global_backward_pre_hooks or _get_tracing_state())


def _call_failed(est: Estimator, distribution: Any, e: BaseException) -> None:
    """Raise storch's explanation of the error ``e`` of an estimator call where there is one (the caller re-raises
    ``e`` otherwise): torch's own errors of a draw say neither why nor what to do."""
    bad = _nonfinite_parameters(distribution) if isinstance(e, Exception) and not isinstance(
        e, StorchError) else None
    if bad and _minus_inf_only(distribution, bad):  # deliberate padding, not a divergence
        raise NonFiniteParameterError(
            f"estimator {est.name!r} (plate {est.plate!r}) could not sample: the distribution's "
            f"{', '.join(repr(b) for b in bad)} hold -inf and no NaN, as entries padded or masked with -inf "
            "(as logits are masked) do: a log_prob or sampler that meets -inf - -inf computes "
            f"NaN there, which this draw cannot take. {PAD_WITH_FINITE}. ({type(e).__name__}: {e})") from e
    if bad:  # torch's own error (e.g. "Expected p_in >= 0 && p_in <= 1") does not say why
        raise NonFiniteParameterError(
            f"estimator {est.name!r} (plate {est.plate!r}) could not sample: the distribution's "
            f"{', '.join(repr(b) for b in bad)} hold NaN or infinite values (the model's outputs diverged, "
            "or its inputs hold NaN); keep torch's argument validation on to catch it where the "
            f"distribution is built. ({type(e).__name__}: {e})") from e
    if isinstance(e, RuntimeError) and "randomness error mode" in str(e):
        # torch's default randomness="error" refuses any random draw under vmap: the cause is the mode
        # (the estimator's draws), not storch reading its samples
        # (torch.autograd.functional's forward mode runs torch's older vmap: the branch below)
        if _under_jacfwd():
            # jacfwd's columns are one function's derivatives: they share its draw (randomness='different'
            # fails for samplers that fill a new tensor in place, Normal's rsample: review r-35)
            raise StorchError(
                f"estimator {est.name!r} (plate {est.plate!r}) draws random samples inside torch.func.jacfwd "
                "/ torch.func.hessian (jacfwd's columns are a vmap), whose default randomness='error' refuses "
                f"any random draw. For first derivatives use {_JACFWD}; torch.func.hessian takes no randomness "
                "option: for second derivatives use torch.func.jacrev(torch.func.jacrev(f)) or "
                "torch.autograd.functional.hessian(f, x) "
                f"(torch said: {str(e)[:200]})") from e
        raise StorchError(
            f"estimator {est.name!r} (plate {est.plate!r}) draws random samples inside torch.func.vmap, "
            f"whose default randomness='error' refuses any random draw. Pass {_VMAP_RANDOMNESS}; for first "
            f"derivatives in forward mode, {_JACFWD}; for second derivatives use "
            "torch.func.jacrev(torch.func.jacrev(f)) or torch.autograd.functional.hessian(f, x) "
            f"(torch said: {str(e)[:200]})") from e
    if isinstance(e, RuntimeError) and "different inplace randomness on an unbatched tensor" in str(e):
        # the draw itself: torch's rsample of some distributions (Normal, Laplace, ...) fills a new tensor
        # of the sample's shape in place (normal_, uniform_), which vmap(randomness="different") cannot
        # make different per member; nothing of storch reads a sample here
        raise StorchError(_vmap_draw_message(
            est, distribution, "different", "torch's sampler for it fills a new tensor with random numbers "
            "in place, which vmap can only do with one draw for every vmapped member", "randomness='same' (the "
            "members share the draws: their per-member results are then correlated)", e)) from e
    if isinstance(e, RuntimeError) and "same randomness with a batched tensor input" in str(e):
        # the draw itself: torch's samplers that read their parameters (bernoulli, multinomial, normal with
        # a tensor loc, poisson) have no "same" randomness for parameters that differ per member; torch
        # said only "... Please file an issue with functorch"
        raise StorchError(_vmap_draw_message(
            est, distribution, "same", "with parameters that differ between the vmapped members: torch's "
            "sampler for it cannot share one draw between members whose distributions differ",
            "randomness='different' (each member draws its own samples: unbiased per-member results, e.g. "
            "torch.func.vmap(torch.func.grad(step), randomness='different'))", e)) from e
    if isinstance(e, RuntimeError) and "autograd.Function with functorch transforms" in str(e):
        # torch draws Beta and Dirichlet through torch.distributions.dirichlet._Dirichlet, an
        # autograd.Function without setup_context, which no torch.func transform runs (grad, vmap under any
        # randomness); torch's own message asks the user to override a method of torch's class
        raise StorchError(
            f"estimator {est.name!r} (plate {est.plate!r}) cannot draw from {type(distribution).__name__} "
            "inside a torch.func transform (torch.func.grad, jacrev, vmap, ...): torch's sampler or log_prob "
            "for it is an autograd.Function that torch.func cannot run (Beta and Dirichlet: torch's "
            "_Dirichlet), under any randomness. For derivatives use torch.autograd.grad or "
            "torch.autograd.functional.jacobian / hessian; for per-member results give the members a plate "
            "instead of vmap (storch.denote_independent(x, dim, 'data')), or run them in a Python loop "
            f"(torch said: {str(e)[:200]})") from e
    if isinstance(e, RuntimeError) and "support calling random operations inside of vmap" in str(e):
        # torch's older vmap (torch._vmap_internals), which torch.autograd.functional runs f under with
        # vectorize=True and a forward-mode strategy: it refuses every random draw and has no randomness option
        raise StorchError(
            f"estimator {est.name!r} (plate {est.plate!r}) draws random samples inside "
            "torch.autograd.functional.jacobian / hessian with vectorize=True and strategy='forward-mode' "
            "(hessian: outer_jacobian_strategy='forward-mode'), which runs the function under torch's older "
            "vmap: it refuses any random draw and takes no randomness option (and forward mode needs "
            "vectorize=True). Use the reverse-mode strategy (the default, vectorized or not), or for "
            f"forward-mode first derivatives {_JACFWD} (torch said: "
            f"{str(e)[:200]})") from e
    if isinstance(e, RuntimeError) and str(e).startswith("vmap:") and _under_jacfwd():
        raise StorchError(
            f"estimator {est.name!r} (plate {est.plate!r}) cannot run inside torch.func.jacfwd or "
            "torch.func.hessian (which is jacfwd(jacrev(f))): jacfwd computes its columns with "
            "torch.func.vmap, which refuses the estimator's random draws (and reading the values of its "
            "samples or probabilities). For second derivatives use torch.func.jacrev(torch.func.jacrev(f)), "
            "torch.func.jacrev(torch.func.grad(f)) or torch.autograd.functional.hessian(f, x); for a "
            f"forward-mode product, torch.func.jvp (torch said: {str(e)[:200]})") from e
    if isinstance(e, RuntimeError) and str(e).startswith("vmap:"):
        raise StorchError(
            f"estimator {est.name!r} (plate {est.plate!r}) cannot run inside torch.func.vmap: it reads "
            "the values of its samples or probabilities to decide what to compute (.item(), bool(); e.g. "
            "which values are possible), or builds a learned part on its first call, and vmap allows "
            "neither. Run the vmapped members in a Python loop, or build the learned part with one step "
            f"outside vmap first (torch said: {str(e)[:200]})") from e
