"""Copies of a converted model whose plan made sync groups: ``copy.deepcopy`` (what
``torch.optim.swa_utils.AveragedModel`` and timm's EMA do), ``pickle`` and ``torch.save``
work, and a copy in the same process shares the groups. An EMA model built so, its
statistics recomputed with ``update_bn``, holds each group's pooled statistics: identical
on the group's ranks, equal to a float64 reference. 4 real gloo processes, groups of 2.
"""

from __future__ import annotations

import copy
import io
import os
import pickle
from typing import Any

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, update_bn

import distnorm
from distnorm import comm
from tests.multiprocess import run_on_ranks

WORLD_SIZE = 4
GROUP = 2  # the plan's sync group at 16 samples per worker in a world of 4 (target 32)
BATCHES = 3


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.BatchNorm2d(3),  # first, so that a reference needs only the data
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    )  # fmt: skip


def batch(rank: int, index: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(100 * rank + index)
    return torch.randn(3 + rank % 2, 3, 5, 5, generator=generator) * (1 + rank) + rank


def copies_worker(rank: int, world_size: int) -> dict[str, Any]:
    model = distnorm.convert_model(net(), per_worker_batch_size=16, check_sync=True)
    group = model[0].process_group
    assert comm.describe_group(group) == f"{GROUP} of {WORLD_SIZE} ranks"

    ema = AveragedModel(model)  # a deep copy
    saved = io.BytesIO()
    torch.save(model, saved)
    saved.seek(0)
    copies = [ema.module, pickle.loads(pickle.dumps(model)), torch.load(saved, weights_only=False)]
    shares = [c[0].process_group is group and c[2].process_group is group for c in copies]

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for index in range(2):
        optimizer.zero_grad()
        model(batch(rank, index)).square().mean().backward()
        optimizer.step()
        ema.update_parameters(model)
    update_bn([batch(rank, 10 + k) for k in range(BATCHES)], ema)

    # A copy made in another process (as after torch.save and a new job) joins its sync
    # group at its first training call: the same group object, the same statistics.
    moved = copy.deepcopy(model[0])
    moved.process_group = comm.PortableGroup(tuple(comm.dist.get_process_group_ranks(group)),
                                             pid=os.getpid() + 1, key=0)  # fmt: skip
    x = batch(rank, 20)
    joined_output = moved.train()(x)
    expected_output = copy.deepcopy(model[0]).train()(x)
    return {
        "shares": shares,
        "joined_same_group": moved.process_group is group,
        "joined_output_matches": torch.equal(joined_output, expected_output),
        "ema_stats": [
            (m.running_mean.clone(), m.running_var.clone())
            for m in ema.module.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)
        ],
    }


def test_copies_share_groups_and_ema_update_bn_pools_each_group() -> None:
    results = run_on_ranks(copies_worker, WORLD_SIZE, timeout_s=240)
    for result in results:
        assert result["shares"] == [True, True, True]
        assert result["joined_same_group"] and result["joined_output_matches"]

    for start in range(0, WORLD_SIZE, GROUP):
        members = range(start, start + GROUP)
        first = results[start]["ema_stats"]
        for rank in members:  # identical within the group, bit for bit
            for (mean, var), (mean0, var0) in zip(results[rank]["ema_stats"], first, strict=True):
                assert torch.equal(mean, mean0) and torch.equal(var, var0)
        # The input BatchNorm: the average over update_bn's batches of the group's pooled
        # batch statistics (momentum None: a cumulative average), in float64.
        means, variances = [], []
        for k in range(BATCHES):
            pooled = torch.cat([batch(rank, 10 + k) for rank in members]).double()
            pooled = pooled.transpose(0, 1).reshape(3, -1)
            means.append(pooled.mean(dim=1))
            variances.append(pooled.var(dim=1, unbiased=True))
        mean, var = first[0]
        torch.testing.assert_close(mean.double(), torch.stack(means).mean(0), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(var.double(), torch.stack(variances).mean(0), rtol=1e-5, atol=0)
    other = results[GROUP]["ema_stats"][0][0]
    assert not torch.allclose(results[0]["ema_stats"][0][0], other)  # groups are apart


def test_a_layer_unpickled_with_a_foreign_group_says_what_to_do(tmp_path) -> None:
    layer = distnorm.SyncBatchNorm(4)
    layer.process_group = comm.PortableGroup((1, 2), pid=os.getpid() + 1, key=0)
    store = f"file://{tmp_path / 'store'}"
    comm.dist.init_process_group("gloo", init_method=store, rank=0, world_size=1)
    try:
        with pytest.raises(distnorm.DistNormError, match="not a distnorm sync group; give it"):
            layer.train()(torch.randn(2, 4))
    finally:
        comm.dist.destroy_process_group()
