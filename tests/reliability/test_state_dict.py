"""Estimator state round-trips through state_dict() / load_state_dict(strict=True) into a freshly
constructed model, and resuming gives bitwise the same next gradient as not stopping.

Defects of issue 11: the moving-average baseline was not in state_dict (loading reported all
keys matched, then training differed); a fresh model could not strictly load a RELAX model's
state (its network is built lazily); REBAR/RELAX optimizer state and pending updates were lost."""

from __future__ import annotations

import io

import pytest
import torch
from torch.distributions import Bernoulli

import storch

CASES = {
    "score_moving_average": ("score", {"n_samples": 3, "baseline": "moving_average"}),
    "relax": ("relax", {"n_samples": 2}),
    "rebar": ("rebar", {"n_samples": 2}),
    "score_learned": ("score", {"n_samples": 2, "baseline": "learned"}),  # NVIL, where score has it
    "gumbel_annealed": ("gumbel_softmax", {"n_samples": 2, "temperature": lambda t: max(0.3, 0.8 ** t)}),
    "lax": None,  # continuous: covered by relax's machinery (same base class); see test below
}


class Model(torch.nn.Module):
    """A tiny model that owns its estimator (as a user's nn.Module would)."""

    def __init__(self, name: str, options: dict) -> None:
        super().__init__()
        torch.manual_seed(123)
        self.encoder = torch.nn.Linear(4, 3)
        self.est = storch.estimator(name, plate="z", **options)

    def step(self, x: torch.Tensor, seed: int) -> list[torch.Tensor]:
        torch.manual_seed(seed)
        self.zero_grad(set_to_none=True)
        xs = storch.denote_independent(x, 0, "data")
        z = self.est(Bernoulli(logits=self.encoder(xs)))
        storch.add_cost(((z - 0.45) ** 2).sum(), name="c")
        storch.backward()
        return [p.grad.clone() for p in self.encoder.parameters()]


def _installed(name, options=None):
    if name not in storch.available_estimators():
        pytest.skip(f"{name} is not installed")
    try:
        storch.estimator(name, plate="probe", **(options or {}))
    except storch.OptionError as e:
        pytest.skip(f"{name} has no such option here: {e}")


@pytest.mark.parametrize("case", [c for c in CASES if CASES[c] is not None])
def test_resume_gives_bitwise_the_same_next_gradient(case):
    name, options = CASES[case]
    _installed(name, options)
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    a = Model(name, options)
    opt_a = torch.optim.SGD(a.encoder.parameters(), lr=0.1)  # the estimator trains its own parts
    for s in range(4):
        a.step(x, s)
        opt_a.step()
    buf = io.BytesIO()
    torch.save({"model": a.state_dict(), "opt": opt_a.state_dict()}, buf)
    # the uninterrupted run goes on
    expected = [a.step(x, s) for s in (4, 5)]
    # a fresh process: construct, load strictly, resume
    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    b = Model(name, options)
    torch.manual_seed(999)  # a fresh process has other RNG state; seeds per step make it irrelevant
    result = b.load_state_dict(saved["model"], strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    opt_b = torch.optim.SGD(b.encoder.parameters(), lr=0.1)
    opt_b.load_state_dict(saved["opt"])
    got = [b.step(x, s) for s in (4, 5)]
    for g_exp, g_got in zip(expected, got):
        for e, g in zip(g_exp, g_got):
            assert torch.equal(e, g)


def test_moving_average_is_in_the_state_dict():
    _installed("score")
    m = Model("score", {"n_samples": 3, "baseline": "moving_average"})
    x = torch.randn(5, 4)
    for s in range(3):
        m.step(x, s)
    state = m.state_dict()["est._extra_state"]
    assert set(state["moving_averages"]) == {"c"} and torch.isfinite(state["moving_averages"]["c"])
    fresh = Model("score", {"n_samples": 3, "baseline": "moving_average"})
    fresh.load_state_dict(m.state_dict(), strict=True)
    assert torch.equal(fresh.est.moving_averages["c"], m.est.moving_averages["c"])


@pytest.mark.parametrize("case", ["relax", "score_moving_average"])
def test_an_averaged_model_averages_the_estimators_parameters_but_copies_its_extra_state_once(case):
    """docs/reliability.md, "An averaged copy of the model": torch's AveragedModel (an EMA here) of a model holding an
    estimator averages the estimator's learned parameters (RELAX's eta, log_temperature, network), while the
    estimator's _extra_state (moving averages, its own optimizer's step counters) stays as it was when the averaged
    model was built; AveragedModel(model.encoder) averages the model's own module only."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    name, options = CASES[case]
    _installed(name, options)
    m = Model(name, options)
    x = torch.randn(5, 4)
    opt = torch.optim.SGD(m.encoder.parameters(), lr=0.1)
    m.step(x, 0)
    opt.step()  # (RELAX's network is built at its first node)
    ema = AveragedModel(m, multi_avg_fn=get_ema_multi_avg_fn(0.5))
    own = AveragedModel(m.encoder, multi_avg_fn=get_ema_multi_avg_fn(0.5))
    built = repr(ema.module.state_dict()["est._extra_state"])
    est_params = {n: p.detach().clone() for n, p in ema.module.named_parameters() if n.startswith("est.")}
    for seed in range(1, 6):
        m.step(x, seed)
        opt.step()
        ema.update_parameters(m)
        own.update_parameters(m.encoder)
    live = repr(m.state_dict()["est._extra_state"])
    assert live != built  # the live estimator's state moved on ...
    assert repr(ema.module.state_dict()["est._extra_state"]) == built  # ... the averaged copy's did not
    averaged = dict(ema.module.named_parameters())
    live_params = dict(m.named_parameters())
    for n, before in est_params.items():  # RELAX's eta, log_temperature, network: averaged, not the live values
        assert not torch.equal(averaged[n], before) and not torch.equal(averaged[n], live_params[n]), n
    if name == "relax":
        assert {"est.eta", "est.log_temperature"} <= set(est_params) and len(est_params) > 2
    assert [n for n, _ in own.module.named_parameters()] == ["weight", "bias"]  # the model's own module only


def test_relax_lazily_built_network_loads_strictly_into_a_fresh_model():
    _installed("relax")
    m = Model("relax", {})
    for s in range(3):
        m.step(torch.randn(5, 4), s)
    keys = set(m.state_dict())
    assert any(k.startswith("est.network.net.") for k in keys)
    fresh = Model("relax", {})
    assert not any(k.startswith("est.network.net.") for k in fresh.state_dict())  # not built yet
    fresh.load_state_dict(m.state_dict(), strict=True)
    for (k1, v1), (k2, v2) in zip(sorted(m.state_dict().items()), sorted(fresh.state_dict().items())):
        assert k1 == k2
        if isinstance(v1, torch.Tensor):
            assert torch.equal(v1, v2)
    assert fresh.est._optimizer is not None
    assert [p.data_ptr() for p in fresh.est._optimizer.param_groups[0]["params"]] == \
        [p.data_ptr() for p in fresh.est._trainable()]


def test_lax_state_round_trips():
    _installed("lax")
    from torch.distributions import Normal

    theta = torch.tensor([0.3, -0.2], requires_grad=True)
    est = storch.estimator("lax", plate="z")
    for s in range(3):
        torch.manual_seed(s)
        z = est(Normal(theta, 1.0))
        storch.add_cost((z ** 2).sum())
        storch.backward()
    fresh = storch.estimator("lax", plate="z")
    fresh.load_state_dict(est.state_dict(), strict=True)
    grads = []
    for e in (est, fresh):
        torch.manual_seed(10)
        theta.grad = None
        z = e(Normal(theta, 1.0))
        storch.add_cost((z ** 2).sum())
        storch.backward()
        grads.append(theta.grad.clone())
    assert torch.equal(*grads)


# -- whatever is frozen; your optimizer and the lazily built parts ---------------------------------------
# Defects: the estimators rebuilt their own Adam over the parameters with requires_grad=True only, and
# loaded the saved state into it: a checkpoint loaded into a frozen model (model.requires_grad_(False), a
# frozen estimator or η, the inference / fine-tuning pattern) raised torch's "optimizer got an empty
# parameter list" (REBAR, NVIL with built heads) or "parameter group that doesn't match the size" (RELAX,
# whose network is built trainable while loading).

LEARNED = {k: CASES[k] for k in ("relax", "rebar", "score_learned")}


def _trained(name, options, steps=2):
    m = Model(name, options)
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    for s in range(steps):
        m.step(x, s)
    return m, x


def _checkpoint(m):
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def _moments(est):
    """Adam's state of the estimator's own optimizer, by parameter name (relative to the learned part)."""
    part = est.baseline_fn if est.name == "score" else est
    names = {id(p): n for n, p in part.named_parameters()}
    return {names[id(p)]: {k: v.clone() for k, v in s.items()} for p, s in est._optimizer.state.items()}


def _same_moments(a, b):
    assert set(a) == set(b) and a
    for n in a:
        assert set(a[n]) == set(b[n])
        for k in a[n]:
            assert torch.equal(torch.as_tensor(a[n][k]), torch.as_tensor(b[n][k])), (n, k)


@pytest.mark.parametrize("freeze", ["model", "estimator", "after_building"])
@pytest.mark.parametrize("case", list(LEARNED))
def test_checkpoint_loads_into_a_frozen_model(case, freeze):
    name, options = LEARNED[case]
    _installed(name, options)
    m, x = _trained(name, options)
    saved = _checkpoint(m)
    if freeze == "after_building":  # the learned parts already built (one step), then frozen
        fresh, _ = _trained(name, options, steps=1)
        fresh.requires_grad_(False)
    else:
        fresh = Model(name, options)
        (fresh if freeze == "model" else fresh.est).requires_grad_(False)
    result = fresh.load_state_dict(saved, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for k, v in m.state_dict().items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, fresh.state_dict()[k])
    _same_moments(_moments(fresh.est), _moments(m.est))  # the optimizer state, for the parameters it belongs to


@pytest.mark.parametrize("case", list(LEARNED))
def test_frozen_estimator_parameters_are_not_stepped_and_keep_their_moments(case):
    """Loaded with the estimator frozen, one step changes none of its parameters (nor their moments); unfrozen,
    the next gradient is bitwise the uninterrupted run's."""
    name, options = LEARNED[case]
    _installed(name, options)
    m, x = _trained(name, options)
    saved = _checkpoint(m)
    expected = m.step(x, 7)
    fresh = Model(name, options)
    fresh.load_state_dict(saved, strict=True)
    fresh.est.requires_grad_(False)
    before = {k: v.clone() for k, v in fresh.est.state_dict().items() if isinstance(v, torch.Tensor)}
    moments = _moments(fresh.est)
    fresh.step(x, 5)
    assert all(torch.equal(v, fresh.est.state_dict()[k]) for k, v in before.items())
    _same_moments(_moments(fresh.est), moments)
    fresh.load_state_dict(saved, strict=True)  # unfrozen again, from the checkpoint
    fresh.est.requires_grad_(True)
    got = fresh.step(x, 7)
    assert all(torch.equal(e, g) for e, g in zip(expected, got))


def test_frozen_eta_at_saving_or_loading():
    """REBAR / RELAX with only η frozen: saved that way, it loads into an unfrozen model and the other way round,
    η's moments kept for it; a step leaves η alone and trains λ."""
    for name in ("rebar", "relax"):
        _installed(name)
        m, x = _trained(name, {})
        m.est.eta.requires_grad_(False)
        m.step(x, 2)  # one update with η frozen
        saved = _checkpoint(m)
        fresh = Model(name, {})
        fresh.load_state_dict(saved, strict=True)  # unfrozen
        _same_moments(_moments(fresh.est), _moments(m.est))
        other = Model(name, {})
        other.est.eta.requires_grad_(False)
        other.load_state_dict(saved, strict=True)
        eta, lam = other.est.eta.detach().clone(), other.est.log_temperature.detach().clone()
        other.step(x, 3)
        assert torch.equal(other.est.eta, eta) and not torch.equal(other.est.log_temperature, lam)


def test_checkpoint_from_before_the_parameter_names_loads():
    """A checkpoint whose estimator state holds the plain optimizer state (no parameter names, as saved before
    they were) loads as it did, also into a frozen model."""
    for name, options in LEARNED.values():
        _installed(name, options)
        m, _ = _trained(name, options)
        saved = _checkpoint(m)
        del saved["est._extra_state"]["optimizer_params"]
        fresh = Model(name, options).requires_grad_(False)
        fresh.load_state_dict(saved, strict=True)
        _same_moments(_moments(fresh.est), _moments(m.est))


def _dry_run(model, x):
    """The recipe of docs/reliability.md: one evaluation pass builds the lazily built parts."""
    with torch.no_grad():
        xs = storch.denote_independent(x, 0, "data")
        z = model.est(Bernoulli(logits=model.encoder(xs)))
        storch.add_cost(((z - 0.45) ** 2).sum(), name="c")
        storch.surrogate_loss()
        storch.reset()


@pytest.mark.parametrize("case", ["relax", "score_learned"])
def test_optimizer_over_the_whole_model_resumes_after_a_dry_run(case):
    """Your optimizer over model.parameters(): built after one evaluation pass (which builds RELAX's network and
    NVIL's heads), it holds the same parameters as one built after load_state_dict into a fresh model, so its
    state loads, and the next gradients are bitwise those of the uninterrupted run. Built before (without the
    lazily built parts) it does not: torch's own error, which the docs explain."""
    name, options = CASES[case]
    _installed(name, options)
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    early = Model(name, options)
    opt_early = torch.optim.Adam(early.parameters(), lr=1e-2)
    a = Model(name, options)
    _dry_run(a, x)
    assert len(list(a.parameters())) > len(list(early.parameters()))
    opt_a = torch.optim.Adam(a.parameters(), lr=1e-2)
    for s in range(3):
        for model, opt in ((a, opt_a), (early, opt_early)):
            model.step(x, s)
            opt.step()
    buf = io.BytesIO()
    torch.save({"model": a.state_dict(), "opt": opt_a.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    expected = []
    for s in (3, 4):
        expected.append(a.step(x, s))
        opt_a.step()
    b = Model(name, options)
    b.load_state_dict(saved["model"], strict=True)
    opt_b = torch.optim.Adam(b.parameters(), lr=1e-2)
    opt_b.load_state_dict(saved["opt"])
    got = []
    for s in (3, 4):
        got.append(b.step(x, s))
        opt_b.step()
    assert all(torch.equal(e, g) for ge, gg in zip(expected, got) for e, g in zip(ge, gg))
    c = Model(name, options)
    c.load_state_dict(early.state_dict(), strict=True)
    with pytest.raises(ValueError, match="doesn't match the size"):
        torch.optim.Adam(c.parameters(), lr=1e-2).load_state_dict(opt_early.state_dict())


@pytest.mark.parametrize("case", ["relax", "score_learned", "lax"])
def test_update_false_warns_once_when_a_learned_part_is_built_in_a_training_step(case):
    """update=False leaves the learned parts to your optimizer, which (built before the first step, as usual)
    does not hold a network or head built lazily in that step: they were silently never trained. Now a
    RuntimeWarning, once, that says what to do; none where they were built by an evaluation pass first."""
    import warnings

    if case == "lax":
        _installed("lax")
        from torch.distributions import Normal

        def make():
            return storch.estimator("lax", plate="z", update=False)

        def step(est, grad=True):
            with torch.set_grad_enabled(grad):
                z = est(Normal(torch.zeros(3, requires_grad=True), 1.0))
                storch.add_cost((z ** 2).sum(), name="c")
                if grad:
                    storch.backward()
                else:
                    storch.surrogate_loss()
                    storch.reset()
    else:
        name, options = CASES[case]
        options = {**options, "update": False}
        _installed(name, options)
        x = torch.randn(5, 4)

        def make():
            return Model(name, options)

        def step(model, grad=True):
            if grad:
                model.step(x, 0)
            else:
                _dry_run(model, x)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        model = make()
        step(model)
        step(model)
    lazy = [str(m.message) for m in w if "update=False" in str(m.message)]
    assert len(lazy) == 1 and "add_param_group" in lazy[0] and "torch.no_grad()" in lazy[0]
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        model = make()
        step(model, grad=False)  # the recipe: built in an evaluation pass, before the optimizer
        step(model)
    assert not [m for m in w if "update=False" in str(m.message)]


class _HalfModel(torch.nn.Module):
    def __init__(self, name: str, **options) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.enc = torch.nn.Linear(4, 3)
        self.est = storch.estimator(name, plate="z", **options)

    def step(self, x: torch.Tensor) -> None:
        z = self.est(Bernoulli(logits=self.enc(storch.denote_independent(x, 0, "data"))))
        storch.add_cost(((z - 0.3) ** 2).sum(), name="c")
        storch.backward()


@pytest.mark.parametrize("name,options", [("score", dict(n_samples=2, baseline="learned", hidden=8)),
                                          ("relax", dict(n_samples=2))])
def test_a_checkpoint_of_a_float16_estimator_resumes_bitwise(name, options):
    """The own optimizer of a float16 learned part keeps Adam's moments in float32 (extending.optimizer_step);
    torch's Optimizer.load_state_dict cast them to float16, the second moment (~1e-12) underflowed to 0, and the
    first step after loading was ~lr·m/eps: the resumed run left the uninterrupted one."""
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    a = _HalfModel(name, **options)
    for s in range(3):
        torch.manual_seed(s)
        a.step(x)
    a.half()
    for s in range(3, 5):
        torch.manual_seed(s)
        a.step(x.half())
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = _HalfModel(name, **options).half()
    b.load_state_dict(torch.load(buf))
    moments = [v for st in b.est._optimizer.state.values() for k, v in st.items() if k != "step"]
    assert moments and all(v.dtype == torch.float32 for v in moments)
    for s in range(5, 7):
        torch.manual_seed(s)
        a.step(x.half())
        torch.manual_seed(s)
        b.step(x.half())
    for p, q in zip(a.est.parameters(), b.est.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("name,options", [("score", dict(n_samples=2, baseline="learned", hidden=8)),
                                          ("relax", dict(n_samples=2))])
def test_a_loaded_checkpoint_keeps_the_estimators_own_lr(name, options):
    """docs/reliability.md: lr may change between saving and loading. The estimator's Adam took the saved lr
    from the checkpoint's param group, silently overriding the lr= it was built with."""
    _installed(name, options)
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    a = _HalfModel(name, lr=1e-3, **options)
    for s in range(2):
        torch.manual_seed(s)
        a.step(x)
    b = _HalfModel(name, lr=5e-2, **options)
    b.load_state_dict(a.state_dict())
    assert [g["lr"] for g in b.est._optimizer.param_groups] == [5e-2]
    before = [p.detach().clone() for p in b.est.parameters()]
    c = _HalfModel(name, lr=1e-3, **options)
    c.load_state_dict(a.state_dict())
    for m in (b, c):
        torch.manual_seed(7)
        m.step(x)
    # the same gradients and moments: b's step is 50x c's in Adam's first steps (|update| ~ lr)
    moved_b = sum((p.detach() - q).abs().sum() for p, q in zip(b.est.parameters(), before))
    moved_c = sum((p.detach() - q).abs().sum() for p, q in zip(c.est.parameters(), before))
    assert moved_b > 10 * moved_c > 0


@pytest.mark.parametrize("name", ["relax", "rebar"])
def test_load_state_dict_with_assign_replaces_a_parameter_named_like_an_option(name):
    """review r-six: relax / rebar keep eta as an nn.Parameter and take eta= as an option fixed at construction;
    load_state_dict(sd, assign=True) sets the parameter with setattr and was refused as a late option."""
    _installed(name)
    saved = storch.estimator(name, plate="z")
    with torch.no_grad():
        saved.eta.fill_(0.37)
    sd = saved.state_dict()
    est = storch.estimator(name, plate="z")
    est.load_state_dict(sd, assign=True)
    assert est.eta.item() == pytest.approx(0.37) and isinstance(est.eta, torch.nn.Parameter)
    model = torch.nn.Module()
    model.est = storch.estimator(name, plate="z")
    model.load_state_dict({"est." + k: v for k, v in sd.items()}, assign=True)
    assert model.est.eta.item() == pytest.approx(0.37)
    with pytest.raises(storch.OptionError):
        est.eta = 0.5  # the option itself stays fixed
