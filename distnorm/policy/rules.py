"""The decision rules: per-worker batch, world layout and model facts in, a Plan out.

Pure functions: no process groups, no environment, no modules; the same inputs always
give the same plan, which is what lets a plan be tested as a table and replayed. Per
BatchNorm, the first rule that applies (the sources of each: ``docs/policy.md``):

1. per-worker batch >= target (32 samples; Wu & He 2018, Fig. 1): local BatchNorm;
2. else SyncBatchNorm over the smallest allowed group reaching the target (consecutive
   ranks dividing the world, inside a node when they fit; Peng et al. 2018, MegDet);
3. else, with k > 1 accumulated micro-batches, SyncBatchNorm over the largest allowed
   group g (the worker alone when none) if g x batch x k >= target, pooling its statistics
   over the group's last k micro-batches (``accumulation_steps``), with WS;
4. else SyncBatchNorm over the largest allowed group if it reaches the floor (16 samples),
   training from scratch or outside a fine-tuned backbone;
5. else, from scratch (or in a fine-tuned model's new head): the policy's fallback, by
   default Batch Group Norm + WS over the largest allowed group (Zhou et al. 2020), or
   GroupNorm + WS, or BCN + WS (Qiao et al. 2019), with G from ``choose_num_groups``;
6. else (fine-tuning, in the backbone): FrozenBatchNorm, as detectron2 does;
7. layers without spatial extent, with channels that cannot be grouped, or with a forward
   of their own take the largest allowed sync group instead of a grouped norm; LayerNorm,
   GroupNorm, RMSNorm, InstanceNorm and unknown norms are left alone and listed.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Sequence
from dataclasses import dataclass

from distnorm.errors import InputError, PolicyError
from distnorm.layers.group_norm import choose_num_groups
from distnorm.norms import NORMS
from distnorm.policy.config import Override, Policy
from distnorm.policy.facts import NormFact
from distnorm.policy.plans import GROUPED_NORMS, SYNCABLE_NORMS, LayerPlan, Plan

# distnorm's grouped layers carry their grouping, a decision already made: planning a
# converted model again leaves them alone (SyncBatchNorm is planned like any BatchNorm).
_DISTNORM_NORMS = tuple(
    norm.layer.__name__ for norm in NORMS.values() if norm.grouped and norm.layer is not None
)


def sync_group_candidates(
    world_size: int,
    ranks_per_node: int | None = None,
    *,
    max_group_size: int | None = None,
    cross_node: bool = True,
) -> tuple[int, ...]:
    """Sync group sizes the policy may use, ascending: divisors g >= 2 of the world size
    (consecutive-rank groups tile it) that either fit in a node (g divides the ranks per
    node, so every group lies inside one) or, when ``cross_node``, consist of whole nodes.
    Without ``ranks_per_node``, or with nodes that do not tile the world evenly, any
    divisor counts as allowed across nodes."""
    per_node = world_size if ranks_per_node is None else min(ranks_per_node, world_size)
    inside = math.gcd(world_size, per_node)  # the largest size that stays inside a node
    regular = world_size % per_node == 0
    sizes = []
    for size in range(2, world_size + 1):
        if world_size % size or (max_group_size is not None and size > max_group_size):
            continue
        if inside % size == 0 or (cross_node and (not regular or size % per_node == 0)):
            sizes.append(size)
    return tuple(sizes)


def make_plan(
    facts: Sequence[NormFact],
    *,
    per_worker_batch_size: int,
    world_size: int,
    ranks_per_node: int | None = None,
    pretrained: bool | None = None,
    policy: Policy,
    accumulation_steps: int = 1,
) -> Plan:
    """The plan for a model with normalization layers ``facts`` trained with
    ``per_worker_batch_size`` samples on each of ``world_size`` ranks (``ranks_per_node``
    to a node, when known), ``accumulation_steps`` micro-batches per optimizer step.
    ``pretrained=None`` takes the policy's ``pretrained``.

    Raises :class:`PolicyError` for impossible requests: a non-positive size, an override
    asking for a sync group that does not divide the world, or a number of groups that
    does not divide a layer's channels.
    """
    for key, value, allow_none in (
        ("per_worker_batch_size", per_worker_batch_size, False),
        ("world_size", world_size, False),
        ("ranks_per_node", ranks_per_node, True),
        ("accumulation_steps", accumulation_steps, False),
    ):
        if not (allow_none and value is None) and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1
        ):
            raise PolicyError(f"{key} must be a positive integer, got {value!r}")
    context = _Context(
        batch=per_worker_batch_size,
        world=world_size,
        ranks_per_node=ranks_per_node,
        pretrained=policy.pretrained if pretrained is None else pretrained,
        policy=policy,
        accumulation_steps=accumulation_steps,
        candidates=(
            sync_group_candidates(
                world_size,
                ranks_per_node,
                max_group_size=policy.sync.max_group_size,
                cross_node=policy.sync.cross_node,
            )
            if policy.sync.enabled
            else ()
        ),
    )
    return Plan(
        layers=tuple(_decide(fact, context) for fact in facts),
        world_size=world_size,
        per_worker_batch_size=per_worker_batch_size,
        ranks_per_node=ranks_per_node,
        target_batch=policy.target_batch,
        pretrained=context.pretrained,
        policy=policy.name,
        accumulation_steps=accumulation_steps,
    )


def unused_overrides(facts: Sequence[NormFact], policy: Policy) -> tuple[str, ...]:
    """The policy's override keys that match no BatchNorm layer (likely typos)."""
    batch_norms = [f for f in facts if f.is_batch_norm]
    unused = [
        f"overrides.by_name[{pattern!r}]"
        for pattern, _ in policy.overrides.by_name
        if not any(fnmatch.fnmatchcase(f.name, pattern) for f in batch_norms)
    ]
    unused += [
        f"overrides.by_type[{type_name!r}]"
        for type_name, _ in policy.overrides.by_type
        if not any(type_name in f.type_names for f in batch_norms)
    ]
    return tuple(unused)


@dataclass(frozen=True)
class _Context:
    batch: int
    world: int
    ranks_per_node: int | None
    pretrained: bool
    policy: Policy
    accumulation_steps: int
    candidates: tuple[int, ...]

    @property
    def target(self) -> int:
        return self.policy.target_batch

    @property
    def accumulating_group(self) -> int | None:
        """The largest allowed sync group (1, the worker alone, when none is allowed) if its
        micro-batches over the accumulation steps reach the target; None without
        accumulation or when they do not. The largest, as below the floor: a window of
        stale micro-batches gains from every sample, and any group costs one all-reduce of
        the same size per micro-batch (the accuracy study: the world's window beat the
        worker's own at 1 and 2 images per worker)."""
        steps = self.accumulation_steps
        group = self.candidates[-1] if self.candidates else 1
        if steps == 1 or group * self.batch * steps < self.target:
            return None
        return group

    @property
    def reaching_group(self) -> int | None:
        """The smallest allowed sync group whose batch reaches the target."""
        return next((g for g in self.candidates if g * self.batch >= self.target), None)

    def where(self, group_size: int) -> str:
        """Reason suffix: how many nodes a group spans ("" when the layout is unknown)."""
        if self.ranks_per_node is None or self.world % min(self.ranks_per_node, self.world):
            return ""
        nodes = max(1, group_size // min(self.ranks_per_node, self.world))
        return f", {nodes} node{'s' if nodes > 1 else ''}"

    def shortfall(self) -> str:
        """Why no sync group was chosen, for reasons."""
        if not self.policy.sync.enabled:
            return "sync disabled by the policy"
        if not self.candidates:
            return "no sync group possible" if self.world == 1 else "no allowed sync group"
        largest = self.candidates[-1]
        return f"at most {largest} ranks x {self.batch} = {largest * self.batch} < {self.target}"


def _decide(fact: NormFact, context: _Context) -> LayerPlan:
    decision = _best(fact, context)
    if fact.own_forward and not NORMS[decision.norm].keeps_own_forward:
        # Only SyncBN keeps a forward distnorm cannot replace (by calling it).
        return _largest_group(fact, context, f"{decision.reason}; own forward")
    return decision


def _best(fact: NormFact, context: _Context) -> LayerPlan:
    if not fact.is_batch_norm:
        return _layer(fact, "keep", reason=_why_kept(fact))
    forced = _override_for(fact, context.policy)
    if forced is not None:
        return _forced(fact, context, *forced)
    if fact.is_frozen:
        return _layer(fact, "keep", reason="already frozen: no batch statistics")
    converted = next((n for n in _DISTNORM_NORMS if n in fact.type_names), None)
    if converted is not None:
        return _layer(fact, "keep", reason=f"already distnorm's {converted}")
    batch, target = context.batch, context.target
    if batch >= target:
        return _layer(
            fact,
            "bn",
            values=_values(fact, batch),
            reason=f"batch {batch} >= target {target}: local, no communication",
        )
    group = context.reaching_group
    if group is not None:
        return _layer(
            fact,
            "sync_bn",
            sync_group_size=group,
            values=_values(fact, group * batch),
            reason=f"{group} ranks x {batch} = {group * batch} >= {target}{context.where(group)}",
        )
    group = context.accumulating_group
    if group is not None:
        steps, samples = context.accumulation_steps, group * batch * context.accumulation_steps
        return _layer(
            fact,
            "sync_bn",
            sync_group_size=group,
            accumulation_steps=steps,
            values=_values(fact, samples),
            reason=(
                f"{group} rank{'s' if group > 1 else ''} x {batch} x {steps} micro-batches = "
                f"{samples} >= {target}{context.where(group) if group > 1 else ''}: "
                "statistics pooled over the optimizer step, + WS"
            ),
        )
    why = context.shortfall()
    floor = context.policy.min_sync_batch
    largest = context.candidates[-1] if context.candidates else 1
    if largest * batch >= floor and (
        not context.pretrained or not _in_backbone(fact.name, context.policy)
    ):
        return _largest_group(fact, context, f"{why}; >= floor {floor}")
    if not context.pretrained:
        return _scratch(fact, context, why, "from scratch")
    if not _in_backbone(fact.name, context.policy):
        return _scratch(fact, context, why, "fine-tuning head")
    if not fact.track_running_stats:
        return _scratch(fact, context, f"{why}; no running stats to freeze", "fine-tuning")
    return _layer(fact, "frozen_bn", reason=f"{why}; fine-tuning: frozen")


def _scratch(fact: NormFact, context: _Context, why: str, role: str) -> LayerPlan:
    """The decision for a layer whose statistics must be learnt (from scratch, or in a
    fine-tuned model's new head) when no sync group reaches the target."""
    fallback = context.policy.scratch_fallback
    if fallback == "bn":
        return _layer(
            fact, "bn", values=_values(fact, context.batch), reason=f"{why}; local BN by policy"
        )
    if fallback == "sync_bn":
        return _largest_group(fact, context, f"{why}; SyncBN by policy")
    if fact.spatial_size == 1:
        return _largest_group(fact, context, f"{why}; no spatial extent")
    if fact.spatial_size is None and "BatchNorm1d" in fact.type_names:
        return _largest_group(fact, context, f"{why}; BatchNorm1d, assumed (N, C)")
    if fact.num_channels is None:
        return _largest_group(fact, context, f"{why}; channels unknown")
    gn = context.policy.group_norm
    try:
        groups = choose_num_groups(
            fact.num_channels, gn.num_groups, gn.min_channels_per_group, layer=_label(fact)
        )
    except InputError:
        return _largest_group(
            fact, context, f"{why}; {fact.num_channels} channels cannot be grouped"
        )
    # Pooled over the largest allowed group: BCN's estimates (one forward all-reduce) and
    # BGN's statistics (one each way, as SyncBN's), the more samples the better below the
    # floor; the accuracy study measured BGN+WS synchronized so.
    group = context.candidates[-1] if fallback in ("bcn", "bgn") and context.candidates else None
    return _layer(
        fact,
        fallback,
        sync_group_size=group,
        num_groups=groups,
        values=_grouped_values(fact, fallback, groups, context.batch, group),
        reason=f"{why}; {role}: {NORMS[fallback].label}",
    )


def _largest_group(fact: NormFact, context: _Context, why: str) -> LayerPlan:
    """SyncBN over the largest allowed group; local BN when there is none."""
    if context.candidates:
        group = context.candidates[-1]
        return _layer(
            fact,
            "sync_bn",
            sync_group_size=group,
            values=_values(fact, group * context.batch),
            reason=f"{why}: largest group{context.where(group)}",
        )
    return _layer(fact, "bn", values=_values(fact, context.batch), reason=f"{why}: local")


def _forced(fact: NormFact, context: _Context, key: str, override: Override) -> LayerPlan:
    """Apply an override, checking it is possible for this layer and world."""
    norm, reason = override.norm, key
    where = f"{key} for {_label(fact)}"
    if norm == "keep":
        return _layer(fact, "keep", reason=reason)
    if fact.own_forward and not NORMS[norm].keeps_own_forward:
        raise PolicyError(
            f"{where}: {fact.type_name} computes BatchNorm in a forward of its own, which "
            f"{norm} would drop; only sync_bn and bn keep it. If it is BatchNorm followed "
            "by submodules (dropout, activation), declare them with "
            "distnorm.register_norm_act, and every norm can replace it"
        )
    if norm == "frozen_bn" and not fact.track_running_stats:
        raise PolicyError(
            f"{where}: frozen_bn needs running statistics, and this layer has "
            "track_running_stats=False; choose another norm for it"
        )
    group = override.sync_group_size
    if group is not None:
        if group > context.world:
            raise PolicyError(
                f"{where}: sync_group_size {group} is larger than the world ({context.world} ranks)"
            )
        if context.world % group:
            raise PolicyError(
                f"{where}: sync_group_size {group} does not divide the world size "
                f"{context.world}; every rank must belong to exactly one group"
            )
        if group == 1 and context.world > 1:
            raise PolicyError(
                f"{where}: sync_group_size 1 synchronizes nothing; use norm 'bn' for local "
                "statistics, or leave sync_group_size out"
            )
    elif norm == "sync_bn":
        group = context.reaching_group or (
            context.candidates[-1] if context.candidates else context.world
        )
    batch = context.batch * (group or 1)
    if norm in GROUPED_NORMS:
        groups = _forced_groups(fact, context, override, where)
        return _layer(
            fact,
            norm,
            sync_group_size=group,
            num_groups=groups,
            values=_grouped_values(fact, norm, groups, context.batch, group),
            reason=reason,
        )
    assert norm in ("bn", "sync_bn", "frozen_bn")
    return _layer(
        fact,
        norm,
        sync_group_size=group if norm in SYNCABLE_NORMS else None,
        values=None if norm == "frozen_bn" else _values(fact, batch),
        reason=reason,
    )


def _forced_groups(fact: NormFact, context: _Context, override: Override, where: str) -> int:
    channels = fact.num_channels
    if channels is None:
        raise PolicyError(
            f"{where}: the layer's channel count is unknown (a lazy module); run one forward "
            "pass, or pass a sample input, before planning"
        )
    if override.num_groups is not None:
        if channels % override.num_groups:
            raise PolicyError(
                f"{where}: num_groups {override.num_groups} does not divide the layer's "
                f"{channels} channels; choose a divisor of {channels}"
            )
        return override.num_groups
    gn = context.policy.group_norm
    try:
        return choose_num_groups(
            channels, gn.num_groups, gn.min_channels_per_group, layer=_label(fact)
        )
    except InputError as error:
        raise PolicyError(f"{where}: {error}") from None


def _override_for(fact: NormFact, policy: Policy) -> tuple[str, Override] | None:
    for pattern, override in policy.overrides.by_name:
        if fnmatch.fnmatchcase(fact.name, pattern):
            return f"overrides.by_name[{pattern!r}]", override
    for type_name, override in policy.overrides.by_type:
        if type_name in fact.type_names:
            return f"overrides.by_type[{type_name!r}]", override
    return None


def _in_backbone(name: str, policy: Policy) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in policy.backbone)


def _why_kept(fact: NormFact) -> str:
    if fact.is_frozen:
        return "already frozen: no batch statistics"
    if any(
        n in fact.type_names
        for n in ("LayerNorm", "GroupNorm", "RMSNorm", "_InstanceNorm", "LocalResponseNorm")
    ):
        return "per-sample statistics: independent of the batch"
    return "not a BatchNorm: left alone"


def _values(fact: NormFact, samples: int) -> int | None:
    """Values per BatchNorm statistic for a batch of ``samples`` model samples."""
    per_sample = fact.values_per_sample
    return None if per_sample is None else round(samples * per_sample)


def _grouped_values(
    fact: NormFact, norm: str, groups: int, batch: int, sync_group: int | None
) -> int | None:
    """Values per statistic of gn_ws / bcn (their per-sample channel-group statistic:
    ``C/G x spatial``) and bgn (``C/G`` channels over the whole batch and positions)."""
    if fact.spatial_size is None or fact.num_channels is None:
        return None
    per_group = fact.num_channels // groups
    if norm == "bgn":
        samples = _values(fact, batch * (sync_group or 1))
        return None if samples is None else samples * per_group
    return per_group * fact.spatial_size


def _layer(
    fact: NormFact,
    norm: str,
    *,
    reason: str,
    sync_group_size: int | None = None,
    num_groups: int | None = None,
    values: int | None = None,
    accumulation_steps: int = 1,
) -> LayerPlan:
    return LayerPlan(
        name=fact.name,
        original=fact.type_name,
        norm=norm,
        sync_group_size=sync_group_size,
        num_groups=num_groups,
        values_per_statistic=values,
        reason=reason,
        num_channels=fact.num_channels,
        accumulation_steps=accumulation_steps,
    )


def _label(fact: NormFact) -> str:
    return f"{fact.type_name} '{fact.name or '(root)'}'"
