"""Recipes: the schema, validation against the method registry, and TOML I/O."""

from mergetui.recipe.adapters import AdapterRecipe, AdapterSource
from mergetui.recipe.schema import ModelEntry, Recipe
from mergetui.recipe.toml_io import (
    dump_recipe,
    load_any_recipe,
    load_recipe,
    parse_any_recipe,
    parse_recipe,
    recipe_to_toml,
)

__all__ = [
    "AdapterRecipe",
    "AdapterSource",
    "ModelEntry",
    "Recipe",
    "dump_recipe",
    "load_any_recipe",
    "load_recipe",
    "parse_any_recipe",
    "parse_recipe",
    "recipe_to_toml",
]
