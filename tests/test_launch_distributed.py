"""distnorm.distributed: process-group set-up from each launcher's environment, the
collective timeout that ends a job whose rank is stuck, and the data-parallel group.

Rendezvous is tested with real processes started the way launchers start them (their
variables in the environment); the MPI path runs under a real mpiexec in
tests/test_launch_train.py. The data-parallel group is checked end to end: SyncBatchNorm
converted over it shares statistics with the rank's replicas and no one else.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import types
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from torch import nn

import distnorm
from distnorm.distributed import (
    DEFAULT_TIMEOUT,
    TIMEOUT_VARIABLE,
    collective_timeout,
    data_parallel_group,
    init_distributed,
)
from distnorm.errors import DistNormError
from tests.multiprocess import run_on_ranks

LAUNCHER_VARIABLES = (
    "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
    "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE",
    "PMI_SIZE", "PMI_RANK", "MPI_LOCALNRANKS",
    "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS_PER_NODE",
    TIMEOUT_VARIABLE,
)  # fmt: skip

# Run by each spawned rank: set up from the environment, all-reduce rank + 1, report.
WORKER = """
import json, sys, time
from datetime import timedelta
import torch, torch.distributed as dist
from distnorm.distributed import init_distributed

mode = sys.argv[1]
timeout = timedelta(seconds=3) if mode == "stuck" else None
ctx = init_distributed(timeout=timeout)
report = {"rank": ctx.rank, "world_size": ctx.world_size, "local_rank": ctx.local_rank,
          "backend": ctx.backend, "launcher": ctx.launcher, "owns_group": ctx.owns_group,
          "timeout_s": ctx.timeout.total_seconds(), "group_size": dist.get_world_size()}
if mode == "stuck" and ctx.rank == 1:
    time.sleep(60)  # alive but never reaching the collective
    sys.exit(0)
tensor = torch.tensor([ctx.rank + 1.0])
start = time.monotonic()
try:
    dist.all_reduce(tensor)
    report["sum"] = tensor.item()
except Exception as error:
    report["error"] = type(error).__name__ + ": " + str(error)[:200]
report["collective_s"] = time.monotonic() - start
again = init_distributed()
report["again"] = [again.launcher, again.owns_group, again.world_size]
print("REPORT " + json.dumps(report), flush=True)
if "error" in report:
    import os
    os._exit(1)  # a rank whose collective failed ends; the launcher then stops the job
ctx.close()
"""


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No launcher variables (restored afterwards, also those init_distributed sets)."""
    for variable in LAUNCHER_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    return monkeypatch


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def spawn_ranks(rank_env: list[dict[str, str]], mode: str, wait_for: int = 0) -> list[dict]:
    """Start one process per environment (as a launcher would) and collect the reports of
    the first ``wait_for`` (default all); the others are then killed."""
    base = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
    base.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, mode],
            env={**base, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for env in rank_env
    ]
    reports = []
    try:
        for process in processes[: wait_for or len(processes)]:
            output, _ = process.communicate(timeout=90)
            lines = [line for line in output.splitlines() if line.startswith("REPORT ")]
            reports.append(json.loads(lines[0][7:]) if lines else {"output": output})
    finally:
        for process in processes:
            process.kill()
    return reports


def test_timeout_defaults_to_ten_minutes_and_follows_the_environment(clean_env) -> None:
    assert collective_timeout() == DEFAULT_TIMEOUT == timedelta(minutes=10)
    clean_env.setenv(TIMEOUT_VARIABLE, "90")
    assert collective_timeout() == timedelta(seconds=90)
    assert collective_timeout(timedelta(seconds=5)) == timedelta(seconds=5)  # argument wins
    for bad in ("soon", "0", "-3"):
        clean_env.setenv(TIMEOUT_VARIABLE, bad)
        with pytest.raises(DistNormError, match=TIMEOUT_VARIABLE):
            collective_timeout()
    with pytest.raises(DistNormError, match="positive"):
        collective_timeout(timedelta(0))


def test_single_process_gets_no_group_unless_asked(clean_env) -> None:
    ctx = init_distributed()
    assert (ctx.world_size, ctx.rank, ctx.backend, ctx.is_distributed) == (1, 0, None, False)
    assert not dist.is_initialized() and ctx.launcher == "single process"
    with init_distributed(init_single_process=True) as ctx:
        assert dist.is_initialized() and dist.get_world_size() == 1
        assert (ctx.backend, ctx.owns_group, ctx.is_distributed) == ("gloo", True, False)
        assert ctx.timeout == DEFAULT_TIMEOUT
    assert not dist.is_initialized()  # closed by the context manager


def test_torchrun_style_environment_joins_the_ranks() -> None:
    port = str(free_port())
    reports = spawn_ranks(
        [
            dict(RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                 MASTER_PORT=port)
            for r in range(2)
        ],
        "ok",
    )  # fmt: skip
    for rank, report in enumerate(reports):
        assert report.get("sum") == 3.0, report
        assert (report["rank"], report["world_size"], report["group_size"]) == (rank, 2, 2)
        assert (report["backend"], report["launcher"]) == ("gloo", "torchrun-style environment")
        assert report["timeout_s"] == DEFAULT_TIMEOUT.total_seconds()
        assert report["again"] == ["existing process group", False, 2]  # kept, not replaced


def test_slurm_tasks_join_with_the_batch_script_address() -> None:
    port = str(free_port())
    reports = spawn_ranks(
        [
            dict(SLURM_PROCID=str(r), SLURM_NTASKS="2", SLURM_LOCALID=str(r),
                 SLURM_NTASKS_PER_NODE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
            for r in range(2)
        ],
        "ok",
    )  # fmt: skip
    for rank, report in enumerate(reports):
        assert report.get("sum") == 3.0, report
        assert (report["rank"], report["local_rank"], report["launcher"]) == (rank, rank, "SLURM")


def test_slurm_without_an_address_says_how_to_set_it(clean_env) -> None:
    clean_env.setenv("SLURM_PROCID", "0")
    clean_env.setenv("SLURM_NTASKS", "2")
    with pytest.raises(DistNormError, match="MASTER_ADDR, MASTER_PORT not set.*scontrol"):
        init_distributed()
    assert not dist.is_initialized()


def test_a_stuck_rank_ends_the_job_at_the_timeout_instead_of_hanging_it() -> None:
    port = str(free_port())
    start = time.monotonic()
    reports = spawn_ranks(
        [
            dict(RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
            for r in range(2)
        ],
        "stuck",
        wait_for=1,
    )
    report = reports[0]
    assert "error" in report and "sum" not in report, report
    assert 2.5 <= report["collective_s"] < 30, report  # the 3 s deadline, not gloo's 30 min
    assert time.monotonic() - start < 60


def test_data_parallel_group_prefers_the_mpu_then_deepspeed_then_world(monkeypatch) -> None:
    monkeypatch.delitem(sys.modules, "deepspeed.utils.groups", raising=False)
    assert data_parallel_group() is None
    mpu = types.SimpleNamespace(get_data_parallel_group=lambda: "dp group of the mpu")
    assert data_parallel_group(mpu) == "dp group of the mpu"
    groups = types.SimpleNamespace(mpu=None, _DATA_PARALLEL_GROUP="deepspeed's tp/dp group")
    monkeypatch.setitem(sys.modules, "deepspeed.utils.groups", groups)
    assert data_parallel_group() == "deepspeed's tp/dp group"
    groups.mpu = mpu  # a Megatron mpu registered with DeepSpeed comes first
    assert data_parallel_group() == "dp group of the mpu"


def _sync_bn_over_data_parallel_group(rank: int, world_size: int) -> torch.Tensor:
    # Tensor parallelism of 2 over 4 ranks: {0, 1} and {2, 3} hold halves of one model
    # and see the same samples; the replicas are {0, 2} and {1, 3}.
    replicas = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    mpu = types.SimpleNamespace(get_data_parallel_group=lambda: replicas[rank % 2])
    model = distnorm.convert_model(
        nn.BatchNorm1d(3, momentum=1.0).double(), process_group=data_parallel_group(mpu)
    )
    model(batch_of(rank))
    return model.running_mean


def batch_of(rank: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(rank)
    return torch.randn(4, 3, generator=generator, dtype=torch.float64) + 10 * rank


def test_sync_batchnorm_over_the_data_parallel_group_pools_only_the_replicas() -> None:
    running_means = run_on_ranks(_sync_bn_over_data_parallel_group, 4)
    for rank, running_mean in enumerate(running_means):
        replicas = [r for r in range(4) if r % 2 == rank % 2]
        expected = torch.cat([batch_of(r) for r in replicas]).mean(dim=0)
        torch.testing.assert_close(running_mean, expected, rtol=0, atol=1e-12)
