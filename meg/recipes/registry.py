"""Which recipe serves a request: the `meg.v1.Recipe` value → the `Recipe` object.

The built-in recipes register themselves here when this module is imported; a new recipe
(even one defined in a test) calls `register` and is then served by the unchanged edge
servicer and device client.
"""

from __future__ import annotations

import threading

from meg.errors import InvalidInputError
from meg.recipes.base import Recipe
from meg.v1 import generation_pb2 as gen_pb

__all__ = ["recipe_by_name", "recipe_for", "recipe_names", "register", "unregister"]

_RECIPES: dict[int, Recipe] = {}
_LOCK = threading.Lock()


def register(recipe: Recipe) -> Recipe:
    """Serve ``recipe`` for requests carrying its ``wire_id``; returns it."""
    with _LOCK:
        _RECIPES[int(recipe.wire_id)] = recipe
    return recipe


def unregister(wire_id: int) -> None:
    with _LOCK:
        _RECIPES.pop(int(wire_id), None)


def recipe_names() -> dict[int, str]:
    """Wire id → name of every registered recipe."""
    with _LOCK:
        return {wire_id: recipe.name for wire_id, recipe in sorted(_RECIPES.items())}


def recipe_for(wire_id: int, *, field: str = "recipe") -> Recipe:
    """The recipe for a `GenerationRequest.recipe` value (unspecified means MEG)."""
    key = gen_pb.RECIPE_MEG if wire_id == gen_pb.RECIPE_UNSPECIFIED else int(wire_id)
    with _LOCK:
        recipe = _RECIPES.get(key)
        served = ", ".join(f"{r.name} ({i})" for i, r in sorted(_RECIPES.items()))
    if recipe is None:
        name = gen_pb.Recipe.Name(key) if key in gen_pb.Recipe.values() else str(key)  # type: ignore[arg-type]
        raise InvalidInputError(f"recipe {name} is not served here (served: {served})", field=field)
    return recipe


def recipe_by_name(name: str, *, field: str = "recipe") -> Recipe:
    """The registered recipe called ``name`` (e.g. "meg", "hybrid-sr")."""
    with _LOCK:
        found = [r for r in _RECIPES.values() if r.name == name]
        served = ", ".join(sorted(r.name for r in _RECIPES.values()))
    if not found:
        raise InvalidInputError(f"unknown recipe {name!r} (served: {served})", field=field)
    return found[0]


def _register_builtin() -> None:
    from meg.recipes.hybrid_sr import HybridSrRecipe
    from meg.recipes.meg import MegRecipe
    from meg.recipes.preview_refine import PreviewRefineRecipe

    register(MegRecipe())
    register(HybridSrRecipe())
    register(PreviewRefineRecipe())


_register_builtin()
