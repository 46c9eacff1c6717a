"""Per-graph random number generators: reproducible sampling when several threads train at once.

torch's global generator is shared by all threads, so two threads that sample at the same time
interleave their draws and neither run is reproducible. In ``with storch.Graph(generator=g):``
every random draw storch makes uses ``g``: the estimators' proposals (``Distribution.sample`` and
``rsample``, the noise of relaxations: everything an estimator call draws) through a
:class:`torch.overrides.TorchFunctionMode` that is thread-local and active only during the
estimator call (a mode routes every torch call through Python, so it is not kept on for the
whole block: that cost ~0.2 ms per toy step), and a learned control variate's lazily built
network. Your own code in the block passes the generator itself:
``torch.randn(shape, generator=storch.current_generator())``. Nothing in torch is patched.

Functions without a ``generator`` argument (``torch.nn.functional.dropout``, for example) keep
using the global generator, and so do draws inside other overridable torch functions (a mode
sees the outer call only); ``RANDOM_FUNCTIONS`` lists what is covered (torch's samplers,
tensor ``*_`` samplers, ``torch.nn.init``).
"""

from __future__ import annotations

from typing import Any, ContextManager, Optional

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["GeneratorMode", "drawing_with", "current_generator", "RANDOM_FUNCTIONS"]

_T = torch.Tensor
# torch functions and tensor methods that draw random numbers and accept `generator=`
RANDOM_FUNCTIONS = frozenset(f for f in (
    torch.bernoulli, torch.multinomial, torch.normal, torch.poisson, torch.rand, torch.randn,
    torch.randint, torch.rand_like, torch.randn_like, torch.randint_like, torch.randperm,
    torch._standard_gamma, torch._sample_dirichlet, torch.binomial,
    _T.bernoulli, _T.bernoulli_, _T.uniform_, _T.normal_, _T.exponential_, _T.geometric_,
    _T.cauchy_, _T.log_normal_, _T.random_, _T.multinomial,
    # initialisers are torch functions themselves (the mode does not see the draws inside them)
    torch.nn.init.uniform_, torch.nn.init.normal_, torch.nn.init.trunc_normal_, torch.nn.init.kaiming_uniform_,
    torch.nn.init.kaiming_normal_, torch.nn.init.xavier_uniform_, torch.nn.init.xavier_normal_,
    torch.nn.init.orthogonal_, torch.nn.init.sparse_,
) if f is not None)

_stack_local = __import__("threading").local()


class GeneratorMode(TorchFunctionMode):
    """Pass ``generator`` to every random torch function called (in this thread) while active."""

    def __init__(self, generator: torch.Generator) -> None:
        super().__init__()
        self.generator = generator

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in RANDOM_FUNCTIONS and kwargs.get("generator") is None:
            kwargs = {**kwargs, "generator": self.generator}
        return func(*args, **kwargs)


class _Nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return None


_NOTHING = _Nothing()


def drawing_with(generator: Optional[torch.Generator]) -> ContextManager[Any]:
    """Context in which storch's own random draws use ``generator`` (nothing if it is None)."""
    return _NOTHING if generator is None else GeneratorMode(generator)


def push_generator(generator: torch.Generator) -> None:
    stack = getattr(_stack_local, "generators", None)
    if stack is None:
        stack = _stack_local.generators = []
    stack.append(generator)


def pop_generator() -> None:
    _stack_local.generators.pop()


def current_generator() -> Optional[torch.Generator]:
    """The generator of the innermost ``storch.Graph(generator=...)`` block of this thread, or None.

    Pass it to your own random draws inside the block to make them reproducible per thread:
    ``torch.rand(shape, generator=storch.current_generator())``.
    """
    stack = getattr(_stack_local, "generators", None)
    return stack[-1] if stack else None
