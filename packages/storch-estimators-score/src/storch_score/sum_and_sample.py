"""Sum-and-sample (memory-augmented policy optimisation, MAPO): the one-step estimator.

Registered as ``sum_and_sample`` (alias ``mapo``). With ``buffer=`` the same name builds MAPO's
sequence mode, :class:`~storch_score.sum_and_sample_sequences.SumAndSampleSequences`, a separate
estimator with its own per-node state; ``SumAndSample.__new__`` is the one place that chooses.
"""

from __future__ import annotations

import inspect
import math
from abc import ABCMeta
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Optional, Union

import torch
from torch.distributions import Categorical, Distribution

from storch import CostFrame, Estimator, Node, OptionError, PlateError, PlateTensor
from storch.extending import assume, is_tracing, leave_one_out, options

from ._memory import (VariableTable, _memory_lp, check_in_support, codes_of, first_occurrences, sample_outside,
                      top_k_codes)
from ._sum_and_sample_options import NAME, check_baseline, check_n_enumerate
from ._support import check_one_support, dense, enumerate_joint, masked_logsumexp, n_categories, to_work
from .sum_and_sample_sequences import SumAndSampleSequences

__all__ = ["SumAndSample", "MemoryState"]


class _InitSignature:
    """A class's ``__signature__``: that of its ``__init__`` without ``self`` (what ``inspect.signature`` would
    give without a ``__new__``), for the class and each subclass; none on an instance (its call's)."""

    def __get__(self, obj: Any, cls: type) -> inspect.Signature:
        if obj is not None:
            raise AttributeError("__signature__")
        sig = inspect.signature(cls.__init__)
        return sig.replace(parameters=list(sig.parameters.values())[1:])


@dataclass
class MemoryState:
    """Per-node record of the one-step estimator (filled by ``proposal``; ``lp``, ``log_rest`` and
    ``empty`` by the first of ``weighting_function`` / ``gradient_function``).

    Attributes:
        k: k', the number of memory values (the first k' entries of the plate).
        m: the number of samples from the remainder (the last m entries; 0 if M is everything).
        first: whether each memory value is its first occurrence, bool ``(k', *parents)``.
        logp: log p of every joint value, ``(M, *parents)``, with gradient (enumerated supports).
        idx: joint-support indices of the plate's values, ``(k' + m, *parents)`` (enumerated).
        mask: the memory as a mask over the joint support, bool ``(M, *parents)`` (enumerated).
        beam: the support was too large to enumerate: M came from beam search.
        lp: log p of the plate's values, ``(k' + m, *parents)``, with gradient (``beam``); float32 for a
            float16 / bfloat16 model, as ``log_rest`` and ``rest`` (the components compute in float32,
            ``_support.to_work``, and cast their outputs back).
        table, codes: the per-variable log-probabilities (with gradient) and the plate's values as
            per-variable indices ``(k' + m, P, n)`` (``beam``).
        log_rest: log p(x ∉ M) per parent entry, with gradient.
        empty: where M holds (numerically) all the mass, bool per parent entry (``None`` when ``sure``).
        sure: the common case, known when sampling (``beam``): one memory value, the most probable,
            and p(x ∉ M) > 0 in every entry, so the components need no guards for an empty remainder
            or a repeated memory value (the same values and gradients, ~6 autograd nodes fewer).
        rest: p(x ∉ M) = 1 - p(a) per parent entry, with gradient (``sure``).
        gone: where M holds every possible joint value, counted exactly, bool per parent entry (``beam``
            with samples and values of probability 0; else ``None``).
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
    table: Optional[VariableTable] = None
    codes: Optional[torch.Tensor] = None
    sure: bool = False
    rest: Optional[torch.Tensor] = None
    gone: Optional[torch.Tensor] = None


class SumAndSample(Estimator, metaclass=ABCMeta):
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

    On sequences (``buffer=``): the registered name then builds MAPO's sequence mode, a separate
    estimator (``storch_score.sum_and_sample_sequences.SumAndSampleSequences``, for which
    ``isinstance(est, SumAndSample)`` holds too; docs/estimators/sum_and_sample.md): S memory
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
            values are counted once; a value of probability 0 in an entry is summed there as that
            entry's most probable value instead (the cost never sees it).
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
    plates, e.g. the dataset indices of the batch); required when the first step has a data plate
    (keyed by position, shuffled batches would mix the data points' memories). Tokens may be
    ``Categorical`` or ``OneHotCategorical`` (returned one-hot). Memory slots a key does not use
    follow its first sample with weight 0; log costs with ``storch.cost_estimates()``.

    Example:
        >>> est = storch.estimator("sum_and_sample", plate="z", n_enumerate=2, n_samples=3)
        >>> z = est(torch.distributions.Categorical(logits=theta))
        >>> seq = storch.estimator("mapo", plate="seq", buffer=4, n_samples=4, baseline="leave_one_out", eos=0)
        >>> tokens = [seq(Categorical(logits=decoder(h))) for _ in range(T)]   # one partition

    References:
        [1] Memory Augmented Policy Optimization for Program Synthesis and Semantic Parsing (Liang et al., 2018)
        [2] Rao-Blackwellized Stochastic Gradients for Discrete Distributions (Liu et al., 2019)
    """

    name = NAME
    aliases = ("mapo",)
    requires_enumerate_support = True
    # capabilities of the registered name, buffer= included (SumAndSampleSequences): partitions and an
    # update. On this one-step estimator a second call raises (extend) and the update does nothing.
    supports_partitions = True
    # (named where it is offered for a partition: an order-2 refusal's list of alternatives sent users to
    # sum_and_sample, whose second call without buffer= is refused, and then to a joint Bernoulli of two agents,
    # refused for its batch dim; found by porting LOLA, p-lola)
    partition_options = ("buffer=K (a sequence estimator: storch.estimator('sum_and_sample', plate=..., buffer=4, "
                         "...)), and one token per call: a Categorical, OneHotCategorical or Bernoulli whose batch "
                         "dims are all plates (one call per agent or token)")
    has_update = True
    State = MemoryState

    def check_distribution(self, d: Distribution) -> None:
        check_one_support(self, d)  # (torch's enumerate_support refuses a count per entry)
        super().check_distribution(d)

    # help() and inspect.signature show the constructor's options, not __new__'s (*args, **kwargs)
    __signature__ = _InitSignature()

    def __new__(cls, *args: Any, **kwargs: Any) -> "SumAndSample":
        # the one place the mode is chosen, once per estimator: buffer= builds the sequence estimator
        # (budget= is not used there). No arguments: unpickling or copying.
        if cls is SumAndSample and (args or kwargs):
            try:
                given = inspect.signature(cls.__init__).bind(None, *args, **kwargs).arguments
            except TypeError:  # a misspelled option: __init__ raises the OptionError that names it
                return super().__new__(cls)
            if given.get("buffer") is not None:
                given = {k: v for k, v in given.items() if k not in ("self", "budget")}
                return SumAndSampleSequences(**given)  # type: ignore[return-value]
        return super().__new__(cls)

    def __init__(self, plate: str, n_samples: int = 1, n_enumerate: Optional[int] = None,
                 memory: Optional[Union[torch.Tensor, Callable[[Distribution], torch.Tensor]]] = None,
                 baseline: str = "none", budget: int = 4096, buffer: Optional[int] = None,
                 eos: Optional[int] = None) -> None:
        super().__init__(plate, n_samples)
        if buffer is not None:  # only a subclass gets here: SumAndSample(buffer=...) is a SumAndSampleSequences
            raise OptionError(f"{type(self).__name__}: a subclass of SumAndSample is the one-step estimator; "
                              "for buffer= (sequences) subclass storch_score.sum_and_sample_sequences."
                              "SumAndSampleSequences")
        if eos is not None:
            raise OptionError("sum_and_sample: eos= is for sequences; give buffer= (the memory buffer) as well")
        if memory is not None and n_enumerate is not None:
            raise OptionError("sum_and_sample: give either n_enumerate (the k' most probable values) or memory, not both")
        if memory is not None and not (isinstance(memory, torch.Tensor) or callable(memory)):
            raise OptionError(f"sum_and_sample: memory={memory!r} is not accepted; give a tensor of values or a "
                              "callable distribution -> tensor of values")
        self.n_enumerate = check_n_enumerate(n_enumerate, 1)
        self.leave_one_out = check_baseline(baseline, n_samples)
        self.memory = memory
        self.budget = self.check_option("budget", budget)
        # the one-step estimator keeps no state (its memory is chosen anew in every graph): nothing to
        # update, so storch.backward() runs no update for it and storch.compile does not refuse it.
        # The class attribute stays True: the registered name's capability, buffer= (sequences) included
        self.has_update = False

    fixed_options = {
        "buffer": "buffer= makes another estimator (MAPO's sequence mode, a SumAndSampleSequences)",
        "eos": "eos= is for sequences, which buffer= makes (another estimator)",
    }

    def check_option(self, name: str, value: Any) -> Any:
        if name == "budget":
            return options.integer(NAME, "budget", value, minimum=1)  # a NumPy integer as a Python int
        if name == "n_enumerate":
            if value is not None and self.memory is not None:
                raise OptionError("sum_and_sample: give either n_enumerate (the k' most probable values) or memory, "
                                  "not both (set est.memory = None first)")
            return check_n_enumerate(value, 1)
        if name == "memory":
            if value is not None and not (isinstance(value, torch.Tensor) or callable(value)):
                raise OptionError(f"sum_and_sample: memory={value!r} is not accepted; give a tensor of values or a "
                                  "callable distribution -> tensor of values")
            return value
        value = super().check_option(name, value)
        if name == "n_samples" and self.__dict__.get("leave_one_out") and value < 2:
            raise OptionError(f"{NAME}: baseline='leave_one_out' needs n_samples >= 2, got {value}")
        return value

    def forward(self, distribution: Distribution, inputs: Any = None, *,
                memory_key: Optional[Hashable] = None) -> PlateTensor:
        """Sample the node; ``memory_key`` is for sequences (``buffer=``) only."""
        if memory_key is not None:
            raise OptionError("sum_and_sample: memory_key= is for sequences (buffer=)")
        return super().forward(distribution, inputs)

    def extend(self, node: Node, distribution: Distribution, plates: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        raise PlateError(
            f"estimator {self.name!r} (plate {self.plate!r}) was already used in this graph. On sequences "
            "(one call per token) sum_and_sample needs buffer= (its memory of best sequences); otherwise "
            "create one estimator per stochastic node")

    def get_extra_state(self) -> None:
        # no state; kept so that state_dict() has the key '_extra_state' (None) that checkpoints
        # written before the split hold, and they load strictly
        return None

    def set_extra_state(self, state: Optional[dict]) -> None:
        if state is not None:
            saved = state.get("saved_by") if isinstance(state, dict) else None
            if isinstance(saved, dict) and saved.get("buffer") is None:  # (saved by another estimator: say which)
                raise OptionError(
                    f"sum_and_sample (plate {self.plate!r}) keeps no state, and the checkpoint holds a state for it "
                    f"saved by estimator {saved.get('estimator')!r} ({saved}): construct the estimator as it was "
                    "saved (docs/reliability.md, 'Saving and resuming')")
            raise OptionError("sum_and_sample: this checkpoint holds a memory buffer of sequences; load it into "
                              "an estimator made with buffer= (the same options it was saved with)")

    # -- the components ----------------------------------------------------------------------------

    def proposal(self, node: Node) -> torch.Tensor:
        d = node.distribution
        n_values = n_categories(d) ** math.prod(d.batch_shape[len(node.parents):])
        if n_values > self.budget:
            return self._beyond_budget(node, n_values)
        values, logp = enumerate_joint(node, self.budget, self.name)  # (M, *own, *event), (M, *parents)
        possible = torch.isfinite(logp.detach())  # values of positive probability, (M, *parents)
        n_possible = possible.sum(0)
        tracing = is_tracing()
        if self.memory is None:
            # (on the meta device values are unknown: every value counts as possible; while
            # storch.compile traces, k is what eager code picks when some entry has k' possible values)
            if logp.is_meta or tracing:
                k = min(self.n_enumerate, logp.shape[0])
                if tracing:
                    assume(n_possible.max() >= k, _traced_message(f"fewer than n_enumerate={k} possible values"))
            else:
                k = min(self.n_enumerate, max(1, int(n_possible.max())))
            # the k' most probable values, (k', *parents); detach: choosing M is not differentiated
            top = logp.detach().topk(k, dim=0)
            # an entry with fewer possible values repeats its most probable one (counted once: weight 0)
            first = torch.isfinite(top.values)
            top = torch.where(first, top.indices, top.indices[:1].expand_as(top.indices))
        else:
            top = _memory_indices(self.memory, node, dense(values))
            k = top.shape[0]
            # a memory value of probability 0 in an entry (a mask) is summed there as the entry's most
            # probable value instead, counted once: another memory set, as unbiased, and the user's cost
            # never sees a value the model cannot produce
            ok = torch.isfinite(logp.detach().gather(0, top))
            if tracing or not (logp.is_meta or bool(ok.all())):
                top = torch.where(ok, top, logp.detach().argmax(0, keepdim=True).expand_as(top))
            same = top.unsqueeze(0) == top.unsqueeze(1)  # (k', k', *parents)
            earlier = torch.ones(k, k, dtype=torch.bool, device=top.device).tril(-1)
            first = ~(same & earlier.reshape((k, k) + (1,) * (top.dim() - 1))).any(1)
        mask = torch.zeros(logp.shape, dtype=torch.bool, device=logp.device).scatter(0, top, True)
        # no remainder when M holds every possible value of every entry
        if self.memory is not None or n_possible.is_meta:
            m = self.n_samples
        elif tracing:  # a program cannot branch on values: a remainder unless M lists the whole support
            m = 0 if logp.shape[0] <= k else self.n_samples
            if m:
                assume((n_possible > k).any(), _traced_message(f"no possible value outside the {k} summed ones"))
        else:
            m = 0 if bool((n_possible <= k).all()) else self.n_samples
        idx = top
        if m:
            # sample from the renormalised remainder p(x | x ∉ M); where M holds every possible value,
            # from p (weight p(x ∉ M) = 0, and still a value the model can produce);
            # detach: sampling is not differentiated (the score l carries the gradient)
            rest = logp.detach().masked_fill(mask, -float("inf"))
            rest = torch.where(torch.isfinite(rest).any(0, keepdim=True), rest, logp.detach())
            drawn = Categorical(logits=rest.movedim(0, -1), validate_args=False).sample((m,))  # (m, *parents)
            idx = torch.cat([top, drawn], 0)
        c = node.state
        c.logp, c.idx, c.mask, c.k, c.m, c.first = logp, idx, mask, k, m, first
        return values[idx]

    def _beyond_budget(self, node: Node, n_values: int) -> torch.Tensor:
        """Proposal on a joint support too large to list: memory by beam search, samples by the trie."""
        table = VariableTable(node, grad=True)
        all_possible = table.all_possible
        if self.memory is None:
            codes = top_k_codes(table.lp, self.n_enumerate)  # (k', P, n), distinct
            if all_possible:  # K^n > budget possible joint values per entry
                first = torch.ones(codes.shape[:2], dtype=torch.bool, device=codes.device)
            else:  # only possible values: an entry with fewer than k' repeats its most probable one (counted once)
                first = torch.isfinite(_memory_lp(table.lp, codes).sum(-1))
                codes = torch.where(first.unsqueeze(-1), codes, codes[:1].expand_as(codes))
        else:
            mem = self.memory(node.distribution) if not isinstance(self.memory, torch.Tensor) else self.memory
            if not isinstance(mem, torch.Tensor):
                raise OptionError(f"sum_and_sample: memory must give a tensor of values, got {type(mem).__name__}")
            codes = codes_of(mem, table, self.name)
            if not all_possible:
                # a memory value of probability 0 in an entry is the entry's most probable value there
                # (as on an enumerated support): the cost never sees it
                ok = torch.isfinite(_memory_lp(table.lp.detach(), codes).sum(-1))  # (k', P)
                if is_tracing() or not bool(ok.all()):
                    best = top_k_codes(table.lp.detach(), 1).expand_as(codes)
                    codes = torch.where(ok.unsqueeze(-1), codes, best)
            first = first_occurrences(codes)
        k = codes.shape[0]
        # no remainder when M holds every possible joint value of every entry
        if self.memory is not None:
            m = self.n_samples
        elif all_possible:
            m = 0 if n_values <= k else self.n_samples
        else:
            m = 0 if bool((table.n_possible <= k).all()) else self.n_samples
        gone = None
        if m and not table.all_possible:
            # the entries whose possible joint values are all in M (counted exactly: M holds distinct
            # possible values, the repeats aside). Their remainder is empty although p(M), a sum of
            # rounded probabilities, may fall short of 1: they get weight 0 (_parts), and their draws
            # are from p, never a value of probability 0
            gone = table.n_possible <= first.sum(0)
        if m:
            codes = torch.cat([codes, sample_outside(table.lp, codes, first, m)], 0)
        c = node.state
        c.beam, c.k, c.m, c.first = True, k, m, first.reshape((k,) + table.parents)
        c.gone = None if gone is None else gone.reshape(table.parents)
        # the memory is the most probable value a (each variable's most probable value), and every
        # entry has mass outside it: log p(a) = Σ_j max_v log p_j(v) < 0, with a margin (p(a) < 1 - 1e-6)
        # so that log p(a) computed again with gradient, summed in another order, cannot round to 0
        # (traced: the guarded path, which holds for every value)
        c.sure = bool(k == 1 and m and self.memory is None and all_possible and not table.lp.is_meta
                      and not is_tracing() and bool((table.lp.amax(0).sum(-1) < -1e-6).all()))
        c.table, c.codes = table, codes
        return table.values(codes)

    def _parts(self, node: Node) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        c = node.state
        if c.log_rest is None and c.beam:
            # log p(x) of every drawn value and log p(x ∉ M) = log(1 - Σ_{a ∈ M} p(a)), WITH gradient
            c.lp = lp = to_work(c.table.log_prob(c.codes))  # (k' + m, *parents); float32 for float16 (to_work)
            if c.sure:  # log(1 - p(a)), p(a) < 1 in every entry (no guard; log(-expm1): see below)
                c.rest = -torch.expm1(lp[0])
                c.log_rest = torch.log(c.rest)
                return lp, c.log_rest, None
            if c.k == 1 and c.table.all_possible:  # one memory value, no repeat
                lse = lp[0]
            else:
                mem = lp[:c.k].masked_fill(~c.first, -math.inf)
                lse = torch.logsumexp(mem, 0) if c.k else torch.full_like(lp[0], -math.inf)
            empty = lse >= 0.0  # M holds (numerically) all the mass: no remainder
            if c.gone is not None:  # or exactly: every possible joint value is in M
                empty = empty | c.gone
            c.empty = empty
            safe = torch.where(empty, torch.full_like(lse, -1.0), lse)  # no NaN gradient in the unused branch
            # log(1 - p(M)): log(-expm1) is accurate to float precision in absolute terms, which is what
            # the weight exp(.) and the score lp - log_rest need (and its gradient is accurate everywhere)
            c.log_rest = torch.where(empty, torch.full_like(lse, -math.inf), torch.log(-torch.expm1(safe)))
        if c.beam:
            return c.lp, c.log_rest, c.empty
        # float32 for a float16 / bfloat16 model (to_work): the gather's backward adds the samples' gradients
        # of a repeated value, and log_rest's the whole plate's
        logp = to_work(c.logp)
        if c.log_rest is None:
            # log p(x ∉ M), WITH gradient: stable in log space even when M holds almost all the mass
            # (values of probability 0 count as in M: a remainder of only those is empty, no NaN gradient)
            c.log_rest, c.empty = masked_logsumexp(logp, c.mask | torch.isneginf(c.logp.detach()), 0)
        return logp.gather(0, c.idx), c.log_rest, c.empty

    def weighting_function(self, node: Node) -> torch.Tensor:
        lp, log_rest, _ = self._parts(node)
        k, m = node.state.k, node.state.m
        # w = p(x) on the memory (appendix D.2.3), gradient-carrying like expect (D.1); a repeated
        # memory value counts once (sure: one memory value)
        w_mem = lp[:k].exp() if node.state.sure else lp[:k].exp() * node.state.first
        if not m:
            return _model_dtype(w_mem, node)
        # w = p(x ∉ M) / m on the samples, gradient-carrying (appendix D.2.3)
        w_smp = ((node.state.rest if node.state.sure else log_rest.exp()) / m).unsqueeze(0).expand((m,) + log_rest.shape)
        # cast back after the broadcast: its backward sums the m samples' gradients, ~f each (256 costs of
        # ~400: 1e5, inf in float16, and a NaN gradient through the log-sum-exp), in float32
        return _model_dtype(torch.cat([w_mem, w_smp], 0), node)

    def gradient_function(self, node: Node) -> torch.Tensor:
        lp, log_rest, empty = self._parts(node)
        k, m = node.state.k, node.state.m
        l_mem = torch.zeros_like(lp[:k])
        if not m:
            return _model_dtype(l_mem, node)
        if node.state.sure:  # the remainder is not empty in any entry
            return _model_dtype(torch.cat([l_mem, lp[k:] - log_rest], 0), node)
        # l = log p(x | x ∉ M): the score of the renormalised remainder (0 where M is everything)
        l_smp = torch.where(empty, torch.zeros_like(lp[k:]), lp[k:] - torch.where(empty, torch.zeros_like(log_rest), log_rest))
        return _model_dtype(torch.cat([l_mem, l_smp], 0), node)

    def padding(self, node: Node) -> Optional[torch.Tensor]:
        # a repeated memory value (an entry with fewer possible values than k', or a repeat in the user's memory)
        # is counted once (weight 0 on the others), and where the memory holds every possible value the samples
        # are draws from p at weight p(x ∉ M) = 0; the samples of a non-empty remainder are drawn, not padding
        c = node.state
        _, _, empty = self._parts(node)  # (cached by the weights)
        shape = tuple(p.size for p in node.parents)
        mem = c.first.new_zeros((c.k,) + shape) if c.sure else ~c.first.expand((c.k,) + shape)
        if not c.m:
            return mem
        smp = empty.expand(shape) if empty is not None else mem.new_zeros(shape)
        return torch.cat([mem, smp.unsqueeze(0).expand((c.m,) + shape)], 0)

    def baseline(self, node: Node, cost: CostFrame) -> Optional[torch.Tensor]:
        if not self.leave_one_out or not node.state.m:
            return None
        # leave-one-out over the sampled part only: b_j = 1/(m-1) Σ_{j' ≠ j, j' > k'} f(x_j')
        return leave_one_out(cost, node.n, start=node.state.k)


# a buffer= estimator is a SumAndSample for isinstance (the classes are public for isinstance) without
# inheriting the one-step components
SumAndSample.register(SumAndSampleSequences)


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
    check_in_support(eq.any(-1).all(), NAME)
    idx = eq.to(torch.uint8).argmax(-1)
    return idx.expand((idx.shape[0],) + parents).contiguous()


def _model_dtype(t: torch.Tensor, node: Node) -> torch.Tensor:
    """A component computed in float32 for a float16 / bfloat16 model (``_parts``), in the model's dtype;
    ``t`` itself when it is in that dtype already (float32 and float64 models: no cast)."""
    c = node.state
    dtype = c.table.lp.dtype if c.beam else c.logp.dtype
    return t if t.dtype == dtype else t.to(dtype)


def _traced_message(what: str) -> str:
    return (f"storch.compile traced this sum_and_sample step for the number of summed and sampled values that eager "
            f"code picks when every entry has enough possible values, and a replayed call met {what} in every "
            "entry. Run this step eagerly (without storch.compile), where the sample adapts to the support")
