"""Per-sample oracle over torch's OpInfo database: plates never lie.

For every operator in ``op_db`` (float32, CPU) one sample input is lifted onto plate layouts
(a sample plate; a data plate + a sample plate; broadcasting against plain tensors; a plain
input with plate arguments), and for every plate entry storch's result must equal the operator
applied to that entry alone -- or storch raises ``PlateError``. Zero silent mismatches.
Entries differ (each float tensor is scaled by a different factor in (0.5, 1]: signs, order,
probability ranges and positive-definiteness are kept), so an operator that mixes entries shows.

Run as a script for the report (counts per treatment and the ops that cannot be tested):
``python tests/core/test_plates_oracle.py``.
"""

from __future__ import annotations

import collections
import itertools
import warnings

import pytest
import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

pytest.importorskip("expecttest")  # torch's OpInfo database imports it

import storch  # noqa: E402
from storch import Plate, PlateTensor  # noqa: E402
from storch import treatment_of  # noqa: E402

LAYOUTS = {
    # name: (plates of the first tensor, plates of the other tensors); None = plain
    "sample": ((("s", 3),), (("s", 3),)),
    "data+sample": ((("d", 2), ("s", 3)), (("s", 3),)),
    "plain-args": ((("s", 3),), None),
    "plain-input": (None, (("s", 3),)),
}
RTOL, ATOL = 1e-4, 1e-5
# random operators (OpInfo seeds some of them inside the op, so they look deterministic): no
# per-entry value to compare; independence per plate entry is tested in test_plates_dispatch
RANDOM_OPS = {"bernoulli", "cauchy", "exponential", "geometric", "log_normal", "normal", "normal.in_place",
              "normal.number_mean", "uniform", "rand_like", "randn_like", "randint_like", "multinomial",
              "nn.functional.rrelu", "nn.functional.dropout", "nn.functional.dropout2d",
              "nn.functional.dropout3d", "nn.functional.alpha_dropout", "nn.functional.feature_alpha_dropout",
              "nn.functional.fractional_max_pool2d", "nn.functional.fractional_max_pool3d", "poisson"}
# uninitialised memory: no value to compare
EMPTY_OPS = {"empty", "empty_like", "new_empty", "new_empty_strided", "empty_strided", "empty_permuted"}


class Recorder(torch.overrides.TorchFunctionMode):
    """Records the first torch function called with a PlateTensor (the op's treatment)."""

    def __init__(self):
        super().__init__()
        self.first = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if self.first is None and PlateTensor in types:
            self.first = func
        return func(*args, **(kwargs or {}))


def _factor(i: int) -> float:
    return 1.0 - 0.5 * i / 6.0


def _lift(t: torch.Tensor, plates):
    """A raw tensor with ``plates`` leading whose entry k (flat index) is ``t * factor(k)``."""
    sizes = [s for _, s in plates]
    n = 1
    for s in sizes:
        n *= s
    if t.is_floating_point() or t.is_complex():
        raw = torch.stack([t * _factor(k) for k in range(n)])
    else:
        raw = torch.stack([t.clone() for _ in range(n)])
    return raw.reshape(*sizes, *t.shape)


def _entry(x, assignment):
    if type(x) is not PlateTensor:
        return x
    raw = x.tensor.expand(*[p.size for p in x.plates], *x.tensor.shape[len(x.plates):])
    return raw[tuple(assignment[p.name] for p in x.plates)]


def _sample(op):
    try:
        for s in op.sample_inputs("cpu", torch.float32, requires_grad=False):
            return s
    except Exception:  # noqa: BLE001 - a broken sample generator is reported as untestable
        return None
    return None


def _compare(got, exp):
    if isinstance(exp, torch.Tensor):
        if not isinstance(got, torch.Tensor):
            return f"expected a tensor, got {type(got).__name__}"
        if got.shape != exp.shape:
            return f"shape {tuple(got.shape)} != {tuple(exp.shape)}"
        if got.dtype != exp.dtype:
            return f"dtype {got.dtype} != {exp.dtype}"
        try:
            torch.testing.assert_close(got, exp, rtol=RTOL, atol=ATOL, equal_nan=True)
        except (RuntimeError, NotImplementedError):  # dtypes without comparisons (ComplexHalf)
            return None if torch.equal(got.view(torch.uint8), exp.view(torch.uint8)) else "bits differ"
        except AssertionError as e:
            return str(e).splitlines()[0] + " " + " ".join(str(e).splitlines()[1:3])
        return None
    if isinstance(exp, (int, float, bool)) and isinstance(got, (int, float, bool)):
        return None if got == exp or (got != got and exp != exp) else f"{got} != {exp}"
    return None if type(got) is type(exp) else f"type {type(got).__name__} != {type(exp).__name__}"


def run_op(op, fn, layout, sample):
    """One op variant on one layout: 'match', 'refused', ('untestable', why) or ('MISMATCH', why)."""
    first_plates, other_plates = LAYOUTS[layout]
    leaves, spec = tree_flatten((sample.input, sample.args, sample.kwargs))
    tensor_ids = [i for i, a in enumerate(leaves) if isinstance(a, torch.Tensor)]
    if not tensor_ids:
        return ("untestable", "no tensor operand"), None
    if layout == "plain-input" and len(tensor_ids) < 2:
        return ("skip", ""), None
    lifted = list(leaves)
    all_plates = {}
    for j, i in enumerate(tensor_ids):
        ps = first_plates if j == 0 else other_plates
        if ps is None:
            continue
        lifted[i] = PlateTensor(_lift(leaves[i], ps), [Plate(n, s) for n, s in ps])
        all_plates.update(dict(ps))
    inp, args, kwargs = tree_unflatten(lifted, spec)
    names = list(all_plates)
    # per-entry references
    refs = {}
    for idx in itertools.product(*[range(all_plates[n]) for n in names]):
        a = dict(zip(names, idx))
        e_inp, e_args, e_kwargs = tree_unflatten([_entry(x, a) for x in lifted], spec)
        if isinstance(e_inp, torch.Tensor):
            e_inp = e_inp.clone()
        try:
            torch.manual_seed(0)
            refs[idx] = fn(e_inp, *e_args, **e_kwargs)
        except Exception as e:  # noqa: BLE001
            return ("untestable", f"the op fails on a lifted entry: {type(e).__name__}"), None
    if isinstance(inp, PlateTensor):
        inp = PlateTensor(inp.tensor.clone(), inp.plates)
    rec = Recorder()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with rec:
                out = fn(inp, *args, **kwargs)
    except storch.PlateError as e:
        return ("refused", str(e)[:300]), rec.first
    except Exception as e:  # noqa: BLE001
        return ("ERROR", f"{type(e).__name__}: {str(e)[:200]}"), rec.first
    for idx, ref in refs.items():
        a = dict(zip(names, idx))
        o_leaves, o_spec = tree_flatten(out)
        r_leaves, r_spec = tree_flatten(ref)
        if len(o_leaves) != len(r_leaves):
            return ("MISMATCH", f"{len(o_leaves)} outputs, expected {len(r_leaves)}"), rec.first
        for o, r in zip(o_leaves, r_leaves):
            msg = _compare(_entry(o, a), r)
            if msg:
                return ("MISMATCH", f"entry {a}: {msg}"), rec.first
    return "match", rec.first


def _is_random(op, fn, sample):
    outs = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        try:
            inp = sample.input.clone() if isinstance(sample.input, torch.Tensor) else sample.input
            outs.append(tree_flatten(fn(inp, *sample.args, **sample.kwargs))[0])
        except Exception:  # noqa: BLE001
            return False
    for a, b in zip(*outs):
        if isinstance(a, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype and a.layout == torch.strided:
            try:
                if not torch.equal(a.nan_to_num(), b.nan_to_num()):
                    return True
            except (RuntimeError, NotImplementedError):
                pass
    return False


def oracle():
    from torch.testing._internal.common_methods_invocations import op_db

    results = []  # (op name, variant, layout, treatment, outcome, detail)
    untestable = {}
    for op in op_db:
        name = op.name + ("." + op.variant_test_name if op.variant_test_name else "")
        if torch.float32 not in op.supported_dtypes("cpu"):
            untestable[name] = "no float32 CPU support"
            continue
        sample = _sample(op)
        if sample is None:
            untestable[name] = "no sample input"
            continue
        if any(isinstance(t, torch.Tensor) and t.layout != torch.strided
               for t in tree_flatten((sample.input, sample.args, sample.kwargs))[0]):
            untestable[name] = "sparse sample input (plates hold strided tensors)"
            continue
        variants = [("function", op.op)]
        if op.method_variant is not None:
            variants.append(("method", op.method_variant))
        if op.inplace_variant is not None:
            variants.append(("inplace", op.inplace_variant))
        if op.name in EMPTY_OPS:
            untestable[name] = "uninitialised memory: no per-entry value to compare"
            continue
        if name in RANDOM_OPS or op.name in RANDOM_OPS or _is_random(op, op.op, sample):
            untestable[name] = "random: no per-entry value to compare (independence: test_plates_dispatch)"
            continue
        for (vname, fn), layout in itertools.product(variants, LAYOUTS):
            if vname == "inplace" and layout != "sample":
                continue
            outcome, first = run_op(op, fn, layout, sample)
            if outcome == ("skip", ""):
                continue
            if isinstance(outcome, tuple) and outcome[0] == "untestable":
                untestable.setdefault(name, outcome[1])
                break
            treatment = treatment_of(first).treatment.value if first is not None else "none"
            kind, detail = outcome if isinstance(outcome, tuple) else (outcome, "")
            results.append((name, vname, layout, treatment, kind, detail))
    return results, untestable


@pytest.fixture(scope="module")
def report():
    torch.manual_seed(0)
    return oracle()


def test_no_silent_mismatch_over_opinfo(report):
    results, untestable = report
    bad = [r for r in results if r[4] in ("MISMATCH", "ERROR")]
    assert len({r[0] for r in results}) > 400, "the oracle ran on too few operators"
    assert not bad, "\n".join(f"{n} [{v}, {layout}, {t}] {k}: {d}" for n, v, layout, t, k, d in bad)


def test_most_operators_run_on_plates(report):
    results, _ = report
    ok = [r for r in results if r[4] == "match"]
    # refusals are allowed, but they must stay the exception: every treatment is exercised
    assert len(ok) > 0.75 * len(results), collections.Counter(r[4] for r in results)
    assert {r[3] for r in ok} >= {"pointwise", "handler", "batch-first", "vmap"}


if __name__ == "__main__":  # the report for the closing note / docs
    res, unt = oracle()
    by = collections.Counter((r[3], r[4]) for r in res)
    ops_by = collections.defaultdict(set)
    for r in res:
        ops_by[(r[3], r[4])].add(r[0])
    print("treatment    outcome   cases  ops")
    for (t, k), c in sorted(by.items()):
        print(f"{t:12s} {k:9s} {c:5d}  {len(ops_by[(t, k)])}")
    outcomes = collections.defaultdict(set)
    for r in res:
        outcomes[r[0]].add(r[4])
    print(f"ops tested: {len(outcomes)}; every case per-sample: "
          f"{sum(o == {'match'} for o in outcomes.values())}; some layouts refused: "
          f"{sum(o == {'match', 'refused'} for o in outcomes.values())}; all refused: "
          f"{sum(o == {'refused'} for o in outcomes.values())}; silent mismatches or other errors: "
          f"{sum(bool(o & {'MISMATCH', 'ERROR'}) for o in outcomes.values())}")
    for r in res:
        if r[4] in ("MISMATCH", "ERROR"):
            print("BAD", r)
    refused = {}
    for r in res:
        if r[4] == "refused":
            refused.setdefault(r[0], f"[{r[1]}, {r[2]}] {r[5]}")
    print(f"refused ({len(refused)} ops):")
    for n, why in sorted(refused.items()):
        print(f"  {n}: {why}")
    print(f"untestable ({len(unt)} ops):")
    for n, why in sorted(unt.items()):
        print(f"  {n}: {why}")
