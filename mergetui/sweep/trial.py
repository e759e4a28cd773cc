"""One trial's recipe: the sweep's starting recipe with the trial's values put in.

A trial may switch the method: parameters the new method does not have are dropped from the
starting recipe (``density`` means nothing to ``task_arithmetic``), and swept values that do not
apply to the trial's method are left out, so every trial is a valid recipe of its own method.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mergetui.methods.registry import get_method
from mergetui.recipe.schema import Recipe
from mergetui.recipe.toml_io import recipe_to_data
from mergetui.recipe.validate import validate_recipe_data
from mergetui.sweep.spec import Choice, Dimension, Range


def applicable(key: str, method: str) -> bool:
    """Whether the swept ``key`` means something to ``method``."""
    if key == "merge.method":
        return True
    spec = get_method(method)
    name = key.rsplit(".", 1)[1]
    return spec is not None and spec.param(name) is not None


def trial_data(base: Recipe, values: dict[str, Any], output: Path) -> dict[str, Any]:
    """Recipe data (absolute paths) for ``values`` (``key → value``), written to ``output``."""
    data = recipe_to_data(base, absolute_paths=True)
    method = str(values.get("merge.method", base.method))
    spec = get_method(method)
    assert spec is not None  # the sweep file was validated
    merge = data["merge"]
    merge["method"] = method
    params = {k: v for k, v in merge.get("parameters", {}).items() if spec.param(k) is not None}
    for model in data.get("models", []):
        for key in [k for k in model if k not in ("model", "lora") and spec.param(k) is None]:
            del model[key]
    for key, value in values.items():
        if key == "merge.method" or not applicable(key, method):
            continue
        head, name = key.rsplit(".", 1)
        if head == "merge.parameters":
            params[name] = value
        else:
            index = int(head[len("models[") : -1])
            data["models"][index][name] = value
    merge["parameters"] = params
    if not params:
        del merge["parameters"]
    data["version"] = 2
    data["output"]["path"] = str(output)
    return data


def trial_recipe(base: Recipe, values: dict[str, Any], output: Path) -> Recipe:
    """The validated recipe of one trial (a :class:`RecipeError` names what is wrong)."""
    return validate_recipe_data(
        trial_data(base, values, output), base_dir=base.base_dir, source_file=base.source_file
    )


def middle(dimension: Dimension) -> Any:
    """A representative value of a dimension (its first choice, or its range's midpoint), for
    checking every method of the space against the recipe before the sweep starts."""
    domain = dimension.domain
    if isinstance(domain, Choice):
        return domain.values[0]
    assert isinstance(domain, Range)
    value = (domain.low + domain.high) / 2
    return round(value) if domain.integer else value


def grid_values(dimension: Dimension) -> list[Any]:
    """Every value of a dimension on a grid: its choices, or its range in steps."""
    domain = dimension.domain
    if isinstance(domain, Choice):
        return list(domain.values)
    assert isinstance(domain, Range) and domain.step is not None
    values = []
    count = int((domain.high - domain.low) / domain.step + 1e-9)
    for step in range(count + 1):
        value = round(domain.low + step * domain.step, 10)
        values.append(int(value) if domain.integer else value)
    return values
