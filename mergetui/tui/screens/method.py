"""Step 3: the method and its parameters, as a form generated from the method registry.

Nothing here is written per method: the fields come from each ``ParamSpec`` (global ones once,
per-model ones once per model), and every change re-validates the whole draft with the same
validator recipes go through, so the reasons shown are the ones ``mergetui run`` would give.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import Button, Footer, Header, Input, Label, Select, Static

from mergetui.methods.registry import METHODS, MethodSpec, ParamSpec, get_method
from mergetui.tui.screens.base import StepScreen


def parse_value(param: ParamSpec, text: str) -> Any:
    """The typed value for a field's text (validation happens on the whole draft)."""
    text = text.strip()
    if param.kind is bool:
        lowered = text.lower()
        return {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}.get(
            lowered, text
        )
    try:
        return int(text) if param.kind is int else float(text)
    except ValueError:
        return text  # the validator says what is wrong with it


class MethodScreen(StepScreen):
    BINDINGS = [
        Binding("escape", "app.pop_screen", "Back"),
        Binding("ctrl+s", "save", "Save recipe", show=True),
        Binding("ctrl+r", "app.run", "Run merge", show=True),
        Binding("ctrl+n", "app.run", "Run", show=False),
    ]
    HELP = """\
## 3 · Method

Pick a method; its form comes from the method registry, global parameters first, then each
model's. Every change is validated at once with the same rules `mergetui run` applies: the
reasons show on the right, above a live preview of the recipe TOML.

Then the output folder, the dtype (default: the base's), the device (`auto` takes a GPU when there
is one) and the seed (for DARE). **Ctrl+S** saves the recipe (and shows the headless command);
**Ctrl+R** runs the merge.

""" + "\n".join(f"- **{m.name}**: {m.summary} {m.when_to_use}" for m in METHODS.values())

    def compose(self) -> ComposeResult:
        draft = self.draft
        yield Header()
        with Horizontal(id="method-step"):
            with VerticalScroll(id="method-form"):
                yield Label("3 · Method and parameters")
                yield Select(
                    [
                        (f"{spec.name} — {spec.summary.rstrip('.')}", spec.name)
                        for spec in METHODS.values()
                    ],
                    value=draft.method,
                    allow_blank=False,
                    id="method",
                )
                yield Static("", id="method-help")
                yield Vertical(id="params")
                yield Label("output", classes="model-title")
                yield Label(
                    "output.path: the folder the merged model is written to", classes="param-help"
                )
                yield Input(draft.output, id="out-path")
                yield Label(
                    "merge.dtype: float32, float16, bfloat16 (default: the base's)",
                    classes="param-help",
                )
                yield Select(
                    [(d, d) for d in ("float32", "float16", "bfloat16")],
                    value=draft.dtype or Select.NULL,
                    prompt="the base's dtype",
                    id="out-dtype",
                )
                yield Label("merge.device: auto, cpu, cuda or cuda:N", classes="param-help")
                yield Input(draft.device, id="out-device")
                yield Label("merge.seed: for the randomised methods (DARE)", classes="param-help")
                yield Input(str(draft.seed), id="out-seed")
                yield Label("save the recipe as", classes="model-title")
                with Horizontal(classes="row"):
                    yield Input(draft.default_save_path(), id="save-path")
                    yield Button("Save (ctrl+s)", id="save", variant="success")
                yield Static(
                    f"headless, once saved: mergetui run {draft.default_save_path()}",
                    id="headless",
                    classes="param-help",
                )
            with Vertical(id="method-side"):
                yield Static("", id="problems")
                yield Static("", id="preview", markup=False)
        yield Footer()

    def on_mount(self) -> None:
        self._build_fields()

    @property
    def spec(self) -> MethodSpec:
        spec = get_method(self.draft.method)
        assert spec is not None
        return spec

    def _build_fields(self) -> None:
        draft = self.draft
        spec = self.spec
        self.query_one("#method-help", Static).update(f"{spec.summary} When: {spec.when_to_use}")
        box = self.query_one("#params", Vertical)
        box.remove_children()
        fields: list[Any] = []
        for param in spec.global_params:
            fields += self._field(param, f"g-{param.name}", draft.parameters.get(param.name))
        for index, entry in enumerate(draft.models):
            if spec.model_params:
                fields.append(Label(f"models[{index}]: {entry.model}", classes="model-title"))
            for param in spec.model_params:
                fields += self._field(
                    param, f"m{index}-{param.name}", entry.parameters.get(param.name)
                )
        box.mount_all(fields)
        self._validate()

    def _field(self, param: ParamSpec, field_id: str, value: Any) -> list[Any]:
        limits = param.range_text()
        default = "required" if param.required else f"default {param.default}"
        hint = f"{param.name} ({param.kind.__name__}{' in ' + limits if limits else ''}; {default}): {param.help}"
        text = "" if value is None else str(value).lower() if param.kind is bool else str(value)
        return [Label(hint, classes="param-help"), Input(text, id=field_id, placeholder=default)]

    @on(Select.Changed, "#method")
    def method_changed(self, event: Select.Changed) -> None:
        draft = self.draft
        if event.value == draft.method:
            return
        draft.method = str(event.value)
        allowed = {p.name for p in self.spec.global_params}
        draft.parameters = {k: v for k, v in draft.parameters.items() if k in allowed}
        model_allowed = {p.name for p in self.spec.model_params}
        weight = self.spec.param("weight")
        needs_weight = "weight" in model_allowed and weight is not None and weight.required
        for entry in draft.models:
            entry.parameters = {k: v for k, v in entry.parameters.items() if k in model_allowed}
            if needs_weight:
                entry.parameters.setdefault("weight", 1.0)
        self._build_fields()

    @on(Select.Changed, "#out-dtype")
    def dtype_changed(self, event: Select.Changed) -> None:
        self.draft.dtype = None if event.value is Select.NULL else str(event.value)
        self._validate()

    @on(Input.Changed, "#out-path, #out-device, #out-seed")
    def output_changed(self, event: Input.Changed) -> None:
        draft = self.draft
        value = event.value.strip()
        if event.input.id == "out-path":
            save = self.query_one("#save-path", Input)
            if save.value == draft.default_save_path():  # not chosen by hand: keep it beside
                save.value = f"{value.rstrip('/') or 'merged'}.toml"
            draft.output = value
        elif event.input.id == "out-device":
            draft.device = value
        else:
            draft.seed = int(value) if value.lstrip("-").isdigit() else value
        self._validate()

    @on(Input.Changed, "#save-path")
    def save_path_changed(self, event: Input.Changed) -> None:
        self.query_one("#headless", Static).update(
            f"headless, once saved: mergetui run {event.value.strip() or '…'}"
        )

    @on(Button.Pressed, "#save")
    def action_save(self) -> None:
        from mergetui.errors import MergeTuiError

        draft = self.draft
        path = Path(
            self.query_one("#save-path", Input).value.strip() or draft.default_save_path()
        ).expanduser()
        try:
            saved = draft.save(path)
        except MergeTuiError as exc:
            self.app.notify(str(exc).splitlines()[0], severity="error", title="not saved")
            return
        self.merge_app.mark_saved()
        self.query_one("#headless", Static).update(f"headless: mergetui run {saved}")
        self.app.notify(f"replay headless with: mergetui run {saved}", title=f"saved {saved}")

    @on(Input.Changed)
    def field_changed(self, event: Input.Changed) -> None:
        field_id = event.input.id or ""
        if field_id.startswith(("out-", "save-")):
            return
        draft = self.draft
        scope, _, name = field_id.partition("-")
        param = self.spec.param(name)
        if param is None:
            return
        target = draft.parameters if scope == "g" else draft.models[int(scope[1:])].parameters
        if event.value.strip():
            target[name] = parse_value(param, event.value)
        else:
            target.pop(name, None)
        self._validate()

    def _validate(self) -> None:
        from mergetui.errors import RecipeError
        from mergetui.recipe.toml_io import data_to_toml

        draft = self.draft
        problems = self.query_one("#problems", Static)
        try:
            draft.to_recipe()
        except RecipeError as exc:
            problems.update("\n".join(f"[b red]✗[/] {p}" for p in exc.problems))
        else:
            problems.update("[b green]✓ valid recipe[/]")
        self.query_one("#preview", Static).update(data_to_toml(draft.to_data()))
