"""The embedded model family meg-tiny: data, training, judge, loading by name.

Importing this package registers the family as a model source of `meg.split.loading`
(so `load_pipeline("meg-tiny")` works); the registry itself is imported on first load.
"""

from __future__ import annotations

from typing import Any

from meg.split.sources import register_model_source


class _EmbeddedFamilies:
    """`meg.split.sources.ModelSource` of the families under `meg/models/` (`meg.models.registry`)."""

    name = "meg.models"

    def serves(self, model: str) -> bool:
        from meg.models import registry

        # meg-tiny is always ours: the registry names what is missing when it cannot load.
        return model == "meg-tiny" or model in registry.available()

    def load_pipeline(self, model: str) -> Any:
        from meg.models import registry

        return registry.load_pipeline(model)


register_model_source(_EmbeddedFamilies())
