"""An estimator's own optimizer over its learned parts (RELAX's η, λ and network, NVIL's heads): built over
every parameter of the part, frozen ones included, and saved with the names of its parameters, so that a
checkpoint loads whatever is frozen when it is saved or loaded (re-exported by ``storch.extending``)."""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from ..errors import StorchError

__all__ = ["own_optimizer", "own_optimizer_state", "load_own_optimizer", "hide_frozen_grads", "state_dtype"]


def _held(optimizer: torch.optim.Optimizer) -> list:
    return [p for group in optimizer.param_groups for p in group["params"]]


def own_optimizer(optimizer: Optional[torch.optim.Optimizer], module: torch.nn.Module,
                  lr: float) -> torch.optim.Optimizer:
    """``optimizer`` if it holds exactly ``module.parameters()``, else a new Adam over them; either steps with
    ``lr``, the estimator's option (``est.lr = ...`` set after construction applies from the next update).

    Every parameter, frozen ones included: ``requires_grad`` changes (a frozen model, a frozen η) then
    change neither the optimizer nor the size of its saved state, and a frozen parameter is not stepped
    (:func:`hide_frozen_grads`). A new one (parameters built since: NVIL's head for a new cost name, or
    replaced) keeps the moments and hyperparameters of the parameters the old one held.
    """
    params = list(module.parameters())
    if optimizer is not None:
        held = _held(optimizer)
        if len(held) == len(params) and all(a is b for a, b in zip(held, params)):
            for group in optimizer.param_groups:
                group["lr"] = lr
            return optimizer
    new = torch.optim.Adam(params, lr=lr)
    if optimizer is not None:
        new.param_groups[0].update({k: v for k, v in optimizer.param_groups[0].items() if k not in ("params", "lr")})
        for p in params:
            if p in optimizer.state:
                new.state[p] = optimizer.state[p]
    return new


def hide_frozen_grads(optimizer: torch.optim.Optimizer, trainable: Sequence[torch.Tensor]) -> Callable[[], None]:
    """Set ``.grad = None`` on the parameters ``optimizer`` holds that are not in ``trainable`` (frozen), so
    that its next ``step()`` leaves them and their moments alone (Adam skips a parameter without a gradient;
    a frozen one may keep a stale ``.grad`` from before it was frozen). Returns the function that gives
    them their ``.grad`` back, to call after the step."""
    ids = {id(p) for p in trainable}
    frozen = [p for p in _held(optimizer) if id(p) not in ids]
    grads = [p.grad for p in frozen]
    for p in frozen:
        p.grad = None

    def restore() -> None:
        for p, g in zip(frozen, grads):
            p.grad = g
    return restore


def own_optimizer_state(optimizer: Optional[torch.optim.Optimizer], module: torch.nn.Module) -> dict:
    """For ``get_extra_state``: ``{"optimizer": optimizer.state_dict(), "optimizer_params": [...]}``, the
    names (in ``module.named_parameters()``) of the parameters it holds, in its order (both ``None``
    without an optimizer). Merge it into the estimator's extra state."""
    if optimizer is None:
        return {"optimizer": None, "optimizer_params": None}
    names = {id(p): n for n, p in module.named_parameters()}
    return {"optimizer": optimizer.state_dict(), "optimizer_params": [names.get(id(p)) for p in _held(optimizer)]}


def load_own_optimizer(saved: dict, module: torch.nn.Module, lr: float, who: str) -> Optional[torch.optim.Optimizer]:
    """For a ``load_state_dict`` post-hook (after a lazily built part has loaded): an Adam over every
    parameter of ``module`` (:func:`own_optimizer`) with the optimizer state of the extra state ``saved``
    (:func:`own_optimizer_state`'s keys), each parameter's moments matched by name, whatever
    ``requires_grad`` was at saving or is now; ``None`` where ``saved`` holds no optimizer.

    A checkpoint from before the names were saved (no ``"optimizer_params"``): its optimizer held the
    trainable parameters in ``module.parameters()`` order, all of them unless some were frozen when it was
    saved (then those frozen now are taken to be those). Moments of a parameter ``module`` no longer has
    are dropped. The learning rate is ``lr`` (the estimator's own option), not the saved one. ``who`` names the
    estimator in the error.
    """
    state, names = saved.get("optimizer"), saved.get("optimizer_params")
    if state is None:
        return None
    current = dict(module.named_parameters())
    indices = [i for group in state["param_groups"] for i in group["params"]]
    if names is None:
        trainable = [n for n, p in current.items() if p.requires_grad]
        if len(indices) == len(current):
            names = list(current)
        elif len(indices) == len(trainable):
            names = trainable
        else:
            raise StorchError(
                f"{who}: the checkpoint's optimizer state (saved by an older storch, without parameter names) holds "
                f"{len(indices)} parameters, and the estimator has {len(current)} ({len(trainable)} trainable), so "
                "its moments cannot be matched to them. Load it with the parameters frozen as they were when it "
                "was saved, or drop the estimator's optimizer state (set state_dict()[prefix + '_extra_state']"
                "['optimizer'] = None: its Adam then starts afresh)")
    optimizer = torch.optim.Adam(list(current.values()), lr=lr)
    position = {n: i for i, n in enumerate(current)}
    group = {k: v for k, v in state["param_groups"][0].items() if k not in ("params", "param_names")}
    # the estimator's own lr= wins over the saved one: resuming with the same code gives the same lr, and an
    # lr changed on purpose (a fine-tuning run) is what the user asked for; torch's load_state_dict would
    # restore the saved lr silently (docs/reliability.md: lr may change)
    group["lr"] = lr
    group["params"] = list(range(len(current)))
    moments = {position[n]: state["state"][i] for i, n in zip(indices, names) if i in state["state"] and n in position}
    optimizer.load_state_dict({"state": moments, "param_groups": [group]})
    # torch's load_state_dict casts the moments to each parameter's dtype: for a float16 parameter Adam's
    # second moment (~1e-12) underflows to 0 and the first step after loading is ~lr·m/eps. The estimators
    # keep the state of reduced-precision parameters in float32 (extending.optimizer_step): put the saved
    # values back as they were saved (float32 when the saving run kept them so)
    params = list(current.values())
    for i, saved_state in moments.items():
        p = params[i]
        dtype = state_dtype(p)
        if dtype != p.dtype:
            loaded = optimizer.state[p]
            for key, value in saved_state.items():
                if key != "step" and isinstance(value, torch.Tensor) and value.is_floating_point():
                    loaded[key] = value.to(dtype=dtype, device=p.device)
    return optimizer


def state_dtype(p: torch.Tensor) -> torch.dtype:
    """The dtype an estimator's own optimizer keeps its state and does its arithmetic in for parameter ``p``:
    ``p``'s, but at least float32 (``storch.extending.optimizer_step``)."""
    if p.dtype.is_floating_point and torch.finfo(p.dtype).bits < 32:
        return torch.promote_types(p.dtype, torch.float32)
    return p.dtype
