"""distnorm.lightning: the DistNormSync plugin under a real Lightning Trainer.

The end-to-end test runs ``tests/lightning_job.py`` as a script, since
``Trainer(strategy="ddp", accelerator="cpu", devices=2)`` launches its second rank by
re-running the script (Lightning's own launcher), which it cannot do from inside pytest.
The job's ranks record the layers' classes and running statistics; the assertions are here.
The rest runs in this process, without a process group: revert, the option checks, the
callback's checks, and that both Lightning packages' Trainers take the plugin.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import distnorm
from distnorm.examples import small_resnet

lightning = pytest.importorskip("lightning")
from distnorm.lightning import DistNormSync  # noqa: E402  (after the skip)

REPO = Path(__file__).resolve().parents[1]
LAUNCHER_VARIABLES = (
    "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "NODE_RANK", "GROUP_RANK",
    "MASTER_ADDR", "MASTER_PORT", "PL_GLOBAL_SEED", "SLURM_NTASKS", "SLURM_JOB_NAME",
    "OMPI_COMM_WORLD_SIZE", "PMI_SIZE",
)  # fmt: skip


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """Both ranks' records of the four fits in tests/lightning_job.py."""
    out = tmp_path_factory.mktemp("lightning")
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "tests.lightning_job", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    seconds = time.perf_counter() - started
    assert result.returncode == 0, (
        f"job failed after {seconds:.0f} s:\n{result.stdout}\n{result.stderr}"
    )
    return [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in (0, 1)]


def test_two_ranks_joined(job: list[dict[str, Any]]) -> None:
    for rank, record in enumerate(job):
        for fit in record.values():
            assert (fit["rank"], fit["world_size"]) == (rank, 2)


def test_planned_conversion_synchronizes_running_statistics(job: list[dict[str, Any]]) -> None:
    """per_worker_batch_size=8 on 2 ranks: every BatchNorm a SyncBatchNorm over the world
    while training, running statistics identical on both ranks and moved by training."""
    for record in job:
        fit = record["planned"]
        norms = {n: c for n, c in fit["classes_in_training"].items() if "Conv" not in c}
        assert len(norms) == 6 and set(norms.values()) == {"distnorm.SyncBatchNorm"}
        assert "world (2 ranks)" in fit["report"]
        assert (fit["start_step"], fit["end_step"]) == (0, 3)
    assert_same_on_both_ranks(job, "planned")
    for name, start in job[0]["planned"]["start_stats"].items():
        assert not torch.equal(start, job[0]["planned"]["end_stats"][name]), name


def test_local_batchnorm_drifts_apart(job: list[dict[str, Any]]) -> None:
    """The control (norm="bn": nothing converted): the same job's statistics differ between
    ranks, so the equality above is the synchronization's doing, not DDP's buffer broadcast."""
    fit = job[0]["control"]
    assert set(fit["classes_in_training"].values()) == {"torch.BatchNorm2d", "torch.Conv2d"}
    stats = [record["control"]["end_stats"] for record in job]
    assert all(not torch.equal(stats[0][name], stats[1][name]) for name in stats[0])


def test_resume_of_batch_group_norm_checkpoint(job: list[dict[str, Any]]) -> None:
    """per_worker_batch_size=2: the plan's Batch Group Norm + WS, whose checkpoint the plain
    model cannot load; as a callback too, the plugin converts before Lightning restores it,
    and training resumes at step 3 from the saved running statistics."""
    for record in job:
        first, resumed = record["first"], record["resumed"]
        for fit in (first, resumed):
            classes = list(fit["classes_in_training"].values())
            assert classes.count("distnorm.BatchGroupNorm") == 6
            assert classes.count("distnorm.WSConv2d") == 6  # every conv feeds one
            assert "world (2 ranks)" in fit["report"]
        assert (first["end_step"], resumed["start_step"], resumed["end_step"]) == (3, 3, 6)
        for name, value in first["end_stats"].items():
            assert not torch.equal(first["start_stats"][name], value), name  # trained
            assert torch.equal(resumed["start_stats"][name], value), name  # restored
    assert_same_on_both_ranks(job, "first")
    assert_same_on_both_ranks(job, "resumed")


def test_lightning_reverts_when_fit_ends(job: list[dict[str, Any]]) -> None:
    for record in job:
        for fit in record.values():
            assert set(fit["classes_after_fit"].values()) == {"torch.BatchNorm2d", "torch.Conv2d"}


def assert_same_on_both_ranks(job: list[dict[str, Any]], fit: str) -> None:
    ours, theirs = (record[fit]["end_stats"] for record in job)
    assert ours.keys() == theirs.keys() and ours
    for name, value in ours.items():
        assert torch.equal(value, theirs[name]), name


# In this process, no process group: a world of 1.


@pytest.mark.parametrize("norm", ["sync_bn", "frozen_bn", "gn_ws", "bgn", "bcn"])
def test_revert_gives_torch_modules_with_the_same_outputs(norm: str) -> None:
    torch.manual_seed(0)
    model = small_resnet(width=8)
    model(torch.randn(4, 1, 8, 8))  # running statistics away from their initial values
    sync = DistNormSync(norm=norm)
    converted = sync.apply(model).eval()
    assert distnorm.conversion_report(converted).converted
    inputs = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        expected = converted(inputs)
        reverted = sync.revert(converted)
        leftovers = [
            m for m in reverted.modules() if type(m).__module__.startswith("distnorm.layers")
        ]
        assert not leftovers
        torch.testing.assert_close(reverted(inputs), expected)
    if norm in ("sync_bn", "frozen_bn"):
        norms = {type(m) for m in reverted.modules() if "BatchNorm" in type(m).__name__}
        assert norms == {nn.BatchNorm2d}


def test_planned_apply_in_one_process() -> None:
    model = DistNormSync(per_worker_batch_size=64).apply(small_resnet())
    assert {row.converted for row in distnorm.conversion_report(model).rows} == {"BatchNorm2d"}
    model = DistNormSync(per_worker_batch_size=2).apply(small_resnet())
    assert "BatchGroupNorm" in {row.converted for row in distnorm.conversion_report(model).rows}


@pytest.mark.parametrize(
    ("kwargs", "error", "says"),
    [
        ({"per_worker_batch_size": 2, "norm": "gn_ws"}, distnorm.ConversionError, "both norm="),
        ({"norm": "layer_norm"}, distnorm.ConversionError, "unknown normalization"),
        ({"norm": "sync_bn", "pretrained": True}, distnorm.ConversionError, "planning options"),
        ({"per_worker_batch_size": 2, "policy": "no-such-policy"}, distnorm.PolicyError, "no-"),
        ({"plan": "plan.json"}, distnorm.ConversionError, "distnorm.Plan"),
    ],
)
def test_contradictory_options_fail_at_construction(
    kwargs: dict[str, Any], error: type[Exception], says: str
) -> None:
    with pytest.raises(error, match=says):
        DistNormSync(**kwargs)


class Late(nn.Module):
    """A module whose BatchNorm is built after Callback.setup (LightningModule.setup style)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3))


def test_callback_refuses_layers_built_after_its_setup() -> None:
    sync = DistNormSync(norm="sync_bn")
    early = small_resnet()
    sync.setup(None, early, "fit")  # as Lightning calls the callback
    assert any(isinstance(m, distnorm.SyncBatchNorm) for m in early.modules())
    early.extra = nn.BatchNorm2d(4)
    with pytest.raises(distnorm.ConversionError, match=r"\['extra'\] appeared afterwards"):
        sync.apply(early)

    late = Late()
    sync.setup(None, late, "fit")  # nothing to convert yet: left to apply
    late.body.append(nn.BatchNorm2d(4))
    assert isinstance(sync.apply(late).body[1], distnorm.SyncBatchNorm)


def test_callback_conversion_is_reverted_once() -> None:
    sync = DistNormSync(norm="sync_bn")
    model = small_resnet()
    sync.setup(None, model, "fit")
    assert sync.apply(model) is model  # converted at setup: apply finds it done
    sync.revert(model)  # the strategy's revert
    sync.teardown(None, model, "fit")  # the callback's teardown: nothing left to do
    assert {type(m) for m in model.modules() if "BatchNorm" in type(m).__name__} == {nn.BatchNorm2d}
    other = small_resnet()  # under a strategy that never reverts, the callback does
    sync.setup(None, other, "fit")
    sync.teardown(None, other, "fit")
    assert not any(isinstance(m, distnorm.SyncBatchNorm) for m in other.modules())


def test_survives_pickling_for_ddp_spawn() -> None:
    sync = DistNormSync(per_worker_batch_size=4, policy="default")
    sync.setup(None, small_resnet(), "fit")
    copy = pickle.loads(pickle.dumps(sync))
    assert (copy.per_worker_batch_size, copy.options) == (4, {"policy": "default"})
    assert repr(copy) == "DistNormSync(per_worker_batch_size=4, policy='default')"


@pytest.mark.parametrize("package", ["lightning.pytorch", "pytorch_lightning"])
def test_trainers_take_the_plugin(package: str) -> None:
    """The accelerator connector accepts it as a LayerSync and hands it to the DDP strategy,
    which then knows 2 processes per node (the plan's ranks per node)."""
    pl = pytest.importorskip(package)
    sync = DistNormSync(per_worker_batch_size=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = pl.Trainer(
            strategy="ddp", accelerator="cpu", devices=2, plugins=[sync], callbacks=[sync],
            logger=False, enable_checkpointing=False, enable_progress_bar=False,
        )  # fmt: skip
    assert trainer.strategy._layer_sync is sync
    assert sync in trainer.callbacks
    module = pl.LightningModule()
    module.trainer = trainer
    from distnorm.lightning import _processes_per_node

    assert _processes_per_node(module) == 2


def test_without_lightning_the_import_error_says_what_to_install() -> None:
    """Run where neither Lightning package can be imported; distnorm itself still imports
    (and never imports Lightning)."""
    code = (
        "import sys\n"
        "sys.modules['lightning'] = sys.modules['pytorch_lightning'] = None\n"
        "import distnorm\n"
        "try:\n"
        "    import distnorm.lightning\n"
        "except ImportError as error:\n"
        "    print(error)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "pip install distnorm[lightning]" in result.stdout


def test_importing_distnorm_does_not_import_lightning() -> None:
    code = (
        "import sys, distnorm; print(sorted({'lightning', 'pytorch_lightning'} & set(sys.modules)))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.stdout.strip() == "[]", result.stderr
