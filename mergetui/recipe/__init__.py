"""Recipes: the schema, validation against the method registry, and TOML I/O."""

from mergetui.recipe.schema import ModelEntry, Recipe
from mergetui.recipe.toml_io import dump_recipe, load_recipe, parse_recipe, recipe_to_toml

__all__ = ["ModelEntry", "Recipe", "dump_recipe", "load_recipe", "parse_recipe", "recipe_to_toml"]
