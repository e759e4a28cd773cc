"""The sweep file: a recipe to start from, a search space over its values, and an objective.

```toml
version = 1
recipe = "base.toml"
[sweep]
strategy = "tpe"          # grid | random | tpe
trials = 40               # ignored by grid (every combination runs)
seed = 0
workers = 1               # trials at once (local processes, or Ray tasks with ray = "auto")
scratch = "auto"          # where trials merge: memory (/dev/shm) when they fit | memory | disk
output = "./sweep-out"
keep = 1                  # merged outputs kept: the best k
[sweep.objective]
tasks = { math = "tasks/math.jsonl", code = "tasks/code.jsonl" }
score = "mean_retained"   # mean_retained | mean_accuracy | a task name
limit = 200               # rows per task
[sweep.space]             # dotted recipe keys
"merge.method" = ["ties", "task_arithmetic"]
"models[*].weight" = { low = 0.2, high = 1.2 }   # one dimension per model
"merge.parameters.normalize" = [true, false]
```

Validated as strictly as a recipe, before anything is merged: unknown keys, a space key that is a
parameter of no method in the space, a range outside the parameter's own or empty, a task file
that does not exist. Every problem is listed at once, each naming its key.
"""

from __future__ import annotations

import hashlib
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergetui.errors import RecipeError
from mergetui.methods.registry import METHODS, MethodSpec, ParamSpec, get_method
from mergetui.recipe.schema import Recipe

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

STRATEGIES = ("grid", "random", "tpe")
SCRATCH = ("auto", "memory", "disk")
SCORES = ("mean_retained", "mean_accuracy")
TOP_KEYS = ("version", "recipe", "sweep")
SWEEP_KEYS = (
    "strategy",
    "trials",
    "seed",
    "workers",
    "ray",
    "scratch",
    "output",
    "keep",
    "objective",
    "space",
)
OBJECTIVE_KEYS = ("tasks", "score", "limit")
RANGE_KEYS = ("low", "high", "log", "step")
_MODEL_KEY = re.compile(r"^models\[(\*|\d+)\]\.([A-Za-z_]\w*)$")
_GLOBAL_KEY = re.compile(r"^merge\.parameters\.([A-Za-z_]\w*)$")


@dataclass(frozen=True)
class Choice:
    """A dimension that takes one of ``values``."""

    values: tuple[Any, ...]


@dataclass(frozen=True)
class Range:
    """A number between ``low`` and ``high`` (inclusive), on a log scale or in steps if asked;
    ``integer`` for a whole-number parameter."""

    low: float
    high: float
    log: bool = False
    step: float | None = None
    integer: bool = False


Domain = Choice | Range


@dataclass(frozen=True)
class Dimension:
    """One searched value: its recipe key (``models[1].weight``, ``merge.parameters.lambda``,
    ``merge.method``) and its domain."""

    key: str
    domain: Domain


@dataclass(frozen=True)
class Objective:
    tasks: dict[str, Path]
    score: str = "mean_retained"
    limit: int | None = None


@dataclass
class Sweep:
    """A validated sweep file."""

    source: Path
    recipe_path: Path
    recipe: Recipe
    strategy: str
    trials: int
    seed: int
    output: Path
    keep: int
    objective: Objective
    dimensions: list[Dimension]
    workers: int = 1
    ray: str | None = None
    scratch: str = "auto"
    text_hash: str = ""
    methods: tuple[str, ...] = field(default_factory=tuple)


def _methods_in(space: dict[str, Any], recipe: Recipe) -> list[MethodSpec]:
    names = space.get("merge.method")
    if isinstance(names, list) and names:
        return [m for n in names if isinstance(n, str) and (m := get_method(n)) is not None]
    spec = get_method(recipe.method)
    return [spec] if spec is not None else []


def _param(methods: list[MethodSpec], name: str) -> ParamSpec | None:
    for method in methods:
        found = method.param(name)
        if found is not None:
            return found
    return None


def _domain(where: str, raw: Any, param: ParamSpec | None, problems: list[str]) -> Domain | None:
    """A list of choices, or a ``{low, high, log, step}`` range inside the parameter's own."""
    if isinstance(raw, list):
        if not raw:
            problems.append(f"{where}: an empty list of choices; give at least one value")
            return None
        if param is not None:
            for value in raw:
                _, problem = param.coerce(value)
                if problem:
                    problems.append(f"{where}: {value!r} {problem}")
                    return None
        return Choice(tuple(raw))
    if not isinstance(raw, dict):
        problems.append(
            f"{where}: give a list of choices ([0.3, 0.5]) or a range ({{ low = 0.1, high = 1 }}), "
            f"not {raw!r}"
        )
        return None
    unknown = [k for k in raw if k not in RANGE_KEYS]
    if unknown:
        problems.append(f"{where}.{unknown[0]}: unknown key; allowed: {', '.join(RANGE_KEYS)}")
        return None
    low, high = raw.get("low"), raw.get("high")
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high))
    if not numbers:
        problems.append(
            f"{where}: a range needs numbers low and high, e.g. {{ low = 0.1, high = 1 }}"
        )
        return None
    assert isinstance(low, (int, float)) and isinstance(high, (int, float))
    if param is not None and param.kind is bool:
        problems.append(f"{where}: {param.name} is true or false; give [true, false]")
        return None
    if not low < high:
        problems.append(f"{where}: the range is empty (low {low} is not below high {high})")
        return None
    log = raw.get("log", False)
    step = raw.get("step")
    if not isinstance(log, bool):
        problems.append(f"{where}.log: must be true or false")
        return None
    if log and low <= 0:
        problems.append(f"{where}: a log range needs low > 0")
        return None
    if step is not None and (
        not isinstance(step, (int, float)) or isinstance(step, bool) or step <= 0
    ):
        problems.append(f"{where}.step: must be a number > 0")
        return None
    if param is not None:
        for end in (low, high):
            _, problem = param.coerce(end)
            if problem:
                problems.append(
                    f"{where}: {end} is outside {param.name}'s range {param.range_text()} "
                    f"({problem})"
                )
                return None
    integer = param is not None and param.kind is int
    return Range(float(low), float(high), log, None if step is None else float(step), integer)


def _dimensions(space: Any, recipe: Recipe, problems: list[str]) -> list[Dimension]:
    if not isinstance(space, dict) or not space:
        problems.append(
            'sweep.space: missing or empty; add e.g. "models[*].weight" = { low = 0.2, high = 1 }'
        )
        return []
    methods = _methods_in(space, recipe)
    dimensions: list[Dimension] = []
    for key, raw in space.items():
        where = f"sweep.space.{key!r}"
        if key == "merge.method":
            if not isinstance(raw, list) or not raw:
                problems.append(f'{where}: a list of methods, e.g. ["ties", "task_arithmetic"]')
                continue
            bad = [n for n in raw if not isinstance(n, str) or get_method(n) is None]
            if bad:
                from mergetui.recipe.validate import did_you_mean

                problems.append(
                    f"{where}: unknown method {bad[0]!r}{did_you_mean(str(bad[0]), list(METHODS))}"
                )
                continue
            dimensions.append(Dimension(key, Choice(tuple(raw))))
            continue
        model = _MODEL_KEY.match(key)
        merged = _GLOBAL_KEY.match(key)
        if not model and not merged:
            problems.append(
                f'{where}: not a key a sweep can vary; use "merge.method", '
                '"merge.parameters.NAME", "models[*].NAME" or "models[i].NAME"'
            )
            continue
        name = (model or merged).group(2 if model else 1)  # type: ignore[union-attr]
        param = _param(methods, name)
        names = ", ".join(m.name for m in methods)
        if param is None:
            problems.append(
                f"{where}: {name} is a parameter of none of the methods swept ({names})"
            )
            continue
        if model and param.scope != "model":
            problems.append(
                f'{where}: {name} is a method-wide parameter; sweep it as "merge.parameters.{name}"'
            )
            continue
        domain = _domain(where, raw, param, problems)
        if domain is None:
            continue
        if model and model.group(1) == "*":
            if recipe.slices:
                problems.append(f"{where}: a recipe of [[slices]] has no [[models]] to sweep")
                continue
            dimensions += [
                Dimension(f"models[{i}].{name}", domain) for i in range(len(recipe.models))
            ]
        elif model:
            index = int(model.group(1))
            if index >= len(recipe.models):
                problems.append(f"{where}: the recipe has {len(recipe.models)} model(s)")
                continue
            dimensions.append(Dimension(key, domain))
        else:
            dimensions.append(Dimension(key, domain))
    return dimensions


def _objective(raw: Any, base_dir: Path, problems: list[str]) -> Objective | None:
    if not isinstance(raw, dict):
        problems.append(
            'sweep.objective: missing; add [sweep.objective] with tasks = { math = "math.jsonl" }'
        )
        return None
    for key in raw:
        if key not in OBJECTIVE_KEYS:
            problems.append(
                f"sweep.objective.{key}: unknown key; allowed: {', '.join(OBJECTIVE_KEYS)}"
            )
    tasks = raw.get("tasks")
    files: dict[str, Path] = {}
    if not isinstance(tasks, dict) or not tasks:
        problems.append('sweep.objective.tasks: give the task files, e.g. { math = "math.jsonl" }')
    else:
        for name, path in tasks.items():
            if not isinstance(path, str):
                problems.append(f"sweep.objective.tasks.{name}: a file path, not {path!r}")
                continue
            file = Path(path).expanduser()
            file = file if file.is_absolute() else base_dir / file
            if not file.is_file():
                problems.append(f"sweep.objective.tasks.{name}: file not found: {file}")
            files[name] = file
    score = raw.get("score", "mean_retained")
    if score not in SCORES and score not in files:
        problems.append(
            f"sweep.objective.score: {score!r} is neither {', '.join(SCORES)} nor a task name "
            f"({', '.join(files) or 'no tasks'})"
        )
    limit = raw.get("limit")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        problems.append(f"sweep.objective.limit: a whole number >= 1, not {limit!r}")
        limit = None
    return Objective(files, str(score), limit)


def _whole(sweep: dict[str, Any], key: str, default: int, minimum: int, problems: list[str]) -> int:
    value = sweep.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        problems.append(f"sweep.{key}: a whole number >= {minimum}, not {value!r}")
        return default
    return value


def load_sweep(path: str | Path) -> Sweep:
    """Read and validate a sweep file (its recipe too); every problem in one :class:`RecipeError`."""
    from mergetui.recipe import load_recipe

    file = Path(path).expanduser()
    if not file.is_file():
        raise RecipeError([f"sweep file not found ({file.resolve()}); check the path"], str(path))
    text = file.read_text(encoding="utf-8")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError([f"not valid TOML: {exc}"], str(path)) from exc
    base_dir = file.resolve().parent
    problems = [
        f"{k}: unknown key; allowed: {', '.join(TOP_KEYS)}" for k in data if k not in TOP_KEYS
    ]
    if data.get("version", 1) != 1:
        problems.append("version: this mergetui reads sweep files of version 1")
    recipe_text = data.get("recipe")
    if not isinstance(recipe_text, str):
        raise RecipeError(problems + ["recipe: missing; say which recipe to start from"], str(path))
    recipe_path = Path(recipe_text).expanduser()
    recipe_path = recipe_path if recipe_path.is_absolute() else base_dir / recipe_path
    recipe = load_recipe(recipe_path)  # its own errors name its file
    sweep = data.get("sweep")
    if not isinstance(sweep, dict):
        raise RecipeError(problems + ["sweep: missing; add a [sweep] table"], str(path))
    problems += [
        f"sweep.{k}: unknown key; allowed: {', '.join(SWEEP_KEYS)}"
        for k in sweep
        if k not in SWEEP_KEYS
    ]
    strategy = sweep.get("strategy", "tpe")
    if strategy not in STRATEGIES:
        problems.append(f"sweep.strategy: {strategy!r}; use one of {', '.join(STRATEGIES)}")
    trials = _whole(sweep, "trials", 20, 1, problems)
    seed = _whole(sweep, "seed", 0, 0, problems)
    keep = _whole(sweep, "keep", 1, 0, problems)
    workers = _whole(sweep, "workers", 1, 1, problems)
    ray = sweep.get("ray")
    if ray is not None and (not isinstance(ray, str) or not ray.strip()):
        problems.append(
            'sweep.ray: a Ray cluster\'s address ("auto", "HOST:PORT" or "ray://HOST:PORT"), '
            f"not {ray!r}"
        )
        ray = None
    scratch = sweep.get("scratch", "auto")
    if scratch not in SCRATCH:
        problems.append(f"sweep.scratch: {scratch!r}; use one of {', '.join(SCRATCH)}")
        scratch = "auto"
    output_text = sweep.get("output", "./sweep-out")
    if not isinstance(output_text, str) or not output_text:
        problems.append("sweep.output: a folder path")
        output_text = "./sweep-out"
    output = Path(output_text).expanduser()
    output = output if output.is_absolute() else base_dir / output
    dimensions = _dimensions(sweep.get("space"), recipe, problems)
    objective = _objective(sweep.get("objective"), base_dir, problems)
    if strategy == "grid":
        for dimension in dimensions:
            domain = dimension.domain
            if isinstance(domain, Range) and domain.step is None:
                problems.append(
                    f"sweep.space.{dimension.key!r}: a grid needs a list of values or a range "
                    "with a step"
                )
    if not problems:
        problems += _check_methods(recipe, dimensions, output)
    if problems:
        raise RecipeError(problems, str(path))
    assert objective is not None
    methods = _swept_methods(dimensions)
    return Sweep(
        source=file,
        recipe_path=recipe_path,
        recipe=recipe,
        strategy=strategy,
        trials=trials,
        seed=seed,
        output=output,
        keep=keep,
        objective=objective,
        dimensions=dimensions,
        workers=workers,
        ray=ray,
        scratch=scratch,
        text_hash=hashlib.sha256(text.encode() + recipe_path.read_bytes()).hexdigest(),
        methods=methods or (recipe.method,),
    )


def _check_methods(recipe: Recipe, dimensions: list[Dimension], output: Path) -> list[str]:
    """Every method of the space, with representative values, must make a valid recipe (a method
    that needs a base the recipe lacks, a required parameter nobody gives...)."""
    from mergetui.sweep.trial import middle, trial_recipe

    problems = []
    for method in _swept_methods(dimensions) or (recipe.method,):
        values = {d.key: middle(d) for d in dimensions}
        values["merge.method"] = method
        try:
            trial_recipe(recipe, values, output / "check")
        except RecipeError as exc:
            problems += [f"sweep.space: with merge.method = {method!r}: {p}" for p in exc.problems]
    return problems


def _swept_methods(dimensions: list[Dimension]) -> tuple[str, ...]:
    for dimension in dimensions:
        if dimension.key == "merge.method" and isinstance(dimension.domain, Choice):
            return tuple(str(v) for v in dimension.domain.values)
    return ()
