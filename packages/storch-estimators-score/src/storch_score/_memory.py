"""A memory set over a joint support too large to enumerate, and sampling outside it.

For a node whose n batch elements are independent finite variables (K values each), sum-and-sample
needs (1) its memory M, by default the k' most probable joint values, and (2) samples from the
remainder p(x | x ∉ M), without listing the K^n joint values:

- :func:`top_k_codes`: the k' most probable joint values by deterministic beam search. For
  independent variables the beam is exact: a prefix of one of the k' best joint values is itself
  among the k' best prefixes (else k' better prefixes, each completed with its suffix, would
  give k' better joint values).
- :func:`sample_outside`: exact ancestral sampling from p(x | x ∉ M) over the trie of M. With
  r_j(x<j) = Σ_{a ∈ M, a<j = x<j} p(a≥j) the memory's mass below a prefix, variable j takes value v
  with probability p_j(v) (1 - r_{j+1}(x<j v)) / (1 - r_j(x<j)).

Joint values are handled as codes: ``(k, P, n)`` indices into the support of each variable, with P
the flattened parent plates.
"""

from __future__ import annotations

import math

import torch

from torch.distributions import Bernoulli

from storch import Node, OptionError
from storch.extending import assume, is_tracing

from ._beam import _gumbel_like, _traced_finite
from ._support import dense, support_log_probs, support_table, to_work

__all__ = ["VariableTable", "top_k_codes", "codes_of", "first_occurrences", "sample_outside", "log1mexp"]


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, stable at both ends (Mächler, 2012); -inf at x = 0."""
    x = x.clamp_max(0.0)
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


class VariableTable:
    """The node's n independent variables: their support and per-variable log-probabilities.

    Attributes:
        support: ``(K, *event)`` the values of one variable.
        lp: ``(K, P, n)`` detached log p_j(v) for every value v, parent entry and variable j.
        lp_grad: the same with gradient (``grad=True``; a Bernoulli's with finite logits is ``lp``:
            :meth:`log_prob` differentiates its logits instead).
        logits: ``(P, n)`` a Bernoulli's finite logits with gradient (``grad=True``), else ``None``.
        all_possible: every value of every variable has a positive probability.
        n_possible: ``(P,)`` float64, the number of possible joint values of each parent entry (``None``
            when ``all_possible``: K^n).
        parents, own, event: the node's parent-plate, own-batch and event shapes.
    """

    def __init__(self, node: Node, grad: bool = False) -> None:
        d = node.distribution
        support = support_table(d)  # (K, *event); a OneHotCategorical's rows of eye(K) never built
        self.n_values = support.shape[0]
        self.event = tuple(d.event_shape)
        self.parents = tuple(d.batch_shape[:len(node.parents)])
        self.own = tuple(d.batch_shape[len(node.parents):])
        self.n = math.prod(self.own)
        self.p = math.prod(self.parents)
        self.support = support
        self.bernoulli = type(d) is Bernoulli  # support (0, 1): a value is its index
        grad = grad and torch.is_grad_enabled()
        if self.bernoulli:
            # log p of both values from the logits (no sample validation), not differentiated: choosing M
            # and sampling are not; log_prob differentiates the drawn values' log p from the logits
            logits = d.logits
            self.logits = (logits if logits.shape == (self.p, self.n) else logits.reshape(self.p, self.n)) if grad else None
            with torch.no_grad():
                logits = d.logits
                self.lp = torch.nn.functional.logsigmoid(torch.stack([-logits, logits])).reshape(2, self.p, self.n)
            self.lp_grad = self.lp
        else:
            with torch.set_grad_enabled(grad):  # one log_prob of the support: log_prob gathers from it
                lp = support_log_probs(d, support)
            self.lp_grad = lp.reshape(self.n_values, self.p, self.n)
            self.lp = self.lp_grad.detach()
        # every value of every variable; while storch.compile traces: assumed, and checked at every replayed call
        self.all_possible = self.lp.is_meta or _traced_finite(self.lp) or bool(torch.isfinite(self.lp).all())
        self.n_possible = None
        if self.all_possible:
            return
        if self.bernoulli and self.logits is not None:
            # an infinite logit: BCE would give inf - inf = NaN for its sure value; gather from the table
            logits = d.logits
            self.lp_grad = torch.nn.functional.logsigmoid(torch.stack([-logits, logits])).reshape(2, self.p, self.n)
            self.logits = None
        # values of probability exactly 0 are -inf (strict_support). A variable whose one possible value
        # is certain has log p = 0 there, exactly: torch clamps a probability of 1 to 1 - eps (log p =
        # -1.2e-7), which made the memory look as if it left mass outside (an entry whose only possible
        # joint value is in M then drew an impossible value with a positive weight: a NaN loss). Its
        # derivative is 0, as torch's (the clamp) and the true one (the probability is 1 whatever the
        # parameters, given the values that are exactly 0)
        finite = torch.isfinite(self.lp)
        counts = finite.sum(0)  # possible values of each variable, (P, n)
        sole = finite & (counts == 1).unsqueeze(0)
        self.lp_grad = torch.where(sole, torch.zeros((), dtype=self.lp_grad.dtype, device=self.lp_grad.device),
                                   self.lp_grad)
        self.lp = self.lp_grad.detach()
        # the number of possible joint values per parent entry, (P,) (float64: K^n may be large; inf is fine)
        self.n_possible = counts.to(torch.float64).prod(-1)

    def values(self, codes: torch.Tensor) -> torch.Tensor:
        """Joint values ``(k, *parents, *own, *event)`` of codes ``(k, P, n)``."""
        v = codes.to(self.support.dtype) if self.bernoulli else self.support[codes]
        return v.reshape((codes.shape[0],) + self.parents + self.own + self.event)

    def log_prob(self, codes: torch.Tensor) -> torch.Tensor:
        """Joint log-probabilities ``(k, *parents)`` of codes ``(k, P, n)``, with gradient if the table
        was made with ``grad=True``; float32 for a float16 / bfloat16 model (``to_work``: a sum of n log-probabilities
        in bfloat16 is rounded to units of 4 at n = 784)."""
        k = codes.shape[0]
        if self.bernoulli and self.logits is not None:
            # Σ_j log p_j(x_j) = -Σ_j BCE(l_j, x_j): 3 autograd nodes where the gather from the
            # log-sigmoid table takes 9 (the same values up to rounding)
            logits = to_work(self.logits)
            x = codes.to(logits.dtype)
            bce = torch.nn.functional.binary_cross_entropy_with_logits(logits.expand(x.shape), x, reduction="none")
            out = bce.sum(-1).neg()
            return out if out.shape == (k,) + self.parents else out.reshape((k,) + self.parents)
        lp = self.lp_grad
        out = to_work(lp.unsqueeze(0).expand((k,) + lp.shape).gather(1, codes.unsqueeze(1)).squeeze(1)).sum(-1)
        return out.reshape((k,) + self.parents)


def top_k_codes(lp: torch.Tensor, k: int) -> torch.Tensor:
    """The min(k, K^n) most probable joint values (deterministic beam search), most probable first.

    Args:
        lp: ``(K, P, n)`` per-variable log-probabilities.
    Returns:
        codes ``(k', P, n)``, distinct per parent entry.
    """
    n_cat, p, n = lp.shape
    if k == 1:  # the most probable joint value of independent variables: each one's most probable value
        if n_cat == 2:  # the first of equal ones, as argmax (whose reduction over dim 0 is slow on the CPU)
            return (lp[1] > lp[0]).long().unsqueeze(0)
        return lp.argmax(0).unsqueeze(0)
    phi = lp.new_zeros(1, p)  # log-probabilities of the beam's prefixes, (beam, P)
    codes = torch.empty(1, p, 0, dtype=torch.long, device=lp.device)  # (beam, P, j)
    for j in range(n):
        beam = phi.shape[0]
        cand = (phi.unsqueeze(-1) + lp[:, :, j].t().unsqueeze(0)).permute(1, 0, 2).reshape(p, beam * n_cat)
        top = cand.topk(min(k, beam * n_cat), dim=1)  # sorted: the most probable first
        parent, value = top.indices // n_cat, top.indices % n_cat  # (P, k)
        phi = top.values.t()
        prev = codes.permute(1, 0, 2).gather(1, parent.unsqueeze(-1).expand(p, parent.shape[1], j))
        codes = torch.cat([prev, value.unsqueeze(-1)], -1).permute(1, 0, 2)
    return codes


def codes_of(values: torch.Tensor, table: VariableTable, who: str) -> torch.Tensor:
    """Codes ``(k', P, n)`` of joint values ``(k', *own, *event)`` or ``(k', *parents, *own, *event)``."""
    per_value = table.own + table.event
    values = values.to(table.support.device)
    if tuple(values.shape[1:]) == per_value:
        values = values.reshape((values.shape[0],) + (1,) * len(table.parents) + per_value)
        values = values.expand((values.shape[0],) + table.parents + per_value)
    elif tuple(values.shape[1:]) != table.parents + per_value:
        raise OptionError(
            f"{who}: memory has shape {tuple(values.shape)}; expected (k', *own_batch, *event) = "
            f"(k', {', '.join(map(str, per_value))}) or with the parent plates {table.parents} after k'")
    k = values.shape[0]
    flat = values.reshape((k, table.p, table.n, -1)).to(table.support.dtype)  # (k', P, n, E)
    sup = dense(table.support).reshape(table.n_values, -1)  # (K, E)
    eq = (flat.unsqueeze(-2) == sup).all(-1)  # (k', P, n, K)
    check_in_support(eq.any(-1).all(), who)
    return eq.to(torch.uint8).argmax(-1)


def check_in_support(ok: torch.Tensor, who: str) -> None:
    """Raise where a memory value is not in the support (``ok``: a 0-dim bool); while storch.compile
    traces, the check is part of the program and runs at every replayed call."""
    message = f"{who}: a memory value is not in the support of the node's distribution"
    if is_tracing():
        assume(ok, message + " (checked by the step storch.compile traced; run it eagerly to see which)")
    elif not bool(ok):
        raise OptionError(message)


def first_occurrences(codes: torch.Tensor) -> torch.Tensor:
    """``(k', P)`` True where a code is not repeated earlier along dim 0 (repeats count once)."""
    k = codes.shape[0]
    same = (codes.unsqueeze(0) == codes.unsqueeze(1)).all(-1)  # (k', k', P)
    earlier = torch.ones(k, k, dtype=torch.bool, device=codes.device).tril(-1)
    return ~(same & earlier.unsqueeze(-1)).any(1)


def sample_outside(lp: torch.Tensor, codes: torch.Tensor, first: torch.Tensor, m: int) -> torch.Tensor:
    """``m`` independent draws from p(x | x ∉ M) (exact ancestral sampling over the trie of M).

    Where the remainder is empty (M holds every value of positive probability), draws from p
    instead; the caller gives those draws weight 0.

    Args:
        lp: ``(K, P, n)`` per-variable log-probabilities (detached).
        codes: ``(k', P, n)`` the memory M; ``first``: ``(k', P)``, the entries that count.
    Returns:
        codes ``(m, P, n)``.
    """
    n_cat, p, n = lp.shape
    k = codes.shape[0]
    if k == 1:
        return _rejection_one(lp, codes[0], m)
    if n == 1:
        return _outside_one_variable(lp, codes, first, m)
    if m * k * p * n_cat > _WALK_MAX_ENTRIES:  # the walk below makes (m, k', P, K) tensors
        raise OptionError(
            f"sum_and_sample: drawing {m} samples outside a memory of {k} values of {n} variables with "
            f"{n_cat} values each over {p} parent entries takes tensors of {m} x {k} x {p} x {n_cat} = "
            f"{m * k * p * n_cat:,} entries (more than {_WALK_MAX_ENTRIES:,}). Use fewer n_samples or "
            f"n_enumerate, one node per variable (a node of one variable needs no such tensor), a smaller "
            f"support, or an estimator that does not enumerate (e.g. score)")
    with torch.no_grad():
        lm = _memory_lp(lp, codes)  # (k', P, n)
        # suffix[a, :, j] = log p(a_j, ..., a_{n-1}); suffix[..., n] = 0
        suffix = torch.cat([lm.flip(-1).cumsum(-1).flip(-1), lm.new_zeros(k, p, 1)], -1)
        match = first.unsqueeze(0).expand(m, k, p).clone()  # memory entries that share the sample's prefix
        # where a sample's prefix matches no memory entry, p(v | prefix, x ∉ M) = p(v): draw those from p
        out = torch.distributions.Categorical(logits=lp.permute(1, 2, 0)).sample((m,))  # (m, P, n)
        tracing = is_tracing()
        # the possible continuations of a prefix of j + 1 variables: Π_{i>j} (possible values of variable i)
        # per entry, counted exactly (a sum of probabilities that should be 1 may round below it, and
        # log1mexp of that leaves a subtree that M covers a small positive mass: a draw there ends in M);
        # K^(n-j-1) when every value is possible (while storch.compile traces: assumed by VariableTable)
        if tracing or lp.is_meta:
            cont = None
            check = [n_cat ** (n - j - 1) <= k for j in range(n)]
        else:
            counts = torch.isfinite(lp).sum(0).to(torch.float64)  # (P, n)
            cont = torch.cat([counts.flip(-1).cumprod(-1).flip(-1)[:, 1:], counts.new_ones(p, 1)], -1)  # (P, n)
            check = (cont.amin(0) <= k).tolist()
        for j in range(n):
            if not tracing and not bool(match.any()):
                # every prefix left the memory's trie: the rest is drawn from p already (while
                # storch.compile traces, the loop runs on: with no match its draws are from p too)
                break
            onehot = torch.nn.functional.one_hot(codes[:, :, j], n_cat).bool()  # (k', P, K)
            below = match.unsqueeze(-1) & onehot.unsqueeze(0)  # (m, k', P, K)
            s = suffix[:, :, j + 1].unsqueeze(-1).expand(k, p, n_cat).unsqueeze(0)
            log_r = torch.where(below, s, torch.full_like(s, -math.inf)).logsumexp(1)  # (m, P, K)
            logits = lp[:, :, j].t().unsqueeze(0) + log1mexp(log_r)  # (m, P, K)
            if check[j]:  # the memory may cover every continuation of (prefix, v): no mass left
                limit = n_cat ** (n - j - 1) if cont is None else cont[:, j].unsqueeze(-1)  # (P, 1)
                logits = logits.masked_fill(below.sum(1) >= limit, -math.inf)
            dead = torch.isinf(logits).all(-1, keepdim=True) | torch.isnan(logits).any(-1, keepdim=True)
            logits = torch.where(dead, lp[:, :, j].t().unsqueeze(0).expand_as(logits), logits)
            v = torch.distributions.Categorical(logits=logits).sample()  # (m, P)
            out[:, :, j] = v
            match &= codes[:, :, j].unsqueeze(0) == v.unsqueeze(1)
    return out


# Entries of the (m, k', P, K) tensors of :func:`sample_outside`'s walk over the memory's trie, above
# which it is refused before allocating (50257 values, batch 64, 16 x 16: 3.3 G entries).
_WALK_MAX_ENTRIES = 1 << 28


def _outside_one_variable(lp: torch.Tensor, codes: torch.Tensor, first: torch.Tensor, m: int) -> torch.Tensor:
    """:func:`sample_outside` for one variable (n = 1): p with the memory's values masked out, in (P, K)
    (the trie walk would make (m, k', P, K) tensors). Where nothing is left, draws from p (weight 0)."""
    n_cat, p, _ = lp.shape
    with torch.no_grad():
        logits = lp[:, :, 0].t()  # (P, K)
        # counts of the memory entries that count at each value (a repeat of one that counts adds 0)
        hits = torch.zeros(p, n_cat, dtype=logits.dtype, device=lp.device)
        hits.scatter_add_(1, codes[:, :, 0].t(), first.t().to(logits.dtype))
        rest = logits.masked_fill(hits > 0, -math.inf)
        dead = torch.isinf(rest).all(-1, keepdim=True)
        rest = torch.where(dead, logits, rest)
        # m draws with replacement from (P, K) probabilities (Gumbel-max would make (m, P, K) noise)
        probs = torch.softmax(rest.float(), -1)  # (multinomial: no half on every device)
        return torch.multinomial(probs, m, replacement=True).t().unsqueeze(-1)  # (m, P, 1)


def _rejection_one(lp: torch.Tensor, a: torch.Tensor, m: int) -> torch.Tensor:
    """:func:`sample_outside` for a memory of one value ``a`` ``(P, n)``: one draw from p per sample,
    and where it hit ``a``, a draw of :func:`_sample_outside_one` instead.

    Exact: a draw from p that is not ``a`` is distributed as p(x | x != a), and the replacements
    are independent draws of that distribution. With p(a) small (a spread-out posterior) the
    second sampler rarely runs; it runs for all entries if one hits ``a``.
    """
    with torch.no_grad():
        x = _draw_each(lp.permute(1, 2, 0), m)  # (m, P, n)
        hit = (x == a.unsqueeze(0)).all(-1, keepdim=True)  # (m, P, 1)
        # while storch.compile traces, the replacement is always drawn (a program cannot branch on hit)
        if not lp.is_meta and (is_tracing() or bool(hit.any())):
            x = torch.where(hit, _sample_outside_one(lp, a, m), x)
        return x


def _sample_outside_one(lp: torch.Tensor, a: torch.Tensor, m: int) -> torch.Tensor:
    """:func:`sample_outside` for a memory of one value ``a`` ``(P, n)`` (``n_enumerate=1``), in a
    fixed number of ops instead of one pass per variable.

    A value x ≠ a first differs from a at some variable J: x_<J = a_<J, x_J ≠ a_J, and x_>J is
    free. Under p(x | x ≠ a), J = j has probability ∝ Π_{i<j} p_i(a_i) · (1 - p_j(a_j)); given J,
    x_J ~ p_J(v | v ≠ a_J) and x_>J ~ p. Drawing J, then x_J, then the rest is the same exact
    distribution as the ancestral sampling over the trie (for one value the trie is a path).
    """
    n_cat, p, n = lp.shape
    with torch.no_grad():
        lpn = lp.permute(1, 2, 0)  # (P, n, K)
        la = lpn.gather(-1, a.unsqueeze(-1)).squeeze(-1)  # log p_j(a_j), (P, n)
        before = torch.cat([la.new_zeros(p, 1), la[:, :-1].cumsum(-1)], -1)  # log Π_{i<j} p_i(a_i)
        w = before + log1mexp(la)  # log P(J = j, x ≠ a), (P, n)
        empty = torch.isinf(w).all(-1, keepdim=True)  # p(a) = 1: nothing outside; draw from p
        w = torch.where(empty, torch.zeros_like(w), w)
        out = _draw_each(lpn, m)  # (m, P, n): x_>J (and empty rows)
        j = _gumbel_max(w.expand(m, p, n))  # (m, P)
        at_j = lpn.unsqueeze(0).expand(m, p, n, n_cat).gather(
            2, j[..., None, None].expand(m, p, 1, n_cat)).squeeze(2)  # log p_J(v), (m, P, K)
        a_j = a.unsqueeze(0).expand(m, p, n).gather(2, j.unsqueeze(-1))  # (m, P, 1)
        v = _gumbel_max(at_j.scatter(-1, a_j, -math.inf))  # (m, P): v ≠ a_J
        pos = torch.arange(n, device=lp.device)
        x = torch.where(pos < j.unsqueeze(-1), a.unsqueeze(0), out)  # x_<J = a_<J
        x = x.scatter(2, j.unsqueeze(-1), v.unsqueeze(-1))
        return torch.where(empty.unsqueeze(0), out, x)


def _gumbel_max(logits: torch.Tensor) -> torch.Tensor:
    """One draw per row (last dim) of the categorical with these unnormalised log-probabilities
    (Gumbel-max; a -inf entry is never drawn unless every entry of its row is -inf)."""
    return (logits + _gumbel_like(logits)).max(-1).indices


def _draw_each(lpn: torch.Tensor, m: int) -> torch.Tensor:
    """``m`` independent draws ``(m, P, n)`` of each variable from its log-probabilities ``lpn``
    ``(P, n, K)``: two values by one uniform each (value 1 where u >= p(0)), more by Gumbel-max."""
    p, n, n_cat = lpn.shape
    if n_cat == 2:
        u = torch.rand((m, p, n), dtype=lpn.dtype, device=lpn.device)
        return u.ge_(lpn[..., 0].exp()).long()
    return _gumbel_max(lpn.expand(m, p, n, n_cat))


def _memory_lp(lp: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """``(k', P, n)`` log p_j(a_j) of memory codes ``(k', P, n)``."""
    n_cat, p, n = lp.shape
    return lp.unsqueeze(0).expand(codes.shape[0], n_cat, p, n).gather(1, codes.unsqueeze(1)).squeeze(1)
