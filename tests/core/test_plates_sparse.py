"""A plain sparse matrix (a fixed graph) times plate tensors (p-graphs: ``S @ h`` raised torch's "expand is
unsupported for Sparse tensors"; ``torch.sparse.mm`` looped over the plate entries): the plates are folded into
the dense operand's columns (rows), one sparse product; values and gradients equal a loop over the entries.
Sparse tensors that vary per sample are refused with the advice to build the dense tensor."""

import warnings

import pytest
import torch
from torch.distributions import Bernoulli

import storch
from storch import PlateTensor

from path_probes import calls
from test_plates_dispatch import check, make, rnd

D = torch.float64
ZD = (("z", 3), ("data", 2))


class _Plain(storch.Estimator):
    """The base class's components (the score function): the core test env has no storch_score."""

    name = "plain_score_for_sparse_tests"


def _graph(n=4, m=4, seed=5):
    """A fixed sparse adjacency (COO, some entries weighted)."""
    g = torch.Generator().manual_seed(seed)
    dense = (torch.rand(n, m, generator=g) > 0.5).to(D) * torch.rand(n, m, generator=g, dtype=D)
    return dense.to_sparse()


S = _graph()
S_CSR = S.to_sparse_csr()
S_RECT = _graph(5, 4, seed=6)  # (5, 4): rows and columns differ, a transposition shows

# name -> (fn(h), per-sample shape of h): S on the left folds the plates into h's columns, on the right into its rows
PRODUCTS = {
    "S @ h": (lambda h: S_RECT @ h, (4, 2)),
    "torch.matmul": (lambda h: torch.matmul(S_RECT, h), (4, 2)),
    "torch.mm": (lambda h: torch.mm(S_RECT, h), (4, 2)),
    "torch.spmm": (lambda h: torch.spmm(S_RECT, h), (4, 2)),
    "S.mm": (lambda h: S_RECT.mm(h), (4, 2)),
    "S.matmul": (lambda h: S_RECT.matmul(h), (4, 2)),
    "torch.sparse.mm": (lambda h: torch.sparse.mm(S_RECT, h), (4, 2)),
    "csr @ h": (lambda h: S_CSR @ h, (4, 2)),
    "S @ vector": (lambda h: S_RECT @ h, (4,)),
    "torch.mv": (lambda h: torch.mv(S_RECT, h), (4,)),
    "h.mT @ S": (lambda h: h.mT @ S_RECT.t(), (4, 2)),
    "torch.mm(h, S)": (lambda h: torch.mm(h.mT, S_RECT.t()), (4, 2)),
    "vector @ S": (lambda h: h @ S_RECT.t(), (4,)),
    "stack @ S": (lambda h: h @ S_RECT.t(), (3, 2, 4)),
    "h @ csr": (lambda h: h.mT @ S_CSR, (4, 2)),
    "torch.sparse.mm(h, S)": (lambda h: torch.sparse.mm(h.mT, S_RECT.t()), (4, 2)),
    "torch.sparse.addmm": (lambda h: torch.sparse.addmm(rnd(5, 2, seed=7), S_RECT, h), (4, 2)),
    "torch.sparse.addmm beta alpha": (lambda h: torch.sparse.addmm(rnd(5, 2, seed=7), S_RECT, h, beta=0.5, alpha=2.0),
                                      (4, 2)),
    "torch.addmm plate input": (lambda h: torch.addmm(h[:1] * 2, S_RECT, h), (4, 2)),
    "torch.addmm beta 0": (lambda h: torch.addmm(rnd(5, 2, seed=8), S_RECT, h, beta=0.0, alpha=3.0), (4, 2)),
    "Tensor.addmm": (lambda h: rnd(5, 2, seed=8).addmm(S_RECT, h), (4, 2)),
}


def _loop_grad(fn, raw, plates):
    """The gradient of sum(fn(entry)^2) over the plate entries, entry by entry."""
    x = raw.clone().requires_grad_(True)
    total = 0
    for i in range(plates[0][1]):
        for j in range(plates[1][1]):
            total = total + fn(x[i, j]).pow(2).sum()
    (g,) = torch.autograd.grad(total, x)
    return g


@pytest.mark.parametrize("name", sorted(PRODUCTS))
def test_a_plain_sparse_matrix_times_a_plate_tensor_equals_a_loop(name):
    fn, shape = PRODUCTS[name]
    h = make(rnd(3, 2, *shape), *ZD)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "performance drop" of vmap's fallback over sparse products
        check(fn, h)
        out, seen = calls(lambda: fn(h))
    # one sparse product, no vmap loop (torch.matmul takes some dense @ S itself, the plates as its batch dims)
    assert "vmap_call" not in seen and ("sparse_matmul" in seen or name in ("stack @ S", "vector @ S")), sorted(seen)
    # gradients to the dense operand equal those of the loop (sparse mm's backward)
    x = h.tensor.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(fn(PlateTensor(x, h.plates)).tensor.pow(2).sum(), x)
    torch.testing.assert_close(g, _loop_grad(fn, h.tensor, ZD))


def test_plain_sparse_products_run_with_the_invariant_checks_on():
    # the refusal of aten.is_pinned under torch's sparse invariant checks (a sparse_coo_tensor of sampled values) does
    # not reach the products that work: a plain S (validated as it is built) times plate tensors
    h = make(rnd(3, 2, 4, 2), *ZD)
    with torch.sparse.check_sparse_tensor_invariants():
        s = torch.sparse_coo_tensor(S_RECT.indices(), S_RECT.values(), S_RECT.shape)
        for fn in (lambda h: s @ h, lambda h: torch.sparse.mm(s, h), lambda h: torch.addmm(h[:1] * 2, s, h)):
            check(fn, h)


def test_a_shared_plate_dim_and_a_learned_sparse_matrix():
    """h shared along one plate (raw size 1) keeps it shared; the sparse matrix's own gradient (torch.sparse.mm's
    backward to S, sparse) is the loop's."""
    h = make(rnd(3, 1, 4, 2), *ZD)
    check(lambda a: S @ a, h)
    assert (S @ h).tensor.shape == (3, 1, 4, 2)
    w = S.coalesce()
    vals = w.values().clone().requires_grad_(True)
    sw = torch.sparse_coo_tensor(w.indices(), vals, w.shape)
    (gv,) = torch.autograd.grad(torch.sparse.mm(sw, h).tensor.pow(2).sum(), vals)
    vl = w.values().clone().requires_grad_(True)
    sl = torch.sparse_coo_tensor(w.indices(), vl, w.shape)
    (ge,) = torch.autograd.grad(sum(torch.sparse.mm(sl, h.tensor[i, 0]).pow(2).sum() for i in range(3)), vl)
    torch.testing.assert_close(gv, ge)


def test_a_gcn_layer_on_a_fixed_graph_with_sampled_features():
    """The porting case: node features masked by a sampled Bernoulli, propagated by a fixed sparse graph; the
    score estimate of the gradient is unbiased (z-test against the exact gradient by enumeration)."""
    torch.manual_seed(0)
    x = rnd(4, 2, seed=3)
    w = rnd(2, seed=4)
    target = rnd(4, seed=6)

    def cost(h):
        return ((S @ (h.unsqueeze(-1) * x)) @ w - target).pow(2).sum(-1)

    logits = torch.tensor([0.3, -0.5, 0.8, 0.1], dtype=D, requires_grad=True)
    # exact: enumerate the 16 masks
    masks = torch.cartesian_prod(*[torch.tensor([0.0, 1.0], dtype=D)] * 4)
    exact = (Bernoulli(logits=logits).log_prob(masks).sum(-1).exp() * torch.stack([cost(m) for m in masks])).sum()
    (g_exact,) = torch.autograd.grad(exact, logits)
    est = []
    for _ in range(300):
        with storch.Graph():
            h = _Plain(plate="z", n_samples=4)(Bernoulli(logits=logits))
            storch.add_cost(cost(h), name="c")
            (g,) = torch.autograd.grad(storch.surrogate_loss(), logits)
        est.append(g)
    est = torch.stack(est)
    z = (est.mean(0) - g_exact) / (est.std(0) / len(est) ** 0.5)
    assert z.abs().max() < 4, z


@pytest.mark.parametrize("fn", [
    lambda h: h.to_sparse(), lambda h: h.to_sparse_csr(), lambda h: h.to_sparse(layout=torch.sparse_csc),
    lambda h: torch.hspmm(S, h), lambda h: torch.sparse.sum(S * (h.mT @ h), dim=1),
    lambda h: torch.smm(S, h),
    lambda h: torch.sparse.softmax(S * (h.mT @ h), 1), lambda h: torch.sparse.log_softmax(S * (h.mT @ h), 1),
], ids=["to_sparse", "to_sparse_csr", "to_sparse_csc", "hspmm", "sparse.sum", "smm", "sparse.softmax",
        "sparse.log_softmax"])
def test_sparse_tensors_that_vary_per_sample_are_refused(fn):
    h = make(rnd(3, 2, 4, 4), *ZD)
    with pytest.raises(storch.PlateError, match="sparse tensor.*build the dense tensor instead"):
        fn(h)


def test_torch_errors_with_a_sparse_operand_say_what_works():
    """``(S * h) @ h``: the elementwise product of a plain sparse S and a plate tensor holds its samples in a sparse
    tensor, which torch's products cannot batch: its error comes with the advice."""
    h = make(rnd(3, 2, 4, 4), *ZD)
    with pytest.raises(storch.PlateError, match="expand is unsupported.*build the dense tensor instead"):
        (S * h) @ h


@pytest.mark.parametrize("fn,what", [
    (lambda h: S @ h, "takes a matrix or a vector"),       # a per-sample stack: torch's sparse mm takes no batch
    (lambda h: torch.mm(S, h[0, 0]), "takes a matrix"),     # a per-sample vector to mm
    (lambda h: torch.sparse.mm(S, h[0, 0]), "takes a matrix"),
    (lambda h: torch.stack([S, S]) @ h, "3-d sparse tensor"),
])
def test_sparse_products_torch_does_not_make_per_sample_are_refused_clearly(fn, what):
    h = make(rnd(3, 2, 2, 4, 4), *ZD)
    with pytest.raises(storch.PlateError, match=what):
        fn(h)


@pytest.mark.parametrize("checks", ["", "check_invariants=True", "check_sparse_tensor_invariants()"])
@pytest.mark.parametrize("sampled", ["indices", "values"])
def test_a_sparse_constructor_of_sampled_indices_or_values_says_what_to_build_instead(sampled, checks):
    # torch.sparse_coo_tensor does not ask __torch_function__: its aten operator reached storch's dispatch guard, whose
    # message spoke of custom operators and torch.func transforms; it now says what is unsupported and what to
    # write, and the advised dense index_put equals each sample's sparse tensor made densely. With torch's invariant
    # checks on, its validator's aten.is_pinned is the first operator storch sees (it got the generic message): it
    # gets the same advice
    edges = torch.tensor([[0, 1, 2, 2], [1, 2, 0, 0]])
    with storch.Graph():
        b = storch.estimator("expect", plate="b")(Bernoulli(logits=torch.zeros(4, dtype=D)))
        k = storch.estimator("expect", plate="k")(torch.distributions.Categorical(logits=torch.zeros(3)))
        idx = torch.stack((edges[0], torch.where(torch.arange(4) == 3, k, edges[1])))
        values = b if sampled == "values" else torch.ones(4, dtype=D)
        index = idx if sampled == "indices" else edges
        options = {"check_invariants": True} if checks == "check_invariants=True" else {}
        with pytest.raises(storch.PlateError, match=r"(?s)torch\.sparse_coo_tensor.*sampled indices or values.*"
                                                    r"unsupported.*index_put\(tuple\(indices\), values, accumulate=True\)"):
            with torch.sparse.check_sparse_tensor_invariants(enable=checks == "check_sparse_tensor_invariants()"):
                torch.sparse_coo_tensor(index, values, (3, 3), **options)
        dense = torch.zeros(3, 3, dtype=D).index_put(tuple(index), values, accumulate=True)  # the advice
        names = [p.name for p in dense.plates]
        for entry in range(dense.tensor.shape[0]):
            ix = index.tensor[entry] if isinstance(index, PlateTensor) else index
            vx = values.tensor[entry] if isinstance(values, PlateTensor) else values
            want = torch.sparse_coo_tensor(ix, vx, (3, 3)).to_dense()
            assert names == ["b" if sampled == "values" else "k"]
            assert torch.equal(dense.tensor[entry], want)
