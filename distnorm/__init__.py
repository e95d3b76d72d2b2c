"""distnorm: normalization layers that are correct and fast under data-parallel training.

print(distnorm.plan(model, per_worker_batch_size=2))        # what the policy would do, per layer
model = distnorm.convert_model(model, per_worker_batch_size=2)  # ... and doing it
model = distnorm.convert_model(model, norm="gn_ws")          # or force one norm everywhere
model = distnorm.convert_model(model)                        # or SyncBatchNorm everywhere
print(distnorm.conversion_report(model))  # what was replaced, where
model = distnorm.revert_model(model)      # plain torch modules again, for export
distnorm.report()                         # raise/warn now for what the layers' checks found
distnorm.NORMS["bgn"]                     # what each norm= name is (layer, sync, groups, WS)
"""

from distnorm.builders import norm_layer
from distnorm.convert import (
    ConversionReport,
    conversion_report,
    convert_model,
    revert_model,
    standardize_weights,
)
from distnorm.errors import (
    ConversionError,
    DistNormError,
    InputError,
    PolicyError,
    SyncMismatchError,
)
from distnorm.health import report
from distnorm.layers import (
    BatchChannelNorm,
    BatchGroupNorm,
    FrozenBatchNorm,
    FrozenBatchNorm1d,
    FrozenBatchNorm2d,
    FrozenBatchNorm3d,
    SyncBatchNorm,
    SyncBatchNorm1d,
    SyncBatchNorm2d,
    SyncBatchNorm3d,
    WSConv1d,
    WSConv2d,
    WSConv3d,
    register_norm_act,
)
from distnorm.norms import NORMS, Norm
from distnorm.policy import (
    LayerPlan,
    Plan,
    Policy,
    available_policies,
    load_policy,
    per_worker_batch_size_from_config,
    plan,
)
from distnorm.uneven import even_steps

__version__ = "0.1.0"

__all__ = [
    "BatchChannelNorm",
    "BatchGroupNorm",
    "ConversionError",
    "ConversionReport",
    "DistNormError",
    "FrozenBatchNorm",
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
    "InputError",
    "LayerPlan",
    "NORMS",
    "Norm",
    "Plan",
    "Policy",
    "PolicyError",
    "SyncBatchNorm",
    "SyncBatchNorm1d",
    "SyncBatchNorm2d",
    "SyncBatchNorm3d",
    "SyncMismatchError",
    "WSConv1d",
    "WSConv2d",
    "WSConv3d",
    "available_policies",
    "conversion_report",
    "convert_model",
    "even_steps",
    "load_policy",
    "norm_layer",
    "per_worker_batch_size_from_config",
    "plan",
    "register_norm_act",
    "report",
    "revert_model",
    "standardize_weights",
]
