"""A trace's key: the arguments' signature (shapes, strides, dtypes, devices, ``requires_grad``, the other
arguments' values, grad mode, which tensor arguments are one object) and the Python state a trace fixes (the
``training`` flags of the modules the step reaches, the estimators' options, the parameters' ``requires_grad``)."""

from __future__ import annotations

import operator
import weakref

import torch

from ..errors import StorchError
from ..estimators.base import Estimator
from ..plates.tensor import PlateTensor


def _signature(leaves: list, spec, state: tuple = ()) -> tuple:
    key = [spec, torch.is_grad_enabled(), state]
    tensors = []
    for a in leaves:
        if isinstance(a, torch.Tensor):
            if type(a) is PlateTensor:
                raise StorchError(
                    "a compiled step takes plain tensors: call storch.denote_independent inside the step, "
                    "not before it (plate tensors belong to one graph)")
            tensors.append(a)
            key.append((a.shape, a.stride(), a.dtype, a.device, a.requires_grad))  # inductor checks strides
        else:
            try:
                hash(a)
            except TypeError:
                raise StorchError(
                    f"a compiled step's non-tensor arguments must be hashable (they select the trace); got a "
                    f"{type(a).__name__}") from None
            key.append((type(a), a))
    key.extend(_aliasing(tensors))
    return tuple(key), tensors


def _aliasing(tensors) -> tuple:
    """A key entry where some tensor arguments are one tensor object (``()`` where none are): for each argument, the
    position of its first occurrence. A trace made
    with one tensor passed twice (``step(theta, zeros, zeros)``) holds a single input for both (make_fx follows
    tensors by identity), so a later call with two different tensors computed with one of them for both
    (silently: a masked argument's -inf reached the loss as NaN; found by review): such calls are traced apart."""
    if len(set(map(id, tensors))) == len(tensors):
        return ()
    first: dict = {}
    return (tuple(first.setdefault(id(t), i) for i, t in enumerate(tensors)),)


def _watched(roots: list) -> tuple:
    """The modules among ``roots`` and their submodules (their ``training`` flag: read by dropout, batch norm,
    RNNs, a user's modules, the step itself (``training=model.training``) and hooks (spectral_norm's), so every
    module's), the estimators (their options), and the parameters (their ``requires_grad``: freezing and
    unfreezing, e.g. a GAN's alternating steps, selects a trace per state instead of tracing again at each
    switch; :func:`_guard` still checks the captured ones)."""
    modules, estimators, seen = [], [], set()
    for root in roots:
        for m in root.modules():
            if id(m) in seen:
                continue
            seen.add(id(m))
            if isinstance(m, Estimator):
                estimators.append(m)  # estimators do not read training (docs/reliability.md): their options
            else:
                modules.append(m)
    parameters = {id(p): p for root in roots for p in root.parameters()}
    return tuple(modules), tuple(estimators), tuple(parameters.values())


_training = operator.attrgetter("training")


_options_key = operator.attrgetter("_options_key")


_requires_grad = operator.attrgetter("requires_grad")


def _python_state_of(watch: tuple) -> tuple:
    # (map with attribute getters: ~0.05 us a module or parameter)
    modules, estimators, parameters = watch
    return (*map(_training, modules), *map(_options_key, estimators), *map(_requires_grad, parameters))


_WATCHED_ARGUMENTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # module argument -> _watched([it])


def _watched_argument(module: torch.nn.Module) -> tuple:
    watch = _WATCHED_ARGUMENTS.get(module)
    if watch is None:
        watch = _WATCHED_ARGUMENTS[module] = _watched([module])
    return watch
