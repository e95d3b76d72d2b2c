"""PyTorch Lightning integration: ``Trainer(plugins=[DistNormSync(...)])`` converts the model.

``DistNormSync`` is a Lightning ``LayerSync`` plugin, like ``Trainer(sync_batchnorm=True)``'s
``TorchSyncBatchNorm``, but converting with :func:`distnorm.convert_model` (same options:
``per_worker_batch_size=`` for the policy engine, or ``norm=``) and reverting with
:func:`distnorm.revert_model`. Lightning's DDP and FSDP strategies call ``apply`` in their
``setup`` for ``fit``: after ``init_process_group`` (so a plan's sync groups can be made on
every rank) and before the model is wrapped; and ``revert`` when ``fit`` ends, so the
module is plain torch again afterwards. The ranks per node default to the strategy's
processes per node (Lightning places consecutive ranks on a node), since Lightning's own
launcher does not export ``LOCAL_WORLD_SIZE``.

Resuming (``fit(ckpt_path=...)``): the DDP strategy loads the checkpoint *before* it calls
``apply``. The checkpoint of a SyncBN, FrozenBN or BN model loads into the plain model, but
one of GN+WS, BGN or BCN layers does not (other keys or shapes; a plan chooses BGN+WS below
16 samples per sync group). Pass the same object as a callback too,
``Trainer(plugins=[sync], callbacks=[sync])``: it then converts in ``Callback.setup``, after
the process group and before the checkpoint loads, and ``apply`` finds it done. The
BatchNorms must then exist at that point (built in ``__init__``, not in the module's
``setup`` or ``configure_model``). Lightning's DeepSpeed strategy never calls ``apply``;
as a callback, the object converts there too. Single-device strategies ignore plugins.

Install with ``pip install distnorm[lightning]``; ``import distnorm`` does not import Lightning.
Works with the ``lightning`` package and with ``pytorch_lightning``, whichever is installed.
"""

from __future__ import annotations

import importlib
import os
import weakref
from collections.abc import Mapping
from typing import Any

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import distnorm
from distnorm.convert import FORCEABLE_NORMS
from distnorm.errors import ConversionError
from distnorm.logs import get_logger
from distnorm.policy import Plan, load_policy


def _lightning_bases() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """The ``LayerSync`` and ``Callback`` classes of each Lightning package installed: the
    plugin must be an instance of the classes of the package whose Trainer gets it."""
    layer_syncs: list[type] = []
    callbacks: list[type] = []
    for package in ("lightning.pytorch", "pytorch_lightning"):
        try:
            plugins = importlib.import_module(f"{package}.plugins")
            callback_module = importlib.import_module(f"{package}.callbacks")
        except ImportError:
            continue
        if hasattr(plugins, "LayerSync"):  # pytorch_lightning 1.6 and later
            layer_syncs.append(plugins.LayerSync)
            callbacks.append(callback_module.Callback)
    if not layer_syncs:
        raise ImportError(
            "distnorm.lightning needs PyTorch Lightning: pip install distnorm[lightning] "
            "(or pip install lightning)"
        )
    return tuple(layer_syncs), tuple(callbacks)


_LAYER_SYNCS, _CALLBACKS = _lightning_bases()

logger = get_logger(__name__)


class DistNormSync(*_LAYER_SYNCS, *_CALLBACKS):  # type: ignore[misc]
    """Convert the LightningModule's BatchNorms with :func:`distnorm.convert_model` when
    ``fit`` sets up, and revert them with :func:`distnorm.revert_model` when it ends.

    ``DistNormSync(per_worker_batch_size=8)`` lets the policy engine plan each layer;
    ``DistNormSync(norm="gn_ws")`` forces one normalization; ``DistNormSync()`` makes every
    BatchNorm a :class:`distnorm.SyncBatchNorm` over the world. Other keyword arguments
    (``policy``, ``pretrained``, ``sample_input``, ``ranks_per_node``, ``plan``,
    ``num_groups``, ``weight_standardization``, ``check_sync``, ...) go to ``convert_model``.
    Contradictory options raise :class:`distnorm.ConversionError` here, before Lightning
    starts any process. Use as ``Trainer(plugins=[sync])``; add ``callbacks=[sync]`` to
    resume GN+WS, BGN or BCN checkpoints (module docstring).
    """

    def __init__(
        self,
        per_worker_batch_size: int | str | os.PathLike[str] | Mapping[str, Any] | None = None,
        norm: str | None = None,
        **options: Any,
    ) -> None:
        planned = per_worker_batch_size is not None or options.get("plan") is not None
        if norm is not None and planned:
            raise ConversionError(
                "DistNormSync got both norm= and a per-worker batch size or plan; give "
                "norm= to force one normalization everywhere, or per_worker_batch_size= to "
                "let the policy engine decide per layer"
            )
        if norm is not None and norm not in FORCEABLE_NORMS:
            raise ConversionError(
                f"DistNormSync(norm={norm!r}): unknown normalization; choose one of "
                f"{', '.join(FORCEABLE_NORMS)}"
            )
        plan_options = sorted(set(options) & _PLAN_OPTIONS)
        if plan_options and per_worker_batch_size is None:
            raise ConversionError(
                f"DistNormSync got planning options {plan_options} without "
                "per_worker_batch_size=...; they only apply when the policy engine plans"
            )
        if options.get("plan") is not None and not isinstance(options["plan"], Plan):
            raise ConversionError(
                f"DistNormSync(plan=...) takes a distnorm.Plan, got {type(options['plan'])}"
            )
        if options.get("policy") is not None:
            load_policy(options["policy"])  # a misspelt policy fails now, not on every rank
        self.per_worker_batch_size = per_worker_batch_size
        self.norm = norm
        self.options = options
        self._init_state()

    def _init_state(self) -> None:
        # Models converted at Callback.setup -> names of their BatchNorm-derived layers
        # just after; apply() finds them converted and checks that none were added since.
        self._converted_at_setup: weakref.WeakKeyDictionary[nn.Module, frozenset[str]] = (
            weakref.WeakKeyDictionary()
        )

    def __getstate__(self) -> dict[str, Any]:
        # ddp_spawn pickles the Trainer and its plugins; the weak references stay behind.
        state = self.__dict__.copy()
        del state["_converted_at_setup"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_state()

    def apply(self, model: nn.Module) -> nn.Module:
        """Convert ``model`` (the LightningModule) in place and return it; Lightning calls
        this on every rank in the strategy's ``setup`` for ``fit``."""
        if model in self._converted_at_setup:
            added = _batchnorm_names(model) - self._converted_at_setup[model]
            if added:
                raise ConversionError(
                    f"DistNormSync converted {type(model).__name__} in Callback.setup, but "
                    f"BatchNorm layers {sorted(added)} appeared afterwards (built in the "
                    "LightningModule's setup or configure_model hook?). Build them in "
                    "__init__, or pass DistNormSync only as a plugin, not also as a callback"
                )
            return model  # converted already, before the checkpoint was loaded
        return self._convert(model)

    def revert(self, model: nn.Module) -> nn.Module:
        """Plain torch modules again (:func:`distnorm.revert_model`); Lightning calls this
        when ``fit`` ends, also when it ends with an exception."""
        self._converted_at_setup.pop(model, None)
        reverted = distnorm.revert_model(model)
        logger.info("distnorm.lightning: %s reverted to torch modules", _kind(model))
        return reverted

    # Callback hooks: only active when the object is also in Trainer(callbacks=[...]).

    def setup(self, trainer: Any, pl_module: nn.Module, stage: str) -> None:
        """Convert for ``fit`` before the checkpoint is restored (Lightning has joined the
        process group by then)."""
        if stage != "fit" or pl_module in self._converted_at_setup:
            return
        if not _batchnorm_names(pl_module):
            return  # nothing built yet: apply() converts, or reports layers built too late
        converted = self._convert(pl_module)
        self._converted_at_setup[converted] = _batchnorm_names(converted)
        logger.info(
            "distnorm.lightning: %s converted at Callback.setup, before any checkpoint loads",
            _kind(pl_module),
        )

    def teardown(self, trainer: Any, pl_module: nn.Module, stage: str) -> None:
        """Revert what ``setup`` converted under a strategy that never calls ``revert``."""
        if stage == "fit" and pl_module in self._converted_at_setup:
            self.revert(pl_module)

    def _convert(self, model: nn.Module) -> nn.Module:
        options = dict(self.options)
        if self.per_worker_batch_size is not None and not {"ranks_per_node", "world_size"} & set(
            options
        ):
            per_node = _processes_per_node(model)
            if per_node is not None:
                options["ranks_per_node"] = per_node
        return distnorm.convert_model(model, self.per_worker_batch_size, norm=self.norm, **options)

    def __repr__(self) -> str:
        given = {"per_worker_batch_size": self.per_worker_batch_size, "norm": self.norm}
        arguments = [f"{k}={v!r}" for k, v in {**given, **self.options}.items() if v is not None]
        return f"DistNormSync({', '.join(arguments)})"


# convert_model's options that only the policy engine reads.
_PLAN_OPTIONS = frozenset({"policy", "pretrained", "sample_input", "world_size", "ranks_per_node"})


def _batchnorm_names(model: nn.Module) -> frozenset[str]:
    return frozenset(name for name, m in model.named_modules() if isinstance(m, _BatchNorm))


def _processes_per_node(model: nn.Module) -> int | None:
    """The Lightning strategy's processes per node, where ``model`` is attached to a
    Trainer whose strategy has them; None otherwise."""
    trainer = getattr(model, "_trainer", None)
    per_node = getattr(getattr(trainer, "strategy", None), "num_processes", None)
    return per_node if isinstance(per_node, int) and per_node > 0 else None


def _kind(model: nn.Module) -> str:
    return type(model).__name__
