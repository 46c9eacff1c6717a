"""The unordered set estimator: sampling without replacement with the built-in baseline."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch.distributions import Categorical, Distribution

from storch import CostFrame, Estimator, Node, OptionError, StorchError
from storch.extending import align, is_tracing, options, table_cache

from ._beam import _gumbel_like, beam_step, order_gumbels, sample_without_replacement, top_possible
from ._support import REDUCED, check_one_support, dense, enumerate_joint, enumerate_values, n_categories, to_work

__all__ = ["UnorderedSet", "SetState"]


@dataclass
class SetState:
    """Per-node record of the unordered set estimator (filled by ``proposal``).

    Attributes:
        lp: log p(s) of the k drawn values, shape ``(k, *parents)``, with gradient; float32 for a float16 /
            bfloat16 model (``to_work``: the weights and the baseline's coefficients are computed from it).
        dtype: the model's dtype (of the log-probabilities it gives, before ``to_work``): l and w are returned
            in it.
        log_rest: log(1 - p(S)) per parent entry (detached; float32 for a float16 / bfloat16 model, as the
            set probabilities are computed).
        h: the weights w(s) and (with the baseline) the baseline's coefficients A[s, s'], from the set
            probabilities, computed once by the first component that needs them (weights or baseline).
        g: the perturbed log-probabilities (Gumbel values) of the kept values or prefixes (stochastic
            beam search continues from them at the next step of a partition).
        phi: on a partition, log p of each kept prefix (detached), the beam's scores.
        exact: every drawn value is possible (no padding slot of log-probability -inf); set where the
            sampler knows it.
    """

    lp: Optional[torch.Tensor] = None
    log_rest: Optional[torch.Tensor] = None
    h: Optional[tuple] = None
    g: Optional[torch.Tensor] = None
    phi: Optional[torch.Tensor] = None
    exact: bool = False
    dtype: torch.dtype = torch.float32

_MAX_SAMPLES = 16  # the set probabilities take a 2^k dynamic programme


class UnorderedSet(Estimator):
    """Unordered set estimator: k distinct samples (Gumbel-top-k) reweighted exactly (appendix D.2.3).

    With S the unordered sample and p^{D∖C}(S∖C) the probability of drawing S∖C without
    replacement from the domain without C (p renormalised), R(S, s) = p^{D∖{s}}(S∖{s}) / p(S):

    Components:
        q(X | x<i) = an ordered sample without replacement of k values (Gumbel-top-k);
        w(s) = ⊥(p(s) R(S, s)) (detached);
        l(s) = log p(s | x<i);
        a(x<i, X) = (1 - MagicBox(l(s))) ⊥b(s) with the built-in baseline of Kool et al. (2020)
        b(s) = Σ_{s'∈S} p(s') R^{D∖{s}}(S, s') f(s'), R^{D∖{s}}(S, s) = 1 and
        R^{D∖{s}}(S, s') = p^{D∖{s,s'}}(S∖{s,s'}) / p^{D∖{s}}(S∖{s}); or none (``baseline=False``).

    All set probabilities come from one exact dynamic programme over the subsets of S
    (h(C) = p^{D∖C}(S∖C) for every C ⊆ S), so there is no quadrature error: in float64 without
    exp/log per layer where p(D∖S) or every p(s) is not tiny (q(C) = h(C) / Π_{x∈S∖C} p(x)), in log
    space elsewhere, so extreme logits or k = K (every value drawn: the estimate becomes the exact
    expectation) give no NaN.

    Requires: a distribution with a finite support (Bernoulli, Categorical, OneHotCategorical, ...);
    k <= 16 (larger k only when the sample is the whole support, where the estimate is exact). A joint support of at most ``budget`` values (K^n for n batch elements) is enumerated;
    a larger one (e.g. 20 Bernoulli latents of a VAE) is sampled without listing the K^n values:
    as the first k distinct of 2k i.i.d. joint draws (successive sampling, the same distribution as
    Gumbel-top-k), rows with fewer distinct draws completed by stochastic beam search over the n
    independent variables (Kool et al., 2019), several variables per beam step
    (``storch_score._beam.sample_without_replacement``).

    On a partition (the estimator called at every step of a sequence, docs/partitions.md) the
    sample is drawn by stochastic beam search over the sequences: at each step the k best
    perturbed prefixes survive (their parents are recorded, so tensors of earlier steps follow
    them), S is a sample without replacement of whole sequences and p(s) is a sequence's
    probability. Costs of earlier steps are credited to the whole sequence (``causal_credit`` is
    False: the weights belong to the final set).

    max_order: 1 with the baseline (Kool et al. prove it zero-mean at orders 0 and 1 only; paper,
    D.2.3); ∞ without it, since the weights are detached and E[Σ w f] = E[f] (D.2.3).

    Args:
        plate: name of the node's plate (its size is min(k, number of joint values of positive
            probability); an entry with fewer pads its set with weight-0 repeats of a possible value).
        n_samples: k, the number of distinct samples.
        baseline: use the built-in baseline (needs n_samples >= 2).
        budget: the largest joint support that is enumerated (beyond it: i.i.d. draws and beam search).
        eos: for a partition (called at every step of a sequence): the index (in the support) of the
            end-of-sequence value; a finished sequence stays in the beam as a candidate and draws it
            again with probability 1 (variable length). ``None``: fixed length.

    Example:
        >>> est = storch.estimator("unordered_set", plate="z", n_samples=4)
        >>> z = est(torch.distributions.Categorical(logits=theta))

    References:
        [1] Estimating Gradients for Discrete Random Variables by Sampling without Replacement (Kool et al., 2020)
        [2] Stochastic Beams and Where to Find Them (Kool et al., 2019)
    """

    name = "unordered_set"
    max_order: float = 1  # (math.inf on an instance without the baseline: float, not int)
    higher_order_options = "unordered_set(baseline=False) is unbiased at every order"
    requires_enumerate_support = True
    supports_partitions = True
    causal_credit = False  # the weights belong to the final set of sequences
    State = SetState

    def check_distribution(self, d: Distribution) -> None:
        check_one_support(self, d)  # (torch's enumerate_support refuses a count per entry)
        super().check_distribution(d)

    def __init__(self, plate: str, n_samples: int = 2, baseline: bool = True, budget: int = 4096,
                 eos: Optional[int] = None) -> None:
        super().__init__(plate, n_samples)
        if not isinstance(baseline, bool):
            raise OptionError(f"unordered_set: baseline must be True (the built-in baseline) or False, got {baseline!r}")
        if baseline and n_samples < 2:
            raise OptionError(f"unordered_set: the built-in baseline needs n_samples >= 2, got {n_samples}; "
                              "use baseline=False for a single sample")
        self.use_baseline = baseline
        self.eos = self.check_option("eos", eos)
        self.budget = self.check_option("budget", budget)
        if not baseline:
            self.max_order = math.inf  # detached weights, no baseline: any order (D.2.3)

    def check_option(self, name: str, value: Any) -> Any:
        if name == "eos":
            return options.optional_index("unordered_set", "eos", value, "None or the index of the end value in the support")
        if name == "budget":
            return options.integer("unordered_set", "budget", value, minimum=1)  # a NumPy integer as an int
        value = super().check_option(name, value)
        if name == "n_samples" and self.__dict__.get("use_baseline") and value < 2:
            raise OptionError(f"unordered_set: the built-in baseline needs n_samples >= 2, got {value}; "
                              "use baseline=False for a single sample")
        return value

    def proposal(self, node: Node) -> torch.Tensor:
        d = node.distribution
        n_cat = n_categories(d)
        n_values = n_cat ** math.prod(d.batch_shape[len(node.parents):])
        if n_values <= self.budget:
            # one Categorical variable per entry: its values are arange(K), so the sample values[idx] is idx
            # itself and log p of every value the normalised logits (what enumerate_joint returns), read directly
            if type(d) is Categorical and len(d.batch_shape) == len(node.parents):
                values, logp = None, d.logits.movedim(-1, 0)
            else:
                values, logp = enumerate_joint(node, self.budget, self.name)  # (M, *own, *event), (M, *parents)
            # Gumbel-top-k: the k largest of log p + Gumbel noise are an ordered sample without
            # replacement; detach: sampling is not differentiated (the score l carries the gradient).
            # Only values of positive probability: k = min(n_samples, the size of the support), and an
            # entry with a smaller support repeats its first value in the extra slots, with p = 0
            # (weight 0): the user's cost never sees a value the model cannot produce.
            gumbel = _gumbel_like(logp)
            idx, g, pad = top_possible((logp.detach() + gumbel).movedim(0, -1), self.n_samples)
            # (k, *parents), contiguous: the sample `values[idx]` follows idx's layout, and the model
            # reads it faster in the plates' order than as a transposed view
            idx, g = idx.movedim(-1, 0).contiguous(), g.movedim(-1, 0)
            with torch.no_grad():  # log(1 - p(S)), exact: log-sum-exp of the values not drawn (-inf where none is
                # left; float32 for a float16 / bfloat16 model, to_work). clone keeps logp's layout, in which
                # the sum runs in the order masked_logsumexp's did (same bits; scatter would make it contiguous)
                log_rest = torch.logsumexp(to_work(logp.detach()).clone().scatter_(0, idx, -math.inf), 0)
            node.state.dtype = logp.dtype
            lp = to_work(logp.gather(0, idx))
            node.state.lp = lp if pad is None else lp.masked_fill(pad.movedim(-1, 0), -math.inf)
            node.state.exact = pad is None
            node.state.log_rest, node.state.g = log_rest, g
            return idx if values is None else values[idx]
        # too many joint values to list: the same Gumbel-top-k sample from i.i.d. draws (their first
        # distinct values) or by stochastic beam search; g is drawn later if a partition needs it
        # lp: float32 for a float16 model; dtype: the model's log-probabilities' (l and w return in it)
        values, lp, g, node.state.dtype = sample_without_replacement(node, self.n_samples)
        with torch.no_grad():  # log(1 - p(S)), accurate in absolute terms (a log-weight): p(S) = Σ_s p(s)
            # without logsumexp's shift (each p(s) <= 1: nothing overflows, and where every p(s)
            # underflows, 1 - p(S) is 1), log1p as log(-expm1(log p(S))) (a third of logsumexp's time)
            # (float32 for a float16 model, as masked_logsumexp's: 1 - p(S) near 0 kept 3 digits; to_work)
            log_rest = torch.log1p(lp.detach().exp().sum(0).clamp_max(1.0).neg())
            if g is not None:
                # a padded entry (weight-0 repeats of log p -inf) holds every possible value: p(D∖S) is 0
                # exactly, where the sum above can leave a rounding remainder (Σ p(s) = 1 - 1e-16: log 1e-16,
                # or log eps from the clamped log_prob of probs of exactly 0 or 1). That remainder against
                # the padding's floor (log 0 -> -1e30) cost the set probabilities every digit: weight 1 on
                # each element, the padding included
                log_rest = log_rest.masked_fill(torch.isneginf(lp.detach()).any(0), -math.inf)
        node.state.lp, node.state.log_rest, node.state.g = lp, log_rest, g
        node.state.exact = g is None  # the i.i.d. path: k possible values, no padding
        return values

    def extend(self, node: Node, distribution: Distribution, plates: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        """Step t of a partition: one step of stochastic beam search over the sequences (Kool et al.,
        2019): the k best perturbed prefixes survive, their parents are recorded in the lineage, so
        tensors of earlier steps follow their prefixes. The set of sequences at the last step is a
        sample without replacement from the sequence distribution, and the set probabilities are
        those of whole sequences."""
        if self.eos is not None and is_tracing():
            # a finished prefix's children are eos (log p 0) and impossible values (-inf): the beam masks
            # and pads, by values; the traced beam assumes every child possible
            raise StorchError(
                f"storch.compile cannot trace unordered_set with eos= over sequences (plate {self.plate!r}): "
                "finished sequences make impossible children, which the beam masks by value. Run this step "
                "eagerly, or trace it without eos= (sequences of a fixed length compile)")
        c = node.state
        prev = (node.plate,) + node.parents
        if self.eos is None and type(distribution) is Categorical and len(distribution.batch_shape) == len(plates):
            # one Categorical variable per entry: values arange(K), so the step's sample values[value] is value
            values, lp = None, distribution.logits.movedim(-1, 0)
        else:
            values, lp = enumerate_values(distribution, len(plates), self.budget, self.name, self.plate)  # (M, *plates)
        if self.eos is not None:  # a finished prefix continues with eos, with probability 1
            done = align(node.finished, prev, plates).expand(tuple(p.size for p in plates))
            is_end = self.is_eos(distribution, dense(values), len(plates)).reshape((-1,) + (1,) * len(plates))
            forced = torch.where(is_end, torch.zeros((), dtype=lp.dtype), torch.full((), -math.inf, dtype=lp.dtype))
            lp = torch.where(done.unsqueeze(0), forced, lp)
        lp = lp.expand((lp.shape[0],) + tuple(p.size for p in plates))
        # detach: which prefixes survive is sampled, not differentiated (l_t carries the gradient)
        phi = align(c.phi if c.phi is not None else c.lp.detach(), prev, plates).expand(lp.shape[1:])
        if c.g is None:  # the first sample came without Gumbels: draw them given the sample
            c.g = order_gumbels(c.lp.detach())
        g = align(c.g, prev, plates).expand(lp.shape[1:])
        # (in float32 for a float16 / bfloat16 model, to_work: the prefixes' scores phi sum a step's log p each)
        parent, value, g, phi, left, pad = beam_step(to_work(lp.detach()), phi, g, self.n_samples)
        node.plate.lineage.set_parents(node.step + 1, parent, plates[1:])
        # l_t of each surviving prefix: log p(value | parent prefix), with gradient
        step_lp = lp.gather(1, parent.unsqueeze(0).expand((lp.shape[0],) + parent.shape)).gather(
            0, value.unsqueeze(0)).squeeze(0)
        with torch.no_grad():  # p(D∖S) of the prefixes: what was left before plus the dropped children
            log_rest = torch.logaddexp(align(c.log_rest, prev[1:], plates[1:]), left)
        sample = value if values is None else values[value]
        c.lp, c.phi, c.g, c.log_rest, c.h = phi, phi, g, log_rest, None
        c.exact = pad is None
        if self.eos is not None:
            node.finished = done.gather(0, parent) | self.is_eos(distribution, sample, len(plates))
        # a padding slot (fewer possible prefixes than k) repeats a possible prefix with weight 0: l = 0
        if pad is None and self.eos is None:  # every kept prefix is possible, and so is its step
            return sample, step_lp
        keep = torch.isfinite(step_lp) if pad is None else torch.isfinite(step_lp) & ~pad
        return sample, torch.where(keep, step_lp, torch.zeros_like(step_lp))

    def padding(self, node: Node) -> Optional[torch.Tensor]:
        # a padding entry (fewer possible values or prefixes than k) repeats a possible one with log p(s) = -inf
        # (proposal, extend: the beam's scores after a step); exact: the sampler found k possible values
        c = node.state
        return None if c.exact else torch.isneginf(c.lp.detach())

    def _set_probabilities(self, node: Node) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``(w, A)``: the weights w(s) = p(s) R(S, s), shape ``(k, *parents)`` in the model's dtype, and (with
        the baseline) its coefficients A[s, s'] = p(s') R^{D∖s}(S, s'), ``(k, k, *parents)`` in lp's dtype;
        computed once per step (a cache of values derived from the proposal: same inputs, same values)."""
        c = node.state
        if c.h is None:
            with torch.no_grad():  # weights and baseline are detached (⊥ in D.2.3)
                # in float32 at least: the log-space programme adds up to k floors (below), which overflow
                # float16 (max 65504) to -inf (inf - inf = NaN), and its log-sum-exps would round to float16's
                # 3 digits; the weights and the baseline's coefficients return in lp's dtype
                # (a Python choice: torch.promote_types is an operator that storch.compile's trace cannot return)
                work = torch.float64 if c.lp.dtype == torch.float64 else torch.float32
                lp, log_rest = c.lp.detach(), c.log_rest
                lp, log_rest = (lp, log_rest) if lp.dtype == work == log_rest.dtype else (lp.to(work), log_rest.to(work))
                floor = -1e30  # log of a probability that is exactly 0: finite, so no inf - inf
                lp = lp if c.exact else lp.clamp_min(floor)
                k = lp.shape[0]
                flat = lp.reshape(k, -1)
                rest = log_rest.expand(lp.shape[1:]).reshape(-1)
                coef: Optional[torch.Tensor] = None
                if k > _MAX_SAMPLES:
                    if not torch.isneginf(rest).all():
                        raise OptionError(
                            f"unordered_set: n_samples={k} > {_MAX_SAMPLES} works only when the sample is the whole "
                            f"support (then the estimate is exact); on plate {self.plate!r} it is not. The set "
                            f"probabilities cost 2^k per set: use n_samples <= {_MAX_SAMPLES}")
                    # S = D: every h(C) = p^{D∖C}(S∖C) is 1 (the rest of S is drawn surely): w(s) = p(s),
                    # A[s, s'] = p(s')
                    w = flat.exp()
                    if self.use_baseline:
                        coef = w.unsqueeze(0).expand((k,) + w.shape)
                else:
                    w, coef = _set_weights(flat, rest, c.exact, self.use_baseline)
                shape = lp.shape[1:]
                w = w.reshape((k,) + shape)
                c.h = (w if w.dtype == c.dtype else w.to(c.dtype),
                       None if coef is None else coef.reshape((k, k) + shape).to(work))
        return c.h

    def weighting_function(self, node: Node) -> torch.Tensor:
        # w(s) = ⊥(p(s) p^{D∖s}(S∖s) / p(S)) (appendix D.2.3; Kool et al. 2020, Eq. 7)
        return self._set_probabilities(node)[0]

    def gradient_function(self, node: Node) -> torch.Tensor:
        c = node.state
        lp = c.lp if c.lp.dtype == c.dtype else c.lp.to(c.dtype)  # (float32 for a float16 model: cast back)
        if c.exact:  # every drawn value is possible
            return lp
        # a value of probability exactly 0 (weight 0) gets l = 0 instead of -inf: no NaN in MagicBox
        return torch.where(torch.isfinite(lp), lp, torch.zeros_like(lp))

    def baseline(self, node: Node, cost: CostFrame) -> Optional[torch.Tensor]:
        if not self.use_baseline:
            return None
        coef = self._set_probabilities(node)[1]
        assert coef is not None  # (computed with the baseline)
        k = coef.shape[0]
        # coefficients A[s, s'] = p(s') R^{D∖s}(S, s') (Kool et al. 2020, Eq. 11); the diagonal is p(s) with
        # R^{D∖s}(S, s) = 1, which makes E[b(s) | s drawn first] = E[f]
        # (in float32 for float16 / bfloat16 costs, to_work, as leave_one_out: k coefficients of float16 rounded,
        # times costs of ~400, summed in float16, moved b(s) by a unit; b returns in the cost's dtype. Costs and
        # a model of float32 / float64: b in their promoted dtype, no cast, float64 for a float64 model)
        d = cost.dim
        f = cost.tensor
        work = to_work(f)
        if f.shape[d] != k:
            work = work.expand(f.shape[:d] + (k,) + f.shape[d + 1:])
        a = cost.align(coef.movedim(1, -1))  # (frame..., k): s on the node's plate, s' last
        # b(s) = Σ_s' A[s, s'] f(s') = r + Σ_s' A[s, s'] (f(s') - r) for any r, since Σ_s' A[s, s'] = 1 (an identity of
        # the coefficients): with r the set's mean cost (detached), f - r is formed in the cost's dtype and a common
        # offset of the costs cancels exactly. Summed as written, A's rounding (float32 lp: ~1e-7) times a float64
        # cost of 1e8 moved b by ~10 and biased the gradient (z ~ 20 against enumeration; review r-twentytwo)
        ref = work.detach().mean(d, keepdim=True)
        b = (a * (work - ref).movedim(d, -1).unsqueeze(d)).sum(-1) + ref
        return b.to(f.dtype) if f.dtype in REDUCED else b


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, stable at both ends (Mächler, 2012)."""
    x = x.clamp_max(0.0)
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


@table_cache(maxsize=None)  # (tensors: lru_cache would keep one made inside a torch.func level)
def _plan(k: int) -> tuple:
    """Index tables of the dynamic programme over the subsets of a set of k elements.

    The subsets of size j (layer j) are listed in increasing bitmask order, so layer 1 lists {x}
    at position x. For each layer j = k-1, ..., 0 and each subset C in it: ``larger`` (n_j, k-j),
    the positions in layer j+1 of C ∪ {x} for each x ∉ C; ``first`` (n_j,), the position of
    C ∪ {x0} for x0 the smallest x ∉ C. Shared by every layer: ``missing`` (Σ_j n_j (k-j),), the
    x ∉ C of every row, layer after layer; ``x0`` (Σ_j n_j,); and ``pairs`` (k, k), the position
    of {s, s'} in layers 1 and 2 concatenated (diagonal: {s} in layer 1).
    """
    layers = [[m for m in range(1 << k) if bin(m).count("1") == j] for j in range(k + 1)]
    pos = {m: i for layer in layers for i, m in enumerate(layer)}
    steps, missing_all, x0_all = [], [], []
    for j in range(k - 1, -1, -1):
        missing = [[x for x in range(k) if not (m >> x) & 1] for m in layers[j]]
        larger = torch.tensor([[pos[m | (1 << x)] for x in miss] for m, miss in zip(layers[j], missing)])
        first = torch.tensor([pos[m | (1 << miss[0])] for m, miss in zip(layers[j], missing)])
        missing_all += [x for miss in missing for x in miss]
        x0_all += [miss[0] for miss in missing]
        steps.append((len(layers[j]), k - j, larger, first))
    pairs = torch.tensor([[s if s == t else k + pos[(1 << s) | (1 << t)] for t in range(k)] for s in range(k)])
    return tuple(steps), torch.tensor(missing_all), torch.tensor(x0_all), pairs


def _log_h(lp: torch.Tensor, log_rest: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """log h(C) = log p^{D∖C}(S∖C) for C = ∅, {s}, {s, s'}: the probability of drawing the rest of S
    without replacement once C has been drawn.

    h(S) = 1 and h(C) = Σ_{x ∈ S∖C} p(x) / p(D∖C) · h(C ∪ {x}), with p(D∖C) = p(D∖S) + p(S∖C), layer
    by layer (subsets of size k-1, ..., 0; ``_plan``), in log space: p(D∖C) = p(D∖(C ∪ {x0})) + p(x0)
    by one logaddexp from the layer above, and the sum over x as a log-sum-exp shifted by its
    largest term (every term is finite: the caller clamps log 0 to a finite floor).

    Args:
        lp: log p(s) of the k set elements, shape (k, B), finite.
        log_rest: log p(D∖S), shape (B,), finite.
    """
    k, size = lp.shape
    dev = lp.device
    steps, missing, x0, pairs = _plan(k)
    counts = [n for n, _, _, _ in steps]
    # every layer's log p(x) for x ∉ C and log p(x0), gathered at once and split by layer (views)
    lp_missing = lp[missing.to(dev)].split([n * w for n, w, _, _ in steps])
    lp_x0 = lp[x0.to(dev)].split(counts)
    h = lp.new_zeros(1, size)  # layer k: h(S) = 1
    den = log_rest.reshape(1, size)  # log p(D∖S)
    layers = [h]
    for (n, width, larger, first), lpm, lpx in zip(steps, lp_missing, lp_x0):
        terms = lpm.view(n, width, size) + h.index_select(0, larger.to(dev).flatten()).view(n, width, size)
        top = terms.amax(1)
        total = terms.sub_(top.unsqueeze(1)).exp_().sum(1).log_().add_(top)
        den = torch.logaddexp(den[first.to(dev)], lpx)  # log p(D∖C)
        h = total.sub_(den)
        layers.append(h)
    # layers[-1]: h(∅); layers[-2]: h({x}) at position x; layers[-3]: h({s, s'}) (layer k: h(S) = 1)
    single = layers[-2]
    both = torch.cat([single, layers[-3]]) if k > 1 else single
    return h[0], single, both[pairs.to(dev)]


def _linear_ok(lp: torch.Tensor, log_rest: torch.Tensor) -> bool:
    """Whether :func:`_log_h_linear` holds for every row: every set element possible, and
    μ = max(p(D∖S), min_s p(s)) >= exp(-(700 - log k!) / k). Every p(D∖C), C ≠ S, is at least μ
    (it holds p(D∖S) and some p(x), x ∉ C), so q(∅) <= k! / μ^k stays below float64's largest."""
    k = lp.shape[0]
    bound = -(700.0 - math.lgamma(k + 1)) / k
    least = lp.amin(0)
    return bool(((least > -1e29) & (torch.maximum(log_rest, least) > bound)).all())


def _set_terms(lp: torch.Tensor, log_rest: torch.Tensor, possible: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """log h(∅), log h({s}), log h({s, s'}), each shifted by the same constant per row (the weights
    and the baseline use differences only): :func:`_log_h_linear` where it holds, else :func:`_log_h`.

    ``possible``: the caller knows every element has positive probability; then the linear
    programme is tried and kept unless q(∅) (the largest q) overflowed, else :func:`_linear_ok` decides.
    """
    if lp.is_meta or is_tracing():  # shapes only; or storch.compile: the log-space programme holds everywhere
        return _log_h(lp, log_rest)
    if possible:
        out = _log_h_linear(lp, log_rest)
        if math.isfinite(out[0].sum().item()):  # q(∅) did not overflow (a sum of finite logs is finite)
            return out
    elif _linear_ok(lp, log_rest):
        return _log_h_linear(lp, log_rest)
    return _log_h(lp, log_rest)


def _log_h_linear(lp: torch.Tensor, log_rest: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`_log_h` minus log Π_{s∈S} p(s) per row, by a programme without exp or log per layer.

    With q(C) = h(C) / Π_{x∈S∖C} p(x), the recurrence of h becomes
    q(C) = Σ_{x∈S∖C} q(C ∪ {x}) / p(D∖C), q(S) = 1, in float64. Every q(C) >= 1 (p(D∖C) <= 1),
    q(∅) is the largest, and q(∅) <= k! / μ^k, finite where :func:`_linear_ok`; p(D∖C) is a sum of
    positive terms, so the programme is accurate to a few float64 ulps. Returns log q(∅),
    log q({s}) - log p(s) and log q({s, s'}) - log p(s) - log p(s') (diagonal: the {s} term), in
    ``lp``'s dtype.

    Two forms of a layer, the same numbers: for k <= ``_DENSE_MAX`` one matmul with the 0/1 matrix
    of C ⊂ C ∪ {x} (C(k,j) x C(k,j+1): ~4^k entries, so small k only) and p(D∖C) = p(D∖S) + Σ_{x∉C} p(x)
    for every C in one matmul: 2 operations a layer; above it a gather of the k-j parents C ∪ {x}
    of each C (``_plan``'s ``larger``) and p(D∖C) = p(D∖(C ∪ {x0})) + p(x0) (x0 the smallest x ∉ C):
    O(k 2^k) time and memory, 5 operations a layer.
    """
    layers, lp64, _ = _linear_layers(lp, log_rest)
    k = lp.shape[0]
    pairs = _linear_tables(k, lp.device)[-1]
    q0 = layers[-1][0].log()
    lq1 = layers[-2].log()
    q1 = lq1 - lp64
    # {s}: log q({s}) + log p(s) and {s, s'}: log q({s, s'}); minus log p(s) + log p(s') below
    both = torch.cat([lq1.add_(lp64), layers[-3].log()]) if k > 1 else lq1.add_(lp64)
    q2 = both[pairs].sub_(lp64.unsqueeze(0)).sub_(lp64.unsqueeze(1))
    return q0.to(lp.dtype), q1.to(lp.dtype), q2.to(lp.dtype)


def _linear_layers(lp: torch.Tensor, log_rest: torch.Tensor) -> tuple[list, torch.Tensor, torch.Tensor]:
    """The layers of :func:`_log_h_linear`'s programme, q(S) = 1 first and q(∅) last (layer j: (C(k, j), B)),
    with ``lp`` in float64 and p = exp(lp) in float64."""
    k, size = lp.shape
    tables = _linear_tables(k, lp.device)
    lp64 = lp.double()
    p = lp64.exp()
    q = lp64.new_ones(1, size)  # layer k: q(S) = 1
    layers = [q]
    if tables[0] == "dense":
        _, up, not_in, pairs = tables
        inv = torch.addmm(log_rest.double().exp().unsqueeze(0), not_in, p).reciprocal_()
        for a, d in zip(up, inv.split([a.shape[0] for a in up])):
            q = torch.mm(a, q).mul_(d)  # Σ_{x∉C} q(C ∪ {x}) / p(D∖C)
            layers.append(q)
    else:
        _, larger, first, x0, pairs = tables
        p_x0 = p[x0].split([f.shape[0] for f in first])  # p(x0) of every C, layer after layer
        den = log_rest.double().exp().unsqueeze(0)  # p(D∖S)
        for up, f, px in zip(larger, first, p_x0):
            den = den[f].add_(px)  # p(D∖C)
            q = q.index_select(0, up.flatten()).view(up.shape + (size,)).sum(1).div_(den)
            layers.append(q)
    return layers, lp64, p


def _set_weights(lp: torch.Tensor, log_rest: torch.Tensor, possible: bool, with_coef: bool
                 ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The weights w(s) = p(s) h({s}) / h(∅), shape (k, B), and (``with_coef``) the baseline's coefficients
    A[s, s'] = p(s') h({s, s'}) / h({s}), (k, k, B), diagonal p(s); ``lp`` (k, B) and ``log_rest`` (B,) as
    :func:`_set_terms` takes them, which decides the programme in the same way.

    On the linear programme (:func:`_log_h_linear`'s q(C) = h(C) / Π_{x∈S∖C} p(x)) both are ratios of its
    layers, w(s) = q({s}) / q(∅) and A[s, s'] = q({s, s'}) / q({s}), in float64: no log and exp per
    term (a step of k = 4 at batch 16 ran ~60 torch operations for them, now ~25). On the log-space
    programme: exp of the differences of log h, in ``lp``'s dtype, as before. ``log_rest`` may be -inf
    (S = D): the linear programme reads p(D∖S) = 0, the log-space one a floor of -1e30.
    """
    if not (lp.is_meta or is_tracing()) and (possible or _linear_ok(lp, log_rest)):
        layers, _, p = _linear_layers(lp, log_rest)
        q0 = layers[-1]
        if not possible or math.isfinite(q0.sum().item()):  # q(∅) (the largest q) did not overflow
            q1 = layers[-2]
            w = q1 / q0
            if not with_coef:
                return w, None
            k = lp.shape[0]
            # numerators q({s, s'}) off the diagonal and p(s) q({s}) on it (``pairs``: {s} in layer 1 at s)
            num = torch.cat([q1 * p, layers[-3]]) if k > 1 else q1 * p
            return w, num[_linear_tables(k, lp.device)[-1]].div_(q1.unsqueeze(1))
    h0, h1, h2 = _log_h(lp, log_rest.clamp_min(-1e30))  # (log 0 as a finite floor: no inf - inf)
    w = (lp + h1 - h0).exp()
    return w, (lp.unsqueeze(0) + h2 - h1.unsqueeze(1)).exp() if with_coef else None


# the largest k whose layers are dense 0/1 matrices: Σ_j C(k,j) C(k,j+1) = C(2k, k-1) float64 entries
# (k = 8: 92 kB, k = 10: 1.3 MB, k = 16: 4.6 GB); at k = 10, batch 100 the gather is faster already; above it, integer index tables of O(k 2^k) entries
_DENSE_MAX = 8

# (k, device) -> the tables of _log_h_linear on that device (so a step copies none); at most 64 keys,
# each at most ~5 MB (k <= 16), so bounded memory
_LINEAR_TABLES: dict = {}


def _linear_tables(k: int, device: torch.device) -> tuple:
    """For :func:`_log_h_linear`, on ``device``: for k <= ``_DENSE_MAX`` ``("dense", up, not_in, pairs)``
    with ``up`` per layer j = k-1, ..., 0 the (n_j, n_{j+1}) 0/1 float64 matrix of C ⊂ C ∪ {x} and
    ``not_in`` (Σ_j n_j, k) 1 at each x ∉ C; else ``("gather", larger, first, x0, pairs)`` with
    ``_plan``'s per-layer ``larger`` (n_j, k-j) and ``first`` (n_j,), ``x0`` (Σ_j n_j,); ``pairs`` (k, k)."""
    key = (k, device)
    out = _LINEAR_TABLES.get(key)
    if out is None:
        with torch.inference_mode(False):  # normal tensors, also when first made under inference mode (see table_cache)
            steps, missing, x0, pairs = _plan(k)
            if k <= _DENSE_MAX:
                up, above = [], 1
                for n, _, larger, _ in steps:
                    up.append(torch.zeros(n, above, dtype=torch.float64).scatter_(1, larger, 1.0).to(device))
                    above = n
                rows = torch.arange(sum(n for n, _, _, _ in steps)).repeat_interleave(
                    torch.tensor([width for n, width, _, _ in steps for _ in range(n)]))
                not_in = torch.zeros(rows.shape[0] and int(rows[-1]) + 1, k, dtype=torch.float64)
                not_in[rows, missing] = 1.0
                out = ("dense", tuple(up), not_in.to(device), pairs.to(device))
            else:
                out = ("gather", tuple(larger.to(device) for _, _, larger, _ in steps),
                       tuple(first.to(device) for _, _, _, first in steps), x0.to(device), pairs.to(device))
            if torch._C._functorch.maybe_current_level() is None and len(_LINEAR_TABLES) < 64:  # (see table_cache)
                _LINEAR_TABLES[key] = out
    return out
