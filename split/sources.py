"""Named model sources: who serves a model name that is neither built in nor a folder.

`meg.split.loading.load_pipeline` knows two kinds of model by itself (the tiny-random
pipelines built from configs, and local diffusers folders). Any other name is served by a
registered source, e.g. the embedded meg-tiny family, which `meg.models` registers when it
is imported. The source is passed in rather than looked up by module name, so that this
package never imports the layers above it; and this module imports nothing heavy, so that
registering a source costs nothing at start-up.
"""

from __future__ import annotations

import threading
from typing import Any, Protocol

__all__ = ["ModelSource", "model_source_for", "model_sources", "register_model_source"]


class ModelSource(Protocol):
    """Loads pipelines by name (e.g. `meg.models.registry`)."""

    name: str
    """What the source is, for error messages (e.g. "meg.models")."""

    def serves(self, model: str) -> bool:
        """Whether `model` is this source's to load (it may still fail, naming what is missing)."""
        ...

    def load_pipeline(self, model: str) -> Any:
        """The float32 pipeline called `model`; raises `ModelNotFoundError` naming what is missing."""
        ...


_LOCK = threading.Lock()
_SOURCES: dict[str, ModelSource] = {}


def register_model_source(source: ModelSource) -> None:
    """Add `source` (replacing one registered under the same name); the first source that
    serves a name loads it."""
    with _LOCK:
        _SOURCES[source.name] = source


def model_sources() -> list[ModelSource]:
    """The registered sources, in registration order."""
    with _LOCK:
        return list(_SOURCES.values())


def model_source_for(model: str) -> ModelSource | None:
    """The first registered source that serves `model`, or None."""
    return next((source for source in model_sources() if source.serves(model)), None)
