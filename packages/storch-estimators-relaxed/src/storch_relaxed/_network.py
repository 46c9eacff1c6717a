"""The learned control variate c_φ: the default network, its functional evaluation, and the any-order
z̃ term of REBAR and RELAX."""

from __future__ import annotations

import sys
import warnings
import weakref
from typing import Callable, Optional

import torch

import storch.distributed
from storch import StorchError, magic_box
from storch.extending import (drawing_with, learned_dtype, refuse_create_graph, refuse_lazy_build, require_smooth,
                               user_stacklevel, warn_untrained_part)

__all__ = ["ControlVariateNet", "param_clones", "flat", "evaluate_network", "tilde_term", "smooth_network",
           "smooth_who", "cost_what", "smoothness_due", "smoothness_checked", "order_1_kinks",
           "refuse_twice_on_kinks", "SMOOTH_INSTEAD"]

# what require_smooth suggests instead of LAX, RELAX and REBAR at an order their cost / network cannot have
SMOOTH_INSTEAD = ("a score-family estimator ('score' with baseline='leave_one_out', 'sum_and_sample', "
                  "'unordered_set' with baseline=False; pip install storch-estimators-score)")


class ControlVariateNet(torch.nn.Module):
    """c_φ(z): a two-layer MLP on the node's (relaxed) sample, flattened; one number per entry.

    The layers are created on the first call, with the input's size, dtype and device, so their
    parameters appear in ``.parameters()`` after the estimator's first node. They are built frozen
    (``requires_grad=False``) after ``requires_grad_(False)`` on the network or its estimator, and, with no such
    request, where every parameter the estimator had before them is frozen (RELAX's η and λ, frozen by a parent's
    ``model.requires_grad_(False)``): see :meth:`_built_requires_grad`.

    Args:
        hidden: width of the hidden layer.
        zero_output: start with a zero output layer (c_φ = 0 until trained).
    """

    def __init__(self, hidden: int = 32, zero_output: bool = False) -> None:
        super().__init__()
        self.hidden = hidden
        self.zero_output = zero_output
        self.net: Optional[torch.nn.Sequential] = None

    def build(self, x: torch.Tensor) -> None:
        """Create the layers for inputs like ``x`` (``(..., F)``), once; later inputs must have width F."""
        if self.net is not None:
            if x.shape[-1] != self.net[0].in_features:
                # torch's "mat1 and mat2 shapes cannot be multiplied" names neither the estimator nor the cause
                raise StorchError(_width_message(self._owner, self.net[0].in_features, x.shape[-1]))
            return
        # not in a step storch.compile traces, nor under a torch.func transform: say what to do
        refuse_lazy_build("the learned control variate's network", "the sample's")
        # normal tensors even when the first use is an evaluation pass under torch.inference_mode()
        # (inference tensors cannot be trained afterwards)
        with torch.inference_mode(False):
            self._build(x.shape[-1], learned_dtype(x), x.device)
            if self.zero_output:  # c_φ = 0 at the start (RELAX's residual: it starts as REBAR)
                torch.nn.init.zeros_(self.net[2].weight)
                torch.nn.init.zeros_(self.net[2].bias)
        # every process must start from the same φ (DDP broadcasts only what exists at wrapping)
        storch.distributed.broadcast_(list(self.net.parameters()), owner=self._owner)
        _warn_untrained(self._owner)
        # said at the first training step that uses the layers (forward): layers first built in a no_grad
        # validation pass stayed frozen in training with no word (the warning was only given at the build)
        self._followed = self._requires_grad is None and not self.net[0].weight.requires_grad

    def requires_grad_(self, requires_grad: bool = True) -> "ControlVariateNet":
        """Also for the layers built later: before the estimator's first node there are none, so
        ``est.requires_grad_(False)`` froze nothing and ``storch.backward()`` trained the layers built at that node
        (as torch's lazy modules, whose uninitialised parameters keep the flag, the request is kept for them)."""
        self._requires_grad = requires_grad
        return super().requires_grad_(requires_grad)

    # the last requires_grad_() request, applied to the layers when they are built; None: none was made
    _requires_grad: Optional[bool] = None

    def _built_requires_grad(self) -> bool:
        """``requires_grad`` of layers built now: the last request to this network (or its estimator), else that of
        the estimator's parameters from construction (RELAX's η and λ): frozen where all of them are frozen.

        A parent's ``model.requires_grad_(False)`` loops over the parameters that exist when it is called (torch's
        ``Module.requires_grad_``) and never reaches this network's own ``requires_grad_``: before the first node
        it froze η and λ, and storch built and trained the layers. Where the estimator has no parameters before
        the layers (LAX, RELAX's ``control_variate="network"``) there is nothing to follow: freeze the estimator
        itself (``est.requires_grad_(False)``) or after the first step."""
        if self._requires_grad is not None:
            return self._requires_grad
        owned = [] if self._owner is None else list(self._owner.parameters())  # the layers are not built yet
        return not owned or any(p.requires_grad for p in owned)

    _followed = False  # built frozen by following η and λ, not yet used in a training step

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.build(x)
        if self._followed and torch.is_grad_enabled():
            self._followed = False
            if self._requires_grad is None and not self.net[0].weight.requires_grad:
                _warn_followed_freeze(self._owner)
        dtype = self.net[0].weight.dtype  # x may be autocast's bfloat16, read outside the autocast block
        return self.net(x if x.dtype == dtype else x.to(dtype))

    def _build(self, features: int, dtype: torch.dtype, device: torch.device) -> None:
        with drawing_with(storch.current_generator()):  # storch.Graph(generator=g): g initialises
            self.net = torch.nn.Sequential(
                torch.nn.Linear(features, self.hidden), torch.nn.Tanh(), torch.nn.Linear(self.hidden, 1)
            ).to(dtype=dtype, device=device).requires_grad_(self._built_requires_grad())

    _owner = None  # the estimator whose process group the broadcast uses (set by it)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a saved, already built network loads into a fresh (not yet built) one: build it first
        weight = state_dict.get(prefix + "net.0.weight")
        if self.net is None and weight is not None:
            self._build(weight.shape[1], weight.dtype, weight.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _who(owner) -> str:
    return "the control variate" if owner is None else f"{owner.name} (plate {owner.plate!r})"


def _width_message(owner, built: int, now: int) -> str:
    extra = ", plus inputs= where given" if owner is not None and owner.name == "relax" else ""
    return (f"{_who(owner)}: its default control-variate network was built at its first node for inputs of width "
            f"{built} (the sample's own dims flattened{extra}), and this node's are of width {now}. One network takes "
            "one width: a Categorical over another number of values, latents of another size, or one estimator "
            "shared by models of different sizes need their own. Create one estimator per model (per width), or "
            "pass network= a module that takes every width you use (e.g. one that pools over the entries)")


def _warn_followed_freeze(owner) -> None:
    """The layers were built frozen (said at their first training step) because η and λ were (:meth:`ControlVariateNet._built_requires_grad`),
    with no request to the network or its estimator. That is a parent's ``model.requires_grad_(False)``, or η and λ
    frozen on purpose to learn the residual alone (RELAX with a fixed REBAR part): the two cannot be told apart, and
    in the second the network silently never trained. Said once; an explicit request either way silences it."""
    warnings.warn(
        f"{_who(owner)}: its default control-variate network was built frozen (requires_grad=False), as η and λ "
        "are both frozen and no requires_grad_ request reached the network or the estimator (a parent's "
        "model.requires_grad_(False) reaches only the parameters that exist when it is called). To train the "
        "network alone with η and λ fixed, call est.network.requires_grad_(True); to freeze the estimator and "
        "silence this, call est.requires_grad_(False)", RuntimeWarning,
        stacklevel=user_stacklevel(sys.modules[__name__]))


def _warn_untrained(owner) -> None:
    """update=False: the user trains φ (storch.extending.warn_untrained_part)."""
    warn_untrained_part(owner, _who(owner), "its default control-variate network (input width: the sample's)",
                        "est.network.parameters()", "network=")


def param_clones(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Clones of ``module``'s parameters (differentiable in them) for use in the surrogate's graph.

    The graph then saves the clones, not the parameters, so ``update_parameters`` may step the
    parameters in place while another estimator of the same graph still differentiates the loss.
    """
    return {k: v.clone() for k, v in module.named_parameters()}


def flat(t: torch.Tensor, lead: int) -> torch.Tensor:
    """Flatten every dim after the first ``lead`` into one (size 1 if there are none)."""
    return t.reshape(tuple(t.shape[:lead]) + (-1,))


def evaluate_network(name: str, network: Callable, z: torch.Tensor, lead: int) -> torch.Tensor:
    """c_φ(z) per entry: ``network`` maps ``(*lead, F)`` to ``(*lead)`` or ``(*lead, 1)``."""
    x = flat(z, lead)
    if isinstance(network, ControlVariateNet):
        network.build(x)
    if isinstance(network, torch.nn.Module):
        if not isinstance(network, ControlVariateNet):
            _refuse_batch_statistics(name, network)
        out = torch.func.functional_call(network, param_clones(network), (x,))
    else:
        out = network(x)
    if out.dim() == lead + 1 and out.shape[-1] == 1:
        out = out.squeeze(-1)
    if tuple(out.shape) != tuple(z.shape[:lead]):
        raise StorchError(
            f"{name}: the control-variate network returned shape {tuple(out.shape)} for input shape "
            f"{tuple(flat(z, lead).shape)}; it must return one number per entry, shape {tuple(z.shape[:lead])}"
        )
    return out


# torch's batch norms (BatchNorm1d/2d/3d, their lazy forms, SyncBatchNorm) share this base class
_BATCH_NORMS = (torch.nn.modules.batchnorm._BatchNorm,)
_NORMS: "weakref.WeakKeyDictionary[torch.nn.Module, tuple]" = weakref.WeakKeyDictionary()  # network -> its batch norms


def _refuse_batch_statistics(name: str, network: torch.nn.Module) -> None:
    """Refuse a network whose output at one entry depends on the other entries: a batch norm that normalises with
    the batch's statistics (training mode, or no running statistics). The score term of the control variate
    multiplies c_φ at entry i by the gradient of entry i's log p only, while the pathwise term differentiates c_φ
    at entry i through every entry's sample: unequal in expectation, so the gradient is biased (RELAX with a
    BatchNorm1d network, 4 samples: |z| 67 against exact enumeration)."""
    norms = _NORMS.get(network)
    if norms is None:  # (walking the modules at every call cost ~4 us: they are looked up at the network's first use)
        norms = _NORMS[network] = tuple(m for m in network.modules() if isinstance(m, _BATCH_NORMS))
    for m in norms:
        if m.training or m.running_mean is None:
            raise StorchError(
                f"{name}: the control-variate network holds {type(m).__name__} normalising with the batch's statistics "
                "(in training mode, or without running statistics), so its output at one entry (one sample, one data "
                "point) depends on the other entries, and the control variate no longer has the expectation the "
                "estimator subtracts: the gradient would be biased. c_φ must treat each entry on its own: use "
                "LayerNorm (or GroupNorm) instead, or put the batch norm in eval mode with running statistics "
                "(network.eval(), or the submodule's .eval())")


def tilde_term(c_zt: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    """-MagicBox(l) c(z̃) + ⊥c(z̃): the z̃ part of REBAR's and RELAX's control variate, any-order form.

    Evaluates to 0; all its derivatives are those of -MagicBox(l) c(z̃), the DiCE estimate of
    -E[c(z)] through b ~ p and z̃ ~ p(z | b). Appendix D.2.4 prints -c(z̃) + (2 - MagicBox(l)) ⊥c(z̃),
    whose second derivative misses the cross terms ∇l ∇c(z̃)ᵀ + ∇c(z̃) ∇lᵀ (biased at order 2;
    ``tests/relaxed/test_relaxed_unbiased.py`` checks both forms).
    """
    return c_zt.detach() - magic_box(l) * c_zt


def smooth_who(est, node) -> str:
    return f"estimator {est.name!r} on plate {node.plate.name!r}"


def cost_what(cost) -> str:
    return f"the cost {cost.name!r}" if cost.name else "the cost"


def smoothness_due(est, node, cost) -> bool:
    """Whether ``control_variate`` checks now (``storch.extending.require_smooth``) that what it differentiates
    through a continuous sample (the cost at σ_λ(z), σ_λ(z̃); the network's output at z, z̃) is smooth enough.

    Order n needs the derivatives of order < n continuous there. At order >= 2 (a kink or a jump) at every
    surrogate. At order 1 only a jump breaks it (round, sign, floor, nearest grid_sample: the pathwise
    term ∇c(z) misses the delta that ∇E[c(z)] has, and the score-function term -c(z̃) ∇l, or
    -⊥c_φ(x) ∇l for LAX, no longer cancels it: a z-test of REBAR on round(0.6 σ_λ(z) + 0.3) gave
    z ≈ -50), checked at the first surrogate of each plate and cost name of this estimator only, as the
    core checks a reparameterised node (a walk of the cost's graph at every step would cost the common
    case time; a model's operations rarely change between steps). :func:`smoothness_checked` records it.
    """
    if cost.order >= 2:
        return True
    return cost.order == 1 and (node.plate.name, cost.name) not in est._smooth_at_order_1


def smoothness_checked(est, node, cost, kinks: dict) -> None:
    """The order-1 check of :func:`smoothness_due` passed for this plate and cost name: not walked again
    (called after the checks: a refused cost is checked again at the next step). ``kinks``: what the
    check's walks found that order 1 does not refuse, per walked output ("cost", "network": the names
    require_smooth returned), hooked at every order-1 step (:func:`refuse_twice_on_kinks`)."""
    if cost.order == 1:
        est._smooth_at_order_1[(node.plate.name, cost.name)] = {k: v for k, v in kinks.items() if v}


def order_1_kinks(est, node, cost) -> dict:
    """At order 1, the kinks recorded for this plate and cost name ({} if none, or not yet checked): a
    dictionary lookup per step."""
    if cost.order != 1:
        return {}
    return est._smooth_at_order_1.get((node.plate.name, cost.name)) or {}


def refuse_twice_on_kinks(est, node, what: str, through: str, kinks: tuple, *outputs: torch.Tensor) -> None:
    """The order-1 surrogate is unbiased here, but differentiated twice (a backward pass with
    ``create_graph=True``, then again) its pathwise term through ``outputs`` loses the delta of a kink on
    the path from the continuous sample (REBAR / RELAX with a ReLU cost gave Hessians at z -65 / -47, LAX
    with a ReLU network= at z 5 to 9): hook them with the refusal (storch.extending.refuse_create_graph),
    as the core hooks a reparameterised node's cost. ``surrogate_loss(order=2)`` refuses the same kinks
    when it is built (require_smooth)."""
    who = smooth_who(est, node)

    def message() -> str:
        return (f"{who}: {what} has a kink on the path from {through} ({', '.join(kinks)}: its derivative jumps), "
                "so the pathwise derivatives of order >= 2 of this estimator's control variate are biased "
                "(autograd reports 0 for the delta in the second derivative; storch.surrogate_loss(order=2) "
                "refuses it too). Differentiating the order-1 surrogate (storch.surrogate_loss(), storch.backward()) "
                "again, after a backward pass with create_graph=True (torch.autograd.grad(..., create_graph=True), "
                "torch.autograd.functional.hessian / hvp, loss.backward(create_graph=True)), would give a silently "
                "biased higher derivative. Use smooth operations on that path (softplus, GELU, SiLU or tanh instead "
                "of ReLU; logsumexp instead of max) for derivatives of order n (storch.surrogate_loss(order=n)), or "
                f"{SMOOTH_INSTEAD}; if create_graph=True was incidental (only the first derivative is used), pass "
                "create_graph=False or detach the first derivative")
    for out in outputs:
        refuse_create_graph(out, message)


def smooth_network(est, node, order: int, *pairs: torch.Tensor) -> tuple:
    """c_φ's pathwise term E[∇ⁿc_φ(z)] = ∇ⁿE[c_φ(z)] needs the network's derivatives of order < n continuous
    in z (from order 2 a ReLU network's are not; at order 1 a jump, round or sign, breaks it); ``pairs`` =
    output, input, output, input... (r(z), z, r(z̃), z̃). Called when :func:`smoothness_due`. Returns the
    kinks found at order 1 (require_smooth's), sorted."""
    kinks: set = set()
    for out, z in zip(pairs[::2], pairs[1::2]):
        kinks.update(require_smooth(out, [z], order, who=smooth_who(est, node), what=NETWORK_WHAT,
                                    through=NETWORK_THROUGH, instead=SMOOTH_INSTEAD))
    return tuple(sorted(kinks))


NETWORK_WHAT = "the control-variate network's output"
NETWORK_THROUGH = "the continuous sample z it is evaluated on"
RELAXED_THROUGH = "the relaxed sample σ_λ(z), σ_λ(z̃)"
