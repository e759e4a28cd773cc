"""Deterministic scenes of every TUI step, for the snapshot tests and ``screenshots/make.py``.

A scene is a workspace (tiny random models under fixed relative names, a recipe draft that
names them relatively, a task file, a recorded merge job and a recorded sweep job) plus an async
``run_before`` that drives the app to the step. What would differ from run to run is pinned: the
free disk the check reports, the HF cache listing (empty), cursor blinking, and the run and sweep
steps show recorded jobs (their events as a real merge and a real sweep write them, with fixed
numbers), not live ones whose timings vary.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from mergetui.events import (
    DoneEvent,
    Event,
    ExtractedEvent,
    PhaseEvent,
    PlanEvent,
    StartEvent,
    SweptEvent,
    TensorEvent,
    TrialEvent,
    TrialProgressEvent,
)

FIXED_FREE_DISK = 512 * 1024**3

#: name → (seed, scale of its task vector); a base and three fine-tunes of it
SCENE_MODELS = {"base": (0, 0.0), "ft-code": (1, 0.05), "ft-math": (2, 0.05), "ft-chat": (3, 0.05)}


def build_models(folder: Path) -> dict[str, Path]:
    """Tiny random Llama models with a character tokenizer, saved like real checkpoints."""
    import torch
    from conftest import TINY_LLAMA
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from mergetui.demo import save_char_tokenizer

    paths = {name: folder / name for name in SCENE_MODELS}
    if all((path / "config.json").is_file() for path in paths.values()):
        return paths
    torch.manual_seed(0)
    config = LlamaConfig(**TINY_LLAMA)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(paths["base"])
    save_char_tokenizer(paths["base"])
    for name, (seed, scale) in SCENE_MODELS.items():
        if name == "base":
            continue
        model = AutoModelForCausalLM.from_pretrained(paths["base"], dtype=torch.bfloat16)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for _, param in sorted(model.named_parameters()):
                param.add_((torch.randn(param.shape, generator=generator) * scale).to(param.dtype))
        model.save_pretrained(paths[name])
        for file in paths["base"].glob("tokenizer*"):
            (paths[name] / file.name).write_bytes(file.read_bytes())
    return paths


#: The tokens the vocabulary scenes' chat fine-tune adds to the base's tokenizer.
CHAT_TOKENS = ["<|im_start|>", "<|im_end|>"]


def save_chat_finetune(base: Path, directory: Path) -> Path:
    """A fine-tune whose vocabulary differs from its base's: the base's tokenizer plus the ChatML
    tokens (special), its embedding resized to fit, saved like a real checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(4)  # the rows the resize adds are drawn at random
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.add_tokens(CHAT_TOKENS, special_tokens=True)
    model.resize_token_embeddings(len(tokenizer))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def make_draft(workspace: Path) -> Any:
    from mergetui.tui.state import ModelDraft, RecipeDraft

    return RecipeDraft(
        base="models/base",
        models=[
            ModelDraft("models/ft-code", parameters={"weight": 1.0, "density": 0.6}),
            ModelDraft("models/ft-math", parameters={"weight": 0.8, "density": 0.5}),
        ],
        method="ties",
        output="merged",
        device="cpu",
        base_dir=workspace,
    )


#: A recipe made of [[slices]] (a small frankenmerge), as `mergetui open` loads one: the whole of
#: ft-code's layers, then its last layer blended with ft-math's.
SLICES_RECIPE = """version = 2
[merge]
method = "linear"
base = "models/base"
device = "cpu"
[merge.parameters]
weight = 1.0
[[slices]]
[[slices.sources]]
model = "models/ft-code"
layer_range = [0, 2]
[[slices]]
[[slices.sources]]
model = "models/ft-code"
layer_range = [1, 2]
weight = 0.7
[[slices.sources]]
model = "models/ft-math"
layer_range = [1, 2]
weight = 0.3
[output]
path = "merged-slices"
"""


#: A merge of models whose vocabularies differ: ft-chatml added the ChatML tokens to the base's.
VOCAB_RECIPE = """version = 2
[merge]
method = "ties"
base = "models/base"
device = "cpu"
tokenizer = "union"
missing_tokens = "base_mean"
pad_to_multiple_of = 8
chat_template = "chatml"
[[models]]
model = "models/ft-code"
weight = 1.0
density = 0.6
[[models]]
model = "models/ft-chatml"
weight = 1.0
density = 0.5
[output]
path = "merged-vocab"
"""


#: The adapters of the adapter-merge scenes: name → seed (rank 8, q_proj and v_proj of the base).
SCENE_ADAPTERS = {"code": 31, "math": 32}


def save_scene_adapters(base: Path, folder: Path) -> dict[str, Path]:
    """Real PEFT adapters of the scenes' base (seeded factors), whose config names the base as
    the recipe does (``models/base``), so the check shows the same text on every machine."""
    from test_lora_merge import _save_adapter

    paths = {name: folder / name for name in SCENE_ADAPTERS}
    for name, seed in SCENE_ADAPTERS.items():
        if (paths[name] / "adapter_config.json").is_file():
            continue
        _save_adapter(
            base, paths[name], seed, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]
        )
        config_file = paths[name] / "adapter_config.json"
        config = json.loads(config_file.read_text(encoding="utf-8"))
        config["base_model_name_or_path"] = "models/base"
        config_file.write_text(json.dumps(config, indent=2), encoding="utf-8")
    return paths


def make_adapter_draft(workspace: Path) -> Any:
    """An adapter merge of the two scene adapters: TIES on the deltas, cut to rank 8."""
    from mergetui.tui.state import ADAPTERS, AdapterDraft, RecipeDraft

    return RecipeDraft(
        kind=ADAPTERS,
        base="models/base",
        adapters=[AdapterDraft("adapters/code", 0.6), AdapterDraft("adapters/math", 0.4)],
        combination="ties_svd",
        adapter_options={"density": 0.5, "rank": 8},
        output="merged-adapter",
        base_dir=workspace,
    )


def record_job(workspace: Path, state: Path) -> None:
    """A finished job folder as a merge leaves it, with events written by a real merge earlier
    (the numbers are fixed so the run step renders the same every time)."""
    folder = state / "runs" / "20261129-120000-1-1"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "recipe.toml").write_text(
        (workspace / "recipe.toml").read_text(encoding="utf-8"), encoding="utf-8"
    )
    (folder / "job.json").write_text(
        json.dumps({"pid": 0, "pid_created": 0, "started": 0, "output": "merged"}),
        encoding="utf-8",
    )
    total, per_tensor = 21, 12_000
    events: list[Event] = [
        StartEvent(version="0.1.0", command="run"),
        PlanEvent(
            method="ties",
            device="cpu",
            output="merged",
            tensors_total=total,
            bytes_to_read=total * per_tensor,
            ok=True,
        ),
    ]
    for done in range(1, total + 1):
        progress = dict(
            tensors_done=done,
            tensors_total=total,
            tensor_name=f"model.layers.{min(done // 10, 1)}.mlp.up_proj.weight",
            bytes_read=done * per_tensor,
            bytes_to_read=total * per_tensor,
            bytes_written=done * 8_000,
            elapsed_s=done * 0.05,
            throughput_bytes_s=240_000.0,
            eta_s=(total - done) * 0.05,
            rss_bytes=(400 + (done % 5) * 8) * 1024**2,
            peak_rss_bytes=440 * 1024**2,
        )
        events.append(TensorEvent(**progress))
    events.append(DoneEvent(**progress, output="merged"))
    (folder / "events.jsonl").write_text(
        "".join(e.to_json() + "\n" for e in events), encoding="utf-8"
    )
    (folder / "stderr.log").write_text("", encoding="utf-8")
    (folder / "exit.json").write_text(json.dumps({"exit_code": 0, "ended": 1}), encoding="utf-8")


def record_lora_job(workspace: Path, state: Path) -> None:
    """A finished merge with ``output.lora_rank = 8``: the merge's events, its phases, then the
    extraction's tensors, ``extracted`` and the one ``done`` (fixed numbers, as for
    :func:`record_job`)."""
    folder = state / "runs" / "20261129-140000"
    folder.mkdir(parents=True, exist_ok=True)
    recipe = (workspace / "recipe.toml").read_text(encoding="utf-8")
    (folder / "recipe.toml").write_text(recipe + "lora_rank = 8\n", encoding="utf-8")
    (folder / "job.json").write_text(
        json.dumps({"pid": 0, "pid_created": 0, "started": 0, "output": "merged"}),
        encoding="utf-8",
    )
    total, per_tensor = 21, 12_000

    def progress(done: int, of: int, name: str, elapsed: float) -> dict[str, Any]:
        return dict(
            tensors_done=done,
            tensors_total=of,
            tensor_name=name,
            bytes_read=done * per_tensor,
            bytes_to_read=of * per_tensor,
            bytes_written=done * 8_000,
            elapsed_s=elapsed,
            throughput_bytes_s=240_000.0,
            eta_s=(of - done) * 0.05,
            rss_bytes=(400 + (done % 5) * 8) * 1024**2,
            peak_rss_bytes=440 * 1024**2,
        )

    events: list[Event] = [
        StartEvent(version="0.1.0", command="run"),
        PlanEvent(
            method="ties",
            device="cpu",
            output="merged",
            tensors_total=total,
            bytes_to_read=total * per_tensor,
            ok=True,
        ),
    ]
    for done in range(1, total + 1):
        name = f"model.layers.{min(done // 10, 1)}.mlp.up_proj.weight"
        events.append(TensorEvent(**progress(done, total, name, done * 0.05)))
    last = progress(total, total, "", total * 0.05)
    events.append(PhaseEvent(**last, message="writing config, tokenizer and model card"))
    events.append(
        PhaseEvent(
            **last,
            message="merged into merged; then extract a rank-8 LoRA adapter of (merged − base) "
            "into merged-lora",
        )
    )
    modules = [
        f"model.layers.{i}.{p}" for i in range(2) for p in ("self_attn.q_proj", "mlp.up_proj")
    ]
    for done, module in enumerate(modules, 1):
        events.append(TensorEvent(**progress(done, len(modules), module, 1.0 + done * 0.1)))
    extraction = progress(len(modules), len(modules), "", 1.5)
    events.append(PhaseEvent(**extraction, message="writing adapter_config.json and README.md"))
    events.append(
        ExtractedEvent(
            output="merged-lora",
            rank=8,
            target_modules=["q_proj", "up_proj"],
            modules_to_save=[],
            adapter_bytes=98_304,
            modules=[],
        )
    )
    events.append(DoneEvent(**{**last, "elapsed_s": 1.6}, output="merged"))
    (folder / "events.jsonl").write_text(
        "".join(e.to_json() + "\n" for e in events), encoding="utf-8"
    )
    (folder / "stderr.log").write_text("", encoding="utf-8")
    (folder / "exit.json").write_text(json.dumps({"exit_code": 0, "ended": 1}), encoding="utf-8")


#: The task file the sweep scenes score on (``tasks/add.jsonl`` in the workspace).
SWEEP_TASK_ROWS = [{"prompt": "1+1=", "answer": "2"}, {"prompt": "2+2=", "answer": "4"}]
#: A finished TPE sweep of the draft's weights and densities, as its events would say it:
#: (first model's weight, second's, density of both, accuracy on add or None when it failed)
SWEEP_TRIALS = [
    (0.74, 0.41, 0.62, 0.50),
    (1.05, 0.93, 0.35, 0.50),
    (0.31, 1.12, 0.88, 1.00),
    (0.52, 0.66, 0.71, None),
    (0.96, 0.27, 0.55, 1.00),
    (0.63, 0.58, 0.47, 0.50),
]


def record_sweep_job(workspace: Path, state: Path) -> None:
    """A finished sweep's job folder, unseen (so a fresh start reattaches to it): its recipe and
    sweep file, and the events ``mergetui sweep --json`` writes, with fixed numbers."""
    folder = state / "runs" / "20261129-130000"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "recipe.toml").write_text(
        (workspace / "recipe.toml").read_text(encoding="utf-8"), encoding="utf-8"
    )
    (folder / "sweep.toml").write_text(
        'version = 1\nrecipe = "recipe.toml"\n[sweep]\nstrategy = "tpe"\ntrials = 6\n',
        encoding="utf-8",
    )
    (folder / "job.json").write_text(
        json.dumps(
            {"pid": 0, "pid_created": 0, "started": 0, "output": "sweep-out", "kind": "sweep"}
        ),
        encoding="utf-8",
    )
    events: list[Event] = [
        StartEvent(version="0.1.0", command="sweep"),
        TrialProgressEvent(trial=None, what="scoring the parents ft-code on add", fraction=0.5),
    ]
    best: tuple[int, float] | None = None
    for number, (first, second, density, accuracy) in enumerate(SWEEP_TRIALS):
        objective = None if accuracy is None else accuracy / 1.0  # the best parent scores 1.0
        if objective is not None and (best is None or objective > best[1]):
            best = (number, objective)
        events.append(TrialProgressEvent(trial=number, what="merging", fraction=0.5))
        events.append(
            TrialEvent(
                number=number,
                trials_total=len(SWEEP_TRIALS),
                values={
                    "models[0].weight": first,
                    "models[1].weight": second,
                    "models[0].density": density,
                    "models[1].density": density,
                },
                scores={} if accuracy is None else {"add": accuracy},
                objective=objective,
                merge_s=0.1 + number / 100,
                eval_s=0.4 + number / 50,
                best=None if best is None else best[0],
                best_objective=None if best is None else best[1],
                message="" if accuracy is not None else "NaN in model.layers.1.mlp.up_proj.weight",
            )
        )
    assert best is not None
    events.append(
        SweptEvent(
            trials_done=len(SWEEP_TRIALS),
            best=best[0],
            best_objective=best[1],
            best_recipe="sweep-out/best.toml",
            output="sweep-out",
        )
    )
    (folder / "events.jsonl").write_text(
        "".join(e.to_json() + "\n" for e in events), encoding="utf-8"
    )
    (folder / "stderr.log").write_text("", encoding="utf-8")
    (folder / "exit.json").write_text(json.dumps({"exit_code": 0, "ended": 1}), encoding="utf-8")


def prepare(workspace: Path, models: dict[str, Path]) -> Path:
    """The scene workspace: ``models/NAME`` (links to the models), a saved recipe, a task file,
    a merge."""
    (workspace / "models").mkdir(parents=True, exist_ok=True)
    for name, path in models.items():
        link = workspace / "models" / name
        if not link.exists():
            link.symlink_to(path, target_is_directory=True)
    draft = make_draft(workspace)
    draft.save(Path("recipe.toml"))
    (workspace / "slices.toml").write_text(SLICES_RECIPE, encoding="utf-8")
    if not (workspace / "models" / "ft-chatml" / "config.json").is_file():
        save_chat_finetune(models["base"], workspace / "models" / "ft-chatml")
    (workspace / "vocab.toml").write_text(VOCAB_RECIPE, encoding="utf-8")
    save_scene_adapters(models["base"], workspace / "adapters")
    make_adapter_draft(workspace).save(Path("adapters.toml"))
    (workspace / "tasks").mkdir(exist_ok=True)
    (workspace / "tasks" / "add.jsonl").write_text(
        "".join(json.dumps(row) + "\n" for row in SWEEP_TASK_ROWS), encoding="utf-8"
    )
    if not (workspace / "merged" / "config.json").is_file():
        from mergetui.engine.executor import run_merge
        from mergetui.engine.plan import build_plan

        run_merge(build_plan(draft.to_recipe()), force=False)
    return workspace


def pin_environment(monkeypatch: Any, state: Path) -> None:
    """What varies from machine to machine, fixed: state folder, HF cache, free disk, colours."""
    import shutil

    import huggingface_hub.constants

    monkeypatch.setenv("MERGETUI_LOG_DIR", str(state))
    empty_cache = state / "empty-hf-cache"
    empty_cache.mkdir(parents=True, exist_ok=True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(empty_cache))
    real_usage = shutil.disk_usage
    monkeypatch.setattr(
        shutil,
        "disk_usage",
        lambda path: real_usage(path)._replace(free=FIXED_FREE_DISK),
    )
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TEXTUAL_ANIMATIONS", "none")
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()


def _still(app: Any) -> None:
    """No blinking cursors: a snapshot must not depend on the moment it is taken."""
    from textual.widgets import Input

    for field in app.screen.query(Input):
        field.cursor_blink = False


async def _settle(pilot: Any, condition: Callable[[], bool], timeout_s: float = 60) -> None:
    for _ in range(int(timeout_s / 0.05)):
        if condition():
            break
        await pilot.pause(0.05)
    await pilot.pause()
    await pilot.app.workers.wait_for_complete()
    await pilot.pause()
    _still(pilot.app)


def _text(app: Any, selector: str) -> str:
    """The text of a widget on the current screen ("" while that screen is not up yet)."""
    from textual.widgets import Static

    found = app.screen.query(selector)
    return str(found.first(Static).render()) if found else ""


async def models_step(pilot: Any) -> None:
    await _settle(pilot, lambda: True)


async def check_step(pilot: Any) -> None:
    pilot.app.action_check()
    await _settle(
        pilot,
        lambda: (
            _text(pilot.app, "#check-status") != ""
            and not _text(pilot.app, "#check-status").startswith("checking")
        ),
    )


async def method_step(pilot: Any) -> None:
    pilot.app.action_method()
    await _settle(pilot, lambda: True)


async def method_gradient_step(pilot: Any) -> None:
    """The method step with a gradient (its curve beside it) and overrides with a gradient."""
    models = pilot.app.draft.models
    models[0].parameters["weight"] = [0.2, 1.0, 0.6]
    models[0].parameters["density"] = {"self_attn": 0.3, "mlp": [1.0, 0.5, 0.2], "default": 0.6}
    pilot.app.action_method()
    await _settle(pilot, lambda: bool(pilot.app.screen.query("#m0-weight")))
    screen = pilot.app.screen
    screen.query_one("#method-form").scroll_to_widget(
        screen.query_one("#m0"), animate=False, top=True
    )
    await _settle(pilot, lambda: True)


async def method_vocabulary_step(pilot: Any) -> None:
    """The method step scrolled to the vocabulary fields."""
    pilot.app.action_method()
    await _settle(pilot, lambda: bool(pilot.app.screen.query("#vocabulary")))
    screen = pilot.app.screen
    screen.query_one("#method-form").scroll_to_widget(
        screen.query_one("#vocabulary"), animate=False, top=True
    )
    await _settle(pilot, lambda: True)


async def run_step(pilot: Any) -> None:
    await _settle(pilot, lambda: getattr(pilot.app.screen, "outcome", "") == "done")
    # the "reattached" toast times out after a few seconds: whether it is still up when the
    # picture is taken depends on the machine's speed, so it is cleared first
    pilot.app.clear_notifications()
    await _settle(pilot, lambda: True)


async def compare_step(pilot: Any) -> None:
    pilot.app.action_compare()
    await _settle(pilot, lambda: bool(getattr(pilot.app.screen, "names", [])))


async def sweep_step(pilot: Any) -> None:
    """The sweep form with a task file named, so it is ready to start."""
    from textual.widgets import Input

    pilot.app.action_sweep()
    await _settle(pilot, lambda: bool(pilot.app.screen.query(".task-path")))
    screen = pilot.app.screen
    screen.query_one(".task-name", Input).value = "add"
    screen.query_one(".task-path", Input).value = "tasks/add.jsonl"
    screen.query_one("#sweep-limit", Input).value = "100"
    await _settle(pilot, lambda: "ready" in _text(pilot.app, "#sweep-summary"))
    screen.query_one("#sweep-form").scroll_home(animate=False)
    await _settle(pilot, lambda: True)


async def sweep_monitor_step(pilot: Any) -> None:
    await _settle(pilot, lambda: getattr(pilot.app.screen, "outcome", "") == "done")


async def help_overlay(pilot: Any) -> None:
    pilot.app.action_method()
    await _settle(pilot, lambda: True)
    await pilot.press("f1")
    await _settle(pilot, lambda: True)


#: scene name → (which app: "draft" opens the recipe, "slices" the recipe of slices, "vocab" the
#: recipe of models whose vocabularies differ, "job" finds the recorded merge, "sweep-job" the
#: recorded sweep; run_before)
SCENES: dict[str, tuple[str, Callable[[Any], Awaitable[None]]]] = {
    "1-models": ("draft", models_step),
    "1-models-adapters": ("adapters", models_step),
    "2-check": ("draft", check_step),
    "2-check-slices": ("slices", check_step),
    "2-check-vocabulary": ("vocab", check_step),
    "2-check-adapters": ("adapters", check_step),
    "3-method": ("draft", method_step),
    "3-method-gradient": ("draft", method_gradient_step),
    "3-method-slices": ("slices", method_step),
    "3-method-vocabulary": ("vocab", method_vocabulary_step),
    "3-method-adapters": ("adapters", method_step),
    "4-run": ("job", run_step),
    "4-run-lora": ("lora-job", run_step),
    "5-compare": ("draft", compare_step),
    "6-sweep": ("draft", sweep_step),
    "6-sweep-monitor": ("sweep-job", sweep_monitor_step),
    "help": ("draft", help_overlay),
}


def scene_app(kind: str, workspace: Path, state: Path) -> Any:
    """The app a scene starts from: the workspace's recipe (``slices``: its recipe of slices,
    ``vocab``: its recipe of models whose vocabularies differ, ``adapters``: its adapter merge)
    opened, or (``job``, ``sweep-job``, ``lora-job``: a merge that extracted an adapter) a fresh
    start that finds the recorded merge or sweep and reattaches to it."""
    from mergetui.recipe import load_any_recipe, load_recipe
    from mergetui.tui.app import create_app
    from mergetui.tui.state import RecipeDraft

    runs = state / "runs"
    recorders = {"job": record_job, "sweep-job": record_sweep_job, "lora-job": record_lora_job}
    if kind in recorders:
        recorders[kind](workspace, state)
        return create_app(workspace)
    if runs.exists():
        import shutil

        shutil.rmtree(runs)
    if kind == "adapters":
        adapters = load_any_recipe(workspace / "adapters.toml")
        return create_app(draft=RecipeDraft.from_recipe(adapters))
    recipe = workspace / {"slices": "slices.toml", "vocab": "vocab.toml"}.get(kind, "recipe.toml")
    return create_app(draft=RecipeDraft.from_recipe(load_recipe(recipe)))
