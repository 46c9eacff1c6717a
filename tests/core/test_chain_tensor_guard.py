"""A chain of nodes whose values are computed on every earlier node's samples: the entries multiply along the
chain, and so does each per-sample value computed on them (a recurrent state of H values), not only the samples.
The chain guards counted the samples (their entries and values), so a world model with one 'go' estimator per
step under a GRU (3 entries per node, a state of 400 values per sample) was killed by the OS at step 13, far below
them. A value of sample plates spread over another node's samples is now refused, before the tensor is made, past
1/32 of its device's memory (on CPU the lower of the physical memory and a container's cgroup limit; read once
per device; the tests fake both, never this machine's) or past
``MAX_CHAIN_TENSOR_BYTES`` where the user set it (the tests lower it); a single node (no chain) and a spread over
data plates are never refused."""

from __future__ import annotations

import pytest
import torch
from torch.distributions import Normal

import storch
import storch.plates.tensor as plate_tensor
from path_probes import Allocations

DATA, H, N = 4, 32, 3


@pytest.fixture(autouse=True)
def _clean_graph():
    yield
    storch.reset()


def _chain(steps, w, done):
    """h_t = tanh(h_{t-1} w + z_t), z_t ~ Normal(mean of h_{t-1}, 1): one estimator of N samples per step;
    ``done`` collects the steps that ran."""
    h = storch.denote_independent(torch.linspace(-1, 1, DATA * H, dtype=torch.float64).reshape(DATA, H), 0, "data")
    for t in range(steps):
        z = storch.estimator("reparameterization", plate=f"z{t}", n_samples=N)(Normal(h.mean(-1), 1.0))
        h = torch.tanh(h * w + z.unsqueeze(-1))  # h_{t-1} (plates z0..z{t-1}) spread over z_t's samples
        storch.add_cost((h ** 2).sum(), name=f"c{t}")
        done.append(t)
    return h


def test_a_chain_whose_state_would_pass_the_bound_is_refused_before_the_tensor_is_made(monkeypatch):
    # step t makes N^(t+1) x DATA entries x H float64 values: step 3 13 KiB x 8 = 81 KiB, step 4 243 KiB
    monkeypatch.setattr(plate_tensor, "MAX_CHAIN_TENSOR_BYTES", 2 ** 17, raising=False)
    w = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    done: list = []
    probe = Allocations()
    with storch.Graph(), pytest.raises(storch.PlateError) as info, probe:
        _chain(8, w, done)
    assert done == [0, 1, 2, 3]  # refused at step 4: the first past 2^17 bytes (the samples stay tiny)
    msg = str(info.value)
    assert ("spread a value of 32 elements per sample, which varies over the samples of 4 earlier node(s), over "
            "the samples of plates z4=3: the tensor computed would hold 972 entries (sample plates z4=3, z3=3, z2=3, "
            "z1=3, z0=3; data plates data=4) x 32 elements") in msg
    for fix in ("create ONE estimator outside the loop", "supports partitions", "partition_estimators",
                "n_samples=1", "fewer chained steps"):
        assert fix in msg
    # before the allocation: no tensor of the refused size (972 x 32 elements) was made
    assert probe.largest < N ** 5 * DATA * H


def test_a_chain_under_the_bound_a_single_node_and_a_data_spread_still_run(monkeypatch):
    monkeypatch.setattr(plate_tensor, "MAX_CHAIN_TENSOR_BYTES", 2 ** 17, raising=False)
    w = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    with storch.Graph():  # 4 steps: at most 81 KiB per tensor
        _chain(4, w, [])
        storch.backward()
    assert w.grad is not None and torch.isfinite(w.grad)
    # one node of many samples and a large per-sample value (8 MiB, far past the bound): the user's batch, no chain
    mu = torch.zeros((), dtype=torch.float64, requires_grad=True)
    with storch.Graph():
        big = storch.denote_independent(torch.ones(DATA, 64, dtype=torch.float64), 0, "data")
        z = storch.estimator("reparameterization", plate="z", n_samples=4096)(Normal(mu, 1.0))
        v = z * big  # big (data) spread over z's samples: 4096 x 4 x 64 values
        assert v.tensor.numel() * 8 == 2 ** 23
        assert plate_tensor._plan(big._plates, v._plates)[3] == 0  # the path: a data value spread: never checked
        assert plate_tensor._plan(z._plates, v._plates)[3] == 0  # nothing spread over a sample plate
        storch.add_cost(v.sum())
        storch.backward()
    # E[sum z * 1] = 64 mu per data point: its derivative is 64, exactly (pathwise, linear in z)
    torch.testing.assert_close(mu.grad, torch.tensor(64.0, dtype=torch.float64))


def _fake_memory(monkeypatch, total):
    """The device's memory read as ``total`` bytes (never this machine's), from an empty per-device cache; returns
    the list of devices read."""
    reads: list = []

    def memory(device):
        reads.append((device.type, device.index))
        return total, "memory"

    monkeypatch.setattr(plate_tensor, "MAX_CHAIN_TENSOR_BYTES", None, raising=False)
    monkeypatch.setattr(plate_tensor, "_DEVICE_CHAIN_BOUNDS", {}, raising=False)
    monkeypatch.setattr(plate_tensor, "_device_memory", memory, raising=False)
    return reads


def test_the_bound_is_the_devices_memory_over_32_read_once_per_device(monkeypatch):
    # a device of 4 MiB: 128 KiB per chain tensor, refused at step 4 as above (a fixed 2^28 would admit it)
    reads = _fake_memory(monkeypatch, 2 ** 22)
    asked: list = []
    bound = plate_tensor.chain_tensor_bound
    monkeypatch.setattr(plate_tensor, "chain_tensor_bound", lambda device: asked.append(device) or bound(device),
                        raising=False)
    w = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    done: list = []
    with storch.Graph(), pytest.raises(storch.PlateError) as info:
        _chain(8, w, done)
    assert done == [0, 1, 2, 3]
    assert ("(243.0 KiB of torch.float64), above storch's limit of 128.0 KiB for one tensor of a chain on cpu "
            "(1/32 of its 4.0 MiB;") in str(info.value)
    assert "set storch.plates.tensor.MAX_CHAIN_TENSOR_BYTES to a larger number of bytes" in str(info.value)
    # steps 1-4 checked their spread state against the bound; the memory was read once, then the cache answered
    assert len(asked) >= 4 and reads == [("cpu", None)]
    assert plate_tensor._DEVICE_CHAIN_BOUNDS[("cpu", None)][0] == 2 ** 17
    # a device of 128 MiB (bound 4 MiB): the same chain runs past step 4
    reads = _fake_memory(monkeypatch, 2 ** 27)
    with storch.Graph():
        _chain(6, w, [])  # step 5: 3^6 x 4 x 32 float64 = 729 KiB
        storch.backward()
    assert reads == [("cpu", None)] and w.grad is not None and torch.isfinite(w.grad)


def test_the_module_attribute_overrides_the_device_bound(monkeypatch):
    w = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    reads = _fake_memory(monkeypatch, 2 ** 40)  # 32 GiB per tensor: the override alone refuses
    monkeypatch.setattr(plate_tensor, "MAX_CHAIN_TENSOR_BYTES", 2 ** 17)
    done: list = []
    with storch.Graph(), pytest.raises(storch.PlateError) as info:
        _chain(8, w, done)
    assert done == [0, 1, 2, 3] and reads == []  # never read: the user's bound wins
    assert ("above storch's limit of 128.0 KiB for one tensor of a chain on cpu (set by "
            "storch.plates.tensor.MAX_CHAIN_TENSOR_BYTES;") in str(info.value)
    _fake_memory(monkeypatch, 2 ** 10)  # 32 bytes per tensor: the override alone admits the chain
    monkeypatch.setattr(plate_tensor, "MAX_CHAIN_TENSOR_BYTES", 2 ** 30)
    with storch.Graph():
        _chain(5, w, [])
        storch.backward()
    assert w.grad is not None and torch.isfinite(w.grad)


def _fake_machine(monkeypatch, tmp_path, physical, v2=None, v1=None):
    """This machine's memory read as ``physical`` bytes (None: no sysconf) and its cgroup files as ``v2``, ``v1``
    (None: no such file), never this machine's; an empty per-device cache."""
    def sysconf(name):
        if physical is None:
            raise ValueError(f"unrecognized configuration name {name}")
        return {"SC_PHYS_PAGES": physical // 4096, "SC_PAGE_SIZE": 4096}[name]
    monkeypatch.setattr(plate_tensor.os, "sysconf", sysconf)
    tmp_path.mkdir(parents=True, exist_ok=True)
    for attribute, text in (("CGROUP_V2_MEMORY_MAX", v2), ("CGROUP_V1_MEMORY_LIMIT", v1)):
        path = tmp_path / attribute
        if text is not None:
            path.write_text(text + "\n")
        monkeypatch.setattr(plate_tensor, attribute, str(path))
    monkeypatch.setattr(plate_tensor, "MAX_CHAIN_TENSOR_BYTES", None)
    monkeypatch.setattr(plate_tensor, "_DEVICE_CHAIN_BOUNDS", {})


def test_the_memory_read_for_cpu_and_a_fixed_bound_where_it_cannot_be_read(monkeypatch, tmp_path):
    _fake_machine(monkeypatch, tmp_path, 12 * 2 ** 30)  # no cgroup file: the physical memory
    assert plate_tensor._device_memory(torch.device("cpu")) == (12 * 2 ** 30, "memory")
    assert plate_tensor.chain_tensor_bound(torch.device("cpu")) == 12 * 2 ** 30 // 32
    _fake_machine(monkeypatch, tmp_path / "none", None)
    assert plate_tensor._device_memory(torch.device("cpu")) is None
    assert plate_tensor.chain_tensor_bound(torch.device("cpu")) == 2 ** 28
    assert plate_tensor._device_memory(torch.device("meta")) is None  # another device: the fixed bound
    assert plate_tensor.chain_tensor_bound(torch.device("meta")) == 2 ** 28


GiB = 2 ** 30
HOST = 256 * GiB  # a host's physical memory, where os.sysconf reads it even inside a container


@pytest.mark.parametrize("v2, v1, memory", [
    (str(8 * GiB), None, (8 * GiB, "cgroup limit")),  # cgroup v2, capped at 8 GiB
    ("max", str(4 * GiB), (HOST, "memory")),  # v2 without a limit (v1's file is not asked where v2's is there)
    (str(2 ** 62), None, (HOST, "memory")),  # v2: a huge number is no limit
    (None, str(8 * GiB), (8 * GiB, "cgroup limit")),  # cgroup v1, capped at 8 GiB
    (None, str(2 ** 63 - 4096), (HOST, "memory")),  # v1 without a limit: near 2^63
    (str(512 * GiB), None, (HOST, "memory")),  # a limit above the physical memory: the physical memory
    (None, None, (HOST, "memory")),  # neither file: no cgroup
    ("garbage", None, (HOST, "memory")),  # a file storch does not understand: no limit
])
def test_cpu_memory_is_the_lower_of_the_physical_memory_and_the_cgroup_limit(monkeypatch, tmp_path, v2, v1, memory):
    _fake_machine(monkeypatch, tmp_path, HOST, v2=v2, v1=v1)
    assert plate_tensor._device_memory(torch.device("cpu")) == memory
    assert plate_tensor.chain_tensor_bound(torch.device("cpu")) == memory[0] // 32


def test_an_unreadable_cgroup_file_is_no_limit(monkeypatch, tmp_path):
    _fake_machine(monkeypatch, tmp_path, HOST, v1=str(8 * GiB))
    monkeypatch.setattr(plate_tensor, "CGROUP_V2_MEMORY_MAX", str(tmp_path))  # a directory: open() raises
    assert plate_tensor._device_memory(torch.device("cpu")) == (8 * GiB, "cgroup limit")  # then v1's file
    (tmp_path / "binary").write_bytes(b"\xff\xfe")
    monkeypatch.setattr(plate_tensor, "CGROUP_V2_MEMORY_MAX", str(tmp_path / "binary"))
    monkeypatch.setattr(plate_tensor, "CGROUP_V1_MEMORY_LIMIT", str(tmp_path))
    assert plate_tensor._device_memory(torch.device("cpu")) == (HOST, "memory")
    _fake_machine(monkeypatch, tmp_path / "nosysconf", None, v2=str(8 * GiB))  # no sysconf: the cgroup limit alone
    assert plate_tensor._device_memory(torch.device("cpu")) == (8 * GiB, "cgroup limit")


def test_a_cgroup_limit_bounds_the_chain_read_once_and_the_message_names_it(monkeypatch, tmp_path):
    # a container capped at 4 MiB on a 256 GiB host: 128 KiB per chain tensor, refused at step 4 (from the host's
    # memory the bound would be 8 GiB: the chain would run until the container is killed)
    _fake_machine(monkeypatch, tmp_path, HOST, v2=str(2 ** 22))
    opened: list = []
    read = plate_tensor._read_limit
    monkeypatch.setattr(plate_tensor, "_read_limit", lambda path: opened.append(path) or read(path))
    w = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    done: list = []
    with storch.Graph(), pytest.raises(storch.PlateError) as info:
        _chain(8, w, done)
    assert done == [0, 1, 2, 3]
    assert ("above storch's limit of 128.0 KiB for one tensor of a chain on cpu (1/32 of its cgroup limit of "
            "4.0 MiB;") in str(info.value)
    assert opened == [plate_tensor.CGROUP_V2_MEMORY_MAX]  # read once (the cache), v2's file only
