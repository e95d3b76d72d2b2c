"""Gradient accumulation in the policy, the plan, convert_model and the CLI: where no sync
group reaches the target but g ranks x batch x k micro-batches do, the plan pools a
SyncBatchNorm's statistics over the optimizer step; k is read from DeepSpeed/Accelerate
configs, kept in plans (old plans without it still load) and applied by convert_model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import distnorm
from distnorm.__main__ import main
from distnorm.examples import small_resnet
from distnorm.policy import LayerPlan, Plan, PolicyError, load_policy
from distnorm.policy.batch_config import accumulation_steps_from_config
from distnorm.policy.facts import NormFact
from distnorm.policy.rules import make_plan

DEFAULT = load_policy("default")
EXAMPLE = "distnorm.examples:small_resnet"


pytestmark = pytest.mark.usefixtures("no_launcher_environment")


def bn_fact(name: str = "layer1.0.bn1") -> NormFact:
    """A BatchNorm2d of 64 channels over 8x8 feature maps (64 values per sample)."""
    return NormFact(
        name=name,
        type_name="BatchNorm2d",
        type_names=("BatchNorm2d", "_BatchNorm", "_NormBase", "Module", "object"),
        is_batch_norm=True,
        num_channels=64,
        track_running_stats=True,
        input_shape=(1, 64, 8, 8),
        sample_batch=1,
    )


def decide(batch: int, world: int, steps: int, **kwargs) -> tuple[Plan, LayerPlan]:
    kwargs.setdefault("policy", DEFAULT)
    kwargs.setdefault("ranks_per_node", 8)
    plan = make_plan(
        [bn_fact()],
        per_worker_batch_size=batch,
        world_size=world,
        accumulation_steps=steps,
        **kwargs,
    )
    return plan, plan.layers[0]


# (batch, world, k) -> (sync group, k) chosen by accumulation, with 8 ranks per node and
# the target of 32: the largest allowed group g, if g x batch x k >= 32.
@pytest.mark.parametrize(
    ("batch", "world", "steps", "group"),
    [
        (2, 8, 4, 8),  # 8x2x4 = 64: the whole world (a node), though 4 ranks would reach 32
        (2, 8, 2, 8),  # 8x2x2 = 32
        (4, 2, 4, 2),  # 2x4x4 = 32
        (2, 4, 16, 4),  # the worker alone would reach 32 too; the group's window is larger
        (1, 2, 32, 2),
        (4, 4, 3, 4),  # 4x4x3 = 48
    ],
)
def test_accumulation_pools_over_the_largest_allowed_group(
    batch: int, world: int, steps: int, group: int
) -> None:
    plan, layer = decide(batch, world, steps)
    assert (layer.norm, layer.sync_group_size, layer.accumulation_steps) == (
        "sync_bn",
        group,
        steps,
    )
    assert layer.values_per_statistic == group * batch * steps * 64
    assert plan.accumulation_steps == steps
    rank_word = "rank" if group == 1 else "ranks"
    assert layer.reason.startswith(
        f"{group} {rank_word} x {batch} x {steps} micro-batches = {group * batch * steps} >= 32"
    )
    assert layer.reason.endswith("statistics pooled over the optimizer step, + WS")


def test_the_worker_alone_accumulates_in_a_world_of_one() -> None:
    plan, layer = decide(2, 1, 16, ranks_per_node=None)
    assert (layer.norm, layer.sync_group_size, layer.accumulation_steps) == ("sync_bn", 1, 16)
    assert plan.sync_group_sizes == (1,)
    assert "sync_bn (k=16)" in str(plan)
    assert "per-worker batch 2 x 16 micro-batches per optimizer step" in plan.summary()


@pytest.mark.parametrize(
    ("batch", "world", "steps"),
    [
        (2, 2, 4),  # at most 2x2x4 = 16 < 32
        (1, 8, 2),  # at most 8x1x2 = 16 < 32
        (2, 1, 8),  # the worker alone: 16 < 32
    ],
)
def test_accumulation_short_of_the_target_changes_nothing(
    batch: int, world: int, steps: int
) -> None:
    _, without = decide(batch, world, 1)
    _, layer = decide(batch, world, steps)
    assert layer.accumulation_steps == 1
    assert layer == without  # the decision without accumulation, reason and all


@pytest.mark.parametrize(
    ("batch", "world", "norm", "group"),
    [
        (32, 1, "bn", None),  # the per-worker batch reaches the target
        (64, 8, "bn", None),
        (2, 16, "sync_bn", 16),  # a sync group reaches it: 16 x 2 = 32
        (8, 8, "sync_bn", 4),
    ],
)
def test_accumulation_is_ignored_where_the_batch_or_a_group_reaches_the_target(
    batch: int, world: int, norm: str, group: int | None
) -> None:
    plan, layer = decide(batch, world, 8)
    assert (layer.norm, layer.sync_group_size, layer.accumulation_steps) == (norm, group, 1)
    assert "micro-batches" not in layer.reason and "(k=" not in str(plan)
    assert plan.accumulation_steps == 8  # the input is recorded all the same


def test_a_forced_sync_bn_keeps_per_micro_batch_statistics() -> None:
    policy = load_policy({"overrides": {"by_name": {"layer1.*": "sync_bn"}}})
    _, layer = decide(2, 2, 16, policy=policy)
    assert (layer.norm, layer.accumulation_steps) == ("sync_bn", 1)
    assert layer.reason.startswith("overrides.by_name")


def test_fine_tuning_accumulates_rather_than_freezing() -> None:
    _, frozen = decide(2, 2, 1, pretrained=True)
    _, layer = decide(2, 2, 8, pretrained=True)
    assert frozen.norm == "frozen_bn"
    assert (layer.norm, layer.sync_group_size, layer.accumulation_steps) == ("sync_bn", 2, 8)


@pytest.mark.parametrize("steps", [0, -1, True, 2.0, "4"])
def test_accumulation_steps_must_be_a_positive_integer(steps) -> None:
    with pytest.raises(PolicyError, match="accumulation_steps must be a positive integer"):
        decide(2, 2, steps)
    with pytest.raises(PolicyError, match="accumulation_steps must be a positive integer"):
        distnorm.plan(small_resnet(), 2, 2, accumulation_steps=steps)


def test_plans_with_accumulation_round_trip_through_json() -> None:
    plan = distnorm.plan(small_resnet(), 2, 2, accumulation_steps=8)
    assert {(lp.norm, lp.accumulation_steps) for lp in plan.layers} == {("sync_bn", 8)}
    data = json.loads(plan.to_json())
    assert data["accumulation_steps"] == 8
    assert all(layer["accumulation_steps"] == 8 for layer in data["layers"])
    assert Plan.from_json(plan.to_json()) == plan


def test_old_plans_without_accumulation_steps_still_load() -> None:
    plan = distnorm.plan(small_resnet(), 2, 8)
    data = plan.to_dict()
    del data["accumulation_steps"]
    for layer in data["layers"]:
        del layer["accumulation_steps"]
    old = Plan.from_json(json.dumps(data))
    assert old == plan and old.accumulation_steps == 1
    assert all(lp.accumulation_steps == 1 for lp in old.layers)


def test_bad_accumulation_in_plans_is_refused_naming_the_layer() -> None:
    with pytest.raises(PolicyError, match=r"BatchNorm2d 'bn'.*only sync_bn pools"):
        LayerPlan("bn", "BatchNorm2d", "gn_ws", num_groups=8, accumulation_steps=4)
    with pytest.raises(PolicyError, match=r"BatchNorm2d 'bn'.*norm 'bn'"):
        LayerPlan("bn", "BatchNorm2d", "bn", accumulation_steps=2)
    with pytest.raises(PolicyError, match=r"'\(root\)'.*positive integer, got 0"):
        LayerPlan("", "BatchNorm2d", "sync_bn", sync_group_size=2, accumulation_steps=0)
    layer = LayerPlan("bn", "BatchNorm2d", "sync_bn", sync_group_size=2, accumulation_steps=4)
    with pytest.raises(
        PolicyError, match="'bn': accumulation_steps 4, but the plan was made for 2"
    ):
        Plan((layer,), world_size=2, per_worker_batch_size=2, accumulation_steps=2)
    data = distnorm.plan(small_resnet(), 2, 2, accumulation_steps=8).to_dict()
    data["layers"][0]["accumulation_steps"] = "8"
    with pytest.raises(PolicyError, match=r"layers\[0\] key 'accumulation_steps' must be int"):
        Plan.from_dict(data)
    data["layers"][0]["accumulation_steps"] = 8
    data["accumulation_steps"] = True
    with pytest.raises(PolicyError, match="plan key 'accumulation_steps' must be int"):
        Plan.from_dict(data)


def test_accumulation_is_read_from_a_deepspeed_config(tmp_path: Path) -> None:
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 16}
    plan = distnorm.plan(small_resnet(), config, 1)
    assert (plan.per_worker_batch_size, plan.accumulation_steps) == (2, 16)
    assert {(lp.sync_group_size, lp.accumulation_steps) for lp in plan.layers} == {(1, 16)}
    # DeepSpeed's identity: train_batch_size = micro x steps x world
    derived = {"train_batch_size": 64, "train_micro_batch_size_per_gpu": 2}
    assert accumulation_steps_from_config(derived, world_size=4) == 8
    assert distnorm.plan(small_resnet(), derived, 4).accumulation_steps == 8
    assert accumulation_steps_from_config({"train_micro_batch_size_per_gpu": 2}) == 1
    file = tmp_path / "ds.json"
    file.write_text(json.dumps(config))
    assert distnorm.plan(small_resnet(), file, 1).accumulation_steps == 16
    with pytest.raises(PolicyError, match="'gradient_accumulation_steps' is 'auto'"):
        distnorm.plan(small_resnet(), {**config, "gradient_accumulation_steps": "auto"}, 1)
    with pytest.raises(PolicyError, match="gradient_accumulation_steps must be a positive"):
        accumulation_steps_from_config({"gradient_accumulation_steps": 0})


def test_an_int_batch_reads_no_config_and_defaults_to_one() -> None:
    plan = distnorm.plan(small_resnet(), 2, 1)
    assert plan.accumulation_steps == 1
    assert {lp.norm for lp in plan.layers} == {"bgn"}  # 2 samples: the fallback, no k


def test_accumulation_is_read_from_an_accelerate_config(tmp_path: Path) -> None:
    (tmp_path / "ds.json").write_text('{"train_micro_batch_size_per_gpu": 2}')
    accelerate = tmp_path / "accelerate.yaml"
    head = "compute_environment: LOCAL_MACHINE\ndistributed_type: DEEPSPEED\n"
    accelerate.write_text(
        head + "deepspeed_config:\n"
        "  deepspeed_config_file: ds.json\n"
        "  gradient_accumulation_steps: 4\n"
        "num_processes: 4\n"
    )
    plan = distnorm.plan(small_resnet(), accelerate, 4, ranks_per_node=4)
    assert (plan.per_worker_batch_size, plan.accumulation_steps) == (2, 4)
    assert {(lp.sync_group_size, lp.accumulation_steps) for lp in plan.layers} == {(4, 4)}
    accelerate.write_text(
        head + "gradient_accumulation_steps: 8\n"
        "deepspeed_config:\n"
        "  deepspeed_config_file: ds.json\n"
    )
    assert distnorm.plan(small_resnet(), accelerate, 4).accumulation_steps == 8
    # The DeepSpeed file it names states the steps too, and disagrees.
    (tmp_path / "ds.json").write_text(
        '{"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2}'
    )
    with pytest.raises(PolicyError, match=r"disagree: .*accumulation_steps' is 8, .* is 2"):
        distnorm.plan(small_resnet(), accelerate, 4)
    plain = tmp_path / "plain.yaml"
    plain.write_text("distributed_type: MULTI_GPU\nnum_processes: 8\n")
    assert accumulation_steps_from_config(plain) == 1  # stated nowhere: the default


def test_an_explicit_value_contradicting_the_config_is_refused() -> None:
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 16}
    with pytest.raises(
        PolicyError,
        match="accumulation_steps=4 contradicts the config: .*gradient_accumulation_steps' is 16",
    ):
        distnorm.plan(small_resnet(), config, 1, accumulation_steps=4)
    assert distnorm.plan(small_resnet(), config, 1, accumulation_steps=16).accumulation_steps == 16
    # A config that leaves the steps to later, or states none, defers to the argument.
    auto = {**config, "gradient_accumulation_steps": "auto"}
    assert distnorm.plan(small_resnet(), auto, 1, accumulation_steps=4).accumulation_steps == 4
    silent = {"train_micro_batch_size_per_gpu": 2}
    assert distnorm.plan(small_resnet(), silent, 1, accumulation_steps=4).accumulation_steps == 4


def test_forced_sync_bn_accumulates_over_k_and_revert_drops_it() -> None:
    model = distnorm.convert_model(small_resnet(), norm="sync_bn", accumulation_steps=4)
    layers = [m for m in model.modules() if isinstance(m, distnorm.SyncBatchNorm)]
    assert len(layers) == 6 and all(m.accumulation_steps == 4 for m in layers)
    report = str(distnorm.conversion_report(model))
    assert report.count("SyncBatchNorm2d (k=4)") == 6
    model(torch.randn(2, 1, 8, 8))  # a training micro-batch runs
    reverted = distnorm.revert_model(model)
    norms = [m for m in reverted.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 6 and all(type(m) is nn.BatchNorm2d for m in norms)
    assert not any("accumulation_steps" in vars(m) for m in reverted.modules())
    plain = distnorm.convert_model(small_resnet(), norm="sync_bn")
    assert all(
        m.accumulation_steps == 1 for m in plain.modules() if isinstance(m, distnorm.SyncBatchNorm)
    )
    assert "(k=" not in str(distnorm.conversion_report(plain))


@pytest.mark.parametrize("norm", ["gn_ws", "bgn", "bcn", "bn", "frozen_bn"])
def test_accumulation_with_another_forced_norm_is_refused(norm: str) -> None:
    with pytest.raises(distnorm.ConversionError, match=rf"norm='{norm}'.*only sync_bn pools"):
        distnorm.convert_model(small_resnet(), norm=norm, accumulation_steps=4)
    distnorm.convert_model(small_resnet(), norm=norm, accumulation_steps=1)  # no accumulation


def test_convert_model_plans_with_accumulation() -> None:
    model = distnorm.convert_model(small_resnet(), per_worker_batch_size=2, accumulation_steps=16)
    layers = [m for m in model.modules() if isinstance(m, distnorm.SyncBatchNorm)]
    assert len(layers) == 6 and all(m.accumulation_steps == 16 for m in layers)
    plan = distnorm.plan(small_resnet(), 2, accumulation_steps=16)
    replayed = distnorm.convert_model(small_resnet(), plan=plan)
    assert all(
        m.accumulation_steps == 16
        for m in replayed.modules()
        if isinstance(m, distnorm.SyncBatchNorm)
    )
    with pytest.raises(
        distnorm.ConversionError, match="accumulation_steps=8 with a plan made for 16"
    ):
        distnorm.convert_model(small_resnet(), plan=plan, accumulation_steps=8)


def test_converting_again_with_other_accumulation_is_refused() -> None:
    model = distnorm.convert_model(small_resnet(), norm="sync_bn", accumulation_steps=4)
    assert distnorm.convert_model(model, norm="sync_bn", accumulation_steps=4) is model
    with pytest.raises(distnorm.ConversionError, match="accumulation_steps=4; call distnorm"):
        distnorm.convert_model(model, norm="sync_bn")


def test_the_cli_plans_with_accumulation(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(["plan", EXAMPLE, "--per-worker-batch", "2", "--world-size", "2"]
             + ["--accumulation-steps", "8", "--input-shape", "1,8,8"])
        == 0
    )  # fmt: skip
    lines = capsys.readouterr().out.splitlines()
    assert "per-worker batch 2 x 8 micro-batches per optimizer step, world 2 ranks" in lines[0]
    assert lines[3].split()[:5] == ["stem.1", "BatchNorm2d", "sync_bn", "(k=8)", "2"]
    assert "2 ranks x 2 x 8 micro-batches = 32 >= 32" in lines[3]
    argv = ["plan", EXAMPLE, "--per-worker-batch", "2", "--accumulation-steps", "16", "--json"]
    assert main(argv) == 0
    plan = Plan.from_json(capsys.readouterr().out)
    assert plan.accumulation_steps == 16 and plan.layers[0].accumulation_steps == 16
    with pytest.raises(SystemExit):
        main(["plan", EXAMPLE, "--per-worker-batch", "2", "--accumulation-steps", "0"])
    assert "expected a positive integer, got '0'" in capsys.readouterr().err


def test_accumulating_sync_bn_pairs_with_weight_standardization() -> None:
    """By default the convolutions feeding an accumulating SyncBatchNorm are standardized
    (as BGN's are: the accuracy study's evidence), those of a plain one not; False and
    standardize_weights() follow the same pairing."""

    def standardized(model: torch.nn.Module) -> int:
        return sum(isinstance(m, distnorm.WSConv2d) for m in model.modules())

    assert standardized(distnorm.convert_model(small_resnet(), norm="sync_bn")) == 0
    accumulating = distnorm.convert_model(small_resnet(), norm="sync_bn", accumulation_steps=4)
    assert standardized(accumulating) == 6  # every convolution: each feeds a norm
    planned = distnorm.convert_model(small_resnet(), per_worker_batch_size=2, accumulation_steps=16)
    assert standardized(planned) == 6
    plain = distnorm.convert_model(
        small_resnet(), norm="sync_bn", accumulation_steps=4, weight_standardization=False
    )
    assert standardized(plain) == 0
    assert standardized(distnorm.standardize_weights(plain)) == 6
