"""torch.inference_mode() evaluation passes, and estimators with their own optimizer moved with .double()
after training (both found by porting a VAE into a training loop: inference_mode raised "Inference tensors
do not track version counter" for every estimator; relax's and NVIL's Adam moments stayed float32 and the
next update failed with a dtype mismatch). A network built lazily in an inference_mode() pass (relax's
control variate, NVIL's heads) was made of inference tensors that the next training step could not update.
"""

from __future__ import annotations

import pytest
import torch
from torch.distributions import Bernoulli, Categorical

import storch

DATA = torch.linspace(-1, 1, 20).reshape(5, 4)


@pytest.mark.parametrize("name,options", [("score", {"n_samples": 2}), ("unordered_set", {"n_samples": 2}),
                                          ("relax", {}), ("gumbel_softmax", {}), ("expect", {}),
                                          ("score", {"n_samples": 2, "baseline": "learned"})])
def test_inference_mode_evaluation_pass(name, options):
    torch.manual_seed(0)
    enc = torch.nn.Linear(4, 3)
    est = storch.estimator(name, plate="z", **options)
    with torch.inference_mode(), storch.Graph():
        z = est(Bernoulli(logits=enc(storch.denote_independent(DATA, 0, "data"))))
        storch.add_cost(((z - 0.3) ** 2).sum(-1), name="c")
        value = storch.cost_estimates()["c"]
        assert torch.isfinite(value) and not storch.surrogate_loss().requires_grad
    with storch.Graph():  # the next training step is unaffected
        z = est(Bernoulli(logits=enc(storch.denote_independent(DATA, 0, "data"))))
        storch.add_cost(((z - 0.3) ** 2).sum(-1), name="c")
        storch.backward()
    assert enc.weight.grad is not None and torch.isfinite(enc.weight.grad).all()


def _cold_tables():
    """Empty storch's process-wide index tables, so that the next step makes them (in this test's mode)."""
    from storch.builtins import expect
    from storch_score import _beam, unordered_set

    expect._joint_indices.cache_clear()
    _beam._chunk_tables.cache_clear()
    unordered_set._plan.cache_clear()
    for kept in _kept_tables():
        kept.clear()


def _kept_tables() -> tuple:
    from storch_score import _beam, _support, unordered_set

    return _support._JOINT_INDEX, _beam._DEVICE_TABLES, _beam._DRAW_TABLES, unordered_set._LINEAR_TABLES


@pytest.mark.parametrize("name,options,dist", [
    ("expect", {}, "categorical"),  # expect's _joint_indices
    ("expect", {}, "bernoulli"),  # the same (its index saved for backward by aot_eager's program only)
    ("unordered_set", {"n_samples": 3}, "categorical"),  # the joint index and the subsets' tables
    ("unordered_set", {"n_samples": 3}, "bernoulli"),  # 2^12 values: the draws' tables
])
@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_tables_first_made_in_an_inference_mode_pass_serve_later_training_steps(name, options, dist, backend):
    """The index tables storch keeps for the process (table_cache, the score package's own) were inference
    tensors when first made under torch.inference_mode(): every later training step that saved one for
    backward raised "Inference tensors cannot be saved for backward" (expect and unordered_set on a
    Categorical, eagerly; storch.compile(backend="aot_eager") also on a Bernoulli, where the failure inside
    the compiled program surfaced as dynamo's "Attempt to trace generator"). Found as a test that failed
    only after tests/reliability in one pytest process. The step's value and gradients after such a pass
    equal those of a process that never ran one, and the tables kept are normal tensors."""
    own = 12 if name == "unordered_set" and dist == "bernoulli" else 2
    enc = torch.nn.Linear(4, 3 * own)
    est = storch.estimator(name, plate="z", **options)
    x = torch.linspace(-1, 1, 4)

    def step(x):
        with storch.Graph():
            logits = enc(x)
            d = Bernoulli(logits=logits) if dist == "bernoulli" else Categorical(logits=logits.reshape(own, 3))
            z = est(d)
            storch.add_cost(((z.float() - 0.3) ** 2).sum(), name="c")
            return storch.surrogate_loss()

    run = step if backend == "eager" else storch.compile(step, backend=backend)
    params = list(enc.parameters())

    def grads():
        torch.manual_seed(1)
        value = run(x)
        return (value.detach(), *torch.autograd.grad(value, params))

    _cold_tables()
    want = grads()
    _cold_tables()
    if backend != "eager":
        run = storch.compile(step, backend=backend)
    with torch.inference_mode():
        step(x)
    kept = [t for tables in _kept_tables() for value in tables.values()
            for t in (value if isinstance(value, tuple) else (value,)) if isinstance(t, torch.Tensor)]
    assert kept or name == "expect"
    assert not any(t.is_inference() for t in kept)  # (the draws' tables: not saved for backward)
    got = grads()  # raised
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("name,options", [("relax", {}), ("score", {"n_samples": 2, "baseline": "learned"})])
def test_trained_estimator_moved_to_float64_keeps_training(name, options):
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"enc": torch.nn.Linear(4, 3), "est": storch.estimator(name, plate="z", **options)})

    def step(dtype):
        with storch.Graph():
            x = storch.denote_independent(DATA.to(dtype), 0, "data")
            z = model["est"](Bernoulli(logits=model["enc"](x)))
            storch.add_cost(((z - 0.3) ** 2).sum(-1), name="c")
            storch.backward()

    for _ in range(2):
        step(torch.float32)
    steps = model["est"].update_steps
    model.double()
    step(torch.float64)
    assert model["est"].update_steps == steps + 1
    params = list(model["est"].parameters())
    assert params and all(p.dtype == torch.float64 and torch.isfinite(p).all() for p in params)
    moments = [v for s in model["est"]._optimizer.state.values() for k, v in s.items() if k != "step"]
    assert moments and all(v.dtype == torch.float64 for v in moments)


@pytest.mark.parametrize("name,options", [("relax", {"n_samples": 2}), ("rebar", {"n_samples": 2}),
                                          ("score", {"n_samples": 2, "baseline": "learned", "hidden": 8})])
def test_trained_estimator_moved_to_float16_keeps_training(name, options):
    """model.half() after training: storch's own Adam moved its moments to float16, where the second moment
    (~1e-12) underflows to 0 and eps=1e-8 is 0, and its first step wrote inf/NaN into the control variate's
    or NVIL's network; the next step raised NonFiniteCostError blaming the estimator (found by porting a
    training loop). The learned parts keep training in float16, with Adam's state in float32."""
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"enc": torch.nn.Linear(4, 3), "est": storch.estimator(name, plate="z", **options)})
    est = model["est"]

    def step(dtype, seed):
        torch.manual_seed(seed)
        with storch.Graph():
            x = storch.denote_independent(DATA.to(dtype), 0, "data")
            z = est(Bernoulli(logits=model["enc"](x)))
            storch.add_cost(((z - 0.3) ** 2).sum(), name="c")
            storch.backward()

    for seed in range(3):
        step(torch.float32, seed)
    model.half()
    steps, before = est.update_steps, [p.detach().clone() for p in est.parameters()]
    for seed in range(3, 8):
        step(torch.float16, seed)  # raised NonFiniteCostError at the second
    params = list(est.parameters())
    assert est.update_steps == steps + 5 and est.skipped_updates == 0
    assert all(p.dtype == torch.float16 and torch.isfinite(p).all() for p in params)
    assert any(not torch.equal(p, b) for p, b in zip(params, before))  # it trained
    moments = [v for s in est._optimizer.state.values() for k, v in s.items() if k != "step"]
    assert moments and all(v.dtype == torch.float32 for v in moments)


@pytest.mark.parametrize("name,options", [("relax", {}),
                                          ("score", {"n_samples": 2, "baseline": "learned"})])
def test_learned_parts_built_under_autocast_keep_full_precision(name, options):
    """A learned part built lazily in steps under ``torch.autocast(bfloat16)`` (the encoder's logits are
    bfloat16 there; the surrogate reads them outside the block) keeps float32 parameters, as a module built
    under autocast does: they were bfloat16, and the next step without autocast failed with 'mat1 and mat2
    must have the same dtype' (found by porting a training loop)."""
    torch.manual_seed(0)
    enc = torch.nn.Linear(4, 3)
    est = storch.estimator(name, plate="z", **options)

    def step(autocast):
        with storch.Graph():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                z = est(Bernoulli(logits=enc(storch.denote_independent(DATA, 0, "data"))))
                storch.add_cost(((z - 0.3) ** 2).sum(-1), name="c")
            storch.backward()

    step(True)
    step(True)
    params = [p for p in est.parameters() if p.dim() > 0]  # the network (relax's temperature is a scalar)
    assert params and all(p.dtype == torch.float32 for p in params), [p.dtype for p in params]
    steps = est.update_steps
    step(False)
    assert est.update_steps == steps + 1 and all(torch.isfinite(p).all() for p in est.parameters())


def _reduced_precision_run(mode: str, baseline: str, levels, decay: float = 0.99, compiled: bool = False):
    """Steps whose costs are ``levels[i]`` exactly (whatever the sample: a decoder with zero weights), in the
    dtype ``mode`` gives them: ``torch.autocast`` (bfloat16 from the decoder's Linear), ``model.half()`` /
    ``.bfloat16()`` (the model's dtype) or float64. Returns the estimator and each step's surrogate dtype."""
    torch.manual_seed(0)
    dtype = {"half": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}.get(mode, torch.float32)
    model = torch.nn.ModuleDict({"enc": torch.nn.Linear(4, 3), "dec": torch.nn.Linear(3, 1),
                                 "est": storch.estimator("score", plate="z", n_samples=4, baseline=baseline,
                                                         decay=decay, hidden=8)})
    with torch.no_grad():
        model["dec"].weight.zero_()
    model.to(dtype)

    def step(level):
        with torch.no_grad():
            model["dec"].bias.fill_(level)
        with storch.Graph(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast"):
            z = model["est"](Bernoulli(logits=model["enc"](storch.denote_independent(DATA.to(dtype), 0, "data"))))
            storch.add_cost(model["dec"](z.to(dtype)).squeeze(-1), name="c")
            return storch.surrogate_loss()

    run = storch.compile(step, backend=None) if compiled else step
    dtypes = []
    for i, level in enumerate(levels):
        loss = (step if i == 0 else run)(float(level))  # (compiled: one eager step builds NVIL's network)
        dtypes.append(loss.dtype)
        loss.backward()
    return model["est"], dtypes


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("baseline", ["moving_average", "learned"])
@pytest.mark.parametrize("mode", ["autocast", "half", "bfloat16", "float64"])
def test_running_average_follows_reduced_precision_costs(mode, baseline, compiled):
    """score's moving average (and NVIL's centring c) was kept in the cost's dtype: under CPU autocast
    (bfloat16) or model.half() one step (1 - decay)·(mean - average) of an average near 100 rounds away,
    and the average stopped following the costs (bfloat16: stuck at 100 after they rose to 104; the
    gradient's variance ~20x, found by porting a training loop). It is kept in float32 at least (float64
    costs: float64), the eager and the storch.compile'd update alike, and equals the float32 EMA of the
    step's mean costs computed by hand; the surrogate's dtype is the one it has without an average."""
    levels = [100.0] * 5 + [104.0] * 45
    est, dtypes = _reduced_precision_run(mode, baseline, levels, compiled=compiled)
    state = torch.float64 if mode == "float64" else torch.float32
    want = torch.tensor(levels[0], dtype=state)
    for level in levels[1:]:  # the costs are the levels exactly, in every dtype
        want = torch.lerp(want, torch.tensor(level, dtype=state), 1 - 0.99)
    average = est.moving_averages["c"]
    assert average.dtype == state
    torch.testing.assert_close(average, want)  # bfloat16: 100.0 (float32: 103.4)
    assert len(set(dtypes)) == 1, dtypes  # the first step has no average: the average changes no dtype


def test_running_average_loaded_in_reduced_precision_is_kept_in_float32():
    """A checkpoint saved while the average was kept in the cost's bfloat16 loads into float32: the average
    follows the costs again."""
    est = storch.estimator("score", plate="z", n_samples=2, baseline="moving_average", decay=0.99)
    est.load_state_dict({"_extra_state": {"moving_averages": {"c": torch.tensor(100.0, dtype=torch.bfloat16)}}})
    assert est.moving_averages["c"].dtype == torch.float32


@pytest.mark.parametrize("name", ["score", "relax"])
def test_backward_with_a_loss_scale(name):
    """storch.backward(scale=s) backpropagates s * loss (loss scaling for mixed precision): the gradients
    are s times the unscaled ones and the estimator's own update is the same (relax refuses
    surrogate_loss().backward(), so it had no way to scale the loss)."""
    results = []
    for scale in (None, 1024.0):
        torch.manual_seed(0)
        enc = torch.nn.Linear(4, 3)
        est = storch.estimator(name, plate="z", n_samples=2, baseline="moving_average") if name == "score" \
            else storch.estimator(name, plate="z")
        with storch.Graph():
            z = est(Bernoulli(logits=enc(storch.denote_independent(DATA, 0, "data"))))
            storch.add_cost(((z - 0.3) ** 2).sum(-1), name="c")
            storch.backward(scale=scale)
        state = [p.detach().clone() for p in est.parameters()] or [est.moving_averages["c"].clone()]
        results.append((enc.weight.grad.clone(), state))
    (g1, s1), (g2, s2) = results
    assert torch.allclose(g2, 1024.0 * g1, rtol=1e-5, atol=1e-6)
    assert all(torch.allclose(a, b) for a, b in zip(s1, s2))


@pytest.mark.parametrize("name", ["score", "relax"])
def test_backward_with_a_grad_scaler(name):
    """storch.backward(scale=scaler) with a torch.amp.GradScaler, then scaler.step(opt), scaler.update(),
    over several steps. The documented storch.backward(scale=scaler.get_scale()) failed at the first
    scaler.step (the scaler creates the scale tensor it unscales by only in scaler.scale(); "Attempted step
    but _scale is None"), and relax, which refuses scaler.scale(surrogate_loss()).backward(), had no route.
    The scaled gradients are the scale times the unscaled run's, the optimizer steps, and the parameters and
    the estimator's state follow the unscaled run."""
    runs = []
    for scaled in (False, True):
        torch.manual_seed(0)
        enc = torch.nn.Linear(4, 3)
        opt = torch.optim.SGD(enc.parameters(), lr=0.1)
        est = storch.estimator(name, plate="z", n_samples=2, baseline="moving_average") if name == "score" \
            else storch.estimator(name, plate="z")
        scaler = torch.amp.GradScaler("cpu", enabled=True) if scaled else None
        grads, weights = [], []
        for _ in range(3):
            z = est(Bernoulli(logits=enc(storch.denote_independent(DATA, 0, "data"))))
            storch.add_cost(((z - 0.3) ** 2).sum(-1), name="c")
            storch.backward(scale=scaler)
            if scaled:
                grads.append(enc.weight.grad / scaler.get_scale())
                scaler.step(opt)
                scaler.update()
            else:
                grads.append(enc.weight.grad.clone())
                opt.step()
            opt.zero_grad()
            weights.append(enc.weight.detach().clone())
        state = [p.detach().clone() for p in est.parameters()] or [est.moving_averages["c"].clone()]
        runs.append((grads, weights, state))
    (g1, w1, s1), (g2, w2, s2) = runs
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(g1, g2))
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(w1, w2))
    assert not torch.equal(w2[0], w2[-1])  # the scaler's steps happened (none was skipped as inf)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(s1, s2))


def test_backward_refuses_a_scale_it_cannot_apply():
    theta = torch.zeros(3, requires_grad=True)
    with storch.Graph():
        z = storch.estimator("score", plate="z", n_samples=2)(Bernoulli(logits=theta))
        storch.add_cost(z.sum())
        with pytest.raises(storch.StorchError, match=r"scale must be a torch.amp.GradScaler"):
            storch.backward(scale="1024")
        storch.backward()  # the step was left intact
    assert theta.grad is not None


def test_backward_under_no_grad_says_so():
    with storch.Graph():
        z = storch.estimator("score", plate="z", n_samples=2)(Bernoulli(logits=torch.zeros(3, requires_grad=True)))
        storch.add_cost(z.sum())
        with torch.no_grad(), pytest.raises(storch.StorchError, match=r"gradients disabled.*cost_estimates"):
            storch.backward()
        storch.backward()  # the step was left intact


def test_backward_of_a_loss_without_gradient_says_why():
    """A pathwise node whose cost is not differentiable in the sample ((x > c).float()): torch's bare
    "element 0 of tensors does not require grad" before; storch now names the likely causes. With
    parameters that need a gradient, the cost's missing path to the sample is refused first (OrderError,
    test_reparameterization.py::test_a_cost_cut_from_the_sample_is_refused); with none, the loss has none."""
    from torch.distributions import Normal

    mu = torch.zeros(2, requires_grad=True)
    with storch.Graph():
        x = storch.estimator("reparameterization", plate="x", n_samples=2)(Normal(mu, 1.0))
        storch.add_cost((x > 0.3).float().sum())
        with pytest.raises(storch.OrderError, match=r"only through operations without a derivative.*'score'"):
            storch.backward()
    with storch.Graph():
        x = storch.estimator("reparameterization", plate="x", n_samples=2)(Normal(mu.detach(), 1.0))
        storch.add_cost((x > 0.3).float().sum())
        with pytest.raises(storch.StorchError, match=r"depends on no tensor that requires grad.*'score'"):
            storch.backward()


def test_backward_after_an_earlier_pass_freed_the_graph_says_so():
    """torch.autograd.grad(storch.surrogate_loss(), θ) and then storch.backward() on the same step: torch's
    "backward through the graph a second time" before (found by porting actor-critic); with
    retain_graph=True on the first pass both work."""
    enc = torch.nn.Linear(4, 3)
    est = storch.estimator("score", plate="z", n_samples=2, baseline="moving_average")
    for retain in (False, True):
        with storch.Graph():
            z = est(Bernoulli(logits=enc(storch.denote_independent(DATA, 0, "data"))))
            storch.add_cost(((z - 0.3) ** 2).sum(-1), name="c")
            torch.autograd.grad(storch.surrogate_loss(), enc.weight, retain_graph=retain)
            if retain:
                storch.backward()
                assert "c" in est.moving_averages
            else:
                with pytest.raises(storch.StorchError, match=r"already freed.*retain_graph=True"):
                    storch.backward()
                assert "c" not in est.moving_averages
