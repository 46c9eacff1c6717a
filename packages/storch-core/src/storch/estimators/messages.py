"""The messages of the estimator call's refusals that several checks share: a sample or output of the
wrong shape, a proposal's wrong dtype, an update that updates nothing or that ``storch.compile`` cannot
replay; and what the call's messages read on the error path (non-finite parameters; jacfwd's vmap).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

import torch
from torch.distributions import Distribution, ExponentialFamily

from ..distributions import base_distribution
from ..plates.tensor import PlateTensor

if TYPE_CHECKING:
    from .base import Estimator

__all__ = ["updating_message"]


def _step(step: int) -> str:
    return f" at step {step} of its partition" if step else ""


def _plate_tensor_draw_message(est: Estimator, distribution: Distribution, where: str) -> str:
    """The refusal of a raw draw that came back as a PlateTensor: the raw distribution still holds plate tensors
    that storch could not see (in a closure, or an attribute of a user's transform or class), so the draw mixes
    plates inside the raw sample (a nested plate tensor: wrong values, or a confusing error later)."""
    return (f"estimator {est.name or type(est).__qualname__!r} (plate {est.plate!r}): the raw draw ({where}) of "
            f"{type(distribution).__name__} returned a PlateTensor, not a raw tensor: a part of it (a transform, a "
            "closure such as a conditional flow's params=lambda: (u, w, b) or partial(nn, context), an attribute "
            "of your class) holds plate tensors that storch cannot see and re-align, so the raw sample would mix "
            "plates (nested values, one draw broadcast against another plate's entries). Apply that part to the "
            "sample instead (z = f(est(base)): the flow applied to the estimated base sample, its log-det "
            "subtracted from the base's log_prob), or pass the data-dependent tensors as the base distribution's "
            "parameters or as AffineTransform/PowerTransform in its list of transforms")


def _sample_shape_message(est: Estimator, component: str, got: torch.Size, own: torch.Size, step: int = 0) -> str:
    want = "(N, " + ", ".join(str(s) for s in own) + ", ...)" if own else "(N, ...)"
    return (f"estimator {est.name or type(est).__qualname__!r} (plate {est.plate!r}): {component}{_step(step)} returned "
            f"samples of shape {tuple(got)}, but they must have shape {want}: the sample dim N (the plate size) "
            f"first, then the raw distribution's batch_shape + event_shape {tuple(own)} (the parent plates, the "
            "node's own batch dims, its event dims; then, if any, the dims of a representation of the value such as "
            "a one-hot vector: docs/writing-an-estimator.md, section 1). Draw with the "
            "sample dim, e.g. node.distribution.sample((self.n_samples,)), not node.distribution.sample()")


def _output_shape_message(est: Estimator, out: Any, sample: torch.Tensor, lead: int, who: str = "output") -> str:
    return (f"estimator {est.name or type(est).__qualname__!r} (plate {est.plate!r}): {who} returned a tensor of "
            f"shape {tuple(out.shape)}, but the value handed to user code must lead with the sample's first {lead} "
            f"dims {tuple(sample.shape[:lead])} (node.sample's sample dim N and the parent plates): they become the "
            "value's plates; the dims after them are the value's per-sample shape (the node's batch and event dims, "
            "or a representation of the value such as a one-hot vector). Return one entry per entry of node.sample "
            "(a relaxed or straight-through sample of the same shape, e.g. node.sample + (r - r.detach()))")


def _sample_dtype_message(est: Estimator, raw: Distribution, sample: torch.Tensor, own: torch.Size,
                          error: BaseException) -> Optional[str]:
    """Why the gradient function failed if the proposal's samples have a dtype that the distribution's own
    samples do not have (``None`` if they have it, or it cannot be told): read on the error path only."""
    if sample.dim() != len(own) + 1:  # a representation of the value (a one-hot vector): its own dtype
        return None
    try:
        if raw.has_enumerate_support:  # its values, no random draw
            want = raw.enumerate_support(expand=False).dtype
        else:
            devices = [] if sample.device.type == "cpu" else [sample.device]
            with torch.no_grad(), torch.random.fork_rng(devices=devices, device_type=sample.device.type):
                want = raw.sample().dtype  # (the global generator's state is restored)
    except Exception:  # noqa: BLE001  (only for a better message: the original error is raised otherwise)
        return None
    if want == sample.dtype:
        return None
    return (f"estimator {est.name or type(est).__qualname__!r} (plate {est.plate!r}): proposal returned samples of "
            f"dtype {sample.dtype}, but {type(raw).__name__}'s samples have dtype {want} (what "
            f"node.distribution.sample() returns), and gradient_function failed on them ({type(error).__name__}: "
            f"{str(error)[:200]}). Return the samples in the distribution's dtype, e.g. x.to({want})")


def _no_update_message(est: Estimator) -> str:
    return (f"estimator {est.name or type(est).__qualname__!r} (plate {est.plate!r}) has has_update = True but "
            "neither overrides update_parameters(nodes, loss) nor sets replays_update (whose default "
            "update_parameters runs update_from(update_inputs(nodes))), so storch.backward() would update nothing. "
            "Override update_parameters (the one place the estimator's state changes), or set replays_update = True "
            "with update_inputs and update_from, or set has_update = False (an instance may set it from its "
            "options, as sum_and_sample does without buffer=)")


# the top-level modules of the first-party estimator packages: their options are what the first-party advice names
_FIRST_PARTY_MODULES = frozenset({"storch", "storch_score", "storch_relaxed", "storch_mvd"})


def _first_party_update(est: "Estimator") -> bool:
    """Whether ``est``'s update (its ``update_parameters``, or its class where none is defined) is a first-party
    estimator's, whose options the refusal's advice names; a third-party class (or subclass with its own update)
    is told the protocol instead."""
    for cls in type(est).__mro__:
        if cls.__module__ == "storch.estimators.base":  # (the base class's: no update of the estimator's own)
            break
        if "update_parameters" in cls.__dict__ or "update_from" in cls.__dict__:
            return cls.__module__.split(".")[0] in _FIRST_PARTY_MODULES
    return type(est).__module__.split(".")[0] in _FIRST_PARTY_MODULES


def updating_message(est: "Estimator") -> str:
    """Why ``storch.compile`` refuses ``est``: it updates its state in ``storch.backward()``, by
    code that a compiled step cannot replay (``replays_update`` is false). A first-party estimator is told
    the options that keep such state; a third-party one the protocol it lacks (``replays_update``,
    ``update_inputs``, ``update_from``, ``state_tensors``)."""
    if not _first_party_update(est):
        who = est.name or type(est).__qualname__
        return (f"storch.compile cannot replay estimator {who!r} ({type(est).__qualname__}, {est.extra_repr()}): "
                "it has has_update = True (it updates its own state in storch.backward(), in update_parameters) "
                "and replays_update is false, so a compiled step, which never runs storch's Python after tracing, "
                "cannot replay the update. Use it in an eager step, or make the update replayable: set "
                "replays_update = True (on the class, or on the instance for the options where it holds) and "
                "implement update_inputs(nodes) (the detached tensors the update needs from the step, computed with "
                "torch operations from the nodes' frames), update_from(inputs) (the update itself, from those "
                "tensors only; the base class's update_parameters is then update_from(update_inputs(nodes))) and "
                "state_tensors() ({name: tensor} of the state the components read); an update that differentiates "
                "the loss also needs loss_graph_values(loss, inputs) and backend=None. See "
                "docs/writing-an-estimator.md, section 1b, 'An update that storch.compile replays'")
    return (f"storch.compile cannot replay estimator {est.name!r} ({est.extra_repr()}): with these options it "
            "updates its own state (a trainable baseline module, sum_and_sample's buffer= of the best sequences) "
            "in storch.backward() by code that a compiled step cannot replay. Use it in an eager step, or drop the "
            "option that keeps that state (score's baseline module: baseline='leave_one_out'; sum_and_sample: no "
            "buffer=), or pick one that storch.compile replays (score's baseline='moving_average' or 'learned', "
            "gumbel_softmax's temperature schedule, relax/rebar/lax with backend=None; an estimator with "
            "replays_update)")


def _under_jacfwd() -> bool:
    """Whether a torch.func.vmap active now is one that jacfwd (or hessian) runs over forward-mode
    tangents: a vmap level with a jvp level inside it."""
    stack = torch._C._functorch.get_interpreter_stack() or []
    kinds = [i.key() for i in stack]
    t = torch._C._functorch.TransformType
    return any(a == t.Vmap and b == t.Jvp for a, b in zip(kinds, kinds[1:]))


#: the fix for a distribution's parameters padded or masked with -inf, as logits are masked (the Plackett-Luce scores
#: of a shorter ranking), whose log_prob meets -inf - -inf = NaN: shared by the refused draw (calls._call_failed)
#: and the NonFiniteCostError, eager (surrogate.finite) and compiled (compiled.finite, by PADDED_WITH_MINUS_INF)
PAD_WITH_FINITE = ("Pad or mask with a very low finite value instead (e.g. -1e4: its exp is 0, so a padded entry "
                   "changes no term and gets no gradient), or mask inside log_prob (docs/your-own-distribution.md)")

#: that cause, where a message cannot read the distributions (a compiled step's replay: compiled.finite)
PADDED_WITH_MINUS_INF = ("a parameter padded or masked with -inf, as logits are masked (a distribution of your own "
                         f"whose log_prob meets -inf - -inf, NaN there: Plackett-Luce scores). {PAD_WITH_FINITE}")


def _minus_inf_only(d, names: list[str]) -> bool:
    """Whether ``d``'s parameters ``names`` (from :func:`_nonfinite_parameters`) are non-finite only by -inf
    entries (deliberate padding or masking, not a divergence: no NaN, no +inf); for error messages only."""
    try:
        base = base_distribution(d)
        raws = [base.__dict__.get(name) for name in names]
        raws = [v.tensor if type(v) is PlateTensor else v for v in raws]
        return bool(raws) and all(isinstance(r, torch.Tensor) and not bool(
            (torch.isnan(r) | torch.isposinf(r)).any()) for r in raws)
    except Exception:  # noqa: BLE001  (only for a better message: never hide the original error)
        return False


def _nonfinite_parameters(d) -> list[str]:
    """Names of ``d``'s floating-point parameters that hold NaN or inf (for error messages only).

    ``-inf`` logits are a mask (a value of probability 0), not a divergence: an error of an estimator
    on masked logits is its own (it was reported as 'the logits diverged' in float16, where it was
    an overflow), so logits count only with NaN or +inf."""
    out = []
    try:
        base = base_distribution(d)
        for name in getattr(base, "arg_constraints", {}):
            v = base.__dict__.get(name)
            raw = v.tensor if type(v) is PlateTensor else v
            if isinstance(raw, torch.Tensor) and raw.is_floating_point() and raw.device.type != "meta":
                raw = raw.detach()
                bad = (torch.isnan(raw) | torch.isposinf(raw)) if name == "logits" else ~torch.isfinite(raw)
                if bool(bad.any()):
                    out.append(name)
    except Exception:  # noqa: BLE001  (only for a better message: never hide the original error)
        return []
    return out


def _could_enumerate(d: Distribution) -> bool:
    """Whether ``d`` is a user's class that could define ``enumerate_support`` (permutations, a grid): not one of
    torch's classes nor a subclass of one (a ``MyNormal(Normal)`` has a continuous support, so telling it to
    enumerate would be wrong), and with a support that is discrete or not declared."""
    bases = type(d).__mro__
    if any(b.__module__.startswith("torch.distributions") and b not in (Distribution, ExponentialFamily)
           for b in bases):
        return False
    try:
        support = d.support
    except NotImplementedError:
        return True
    return bool(getattr(support, "is_discrete", True))
