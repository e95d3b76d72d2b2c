"""Which normalization each layer of a model should use, given how it is trained.

``distnorm.plan(model, per_worker_batch_size)`` returns a :class:`Plan`: data, printable
as a table, serializable to JSON, applied by ``distnorm.convert_model``. The decisions
and their sources are in :mod:`distnorm.policy.rules`; the knobs, and the YAML policies
that set them, in :mod:`distnorm.policy.config`.
"""

from distnorm.errors import PolicyError
from distnorm.policy.batch_config import per_worker_batch_size_from_config
from distnorm.policy.config import Override, Policy, available_policies, load_policy
from distnorm.policy.planner import plan
from distnorm.policy.plans import NORMS, LayerPlan, Plan

__all__ = [
    "NORMS",
    "LayerPlan",
    "Override",
    "Plan",
    "Policy",
    "PolicyError",
    "available_policies",
    "load_policy",
    "per_worker_batch_size_from_config",
    "plan",
]
