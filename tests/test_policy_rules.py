"""The policy's decisions, as tables: per-worker batch x world size x pretrained/scratch,
then the special cases (no spatial extent, ungroupable channels, backbone vs head,
overrides) and the impossible requests that must be refused with the key or layer named.

Pure functions of facts: no model is run here except where facts are collected on purpose.
"""

from __future__ import annotations

import dataclasses

import pytest

from distnorm.policy import PolicyError, load_policy
from distnorm.policy.facts import NormFact
from distnorm.policy.rules import make_plan, sync_group_candidates, unused_overrides

DEFAULT = load_policy("default")
BATCHES = (1, 2, 4, 8, 16, 32, 64)
WORLDS = (1, 2, 8, 64)

# Expected decision for a BatchNorm2d over a feature map, target 32 samples, floor 16, 8
# ranks per node: "bn" local, "sync N" SyncBN over N ranks, "fallback" GN+WS from scratch
# or FrozenBN when fine-tuning, "floor N" the largest allowed group (N = 1: local BN) from
# scratch, since it reaches 16 samples, and FrozenBN when fine-tuning. Derived by hand: the
# smallest group g with g * B >= 32 that divides the world and lies inside a node (g | 8)
# or spans whole nodes (8 | g); else the largest such g when g * B >= 16.
#            world:  1           2           8           64
EXPECTED = {
    1: ("fallback", "fallback", "fallback", "sync 32"),
    2: ("fallback", "fallback", "floor 8", "sync 16"),
    4: ("fallback", "fallback", "sync 8", "sync 8"),
    8: ("fallback", "floor 2", "sync 4", "sync 4"),
    16: ("floor 1", "sync 2", "sync 2", "sync 2"),
    32: ("bn", "bn", "bn", "bn"),
    64: ("bn", "bn", "bn", "bn"),
}


def without_floor(policy):
    """``policy`` with the sync floor at the target: the fallback rules alone."""
    return dataclasses.replace(policy, min_sync_batch=policy.target_batch)


# The default policy with GroupNorm + WS as its fallback (``gn_ws``, no communication).
GN_FALLBACK = dataclasses.replace(DEFAULT, scratch_fallback="gn_ws")


def bn_fact(
    name: str = "layer1.0.bn1",
    channels: int = 64,
    shape: tuple[int, ...] | None = (1, 64, 8, 8),
    type_names: tuple[str, ...] = ("BatchNorm2d", "_BatchNorm", "_NormBase", "Module", "object"),
    track_running_stats: bool = True,
) -> NormFact:
    return NormFact(
        name=name,
        type_name=type_names[0],
        type_names=type_names,
        is_batch_norm=True,
        num_channels=channels,
        track_running_stats=track_running_stats,
        input_shape=shape,
        sample_batch=None if shape is None else shape[0],
    )


def decide(fact: NormFact, batch: int, world: int, **kwargs):
    kwargs.setdefault("policy", DEFAULT)
    kwargs.setdefault("ranks_per_node", 8)
    plan = make_plan([fact], per_worker_batch_size=batch, world_size=world, **kwargs)
    return plan.layers[0]


@pytest.mark.parametrize("pretrained", [False, True], ids=["scratch", "pretrained"])
@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("batch", BATCHES)
def test_default_decisions(batch: int, world: int, pretrained: bool) -> None:
    expected = EXPECTED[batch][WORLDS.index(world)]
    layer = decide(bn_fact(), batch, world, pretrained=pretrained)
    if expected.startswith("floor"):
        group = int(expected.split()[1])
        if pretrained:
            expected = "fallback"  # the backbone stays frozen: the floor is for training
        else:
            assert 16 <= group * batch < 32 and "floor 16" in layer.reason
            expected = "bn" if group == 1 else f"sync {group}"
    if expected == "bn":
        assert (layer.norm, layer.sync_group_size) == ("bn", None)
        assert layer.values_per_statistic == batch * 64  # batch x 8x8 positions
    elif expected.startswith("sync"):
        group = int(expected.split()[1])
        assert (layer.norm, layer.sync_group_size) == ("sync_bn", group)
        assert layer.values_per_statistic == group * batch * 64
        assert group * batch >= 16 and world % group == 0
    elif pretrained:
        assert (layer.norm, layer.sync_group_size, layer.num_groups) == ("frozen_bn", None, None)
        assert layer.values_per_statistic is None  # frozen: no batch statistics
    else:  # BGN+WS over the largest allowed group (here: the world, up to a node of 8)
        group = None if world == 1 else min(world, 8)
        assert (layer.norm, layer.num_groups, layer.sync_group_size) == ("bgn", 32, group)
        # C/G = 2 channels x 64 positions x the group's samples
        assert layer.values_per_statistic == 2 * 64 * batch * (group or 1)
    assert layer.reason


@pytest.mark.parametrize(
    ("world", "per_node", "cross_node", "max_size", "expected"),
    [
        (64, 8, True, None, (2, 4, 8, 16, 32, 64)),
        (64, 8, False, None, (2, 4, 8)),
        (64, 8, True, 16, (2, 4, 8, 16)),
        (24, 8, True, None, (2, 4, 8, 24)),  # 12 and 6 would split a node's ranks
        (12, 8, True, None, (2, 3, 4, 6, 12)),  # nodes do not tile 12: any divisor
        (12, 6, True, None, (2, 3, 6, 12)),
        (8, None, True, None, (2, 4, 8)),  # layout unknown: no node constraint
        (2, 8, False, None, (2,)),  # a world smaller than a node is inside it
        (1, 8, True, None, ()),
    ],
)
def test_sync_group_candidates(world, per_node, cross_node, max_size, expected) -> None:
    got = sync_group_candidates(world, per_node, cross_node=cross_node, max_group_size=max_size)
    assert got == expected


def test_group_is_node_aligned_even_when_a_smaller_divisor_reaches_the_target() -> None:
    # 12 ranks, 6 per node, batch 4: 8 ranks would do, but 8 does not divide 12; 6 (one
    # node) gives 24 < 32, so the group is the whole world of 2 nodes.
    layer = decide(bn_fact(), 4, 12, ranks_per_node=6)
    assert (layer.norm, layer.sync_group_size) == ("sync_bn", 12)
    assert "2 nodes" in layer.reason


def test_cross_node_disabled_and_capped_groups_fall_back() -> None:
    in_node = without_floor(
        load_policy({"sync": {"cross_node": False}, "scratch_fallback": "gn_ws"})
    )
    assert decide(bn_fact(), 2, 64, policy=in_node).norm == "gn_ws"
    assert decide(bn_fact(), 4, 64, policy=in_node).sync_group_size == 8
    capped = without_floor(
        load_policy({"sync": {"max_group_size": 4}, "scratch_fallback": "gn_ws"})
    )
    assert decide(bn_fact(), 4, 64, policy=capped).norm == "gn_ws"
    no_sync = without_floor(load_policy({"sync": {"enabled": False}, "scratch_fallback": "gn_ws"}))
    layer = decide(bn_fact(), 16, 64, policy=no_sync)
    assert layer.norm == "gn_ws" and "sync disabled" in layer.reason


def test_a_group_reaching_the_floor_synchronizes_when_none_reaches_the_target() -> None:
    """Wu & He's Fig. 1: BN at 16 images per worker is within 0.1 point of BN at 32 and
    ahead of GN; at 8 GN is ahead. So below the target, BatchNorm over the largest allowed
    group still wins while it sees 16 samples; fine-tuned backbones stay frozen."""
    layer = decide(bn_fact(), 8, 2)
    assert (layer.norm, layer.sync_group_size, layer.values_per_statistic) == (
        "sync_bn",
        2,
        16 * 64,
    )
    assert layer.reason == "at most 2 ranks x 8 = 16 < 32; >= floor 16: largest group, 1 node"
    assert decide(bn_fact(), 4, 2).norm == "bgn"  # 8 samples: under the floor
    local = decide(bn_fact(), 16, 1)
    assert (local.norm, local.sync_group_size) == ("bn", None) and "floor 16" in local.reason
    assert decide(bn_fact(), 8, 2, pretrained=True).norm == "frozen_bn"
    in_node = load_policy({"sync": {"cross_node": False}})
    assert decide(bn_fact(), 2, 64, policy=in_node).sync_group_size == 8  # 2 x 8 = 16
    lower = load_policy({"min_sync_batch": 8})
    assert decide(bn_fact(), 4, 2, policy=lower).sync_group_size == 2


def test_target_batch_is_a_knob() -> None:
    policy = load_policy({"target_batch": 16})
    assert decide(bn_fact(), 16, 8, policy=policy).norm == "bn"
    assert decide(bn_fact(), 4, 8, policy=policy).sync_group_size == 4


def test_squeeze_excitation_and_pooled_layers_take_the_largest_group() -> None:
    # (N, C, 1, 1): at batch 2, local BN sees 2 values and GN would see C/G of one sample.
    se = bn_fact(name="se.bn", shape=(2, 64, 1, 1))
    no_floor = without_floor(GN_FALLBACK)
    layer = decide(se, 2, 8, policy=no_floor)
    assert (layer.norm, layer.sync_group_size, layer.values_per_statistic) == ("sync_bn", 8, 16)
    assert "no spatial extent" in layer.reason
    alone = decide(se, 2, 1)
    assert (alone.norm, alone.values_per_statistic) == ("bn", 2)
    pooled = bn_fact(
        name="head.bn", channels=10, shape=(2, 10), type_names=("BatchNorm1d", "_BatchNorm")
    )
    assert decide(pooled, 2, 2).sync_group_size == 2
    # Without a sample input a BatchNorm1d is assumed to see (N, C); a BatchNorm2d is not.
    unknown_1d = bn_fact(channels=10, shape=None, type_names=("BatchNorm1d", "_BatchNorm"))
    assert decide(unknown_1d, 2, 8).norm == "sync_bn"
    unknown_2d = decide(bn_fact(shape=None), 2, 8, policy=no_floor)
    assert (unknown_2d.norm, unknown_2d.values_per_statistic) == ("gn_ws", None)


def test_channels_that_cannot_be_grouped_take_the_largest_group() -> None:
    no_floor = without_floor(GN_FALLBACK)
    layer = decide(bn_fact(channels=3, shape=(1, 3, 8, 8)), 2, 8, policy=no_floor)
    assert (layer.norm, layer.sync_group_size) == ("sync_bn", 8)
    assert "3 channels cannot be grouped" in layer.reason
    grouped = decide(bn_fact(channels=48, shape=(1, 48, 4, 4)), 2, 8, policy=no_floor)
    assert grouped.num_groups == 24


def test_video_models_folding_time_into_the_batch() -> None:
    # A sample of 2 clips whose BN input is (2 clips x 4 frames, C, 4, 4): each clip
    # brings 64 values per channel.
    fact = dataclasses.replace(bn_fact(shape=(8, 64, 4, 4)), sample_batch=2)
    assert decide(fact, 32, 1).values_per_statistic == 32 * 4 * 16


@pytest.mark.parametrize(
    ("fallback", "values"),
    [("gn_ws", 2 * 64), ("bcn", 2 * 64), ("bgn", 2 * 64 * 2)],
)
def test_scratch_fallbacks(fallback: str, values: int) -> None:
    policy = load_policy({"scratch_fallback": fallback})
    layer = decide(bn_fact(), 2, 1, policy=policy)
    assert (layer.norm, layer.num_groups, layer.values_per_statistic) == (fallback, 32, values)


def test_scratch_fallback_bn_or_sync_bn() -> None:
    local = without_floor(load_policy({"scratch_fallback": "bn"}))
    assert decide(bn_fact(), 2, 8, policy=local).norm == "bn"
    layer = decide(bn_fact(), 2, 8, policy=load_policy({"scratch_fallback": "sync_bn"}))
    assert (layer.norm, layer.sync_group_size) == ("sync_bn", 8)


def test_fine_tuning_freezes_the_backbone_and_trains_the_head_from_scratch() -> None:
    policy = without_floor(load_policy("fine-tune-detection"))
    facts = [
        bn_fact("backbone.body.layer1.0.bn1"),
        bn_fact("backbone.bottom_up.res2.0.conv1.norm"),
        bn_fact("roi_heads.box_head.bn"),
        bn_fact("backbone.fpn.bn", track_running_stats=False),
    ]
    plan = make_plan(facts, per_worker_batch_size=2, world_size=8, ranks_per_node=8, policy=policy)
    assert [lp.norm for lp in plan.layers] == ["frozen_bn", "frozen_bn", "gn_ws", "gn_ws"]
    assert plan.pretrained and "fine-tuning head" in plan.layers[2].reason
    assert "no running stats" in plan.layers[3].reason
    # A sync group that reaches the target is preferred even when fine-tuning.
    synced = make_plan(facts, per_worker_batch_size=4, world_size=8, policy=policy)
    assert {lp.norm for lp in synced.layers} == {"sync_bn"}
    # pretrained=False overrides the policy's setting.
    scratch = make_plan(
        facts, per_worker_batch_size=2, world_size=8, policy=policy, pretrained=False
    )
    assert {lp.norm for lp in scratch.layers} == {"gn_ws"}


def test_micro_batch_policy_syncs_inside_a_node_else_bcn() -> None:
    policy = without_floor(load_policy("micro-batch-from-scratch"))
    layer = decide(bn_fact(), 2, 64, policy=policy)
    # BCN's estimates are pooled over the largest in-node group (a forward all-reduce).
    assert (layer.norm, layer.sync_group_size, layer.num_groups) == ("bcn", 8, 32)
    assert decide(bn_fact(), 4, 64, policy=policy).sync_group_size == 8
    assert decide(bn_fact(), 4, 64, policy=policy).norm == "sync_bn"
    assert decide(bn_fact(), 2, 1, policy=policy).sync_group_size is None


def test_other_normalizations_are_kept_and_listed() -> None:
    def other(type_names: tuple[str, ...], is_batch_norm: bool = False) -> NormFact:
        return NormFact("x", type_names[0], type_names, is_batch_norm, 8, True)

    cases = {
        ("LayerNorm", "Module"): "per-sample",
        ("RMSNorm", "Module"): "per-sample",
        ("GroupNorm", "Module"): "per-sample",
        ("InstanceNorm2d", "_InstanceNorm", "_NormBase"): "per-sample",
        ("FrozenBatchNorm2d", "Module"): "already frozen",
        ("PixelNorm", "Module"): "not a BatchNorm",
    }
    everything = load_policy({"overrides": {"by_name": {"*": "sync_bn"}}})
    for type_names, reason in cases.items():
        layer = decide(other(type_names), 2, 8, policy=everything)
        assert (layer.norm, layer.original) == ("keep", type_names[0])
        assert reason in layer.reason
    # distnorm's own BatchNorm subclasses are a decision already made.
    for type_names, reason in [
        (("FrozenBatchNorm", "_BatchNorm"), "already frozen"),
        (
            ("BatchChannelNorm", "SyncBatchNorm", "_BatchNorm"),
            "already distnorm's BatchChannelNorm",
        ),
        (("BatchGroupNorm", "SyncBatchNorm", "_BatchNorm"), "already distnorm's BatchGroupNorm"),
    ]:
        layer = decide(other(type_names, is_batch_norm=True), 2, 8)
        assert layer.norm == "keep" and reason in layer.reason
    synced = other(("SyncBatchNorm", "_BatchNorm"), is_batch_norm=True)
    assert decide(synced, 1, 8).norm == "bgn"  # a SyncBatchNorm is planned like any BN


def test_overrides_by_name_win_over_by_type() -> None:
    policy = load_policy(
        {
            "overrides": {
                "by_name": {"head.*": {"norm": "gn_ws", "num_groups": 16}, "stem.*": "keep"},
                "by_type": {"BatchNorm2d": {"norm": "sync_bn", "sync_group_size": 4}},
            }
        }
    )
    facts = [bn_fact("head.bn"), bn_fact("stem.bn"), bn_fact("body.bn")]
    plan = make_plan(facts, per_worker_batch_size=64, world_size=8, policy=policy)
    head, stem, body = plan.layers
    assert (head.norm, head.num_groups, head.values_per_statistic) == ("gn_ws", 16, 4 * 64)
    assert (stem.norm, body.norm, body.sync_group_size) == ("keep", "sync_bn", 4)
    assert "overrides.by_name['head.*']" in head.reason
    assert "overrides.by_type['BatchNorm2d']" in body.reason
    assert plan.sync_group_sizes == (4,)


def test_forced_sync_bn_chooses_its_group_and_forced_bcn_may_sync() -> None:
    policy = load_policy({"overrides": {"by_type": {"BatchNorm2d": "sync_bn"}}})
    assert decide(bn_fact(), 2, 8, policy=policy).sync_group_size == 8  # largest: none reaches
    assert decide(bn_fact(), 8, 64, policy=policy).sync_group_size == 4  # smallest reaching
    assert decide(bn_fact(), 64, 1, policy=policy).sync_group_size == 1  # the world
    bcn = load_policy({"overrides": {"by_name": {"*": {"norm": "bcn", "sync_group_size": 2}}}})
    layer = decide(bn_fact(), 2, 8, policy=bcn)
    assert (layer.norm, layer.sync_group_size, layer.num_groups) == ("bcn", 2, 32)


@pytest.mark.parametrize(
    ("override", "world", "message"),
    [
        ({"norm": "sync_bn", "sync_group_size": 16}, 8, "larger than the world (8 ranks)"),
        ({"norm": "sync_bn", "sync_group_size": 3}, 8, "does not divide the world size 8"),
        ({"norm": "sync_bn", "sync_group_size": 1}, 8, "use norm 'bn'"),
        ({"norm": "gn_ws", "num_groups": 5}, 8, "num_groups 5 does not divide the layer's 64"),
    ],
)
def test_impossible_overrides_are_refused_naming_the_layer(override, world, message) -> None:
    policy = load_policy({"overrides": {"by_name": {"layer1.*": override}}})
    with pytest.raises(PolicyError, match="layer1.0.bn1") as error:
        decide(bn_fact(), 2, world, policy=policy)
    assert message in str(error.value)
    assert "overrides.by_name['layer1.*']" in str(error.value)


def test_forced_norms_that_cannot_apply_are_refused() -> None:
    frozen = load_policy({"overrides": {"by_name": {"*": "frozen_bn"}}})
    with pytest.raises(PolicyError, match="track_running_stats=False"):
        decide(bn_fact(track_running_stats=False), 2, 8, policy=frozen)
    grouped = load_policy({"overrides": {"by_name": {"*": "gn_ws"}}})
    with pytest.raises(PolicyError, match="37 channels"):
        decide(bn_fact(channels=37, shape=(1, 37, 4, 4)), 2, 8, policy=grouped)
    with pytest.raises(PolicyError, match="channel count is unknown"):
        decide(bn_fact(channels=None, shape=None), 2, 8, policy=grouped)


def test_unused_overrides_are_reported() -> None:
    policy = load_policy(
        {"overrides": {"by_name": {"bakbone.*": "keep"}, "by_type": {"BatchNorm3d": "bn"}}}
    )
    assert unused_overrides([bn_fact("backbone.bn")], policy) == (
        "overrides.by_name['bakbone.*']",
        "overrides.by_type['BatchNorm3d']",
    )


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"per_worker_batch_size": 0, "world_size": 8}, "per_worker_batch_size"),
        ({"per_worker_batch_size": 2, "world_size": 0}, "world_size"),
        ({"per_worker_batch_size": 2, "world_size": 8, "ranks_per_node": 0}, "ranks_per_node"),
        ({"per_worker_batch_size": 2.5, "world_size": 8}, "per_worker_batch_size"),
    ],
)
def test_invalid_sizes_are_refused(kwargs, key) -> None:
    with pytest.raises(PolicyError, match=key):
        make_plan([bn_fact()], policy=DEFAULT, **kwargs)


def test_a_plan_without_layers_is_empty() -> None:
    plan = make_plan([], per_worker_batch_size=2, world_size=8, policy=DEFAULT)
    assert plan.layers == () and plan.sync_group_sizes == ()
    assert "no normalization layers" in str(plan)
