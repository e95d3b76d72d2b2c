"""torch.compile of a converted model, at world size 1 and on 2 real gloo processes, with
the mismatch check on: one graph per call (no graph break: the check runs on the device and
no host reads the outcome inside the graph), one recompilation once the shift the sums are
taken about exists, the same outputs and running statistics as eager mode, and a mismatch
still raises SyncMismatchError on every rank, with the same message, when the outcome is
reported (distnorm.report(), or the next optimizer step).

The backend is "aot_eager": Dynamo's capture and AOTAutograd's functionalization of the
collectives and of the custom backward, without Inductor's C++ compilation time.
"""

from __future__ import annotations

import torch
import torch._dynamo.testing
from torch import nn

import distnorm
from tests.multiprocess import run_on_ranks

STEPS = 2


class Net(nn.Module):
    def __init__(self, cumulative: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.a = nn.BatchNorm2d(4)
        self.b = nn.BatchNorm2d(4, momentum=None if cumulative else 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(self.conv(x))))


def batch(step: int, rank: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(10 * step + rank)
    return torch.randn(3 + rank, 3, 5, 5, generator=generator)


def train(model: nn.Module, rank: int) -> dict:
    outputs = []
    for step in range(STEPS):
        x = batch(step, rank).requires_grad_(True)
        y = model(x)
        y.square().sum().backward()
        outputs.append((y.detach(), x.grad))
    return {"outputs": outputs}


def eager_and_compiled(rank: int, cumulative: bool) -> dict:
    torch.manual_seed(0)
    eager = distnorm.convert_model(Net(cumulative))
    compiled = distnorm.convert_model(Net(cumulative))
    compiled.load_state_dict(eager.state_dict())
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    results = {
        "eager": train(eager, rank),
        "compiled": train(torch.compile(compiled, backend=counter), rank),
        "graphs": counter.frame_count,
    }
    results["eager"]["state"] = eager.state_dict()
    results["compiled"]["state"] = compiled.state_dict()
    return results


def compile_worker(rank: int, world_size: int) -> dict:
    results = eager_and_compiled(rank, cumulative=True)
    model = distnorm.convert_model(Net(cumulative=True))
    layer = torch.compile(model.a if rank == 0 else model.b, backend="aot_eager")
    layer(torch.randn(2, 4, 3, 3))  # no device-side assert: the outcome waits on the device
    try:
        distnorm.report()
        results["mismatch"] = None
    except distnorm.SyncMismatchError as error:
        results["mismatch"] = str(error)
    return results


def assert_same_training(results: dict) -> None:
    for (y, grad), (y_eager, grad_eager) in zip(
        results["compiled"]["outputs"], results["eager"]["outputs"], strict=True
    ):
        torch.testing.assert_close(y, y_eager, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(grad, grad_eager, rtol=1e-5, atol=1e-5)
    for key, value in results["eager"]["state"].items():
        torch.testing.assert_close(results["compiled"]["state"][key], value, msg=key)


def test_compiled_at_world_size_one_trains_as_eager_in_one_graph() -> None:
    """Without peers the layers are torch's BatchNorm: one graph. (momentum=None is left
    out: torch reads its factor 1 / num_batches_tracked on the host, a graph break and a
    recompilation per step, as for nn.BatchNorm.)"""
    results = eager_and_compiled(rank=0, cumulative=False)
    assert results["graphs"] == 1
    assert_same_training(results)


def test_compiled_on_two_gloo_processes_trains_as_eager_and_still_catches_mismatches() -> None:
    for rank, results in enumerate(run_on_ranks(compile_worker, 2, timeout_s=120)):
        # One graph for the first call (which agrees on the shift), one for every later one.
        assert results["graphs"] == 2
        assert_same_training(results)
        name = "'a'" if rank == 0 else "'b'"
        assert results["mismatch"].startswith(
            f"SyncBatchNorm2d {name}: rank {rank} was in the shift collective, but the ranks"
        )
