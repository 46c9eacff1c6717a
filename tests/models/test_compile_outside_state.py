"""storch.compile and what a step reads or changes outside its arguments (found by a porting tester).

- An optimizer's ``step()`` or ``zero_grad()`` (or any read or write of a ``.grad``) inside a compiled step was
  recorded as nothing: ``opt.step()`` at the start of the step never updated the parameters (0.0 moved vs 0.094
  eagerly after 10 calls), a ``zero_grad`` at the start let the gradients accumulate. Both are refused at the trace.
- A module reached through a dict entry, a global name, a closure cell or a list item and replaced there: the replay
  kept computing with (and training) the old one (5.3207 compiled vs 5.4865 eagerly). Such lookups are now guarded
  like module attributes: the next call traces again.
- Messages: a Python branch on a sample, a draw with a generator of its own, an estimator with state made in the step.
"""

from __future__ import annotations

import pytest
import torch
from torch.distributions import Bernoulli
from torch.optim.optimizer import _global_optimizer_pre_hooks

import storch
from model_checks import assert_same_step, step_value_and_grads

pytestmark = pytest.mark.usefixtures("restore_validation")  # conftest

D, L = 6, 3
_X = (torch.rand(5, D, generator=torch.Generator().manual_seed(123)) < 0.4).float()


class _Model(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = torch.nn.Linear(D, L)
        self.dec = torch.nn.Linear(L, D)

    def forward(self, est, x):
        z = est(Bernoulli(logits=self.enc(x)))
        storch.add_cost(-Bernoulli(logits=self.dec(z)).log_prob(x).sum(), name="rec")
        return z


def _est():
    return storch.estimator("score", plate="z", n_samples=2, baseline="leave_one_out")


_grads, _assert_same = step_value_and_grads, assert_same_step


# -- the optimizer inside the step -----------------------------------------------------------------------------


def _prime(model, est):
    """One eager backward: the parameters hold gradients at the compiled step's first call."""
    with storch.Graph():
        model(est, storch.denote_independent(_X, 0, "data"))
        storch.surrogate_loss().backward()


@pytest.mark.parametrize("grads_first", [False, True])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_an_optimizer_step_inside_the_step_is_refused(optimizer, grads_first):
    # `opt.step(); opt.zero_grad()` at the start of the step (apply the previous call's gradients): the trace
    # recorded no update (no gradients at a first call), the replay never stepped; with gradients at the first
    # call the replay check refused it with a message about SPSA and generators
    torch.manual_seed(0)
    model, est = _Model(), _est()
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9) if optimizer == "sgd" else torch.optim.Adam(params, lr=0.01)

    def step(x):
        opt.step()
        opt.zero_grad()
        with storch.Graph():
            model(est, storch.denote_independent(x, 0, "data"))
            return storch.surrogate_loss()

    if grads_first:
        _prime(model, est)
    before = [p.detach().clone() for p in params]
    hooks = dict(_global_optimizer_pre_hooks)
    name = type(opt).__name__
    with pytest.raises(storch.StorchError, match=rf"calls {name}.step\(\) inside the step.*outside the compiled step"):
        storch.compile(step, backend=None)(_X)
    assert dict(_global_optimizer_pre_hooks) == hooks  # the trace's hook is gone
    for p, b in zip(params, before):  # refused before the optimizer changed anything
        assert torch.equal(p.detach(), b)
    opt.step()  # (and the optimizer works outside a trace)
    assert grads_first == any(not torch.equal(p.detach(), b) for p, b in zip(params, before))


def test_the_optimizer_stepped_outside_the_compiled_step_trains_as_eagerly():
    # what the refusal says to do: the same parameters as the eager loop after every call
    def run(compiled):
        torch.manual_seed(0)
        model, est = _Model(), _est()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)

        def step(x):
            with storch.Graph():
                model(est, storch.denote_independent(x, 0, "data"))
                return storch.surrogate_loss()

        f = storch.compile(step, backend=None) if compiled else step
        out = []
        for t in range(4):
            torch.manual_seed(t)
            f(_X).backward()
            opt.step()
            opt.zero_grad()
            out.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
        return out

    for got, want in zip(run(True), run(False)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


_ZEROING = {
    "opt.zero_grad()": lambda opt, model: opt.zero_grad(),
    "opt.zero_grad(set_to_none=False)": lambda opt, model: opt.zero_grad(set_to_none=False),
    "model.zero_grad()": lambda opt, model: model.zero_grad(),
    "p.grad = None": lambda opt, model: [setattr(p, "grad", None) for p in model.parameters()],
    "clip_grad_norm_": lambda opt, model: torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0),
}


@pytest.mark.parametrize("grads_first", [False, True])
@pytest.mark.parametrize("how", list(_ZEROING))
def test_zeroing_or_reading_gradients_inside_the_step_is_refused(how, grads_first):
    # a zero_grad at the start of the step ran at the trace only: the replayed calls let the gradients accumulate
    # (silently), and with no gradients at the first call nothing at all was seen
    torch.manual_seed(0)
    model, est = _Model(), _est()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def step(x):
        _ZEROING[how](opt, model)
        with storch.Graph():
            model(est, storch.denote_independent(x, 0, "data"))
            return storch.surrogate_loss()

    if grads_first:
        _prime(model, est)
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    with pytest.raises(storch.StorchError, match=r"\.grad|zero_grad\(\).*outside the compiled step"):
        storch.compile(step, backend=None)(_X)
    for p, g in zip(model.parameters(), grads):  # refused before it changed a gradient
        assert (p.grad is None) if g is None else torch.equal(p.grad, g)


# -- modules and tensors reached through a dict, a global name, a closure cell, a list ---------------------------

_GDEC: torch.nn.Module = torch.nn.Linear(L, D)
_GW = torch.ones(())


def _holder_step(where: str, est, enc):
    """A step that reads its decoder through ``where``, and a function that replaces it there."""
    holder = {"dec": torch.nn.Linear(L, D)}
    items = [torch.nn.Linear(L, D)]
    cell = torch.nn.Linear(L, D)
    globals()["_GDEC"] = torch.nn.Linear(L, D)

    def decoder():
        return {"dict": lambda: holder["dec"], "list": lambda: items[0], "cell": lambda: cell,
                "global": lambda: _GDEC}[where]()

    def step(x):
        with storch.Graph():
            x = storch.denote_independent(x, 0, "data")
            z = est(Bernoulli(logits=enc(x)))
            dec = holder["dec"] if where == "dict" else items[0] if where == "list" else cell if where == "cell" \
                else _GDEC
            storch.add_cost(-Bernoulli(logits=dec(z)).log_prob(x).sum(), name="rec")
            return storch.surrogate_loss()

    def replace():
        nonlocal cell
        new = torch.nn.Linear(L, D)
        if where == "dict":
            holder["dec"] = new
        elif where == "list":
            items[0] = new
        elif where == "cell":
            cell = new
        else:
            globals()["_GDEC"] = new

    return step, decoder, replace


@pytest.mark.parametrize("backend", [None, "aot_eager"])
@pytest.mark.parametrize("where", ["dict", "global", "cell", "list"])
def test_a_module_replaced_where_the_step_finds_it_is_traced_again(where, backend):
    torch.manual_seed(0)
    enc, est = torch.nn.Linear(D, L), _est()
    step, decoder, replace = _holder_step(where, est, enc)
    compiled = storch.compile(step, backend=backend)
    compiled(_X).backward()
    old = decoder()
    old.weight.grad = None
    replace()
    new = decoder()
    assert new is not old
    params = [*enc.parameters(), *new.parameters()]
    _assert_same(_grads(compiled, params, (_X,), 1), _grads(step, params, (_X,), 1))
    assert compiled.traces == 2
    compiled(_X).backward()
    assert compiled.traces == 2  # the guard passes again
    assert old.weight.grad is None and new.weight.grad is not None  # the new decoder trains, not the old one


def test_a_module_without_parameters_replaced_in_a_dict_is_traced_again():
    # the dropout's probability is baked into the trace: replaced by another module, the old one went on
    torch.manual_seed(0)
    enc, dec, est = torch.nn.Linear(D, L), torch.nn.Linear(L, D), _est()
    holder = {"drop": torch.nn.Dropout(0.9)}

    def step(x):
        with storch.Graph():
            x = storch.denote_independent(x, 0, "data")
            z = est(Bernoulli(logits=enc(x)))
            storch.add_cost(-Bernoulli(logits=dec(holder["drop"](z))).log_prob(x).sum(), name="rec")
            return storch.surrogate_loss()

    compiled = storch.compile(step, backend=None)
    compiled(_X)
    holder["drop"] = torch.nn.Identity()
    params = [*enc.parameters(), *dec.parameters()]
    _assert_same(_grads(compiled, params, (_X,), 2), _grads(step, params, (_X,), 2))
    assert compiled.traces == 2


def test_a_captured_global_tensor_rebound_is_traced_again():
    # a tensor the step reads by a global name (not a parameter: read live while the same object) and rebound
    torch.manual_seed(0)
    enc, est = torch.nn.Linear(D, L), _est()
    globals()["_GW"] = torch.ones(())

    def step(x):
        with storch.Graph():
            z = est(Bernoulli(logits=enc(storch.denote_independent(x, 0, "data"))))
            storch.add_cost((z * _GW).sum(), name="f")
            return storch.surrogate_loss()

    compiled = storch.compile(step, backend=None)
    compiled(_X)
    globals()["_GW"] = torch.tensor(3.0)
    params = list(enc.parameters())
    _assert_same(_grads(compiled, params, (_X,), 3), _grads(step, params, (_X,), 3))
    assert compiled.traces == 2


def test_a_module_replaced_in_a_step_with_estimator_state_is_traced_again():
    # a step whose estimator keeps a moving average (a trace per structure of its state): the same guard
    torch.manual_seed(0)
    enc = torch.nn.Linear(D, L)
    est = storch.estimator("score", plate="z", n_samples=2, baseline="moving_average")
    step, decoder, replace = _holder_step("dict", est, enc)
    compiled = storch.compile(step, backend=None)
    for _ in range(2):  # (the second call has a moving average: its own trace)
        compiled(_X).backward()
    replace()
    params = [*enc.parameters(), *decoder().parameters()]
    _assert_same(_grads(compiled, params, (_X,), 4), _grads(step, params, (_X,), 4))
    torch.manual_seed(5)
    compiled(_X).backward()
    assert decoder().weight.grad is not None


# -- messages ------------------------------------------------------------------------------------------------------


def test_a_python_branch_on_a_sample_is_named_so():
    # it said "`__bool__` of a tensor from outside the step (a buffer or parameter...)" of the step's own sample
    torch.manual_seed(0)
    model, est = _Model(), _est()

    def step(x):
        with storch.Graph():
            z = model(est, storch.denote_independent(x, 0, "data"))
            if z.sum() > 3:
                storch.add_cost(z.sum(), name="extra")
            return storch.surrogate_loss()

    with pytest.raises(storch.StorchError, match=r"plate tensor the step computes \(a sample.*torch.where") as info:
        storch.compile(step, backend=None)(_X)
    assert "outside the step" not in str(info.value)


@pytest.mark.parametrize("where", ["torch.rand", "storch.Graph"])
def test_a_draw_from_a_generator_of_its_own_names_the_generator(where):
    # it said "run eagerly and as traced ... gives different values ... SPSA's coupled draws"
    torch.manual_seed(0)
    model, est = _Model(), _est()

    def step(x, g):
        if where == "torch.rand":
            with storch.Graph():
                noisy = (x + torch.rand(x.shape, generator=g) > 0.5).float()
                model(est, storch.denote_independent(noisy, 0, "data"))
                return storch.surrogate_loss()
        with storch.Graph(generator=g):
            model(est, storch.denote_independent(x, 0, "data"))
            return storch.surrogate_loss()

    with pytest.raises(storch.StorchError, match="generator of its own.*generator="):
        storch.compile(step, backend=None)(_X, torch.Generator().manual_seed(0))


_STATEFUL = {
    "moving_average": ("score", {"baseline": "moving_average"}),
    "temperature schedule": ("gumbel_softmax", {"temperature": lambda s: 1.0 / (1 + s)}),
}


@pytest.mark.parametrize("case", list(_STATEFUL))
def test_an_estimator_with_state_created_inside_the_step_is_refused(case):
    # a moving-average estimator made in the step was refused only at the second call, with "call .clear()"
    name, options = _STATEFUL[case]
    torch.manual_seed(0)
    enc = torch.nn.Linear(D, L)

    def step(x):
        est = storch.estimator(name, plate="z", n_samples=2, **options)
        with storch.Graph():
            z = est(Bernoulli(logits=enc(storch.denote_independent(x, 0, "data"))))
            storch.add_cost(((z - 0.3) ** 2).sum(), name="f")
            return storch.surrogate_loss()

    with pytest.raises(storch.StorchError, match="creates estimator .* inside the step.*once, outside the step"):
        storch.compile(step, backend=None)(_X)


def test_an_estimator_without_state_created_inside_the_step_compiles():
    torch.manual_seed(0)
    enc = torch.nn.Linear(D, L)

    def step(x):
        est = _est()
        with storch.Graph():
            z = est(Bernoulli(logits=enc(storch.denote_independent(x, 0, "data"))))
            storch.add_cost(((z - 0.3) ** 2).sum(), name="f")
            return storch.surrogate_loss()

    compiled = storch.compile(step, backend=None)
    params = list(enc.parameters())
    for seed in range(2):
        _assert_same(_grads(compiled, params, (_X,), seed), _grads(step, params, (_X,), seed))
    assert compiled.traces == 1


class _LazyModel(torch.nn.Module):
    """Creates its estimator with state at the first call and keeps it (a common pattern)."""

    def __init__(self, name: str, options: dict) -> None:
        super().__init__()
        self.enc = torch.nn.Linear(D, L)
        self.name, self.options, self.est = name, options, None

    def forward(self, x):
        if self.est is None:
            self.est = storch.estimator(self.name, plate="z", n_samples=2, **self.options)
        with storch.Graph():
            z = self.est(Bernoulli(logits=self.enc(storch.denote_independent(x, 0, "data"))))
            storch.add_cost(((z - 0.3) ** 2).sum(), name="f")
            return storch.surrogate_loss()


def test_an_estimator_with_state_created_at_the_first_call_and_kept_compiles():
    # created in the trace but not anew at each call: it was refused as "made anew at every call" (it ran before
    # that refusal, and must): the compiled step updates the kept estimator's state as the eager one does
    torch.manual_seed(0)
    eager = _LazyModel("score", {"baseline": "moving_average"})
    model = _LazyModel("score", {"baseline": "moving_average"})
    model.load_state_dict(eager.state_dict())
    compiled = storch.compile(model, backend=None)
    averages = []
    for seed in range(3):
        for step, m in ((compiled, model), (eager, eager)):
            torch.manual_seed(seed)
            m.zero_grad()
            step(_X).backward()
        for g, e in zip(model.parameters(), eager.parameters()):
            torch.testing.assert_close(g.grad, e.grad, rtol=1e-5, atol=1e-6)
        assert model.est is not None and eager.est is not None
        got, want = dict(model.est.moving_averages), dict(eager.est.moving_averages)
        assert list(got) == list(want) == ["f"]
        torch.testing.assert_close(got["f"], want["f"])
        averages.append(want["f"].clone())
    assert compiled.traces <= 2  # (model.est set at the first call: the guard may trace once more), not per call
    assert not torch.equal(averages[0], averages[2])  # the averages moved at every call
