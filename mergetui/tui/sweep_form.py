"""The sweep step's form as plain data (no Textual here): what its fields hold, the sweep file
they make, and which field each of the sweep validator's problems is about.

Nothing here validates. The fields' text goes into the sweep file's data as typed: a number once
it reads as one, else the text itself, so that :func:`mergetui.sweep.spec.load_sweep` (the very
check ``mergetui sweep`` runs) says what is wrong with it, naming its key. :func:`problems` writes
the draft's recipe and the sweep file into a scratch folder and loads them that way, so the form
and the command can never disagree about what a valid sweep is.

The sweep file lives in the job folder beside a copy of the recipe, so the paths the user types
(task files, the output folder) are made absolute against the draft's folder first, where the
user means them.
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mergetui.methods.registry import METHODS, ParamSpec, get_method
from mergetui.tui.values import number_text

if TYPE_CHECKING:
    from mergetui.tui.state import RecipeDraft

#: the names of the files a sweep job is made of (the sweep file names the recipe beside it)
RECIPE_NAME = "recipe.toml"
SWEEP_NAME = "sweep.toml"
#: a dimension's two kinds of domain
RANGE, CHOICES = "range", "choices"
METHOD_KEY = "merge.method"
#: what a problem's location looks like: ``sweep.space.'models[*].weight'`` and the like
_SPACE_KEY = re.compile(r"^sweep\.space\.'([^']+)'")
_TASK_KEY = re.compile(r"^sweep\.objective\.tasks\.(.+)$")
#: the ``[sweep]`` keys with a field of their own, and the ``[sweep.objective]`` ones
SWEEP_FIELDS = ("strategy", "trials", "seed", "workers", "ray", "keep", "output")
OBJECTIVE_FIELDS = ("score", "limit")


@dataclass
class DimensionFields:
    """One row of the search space as typed: its recipe key and its domain, a list of choices
    (``ties, task_arithmetic`` or ``0.3, 0.5``) or a range (low, high, and an optional step and
    log scale)."""

    key: str
    kind: str = RANGE
    choices: str = ""
    low: str = ""
    high: str = ""
    step: str = ""
    log: bool = False

    def domain(self) -> Any:
        """The domain as the sweep file's data (a list, or a ``{low, high, …}`` table)."""
        if self.kind == CHOICES:
            items = [item.strip() for item in self.choices.split(",")]
            return [scalar(item) for item in items if item]
        table: dict[str, Any] = {"low": number(self.low), "high": number(self.high)}
        if self.step.strip():
            table["step"] = number(self.step)
        if self.log:
            table["log"] = True
        return table


@dataclass
class TaskFields:
    """One task file row: ``name = path`` (the name defaults to the file's stem)."""

    name: str = ""
    path: str = ""

    @property
    def task_name(self) -> str:
        return self.name.strip() or Path(self.path.strip()).stem


@dataclass
class SweepForm:
    """Every field of the sweep step, as text (``log`` aside), in the sweep file's terms."""

    strategy: str = "tpe"
    trials: str = "20"
    seed: str = "0"
    workers: str = "1"
    ray: str = ""  # a Ray cluster's address; empty: trials run on this machine
    keep: str = "1"
    output: str = "./sweep-out"
    #: start over when the output folder holds another version of this sweep (``--restart``)
    restart: bool = False
    tasks: list[TaskFields] = field(default_factory=lambda: [TaskFields()])
    score: str = "mean_retained"
    limit: str = ""
    space: list[DimensionFields] = field(default_factory=list)

    @classmethod
    def for_draft(cls, draft: RecipeDraft) -> SweepForm:
        """A form for a sweep of ``draft``: the output beside the draft's own (``merged`` →
        ``merged-sweep``) and a space suggested from its method (:func:`suggested_space`)."""
        output = draft.output.rstrip("/") or "merged"
        return cls(output=f"{output}-sweep", space=suggested_space(draft))

    def task_files(self) -> list[TaskFields]:
        """The task rows that name a file (rows left empty, or with a name only, are being
        filled in and are left out)."""
        return [task for task in self.tasks if task.path.strip()]

    def to_data(self, base_dir: Path) -> dict[str, Any]:
        """The sweep file's data, its paths absolute against ``base_dir`` (the draft's folder)."""
        sweep: dict[str, Any] = {"strategy": self.strategy}
        for name in ("trials", "seed", "workers", "keep"):
            text = getattr(self, name).strip()
            if text:  # empty: the sweep file's default
                sweep[name] = number(text)
        if self.ray.strip():
            sweep["ray"] = self.ray.strip()
        sweep["output"] = absolute(self.output, base_dir)
        objective: dict[str, Any] = {
            "tasks": {task.task_name: absolute(task.path, base_dir) for task in self.task_files()},
            "score": self.score,
        }
        if self.limit.strip():
            objective["limit"] = number(self.limit)
        sweep["objective"] = objective
        sweep["space"] = {row.key: row.domain() for row in self.space}
        return {"version": 1, "recipe": RECIPE_NAME, "sweep": sweep}

    def to_toml(self, base_dir: Path) -> str:
        import tomli_w

        return tomli_w.dumps(self.to_data(base_dir))


def number(text: str) -> Any:
    """An int or a float when ``text`` reads as one, else the text (for the validator to name)."""
    text = text.strip()
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def scalar(text: str) -> Any:
    """One choice: ``true``/``false``, a number, or a word (a method's name; quotes dropped)."""
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    value = number(text)
    return value.strip("\"'") if isinstance(value, str) else value


def absolute(path: str, base_dir: Path) -> str:
    """``path`` as the user means it: relative to the draft's folder (empty stays empty)."""
    text = path.strip()
    if not text:
        return ""
    resolved = Path(text).expanduser()
    return str(resolved if resolved.is_absolute() else base_dir / resolved)


# -- the search space's keys, from the method registry ----------------------------------------------
def param_of(key: str, method: str) -> ParamSpec | None:
    """The parameter a space key varies: the draft's method's own, else the first method's that
    has one of that name (a key for a method the space switches to)."""
    name = key.rsplit(".", 1)[-1]
    spec = get_method(method)
    found = spec.param(name) if spec is not None else None
    if found is not None:
        return found
    return next((p for m in METHODS.values() if (p := m.param(name)) is not None), None)


def _key(param: ParamSpec, per_model: bool, index: str = "*") -> str:
    return f"models[{index}].{param.name}" if per_model else f"merge.parameters.{param.name}"


def space_keys(draft: RecipeDraft) -> list[str]:
    """The keys a sweep of ``draft`` may vary: the method, then the draft's method's parameters
    (per model as ``models[*].NAME`` and each ``models[i].NAME``, method-wide as
    ``merge.parameters.NAME``), then the other methods' (for a space that switches method). A
    recipe of slices has no ``[[models]]``: its parameters are all ``merge.parameters``."""
    spec = get_method(draft.method)
    own = list(spec.params) if spec is not None else []
    others = [p for m in METHODS.values() for p in m.params if m is not spec]
    keys = [METHOD_KEY]
    for param in own:
        per_model = param.scope == "model" and not draft.slices
        keys.append(_key(param, per_model))
        if per_model:
            keys += [_key(param, True, str(i)) for i in range(len(draft.models))]
    keys += [_key(p, p.scope == "model" and not draft.slices) for p in others]
    return list(dict.fromkeys(keys))


def suggested_domain(key: str, draft: RecipeDraft) -> DimensionFields:
    """A starting domain for ``key``: the draft's method and the others for ``merge.method``,
    both values of a switch, and for a number its own range (open ends pulled in a tenth), or
    half to one and a half times its default, or 0.2 to 1.2 for a weight."""
    if key == METHOD_KEY:
        others = [name for name in ("ties", "task_arithmetic") if name != draft.method]
        return DimensionFields(key, CHOICES, choices=", ".join([draft.method, *others]))
    param = param_of(key, draft.method)
    if param is None:
        return DimensionFields(key, CHOICES)
    if param.kind is bool:
        return DimensionFields(key, CHOICES, choices="true, false")
    if param.minimum is not None and param.maximum is not None:
        span = param.maximum - param.minimum
        low = param.minimum + (0 if param.min_inclusive else span / 10)
        high = param.maximum - (0 if param.max_inclusive else span / 10)
    elif isinstance(param.default, (int, float)) and not isinstance(param.default, bool):
        low, high = param.default / 2, param.default * 1.5
    else:
        low, high = 0.2, 1.2
    if param.kind is int:
        low, high = round(low), round(high)
    return DimensionFields(key, RANGE, low=number_text(low), high=number_text(high))


def suggested_space(draft: RecipeDraft) -> list[DimensionFields]:
    """The space a sweep starts from: every model's weight and, when the method has it, density;
    for a method with neither, its first numeric parameter."""
    spec = get_method(draft.method)
    if spec is None:
        return []
    per_model = not draft.slices
    wanted = [p for p in spec.params if p.name in ("weight", "density")]
    if not wanted:
        wanted = [p for p in spec.params if p.kind in (int, float)][:1]
    return [suggested_domain(_key(p, per_model and p.scope == "model"), draft) for p in wanted]


# -- validation, by the sweep file's own loader ---------------------------------------------------
def problems(form: SweepForm, draft: RecipeDraft) -> list[str]:
    """Every problem with sweeping ``draft`` as ``form`` says, worded as ``mergetui sweep``
    words them (``sweep.space.'models[*].weight': the range is empty …``); the draft's own
    problems first, as the recipe (step 3) would show them. Empty when the sweep can start."""
    found, conflict = check(form, draft)
    if conflict is not None and not (form.restart and conflict[1]):
        found.append(
            conflict[0] + ('; tick "start over" to delete those trials' if conflict[1] else "")
        )
    return found


def check(form: SweepForm, draft: RecipeDraft) -> tuple[list[str], tuple[str, bool] | None]:
    """The sweep loader's problems, and what the output folder holds against it
    (:func:`mergetui.sweep.runner.output_conflict`: a message, and whether starting over
    settles it)."""
    from mergetui.errors import RecipeError
    from mergetui.recipe import recipe_to_toml
    from mergetui.sweep.runner import output_conflict
    from mergetui.sweep.spec import load_sweep

    try:
        recipe = draft.to_recipe()
    except RecipeError as exc:
        return [f"the recipe (step 3): {problem}" for problem in exc.problems], None
    with tempfile.TemporaryDirectory(prefix="mergetui-sweep-check-") as scratch:
        folder = Path(scratch)
        (folder / RECIPE_NAME).write_text(
            recipe_to_toml(recipe, absolute_paths=True), encoding="utf-8"
        )
        (folder / SWEEP_NAME).write_text(form.to_toml(draft.base_dir), encoding="utf-8")
        try:
            sweep = load_sweep(folder / SWEEP_NAME)
        except RecipeError as exc:
            return exc.problems, None
    return [], output_conflict(sweep)


def field_of(problem: str) -> str:
    """Which field a problem is about: ``trials``, ``score``, ``task:NAME``, ``space:KEY`` (the
    key as the problem names it; a grid's ``models[*]`` rows are named per model), ``tasks`` or
    ``space`` for the lists as a whole, ``""`` for none (the recipe's own problems)."""
    where = problem.split(": ", 1)[0]
    space = _SPACE_KEY.match(where)
    if space:
        return f"space:{space.group(1)}"
    task = _TASK_KEY.match(where)
    if task:
        return f"task:{task.group(1)}"
    for name in SWEEP_FIELDS:
        if where == f"sweep.{name}":
            return name
    for name in OBJECTIVE_FIELDS:
        if where == f"sweep.objective.{name}":
            return name
    if where.startswith("sweep.objective"):
        return "tasks"
    if where.startswith("sweep.space"):
        return "space"
    return ""


def any_model(key: str) -> str:
    """``models[1].weight`` → ``models[*].weight``: the row a per-model problem belongs to when
    the space names every model at once."""
    return re.sub(r"^models\[\d+\]", "models[*]", key)
