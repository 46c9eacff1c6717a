"""NVIL's learned, input-dependent baseline b_ψ(h) (Mnih & Gregor, 2014), as a score baseline."""

from __future__ import annotations

import functools
import math
import re
import sys
import warnings
from typing import Any, Optional

import torch
from torch.distributions import Distribution, Independent, MixtureSameFamily, OneHotCategorical, TransformedDistribution

import storch.distributed
from storch.extending import user_stacklevel
from storch import CostFrame, Node, OptionError, Plate, PlateTensor, StorchError, current_generator
from storch.extending import (base_distribution, drawing_with, learned_dtype, options, parameters, refuse_lazy_build,
                               warn_untrained_part)


__all__ = ["LearnedBaseline", "baseline_features", "check_inputs", "in_frame"]

# what a refused per-step state value should become (a user porting actor-critic meets the refusal first): TD residuals
# as the costs telescope to the return minus V(s_0), so step s gets the baseline γ^s V(s_s), unbiased for any V
STATE_VALUE_CRITIC = (
    "For a critic V(s_t) of the state (actor-critic), add TD residuals as the step costs instead, with V detached: "
    "-gamma**t * (r_t + gamma * V(s_{t+1}) - V(s_t)) at step t (V = 0 after the last step, and at a terminal state: "
    "an episode that ends early reads V(s_{t+1}) = 0 at its last step and masks the costs after it); they sum to "
    "the return minus V(s_0), so the critic is the per-step baseline of every step, unbiased for any V; train V with "
    "its own regression, storch.add_cost((V(s_t) - return_t.detach()) ** 2, name='critic', credit=False) "
    "(docs/partitions.md, 'Actor-critic: a critic as the per-step baseline')")


def _finite_logits(v: torch.Tensor) -> torch.Tensor:
    """Logits with impossible values (``-inf``, and ``+inf`` of a Bernoulli with p = 1) at ±log(eps)."""
    bound = math.log(torch.finfo(v.dtype).eps)  # -36.0 in float64, -15.9 in float32
    return torch.nan_to_num(v, nan=math.nan, posinf=-bound, neginf=bound)


def _default_features(node: Node) -> torch.Tensor:
    """The node's distribution parameters (logits, probs, loc, ...), when no inputs were given.

    A distribution that holds one of ``logits``, ``probs``, ``loc``, ``rate`` or ``concentration``
    itself (under an ``Independent``) is conditioned on the first of them, as it always was: the
    heads' input width, and so saved state_dicts, stay what they were (a Normal's h is its loc).
    Any other distribution is conditioned on all its parameters (``storch.extending.parameters``: a
    Beta's concentrations, a LogNormal's loc and scale), those of the base distribution of a
    ``TransformedDistribution`` (a tanh-squashed Normal) and of both parts of a ``MixtureSameFamily``,
    each flattened per sample and concatenated. Logits of impossible values (masked: ``-inf``, and
    ``+inf`` of a Bernoulli with p = 1) are replaced by ±log(eps) of their dtype, beyond which a
    probability is 0 (or 1) to within eps: the features stay finite (a network on ``-inf`` has NaN
    outputs and a NaN regression), and "this value is impossible" is still what they say.
    """
    # the first step's distribution: node.at(t)'s own distribution (t >= 1) depends on the sequence's samples
    d = node.first_distribution
    base = base_distribution(d)
    base = base._categorical if isinstance(base, OneHotCategorical) else base  # it holds the logits
    for name in ("logits", "probs", "loc", "rate", "concentration"):
        v = base.__dict__.get(name)
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            return _finite_logits(v) if name == "logits" else v
    lead = len(node.first_parents)  # the raw parameters lead with the first step's parent plates
    found = _all_parameters(d)
    if not found:
        raise OptionError(
            f"baseline='learned' on {type(base).__name__}: cannot find a parameter tensor to condition on; pass "
            "the baseline's inputs at the call, est(distribution, inputs=h)")
    sizes = tuple(p.size for p in node.first_parents)
    flat = []
    for v in found:
        if tuple(v.shape[:lead]) != sizes:  # a parameter shared by the plate entries: one copy per entry
            v = v.expand(sizes + tuple(v.shape))
        flat.append(v.reshape(sizes + (-1,)))
    dtype = functools.reduce(torch.promote_types, [v.dtype for v in flat])
    return torch.cat([v.to(dtype) for v in flat], -1)


def _all_parameters(d: Distribution, depth: int = 0) -> list:
    """The floating-point parameter tensors of ``d``, of the base of an ``Independent`` or
    ``TransformedDistribution``, and of both parts of a ``MixtureSameFamily`` (logits made finite)."""
    if isinstance(d, Independent):
        return _all_parameters(d.base_dist, depth)
    if isinstance(d, MixtureSameFamily):
        return _all_parameters(d.mixture_distribution, depth) + _all_parameters(d.component_distribution, depth)
    try:
        params = parameters(d)
    except NotImplementedError:  # a class without arg_constraints
        params = {}
    out = [_finite_logits(v) if n == "logits" else v for n, v in params.items()
           if isinstance(v, torch.Tensor) and v.is_floating_point()]
    if not out and isinstance(d, TransformedDistribution) and depth < 8:
        return _all_parameters(d.base_dist, depth + 1)  # a plain TransformedDistribution: its base's
    return out


def check_inputs(inputs: Any, partition: str, step: int) -> None:
    """Raise a storch error for ``inputs=`` that the learned baseline cannot condition on (at the call).

    They must be a tensor or a PlateTensor, and at a later step of a partition they must not depend on
    the partition's own samples (carry its plate): the control variate of a cost at step t is
    (1 - MagicBox(L_t)) b with L_t = l_0 + ... + l_t, zero in expectation only for a b that does not
    depend on the sequence's samples x_0, ..., x_t (a state s_t computed from x_<t is such a sample).
    """
    if not isinstance(inputs, torch.Tensor):
        raise OptionError(
            f"baseline='learned': inputs must be a tensor or a PlateTensor, got {type(inputs).__name__}"
            + (f" (at step {step} of partition {partition!r})" if step else ""))
    if type(inputs) is PlateTensor and any(p.name == partition for p in inputs.plates):
        at = next(p.step for p in inputs.plates if p.name == partition)
        raise OptionError(
            f"baseline='learned': the inputs at step {step} of partition {partition!r} depend on its own samples "
            f"(they carry its plate, from step {at}). A baseline must not depend on the sequence's samples up to "
            "the cost's step: a cost at step t gets (1 - MagicBox(l_0 + ... + l_t)) b, which is biased when b "
            "depends on x_0..x_t (e.g. on a state computed from earlier actions). Pass inputs that do not depend "
            f"on the partition (data, upstream values; the first step's inputs serve every step), or use "
            "baseline='leave_one_out' or 'moving_average' (per-time-step baselines of the cost-to-go). "
            + STATE_VALUE_CRITIC)


def baseline_features(node: Node) -> tuple[torch.Tensor, tuple[Plate, ...]]:
    """h for b_ψ(h), and its plates: ``(raw, plates)`` with ``raw`` of shape ``(*plates, F)``.

    h is ``node.inputs`` (for a partition, the inputs of the latest step up to ``node.step`` that was
    given some), else the first step's distribution parameters (which precede the sequence's samples;
    ``plates`` then are the first step's parents). ``plates`` are among the node's parent plates; the
    per-sample dims are flattened into F. Detached: the baseline never sends gradient into the model
    (⊥b, appendix C), and its regression trains ψ only.
    """
    x = node.inputs
    if x is None:
        raw, plates = _default_features(node), node.first_parents  # leading dims: the first step's parents
    elif type(x) is PlateTensor:
        raw, plates = x.tensor, x.plates
    elif isinstance(x, torch.Tensor):
        raw, plates = x, ()
    else:
        raise OptionError(f"baseline='learned': inputs must be a tensor or a PlateTensor, got {type(x).__name__}")
    lead = len(plates)
    raw = raw.detach()  # ⊥h: ψ is trained by regression only, the model gets no gradient from b
    raw = raw.reshape(tuple(raw.shape[:lead]) + (-1,))
    return (raw if raw.is_floating_point() else raw.to(torch.get_default_dtype())), plates


def in_frame(cost: CostFrame, t: torch.Tensor, plates: tuple[Plate, ...]) -> torch.Tensor:
    """``t`` (leading dims ``plates``, then per-sample dims) viewed in the frame of ``cost``."""
    if plates:
        return cost.align(t, plates)
    return t.reshape((1,) * len(cost.plates) + tuple(t.shape))


class LearnedBaseline(torch.nn.Module):
    """b_ψ(h): a one-hidden-layer MLP per cost on the node's inputs h (NVIL's input-dependent baseline).

    Called as ``baseline(node, cost)`` by the score estimator's control variate, it returns one
    number per parent entry, aligned into the cost's frame; it never sees the node's samples, so
    (1 - MagicBox(l)) ⊥b is zero in expectation at every order (appendix C). ``storch.backward()``
    trains ψ by regression on the cost: ``update_parameters`` descends Σ (b_ψ(h) - f)², with f the
    detached cost estimates of the node's :class:`storch.CostFrame` (Mnih & Gregor 2014, Eq. 11).
    The heads are created at the first node (their input width is h's), with a zero output layer,
    so the untrained baseline is 0 (no baseline), and a first layer drawn from the generator of
    ``storch.Graph(generator=g)`` (torch's global one without it); under ``torch.distributed`` they
    are broadcast from rank 0 when built (while synchronised) and at the estimator's next synchronised update
    (heads built while ``storch.distributed.synchronize`` was off, before its first update or after), and each
    head's regression gradient is averaged over the ranks whose costs credit it. A step
    traced by ``storch.compile`` cannot create them (run one step eagerly first, or load a state_dict).

    Args:
        hidden: width of the hidden layer.

    References:
        [1] Neural Variational Inference and Learning in Belief Networks (Mnih & Gregor, 2014)
    """

    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.hidden = options.integer("learned baseline", "hidden", hidden, minimum=1)  # NumPy's as a Python int
        self.heads = torch.nn.ModuleDict()

    def head(self, name: Optional[str], h: torch.Tensor) -> torch.nn.Module:
        """The network of the cost named ``name``, built on first use with ``h``'s width, dtype and device."""
        key = "cost_" + re.sub(r"\W", "_", name or "")
        if key in self.heads and self.heads[key][0].in_features != h.shape[-1]:
            # torch's "mat1 and mat2 shapes cannot be multiplied" names neither the estimator nor the cause
            raise StorchError(self._width_message(name, self.heads[key][0].in_features, h.shape[-1]))
        if key not in self.heads:
            # not in a step storch.compile traces, nor under a torch.func transform (under vmap torch said only
            # "Cannot ask for different inplace randomness on an unbatched tensor"): say what to do
            refuse_lazy_build(f"score's learned baseline's network for cost {name!r}", "h's")
            # trainable even if first built in an inference_mode() pass; initialised from the generator of
            # storch.Graph(generator=g) (not torch's global one), as every learned part of storch is
            with torch.inference_mode(False), drawing_with(current_generator()):
                net = torch.nn.Sequential(torch.nn.Linear(h.shape[-1], self.hidden), torch.nn.Tanh(),
                                          torch.nn.Linear(self.hidden, 1)).to(dtype=learned_dtype(h), device=h.device)
                torch.nn.init.zeros_(net[2].weight)
                torch.nn.init.zeros_(net[2].bias)
            follows = self._requires_grad is None  # no request: the existing heads' (a parent's freeze reached them)
            net.requires_grad_(self._built_requires_grad())  # est.requires_grad_(False) before this head existed
            # every process must start from the same ψ (DDP broadcasts only what exists at wrapping)
            # (the head's cost named in the ranks' check: ranks that first met different costs build different heads)
            storch.distributed.broadcast_(list(net.parameters()), owner=self._owner,
                                          what=f"the learned baseline's new head for cost {name!r}")
            self.heads[key] = net
            self._warn_untrained(name)
            if follows and not net[0].weight.requires_grad:
                # said at the first training step that uses it: a head first built in a no_grad validation
                # pass stayed frozen in training with no word (the warning was only given at the build)
                self._followed = self._followed | {key}
        if key in self._followed and torch.is_grad_enabled():
            self._followed = self._followed - {key}
            if self._requires_grad is None and not self.heads[key][0].weight.requires_grad:
                self._warn_followed_freeze(name, key)
        return self.heads[key]

    def _built_requires_grad(self) -> bool:
        """``requires_grad`` of a head built now: the last request to this baseline (or its estimator), else that
        of the heads built before: frozen where they all are (RELAX's network follows η and λ the same way).

        A parent's ``model.requires_grad_(False)`` loops over the parameters that exist when it is called
        (torch's ``Module.requires_grad_``) and never reaches this module's own ``requires_grad_``: after the
        first step it froze the heads of the costs met so far, and storch built and trained the head of a cost
        first met later. With no head yet there is nothing to follow: the head is trainable (freeze the
        estimator itself, ``est.requires_grad_(False)``, to freeze it)."""
        if self._requires_grad is not None:
            return self._requires_grad
        built = list(self.heads.parameters())
        return not built or any(p.requires_grad for p in built)

    def _warn_followed_freeze(self, name: Optional[str], key: str) -> None:
        """The head was built frozen (met now in a training step) because every earlier head was, with no request to the
        baseline or its estimator: a parent's ``model.requires_grad_(False)``, or those heads frozen on purpose
        (the new cost's head meant to train). The two cannot be told apart; said once, and an explicit request
        either way silences it."""
        if self._warned_follow:
            return
        self._warned_follow = True
        warnings.warn(
            f"{self._who()}: the learned baseline's network for cost {name!r} was built frozen "
            "(requires_grad=False), as every head built before it is frozen and no requires_grad_ request reached "
            "the estimator (a parent's model.requires_grad_(False) reaches only the parameters that exist when it "
            f"is called). To train the new head, call est.baseline_fn.heads[{key!r}].requires_grad_(True); to freeze the estimator and silence this, call est.requires_grad_(False)",
            RuntimeWarning, stacklevel=user_stacklevel(sys.modules[__name__]))

    def _who(self) -> str:
        return "baseline='learned'" if self._owner is None else f"{self._owner.name} (plate {self._owner.plate!r})"

    def _width_message(self, name: Optional[str], built: int, now: int) -> str:
        return (f"{self._who()}: the learned baseline's network for cost {name!r} was built at its first node for "
                f"features h of width {built}, and this node's are of width {now} (h: the inputs= given at the call, "
                "else the distribution's parameters, flattened per data point). One network takes one width: a "
                "Categorical over another number of values, latents of another size, or one estimator shared by "
                "models of different sizes need their own. Pass inputs= of one fixed width (e.g. features of the "
                "data point, not of its candidates), create one estimator per model (per width), or pass "
                "baseline= a module that takes every width you use")

    def _warn_untrained(self, name: Optional[str]) -> None:
        # update=False: the user trains ψ (storch.extending.warn_untrained_part)
        warn_untrained_part(self._owner, self._who(), f"the learned baseline's network for cost {name!r} (input width: "
                            "h's)", "est.baseline_fn.parameters()", "baseline=")

    def predict(self, name: Optional[str], h: torch.Tensor) -> torch.Tensor:
        """The head of cost ``name`` on features ``h``, ``(..., 1)``; ``h`` is cast to the head's dtype (a
        bfloat16 ``h`` that ``torch.autocast`` produced, read by the surrogate outside the autocast block)."""
        net = self.head(name, h)
        dtype = net[0].weight.dtype
        return net(h if h.dtype == dtype else h.to(dtype))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # heads saved after they were built load into a fresh (not yet built) baseline: build them first
        for key, weight in state_dict.items():
            m = re.fullmatch(re.escape(prefix) + r"heads\.(\w+)\.0\.weight", key)
            if m and m.group(1) not in self.heads:
                self.heads[m.group(1)] = torch.nn.Sequential(
                    torch.nn.Linear(weight.shape[1], self.hidden), torch.nn.Tanh(),
                    torch.nn.Linear(self.hidden, 1)).to(dtype=weight.dtype, device=weight.device
                                                        ).requires_grad_(self._built_requires_grad())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    _owner = None  # the estimator whose process group the broadcast uses (set by it)

    def requires_grad_(self, requires_grad: bool = True) -> "LearnedBaseline":
        """Also for the heads built later: a head is built at the first node of its cost, so
        ``est.requires_grad_(False)`` before it froze nothing and ``storch.backward()`` trained the head (as torch's
        lazy modules, whose uninitialised parameters keep the flag, the request is kept for them)."""
        self._requires_grad = requires_grad
        return super().requires_grad_(requires_grad)

    # the last requires_grad_() request, applied to the heads when they are built; None: none was made
    _requires_grad: Optional[bool] = None
    _warned_follow = False  # (the one-time warning of _warn_followed_freeze)
    _followed: frozenset = frozenset()  # keys of heads built frozen by following, not yet used in a training step

    def forward(self, node: Node, cost: CostFrame) -> torch.Tensor:
        h, plates = baseline_features(node)
        b = self.predict(cost.state_name, h).squeeze(-1)  # (*plates); one head per cost (state) name
        return in_frame(cost, b, plates)
