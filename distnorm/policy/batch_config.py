"""The per-worker batch size, read from a DeepSpeed or Accelerate configuration.

The policy's main input is how many samples one rank's BatchNorm sees. Jobs launched
with DeepSpeed already state it: ``train_micro_batch_size_per_gpu`` in the DeepSpeed
config, or implicitly through DeepSpeed's identity ``train_batch_size =
train_micro_batch_size_per_gpu * gradient_accumulation_steps * world_size``. Accelerate's
YAML config holds no batch size (Accelerate takes it from the DataLoader) except through
the DeepSpeed config file it points to (``deepspeed_config.deepspeed_config_file``).
Values left as ``"auto"`` (filled in later by Accelerate or Transformers) cannot be read
here and are refused with a message saying so.

The same configs state the gradient accumulation steps (micro-batches per optimizer
step), which the policy may use to pool a layer's statistics over the optimizer step:
DeepSpeed's ``gradient_accumulation_steps`` (or its identity above, when it gives both
batch sizes), and Accelerate's ``gradient_accumulation_steps`` at the top level or in its
``deepspeed_config`` section, besides the DeepSpeed file it points to.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from distnorm.errors import PolicyError

# Keys of an Accelerate config file (``accelerate config``), never of a DeepSpeed one.
_ACCELERATE_KEYS = ("compute_environment", "distributed_type", "deepspeed_config")


def per_worker_batch_size_from_config(
    config: str | os.PathLike[str] | Mapping[str, Any], world_size: int | None = None
) -> int:
    """The per-worker (micro) batch size of a DeepSpeed config (dict, or JSON/YAML file)
    or of an Accelerate config file that points to one.

    ``world_size`` is needed only when the config gives ``train_batch_size`` without
    ``train_micro_batch_size_per_gpu``. Raises :class:`PolicyError` saying which key is
    missing, ``"auto"`` or inconsistent.
    """
    where, data, folder = _read(config)
    if any(key in data for key in _ACCELERATE_KEYS):
        # An Accelerate config: the batch lives in the DeepSpeed file it names, if any.
        deepspeed = data.get("deepspeed_config")
        file = deepspeed.get("deepspeed_config_file") if isinstance(deepspeed, Mapping) else None
        if not file:
            raise PolicyError(
                f"{where} is an Accelerate config without a DeepSpeed config file: "
                "Accelerate takes the batch size from your DataLoader, so pass "
                "per_worker_batch_size explicitly"
            )
        path = Path(file)
        if not path.is_absolute() and not path.exists() and folder is not None:
            path = folder / path  # relative to the Accelerate config's own folder
        return per_worker_batch_size_from_config(path, world_size)

    micro = data.get("train_micro_batch_size_per_gpu")
    if micro is not None:
        return _positive(where, "train_micro_batch_size_per_gpu", micro)
    total = data.get("train_batch_size")
    if total is None:
        raise PolicyError(
            f"{where} has neither train_micro_batch_size_per_gpu nor train_batch_size; "
            "pass per_worker_batch_size explicitly"
        )
    total = _positive(where, "train_batch_size", total)
    steps = _positive(
        where, "gradient_accumulation_steps", data.get("gradient_accumulation_steps", 1)
    )
    if world_size is None:
        raise PolicyError(
            f"{where} gives train_batch_size ({total}) but no "
            "train_micro_batch_size_per_gpu; the per-worker batch then depends on the world "
            "size, so pass world_size (or per_worker_batch_size) explicitly"
        )
    if total % (steps * world_size):
        raise PolicyError(
            f"{where}: train_batch_size {total} is not divisible by "
            f"gradient_accumulation_steps {steps} x world size {world_size}"
        )
    return total // (steps * world_size)


def accumulation_steps_from_config(
    config: str | os.PathLike[str] | Mapping[str, Any],
    world_size: int | None = None,
    accumulation_steps: int | None = None,
) -> int:
    """The gradient accumulation steps of a DeepSpeed or Accelerate config (dict, or
    JSON/YAML file), checked against an explicit ``accumulation_steps``.

    Without ``accumulation_steps``: the config's value, 1 when it states none. With it:
    ``accumulation_steps`` itself, after checking that the config states no other value
    (a config that states none, or ``"auto"``, defers to it). Raises :class:`PolicyError`
    naming both values when they disagree, and the keys when the config's own sources
    (an Accelerate config and the DeepSpeed file it names) disagree.
    """
    stated = _stated_accumulation(config, world_size)
    if accumulation_steps is None:
        if stated is None:
            return 1
        value, where = stated
        if value == "auto":
            raise PolicyError(
                f"{where} is 'auto' (filled in later by Accelerate or Transformers); pass "
                "accumulation_steps explicitly"
            )
        return value
    if stated is not None and stated[0] not in ("auto", accumulation_steps):
        value, where = stated
        raise PolicyError(
            f"accumulation_steps={accumulation_steps} contradicts the config: {where} is "
            f"{value}; give the same value, or leave accumulation_steps out to use the config's"
        )
    return accumulation_steps


def _stated_accumulation(
    config: str | os.PathLike[str] | Mapping[str, Any], world_size: int | None
) -> tuple[int | str, str] | None:
    """The accumulation steps ``config`` states (a positive int or ``"auto"``) and where it
    states them, in words; None when it states none."""
    where, data, folder = _read(config)
    found: list[tuple[int | str, str]] = []
    if any(key in data for key in _ACCELERATE_KEYS):
        key = "gradient_accumulation_steps"
        if key in data:
            found.append((_steps(where, key, data[key]), f"{where} key {key!r}"))
        deepspeed = data.get("deepspeed_config")
        if isinstance(deepspeed, Mapping):
            if key in deepspeed:
                dotted = f"deepspeed_config.{key}"
                found.append((_steps(where, dotted, deepspeed[key]), f"{where} key {dotted!r}"))
            file = deepspeed.get("deepspeed_config_file")
            if file:
                path = Path(file)
                if not path.is_absolute() and not path.exists() and folder is not None:
                    path = folder / path
                inner = _stated_accumulation(path, world_size)
                if inner is not None:
                    found.append(inner)
    else:
        key = "gradient_accumulation_steps"
        if key in data:
            found.append((_steps(where, key, data[key]), f"{where} key {key!r}"))
        else:
            derived = _derived_accumulation(where, data, world_size)
            if derived is not None:
                found.append(derived)
    numbers = {value for value, _ in found if value != "auto"}
    if len(numbers) > 1:
        raise PolicyError(
            "the config's gradient accumulation steps disagree: "
            + ", ".join(f"{source} is {value}" for value, source in found)
        )
    if not found:
        return None
    return next((item for item in found if item[0] != "auto"), found[0])


def _derived_accumulation(
    where: str, data: Mapping[str, Any], world_size: int | None
) -> tuple[int, str] | None:
    """DeepSpeed's accumulation steps from ``train_batch_size = micro x steps x world``,
    when the config gives both batch sizes (and the world size is known)."""
    total, micro = data.get("train_batch_size"), data.get("train_micro_batch_size_per_gpu")
    if total is None or micro is None or world_size is None or "auto" in (total, micro):
        return None
    total = _positive(where, "train_batch_size", total)
    micro = _positive(where, "train_micro_batch_size_per_gpu", micro)
    if total % (micro * world_size):
        raise PolicyError(
            f"{where}: train_batch_size {total} is not divisible by "
            f"train_micro_batch_size_per_gpu {micro} x world size {world_size}"
        )
    return (
        total // (micro * world_size),
        f"{where}'s train_batch_size {total} / (train_micro_batch_size_per_gpu {micro} x "
        f"world size {world_size})",
    )


def _steps(where: str, key: str, value: Any) -> int | str:
    """A stated accumulation value: a positive integer, or ``"auto"`` (left to later)."""
    if value == "auto":
        return "auto"
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PolicyError(f"{where}: {key} must be a positive integer, got {value!r}")
    return value


def _read(config: str | os.PathLike[str] | Mapping[str, Any]) -> tuple[str, Any, Path | None]:
    if isinstance(config, Mapping):
        return "the given config", config, None
    path = Path(config)
    try:
        text = path.read_text()
    except OSError as error:
        raise PolicyError(f"cannot read config {str(path)!r}: {error.strerror}") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        raise PolicyError(f"config {str(path)!r} cannot be parsed: {error}") from None
    if not isinstance(data, Mapping):
        raise PolicyError(f"config {str(path)!r} must hold a mapping of keys")
    return f"config {str(path)!r}", data, path.parent


def _positive(where: str, key: str, value: Any) -> int:
    if value == "auto":
        raise PolicyError(
            f"{where}: {key} is 'auto' (filled in later by Accelerate or Transformers from "
            "the DataLoader); pass per_worker_batch_size explicitly"
        )
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PolicyError(f"{where}: {key} must be a positive integer, got {value!r}")
    return value
