"""Two threads tracing their own storch.compile steps at once: torch's tracing state (make_fx's proxy mode, the
pre-dispatch mode stack) is process-wide, so storch.compile traces one step at a time (a lock around the trace,
not the replays). Before, the second trace failed inside torch ("ProxyTorchDispatchMode slot already occupied",
"Trying to pop empty mode stack")."""

import threading

import pytest
import torch
from torch.distributions import Normal

import storch
from step_checks import distribution_validation_kept  # noqa: F401 (an autouse fixture)


@pytest.mark.parametrize("backend", [None, "aot_eager"])
def test_two_threads_trace_at_once(backend):
    start = threading.Barrier(2)
    inside = [threading.Event(), threading.Event()]
    results: list = [None, None]
    errors: list = []

    def make(i):
        torch.manual_seed(i)
        enc = torch.nn.Linear(3, 2)
        est = storch.estimator("reparameterization", plate="h", n_samples=4)
        first = [True]

        def step(x):
            with storch.Graph():
                if first[0]:  # the first run of the trace: the traces of both threads overlap unless serialised
                    first[0] = False
                    inside[i].set()
                    inside[1 - i].wait(timeout=2.0)
                x = storch.denote_independent(x, 0, "data")
                h = est(Normal(enc(x), 1.0))
                storch.add_cost((h ** 2 * torch.tensor([1.0, 2.0])).sum(-1), name="c")
                return storch.surrogate_loss()

        return enc, step

    def worker(i):
        try:
            enc, step = make(i)
            compiled = storch.compile(step, backend=backend)
            x = torch.randn(5, 3)
            start.wait(timeout=30)
            losses = []
            for _ in range(5):
                loss = compiled(x)
                loss.backward()
                losses.append(loss.detach())
            assert enc.weight.grad is not None
            results[i] = (compiled.traces, torch.stack(losses), enc.weight.grad.clone())
        except Exception as e:  # (reported by the main thread)
            errors.append((i, type(e).__name__, str(e)))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for traces, losses, grad in results:  # type: ignore[misc]
        assert traces == 1
        assert torch.isfinite(losses).all() and torch.isfinite(grad).all()
        assert grad.abs().sum() > 0


def test_replay_while_another_thread_traces():
    """A torch.compile program (aot_eager) replayed while another thread traces its step: torch refuses to run a
    dynamo-optimized function while FX traces in any thread ("Detected that you are using FX to symbolically trace
    a dynamo-optimized function"), so the replay runs once that trace is over. Deterministic: the tracing thread
    waits (up to 2 s) inside its trace for the replay, which waits for the trace."""
    inside, replayed = threading.Event(), threading.Event()
    errors: list = []

    def make(tracing: bool):
        enc = torch.nn.Linear(3, 2)
        est = storch.estimator("reparameterization", plate="h", n_samples=4)
        first = [tracing]

        def step(x):
            with storch.Graph():
                if first[0]:
                    first[0] = False
                    inside.set()
                    replayed.wait(timeout=2.0)
                h = est(Normal(enc(x), 1.0))
                storch.add_cost((h ** 2).sum(-1), name="c")
                return storch.surrogate_loss()

        return enc, step

    torch.manual_seed(0)
    x = torch.randn(3)
    enc, step = make(False)
    compiled = storch.compile(step, backend="aot_eager")
    compiled(x)  # traced and compiled
    _, other = make(True)
    other_compiled = storch.compile(other, backend=None)

    def trace():
        try:
            other_compiled(x)
        except Exception as e:  # (reported by the main thread)
            errors.append(e)

    thread = threading.Thread(target=trace)
    thread.start()
    assert inside.wait(timeout=30)
    try:
        loss = compiled(x)
    finally:
        replayed.set()
        thread.join()
    assert errors == []
    loss.backward()  # (not compared with the eager step's: the other trace's fork_rng restored the global generator)
    assert torch.isfinite(loss) and enc.weight.grad is not None and enc.weight.grad.abs().sum() > 0
    assert compiled.traces == 1 and other_compiled.traces == 1
