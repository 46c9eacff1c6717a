"""storch.compile of ``torch.bincount`` of a sampled index: its length must not be fixed to the first draw's.

Found by porting a mixture-of-experts block (tests/models/test_moe_routing.py): a load-balancing cost from
``torch.bincount(k)`` of the sampled experts, without ``minlength``. Eagerly its per-sample length is max(k) + 1
(refused where the samples' lengths differ); under ``storch.compile`` the handler read the trace's values, so the
program kept the first draw's length: a later draw whose largest value was smaller got extra zero counts, and the
compiled step returned 7.0 where eager storch returns 5.0 (the test below), silently. The trace now refuses a
length that comes from the values (not from ``minlength``), and says to pass ``minlength=K``, which traces.
The same port's GNN counted a sampled in-degree with ``torch.bincount(dst, weights=b, minlength=N)`` of an edge
list the step computes: refused rightly, but with advice for masks ("use torch.where"); the refusal now says to
count into a fixed length (``torch.zeros(K).scatter_add(0, i, w)``), which traces.
"""

import pytest
import torch
from torch.distributions import Categorical

import storch

E = 3
# first call: both tokens draw expert 2 (counts of length 3); second call: both draw expert 0 (length 1, eagerly)
BIG = torch.tensor([[-30.0, -30.0, 30.0]] * 2)
SMALL = torch.tensor([[30.0, -30.0, -30.0]] * 2)


def _step(est, **bincount_options):
    def step(logits):
        with storch.Graph():
            k = est(Categorical(logits=logits))  # two tokens, each routed to one of E experts
            counts = torch.bincount(k, **bincount_options)
            storch.add_cost((counts.double() ** 2).sum() + counts.shape[0], name="load")
            return storch.surrogate_loss()

    return step


def test_a_length_from_the_drawn_values_is_refused_by_the_trace():
    step = _step(storch.estimator("score", plate="k", n_samples=2))
    torch.manual_seed(0)
    assert float(step(SMALL)) == 5.0  # eagerly: counts (2,), length 1
    with pytest.raises(storch.PlateError, match=r"(?s)storch\.compile cannot trace torch\.bincount.*max\(input\) \+ 1 = 3"
                                                r".*minlength=0.*torch\.bincount\(i, minlength=K\)"):
        storch.compile(step, backend=None)(BIG)


def test_the_advised_minlength_traces_and_replays_every_draw():
    est = storch.estimator("score", plate="k", n_samples=2)
    step = _step(est, minlength=E)
    compiled = storch.compile(step, backend=None)
    for logits, want in [(BIG, 4.0 + 3), (SMALL, 4.0 + 3), (BIG, 4.0 + 3)]:
        torch.manual_seed(0)
        got = compiled(logits)
        torch.manual_seed(0)
        torch.testing.assert_close(got, step(logits).detach(), rtol=0, atol=0)
        assert float(got) == want


def test_a_plain_index_the_step_computes_gets_the_fixed_length_advice():
    # a GNN's sampled in-degree: torch.bincount(dst, weights=b, minlength=N) of an edge list the step computes is
    # refused (its length, max(dst) + 1, comes from values the trace would fix); the message said only "use
    # torch.where", which does not count. The advised scatter_add into a fixed length traces and equals eager.
    from torch.distributions import Bernoulli

    edge_index = torch.tensor([[0, 1, 2, 0], [1, 2, 0, 2]])
    est = storch.estimator("score", plate="edges", n_samples=3)

    def step(logits, count):
        with storch.Graph():
            b = est(Bernoulli(logits=logits))
            dst = edge_index[1] + 0  # computed in the step
            storch.add_cost((count(dst, b) ** 2).sum(), name="degree")
            return storch.surrogate_loss()

    logits = torch.tensor([0.3, -0.2, 0.1, 0.5], requires_grad=True)
    with pytest.raises(storch.StorchError, match=r"(?s)`bincount`.*torch\.zeros\(K\)\.scatter_add\(0, i, w\)"):
        storch.compile(lambda lg: step(lg, lambda d, b: torch.bincount(d, weights=b, minlength=3)), backend=None)(logits)
    advised = lambda d, b: torch.zeros(3).scatter_add(0, d, b)  # noqa: E731
    compiled = storch.compile(lambda lg: step(lg, advised), backend=None)
    for seed in range(3):
        torch.manual_seed(seed)
        got = compiled(logits)
        torch.manual_seed(seed)
        want = step(logits, lambda d, b: torch.bincount(d, weights=b, minlength=3))  # eagerly, torch's bincount
        torch.testing.assert_close(got, want.detach())


def _minlength_step(est, index):
    def step(logits):
        with storch.Graph():
            k = est(Categorical(logits=logits))
            counts = torch.bincount(index(k), minlength=E - 1)  # below the 3 values k can take
            storch.add_cost((counts.double() ** 2).sum(), name="load")
            return storch.surrogate_loss()

    return step


def test_a_minlength_below_the_samples_support_is_refused_at_the_trace():
    # the traced draw (expert 0) fits in minlength=2 counts, so the trace accepted it; a later draw of expert 2 failed
    # in the replayed scatter_add with torch's bare "index 2 is out of bounds for dimension 1 with size 2"
    step = _minlength_step(storch.estimator("score", plate="k", n_samples=2), lambda k: k)
    with pytest.raises(storch.StorchError, match=r"(?s)torch\.bincount\(k, minlength=2\) of a sample whose distribution "
                                                 r"can draw 3 values.*Pass minlength=3"):
        storch.compile(step, backend=None)(SMALL)


def test_a_later_partition_steps_sample_gets_the_trace_time_refusal_too():
    # the trace looked a sample up by node.value, which is a partition's first step's only: bincount of step 1's
    # sample with a low minlength traced (the draw fitted) and failed at a later call, in the recorded check. Every
    # step's handed-out sample is now recognised, and the trace refuses with the support size to pass
    est = storch.estimator("score", plate="k", n_samples=2)

    def step(logits, minlength):
        with storch.Graph():
            k0 = est(Categorical(logits=logits))
            k1 = est(Categorical(logits=logits + 0 * k0.unsqueeze(-1)))  # step 1 of k's partition
            counts = torch.bincount(k1, minlength=minlength)
            storch.add_cost((counts.double() ** 2).sum(), name="load")
            return storch.surrogate_loss()

    with pytest.raises(storch.StorchError, match=r"(?s)torch\.bincount\(k, minlength=2\) of a sample whose distribution "
                                                 r"can draw 3 values.*Pass minlength=3"):
        storch.compile(lambda lg: step(lg, E - 1), backend=None)(SMALL)
    compiled = storch.compile(lambda lg: step(lg, E), backend=None)  # the advised minlength traces and replays
    for logits in (SMALL, BIG):
        torch.manual_seed(0)
        got = compiled(logits)
        torch.manual_seed(0)
        torch.testing.assert_close(got, step(logits, E).detach(), rtol=0, atol=0)
        assert float(got) == 4.0


def test_a_minlength_below_a_computed_index_fails_at_the_replay_with_advice():
    # an index computed from the sample (a table lookup): its range is not known at the trace, so the program checks
    # every draw; eagerly the counts of the second draw are longer than minlength
    table = torch.tensor([0, 1, 2])
    est = storch.estimator("score", plate="k", n_samples=2)
    step = _minlength_step(est, lambda k: table[k])
    compiled = storch.compile(step, backend=None)
    torch.manual_seed(0)
    got = compiled(SMALL)
    torch.manual_seed(0)
    torch.testing.assert_close(got, step(SMALL).detach(), rtol=0, atol=0)  # a draw that fits: eager's value
    with pytest.raises(storch.StorchError, match=r"(?s)torch\.bincount\(k, minlength=2\) of a sampled k.*drew a value "
                                                 r">= 2.*torch\.bincount\(k, minlength=K\)"):
        compiled(BIG)
    assert float(step(BIG)) == 4.0  # eagerly: counts (0, 0, 2), of length 3


def test_the_fixed_length_advice_without_weights_runs():
    # the refusal's advice for counts without weights was `torch.zeros(K).scatter_add(0, i, w)` with
    # `torch.ones_like(i)` as w, which torch refuses (scatter(): Expected self.dtype to be equal to src.dtype: float
    # zeros, int64 ones; review r-35). The advice now written out traces and equals eager bincount (values, int64)
    from torch.distributions import Bernoulli

    edge_index = torch.tensor([[0, 1, 2, 0], [1, 2, 0, 2]])
    est = storch.estimator("score", plate="edges", n_samples=3)

    def step(logits, count):
        with storch.Graph():
            b = est(Bernoulli(logits=logits))
            degree = count(edge_index[1] + 0)  # an in-degree of an edge list the step computes
            storch.add_cost(((degree * b[:3]) ** 2).sum(), name="degree")
            return storch.surrogate_loss(), degree

    logits = torch.tensor([0.3, -0.2, 0.1, 0.5], requires_grad=True)
    with pytest.raises(storch.StorchError, match=r"torch\.zeros\(K, dtype=torch\.long\)\.scatter_add\(0, i, "
                                                 r"torch\.ones_like\(i\)\)") as info:
        storch.compile(lambda lg: step(lg, lambda d: torch.bincount(d, minlength=3)), backend=None)(logits)
    assert "torch.ones_like(i) as w" not in str(info.value)
    advised = lambda d: torch.zeros(3, dtype=torch.long).scatter_add(0, d, torch.ones_like(d))  # noqa: E731
    compiled = storch.compile(lambda lg: step(lg, advised), backend=None)
    for seed in range(3):
        torch.manual_seed(seed)
        got, degree = compiled(logits)
        torch.manual_seed(seed)
        want, counts = step(logits, lambda d: torch.bincount(d, minlength=3))  # eagerly, torch's bincount
        assert degree.dtype == counts.dtype == torch.int64 and torch.equal(degree, counts)
        torch.testing.assert_close(got, want.detach())
