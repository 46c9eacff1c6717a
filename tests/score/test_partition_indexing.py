"""Indexing with sampled indices on the steps of a partition (issue 20): needs a partition
estimator, so it lives with the score family (tests/core runs with storch-core alone)."""

import pytest
import torch
from torch.distributions import Categorical

import storch


def test_index_on_partition_steps_follows_the_prefixes():
    """A tensor of an earlier step of a beam-search partition, indexed by a later step's token,
    is re-indexed by the parents first (as any operation)."""
    from torch.distributions import Categorical

    torch.manual_seed(3)
    est = storch.estimator("unordered_set", plate="seq", n_samples=4)
    table = torch.randn(3, 3, dtype=torch.float64)
    with storch.Graph():
        x0 = est(Categorical(logits=torch.zeros(3, dtype=torch.float64)))
        row = table[x0]  # step 0, (3,) per sample
        x1 = est(Categorical(logits=row))
        picked = row[x1]  # row follows x1's prefixes
        direct = table[x0, x1]  # the same with both indices at once
        assert torch.equal(picked.tensor, direct.tensor)
        assert torch.equal(direct.tensor, table[x0.tensor.gather(0, x0.plates[0].lineage.index(0, 1))
                                                 if x0.plates[0].lineage.index(0, 1) is not None else x0.tensor,
                                                 x1.tensor])


def _beam_writes():
    return {
        "counts[s, a] += 1": lambda tab, s, a: tab.__setitem__((s, a), tab[s, a] + 1),
        "tab[s] = a": lambda tab, s, a: tab.__setitem__(s, a.to(tab.dtype)),
        "tab.add_(a)": lambda tab, s, a: tab.add_(a.to(tab.dtype)),
        "tab.scatter_": lambda tab, s, a: tab[s].scatter_(0, a.unsqueeze(0), 1.0),
        "tab.index_put_": lambda tab, s, a: tab.index_put_((s, a), torch.tensor(3.0, dtype=tab.dtype)),
    }


def test_a_table_of_an_earlier_beam_step_written_in_place_is_refused():
    """A beam re-indexes its entries between steps: an in-place write at step 1 into a table of step 0
    cannot reach the right entries. Refused, saying the table belongs to the earlier step and how to bring
    it to the current one (setitem's message named no plate: "varies over plates []"; scatter_ and
    index_put_ wrote into a re-indexed copy: the writes were lost)."""
    import pytest
    from torch.distributions import Categorical

    for form, write in _beam_writes().items():
        torch.manual_seed(3)
        est = storch.estimator("unordered_set", plate="seq", n_samples=3)
        with storch.Graph():
            s = torch.tensor(0)
            a = est(Categorical(logits=torch.randn(3, 3, dtype=torch.float64)[s]))
            tab = torch.zeros(3, 3, dtype=torch.float64) + 0.0 * a[..., None, None]
            write(tab, s, a)  # at its own step: fine
            s = (s + a + 1) % 3
            a = est(Categorical(logits=torch.randn(3, 3, dtype=torch.float64)[s]))
            with pytest.raises(storch.PlateError, match=r"belongs to step 0 of partition 'seq'.*tab = tab \+ 0 \*"):
                write(tab, s, a)
            tab = tab + 0 * a[..., None, None]  # the workaround: the table of step 1 (re-indexed)
            write(tab, s, a)
            assert tab.plates[0].step == 1


# -- per-entry state outside plate tensors: storch.ancestor_index -------------------------------------------------
# (a porting test stepped one Python simulator per plate entry, kept in a list: under unordered_set the beam
# re-indexes the entries between the steps and the list did not follow, z = 9.5; with n_samples=4 the plate grew
# 2 -> 4 and the list was too short. The recipe: carry the list to each step with storch.ancestor_index.)

_W = torch.tensor([[0.2, -0.3], [0.5, 0.1], [-0.4, 0.3]], dtype=torch.float64)
_R = [[1.0, -0.5], [0.3, 2.0], [-1.0, 0.7]]
_STEPS = 3


class _Env:
    """A simulator stepped in Python (not a tensor): state s in 0..2, reward _R[s][a]."""

    def __init__(self):
        self.s = 0

    def step(self, a):
        r = _R[self.s][a]
        if a == 1:
            self.s = (self.s + 1) % 3
        elif self.s == 2:
            self.s = 0
        return r


def _exact_env_gradient():
    import itertools

    w = _W.clone().requires_grad_(True)
    total = 0
    for actions in itertools.product(range(2), repeat=_STEPS):
        env, lp, ret = _Env(), 0, 0.0
        for a in actions:
            lp = lp + torch.log_softmax(w[env.s], 0)[a]
            ret += env.step(a)
        total = total + lp.exp() * -ret
    (g,) = torch.autograd.grad(total, w)
    return g


def _env_episode(est, w):
    """One episode per plate entry, each its own _Env in a Python list, carried to each step's entries."""
    import copy

    envs = [_Env()]
    s = torch.tensor(0)
    for t in range(_STEPS):
        a = est(Categorical(logits=w[s]))
        parents = [0] * a.tensor.numel() if t == 0 else storch.ancestor_index(a, "ep").tensor.tolist()
        envs = [copy.deepcopy(envs[j]) for j in parents]  # entry i continues entry parents[i] of step t-1
        rewards = [env.step(int(ai)) for env, ai in zip(envs, a.tensor.tolist())]
        s = storch.PlateTensor(torch.tensor([env.s for env in envs]), a.plates)
        storch.add_cost(storch.PlateTensor(-torch.tensor(rewards, dtype=torch.float64), a.plates), name=f"r{t}")


@pytest.mark.parametrize("name, options", [
    ("unordered_set", {"n_samples": 2}),
    ("unordered_set", {"n_samples": 4}),  # the plate grows 2 -> 4 entries
    ("sum_and_sample", {"n_samples": 3, "buffer": 2, "baseline": "leave_one_out"}),
    ("score", {"n_samples": 3, "baseline": "leave_one_out"}),
])
def test_python_state_per_entry_carried_with_ancestor_index_is_unbiased(name, options):
    from storch.testing import assert_unbiased

    torch.manual_seed(0)
    est = storch.estimator(name, plate="ep", **options)
    estimates = []
    for _ in range(600):
        w = _W.clone().requires_grad_(True)
        with storch.Graph():
            _env_episode(est, w)
            (g,) = torch.autograd.grad(storch.surrogate_loss(), w)
        estimates.append(g.reshape(-1))
    report = assert_unbiased(torch.stack(estimates), _exact_env_gradient().reshape(-1), f"{name} {options}")
    print(f"\n{name} {options}: max |z| {report.max_abs_z:.2f}")


def test_ancestor_index_is_the_parent_of_each_entry_per_data_point():
    """ancestor_index(x, plate) lines up with x.tensor's plate dims; it agrees with carrying entry ids as a plate
    tensor (which storch re-indexes); arange where the entries stay in place; errors name the plate and step."""
    torch.manual_seed(0)
    for name, options in [("unordered_set", {"n_samples": 4}), ("score", {"n_samples": 3})]:
        est = storch.estimator(name, plate="seq", **options)
        with storch.Graph():
            x = storch.denote_independent(torch.zeros(2, 3), 0, "data")
            a = est(Categorical(logits=x))
            with pytest.raises(storch.PlateError, match="at step 0.*no parent step"):
                storch.ancestor_index(a, "seq")
            with pytest.raises(storch.PlateError, match="no sample plate 'data'"):
                storch.ancestor_index(a, "data")
            ids = storch.PlateTensor(torch.arange(a.tensor.shape[0]).unsqueeze(-1).expand(a.tensor.shape), a.plates)
            b = est(Categorical(logits=x + a.float().unsqueeze(-1)))
            c = est(Categorical(logits=x + b.float().unsqueeze(-1)))
            for value, step in ((b, None), (c, 0)):
                got = storch.ancestor_index(value, "seq", step=step)
                assert got.plates == value.plates and got.shape == ()
                assert torch.equal(got.tensor, (ids + 0 * value).tensor)
            assert torch.equal(storch.ancestor_index(c, "seq", step=2).tensor[:, 0], torch.arange(c.tensor.shape[0]))
            with pytest.raises(storch.PlateError, match="step must be a step 0..2, got 3"):
                storch.ancestor_index(c, "seq", step=3)
            if name == "score":
                assert torch.equal(storch.ancestor_index(b, "seq").tensor[:, 1], torch.arange(3))
