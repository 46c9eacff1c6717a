"""Small distributions written outside torch, as a user writes them, for the tests of what storch needs from
one (docs/your-own-distribution.md): a Plackett-Luce over permutations, and broken variants of it; a Normal with a
constructor argument outside arg_constraints and a categorical over an integer_interval without enumerate_support."""

import itertools
import math

import torch
from torch.distributions import Categorical, Distribution, constraints


class Permutations(constraints.Constraint):
    event_dim = 1
    is_discrete = True

    def check(self, value):
        return (value.sort(-1).values == torch.arange(value.shape[-1], device=value.device)).all(-1)


class PlackettLuce(Distribution):
    """Permutations of n items, ``value[i]`` the item at rank i; batch_shape ``logits.shape[:-1]``,
    event_shape ``(n,)``."""

    arg_constraints = {"logits": constraints.real_vector}
    has_enumerate_support = True
    support = Permutations()

    def __init__(self, logits, validate_args=None):
        self.logits = logits
        super().__init__(logits.shape[:-1], logits.shape[-1:], validate_args=validate_args)

    def sample(self, sample_shape=torch.Size()):
        shape = self._extended_shape(sample_shape)
        with torch.no_grad():
            u = torch.rand(shape, dtype=self.logits.dtype, device=self.logits.device)
            return (self.logits.expand(shape) - torch.log(-torch.log(u))).argsort(-1, descending=True)

    def _terms(self, value):
        """log p of each rank given the ranks before it."""
        ranked = self.logits.expand(value.shape[:-1] + self.logits.shape[-1:]).gather(-1, value)
        n = ranked.shape[-1]
        tail = torch.ones(n, n, dtype=torch.bool, device=ranked.device).triu()  # row i: ranks i..n-1
        # as in the docs: a masked logsumexp, whose Hessian is finite where torch.logcumsumexp's is NaN
        return ranked - ranked.unsqueeze(-2).masked_fill(~tail, float("-inf")).logsumexp(-1)

    def log_prob(self, value):
        return self._terms(value).sum(-1)

    def enumerate_support(self, expand=True):
        n = self.logits.shape[-1]
        perms = torch.tensor(list(itertools.permutations(range(n))), device=self.logits.device)
        perms = perms.view((perms.shape[0],) + (1,) * len(self.batch_shape) + (n,))
        return perms.expand((perms.shape[0],) + self.batch_shape + (n,)) if expand else perms


class NoEnumeration(PlackettLuce):
    """Declares has_enumerate_support (inherited) but does not implement enumerate_support."""

    def enumerate_support(self, expand=True):
        raise NotImplementedError


class LogProbPerRank(PlackettLuce):
    """log_prob returns the per-rank terms, shape batch + event, not summed over the event."""

    def log_prob(self, value):
        return self._terms(value)


class EventAsBatch(PlackettLuce):
    """Declares the event dim as a batch dim (batch_shape ``logits.shape``, event_shape ``()``), while
    enumerate_support lays out whole permutations: shapes inconsistent with each other."""

    def __init__(self, logits, validate_args=None):
        self.logits = logits
        Distribution.__init__(self, logits.shape, torch.Size(), validate_args=validate_args)

    def enumerate_support(self, expand=True):
        n = self.logits.shape[-1]
        perms = torch.tensor(list(itertools.permutations(range(n))), device=self.logits.device)
        perms = perms.view((perms.shape[0],) + (1,) * (len(self.batch_shape) - 1) + (n,))
        return perms.expand((perms.shape[0],) + self.batch_shape) if expand else perms


class UserNormal(Distribution):
    """A class written as docs/your-own-distribution.md says: arg_constraints, each parameter kept as given,
    a validate_args keyword, and a constructor argument outside arg_constraints (``scale``) kept in an attribute."""

    arg_constraints = {"loc": constraints.real}
    support = constraints.real

    def __init__(self, loc, scale=1.0, validate_args=None):
        self.loc, self.scale = loc, scale
        super().__init__(batch_shape=loc.shape, validate_args=validate_args)

    def sample(self, sample_shape=torch.Size()):
        shape = self._extended_shape(sample_shape)
        with torch.no_grad():
            return self.loc.expand(shape) + self.scale * torch.randn(shape, dtype=self.loc.dtype)

    def log_prob(self, x):
        return -0.5 * ((x - self.loc) / self.scale) ** 2 - math.log(self.scale) - 0.5 * math.log(2 * math.pi)


class UserCategorical(Distribution):
    """A user's class over {0, 1, 2} written without enumerate_support: its support lists its values."""

    arg_constraints = {"logits": constraints.real_vector}
    support = constraints.integer_interval(0, 2)

    def __init__(self, logits, validate_args=None):
        self.logits = logits
        super().__init__(batch_shape=logits.shape[:-1], validate_args=validate_args)

    def sample(self, sample_shape=torch.Size()):
        with torch.no_grad():
            return Categorical(logits=self.logits).sample(sample_shape)

    def log_prob(self, x):
        lp = self.logits.log_softmax(-1)
        lp, x = torch.broadcast_tensors(lp, x.long().unsqueeze(-1))
        return lp.gather(-1, x[..., :1]).squeeze(-1)
