"""Normalization policies: the knobs of the decision rules, loaded from YAML and checked.

A policy is a YAML file (shipped ones in ``distnorm/policy/configs/`` by name, others by
path) or a dict; a missing key takes ``default.yaml``'s value. Unknown keys and values of
the wrong kind are errors naming the key: a typo would otherwise train with a default.

Schema (dotted key: meaning)::

    description                  free text
    target_batch                 samples each BatchNorm statistic should see (32)
    min_sync_batch               fewest samples a synchronized statistic may see when no
                                 sync group reaches the target (16)
    pretrained                   fine-tuning a BN-pretrained model (false)
    sync.enabled                 allow SyncBatchNorm groups (true)
    sync.max_group_size          largest sync group in ranks, null for the world (null)
    sync.cross_node              allow groups of whole nodes (true)
    scratch_fallback             gn_ws | bcn | bgn | bn | sync_bn, when no sync group
                                 reaches the target and the layer is trained from scratch
    backbone                     module-name patterns frozen when fine-tuning (["*"])
    group_norm.num_groups        preferred G for gn_ws/bcn/bgn (32)
    group_norm.min_channels_per_group   fewest channels per group (2)
    overrides.by_name            {pattern: NORM or {norm, num_groups, sync_group_size}}
    overrides.by_type            {class name: same}

Patterns are shell-style (``fnmatch``) over qualified module names, where ``*`` also
matches dots: ``"backbone.*"`` is everything under ``backbone``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from distnorm.errors import PolicyError
from distnorm.policy.plans import GROUPED_NORMS, NORMS, SYNCABLE_NORMS

SCRATCH_FALLBACKS = ("gn_ws", "bcn", "bgn", "bn", "sync_bn")
_NOT_KEYS = ("name", "source")  # Policy fields set by the loader, not by the file


@dataclass(frozen=True)
class Override:
    """A forced decision for the layers a name pattern or type matches. ``num_groups``
    (gn_ws/bcn/bgn only) must divide the layer's channels; ``sync_group_size``
    (sync_bn/bcn/bgn only) must divide the world size. Unset ones are chosen as usual."""

    norm: str
    num_groups: int | None = None
    sync_group_size: int | None = None


@dataclass(frozen=True)
class SyncSettings:
    """Which SyncBatchNorm groups the policy may use."""

    enabled: bool = True
    max_group_size: int | None = None
    cross_node: bool = True


@dataclass(frozen=True)
class GroupNormSettings:
    """How channels are grouped when a layer becomes gn_ws, bcn or bgn (see
    :func:`distnorm.layers.group_norm.choose_num_groups`)."""

    num_groups: int = 32
    min_channels_per_group: int = 2


@dataclass(frozen=True)
class Overrides:
    """Forced decisions, first matching entry wins; a name match beats a type match."""

    by_name: tuple[tuple[str, Override], ...] = ()
    by_type: tuple[tuple[str, Override], ...] = ()


@dataclass(frozen=True)
class Policy:
    """The knobs of :mod:`distnorm.policy.rules`; see the module docstring for each key.

    ``name`` (the shipped name or the file's stem) and ``source`` (where it was loaded
    from, for error messages) are set by :func:`load_policy`, which builds policies from
    a name, a path or a dict; constructing one directly checks the same things.
    """

    name: str = "default"
    source: str = ""
    description: str = ""
    target_batch: int = 32
    min_sync_batch: int = 16
    pretrained: bool = False
    sync: SyncSettings = field(default_factory=SyncSettings)
    scratch_fallback: str = "bgn"
    backbone: tuple[str, ...] = ("*",)
    group_norm: GroupNormSettings = field(default_factory=GroupNormSettings)
    overrides: Overrides = field(default_factory=Overrides)

    def __post_init__(self) -> None:
        where = self.source or f"policy {self.name!r}"
        _expect(where, "description", self.description, str)
        _expect_int(where, "target_batch", self.target_batch, minimum=1)
        _expect_int(where, "min_sync_batch", self.min_sync_batch, minimum=1)
        _expect(where, "pretrained", self.pretrained, bool)
        _expect(where, "sync.enabled", self.sync.enabled, bool)
        if self.sync.max_group_size is not None:
            _expect_int(where, "sync.max_group_size", self.sync.max_group_size, minimum=1)
        _expect(where, "sync.cross_node", self.sync.cross_node, bool)
        _expect_choice(where, "scratch_fallback", self.scratch_fallback, SCRATCH_FALLBACKS)
        if not isinstance(self.backbone, tuple) or not all(
            isinstance(p, str) for p in self.backbone
        ):
            raise PolicyError(
                f"{where}: key backbone must be a list of module-name patterns, "
                f"got {self.backbone!r}"
            )
        _expect_int(where, "group_norm.num_groups", self.group_norm.num_groups, minimum=1)
        _expect_int(
            where,
            "group_norm.min_channels_per_group",
            self.group_norm.min_channels_per_group,
            minimum=1,
        )
        for kind, entries in (
            ("by_name", self.overrides.by_name),
            ("by_type", self.overrides.by_type),
        ):
            for key, override in entries:
                _check_override(where, f"overrides.{kind}[{key!r}]", override)


def load_policy(spec: str | os.PathLike[str] | Mapping[str, Any] | Policy | None = None) -> Policy:
    """A :class:`Policy` from a shipped policy's name (``"default"``,
    ``"fine-tune-detection"``, ``"micro-batch-from-scratch"``), a YAML file's path, a
    dict with the same keys, or a Policy (returned as is); ``None`` is ``"default"``.

    Raises :class:`PolicyError` naming the unknown key, the invalid value, the missing
    file or the unknown name (with the names that exist).
    """
    if spec is None:
        spec = "default"
    if isinstance(spec, Policy):
        return spec
    if isinstance(spec, Mapping):
        return _from_mapping(spec, name="custom", where="policy (dict)")
    path = Path(spec)
    if (
        isinstance(spec, str)
        and path.suffix not in (".yaml", ".yml")
        and "/" not in spec
        and os.sep not in spec
    ):
        # A bare word is a shipped policy's name; anything else is a path.
        if spec not in available_policies():
            raise PolicyError(
                f"no policy named {spec!r}; shipped policies: "
                f"{', '.join(available_policies())}; or give a YAML file's path (ending in "
                "'.yaml' or '.yml', or with a directory, as in './my-policy')"
            )
        text = (_configs() / f"{spec}.yaml").read_text()
        return _from_text(text, name=spec, where=f"policy {spec!r}")
    try:
        text = path.read_text()
    except OSError as error:
        raise PolicyError(f"cannot read policy file {str(path)!r}: {error.strerror}") from None
    return _from_text(text, name=path.stem, where=f"policy file {str(path)!r}")


def available_policies() -> tuple[str, ...]:
    """Names of the policies that ship with distnorm."""
    return tuple(
        sorted(
            entry.name.removesuffix(".yaml")
            for entry in _configs().iterdir()
            if entry.name.endswith(".yaml")
        )
    )


def _configs() -> Any:
    return resources.files("distnorm.policy") / "configs"


def _from_text(text: str, *, name: str, where: str) -> Policy:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise PolicyError(f"{where} is not valid YAML: {error}") from None
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise PolicyError(f"{where} must be a YAML mapping of keys, got {type(data).__name__}")
    return _from_mapping(data, name=name, where=where)


def _from_mapping(data: Mapping[str, Any], *, name: str, where: str) -> Policy:
    """Structure (known keys, nesting, lists to tuples); Policy checks the values."""
    _known_keys(where, "", data, [f.name for f in fields(Policy) if f.name not in _NOT_KEYS])
    values: dict[str, Any] = {"name": name, "source": where}
    for key, value in data.items():
        if key == "sync":
            values[key] = SyncSettings(**_section(where, key, value, SyncSettings))
        elif key == "group_norm":
            values[key] = GroupNormSettings(**_section(where, key, value, GroupNormSettings))
        elif key == "overrides":
            section = _section(where, key, value, Overrides)
            values[key] = Overrides(
                **{
                    kind: _overrides(where, f"overrides.{kind}", entries)
                    for kind, entries in section.items()
                }
            )
        elif key == "backbone":
            values[key] = tuple(value) if isinstance(value, list) else value
        else:
            values[key] = value
    return Policy(**values)


def _section(where: str, key: str, value: Any, cls: type) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise PolicyError(f"{where}: key {key} must be a mapping, got {value!r}")
    _known_keys(where, f"{key}.", value, [f.name for f in fields(cls)])
    return dict(value)


def _overrides(where: str, key: str, entries: Any) -> tuple[tuple[str, Override], ...]:
    if entries is None:
        return ()
    if not isinstance(entries, Mapping):
        raise PolicyError(
            f"{where}: key {key} must map a pattern or class name to a norm, got {entries!r}"
        )
    result = []
    for pattern, value in entries.items():
        entry = f"{key}[{pattern!r}]"
        if not isinstance(pattern, str):
            raise PolicyError(f"{where}: {entry}: patterns and class names must be strings")
        if isinstance(value, str):
            value = {"norm": value}
        if not isinstance(value, Mapping):
            raise PolicyError(
                f"{where}: {entry} must be a norm name or a mapping with 'norm', got {value!r}"
            )
        _known_keys(where, f"{entry}.", value, [f.name for f in fields(Override)])
        if "norm" not in value:
            raise PolicyError(f"{where}: {entry} needs a 'norm' ({', '.join(NORMS)})")
        result.append((pattern, Override(**value)))
    return tuple(result)


def _known_keys(where: str, prefix: str, data: Mapping[str, Any], known: list[str]) -> None:
    for key in data:
        if key not in known:
            raise PolicyError(
                f"{where}: unknown key {prefix}{key!s}; known keys here: "
                f"{', '.join(prefix + k for k in known)}"
            )


def _check_override(where: str, key: str, override: Override) -> None:
    _expect_choice(where, f"{key}.norm", override.norm, NORMS)
    if override.num_groups is not None:
        _expect_int(where, f"{key}.num_groups", override.num_groups, minimum=1)
        if override.norm not in GROUPED_NORMS:
            raise PolicyError(
                f"{where}: {key}.num_groups applies to {', '.join(GROUPED_NORMS)} only, "
                f"not to {override.norm!r}"
            )
    if override.sync_group_size is not None:
        _expect_int(where, f"{key}.sync_group_size", override.sync_group_size, minimum=1)
        if override.norm not in SYNCABLE_NORMS:
            raise PolicyError(
                f"{where}: {key}.sync_group_size applies to {', '.join(SYNCABLE_NORMS)} "
                f"only, not to {override.norm!r}"
            )


def _expect(where: str, key: str, value: Any, kind: type) -> None:
    if not isinstance(value, kind):
        raise PolicyError(f"{where}: key {key} must be a {kind.__name__}, got {value!r}")


def _expect_int(where: str, key: str, value: Any, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise PolicyError(f"{where}: key {key} must be an integer >= {minimum}, got {value!r}")


def _expect_choice(where: str, key: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise PolicyError(f"{where}: key {key} must be one of {', '.join(choices)}, got {value!r}")
