"""Mismatched collectives, on real gloo processes: ranks that call synchronized layers
differently raise ``distnorm.SyncMismatchError`` on every rank, each naming the layer it
was in, within seconds, and leave every running statistic as it was; ranks that call them
alike (uneven and empty batches, a layer called twice everywhere, activation
checkpointing) are never stopped. Layers of different widths make gloo end the job instead
(documented in distnorm/comm.py): no hang either.

The check runs on the device and is reported by distnorm.health at the latest at the next
step's first synchronized call (here: the next call of a layer, or the end of a backward
pass), before that call's collective; a layer's first call is checked at once.

The mismatch cases run one after another in the same 3 processes: every rank leaves a
mismatched collective having completed it, so the group stays usable. The expected
statistics are nn.BatchNorm's on the concatenated batch, written out here in float64.
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn
from torch.utils.checkpoint import checkpoint

import distnorm
from distnorm import comm
from distnorm.layers import SyncBatchNorm
from tests.multiprocess import run_on_ranks

WORLD = 3
CHANNELS = 4
MOMENTUM = 0.1


class TwoNorms(nn.Module):
    """Two synchronized layers of one width, ``a`` and ``b``, and a wider one, ``wide``."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.BatchNorm2d(CHANNELS)
        self.b = nn.BatchNorm2d(CHANNELS)
        self.wide = nn.BatchNorm2d(CHANNELS + 2)


def batch(step: int, rank: int, rows: int = 3) -> torch.Tensor:
    generator = torch.Generator().manual_seed(100 * step + rank)
    return torch.randn(rows, CHANNELS, 2, 2, generator=generator, dtype=torch.float64) * 2 + 1


def converted(check_sync: bool = True) -> nn.Module:
    return distnorm.convert_model(TwoNorms(), check_sync=check_sync).double()


def statistics(layer: nn.Module) -> dict[str, torch.Tensor]:
    return {
        "mean": layer.running_mean.clone(),
        "var": layer.running_var.clone(),
        "tracked": layer.num_batches_tracked.clone(),
    }


def next_step(layer: nn.Module, x: torch.Tensor) -> None:
    """A training call of ``layer`` and the next step's: where a mismatch in the first is
    reported at the latest."""
    layer(x)
    layer(x)


def outcome(action) -> str | None:
    """None when ``action()`` returns, else ``"<error class>: <message>"``."""
    try:
        action()
    except Exception as error:  # noqa: BLE001 - the test compares what each rank raised
        return f"{type(error).__name__}: {error}"
    return None


# --- worker side ------------------------------------------------------------------------------


def mismatch_cases(rank: int, world_size: int) -> dict[str, dict]:
    results = {}

    # Rank 2 calls layer b where ranks 0 and 1 call layer a, after one matched step.
    model = converted()
    model.a(batch(0, rank))
    model.b(batch(0, rank))
    before = {"a": statistics(model.a), "b": statistics(model.b)}
    layer = model.b if rank == 2 else model.a
    error = outcome(lambda: next_step(layer, batch(1, rank)))
    results["a_vs_b"] = {
        "error": error,
        "before": before,
        "after": {"a": statistics(model.a), "b": statistics(model.b)},
    }

    # Rank 0 calls layer a twice, the others once; then every rank calls b.
    model = converted()

    def twice() -> None:
        for _ in range(2 if rank == 0 else 1):
            model.a(batch(2, rank))
        model.b(batch(2, rank))

    error = outcome(twice)
    results["twice"] = {"error": error, "a": statistics(model.a), "b": statistics(model.b)}

    # Backward: rank 2 back-propagates through b only, then goes on to a's next forward,
    # while ranks 0 and 1 back-propagate through b and then a.
    model = converted()
    x_a, x_b = (batch(3, rank).requires_grad_(True) for _ in range(2))
    y_a, y_b = model.a(x_a), model.b(x_b)
    after_forward = statistics(model.a)

    def backward() -> None:
        if rank == 2:
            y_b.sum().backward()
            next_step(model.a, batch(4, rank))
        else:
            (y_a.square().sum() + y_b.sum()).backward()

    error = outcome(backward)
    results["backward"] = {"error": error, "before": after_forward, "a": statistics(model.a)}

    # The same mismatch as a_vs_b with the check off: nothing stops it, a's and b's
    # statistics mix (why the check is on by default).
    model = converted(check_sync=False)
    layer = model.b if rank == 2 else model.a
    error = outcome(lambda: layer(batch(1, rank)))
    results["unchecked"] = {"error": error, "a": statistics(model.a), "b": statistics(model.b)}

    # Calls that match on every rank are never stopped: uneven and empty batches, a layer
    # called twice per step, activation checkpointing (which calls the forward again in
    # backward, on every rank), several steps.
    model = converted()
    rows = (2, 0, 5)[rank]

    def matched() -> None:
        for step in range(3):
            x = batch(10 + step, rank, rows).requires_grad_(True)
            y = model.b(model.a(model.a(x)))
            z = checkpoint(model.b, x, use_reentrant=False)
            (y.square().sum() + z.sum()).backward()

    error = outcome(matched)
    results["matched"] = {"error": error, "a": statistics(model.a)}

    # Layers built directly (not named by convert_model) of one class and width are told
    # apart by the order they were built in. p has had 2 calls, q 1; rank 0 calls p again
    # (call 3) where the others call q (call 2).
    p, q = (SyncBatchNorm(CHANNELS).double() for _ in range(2))
    for layer in (p, p, q):
        layer(batch(5, rank))
    error = outcome(lambda: next_step(p if rank == 0 else q, batch(6, rank)))
    results["unnamed"] = {"error": error}

    # A sync-group size that does not divide the world: refused on every rank, before any
    # group is created.
    results["group_size"] = {"error": outcome(lambda: comm.sync_group(2))}
    return results


def different_widths(rank: int, world_size: int) -> str | None:
    """Rank 0 calls a (4 channels), rank 1 calls wide (6): payloads of different sizes."""
    model = converted()
    layer, channels = (model.wide, CHANNELS + 2) if rank == 1 else (model.a, CHANNELS)
    return outcome(lambda: layer(torch.randn(3, channels, 2, 2, dtype=torch.float64)))


# --- test side --------------------------------------------------------------------------------


def expected_running(batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """nn.BatchNorm's running statistics (momentum 0.1) after one step on each global batch."""
    mean, var = (
        torch.zeros(CHANNELS, dtype=torch.float64),
        torch.ones(CHANNELS, dtype=torch.float64),
    )
    for x in batches:
        dims = (0, 2, 3)
        mean = (1 - MOMENTUM) * mean + MOMENTUM * x.mean(dim=dims)
        var = (1 - MOMENTUM) * var + MOMENTUM * x.var(dim=dims, unbiased=True)
    return {"mean": mean, "var": var, "tracked": torch.tensor(len(batches))}


def global_batch(step: int) -> torch.Tensor:
    return torch.cat([batch(step, rank) for rank in range(WORLD)])


def assert_statistics(actual: dict, expected: dict) -> None:
    torch.testing.assert_close(actual["mean"], expected["mean"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(actual["var"], expected["var"], rtol=1e-12, atol=1e-12)
    assert int(actual["tracked"]) == int(expected["tracked"])


@pytest.fixture(scope="module")
def results() -> list[dict]:
    start = time.monotonic()
    outcomes = run_on_ranks(mismatch_cases, WORLD, timeout_s=60)
    assert time.monotonic() - start < 60
    return outcomes


def test_layer_a_against_layer_b_raises_on_every_rank_naming_its_layer(results) -> None:
    for rank, result in enumerate(results):
        error = result["a_vs_b"]["error"]
        assert error is not None and error.startswith("SyncMismatchError: ")
        name = "'b'" if rank == 2 else "'a'"
        assert f"SyncBatchNorm2d {name}: rank {rank} was in the forward collective" in error
        assert "even_steps" in error and "check_sync=False" in error
        # Nothing changed: the statistics are those of the matched step, on every rank.
        assert_statistics(result["a_vs_b"]["after"]["a"], result["a_vs_b"]["before"]["a"])
        assert_statistics(result["a_vs_b"]["after"]["b"], result["a_vs_b"]["before"]["b"])
        assert_statistics(result["a_vs_b"]["before"]["a"], expected_running([global_batch(0)]))


def test_a_layer_called_twice_on_one_rank_is_caught_at_the_first_unmatched_call(results) -> None:
    errors = [result["twice"]["error"] for result in results]
    expected = "SyncBatchNorm2d 'a': rank 0 was in the forward collective of training call 2"
    assert expected in errors[0]
    for rank in (1, 2):
        assert errors[rank].startswith("SyncMismatchError: SyncBatchNorm2d 'b'")
        assert "the shift collective" in errors[rank]  # b's first call agrees on a shift
    for result in results:  # a's one matched call counted; b never updated
        assert_statistics(result["twice"]["a"], expected_running([global_batch(2)]))
        assert int(result["twice"]["b"]["tracked"]) == 0
        assert torch.equal(result["twice"]["b"]["mean"], torch.zeros(CHANNELS, dtype=torch.float64))


def test_a_mismatch_in_backward_is_caught_on_every_rank(results) -> None:
    for rank, result in enumerate(results):
        error = result["backward"]["error"]
        assert error is not None and error.startswith("SyncMismatchError: SyncBatchNorm2d 'a'")
        direction = "forward collective of training call 2" if rank == 2 else "backward"
        assert direction in error
        assert_statistics(result["backward"]["a"], result["backward"]["before"])


def test_without_the_check_the_same_mismatch_mixes_two_layers_silently(results) -> None:
    means = [result["unchecked"]["a"]["mean"] for result in results[:2]]
    means.append(results[2]["unchecked"]["b"]["mean"])
    for result in results:
        assert result["unchecked"]["error"] is None
    # Rank 2's b holds the mean of the batches a saw on ranks 0 and 1 and b saw on rank 2.
    assert torch.equal(means[0], means[2])
    torch.testing.assert_close(means[0], expected_running([global_batch(1)])["mean"])


def test_calls_that_match_on_every_rank_are_never_stopped(results) -> None:
    for result in results:
        assert result["matched"]["error"] is None
        assert int(result["matched"]["a"]["tracked"]) == 6
    for key in ("mean", "var"):
        assert torch.equal(results[0]["matched"]["a"][key], results[2]["matched"]["a"][key])


def test_directly_built_layers_of_one_width_are_told_apart(results) -> None:
    calls = ["training call 3", "training call 2", "training call 2"]
    for rank, result in enumerate(results):
        error = result["unnamed"]["error"]
        assert error.startswith("SyncMismatchError: SyncBatchNorm: rank")
        assert f"forward collective of {calls[rank]}" in error


def test_a_sync_group_size_that_does_not_divide_the_world_is_refused_everywhere(results) -> None:
    for result in results:
        error = result["group_size"]["error"]
        assert error.startswith("DistNormError: cannot make sync groups of 2 ranks in a world of 3")
        assert "divisors of 3: 1, 3" in error


def test_layers_of_different_widths_end_the_job_instead_of_hanging() -> None:
    """gloo refuses an all-reduce whose sizes differ by aborting the process with the
    smaller buffer; the run must end (not hang) well within the 60 s collective timeout."""
    start = time.monotonic()
    with pytest.raises(mp.ProcessExitedException) as exited:
        run_on_ranks(different_widths, 2, timeout_s=60)
    assert exited.value.signal_name == "SIGABRT"
    assert time.monotonic() - start < 60
