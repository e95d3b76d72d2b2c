"""A worker killed mid-training ends the job with an error on the surviving rank, well
within the collective timeout distnorm's process-group helper sets, instead of hanging it;
and the survivor's running statistics are those of the last step that completed.

Two real processes join as torchrun would start them (its variables in the environment)
through ``distnorm.distributed.init_distributed``, train a converted model (SyncBatchNorm
over both ranks), and after one step the parent SIGKILLs rank 1; rank 0 then enters the
next step's first collective.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

WORKER = r"""
import json, os, sys, time
from datetime import timedelta
import torch
import distnorm
from distnorm.distributed import init_distributed
from distnorm.examples import small_resnet

folder = sys.argv[1]
ctx = init_distributed(timeout=timedelta(seconds=20))
torch.manual_seed(0)
model = distnorm.convert_model(small_resnet(), norm="sync_bn")
x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(ctx.rank))
model(x).sum().backward()
stem = model.stem[1]
after_step = stem.running_mean.clone()
open(os.path.join(folder, f"step1-{ctx.rank}"), "w").close()
if ctx.rank == 1:
    time.sleep(120)  # killed by the parent before this ends
while not os.path.exists(os.path.join(folder, "killed")):
    time.sleep(0.05)
report = {"world_size": ctx.world_size}
start = time.monotonic()
try:
    model(x).sum().backward()
    report["finished"] = True
except Exception as error:
    report["error"] = f"{type(error).__name__}: {error}"[:300]
report["seconds"] = time.monotonic() - start
report["stats_kept"] = bool(torch.equal(stem.running_mean, after_step))
print("REPORT " + json.dumps(report), flush=True)
os._exit(1 if "error" in report else 0)
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_killed_worker_ends_the_job_with_an_error_instead_of_a_hang() -> None:
    port = str(free_port())
    launcher_variables = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR")
    base = {k: v for k, v in os.environ.items() if k not in launcher_variables}
    base.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    with tempfile.TemporaryDirectory() as folder:
        processes = [
            subprocess.Popen(
                [sys.executable, "-c", WORKER, folder],
                env={
                    **base,
                    "RANK": str(r),
                    "WORLD_SIZE": "2",
                    "LOCAL_RANK": str(r),
                    "MASTER_ADDR": "127.0.0.1",
                    "MASTER_PORT": port,
                },  # fmt: skip
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for r in range(2)
        ]
        try:
            deadline = time.monotonic() + 120
            while not all(os.path.exists(os.path.join(folder, f"step1-{r}")) for r in range(2)):
                assert time.monotonic() < deadline, "the first step did not complete"
                assert all(p.poll() is None for p in processes), processes[0].stdout.read()
                time.sleep(0.05)
            processes[1].send_signal(signal.SIGKILL)
            processes[1].wait(timeout=10)
            open(os.path.join(folder, "killed"), "w").close()
            start = time.monotonic()
            output, _ = processes[0].communicate(timeout=60)  # TimeoutExpired: a hang
            ended_after = time.monotonic() - start
        finally:
            for process in processes:
                process.kill()
    lines = [line for line in output.splitlines() if line.startswith("REPORT ")]
    assert lines, output
    report = json.loads(lines[0][len("REPORT ") :])
    assert report["world_size"] == 2
    assert "finished" not in report and "error" in report, report
    assert processes[0].returncode == 1
    assert ended_after < 30, f"rank 0 took {ended_after:.1f} s to notice the dead rank"
    assert report["stats_kept"], "the failed step must not change the running statistics"
