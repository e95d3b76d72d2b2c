"""A normalization plan: what the policy decided for each layer, as plain data.

A :class:`Plan` is what :func:`distnorm.plan` returns and what ``convert_model`` applies.
It holds no modules and no process groups, only names, numbers and reasons, so it can be
printed (a table), compared (``==``), saved next to a checkpoint (``to_json``) and
replayed on another run (``Plan.from_json``) to get exactly the same conversion.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from typing import Any

from distnorm.errors import PolicyError
from distnorm.norms import NORMS as REGISTRY
from distnorm.table import format_table

# What a layer can become, by name (distnorm.norms.NORMS has each one's properties; "keep":
# the module is left exactly as it is).
NORMS = tuple(REGISTRY)
GROUPED_NORMS = tuple(name for name, norm in REGISTRY.items() if norm.grouped)
SYNCABLE_NORMS = tuple(name for name, norm in REGISTRY.items() if norm.synchronizes)

FORMAT_VERSION = 1


@dataclass(frozen=True)
class LayerPlan:
    """The decision for one normalization layer.

    ``name`` is the module's qualified name as in ``named_modules()`` (``""`` for the
    root); ``original`` its class name; ``norm`` one of :data:`NORMS`;
    ``sync_group_size`` the ranks sharing its statistics (sync_bn always; bcn/bgn when
    synchronized, ``None`` meaning local statistics, no communication); ``num_groups``
    the channel groups G of gn_ws/bcn/bgn;
    ``values_per_statistic`` how many values each mean/variance is computed from in
    training (``None`` when unknown: no sample input, or no batch statistics);
    ``num_channels`` the layer's C when known; ``reason`` why, in a few words.
    ``accumulation_steps`` k (sync_bn only): the layer normalizes each micro-batch with
    statistics pooled over its sync group's last k micro-batches, and updates its running
    statistics once per k (once per optimizer step under gradient accumulation); 1 is
    plain per-micro-batch statistics.
    """

    name: str
    original: str
    norm: str
    sync_group_size: int | None = None
    num_groups: int | None = None
    values_per_statistic: int | None = None
    reason: str = ""
    num_channels: int | None = None
    accumulation_steps: int = 1

    def __post_init__(self) -> None:
        where = f"layer plan for {self.original} '{self.name or '(root)'}'"
        if self.norm not in NORMS:
            raise PolicyError(f"{where}: norm {self.norm!r} is not one of {', '.join(NORMS)}")
        if self.sync_group_size is not None and self.norm not in SYNCABLE_NORMS:
            raise PolicyError(f"{where}: norm {self.norm!r} takes no sync_group_size")
        if self.norm == "sync_bn" and self.sync_group_size is None:
            raise PolicyError(f"{where}: sync_bn needs a sync_group_size")
        if (self.num_groups is None) == (self.norm in GROUPED_NORMS):
            raise PolicyError(
                f"{where}: num_groups is required for {', '.join(GROUPED_NORMS)} and "
                f"meaningless for the others (norm {self.norm!r}, num_groups {self.num_groups})"
            )
        steps = self.accumulation_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise PolicyError(
                f"{where}: accumulation_steps must be a positive integer, got {steps!r}"
            )
        if steps > 1 and not REGISTRY[self.norm].accumulates:
            raise PolicyError(
                f"{where}: accumulation_steps {steps} with norm {self.norm!r}; only sync_bn "
                "pools statistics over micro-batches (use sync_bn, or accumulation_steps 1)"
            )

    @property
    def changes(self) -> bool:
        """Whether applying this decision replaces the module."""
        return self.norm != "keep"


@dataclass(frozen=True)
class Plan:
    """Decisions for every normalization layer of a model, and what they were based on.

    ``str(plan)`` is a table; ``plan.to_json()`` / ``Plan.from_json(text)`` round-trip
    exactly. ``sync_group_sizes`` lists the group sizes the plan needs, in the order in
    which every rank must create them (see :func:`distnorm.comm.sync_group`).
    """

    layers: tuple[LayerPlan, ...]
    world_size: int
    per_worker_batch_size: int
    ranks_per_node: int | None = None
    target_batch: int = 32
    pretrained: bool = False
    policy: str = "default"
    accumulation_steps: int = 1

    def __post_init__(self) -> None:
        steps = self.accumulation_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise PolicyError(f"plan: accumulation_steps must be a positive integer, got {steps!r}")
        for lp in self.layers:
            if lp.accumulation_steps not in (1, steps):
                raise PolicyError(
                    f"layer plan for {lp.original} '{lp.name or '(root)'}': accumulation_steps "
                    f"{lp.accumulation_steps}, but the plan was made for {steps} micro-batches "
                    "per optimizer step; a layer pools over 1 or the plan's accumulation_steps"
                )

    @property
    def sync_group_sizes(self) -> tuple[int, ...]:
        """The distinct ``sync_group_size`` values of the layers, ascending."""
        return tuple(sorted({lp.sync_group_size for lp in self.layers if lp.sync_group_size}))

    def layer(self, name: str) -> LayerPlan:
        """The decision for the layer called ``name``; ``KeyError`` when there is none."""
        for layer_plan in self.layers:
            if layer_plan.name == name:
                return layer_plan
        raise KeyError(f"no normalization layer named {name!r} in this plan")

    def summary(self) -> str:
        """One line: the inputs the decisions were made from."""
        node = f", {self.ranks_per_node} per node" if self.ranks_per_node else ""
        regime = "fine-tuning a pretrained model" if self.pretrained else "from scratch"
        steps = self.accumulation_steps
        accumulation = f" x {steps} micro-batches per optimizer step" if steps > 1 else ""
        return (
            f"per-worker batch {self.per_worker_batch_size}{accumulation}, "
            f"world {self.world_size} "
            f"rank{'s' if self.world_size > 1 else ''}{node}, "
            f"target {self.target_batch} samples per statistic, {regime}, "
            f"policy {self.policy!r}"
        )

    def __str__(self) -> str:
        if not self.layers:
            return f"{self.summary()}\nno normalization layers"
        rows = [
            (
                lp.name or "(root)",
                lp.original,
                _chosen(lp),
                "-" if lp.sync_group_size is None else lp.sync_group_size,
                "?" if lp.values_per_statistic is None else lp.values_per_statistic,
                lp.reason,
            )
            for lp in self.layers
        ]
        table = format_table(
            ("layer", "original", "chosen", "group", "values/stat", "reason"), rows
        )
        return f"{self.summary()}\n{table}"

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-compatible data (what ``to_json`` writes)."""
        data = {"format": FORMAT_VERSION, **asdict(self)}
        data["layers"] = [asdict(lp) for lp in self.layers]
        return data

    def to_json(self, indent: int | None = 2) -> str:
        """The plan as JSON text, e.g. to store next to a checkpoint."""
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: Any) -> Plan:
        """Inverse of :meth:`to_dict`; raises :class:`PolicyError` naming what is wrong."""
        if not isinstance(data, dict):
            raise PolicyError(f"a plan must be a JSON object, got {type(data).__name__}")
        data = dict(data)
        version = data.pop("format", None)
        if version != FORMAT_VERSION:
            raise PolicyError(
                f"plan format {version!r} is not supported (this distnorm reads format "
                f"{FORMAT_VERSION})"
            )
        _check_keys(data, cls, "plan")
        layers = data.get("layers")
        if not isinstance(layers, list):
            raise PolicyError("plan key 'layers' must be a list of layer plans")
        for index, layer in enumerate(layers):
            if not isinstance(layer, dict):
                raise PolicyError(f"plan layers[{index}] must be an object")
            _check_keys(layer, LayerPlan, f"plan layers[{index}]")
        try:
            return cls(**{**data, "layers": tuple(LayerPlan(**layer) for layer in layers)})
        except TypeError as error:  # a required key missing
            raise PolicyError(f"incomplete plan: {error}") from None

    @classmethod
    def from_json(cls, text: str) -> Plan:
        """Inverse of :meth:`to_json`."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise PolicyError(f"a plan must be JSON: {error}") from None
        return cls.from_dict(data)


def _chosen(lp: LayerPlan) -> str:
    """The table's "chosen" cell: the norm, with its groups G or accumulation window k."""
    if lp.num_groups is not None:
        return f"{lp.norm} (G={lp.num_groups})"
    if lp.accumulation_steps > 1:
        return f"{lp.norm} (k={lp.accumulation_steps})"
    return lp.norm


# JSON types of the scalar fields, checked on load so that a hand-edited plan fails
# with the key's name rather than deep inside convert_model.
_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "name": (str,),
    "original": (str,),
    "norm": (str,),
    "sync_group_size": (int, type(None)),
    "num_groups": (int, type(None)),
    "values_per_statistic": (int, type(None)),
    "reason": (str,),
    "num_channels": (int, type(None)),
    "world_size": (int,),
    "per_worker_batch_size": (int,),
    "ranks_per_node": (int, type(None)),
    "target_batch": (int,),
    "pretrained": (bool,),
    "policy": (str,),
    "accumulation_steps": (int,),
}


def _check_keys(data: dict[str, Any], cls: type, where: str) -> None:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise PolicyError(
            f"{where} has unknown key(s) {', '.join(map(repr, unknown))}; "
            f"known keys: {', '.join(sorted(known))}"
        )
    for key, value in data.items():
        expected = _JSON_TYPES.get(key)
        wrong_bool = isinstance(value, bool) and bool not in (expected or ())
        if expected is not None and (not isinstance(value, expected) or wrong_bool):
            kinds = " or ".join("null" if t is type(None) else t.__name__ for t in expected)
            raise PolicyError(f"{where} key {key!r} must be {kinds}, got {value!r}")
