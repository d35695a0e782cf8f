"""The hybrid SLM→LLM router: policies (:mod:`.policies`), the pipeline (:mod:`.pipeline`)
and the offline evaluation of policies over recorded drafts (:mod:`.evaluate`).

The service side is :class:`edgelm.server.hybrid_model.HybridModels` (``model="hybrid..."``).
"""

from edgelm.hybrid.pipeline import REFINE_PROMPT, HybridRouter, RouteRecord
from edgelm.hybrid.policies import (
    AllOf,
    Always,
    AnyOf,
    Confidence,
    Decision,
    Draft,
    Escalate,
    Insufficient,
    Keywords,
    Length,
    Never,
    Policy,
    Verdict,
    parse_policy,
    route_for,
)

__all__ = [
    "REFINE_PROMPT",
    "AllOf",
    "Always",
    "AnyOf",
    "Confidence",
    "Decision",
    "Draft",
    "Escalate",
    "HybridRouter",
    "Insufficient",
    "Keywords",
    "Length",
    "Never",
    "Policy",
    "RouteRecord",
    "Verdict",
    "parse_policy",
    "route_for",
]
