"""A trained model at evaluation and deployment time (docs/evaluation.md): evaluation loops in the thread's default
graph without storch.reset() (they failed every second batch: the refusal of the reused plate name discarded the
step, so the next batch was clean), a log-likelihood estimated with K importance samples chunked over several
graphs, deterministic decoding with ``dist.mode``, export of a function that samples (refused, pointing to the plain
modules), and estimator state left untouched by ``model.eval()`` + ``torch.no_grad()`` passes.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.distributions import Bernoulli, Categorical, OneHotCategorical

import storch

# float64, as every test here runs (tests/score's modules leave torch's default float64 at collection, so a float32
# X made at import met float64 modules in the folder's run: "mat1 and mat2 must have the same dtype")
pytestmark = pytest.mark.usefixtures("float64_default")
X = torch.linspace(-1, 1, 24, dtype=torch.float64).reshape(6, 4)


def _vae_step(enc, dec, est, x):
    """One batch of a small categorical VAE's reconstruction cost, in the current graph."""
    xs = storch.denote_independent(x, 0, "data")
    z = est(OneHotCategorical(logits=enc(xs)))
    storch.add_cost(((dec(z) - xs) ** 2).sum(), name="rec")


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_an_evaluation_loop_in_the_default_graph_needs_no_reset(mode):
    """Each batch's estimate in the default graph, with no `with storch.Graph():` and no storch.reset(), is the
    estimate of that batch alone: bitwise that of a loop with a block per batch, from the same seed."""
    torch.manual_seed(0)
    enc, dec = nn.Linear(4, 3), nn.Linear(3, 4)
    est = storch.estimator("score", plate="z", n_samples=8, baseline="moving_average")
    batches = [X + i for i in range(4)]

    def run(block: bool) -> list:
        torch.manual_seed(1)
        out = []
        for x in batches:
            with mode():
                if block:
                    with storch.Graph():
                        _vae_step(enc, dec, est, x)
                        out.append(storch.cost_estimates()["rec"])
                else:
                    _vae_step(enc, dec, est, x)
                    out.append(storch.cost_estimates()["rec"])  # read: the next batch ends this step
        return out

    expected = run(block=True)
    assert [v.item() for v in run(block=False)] == [v.item() for v in expected]
    storch.reset()


def test_a_sampling_only_evaluation_loop_needs_no_reset():
    """Generation (samples, no costs) under torch.no_grad() in the default graph, batch after batch."""
    torch.manual_seed(0)
    enc, dec = nn.Linear(4, 3), nn.Linear(3, 4)
    est = storch.estimator("score", plate="z", n_samples=2)
    with torch.no_grad():
        shapes = [tuple(dec(est(OneHotCategorical(logits=enc(storch.denote_independent(X, 0, "data"))))).tensor.shape)
                  for _ in range(3)]
    assert shapes == [(2, 6, 4)] * 3
    storch.reset()


def test_training_steps_and_unread_evaluation_steps_are_still_refused():
    """A training step (gradients enabled) that meets an unfinished one is refused as before; so is an evaluation
    step whose costs were never read, with a message that says what to write in an evaluation loop."""
    torch.manual_seed(0)
    enc, dec = nn.Linear(4, 3), nn.Linear(3, 4)
    est = storch.estimator("score", plate="z", n_samples=2)
    _vae_step(enc, dec, est, X)
    storch.cost_estimates()
    with pytest.raises(storch.PlateError, match="already used in this graph"):
        _vae_step(enc, dec, est, X)
    storch.reset()
    with torch.no_grad():
        _vae_step(enc, dec, est, X)  # costs added, never read
        with pytest.raises(storch.PlateError, match=r"evaluation loop .*storch.cost_estimates\(\).*storch.reset\(\)"):
            _vae_step(enc, dec, est, X)
    storch.reset()


def test_a_second_data_plate_of_one_name_in_an_evaluation_step_says_what_happened():
    """Under no_grad, a second claim of 'data' after a node was sampled ends that step; mixing its tensors with the
    new step's is refused with the reason and the one-call advice, never merged. With data plates alone (nothing
    sampled yet) the claim is refused as in training, with the one-call advice."""
    est = storch.estimator("score", plate="z", n_samples=2)
    with torch.no_grad():
        xs = storch.denote_independent(X, 0, "data")
        est(Bernoulli(logits=xs))
        ys = storch.denote_independent(X + 1, 0, "data")
        with pytest.raises(storch.PlateError, match=r"ended by the next step.*after an evaluation step.*ONE"):
            xs + ys
        storch.reset()
        storch.denote_independent(X, 0, "data")
        with pytest.raises(storch.PlateError, match=r"already used in this graph.*in ONE call"):
            storch.denote_independent(X + 1, 0, "data")
    storch.reset()


def test_a_second_draw_of_an_estimator_in_an_evaluation_step_says_what_happened():
    """Under no_grad, the estimator called again on a distribution that depends on nothing of the step (read costs)
    ends that step; mixing the two draws names why, with the advice for a draw (a block), not the data plate's
    one-call denote_independent advice (it named the estimator's plate as a data plate)."""
    est = storch.estimator("score", plate="z", n_samples=2)
    theta = torch.zeros(3)
    with torch.no_grad():
        for root in (True, False):  # the estimator's first call on a plain distribution, or on the data's plate
            q = Bernoulli(logits=theta if root else storch.denote_independent(X[:, :3], 0, "data"))
            z1 = est(q)
            storch.add_cost(z1.sum(-1), name="c")
            storch.cost_estimates()
            z2 = est(Bernoulli(logits=theta))
            with pytest.raises(storch.PlateError, match=r"ended by the next step") as info:
                z1 + z2
            assert "denote_independent" not in str(info.value)
            assert "estimator 'score'" in str(info.value) and "with storch.Graph():" in str(info.value)
            storch.reset()


def test_a_log_likelihood_from_importance_samples_chunked_over_graphs():
    """log p(x) from K = 2000 importance samples drawn in 4 graphs of 500 (each a step of the default graph, no
    reset), combined with logsumexp: the mean weight is unbiased for p(x), z-tested against exact enumeration of
    the 16 codes, per data point."""
    torch.manual_seed(0)
    enc, dec = nn.Linear(6, 4), nn.Linear(4, 6)
    prior = Bernoulli(logits=torch.zeros(4))
    x = (torch.rand(3, 6) < 0.5).to(torch.get_default_dtype())
    est = storch.estimator("score", plate="z", n_samples=1)
    chunk, chunks = 500, 4

    def log_joint(z, xs):  # log p(z) + log p(x | z), per draw
        return prior.log_prob(z).sum(-1) + Bernoulli(logits=dec(z)).log_prob(xs).sum(-1)

    with torch.no_grad():
        parts = []
        for _ in range(chunks):
            xs = storch.denote_independent(x, 0, "data")
            logits = enc(xs)
            z = est(Bernoulli(logits=logits.expand(chunk, 4)))  # one sample of `chunk` draws
            log_w = log_joint(z, xs.expand(chunk, 6)) - Bernoulli(logits=logits).log_prob(z).sum(-1)
            parts.append(log_w.tensor[0])  # (data, chunk): plain log-weights
        storch.reset()
        log_w = torch.cat(parts, -1).double()
        codes = torch.tensor([[(i >> b) & 1 for b in range(4)] for i in range(16)], dtype=torch.get_default_dtype())
        exact = torch.stack([log_joint(codes, row.expand(16, 6)).logsumexp(0) for row in x]).double()
    K = chunk * chunks
    w = (log_w - exact[:, None]).exp()  # p̂(x) / p(x) per draw: mean 1
    z_scores = (w.mean(-1) - 1) / (w.std(-1) / math.sqrt(K))
    assert z_scores.abs().max() < 4, z_scores
    assert torch.allclose(log_w.logsumexp(-1) - math.log(K), exact, atol=0.1)  # the IWAE bound itself, K = 2000


def test_deterministic_decoding_with_the_mode():
    """`q.mode` of a distribution built on plate tensors is the per-data-point argmax (no estimator, no node), and
    the decoder's output on it is what the plain modules give on plain tensors."""
    torch.manual_seed(0)
    enc, dec = nn.Linear(4, 3), nn.Linear(3, 4)
    with torch.no_grad(), storch.Graph():
        xs = storch.denote_independent(X, 0, "data")
        one_hot = OneHotCategorical(logits=enc(xs)).mode
        index = Categorical(logits=enc(xs)).mode
        out = dec(one_hot)
        assert not storch.current_graph().nodes
        assert torch.equal(one_hot.tensor, OneHotCategorical(logits=enc(X)).mode)
        assert torch.equal(index.tensor, enc(X).argmax(-1))
        assert torch.equal(out.tensor, dec(OneHotCategorical(logits=enc(X)).mode))


class _Sampler(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc, self.dec = nn.Linear(4, 3), nn.Linear(3, 4)
        self.est = storch.estimator("score", plate="z", n_samples=2)

    def forward(self, x):
        with storch.Graph():
            return self.dec(self.est(OneHotCategorical(logits=self.enc(storch.denote_independent(x, 0, "data"))))).tensor


@pytest.mark.parametrize("how", ["export", "trace", "script"])
def test_exporting_a_function_that_samples_is_refused_with_the_plain_modules_advice(how):
    """torch.export, torch.jit.trace and torch.jit.script of a module that samples with storch raise a StorchError
    that says to export the plain modules (torch.jit.script failed inside TorchScript on the estimator's first
    property, naming neither storch nor what to do)."""
    model = _Sampler().eval()
    call = {"export": lambda: torch.export.export(model, (X,)), "trace": lambda: torch.jit.trace(model, (X,)),
            "script": lambda: torch.jit.script(model)}[how]
    with pytest.raises(storch.StorchError, match="export \\(or script\\) its plain modules"):
        call()


def _flat(obj, prefix: str = "") -> dict:
    """Every leaf of a (nested) state dict, tensors cloned."""
    if isinstance(obj, torch.Tensor):
        return {prefix: obj.detach().clone()}
    if isinstance(obj, dict):
        return {k: v for key, value in obj.items() for k, v in _flat(value, f"{prefix}.{key}").items()}
    if isinstance(obj, (list, tuple)):
        return {k: v for i, value in enumerate(obj) for k, v in _flat(value, f"{prefix}[{i}]").items()}
    return {prefix: copy.deepcopy(obj)}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)


@pytest.mark.parametrize("baseline", ["moving_average", "learned"])
def test_evaluation_leaves_the_state_built_in_training_untouched(baseline):
    """model.eval() + torch.no_grad() passes that read the estimates and the surrogate, with the estimator built
    and trained in training, leave its state (moving averages, the learned baseline's network and Adam moments,
    counters) bitwise as it was; the next training step (no storch.reset() after the evaluation loop in the default
    graph) changes it (the comparison can fail)."""
    torch.manual_seed(0)
    enc = nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.5))
    est = storch.estimator("score", plate="z", n_samples=3, baseline=baseline)
    opt = torch.optim.SGD(enc.parameters(), lr=0.1)

    def step():
        z = est(Bernoulli(logits=enc(storch.denote_independent(X, 0, "data"))))
        storch.add_cost(((z - 0.3) ** 2).sum(-1), name="c")

    for _ in range(3):
        opt.zero_grad()
        step()
        storch.backward()
        opt.step()
    trained = _flat(est.state_dict())
    enc.eval()
    with torch.no_grad():
        for _ in range(3):
            step()
            storch.cost_estimates()
            storch.surrogate_loss()
    assert _same(_flat(est.state_dict()), trained)
    enc.train()
    step()
    storch.backward()
    assert not _same(_flat(est.state_dict()), trained)


class _Holder(nn.Module):
    """A model that scripts its plain modules and keeps its estimators beside them (sampling in Python methods)."""

    __jit_ignored_attributes__ = ["est", "more"]

    def __init__(self):
        super().__init__()
        self.dec = nn.Linear(3, 4)
        self.est = storch.estimator("score", plate="z", n_samples=2)
        self.more = nn.ModuleList([storch.estimator("score", plate="w", n_samples=2)])  # (an estimator one level down)

    def forward(self, z):
        return self.dec(z)


class _Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.holder = _Holder()
        self.est = storch.estimator("score", plate="y", n_samples=2)  # not ignored here: refused

    def forward(self, z):
        return self.holder(z)


def test_scripting_a_model_that_ignores_its_estimators_is_not_refused():
    """torch.jit.script calls __prepare_scriptable__ on every submodule, those named in __jit_ignored_attributes__ too
    (which TorchScript never compiles): the estimator's refusal refused a model that scripted before it. Such a model
    scripts, and its scripted forward is the plain one; an estimator that is not ignored is still refused, with the
    advice to ignore it."""
    model = _Holder()
    z = torch.randn(5, 3)
    assert torch.equal(torch.jit.script(model)(z), model(z))
    with pytest.raises(storch.StorchError, match=r"estimator 'score' \(plate 'y'\).*__jit_ignored_attributes__"):
        torch.jit.script(_Outer())
