"""Plans as data (table, JSON round trip, validation), the model facts they are made from
(traced input shapes, with the model left exactly as it was), ``distnorm.policy.plan`` end
to end, and the per-worker batch read from DeepSpeed / Accelerate configs."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import pytest
import torch
from torch import nn

from distnorm.policy import (
    LayerPlan,
    Plan,
    PolicyError,
    per_worker_batch_size_from_config,
    plan,
)
from distnorm.policy.facts import collect_facts, is_normalization

pytestmark = pytest.mark.usefixtures("no_launcher_environment")


class SqueezeExcite(nn.Module):
    """Hu et al.'s SE block, with a BatchNorm on the squeezed (N, C, 1, 1) tensor."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.fc = nn.Conv2d(channels, channels, 1)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.bn(self.fc(x.mean(dim=(2, 3), keepdim=True))))


class Net(nn.Module):
    """Feature-map BN, SE BN, pooled BN1d, a LayerNorm, and a BN used twice."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.BatchNorm2d(64))
        self.se = SqueezeExcite(64)
        self.shared = nn.BatchNorm2d(64)
        self.head = nn.Sequential(nn.Linear(64, 16), nn.BatchNorm1d(16), nn.LayerNorm(16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.se(self.stem(x))
        x = self.shared(x)
        x = self.shared(nn.functional.avg_pool2d(x, 2))  # second call: 4x4 instead of 8x8
        return self.head(x.mean(dim=(2, 3)))


def sample_plan() -> Plan:
    layers = (
        LayerPlan("", "BatchNorm2d", "sync_bn", 8, None, 512, "root", 4),
        LayerPlan("a", "BatchNorm2d", "gn_ws", None, 32, 128, "gn", 64),
        LayerPlan("b", "BatchNorm2d", "bcn", 2, 16, 64, "bcn", 64),
        LayerPlan("c", "BatchNorm2d", "sync_bn", 2, None, None, "small"),
        LayerPlan("d", "BatchNorm1d", "frozen_bn", reason="frozen"),
        LayerPlan("e", "LayerNorm", "keep", reason="kept"),
        LayerPlan("f", "BatchNorm2d", "bn", values_per_statistic=64, reason="local"),
        LayerPlan("g", "BatchNorm2d", "bgn", None, 4, 8, "bgn", 8),
    )
    return Plan(layers, world_size=8, per_worker_batch_size=2, ranks_per_node=8)


def test_plan_round_trips_through_json() -> None:
    original = sample_plan()
    text = original.to_json()
    assert Plan.from_json(text) == original
    assert json.loads(text)["format"] == 1
    assert Plan.from_dict(json.loads(original.to_json(indent=None))) == original
    assert original.sync_group_sizes == (2, 8)
    assert original.layer("b").num_groups == 16
    with pytest.raises(KeyError):
        original.layer("z")


def test_plan_prints_as_a_table() -> None:
    text = str(sample_plan())
    lines = text.splitlines()
    assert "per-worker batch 2, world 8 ranks, 8 per node" in lines[0]
    assert lines[1].split() == ["layer", "original", "chosen", "group", "values/stat", "reason"]
    assert lines[3].split() == ["(root)", "BatchNorm2d", "sync_bn", "8", "512", "root"]
    assert lines[4].split() == ["a", "BatchNorm2d", "gn_ws", "(G=32)", "-", "128", "gn"]
    assert lines[6].split() == ["c", "BatchNorm2d", "sync_bn", "2", "?", "small"]
    assert len(lines) == 3 + len(sample_plan().layers)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.update(format=2), "plan format 2 is not supported"),
        (lambda d: d.update(extra=1), "unknown key(s) 'extra'"),
        (lambda d: d["layers"][0].update(group=1), "plan layers[0] has unknown key(s) 'group'"),
        (lambda d: d["layers"][1].update(norm="ln"), "norm 'ln' is not one of"),
        (lambda d: d["layers"][1].update(num_groups="32"), "'num_groups' must be int or null"),
        (lambda d: d["layers"][1].update(num_groups=None), "num_groups is required"),
        (lambda d: d["layers"][4].update(sync_group_size=2), "takes no sync_group_size"),
        (lambda d: d["layers"][3].update(sync_group_size=None), "sync_bn needs a sync_group_size"),
        (lambda d: d.update(world_size=True), "'world_size' must be int"),
        (lambda d: d.update(pretrained="no"), "'pretrained' must be bool"),
        (lambda d: d.pop("world_size"), "incomplete plan"),
        (lambda d: d.update(layers={}), "'layers' must be a list"),
    ],
)
def test_bad_plans_are_refused(edit, message) -> None:
    data = sample_plan().to_dict()
    edit(data)
    with pytest.raises(PolicyError) as error:
        Plan.from_dict(data)
    assert message in str(error.value)


def test_plan_from_json_refuses_non_json() -> None:
    with pytest.raises(PolicyError, match="must be JSON"):
        Plan.from_json("{layers: []")
    with pytest.raises(PolicyError, match="must be a JSON object"):
        Plan.from_json("[]")


def test_facts_measure_what_each_layer_sees() -> None:
    facts = {f.name: f for f in collect_facts(Net(), torch.zeros(2, 3, 8, 8))}
    assert list(facts) == ["stem.1", "se.bn", "shared", "head.1", "head.2"]
    assert facts["stem.1"].input_shape == (2, 64, 8, 8)
    assert facts["stem.1"].values_per_sample == 64
    assert facts["se.bn"].spatial_size == 1 and facts["se.bn"].values_per_sample == 1
    assert facts["shared"].input_shape == (2, 64, 4, 4)  # the smaller of its two calls
    assert facts["head.1"].input_shape == (2, 16) and facts["head.1"].num_channels == 16
    assert facts["head.2"].is_batch_norm is False and facts["head.2"].type_name == "LayerNorm"
    assert (
        "BatchNorm2d" in facts["stem.1"].type_names and "_BatchNorm" in facts["stem.1"].type_names
    )
    untraced = collect_facts(Net())
    assert all(f.input_shape is None and f.values_per_sample is None for f in untraced)


def test_tracing_leaves_the_model_as_it_was() -> None:
    model = Net()
    model.head.eval()  # mixed modes must come back as they were, module by module
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_()
    before = copy.deepcopy(model.state_dict())
    modes = [m.training for m in model.modules()]
    collect_facts(model, (torch.randn(2, 3, 8, 8),))
    assert [m.training for m in model.modules()] == modes
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # num_batches_tracked too
    assert not any(m._forward_pre_hooks for m in model.modules())
    assert all(p.grad is None for p in model.parameters())


def test_tracing_accepts_dicts_and_lazy_modules_and_reports_failures() -> None:
    class Keyword(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.LazyBatchNorm2d()

        def forward(self, *, image: torch.Tensor) -> torch.Tensor:
            return self.bn(image)

    model = Keyword()
    assert collect_facts(model)[0].num_channels is None
    (fact,) = collect_facts(model, {"image": torch.zeros(1, 5, 2, 2)})
    assert (fact.num_channels, fact.values_per_sample) == (5, 4)
    with pytest.raises(PolicyError, match="running the sample input through Net failed"):
        collect_facts(Net(), torch.zeros(1, 4, 8, 8))
    with pytest.raises(PolicyError, match="no tensor with a batch dimension"):
        collect_facts(Net(), ("not a tensor",))


def test_what_counts_as_normalization() -> None:
    class FrozenBatchNorm2d(nn.Module):  # torchvision's shape: no _BatchNorm base
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    class NormMlpHead(nn.Module):  # a container with "Norm" in its name
        def __init__(self) -> None:
            super().__init__()
            self.norm = nn.LayerNorm(4)

    assert is_normalization(FrozenBatchNorm2d())
    assert not is_normalization(NormMlpHead()) and is_normalization(NormMlpHead().norm)
    for module in (nn.RMSNorm(4), nn.InstanceNorm2d(4), nn.GroupNorm(2, 4), nn.SyncBatchNorm(4)):
        assert is_normalization(module)
    assert not is_normalization(nn.Conv2d(1, 1, 1))


def test_plan_end_to_end_with_a_sample_input() -> None:
    model = Net()
    kinds = [type(m) for m in model.modules()]
    # 1 image per worker on 8 ranks: no group reaches the floor of 16 samples; with
    # GroupNorm + WS as the fallback.
    result = plan(
        model, 1, 8, ranks_per_node=8, sample_input=torch.zeros(1, 3, 8, 8),
        policy={"scratch_fallback": "gn_ws"},
    )  # fmt: skip
    assert [type(m) for m in model.modules()] == kinds  # planning changes nothing
    decisions = {
        lp.name: (lp.norm, lp.sync_group_size, lp.values_per_statistic) for lp in result.layers
    }
    assert decisions == {
        "stem.1": ("gn_ws", None, 2 * 64),  # C/G = 2 channels x 8x8 positions
        "se.bn": ("sync_bn", 8, 8),  # 1 value locally; the largest group: 8 x 1
        "shared": ("gn_ws", None, 2 * 16),
        "head.1": ("sync_bn", 8, 8),
        "head.2": ("keep", None, None),
    }
    assert result.world_size == 8 and result.per_worker_batch_size == 1


def test_plan_is_logged_and_warns_about_empty_models_and_unused_overrides(caplog) -> None:
    caplog.set_level(logging.INFO, logger="distnorm")
    empty = plan(nn.Sequential(nn.Linear(2, 2), nn.ReLU()), 2, 4)
    assert empty.layers == () and empty.sync_group_sizes == ()
    assert "Sequential has no normalization layers" in caplog.text
    caplog.clear()
    plan(Net(), 64, 1, policy={"overrides": {"by_name": {"stme.*": "keep"}}})
    assert "overrides.by_name['stme.*'] matches no BatchNorm layer" in caplog.text
    assert "stem.1" in caplog.text and "world layout from arguments" in caplog.text


def test_plan_warns_when_a_statistic_would_see_one_value(caplog) -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    plan(model, 1, 1, sample_input=torch.zeros(1, 4))
    assert "from 1 value" in caplog.text


def test_world_layout_comes_from_the_launcher_environment(monkeypatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "16")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    result = plan(Net(), 4)
    assert (result.world_size, result.ranks_per_node) == (16, 8)
    assert result.layer("stem.1").sync_group_size == 8
    assert plan(Net(), 4, 2).world_size == 2  # explicit arguments win


def test_plan_reads_the_batch_from_a_deepspeed_config(tmp_path: Path) -> None:
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"train_batch_size": 64, "gradient_accumulation_steps": 2}))
    result = plan(Net(), config, 8)
    assert result.per_worker_batch_size == 4
    with pytest.raises(PolicyError, match="must be an int, or a DeepSpeed"):
        plan(Net(), 2.0, 8)


def test_per_worker_batch_from_deepspeed_configs(tmp_path: Path) -> None:
    assert per_worker_batch_size_from_config({"train_micro_batch_size_per_gpu": 3}) == 3
    derived = {"train_batch_size": 96, "gradient_accumulation_steps": 4}
    assert per_worker_batch_size_from_config(derived, world_size=8) == 3
    assert per_worker_batch_size_from_config({"train_batch_size": 16}, world_size=8) == 2
    yaml_file = tmp_path / "ds.yaml"
    yaml_file.write_text("train_micro_batch_size_per_gpu: 5\n")
    assert per_worker_batch_size_from_config(yaml_file) == 5
    for config, world, message in [
        ({"train_micro_batch_size_per_gpu": "auto"}, None, "is 'auto'"),
        ({"train_micro_batch_size_per_gpu": 0}, None, "must be a positive integer, got 0"),
        ({"train_batch_size": 96}, None, "pass world_size"),
        ({"train_batch_size": 100, "gradient_accumulation_steps": 3}, 8, "not divisible"),
        ({"train_batch_size": 64, "gradient_accumulation_steps": "auto"}, 8, "is 'auto'"),
        ({"optimizer": {}}, None, "neither train_micro_batch_size_per_gpu nor train_batch_size"),
        (tmp_path / "missing.json", None, "cannot read config"),
    ]:
        with pytest.raises(PolicyError, match=message):
            per_worker_batch_size_from_config(config, world_size=world)


def test_per_worker_batch_from_an_accelerate_config(tmp_path: Path) -> None:
    (tmp_path / "ds_config.json").write_text('{"train_micro_batch_size_per_gpu": 2}')
    accelerate = tmp_path / "accelerate.yaml"
    accelerate.write_text(
        "compute_environment: LOCAL_MACHINE\n"
        "distributed_type: DEEPSPEED\n"
        "deepspeed_config:\n"
        "  deepspeed_config_file: ds_config.json\n"  # relative to the YAML's folder
        "  zero3_init_flag: false\n"
        "num_processes: 8\n"
    )
    assert per_worker_batch_size_from_config(accelerate) == 2
    plain = tmp_path / "plain.yaml"
    plain.write_text("distributed_type: MULTI_GPU\nnum_processes: 8\n")
    with pytest.raises(PolicyError, match="Accelerate takes the batch size from your DataLoader"):
        per_worker_batch_size_from_config(plain)
    plain.write_text("distributed_type: DEEPSPEED\ndeepspeed_config: {zero_stage: 2}\n")
    with pytest.raises(PolicyError, match="Accelerate takes the batch size from your DataLoader"):
        per_worker_batch_size_from_config(plain)
