"""A Score subclass with its own baseline() or control_variate(), created with a baseline option: refused where its
code never reads the option (it would be silently dropped), accepted where it does. The check read the names in the
override's bytecode: any attribute or string spelled like the option's ("baseline", "name" of a class attribute)
counted as a read, a staticmethod or an overridden control_variate was not looked at, and a helper in another module
or in a mixin after Score in the MRO was not followed (found by review). It now reads the override's syntax tree."""

import inspect
import textwrap

import pytest
import torch

import baseline_helpers
import storch
import storch_score
from storch import magic_box

torch.set_default_dtype(torch.float64)
S = storch_score.Score


class _Critic(torch.nn.Module):
    def baseline(self, t):
        return t.mean()


# -- overrides that drop the option: refused (each was accepted before) --------------------------------------------


class AnotherObjectsBaseline(S):
    name = "test_reads_critic"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.critic = _Critic()

    def baseline(self, node, cost):
        return self.critic.baseline(cost.tensor)  # the critic's baseline, not the option's


class ByCostName(S):
    name = "test_reads_cost_name"  # a class attribute "name": cost.name below is no helper of the class

    def baseline(self, node, cost):
        return torch.tensor(0.3 if cost.name == "a" else 0.9)


class ClassConstant(S):
    name = "test_reads_class_constant"
    scale = 0.5

    def baseline(self, node, cost):
        return cost.tensor.mean() * self.scale


class Static(S):
    name = "test_reads_static"

    @staticmethod
    def baseline(node, cost):
        return cost.tensor.mean()


class ClassMethod(S):
    name = "test_reads_classmethod"

    @classmethod
    def baseline(cls, node, cost):
        return cost.tensor.mean()


class OwnControlVariate(S):
    name = "test_reads_own_cv"

    def control_variate(self, node, cost):
        return (1.0 - magic_box(cost.align(node.gradient_values))) * 0.5  # calls no baseline


class ControlVariateOfAnotherBaseline(S):
    name = "test_reads_cv_other"

    def control_variate(self, node, cost):
        return (1.0 - magic_box(cost.align(node.gradient_values))) * self.constant(cost)

    def constant(self, cost):
        return torch.tensor(0.5)


class DeclaredNot(S):
    name = "test_reads_declared_not"
    reads_baseline_option = False  # the declaration wins over the reading

    def baseline(self, node, cost):
        return super().baseline(node, cost)


IGNORING = [(AnotherObjectsBaseline, "baseline"), (ByCostName, "baseline"), (ClassConstant, "baseline"),
            (Static, "baseline"), (ClassMethod, "baseline"), (OwnControlVariate, "control_variate"),
            (ControlVariateOfAnotherBaseline, "control_variate"), (DeclaredNot, "baseline")]


@pytest.mark.parametrize("cls,method", IGNORING, ids=[c.__name__ for c, _ in IGNORING])
def test_an_override_that_drops_the_option_is_refused(cls, method):
    for option in ("leave_one_out", "moving_average", "learned", lambda node, cost: None):
        with pytest.raises(storch.OptionError, match=rf"{cls.__name__} \('{cls.name}'\) defines its own {method}"
                                                     r"\(node, cost\).*would be ignored.*baseline='none'.*"
                                                     r"reads_baseline_option = True"):
            cls(plate="z", n_samples=3, baseline=option)
    assert cls(plate="z", n_samples=3).baseline_kind == "none"  # its own baseline with the default option
    assert cls(plate="z", n_samples=3, baseline="greedy").baseline_kind == "greedy"


# -- overrides that read the option: accepted (the first two were refused before) ----------------------------------


class ModuleHelper(S):
    name = "test_reads_module_helper"

    def baseline(self, node, cost):
        return baseline_helpers.half_of_the_option(self, node, cost)


class MixinAfterScore(S, baseline_helpers.OptionMixin):
    name = "test_reads_mixin_after"

    def baseline(self, node, cost):
        return self.option_baseline(node, cost)


class LocalNamedBaseline(S):
    name = "test_reads_local_named"

    def baseline(self, node, cost):
        baseline = super().baseline  # a local named baseline that holds the option's
        b = baseline(node, cost)
        return None if b is None else 0.5 * b


class Aliased(S):
    name = "test_reads_aliased"

    def baseline(self, node, cost):
        est = self
        return None if est.baseline_kind == "none" else S.baseline(est, node, cost)


class ControlVariateOfTheOption(S):
    name = "test_reads_cv_super"

    def control_variate(self, node, cost):
        a = super().control_variate(node, cost)
        return None if a is None else 0.5 * a


class ControlVariateCallingBaseline(S):
    name = "test_reads_cv_baseline"

    def control_variate(self, node, cost):
        b = self.baseline(node, cost)
        return None if b is None else (1.0 - magic_box(cost.align(node.gradient_values))) * b.detach()


class Declared(S):
    name = "test_reads_declared"
    reads_baseline_option = True  # a read storch does not follow: getattr with a computed name

    def baseline(self, node, cost):
        return getattr(S, "base" + "line")(self, node, cost)


READING = [ModuleHelper, MixinAfterScore, LocalNamedBaseline, Aliased, ControlVariateOfTheOption,
           ControlVariateCallingBaseline, Declared]


@pytest.mark.parametrize("cls", READING, ids=[c.__name__ for c in READING])
def test_an_override_that_reads_the_option_is_accepted(cls):
    for option in ("leave_one_out", "moving_average", "learned"):
        assert cls(plate="z", n_samples=3, baseline=option).baseline_kind != "none"


@pytest.mark.parametrize("cls,factor", [(ModuleHelper, 0.5), (MixinAfterScore, 1.0), (LocalNamedBaseline, 0.5),
                                        (ControlVariateCallingBaseline, 1.0)])
def test_an_accepted_override_uses_the_option_s_baseline(cls, factor):
    """The gradient by hand: Σ_j (c_j - factor·b_j) ∇log p(x_j) / n, b_j the leave-one-out mean of the others."""
    baseline_helpers.assert_leave_one_out_gradient(cls, factor, seed=3)


def test_the_control_variate_of_the_option_halved():
    """super().control_variate(node, cost) is the option's (1 - MagicBox(l)) b: half of it, by hand."""
    baseline_helpers.assert_leave_one_out_gradient(ControlVariateOfTheOption, 0.5, seed=5)


# -- code without source (exec, python -c, stdin, .pyc-only): its bytecode is read (found by review: every such
# override was refused, super().baseline(node, cost) included) -----------------------------------------------------


def _without_source(body: str, name: str):
    """``class <name>(Score)`` with the methods ``body``, defined by exec: inspect.getsource has nothing to read."""
    src = f"class {name}(S):\n    name = 'test_reads_{name.lower()}'\n" + textwrap.indent(textwrap.dedent(body), "    ")
    scope = {"S": S, "storch": storch, "baseline_helpers": baseline_helpers, "torch": torch, "magic_box": magic_box}
    exec(compile(src, "<exec>", "exec"), scope)
    return scope[name]


EXEC_READING = {
    "ExecSuper": "def baseline(self, node, cost):\n    return super().baseline(node, cost)\n",
    "ExecScore": "def baseline(self, node, cost):\n    b = S.baseline(self, node, cost)\n    return b\n",
    "ExecAlias": "def baseline(self, node, cost):\n    est = self\n    return S.baseline(est, node, cost)\n",
    "ExecHelper": "def baseline(self, node, cost):\n    return self.helper(node, cost)\n"
                  "def helper(self, node, cost):\n    return super().baseline(node, cost)\n",
    "ExecModuleHelper": "def baseline(self, node, cost):\n"
                        "    return 2.0 * baseline_helpers.half_of_the_option(self, node, cost)\n",
    "ExecRegistry": "def baseline(self, node, cost):\n"
                    "    return storch.get_estimator_class('score').baseline(self, node, cost)\n",
    "ExecCv": "def control_variate(self, node, cost):\n    return super().control_variate(node, cost)\n",
}
EXEC_DROPPING = {
    "ExecPlain": ("def baseline(self, node, cost):\n    return cost.tensor.mean()\n", "baseline"),
    "ExecCritic": ("def baseline(self, node, cost):\n    self.critic.moving_averages['seen'] = True\n"
                   "    return self.critic.baseline(cost.tensor)\n", "baseline"),
    "ExecCostName": ("def baseline(self, node, cost):\n    return torch.tensor(0.3 if cost.name == 'a' else 0.9)\n",
                     "baseline"),
    "ExecCv": ("def control_variate(self, node, cost):\n    return (1.0 - magic_box(node.gradient_values)) * 0.5\n",
               "control_variate"),
}


@pytest.mark.parametrize("name", list(EXEC_READING))
def test_an_override_without_source_that_reads_the_option_is_accepted(name):
    cls = _without_source(EXEC_READING[name], name)
    with pytest.raises(OSError):
        inspect.getsource(cls.__dict__["baseline" if "baseline" in cls.__dict__ else "control_variate"])
    for option in ("leave_one_out", "moving_average", "learned"):
        assert cls(plate="z", n_samples=3, baseline=option).baseline_kind != "none"


@pytest.mark.parametrize("name", list(EXEC_DROPPING))
def test_an_override_without_source_that_drops_the_option_is_refused(name):
    body, method = EXEC_DROPPING[name]
    cls = _without_source(body, name)
    with pytest.raises(storch.OptionError, match=rf"{name} \('test_reads_{name.lower()}'\) defines its own {method}"
                                                 rf".*the source of {name}.{method} could not be read, its bytecode "
                                                 r"was read instead.*reads_baseline_option = True"):
        cls(plate="z", n_samples=3, baseline="moving_average")
    assert cls(plate="z", n_samples=3).baseline_kind == "none"


@pytest.mark.parametrize("name", ["ExecSuper", "ExecModuleHelper", "ExecRegistry"])
def test_an_accepted_override_without_source_uses_the_option_s_baseline(name):
    test_an_accepted_override_uses_the_option_s_baseline(_without_source(EXEC_READING[name], name), 1.0)


# -- spellings: the registry's class; the option's state of another object (found by review) -----------------------


class ViaRegistry(S):
    name = "test_reads_registry"

    def baseline(self, node, cost):
        return storch.get_estimator_class("score").baseline(self, node, cost)  # Score.baseline, looked up


class ViaNodeEstimatorState(S):
    name = "test_reads_node_estimator_state"

    def baseline(self, node, cost):
        return None if node.estimator.baseline_kind == "none" else S.baseline(self, node, cost)


class _CriticWithState(_Critic):
    def __init__(self):
        super().__init__()
        self.moving_averages: dict = {}


class CriticsMovingAverages(S):
    name = "test_reads_critic_state"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.critic = _CriticWithState()

    def baseline(self, node, cost):
        self.critic.moving_averages["seen"] = True  # the critic's state, not the option's
        return getattr(self.critic, "baseline_fn", None) or self.critic.baseline(cost.tensor)


def test_the_registry_s_score_baseline_reads_the_option():
    assert ViaRegistry(plate="z", n_samples=3, baseline="leave_one_out").baseline_kind == "leave_one_out"
    test_an_accepted_override_uses_the_option_s_baseline(ViaRegistry, 1.0)
    assert ViaNodeEstimatorState(plate="z", n_samples=3, baseline="moving_average").baseline_kind == "moving_average"


def test_another_object_s_option_state_is_no_read():
    with pytest.raises(storch.OptionError, match=r"CriticsMovingAverages .* defines its own baseline"):
        CriticsMovingAverages(plate="z", n_samples=3, baseline="moving_average")
    assert CriticsMovingAverages(plate="z", n_samples=3).baseline_kind == "none"
