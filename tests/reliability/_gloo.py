"""The multi-process harness of the DDP tests (test_ddp*.py), one copy for all of them.

A test module's fixture runs its worker in ``world`` gloo processes on this machine (:func:`spawn`) and reads back
what each rank recorded. A worker runs inside :func:`rank_process`, which makes the rank's process group, saves the
rank's record when the worker's block ends and tears the group down so that no rank exits while another is still in a
collective. :func:`outcome` records a case's result or its error, so that one case that raises (or hangs until the
group's timeout turns the hang into an error) does not stop the cases after it. A test module takes its setup from
here: ``pytestmark = _gloo.needs_distributed`` and ``ranks = _gloo.ranks_fixture(worker, WORLD, "name")``."""

from __future__ import annotations

import contextlib
import datetime
import gc
import os
import socket
from typing import Callable, Iterator, Optional

import pytest
import torch
import torch.distributed
import torch.multiprocessing as mp

# every DDP test module's mark: its workers need torch.distributed (gloo)
needs_distributed = pytest.mark.skipif(not torch.distributed.is_available(),
                                       reason="torch.distributed is not built in")


def free_port() -> int:
    """A free TCP port on 127.0.0.1 for a process group's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(worker: Callable[[int, int, int, str], None], world: int, outdir) -> list[dict]:
    """Run ``worker(rank, world, port, outdir)`` in ``world`` processes; every rank's record, by rank."""
    torch.set_num_threads(1)
    mp.spawn(worker, args=(world, free_port(), str(outdir)), nprocs=world, join=True)
    return [torch.load(os.path.join(outdir, f"rank{r}.pt"), weights_only=False) for r in range(world)]


def ranks_fixture(worker: Callable[[int, int, int, str], None], world: int, name: str, needs: tuple = ()):
    """The module's ``ranks`` fixture: every rank's record of ``worker`` run once in ``world`` processes
    (:func:`spawn`, in a temporary folder named after ``name``), shared by the module's tests; skipped where an
    estimator of ``needs`` is not installed."""

    @pytest.fixture(scope="module", name="ranks")
    def ranks(tmp_path_factory) -> list[dict]:
        import storch

        missing = [n for n in needs if n not in storch.available_estimators()]
        if missing:
            pytest.skip(f"needs the estimators {', '.join(needs)} ({', '.join(missing)} not installed)")
        return spawn(worker, world, tmp_path_factory.mktemp(name))

    return ranks


@contextlib.contextmanager
def rank_process(rank: int, world: int, port: int, outdir: str, timeout: Optional[float] = None) -> Iterator[dict]:
    """This process as rank ``rank`` of a gloo group of ``world`` (one intra-op thread; ``timeout`` seconds turn a
    case that hangs into an error, None: torch's default). Yields the rank's record, a dict the block fills, saved for
    :func:`spawn` when the block ends without an error.

    What is left of the block's models (DDP's reducers, held in reference cycles) is collected before the group is
    destroyed, and no rank destroys it while another is still in a collective: otherwise gloo may abort a process at
    exit ("terminate called without an active exception")."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    options = {} if timeout is None else {"timeout": datetime.timedelta(seconds=timeout)}
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, **options)
    try:
        out: dict = {}
        yield out
        torch.save(out, os.path.join(outdir, f"rank{rank}.pt"))
        gc.collect()
        dist.barrier()
    finally:
        gc.collect()
        dist.destroy_process_group()


def outcome(fn: Callable[[], object]) -> tuple:
    """``("ok", fn())``, or the type name and message of what ``fn`` raised (the test asserts them)."""
    try:
        return ("ok", fn())
    except Exception as e:  # (recorded: the test asserts its type and message)
        return (type(e).__name__, str(e))
