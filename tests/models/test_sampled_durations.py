"""A stochastic-duration alignment model (TTS / latent alignment), written for one sample (p-ragged16).

For K = 3 tokens a duration d_k in {1, 2, 3} (or {0, 1, 2}: a token may be skipped) is drawn per token; the frame sequence repeats token k's embedding
d_k times, a per-sample length sum(d) up to M = 9. A user's first form, ``emb.repeat_interleave(d, 0)``, has a
length that depends on the draw: storch refuses it and says what to write instead, a fixed length M with the
padding masked. Three such forms are written here (frames found by ``searchsorted`` of the cumulative durations,
by an alignment matrix built from ``cumsum(d)`` and comparisons, and each token repeated by the largest count with
the rest masked where it stands); each frame is decoded and scored against a target, and E[cost] and its
derivatives are z-tested against enumeration of the 27 duration triples.

The ops whose output shape depends on a sampled value are probed on plate tensors from a sampled node against a
per-entry loop: they give per-sample results where the per-sample shape is fixed (bincount with minlength,
searchsorted, bucketize, histc, histogram, nonzero_static) or raise a ``storch.PlateError`` that says what to
write instead (repeat_interleave, nonzero, argwhere, masked_select, x[mask], unique, bincount without minlength,
split by sampled sizes, narrow / view / expand / new_zeros / zeros with a sampled size).
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Categorical

import storch
import storch.testing as kit
from model_checks import assert_per_entry

F64, K, D, M = torch.float64, 3, 3, 9
EMB = torch.tensor([0.5, -0.8, 1.2], dtype=F64)  # one embedding per token
TARGET = torch.tensor([0.4, 0.4, -0.5, -0.6, -0.6, 0.8, 0.9, 0.9, 0.0], dtype=F64)  # one per frame
LENGTH_COST = 0.05


# -- the frame sequence, padded to M: (frames (M,), valid (M,) bool) from the durations d (K,) in 1..D ------------

def frames_searchsorted(d):
    end = torch.cumsum(d, 0)
    row = torch.searchsorted(end, torch.arange(M), right=True).clamp(max=K - 1)  # the token of each frame
    return EMB[row], torch.arange(M) < end[-1]


def frames_alignment(d):
    end = torch.cumsum(d, 0)
    t = torch.arange(M)[:, None]
    align = (t >= end - d) & (t < end)  # (M, K): frame t is token k's
    return align.to(F64) @ EMB, torch.arange(M) < end[-1]


def frames_interleaved(d):
    # each token repeated D times, the copies past d_k masked where they stand; a kept copy's frame number is the
    # count of kept copies before it, so the decoder and the target read it as in the contiguous forms
    keep = (torch.arange(D) < d.unsqueeze(-1)).flatten()  # (K * D,)
    position = torch.cumsum(keep.long(), 0) - 1
    target = TARGET[position.clamp(min=0)]
    return EMB.repeat_interleave(D, 0), keep, position, target


FORMS = {"searchsorted": frames_searchsorted, "alignment": frames_alignment, "interleaved": frames_interleaved}


def frame_cost(form, d, w):
    """decode each frame (a position-dependent tanh unit) and score it against the target; padding costs 0"""
    if form == "interleaved":
        frames, valid, position, target = frames_interleaved(d)
    else:
        frames, valid = FORMS[form](d)
        position, target = torch.arange(M), TARGET
    pred = torch.tanh(w * frames + 0.1 * position)
    err = torch.where(valid, (pred - target) ** 2, torch.zeros_like(pred))
    return err.sum() + LENGTH_COST * valid.sum()


def build(make, theta, form, shortest=1):
    k = make("dur")(Categorical(logits=theta[:K * D].view(K, D)))  # per sample (K,): the K durations jointly
    storch.add_cost(frame_cost(form, k + shortest, theta[K * D]), name="frames")


def exact(theta, form="alignment", shortest=1):
    logp = torch.log_softmax(theta[:K * D].view(K, D), -1)
    total = 0
    for ks in itertools.product(range(D), repeat=K):
        k = torch.tensor(ks)
        total = total + logp[torch.arange(K), k].sum().exp() * frame_cost(form, k + shortest, theta[K * D])
    return total


THETA = torch.tensor([0.3, -0.2, 0.1, -0.5, 0.4, 0.2, 0.6, -0.3, -0.1, 0.8], dtype=F64)


def model(form, shortest=1):
    """durations in shortest..shortest + D - 1 (0: a token may be skipped, and every frame may be padding)"""
    return kit.Model(f"durations[{form},{shortest}..]", THETA, lambda make, theta: build(make, theta, form, shortest),
                     lambda theta: exact(theta, form, shortest), lambda: [Categorical(logits=THETA[:K * D].view(K, D))])


@pytest.mark.parametrize("shortest", [1, 0])
def test_the_forms_agree_with_each_other(shortest):
    # the three padded forms are one model: the same exact expected cost (and the oracle is not vacuous)
    values = [exact(THETA, form, shortest) for form in FORMS]
    torch.testing.assert_close(values[1], values[0])
    torch.testing.assert_close(values[2], values[0])
    assert float(values[0]) > 0


@pytest.mark.parametrize("name, options, orders", [
    ("score", {"n_samples": 4, "baseline": "leave_one_out"}, (0, 1, 2)),
    ("score", {"n_samples": 1}, (0, 1)),
    ("unordered_set", {"n_samples": 3}, (0, 1)),
])
def test_gradients_against_enumeration(name, options, orders):
    models = [model(f, shortest) for f in FORMS for shortest in (1, 0)]
    report = kit.check_against_enumeration(name, models=models, options=options, orders=orders, n_replicates=2000)
    assert len(report.checks) == len(models) * len(orders)


def test_expect_is_exact_on_every_form():
    theta = THETA.clone().requires_grad_(True)
    est = storch.estimator("expect", plate="dur")
    for form in FORMS:
        with storch.Graph():
            build(lambda plate: est, theta, form)
            loss = storch.surrogate_loss()
            g, = torch.autograd.grad(loss, theta)
        ref = exact(theta, form)
        torch.testing.assert_close(loss, ref)
        torch.testing.assert_close(g, torch.autograd.grad(ref, theta)[0])


def test_repeat_interleave_by_sampled_durations_is_refused_with_the_padded_forms():
    est = storch.estimator("score", plate="dur", n_samples=4)
    with storch.Graph():
        d = est(Categorical(logits=THETA[:K * D].view(K, D))) + 1
        with pytest.raises(storch.PlateError) as err:
            EMB.repeat_interleave(d, 0)  # the frames of one sample: length sum(d)
    message = str(err.value)
    # the advice names the padded forms this file runs: searchsorted of cumsum, the alignment matrix, masked repeats
    for form in ("repeats.cumsum(0)", "torch.searchsorted(end, torch.arange(M), right=True)", "A.to(x.dtype) @ x",
                 "valid = torch.arange(M) < end[-1]", "(torch.arange(R) < repeats.unsqueeze(-1)).flatten()"):
        assert form in message, form


# -- ops whose output shape depends on a sampled value -----------------------------------------------------------

def _sampled():
    """a duration sample d (K,) in 1..D on a sample plate and a data plate, and a float sample on them"""
    logits = torch.randn(2, K, D)
    x = storch.denote_independent(logits, 0, "data")
    d = storch.estimator("score", plate="z", n_samples=3)(Categorical(logits=x)) + 1
    return d, d.to(F64) * 1.5 - 0.7 * x[:, 0]


PER_SAMPLE = {
    "bincount minlength": lambda d, v: torch.bincount(d, minlength=D + 1),
    "bincount weights": lambda d, v: torch.bincount(d, weights=v, minlength=D + 1),
    "searchsorted cumsum": lambda d, v: torch.searchsorted(torch.cumsum(d, 0), torch.arange(M), right=True),
    "searchsorted sampled values": lambda d, v: torch.searchsorted(torch.tensor([1.0, 2.0, 3.0], dtype=F64), v),
    "searchsorted sorter": lambda d, v: torch.searchsorted(v, torch.tensor([0.5, 2.0], dtype=F64),
                                                           sorter=v.argsort()),
    "bucketize": lambda d, v: torch.bucketize(torch.arange(M), torch.cumsum(d, 0), right=True),
    "bucketize sampled input": lambda d, v: torch.bucketize(v, torch.tensor([0.0, 1.5, 3.0], dtype=F64)),
    "histc": lambda d, v: torch.histc(v, bins=4, min=-1, max=5),
    "histc own range": lambda d, v: torch.histc(v, bins=3),
    "histogram": lambda d, v: torch.histogram(v, bins=3, range=(-1.0, 5.0)),
    "nonzero_static": lambda d, v: torch.nonzero_static(d - 1, size=K),
    "alignment matrix": lambda d, v: frames_alignment(d),
    "one_hot counts": lambda d, v: F.one_hot(d, D + 1).sum(0),
    "repeat_interleave fixed repeats": lambda d, v: v.repeat_interleave(torch.tensor([1, 2, 3]), 0),
    "split fixed sizes": lambda d, v: torch.split(v, [1, 2]),
}


@pytest.mark.parametrize("name", list(PER_SAMPLE))
def test_ops_with_a_fixed_per_sample_shape_run_per_sample(name):
    torch.manual_seed(0)
    with storch.Graph():
        d, v = _sampled()
        assert_per_entry(PER_SAMPLE[name], d, v)


# (the call, a piece of what the refusal says to write instead)
REFUSED = {
    "repeat_interleave": (lambda d, v: EMB.repeat_interleave(d, 0), "torch.searchsorted(end"),
    "repeat_interleave of a plate tensor": (lambda d, v: v.repeat_interleave(d), "valid = torch.arange(M)"),
    "nonzero": (lambda d, v: torch.nonzero(d > 1), "nonzero_static"),
    "nonzero as_tuple": (lambda d, v: (d > 1).nonzero(as_tuple=True), "torch.where(mask, x, other)"),
    "argwhere": (lambda d, v: torch.argwhere(d > 1), "torch.where(mask, x, other)"),
    "where(condition)": (lambda d, v: torch.where(d > 1), "torch.where(condition, x, other)"),
    "masked_select": (lambda d, v: torch.masked_select(v, d > 1), "torch.where(mask, x, 0)"),
    "boolean index": (lambda d, v: v[d > 1], "torch.where(mask, x, other)"),
    "unique": (lambda d, v: torch.unique(d), "x == values[:, None]"),
    "unique return_counts": (lambda d, v: torch.unique(d, return_counts=True), "torch.bincount(x, minlength=K)"),
    "unique_consecutive": (lambda d, v: torch.unique_consecutive(d), "x[1:] != x[:-1]"),
    "bincount": (lambda d, v: torch.bincount(d), "minlength="),
    "split tolist": (lambda d, v: torch.split(v, d.tolist()), "`.tensor`"),
    "split sampled sizes": (lambda d, v: v.split(d[:2]), "keep a fixed maximum length"),
    "tensor_split sampled": (lambda d, v: torch.tensor_split(v, d[:1]), "one per-sample shape"),
    "narrow sampled length": (lambda d, v: v.narrow(0, 0, d[0]), "keep a fixed maximum length"),
    "narrow sampled start": (lambda d, v: v.narrow(0, d[0] - 1, 1), "index_select"),
    "slice by a sampled bound": (lambda d, v: v[:d[0]], "keep a fixed maximum length"),
    "arange of a sampled length": (lambda d, v: torch.arange(d.sum()), "keep a fixed maximum length"),
    "zeros of a sampled length": (lambda d, v: torch.zeros(d.sum()), "keep a fixed maximum length"),
    "new_zeros of a sampled length": (lambda d, v: v.new_zeros(d.sum()), "keep a fixed maximum length"),
    "new_full of a sampled length": (lambda d, v: v.new_full((d[0],), 1.0), "keep a fixed maximum length"),
    "new_tensor of a sample": (lambda d, v: v.new_tensor(d), "data.detach().clone()"),
    "expand to a sampled length": (lambda d, v: v[:1].expand(d[0]), "keep a fixed maximum length"),
    "repeat a sampled number of times": (lambda d, v: v.repeat(d[0]), "keep a fixed maximum length"),
    "view with a sampled size": (lambda d, v: v.view(d[0], -1), "keep a fixed maximum length"),
    "F.pad by a sampled amount": (lambda d, v: F.pad(v, (0, d[0])), "keep a fixed maximum length"),
    "topk of a sampled k": (lambda d, v: torch.topk(v, d[0]), "keep a fixed maximum length"),
    "diff of a sampled order": (lambda d, v: torch.diff(v, n=d[0]), "keep a fixed maximum length"),
    "histc with a sampled range": (lambda d, v: torch.histc(v, bins=3, min=0, max=d[0]), "keep a fixed maximum"),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_ops_with_a_sampled_shape_are_refused_with_what_to_write(name):
    torch.manual_seed(0)
    fn, advice = REFUSED[name]
    with storch.Graph():
        d, v = _sampled()
        with pytest.raises(storch.PlateError) as err:
            fn(d, v)
    assert advice in str(err.value), str(err.value)


@pytest.mark.usefixtures("restore_validation")
@pytest.mark.parametrize("form", list(FORMS))
def test_compiled_step_equals_eager(form):
    # the padded forms have fixed shapes, so a compiled step replays them for every draw
    theta = torch.nn.Parameter(THETA.clone())
    est = storch.estimator("score", plate="dur", n_samples=4, baseline="leave_one_out")

    def step():
        with storch.Graph():
            build(lambda plate: est, theta, form)
            return storch.surrogate_loss()

    compiled = storch.compile(step, backend=None)
    for seed in range(3):
        torch.manual_seed(seed)
        eager_value = step()
        eager = torch.autograd.grad(eager_value, theta)[0]
        torch.manual_seed(seed)
        value = compiled()
        torch.testing.assert_close(value, eager_value)
        torch.testing.assert_close(torch.autograd.grad(value, theta)[0], eager)
