"""Stochastic beam search: Gumbel-top-k over a joint support too large to enumerate.

For a node whose n batch elements are independent finite variables (K values each), the K^n
joint values are never listed: the ordered sample without replacement of size k is drawn
variable by variable with the top-down truncated Gumbels of Kool et al. (2019), which gives
exactly the distribution of Gumbel-top-k over the joint (their Theorem 1), in O(n k K).
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch.distributions import Bernoulli

from storch import Node
from storch.extending import assume, is_tracing, table_cache

from ._support import support_log_probs, support_table, to_work

__all__ = ["stochastic_beam_search", "sample_without_replacement", "order_gumbels", "beam_step", "top_possible"]


def _gumbel_like(x: torch.Tensor) -> torch.Tensor:
    """Standard Gumbels of ``x``'s shape: -log(-log U), U uniform on [tiny, 1) (torch's CPU
    ``exponential_`` costs ~6x a ``rand_like``; in place: no further tensors)."""
    return torch.rand_like(x).clamp_min_(torch.finfo(x.dtype).tiny).log_().neg_().log_().neg_()


def _placeholder(x: torch.Tensor) -> float:
    """A finite stand-in for the -inf score of an impossible candidate in ``x``'s dtype, put back to -inf
    after :func:`_truncated`: -1e30, or half the dtype's lowest value where that is higher (float16:
    -1e30 does not convert, and in ``_truncated`` T - G with G = -65504 overflows to inf for T > 16)."""
    return max(-1e30, torch.finfo(x.dtype).min / 2)


def _truncated(phi_g: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
    """Gumbels ``phi_g`` (last dim: siblings) conditioned on their maximum being ``bound``.

    G̃ = -log(exp(-T) - exp(-Z) + exp(-G)) with Z = max G, in the stable form of Kool et al.
    (2019), appendix B: v = T - G + log(1 - exp(G - Z)), G̃ = T - max(v, 0) - log1p(exp(-|v|)).
    """
    z = phi_g.amax(-1, keepdim=True)
    t = bound.unsqueeze(-1)
    # log(1 - exp(G - Z)) with G - Z <= 0; -inf where G = Z (then v = -inf and G̃ = T). It is added
    # to O(1) values, so its absolute error matters: log(-expm1(.)) alone is accurate to ~1e-16
    # absolute for every G - Z <= 0 (the two-branch log1mexp is for relative accuracy near 0)
    v = (phi_g - z).expm1_().neg_().log_().add_(t).sub_(phi_g)
    # max(v, 0) + log1p(exp(-|v|)) is softplus(v): one op (exact to float precision)
    return t - F.softplus(v, threshold=50.0)


# (the cause is named: an infinite logit is the usual one, and "probability 0" alone did not say so)
_TRACED = ("storch.compile traces this step for distributions whose every value is possible (the sampler's "
           "value-independent path), and this call (the first one too) met a value of probability 0 (a -inf "
           "log-probability): "
           "an infinite logit (a Categorical's -inf logit on a masked category, a Bernoulli's or Binomial's -inf "
           "or +inf logit on a masked or pinned bit) or a probability of exactly 0. Which values are possible "
           "decides how many distinct samples there are, which a traced program cannot depend on. Run this step "
           "eagerly (without storch.compile), where the sampler pads such samples")


def _traced_finite(values: torch.Tensor) -> bool:
    """While ``storch.compile`` traces: take the path for finite ``values``, and check at every
    replayed call that they are (an error that says what to do, never a sample with an impossible
    value). Eagerly ``False``, at no cost: the caller checks the values itself."""
    if not is_tracing():
        return False
    assume(torch.isfinite(values).all(), _TRACED)
    return True


def top_possible(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The k largest ``scores`` along the last dim, never an impossible (``-inf``) entry.

    m = min(k, the largest number of finite scores of any row): where the support is smaller than
    k the sample is smaller. A row with fewer than m finite scores gets padding slots that repeat
    its best entry (a value the model can produce) with score -inf; the caller gives them
    probability 0 (weight 0, gradient function 0).

    Returns:
        ``(indices, values, pad)``, each ``(*rows, m)``; ``values`` is ``-inf`` on padding; ``pad``
        is ``None`` when every score is finite (the common case: no padding, no extra work).
    """
    finite = torch.isfinite(scores)
    if scores.is_meta or _traced_finite(scores) or bool(finite.all()):  # meta: no values, every score counts as finite
        top = scores.topk(min(k, scores.shape[-1]), dim=-1)  # sorted: the order of the sample
        return top.indices, top.values, None
    n_ok = int(finite.sum(-1).max()) if finite.numel() else 0
    m = max(1, min(k, n_ok))
    top = scores.topk(m, dim=-1)  # sorted: the order of the sample
    pad = ~torch.isfinite(top.values)
    indices = torch.where(pad, top.indices[..., :1].expand_as(top.indices), top.indices)
    values = top.values.masked_fill(pad, -math.inf)
    return indices, values, pad



def _max_candidates(rows: int) -> int:
    """Children per beam row and step: a step extends the beam by m variables at once (K^m children
    per prefix) while beam · K^m stays within this. Fewer, larger steps cost fewer torch calls (what
    a small batch pays for), more candidates cost more elementwise work and top-k (what a large
    batch pays for): about 4096 candidates per step over all rows, between 32 and 512 per row."""
    return max(32, min(512, 1 << max(0, (4096 // max(rows, 1)).bit_length() - 1)))


@functools.lru_cache(maxsize=None)
def _chunk_plan(n: int, n_cat: int, k: int, max_candidates: int) -> tuple:
    """How many variables each step of the beam search takes: the first step (beam 1) as many as give
    at most ``max_candidates`` children, later ones (beam min(k, joint values so far)) as many as
    keep beam · K^m within it; at least one variable per step."""
    sizes, beam, done = [], 1, 0
    while done < n:
        m = 1
        while done + m < n and beam * n_cat ** (m + 1) <= max_candidates:
            m += 1
        sizes.append(m)
        done += m
        beam = min(k, beam * n_cat ** m)
    return tuple(sizes)


# The dense ``onehot`` of :func:`_tables_on` has (n K) x Σ_c K^m_c entries: with a large vocabulary
# (one variable per chunk) that is (n K)^2 (20 tokens of 1000 words: 1.6 GB in float32). Above this
# many entries it is not made: the chunks' log-probabilities are gathered instead (O(P Σ_c K^m_c m),
# the same values), as they are where a value is impossible.
_ONEHOT_MAX_ENTRIES = 1 << 22
# Bytes of ``onehot`` tables kept for the process (per key: shape, device, dtype); past this budget a
# step makes its own, which are freed with it.
_CACHE_BYTES = 1 << 28


@table_cache(maxsize=256)  # (tensors: lru_cache would keep one made inside a torch.func level)
def _chunk_tables(n_cat: int, sizes: tuple) -> tuple:
    """Index tables of the chunks' joint values (chunk c: m_c variables, K^m_c joint values, listed
    row-major: the last variable varies fastest).

    Returns:
        ``(offsets, values, var, columns)``: ``offsets[c]``, the first row of chunk c in
        the tables below; ``values`` (Σ_c K^m_c, max m): each joint value's value of each variable of
        its chunk (padded with 0); ``var`` (same shape): the variable each entry reads (padding reads
        variable n); ``columns`` (n,): where variable j is in (steps, max m) flattened.
    """
    n = sum(sizes)
    width = max(sizes)
    offsets, value_rows, var_rows, columns, start, row = [], [], [], [], 0, 0
    for c, m in enumerate(sizes):
        vals = torch.tensor(list(itertools.product(range(n_cat), repeat=m)), dtype=torch.long).reshape(-1, m)
        pad = width - m
        offsets.append(row)
        value_rows.append(torch.cat([vals, torch.zeros((vals.shape[0], pad), dtype=torch.long)], 1))
        var = torch.arange(start, start + m).expand(vals.shape[0], m)
        var_rows.append(torch.cat([var, torch.full((vals.shape[0], pad), n)], 1))
        columns += [c * width + j for j in range(m)]
        start += m
        row += vals.shape[0]
    return tuple(offsets), torch.cat(value_rows), torch.cat(var_rows), torch.tensor(columns)


_DEVICE_TABLES: dict = {}


def _tables_on(n_cat: int, sizes: tuple, device: torch.device, dtype: torch.dtype) -> tuple:
    """:func:`_chunk_tables` on ``device``, with ``onehot`` (n K, Σ_c K^m_c) in ``dtype``: 1 where a joint
    value sets a variable to a value, so that (P, n K) log-probabilities @ onehot are the chunks' joint
    log-probabilities; ``None`` above ``_ONEHOT_MAX_ENTRIES`` entries. Made once per device while the
    kept tables stay within ``_CACHE_BYTES``.

    Returns:
        ``(offsets, values, var, onehot, columns)``.
    """
    key = (n_cat, sizes, device, dtype)
    out = _DEVICE_TABLES.get(key)
    if out is None:
        with torch.inference_mode(False):  # normal tensors, also when first made under inference mode (see table_cache)
            offsets, values, var, columns = _chunk_tables(n_cat, sizes)
            values, var, columns = values.to(device), var.to(device), columns.to(device)
            n, rows = sum(sizes), values.shape[0]
            onehot = None
            if n * n_cat * rows <= _ONEHOT_MAX_ENTRIES:  # (variable n, the padding, reads row n K: dropped)
                onehot = torch.zeros(n * n_cat + n_cat, rows, dtype=dtype, device=device)
                onehot[var * n_cat + values, torch.arange(rows, device=device).unsqueeze(1).expand_as(var)] = 1.0
                onehot = onehot[:n * n_cat]
            out = (offsets, values, var, onehot, columns)
            with torch._C.DisableTorchFunction():  # (storch.compile's trace refuses a user's storage read: not this)
                held = sum(t[3].untyped_storage().nbytes() for t in _DEVICE_TABLES.values() if t[3] is not None)
                size = 0 if onehot is None else onehot.untyped_storage().nbytes()
            if (torch._C._functorch.maybe_current_level() is None and len(_DEVICE_TABLES) < 256
                    and held + size <= _CACHE_BYTES):  # (see table_cache)
                _DEVICE_TABLES[key] = out
    return out


def stochastic_beam_search(node: Node, k: int, max_candidates: Optional[int] = None
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.dtype]:
    """An ordered sample without replacement of ``k`` joint values of the node.

    Stochastic beam search over the tree whose level c fixes the variables of chunk c (m_c variables,
    K^m_c children per prefix; :func:`_chunk_plan`). On any tree whose leaves are the joint values and
    whose prefix log-probabilities add up along the path, the top-down truncated Gumbels give
    exactly Gumbel-top-k over the leaves (Kool et al., 2019, Theorem 1), so the chunking changes
    the number of steps (20 Bernoullis, k = 8, batch 1: 3 steps instead of 20), not the
    distribution. The first step needs no truncation: the maximum of the root's children is already
    a Gumbel at the root's log-probability 0. All Gumbels are drawn at once.

    Args:
        max_candidates: children per beam row and step (default :func:`_max_candidates` of the
            number of rows; 2 (K = 2) gives one variable per step).

    Returns:
        ``(values, logp, g, dtype)``: ``values`` of shape ``(k, *parents, *own_batch, *event)``, the joint
        log-probabilities ``logp`` of shape ``(k, *parents)``, carrying gradient (float32 for a float16 /
        bfloat16 model, ``to_work``), the perturbed log-probabilities ``g`` (their Gumbels), which a
        partition's next step conditions on, and the dtype of the model's own log-probabilities (``logp``'s
        before ``to_work``: the dtype the estimator returns l and w in).
    """
    d = node.distribution
    support = support_table(d)  # (K, *event); a OneHotCategorical's rows of eye(K) never built
    n_cat = support.shape[0]
    event = tuple(d.event_shape)
    parents = tuple(d.batch_shape[:len(node.parents)])
    own = tuple(d.batch_shape[len(node.parents):])
    n = math.prod(own)
    p = math.prod(parents)
    # log p of every value of every variable: (K, P, n), with gradient
    lp = support_log_probs(d, support).reshape(n_cat, p, n)
    dev = lp.device
    with torch.no_grad():  # sampling is not differentiated
        if n == 0:
            choices = torch.empty(1, p, 0, dtype=torch.long, device=dev)
            phi, g, padded = lp.new_zeros(p, 1), _gumbel_like(lp.new_zeros(p, 1)), False
        else:
            # (float32 for a float16 / bfloat16 model, to_work: Gumbels of 3 digits tie, and a prefix's score
            # is a sum of up to n log-probabilities)
            choices, phi, g, padded = _search(to_work(lp.detach()), k, max_candidates or _max_candidates(p))
        g = g.t()  # (m, P)
    m = choices.shape[0]
    # joint log-probability of each drawn value, with gradient: Σ_j log p_j(choice_j); -inf on padding
    # (an entry with fewer than m possible joint values repeats a possible one there: weight 0)
    # (summed in float32 for a float16 / bfloat16 model, to_work: 784 terms of ~-1 in bfloat16 are rounded to
    # units of 4, so p(s), and the set's weights, were off by factors up to e^2)
    logp = to_work(lp.unsqueeze(0).expand(m, n_cat, p, n).gather(1, choices.unsqueeze(1)).squeeze(1)).sum(-1)
    if padded:
        logp = logp.masked_fill(torch.isneginf(phi.t()), -math.inf)  # phi: (P, m)
    # contiguous in (m, P, n) order (``choices`` is a transposed view; an indexed result follows its layout)
    values = support[choices.contiguous()]  # (m, P, n, *event)
    return (values.reshape((m,) + parents + own + event), logp.reshape((m,) + parents), g.reshape((m,) + parents),
            lp.dtype)


def sample_without_replacement(node: Node, k: int, draws: Optional[int] = None
                               ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], torch.dtype]:
    """An ordered sample without replacement of ``k`` joint values of the node: the same
    distribution as :func:`stochastic_beam_search` (Gumbel-top-k over the joint), drawn faster.

    The distinct values of an i.i.d. sequence X_1, X_2, ... ~ p, in the order of their first
    appearance, are an ordered sample without replacement (successive sampling: given the values
    seen so far, the next new value is distributed as p on the rest). So ``draws`` (default 2k)
    i.i.d. joint values are drawn at once (a uniform per variable, no beam), and their first k
    distinct ones kept. A row that finds only j < k distinct values A among them continues the
    sequence: given A, its next k - j new values are successive sampling from p on D∖A, which is
    Gumbel-top-(k-j) over D∖A: the first k - j values outside A of a fresh Gumbel-top-k over D
    (stochastic beam search on those rows; at most j of its k values are in A). Both parts are
    exact, so the sample is, whatever the number of draws.

    Used when every value of every variable is possible and there are at least k joint values (a
    sample that needs padding, or more than 2^53 joint values, take :func:`stochastic_beam_search`).

    Returns:
        ``(values, logp, g, dtype)`` as :func:`stochastic_beam_search`; ``g`` is ``None`` when no beam
        ran for all rows (:func:`order_gumbels` draws the perturbed values given the sample).
    """
    d = node.distribution
    bernoulli = type(d) is Bernoulli  # log p of both values from the logits: no support, no validation
    support = None if bernoulli else support_table(d)  # (K, *event); OneHotCategorical: never built
    n_cat = 2 if bernoulli else support.shape[0]
    event = tuple(d.event_shape)
    parents = tuple(d.batch_shape[:len(node.parents)])
    own = tuple(d.batch_shape[len(node.parents):])
    n = math.prod(own)
    p = math.prod(parents)
    usable = n > 0 and p > 0 and n_cat ** n >= k and n * math.log2(max(n_cat, 2)) <= 53
    if not usable or is_tracing():
        # tracing (storch.compile): the beam, whose operations do not depend on how many distinct
        # values the i.i.d. draws found; the same distribution, other draws than the eager path's
        return stochastic_beam_search(node, k)
    if bernoulli:
        logits = d.logits
        with torch.no_grad():  # the sampler's table; the drawn values' log p is differentiated below
            lp = F.logsigmoid(torch.stack([-logits, logits])).reshape(2, p, n)  # values 0, 1
    else:
        lp = support_log_probs(d, support).reshape(n_cat, p, n)
    # every value possible: the sum of the log-probabilities (each <= 0) is finite (one op and a read
    # where isfinite().all() takes five; an overflow of the sum would only take the beam, as -inf does)
    if lp.is_meta or not math.isfinite(lp.sum().item()):
        return stochastic_beam_search(node, k)
    with torch.no_grad():
        # drawn in float32 for a float16 / bfloat16 model (to_work): a bfloat16 uniform has 8 bits, so a value of
        # probability 1e-3 was drawn with probability 0 or 1/256
        choices = _first_distinct(to_work(lp.detach()), k, draws or 2 * k)  # (k, P, n)
    # Bernoulli: the support is (0, 1), so a value is its index. Contiguous in the (k, P, n) order the
    # plates have (``choices`` is a transposed view): the model's layers then read and differentiate
    # a plain (k, P, ...) batch (the VAE decoder's forward and backward: ~2% faster than on the view)
    if bernoulli:
        values = choices.to(lp.dtype, memory_format=torch.contiguous_format)  # (k, P, n)
        # Σ_j log p_j(x_j) = -Σ_j BCE(l_j, x_j) from the logits: 3 autograd nodes where the gather from
        # the log-sigmoid table takes 8 (the same values up to rounding)
        # (in float32 for a float16 / bfloat16 model, to_work: the sum of n terms is the joint log p(s) that the
        # set's weights and baseline read)
        flat = to_work(logits if logits.shape == (p, n) else logits.reshape(p, n))
        logp = F.binary_cross_entropy_with_logits(flat.expand(values.shape), values.to(flat.dtype),
                                                  reduction="none").sum(-1).neg()
    else:
        logp = to_work(lp.unsqueeze(0).expand(k, n_cat, p, n).gather(1, choices.unsqueeze(1)).squeeze(1)).sum(-1)
        values = support[choices.contiguous()]  # (k, P, n, *event)
    if logp.shape != (k,) + parents:  # (a reshape to its own shape is still an autograd node)
        logp = logp.reshape((k,) + parents)
    return values.reshape((k,) + parents + own + event), logp, None, lp.dtype


def _first_distinct(lp: torch.Tensor, k: int, draws: int) -> torch.Tensor:
    """The first k distinct of ``draws`` i.i.d. joint values per row, completed by a beam where
    fewer are found (:func:`sample_without_replacement`); ``lp`` (K, P, n) finite, K^n >= k.

    Returns:
        each value's value index per variable, (k, P, n).
    """
    n_cat, p, n = lp.shape
    dev = lp.device
    u = torch.rand((p, draws, n), dtype=lp.dtype, device=dev)
    if n_cat == 2:
        idx = u.ge_(lp[0].exp().unsqueeze(1))  # value 1 (as 1.0) with probability 1 - p(0), in place
    else:
        idx = _inverse_cdf(lp, u).to(lp.dtype)
    # the joint value's code, exact in floating point: K^n <= 2^24 (float32) or 2^53 (float64)
    exact = torch.float32 if n * math.log2(n_cat) <= 24 else torch.float64
    weights, earlier, position, later, row_start = _draw_tables(n_cat, n, draws, p, exact, dev)
    codes = idx.to(exact) @ weights  # (P, draws)
    dup = ((codes.unsqueeze(2) == codes.unsqueeze(1)) & earlier).any(-1)  # seen before
    order = torch.where(dup, later, position)  # first appearances first, in order
    first = order.topk(k, dim=1, largest=False).indices  # (P, k)
    found = ~dup.gather(1, first)  # (P, k): a prefix of True, then repeats
    rows = (first + row_start).flatten()
    choices = idx.reshape(p * draws, n).index_select(0, rows).view(p, k, n).long()  # (P, k, n)
    if not bool(found.all()):
        rows = (~found.all(1)).nonzero().squeeze(1)  # rows with fewer than k distinct values
        beam, _, _, _ = _search(lp[:, rows], k, _max_candidates(rows.shape[0]))  # (k, R', n)
        beam = beam.permute(1, 0, 2)  # (R', k, n)
        seen, ok = codes.gather(1, first)[rows], found[rows]  # (R', k)
        beam_codes = beam.to(exact) @ weights
        in_seen = ((beam_codes.unsqueeze(2) == seen.unsqueeze(1)) & ok.unsqueeze(1)).any(-1)
        slot = ok.sum(1, keepdim=True) + (~in_seen).cumsum(1) - 1  # where each new value goes
        slot = torch.where(~in_seen & (slot < k), slot, torch.full_like(slot, k))  # k: dropped
        filled = torch.cat([choices[rows], choices.new_zeros(rows.shape[0], 1, n)], 1)
        filled.scatter_(1, slot.unsqueeze(-1).expand_as(beam), beam)
        choices[rows] = filled[:, :k]
    return choices.permute(1, 0, 2)


def _inverse_cdf(lp: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The value index of each uniform draw by the inverse CDF: the number of cumulative probabilities
    of the values 0..K-2 that are <= u, by a binary search per draw.

    The same counts as ``(u.unsqueeze(-1) >= cdf).sum(-1)`` (the cumulative sum of exp(lp) >= 0 is
    non-decreasing; a tie u == cdf counts, as ``right=True`` does) without that comparison's
    (P, draws, n, K-1) temporary: 1.5 GB and 6x the step's time at P 256, K 30000, n 8.

    Args:
        lp: log p of each value, ``(K, P, n)`` finite, K > 2.
        u: uniform draws in [0, 1), ``(P, draws, n)``, of ``lp``'s dtype.

    Returns:
        the value indices, ``(P, draws, n)`` int64, contiguous.
    """
    cdf = lp[:-1].exp().cumsum(0).permute(1, 2, 0).contiguous()  # (P, n, K-1)
    at = torch.searchsorted(cdf, u.transpose(1, 2).contiguous(), right=True)  # (P, n, draws)
    return at.transpose(1, 2).contiguous()


_DRAW_TABLES: dict = {}


def _draw_tables(n_cat: int, n: int, draws: int, p: int, exact: torch.dtype, device: torch.device) -> tuple:
    """Constants of :func:`_first_distinct`, made once per shape and device: the code weights K^(n-1-j)
    ``(n,)``; ``earlier`` (draws, draws), [i, j] = j < i; the positions 0..draws-1 (float) and the
    same + draws (the order of a repeat: after every first appearance); and each row's first index
    in the (P·draws) rows of the draws, ``(P, 1)``."""
    key = (n_cat, n, draws, p, exact, device)
    out = _DRAW_TABLES.get(key)
    if out is None:
        with torch.inference_mode(False):  # normal tensors, also when first made under inference mode (see table_cache)
            weights = (float(n_cat) ** torch.arange(n - 1, -1, -1, dtype=torch.float64)).to(device, exact)
            earlier = torch.ones(draws, draws, dtype=torch.bool).tril_(-1).to(device)
            position = torch.arange(draws, dtype=torch.float64).to(device, exact)
            row_start = (draws * torch.arange(p)).unsqueeze(1).to(device)
            out = (weights, earlier, position, position + draws, row_start)
            if torch._C._functorch.maybe_current_level() is None and len(_DRAW_TABLES) < 64:  # (see table_cache)
                _DRAW_TABLES[key] = out
    return out


def order_gumbels(lp: torch.Tensor) -> torch.Tensor:
    """Perturbed log-probabilities (Gumbels) of an ordered sample without replacement, drawn given
    the sample: the values Gumbel-top-k would have given it (what a partition's next beam step
    conditions on).

    The largest perturbed value over D is a Gumbel at log p(D) = 0, independent of which value
    attains it; given the first i values and G_i, the largest over the rest is a Gumbel at
    log(1 - p(s_1) - ... - p(s_i)) truncated at G_i (Kool et al., 2019): G = φ - log(exp(φ - T) + E),
    E ~ Exp(1).

    Args:
        lp: log p of the sample's values in their order, ``(k, *P)`` (detached).
    """
    with torch.no_grad():
        k = lp.shape[0]
        before = torch.cat([torch.full_like(lp[:1], -math.inf), torch.logcumsumexp(lp, 0)[:-1]])
        x = before.clamp_max(0.0)  # log(1 - Σ_{l<i} p(s_l)), stable at both ends
        phi = torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))
        log_e = (-_gumbel_like(lp))  # log E, E ~ Exp(1)
        out = []
        bound = None
        for i in range(k):
            g = phi[i] - log_e[i] if bound is None else phi[i] - torch.logaddexp(phi[i] - bound, log_e[i])
            out.append(g)
            bound = g
        return torch.stack(out)


def _search(lp: torch.Tensor, k: int, max_candidates: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """The beam search of :func:`stochastic_beam_search` on detached log-probabilities ``lp`` (K, P, n).

    Returns:
        ``(choices, phi, g, padded)``: each kept joint value's value index per variable (m, P, n),
        its log probability (P, m) (-inf on padding), its perturbed log-probability (P, m), and
        whether some entry has padding (fewer than m possible joint values).
    """
    n_cat, p, n = lp.shape
    dev = lp.device
    sizes = _chunk_plan(n, n_cat, k, max_candidates)
    offsets, values, var, onehot, columns = _tables_on(n_cat, sizes, dev, lp.dtype)
    lpt = lp.permute(1, 2, 0)  # (P, n, K)
    all_finite = lp.is_meta or _traced_finite(lp) or bool(torch.isfinite(lp).all())
    if all_finite and onehot is not None:  # every chunk's joint log-probabilities at once: (P, Σ_c K^m_c)
        chunk_lp = lpt.reshape(p, n * n_cat) @ onehot
    else:  # -inf entries (impossible values): a sum, not a product with 0 (variable n has log p 0)
        padded_lpt = torch.cat([lpt, lpt.new_zeros(p, 1, n_cat)], 1)
        chunk_lp = padded_lpt[:, var, values].sum(-1)
    widths = [n_cat ** m for m in sizes]
    chunk_lp = chunk_lp.split(widths, 1)
    beams = [1]
    for w in widths[:-1]:
        beams.append(min(k, beams[-1] * w))
    counts = [b * w for b, w in zip(beams, widths)]
    gumbels = _gumbel_like(lp.new_empty(p, sum(counts))).split(counts, 1)  # every step's Gumbels at once
    steps = []  # (parent, value) per step, (P, m) each: the sample is read back at the end
    phi = g = None
    padded = False
    for clp, gum, width in zip(chunk_lp, gumbels, widths):
        # the beam: 1, then min(k, joint values so far), or fewer where values are impossible
        beam = 1 if phi is None else phi.shape[1]
        if phi is None:
            cand_phi = clp
        else:
            cand_phi = torch.add(phi.unsqueeze(-1), clp.unsqueeze(1)).view(p, beam * width)  # (P, beam·K^m)
        gum = gum if gum.shape[1] == beam * width else gum[:, :beam * width]
        if all_finite:  # the common case: every value possible, no padding
            cand_g = cand_phi + gum
            if g is not None:
                cand_g = _truncated(cand_g.view(p, beam, width), g).view(p, beam * width)
            top = cand_g.topk(min(k, beam * width), dim=-1)  # sorted: the order of the sample
            indices, g, pad = top.indices, top.values, None
        else:  # never an impossible value: -inf candidates stay -inf, the rest are truncated as usual
            finite = torch.isfinite(cand_phi)
            cand_g = torch.where(finite, cand_phi, torch.full_like(cand_phi, _placeholder(cand_phi))) + gum
            if g is not None:
                bound = torch.where(torch.isfinite(g), g, torch.full_like(g, _placeholder(g)))
                cand_g = _truncated(cand_g.view(p, beam, width), bound).view(p, beam * width)
            cand_g = torch.where(finite, cand_g, torch.full_like(cand_g, -math.inf))
            indices, g, pad = top_possible(cand_g, k)  # (P, m), sorted
        parent = indices // width
        steps.append((parent, indices - parent * width))
        phi = cand_phi.gather(1, indices)
        if pad is not None:
            phi = phi.masked_fill(pad, -math.inf)
            padded = True
    # each kept value's choices, from the last step back along the parents
    at = None  # (P, m): rows of the previous step's beam
    picks = []
    for (parent, value), offset in zip(reversed(steps), reversed(offsets)):
        picks.append((value if at is None else value.gather(1, at)) + offset)
        at = parent if at is None else parent.gather(1, at)
    picked = torch.stack(picks[::-1], -1)  # (P, m, steps): rows of ``values``
    choices = values[picked].flatten(2)[:, :, columns]  # (P, m, n)
    return choices.permute(1, 0, 2), phi, g, padded


def beam_step(lp: torch.Tensor, phi: torch.Tensor, g: torch.Tensor, k: int):
    """One step of stochastic beam search over a partition (Kool et al., 2019, Algorithm 1).

    Every prefix of the beam is extended by each of the M values of the step; each child's
    perturbed log-probability is a Gumbel at its log-probability, conditioned (top-down) on the
    maximum over its siblings being the parent's perturbed value; the k largest survive. The
    result is an ordered sample without replacement of k prefixes (their Theorem 1).

    Args:
        lp: log p(value | prefix) of each value and prefix, shape ``(M, beam, *P)`` (``-inf`` for an
            impossible value); P: other plates (one beam per entry).
        phi: log-probabilities of the prefixes, ``(beam, *P)``.
        g: perturbed log-probabilities of the prefixes, ``(beam, *P)``.
        k: the beam size.

    Returns:
        ``(parent, value, g, phi, log_left, pad)``: the first four of shape ``(m, *P)`` with
        m = min(k, the most possible children of any entry): the parent index and value index of
        each surviving prefix, its perturbed and plain log-probability; ``log_left`` ``(*P)``: log
        of the probability of the children that were not kept; ``pad`` ``(m, *P)``: True where an
        entry has fewer than m possible children (those slots repeat its most probable child, with
        phi = g = -inf: weight 0, never a prefix the model cannot produce); ``None`` if none has.
    """
    with torch.no_grad():
        n_val, beam = lp.shape[:2]
        rest = lp.shape[2:]
        # children laid out (*P, beam, M): the flat (*P, beam·M) candidates are (usually) a view
        cand = phi.movedim(0, -1).unsqueeze(-1) + lp.movedim(0, -1).movedim(0, -2)
        flat_phi = cand.reshape(rest + (beam * n_val,))
        # every child possible: no masks, no padding (while storch.compile traces: assumed, and checked
        # at every replayed call)
        if cand.is_meta or _traced_finite(cand) or bool(torch.isfinite(cand).all()):
            cand_g = _truncated(cand + _gumbel_like(cand), g.movedim(0, -1))
            flat_g = cand_g.reshape(rest + (beam * n_val,))
            top = flat_g.topk(min(k, beam * n_val), dim=-1)  # sorted: the order of the sample
            indices, g_top, pad = top.indices, top.values, None
        else:
            finite = torch.isfinite(cand)
            safe = torch.where(finite, cand, torch.full_like(cand, _placeholder(cand)))
            cand_g = _truncated(safe + _gumbel_like(safe), g.movedim(0, -1))
            cand_g = torch.where(finite, cand_g, torch.full_like(cand_g, -math.inf))
            flat_g = cand_g.reshape(rest + (beam * n_val,))
            indices, g_top, pad = top_possible(flat_g, k)
        parent = indices // n_val
        value = indices - parent * n_val
        # the mass of the children not kept
        left = torch.logsumexp(flat_phi.scatter(-1, indices, -math.inf), -1)
        # a padding entry (fewer than k possible prefixes) repeats a possible one with log p = -inf
        new_phi = flat_phi.gather(-1, indices)
        if pad is not None:
            new_phi = new_phi.masked_fill(pad, -math.inf)
        # parent and value contiguous in (m, *P) order: the step's sample (values[value]) and every
        # earlier tensor re-indexed by the lineage (parent) follow their layout
        return (parent.movedim(-1, 0).contiguous(), value.movedim(-1, 0).contiguous(), g_top.movedim(-1, 0),
                new_phi.movedim(-1, 0), left, None if pad is None else pad.movedim(-1, 0))
