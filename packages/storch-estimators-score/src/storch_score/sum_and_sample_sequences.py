"""MAPO's sequence mode of ``sum_and_sample``: a memory buffer of the best sequences (``buffer=``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Optional

import torch
from torch.distributions import Distribution

import storch
import storch.distributed

from storch import CostFrame, Estimator, Node, OptionError, PlateTensor
from storch.extending import check_state_record, options, state_record, varying_total_count

from . import _sequences
from ._support import check_one_support
from ._sum_and_sample_options import NAME, SUMMARY, check_baseline, check_n_enumerate

__all__ = ["SumAndSampleSequences", "SequenceState"]


@dataclass
class SequenceState:
    """Per-partition record of the sequence estimator (filled by ``storch_score._sequences``: ``start``
    at the first step, ``step`` at every further one; read by the components and by the buffer update).

    Attributes:
        n_slots: S, the number of memory slots (the first S entries of the plate).
        m: the number of sampled sequences (the last m entries).
        keys: the data points' keys (one per entry of the first step's parent plates).
        mem, mem_len, mem_ok: every buffered sequence per key ``(K, P, T)``, its length and validity.
        mem_range: the smallest and largest token of ``mem`` (each step's tokens are checked one by one only
            where this exceeds the step's values).
        slot, slot_ok: the index into ``mem`` of each slot ``(S, P)`` and whether it is used.
        imp: the importance-sampled slot, bool ``(S, P)``; ``q`` its proposal over ``mem`` ``(K, P)``.
        parents, names: the first step's parent shape and plate names (the node's layout).
        tokens: the tokens of each step, ``(S + m, P)`` per step.
        lps: per step, log p of each entry's token ``(S + m, P)``, with gradient (0 after an end token).
        slot_cum: per grad mode, log p of the slots' prefixes ``(T', S, P)`` of lengths 1..T' (a
            cumulative sum of ``lps``, made where read).
        costs: the cost per entry ``(S + m, P)`` by (cost state name, prefix length), for the buffer update.
        l0: l of the first step (returned by ``gradient_function``).
        slot_seq: the slots' sequences ``(S, P, long)`` (forced token by token); slots_full: whether
            every slot of every key is used (no padding slot to fill in at each step); any_imp: whether
            a key has an importance-sampled slot; is_slot: ``(S + m, 1)``, True on the slots' rows.
        orders: per layout of a step's plate names, the permutations to the first step's layout.
        tables: per prefix length L, whether each memory sequence has an L-prefix and the slots' weight
            factors; weights: per L, w (both read by every cost of that length and by the update).
        finished: ``(S + m, P)``, True where the sequence ended at an earlier step (with an end token).
        mem_ended: ``(K, P)``, True where a memory sequence holds the end token (made where read).
        smp_eq: per prefix length L (index L - 1), whether each sample's L-prefix is each memory
            sequence's ``(m, K, P)`` (one cumulative AND over the steps, extended where read).
        slot_eq: the same for the slots' prefixes ``(S, K, P)``, per length up to the longest memory
            sequence (made once, where read).
    """

    n_slots: int = 0
    m: int = 0
    keys: list = field(default_factory=list)
    mem: Optional[torch.Tensor] = None
    mem_len: Optional[torch.Tensor] = None
    mem_ok: Optional[torch.Tensor] = None
    mem_range: tuple = (0, 0)
    slot: Optional[torch.Tensor] = None
    slot_ok: Optional[torch.Tensor] = None
    imp: Optional[torch.Tensor] = None
    q: Optional[torch.Tensor] = None
    parents: tuple = ()
    names: tuple = ()
    tokens: list = field(default_factory=list)
    lps: list = field(default_factory=list)
    slot_cum: dict = field(default_factory=dict)
    costs: dict = field(default_factory=dict)
    l0: Optional[torch.Tensor] = None
    slot_seq: Optional[torch.Tensor] = None
    slots_full: bool = False
    any_imp: bool = False
    is_slot: Optional[torch.Tensor] = None
    orders: dict = field(default_factory=dict)
    tables: dict = field(default_factory=dict)
    weights: dict = field(default_factory=dict)
    finished: Optional[torch.Tensor] = None
    mem_ended: Optional[torch.Tensor] = None
    smp_eq: list = field(default_factory=list)
    slot_eq: Optional[tuple] = None


class SumAndSampleSequences(Estimator):
    """Sum-and-sample over sequences with MAPO's memory buffer: what ``sum_and_sample`` with ``buffer=`` builds.

    Called once per token in an autoregressive loop (one partition, paper 3.2), it keeps per key (data
    point) the ``buffer`` distinct sequences of lowest total cost found so far, across graphs (updated
    by ``storch.backward()``; in ``state_dict()``). The plate holds S memory slots then m sampled
    sequences (``storch_score._sequences``; docs/estimators/sum_and_sample.md).

    Components (M: the buffered sequences of the key; a the sequence of a slot, x_j a sample):
        q = the slots' sequences forced token by token (δ) · m i.i.d. ancestral samples from p;
        w(a) = p(a) (gradient-carrying); with more buffered sequences than slots, the S - 1 most
        probable exactly and one drawn from the rest with a fixed proposal Q: p(a)/Q(a);
        w(x_j) = 1[x_j ∉ M] / m (rejection);
        l(a) = 0, l(x_j) = log p(x_j) summed over the steps;
        a = the leave-one-out baseline b_j on the samples' scores and its mean on the slots' p(a)
        (``baseline="leave_one_out"``), else 0.

    Requires: one token per step (Categorical, OneHotCategorical or Bernoulli whose batch dims are
    all plates).

    max_order: ∞ — E[c] = Σ_{a∈M} p(a) c(a) + E_p[1[x ∉ M] c(x)] for any memory fixed before the
    graph's samples, the first part exact (D.1), the second the score function of an
    indicator-weighted cost (D.2.1); for a cost at step t the memory is that of the t-prefixes (causal
    credit); the baseline's terms on the slots and on the samples add up to zero in expectation at
    every order (p(M) + p(x ∉ M) = 1), noise drawn per plate entry in the model included.

    Args:
        plate: name of the partition's plate.
        n_samples: m, sampled sequences per graph.
        n_enumerate: S, the most memory slots summed per graph (default: ``buffer``).
        memory: seeds the buffer: a tensor ``(k', T)`` of token sequences (every key), a dict
            ``{key: tensor}`` or a callable ``key -> tensor``.
        baseline: ``"none"`` or ``"leave_one_out"`` (alias ``"batch_average"``; needs n_samples >= 2
            and ``n_enumerate >= buffer``).
        buffer: the sequences kept per key.
        eos: the end-of-sequence token; a sequence that produced it keeps producing it with
            log-probability 0 and is compared up to its end.

    Build it by name: ``storch.estimator("mapo", plate="seq", buffer=4, ...)``; ``isinstance(est,
    storch_score.SumAndSample)`` holds. The first call takes the data points' keys, ``memory_key=``
    (required with a data plate).

    Example:
        >>> seq = storch.estimator("mapo", plate="seq", buffer=4, n_samples=4, baseline="leave_one_out", eos=0)
        >>> tokens = [seq(Categorical(logits=decoder(h))) for _ in range(T)]   # one partition

    References:
        [1] Memory Augmented Policy Optimization for Program Synthesis and Semantic Parsing (Liang et al., 2018)
    """

    name = NAME
    aliases = ("mapo",)
    requires_enumerate_support = True
    supports_partitions = True  # one call per token
    has_update = True  # the buffer of best sequences
    # the buffer update reads the graph's tokens, costs and log-probabilities as values, never the
    # loss's graph: storch.backward() frees that graph in its backward pass (GRU decoder, batch 100:
    # peak memory 7.66 -> 7.05 MB, score + leave-one-out 7.00). storch.compile still refuses it
    # (no replays_update: the buffer is Python per data point)
    update_uses_loss_graph = False
    State = SequenceState

    @classmethod
    def supports(cls, distribution: Distribution) -> bool:
        """The base class's check, and no ``Binomial`` whose ``total_count`` differs between entries
        (:func:`storch.extending.varying_total_count`): the registry's listing agrees with
        :meth:`check_distribution` (kept: its constructor needs options, so the default ``supports`` cannot
        ask an instance built on the class)."""
        return super().supports(distribution) and varying_total_count(distribution) is None

    def check_distribution(self, d: Distribution) -> None:
        check_one_support(self, d)  # (torch's enumerate_support refuses a count per entry)
        super().check_distribution(d)

    fixed_options = {
        "buffer": "the buffer of best sequences is state of this estimator, sized at construction (the new one "
                  "starts it empty)",
        "memory": "it seeds the buffer at construction (the new estimator starts from it)",
        "n_enumerate": "the memory slots are laid out at construction",
        "eos": "the sequences in the buffer end at this value",
    }

    def __init__(self, plate: str, n_samples: int = 1, n_enumerate: Optional[int] = None,
                 memory: Any = None, baseline: str = "none", *, buffer: int, eos: Optional[int] = None) -> None:
        super().__init__(plate, n_samples)
        # the checks return a NumPy integer as a Python int
        buffer = self.buffer = options.integer(NAME, "buffer", buffer, minimum=1,
                                               what="an int >= 1 (sequences kept per key)")
        self.eos = None if eos is None else options.integer(NAME, "eos", eos, what="an int token")
        self._pending_key: Optional[torch.Tensor] = None  # memory_key= of the call in progress
        n_enumerate = check_n_enumerate(n_enumerate, buffer)
        self.leave_one_out = check_baseline(baseline, n_samples)
        if self.leave_one_out and n_enumerate < buffer:
            raise OptionError(
                f"{NAME}: baseline={baseline!r} needs p(x not in memory), i.e. every buffered sequence "
                f"summed each step: n_enumerate ({n_enumerate}) >= buffer ({buffer}); or use baseline='none'")
        self.n_enumerate = n_enumerate
        self.memory = memory
        self.budget = 0  # not used on sequences
        self._buffer = _sequences.SequenceBuffer(buffer)
        self._seed = None if memory is None else self._seeder(memory)

    def extra_repr(self) -> str:
        eos = "" if self.eos is None else f", eos={self.eos}"
        return f"{super().extra_repr()}, n_enumerate={self.n_enumerate}, buffer={self.buffer}{eos}"

    @classmethod
    def describe(cls) -> str:
        """The registered description of ``sum_and_sample`` (``est.info()`` is the same in both modes)."""
        return SUMMARY

    def _seeder(self, memory: Any) -> Callable[[int], list]:
        """``key -> the sequences that seed its buffer``, from the ``memory`` option."""
        def rows(t) -> list:
            if not isinstance(t, torch.Tensor) or t.dim() != 2:
                raise OptionError(f"{NAME}: a memory of sequences is a tensor (k', T) of tokens, got "
                                  f"{type(t).__name__}{'' if not isinstance(t, torch.Tensor) else tuple(t.shape)}")
            out = [_sequences._trim([int(v) for v in r], self.eos) for r in t.long().tolist()]
            if len(set(out)) > self.buffer:
                raise OptionError(f"{NAME}: the memory seeds {len(set(out))} sequences, more than buffer="
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
        raise OptionError(f"{NAME}: memory={memory!r} is not accepted for sequences; give a tensor (k', T), "
                          "a dict key -> tensor or a callable key -> tensor")

    def forward(self, distribution: Distribution, inputs: Any = None, *,
                memory_key: Optional[Hashable] = None) -> PlateTensor:
        """Sample the next step of the sequence; ``memory_key`` (first step): the data points' keys."""
        if memory_key is None:  # (every later token): nothing to hand to proposal, _pending_key stays None
            return super().forward(distribution, inputs)
        memory_key = memory_key.tensor if isinstance(memory_key, storch.PlateTensor) else torch.as_tensor(memory_key)
        self._pending_key = memory_key  # (nn.Module.__setattr__: ~3 us, once per graph)
        try:
            return super().forward(distribution, inputs)
        finally:
            self._pending_key = None

    # -- the components ----------------------------------------------------------------------------

    def proposal(self, node: Node) -> torch.Tensor:
        return _sequences.start(self, node, self._pending_key)

    def extend(self, node: Node, distribution: Distribution, plates: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        sample, l_step = _sequences.step(self, node, distribution, plates)
        # weights of the whole sequences so far: computed when needed (surrogate_loss), since they change
        # with every step; views of earlier steps (causal credit) get the memory of their prefixes
        node.weight_values = None
        return sample, l_step

    def weighting_function(self, node: Node) -> torch.Tensor:
        return _sequences.weights(self, node)

    def gradient_function(self, node: Node) -> torch.Tensor:
        return node.state.l0

    def padding(self, node: Node) -> Optional[torch.Tensor]:
        # a slot its key does not use (fewer buffered sequences than slots) follows the first sample at weight 0;
        # a remembered sequence that became impossible (log p = -inf) holds the most probable tokens at weight 0
        c = node.state
        if not c.n_slots:
            return None
        dead = ~c.slot_ok | torch.isneginf(_sequences._slot_logp(c, len(c.tokens)).detach())  # (S, P)
        pad = torch.cat([dead, dead.new_zeros((c.m,) + dead.shape[1:])], 0)
        return _sequences.to_layout(pad.reshape((c.n_slots + c.m,) + c.parents), node)

    def control_variate(self, node: Node, cost: CostFrame) -> Optional[torch.Tensor]:
        return _sequences.control_variate(self, node, cost)

    # -- the buffer --------------------------------------------------------------------------------

    def update_parameters(self, nodes: list[Node], loss: torch.Tensor) -> None:
        """Offer the graph's sequences and their total costs to the buffer.

        Under ``torch.distributed`` every rank offers every rank's sequences, in rank order
        (``storch.distributed.all_gather_objects``): each rank then holds the buffer of the whole batch, the
        one a single process on it would hold, so a data point keeps its memory when the sampler deals it to
        another rank, and a checkpoint saved on rank 0 holds every key. A key first met in another rank's
        offers is seeded first (``memory=``), as its own first step would have seeded it."""
        offers = [item for node in nodes for item in _sequences.offers(self, node)]
        buffer, seed = self._buffer, self._seed
        for rank_offers in storch.distributed.all_gather_objects(offers, owner=self, what="the buffer's new sequences"):
            for key, items in rank_offers:
                if seed is not None and key not in buffer.entries:
                    buffer.seed(key, seed(key))
                buffer.offer_many(key, items)

    def state_options(self) -> dict:
        """The options that give the buffer its meaning: its size and end token. In the record of a saved state
        (refused where they differ), and in what storch.distributed checks before gathering the ranks' new
        sequences (ranks whose buffers differ in size would each keep another buffer from the same offers)."""
        return {"buffer": self.buffer, "eos": self.eos}

    def get_extra_state(self) -> dict:
        # the buffer, and which estimator saved it with which buffer size and end token (refused where they differ)
        return {**self._buffer.state(), **state_record(self, **self.state_options())}

    def set_extra_state(self, state: Optional[dict]) -> None:
        if state is None:  # None: a checkpoint of a one-step sum_and_sample (no buffer)
            return
        check_state_record(self, state, **self.state_options())
        if state.get("capacity") != self.buffer:  # (a checkpoint from before the record: its size says it too)
            raise OptionError(
                f"{NAME} (plate {self.plate!r}): the checkpoint's buffer keeps {state.get('capacity')!r} sequences per "
                f"key and this estimator buffer={self.buffer}; loaded, the buffer would silently keep the saved size. "
                f"Construct the estimator with buffer={state.get('capacity')!r} to resume (docs/reliability.md, "
                "'Saving and resuming')")
        self._buffer.load(state)
