"""``distnorm.plan``: gather a model's facts and its job's layout, and apply the rules.

The one impure step before the pure rules: it reads the world layout (explicit
arguments, else the process group or the launcher's environment, via
:func:`distnorm.world.world_layout`), optionally runs a sample input through the model to
measure what each normalization layer sees, and logs the result on rank 0. It decides
nothing itself and creates no process group.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from distnorm.errors import PolicyError
from distnorm.logs import get_logger
from distnorm.policy.batch_config import (
    accumulation_steps_from_config,
    per_worker_batch_size_from_config,
)
from distnorm.policy.config import Policy, load_policy
from distnorm.policy.facts import NormFact, collect_facts
from distnorm.policy.plans import Plan
from distnorm.policy.rules import make_plan, unused_overrides
from distnorm.world import WorldLayout, world_layout

logger = get_logger(__name__)


def plan(
    model: nn.Module,
    per_worker_batch_size: int | str | os.PathLike[str] | Mapping[str, Any],
    world_size: int | None = None,
    *,
    accumulation_steps: int | None = None,
    ranks_per_node: int | None = None,
    pretrained: bool | None = None,
    policy: str | os.PathLike[str] | Mapping[str, Any] | Policy | None = None,
    sample_input: Any = None,
) -> Plan:
    """Decide, for every normalization layer of ``model``, what it should become; the
    model is not changed (``convert_model`` applies a plan).

    ``per_worker_batch_size`` is the number of samples each rank feeds per step (per
    micro-batch), or a DeepSpeed / Accelerate config (path or dict) to read it from.
    ``accumulation_steps`` is the number of micro-batches per optimizer step under
    gradient accumulation (default: the config's ``gradient_accumulation_steps`` when
    ``per_worker_batch_size`` is a config, else 1); when no sync group reaches the target,
    SyncBatchNorm may pool its statistics over them. ``world_size`` and
    ``ranks_per_node`` default to the initialized process group or the launcher's
    environment (a single process when there is neither). ``pretrained=True`` means
    fine-tuning a BN-pretrained model (default: the policy's ``pretrained``). ``policy``
    is a shipped policy's name, a YAML path, a dict or a :class:`Policy` (default
    ``"default"``). ``sample_input`` (optional; any batch size) is run through the model
    once, in eval mode without gradients, to measure the values each statistic sees.

    A model without normalization layers gets an empty plan and a logged warning.
    """
    result, facts, resolved, layout = decide(
        model, per_worker_batch_size, world_size, accumulation_steps=accumulation_steps,
        ranks_per_node=ranks_per_node, pretrained=pretrained, policy=policy,
        sample_input=sample_input,
    )  # fmt: skip
    if not facts:
        logger.warning(
            "distnorm.plan: %s has no normalization layers; the plan is empty",
            type(model).__name__,
        )
        return result
    for key in unused_overrides(facts, resolved):
        logger.warning(
            "distnorm.plan: policy %r: %s matches no BatchNorm layer", resolved.name, key
        )
    for layer in result.layers:
        if layer.norm in ("bn", "sync_bn") and layer.values_per_statistic == 1:
            logger.warning(
                "distnorm.plan: %s '%s' would compute each statistic from 1 value, which "
                "BatchNorm cannot train with; raise the batch or override this layer",
                layer.original,
                layer.name or "(root)",
            )
    logger.info("distnorm.plan (world layout from %s):\n%s", layout.source, result)
    return result


def decide(
    model: nn.Module,
    per_worker_batch_size: int | str | os.PathLike[str] | Mapping[str, Any],
    world_size: int | None = None,
    *,
    accumulation_steps: int | None = None,
    ranks_per_node: int | None = None,
    pretrained: bool | None = None,
    policy: str | os.PathLike[str] | Mapping[str, Any] | Policy | None = None,
    sample_input: Any = None,
) -> tuple[Plan, tuple[NormFact, ...], Policy, WorldLayout]:
    """:func:`plan` without its log: the plan, and the facts, policy and world layout it
    was made from."""
    if isinstance(model, DistributedDataParallel):
        raise PolicyError(
            "plan got a DistributedDataParallel wrapper; plan (and convert) the model first "
            "and wrap it afterwards, so that layer names match"
        )
    layout = world_layout(world_size, ranks_per_node)
    if not isinstance(per_worker_batch_size, int) or isinstance(per_worker_batch_size, bool):
        if not isinstance(per_worker_batch_size, (str, os.PathLike, Mapping)):
            raise PolicyError(
                "per_worker_batch_size must be an int, or a DeepSpeed/Accelerate config "
                f"(path or dict), got {per_worker_batch_size!r}"
            )
        config = per_worker_batch_size
        per_worker_batch_size = per_worker_batch_size_from_config(config, layout.world_size)
        if accumulation_steps is None or _positive_int(accumulation_steps):
            accumulation_steps = accumulation_steps_from_config(
                config, layout.world_size, accumulation_steps
            )
    resolved = load_policy(policy)
    facts = collect_facts(model, sample_input)
    result = make_plan(
        facts,
        per_worker_batch_size=per_worker_batch_size,
        world_size=layout.world_size,
        ranks_per_node=layout.ranks_per_node,
        pretrained=pretrained,
        policy=resolved,
        accumulation_steps=1 if accumulation_steps is None else accumulation_steps,
    )
    return result, facts, resolved, layout


def _positive_int(value: Any) -> bool:
    """Whether ``value`` is a valid size (else ``make_plan`` refuses it, naming the key)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1
