"""Sum-and-sample (MAPO) over sequences: a memory buffer of the best sequences found so far.

In an autoregressive loop (a partition, paper section 3.2), one estimator call per step, the
plate holds S memory slots followed by m sampled sequences:

- memory slots: sequences from the estimator's buffer (per key: one buffer per data point), forced
  token by token (teacher forcing), summed exactly with weight p(a) (gradient-carrying, l = 0);
  when the buffer holds more sequences than slots, the S - 1 most probable (by their last known
  probability) are summed exactly and one more is drawn from the rest with a fixed proposal q
  (importance weight p(a)/q(a), unbiased since q does not depend on θ);
- sampled sequences: m i.i.d. ancestral samples from p; those that fall in the memory are rejected
  (weight 0), the others get weight 1/m and l = log p(x) (the remainder's score function).

For a cost that depends on the first L steps (causal credit), the memory is the set M_L of the
memory sequences' L-prefixes (each counted once), so for every L:
E[c] = Σ_{u ∈ M_L} p(u) c(u) + E_p[1[x≤L ∉ M_L] c(x≤L)], the first part exact, the second the
score function of an indicator-weighted cost: unbiased at every order. The leave-one-out
baseline b_j (the mean cost of the other accepted samples) enters as (1 - ⊡(l_j)) b_j on the samples
and its mean b̄ as -b̄ (p(a) - ⊥p(a)) on the slots: Σ_M ∇p(a)(c(a) - b̄) + (1/m) Σ_j 1[x_j ∉ M_L]
(c_j - b_j) ∇log p(x_j) has the expectation of the unshifted one at every order because
p(M_L) + p(∉M_L) = 1 and E[b_j] = E[b̄]. p(∉M_L) is never computed from the slots: with noise drawn
per plate entry in the model (a stochastic environment, dropout) each slot has its own draw, and
a baseline on ∇log p(∉M_L) from the slots was biased. The option keeps requiring every memory
sequence summed (n_enumerate >= buffer).

After ``storch.backward()`` the buffer keeps the ``buffer`` distinct sequences of lowest total
cost seen (slots and samples), with their last log-probabilities (the next proposal q).
"""

from __future__ import annotations

import math
import sys
import warnings
from typing import TYPE_CHECKING, Optional

import torch

import torch.nn.functional as F
from torch.distributions import Categorical, OneHotCategorical

from storch import Node, OptionError, PlateError, UnsupportedDistributionError
from storch.extending import user_stacklevel


if TYPE_CHECKING:
    from .sum_and_sample_sequences import SequenceState as MemoryState

__all__ = ["SequenceBuffer", "start", "step", "weights", "control_variate", "record_cost", "offers"]


# Keys held by a buffer none of which a first step has met again, above which :func:`start` warns (once per
# estimator) that the buffer only grows: memory keys that are fresh every step (a routing model given new
# instances each step) are never read back. A dataset of more keys than this warns once in its first pass.
FRESH_KEYS_WARNING = 10_000


class SequenceBuffer:
    """Per key, the best distinct sequences: ``{key: {sequence: [cost, log p]}}`` (cost None: seeded).

    ``met_again``: whether a first step has ever met a key the buffer already held (its sequences were read
    back); ``warned``: whether :func:`start` has warned that none was."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.entries: dict[int, dict[tuple, list]] = {}
        self.rejected = 0  # offers turned away without ranking the book (offer_many's shortcut; for tests)
        self.met_again = False
        self.warned = False

    def seed(self, key: int, seqs: list[tuple]) -> None:
        book = self.entries.setdefault(key, {})
        for s in seqs:
            book.setdefault(s, [None, None])

    def sequences(self, key: int) -> list[tuple[tuple, Optional[float], Optional[float]]]:
        return [(s, c, lp) for s, (c, lp) in self.entries.get(key, {}).items()]

    def offer(self, key: int, seq: tuple, cost: float, logp: float) -> None:
        self.offer_many(key, [(seq, cost, logp)])

    def offer_many(self, key: int, items: list) -> None:
        """:meth:`offer` each ``(seq, cost, logp)`` of ``items`` in turn (the same buffer as one call each)."""
        book = self.entries.setdefault(key, {})
        capacity = self.capacity
        bar = _bar(book, capacity)
        for seq, cost, logp in items:
            if cost >= bar and seq not in book:
                # a new sequence no better than the last of a full book already in rank order: the
                # ranking below would keep the book as it is (the sort is stable, the newcomer is last)
                self.rejected += 1
                continue
            book[seq] = [cost, logp]
            if len(book) > capacity:
                # keep the lowest costs; seeds not yet evaluated (cost None) stay first
                ranked = sorted(book.items(), key=lambda kv: -math.inf if kv[1][0] is None else kv[1][0])
                book = self.entries[key] = dict(ranked[:capacity])
            bar = _bar(book, capacity)

    def state(self) -> dict:
        return {"capacity": self.capacity, "entries": {k: dict(v) for k, v in self.entries.items()},
                "met_again": self.met_again}

    def load(self, state: dict) -> None:
        self.capacity = state["capacity"]
        self.entries = {int(k): {tuple(s): list(v) for s, v in book.items()} for k, book in state["entries"].items()}
        # whether the saved run had met a key again: a run of fresh keys resumed (or a checkpoint saved before any
        # step, an empty buffer) still warns; a checkpoint from before the field is read as having met its keys
        self.met_again = bool(state.get("met_again", True))


def _bar(book: dict, capacity: int) -> float:
    """The rank (cost; -inf for a seed not yet evaluated) of the last sequence of a full book in rank
    order (as the ranking in :meth:`SequenceBuffer.offer_many` leaves it): a new sequence of no lower
    cost is turned away. Else NaN (no cost is >= NaN: every offer is taken in). O(len(book)), a few
    comparisons for the usual small buffers."""
    if len(book) != capacity:
        return math.nan
    last = -math.inf
    for cost, _ in book.values():
        rank = -math.inf if cost is None else cost
        if not rank >= last:  # (a NaN cost: not ranked either)
            return math.nan
        last = rank
    return last


def _trim(tokens: list, eos) -> tuple:
    """A sequence up to and including its first end token."""
    if eos is not None and eos in tokens:
        return tuple(tokens[:tokens.index(eos) + 1])
    return tuple(tokens)


def _tokens_of(d):
    """``(distribution over token ids, one_hot size or None)``: a OneHotCategorical's tokens are
    handled as the ids of its Categorical and given back one-hot."""
    if type(d) is OneHotCategorical:
        # its own Categorical (normalised logits, probs if already computed): a new one would
        # normalise the logits again and compute the softmax again, every token
        return d._categorical, d.event_shape[-1]
    if isinstance(d, OneHotCategorical):  # a subclass: through its public logits
        return Categorical(logits=d.logits, validate_args=False), d.event_shape[-1]
    return d, None


def _one_hot(value: torch.Tensor, size, like) -> torch.Tensor:
    if size is None:
        return value
    return F.one_hot(value.long(), size).to(like.dtype)


def _check(node: Node, who: str) -> None:
    d = node.distribution
    event = () if isinstance(d, OneHotCategorical) else tuple(d.event_shape)
    if node.batch_ndims != 0 or event != ():
        raise UnsupportedDistributionError(
            f"{who} with buffer= (sequences) needs one token per step: a Categorical, OneHotCategorical or "
            f"Bernoulli whose batch dims are all plates; got {type(d).__name__} with batch shape "
            f"{tuple(d.batch_shape)} and event shape {tuple(d.event_shape)} ({node.batch_ndims} own batch dims). "
            "Make one estimator call per token")


def start(est, node: Node, keys: Optional[torch.Tensor]) -> torch.Tensor:
    """The first step: choose the memory slots per key, draw the first tokens."""
    _check(node, est.name)
    d, one_hot = _tokens_of(node.distribution)
    parents = tuple(d.batch_shape)
    n_par = math.prod(parents)
    if keys is None:
        data = [p.name for p in node.parents if p.independent]
        if data:
            raise OptionError(
                f"{est.name} with buffer= keeps one memory per data point, but the first step on plate "
                f"{est.plate!r} has data plates {data} and no memory_key: keyed by position, a shuffled batch "
                "would hand each data point other data points' sequences. Pass the data points' ids at the "
                "first call, one int per entry of the first step's plates, e.g. "
                "est(Categorical(logits=...), memory_key=batch_ids) (the dataset indices of the batch; for a "
                f"fixed batch in a fixed order memory_key=torch.arange({n_par}))")
        keys = torch.arange(n_par)
    keys = [int(k) for k in keys.reshape(-1).tolist()]
    if len(keys) != n_par:
        raise OptionError(f"{est.name}: memory_key has {len(keys)} entries; the first step has {n_par} parent "
                          f"entries (plates {[p.name for p in node.parents]}, shape {parents})")
    buffer = est._buffer
    if not buffer.met_again:
        entries = buffer.entries
        if any(k in entries for k in keys):
            buffer.met_again = True
        elif not buffer.warned and len(entries) >= FRESH_KEYS_WARNING:
            buffer.warned = True
            _warn_fresh_keys(est, len(entries))
    if est._seed is not None:
        for k in keys:
            if k not in est._buffer.entries:
                est._buffer.seed(k, est._seed(k))
    books = [est._buffer.sequences(k) for k in keys]
    n_slots = min(est.n_enumerate, max((len(b) for b in books), default=0))
    eos = est.eos
    pad = 0 if eos is None else eos
    long = max((len(s) for b in books for s, _, _ in b), default=1)
    width = max((len(b) for b in books), default=0)
    # all memory sequences (for membership) and the slots: (K, P, long) tokens, lengths, validity; built
    # as flat Python lists and made tensors once (a tensor write per key and sequence cost ~1 ms at 100
    # keys; nested lists convert ~5x slower than flat ones). Entry (i, p) at i * n_par + p.
    mem = [pad] * (width * n_par * long)
    mem_len = [0] * (width * n_par)
    mem_ok = [False] * (width * n_par)
    slot = [0] * (n_slots * n_par)  # index into mem
    slot_ok = [False] * (n_slots * n_par)
    imp = [False] * (n_slots * n_par)  # the importance-sampled slot
    q_all = torch.zeros(width, n_par, dtype=torch.float64)  # its proposal over the rest (0 elsewhere)
    gen = None
    for p, book in enumerate(books):
        if len(book) > 1:  # the most probable first (last known log-probability; never evaluated: last)
            book = sorted(book, key=lambda e: -(e[2] if e[2] is not None else -math.inf))
        for i, (s, _, _) in enumerate(book):
            at = i * n_par + p
            mem[at * long:at * long + len(s)] = s
            mem_len[at], mem_ok[at] = len(s), True
        if len(book) <= n_slots:
            for i in range(len(book)):
                slot[i * n_par + p], slot_ok[i * n_par + p] = i, True
            continue
        exact = n_slots - 1
        for i in range(n_slots):
            slot[i * n_par + p], slot_ok[i * n_par + p] = i, True
        rest = book[exact:]
        lp = torch.tensor([e[2] if e[2] is not None else -math.inf for e in rest], dtype=torch.float64)
        known = torch.isfinite(lp)
        q = torch.full((len(rest),), 1.0 / len(rest), dtype=torch.float64)
        if known.any():  # half by the last known probabilities, half uniform (covers every sequence)
            q = 0.5 * q + 0.5 * torch.softmax(lp.masked_fill(~known, -math.inf), 0)
        q_all[exact:len(book), p] = q
        pick = int(torch.multinomial(q, 1, generator=gen))
        slot[exact * n_par + p] = exact + pick
        imp[exact * n_par + p] = True
    # every memory token must be one of its step's values (the one-step estimator's check, by sequence and
    # step): an out-of-vocabulary token indexed past p's logits deep inside torch. The range of every token:
    # min/max of the flat list (a C loop, no tensor, no host sync); tokens are read one by one only where
    # the range exceeds a step's values (a wrong token, or steps with different numbers of values)
    c = node.state  # a fresh MemoryState: tokens, lps, slot_cum and costs start empty
    c.keys, c.mem_range = keys, (min(mem, default=0), max(mem, default=0))
    _check_memory_tokens(est, c, d, 0, books)
    m = est.n_samples
    drawn = d.sample((m,))  # (m, *parents)
    dev = drawn.device
    mem = torch.tensor(mem, dtype=torch.long, device=dev).reshape(width, n_par, long)
    mem_len = torch.tensor(mem_len, dtype=torch.long, device=dev).reshape(width, n_par)
    mem_ok = torch.tensor(mem_ok, dtype=torch.bool, device=dev).reshape(width, n_par)
    slot = torch.tensor(slot, dtype=torch.long, device=dev).reshape(n_slots, n_par)
    slots_full, slot_ok = all(slot_ok), torch.tensor(slot_ok, dtype=torch.bool, device=dev).reshape(n_slots, n_par)
    any_imp, imp = any(imp), torch.tensor(imp, dtype=torch.bool, device=dev).reshape(n_slots, n_par)
    q_all = q_all.to(dev, d.logits.dtype)  # Categorical and Bernoulli have logits
    c.n_slots, c.m = n_slots, m
    c.mem, c.mem_len, c.mem_ok, c.slot, c.slot_ok, c.imp, c.q = mem, mem_len, mem_ok, slot, slot_ok, imp, q_all
    c.slot_seq = mem.gather(0, slot.unsqueeze(-1).expand(-1, -1, long))  # (S, P, long): forced token by token
    c.slots_full = slots_full  # every key fills every slot (known from the lists: no host sync)
    c.is_slot = torch.arange(n_slots + m, device=dev).lt(n_slots).unsqueeze(-1)  # (N, 1): the slots' rows
    c.any_imp = any_imp
    c.parents, c.names = parents, tuple(p.name for p in node.parents)
    value, c.l0 = _advance(est, node, d, drawn, parents)
    return _one_hot(value, one_hot, d.logits)


def _warn_fresh_keys(est, n_keys: int) -> None:
    """Warn that the buffer holds ``n_keys`` keys none of which came back: it grows by every new key's
    sequences and is never read (a fresh key has an empty memory, as without ``buffer=``)."""
    warnings.warn(
        f"{est.name} (plate {est.plate!r}) with buffer={est.buffer}: its buffer holds the sequences of {n_keys} "
        "memory keys, and no first step has met any of them again: a key's memory is only read back when the "
        "same memory_key comes again (a data point of a dataset in a later epoch), so with fresh keys every step "
        "(new instances) the buffer only grows and every step runs with an empty memory. Use "
        "storch.estimator('unordered_set', ...) or 'score' with baseline='leave_one_out' for fresh instances, or "
        "pass a memory_key that repeats (the dataset index). If the keys are dataset indices and the first pass "
        "over the data is not over, they will come again and this warning does not apply "
        "(docs/estimators/sum_and_sample.md)", RuntimeWarning, stacklevel=user_stacklevel(sys.modules[__name__]))



def _n_values(d) -> int:
    """The number of token values of a step's distribution (a Categorical's categories; 2 for a Bernoulli)."""
    return d.logits.shape[-1] if isinstance(d, Categorical) else 2


def _check_memory_tokens(est, c: "MemoryState", d, step: int, books: Optional[list] = None) -> None:
    """Raise an OptionError that names the memory sequence (and its key) whose token at ``step`` is not one
    of the values of the step's distribution ``d``; ``books``: the keys' buffered sequences (default: read
    from the buffer)."""
    n = _n_values(d)
    lo, hi = c.mem_range
    if lo >= 0 and hi < n:  # every token of every step is one of d's values
        return
    if books is None:
        books = [est._buffer.sequences(k) for k in c.keys]
    for key, book in zip(c.keys, books):
        for s, _, _ in book:
            if step < len(s) and not 0 <= s[step] < n:
                raise OptionError(
                    f"{est.name}: a memory value is not in the support of the node's distribution: the memory "
                    f"sequence {list(s)} (memory_key {key}) has token {s[step]} at step {step}, where the "
                    f"distribution of plate {est.plate!r} has {n} values (tokens 0..{n - 1}). Seed the buffer "
                    "(memory=, or a loaded state_dict) with token ids of the vocabulary")


def _token_lp(d, tok: torch.Tensor, shape: tuple, finished: Optional[torch.Tensor]) -> tuple:
    """The step's values ``(N, *shape)`` from tokens ``(N, P)`` and their log p (with gradient),
    ``(N, P)``; 0 for a sequence that has ended (it stops contributing)."""
    value = tok.reshape((tok.shape[0],) + shape)
    lp = d.log_prob(value).reshape(tok.shape)
    if finished is not None:
        lp = torch.where(finished, torch.zeros_like(lp), lp)
    return value, lp


def _most_probable(d, rows: int, shape: tuple) -> torch.Tensor:
    """The most probable token of each entry of a step's distribution, ``(rows, prod(shape))``."""
    support = d.enumerate_support(expand=False).reshape(-1)  # (K,)
    k = support.shape[0]
    every = support.reshape((k,) + (1,) * (1 + len(shape))).expand((k, rows) + tuple(shape))
    lp = d.log_prob(every).detach()  # (K, rows, *shape): the first step's d broadcasts over the rows
    return support[lp.argmax(0)].reshape(rows, -1)


def _forced(c: "MemoryState", t: int, eos) -> torch.Tensor:
    """Tokens of the slots at step t, ``(S, P)``."""
    seqs = c.slot_seq  # (S, P, long), gathered once at the first step
    if t < seqs.shape[-1]:
        return seqs[:, :, t]
    return torch.full(seqs.shape[:2], 0 if eos is None else eos, dtype=torch.long, device=seqs.device)


def _advance(est, node: Node, d, drawn: torch.Tensor, shape: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """Put the slots' forced tokens and finished sequences' end tokens into ``drawn`` (m, *shape);
    log-probabilities of the step. Returns the step's values ``(S + m, *shape)`` and masked l."""
    c = node.state
    t = len(c.tokens)
    n_par = math.prod(shape)
    dtype = drawn.dtype
    forced = _forced(c, t, est.eos).to(dtype)  # (S, P)
    drawn = drawn.reshape(c.m, n_par)
    if not c.slots_full:
        # an unused slot (a key with fewer buffered sequences than slots) follows the first sample (weight 0):
        # the user's cost never sees a padding sequence the model cannot produce
        forced = torch.where(c.slot_ok, forced, drawn[:1].expand_as(forced))
    tok = torch.cat([forced, drawn], 0)  # (N, P)
    finished = None  # no sequence has ended (no end token, or the first step)
    if t and est.eos is not None:
        # (N, P): ended at an earlier step; kept from step to step (a stack of every earlier step's
        # tokens at each step made the loop quadratic in the length)
        ended = c.tokens[-1] == est.eos
        finished = c.finished = ended if c.finished is None else c.finished | ended
        tok = torch.where(finished, torch.full_like(tok, est.eos), tok)
    value, lp = _token_lp(d, tok, shape, finished)
    s = c.n_slots
    if s:
        # a remembered sequence whose token is impossible now (a mask that changed since it was stored)
        # has probability 0: its slot takes its most probable token wherever the remembered one is
        # impossible (so the user's cost never sees a value the model cannot produce) and keeps
        # log p = -inf there (weight 0, as p(m) f(m) = 0)
        # (one sum and a read where every slot's token is possible: log p <= 0, so -inf only if one is)
        if not math.isfinite(lp.detach()[:s].sum().item()):
            dead = torch.isneginf(lp) & c.is_slot
            tok = torch.where(dead, _most_probable(d, tok.shape[0], shape).to(tok.dtype), tok)
            value, lp = _token_lp(d, tok, shape, finished)
            lp = lp.masked_fill(dead, -math.inf)
    c.tokens.append(tok.long())
    c.lps.append(lp)  # summed over the steps only where read (_slot_logp, update): not per token
    l_step = torch.where(c.is_slot, 0.0, lp) if s else lp  # l: 0 on slots, log p on samples
    return value, l_step.reshape(value.shape)


def step(est, node: Node, d, plates: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """A later step. ``plates``: the partition's plate, then the step's parents (the distribution's
    batch dims lead with them). Returns the raw sample and its l in that layout."""
    c = node.state
    others = plates[1:]
    names = tuple(p.name for p in others)
    if names not in c.orders and tuple(sorted(names)) != tuple(sorted(c.names)):  # (a layout seen passed)
        raise PlateError(
            f"{est.name} with buffer= (sequences) keeps one memory per entry of the first step's plates "
            f"{list(c.names)}, but step {len(c.tokens)} depends on {list(names)}; make the first "
            "step depend on every plate the later steps depend on (e.g. start the decoder from the data)")
    order, back = _orders(c, names)
    d, one_hot = _tokens_of(d)
    _check_memory_tokens(est, c, d, len(c.tokens))
    drawn_full = d.sample()  # (N, *others)
    if back is None:  # the first step's layout (the usual case): nothing to permute
        value, l_step = _advance(est, node, d, drawn_full[c.n_slots:], c.parents)
        return _one_hot(value, one_hot, d.logits), l_step
    # to the node's layout: (N, *parents in the first step's order), and back
    drawn = drawn_full.permute(order)[c.n_slots:]
    value, l_step = _advance(est, node, _Permuted(d, order, back), drawn, c.parents)
    return _one_hot(value.permute(back), one_hot, d.logits), l_step.permute(back)


class _Permuted:
    """``d.log_prob`` in the node's layout (a module-level class: a class made per step would be a
    reference cycle, left for the garbage collector)."""

    __slots__ = ("d", "order", "back")

    def __init__(self, d, order: list, back: list) -> None:
        self.d, self.order, self.back = d, order, back

    def log_prob(self, v: torch.Tensor) -> torch.Tensor:
        return self.d.log_prob(v.permute(self.back)).permute(self.order)


def _orders(c: "MemoryState", names: tuple) -> tuple[list, Optional[list]]:
    """Permutations (N, *names) -> (N, *first-step names) and back; ``back`` is ``None`` where ``names``
    are in the first step's order (nothing to permute). Worked out once per graph and layout: every
    token's step and every cost's weights ask."""
    orders = c.orders.get(names)
    if orders is None:
        order = [0] + [1 + names.index(n) for n in c.names]
        back = [order.index(i) for i in range(len(order))]
        orders = c.orders[names] = (order, None if order == sorted(order) else back)
    return orders


def to_layout(t: torch.Tensor, node: Node) -> torch.Tensor:
    """``t`` with leading dims (N, *first-step parents) in the layout of ``node.plates``."""
    _, back = _orders(node.state, tuple(p.name for p in node.parents))
    return t if back is None else t.permute(back + list(range(len(back), t.dim())))


def _mem_tokens(c: "MemoryState", begin: int, end: int, eos) -> torch.Tensor:
    """Tokens ``begin:end`` of every memory sequence ``(K, P, end - begin)``, padded with the end token
    (0 without one) past the longest."""
    mem = c.mem[:, :, begin:end]
    short = end - begin - mem.shape[-1]
    if short > 0:
        pad = torch.full(mem.shape[:2] + (short,), 0 if eos is None else eos, dtype=torch.long, device=mem.device)
        mem = torch.cat([mem, pad], -1)
    return mem


def _sample_match(c: "MemoryState", length: int, eos) -> torch.Tensor:
    """Whether each sample's ``length``-prefix is each memory sequence's (padded), validity left out,
    ``(m, K, P)``. Prefix equality up to L is equality up to L - 1 and at token L: one cumulative AND
    over the steps not compared yet (all the tokens so far at once), kept per length. Comparing the
    L-prefixes anew for every L made the surrogate of a T-step episode quadratic in T."""
    done = len(c.smp_eq)
    if done < length:
        end = len(c.tokens)
        seq = torch.stack(c.tokens[done:end], -1)[c.n_slots:]  # (m, P, Δ)
        eq = (seq.unsqueeze(1) == _mem_tokens(c, done, end, eos).unsqueeze(0)).cummin(-1).values  # (m, K, P, Δ)
        if done:
            eq = eq & c.smp_eq[-1].unsqueeze(-1)
        c.smp_eq.extend(eq.unbind(-1))
    return c.smp_eq[length - 1]


def _slot_match(c: "MemoryState", length: int, eos) -> torch.Tensor:
    """Whether each slot's ``length``-prefix is each memory sequence's (padded) ``(S, K, P)``: from one
    cumulative AND over the memory's tokens (made once per graph); past the longest memory sequence
    only padding follows, so the longest prefixes' answer holds."""
    if c.slot_eq is None:
        mem = _mem_tokens(c, 0, max(c.mem.shape[-1], 1), eos)  # (K, P, long)
        sp = mem.gather(0, c.slot.unsqueeze(-1).expand(-1, -1, mem.shape[-1]))  # (S, P, long)
        c.slot_eq = (sp.unsqueeze(1) == mem.unsqueeze(0)).cummin(-1).values.unbind(-1)
    return c.slot_eq[min(length, len(c.slot_eq)) - 1]


def _tables(c: "MemoryState", length: int, eos) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Whether each memory sequence has an L-prefix (length >= L or ended by eos) ``(K, P)`` and
    :func:`_slot_factors` (``None`` without slots) for L = ``length``, computed once per graph and
    length: the weights, the baseline and the buffer update all read them."""
    tables = c.tables.get(length)
    if tables is None:
        tables = c.tables[length] = _tables_at(c, length, eos)
    return tables


def _tables_at(c: "MemoryState", length: int, eos) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    if c.mem_ended is None:  # (the same for every length: made once)
        c.mem_ended = torch.zeros_like(c.mem_ok) if eos is None else (c.mem == eos).any(-1)
    ok = c.mem_ok & ((c.mem_len >= length) | c.mem_ended)
    return ok, _slot_factors(c, ok, length, eos) if c.n_slots else None


def weights(est, node: Node, length: Optional[int] = None) -> torch.Tensor:
    """w for costs that depend on the first ``length`` steps (default: every step so far)."""
    c = node.state
    if length is None:
        length = _length(node)
    # the same tokens and prefix probabilities for every reader of this length (the partition and
    # its views, the baseline): one w per graph, length and grad mode
    key = (length, torch.is_grad_enabled())
    w = c.weights.get(key)
    if w is None:
        w = c.weights[key] = _weights(est, c, length, node)
    return w


def _weights(est, c: "MemoryState", length: int, node: Node) -> torch.Tensor:
    s, m = c.n_slots, c.m
    ok, factor = _tables(c, length, est.eos)  # (K, P), (S, P) detached
    # samples: rejected if their prefix is a memory prefix
    same = _sample_match(c, length, est.eos) & ok.unsqueeze(0)  # (m, K, P)
    w_smp = (~same.any(1)).to(c.lps[0].dtype) / m
    if not s:
        return to_layout(w_smp.reshape((m,) + c.parents), node)
    w_slot = _slot_logp(c, length).exp() * factor
    return to_layout(torch.cat([w_slot, w_smp.to(w_slot.dtype)], 0).reshape((s + m,) + c.parents), node)


def _slot_logp(c: "MemoryState", length: int) -> torch.Tensor:
    """log p of the slots' ``length``-prefixes ``(S, P)``, with gradient: from one cumulative sum over
    the steps so far (per grad mode), made again only when a longer prefix is asked for."""
    grad = torch.is_grad_enabled()
    cum = c.slot_cum.get(grad)
    if cum is None or cum.shape[0] < length:
        cum = c.slot_cum[grad] = torch.stack(c.lps).narrow(1, 0, c.n_slots).cumsum(0)  # (T, S, P)
    return cum[length - 1]


def _slot_factors(c: "MemoryState", ok: torch.Tensor, length: int, eos) -> torch.Tensor:
    """1 for an exact slot whose prefix is new among the exact slots; 1/Q_L(u) for the importance
    slot whose prefix is not an exact slot's; 0 otherwise."""
    s = c.n_slots
    slot, imp = c.slot, c.imp
    match = _slot_match(c, length, eos)  # (S, K, P): slot i's prefix is memory sequence k's
    sok = ok.gather(0, slot) & c.slot_ok
    exact = sok & ~imp
    same = match.gather(1, slot.unsqueeze(0).expand(s, -1, -1))  # (S, S, P): slot i's prefix is slot j's
    earlier = torch.ones(s, s, dtype=torch.bool, device=slot.device).tril(-1).unsqueeze(-1)
    first = ~(same & earlier & exact.unsqueeze(0)).any(1)
    factor = (exact & first).to(c.q.dtype)
    if c.any_imp:  # (known at the first step: no host sync here)
        covered = (same & exact.unsqueeze(0)).any(1)  # (S, P): the slot's prefix is an exact slot's
        # Q_L(u) = q-mass of the rest's sequences with the importance slot's prefix u
        hit = match & ok.unsqueeze(0)  # (S, K, P)
        big_q = (hit.to(c.q.dtype) * c.q.unsqueeze(0)).sum(1)  # (S, P)
        tiny = torch.finfo(big_q.dtype).tiny
        w_imp = torch.where(imp & sok & ~covered & (big_q > 0), 1.0 / big_q.clamp_min(tiny), torch.zeros_like(big_q))
        factor = torch.where(imp, w_imp, factor)
    return factor


def _length(node: Node) -> int:
    """Steps a view of the partition covers (``node.step + 1``; the main node: every step so far)."""
    return min(getattr(node, "step", 0) + 1, len(node.state.tokens))


def record_cost(node: Node, frame) -> None:
    """Keep the cost per entry ``(N, P)`` (for the buffer update)."""
    c = node.state
    t = frame.tensor.detach()
    names = [p.name for p in frame.plates]
    keep = [node.plate.name] + list(c.names)
    extra = tuple(i for i, n in enumerate(names) if n not in keep)
    if extra:
        t = t.mean(extra, keepdim=True)
    order = [names.index(n) for n in keep] + list(extra)
    t = t.permute(order + list(range(len(names), t.dim())))
    t = t.reshape(t.shape[:len(keep)])
    t = t.expand((node.n,) + c.parents).reshape(node.n, -1)
    c.costs[(frame.state_name, _length(node))] = t  # costs of one name but other plates: each its own


def control_variate(est, node: Node, frame) -> Optional[torch.Tensor]:
    """The leave-one-out baseline: (1 - ⊡(l_j)) b_j on the samples, b_j the mean cost of the other
    accepted samples (of the other samples where none is accepted), and -b̄ (1 - ⊥p(a)/p(a)) on the
    slots, b̄ the mean of the b_j. Zero-mean at every order, per-entry noise in the model included."""
    from storch import magic_box

    record_cost(node, frame)
    if not est.leave_one_out:
        return None
    c = node.state
    s, m, d = c.n_slots, c.m, frame.dim
    length = _length(node)
    f = frame.tensor
    if f.shape[d] != node.n:
        f = f.expand(f.shape[:d] + (node.n,) + f.shape[d + 1:])
    acc = frame.align(weights(est, node, length).detach() * m)  # 1 on accepted samples (0 / p on slots)
    acc = acc.expand(f.shape).narrow(d, s, m)
    g = f.narrow(d, s, m) * acc
    num = g.sum(d, keepdim=True) - g
    den = acc.sum(d, keepdim=True) - acc
    # where no other sample is accepted, the mean cost of the other samples (accepted or not): a
    # baseline on every sample keeps the estimate's variance from growing with a constant added to the cost
    raw = f.narrow(d, s, m)
    beta = (raw.sum(d, keepdim=True) - raw) / (m - 1)
    b = torch.where(den > 0, num / den.clamp_min(1.0), beta)  # b_j: from the samples other than j only
    # Every baseline B multiplies a score whose expectation, as a function of θ, is known: on the
    # samples (1 - ⊡(l_j)) B_j under w_j = 1[x_j ∉ M_L]/m has expectation B_j (P(∉M_L) at ⊥θ minus at θ)
    # for B_j independent of x_j; on the slots -B (p(a) - ⊥p(a)) has -B (P(M_L) at θ minus at ⊥θ) for B
    # independent of the slots. With E[B_j] = E[B], they cancel at every order since P(M_L) + P(∉M_L) = 1.
    # P(M_L) is never computed from the slots' log-probabilities: a model whose later steps depend on
    # noise drawn per plate entry (a stochastic environment, dropout in the decoder) gives each slot
    # and each sample its own draw, so Σ_slots p(a) is not the samples' P(M_L) and a term built on
    # ∇log p(∉M_L) from the slots (the form used before) was not zero-mean (biased gradients).
    l_smp = node.gradient_values.narrow(0, s, m)
    box = magic_box(frame.align(l_smp, node.plates))
    a = (1.0 - box) * b  # b_j: the other accepted samples' mean cost, independent of x_j
    a_slot = torch.zeros_like(a.narrow(d, 0, 1)).expand(a.shape[:d] + (s,) + a.shape[d + 1:])
    if s:
        # the slots' shift: the b_j averaged over j (the expectation of each b_j; from the samples
        # alone, so independent of the slots)
        b_mem = b.mean(d, keepdim=True)
        lp = to_layout(_slot_logp(c, length).reshape((s,) + c.parents), node)
        lp = frame.align(torch.where(torch.isfinite(lp), lp, torch.zeros_like(lp)), node.plates)
        a_slot = -b_mem * (1.0 - torch.exp(lp.detach() - lp))  # w·a = -b (p(a) - ⊥p(a))
    return torch.cat([a_slot, a], d)


def offers(est, node: Node) -> list:
    """The graph's sequences (slots and samples) with their total costs and log-probabilities, per key:
    ``[(key, [(sequence, cost, log p), ...]), ...]``, what :meth:`SequenceBuffer.offer_many` takes (in the
    order of the plate; slots that are not whole sequences left out). Empty where no cost reached the node."""
    c = node.state
    if not c.costs:
        return []
    # every cost recorded in the step: one per (name, length), so the per-step costs of one name (the
    # documented pattern: add_cost(r_t, name="reward") at every step) all count. Keeping only each name's
    # latest length stored a sequence with 10 + 10 of per-token costs as 0 (found by porting a seq2seq model)
    total = sum(c.costs.values())  # (N, P)
    seq = torch.stack(c.tokens, -1)  # (N, P, T)
    s = c.n_slots
    lp = torch.stack(c.lps).sum(0).detach()  # (N, P): log p of each whole sequence
    ok = _tables(c, seq.shape[-1], est.eos)[0]
    whole = ok.gather(0, c.slot) & c.slot_ok  # slots that are whole sequences of this length
    # per key (P first): its entries in the order of the plate, slots that are not whole sequences left out;
    # as flat lists (a nested tolist of the tokens took ~8x as long): entry j of key p at p * n + j
    n, _, length = seq.shape
    tokens = seq.transpose(0, 1).reshape(-1).tolist()
    tots, lps = total.t().reshape(-1).tolist(), lp.t().reshape(-1).tolist()
    wholes = whole.t().reshape(-1).tolist()
    eos = est.eos
    return [(key, [(_trim(tokens[(p * n + j) * length:(p * n + j + 1) * length], eos), float(tots[p * n + j]),
                    float(lps[p * n + j])) for j in range(n) if j >= s or wholes[p * s + j]])
            for p, key in enumerate(c.keys)]
