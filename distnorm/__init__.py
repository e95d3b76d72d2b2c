"""distnorm: normalization layers that are correct and fast under data-parallel training.

model = distnorm.convert_model(model)     # every BatchNorm -> SyncBatchNorm (one all-reduce)
print(distnorm.conversion_report(model))  # what was replaced, where
model = distnorm.revert_model(model)      # plain torch modules again, for export
"""

from distnorm.convert import ConversionReport, conversion_report, convert_model, revert_model
from distnorm.errors import ConversionError, DistNormError, InputError
from distnorm.layers import SyncBatchNorm

__version__ = "0.1.0"

__all__ = [
    "ConversionError",
    "ConversionReport",
    "DistNormError",
    "InputError",
    "SyncBatchNorm",
    "conversion_report",
    "convert_model",
    "revert_model",
]
