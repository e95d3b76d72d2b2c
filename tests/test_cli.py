"""``python -m distnorm plan``: prints a plan without launching anything."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import distnorm
from distnorm.__main__ import main
from distnorm.examples import small_resnet
from distnorm.policy import Plan
from tests.conftest import LAUNCHER_VARIABLES

EXAMPLE = "distnorm.examples:small_resnet"


pytestmark = pytest.mark.usefixtures("no_launcher_environment")


def run(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    assert main(["plan", *args]) == 0
    return capsys.readouterr().out


def test_the_module_runs_as_a_command() -> None:
    environment = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
    completed = subprocess.run(
        [sys.executable, "-m", "distnorm", "plan", EXAMPLE, "--per-worker-batch", "2"]
        + ["--world-size", "64"],
        capture_output=True,
        text=True,
        env=environment,
        check=False,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stderr
    lines = completed.stdout.splitlines()
    assert "per-worker batch 2, world 64 ranks" in lines[0]
    assert lines[1].split()[:3] == ["layer", "original", "chosen"]
    assert lines[3].split()[:4] == ["stem.1", "BatchNorm2d", "sync_bn", "16"]
    assert len(lines) == 3 + 6  # the example has six BatchNorms


def test_table_with_layout_pretrained_and_input_shape(capsys) -> None:
    out = run(
        capsys,
        EXAMPLE,
        "--per-worker-batch",
        "1",  # 8 samples in the largest group: under the floor, so BGN over the 8 ranks
        "--world-size",
        "8",
        "--ranks-per-node",
        "8",
        "--input-shape",
        "1,8,8",
    )
    assert "8 per node" in out and "from scratch" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines()[3:]}
    # 16 channels: G=8 groups of 2 channels x 8x8 positions x 8 ranks' samples
    assert rows["stem.1"][2:6] == ["bgn", "(G=8)", "8", "1024"]
    assert rows["stage2.bn1"][2:6] == ["bgn", "(G=16)", "8", "256"]  # 32 channels at 4x4
    pretrained = run(
        capsys, EXAMPLE, "--per-worker-batch", "2", "--world-size", "8", "--pretrained"
    )
    assert pretrained.count("frozen_bn") == 6 and "fine-tuning" in pretrained


def test_json_output_is_a_plan(capsys, tmp_path: Path) -> None:
    policy = tmp_path / "p.yaml"
    policy.write_text("target_batch: 16\n")
    out = run(
        capsys,
        EXAMPLE,
        "--per-worker-batch",
        "4",
        "--world-size",
        "8",
        "--policy",
        str(policy),
        "--json",
    )
    plan = Plan.from_json(out)
    assert (plan.policy, plan.target_batch, plan.sync_group_sizes) == ("p", 16, (4,))
    assert len(plan.layers) == sum(
        isinstance(m, torch.nn.BatchNorm2d) for m in small_resnet().modules()
    )


def test_batch_from_a_deepspeed_config(capsys, tmp_path: Path) -> None:
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"train_micro_batch_size_per_gpu": 64}))
    out = run(capsys, EXAMPLE, "--per-worker-batch", str(config), "--policy", "default")
    assert "per-worker batch 64, world 1 rank" in out and out.count(" bn ") == 6


def test_model_without_normalization_prints_an_empty_plan(capsys, caplog) -> None:
    out = run(capsys, "torch.nn:Identity", "--per-worker-batch", "2")
    assert out.splitlines()[-1] == "no normalization layers"
    assert "Identity has no normalization layers" in caplog.text


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["torch.nn.Identity", "--per-worker-batch", "2"], "must be package.module:factory"),
        (["no_such_package:f", "--per-worker-batch", "2"], "cannot import 'no_such_package'"),
        (["distnorm.examples:big_resnet", "--per-worker-batch", "2"], "has no attribute"),
        (["torch.nn:Linear", "--per-worker-batch", "2"], "with no arguments failed"),
        (["torch:float32", "--per-worker-batch", "2"], "is not callable"),
        ([EXAMPLE, "--per-worker-batch", "2", "--policy", "nope"], "no policy named 'nope'"),
        ([EXAMPLE, "--per-worker-batch", "nope.json"], "cannot read config 'nope.json'"),
    ],
)
def test_refused_requests_exit_with_a_message(capsys, args, message) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["plan", *args])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "args",
    [
        [EXAMPLE, "--per-worker-batch", "0"],
        [EXAMPLE, "--per-worker-batch", "2", "--world-size", "0"],
        [EXAMPLE, "--per-worker-batch", "2", "--input-shape", "3,x"],
        [EXAMPLE],
    ],
)
def test_bad_arguments_are_usage_errors(capsys, args) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["plan", *args])
    assert exit_.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_norms_lists_the_registry(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["norms"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["norm=", "label", "layer"]
    rows = {line.split()[0]: line for line in lines[2:]}
    assert list(rows) == list(distnorm.NORMS)
    assert rows["sync_bn"].split()[2:6] == ["SyncBatchNorm", "yes", "-", "yes"]
    assert "when accumulating" in rows["sync_bn"]
    assert rows["bgn"].split()[:3] == ["bgn", "BGN+WS", "BatchGroupNorm"]
