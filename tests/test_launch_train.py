"""launch/train.py under each launcher, for real: 2 CPU processes started by torchrun,
``accelerate launch``, the ``deepspeed`` launcher (ZeRO stages 0, 1 and 2) and ``mpiexec``.

Each run trains a few steps and writes one JSON summary per rank (``--summary-dir``).
Every run is checked for what silently goes wrong with launchers: that two processes
really ran, joined in one group of 2 (a wrong flag starts one non-distributed process, or
an Accelerator that takes each process for a job of its own), and that the converted
layers' running statistics are bitwise identical on both ranks (DeepSpeed never
broadcasts buffers, so nothing but the synchronized statistics keeps them equal; a run of
the unconverted model under DeepSpeed shows them drifting apart). Fresh runs must lower
the loss and agree with each other step by step: every launcher trains the same model on
the same shards. Checkpoints written under one launcher resume under another (including
ZeRO's partitioned optimizer state, gathered on save and split on load) and continue
exactly as an uninterrupted run does.

Runs are shared by the tests through one module-scoped cache, each started on first use.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # console scripts installed next to the interpreter
EPOCHS, STOP_AFTER, STEPS = 3, 2, 4  # fresh runs: 2 epochs of 4 steps, of a 3-epoch schedule
TRAIN = ["launch/train.py", "--epochs", str(EPOCHS), "--steps-per-epoch", str(STEPS)]
RUN_TIMEOUT_S = 420  # DeepSpeed's first run on a machine compiles a CPU op (~90 s here)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def require(module: str, executable: str | None = None) -> None:
    """Skip when a launcher is not installed (launch/setup_env.sh installs them all)."""
    pytest.importorskip(module)
    if executable and not find_executable(executable):
        pytest.skip(f"{executable} not found")


def find_executable(name: str) -> str | None:
    return shutil.which(name, path=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")


# How each launcher starts 2 processes of train.py (arguments after the script's path).
def torchrun(args: list[str]) -> list[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    return [*launcher, "--nproc_per_node", "2", *TRAIN, *args]


def accelerate(args: list[str]) -> list[str]:
    require("accelerate")
    config = ["--config_file", "configs/accelerate/cpu.yaml"]
    port = ["--main_process_port", str(free_port())]
    return [sys.executable, "-m", "accelerate.commands.launch", *config, *port, *TRAIN, *args]


def deepspeed(stage: int) -> Callable[[list[str]], list[str]]:
    def command(args: list[str]) -> list[str]:
        require("deepspeed")
        launcher = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2"]
        config = ["--deepspeed_config", f"configs/deepspeed/zero{stage}.json"]
        return [*launcher, "--master_port", str(free_port()), *TRAIN, *config, *args]

    return command


def mpiexec(args: list[str]) -> list[str]:
    require("mpi4py", "mpiexec")
    return [find_executable("mpiexec"), "-n", "2", sys.executable, *TRAIN, *args]


# name: (launcher, the run it resumes from or None, extra train.py arguments)
RUNS: dict[str, tuple[Callable[[list[str]], list[str]], str | None, list[str]]] = {
    "torchrun": (torchrun, None, []),
    "accelerate": (accelerate, None, []),
    "deepspeed-zero0": (deepspeed(0), None, []),
    "deepspeed-zero2": (deepspeed(2), None, []),
    "mpiexec": (mpiexec, None, []),
    "uninterrupted": (torchrun, None, []),
    "accelerate-from-torchrun": (accelerate, "torchrun", []),
    "torchrun-from-deepspeed-zero2": (torchrun, "deepspeed-zero2", []),
    "deepspeed-zero1-from-mpiexec": (deepspeed(1), "mpiexec", []),
    "deepspeed-zero2-unconverted": (deepspeed(2), None, ["--no-convert"]),
}
FRESH = ["torchrun", "accelerate", "deepspeed-zero0", "deepspeed-zero2", "mpiexec"]
RESUMED = [name for name, (_, source, _) in RUNS.items() if source]
ENGINES = {"accelerate": "accelerate", "deepspeed": "deepspeed"}


class Runs:
    """Starts each run once, on first use, in its own folder; keeps the summaries."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.summaries: dict[str, list[dict[str, Any]]] = {}
        self.seconds: dict[str, float] = {}

    def __getitem__(self, name: str) -> list[dict[str, Any]]:
        if name not in self.summaries:
            self.summaries[name] = self._run(name)
        return self.summaries[name]

    def checkpoint(self, name: str) -> Path:
        self[name]
        return self.folder / name / "checkpoint.pt"

    def _run(self, name: str) -> list[dict[str, Any]]:
        launcher, source, extra = RUNS[name]
        out = self.folder / name
        args = ["--out", str(out), "--summary-dir", str(out / "summary"), *extra]
        if source:
            args += ["--resume", str(self.checkpoint(source))]
        elif name != "uninterrupted":
            args += ["--stop-after-epoch", str(STOP_AFTER)]
        command = launcher(args)
        env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "CUDA_VISIBLE_DEVICES": "",  # CPU and gloo, also on a GPU machine
            "DS_ACCELERATOR": "cpu",
            "PYTHONUNBUFFERED": "1",
        }
        for variable in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(variable, None)  # the launcher under test must provide them
        start = time.monotonic()
        try:
            result = subprocess.run(
                command,
                cwd=REPO,
                env=env,
                capture_output=True,
                text=True,
                timeout=RUN_TIMEOUT_S,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired as error:
            pytest.fail(f"{name} ran past {RUN_TIMEOUT_S} s:\n{(error.stdout or '')[-3000:]}")
        self.seconds[name] = time.monotonic() - start
        log = result.stdout + result.stderr
        (out / "log.txt").parent.mkdir(parents=True, exist_ok=True)
        (out / "log.txt").write_text(log)
        assert result.returncode == 0, f"{name}: {' '.join(command)}\n{log[-5000:]}"
        files = sorted((out / "summary").glob("rank*.json"))
        summaries = [json.loads(f.read_text()) for f in files]
        return sorted(summaries, key=lambda s: s["rank"])


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    cache = Runs(tmp_path_factory.mktemp("launch"))
    yield cache
    timings = ", ".join(f"{name} {seconds:.0f}s" for name, seconds in cache.seconds.items())
    print(f"\nlauncher run times: {timings}")


def close(a: list[float], b: list[float], rtol: float) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= rtol * abs(y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("name", list(RUNS))
def test_two_processes_really_ran_as_one_group_of_two(runs: Runs, name: str) -> None:
    summaries = runs[name]
    assert [s["rank"] for s in summaries] == [0, 1], f"{name}: summaries from ranks {summaries}"
    for s in summaries:
        assert s["world_size"] == 2, f"{name}: rank {s['rank']} saw world size {s['world_size']}"
        assert s["engine_world_size"] == 2, f"{name}: {s['engine']} saw {s['engine_world_size']}"
        assert s["backend"] == "gloo"
        expected_engine = next((e for k, e in ENGINES.items() if name.startswith(k)), "ddp")
        assert s["engine"] == expected_engine
        assert s["launcher"] == (
            "MPI" if name.startswith("mpiexec") else "torchrun-style environment"
        )


@pytest.mark.parametrize("name", [n for n in RUNS if not n.endswith("unconverted")])
def test_converted_layers_keep_bitwise_identical_running_statistics(runs: Runs, name: str) -> None:
    rank0, rank1 = runs[name]
    plan = rank0["plan"]
    assert plan["world_size"] == 2 and plan["per_worker_batch_size"] == 16
    assert {layer["norm"] for layer in plan["layers"]} == {"sync_bn"}
    assert {layer["sync_group_size"] for layer in plan["layers"]} == {2}
    layers = rank0["norm_layers"]
    assert len(layers) == 6 and {v["now"] for v in layers.values()} == {"SyncBatchNorm2d"}
    for layer, fingerprint in layers.items():
        other = rank1["norm_layers"][layer]["running_stats_sha256"]
        assert fingerprint["running_stats_sha256"] == other, f"{name}: {layer} differs by rank"
    assert rank0["final_state_sha256"] == rank1["final_state_sha256"]


def test_unconverted_batchnorm_drifts_apart_under_deepspeed(runs: Runs) -> None:
    """The contrast that gives the previous test its meaning: DeepSpeed broadcasts no
    buffers, so local BatchNorms' running statistics differ by rank."""
    rank0, rank1 = runs["deepspeed-zero2-unconverted"]
    assert {v["now"] for v in rank0["norm_layers"].values()} == {"BatchNorm2d"}
    differing = [
        layer
        for layer, v in rank0["norm_layers"].items()
        if v["running_stats_sha256"] != rank1["norm_layers"][layer]["running_stats_sha256"]
    ]
    assert len(differing) == 6


@pytest.mark.parametrize("name", FRESH)
def test_loss_falls_and_every_launcher_trains_the_same(runs: Runs, name: str) -> None:
    summaries = runs[name]
    reference = runs["torchrun"]
    for s, ref in zip(summaries, reference, strict=True):
        assert (s["start_epoch"], s["end_epoch"]) == (0, STOP_AFTER)
        assert len(s["step_losses"]) == STOP_AFTER * STEPS
        assert s["epoch_losses"][-1] < s["epoch_losses"][0] - 0.05, s["epoch_losses"]
        # Same data shards, same maths: equal to rounding (the collectives sum in
        # different orders under different engines).
        assert close(s["step_losses"], ref["step_losses"], rtol=1e-5), (
            f"{name} rank {s['rank']}: {s['step_losses']} vs torchrun {ref['step_losses']}"
        )


@pytest.mark.parametrize("name", RESUMED)
def test_checkpoint_resumes_under_another_launcher(runs: Runs, name: str) -> None:
    source = RUNS[name][1]
    resumed, saved, uninterrupted = runs[name], runs[source], runs["uninterrupted"]
    for s, before, whole in zip(resumed, saved, uninterrupted, strict=True):
        assert s["resumed_from"] is not None
        assert (s["start_epoch"], s["end_epoch"]) == (STOP_AFTER, EPOCHS)
        assert s["initial_state_sha256"] == before["final_state_sha256"], "weights not restored"
        # Model, momentum, learning-rate schedule and data order all restored: the last
        # epoch retraces the uninterrupted run's.
        tail = whole["step_losses"][STOP_AFTER * STEPS :]
        assert close(s["step_losses"], tail, rtol=1e-4), (
            f"{name} rank {s['rank']}: {s['step_losses']} vs uninterrupted {tail}"
        )
