"""Sum-and-sample (memory-augmented policy optimisation, MAPO)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Optional, Union

import torch
from torch.distributions import Categorical, Distribution

import storch

from storch import CostFrame, Estimator, Node, OptionError, PlateError, PlateTensor
from storch.extending import leave_one_out, options

from . import _sequences
from ._memory import VariableTable, codes_of, first_occurrences, log1mexp, sample_outside, top_k_codes
from ._support import enumerate_joint, masked_logsumexp

__all__ = ["SumAndSample", "MemoryState"]


@dataclass
class MemoryState:
    """Per-node record of sum-and-sample (filled by ``proposal``, or ``extend`` on sequences).

    One node (filled by ``proposal``; ``lp``, ``log_rest`` and ``empty`` by the first of
    ``weighting_function`` / ``gradient_function``):

    Attributes:
        k: k', the number of memory values (the first k' entries of the plate).
        m: the number of samples from the remainder (the last m entries; 0 if M is everything).
        first: whether each memory value is its first occurrence, bool ``(k', *parents)``.
        logp: log p of every joint value, ``(M, *parents)``, with gradient (enumerated supports).
        idx: joint-support indices of the plate's values, ``(k' + m, *parents)`` (enumerated).
        mask: the memory as a mask over the joint support, bool ``(M, *parents)`` (enumerated).
        beam: the support was too large to enumerate: M came from beam search.
        lp: log p of the plate's values, ``(k' + m, *parents)``, with gradient (``beam``).
        log_rest: log p(x ∉ M) per parent entry, with gradient.
        empty: where M holds (numerically) all the mass, bool per parent entry.

    Sequences (``buffer=``; filled by ``storch_score._sequences``, at the first step and every
    ``extend``; read by the components and by ``update_parameters``):

    Attributes:
        seq: the node is a sequence (``buffer=`` given).
        n_slots: S, the number of memory slots (the first S entries of the plate).
        keys: the data points' keys (one per entry of the first step's parent plates).
        mem, mem_len, mem_ok: every buffered sequence per key ``(K, P, T)``, its length and validity.
        slot, slot_ok: the index into ``mem`` of each slot ``(S, P)`` and whether it is used.
        imp: the importance-sampled slot, bool ``(S, P)``; ``q`` its proposal over ``mem`` ``(K, P)``.
        parents, names: the first step's parent shape and plate names (the node's layout).
        tokens: the tokens of each step, ``(S + m, P)`` per step.
        slot_cum, smp_cum: per step, log p of the slots' prefixes (with gradient) and of the samples'
            (detached).
        costs: the cost per entry ``(S + m, P)`` by (cost name, prefix length), for the buffer update.
        l0: l of the first step (returned by ``gradient_function``).
    """

    k: int = 0
    m: int = 0
    first: Optional[torch.Tensor] = None
    logp: Optional[torch.Tensor] = None
    idx: Optional[torch.Tensor] = None
    mask: Optional[torch.Tensor] = None
    beam: bool = False
    lp: Optional[torch.Tensor] = None
    log_rest: Optional[torch.Tensor] = None
    empty: Optional[torch.Tensor] = None
    seq: bool = False
    n_slots: int = 0
    keys: list = field(default_factory=list)
    mem: Optional[torch.Tensor] = None
    mem_len: Optional[torch.Tensor] = None
    mem_ok: Optional[torch.Tensor] = None
    slot: Optional[torch.Tensor] = None
    slot_ok: Optional[torch.Tensor] = None
    imp: Optional[torch.Tensor] = None
    q: Optional[torch.Tensor] = None
    parents: tuple = ()
    names: tuple = ()
    tokens: list = field(default_factory=list)
    slot_cum: list = field(default_factory=list)
    smp_cum: list = field(default_factory=list)
    costs: dict = field(default_factory=dict)
    l0: Optional[torch.Tensor] = None


# baseline option -> (the accepted names; 'batch_average' is an alias of 'leave_one_out')
_BASELINES = ("none", "leave_one_out", "batch_average")


class SumAndSample(Estimator):
    """Sum exactly over a memory set M of values and sample the rest from p(x | x ∉ M) (appendix D.2.3).

    Components (M: the k' most probable joint values, or a user-given memory; m samples outside M):
        q(X | x<i) = δ_M · Π_{j=1..m} p(x_j | x_j ∉ M, x<i);
        w(x) = p(x | x<i) for x ∈ M, p(x ∉ M | x<i) / m for a sample (both carry gradient);
        l(x) = 0 for x ∈ M, log p(x | x ∉ M, x<i) = log p(x | x<i) - log p(x ∉ M | x<i) for a sample;
        a(x<i, X) = (1 - MagicBox(l(x))) ⊥b(x) with b the leave-one-out mean over the m samples
        (``baseline="leave_one_out"``), else 0.

    Requires: a distribution with a finite support (``enumerate_support``: Bernoulli, Categorical,
    OneHotCategorical, ...). A joint support of at most ``budget`` values (K^n for n batch elements)
    is enumerated; a larger one (e.g. the 20 Bernoulli latents of a VAE) never is: the k' most
    probable joint values are found by deterministic beam search over the n independent variables
    (exact for independent variables), and the samples are drawn from p(x | x ∉ M) exactly by
    ancestral sampling over the trie of M (``storch_score._memory``). The estimate is the same.

    On sequences (``buffer=``; storch_score._sequences, docs/estimators/sum_and_sample.md): S memory
    slots then m sampled sequences; q = the buffered sequences forced token by token (δ) · m i.i.d.
    ancestral samples from p; w = p(a) on a slot (p(a)/Q(a) on an importance-sampled one),
    1[x ∉ M]/m on a sample (rejection); l = 0 on a slot, log p(x) on a sample; a = the leave-one-out
    baseline on the remainder's conditional score plus one shift of the whole estimate; max_order ∞.

    max_order: ∞ — the estimate is Σ_{x∈M} p(x) f(x) + p(x ∉ M) · (score estimate of E[f | x ∉ M]):
    the first part is exact (D.1), the second the score function of the renormalised remainder
    (D.2.1), and the product rule holds at every order; the baseline is zero-mean under the
    remainder at every order because l is its normalised log-probability (appendix C).

    Args:
        plate: name of the node's plate (its size is |M| + n_samples, or K^n if M is everything).
        n_samples: m, the number of samples from the remainder (with replacement).
        n_enumerate: k', the number of most probable joint values summed exactly (default 1).
        memory: instead of the k' most probable values, a user-given memory set: a tensor of
            values ``(k', *own_batch, *event)`` or ``(k', *parent_plates, *own_batch, *event)``, or a
            callable that gets the node's raw distribution and returns such a tensor. Repeated
            values are counted once.
        baseline: ``"none"`` or ``"leave_one_out"`` (alias ``"batch_average"``, needs n_samples >= 2).
        budget: the largest joint support that is enumerated.
        buffer: sequences (MAPO's memory buffer, paper 3.2 and D.2.3): called once per token in an
            autoregressive loop (one partition), the estimator keeps per key (data point) the
            ``buffer`` distinct sequences of lowest total cost found so far, across graphs (updated by
            ``storch.backward()``; in ``state_dict()``). Each graph sums exactly over up to
            ``n_enumerate`` (default: ``buffer``) of them, forced token by token, and draws
            ``n_samples`` sequences from p, rejecting those in the memory; when the buffer holds more
            than ``n_enumerate``, the most probable ``n_enumerate - 1`` are summed and one more is
            drawn from the rest by importance sampling. ``memory`` then seeds the buffer: a tensor
            ``(k', T)`` of token sequences (every key), a dict ``{key: tensor}`` or a callable
            ``key -> tensor``. Costs that depend on a prefix get the memory of prefixes (causal
            credit). See ``storch_score._sequences``.
        eos: with ``buffer``: the end-of-sequence token; a sequence that produced it is finished:
            it keeps producing ``eos`` with log-probability 0 (stops contributing), and sequences
            are compared up to their end.

    A sequence estimator takes the key of each data point at its first call:
    ``est(Categorical(logits=...), memory_key=ids)`` (one int per entry of the first step's
    plates; default: the entry's position).

    Example:
        >>> est = storch.estimator("sum_and_sample", plate="z", n_enumerate=2, n_samples=3)
        >>> z = est(torch.distributions.Categorical(logits=theta))
        >>> seq = storch.estimator("mapo", plate="seq", buffer=4, n_samples=4, baseline="leave_one_out", eos=0)
        >>> tokens = [seq(Categorical(logits=decoder(h))) for _ in range(T)]   # one partition

    References:
        [1] Memory Augmented Policy Optimization for Program Synthesis and Semantic Parsing (Liang et al., 2018)
        [2] Rao-Blackwellized Stochastic Gradients for Discrete Distributions (Liu et al., 2019)
    """

    name = "sum_and_sample"
    aliases = ("mapo",)
    requires_enumerate_support = True
    supports_partitions = True  # with buffer= (sequences); otherwise a second call raises
    has_update = True  # the buffer of best sequences
    State = MemoryState

    def __init__(self, plate: str, n_samples: int = 1, n_enumerate: Optional[int] = None,
                 memory: Optional[Union[torch.Tensor, Callable[[Distribution], torch.Tensor]]] = None,
                 baseline: str = "none", budget: int = 4096, buffer: Optional[int] = None,
                 eos: Optional[int] = None) -> None:
        super().__init__(plate, n_samples)
        self.buffer = buffer
        self.eos = eos
        self._pending_key = None
        if buffer is not None:
            self._init_sequences(n_enumerate, memory, baseline, buffer, eos)
            return
        if eos is not None:
            raise OptionError("sum_and_sample: eos= is for sequences; give buffer= (the memory buffer) as well")
        if memory is not None and n_enumerate is not None:
            raise OptionError("sum_and_sample: give either n_enumerate (the k' most probable values) or memory, not both")
        if memory is not None and not (isinstance(memory, torch.Tensor) or callable(memory)):
            raise OptionError(f"sum_and_sample: memory={memory!r} is not accepted; give a tensor of values or a "
                              "callable distribution -> tensor of values")
        n_enumerate = options.integer("sum_and_sample", "n_enumerate", 1 if n_enumerate is None else n_enumerate,
                                      minimum=0)
        options.choice("sum_and_sample", "baseline", baseline, _BASELINES)
        if baseline != "none" and n_samples < 2:
            raise OptionError(f"sum_and_sample: baseline={baseline!r} needs n_samples >= 2, got {n_samples}")
        options.integer("sum_and_sample", "budget", budget, minimum=1)
        self.n_enumerate = n_enumerate
        self.memory = memory
        self.leave_one_out = baseline != "none"
        self.budget = budget

    def _init_sequences(self, n_enumerate, memory, baseline, buffer, eos) -> None:
        options.integer("sum_and_sample", "buffer", buffer, minimum=1, what="an int >= 1 (sequences kept per key)")
        if eos is not None:
            options.integer("sum_and_sample", "eos", eos, what="an int token")
        n_enumerate = options.integer("sum_and_sample", "n_enumerate", buffer if n_enumerate is None else n_enumerate,
                                      minimum=0)
        options.choice("sum_and_sample", "baseline", baseline, _BASELINES)
        if baseline != "none" and self.n_samples < 2:
            raise OptionError(f"sum_and_sample: baseline={baseline!r} needs n_samples >= 2, got {self.n_samples}")
        if baseline != "none" and n_enumerate < buffer:
            raise OptionError(
                f"sum_and_sample: baseline={baseline!r} needs p(x not in memory), i.e. every buffered sequence "
                f"summed each step: n_enumerate ({n_enumerate}) >= buffer ({buffer}); or use baseline='none'")
        self.n_enumerate = n_enumerate
        self.memory = memory
        self.leave_one_out = baseline != "none"
        self.budget = 0
        self._buffer = _sequences.SequenceBuffer(buffer)
        self._seed = None if memory is None else self._seeder(memory)

    def _seeder(self, memory):
        def rows(t) -> list:
            if not isinstance(t, torch.Tensor) or t.dim() != 2:
                raise OptionError("sum_and_sample: a memory of sequences is a tensor (k', T) of tokens, got "
                                  f"{type(t).__name__}{'' if not isinstance(t, torch.Tensor) else tuple(t.shape)}")
            out = [_sequences._trim([int(v) for v in r], self.eos) for r in t.long().tolist()]
            if len(set(out)) > self.buffer:
                raise OptionError(f"sum_and_sample: the memory seeds {len(set(out))} sequences, more than buffer="
                                  f"{self.buffer}")
            return out

        if isinstance(memory, torch.Tensor):
            fixed = rows(memory)
            return lambda key: fixed
        if isinstance(memory, dict):
            table = {int(k): rows(v) for k, v in memory.items()}
            return lambda key: table.get(key, [])
        if callable(memory):
            return lambda key: rows(memory(key))
        raise OptionError(f"sum_and_sample: memory={memory!r} is not accepted for sequences; give a tensor (k', T), "
                          "a dict key -> tensor or a callable key -> tensor")

    def forward(self, distribution: Distribution, *args: Any, memory_key: Optional[Hashable] = None,
                **kwargs: Any) -> PlateTensor:
        """Sample the node (or the next step of the sequence); ``memory_key``: the data points' keys."""
        if memory_key is not None and self.buffer is None:
            raise OptionError("sum_and_sample: memory_key= is for sequences (buffer=)")
        if memory_key is not None:
            memory_key = memory_key.tensor if isinstance(memory_key, storch.PlateTensor) else torch.as_tensor(memory_key)
        self._pending_key = memory_key
        try:
            return super().forward(distribution, *args, **kwargs)
        finally:
            self._pending_key = None

    # -- sequences (buffer=) -----------------------------------------------------------------------

    def extend(self, node: Node, distribution: Distribution, plates: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        if not node.state.seq:
            raise PlateError(
                f"estimator {self.name!r} (plate {self.plate!r}) was already used in this graph. On sequences "
                "(one call per token) sum_and_sample needs buffer= (its memory of best sequences); otherwise "
                "create one estimator per stochastic node")
        sample, l_step = _sequences.step(self, node, distribution, plates)
        # weights of the whole sequences so far: computed when needed (surrogate_loss), since they change
        # with every step; views of earlier steps (causal credit) get the memory of their prefixes
        node.weight_values = None
        return sample, l_step

    def control_variate(self, node: Node, cost: CostFrame) -> Optional[torch.Tensor]:
        if node.state.seq:
            return _sequences.control_variate(self, node, cost)
        return super().control_variate(node, cost)

    def update_parameters(self, nodes: list[Node], loss: torch.Tensor) -> None:
        """Offer the graph's sequences and their total costs to the buffer (sequences only)."""
        for node in nodes:
            if node.state.seq:
                _sequences.update(self, node)

    def get_extra_state(self) -> dict:
        return None if self.buffer is None else self._buffer.state()

    def set_extra_state(self, state: dict) -> None:
        if state is not None:
            self._buffer.load(state)

    # -- one node --------------------------------------------------------------------------------

    def proposal(self, node: Node) -> torch.Tensor:
        if self.buffer is not None:
            return _sequences.start(self, node, self._pending_key)
        d = node.distribution
        n_values = d.enumerate_support(expand=False).shape[0] ** math.prod(d.batch_shape[len(node.parents):])
        if n_values > self.budget:
            return self._beyond_budget(node, n_values)
        values, logp = enumerate_joint(node, self.budget, self.name)  # (M, *own, *event), (M, *parents)
        size = values.shape[0]
        if self.memory is None:
            k = min(self.n_enumerate, size)
            # the k' most probable values, (k', *parents); detach: choosing M is not differentiated
            top = logp.detach().topk(k, dim=0).indices
            first = torch.ones(top.shape, dtype=torch.bool, device=top.device)
        else:
            top = _memory_indices(self.memory, node, values)
            k = top.shape[0]
            same = top.unsqueeze(0) == top.unsqueeze(1)  # (k', k', *parents)
            earlier = torch.ones(k, k, dtype=torch.bool, device=top.device).tril(-1)
            first = ~(same & earlier.reshape((k, k) + (1,) * (top.dim() - 1))).any(1)
        mask = torch.zeros(logp.shape, dtype=torch.bool, device=logp.device).scatter(0, top, True)
        m = 0 if (self.memory is None and k == size) else self.n_samples
        idx = top
        if m:
            # sample from the renormalised remainder p(x | x ∉ M); where M is everything, from p (weight 0);
            # detach: sampling is not differentiated (the score l carries the gradient)
            rest = logp.detach().masked_fill(mask, -float("inf"))
            rest = torch.where(mask.all(0, keepdim=True), logp.detach(), rest)
            drawn = Categorical(logits=rest.movedim(0, -1), validate_args=False).sample((m,))  # (m, *parents)
            idx = torch.cat([top, drawn], 0)
        c = node.state
        c.logp, c.idx, c.mask, c.k, c.m, c.first = logp, idx, mask, k, m, first
        return values[idx]

    def _beyond_budget(self, node: Node, n_values: int) -> torch.Tensor:
        """Proposal on a joint support too large to list: memory by beam search, samples by the trie."""
        table = VariableTable(node)
        if self.memory is None:
            codes = top_k_codes(table.lp, self.n_enumerate)  # (k', P, n), distinct
            first = torch.ones(codes.shape[:2], dtype=torch.bool, device=codes.device)
        else:
            mem = self.memory(node.distribution) if not isinstance(self.memory, torch.Tensor) else self.memory
            if not isinstance(mem, torch.Tensor):
                raise OptionError(f"sum_and_sample: memory must give a tensor of values, got {type(mem).__name__}")
            codes = codes_of(mem, table, self.name)
            first = first_occurrences(codes)
        k = codes.shape[0]
        m = 0 if (self.memory is None and k == n_values) else self.n_samples
        if m:
            codes = torch.cat([codes, sample_outside(table.lp, codes, first, m)], 0)
        c = node.state
        c.beam, c.k, c.m, c.first = True, k, m, first.reshape((k,) + table.parents)
        return table.values(codes)

    def _parts(self, node: Node) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        c = node.state
        if c.log_rest is None and c.beam:
            # log p(x) of every drawn value and log p(x ∉ M) = log(1 - Σ_{a ∈ M} p(a)), WITH gradient
            c.lp = lp = node.log_prob(node.sample)  # (k' + m, *parents)
            mem = lp[:c.k].masked_fill(~c.first, -math.inf)
            lse = torch.logsumexp(mem, 0) if c.k else torch.full_like(lp[0], -math.inf)
            c.empty = empty = lse >= 0.0  # M holds (numerically) all the mass: no remainder
            safe = torch.where(empty, torch.full_like(lse, -1.0), lse)  # no NaN gradient in the unused branch
            c.log_rest = torch.where(empty, torch.full_like(lse, -math.inf), log1mexp(safe))
        if c.beam:
            return c.lp, c.log_rest, c.empty
        if c.log_rest is None:
            # log p(x ∉ M), WITH gradient: stable in log space even when M holds almost all the mass
            c.log_rest, c.empty = masked_logsumexp(c.logp, c.mask, 0)
        return c.logp.gather(0, c.idx), c.log_rest, c.empty

    def weighting_function(self, node: Node) -> torch.Tensor:
        if node.state.seq:
            return _sequences.weights(self, node)
        lp, log_rest, _ = self._parts(node)
        k, m = node.state.k, node.state.m
        # w = p(x) on the memory (appendix D.2.3), gradient-carrying like expect (D.1)
        w_mem = lp[:k].exp() * node.state.first
        if not m:
            return w_mem
        # w = p(x ∉ M) / m on the samples, gradient-carrying (appendix D.2.3)
        w_smp = (log_rest.exp() / m).unsqueeze(0).expand((m,) + log_rest.shape)
        return torch.cat([w_mem, w_smp], 0)

    def gradient_function(self, node: Node) -> torch.Tensor:
        if node.state.seq:
            return node.state.l0
        lp, log_rest, empty = self._parts(node)
        k, m = node.state.k, node.state.m
        l_mem = torch.zeros_like(lp[:k])
        if not m:
            return l_mem
        # l = log p(x | x ∉ M): the score of the renormalised remainder (0 where M is everything)
        l_smp = torch.where(empty, torch.zeros_like(lp[k:]), lp[k:] - torch.where(empty, torch.zeros_like(log_rest), log_rest))
        return torch.cat([l_mem, l_smp], 0)

    def baseline(self, node: Node, cost: CostFrame) -> Optional[torch.Tensor]:
        if not self.leave_one_out or not node.state.m:
            return None
        # leave-one-out over the sampled part only: b_j = 1/(m-1) Σ_{j' ≠ j, j' > k'} f(x_j')
        return leave_one_out(cost, node.n, start=node.state.k)


def _memory_indices(memory, node: Node, values: torch.Tensor) -> torch.Tensor:
    """Joint-support indices ``(k', *parents)`` of the user's memory values."""
    d = node.distribution
    mem = memory(d) if callable(memory) and not isinstance(memory, torch.Tensor) else memory
    if not isinstance(mem, torch.Tensor):
        raise OptionError(f"sum_and_sample: memory must give a tensor of values, got {type(mem).__name__}")
    per_value = values.shape[1:]  # (*own, *event)
    parents = tuple(d.batch_shape[:len(node.parents)])
    mem = mem.to(values.device)
    if tuple(mem.shape[1:]) == tuple(per_value):
        mem = mem.reshape((mem.shape[0],) + (1,) * len(parents) + tuple(per_value))
    elif tuple(mem.shape[1:]) != parents + tuple(per_value):
        raise OptionError(
            f"sum_and_sample: memory has shape {tuple(mem.shape)}; expected (k', *own_batch, *event) = "
            f"(k', {', '.join(map(str, per_value))}) or with the parent plates {parents} after k'")
    flat_v = values.reshape(values.shape[0], -1).to(mem.dtype)  # (M, F)
    flat_m = mem.reshape(mem.shape[:1 + len(parents)] + (-1,))  # (k', *parents or 1s, F)
    eq = (flat_m.unsqueeze(-2) == flat_v).all(-1)  # (k', *parents, M)
    if not bool(eq.any(-1).all()):
        raise OptionError("sum_and_sample: a memory value is not in the support of the node's distribution")
    idx = eq.to(torch.uint8).argmax(-1)
    return idx.expand((idx.shape[0],) + parents).contiguous()
