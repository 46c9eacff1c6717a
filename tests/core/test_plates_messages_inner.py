"""torch.inner per sample, and errors that write out the one-sample alternative (issue 20)."""

import pytest
import torch

import storch
from storch import Plate, PlateTensor

P = Plate("s", 3)


@pytest.mark.parametrize("sa,sb", [((), (5,)), ((), (5, 5)), ((5,), ()), ((5,), (5,)), ((2, 5), (4, 5)),
                                   ((2, 3, 5), (5,)), ((5,), (4, 2, 5))])
@pytest.mark.parametrize("which", ["a", "b", "both"])
def test_inner_matches_torch_per_sample(sa, sb, which):
    """A 0-dim operand multiplies ((5, 5) per sample where torch gives (5, 5)); otherwise the
    shapes are A[:-1] + B[:-1]."""
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn((3,) + sa, generator=gen), torch.randn((3,) + sb, generator=gen)
    x = PlateTensor(a, (P,)) if which != "b" else a[0]
    y = PlateTensor(b, (P,)) if which != "a" else b[0]
    out = torch.inner(x, y)
    for i in range(3):
        ref = torch.inner(a[i] if which != "b" else a[0], b[i] if which != "a" else b[0])
        assert out.tensor[i].shape == ref.shape
        torch.testing.assert_close(out.tensor[i], ref)


def test_if_on_a_sampled_value_suggests_masks_first():
    tok = PlateTensor(torch.tensor([0, 2, 1]), (P,))
    with pytest.raises(storch.PlateError) as info:
        if tok == 2:
            pass
    msg = str(info.value)
    assert "done = done | (tok == EOS)" in msg and "torch.where(done, EOS, tok)" in msg and "eos=" in msg
    assert msg.index("torch.where") < msg.index(".tensor")  # masks before the raw values


def test_assignment_into_a_plain_tensor_writes_the_alternative_out():
    a = PlateTensor(torch.tensor([0, 2, 1]), (P,))
    visited = torch.zeros(3, dtype=torch.bool)
    with pytest.raises(storch.PlateError) as info:
        visited[a] = True
    msg = str(info.value)
    assert "visited = visited | F.one_hot(a, n).bool()" in msg
    assert "visited.scatter(0, a.unsqueeze(0), True)" in msg
    # both alternatives work, per sample
    import torch.nn.functional as F
    v1 = visited | F.one_hot(a, 3).bool()
    v2 = visited.scatter(0, a.unsqueeze(0), True)
    assert torch.equal(v1.tensor, torch.eye(3, dtype=torch.bool)[[0, 2, 1]]) and torch.equal(v2.tensor, v1.tensor)


def test_assignment_that_would_add_plates_in_place_is_refused_with_the_alternative():
    d = Plate("data", 2, True)
    visited = PlateTensor(torch.zeros(2, 3, dtype=torch.bool), (d,))
    a = PlateTensor(torch.tensor([[0, 2, 1], [1, 1, 0]]), (d, P))
    with pytest.raises(storch.PlateError, match=r"does not vary.*torch\.where\(F\.one_hot\(a, n\)\.bool\(\), value, x\)"):
        visited[a] = True


@pytest.mark.parametrize("route", ["np.from_dlpack", "torch.from_dlpack", "__dlpack__", "data_ptr",
                                   "untyped_storage", "storage"])
def test_memory_reads_of_a_plate_tensor_point_to_the_raw_tensor(route):
    """A plate tensor's memory read by a black-box cost: np.from_dlpack gave torch's "Cannot access data pointer"
    (a vmap failure) with no hint; now every route is the PlateError that `.numpy()` gives, naming `.tensor`."""
    import numpy as np

    z = PlateTensor(torch.tensor([0, 2, 1]), (P,))
    read = {"np.from_dlpack": lambda: np.from_dlpack(z), "torch.from_dlpack": lambda: torch.from_dlpack(z),
            "__dlpack__": lambda: z.__dlpack__(), "data_ptr": lambda: z.data_ptr(),
            "untyped_storage": lambda: z.untyped_storage(), "storage": lambda: z.storage()}[route]
    with pytest.raises(storch.PlateError, match=r"use `\.tensor") as info:
        read()
    assert "Cannot access data pointer" not in str(info.value)
    assert np.from_dlpack(z.tensor).tolist() == [0, 2, 1]  # the raw tensor, as the message says
