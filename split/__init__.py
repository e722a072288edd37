"""Pipelines, stage graph, split points, ONNX export and runtimes.

Names are imported lazily (``from meg.split import SplitEngine``), so that importing a
light module such as `meg.split.points` does not load diffusers.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name → defining module (relative to this package)
_EXPORTS: dict[str, str] = {
    "load_pipeline": "loading",
    "SplitPoint": "points",
    "GenerationInputs": "engine",
    "TensorSpec": "engine",
    "PartitionFlops": "flops",
    "SplitEngine": "engine",
    "ToMeAdapter": "tome",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
