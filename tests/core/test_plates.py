"""Property tests: one-sample code on plate tensors gives, per sample, what it gives on that sample alone."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch.distributions import Bernoulli, Categorical, Normal, OneHotCategorical, kl_divergence

import storch
from storch import Plate, PlateTensor



# float64 by default in this module's tests only (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("float64_default")


def make(raw, *plates):
    return PlateTensor(raw, [Plate(n, s) for n, s in plates])


def select(x, assignment):
    if not isinstance(x, PlateTensor):
        return x
    idx = tuple(0 if x.tensor.shape[i] == 1 else assignment[p.name] for i, p in enumerate(x.plates))
    return x.tensor[idx]


def check(fn, *inputs):
    out = fn(*inputs)
    outs = out if isinstance(out, (tuple, list)) else (out,)
    for o in outs:
        assert isinstance(o, PlateTensor), f"expected a PlateTensor, got {type(o)}"
    plates = outs[0].plates
    names = {p.name for x in inputs if isinstance(x, PlateTensor) for p in x.plates}
    assert {p.name for p in plates} == names
    for idx in itertools.product(*[range(p.size) for p in plates]):
        assignment = dict(zip((p.name for p in plates), idx))
        expected = fn(*[select(x, assignment) for x in inputs])
        exp = expected if isinstance(expected, (tuple, list)) else (expected,)
        for o, e in zip(outs, exp):
            got = o.tensor.expand(*[p.size for p in o.plates], *o.tensor.shape[len(o.plates):])[
                tuple(assignment[p.name] for p in o.plates)]
            assert got.shape == e.shape, (got.shape, e.shape)
            torch.testing.assert_close(got, e, rtol=1e-9, atol=1e-9, equal_nan=True)


layouts = st.sampled_from(["same", "sub", "swapped", "plain"])
sizes = st.integers(1, 3)
seeds = st.integers(0, 2 ** 16)


def inputs(layout, s1, s2, seed, shape_x=(2, 3), shape_y=(2, 3)):
    g = torch.Generator().manual_seed(seed)
    x = make(torch.randn((s1, s2) + shape_x, generator=g), ("a", s1), ("b", s2))
    ry = torch.randn
    if layout == "same":
        y = make(ry((s1, s2) + shape_y, generator=g), ("a", s1), ("b", s2))
    elif layout == "sub":
        y = make(ry((s2,) + shape_y, generator=g), ("b", s2))
    elif layout == "swapped":
        y = make(ry((s2, s1) + shape_y, generator=g), ("b", s2), ("a", s1))
    else:
        y = ry(shape_y, generator=g)
    return x, y


W = torch.randn(3, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
LIN = torch.nn.Linear(3, 5).double()

BINARY = {
    "arith": lambda x, y: x * y + 2 - x / (y.abs() + 1) ** 2,
    "compare_where": lambda x, y: torch.where(x > y, x, -y),
    "maximum": lambda x, y: torch.maximum(x, y).clamp(min=-0.5),
    "cat_last": lambda x, y: torch.cat([x, y], -1),
    "cat_first": lambda x, y: torch.cat([x, y], 0),
    "stack": lambda x, y: torch.stack([x, y], 1),
    "bce_logits_mean": lambda x, y: F.binary_cross_entropy_with_logits(x, torch.sigmoid(y)),
    "mse_sum": lambda x, y: F.mse_loss(x, y, reduction="sum"),
    "normal_log_prob": lambda x, y: Normal(x, y.abs() + 0.5).log_prob(y).sum(-1),
    "kl_categorical": lambda x, y: kl_divergence(Categorical(logits=x), Categorical(logits=y)),
    "onehot_log_prob": lambda x, y: OneHotCategorical(logits=x).log_prob(
        F.one_hot(y.argmax(-1), 3).to(x.dtype)),
    "bernoulli_log_prob": lambda x, y: Bernoulli(logits=x).log_prob((y > 0).to(x.dtype)),
    "matmul_T": lambda x, y: x @ y.T,
    "broadcast_tensors": lambda x, y: torch.broadcast_tensors(x, y),
}

UNARY = {
    "activations": lambda x: torch.sigmoid(x) + F.relu(x) * torch.tanh(x) - F.softplus(x) + F.elu(x),
    "softmax": lambda x: F.softmax(x, -1) + torch.log_softmax(x, dim=0),
    "sum_all": lambda x: x.sum(),
    "mean_dim0": lambda x: x.mean(0),
    "sum_keepdim": lambda x: x.sum(dim=1, keepdim=True),
    "logsumexp": lambda x: x.logsumexp(-1),
    "max_all": lambda x: x.max(),
    "max_dim": lambda x: x.max(dim=1).values + x.argmax(1),
    "std": lambda x: x.std() + x.var(0).sum(),
    "norm": lambda x: x.norm() + x.norm(dim=-1).sum(),
    "view": lambda x: x.view(-1) * 2,
    "reshape": lambda x: x.reshape(3, 2)[1],
    "flatten": lambda x: x.flatten() + 1,
    "index": lambda x: x[0] + x[..., 1:].sum() + x[:, 2].sum() + x[1, [0, 2]].sum() + x[None, 1, 0:2].sum(),
    "transpose": lambda x: x.T @ x + x.transpose(0, 1).mean() + x.permute(1, 0).sum(0)[0],
    "unsqueeze_squeeze": lambda x: x.unsqueeze(0).unsqueeze(-1).squeeze() * x.unsqueeze(1).squeeze(1),
    "expand": lambda x: x[0].expand(4, 3) + x[0:1].expand_as(x).sum(),
    "linear": lambda x: LIN(x),
    "matmul_plain": lambda x: (x @ W).sum(0)[:3] + (x[0] @ W) @ W.T + (W.T @ x[1])[:3],
    "vector_dot": lambda x: x[0] @ x[1],
    "split_chunk": lambda x: x.split(1, dim=0)[1] + torch.chunk(x, 3, dim=1)[2].sum(),
    "unbind": lambda x: torch.stack(x.unbind(1), 0),
    "cross_entropy": lambda x: F.cross_entropy(x, torch.tensor([2, 0])),
    "cross_entropy_unbatched": lambda x: F.cross_entropy(x[0], torch.tensor(1)),
    "nll_sum": lambda x: F.nll_loss(F.log_softmax(x, -1), torch.tensor([1, 2]), reduction="sum"),
    "normal_entropy": lambda x: Normal(x, 1.0).entropy().sum(),
    "one_hot_embedding": lambda x: F.embedding(x.argmax(-1), W).sum(-1) + F.one_hot(x.argmax(-1), 3).sum(-1),
    "gather": lambda x: x.gather(1, torch.tensor([[0], [2]])),
    "topk_sort": lambda x: x.topk(2, dim=-1).values + x.sort(dim=0).values[:, :2],
    "cumsum": lambda x: x.cumsum(1) + x.cumsum(dim=-2),
    "inplace": lambda x: _inplace(x),
    "setitem_mask": lambda x: _mask_set(x),
}


def _inplace(x):
    y = x.clone()
    y += 1.5
    y.mul_(2)
    y[0] = y[1] * 3
    return y


def _mask_set(x):
    y = x.clone()
    y[(x > 0)] = 0.0
    return y


@settings(max_examples=25, deadline=None, derandomize=True)
@given(layout=layouts, s1=sizes, s2=sizes, seed=seeds)
@pytest.mark.parametrize("name", sorted(BINARY))
def test_binary_ops_per_sample(name, layout, s1, s2, seed):
    x, y = inputs(layout, s1, s2, seed, (2, 3), (2, 3))
    check(BINARY[name], x, y)


@settings(max_examples=15, deadline=None, derandomize=True)
@given(s1=sizes, s2=sizes, seed=seeds)
@pytest.mark.parametrize("name", sorted(UNARY))
def test_unary_ops_per_sample(name, s1, s2, seed):
    x, _ = inputs("plain", s1, s2, seed)
    check(UNARY[name], x)


@settings(max_examples=20, deadline=None, derandomize=True)
@given(layout=layouts, s1=sizes, s2=sizes, seed=seeds)
def test_plain_operand_with_more_dims_broadcasts_per_sample(layout, s1, s2, seed):
    x, y = inputs(layout, s1, s2, seed, (3,), (2, 3) if layout == "plain" else (3,))
    check(lambda a, b: a + b * 2, x, y)
    check(lambda a, b: torch.cat([a.expand(2, 3), b.expand(2, 3)], 0), x, y)


@settings(max_examples=20, deadline=None, derandomize=True)
@given(s=sizes, seed=seeds)
def test_indexing_by_a_sampled_index(s, seed):
    g = torch.Generator().manual_seed(seed)
    z = make(torch.randint(0, 4, (s, 2), generator=g), ("z", s))
    table = torch.randn(4, 3, generator=g)
    check(lambda i: table[i], z)
    x = make(torch.randn(s, 4, 3, generator=g), ("z", s))
    check(lambda a, i: a[i], x, z)


def test_positive_dim_beyond_per_sample_rank_is_an_error():
    x = make(torch.randn(4, 3), ("z", 4))
    with pytest.raises(storch.PlateError, match="out of range"):
        x.sum(1)
    with pytest.raises(storch.PlateError, match="out of range"):
        torch.cat([x, x], dim=1)


def test_item_on_many_samples_is_an_error():
    x = make(torch.randn(4), ("z", 4))
    with pytest.raises(storch.PlateError, match="4 over plates"):
        x.item()
    with pytest.raises(storch.PlateError, match="may decide differently"):
        bool(x > 0)
    with pytest.raises(storch.PlateError, match="1 over plates"):  # also one entry: it would leave the plates
        make(torch.tensor([2.5]), ("z", 1)).item()


def test_inplace_write_of_values_from_other_plates_is_an_error():
    x = make(torch.randn(4, 3), ("z", 4))
    y = make(torch.randn(2, 3), ("w", 2))
    with pytest.raises(storch.PlateError, match="in-place"):
        x.add_(y)


def test_pointwise_broadcast_with_higher_rank_plain_tensor_is_per_sample():
    # zeta is pointwise by torch's own metadata: the plain (5, 3) operand broadcasts per sample
    x = make(torch.rand(4, 3) + 2, ("z", 4))
    check(lambda a, b: torch.special.zeta(a, b), x, torch.rand(5, 3) + 2)


def test_shape_and_metadata_are_per_sample():
    x = make(torch.randn(4, 2, 3), ("z", 4))
    assert x.shape == (2, 3) and x.dim() == 2 and x.size(-1) == 3 and len(x) == 2 and x.numel() == 6
    assert x.tensor.shape == (4, 2, 3) and x.plates == (Plate("z", 4),)


def test_distribution_validation_stays_on():
    x = make(torch.tensor([[0.5], [-1.0]]), ("z", 2))
    with pytest.raises(ValueError, match="scale"):
        Normal(torch.zeros(1), x, validate_args=True)


def test_lineage_reindexes_an_earlier_partition_step_and_refuses_other_graphs():
    from storch.plates.tensor import align, union_plates

    lin = storch.Lineage()
    z0 = storch.Plate("z", 3, False, 0, lin)
    z1 = storch.Plate("z", 3, False, 1, lin)
    lin.set_parents(1, torch.tensor([2, 2, 0]))  # entries of step 1 descend from step 0's 2, 2, 0
    h0 = torch.tensor([10.0, 11.0, 12.0])
    assert union_plates([(z0,), (z1,)]) == (z1,)
    assert align(h0, (z0,), (z1,)).tolist() == [12.0, 12.0, 10.0]
    with pytest.raises(storch.PlateError, match="earlier"):
        align(h0, (z1,), (z0,))
    other = storch.Plate("z", 3, False, 0, storch.Lineage())  # same name and size, other graph
    with pytest.raises(storch.PlateError, match="different graphs"):
        union_plates([(z0,), (other,)])


def test_independent_nodes_joined_beyond_the_combination_limit_are_refused_before_allocating():
    """25 independent nodes of 2 samples each summed into one value hold 2^25 combinations per data point (30
    asked torch for 4 GiB per element and ran out of memory without a storch message; found by a tester). The
    union of their plates is refused with what to do instead; 20 such nodes (2^20) still run."""
    mu = torch.zeros(25, requires_grad=True)
    with storch.Graph():
        total = 0
        with pytest.raises(storch.PlateError, match=r"combinations per data point.*Draw them as one node"):
            for i in range(25):
                total = total + storch.estimator("reparameterization", plate=f"g{i}", n_samples=2)(
                    Normal(mu[i], 1.0))
        assert i == 24  # the 25th node's sum is the one refused
    with storch.Graph():
        total = 0
        for i in range(20):
            total = total + storch.estimator("reparameterization", plate=f"g{i}", n_samples=2)(Normal(mu[i], 1.0))
        assert total.tensor.numel() == 2 ** 20
