"""Adapter-merge recipes: ``[adapters]`` with ``[[adapters.sources]]`` combines PEFT LoRA adapters
of one base into one adapter (``mergetui lora merge`` as a recipe), without any base weight.

A recipe is either a model merge (``[merge]`` with ``[[models]]`` or ``[[slices]]``) or an adapter
merge; :func:`validate_adapter_recipe_data` turns the parsed TOML of the latter into an
:class:`AdapterRecipe`, reporting every problem at once by its recipe key, as
:mod:`mergetui.recipe.validate` does for model merges. Only what the recipe itself says is checked
here (keys, types, ranges, which options a combination takes); the adapters' files are checked
when the merge is planned (:func:`mergetui.engine.adapter_merge.plan_adapter_merge`).

The table of combination types lives here, not in the engine, because both read it: this
validation (the recipe layer may not import the engine) and the engine's own checks of
``lora merge``'s options. It is plain data: no torch.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergetui.errors import RecipeError


@dataclass(frozen=True)
class CombinationInfo:
    """What a combination type does and which options it takes."""

    summary: str
    density: bool = False  # takes --density (required)
    sign: bool = False  # takes --majority-sign
    svd: bool = False  # truncated by SVD: takes --rank, --svd-clamp, …
    random: bool = False  # DARE: the seed matters
    same_rank: bool = False  # combines A and B entry by entry: one rank per module


_PRUNE = "keeps each adapter's largest-magnitude entries (--density)"
_ELECT = "elects a sign per entry and averages the agreeing ones"
_DROP = "drops entries at random (--density, --seed) and rescales the rest"

#: Every type PEFT's ``add_weighted_adapter`` offers, in its order.
COMBINATIONS: dict[str, CombinationInfo] = {
    "svd": CombinationInfo("the weighted sum of the deltas, cut to --rank by SVD", svd=True),
    "linear": CombinationInfo(
        "weighted sums of the A and of the B factors (fast, approximate; one rank)",
        same_rank=True,
    ),
    "cat": CombinationInfo("exact: the factors side by side; rank = the sum of the ranks"),
    "ties": CombinationInfo(
        f"TIES on the A and B factors: {_PRUNE}, {_ELECT}", density=True, sign=True, same_rank=True
    ),
    "ties_svd": CombinationInfo(
        f"TIES on the deltas, cut to --rank by SVD: {_PRUNE}, {_ELECT}",
        density=True,
        sign=True,
        svd=True,
    ),
    "dare_ties": CombinationInfo(
        f"DARE-TIES on the A and B factors: {_DROP}, {_ELECT}",
        density=True,
        sign=True,
        random=True,
        same_rank=True,
    ),
    "dare_linear": CombinationInfo(
        f"DARE on the A and B factors: {_DROP}, then weighted sums",
        density=True,
        random=True,
        same_rank=True,
    ),
    "dare_ties_svd": CombinationInfo(
        f"DARE-TIES on the deltas, cut to --rank by SVD: {_DROP}, {_ELECT}",
        density=True,
        sign=True,
        svd=True,
        random=True,
    ),
    "dare_linear_svd": CombinationInfo(
        f"DARE on the deltas, cut to --rank by SVD: {_DROP}, then the weighted sum",
        density=True,
        svd=True,
        random=True,
    ),
    "magnitude_prune": CombinationInfo(
        f"on the A and B factors: {_PRUNE}, then weighted sums", density=True, same_rank=True
    ),
    "magnitude_prune_svd": CombinationInfo(
        f"on the deltas, cut to --rank by SVD: {_PRUNE}, then the weighted sum",
        density=True,
        svd=True,
    ),
}
SIGN_METHODS = ("total", "frequency")
SVD_DRIVERS = ("gesvd", "gesvdj", "gesvda")


@dataclass(frozen=True)
class AdapterOption:
    """An option of ``[adapters]`` that only some combination types take, for forms (the TUI's
    method step builds its fields from these, so a form and the validation agree on which
    options a type takes): ``flag`` names the :class:`CombinationInfo` field that says so."""

    key: str
    kind: type
    flag: str
    help: str


#: The options that depend on the combination type, in the order forms show them.
ADAPTER_OPTIONS: tuple[AdapterOption, ...] = (
    AdapterOption(
        "density", float, "density", "the fraction of each adapter's entries kept, in (0, 1]"
    ),
    AdapterOption(
        "majority_sign", str, "sign", "how the sign of each entry is elected: total or frequency"
    ),
    AdapterOption("rank", int, "svd", "the output's rank (default: the largest input rank)"),
    AdapterOption("svd_clamp", float, "svd", "clamp the SVD's factors at this quantile, in (0, 1]"),
    AdapterOption("seed", int, "random", "seeds DARE's masks: a seed gives the same adapter"),
)


def combination_options(combination: str) -> tuple[AdapterOption, ...]:
    """The options of :data:`ADAPTER_OPTIONS` a combination type takes (none for an unknown
    one: the validator names it)."""
    info = COMBINATIONS.get(combination)
    if info is None:
        return ()
    return tuple(option for option in ADAPTER_OPTIONS if getattr(info, option.flag))


#: The version adapter-merge recipes are written as (read: 1 or 2). Releases before ``[adapters]``
#: refuse the unknown key by name whatever the version, so no version number is required.
ADAPTER_RECIPE_VERSION = 2
TOP_KEYS = ("version", "adapters", "output")
ADAPTER_KEYS = (
    "combination",
    "density",
    "majority_sign",
    "rank",
    "svd_clamp",
    "svd_full_matrices",
    "svd_driver",
    "seed",
    "device",
    "base",
    "sources",
)
SOURCE_KEYS = ("lora", "weight")
OUTPUT_KEYS = ("path",)
#: The tables of a model merge: a recipe with one of them and ``[adapters]`` is refused.
MODEL_MERGE_KEYS = ("merge", "models", "slices")
_DEVICE_RE = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")


def mixed_recipe_problem() -> str:
    """The one message for a recipe that is both a model merge and an adapter merge."""
    return (
        "adapters: a recipe is either a model merge ([merge] with [[models]] or [[slices]]) or "
        "an adapter merge ([adapters] with [[adapters.sources]]), not both; split it into two "
        "recipes (to fold an adapter into a model being merged, give lora = ... on its "
        "[[models]] entry instead)"
    )


@dataclass(frozen=True)
class AdapterSource:
    """One ``[[adapters.sources]]`` entry: a PEFT adapter folder and its weight."""

    lora: str
    weight: float = 1.0


@dataclass(frozen=True)
class AdapterRecipe:
    """A validated adapter-merge recipe (built only by :func:`validate_adapter_recipe_data`).

    The options mirror ``mergetui lora merge``'s (None: not given, the engine's default);
    ``base_dir`` is the folder relative paths resolve against (the recipe's)."""

    sources: tuple[AdapterSource, ...]
    combination: str
    output_path: str
    density: float | None = None
    majority_sign: str | None = None
    rank: int | None = None
    svd_clamp: float | None = None
    svd_full_matrices: bool = True
    svd_driver: str | None = None
    seed: int = 0
    device: str = "cpu"
    base: str | None = None
    version: int = ADAPTER_RECIPE_VERSION
    base_dir: Path = field(default_factory=Path.cwd)
    source_file: str | None = None

    def resolve_path(self, text: str) -> Path:
        """A recipe-relative path made absolute (``~`` expanded)."""
        path = Path(text).expanduser()
        return path if path.is_absolute() else (self.base_dir / path)

    @property
    def output_dir(self) -> Path:
        return self.resolve_path(self.output_path)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _string(problems: list[str], table: dict[str, Any], key: str, where: str) -> str | None:
    value = table.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        problems.append(f"{where}{key}: must be a non-empty string, not {value!r}")
        return None
    return value.strip()


def _unknown(where: str, key: str, allowed: tuple[str, ...]) -> str:
    import difflib

    close = difflib.get_close_matches(key, list(allowed), n=1, cutoff=0.6)
    hint = f" (did you mean `{close[0]}`?)" if close else ""
    listing = ", ".join(f"`{k}`" for k in allowed)
    return f"{where}{key}: unknown key{hint}; allowed here: {listing}"


def validate_adapter_recipe_data(
    data: dict[str, Any], *, base_dir: Path | None = None, source_file: str | None = None
) -> AdapterRecipe:
    """Validate a parsed adapter-merge recipe; raise :class:`RecipeError` listing every problem
    (each naming its key and the fix), or return the recipe with defaults filled in."""
    problems: list[str] = []
    for key in data:
        if key in MODEL_MERGE_KEYS:
            continue
        if key not in TOP_KEYS:
            problems.append(_unknown("", key, TOP_KEYS))
    if any(key in data for key in MODEL_MERGE_KEYS):
        problems.append(mixed_recipe_problem())

    version = data.get("version", 1)
    if isinstance(version, bool) or version not in (1, ADAPTER_RECIPE_VERSION):
        problems.append(
            f"version: this mergetui reads recipe versions 1 and 2, not {version!r}; set "
            f"version = {ADAPTER_RECIPE_VERSION}"
        )

    raw = data.get("adapters")
    if not isinstance(raw, dict):
        problems.append(
            f"adapters: must be a table ([adapters] with [[adapters.sources]]), not "
            f"{type(raw).__name__}"
        )
        raw = {}
    where = "adapters."
    for key in raw:
        if key not in ADAPTER_KEYS:
            problems.append(_unknown(where, key, ADAPTER_KEYS))

    combination = _string(problems, raw, "combination", where)
    info: CombinationInfo | None = None
    names = ", ".join(COMBINATIONS)
    if combination is None and "combination" not in raw:
        problems.append(
            f"adapters.combination: missing; choose how to combine the adapters, e.g. "
            f'combination = "svd" ({names})'
        )
    elif combination is not None:
        info = COMBINATIONS.get(combination)
        if info is None:
            import difflib

            close = difflib.get_close_matches(combination, list(COMBINATIONS), n=1, cutoff=0.6)
            hint = f" (did you mean `{close[0]}`?)" if close else ""
            problems.append(
                f"adapters.combination: unknown combination type {combination!r}{hint}; choose "
                f"one of {names}"
            )

    sources = _sources(problems, raw.get("sources"))
    density = _density(problems, raw, combination, info)
    majority_sign = _majority_sign(problems, raw, combination, info)
    rank, svd_clamp, svd_full, svd_driver = _svd_options(problems, raw, combination, info)

    seed = raw.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        problems.append(f"adapters.seed: must be a whole number >= 0, not {seed!r}")
        seed = 0
    device = _string(problems, raw, "device", where) or "cpu"
    if not _DEVICE_RE.match(device):
        problems.append(
            f"adapters.device: {device!r} is not a device; use cpu, cuda, cuda:N or auto"
        )
    elif svd_driver is not None and not device.startswith("cuda"):
        problems.append(
            "adapters.svd_driver: picks a cuSOLVER routine, so it needs a CUDA device; set "
            'adapters.device = "cuda" (or --device cuda), or drop svd_driver'
        )
    base = _string(problems, raw, "base", where)

    output_path = _output(problems, data)
    if problems:
        raise RecipeError(problems, source_file)
    assert combination is not None and output_path is not None
    return AdapterRecipe(
        sources=tuple(sources),
        combination=combination,
        output_path=output_path,
        density=density,
        majority_sign=majority_sign,
        rank=rank,
        svd_clamp=svd_clamp,
        svd_full_matrices=svd_full,
        svd_driver=svd_driver,
        seed=seed,
        device=device,
        base=base,
        version=ADAPTER_RECIPE_VERSION,
        base_dir=base_dir or Path.cwd(),
        source_file=source_file,
    )


def _sources(problems: list[str], raw: Any) -> list[AdapterSource]:
    add = 'add one [[adapters.sources]] table per adapter, with lora = "path/to/adapter"'
    if raw is None:
        problems.append(f"adapters.sources: missing; {add}")
        return []
    if not isinstance(raw, list) or not all(isinstance(item, dict) for item in raw):
        problems.append("adapters.sources: must be an array of tables ([[adapters.sources]])")
        return []
    if not raw:
        problems.append(f"adapters.sources: empty; {add}")
    sources = []
    for index, item in enumerate(raw):
        where = f"adapters.sources[{index}]."
        for key in item:
            if key not in SOURCE_KEYS:
                problems.append(_unknown(where, key, SOURCE_KEYS))
        lora = _string(problems, item, "lora", where)
        if lora is None and "lora" not in item:
            problems.append(
                f'{where}lora: missing; give the PEFT adapter folder, e.g. lora = "adapters/code"'
            )
        weight = item.get("weight", 1.0)
        if not _number(weight) or not math.isfinite(weight):
            problems.append(
                f"{where}weight: must be a finite number (negative subtracts the adapter), not "
                f"{weight!r}"
            )
            weight = 1.0
        if lora is not None:
            sources.append(AdapterSource(lora=lora, weight=float(weight)))
    return sources


def _types_with(flag: str) -> str:
    return ", ".join(name for name, info in COMBINATIONS.items() if getattr(info, flag))


def _density(
    problems: list[str], raw: dict[str, Any], kind: str | None, info: CombinationInfo | None
) -> float | None:
    value = raw.get("density")
    if value is None:
        if info is not None and info.density:
            problems.append(
                f"adapters.density: required by the {kind} combination (the fraction of each "
                "adapter's entries it keeps, in (0, 1]); add density = 0.5 under [adapters]"
            )
        return None
    if not _number(value) or not 0 < value <= 1:
        problems.append(
            f"adapters.density: must be a number in (0, 1] (the fraction of entries kept), not "
            f"{value!r}"
        )
        return None
    if info is not None and not info.density:
        problems.append(
            f"adapters.density: has no effect with {kind}; it is for {_types_with('density')} — "
            "drop it or choose one of those"
        )
    return float(value)


def _majority_sign(
    problems: list[str], raw: dict[str, Any], kind: str | None, info: CombinationInfo | None
) -> str | None:
    value = raw.get("majority_sign")
    if value is None:
        return None
    if value not in SIGN_METHODS:
        problems.append(
            f"adapters.majority_sign: unknown majority sign method {value!r}; use "
            f"{' or '.join(repr(m) for m in SIGN_METHODS)}"
        )
        return None
    if info is not None and not info.sign:
        problems.append(
            f"adapters.majority_sign: has no effect with {kind}; it is for {_types_with('sign')} "
            "— drop it"
        )
    return str(value)


def _svd_options(
    problems: list[str], raw: dict[str, Any], kind: str | None, info: CombinationInfo | None
) -> tuple[int | None, float | None, bool, str | None]:
    """rank, svd_clamp, svd_full_matrices and svd_driver: each in range, and only for the types
    that cut the combined delta by SVD."""
    rank = raw.get("rank")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        problems.append(f"adapters.rank: must be a positive whole number (e.g. 16), not {rank!r}")
        rank = None
    clamp = raw.get("svd_clamp")
    if clamp is not None and (not _number(clamp) or not 0 < clamp <= 1):
        problems.append(f"adapters.svd_clamp: is a quantile in (0, 1] (e.g. 0.99), not {clamp!r}")
        clamp = None
    full = raw.get("svd_full_matrices", True)
    if not isinstance(full, bool):
        problems.append(f"adapters.svd_full_matrices: must be true or false, not {full!r}")
        full = True
    driver = raw.get("svd_driver")
    if driver is not None and driver not in SVD_DRIVERS:
        problems.append(
            f"adapters.svd_driver: unknown driver {driver!r}; use one of {', '.join(SVD_DRIVERS)}"
        )
        driver = None
    if info is not None and not info.svd:
        made = "the sum of the adapters' ranks" if kind == "cat" else "the adapters' rank"
        for key in ("rank", "svd_clamp", "svd_full_matrices", "svd_driver"):
            if key in raw:
                problems.append(
                    f"adapters.{key}: is for the SVD types ({_types_with('svd')}); {kind} makes "
                    f"an adapter of {made} — drop it"
                )
    return rank, None if clamp is None else float(clamp), full, driver


def _output(problems: list[str], data: dict[str, Any]) -> str | None:
    output = data.get("output")
    if output is None:
        problems.append('output: missing; add an [output] table with path = "./merged-adapter"')
        return None
    if not isinstance(output, dict):
        problems.append(f"output: must be a table ([output]), not {type(output).__name__}")
        return None
    for key in output:
        if key in ("shard_size", "lora_rank", "lora_path"):
            problems.append(
                f"output.{key}: is for model merges; an adapter merge writes one adapter file "
                "(drop it)"
            )
        elif key not in OUTPUT_KEYS:
            problems.append(_unknown("output.", key, OUTPUT_KEYS))
    path = _string(problems, output, "path", "output.")
    if path is None and "path" not in output:
        problems.append(
            "output.path: missing; say where the combined adapter goes, e.g. "
            'path = "./merged-adapter"'
        )
    return path


def adapter_recipe_to_data(
    recipe: AdapterRecipe, *, absolute_paths: bool = False
) -> dict[str, Any]:
    """The recipe as plain TOML-ready data (options only when given, so the engine's defaults
    stay defaults); with ``absolute_paths`` local paths are written absolute, for the copy saved
    inside the output."""

    def ref(text: str) -> str:
        if not absolute_paths:
            return text
        path = recipe.resolve_path(text)
        return str(path.resolve()) if path.exists() else text

    table: dict[str, Any] = {"combination": recipe.combination}
    for key, value in (
        ("density", recipe.density),
        ("majority_sign", recipe.majority_sign),
        ("rank", recipe.rank),
        ("svd_clamp", recipe.svd_clamp),
    ):
        if value is not None:
            table[key] = value
    if not recipe.svd_full_matrices:
        table["svd_full_matrices"] = False
    if recipe.svd_driver is not None:
        table["svd_driver"] = recipe.svd_driver
    table["seed"] = recipe.seed
    table["device"] = recipe.device
    if recipe.base is not None:
        table["base"] = ref(recipe.base)
    table["sources"] = [{"lora": ref(s.lora), "weight": s.weight} for s in recipe.sources]
    path = str(recipe.output_dir.resolve()) if absolute_paths else recipe.output_path
    return {"version": recipe.version, "adapters": table, "output": {"path": path}}
