"""Recipe version 2: gradients, filtered parameters and slices; and mergekit YAML in and out.

The numbers a merge gets are checked against the real mergekit in test_mergekit_configs.py; here:
the rules (interpolation, matching, precedence), every early error (each naming its key and the
fix, before any weight is read) and the command line.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from conftest import TINY_LLAMA
from test_cli import run_cli

from mergetui.engine.plan import build_plan
from mergetui.errors import RecipeError
from mergetui.recipe import load_recipe, parse_recipe
from mergetui.recipe.mergekit_yaml import recipe_from_mergekit, translate_mergekit
from mergetui.recipe.params import Filtered, Gradient, resolve_chain, sparkline
from mergetui.recipe.toml_io import recipe_to_data, recipe_to_toml


def problems(text: str) -> list[str]:
    with pytest.raises(RecipeError) as info:
        parse_recipe(textwrap.dedent(text))
    return info.value.problems


# --- the value rules -------------------------------------------------------------------------------


def test_gradient_interpolates_like_mergekit() -> None:
    gradient = Gradient((0.0, 0.5, 0.3, 0.7, 1.0))
    # mergekit: x = t(n-1), i = int(x), (1-f)·a[i] + f·a[i+1]
    assert gradient.at(0.0) == 0.0
    assert gradient.at(1.0) == 1.0
    assert gradient.at(0.25) == 0.5
    assert gradient.at(1 / 3) == pytest.approx(0.5 + (1 / 3) * (0.3 - 0.5))
    assert Gradient((0.7,)).at(0.6) == 0.7


def test_filters_match_substrings_first_wins_and_fall_through() -> None:
    filtered = Filtered((("self_attn", 0.1), ("attn", 0.2)))
    name = "model.layers.0.self_attn.q_proj.weight"
    assert resolve_chain([(filtered, name)], 0.0) == 0.1
    assert resolve_chain([(filtered, "model.layers.0.cross_attn.w")], 0.0) == 0.2
    # nothing matches: the next level decides
    assert resolve_chain([(filtered, "model.norm.weight"), (0.9, "model.norm.weight")], 0.0) == 0.9
    # `default` matches everything, wherever it stands
    shadow = Filtered((("default", 0.5), ("mlp", 0.1)))
    assert resolve_chain([(shadow, "model.layers.0.mlp.up_proj.weight")], 0.0) == 0.5


def test_sparkline_draws_the_curve() -> None:
    assert sparkline([0, 0.5, 1]) == "▁▅█"
    assert sparkline([1, 1]) == "▄▄"


# --- validation ------------------------------------------------------------------------------------

SLERP_V2 = """\
    version = 2
    [merge]
    method = "slerp"
    base = "./a"
    [merge.parameters.t]
    self_attn = [0, 0.5, 0.3, 0.7, 1]
    mlp = [1, 0.5, 0.7, 0.3, 0]
    default = 0.5
    [[models]]
    model = "./b"
    [output]
    path = "./out"
"""


def test_v2_recipe_round_trips_and_stays_readable() -> None:
    recipe = parse_recipe(textwrap.dedent(SLERP_V2))
    assert recipe.parameters["t"] == Filtered(
        (
            ("self_attn", Gradient((0, 0.5, 0.3, 0.7, 1))),
            ("mlp", Gradient((1, 0.5, 0.7, 0.3, 0))),
            ("default", 0.5),
        )
    )
    text = recipe_to_toml(recipe)
    assert "self_attn = [0.0, 0.5, 0.3, 0.7, 1.0]" in text
    assert "version = 2" in text
    assert parse_recipe(text) == recipe


def test_v1_recipe_is_still_written_as_v1() -> None:
    text = SLERP_V2.replace("version = 2", "version = 1").replace(
        "[merge.parameters.t]\n    self_attn = [0, 0.5, 0.3, 0.7, 1]\n    mlp = [1, 0.5, 0.7, 0.3, 0]\n"
        "    default = 0.5",
        "[merge.parameters]\n    t = 0.5",
    )
    recipe = parse_recipe(textwrap.dedent(text))
    assert recipe_to_data(recipe)["version"] == 1


def test_v2_features_need_version_2() -> None:
    assert problems(SLERP_V2.replace("version = 2", "version = 1")) == [
        "version: gradients, filters and slices need recipe version 2; set version = 2"
    ]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("[0, 1.5]", "merge.parameters.t[1]: must be in [0, 1], not 1.5"),
        ("[]", "merge.parameters.t: an empty gradient; give at least one value"),
        ("{ self_attn = { mlp = 1 } }", "merge.parameters.t.self_attn: filters cannot be nested"),
        ("{}", "merge.parameters.t: an empty table"),
    ],
)
def test_bad_varying_values_name_the_key(value: str, expected: str) -> None:
    text = SLERP_V2.replace(
        "[merge.parameters.t]\n    self_attn = [0, 0.5, 0.3, 0.7, 1]\n    mlp = [1, 0.5, 0.7, 0.3, 0]\n"
        "    default = 0.5",
        f"[merge.parameters]\n    t = {value}",
    )
    found = problems(text)
    assert len(found) == 1 and found[0].startswith(expected), found


def test_gradient_on_a_parameter_that_does_not_take_numbers() -> None:
    text = """\
        version = 2
        [merge]
        method = "ties"
        base = "./a"
        [merge.parameters]
        normalize = [true, false]
        [[models]]
        model = "./b"
        weight = 1
        [output]
        path = "./out"
    """
    assert problems(text) == [
        "merge.parameters.normalize: a gradient (a list of values across the layers) needs a "
        "parameter that takes numbers; this one does not: give one value (divide by the sum of "
        "the weights (per element where signs were elected))"
    ]


FRANKEN = """\
    version = 2
    [merge]
    method = "passthrough"
    [[slices]]
    [[slices.sources]]
    model = "./a"
    layer_range = RANGE_A
    [[slices]]
    [[slices.sources]]
    model = "./b"
    layer_range = [1, 2]
    [output]
    path = "./out"
"""


@pytest.mark.parametrize(
    ("layer_range", "expected"),
    [
        ("[1, 1]", "slices[0].sources[0].layer_range: [1, 1] is empty"),
        ("[2, 1]", "slices[0].sources[0].layer_range: [2, 1] runs backwards"),
        ("[-1, 1]", "slices[0].sources[0].layer_range: [-1, 1] is negative"),
        ("[0]", "slices[0].sources[0].layer_range: must be two whole numbers"),
        ('"0-3"', "slices[0].sources[0].layer_range: must be two whole numbers"),
    ],
)
def test_bad_layer_ranges(layer_range: str, expected: str) -> None:
    found = problems(FRANKEN.replace("RANGE_A", layer_range))
    assert len(found) == 1 and found[0].startswith(expected), found


def test_slice_rules() -> None:
    text = """\
        version = 2
        [merge]
        method = "ties"
        base = "./base"
        [[slices]]
        [[slices.sources]]
        model = "./a"
        layer_range = [0, 2]
        [[slices.sources]]
        model = "./b"
        layer_range = [0, 3]
        [[slices]]
        [[slices.sources]]
        model = "./a"
        layer_range = [0, 2]
        [[slices.sources]]
        model = "./a"
        layer_range = [2, 4]
        [[slices]]
        [[slices.sources]]
        model = "./base"
        layer_range = [0, 2]
        t = 0.5
        [[models]]
        model = "./a"
        [output]
        path = "./out"
    """
    found = problems(text)
    assert found[0].startswith("slices: a recipe lists either [[models]]")
    assert any(
        p.startswith(
            "slices[0].sources: the layer ranges differ in length (./a [0, 2], ./b [0, 3])"
        )
        for p in found
    )
    assert any(p.startswith("slices[1].sources[1].model: ./a is listed twice") for p in found)
    assert any(
        p.startswith("slices[1].sources: the ties method merges task vectors against the base")
        for p in found
    )
    assert any(
        p.startswith("slices[2].sources[0].t: the ties method takes no `t` (it belongs to slerp")
        for p in found
    )


# --- the plan: checked from headers, before any weight is read ---------------------------------------


def slices_recipe(models: dict[str, Path], body: str, tmp_path: Path) -> Path:
    text = textwrap.dedent(body).format(**{k: str(v) for k, v in models.items()})
    path = tmp_path / "recipe.toml"
    path.write_text(text + f'[output]\npath = "{tmp_path / "out"}"\n', encoding="utf-8")
    return path


def test_layer_range_past_the_end_is_an_error_naming_the_model(
    models: dict[str, Path], tmp_path: Path
) -> None:
    recipe = slices_recipe(
        models,
        """\
        version = 2
        [merge]
        method = "passthrough"
        [[slices]]
        [[slices.sources]]
        model = "{ft_a}"
        layer_range = [0, 3]
        """,
        tmp_path,
    )
    plan = build_plan(load_recipe(recipe), fetch=False)
    plan.close()
    assert [p.message for p in plan.errors] == [
        f"slices[0].sources[0].layer_range: [0, 3] runs past the end of slices[0].sources[0] "
        f"({models['ft_a']}), which has 2 layers (0 to 1); the end is at most 2"
    ]


def test_frankenmerge_plan_reads_each_layer_from_its_slice(
    models: dict[str, Path], tmp_path: Path
) -> None:
    recipe = slices_recipe(
        models,
        """\
        version = 2
        [merge]
        method = "passthrough"
        [[slices]]
        [[slices.sources]]
        model = "{ft_a}"
        layer_range = [0, 2]
        [[slices]]
        [[slices.sources]]
        model = "{ft_c}"
        layer_range = [1, 2]
        """,
        tmp_path,
    )
    plan = build_plan(load_recipe(recipe), fetch=False)
    plan.close()
    assert not plan.errors
    by_name = {t.name: t for t in plan.tensors}
    layer2 = by_name["model.layers.2.mlp.up_proj.weight"]
    assert [(i.role, i.name) for i in layer2.inputs] == [
        ("slices[1].sources[0]", "model.layers.1.mlp.up_proj.weight")
    ]
    assert by_name["model.embed_tokens.weight"].inputs[0].role == "slices[0].sources[0]"
    assert by_name["model.norm.weight"].inputs[0].role == "slices[1].sources[0]"
    assert plan.config_updates == {"num_hidden_layers": 3}
    assert [o.sources for o in plan.layers] == [
        ((str(models["ft_a"]), 0),),
        ((str(models["ft_a"]), 1),),
        ((str(models["ft_c"]), 1),),
    ]
    # each source tensor is read once per output tensor that uses it, never more
    assert plan.bytes_to_read == sum(t.bytes_in for t in plan.tensors)
    assert sum(len(t.reads) for t in plan.tensors) == len(plan.tensors)


def test_per_tensor_parameters_follow_precedence(models: dict[str, Path], tmp_path: Path) -> None:
    """Source over slice over recipe; per-model filters see the source's tensor name, method-wide
    ones the output's; gradients restart in every slice."""
    recipe = slices_recipe(
        models,
        """\
        version = 2
        [merge]
        method = "ties"
        base = "{base}"
        [merge.parameters]
        weight = 0.25
        lambda = [1.0, 2.0]
        [merge.parameters.density]
        mlp = 0.3
        default = 0.9
        [[slices]]
        [slices.parameters]
        weight = 0.5
        [[slices.sources]]
        model = "{base}"
        layer_range = [0, 2]
        [[slices.sources]]
        model = "{ft_a}"
        layer_range = [0, 2]
        weight = [1.0, 0.0]
        [[slices.sources]]
        model = "{ft_b}"
        layer_range = [0, 2]
        """,
        tmp_path,
    )
    plan = build_plan(load_recipe(recipe), fetch=False)
    plan.close()
    assert not plan.errors, plan.errors
    by_name = {t.name: t for t in plan.tensors}
    up1 = by_name["model.layers.1.mlp.up_proj.weight"]
    assert up1.params["lambda"] == 2.0  # the last layer of the slice: the gradient's end
    assert [p["weight"] for p in up1.model_params] == [0.0, 0.5]
    assert [p["density"] for p in up1.model_params] == [0.3, 0.3]
    q0 = by_name["model.layers.0.self_attn.q_proj.weight"]
    assert q0.params["lambda"] == 1.0
    assert [p["weight"] for p in q0.model_params] == [1.0, 0.5]
    assert [p["density"] for p in q0.model_params] == [0.9, 0.9]
    embed = by_name["model.embed_tokens.weight"]  # outside the layers: the first anchor
    assert embed.params["lambda"] == 1.0 and embed.model_params[0]["weight"] == 1.0
    assert embed.base is not None and embed.base.role == "base"


def test_filter_matching_nothing_warns_and_missing_value_is_an_error(
    models: dict[str, Path], tmp_path: Path
) -> None:
    recipe = slices_recipe(
        models,
        """\
        version = 2
        [merge]
        method = "slerp"
        base = "{base}"
        [merge.parameters.t]
        self_atn = 0.3
        mlp = 0.7
        [[models]]
        model = "{ft_a}"
        """,
        tmp_path,
    )
    plan = build_plan(load_recipe(recipe), fetch=False)
    plan.close()
    assert [p.message for p in plan.warnings] == [
        "merge.parameters.t: the filter `self_atn` matches no tensor name, so it changes nothing; "
        "filters match part of a name such as model.layers.0.self_attn.q_proj.weight "
        "(e.g. self_attn, mlp)"
    ]
    assert plan.errors[0].message == (
        "merge.parameters.t: no value for tensor lm_head.weight (no "
        "filter matches it and there is no default); add default = ... to merge.parameters.t"
    )
    assert len(plan.errors) == 3  # the first few, not one per tensor


# --- mergekit YAML ---------------------------------------------------------------------------------


def test_yaml_problems_name_key_and_line(tmp_path: Path) -> None:
    text = textwrap.dedent(
        """\
        models:
          - model: ./a
            parameters:
              weight: 1
              dencity: 0.5
        merge_method: ties
        base_model: ./base
        parameters:
          t:
            - pattern: self_attn
              value: 0.5
        tokenizer_source: union
        slerp_factor: 2
        """
    )
    with pytest.raises(RecipeError) as info:
        translate_mergekit(text, source_file="c.yaml", base_dir=tmp_path)
    assert info.value.problems == [
        "slerp_factor (line 13): not a mergekit config key (mergekit would ignore it silently); "
        "remove it or fix its name; keys: merge_method, base_model, models, slices, parameters, "
        "dtype, out_dtype, tokenizer_source, tokenizer, chat_template, modules",
        "parameters.t[0].pattern (line 10): mergekit 0.1.5 has no `pattern` key and ignores it, so "
        "there this entry matches every tensor and hides the entries after it; write `filter:` for "
        "a per-tensor value (or drop the key for a default)",
    ]
    fixed = text.replace("tokenizer_source: union\nslerp_factor: 2\n", "").replace(
        "  t:\n    - pattern: self_attn\n      value: 0.5\n", "  normalize: true\n"
    )
    with pytest.raises(RecipeError) as info:
        recipe_from_mergekit(fixed, source_file="c.yaml", base_dir=tmp_path)
    assert info.value.problems == [
        "models[0].dencity: unknown key (did you mean `density`?); allowed here: `model`, "
        "`lora`, `weight`, `density` [from models[0].parameters.dencity (line 5)]"
    ]


def test_mergekit_conventions_are_translated(tmp_path: Path) -> None:
    """The base among mergekit's models; a linear base is one more averaged model; LoRA and
    revisions; int8_mask noted; out_dtype wins over dtype."""
    ties = translate_mergekit(
        textwrap.dedent(
            """\
            models:
              - model: org/base@v2
                parameters: {weight: 1}
              - model: org/code+org/code-lora@main
                parameters: {weight: 0.5, density: [0.2, 0.8]}
            merge_method: ties
            base_model: org/base@v2
            parameters: {int8_mask: true}
            dtype: bfloat16
            out_dtype: float16
            """
        ),
        base_dir=tmp_path,
    )
    assert ties.data["merge"] == {"method": "ties", "base": "org/base@v2", "dtype": "float16"}
    assert ties.data["models"] == [
        {"model": "org/code", "lora": "org/code-lora@main", "weight": 0.5, "density": [0.2, 0.8]}
    ]
    assert any("int8_mask" in note for note in ties.notes)
    assert any("base model's parameters are unused by ties" in note for note in ties.notes)
    linear = translate_mergekit(
        "models:\n  - model: org/a\n    parameters: {weight: 1}\nmerge_method: linear\n"
        "base_model: org/b\nparameters: {weight: 0.5}\n",
        base_dir=tmp_path,
    )
    assert linear.data["models"] == [{"model": "org/a", "weight": 1}, {"model": "org/b"}]


def test_import_and_export_commands(models: dict[str, Path], tmp_path: Path) -> None:
    """The commands as a user runs them, in a folder where mergekit's relative paths resolve."""
    (tmp_path / "m").symlink_to(models["base"].parent)
    config = tmp_path / "gradient-slerp.yml"
    config.write_text(
        "slices:\n  - sources:\n      - model: ./m/ft_a\n        layer_range: [0, 2]\n"
        "      - model: ./m/ft_c\n        layer_range: [0, 2]\nmerge_method: slerp\n"
        "base_model: ./m/ft_a\nparameters:\n  t: [0, 1]\n",
        encoding="utf-8",
    )
    result = run_cli("import", str(config), "-o", "recipes/slerp.toml", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    written = (tmp_path / "recipes" / "slerp.toml").read_text()
    assert 'model = "../m/ft_a"' in written  # paths rewritten for the recipe's folder
    assert "t = [0, 1]" in written
    again = run_cli("import", str(config), "-o", "recipes/slerp.toml", cwd=tmp_path)
    assert again.returncode == 2 and "already exists; pass --force" in again.stderr
    exported = run_cli("export", "recipes/slerp.toml", cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr
    assert "base_model: ./m/ft_a" in exported.stdout and "t: [0.0, 1.0]" in exported.stdout
    check = run_cli("check", str(config), "--json", cwd=tmp_path)
    assert check.returncode == 0, check.stderr
    assert json.loads(check.stdout)["ok"] is True
    run = run_cli("run", str(config), "-o", "out", "--device", "cpu", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    card = (tmp_path / "out" / "README.md").read_text()
    assert "| 0-1 | ./m/ft_a 0-1 + ./m/ft_c 0-1 (slerp) |" in card


# --- chat templates --------------------------------------------------------------------------------


def test_chat_template_is_written_and_loads(models: dict[str, Path], tmp_path: Path) -> None:
    """`chat_template = "chatml"` reaches the output where transformers reads it; `auto` takes the
    template most models share; a .jinja file is read relative to the recipe."""
    import shutil

    from transformers import AutoTokenizer

    from mergetui.engine.chat_templates import CHATML
    from mergetui.engine.executor import run_merge

    def merge(template_line: str, name: str, sources: list[Path]) -> Path:
        recipe = tmp_path / f"{name}.toml"
        entries = "".join(f'[[models]]\nmodel = "{s}"\nweight = 1.0\n' for s in sources)
        recipe.write_text(
            f'version = 1\n[merge]\nmethod = "linear"\ndevice = "cpu"\n{template_line}\n'
            f'{entries}[output]\npath = "{tmp_path / name}"\n',
            encoding="utf-8",
        )
        return run_merge(build_plan(load_recipe(recipe))).output_dir

    out = merge('chat_template = "chatml"', "chatml", [models["base"], models["ft_a"]])
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template == CHATML
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert "chat template: chatml" in (out / "README.md").read_text()

    # auto: two of three models carry template A, one carries B
    sources = []
    for index, template in enumerate(["{{ 'B' }}", "{{ 'A' }}", "{{ 'A' }}"]):
        folder = tmp_path / f"m{index}"
        shutil.copytree(models["base"], folder)
        (folder / "chat_template.jinja").write_text(template, encoding="utf-8")
        sources.append(folder)
    auto = merge('chat_template = "auto"', "auto", sources)
    assert (auto / "chat_template.jinja").read_text() == "{{ 'A' }}"

    (tmp_path / "mine.jinja").write_text("{{ messages[0]['content'] }}", encoding="utf-8")
    from_file = merge('chat_template = "mine.jinja"', "file", [models["base"]])
    assert AutoTokenizer.from_pretrained(from_file).chat_template == "{{ messages[0]['content'] }}"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("mistral", "merge.chat_template: mergekit's built-in 'mistral' template is not shipped"),
        (
            "chatlm",
            "merge.chat_template: 'chatlm' is neither auto, base, models[i], chatml, llama3, a "
            ".jinja file nor",
        ),
    ],
)
def test_bad_chat_template_names(value: str, expected: str) -> None:
    text = SLERP_V2.replace('base = "./a"', f'base = "./a"\n    chat_template = "{value}"')
    found = problems(text)
    assert len(found) == 1 and found[0].startswith(expected), found


def test_chat_template_from_mergekit(tmp_path: Path) -> None:
    base = "models:\n  - model: org/a\n    parameters: {weight: 1}\nmerge_method: linear\n"
    literal = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    ok = translate_mergekit(base + f'chat_template: "{literal}"\n', base_dir=tmp_path)
    assert ok.data["merge"]["chat_template"] == literal
    with pytest.raises(RecipeError) as info:
        translate_mergekit(base + "chat_template: alpaca\n", base_dir=tmp_path)
    assert info.value.problems[0].startswith(
        "chat_template (line 5): mergekit's built-in 'alpaca' template is not shipped"
    )


def test_stacked_output_rebuilds_per_layer_config_lists(tmp_path: Path) -> None:
    """A Qwen2 model with sliding-window layers: the output's layer_types lists each output layer's
    own type (from the source layer it came from), and transformers loads it."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from mergetui.engine.executor import run_merge

    config = Qwen2Config(
        **{**TINY_LLAMA, "num_hidden_layers": 4},
        use_sliding_window=True,
        sliding_window=16,
        max_window_layers=2,
    )
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(tmp_path / "qwen")
    layer_types = json.loads((tmp_path / "qwen" / "config.json").read_text())["layer_types"]
    assert layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2
    recipe = slices_recipe(
        {"qwen": tmp_path / "qwen"},
        """\
        version = 2
        [merge]
        method = "passthrough"
        device = "cpu"
        [[slices]]
        [[slices.sources]]
        model = "{qwen}"
        layer_range = [2, 4]
        [[slices]]
        [[slices.sources]]
        model = "{qwen}"
        layer_range = [0, 3]
        """,
        tmp_path,
    )
    out = run_merge(build_plan(load_recipe(recipe))).output_dir
    written = json.loads((out / "config.json").read_text())
    assert written["num_hidden_layers"] == 5
    assert written["layer_types"] == [
        "sliding_attention",
        "sliding_attention",
        "full_attention",
        "full_attention",
        "sliding_attention",
    ]
    model = AutoModelForCausalLM.from_pretrained(out)
    assert len(model.model.layers) == 5


def test_compare_lines_up_the_models_of_slices(models: dict[str, Path], tmp_path: Path) -> None:
    """compare/eval --recipe and the TUI's compare step: a merge of slices, its base and each model
    its slices take layers from, once each."""
    from mergetui.evaluate.lineup import recipe_lineup

    recipe = load_recipe(
        slices_recipe(
            models,
            """\
            version = 2
            [merge]
            method = "slerp"
            base = "{base}"
            [merge.parameters]
            t = 0.5
            [[slices]]
            [[slices.sources]]
            model = "{base}"
            layer_range = [0, 1]
            [[slices.sources]]
            model = "{ft_a}"
            layer_range = [0, 1]
            [[slices]]
            [[slices.sources]]
            model = "{ft_a}"
            layer_range = [1, 2]
            [[slices]]
            [[slices.sources]]
            model = "{ft_c}"
            layer_range = [1, 2]
            """,
            tmp_path,
        )
    )
    lineup = recipe_lineup(recipe, include_merged=False)
    assert lineup.names == ["base", "ft_a", "ft_c"]
    assert lineup.parents == ["ft_a", "ft_c"]


def test_export_warns_where_mergekit_would_refuse(tmp_path: Path) -> None:
    """mergetui copies a one-source slice under any method; mergekit's task-vector methods refuse
    a slice without its base, and the exported YAML says so where it happens."""
    from mergetui.recipe.mergekit_yaml import recipe_to_mergekit

    recipe = parse_recipe(
        textwrap.dedent(
            """\
            version = 2
            [merge]
            method = "ties"
            base = "org/base"
            [merge.parameters]
            weight = 1.0
            [[slices]]
            [[slices.sources]]
            model = "org/base"
            layer_range = [0, 2]
            [[slices.sources]]
            model = "org/code"
            layer_range = [0, 2]
            [[slices]]
            [[slices.sources]]
            model = "org/code"
            layer_range = [2, 4]
            [output]
            path = "./out"
            """
        )
    )
    text = recipe_to_mergekit(recipe, target_dir=tmp_path)
    assert "# slices[1] has one source and no base" in text
    assert "slices[0] has" not in text


def test_yaml_tokenizer_block_round_trips(tmp_path: Path) -> None:
    """mergekit's tokenizer block (source, tokens, pad_to_multiple_of) becomes merge.tokenizer,
    [merge.tokens] and merge.pad_to_multiple_of, and is exported back to the same block."""
    from mergetui.recipe.mergekit_yaml import recipe_from_mergekit, recipe_to_mergekit
    from mergetui.recipe.vocab import TokenOverride

    text = textwrap.dedent(
        """\
        merge_method: ties
        base_model: org/base
        tokenizer:
          source: union
          pad_to_multiple_of: 64
          tokens:
            <|im_end|>: {source: org/chat}
            <|x|>: {source: {kind: model_token, model: org/chat, token: "<|y|>"}, force: true}
            <|z|>: {source: {kind: zero}}
            <s>: {source: org/base}
        parameters: {density: 0.5}
        models:
          - model: org/chat
            parameters: {weight: 1.0}
          - model: org/code
            parameters: {weight: 1.0}
        """
    )
    recipe = recipe_from_mergekit(text, source_file="c.yaml", base_dir=tmp_path)
    assert (recipe.tokenizer, recipe.pad_to_multiple_of) == ("union", 64)
    assert recipe.tokens == (
        TokenOverride("<|im_end|>", "org/chat"),
        TokenOverride("<|x|>", "org/chat", from_token="<|y|>", force=True),
        TokenOverride("<|z|>", "zero"),
        TokenOverride("<s>", "base"),
    )
    again = recipe_from_mergekit(recipe_to_mergekit(recipe), base_dir=tmp_path)
    assert again.vocabulary == recipe.vocabulary
    # a token without a source fails mid-merge in mergekit; here, up front, with its line
    broken = text.replace("<|z|>: {source: {kind: zero}}", "<|z|>: {force: true}")
    with pytest.raises(RecipeError) as info:
        translate_mergekit(broken, source_file="c.yaml", base_dir=tmp_path)
    assert info.value.problems[0].startswith("tokenizer.tokens.<|z|> (line 9): no source")
    # tokenizer_source naming a model keeps that model's vocabulary
    plain = recipe_from_mergekit(
        text.replace(
            "tokenizer:\n  source: union", "tokenizer_source: org/code\ntokenizer_x:"
        ).split("tokenizer_x:")[0]
        + "parameters: {density: 0.5}\nmodels:\n  - model: org/chat\n    parameters: {weight: 1}\n"
        "  - model: org/code\n    parameters: {weight: 1}\n",
        base_dir=tmp_path,
    )
    assert plain.tokenizer == "org/code" and not plain.tokens


def test_export_says_how_to_extract_what_lora_rank_asks_for(tmp_path: Path) -> None:
    """mergekit has no key for extracting an adapter after the merge: the export says which
    mergekit command does it, instead of dropping ``output.lora_rank`` silently."""
    from mergetui.recipe.mergekit_yaml import recipe_to_mergekit

    recipe = parse_recipe(
        textwrap.dedent(
            """\
            [merge]
            method = "ties"
            base = "org/base"
            [[models]]
            model = "org/code"
            weight = 1.0
            density = 0.5
            [output]
            path = "./out"
            lora_rank = 32
            lora_path = "./code-lora"
            """
        )
    )
    text = recipe_to_mergekit(recipe, target_dir=tmp_path)
    assert "# output.lora_rank = 32 has no mergekit key" in text
    assert "--base org/base --out-path code-lora --max-rank 32" in text
