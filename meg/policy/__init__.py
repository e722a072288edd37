"""MEG policy: constrained MDP, CVPO and baselines.

The serving surface is re-exported lazily (importing it loads torch):
`Policy` (Observation proto → Plan proto), `load_policy(checkpoint | "cvpo" | "rule")`,
`rule_policy()`.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["Policy", "load_policy", "rule_policy"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("meg.policy.serving"), name)
    raise AttributeError(f"module 'meg.policy' has no attribute {name!r}")
