"""convert_model applying the policy engine's plan: in one process, and on 4 real gloo
processes where the plan forms sync groups of 2 whose statistics are each group's own."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import distnorm
from distnorm import comm
from distnorm.examples import small_resnet
from tests.multiprocess import run_on_ranks


def test_one_process_at_batch_two_trains_from_scratch_with_bgn_and_ws() -> None:
    model = distnorm.convert_model(small_resnet(), per_worker_batch_size=2)
    norms = [m for m in model.modules() if isinstance(m, (nn.GroupNorm, _BatchNorm))]
    assert norms and all(type(m) is distnorm.BatchGroupNorm for m in norms)
    assert distnorm.conversion_report(model).standardized_convs


def test_the_group_norm_fallback_trains_from_scratch_with_gn_ws() -> None:
    model = distnorm.convert_model(
        small_resnet(), per_worker_batch_size=2, policy={"scratch_fallback": "gn_ws"}
    )
    norms = [m for m in model.modules() if isinstance(m, (nn.GroupNorm, nn.BatchNorm2d))]
    assert norms and all(type(m) is distnorm.layers.GroupNorm for m in norms)
    assert distnorm.conversion_report(model).standardized_convs


def test_large_per_worker_batch_keeps_local_batchnorm() -> None:
    model = small_resnet()
    before = {n: type(m) for n, m in model.named_modules()}
    converted = distnorm.convert_model(model, per_worker_batch_size=64)
    assert {n: type(m) for n, m in converted.named_modules()} == before


def test_fine_tuning_freezes_the_backbone() -> None:
    model = distnorm.convert_model(small_resnet(), per_worker_batch_size=1, pretrained=True)
    assert {type(m) for m in model.modules()} & {distnorm.FrozenBatchNorm2d}
    assert not any(type(m) is nn.BatchNorm2d for m in model.modules())


def test_a_replayed_plan_converts_the_same_way() -> None:
    plan = distnorm.plan(small_resnet(), per_worker_batch_size=2)
    replayed = distnorm.Plan.from_json(plan.to_json())
    first = distnorm.convert_model(small_resnet(), plan=plan)
    second = distnorm.convert_model(small_resnet(), plan=replayed)
    assert [type(m) for m in first.modules()] == [type(m) for m in second.modules()]


def test_plan_for_another_world_or_model_is_refused() -> None:
    plan = distnorm.plan(small_resnet(), per_worker_batch_size=2, world_size=64)
    with pytest.raises(distnorm.ConversionError, match="world of 64 ranks but this job has 1"):
        distnorm.convert_model(small_resnet(), plan=plan)
    other = distnorm.plan(nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8)), 2)
    with pytest.raises(distnorm.ConversionError, match="no entry in the plan"):
        distnorm.convert_model(small_resnet(), plan=other)


def test_norm_and_plan_together_or_stray_options_are_refused() -> None:
    with pytest.raises(distnorm.ConversionError, match="both norm= and"):
        distnorm.convert_model(small_resnet(), per_worker_batch_size=2, norm="gn_ws")
    with pytest.raises(distnorm.ConversionError, match="without per_worker_batch_size"):
        distnorm.convert_model(small_resnet(), pretrained=True)


def test_local_group_communicates_nothing() -> None:
    layer = distnorm.BatchChannelNorm(8, num_groups=4, process_group=comm.LOCAL)
    assert comm.group_size(comm.LOCAL) == 1 and comm.describe_group(comm.LOCAL) == "this rank only"
    layer(torch.randn(2, 8, 3, 3))  # trains on its own rank's statistics
    assert copy.deepcopy(comm.LOCAL) is comm.LOCAL
    assert pickle.loads(pickle.dumps(comm.LOCAL)) is comm.LOCAL


# --- 4 ranks, per-worker batch 16, target 32: the plan syncs pairs of ranks ------------

PER_WORKER = 16


def rank_batch(rank: int) -> torch.Tensor:
    """Each rank's batch; the two pairs of ranks see clearly different distributions."""
    generator = torch.Generator().manual_seed(100 + rank)
    offset = 0.0 if rank < 2 else 3.0
    return torch.randn(PER_WORKER, 1, 8, 8, generator=generator, dtype=torch.float64) + offset


def planned_worker(rank: int, world_size: int) -> dict:
    torch.manual_seed(0)
    model = distnorm.convert_model(small_resnet().double(), per_worker_batch_size=PER_WORKER)
    plan = distnorm.plan(small_resnet(), per_worker_batch_size=PER_WORKER)
    model.train()
    model(rank_batch(rank)).sum().backward()
    return {
        "sizes": {
            n: comm.group_size(m.process_group)
            for n, m in model.named_modules()
            if isinstance(m, distnorm.SyncBatchNorm)
        },  # fmt: skip
        "plan_group_sizes": plan.sync_group_sizes,
        "stem_mean": model.stem[1].running_mean.clone(),
        "stem_var": model.stem[1].running_var.clone(),
    }


def test_plan_on_four_ranks_syncs_pairs_with_each_pairs_statistics() -> None:
    results = run_on_ranks(planned_worker, 4)
    assert all(r["plan_group_sizes"] == (2,) for r in results)
    assert all(set(r["sizes"].values()) == {2} and r["sizes"] for r in results)

    torch.manual_seed(0)
    stem = small_resnet().double().stem  # the same initial weights as on every rank
    for pair in ((0, 1), (2, 3)):
        x = torch.cat([rank_batch(r) for r in pair])
        features = stem[0](x).detach()
        batch_mean = features.mean(dim=(0, 2, 3))
        batch_var = features.var(dim=(0, 2, 3), unbiased=True)
        expected_mean = 0.9 * torch.zeros_like(batch_mean) + 0.1 * batch_mean
        expected_var = 0.9 * torch.ones_like(batch_var) + 0.1 * batch_var
        for r in pair:
            torch.testing.assert_close(results[r]["stem_mean"], expected_mean, rtol=0, atol=1e-10)
            torch.testing.assert_close(results[r]["stem_var"], expected_var, rtol=0, atol=1e-10)
    assert not torch.allclose(results[0]["stem_mean"], results[2]["stem_mean"])


def test_reference_pairs_differ_from_the_world_batch() -> None:
    """The check above could not pass with world-wide statistics: they differ from each
    pair's by far more than its tolerance."""
    torch.manual_seed(0)
    stem = small_resnet().double().stem
    world = stem[0](torch.cat([rank_batch(r) for r in range(4)])).detach().mean(dim=(0, 2, 3))
    pair = stem[0](torch.cat([rank_batch(r) for r in (0, 1)])).detach().mean(dim=(0, 2, 3))
    assert (world - pair).abs().max() > 1e-3


def test_a_base_process_group_with_a_plan_is_refused() -> None:
    with pytest.raises(distnorm.ConversionError, match="cannot honour a base group"):
        distnorm.convert_model(small_resnet(), per_worker_batch_size=2, process_group=comm.LOCAL)
