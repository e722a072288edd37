"""Recipes: the published systems (MEG, Hybrid SR, preview-refine) on one framework.

One module per recipe (`meg.recipes.meg`, …), each a `Recipe` subclass registered by its
wire id; the interface is in `meg.recipes.base`, the plan every policy produces in
`meg.recipes.plan` and the one report schema in `meg.recipes.report`. Names are imported
lazily.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    "DeviceContext": "base",
    "DeviceHalf": "base",
    "DeviceOutput": "base",
    "EdgeContext": "base",
    "EdgeJob": "base",
    "Outgoing": "base",
    "Recipe": "base",
    "UplinkInbox": "base",
    "GenerationReport": "report",
    "PartCost": "report",
    "MEG_TOME_RATIO": "plan",
    "Plan": "plan",
    "make_plan": "plan",
    "plan_from_proto": "plan",
    "plan_to_proto": "plan",
    "recipe_for": "registry",
    "register": "registry",
    "unregister": "registry",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
