"""mergetui's output equals the real mergekit's, method by method, on the same float32 models.

Each case is one merge written twice: a mergetui recipe (run as ``mergetui run RECIPE`` does) and
the equivalent ``mergekit-yaml`` config (run by mergekit 0.1.5 in its own venv, see
``mergekit_ref.py``). The outputs must hold the same tensors, shapes, dtypes and values (float32
arithmetic on both sides, so to 1e-6 relative), the same ``config.json`` and the same tokenizer.

How the conventions map (as in ``bench/bench_merge.py``): mergetui's linear takes no base as an
input (a base would only supply config and tokenizer), so mergekit's gets no ``base_model``;
mergekit's slerp wants its base among ``models`` too; the task-vector methods name the base as
``base_model``. Defaults that matter (normalize on for linear and ties, off for task_arithmetic;
lambda 1) agree, and are spelled out anyway so a change of default on either side shows here.
"""

from __future__ import annotations

import json
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
from mergekit_ref import MergekitReference, assert_same_config, assert_same_model

from mergetui.engine.executor import run_merge
from mergetui.engine.plan import build_plan
from mergetui.recipe import load_recipe


@dataclass(frozen=True)
class Case:
    """One merge: mergetui's recipe from its ``[merge]`` keys on (``dtype``, ``device`` and
    ``seed`` are added), mergekit's YAML; ``{base}``, ``{ft1}``... stand for the zoo's folders."""

    recipe: str
    config: str


CASES = {
    "linear": Case(
        recipe="""
            method = "linear"
            [merge.parameters]
            normalize = true
            [[models]]
            model = "{ft1}"
            weight = 1.0
            [[models]]
            model = "{ft2}"
            weight = 0.6
            [[models]]
            model = "{ft3}"
            weight = 0.3
        """,
        config="""
            merge_method: linear
            dtype: float32
            parameters:
              normalize: true
            models:
              - model: {ft1}
                parameters:
                  weight: 1.0
              - model: {ft2}
                parameters:
                  weight: 0.6
              - model: {ft3}
                parameters:
                  weight: 0.3
        """,
    ),
    "slerp": Case(
        recipe="""
            method = "slerp"
            base = "{base}"
            [merge.parameters]
            t = 0.3
            [[models]]
            model = "{ft1}"
        """,
        config="""
            merge_method: slerp
            base_model: {base}
            dtype: float32
            parameters:
              t: 0.3
            models:
              - model: {base}
              - model: {ft1}
        """,
    ),
    "task_arithmetic": Case(
        recipe="""
            method = "task_arithmetic"
            base = "{base}"
            [merge.parameters]
            normalize = false
            lambda = 1.0
            [[models]]
            model = "{ft1}"
            weight = 0.5
            [[models]]
            model = "{ft2}"
            weight = 0.3
            [[models]]
            model = "{ft3}"
            weight = 0.7
        """,
        config="""
            merge_method: task_arithmetic
            base_model: {base}
            dtype: float32
            parameters:
              normalize: false
              lambda: 1.0
            models:
              - model: {ft1}
                parameters:
                  weight: 0.5
              - model: {ft2}
                parameters:
                  weight: 0.3
              - model: {ft3}
                parameters:
                  weight: 0.7
        """,
    ),
    "ties": Case(
        recipe="""
            method = "ties"
            base = "{base}"
            [merge.parameters]
            normalize = true
            lambda = 1.0
            [[models]]
            model = "{ft1}"
            weight = 1.0
            density = 0.5
            [[models]]
            model = "{ft2}"
            weight = 0.6
            density = 0.5
        """,
        config="""
            merge_method: ties
            base_model: {base}
            dtype: float32
            parameters:
              normalize: true
              lambda: 1.0
            models:
              - model: {ft1}
                parameters:
                  weight: 1.0
                  density: 0.5
              - model: {ft2}
                parameters:
                  weight: 0.6
                  density: 0.5
        """,
    ),
    "passthrough": Case(
        recipe="""
            method = "passthrough"
            [[models]]
            model = "{ft2}"
            scale = 0.5
        """,
        config="""
            merge_method: passthrough
            dtype: float32
            models:
              - model: {ft2}
                parameters:
                  scale: 0.5
        """,
    ),
}


def mergetui_merge(case: Case, zoo: dict[str, Path], folder: Path) -> Path:
    """Run the case's recipe as ``mergetui run RECIPE`` does; return the output folder."""
    recipe = folder / "recipe.toml"
    recipe.write_text(
        'version = 1\n[merge]\ndtype = "float32"\ndevice = "cpu"\nseed = 0\n'
        + textwrap.dedent(case.recipe).format(**zoo)
        + f'[output]\npath = "{folder / "out"}"\n',
        encoding="utf-8",
    )
    return run_merge(build_plan(load_recipe(recipe))).output_dir


def mergekit_config(case: Case, zoo: dict[str, Path]) -> str:
    return textwrap.dedent(case.config).lstrip("\n").format(**zoo)


@pytest.mark.parametrize("method", list(CASES))
def test_mergetui_output_equals_mergekit(
    method: str, mergekit: MergekitReference, mk_zoo: dict[str, Path], tmp_path: Path
) -> None:
    case = CASES[method]
    theirs = mergekit.merge(mergekit_config(case, mk_zoo), tmp_path / "mergekit")
    (tmp_path / "mergetui").mkdir()
    ours = mergetui_merge(case, mk_zoo, tmp_path / "mergetui")

    assert_same_model(ours, theirs)
    assert_same_config(ours, theirs)
    # The same files, but for each tool's copy of its recipe; those both copy are the same bytes.
    files = {p.name for p in ours.iterdir()} - {"mergetui.toml"}
    assert files == {p.name for p in theirs.iterdir()} - {"mergekit_config.yml"}
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (ours / name).read_bytes() == (theirs / name).read_bytes(), name


def test_a_failed_mergekit_merge_fails_with_its_traceback_and_the_worker_goes_on(
    mergekit: MergekitReference, mk_zoo: dict[str, Path], tmp_path: Path
) -> None:
    with pytest.raises(AssertionError, match=r"(?s)mergekit failed.*Traceback.*no_such_method"):
        mergekit.merge(
            f"merge_method: no_such_method\nmodels:\n  - model: {mk_zoo['ft1']}\n",
            tmp_path / "bad",
        )
    config = mergekit_config(CASES["passthrough"], mk_zoo)
    assert (mergekit.merge(config, tmp_path / "good") / "model.safetensors").is_file()


def test_the_comparisons_name_what_differs(tmp_path: Path) -> None:
    """The checks are not vacuous: a value past the tolerance, a dtype, a missing tensor and a
    config value are each reported, with the tensor, the difference and where it is."""
    import torch
    from safetensors.torch import save_file

    def model(name: str, tensors: dict[str, torch.Tensor], **config: object) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        save_file(tensors, str(folder / "model.safetensors"))
        (folder / "config.json").write_text(json.dumps({"model_type": "llama", **config}))
        return folder

    base = {"a": torch.linspace(-3, 3, 12).reshape(3, 4), "b": torch.ones(5)}
    ref = model("ref", base, transformers_version="1")
    near = model("near", {"a": base["a"] * (1 + 5e-7), "b": base["b"]}, transformers_version="2")
    assert_same_model(near, ref)
    assert_same_config(near, ref)

    far = base["a"].clone()
    far[2, 1] += 1e-3
    with pytest.raises(
        AssertionError, match=r"(?s)1 of 2 tensors.*\ba: max .* = 0\.001 .* at \(2, 1\)"
    ):
        assert_same_model(model("far", {"a": far, "b": base["b"]}), ref)
    with pytest.raises(AssertionError, match=r"b: ours torch.float16 \[5\], theirs torch.float32"):
        assert_same_model(model("dtype", {"a": base["a"], "b": base["b"].half()}), ref)
    with pytest.raises(AssertionError, match=r"only in .*: \[\]; only in .*: \['b'\]"):
        assert_same_model(model("missing", {"a": base["a"]}), ref)
    with pytest.raises(AssertionError, match=r"vocab_size: ours 10, theirs '\(missing\)'"):
        assert_same_config(model("config", base, vocab_size=10), ref)
